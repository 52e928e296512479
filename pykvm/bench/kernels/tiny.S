# tiny: prints one line and exits (debug exit 0, status 1): the start-up benchmark.
        .include "lib.inc"
        multiboot_header 0
        .text
        .globl _start
_start:
        mov $stack_top, %esp
        say "hello from a multiboot kernel"
        call newline
        xor %eax, %eax
        jmp exit
        .bss
        .space 1024
stack_top:
