"""Events and the CPU state machine: MP state, pending events, interrupt / NMI /
SMI injection, the interrupt-window fields of the run page, machine checks."""

from __future__ import annotations

import ctypes

from .._check import U32 as _U32
from .._check import expect as _expect
from .._check import uint as _uint
from ..uapi import ioctls as I
from ..uapi import structs as S
from ._state import VcpuState

_OFF_RIW = S.offsetof(S.kvm_run, "request_interrupt_window")       # 0
_OFF_READY = S.offsetof(S.kvm_run, "ready_for_interrupt_injection")  # 12
_OFF_IF = S.offsetof(S.kvm_run, "if_flag")                          # 13


class EventsMixin(VcpuState):
    """Event ioctls of :class:`~pykvm.vcpu.Vcpu`."""


    # -- CPU state machine and events ----------------------------------------------------
    def get_mp_state(self) -> int:
        """``KVM_GET_MP_STATE``: ``KVM_MP_STATE_RUNNABLE`` (0), ``..._HALTED`` (3) ..."""
        r = S.kvm_mp_state()
        self._ioctl(I.KVM_GET_MP_STATE, r)
        return r.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        """``KVM_SET_MP_STATE``.  A ``KVM_MP_STATE_HALTED`` vCPU stays inside
        ``KVM_RUN`` until an interrupt or NMI wakes it.  Without an in-kernel
        irqchip only ``KVM_MP_STATE_RUNNABLE`` is accepted (EINVAL)."""
        self._ioctl(I.KVM_SET_MP_STATE, S.kvm_mp_state(mp_state=_uint("mp_state", mp_state, _U32)))

    def get_vcpu_events(self) -> S.kvm_vcpu_events:
        """``KVM_GET_VCPU_EVENTS``: pending/injected exception, interrupt, NMI,
        SMI and interrupt shadow.  ``flags`` says which optional parts are valid."""
        r = S.kvm_vcpu_events()
        self._ioctl(I.KVM_GET_VCPU_EVENTS, r)
        return r

    def set_vcpu_events(self, events: S.kvm_vcpu_events) -> None:
        """``KVM_SET_VCPU_EVENTS``: e.g. inject an exception (``exception.injected``)
        or make an NMI pending (``nmi.pending`` with ``KVM_VCPUEVENT_VALID_NMI_PENDING``
        in ``flags``).  Fields guarded by a ``KVM_VCPUEVENT_VALID_*`` flag are
        ignored unless the flag is set."""
        _expect(events, S.kvm_vcpu_events)
        self._ioctl(I.KVM_SET_VCPU_EVENTS, events)

    def interrupt(self, irq: int) -> None:
        """``KVM_INTERRUPT``: queue external interrupt vector *irq* (0-255).

        Only without an in-kernel irqchip (ENXIO otherwise) and only when the
        guest can take it: check :attr:`ready_for_interrupt_injection`, or set
        :attr:`request_interrupt_window` and wait for ``IrqWindowOpen``.
        """
        self._ioctl(I.KVM_INTERRUPT, S.kvm_interrupt(irq=_uint("irq", irq, 255)))

    def nmi(self) -> None:
        """``KVM_NMI``: make an NMI pending (delivered on the next run unless NMIs
        are blocked).  With an in-kernel LAPIC this is the LINT1 input."""
        self._ioctl(I.KVM_NMI)

    def smi(self) -> None:
        """``KVM_SMI``: make an SMI pending (``KVM_CAP_X86_SMM``; kernels built
        without SMM support do not know the ioctl: ENOTTY)."""
        self._ioctl(I.KVM_SMI)

    @property
    def request_interrupt_window(self) -> bool:
        """``kvm_run.request_interrupt_window``: ask KVM to exit with
        ``IrqWindowOpen`` as soon as the guest can take an interrupt."""
        return bool(self._mm[_OFF_RIW])

    @request_interrupt_window.setter
    def request_interrupt_window(self, value: bool) -> None:
        self._mm[_OFF_RIW] = 1 if value else 0

    @property
    def ready_for_interrupt_injection(self) -> bool:
        """``kvm_run.ready_for_interrupt_injection`` after the last exit."""
        return bool(self._mm[_OFF_READY])

    @property
    def if_flag(self) -> bool:
        """``kvm_run.if_flag``: the guest's RFLAGS.IF at the last exit."""
        return bool(self._mm[_OFF_IF])


    # -- machine check ---------------------------------------------------------------------
    def setup_mce(self, mcg_cap: int) -> None:
        """``KVM_X86_SETUP_MCE``: give the guest machine-check banks.  *mcg_cap* is
        the IA32_MCG_CAP value: bank count in bits 0-7 (1-32) plus capability
        bits from ``Kvm.mce_cap_supported()`` (e.g. MCG_CTL_P, bit 8)."""
        self._ioctl(I.KVM_X86_SETUP_MCE, ctypes.c_uint64(_uint("mcg_cap", mcg_cap)))

    def set_mce(self, mce: S.kvm_x86_mce | None = None, *, bank: int = 0, status: int = 0,
                addr: int = 0, misc: int = 0, mcg_status: int = 0) -> None:
        """``KVM_X86_SET_MCE``: report a machine check in *bank*.

        *status* needs MCi_STATUS.VAL (bit 63).  An uncorrected error (UC, bit
        61) raises #MC in the guest (a triple fault if CR4.MCE is clear or
        MCG_STATUS.MCIP is already set); a corrected one is only recorded in
        the bank's MSRs.
        """
        if mce is None:
            mce = S.kvm_x86_mce(status=_uint("status", status), addr=_uint("addr", addr),
                                misc=_uint("misc", misc), mcg_status=_uint("mcg_status", mcg_status),
                                bank=_uint("bank", bank, 0xFF))
        else:
            _expect(mce, S.kvm_x86_mce)
        self._ioctl(I.KVM_X86_SET_MCE, mce)
