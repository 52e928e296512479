"""Shared fixtures: every test runs against the real /dev/kvm.

Without a usable /dev/kvm the KVM tests are skipped, unless
``PYKVM_REQUIRE_KVM=1`` (as in CI), which turns that into a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import pykvm

REQUIRE_KVM = os.environ.get("PYKVM_REQUIRE_KVM", "") not in ("", "0")
# Only for testing this guard itself (tests/test_ci_guard.py): pretend the device is elsewhere.
DEVICE = os.environ.get("PYKVM_TEST_DEVICE", "/dev/kvm")


def _kvm_problem() -> str:
    try:
        pykvm.Kvm(DEVICE).close()
        return ""
    except pykvm.KvmUnavailable as e:
        return str(e)


KVM_PROBLEM = _kvm_problem()


def pytest_sessionstart(session: pytest.Session) -> None:
    if KVM_PROBLEM and REQUIRE_KVM:
        raise pytest.UsageError(f"PYKVM_REQUIRE_KVM is set but KVM is unusable: {KVM_PROBLEM}")


def pytest_collection_modifyitems(config, items) -> None:
    if not KVM_PROBLEM:
        return
    marker = pytest.mark.skip(reason=f"no usable /dev/kvm: {KVM_PROBLEM}")
    for item in items:
        if "no_kvm_needed" not in item.keywords:
            item.add_marker(marker)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "no_kvm_needed: runs without /dev/kvm")


@pytest.fixture
def kvm() -> Iterator[pykvm.Kvm]:
    k = pykvm.Kvm()
    yield k
    k.close()


@pytest.fixture
def vm(kvm) -> Iterator[pykvm.Vm]:
    v = kvm.create_vm()
    yield v
    v.close()


@pytest.fixture
def watchdog():
    """``watchdog(vcpu, seconds=10.0)``: :meth:`pykvm.Vcpu.kick_after`, the one watchdog.

    Kept as a fixture for tests written against it; new code calls
    ``vcpu.kick_after(seconds)`` directly.
    """
    def arm(vcpu: pykvm.Vcpu, seconds: float = 10.0):
        return vcpu.kick_after(seconds)
    return arm
