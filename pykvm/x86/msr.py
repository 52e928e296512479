"""Model-specific register indices (Intel SDM vol. 4, AMD APM vol. 2)."""

from __future__ import annotations

import enum

__all__ = ["MSR"]


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
