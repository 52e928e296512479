"""Time (TSC rate, kvmclock), address translation, pre-faulting, vCPU
capabilities and attributes, statistics, and the hypervisor-specific ioctls
this host's KVM was built without (Hyper-V, Xen)."""

from __future__ import annotations

import errno
import struct

import pytest

import pykvm
from pykvm.uapi import structs as S
from tests.support.guests import HANDLER_PORT, PDPT, long_mode, real_mode, real_mode_handlers
from tests.support.host import host_is_pvm
from tests.support.runs import outs, run_until

from .support_hints import check_hint

OUT_HLT = bytes.fromhex(
    "e610"                      # 0x00: out 0x10,al
    "f4"                        # 0x02: hlt
)


def test_tsc_khz(kvm, vm):
    """KVM_GET/SET_TSC_KHZ.  Without TSC scaling (KVM_CAP_TSC_CONTROL = 0, as
    here) KVM takes the host rate or a higher one (then it keeps the guest TSC
    caught up on each entry) and refuses a lower one.  The rate is visible to a
    guest only through elapsed time, so the test reads it back from KVM."""
    vcpu = vm.create_vcpu()
    host = vcpu.get_tsc_khz()
    assert host > 100_000                          # > 100 MHz
    vcpu.set_tsc_khz(host)
    vcpu.set_tsc_khz(host + 1000)
    assert vcpu.get_tsc_khz() == host + 1000
    if not kvm.check_extension(pykvm.Cap.TSC_CONTROL):
        with pytest.raises(pykvm.KvmError) as ei:
            vcpu.set_tsc_khz(host // 2)
        assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_SET_TSC_KHZ"
    else:
        vcpu.set_tsc_khz(host // 2)
        assert vcpu.get_tsc_khz() == host // 2


KVMCLOCK_FLAGS = bytes.fromhex(
    "a01d90"                    # 0x00: mov al,ds:0x901d     pvclock flags at 0x9000 + 29
    "e610"                      # 0x03: out 0x10,al
    "a01d90"                    # 0x05: mov al,ds:0x901d
    "e610"                      # 0x08: out 0x10,al
    "f4"                        # 0x0a: hlt
)
PVCLOCK_TSC_STABLE, PVCLOCK_GUEST_STOPPED = 1, 2
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01


def test_kvmclock_ctrl_sets_guest_stopped_flag(vm, watchdog):
    vcpu = real_mode(vm, KVMCLOCK_FLAGS)
    with pytest.raises(pykvm.KvmError) as ei:
        vcpu.kvmclock_ctrl()                       # kvmclock not enabled yet
    assert ei.value.errno == errno.EINVAL and "kvmclock" in str(ei.value)
    vcpu.set_msrs({MSR_KVM_SYSTEM_TIME_NEW: 0x9000 | 1})  # kvmclock page at 0x9000, enabled
    with watchdog(vcpu):
        before = vcpu.run()
        vcpu.kvmclock_ctrl()
        after = vcpu.run()
    assert isinstance(before, pykvm.IoOut) and not before.data[0] & PVCLOCK_GUEST_STOPPED
    assert isinstance(after, pykvm.IoOut) and after.data[0] & PVCLOCK_GUEST_STOPPED
    version = struct.unpack("<I", vm.read(0x9000, 4))[0]
    assert version and version % 2 == 0            # KVM finished its updates


READ_VA = bytes.fromhex(
    "8b042510300040"            # 0x00: mov eax,DWORD PTR ds:0x40003010
    "e710"                      # 0x07: out 0x10,eax
    "f4"                        # 0x09: hlt
)


def test_translate_gva_follows_guest_page_tables(vm, watchdog):
    vcpu = long_mode(vm, READ_VA)
    # linear 0x40000000.. (PDPT[1]) -> PD at 0x5000 -> PT at 0x6000; page 3 -> 0x7000
    vm.write(PDPT + 8, struct.pack("<Q", 0x5000 | 3))
    vm.write(0x5000, struct.pack("<Q", 0x6000 | 3))
    vm.write(0x6000 + 3 * 8, struct.pack("<Q", 0x7000 | 1))   # present, read-only
    vm.write(0x7010, b"PAGE")
    t = vcpu.translate_gva(0x40003010)
    assert (t.linear_address, t.physical_address, t.valid) == (0x40003010, 0x7010, 1)
    assert (t.writeable, t.usermode) == (1, 0)    # constants in KVM's answer
    t = vcpu.translate_gva(0x1234)                  # identity-mapped 2 MiB page
    assert (t.physical_address, t.valid) == (0x1234, 1)
    t = vcpu.translate_gva(0x40004000)              # PTE not present
    assert t.valid == 0
    exits = run_until(vcpu)
    assert outs(exits, 0x10) == [int.from_bytes(b"PAGE", "little")]  # the guest agrees
    with pytest.raises(ValueError):
        vcpu.translate_gva(-1)


def test_pre_fault_memory(kvm, vm):
    """KVM_PRE_FAULT_MEMORY needs two-dimensional paging; this host uses shadow
    paging (KVM_CAP_PRE_FAULT_MEMORY = 0) and KVM answers EOPNOTSUPP."""
    vm.add_memory(0, 0x10000)
    vcpu = vm.create_vcpu()
    if not vm.check_extension(pykvm.Cap.PRE_FAULT_MEMORY):
        with pytest.raises(pykvm.KvmError) as ei:
            vcpu.pre_fault_memory(0, 0x10000)
        assert ei.value.errno == errno.EOPNOTSUPP and ei.value.ioctl == "KVM_PRE_FAULT_MEMORY"
        check_hint(ei.value)
        return
    vcpu.pre_fault_memory(0, 0x10000)
    with pytest.raises(pykvm.KvmError):
        vcpu.pre_fault_memory(0x100000000, 0x1000)  # no memslot there


PV_WRMSR = bytes.fromhex(
    "66b9014d564b"              # 0x00: mov ecx,0x4b564d01   MSR_KVM_SYSTEM_TIME_NEW
    "66b801900000"              # 0x06: mov eax,0x9001
    "6631d2"                    # 0x0c: xor edx,edx
    "0f30"                      # 0x0f: wrmsr
    "e610"                      # 0x11: out 0x10,al
    "f4"                        # 0x13: hlt
)


@pytest.mark.parametrize("enforce", [0, 1])
def test_vcpu_enable_cap_enforce_pv_feature_cpuid(kvm, vm, watchdog, enforce):
    """KVM_ENABLE_CAP on the vCPU: with ENFORCE_PV_FEATURE_CPUID on and no
    KVM_FEATURE_CLOCKSOURCE2 in the guest's CPUID, the kvmclock MSR faults."""
    assert kvm.check_extension(pykvm.Cap.ENFORCE_PV_FEATURE_CPUID)
    vcpu = real_mode_handlers(vm, PV_WRMSR, [13])
    vcpu.enable_cap(pykvm.Cap.ENFORCE_PV_FEATURE_CPUID, enforce)
    with watchdog(vcpu):
        e = vcpu.run()
    # with enforcement the #GP handler's iret retries the wrmsr: only the first exit matters
    assert e == (pykvm.IoOut(HANDLER_PORT, 1, 1, b"\x0d") if enforce else pykvm.IoOut(0x10, 1, 1, b"\x01"))
    if enforce:
        with pytest.raises(pykvm.KvmError):
            vcpu.set_msrs({MSR_KVM_SYSTEM_TIME_NEW: 0x9001})
    else:
        assert vcpu.get_msrs([MSR_KVM_SYSTEM_TIME_NEW]) == {MSR_KVM_SYSTEM_TIME_NEW: 0x9001}
    with pytest.raises(ValueError):
        vcpu.enable_cap(pykvm.Cap.ENFORCE_PV_FEATURE_CPUID, 1, 2, 3, 4, 5)


RDTSC = bytes.fromhex(
    "0f31"                      # 0x00: rdtsc
    "66e710"                    # 0x02: out 0x10,eax
    "6689d0"                    # 0x05: mov eax,edx
    "66e710"                    # 0x08: out 0x10,eax
    "f4"                        # 0x0b: hlt
)
KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET = 0, 0


def test_vcpu_device_attr_tsc_offset(kvm, vm, watchdog):
    """vCPU attributes: group KVM_VCPU_TSC_CTRL, attribute KVM_VCPU_TSC_OFFSET.

    Elsewhere the guest's rdtsc shows an offset of 2**60.  PVM runs guests on
    the host's TSC and treats it as protected: KVM takes the write without an
    error but the offset stays 0 and the guest's TSC is the host's (asserted)."""
    assert kvm.check_extension(pykvm.Cap.VCPU_ATTRIBUTES)
    vcpu = real_mode(vm, RDTSC)
    assert vcpu.has_device_attr(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET)
    assert not vcpu.has_device_attr(KVM_VCPU_TSC_CTRL, 1)
    assert not vcpu.has_device_attr(7, KVM_VCPU_TSC_OFFSET)
    old = vcpu.get_device_attr(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET)
    new = (old + (1 << 60)) % 2**64
    vcpu.set_device_attr(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET, new)
    now = vcpu.get_device_attr(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET)
    exits = run_until(vcpu)
    lo, hi = outs(exits, 0x10)
    guest_tsc = hi << 32 | lo
    if now == new:
        assert guest_tsc >= 1 << 60
    else:
        assert host_is_pvm() and now == old == 0
        assert guest_tsc < 1 << 60
    with pytest.raises(pykvm.KvmError) as ei:
        vcpu.get_device_attr(KVM_VCPU_TSC_CTRL, 1)
    assert ei.value.errno == errno.ENXIO and ei.value.ioctl == "KVM_GET_DEVICE_ATTR"


def test_vcpu_stats_fd_counts_guest_exits(vm, watchdog):
    vcpu = real_mode(vm, OUT_HLT)
    with vcpu.get_stats_fd() as st:
        assert st.id.endswith("/vcpu-0")
        before = st.read()
        exits = run_until(vcpu)
        assert outs(exits, 0x10) == [0] and isinstance(exits[-1], pykvm.Hlt)
        after = st.read()
        assert after["halt_exits"] == before["halt_exits"] + 1  # the guest's hlt
        assert after["exits"] >= before["exits"] + 2
    assert st.closed


def test_hyperv_and_xen_vcpu_ioctls_refused(kvm, vm):
    """KVM_GET_SUPPORTED_HV_CPUID and KVM_XEN_VCPU_GET/SET_ATTR: this host's KVM
    is built without Hyper-V and Xen emulation (KVM_CAP_HYPERV_CPUID = 0,
    KVM_CAP_XEN_HVM = 0); both answer EINVAL."""
    vcpu = vm.create_vcpu()
    if not vm.check_extension(pykvm.Cap.HYPERV_CPUID):
        with pytest.raises(pykvm.KvmError) as ei:
            vcpu.get_supported_hv_cpuid()
        assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_GET_SUPPORTED_HV_CPUID"
    else:
        assert any(e.function == 0x40000000 for e in vcpu.get_supported_hv_cpuid())
    if not vm.check_extension(pykvm.Cap.XEN_HVM):
        with pytest.raises(pykvm.KvmError) as ei:
            vcpu.xen_vcpu_get_attr(0)
        assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_XEN_VCPU_GET_ATTR"
        with pytest.raises(pykvm.KvmError) as ei:
            vcpu.xen_vcpu_set_attr(S.kvm_xen_vcpu_attr(type=0))
        assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_XEN_VCPU_SET_ATTR"
