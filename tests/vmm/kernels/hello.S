# hello: prints what the boot loader handed over, then exits with a chosen code.
#
# Prints the magic check, a bss check, the command line, mem_lower/upper,
# every memory map entry, the modules (string, size, first line) and the
# boot loader name.  Command-line words:
#   exit=N   leave through the debug-exit port with N (status (N<<1)|1)
#   probe    poke PCI, CMOS, PIC, POST, an absent UART and unmapped MMIO
#   echo     read one line from the serial port and print it back
#   loopback run the 16550 loopback self-test first
#   reset    ask the keyboard controller for a reset (0xfe to port 0x64)
# Assemble with --defsym AOUT=1 for the a.out-kludge variant (flat binary).

        .include "lib.inc"

        .ifdef AOUT
        .set MB_FLAGS, 0x00010003
        .else
        .set MB_FLAGS, 0x00000003
        .endif
        multiboot_header MB_FLAGS
        .long mb_header                 # header_addr
        .long _image_start              # load_addr
        .long _edata                    # load_end_addr
        .long _end                      # bss_end_addr
        .long _start                    # entry_addr

        .text
        .globl _start
_start:
        mov $stack_top, %esp
        mov %eax, magic
        mov %ebx, info

        mov info, %ebx
        mov 16(%ebx), %esi              # cmdline (flag bit 2 checked below)
        testl $4, (%ebx)
        jnz 1f
        xor %esi, %esi
1:      mov %esi, cmdline

        mov $s_loopback, %edi
        call find
        test %eax, %eax
        jz 1f
        call loopback_test
1:
        say "hello: magic "
        cmpl $0x2BADB002, magic
        jne 1f
        say "ok"
        jmp 2f
1:      say "BAD "
        mov magic, %eax
        call puthex
2:      call newline

        # .bss must be zero
        mov $bss_probe, %edi
        mov $256, %ecx
        xor %eax, %eax
        repe scasl
        setne %bl                       # (printing clobbers the flags)
        say "bss: "
        test %bl, %bl
        jnz 1f
        say "zero"
        jmp 2f
1:      say "DIRTY"
2:      call newline

        mov cmdline, %esi
        test %esi, %esi
        jz 1f
        say "cmdline: "
        call puts
        call newline
1:
        mov info, %ebx
        testl $1, (%ebx)
        jz 1f
        say "mem_lower="
        mov 4(%ebx), %eax
        call putdec
        say " KiB mem_upper="
        mov 8(%ebx), %eax
        call putdec
        say " KiB"
        call newline
1:
        # memory map
        testl $0x40, (%ebx)
        jz 3f
        mov 48(%ebx), %esi              # mmap_addr
        mov 44(%ebx), %edi              # mmap_length
        add %esi, %edi
1:      cmp %edi, %esi
        jae 3f
        say "mmap: base=0x"
        mov 8(%esi), %eax
        call puthex
        mov 4(%esi), %eax
        call puthex
        say " length=0x"
        mov 16(%esi), %eax
        call puthex
        mov 12(%esi), %eax
        call puthex
        say " type="
        mov 20(%esi), %eax
        call putdec
        call newline
        mov (%esi), %eax
        lea 4(%esi,%eax), %esi
        jmp 1b
3:
        # modules
        testl $8, (%ebx)
        jz 3f
        say "modules: "
        mov 20(%ebx), %eax
        call putdec
        call newline
        mov 20(%ebx), %ecx
        mov 24(%ebx), %edx
        test %ecx, %ecx
        jz 3f
1:      say "module: "
        mov 8(%edx), %esi
        call puts
        say " size="
        mov 4(%edx), %eax
        sub (%edx), %eax
        call putdec
        say " aligned="
        testl $0xfff, (%edx)
        jnz 2f
        say "yes"
        jmp 4f
2:      say "no"
4:      say " first="
        push %ecx
        mov (%edx), %esi
        mov 4(%edx), %ecx
        sub %esi, %ecx
        cmp $40, %ecx
        jbe 5f
        mov $40, %ecx
5:      call putsn
        pop %ecx
        call newline
        add $16, %edx
        dec %ecx
        jnz 1b
3:
        testl $0x200, (%ebx)
        jz 1f
        say "loader: "
        mov 64(%ebx), %esi
        call puts
        call newline
