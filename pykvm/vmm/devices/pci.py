"""PCI configuration mechanism #1 with no device behind it, and the reset control register."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..layout import PCI_CONFIG_PORT

if TYPE_CHECKING:
    from ...x86.bus import Bus

__all__ = ["Pci"]


class Pci:
    """0xcf8 (dword) holds the address; 0xcfc-0xcff read all ones ("no device")
    and ignore writes.  A byte write to 0xcf9 with bit 2 set is the reset
    control register: it calls *reset*.  One 32-bit register of state."""

    def __init__(self, reset: Callable[[str], None]) -> None:
        self.address = 0
        self._reset = reset

    def attach(self, bus: Bus) -> None:
        bus.on_io(range(PCI_CONFIG_PORT, PCI_CONFIG_PORT + 4), out=self.write_addr, in_=self.read_addr)
        bus.on_io(range(PCI_CONFIG_PORT + 4, PCI_CONFIG_PORT + 8), out=lambda port, data: None,
                  in_=lambda port, size: (1 << (8 * size)) - 1)

    def write_addr(self, port: int, data: bytes) -> None:
        if port == PCI_CONFIG_PORT and len(data) == 4:
            self.address = int.from_bytes(data, "little") & 0x80FFFFFC
        elif port == PCI_CONFIG_PORT + 1 and len(data) == 1 and data[0] & 4:
            self._reset("reset through port 0xcf9")

    def read_addr(self, port: int, size: int) -> int:
        if port == PCI_CONFIG_PORT and size == 4:
            return self.address
        return 0 if port == PCI_CONFIG_PORT + 1 else 0xFF
