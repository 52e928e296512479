"""Helpers for the reliability tests: fd tables, mappings, RSS, child processes."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap

import pykvm
from pykvm import uapi

from . import _x86 as X

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fds() -> dict[int, str]:
    """{fd: readlink target} of this process."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the directory's own fd, gone by now
    return out


def kvm_fds() -> dict[int, str]:
    """The fds that point at KVM objects (device, VMs, vCPUs, devices, stats, guest_memfd)."""
    return {fd: t for fd, t in fds().items() if "kvm" in t}


def cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def maps() -> list[str]:
    with open("/proc/self/maps") as f:
        return f.read().splitlines()


def mapped(addr: int) -> bool:
    """True if *addr* lies in some mapping of this process."""
    for line in maps():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            return True
    return False


def kvm_run_mappings() -> list[str]:
    """Lines of /proc/self/maps that map a vCPU fd (the kvm_run areas)."""
    return [line for line in maps() if "kvm-vcpu" in line]


def rss() -> int:
    """Resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_fds(**kw) -> dict[int, str]:
    """Exec a fresh interpreter that inherits every inheritable fd; return its fd table."""
    code = ("import os\n"
            "for fd in sorted(os.listdir('/proc/self/fd'), key=int):\n"
            "    try: print(fd, os.readlink('/proc/self/fd/' + fd))\n"
            "    except OSError: pass\n")
    out = subprocess.run([sys.executable, "-c", code], close_fds=False, capture_output=True,
                         text=True, check=True, timeout=60, **kw).stdout
    return {int(a): b for a, b in (line.split(" ", 1) for line in out.splitlines())}


def run_python(code: str, *, timeout: float = 120, env=None, **kw) -> subprocess.CompletedProcess:
    """Run *code* (dedented) in a child interpreter with the checkout importable."""
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=e, cwd=REPO, **kw)


def build_zoo(kvm: pykvm.Kvm) -> dict:
    """One of every fd kind (and fd-backed mapping) pykvm can create here; {kind: object}.

    Kinds the host lacks (guest_memfd, dirty ring, devices) are left out, so the
    callers test what this machine can do.
    """
    from pykvm.eventfd import EventFd

    zoo = {"kvm": kvm}
    vm = kvm.create_vm()
    zoo["vm"] = vm
    if kvm.check_extension(pykvm.Cap.DIRTY_LOG_RING):
        vm.enable_dirty_ring(0x10000)          # before any vCPU
    vm.create_irq_chip()
    vm.create_pit2()
    zoo["mem"] = vm.add_memory(0, X.RAM)
    vcpu = vm.create_vcpu(0)
    zoo["vcpu"] = vcpu
    zoo["vm-stats"] = vm.get_stats_fd()
    zoo["vcpu-stats"] = vcpu.get_stats_fd()
    if kvm.check_extension(pykvm.Cap.GUEST_MEMFD):
        zoo["guest_memfd"] = vm.create_guest_memfd(0x10000)
    if vm.supports_device(uapi.KVM_DEV_TYPE_VFIO):
        zoo["device"] = vm.create_device(uapi.KVM_DEV_TYPE_VFIO)
    zoo["irqfd"] = EventFd()
    vm.register_irqfd(zoo["irqfd"], 5)
    zoo["ioeventfd"] = EventFd()
    vm.register_ioevent(zoo["ioeventfd"], 0x300000, length=4)
    if kvm.check_extension(pykvm.Cap.DIRTY_LOG_RING):
        zoo["dirty-ring"] = vm.dirty_ring(vcpu)
    if kvm.check_extension(pykvm.Cap.COALESCED_MMIO):
        vm.register_coalesced_mmio(0x310000, 0x1000)
        zoo["coalesced"] = vm.coalesced_ring(vcpu)
    return zoo


# --- calling every public method with made-up arguments ---------------------------------
def public_methods(obj) -> list[str]:
    """Names of the public callables and properties of *obj*'s class (not dunders)."""
    names = []
    for name in sorted(dir(type(obj))):
        if name.startswith("_"):
            continue
        names.append(name)
    return names


def synth_args(fn) -> tuple:
    """Plausible positional arguments for *fn*: what a type-correct caller would pass.

    Annotations are strings (``from __future__ import annotations``); a ctypes
    structure named in one is instantiated, containers are empty, numbers 0.
    """
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return ()
    args = []
    for p in sig.parameters.values():
        if p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        args.append(_value_for(ann, p.name))
    return tuple(args)


def _value_for(ann: str, name: str):
    for word in ann.replace("[", " ").replace("]", " ").replace(",", " ").replace(".", " ").split():
        cls = getattr(uapi, word, None)
        if isinstance(cls, type) and hasattr(cls, "_fields_"):
            try:
                return cls()
            except TypeError:
                pass
    low = ann.lower()
    if "mapping" in low or "dict" in low:
        return {}
    if "iterable" in low or "list" in low or "sequence" in low:
        return []
    if "bytes" in low or "buffer" in low:
        return b""
    if low.startswith("str") or name in ("name", "path"):
        return "x"
    if "bool" in low:
        return False
    return 0
