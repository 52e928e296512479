"""The GDB stub as a service: the listening socket, one session at a time, the packets.

Who may connect
    * By default the stub listens on a **UNIX socket** created mode 0600 inside
      a fresh private directory (mode 0700, ``tempfile.mkdtemp``), so there is
      no moment at which another user could reach it; the connecting process's
      uid (``SO_PEERCRED``) must also be the stub's or root's.  gdb connects
      with ``target remote /path/to/gdb.sock``.
    * ``path=`` puts the socket at a path of your choice: it is created 0600 in
      a private directory beside that path and then hard-linked into place
      (an existing file at *path* is never replaced: ``FileExistsError``).
    * ``port=`` (only when asked for) listens on TCP on loopback, where every
      local user can connect, so it requires a **token**: every packet that
      reads or changes the guest is refused with ``E01`` until gdb sent
      ``monitor auth TOKEN``; a wrong token closes the connection.  The token
      is ``stub.token`` (128 random bits unless you give one).

What a peer cannot do
    Malformed input never raises into the program that hosts the stub: a bad
    packet gets ``E16`` (or another ``E<errno>``), a framing violation (a
    packet longer than :data:`~.protocol.PACKET_SIZE`, a ``$`` never closed,
    too many NAKs or bad checksums in a row, more than a few packets queued
    while the guest runs) closes the connection.  A second client while a
    session runs is accepted and closed at once; sessions never mix.
    Exceptions raised by *your* ``on_exit`` are yours: they propagate out of
    :meth:`GdbStub.serve`.
"""

from __future__ import annotations

import dataclasses
import errno
import hmac
import os
import queue
import secrets
import select
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable

from .. import exits
from ..errors import KvmError
from ..uapi import structs
from ..vcpu import Vcpu
from . import protocol
from .protocol import (
    MAX_MEMORY_READ,
    PACKET_SIZE,
    Ack,
    BadChecksum,
    Interrupt,
    Nak,
    Packet,
    PacketReader,
    ProtocolError,
    parse_addr_len,
    parse_hex,
)
from .registers import REGISTER_BYTES, REGISTERS, TARGET_XML, TargetError
from .support import debug_support
from .target import Target

__all__ = [
    "SIGILL",
    "SIGINT",
    "SIGSEGV",
    "SIGTRAP",
    "Exited",
    "GdbStub",
    "SessionEnd",
    "Stop",
    "default_on_exit",
]

SIGINT, SIGILL, SIGTRAP, SIGSEGV = 2, 4, 5, 11   # gdb's signal numbers (include/gdb/signals.h)

#: Consecutive NAKs of one packet, or bad checksums, before the stub gives up on a peer.
MAX_RETRIES = 16
#: Packets gdb may have sent that the stub has not answered yet (gdb waits for each reply).
MAX_QUEUED = 32
#: Seconds a send may block on a peer that does not read before the connection is dropped.
SEND_TIMEOUT = 30.0
#: Seconds an unauthenticated TCP peer may hold the (single) session before it is dropped.
AUTH_TIMEOUT = 60.0


# ---------------------------------------------------------------------------
# what on_exit returns

@dataclasses.dataclass(frozen=True)
class Exited:
    """Returned by ``on_exit``: the guest has finished with *code*; gdb sees the process exit."""

    code: int = 0


@dataclasses.dataclass(frozen=True)
class Stop:
    """Returned by ``on_exit``: stop and show gdb *signal* (a gdb signal number)."""

    signal: int = SIGTRAP


@dataclasses.dataclass(frozen=True)
class SessionEnd:
    """What ended :meth:`GdbStub.serve`.

    ``reason`` is ``"exited"`` (the guest finished; ``exit_code`` set),
    ``"killed"`` (gdb's ``kill``), ``"detached"`` (gdb's ``detach``: the vCPU
    may run on without the debugger), ``"disconnected"`` (the peer went away
    or broke the protocol), ``"refused"`` (a wrong token, or none within
    :data:`AUTH_TIMEOUT`) or ``"closed"``.
    """

    reason: str
    exit_code: int | None = None


OnExit = Callable[[exits.Exit], Exited | Stop | None]


