"""Named x86 constants: control registers, EFER, RFLAGS, MSRs, exceptions, CPUID features.

The values are architectural (Intel SDM vol. 3 / AMD APM vol. 2); the names
follow the Linux kernel's where it has one (``X86_CR0_PG`` is ``CR0.PG``).
Flag groups are :class:`enum.IntFlag`, so they combine with ``|`` and print
their members::

    >>> CR0.PE | CR0.PG
    <CR0.PG|PE: 2147483649>
    >>> RFLAGS.decode(0x202)
    'IF'
"""

from __future__ import annotations

import enum
from typing import Dict, Iterable, List, NamedTuple, Optional

__all__ = [
    "CR0", "CR4", "EFER", "RFLAGS", "PTE", "MSR", "Vector", "SegType", "Feature",
    "FEATURES", "KiB", "MiB", "GiB", "PAGE_4K", "PAGE_2M", "PAGE_4M", "PAGE_1G",
    "decode_flags", "features_in", "find_leaf", "APIC_BASE_BSP", "APIC_BASE_EXTD",
    "APIC_BASE_ENABLE", "APIC_DEFAULT_BASE", "IOAPIC_DEFAULT_BASE",
]

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE_4K, PAGE_2M, PAGE_4M, PAGE_1G = 4 * KiB, 2 * MiB, 4 * MiB, GiB


def decode_flags(flag_type: type, value: int) -> str:
    """``"PG|WP|PE"``-style text of the set bits of *value* (unknown bits in hex)."""
    names = []
    rest = value
    for member in sorted(flag_type, key=lambda m: -m.value):
        v = member.value
        if v and v & (v - 1) == 0 and value & v:
            names.append(member.name)
            rest &= ~v
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"


class _Flags(enum.IntFlag):
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


class MSR(enum.IntEnum):
    """Model-specific register indices."""

    TSC = 0x10
    APIC_BASE = 0x1B
    MTRRCAP = 0xFE
    SYSENTER_CS = 0x174
    SYSENTER_ESP = 0x175
    SYSENTER_EIP = 0x176
    MISC_ENABLE = 0x1A0
    PAT = 0x277
    TSC_DEADLINE = 0x6E0
    X2APIC_BASE = 0x800
    EFER = 0xC0000080
    STAR = 0xC0000081          #: SYSCALL/SYSRET selectors
    LSTAR = 0xC0000082         #: 64-bit SYSCALL entry point
    CSTAR = 0xC0000083
    SYSCALL_MASK = 0xC0000084  #: RFLAGS bits cleared by SYSCALL (a.k.a. FMASK)
    FS_BASE = 0xC0000100
    GS_BASE = 0xC0000101
    KERNEL_GS_BASE = 0xC0000102
    TSC_AUX = 0xC0000103


#: ``IA32_APIC_BASE`` bits.
APIC_BASE_BSP = 1 << 8
APIC_BASE_EXTD = 1 << 10   # x2APIC mode
APIC_BASE_ENABLE = 1 << 11
APIC_DEFAULT_BASE = 0xFEE00000
IOAPIC_DEFAULT_BASE = 0xFEC00000


class Vector(enum.IntEnum):
    """Exception vectors."""

    DE = 0   #: divide error
    DB = 1   #: debug
    NMI = 2
    BP = 3   #: breakpoint (int3)
    OF = 4
    BR = 5
    UD = 6   #: invalid opcode
    NM = 7
    DF = 8   #: double fault
    TS = 10
    NP = 11
    SS = 12
    GP = 13  #: general protection
    PF = 14  #: page fault
    MF = 16
    AC = 17
    MC = 18
    XM = 19
    VE = 20
    CP = 21

    @property
    def has_error_code(self) -> bool:
        """True if the CPU pushes an error code for this exception."""
        return self in (8, 10, 11, 12, 13, 14, 17, 21)


class SegType(enum.IntEnum):
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


# ---------------------------------------------------------------------------
# CPUID features


class Feature(NamedTuple):
    """One CPUID feature bit: ``CPUID(leaf, subleaf).reg[bit]``.

    (A NamedTuple rather than a dataclass: ``dataclasses`` imports ``inspect``,
    which would cost every ``pykvm.x86`` user, the VMM's start-up included.)
    """

    name: str
    leaf: int
    subleaf: int
    reg: str  # "eax" | "ebx" | "ecx" | "edx"
    bit: int

    def __repr__(self) -> str:
        return f"Feature.{self.name}"

    def in_entries(self, entries: Iterable) -> bool:
        """True if a list of ``kvm_cpuid_entry2`` has this bit set."""
        for e in entries:
            if e.function == self.leaf and (e.index == self.subleaf or not e.flags & 1):
                return bool(getattr(e, self.reg) >> self.bit & 1)
        return False


