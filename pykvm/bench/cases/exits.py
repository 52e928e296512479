"""Exit round trips to user space by kind at CPL0 and CPL3 (group ``exits``), and
in-kernel exits timed inside the guest with ``rdtsc`` (group ``inguest``).
"""

from __future__ import annotations

import fcntl
import struct
import time
from collections.abc import Callable

import pykvm
from pykvm.exits import (
    Hlt,
    Hypercall,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    X86Rdmsr,
    X86Wrmsr,
)
from pykvm.fd import ioctl
from pykvm.uapi import ioctls

from .. import guest, uc
from ..core import Row, interleave
from .base import (
    EXIT_HLT,
    EXIT_HYPERCALL,
    EXIT_IO,
    EXIT_MMIO,
    EXIT_RDMSR,
    EXIT_WRMSR,
    WATCHDOG_S,
    SuiteBase,
    bad,
)


class ExitCases(SuiteBase):
    """The ``exits`` cases (mixed into :class:`pykvm.bench.suite.Suite`)."""

    def _typed_loop(self, kind: str, vcpu: pykvm.Vcpu, n: int) -> Callable[[], float]:
        pc = self.pc
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
                        raise bad(cls.__name__, e)
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
                        raise bad(cls.__name__, e)
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
                        raise bad(cls.__name__, e)
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
                        raise bad(cls.__name__, e)
                dt = pc() - t0
                wd.disarm()
                return dt / n
        return go

    def _raw_loop(self, kind: str, vcpu: pykvm.Vcpu, n: int) -> Callable[[], float]:
        pc = self.pc
        rr, wd, rng, mm = vcpu.run_raw, self.wd, range(n), vcpu.run_mmap
        want = {"pio_out": EXIT_IO, "pio_in": EXIT_IO, "mmio_write": EXIT_MMIO, "mmio_read": EXIT_MMIO, "hlt": EXIT_HLT,
                "rdmsr": EXIT_RDMSR, "wrmsr": EXIT_WRMSR, "hypercall": EXIT_HYPERCALL}[kind]

        def go() -> float:
            q = memoryview(mm).cast("Q")   # kvm_run as u64 words: io.data_offset = q[5], msr.data = q[6]
            try:
                wd.arm(vcpu, WATCHDOG_S)
                if kind == "pio_in":
                    t0 = pc()
                    for _ in rng:
                        if rr() != want:
                            raise bad("IO", vcpu.exit_reason)
                        mm[q[5]] = 0x5A
                elif kind == "mmio_read":
                    t0 = pc()
                    for _ in rng:
                        if rr() != want:
                            raise bad("MMIO", vcpu.exit_reason)
                        mm[40] = 0x5A
                elif kind == "rdmsr":
                    t0 = pc()
                    for _ in rng:
                        if rr() != want:
                            raise bad("X86_RDMSR", vcpu.exit_reason)
                        mm[32] = 0
                        q[6] = 0x5A
                elif kind == "wrmsr":
                    t0 = pc()
                    for _ in rng:
                        if rr() != want:
                            raise bad("X86_WRMSR", vcpu.exit_reason)
                        mm[32] = 0
                elif kind == "hypercall":
                    t0 = pc()
                    for _ in rng:
                        if rr() != want:
                            raise bad("HYPERCALL", vcpu.exit_reason)
                        q[11] = 0
                else:
                    t0 = pc()
                    for _ in rng:
                        if rr() != want:
                            raise bad(f"exit {want}", vcpu.exit_reason)
                dt = pc() - t0
                wd.disarm()
                return dt / n
            finally:
                q.release()
        return go

    def _floor_loop(self, vcpu: pykvm.Vcpu, n: int) -> Callable[[], float]:
        pc = self.pc
        fd, RUN, fio, wd, rng = vcpu.fileno(), ioctls.KVM_RUN, fcntl.ioctl, self.wd, range(n)

        def go() -> float:
            wd.arm(vcpu, WATCHDOG_S)
            t0 = pc()
            for _ in rng:
                fio(fd, RUN)
            dt = pc() - t0
            wd.disarm()
            if vcpu.exit_reason != EXIT_IO:
                raise bad("IO exit", vcpu.exit_reason)
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
        n = min(cfg.exit_n if cpl == 0 else cfg.exit3_n, guest.UNROLL)
        group = f"exit{cpl}"
        label = self._LABELS[kind]
        note = ""
        opts: dict[int, int] = {}
        if kind in ("rdmsr", "wrmsr"):
            opts[guest.OPT_MSR_FILTER] = guest.MSR_INDEX
            note = (f"KVM_CAP_X86_USER_SPACE_MSR (reason FILTER) + KVM_X86_SET_MSR_FILTER denying "
                    f"MSR {guest.MSR_INDEX:#x}")
        if kind == "hypercall":
            opts[guest.OPT_EXIT_HYPERCALL] = 1 << 12          # KVM_HC_MAP_GPA_RANGE
            note = "vmcall of KVM_HC_MAP_GPA_RANGE; the loop body also has 4 register moves"
        r = self.row(f"{group}.{kind}", group, label, note)
        spec = guest.Spec(guest.code_exit(kind), cpl=cpl, options=opts)
        try:
            m = spec.build(self.kvm)
        except pykvm.KvmError as e:
            r.skipped = f"set-up failed on this host: {e}"
            return
        try:
            if kind == "hypercall" and not self._probe_hypercall(m, r):
                return
            v: dict[str, Callable[[], float]] = {
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

    def _probe_hypercall(self, m: guest.Machine, r: Row) -> bool:
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
            for name, body in guest.IN_GUEST_BODIES.items():
                r = self.row(f"inguest.cpl{cpl}.{name}", "inguest", f"CPL{cpl}: {labels[name]}",
                             f"rdtsc around {k} unrolled instructions, KVM_GET_TSC_KHZ to convert")
                spec = guest.Spec(guest.code_in_guest(body, k), cpl=cpl,
                              options={guest.OPT_IOEVENTFD_PIO: guest.PORT_EVENTFD})
                m = spec.build(self.kvm)
                vcpu = m.vcpu
                khz = ioctl(vcpu.fileno(), ioctls.KVM_GET_TSC_KHZ)
                r.info["tsc_khz"] = khz
                mem = m.vm.memory[0]

                def g(vcpu=vcpu, mem=mem, k=k, khz=khz) -> float:
                    self.wd.arm(vcpu, WATCHDOG_S)
                    e = vcpu.run()
                    self.wd.disarm()
                    if not isinstance(e, IoOut) or e.port != guest.PORT_RESULT:
                        raise bad("out to the result port", e)
                    cycles = struct.unpack_from("<Q", mem, guest.RESULT)[0]
                    return cycles / k / khz * 1e6
                try:
                    interleave(cfg.rounds, {"guest": g}, r)
                finally:
                    m.close()
