# smp: learns the CPU count from fw_cfg, starts every AP with INIT/SIPI, and
# has each AP report in on the serial port.
#
# The boot CPU reads fw_cfg (signature, CPU count, RAM size, file names),
# counts the CPUs in the MP table and in the ACPI MADT, copies a real-mode trampoline to 0x8000, enables its local APIC and, for
# each APIC id 1..N-1, sends INIT (assert, de-assert) and two STARTUP IPIs
# with vector 0x08, then waits for that AP to check in.  An AP switches to
# protected mode, loads a GDT, takes its own stack (by APIC id), prints
# "ap: cpu N online" and counts itself.  Exits with 0 when all are up, 3
# when an AP does not answer.

        .include "lib.inc"
        multiboot_header 0

        .set TRAMPOLINE, 0x8000
        .set LAPIC, 0xfee00000
        .set LAPIC_ID, 0x20
        .set LAPIC_SVR, 0xf0
        .set LAPIC_ICR_LO, 0x300
        .set LAPIC_ICR_HI, 0x310
        .set FW_CFG_SEL, 0x510
        .set FW_CFG_DATA, 0x511

        .text
        .globl _start
_start:
        mov $bsp_stack_top, %esp

        # fw_cfg: signature
        mov $FW_CFG_SEL, %dx
        mov $0x00, %ax
        outw %ax, %dx
        mov $FW_CFG_DATA, %dx
        say "fw_cfg: signature "
        mov $4, %ecx
1:      inb %dx, %al
        call putc
        loop 1b
        call newline
        # CPU count (key 0x05, u16 little endian)
        mov $FW_CFG_SEL, %dx
        mov $0x05, %ax
        outw %ax, %dx
        mov $FW_CFG_DATA, %dx
        xor %eax, %eax
        inb %dx, %al
        mov %eax, %ebx
        inb %dx, %al
        shl $8, %eax
        or %eax, %ebx
        mov %ebx, ncpus
        say "fw_cfg: cpus "
        mov %ebx, %eax
        call putdec
        call newline
        # RAM size (key 0x03, u64): print the low 32 bits in MiB
        mov $FW_CFG_SEL, %dx
        mov $0x03, %ax
        outw %ax, %dx
        mov $FW_CFG_DATA, %dx
        inl %dx, %eax
        shr $20, %eax
        say "fw_cfg: ram "
        call putdec
        say " MiB"
        call newline
        # file directory (key 0x19): u32 count (big endian), 64-byte entries
        mov $FW_CFG_SEL, %dx
        mov $0x19, %ax
        outw %ax, %dx
        mov $FW_CFG_DATA, %dx
        inl %dx, %eax
        bswap %eax
        mov %eax, %ecx
        jecxz 3f
1:      mov $file_entry, %edi
        push %ecx
        mov $64, %ecx
        rep insb
        pop %ecx
        say "fw_cfg: file "
        mov $file_entry+8, %esi
        call puts
        call newline
        loop 1b
3:
        call count_mp_cpus
        call count_acpi_cpus

        # trampoline to 0x8000
        mov $trampoline, %esi
        mov $TRAMPOLINE, %edi
        mov $(trampoline_end - trampoline), %ecx
        rep movsb

        # enable the local APIC (spurious vector 0xff)
        movl $0x1ff, LAPIC+LAPIC_SVR
        mov LAPIC+LAPIC_ID, %eax
        shr $24, %eax
        say "bsp: apic id "
        call putdec
        call newline

        mov $1, %ebx                    # APIC id of the next AP
next_ap:
        cmp ncpus, %ebx
        jae all_up
        mov %ebx, %eax
        shl $24, %eax
        mov %eax, LAPIC+LAPIC_ICR_HI
        movl $0x0000c500, LAPIC+LAPIC_ICR_LO    # INIT, level, assert
        call icr_wait
        mov %ebx, %eax
        shl $24, %eax
        mov %eax, LAPIC+LAPIC_ICR_HI
        movl $0x00008500, LAPIC+LAPIC_ICR_LO    # INIT, level, de-assert
        call icr_wait
        mov $2, %esi                            # two STARTUP IPIs
1:      mov %ebx, %eax
        shl $24, %eax
        mov %eax, LAPIC+LAPIC_ICR_HI
        movl $(0x00004600 | (TRAMPOLINE >> 12)), LAPIC+LAPIC_ICR_LO
        call icr_wait
        mov $200, %ecx                          # a short delay
2:      loop 2b
        dec %esi
        jnz 1b
        # wait for the AP to count itself (bounded)
        mov $2000000, %ecx
2:      cmp ap_count, %ebx
        jbe 3f
        pause
        loop 2b
        say "smp: cpu "
        mov %ebx, %eax
        call putdec
        say " did not start"
        call newline
        mov $3, %eax
        jmp exit
3:      inc %ebx
        jmp next_ap

all_up:
        say "smp: all "
        mov ncpus, %eax
        call putdec
        say " cpus online"
        call newline
        xor %eax, %eax
        jmp exit

# scan16: find the 32-bit signature %eax on a 16-byte boundary in [%esi, %edi);
# returns %esi = address or 0.
scan16:
1:      cmp %edi, %esi
        jae 2f
        cmp (%esi), %eax
        je 3f
        add $16, %esi
        jmp 1b
2:      xor %esi, %esi
3:      ret

