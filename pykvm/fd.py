"""The public raw layer: a checked ``ioctl`` and the fd-owning base class.

* :func:`ioctl` issues a request with an int or a ctypes buffer argument and
  turns ``OSError`` into :class:`~pykvm.errors.KvmError` naming the ioctl,
  the errno and a likely cause.  CPython's ``fcntl.ioctl`` passes an int
  argument as a C ``int``; values of 2**31 and more (a TSS address of
  0xfffbd000, a large VM type) go through libc's ``ioctl`` with an
  ``unsigned long`` instead.  Tools that need an ioctl pykvm has no wrapper
  for use this function, never ``fcntl`` directly.
* :class:`FdObject` owns one fd: ``fileno()``, ``close()`` (idempotent),
  context manager, close on garbage collection.  After ``close()`` its fd
  attribute is -1, so no ioctl can reach an fd number reused by another file.
* :func:`grow_on_e2big` is the one loop for ioctls that answer ``E2BIG``
  when the caller's flexible array is too small.
"""

from __future__ import annotations

import errno
import os
import fcntl
from typing import Any, Callable, Optional, TypeVar, Union

from . import _sys
from .errors import KvmClosedError, KvmError, hint_for
from .uapi.ioctls import ioctl_name

__all__ = ["ioctl", "FdObject", "raise_error", "grow_on_e2big"]

_fcntl_ioctl = fcntl.ioctl
_INT_MAX = 2**31 - 1
_ioctl_int = _sys.ioctl_int
_ioctl_ulong = _sys.ioctl_ulong
T = TypeVar("T")
FdT = TypeVar("FdT", bound="FdObject")


def raise_error(err: int, request: int, hint: Optional[str] = None) -> "KvmError":
    """Build the KvmError for *err* from *request* (returned, for ``raise``)."""
    name = ioctl_name(request)
    return KvmError(err, name, hint or hint_for(name, err))


def ioctl(fd: int, request: int, arg: Union[int, Any] = 0) -> int:
    """Issue ``ioctl(fd, request, arg)``; return its non-negative result.

    *arg* is an int (passed by value as an ``unsigned long``) or a writable
    buffer such as a ctypes structure, which the kernel reads and may fill in.
    """
    try:
        if isinstance(arg, int):
            if arg == 0:
                return _fcntl_ioctl(fd, request)  # no argument: fcntl's fast path, same syscall
            if 0 < arg <= _INT_MAX:
                return _ioctl_int(fd, request, arg)
            if arg < 0 or arg >= 2**64:
                raise ValueError(f"{ioctl_name(request)}: argument {arg} is not an unsigned 64-bit value")
            return _ioctl_ulong(fd, request, arg)
        return _fcntl_ioctl(fd, request, arg, True)
    except OSError as e:
        raise raise_error(e.errno, request) from None


def grow_on_e2big(attempt: Callable[[int], T], n: int, limit: int,
                  grow: Optional[Callable[[int], int]] = None) -> T:
    """Call ``attempt(n)`` with a growing *n* while it raises E2BIG.

    *attempt* builds a buffer for *n* entries, issues the ioctl and returns
    the decoded result.  On ``KvmError(E2BIG)`` *n* becomes ``grow(n)``
    (default: double) until it would pass *limit*; then the error is raised.
    """
    while True:
        try:
            return attempt(n)
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
            nxt = grow(n) if grow is not None else n * 2
            if nxt <= n or nxt > limit:
                raise
            n = nxt


class FdObject:
    """Base class of every object that owns a KVM fd.

    Behaves like a Python file: ``fileno()``, ``close()``, ``closed``, and
    ``with`` closes it.  Subclasses set ``_what`` (used in messages) and may
    override ``_close_children()`` to close what must go before the fd.
    """

    _what = "object"
    _fd: int = -1

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        """The fd number (raises if closed)."""
        if self._fd < 0:
            raise KvmClosedError(self._what, "fileno")
        return self._fd

    @property
    def closed(self) -> bool:
        """True once ``close()`` has run."""
        return self._fd < 0

    def _ioctl(self, request: int, arg: Union[int, Any] = 0) -> int:
        fd = self._fd
        if fd < 0:
            raise KvmClosedError(self._what, ioctl_name(request))
        return ioctl(fd, request, arg)

    def _close_children(self) -> None:
        pass

    def _after_close(self) -> None:
        pass

    def close(self) -> None:
        """Close the fd (and what this object owns). Calling it again does nothing.

        Order: ``_close_children()``, the fd, then ``_after_close()`` (which may
        release what the children could still reach, e.g. guest memory).  If a
        child fails to close, the fd is still closed but ``_after_close()`` is
        skipped and the error raised: what it would release stays alive until
        the garbage collector takes the objects, never while a child may use it.
        The fd number is given up exactly once, even if ``close(2)`` fails.
        """
        if self._fd < 0:
            return
        try:
            self._close_children()
        except BaseException:
            fd, self._fd = self._fd, -1
            os.close(fd)
            raise
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
        finally:
            self._after_close()

    def __enter__(self: FdT) -> FdT:
        if self._fd < 0:
            raise KvmClosedError(self._what, "__enter__")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _state(self) -> str:
        return "closed" if self._fd < 0 else f"fd={self._fd}"
