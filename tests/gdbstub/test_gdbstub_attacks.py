"""The GDB stub attacked over a real socket, against a real stub serving a real vCPU.

Every attack must end in an error reply (``E nn``) or a closed connection;
afterwards the stub's thread is still serving (no exception escaped into
the host program), guest memory is what it was, and the next well-formed
session works.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest

from pykvm.gdbstub import PACKET_SIZE, SessionEnd
from pykvm.gdbstub import target as target_module

from .support_client import Client, connect, wait_closed, wait_sessions
from .support_guest import (
    ALIAS_VA,
    BP_HERE,
    CODE,
    CODE_ALIAS,
    DATA_PA,
    DATA_VA,
    GUEST_CODE,
    SPIN,
    ServedGuest,
    build_guest,
)

RAM = 0x200000


@pytest.fixture
def thread_errors() -> Iterator[list[BaseException]]:
    """Exceptions that reached ``threading.excepthook`` (a reader thread dying noisily)."""
    seen: list[BaseException] = []
    old = threading.excepthook
    threading.excepthook = lambda args: seen.append(args.exc_value)  # type: ignore[assignment]
    try:
        yield seen
    finally:
        threading.excepthook = old


@pytest.fixture
def stub(kvm, thread_errors):
    """A guest served for many sessions in a row; checks it is unharmed afterwards."""
    vm = build_guest(kvm)
    with vm:
        before = vm.read(0, RAM)
        with ServedGuest(vm, sessions=100, timeout=60) as g:
            g.ram_before = before
            yield g
            assert g.alive and g.error is None, g.error
            healthy(g)
        assert not thread_errors, thread_errors


def healthy(g: ServedGuest) -> None:
    """A fresh, well-formed session works, and guest RAM is as it was."""
    c = connect(g)
    try:
        assert c.cmd(b"m%x,%x" % (CODE, len(GUEST_CODE))) == GUEST_CODE.hex().encode()
        n = len(g.results)
        c.send(b"k")
        wait_sessions(g, n + 1)
        assert g.results[-1].reason == "killed"
    finally:
        c.close()
    assert g.vm.read(0, RAM) == g.ram_before
    assert g.alive and g.error is None



def packet(body: bytes) -> bytes:
    return b"$" + body + b"#%02x" % (sum(body) & 0xFF)


# ---------------------------------------------------------------------------
# framing

def test_bad_checksum_is_nacked_then_retransmit_accepted(stub) -> None:
    c = Client(stub.address)
    c.send_raw(b"$?#00")
    assert c._byte() == ord("-")
    c.send_raw(b"$?#3F")                                       # upper-case digits are fine
    assert c._byte() == ord("+") and c.recv() == b"S05"
    c.send_raw(b"$?#zz")                                       # not even hex
    assert c._byte() == ord("-")
    c.close()


def test_endless_bad_checksums_close_the_connection(stub) -> None:
    c = Client(stub.address)
    c.send_raw(b"$?#00" * 100)
    assert wait_closed(c).count(b"-") <= 17
    c.close()


def test_nak_storm_is_bounded(stub) -> None:
    c = Client(stub.address)
    assert c.cmd(b"?") == b"S05"
    c.send_raw(b"-" * 1000)                                    # "send it again", forever
    got = wait_closed(c)
    assert 1 <= got.count(b"$S05#b8") <= 17
    c.close()


def test_escape_at_the_end_of_a_packet(stub) -> None:
    c = Client(stub.address)
    assert c.cmd(b"X%x,1:}" % DATA_VA) == b"E16"               # '}' with nothing to escape
    assert c.cmd(b"X%x,0:}" % DATA_VA) == b"E16"
    assert c.cmd(b"X%x,2:}}}" % DATA_VA) == b"E16"             # "}}" is one byte, then a lone "}"
    assert c.cmd(b"?") == b"S05"                               # the session goes on
    c.close()


def test_endless_packet_closes_the_connection(stub) -> None:
    c = Client(stub.address)
    chunk = b"$" + b"A" * 65536
    try:
        for _ in range(8):                                     # 512 KiB, never a '#'
            c.send_raw(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass                                                   # closed before we finished
    assert wait_closed(c) == b""
    c.close()


def test_packet_size_is_advertised_and_enforced(stub) -> None:
    c = Client(stub.address)
    feats = dict(f.split(b"=") for f in c.cmd(b"qSupported:swbreak+").split(b";") if b"=" in f)
    assert int(feats[b"PacketSize"], 16) == PACKET_SIZE
    # exactly PACKET_SIZE bytes of body: accepted (an M that writes what is already there)
    n = (PACKET_SIZE - len(b"M%x,%x:" % (CODE, 0x1000))) // 2
    head = b"M%x,%x:" % (CODE, n)
    body = head + GUEST_CODE.hex().encode() + b"00" * (n - len(GUEST_CODE))
    assert len(body) <= PACKET_SIZE
    assert c.cmd(body) == b"OK"
    # one byte more than PACKET_SIZE: the connection is closed, nothing written
    big = b"M%x,1:" % (CODE + 0x800) + b"4" * (PACKET_SIZE - 6)
    assert len(big) > PACKET_SIZE
    c.send_raw(packet(big))
    assert wait_closed(c) == b""
    c.close()


def test_junk_between_packets(stub) -> None:
    rng = random.Random(1234)
    junk = bytes(b for b in rng.randbytes(1 << 20) if b not in b"$+-\x03")
    c = Client(stub.address)
    c.send_raw(junk)
    c.send_raw(packet(b"?"))
    assert c._byte() == ord("+") and c.recv() == b"S05"
    c.send_raw(b"####}}}}\r\n+++" + packet(b"qC") + b"\x00\xff")
    assert c.recv() == b"QC1"                                  # recv() skips the '+' ack
    c.close()


def test_disconnect_mid_packet(stub) -> None:
    for n, partial in enumerate((b"$m10000,", b"$", b"$g#", b"$g#6", b"$X10000,4:}"), 1):
        c = connect(stub)
        c.send_raw(partial)
        c.close()
        wait_sessions(stub, n)
    assert [r.reason for r in stub.results] == ["disconnected"] * 5


# ---------------------------------------------------------------------------
# packets with absurd contents

@pytest.mark.parametrize("body, reply", [
    (b"mffffffffffffffff,ffffffffffffffff", b"E16"),           # wraps past 2**64
    (b"m1" + b"0" * 100 + b",4", b"E16"),                     # a 400-bit address
    (b"m-1,4", b"E16"),
    (b"m10000", b"E16"),
    (b"m10000,", b"E16"),
    (b"m,4", b"E16"),
    (b"m0x10000,4", b"E16"),
    (b"m10000,4,4", b"E16"),
    (b"m8000000000000000,10", b"E0e"),                       # not canonical
    (b"m800000,4", b"E0e"),                                  # not mapped
    (b"mfffffffffffffff0,10", b"E0e"),                       # canonical, top of memory, unmapped
    (b"M10000,ffffffff:00", b"E16"),                         # length does not match the data
    (b"M10000,1:0", b"E16"),                                 # odd hex
    (b"M10000,1:zz", b"E16"),
    (b"M10000,1", b"E16"),                                   # no data at all
    (b"Mffffffffffffffff,2:0000", b"E16"),                   # wraps
    (b"M800000,1:00", b"E0e"),
    (b"X10000,5:ab", b"E16"),
    (b"X10000,1", b"E16"),
    (b"X800000,1:a", b"E0e"),
    (b"Z0", b"E16"), (b"Z0,", b"E16"), (b"Z0,,", b"E16"), (b"Z9,10000,1", b"E16"),
    (b"Z0,zz,1", b"E16"), (b"Z0,10000,1,1", b"E16"), (b"Z2,10001,8", b"E16"),
    (b"Z2,10000,3", b"E16"), (b"Z0,8000000000000000,1", b"E0e"), (b"Z0,800000,1", b"E0e"),
    (b"z0", b"E16"), (b"z5,1,1", b"E16"), (b"z0,ffffffffffffffffff,1", b"E16"),
    (b"p", b"E16"), (b"p999", b"E16"), (b"p" + b"f" * 40, b"E16"), (b"p\xff", b"E16"),
    (b"P0", b"E16"), (b"P0=", b"E16"), (b"P0=00", b"E16"), (b"P0=" + b"00" * 9, b"E16"),
    (b"G", b"E16"), (b"G00", b"E16"), (b"G" + b"xx" * 600, b"E16"),
    (b"qXfer:features:read:target.xml:", b"E16"),
    (b"qXfer:features:read:target.xml:ffffffffffffffff,2", b"E16"),
    (b"qXfer:features:read:../../etc/passwd:0,10", b"E02"),
    (b"qRcmd,zz", b"E16"), (b"qRcmd,", b"E16"), (b"qRcmd,6e6f7065", b"E16"),
    (b"c" + b"1" * 17, b"E16"), (b"Cff;zz", b"E16"), (b"Czz", b"E16"),
])
def test_malformed_packet_gets_an_error(stub, body: bytes, reply: bytes) -> None:
    c = Client(stub.address)
    assert c.cmd(body) == reply
    assert c.cmd(b"?") == b"S05"                               # the session goes on
    c.close()


def test_reads_are_bounded(stub) -> None:
    c = Client(stub.address)
    data = c.cmd(b"m0,ffffffffffffffff")                       # "everything": one bounded chunk
    assert 0 < len(data) <= 2 * 0x1000
    assert c.cmd(b"qXfer:features:read:target.xml:0,ffffffff")[:1] in (b"m", b"l")
    c.close()


def test_too_many_software_breakpoints(stub, monkeypatch) -> None:
    monkeypatch.setattr(target_module, "MAX_SW_BREAKPOINTS", 8)
    c = Client(stub.address)
    for i in range(8):
        assert c.cmd(b"Z0,%x,1" % (DATA_VA + 0x100 + i)) == b"OK"
    assert c.cmd(b"Z0,%x,1" % (DATA_VA + 0x200)) == b"E1c"   # ENOSPC
    c.send(b"D")                                              # detach: all removed
    c.close()


def test_non_ascii_and_binary_packets(stub) -> None:
    c = Client(stub.address)
    assert c.cmd(b"qSupported:\xff\xfe+;" + b"a+;" * 500).startswith(b"PacketSize=")
    assert c.cmd(bytes(range(0x80, 0x100))) == b""            # unknown: empty reply
    assert c.cmd(b"\x00") == b""
    c.close()


# ---------------------------------------------------------------------------
# more than one peer, floods, running guests

def test_second_client_is_refused_and_sessions_do_not_mix(stub) -> None:
    first = Client(stub.address)
    assert first.cmd(b"Z0,%x,1" % (DATA_VA + 3)) == b"OK"
    second = Client(stub.address)
    assert wait_closed(second) == b""                          # turned away at once
    second.close()
    assert first.cmd(b"m%x,4" % DATA_VA) == b"hell".hex().encode()   # int3 hidden, session intact
    assert first.cmd(b"D") == b"OK"
    first.close()
    wait_sessions(stub, 1)
    assert stub.results == [SessionEnd("detached")] and stub.stub.target.planted == {}


def test_packet_flood_while_the_guest_runs(kvm, thread_errors) -> None:
    with build_guest(kvm, entry=SPIN) as vm, ServedGuest(vm, sessions=2) as g:
        c = Client(g.address)
        c.send(b"c")
        time.sleep(0.05)
        c.send_raw(packet(b"?") * 200)                         # gdb never does this
        wait_closed(c)
        c.close()
        deadline = time.monotonic() + 10
        while not g.results and time.monotonic() < deadline:
            time.sleep(0.005)
        assert g.results[0].reason == "disconnected"
        c = Client(g.address)                                  # the next session works
        assert c.cmd(b"?") in (b"S05", b"T02thread:1;")
        c.send(b"k")
        assert g.join().reason == "killed"
        c.close()
    assert not thread_errors


def test_ctrl_c_flood_and_garbage_while_running(kvm, thread_errors) -> None:
    with build_guest(kvm, entry=SPIN) as vm, ServedGuest(vm) as g:
        c = Client(g.address)
        c.send(b"c")
        c.send_raw(b"\x03" * 10000)
        assert c.recv() == b"T02thread:1;"
        assert c.cmd(b"?") == b"T02thread:1;"
        c.send(b"k")
        assert g.join().reason == "killed"
        c.close()
    assert not thread_errors


def test_host_kick_stops_the_guest_for_gdb(kvm) -> None:
    """The host program's own watchdog (vcpu.kick_after) stops a running guest: gdb sees SIGINT."""
    with build_guest(kvm, entry=SPIN) as vm, ServedGuest(vm) as g:
        c = Client(g.address)
        with vm.vcpus[0].kick_after(0.1):
            assert c.cmd(b"c") == b"T02thread:1;"
        c.send(b"k")
        assert g.join().reason == "killed"
        c.close()


# ---------------------------------------------------------------------------
# breakpoints and aliases

def test_breakpoints_through_two_aliases_leave_memory_exact(stub) -> None:
    vm = stub.vm
    off = 4
    orig = vm.read(DATA_PA + off, 1)
    c = Client(stub.address)
    assert c.cmd(b"Z0,%x,1" % (DATA_VA + off)) == b"OK"
    assert c.cmd(b"Z0,%x,1" % (ALIAS_VA + off)) == b"OK"       # same physical byte
    assert vm.read(DATA_PA + off, 1) == b"\xcc"
    for va in (DATA_VA, ALIAS_VA):                             # both names read the original
        assert c.cmd(b"m%x,1" % (va + off)) == orig.hex().encode()
    assert c.cmd(b"M%x,1:51" % (ALIAS_VA + off)) == b"OK"     # write 'Q' through one alias
    assert vm.read(DATA_PA + off, 1) == b"\xcc"                 # the int3 stays planted
    assert c.cmd(b"m%x,1" % (DATA_VA + off)) == b"51"         # and both names show 'Q'
    assert c.cmd(b"z0,%x,1" % (DATA_VA + off)) == b"OK"
    assert vm.read(DATA_PA + off, 1) == b"\xcc"                 # still planted for the alias
    assert c.cmd(b"z0,%x,1" % (ALIAS_VA + off)) == b"OK"
    assert vm.read(DATA_PA + off, 1) == b"Q"
    assert c.cmd(b"M%x,1:%s" % (DATA_VA + off, orig.hex().encode())) == b"OK"
    # planted through both names, then detach: every byte as it was
    assert c.cmd(b"Z0,%x,1" % (ALIAS_VA + off)) == b"OK"
    assert c.cmd(b"Z0,%x,1" % (DATA_VA + off)) == b"OK"
    assert c.cmd(b"D") == b"OK"
    c.close()
    wait_sessions(stub, 1)
    assert vm.read(0, RAM) == stub.ram_before


