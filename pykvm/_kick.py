"""The signal that kicks a vCPU thread out of ``KVM_RUN``.

``Vcpu.kick()`` sets ``immediate_exit`` and sends :data:`KICK_SIGNAL` to the
thread inside ``KVM_RUN``; the signal makes the ioctl return EINTR.  For that
the signal needs a handler that does nothing (the default action of a
real-time signal would kill the process, and ``SIG_IGN`` would drop it
before it interrupts anything).

Python's ``signal.signal`` only works in the main thread and would route the
signal through the interpreter, so pykvm installs a C-level handler with
libc's ``sigaction`` instead: the handler is libc's ``getpid``, a function
that takes no arguments, touches nothing and is async-signal-safe.  The
handler is installed when the signal's disposition is the default or
``SIG_IGN`` (an ignored disposition is inherited across ``exec`` from any
parent that ignored the signal, and would silently make every kick a no-op);
a program that chose its own handler keeps it (any handler interrupts
``KVM_RUN`` equally well, ``SA_RESTART`` or not: ``KVM_RUN`` is never
restarted).  A thread that *blocks* the signal cannot be kicked out of
``KVM_RUN``; ``immediate_exit`` still stops its next entry.
"""

from __future__ import annotations

import ctypes
import errno
import signal
import threading

from . import _sys
from .errors import KvmError

__all__ = ["KICK_SIGNAL", "check_kick_handler", "ensure_kick_handler"]

#: Real-time signal used for kicks (SIGRTMIN + 6); change before creating vCPUs.
KICK_SIGNAL: int = int(signal.SIGRTMIN) + 6

_SIG_IGN = 1
_lock = threading.Lock()
_installed: set[int] = set()


def ensure_kick_handler(sig: int = 0) -> None:
    """Install the no-op handler for *sig* (default :data:`KICK_SIGNAL`) unless it has a handler."""
    sig = sig or KICK_SIGNAL
    # Checked on every call (once per vCPU, about a microsecond): a program may
    # have reset the disposition since, and SIG_DFL would make a kick kill it.
    with _lock:
        old = _sys.sigaction(sig, None)
        if old.sa_handler in (None, _SIG_IGN):  # SIG_DFL or SIG_IGN: install ours
            new = _sys.sigaction_t()
            new.sa_handler = ctypes.cast(_sys.libc.getpid, ctypes.c_void_p).value
            new.sa_flags = 0  # no SA_RESTART: we want EINTR
            _sys.sigaction(sig, new)
        _installed.add(sig)


def check_kick_handler(sig: int = 0) -> None:
    """Raise ``KvmError`` (EINVAL) if *sig* (default :data:`KICK_SIGNAL`) is ``SIG_DFL`` or ``SIG_IGN``.

    Called by ``Vcpu.kick()`` before each signal: with ``SIG_DFL`` a real-time
    signal kills the process, with ``SIG_IGN`` the kernel drops it and the kick
    would silently do nothing.  One ``sigaction`` query, no change.
    """
    sig = sig or KICK_SIGNAL
    handler = _sys.sigaction(sig, None).sa_handler
    if handler in (None, _SIG_IGN):
        which = "SIG_IGN" if handler == _SIG_IGN else "SIG_DFL"
        raise KvmError(errno.EINVAL, "kick",
                       f"signal {sig} (pykvm's kick signal) was set to {which} after the vCPU was "
                       f"created; not sending it (SIG_DFL would kill the process, SIG_IGN drops it). "
                       f"Install any handler, or call pykvm.vcpu.ensure_kick_handler(), then kick again")
