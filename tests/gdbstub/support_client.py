"""Just enough of gdb's side of the remote protocol to test the stub directly."""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

from pykvm.gdbstub import REGISTERS

if TYPE_CHECKING:
    from .support_guest import ServedGuest


class Client:
    """Just enough of gdb's side of the protocol (ack mode) to test the stub directly."""

    def __init__(self, address: str | tuple[str, int], timeout: float = 20) -> None:
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        else:
            self.sock = socket.create_connection(address, timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.console: list[str] = []

    def close(self) -> None:
        self.sock.close()

    def _byte(self) -> int:
        while not self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("stub closed the connection")
            self.buf += chunk
        b, self.buf = self.buf[0], self.buf[1:]
        return b

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, payload: bytes) -> None:
        self.send_raw(b"$" + payload + b"#%02x" % (sum(payload) & 0xFF))
        assert self._byte() == ord("+")

    def recv(self) -> bytes:
        while True:
            while self._byte() != ord("$"):
                pass
            body = bytearray()
            while (c := self._byte()) != ord("#"):
                body.append(c)
            cs = bytes([self._byte(), self._byte()])
            assert int(cs, 16) == sum(body) & 0xFF, "bad checksum from the stub"
            try:
                self.send_raw(b"+")
            except OSError:                    # the stub may close right after its last reply
                pass
            if body.startswith(b"O") and body != b"OK":
                self.console.append(bytes.fromhex(body[1:].decode()).decode())
                continue
            return bytes(body)

    def cmd(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.recv()

    def reg(self, name: str) -> int:
        n = [r for r, _ in REGISTERS].index(name)
        return int.from_bytes(bytes.fromhex(self.cmd(b"p%x" % n).decode()), "little")

    def set_reg(self, name: str, value: int) -> None:
        n = [r for r, _ in REGISTERS].index(name)
        size = REGISTERS[n][1]
        assert self.cmd(b"P%x=" % n + value.to_bytes(size, "little").hex().encode()) == b"OK"


def connect(g: ServedGuest, timeout: float = 10) -> Client:
    """A client in a new session, once the previous one has ended.

    A connection made while a session still runs is turned away by the stub
    (that is one of the guarantees); retry until the stub takes us.
    """
    deadline = time.monotonic() + timeout
    while True:
        c = Client(g.address)
        try:
            assert c.cmd(b"?") in (b"S05", b"T02thread:1;")
            return c
        except (EOFError, ConnectionResetError, BrokenPipeError):
            c.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def wait_sessions(g: ServedGuest, n: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(g.results) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(g.results) >= n, g.results


def wait_closed(c: Client, timeout: float = 10) -> bytes:
    """Read until the stub closes the connection; return what came before."""
    c.sock.settimeout(timeout)
    got = bytearray(c.buf)
    c.buf = b""
    try:
        while True:
            chunk = c.sock.recv(65536)
            if not chunk:
                return bytes(got)
            got += chunk
    except ConnectionResetError:
        return bytes(got)
