"""Facts about this machine, below :class:`~pykvm.Kvm`: why ``/dev/kvm`` cannot be
used (:mod:`~pykvm.host.diagnose`) and what the host CPU says
(:mod:`~pykvm.host.cpu`: ``/proc/cpuinfo`` and the CPUID instruction).

Nothing here opens ``/dev/kvm``; the object layer and the probe both build on it.
"""

from . import cpu, diagnose

__all__ = ["cpu", "diagnose"]
