"""``pykvm stat`` against real KVM processes: a pykvm VM in another process, a
real QEMU (``-accel kvm -M microvm``), and the refusals (not a KVM process, no
ptrace permission as ``nobody``, no such process, bad arguments)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from pykvm.kvm_stat import pidfd
from pykvm.kvm_stat.source import DEBUGFS_KVM, kvm_fds
from tests.support import procs

# A real-mode loop: out 0x80, al; jmp back.  Every iteration is a PIO exit.
OUT_LOOP = bytes([0xE6, 0x80, 0xEB, 0xFC])

# The pykvm VMM in another process: it holds its VM's and vCPU's stats fds (as
# a VMM must for an outside reader, see pykvm.kvm_stat.source) and runs the
# loop, each run() bounded by a watchdog, for at most 60 s.
GUEST = r"""
import sys, time, pykvm
from tests.support.guests import real_mode
code = bytes.fromhex(sys.argv[1])
with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
    vcpu = real_mode(vm, code)
    held = [vm.get_stats_fd(), vcpu.get_stats_fd()] if sys.argv[2] == "hold" else []
    print("ready", flush=True)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        with vcpu.kick_after(5):
            vcpu.run()
"""


def stat(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pykvm.kvm_stat", *args],
                          capture_output=True, text=True, timeout=timeout)


def _start(cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=procs.REPO)


@pytest.fixture
def pykvm_guest(request: pytest.FixtureRequest) -> Iterator[int]:
    p = _start([sys.executable, "-c", GUEST, OUT_LOOP.hex(), getattr(request, "param", "hold")])
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n", p.stderr
        yield p.pid
    finally:
        p.kill()
        p.wait()


def test_reads_stats_fds_held_by_a_pykvm_process(pykvm_guest: int) -> None:
    kinds = sorted(k.kind for k in kvm_fds(pykvm_guest))
    assert "vm" in kinds and "vm-stats" in kinds and "vcpu-stats" in kinds
    r = stat("--pid", str(pykvm_guest), "--once", "--json", "-i", "0.3")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["source"] == "stats-fd" and doc["vms"] == 1 and doc["vcpus"] == 1
    # The guest exits to user space on every `out`: the vCPU's exit counter grows.
    assert doc["stats"]["exits"]["total"] > 0 and doc["stats"]["exits"]["rate"] > 0
    assert r.stderr == ""


def test_field_filter_and_text_table(pykvm_guest: int) -> None:
    r = stat("--pid", str(pykvm_guest), "-f", "^exits$", "-n", "2", "-i", "0.2")
    assert r.returncode == 0, r.stderr
    frames = [f for f in r.stdout.split("\n\n") if f.strip()]
    assert len(frames) == 2
    for frame in frames:
        lines = frame.splitlines()
        assert lines[0].startswith(f"pykvm stat: pid {pykvm_guest} (python), 1 VM(s), 1 vCPU(s)")
        assert lines[1].split() == ["statistic", "total", "per", "second"]
        assert [ln.split()[0] for ln in lines[2:]] == ["exits"]


@pytest.mark.parametrize("pykvm_guest", ["nohold"], indirect=True)
def test_without_held_stats_fd_says_why_and_falls_back(pykvm_guest: int) -> None:
    r = stat("--pid", str(pykvm_guest), "--once", "--source", "fd", "-i", "0.1")
    assert r.returncode == 1
    assert "holds no KVM stats fd" in r.stderr and "EIO" in r.stderr
    if not os.path.isdir(DEBUGFS_KVM):
        pytest.skip(f"{DEBUGFS_KVM} is absent (debugfs not mounted): fallback not reachable")
    r = stat("--pid", str(pykvm_guest), "--once", "--json", "-i", "0.1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"] == "debugfs"
    assert "reading debugfs instead" in r.stderr


def _tiny_bios(d: str) -> str:
    # 64 KiB firmware image (QEMU wants a multiple of 64 KiB) whose reset vector
    # (0xfffffff0, the last 16 bytes) holds the `out` loop.
    img = bytearray(b"\xf4" * 0x10000)
    img[0xFFF0:0xFFF0 + len(OUT_LOOP)] = OUT_LOOP
    path = os.path.join(d, "tiny.bin")
    with open(path, "wb") as f:
        f.write(img)
    return path


@pytest.fixture
def qemu() -> Iterator[int]:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        pytest.skip("qemu-system-x86_64 is not installed (.ci/run installs qemu-system-x86)")
    with tempfile.TemporaryDirectory(prefix="pykvm-stat-") as d:
        p = subprocess.Popen([exe, "-accel", "kvm", "-M", "microvm", "-nodefaults", "-display", "none",
                              "-m", "16", "-bios", _tiny_bios(d)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            while not any(k.kind == "vcpu" for k in kvm_fds(p.pid)):
                assert p.poll() is None, p.stderr.read() if p.stderr else ""
                assert time.monotonic() < deadline, "QEMU created no vCPU in 20 s"
                time.sleep(0.05)
            yield p.pid
        finally:
            p.kill()
            p.wait()


def test_qemu_vm_is_found_and_read(qemu: int) -> None:
    kinds = [k.kind for k in kvm_fds(qemu)]
    assert kinds.count("vm") == 1 and kinds.count("vcpu") >= 1
    # QEMU keeps no stats fd open: the stats-fd source must say so, not guess.
    r = stat("--pid", str(qemu), "--once", "--source", "fd", "-i", "0.1")
    assert r.returncode == 1 and "holds no KVM stats fd" in r.stderr
    if not os.path.isdir(DEBUGFS_KVM):
        pytest.skip(f"{DEBUGFS_KVM} is absent (debugfs not mounted)")
    r = stat("--pid", str(qemu), "--once", "--json", "--all", "-i", "0.2")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["source"] == "debugfs" and doc["comm"].startswith("qemu-system")
    assert doc["vms"] == 1 and doc["vcpus"] >= 1
    assert doc["stats"], "debugfs gave no readable statistic"


def test_not_a_kvm_process_is_refused() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        r = stat("--pid", str(p.pid), "--once", "-i", "0.1")
    finally:
        p.kill()
        p.wait()
    assert r.returncode == 1
    assert r.stderr.startswith(f"pykvm stat: process {p.pid} (sleep) has no KVM VM fd")
    assert "Traceback" not in r.stderr


def test_no_such_process_and_bad_arguments_are_usage_errors() -> None:
    p = subprocess.Popen(["true"])
    p.wait()  # a pid that existed and is gone now
    r = stat("--pid", str(p.pid), "--once")
    assert (r.returncode, r.stderr) == (2, f"pykvm stat: no process {p.pid}\n")
    r = stat("--pid", str(os.getpid()), "-f", "(", "--once")
    assert r.returncode == 2 and "is not a regular expression" in r.stderr
    r = stat("--pid", str(os.getpid()), "-i", "0")
    assert r.returncode == 2 and "--interval 0" in r.stderr
    assert stat("--pid", "x").returncode == 2


def test_pidfd_getfd_borrows_a_descriptor() -> None:
    # Our own process: ptrace access to oneself is always granted.
    r, w = os.pipe()
    pfd = pidfd.pidfd_open(os.getpid())
    try:
        dup = pidfd.pidfd_getfd(pfd, w)
        os.write(dup, b"x")
        os.close(dup)
        assert os.read(r, 1) == b"x"
        with pytest.raises(OSError) as e:
            pidfd.pidfd_getfd(pfd, 1 << 30)
        assert e.value.errno == 9  # EBADF
    finally:
        for fd in (pfd, r, w):
            os.close(fd)
    with pytest.raises(ValueError):
        pidfd.pidfd_open(0)


@pytest.fixture
def world_readable_tree() -> Iterator[str]:
    why = procs.why_no_unprivileged_user()
    if why:
        pytest.skip(why)
    with procs.world_readable_checkout() as d:
        yield d


def test_without_ptrace_permission_names_it(world_readable_tree: str, pykvm_guest: int) -> None:
    r = procs.run_unprivileged(world_readable_tree, "-m", "pykvm.kvm_stat", "--pid", str(pykvm_guest),
                               "--once", "-i", "0.1", timeout=60, cwd="/")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert "ptrace access" in r.stderr and "CAP_SYS_PTRACE" in r.stderr
    assert "PTRACE_MODE_ATTACH_REALCREDS" in r.stderr
    assert "debugfs" in r.stderr  # the fallback was tried and its failure named
