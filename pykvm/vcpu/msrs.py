"""Model-specific registers: ``KVM_GET_MSRS`` / ``KVM_SET_MSRS`` on a vCPU, and
:func:`msrs_buffer`, the one builder of a ``kvm_msrs`` request (also used by the system fd)."""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping

from .._check import int_arg as _int_arg
from ..errors import KvmError
from ..uapi import ioctls as I
from ..uapi import structs as S
from ._state import VcpuState


def msrs_buffer(indices: Iterable[int]) -> S.kvm_msrs:
    """A zeroed ``kvm_msrs`` with one entry per MSR index in *indices* (each a u32)."""
    idx = [_int_arg("MSR index", i) for i in indices]
    for i in idx:
        if not 0 <= i <= 0xFFFFFFFF:
            raise ValueError(f"MSR index {i:#x} is not a 32-bit value")
    buf = S.flex(S.kvm_msrs, len(idx))
    for k, i in enumerate(idx):
        buf.entries[k].index = i
    return buf



class MsrsMixin(VcpuState):
    """MSR ioctls of :class:`~pykvm.vcpu.Vcpu`."""


    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """``KVM_GET_MSRS``: ``{index: value}`` for the MSRs KVM could read.

        KVM stops at the first MSR it cannot read; missing keys were not read.
        """
        buf = msrs_buffer(indices)
        n = self._ioctl(I.KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, values: Mapping[int, int]) -> int:
        """``KVM_SET_MSRS``: write ``{index: value}``; raise if KVM refused one.

        Returns the number written (all of them).
        """
        if not isinstance(values, Mapping):
            raise TypeError(f"set_msrs wants a mapping {{index: value}}, not {type(values).__name__}")
        items = list(values.items())
        buf = msrs_buffer(k for k, _ in items)
        for k, (_, v) in enumerate(items):
            if not 0 <= _int_arg("MSR value", v) < 2**64:
                raise ValueError(f"MSR value {v:#x} is not a 64-bit unsigned value")
            buf.entries[k].data = v
        n = self._ioctl(I.KVM_SET_MSRS, buf)
        if n != len(items):
            bad = items[n][0]
            raise KvmError(errno.EINVAL, "KVM_SET_MSRS",
                           f"KVM refused MSR {bad:#x} (wrote {n} of {len(items)})")
        return n
