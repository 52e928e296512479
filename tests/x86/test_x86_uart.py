"""The one 16550 UART (pykvm.x86.Uart16550) without a guest: registers, loopback,
interrupts, and the bounds on everything a guest or a host can push into it."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pykvm import x86
from pykvm.x86.devices.uart16550 import FIFO_SIZE

pytestmark = pytest.mark.no_kvm_needed


class Uart:
    def __init__(self, **kw) -> None:
        self.sent: list = []
        self.irqs: list = []
        self.dev = x86.Uart16550(on_output=self.sent.append, irq=self.irqs.append, **kw)

    def out(self, off: int, v: int) -> None:
        self.dev.port_write(0x3F8 + off, bytes([v]))

    def inp(self, off: int) -> int:
        return self.dev.port_read(0x3F8 + off, 1)


def test_output_lsr_and_loopback() -> None:
    u = Uart()
    assert u.inp(5) == 0x60                               # THR empty, idle, no data
    u.out(0, ord("A"))
    assert u.sent == [b"A"] and u.dev.text == "A"
    u.out(4, 0x1E)                                        # loopback, RTS, OUT1, OUT2
    u.out(0, 0xAE)
    assert u.sent == [b"A"]                               # looped back, not sent
    assert u.inp(5) & 1 and u.inp(0) == 0xAE and not u.inp(5) & 1
    assert u.inp(6) == 0x10 | 0x40 | 0x80                 # CTS, RI, DCD from RTS, OUT1, OUT2
    u.out(4, 0x0B)
    assert u.inp(6) == 0xB0
    u.out(3, 0x80)                                        # DLAB: divisor latch
    u.out(0, 3)
    u.out(1, 0)
    assert (u.inp(0), u.inp(1)) == (3, 0) and u.dev.dll == 3
    u.out(3, 0x03)
    u.out(7, 0x5A)
    assert u.inp(7) == 0x5A and u.inp(3) == 0x03


def test_interrupts() -> None:
    u = Uart()
    assert u.inp(2) == 0x01                               # none pending
    u.out(1, 0x02)                                        # THR empty interrupt
    assert u.irqs == [1] and u.inp(2) == 0x02             # reading IIR clears it
    assert u.irqs == [1, 0] and u.inp(2) == 0x01
    u.out(0, ord("x"))                                    # sent: THR empty again
    assert u.irqs[-1] == 1
    u.out(1, 0x01)                                        # only receive interrupts
    assert u.irqs[-1] == 0
    assert u.dev.feed(b"q") == 1
    assert u.irqs[-1] == 1 and u.inp(2) == 0x04 and u.inp(0) == ord("q")
    assert u.irqs[-1] == 0


def test_loopback_flood_overruns_at_16_bytes() -> None:
    """A guest writing THR forever in loopback mode fills 16 bytes, then overruns."""
    u = Uart()
    u.out(4, 0x10)
    for i in range(100000):
        u.out(0, i & 0xFF)
    assert u.dev.pending_input == FIFO_SIZE == 16
    assert u.dev.overruns == 100000 - 16
    assert u.inp(5) & 0x03 == 0x03                        # data ready + overrun error
    assert u.inp(5) & 0x02 == 0                           # OE clears on read
    assert [u.inp(0) for _ in range(16)] == list(range(16))
    assert not u.inp(5) & 1


def test_host_feed_takes_only_what_fits() -> None:
    u = Uart()
    assert u.dev.feed(b"x" * 1000) == FIFO_SIZE
    assert u.dev.feed(b"y") == 0
    u.inp(0)
    assert u.dev.wait_for_room(0) == 1 and u.dev.feed(b"yz") == 1


def test_output_kept_is_capped() -> None:
    u = Uart(output_limit=10)
    for _ in range(1000):
        u.out(0, ord("z"))
    assert len(u.dev.output) == 10 and u.dev.output_dropped == 990
    assert len(u.sent) == 1000                            # on_output still sees every byte


def test_input_fd_is_read_as_the_fifo_drains() -> None:
    """A reader thread moves a host stream into the FIFO without ever holding more
    than 16 bytes: 20 KB of input pass through, in order."""
    r, w = os.pipe()
    u = Uart(input_fd=r)
    data = bytes(range(256)) * 80
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    writer.start()
    u.out(1, 0x01)                                        # IER.RDI starts the reader
    got = bytearray()
    while len(got) < len(data):
        assert u.dev.pending_input <= FIFO_SIZE
        if u.inp(5) & 1:
            got.append(u.inp(0))
        else:
            time.sleep(0.0001)                            # let the reader thread run
    writer.join(30)
    os.close(r)
    assert bytes(got) == data
