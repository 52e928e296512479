"""How :mod:`pykvm.uapi.ioctls` (generated) builds each request number (hand-written).

Numbers are built with ``ioctl_opt.IO/IOR/IOW/IOWR`` from the ctypes
structures, named exactly like the kernel's macros.  The table ``IOCTLS``
maps each name to its number and ``IOCTL_NAMES`` the other way (for error
messages).

ioctl-opt checks its ranges with ``assert``, which ``python -O`` removes, and
it accepts a zero-sized type.  :func:`_req` therefore validates every
argument itself and re-decodes the number it gets back, so a misspelled
``_fields_`` or an out-of-range size fails at import time, with or without
``-O``.
"""

from __future__ import annotations

import ctypes

import ioctl_opt

__all__ = ["IOCTLS", "IOCTL_NAMES", "KVMIO", "ioctl_name"]

KVMIO = 0xAE

_DIRS = {"": ioctl_opt.IO, "R": ioctl_opt.IOR, "W": ioctl_opt.IOW, "WR": ioctl_opt.IOWR}
_DIRBITS = {"": ioctl_opt.IOC_NONE, "R": ioctl_opt.IOC_READ, "W": ioctl_opt.IOC_WRITE,
            "WR": ioctl_opt.IOC_READ | ioctl_opt.IOC_WRITE}

IOCTLS: dict[str, int] = {}


def _req(name: str, direction: str, nr: int, argtype: type | None = None) -> int:
    """Build, check and register one request number."""
    if not 0 <= nr <= 0xFF:
        raise ValueError(f"{name}: ioctl nr {nr:#x} out of range")
    if direction == "":
        if argtype is not None:
            raise TypeError(f"{name}: _IO takes no argument type")
        num = int(ioctl_opt.IO(KVMIO, nr))
        size = 0
    else:
        if argtype is None:
            raise TypeError(f"{name}: _IO{direction} needs an argument type")
        size = ctypes.sizeof(argtype)
        if size <= 0:
            raise TypeError(f"{name}: argument type {argtype!r} has size 0 (empty _fields_?)")
        if size > ioctl_opt._IOC_SIZEMASK:
            raise ValueError(f"{name}: argument size {size} does not fit 14 bits")
        num = int(_DIRS[direction](KVMIO, nr, argtype))
    # Re-decode: catches a wrong number even when ioctl-opt's asserts are off.
    if (
        ioctl_opt.IOC_NR(num) != nr
        or ioctl_opt.IOC_TYPE(num) != KVMIO
        or ioctl_opt.IOC_SIZE(num) != size
        or ioctl_opt.IOC_DIR(num) != _DIRBITS[direction]
    ):
        raise AssertionError(f"{name}: request number {num:#x} does not decode back")
    IOCTLS[name] = num
    return num


#: request number -> name; filled by pykvm.uapi.ioctls (the first name wins).
IOCTL_NAMES: dict[int, str] = {}


def ioctl_name(request: int) -> str:
    """The kernel macro name of a request number, or its hex form."""
    return IOCTL_NAMES.get(request, f"ioctl {request:#x}")
