"""The benchmark guests' code and the bitmap decoder, checked without KVM."""

from __future__ import annotations

import pytest

from pykvm.bench import guest
from pykvm.bench.suite import dirty_pages


@pytest.mark.no_kvm_needed
def test_dirty_pages_matches_a_plain_loop():
    bm = bytearray(64)
    for p in (0, 1, 7, 8, 63, 64, 65, 100, 200, 201, 202, 203, 204, 205, 206, 207, 511):
        bm[p >> 3] |= 1 << (p & 7)
    bm[40:48] = b"\xff" * 8
    want = [i for i in range(len(bm) * 8) if bm[i >> 3] >> (i & 7) & 1]
    assert dirty_pages(bm) == want
    assert dirty_pages(bytearray(32)) == []
    assert dirty_pages(b"\xff" * 4) == list(range(32))


@pytest.mark.no_kvm_needed
def test_guest_code_shapes():
    # The dirty loop's `jz` must land on the `inc al` after the loop, for any count.
    code = guest.code_dirty(0, 4096)
    jz = code.index(b"\x74")
    assert code[jz + 2 + code[jz + 1]:jz + 4 + code[jz + 1]] == b"\xFE\xC0"
    c = guest.code_compute(10)
    lo, out = guest.COMPUTE_LOOP
    assert c[lo:lo + 3] == b"\x48\xFF\xC9" and c[out] == 0xE6
    block = guest.code_exit("pio_out")
    assert block.count(guest.OUT) == guest.UNROLL
