"""Measurement machinery: interleaved rounds, rows of results, statistics, watchdog.

A *case* offers several *variants* of the same work (``pykvm`` = the typed
object API, ``raw`` = pykvm's raw path, ``c`` = the C reference, ``unicorn``,
...).  :func:`interleave` runs one batch of each variant per round, rotating
the order every round, so slow drifts of this shared 2-core host hit every
variant alike.  Each batch returns nanoseconds per operation (or a dict of
them when one batch yields several metrics); :class:`Row` keeps every sample
and summarises them (median, quartiles, min, max, paired ratios).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from pykvm import Vcpu
    from pykvm.vcpu import Watchdog as VcpuWatchdog

VARIANT_ORDER = ("pykvm", "raw", "fcntl", "c", "unicorn", "qemu", "guest", "python")
VARIANT_TITLES = {
    "pykvm": "pykvm",           # the typed object API (Vcpu.run() -> Exit, vm.create_vcpu() ...)
    "raw": "pykvm raw",         # run_raw(), pykvm.fd.ioctl() on the raw layer
    "fcntl": "fcntl floor",     # plain fcntl.ioctl, no wrapper: what Python itself costs
    "c": "C",                   # benchmarks/c/kvmbench.c
    "unicorn": "Unicorn",       # the same guest code emulated by Unicorn
    "qemu": "QEMU microvm",     # the same kernel under qemu-system-x86_64 -accel kvm -M microvm
    "guest": "in guest (rdtsc)",
    "python": "process",
}


class BenchError(RuntimeError):
    """A variant could not run (guest misbehaved, feature missing ...)."""


def quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(xs: Sequence[float]) -> dict[str, float]:
    return {
        "median": quantile(xs, 0.5),
        "p25": quantile(xs, 0.25),
        "p75": quantile(xs, 0.75),
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
    }


@dataclass
class Row:
    """One measured quantity, with the samples of each variant (ns per operation)."""

    key: str
    group: str
    label: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: str = ""

    def add(self, variant: str, value: float) -> None:
        self.samples.setdefault(variant, []).append(float(value))

    def median(self, variant: str) -> float | None:
        xs = self.samples.get(variant)
        return quantile(xs, 0.5) if xs else None

    def ratio(self, num: str, den: str = "c") -> dict[str, float] | None:
        """Median (and quartiles) of the per-round ratios num/den (paired when possible)."""
        a, b = self.samples.get(num), self.samples.get(den)
        if not a or not b:
            return None
        if len(a) == len(b):
            rs = [x / y for x, y in zip(a, b) if y > 0]
        else:
            rs = [quantile(a, 0.5) / quantile(b, 0.5)] if quantile(b, 0.5) > 0 else []
        if not rs:
            return None
        return {"median": quantile(rs, 0.5), "p25": quantile(rs, 0.25), "p75": quantile(rs, 0.75)}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "group": self.group, "label": self.label, "unit": "ns"}
        out["variants"] = {v: {**summary(xs), "samples": xs}
                           for v, xs in sorted(self.samples.items(), key=lambda kv: _vorder(kv[0])) if xs}
        ratios = {}
        for v in self.samples:
            if v != "c":
                r = self.ratio(v)
                if r:
                    ratios[f"{v}/c"] = r
        if "unicorn" in self.samples and "pykvm" in self.samples:
            r = self.ratio("pykvm", "unicorn")
            if r:
                ratios["pykvm/unicorn"] = r
        out["ratios"] = ratios
        if self.note:
            out["note"] = self.note
        if self.info:
            out["info"] = self.info
        if self.errors:
            out["errors"] = self.errors
        if self.skipped:
            out["skipped"] = self.skipped
        return out


def _vorder(v: str) -> int:
    return VARIANT_ORDER.index(v) if v in VARIANT_ORDER else len(VARIANT_ORDER)


Result = Union[float, dict[str, float]]


def interleave(rounds: int, variants: Mapping[str, Callable[[], Result]],
               rows: Row | Mapping[str, Row], warmup: int = 1, budget_s: float = 0.0) -> None:
    """Run every variant once per round (order rotated each round) and record the samples.

    A variant returns ns/op, or a dict ``{metric: ns/op}`` that goes to
    ``rows[metric]``.  A variant that raises is dropped from later rounds and
    its error noted in the row(s).  With *budget_s*, a variant whose calls
    have taken that long in total stops after at least one recorded sample
    (noted in the rows): some pure-Python paths are orders of magnitude
    slower than C and would otherwise dominate the run time.
    """
    names = list(variants)
    alive = dict.fromkeys(names, True)
    spent = dict.fromkeys(names, 0.0)

    def targets() -> list[Row]:
        return [rows] if isinstance(rows, Row) else list(rows.values())

    def call(name: str, record: bool) -> None:
        t0 = time.monotonic()
        try:
            res = variants[name]()
        except Exception as e:
            alive[name] = False
            msg = f"{type(e).__name__}: {e}"
            for r in targets():
                r.errors[name] = msg
                r.samples.pop(name, None)
            return
        spent[name] += time.monotonic() - t0
        if not record:
            return
        if isinstance(res, dict):
            assert not isinstance(rows, Row)
            for metric, value in res.items():
                if metric in rows:
                    rows[metric].add(name, value)
        else:
            assert isinstance(rows, Row)
            rows.add(name, res)
        if budget_s and spent[name] > budget_s and alive[name]:
            alive[name] = False
            for r in targets():
                if name in r.samples:
                    r.info.setdefault("stopped_early", {})[name] = (
                        f"stopped after {len(r.samples[name])} samples ({spent[name]:.1f} s > {budget_s:g} s budget)")

    for _ in range(warmup):
        for name in names:
            call(name, False)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if alive[name]:
                call(name, True)


class Watchdog:
    """Kick a vCPU whose run takes longer than a deadline (guests must never hang the suite).

    A thin holder over :meth:`pykvm.Vcpu.kick_after`, the library's one way to
    bound a run: ``arm`` starts one before a timed batch, ``disarm`` cancels
    it after; both happen outside the timed region.
    """

    def __init__(self) -> None:
        self._pending: VcpuWatchdog | None = None
        self.fired = False

    def arm(self, vcpu: Vcpu, seconds: float) -> None:
        """Kick *vcpu* after *seconds* unless :meth:`disarm` comes first."""
        self.disarm()
        self.fired = False
        self._pending = vcpu.kick_after(seconds)

    def disarm(self) -> None:
        """Cancel the pending kick (``fired`` tells whether it already happened)."""
        if self._pending is not None:
            self._pending.cancel()
            self.fired = self._pending.fired
            self._pending = None

    def stop(self) -> None:
        """Cancel anything pending (the suite is closing)."""
        self.disarm()
