"""The "emulate instead" comparison: the same guest bytes under Unicorn.

Optional: :func:`available` is False (and the suite says so) when the
``unicorn`` package (pykvm's ``unicorn`` extra) is not installed.  Unicorn
runs the very code the KVM guests run (from :mod:`benchmarks.guest`), in
64-bit mode, with Python hooks standing in for the exits: an ``out`` hook, an
``in`` hook, an MMIO region (``mmio_map``) with Python read/write callbacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from . import guest as G

try:  # pragma: no cover - depends on the optional extra
    import unicorn as _uc
    from unicorn import x86_const as _x86
except Exception:
    _uc = None
    _x86 = None


def available() -> bool:
    return _uc is not None


def version() -> str:
    return getattr(_uc, "__version__", "?") if _uc else ""


def _machine(code: bytes):
    uc = _uc.Uc(_uc.UC_ARCH_X86, _uc.UC_MODE_64)
    uc.mem_map(0, G.RAM_SIZE)
    uc.mem_write(G.CODE, code)
    uc.reg_write(_x86.UC_X86_REG_RSP, 0x8000)
    return uc


def exit_batch(kind: str) -> Callable[[int], float]:
    """A function running *n* exits of *kind* (n <= guest.UNROLL); returns ns per exit."""
    code = G.code_exit(kind)
    uc = _machine(code)
    prologue = {"pio_out": 0, "pio_in": 0, "mmio_write": 10, "mmio_read": 10}[kind]
    body = 2
    state = {"n": 0}

    if kind == "pio_out":
        def on_out(uc_, port, size, value, user):
            if port != G.PORT_BENCH:
                raise RuntimeError(f"out to {port:#x}")
            state["n"] += 1
        uc.hook_add(_uc.UC_HOOK_INSN, on_out, None, 1, 0, _x86.UC_X86_INS_OUT)
    elif kind == "pio_in":
        def on_in(uc_, port, size, user):
            state["n"] += 1
            return 0x5A
        uc.hook_add(_uc.UC_HOOK_INSN, on_in, None, 1, 0, _x86.UC_X86_INS_IN)
    else:
        def on_read(uc_, offset, size, user):
            state["n"] += 1
            return 0x5A

        def on_write(uc_, offset, size, value, user):
            state["n"] += 1
        uc.mmio_map(G.MMIO, 0x1000, on_read, None, on_write, None)

    def run(n: int) -> float:
        if n > G.UNROLL:
            raise ValueError("batch larger than the unrolled block")
        state["n"] = 0
        until = G.CODE + prologue + body * n
        t0 = time.perf_counter_ns()
        uc.emu_start(G.CODE, until)
        dt = time.perf_counter_ns() - t0
        if state["n"] != n:
            raise RuntimeError(f"{kind}: {state['n']} hooks for {n} instructions")
        return dt / n

    return run


def compute_batch(iterations: int) -> Callable[[], float]:
    """Run the compute loop of *iterations*; return ns per iteration."""
    uc = _machine(G.code_compute(iterations))
    until = G.CODE + G.COMPUTE_LOOP[1]

    def run() -> float:
        t0 = time.perf_counter_ns()
        uc.emu_start(G.CODE, until)
        dt = time.perf_counter_ns() - t0
        if uc.reg_read(_x86.UC_X86_REG_RCX) != 0:
            raise RuntimeError("compute loop did not finish")
        return dt / iterations

    return run
