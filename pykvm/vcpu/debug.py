"""Debugging a guest from user space: ``KVM_SET_GUEST_DEBUG`` and ``KVM_TRANSLATE``."""

from __future__ import annotations

from collections.abc import Sequence

from .._check import expect as _expect
from .._check import uint as _uint
from ..uapi import ioctls as I
from ..uapi import structs as S
from ._state import VcpuState


class DebugMixin(VcpuState):
    """Debug ioctls of :class:`~pykvm.vcpu.Vcpu`."""


    # -- debugging ----------------------------------------------------------------------------
    def set_guest_debug(self, debug: S.kvm_guest_debug | None = None, *, enable: bool = True,
                        single_step: bool = False, sw_breakpoints: bool = False,
                        hw_breakpoints: Sequence[int] = (), inject_db: bool = False,
                        inject_bp: bool = False, block_irq: bool = False) -> S.kvm_guest_debug:
        """``KVM_SET_GUEST_DEBUG``: debug the guest from user space.

        Pass a ready ``kvm_guest_debug``, or describe it with keywords:

        * ``single_step``: every instruction ends the run with a ``Debug`` exit
          (``exception`` 1, ``dr6`` bit 14 BS, ``pc`` = the next rip);
        * ``hw_breakpoints``: up to 4 execution addresses for DR0-DR3 (local
          enable, length 1): reaching one gives ``Debug`` with ``pc`` = the
          address and ``dr6`` bit *n* for slot *n*.  The run stops there again
          and again until the slot is cleared (KVM sets no RF for you);
        * ``sw_breakpoints``: an ``int3`` in the guest exits with ``Debug``
          (exception 3) instead of raising #BP in the guest;
        * ``inject_db`` / ``inject_bp``: queue a #DB / #BP into the guest now
          (EBUSY if an exception is already pending);
        * ``block_irq``: no interrupts while debugging (``KVM_CAP_SET_GUEST_DEBUG2``).

        ``enable=False`` turns debugging off.  Returns the structure passed to
        KVM.  ``KVM_CAP_SET_GUEST_DEBUG2`` lists the control bits KVM supports
        (x86 KVM does not refuse others, it ignores them).
        """
        if debug is not None:
            if (single_step or sw_breakpoints or hw_breakpoints or inject_db or inject_bp
                    or block_irq or not enable):
                raise TypeError("pass either a kvm_guest_debug or keywords, not both")
            _expect(debug, S.kvm_guest_debug)
        else:
            bps = [_uint("hw_breakpoints[]", a) for a in hw_breakpoints]
            if len(bps) > 4:
                raise ValueError(f"x86 has 4 hardware breakpoints (DR0-DR3), got {len(bps)}")
            control = 0
            if enable:
                control = S.KVM_GUESTDBG_ENABLE
                if single_step:
                    control |= S.KVM_GUESTDBG_SINGLESTEP
                if sw_breakpoints:
                    control |= S.KVM_GUESTDBG_USE_SW_BP
                if bps:
                    control |= S.KVM_GUESTDBG_USE_HW_BP
                if block_irq:
                    control |= S.KVM_GUESTDBG_BLOCKIRQ
            elif single_step or sw_breakpoints or bps or block_irq:
                raise ValueError("enable=False cannot be combined with debug features")
            if inject_db:
                control |= S.KVM_GUESTDBG_INJECT_DB
            if inject_bp:
                control |= S.KVM_GUESTDBG_INJECT_BP
            debug = S.kvm_guest_debug(control=control)
            dr7 = 0x400 if bps else 0  # bit 10 reads as 1
            for i, addr in enumerate(bps):
                debug.arch.debugreg[i] = addr
                dr7 |= 1 << (2 * i)  # Ln; R/Wn = 00 (execute), LENn = 00
            debug.arch.debugreg[7] = dr7
        self._ioctl(I.KVM_SET_GUEST_DEBUG, debug)
        return debug


    # -- address translation, memory ------------------------------------------------------
    def translate_gva(self, gva: int) -> S.kvm_translation:
        """``KVM_TRANSLATE``: walk the guest's page tables for linear address *gva*.

        ``valid`` and ``physical_address`` are the answer; KVM reports
        ``writeable`` = 1 and ``usermode`` = 0 whatever the page tables say.
        """
        t = S.kvm_translation(linear_address=_uint("gva", gva))
        self._ioctl(I.KVM_TRANSLATE, t)
        return t
