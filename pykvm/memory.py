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
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Optional

__all__ = ["GuestMemory", "PAGE_SIZE"]

PAGE_SIZE = mmap.PAGESIZE


class GuestMemory(mmap.mmap):
    """One memslot's worth of guest RAM.

    Attributes: ``slot``, ``guest_phys_addr``, ``size``, ``userspace_addr``,
    ``flags`` (``KVM_MEM_*``).  Offsets in :meth:`read` / :meth:`write` are
    relative to the start of the region (guest address ``guest_phys_addr``).

    Note that ``read``/``write`` take an explicit offset, unlike
    ``mmap.mmap``'s file-like methods.
    """

    slot: int = -1
    guest_phys_addr: int = 0
    size: int = 0
    userspace_addr: int = 0
    flags: int = 0
    _vm = None

    @classmethod
    def _anonymous(cls, size: int) -> "GuestMemory":
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

    def write(self, offset: int, data) -> None:  # type: ignore[override]
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

    def _unmap(self) -> Optional[str]:
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

    def __enter__(self) -> "GuestMemory":
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

    def resize(self, newsize: int) -> None:  # type: ignore[override]
        """Refused: a memslot's size is fixed (resizing could move or shrink the mapping)."""
        raise ValueError("guest memory cannot be resized: remove it and add a new region")
