"""A 16550A UART for :class:`~pykvm.x86.bus.RunLoop` (and the VMM's COM1).

What a polling or interrupt-driven driver uses (Linux's ``earlyprintk`` and
8250 driver, every hobby kernel's ``putc``/``getc``), at ports ``base..base+7``:

====== ======================== ==============================================
offset read                     write
====== ======================== ==============================================
0      RBR: received byte       THR: byte to send (DLL when LCR.DLAB=1)
1      IER                      IER (DLM when LCR.DLAB=1)
2      IIR (0xc0 FIFO bits)     FCR (bit 1 clears the receive FIFO)
3      LCR                      LCR (bit 7 = DLAB)
4      MCR                      MCR (bit 4 = loopback)
5      LSR: DR, OE, THRE, TEMT  —
6      MSR: CTS, DSR, DCD       —
7      SCR                      SCR
====== ======================== ==============================================

Sending is instant: ``LSR.THRE``/``TEMT`` are always set.  The receive FIFO
holds :data:`FIFO_SIZE` (16) bytes, as a real 16550A: a byte that arrives when
it is full -- from :meth:`Uart16550.feed` or looped back in loopback mode --
is dropped and sets ``LSR.OE`` (overrun), so nothing a guest or a host sends
can make it grow.  Host input that must not be lost waits for room:
:meth:`~Uart16550.feed` takes what fits and returns how many bytes it took,
:meth:`~Uart16550.wait_for_room` blocks until the guest reads; with
*input_fd* a reader thread does exactly that from a file descriptor.

Loopback (MCR bit 4) sends THR to the receive FIFO and MCR's outputs to MSR's
inputs, so the usual probe (write 0xAE in loopback, read it back) succeeds.
Interrupts: IER bit 0 (data received) and bit 1 (THR empty) drive a line
through the *irq* callback (``irq(level)``, called when the level changes).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..bus import RunLoop

__all__ = ["COM1", "COM2", "FIFO_SIZE", "Uart16550"]

COM1 = 0x3F8
COM2 = 0x2F8
FIFO_SIZE = 16            #: receive FIFO depth of a 16550A

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40
MCR_LOOP = 0x10
IER_RDI = 0x01
IER_THRI = 0x02
IIR_NONE, IIR_THRI, IIR_RDI, IIR_FIFO = 0x01, 0x02, 0x04, 0xC0


class Uart16550:
    """A 16550A UART at I/O port *base* (default COM1, 0x3f8).

    * *on_output* receives each byte the guest sends (as a 1-byte ``bytes``);
      the first *output_limit* bytes (default 1 MiB, 0 for none) are also
      kept in :attr:`output` (:attr:`output_dropped` counts the rest);
    * *irq* is called with the new level (0 or 1) of the interrupt line;
    * *input_fd*: a thread reads it into the receive FIFO as room appears
      (started when the guest first looks at the receive side).

    Thread-safe: port handlers, :meth:`feed` and the reader share one lock.
    Attach with ``loop.add(uart)``.
    """

    def __init__(self, base: int = COM1, on_output: Callable[[bytes], None] | None = None,
                 *, irq: Callable[[int], None] | None = None, input_fd: int | None = None,
                 output_limit: int = 1 << 20) -> None:
        if output_limit < 0:
            raise ValueError("output_limit must be >= 0")
        self.base = base
        self.on_output = on_output
        self.output = bytearray()
        self.output_limit = output_limit
        self.output_dropped = 0
        self.input_fd = input_fd
        self.eof = False                          #: input_fd reached end of file
        self.overruns = 0                         #: bytes dropped because the FIFO was full
        self._irq = irq
        self._rx: deque[int] = deque()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._reader: threading.Thread | None = None
        self.ier = self.mcr = self.scr = self.fcr = 0
        self.lcr = 0x03                           # 8N1
        self.dll, self.dlm = 1, 0                 # 115200 baud
        self._lsr_oe = False
        self._thr_pending = False
        self._irq_level = 0

    def attach(self, loop: RunLoop) -> None:
        """Register the eight ports with a run loop or bus (``loop.add(uart)`` calls this)."""
        loop.on_io(range(self.base, self.base + 8), out=self.port_write, in_=self.port_read)

    # -- the host side ---------------------------------------------------------------------
    def feed(self, data: bytes) -> int:
        """Put bytes in the receive FIFO; return how many fit (the rest are not taken)."""
        with self._lock:
            n = min(len(data), FIFO_SIZE - len(self._rx))
            self._rx.extend(bytes(data[:n]))
            self._update_irq()
            return n

    def wait_for_room(self, timeout: float | None = None) -> int:
        """Block until the receive FIFO has room (or *timeout*); return the free bytes."""
        with self._room:
            self._room.wait_for(lambda: len(self._rx) < FIFO_SIZE, timeout)
            return FIFO_SIZE - len(self._rx)

    @property
    def pending_input(self) -> int:
        """Bytes waiting in the receive FIFO."""
        return len(self._rx)

    @property
    def text(self) -> str:
        """The kept output, decoded as UTF-8 (bad bytes replaced)."""
        return self.output.decode(errors="replace")

    def _start_reader(self) -> None:
        if self._reader is not None or self.input_fd is None:
            return
        self._reader = threading.Thread(target=self._read_input, name="uart-input", daemon=True)
        self._reader.start()

    def _read_input(self) -> None:
        fd = self.input_fd
        assert fd is not None
        while True:
            room = self.wait_for_room()
            try:
                data = os.read(fd, room)
            except OSError:
                data = b""
            if not data:
                self.eof = True
                return
            while data:                           # the FIFO only shrinks meanwhile
                data = data[self.feed(data):]
                if data:
                    self.wait_for_room()

    # -- registers -----------------------------------------------------------------------------
    def _iir(self) -> int:
        fifo = IIR_FIFO if self.fcr & 1 else 0
        if self.ier & IER_RDI and self._rx:
            return fifo | IIR_RDI
        if self.ier & IER_THRI and self._thr_pending:
            return fifo | IIR_THRI
        return fifo | IIR_NONE

    def _update_irq(self) -> None:
        level = 0 if self._iir() & IIR_NONE else 1
        if level != self._irq_level:
            self._irq_level = level
            if self._irq is not None:
                self._irq(level)

    def _receive(self, v: int) -> None:
        if len(self._rx) < FIFO_SIZE:
            self._rx.append(v)
        else:
            self._lsr_oe = True
            self.overruns += 1

    def _send(self, v: int) -> None:
        b = bytes((v,))
        if len(self.output) < self.output_limit:
            self.output += b
        else:
            self.output_dropped += 1
        if self.on_output is not None:
            self.on_output(b)

    def port_write(self, port: int, data: bytes) -> None:
        """The ``out`` handler (*data* has several bytes only for ``rep outsb``)."""
        off = port - self.base
        with self._lock:
            for v in data:
                self._write_reg(off, v)
            self._update_irq()

    def _write_reg(self, off: int, v: int) -> None:
        dlab = self.lcr & 0x80
        if off == 0:
            if dlab:
                self.dll = v
                return
            if self.mcr & MCR_LOOP:
                self._receive(v)
            else:
                self._send(v)
            self._thr_pending = True              # sent at once: THR empty again
        elif off == 1:
            if dlab:
                self.dlm = v
                return
            if v & IER_THRI and not self.ier & IER_THRI:
                self._thr_pending = True          # enabling THRI with THR empty raises it
            self.ier = v & 0x0F
            if v & IER_RDI:
                self._start_reader()
        elif off == 2:
            self.fcr = v
            if v & 2:
                self._rx.clear()
                self._room.notify_all()
        elif off == 3:
            self.lcr = v
        elif off == 4:
            self.mcr = v & 0x1F
        elif off == 7:
            self.scr = v

    def port_read(self, port: int, size: int) -> int:
        """The ``in`` handler."""
        off = port - self.base
        with self._lock:
            return self._read_reg(off)

    def _read_reg(self, off: int) -> int:
        dlab = self.lcr & 0x80
        if off == 0:
            if dlab:
                return self.dll
            self._start_reader()
            v = self._rx.popleft() if self._rx else 0
            self._room.notify_all()
            self._update_irq()
            return v
        if off == 1:
            return self.dlm if dlab else self.ier
        if off == 2:
            iir = self._iir()
            if iir & 0x0F == IIR_THRI:
                self._thr_pending = False         # reading IIR clears a THR-empty interrupt
                self._update_irq()
            return iir
        if off == 3:
            return self.lcr
        if off == 4:
            return self.mcr
        if off == 5:
            self._start_reader()
            lsr = LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0) | (LSR_OE if self._lsr_oe else 0)
            self._lsr_oe = False                  # reading LSR clears the error bits
            return lsr
        if off == 6:
            if self.mcr & MCR_LOOP:               # RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD
                m = self.mcr
                return ((m & 2) << 3) | ((m & 1) << 5) | ((m & 4) << 4) | ((m & 8) << 4)
            return 0xB0                           # DCD | DSR | CTS
        return self.scr
