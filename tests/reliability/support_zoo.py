"""Objects for the reliability tests: one of every fd kind (the zoo), and made-up arguments for their methods."""

from __future__ import annotations

import pykvm
from pykvm import uapi
from tests.support.guests import RAM


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
    zoo["mem"] = vm.add_memory(0, RAM)
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
