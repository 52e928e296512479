"""Snapshot/restore against the real /dev/kvm.

The proof: the counter guest (see ``guest.py``), snapshotted mid-run and
restored in a new process, prints exactly what an uninterrupted run prints;
damaged files and snapshots from an incompatible host are refused with a
clear error and leave no VM behind.  The tests edit files through the format
documented in ``docs/snapshot.md`` (they re-compute CRCs where they must look
valid), which also checks that the documentation is enough to read the format.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

import pykvm
from pykvm import snapshot
from pykvm.uapi import structs as S
from tests.support.guests import USER_CS

from .support_guest import COUNTER_ADDR, EXTRA_GPA, EXTRA_SIZE, GuestTimeout, build_counter, run_guest

ROOT = Path(__file__).resolve().parents[2]
LINES, ITERS = 48, 100000


# ---------------------------------------------------------------------------
# helpers

@pytest.fixture(scope="module")
def reference() -> bytes:
    """Output of an uninterrupted run of the counter."""
    with pykvm.Kvm() as kvm, build_counter(kvm, lines=LINES, iters=ITERS) as vm:
        out = bytearray()
        assert run_guest(vm.vcpus[0], out) == 0
    assert out.count(b"\n") == LINES
    return bytes(out)


def _restore_in_new_process(path: Path) -> tuple[int, bytes, str]:
    p = subprocess.run([sys.executable, "-m", "tests.snapshot.runner", str(path)], cwd=ROOT,
                       capture_output=True, timeout=60)
    return p.returncode, p.stdout, p.stderr.decode(errors="replace")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _records(data: bytes) -> list[tuple[int, bytes, int, int]]:
    """(offset, tag, arg, payload length) of every record, per docs/snapshot.md."""
    magic, version, hlen = struct.unpack_from("<8sII", data, 0)
    assert magic == b"PYKVMSNP" and version == 1
    pos = 16 + hlen + 4
    out = []
    while pos < len(data):
        tag, arg, length, _crc, _hcrc = struct.unpack_from("<4sIQII", data, pos)
        out.append((pos, tag, arg, length))
        pos += 24 + length
    assert pos == len(data)
    return out


def _edit_header(data: bytes, edit: Callable[[dict], None]) -> bytes:
    """Change the JSON header and write a valid CRC, as a tool following the docs would."""
    _, version, hlen = struct.unpack_from("<8sII", data, 0)
    header = json.loads(data[16:16 + hlen])
    edit(header)
    hjson = json.dumps(header).encode()
    head = struct.pack("<8sII", b"PYKVMSNP", version, len(hjson)) + hjson
    return head + struct.pack("<I", zlib.crc32(head)) + data[16 + hlen + 4:]


def _edit_record(data: bytes, offset: int, edit: Callable[[bytearray], None]) -> bytes:
    """Change one record's payload (same length) and re-compute its CRCs."""
    tag, arg, length, _, _ = struct.unpack_from("<4sIQII", data, offset)
    payload = bytearray(data[offset + 24:offset + 24 + length])
    edit(payload)
    assert len(payload) == length
    head = struct.pack("<4sIQI", tag, arg, length, zlib.crc32(payload))
    head += struct.pack("<I", zlib.crc32(head))
    return data[:offset] + head + bytes(payload) + data[offset + 24 + length:]


def _tlv(payload: bytes) -> dict:
    out, pos = {}, 0
    while pos < len(payload):
        nlen, dlen = struct.unpack_from("<HI", payload, pos)
        name = payload[pos + 6:pos + 6 + nlen].decode()
        out[name] = (pos + 6 + nlen, dlen)
        pos += 6 + nlen + dlen
    return out


