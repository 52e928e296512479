"""The benchmark cases: what is measured, and how each pykvm loop mirrors the C one.

Groups (``--only`` takes these names):

* ``ioctl``   binding overhead: KVM_GET_API_VERSION (syscall floor),
  KVM_CHECK_EXTENSION, KVM_GET/SET_REGS, KVM_RUN returning at once
  (``immediate_exit``).
* ``exits``   exit round trips to user space by kind (PIO out/in, MMIO
  write/read, HLT, user-space MSR exits, hypercall where it works) with the
  guest at CPL0 and at CPL3 (IOPL 3).
* ``inguest`` in-kernel exits timed by the guest with ``rdtsc`` (CPUID, an
  ``out`` served by an in-kernel ioeventfd), as kvm-unit-tests' vmexit does.
* ``life``    VM create/destroy, vCPU create, 1 GiB slot registration,
  ``add_memory``, cold start of a whole process, ``import pykvm`` time.
* ``dirty``   dirty-log harvest of a 1 GiB slot at several dirty fractions,
  and the dirty ring.
* ``compute`` the same guest loop under pykvm, C and Unicorn.

Every pykvm loop calls the API directly between two clock reads
(``perf_counter_ns``, or ``thread_time_ns`` with ``--clock cpu``);
the C twin (``c/kvmbench.c``) runs the same ioctls on the same guest bytes and
times itself.  Rounds are interleaved (see :func:`benchmarks.core.interleave`).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pykvm
from pykvm.fd import ioctl
from pykvm.dirty import bitmap_to_pages
from pykvm.exits import Hlt, Hypercall, IoIn, IoOut, MmioRead, MmioWrite, X86Rdmsr, X86Wrmsr
from pykvm.uapi import ioctls as I
from pykvm.uapi import structs as S
from pykvm.uapi.enums import Cap

from . import guest as G
from . import uc
from .core import BenchError, Row, Watchdog, interleave
from .cref import CRef, CRefError, compile_reference

wall = time.perf_counter_ns     # life cycle, cold start, dirty tracking: always wall time
pc = time.perf_counter_ns       # batches of ioctls, exits, compute: wall, or thread CPU time (--clock cpu)
CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}

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

# exit_reason numbers the raw loops compare against
_IO, _HYPERCALL, _HLT, _MMIO, _RDMSR, _WRMSR, _INTR = 2, 3, 5, 6, 29, 30, 10
NPAGES = G.DIRTY_SIZE // mmap.PAGESIZE
WATCHDOG_S = 20.0


@dataclass
class Config:
    mode: str = "quick"
    rounds: int = 11
    ioctl_n: int = 500           # ops per batch, single ioctls
    exit_n: int = 100            # exits per batch at CPL0 (<= guest.UNROLL); ~1 ms, shorter than a time slice
    exit3_n: int = 40            # exits per batch at CPL3
    life_n: int = 20             # VM create/close per batch
    vcpu_n: int = 8              # vCPUs created per batch
    region_n: int = 5            # 1 GiB register+delete per batch
    inguest_k0: int = 100        # instructions per in-guest measurement at CPL0
    inguest_k3: int = 2000       # ... at CPL3
    cold_rounds: int = 7         # processes per variant for the cold start
    dirty_fractions: List[float] = field(default_factory=lambda: [0.0, 0.01, 0.1])
    ring_fractions: List[float] = field(default_factory=lambda: [0.01, 0.1])
    compute3_iters: int = 20_000_000
    compute0_iters: int = 5_000
    unicorn_iters: int = 1_000_000
    variant_budget_s: float = 3.0    # a variant slower than this in total stops early (pykvm dirty log)
    groups: Optional[List[str]] = None

    @classmethod
    def quick(cls) -> "Config":
        return cls()

    @classmethod
    def full(cls) -> "Config":
        return cls(mode="full", rounds=25, ioctl_n=1000, exit_n=200, exit3_n=80, life_n=50,
                   vcpu_n=16, region_n=10, inguest_k0=200, inguest_k3=5000, cold_rounds=15,
                   dirty_fractions=[0.0, 0.01, 0.1, 0.5, 1.0], ring_fractions=[0.001, 0.01, 0.1],
                   compute3_iters=100_000_000, compute0_iters=20_000, unicorn_iters=5_000_000,
                   variant_budget_s=10.0)

    def scaled(self, factor: float) -> "Config":
        """Shrink batch sizes (the smoke test runs the suite at a tiny scale)."""
        def s(n: int, lo: int = 1) -> int:
            return max(lo, int(n * factor))
        return Config(self.mode, self.rounds, s(self.ioctl_n, 10), s(self.exit_n, 5), s(self.exit3_n, 5),
                      s(self.life_n, 2), s(self.vcpu_n, 2), s(self.region_n, 1), s(self.inguest_k0, 10),
                      s(self.inguest_k3, 10), max(2, int(self.cold_rounds * min(1.0, factor * 4))),
                      list(self.dirty_fractions), list(self.ring_fractions), s(self.compute3_iters, 1000),
                      s(self.compute0_iters, 100), s(self.unicorn_iters, 1000), self.variant_budget_s,
                      self.groups)


def _bad(what: str, e: object) -> BenchError:
    return BenchError(f"expected {what}, got {e!r}")


class Suite:
    """Runs the cases and collects :class:`~benchmarks.core.Row` s and notes."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = lambda s: None,
                 use_c: bool = True, use_unicorn: bool = True, clock: str = "wall") -> None:
        global pc
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(CLOCKS)}")
        pc = CLOCKS[clock]
        self.clock = clock
        self.cfg = cfg
        self.log = log
        self.kvm = pykvm.Kvm()
        self.rows: List[Row] = []
        self.notes: List[str] = []
        self.info: Dict[str, object] = {}
        self.wd = Watchdog()
        self._tmp = tempfile.TemporaryDirectory(prefix="pykvm-bench-")
        self.c: Optional[CRef] = None
        self.c_exe: Optional[Path] = None
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

    # -- plumbing ---------------------------------------------------------------
    def row(self, key: str, group: str, label: str, note: str = "") -> Row:
        r = Row(key, group, label, note=note)
        self.rows.append(r)
        return r

    def close(self) -> None:
        self.wd.stop()
        if self.c:
            self.c.close()
        self.kvm.close()
        self._tmp.cleanup()

    def c_load(self, spec: G.Spec) -> bool:
        if not self.c:
            return False
        try:
            self.c.load(spec)
            return True
        except CRefError as e:
            self.notes.append(f"C reference could not build a machine: {e}")
            return False

    def c_batch(self, name: str, n: int, arg: int = 0, per: Optional[int] = None) -> Callable[[], float]:
        c = self.c
        assert c is not None
        div = per if per is not None else n
        return lambda: c.bench(name, n, arg)[0] / div

    def run(self) -> None:
        groups = self.cfg.groups or list(GROUPS)
        for g in GROUPS:
            if g in groups:
                self.log(f"[{g}]")
                t0 = time.monotonic()
                getattr(self, f"case_{g}")()
                self.log(f"[{g}] {time.monotonic() - t0:.1f} s")

    # -- ioctl ------------------------------------------------------------------------
    def case_ioctl(self) -> None:
        cfg, kvm = self.cfg, self.kvm
        n, rounds = cfg.ioctl_n, cfg.rounds
        spec = G.Spec(G.code_exit("pio_out"))
        m = spec.build(kvm)
        has_c = self.c_load(spec)
        vcpu = m.vcpu
        kfd, vfd = kvm.fileno(), vcpu.fileno()
        rng = range(n)

        def calls(f, *args) -> Callable[[], float]:
            def go() -> float:
                t0 = pc()
                for _ in rng:
                    f(*args)
                return (pc() - t0) / n
            return go

        # KVM_GET_API_VERSION
        r = self.row("ioctl.api_version", "ioctl", "KVM_GET_API_VERSION (syscall floor)",
                     "pykvm: `kvm.api_version`; raw: `pykvm.fd.ioctl(fd, KVM_GET_API_VERSION)`; "
                     "fcntl floor: `fcntl.ioctl(fd, KVM_GET_API_VERSION)` without argument")
        v = {"pykvm": calls(type(kvm).api_version.fget, kvm),
             "raw": calls(ioctl, kfd, I.KVM_GET_API_VERSION),
             "fcntl": calls(fcntl.ioctl, kfd, I.KVM_GET_API_VERSION)}
        if has_c:
            v["c"] = self.c_batch("api", n)
        interleave(rounds, v, r)

        cap = int(Cap.IMMEDIATE_EXIT)
        r = self.row("ioctl.check_extension", "ioctl", "KVM_CHECK_EXTENSION",
                     "pykvm: `kvm.check_extension(Cap.IMMEDIATE_EXIT)`; raw: `ioctl(fd, KVM_CHECK_EXTENSION, cap)`")
        v = {"pykvm": calls(kvm.check_extension, Cap.IMMEDIATE_EXIT),
             "raw": calls(ioctl, kfd, I.KVM_CHECK_EXTENSION, cap)}
        if has_c:
            v["c"] = self.c_batch("check", n, cap)
        interleave(rounds, v, r)

        regs = vcpu.get_regs()
        buf = S.kvm_regs()
        r = self.row("ioctl.get_regs", "ioctl", "KVM_GET_REGS",
                     "pykvm: `vcpu.get_regs()` (new struct each call); raw: `ioctl(fd, KVM_GET_REGS, buf)`")
        v = {"pykvm": calls(vcpu.get_regs), "raw": calls(ioctl, vfd, I.KVM_GET_REGS, buf),
             "fcntl": calls(fcntl.ioctl, vfd, I.KVM_GET_REGS, buf, True)}
        if has_c:
            v["c"] = self.c_batch("get_regs", n)
        interleave(rounds, v, r)

        r = self.row("ioctl.set_regs", "ioctl", "KVM_SET_REGS",
                     "pykvm: `vcpu.set_regs(regs)`; raw: `ioctl(fd, KVM_SET_REGS, regs)`")
        v = {"pykvm": calls(vcpu.set_regs, regs), "raw": calls(ioctl, vfd, I.KVM_SET_REGS, regs),
             "fcntl": calls(fcntl.ioctl, vfd, I.KVM_SET_REGS, regs, True)}
        if has_c:
            v["c"] = self.c_batch("set_regs", n)
        interleave(rounds, v, r)

        # KVM_RUN with immediate_exit: returns EINTR without entering the guest.
        mm = vcpu.run_mmap
        run, run_raw = vcpu.run, vcpu.run_raw
        intr = pykvm.exits.INTERRUPTED

        def typed() -> float:
            t0 = pc()
            for _ in rng:
                vcpu.immediate_exit = True
                e = run()
                if e is not intr:
                    raise _bad("Interrupted", e)
            return (pc() - t0) / n

        def raw() -> float:
            t0 = pc()
            for _ in rng:
                mm[1] = 1
                if run_raw() != _INTR:
                    raise _bad("EINTR", vcpu.exit_reason)
            return (pc() - t0) / n

        def floor() -> float:
            fio, RUN = fcntl.ioctl, I.KVM_RUN
            t0 = pc()
            for _ in rng:
                mm[1] = 1
                try:
                    fio(vfd, RUN)
                except InterruptedError:
                    pass
                mm[1] = 0
            return (pc() - t0) / n

        r = self.row("ioctl.run_immediate_exit", "ioctl", "KVM_RUN with immediate_exit = 1 (EINTR)",
                     "pykvm: `vcpu.immediate_exit = True; vcpu.run()` -> Interrupted; "
                     "raw: `run_mmap[1] = 1; run_raw()`; the EINTR becomes a Python exception inside")
        v = {"pykvm": typed, "raw": raw, "fcntl": floor}
        if has_c:
            v["c"] = self.c_batch("immediate_exit", n)
        interleave(rounds, v, r)
        m.close()

    # -- exits ----------------------------------------------------------------------------
    def _typed_loop(self, kind: str, vcpu: pykvm.Vcpu, n: int) -> Callable[[], float]:
        run, wd, rng = vcpu.run, self.wd, range(n)
        cls = {"pio_out": IoOut, "pio_in": IoIn, "mmio_write": MmioWrite, "mmio_read": MmioRead,
               "hlt": Hlt, "rdmsr": X86Rdmsr, "wrmsr": X86Wrmsr, "hypercall": Hypercall}[kind]

        if kind in ("pio_in", "mmio_read"):      # answer through the exit's writable view
            def go() -> float:
                wd.arm(vcpu, WATCHDOG_S)
                t0 = pc()
                for _ in rng:
                    e = run()
                    if e.__class__ is not cls:
                        raise _bad(cls.__name__, e)
                    e.data[0] = 0x5A
                dt = pc() - t0
                wd.disarm()
                return dt / n
        elif kind == "rdmsr":
            def go() -> float:
                wd.arm(vcpu, WATCHDOG_S)
                t0 = pc()
                for _ in rng:
                    e = run()
                    if e.__class__ is not cls:
                        raise _bad(cls.__name__, e)
                    e.set_data(0x5A)
                dt = pc() - t0
                wd.disarm()
                return dt / n
        elif kind == "hypercall":
            def go() -> float:
                wd.arm(vcpu, WATCHDOG_S)
                t0 = pc()
                for _ in rng:
                    e = run()
                    if e.__class__ is not cls:
                        raise _bad(cls.__name__, e)
                    e.set_ret(0)
                dt = pc() - t0
                wd.disarm()
                return dt / n
        else:                                       # nothing to answer
            def go() -> float:
                wd.arm(vcpu, WATCHDOG_S)
                t0 = pc()
                for _ in rng:
                    e = run()
                    if e.__class__ is not cls:
                        raise _bad(cls.__name__, e)
                dt = pc() - t0
                wd.disarm()
                return dt / n
        return go

    def _raw_loop(self, kind: str, vcpu: pykvm.Vcpu, n: int) -> Callable[[], float]:
        rr, wd, rng, mm = vcpu.run_raw, self.wd, range(n), vcpu.run_mmap
        want = {"pio_out": _IO, "pio_in": _IO, "mmio_write": _MMIO, "mmio_read": _MMIO, "hlt": _HLT,
                "rdmsr": _RDMSR, "wrmsr": _WRMSR, "hypercall": _HYPERCALL}[kind]

        def go() -> float:
            q = memoryview(mm).cast("Q")   # kvm_run as u64 words: io.data_offset = q[5], msr.data = q[6]
            try:
                wd.arm(vcpu, WATCHDOG_S)
                if kind == "pio_in":
                    t0 = pc()
                    for _ in rng:
                        if rr() != want:
                            raise _bad("IO", vcpu.exit_reason)
                        mm[q[5]] = 0x5A
                elif kind == "mmio_read":
                    t0 = pc()
                    for _ in rng:
                        if rr() != want:
                            raise _bad("MMIO", vcpu.exit_reason)
                        mm[40] = 0x5A
                elif kind == "rdmsr":
                    t0 = pc()
                    for _ in rng:
                        if rr() != want:
                            raise _bad("X86_RDMSR", vcpu.exit_reason)
                        mm[32] = 0
                        q[6] = 0x5A
                elif kind == "wrmsr":
                    t0 = pc()
                    for _ in rng:
                        if rr() != want:
                            raise _bad("X86_WRMSR", vcpu.exit_reason)
                        mm[32] = 0
                elif kind == "hypercall":
                    t0 = pc()
                    for _ in rng:
                        if rr() != want:
                            raise _bad("HYPERCALL", vcpu.exit_reason)
                        q[11] = 0
                else:
                    t0 = pc()
                    for _ in rng:
                        if rr() != want:
                            raise _bad(f"exit {want}", vcpu.exit_reason)
                dt = pc() - t0
                wd.disarm()
                return dt / n
            finally:
                q.release()
        return go

    def _floor_loop(self, vcpu: pykvm.Vcpu, n: int) -> Callable[[], float]:
        fd, RUN, fio, wd, rng = vcpu.fileno(), I.KVM_RUN, fcntl.ioctl, self.wd, range(n)

        def go() -> float:
            wd.arm(vcpu, WATCHDOG_S)
            t0 = pc()
            for _ in rng:
                fio(fd, RUN)
            dt = pc() - t0
            wd.disarm()
            if vcpu.exit_reason != _IO:
                raise _bad("IO exit", vcpu.exit_reason)
            return dt / n
        return go

    _LABELS = {"pio_out": "PIO out", "pio_in": "PIO in", "mmio_write": "MMIO write",
               "mmio_read": "MMIO read", "hlt": "HLT", "rdmsr": "RDMSR (user-space MSR exit)",
               "wrmsr": "WRMSR (user-space MSR exit)", "hypercall": "hypercall (KVM_CAP_EXIT_HYPERCALL)"}

    def case_exits(self) -> None:
        for cpl in (0, 3):
            kinds = ["pio_out", "pio_in", "mmio_write", "mmio_read"]
            if cpl == 0:
                kinds += ["hlt", "rdmsr", "wrmsr", "hypercall"]
            for kind in kinds:
                self._exit_case(kind, cpl)
        self.notes.append("At CPL3, HLT, RDMSR/WRMSR and VMCALL are privileged (#GP/#UD in the guest), so "
                          "their exits are measured at CPL0 only; PIO uses IOPL 3.")

    def _exit_case(self, kind: str, cpl: int) -> None:
        cfg = self.cfg
        n = min(cfg.exit_n if cpl == 0 else cfg.exit3_n, G.UNROLL)
        group = f"exit{cpl}"
        label = self._LABELS[kind]
        note = ""
        opts: Dict[int, int] = {}
        if kind in ("rdmsr", "wrmsr"):
            opts[G.OPT_MSR_FILTER] = G.MSR_INDEX
            note = (f"KVM_CAP_X86_USER_SPACE_MSR (reason FILTER) + KVM_X86_SET_MSR_FILTER denying "
                    f"MSR {G.MSR_INDEX:#x}")
        if kind == "hypercall":
            opts[G.OPT_EXIT_HYPERCALL] = 1 << 12          # KVM_HC_MAP_GPA_RANGE
            note = "vmcall of KVM_HC_MAP_GPA_RANGE; the loop body also has 4 register moves"
        r = self.row(f"{group}.{kind}", group, label, note)
        spec = G.Spec(G.code_exit(kind), cpl=cpl, options=opts)
        try:
            m = spec.build(self.kvm)
        except pykvm.KvmError as e:
            r.skipped = f"set-up failed on this host: {e}"
            return
        try:
            if kind == "hypercall" and not self._probe_hypercall(m, r):
                return
            v: Dict[str, Callable[[], float]] = {
                "pykvm": self._typed_loop(kind, m.vcpu, n),
                "raw": self._raw_loop(kind, m.vcpu, n),
            }
            if kind == "pio_out":   # the floor: plain fcntl.ioctl(fd, KVM_RUN), no wrapper, no check
                v["fcntl"] = self._floor_loop(m.vcpu, n)
            if self.c_load(spec):
                v["c"] = self.c_batch(kind, n)
            if self.unicorn and kind in ("pio_out", "pio_in", "mmio_write", "mmio_read"):
                ub = uc.exit_batch(kind)
                v["unicorn"] = lambda: ub(n)
            interleave(self.cfg.rounds, v, r)
        finally:
            m.close()

    def _probe_hypercall(self, m: G.Machine, r: Row) -> bool:
        """vmcall at CPL0 spins inside KVM on PVM: try once under a short watchdog."""
        vcpu = m.vcpu
        self.wd.arm(vcpu, 0.5)
        t0 = time.monotonic()
        try:
            e = vcpu.run()
        except pykvm.KvmError as err:
            e = err
        self.wd.disarm()
        if isinstance(e, Hypercall):
            return True
        waited = time.monotonic() - t0
        r.skipped = (f"vmcall at CPL0 did not reach user space: after {waited:.2f} s the watchdog kicked "
                     f"the vCPU and run() returned {e!r}. On this PVM host the vCPU spins inside KVM "
                     f"(HOST.md); on VMX/SVM the same guest exits with KVM_EXIT_HYPERCALL.")
        return False

    # -- in-guest ------------------------------------------------------------------------------
    def case_inguest(self) -> None:
        cfg = self.cfg
        labels = {"cpuid": "CPUID (xor eax,eax; cpuid)", "xor+nop": "baseline: xor eax,eax; nop",
                  "ioeventfd": "out to a port with an in-kernel ioeventfd", "nop": "baseline: nop"}
        for cpl in (0, 3):
            k = cfg.inguest_k0 if cpl == 0 else cfg.inguest_k3
            for name, body in G.IN_GUEST_BODIES.items():
                r = self.row(f"inguest.cpl{cpl}.{name}", "inguest", f"CPL{cpl}: {labels[name]}",
                             f"rdtsc around {k} unrolled instructions, KVM_GET_TSC_KHZ to convert")
                spec = G.Spec(G.code_in_guest(body, k), cpl=cpl,
                              options={G.OPT_IOEVENTFD_PIO: G.PORT_EVENTFD})
                m = spec.build(self.kvm)
                vcpu = m.vcpu
                khz = ioctl(vcpu.fileno(), I.KVM_GET_TSC_KHZ)
                r.info["tsc_khz"] = khz
                mem = m.vm.memory[0]

                def g(vcpu=vcpu, mem=mem, k=k, khz=khz) -> float:
                    self.wd.arm(vcpu, WATCHDOG_S)
                    e = vcpu.run()
                    self.wd.disarm()
                    if not isinstance(e, IoOut) or e.port != G.PORT_RESULT:
                        raise _bad("out to the result port", e)
                    cycles = struct.unpack_from("<Q", mem, G.RESULT)[0]
                    return cycles / k / khz * 1e6
                try:
                    interleave(cfg.rounds, {"guest": g}, r)
                finally:
                    m.close()

    # -- life cycle ----------------------------------------------------------------------------
    def case_life(self) -> None:
        cfg, kvm = self.cfg, self.kvm
        rounds = cfg.rounds
        kfd = kvm.fileno()
        c = self.c
        has_c = c is not None

        # VM create + close
        n = cfg.life_n
        rng = range(n)

        def vm_typed() -> float:
            create = kvm.create_vm
            t0 = wall()
            for _ in rng:
                create().close()
            return (wall() - t0) / n

        def vm_raw() -> float:
            close, REQ = os.close, I.KVM_CREATE_VM
            t0 = wall()
            for _ in rng:
                close(ioctl(kfd, REQ))
            return (wall() - t0) / n

        r = self.row("life.vm_create", "life", "VM create + close",
                     "pykvm: `kvm.create_vm().close()`; raw: `os.close(ioctl(fd, KVM_CREATE_VM))`")
        v = {"pykvm": vm_typed, "raw": vm_raw}
        if has_c:
            v["c"] = self.c_batch("vm_create", n)
        interleave(rounds, v, r)

        # vCPU create (+ mmap of kvm_run)
        nv = cfg.vcpu_n
        size = kvm.vcpu_mmap_size

        def vcpu_typed() -> float:
            vm = kvm.create_vm()
            try:
                create = vm.create_vcpu
                t0 = wall()
                for i in range(nv):
                    create(i)
                dt = wall() - t0
            finally:
                vm.close()
            return dt / nv

        def vcpu_raw() -> float:
            vmfd = ioctl(kfd, I.KVM_CREATE_VM)
            fds, maps = [], []
            try:
                REQ, mk = I.KVM_CREATE_VCPU, mmap.mmap
                t0 = wall()
                for i in range(nv):
                    fd = ioctl(vmfd, REQ, i)
                    fds.append(fd)
                    maps.append(mk(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
                dt = wall() - t0
            finally:
                for mp in maps:
                    mp.close()
                for fd in fds:
                    os.close(fd)
                os.close(vmfd)
            return dt / nv

        r = self.row("life.vcpu_create", "life", "vCPU create (+ mmap kvm_run)",
                     "pykvm: `vm.create_vcpu(i)`; raw: `ioctl(vm, KVM_CREATE_VCPU, i)` + `mmap.mmap(fd, ...)`")
        v = {"pykvm": vcpu_typed, "raw": vcpu_raw}
        if has_c:
            v["c"] = self.c_batch("vcpu_create", nv)
        interleave(rounds, v, r)

        # 1 GiB slot: register / delete of a mapping made beforehand
        size1g = 1 << 30
        nr = cfg.region_n
        rows = {"add": self.row("life.region_add", "life", "KVM_SET_USER_MEMORY_REGION: register 1 GiB",
                                "mapping made beforehand; pykvm: `vm.set_user_memory_region(0, 0, 1 GiB, addr)`"),
                "del": self.row("life.region_del", "life", "KVM_SET_USER_MEMORY_REGION: delete 1 GiB",
                                "pykvm: `vm.set_user_memory_region(0, 0, 0, addr)`")}
        big = mmap.mmap(-1, size1g, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        anchor = ctypes.c_char.from_buffer(big)
        addr = ctypes.addressof(anchor)
        vm = kvm.create_vm()
        vmfd = vm.fileno()

        def region_typed() -> Dict[str, float]:
            setr = vm.set_user_memory_region
            add = dele = 0
            for _ in range(nr):
                t0 = wall()
                setr(0, 0, size1g, addr)
                t1 = wall()
                setr(0, 0, 0, addr)
                t2 = wall()
                add += t1 - t0
                dele += t2 - t1
            return {"add": add / nr, "del": dele / nr}

        region = S.kvm_userspace_memory_region(slot=0, guest_phys_addr=0, memory_size=size1g,
                                               userspace_addr=addr)

        def region_raw() -> Dict[str, float]:
            REQ = I.KVM_SET_USER_MEMORY_REGION
            add = dele = 0
            for _ in range(nr):
                t0 = wall()
                region.memory_size = size1g
                ioctl(vmfd, REQ, region)
                t1 = wall()
                region.memory_size = 0
                ioctl(vmfd, REQ, region)
                t2 = wall()
                add += t1 - t0
                dele += t2 - t1
            return {"add": add / nr, "del": dele / nr}

        # the same slot registered again, unchanged: KVM answers at once, so this is the wrapper's cost
        same = kvm.create_vm()
        same.set_user_memory_region(0, 0, size1g, addr)
        r = self.row("life.region_same", "life", "KVM_SET_USER_MEMORY_REGION: same slot again (no-op in KVM)",
                     "KVM returns at once when nothing changes: the ioctl path and the wrapper alone")
        same_region = S.kvm_userspace_memory_region(slot=0, guest_phys_addr=0, memory_size=size1g,
                                                    userspace_addr=addr)
        ns_ = cfg.ioctl_n // 4 or 1
        rng_ = range(ns_)

        def same_typed() -> float:
            setr = same.set_user_memory_region
            t0 = pc()
            for _ in rng_:
                setr(0, 0, size1g, addr)
            return (pc() - t0) / ns_

        def same_raw() -> float:
            fd, REQ = same.fileno(), I.KVM_SET_USER_MEMORY_REGION
            t0 = pc()
            for _ in rng_:
                ioctl(fd, REQ, same_region)
            return (pc() - t0) / ns_

        v = {"pykvm": same_typed, "raw": same_raw}
        if has_c:
            v["c"] = self.c_batch("region_same", ns_, size1g)
        try:
            interleave(rounds, v, r)
        finally:
            same.close()

        v2: Dict[str, Callable[[], Dict[str, float]]] = {"pykvm": region_typed, "raw": region_raw}
        if has_c:
            def region_c() -> Dict[str, float]:
                a, d = c.bench("region", nr, size1g)
                return {"add": a / nr, "del": d / nr}
            v2["c"] = region_c
        try:
            interleave(rounds, v2, rows)
        finally:
            vm.close()
            del anchor
            big.close()

        # add_memory / remove_memory (mmap + register, delete + munmap)
        rows = {"add": self.row("life.add_memory", "life", "vm.add_memory(1 GiB): mmap + register",
                                "C: mmap + KVM_SET_USER_MEMORY_REGION"),
                "del": self.row("life.remove_memory", "life", "vm.remove_memory(1 GiB): delete + munmap",
                                "C: KVM_SET_USER_MEMORY_REGION(size 0) + munmap")}
        vm = kvm.create_vm()

        def addmem_typed() -> Dict[str, float]:
            add = dele = 0
            for _ in range(nr):
                t0 = wall()
                mem = vm.add_memory(0, size1g)
                t1 = wall()
                vm.remove_memory(mem)
                t2 = wall()
                add += t1 - t0
                dele += t2 - t1
            return {"add": add / nr, "del": dele / nr}

        v2 = {"pykvm": addmem_typed}
        if has_c:
            def addmem_c() -> Dict[str, float]:
                a, d = c.bench("add_memory", nr, size1g)
                return {"add": a / nr, "del": d / nr}
            v2["c"] = addmem_c
        try:
            interleave(rounds, v2, rows)
        finally:
            vm.close()

        self._cold_start()

    def _cold_start(self) -> None:
        cfg = self.cfg
        root = str(Path(pykvm.__file__).resolve().parent.parent)   # the checkout / site dir holding pykvm
        py = sys.executable
        src = G.real_mode_cold_source()
        env = dict(os.environ)

        cpu = self.clock == "cpu"

        def spawn(argv: List[str]) -> float:
            """Wall time of a whole child process (with --clock cpu: its user + system CPU time)."""
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = wall()
            p = subprocess.run(argv, cwd=root, env=env, capture_output=True, timeout=60)
            dt = wall() - t0
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            if p.returncode != 0:
                raise BenchError(f"{argv[0]} exited {p.returncode}: {p.stderr.decode(errors='replace')[-300:]}")
            if cpu:
                return ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) * 1e9
            return dt

        rows = {"cold": self.row("life.cold_start", "life",
                                 "cold start: process + VM + 2 MiB + vCPU + first exit",
                                 "a whole process started by the suite (wall time; user+system CPU time with "
                                 "--clock cpu): `python -c '<import pykvm; ...; vcpu.run()>'` vs `kvmbench cold`"),
                "startup": self.row("life.python_startup", "life", "bare `python -c pass` (for scale)"),
                "import": self.row("life.python_import", "life", "process `python -c 'import pykvm'`")}
        v: Dict[str, Callable[[], Dict[str, float]]] = {
            "pykvm": lambda: {"cold": spawn([py, "-c", src])},
            "python#startup": lambda: {"startup": spawn([py, "-c", "pass"])},
            "python#import": lambda: {"import": spawn([py, "-c", "import pykvm"])},
        }
        if self.c_exe is not None:
            exe = str(self.c_exe)
            v["c"] = lambda: {"cold": spawn([exe, "cold", G.REAL_MODE_COLD.hex()])}
        tiny = _vmm_tiny_kernel(root)
        if tiny is not None:
            # issue 9: a whole `python -m pykvm.vmm` run of a kernel that prints one line
            rows["vmm"] = self.row("life.vmm_tiny", "life",
                                   "`python -m pykvm.vmm` tiny multiboot kernel: print a line, exit",
                                   "tests/vmm/kernels/tiny.S built with as/ld; exit status 1 expected")
            vmm_argv = [py, "-m", "pykvm.vmm", tiny, "--timeout", "20"]

            def vmm_run() -> Dict[str, float]:
                r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = wall()
                p = subprocess.run(vmm_argv, cwd=root, env=env, capture_output=True, timeout=60)
                dt = wall() - t0
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                if p.returncode != 1 or b"hello from a multiboot kernel" not in p.stdout:
                    raise BenchError(f"pykvm.vmm exited {p.returncode}: {p.stderr.decode(errors='replace')[-300:]}")
                if cpu:
                    return {"vmm": ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) * 1e9}
                return {"vmm": dt}
            v["pykvm#vmm"] = vmm_run
        interleave(cfg.cold_rounds, v, rows)
        # "python#x" variants are stored under "python"
        for r in rows.values():
            for k in list(r.samples):
                if "#" in k:
                    r.samples.setdefault(k.split("#")[0], []).extend(r.samples.pop(k))
            for k in list(r.errors):
                if "#" in k:
                    r.errors[k.split("#")[0]] = r.errors.pop(k)

        # import time as -X importtime sees it
        r = self.row("life.import_time", "life", "`import pykvm` (-X importtime, cumulative)",
                     "self time of the slowest modules in the JSON `info`")
        selfs: Dict[str, List[int]] = {}

        def importtime() -> float:
            p = subprocess.run([py, "-X", "importtime", "-c", "import pykvm"], cwd=root, env=env,
                               capture_output=True, text=True, timeout=60)
            total = None
            for line in p.stderr.splitlines():
                mt = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)", line)
                if not mt:
                    continue
                self_us, cum_us, name = int(mt.group(1)), int(mt.group(2)), mt.group(4)
                selfs.setdefault(name, []).append(self_us)
                if name == "pykvm":
                    total = cum_us
            if total is None:
                raise BenchError(f"no pykvm line in -X importtime output: {p.stderr[-300:]}")
            return total * 1000.0

        interleave(cfg.cold_rounds, {"python": importtime}, r)
        med = {k: sorted(v)[len(v) // 2] for k, v in selfs.items()}
        top = sorted(med.items(), key=lambda kv: -kv[1])[:12]
        r.info["slowest_self_us"] = dict(top)

    # -- dirty tracking ----------------------------------------------------------------------------
    def case_dirty(self) -> None:
        for f in self.cfg.dirty_fractions:
            self._dirty_log(f)
        self._dirty_ring()

    @staticmethod
    def _count_stride(fraction: float):
        count = int(round(NPAGES * fraction))
        stride = (G.DIRTY_SIZE // count) & ~(mmap.PAGESIZE - 1) if count else mmap.PAGESIZE
        return count, stride

    def _guest_pass(self, vcpu: pykvm.Vcpu) -> float:
        """Run the dirtying guest once (to its `out 0x11`); return the ns it took."""
        self.wd.arm(vcpu, 120)
        t0 = wall()
        e = vcpu.run()
        t1 = wall()
        self.wd.disarm()
        if not isinstance(e, IoOut) or e.port != G.PORT_DONE:
            raise _bad("out to the done port", e)
        return t1 - t0

    def _dirty_log(self, fraction: float) -> None:
        cfg = self.cfg
        count, stride = self._count_stride(fraction)
        pct = f"{fraction * 100:g}%"
        rows = {
            "harvest": self.row(f"dirty.log.{pct}.harvest", "dirty",
                                f"{pct} dirty: KVM_GET_DIRTY_LOG + list of dirty pages",
                                "pykvm: `vm.get_dirty_log(slot)`; raw: raw ioctl + `benchmarks.suite.dirty_pages` "
                                "(bytes.translate/find); C: ioctl + ctz loop"),
            "ioctl": self.row(f"dirty.log.{pct}.ioctl", "dirty", f"{pct} dirty: the KVM_GET_DIRTY_LOG ioctl alone",
                              "includes KVM write-protecting the dirty pages again"),
            "guest": self.row(f"dirty.log.{pct}.guest", "dirty", f"{pct} dirty: guest pass re-dirtying them",
                              "CPL3 guest writes one byte per page (a write-protection fault in KVM each)"),
        }
        spec = G.Spec(G.code_dirty(count, stride), cpl=3, dirty=True)
        m = spec.build(self.kvm)
        vm, vcpu, vmfd = m.vm, m.vcpu, m.vm.fileno()
        bitmap = bytearray(NPAGES // 8)
        holder = (ctypes.c_char * len(bitmap)).from_buffer(bitmap)
        dl = S.kvm_dirty_log(slot=1, dirty_bitmap=ctypes.addressof(holder))
        REQ = I.KVM_GET_DIRTY_LOG

        def typed() -> Dict[str, float]:
            g = self._guest_pass(vcpu)
            t1 = wall()
            pages = vm.get_dirty_log(1)
            t2 = wall()
            if len(pages) < count:
                raise BenchError(f"{len(pages)} dirty pages, expected {count}")
            return {"harvest": t2 - t1, "guest": g}

        def raw() -> Dict[str, float]:
            g = self._guest_pass(vcpu)
            t1 = wall()
            ioctl(vmfd, REQ, dl)
            t2 = wall()
            pages = dirty_pages(bitmap)
            t3 = wall()
            if len(pages) < count:
                raise BenchError(f"{len(pages)} dirty pages, expected {count}")
            return {"harvest": t3 - t1, "ioctl": t2 - t1, "guest": g}

        v: Dict[str, Callable[[], Dict[str, float]]] = {}
        if hasattr(vm, "get_dirty_log"):
            v["pykvm"] = typed
        v["raw"] = raw
        if self.c_load(spec):
            c = self.c

            def cb() -> Dict[str, float]:
                ioc, walk, guest, npages = c.bench("dirty_log", 1, 1)
                if npages < count:
                    raise BenchError(f"C saw {npages:.0f} dirty pages, expected {count}")
                return {"harvest": ioc + walk, "ioctl": ioc, "guest": guest}
            v["c"] = cb
        try:
            interleave(cfg.rounds, v, rows, budget_s=cfg.variant_budget_s)
        finally:
            del holder
            m.close()
        rows["guest"].info["pages"] = count
        if count:
            med = rows["guest"].median("raw")
            if med:
                rows["guest"].info["ns_per_page"] = med / count

    def _dirty_ring(self) -> None:
        cfg, kvm = self.cfg, self.kvm
        cap = Cap.DIRTY_LOG_RING_ACQ_REL
        max_bytes = kvm.check_extension(cap) or kvm.check_extension(Cap.DIRTY_LOG_RING)
        if not max_bytes:
            r = self.row("dirty.ring", "dirty", "dirty ring")
            r.skipped = "KVM_CAP_DIRTY_LOG_RING(_ACQ_REL) not supported on this host"
            return
        ring_bytes = min(max_bytes, 1 << 20)
        nent = ring_bytes // ctypes.sizeof(S.kvm_dirty_gfn)
        self.info["dirty_ring_bytes"] = ring_bytes
        for fraction in cfg.ring_fractions:
            count, stride = self._count_stride(fraction)
            pct = f"{fraction * 100:g}%"
            if count >= nent // 2:
                r = self.row(f"dirty.ring.{pct}", "dirty", f"ring, {pct} dirty")
                r.skipped = f"{count} pages do not fit a {nent}-entry ring"
                continue
            rows = {
                "harvest": self.row(f"dirty.ring.{pct}.harvest", "dirty",
                                    f"ring, {pct} dirty: collect entries + KVM_RESET_DIRTY_RINGS",
                                    f"{nent}-entry ring per vCPU; pykvm: `ring.harvest()` + `vm.reset_dirty_rings()`;"
                                    " raw: a memoryview walk of the ring mmap + raw ioctl"),
                "reset": self.row(f"dirty.ring.{pct}.reset", "dirty",
                                  f"ring, {pct} dirty: the KVM_RESET_DIRTY_RINGS ioctl alone",
                                  "includes KVM write-protecting the pages again"),
            }
            spec = G.Spec(G.code_dirty(count, stride), cpl=3, dirty=True,
                          options={G.OPT_DIRTY_RING: ring_bytes})
            try:
                m = spec.build(kvm)
            except pykvm.KvmError as e:
                rows["harvest"].skipped = f"dirty ring set-up failed: {e}"
                return
            vm, vcpu, vmfd = m.vm, m.vcpu, m.vm.fileno()
            ring = mmap.mmap(vcpu.fileno(), ring_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=64 * mmap.PAGESIZE)   # KVM_DIRTY_LOG_PAGE_OFFSET on x86
            u32 = memoryview(ring).cast("I")
            q = memoryview(ring).cast("Q")
            state = {"fetch": 0}
            mask = nent - 1
            RESET = I.KVM_RESET_DIRTY_RINGS
            api_ring = None
            if hasattr(vm, "dirty_ring"):
                try:
                    vm._dirty_ring_size = ring_bytes   # enabled through the raw layer by Spec.build
                    api_ring = vm.dirty_ring(vcpu)
                except (pykvm.KvmError, AttributeError, ValueError):
                    api_ring = None

            def typed() -> Dict[str, float]:
                self._guest_pass(vcpu)
                t1 = wall()
                got = api_ring.harvest()
                vm.reset_dirty_rings()
                t2 = wall()
                state["fetch"] += len(got)       # keep the raw walker in step
                if len(got) < count:
                    raise BenchError(f"{len(got)} ring entries, expected {count}")
                return {"harvest": t2 - t1}

            def raw() -> Dict[str, float]:
                self._guest_pass(vcpu)
                t1 = wall()
                pages = []
                app = pages.append
                i = state["fetch"]
                j = i & mask
                while u32[j * 4] & 1:        # KVM_DIRTY_GFN_F_DIRTY
                    app(q[j * 2 + 1])         # offset: page number within the slot
                    u32[j * 4] = 2            # KVM_DIRTY_GFN_F_RESET
                    i += 1
                    j = i & mask
                if api_ring is not None:
                    api_ring._next += i - state["fetch"]
                state["fetch"] = i
                t2 = wall()
                ioctl(vmfd, RESET)
                t3 = wall()
                if len(pages) < count:
                    raise BenchError(f"{len(pages)} ring entries, expected {count}")
                return {"harvest": t3 - t1, "reset": t3 - t2}

            v: Dict[str, Callable[[], Dict[str, float]]] = {}
            if api_ring is not None:
                v["pykvm"] = typed
            v["raw"] = raw
            if self.c_load(spec):
                c = self.c

                def cb() -> Dict[str, float]:
                    col, reset, _guest, npages = c.bench("dirty_ring", 1)
                    if npages < count:
                        raise BenchError(f"C saw {npages:.0f} ring entries, expected {count}")
                    return {"harvest": col + reset, "reset": reset}
                v["c"] = cb
            try:
                interleave(cfg.rounds, v, rows, budget_s=cfg.variant_budget_s)
            finally:
                if api_ring is not None:
                    api_ring.close()
                u32.release()
                q.release()
                ring.close()
                m.close()

    # -- compute --------------------------------------------------------------------------------------
    def case_compute(self) -> None:
        cfg = self.cfg
        for cpl, iters in ((3, cfg.compute3_iters), (0, cfg.compute0_iters)):
            r = self.row(f"compute.cpl{cpl}", "compute",
                         f"CPL{cpl}: {iters:,} iterations then `out`" + (" (native)" if cpl == 3 else
                                                                          " (KVM's emulator here)"),
                         "pykvm: one `vcpu.run()`; raw: one `run_raw()`; Unicorn: emu_start over the "
                         f"same bytes ({cfg.unicorn_iters:,} iterations)")
            spec = G.Spec(G.code_compute(iters), cpl=cpl)
            m = spec.build(self.kvm)
            vcpu = m.vcpu

            def typed(vcpu=vcpu, iters=iters) -> float:
                self.wd.arm(vcpu, 120)
                t0 = pc()
                e = vcpu.run()
                dt = pc() - t0
                self.wd.disarm()
                if e.__class__ is not IoOut or e.port != G.PORT_DONE:
                    raise _bad("out to the done port", e)
                return dt / iters

            def raw(vcpu=vcpu, iters=iters) -> float:
                self.wd.arm(vcpu, 120)
                t0 = pc()
                x = vcpu.run_raw()
                dt = pc() - t0
                self.wd.disarm()
                if x != _IO:
                    raise _bad("IO exit", x)
                return dt / iters

            v = {"pykvm": typed, "raw": raw}
            if self.c_load(spec):
                v["c"] = self.c_batch("until", 1, G.PORT_DONE, per=iters)
            if self.unicorn:
                v["unicorn"] = uc.compute_batch(cfg.unicorn_iters)
            try:
                interleave(cfg.rounds, v, r)
            finally:
                m.close()


# ---------------------------------------------------------------------------
# helpers

def _vmm_tiny_kernel(root: str) -> Optional[str]:
    """Build tests/vmm/kernels/tiny.S (as --32, ld -m elf_i386) into a cache dir; None if impossible."""
    src = Path(root) / "tests" / "vmm" / "kernels"
    if not (src / "tiny.S").exists() or shutil.which("as") is None or shutil.which("ld") is None:
        return None
    out = Path(tempfile.gettempdir()) / "pykvm-bench-vmm"
    out.mkdir(exist_ok=True)
    obj, elf = out / "tiny.o", out / "tiny.elf"
    try:
        subprocess.run(["as", "--32", "-I", str(src), "-o", str(obj), str(src / "tiny.S")],
                       check=True, capture_output=True, timeout=60)
        subprocess.run(["ld", "-m", "elf_i386", "-T", str(src / "kernel.ld"), "-o", str(elf), str(obj)],
                       check=True, capture_output=True, timeout=60)
    except (subprocess.SubprocessError, OSError):
        return None
    return str(elf)


def dirty_pages(bitmap) -> List[int]:
    """Page numbers whose bit is set in a KVM dirty bitmap: pykvm's own decoder.

    The raw column pairs it with a bare ioctl, so it measures what
    ``get_dirty_log`` adds on top (buffer allocation, argument checks).
    """
    return bitmap_to_pages(bitmap)


def host_info(kvm: pykvm.Kvm) -> Dict[str, object]:
    """What this host is (the figures only mean something next to this)."""
    import platform

    info: Dict[str, object] = {"kernel": platform.release(), "python": sys.version.split()[0],
                               "pykvm": pykvm.__version__, "cpus": os.cpu_count()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
        info["cpu_virt_flag"] = "vmx" if " vmx" in flags else "svm" if " svm" in flags else "none"
    except OSError:
        pass
    try:
        info["loadavg_start"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    mods = [m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if os.path.isdir(f"/sys/module/{m}")]
    info["kvm_module"] = ",".join(mods) or "?"
    for cap in ("NR_VCPUS", "MAX_VCPUS", "NR_MEMSLOTS", "X86_USER_SPACE_MSR", "EXIT_HYPERCALL",
                "DIRTY_LOG_RING_ACQ_REL", "IMMEDIATE_EXIT"):
        try:
            info[f"cap_{cap.lower()}"] = kvm.check_extension(getattr(Cap, cap))
        except (pykvm.KvmError, AttributeError):
            pass
    try:
        from .cref import find_compiler

        cc = find_compiler()
        if cc:
            info["cc"] = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                        timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    if uc.available():
        info["unicorn"] = uc.version()
    return info


__all__ = ["Config", "Suite", "GROUPS", "GROUP_TITLES", "dirty_pages", "host_info"]
