"""Putting a vCPU straight into real, protected or long mode.

Firmware and boot loaders climb from real mode to long mode one instruction
at a time; a VMM may instead set the end state directly with
``KVM_SET_SREGS``/``KVM_SET_REGS``.  These helpers do that:

* :func:`setup_real_mode` — segment:offset addressing, 64 KiB segments;
* :class:`ProtectedMode` — 32-bit flat segments, optionally paging
  (two-level tables, 4 MiB or 4 KiB pages);
* :class:`LongMode` — 64-bit mode with identity-mapped 4-level page tables
  (2 MiB or 1 GiB pages over a chosen range, optionally user-accessible),
  the GDT that ``syscall``/``sysret`` need, one TSS per vCPU (with its
  ``rsp0`` kernel stack) and, if you give one, an IDT.

The tables are *built* once per VM in guest memory that an
:class:`~pykvm.x86.paging.Arena` hands out, and *loaded* into each vCPU with
``.load(vcpu, entry=..., stack=...)``.  ``cpl=3`` starts the vCPU directly in
user mode.  Give the vCPU its CPUID (:func:`pykvm.x86.cpu.setup_cpuid`) too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..uapi.structs import kvm_segment
from .consts import CR0, CR4, EFER, PAGE_2M, PAGE_4K, PAGE_4M, RFLAGS, GiB
from .descriptors import Gdt, Idt, Segment, Tss32, Tss64, dtable
from .paging import Arena, PageTables, PageTables32

__all__ = [
    "LONG_MODE_CR0",
    "LONG_MODE_CR4",
    "LONG_MODE_EFER",
    "LongMode",
    "ProtectedMode",
    "UnsupportedMode",
    "setup_long_mode",
    "setup_protected_mode",
    "setup_real_mode",
]

_DATA_SEGS = ("ds", "es", "fs", "gs", "ss")


class UnsupportedMode(RuntimeError):
    """KVM accepted the state but did not keep it: this host cannot run that mode."""

#: CR0 for long mode: paging, protection, write protect, native FPU errors.
LONG_MODE_CR0 = CR0.PG | CR0.WP | CR0.NE | CR0.ET | CR0.MP | CR0.PE
#: CR4 for long mode: PAE (required) and SSE enabled (compilers emit SSE).
LONG_MODE_CR4 = CR4.PAE | CR4.OSFXSR | CR4.OSXMMEXCPT
#: EFER for long mode: long mode enabled and active, SYSCALL enabled.
LONG_MODE_EFER = EFER.LME | EFER.LMA | EFER.SCE


def _real_seg(sel: int, code: bool = False) -> kvm_segment:
    return kvm_segment(base=sel << 4, limit=0xFFFF, selector=sel, type=0xB if code else 0x3,
                       present=1, dpl=0, db=0, s=1, l=0, g=0, avl=0, unusable=0)


def setup_real_mode(vcpu, *, cs: int = 0, ip: int = 0, ss: int = 0, sp: int = 0,
                    ds: int = 0, rflags: int = RFLAGS.FIXED, **regs: int) -> None:
    """Put *vcpu* in real mode at ``cs:ip`` with stack ``ss:sp`` and ``ds = es = fs = gs``.

    Extra keywords set general registers (``rax=1``...).  Paging, protection
    and EFER are cleared; the vCPU's other state is kept.  On Intel hosts
    without "unrestricted guest", call :func:`pykvm.x86.cpu.prepare_vm` first.
    """
    s = vcpu.get_sregs()
    s.cs = _real_seg(cs, code=True)
    for name in ("ds", "es", "fs", "gs"):
        setattr(s, name, _real_seg(ds))
    s.ss = _real_seg(ss)
    s.cr0 &= ~int(CR0.PE | CR0.PG)
    s.cr4 &= ~int(CR4.PAE)
    s.efer = 0
    s.gdt = dtable(0, 0xFFFF)
    s.idt = dtable(0, 0x3FF)  # the real-mode IVT at address 0
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip, r.rsp, r.rflags = ip, sp, int(rflags) | RFLAGS.FIXED
    for k, v in regs.items():
        setattr(r, k, v)
    vcpu.set_regs(r)


def _set_common(vcpu, *, gdt: Gdt, gdt_base: int, idt_limit: int, idt_base: int, cs: Segment,
                cs_sel: int, data: Segment, data_sel: int, tr: tuple[Segment, int] | None,
                cr0: int, cr3: int, cr4: int, efer: int, entry: int, stack: int, rflags: int,
                regs: dict) -> None:
    s = vcpu.get_sregs()
    s.cs = cs.kvm_segment(cs_sel)
    for name in _DATA_SEGS:
        setattr(s, name, data.kvm_segment(data_sel))
    if tr is not None:
        seg, sel = tr
        s.tr = Segment(base=seg.base, limit=seg.limit, type=0xB, s=0, db=0).kvm_segment(sel)
    s.gdt = dtable(gdt_base, gdt.limit)
    s.idt = dtable(idt_base, idt_limit)
    s.cr0, s.cr3, s.cr4, s.efer = int(cr0), cr3, int(cr4), int(efer)
    vcpu.set_sregs(s)
    if cr0 & CR0.PG and not vcpu.get_sregs().cr0 & CR0.PG:
        # Some hosts (PVM) accept KVM_SET_SREGS but silently drop CR0.PG outside long mode.
        raise UnsupportedMode("this host's KVM dropped CR0.PG: it does not support this "
                              f"paging mode (CR4={int(cr4):#x}, EFER={int(efer):#x})")
    r = vcpu.get_regs()
    r.rip, r.rsp, r.rflags = entry, stack, int(rflags) | RFLAGS.FIXED
    for k, v in regs.items():
        setattr(r, k, v)
    vcpu.set_regs(r)


@dataclass
class ProtectedMode:
    """32-bit protected-mode tables in guest memory: flat GDT, TSS, optional IDT and paging.

    Selectors: kernel code 0x08, kernel data 0x10, user code 0x1b, user data
    0x23, TSS 0x28.  Build with :meth:`build`, then :meth:`load` each vCPU.
    """

    gdt: Gdt
    gdt_base: int
    tss_base: int
    idt: Idt | None = None
    idt_base: int = 0
    page_tables: PageTables32 | None = None
    kernel_stack: int = 0

    @classmethod
    def build(cls, arena: Arena, *, paging: bool = False, page_size: int = PAGE_4M,
              identity: tuple[int, int] = (0, 4 * GiB), user: bool = False,
              idt: Idt | None = None, kernel_stack_size: int = PAGE_4K) -> ProtectedMode:
        """Place the tables in *arena*.

        With ``paging=True``, identity-map ``identity`` (default all 4 GiB)
        with *page_size* pages (4 MiB needs ``CR4.PSE``, which :meth:`load`
        sets), user-accessible if *user*.  *idt* must be a 32-bit
        ``Idt(long_mode=False)``.
        """
        if idt is not None and idt.long_mode:
            raise ValueError("protected mode needs Idt(long_mode=False)")
        stack = arena.alloc(kernel_stack_size) + kernel_stack_size
        tss_base = arena.put(bytes(Tss32(esp0=stack, ss0=0x10)), align=128)
        gdt = Gdt.flat32(tss_base=tss_base)
        gdt_base = arena.put(bytes(gdt), align=16)
        idt_base = arena.put(bytes(idt), align=16) if idt is not None else 0
        pt = None
        if paging:
            pt = PageTables32(arena).identity(*identity, page_size=page_size, user=user)
        return cls(gdt, gdt_base, tss_base, idt, idt_base, pt, stack)

    def load(self, vcpu, *, entry: int, stack: int, cpl: int = 0, rflags: int = RFLAGS.FIXED,
             **regs: int) -> None:
        """Set *vcpu* to 32-bit protected mode at *entry* (CPL *cpl*, 0 or 3)."""
        if cpl not in (0, 3):
            raise ValueError("cpl must be 0 or 3")
        user = cpl == 3
        g = self.gdt
        cs_sel = g.selectors["user_cs" if user else "kernel_cs"]
        ds_sel = g.selectors["user_ds" if user else "kernel_ds"]
        cr0 = CR0.PE | CR0.ET | CR0.NE
        cr4 = 0
        cr3 = 0
        if self.page_tables is not None:
            cr0 |= CR0.PG | CR0.WP
            cr4 |= CR4.PSE
            cr3 = self.page_tables.cr3
        tss_sel = g.selectors["tss"]
        _set_common(vcpu, gdt=g, gdt_base=self.gdt_base,
                    idt_limit=self.idt.limit if self.idt else 0, idt_base=self.idt_base,
                    cs=g.segment(cs_sel), cs_sel=cs_sel, data=g.segment(ds_sel), data_sel=ds_sel,
                    tr=(g.segment(tss_sel), tss_sel), cr0=cr0, cr3=cr3, cr4=cr4, efer=0,
                    entry=entry, stack=stack, rflags=rflags, regs=regs)


@dataclass
class LongMode:
    """64-bit mode tables in guest memory: GDT, per-vCPU TSS, page tables, optional IDT.

    GDT layout (:meth:`Gdt.standard64 <pykvm.x86.descriptors.Gdt.standard64>`):
    kernel code 0x08, kernel data 0x10, user code32 0x1b, user data 0x23,
    user code 0x2b, then one TSS per vCPU from 0x30 (16 bytes each).
    ``STAR`` = :data:`~pykvm.x86.descriptors.STAR64` fits it.
    """

    gdt: Gdt
    gdt_base: int
    page_tables: PageTables
    tss_bases: list[int] = field(default_factory=list)
    kernel_stacks: list[int] = field(default_factory=list)  #: rsp0 of each vCPU's TSS
    idt: Idt | None = None
    idt_base: int = 0
    nx: bool = False

    @property
    def cr3(self) -> int:
        return self.page_tables.cr3

    @classmethod
    def build(cls, arena: Arena, *, identity: tuple[int, int] | None = (0, 4 * GiB),
              page_size: int = PAGE_2M, user: bool = False, writable: bool = True,
              nx: bool = False, idt: Idt | None = None, cpus: int = 1,
              kernel_stack_size: int = PAGE_4K) -> LongMode:
        """Place the tables in *arena*.

        * *identity* — ``(start, end)`` mapped onto itself (default the low
          4 GiB, which covers the LAPIC and IOAPIC), or None to map nothing
          (then call ``lm.page_tables.map(...)`` yourself);
        * *page_size* — ``PAGE_2M`` or ``PAGE_1G`` (needs ``Feature.PDPE1GB``
          in the vCPU's CPUID) or ``PAGE_4K``;
        * *user* — set the U/S bit so CPL3 code may use the mapping;
        * *idt* — an :class:`~pykvm.x86.descriptors.Idt` with 64-bit gates;
        * *cpus* — number of TSS (each with its own *kernel_stack_size* ``rsp0`` stack).
        """
        if idt is not None and not idt.long_mode:
            raise ValueError("long mode needs Idt(long_mode=True)")
        if cpus < 1:
            raise ValueError("cpus must be >= 1")
        gdt = Gdt.standard64()
        for k in range(1, cpus):
            gdt.add(Segment.tss(0), f"tss{k}")
        tss_bases, stacks = [], []
        for k in range(cpus):
            stack = arena.alloc(kernel_stack_size) + kernel_stack_size
            base = arena.put(bytes(Tss64(rsp0=stack)), align=128)
            gdt.set_tss_base(gdt.selectors["tss" if k == 0 else f"tss{k}"], base)
            tss_bases.append(base)
            stacks.append(stack)
        gdt_base = arena.put(bytes(gdt), align=16)
        idt_base = arena.put(bytes(idt), align=16) if idt is not None else 0
        pt = PageTables(arena)
        if identity is not None:
            start, end = identity
            pt.identity(start, end, page_size=page_size, user=user, writable=writable)
        return cls(gdt, gdt_base, pt, tss_bases, stacks, idt, idt_base, nx)

    def write_idt(self, arena: Arena | None = None, idt: Idt | None = None) -> None:
        """(Re)write the IDT after changing it; a new *idt* needs an *arena* the first time."""
        if idt is not None:
            self.idt = idt
        if self.idt is None:
            raise ValueError("no IDT")
        if not self.idt_base:
            if arena is None:
                raise ValueError("the first IDT needs an arena to live in")
            self.idt_base = arena.alloc(len(self.idt), 16)
        self.page_tables.phys.write(self.idt_base, bytes(self.idt))

    def tss_selector(self, cpu: int) -> int:
        return self.gdt.selectors["tss" if cpu == 0 else f"tss{cpu}"]

    def load(self, vcpu, *, entry: int, stack: int, cpl: int = 0, iopl: int = 0,
             interrupts: bool = False, cpu: int | None = None, **regs: int) -> None:
        """Set *vcpu* to 64-bit mode at *entry* with RSP *stack*.

        * *cpl* 0 (kernel) or 3 (user: CS 0x2b, SS 0x23);
        * *iopl* 3 lets CPL3 code use ``in``/``out`` (PVM hosts force IOPL 0 in
          user mode, so there CPL3 port I/O faults);
        * *interrupts* sets RFLAGS.IF;
        * *cpu* picks the TSS (default ``vcpu.id``).

        Extra keywords set general registers (``rdi=...``).
        """
        if cpl not in (0, 3):
            raise ValueError("cpl must be 0 or 3")
        k = vcpu.id if cpu is None else cpu
        if k >= len(self.tss_bases):
            raise ValueError(f"no TSS for cpu {k}: build with cpus>={k + 1}")
        g = self.gdt
        cs_sel = g.selectors["user_cs" if cpl == 3 else "kernel_cs"]
        ds_sel = g.selectors["user_ds" if cpl == 3 else "kernel_ds"]
        tss_sel = self.tss_selector(k)
        rflags = RFLAGS.FIXED | RFLAGS.iopl(iopl) | (RFLAGS.IF if interrupts else 0)
        efer = LONG_MODE_EFER | (EFER.NXE if self.nx else 0)
        _set_common(vcpu, gdt=g, gdt_base=self.gdt_base,
                    idt_limit=self.idt.limit if self.idt else 0, idt_base=self.idt_base,
                    cs=g.segment(cs_sel), cs_sel=cs_sel, data=g.segment(ds_sel), data_sel=ds_sel,
                    tr=(g.segment(tss_sel), tss_sel), cr0=LONG_MODE_CR0, cr3=self.cr3,
                    cr4=LONG_MODE_CR4, efer=efer, entry=entry, stack=stack, rflags=rflags,
                    regs=regs)


def setup_protected_mode(vcpu, arena: Arena, *, entry: int, stack: int, cpl: int = 0,
                         **build: object) -> ProtectedMode:
    """Build :class:`ProtectedMode` tables in *arena* and load them into *vcpu*."""
    pm = ProtectedMode.build(arena, **build)  # type: ignore[arg-type]
    pm.load(vcpu, entry=entry, stack=stack, cpl=cpl)
    return pm


def setup_long_mode(vcpu, arena: Arena, *, entry: int, stack: int, cpl: int = 0,
                    iopl: int = 0, interrupts: bool = False, **build: object) -> LongMode:
    """Build :class:`LongMode` tables in *arena* and load them into *vcpu* (one-vCPU VMs)."""
    lm = LongMode.build(arena, **build)  # type: ignore[arg-type]
    lm.load(vcpu, entry=entry, stack=stack, cpl=cpl, iopl=iopl, interrupts=interrupts)
    return lm
