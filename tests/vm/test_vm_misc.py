"""The rest of the VM fd: clock, capabilities, MSR and PMU filters, MMU pages, devices,
statistics, the x86 set-up addresses, and the Hyper-V / Xen / SEV calls this host lacks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

import pytest

import pykvm
from pykvm import Cap
from pykvm.device import Device, DeviceType, device_type_name
from pykvm.eventfd import EventFd
from pykvm.uapi import structs as S
from pykvm.vm import MsrFilterRange
from tests.support.guests import HLT, real_mode
from tests.support.runs import run_to_exit
from tests.vm.support_irqguest import rdmsr_out

MSR_MISC_ENABLE = 0x1A0
MSR_APIC_BASE = 0x1B
MSR_BOGUS = 0xDEAD              # no such MSR: rdmsr #GPs (KVM_MSR_EXIT_REASON_UNKNOWN)


def _with_gp_handler(vm, code: bytes) -> pykvm.Vcpu:
    """Real mode *code*, with an IVT #GP handler that reports 0x0d and halts."""
    vcpu = real_mode(vm, code)
    mem = vm.memory[0]
    mem.write(13 * 4, struct.pack("<HH", 0x3000, 0))
    mem.write(0x3000, bytes([0xB0, 0x0D, 0xE6, 0xE9, 0xF4]))    # mov al,0x0d; out 0xe9,al; hlt
    return vcpu


# --- clock ---------------------------------------------------------------------------------
def test_set_clock_then_get_clock_round_trips(vm):
    assert vm.check_extension(Cap.ADJUST_CLOCK)
    target = 10**15
    vm.set_clock(target)
    c = vm.get_clock()
    assert isinstance(c, S.kvm_clock_data)
    assert target <= c.clock < target + 3600 * 10**9      # it kept running from there
    vm.set_clock(c)                                        # a kvm_clock_data as it is
    assert vm.get_clock().clock >= c.clock


def test_set_clock_realtime_flag_adds_the_elapsed_time(vm):
    flags = vm.check_extension(Cap.ADJUST_CLOCK)
    assert flags & S.KVM_CLOCK_REALTIME, f"KVM_CAP_ADJUST_CLOCK = {flags:#x}"
    # "The source sampled the clock 5 s ago": KVM adds the 5 s of realtime since.
    five_s_ago = time.clock_gettime_ns(time.CLOCK_REALTIME) - 5 * 10**9
    vm.set_clock(10**12, flags=S.KVM_CLOCK_REALTIME, realtime=five_s_ago)
    assert vm.get_clock().clock >= 10**12 + 5 * 10**9
    with pytest.raises(pykvm.KvmError) as ei:
        vm.set_clock(0, flags=0x100)                       # unknown flag
    assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_SET_CLOCK"


# --- capabilities -------------------------------------------------------------------------
def test_enable_cap_user_space_msr_turns_a_gp_into_an_exit(kvm, watchdog):
    assert kvm.check_extension(Cap.X86_USER_SPACE_MSR)
    code = rdmsr_out(MSR_BOGUS) + HLT
    with kvm.create_vm() as vm:                            # without the capability: #GP in the guest
        vcpu = _with_gp_handler(vm, code)
        assert run_to_exit(vcpu) == pykvm.IoOut(0xE9, 1, 1, b"\x0d")
    with kvm.create_vm() as vm:
        vm.enable_cap(Cap.X86_USER_SPACE_MSR, S.KVM_MSR_EXIT_REASON_UNKNOWN)
        vcpu = _with_gp_handler(vm, code)
        e = run_to_exit(vcpu)
        assert isinstance(e, pykvm.X86Rdmsr) and e.index == MSR_BOGUS
        assert e.msr_reason == S.KVM_MSR_EXIT_REASON_UNKNOWN
        e.set_data(0xCAFEF00D)
        assert run_to_exit(vcpu) == pykvm.IoOut(0xE9, 4, 1, (0xCAFEF00D).to_bytes(4, "little"))


def test_check_extension_on_the_vm_fd_is_per_vm(kvm, vm):
    assert vm.check_extension(Cap.CHECK_EXTENSION_VM)
    # A VM-scoped answer: the VM fd knows its own attribute support (none on a
    # default VM), whatever the system fd says.
    assert vm.check_extension(Cap.MEMORY_ATTRIBUTES) == 0
    assert vm.check_extension(Cap.NR_MEMSLOTS) == kvm.check_extension(Cap.NR_MEMSLOTS)


