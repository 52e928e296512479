"""guest_memfd: the fd from ``KVM_CREATE_GUEST_MEMFD`` (``GuestMemfd``).

``Vm.create_guest_memfd(size, flags)`` (``KVM_CREATE_GUEST_MEMFD``) returns
a file of guest memory that KVM allocates and that need not be mapped into
user space.  A slot set with ``KVM_SET_USER_MEMORY_REGION2`` and
``KVM_MEM_GUEST_MEMFD`` takes its *private* memory from ``guest_memfd`` at
``guest_memfd_offset``, and its *shared* memory from ``userspace_addr``.

On a VM without ``KVM_CAP_MEMORY_ATTRIBUTES`` every page is shared.  Since
Linux 6.18 a guest_memfd created with ``GUEST_MEMFD_FLAG_MMAP |
GUEST_MEMFD_FLAG_INIT_SHARED`` (see ``KVM_CAP_GUEST_MEMFD_FLAGS``) can be
``mmap``-ed and then backs the slot's shared memory itself: host and guest
see the same pages.  Without ``INIT_SHARED`` its pages start private and a
host access through the mapping faults (SIGBUS).

KVM does not create the guest_memfd with ``O_CLOEXEC``; pykvm sets
``FD_CLOEXEC`` right after the ioctl returns.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os

from . import _sys
from .fd import FdObject
from .errors import KvmError
from .uapi import structs as S

__all__ = ["GuestMemfd", "set_cloexec", "GUEST_MEMFD_FLAG_MMAP", "GUEST_MEMFD_FLAG_INIT_SHARED"]

GUEST_MEMFD_FLAG_MMAP = S.GUEST_MEMFD_FLAG_MMAP
GUEST_MEMFD_FLAG_INIT_SHARED = S.GUEST_MEMFD_FLAG_INIT_SHARED


def set_cloexec(fd: int) -> None:
    """Set ``FD_CLOEXEC`` on *fd* (for fds the kernel hands out without it)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)


class GuestMemfd(FdObject):
    """A guest_memfd: ``size`` bytes of KVM-managed guest memory, ``flags`` ``GUEST_MEMFD_FLAG_*``.

    Create with :meth:`Vm.create_guest_memfd <pykvm.vm.Vm.create_guest_memfd>`;
    pass it as ``guest_memfd=`` to ``Vm.set_user_memory_region2``.  The file
    keeps its memory while open, even after the VM closes.
    """

    _what = "guest_memfd"

    def __init__(self, fd: int, size: int, flags: int, vm=None) -> None:
        super().__init__(fd)
        try:
            set_cloexec(fd)
        except OSError as e:  # pragma: no cover - fcntl on a valid fd does not fail
            self.close()
            raise KvmError(e.errno, "fcntl(F_SETFD)", "could not set FD_CLOEXEC on the guest_memfd") from None
        self.size = size
        self.flags = flags
        self.vm = vm

    def __repr__(self) -> str:
        return f"<GuestMemfd {self._state()} size={self.size:#x} flags={self.flags:#x}>"

    def mmap(self, length: int = 0, offset: int = 0) -> mmap.mmap:
        """Map the file (needs ``GUEST_MEMFD_FLAG_MMAP``) shared, read/write.

        *length* 0 maps from *offset* to the end.  Only pages that are shared
        (``GUEST_MEMFD_FLAG_INIT_SHARED``, or no memory attributes) may be
        touched; a private page raises SIGBUS in the process.
        """
        if not self.flags & GUEST_MEMFD_FLAG_MMAP:
            raise ValueError("this guest_memfd was created without GUEST_MEMFD_FLAG_MMAP")
        if length == 0:
            length = self.size - offset
        fd = self.fileno()  # KvmClosedError when closed, before any syscall
        try:
            return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=offset)
        except OSError as e:
            raise KvmError(e.errno, "mmap(guest_memfd)") from None

    def punch_hole(self, offset: int, length: int) -> None:
        """Free the memory of ``[offset, offset+length)`` (``fallocate(PUNCH_HOLE)``)."""
        falloc = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
        fd = self.fileno()  # raises KvmClosedError before any syscall
        for name, v in (("offset", offset), ("length", length)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
                raise ValueError(f"{name}={v!r} is not a non-negative int")
        try:
            _sys.fallocate(fd, falloc, offset, length)
        except OSError as e:
            raise KvmError(e.errno, "fallocate(guest_memfd)") from None

