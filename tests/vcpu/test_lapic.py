"""The in-kernel local APIC through the vCPU fd: LAPIC state, TPR access
reporting, the VAPIC page.  A 64-bit guest reads the LAPIC at 0xfee00000."""

from __future__ import annotations

import errno

import pytest

import pykvm
from pykvm.uapi import structs as S
from pykvm.vcpu import lapic_get_reg, lapic_set_reg
from tests.support.guests import long_mode_apic
from tests.support.runs import outs

from .support_hints import check_hint

APIC_ID, APIC_LVR, APIC_TASKPRI, APIC_SPIV = 0x20, 0x30, 0x80, 0xF0

APIC_TPR = bytes.fromhex(
    "bb0000e0fe"                # 0x00: mov ebx,0xfee00000
    "8b8380000000"              # 0x05: mov eax,DWORD PTR [rbx+0x80]    TPR
    "e710"                      # 0x0b: out 0x10,eax
    "440f20c0"                  # 0x0d: mov rax,cr8                     TPR[7:4]
    "e710"                      # 0x11: out 0x10,eax
    "8b4330"                    # 0x13: mov eax,DWORD PTR [rbx+0x30]    version
    "e710"                      # 0x16: out 0x10,eax
    "c7838000000070000000"      # 0x18: mov DWORD PTR [rbx+0x80],0x70
    "e612"                      # 0x22: out 0x12,al
    "ebfe"                      # 0x24: jmp 0x24
)


def test_lapic_state_seen_by_guest_both_ways(vm, watchdog):
    vm.create_irq_chip()
    vcpu = long_mode_apic(vm, APIC_TPR)
    state = vcpu.get_lapic()
    version = lapic_get_reg(state, APIC_LVR)
    assert version & 0xFF in (0x10, 0x14) and lapic_get_reg(state, APIC_ID) == 0  # integrated APIC, id 0
    lapic_set_reg(state, APIC_TASKPRI, 0x50)
    vcpu.set_lapic(state)
    assert vcpu.get_lapic_reg(APIC_TASKPRI) == 0x50
    with watchdog(vcpu):
        seen = [vcpu.run() for _ in range(4)]
    assert outs(seen, 0x10) == [0x50, 0x5, version]
    assert outs(seen, 0x12) != []                   # after the guest's TPR write
    assert vcpu.get_lapic_reg(APIC_TASKPRI) == 0x70
    vcpu.set_lapic_reg(APIC_TASKPRI, 0x20)
    assert lapic_get_reg(vcpu.get_lapic(), APIC_TASKPRI) == 0x20
    assert bytes(vcpu.get_lapic().regs)[0x80:0x84] == b"\x20\0\0\0"


def test_lapic_helpers_check_their_input(vm):
    state = S.kvm_lapic_state()
    for bad in (0x84, 0x400, -16):
        with pytest.raises(ValueError):
            lapic_get_reg(state, bad)
    with pytest.raises(ValueError):
        lapic_set_reg(state, APIC_TASKPRI, 1 << 32)
    with pytest.raises(TypeError):
        lapic_get_reg(b"\0" * 1024, 0)
    vcpu = vm.create_vcpu()
    with pytest.raises(pykvm.KvmError) as ei:  # no in-kernel irqchip
        vcpu.get_lapic()
    assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_GET_LAPIC"
    check_hint(ei.value)  # the error says what to do (call create_irq_chip)


TPR_WRITE_SPIN = bytes.fromhex(
    "bb0000e0fe"                # 0x00: mov ebx,0xfee00000
    "c7838000000030000000"      # 0x05: mov DWORD PTR [rbx+0x80],0x30
    "ebfe"                      # 0x0f: jmp 0xf
)

TPR_READ_SPIN = bytes.fromhex(
    "bb0000e0fe"                # 0x00: mov ebx,0xfee00000
    "8b8380000000"              # 0x05: mov eax,DWORD PTR [rbx+0x80]
    "ebfe"                      # 0x0b: jmp 0xb
)


@pytest.mark.parametrize("code, is_write", [(TPR_WRITE_SPIN, 1), (TPR_READ_SPIN, 0)])
def test_tpr_access_reporting(vm, watchdog, code, is_write):
    """With reporting on, the guest's TPR access ends the run with
    KVM_EXIT_TPR_ACCESS naming the accessing instruction."""
    vm.create_irq_chip()
    vcpu = long_mode_apic(vm, code)
    vcpu.tpr_access_reporting(True)
    with watchdog(vcpu) as dog:
        e = vcpu.run()
    assert not dog.fired
    assert isinstance(e, pykvm.exits.TprAccess), e
    assert (e.rip, e.is_write) == (0x10005, is_write)
    vcpu.tpr_access_reporting(False)


READ_VAPIC = bytes.fromhex(
    "8b042500900000"            # 0x00: mov eax,DWORD PTR ds:0x9000
    "e710"                      # 0x07: out 0x10,eax
    "ebfe"                      # 0x09: jmp 0x9
)


def test_vapic_page_shows_tpr_to_guest(vm, watchdog):
    vm.create_irq_chip()
    vcpu = long_mode_apic(vm, READ_VAPIC)
    vcpu.set_lapic_reg(APIC_SPIV, 0x1FF)            # software-enable the LAPIC
    vcpu.set_lapic_reg(APIC_TASKPRI, 0x50)
    vcpu.set_vapic_addr(0x9000)
    with watchdog(vcpu):
        e = vcpu.run()
    assert isinstance(e, pykvm.IoOut) and int.from_bytes(e.data, "little") == 0x50
    assert vm.read(0x9000, 4) == b"\x50\0\0\0"


def test_vapic_needs_in_kernel_lapic(vm):
    vcpu = vm.create_vcpu()
    with pytest.raises(pykvm.KvmError) as ei:
        vcpu.set_vapic_addr(0x9000)
    assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_SET_VAPIC_ADDR"
