"""Typed exits: what :meth:`Vcpu.run() <pykvm.vcpu.Vcpu.run>` returns.

Each class has ``reason`` (an :class:`~pykvm.uapi.enums.ExitReason`) and the
fields of its part of ``kvm_run``, decoded once.  Exits that need an answer
(``IoIn``, ``MmioRead``, ``X86Rdmsr``, ``Hypercall`` ...) write it into the run
page, where the kernel picks it up on the next ``run()``; they are valid only
until then.

Decoding is the hot path: one ``struct.unpack_from`` per exit, no dict or
enum lookups, and slotted classes.
"""

from __future__ import annotations

import struct
from typing import Dict, Tuple

from .uapi.enums import ExitReason as R

__all__ = [
    "Exit", "IoOut", "IoIn", "MmioWrite", "MmioRead", "Hlt", "Shutdown", "FailEntry",
    "InternalError", "SystemEvent", "Hypercall", "Debug", "Interrupted", "X86Rdmsr",
    "X86Wrmsr", "MemoryFault", "IrqWindowOpen", "IoapicEoi", "DirtyRingFull",
    "X86BusLock", "Notify", "TprAccess", "Exception_", "Unknown", "decode",
]

# Offsets in kvm_run (see pykvm.uapi.structs.kvm_run); the exit union starts at 32.
_U = 32
_io = struct.Struct("<BBHIQ")          # direction, size, port, count, data_offset
_mmio = struct.Struct("<Q8sIB")        # phys_addr, data[8], len, is_write
_q = struct.Struct("<Q")
_qi = struct.Struct("<QI")
_ii = struct.Struct("<II")
_internal = struct.Struct("<II16Q")
_emul = struct.Struct("<IIQB15s")
_sysev = struct.Struct("<II16Q")
_hcall = struct.Struct("<Q6QQQ")
_debug = struct.Struct("<IIQQQ")
_msr = struct.Struct("<B7xIIQ")
_fault = struct.Struct("<QQQ")
_tpr = struct.Struct("<QI")


