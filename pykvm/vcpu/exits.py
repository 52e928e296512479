"""Typed exits, the one ``kvm_run`` exit layout table and the one answer encoder.

:meth:`Vcpu.run() <pykvm.vcpu.Vcpu.run>` returns one of these classes.  Each
has ``reason`` (an :class:`~pykvm.uapi.enums.ExitReason`) and the fields of
its member of the ``kvm_run`` exit union, decoded once, under the run lock.
Exits that need an answer (``IoIn``, ``MmioRead``, ``X86Rdmsr``,
``Hypercall``, ``HypervHcall``, ``XenHcall``, ``Tdx``, ``SnpReqCerts`` ...)
write it into the run page, where KVM picks it up on the next ``KVM_RUN``.

Validity rule: an exit describes the run page as KVM left it; its answer
methods and its writable ``data`` views write into that page.  Use them before
the next ``run()`` of the same vCPU (KVM reads the answer then, and the next
exit overwrites the page).  The decoded fields are plain values and stay
readable afterwards; ``copy.copy(exit)`` is not needed for that.

:data:`LAYOUTS` is the one description of the exit union (offsets are
absolute in the run page, read from the newest ``include/uapi/linux/kvm.h``,
Linux 7.3): tools that read the run page themselves (run loops, the VMM) use
it and :func:`write_answer` instead of their own ``struct`` formats.

Decoding is the hot path: one ``struct.unpack_from`` per exit, no dict or
enum lookups, slotted classes.
"""

from __future__ import annotations

import errno
import struct
from typing import Dict, NamedTuple, Optional, Tuple, Union

from ..uapi.enums import ExitReason as R

__all__ = [
    "Exit", "IoOut", "IoIn", "MmioWrite", "MmioRead", "Hlt", "Shutdown", "FailEntry",
    "InternalError", "SystemEvent", "Hypercall", "Debug", "Interrupted", "X86Rdmsr",
    "X86Wrmsr", "MemoryFault", "IrqWindowOpen", "IoapicEoi", "DirtyRingFull",
    "X86BusLock", "Notify", "TprAccess", "Exception_", "Unknown", "SetTpr", "Nmi",
    "Hyperv", "HypervSynic", "HypervHcall", "HypervSyndbg", "ApResetHold", "Xen", "XenHcall",
    "Tdx", "SnpReqCerts", "decode", "Layout", "LAYOUTS", "EXIT_UNION_OFFSET",
    "EXIT_UNION_SIZE", "IO_LAYOUT", "MMIO_LAYOUT", "MMIO_DATA_OFFSET", "encode_int",
    "write_answer",
]

#: Offset of the exit union in ``struct kvm_run`` (after exit_reason, flags, cr8, apic_base).
EXIT_UNION_OFFSET = 32
#: Size of the exit union (``char padding[256]`` fixes it).
EXIT_UNION_SIZE = 256
_U = EXIT_UNION_OFFSET


class Layout(NamedTuple):
    """One member of the ``kvm_run`` exit union: where it is and how to read it."""

    member: str                 #: the member's name in ``struct kvm_run``
    offset: int                 #: absolute offset in the run page
    format: struct.Struct       #: little-endian layout of the fields below
    fields: Tuple[str, ...]     #: field names in order (``_`` = padding, ``name[n]`` = array)

    def unpack(self, buf: object) -> Tuple[object, ...]:
        """The fields of this member read from *buf* (the run page)."""
        return self.format.unpack_from(buf, self.offset)  # type: ignore[arg-type]


def _l(member: str, fmt: str, *fields: str, at: int = 0) -> Layout:
    return Layout(member, _U + at, struct.Struct("<" + fmt), fields)


