"""Old import path of :mod:`pykvm.vm.memory` (``GuestMemory``, ``PAGE_SIZE``); kept for one release."""

from .vm.memory import PAGE_SIZE, GuestMemory

__all__ = ["PAGE_SIZE", "GuestMemory"]
