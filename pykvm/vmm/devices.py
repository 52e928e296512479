"""The port devices of the small PC, emulated in Python.

Each device registers handlers in two dicts, ``port -> out(port, size, value)``
and ``port -> in(port, size) -> int``, which the vCPU loop looks up on every
``KVM_EXIT_IO``.  Handlers run under the machine's device lock, one at a time.
The PIC, PIT (with port 0x61), IOAPIC and LAPICs live in the kernel and never
reach this module.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import deque
from typing import Callable, Dict, List, Optional, Tuple

__all__ = ["Uart16550", "FwCfg", "Cmos", "Pci", "DebugExit", "Misc", "Ports"]

OutFn = Callable[[int, int, int], None]
InFn = Callable[[int, int], int]


class Ports:
    """The two dispatch tables the vCPU loop reads."""

    def __init__(self) -> None:
        self.out: Dict[int, OutFn] = {}
        self.inp: Dict[int, InFn] = {}

    def add(self, first: int, count: int, out: Optional[OutFn], inp: Optional[InFn]) -> None:
        for p in range(first, first + count):
            if out is not None:
                self.out[p] = out
            if inp is not None:
                self.inp[p] = inp


def _ignore(port: int, size: int, value: int) -> None:
    pass


def _emit(dev, byte: int) -> None:
    """Write one byte to ``dev.out_fd``; once that fails (EPIPE...), drop output quietly,
    like a serial line nobody listens to, so the guest still reaches its exit."""
    if dev.out_fd is None:
        return
    try:
        os.write(dev.out_fd, bytes((byte,)))
    except OSError:
        dev.out_fd = None


# ---------------------------------------------------------------------------------------------
class Uart16550:
    """A 16550A at *base* (COM1 0x3f8, IRQ 4): THR to *out_fd*, RBR from *in_fd*.

    Transmission is instant: LSR always says THR empty and transmitter idle
    (0x60), plus "data ready" while received bytes wait.  Loopback mode (MCR
    bit 4) routes THR back to RBR and MCR's outputs to MSR's inputs, so the
    usual probe (write 0xAE in loopback, read it back) succeeds.  Interrupts
    (IER bits 0 and 1) drive the IRQ line through ``set_irq(level)``.
    Reading stdin starts on the guest's first look at the receive side.
    """

    def __init__(self, out_fd: int, in_fd: Optional[int], set_irq: Callable[[int], None],
                 lock: threading.Lock, base: int = 0x3F8) -> None:
        self.base, self.out_fd, self.in_fd, self._set_irq = base, out_fd, in_fd, set_irq
        self.lock = lock
        self.rx: deque = deque()
        self.ier = self.lcr = self.mcr = self.scr = 0
        self.dll, self.dlm = 12, 0           # 9600 baud
        self.fcr = 0
        self.thr_ipending = False
        self.irq_level = 0
        self._reader: Optional[threading.Thread] = None
        self.eof = False

    def register(self, ports: Ports) -> None:
        ports.add(self.base, 8, self.write, self.read)

    # -- stdin --------------------------------------------------------------------------
    def _start_reader(self) -> None:
        if self._reader is not None or self.in_fd is None:
            return
        self._reader = threading.Thread(target=self._read_stdin, name="uart-stdin", daemon=True)
        self._reader.start()

    def _read_stdin(self) -> None:
        while True:
            try:
                data = os.read(self.in_fd, 4096)
            except OSError:
                data = b""
            with self.lock:
                if not data:
                    self.eof = True
                    return
                self.rx.extend(data)
                self._update_irq()

    # -- registers ------------------------------------------------------------------------
    def _iir(self) -> int:
        fifo = 0xC0 if self.fcr & 1 else 0
        if self.ier & 1 and self.rx:
            return fifo | 0x04
        if self.ier & 2 and self.thr_ipending:
            return fifo | 0x02
        return fifo | 0x01

    def _update_irq(self) -> None:
        level = 0 if self._iir() & 1 else 1
        if level != self.irq_level:
            self.irq_level = level
            self._set_irq(level)

    def write(self, port: int, size: int, value: int) -> None:
        off = port - self.base
        v = value & 0xFF
        dlab = self.lcr & 0x80
        if off == 0:
            if dlab:
                self.dll = v
                return
            if self.mcr & 0x10:              # loopback
                self.rx.append(v)
            else:
                _emit(self, v)
            self.thr_ipending = True          # sent at once: THR empty again
        elif off == 1:
            if dlab:
                self.dlm = v
                return
            if v & 2 and not self.ier & 2:
                self.thr_ipending = True      # enabling THRI with THR empty raises it
            self.ier = v & 0x0F
            if v & 1:
                self._start_reader()
        elif off == 2:
            self.fcr = v
            if v & 2:
                self.rx.clear()
        elif off == 3:
            self.lcr = v
        elif off == 4:
            self.mcr = v & 0x1F
        elif off == 7:
            self.scr = v
        self._update_irq()

    def read(self, port: int, size: int) -> int:
        off = port - self.base
        dlab = self.lcr & 0x80
        if off == 0:
            if dlab:
                return self.dll
            self._start_reader()
            v = self.rx.popleft() if self.rx else 0
            self._update_irq()
            return v
        if off == 1:
            return self.dlm if dlab else self.ier
        if off == 2:
            iir = self._iir()
            if iir & 0x0F == 0x02:
                self.thr_ipending = False     # reading IIR clears a THR-empty interrupt
                self._update_irq()
            return iir
        if off == 3:
            return self.lcr
        if off == 4:
            return self.mcr
        if off == 5:
            self._start_reader()
            return 0x60 | (1 if self.rx else 0)
        if off == 6:
            if self.mcr & 0x10:              # loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD
                m = self.mcr
                return ((m & 2) << 3) | ((m & 1) << 5) | ((m & 4) << 4) | ((m & 8) << 4)
            return 0xB0                      # DCD | DSR | CTS
        return self.scr


# ---------------------------------------------------------------------------------------------
FW_CFG_SIGNATURE, FW_CFG_ID, FW_CFG_UUID, FW_CFG_RAM_SIZE = 0x00, 0x01, 0x02, 0x03
FW_CFG_NOGRAPHIC, FW_CFG_NB_CPUS, FW_CFG_MAX_CPUS, FW_CFG_FILE_DIR = 0x04, 0x05, 0x0F, 0x19
FW_CFG_CMDLINE_SIZE, FW_CFG_CMDLINE_DATA = 0x14, 0x15
FW_CFG_FILE_FIRST = 0x20
FW_CFG_IRQ0_OVERRIDE, FW_CFG_E820_TABLE = 0x8002, 0x8003


class FwCfg:
    """QEMU's fw_cfg, traditional I/O interface: selector 0x510 (16-bit), data 0x511.

    Items: signature ``QEMU``, ID (1: no DMA), UUID (zero), RAM size (u64),
    nographic (1), CPU count and max CPUs (u16), the kernel command line,
    the IRQ0 override flag, and a file directory (key 0x19) with
    ``etc/e820`` (20-byte entries: u64 address, u64 length, u32 type) plus
    any extra files given.  Reads past an item's end return 0.
    """

    def __init__(self, *, cpus: int, ram_size: int, cmdline: str,
                 e820: List[Tuple[int, int, int]],
                 files: Optional[Dict[str, bytes]] = None) -> None:
        self.items: Dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", 1),
            FW_CFG_UUID: bytes(16),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
            FW_CFG_NB_CPUS: struct.pack("<H", cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", cpus),
            FW_CFG_CMDLINE_SIZE: struct.pack("<I", len(cmdline) + 1),
            FW_CFG_CMDLINE_DATA: cmdline.encode() + b"\0",
            FW_CFG_IRQ0_OVERRIDE: struct.pack("<I", 1),
        }
        all_files = {"etc/e820": b"".join(struct.pack("<QQI", a, n, t) for a, n, t in e820)}
        all_files.update(files or {})
        d = [struct.pack(">I", len(all_files))]
        for i, (name, data) in enumerate(sorted(all_files.items())):
            key = FW_CFG_FILE_FIRST + i
            self.items[key] = data
            d.append(struct.pack(">IHH56s", len(data), key, 0, name.encode()[:55]))
        self.items[FW_CFG_FILE_DIR] = b"".join(d)
        self.key = 0
        self.offset = 0

    def register(self, ports: Ports) -> None:
        ports.add(0x510, 1, self.select, None)
        ports.add(0x511, 1, _ignore, self.data)

    def select(self, port: int, size: int, value: int) -> None:
        self.key = value & 0xFFFF
        self.offset = 0

    def data(self, port: int, size: int) -> int:
        item = self.items.get(self.key & 0xBFFF, b"")
        chunk = item[self.offset:self.offset + size]
        self.offset += size
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")


# ---------------------------------------------------------------------------------------------
def _bcd(v: int) -> int:
    return (v // 10) << 4 | (v % 10)


class Cmos:
    """MC146818 RTC/CMOS at 0x70/0x71: the host's UTC time and the PC memory-size bytes.

    Time registers follow the format bits of status register B (BCD unless
    bit 2, 24-hour when bit 1; reset value 0x02).  Memory bytes are set the
    way SeaBIOS and QEMU read them: 0x15/0x16 base KiB, 0x17/0x18 and
    0x30/0x31 KiB above 1 MiB (capped at 0xffff), 0x34/0x35 64 KiB units
    above 16 MiB, 0x5b-0x5d 64 KiB units above 4 GiB, 0x5f CPU count - 1.
    Other bytes are plain NVRAM.  Port 0x70 bit 7 (NMI mask) is ignored.
    """

    def __init__(self, *, low_ram: int, high_ram: int, cpus: int) -> None:
        self.nvram = bytearray(128)
        self.index = 0
        n = self.nvram
        n[0x0A], n[0x0B], n[0x0D] = 0x26, 0x02, 0x80
        struct.pack_into("<H", n, 0x15, 640)
        ext = min(max(low_ram - 0x100000, 0) // 1024, 0xFFFF)
        struct.pack_into("<H", n, 0x17, ext)
        struct.pack_into("<H", n, 0x30, ext)
        struct.pack_into("<H", n, 0x34, min(max(low_ram - 0x1000000, 0) >> 16, 0xFFFF))
        hi = high_ram >> 16
        n[0x5B], n[0x5C], n[0x5D] = hi & 0xFF, (hi >> 8) & 0xFF, (hi >> 16) & 0xFF
        n[0x5F] = (cpus - 1) & 0xFF

    def register(self, ports: Ports) -> None:
        ports.add(0x70, 1, self.select, lambda p, s: self.index)
        ports.add(0x71, 1, self.write, self.read)

    def select(self, port: int, size: int, value: int) -> None:
        self.index = value & 0x7F

    def write(self, port: int, size: int, value: int) -> None:
        if self.index not in (0x0C, 0x0D):
            self.nvram[self.index] = value & 0xFF

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


# ---------------------------------------------------------------------------------------------
class Pci:
    """PCI configuration mechanism #1 with no device behind it.

    0xcf8 (dword) holds the address; 0xcfc-0xcff read all ones ("no device")
    and ignore writes.  A byte write to 0xcf9 with bit 2 set is the reset
    control register: it calls *reset*.
    """

    def __init__(self, reset: Callable[[str], None]) -> None:
        self.address = 0
        self._reset = reset

    def register(self, ports: Ports) -> None:
        ports.add(0xCF8, 4, self.write_addr, self.read_addr)
        ports.add(0xCFC, 4, _ignore, lambda p, s: (1 << (8 * s)) - 1)

    def write_addr(self, port: int, size: int, value: int) -> None:
        if port == 0xCF8 and size == 4:
            self.address = value & 0x80FFFFFC
        elif port == 0xCF9 and size == 1 and value & 4:
            self._reset("reset through port 0xcf9")

    def read_addr(self, port: int, size: int) -> int:
        if port == 0xCF8 and size == 4:
            return self.address
        return 0 if port == 0xCF9 else 0xFF


class DebugExit:
    """QEMU's isa-debug-exit at 0xf4: a write of *v* ends the run with status (v << 1) | 1."""

    def __init__(self, finish: Callable[[int, str], None], port: int = 0xF4) -> None:
        self.port, self._finish = port, finish

    def register(self, ports: Ports) -> None:
        ports.add(self.port, 1, self.write, lambda p, s: (1 << (8 * s)) - 1)

    def write(self, port: int, size: int, value: int) -> None:
        self._finish(((value << 1) | 1) & 0xFF, f"debug exit {value:#x}")