#: The exit union, member by member (Linux 7.3 ``include/uapi/linux/kvm.h``).  The
#: only copy in pykvm: pykvm.uapi.structs.kvm_run gives the same offsets as ctypes.
LAYOUTS: Dict[str, Layout] = {layout.member: layout for layout in (
    _l("hw", "Q", "hardware_exit_reason"),
    _l("fail_entry", "QI", "hardware_entry_failure_reason", "cpu"),
    _l("ex", "II", "exception", "error_code"),
    _l("io", "BBHIQ", "direction", "size", "port", "count", "data_offset"),
    _l("debug", "IIQQQ", "exception", "pad", "pc", "dr6", "dr7"),
    _l("mmio", "Q8sIB", "phys_addr", "data[8]", "len", "is_write"),
    _l("hypercall", "Q6QQQ", "nr", "args[6]", "ret", "flags"),
    _l("tpr_access", "QII", "rip", "is_write", "pad"),
    _l("internal", "II16Q", "suberror", "ndata", "data[16]"),
    _l("emulation_failure", "IIQB15s", "suberror", "ndata", "flags", "insn_size", "insn_bytes[15]"),
    _l("system_event", "II16Q", "type", "ndata", "data[16]"),
    _l("eoi", "B", "vector"),
    _l("hyperv", "II", "type", "pad1"),
    _l("hyperv.synic", "IIQQQ", "msr", "pad2", "control", "evt_page", "msg_page", at=8),
    _l("hyperv.hcall", "QQ2Q", "input", "result", "params[2]", at=8),
    _l("hyperv.syndbg", "IIQQQQQ", "msr", "pad2", "control", "status", "send_page",
       "recv_page", "pending_page", at=8),
    _l("msr", "B7xIIQ", "error", "reason", "index", "data"),
    _l("xen", "I", "type"),
    _l("xen.hcall", "IIQQ6Q", "longmode", "cpl", "input", "result", "params[6]", at=8),
    _l("notify", "I", "flags"),
    _l("memory_fault", "QQQ", "flags", "gpa", "size"),
    _l("tdx", "QQQ5Q", "flags", "nr", "ret", "data[5]"),
    _l("snp_req_certs", "QQQ", "gpa", "npages", "ret"),
)}

IO_LAYOUT = LAYOUTS["io"]
MMIO_LAYOUT = LAYOUTS["mmio"]
#: Where ``kvm_run.mmio.data`` (the 8 bytes of an MMIO access) starts.
MMIO_DATA_OFFSET = _U + 8


def _field(member: str, name: str) -> int:
    """Absolute offset of *name* in *member* (computed from the layout, not counted by hand)."""
    layout = LAYOUTS[member]
    fmt = "<"
    for code, field in zip(_codes(layout.format.format[1:]), layout.fields):
        if field == name:
            return layout.offset + struct.calcsize(fmt)
        fmt += code
    raise KeyError(f"{member}.{name}")


def _codes(fmt: str):
    """Split a struct format into one code per field; padding (``7x``) joins the field before it."""
    codes: list = []
    i = 0
    while i < len(fmt):
        j = i
        while fmt[j].isdigit():
            j += 1
        if fmt[j] == "x" and codes:
            codes[-1] += fmt[i:j + 1]
        else:
            codes.append(fmt[i:j + 1])
        i = j + 1
    return codes


def encode_int(value: object, nbytes: int, what: str) -> int:
    """*value* as an unsigned *nbytes*-byte int; negative values as two's complement.

    The one overflow rule for answers: raises ``ValueError`` instead of silently
    truncating a value that does not fit, ``TypeError`` for a non-int.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    bits = 8 * nbytes
    if not -(1 << (bits - 1)) <= value < (1 << bits):
        raise ValueError(f"{what} {value:#x} does not fit in {nbytes} byte(s)")
    return value & ((1 << bits) - 1)


_fit = encode_int


def write_answer(buf: object, offset: int, size: int, value: Union[int, bytes, bytearray, memoryview],
                 what: str) -> None:
    """The one answer encoder: write *value* as exactly *size* bytes at *offset* of *buf*.

    *value* is an int (little endian; -1 means all ones) or exactly *size*
    bytes.  A value that does not fit raises ``ValueError``, never truncates.
    *buf* is the run page (``vcpu.run_mmap``) or a view of it; *offset* is a
    PIO data offset (``io.data_offset + k * size``) or :data:`MMIO_DATA_OFFSET`.
    """
    if isinstance(value, int):
        data = encode_int(value, size, what).to_bytes(size, "little")
    else:
        data = bytes(value)
        if len(data) != size:
            raise ValueError(f"{what} wants {size} bytes, got {len(data)}")
    buf[offset:offset + size] = data  # type: ignore[index]


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
        _q.pack_into(self._mm, _HCALL_RET, _fit(value, 8, "hypercall result"))


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
        self._mm[_MSR_ERROR] = 1 if error else 0


class X86Rdmsr(_MsrExit):
    """``KVM_EXIT_X86_RDMSR``: answer with ``set_data(value)`` or ``set_error()``."""

    __slots__ = ()
    reason = R.X86_RDMSR

    def set_data(self, value: int) -> None:
        """The value the guest's ``rdmsr`` returns."""
        self._mm[_MSR_ERROR] = 0
        _q.pack_into(self._mm, _MSR_DATA, _fit(value, 8, f"value of MSR {self.index:#x}"))


