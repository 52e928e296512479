"""Old import path of :mod:`pykvm.vm.irq` (GSI routes, MSI and IOAPIC helpers); kept for one release."""

from .vm.irq import (
                     IOAPIC,
                     PIC_MASTER,
                     PIC_SLAVE,
                     default_routes,
                     ioapic_redirection,
                     irqchip_route,
                     msi_address,
                     msi_data,
                     msi_route,
)

__all__ = [
                     "IOAPIC",
                     "PIC_MASTER",
                     "PIC_SLAVE",
                     "default_routes",
                     "ioapic_redirection",
                     "irqchip_route",
                     "msi_address",
                     "msi_data",
                     "msi_route",
]
