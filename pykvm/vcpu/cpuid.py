"""The CPUID table of a vCPU: ``KVM_SET_CPUID2``/``KVM_GET_CPUID2``, the legacy
``KVM_SET_CPUID`` and the Hyper-V leaves (:class:`CpuidMixin`)."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterable

from .._check import expect as _expect
from ..errors import KvmError
from ..uapi import ioctls as I
from ..uapi import structs as S
from ._state import VcpuState


def flex_capacity(buf: ctypes.Structure, header: type, entry: type) -> int:
    """How many *entry* items the flexible array of *buf* (a *header* + array) really holds."""
    return (ctypes.sizeof(buf) - ctypes.sizeof(header)) // ctypes.sizeof(entry)


class CpuidMixin(VcpuState):
    """CPUID ioctls of :class:`~pykvm.vcpu.Vcpu`."""


    def get_cpuid2(self, max_entries: int = 256) -> list[S.kvm_cpuid_entry2]:
        """``KVM_GET_CPUID2``: the CPUID table set on this vCPU (grows on E2BIG)."""
        n = max_entries
        while True:
            buf = S.flex(S.kvm_cpuid2, n)
            try:
                self._ioctl(I.KVM_GET_CPUID2, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 1 << 16:
                    n *= 2
                    continue
                raise
            return [S.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def set_cpuid2(self, entries: Iterable[S.kvm_cpuid_entry2] | S.kvm_cpuid2) -> None:
        """``KVM_SET_CPUID2``: the CPUID the guest sees (e.g. ``kvm.supported_cpuid()``).

        A ready ``kvm_cpuid2`` (from ``S.flex``) is passed as is once its ``nent``
        is checked against the entries the buffer really holds: KVM copies
        ``nent`` entries from it, so a larger count would hand it host memory
        past the buffer.
        """
        if isinstance(entries, S.kvm_cpuid2):
            buf = entries
            room = flex_capacity(buf, S.kvm_cpuid2, S.kvm_cpuid_entry2)
            if buf.nent > room:
                raise ValueError(f"kvm_cpuid2.nent={buf.nent} but the buffer holds {room} entries")
        else:
            lst = list(entries)
            for e in lst:
                _expect(e, S.kvm_cpuid_entry2)
            buf = S.flex(S.kvm_cpuid2, len(lst))
            for k, e in enumerate(lst):
                buf.entries[k] = e
        self._ioctl(I.KVM_SET_CPUID2, buf)

    def set_cpuid(self, entries: Iterable[S.kvm_cpuid_entry]) -> None:
        """``KVM_SET_CPUID`` (the original, index-less form; prefer :meth:`set_cpuid2`).

        KVM turns each ``kvm_cpuid_entry`` into a ``kvm_cpuid_entry2`` with
        index 0 and no flags; at most 256 entries (E2BIG beyond).
        """
        lst = list(entries)
        for e in lst:
            _expect(e, S.kvm_cpuid_entry)
        buf = S.flex(S.kvm_cpuid, len(lst))
        for k, e in enumerate(lst):
            buf.entries[k] = e
        self._ioctl(I.KVM_SET_CPUID, buf)

    def get_supported_hv_cpuid(self, max_entries: int = 64) -> list[S.kvm_cpuid_entry2]:
        """``KVM_GET_SUPPORTED_HV_CPUID`` on the vCPU fd: the Hyper-V leaves KVM
        could expose (``KVM_CAP_HYPERV_CPUID``; the kernel answers EINVAL when
        built without Hyper-V emulation).  Grows the buffer on E2BIG."""
        n = max_entries
        while True:
            buf = S.flex(S.kvm_cpuid2, n)
            try:
                self._ioctl(I.KVM_GET_SUPPORTED_HV_CPUID, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 1 << 12:
                    n *= 2
                    continue
                raise
            return [S.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]
