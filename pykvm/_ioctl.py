"""Old import path of :mod:`pykvm.fd` (kept for one release)."""

from .fd import FdObject, grow_on_e2big, ioctl, raise_error

__all__ = ["FdObject", "grow_on_e2big", "ioctl", "raise_error"]
