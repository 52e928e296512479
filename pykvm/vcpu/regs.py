"""vCPU register state: general, special, FPU, XSAVE, XCRs, debug registers,
nested state, ONE_REG and the sync-regs area of the run page (:class:`RegsMixin`)."""

from __future__ import annotations

import ctypes
import errno

from .._check import expect as _expect
from .._check import uint as _uint
from ..errors import KvmError
from ..uapi import ioctls as I
from ..uapi import structs as S
from ..uapi.enums import Cap
from ._state import VcpuState


class RegsMixin(VcpuState):
    """Register ioctls of :class:`~pykvm.vcpu.Vcpu` (one ioctl per method)."""


    # -- registers ---------------------------------------------------------------------
    def get_regs(self) -> S.kvm_regs:
        """``KVM_GET_REGS``: general-purpose registers, RIP and RFLAGS."""
        r = S.kvm_regs()
        self._ioctl(I.KVM_GET_REGS, r)
        return r

    def set_regs(self, regs: S.kvm_regs) -> None:
        """``KVM_SET_REGS``."""
        _expect(regs, S.kvm_regs)
        self._ioctl(I.KVM_SET_REGS, regs)

    def get_sregs(self) -> S.kvm_sregs:
        """``KVM_GET_SREGS``: segments, descriptor tables, control registers, EFER."""
        r = S.kvm_sregs()
        self._ioctl(I.KVM_GET_SREGS, r)
        return r

    def set_sregs(self, sregs: S.kvm_sregs) -> None:
        """``KVM_SET_SREGS``."""
        _expect(sregs, S.kvm_sregs)
        self._ioctl(I.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> S.kvm_fpu:
        """``KVM_GET_FPU``: x87 and SSE state.

        KVM does not transfer MXCSR through GET/SET_FPU (``mxcsr`` reads 0 and is
        ignored on set); use :meth:`get_xsave` for it.
        """
        r = S.kvm_fpu()
        self._ioctl(I.KVM_GET_FPU, r)
        return r

    def set_fpu(self, fpu: S.kvm_fpu) -> None:
        """``KVM_SET_FPU``."""
        _expect(fpu, S.kvm_fpu)
        self._ioctl(I.KVM_SET_FPU, fpu)

    # -- more register state -------------------------------------------------------------
    def get_sregs2(self) -> S.kvm_sregs2:
        """``KVM_GET_SREGS2`` (``KVM_CAP_SREGS2``): the special registers plus the
        PAE PDPTRs.  ``flags & KVM_SREGS2_FLAGS_PDPTRS_VALID`` tells whether the
        vCPU is in PAE paging (32-bit, CR4.PAE) and ``pdptrs`` holds its PDPTEs;
        unlike ``kvm_sregs`` there is no pending-interrupt bitmap."""
        r = S.kvm_sregs2()
        self._ioctl(I.KVM_GET_SREGS2, r)
        return r

    def set_sregs2(self, sregs2: S.kvm_sregs2) -> None:
        """``KVM_SET_SREGS2``.  With ``KVM_SREGS2_FLAGS_PDPTRS_VALID`` set, KVM uses
        ``pdptrs`` as the PDPTE registers instead of reading them from guest
        memory at CR3 (only valid for PAE paging: EINVAL otherwise)."""
        _expect(sregs2, S.kvm_sregs2)
        self._ioctl(I.KVM_SET_SREGS2, sregs2)

    def get_debug_regs(self) -> S.kvm_debugregs:
        """``KVM_GET_DEBUGREGS``: the guest's DR0-3, DR6 and DR7."""
        r = S.kvm_debugregs()
        self._ioctl(I.KVM_GET_DEBUGREGS, r)
        return r

    def set_debug_regs(self, debugregs: S.kvm_debugregs) -> None:
        """``KVM_SET_DEBUGREGS``: what the guest reads with ``mov reg, drN``
        (``flags`` must be 0; DR6/DR7 with bits set in their upper half: EINVAL)."""
        _expect(debugregs, S.kvm_debugregs)
        self._ioctl(I.KVM_SET_DEBUGREGS, debugregs)

    def _xsave_size(self) -> int:
        # KVM_CAP_XSAVE2 on the VM fd: the buffer size KVM_GET_XSAVE2 fills
        # (0 on kernels before 5.17: the 4 KiB of struct kvm_xsave then).
        try:
            n = self.vm.check_extension(Cap.XSAVE2)
        except KvmError:
            n = 0
        return max(n, ctypes.sizeof(S.kvm_xsave))

    def get_xsave(self) -> S.kvm_xsave:
        """``KVM_GET_XSAVE``: the 4 KiB XSAVE image (legacy area, header, AVX...).

        KVM refuses (EINVAL) when the guest's state needs more than 4 KiB (AMX):
        use :meth:`get_xsave2` then.
        """
        r = S.kvm_xsave()
        self._ioctl(I.KVM_GET_XSAVE, r)
        return r

    def get_xsave2(self) -> S.kvm_xsave:
        """``KVM_GET_XSAVE2``: the whole XSAVE image, sized by ``KVM_CAP_XSAVE2``
        (checked on the VM fd each call; ``len(bytes(r))`` is that size)."""
        size = self._xsave_size()
        r = S.flex(S.kvm_xsave, (size - ctypes.sizeof(S.kvm_xsave) + 3) // 4)
        self._ioctl(I.KVM_GET_XSAVE2, r)
        return r

    def set_xsave(self, xsave: S.kvm_xsave) -> None:
        """``KVM_SET_XSAVE`` (also takes what :meth:`get_xsave2` returned).

        KVM reads as many bytes as the guest's XSAVE image has (which can be more
        than 4 KiB); a smaller buffer is copied into a zero-padded one first.
        XRSTOR semantics apply: a component whose XSTATE_BV bit (byte 512) is 0
        is loaded in its init state, whatever the image holds.
        """
        _expect(xsave, S.kvm_xsave)
        need = self._xsave_size()
        have = ctypes.sizeof(xsave)
        if have < need:
            big = S.flex(S.kvm_xsave, (need - ctypes.sizeof(S.kvm_xsave) + 3) // 4)
            ctypes.memmove(ctypes.addressof(big), ctypes.addressof(xsave), have)
            xsave = big
        self._ioctl(I.KVM_SET_XSAVE, xsave)

    def get_xcrs(self) -> S.kvm_xcrs:
        """``KVM_GET_XCRS``: the extended control registers (``xcrs[0]`` is XCR0)."""
        r = S.kvm_xcrs()
        self._ioctl(I.KVM_GET_XCRS, r)
        return r

    def set_xcrs(self, xcrs: S.kvm_xcrs) -> None:
        """``KVM_SET_XCRS``: KVM checks XCR0 against the guest's CPUID leaf 0xD
        (set CPUID first) and refuses invalid combinations with EINVAL."""
        _expect(xcrs, S.kvm_xcrs)
        self._ioctl(I.KVM_SET_XCRS, xcrs)

    def get_nested_state(self) -> S.kvm_nested_state:
        """``KVM_GET_NESTED_STATE``: the VMX/SVM state of a nested guest, in a
        buffer of the size ``KVM_CAP_NESTED_STATE`` reports (``.size`` is what
        KVM used).  Hosts without nested virtualization refuse with EINVAL."""
        try:
            size = self.vm.check_extension(Cap.NESTED_STATE)
        except KvmError:
            size = 0
        hdr = ctypes.sizeof(S.kvm_nested_state)
        size = max(size, hdr)
        buf = S.flex(S.kvm_nested_state, size - hdr)
        buf.size = size
        self._ioctl(I.KVM_GET_NESTED_STATE, buf)
        return buf

    def set_nested_state(self, state: S.kvm_nested_state) -> None:
        """``KVM_SET_NESTED_STATE``: restore what :meth:`get_nested_state` gave."""
        _expect(state, S.kvm_nested_state)
        # KVM copies .size bytes from the buffer: never more than it holds.
        if state.size > ctypes.sizeof(state):
            raise ValueError(f"kvm_nested_state.size={state.size} exceeds the "
                             f"{ctypes.sizeof(state)}-byte buffer")
        self._ioctl(I.KVM_SET_NESTED_STATE, state)

    # -- ONE_REG ---------------------------------------------------------------------------
    def get_one_reg(self, reg_id: int) -> int:
        """``KVM_GET_ONE_REG``: the register *reg_id* as an unsigned int.

        On x86 (kernel 6.18+) the ids are ``uapi.KVM_X86_REG_MSR(index)`` for any
        MSR KVM can read, and ``uapi.KVM_X86_REG_KVM(KVM_REG_GUEST_SSP)``; the
        size is encoded in the id (``KVM_REG_SIZE_*``).  Older x86 kernels
        answer EINVAL/ENOTTY.
        """
        buf = (ctypes.c_uint8 * _one_reg_size(reg_id))()
        self._ioctl(I.KVM_GET_ONE_REG, S.kvm_one_reg(id=reg_id, addr=ctypes.addressof(buf)))
        return int.from_bytes(bytes(buf), "little")

    def set_one_reg(self, reg_id: int, value: int) -> None:
        """``KVM_SET_ONE_REG``: write *value* (an unsigned int of the id's size)."""
        n = _one_reg_size(reg_id)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << (8 * n):
            raise ValueError(f"value {value!r} does not fit register {reg_id:#x} ({n} bytes)")
        buf = (ctypes.c_uint8 * n).from_buffer_copy(value.to_bytes(n, "little"))
        self._ioctl(I.KVM_SET_ONE_REG, S.kvm_one_reg(id=reg_id, addr=ctypes.addressof(buf)))

    def get_reg_list(self) -> list[int]:
        """``KVM_GET_REG_LIST``: ONE_REG ids KVM enumerates.  x86 lists only
        KVM-defined registers (the CET SSP when the guest has shadow stacks),
        never MSRs, so an empty list is normal."""
        n = 16
        while True:
            buf = S.flex(S.kvm_reg_list, n)
            try:
                self._ioctl(I.KVM_GET_REG_LIST, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 1 << 16:
                    n *= 4
                    continue
                raise
            return [buf.reg[i] for i in range(min(buf.n, n))]


    # -- sync regs (kvm_run.s.regs) --------------------------------------------------------
    @property
    def sync_regs(self) -> S.kvm_sync_regs:
        """``kvm_run.s.regs`` (regs, sregs, events) as a live ctypes view.

        ``KVM_CAP_SYNC_REGS``: KVM fills the parts selected with
        :meth:`set_sync_valid_reg` at every exit, and loads the parts marked
        with :meth:`set_sync_dirty_reg` on the next run (then clears those
        dirty bits) — register access without GET/SET ioctls.
        """
        return self.kvm_run.s.regs

    @property
    def sync_valid_regs(self) -> int:
        """``kvm_run.kvm_valid_regs`` (``KVM_SYNC_X86_REGS | SREGS | EVENTS`` bits)."""
        return self.kvm_run.kvm_valid_regs

    @property
    def sync_dirty_regs(self) -> int:
        """``kvm_run.kvm_dirty_regs``: parts KVM loads from ``sync_regs`` next run."""
        return self.kvm_run.kvm_dirty_regs

    def set_sync_valid_reg(self, mask: int) -> None:
        """Ask KVM to copy these parts into :attr:`sync_regs` at each exit."""
        self.kvm_run.kvm_valid_regs |= _sync_mask(mask)

    def clear_sync_valid_reg(self, mask: int) -> None:
        """Stop copying these parts out at exits."""
        self.kvm_run.kvm_valid_regs &= ~_sync_mask(mask)

    def set_sync_dirty_reg(self, mask: int) -> None:
        """Mark these parts of :attr:`sync_regs` as changed: KVM loads them on the next run."""
        self.kvm_run.kvm_dirty_regs |= _sync_mask(mask)

    def clear_sync_dirty_reg(self, mask: int) -> None:
        """Unmark parts marked with :meth:`set_sync_dirty_reg`."""
        self.kvm_run.kvm_dirty_regs &= ~_sync_mask(mask)


def _sync_mask(mask: int) -> int:
    _uint("mask", mask)
    if mask & ~S.KVM_SYNC_X86_VALID_FIELDS:
        raise ValueError(f"sync-regs mask {mask:#x} has bits outside KVM_SYNC_X86_REGS|SREGS|EVENTS "
                         f"({S.KVM_SYNC_X86_VALID_FIELDS:#x}); KVM_RUN would fail with EINVAL")
    return mask


def _one_reg_size(reg_id: int) -> int:
    _uint("reg_id", reg_id)
    return 1 << ((reg_id & S.KVM_REG_SIZE_MASK) >> S.KVM_REG_SIZE_SHIFT)
