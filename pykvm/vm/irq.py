"""Interrupt helpers: GSI routing entries, MSI messages, IOAPIC entries.

``Vm.set_gsi_routing(entries)`` *replaces* the VM's whole GSI routing table
with *entries* (``struct kvm_irq_routing_entry``).  Build them with
:func:`irqchip_route` (a GSI drives a PIC or IOAPIC pin) and
:func:`msi_route` (a GSI sends an MSI); :func:`default_routes` returns the
table KVM installs with ``KVM_CREATE_IRQCHIP``, to extend rather than lose it.
A GSI may appear in several entries (GSI 0-15 drive both a PIC and an IOAPIC
pin by default).

x86 MSI format (Intel SDM vol. 3, "Message Signalled Interrupts"): the address
is ``0xFEE00000 | dest_id << 12`` (plus redirection-hint and logical-mode
bits), the data holds the vector in bits 0-7 and the delivery mode in 8-10.
"""

from __future__ import annotations

from collections.abc import Iterable

from .._check import U32 as _U32
from .._check import U64 as _U64
from .._check import expect as _expect
from .._check import flex_fits as _flex_fits
from .._check import uint as _uint
from ..uapi import ioctls, structs
from ..uapi.enums import Cap
from ._state import VmState
from .eventfd import FdLike, fd_of

__all__ = [
    "IOAPIC",
    "PIC_MASTER",
    "PIC_SLAVE",
    "Interrupts",
    "default_routes",
    "ioapic_redirection",
    "irqchip_route",
    "msi_address",
    "msi_data",
    "msi_route",
]

PIC_MASTER = structs.KVM_IRQCHIP_PIC_MASTER
PIC_SLAVE = structs.KVM_IRQCHIP_PIC_SLAVE
IOAPIC = structs.KVM_IRQCHIP_IOAPIC

def irqchip_route(gsi: int, irqchip: int, pin: int) -> structs.kvm_irq_routing_entry:
    """A routing entry: GSI *gsi* drives *pin* of *irqchip* (``PIC_MASTER``, ``PIC_SLAVE``, ``IOAPIC``)."""
    if irqchip not in (PIC_MASTER, PIC_SLAVE, IOAPIC):
        raise ValueError(f"irqchip={irqchip!r}: expected PIC_MASTER (0), PIC_SLAVE (1) or IOAPIC (2)")
    limit = 7 if irqchip != IOAPIC else structs.KVM_IOAPIC_NUM_PINS - 1
    e = structs.kvm_irq_routing_entry(gsi=_uint("gsi", gsi, _U32), type=structs.KVM_IRQ_ROUTING_IRQCHIP)
    e.u.irqchip.irqchip = irqchip
    e.u.irqchip.pin = _uint("pin", pin, limit)
    return e


def msi_route(gsi: int, address: int, data: int, *, devid: int | None = None) -> structs.kvm_irq_routing_entry:
    """A routing entry: GSI *gsi* sends the MSI (*address*, *data*).

    *devid* (sets ``KVM_MSI_VALID_DEVID``) is only meaningful on hosts with
    ``KVM_CAP_MSI_DEVID`` (not x86).
    """
    e = structs.kvm_irq_routing_entry(gsi=_uint("gsi", gsi, _U32), type=structs.KVM_IRQ_ROUTING_MSI)
    addr = _uint("address", address, _U64)
    e.u.msi.address_lo = addr & _U32
    e.u.msi.address_hi = addr >> 32
    e.u.msi.data = _uint("data", data, _U32)
    if devid is not None:
        e.flags = structs.KVM_MSI_VALID_DEVID
        e.u.msi.devid = _uint("devid", devid, _U32)
    return e


