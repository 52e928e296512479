"""03 — An MMIO device emulated in Python.

What it shows
  * memory-mapped I/O: guest physical addresses with no memory slot behind
    them exit to user space as ``MmioRead`` / ``MmioWrite``.  Here the page at
    0xd0000000 is mapped by the guest's page tables (the identity map covers
    the low 4 GiB) but has no RAM, so every load and store to it reaches
    Python;
  * ``loop.on_mmio(start, size, read=..., write=...)``: the run loop finds the
    device by address; a read handler returns the value the guest's load gets;
  * accesses of different widths (32- and 64-bit) and a register with a side
    effect on read.

The device, a tiny "calculator":

  offset  width  name     access
  0x00    32     ID       read: 0x564b5950 ("PYKV")
  0x04    32     VERSION  read: 1
  0x08    32     A        read/write: operand
  0x0c    32     B        read/write: operand
  0x10    32     CMD      write: 1 = A+B, 2 = A*B, 3 = gcd(A, B) -> RESULT
  0x18    64     RESULT   read
  0x20    32     TICKET   read: 1, 2, 3 ... (each read increments it)

Needs GNU binutils.   Run:  python examples/03_mmio_device.py
"""

import math
import struct
from pathlib import Path

import pykvm
from pykvm import x86

GUESTS = Path(__file__).resolve().parent / "guests"
DEV_BASE = 0xD000_0000

GUEST = r"""
.equ DEV, 0xd0000000
_start:
    mov  rbx, DEV                   # rbx -> the device (too big for a disp32)
    lea  rdi, [rip + s_id]
    call serial_puts
    mov  edi, [rbx + 0x00]          # ID: a 32-bit MMIO read
    call serial_hex
    lea  rdi, [rip + s_ver]
    call serial_puts
    mov  edi, [rbx + 0x04]
    call serial_dec
    mov  edi, '\n'
    call serial_putc

    # gcd(1071, 462)
    mov  dword ptr [rbx + 0x08], 1071
    mov  dword ptr [rbx + 0x0c], 462
    mov  dword ptr [rbx + 0x10], 3
    lea  rdi, [rip + s_gcd]
    call serial_puts
    mov  rdi, [rbx + 0x18]          # RESULT: a 64-bit MMIO read
    call serial_dec

    # 123456789 * 987654321 (needs all 64 bits of RESULT)
    mov  dword ptr [rbx + 0x08], 123456789
    mov  dword ptr [rbx + 0x0c], 987654321
    mov  dword ptr [rbx + 0x10], 2
    lea  rdi, [rip + s_mul]
    call serial_puts
    mov  rdi, [rbx + 0x18]
    call serial_dec

    # three reads of TICKET
    lea  rdi, [rip + s_ticket]
    call serial_puts
    mov  ecx, 3
1:  mov  edi, ' '
    call serial_putc
    mov  edi, [rbx + 0x20]
    call serial_dec
    loop 1b
    mov  edi, '\n'
    call serial_putc
    hlt

.include "serial.s"
s_id:     .asciz "guest: device id "
s_ver:    .asciz ", version "
s_gcd:    .asciz "guest: gcd(1071, 462) = "
s_mul:    .asciz "\nguest: 123456789 * 987654321 = "
s_ticket: .asciz "\nguest: tickets"
"""


class Calculator:
    """The device model: registers in a dict, behaviour in ``read``/``write``."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.a = self.b = self.result = 0
        self.ticket = 0
        self.accesses = 0

    def attach(self, loop: x86.RunLoop) -> None:
        loop.on_mmio(self.base, 0x1000, read=self.read, write=self.write)

    def read(self, addr: int, length: int) -> int:
        self.accesses += 1
        off = addr - self.base
        if off == 0x00:
            return struct.unpack("<I", b"PYKV")[0]
        if off == 0x04:
            return 1
        if off == 0x08:
            return self.a
        if off == 0x0C:
            return self.b
        if off == 0x18:
            return self.result
        if off == 0x20:
            self.ticket += 1           # a read with a side effect
            return self.ticket
        return 0

    def write(self, addr: int, data: bytes) -> None:
        self.accesses += 1
        off = addr - self.base
        value = int.from_bytes(data, "little")
        if off == 0x08:
            self.a = value
        elif off == 0x0C:
            self.b = value
        elif off == 0x10:
            ops = {1: lambda a, b: a + b, 2: lambda a, b: a * b, 3: math.gcd}
            self.result = ops.get(value, lambda a, b: 0)(self.a, self.b) & (2**64 - 1)


def main() -> None:
    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(0, 2 * x86.MiB)          # RAM; 0xd0000000 stays without memory
        prog = x86.assemble(GUEST, base=0x10000, include_dirs=[GUESTS])
        prog.load(vm)
        vcpu = vm.create_vcpu()
        x86.setup_cpuid(kvm, vcpu)
        x86.setup_long_mode(vcpu, x86.Arena(vm, 0x1000, 0xF000), entry=prog.entry, stack=0x80000)

        loop = x86.RunLoop(vcpu)
        loop.add(x86.Uart16550(on_output=lambda b: print(b.decode(), end="", flush=True)))
        dev = loop.add(Calculator(DEV_BASE))
        loop.run(timeout=60)          # a watchdog, never reached normally
        print(f"[host] the device served {dev.accesses} MMIO accesses")


if __name__ == "__main__":
    main()
