"""04 — Interrupts: an in-kernel LAPIC timer, and an irqfd fired from a Python thread.

What it shows
  * ``vm.create_irq_chip()``: KVM emulates the interrupt controllers (PIC,
    IOAPIC, one local APIC per vCPU) in the kernel.  The guest programs them
    through their usual MMIO/port registers without exiting to Python, and
    ``hlt`` waits inside the kernel until an interrupt arrives;
  * an IDT built on the host (``x86.Idt``) whose gates point at labels of
    the assembled guest (``prog["on_timer"]``);
  * the LAPIC timer in periodic mode delivering vector 0x20 to the guest;
  * an *irqfd*: an eventfd bound to interrupt line (GSI) 5.  Writing to it
    from any host thread raises the line; the IOAPIC turns it into vector
    0x31 as the guest programmed it.  No vCPU exit, no ioctl per interrupt.

Guest steps: mask the legacy 8259 PIC (so line 5 reaches only the IOAPIC),
enable the LAPIC, start its timer, wait for 10 ticks; stop the timer, program
IOAPIC pin 5, then 3 times: ask the host for an interrupt (port 0xf0), wait
until a host thread has sent it through the irqfd; then report and leave
(port 0xf4).  Waiting is ``cli; check; sti; hlt``: ``sti`` holds interrupts
off for one more instruction, so an interrupt that arrives after the check
wakes the ``hlt`` instead of being missed -- the run does not depend on how
fast the host or the guest is.

Needs GNU binutils.   Run:  python examples/04_interrupts.py
"""

import os
import threading
import time
from pathlib import Path

import pykvm
from pykvm import x86

GUESTS = Path(__file__).resolve().parent / "guests"
IRQ_LINE = 5             # GSI 5: IOAPIC pin 5 (and PIC IRQ 5, masked by the guest)
TIMER_VECTOR = 0x20
DEVICE_VECTOR = 0x31
TICKS = 10
DEVICE_IRQS = 3

GUEST = rf"""
.equ LAPIC,  0xfee00000
.equ IOAPIC, 0xfec00000
_start:
    mov  al, 0xff                       # mask every line of both 8259 PICs
    out  0x21, al
    out  0xa1, al

    mov  rbx, LAPIC
    mov  dword ptr [rbx + 0xf0], 0x1ff  # SVR: APIC software-enable, spurious vector 0xff
    mov  dword ptr [rbx + 0x3e0], 0xb   # timer divide configuration: divide by 1
    mov  dword ptr [rbx + 0x320], {TIMER_VECTOR} | (1 << 17)   # LVT timer: periodic
    mov  dword ptr [rbx + 0x380], 1000000                      # initial count: 1 ms here
    sti
1:  hlt                                 # sleep until an interrupt
    cmp  dword ptr [rip + ticks], {TICKS}
    jb   1b
    mov  dword ptr [rbx + 0x320], 1 << 16     # mask the timer
    lea  rdi, [rip + s_ticks]
    call serial_puts

    mov  rcx, IOAPIC                    # redirection entry of pin 5: two 32-bit halves
    mov  dword ptr [rcx], 0x10 + 2 * {IRQ_LINE}          # IOREGSEL: low half
    mov  dword ptr [rcx + 0x10], {DEVICE_VECTOR}         # IOWIN: vector, fixed, edge, unmasked
    mov  dword ptr [rcx], 0x10 + 2 * {IRQ_LINE} + 1      # high half
    mov  dword ptr [rcx + 0x10], 0                       # destination: APIC id 0
    xor  r12d, r12d                     # interrupts reported so far
2:  out  0xf0, al                       # ask the host for one device interrupt
3:  cli
    mov  eax, [rip + irqs]
    cmp  eax, r12d
    jne  4f
    sti                                 # interrupts on after the next instruction ...
    hlt                                 # ... so none slips in between
    jmp  3b
4:  sti
    inc  r12d
    lea  rdi, [rip + s_irq]
    call serial_puts
    mov  edi, r12d
    call serial_dec
    mov  edi, '\n'
    call serial_putc
    cmp  r12d, {DEVICE_IRQS}
    jb   2b
    mov  eax, [rip + ticks]
    out  0xf4, eax                      # done: report the tick count

on_timer:                               # vector 0x20
    inc  dword ptr [rip + ticks]
    jmp  eoi
on_device:                              # vector 0x31
    inc  dword ptr [rip + irqs]
eoi:
    push rax
    mov  rax, LAPIC
    mov  dword ptr [rax + 0xb0], 0      # end of interrupt
    pop  rax
    iretq

.include "serial.s"
ticks:   .long 0
irqs:    .long 0
s_ticks: .asciz "guest: {TICKS} LAPIC timer ticks received\n"
s_irq:   .asciz "guest: irqfd interrupt "
"""


def main() -> None:
    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        vm.create_irq_chip()                  # before any vCPU
        vm.add_memory(0, 2 * x86.MiB)
        prog = x86.assemble(GUEST, base=0x10000, include_dirs=[GUESTS])
        prog.load(vm)

        idt = x86.Idt()
        idt[TIMER_VECTOR] = prog["on_timer"]
        idt[DEVICE_VECTOR] = prog["on_device"]

        vcpu = vm.create_vcpu()
        x86.setup_cpuid(kvm, vcpu)
        x86.setup_long_mode(vcpu, x86.Arena(vm, 0x1000, 0xF000), entry=prog.entry,
                            stack=0x80000, idt=idt)

        efd = os.eventfd(0, os.EFD_CLOEXEC)
        vm.register_irqfd(efd, IRQ_LINE)      # KVM_IRQFD: writing efd raises GSI 5

        def device_thread() -> None:          # an "interrupting device" on the host side
            time.sleep(0.01)                  # some device latency
            os.eventfd_write(efd, 1)          # -> interrupt, without touching the vCPU

        loop = x86.RunLoop(vcpu)
        loop.add(x86.Uart16550(on_output=lambda b: print(b.decode(), end="", flush=True)))
        loop.on_out(0xF0, lambda port, data: threading.Thread(target=device_thread, daemon=True).start())
        loop.on_out(0xF4, lambda port, data: loop.stop(int.from_bytes(data, "little")))
        t0 = time.perf_counter()
        stop = loop.run(timeout=120)          # a watchdog only: the guest ends by itself
        print(f"[host] guest done after {time.perf_counter() - t0:.3f} s: {stop.value} ticks, "
              f"{DEVICE_IRQS} irqfd interrupts, {stop.exits} exits to Python")
        os.close(efd)


if __name__ == "__main__":
    main()
