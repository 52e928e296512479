"""``pykvm probe --bench``: a few seconds of exit-latency measurement.

Four loops, each run for about *seconds* in batches:

* ``ioctl_floor`` — ``KVM_GET_API_VERSION`` on the system fd: the cost of one
  ioctl from Python (the floor under everything else);
* ``run_immediate_exit`` — ``KVM_RUN`` with ``kvm_run.immediate_exit`` = 1:
  enter and leave ``KVM_RUN`` without entering the guest (returns EINTR);
* ``pio_exit`` — a real-mode guest looping on ``out 0xe9, al``: one full
  guest entry, PIO exit and return to Python per iteration (the guest runs at
  CPL0, which some hosts, e.g. PVM, emulate in software);
* ``vm_create_close`` — ``KVM_CREATE_VM`` and close.

Results are the mean over all iterations and the best batch mean, in
microseconds.  Figures are noisy; compare runs made on one machine.  The
vCPU runs under a watchdog that kicks it, so a guest that never exits cannot
hang the probe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from ..system import Kvm
from ..uapi import ioctls as I
from .model import BenchResult

__all__ = ["PIO_GUEST", "run_benchmarks"]

T = TypeVar("T")

#: out 0xe9, al ; jmp short back to the out
PIO_GUEST = bytes([0xE6, 0xE9, 0xEB, 0xFC])
_CODE = 0x1000
_IO = 2
_INTR = 10


def _timed(name: str, description: str, body: Callable[[int], None], seconds: float,
           batch: int) -> BenchResult:
    """Call ``body(batch)`` until *seconds* have passed; time per iteration."""
    clock = time.perf_counter
    body(min(batch, 10))  # warm up
    total_n, total_t, best = 0, 0.0, float("inf")
    deadline = clock() + seconds
    while True:
        t0 = clock()
        body(batch)
        dt = clock() - t0
        total_n += batch
        total_t += dt
        best = min(best, dt / batch)
        if t0 + dt >= deadline:
            break
    return BenchResult(name=name, description=description, iterations=total_n,
                       seconds=round(total_t, 4), mean_us=round(total_t / total_n * 1e6, 3),
                       best_us=round(best * 1e6, 3))


def run_benchmarks(kvm: Kvm, seconds: float = 0.5) -> list[BenchResult]:
    """Run the four measurements on an open :class:`Kvm`; about ``4 * seconds`` in all."""
    import fcntl

    out: list[BenchResult] = []
    sys_fd = kvm.fileno()
    req = I.KVM_GET_API_VERSION
    ioctl = fcntl.ioctl

    def floor(n: int) -> None:
        for _ in range(n):
            ioctl(sys_fd, req, 0)

    out.append(_timed("ioctl_floor", "KVM_GET_API_VERSION on the system fd (fcntl.ioctl)",
                      floor, seconds, 1000))

    with kvm.create_vm() as vm:
        mem = vm.add_memory(0, 0x10000)
        mem.write(_CODE, PIO_GUEST)
        vcpu = vm.create_vcpu(0)
        s = vcpu.get_sregs()
        s.cs.base, s.cs.selector = 0, 0
        vcpu.set_sregs(s)
        r = vcpu.get_regs()
        r.rip, r.rflags, r.rax = _CODE, 2, 0x41
        vcpu.set_regs(r)
        mm = vcpu.run_mmap
        run_raw = vcpu.run_raw

        def immediate(n: int) -> None:
            for _ in range(n):
                mm[1] = 1
                run_raw()

        out.append(_timed("run_immediate_exit",
                          "KVM_RUN with immediate_exit=1 (EINTR, guest not entered)",
                          immediate, seconds, 1000))

        kicked: list[bool] = []
        limit = max(5.0, 20 * seconds)

        def guarded(fn: Callable[[], T]) -> T:
            with vcpu.kick_after(limit) as watchdog:
                try:
                    return fn()
                finally:
                    if watchdog.fired:
                        kicked.append(True)

        first = guarded(vcpu.run)
        note = None
        if getattr(first, "port", None) != 0xE9:
            note = f"unexpected first exit {first!r}" + (" (watchdog kicked the vCPU)" if kicked else "")

        def pio_loop(n: int) -> None:
            for _ in range(n):
                if run_raw() != _IO:
                    raise RuntimeError("the guest stopped making PIO exits")

        def pio(n: int) -> None:
            guarded(lambda: pio_loop(n))

        if note is None:
            try:
                res = _timed("pio_exit", "guest 'out 0xe9,al' -> KVM_EXIT_IO -> Python, per "
                             "iteration (real mode, CPL0)", pio, seconds, 200)
                out.append(res)
            except RuntimeError as e:
                note = str(e) + (" (watchdog kicked the vCPU)" if kicked else "")
        if note is not None:
            out.append(BenchResult("pio_exit", "guest PIO exit round trip", 0, 0.0, 0.0, 0.0,
                                   note=note))

    def create_close(n: int) -> None:
        for _ in range(n):
            kvm.create_vm().close()

    out.append(_timed("vm_create_close", "KVM_CREATE_VM + close", create_close, seconds, 20))
    return out
