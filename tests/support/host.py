"""Facts about this machine that a test reads rather than assumes (see /work/shared/HOST.md)."""

from __future__ import annotations

import os
import shutil
import struct

import pytest

import pykvm

needs_binutils = pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None,
                                    reason="GNU binutils (as, ld) are not installed")


def host_is_pvm() -> bool:
    """True on a host whose KVM vendor module is ``kvm_pvm``."""
    return os.path.isdir("/sys/module/kvm_pvm")


def cpu_vendor(kvm: pykvm.Kvm) -> str:
    """``"AMD"`` or ``"Intel"`` (or the raw vendor string), from CPUID leaf 0."""
    leaf0 = next(e for e in kvm.supported_cpuid() if e.function == 0)
    vendor = struct.pack("<III", leaf0.ebx, leaf0.edx, leaf0.ecx).decode("ascii", "replace")
    return {"AuthenticAMD": "AMD", "HygonGenuine": "AMD", "GenuineIntel": "Intel"}.get(vendor, vendor)
