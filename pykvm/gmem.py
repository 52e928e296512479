"""Old import path of the guest_memfd part of :mod:`pykvm.vm.memory`; kept for one release."""

from .vm.memory import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GuestMemfd, set_cloexec

__all__ = ["GUEST_MEMFD_FLAG_INIT_SHARED", "GUEST_MEMFD_FLAG_MMAP", "GuestMemfd", "set_cloexec"]