def default_routes(ioapic_pins: int = structs.KVM_IOAPIC_NUM_PINS) -> list[structs.kvm_irq_routing_entry]:
    """The table ``KVM_CREATE_IRQCHIP`` installs: GSI 0-15 to IOAPIC and PIC, 16-23 to IOAPIC."""
    out = []
    for gsi in range(_uint("ioapic_pins", ioapic_pins, structs.KVM_IOAPIC_NUM_PINS)):
        out.append(irqchip_route(gsi, IOAPIC, gsi))
        if gsi < 16:
            out.append(irqchip_route(gsi, PIC_MASTER if gsi < 8 else PIC_SLAVE, gsi % 8))
    return out


def msi_address(dest_id: int = 0, *, logical: bool = False, redirection_hint: bool = False) -> int:
    """The MSI address that targets APIC id *dest_id* (0..255)."""
    return 0xFEE00000 | _uint("dest_id", dest_id, 0xFF) << 12 | (redirection_hint << 3) | (logical << 2)


def msi_data(vector: int, *, delivery_mode: int = 0, level_trigger: bool = False, assert_: bool = True) -> int:
    """The MSI data word for *vector* (delivery mode 0 = fixed, 4 = NMI ...)."""
    return (_uint("vector", vector, 0xFF) | _uint("delivery_mode", delivery_mode, 7) << 8
            | (assert_ << 14) | (level_trigger << 15))


def ioapic_redirection(vector: int, dest_id: int = 0, *, masked: bool = False, level_trigger: bool = False,
                       active_low: bool = False, logical: bool = False, delivery_mode: int = 0) -> int:
    """A 64-bit IOAPIC redirection-table entry (``kvm_ioapic_redirtbl.bits``)."""
    return (_uint("vector", vector, 0xFF) | _uint("delivery_mode", delivery_mode, 7) << 8 | (logical << 11)
            | (active_low << 13) | (level_trigger << 15) | (masked << 16)
            | _uint("dest_id", dest_id, 0xFF) << 56)


