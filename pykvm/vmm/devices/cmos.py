"""The MC146818 RTC/CMOS at 0x70/0x71: the host's UTC time and the PC memory-size bytes."""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING

from ..layout import CMOS_PORT

if TYPE_CHECKING:
    from ...x86.bus import Bus

__all__ = ["NVRAM_SIZE", "Cmos"]

NVRAM_SIZE = 128


def _bcd(v: int) -> int:
    return (v // 10) << 4 | (v % 10)


class Cmos:
    """128 bytes of CMOS: the clock, status registers, and the PC memory-size bytes.

    Time registers follow the format bits of status register B (BCD unless
    bit 2, 24-hour when bit 1; reset value 0x02).  Memory bytes are set the
    way SeaBIOS and QEMU read them: 0x15/0x16 base KiB, 0x17/0x18 and
    0x30/0x31 KiB above 1 MiB (capped at 0xffff), 0x34/0x35 64 KiB units
    above 16 MiB, 0x5b-0x5d 64 KiB units above 4 GiB, 0x5f CPU count - 1.
    Other bytes are plain NVRAM.  Port 0x70 bit 7 (NMI mask) is ignored; the
    index wraps at 128, so a guest reaches nothing outside the array.
    """

    def __init__(self, *, low_ram: int, high_ram: int, cpus: int) -> None:
        self.nvram = bytearray(NVRAM_SIZE)
        self.index = 0
        n = self.nvram
        n[0x0A], n[0x0B], n[0x0D] = 0x26, 0x02, 0x80
        struct.pack_into("<H", n, 0x15, 640)
        ext = min(max(low_ram - 0x100000, 0) // 1024, 0xFFFF)
        struct.pack_into("<H", n, 0x17, ext)
        struct.pack_into("<H", n, 0x30, ext)
        struct.pack_into("<H", n, 0x34, min(max(low_ram - 0x1000000, 0) >> 16, 0xFFFF))
        hi = min(high_ram >> 16, 0xFFFFFF)
        n[0x5B], n[0x5C], n[0x5D] = hi & 0xFF, (hi >> 8) & 0xFF, (hi >> 16) & 0xFF
        n[0x5F] = (cpus - 1) & 0xFF

    def attach(self, bus: Bus) -> None:
        bus.on_io(CMOS_PORT, out=self.select, in_=lambda port, size: self.index)
        bus.on_io(CMOS_PORT + 1, out=self.write, in_=self.read)

    def select(self, port: int, data: bytes) -> None:
        self.index = data[0] & (NVRAM_SIZE - 1)

    def write(self, port: int, data: bytes) -> None:
        if self.index not in (0x0C, 0x0D):
            self.nvram[self.index] = data[0]

    def read(self, port: int, size: int) -> int:
        i = self.index
        if i <= 9 and i not in (1, 3, 5):
            t = time.gmtime()
            v = {0: t.tm_sec, 2: t.tm_min, 4: t.tm_hour, 6: (t.tm_wday + 1) % 7 + 1,  # 1 = Sunday
                 7: t.tm_mday, 8: t.tm_mon, 9: t.tm_year % 100}[i]
            b = self.nvram[0x0B]
            if i == 4 and not b & 2:             # 12-hour clock, bit 7 = PM
                pm = v >= 12
                v = v % 12 or 12
                return (v if b & 4 else _bcd(v)) | (0x80 if pm else 0)
            return v if b & 4 else _bcd(v)
        if i == 0x32:
            y = time.gmtime().tm_year // 100
            return y if self.nvram[0x0B] & 4 else _bcd(y)
        if i == 0x0C:
            return 0
        return self.nvram[i]
