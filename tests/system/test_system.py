"""The system fd: pykvm.Kvm against this machine's /dev/kvm."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

import pytest

import pykvm
from pykvm import uapi


def test_api_version_matches_plain_ioctl(kvm):
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert kvm.api_version == fcntl.ioctl(fd, uapi.KVM_GET_API_VERSION, 0) == 12
        assert kvm.vcpu_mmap_size == fcntl.ioctl(fd, uapi.KVM_GET_VCPU_MMAP_SIZE, 0)
        for cap in (pykvm.Cap.IRQCHIP, pykvm.Cap.NR_VCPUS, pykvm.Cap.MAX_VCPUS,
                    pykvm.Cap.NR_MEMSLOTS, pykvm.Cap.USER_MEMORY):
            assert kvm.check_extension(cap) == fcntl.ioctl(fd, uapi.KVM_CHECK_EXTENSION, int(cap))
    finally:
        os.close(fd)


def test_fd_is_cloexec_and_file_like(kvm):
    assert fcntl.fcntl(kvm.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert os.readlink(f"/proc/self/fd/{kvm.fileno()}") == "/dev/kvm"
    kvm.close()
    kvm.close()  # idempotent
    assert kvm.closed
    with pytest.raises(pykvm.KvmClosedError, match="KVM_CHECK_EXTENSION"):
        kvm.check_extension(0)
    with pytest.raises(ValueError):
        kvm.fileno()


def test_supported_cpuid_has_vendor_leaf(kvm):
    entries = kvm.supported_cpuid()
    leaves = {e.function for e in entries}
    assert 0 in leaves and 1 in leaves
    leaf0 = next(e for e in entries if e.function == 0)
    vendor = (leaf0.ebx.to_bytes(4, "little") + leaf0.edx.to_bytes(4, "little")
              + leaf0.ecx.to_bytes(4, "little"))
    assert vendor in (b"GenuineIntel", b"AuthenticAMD", b"HygonGenuine", b"CentaurHauls")
    # Grown past any fixed limit: the kernel agrees on the count when asked with room to spare.
    buf = uapi.flex(uapi.kvm_cpuid2, len(entries))
    fcntl.ioctl(kvm.fileno(), uapi.KVM_GET_SUPPORTED_CPUID, buf, True)
    assert buf.nent == len(entries)
    assert isinstance(kvm.emulated_cpuid(), list)


def test_cpuid_too_small_buffer_is_e2big(kvm):
    buf = uapi.flex(uapi.kvm_cpuid2, 1)
    with pytest.raises(OSError) as ei:
        fcntl.ioctl(kvm.fileno(), uapi.KVM_GET_SUPPORTED_CPUID, buf, True)
    assert ei.value.errno == errno.E2BIG


def test_msr_lists_and_feature_msrs(kvm):
    idx = kvm.msr_index_list()
    assert 0x10 in idx  # IA32_TSC is in every host's save/restore list
    assert len(set(idx)) == len(idx)
    feats = kvm.msr_feature_index_list()
    values = kvm.get_msrs(feats)
    assert set(values) <= set(feats) and values
    # The same read through a raw KVM_GET_MSRS
    buf = uapi.flex(uapi.kvm_msrs, 1)
    buf.entries[0].index = next(iter(values))
    assert fcntl.ioctl(kvm.fileno(), uapi.KVM_GET_MSRS, buf, True) == 1
    assert buf.entries[0].data == values[buf.entries[0].index]


def test_missing_path_is_unavailable_with_hint(tmp_path):
    with pytest.raises(pykvm.KvmUnavailable) as ei:
        pykvm.Kvm(str(tmp_path / "nope"))
    assert ei.value.errno == errno.ENOENT
    assert ei.value.hint


@pytest.mark.parametrize("path", ["/dev/null", "regular", "dir"])
def test_path_that_is_not_kvm(tmp_path, path):
    before = set(os.listdir("/proc/self/fd"))
    if path == "regular":
        path = str(tmp_path / "f")
        open(path, "w").close()
    elif path == "dir":
        path = str(tmp_path)
    with pytest.raises(pykvm.KvmUnavailable) as ei:
        pykvm.Kvm(path)
    assert "not" in str(ei.value)
    assert set(os.listdir("/proc/self/fd")) == before  # nothing leaked


def test_feature_msr_values_need_64_bits(kvm):
    # Values above 2**31 round-trip (IA32_ARCH_CAPABILITIES etc. use high bits).
    vals = kvm.get_msrs(kvm.msr_feature_index_list())
    assert all(0 <= v < 2**64 for v in vals.values())
    assert ctypes.sizeof(uapi.kvm_msr_entry) == 16
