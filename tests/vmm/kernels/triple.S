# triple: triple-faults on purpose.
#
# Loads an empty IDT (limit 0) and executes ud2: the #UD cannot be
# delivered (#GP), neither can the #GP (#DF), nor the #DF: the CPU shuts
# down, which KVM reports as KVM_EXIT_SHUTDOWN.
        .include "lib.inc"
        multiboot_header 0
        .text
        .globl _start
_start:
        mov $stack_top, %esp
        say "triple: faulting now"
        call newline
        lidt empty_idtr
        mov $0xdeadbeef, %eax
        .globl fault_here
fault_here:
        ud2
        say "triple: still alive?!"
        call newline
        mov $5, %eax
        jmp exit

        .section .rodata
empty_idtr:
        .word 0
        .long 0
        .bss
        .space 1024
stack_top:
