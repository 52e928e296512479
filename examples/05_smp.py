"""05 — SMP: two vCPUs in two threads, started like firmware does (INIT/SIPI).

What it shows
  * one Python thread per vCPU, each with its own ``RunLoop``; the loops
    share one ``x86.Bus`` (the UART and the exit port);
  * the bootstrap processor (vCPU 0) starts in long mode; it wakes the
    application processor (vCPU 1) through its in-kernel local APIC:
    an INIT IPI, then a STARTUP IPI with vector 8, so vCPU 1 starts in
    *real mode* at 0800:0000 = physical 0x8000.  Until then vCPU 1's
    ``KVM_RUN`` simply waits in the kernel;
  * the classic AP trampoline at 0x8000: load the GDT, enable PAE, load CR3,
    set EFER.LME with ``wrmsr``, enable paging, far-jump into 64-bit code;
  * cooperation through guest memory with atomic instructions: both CPUs
    take chunks of work from a shared counter with ``lock xadd``, add their
    partial sums with ``lock add``, print under a spinlock taken with
    ``xchg``, and report completion with ``lock inc``.

The work: the sum of i*i for i = 1..6400, in 64 chunks of 100.

Needs GNU binutils; the host here has 2 cores (KVM_CAP_NR_VCPUS = 2).
Run:  python examples/05_smp.py
"""

import threading
from pathlib import Path

import pykvm
from pykvm import x86

GUESTS = Path(__file__).resolve().parent / "guests"
CHUNKS, CHUNK = 64, 100
TRAMPOLINE = 0x8000      # SIPI vector 8 -> the AP starts at 0x0800:0000
STACKS = {0: 0x80000, 1: 0x70000}

MAIN = rf"""
.equ LAPIC, 0xfee00000
_start:                                 # the BSP starts here, already in long mode
    mov  rbx, LAPIC
    mov  dword ptr [rbx + 0xf0], 0x1ff  # enable the local APIC
    mov  dword ptr [rbx + 0x310], 1 << 24     # ICR high: destination APIC id 1
    mov  dword ptr [rbx + 0x300], 0x4500      # ICR low: INIT, assert
    mov  dword ptr [rbx + 0x310], 1 << 24
    mov  dword ptr [rbx + 0x300], 0x4600 | ({TRAMPOLINE} >> 12)   # STARTUP, vector 8
    jmp  cpu_main

ap_main:                                # the AP arrives here from the trampoline
    mov  ax, 0x10
    mov  ds, ax
    mov  es, ax
    mov  ss, ax
    mov  rsp, {STACKS[1]}
    mov  ax, 0x40                       # this CPU's TSS (x86.LongMode: 0x30 + 16 * cpu)
    ltr  ax

cpu_main:                               # both CPUs
    mov  rbx, LAPIC
    mov  r15d, [rbx + 0x20]             # local APIC id register: id in bits 31:24
    shr  r15d, 24
    call lock_print
    lea  rdi, [rip + s_online]
    call serial_puts
    call unlock_print

    xor  r14d, r14d                     # chunks this CPU did
next_chunk:
    mov  eax, 1
    lock xadd [rip + next], eax         # eax = old value: my chunk number
    cmp  eax, {CHUNKS}
    jae  finished
    imul ecx, eax, {CHUNK}              # numbers ecx+1 .. ecx+{CHUNK}
    mov  r8d, {CHUNK}
    xor  esi, esi                       # partial sum
1:  inc  ecx
    mov  eax, ecx
    imul rax, rax
    add  rsi, rax
    dec  r8d
    jnz  1b
    lock add [rip + total], rsi         # publish the partial sum
    inc  r14d
    jmp  next_chunk

finished:
    call lock_print
    lea  rdi, [rip + s_did]
    call serial_puts
    mov  rdi, r14
    call serial_dec
    lea  rdi, [rip + s_chunks]
    call serial_puts
    call unlock_print
    lock inc dword ptr [rip + done]
    test r15d, r15d
    jnz  park                           # the AP is finished
2:  pause                               # the BSP waits for both CPUs
    cmp  dword ptr [rip + done], 2
    jne  2b
    lea  rdi, [rip + s_total]
    call serial_puts
    mov  rdi, [rip + total]
    call serial_dec
    mov  edi, '\n'
    call serial_putc
    mov  rax, [rip + total]
    out  0xf4, eax                      # tell the host
park:
    cli
    hlt
    jmp  park

lock_print:                             # a spinlock around the shared UART, then "cpu N: "
    mov  eax, 1
    xchg eax, [rip + print_lock]        # xchg with memory is always atomic
    test eax, eax
    jz   1f
    pause
    jmp  lock_print
1:  lea  rdi, [rip + s_cpu]
    call serial_puts
    mov  edi, r15d
    call serial_dec
    mov  edi, ':'
    call serial_putc
    ret
unlock_print:
    mov  dword ptr [rip + print_lock], 0
    ret

.include "serial.s"
.balign 8
next:       .long 0
done:       .long 0
print_lock: .long 0
total:      .quad 0
s_cpu:      .asciz "cpu "
s_online:   .asciz " online in long mode\n"
s_did:      .asciz " took "
s_chunks:   .asciz " chunks\n"
s_total:    .asciz "sum of squares 1..{CHUNKS * CHUNK} = "
"""


