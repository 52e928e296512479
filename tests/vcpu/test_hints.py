"""Every hint the vCPU wrappers used to add is in pykvm.errors' one table, word for word.
The device-attribute hints were widened to every fd kind that takes them (one table, one text)."""

from __future__ import annotations

import pykvm.vcpu
from pykvm.errors import hint_for

from .support_hints import VCPU_HINTS, skip_unless_merged


def test_vcpu_hints_moved_unchanged() -> None:
    skip_unless_merged()
    missing = {key: text for key, text in VCPU_HINTS.items() if hint_for(*key) != text}
    assert missing == {}


def test_vcpu_has_no_private_hint_table() -> None:
    # One hints table: the vCPU no longer wraps FdObject._ioctl to add its own.
    assert not hasattr(pykvm.vcpu.run, "_VCPU_HINTS")
    assert "_ioctl" not in vars(pykvm.vcpu.Vcpu) and "_ioctl" not in vars(pykvm.vcpu.run.RunEngine)
