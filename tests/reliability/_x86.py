"""Guest set-ups for the reliability tests: real mode, long mode at CPL0 and CPL3.

Independent of ``pykvm.x86`` on purpose (the fuzzer must not depend on the
code it helps to test).  Layout of the long-mode guests (guest physical):

    0x1000 PML4, 0x2000 PDPT, 0x3000 PD (2 MiB pages: 0..4 MiB, user-accessible)
    0x4000 GDT   0x5000 TSS
    CODE = 0x10000      DATA = 0x8000 (the guests' scratch / counters)
    RAM = 0..2 MiB; 2..4 MiB is paged but has no memory (MMIO)
"""

from __future__ import annotations

import struct

import pykvm

PML4, PDPT, PD, GDT, TSS = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
CODE, DATA, STACK = 0x10000, 0x8000, 0xF000
RAM = 0x200000

# GDT: 0 null, 0x08 kernel code64, 0x10 kernel data, 0x18 user data, 0x20 user code64, 0x28 TSS
_GDT = struct.pack(
    "<QQQQQ",
    0,
    0x00AF9A000000FFFF,   # 0x08: code, DPL0, L
    0x00CF92000000FFFF,   # 0x10: data, DPL0
    0x00CFF2000000FFFF,   # 0x18: data, DPL3
    0x00AFFA000000FFFF,   # 0x20: code, DPL3, L
)

RFLAGS_IOPL3 = 0x3000


def build_long_mode_memory(mem: pykvm.GuestMemory) -> None:
    """Page tables (identity, 2 MiB pages, user bit set) and a GDT into *mem* (at gpa 0)."""
    mem.write(PML4, struct.pack("<Q", PDPT | 7))
    mem.write(PDPT, struct.pack("<Q", PD | 7))
    mem.write(PD, struct.pack("<QQ", 0x0 | 0x87, 0x200000 | 0x87))
    mem.write(GDT, _GDT)


def set_long_mode(vcpu: pykvm.Vcpu, *, cpl: int = 0, rip: int = CODE, rsp: int = STACK,
                  rflags: int = 2) -> None:
    """Put *vcpu* into 64-bit mode at *cpl* (0 or 3) using the tables of build_long_mode_memory."""
    s = vcpu.get_sregs()
    s.cr3, s.cr4, s.cr0, s.efer = PML4, 0x20, 0x80000011, 0x500
    s.gdt.base, s.gdt.limit = GDT, len(_GDT) - 1
    if cpl == 0:
        code_sel, data_sel = 0x08, 0x10
    else:
        code_sel, data_sel = 0x20 | 3, 0x18 | 3
    for seg in ("cs", "ds", "es", "fs", "gs", "ss"):
        sg = getattr(s, seg)
        sg.base, sg.limit, sg.present, sg.s, sg.g, sg.dpl = 0, 0xFFFFFFFF, 1, 1, 1, cpl
        if seg == "cs":
            sg.selector, sg.type, sg.l, sg.db = code_sel, 11, 1, 0
        else:
            sg.selector, sg.type, sg.l, sg.db = data_sel, 3, 0, 1
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip, r.rsp, r.rflags = rip, rsp, rflags
    vcpu.set_regs(r)


def long_mode_vm(vm: pykvm.Vm, code: bytes, *, cpl: int = 0, vcpus: int = 1,
                 rflags: int = 2, mem: pykvm.GuestMemory | None = None):
    """Memory + *vcpus* vCPUs in long mode at *cpl*, all starting at CODE; returns the list."""
    if mem is None:
        mem = vm.add_memory(0, RAM)
    build_long_mode_memory(mem)
    mem.write(CODE, code)
    out = []
    for i in range(vcpus):
        v = vm.create_vcpu(i)
        set_long_mode(v, cpl=cpl, rflags=rflags, rsp=STACK - 0x800 * i)
        out.append(v)
    return out


def set_real_mode(vcpu: pykvm.Vcpu, rip: int = 0x1000) -> None:
    s = vcpu.get_sregs()
    s.cs.base, s.cs.selector = 0, 0
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip, r.rflags = rip, 2
    vcpu.set_regs(r)


# --- a few hand-assembled guests ------------------------------------------------------
SPIN = bytes.fromhex("ebfe")                                   # jmp $
# counter loop: inc qword [rbx]; jmp back  (rbx = address of the counter)
COUNT_LOOP = bytes.fromhex("48ff03" "ebfb")                    # inc qword [rbx]; jmp -5
HELLO_OUT = bytes.fromhex("66ba1000" "b041" "ee" "f4")         # mov dx,0x10; mov al,'A'; out dx,al; hlt