class X86Wrmsr(_MsrExit):
    """``KVM_EXIT_X86_WRMSR``: the guest wrote ``data``; ``set_error()`` to refuse."""

    __slots__ = ()
    reason = R.X86_WRMSR


class MemoryFault(Exit):
    """``KVM_EXIT_MEMORY_FAULT``: KVM could not resolve a guest access to [gpa, gpa+size).

    KVM reports it as a *failed* ``KVM_RUN`` (EFAULT, or EHWPOISON) with the exit
    filled in; ``run()`` returns this exit then instead of raising (as rust-vmm's
    kvm-ioctls does).  ``flags`` bit 3 (``KVM_MEMORY_EXIT_FLAG_PRIVATE``): the
    access was to private (guest_memfd) memory: convert the range with
    ``KVM_SET_MEMORY_ATTRIBUTES`` and run again.
    """

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


class SetTpr(_NoFields):
    """``KVM_EXIT_SET_TPR``: defined by the uapi, not raised by current x86 KVM."""

    __slots__ = ()
    reason = R.SET_TPR


class Nmi(_NoFields):
    """``KVM_EXIT_NMI``: defined by the uapi, not raised by current x86 KVM."""

    __slots__ = ()
    reason = R.NMI


class ApResetHold(_NoFields):
    """``KVM_EXIT_AP_RESET_HOLD``: an SEV-ES AP parked itself (AP reset hold
    VMGEXIT); it stays halted until an INIT-SIPI wakes it."""

    __slots__ = ()
    reason = R.AP_RESET_HOLD


class Hyperv(Exit):
    """``KVM_EXIT_HYPERV`` of a ``type`` pykvm does not know (``raw``: the 248 bytes after it)."""

    __slots__ = ("type", "raw")
    reason = R.HYPERV

    def __init__(self, type: int, raw: bytes = b"") -> None:
        self.type, self.raw = type, raw


class HypervSynic(Exit):
    """``KVM_EXIT_HYPERV`` type 1 (``KVM_EXIT_HYPERV_SYNIC``): the guest wrote SynIC
    MSR ``msr``; ``control``, ``evt_page``, ``msg_page`` are the SynIC's new state."""

    __slots__ = ("msr", "control", "evt_page", "msg_page")
    reason = R.HYPERV
    type = 1

    def __init__(self, msr: int, control: int, evt_page: int, msg_page: int) -> None:
        self.msr, self.control, self.evt_page, self.msg_page = msr, control, evt_page, msg_page


class HypervHcall(Exit):
    """``KVM_EXIT_HYPERV`` type 2 (``KVM_EXIT_HYPERV_HCALL``): a Hyper-V hypercall
    KVM forwards (e.g. HvPostMessage).  Answer with :meth:`set_result`."""

    __slots__ = ("input", "params", "_mm")
    reason = R.HYPERV
    type = 2

    def __init__(self, input: int, params: Tuple[int, ...], mm: object = None) -> None:
        self.input, self.params, self._mm = input, params, mm

    def set_result(self, value: int) -> None:
        """Write ``hyperv.u.hcall.result`` (the hypercall status the guest gets in RAX)."""
        _q.pack_into(self._mm, _HV_RESULT, _fit(value, 8, "Hyper-V hypercall result"))


class HypervSyndbg(Exit):
    """``KVM_EXIT_HYPERV`` type 3 (``KVM_EXIT_HYPERV_SYNDBG``): the guest wrote a
    synthetic debugger MSR ``msr``; the other fields are the debugger's state."""

    __slots__ = ("msr", "control", "status", "send_page", "recv_page", "pending_page")
    reason = R.HYPERV
    type = 3

    def __init__(self, msr: int, control: int, status: int, send_page: int, recv_page: int,
                 pending_page: int) -> None:
        self.msr, self.control, self.status = msr, control, status
        self.send_page, self.recv_page, self.pending_page = send_page, recv_page, pending_page