def trampoline(lm: x86.LongMode, ap_main: int) -> str:
    """Real-mode code at 0x8000 that takes an AP to long mode (GDT/CR3 from the host's tables)."""
    return rf"""
.code16
    cli
    lgdt [gdtr]                         # DS = 0 after INIT: absolute address
    mov  eax, cr4
    or   eax, 1 << 5                    # CR4.PAE
    mov  cr4, eax
    mov  eax, {lm.cr3:#x}               # the page tables the BSP uses
    mov  cr3, eax
    mov  ecx, 0xc0000080                # EFER
    rdmsr
    or   eax, 1 << 8                    # EFER.LME
    wrmsr
    mov  eax, cr0
    or   eax, 0x80000001                # CR0.PG | CR0.PE: long mode is active now
    mov  cr0, eax
    .byte 0x66, 0xea                    # ljmp 0x08:ap_main (32-bit offset)
    .long {ap_main:#x}
    .word 0x08
.balign 8
gdtr:
    .word {lm.gdt.limit:#x}
    .long {lm.gdt_base:#x}
"""


def main() -> None:
    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        vm.create_irq_chip()                  # the LAPICs that carry INIT and SIPI
        vm.add_memory(0, 2 * x86.MiB)
        lm = x86.LongMode.build(x86.Arena(vm, 0x100000, 0x20000), cpus=2)
        prog = x86.assemble(MAIN, base=0x10000, include_dirs=[GUESTS])
        prog.load(vm)
        x86.assemble(trampoline(lm, prog["ap_main"]), base=TRAMPOLINE).load(vm)

        cpuid = kvm.supported_cpuid()
        bsp, ap = vm.create_vcpu(0), vm.create_vcpu(1)
        for vcpu in (bsp, ap):
            x86.setup_cpuid(kvm, vcpu, entries=cpuid)     # APIC id = vCPU id
        lm.load(bsp, entry=prog.entry, stack=STACKS[0])  # the AP is left in reset state

        bus = x86.Bus()
        loops = [x86.RunLoop(bsp, bus), x86.RunLoop(ap, bus)]
        uart = x86.Uart16550(on_output=lambda b: print(b.decode(), end="", flush=True))
        loops[0].add(uart)

        def finished(port: int, data: bytes) -> None:    # runs in the BSP's thread
            loops[0].stop(int.from_bytes(data, "little"))
            loops[1].stop()                              # kicks the parked AP out of KVM_RUN
        bus.on_out(0xF4, finished)

        stops = [None, None]

        def run(i: int) -> None:
            stops[i] = loops[i].run(timeout=60)

        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # The host reads the result straight out of guest memory, by symbol.
        total = int.from_bytes(vm.read(prog["total"], 8), "little")
        expected = sum(i * i for i in range(1, CHUNKS * CHUNK + 1))
        print(f"[host] both vCPUs stopped ({stops[0].reason}, {stops[1].reason}); total in guest "
              f"memory = {total}, {'equal to' if total == expected else 'DIFFERENT from'} Python's")


if __name__ == "__main__":
    main()
