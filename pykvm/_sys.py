"""The one syscall floor: the single libc handle and the raw calls pykvm makes through it.

Everything in pykvm that needs libc (``ioctl`` with an ``unsigned long``
argument, ``KVM_RUN`` that must return EINTR, ``sigaction``, ``fallocate``)
goes through this module, so there is one ``CDLL``; each call turns a ``-1``
into ``OSError`` from errno.  Nothing here knows about KVM.
"""

from __future__ import annotations

import ctypes
import os

__all__ = [
    "fallocate",
    "get_errno",
    "ioctl_int",
    "ioctl_noarg",
    "ioctl_ulong",
    "libc",
    "sigaction",
    "sigaction_t",
]

#: The process's libc (``CDLL(None)``), errno captured per call.
libc = ctypes.CDLL(None, use_errno=True)
get_errno = ctypes.get_errno

_ioctl_ulong = libc.ioctl
_ioctl_ulong.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_ioctl_ulong.restype = ctypes.c_int
# The same libc symbol without argtypes, as a separate function object: ctypes
# then passes Python ints as C ints, its cheapest call.
_ioctl_plain = ctypes.CDLL(None, use_errno=True).ioctl


def ioctl_ulong(fd: int, request: int, arg: int) -> int:
    """``ioctl(fd, request, (unsigned long)arg)``; OSError on failure."""
    ret: int = _ioctl_ulong(fd, request, arg)
    if ret < 0:
        err = get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def ioctl_int(fd: int, request: int, arg: int) -> int:
    """``ioctl(fd, request, arg)`` with *arg* in ``[0, 2**31)``; OSError on failure."""
    ret: int = _ioctl_plain(fd, request, arg)
    if ret < 0:
        err = get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def ioctl_noarg(fd: int, request: int) -> int:
    """``ioctl(fd, request, 0)`` through libc: EINTR reaches the caller (never retried)."""
    ret: int = _ioctl_plain(fd, request, 0)
    if ret < 0:
        err = get_errno()
        raise OSError(err, os.strerror(err))
    return ret


class sigaction_t(ctypes.Structure):
    """glibc's x86-64 ``struct sigaction``."""

    _fields_ = [
        ("sa_handler", ctypes.c_void_p),
        ("sa_mask", ctypes.c_ulong * 16),
        ("sa_flags", ctypes.c_int),
        ("sa_restorer", ctypes.c_void_p),
    ]


_sigaction = libc.sigaction
_sigaction.argtypes = [ctypes.c_int, ctypes.POINTER(sigaction_t), ctypes.POINTER(sigaction_t)]
_sigaction.restype = ctypes.c_int


def sigaction(sig: int, new: sigaction_t | None) -> sigaction_t:
    """Install *new* (if given) for *sig*; return the previous disposition."""
    old = sigaction_t()
    if _sigaction(sig, ctypes.byref(new) if new is not None else None, ctypes.byref(old)) != 0:
        err = get_errno()
        raise OSError(err, f"sigaction({sig}): {os.strerror(err)}")
    return old


_fallocate = libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)``; OSError on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = get_errno()
        raise OSError(err, os.strerror(err))
