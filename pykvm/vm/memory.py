"""Guest memory: anonymous host mappings registered with a VM as memslots.

A :class:`GuestMemory` *is* an ``mmap.mmap`` (so ``memoryview(mem)`` is a
zero-copy view of guest RAM) that knows its slot and guest physical address.
The owning :class:`~pykvm.vm.Vm` keeps it alive while it is registered; it is
unmapped only after KVM was told to drop the slot (``Vm.remove_memory``) or
after every fd that could reach it was closed (``Vm.close``).  While a
``memoryview`` of it is alive, Python refuses to unmap it (``BufferError``),
and pykvm then leaves the unmapping to the garbage collector.

The ``mmap`` methods that would unmap or move a registered region behind
KVM's back are guarded: ``close()`` refuses, ``resize()`` always refuses, and
leaving a ``with`` block removes the region from its VM before unmapping it.
(Calling the base class directly, ``mmap.mmap.close(mem)``, is not guarded.)

guest_memfd (``GuestMemfd``)
----------------------------
guest_memfd: the fd from ``KVM_CREATE_GUEST_MEMFD`` (``GuestMemfd``).

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

The VM-side wrappers (``set_user_memory_region[2]``, ``add_memory``,
``create_guest_memfd``, ...) are the :class:`MemorySlots` part of
:class:`~pykvm.vm.Vm`; this module keeps the slot table that ``add_memory``,
the dirty log and ``remove_memory`` consult.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .. import _sys
from .._check import U32 as _U32
from .._check import uint as _uint
from ..errors import KvmError
from ..fd import FdObject, SingleOwner, raise_error
from ..uapi import ioctls, structs
from ..uapi.enums import Cap
from ._state import VmState
from .eventfd import fd_of

if TYPE_CHECKING:  # pragma: no cover
    from _typeshed import ReadableBuffer

_fcntl_ioctl = fcntl.ioctl
_KVM_SET_USER_MEMORY_REGION = ioctls.KVM_SET_USER_MEMORY_REGION

__all__ = [
    "GUEST_MEMFD_FLAG_INIT_SHARED",
    "GUEST_MEMFD_FLAG_MMAP",
    "PAGE_SIZE",
    "GuestMemfd",
    "GuestMemory",
    "MemorySlots",
    "set_cloexec",
]

PAGE_SIZE = mmap.PAGESIZE


class GuestMemory(SingleOwner, mmap.mmap):
    """One memslot's worth of guest RAM.

    Attributes: ``slot``, ``guest_phys_addr``, ``size``, ``userspace_addr``,
    ``flags`` (``KVM_MEM_*``).  Offsets in :meth:`read` / :meth:`write` are
    relative to the start of the region (guest address ``guest_phys_addr``).

    Note that ``read``/``write`` take an explicit offset, unlike
    ``mmap.mmap``'s file-like methods.
    """

    slot: int = -1
    guest_phys_addr: int = 0
    # An int, where mmap has a size() method: guest memory has one fixed size.
    size: int = 0  # type: ignore[assignment]
    userspace_addr: int = 0
    flags: int = 0
    _vm: MemorySlots | None = None

    @classmethod
    def _anonymous(cls, size: int) -> GuestMemory:
        try:
            mem = cls(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OverflowError:  # larger than the address space: not a host OOM
            raise ValueError(f"guest memory size {size:#x} is too large to map") from None
        anchor = ctypes.c_char.from_buffer(mem)
        mem.userspace_addr = ctypes.addressof(anchor)
        del anchor  # release the export so the map can be closed later
        mem.size = size
        mem.slot = -1
        mem.guest_phys_addr = 0
        mem.flags = 0
        mem._vm = None
        return mem

    @property
    def registered(self) -> bool:
        """True while the region is a memslot of a live VM."""
        return self._vm is not None

    def _check(self, offset: int, n: int) -> None:
        for name, v in (("offset", offset), ("length", n)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, not {type(v).__name__}")
        if offset < 0 or n < 0 or offset + n > self.size:
            raise ValueError(
                f"range [{offset:#x}, {offset + n:#x}) outside the region of size {self.size:#x}")

    def read(self, offset: int, n: int) -> bytes:  # type: ignore[override]
        """Copy *n* bytes at *offset* (relative to the region) out of guest RAM."""
        self._check(offset, n)
        return self[offset:offset + n]

    def write(self, offset: int, data: ReadableBuffer) -> None:  # type: ignore[override]
        """Copy *data* (any bytes-like) into guest RAM at *offset*."""
        data = memoryview(data).cast("B")
        self._check(offset, len(data))
        self[offset:offset + len(data)] = data

    def contains(self, gpa: int, n: int = 1) -> bool:
        """True if guest range ``[gpa, gpa+n)`` lies inside this region."""
        for name, v in (("gpa", gpa), ("n", n)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, not {type(v).__name__}")
            if v < 0:
                raise ValueError(f"{name}={v} must not be negative")
        return self.guest_phys_addr <= gpa and gpa + n <= self.guest_phys_addr + self.size

    def __repr__(self) -> str:
        if self.closed:
            return "<GuestMemory unmapped>"
        return (f"<GuestMemory slot={self.slot} gpa={self.guest_phys_addr:#x} "
                f"size={self.size:#x} flags={self.flags:#x}>")

    def _unmap(self) -> str | None:
        """Unmap now if no buffer export is alive; else leave it to the GC."""
        self._vm = None
        try:
            mmap.mmap.close(self)
            return None
        except BufferError as e:  # a memoryview still points into it
            return str(e)

    def close(self) -> None:
        """Refused while registered: use ``Vm.remove_memory(mem)``."""
        if self._vm is not None:
            raise ValueError("guest memory is registered with a VM: use vm.remove_memory(mem)")
        mmap.mmap.close(self)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        # mmap's own __exit__ unmaps without asking close(): that would pull the
        # memory out from under a live memslot (KVM would then read and write
        # whatever the host maps at that address next).  Remove the slot first.
        vm = self._vm
        if vm is not None:
            vm.remove_memory(self)
        elif not self.closed:
            mmap.mmap.close(self)

    def resize(self, newsize: int) -> None:
        """Refused: a memslot's size is fixed (resizing could move or shrink the mapping)."""
        raise ValueError("guest memory cannot be resized: remove it and add a new region")


