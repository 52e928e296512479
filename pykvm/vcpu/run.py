"""The vCPU run engine: ``run``/``run_raw``, ``kick``, ``hold``, ``kick_after``.

Apart from the state ioctls (the other modules of :mod:`pykvm.vcpu`), as in
Firecracker's ``vstate/vcpu.rs``.  Each vCPU maps its ``kvm_run`` area (run
page, PIO data page, coalesced MMIO ring ...) with the size
``KVM_GET_VCPU_MMAP_SIZE`` reports.  :meth:`RunEngine.run` issues ``KVM_RUN``
and returns a typed exit from :mod:`pykvm.vcpu.exits`; :meth:`RunEngine.run_raw`
returns just the exit reason number for the tightest loops.

Guarantees (each held by a test, see ``docs/safety.md``):

* one runner: a second thread calling ``run()`` gets ``KvmError`` (EBUSY),
  never a second ``KVM_RUN`` on the same vCPU;
* the exit is decoded under the run lock, so ``close()`` from another thread
  (which kicks and then waits for that lock) never unmaps the page under a
  decoder;
* ``kick()`` never signals a thread that has left ``run()`` (the handshake
  below), and a kick signal whose disposition was reset to ``SIG_IGN`` or
  ``SIG_DFL`` gives a clear error instead of a silent no-op or a killed process;
* ``KVM_EXIT_MEMORY_FAULT`` (a failed ``KVM_RUN`` with the exit filled in) is
  returned as :class:`~pykvm.vcpu.exits.MemoryFault`, not raised;
* after ``fork()`` the child's vCPU is inert: ``close()`` never waits for a
  lock held by a parent thread and never writes the parent's run page.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import signal
import sys
import threading
import time

from .. import _kick, _sys
from ..errors import KvmClosedError, KvmError
from ..fd import FdObject, raise_error
from ..uapi import ioctls as I
from ..uapi import structs as S
from ..uapi.enums import ExitReason
from .exits import DECODE_TABLE, INTERRUPTED, IO_LAYOUT, Exit, IoIn, IoOut, _d_fault, _unknown

_new = object.__new__
_io_unpack = IO_LAYOUT.format.unpack_from
_IO_AT = IO_LAYOUT.offset

__all__ = ["RunEngine", "Watchdog", "ensure_kick_handler"]

ensure_kick_handler = _kick.ensure_kick_handler
_libc_run_ioctl = _sys.ioctl_noarg


if sys.version_info < (3, 14):
    # fcntl.ioctl(fd, KVM_RUN) with no third argument: CPython's cheapest
    # path (an int argument is first tried as a buffer first).
    _run_ioctl = fcntl.ioctl
else:
    # Since 3.14 fcntl.ioctl retries on EINTR by itself (gh-132768); with
    # pykvm's C-level kick handler a kick would then never end KVM_RUN.
    _run_ioctl = _libc_run_ioctl
_KVM_RUN = I.KVM_RUN
_EINTR = errno.EINTR
_EAGAIN = errno.EAGAIN
_MEMORY_FAULT_ERRNOS = (errno.EFAULT, getattr(errno, "EHWPOISON", 133))
_EXIT_MEMORY_FAULT = int(ExitReason.MEMORY_FAULT)
_EXIT_IO = int(ExitReason.IO)
_get_ident = threading.get_ident

# Exit-object reuse (CPython with the GIL, before 3.14): run() hands out a cached
# IoOut/IoIn again only when sys.getrefcount shows that nothing but the cache
# refers to it: the vCPU's attribute, run()'s local and getrefcount's own
# argument make 3.  Nobody else can observe such an object (the exit classes
# have no __weakref__ slot), so reusing it is invisible; an exit the caller
# still holds (the loop's previous `e`, a list, a RunLoop.Stop) is never
# touched: run() takes the second cached object or a new one.  Elsewhere (PyPy,
# free-threaded builds, 3.14's borrowed references) the cache holds None, whose
# count is never 3, so every exit is a new object.
_FREE = 3


def _refcounts_as_expected() -> bool:
    """Check, with the same code shape as run(), that a free cached object counts _FREE."""

    class _Box:
        pass

    def probe(box: _Box) -> int:
        e = box.slot  # type: ignore[attr-defined]
        return sys.getrefcount(e)

    box = _Box()
    box.slot = _Box()  # type: ignore[attr-defined]
    free = probe(box)
    kept = box.slot  # type: ignore[attr-defined]  # noqa: F841 - a second holder
    held = probe(box)
    return free == _FREE and held == _FREE + 1


_REUSE = bool(sys.implementation.name == "cpython" and sys.version_info < (3, 14)
              and getattr(sys, "_is_gil_enabled", lambda: True)() and _refcounts_as_expected())
_refcount = sys.getrefcount if _REUSE else (lambda obj: 1 << 30)

class RunEngine(FdObject):
    """The fd, the run page and the run protocol of a vCPU (base of :class:`~pykvm.vcpu.Vcpu`)."""

    _what = "vCPU"

    # Defaults so that a half-built object closes cleanly.
    _thread: int | None = None
    _holder: int | None = None
    _kicking = False
    _kick_sent = False
    _closing = False
    _holding_run_lock = False
    _lock = None
    _inert = False  # set in a forked child: the run page belongs to the parent

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
        self._run_struct: S.kvm_run | None = None
        self._set_run_lock()
        self._tid_lock = threading.Lock()   # guards _thread between run() and kick()
        self._thread = None
        # two cached exits per kind: the caller's previous exit may still be alive
        self._out_a = _new(IoOut) if _REUSE else None
        self._out_b = _new(IoOut) if _REUSE else None
        self._in_a = _new(IoIn) if _REUSE else None
        self._in_b = _new(IoIn) if _REUSE else None

    def __repr__(self) -> str:
        return f"<Vcpu {self.id} {self._state()}>"

    def _set_run_lock(self) -> None:
        # held by run(), run_raw(), hold() and close(); refuses a second runner
        self._lock = _RunLock()
        self._take = self._lock.take
        self._give = self._lock.give

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
        # The hot path: one list.pop as the run lock (atomic under the GIL, no
        # argument parsing), one ioctl, one decoder call, all under the lock.
        take, give = self._take, self._give  # not self._take(): LOAD_METHOD on an instance attribute is slow
        try:
            take()
        except IndexError:
            raise self._busy() from None
        try:
            self._thread = _get_ident()
            _run_ioctl(self._fd, _KVM_RUN)
            # Decode while still holding the run lock: close() waits for it.
            reason = self._u32[2]
            if reason == _EXIT_IO:  # the commonest exit: decoded inline (one frame less)
                mv = self._mv
                direction, size, port, count, off = _io_unpack(mv, _IO_AT)
                # Reuse a cached exit object only when nothing but the cache refers
                # to it (see _FREE): a kept exit is never changed afterwards.
                if direction:
                    e = self._out_a
                    if _refcount(e) > _FREE:
                        e = self._out_b
                        if _refcount(e) > _FREE:
                            e = _new(IoOut)
                    e.data = self._mm[off:off + size * count]
                else:
                    e = self._in_a
                    if _refcount(e) > _FREE:
                        e = self._in_b
                        if _refcount(e) > _FREE:
                            e = _new(IoIn)
                    e.data = mv[off:off + size * count]
                e.port = port
                e.size = size
                e.count = count
                return e
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
            give(True)

    def run_raw(self) -> int:
        """``KVM_RUN`` without decoding: return ``exit_reason`` as an int.

        The fast path for loops that read ``kvm_run`` fields themselves.  EINTR
        returns ``ExitReason.INTR`` (10) and clears ``immediate_exit``.
        """
        take, give = self._take, self._give  # not self._take(): LOAD_METHOD on an instance attribute is slow
        try:
            take()
        except IndexError:
            raise self._busy() from None
        try:
            self._thread = _get_ident()
            _run_ioctl(self._fd, _KVM_RUN)
            return self._u32[2]
        except OSError as e:
            return self._run_failed(e).reason
        except ValueError:
            raise KvmClosedError(self._what, "KVM_RUN") from None
        finally:
            self._thread = None
            if self._kicking:  # a kick() may be about to signal us: wait until it is done
                with self._tid_lock:
                    pass
            give(True)

    def _busy(self) -> KvmError:
        if self._closing or self._fd < 0:
            return KvmClosedError(self._what, "KVM_RUN")
        return KvmError(errno.EBUSY, "KVM_RUN", "another thread is running this vCPU")

    def _run_failed(self, e: OSError) -> Exit:
        err = e.errno
        if err == _EINTR or err == _EAGAIN:
            self._mm[1] = 0  # immediate_exit served its purpose
            self._kick_sent = False
            return INTERRUPTED
        if self._fd < 0:
            raise KvmClosedError(self._what, "KVM_RUN") from None
        if err in _MEMORY_FAULT_ERRNOS and self._u32[2] == _EXIT_MEMORY_FAULT:
            # KVM_CAP_MEMORY_FAULT_INFO: KVM_RUN fails with EFAULT/EHWPOISON and
            # fills kvm_run.memory_fault; the exit is valid for these errnos only.
            return _d_fault(self._mm, self._mv)
        raise raise_error(err, _KVM_RUN) from None

    def hold(self) -> contextlib.AbstractContextManager[RunEngine]:
        """A context manager that keeps ``run()`` out of ``KVM_RUN`` while it is held.

        For reading or writing a consistent vCPU state from one thread (snapshots,
        debuggers).  Raises ``KvmError`` (EBUSY) at once if another thread is
        inside ``run()`` now: ``kick()`` it and let ``run()`` return first.
        While held, ``run()`` from any thread raises EBUSY.
        """
        if self._fd < 0:
            raise KvmClosedError(self._what, "hold")
        try:
            self._take()  # the run token; refused at once while close() waits for it
        except IndexError:
            raise self._busy() from None
        self._holder = _get_ident()
        return _Held(self)

    def complete_pending_exit(self) -> Exit | None:
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
        thread inside ``KVM_RUN`` with ``pykvm._kick.KICK_SIGNAL`` (SIGRTMIN+6); if the program has
        reset that signal to ``SIG_IGN``/``SIG_DFL`` since, raises ``KvmError`` (EINVAL)
        naming the signal, after setting ``immediate_exit`` (the next entry still stops).
        """
        if self._fd < 0:
            raise KvmClosedError(self._what, "kick")
        if self._inert:
            raise KvmError(errno.EBADF, "kick", "this vCPU was inherited across fork(): it belongs "
                           "to the parent process; close it here and create a VM in this process")
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
        # restarts CPython's wait before it may ask for the GIL).
        with self._tid_lock:
            self._kicking = True
            try:
                tid = self._thread
                if tid is not None and not self._kick_sent:
                    # The program may have reset the signal since the vCPU was made:
                    # SIG_DFL would kill the process, SIG_IGN make the kick a no-op.
                    _kick.check_kick_handler()
                    try:
                        signal.pthread_kill(tid, _kick.KICK_SIGNAL)
                        self._kick_sent = True
                    except (ProcessLookupError, OSError):
                        pass
            finally:
                self._kicking = False

    def kick_after(self, seconds: float) -> Watchdog:
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


    # -- closing --------------------------------------------------------------------------
    def _close_children(self) -> None:
        # close() from another thread while run() is inside KVM_RUN: stop the
        # guest first, so that nothing (Vm.close unmapping guest RAM, the fd
        # number being reused) happens under a running vCPU.
        if self._lock is None or self._thread == _get_ident():
            return  # closed from inside our own run() (a signal handler): nothing to wait for
        self._closing = True
        # From now on run()/run_raw() find no token (and raise KvmClosedError):
        # a thread that calls run() in a loop cannot starve this close().
        self._take = _refuse
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

    def _after_fork_in_child(self) -> None:
        """Make this vCPU inert in a child of ``fork()`` (idempotent, never raises).

        The child shares the parent's run page (``MAP_SHARED``) and fd, but the
        threads that ran or held the vCPU do not exist here: a lock they held
        would stay held forever.  Fresh locks let ``close()`` finish at once;
        ``kick()`` refuses instead of writing ``immediate_exit`` into the
        parent's page; ``KVM_RUN`` from the child fails in KVM (EIO: another mm).
        ``close()`` only closes the child's copy of the fd and unmaps the
        child's copy of the mapping, which leaves the parent's vCPU untouched.
        """
        if self._inert:
            return
        self._inert = True
        self._set_run_lock()
        self._tid_lock = threading.Lock()
        self._thread = None
        self._holder = None
        self._kicking = False
        self._kick_sent = False
        self._holding_run_lock = False


