"""Tiny guest set-ups shared by the tests (real mode and 64-bit long mode).

Kept independent of ``pykvm.x86`` on purpose: the core tests check the
binding with the fewest moving parts.  Guest code is hand-assembled machine
code with the assembly beside each byte group.
"""

from __future__ import annotations

import struct

import pykvm

# Guest physical layout for long mode: page tables at 0x1000-0x3fff,
# code at CODE, 2 MiB of RAM at 0; PD maps 0..4 MiB with 2 MiB pages, so
# 0x200000..0x3fffff is mapped by the page tables but has no memory (MMIO).
PML4, PDPT, PD = 0x1000, 0x2000, 0x3000
CODE = 0x10000
RAM = 0x200000


def real_mode(vm: pykvm.Vm, code: bytes, *, addr: int = 0x1000, **regs: int) -> pykvm.Vcpu:
    """A vCPU in real mode with *code* at *addr* (memory 0..64 KiB)."""
    mem = vm.add_memory(0, 0x10000)
    mem.write(addr, code)
    vcpu = vm.create_vcpu()
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    vcpu.set_sregs(sregs)
    r = vcpu.get_regs()
    r.rip, r.rflags = addr, 2
    for k, v in regs.items():
        setattr(r, k, v)
    vcpu.set_regs(r)
    return vcpu


def long_mode(vm: pykvm.Vm, code: bytes, *, vcpu_id: int = 0, ram: int = RAM,
              mem=None) -> pykvm.Vcpu:
    """A vCPU in 64-bit mode, CPL0, identity paging of 0..4 MiB, *code* at CODE."""
    if mem is None:
        mem = vm.add_memory(0, ram)
        mem.write(PML4, struct.pack("<Q", PDPT | 3))
        mem.write(PDPT, struct.pack("<Q", PD | 3))
        mem.write(PD, struct.pack("<QQ", 0x0 | 0x83, 0x200000 | 0x83))  # 2 MiB pages, RW, P
        mem.write(CODE, code)
    vcpu = vm.create_vcpu(vcpu_id)
    s = vcpu.get_sregs()
    s.cr3 = PML4
    s.cr4 = 0x20                      # PAE
    s.cr0 = 0x80000011                # PG | ET | PE
    s.efer = 0x500                    # LME | LMA
    for seg, sel, typ in (("cs", 8, 11), ("ds", 16, 3), ("es", 16, 3), ("fs", 16, 3),
                          ("gs", 16, 3), ("ss", 16, 3)):
        sg = getattr(s, seg)
        sg.base, sg.limit, sg.selector, sg.type = 0, 0xFFFFFFFF, sel, typ
        sg.present, sg.dpl, sg.s, sg.g = 1, 0, 1, 1
        sg.l, sg.db = (1, 0) if seg == "cs" else (0, 1)
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip, r.rsp, r.rflags = CODE, 0x8000, 2
    vcpu.set_regs(r)
    return vcpu


# mov dx,0x3f8 / add al,bl / add al,'0' / out dx,al / mov al,'\n' / out dx,al / hlt
REAL_MODE_HELLO = bytes([
    0xBA, 0xF8, 0x03,  # mov dx, 0x3f8
    0x00, 0xD8,        # add al, bl
    0x04, ord("0"),    # add al, '0'
    0xEE,              # out dx, al
    0xB0, 0x0A,        # mov al, '\n'
    0xEE,              # out dx, al
    0xF4,              # hlt
])

SPIN = bytes([0xEB, 0xFE])  # jmp $
