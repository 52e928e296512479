"""Old import path of :mod:`pykvm.vm.eventfd` (``EventFd``, ``fd_of``); kept for one release."""

from .vm.eventfd import EventFd, fd_of

__all__ = ["EventFd", "fd_of"]
