"""Privilege: as a user who may not open /dev/kvm, every entry point fails with
KvmUnavailable and a hint to act on, and the command line prints no traceback.

Runs Debian's /usr/bin/python3 as ``nobody`` (via runuser) on a world-readable
copy of the checkout and its one dependency; skipped unless run as root with
runuser available and a /dev/kvm that ``nobody`` cannot open.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from tests.support import procs


def _nobody_cannot_open_kvm() -> str:
    why = procs.why_no_unprivileged_user()
    if why:
        return why
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return "no /dev/kvm"
    if st.st_mode & 0o006:
        return "/dev/kvm is open to everyone here"
    return ""


SKIP = _nobody_cannot_open_kvm()
pytestmark = pytest.mark.skipif(bool(SKIP), reason=SKIP or "ok")


@pytest.fixture(scope="module")
def world_readable_checkout():
    with procs.world_readable_checkout(("pykvm", "benchmarks", "examples")) as d:
        yield d


def _as_nobody(checkout: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return procs.run_unprivileged(checkout, *args, timeout=timeout)


LIBRARY = r'''
import json, pykvm
try:
    pykvm.Kvm()
except pykvm.KvmUnavailable as e:
    print(json.dumps({"type": type(e).__name__, "errno": e.errno, "ioctl": e.ioctl,
                      "hint": e.hint, "str": str(e), "is_kvm_error": isinstance(e, pykvm.KvmError)}))
else:
    print("opened")
'''


def _hint_is_actionable(text: str) -> None:
    assert "/dev/kvm" in text, text
    assert "nobody" in text, text                   # names the user
    assert "usermod" in text or "setfacl" in text or "group" in text, text


def test_library_raises_kvm_unavailable_with_a_hint(world_readable_checkout):
    proc = _as_nobody(world_readable_checkout, "-c", LIBRARY)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["type"] == "KvmUnavailable" and info["is_kvm_error"]
    assert info["errno"] in (13, 1)                 # EACCES / EPERM
    _hint_is_actionable(info["hint"])
    assert info["hint"] in info["str"]


def test_library_uncaught_error_is_one_clear_line(world_readable_checkout):
    proc = _as_nobody(world_readable_checkout, "-c", "import pykvm; pykvm.Kvm()")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pykvm.errors.KvmUnavailable: open(/dev/kvm) failed: EACCES"), last
    _hint_is_actionable(last)


@pytest.mark.parametrize("argv", [
    ["-m", "pykvm", "probe"],
    ["-m", "pykvm", "probe", "--json"],
    ["-m", "pykvm", "demo"],
    ["-m", "pykvm.demo"],
] + ([["-m", "pykvm", "bench"]] if os.path.exists(os.path.join(procs.REPO, "benchmarks", "__main__.py"))
      else []), ids=lambda a: " ".join(a[1:]))
def test_cli_entry_points_fail_cleanly(world_readable_checkout, argv):
    proc = _as_nobody(world_readable_checkout, *argv, timeout=120)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    assert proc.returncode != 0, out
    _hint_is_actionable(out)
    if "--json" in argv:
        report = json.loads(proc.stdout)
        assert report  # a machine-readable report even when KVM is unusable


def test_cli_diff_against_this_host_fails_cleanly(world_readable_checkout, tmp_path):
    report = subprocess.run([sys.executable, "-m", "pykvm",
                             "probe", "--json"], capture_output=True, text=True, cwd=procs.REPO,
                            env=dict(os.environ, PYTHONPATH=procs.REPO), timeout=120).stdout
    path = os.path.join(world_readable_checkout, "root-report.json")
    with open(path, "w") as f:
        f.write(report)
    os.chmod(path, 0o644)
    proc = _as_nobody(world_readable_checkout, "-m", "pykvm", "diff", path, timeout=120)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    assert proc.returncode in (1, 2), out        # "different" (KVM unusable here) or refused


def test_vmm_fails_cleanly(world_readable_checkout):
    kernel = os.path.join(world_readable_checkout, "kernel.bin")
    with open(kernel, "wb") as f:
        f.write(b"\0" * 8192)
    os.chmod(kernel, 0o644)
    proc = _as_nobody(world_readable_checkout, "-m", "pykvm.vmm", kernel, timeout=60)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    assert proc.returncode != 0, out


def test_the_device_mode_was_not_touched():
    st = os.stat("/dev/kvm")
    assert stat.S_ISCHR(st.st_mode) and not st.st_mode & 0o006
