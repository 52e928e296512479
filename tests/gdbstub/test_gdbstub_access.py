"""Who may reach the GDB stub: a private UNIX socket by default, TCP only with a token.

Another local user is simulated with ``runuser -u nobody`` running Debian's
``/usr/bin/python3`` (the default python lives under /root, which nobody
cannot enter); the script it runs uses the standard library only.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from pykvm.gdbstub import GdbStub, SessionEnd

from .support_client import Client, connect, wait_closed, wait_sessions
from .support_guest import CODE, GUEST_CODE, ServedGuest, build_guest

OTHER_PYTHON = "/usr/bin/python3"

# As another user: connect, ask for 4 bytes of guest memory, print what happened.
_PROBE = r"""
import socket, sys
where = sys.argv[1]
try:
    if where.startswith("/"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(where)
    else:
        s = socket.create_connection(("127.0.0.1", int(where)), timeout=10)
except PermissionError:
    print("EACCES"); sys.exit(0)
except OSError as e:
    print("connect-failed", e.errno); sys.exit(0)
body = b"m%x,4" % 0x10000
try:
    s.sendall(b"$" + body + b"#%02x" % (sum(body) & 0xFF))
    got = b""
    while b"#" not in got[1:] or len(got) < got.rfind(b"#") + 3:
        chunk = s.recv(100)
        if not chunk:
            break
        got += chunk
except OSError:
    got = b""
print("reply", got.decode("latin-1") or "<closed>")
"""


def as_nobody(where: str) -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a probe as another user (runuser)")
    runuser = shutil.which("runuser")
    if runuser is None or not os.access(OTHER_PYTHON, os.X_OK):
        pytest.fail("runuser and /usr/bin/python3 are needed to test access by another user")
    p = subprocess.run([runuser, "-u", "nobody", "--", OTHER_PYTHON, "-I", "-c", _PROBE, where],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_default_socket_is_private_and_removed(kvm) -> None:
    with build_guest(kvm) as vm:
        stub = GdbStub(vm.vcpus[0])
        path = stub.path
        assert path is not None
        st, dst = os.lstat(path), os.lstat(os.path.dirname(path))
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(dst.st_mode) == 0o700
        assert st.st_uid == dst.st_uid == os.geteuid()
        stub.close()
        assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))


def test_another_user_cannot_connect_to_the_default_socket(kvm) -> None:
    with build_guest(kvm) as vm, ServedGuest(vm) as g:
        assert as_nobody(g.address) == "EACCES"
        c = connect(g)                                         # we still can
        assert c.cmd(b"m%x,4" % CODE) == GUEST_CODE[:4].hex().encode()
        c.close()


def test_socket_at_a_chosen_path_in_a_shared_directory(kvm) -> None:
    shared = tempfile.mkdtemp()
    os.chmod(shared, 0o1777)                                   # like /tmp
    try:
        path = os.path.join(shared, "gdb.sock")
        with build_guest(kvm) as vm, ServedGuest(vm, path=path) as g:
            assert g.address == path
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
            assert os.listdir(shared) == ["gdb.sock"]          # the private directory is gone
            assert as_nobody(path) == "EACCES"
        assert os.listdir(shared) == []                        # removed on close
        # an existing file is never replaced
        with open(path, "w") as f:
            f.write("precious")
        with build_guest(kvm) as vm:
            with pytest.raises(FileExistsError):
                GdbStub(vm.vcpus[0], path=path)
            os.unlink(path)
            os.symlink("/etc/passwd", path)                   # nor a symlink followed
            with pytest.raises(FileExistsError):
                GdbStub(vm.vcpus[0], path=path)
            assert os.readlink(path) == "/etc/passwd"
        assert sorted(os.listdir(shared)) == ["gdb.sock"]
    finally:
        shutil.rmtree(shared)


def test_peer_of_another_uid_is_refused_even_if_the_socket_is_opened_up(kvm) -> None:
    """SO_PEERCRED: a careless chmod 0666 of the socket still lets no other user in."""
    shared = tempfile.mkdtemp()
    os.chmod(shared, 0o1777)
    try:
        path = os.path.join(shared, "gdb.sock")
        with build_guest(kvm) as vm, ServedGuest(vm, path=path) as g:
            os.chmod(path, 0o666)
            assert as_nobody(path) == "reply <closed>"         # connected, turned away unserved
            c = connect(g)
            assert c.cmd(b"m%x,4" % CODE) == GUEST_CODE[:4].hex().encode()
            c.close()
    finally:
        shutil.rmtree(shared)


def test_tcp_needs_the_token(kvm) -> None:
    with build_guest(kvm) as vm, ServedGuest(vm, port=0, sessions=3) as g:
        token = g.stub.token
        assert token is not None and len(token) == 32
        host, port = g.address
        assert host == "127.0.0.1"
        # another user reaches the port but gets nothing out of it
        assert "$E01#" in as_nobody(str(port))
        wait_sessions(g, 1)
        c = connect(g)
        assert c.cmd(b"g") == b"00" * (len(c.cmd(b"g")) // 2)  # zeros, not the guest's registers
        for body in (b"m%x,4" % CODE, b"M%x,1:90" % CODE, b"X%x,0:" % CODE, b"Z0,%x,1" % CODE,
                     b"G00", b"P0=0000000000000000", b"c", b"s", b"vCont;c"):
            assert c.cmd(body) == b"E01", body
        c.send_raw(b"\x03")                                    # Ctrl-C cannot touch the vCPU
        assert c.cmd(b"qRcmd," + b"auth wrong-token-0123456789".hex().encode()) == b"E0d"
        assert wait_closed(c) == b""                           # one wrong guess ends the session
        c.close()
        wait_sessions(g, 2)
        assert g.results[1] == SessionEnd("refused")
        c = connect(g)
        reply = c.cmd(b"qRcmd," + f"auth {token}".encode().hex().encode())
        assert reply == b"OK" and "authenticated" in "".join(c.console)
        assert c.cmd(b"m%x,4" % CODE) == GUEST_CODE[:4].hex().encode()
        c.send(b"k")
        assert g.join().reason == "killed"
        c.close()
        assert vm.read(CODE, len(GUEST_CODE)) == GUEST_CODE


def test_real_gdb_over_tcp_with_the_token(kvm) -> None:
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.fail("gdb is not installed (Debian/Ubuntu: apt-get install gdb)")
    with build_guest(kvm) as vm, ServedGuest(vm, port=0) as g:
        args = [gdb, "-nx", "-batch"]
        for cmd in [*g.stub.gdb_commands(), "x/2xb 0x10000", "p/x $rip", "kill"]:
            args += ["-ex", cmd]
        p = subprocess.run(args, capture_output=True, text=True, timeout=60)
        out = p.stdout + p.stderr
        assert g.join().reason == "killed"
    assert "0x10000:\t0xbb\t0x05" in out, out                  # mov ebx,5
    assert "$1 = 0x10000" in out, out


@pytest.mark.parametrize("kwargs, error", [
    ({"port": 0, "host": "0.0.0.0"}, ValueError),
    ({"port": 0, "host": "192.168.0.1"}, ValueError),
    ({"port": 0, "path": "/tmp/x"}, ValueError),
    ({"port": 0, "token": "short"}, ValueError),
    ({"port": 0, "token": "with space in the token"}, ValueError),
    ({"port": 0, "token": "ü" * 20}, ValueError),
    ({"port": 70000}, ValueError),
    ({"port": -1}, ValueError),
    ({"port": True}, ValueError),
    ({"port": "1234"}, ValueError),
])
def test_bad_stub_arguments(kvm, kwargs, error) -> None:
    with build_guest(kvm) as vm, pytest.raises(error):
        GdbStub(vm.vcpus[0], **kwargs)


def test_cli_help_and_probe() -> None:
    from pykvm.gdbstub.cli import main

    assert main(["--help"]) == 0
    assert main([]) == 2
    assert main(["demo", "--message", "x" * 300]) == 2
    p = subprocess.run([sys.executable, "-m", "pykvm.gdbstub", "probe"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "single step of CPL3 code" in p.stdout, p.stderr


def test_unauthenticated_peer_cannot_hold_the_stub(kvm, monkeypatch) -> None:
    from pykvm.gdbstub import stub as stub_module

    monkeypatch.setattr(stub_module, "AUTH_TIMEOUT", 0.2)
    with build_guest(kvm) as vm, ServedGuest(vm, port=0) as g:
        c = Client(g.address)
        assert c.cmd(b"?") == b"S05"                           # then it just sits there
        assert wait_closed(c) == b""
        assert g.join() == SessionEnd("refused")
        c.close()
