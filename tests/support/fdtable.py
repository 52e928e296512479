"""This process's fd table, mappings and resident size, read from ``/proc/self``."""

from __future__ import annotations

import fcntl
import os


def fds() -> dict[int, str]:
    """{fd: readlink target} of this process."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the directory's own fd, gone by now
    return out


def kvm_fds() -> dict[int, str]:
    """The fds that point at KVM objects (device, VMs, vCPUs, devices, stats, guest_memfd)."""
    return {fd: t for fd, t in fds().items() if "kvm" in t}


def cloexec(fd: int) -> bool:
    """True if *fd* has FD_CLOEXEC."""
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def maps() -> list[str]:
    """The lines of /proc/self/maps."""
    with open("/proc/self/maps") as f:
        return f.read().splitlines()


def mapped(addr: int) -> bool:
    """True if *addr* lies in some mapping of this process."""
    for line in maps():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            return True
    return False


def kvm_run_mappings() -> list[str]:
    """Lines of /proc/self/maps that map a vCPU fd (the kvm_run areas)."""
    return [line for line in maps() if "kvm-vcpu" in line]


def rss() -> int:
    """Resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
