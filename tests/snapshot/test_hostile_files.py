"""Hostile snapshot files: forged lengths, counts, types and coverage, with valid CRCs.

Every file here is refused with ``SnapshotError`` (a documented subclass)
naming the file and the field, by ``verify``, ``check_compatible`` and
``restore`` alike, without allocating or looping on a length the file does
not hold (tracemalloc peak stays small for files of a few KB).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import pykvm
from pykvm import snapshot
from pykvm.uapi import structs

from . import support_forge as forge

ROOT = Path(__file__).resolve().parents[2]
Corrupt, Incompatible = snapshot.SnapshotCorrupt, snapshot.SnapshotIncompatible


@pytest.fixture(scope="module")
def base() -> bytes:
    with pykvm.Kvm() as kvm:
        return forge.small_snapshot(kvm)


def _with_header(data: bytes, edit: Callable[[dict], None]) -> bytes:
    _, hjson, recs = forge.parse(data)
    h = forge.header(hjson)
    edit(h)
    return forge.build(forge.dump(h), recs)


def _with_records(data: bytes, edit: Callable[[list[forge.Record]], None]) -> bytes:
    _, hjson, recs = forge.parse(data)
    edit(recs)
    return forge.build(hjson, recs)


def _with_item(data: bytes, tag: bytes, edit: Callable[[list[tuple[str, bytes]]], None]) -> bytes:
    def go(recs: list[forge.Record]) -> None:
        k = next(i for i, r in enumerate(recs) if r[0] == tag)
        pairs = forge.items(recs[k][2])
        edit(pairs)
        recs[k] = (tag, recs[k][1], forge.pack_items(pairs))
    return _with_records(data, go)


def _set_item(name: str, value: bytes) -> Callable[[list[tuple[str, bytes]]], None]:
    def go(pairs: list[tuple[str, bytes]]) -> None:
        k = next(i for i, (n, _) in enumerate(pairs) if n == name)
        pairs[k] = (name, value)
    return go


def _item(data: bytes, tag: bytes, name: str) -> bytes:
    _, _, recs = forge.parse(data)
    return dict(forge.items(next(p for t, _, p in recs if t == tag)))[name]


def _mem_first(recs: list[forge.Record]) -> int:
    return next(i for i, r in enumerate(recs) if r[0] in (b"MEMD", b"MEMZ"))


def _lying_length(data: bytes, tag: bytes, length: int) -> bytes:
    """The first *tag* record claims *length* payload bytes; the file ends soon after."""
    _, hjson, recs = forge.parse(data)
    k = next(i for i, r in enumerate(recs) if r[0] == tag)
    out = forge.header_bytes(hjson) + b"".join(forge.record(*r) for r in recs[:k])
    return out + forge.record(recs[k][0], recs[k][1], recs[k][2], length=length)


def _cases(d: bytes) -> Iterator[tuple[str, bytes, type[Exception], str]]:
    mp = struct.pack("<I", 77)
    xcrs = structs.kvm_xcrs.from_buffer_copy(_item(d, b"VCPU", "xcrs"))
    xcrs.nr_xcrs = 99
    chip = bytearray(_item(d, b"VMST", "irqchip.0"))
    chip[0] = 2
    msrs = _item(d, b"VCPU", "msrs")
    cpuid = _item(d, b"VCPU", "cpuid")
    # lengths and counts the file does not hold
    yield "MEMD claims 1 TiB", _lying_length(d, b"MEMD", 1 << 40), Corrupt, "data record .* holds"
    yield "MEMD claims 64 KiB + 8 (within chunk) in a short file", \
        _lying_length(d, b"MEMD", 0x10008)[:-100], Corrupt, "truncated"
    yield "VCPU record claims 3 MiB", _lying_length(d, b"VCPU", 3 << 20), Corrupt, "truncated: VCPU record"
    yield "VCPU record claims 2**63", _lying_length(d, b"VCPU", 1 << 63), Corrupt, "claims"
    yield "header claims 1 MiB", struct.pack("<8sII", b"PYKVMSNP", 1, 1 << 20) + b"{}", Corrupt, \
        "truncated: JSON header"
    yield "header claims 4 GiB", struct.pack("<8sII", b"PYKVMSNP", 1, 2**32 - 1), Corrupt, "over the limit"
    yield "empty file", b"", Corrupt, "truncated: file header"
    # the JSON header
    yield "deeply nested JSON", forge.header_bytes(b"[" * 200000 + b"]" * 200000), Corrupt, "nested too deeply"
    yield "header not UTF-8", forge.header_bytes(b'{"a": "\xff"}'), Corrupt, "not UTF-8"
    yield "NaN in header", forge.header_bytes(b'{"a": NaN}'), Corrupt, "not valid JSON"
    yield "duplicate key", forge.header_bytes(b'{"a": 1, "a": 2}'), Corrupt, "not valid JSON"
    yield "huge integer", forge.header_bytes(b'{"a": ' + b"9" * 5000 + b"}"), Corrupt, "not valid JSON"
    yield "header is a list", forge.header_bytes(b"[]"), Corrupt, r"\(top level\) must be an object"
    yield "kvm_api a string", _with_header(d, lambda h: h["host"].update(kvm_api="12")), Corrupt, \
        "host.kvm_api must be an integer"
    yield "vcpus repeated", _with_header(d, lambda h: h["vm"].update(vcpus=[0, 0])), Corrupt, "vm.vcpus"
    yield "memory size negative", _with_header(d, lambda h: h["vm"]["memory"][0].update(size=-1)), \
        Corrupt, r"vm.memory\[0\].size"
    yield "memory flags bool", _with_header(d, lambda h: h["vm"]["memory"][0].update(flags=True)), \
        Corrupt, r"vm.memory\[0\].flags"
    yield "chunk_size 0", _with_header(d, lambda h: h.update(chunk_size=0)), Corrupt, "chunk_size"
    yield "chunk_size 1 TiB", _with_header(d, lambda h: h.update(chunk_size=1 << 40)), Corrupt, "chunk_size"
    yield "metadata missing", _with_header(d, lambda h: h.pop("metadata")), Corrupt, "metadata is missing"
    yield "irqchip not bool", _with_header(d, lambda h: h["vm"].update(irqchip=1)), Corrupt, "vm.irqchip"
    yield "irqchip flag lies", _with_header(d, lambda h: h["vm"].update(irqchip=False)), Corrupt, \
        "vm.irqchip / vm.pit"
    yield "msr list not hex", _with_header(d, lambda h: h["host"].update(msr_index_list=["zz"])), \
        Corrupt, "msr_index_list"
    yield "header version 2", _with_header(d, lambda h: h.update(version=2)), Incompatible, "version is 2"
    # record structure
    yield "VMST twice", _with_records(d, lambda r: r.insert(1, r[0])), Corrupt, "out of order"
    yield "VCPU before VMST", _with_records(d, lambda r: r.insert(0, r.pop(1))), Corrupt, "out of order"
    yield "no VMST", _with_records(d, lambda r: r.pop(0)), Corrupt, "no VM state"
    yield "extra VCPU", _with_records(d, lambda r: r.insert(2, (b"VCPU", 1, r[1][2]))), Corrupt, \
        "more VCPU records"
    yield "unknown tag", _with_records(d, lambda r: r.insert(_mem_first(r), (b"XXXX", 0, b""))), Corrupt, \
        "unexpected record"
    yield "trailing data", d + b"\0", Corrupt, "trailing data"
    # memory coverage
    yield "page written twice", _with_records(d, lambda r: r.insert(_mem_first(r), r[_mem_first(r)])), \
        Corrupt, "records lost or repeated"
    yield "record dropped", _with_records(d, lambda r: r.pop(_mem_first(r))), Corrupt, "records lost"
    yield "zero-length zero run", _with_records(
        d, lambda r: r.insert(_mem_first(r), (b"MEMZ", 0, struct.pack("<QQ", 0, 0)))), Corrupt, "non-empty"
    yield "data record without data", _with_records(
        d, lambda r: r.insert(_mem_first(r), (b"MEMD", 0, struct.pack("<Q", 0)))), Corrupt, "holds 8 bytes"
    yield "zero run past the region", _with_records(
        d, lambda r: r.insert(_mem_first(r), (b"MEMZ", 0, struct.pack("<QQ", 0, 1 << 62)))), Corrupt, \
        "records lost or repeated"
    yield "memory for region 1 of 1", _with_records(
        d, lambda r: r.insert(_mem_first(r), (b"MEMZ", 1, struct.pack("<QQ", 0, 4096)))), Corrupt, \
        "for region 1"
    # items
    yield "unknown item", _with_item(d, b"VCPU", lambda p: p.append(("sev", b"x"))), Incompatible, "'sev'"
    yield "item twice", _with_item(d, b"VCPU", lambda p: p.append(p[0])), Corrupt, "appears twice"
    yield "item name not ASCII", _with_item(d, b"VCPU", lambda p: p.append(("r\u00e9gs", b""))), Corrupt, \
        "not ASCII"
    yield "regs short", _with_item(d, b"VCPU", _set_item("regs", b"\0" * 10)), Corrupt, "item regs: 10 bytes"
    yield "regs missing", _with_item(d, b"VCPU", lambda p: p.pop(0)), Corrupt, "regs is missing"
    yield "mp_state 77", _with_item(d, b"VCPU", _set_item("mp_state", mp)), Corrupt, "mp_state: 77"
    yield "xcrs count 99", _with_item(d, b"VCPU", _set_item("xcrs", bytes(xcrs))), Corrupt, "nr_xcrs 99"
    yield "msr reserved", _with_item(d, b"VCPU", _set_item("msrs", msrs[:4] + b"\1" + msrs[5:])), Corrupt, \
        "reserved"
    yield "msr twice", _with_item(d, b"VCPU", _set_item("msrs", msrs + msrs[:16])), Corrupt, "appears twice"
    yield "msrs ragged", _with_item(d, b"VCPU", _set_item("msrs", msrs + b"\0")), Corrupt, "16-byte entries"
    yield "cpuid 257 entries", _with_item(d, b"VCPU", _set_item("cpuid", cpuid[:40] * 257)), Corrupt, \
        "at most 256"
    yield "irqchip id mismatch", _with_item(d, b"VMST", _set_item("irqchip.0", bytes(chip))), Corrupt, \
        "chip_id 2"
    yield "irqchip partial", _with_item(d, b"VMST", lambda p: p.pop(0)), Corrupt, "irqchip items"
    # regions
    yield "region unaligned", _region(d, guest_phys_addr=0x800), Corrupt, "page-aligned"
    yield "region flags", _region(d, flags=4), Corrupt, r"flags"
    yield "region slot 70000", _region(d, slot=70000), Corrupt, r"slot"


def _region(data: bytes, **change: int) -> bytes:
    """Change region 0 in both the header and its MEMR record (a consistent lie)."""
    _, hjson, recs = forge.parse(data)
    h = forge.header(hjson)
    m = h["vm"]["memory"][0]
    m.update(change)
    k = next(i for i, r in enumerate(recs) if r[0] == b"MEMR")
    recs[k] = (b"MEMR", 0, struct.pack("<IIQQ", m["slot"], m["flags"], m["guest_phys_addr"], m["size"]))
    return forge.build(forge.dump(h), recs)


def test_base_is_valid(base: bytes, tmp_path: Path) -> None:
    path = tmp_path / "base.snap"
    path.write_bytes(base)
    assert snapshot.verify(path).memory_size == forge.RAM
    assert snapshot.check_compatible(path) == []
    with snapshot.restore(path) as vm:
        assert vm.read(0x8000, 2048) == bytes(range(256)) * 8


def test_hostile_files_are_refused(base: bytes, tmp_path: Path) -> None:
    """Each forged file: the documented error naming the file, bounded memory, no leak."""
    fds = len(os.listdir("/proc/self/fd"))
    names = set()
    with pykvm.Kvm() as kvm:
        for name, data, exc, words in _cases(base):
            assert name not in names
            names.add(name)
            path = tmp_path / "hostile.snap"
            path.write_bytes(data)
            tracemalloc.start()
            try:
                with pytest.raises(exc, match=words) as ei:
                    snapshot.verify(path)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert str(path) in str(ei.value), name
            # bounded: a file of a few hundred KB never costs more than a few MB
            assert peak < 8 * len(data) + (4 << 20), f"{name}: verify peaked at {peak} bytes"
            if exc is Corrupt:
                with pytest.raises(exc, match=words):
                    snapshot.restore(path, kvm)
                with pytest.raises(exc, match=words):
                    snapshot.check_compatible(path, kvm)
            else:
                with pytest.raises(snapshot.SnapshotError):
                    snapshot.restore(path, kvm)
                assert snapshot.check_compatible(path, kvm)
    assert len(os.listdir("/proc/self/fd")) == fds


def test_restore_refuses_more_ram_than_allowed(base: bytes, tmp_path: Path) -> None:
    """A few-KB file may describe terabytes of zeros: restore maps at most max_memory."""
    _, hjson, recs = forge.parse(base)
    h = forge.header(hjson)
    big = 1 << 40
    h["vm"]["memory"][0]["size"] = big
    state = [r for r in recs if r[0] in (b"VMST", b"VCPU")]
    mem = [(b"MEMR", 0, struct.pack("<IIQQ", 0, 0, 0, big)), (b"MEMZ", 0, struct.pack("<QQ", 0, big))]
    path = tmp_path / "tera.snap"
    path.write_bytes(forge.build(forge.dump(h), state + mem + [forge.end_record(state + mem)]))
    assert snapshot.verify(path).memory_size == big          # a valid file: 1 TiB of zeros
    with pytest.raises(snapshot.SnapshotIncompatible, match="max_memory"):
        snapshot.restore(path)
    assert any("max_memory" in p for p in snapshot.check_compatible(path))


def _many_regions(base: bytes, n: int, repeat: int = -1) -> bytes:
    """*base* with *n* one-page regions of zeros (region *repeat* covered twice, if given)."""
    _, hjson, recs = forge.parse(base)
    h = forge.header(hjson)
    h["vm"]["memory"] = [{"slot": k, "flags": 0, "guest_phys_addr": k * 4096, "size": 4096} for k in range(n)]
    state = [r for r in recs if r[0] in (b"VMST", b"VCPU")]
    mem: list[forge.Record] = [(b"MEMR", k, struct.pack("<IIQQ", k, 0, k * 4096, 4096)) for k in range(n)]
    mem += [(b"MEMZ", k, struct.pack("<QQ", 0, 4096)) for k in range(n)]
    if repeat >= 0:
        mem[n + repeat + 1] = (b"MEMZ", repeat, struct.pack("<QQ", 0, 4096))
    return forge.build(forge.dump(h), state + mem + [forge.end_record(state + mem)])


def test_many_regions(base: bytes, tmp_path: Path) -> None:
    """20000 regions of one page each: parsed, covered and checked exactly (linear work)."""
    n = 20000
    path = tmp_path / "many.snap"
    path.write_bytes(_many_regions(base, n))
    assert snapshot.verify(path).memory_size == n * 4096
    # one page covered twice, among 20000 regions
    path.write_bytes(_many_regions(base, n, repeat=499))
    with pytest.raises(Corrupt, match="region 499"):
        snapshot.verify(path)


def test_overlapping_regions(base: bytes, tmp_path: Path) -> None:
    _, hjson, recs = forge.parse(base)
    h = forge.header(hjson)
    m = h["vm"]["memory"][0]
    h["vm"]["memory"].append(dict(m, slot=1, guest_phys_addr=0x1000))
    k = _mem_first(recs)
    extra = [(b"MEMR", 1, struct.pack("<IIQQ", 1, 0, 0x1000, m["size"]))]
    mem = [*recs[k:-1], (b"MEMZ", 1, struct.pack("<QQ", 0, m["size"]))]
    body = recs[:k] + extra + mem
    path = tmp_path / "overlap.snap"
    path.write_bytes(forge.build(forge.dump(h), [*body, forge.end_record(body)]))
    with pytest.raises(Corrupt, match="overlap"):
        snapshot.verify(path)


def test_odd_sources(base: bytes, tmp_path: Path) -> None:
    """Devices, pipes, directories and text files are sources too; each ends in SnapshotError."""
    with pytest.raises(Corrupt, match="/dev/zero: not a pykvm snapshot"):
        snapshot.verify("/dev/zero")
    with pytest.raises(snapshot.SnapshotError, match="is a directory"):
        snapshot.verify(tmp_path)
    with pytest.raises(snapshot.SnapshotError, match="No such file"):
        snapshot.verify(tmp_path / "absent.snap")
    path = tmp_path / "base.snap"
    path.write_bytes(base)
    with open(path, encoding="latin-1") as text, pytest.raises(snapshot.SnapshotError, match="binary"):
        snapshot.verify(text)
    # a pipe: size unknown, read in bounded pieces
    r, w = os.pipe()
    writer = subprocess.Popen(["cat", str(path)], stdout=w)
    os.close(w)
    with os.fdopen(r, "rb", buffering=0) as pipe:
        assert snapshot.verify(pipe).memory_size == forge.RAM
    writer.wait(10)
    # a pipe that lies about a length: refused after reading what arrived, not before
    r, w = os.pipe()
    os.write(w, _lying_length(base, b"VCPU", 3 << 20)[:60000])
    os.close(w)
    with os.fdopen(r, "rb", buffering=0) as pipe, pytest.raises(Corrupt, match="truncated"):
        snapshot.verify(pipe)


def test_worst_file_cost_in_a_fresh_process(base: bytes, tmp_path: Path) -> None:
    """The whole hostile set in one new process: its peak RSS stays that of a small program."""
    files = []
    for k, (_name, data, _exc, _words) in enumerate(_cases(base)):
        p = tmp_path / f"h{k}.snap"
        p.write_bytes(data)
        files.append(str(p))
    code = ("import resource, sys\nfrom pykvm import snapshot\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "for f in sys.argv[1:]:\n"
            "    try:\n        snapshot.verify(f)\n    except snapshot.SnapshotError:\n        pass\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    p = subprocess.run([sys.executable, "-c", code, *files], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    grown_kib = int(p.stdout)
    assert grown_kib < 64 << 10, f"verifying the hostile files grew RSS by {grown_kib} KiB"


def test_restore_refuses_thousands_of_regions(tmp_path: Path, base: bytes) -> None:
    """Re-creating memslots costs kernel time that grows with their number: bounded."""
    path = tmp_path / "regions.snap"
    path.write_bytes(_many_regions(base, snapshot.ops.MAX_RESTORE_REGIONS + 1))
    snapshot.verify(path)
    with pytest.raises(snapshot.SnapshotIncompatible, match="at most"):
        snapshot.restore(path)
    assert any("at most" in p for p in snapshot.check_compatible(path))
