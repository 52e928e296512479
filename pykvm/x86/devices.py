"""Small devices for :class:`~pykvm.x86.runloop.RunLoop`: a 16550 UART.

The UART implements what a polling driver uses (Linux's ``earlyprintk``,
every hobby kernel's ``putc``/``getc``), at ports ``base..base+7``:

====== =================== =========================================
offset read                write
====== =================== =========================================
0      RBR: received byte  THR: byte to send (DLL when LCR.DLAB=1)
1      IER                 IER (DLM when LCR.DLAB=1)
2      IIR: 0xc1/0x01      FCR
3      LCR                 LCR (bit 7 = DLAB)
4      MCR                 MCR
5      LSR: DR, THRE, TEMT —
6      MSR: CTS, DSR, DCD  —
7      SCR                 SCR
====== =================== =========================================

``LSR.THRE``/``TEMT`` are always set (sending never waits), ``LSR.DR`` is set
while bytes given to :meth:`Uart16550.feed` are waiting.  No interrupts are
raised: a guest polls ``LSR``.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Optional

__all__ = ["Uart16550", "COM1", "COM2"]

COM1 = 0x3F8
COM2 = 0x2F8

LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40


class Uart16550:
    """An 8250/16550-style UART at I/O port *base* (default COM1, 0x3f8).

    *on_output* receives each byte the guest sends (as a 1-byte ``bytes``);
    every byte is also kept in :attr:`output`.  :meth:`feed` queues input for
    the guest (thread-safe).  Attach with ``loop.add(uart)``.
    """

    def __init__(self, base: int = COM1, on_output: Optional[Callable[[bytes], None]] = None) -> None:
        self.base = base
        self.on_output = on_output
        self.output = bytearray()
        self._input: "collections.deque[int]" = collections.deque()
        self._lock = threading.Lock()
        self.regs = {"ier": 0, "lcr": 0x03, "mcr": 0, "scr": 0, "dll": 0x01, "dlm": 0, "fcr": 0}

    def attach(self, loop) -> None:
        """Register the eight ports with a run loop (``loop.add(uart)`` calls this)."""
        ports = range(self.base, self.base + 8)
        loop.on_io(ports, out=self.port_write, in_=self.port_read)

    def feed(self, data: bytes) -> None:
        """Queue bytes for the guest to read from RBR."""
        with self._lock:
            self._input.extend(bytes(data))

    @property
    def text(self) -> str:
        """Everything the guest sent, decoded as UTF-8 (bad bytes replaced)."""
        return self.output.decode(errors="replace")

    def port_write(self, port: int, data: bytes) -> None:
        """The ``out`` handler."""
        off = port - self.base
        dlab = self.regs["lcr"] & 0x80
        for v in data:  # data has several bytes only for rep outsb
            if off == 0:
                if dlab:
                    self.regs["dll"] = v
                else:
                    b = bytes((v,))
                    self.output += b
                    if self.on_output is not None:
                        self.on_output(b)
            elif off == 1:
                self.regs["dlm" if dlab else "ier"] = v
            elif off == 2:
                self.regs["fcr"] = v
            elif off == 3:
                self.regs["lcr"] = v
            elif off == 4:
                self.regs["mcr"] = v
            elif off == 7:
                self.regs["scr"] = v

    def port_read(self, port: int, size: int) -> int:
        """The ``in`` handler."""
        off = port - self.base
        dlab = self.regs["lcr"] & 0x80
        if off == 0:
            if dlab:
                return self.regs["dll"]
            with self._lock:
                return self._input.popleft() if self._input else 0
        if off == 1:
            return self.regs["dlm" if dlab else "ier"]
        if off == 2:
            return 0xC1 if self.regs["fcr"] & 1 else 0x01  # no interrupt pending
        if off == 3:
            return self.regs["lcr"]
        if off == 4:
            return self.regs["mcr"]
        if off == 5:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._input else 0)
        if off == 6:
            return 0xB0  # DCD, DSR, CTS
        return self.regs["scr"]