def _fit(value: object, nbytes: int, what: str) -> int:
    """*value* as an unsigned *nbytes*-byte int; negative values as two's complement.

    Raises instead of silently truncating a value that does not fit.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    bits = 8 * nbytes
    if not -(1 << (bits - 1)) <= value < (1 << bits):
        raise ValueError(f"{what} {value:#x} does not fit in {nbytes} byte(s)")
    return value & ((1 << bits) - 1)


class Exit:
    """Base class of all exits."""

    __slots__ = ()
    reason: R = R.UNKNOWN

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={_fmt(getattr(self, k))}" for k in _public_slots(type(self)))
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, k) == getattr(other, k) for k in _public_slots(type(self)))

    __hash__ = None  # type: ignore[assignment]


def _public_slots(cls: type) -> Tuple[str, ...]:
    out = []
    for c in reversed(cls.__mro__):
        out.extend(s for s in getattr(c, "__slots__", ()) if not s.startswith("_"))
    return tuple(out)


def _fmt(v: object) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v > 9:
        return hex(v)
    if isinstance(v, memoryview):
        return repr(v.tobytes())
    return repr(v)


class IoOut(Exit):
    """``KVM_EXIT_IO``, direction out: the guest wrote *data* to *port*.

    ``data`` holds ``size * count`` bytes (``count`` > 1 for ``rep outs``).
    """

    __slots__ = ("port", "size", "count", "data")
    reason = R.IO

    def __init__(self, port: int, size: int, count: int, data: bytes) -> None:
        self.port, self.size, self.count, self.data = port, size, count, data


class IoIn(Exit):
    """``KVM_EXIT_IO``, direction in: the guest reads ``size * count`` bytes.

    Supply them before the next ``run()``: ``exit.data[:] = b"..."`` (a
    writable view of the PIO data page) or ``exit.set_data(b"...")`` /
    ``exit.set_data(int)``.
    """

    __slots__ = ("port", "size", "count", "data")
    reason = R.IO

    def __init__(self, port: int, size: int, count: int, data: memoryview) -> None:
        self.port, self.size, self.count, self.data = port, size, count, data

    def set_data(self, value) -> None:
        """Answer the read: bytes of length size*count, or an int (little endian)."""
        n = len(self.data)
        if isinstance(value, int):
            self.data[:] = _fit(value, n, f"IoIn value for port {self.port:#x}").to_bytes(n, "little")
        else:
            b = bytes(value)
            if len(b) != n:
                raise ValueError(f"IoIn on port {self.port:#x} wants {n} bytes, got {len(b)}")
            self.data[:] = b


class MmioWrite(Exit):
    """``KVM_EXIT_MMIO`` write: *data* (``len(data)`` bytes) to guest *address*."""

    __slots__ = ("address", "data")
    reason = R.MMIO

    def __init__(self, address: int, data: bytes) -> None:
        self.address, self.data = address, data


class MmioRead(Exit):
    """``KVM_EXIT_MMIO`` read of *length* bytes at *address*.

    Answer with ``exit.data[:] = ...`` (a writable view of ``kvm_run.mmio.data``)
    or ``exit.set_data(...)`` before the next ``run()``.
    """

    __slots__ = ("address", "length", "data")
    reason = R.MMIO

    def __init__(self, address: int, length: int, data: memoryview) -> None:
        self.address, self.length, self.data = address, length, data

    def set_data(self, value) -> None:
        """Answer the read: bytes of *length*, or an int (little endian)."""
        n = self.length
        if isinstance(value, int):
            self.data[:] = _fit(value, n, f"MmioRead value at {self.address:#x}").to_bytes(n, "little")
        else:
            b = bytes(value)
            if len(b) != n:
                raise ValueError(f"MmioRead at {self.address:#x} wants {n} bytes, got {len(b)}")
            self.data[:] = b


class _NoFields(Exit):
    __slots__ = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Hlt(_NoFields):
    """``KVM_EXIT_HLT``: the guest executed ``hlt`` (no in-kernel LAPIC)."""

    __slots__ = ()
    reason = R.HLT


class Shutdown(_NoFields):
    """``KVM_EXIT_SHUTDOWN``: triple fault (the guest is dead; reset it)."""

    __slots__ = ()
    reason = R.SHUTDOWN


class IrqWindowOpen(_NoFields):
    """``KVM_EXIT_IRQ_WINDOW_OPEN``: the guest can take an interrupt now."""

    __slots__ = ()
    reason = R.IRQ_WINDOW_OPEN


class DirtyRingFull(_NoFields):
    """``KVM_EXIT_DIRTY_RING_FULL``: harvest the dirty ring and reset it."""

    __slots__ = ()
    reason = R.DIRTY_RING_FULL


class X86BusLock(_NoFields):
    """``KVM_EXIT_X86_BUS_LOCK``: the guest took a bus lock."""

    __slots__ = ()
    reason = R.X86_BUS_LOCK


class Interrupted(_NoFields):
    """``KVM_RUN`` returned EINTR: a signal, ``kick()`` or ``immediate_exit``."""

    __slots__ = ()
    reason = R.INTR


class FailEntry(Exit):
    """``KVM_EXIT_FAIL_ENTRY``: the hardware refused to enter the guest."""

    __slots__ = ("hardware_entry_failure_reason", "cpu")
    reason = R.FAIL_ENTRY

    def __init__(self, hardware_entry_failure_reason: int, cpu: int) -> None:
        self.hardware_entry_failure_reason, self.cpu = hardware_entry_failure_reason, cpu


class InternalError(Exit):
    """``KVM_EXIT_INTERNAL_ERROR``: KVM could not go on (e.g. emulation failure).

    ``suberror`` is ``KVM_INTERNAL_ERROR_*`` (1 = emulation), ``data`` the
    ``ndata`` words KVM reported, ``insn_bytes`` the failing instruction's
    bytes when KVM supplied them (else ``b""``).
    """

    __slots__ = ("suberror", "data", "insn_bytes")
    reason = R.INTERNAL_ERROR

    def __init__(self, suberror: int, data: Tuple[int, ...], insn_bytes: bytes = b"") -> None:
        self.suberror, self.data, self.insn_bytes = suberror, data, insn_bytes

    @property
    def description(self) -> str:
        return {1: "emulation failure", 2: "simultaneous exceptions",
                3: "unexpected exit while delivering an event",
                4: "unexpected exit reason"}.get(self.suberror, f"suberror {self.suberror}")


class SystemEvent(Exit):
    """``KVM_EXIT_SYSTEM_EVENT``: ``type`` is ``KVM_SYSTEM_EVENT_*`` (1 shutdown, 2 reset, 3 crash...)."""

    __slots__ = ("type", "data")
    reason = R.SYSTEM_EVENT

    def __init__(self, type: int, data: Tuple[int, ...]) -> None:
        self.type, self.data = type, data


class Hypercall(Exit):
    """``KVM_EXIT_HYPERCALL`` (with ``KVM_CAP_EXIT_HYPERCALL``): set the result with ``set_ret``."""

    __slots__ = ("nr", "args", "flags", "_mm")
    reason = R.HYPERCALL

    def __init__(self, nr: int, args: Tuple[int, ...], flags: int, mm=None) -> None:
        self.nr, self.args, self.flags, self._mm = nr, args, flags, mm

    def set_ret(self, value: int) -> None:
        """Write ``hypercall.ret`` (the guest's RAX after the call)."""
        _q.pack_into(self._mm, _U + 56, _fit(value, 8, "hypercall result"))


class Debug(Exit):
    """``KVM_EXIT_DEBUG``: single step or breakpoint (``exception`` 1 = #DB, 3 = #BP)."""

    __slots__ = ("exception", "pc", "dr6", "dr7")
    reason = R.DEBUG

    def __init__(self, exception: int, pc: int, dr6: int, dr7: int) -> None:
        self.exception, self.pc, self.dr6, self.dr7 = exception, pc, dr6, dr7


class _MsrExit(Exit):
    __slots__ = ("index", "data", "msr_reason", "_mm")

    def __init__(self, index: int, data: int, msr_reason: int, mm=None) -> None:
        self.index, self.data, self.msr_reason, self._mm = index, data, msr_reason, mm

    def set_error(self, error: bool = True) -> None:
        """Make the guest's access fault with #GP (``msr.error = 1``)."""
        self._mm[_U] = 1 if error else 0


class X86Rdmsr(_MsrExit):
    """``KVM_EXIT_X86_RDMSR``: answer with ``set_data(value)`` or ``set_error()``."""

    __slots__ = ()
    reason = R.X86_RDMSR

    def set_data(self, value: int) -> None:
        """The value the guest's ``rdmsr`` returns."""
        self._mm[_U] = 0
        _q.pack_into(self._mm, _U + 16, _fit(value, 8, f"value of MSR {self.index:#x}"))


class X86Wrmsr(_MsrExit):
    """``KVM_EXIT_X86_WRMSR``: the guest wrote ``data``; ``set_error()`` to refuse."""

    __slots__ = ()
    reason = R.X86_WRMSR


class MemoryFault(Exit):
    """``KVM_EXIT_MEMORY_FAULT``: KVM could not resolve a guest access to [gpa, gpa+size)."""

    __slots__ = ("flags", "gpa", "size")
    reason = R.MEMORY_FAULT

    def __init__(self, flags: int, gpa: int, size: int) -> None:
        self.flags, self.gpa, self.size = flags, gpa, size


class IoapicEoi(Exit):
    """``KVM_EXIT_IOAPIC_EOI`` (split irqchip): the guest EOI'd ``vector``."""

    __slots__ = ("vector",)
    reason = R.IOAPIC_EOI

    def __init__(self, vector: int) -> None:
        self.vector = vector


class Notify(Exit):
    """``KVM_EXIT_NOTIFY``: the guest stayed in a non-interruptible window too long."""

    __slots__ = ("flags",)
    reason = R.NOTIFY

    def __init__(self, flags: int) -> None:
        self.flags = flags


class TprAccess(Exit):
    """``KVM_EXIT_TPR_ACCESS`` (TPR access reporting on)."""

    __slots__ = ("rip", "is_write")
    reason = R.TPR_ACCESS

    def __init__(self, rip: int, is_write: int) -> None:
        self.rip, self.is_write = rip, is_write


class Exception_(Exit):
    """``KVM_EXIT_EXCEPTION``: an exception KVM hands to user space."""

    __slots__ = ("exception", "error_code")
    reason = R.EXCEPTION

    def __init__(self, exception: int, error_code: int) -> None:
        self.exception, self.error_code = exception, error_code


class Unknown(Exit):
    """Any other exit: ``exit_reason`` as a number and the raw 256-byte union."""

    __slots__ = ("exit_reason", "raw")

    def __init__(self, exit_reason: int, raw: bytes) -> None:
        self.exit_reason, self.raw = exit_reason, raw

    @property
    def reason(self):  # type: ignore[override]
        try:
            return R(self.exit_reason)
        except ValueError:
            return self.exit_reason


# ---------------------------------------------------------------------------
# Decoders: f(mm, mv) -> Exit, where mm is the run mmap and mv a memoryview of it.

_HLT = Hlt()
_SHUTDOWN = Shutdown()
_IRQWIN = IrqWindowOpen()
_DRF = DirtyRingFull()
_BUSLOCK = X86BusLock()
INTERRUPTED = Interrupted()


# The hottest decoders build their objects without a Python-level __init__
# call (object.__new__ + slot stores): about 40 ns less per exit than calling
# the class (measured with benchmarks/, Python 3.11).
_new = object.__new__
_io_unpack = _io.unpack_from
_mmio_unpack = struct.Struct("<Q8xIB").unpack_from   # phys_addr, (data), len, is_write


def _d_io(mm, mv):
    direction, size, port, count, off = _io_unpack(mm, _U)
    if direction:
        e = _new(IoOut)
        e.data = mm[off:off + size * count]
    else:
        e = _new(IoIn)
        e.data = mv[off:off + size * count]
    e.port = port
    e.size = size
    e.count = count
    return e


def _d_mmio(mm, mv):
    addr, length, is_write = _mmio_unpack(mm, _U)
    if is_write:
        e = _new(MmioWrite)
        e.data = mm[_U + 8:_U + 8 + (length if length <= 8 else 8)]
    else:
        e = _new(MmioRead)
        e.length = length
        e.data = mv[_U + 8:_U + 8 + length]
    e.address = addr
    return e


def _d_internal(mm, mv):
    fields = _internal.unpack_from(mm, _U)
    sub, ndata = fields[0], min(fields[1], 16)
    insn = b""
    if sub == 1 and ndata >= 2:
        _, _, flags, size, raw = _emul.unpack_from(mm, _U)
        if flags & 1:
            insn = raw[:min(size, 15)]
    return InternalError(sub, fields[2:2 + ndata], insn)


def _d_sysev(mm, mv):
    fields = _sysev.unpack_from(mm, _U)
    n = fields[1] if fields[1] else 1  # older kernels: flags only
    return SystemEvent(fields[0], fields[2:2 + min(n, 16)])


def _d_hcall(mm, mv):
    f = _hcall.unpack_from(mm, _U)
    return Hypercall(f[0], f[1:7], f[8], mm)


def _d_debug(mm, mv):
    exc, _, pc, dr6, dr7 = _debug.unpack_from(mm, _U)
    return Debug(exc, pc, dr6, dr7)


def _d_rdmsr(mm, mv):
    _, reason, index, data = _msr.unpack_from(mm, _U)
    return X86Rdmsr(index, data, reason, mm)


def _d_wrmsr(mm, mv):
    _, reason, index, data = _msr.unpack_from(mm, _U)
    return X86Wrmsr(index, data, reason, mm)


def _d_fault(mm, mv):
    return MemoryFault(*_fault.unpack_from(mm, _U))


def _d_fail(mm, mv):
    return FailEntry(*_qi.unpack_from(mm, _U))


def _d_eoi(mm, mv):
    return IoapicEoi(mm[_U])


def _d_notify(mm, mv):
    return Notify(_ii.unpack_from(mm, _U)[0])


def _d_tpr(mm, mv):
    return TprAccess(*_tpr.unpack_from(mm, _U))


def _d_exc(mm, mv):
    return Exception_(*_ii.unpack_from(mm, _U))


def _const(obj):
    return lambda mm, mv: obj


def _unknown(mm, mv):
    return Unknown(_ii.unpack_from(mm, 8)[0], mm[_U:_U + 256])


DECODERS: Dict[int, object] = {
    R.IO: _d_io,
    R.MMIO: _d_mmio,
    R.HLT: _const(_HLT),
    R.SHUTDOWN: _const(_SHUTDOWN),
    R.IRQ_WINDOW_OPEN: _const(_IRQWIN),
    R.DIRTY_RING_FULL: _const(_DRF),
    R.X86_BUS_LOCK: _const(_BUSLOCK),
    R.INTR: _const(INTERRUPTED),
    R.FAIL_ENTRY: _d_fail,
    R.INTERNAL_ERROR: _d_internal,
    R.SYSTEM_EVENT: _d_sysev,
    R.HYPERCALL: _d_hcall,
    R.DEBUG: _d_debug,
    R.X86_RDMSR: _d_rdmsr,
    R.X86_WRMSR: _d_wrmsr,
    R.MEMORY_FAULT: _d_fault,
    R.IOAPIC_EOI: _d_eoi,
    R.NOTIFY: _d_notify,
    R.TPR_ACCESS: _d_tpr,
    R.EXCEPTION: _d_exc,
}
# A plain list indexed by exit reason: the hot path does one index, no hashing.
DECODE_TABLE = [DECODERS.get(i, _unknown) for i in range(64)]


def decode(mm, mv) -> Exit:
    """Decode the exit currently described by a run page (mmap + its memoryview)."""
    reason = _ii.unpack_from(mm, 8)[0]
    return (DECODE_TABLE[reason] if reason < 64 else _unknown)(mm, mv)
