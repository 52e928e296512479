"""The vCPU fd (``Vcpu``): run loop, kick, and every x86 vCPU ioctl.

Each vCPU maps its ``kvm_run`` area (run page, PIO data page, coalesced MMIO
ring ...) with the size ``KVM_GET_VCPU_MMAP_SIZE`` reports.  :meth:`Vcpu.run`
issues ``KVM_RUN`` and returns a typed exit from :mod:`pykvm.exits`;
:meth:`Vcpu.run_raw` returns just the exit reason number for the tightest
loops.

The other methods wrap one ioctl each (named as in rust-vmm's kvm-ioctls
where it has the ioctl, else the ioctl's name without ``KVM_``; each
docstring starts with the ioctl):

* state: regs, sregs, sregs2, fpu, xsave/xsave2, xcrs, debug regs, MSRs,
  ONE_REG, CPUID (``set_cpuid``/``set_cpuid2``), LAPIC, MP state, vCPU
  events, nested state, TSC rate;
* events: ``interrupt``, ``nmi``, ``smi``, ``set_mce`` (after ``setup_mce``);
* run control: ``set_guest_debug``, ``set_signal_mask``, sync regs in the
  run page (``sync_regs`` and the ``set_sync_*_reg`` masks), the interrupt
  window fields;
* the rest: ``translate_gva``, ``kvmclock_ctrl``, ``tpr_access_reporting``,
  ``set_vapic_addr``, ``pre_fault_memory``, ``enable_cap``, vCPU device
  attributes, Xen vCPU attributes, Hyper-V CPUID, ``get_stats_fd``.

Bad arguments raise ``ValueError``/``TypeError`` before any ioctl; a refusal
by the kernel raises :class:`~pykvm.errors.KvmError` naming the ioctl.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import signal
import sys
import threading
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

from . import _kick, _sys
from ._check import U32 as _U32, expect as _expect, int_arg as _int_arg, uint as _uint
from .fd import FdObject, raise_error
from .device import DeviceAttrs
from .errors import KvmClosedError, KvmError
from .exits import DECODE_TABLE, INTERRUPTED, Exit, _unknown
from .uapi import ioctls as I
from .uapi import structs as S
from .uapi.enums import Cap

__all__ = ["Vcpu", "Watchdog", "lapic_get_reg", "lapic_set_reg"]

_libc_run_ioctl = _sys.ioctl_noarg


if sys.version_info < (3, 14):
    # fcntl.ioctl(fd, KVM_RUN) with no third argument: CPython's cheapest
    # path (an int argument is first tried as a buffer, ~0.55 us lost).
    _run_ioctl = fcntl.ioctl
else:
    # Since 3.14 fcntl.ioctl retries on EINTR by itself (gh-132768); with
    # pykvm's C-level kick handler a kick would then never end KVM_RUN.
    _run_ioctl = _libc_run_ioctl
_KVM_RUN = I.KVM_RUN
_EINTR = errno.EINTR
_EAGAIN = errno.EAGAIN
_get_ident = threading.get_ident
_OFF_RIW = S.kvm_run.request_interrupt_window.offset       # 0
_OFF_READY = S.kvm_run.ready_for_interrupt_injection.offset  # 12
_OFF_IF = S.kvm_run.if_flag.offset                          # 13


_NO_LAPIC = "this vCPU has no in-kernel LAPIC: call vm.create_irq_chip() before creating vCPUs"
_E = errno
# (request, errno) -> what the user can do about it; more specific than pykvm.errors' table.
_VCPU_HINTS = {
    (I.KVM_GET_LAPIC, _E.EINVAL): _NO_LAPIC,
    (I.KVM_SET_LAPIC, _E.EINVAL): _NO_LAPIC,
    (I.KVM_SET_VAPIC_ADDR, _E.EINVAL): _NO_LAPIC,
    (I.KVM_SET_MP_STATE, _E.EINVAL):
        "unknown state, or no in-kernel irqchip (then only KVM_MP_STATE_RUNNABLE is accepted)",
    (I.KVM_INTERRUPT, _E.ENXIO):
        "the VM has an in-kernel irqchip: raise interrupts through it (IRQ lines, MSIs), not KVM_INTERRUPT",
    (I.KVM_PRE_FAULT_MEMORY, _E.EOPNOTSUPP):
        "KVM uses shadow paging here (no EPT/NPT): nothing to pre-fault (KVM_CAP_PRE_FAULT_MEMORY is 0)",
    (I.KVM_GET_NESTED_STATE, _E.EINVAL):
        "no nested virtualization on this host (KVM_CAP_NESTED_STATE is 0), or the buffer is too small",
    (I.KVM_SET_NESTED_STATE, _E.EINVAL):
        "no nested virtualization on this host (KVM_CAP_NESTED_STATE is 0), or an inconsistent state",
    (I.KVM_SMI, _E.ENOTTY): "this KVM has no SMM support (KVM_CAP_X86_SMM is 0)",
    (I.KVM_SET_TSC_KHZ, _E.EINVAL):
        "without TSC scaling (KVM_CAP_TSC_CONTROL) the guest rate cannot be below the host's",
    (I.KVM_SET_XCRS, _E.EINVAL):
        "XCR0 needs bit 0 (x87) and only components the guest's CPUID leaf 0xD allows (set_cpuid2 first)",
    (I.KVM_SET_CPUID2, _E.EINVAL): "bad entries, or the vCPU has run already (its CPUID is then fixed)",
    (I.KVM_SET_CPUID, _E.EINVAL): "bad entries, or the vCPU has run already (its CPUID is then fixed)",
    (I.KVM_GET_ONE_REG, _E.EINVAL):
        "unknown register id (x86: KVM_X86_REG_MSR(index) of an MSR KVM handles, 64-bit size)",
    (I.KVM_SET_ONE_REG, _E.EINVAL):
        "unknown register id or value refused (x86: KVM_X86_REG_MSR(index), 64-bit size)",
    (I.KVM_X86_SETUP_MCE, _E.EINVAL):
        "bank count must be 1..32 and the other bits within Kvm.mce_cap_supported()",
    (I.KVM_X86_SET_MCE, _E.EINVAL):
        "bank beyond setup_mce's count (or no setup_mce yet), or MCi_STATUS.VAL (bit 63) clear",
    (I.KVM_SET_SREGS2, _E.EINVAL):
        "PDPTRS_VALID outside PAE paging, unknown flags, or inconsistent control registers",
    (I.KVM_SET_GUEST_DEBUG, _E.EBUSY): "an exception is already pending: run the vCPU first",
    (I.KVM_GET_SUPPORTED_HV_CPUID, _E.EINVAL):
        "KVM was built without Hyper-V emulation (KVM_CAP_HYPERV_CPUID is 0)",
    (I.KVM_XEN_VCPU_GET_ATTR, _E.EINVAL):
        "no Xen emulation (KVM_CAP_XEN_HVM is 0) or Xen not configured on the VM",
    (I.KVM_XEN_VCPU_SET_ATTR, _E.EINVAL):
        "no Xen emulation (KVM_CAP_XEN_HVM is 0) or Xen not configured on the VM",
    (I.KVM_GET_DEVICE_ATTR, _E.ENXIO):
        "unknown vCPU attribute (x86: group 0 KVM_VCPU_TSC_CTRL, attribute 0 KVM_VCPU_TSC_OFFSET)",
    (I.KVM_SET_DEVICE_ATTR, _E.ENXIO):
        "unknown vCPU attribute (x86: group 0 KVM_VCPU_TSC_CTRL, attribute 0 KVM_VCPU_TSC_OFFSET)",
    (I.KVM_GET_XSAVE, _E.EINVAL): "the guest's XSAVE state is larger than 4 KiB: use get_xsave2()",
    (I.KVM_SET_VCPU_EVENTS, _E.EINVAL):
        "invalid event state (an exception vector above 31, SMM fields without SMM support ...)",
}


def _msrs_buffer(indices: Iterable[int]):
    idx = [_int_arg("MSR index", i) for i in indices]
    for i in idx:
        if not 0 <= i <= 0xFFFFFFFF:
            raise ValueError(f"MSR index {i:#x} is not a 32-bit value")
    buf = S.flex(S.kvm_msrs, len(idx))
    for k, i in enumerate(idx):
        buf.entries[k].index = i
    return buf


class Vcpu(DeviceAttrs, FdObject):
    """A virtual CPU of a :class:`~pykvm.vm.Vm` (create with ``vm.create_vcpu``).

    vCPU device attributes (``has/get/set_device_attr``, ``KVM_CAP_VCPU_ATTRIBUTES``):
    on x86, group ``KVM_VCPU_TSC_CTRL`` (0), attribute ``KVM_VCPU_TSC_OFFSET`` (0):
    guest TSC = host TSC + offset (modulo 2**64).
    """

    _what = "vCPU"

    # Defaults so that a half-built object closes cleanly.
    _thread: Optional[int] = None
    _holder: Optional[int] = None
    _kicking = False
    _kick_sent = False
    _closing = False
    _holding_run_lock = False
    _lock = None

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int, vm) -> None:
        # Everything that can fail happens before this object owns *fd*: on
        # failure the caller still owns it and closes it exactly once.
        _kick.ensure_kick_handler()
        try:
            mm = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise KvmError(e.errno, "mmap(vcpu fd)", f"could not map {mmap_size} bytes of kvm_run") from None
        super().__init__(fd)
        self._mm = mm
        self.id = vcpu_id
        self.vm = vm  # keeps the VM (and its guest memory) alive
        self._mv = memoryview(self._mm)
        self._u32 = self._mv.cast("I")  # exit_reason is self._u32[2]
        self._run_struct: Optional[S.kvm_run] = None
        self._lock = threading.Lock()       # held by run(); refuses a second runner
        self._tid_lock = threading.Lock()   # guards _thread between run() and kick()
        self._thread = None

    def __repr__(self) -> str:
        return f"<Vcpu {self.id} {self._state()}>"

    def _ioctl(self, request: int, arg=0) -> int:
        # FdObject._ioctl plus vCPU-specific hints (not used by run()/run_raw()).
        try:
            return FdObject._ioctl(self, request, arg)
        except KvmError as e:
            hint = _VCPU_HINTS.get((request, e.errno))
            if hint is None or isinstance(e, KvmClosedError):
                raise
            raise KvmError(e.errno, e.ioctl, hint) from None

    # -- the run page -----------------------------------------------------------
    @property
    def kvm_run(self) -> S.kvm_run:
        """The ``kvm_run`` structure, a ctypes view of the mapped run page."""
        if self._fd < 0:
            raise KvmClosedError(self._what, "kvm_run")
        if self._run_struct is None:
            self._run_struct = S.kvm_run.from_buffer(self._mm)
        return self._run_struct

    @property
    def run_mmap(self) -> mmap.mmap:
        """The whole vCPU mapping (run page, PIO page, coalesced MMIO ring...)."""
        if self._fd < 0:
            raise KvmClosedError(self._what, "run_mmap")
        return self._mm

    @property
    def immediate_exit(self) -> bool:
        """``kvm_run.immediate_exit``: when set, ``KVM_RUN`` returns EINTR at once."""
        return bool(self._mm[1])

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self._mm[1] = 1 if value else 0

    @property
    def exit_reason(self) -> int:
        """``kvm_run.exit_reason`` of the last exit (a number)."""
        return self._u32[2]

    # -- running ------------------------------------------------------------------
    def run(self) -> Exit:
        """``KVM_RUN``: run the guest until it exits, and return the typed exit.

        An EINTR return (a signal, :meth:`kick`, or ``immediate_exit``) gives
        :class:`~pykvm.exits.Interrupted` and clears ``immediate_exit``.  A
        second thread calling ``run()`` on the same vCPU gets a ``KvmError``
        (EBUSY) instead of blocking.
        """
        lock = self._lock
        if not lock.acquire(False):
            raise self._busy()
        try:
            self._thread = _get_ident()
            _run_ioctl(self._fd, _KVM_RUN)
            # Decode while still holding the run lock: close() waits for it.
            reason = self._u32[2]
            if reason < 64:
                return DECODE_TABLE[reason](self._mm, self._mv)
            return _unknown(self._mm, self._mv)
        except OSError as e:
            return self._run_failed(e)
        except ValueError:  # fd is -1 or the run page is unmapped: closed
            raise KvmClosedError(self._what, "KVM_RUN") from None
        finally:
            self._thread = None
            if self._kicking:  # a kick() may be about to signal us: wait until it is done
                with self._tid_lock:
                    pass
            lock.release()

    def run_raw(self) -> int:
        """``KVM_RUN`` without decoding: return ``exit_reason`` as an int.

        The fast path for loops that read ``kvm_run`` fields themselves.  EINTR
        returns ``ExitReason.INTR`` (10) and clears ``immediate_exit``.
        """
        lock = self._lock
        if not lock.acquire(False):
            raise self._busy()
        try:
            self._thread = _get_ident()
            _run_ioctl(self._fd, _KVM_RUN)
            return self._u32[2]
        except OSError as e:
            self._run_failed(e)
            return 10
        except ValueError:
            raise KvmClosedError(self._what, "KVM_RUN") from None
        finally:
            self._thread = None
            if self._kicking:  # a kick() may be about to signal us: wait until it is done
                with self._tid_lock:
                    pass
            lock.release()

    def _busy(self) -> KvmError:
        if self._closing or self._fd < 0:
            return KvmClosedError(self._what, "KVM_RUN")
        return KvmError(errno.EBUSY, "KVM_RUN", "another thread is running this vCPU")

    def _run_failed(self, e: OSError) -> Exit:
        if e.errno in (_EINTR, _EAGAIN):
            self._mm[1] = 0  # immediate_exit served its purpose
            self._kick_sent = False
            return INTERRUPTED
        if self._fd < 0:
            raise KvmClosedError(self._what, "KVM_RUN") from None
        raise raise_error(e.errno, _KVM_RUN) from None

    def hold(self) -> "contextlib.AbstractContextManager[Vcpu]":
        """A context manager that keeps ``run()`` out of ``KVM_RUN`` while it is held.

        For reading or writing a consistent vCPU state from one thread (snapshots,
        debuggers).  Raises ``KvmError`` (EBUSY) at once if another thread is
        inside ``run()`` now: ``kick()`` it and let ``run()`` return first.
        While held, ``run()`` from any thread raises EBUSY.
        """
        if self._fd < 0:
            raise KvmClosedError(self._what, "hold")
        if not self._lock.acquire(False):
            raise self._busy()
        self._holder = _get_ident()
        return _Held(self)

    def complete_pending_exit(self) -> Optional[Exit]:
        """Let KVM finish the last exit's I/O without running guest code.

        After an ``IoIn``/``MmioRead``/``X86Rdmsr``... exit the guest state is
        consistent only once ``KVM_RUN`` was entered again (api.rst, "kvm_run").
        With ``immediate_exit`` set KVM completes the operation and returns
        EINTR at once.  Returns None when that happened, or the exit when KVM
        needed user space once more (e.g. the next chunk of a ``rep outs``).
        A vCPU that never ran has nothing pending (and is left untouched: its
        first ``KVM_RUN`` would freeze its CPUID).  Call it while holding
        :meth:`hold` (or from the thread that runs the vCPU).
        """
        if self._fd < 0:
            raise KvmClosedError(self._what, "KVM_RUN")
        if self._u32[2] == 0:
            return None
        self._mm[1] = 1
        try:
            _run_ioctl(self._fd, _KVM_RUN)
        except OSError as e:
            if e.errno in (_EINTR, _EAGAIN):
                self._kick_sent = False
                return None
            raise raise_error(e.errno, _KVM_RUN) from None
        finally:
            self._mm[1] = 0
        reason = self._u32[2]
        return DECODE_TABLE[reason](self._mm, self._mv) if reason < 64 else _unknown(self._mm, self._mv)

    def kick(self) -> None:
        """Make a ``run()`` in progress (or the next one) return ``Interrupted`` promptly.

        Safe to call from any thread: sets ``immediate_exit`` and signals the
        thread inside ``KVM_RUN`` with :data:`pykvm._kick.KICK_SIGNAL`.
        """
        if self._fd < 0:
            raise KvmClosedError(self._what, "kick")
        self._mm[1] = 1
        # The runner must not leave run() (and maybe exit its thread) between our
        # read of _thread and the signal: pthread_kill on a dead thread is undefined.
        # The runner clears _thread, then checks _kicking and, if set, waits for
        # _tid_lock; we set _kicking, then read _thread.  Under the GIL these steps
        # are ordered, so either we see None or the runner waits for us.  That
        # keeps locks off run()'s common path.
        # One signal per interrupted run is enough: until the runner has seen
        # EINTR (and cleared immediate_exit), further kicks only set the flag.
        # A storm of signals would also starve the runner of the GIL (each one
        # restarts CPython's 5 ms wait before it may ask for the GIL).
        with self._tid_lock:
            self._kicking = True
            try:
                tid = self._thread
                if tid is not None and not self._kick_sent:
                    try:
                        signal.pthread_kill(tid, _kick.KICK_SIGNAL)
                        self._kick_sent = True
                    except (ProcessLookupError, OSError):
                        pass
            finally:
                self._kicking = False

    def kick_after(self, seconds: float) -> "Watchdog":
        """Arm a watchdog that calls :meth:`kick` after *seconds* unless cancelled.

        The one way to bound a run: a guest that never exits ends with an
        ``Interrupted`` exit instead of hanging the program.  Returns a
        :class:`Watchdog` (also a context manager that cancels on exit); its
        ``fired`` attribute tells whether the kick happened.  A kick on a vCPU
        closed meanwhile is ignored.
        """
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"seconds must be an int or float, not {type(seconds).__name__}")
        if not 0 <= seconds <= threading.TIMEOUT_MAX:
            raise ValueError(f"seconds={seconds!r} must be a finite number >= 0")
        if self._fd < 0:
            raise KvmClosedError(self._what, "kick_after")
        return Watchdog(self, seconds)

    # -- registers ---------------------------------------------------------------------
    def get_regs(self) -> S.kvm_regs:
        """``KVM_GET_REGS``: general-purpose registers, RIP and RFLAGS."""
        r = S.kvm_regs()
        self._ioctl(I.KVM_GET_REGS, r)
        return r

    def set_regs(self, regs: S.kvm_regs) -> None:
        """``KVM_SET_REGS``."""
        _expect(regs, S.kvm_regs)
        self._ioctl(I.KVM_SET_REGS, regs)

    def get_sregs(self) -> S.kvm_sregs:
        """``KVM_GET_SREGS``: segments, descriptor tables, control registers, EFER."""
        r = S.kvm_sregs()
        self._ioctl(I.KVM_GET_SREGS, r)
        return r

    def set_sregs(self, sregs: S.kvm_sregs) -> None:
        """``KVM_SET_SREGS``."""
        _expect(sregs, S.kvm_sregs)
        self._ioctl(I.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> S.kvm_fpu:
        """``KVM_GET_FPU``: x87 and SSE state.

        KVM does not transfer MXCSR through GET/SET_FPU (``mxcsr`` reads 0 and is
        ignored on set); use :meth:`get_xsave` for it.
        """
        r = S.kvm_fpu()
        self._ioctl(I.KVM_GET_FPU, r)
        return r

    def set_fpu(self, fpu: S.kvm_fpu) -> None:
        """``KVM_SET_FPU``."""
        _expect(fpu, S.kvm_fpu)
        self._ioctl(I.KVM_SET_FPU, fpu)

    def get_msrs(self, indices: Iterable[int]) -> Dict[int, int]:
        """``KVM_GET_MSRS``: ``{index: value}`` for the MSRs KVM could read.

        KVM stops at the first MSR it cannot read; missing keys were not read.
        """
        buf = _msrs_buffer(indices)
        n = self._ioctl(I.KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, values: Mapping[int, int]) -> int:
        """``KVM_SET_MSRS``: write ``{index: value}``; raise if KVM refused one.

        Returns the number written (all of them).
        """
        if not isinstance(values, Mapping):
            raise TypeError(f"set_msrs wants a mapping {{index: value}}, not {type(values).__name__}")
        items = list(values.items())
        buf = _msrs_buffer(k for k, _ in items)
        for k, (_, v) in enumerate(items):
            if not 0 <= _int_arg("MSR value", v) < 2**64:
                raise ValueError(f"MSR value {v:#x} is not a 64-bit unsigned value")
            buf.entries[k].data = v
        n = self._ioctl(I.KVM_SET_MSRS, buf)
        if n != len(items):
            bad = items[n][0]
            raise KvmError(errno.EINVAL, "KVM_SET_MSRS",
                           f"KVM refused MSR {bad:#x} (wrote {n} of {len(items)})")
        return n

    def get_cpuid2(self, max_entries: int = 256) -> List[S.kvm_cpuid_entry2]:
        """``KVM_GET_CPUID2``: the CPUID table set on this vCPU (grows on E2BIG)."""
        n = max_entries
        while True:
            buf = S.flex(S.kvm_cpuid2, n)
            try:
                self._ioctl(I.KVM_GET_CPUID2, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 1 << 16:
                    n *= 2
                    continue
                raise
            return [S.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def set_cpuid2(self, entries: Union[Iterable[S.kvm_cpuid_entry2], S.kvm_cpuid2]) -> None:
        """``KVM_SET_CPUID2``: the CPUID the guest sees (e.g. ``kvm.supported_cpuid()``)."""
        if isinstance(entries, S.kvm_cpuid2):
            buf = entries
        else:
            lst = list(entries)
            for e in lst:
                _expect(e, S.kvm_cpuid_entry2)
            buf = S.flex(S.kvm_cpuid2, len(lst))
            for k, e in enumerate(lst):
                buf.entries[k] = e
        self._ioctl(I.KVM_SET_CPUID2, buf)

    def set_cpuid(self, entries: Iterable[S.kvm_cpuid_entry]) -> None:
        """``KVM_SET_CPUID`` (the original, index-less form; prefer :meth:`set_cpuid2`).

        KVM turns each ``kvm_cpuid_entry`` into a ``kvm_cpuid_entry2`` with
        index 0 and no flags; at most 256 entries (E2BIG beyond).
        """
        lst = list(entries)
        for e in lst:
            _expect(e, S.kvm_cpuid_entry)
        buf = S.flex(S.kvm_cpuid, len(lst))
        for k, e in enumerate(lst):
            buf.entries[k] = e
        self._ioctl(I.KVM_SET_CPUID, buf)

    def get_supported_hv_cpuid(self, max_entries: int = 64) -> List[S.kvm_cpuid_entry2]:
        """``KVM_GET_SUPPORTED_HV_CPUID`` on the vCPU fd: the Hyper-V leaves KVM
        could expose (``KVM_CAP_HYPERV_CPUID``; the kernel answers EINVAL when
        built without Hyper-V emulation).  Grows the buffer on E2BIG."""
        n = max_entries
        while True:
            buf = S.flex(S.kvm_cpuid2, n)
            try:
                self._ioctl(I.KVM_GET_SUPPORTED_HV_CPUID, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 1 << 12:
                    n *= 2
                    continue
                raise
            return [S.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    # -- more register state -------------------------------------------------------------
    def get_sregs2(self) -> S.kvm_sregs2:
        """``KVM_GET_SREGS2`` (``KVM_CAP_SREGS2``): the special registers plus the
        PAE PDPTRs.  ``flags & KVM_SREGS2_FLAGS_PDPTRS_VALID`` tells whether the
        vCPU is in PAE paging (32-bit, CR4.PAE) and ``pdptrs`` holds its PDPTEs;
        unlike ``kvm_sregs`` there is no pending-interrupt bitmap."""
        r = S.kvm_sregs2()
        self._ioctl(I.KVM_GET_SREGS2, r)
        return r

    def set_sregs2(self, sregs2: S.kvm_sregs2) -> None:
        """``KVM_SET_SREGS2``.  With ``KVM_SREGS2_FLAGS_PDPTRS_VALID`` set, KVM uses
        ``pdptrs`` as the PDPTE registers instead of reading them from guest
        memory at CR3 (only valid for PAE paging: EINVAL otherwise)."""
        _expect(sregs2, S.kvm_sregs2)
        self._ioctl(I.KVM_SET_SREGS2, sregs2)

    def get_debug_regs(self) -> S.kvm_debugregs:
        """``KVM_GET_DEBUGREGS``: the guest's DR0-3, DR6 and DR7."""
        r = S.kvm_debugregs()
        self._ioctl(I.KVM_GET_DEBUGREGS, r)
        return r

    def set_debug_regs(self, debugregs: S.kvm_debugregs) -> None:
        """``KVM_SET_DEBUGREGS``: what the guest reads with ``mov reg, drN``
        (``flags`` must be 0; DR6/DR7 with bits set in their upper half: EINVAL)."""
        _expect(debugregs, S.kvm_debugregs)
        self._ioctl(I.KVM_SET_DEBUGREGS, debugregs)

    def _xsave_size(self) -> int:
        # KVM_CAP_XSAVE2 on the VM fd: the buffer size KVM_GET_XSAVE2 fills
        # (0 on kernels before 5.17: the 4 KiB of struct kvm_xsave then).
        try:
            n = self.vm.check_extension(Cap.XSAVE2)
        except KvmError:
            n = 0
        return max(n, ctypes.sizeof(S.kvm_xsave))

    def get_xsave(self) -> S.kvm_xsave:
        """``KVM_GET_XSAVE``: the 4 KiB XSAVE image (legacy area, header, AVX...).

        KVM refuses (EINVAL) when the guest's state needs more than 4 KiB (AMX):
        use :meth:`get_xsave2` then.
        """
        r = S.kvm_xsave()
        self._ioctl(I.KVM_GET_XSAVE, r)
        return r

    def get_xsave2(self) -> S.kvm_xsave:
        """``KVM_GET_XSAVE2``: the whole XSAVE image, sized by ``KVM_CAP_XSAVE2``
        (checked on the VM fd each call; ``len(bytes(r))`` is that size)."""
        size = self._xsave_size()
        r = S.flex(S.kvm_xsave, (size - ctypes.sizeof(S.kvm_xsave) + 3) // 4)
        self._ioctl(I.KVM_GET_XSAVE2, r)
        return r

    def set_xsave(self, xsave: S.kvm_xsave) -> None:
        """``KVM_SET_XSAVE`` (also takes what :meth:`get_xsave2` returned).

        KVM reads as many bytes as the guest's XSAVE image has (which can be more
        than 4 KiB); a smaller buffer is copied into a zero-padded one first.
        XRSTOR semantics apply: a component whose XSTATE_BV bit (byte 512) is 0
        is loaded in its init state, whatever the image holds.
        """
        _expect(xsave, S.kvm_xsave)
        need = self._xsave_size()
        have = ctypes.sizeof(xsave)
        if have < need:
            big = S.flex(S.kvm_xsave, (need - ctypes.sizeof(S.kvm_xsave) + 3) // 4)
            ctypes.memmove(ctypes.addressof(big), ctypes.addressof(xsave), have)
            xsave = big
        self._ioctl(I.KVM_SET_XSAVE, xsave)

    def get_xcrs(self) -> S.kvm_xcrs:
        """``KVM_GET_XCRS``: the extended control registers (``xcrs[0]`` is XCR0)."""
        r = S.kvm_xcrs()
        self._ioctl(I.KVM_GET_XCRS, r)
        return r

    def set_xcrs(self, xcrs: S.kvm_xcrs) -> None:
        """``KVM_SET_XCRS``: KVM checks XCR0 against the guest's CPUID leaf 0xD
        (set CPUID first) and refuses invalid combinations with EINVAL."""
        _expect(xcrs, S.kvm_xcrs)
        self._ioctl(I.KVM_SET_XCRS, xcrs)

    def get_nested_state(self) -> S.kvm_nested_state:
        """``KVM_GET_NESTED_STATE``: the VMX/SVM state of a nested guest, in a
        buffer of the size ``KVM_CAP_NESTED_STATE`` reports (``.size`` is what
        KVM used).  Hosts without nested virtualization refuse with EINVAL."""
        try:
            size = self.vm.check_extension(Cap.NESTED_STATE)
        except KvmError:
            size = 0
        hdr = ctypes.sizeof(S.kvm_nested_state)
        size = max(size, hdr)
        buf = S.flex(S.kvm_nested_state, size - hdr)
        buf.size = size
        self._ioctl(I.KVM_GET_NESTED_STATE, buf)
        return buf

    def set_nested_state(self, state: S.kvm_nested_state) -> None:
        """``KVM_SET_NESTED_STATE``: restore what :meth:`get_nested_state` gave."""
        _expect(state, S.kvm_nested_state)
        if state.size > ctypes.sizeof(state):
            raise ValueError(f"kvm_nested_state.size={state.size} exceeds the "
                             f"{ctypes.sizeof(state)}-byte buffer")
        self._ioctl(I.KVM_SET_NESTED_STATE, state)

    # -- ONE_REG ---------------------------------------------------------------------------
    def get_one_reg(self, reg_id: int) -> int:
        """``KVM_GET_ONE_REG``: the register *reg_id* as an unsigned int.

        On x86 (kernel 6.18+) the ids are ``uapi.KVM_X86_REG_MSR(index)`` for any
        MSR KVM can read, and ``uapi.KVM_X86_REG_KVM(KVM_REG_GUEST_SSP)``; the
        size is encoded in the id (``KVM_REG_SIZE_*``).  Older x86 kernels
        answer EINVAL/ENOTTY.
        """
        buf = (ctypes.c_uint8 * _one_reg_size(reg_id))()
        self._ioctl(I.KVM_GET_ONE_REG, S.kvm_one_reg(id=reg_id, addr=ctypes.addressof(buf)))
        return int.from_bytes(bytes(buf), "little")

    def set_one_reg(self, reg_id: int, value: int) -> None:
        """``KVM_SET_ONE_REG``: write *value* (an unsigned int of the id's size)."""
        n = _one_reg_size(reg_id)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << (8 * n):
            raise ValueError(f"value {value!r} does not fit register {reg_id:#x} ({n} bytes)")
        buf = (ctypes.c_uint8 * n).from_buffer_copy(value.to_bytes(n, "little"))
        self._ioctl(I.KVM_SET_ONE_REG, S.kvm_one_reg(id=reg_id, addr=ctypes.addressof(buf)))

    def get_reg_list(self) -> List[int]:
        """``KVM_GET_REG_LIST``: ONE_REG ids KVM enumerates.  x86 lists only
        KVM-defined registers (the CET SSP when the guest has shadow stacks),
        never MSRs, so an empty list is normal."""
        n = 16
        while True:
            buf = S.flex(S.kvm_reg_list, n)
            try:
                self._ioctl(I.KVM_GET_REG_LIST, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 1 << 16:
                    n *= 4
                    continue
                raise
            return [buf.reg[i] for i in range(min(buf.n, n))]

    # -- local APIC (in-kernel irqchip) ----------------------------------------------------
    def get_lapic(self) -> S.kvm_lapic_state:
        """``KVM_GET_LAPIC``: the 1 KiB register page of the in-kernel local APIC
        (EINVAL without an in-kernel irqchip).  Read a register with
        :func:`lapic_get_reg` or :meth:`get_lapic_reg`."""
        r = S.kvm_lapic_state()
        self._ioctl(I.KVM_GET_LAPIC, r)
        return r

    def set_lapic(self, lapic: S.kvm_lapic_state) -> None:
        """``KVM_SET_LAPIC``: load the whole register page (KVM recomputes its
        derived state: timers, priorities, pending interrupts)."""
        _expect(lapic, S.kvm_lapic_state)
        self._ioctl(I.KVM_SET_LAPIC, lapic)

    def get_lapic_reg(self, offset: int) -> int:
        """One 32-bit LAPIC register (``APIC_TASKPRI`` = 0x80 ...), via ``KVM_GET_LAPIC``."""
        return lapic_get_reg(self.get_lapic(), offset)

    def set_lapic_reg(self, offset: int, value: int) -> None:
        """Write one LAPIC register: ``KVM_GET_LAPIC``, change it, ``KVM_SET_LAPIC``."""
        state = self.get_lapic()
        lapic_set_reg(state, offset, value)
        self.set_lapic(state)

    def tpr_access_reporting(self, enabled: bool = True) -> None:
        """``KVM_TPR_ACCESS_REPORTING``: when on, a guest access to the LAPIC TPR
        through MMIO ends the run with a ``TprAccess`` exit (``rip`` of the
        accessing instruction, ``is_write``) at KVM's next guest entry.  Needs
        the in-kernel LAPIC.  KVM fills those fields at the access: if another
        exit reaches user space first (seen here, where KVM's emulator runs
        several CPL0 instructions in a row), the report comes one run later
        with the fields overwritten by that exit."""
        self._ioctl(I.KVM_TPR_ACCESS_REPORTING, S.kvm_tpr_access_ctl(enabled=1 if enabled else 0))

    def set_vapic_addr(self, gpa: int) -> None:
        """``KVM_SET_VAPIC_ADDR``: guest physical address of the VAPIC page (0
        turns it off).  Before each entry KVM writes a u32 there: TPR in bits
        0-7, the highest in-service vector's class in bits 12-15 and the
        highest requested vector in bits 24-31 (only while the LAPIC is
        software-enabled, SPIV bit 8).  Needs the in-kernel LAPIC."""
        self._ioctl(I.KVM_SET_VAPIC_ADDR, S.kvm_vapic_addr(vapic_addr=_uint("gpa", gpa)))

    # -- CPU state machine and events ----------------------------------------------------
    def get_mp_state(self) -> int:
        """``KVM_GET_MP_STATE``: ``KVM_MP_STATE_RUNNABLE`` (0), ``..._HALTED`` (3) ..."""
        r = S.kvm_mp_state()
        self._ioctl(I.KVM_GET_MP_STATE, r)
        return r.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        """``KVM_SET_MP_STATE``.  A ``KVM_MP_STATE_HALTED`` vCPU stays inside
        ``KVM_RUN`` until an interrupt or NMI wakes it.  Without an in-kernel
        irqchip only ``KVM_MP_STATE_RUNNABLE`` is accepted (EINVAL)."""
        self._ioctl(I.KVM_SET_MP_STATE, S.kvm_mp_state(mp_state=_uint("mp_state", mp_state, _U32)))

    def get_vcpu_events(self) -> S.kvm_vcpu_events:
        """``KVM_GET_VCPU_EVENTS``: pending/injected exception, interrupt, NMI,
        SMI and interrupt shadow.  ``flags`` says which optional parts are valid."""
        r = S.kvm_vcpu_events()
        self._ioctl(I.KVM_GET_VCPU_EVENTS, r)
        return r

    def set_vcpu_events(self, events: S.kvm_vcpu_events) -> None:
        """``KVM_SET_VCPU_EVENTS``: e.g. inject an exception (``exception.injected``)
        or make an NMI pending (``nmi.pending`` with ``KVM_VCPUEVENT_VALID_NMI_PENDING``
        in ``flags``).  Fields guarded by a ``KVM_VCPUEVENT_VALID_*`` flag are
        ignored unless the flag is set."""
        _expect(events, S.kvm_vcpu_events)
        self._ioctl(I.KVM_SET_VCPU_EVENTS, events)

    def interrupt(self, irq: int) -> None:
        """``KVM_INTERRUPT``: queue external interrupt vector *irq* (0-255).

        Only without an in-kernel irqchip (ENXIO otherwise) and only when the
        guest can take it: check :attr:`ready_for_interrupt_injection`, or set
        :attr:`request_interrupt_window` and wait for ``IrqWindowOpen``.
        """
        self._ioctl(I.KVM_INTERRUPT, S.kvm_interrupt(irq=_uint("irq", irq, 255)))

    def nmi(self) -> None:
        """``KVM_NMI``: make an NMI pending (delivered on the next run unless NMIs
        are blocked).  With an in-kernel LAPIC this is the LINT1 input."""
        self._ioctl(I.KVM_NMI)

    def smi(self) -> None:
        """``KVM_SMI``: make an SMI pending (``KVM_CAP_X86_SMM``; kernels built
        without SMM support do not know the ioctl: ENOTTY)."""
        self._ioctl(I.KVM_SMI)

    @property
    def request_interrupt_window(self) -> bool:
        """``kvm_run.request_interrupt_window``: ask KVM to exit with
        ``IrqWindowOpen`` as soon as the guest can take an interrupt."""
        return bool(self._mm[_OFF_RIW])

    @request_interrupt_window.setter
    def request_interrupt_window(self, value: bool) -> None:
        self._mm[_OFF_RIW] = 1 if value else 0

    @property
    def ready_for_interrupt_injection(self) -> bool:
        """``kvm_run.ready_for_interrupt_injection`` after the last exit."""
        return bool(self._mm[_OFF_READY])

    @property
    def if_flag(self) -> bool:
        """``kvm_run.if_flag``: the guest's RFLAGS.IF at the last exit."""
        return bool(self._mm[_OFF_IF])

    # -- debugging ----------------------------------------------------------------------------
    def set_guest_debug(self, debug: Optional[S.kvm_guest_debug] = None, *, enable: bool = True,
                        single_step: bool = False, sw_breakpoints: bool = False,
                        hw_breakpoints: Sequence[int] = (), inject_db: bool = False,
                        inject_bp: bool = False, block_irq: bool = False) -> S.kvm_guest_debug:
        """``KVM_SET_GUEST_DEBUG``: debug the guest from user space.

        Pass a ready ``kvm_guest_debug``, or describe it with keywords:

        * ``single_step``: every instruction ends the run with a ``Debug`` exit
          (``exception`` 1, ``dr6`` bit 14 BS, ``pc`` = the next rip);
        * ``hw_breakpoints``: up to 4 execution addresses for DR0-DR3 (local
          enable, length 1): reaching one gives ``Debug`` with ``pc`` = the
          address and ``dr6`` bit *n* for slot *n*.  The run stops there again
          and again until the slot is cleared (KVM sets no RF for you);
        * ``sw_breakpoints``: an ``int3`` in the guest exits with ``Debug``
          (exception 3) instead of raising #BP in the guest;
        * ``inject_db`` / ``inject_bp``: queue a #DB / #BP into the guest now
          (EBUSY if an exception is already pending);
        * ``block_irq``: no interrupts while debugging (``KVM_CAP_SET_GUEST_DEBUG2``).

        ``enable=False`` turns debugging off.  Returns the structure passed to
        KVM.  ``KVM_CAP_SET_GUEST_DEBUG2`` lists the control bits KVM supports
        (x86 KVM does not refuse others, it ignores them).
        """
        if debug is not None:
            if (single_step or sw_breakpoints or hw_breakpoints or inject_db or inject_bp
                    or block_irq or not enable):
                raise TypeError("pass either a kvm_guest_debug or keywords, not both")
            _expect(debug, S.kvm_guest_debug)
        else:
            bps = [_uint("hw_breakpoints[]", a) for a in hw_breakpoints]
            if len(bps) > 4:
                raise ValueError(f"x86 has 4 hardware breakpoints (DR0-DR3), got {len(bps)}")
            control = 0
            if enable:
                control = S.KVM_GUESTDBG_ENABLE
                if single_step:
                    control |= S.KVM_GUESTDBG_SINGLESTEP
                if sw_breakpoints:
                    control |= S.KVM_GUESTDBG_USE_SW_BP
                if bps:
                    control |= S.KVM_GUESTDBG_USE_HW_BP
                if block_irq:
                    control |= S.KVM_GUESTDBG_BLOCKIRQ
            elif single_step or sw_breakpoints or bps or block_irq:
                raise ValueError("enable=False cannot be combined with debug features")
            if inject_db:
                control |= S.KVM_GUESTDBG_INJECT_DB
            if inject_bp:
                control |= S.KVM_GUESTDBG_INJECT_BP
            debug = S.kvm_guest_debug(control=control)
            dr7 = 0x400 if bps else 0  # bit 10 reads as 1
            for i, addr in enumerate(bps):
                debug.arch.debugreg[i] = addr
                dr7 |= 1 << (2 * i)  # Ln; R/Wn = 00 (execute), LENn = 00
            debug.arch.debugreg[7] = dr7
        self._ioctl(I.KVM_SET_GUEST_DEBUG, debug)
        return debug

    # -- signals during KVM_RUN -----------------------------------------------------------
    def set_signal_mask(self, signals: Optional[Iterable[int]]) -> None:
        """``KVM_SET_SIGNAL_MASK``: the signals blocked *while inside* ``KVM_RUN``.

        KVM swaps this mask in for the duration of the run, so a signal the
        thread normally blocks can still interrupt the guest (``Interrupted``),
        and the other way round.  ``None`` removes the mask (the thread's own
        mask applies again).  pykvm's kick signal should stay unblocked.
        """
        if signals is None:
            self._ioctl(I.KVM_SET_SIGNAL_MASK, 0)  # NULL: no mask
            return
        bits = 0
        for sig in signals:
            n = _int_arg("signal number", sig)
            if not 1 <= n <= 64:
                raise ValueError(f"signal number {n} out of range 1..64")
            bits |= 1 << (n - 1)
        m = S.flex(S.kvm_signal_mask, 8)
        m.len = 8  # the kernel's sigset_t size on x86-64
        m.sigset[:] = list(bits.to_bytes(8, "little"))
        self._ioctl(I.KVM_SET_SIGNAL_MASK, m)

    # -- sync regs (kvm_run.s.regs) --------------------------------------------------------
    @property
    def sync_regs(self) -> S.kvm_sync_regs:
        """``kvm_run.s.regs`` (regs, sregs, events) as a live ctypes view.

        ``KVM_CAP_SYNC_REGS``: KVM fills the parts selected with
        :meth:`set_sync_valid_reg` at every exit, and loads the parts marked
        with :meth:`set_sync_dirty_reg` on the next run (then clears those
        dirty bits) — register access without GET/SET ioctls.
        """
        return self.kvm_run.s.regs

    @property
    def sync_valid_regs(self) -> int:
        """``kvm_run.kvm_valid_regs`` (``KVM_SYNC_X86_REGS | SREGS | EVENTS`` bits)."""
        return self.kvm_run.kvm_valid_regs

    @property
    def sync_dirty_regs(self) -> int:
        """``kvm_run.kvm_dirty_regs``: parts KVM loads from ``sync_regs`` next run."""
        return self.kvm_run.kvm_dirty_regs

    def set_sync_valid_reg(self, mask: int) -> None:
        """Ask KVM to copy these parts into :attr:`sync_regs` at each exit."""
        self.kvm_run.kvm_valid_regs |= _sync_mask(mask)

    def clear_sync_valid_reg(self, mask: int) -> None:
        """Stop copying these parts out at exits."""
        self.kvm_run.kvm_valid_regs &= ~_sync_mask(mask)

    def set_sync_dirty_reg(self, mask: int) -> None:
        """Mark these parts of :attr:`sync_regs` as changed: KVM loads them on the next run."""
        self.kvm_run.kvm_dirty_regs |= _sync_mask(mask)

    def clear_sync_dirty_reg(self, mask: int) -> None:
        """Unmark parts marked with :meth:`set_sync_dirty_reg`."""
        self.kvm_run.kvm_dirty_regs &= ~_sync_mask(mask)

    # -- time --------------------------------------------------------------------------------
    def get_tsc_khz(self) -> int:
        """``KVM_GET_TSC_KHZ``: the guest's TSC frequency in kHz."""
        return self._ioctl(I.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        """``KVM_SET_TSC_KHZ``: the guest's TSC frequency.  Without TSC scaling
        (``KVM_CAP_TSC_CONTROL`` = 0) KVM accepts the host rate or a higher one
        (it then keeps the guest TSC caught up on entries) and refuses a
        lower one with EINVAL — after recording it: ``get_tsc_khz`` then
        reports the refused rate.  0 means the host rate."""
        self._ioctl(I.KVM_SET_TSC_KHZ, _uint("khz", khz, _U32))

    def kvmclock_ctrl(self) -> None:
        """``KVM_KVMCLOCK_CTRL``: tell the guest it was paused: KVM sets
        PVCLOCK_GUEST_STOPPED (bit 1 of ``flags``) in its kvmclock page at the
        next clock update.  EINVAL until the guest (or ``set_msrs``) enabled
        kvmclock (MSR_KVM_SYSTEM_TIME_NEW, 0x4b564d01)."""
        self._ioctl(I.KVM_KVMCLOCK_CTRL)

    # -- address translation, memory ------------------------------------------------------
    def translate_gva(self, gva: int) -> S.kvm_translation:
        """``KVM_TRANSLATE``: walk the guest's page tables for linear address *gva*.

        ``valid`` and ``physical_address`` are the answer; KVM reports
        ``writeable`` = 1 and ``usermode`` = 0 whatever the page tables say.
        """
        t = S.kvm_translation(linear_address=_uint("gva", gva))
        self._ioctl(I.KVM_TRANSLATE, t)
        return t

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> None:
        """``KVM_PRE_FAULT_MEMORY`` (``KVM_CAP_PRE_FAULT_MEMORY``): map guest
        physical [gpa, gpa+size) into the stage-2 page tables before the guest
        touches it.  Repeats the call until the whole range is done.  KVM
        without two-dimensional paging (shadow paging) refuses: EOPNOTSUPP."""
        r = S.kvm_pre_fault_memory(gpa=_uint("gpa", gpa), size=_uint("size", size),
                                   flags=_uint("flags", flags))
        while r.size:
            try:
                self._ioctl(I.KVM_PRE_FAULT_MEMORY, r)
            except KvmError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN):
                    continue  # progress (if any) is in r; redoing done pages is harmless
                raise

    # -- machine check ---------------------------------------------------------------------
    def setup_mce(self, mcg_cap: int) -> None:
        """``KVM_X86_SETUP_MCE``: give the guest machine-check banks.  *mcg_cap* is
        the IA32_MCG_CAP value: bank count in bits 0-7 (1-32) plus capability
        bits from ``Kvm.mce_cap_supported()`` (e.g. MCG_CTL_P, bit 8)."""
        self._ioctl(I.KVM_X86_SETUP_MCE, ctypes.c_uint64(_uint("mcg_cap", mcg_cap)))

    def set_mce(self, mce: Optional[S.kvm_x86_mce] = None, *, bank: int = 0, status: int = 0,
                addr: int = 0, misc: int = 0, mcg_status: int = 0) -> None:
        """``KVM_X86_SET_MCE``: report a machine check in *bank*.

        *status* needs MCi_STATUS.VAL (bit 63).  An uncorrected error (UC, bit
        61) raises #MC in the guest (a triple fault if CR4.MCE is clear or
        MCG_STATUS.MCIP is already set); a corrected one is only recorded in
        the bank's MSRs.
        """
        if mce is None:
            mce = S.kvm_x86_mce(status=_uint("status", status), addr=_uint("addr", addr),
                                misc=_uint("misc", misc), mcg_status=_uint("mcg_status", mcg_status),
                                bank=_uint("bank", bank, 0xFF))
        else:
            _expect(mce, S.kvm_x86_mce)
        self._ioctl(I.KVM_X86_SET_MCE, mce)

    # -- capabilities and attributes -----------------------------------------------------
    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the vCPU fd.  x86 vCPU capabilities:
        ``Cap.ENFORCE_PV_FEATURE_CPUID`` and the Hyper-V ones (``HYPERV_SYNIC``,
        ``HYPERV_SYNIC2``, ``HYPERV_ENLIGHTENED_VMCS``, ``HYPERV_DIRECT_TLBFLUSH``)."""
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
        ec = S.kvm_enable_cap(cap=_uint("cap", cap, _U32), flags=_uint("flags", flags, _U32))
        for i, a in enumerate(args):
            ec.args[i] = _uint(f"args[{i}]", a)
        self._ioctl(I.KVM_ENABLE_CAP, ec)

    # -- Xen ------------------------------------------------------------------------------------
    def xen_vcpu_get_attr(self, type_: int) -> S.kvm_xen_vcpu_attr:
        """``KVM_XEN_VCPU_GET_ATTR`` (``KVM_CAP_XEN_HVM``; EINVAL when KVM has no Xen support)."""
        a = S.kvm_xen_vcpu_attr(type=_uint("type", type_, 0xFFFF))
        self._ioctl(I.KVM_XEN_VCPU_GET_ATTR, a)
        return a

    def xen_vcpu_set_attr(self, attr: S.kvm_xen_vcpu_attr) -> None:
        """``KVM_XEN_VCPU_SET_ATTR``."""
        _expect(attr, S.kvm_xen_vcpu_attr)
        self._ioctl(I.KVM_XEN_VCPU_SET_ATTR, attr)

    # -- statistics ------------------------------------------------------------------------
    def get_stats_fd(self):
        """``KVM_GET_STATS_FD``: this vCPU's binary statistics (a :class:`pykvm.stats.Stats`,
        which owns the new fd: close it or use ``with``)."""
        from .stats import open_stats

        return open_stats(self.fileno())

    # -- closing --------------------------------------------------------------------------
    def _close_children(self) -> None:
        # close() from another thread while run() is inside KVM_RUN: stop the
        # guest first, so that nothing (Vm.close unmapping guest RAM, the fd
        # number being reused) happens under a running vCPU.
        if self._lock is None or self._thread == _get_ident():
            return  # closed from inside our own run() (a signal handler): nothing to wait for
        self._closing = True
        idle_waits = 0
        while not self._lock.acquire(timeout=0.05):
            if self._thread is not None:
                self.kick()  # a run() is inside KVM_RUN: make it return
                continue
            # Held by hold(): wait a moment for it, but never deadlock on a hold
            # that this thread owns or that nobody releases.
            idle_waits += 1
            if self._holder == _get_ident() or idle_waits >= 20:
                return
        self._holding_run_lock = True  # released in _after_close, once unmapped

    def _after_close(self) -> None:
        # The mapping keeps the kernel's vCPU alive, not our fd number, so
        # unmapping late is safe; unmap now unless someone holds a view.
        self._run_struct = None
        try:
            self._u32.release()
            self._mv.release()
            self._mm.close()
        except BufferError:
            pass  # a ctypes view of kvm_run is still referenced; GC unmaps it
        finally:
            if self._holding_run_lock:
                self._holding_run_lock = False
                self._lock.release()




def _sync_mask(mask: int) -> int:
    _uint("mask", mask)
    if mask & ~S.KVM_SYNC_X86_VALID_FIELDS:
        raise ValueError(f"sync-regs mask {mask:#x} has bits outside KVM_SYNC_X86_REGS|SREGS|EVENTS "
                         f"({S.KVM_SYNC_X86_VALID_FIELDS:#x}); KVM_RUN would fail with EINVAL")
    return mask


def _one_reg_size(reg_id: int) -> int:
    _uint("reg_id", reg_id)
    return 1 << ((reg_id & S.KVM_REG_SIZE_MASK) >> S.KVM_REG_SIZE_SHIFT)


def _lapic_offset(offset: int) -> int:
    _uint("offset", offset)
    if offset % 16 or offset >= S.KVM_APIC_REG_SIZE:
        raise ValueError(f"LAPIC register offset {offset:#x} is not a multiple of 16 below "
                         f"{S.KVM_APIC_REG_SIZE:#x}")
    return offset


def lapic_get_reg(state: S.kvm_lapic_state, offset: int) -> int:
    """The 32-bit LAPIC register at *offset* (0x20 ID, 0x80 TPR, 0xF0 SPIV ...) of *state*."""
    _expect(state, S.kvm_lapic_state)
    off = _lapic_offset(offset)
    return int.from_bytes(bytes(state.regs[off:off + 4]), "little")


def lapic_set_reg(state: S.kvm_lapic_state, offset: int, value: int) -> None:
    """Write the 32-bit LAPIC register at *offset* in *state* (then ``set_lapic`` it)."""
    _expect(state, S.kvm_lapic_state)
    off = _lapic_offset(offset)
    state.regs[off:off + 4] = list(_uint("value", value, _U32).to_bytes(4, "little"))


class _Held:
    """What :meth:`Vcpu.hold` returns: releases the run lock on exit (once)."""

    __slots__ = ("vcpu", "_held")

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu, self._held = vcpu, True

    def __enter__(self) -> Vcpu:
        return self.vcpu

    def release(self) -> None:
        """Let ``run()`` in again (idempotent)."""
        if self._held:
            self._held = False
            self.vcpu._holder = None
            self.vcpu._lock.release()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a hold dropped without release must not block the vCPU
        self.release()


class Watchdog:
    """A pending :meth:`Vcpu.kick_after`: ``cancel()``, ``fired``, context manager."""

    def __init__(self, vcpu: Vcpu, seconds: float) -> None:
        self.fired = False
        self._vcpu = vcpu
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        try:
            self._vcpu.kick()
            self.fired = True
        except KvmClosedError:
            pass

    def cancel(self) -> None:
        """Stop the watchdog if it has not fired yet."""
        self._timer.cancel()

    def __enter__(self) -> "Watchdog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
