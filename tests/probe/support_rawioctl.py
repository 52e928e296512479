"""Plain-ioctl readers for checking the probe: no pykvm inside.

Request numbers are spelled out from the kernel's _IO/_IOWR encoding
(type 0xAE), so these helpers share nothing with pykvm.uapi.
"""

from __future__ import annotations

import fcntl
import os
import struct

KVMIO = 0xAE


def _io(nr: int) -> int:
    return (KVMIO << 8) | nr


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (KVMIO << 8) | nr


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_STATS_FD = _io(0xCE)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, 4)          # struct kvm_msr_list header: u32 nmsrs
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)         # struct kvm_cpuid2 header: u32 nent, u32 pad
KVM_GET_EMULATED_CPUID = _iowr(0x09, 8)
KVM_GET_MSR_FEATURE_INDEX_LIST = _iowr(0x0A, 4)
KVM_GET_MSRS = _iowr(0x88, 8)                    # struct kvm_msrs header: u32 nmsrs, u32 pad

Entry = tuple[int, int, int, int, int, int, int]  # function index flags eax ebx ecx edx


def check(fd: int, cap: int) -> int:
    try:
        return fcntl.ioctl(fd, KVM_CHECK_EXTENSION, cap)
    except OSError:
        return 0


def cpuid(fd: int, request: int, n: int = 1024) -> list[Entry]:
    buf = bytearray(8 + 40 * n)
    struct.pack_into("=II", buf, 0, n, 0)
    fcntl.ioctl(fd, request, buf, True)
    nent = struct.unpack_from("=I", buf, 0)[0]
    return [struct.unpack_from("=7I", buf, 8 + 40 * i) for i in range(nent)]


def msr_list(fd: int, request: int, n: int = 4096) -> list[int]:
    buf = bytearray(4 + 4 * n)
    struct.pack_into("=I", buf, 0, n)
    fcntl.ioctl(fd, request, buf, True)
    count = struct.unpack_from("=I", buf, 0)[0]
    return list(struct.unpack_from(f"={count}I", buf, 4))


def get_msr(fd: int, index: int):
    buf = bytearray(8 + 16)
    struct.pack_into("=IIIIQ", buf, 0, 1, 0, index, 0, 0)
    n = fcntl.ioctl(fd, KVM_GET_MSRS, buf, True)
    return struct.unpack_from("=Q", buf, 16)[0] if n == 1 else None


def stats(owner_fd: int) -> dict[str, object]:
    """Header, id, descriptors and data of a stats fd, read with os.pread."""
    sfd = fcntl.ioctl(owner_fd, KVM_GET_STATS_FD, 0)
    try:
        _flags, name_size, num_desc, id_off, desc_off, data_off = struct.unpack(
            "=6I", os.pread(sfd, 24, 0))
        ident = os.pread(sfd, name_size, id_off).split(b"\0")[0].decode()
        descs = []
        step = 16 + name_size
        raw = os.pread(sfd, step * num_desc, desc_off)
        for i in range(num_desc):
            dflags, exponent, size, offset, bucket = struct.unpack_from("=IhHII", raw, i * step)
            name = raw[i * step + 16:(i + 1) * step].split(b"\0")[0].decode()
            values = list(struct.unpack(f"={size}Q", os.pread(sfd, 8 * size, data_off + offset)))
            descs.append({"name": name, "flags": dflags, "exponent": exponent, "size": size,
                          "offset": offset, "bucket_size": bucket, "values": values})
        return {"fd_flags": fcntl.fcntl(sfd, fcntl.F_GETFD), "id": ident, "name_size": name_size,
                "descriptors": descs}
    finally:
        os.close(sfd)
