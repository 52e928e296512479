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
* :class:`SingleOwner` refuses ``copy.copy``, ``copy.deepcopy`` and ``pickle``
  for every object that owns an fd or a mapping: a second Python object
  holding the same fd number or address would close or unmap it behind the
  first one's back (and a guest could then write into whatever the host maps
  there next).
* :class:`Capabilities` (``KVM_CHECK_EXTENSION`` / ``KVM_ENABLE_CAP``) and
  :class:`DeviceAttrs` (``KVM_{HAS,GET,SET}_DEVICE_ATTR``) are written once
  and mixed into every fd kind that takes them (system, VM, vCPU, device).
* After ``fork()`` every live :class:`FdObject` in the child becomes inert:
  its ioctls raise :class:`~pykvm.errors.KvmInheritedError` ("inherited across
  fork()"), and ``close()`` closes only the fd number the child inherited,
  without waiting for anything and without touching a mapping the parent uses.
  (KVM itself refuses a VM's ioctls from another process with EIO.)
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from . import _sys
from ._check import U32, U64, uint
from .errors import KvmClosedError, KvmError, KvmInheritedError, hint_for
from .uapi import ioctls as _ioctls
from .uapi import structs as _structs
from .uapi.ioctls import ioctl_name

__all__ = [
    "Capabilities",
    "DeviceAttrs",
    "FdObject",
    "SingleOwner",
    "grow_on_e2big",
    "ioctl",
    "live_objects",
    "raise_error",
]

_fcntl_ioctl = fcntl.ioctl
_INT_MAX = 2**31 - 1
_ioctl_int = _sys.ioctl_int
_ioctl_ulong = _sys.ioctl_ulong
T = TypeVar("T")
FdT = TypeVar("FdT", bound="FdObject")


def raise_error(err: int | None, request: int, hint: str | None = None) -> KvmError:
    """Build the KvmError for *err* from *request* (returned, for ``raise``)."""
    name = ioctl_name(request)
    return KvmError(err, name, hint or hint_for(name, err))


def ioctl(fd: int, request: int, arg: int | Any = 0) -> int:
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
        ret: int = _fcntl_ioctl(fd, request, arg, True)
        return ret
    except OSError as e:
        raise raise_error(e.errno, request) from None


def grow_on_e2big(attempt: Callable[[int], T], n: int, limit: int,
                  grow: Callable[[int], int] | None = None) -> T:
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


class SingleOwner:
    """Refuses copies: an fd or a mapping has exactly one owning Python object.

    ``copy.copy``, ``copy.deepcopy`` and ``pickle`` raise ``TypeError``.  A
    shallow copy of a VM would share its fd number and its guest memory; when
    the copy was closed (or garbage-collected) it would unmap memory that the
    original's vCPUs still run on.
    """

    __slots__ = ()

    def _refuse_copy(self, *args: object) -> Any:
        raise TypeError(f"{type(self).__name__} owns a file descriptor or a mapping and cannot be "
                        f"copied or pickled; share the object itself instead")

    __copy__ = _refuse_copy
    __deepcopy__ = _refuse_copy
    __reduce__ = _refuse_copy
    __reduce_ex__ = _refuse_copy


_LIVE: weakref.WeakSet[FdObject] = weakref.WeakSet()


def live_objects() -> tuple[FdObject, ...]:
    """The fd objects of this process that are open now (a snapshot, for diagnostics)."""
    return tuple(o for o in list(_LIVE) if not o.closed)


def _after_fork_in_child() -> None:
    # Runs in the child right after fork(), with only the forking thread alive.
    for obj in list(_LIVE):
        try:
            obj._mark_inherited()
        except Exception:  # pragma: no cover - one broken object must not break the others
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)


class FdObject(SingleOwner):
    """Base class of every object that owns a KVM fd.

    Behaves like a Python file: ``fileno()``, ``close()``, ``closed``, and
    ``with`` closes it.  Subclasses set ``_what`` (used in messages) and may
    override ``_close_children()`` to close what must go before the fd,
    ``_after_fork_in_child()`` to drop state the child must not use (called
    once in a forked child), and ``_close_inherited()`` to close the fds of
    what they own in such a child.  Cannot be copied or pickled.
    """

    _what = "object"
    # Class defaults, so that a half-built object closes cleanly.
    _fd: int = -1
    _inherited_fd: int = -1

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._inherited_fd = -1
        _LIVE.add(self)

    def _closed_error(self, what: str) -> KvmClosedError:
        if self._inherited_fd >= 0:
            return KvmInheritedError(self._what, what)
        return KvmClosedError(self._what, what)

    def fileno(self) -> int:
        """The fd number (raises if closed, or inherited across ``fork()``)."""
        if self._fd < 0:
            raise self._closed_error("fileno")
        return self._fd

    @property
    def closed(self) -> bool:
        """True once ``close()`` has run (an object inherited across fork() is open until closed)."""
        return self._fd < 0 and self._inherited_fd < 0

    @property
    def inherited(self) -> bool:
        """True in a forked child for an object the parent opened and the child has not closed."""
        return self._inherited_fd >= 0

    def _ioctl(self, request: int, arg: int | Any = 0) -> int:
        fd = self._fd
        if fd < 0:
            raise self._closed_error(ioctl_name(request))
        return ioctl(fd, request, arg)

    def _mark_inherited(self) -> None:
        fd = self._fd
        if fd >= 0:
            self._inherited_fd, self._fd = fd, -1
            self._after_fork_in_child()

    def _after_fork_in_child(self) -> None:
        """Called once in a forked child (the object is already inert)."""

    def _close_inherited(self) -> None:
        """In a forked child: close the fds of owned objects (never wait, never unmap the parent's)."""

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
            fd = self._inherited_fd
            if fd >= 0:  # a forked child: give up the inherited number only
                self._inherited_fd = -1
                try:
                    self._close_inherited()
                finally:
                    os.close(fd)
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
            raise self._closed_error("__enter__")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _state(self) -> str:
        if self._fd < 0:
            return "inherited across fork()" if self.inherited else "closed"
        return f"fd={self._fd}"



_KVM_CHECK_EXTENSION = _ioctls.KVM_CHECK_EXTENSION
_KVM_ENABLE_CAP = _ioctls.KVM_ENABLE_CAP


class CheckExtension:
    """``KVM_CHECK_EXTENSION``, for the system fd and VM fds (mixed into an :class:`FdObject`)."""

    __slots__ = ()
    _fd: int
    _closed_error: Callable[[str], KvmClosedError]

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 if *cap* is absent, else a cap-specific value.

        On a VM fd the answer may differ from the system fd's (it then
        describes that VM, e.g. its type).  *cap* is a ``Cap`` or an int in
        ``[0, 2**32)``.
        """
        # The argument check is inlined for plain ints and Cap members: this is
        # the cheapest ioctl there is, so a function call would double its cost.
        if (cap.__class__ is int or cap.__class__ is _Cap) and 0 <= cap <= U32:
            pass
        else:
            cap = uint("cap", cap, U32)
        fd = self._fd
        if fd < 0:
            raise self._closed_error("KVM_CHECK_EXTENSION")
        try:
            if cap:
                return _ioctl_int(fd, _KVM_CHECK_EXTENSION, cap)
            return _fcntl_ioctl(fd, _KVM_CHECK_EXTENSION)
        except OSError as e:
            raise raise_error(e.errno, _KVM_CHECK_EXTENSION) from None


class EnableCap:
    """``KVM_ENABLE_CAP``, for VM and vCPU fds (mixed into an :class:`FdObject`)."""

    __slots__ = ()
    _ioctl: Callable[..., int]

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP``: turn on *cap* with up to four 64-bit arguments.

        KVM answers EINVAL for a capability this fd kind cannot enable, bad
        arguments, or one enabled too late (e.g. after vCPUs exist).
        """
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
        ec = _structs.kvm_enable_cap(cap=uint("cap", cap, U32), flags=uint("flags", flags, U32))
        for i, a in enumerate(args):
            ec.args[i] = uint(f"args[{i}]", a)
        self._ioctl(_KVM_ENABLE_CAP, ec)


