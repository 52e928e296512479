"""Old name of :mod:`pykvm.x86.bus` (kept for one release).

``Stop`` is now :class:`~pykvm.x86.bus.RunResult`; the handler type aliases
are ``MmioReadHandler``/``MmioWriteHandler`` (the old ``MmioRead``/``MmioWrite``
aliases shadowed the exit classes of the same name and are gone).
"""

from ..uapi.enums import ExitReason
from .bus import Bus, GuestError, PortSpec, RunLoop, RunResult

Stop = RunResult

__all__ = ["Bus", "ExitReason", "GuestError", "PortSpec", "RunLoop", "RunResult"]
