"""The in-kernel local APIC of a vCPU: register page, TPR reporting, VAPIC page,
and :func:`lapic_get_reg` / :func:`lapic_set_reg` for one register of a page."""

from __future__ import annotations

from .._check import U32 as _U32
from .._check import expect as _expect
from .._check import uint as _uint
from ..uapi import ioctls as I
from ..uapi import structs as S
from ._state import VcpuState


class LapicMixin(VcpuState):
    """LAPIC ioctls of :class:`~pykvm.vcpu.Vcpu` (need ``vm.create_irq_chip()`` first)."""


    # -- local APIC (in-kernel irqchip) ----------------------------------------------------
    def get_lapic(self) -> S.kvm_lapic_state:
        """``KVM_GET_LAPIC``: the 1 KiB register page of the in-kernel local APIC
        (EINVAL without an in-kernel irqchip).  Read a register with
        :func:`lapic_get_reg` or :meth:`get_lapic_reg`."""
        r = S.kvm_lapic_state()
        self._ioctl(I.KVM_GET_LAPIC, r)
        return r

    def set_lapic(self, lapic: S.kvm_lapic_state) -> None:
        """``KVM_SET_LAPIC``: load the whole register page (KVM recomputes its
        derived state: timers, priorities, pending interrupts)."""
        _expect(lapic, S.kvm_lapic_state)
        self._ioctl(I.KVM_SET_LAPIC, lapic)

    def get_lapic_reg(self, offset: int) -> int:
        """One 32-bit LAPIC register (``APIC_TASKPRI`` = 0x80 ...), via ``KVM_GET_LAPIC``."""
        return lapic_get_reg(self.get_lapic(), offset)

    def set_lapic_reg(self, offset: int, value: int) -> None:
        """Write one LAPIC register: ``KVM_GET_LAPIC``, change it, ``KVM_SET_LAPIC``."""
        state = self.get_lapic()
        lapic_set_reg(state, offset, value)
        self.set_lapic(state)

    def tpr_access_reporting(self, enabled: bool = True) -> None:
        """``KVM_TPR_ACCESS_REPORTING``: when on, a guest access to the LAPIC TPR
        through MMIO ends the run with a ``TprAccess`` exit (``rip`` of the
        accessing instruction, ``is_write``) at KVM's next guest entry.  Needs
        the in-kernel LAPIC.  KVM fills those fields at the access: if another
        exit reaches user space first (seen here, where KVM's emulator runs
        several CPL0 instructions in a row), the report comes one run later
        with the fields overwritten by that exit."""
        self._ioctl(I.KVM_TPR_ACCESS_REPORTING, S.kvm_tpr_access_ctl(enabled=1 if enabled else 0))

    def set_vapic_addr(self, gpa: int) -> None:
        """``KVM_SET_VAPIC_ADDR``: guest physical address of the VAPIC page (0
        turns it off).  Before each entry KVM writes a u32 there: TPR in bits
        0-7, the highest in-service vector's class in bits 12-15 and the
        highest requested vector in bits 24-31 (only while the LAPIC is
        software-enabled, SPIV bit 8).  Needs the in-kernel LAPIC."""
        self._ioctl(I.KVM_SET_VAPIC_ADDR, S.kvm_vapic_addr(vapic_addr=_uint("gpa", gpa)))


def _lapic_offset(offset: int) -> int:
    _uint("offset", offset)
    if offset % 16 or offset >= S.KVM_APIC_REG_SIZE:
        raise ValueError(f"LAPIC register offset {offset:#x} is not a multiple of 16 below "
                         f"{S.KVM_APIC_REG_SIZE:#x}")
    return offset


def lapic_get_reg(state: S.kvm_lapic_state, offset: int) -> int:
    """The 32-bit LAPIC register at *offset* (0x20 ID, 0x80 TPR, 0xF0 SPIV ...) of *state*."""
    _expect(state, S.kvm_lapic_state)
    off = _lapic_offset(offset)
    return int.from_bytes(bytes(state.regs[off:off + 4]), "little")


def lapic_set_reg(state: S.kvm_lapic_state, offset: int, value: int) -> None:
    """Write the 32-bit LAPIC register at *offset* in *state* (then ``set_lapic`` it)."""
    _expect(state, S.kvm_lapic_state)
    off = _lapic_offset(offset)
    state.regs[off:off + 4] = list(_uint("value", value, _U32).to_bytes(4, "little"))
