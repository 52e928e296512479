"""Old import path of :mod:`pykvm.host.diagnose` (kept for one release)."""

from .host.diagnose import *  # noqa: F403
from .host.diagnose import __all__  # noqa: F401