# --- MSR filter -----------------------------------------------------------------------------
def test_msr_filter_sends_a_denied_rdmsr_to_user_space(vm, watchdog):
    assert vm.check_extension(Cap.X86_MSR_FILTER)
    vm.enable_cap(Cap.X86_USER_SPACE_MSR, S.KVM_MSR_EXIT_REASON_FILTER)
    vm.set_msr_filter([MsrFilterRange.deny([MSR_MISC_ENABLE], S.KVM_MSR_FILTER_READ)])
    code = rdmsr_out(MSR_MISC_ENABLE) + rdmsr_out(MSR_MISC_ENABLE) + HLT
    vcpu = real_mode(vm, code)
    e = run_to_exit(vcpu)
    assert isinstance(e, pykvm.X86Rdmsr), e
    assert (e.index, e.msr_reason) == (MSR_MISC_ENABLE, S.KVM_MSR_EXIT_REASON_FILTER)
    e.set_data(0x12345678)
    assert run_to_exit(vcpu) == pykvm.IoOut(0xE9, 4, 1, (0x12345678).to_bytes(4, "little"))
    vm.set_msr_filter()                                    # no ranges, allow: filter removed
    e = run_to_exit(vcpu)
    assert isinstance(e, pykvm.IoOut) and e.port == 0xE9   # KVM answered the rdmsr itself


def test_msr_filter_default_deny_with_an_allow_range(vm, watchdog):
    vm.enable_cap(Cap.X86_USER_SPACE_MSR, S.KVM_MSR_EXIT_REASON_FILTER)
    vm.set_msr_filter([MsrFilterRange.allow([MSR_MISC_ENABLE])], default_deny=True)
    vcpu = real_mode(vm, rdmsr_out(MSR_MISC_ENABLE) + rdmsr_out(MSR_APIC_BASE) + HLT)
    assert run_to_exit(vcpu).port == 0xE9        # allowed: handled in the kernel
    e = run_to_exit(vcpu)
    assert isinstance(e, pykvm.X86Rdmsr) and e.index == MSR_APIC_BASE


def test_msr_filter_bad_input(vm):
    with pytest.raises(ValueError):
        MsrFilterRange(0, 0x10, b"\x01")                   # neither READ nor WRITE
    with pytest.raises(ValueError):
        MsrFilterRange(S.KVM_MSR_FILTER_READ, 0x10, b"\x01", nmsrs=9)    # bitmap too short
    with pytest.raises(ValueError):
        vm.set_msr_filter([MsrFilterRange.deny([1])] * 17)
    with pytest.raises(TypeError):
        vm.set_msr_filter([(1, 2, b"")])
    r = MsrFilterRange.deny([0x10, 0x12])
    assert (r.base, r.nmsrs, r.bitmap) == (0x10, 3, bytes([0b010]))


# --- PMU event filter ------------------------------------------------------------------------
def _read_param(name: str) -> str:
    try:
        with open(f"/sys/module/kvm/parameters/{name}") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _count_retired_instructions(kvm, vm, watchdog) -> int:
    """Guest: program counter 0 for event 0xC0 (retired instructions), run a few, read it."""
    amd = any(e.function == 0 and e.ebx == 0x68747541 for e in kvm.supported_cpuid())  # "Auth"
    sel, ctr = (0xC0010000, 0xC0010004) if amd else (0x186, 0xC1)
    code = bytes([0x66, 0xB9]) + struct.pack("<I", sel)          # mov ecx, PERFEVTSEL0
    code += bytes([0x66, 0xB8]) + struct.pack("<I", 0x4300C0)    # mov eax, EN|OS|USR|0xC0
    code += bytes([0x66, 0x31, 0xD2, 0x0F, 0x30])                # xor edx,edx; wrmsr
    code += bytes([0x90] * 16)                                   # 16 x nop
    code += rdmsr_out(ctr) + HLT                                 # rdmsr PMC0; out 0xe9,eax
    vcpu = real_mode(vm, code)
    vcpu.set_cpuid2(kvm.supported_cpuid())
    e = run_to_exit(vcpu)
    assert isinstance(e, pykvm.IoOut), e
    return int.from_bytes(e.data, "little")


