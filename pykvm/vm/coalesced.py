"""The coalesced MMIO/PIO ring (``CoalescedRing``).

Writes by the guest into a zone registered with
``Vm.register_coalesced_mmio`` / ``Vm.register_coalesced_pio`` do not exit to
user space: KVM appends a ``struct kvm_coalesced_mmio`` (``phys_addr``,
``len``, ``pio``, ``data[8]``) to a ring and lets the guest continue.  The
ring is one page per VM, visible through every vCPU's mapping at page
``KVM_COALESCED_MMIO_PAGE_OFFSET``: a ``struct kvm_coalesced_mmio_ring``
header (``first``, ``last``) followed by ``(PAGE_SIZE - 8) / 24`` entries.
KVM writes at ``last``; user space consumes from ``first`` and advances it.
When the ring is full the write exits to user space as ordinary MMIO/PIO.
Guest *reads* of a coalesced zone always exit.

User space must drain the ring before acting on any other exit that could
observe the device state, to keep writes in order.
"""

from __future__ import annotations

import ctypes
import struct

from .._check import U32 as _U32
from .._check import U64 as _U64
from .._check import uint as _uint
from ..fd import SingleOwner
from ..uapi import ioctls, structs
from ..vcpu import Vcpu
from ._state import VmState
from .memory import PAGE_SIZE

__all__ = ["COALESCED_MMIO_MAX", "CoalescedIo", "CoalescedRing"]

_HDR = struct.Struct("<II")  # first, last
_HDR_FIRST = struct.Struct("<I")
_ENTRY_SIZE = ctypes.sizeof(structs.kvm_coalesced_mmio)
#: Entries in the ring (``KVM_COALESCED_MMIO_MAX``).
COALESCED_MMIO_MAX = (PAGE_SIZE - _HDR.size) // _ENTRY_SIZE
_RING_OFFSET = structs.KVM_COALESCED_MMIO_PAGE_OFFSET * PAGE_SIZE


class CoalescedRing(SingleOwner):
    """Reader of the VM's coalesced MMIO ring through a vCPU's mapping.

    Any vCPU of the VM will do (the ring is per VM).  Uses
    ``vcpu.run_mmap``, so it needs no mapping of its own and holds no
    buffer export between calls.
    """

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        mm = vcpu.run_mmap
        if len(mm) < _RING_OFFSET + PAGE_SIZE:
            raise ValueError(f"the vCPU mapping ({len(mm)} bytes) has no coalesced MMIO page "
                             f"(KVM_CAP_COALESCED_MMIO missing?)")

    def __repr__(self) -> str:
        return f"<CoalescedRing vcpu={self.vcpu.id} pending={len(self)}>"

    def __len__(self) -> int:
        """Entries written by KVM and not yet drained."""
        first, last = _HDR.unpack_from(self.vcpu.run_mmap, _RING_OFFSET)
        pending: int = (last - first) % COALESCED_MMIO_MAX
        return pending

    def drain(self) -> list[structs.kvm_coalesced_mmio]:
        """Take every pending entry, oldest first, and free its place in the ring.

        Each entry is a ``kvm_coalesced_mmio`` copy: ``phys_addr`` (the port for
        PIO), ``len``, ``pio`` (1 for a port write) and ``data`` (``len`` bytes
        used out of 8).
        """
        mm = self.vcpu.run_mmap
        first, last = _HDR.unpack_from(mm, _RING_OFFSET)   # last before the entries (x86: ordered loads)
        if first >= COALESCED_MMIO_MAX or last >= COALESCED_MMIO_MAX:
            raise ValueError(f"corrupt coalesced ring header first={first} last={last}")
        if first == last:
            return []
        base = _RING_OFFSET + _HDR.size
        if first < last:
            raw = mm[base + first * _ENTRY_SIZE:base + last * _ENTRY_SIZE]
        else:  # wrapped: the tail of the ring, then its head
            raw = (mm[base + first * _ENTRY_SIZE:base + COALESCED_MMIO_MAX * _ENTRY_SIZE]
                   + mm[base:base + last * _ENTRY_SIZE])
        n = len(raw) // _ENTRY_SIZE
        entries = (structs.kvm_coalesced_mmio * n).from_buffer_copy(raw)
        _HDR_FIRST.pack_into(mm, _RING_OFFSET, last)  # publish once: every drained slot is free again
        return list(entries)


class CoalescedIo(VmState):
    """The coalesced MMIO/PIO ioctls of :class:`~pykvm.vm.Vm` (mixed into it)."""

    @staticmethod
    def _zone(addr: int, size: int, pio: bool) -> structs.kvm_coalesced_mmio_zone:
        z = structs.kvm_coalesced_mmio_zone(addr=_uint("addr", addr, 0xFFFF if pio else _U64),
                                      size=_uint("size", size, _U32))
        if size == 0:
            raise ValueError("a coalesced zone needs a non-zero size")
        z.pio = 1 if pio else 0
        return z

    def register_coalesced_mmio(self, addr: int, size: int) -> None:
        """``KVM_REGISTER_COALESCED_MMIO``: guest writes to ``[addr, addr+size)`` go to the ring.

        They no longer exit; read them with :meth:`coalesced_ring`.  Reads of
        the zone still exit.  (``KVM_CAP_COALESCED_MMIO`` is the ring's page offset.)
        """
        self._ioctl(ioctls.KVM_REGISTER_COALESCED_MMIO, self._zone(addr, size, False))

    def unregister_coalesced_mmio(self, addr: int, size: int) -> None:
        """``KVM_UNREGISTER_COALESCED_MMIO``: remove the zones inside ``[addr, addr+size)``."""
        self._ioctl(ioctls.KVM_UNREGISTER_COALESCED_MMIO, self._zone(addr, size, False))

    def register_coalesced_pio(self, port: int, size: int) -> None:
        """``KVM_REGISTER_COALESCED_MMIO`` with ``pio=1``: coalesce ``out`` to ports ``[port, port+size)``.

        Needs ``KVM_CAP_COALESCED_PIO``.  Entries in the ring have ``pio == 1``.
        """
        self._ioctl(ioctls.KVM_REGISTER_COALESCED_MMIO, self._zone(port, size, True))

    def unregister_coalesced_pio(self, port: int, size: int) -> None:
        """``KVM_UNREGISTER_COALESCED_MMIO`` with ``pio=1``."""
        self._ioctl(ioctls.KVM_UNREGISTER_COALESCED_MMIO, self._zone(port, size, True))

    def coalesced_ring(self, vcpu: Vcpu | None = None) -> CoalescedRing:
        """The VM's coalesced MMIO/PIO ring, read through *vcpu*'s mapping (default: the first vCPU)."""
        if vcpu is None:
            if not self._vcpus:
                raise ValueError("the coalesced ring is mapped through a vCPU: create one first")
            vcpu = self._vcpus[min(self._vcpus)]  # the first by id
        elif not isinstance(vcpu, Vcpu) or self._vcpus.get(vcpu.id) is not vcpu:
            raise ValueError(f"{vcpu!r} is not a vCPU of this VM")
        return CoalescedRing(vcpu)

