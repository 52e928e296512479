"""Property-based fuzzing of the snapshot reader over mutated valid files (hypothesis).

Two kinds of mutation, mixed: raw ones (flip, overwrite, insert, cut bytes:
mostly caught by a CRC) and forged ones that re-compute every CRC afterwards
(record payloads, header values, record order), which reach the checks
behind the CRCs.  The properties, on real KVM:

* ``verify``, ``check_compatible`` and ``restore`` end in success or
  ``SnapshotError`` (a documented subclass), nothing else;
* ``verify`` never uses more than a few MB more than the file's size
  (tracemalloc);
* a file ``verify`` accepts is never refused by ``restore`` as corrupt;
* a file ``check_compatible`` calls compatible is restored.

CI runs a small budget; ``PYKVM_FUZZ_EXAMPLES=100000`` runs it long.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pykvm
from pykvm import snapshot

from . import support_forge as forge

EXAMPLES = int(os.environ.get("PYKVM_FUZZ_EXAMPLES", "120"))
_BASE: list[bytes] = []
_KVM: list[pykvm.Kvm] = []
STATS = {"examples": 0, "verify_ok": 0, "restored": 0}

INTERESTING = [0, 1, 7, 8, 24, 4095, 4096, 0x7FFFFFFF, 0xFFFFFFFF, 2**32, 2**63, 2**64 - 1]


def _base() -> bytes:
    if not _BASE:
        _KVM.append(pykvm.Kvm())
        _BASE.append(forge.small_snapshot(_KVM[0]))
    return _BASE[0]


def _leaf_paths(obj: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(obj, dict):
        out = [path]
        for k, v in obj.items():
            out += _leaf_paths(v, (*path, k))
        return out
    if isinstance(obj, list):
        out = [path]
        for i, v in enumerate(obj[:8]):
            out += _leaf_paths(v, (*path, i))
        return out
    return [path]


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from(INTERESTING),
                        st.text(max_size=8), st.just([]), st.just({}), st.just("0x10"),
                        st.lists(st.integers(0, 5), max_size=3))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = _base()
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "int", "cut", "insert", "payload", "header", "records"]))
        if kind == "flip" and data:
            pos = draw(st.integers(0, len(data) - 1))
            data = data[:pos] + bytes([data[pos] ^ (1 << draw(st.integers(0, 7)))]) + data[pos + 1:]
        elif kind == "int" and len(data) > 8:
            pos = draw(st.integers(0, len(data) - 8))
            width = draw(st.sampled_from([4, 8]))
            v = draw(st.sampled_from(INTERESTING)) % (1 << (8 * width))
            data = data[:pos] + v.to_bytes(width, "little") + data[pos + width:]
        elif kind == "cut":
            a = draw(st.integers(0, len(data)))
            b = draw(st.integers(a, min(len(data), a + 64)))
            data = data[:a] + data[b:]
        elif kind == "insert":
            pos = draw(st.integers(0, len(data)))
            data = data[:pos] + draw(st.binary(min_size=1, max_size=32)) + data[pos:]
        else:
            data = _forge(draw, data, kind) or data
    return data


def _forge(draw: st.DrawFn, data: bytes, kind: str) -> bytes | None:
    """A mutation behind valid CRCs (None if *data* no longer parses as records)."""
    try:
        version, hjson, recs = forge.parse(data)
        h = json.loads(hjson)
    except (AssertionError, struct.error, ValueError, UnicodeDecodeError, RecursionError):
        return None
    if kind == "payload" and recs:
        k = draw(st.integers(0, len(recs) - 1))
        tag, arg, p = recs[k]
        if p and draw(st.booleans()):
            pos = draw(st.integers(0, len(p) - 1))
            width = min(len(p) - pos, draw(st.sampled_from([1, 2, 4, 8])))
            v = draw(st.sampled_from(INTERESTING)) % (1 << (8 * width))
            p = p[:pos] + v.to_bytes(width, "little") + p[pos + width:]
        else:
            p = p[:draw(st.integers(0, len(p)))] + draw(st.binary(max_size=16))
        recs[k] = (tag, draw(st.sampled_from([arg, arg, arg + 1, 0])), p)
    elif kind == "header":
        paths = _leaf_paths(h)
        path = draw(st.sampled_from(paths))
        if not path:
            h = draw(JSON_VALUES)
        else:
            parent = h
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.integers(0, 4)) == 0 and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(JSON_VALUES)
    elif kind == "records" and recs:
        i = draw(st.integers(0, len(recs) - 1))
        j = draw(st.integers(0, len(recs) - 1))
        op = draw(st.sampled_from(["swap", "drop", "dup"]))
        if op == "swap":
            recs[i], recs[j] = recs[j], recs[i]
        elif op == "drop":
            del recs[i]
        else:
            recs.insert(j, recs[i])
    return forge.build(json.dumps(h).encode(), recs, version)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for kvm in _KVM:
        kvm.close()
    print(f"\nsnapshot fuzz: {STATS}")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          database=None)
@given(mutated())
def test_reader_only_raises_snapshot_errors(data: bytes) -> None:
    STATS["examples"] += 1
    kvm = _KVM[0] if _KVM else None
    tracemalloc.start()
    try:
        try:
            snapshot.verify(io.BytesIO(data))
            ok = True
        except snapshot.SnapshotError:
            ok = False
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * len(data) + (4 << 20), f"verify of a {len(data)}-byte file peaked at {peak} bytes"
    if not ok:
        return
    STATS["verify_ok"] += 1
    assert kvm is not None
    try:
        problems = snapshot.check_compatible(io.BytesIO(data), kvm)
    except snapshot.SnapshotCorrupt as e:                       # pragma: no cover - the property
        raise AssertionError(f"verify accepted a file check_compatible calls corrupt: {e}") from None
    try:
        vm = snapshot.restore(io.BytesIO(data), kvm)
    except snapshot.SnapshotCorrupt as e:                       # pragma: no cover - the property
        raise AssertionError(f"verify accepted a file restore calls corrupt: {e}") from None
    except snapshot.SnapshotError as e:
        assert problems, f"check_compatible said compatible, restore refused: {e}"
        return
    vm.close()
    STATS["restored"] += 1