class Xen(Exit):
    """``KVM_EXIT_XEN`` of a ``type`` pykvm does not know (``raw``: the bytes after it)."""

    __slots__ = ("type", "raw")
    reason = R.XEN

    def __init__(self, type: int, raw: bytes = b"") -> None:
        self.type, self.raw = type, raw


class XenHcall(Exit):
    """``KVM_EXIT_XEN`` type 1 (``KVM_EXIT_XEN_HCALL``): a Xen hypercall KVM does not
    handle itself (``KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL``).  Answer with :meth:`set_result`."""

    __slots__ = ("longmode", "cpl", "input", "params", "_mm")
    reason = R.XEN
    type = 1

    def __init__(self, longmode: int, cpl: int, input: int, params: Tuple[int, ...],
                 mm: object = None) -> None:
        self.longmode, self.cpl, self.input, self.params, self._mm = longmode, cpl, input, params, mm

    def set_result(self, value: int) -> None:
        """Write ``xen.u.hcall.result`` (the guest's RAX after the hypercall)."""
        _q.pack_into(self._mm, _XEN_RESULT, _fit(value, 8, "Xen hypercall result"))


class Tdx(Exit):
    """``KVM_EXIT_TDX``: a TDVMCALL of a TDX guest that KVM forwards.

    ``nr`` is the TDVMCALL leaf (0x10000 GetTdVmCallInfo, 0x10002 GetQuote,
    0x10004 SetupEventNotifyInterrupt); ``args`` the five words after ``ret``
    (GetQuote: gpa, size; GetTdVmCallInfo: leaf; SetupEventNotify: vector).
    KVM preset ``ret`` to TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED: answer with
    :meth:`set_ret` (and :meth:`set_outputs` for GetTdVmCallInfo's r11-r14).
    """

    __slots__ = ("flags", "nr", "ret", "args", "_mm")
    reason = R.TDX

    def __init__(self, flags: int, nr: int, ret: int, args: Tuple[int, ...], mm: object = None) -> None:
        self.flags, self.nr, self.ret, self.args, self._mm = flags, nr, ret, args, mm

    def set_ret(self, value: int) -> None:
        """Write ``tdx.ret`` (the TDVMCALL status the guest gets in R10)."""
        _q.pack_into(self._mm, _TDX_RET, _fit(value, 8, "TDVMCALL status"))

    def set_outputs(self, *values: int) -> None:
        """Write up to four output words after ``ret`` (GetTdVmCallInfo: r11, r12, r13, r14)."""
        if len(values) > 4:
            raise ValueError(f"a TDVMCALL returns at most 4 output words, got {len(values)}")
        for k, v in enumerate(values):
            _q.pack_into(self._mm, _TDX_RET + 16 + 8 * k, _fit(v, 8, f"TDVMCALL output {k}"))


#: What :meth:`SnpReqCerts.set_ret` accepts (the kernel's switch on snp_req_certs.ret).
SNP_REQ_CERTS_RETURNS = (0, errno.ENOSPC, errno.EAGAIN, errno.EIO)


class SnpReqCerts(Exit):
    """``KVM_EXIT_SNP_REQ_CERTS``: an SEV-SNP guest asks for the certificate table
    of an extended guest request (``KVM_SEV_SNP_ENABLE_REQ_CERTS``).

    Write the table into guest memory at ``gpa`` (``npages`` pages), then answer
    with :meth:`set_ret`: 0 (done: KVM then forwards the request to the
    firmware), ``ENOSPC`` with the pages needed (the guest retries with a
    bigger buffer), ``EAGAIN`` (busy, retry later) or ``EIO`` (failed).
    """

    __slots__ = ("gpa", "npages", "_mm")
    reason = R.SNP_REQ_CERTS if hasattr(R, "SNP_REQ_CERTS") else 43  # type: ignore[assignment]

    def __init__(self, gpa: int, npages: int, mm: object = None) -> None:
        self.gpa, self.npages, self._mm = gpa, npages, mm

    def set_ret(self, ret: int, npages: Optional[int] = None) -> None:
        """Write ``snp_req_certs.ret`` (and ``npages`` with ``ENOSPC``: the pages needed)."""
        if ret not in SNP_REQ_CERTS_RETURNS:
            raise ValueError(f"snp_req_certs.ret must be 0, ENOSPC, EAGAIN or EIO, not {ret!r}")
        if (npages is not None) != (ret == errno.ENOSPC):
            raise ValueError("npages goes with ENOSPC (and only with it): the page count the guest needs")
        if npages is not None:
            _q.pack_into(self._mm, _SNP_NPAGES, _fit(npages, 8, "snp_req_certs.npages"))
        _q.pack_into(self._mm, _SNP_RET, ret)


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
# Every format and offset comes from LAYOUTS.

