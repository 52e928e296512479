"""The vCPU fd (``Vcpu``): registers, run loop, kick.

Each vCPU maps its ``kvm_run`` area (run page, PIO data page, coalesced MMIO
ring ...) with the size ``KVM_GET_VCPU_MMAP_SIZE`` reports.  :meth:`Vcpu.run`
issues ``KVM_RUN`` and returns a typed exit from :mod:`pykvm.exits`;
:meth:`Vcpu.run_raw` returns just the exit reason number for the tightest
loops.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import signal
import threading
from typing import Dict, Iterable, List, Mapping, Optional, Union

from . import _kick
from ._ioctl import FdObject, raise_error
from .errors import KvmClosedError, KvmError
from .exits import DECODE_TABLE, INTERRUPTED, Exit, _unknown
from .uapi import ioctls as I
from .uapi import structs as S

__all__ = ["Vcpu"]

_fcntl_ioctl = fcntl.ioctl
_KVM_RUN = I.KVM_RUN
_EINTR = errno.EINTR
_EAGAIN = errno.EAGAIN
_get_ident = threading.get_ident


def _msrs_buffer(indices: Iterable[int]):
    idx = [int(i) for i in indices]
    for i in idx:
        if not 0 <= i <= 0xFFFFFFFF:
            raise ValueError(f"MSR index {i:#x} is not a 32-bit value")
    buf = S.flex(S.kvm_msrs, len(idx))
    for k, i in enumerate(idx):
        buf.entries[k].index = i
    return buf


class Vcpu(FdObject):
    """A virtual CPU of a :class:`~pykvm.vm.Vm` (create with ``vm.create_vcpu``)."""

    _what = "vCPU"

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int, vm) -> None:
        super().__init__(fd)
        self.id = vcpu_id
        self.vm = vm  # keeps the VM (and its guest memory) alive
        try:
            self._mm = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise KvmError(e.errno, "mmap(vcpu fd)", f"could not map {mmap_size} bytes of kvm_run") from None
        self._mv = memoryview(self._mm)
        self._u32 = self._mv.cast("I")  # exit_reason is self._u32[2]
        self._run_struct: Optional[S.kvm_run] = None
        self._lock = threading.Lock()
        self._thread: Optional[int] = None
        _kick.ensure_kick_handler()

    def __repr__(self) -> str:
        return f"<Vcpu {self.id} {self._state()}>"

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
            raise KvmError(errno.EBUSY, "KVM_RUN", "another thread is running this vCPU")
        try:
            self._thread = _get_ident()
            _fcntl_ioctl(self._fd, _KVM_RUN, 0)
        except OSError as e:
            return self._run_failed(e)
        except ValueError:  # fd is -1: closed
            raise KvmClosedError(self._what, "KVM_RUN") from None
        finally:
            self._thread = None
            lock.release()
        reason = self._u32[2]
        if reason < 64:
            return DECODE_TABLE[reason](self._mm, self._mv)
        return _unknown(self._mm, self._mv)

    def run_raw(self) -> int:
        """``KVM_RUN`` without decoding: return ``exit_reason`` as an int.

        The fast path for loops that read ``kvm_run`` fields themselves.  EINTR
        returns ``ExitReason.INTR`` (10) and clears ``immediate_exit``.
        """
        lock = self._lock
        if not lock.acquire(False):
            raise KvmError(errno.EBUSY, "KVM_RUN", "another thread is running this vCPU")
        try:
            self._thread = _get_ident()
            _fcntl_ioctl(self._fd, _KVM_RUN, 0)
        except OSError as e:
            self._run_failed(e)
            return 10
        except ValueError:
            raise KvmClosedError(self._what, "KVM_RUN") from None
        finally:
            self._thread = None
            lock.release()
        return self._u32[2]

    def _run_failed(self, e: OSError) -> Exit:
        if e.errno in (_EINTR, _EAGAIN):
            self._mm[1] = 0  # immediate_exit served its purpose
            return INTERRUPTED
        if self._fd < 0:
            raise KvmClosedError(self._what, "KVM_RUN") from None
        raise raise_error(e.errno, _KVM_RUN) from None

    def kick(self) -> None:
        """Make a ``run()`` in progress (or the next one) return ``Interrupted`` promptly.

        Safe to call from any thread: sets ``immediate_exit`` and signals the
        thread inside ``KVM_RUN`` with :data:`pykvm._kick.KICK_SIGNAL`.
        """
        if self._fd < 0:
            raise KvmClosedError(self._what, "kick")
        self._mm[1] = 1
        tid = self._thread
        if tid is not None:
            try:
                signal.pthread_kill(tid, _kick.KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass  # the thread left KVM_RUN meanwhile; immediate_exit covers it

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
        """``KVM_GET_FPU``: x87 and SSE state."""
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
        items = list(values.items())
        buf = _msrs_buffer(k for k, _ in items)
        for k, (_, v) in enumerate(items):
            if not 0 <= v < 2**64:
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

    # -- closing --------------------------------------------------------------------------
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


def _expect(obj: object, cls: type) -> None:
    if not isinstance(obj, cls):
        raise TypeError(f"expected {cls.__name__}, got {type(obj).__name__}")
