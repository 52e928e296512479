# timer: takes PIT interrupts through the in-kernel interrupt controllers.
#
# Loads its own GDT and an IDT, programs PIT channel 0 (mode 2, ~1 kHz) and
# counts TICKS interrupts with sti; hlt, then prints the count and exits 0.
# Command-line words pick the route:
#   (default) the 8259 PIC: remapped to vectors 0x20-0x2f, only IRQ 0 unmasked;
#             reaches the CPU through LAPIC LINT0 (ExtINT, "virtual wire")
#   ioapic    PIC fully masked, LAPIC enabled, IOAPIC pin 2 (the PC's ISA
#             override of IRQ 0) -> vector 0x30 on APIC id 0
#   hang      skip the timer: cli; hlt forever (for the watchdog test)
#   spin      skip the timer: spin forever with interrupts off
#   vmcall    a vmcall (spins inside KVM on PVM hosts), then spin
#   iret      return from interrupts with IRET (the default is popf; ret,
#             because KVM's emulator, which runs CPL0 code on PVM hosts,
#             has no protected-mode IRET: there this ends in an emulation failure)
# Any other vector (an exception, a stray interrupt) prints it and exits 2.

        .include "lib.inc"
        multiboot_header 0

        .set TICKS, 20
        .set LAPIC, 0xfee00000
        .set IOAPIC, 0xfec00000
        .set PIT_DIVISOR, 1193                  # 1193182 Hz / 1193 = ~1 kHz

        .text
        .globl _start
_start:
        mov $stack_top, %esp
        mov 16(%ebx), %esi
        mov %esi, cmdline

        lgdt gdtr
        ljmp $0x08, $1f
1:      mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss

        mov cmdline, %esi
        mov $s_hang, %edi
        call find
        test %eax, %eax
        jz 1f
        say "timer: hanging with interrupts off"
        call newline
2:      cli
        hlt
        jmp 2b
1:      mov $s_vmcall, %edi
        call find
        test %eax, %eax
        jz 1f
        say "timer: vmcall"
        call newline
        xor %eax, %eax
        vmcall                                  # on PVM hosts this never completes
        jmp 3f
1:      mov $s_spin, %edi
        call find
        test %eax, %eax
        jz 1f
3:      say "timer: spinning"
        call newline
        cli
2:      jmp 2b
1:
        # IDT: every vector to `unexpected`, which learns its number from the stub
        mov $idt, %edi
        xor %ecx, %ecx
1:      mov %ecx, %eax
        shl $4, %eax                            # stub i at stubs + 16*i
        add $stubs, %eax
        mov %ax, (%edi)
        movw $0x08, 2(%edi)
        movw $0x8e00, 4(%edi)                   # present, DPL 0, 32-bit interrupt gate
        shr $16, %eax
        mov %ax, 6(%edi)
        add $8, %edi
        inc %ecx
        cmp $256, %ecx
        jb 1b
        lidt idtr

        mov cmdline, %esi
        mov $s_iret, %edi
        call find
        mov %eax, use_iret
        mov $s_ioapic, %edi
        call find
        test %eax, %eax
        jnz use_ioapic

use_pic:
        movl $tick_pic, handler+0x20*4
        mov $0x11, %al                          # ICW1: edge, cascade, ICW4
        outb %al, $0x20
        outb %al, $0xa0
        mov $0x20, %al                          # ICW2: vector bases
        outb %al, $0x21
        mov $0x28, %al
        outb %al, $0xa1
        mov $0x04, %al                          # ICW3: slave on IRQ 2
        outb %al, $0x21
        mov $0x02, %al
        outb %al, $0xa1
        mov $0x01, %al                          # ICW4: 8086 mode
        outb %al, $0x21
        outb %al, $0xa1
        mov $0xfe, %al                          # only IRQ 0
        outb %al, $0x21
        mov $0xff, %al
        outb %al, $0xa1
        mov $s_pic, %esi
        jmp start_pit

use_ioapic:
        movl $tick_apic, handler+0x30*4
        mov $0xff, %al                          # PIC off
        outb %al, $0x21
        outb %al, $0xa1
        movl $0x1ff, LAPIC+0xf0                 # LAPIC on, spurious vector 0xff
        movl $0x14, IOAPIC                      # redirection entry 2, low half
        movl $0x30, IOAPIC+0x10                 # vector 0x30, fixed, edge, unmasked
        movl $0x15, IOAPIC
        movl $0x00000000, IOAPIC+0x10           # destination APIC id 0
        mov $s_ioapic_name, %esi

start_pit:
        mov %esi, route
        mov $0x34, %al                          # channel 0, lo/hi byte, mode 2
        outb %al, $0x43
        mov $(PIT_DIVISOR & 0xff), %al
        outb %al, $0x40
        mov $(PIT_DIVISOR >> 8), %al
        outb %al, $0x40
        sti
1:      hlt
        cmpl $TICKS, ticks
        jb 1b
        cli
        say "timer: "
        mov ticks, %eax
        call putdec
        say " ticks through the "
        mov route, %esi
        call puts
        call newline
        xor %eax, %eax
        jmp exit

tick_pic:
        incl ticks
        push %eax
        mov $0x20, %al                          # EOI to the master PIC
        outb %al, $0x20
        pop %eax
        ret

tick_apic:
        incl ticks
        movl $0, LAPIC+0xb0                     # EOI to the LAPIC
        ret

# stubs: 16 bytes apart: push $vector; jmp common
        .align 16
stubs:
        .set vec, 0
        .rept 256
        .align 16
        pushl $vec
        jmp common
        .set vec, vec + 1
        .endr
common:
        # (%esp) = vector.  Call its handler, or report it and exit 2.
        push %eax
        mov 4(%esp), %eax
        mov handler(,%eax,4), %eax
        test %eax, %eax
        jz unexpected
        call *%eax
        pop %eax
        add $4, %esp                            # the vector
        cmpl $0, use_iret
        je 1f
        iret
        # Same-privilege return without IRET: KVM's instruction emulator (which
        # runs all CPL0 code on PVM hosts) cannot do a protected-mode IRET.
        # Frame: EIP, CS, EFLAGS -> EFLAGS, EIP; then popf; ret.
1:      push %eax
        mov 4(%esp), %eax                       # EIP
        xchg %eax, 12(%esp)                     # EIP into the EFLAGS slot
        mov %eax, 8(%esp)                       # EFLAGS into the CS slot
        pop %eax
        add $4, %esp
        popf
        ret
unexpected:
        mov 4(%esp), %eax
        say "timer: unexpected vector "
        call putdec
        call newline
        mov $2, %eax
        jmp exit

        .section .rodata
s_hang:        .asciz "hang"
s_spin:        .asciz "spin"
s_vmcall:      .asciz "vmcall"
s_ioapic:      .asciz "ioapic"
s_iret:        .asciz "iret"
s_pic:         .asciz "8259 PIC"
s_ioapic_name: .asciz "IOAPIC"
        .align 8
gdt:    .quad 0
        .quad 0x00cf9a000000ffff
        .quad 0x00cf92000000ffff
gdtr:   .word 23
        .long gdt
idtr:   .word 256*8 - 1
        .long idt

        .bss
        .align 16
idt:      .space 256*8
handler:  .space 256*4
ticks:    .long 0
route:    .long 0
cmdline:  .long 0
use_iret: .long 0
          .space 4096
stack_top:
