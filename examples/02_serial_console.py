"""02 — A 64-bit guest with a serial console (16550 UART on COM1).

What it shows
  * building guest code from assembly at run time (``x86.assemble``, GNU as,
    cached by hash) with a shared driver (``guests/serial.s``);
  * putting a vCPU straight into 64-bit long mode: ``x86.setup_long_mode``
    builds a GDT, a TSS and identity-mapped page tables in guest memory and
    loads CR0/CR3/CR4/EFER and the segments;
  * giving the vCPU a CPUID table (``x86.setup_cpuid``) — the guest reads it;
  * ``x86.RunLoop`` dispatching port I/O to a device object, here
    ``x86.Uart16550``: the guest polls the line status register (LSR) before
    each byte it sends (``putc``) and to see whether a byte arrived (``getc``).

The guest asks for a name, reads a line from the UART (we type it for it with
``uart.feed``), and answers with a greeting, the length of the name and the
CPU vendor string it got from ``cpuid``.

Needs GNU binutils (``as``, ``ld``).   Run:  python examples/02_serial_console.py [name]
"""

import sys
from pathlib import Path

import pykvm
from pykvm import x86

GUESTS = Path(__file__).resolve().parent / "guests"

GUEST = r"""
_start:
    lea  rdi, [rip + prompt]
    call serial_puts
    lea  rdi, [rip + name]           # read a line into name[]
    mov  rsi, 63
    call serial_gets
    mov  rbx, rax                    # rbx = length of the name
    mov  byte ptr [rdi + rax], 0

    lea  rdi, [rip + hello]
    call serial_puts
    lea  rdi, [rip + name]
    call serial_puts
    lea  rdi, [rip + letters]
    call serial_puts
    mov  rdi, rbx
    call serial_dec                  # the length, in decimal
    lea  rdi, [rip + letters2]
    call serial_puts

    xor  eax, eax                    # CPUID leaf 0: vendor in ebx, edx, ecx
    cpuid
    mov  [rip + vendor], ebx
    mov  [rip + vendor + 4], edx
    mov  [rip + vendor + 8], ecx
    lea  rdi, [rip + cpu]
    call serial_puts
    lea  rdi, [rip + vendor]
    call serial_puts
    mov  edi, '\n'
    call serial_putc
    hlt                              # -> the run loop returns Stop("hlt")

.include "serial.s"

prompt:   .asciz "What is your name? "
hello:    .asciz "\nHello, "
letters:  .asciz "! Your name has "
letters2: .asciz " letters.\n"
cpu:      .asciz "My CPU vendor (cpuid leaf 0) is "
vendor:   .space 13
name:     .space 64
"""


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "pykvm"

    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        # Guest physical memory: 2 MiB of RAM at 0.
        #   0x1000..0x10000   tables (GDT, TSS, page tables) from an Arena
        #   0x10000..         the program;  stack grows down from 0x80000
        vm.add_memory(0, 2 * x86.MiB)
        prog = x86.assemble(GUEST, base=0x10000, include_dirs=[GUESTS])
        prog.load(vm)

        vcpu = vm.create_vcpu()
        x86.setup_cpuid(kvm, vcpu)
        x86.setup_long_mode(vcpu, x86.Arena(vm, 0x1000, 0xF000),
                            entry=prog.entry, stack=0x80000)

        # The run loop: the UART takes ports 0x3f8..0x3ff; anything else stops the
        # loop with a report (strict mode), HLT ends it normally.
        loop = x86.RunLoop(vcpu)
        uart = loop.add(x86.Uart16550(on_output=lambda b: print(b.decode(), end="", flush=True)))
        uart.feed(name.encode() + b"\n")      # what the guest's getc will read
        stop = loop.run(timeout=60)          # a watchdog, never reached normally
        print(f"[host] guest stopped: {stop.reason} after {stop.exits} exits")


if __name__ == "__main__":
    main()
