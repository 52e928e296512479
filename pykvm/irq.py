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

from typing import List, Optional

from .uapi import structs as S

__all__ = [
    "irqchip_route", "msi_route", "default_routes", "msi_address", "msi_data",
    "ioapic_redirection", "PIC_MASTER", "PIC_SLAVE", "IOAPIC",
]

PIC_MASTER = S.KVM_IRQCHIP_PIC_MASTER
PIC_SLAVE = S.KVM_IRQCHIP_PIC_SLAVE
IOAPIC = S.KVM_IRQCHIP_IOAPIC

_U32 = 0xFFFFFFFF


def _u(name: str, value: object, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= limit:
        raise ValueError(f"{name}={value:#x} out of range [0, {limit:#x}]")
    return value


def irqchip_route(gsi: int, irqchip: int, pin: int) -> S.kvm_irq_routing_entry:
    """A routing entry: GSI *gsi* drives *pin* of *irqchip* (``PIC_MASTER``, ``PIC_SLAVE``, ``IOAPIC``)."""
    if irqchip not in (PIC_MASTER, PIC_SLAVE, IOAPIC):
        raise ValueError(f"irqchip={irqchip!r}: expected PIC_MASTER (0), PIC_SLAVE (1) or IOAPIC (2)")
    limit = 7 if irqchip != IOAPIC else S.KVM_IOAPIC_NUM_PINS - 1
    e = S.kvm_irq_routing_entry(gsi=_u("gsi", gsi, _U32), type=S.KVM_IRQ_ROUTING_IRQCHIP)
    e.u.irqchip.irqchip = irqchip
    e.u.irqchip.pin = _u("pin", pin, limit)
    return e


def msi_route(gsi: int, address: int, data: int, *, devid: Optional[int] = None) -> S.kvm_irq_routing_entry:
    """A routing entry: GSI *gsi* sends the MSI (*address*, *data*).

    *devid* (sets ``KVM_MSI_VALID_DEVID``) is only meaningful on hosts with
    ``KVM_CAP_MSI_DEVID`` (not x86).
    """
    e = S.kvm_irq_routing_entry(gsi=_u("gsi", gsi, _U32), type=S.KVM_IRQ_ROUTING_MSI)
    addr = _u("address", address, 0xFFFFFFFFFFFFFFFF)
    e.u.msi.address_lo = addr & _U32
    e.u.msi.address_hi = addr >> 32
    e.u.msi.data = _u("data", data, _U32)
    if devid is not None:
        e.flags = S.KVM_MSI_VALID_DEVID
        e.u.msi.devid = _u("devid", devid, _U32)
    return e


def default_routes(ioapic_pins: int = S.KVM_IOAPIC_NUM_PINS) -> List[S.kvm_irq_routing_entry]:
    """The table ``KVM_CREATE_IRQCHIP`` installs: GSI 0-15 to IOAPIC and PIC, 16-23 to IOAPIC."""
    out = []
    for gsi in range(_u("ioapic_pins", ioapic_pins, S.KVM_IOAPIC_NUM_PINS)):
        out.append(irqchip_route(gsi, IOAPIC, gsi))
        if gsi < 16:
            out.append(irqchip_route(gsi, PIC_MASTER if gsi < 8 else PIC_SLAVE, gsi % 8))
    return out


def msi_address(dest_id: int = 0, *, logical: bool = False, redirection_hint: bool = False) -> int:
    """The MSI address that targets APIC id *dest_id* (0..255)."""
    return 0xFEE00000 | _u("dest_id", dest_id, 0xFF) << 12 | (redirection_hint << 3) | (logical << 2)


def msi_data(vector: int, *, delivery_mode: int = 0, level_trigger: bool = False, assert_: bool = True) -> int:
    """The MSI data word for *vector* (delivery mode 0 = fixed, 4 = NMI ...)."""
    return (_u("vector", vector, 0xFF) | _u("delivery_mode", delivery_mode, 7) << 8
            | (assert_ << 14) | (level_trigger << 15))


def ioapic_redirection(vector: int, dest_id: int = 0, *, masked: bool = False, level_trigger: bool = False,
                       active_low: bool = False, logical: bool = False, delivery_mode: int = 0) -> int:
    """A 64-bit IOAPIC redirection-table entry (``kvm_ioapic_redirtbl.bits``)."""
    return (_u("vector", vector, 0xFF) | _u("delivery_mode", delivery_mode, 7) << 8 | (logical << 11)
            | (active_low << 13) | (level_trigger << 15) | (masked << 16)
            | _u("dest_id", dest_id, 0xFF) << 56)
