"""A GDB remote-protocol stub for a pykvm vCPU (x86-64), served on loopback.

::

    from pykvm.gdbstub import GdbStub, Exited

    def on_exit(ex):                       # your device model, as in any run loop
        if isinstance(ex, pykvm.IoOut) and ex.port == 0x3F8:
            sys.stdout.buffer.write(ex.data)
            return None                     # handled: keep running
        if isinstance(ex, pykvm.Hlt):
            return Exited(0)                # the guest is done: gdb sees it exit

    with GdbStub(vcpu, port=1234, on_exit=on_exit) as stub:
        stub.serve()                        # blocks: one gdb session, running the vCPU

    $ gdb -ex 'set architecture i386:x86-64' -ex 'target remote 127.0.0.1:1234'

The thread that calls :meth:`GdbStub.serve` runs the vCPU whenever gdb
continues or steps it; gdb's Ctrl-C kicks it (``\\x03`` → :meth:`Vcpu.kick`).

What gdb gets
    * an x86-64 target description (``qXfer:features:read``): the
      ``org.gnu.gdb.i386.core``, ``.sse`` and ``.segments`` features plus
      ``org.pykvm.x86.system`` (cr0, cr2, cr3, cr4, cr8, efer);
    * registers ``g``/``G``/``p``/``P`` (GPRs, RIP, RFLAGS, selectors, x87,
      SSE, MXCSR, FS/GS base, control registers; selectors are read-only);
    * memory ``m``/``M``/``X`` at guest *virtual* addresses, translated through
      the guest's own page tables (4- and 5-level, PAE, 32-bit, or none) by
      :func:`translate`; software breakpoints are hidden from reads;
    * ``Z0`` software breakpoints (``int3`` + ``KVM_GUESTDBG_USE_SW_BP``),
      ``Z1`` hardware breakpoints and ``Z2``/``Z4`` watchpoints (debug
      registers + ``KVM_GUESTDBG_USE_HW_BP``, 4 slots), ``s`` single step
      (``KVM_GUESTDBG_SINGLESTEP``, interrupts blocked when the host allows),
      ``c`` continue, Ctrl-C, ``?``, ``k``, ``D``, ``QStartNoAckMode``.

Host quirks handled
    On hosts whose KVM emulates CPL0 code (PVM), ``int3`` ends in
    ``KVM_EXIT_INTERNAL_ERROR`` instead of a debug exit; the stub reports an
    emulation failure at one of its own breakpoints as that breakpoint.  PVM
    does not intercept ``int3``, single step or debug registers for CPL3 code
    at all: :func:`debug_support` finds this out once per process, and the
    stub refuses to single-step CPL3 code there (with a message in gdb)
    rather than let the guest take a #DB it never asked for.
"""

from __future__ import annotations

import dataclasses
import errno
import queue
import socket
import struct
import threading
from typing import Callable, Dict, List, Optional, Tuple, Union

from . import exits as X
from .errors import KvmError
from .uapi import structs as S
from .uapi.enums import Cap
from .vcpu import Vcpu

__all__ = ["GdbStub", "Exited", "Stop", "SessionEnd", "translate", "debug_support",
           "DebugSupport", "TARGET_XML"]

