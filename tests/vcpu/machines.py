"""Guest set-ups for the vCPU-fd tests, on top of ``tests/guests.py``.

* :func:`real_mode_handlers`: real mode with interrupt handlers in the IVT; the
  handler of vector *v* does ``out 0x11, v`` and ``iret``, so an exception,
  NMI or interrupt the guest takes shows up as ``IoOut(port=0x11, data=bytes([v]))``.
* :func:`long_mode_apic`: 64-bit CPL0 guest whose page tables also map the
  LAPIC page at 0xfee00000 (needs the in-kernel irqchip, created first).
* :func:`user_mode`: 64-bit guest at CPL3 (IOPL 3, so ``out`` works), with an
  optional IDT whose handlers also run at CPL3 and ``out 0x11, vector``.

Why CPL3: on this host (PVM) CPL0 code goes through KVM's instruction
emulator, which cannot run SSE/AVX stores or ``xgetbv``; CPL3 code runs
natively.  Guest code is hand-assembled (GNU ``as``, Intel syntax) with each
instruction beside its bytes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

import pykvm

from ..guests import CODE, PD, PDPT, PML4, long_mode, real_mode

HANDLER_PORT = 0x11          # handlers report their vector here
HANDLERS = 0x2000            # real mode: handler of vector v at HANDLERS + 16*v
APIC_BASE = 0xFEE00000
APIC_PD = 0x4000             # long_mode_apic: page directory for 3..4 GiB
GDT, IDT, USER_HANDLERS = 0x500, 0x4000, 0x9000


def host_is_pvm() -> bool:
    """True on a host whose KVM vendor module is ``kvm_pvm`` (see /work/shared/HOST.md)."""
    return os.path.isdir("/sys/module/kvm_pvm")


def cpu_vendor(kvm: pykvm.Kvm) -> str:
    """``"AMD"`` or ``"Intel"`` (or the raw vendor string), from CPUID leaf 0."""
    leaf0 = next(e for e in kvm.supported_cpuid() if e.function == 0)
    vendor = struct.pack("<III", leaf0.ebx, leaf0.edx, leaf0.ecx).decode("ascii", "replace")
    return {"AuthenticAMD": "AMD", "HygonGenuine": "AMD", "GenuineIntel": "Intel"}.get(vendor, vendor)


def _rm_handler(vector: int) -> bytes:
    return bytes([
        0x50,                    # push ax
        0xB0, vector,            # mov al, vector
        0xE6, HANDLER_PORT,      # out 0x11, al
        0x58,                    # pop ax
        0xCF,                    # iret
    ])


def real_mode_handlers(vm: pykvm.Vm, code: bytes, vectors: Iterable[int] = (), **regs: int) -> pykvm.Vcpu:
    """:func:`tests.guests.real_mode` plus IVT handlers for *vectors* (stack at 0:0xfffe)."""
    vcpu = real_mode(vm, code, **regs)
    for v in vectors:
        addr = HANDLERS + 16 * v
        vm.write(addr, _rm_handler(v))
        vm.write(4 * v, struct.pack("<HH", addr, 0))
    r = vcpu.get_regs()
    r.rsp = 0xFFFE
    vcpu.set_regs(r)
    return vcpu


def long_mode_apic(vm: pykvm.Vm, code: bytes) -> pykvm.Vcpu:
    """:func:`tests.guests.long_mode` with a 2 MiB page mapping the LAPIC at 0xfee00000."""
    vcpu = long_mode(vm, code)
    vm.write(PDPT + 3 * 8, struct.pack("<Q", APIC_PD | 3))                 # 3..4 GiB
    vm.write(APIC_PD + (APIC_BASE >> 21 & 511) * 8, struct.pack("<Q", APIC_BASE | 0x83))
    return vcpu


def user_mode(vm: pykvm.Vm, code: bytes, *, cpuid=None, idt: bool = False,
              cr4: int = 0) -> pykvm.Vcpu:
    """A vCPU at CPL3 in 64-bit mode: 2 MiB of user pages at 0, *code* at CODE,
    stack below 0x8000, RFLAGS.IOPL = 3.  CR4 has PAE, OSFXSR, OSXMMEXCPT plus *cr4*.

    With *idt*, vectors 0-31 go to CPL3 handlers doing ``out 0x11, vector``
    then spinning (an interrupt gate to a DPL3 code segment needs no TSS).
    """
    mem = vm.add_memory(0, 0x200000)
    mem.write(PML4, struct.pack("<Q", PDPT | 7))
    mem.write(PDPT, struct.pack("<Q", PD | 7))
    mem.write(PD, struct.pack("<Q", 0x0 | 0x87))          # 2 MiB page: P, RW, US, PS
    mem.write(CODE, code)
    vcpu = vm.create_vcpu()
    if cpuid is not None:
        vcpu.set_cpuid2(cpuid)
    s = vcpu.get_sregs()
    s.cr3, s.cr4, s.cr0, s.efer = PML4, 0x20 | 0x600 | cr4, 0x80000013, 0x500  # PG|ET|MP|PE, LME|LMA
    for seg, sel, typ in (("cs", 0x1B, 11), ("ds", 0x23, 3), ("es", 0x23, 3), ("fs", 0x23, 3),
                          ("gs", 0x23, 3), ("ss", 0x23, 3)):
        sg = getattr(s, seg)
        sg.base, sg.limit, sg.selector, sg.type = 0, 0xFFFFFFFF, sel, typ
        sg.present, sg.dpl, sg.s, sg.g = 1, 3, 1, 1
        sg.l, sg.db = (1, 0) if seg == "cs" else (0, 1)
    if idt:
        # null, 2 unused, 64-bit code DPL3 (0x1b), data DPL3 (0x23)
        mem.write(GDT, struct.pack("<5Q", 0, 0, 0, 0x00AFFA000000FFFF, 0x00CFF2000000FFFF))
        for v in range(32):
            h = USER_HANDLERS + 16 * v
            mem.write(h, bytes([0xB8, v, 0, 0, 0,           # mov eax, v
                                0xE7, HANDLER_PORT,          # out 0x11, eax
                                0xEB, 0xFE]))                # jmp $
            # 64-bit interrupt gate, DPL3, selector 0x1b
            mem.write(IDT + 16 * v, struct.pack("<HHBBHII", h & 0xFFFF, 0x1B, 0, 0xEE, h >> 16, 0, 0))
        s.gdt.base, s.gdt.limit = GDT, 5 * 8 - 1
        s.idt.base, s.idt.limit = IDT, 32 * 16 - 1
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip, r.rsp, r.rflags = CODE, 0x8000, 0x3002
    vcpu.set_regs(r)
    return vcpu


def run_until(vcpu: pykvm.Vcpu, watchdog, n: int = 16, seconds: float = 5.0):
    """Run up to *n* times, collecting exits until one is not an ``IoOut``/``Debug``."""
    out = []
    with watchdog(vcpu, seconds):
        for _ in range(n):
            e = vcpu.run()
            out.append(e)
            if not isinstance(e, (pykvm.IoOut, pykvm.Debug)):
                break
    return out


def outs(exits, port: int):
    """The data of the ``IoOut`` exits on *port*, as ints (little endian)."""
    return [int.from_bytes(e.data, "little") for e in exits
            if isinstance(e, pykvm.IoOut) and e.port == port]