1:
        mov cmdline, %esi
        mov $s_probe, %edi
        call find
        test %eax, %eax
        jz 1f
        call probe
1:
        mov cmdline, %esi
        mov $s_echo, %edi
        call find
        test %eax, %eax
        jz 1f
        call echo
1:
        mov cmdline, %esi
        mov $s_reset, %edi
        call find
        test %eax, %eax
        jz 1f
        mov $0xfe, %al
        outb %al, $0x64
        say "reset: still running"
        call newline
1:
        mov cmdline, %esi
        jmp exit_from_cmdline

# ---------------------------------------------------------------------------
probe:
        # PCI bus 0 device 0 function 0, register 0: no device reads all ones
        mov $0xcf8, %dx
        mov $0x80000000, %eax
        outl %eax, %dx
        mov $0xcfc, %dx
        inl %dx, %eax
        say "pci: 0x"
        call puthex
        call newline
        # CMOS base memory (0x15/0x16)
        mov $0x15, %al
        outb %al, $0x70
        inb $0x71, %al
        movzbl %al, %ebx
        mov $0x16, %al
        outb %al, $0x70
        inb $0x71, %al
        movzbl %al, %eax
        shl $8, %eax
        or %ebx, %eax
        say "cmos: base memory "
        call putdec
        say " KiB"
        call newline
        # PIC masks (in-kernel PIC) and a POST code
        mov $0xfb, %al
        outb %al, $0x21
        mov $0xff, %al
        outb %al, $0xa1
        mov $0x42, %al
        outb %al, $0x80
        inb $0x21, %al
        movzbl %al, %eax
        say "pic: mask 0x"
        call puthex
        call newline
        # an absent COM2 (twice: logged once) and a write to it
        mov $0x2fd, %dx
        inb %dx, %al
        inb %dx, %al
        movzbl %al, %eax
        say "com2: lsr 0x"
        call puthex
        call newline
        mov $0x2f9, %dx
        outb %al, %dx
        # unmapped MMIO (the HPET's address): all ones
        mov 0xfed00000, %eax
        mov 0xfed00000, %eax
        say "mmio: 0x"
        call puthex
        call newline
        # fw_cfg signature
        mov $0x510, %dx
        xor %eax, %eax
        outw %ax, %dx
        mov $0x511, %dx
        say "fw_cfg: "
        mov $4, %ecx
1:      inb %dx, %al
        call putc
        loop 1b
        call newline
        ret

echo:
        say "echo: "
1:      mov $COM1+5, %dx
2:      inb %dx, %al
        test $1, %al
        jz 2b
        mov $COM1, %dx
        inb %dx, %al
        cmp $10, %al
        je 3f
        call putc
        jmp 1b
3:      call newline
        ret

# 16550 loopback test, as OS drivers do: exit 99 when the byte does not come back.
loopback_test:
        mov $COM1+1, %dx
        xor %al, %al
        outb %al, %dx           # IER = 0
        mov $COM1+3, %dx
        mov $0x80, %al
        outb %al, %dx           # DLAB
        mov $COM1, %dx
        mov $3, %al
        outb %al, %dx           # 38400 baud
        mov $COM1+1, %dx
        xor %al, %al
        outb %al, %dx
        mov $COM1+3, %dx
        mov $3, %al
        outb %al, %dx           # 8N1
        mov $COM1+2, %dx
        mov $0xc7, %al
        outb %al, %dx           # FIFO on, cleared
        mov $COM1+4, %dx
        mov $0x1e, %al
        outb %al, %dx           # loopback
        mov $COM1, %dx
        mov $0xae, %al
        outb %al, %dx
        inb %dx, %al
        cmp $0xae, %al
        jne 1f
        mov $COM1+4, %dx
        mov $0x0f, %al
        outb %al, %dx           # normal operation
        say "uart: loopback ok"
        call newline
        ret
1:      mov $99, %eax
        jmp exit

        .section .rodata
s_probe:    .asciz "probe"
s_echo:     .asciz "echo"
s_loopback: .asciz "loopback"
s_reset:    .asciz "reset"

        .data
        .long 0x12345678                # .data is never empty (a.out kludge: load_end_addr)

        .bss
        .align 16
magic:     .long 0
info:      .long 0
cmdline:   .long 0
bss_probe: .space 1024
           .space 4096
stack_top:
