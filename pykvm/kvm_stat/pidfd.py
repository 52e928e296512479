"""Borrow another process's fds: ``pidfd_open(2)`` + ``pidfd_getfd(2)``.

``pidfd_getfd(pidfd, targetfd, 0)`` (Linux 5.6) duplicates fd *targetfd* of
the process behind *pidfd* into the caller, close-on-exec, like ``dup(2)``
across processes: the copy refers to the same open file (for KVM, the same VM
or vCPU).  The kernel allows it only with ptrace access to the target in
``PTRACE_MODE_ATTACH_REALCREDS`` mode: same real uid and no Yama restriction
(``/proc/sys/kernel/yama/ptrace_scope``), or ``CAP_SYS_PTRACE``; otherwise it
answers ``EPERM``.  Python has :func:`os.pidfd_open` but no ``pidfd_getfd``,
so it is called through libc's ``syscall(2)``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["SYS_PIDFD_GETFD", "permission_hint", "pidfd_getfd", "pidfd_open", "ptrace_scope"]

#: The system call number of ``pidfd_getfd`` (the same on x86-64, arm64 and the
#: other architectures that use the generic table since Linux 5.1).
SYS_PIDFD_GETFD = 438

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def pidfd_open(pid: int) -> int:
    """A pidfd for process *pid* (close-on-exec); raises OSError (ESRCH: no such process)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**22 + 1:
        raise ValueError(f"pid {pid!r} is not a process id (1 .. 4194304)")
    return os.pidfd_open(pid)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """Duplicate fd *target_fd* of the process behind *pidfd*; return the new fd.

    Raises ``OSError``: EPERM without ptrace access (see :func:`permission_hint`),
    EBADF when the target has no such fd, ESRCH when it has exited.
    """
    if platform.machine() not in ("x86_64", "aarch64", "riscv64", "loongarch64"):
        raise OSError(38, f"pidfd_getfd: syscall number unknown on {platform.machine()}")
    if not 0 <= target_fd < 2**31:
        raise ValueError(f"fd {target_fd} out of range")
    fd = _syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd),
                  ctypes.c_int(target_fd), ctypes.c_uint(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd(fd {target_fd}): {os.strerror(err)}")
    return int(fd)


def ptrace_scope() -> int | None:
    """Yama's ``kernel.yama.ptrace_scope`` (0-3), or None when Yama is not built in."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def permission_hint(pid: int) -> str:
    """What the caller lacks to take *pid*'s fds, in one sentence."""
    scope = ptrace_scope()
    yama = ("Yama is not active" if scope is None
            else f"kernel.yama.ptrace_scope is {scope}"
            + (" (only ancestors may attach: set it to 0, or use CAP_SYS_PTRACE)" if scope == 1 else "")
            + (" (only CAP_SYS_PTRACE may attach)" if scope == 2 else "")
            + (" (no process may attach)" if scope == 3 else ""))
    return (f"taking another process's fds needs ptrace access to it "
            f"(PTRACE_MODE_ATTACH_REALCREDS): run as the user that owns process {pid} "
            f"(uid {_owner(pid)}) or with CAP_SYS_PTRACE (e.g. as root); {yama}")


def _owner(pid: int) -> str:
    try:
        return str(os.stat(f"/proc/{pid}").st_uid)
    except OSError:
        return "?"
