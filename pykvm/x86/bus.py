"""The port/MMIO bus and the run loop: dispatch exits to handlers by port and address range.

::

    loop = RunLoop(vcpu)
    loop.on_out(0xE9, lambda port, data: print(data.decode(), end=""))
    loop.on_in(0x60, lambda port, size: 0x1C)
    loop.on_mmio(0xD000_0000, 0x1000, read=dev.read, write=dev.write)
    stop = loop.run(timeout=5)          # until HLT, loop.stop(), or an error
    print(stop.reason, stop.value)

Handlers:

* port out: ``fn(port, data)`` — *data* is ``size * count`` bytes (``count``
  > 1 only for ``rep outs``);
* port in: ``fn(port, size) -> int | bytes`` — called once per element;
* MMIO write: ``fn(address, data)``; MMIO read: ``fn(address, length) -> int | bytes``;
* any other exit: ``on_exit(ExitReason.X, fn)`` with ``fn(exit)`` getting the
  typed exit from :mod:`pykvm.exits` (returning ``False`` declines it).

Handlers receive the address the guest used (port number, guest physical
address).  A handler ends the run with :meth:`RunLoop.stop` (which also works
from another thread).

The loop stops by itself on HLT (``reason == "hlt"``), and on trouble:
shutdown (triple fault), internal error, failed entry, an access nobody
handles (``strict=True``, the default), or the *timeout*.  Trouble raises
:class:`GuestError` whose message is a report of the vCPU state (registers,
mode, the bytes at RIP, the exit), unless ``run(check=False)``.

The hot path is one ``KVM_RUN``, one ``struct.unpack_from`` of the run page
and one dict lookup per exit (see ``examples/measure_runloop.py``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..exits import IO_LAYOUT, MMIO_DATA_OFFSET, MMIO_LAYOUT, Exit, decode, write_answer
from ..uapi.enums import ExitReason

__all__ = [
    "Bus",
    "GuestError",
    "InHandler",
    "MmioReadHandler",
    "MmioWriteHandler",
    "OutHandler",
    "PortSpec",
    "RunLoop",
    "RunResult",
    "UnhandledHook",
]

PortSpec = int | range | Iterable[int]
OutHandler = Callable[[int, bytes], Any]
InHandler = Callable[[int, int], int | bytes]
MmioReadHandler = Callable[[int, int], int | bytes]
MmioWriteHandler = Callable[[int, bytes], Any]
#: ``fn(kind, address, size, data)`` told of an access nobody handles (non-strict loops):
#: kind is ``"in"``, ``"out"``, ``"mmio-read"`` or ``"mmio-write"``; data is None for reads.
UnhandledHook = Callable[[str, int, int, bytes | None], Any]
#: ``(start, end, read, write)`` of one MMIO range
MmioEntry = tuple[int, int, MmioReadHandler | None, MmioWriteHandler | None]

_IO = int(ExitReason.IO)
_MMIO = int(ExitReason.MMIO)
_HLT = int(ExitReason.HLT)
_INTR = int(ExitReason.INTR)
_IO_AT = IO_LAYOUT.offset
_MMIO_AT = MMIO_LAYOUT.offset


def device_answer(value: int | bytes | bytearray | memoryview, size: int) -> int | bytes:
    """A device handler's read result as exactly *size* bytes' worth, the way a bus
    delivers it: an int keeps its low *size* bytes (a 1-byte read of a 4-byte
    register sees its low byte), bytes are cut or zero-padded to *size*.  The run
    page is then written by the one encoder, :func:`pykvm.exits.write_answer`."""
    if isinstance(value, int):
        return value & ((1 << (8 * size)) - 1)
    return bytes(value)[:size].ljust(size, b"\0")


_ERRORS = {
    int(ExitReason.SHUTDOWN): "shutdown",
    int(ExitReason.INTERNAL_ERROR): "internal-error",
    int(ExitReason.FAIL_ENTRY): "fail-entry",
    int(ExitReason.UNKNOWN): "unknown-exit",
}


def _no_bisect(starts: list[int], addr: int) -> int:
    return 0                                    # no MMIO range registered yet


def _decode(mm: Any) -> Exit:
    return decode(mm, memoryview(mm))


class GuestError(RuntimeError):
    """The guest stopped abnormally; ``str()`` is a report of the vCPU state, ``.stop`` the details."""

    def __init__(self, stop: RunResult) -> None:
        super().__init__(f"guest stopped: {stop.reason}\n{stop.report}")
        self.stop = stop


class RunResult:
    """Why :meth:`RunLoop.run` returned.

    ``reason`` is one of ``"hlt"``, ``"stopped"`` (``loop.stop()``), ``"timeout"``,
    ``"shutdown"``, ``"internal-error"``, ``"fail-entry"``, ``"unhandled-io"``,
    ``"unhandled-mmio"``, ``"unhandled-exit"``.  ``exit`` is the last exit (typed),
    ``value`` what was passed to ``stop()``, ``report`` a description of the vCPU
    (empty for normal stops).
    """

    __slots__ = ("reason", "exit", "value", "exits", "report")

    def __init__(self, reason: str, exit: Exit | None = None, value: Any = None,
                 exits: int = 0, report: str = "") -> None:
        self.reason, self.exit, self.value, self.exits, self.report = (
            reason, exit, value, exits, report)

    def __repr__(self) -> str:
        return (f"RunResult(reason={self.reason!r}, exit={self.exit!r}, value={self.value!r}, "
                f"exits={self.exits})")

    @property
    def ok(self) -> bool:
        """True for the normal ends: HLT and ``loop.stop()``."""
        return self.reason in ("hlt", "stopped")


class Bus:
    """Port and MMIO handler tables (share one between the run loops of several vCPUs).

    With *lock*, every handler runs holding it: the devices of a bus shared by
    several vCPU threads then see one access at a time.
    """

    def __init__(self, lock: Any | None = None) -> None:
        self.lock = lock
        self.outs: dict[int, OutHandler] = {}
        self.ins: dict[int, InHandler] = {}
        self._mmio: list[tuple[int, int, MmioReadHandler | None, MmioWriteHandler | None]] = []
        self._starts: list[int] = []
        self._bisect: Callable[[list[int], int], int] = _no_bisect

    @staticmethod
    def _ports(ports: PortSpec) -> Iterable[int]:
        if isinstance(ports, int):
            ports = (ports,)
        for p in ports:
            if not 0 <= p <= 0xFFFF:
                raise ValueError(f"port {p:#x} out of range")
            yield p

    def on_out(self, ports: PortSpec, fn: OutHandler) -> None:
        for p in self._ports(ports):
            self.outs[p] = fn

    def on_in(self, ports: PortSpec, fn: InHandler) -> None:
        for p in self._ports(ports):
            self.ins[p] = fn

    def on_io(self, ports: PortSpec, *, out: OutHandler | None = None,
              in_: InHandler | None = None) -> None:
        """Register an out and/or an in handler for *ports*."""
        if out is not None:
            self.on_out(ports, out)
        if in_ is not None:
            self.on_in(ports, in_)

    def add(self, device: Any) -> Any:
        """Attach a device object: calls ``device.attach(self)``; returns the device."""
        device.attach(self)
        return device

    def on_mmio(self, start: int, size: int, read: MmioReadHandler | None = None,
                write: MmioWriteHandler | None = None) -> None:
        end = start + size
        for s, e, _, _ in self._mmio:
            if start < e and s < end:
                raise ValueError(f"MMIO range [{start:#x}, {end:#x}) overlaps [{s:#x}, {e:#x})")
        if self._bisect is _no_bisect:
            from bisect import bisect_right  # only buses with MMIO ranges need it

            self._bisect = bisect_right
        self._mmio.append((start, end, read, write))
        self._mmio.sort(key=lambda t: t[0])
        self._starts = [t[0] for t in self._mmio]

    def dispatch(self, exit: Exit, unhandled: UnhandledHook | None = None) -> bool:
        """Handle a typed port or MMIO exit (``IoOut``, ``IoIn``, ``MmioWrite``, ``MmioRead``
        from :mod:`pykvm.exits`) with this bus's handlers; False for any other exit.

        For code that receives typed exits from elsewhere (a GDB stub's ``on_exit``);
        :class:`RunLoop` does the same from the raw run page.  Accesses nobody
        handles go to *unhandled*; their reads return all ones.
        """
        from ..exits import IoIn, IoOut, MmioRead, MmioWrite

        lock = self.lock if self.lock is not None else contextlib.nullcontext()
        if isinstance(exit, IoOut):
            h = self.outs.get(exit.port)
            if h is None:
                if unhandled is not None:
                    unhandled("out", exit.port, exit.size, bytes(exit.data))
            else:
                with lock:
                    h(exit.port, bytes(exit.data))
        elif isinstance(exit, IoIn):
            hin = self.ins.get(exit.port)
            if hin is None:
                if unhandled is not None:
                    unhandled("in", exit.port, exit.size, None)
                exit.set_data(b"\xff" * len(exit.data))
            else:
                out = bytearray()
                with lock:
                    for _ in range(exit.count):
                        v = device_answer(hin(exit.port, exit.size), exit.size)
                        out += v.to_bytes(exit.size, "little") if isinstance(v, int) else v
                exit.set_data(bytes(out))
        elif isinstance(exit, (MmioRead, MmioWrite)):
            t = self.find_mmio(exit.address)
            if isinstance(exit, MmioWrite):
                wfn = None if t is None else t[3]
                if wfn is None:
                    if unhandled is not None:
                        unhandled("mmio-write", exit.address, len(exit.data), bytes(exit.data))
                else:
                    with lock:
                        wfn(exit.address, bytes(exit.data))
                return True
            rfn = None if t is None else t[2]
            if rfn is None:
                if unhandled is not None:
                    unhandled("mmio-read", exit.address, exit.length, None)
                exit.set_data(b"\xff" * exit.length)
            else:
                with lock:
                    v = rfn(exit.address, exit.length)
                exit.set_data(device_answer(v, exit.length))
        else:
            return False
        return True

    def find_mmio(self, addr: int) -> MmioEntry | None:
        """The ``(start, end, read, write)`` entry holding *addr*, or None."""
        i = self._bisect(self._starts, addr) - 1
        if i >= 0:
            t = self._mmio[i]
            if addr < t[1]:
                return t
        return None


class RunLoop:
    """Run one vCPU, dispatching its exits (see the module documentation).

    *bus* shares handler tables between vCPUs; *strict* (default) stops on
    port or MMIO accesses nobody handles, else writes are dropped and reads
    return all-ones bits (like an empty ISA bus), and *on_unhandled* (if
    given) is told of each such access.
    """

    def __init__(self, vcpu: Any, bus: Bus | None = None, *, strict: bool = True,
                 on_unhandled: UnhandledHook | None = None) -> None:
        self.vcpu = vcpu
        self.bus = bus if bus is not None else Bus()
        self.strict = strict
        self.on_unhandled = on_unhandled
        self.exit_handlers: dict[int, Callable[[Exit], Any]] = {}
        self._stopping = False
        self._stop_value: Any = None
        self._timed_out = False
        self._deadline: float | None = None
        self._thread: int | None = None
        self.exits = 0  #: exits handled by the last run()

    # -- registration ---------------------------------------------------------
    def on_out(self, ports: PortSpec, fn: OutHandler | None = None) -> Any:
        """Handle ``out`` to *ports* with ``fn(port, data)`` (usable as a decorator)."""
        if fn is None:
            def register(f: OutHandler) -> OutHandler:
                self.bus.on_out(ports, f)
                return f
            return register
        self.bus.on_out(ports, fn)
        return fn

    def on_in(self, ports: PortSpec, fn: InHandler | None = None) -> Any:
        """Handle ``in`` from *ports* with ``fn(port, size) -> int | bytes`` (usable as a decorator)."""
        if fn is None:
            def register(f: InHandler) -> InHandler:
                self.bus.on_in(ports, f)
                return f
            return register
        self.bus.on_in(ports, fn)
        return fn

    def on_io(self, ports: PortSpec, *, out: OutHandler | None = None,
              in_: InHandler | None = None) -> None:
        """Register an out and/or an in handler for *ports*."""
        if out is not None:
            self.bus.on_out(ports, out)
        if in_ is not None:
            self.bus.on_in(ports, in_)

    def on_mmio(self, start: int, size: int, *, read: MmioReadHandler | None = None,
                write: MmioWriteHandler | None = None) -> None:
        """Handle guest accesses to ``[start, start+size)`` that reach user space.

        Only addresses without guest RAM (no memslot) exit to user space.
        """
        self.bus.on_mmio(start, size, read, write)

    def on_exit(self, reason: int, fn: Callable[[Exit], Any]) -> None:
        """Handle another kind of exit (``ExitReason.DEBUG``...) with ``fn(typed_exit)``.

        The handler may return ``False`` to decline: the exit is then treated as
        if no handler existed (an error stop for shutdown, internal error...).
        """
        self.exit_handlers[int(reason)] = fn

    def add(self, device: Any) -> Any:
        """Attach a device object: calls ``device.attach(self)``; returns the device."""
        device.attach(self)
        return device

    # -- stopping -----------------------------------------------------------------
    def stop(self, value: Any = None) -> None:
        """End the current :meth:`run` (returns ``RunResult("stopped", value=value)``).

        From a handler it takes effect when the handler returns; from another
        thread it kicks the vCPU out of ``KVM_RUN``.  A stop requested while no
        ``run()`` is in progress is forgotten when the next ``run()`` starts
        (use ``run(timeout=...)`` to bound a run from the start).
        """
        self._stop_value = value
        self._stopping = True
        if self._thread is not None and self._thread != threading.get_ident():
            self.vcpu.kick()

    # -- running --------------------------------------------------------------------
    def run(self, timeout: float | None = None, *, check: bool = True) -> RunResult:
        """Run until HLT, :meth:`stop`, an error or *timeout* seconds; return a :class:`RunResult`.

        With *check* (default), abnormal stops raise :class:`GuestError`.
        """
        self._stopping = False
        self._timed_out = False
        self._stop_value = None
        self._thread = threading.get_ident()
        watchdog = None
        self._deadline = None
        if timeout is not None:
            # The watchdog's kick ends KVM_RUN with an INTR exit; the deadline tells
            # that exit from other kicks (a Timer never fires before its interval).
            self._deadline = time.monotonic() + timeout
            watchdog = self.vcpu.kick_after(timeout)
        try:
            stop = self._loop()
        finally:
            self._thread = None
            if watchdog is not None:
                watchdog.cancel()
        if not stop.ok:
            from .report import describe_vcpu  # only when a guest died: keeps start-up light

            stop.report = describe_vcpu(self.vcpu, stop.exit)
            if check:
                raise GuestError(stop)
        return stop

    def _loop(self) -> RunResult:
        vcpu = self.vcpu
        run = vcpu.run_raw
        mm = vcpu.run_mmap
        io_unpack = IO_LAYOUT.format.unpack_from
        mmio_unpack = MMIO_LAYOUT.format.unpack_from
        outs = self.bus.outs
        ins = self.bus.ins
        bus = self.bus
        lock = bus.lock if bus.lock is not None else contextlib.nullcontext()
        unhandled = self.on_unhandled
        strict = self.strict
        n = 0
        try:
            while True:
                reason = run()
                n += 1
                if reason == _IO:
                    direction, size, port, count, off = io_unpack(mm, _IO_AT)
                    if direction:
                        h = outs.get(port)
                        if h is None:
                            if strict:
                                return RunResult("unhandled-io", _decode(mm), exits=n)
                            if unhandled is not None:
                                unhandled("out", port, size, bytes(mm[off:off + size * count]))
                        else:
                            with lock:
                                h(port, mm[off:off + size * count])
                    else:
                        hin = ins.get(port)
                        if hin is None:
                            if strict:
                                return RunResult("unhandled-io", _decode(mm), exits=n)
                            if unhandled is not None:
                                unhandled("in", port, size, None)
                            mm[off:off + size * count] = b"\xff" * (size * count)
                        else:
                            with lock:
                                for k in range(count):
                                    write_answer(mm, off + k * size, size,
                                                 device_answer(hin(port, size), size), "in")
                    if self._stopping:
                        return self._stopped(mm, n)
                elif reason == _MMIO:
                    addr, data, length, is_write = mmio_unpack(mm, _MMIO_AT)
                    length = min(length, 8)
                    t = bus.find_mmio(addr)
                    fn = None if t is None else (t[3] if is_write else t[2])
                    if fn is None:
                        if strict:
                            return RunResult("unhandled-mmio", _decode(mm), exits=n)
                        if unhandled is not None:
                            unhandled("mmio-write" if is_write else "mmio-read", addr, length,
                                      data[:length] if is_write else None)
                        if not is_write:
                            write_answer(mm, MMIO_DATA_OFFSET, length, b"\xff" * length, "mmio read")
                    elif is_write:
                        with lock:
                            fn(addr, data[:length])
                    else:
                        with lock:
                            v = fn(addr, length)
                        write_answer(mm, MMIO_DATA_OFFSET, length, device_answer(v, length), "mmio read")
                    if self._stopping:
                        return self._stopped(mm, n)
                elif reason == _INTR:
                    if (not self._stopping and self._deadline is not None
                            and time.monotonic() >= self._deadline):
                        self._timed_out = self._stopping = True
                    if self._stopping:
                        return self._stopped(mm, n)
                elif reason == _HLT and _HLT not in self.exit_handlers:
                    return RunResult("hlt", _decode(mm), exits=n)
                else:
                    ex = _decode(mm)
                    hx = self.exit_handlers.get(reason)
                    if hx is not None and hx(ex) is not False:
                        if self._stopping:
                            return self._stopped(mm, n, ex)
                        continue
                    return RunResult(_ERRORS.get(reason, "unhandled-exit"), ex, exits=n)
        finally:
            self.exits = n

    def _stopped(self, mm: Any, n: int, ex: Exit | None = None) -> RunResult:
        if ex is None:
            ex = _decode(mm)
        if self._timed_out:
            return RunResult("timeout", ex, exits=n)
        return RunResult("stopped", ex, self._stop_value, exits=n)