def default_on_exit(ex: exits.Exit) -> Exited | Stop | None:
    """Fallback device model: discard output, read all-ones, stop on anything odd."""
    if isinstance(ex, (exits.IoOut, exits.MmioWrite)):
        return None
    if isinstance(ex, exits.IoIn):
        ex.set_data(b"\xff" * len(ex.data))
        return None
    if isinstance(ex, exits.MmioRead):
        ex.set_data(b"\xff" * ex.length)
        return None
    if isinstance(ex, exits.Hlt):
        return Exited(0)
    if isinstance(ex, exits.SystemEvent) and ex.type in (structs.KVM_SYSTEM_EVENT_SHUTDOWN,
                                                         structs.KVM_SYSTEM_EVENT_RESET):
        return Exited(0)
    if isinstance(ex, exits.Shutdown):
        return Stop(SIGSEGV)
    if isinstance(ex, exits.InternalError):
        return Stop(SIGILL)
    return Stop(SIGTRAP)


class _OnExitFailed(Exception):
    """Carries an exception raised by the user's on_exit through the packet handler."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(repr(original))
        self.original = original


_REINJECT = "reinject"                        # _classify: give the #BP back to the guest


# ---------------------------------------------------------------------------
# one connection

class _Conn:
    """One gdb connection: a reader thread turns the byte stream into queued packets.

    The reader also refuses (accepts and closes) any further connection on
    the listener while this one lives, so a second client never waits in the
    backlog to be served with the first one's state.
    """

    def __init__(self, sock: socket.socket, listener: socket.socket,
                 on_interrupt: Callable[[], None], on_eof: Callable[[], None],
                 log: Callable[[str], None] | None) -> None:
        self.sock = sock
        self._listener = listener
        self._on_eof = on_eof
        self._on_interrupt = on_interrupt
        self._log = log
        self.packets: queue.Queue[bytes | None] = queue.Queue()
        self.ack = True
        self.last = b""
        self.refused = 0                          # second clients turned away
        self.reason = ""                          # why the reader gave up (for the log)
        self._send_lock = threading.Lock()
        self._broken = False
        sock.settimeout(SEND_TIMEOUT)
        self._thread = threading.Thread(target=self._reader, name="pykvm-gdbstub-reader", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        reader = PacketReader(PACKET_SIZE)
        naks = bad = 0
        try:
            while not self._broken:
                ready, _, _ = select.select([self.sock, self._listener], [], [])
                if self._listener in ready:
                    self._refuse_second()
                if self.sock not in ready:
                    continue
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.reason = "peer closed"
                    break
                for ev in reader.feed(chunk):
                    if isinstance(ev, Packet):
                        naks = bad = 0
                        if self.ack:
                            self._raw_send(b"+")
                        if self._log:
                            self._log(f"<- {ev.body[:200]!r}")
                        if self.packets.qsize() >= MAX_QUEUED:
                            raise ProtocolError(f"more than {MAX_QUEUED} packets unanswered")
                        self.packets.put(ev.body)
                    elif isinstance(ev, Interrupt):
                        self._on_interrupt()
                    elif isinstance(ev, Nak):
                        naks += 1
                        if naks > MAX_RETRIES:
                            raise ProtocolError(f"{naks} NAKs in a row")
                        self._raw_send(self.last)
                    elif isinstance(ev, BadChecksum):
                        bad += 1
                        if bad > MAX_RETRIES:
                            raise ProtocolError(f"{bad} bad checksums in a row")
                        if self.ack:
                            self._raw_send(b"-")
                    elif isinstance(ev, Ack):
                        naks = 0
        except ProtocolError as e:
            self.reason = str(e)
        except (OSError, ValueError) as e:        # ValueError: select on a closed socket
            self.reason = f"{type(e).__name__}: {e}"
        except Exception as e:                    # never let a peer kill the host with a traceback
            self.reason = f"internal error: {type(e).__name__}: {e}"
        finally:
            if self._log and self.reason:
                self._log(f"!! connection ends: {self.reason}")
            self.shutdown()
            self.packets.put(None)
            self._on_eof()

    def _refuse_second(self) -> None:
        try:
            extra, _ = self._listener.accept()
        except OSError:
            return
        self.refused += 1
        extra.close()
        if self._log:
            self._log("!! refused a second connection while a session runs")

    def _raw_send(self, data: bytes) -> None:
        with self._send_lock:
            if self._broken:
                return
            try:
                self.sock.sendall(data)
            except OSError:                       # gone, or not reading for SEND_TIMEOUT
                self._broken = True
                self.shutdown()

    def send(self, payload: str | bytes) -> None:
        body = payload.encode() if isinstance(payload, str) else payload
        if self._log:
            self._log(f"-> {body[:200]!r}")
        self.last = protocol.frame(body)
        self._raw_send(self.last)

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self._broken = True
        self.shutdown()
        self._thread.join(5)
        self.sock.close()


# ---------------------------------------------------------------------------
# the stub

_LOOPBACK = ("127.0.0.1", "::1", "localhost")
# Packets an unauthenticated peer (TCP with a token) may send: nothing that reads or
# changes the guest.  ``g``/``p`` read as zeros (gdb refuses to attach to "unavailable" ones).
_PRE_AUTH = (b"qSupported", b"QStartNoAckMode", b"qXfer:features:read:", b"qC", b"qAttached",
             b"qfThreadInfo", b"qsThreadInfo", b"qSymbol", b"qRcmd,", b"vCont?", b"vMustReplyEmpty",
             b"qTStatus", b"qOffsets", b"?", b"H", b"T", b"k", b"vKill", b"D", b"g", b"p")


class GdbStub:
    """Serve the GDB remote protocol for *vcpu*, to one gdb at a time.

    Where: a private UNIX socket by default (``stub.path``); ``path=`` to
    choose it; ``port=`` for TCP on loopback *host* with a token (see the
    module docstring).  *token* may also be required on a UNIX socket.

    *on_exit(exit)* handles every exit that is not the debugger's (``IoOut``,
    ``MmioRead`` ...) like a run loop would: return None to resume the guest,
    :class:`Exited` when the guest has finished, :class:`Stop` to stop and
    report a signal to gdb (default: :func:`default_on_exit`).  *log*
    receives a packet trace.
    """

    def __init__(self, vcpu: Vcpu, *, path: str | None = None, port: int | None = None,
                 host: str = "127.0.0.1", token: str | None = None,
                 on_exit: OnExit | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        if not isinstance(vcpu, Vcpu):
            raise TypeError(f"vcpu must be a pykvm Vcpu, not {type(vcpu).__name__}")
        if path is not None and port is not None:
            raise ValueError("give path= (UNIX socket) or port= (TCP), not both")
        if token is not None and (not isinstance(token, str) or not token.isascii()
                                  or not token.isprintable() or not 16 <= len(token) <= 256
                                  or " " in token):
            raise ValueError("token must be 16-256 printable ASCII characters without spaces")
        self.vcpu = vcpu
        self.on_exit: OnExit = on_exit or default_on_exit
        self.log = log
        self._private_dir: str | None = None
        self._path: str | None = None
        self._inode: tuple[int, int] | None = None
        if port is not None:
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
                raise ValueError(f"port must be an int in 0..65535, not {port!r}")
            if host not in _LOOPBACK:
                raise ValueError("the stub serves loopback only (it gives full control of the guest)")
            self.token: str | None = token if token is not None else secrets.token_hex(16)
            self._listener = self._listen_tcp(host, port)
        else:
            self.token = token
            self._listener = self._listen_unix(path)
        self._conn: _Conn | None = None
        self._closed = False
        self._interrupt = threading.Event()
        self.target = Target(vcpu)
        self._gdb_features: set[str] = set()
        self._last_stop = "S05"
        self._warned_cpl3 = False
        self._running = False
        self._disconnected = False
        self._authed = False

    # -- listening ------------------------------------------------------------------------
    @staticmethod
    def _listen_tcp(host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if host == "::1" else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(1)
        except OSError:
            listener.close()
            raise
        return listener

    def _listen_unix(self, path: str | None) -> socket.socket:
        # Bind inside a directory only we can enter (0700), chmod the socket 0600, and
        # only then make it reachable: no moment at which another user could connect.
        if path is not None:
            path = os.path.abspath(os.fsdecode(path))
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "a file already exists there", path)
        private = tempfile.mkdtemp(prefix="pykvm-gdb-",
                                   dir=None if path is None else os.path.dirname(path))
        inner = os.path.join(private, "gdb.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(inner)
            os.chmod(inner, 0o600)
            listener.listen(1)
            if path is None:
                self._private_dir, self._path = private, inner
            else:
                os.link(inner, path)            # EEXIST if someone raced us there: never replaced
                os.unlink(inner)
                os.rmdir(private)
                self._path = path
            st = os.lstat(self._path)
            self._inode = (st.st_dev, st.st_ino)
        except BaseException:
            listener.close()
            for p in (inner,):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            try:
                os.rmdir(private)
            except OSError:
                pass
            raise
        return listener

    # -- public ----------------------------------------------------------------------------
    @property
    def path(self) -> str | None:
        """The UNIX socket's path (None when serving TCP)."""
        return self._path

    @property
    def port(self) -> int | None:
        """The TCP port (None when serving a UNIX socket)."""
        if self._path is not None:
            return None
        return int(self._listener.getsockname()[1])

    @property
    def address(self) -> str | tuple[str, int]:
        """The UNIX socket path, or ``(host, port)`` for TCP."""
        if self._path is not None:
            return self._path
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def gdb_commands(self) -> list[str]:
        """The gdb commands that connect to this stub (``gdb -ex CMD ...``)."""
        address = self.address
        where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
        cmds = ["set architecture i386:x86-64", f"target remote {where}"]
        if self.token is not None:
            cmds += [f"monitor auth {self.token}", "maintenance flush register-cache"]
        return cmds

    def close(self) -> None:
        """Stop serving: close the listener and any connection (serve() returns "closed")."""
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._remove_socket_file()
        conn = self._conn
        if conn is not None:
            conn.shutdown()
        if self._running:
            self._kick()

    def _remove_socket_file(self) -> None:
        path = self._path
        if path is None or self._inode is None:
            return
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == self._inode:   # only our own socket, never a newcomer
                os.unlink(path)
        except OSError:
            pass
        if self._private_dir is not None:
            try:
                os.rmdir(self._private_dir)
            except OSError:
                pass
        self._inode = None

    def __enter__(self) -> GdbStub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve(self, accept_timeout: float | None = None) -> SessionEnd:
        """Accept one gdb connection and serve it until detach, kill, guest exit or disconnect.

        Runs the vCPU in the calling thread.  On return the breakpoints are
        removed from guest memory and guest debugging is off.  Raises
        ``socket.timeout`` if nobody connects within *accept_timeout* seconds.
        A UNIX-socket peer of another uid (not root) is turned away unserved.
        """
        self._listener.settimeout(accept_timeout)
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._closed:
                    return SessionEnd("closed")
                raise
            if self._peer_allowed(sock):
                break
            sock.close()
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # During the session the reader turns further peers away; a non-blocking
        # accept there can never hang on a peer that vanished after select().
        self._listener.setblocking(False)
        self._disconnected = False
        self._authed = self.token is None
        self._interrupt.clear()
        self._conn = _Conn(sock, self._listener, self._on_ctrl_c, self._on_disconnect, self.log)
        try:
            return self._session()
        finally:
            try:
                self.target.cleanup()
            finally:
                self._conn.close()
                self._conn = None

    def _peer_allowed(self, sock: socket.socket) -> bool:
        if sock.family != socket.AF_UNIX:
            return True                           # TCP: the token decides
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid in (os.geteuid(), 0):
            return True
        self._note(f"refused a UNIX-socket peer with uid {uid}")
        return False

    # -- session ---------------------------------------------------------------------------
    def _kick(self) -> None:
        try:
            if not self.vcpu.closed:
                self.vcpu.kick()
        except KvmError:                          # closed meanwhile
            pass

    def _on_ctrl_c(self) -> None:
        if self._authed:                          # an unauthenticated peer cannot stop the guest
            self._interrupt.set()
            self._kick()

    def _on_disconnect(self) -> None:
        """gdb went away: stop a running guest so serve() can clean up and return."""
        self._disconnected = True
        if self._running:
            self._kick()

    def _session(self) -> SessionEnd:
        conn = self._conn
        assert conn is not None
        auth_deadline = time.monotonic() + AUTH_TIMEOUT
        while True:
            if self._authed:
                pkt = conn.packets.get()
            else:
                try:
                    pkt = conn.packets.get(timeout=max(0.0, auth_deadline - time.monotonic()))
                except queue.Empty:
                    self._note(f"no 'monitor auth' within {AUTH_TIMEOUT:g} s: closing")
                    return SessionEnd("refused")
            if pkt is None:
                return SessionEnd("closed" if self._closed else "disconnected")
            try:
                end = self._handle(pkt)
            except _OnExitFailed as e:
                raise e.original from None
            except TargetError as e:
                self._note(f"{pkt[:40]!r}: {e}")
                conn.send(f"E{e.code & 0xFF:02x}")
                continue
            except KvmError as e:                          # KVM refused (e.g. a bad CR value)
                self._note(f"{pkt[:40]!r}: {e}")
                conn.send(f"E{(e.errno or errno.EIO) & 0xFF:02x}")
                continue
            except (ValueError, IndexError, KeyError, TypeError, OverflowError) as e:
                self._note(f"{pkt[:40]!r}: malformed ({type(e).__name__}: {e})")
                conn.send(f"E{errno.EINVAL:02x}")
                continue
            except Exception as e:                         # a stub bug: never the host's problem
                self._note(f"{pkt[:40]!r}: internal error ({type(e).__name__}: {e})")
                conn.send(f"E{errno.EIO:02x}")
                continue
            if end is not None:
                return end

    def _handle(self, pkt: bytes) -> SessionEnd | None:
        conn = self._conn
        assert conn is not None
        if not self._authed and not pkt.startswith(_PRE_AUTH):
            raise TargetError(errno.EPERM, "not authenticated: monitor auth TOKEN")
        send = conn.send
        cmd = pkt[:1]
        target = self.target
        if pkt.startswith(b"qSupported"):
            feats = pkt.partition(b":")[2].decode("ascii", "replace").split(";")
            self._gdb_features = {f[:-1] for f in feats[:64] if f.endswith("+") and len(f) < 64}
            send(f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;swbreak+;hwbreak+;"
                 "QStartNoAckMode+")
        elif pkt == b"QStartNoAckMode":
            conn.ack = False                               # before the OK: gdb may answer at once
            send("OK")
        elif pkt.startswith(b"qXfer:features:read:"):
            annex, _, rng = pkt[len(b"qXfer:features:read:"):].partition(b":")
            if annex != b"target.xml":
                raise TargetError(errno.ENOENT)
            off, length = parse_addr_len(rng)
            data = TARGET_XML.encode()
            length = min(length, PACKET_SIZE // 2)
            part = data[off:off + length]
            send((b"l" if off + length >= len(data) else b"m") + protocol.escape(part))
        elif pkt.startswith(b"qRcmd,"):
            return self._monitor(pkt[len(b"qRcmd,"):])
        elif pkt == b"?":
            send(self._last_stop)
        elif pkt == b"qAttached" or pkt.startswith(b"qAttached:"):
            send("1")
        elif pkt == b"qC":
            send("QC1")
        elif pkt == b"qfThreadInfo":
            send("m1")
        elif pkt == b"qsThreadInfo":
            send("l")
        elif cmd == b"H" or cmd == b"T" or pkt.startswith(b"qSymbol"):
            send("OK")
        elif cmd == b"g":
            if not self._authed:
                send(b"00" * REGISTER_BYTES)               # zeros until authenticated
            else:
                send(b"".join(v.hex().encode() for v in target.registers.read_all()))
        elif cmd == b"G":
            target.registers.write_all(_unhex(pkt[1:]))
            send("OK")
        elif cmd == b"p":
            n = parse_hex(pkt[1:], "register number", len(REGISTERS) - 1)
            if not self._authed:
                send(b"00" * REGISTERS[n][1])
            else:
                send(target.registers.read_all()[n].hex())
        elif cmd == b"P":
            num, _, val = pkt[1:].partition(b"=")
            target.registers.write(parse_hex(num, "register number", len(REGISTERS) - 1), _unhex(val))
            send("OK")
        elif cmd == b"m":
            addr, length = parse_addr_len(pkt[1:])
            send(target.read_memory(addr, min(length, MAX_MEMORY_READ)).hex())
        elif cmd == b"M":
            head, sep, hexdata = pkt[1:].partition(b":")
            addr, length = parse_addr_len(head)
            data = _unhex(hexdata)
            if not sep or len(data) != length:
                raise TargetError(errno.EINVAL, "M length does not match its data")
            if length:
                target.write_memory(addr, data)
            send("OK")
        elif cmd == b"X":
            head, sep, raw = pkt[1:].partition(b":")
            addr, length = parse_addr_len(head)
            data = protocol.unescape(raw)
            if not sep or len(data) != length:
                raise TargetError(errno.EINVAL, "X length does not match its data")
            if length:
                target.write_memory(addr, data)
            send("OK")
        elif cmd in (b"Z", b"z"):
            fields = pkt[1:].split(b";")[0].split(b",")
            if len(fields) != 3:
                raise ProtocolError("expected Ztype,addr,kind")
            typ = parse_hex(fields[0], "breakpoint type", 4)
            addr = parse_hex(fields[1], "address")
            kind = parse_hex(fields[2], "kind", 0xFF)
            send("OK" if target.breakpoint(cmd == b"Z", typ, addr, kind) else "")
        elif cmd in (b"c", b"s", b"C", b"S"):
            arg = pkt[1:]
            if cmd in (b"C", b"S"):
                sig, _, arg = arg.partition(b";")      # the signal is not delivered
                parse_hex(sig, "signal", 0xFF)
            if arg:
                new_rip = parse_hex(arg, "address")
                r = self.vcpu.get_regs()
                r.rip = new_rip
                self.vcpu.set_regs(r)
            return self._resume(step=cmd in (b"s", b"S"))
        elif cmd == b"k":
            return SessionEnd("killed")
        elif pkt.startswith(b"vKill"):
            send("OK")
            return SessionEnd("killed")
        elif cmd == b"D":
            send("OK")
            return SessionEnd("detached")
        else:
            send("")                                       # unsupported: gdb falls back
        return None

    def _monitor(self, hexcmd: bytes) -> SessionEnd | None:
        """``monitor ...`` (``qRcmd``): ``auth TOKEN`` and ``help``."""
        conn = self._conn
        assert conn is not None
        words = _unhex(hexcmd).decode("ascii", "replace").split()
        if words[:1] == ["auth"] and len(words) == 2:
            if self.token is None:
                conn.send(_console("pykvm: this stub needs no token\n"))
                conn.send("OK")
                return None
            if hmac.compare_digest(words[1].encode(), self.token.encode()):
                self._authed = True
                conn.send(_console("pykvm: authenticated; 'maintenance flush register-cache' reads the registers\n"))
                conn.send("OK")
                return None
            self._note("wrong token: closing the connection")
            conn.send(f"E{errno.EACCES:02x}")
            return SessionEnd("refused")
        if words[:1] == ["help"]:
            conn.send(_console("pykvm gdb stub monitor commands:\n"
                               "  monitor auth TOKEN   unlock a TCP stub (a wrong token disconnects)\n"
                               "  monitor help         this text\n"))
            conn.send("OK")
            return None
        raise TargetError(errno.EINVAL, "unknown monitor command")

    def _note(self, text: str) -> None:
        if self.log:
            self.log(f"!! {text}")

    def _console(self, text: str) -> None:
        """Print *text* in gdb's console (an ``O`` packet; only valid while running)."""
        if self._conn is not None:
            self._conn.send(_console(text))

    # -- running ---------------------------------------------------------------------------------
    def _cpl(self) -> int:
        return int(self.vcpu.get_sregs().cs.selector & 3)

    def _resume(self, step: bool) -> SessionEnd | None:
        conn = self._conn
        assert conn is not None
        if self._cpl() == 3:
            sup = debug_support()
            if step and not sup.step_cpl3:
                self._console("pykvm: this host's KVM (PVM?) does not stop CPL3 code after a "
                              "single step; the step was not taken.\n")
                self._last_stop = "T05thread:1;"
                conn.send(self._last_stop)
                return None
            if self.target.has_sw_breakpoints and not sup.sw_bp_cpl3 and not self._warned_cpl3:
                self._warned_cpl3 = True
                self._console("pykvm: warning: this host's KVM does not intercept int3 in CPL3 "
                              "code; use hbreak there.\n")
        if not self._interrupt.is_set():
            self.vcpu.immediate_exit = False
        self.target.set_guest_debug(step)
        start_rip = self.vcpu.get_regs().rip
        self._running = True
        try:
            while True:
                if self._closed:
                    return SessionEnd("closed")
                if self._disconnected:
                    return SessionEnd("disconnected")
                ex = self.vcpu.run()
                stop = self._classify(ex, step, start_rip)
                if stop is _REINJECT:
                    # The guest's own int3, not ours: hand the #BP back to the guest
                    # (KVM kept the instruction length from the exit for the injection).
                    self.target.set_guest_debug(step, inject_bp=True)
                    continue
                if isinstance(stop, SessionEnd):
                    return stop
                if stop is not None:
                    self._last_stop = stop
                    conn.send(stop)
                    return None
        finally:
            self._running = False

    def _call_on_exit(self, ex: exits.Exit) -> Exited | Stop | None:
        try:
            return self.on_exit(ex)
        except BaseException as e:
            raise _OnExitFailed(e) from e

    def _classify(self, ex: exits.Exit, step: bool, start_rip: int) -> str | SessionEnd | None:
        """The stop reply for exit *ex*, None to keep running, :data:`_REINJECT`, or the end."""
        conn = self._conn
        assert conn is not None
        t = "thread:1;"
        swbreak = "swbreak:;" if "swbreak" in self._gdb_features else ""
        hwbreak = "hwbreak:;" if "hwbreak" in self._gdb_features else ""
        if isinstance(ex, exits.Debug):
            if ex.exception == 3:
                return f"T05{t}{swbreak}" if self._at_sw_bp(ex.pc) else _REINJECT
            for slot in range(4):
                hw = self.target.hw[slot]
                if ex.dr6 & (1 << slot) and hw is not None:
                    addr, typ, _ = hw
                    if typ == 1:
                        return f"T05{t}{hwbreak}"
                    return f"T05{t}{'watch' if typ == 2 else 'awatch'}:{addr:x};"
            return f"T05{t}"                               # single step (DR6.BS) or other #DB
        if isinstance(ex, exits.Interrupted):
            if self._closed:
                return SessionEnd("closed")
            if self._disconnected:
                return SessionEnd("disconnected")
            # gdb's Ctrl-C, or the host program kicked the vCPU (e.g. vcpu.kick_after):
            # either way the guest stops and gdb gets control.
            self._interrupt.clear()
            return f"T{SIGINT:02x}{t}"
        # PVM & co.: the instruction emulator cannot run int3; our breakpoint is what it hit.
        if (isinstance(ex, exits.InternalError) and ex.suberror == structs.KVM_INTERNAL_ERROR_EMULATION
                and self._at_sw_bp(self._linear_rip())):
            return f"T05{t}{swbreak}"
        result = self._call_on_exit(ex)
        if isinstance(result, Exited):
            conn.send(f"W{result.code & 0xFF:02x}")
            return SessionEnd("exited", result.code)
        if isinstance(result, Stop):
            return f"T{result.signal & 0xFF:02x}{t}"
        if step:
            # The exit came from the stepped instruction (e.g. an OUT).  Let KVM
            # finish it without running further (immediate_exit); on hosts that
            # deliver the step trap at completion that is a debug exit.
            self.vcpu.immediate_exit = True
            ex2 = self.vcpu.run()
            if isinstance(ex2, exits.Debug):
                return f"T05{t}"
            if not isinstance(ex2, exits.Interrupted):
                return self._classify(ex2, step, start_rip)
            if self.vcpu.get_regs().rip != start_rip:
                return f"T05{t}"
        return None

    def _linear_rip(self) -> int:
        return int(self.vcpu.get_sregs().cs.base + self.vcpu.get_regs().rip) & ((1 << 64) - 1)

    def _at_sw_bp(self, pc: int) -> bool:
        return self.target.at_sw_breakpoint(pc) or self.target.at_sw_breakpoint(self.vcpu.get_regs().rip)


def _unhex(field: bytes) -> bytes:
    """Hex digits to bytes (ProtocolError on anything else)."""
    try:
        return bytes.fromhex(field.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"not hex: {bytes(field[:20])!r}") from None


def _console(text: str) -> bytes:
    return b"O" + text.encode().hex().encode()