@pytest.fixture(scope="module")
def midrun(tmp_path_factory, reference) -> tuple[Path, bytes]:
    """A snapshot of the counter taken at an I/O exit in the middle of line 17."""
    path = tmp_path_factory.mktemp("snap") / "midrun.snap"
    with pykvm.Kvm() as kvm, build_counter(kvm, lines=LINES, iters=ITERS) as vm:
        out = bytearray()
        stop_at = reference.index(b"\n", len(reference) // 3) + 6
        assert run_guest(vm.vcpus[0], out, stop=lambda o: len(o) >= stop_at) is None
        snapshot.save(vm, path, metadata={"printed": len(out)}, fsync=False)
    return path, bytes(out)


# ---------------------------------------------------------------------------
# the proof: same output after a restore in another process

def test_restore_in_new_process_at_io_exit(midrun, reference) -> None:
    path, before = midrun
    assert 0 < len(before) < len(reference) and not before.endswith(b"\n")
    code, after, err = _restore_in_new_process(path)
    assert code == 0, err
    assert before + after == reference


def test_restore_in_new_process_after_async_kick(tmp_path) -> None:
    """Kicked at an arbitrary instruction (mostly inside the CPL3 hash loop), restored elsewhere."""
    lines, iters = 12, 2_000_000               # ~5 ms of native work per line
    path = tmp_path / "kick.snap"
    with pykvm.Kvm() as kvm:
        with build_counter(kvm, lines=lines, iters=iters) as vm:
            reference = bytearray()
            assert run_guest(vm.vcpus[0], reference) == 0
        with build_counter(kvm, lines=lines, iters=iters) as vm:
            vcpu = vm.vcpus[0]
            out = bytearray()
            kicks: list = []   # vcpu.kick_after watchdogs: the kick mid-line is what the test is about

            def arm(o: bytearray) -> bool:
                if o.endswith(b"\n") and o.count(b"\n") == 4:   # kick 2 ms into line 5's work
                    kicks.append(vcpu.kick_after(0.002))
                return False

            code = run_guest(vcpu, out, stop=arm, stop_on_interrupt=True)
            assert code is None, "the guest finished before the kick: make it run longer"
            rip = vcpu.get_regs().rip
            snapshot.save(vm, path, fsync=False, kvm=kvm)
    code, after, err = _restore_in_new_process(path)
    assert code == 0, err
    assert bytes(out) + after == reference, f"kicked at rip {rip:#x}"


def test_restore_in_same_process_reproduces_state(midrun) -> None:
    path, before = midrun
    info = snapshot.read_info(path)
    assert info.metadata == {"printed": len(before)}
    assert info.memory_size == 0x200000 + EXTRA_SIZE
    with pykvm.Kvm() as kvm, snapshot.restore(path, kvm) as vm:
        vcpu = vm.vcpus[0]
        (counter,) = struct.unpack("<Q", vm.read(COUNTER_ADDR, 8))
        assert counter == before.count(b"\n")
        assert vm.read(EXTRA_GPA + 0x1000, 4096) == bytes(range(256)) * 16
        assert vm.read(EXTRA_GPA + EXTRA_SIZE - 8, 8) == b"LASTPAGE"
        assert vm.read(EXTRA_GPA + 0x2000, 0x10000) == bytes(0x10000)
        s = vcpu.get_sregs()
        assert (s.cs.selector, s.cs.dpl, s.fs.base, s.efer) == (USER_CS, 3, 0x6000, 0x500)
        xmm0 = int.from_bytes(bytes(vcpu.get_fpu().xmm[0]), "little")
        assert xmm0 == 3 * before.count(b"\n") + 3 or xmm0 == 3 * before.count(b"\n")
        assert len(vcpu.get_cpuid2()) == len(kvm.supported_cpuid())


def test_restored_vm_carries_on_in_process(midrun, reference) -> None:
    path, before = midrun
    with snapshot.restore(path) as vm:
        out = bytearray()
        assert run_guest(vm.vcpus[0], out) == 0
    assert before + bytes(out) == reference


def test_two_vcpus_and_prepare_hook(tmp_path, reference) -> None:
    """A second vCPU that never ran (an AP waiting for INIT/SIPI) comes back as it was."""
    path = tmp_path / "smp.snap"
    with pykvm.Kvm() as kvm, build_counter(kvm, lines=LINES, iters=ITERS) as vm:
        ap = vm.create_vcpu(1)
        ap.set_cpuid2(kvm.supported_cpuid())
        out = bytearray()
        run_guest(vm.vcpus[0], out, stop=lambda o: o.count(b"\n") == 7)
        ap_state = (ap.get_mp_state(), bytes(ap.get_lapic().regs[0x20:0x24]), bytes(ap.get_regs()))
        bsp_lapic_id = bytes(vm.vcpus[0].get_lapic().regs[0x20:0x24])
        snapshot.save(vm, path, fsync=False, kvm=kvm)
        seen: list[str] = []

        def prepare(new_vm: pykvm.Vm) -> None:
            assert not new_vm.vcpus and not new_vm.memory      # called on the empty VM
            new_vm.set_tss_address(0xFFFBD000)
            seen.append("prepare")

        with snapshot.restore(path, kvm, prepare=prepare) as vm2:
            assert seen == ["prepare"]
            assert [v.id for v in vm2.vcpus] == [0, 1]
            ap2 = vm2.vcpus[1]
            assert (ap2.get_mp_state(), bytes(ap2.get_lapic().regs[0x20:0x24]),
                    bytes(ap2.get_regs())) == ap_state
            assert bytes(vm2.vcpus[0].get_lapic().regs[0x20:0x24]) == bsp_lapic_id
            rest = bytearray()
            assert run_guest(vm2.vcpus[0], rest) == 0
    assert bytes(out + rest) == reference
    fds = _open_fds()

    def broken(new_vm: pykvm.Vm) -> None:
        raise RuntimeError("prepare failed")

    with pytest.raises(RuntimeError, match="prepare failed"):
        snapshot.restore(path, prepare=broken)
    assert _open_fds() == fds


def test_file_objects_and_metadata(tmp_path, reference) -> None:
    buf = io.BytesIO()
    with pykvm.Kvm() as kvm, build_counter(kvm, lines=LINES, iters=ITERS) as vm:
        out = bytearray()
        run_guest(vm.vcpus[0], out, stop=lambda o: o.count(b"\n") == 30)
        stats = snapshot.save(vm, buf, metadata={"serial": "ok", "n": [1, 2]}, kvm=kvm)
    assert stats.file_bytes == len(buf.getvalue())
    assert stats.memory_bytes == 0x200000 + EXTRA_SIZE
    assert stats.data_bytes < stats.memory_bytes          # zero runs left out
    buf.seek(0)
    assert snapshot.read_info(buf).metadata == {"serial": "ok", "n": [1, 2]}
    buf.seek(0)
    with snapshot.restore(buf) as vm:
        rest = bytearray()
        assert run_guest(vm.vcpus[0], rest) == 0
    assert bytes(out + rest) == reference


def test_large_memory_roundtrip(tmp_path) -> None:
    """64 MiB with data, zero runs and chunk boundaries: restored byte for byte."""
    path = tmp_path / "big.snap"
    size = 64 << 20
    rnd = os.urandom(3 << 20)
    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(0, size)
        mem.write(0, rnd)                                  # spans a chunk boundary (8 MiB chunks)
        mem.write(20 << 20, rnd)
        mem.write(size - 4096, b"\x01" * 4096)             # last page
        mem.write((40 << 20) + 12345, b"x")                # a lone byte in a zero sea
        vm.create_vcpu()
        stats = snapshot.save(vm, path, chunk_size=1 << 20, fsync=False)
        assert stats.data_bytes == 2 * (3 << 20) + 2 * snapshot.ZERO_BLOCK   # 64 KiB zero-scan blocks
        with snapshot.restore(path, kvm) as vm2:
            (mem2,) = vm2.memory
            assert mem2.size == size and mem2.guest_phys_addr == 0
            assert mem2[:] == mem[:]
    assert snapshot.verify(path).memory_size == size


# ---------------------------------------------------------------------------
# refusals: corrupt files

def _corruptions(data: bytes):
    recs = _records(data)
    vcpu = next(r for r in recs if r[1] == b"VCPU")
    memd = [r for r in recs if r[1] == b"MEMD"]
    yield "header JSON", lambda d: _flip(d, 40), "header is damaged"
    yield "magic", lambda d: _flip(d, 0), "not a pykvm snapshot"
    yield "vCPU record payload", lambda d: _flip(d, vcpu[0] + 24 + 100), "VCPU record"
    yield "record header", lambda d: _flip(d, vcpu[0] + 8), "record header"
    yield "guest memory byte", lambda d: _flip(d, memd[-1][0] + 24 + 8 + 1000), "guest memory"
    yield "truncated", lambda d: d[:len(d) - 1000], "truncated"
    yield "record dropped", lambda d: d[:memd[0][0]] + d[memd[0][0] + 24 + memd[0][3]:], "records lost"
    yield "END record", lambda d: _flip(d, len(d) - 3), "END"


def _flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x40]) + data[pos + 1:]


