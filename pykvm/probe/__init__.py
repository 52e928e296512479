"""The host capability probe: what can this host's KVM do, and why not?

From Python::

    import pykvm
    report = pykvm.probe.probe()      # a ProbeReport (typed; ``pykvm.probe()`` still works
                                      # at run time, but type checkers cannot call a module)
    report.usable, report.exit_status
    report.capability(pykvm.Cap.NR_VCPUS).system
    print(pykvm.probe.render(report)) # what `pykvm probe` prints (text.render)
    report.to_json()                  # what `pykvm probe --json` prints

From the shell: ``pykvm probe [--json] [--bench]``, ``pykvm diff A.json B.json``
(see ``docs/probe.md``).  "Usable" is decided by opening the device and
asking its API version, never by CPU flags.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Dict, Union

from . import collect, diff  # submodules (their functions are collect.collect, diff.diff)
from .collect import CAP_PROBE_LIMIT
from .diff import Diff, Difference, render_diff
from .loader import ReportError, load
from .model import (
    SCHEMA,
    SCHEMA_VERSION,
    Access,
    BenchResult,
    Capability,
    CpuidReport,
    HostInfo,
    Limits,
    Module,
    Msr,
    MsrReport,
    ProbeReport,
    StatsReport,
)
from .text import render

__all__ = [
    "CAP_PROBE_LIMIT",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Access",
    "BenchResult",
    "Capability",
    "CpuidReport",
    "Diff",
    "Difference",
    "HostInfo",
    "Limits",
    "Module",
    "Msr",
    "MsrReport",
    "ProbeReport",
    "ReportError",
    "StatsReport",
    "compare",
    "load",
    "probe",
    "render",
    "render_diff",
]


def probe(path: str = "/dev/kvm", *, bench: bool = False, bench_seconds: float = 0.5,
          cap_limit: int = CAP_PROBE_LIMIT) -> ProbeReport:
    """Probe the KVM device at *path* and this host; never raises for an unusable KVM.

    ``bench=True`` adds about ``4 * bench_seconds`` of latency measurements.
    Capability numbers ``0 .. cap_limit-1`` are asked on the system fd and
    on a VM fd.  The result's ``usable`` says whether *path* could be opened
    read-write and answered API version 12; ``access.explanation`` says why
    not and what to do.
    """
    return collect.collect(path, bench=bench, bench_seconds=bench_seconds, cap_limit=cap_limit)


def compare(a: ProbeReport | dict[str, Any], b: ProbeReport | dict[str, Any]) -> Diff:
    """Diff two reports (ProbeReport objects or loaded JSON documents)."""
    da = a.to_dict() if isinstance(a, ProbeReport) else a
    db = b.to_dict() if isinstance(b, ProbeReport) else b
    return diff.diff(da, db)


class _CallableModule(types.ModuleType):
    """Lets ``pykvm.probe(...)`` call :func:`probe` while ``pykvm.probe.X`` stays the module."""

    def __call__(self, *args: Any, **kwargs: Any) -> ProbeReport:
        return probe(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
