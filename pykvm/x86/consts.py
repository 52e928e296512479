"""Named x86 constants: control registers, EFER, RFLAGS, MSRs, exceptions, CPUID features.

The values are architectural (Intel SDM vol. 3 / AMD APM vol. 2); the names
follow the Linux kernel's where it has one (``X86_CR0_PG`` is ``CR0.PG``).
Flag groups (``CR0``, ``CR4``, ``EFER``, ``RFLAGS``, ``PTE``, ``SegType``) are
namespaces of plain ``int`` bits: they combine with ``|`` and ``&`` and
``decode()`` names the bits of a value.  They are not :mod:`enum` classes on
purpose: creating enum classes costs start-up time in every program that
imports them (the VMM's included), and these bits are only ever combined
and tested as ints.  MSR indices (:mod:`.msr`), exception vectors (:mod:`.vectors`)
and CPUID features (:mod:`.features`) live in their own modules and are
re-exported here on first use: creating enum classes costs start-up time,
and a VMM that needs ``CR0`` should not pay for 90 CPUID features::

    >>> CR0.PE | CR0.PG
    2147483649
    >>> CR0.decode(CR0.PE | CR0.PG)
    'PG|PE'
    >>> RFLAGS.decode(0x202)
    'IF|FIXED'
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # defined in their own modules, loaded on first use (see __getattr__)
    from .features import FEATURES, Feature, features_in
    from .msr import MSR
    from .vectors import Vector

__all__ = [
    "APIC_BASE_BSP",
    "APIC_BASE_ENABLE",
    "APIC_BASE_EXTD",
    "APIC_DEFAULT_BASE",
    "CR0",
    "CR4",
    "EFER",
    "FEATURES",
    "IOAPIC_DEFAULT_BASE",
    "MSR",
    "PAGE_1G",
    "PAGE_2M",
    "PAGE_4K",
    "PAGE_4M",
    "PTE",
    "RFLAGS",
    "Feature",
    "GiB",
    "KiB",
    "MiB",
    "SegType",
    "Vector",
    "decode_flags",
    "features_in",
    "find_leaf",
]

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE_4K, PAGE_2M, PAGE_4M, PAGE_1G = 4 * KiB, 2 * MiB, 4 * MiB, GiB


def decode_flags(flag_type: Any, value: int) -> str:
    """``"PG|WP|PE"``-style text of the set bits of *value* (unknown bits in hex).

    *flag_type* is one of the flag groups here, or any :class:`enum.Flag`."""
    members = getattr(flag_type, "members", None)
    pairs = members().items() if callable(members) else [(m.name, m.value) for m in flag_type]
    names = []
    rest = value
    for name, v in sorted(pairs, key=lambda p: -p[1]):
        if v and v & (v - 1) == 0 and value & v:
            names.append(name)
            rest &= ~v
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"


class _Flags:
    """A namespace of named bits (upper-case ``int`` class attributes)."""

    _members: ClassVar[dict[str, int]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._members = {k: v for k, v in vars(cls).items()
                        if k.isupper() and isinstance(v, int)}

    def __new__(cls, *args: object, **kwargs: object) -> _Flags:
        raise TypeError(f"{cls.__name__} is a namespace of constants, not a type to instantiate")

    @classmethod
    def members(cls) -> dict[str, int]:
        """``{name: value}`` of every constant in the group."""
        return dict(cls._members)

    @classmethod
    def decode(cls, value: int) -> str:
        """The set bits of *value* by name, e.g. ``"PG|PE"``."""
        return decode_flags(cls, value)


class CR0(_Flags):
    """Control register 0."""

    PE = 1 << 0   #: protection enable
    MP = 1 << 1   #: monitor coprocessor
    EM = 1 << 2   #: x87 emulation
    TS = 1 << 3   #: task switched
    ET = 1 << 4   #: extension type (always 1)
    NE = 1 << 5   #: numeric error
    WP = 1 << 16  #: write protect (supervisor writes honour read-only pages)
    AM = 1 << 18  #: alignment mask
    NW = 1 << 29  #: not write-through
    CD = 1 << 30  #: cache disable
    PG = 1 << 31  #: paging


class CR4(_Flags):
    """Control register 4."""

    VME = 1 << 0
    PVI = 1 << 1
    TSD = 1 << 2
    DE = 1 << 3
    PSE = 1 << 4         #: 4 MiB pages with 32-bit paging
    PAE = 1 << 5         #: physical address extension (required for long mode)
    MCE = 1 << 6
    PGE = 1 << 7         #: global pages
    PCE = 1 << 8
    OSFXSR = 1 << 9      #: the OS uses FXSAVE/FXRSTOR (enables SSE)
    OSXMMEXCPT = 1 << 10
    UMIP = 1 << 11
    LA57 = 1 << 12       #: 5-level paging
    VMXE = 1 << 13
    SMXE = 1 << 14
    FSGSBASE = 1 << 16
    PCIDE = 1 << 17
    OSXSAVE = 1 << 18
    SMEP = 1 << 20
    SMAP = 1 << 21
    PKE = 1 << 22
    CET = 1 << 23
    PKS = 1 << 24


class EFER(_Flags):
    """Extended feature enable register (MSR 0xC0000080)."""

    SCE = 1 << 0    #: SYSCALL/SYSRET enable
    LME = 1 << 8    #: long mode enable
    LMA = 1 << 10   #: long mode active (set by the CPU when paging turns on)
    NXE = 1 << 11   #: no-execute page bit enable
    SVME = 1 << 12
    LMSLE = 1 << 13
    FFXSR = 1 << 14
    TCE = 1 << 15


class RFLAGS(_Flags):
    """The flags register.  Bit 1 (``FIXED``) always reads as 1."""

    CF = 1 << 0
    FIXED = 1 << 1
    PF = 1 << 2
    AF = 1 << 4
    ZF = 1 << 6
    SF = 1 << 7
    TF = 1 << 8      #: trap flag (single step)
    IF = 1 << 9      #: interrupts enabled
    DF = 1 << 10
    OF = 1 << 11
    IOPL0 = 1 << 12  #: low bit of the I/O privilege level
    IOPL1 = 1 << 13  #: high bit of the I/O privilege level
    NT = 1 << 14
    RF = 1 << 16
    VM = 1 << 17
    AC = 1 << 18
    VIF = 1 << 19
    VIP = 1 << 20
    ID = 1 << 21

    @staticmethod
    def iopl(level: int) -> int:
        """The RFLAGS bits for I/O privilege level *level* (0..3)."""
        if not 0 <= level <= 3:
            raise ValueError("IOPL is 0..3")
        return level << 12


class PTE(_Flags):
    """Bits of a page-table entry (all paging modes; NX only with PAE/long mode)."""

    P = 1 << 0      #: present
    RW = 1 << 1     #: writable
    US = 1 << 2     #: user accessible (CPL3)
    PWT = 1 << 3
    PCD = 1 << 4
    A = 1 << 5      #: accessed
    D = 1 << 6      #: dirty
    PS = 1 << 7     #: large page (in a PDE / PDPTE)
    G = 1 << 8      #: global
    NX = 1 << 63    #: no execute (needs EFER.NXE)


APIC_BASE_BSP = 1 << 8
APIC_BASE_EXTD = 1 << 10   # x2APIC mode
APIC_BASE_ENABLE = 1 << 11
APIC_DEFAULT_BASE = 0xFEE00000
IOAPIC_DEFAULT_BASE = 0xFEC00000


class SegType(_Flags):
    """The 4-bit type field of a segment descriptor."""

    # code/data (S=1): bit 0 accessed, data: bit1 writable, bit2 expand-down;
    # code: bit1 readable, bit2 conforming, bit3 code
    DATA_RO = 0x0
    DATA_RW = 0x2
    DATA_RW_ACCESSED = 0x3
    CODE_XO = 0x8
    CODE_XR = 0xA
    CODE_XR_ACCESSED = 0xB
    # system (S=0)
    LDT = 0x2
    TSS16_BUSY = 0x3
    TSS_AVAILABLE = 0x9   #: 32/64-bit TSS, not busy
    TSS_BUSY = 0xB        #: 32/64-bit TSS, busy (what TR must hold)
    CALL_GATE = 0xC
    INTERRUPT_GATE = 0xE  #: clears IF on entry
    TRAP_GATE = 0xF       #: leaves IF alone


def find_leaf(entries: Iterable, leaf: int, subleaf: int = 0) -> object | None:
    """The ``kvm_cpuid_entry2`` for *leaf*/*subleaf* in *entries*, or None."""
    for e in entries:
        if e.function == leaf and (e.index == subleaf or not e.flags & 1):
            return e
    return None


_LAZY = {"MSR": "msr", "Vector": "vectors", "Feature": "features", "FEATURES": "features",
         "features_in": "features"}


def __getattr__(name: str) -> Any:
    """``MSR``, ``Vector``, ``Feature``, ``FEATURES``, ``features_in`` from their modules."""
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __package__), name)
    globals()[name] = value
    return value
