"""Old import path of :mod:`pykvm.vm.irq` (GSI routes, MSI and IOAPIC helpers); kept for one release."""

from .vm.irq import (IOAPIC, PIC_MASTER, PIC_SLAVE, default_routes, ioapic_redirection, irqchip_route,
                     msi_address, msi_data, msi_route)

__all__ = ["irqchip_route", "msi_route", "default_routes", "msi_address", "msi_data",
           "ioapic_redirection", "PIC_MASTER", "PIC_SLAVE", "IOAPIC"]