def test_pmu_event_filter(kvm, vm, watchdog):
    assert vm.check_extension(Cap.PMU_EVENT_FILTER)
    vm.set_pmu_event_filter([0xC0], action=S.KVM_PMU_EVENT_DENY)
    with pytest.raises(pykvm.KvmError) as ei:
        vm.set_pmu_event_filter([0xC0], action=7)
    assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_SET_PMU_EVENT_FILTER"
    with pytest.raises(pykvm.KvmError) as ei:
        vm.set_pmu_event_filter(range(1000))              # more than KVM_PMU_EVENT_FILTER_MAX_EVENTS
    assert ei.value.errno == errno.E2BIG
    if _read_param("enable_pmu") != "Y":
        # This host: kvm.enable_pmu=N, so guests have no vPMU (and no
        # KVM_CAP_PMU_CAPABILITY): a counter reads 0 whatever the filter says.
        assert _count_retired_instructions(kvm, vm, watchdog) == 0
        return
    # A host with a vPMU: the denied event does not count, an allowed one does.  # pragma: no cover
    assert _count_retired_instructions(kvm, vm, watchdog) == 0
    with kvm.create_vm() as vm2:
        vm2.set_pmu_event_filter([0xC0], action=S.KVM_PMU_EVENT_ALLOW)
        assert _count_retired_instructions(kvm, vm2, watchdog) > 0


# --- MMU pages -------------------------------------------------------------------------------
def test_nr_mmu_pages(vm):
    assert vm.check_extension(Cap.MMU_SHADOW_CACHE_CONTROL)
    vm.set_nr_mmu_pages(1024)
    with pytest.raises(pykvm.KvmError) as ei:
        vm.set_nr_mmu_pages(10)                           # below KVM_MIN_ALLOC_MMU_PAGES (64)
    assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_SET_NR_MMU_PAGES"
    try:
        assert vm.get_nr_mmu_pages() == 1024               # kernels that still have it
    except pykvm.KvmError as e:
        # Linux 6.x removed KVM_GET_NR_MMU_PAGES from the x86 VM ioctl handler.
        assert e.errno == errno.ENOTTY and e.ioctl == "KVM_GET_NR_MMU_PAGES"


# --- devices -----------------------------------------------------------------------------------
def test_create_device_test_flag_lists_what_this_host_accepts(vm):
    assert vm.check_extension(Cap.DEVICE_CTRL)
    accepted = [t for t in range(1, 32) if vm.supports_device(t)]
    # x86 has one device type, VFIO (CONFIG_KVM_VFIO); the rest are other architectures'.
    assert accepted == [DeviceType.VFIO], [device_type_name(t) for t in accepted]
    assert vm.create_device(DeviceType.VFIO, test=True) is None
    with pytest.raises(pykvm.KvmError) as ei:
        vm.create_device(DeviceType.ARM_VGIC_V3, test=True)
    assert ei.value.errno == errno.ENODEV and ei.value.ioctl == "KVM_CREATE_DEVICE"


