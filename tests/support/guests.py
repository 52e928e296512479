"""The one guest set-up of the core tests: real mode and 64-bit long mode (CPL 0 or 3).

Written without :mod:`pykvm.x86` on purpose, and the only second
implementation of a guest set-up allowed in this repository: the core tests
check the binding (``Kvm``, ``Vm``, ``Vcpu``, exits, memory, the reliability
fuzzer) and must not depend on the x86 toolkit that they would otherwise also
be testing -- a bug there must not hide, or fake, a bug in the binding.  Tests
of the toolkit itself (``tests/x86``) and the applications use
``pykvm.x86.setup_long_mode`` / ``setup_real_mode``.

Guest physical layout of the long-mode guests::

    0x1000 PML4   0x2000 PDPT   0x3000 PD (2 MiB pages: 0..4 MiB, user-accessible)
    0x4000 GDT    0x8000 DATA (the guests' scratch / counters)
    0x9000 CPL3 exception handlers   0xA000 IDT   0xB000 PD of the LAPIC mapping
    0xF000 STACK (top; vCPU i of long_mode_vm starts 0x800 * i lower)
    CODE = 0x10000;  RAM = 0..2 MiB; 2..4 MiB is paged but has no memory (MMIO)

Control registers are what a 64-bit OS runs with: CR0 = PG|NE|ET|MP|PE,
CR4 = PAE|OSFXSR|OSXMMEXCPT (SSE usable), EFER = LME|LMA.

Guest code is hand-assembled; each byte group carries its assembly.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import TypeAlias

import pykvm
from pykvm.uapi.structs import kvm_cpuid2, kvm_cpuid_entry2

#: what Vcpu.set_cpuid2 takes
CpuidArg: TypeAlias = "Iterable[kvm_cpuid_entry2] | kvm_cpuid2"

PML4, PDPT, PD, GDT = 0x1000, 0x2000, 0x3000, 0x4000
DATA, USER_HANDLERS, IDT, APIC_PD = 0x8000, 0x9000, 0xA000, 0xB000
STACK, CODE = 0xF000, 0x10000
RAM = 0x200000
REAL_MODE_CODE = 0x1000        # real_mode(): default entry point (memory 0..64 KiB)
REAL_MODE_HANDLERS = 0x2000    # real_mode_handlers(): handler of vector v at +16*v
HANDLER_PORT = 0x11            # handlers report their vector here (out 0x11)
APIC_BASE = 0xFEE00000

CR0 = 0x80000033               # PG | NE | ET | MP | PE
CR4 = 0x620                    # PAE | OSFXSR | OSXMMEXCPT
EFER = 0x500                   # LME | LMA
RFLAGS_IOPL3 = 0x3000

# GDT: 0 null, 0x08 kernel code64, 0x10 kernel data, 0x18 user data, 0x20 user code64
KERNEL_CS, KERNEL_DS, USER_DS, USER_CS = 0x08, 0x10, 0x18 | 3, 0x20 | 3
_GDT = struct.pack(
    "<QQQQQ",
    0,
    0x00AF9A000000FFFF,   # 0x08: code, DPL0, L
    0x00CF92000000FFFF,   # 0x10: data, DPL0
    0x00CFF2000000FFFF,   # 0x18: data, DPL3
    0x00AFFA000000FFFF,   # 0x20: code, DPL3, L
)


# --- real mode ----------------------------------------------------------------------------
def set_real_mode(vcpu: pykvm.Vcpu, rip: int = REAL_MODE_CODE, **regs: int) -> None:
    """Point *vcpu* (fresh: real mode at reset) at ``0:rip`` with RFLAGS = 2 and *regs*."""
    s = vcpu.get_sregs()
    s.cs.base, s.cs.selector = 0, 0
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip, r.rflags = rip, 2
    for name, value in regs.items():
        setattr(r, name, value)
    vcpu.set_regs(r)


def real_mode(vm: pykvm.Vm, code: bytes, *, addr: int = REAL_MODE_CODE, **regs: int) -> pykvm.Vcpu:
    """A vCPU in real mode with *code* at *addr* (memory 0..64 KiB) and registers *regs*."""
    mem = vm.add_memory(0, 0x10000)
    mem.write(addr, code)
    vcpu = vm.create_vcpu()
    set_real_mode(vcpu, addr, **regs)
    return vcpu


def _rm_handler(vector: int) -> bytes:
    return bytes([
        0x50,                    # push ax
        0xB0, vector,            # mov al, vector
        0xE6, HANDLER_PORT,      # out 0x11, al
        0x58,                    # pop ax
        0xCF,                    # iret
    ])


def real_mode_handlers(vm: pykvm.Vm, code: bytes, vectors: Iterable[int] = (), **regs: int) -> pykvm.Vcpu:
    """:func:`real_mode` plus IVT handlers for *vectors* (stack at 0:0xfffe).

    The handler of vector *v* does ``out 0x11, v`` and ``iret``, so an
    exception, NMI or interrupt the guest takes shows up as
    ``IoOut(port=0x11, data=bytes([v]))``.
    """
    vcpu = real_mode(vm, code, **regs)
    for v in vectors:
        addr = REAL_MODE_HANDLERS + 16 * v
        vm.write(addr, _rm_handler(v))
        vm.write(4 * v, struct.pack("<HH", addr, 0))
    r = vcpu.get_regs()
    r.rsp = 0xFFFE
    vcpu.set_regs(r)
    return vcpu


# --- long mode ----------------------------------------------------------------------------
def build_long_mode_memory(mem: pykvm.GuestMemory, *, idt: bool = False) -> None:
    """Page tables (identity, 2 MiB pages, user bit set) and the GDT into *mem* (at gpa 0).

    With *idt*, also an IDT whose vectors 0-31 go to CPL3 handlers doing
    ``out 0x11, vector`` then spinning (an interrupt gate to a DPL3 code
    segment needs no TSS).
    """
    mem.write(PML4, struct.pack("<Q", PDPT | 7))
    mem.write(PDPT, struct.pack("<Q", PD | 7))
    mem.write(PD, struct.pack("<QQ", 0x0 | 0x87, 0x200000 | 0x87))   # P, RW, US, PS
    mem.write(GDT, _GDT)
    if idt:
        for v in range(32):
            h = USER_HANDLERS + 16 * v
            mem.write(h, bytes([0xB8, v, 0, 0, 0,           # mov eax, v
                                0xE7, HANDLER_PORT,          # out 0x11, eax
                                0xEB, 0xFE]))                # jmp $
            # 64-bit interrupt gate, DPL3, to the user code segment
            mem.write(IDT + 16 * v, struct.pack("<HHBBHII", h & 0xFFFF, USER_CS, 0, 0xEE, h >> 16, 0, 0))


def set_long_mode(vcpu: pykvm.Vcpu, *, cpl: int = 0, rip: int = CODE, rsp: int = STACK,
                  rflags: int = 2, idt: bool = False, cr4: int = 0) -> None:
    """Put *vcpu* into 64-bit mode at *cpl* (0 or 3) using the tables of :func:`build_long_mode_memory`.

    *cr4* bits are added to :data:`CR4`; *idt* loads the IDT built there.
    """
    if cpl not in (0, 3):
        raise ValueError(f"cpl must be 0 or 3, not {cpl!r}")
    s = vcpu.get_sregs()
    s.cr3, s.cr4, s.cr0, s.efer = PML4, CR4 | cr4, CR0, EFER
    s.gdt.base, s.gdt.limit = GDT, len(_GDT) - 1
    if idt:
        s.idt.base, s.idt.limit = IDT, 32 * 16 - 1
    code_sel, data_sel = (KERNEL_CS, KERNEL_DS) if cpl == 0 else (USER_CS, USER_DS)
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


def long_mode(vm: pykvm.Vm, code: bytes, *, vcpu_id: int = 0, ram: int = RAM,
              mem: pykvm.GuestMemory | None = None, cpl: int = 0, rflags: int = 2,
              cpuid: CpuidArg | None = None, idt: bool = False, cr4: int = 0) -> pykvm.Vcpu:
    """A vCPU in 64-bit mode at *cpl*, identity paging of 0..4 MiB, *code* at CODE.

    Without *mem*, adds *ram* bytes of memory at 0 and builds the tables and
    code there; with *mem*, the memory is taken as already built.  *cpuid*
    (a ``kvm_cpuid2``) is set before the registers.
    """
    if mem is None:
        mem = vm.add_memory(0, ram)
        build_long_mode_memory(mem, idt=idt)
        mem.write(CODE, code)
    vcpu = vm.create_vcpu(vcpu_id)
    if cpuid is not None:
        vcpu.set_cpuid2(cpuid)
    set_long_mode(vcpu, cpl=cpl, rflags=rflags, idt=idt, cr4=cr4)
    return vcpu


def user_mode(vm: pykvm.Vm, code: bytes, *, mem: pykvm.GuestMemory | None = None,
              cpuid: CpuidArg | None = None, idt: bool = False, cr4: int = 0) -> pykvm.Vcpu:
    """:func:`long_mode` at CPL3 with RFLAGS.IOPL = 3 (so ``out`` works where KVM honours IOPL).

    Why CPL3: on a PVM host CPL0 code goes through KVM's instruction
    emulator, which cannot run SSE/AVX stores or ``xgetbv``; CPL3 code runs natively.
    """
    return long_mode(vm, code, mem=mem, cpl=3, rflags=RFLAGS_IOPL3 | 2, cpuid=cpuid, idt=idt, cr4=cr4)


def long_mode_vm(vm: pykvm.Vm, code: bytes, *, cpl: int = 0, vcpus: int = 1, rflags: int = 2,
                 mem: pykvm.GuestMemory | None = None) -> list[pykvm.Vcpu]:
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


def long_mode_apic(vm: pykvm.Vm, code: bytes) -> pykvm.Vcpu:
    """:func:`long_mode` with a 2 MiB page mapping the LAPIC at 0xfee00000.

    Needs the in-kernel irqchip, created first.
    """
    vcpu = long_mode(vm, code)
    vm.write(PDPT + 3 * 8, struct.pack("<Q", APIC_PD | 3))                 # 3..4 GiB
    vm.write(APIC_PD + (APIC_BASE >> 21 & 511) * 8, struct.pack("<Q", APIC_BASE | 0x83))
    return vcpu


# --- a few hand-assembled guests ----------------------------------------------------------
SPIN = bytes([0xEB, 0xFE])                                     # jmp $
HLT = bytes([0xF4])                                            # hlt
OUT_E9 = bytes([0xE6, 0xE9])                                   # out 0xe9, al  (the "I am here" exit)
# long mode, counter loop: inc qword [rbx]; jmp back  (rbx = address of the counter)
COUNT_LOOP = bytes.fromhex("48ff03" "ebfb")                    # inc qword [rbx]; jmp -5
HELLO_OUT = bytes.fromhex("66ba1000" "b041" "ee" "f4")         # mov dx,0x10; mov al,'A'; out dx,al; hlt

# real mode: prints the digit al+bl and a newline on port 0x3f8, then hlt
REAL_MODE_HELLO = bytes([
    0xBA, 0xF8, 0x03,  # mov dx, 0x3f8
    0x00, 0xD8,        # add al, bl
    0x04, ord("0"),    # add al, '0'
    0xEE,              # out dx, al
    0xB0, 0x0A,        # mov al, '\n'
    0xEE,              # out dx, al
    0xF4,              # hlt
])