_FEATURE_TABLE = {
    # CPUID.1:EDX
    "FPU": (1, 0, "edx", 0), "VME": (1, 0, "edx", 1), "DE": (1, 0, "edx", 2),
    "PSE": (1, 0, "edx", 3), "TSC": (1, 0, "edx", 4), "MSR": (1, 0, "edx", 5),
    "PAE": (1, 0, "edx", 6), "MCE": (1, 0, "edx", 7), "CX8": (1, 0, "edx", 8),
    "APIC": (1, 0, "edx", 9), "SEP": (1, 0, "edx", 11), "MTRR": (1, 0, "edx", 12),
    "PGE": (1, 0, "edx", 13), "MCA": (1, 0, "edx", 14), "CMOV": (1, 0, "edx", 15),
    "PAT": (1, 0, "edx", 16), "PSE36": (1, 0, "edx", 17), "CLFSH": (1, 0, "edx", 19),
    "MMX": (1, 0, "edx", 23), "FXSR": (1, 0, "edx", 24), "SSE": (1, 0, "edx", 25),
    "SSE2": (1, 0, "edx", 26), "HTT": (1, 0, "edx", 28),
    # CPUID.1:ECX
    "SSE3": (1, 0, "ecx", 0), "PCLMULQDQ": (1, 0, "ecx", 1), "MONITOR": (1, 0, "ecx", 3),
    "VMX": (1, 0, "ecx", 5), "SSSE3": (1, 0, "ecx", 9), "FMA": (1, 0, "ecx", 12),
    "CX16": (1, 0, "ecx", 13), "PCID": (1, 0, "ecx", 17), "SSE4_1": (1, 0, "ecx", 19),
    "SSE4_2": (1, 0, "ecx", 20), "X2APIC": (1, 0, "ecx", 21), "MOVBE": (1, 0, "ecx", 22),
    "POPCNT": (1, 0, "ecx", 23), "TSC_DEADLINE": (1, 0, "ecx", 24), "AES": (1, 0, "ecx", 25),
    "XSAVE": (1, 0, "ecx", 26), "OSXSAVE": (1, 0, "ecx", 27), "AVX": (1, 0, "ecx", 28),
    "F16C": (1, 0, "ecx", 29), "RDRAND": (1, 0, "ecx", 30), "HYPERVISOR": (1, 0, "ecx", 31),
    # CPUID.(7,0):EBX / ECX / EDX
    "FSGSBASE": (7, 0, "ebx", 0), "BMI1": (7, 0, "ebx", 3), "HLE": (7, 0, "ebx", 4),
    "AVX2": (7, 0, "ebx", 5), "SMEP": (7, 0, "ebx", 7), "BMI2": (7, 0, "ebx", 8),
    "ERMS": (7, 0, "ebx", 9), "INVPCID": (7, 0, "ebx", 10), "RTM": (7, 0, "ebx", 11),
    "AVX512F": (7, 0, "ebx", 16), "RDSEED": (7, 0, "ebx", 18), "ADX": (7, 0, "ebx", 19),
    "SMAP": (7, 0, "ebx", 20), "CLFLUSHOPT": (7, 0, "ebx", 23), "CLWB": (7, 0, "ebx", 24),
    "SHA": (7, 0, "ebx", 29), "UMIP": (7, 0, "ecx", 2), "PKU": (7, 0, "ecx", 3),
    "LA57": (7, 0, "ecx", 16), "RDPID": (7, 0, "ecx", 22),
    # CPUID.80000001h:ECX / EDX
    "LAHF_LM": (0x80000001, 0, "ecx", 0), "SVM": (0x80000001, 0, "ecx", 2),
    "LZCNT": (0x80000001, 0, "ecx", 5),
    "SYSCALL": (0x80000001, 0, "edx", 11), "NX": (0x80000001, 0, "edx", 20),
    "PDPE1GB": (0x80000001, 0, "edx", 26), "RDTSCP": (0x80000001, 0, "edx", 27),
    "LM": (0x80000001, 0, "edx", 29),
}

#: Every named feature, by name.
FEATURES: Dict[str, Feature] = {n: Feature(n, *v) for n, v in _FEATURE_TABLE.items()}


for _n, _v in _FEATURE_TABLE.items():
    setattr(Feature, _n, FEATURES[_n])
del _n, _v


def features_in(entries: Iterable) -> List[str]:
    """Names of the :data:`FEATURES` present in a CPUID entry list."""
    lst = list(entries)
    return [n for n, f in FEATURES.items() if f.in_entries(lst)]


def find_leaf(entries: Iterable, leaf: int, subleaf: int = 0) -> Optional[object]:
    """The ``kvm_cpuid_entry2`` for *leaf*/*subleaf* in *entries*, or None."""
    for e in entries:
        if e.function == leaf and (e.index == subleaf or not e.flags & 1):
            return e
    return None
