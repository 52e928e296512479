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
the C twin (``pykvm/bench/c/kvmbench.c``) runs the same ioctls on the same guest bytes and
times itself.  Rounds are interleaved (see :func:`pykvm.bench.core.interleave`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pykvm
from pykvm.uapi.enums import Cap

from . import uc
from .cases.base import GROUP_TITLES, GROUPS, Config, SuiteBase
from .cases.compute import ComputeCases
from .cases.dirty import DirtyCases, dirty_pages
from .cases.exits import ExitCases
from .cases.ioctl import IoctlCases
from .cases.life import LifeCases
from .cref import find_compiler

__all__ = ["GROUPS", "GROUP_TITLES", "Config", "Suite", "dirty_pages", "host_info"]


class Suite(IoctlCases, ExitCases, LifeCases, DirtyCases, ComputeCases, SuiteBase):
    """Runs the cases and collects :class:`~pykvm.bench.core.Row` s and notes."""

    def run(self) -> None:
        """Run every configured group in order; progress lines go to ``log`` (stderr)."""
        groups = self.cfg.groups or list(GROUPS)
        todo = [g for g in GROUPS if g in groups]
        for i, g in enumerate(todo, 1):
            self.log(f"[{g}] group {i} of {len(todo)} ...")
            t0 = time.monotonic()
            getattr(self, f"case_{g}")()
            self.log(f"[{g}] {time.monotonic() - t0:.1f} s")


def host_info(kvm: pykvm.Kvm) -> dict[str, object]:
    """What this host is (the figures only mean something next to this)."""
    import platform

    info: dict[str, object] = {"kernel": platform.release(), "python": sys.version.split()[0],
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
        cc = find_compiler()
        if cc:
            info["cc"] = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                        timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    if uc.available():
        info["unicorn"] = uc.version()
    return info

