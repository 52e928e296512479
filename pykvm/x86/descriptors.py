"""Segment descriptors, the GDT, the IDT and the TSS, as bytes and as ``kvm_segment``.

A descriptor lives twice in a KVM guest: as 8 (or 16) bytes in the guest's
GDT, which the CPU reads when the guest loads a selector, and as the hidden
part of a segment register, which KVM takes from ``kvm_sregs`` when the host
sets the state directly.  :class:`Segment` describes one segment once and
produces both (:meth:`Segment.descriptor` and :meth:`Segment.kvm_segment`),
so they cannot disagree.

Layouts (Intel SDM vol. 3, 3.4.5 and 7.2.3, 6.14.1):

* code/data descriptor, 8 bytes: limit[15:0], base[23:0], access byte
  (type, S, DPL, P), limit[19:16], flags (AVL, L, D/B, G), base[31:24];
* system descriptor (TSS, LDT) in long mode, 16 bytes: the same plus
  base[63:32];
* 64-bit interrupt/trap gate, 16 bytes: offset[15:0], selector, IST,
  type/DPL/P, offset[31:16], offset[63:32]; 32-bit gate, 8 bytes.
"""

from __future__ import annotations

import struct

from ..uapi.structs import kvm_dtable, kvm_segment
from .consts import SegType

__all__ = [
    "FLAT32",
    "FLAT64",
    "STAR64",
    "Gdt",
    "Idt",
    "Segment",
    "Tss32",
    "Tss64",
    "decode_descriptor",
    "dtable",
    "gate32",
    "gate64",
    "ivt_entry",
    "selector",
]


def selector(index: int, rpl: int = 0, ldt: bool = False) -> int:
    """The selector of GDT (or LDT) entry *index* with requested privilege *rpl*."""
    return index << 3 | (4 if ldt else 0) | rpl