def test_breakpoint_set_through_an_alias_stops_the_guest(kvm) -> None:
    """Z0 at the code's second name: the guest runs the first name and still stops there."""
    with build_guest(kvm) as vm, ServedGuest(vm) as g:
        c = Client(g.address)
        c.cmd(b"qSupported:swbreak+")
        assert c.cmd(b"Z0,%x,1" % (CODE_ALIAS + BP_HERE - CODE)) == b"OK"
        assert c.cmd(b"c") == b"T05thread:1;swbreak:;"
        assert c.reg("rip") == BP_HERE
        assert c.cmd(b"m%x,1" % BP_HERE) == b"8d"              # lea: the original byte
        assert c.cmd(b"z0,%x,1" % (CODE_ALIAS + BP_HERE - CODE)) == b"OK"
        c.send(b"c")
        assert c.recv() == b"W00"
        assert g.join().reason == "exited"
        c.close()
        assert bytes(g.output) == b"hello gdb: 5 and bye\n"
        assert vm.read(CODE, len(GUEST_CODE)) == GUEST_CODE


def test_guest_rewrote_the_breakpoint_byte(stub) -> None:
    """If the guest replaced our int3 itself, removing the breakpoint keeps the guest's byte."""
    vm = stub.vm
    c = Client(stub.address)
    assert c.cmd(b"Z0,%x,1" % (DATA_VA + 8)) == b"OK"
    vm.write(DATA_PA + 8, b"Z")                                # as a guest store would
    assert c.cmd(b"z0,%x,1" % (DATA_VA + 8)) == b"OK"
    assert vm.read(DATA_PA + 8, 1) == b"Z"
    vm.write(DATA_PA + 8, stub.ram_before[DATA_PA + 8:DATA_PA + 9])
    c.close()
