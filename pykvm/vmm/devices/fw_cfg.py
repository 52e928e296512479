"""QEMU's fw_cfg, traditional I/O interface: selector 0x510 (16-bit), data 0x511."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ..layout import FW_CFG_PORT

if TYPE_CHECKING:
    from ...x86.bus import Bus

__all__ = ["FW_CFG_FILE_DIR", "FW_CFG_FILE_FIRST", "FW_CFG_ID", "FW_CFG_SIGNATURE", "FwCfg"]

FW_CFG_SIGNATURE, FW_CFG_ID, FW_CFG_UUID, FW_CFG_RAM_SIZE = 0x00, 0x01, 0x02, 0x03
FW_CFG_NOGRAPHIC, FW_CFG_NB_CPUS, FW_CFG_MAX_CPUS, FW_CFG_FILE_DIR = 0x04, 0x05, 0x0F, 0x19
FW_CFG_CMDLINE_SIZE, FW_CFG_CMDLINE_DATA = 0x14, 0x15
FW_CFG_FILE_FIRST = 0x20
FW_CFG_IRQ0_OVERRIDE, FW_CFG_E820_TABLE = 0x8002, 0x8003
FW_CFG_ARCH_LOCAL = 0x8000      # the selector's "architecture specific" bit
FW_CFG_WRITE = 0x4000           # the selector's write bit (writes are ignored)
FILE_NAME_MAX = 55              # a directory entry's name field is 56 bytes, NUL-terminated


class FwCfg:
    """QEMU's fw_cfg items, read one byte (or word) at a time through port 0x511.

    Items: signature ``QEMU``, ID (1: no DMA), UUID (zero), RAM size (u64),
    nographic (1), CPU count and max CPUs (u16), the kernel command line
    (*cmdline*, bytes), the IRQ0 override flag, and a file directory (key
    0x19) with ``etc/e820`` (20-byte entries: u64 address, u64 length, u32
    type) plus any extra *files*.  Reads past an item's end return 0; the read
    offset stops growing there, and an unknown selector reads as an empty
    item, so a guest's selections never allocate.
    """

    def __init__(self, *, cpus: int, ram_size: int, cmdline: bytes,
                 e820: list[tuple[int, int, int]],
                 files: dict[str, bytes] | None = None) -> None:
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", 1),
            FW_CFG_UUID: bytes(16),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
            FW_CFG_NB_CPUS: struct.pack("<H", cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", cpus),
            FW_CFG_CMDLINE_SIZE: struct.pack("<I", len(cmdline) + 1),
            FW_CFG_CMDLINE_DATA: bytes(cmdline) + b"\0",
            FW_CFG_IRQ0_OVERRIDE: struct.pack("<I", 1),
        }
        all_files = {"etc/e820": b"".join(struct.pack("<QQI", a, n, t) for a, n, t in e820)}
        all_files.update(files or {})
        d = [struct.pack(">I", len(all_files))]
        for i, (name, data) in enumerate(sorted(all_files.items())):
            key = FW_CFG_FILE_FIRST + i
            self.items[key] = data
            d.append(struct.pack(">IHH56s", len(data), key, 0, name.encode()[:FILE_NAME_MAX]))
        self.items[FW_CFG_FILE_DIR] = b"".join(d)
        self.key = 0
        self.offset = 0
        self._item = self.items[FW_CFG_SIGNATURE]

    def attach(self, bus: Bus) -> None:
        bus.on_io(FW_CFG_PORT, out=self.select, in_=lambda port, size: 0)
        bus.on_io(FW_CFG_PORT + 1, out=_ignore, in_=self.data)

    def select(self, port: int, data: bytes) -> None:
        self.key = int.from_bytes(data[:2], "little")
        self.offset = 0
        self._item = self.items.get(self.key & ~FW_CFG_WRITE, b"")

    def data(self, port: int, size: int) -> int:
        item = self._item
        chunk = item[self.offset:self.offset + size]
        self.offset = min(self.offset + size, len(item))
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")


def _ignore(port: int, data: bytes) -> None:
    pass
