"""The vCPU: :class:`Vcpu`, its run engine, its state ioctls and its typed exits.

The package is split by concern, each part a mixin composed into ``Vcpu``:

* :mod:`.run` — the run engine (``run``/``run_raw``, ``kick``, ``hold``,
  ``kick_after``, ``complete_pending_exit``), the fd and the run page;
* :mod:`.exits` — typed exits, the one ``kvm_run`` exit layout table and the
  one answer encoder;
* :mod:`.regs` — registers, XSAVE, XCRs, debug registers, nested state,
  ONE_REG, sync regs;  :mod:`.msrs` — MSRs;  :mod:`.cpuid` — CPUID;
* :mod:`.lapic` — the in-kernel local APIC;  :mod:`.events` — MP state,
  pending events, interrupt/NMI/SMI injection, machine checks;
* :mod:`.debug` — guest debugging, address translation;  :mod:`.control` —
  signal mask, TSC, pre-faulting, ``enable_cap``, Xen, statistics.

Mixins keep the public API flat (``vcpu.get_regs()``, as rust-vmm's
kvm-ioctls ``VcpuFd``) while each file holds one concern; sub-objects
(``vcpu.regs.get()``) would have broken every caller for no gain.  Each method
wraps one ioctl (named as in kvm-ioctls where it has the ioctl, else the
ioctl's name without ``KVM_``) and its docstring starts with the ioctl.  Bad
arguments raise ``ValueError``/``TypeError`` before any ioctl; a refusal by the
kernel raises :class:`~pykvm.errors.KvmError` naming the ioctl.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from ..fd import DeviceAttrs, EnableCap
from .control import ControlMixin
from .cpuid import CpuidMixin
from .debug import DebugMixin
from .events import EventsMixin
from .lapic import LapicMixin, lapic_get_reg, lapic_set_reg
from .msrs import MsrsMixin, msrs_buffer
from .regs import RegsMixin
from .run import RunEngine, Watchdog, ensure_kick_handler

__all__ = [
    "Vcpu",
    "Watchdog",
    "create_vcpu",
    "ensure_kick_handler",
    "lapic_get_reg",
    "lapic_set_reg",
    "msrs_buffer",
]


class Vcpu(RegsMixin, MsrsMixin, CpuidMixin, LapicMixin, EventsMixin, DebugMixin, ControlMixin,
           EnableCap, DeviceAttrs, RunEngine):
    """A virtual CPU of a :class:`~pykvm.vm.Vm` (create with ``vm.create_vcpu``).

    vCPU device attributes (``has/get/set_device_attr``, ``KVM_CAP_VCPU_ATTRIBUTES``):
    on x86, group ``KVM_VCPU_TSC_CTRL`` (0), attribute ``KVM_VCPU_TSC_OFFSET`` (0):
    guest TSC = host TSC + offset (modulo 2**64).
    """


# vCPU fds whose set-up failed after KVM_CREATE_VCPU, by VM and id.  KVM never
# frees a vCPU before its VM (KVM_CREATE_VCPU with the same id answers EEXIST
# even after the fd is closed), so closing the fd would lose the id for good:
# the fd is parked here and the next create_vcpu() of that id adopts it.
_parked: weakref.WeakKeyDictionary[Any, dict[int, _ParkedFd]] = weakref.WeakKeyDictionary()


class _ParkedFd:
    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:  # the VM went away: nothing can adopt this fd any more
        import os

        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                os.close(fd)
            except OSError:
                pass


def create_vcpu(vm: Any, vcpu_id: int, mmap_size: int, create_fd: Callable[[], int]) -> Vcpu:
    """Build a :class:`Vcpu` on a fd from ``KVM_CREATE_VCPU`` so that a failure keeps the id usable.

    *create_fd* issues ``KVM_CREATE_VCPU`` for *vcpu_id* and returns the new fd.
    If the set-up after it fails (no memory for the ``kvm_run`` mapping, ...)
    the error is raised and the fd is kept with the VM instead of being
    closed: a later call with the same id (once resources are back) adopts it
    instead of asking KVM again, which would answer EEXIST for ever.  If
    ``KVM_CREATE_VCPU`` itself fails (e.g. EMFILE), KVM has already undone the
    vCPU and the id is free.  ``Vm.create_vcpu`` is meant to call this.
    """
    parked = _parked.get(vm)
    slot = parked.pop(vcpu_id, None) if parked else None
    if slot is not None:
        fd, slot.fd = slot.fd, -1
    else:
        fd = create_fd()
    try:
        return Vcpu(fd, vcpu_id, mmap_size, vm)
    except BaseException:
        _parked.setdefault(vm, {})[vcpu_id] = _ParkedFd(fd)
        raise