_q = struct.Struct("<Q")
_ii = struct.Struct("<II")
_HCALL_RET = _field("hypercall", "ret")
_MSR_ERROR = _field("msr", "error")
_MSR_DATA = _field("msr", "data")
_HV_RESULT = _field("hyperv.hcall", "result")
_XEN_RESULT = _field("xen.hcall", "result")
_TDX_RET = _field("tdx", "ret")
_SNP_NPAGES = _field("snp_req_certs", "npages")
_SNP_RET = _field("snp_req_certs", "ret")
_EXIT_REASON = 8  # kvm_run.exit_reason

_HLT = Hlt()
_SHUTDOWN = Shutdown()
_IRQWIN = IrqWindowOpen()
_DRF = DirtyRingFull()
_BUSLOCK = X86BusLock()
INTERRUPTED = Interrupted()


# The hottest decoders build their objects without a Python-level __init__
# call (object.__new__ + slot stores): fewer frames per exit than calling the class.
_new = object.__new__
_io_unpack = IO_LAYOUT.format.unpack_from
_IO_AT = IO_LAYOUT.offset
_mmio_unpack = struct.Struct("<Q8xIB").unpack_from   # mmio without the data bytes
_MMIO_AT = MMIO_LAYOUT.offset
_MD = MMIO_DATA_OFFSET


def _unpacker(member: str):
    layout = LAYOUTS[member]
    unpack, at = layout.format.unpack_from, layout.offset
    return lambda mm: unpack(mm, at)


def _d_io(mm, mv):
    direction, size, port, count, off = _io_unpack(mv, _IO_AT)  # a memoryview exports its buffer cheaper than the mmap
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
    addr, length, is_write = _mmio_unpack(mv, _MMIO_AT)
    if length > 8:
        length = 8  # kvm_run.mmio.data has 8 bytes; never view past it
    if is_write:
        e = _new(MmioWrite)
        e.data = mm[_MD:_MD + length]
    else:
        e = _new(MmioRead)
        e.length = length
        e.data = mv[_MD:_MD + length]
    e.address = addr
    return e


_internal = _unpacker("internal")
_emul = _unpacker("emulation_failure")


def _d_internal(mm, mv):
    fields = _internal(mm)
    sub, ndata = fields[0], min(fields[1], 16)
    insn = b""
    if sub == 1 and ndata >= 2:
        _, _, flags, size, raw = _emul(mm)
        if flags & 1:
            insn = raw[:min(size, 15)]
    return InternalError(sub, fields[2:2 + ndata], insn)


_sysev = _unpacker("system_event")


def _d_sysev(mm, mv):
    fields = _sysev(mm)
    n = fields[1] if fields[1] else 1  # older kernels: flags only
    return SystemEvent(fields[0], fields[2:2 + min(n, 16)])


_hcall = _unpacker("hypercall")


def _d_hcall(mm, mv):
    f = _hcall(mm)
    return Hypercall(f[0], f[1:7], f[8], mm)


_debug = _unpacker("debug")


def _d_debug(mm, mv):
    exc, _, pc, dr6, dr7 = _debug(mm)
    return Debug(exc, pc, dr6, dr7)


_msr = _unpacker("msr")


def _d_rdmsr(mm, mv):
    _, reason, index, data = _msr(mm)
    return X86Rdmsr(index, data, reason, mm)


def _d_wrmsr(mm, mv):
    _, reason, index, data = _msr(mm)
    return X86Wrmsr(index, data, reason, mm)


_fault = _unpacker("memory_fault")


def _d_fault(mm, mv):
    return MemoryFault(*_fault(mm))


