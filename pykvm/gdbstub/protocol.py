"""GDB remote serial protocol framing: checksums, escapes, limits, a packet reader.

Pure: no sockets, no threads, no KVM.  Everything here treats the bytes it is
given as hostile (they come from whoever connected to the stub):

* :class:`PacketReader` turns a byte stream into events (a packet, a bad
  checksum, an ack, a NAK, Ctrl-C) with bounded memory: a packet body longer
  than :data:`PACKET_SIZE` bytes, or a ``$`` never followed by ``#``, ends
  the stream with :class:`ProtocolError` (the stub then closes the
  connection), and bytes outside packets are skipped in linear time.
* :func:`unescape` refuses a ``}`` escape with nothing after it.
* :func:`parse_hex`, :func:`parse_addr_len` bound every number before use:
  an address must fit 64 bits, a hex field is at most 16 digits.

gdb's side of these rules: ``qSupported`` tells gdb ``PacketSize`` (in hex),
and gdb never sends a longer packet; a NAK (``-``) asks for the last packet
again; after ``QStartNoAckMode`` neither side acknowledges.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "MAX_MEMORY_READ",
    "PACKET_SIZE",
    "Ack",
    "BadChecksum",
    "Event",
    "Interrupt",
    "Nak",
    "Packet",
    "PacketReader",
    "ProtocolError",
    "checksum",
    "escape",
    "frame",
    "parse_addr_len",
    "parse_hex",
    "unescape",
]

#: Largest packet body (between ``$`` and ``#``) the stub accepts, advertised
#: to gdb as ``PacketSize`` in ``qSupported``.  A ``G`` packet (all registers
#: in hex) needs about 1.1 KB; the rest is room for ``M``/``X`` writes.
PACKET_SIZE = 0x4000

#: Most bytes one ``m`` reply carries (hex doubles it; gdb asks again for the rest).
MAX_MEMORY_READ = 0x1000

_U64 = (1 << 64) - 1
_HEX = frozenset(b"0123456789abcdefABCDEF")


class ProtocolError(ValueError):
    """Bytes from the peer that break the framing rules or a packet's syntax.

    Raised by the parsers here; the stub answers a malformed packet with
    ``E16`` (EINVAL) and closes the connection on a framing violation.
    """


def checksum(data: bytes) -> bytes:
    """The two lower-case hex digits of the modulo-256 sum of *data*."""
    return b"%02x" % (sum(data) & 0xFF)


_SPECIAL = frozenset(b"#$}*")


def escape(data: bytes) -> bytes:
    """Escape ``#``, ``$``, ``}`` and ``*`` as ``}`` + (byte XOR 0x20), for binary replies."""
    if not _SPECIAL.intersection(data):
        return bytes(data)
    out = bytearray()
    for b in data:
        if b in _SPECIAL:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Undo :func:`escape` (the ``X`` packet's binary data); a trailing ``}`` is an error."""
    if 0x7D not in data:
        return bytes(data)
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b == 0x7D:
            if i + 1 >= n:
                raise ProtocolError("escape character '}' at the end of the data")
            out.append(data[i + 1] ^ 0x20)
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


def frame(body: bytes) -> bytes:
    """``$body#cc``: one packet on the wire (*body* must already be escaped if binary)."""
    return b"$" + body + b"#" + checksum(body)


def parse_hex(field: bytes, what: str = "number", limit: int = _U64) -> int:
    """A hex field of at most 16 digits, no sign, no ``0x``, not above *limit*."""
    if not 1 <= len(field) <= 16 or not _HEX.issuperset(field):
        raise ProtocolError(f"{what} is not 1-16 hex digits: {bytes(field[:20])!r}")
    value = int(field, 16)
    if value > limit:
        raise ProtocolError(f"{what} {value:#x} is above {limit:#x}")
    return value


def parse_addr_len(field: bytes) -> tuple[int, int]:
    """``ADDR,LENGTH`` (both hex) whose range lies inside the 64-bit address space."""
    parts = field.split(b",")
    if len(parts) != 2:
        raise ProtocolError(f"expected ADDR,LENGTH, got {bytes(field[:40])!r}")
    addr = parse_hex(parts[0], "address")
    length = parse_hex(parts[1], "length")
    if addr + length > _U64 + 1:
        raise ProtocolError(f"range {addr:#x}+{length:#x} wraps past the top of the address space")
    return addr, length


# ---------------------------------------------------------------------------
# the byte stream -> events

@dataclasses.dataclass(frozen=True)
class Packet:
    """A packet whose checksum matched (``body`` still escaped, as gdb sent it)."""

    body: bytes


@dataclasses.dataclass(frozen=True)
class BadChecksum:
    """A complete packet whose checksum did not match (answer ``-`` in ack mode)."""

    body: bytes


@dataclasses.dataclass(frozen=True)
class Ack:
    """``+``: the peer got our last packet."""


@dataclasses.dataclass(frozen=True)
class Nak:
    """``-``: the peer wants our last packet again."""


@dataclasses.dataclass(frozen=True)
class Interrupt:
    """``\\x03`` outside a packet: gdb's Ctrl-C."""


Event = Packet | BadChecksum | Ack | Nak | Interrupt


class PacketReader:
    """Incremental parser of the peer's byte stream (one per connection).

    :meth:`feed` takes whatever ``recv`` returned and gives the complete
    events in it; a partial packet waits for more bytes, up to
    *max_packet* bytes of body.  Bytes outside a packet other than ``+``,
    ``-`` and ``\\x03`` are noise and are dropped.  Memory use stays below
    *max_packet* + 3 bytes plus one chunk, whatever the peer sends.
    """

    def __init__(self, max_packet: int = PACKET_SIZE) -> None:
        self.max_packet = max_packet
        self._buf = bytearray()         # a packet in progress, from its '$'
        self.noise = 0                  # bytes dropped outside packets (for logs and tests)

    def feed(self, data: bytes) -> list[Event]:
        """Parse *data*; raise :class:`ProtocolError` once a packet is over the limit."""
        events: list[Event] = []
        view = memoryview(data)
        i, n = 0, len(data)
        while i < n:
            if not self._buf:                          # between packets
                start = data.find(b"$", i)
                stop = n if start < 0 else start
                segment = data[i:stop]
                if b"+" not in segment and b"-" not in segment and b"\x03" not in segment:
                    self.noise += len(segment)                 # pure noise: skip at C speed
                    segment = b""
                for b in segment:
                    if b == 0x2B:
                        events.append(Ack())
                    elif b == 0x2D:
                        events.append(Nak())
                    elif b == 0x03:
                        events.append(Interrupt())
                    else:
                        self.noise += 1
                if start < 0:
                    break
                self._buf.append(0x24)
                i = start + 1
                continue
            # inside a packet: _buf is '$' + body so far [+ '#' + checksum digits so far]
            hash_at = self._buf.find(b"#")
            if hash_at < 0:
                end = data.find(b"#", i)
                stop = n if end < 0 else end
                if len(self._buf) - 1 + (stop - i) > self.max_packet:
                    raise ProtocolError(f"packet longer than {self.max_packet} bytes "
                                        "(or a '$' never followed by '#')")
                self._buf += view[i:stop]
                i = stop
                if end < 0:
                    break
                hash_at = len(self._buf)
                self._buf.append(0x23)
                i += 1
            need = hash_at + 3 - len(self._buf)
            if need > 0:
                got = view[i:i + need]
                self._buf += got
                i += len(got)
                if len(self._buf) < hash_at + 3:
                    break
            body = bytes(self._buf[1:hash_at])
            digits = bytes(self._buf[hash_at + 1:hash_at + 3])
            self._buf.clear()
            if digits.lower() == checksum(body):
                events.append(Packet(body))
            else:
                events.append(BadChecksum(body))
        return events

    @property
    def pending(self) -> int:
        """Bytes of an unfinished packet held (at most ``max_packet + 3``)."""
        return len(self._buf)
