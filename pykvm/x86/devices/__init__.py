"""Device models for :class:`~pykvm.x86.bus.RunLoop`, one per module.

* :mod:`~pykvm.x86.devices.uart16550` -- :class:`Uart16550`, a 16550A UART
  (16-byte receive FIFO, loopback, interrupts through a callback).
"""

from .uart16550 import COM1, COM2, FIFO_SIZE, Uart16550

__all__ = ["COM1", "COM2", "FIFO_SIZE", "Uart16550"]
