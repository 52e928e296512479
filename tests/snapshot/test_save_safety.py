"""Saving never loses, mixes or exposes data: modes, links, full disks, races, kill -9, other users.

Real files on real file systems: a 1 MiB tmpfs for a full disk, a tmpfs
remounted read-only, two processes saving to one path, a child killed with
SIGKILL in the middle of a save, and an unprivileged user (``nobody``)
planting symbolic links in a world-writable directory while root saves.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import pykvm
from pykvm import snapshot

from . import support_forge as forge

ROOT = Path(__file__).resolve().parents[2]
TMP_MARK = ".pykvm-tmp-"


@pytest.fixture(scope="module")
def kvm() -> Iterator[pykvm.Kvm]:
    with pykvm.Kvm() as k:
        yield k


@pytest.fixture
def vm(kvm: pykvm.Kvm) -> Iterator[pykvm.Vm]:
    with forge.small_vm(kvm) as v:
        yield v


def _stray(d: Path) -> list[str]:
    return [n for n in os.listdir(d) if TMP_MARK in n]


def _mount_tmpfs(d: Path, size: str) -> None:
    d.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount): {p.stderr.strip()}")


def _umount(d: Path) -> None:
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_new_file_is_private_and_replacing_keeps_mode(vm: pykvm.Vm, kvm: pykvm.Kvm, tmp_path: Path) -> None:
    dest = tmp_path / "a.snap"
    old = os.umask(0)
    try:
        snapshot.save(vm, dest, kvm=kvm)
    finally:
        os.umask(old)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    dest.chmod(0o640)
    snapshot.save(vm, dest, kvm=kvm)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640
    assert snapshot.verify(dest).memory_size == forge.RAM
    # another user's file (their mode is not ours to copy onto guest RAM): replaced by a 0600 file
    dest.chmod(0o666)
    os.chown(dest, 65534, 65534)
    snapshot.save(vm, dest, kvm=kvm)
    st = dest.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, os.geteuid())
    assert not _stray(tmp_path)


def test_symlink_directory_and_missing_dir_are_refused(vm: pykvm.Vm, kvm: pykvm.Kvm, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"keep me")
    link = tmp_path / "link.snap"
    link.symlink_to(target)
    with pytest.raises(snapshot.SnapshotError, match=f"{link}: it is a symbolic link"):
        snapshot.save(vm, link, kvm=kvm)
    assert target.read_bytes() == b"keep me" and link.is_symlink()
    d = tmp_path / "dir.snap"
    d.mkdir()
    (d / "inside").write_bytes(b"x")
    with pytest.raises(snapshot.SnapshotError, match=f"{d}: it is a directory"):
        snapshot.save(vm, d, kvm=kvm)
    assert (d / "inside").read_bytes() == b"x"
    with pytest.raises(snapshot.SnapshotError, match="no-such-dir"):
        snapshot.save(vm, tmp_path / "no-such-dir" / "x.snap", kvm=kvm)
    assert sorted(os.listdir(tmp_path)) == ["dir.snap", "link.snap", "target"]


def test_full_disk_keeps_the_old_file(kvm: pykvm.Kvm, tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, "1m")
    try:
        dest = mnt / "vm.snap"
        with forge.small_vm(kvm) as small:
            snapshot.save(small, dest, kvm=kvm)
        before = dest.read_bytes()
        with kvm.create_vm() as big:
            mem = big.add_memory(0, 2 << 20)
            mem.write(0, os.urandom(2 << 20))        # 2 MiB that cannot be left out
            big.create_vcpu(0)
            with pytest.raises(snapshot.SnapshotError, match=f"{dest}: .*No space left"):
                snapshot.save(big, dest, kvm=kvm)
        assert dest.read_bytes() == before
        assert not _stray(mnt)
    finally:
        _umount(mnt)


def test_read_only_directory_keeps_the_old_file(vm: pykvm.Vm, kvm: pykvm.Kvm, tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "4m")
    try:
        dest = mnt / "vm.snap"
        snapshot.save(vm, dest, kvm=kvm)
        before = dest.read_bytes()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(snapshot.SnapshotError, match=f"{dest}: .*Read-only file system"):
            snapshot.save(vm, dest, kvm=kvm)
        assert dest.read_bytes() == before
    finally:
        _umount(mnt)


def _saver(path: Path, byte: int, count: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.snapshot.saver", str(path), str(byte), str(count),
                             *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _memory_byte(path: Path) -> int:
    with snapshot.restore(path) as vm:
        data = vm.read(0, 1 << 20)
    assert data == data[:1] * len(data), "a snapshot mixing two saves"
    return data[0]


def test_two_processes_saving_to_one_path_never_mix(tmp_path: Path) -> None:
    dest = tmp_path / "race.snap"
    savers = [_saver(dest, 0x11, 15), _saver(dest, 0x22, 15)]
    seen = set()
    try:
        while any(s.poll() is None for s in savers):
            if dest.exists():                    # every version a reader can open is complete
                seen.add(snapshot.verify(dest).memory_size)
    finally:
        for s in savers:
            _out, err = s.communicate(timeout=120)
            assert s.returncode == 0, err
    assert seen <= {1 << 20}
    assert _memory_byte(dest) in (0x11, 0x22)
    assert not _stray(tmp_path)


def test_kill_9_during_save_keeps_the_old_file(kvm: pykvm.Kvm, tmp_path: Path) -> None:
    dest = tmp_path / "vm.snap"
    assert subprocess.run([sys.executable, "-m", "tests.snapshot.saver", str(dest), "7", "1"],
                          cwd=ROOT, timeout=60).returncode == 0
    before = dest.read_bytes()
    child = _saver(dest, 9, 1, "hang")
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "mid-save", child.stderr.read() if child.stderr else ""
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    assert dest.read_bytes() == before
    stray = _stray(tmp_path)
    assert len(stray) == 1 and f"{TMP_MARK}{child.pid}-" in stray[0], stray   # the killed save's file
    with forge.small_vm(kvm) as vm:
        snapshot.save(vm, dest, kvm=kvm)
    assert not _stray(tmp_path), "the next save did not clean the dead save's temporary file"
    assert snapshot.verify(dest).memory_size == forge.RAM


ATTACKER = r"""
import os, sys, time
d, victim, root_pid, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
names = ["race.snap", ".race.snap.%d.tmp" % root_pid, ".race.snap.tmp", "race.snap.tmp"]
names += [".race.snap.pykvm-tmp-%d-" % root_pid + s for s in ("", "x", "0")]
print("ready", flush=True)
end = time.time() + 60
while not os.path.exists(stop) and time.time() < end:
    for n in names:
        try:
            os.symlink(victim, os.path.join(d, n))
        except OSError:
            pass
    for n in os.listdir(d):                    # and anything else that appears
        p = os.path.join(d, n)
        try:
            os.unlink(p)
            os.symlink(victim, p)
        except OSError:
            pass