SIGINT, SIGILL, SIGTRAP, SIGSEGV = 2, 4, 5, 11   # gdb's signal numbers (include/gdb/signals.h)


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
    may run on without the debugger), ``"disconnected"`` or ``"closed"``.
    """

    reason: str
    exit_code: Optional[int] = None


def default_on_exit(ex: X.Exit) -> Union[None, Exited, Stop]:
    """Fallback device model: discard output, read all-ones, stop on anything odd."""
    if isinstance(ex, (X.IoOut, X.MmioWrite)):
        return None
    if isinstance(ex, X.IoIn):
        ex.set_data(b"\xff" * len(ex.data))
        return None
    if isinstance(ex, X.MmioRead):
        ex.set_data(b"\xff" * ex.length)
        return None
    if isinstance(ex, X.Hlt):
        return Exited(0)
    if isinstance(ex, X.SystemEvent) and ex.type in (S.KVM_SYSTEM_EVENT_SHUTDOWN, S.KVM_SYSTEM_EVENT_RESET):
        return Exited(0)
    if isinstance(ex, X.Shutdown):
        return Stop(SIGSEGV)
    if isinstance(ex, X.InternalError):
        return Stop(SIGILL)
    return Stop(SIGTRAP)


# ---------------------------------------------------------------------------
# the target description

def _xml_regs(names: List[str], bits: int, typ: str, group: str = "") -> str:
    g = f' group="{group}"' if group else ""
    return "".join(f'<reg name="{n}" bitsize="{bits}" type="{typ}"{g}/>' for n in names)


_EFLAGS = ["CF", "", "PF", None, "AF", None, "ZF", "SF", "TF", "IF", "DF", "OF", None, None, "NT",
           None, "RF", "VM", "AC", "VIF", "VIP", "ID"]
_MXCSR = ["IE", "DE", "ZE", "OE", "UE", "PE", "DAZ", "IM", "DM", "ZM", "OM", "UM", "PM", None, None, "FZ"]


def _flags(ident: str, names: List[Optional[str]]) -> str:
    fields = "".join(f'<field name="{n}" start="{i}" end="{i}"/>' for i, n in enumerate(names)
                     if n is not None)
    return f'<flags id="{ident}" size="4">{fields}</flags>'


_GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
_SEGS = ["cs", "ss", "ds", "es", "fs", "gs"]
_X87 = ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
_CRS = ["cr0", "cr2", "cr3", "cr4", "cr8", "efer"]

#: The target description served for ``qXfer:features:read:target.xml``.
TARGET_XML = (
    '<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
    '<target version="1.0"><architecture>i386:x86-64</architecture>'
    '<feature name="org.gnu.gdb.i386.core">' + _flags("i386_eflags", _EFLAGS)
    + _xml_regs(_GPRS[:6], 64, "int64") + _xml_regs(["rbp", "rsp"], 64, "data_ptr")
    + _xml_regs(_GPRS[8:], 64, "int64") + _xml_regs(["rip"], 64, "code_ptr")
    + _xml_regs(["eflags"], 32, "i386_eflags") + _xml_regs(_SEGS, 32, "int32")
    + _xml_regs([f"st{i}" for i in range(8)], 80, "i387_ext")
    + _xml_regs(_X87, 32, "int", "float") + '</feature>'
    '<feature name="org.gnu.gdb.i386.sse">'
    '<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/>'
    '<vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/>'
    '<vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/>'
    '<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>'
    '<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>'
    '<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>'
    '<field name="uint128" type="uint128"/></union>' + _flags("i386_mxcsr", _MXCSR)
    + _xml_regs([f"xmm{i}" for i in range(16)], 128, "vec128")
    + _xml_regs(["mxcsr"], 32, "i386_mxcsr", "vector") + '</feature>'
    '<feature name="org.gnu.gdb.i386.segments">' + _xml_regs(["fs_base", "gs_base"], 64, "int")
    + '</feature><feature name="org.pykvm.x86.system">'
    + _xml_regs(_CRS, 64, "int", "system") + '</feature></target>')

#: Register order of the ``g`` packet (= regnum): (name, size in bytes).
REGISTERS: List[Tuple[str, int]] = (
    [(n, 8) for n in _GPRS] + [("rip", 8), ("eflags", 4)] + [(n, 4) for n in _SEGS]
    + [(f"st{i}", 10) for i in range(8)] + [(n, 4) for n in _X87]
    + [(f"xmm{i}", 16) for i in range(16)] + [("mxcsr", 4), ("fs_base", 8), ("gs_base", 8)]
    + [(n, 8) for n in _CRS])
_REGNUM = {name: i for i, (name, _) in enumerate(REGISTERS)}


# ---------------------------------------------------------------------------
# guest virtual -> guest physical

_PHYS = 0x000F_FFFF_FFFF_F000


def translate(vcpu: Vcpu, vaddr: int, sregs: Optional[S.kvm_sregs] = None) -> Optional[int]:
    """Guest physical address of guest virtual *vaddr* under the vCPU's paging mode, or None.

    Walks the guest's page tables in guest memory (memory added with
    ``vm.add_memory``), like the CPU: no paging, 32-bit (4 MiB pages with
    PSE), PAE, 4-level and 5-level long mode (2 MiB / 1 GiB pages).
    Permissions are not checked (a debugger may read supervisor pages).
    """
    s = sregs if sregs is not None else vcpu.get_sregs()
    vm = vcpu.vm

    def entry(addr: int, size: int = 8) -> Optional[int]:
        try:
            return int.from_bytes(vm.read(addr, size), "little")
        except ValueError:
            return None

    if not s.cr0 & (1 << 31):                              # paging off
        return vaddr & 0xFFFFFFFF if not s.efer & (1 << 10) else vaddr
    if s.efer & (1 << 10):                                 # long mode (LMA)
        levels = 5 if s.cr4 & (1 << 12) else 4
        top = 12 + 9 * levels
        sign = vaddr >> (top - 1)
        if sign not in (0, (1 << (64 - top + 1)) - 1):
            return None                                    # not canonical
        table = s.cr3 & _PHYS
        for level in range(levels, 0, -1):
            shift = 12 + 9 * (level - 1)
            e = entry(table + ((vaddr >> shift) & 0x1FF) * 8)
            if e is None or not e & 1:
                return None
            if level in (2, 3) and e & 0x80:               # 2 MiB / 1 GiB page
                mask = (1 << shift) - 1
                return (e & _PHYS & ~mask) | (vaddr & mask)
            table = e & _PHYS
        return table | (vaddr & 0xFFF)
    vaddr &= 0xFFFFFFFF
    if s.cr4 & (1 << 5):                                   # PAE
        pdpte = entry((s.cr3 & 0xFFFFFFE0) + (vaddr >> 30) * 8)
        if pdpte is None or not pdpte & 1:
            return None
        pde = entry((pdpte & _PHYS) + ((vaddr >> 21) & 0x1FF) * 8)
        if pde is None or not pde & 1:
            return None
        if pde & 0x80:
            return (pde & _PHYS & ~0x1FFFFF) | (vaddr & 0x1FFFFF)
        pte = entry((pde & _PHYS) + ((vaddr >> 12) & 0x1FF) * 8)
        if pte is None or not pte & 1:
            return None
        return (pte & _PHYS) | (vaddr & 0xFFF)
    pde = entry((s.cr3 & 0xFFFFF000) + (vaddr >> 22) * 4, 4)  # 32-bit paging
    if pde is None or not pde & 1:
        return None
    if pde & 0x80 and s.cr4 & (1 << 4):                    # 4 MiB page (PSE-36 high bits)
        return (pde & 0xFFC00000) | ((pde >> 13) & 0xFF) << 32 | (vaddr & 0x3FFFFF)
    pte = entry((pde & 0xFFFFF000) + ((vaddr >> 12) & 0x3FF) * 4, 4)
    if pte is None or not pte & 1:
        return None
    return (pte & 0xFFFFF000) | (vaddr & 0xFFF)


def kvm_translate(vcpu: Vcpu, vaddr: int) -> Optional[int]:
    """The same question asked of KVM (``KVM_TRANSLATE``); None if not mapped."""
    t = vcpu.translate_gva(vaddr)
    return t.physical_address if t.valid else None


# ---------------------------------------------------------------------------
# what this host's KVM can do for a debugger

@dataclasses.dataclass(frozen=True)
class DebugSupport:
    """Which debug features reach user space on this host, by guest privilege level.

    ``step_cpl3``: ``KVM_GUESTDBG_SINGLESTEP`` stops CPL3 code with a debug
    exit; ``sw_bp_cpl3``: ``int3`` at CPL3 exits with ``KVM_GUESTDBG_USE_SW_BP``.
    Both are true on Intel VMX and AMD SVM; PVM delivers them to the guest.
    ``guest_debug_flags`` is ``KVM_CAP_SET_GUEST_DEBUG2`` (0 if unknown).
    """

    step_cpl3: bool
    sw_bp_cpl3: bool
    guest_debug_flags: int


_support: Optional[DebugSupport] = None
_support_lock = threading.Lock()

# CPL3 probe: int3 at 0x10000, then nops; an IDT-less guest shuts down if the #BP/#DB reaches it.
_PROBE_CODE = bytes([0xCC, 0x90, 0x90, 0x90, 0xEB, 0xFE])


def debug_support(kvm=None) -> DebugSupport:
    """Probe (once per process, a few ms) how this host's KVM handles guest debugging at CPL3."""
    global _support
    with _support_lock:
        if _support is not None:
            return _support
        from .system import Kvm

        own = kvm is None
        kvm = kvm or Kvm()
        try:
            flags = kvm.check_extension(Cap.SET_GUEST_DEBUG2)
            sw = _probe_cpl3(kvm, S.KVM_GUESTDBG_ENABLE | S.KVM_GUESTDBG_USE_SW_BP, rip_offset=0)
            step = _probe_cpl3(kvm, S.KVM_GUESTDBG_ENABLE | S.KVM_GUESTDBG_SINGLESTEP, rip_offset=1)
            _support = DebugSupport(step, sw, flags)
        finally:
            if own:
                kvm.close()
        return _support


