"""Events: KVM_INTERRUPT, KVM_NMI, KVM_SMI, vCPU events, MP state, machine checks.

Real-mode guests whose IVT handlers report their vector on port 0x11
(:func:`machines.real_mode_handlers`): every injected event is counted by the
guest itself.
"""

from __future__ import annotations

import errno

import pytest

import pykvm
from pykvm.uapi import structs as S
from tests.support.guests import HANDLER_PORT, real_mode_handlers
from tests.support.runs import outs, run_until

OUT_HLT = bytes.fromhex(
    "e610"                      # 0x00: out 0x10,al
    "f4"                        # 0x02: hlt
)

STI_SPIN = bytes.fromhex(
    "fb"                        # 0x00: sti
    "ebfe"                      # 0x01: jmp 0x1
)


def test_nmi_runs_the_guest_nmi_handler(vm, watchdog):
    vcpu = real_mode_handlers(vm, OUT_HLT, [2])
    vcpu.nmi()
    assert vcpu.get_vcpu_events().nmi.pending == 1
    exits = run_until(vcpu)
    assert outs(exits, HANDLER_PORT) == [2]          # handled before the first instruction
    assert outs(exits, 0x10) == [0] and isinstance(exits[-1], pykvm.Hlt)
    assert vcpu.get_vcpu_events().nmi.pending == 0


def test_interrupt_injected_when_window_opens(vm, watchdog):
    """KVM_INTERRUPT without an in-kernel irqchip: ask for an interrupt window,
    inject vector 0x20 when it opens, again 0x21 after the handler's iret."""
    vcpu = real_mode_handlers(vm, STI_SPIN, [0x20, 0x21])
    seen = []
    with watchdog(vcpu):
        for vector in (0x20, 0x21):
            vcpu.request_interrupt_window = True
            e = vcpu.run()
            assert isinstance(e, pykvm.IrqWindowOpen), e
            assert vcpu.ready_for_interrupt_injection and vcpu.if_flag
            vcpu.request_interrupt_window = False
            vcpu.interrupt(vector)
            e = vcpu.run()
            assert isinstance(e, pykvm.IoOut) and e.port == HANDLER_PORT
            seen.append(e.data[0])
    assert seen == [0x20, 0x21]
    with pytest.raises(ValueError):
        vcpu.interrupt(256)


def test_interrupt_refused_with_in_kernel_irqchip(vm):
    vm.create_irq_chip()
    vcpu = vm.create_vcpu()
    with pytest.raises(pykvm.KvmError) as ei:
        vcpu.interrupt(0x20)
    assert ei.value.errno == errno.ENXIO and ei.value.ioctl == "KVM_INTERRUPT"


def test_smi(kvm, vm):
    """KVM_SMI.  This host's KVM has no SMM (KVM_CAP_X86_SMM = 0, kernel built
    without it): the ioctl is unknown (ENOTTY) and no SMI becomes pending."""
    vcpu = vm.create_vcpu()
    if not vm.check_extension(pykvm.Cap.X86_SMM):
        with pytest.raises(pykvm.KvmError) as ei:
            vcpu.smi()
        assert ei.value.errno == errno.ENOTTY and ei.value.ioctl == "KVM_SMI"
        ev = vcpu.get_vcpu_events()
        assert not ev.flags & S.KVM_VCPUEVENT_VALID_SMM or ev.smi.pending == 0
        return
    vcpu.smi()
    ev = vcpu.get_vcpu_events()
    assert ev.flags & S.KVM_VCPUEVENT_VALID_SMM and ev.smi.pending == 1


def test_vcpu_events_inject_exception_and_nmi(vm, watchdog):
    vcpu = real_mode_handlers(vm, OUT_HLT, [2, 6])
    ev = vcpu.get_vcpu_events()
    assert (ev.exception.injected, ev.nmi.pending, ev.interrupt.injected) == (0, 0, 0)
    ev.exception.injected, ev.exception.nr = 1, 6          # #UD
    ev.flags = 0
    vcpu.set_vcpu_events(ev)
    exits = run_until(vcpu, n=1)
    assert outs(exits, HANDLER_PORT) == [6]

    ev = vcpu.get_vcpu_events()
    ev.nmi.pending = 1
    ev.flags = S.KVM_VCPUEVENT_VALID_NMI_PENDING
    vcpu.set_vcpu_events(ev)
    assert vcpu.get_vcpu_events().nmi.pending == 1
    exits = run_until(vcpu)
    assert outs(exits, HANDLER_PORT) == [2]
    assert outs(exits, 0x10) == [0] and isinstance(exits[-1], pykvm.Hlt)
    with pytest.raises(TypeError):
        vcpu.set_vcpu_events(vcpu.get_regs())


