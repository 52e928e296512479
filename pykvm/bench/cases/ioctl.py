"""Binding overhead: one ioctl at a time (group ``ioctl``).
"""

from __future__ import annotations

import fcntl
from collections.abc import Callable

import pykvm
from pykvm.fd import ioctl
from pykvm.uapi import ioctls, structs
from pykvm.uapi.enums import Cap

from .. import guest
from ..core import interleave
from .base import EXIT_INTR, SuiteBase, bad


class IoctlCases(SuiteBase):
    """The ``ioctl`` cases (mixed into :class:`pykvm.bench.suite.Suite`)."""

    def case_ioctl(self) -> None:
        pc = self.pc
        cfg, kvm = self.cfg, self.kvm
        n, rounds = cfg.ioctl_n, cfg.rounds
        spec = guest.Spec(guest.code_exit("pio_out"))
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
             "raw": calls(ioctl, kfd, ioctls.KVM_GET_API_VERSION),
             "fcntl": calls(fcntl.ioctl, kfd, ioctls.KVM_GET_API_VERSION)}
        if has_c:
            v["c"] = self.c_batch("api", n)
        interleave(rounds, v, r)

        cap = int(Cap.IMMEDIATE_EXIT)
        r = self.row("ioctl.check_extension", "ioctl", "KVM_CHECK_EXTENSION",
                     "pykvm: `kvm.check_extension(Cap.IMMEDIATE_EXIT)`; raw: `ioctl(fd, KVM_CHECK_EXTENSION, cap)`")
        v = {"pykvm": calls(kvm.check_extension, Cap.IMMEDIATE_EXIT),
             "raw": calls(ioctl, kfd, ioctls.KVM_CHECK_EXTENSION, cap)}
        if has_c:
            v["c"] = self.c_batch("check", n, cap)
        interleave(rounds, v, r)

        regs = vcpu.get_regs()
        buf = structs.kvm_regs()
        r = self.row("ioctl.get_regs", "ioctl", "KVM_GET_REGS",
                     "pykvm: `vcpu.get_regs()` (new struct each call); raw: `ioctl(fd, KVM_GET_REGS, buf)`")
        v = {"pykvm": calls(vcpu.get_regs), "raw": calls(ioctl, vfd, ioctls.KVM_GET_REGS, buf),
             "fcntl": calls(fcntl.ioctl, vfd, ioctls.KVM_GET_REGS, buf, True)}
        if has_c:
            v["c"] = self.c_batch("get_regs", n)
        interleave(rounds, v, r)

        r = self.row("ioctl.set_regs", "ioctl", "KVM_SET_REGS",
                     "pykvm: `vcpu.set_regs(regs)`; raw: `ioctl(fd, KVM_SET_REGS, regs)`")
        v = {"pykvm": calls(vcpu.set_regs, regs), "raw": calls(ioctl, vfd, ioctls.KVM_SET_REGS, regs),
             "fcntl": calls(fcntl.ioctl, vfd, ioctls.KVM_SET_REGS, regs, True)}
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
                    raise bad("Interrupted", e)
            return (pc() - t0) / n

        def raw() -> float:
            t0 = pc()
            for _ in rng:
                mm[1] = 1
                if run_raw() != EXIT_INTR:
                    raise bad("EINTR", vcpu.exit_reason)
            return (pc() - t0) / n

        def floor() -> float:
            fio, RUN = fcntl.ioctl, ioctls.KVM_RUN
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