class Segment:
    """One segment: base, limit (in bytes, ``0xFFFFFFFF`` for flat) and attributes.

    Immutable: ``seg._replace(dpl=3)`` makes a changed copy.  (A plain class:
    ``dataclasses`` imports ``inspect`` and a NamedTuple compiles code at import,
    both start-up time for every user of ``pykvm.x86``, the VMM included.)

    ``code``/``data`` build the usual ones; ``system=True`` (``s=0``) is a
    TSS or LDT.  ``limit`` is the byte limit; the descriptor's 20-bit field
    and its G bit are derived from it.
    """

    # In constructor-argument order: _fields pairs them with the positional arguments.
    __slots__ = ("base", "limit", "type", "s", "dpl", "present", "long", "db", "avl")  # noqa: RUF023
    _fields = __slots__

    base: int
    limit: int
    type: int
    s: int          #: 1 code/data, 0 system
    dpl: int
    present: int
    long: int       #: L bit: 64-bit code segment
    db: int         #: D/B bit: 32-bit default operand size
    avl: int

    def __init__(self, base: int = 0, limit: int = 0xFFFFFFFF,
                 type: int = SegType.DATA_RW_ACCESSED, s: int = 1, dpl: int = 0,
                 present: int = 1, long: int = 0, db: int = 1, avl: int = 0) -> None:
        for name, value in zip(self._fields, (base, limit, type, s, dpl, present, long, db, avl), strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Segment is immutable: use seg._replace({name}=...)")

    def _astuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, f) for f in self._fields)

    def _replace(self, **changes: int) -> Segment:
        """A copy with *changes* applied."""
        values = dict(zip(self._fields, self._astuple(), strict=True))
        values.update(changes)
        return Segment(**values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Segment) and self._astuple() == other._astuple()

    def __hash__(self) -> int:
        return hash(self._astuple())

    def __repr__(self) -> str:
        return "Segment(" + ", ".join(f"{f}={getattr(self, f):#x}" if f in ("base", "limit")
                                      else f"{f}={getattr(self, f)}" for f in self._fields) + ")"

    @classmethod
    def code64(cls, dpl: int = 0) -> Segment:
        """A 64-bit code segment (L=1, D=0)."""
        return cls(type=SegType.CODE_XR_ACCESSED, dpl=dpl, long=1, db=0)

    @classmethod
    def code32(cls, dpl: int = 0, base: int = 0, limit: int = 0xFFFFFFFF) -> Segment:
        """A 32-bit code segment (flat by default)."""
        return cls(base=base, limit=limit, type=SegType.CODE_XR_ACCESSED, dpl=dpl, db=1)

    @classmethod
    def code16(cls, base: int = 0, limit: int = 0xFFFF) -> Segment:
        """A 16-bit code segment (protected mode, D=0)."""
        return cls(base=base, limit=limit, type=SegType.CODE_XR_ACCESSED, db=0)

    @classmethod
    def data(cls, dpl: int = 0, base: int = 0, limit: int = 0xFFFFFFFF) -> Segment:
        """A writable data (or stack) segment, flat by default."""
        return cls(base=base, limit=limit, type=SegType.DATA_RW_ACCESSED, dpl=dpl, db=1)

    @classmethod
    def tss(cls, base: int, limit: int = 103, busy: bool = False) -> Segment:
        """A 32/64-bit TSS (a system descriptor, 16 bytes in a long-mode GDT)."""
        return cls(base=base, limit=limit,
                   type=SegType.TSS_BUSY if busy else SegType.TSS_AVAILABLE, s=0, db=0)

    @classmethod
    def from_kvm(cls, seg: kvm_segment) -> Segment:
        """The segment a ``kvm_segment`` describes (selector dropped)."""
        return cls(base=seg.base, limit=seg.limit, type=seg.type, s=seg.s, dpl=seg.dpl,
                   present=seg.present, long=seg.l, db=seg.db, avl=seg.avl)

    @property
    def granularity(self) -> int:
        """The G bit the descriptor needs for ``limit``."""
        return 1 if self.limit > 0xFFFFF else 0

    @property
    def is_system(self) -> bool:
        return not self.s

    def descriptor(self, long_mode_system: bool = True) -> bytes:
        """The descriptor bytes: 8, or 16 for a system segment in a long-mode GDT."""
        g = self.granularity
        if g:
            if self.limit & 0xFFF != 0xFFF:
                raise ValueError(f"limit {self.limit:#x} > 1 MiB must end in 0xfff (4 KiB granularity)")
            raw_limit = self.limit >> 12
        else:
            raw_limit = self.limit
        if raw_limit > 0xFFFFF:
            raise ValueError(f"limit {self.limit:#x} does not fit a descriptor")
        access = (self.type & 0xF) | (self.s & 1) << 4 | (self.dpl & 3) << 5 | (self.present & 1) << 7
        flags = (self.avl & 1) | (self.long & 1) << 1 | (self.db & 1) << 2 | g << 3
        lo = struct.pack("<HHBBBB", raw_limit & 0xFFFF, self.base & 0xFFFF, (self.base >> 16) & 0xFF,
                         access, (raw_limit >> 16) | flags << 4, (self.base >> 24) & 0xFF)
        if self.is_system and long_mode_system:
            return lo + struct.pack("<II", (self.base >> 32) & 0xFFFFFFFF, 0)
        return lo

    def kvm_segment(self, sel: int = 0) -> kvm_segment:
        """The ``kvm_segment`` for a segment register holding this segment under selector *sel*."""
        return kvm_segment(base=self.base, limit=self.limit, selector=sel, type=self.type,
                           present=self.present, dpl=self.dpl, db=self.db, s=self.s,
                           l=self.long, g=self.granularity, avl=self.avl, unusable=0)

    def with_dpl(self, dpl: int) -> Segment:
        return self._replace(dpl=dpl)


def decode_descriptor(raw: bytes) -> Segment:
    """Parse 8 (or 16, for a long-mode system descriptor) descriptor bytes."""
    lim_lo, base_lo, base_mid, access, lim_flags, base_hi = struct.unpack_from("<HHBBBB", raw)
    base = base_lo | base_mid << 16 | base_hi << 24
    s = access >> 4 & 1
    if not s and len(raw) >= 16:
        base |= struct.unpack_from("<I", raw, 8)[0] << 32
    flags = lim_flags >> 4
    limit = lim_lo | (lim_flags & 0xF) << 16
    if flags & 8:
        limit = limit << 12 | 0xFFF
    return Segment(base=base, limit=limit, type=access & 0xF, s=s, dpl=access >> 5 & 3,
                   present=access >> 7, long=flags >> 1 & 1, db=flags >> 2 & 1, avl=flags & 1)