"""


def test_other_user_cannot_redirect_a_root_save(vm: pykvm.Vm, kvm: pykvm.Kvm) -> None:
    """``nobody`` plants symlinks in a world-writable directory while root saves there."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the attacker as another user")
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("no /usr/bin/python3 for the unprivileged attacker")
    shared = Path(tempfile.mkdtemp(prefix="pykvm-shared-", dir="/tmp"))
    secret = Path(tempfile.mkdtemp(prefix="pykvm-victim-", dir="/tmp"))
    try:
        shared.chmod(0o1777)                       # like /tmp: world-writable, sticky
        secret.chmod(0o755)
        victim = secret / "victim"
        victim.write_bytes(b"precious root file")
        victim.chmod(0o644)
        stop = secret / "stop"
        attacker = subprocess.Popen(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", ATTACKER,
                                     str(shared), str(victim), str(os.getpid()), str(stop)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert attacker.stdout is not None and attacker.stdout.readline().strip() == "ready"
            dest = shared / "race.snap"
            outcomes = {"saved": 0, "refused": 0}
            for _ in range(40):
                if dest.is_symlink():
                    try:
                        dest.unlink()                  # root may remove the planted link
                    except FileNotFoundError:
                        pass
                try:
                    snapshot.save(vm, dest, kvm=kvm, fsync=False)
                    outcomes["saved"] += 1
                except snapshot.SnapshotError as e:
                    assert "symbolic link" in str(e) or "race.snap" in str(e), e
                    outcomes["refused"] += 1
        finally:
            stop.write_bytes(b"")
            attacker.wait(30)
        assert victim.read_bytes() == b"precious root file"
        assert stat.S_IMODE(victim.stat().st_mode) == 0o644 and victim.stat().st_uid == 0
        planted = [n for n in os.listdir(shared) if os.path.islink(shared / n)]
        assert planted, "the attacker never planted a link: the test did not test"
        if dest.exists() and not dest.is_symlink():
            st = dest.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
            snapshot.verify(dest)
        assert outcomes["saved"] + outcomes["refused"] == 40
    finally:
        subprocess.run(["rm", "-rf", str(shared), str(secret)], check=False)
