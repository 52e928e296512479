"""Exits answered by user space: rdmsr/wrmsr (KVM_CAP_X86_USER_SPACE_MSR) and
hypercalls (KVM_CAP_EXIT_HYPERCALL)."""

from __future__ import annotations

import pykvm
from pykvm.uapi import structs as S
from tests.support.guests import HANDLER_PORT, long_mode, real_mode_handlers, user_mode
from tests.support.host import cpu_vendor, host_is_pvm
from tests.support.runs import outs, run_until

MSR_EXITS = bytes.fromhex(
    "66b945230100"              # 0x00: mov ecx,0x12345    (no such MSR)
    "0f32"                      # 0x06: rdmsr
    "66e710"                    # 0x08: out 0x10,eax
    "6689d0"                    # 0x0b: mov eax,edx
    "66e710"                    # 0x0e: out 0x10,eax
    "66b946230100"              # 0x11: mov ecx,0x12346
    "66b811110000"              # 0x17: mov eax,0x1111
    "66ba22220000"              # 0x1d: mov edx,0x2222
    "0f30"                      # 0x23: wrmsr
    "66b974010000"              # 0x25: mov ecx,0x174      (SYSENTER_CS: KVM's own)
    "0f32"                      # 0x2b: rdmsr
    "66e710"                    # 0x2d: out 0x10,eax
    "f4"                        # 0x30: hlt
)


def test_unknown_msr_accesses_answered_by_user_space(vm, watchdog):
    assert vm.check_extension(pykvm.Cap.X86_USER_SPACE_MSR)
    vm.enable_cap(pykvm.Cap.X86_USER_SPACE_MSR, S.KVM_MSR_EXIT_REASON_UNKNOWN)
    vcpu = real_mode_handlers(vm, MSR_EXITS, [13])
    vcpu.set_msrs({0x174: 0x77})
    with watchdog(vcpu):
        e = vcpu.run()
        assert isinstance(e, pykvm.X86Rdmsr)
        assert (e.index, e.msr_reason) == (0x12345, S.KVM_MSR_EXIT_REASON_UNKNOWN)
        e.set_error()                                   # first answer: #GP in the guest
        e = vcpu.run()
        assert e == pykvm.IoOut(HANDLER_PORT, 1, 1, b"\x0d")
        e = vcpu.run()                                  # the handler's iret retries the rdmsr
        assert isinstance(e, pykvm.X86Rdmsr) and e.index == 0x12345
        e.set_data(0xAAAA0000BBBB)
        rest = [vcpu.run() for _ in range(5)]
    assert outs(rest[:2], 0x10) == [0xBBBB, 0xAAAA]     # edx:eax as we answered
    wr = rest[2]
    assert isinstance(wr, pykvm.X86Wrmsr)
    assert (wr.index, wr.data, wr.msr_reason) == (0x12346, 0x222200001111, S.KVM_MSR_EXIT_REASON_UNKNOWN)
    assert outs(rest[3:4], 0x10) == [0x77]              # a known MSR never leaves KVM
    assert isinstance(rest[4], pykvm.Hlt)


def test_unknown_msr_without_the_cap_faults_in_guest(vm, watchdog):
    vcpu = real_mode_handlers(vm, MSR_EXITS, [13])
    with watchdog(vcpu):
        e = vcpu.run()
    assert e == pykvm.IoOut(HANDLER_PORT, 1, 1, b"\x0d")


HCALL_VMCALL = bytes.fromhex(
    "b80c000000"                # 0x00: mov eax,0xc          KVM_HC_MAP_GPA_RANGE
    "bb00001000"                # 0x05: mov ebx,0x100000     gpa
    "b901000000"                # 0x0a: mov ecx,0x1          pages
    "31d2"                      # 0x0f: xor edx,edx          attributes
    "0f01c1"                    # 0x11: vmcall
    "e710"                      # 0x14: out 0x10,eax
    "f4"                        # 0x16: hlt
)
HCALL_VMMCALL = HCALL_VMCALL[:0x11] + bytes.fromhex("0f01d9") + HCALL_VMCALL[0x14:]  # vmmcall
KVM_HC_MAP_GPA_RANGE = 12


def _hcall_code(kvm) -> bytes:
    return HCALL_VMMCALL if cpu_vendor(kvm) == "AMD" else HCALL_VMCALL


def test_hypercall_exit_at_cpl0(kvm, vm, watchdog):
    """KVM_CAP_EXIT_HYPERCALL: KVM_HC_MAP_GPA_RANGE from CPL0 exits to user
    space, which answers with set_ret.

    This host cannot show it: a vmcall/vmmcall at CPL0 never completes under
    PVM (the vCPU spins inside KVM until kicked).  There the test asserts
    that: no exit until the watchdog's kick, rip still on the instruction.
    """
    assert vm.check_extension(pykvm.Cap.EXIT_HYPERCALL) & 1 << KVM_HC_MAP_GPA_RANGE
    vm.enable_cap(pykvm.Cap.EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    vcpu = long_mode(vm, _hcall_code(kvm))
    vcpu.set_cpuid2(kvm.supported_cpuid())
    with watchdog(vcpu, 0.5 if host_is_pvm() else 5) as dog:
        e = vcpu.run()
    if isinstance(e, pykvm.Hypercall):
        assert e.nr == KVM_HC_MAP_GPA_RANGE and e.args[:3] == (0x100000, 1, 0)
        e.set_ret(0)
        exits = run_until(vcpu)
        assert outs(exits, 0x10) == [0]
        return
    assert host_is_pvm(), e
    assert isinstance(e, pykvm.Interrupted) and dog.fired
    assert vcpu.get_regs().rip == 0x10011


def test_hypercall_from_cpl3_is_refused_by_kvm(kvm, vm, watchdog):
    """From CPL3 KVM never forwards a hypercall (on any host): it returns
    -KVM_EPERM (-1) in the guest's rax, and no Hypercall exit happens."""
    vm.enable_cap(pykvm.Cap.EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    code = _hcall_code(kvm)[:0x16]  # ends with the out: CPL3 may not hlt
    vcpu = user_mode(vm, code, cpuid=kvm.supported_cpuid())
    exits = run_until(vcpu, n=1)
    assert outs(exits, 0x10) == [0xFFFFFFFF]
    assert vcpu.get_regs().rax == 2**64 - 1