_fail = _unpacker("fail_entry")


def _d_fail(mm, mv):
    return FailEntry(*_fail(mm))


def _d_eoi(mm, mv):
    return IoapicEoi(mm[LAYOUTS["eoi"].offset])


_notify = _unpacker("notify")


def _d_notify(mm, mv):
    return Notify(_notify(mm)[0])


_tpr = _unpacker("tpr_access")


def _d_tpr(mm, mv):
    rip, is_write, _ = _tpr(mm)
    return TprAccess(rip, is_write)


_ex = _unpacker("ex")


def _d_exc(mm, mv):
    return Exception_(*_ex(mm))


_hv = _unpacker("hyperv")
_hv_synic = _unpacker("hyperv.synic")
_hv_hcall = _unpacker("hyperv.hcall")
_hv_syndbg = _unpacker("hyperv.syndbg")


def _d_hyperv(mm, mv):
    kind = _hv(mm)[0]
    if kind == 1:
        msr, _, control, evt_page, msg_page = _hv_synic(mm)
        return HypervSynic(msr, control, evt_page, msg_page)
    if kind == 2:
        f = _hv_hcall(mm)
        return HypervHcall(f[0], f[2:4], mm)
    if kind == 3:
        msr, _, control, status, send, recv, pending = _hv_syndbg(mm)
        return HypervSyndbg(msr, control, status, send, recv, pending)
    return Hyperv(kind, mm[_U + 8:_U + EXIT_UNION_SIZE])


_xen = _unpacker("xen")
_xen_hcall = _unpacker("xen.hcall")


def _d_xen(mm, mv):
    kind = _xen(mm)[0]
    if kind == 1:
        f = _xen_hcall(mm)
        return XenHcall(f[0], f[1], f[2], f[4:10], mm)
    return Xen(kind, mm[_U + 8:_U + EXIT_UNION_SIZE])


_tdx = _unpacker("tdx")


def _d_tdx(mm, mv):
    f = _tdx(mm)
    return Tdx(f[0], f[1], f[2], f[3:8], mm)


_snp = _unpacker("snp_req_certs")


def _d_snp(mm, mv):
    gpa, npages, _ = _snp(mm)
    return SnpReqCerts(gpa, npages, mm)


def _const(obj):
    return lambda mm, mv: obj


def _unknown(mm, mv):
    return Unknown(_ii.unpack_from(mm, _EXIT_REASON)[0], mm[_U:_U + EXIT_UNION_SIZE])


#: exit reason -> decoder, for every exit reason x86 KVM can report.
DECODERS: Dict[int, object] = {
    R.IO: _d_io,
    R.MMIO: _d_mmio,
    R.HLT: _const(_HLT),
    R.SHUTDOWN: _const(_SHUTDOWN),
    R.IRQ_WINDOW_OPEN: _const(_IRQWIN),
    R.DIRTY_RING_FULL: _const(_DRF),
    R.X86_BUS_LOCK: _const(_BUSLOCK),
    R.INTR: _const(INTERRUPTED),
    R.SET_TPR: _const(SetTpr()),
    R.NMI: _const(Nmi()),
    R.AP_RESET_HOLD: _const(ApResetHold()),
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
    R.HYPERV: _d_hyperv,
    R.XEN: _d_xen,
    R.TDX: _d_tdx,
    43: _d_snp,  # KVM_EXIT_SNP_REQ_CERTS (Linux 7.1+)
}
#: The exit reasons that x86 KVM never reports (other architectures' exits): Unknown.
NON_X86_REASONS = (13, 14, 15, 18, 19, 20, 21, 22, 23, 25, 28, 35, 36, 38, 41, 42)
# A plain list indexed by exit reason: the hot path does one index, no hashing.
DECODE_TABLE = [DECODERS.get(i, _unknown) for i in range(64)]


def decode(mm, mv=None) -> Exit:
    """Decode the exit currently described by a run page (mmap, and optionally its memoryview).

    Without *mv*, ``IoIn``/``MmioRead`` data views are made from a new memoryview.
    """
    if mv is None:
        mv = memoryview(mm)
    reason = _ii.unpack_from(mm, _EXIT_REASON)[0]
    return (DECODE_TABLE[reason] if reason < 64 else _unknown)(mm, mv)