def test_vfio_device_attributes(kvm):
    vm = kvm.create_vm()
    dev = vm.create_device(DeviceType.VFIO)
    assert isinstance(dev, Device) and dev.type == DeviceType.VFIO
    assert os.readlink(f"/proc/self/fd/{dev.fileno()}") == "anon_inode:kvm-vfio"
    assert fcntl.fcntl(dev.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert dev.has_attr(S.KVM_DEV_VFIO_FILE, S.KVM_DEV_VFIO_FILE_ADD)
    assert dev.has_attr(S.KVM_DEV_VFIO_FILE, S.KVM_DEV_VFIO_FILE_DEL)
    assert not dev.has_attr(S.KVM_DEV_VFIO_FILE, 99)
    assert not dev.has_attr(42, 0)
    with pytest.raises(pykvm.KvmError) as ei:              # VFIO has no read accessor
        dev.get_attr(S.KVM_DEV_VFIO_FILE, S.KVM_DEV_VFIO_FILE_ADD)
    assert ei.value.errno == errno.EPERM and ei.value.ioctl == "KVM_GET_DEVICE_ATTR"
    import ctypes

    with EventFd() as efd, pytest.raises(pykvm.KvmError) as ei:
        # FILE_ADD reads an s32 fd from addr and checks it is a VFIO file.
        dev.set_attr(S.KVM_DEV_VFIO_FILE, S.KVM_DEV_VFIO_FILE_ADD, ctypes.c_int32(efd.fileno()))
    assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_SET_DEVICE_ATTR"
    with pytest.raises(pykvm.KvmError) as ei:
        vm.create_device(DeviceType.VFIO)                  # one VFIO device per VM
    assert ei.value.errno == errno.EBUSY
    vm.close()
    assert dev.closed


# --- statistics ------------------------------------------------------------------------------
def test_get_stats_fd(kvm):
    assert kvm.check_extension(Cap.BINARY_STATS_FD)
    vm = kvm.create_vm()
    st = vm.get_stats_fd()
    assert st.id == f"kvm-{os.getpid()}"
    assert fcntl.fcntl(st.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    values = st.read()
    assert {"remote_tlb_flush", "pages_4k", "mmu_cache_miss"} <= set(values)
    vm.close()
    assert st.closed


# --- set-up addresses ----------------------------------------------------------------------
def test_identity_map_address_only_before_vcpus(vm):
    vm.set_tss_address(0xFFFBD000)
    vm.set_identity_map_address(0xFFFBC000)
    vm.create_vcpu(0)
    with pytest.raises(pykvm.KvmError) as ei:
        vm.set_identity_map_address(0xFFFBC000)
    assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_SET_IDENTITY_MAP_ADDR"


# --- what this host lacks --------------------------------------------------------------------
def test_hyperv_eventfd_needs_kvm_cap_hyperv_eventfd(vm):
    if vm.check_extension(Cap.HYPERV_EVENTFD):  # pragma: no cover - not on the project's hosts
        with EventFd() as efd:
            vm.hyperv_eventfd(1, efd)
            vm.hyperv_eventfd(1, efd, deassign=True)
        return
    # KVM_CAP_HYPERV_EVENTFD absent: this kernel has no CONFIG_KVM_HYPERV.
    with EventFd() as efd, pytest.raises(pykvm.KvmError) as ei:
        vm.hyperv_eventfd(1, efd)
    assert ei.value.errno == errno.ENOTTY and ei.value.ioctl == "KVM_HYPERV_EVENTFD"


def test_xen_calls_need_kvm_cap_xen_hvm(vm):
    if vm.check_extension(Cap.XEN_HVM):  # pragma: no cover - not on the project's hosts
        vm.xen_hvm_config(msr=0x40000200)
        return
    # KVM_CAP_XEN_HVM absent: this kernel has no CONFIG_KVM_XEN.
    for call in (lambda: vm.xen_hvm_config(msr=0x40000200), lambda: vm.xen_hvm_get_attr(0),
                 lambda: vm.xen_hvm_set_attr(S.kvm_xen_hvm_attr()), lambda: vm.xen_hvm_evtchn_send(1)):
        with pytest.raises(pykvm.KvmError) as ei:
            call()
        assert ei.value.errno == errno.ENOTTY, ei.value


def test_memory_encryption_needs_a_confidential_vm_type(kvm, vm):
    # Only the default VM type here (KVM_CAP_VM_TYPES): no SEV/TDX, so the
    # vendor hook is absent and KVM answers ENOTTY.
    assert kvm.vm_types() == [S.KVM_X86_DEFAULT_VM] or pytest.fail(f"VM types {kvm.vm_types()}: "
                                                                     "extend this test to SEV/TDX")
    for name, call in (("KVM_MEMORY_ENCRYPT_OP", lambda: vm.memory_encrypt_op(S.kvm_sev_cmd())),
                       ("KVM_MEMORY_ENCRYPT_REG_REGION", lambda: vm.memory_encrypt_reg_region(0x1000, 0x1000)),
                       ("KVM_MEMORY_ENCRYPT_UNREG_REGION",
                        lambda: vm.memory_encrypt_unreg_region(0x1000, 0x1000))):
        with pytest.raises(pykvm.KvmError) as ei:
            call()
        assert (ei.value.errno, ei.value.ioctl) == (errno.ENOTTY, name)
    with pytest.raises(TypeError):
        vm.memory_encrypt_op(b"")