class Gdt:
    """A global descriptor table under construction.

    ``add`` appends a segment and returns its selector (with the segment's
    DPL as RPL).  Entry 0 is the null descriptor.  In a long-mode GDT
    (``long_mode=True``) system segments take two slots.

    :meth:`standard64` builds the layout Linux uses, which ``syscall`` /
    ``sysret`` need (kernel code, kernel data, user code32, user data, user
    code64, TSS).
    """

    def __init__(self, long_mode: bool = True) -> None:
        self.long_mode = long_mode
        self.entries: list[tuple[int, Segment | None]] = [(0, None)]  # (index, segment)
        self._next = 1
        self.selectors: dict[str, int] = {}

    def add(self, seg: Segment, name: str | None = None) -> int:
        """Append *seg*; return its selector (RPL = DPL; 0 for system segments)."""
        index = self._next
        self.entries.append((index, seg))
        self._next += 2 if (seg.is_system and self.long_mode) else 1
        sel = selector(index, 0 if seg.is_system else seg.dpl)
        if name:
            self.selectors[name] = sel
        return sel

    def segment(self, sel: int) -> Segment:
        """The segment a selector refers to."""
        for index, seg in self.entries:
            if index == sel >> 3 and seg is not None:
                return seg
        raise KeyError(f"no descriptor for selector {sel:#x}")

    def set_tss_base(self, sel: int, base: int) -> None:
        """Point the TSS descriptor *sel* at *base* (used once its address is known)."""
        for k, (index, seg) in enumerate(self.entries):
            if index == sel >> 3 and seg is not None:
                self.entries[k] = (index, seg._replace(base=base))
                return
        raise KeyError(f"no descriptor for selector {sel:#x}")

    def __bytes__(self) -> bytes:
        out = bytearray(8 * self._next)
        for index, seg in self.entries:
            if seg is not None:
                d = seg.descriptor(long_mode_system=self.long_mode)
                out[index * 8:index * 8 + len(d)] = d
        return bytes(out)

    @property
    def limit(self) -> int:
        """The GDTR limit (size in bytes minus one)."""
        return 8 * self._next - 1

    def __len__(self) -> int:
        return 8 * self._next

    @classmethod
    def standard64(cls, tss_base: int = 0) -> Gdt:
        """Long-mode GDT: ``kernel_cs`` 0x08, ``kernel_ds`` 0x10, ``user_cs32`` 0x1b,
        ``user_ds`` 0x23, ``user_cs`` 0x2b, ``tss`` 0x30.

        With ``STAR = 0x001b_0008 << 32`` (:data:`STAR64`), ``syscall``
        enters at CS 0x08/SS 0x10 and ``sysretq`` returns to CS 0x2b/SS 0x23.
        """
        g = cls(long_mode=True)
        g.add(Segment.code64(0), "kernel_cs")
        g.add(Segment.data(0), "kernel_ds")
        g.add(Segment.code32(3), "user_cs32")
        g.add(Segment.data(3), "user_ds")
        g.add(Segment.code64(3), "user_cs")
        g.add(Segment.tss(tss_base), "tss")
        return g

    @classmethod
    def flat32(cls, tss_base: int | None = None) -> Gdt:
        """Protected-mode GDT: ``kernel_cs`` 0x08, ``kernel_ds`` 0x10, ``user_cs`` 0x1b,
        ``user_ds`` 0x23 (flat 4 GiB), and a ``tss`` 0x28 if *tss_base* is given."""
        g = cls(long_mode=False)
        g.add(Segment.code32(0), "kernel_cs")
        g.add(Segment.data(0), "kernel_ds")
        g.add(Segment.code32(3), "user_cs")
        g.add(Segment.data(3), "user_ds")
        if tss_base is not None:
            g.add(Segment.tss(tss_base), "tss")
        return g


#: ``IA32_STAR`` for :meth:`Gdt.standard64`: SYSCALL loads CS=0x08, SS=0x10; SYSRET to
#: 64-bit code loads CS = 0x18+16 | 3 = 0x2b and SS = 0x18+8 | 3 = 0x23.
STAR64 = (0x001B << 48) | (0x0008 << 32)


def gate64(offset: int, sel: int = 0x08, *, dpl: int = 0, ist: int = 0,
           trap: bool = False) -> bytes:
    """A 16-byte long-mode interrupt (or trap) gate to *offset* in code segment *sel*."""
    typ = SegType.TRAP_GATE if trap else SegType.INTERRUPT_GATE
    attr = 0x80 | (dpl & 3) << 5 | typ
    return struct.pack("<HHBBHII", offset & 0xFFFF, sel, ist & 7, attr, (offset >> 16) & 0xFFFF,
                       (offset >> 32) & 0xFFFFFFFF, 0)


def gate32(offset: int, sel: int = 0x08, *, dpl: int = 0, trap: bool = False) -> bytes:
    """An 8-byte protected-mode 32-bit interrupt (or trap) gate."""
    typ = SegType.TRAP_GATE if trap else SegType.INTERRUPT_GATE
    attr = 0x80 | (dpl & 3) << 5 | typ
    return struct.pack("<HHBBH", offset & 0xFFFF, sel, 0, attr, (offset >> 16) & 0xFFFF)


