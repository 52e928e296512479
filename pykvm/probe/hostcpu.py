"""Old import path of :mod:`pykvm.host.cpu` (kept for one release)."""

from ..host.cpu import *  # noqa: F403
from ..host.cpu import __all__  # noqa: F401
