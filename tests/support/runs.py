"""Running a vCPU under the one watchdog, :meth:`pykvm.Vcpu.kick_after`.

A guest must never hang a test: every run here is bounded, and a run the
watchdog had to end is a test failure that says so.
"""

from __future__ import annotations

import pykvm


def run_to_exit(vcpu: pykvm.Vcpu, seconds: float = 5.0) -> pykvm.Exit:
    """One ``run()`` under a watchdog; fails if the watchdog had to kick."""
    with vcpu.kick_after(seconds) as dog:
        e = vcpu.run()
    assert not dog.fired, f"the guest did not exit within {seconds} s (last: {e!r})"
    return e


def run_until(vcpu: pykvm.Vcpu, n: int = 16, seconds: float = 5.0) -> list[pykvm.Exit]:
    """Run up to *n* times under one watchdog, collecting exits until one is not ``IoOut``/``Debug``."""
    out = []
    with vcpu.kick_after(seconds):
        for _ in range(n):
            e = vcpu.run()
            out.append(e)
            if not isinstance(e, (pykvm.IoOut, pykvm.Debug)):
                break
    return out


def outs(exits: list[pykvm.Exit], port: int) -> list[int]:
    """The data of the ``IoOut`` exits on *port*, as ints (little endian)."""
    return [int.from_bytes(e.data, "little") for e in exits
            if isinstance(e, pykvm.IoOut) and e.port == port]