class Capabilities(CheckExtension, EnableCap):
    """Both capability ioctls (the VM fd takes both)."""

    __slots__ = ()


# -- device attributes ---------------------------------------------------------------
#: The smallest buffer handed to KVM for an attribute value.  Every x86 attribute
#: (TSC offset, system attributes, VFIO's fd) is at most a __u64, and KVM copies
#: the attribute's own size from/to ``addr`` whatever the caller passed: a
#: shorter buffer would let KVM read host heap bytes into the device (and on to
#: a guest) or write past the caller's object.
ATTR_MIN_SIZE = 8


class DeviceAttrs:
    """``KVM_{HAS,SET,GET}_DEVICE_ATTR``, shared by every fd kind that has attributes.

    Device fds, vCPU fds (``KVM_CAP_VCPU_ATTRIBUTES``: TSC control on x86) and
    the system fd (``KVM_CAP_SYS_ATTRIBUTES``) take the same ``kvm_device_attr``;
    the meaning of *(group, attr)* depends on the fd.  Values shorter than
    :data:`ATTR_MIN_SIZE` bytes are passed in a zero-padded buffer of that
    size, so KVM never reads or writes outside pykvm's buffer.
    """

    __slots__ = ()
    _ioctl: Callable[..., int]
    #: errnos for which ``has_device_attr`` answers False instead of raising
    _ATTR_ABSENT: ClassVar[tuple[int, ...]] = (errno.ENXIO,)

    @staticmethod
    def _attr(group: int, attr: int, addr: int = 0, flags: int = 0) -> _structs.kvm_device_attr:
        return _structs.kvm_device_attr(flags=uint("flags", flags, U32), group=uint("group", group, U32),
                                        attr=uint("attr", attr, U64), addr=addr)

    def has_device_attr(self, group: int, attr: int) -> bool:
        """``KVM_HAS_DEVICE_ATTR``: does the fd know attribute *(group, attr)*?

        KVM answers 0 (yes) or ENXIO (no); any other error is raised.
        """
        try:
            self._ioctl(_ioctls.KVM_HAS_DEVICE_ATTR, self._attr(group, attr))
            return True
        except KvmError as e:
            if e.errno in self._ATTR_ABSENT:
                return False
            raise

    def set_device_attr(self, group: int, attr: int, value: Any = None, *, flags: int = 0) -> None:
        """``KVM_SET_DEVICE_ATTR``: write attribute *(group, attr)*.

        *value* is what ``addr`` points to: an int is passed as a ``__u64``,
        ``bytes``/``bytearray``/ctypes objects by content (zero-padded to
        :data:`ATTR_MIN_SIZE`; e.g. ``ctypes.c_int32(fd)`` for
        ``KVM_DEV_VFIO_FILE_ADD``), ``None`` passes ``addr = 0``.  KVM refuses
        with ENXIO an attribute the fd does not know, EPERM one it cannot set.
        """
        buf = _attr_in(value)
        addr = 0 if buf is None else ctypes.addressof(buf)
        self._ioctl(_ioctls.KVM_SET_DEVICE_ATTR, self._attr(group, attr, addr, flags))

    def get_device_attr(self, group: int, attr: int, value: Any = None, *, flags: int = 0) -> Any:
        """``KVM_GET_DEVICE_ATTR``: read attribute *(group, attr)*.

        KVM writes the value to ``addr``: by default into a ``__u64`` whose
        value is returned as an int; pass a ctypes object or ``bytearray`` of
        the attribute's size (at least :data:`ATTR_MIN_SIZE` bytes) to get it
        filled and returned instead.  Devices without a read accessor (VFIO)
        answer EPERM, unknown attributes ENXIO.
        """
        if value is None:
            out = ctypes.c_uint64()
            self._ioctl(_ioctls.KVM_GET_DEVICE_ATTR, self._attr(group, attr, ctypes.addressof(out), flags))
            return out.value
        if isinstance(value, bytearray):
            if len(value) < ATTR_MIN_SIZE:
                raise ValueError(f"get_device_attr needs a buffer of at least {ATTR_MIN_SIZE} bytes, "
                                 f"got {len(value)}")
            holder = (ctypes.c_char * len(value)).from_buffer(value)
            try:
                self._ioctl(_ioctls.KVM_GET_DEVICE_ATTR,
                            self._attr(group, attr, ctypes.addressof(holder), flags))
            finally:
                del holder
            return value
        if isinstance(value, (ctypes._SimpleCData, ctypes.Structure, ctypes.Union, ctypes.Array)):
            if ctypes.sizeof(value) < ATTR_MIN_SIZE:
                raise ValueError(f"get_device_attr needs a buffer of at least {ATTR_MIN_SIZE} bytes, "
                                 f"got a {ctypes.sizeof(value)}-byte {type(value).__name__}")
            self._ioctl(_ioctls.KVM_GET_DEVICE_ATTR, self._attr(group, attr, ctypes.addressof(value), flags))
            return value
        raise TypeError("get_device_attr needs a writable buffer (ctypes object or bytearray), not "
                        f"{type(value).__name__}")


def _attr_in(value: Any) -> ctypes.Array[ctypes.c_char] | None:
    """A private, zero-padded copy of an attribute value for KVM to read (None for no value)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("attribute value must be an int, bytes or a ctypes object, not bool")
    if isinstance(value, int):
        data = uint("value", value, U64).to_bytes(8, "little")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, (ctypes._SimpleCData, ctypes.Structure, ctypes.Union, ctypes.Array)):
        data = ctypes.string_at(ctypes.addressof(value), ctypes.sizeof(value))
    else:
        raise TypeError(f"attribute value must be an int, bytes, bytearray or a ctypes object, "
                        f"not {type(value).__name__}")
    return ctypes.create_string_buffer(data, max(len(data), ATTR_MIN_SIZE))


from .uapi.enums import Cap as _Cap  # noqa: E402  (uapi is below fd: no cycle)
