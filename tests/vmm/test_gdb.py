"""``pykvm vmm --gdb``: the kernel starts stopped under the GDB stub (like ``qemu -s -S``).

A minimal GDB remote-protocol client over a socket (no gdb needed): the stop
reply, RIP at the kernel's entry before anything ran, then ``c`` runs the
kernel to its debug exit, which gdb sees as the process exiting.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from .conftest import PROCESS_TIMEOUT


def packet(data: bytes) -> bytes:
    return b"$" + data + b"#" + b"%02x" % (sum(data) & 0xFF)


def reply(sock: socket.socket, buf: bytearray) -> bytes:
    """The next packet's payload (acks skipped, our ack sent)."""
    while True:
        m = re.search(rb"\$([^#]*)#[0-9a-f]{2}", bytes(buf))
        if m:
            del buf[:m.end()]
            try:
                sock.sendall(b"+")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the last packet (W..): the VMM may already have exited and closed
            return m.group(1)
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("stub closed the connection")
        buf += chunk


def _session(sock: socket.socket, entry: int, token: str | None) -> None:
    buf = bytearray()
    if token is not None:  # TCP: nothing about the guest before 'monitor auth TOKEN'
        sock.sendall(packet(b"m0,10"))                # guest memory: refused
        assert reply(sock, buf) == b"E01"
        sock.sendall(packet(b"qRcmd," + f"auth {token}".encode().hex().encode()))
        answer = reply(sock, buf)
        while answer.startswith(b"O") and answer != b"OK":   # console output first
            answer = reply(sock, buf)
        assert answer == b"OK"
    sock.sendall(packet(b"?"))
    assert reply(sock, buf)[:3] in (b"S05", b"T05")
    sock.sendall(packet(b"p10"))                    # register 16: rip
    rip = int.from_bytes(bytes.fromhex(reply(sock, buf).decode()), "little")
    assert rip == entry
    sock.sendall(packet(b"c"))
    assert reply(sock, buf) == b"W01"               # debug exit 0: status 1


@pytest.mark.parametrize("how", ["--gdb", "--gdb=0"])
def test_gdb_starts_the_kernel_stopped_at_its_entry(kernels, how):
    """--gdb: a private UNIX socket; --gdb=PORT: loopback TCP behind the stub's token.
    The printed gdb command line is what the test follows."""
    entry = kernels.symbol("tiny", "_start")
    p = subprocess.Popen([sys.executable, "-m", "pykvm.vmm", kernels["tiny"], how,
                          "--timeout", "60"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = p.stderr.readline().decode()
        m = re.search(r"-ex 'target remote ([^']+)'", line)
        assert m and "waiting for gdb" in line, line
        where = m.group(1)
        auth = re.search(r"-ex 'monitor auth ([0-9a-f]+)'", line)
        if how == "--gdb":
            assert where.startswith("/") and auth is None, line
            assert os.stat(where).st_mode & 0o077 == 0, "the socket must be private"
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(30)
            sock.connect(where)
        else:
            host, port = where.rsplit(":", 1)
            assert host == "127.0.0.1" and auth is not None, line
            sock = socket.create_connection((host, int(port)), timeout=30)
        with sock:
            _session(sock, entry, auth.group(1) if auth else None)
        out, err = p.communicate(timeout=PROCESS_TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 1, err
    assert out == b"hello from a multiboot kernel\n"


def test_gdb_needs_one_cpu(kernels, vmm):
    r = vmm(kernels["tiny"], "--gdb=0", "--smp", "2")
    assert r.status == 2 and r.err == "pykvm vmm: --gdb debugs one CPU: use --smp 1 (see --help)\n", r


def test_gdb_port_must_be_a_port(kernels, vmm):
    r = vmm(kernels["tiny"], "--gdb=70000")
    assert r.status == 2 and "want a port 0..65535" in r.err, r


def test_timeout_ends_a_run_nobody_debugs(kernels, vmm):
    r = vmm(kernels["tiny"], "--gdb=0", timeout=1)
    assert r.status == 124 and r.out == "", r
    assert "waiting for gdb" in r.err and "timeout: no exit after 1 s" in r.err, r