def _refuse() -> None:
    """The run lock's ``take`` of a closing vCPU: never succeeds."""
    raise IndexError("the vCPU is closing")


class _RunLock:
    """The run lock: a one-token list, taken with ``pop`` and given back with ``append``.

    ``list.pop`` is one atomic step (under the GIL, and under the list's own
    lock in free-threaded builds), so at most one thread holds the token; it
    takes no arguments to parse, which makes it the cheapest try-lock CPython
    offers for ``run()``'s hot path.  ``acquire`` with blocking polls (only
    ``close()`` blocks on it, while it kicks the runner).
    """

    __slots__ = ("_free", "give", "take")

    def __init__(self) -> None:
        self._free = [True]
        #: take the token: raises IndexError when another holder has it
        self.take = self._free.pop
        #: give the token back (only its holder may)
        self.give = self._free.append

    def locked(self) -> bool:
        """True while a thread holds the token."""
        return not self._free

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the token; like ``threading.Lock.acquire`` (polls when it must wait)."""
        deadline = None if timeout < 0 else time.monotonic() + timeout
        delay = 0.0002
        while True:
            try:
                self.take()
                return True
            except IndexError:
                if not blocking or (deadline is not None and time.monotonic() >= deadline):
                    return False
            time.sleep(delay)
            delay = min(delay * 2, 0.005)

    def release(self) -> None:
        """Give the token back."""
        if self._free:
            raise RuntimeError("release of an unheld vCPU run lock")
        self.give(True)


class _Held:
    """What :meth:`Vcpu.hold` returns: releases the run lock on exit (once)."""

    __slots__ = ("_held", "vcpu")

    def __init__(self, vcpu: RunEngine) -> None:
        self.vcpu, self._held = vcpu, True

    def __enter__(self) -> RunEngine:
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

    def __init__(self, vcpu: RunEngine, seconds: float) -> None:
        self.fired = False
        #: the KvmError a kick raised (e.g. the kick signal was reset to SIG_DFL), else None
        self.error: KvmError | None = None
        self._vcpu = vcpu
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        # ``fired`` is set before the kick: the kicked thread may look at it as
        # soon as run() returns, before this timer thread runs again.
        self.fired = True
        try:
            self._vcpu.kick()
        except KvmClosedError:
            self.fired = False
        except KvmError as e:  # kept for the owner: a timer thread has nobody to raise to
            self.fired = False
            self.error = e

    def cancel(self) -> None:
        """Stop the watchdog if it has not fired yet."""
        self._timer.cancel()

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

