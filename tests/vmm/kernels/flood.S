# flood: a hostile guest that tries to make the VMM grow, one device at a time.
# The command line picks the attack; each prints what the device let it see
# and exits with status 1 (debug exit 0).
#   loopback  5000 bytes to THR in loopback mode, then drain the receive FIFO
#   mmio      reads 2000 distinct unmapped MMIO addresses (each would be logged)
#   ports     reads 2000 distinct unhandled I/O ports
#   fwcfg     selects 1024 fw_cfg keys, reads 12 bytes from each (past most items' end)
#   cmos      writes all 256 index values, then reads 0x40 through the NMI bit
#   debugcon  rep outsb 4 KiB to the debug console 0xe9
        .include "lib.inc"
        multiboot_header 0
        .text
        .globl _start
_start:
        mov $stack_top, %esp
        mov 16(%ebx), %esi              # cmdline
        mov %esi, cmdline
        mov $s_loopback, %edi
        call find
        test %eax, %eax
        jnz loopback
        mov cmdline, %esi
        mov $s_mmio, %edi
        call find
        test %eax, %eax
        jnz mmio
        mov cmdline, %esi
        mov $s_ports, %edi
        call find
        test %eax, %eax
        jnz ports
        mov cmdline, %esi
        mov $s_fwcfg, %edi
        call find
        test %eax, %eax
        jnz fwcfg
        mov cmdline, %esi
        mov $s_cmos, %edi
        call find
        test %eax, %eax
        jnz cmos
        mov cmdline, %esi
        mov $s_debugcon, %edi
        call find
        test %eax, %eax
        jnz debugcon
        say "flood: no attack named"
        call newline
        mov $3, %eax
        jmp exit

done:   xor %eax, %eax
        jmp exit

loopback:
        mov $COM1+4, %dx
        mov $0x10, %al                  # MCR: loopback
        outb %al, %dx
        mov $5000, %ecx
        mov $COM1, %dx
        xor %eax, %eax
1:      outb %al, %dx
        inc %al
        loop 1b
        mov $COM1+5, %dx
        inb %dx, %al
        mov %eax, %ebx                  # LSR after the flood
        xor %ecx, %ecx                  # bytes drained
2:      mov $COM1+5, %dx
        inb %dx, %al
        test $1, %al
        jz 3f
        mov $COM1, %dx
        inb %dx, %al
        inc %ecx
        cmp $100000, %ecx
        jb 2b
3:      mov $COM1+4, %dx
        xor %al, %al                    # loopback off, so putc reaches the host
        outb %al, %dx
        say "loopback: drained "
        mov %ecx, %eax
        call putdec
        say " lsr "
        movzbl %bl, %eax
        call puthex
        call newline
        jmp done

mmio:
        mov $0xd0000000, %ebx
        mov $2000, %ecx
1:      mov (%ebx), %eax
        add $0x1000, %ebx
        loop 1b
        say "mmio: 2000 reads"
        call newline
        jmp done

ports:
        mov $0x4000, %edx
        mov $2000, %ecx
1:      inb %dx, %al
        inc %edx
        loop 1b
        say "ports: 2000 reads"
        call newline
        jmp done

fwcfg:
        xor %ebx, %ebx                  # key
1:      mov $0x510, %dx
        mov %ebx, %eax
        outw %ax, %dx
        mov $0x511, %dx
        mov $12, %ecx
2:      inb %dx, %al
        loop 2b
        inc %ebx
        cmp $1024, %ebx
        jb 1b
        mov $0x510, %dx                 # the signature still reads back
        xor %eax, %eax
        outw %ax, %dx
        mov $0x511, %dx
        say "fwcfg: "
        mov $4, %ecx
3:      inb %dx, %al
        call putc
        loop 3b
        call newline
        jmp done

cmos:
        xor %ebx, %ebx
1:      mov $0x70, %dx
        mov %bl, %al
        outb %al, %dx
        cmp $0x0f, %bl                  # leave the clock and status registers alone
        jbe 2f
        mov $0x71, %dx
        mov $0x5a, %al
        outb %al, %dx
2:      inc %ebx
        cmp $256, %ebx
        jb 1b
        mov $0x70, %dx
        mov $0x40, %al
        outb %al, %dx
        mov $0x71, %dx
        inb %dx, %al
        say "cmos: 0x40 = "
        movzbl %al, %eax
        call puthex
        call newline
        jmp done

debugcon:
        mov $1, %ebx                    # 1 x 4 KiB
1:      mov $0xe9, %dx
        mov $page, %esi
        mov $4096, %ecx
        rep outsb
        dec %ebx
        jnz 1b
        say "debugcon: 4096 bytes"
        call newline
        jmp done

        .section .rodata
s_loopback: .asciz "loopback"
s_mmio:     .asciz "mmio"
s_ports:    .asciz "ports"
s_fwcfg:    .asciz "fwcfg"
s_cmos:     .asciz "cmos"
s_debugcon: .asciz "debugcon"
page:       .fill 4096, 1, 0x2e
        .bss
cmdline:    .long 0
        .space 4096
stack_top:
