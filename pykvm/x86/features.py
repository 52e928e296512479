"""CPUID feature bits by name: ``Feature.LM`` is ``CPUID(0x80000001).EDX[29]``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["FEATURES", "Feature", "features_in"]


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
FEATURES: dict[str, Feature] = {n: Feature(n, *v) for n, v in _FEATURE_TABLE.items()}


for _n, _v in _FEATURE_TABLE.items():
    setattr(Feature, _n, FEATURES[_n])
del _n, _v


def features_in(entries: Iterable) -> list[str]:
    """Names of the :data:`FEATURES` present in a CPUID entry list."""
    lst = list(entries)
    return [n for n, f in FEATURES.items() if f.in_entries(lst)]
