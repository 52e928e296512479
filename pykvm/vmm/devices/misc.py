"""Ports a PC kernel touches at boot, answered harmlessly."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..layout import DEBUG_CONSOLE_PORT

if TYPE_CHECKING:
    from ...x86.bus import Bus

__all__ = ["Misc"]

VGA_PORT, VGA_PORTS = 0x3C0, 0x20


class Misc:
    """POST 0x80 (ignored), A20/fast reset 0x92 (A20 always on, bit 0 resets),
    keyboard controller 0x60/0x64 (no data, command 0xFE resets), VGA
    registers 0x3c0-0x3df (32 bytes, stored, read back), Bochs/QEMU debug
    console 0xe9 (each byte to *output*; reads 0xe9)."""

    def __init__(self, output: Callable[[bytes], None], reset: Callable[[str], None]) -> None:
        self._output, self._reset = output, reset
        self.vga = bytearray(VGA_PORTS)

    def attach(self, bus: Bus) -> None:
        ignore = _ignore
        bus.on_io(0x80, out=ignore, in_=lambda p, s: 0)
        bus.on_io(0x92, out=self.port92, in_=lambda p, s: 0x02)
        bus.on_io(0x60, out=ignore, in_=lambda p, s: 0)
        bus.on_io(0x64, out=self.kbd_cmd, in_=lambda p, s: 0x14)   # system flag, buffers empty
        bus.on_io(range(VGA_PORT, VGA_PORT + VGA_PORTS), out=self.vga_write, in_=self.vga_read)
        bus.on_io(DEBUG_CONSOLE_PORT, out=self.debugcon, in_=lambda p, s: DEBUG_CONSOLE_PORT)

    def port92(self, port: int, data: bytes) -> None:
        if data[0] & 1:
            self._reset("reset through port 0x92")

    def kbd_cmd(self, port: int, data: bytes) -> None:
        if data[0] == 0xFE:
            self._reset("reset through the keyboard controller (0x64 <- 0xfe)")

    def vga_write(self, port: int, data: bytes) -> None:
        for i, v in enumerate(data[:4]):          # outw 0x3d4 = index + data
            self.vga[(port + i - VGA_PORT) % VGA_PORTS] = v

    def vga_read(self, port: int, size: int) -> int:
        return int.from_bytes(bytes(self.vga[(port + i - VGA_PORT) % VGA_PORTS]
                                    for i in range(size)), "little")

    def debugcon(self, port: int, data: bytes) -> None:
        self._output(bytes(data))


def _ignore(port: int, data: bytes) -> None:
    pass
