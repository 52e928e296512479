"""An owned eventfd (``EventFd``): the doorbell of irqfd and ioeventfd.

KVM signals and consumes plain Linux eventfds:

* ``Vm.register_irqfd(efd, gsi)``: writing to *efd* raises interrupt *gsi* in
  the guest, without any ``KVM_RUN`` round trip through user space;
* ``Vm.register_ioevent(efd, addr, ...)``: a guest write to *addr* increments
  *efd*'s counter inside the kernel instead of returning an exit;
* the *resample* fd of a level-triggered irqfd, which KVM signals when the
  guest acknowledges (EOIs) the interrupt.

``EventFd`` wraps ``os.eventfd`` with ``EFD_CLOEXEC`` (so no child process
inherits it) and, by default, ``EFD_NONBLOCK`` (so :meth:`EventFd.read` on
an unsignalled fd returns 0 instead of blocking).
"""

from __future__ import annotations

import os
import select
from typing import Protocol, TypeAlias

from .._check import U64 as _U64
from .._check import uint as _uint
from ..errors import KvmError
from ..fd import FdObject
from ..uapi import ioctls, structs
from ._state import VmState

__all__ = ["EventFd", "IoEvents", "fd_of"]


class EventFd(FdObject):
    """A Linux eventfd: a 64-bit counter that ``write`` adds to and ``read`` drains.

    *initval* is the starting counter.  With *semaphore* a read takes 1 from
    the counter instead of draining it.  With *nonblocking* (the default)
    :meth:`read` returns 0 when the counter is 0; otherwise it blocks.
    """

    _what = "eventfd"

    def __init__(self, initval: int = 0, *, semaphore: bool = False, nonblocking: bool = True) -> None:
        if isinstance(initval, bool) or not isinstance(initval, int):
            raise TypeError(f"initval must be an int, not {type(initval).__name__}")
        if not 0 <= initval <= 0xFFFFFFFF:
            raise ValueError(f"initval={initval} out of range [0, 2**32-1]")
        flags = os.EFD_CLOEXEC
        if semaphore:
            flags |= os.EFD_SEMAPHORE
        if nonblocking:
            flags |= os.EFD_NONBLOCK
        try:
            fd = os.eventfd(initval, flags)
        except OSError as e:
            raise KvmError(e.errno, "eventfd", "could not create an eventfd") from None
        super().__init__(fd)
        self.nonblocking = nonblocking

    def __repr__(self) -> str:
        return f"<EventFd {self._state()}>"

    def write(self, value: int = 1) -> None:
        """Add *value* (1 .. 2**64-2) to the counter: what KVM's irqfd waits for."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"value must be an int, not {type(value).__name__}")
        if not 0 < value < 2**64 - 1:
            raise ValueError(f"value={value} out of range [1, 2**64-2]")
        fd = self.fileno()  # KvmClosedError when closed, before any syscall
        try:
            os.eventfd_write(fd, value)
        except OSError as e:
            raise KvmError(e.errno, "eventfd write") from None

    def read(self) -> int:
        """Take the counter (or 1 of it in semaphore mode) and reset it.

        Returns 0 when the counter is 0 and the fd is non-blocking; a blocking
        fd waits for a write instead.
        """
        fd = self.fileno()  # KvmClosedError when closed, before any syscall
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0
        except OSError as e:
            raise KvmError(e.errno, "eventfd read") from None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the counter is non-zero (readable); False on timeout.

        Does not consume the counter.  *timeout* is in seconds, ``None`` waits
        for ever.
        """
        p = select.poll()
        p.register(self.fileno(), select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        while True:
            try:
                return bool(p.poll(ms))
            except InterruptedError:  # pragma: no cover - PEP 475 retries already
                continue

    @property
    def is_set(self) -> bool:
        """True if the counter is non-zero right now (a ``poll`` with no wait)."""
        return self.wait(0)


class HasFileno(Protocol):
    """Anything with a ``fileno()`` method (a pykvm fd object, a file, a socket)."""

    def fileno(self) -> int: ...


#: What takes an fd: an fd number or an object with ``fileno()``.
FdLike: TypeAlias = "int | HasFileno"


def fd_of(obj: int | FdObject | object, what: str = "fd") -> int:
    """The fd number of *obj*: an int, or anything with ``fileno()``.

    Raises ``TypeError`` for anything else, ``ValueError`` for a negative fd,
    :class:`~pykvm.errors.KvmClosedError` for a closed pykvm object.
    """
    if isinstance(obj, bool):
        raise TypeError(f"{what} must be an fd number or an object with fileno(), not bool")
    if isinstance(obj, int):
        fd = obj
    elif hasattr(obj, "fileno"):
        fd = obj.fileno()  # raises KvmClosedError for closed FdObjects
    else:
        raise TypeError(f"{what} must be an fd number or an object with fileno(), not {type(obj).__name__}")
    if not 0 <= fd <= 0x7FFFFFFF:
        raise ValueError(f"{what}={fd} is not a valid fd number")
    return fd



class IoEvents(VmState):
    """The ioeventfd ioctls of :class:`~pykvm.vm.Vm` (mixed into it)."""

    # -- ioeventfd and coalesced I/O -------------------------------------------------------
    @staticmethod
    def _ioeventfd(fd: FdLike, addr: int, length: int, datamatch: int | None, pio: bool,
                   deassign: bool) -> structs.kvm_ioeventfd:
        _uint("addr", addr, 0xFFFF if pio else _U64)
        if length not in (0, 1, 2, 4, 8):
            raise ValueError(f"length={length!r}: expected 0 (any), 1, 2, 4 or 8")
        if pio and length == 8:
            raise ValueError("port I/O is at most 4 bytes wide")
        flags = structs.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if deassign:
            flags |= structs.KVM_IOEVENTFD_FLAG_DEASSIGN
        dm = 0
        if datamatch is not None:
            if length == 0:
                raise ValueError("datamatch needs a length (1, 2, 4 or 8)")
            dm = _uint("datamatch", datamatch, (1 << (8 * length)) - 1)
            flags |= structs.KVM_IOEVENTFD_FLAG_DATAMATCH
        return structs.kvm_ioeventfd(datamatch=dm, addr=addr, len=length, fd=fd_of(fd, "fd"), flags=flags)

    def register_ioevent(self, fd: FdLike, addr: int, *, length: int = 0, datamatch: int | None = None,
                         pio: bool = False) -> None:
        """``KVM_IOEVENTFD``: a guest write to *addr* signals eventfd *fd* instead of exiting.

        *pio* selects port I/O (else MMIO).  *length* is the write width to
        match (1, 2, 4, 8; 0 matches any width, ``KVM_CAP_IOEVENTFD_ANY_LENGTH``).
        With *datamatch* only writes of exactly that value signal; others exit
        to user space as usual.  The guest does not see the write's effect
        beyond that (reads of *addr* still exit).
        """
        self._ioctl(ioctls.KVM_IOEVENTFD, self._ioeventfd(fd, addr, length, datamatch, pio, False))

    def unregister_ioevent(self, fd: FdLike, addr: int, *, length: int = 0, datamatch: int | None = None,
                           pio: bool = False) -> None:
        """``KVM_IOEVENTFD`` with ``DEASSIGN``: remove the matching ioeventfd (same arguments)."""
        self._ioctl(ioctls.KVM_IOEVENTFD, self._ioeventfd(fd, addr, length, datamatch, pio, True))

