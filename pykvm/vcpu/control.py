"""The rest of the vCPU ioctls: signal mask during ``KVM_RUN``, TSC rate and
kvmclock, pre-faulting memory, ``KVM_ENABLE_CAP``, Xen attributes, statistics."""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .._check import U32 as _U32
from .._check import expect as _expect
from .._check import int_arg as _int_arg
from .._check import uint as _uint
from ..errors import KvmError
from ..uapi import ioctls as I
from ..uapi import structs as S
from ._state import VcpuState

if TYPE_CHECKING:  # pragma: no cover
    from ..stats import Stats


class ControlMixin(VcpuState):
    """Miscellaneous ioctls of :class:`~pykvm.vcpu.Vcpu`."""


    # -- signals during KVM_RUN -----------------------------------------------------------
    def set_signal_mask(self, signals: Iterable[int] | None) -> None:
        """``KVM_SET_SIGNAL_MASK``: the signals blocked *while inside* ``KVM_RUN``.

        KVM swaps this mask in for the duration of the run, so a signal the
        thread normally blocks can still interrupt the guest (``Interrupted``),
        and the other way round.  ``None`` removes the mask (the thread's own
        mask applies again).  pykvm's kick signal should stay unblocked.
        """
        if signals is None:
            self._ioctl(I.KVM_SET_SIGNAL_MASK, 0)  # NULL: no mask
            return
        bits = 0
        for sig in signals:
            n = _int_arg("signal number", sig)
            if not 1 <= n <= 64:
                raise ValueError(f"signal number {n} out of range 1..64")
            bits |= 1 << (n - 1)
        m = S.flex(S.kvm_signal_mask, 8)
        m.len = 8  # the kernel's sigset_t size on x86-64
        m.sigset[:] = list(bits.to_bytes(8, "little"))
        self._ioctl(I.KVM_SET_SIGNAL_MASK, m)


    # -- time --------------------------------------------------------------------------------
    def get_tsc_khz(self) -> int:
        """``KVM_GET_TSC_KHZ``: the guest's TSC frequency in kHz."""
        return self._ioctl(I.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        """``KVM_SET_TSC_KHZ``: the guest's TSC frequency.  Without TSC scaling
        (``KVM_CAP_TSC_CONTROL`` = 0) KVM accepts the host rate or a higher one
        (it then keeps the guest TSC caught up on entries) and refuses a
        lower one with EINVAL — after recording it: ``get_tsc_khz`` then
        reports the refused rate.  0 means the host rate."""
        self._ioctl(I.KVM_SET_TSC_KHZ, _uint("khz", khz, _U32))

    def kvmclock_ctrl(self) -> None:
        """``KVM_KVMCLOCK_CTRL``: tell the guest it was paused: KVM sets
        PVCLOCK_GUEST_STOPPED (bit 1 of ``flags``) in its kvmclock page at the
        next clock update.  EINVAL until the guest (or ``set_msrs``) enabled
        kvmclock (MSR_KVM_SYSTEM_TIME_NEW, 0x4b564d01)."""
        self._ioctl(I.KVM_KVMCLOCK_CTRL)


    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> None:
        """``KVM_PRE_FAULT_MEMORY`` (``KVM_CAP_PRE_FAULT_MEMORY``): map guest
        physical [gpa, gpa+size) into the stage-2 page tables before the guest
        touches it.  Repeats the call until the whole range is done.  KVM
        without two-dimensional paging (shadow paging) refuses: EOPNOTSUPP."""
        r = S.kvm_pre_fault_memory(gpa=_uint("gpa", gpa), size=_uint("size", size),
                                   flags=_uint("flags", flags))
        while r.size:
            try:
                self._ioctl(I.KVM_PRE_FAULT_MEMORY, r)
            except KvmError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN):
                    continue  # progress (if any) is in r; redoing done pages is harmless
                raise


    # -- Xen ------------------------------------------------------------------------------------
    def xen_vcpu_get_attr(self, type_: int) -> S.kvm_xen_vcpu_attr:
        """``KVM_XEN_VCPU_GET_ATTR`` (``KVM_CAP_XEN_HVM``; EINVAL when KVM has no Xen support)."""
        a = S.kvm_xen_vcpu_attr(type=_uint("type", type_, 0xFFFF))
        self._ioctl(I.KVM_XEN_VCPU_GET_ATTR, a)
        return a

    def xen_vcpu_set_attr(self, attr: S.kvm_xen_vcpu_attr) -> None:
        """``KVM_XEN_VCPU_SET_ATTR``."""
        _expect(attr, S.kvm_xen_vcpu_attr)
        self._ioctl(I.KVM_XEN_VCPU_SET_ATTR, attr)

    # -- statistics ------------------------------------------------------------------------
    def get_stats_fd(self) -> Stats:
        """``KVM_GET_STATS_FD``: this vCPU's binary statistics (a :class:`pykvm.stats.Stats`,
        which owns the new fd: close it or use ``with``)."""
        from ..stats import open_stats

        return open_stats(self.fileno())
