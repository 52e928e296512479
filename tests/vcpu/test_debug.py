"""KVM_SET_GUEST_DEBUG: single step, hardware breakpoints, int3, injected #DB/#BP.

The guests run at CPL0 (real mode), which this host emulates: KVM's emulator
checks single step and execution breakpoints itself.  (At CPL3, which PVM
runs natively, guest debugging has no effect here: a single step raises #DB
inside the guest and DR0-3 breakpoints never fire.  Data breakpoints are not
checked by the emulator either.)
"""

from __future__ import annotations

import pytest

import pykvm
from pykvm.uapi import structs as S
from tests.support.guests import HANDLER_PORT, real_mode_handlers
from tests.support.host import host_is_pvm
from tests.support.runs import outs, run_until

STEPS = bytes.fromhex(
    "b80100"                    # 0x00: mov ax,0x1
    "40"                        # 0x03: inc ax
    "40"                        # 0x04: inc ax
    "40"                        # 0x05: inc ax
    "40"                        # 0x06: inc ax
    "e710"                      # 0x07: out 0x10,ax
    "f4"                        # 0x09: hlt
)
DR6_BS = 1 << 14


def test_single_step_gives_successive_rips(vm, watchdog):
    vcpu = real_mode_handlers(vm, STEPS, [1])
    vcpu.set_guest_debug(single_step=True)
    steps = []
    with watchdog(vcpu):
        for _ in range(4):
            e = vcpu.run()
            assert isinstance(e, pykvm.Debug), e
            assert e.exception == 1 and e.dr6 & DR6_BS
            assert e.pc == vcpu.get_regs().rip
            steps.append((e.pc, vcpu.get_regs().rax & 0xFFFF))
    assert steps == [(0x1003, 1), (0x1004, 2), (0x1005, 3), (0x1006, 4)]
    vcpu.set_guest_debug(enable=False)
    exits = run_until(vcpu)
    assert outs(exits, 0x10) == [5] and isinstance(exits[-1], pykvm.Hlt)
    assert outs(exits, HANDLER_PORT) == []           # no #DB reached the guest


def test_hardware_breakpoints_stop_at_their_rips(vm, watchdog):
    """DR0-DR3 on four instructions (given out of order): each stops the run
    before its instruction, with its own bit in DR6.  KVM stops again on the
    same breakpoint until it is disabled (clearing its Ln bit in DR7)."""
    vcpu = real_mode_handlers(vm, STEPS, [1])
    addrs = [0x1006, 0x1003, 0x1007, 0x1005]
    dbg = vcpu.set_guest_debug(hw_breakpoints=addrs)
    assert dbg.control == S.KVM_GUESTDBG_ENABLE | S.KVM_GUESTDBG_USE_HW_BP
    assert list(dbg.arch.debugreg[:4]) == addrs and dbg.arch.debugreg[7] == 0x455
    hits = []
    with watchdog(vcpu):
        for _ in range(4):
            e = vcpu.run()
            assert isinstance(e, pykvm.Debug) and e.exception == 1, e
            slot = (e.dr6 & 0xF).bit_length() - 1
            assert e.dr6 & 0xF == 1 << slot
            hits.append((e.pc, slot, vcpu.get_regs().rax & 0xFFFF))
            assert vcpu.run() == e                     # still there
            dbg.arch.debugreg[7] &= ~(1 << (2 * slot))  # disable that slot, keep the rest
            vcpu.set_guest_debug(dbg)
    assert hits == [(0x1003, 1, 1), (0x1005, 3, 3), (0x1006, 0, 4), (0x1007, 2, 5)]
    exits = run_until(vcpu)
    assert outs(exits, 0x10) == [5] and outs(exits, HANDLER_PORT) == []


INT3 = bytes.fromhex(
    "b80100"                    # 0x00: mov ax,0x1
    "cc"                        # 0x03: int3
    "40"                        # 0x04: inc ax
    "e710"                      # 0x05: out 0x10,ax
    "f4"                        # 0x07: hlt
)


def test_sw_breakpoint(vm, watchdog):
    """KVM_GUESTDBG_USE_SW_BP: on VMX/SVM ``int3`` exits to user space with
    ``Debug(exception=3)``.  On this host the CPL0 emulator executes ``int3``
    itself, so the #BP reaches the guest's own handler instead (checked)."""
    vcpu = real_mode_handlers(vm, INT3, [3])
    dbg = vcpu.set_guest_debug(sw_breakpoints=True)
    assert dbg.control == S.KVM_GUESTDBG_ENABLE | S.KVM_GUESTDBG_USE_SW_BP
    exits = run_until(vcpu)
    if isinstance(exits[0], pykvm.Debug):
        assert exits[0].exception == 3 and exits[0].pc == 0x1003
        return
    assert host_is_pvm(), exits
    assert outs(exits, HANDLER_PORT) == [3] and outs(exits, 0x10) == [2]


@pytest.mark.parametrize("flag, vector", [("inject_db", 1), ("inject_bp", 3)])
def test_injected_debug_exceptions_reach_guest(vm, watchdog, flag, vector):
    vcpu = real_mode_handlers(vm, STEPS, [1, 3])
    vcpu.set_guest_debug(**{flag: True})
    exits = run_until(vcpu)
    assert outs(exits, HANDLER_PORT) == [vector]
    assert outs(exits, 0x10) == [5] and isinstance(exits[-1], pykvm.Hlt)


def test_set_guest_debug_input_checks(kvm, vm):
    vcpu = vm.create_vcpu()
    valid = kvm.check_extension(pykvm.Cap.SET_GUEST_DEBUG2)  # the control bits KVM accepts
    assert valid & S.KVM_GUESTDBG_USE_HW_BP and valid & S.KVM_GUESTDBG_BLOCKIRQ
    dbg = vcpu.set_guest_debug(block_irq=True)
    assert dbg.control == S.KVM_GUESTDBG_ENABLE | S.KVM_GUESTDBG_BLOCKIRQ
    with pytest.raises(ValueError):
        vcpu.set_guest_debug(hw_breakpoints=[1, 2, 3, 4, 5])
    with pytest.raises(TypeError):
        vcpu.set_guest_debug(S.kvm_guest_debug(), single_step=True)
    with pytest.raises(ValueError):
        vcpu.set_guest_debug(enable=False, single_step=True)
