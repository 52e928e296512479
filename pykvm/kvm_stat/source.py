"""Where ``pykvm stat`` reads a process's KVM statistics from.

* :class:`FdSource` — binary statistics fds (``KVM_GET_STATS_FD``) borrowed
  from the process with ``pidfd_getfd`` (needs ptrace access to it).  A KVM
  fd is recognised by its ``/proc/PID/fd`` link: ``anon_inode:kvm-vm``,
  ``anon_inode:kvm-vcpu:N``, ``anon_inode:kvm-vm-stats``,
  ``anon_inode:kvm-vcpu-stats``.  The kernel answers every VM and vCPU ioctl,
  ``KVM_GET_STATS_FD`` included, only from the mm that created the VM (any
  other process gets ``EIO``), so a borrowed VM fd cannot hand out a stats fd:
  the source reads the stats fds the process itself holds (a pykvm script
  that called ``vm.get_stats_fd()``; a VMM that keeps them open), and tries
  ``KVM_GET_STATS_FD`` on the borrowed VM/vCPU fds only when there are none.
* :class:`DebugfsSource` — ``/sys/kernel/debug/kvm/PID-FD/``, one directory per
  VM, one file per statistic, vCPU statistics already summed over the VM's
  vCPUs by the kernel.  Needs debugfs mounted and root; the fallback.

Both give one flat sample ``{name: value}`` for the whole process: VM and
vCPU statistics of every VM of the process, summed (``peak`` statistics:
the maximum).  Histograms are left out of the sample.
"""

from __future__ import annotations

import errno
import os
import re
import select
from dataclasses import dataclass

from ..errors import KvmError
from ..stats import Stats, open_stats
from . import pidfd

__all__ = [
    "DEBUGFS_KVM",
    "DebugfsSource",
    "FdSource",
    "KvmFd",
    "NoAccess",
    "NoStatsFd",
    "StatSourceError",
    "kvm_fds",
    "process_name",
]

DEBUGFS_KVM = "/sys/kernel/debug/kvm"
_LINK = re.compile(r"anon_inode:kvm-(vm|vcpu|vm-stats|vcpu-stats)(?::(\d{1,7}))?")
_MAX_FDS = 1 << 20          # fds of one process inspected at most
_MAX_STAT_FILE = 64         # bytes read from one debugfs statistic file


class StatSourceError(Exception):
    """The process's statistics cannot be read (the message says why)."""


class NoAccess(StatSourceError):
    """The caller lacks the permission a source needs (the message names it)."""


class NoStatsFd(StatSourceError):
    """The process holds VM fds but no stats fd, and none can be made from outside it."""


@dataclass(frozen=True)
class KvmFd:
    """One KVM fd of a process: ``kind`` is ``"vm"`` or ``"vcpu"`` (with its ``vcpu`` id)."""

    fd: int
    kind: str          # "vm", "vcpu", "vm-stats" or "vcpu-stats"
    vcpu: int | None = None


def process_name(pid: int) -> str:
    """The process's command name (``/proc/PID/comm``), or ``"?"``."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read(64).decode("utf-8", "replace").strip() or "?"
    except OSError:
        return "?"


def kvm_fds(pid: int) -> list[KvmFd]:
    """The KVM VM and vCPU fds of process *pid*, from its ``/proc/PID/fd`` links.

    Raises :class:`StatSourceError` if there is no such process,
    :class:`NoAccess` if its fd table is closed to the caller.
    """
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        raise StatSourceError(f"no process {pid}") from None
    except PermissionError:
        raise NoAccess(f"cannot list {base}: EACCES: " + pidfd.permission_hint(pid)) from None
    found = []
    for name in names[:_MAX_FDS]:
        if not name.isdigit():
            continue
        try:
            link = os.readlink(f"{base}/{name}")
        except OSError:
            continue  # closed meanwhile
        m = _LINK.fullmatch(link)
        if m is not None and (m.group(2) is None) == m.group(1).startswith("vm"):
            found.append(KvmFd(int(name), m.group(1), None if m.group(2) is None else int(m.group(2))))
    order = {"vm": 0, "vcpu": 1, "vm-stats": 2, "vcpu-stats": 3}
    return sorted(found, key=lambda k: (order[k.kind], k.fd))


def _add(total: dict[str, int], name: str, value: int, peak: bool) -> None:
    total[name] = max(total.get(name, 0), value) if peak else total.get(name, 0) + value


class FdSource:
    """Statistics fds of every VM and vCPU fd of process *pid* (see the module doc)."""

    name = "stats-fd"

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._stats: list[Stats] = []
        fds = kvm_fds(pid)
        if not any(k.kind == "vm" for k in fds):
            raise StatSourceError(f"process {pid} ({process_name(pid)}) has no KVM VM fd "
                                  "(no anon_inode:kvm-vm link in /proc/%d/fd)" % pid)
        try:
            self._pidfd = pidfd.pidfd_open(pid)
        except ProcessLookupError:
            raise StatSourceError(f"no process {pid}") from None
        held = [k for k in fds if k.kind.endswith("-stats")]
        try:
            for k in held or fds:
                st = Stats(self._borrow(k)) if held else self._open(k)
                # One stats fd per VM/vCPU: a process may hold two fds of one vCPU
                # (a dup) or two stats fds of it.  The kernel's id ("kvm-PID",
                # "kvm-PID/vcpu-N") names the creating process, not the VM, so
                # several VMs of one process with the same vCPU ids read as one.
                if any(s.id == st.id for s in self._stats):
                    st.close()
                else:
                    self._stats.append(st)
        except BaseException:
            self.close()
            raise
        self.vms = sum(k.kind == "vm" for k in fds)
        self.vcpus = len({k.vcpu for k in fds if k.kind == "vcpu"})

    def _borrow(self, k: KvmFd) -> int:
        try:
            return pidfd.pidfd_getfd(self._pidfd, k.fd)
        except OSError as e:
            if e.errno == errno.EPERM:
                raise NoAccess(f"pidfd_getfd(pid {self.pid}, fd {k.fd}) failed: EPERM: "
                               + pidfd.permission_hint(self.pid)) from None
            raise StatSourceError(f"pidfd_getfd(pid {self.pid}, fd {k.fd}) failed: "
                                  f"{errno.errorcode.get(e.errno or 0, e.errno)}: {e.strerror}") from None

    def _open(self, k: KvmFd) -> Stats:
        dup = self._borrow(k)
        try:
            return open_stats(dup)  # the stats fd holds its own reference to the VM
        except KvmError as e:
            if e.errno == errno.EIO:
                raise NoStatsFd(
                    f"process {self.pid} holds no KVM stats fd, and the kernel answers "
                    f"KVM_GET_STATS_FD only to the process that created the VM (EIO on fd {k.fd} "
                    "borrowed from it)") from None
            raise StatSourceError(f"KVM_GET_STATS_FD on fd {k.fd} of pid {self.pid}: {e}") from None
        finally:
            os.close(dup)

    def exited(self) -> bool:
        """True once the process has exited (its pidfd polls readable)."""
        p = select.poll()
        p.register(self._pidfd, select.POLLIN)
        return bool(p.poll(0))

    def sample(self) -> dict[str, int]:
        """One sample of every scalar statistic, summed over the process's VMs and vCPUs."""
        total: dict[str, int] = {}
        for st in self._stats:
            words = st.read_raw()
            for d in st.descriptors:
                if d.is_histogram or d.size != 1:
                    continue
                _add(total, d.name, words[d.offset // 8], d.type == "peak")
        return total

    def close(self) -> None:
        """Close the statistics fds and the pidfd (idempotent)."""
        for st in self._stats:
            st.close()
        self._stats = []
        fd, self._pidfd = getattr(self, "_pidfd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> FdSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DebugfsSource:
    """``/sys/kernel/debug/kvm/PID-FD/*`` of process *pid* (see the module doc)."""

    name = "debugfs"

    def __init__(self, pid: int, root: str = DEBUGFS_KVM) -> None:
        self.pid = pid
        try:
            entries = os.listdir(root)
        except FileNotFoundError:
            raise StatSourceError(f"{root} does not exist (debugfs not mounted: "
                                  "'mount -t debugfs none /sys/kernel/debug')") from None
        except PermissionError:
            raise NoAccess(f"cannot list {root}: EACCES: debugfs is readable by root only") from None
        prefix = f"{pid}-"
        self._dirs = sorted(os.path.join(root, e) for e in entries
                            if e.startswith(prefix) and e[len(prefix):].isdigit())
        if not self._dirs:
            raise StatSourceError(f"no VM of process {pid} in {root}")
        self.vms = len(self._dirs)
        self.vcpus = sum(1 for d in self._dirs for e in os.listdir(d)
                         if e.startswith("vcpu") and e[4:].isdigit())
        try:
            self._pidfd = pidfd.pidfd_open(pid)
        except ProcessLookupError:
            raise StatSourceError(f"no process {pid}") from None
        #: statistic name -> errno name of files that could not be read
        self.unreadable: dict[str, str] = {}

    def exited(self) -> bool:
        """True once the process has exited."""
        p = select.poll()
        p.register(self._pidfd, select.POLLIN)
        return bool(p.poll(0))

    def sample(self) -> dict[str, int]:
        """One sample: every readable integer file of the VM directories, summed."""
        total: dict[str, int] = {}
        for d in self._dirs:
            try:
                names = os.listdir(d)
            except OSError:
                continue  # the VM went away
            for name in names:
                path = os.path.join(d, name)
                if name.endswith("_hist") or not os.path.isfile(path):
                    continue
                try:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        raw = os.read(fd, _MAX_STAT_FILE)
                    finally:
                        os.close(fd)
                    value = int(raw.split()[0]) if raw.strip() else None
                except OSError as e:
                    self.unreadable[name] = errno.errorcode.get(e.errno or 0, str(e.errno))
                    continue
                except (ValueError, IndexError):
                    self.unreadable[name] = "not a number"
                    continue
                if value is not None and value >= 0:
                    _add(total, name, value, name.startswith("max_"))
        return total

    def close(self) -> None:
        """Close the pidfd (idempotent)."""
        fd, self._pidfd = getattr(self, "_pidfd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> DebugfsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