def test_corrupt_files_are_refused(midrun, tmp_path) -> None:
    path, _ = midrun
    data = path.read_bytes()
    assert snapshot.verify(path).version == 1
    fds = _open_fds()
    for name, damage, words in _corruptions(data):
        bad = tmp_path / "bad.snap"
        bad.write_bytes(damage(data))
        with pytest.raises(snapshot.SnapshotCorrupt, match=words) as ei:
            snapshot.restore(bad)
        assert str(bad) in str(ei.value), name
        with pytest.raises(snapshot.SnapshotCorrupt):
            snapshot.verify(bad)
        assert _open_fds() == fds, f"{name}: a VM or file was left open"


def test_corrupt_file_refused_in_new_process(midrun, tmp_path) -> None:
    path, _ = midrun
    bad = tmp_path / "bad.snap"
    bad.write_bytes(_flip(path.read_bytes(), path.stat().st_size // 2))
    code, out, err = _restore_in_new_process(bad)
    assert code == 99 and out == b""
    assert "SnapshotCorrupt" in err and "CRC mismatch" in err


# ---------------------------------------------------------------------------
# refusals: incompatible host

def test_incompatible_host_fingerprint_is_refused(midrun, tmp_path) -> None:
    path, _ = midrun
    data = path.read_bytes()
    here = snapshot.read_info(path).host["cpu_vendor"]
    other = "GenuineIntel" if here != "GenuineIntel" else "AuthenticAMD"

    def edit(h: dict) -> None:
        h["host"]["cpu_vendor"] = other
        h["host"]["kvm_api"] = 11

    bad = tmp_path / "other-host.snap"
    bad.write_bytes(_edit_header(data, edit))
    snapshot.verify(bad)                            # intact file: only the host differs
    fds = _open_fds()
    with pytest.raises(snapshot.SnapshotIncompatible) as ei:
        snapshot.restore(bad)
    msg = str(ei.value)
    assert f"taken on a {other!r} host, this host is {here!r}" in msg
    assert "KVM API version differs: 11 vs 12" in msg
    assert _open_fds() == fds
    assert len(snapshot.check_compatible(bad)) == 2
    code, _out, err = _restore_in_new_process(bad)
    assert code == 99 and "SnapshotIncompatible" in err and "CPU vendor differs" in err


def test_guest_cpuid_feature_missing_on_host_is_refused(midrun, tmp_path) -> None:
    path, _ = midrun
    data = path.read_bytes()
    host_words = snapshot.read_info(path).host["cpuid_features"]
    have = int(host_words["0x7.0.ebx"], 16)
    bit = next(b for b in range(31, -1, -1) if not have >> b & 1)
    vrec = next(r for r in _records(data) if r[1] == b"VCPU")

    def edit(payload: bytearray) -> None:
        off, n = _tlv(bytes(payload))["cpuid"]
        size = ctypes.sizeof(S.kvm_cpuid_entry2)
        for o in range(off, off + n, size):
            e = S.kvm_cpuid_entry2.from_buffer(payload, o)
            if e.function == 7 and e.index == 0:
                e.ebx |= 1 << bit
                return
        raise AssertionError("no leaf 7 in the guest CPUID")

    bad = tmp_path / "feature.snap"
    bad.write_bytes(_edit_record(data, vrec[0], edit))
    snapshot.verify(bad)
    with pytest.raises(snapshot.SnapshotIncompatible,
                       match=rf"leaf 0x7 subleaf 0 ebx bits \[{bit}\] are features this host"):
        snapshot.restore(bad)


def test_unknown_format_version_is_refused(midrun, tmp_path) -> None:
    path, _ = midrun
    data = bytearray(path.read_bytes())
    data[8:12] = struct.pack("<I", 2)
    bad = tmp_path / "v2.snap"
    bad.write_bytes(bytes(data))
    with pytest.raises(snapshot.SnapshotIncompatible, match="format version 2"):
        snapshot.restore(bad)


# ---------------------------------------------------------------------------
# save-side checks and the command line

def test_save_refuses_a_running_vcpu(tmp_path) -> None:
    with pykvm.Kvm() as kvm, build_counter(kvm, lines=10**6, iters=10**6) as vm:
        vcpu = vm.vcpus[0]
        err: list[BaseException] = []
        started = threading.Event()

        def runner() -> None:
            try:
                started.set()
                run_guest(vcpu, bytearray(), timeout=10, stop_on_interrupt=True)
            except BaseException as e:  # pragma: no cover - reported below
                err.append(e)

        t = threading.Thread(target=runner)
        t.start()
        started.wait()
        try:
            for _ in range(1000):           # wait until run() holds the vCPU
                if vcpu._thread is not None:
                    break
                threading.Event().wait(0.001)
            with pytest.raises(snapshot.SnapshotError, match="inside run"):
                snapshot.save(vm, tmp_path / "x.snap")
        finally:
            vcpu.kick()
            t.join(10)
        assert not err
        assert not (tmp_path / "x.snap").exists()
        assert not list(tmp_path.iterdir()), "temporary file left behind"


def test_unwritable_destination(tmp_path) -> None:
    with pykvm.Kvm() as kvm, build_counter(kvm, lines=1, iters=1) as vm, \
            pytest.raises(snapshot.SnapshotError, match=r"cannot save snapshot .*no-such-dir"):
        snapshot.save(vm, tmp_path / "no-such-dir" / "x.snap", kvm=kvm)


def test_command_line(midrun) -> None:
    path, _ = midrun
    for cmd, expect in (("verify", "OK (format 1, 1 vCPU(s), 3.0 MiB"), ("check", "compatible"),
                        ("info", '"cpu_vendor"')):
        p = subprocess.run([sys.executable, "-m", "pykvm.snapshot", cmd, str(path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert expect in p.stdout


def test_guest_timeout_is_reported() -> None:
    """The watchdog of the run loop works (a hung guest fails the test instead of hanging it)."""
    with pykvm.Kvm() as kvm, build_counter(kvm, lines=10**6, iters=10**7) as vm, pytest.raises(GuestTimeout):
        run_guest(vm.vcpus[0], bytearray(), timeout=0.2)


def test_command_line_errors(midrun, tmp_path, capsys) -> None:
    """One line on stderr, ``pykvm snapshot: <file>: ...``, and the documented status."""
    from pykvm.snapshot.cli import main
    path, _ = midrun
    bad = tmp_path / "bad.snap"
    bad.write_bytes(_flip(path.read_bytes(), 40))
    for cmd in ("info", "verify", "check"):
        assert main([cmd, str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"pykvm snapshot: {bad}: the header is damaged"), err
    assert main(["verify", str(tmp_path / "absent")]) == 2
    assert "No such file" in capsys.readouterr().err
    assert main(["frobnicate", str(path)]) == 2
    capsys.readouterr()
    other = tmp_path / "other.snap"
    other.write_bytes(_edit_header(path.read_bytes(), lambda h: h["host"].update(kvm_api=11)))
    assert main(["verify", str(other)]) == 0
    assert main(["check", str(other)]) == 1
    out = capsys.readouterr().out
    assert "cannot be restored here" in out and "KVM API version differs: 11 vs 12" in out
    p = subprocess.run([sys.executable, "-m", "pykvm.snapshot", "verify", str(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr.startswith("pykvm snapshot: ") and p.stderr.count("\n") == 1