def _probe_cpl3(kvm, control: int, rip_offset: int) -> bool:
    """Run the probe at CPL3 (starting *rip_offset* bytes in) under *control*: debug exit?"""
    with kvm.create_vm() as vm:
        mem = vm.add_memory(0, 0x200000)
        mem.write(0x1000, struct.pack("<Q", 0x2000 | 7))
        mem.write(0x2000, struct.pack("<Q", 0x3000 | 7))
        mem.write(0x3000, struct.pack("<Q", 0x87))
        mem.write(0x10000, _PROBE_CODE)
        vcpu = vm.create_vcpu()
        s = vcpu.get_sregs()
        s.cr3, s.cr4, s.cr0, s.efer = 0x1000, 0x20, 0x80000011, 0x500
        for name, sel, typ in (("cs", 0x1B, 11), ("ds", 0x23, 3), ("es", 0x23, 3),
                               ("fs", 0x23, 3), ("gs", 0x23, 3), ("ss", 0x23, 3)):
            sg = getattr(s, name)
            sg.base, sg.limit, sg.selector, sg.type = 0, 0xFFFFFFFF, sel, typ
            sg.present, sg.dpl, sg.s, sg.g = 1, 3, 1, 1
            sg.l, sg.db = (1, 0) if name == "cs" else (0, 1)
        vcpu.set_sregs(s)
        r = vcpu.get_regs()
        r.rip, r.rsp, r.rflags = 0x10000 + rip_offset, 0x8000, 0x2
        vcpu.set_regs(r)
        vcpu.set_guest_debug(S.kvm_guest_debug(control=control))
        timer = threading.Timer(2.0, vcpu.kick)
        timer.daemon = True
        timer.start()
        try:
            return isinstance(vcpu.run(), X.Debug)
        finally:
            timer.cancel()


# ---------------------------------------------------------------------------
# packet framing

def _checksum(data: bytes) -> bytes:
    return b"%02x" % (sum(data) & 0xFF)


def _escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in (0x23, 0x24, 0x7D, 0x2A):                 # # $ } *
            out += bytes([0x7D, b ^ 0x20])
        else:
            out.append(b)
    return bytes(out)