class Interrupts(VmState):
    """The interrupt-controller ioctls of :class:`~pykvm.vm.Vm` (mixed into it)."""

    def create_irq_chip(self) -> None:
        """``KVM_CREATE_IRQCHIP``: in-kernel PIC, IOAPIC and a LAPIC per vCPU (before vCPUs)."""
        self._ioctl(ioctls.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        """``KVM_CREATE_PIT2``: in-kernel i8254 PIT (needs the irqchip first)."""
        self._ioctl(ioctls.KVM_CREATE_PIT2, structs.kvm_pit_config(flags=_uint("flags", flags, _U32)))


    # -- interrupt controllers ------------------------------------------------------------
    def get_irqchip(self, chip_id: int) -> structs.kvm_irqchip:
        """``KVM_GET_IRQCHIP``: state of the in-kernel PIC master (0), PIC slave (1) or IOAPIC (2).

        Read ``.chip.pic`` (``kvm_pic_state``) or ``.chip.ioapic``
        (``kvm_ioapic_state``).  ENXIO without a full in-kernel irqchip (none,
        or split).
        """
        chip = structs.kvm_irqchip(chip_id=_uint("chip_id", chip_id, structs.KVM_NR_IRQCHIPS - 1))
        self._ioctl(ioctls.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: structs.kvm_irqchip) -> None:
        """``KVM_SET_IRQCHIP``: load a PIC/IOAPIC state (``chip.chip_id`` says which)."""
        _expect(chip, structs.kvm_irqchip)
        _uint("chip_id", chip.chip_id, structs.KVM_NR_IRQCHIPS - 1)
        self._ioctl(ioctls.KVM_SET_IRQCHIP, chip)

    def enable_split_irqchip(self, ioapic_pins: int = structs.KVM_IOAPIC_NUM_PINS) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)``: LAPICs in the kernel, PIC/IOAPIC/PIT in user space.

        Instead of :meth:`create_irq_chip`, before any vCPU.  *ioapic_pins*
        GSI routes are reserved for the user-space IOAPIC (which then signals
        the LAPICs through MSI routes / :meth:`signal_msi`); PIC and IOAPIC
        accesses exit to user space, and EOIs of level interrupts become
        ``IoapicEoi`` exits.
        """
        self.enable_cap(Cap.SPLIT_IRQCHIP, _uint("ioapic_pins", ioapic_pins, _U32))

    def _irq_level(self, irq: int, active: bool | int) -> structs.kvm_irq_level:
        lvl = structs.kvm_irq_level(level=1 if active else 0)
        lvl.irq = _uint("irq", irq, _U32)
        return lvl

    def set_irq_line(self, irq: int, active: bool | int) -> None:
        """``KVM_IRQ_LINE``: drive GSI *irq* high (*active*) or low.

        An edge-triggered interrupt fires on the low-to-high transition, so
        pulse it: ``set_irq_line(n, True); set_irq_line(n, False)``.
        """
        self._ioctl(ioctls.KVM_IRQ_LINE, self._irq_level(irq, active))

    def irq_line_status(self, irq: int, active: bool | int) -> int:
        """``KVM_IRQ_LINE_STATUS``: like :meth:`set_irq_line`, returning KVM's status.

        The status is > 0 when the interrupt was delivered (to that many
        targets), 0 when it coalesced with one still pending, < 0 when it was
        masked or ignored (``KVM_CAP_IRQ_INJECT_STATUS``).
        """
        lvl = self._irq_level(irq, active)
        self._ioctl(ioctls.KVM_IRQ_LINE_STATUS, lvl)
        return lvl.status

    def set_gsi_routing(self, entries: Iterable[structs.kvm_irq_routing_entry], flags: int = 0) -> None:
        """``KVM_SET_GSI_ROUTING``: replace the whole GSI routing table with *entries*.

        Build entries with :func:`pykvm.irq.irqchip_route` /
        :func:`pykvm.irq.msi_route`; start from :func:`pykvm.irq.default_routes`
        to keep the PIC/IOAPIC routes.  At most ``KVM_CAP_IRQ_ROUTING`` entries.
        """
        lst = list(entries)
        for e in lst:
            _expect(e, structs.kvm_irq_routing_entry)
        buf = structs.flex(structs.kvm_irq_routing, len(lst))
        buf.flags = _uint("flags", flags, _U32)
        for i, e in enumerate(lst):
            buf.entries[i] = e
        _flex_fits(buf, "nr", "entries")
        self._ioctl(ioctls.KVM_SET_GSI_ROUTING, buf)

    def signal_msi(self, address: int, data: int, *, flags: int = 0, devid: int = 0) -> int:
        """``KVM_SIGNAL_MSI``: inject the MSI (*address*, *data*) directly (no GSI route).

        Returns > 0 when delivered (to that many vCPUs), 0 when the guest
        blocked it (e.g. its LAPIC is software-disabled).  Needs an in-kernel
        LAPIC (full or split irqchip).  See :func:`pykvm.irq.msi_address` /
        :func:`pykvm.irq.msi_data` for the x86 format.
        """
        _uint("address", address)
        msi = structs.kvm_msi(address_lo=address & _U32, address_hi=address >> 32, data=_uint("data", data, _U32),
                        flags=_uint("flags", flags, _U32), devid=_uint("devid", devid, _U32))
        return self._ioctl(ioctls.KVM_SIGNAL_MSI, msi)

    def _irqfd(self, fd: FdLike, gsi: int, flags: int, resamplefd: FdLike | None = None) -> None:
        arg = structs.kvm_irqfd(fd=fd_of(fd, "fd"), gsi=_uint("gsi", gsi, _U32), flags=flags)
        if resamplefd is not None:
            arg.resamplefd = fd_of(resamplefd, "resamplefd")
        self._ioctl(ioctls.KVM_IRQFD, arg)

    def register_irqfd(self, fd: FdLike, gsi: int) -> None:
        """``KVM_IRQFD``: a write to eventfd *fd* raises GSI *gsi* (an edge: assert, deassert).

        *fd* is an :class:`~pykvm.eventfd.EventFd` or an fd number.  Needs an
        in-kernel irqchip; EEXIST if *fd* is already an irqfd.
        """
        self._irqfd(fd, gsi, 0)

    def register_irqfd_with_resample(self, fd: FdLike, resamplefd: FdLike, gsi: int) -> None:
        """``KVM_IRQFD`` with ``KVM_IRQFD_FLAG_RESAMPLE``: a level-triggered irqfd.

        A write to *fd* asserts GSI *gsi* and keeps it asserted; when the
        guest acknowledges (EOIs) the interrupt, KVM deasserts it and signals
        *resamplefd*, so the device model can check whether to assert again
        (``KVM_CAP_IRQFD_RESAMPLE``; full in-kernel irqchip only).
        """
        self._irqfd(fd, gsi, structs.KVM_IRQFD_FLAG_RESAMPLE, resamplefd)

    def unregister_irqfd(self, fd: FdLike, gsi: int) -> None:
        """``KVM_IRQFD`` with ``KVM_IRQFD_FLAG_DEASSIGN``: stop *fd* from raising *gsi*."""
        self._irqfd(fd, gsi, structs.KVM_IRQFD_FLAG_DEASSIGN)

    # -- PIT ---------------------------------------------------------------------------------
    def create_pit(self) -> None:
        """``KVM_CREATE_PIT`` (legacy): like ``create_pit2(KVM_PIT_SPEAKER_DUMMY)``."""
        self._ioctl(ioctls.KVM_CREATE_PIT)

    def get_pit(self) -> structs.kvm_pit_state:
        """``KVM_GET_PIT`` (legacy): the three PIT channels, without flags (ENXIO without a PIT)."""
        st = structs.kvm_pit_state()
        self._ioctl(ioctls.KVM_GET_PIT, st)
        return st

    def set_pit(self, state: structs.kvm_pit_state) -> None:
        """``KVM_SET_PIT`` (legacy): load the three PIT channels."""
        _expect(state, structs.kvm_pit_state)
        self._ioctl(ioctls.KVM_SET_PIT, state)

    def get_pit2(self) -> structs.kvm_pit_state2:
        """``KVM_GET_PIT2``: PIT channel states and ``flags`` (``KVM_PIT_FLAGS_*``)."""
        st = structs.kvm_pit_state2()
        self._ioctl(ioctls.KVM_GET_PIT2, st)
        return st

    def set_pit2(self, state: structs.kvm_pit_state2) -> None:
        """``KVM_SET_PIT2``: load channel states and flags (e.g. ``KVM_PIT_FLAGS_SPEAKER_DATA_ON``)."""
        _expect(state, structs.kvm_pit_state2)
        self._ioctl(ioctls.KVM_SET_PIT2, state)

    def reinject_control(self, pit_reinject: bool) -> None:
        """``KVM_REINJECT_CONTROL``: whether the PIT re-injects ticks the guest missed.

        With reinjection (the default) every tick lost while the guest had
        interrupts blocked is delivered later; without, they coalesce.  ENXIO
        without an in-kernel PIT.
        """
        self._ioctl(ioctls.KVM_REINJECT_CONTROL, structs.kvm_reinject_control(pit_reinject=1 if pit_reinject else 0))

    def set_boot_cpu_id(self, vcpu_id: int) -> None:
        """``KVM_SET_BOOT_CPU_ID``: which vCPU id is the BSP (default 0).

        Before any vCPU exists (EBUSY after).  The BSP's ``IA32_APIC_BASE``
        has the BSP bit (8); with an in-kernel irqchip the others start
        waiting for INIT/SIPI.
        """
        self._ioctl(ioctls.KVM_SET_BOOT_CPU_ID, _uint("vcpu_id", vcpu_id, _U32))

