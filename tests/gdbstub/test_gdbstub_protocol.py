"""The pure framing layer (pykvm.gdbstub.protocol), fuzzed with hypothesis.

``PYKVM_FUZZ_EXAMPLES`` raises the number of examples for a long run.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.gdbstub import protocol
from pykvm.gdbstub.protocol import Ack, BadChecksum, Interrupt, Nak, Packet, PacketReader, ProtocolError

EXAMPLES = int(os.environ.get("PYKVM_FUZZ_EXAMPLES", "200"))
pytestmark = pytest.mark.no_kvm_needed


def feed_all(reader: PacketReader, chunks: list[bytes]) -> list:
    events: list = []
    for c in chunks:
        events += reader.feed(c)
    return events


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return out


_PACKETISH = st.lists(st.one_of(
    st.binary(max_size=40),
    st.binary(max_size=60).map(lambda b: protocol.frame(b.replace(b"#", b"").replace(b"$", b""))),
    st.sampled_from([b"+", b"-", b"\x03", b"$", b"#", b"}", b"#00", b"$?#3f"]),
), max_size=20).map(b"".join)


@settings(max_examples=EXAMPLES, deadline=None)
@given(_PACKETISH, st.lists(st.integers(min_value=0, max_value=2000), max_size=10))
def test_chunking_never_changes_the_events(data: bytes, cuts: list[int]) -> None:
    """Whatever the stream and however recv() splits it: same events, or the same refusal."""
    def run(chunks: list[bytes]):
        reader = PacketReader(64)
        try:
            events = feed_all(reader, chunks)
        except ProtocolError:
            return "refused"
        assert reader.pending <= 64 + 3
        return events

    whole = run([data])
    assert run(pieces(data, cuts)) == whole
    if whole != "refused":
        for ev in whole:
            assert isinstance(ev, (Packet, BadChecksum, Ack, Nak, Interrupt))
            if isinstance(ev, (Packet, BadChecksum)):
                assert len(ev.body) <= 64 and b"#" not in ev.body


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=300))
def test_escape_roundtrip_and_unescape_never_crashes(data: bytes) -> None:
    esc = protocol.escape(data)
    assert not set(esc) & set(b"#$*") and protocol.unescape(esc) == data
    try:
        protocol.unescape(data)
    except ProtocolError:
        assert data.endswith(b"}")


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=40))
def test_number_parsers_refuse_with_their_own_error(field: bytes) -> None:
    for parse in (protocol.parse_hex, protocol.parse_addr_len):
        try:
            value = parse(field)
        except ProtocolError:
            continue
        if parse is protocol.parse_hex:
            assert 0 <= value < 1 << 64
        else:
            addr, length = value
            assert addr + length <= 1 << 64


def test_limits_exactly() -> None:
    body = b"a" * protocol.PACKET_SIZE
    assert PacketReader().feed(protocol.frame(body)) == [Packet(body)]
    with pytest.raises(ProtocolError):
        PacketReader().feed(protocol.frame(body + b"a"))
    reader = PacketReader()
    reader.feed(b"$" + b"a" * protocol.PACKET_SIZE)           # at the limit, still waiting
    with pytest.raises(ProtocolError):
        reader.feed(b"a")                                     # one over, no '#' yet
    assert protocol.parse_hex(b"f" * 16) == (1 << 64) - 1
    for bad in (b"", b"1" * 17, b"-1", b"0x1", b" 1", b"1_0", "٣".encode()):
        with pytest.raises(ProtocolError):
            protocol.parse_hex(bad)
    assert protocol.parse_addr_len(b"ffffffffffffffff,1") == ((1 << 64) - 1, 1)
    with pytest.raises(ProtocolError):
        protocol.parse_addr_len(b"ffffffffffffffff,2")
    with pytest.raises(ProtocolError):
        protocol.unescape(b"ab}")
