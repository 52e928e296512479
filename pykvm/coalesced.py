"""Old import path of :mod:`pykvm.vm.coalesced` (``CoalescedRing``); kept for one release."""

from .vm.coalesced import COALESCED_MMIO_MAX, CoalescedRing

__all__ = ["COALESCED_MMIO_MAX", "CoalescedRing"]