# sum8: %eax = byte sum (mod 256) of %ecx bytes at %esi.
sum8:
        push %esi
        push %ecx
        push %edx
        xor %eax, %eax
1:      movzbl (%esi), %edx
        add %edx, %eax
        inc %esi
        loop 1b
        movzbl %al, %eax
        pop %edx
        pop %ecx
        pop %esi
        ret

# The MP table: floating pointer "_MP_" in the BIOS area, then "PCMP"; print
# the processor entries (type 0, 20 bytes; others 8) and the IOAPIC.
count_mp_cpus:
        mov $0xf0000, %esi
        mov $0x100000, %edi
        mov $0x5f504d5f, %eax           # "_MP_"
        call scan16
        test %esi, %esi
        jz 9f
        mov $16, %ecx
        call sum8
        test %eax, %eax
        jnz 9f
        mov 4(%esi), %esi               # configuration table
        cmpl $0x504d4350, (%esi)        # "PCMP"
        jne 9f
        movzwl 4(%esi), %ecx
        call sum8
        test %eax, %eax
        jnz 9f
        movzwl 34(%esi), %ecx           # entry count
        lea 44(%esi), %esi
        xor %ebx, %ebx                  # processors
        xor %edx, %edx                  # IOAPIC entries
1:      test %ecx, %ecx
        jz 4f
        cmpb $0, (%esi)
        jne 2f
        inc %ebx
        add $20, %esi
        jmp 3f
2:      cmpb $2, (%esi)
        jne 5f
        inc %edx
5:      add $8, %esi
3:      dec %ecx
        jmp 1b
4:      say "mptable: cpus "
        mov %ebx, %eax
        call putdec
        say " ioapics "
        mov %edx, %eax
        call putdec
        call newline
        ret
9:      say "mptable: missing or bad checksum"
        call newline
        ret

# ACPI: "RSD PTR " -> RSDT -> the "APIC" table (MADT); count processor entries.
count_acpi_cpus:
        mov $0xe0000, %esi
        mov $0x100000, %edi
1:      mov $0x20445352, %eax           # "RSD "
        call scan16
        test %esi, %esi
        jz 9f
        cmpl $0x20525450, 4(%esi)       # "PTR "
        je 2f
        add $16, %esi
        jmp 1b
2:      mov $20, %ecx
        call sum8
        test %eax, %eax
        jnz 9f
        mov 16(%esi), %esi              # RSDT
        cmpl $0x54445352, (%esi)        # "RSDT"
        jne 9f
        mov 4(%esi), %ecx
        call sum8
        test %eax, %eax
        jnz 9f
        mov 4(%esi), %ecx
        sub $36, %ecx
        shr $2, %ecx                    # table pointers
        lea 36(%esi), %edi
3:      jecxz 9f
        mov (%edi), %esi
        cmpl $0x43495041, (%esi)        # "APIC"
        je 4f
        add $4, %edi
        dec %ecx
        jmp 3b
4:      mov 4(%esi), %ecx
        call sum8
        test %eax, %eax
        jnz 9f
        mov %esi, %edi
        add 4(%esi), %edi               # end of the MADT
        add $44, %esi                   # first entry
        xor %ebx, %ebx
5:      cmp %edi, %esi
        jae 6f
        cmpb $0, (%esi)
        jne 7f
        testl $1, 4(%esi)               # enabled
        jz 7f
        inc %ebx
7:      movzbl 1(%esi), %eax
        add %eax, %esi
        jmp 5b
6:      say "acpi: madt cpus "
        mov %ebx, %eax
        call putdec
        call newline
        ret
9:      say "acpi: missing or bad checksum"
        call newline
        ret

icr_wait:
1:      testl $0x1000, LAPIC+LAPIC_ICR_LO       # delivery status
        jz 2f
        pause
        jmp 1b
2:      ret

# --- the AP trampoline: copied to 0x8000, entered in real mode at 0800:0000 ----
        .code16
trampoline:
        cli
        xor %ax, %ax
        mov %ax, %ds
        lgdtl TRAMPOLINE + (tramp_gdtr - trampoline)
        mov %cr0, %eax
        or $1, %eax
        mov %eax, %cr0
        ljmpl $0x08, $ap_main
        .align 8
tramp_gdt:
        .quad 0
        .quad 0x00cf9a000000ffff        # 0x08: code, flat, 32-bit
        .quad 0x00cf92000000ffff        # 0x10: data, flat
tramp_gdtr:
        .word 23
        .long TRAMPOLINE + (tramp_gdt - trampoline)
trampoline_end:

        .code32
ap_main:
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov LAPIC+LAPIC_ID, %ebx
        shr $24, %ebx
        mov %ebx, %eax
        inc %eax
        shl $10, %eax                   # 1 KiB of stack per AP
        lea ap_stacks(%eax), %esp
        # print under a spin lock
1:      mov $1, %eax
        xchg %eax, print_lock
        test %eax, %eax
        jz 2f
        pause
        jmp 1b
2:      say "ap: cpu "
        mov %ebx, %eax
        call putdec
        say " online"
        call newline
        movl $0, print_lock
        lock incl ap_count
1:      cli
        hlt
        jmp 1b

        .data
ap_count:   .long 0
print_lock: .long 0
ncpus:      .long 1

        .bss
        .align 16
file_entry: .space 64
            .space 4096
bsp_stack_top:
ap_stacks:  .space 1024 * 256
