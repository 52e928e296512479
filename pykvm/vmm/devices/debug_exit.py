"""QEMU's isa-debug-exit at 0xf4: a write of *v* ends the run with status (v << 1) | 1."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..layout import DEBUG_EXIT_PORT
from ..status import debug_exit_status

if TYPE_CHECKING:
    from ...x86.bus import Bus

__all__ = ["DebugExit"]


class DebugExit:
    """A write of any size ends the run through ``finish(status, reason)``; reads give all ones."""

    def __init__(self, finish: Callable[[int, str], None], port: int = DEBUG_EXIT_PORT) -> None:
        self.port, self._finish = port, finish

    def attach(self, bus: Bus) -> None:
        bus.on_io(self.port, out=self.write, in_=lambda port, size: (1 << (8 * size)) - 1)

    def write(self, port: int, data: bytes) -> None:
        value = int.from_bytes(data[:4], "little")
        self._finish(debug_exit_status(value), f"debug exit {value:#x}")
