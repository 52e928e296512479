"""Take snapshot files apart and put them back together, from ``docs/snapshot.md`` alone.

The hostile-file tests and the fuzzer use this to forge files whose CRCs are
right but whose content lies (a CRC is not a signature: anyone can forge
one).  Nothing here imports the reader under test.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import pykvm
from pykvm import snapshot

Record = tuple[bytes, int, bytes]            # tag, arg, payload


def parse(data: bytes) -> tuple[int, bytes, list[Record]]:
    """(version, JSON header bytes, records) of a well-formed file."""
    magic, version, hlen = struct.unpack_from("<8sII", data, 0)
    assert magic == b"PYKVMSNP"
    hjson = data[16:16 + hlen]
    pos = 16 + hlen + 4
    recs: list[Record] = []
    while pos < len(data):
        tag, arg, length, _crc, _hcrc = struct.unpack_from("<4sIQII", data, pos)
        recs.append((tag, arg, data[pos + 24:pos + 24 + length]))
        pos += 24 + length
    assert pos == len(data)
    return version, hjson, recs


def header_bytes(hjson: bytes, version: int = 1) -> bytes:
    head = struct.pack("<8sII", b"PYKVMSNP", version, len(hjson)) + hjson
    return head + struct.pack("<I", zlib.crc32(head))


def record(tag: bytes, arg: int, payload: bytes, length: int = -1) -> bytes:
    """One record with valid CRCs; *length* may lie about the payload size."""
    n = len(payload) if length < 0 else length
    head = struct.pack("<4sIQI", tag, arg, n, zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def build(hjson: bytes, recs: list[Record], version: int = 1) -> bytes:
    return header_bytes(hjson, version) + b"".join(record(t, a, p) for t, a, p in recs)


def header(hjson: bytes) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(hjson)
    return out


def dump(h: Any) -> bytes:
    return json.dumps(h).encode()


def items(payload: bytes) -> list[tuple[str, bytes]]:
    out, pos = [], 0
    while pos < len(payload):
        nlen, dlen = struct.unpack_from("<HI", payload, pos)
        out.append((payload[pos + 6:pos + 6 + nlen].decode(), payload[pos + 6 + nlen:pos + 6 + nlen + dlen]))
        pos += 6 + nlen + dlen
    return out


def pack_items(pairs: list[tuple[str, bytes]]) -> bytes:
    return b"".join(struct.pack("<HI", len(n.encode()), len(d)) + n.encode() + d for n, d in pairs)


def end_record(recs: list[Record]) -> Record:
    """A correct END record for *recs* (which must not hold one)."""
    total = sum(struct.unpack("<IIQQ", p)[3] for t, _, p in recs if t == b"MEMR")
    return (b"END ", 0, struct.pack("<QQ", len(recs), total))


RAM = 0x20000          # 128 KiB: one 64 KiB block of data, one zero block


def small_vm(kvm: pykvm.Kvm) -> pykvm.Vm:
    """A small VM with an irqchip, a PIT, one vCPU and a region of data and zeros."""
    vm = kvm.create_vm()
    try:
        vm.create_irq_chip()
        vm.create_pit2()
        mem = vm.add_memory(0, RAM)
        mem.write(0x100, b"pykvm snapshot fuzz base " * 40)
        mem.write(0x8000, bytes(range(256)) * 8)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(kvm.supported_cpuid())
    except BaseException:
        vm.close()
        raise
    return vm


def small_snapshot(kvm: pykvm.Kvm) -> bytes:
    """The bytes of a valid snapshot of :func:`small_vm` (64 KiB chunks: several records)."""
    import io
    buf = io.BytesIO()
    with small_vm(kvm) as vm:
        snapshot.save(vm, buf, chunk_size=snapshot.ZERO_BLOCK, fsync=False, kvm=kvm)
    return buf.getvalue()