def _unescape(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        out.append(next(it) ^ 0x20 if b == 0x7D else b)
    return bytes(out)


class _Conn:
    """One gdb connection: a reader thread turns the byte stream into packets."""

    def __init__(self, sock: socket.socket, on_interrupt: Callable[[], None],
                 on_eof: Callable[[], None], log: Optional[Callable[[str], None]]) -> None:
        self.sock = sock
        self._on_eof = on_eof
        self.packets: "queue.Queue[Optional[bytes]]" = queue.Queue()
        self.ack = True
        self.last: bytes = b""
        self._on_interrupt = on_interrupt
        self._log = log
        self._send_lock = threading.Lock()
        self._thread = threading.Thread(target=self._reader, name="pykvm-gdbstub-reader", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        buf = bytearray()
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while buf:
                    c = buf[0]
                    if c == 0x03:                          # Ctrl-C
                        del buf[0]
                        self._on_interrupt()
                    elif c == 0x2B:                        # '+'
                        del buf[0]
                    elif c == 0x2D:                        # '-': resend
                        del buf[0]
                        self._raw_send(self.last)
                    elif c == 0x24:                        # '$'
                        end = buf.find(b"#")
                        if end < 0 or len(buf) < end + 3:
                            break                          # incomplete
                        body = bytes(buf[1:end])
                        cs = bytes(buf[end + 1:end + 3])
                        del buf[:end + 3]
                        if cs.lower() != _checksum(body):
                            if self.ack:
                                self._raw_send(b"-")
                            continue
                        if self.ack:
                            self._raw_send(b"+")
                        if self._log:
                            self._log(f"<- {body[:200]!r}")
                        self.packets.put(body)
                    else:
                        del buf[0]                         # noise
        except OSError:
            pass
        finally:
            self.packets.put(None)
            self._on_eof()

    def _raw_send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError:
                pass

    def send(self, payload: Union[str, bytes]) -> None:
        body = payload.encode() if isinstance(payload, str) else payload
        if self._log:
            self._log(f"-> {body[:200]!r}")
        self.last = b"$" + body + b"#" + _checksum(body)
        self._raw_send(self.last)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)


# ---------------------------------------------------------------------------
# the stub

class _Error(Exception):
    """A request gdb made that the stub answers with an error packet."""

    def __init__(self, code: int = errno.EINVAL, text: str = "") -> None:
        super().__init__(text or errno.errorcode.get(code, str(code)))
        self.code = code


_REINJECT = "reinject"                        # _classify: give the #BP back to the guest
_DR7_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
_DR7_RW = {1: 0b00, 2: 0b01, 4: 0b11}         # Z type -> R/W bits: exec, write, read/write


class GdbStub:
    """Serve the GDB remote protocol for *vcpu* on ``host:port`` (loopback by default).

    *port* 0 picks a free port (see :attr:`port`).  *on_exit(exit)* handles
    every exit that is not the debugger's (``IoOut``, ``MmioRead`` ...) like
    a run loop would: return None to resume the guest, :class:`Exited` when
    the guest has finished, :class:`Stop` to stop and report a signal to gdb
    (default: :func:`default_on_exit`).  *log* receives a packet trace.
    """

    def __init__(self, vcpu: Vcpu, *, host: str = "127.0.0.1", port: int = 0,
                 on_exit: Optional[Callable[[X.Exit], Union[None, Exited, Stop]]] = None,
                 log: Optional[Callable[[str], None]] = None) -> None:
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("the stub serves loopback only (it gives full control of the guest)")
        self.vcpu = vcpu
        self.on_exit = on_exit or default_on_exit
        self.log = log
        family = socket.AF_INET6 if host == "::1" else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(1)
        except OSError:
            self._listener.close()
            raise
        self._conn: Optional[_Conn] = None
        self._closed = False
        self._interrupt = threading.Event()
        self._sw_bps: Dict[int, Tuple[int, int]] = {}          # vaddr -> (gpa, original byte)
        self._hw: List[Optional[Tuple[int, int, int]]] = [None] * 4   # slot -> (addr, type, len)
        self._gdb_features: set = set()
        self._last_stop = "S05"
        self._warned_cpl3 = False
        self._xsave: Optional[bool] = None
        self._debug_flags: Optional[int] = None
        self._running = False
        self._disconnected = False

    # -- public --------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The TCP port the stub listens on."""
        return self._listener.getsockname()[1]

    @property
    def address(self) -> Tuple[str, int]:
        """``(host, port)`` for ``target remote host:port``."""
        return self._listener.getsockname()[:2]

    def close(self) -> None:
        """Stop serving: close the listener and any connection (serve() returns "closed")."""
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        conn = self._conn
        if conn is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._running and not self.vcpu.closed:
            self.vcpu.kick()

    def __enter__(self) -> "GdbStub":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve(self, accept_timeout: Optional[float] = None) -> SessionEnd:
        """Accept one gdb connection and serve it until detach, kill, guest exit or disconnect.

        Runs the vCPU in the calling thread.  On return the breakpoints are
        removed from guest memory and guest debugging is off.  Raises
        ``socket.timeout`` if nobody connects within *accept_timeout* seconds.
        """
        self._listener.settimeout(accept_timeout)
        try:
            sock, _ = self._listener.accept()
        except OSError:
            if self._closed:
                return SessionEnd("closed")
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._disconnected = False
        self._conn = _Conn(sock, self._on_ctrl_c, self._on_disconnect, self.log)
        try:
            return self._session()
        finally:
            try:
                self._cleanup()
            finally:
                self._conn.close()
                self._conn = None

    # -- session ---------------------------------------------------------------------------
    def _on_ctrl_c(self) -> None:
        self._interrupt.set()
        if not self.vcpu.closed:
            self.vcpu.kick()

    def _on_disconnect(self) -> None:
        """gdb went away: stop a running guest so serve() can clean up and return."""
        self._disconnected = True
        if self._running and not self.vcpu.closed:
            self.vcpu.kick()

    def _session(self) -> SessionEnd:
        conn = self._conn
        while True:
            pkt = conn.packets.get()
            if pkt is None:
                return SessionEnd("closed" if self._closed else "disconnected")
            try:
                end = self._handle(pkt)
            except _Error as e:
                self._note(f"{pkt[:40]!r}: {e}")
                conn.send(f"E{e.code & 0xFF:02x}")
                continue
            except KvmError as e:                          # KVM refused (e.g. a bad CR value)
                self._note(f"{pkt[:40]!r}: {e}")
                conn.send(f"E{(e.errno or errno.EIO) & 0xFF:02x}")
                continue
            except (ValueError, IndexError) as e:          # a malformed packet
                self._note(f"{pkt[:40]!r}: malformed ({e})")
                conn.send(f"E{errno.EINVAL:02x}")
                continue
            if end is not None:
                return end

    def _handle(self, pkt: bytes) -> Optional[SessionEnd]:
        conn = self._conn
        send = conn.send
        cmd = pkt[:1]
        if pkt.startswith(b"qSupported"):
            feats = pkt.partition(b":")[2].decode(errors="replace").split(";")
            self._gdb_features = {f[:-1] for f in feats if f.endswith("+")}
            send("PacketSize=4000;qXfer:features:read+;swbreak+;hwbreak+;QStartNoAckMode+")
        elif pkt == b"QStartNoAckMode":
            conn.ack = False                               # before the OK: gdb may answer at once
            send("OK")
        elif pkt.startswith(b"qXfer:features:read:"):
            annex, _, rng = pkt[len(b"qXfer:features:read:"):].partition(b":")
            if annex != b"target.xml":
                raise _Error(errno.ENOENT)
            off, length = (int(x, 16) for x in rng.split(b","))
            data = TARGET_XML.encode()
            part = data[off:off + length]
            send((b"l" if off + length >= len(data) else b"m") + _escape(part))
        elif pkt == b"?":
            send(self._last_stop)
        elif pkt in (b"qAttached",) or pkt.startswith(b"qAttached:"):
            send("1")
        elif pkt == b"qC":
            send("QC1")
        elif pkt == b"qfThreadInfo":
            send("m1")
        elif pkt == b"qsThreadInfo":
            send("l")
        elif cmd == b"H" or cmd == b"T":
            send("OK")
        elif pkt.startswith(b"qSymbol"):
            send("OK")
        elif cmd == b"g":
            send(b"".join(v.hex().encode() for v in self._read_regs()))
        elif cmd == b"G":
            self._write_regs(bytes.fromhex(pkt[1:].decode()))
            send("OK")
        elif cmd == b"p":
            n = int(pkt[1:], 16)
            regs = self._read_regs()
            if n >= len(regs):
                raise _Error(errno.EINVAL)
            send(regs[n].hex())
        elif cmd == b"P":
            n, _, val = pkt[1:].partition(b"=")
            self._write_reg(int(n, 16), bytes.fromhex(val.decode()))
            send("OK")
        elif cmd == b"m":
            addr, length = (int(x, 16) for x in pkt[1:].split(b","))
            data = self._read_mem(addr, min(length, 0x1000))
            send(data.hex())
        elif cmd == b"M":
            head, _, hexdata = pkt[1:].partition(b":")
            addr, length = (int(x, 16) for x in head.split(b","))
            data = bytes.fromhex(hexdata.decode())
            if len(data) != length:
                raise _Error(errno.EINVAL)
            self._write_mem(addr, data)
            send("OK")
        elif cmd == b"X":
            head, _, raw = pkt[1:].partition(b":")
            addr, length = (int(x, 16) for x in head.split(b","))
            data = _unescape(raw)
            if len(data) != length:
                raise _Error(errno.EINVAL)
            if length:
                self._write_mem(addr, data)
            send("OK")
        elif cmd in (b"Z", b"z"):
            typ, addr, kind = pkt[1:].split(b";")[0].split(b",")
            ok = self._breakpoint(cmd == b"Z", int(typ), int(addr, 16), int(kind, 16))
            send("OK" if ok else "")
        elif cmd in (b"c", b"s", b"C", b"S"):
            arg = pkt[1:]
            if cmd in (b"C", b"S"):
                arg = arg.partition(b";")[2]              # drop the signal: nothing to deliver
            if arg:
                r = self.vcpu.get_regs()
                r.rip = int(arg, 16)
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

    def _note(self, text: str) -> None:
        if self.log:
            self.log(f"!! {text}")

    def _console(self, text: str) -> None:
        """Print *text* in gdb's console (an ``O`` packet; only valid while running)."""
        if self._conn is not None:
            self._conn.send(b"O" + text.encode().hex().encode())

    # -- registers -----------------------------------------------------------------------------
    # The x87/SSE state is read and written as the 512-byte FXSAVE image at the start
    # of the XSAVE area: KVM_GET_FPU/KVM_SET_FPU leave MXCSR out (the kernel never
    # copies it), so they serve only hosts without KVM_CAP_XSAVE.
    def _get_fx(self) -> Tuple[bytearray, object]:
        v = self.vcpu
        if self._xsave is None:
            self._xsave = bool(v.vm.check_extension(Cap.XSAVE))
        if self._xsave:
            xs = v.get_xsave2() if v.vm.check_extension(Cap.XSAVE2) else v.get_xsave()
            return bytearray(memoryview(xs).cast("B")[:512]), xs
        f = v.get_fpu()
        fx = bytearray(512)
        struct.pack_into("<HHBxHQQ", fx, 0, f.fcw, f.fsw, f.ftwx, f.last_opcode, f.last_ip, f.last_dp)
        for i in range(8):
            fx[32 + 16 * i:48 + 16 * i] = bytes(f.fpr[i])
        for i in range(16):
            fx[160 + 16 * i:176 + 16 * i] = bytes(f.xmm[i])
        return fx, f

    def _set_fx(self, fx: bytearray, ctx: object) -> None:
        v = self.vcpu
        if isinstance(ctx, S.kvm_fpu):
            f = ctx
            f.fcw, f.fsw, f.ftwx, f.last_opcode, f.last_ip, f.last_dp = struct.unpack_from(
                "<HHBxHQQ", fx, 0)
            for i in range(8):
                f.fpr[i][:] = list(fx[32 + 16 * i:48 + 16 * i])
            for i in range(16):
                f.xmm[i][:] = list(fx[160 + 16 * i:176 + 16 * i])
            v.set_fpu(f)
            return
        raw = memoryview(ctx).cast("B")
        raw[:512] = fx
        # XSTATE_BV: mark x87 and SSE as in use, else XRSTOR would load their init state.
        (bv,) = struct.unpack_from("<Q", raw, 512)
        struct.pack_into("<Q", raw, 512, bv | 3)
        raw.release()
        v.set_xsave(ctx)

    def _read_regs(self) -> List[bytes]:
        v = self.vcpu
        r, s = v.get_regs(), v.get_sregs()
        fx, _ = self._get_fx()
        out = [getattr(r, n).to_bytes(8, "little") for n in _GPRS]
        out.append(r.rip.to_bytes(8, "little"))
        out.append((r.rflags & 0xFFFFFFFF).to_bytes(4, "little"))
        out += [getattr(s, n).selector.to_bytes(4, "little") for n in _SEGS]
        st = [bytes(fx[32 + 16 * i:42 + 16 * i]) for i in range(8)]
        out += st
        fcw, fsw, ftw, fop, ip, dp, mxcsr = struct.unpack_from("<HHBxHQQI", fx, 0)
        top = (fsw >> 11) & 7
        x87 = [fcw, fsw, _full_tag(ftw, st, top), (ip >> 32) & 0xFFFF, ip & 0xFFFFFFFF,
               (dp >> 32) & 0xFFFF, dp & 0xFFFFFFFF, fop]
        out += [x.to_bytes(4, "little") for x in x87]
        out += [bytes(fx[160 + 16 * i:176 + 16 * i]) for i in range(16)]
        out.append(mxcsr.to_bytes(4, "little"))
        out += [s.fs.base.to_bytes(8, "little"), s.gs.base.to_bytes(8, "little")]
        out += [getattr(s, n).to_bytes(8, "little") for n in _CRS]
        return out

    def _write_regs(self, blob: bytes) -> None:
        total = sum(size for _, size in REGISTERS)
        if len(blob) < total:
            raise _Error(errno.EINVAL)
        current = self._read_regs()
        pos = 0
        for n, (_, size) in enumerate(REGISTERS):
            value = blob[pos:pos + size]
            pos += size
            if value != current[n]:
                self._write_reg(n, value)

    def _write_reg(self, n: int, value: bytes) -> None:
        if not 0 <= n < len(REGISTERS) or len(value) != REGISTERS[n][1]:
            raise _Error(errno.EINVAL)
        name = REGISTERS[n][0]
        x = int.from_bytes(value, "little")
        v = self.vcpu
        if name in _GPRS or name in ("rip", "eflags"):
            r = v.get_regs()
            if name == "eflags":
                r.rflags = (r.rflags & ~0xFFFFFFFF) | x | 2
            else:
                setattr(r, name, x)
            v.set_regs(r)
        elif name in _SEGS:
            if x != getattr(v.get_sregs(), name).selector:
                raise _Error(errno.EPERM, "segment selectors are read-only")
        elif name in ("fs_base", "gs_base") or name in _CRS:
            s = v.get_sregs()
            if name in _CRS:
                setattr(s, name, x)
            else:
                getattr(s, name[:2]).base = x
            v.set_sregs(s)
        else:
            fx, ctx = self._get_fx()
            if name.startswith("st"):
                i = int(name[2:])
                fx[32 + 16 * i:42 + 16 * i] = value
            elif name.startswith("xmm"):
                i = int(name[3:])
                fx[160 + 16 * i:176 + 16 * i] = value
            elif name == "mxcsr":
                struct.pack_into("<I", fx, 24, x)
            elif name == "fctrl":
                struct.pack_into("<H", fx, 0, x & 0xFFFF)
            elif name == "fstat":
                struct.pack_into("<H", fx, 2, x & 0xFFFF)
            elif name == "ftag":                           # full tag word -> abridged
                fx[4] = sum(1 << i for i in range(8) if (x >> (2 * i)) & 3 != 3)
            elif name == "fop":
                struct.pack_into("<H", fx, 6, x & 0x7FF)
            else:                                          # fioff/fiseg/fooff/foseg
                pos = 8 if name in ("fioff", "fiseg") else 16
                (cur,) = struct.unpack_from("<Q", fx, pos)
                if name.endswith("off"):
                    cur = (cur & ~0xFFFFFFFF) | x
                else:
                    cur = (cur & 0xFFFFFFFF) | (x & 0xFFFF) << 32
                struct.pack_into("<Q", fx, pos, cur)
            self._set_fx(fx, ctx)

    # -- memory --------------------------------------------------------------------------------
    def _pages(self, addr: int, length: int):
        """(vaddr, gpa or None, n) per page of [addr, addr+length)."""
        sregs = self.vcpu.get_sregs()
        end = addr + length
        while addr < end:
            n = min(end, (addr | 0xFFF) + 1) - addr
            yield addr, translate(self.vcpu, addr, sregs), n
            addr += n

    def _read_mem(self, addr: int, length: int) -> bytes:
        out = bytearray()
        for va, gpa, n in self._pages(addr, length):
            try:
                if gpa is None:
                    raise ValueError
                out += self.vcpu.vm.read(gpa, n)
            except ValueError:
                if not out:
                    raise _Error(errno.EFAULT) from None
                break                                      # a partial read is allowed
        for va, (_, orig) in self._sw_bps.items():         # show the original bytes
            if addr <= va < addr + len(out):
                out[va - addr] = orig
        return bytes(out)

    def _write_mem(self, addr: int, data: bytes) -> None:
        data = bytearray(data)
        for va, (gpa, _) in list(self._sw_bps.items()):    # keep our int3 planted
            if addr <= va < addr + len(data):
                self._sw_bps[va] = (gpa, data[va - addr])
                data[va - addr] = 0xCC
        pages = list(self._pages(addr, len(data)))
        vm = self.vcpu.vm
        for _, gpa, n in pages:                            # all or nothing
            if gpa is None or not any(m.contains(gpa, n) for m in vm.memory):
                raise _Error(errno.EFAULT)
        pos = 0
        for _, gpa, n in pages:
            vm.write(gpa, bytes(data[pos:pos + n]))
            pos += n

    # -- breakpoints ------------------------------------------------------------------------------
    def _breakpoint(self, insert: bool, typ: int, addr: int, kind: int) -> bool:
        if typ == 0:
            if insert:
                if addr not in self._sw_bps:
                    gpa = translate(self.vcpu, addr)
                    if gpa is None:
                        raise _Error(errno.EFAULT)
                    try:
                        orig = self.vcpu.vm.read(gpa, 1)[0]
                        self.vcpu.vm.write(gpa, b"\xcc")
                    except ValueError:
                        raise _Error(errno.EFAULT) from None
                    self._sw_bps[addr] = (gpa, orig)
            else:
                bp = self._sw_bps.pop(addr, None)
                if bp is not None:
                    self.vcpu.vm.write(bp[0], bytes([bp[1]]))
            return True
        if typ in (1, 2, 4):
            length = 1 if typ == 1 else kind
            if length not in _DR7_LEN or addr % length:
                raise _Error(errno.EINVAL)
            key = (addr, typ, length)
            if insert:
                if key in self._hw:
                    return True
                try:
                    slot = self._hw.index(None)
                except ValueError:
                    raise _Error(errno.ENOSPC) from None        # 4 debug registers
                self._hw[slot] = key
            elif key in self._hw:
                self._hw[self._hw.index(key)] = None
            return True
        return False                                       # Z3 (read watchpoint): x86 cannot

    def _remove_all(self) -> None:
        for va, (gpa, orig) in list(self._sw_bps.items()):
            try:
                self.vcpu.vm.write(gpa, bytes([orig]))
            except ValueError:
                pass
        self._sw_bps.clear()
        self._hw = [None] * 4

    def _set_guest_debug(self, step: bool, inject_bp: bool = False) -> None:
        dbg = S.kvm_guest_debug()
        control = S.KVM_GUESTDBG_ENABLE
        if self._sw_bps:                                   # else a guest int3 stays the guest's
            control |= S.KVM_GUESTDBG_USE_SW_BP
        dr7 = 0x400
        for slot, hw in enumerate(self._hw):
            if hw is not None:
                addr, typ, length = hw
                dbg.arch.debugreg[slot] = addr
                dr7 |= (1 << (2 * slot)) | (_DR7_RW[typ] << (16 + 4 * slot)) \
                    | (_DR7_LEN[length] << (18 + 4 * slot))
        if dr7 != 0x400:
            control |= S.KVM_GUESTDBG_USE_HW_BP
            dbg.arch.debugreg[7] = dr7
        if step:
            control |= S.KVM_GUESTDBG_SINGLESTEP
            if self._debug_flags is None:
                try:
                    self._debug_flags = self.vcpu.vm.check_extension(Cap.SET_GUEST_DEBUG2)
                except KvmError:
                    self._debug_flags = 0
            if self._debug_flags & S.KVM_GUESTDBG_BLOCKIRQ:
                control |= S.KVM_GUESTDBG_BLOCKIRQ         # no stepping into IRQ handlers
        if inject_bp:
            control |= S.KVM_GUESTDBG_INJECT_BP
        dbg.control = control
        self.vcpu.set_guest_debug(dbg)

    def _cleanup(self) -> None:
        if self.vcpu.closed:
            return
        self._remove_all()
        try:
            self.vcpu.set_guest_debug(enable=False)
        except KvmError:
            pass
        self.vcpu.immediate_exit = False

    # -- running ---------------------------------------------------------------------------------
    def _cpl(self) -> int:
        return self.vcpu.get_sregs().cs.selector & 3

    def _resume(self, step: bool) -> Optional[SessionEnd]:
        if self._cpl() == 3:
            sup = debug_support()
            if step and not sup.step_cpl3:
                self._console("pykvm: this host's KVM (PVM?) does not stop CPL3 code after a "
                              "single step; the step was not taken.\n")
                self._last_stop = "T05thread:1;"
                self._conn.send(self._last_stop)
                return None
            if self._sw_bps and not sup.sw_bp_cpl3 and not self._warned_cpl3:
                self._warned_cpl3 = True
                self._console("pykvm: warning: this host's KVM does not intercept int3 in CPL3 "
                              "code; use hbreak there.\n")
        if not self._interrupt.is_set():
            self.vcpu.immediate_exit = False
        self._set_guest_debug(step)
        start_rip = self.vcpu.get_regs().rip
        self._running = True
        try:
            while True:
                if self._closed:
                    return SessionEnd("closed")
                ex = self.vcpu.run()
                stop = self._classify(ex, step, start_rip)
                if stop is _REINJECT:
                    # The guest's own int3, not ours: hand the #BP back to the guest
                    # (KVM kept the instruction length from the exit for the injection).
                    self._set_guest_debug(step, inject_bp=True)
                    continue
                if isinstance(stop, SessionEnd):
                    return stop
                if stop is not None:
                    self._last_stop = stop
                    self._conn.send(stop)
                    return None
        finally:
            self._running = False

    def _classify(self, ex: X.Exit, step: bool, start_rip: int) -> Union[None, str, SessionEnd]:
        """The stop reply for exit *ex*, None to keep running, :data:`_REINJECT`, or the end."""
        t = "thread:1;"
        swbreak = "swbreak:;" if "swbreak" in self._gdb_features else ""
        hwbreak = "hwbreak:;" if "hwbreak" in self._gdb_features else ""
        if isinstance(ex, X.Debug):
            if ex.exception == 3:
                return f"T05{t}{swbreak}" if self._at_sw_bp(ex.pc) else _REINJECT
            for slot in range(4):
                if ex.dr6 & (1 << slot) and self._hw[slot] is not None:
                    addr, typ, _ = self._hw[slot]
                    if typ == 1:
                        return f"T05{t}{hwbreak}"
                    return f"T05{t}{'watch' if typ == 2 else 'awatch'}:{addr:x};"
            return f"T05{t}"                               # single step (DR6.BS) or other #DB
        if isinstance(ex, X.Interrupted):
            if self._closed:
                return SessionEnd("closed")
            if self._disconnected:
                return SessionEnd("disconnected")
            self._interrupt.clear()
            return f"T{SIGINT:02x}{t}"
        if isinstance(ex, X.InternalError) and ex.suberror == S.KVM_INTERNAL_ERROR_EMULATION:
            # PVM & co.: the instruction emulator cannot run int3; our breakpoint is what it hit.
            if self._at_sw_bp(self._linear_rip()):
                return f"T05{t}{swbreak}"
        result = self.on_exit(ex)
        if isinstance(result, Exited):
            self._conn.send(f"W{result.code & 0xFF:02x}")
            return SessionEnd("exited", result.code)
        if isinstance(result, Stop):
            return f"T{result.signal & 0xFF:02x}{t}"
        if step:
            # The exit came from the stepped instruction (e.g. an OUT).  Let KVM
            # finish it without running further (immediate_exit); on hosts that
            # deliver the step trap at completion that is a debug exit.
            self.vcpu.immediate_exit = True
            ex2 = self.vcpu.run()
            if isinstance(ex2, X.Debug):
                return f"T05{t}"
            if not isinstance(ex2, X.Interrupted):
                return self._classify(ex2, step, start_rip)
            if self.vcpu.get_regs().rip != start_rip:
                return f"T05{t}"
        return None

    def _linear_rip(self) -> int:
        return self.vcpu.get_sregs().cs.base + self.vcpu.get_regs().rip

    def _at_sw_bp(self, pc: int) -> bool:
        return pc in self._sw_bps or self.vcpu.get_regs().rip in self._sw_bps


def _full_tag(abridged: int, st: List[bytes], top: int) -> int:
    """gdb's 16-bit x87 tag word from FXSAVE's abridged one (2 bits per physical register).

    *st* holds ST(0)..ST(7) (10 bytes each); physical register p is ST((p - top) mod 8).
    """
    tag = 0
    for phys in range(8):
        if not abridged >> phys & 1:
            t = 3                                          # empty
        else:
            raw = st[(phys - top) & 7]
            exp = int.from_bytes(raw[8:10], "little") & 0x7FFF
            mant = int.from_bytes(raw[:8], "little")
            if exp == 0x7FFF:
                t = 2                                      # special
            elif exp == 0:
                t = 1 if mant == 0 else 2                  # zero / denormal
            else:
                t = 0 if mant >> 63 else 2                 # valid / unnormal
        tag |= t << (2 * phys)
    return tag
