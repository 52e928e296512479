"""Run the probe as an unprivileged user: explanation and exit status, no traceback.

/dev/kvm here is root-only (0600), so ``nobody`` cannot open it.  The default
python3 lives under /root (mode 0700), so the test uses Debian's
/usr/bin/python3 with a world-readable copy of the checkout and of ioctl_opt.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from tests.support import procs

USER = procs.UNPRIVILEGED_USER


@pytest.fixture(scope="module")
def tree():
    why = procs.why_no_unprivileged_user()
    if why:
        pytest.skip(why)
    with procs.world_readable_checkout() as d:
        yield d


def _device_closed_to_user() -> bool:
    st = os.stat("/dev/kvm")
    return not (st.st_mode & stat.S_IROTH and st.st_mode & stat.S_IWOTH)


def run_as_user(tree: str, *args: str) -> subprocess.CompletedProcess:
    return procs.run_unprivileged(tree, "-m", "pykvm", *args, cwd="/")


def test_text_explains_and_exits_1(tree):
    assert _device_closed_to_user(), "this test expects /dev/kvm closed to other users"
    p = run_as_user(tree, "probe")
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    assert p.returncode == 1, (p.returncode, p.stderr)
    lines = p.stdout.splitlines()
    assert lines[1] == "KVM usable: NO (open(/dev/kvm) failed: EACCES (Permission denied))"
    assert lines[2].startswith("what to do: ")
    text = p.stdout
    assert f"user       {USER} (uid " in text
    assert "setfacl -m u:nobody:rw /dev/kvm" in text
    assert "== Access ==" in text and "== Modules ==" in text
    assert "need an open /dev/kvm: not probed" in text
    assert "== Capabilities ==" not in text


def test_json_explains_and_exits_1(tree):
    p = run_as_user(tree, "probe", "--json")
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    assert p.returncode == 1
    doc = json.loads(p.stdout)
    assert doc["usable"] is False
    a = doc["access"]
    assert a["exists"] and a["is_kvm_device"] and not a["opened"]
    assert a["errno"] == 13 and a["user"] == USER
    assert "root" in a["explanation"] and "setfacl" in a["explanation"]
    assert doc["capabilities"] == [] and doc["cpuid"] is None and doc["limits"] is None
    assert doc["modules"], "module parameters are readable without KVM access"


def test_diff_against_this_host_needs_no_kvm(tree, tmp_path):
    """nobody compares a root-made report with its own (unusable) view: no traceback."""
    root_json = subprocess.run([sys.executable, "-m", "pykvm", "probe", "--json"],
                               capture_output=True, text=True, timeout=120).stdout
    path = os.path.join(tree, "root.json")
    with open(path, "w") as f:
        f.write(root_json)
    os.chmod(path, 0o644)
    p = run_as_user(tree, "diff", path)
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    assert p.returncode == 1
    assert "KVM usable: A yes, B NO" in p.stdout
    assert "unknown: no CPUID in A" in p.stdout or "unknown: no CPUID in B" in p.stdout