GUEST_MEMFD_FLAG_MMAP = structs.GUEST_MEMFD_FLAG_MMAP
GUEST_MEMFD_FLAG_INIT_SHARED = structs.GUEST_MEMFD_FLAG_INIT_SHARED


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

    def __init__(self, fd: int, size: int, flags: int, vm: MemorySlots | None = None) -> None:
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



class MemorySlots(VmState):
    """The memory-slot ioctls of :class:`~pykvm.vm.Vm` (mixed into it)."""

    _fd: int
    _slots: dict[int, tuple[int, int, int, int]]
    _regions: dict[int, structs.kvm_userspace_memory_region]
    _memory: dict[int, GuestMemory]
    _parked: list[GuestMemory]
    _max_slots: int | None

    # -- memory -----------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION``: map host memory at *userspace_addr* into the guest.

        A *memory_size* of 0 deletes the slot.  This is the raw call: the
        caller keeps ``[userspace_addr, userspace_addr + memory_size)`` mapped
        while the slot exists (KVM reads and writes whatever is mapped there,
        even memory later reused by something else).  :meth:`add_memory`
        allocates, registers and keeps the mapping alive for you.
        """
        # Fast path: the same slot with the same plain-int arguments as last time
        # (KVM answers at once when nothing changes): reuse the checked struct.
        key = (guest_phys_addr, memory_size, userspace_addr, flags)
        region = self._regions.get(slot) if slot.__class__ is int else None
        if (region is not None and self._slots.get(slot) == key and int is guest_phys_addr.__class__
                is memory_size.__class__ is userspace_addr.__class__ is flags.__class__):
            fd = self._fd
            if fd < 0:
                raise self._closed_error("KVM_SET_USER_MEMORY_REGION")
            try:
                _fcntl_ioctl(fd, _KVM_SET_USER_MEMORY_REGION, region, True)
            except OSError as e:
                raise raise_error(e.errno, _KVM_SET_USER_MEMORY_REGION) from None
            return
        region = structs.kvm_userspace_memory_region(
            slot=_uint("slot", slot, _U32), flags=_uint("flags", flags, _U32),
            guest_phys_addr=_uint("guest_phys_addr", guest_phys_addr),
            memory_size=_uint("memory_size", memory_size),
            userspace_addr=_uint("userspace_addr", userspace_addr))
        self._ioctl(_KVM_SET_USER_MEMORY_REGION, region)
        if memory_size:
            self._slots[slot] = key
            self._regions[slot] = region
        else:
            self._slots.pop(slot, None)
            self._regions.pop(slot, None)

    def set_user_memory_region2(self, slot: int, guest_phys_addr: int, memory_size: int,
                                userspace_addr: int, flags: int = 0, *,
                                guest_memfd: GuestMemfd | int | None = None,
                                guest_memfd_offset: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION2``: like :meth:`set_user_memory_region`, plus guest_memfd.

        *flags* are ``KVM_MEM_LOG_DIRTY_PAGES`` (track writes for
        :meth:`get_dirty_log` and the dirty ring), ``KVM_MEM_READONLY`` (guest
        writes become ``MmioWrite`` exits, reads see the memory) and
        ``KVM_MEM_GUEST_MEMFD``, which needs *guest_memfd* (a
        :class:`~pykvm.gmem.GuestMemfd` or fd) and takes private memory from it
        at *guest_memfd_offset*.  Passing *guest_memfd* sets that flag for you.
        Needs ``KVM_CAP_USER_MEMORY2``.
        """
        gfd = 0
        if guest_memfd is not None:
            gfd = fd_of(guest_memfd, "guest_memfd")
            flags |= structs.KVM_MEM_GUEST_MEMFD
        elif flags & structs.KVM_MEM_GUEST_MEMFD and memory_size:
            raise ValueError("KVM_MEM_GUEST_MEMFD needs guest_memfd=")
        region = structs.kvm_userspace_memory_region2(
            slot=_uint("slot", slot, _U32), flags=_uint("flags", flags, _U32),
            guest_phys_addr=_uint("guest_phys_addr", guest_phys_addr),
            memory_size=_uint("memory_size", memory_size),
            userspace_addr=_uint("userspace_addr", userspace_addr),
            guest_memfd_offset=_uint("guest_memfd_offset", guest_memfd_offset),
            guest_memfd=gfd)
        self._ioctl(ioctls.KVM_SET_USER_MEMORY_REGION2, region)
        self._regions.pop(slot, None)
        if memory_size:
            self._slots[slot] = (guest_phys_addr, memory_size, userspace_addr, flags)
        else:
            self._slots.pop(slot, None)

    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD``: a file of *size* bytes of guest memory managed by KVM.

        *flags*: ``GUEST_MEMFD_FLAG_MMAP`` (the file can be ``mmap``-ed) and
        ``GUEST_MEMFD_FLAG_INIT_SHARED`` (its pages start shared, so host and
        guest can both touch them); ``KVM_CAP_GUEST_MEMFD_FLAGS`` lists those the
        host accepts.  *size* must be a multiple of the page size.  The fd is
        made close-on-exec and is closed with the VM unless closed before.
        """
        _uint("size", size)
        if size == 0 or size % PAGE_SIZE:
            raise ValueError(f"guest_memfd size {size:#x} must be a non-zero multiple of {PAGE_SIZE:#x}")
        arg = structs.kvm_create_guest_memfd(size=size, flags=_uint("flags", flags))
        fd = self._ioctl(ioctls.KVM_CREATE_GUEST_MEMFD, arg)
        g = GuestMemfd(fd, size, flags, self)
        self._children.add(g)
        return g

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES``: set attributes of guest range ``[address, address+size)``.

        The only attribute is ``KVM_MEMORY_ATTRIBUTE_PRIVATE`` (the range's
        memory comes from the slot's guest_memfd).  ``KVM_CAP_MEMORY_ATTRIBUTES``
        (on the VM fd) returns the attributes this VM supports: none on a
        default x86 VM (KVM answers ENOTTY or EINVAL); software-protected and
        confidential VM types support ``PRIVATE``.
        """
        arg = structs.kvm_memory_attributes(address=_uint("address", address), size=_uint("size", size),
                                      attributes=_uint("attributes", attributes), flags=_uint("flags", flags))
        self._ioctl(ioctls.KVM_SET_MEMORY_ATTRIBUTES, arg)

    @property
    def max_memslots(self) -> int:
        """Usable slot numbers per address space (``KVM_CAP_NR_MEMSLOTS``)."""
        if self._max_slots is None:
            self._max_slots = self.check_extension(Cap.NR_MEMSLOTS) or 32
        return self._max_slots

    @property
    def memslots(self) -> dict[int, tuple[int, int, int, int]]:
        """Every registered memory slot: ``{slot: (guest_phys_addr, size, userspace_addr, flags)}``.

        A copy of pykvm's table of what it told KVM (``add_memory`` and
        ``set_user_memory_region``); KVM has no ioctl to read its own back.
        """
        if self._fd < 0:
            raise self._closed_error("memslots")
        return dict(self._slots)

    def _free_slot(self) -> int:
        for slot in range(self.max_memslots):
            if slot not in self._slots:
                return slot
        raise KvmError(errno.ENOSPC, "KVM_SET_USER_MEMORY_REGION",
                       f"all {self.max_memslots} memory slots are in use")

    def add_memory(self, guest_phys_addr: int, size: int, *, flags: int = 0,
                   slot: int | None = None) -> GuestMemory:
        """Allocate *size* bytes of anonymous memory and map it at *guest_phys_addr*.

        Uses the lowest free slot unless *slot* is given.  The returned
        :class:`~pykvm.memory.GuestMemory` stays mapped while registered.
        """
        _uint("guest_phys_addr", guest_phys_addr)
        _uint("size", size)
        if size == 0 or size % PAGE_SIZE or guest_phys_addr % PAGE_SIZE:
            raise ValueError(f"guest_phys_addr ({guest_phys_addr:#x}) and size ({size:#x}) must be "
                             f"non-zero multiples of the page size ({PAGE_SIZE:#x})")
        for s, (gpa, sz, _, _) in self._slots.items():
            if guest_phys_addr < gpa + sz and gpa < guest_phys_addr + size:
                raise KvmError(errno.EEXIST, "KVM_SET_USER_MEMORY_REGION",
                               f"[{guest_phys_addr:#x}, {guest_phys_addr + size:#x}) overlaps slot {s} "
                               f"at [{gpa:#x}, {gpa + sz:#x})")
        if slot is None:
            slot = self._free_slot()
        elif slot in self._slots:
            raise KvmError(errno.EEXIST, "KVM_SET_USER_MEMORY_REGION", f"slot {slot} is in use")
        try:
            mem = GuestMemory._anonymous(size)
        except OSError as e:
            raise KvmError(e.errno, "mmap", f"could not allocate {size:#x} bytes of guest memory") from None
        try:
            self.set_user_memory_region(slot, guest_phys_addr, size, mem.userspace_addr, flags)
        except BaseException:
            mem._unmap()
            raise
        mem.slot, mem.guest_phys_addr, mem.flags, mem._vm = slot, guest_phys_addr, flags, self
        self._memory[slot] = mem
        return mem

    def remove_memory(self, mem: GuestMemory) -> None:
        """Delete *mem*'s slot from the VM, then unmap it.

        If another slot (registered with the raw :meth:`set_user_memory_region`)
        still points into *mem*'s host range, the mapping is kept until the VM
        closes: unmapping it would let the guest write into whatever the host
        maps at that address next.
        """
        if not isinstance(mem, GuestMemory) or self._memory.get(mem.slot) is not mem:
            raise ValueError(f"{mem!r} is not memory of this VM")
        self.set_user_memory_region(mem.slot, mem.guest_phys_addr, 0, mem.userspace_addr, mem.flags)
        del self._memory[mem.slot]
        lo, hi = mem.userspace_addr, mem.userspace_addr + mem.size
        if any(ua < hi and lo < ua + sz for (_, sz, ua, _) in self._slots.values()):
            self._parked.append(mem)  # still reachable by KVM through an alias slot
            return
        mem._unmap()

    @property
    def memory(self) -> list[GuestMemory]:
        """The regions added with :meth:`add_memory`, by guest address."""
        return sorted(self._memory.values(), key=lambda m: m.guest_phys_addr)

    def _chunks(self, gpa: int, n: int) -> Iterator[tuple[GuestMemory, int, int]]:
        if self._fd < 0 and self._inherited_fd < 0:  # closed (a forked child's copy still reads)
            raise self._closed_error("guest memory access")
        _uint("gpa", gpa)
        if n < 0:
            raise ValueError("length must be >= 0")
        end = gpa + n
        while gpa < end:
            for mem in self._memory.values():
                if mem.guest_phys_addr <= gpa < mem.guest_phys_addr + mem.size:
                    off = gpa - mem.guest_phys_addr
                    k = min(end - gpa, mem.size - off)
                    yield mem, off, k
                    gpa += k
                    break
            else:
                raise ValueError(f"guest physical address {gpa:#x} is not in memory added with add_memory")

    def read(self, gpa: int, n: int) -> bytes:
        """Copy *n* bytes of guest RAM at guest physical *gpa* (may span regions)."""
        return b"".join(mem[off:off + k] for mem, off, k in self._chunks(gpa, n))

    def write(self, gpa: int, data: ReadableBuffer) -> None:
        """Copy *data* into guest RAM at guest physical *gpa* (may span regions)."""
        data = memoryview(data).cast("B")
        pos = 0
        for mem, off, k in list(self._chunks(gpa, len(data))):
            mem[off:off + k] = data[pos:pos + k]
            pos += k