def ivt_entry(segment: int, offset: int) -> bytes:
    """A 4-byte real-mode interrupt vector table entry (offset, then segment)."""
    return struct.pack("<HH", offset, segment)


class Idt:
    """An interrupt descriptor table: ``idt[vector] = handler_address``.

    ``Idt(long_mode=True)`` makes 16-byte gates, else 8-byte 32-bit gates.
    Unset vectors are not present (a fault through them double-faults).
    """

    def __init__(self, long_mode: bool = True, code_selector: int = 0x08, entries: int = 256) -> None:
        self.long_mode = long_mode
        self.code_selector = code_selector
        self.size = entries
        self._gates: dict[int, bytes] = {}

    def set(self, vector: int, handler: int, *, dpl: int = 0, ist: int = 0, trap: bool = False,
            sel: int | None = None) -> None:
        """Install a gate for *vector*: ``dpl=3`` lets ``int n`` reach it from user mode."""
        if not 0 <= vector < self.size:
            raise ValueError(f"vector {vector} outside the table")
        sel = self.code_selector if sel is None else sel
        if self.long_mode:
            self._gates[vector] = gate64(handler, sel, dpl=dpl, ist=ist, trap=trap)
        else:
            self._gates[vector] = gate32(handler, sel, dpl=dpl, trap=trap)

    def __setitem__(self, vector: int, handler: int) -> None:
        self.set(vector, handler)

    @property
    def gate_size(self) -> int:
        return 16 if self.long_mode else 8

    def __bytes__(self) -> bytes:
        out = bytearray(self.gate_size * self.size)
        for v, g in self._gates.items():
            out[v * self.gate_size:(v + 1) * self.gate_size] = g
        return bytes(out)

    @property
    def limit(self) -> int:
        return self.gate_size * self.size - 1

    def __len__(self) -> int:
        return self.gate_size * self.size


class Tss64:
    """The 104-byte long-mode task-state segment.

    ``rsp0`` is the stack the CPU switches to on an interrupt or exception
    from CPL3; ``ist[1..7]`` are the interrupt stacks selectable per gate.
    ``iomap_base`` beyond the limit (the default, 104) means no I/O bitmap:
    user-mode port I/O is then governed by RFLAGS.IOPL alone.
    """

    SIZE = 104

    def __init__(self, rsp0: int = 0, rsp1: int = 0, rsp2: int = 0,
                 ist: list[int] | None = None, iomap_base: int = 104) -> None:
        self.rsp0, self.rsp1, self.rsp2 = rsp0, rsp1, rsp2
        self.ist: list[int] = list(ist) if ist is not None else [0] * 8  # ist[0] unused
        self.iomap_base = iomap_base

    def __repr__(self) -> str:
        return (f"Tss64(rsp0={self.rsp0:#x}, rsp1={self.rsp1:#x}, rsp2={self.rsp2:#x}, "
                f"ist={self.ist!r}, iomap_base={self.iomap_base})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tss64) and bytes(self) == bytes(other)

    def __bytes__(self) -> bytes:
        return struct.pack("<IQQQQ7QQHH", 0, self.rsp0, self.rsp1, self.rsp2, 0,
                           *self.ist[1:8], 0, 0, self.iomap_base)


class Tss32:
    """The 104-byte 32-bit task-state segment (only ``esp0``/``ss0`` matter here)."""

    SIZE = 104

    def __init__(self, esp0: int = 0, ss0: int = 0x10, iomap_base: int = 104) -> None:
        self.esp0, self.ss0, self.iomap_base = esp0, ss0, iomap_base

    def __repr__(self) -> str:
        return f"Tss32(esp0={self.esp0:#x}, ss0={self.ss0:#x}, iomap_base={self.iomap_base})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tss32) and bytes(self) == bytes(other)

    def __bytes__(self) -> bytes:
        raw = bytearray(104)
        struct.pack_into("<II", raw, 4, self.esp0, self.ss0)
        struct.pack_into("<H", raw, 102, self.iomap_base)
        return bytes(raw)


def dtable(base: int, limit: int) -> kvm_dtable:
    """A ``kvm_dtable`` (the GDTR/IDTR as KVM sees it)."""
    return kvm_dtable(base=base, limit=limit)


#: The flat 64-bit kernel code segment, selector 0x08.
FLAT64 = Segment.code64(0)
#: The flat 32-bit kernel code segment, selector 0x08.
FLAT32 = Segment.code32(0)
