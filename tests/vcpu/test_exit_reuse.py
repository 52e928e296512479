"""run() may hand out a cached IoOut/IoIn again, but never one the caller still holds."""

from __future__ import annotations

import gc

import pykvm
from pykvm.vcpu import run as run_engine
from tests.support.guests import real_mode

# loop: inc ax; out 0x10, al; jmp loop
COUNT_OUT = bytes([0x40, 0xE6, 0x10, 0xEB, 0xFB])
# loop: in al, 0x11; out 0x10, al; jmp loop
ECHO = bytes([0xE4, 0x11, 0xE6, 0x10, 0xEB, 0xFA])


def test_kept_exits_are_distinct_and_unchanged(vm):
    vcpu = real_mode(vm, COUNT_OUT, rax=0)
    kept = []
    with vcpu.kick_after(20):
        for _ in range(40):
            kept.append(vcpu.run())
    assert len({id(e) for e in kept}) == len(kept)
    for i, e in enumerate(kept, 1):
        assert isinstance(e, pykvm.IoOut)
        assert (e.port, e.size, e.count, e.data) == (0x10, 1, 1, bytes([i & 0xFF]))


def test_dropped_exits_are_recycled_and_decoded_afresh(vm):
    vcpu = real_mode(vm, COUNT_OUT, rax=0)
    seen = set()
    prev = None
    with vcpu.kick_after(20):
        for i in range(1, 201):
            e = vcpu.run()
            assert e is not prev  # the previous exit is still referenced by `prev`
            assert isinstance(e, pykvm.IoOut) and e.port == 0x10 and e.data == bytes([i & 0xFF])
            seen.add(id(e))
            prev = e
    if run_engine._REUSE:
        assert len(seen) <= 3  # two cached objects (plus at most one fresh)
    else:
        assert len(seen) >= 2


def test_held_io_in_is_not_reused(vm):
    vcpu = real_mode(vm, ECHO)
    with vcpu.kick_after(20):
        first = vcpu.run()
        assert isinstance(first, pykvm.IoIn) and first.port == 0x11
        first.set_data(0x42)
        others = []
        for k in range(6):
            out = vcpu.run()
            assert isinstance(out, pykvm.IoOut) and out.data == bytes([0x42 if k == 0 else k + 9])
            e = vcpu.run()
            assert isinstance(e, pykvm.IoIn) and e is not first
            e.set_data(k + 10)
            others.append(e)
            del e
            gc.collect()
    assert first.port == 0x11 and first.size == 1 and first.count == 1
    assert len({id(x) for x in [*others, first]}) == len(others) + 1
