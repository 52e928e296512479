"""PYKVM_REQUIRE_KVM turns "no usable /dev/kvm" into a failing run, not skips."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.no_kvm_needed


def _pytest(env_extra: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/system/test_system.py::test_api_version_matches_plain_ioctl"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_missing_device_fails_when_required():
    r = _pytest({"PYKVM_REQUIRE_KVM": "1", "PYKVM_TEST_DEVICE": "/nonexistent/kvm"})
    assert r.returncode != 0
    assert "PYKVM_REQUIRE_KVM is set but KVM is unusable" in r.stdout + r.stderr


def test_missing_device_skips_when_not_required():
    r = _pytest({"PYKVM_REQUIRE_KVM": "0", "PYKVM_TEST_DEVICE": "/nonexistent/kvm"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 skipped" in r.stdout
