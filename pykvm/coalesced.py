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
from typing import List

from .memory import PAGE_SIZE
from .uapi import structs as S

__all__ = ["CoalescedRing", "COALESCED_MMIO_MAX"]

_HDR = struct.Struct("<II")  # first, last
_HDR_FIRST = struct.Struct("<I")
_ENTRY_SIZE = ctypes.sizeof(S.kvm_coalesced_mmio)
#: Entries in the ring (``KVM_COALESCED_MMIO_MAX``).
COALESCED_MMIO_MAX = (PAGE_SIZE - _HDR.size) // _ENTRY_SIZE
_RING_OFFSET = S.KVM_COALESCED_MMIO_PAGE_OFFSET * PAGE_SIZE


class CoalescedRing:
    """Reader of the VM's coalesced MMIO ring through a vCPU's mapping.

    Any vCPU of the VM will do (the ring is per VM).  Uses
    ``vcpu.run_mmap``, so it needs no mapping of its own and holds no
    buffer export between calls.
    """

    def __init__(self, vcpu) -> None:
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
        return (last - first) % COALESCED_MMIO_MAX

    def drain(self) -> List[S.kvm_coalesced_mmio]:
        """Take every pending entry, oldest first, and free its place in the ring.

        Each entry is a ``kvm_coalesced_mmio`` copy: ``phys_addr`` (the port for
        PIO), ``len``, ``pio`` (1 for a port write) and ``data`` (``len`` bytes
        used out of 8).
        """
        mm = self.vcpu.run_mmap
        first, last = _HDR.unpack_from(mm, _RING_OFFSET)
        out: List[S.kvm_coalesced_mmio] = []
        if first >= COALESCED_MMIO_MAX or last >= COALESCED_MMIO_MAX:
            raise ValueError(f"corrupt coalesced ring header first={first} last={last}")
        while first != last:
            off = _RING_OFFSET + _HDR.size + first * _ENTRY_SIZE
            out.append(S.kvm_coalesced_mmio.from_buffer_copy(mm[off:off + _ENTRY_SIZE]))
            first = (first + 1) % COALESCED_MMIO_MAX
            _HDR_FIRST.pack_into(mm, _RING_OFFSET, first)  # publish: the slot is free again
        return out