def test_halted_mp_state_does_not_run_until_nmi(vm, watchdog):
    """A vCPU set to KVM_MP_STATE_HALTED stays in KVM_RUN (the watchdog kick
    ends the run, the guest's first instruction never ran); an NMI wakes it."""
    vm.create_irq_chip()
    vcpu = real_mode_handlers(vm, OUT_HLT, [2])
    assert vcpu.get_mp_state() == S.KVM_MP_STATE_RUNNABLE
    vcpu.set_mp_state(S.KVM_MP_STATE_HALTED)
    assert vcpu.get_mp_state() == S.KVM_MP_STATE_HALTED
    with watchdog(vcpu, 0.3) as dog:
        e = vcpu.run()
    assert isinstance(e, pykvm.Interrupted) and dog.fired
    assert vcpu.get_regs().rip == 0x1000
    assert vcpu.get_mp_state() == S.KVM_MP_STATE_HALTED
    vcpu.nmi()
    with watchdog(vcpu) as dog:
        e = vcpu.run()
    assert not dog.fired
    assert isinstance(e, pykvm.IoOut) and (e.port, e.data) == (HANDLER_PORT, b"\x02")
    assert vcpu.get_mp_state() == S.KVM_MP_STATE_RUNNABLE


def test_mp_state_without_irqchip_only_runnable(vm):
    vcpu = vm.create_vcpu()
    vcpu.set_mp_state(S.KVM_MP_STATE_RUNNABLE)
    with pytest.raises(pykvm.KvmError) as ei:
        vcpu.set_mp_state(S.KVM_MP_STATE_HALTED)
    assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_SET_MP_STATE"


MCE_MSRS = bytes.fromhex(
    "66b979010000"              # 0x00: mov ecx,0x179   IA32_MCG_CAP
    "0f32"                      # 0x06: rdmsr
    "66e710"                    # 0x08: out 0x10,eax
    "66b905040000"              # 0x0b: mov ecx,0x405   IA32_MC1_STATUS
    "0f32"                      # 0x11: rdmsr
    "66e710"                    # 0x13: out 0x10,eax
    "6689d0"                    # 0x16: mov eax,edx
    "66e710"                    # 0x19: out 0x10,eax
    "f4"                        # 0x1c: hlt
)

MCG_CTL_P = 1 << 8
MCI_STATUS_VAL, MCI_STATUS_UC, MCI_STATUS_EN = 1 << 63, 1 << 61, 1 << 60
MCG_STATUS_RIPV, MCG_STATUS_MCIP = 1 << 0, 1 << 2


def test_setup_mce_and_corrected_error_seen_by_guest(kvm, vm, watchdog):
    assert kvm.check_extension(pykvm.Cap.MCE) >= 4  # banks KVM can emulate
    assert kvm.mce_cap_supported() & MCG_CTL_P
    vcpu = real_mode_handlers(vm, MCE_MSRS, [18])
    vcpu.setup_mce(MCG_CTL_P | 4)                   # 4 banks
    vcpu.set_mce(bank=1, status=MCI_STATUS_VAL | 0x1234)  # corrected: only logged
    exits = run_until(vcpu)
    assert outs(exits, HANDLER_PORT) == []           # no #MC for a corrected error
    assert outs(exits, 0x10) == [MCG_CTL_P | 4, 0x1234, 0x80000000]
    with pytest.raises(pykvm.KvmError) as ei:
        vcpu.set_mce(bank=4, status=MCI_STATUS_VAL)  # no such bank
    assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_X86_SET_MCE"
    with pytest.raises(pykvm.KvmError):
        vcpu.set_mce(bank=0, status=0x1234)         # MCi_STATUS.VAL clear


def test_uncorrected_mce_raises_machine_check_in_guest(vm, watchdog):
    vcpu = real_mode_handlers(vm, OUT_HLT, [18])
    s = vcpu.get_sregs()
    s.cr4 |= 0x40                                   # CR4.MCE, else KVM triple-faults the guest
    vcpu.set_sregs(s)
    vcpu.setup_mce(MCG_CTL_P | 4)
    status = MCI_STATUS_VAL | MCI_STATUS_UC | MCI_STATUS_EN | 0x55
    vcpu.set_mce(S.kvm_x86_mce(status=status, mcg_status=MCG_STATUS_RIPV | MCG_STATUS_MCIP, bank=2))
    exits = run_until(vcpu)
    assert outs(exits, HANDLER_PORT) == [18]         # the guest's #MC handler ran
    assert vcpu.get_msrs([0x17A, 0x409]) == {0x17A: MCG_STATUS_RIPV | MCG_STATUS_MCIP, 0x409: status}