class Misc:
    """Ports a PC kernel touches at boot, answered harmlessly.

    POST 0x80 (ignored), A20/fast reset 0x92 (A20 always on, bit 0 resets),
    keyboard controller 0x60/0x64 (no data, command 0xFE resets), VGA
    registers 0x3c0-0x3df (stored, read back), Bochs/QEMU debug console
    0xe9 (written to *out_fd*; reads 0xe9).
    """

    def __init__(self, out_fd: int, reset: Callable[[str], None]) -> None:
        self.out_fd, self._reset = out_fd, reset
        self.vga = bytearray(0x20)

    def register(self, ports: Ports) -> None:
        ports.add(0x80, 1, _ignore, lambda p, s: 0)
        ports.add(0x92, 1, self.port92, lambda p, s: 0x02)
        ports.add(0x60, 1, _ignore, lambda p, s: 0)
        ports.add(0x64, 1, self.kbd_cmd, lambda p, s: 0x14)   # system flag, buffers empty
        ports.add(0x3C0, 0x20, self.vga_write, self.vga_read)
        ports.add(0xE9, 1, self.debugcon, lambda p, s: 0xE9)

    def port92(self, port: int, size: int, value: int) -> None:
        if value & 1:
            self._reset("reset through port 0x92")

    def kbd_cmd(self, port: int, size: int, value: int) -> None:
        if value & 0xFF == 0xFE:
            self._reset("reset through the keyboard controller (0x64 <- 0xfe)")

    def vga_write(self, port: int, size: int, value: int) -> None:
        for i in range(size):                 # outw 0x3d4 = index + data
            self.vga[(port + i - 0x3C0) & 0x1F] = (value >> (8 * i)) & 0xFF

    def vga_read(self, port: int, size: int) -> int:
        return int.from_bytes(bytes(self.vga[(port + i - 0x3C0) & 0x1F] for i in range(size)), "little")

    def debugcon(self, port: int, size: int, value: int) -> None:
        _emit(self, value & 0xFF)
