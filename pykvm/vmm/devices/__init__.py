"""The PC-specific port devices of the small PC, one per module.

Each device has ``attach(bus)`` registering its handlers on a
:class:`pykvm.x86.Bus` (``out(port, data)``, ``in(port, size) -> int``); the
machine's vCPU threads share the bus and its lock, so handlers run one at a
time.  COM1 is :class:`pykvm.x86.Uart16550`; the PIC, PIT (with port 0x61),
IOAPIC and LAPICs live in the kernel and never reach these modules.  Nothing a
guest does makes a device allocate: every register file has a fixed size.

* :mod:`.fw_cfg` -- QEMU's firmware configuration interface (0x510/0x511)
* :mod:`.cmos` -- the MC146818 RTC/CMOS (0x70/0x71)
* :mod:`.pci` -- PCI configuration mechanism #1 with no device, reset control 0xcf9
* :mod:`.debug_exit` -- QEMU's isa-debug-exit (0xf4)
* :mod:`.misc` -- POST, A20/reset, keyboard controller, VGA registers, debug console
* :mod:`.output` -- a guest's byte stream to a file descriptor
"""

from .cmos import Cmos
from .debug_exit import DebugExit
from .fw_cfg import FwCfg
from .misc import Misc
from .output import FdOutput
from .pci import Pci

__all__ = ["Cmos", "DebugExit", "FdOutput", "FwCfg", "Misc", "Pci"]
