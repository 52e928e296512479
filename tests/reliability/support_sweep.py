"""Call every public method and constructor of pykvm's object layer with made-up arguments.

Used by the bad-input tests: a *world* holds one live object of each kind
(a VM with irqchip, memory, a vCPU that never runs, a device, a guest_memfd,
an eventfd, stats fds, a dirty ring ...).  :func:`targets` lists
``(kind, name, bound_callable)`` for every public method pykvm defines on
them, :func:`valid_args` makes keyword arguments a correct caller could pass,
and :func:`call` runs one call and classifies the outcome.
"""

from __future__ import annotations

import ctypes
import inspect
from collections.abc import Callable

import pykvm
from pykvm import uapi
from pykvm.eventfd import EventFd
from tests.support import guests

#: Never called by the sweep: they run the guest, block, or end the object.
SKIP = {"run", "run_raw", "close", "wait", "kick", "kick_after", "fileno"}  # kick_after: tests/vcpu/test_run_page.py


def make_world(kvm: pykvm.Kvm) -> dict[str, object]:
    w: dict[str, object] = {"kvm": kvm}
    vm = kvm.create_vm()
    w["vm"] = vm
    if kvm.check_extension(pykvm.Cap.DIRTY_LOG_RING):
        vm.enable_dirty_ring(0x10000)
    vm.create_irq_chip()
    w["mem"] = vm.add_memory(0, guests.RAM)
    vcpu = vm.create_vcpu(0)
    w["vcpu"] = vcpu
    w["vm-stats"] = vm.get_stats_fd()
    w["efd"] = EventFd()
    if kvm.check_extension(pykvm.Cap.GUEST_MEMFD):
        w["gmem"] = vm.create_guest_memfd(0x10000)
    if vm.supports_device(uapi.KVM_DEV_TYPE_VFIO):
        w["device"] = vm.create_device(uapi.KVM_DEV_TYPE_VFIO)
    if kvm.check_extension(pykvm.Cap.DIRTY_LOG_RING):
        w["dirty-ring"] = vm.dirty_ring(vcpu)
    if kvm.check_extension(pykvm.Cap.COALESCED_MMIO):
        w["coalesced"] = vm.coalesced_ring(vcpu)
    return w


class Constructors:
    """The public constructors that take no fd ownership, as methods of one object."""

    def __init__(self) -> None:
        from pykvm.vm import MsrFilterRange

        self.EventFd = EventFd
        self.MsrFilterRange = MsrFilterRange
        self.Kvm = pykvm.Kvm            # paths are stat()ed, only 10:232 is ever opened


def _module_targets(kind: str, mod) -> list[tuple[str, str, Callable]]:
    out = []
    for name in getattr(mod, "__all__", ()):
        obj = getattr(mod, name)
        if inspect.isfunction(obj):
            out.append((kind, name, obj))
    return out


def close_world(w: dict[str, object]) -> None:
    for k in ("efd", "vm-stats", "vm"):
        w[k].close()


def _own(obj, name: str) -> bool:
    """True if *name* is defined by pykvm (not inherited from mmap or object)."""
    for cls in type(obj).__mro__:
        if name in cls.__dict__:
            return cls.__module__.startswith("pykvm")
    return False


def targets(w: dict[str, object]) -> list[tuple[str, str, Callable]]:
    """Every public method of the world's objects, the module-level helpers of
    pykvm.irq / pykvm.dirty / pykvm.eventfd, and the fd-less constructors."""
    import pykvm.dirty
    import pykvm.eventfd
    import pykvm.irq

    out = []
    for kind, mod in (("irq", pykvm.irq), ("dirty", pykvm.dirty), ("eventfd", pykvm.eventfd)):
        out.extend(_module_targets(kind, mod))
    ctors = Constructors()
    out.extend(("ctor", name, getattr(ctors, name)) for name in ("EventFd", "MsrFilterRange", "Kvm"))
    for kind, obj in w.items():
        for name in sorted(dir(type(obj))):
            if name.startswith("_") or name in SKIP or not _own(obj, name):
                continue
            if isinstance(inspect.getattr_static(obj, name), property):
                continue  # properties are covered by the setter tests
            attr = getattr(obj, name)
            if callable(attr):
                out.append((kind, name, attr))
    return out


def parameters(fn) -> list[inspect.Parameter]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [p for p in sig.parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _struct_for(ann: str):
    for word in ann.replace("[", " ").replace("]", " ").replace(",", " ").replace(".", " ").split():
        cls = getattr(uapi, word, None)
        if isinstance(cls, type) and issubclass(cls, (ctypes.Structure, ctypes.Union)):
            return cls
    return None


def valid_value(p: inspect.Parameter, w: dict[str, object]):
    """A value a type-correct caller could pass for parameter *p*."""
    if p.default is not p.empty:
        return p.default
    ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
    name = p.name
    if name in ("fd", "resamplefd"):
        return w["efd"]
    if name == "vcpu" or "Vcpu" in ann:
        return w["vcpu"]
    if name == "mem" or "GuestMemory" in ann:
        return w["mem"]
    if name in ("data", "value") and "bytes" in ann:
        return b"\0"
    if name == "ranges":
        return []
    cls = _struct_for(ann)
    if cls is not None:
        return cls()
    low = ann.lower()
    if "mapping" in low or "dict" in low:
        return {}
    if "iterable" in low or "list" in low or "sequence" in low:
        return []
    if low.startswith("str") or name in ("name", "path"):
        return "x"
    if low.startswith("bool"):
        return False
    if name in ("size", "length", "memory_size", "n", "num_pages"):
        return 0x1000
    if name == "gsi":
        return 5
    return 0


def valid_args(fn, w) -> dict[str, object]:
    return {p.name: valid_value(p, w) for p in parameters(fn)}


def call(fn, kwargs: dict[str, object]) -> tuple[str, BaseException]:
    """Call ``fn(**kwargs)``; return (outcome, exception or None)."""
    pos, kw = [], {}
    for p in parameters(fn):
        if p.name not in kwargs:
            continue
        if p.kind == p.POSITIONAL_ONLY:
            pos.append(kwargs[p.name])
        else:
            kw[p.name] = kwargs[p.name]
    try:
        fn(*pos, **kw)
        return "ok", None
    except BaseException as e:
        return type(e).__name__, e


def int_like(p: inspect.Parameter, w) -> bool:
    v = valid_value(p, w)
    ann = p.annotation if isinstance(p.annotation, str) else ""
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (ann.startswith("int") or ann.startswith("Optional[int"))


def element_is_int(p: inspect.Parameter) -> bool:
    """True if *p* is annotated as a collection of ints (``Iterable[int]`` ...)."""
    ann = p.annotation if isinstance(p.annotation, str) else ""
    return any(f"{c}[int]" in ann for c in ("Iterable", "List", "Sequence", "Optional[Iterable"))
