"""What this host's KVM does for a debugger, found out by running two tiny guests.

Intel VMX and AMD SVM intercept ``int3``, single steps and debug-register
breakpoints at every privilege level.  KVM built on other mechanisms (PVM)
does not intercept them for CPL3 code: the #BP/#DB goes to the guest.  The
stub must know before it promises gdb a single step of CPL3 code.
"""

from __future__ import annotations

import dataclasses
import threading

from .. import exits
from ..system import Kvm
from ..uapi import structs
from ..uapi.enums import Cap

__all__ = ["DebugSupport", "debug_support"]


@dataclasses.dataclass(frozen=True)
class DebugSupport:
    """Which debug features reach user space on this host, by guest privilege level.

    ``step_cpl3``: ``KVM_GUESTDBG_SINGLESTEP`` stops CPL3 code with a debug
    exit; ``sw_bp_cpl3``: ``int3`` at CPL3 exits with ``KVM_GUESTDBG_USE_SW_BP``.
    Both are true on Intel VMX and AMD SVM; PVM delivers them to the guest.
    ``guest_debug_flags`` is ``KVM_CAP_SET_GUEST_DEBUG2`` (0 if unknown).
    """

    step_cpl3: bool
    sw_bp_cpl3: bool
    guest_debug_flags: int


_support: DebugSupport | None = None
_support_lock = threading.Lock()

# CPL3 probe: int3, then nops, then a jump to itself.  The guest has no IDT: if the
# #BP/#DB reaches the guest instead of user space it shuts down (not a Debug exit).
_PROBE_CODE = bytes([0xCC, 0x90, 0x90, 0x90, 0xEB, 0xFE])
_CODE, _STACK = 0x10000, 0xF000
# The longest a probe guest may run: it needs a handful of instructions; the
# watchdog only matters on a host that neither exits nor faults.
_PROBE_SECONDS = 2.0


def debug_support(kvm: Kvm | None = None) -> DebugSupport:
    """Probe (once per process, a few ms) how this host's KVM handles guest debugging at CPL3."""
    global _support
    with _support_lock:
        if _support is not None:
            return _support
        own = kvm is None
        k = Kvm() if kvm is None else kvm
        try:
            flags = k.check_extension(Cap.SET_GUEST_DEBUG2)
            sw = _probe_cpl3(k, structs.KVM_GUESTDBG_ENABLE | structs.KVM_GUESTDBG_USE_SW_BP, 0)
            step = _probe_cpl3(k, structs.KVM_GUESTDBG_ENABLE | structs.KVM_GUESTDBG_SINGLESTEP, 1)
            _support = DebugSupport(step, sw, flags)
        finally:
            if own:
                k.close()
        return _support


def _probe_cpl3(kvm: Kvm, control: int, rip_offset: int) -> bool:
    """Run the probe at CPL3 (starting *rip_offset* bytes in) under *control*: a debug exit?"""
    from .. import x86  # the x86 set-up only when a probe runs

    with kvm.create_vm() as vm:
        vm.add_memory(0, 0x200000)
        vm.write(_CODE, _PROBE_CODE)
        vcpu = vm.create_vcpu()
        x86.setup_long_mode(vcpu, x86.Arena(vm, 0x1000, 0xD000), entry=_CODE + rip_offset,
                            stack=_STACK, cpl=3, identity=(0, 0x200000), user=True)
        vcpu.set_guest_debug(structs.kvm_guest_debug(control=control))
        with vcpu.kick_after(_PROBE_SECONDS):
            return isinstance(vcpu.run(), exits.Debug)
