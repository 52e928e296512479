"""What every benchmark case shares: the configuration, the clocks, the plumbing of a run.

:class:`SuiteBase` holds the open :class:`pykvm.Kvm`, the C reference, the
rows and notes collected so far, and the watchdog that bounds every guest
run; the case groups in this package are mixins over it, put together by
:class:`pykvm.bench.suite.Suite`.
"""

from __future__ import annotations

import mmap
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pykvm

from .. import guest as G
from .. import uc
from ..core import BenchError, Row, Watchdog
from ..cref import CRef, CRefError, compile_reference

__all__ = [
    "CLOCKS",
    "EXIT_HLT",
    "EXIT_HYPERCALL",
    "EXIT_INTR",
    "EXIT_IO",
    "EXIT_MMIO",
    "EXIT_RDMSR",
    "EXIT_WRMSR",
    "GROUPS",
    "GROUP_TITLES",
    "NPAGES",
    "WATCHDOG_S",
    "Config",
    "SuiteBase",
    "bad",
    "wall",
]

wall = time.perf_counter_ns     # life cycle, cold start, dirty tracking: always wall time
#: batches of ioctls, exits, compute: wall time, or the thread's CPU time (--clock cpu)
CLOCKS: dict[str, Callable[[], int]] = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}

GROUPS = ("ioctl", "exits", "inguest", "life", "dirty", "compute")
GROUP_TITLES = {
    "ioctl": "Binding overhead: one ioctl",
    "exit0": "Exit round trips to user space, guest at CPL0 (emulated by KVM on this host)",
    "exit3": "Exit round trips to user space, guest at CPL3 (native, IOPL 3)",
    "inguest": "In-kernel exits, timed inside the guest with rdtsc (no user space involved)",
    "life": "Life cycle",
    "dirty": "Dirty tracking, 1 GiB slot",
    "compute": "Guest compute: `dec rcx; jnz` loop, per iteration",
}

# exit_reason numbers the raw loops compare against (plain ints: no enum lookup in a timed loop)
EXIT_IO, EXIT_HYPERCALL, EXIT_HLT, EXIT_MMIO = 2, 3, 5, 6
EXIT_RDMSR, EXIT_WRMSR, EXIT_INTR = 29, 30, 10
NPAGES = G.DIRTY_SIZE // mmap.PAGESIZE
WATCHDOG_S = 20.0


@dataclass
class Config:
    """Sizes of one run: quick (default), full, or scaled down for a smoke test."""

    mode: str = "quick"
    rounds: int = 11
    ioctl_n: int = 500           # ops per batch, single ioctls
    exit_n: int = 100            # exits per batch at CPL0 (<= guest.UNROLL); shorter than a time slice
    exit3_n: int = 40            # exits per batch at CPL3
    life_n: int = 20             # VM create/close per batch
    vcpu_n: int = 8              # vCPUs created per batch
    region_n: int = 5            # 1 GiB register+delete per batch
    inguest_k0: int = 100        # instructions per in-guest measurement at CPL0
    inguest_k3: int = 2000       # ... at CPL3
    cold_rounds: int = 7         # processes per variant for the cold start
    dirty_fractions: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.1])
    ring_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])
    compute3_iters: int = 20_000_000
    compute0_iters: int = 5_000
    unicorn_iters: int = 1_000_000
    variant_budget_s: float = 3.0    # a variant slower than this in total stops early (pykvm dirty log)
    groups: list[str] | None = None

    @classmethod
    def quick(cls) -> Config:
        """The default: under a minute."""
        return cls()

    @classmethod
    def full(cls) -> Config:
        """More rounds, bigger batches, dirty fractions up to 100% (a few minutes)."""
        return cls(mode="full", rounds=25, ioctl_n=1000, exit_n=200, exit3_n=80, life_n=50,
                   vcpu_n=16, region_n=10, inguest_k0=200, inguest_k3=5000, cold_rounds=15,
                   dirty_fractions=[0.0, 0.01, 0.1, 0.5, 1.0], ring_fractions=[0.001, 0.01, 0.1],
                   compute3_iters=100_000_000, compute0_iters=20_000, unicorn_iters=5_000_000,
                   variant_budget_s=10.0)

    def scaled(self, factor: float) -> Config:
        """Shrink batch sizes (the smoke test runs the suite at a tiny scale)."""
        def s(n: int, lo: int = 1) -> int:
            return max(lo, int(n * factor))
        return Config(self.mode, self.rounds, s(self.ioctl_n, 10), s(self.exit_n, 5), s(self.exit3_n, 5),
                      s(self.life_n, 2), s(self.vcpu_n, 2), s(self.region_n, 1), s(self.inguest_k0, 10),
                      s(self.inguest_k3, 10), max(2, int(self.cold_rounds * min(1.0, factor * 4))),
                      list(self.dirty_fractions), list(self.ring_fractions), s(self.compute3_iters, 1000),
                      s(self.compute0_iters, 100), s(self.unicorn_iters, 1000), self.variant_budget_s,
                      self.groups)


def bad(what: str, e: object) -> BenchError:
    """The error a case raises when the guest did something other than what it measures."""
    return BenchError(f"expected {what}, got {e!r}")


class SuiteBase:
    """Plumbing shared by every case: KVM, the C reference, rows, notes, watchdog, clock."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = lambda s: None,
                 use_c: bool = True, use_unicorn: bool = True, clock: str = "wall") -> None:
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(CLOCKS)}")
        self.pc = CLOCKS[clock]
        self.clock = clock
        self.cfg = cfg
        self.log = log
        self.kvm = pykvm.Kvm()
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.info: dict[str, object] = {}
        self.wd = Watchdog()
        self._tmp = tempfile.TemporaryDirectory(prefix="pykvm-bench-")
        self.c: CRef | None = None
        self.c_exe: Path | None = None
        if use_c:
            try:
                self.c_exe = compile_reference()
                self.c = CRef(self.c_exe, Path(self._tmp.name), cpu_clock=clock == "cpu")
            except (CRefError, OSError) as e:
                self.notes.append(f"C reference unavailable, C columns empty: {e}")
        self.unicorn = use_unicorn and uc.available()
        if use_unicorn and not uc.available():
            self.notes.append("Unicorn comparison skipped: the `unicorn` package is not installed "
                              "(pip install 'kvmbind[unicorn]').")

    def row(self, key: str, group: str, label: str, note: str = "") -> Row:
        """A new result row, kept in :attr:`rows`."""
        r = Row(key, group, label, note=note)
        self.rows.append(r)
        return r

    def close(self) -> None:
        """Stop the watchdog and the C reference, close KVM, remove the temporary directory."""
        self.wd.stop()
        if self.c:
            self.c.close()
        self.kvm.close()
        self._tmp.cleanup()

    def c_load(self, spec: G.Spec) -> bool:
        """Give the C reference the machine *spec*; False (with a note) if it cannot build it."""
        if not self.c:
            return False
        try:
            self.c.load(spec)
            return True
        except CRefError as e:
            self.notes.append(f"C reference could not build a machine: {e}")
            return False

    def c_batch(self, name: str, n: int, arg: int = 0, per: int | None = None) -> Callable[[], float]:
        """A variant that asks the C reference for one batch of *n* operations *name*."""
        c = self.c
        assert c is not None
        div = per if per is not None else n
        return lambda: c.bench(name, n, arg)[0] / div
