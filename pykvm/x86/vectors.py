"""Exception vectors (Intel SDM vol. 3, 6.3.1)."""

from __future__ import annotations

import enum

__all__ = ["Vector"]


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
