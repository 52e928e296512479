"""Request numbers and struct layouts pinned to the kernel's values.

The expected numbers below were computed by the kernel's own macros (and
are cross-checked against the C compiler by test_against_c.py where gcc and
headers exist); they are not produced by pykvm.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from pykvm import uapi

pytestmark = pytest.mark.no_kvm_needed

REQUESTS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_GET_IRQCHIP": 0xC208AE62,
    "KVM_SET_IRQCHIP": 0x8208AE63,
    "KVM_IRQ_LINE_STATUS": 0xC008AE67,
    "KVM_IRQFD": 0x4020AE76,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_CPUID2": 0xC008AE91,
    "KVM_SET_GUEST_DEBUG": 0x4048AE9B,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_GET_SREGS2": 0x8140AECC,
    "KVM_GET_STATS_FD": 0xAECE,
    "KVM_GET_XSAVE2": 0x9000AECF,
    "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
    "KVM_PRE_FAULT_MEMORY": 0xC040AED5,
    "KVM_X86_SET_MSR_FILTER": 0x4188AEC6,
    "KVM_CREATE_DEVICE": 0xC00CAEE0,
}

SIZES = {
    "kvm_regs": 144, "kvm_sregs": 312, "kvm_sregs2": 320, "kvm_segment": 24, "kvm_dtable": 16,
    "kvm_run": 2352, "kvm_fpu": 416, "kvm_lapic_state": 1024, "kvm_msr_entry": 16, "kvm_msrs": 8,
    "kvm_cpuid_entry2": 40, "kvm_cpuid2": 8, "kvm_userspace_memory_region": 32,
    "kvm_userspace_memory_region2": 160, "kvm_vcpu_events": 64, "kvm_debugregs": 128,
    "kvm_xsave": 4096, "kvm_xcrs": 392, "kvm_irqchip": 520, "kvm_pit_state2": 112,
    "kvm_ioeventfd": 64, "kvm_irqfd": 32, "kvm_enable_cap": 104, "kvm_guest_debug": 72,
    "kvm_clock_data": 48, "kvm_irq_routing_entry": 48, "kvm_msr_filter": 392,
    "kvm_nested_state": 128, "kvm_stats_header": 24, "kvm_stats_desc": 16,
    "kvm_dirty_gfn": 16, "kvm_coalesced_mmio": 24, "kvm_create_guest_memfd": 64,
    "kvm_pre_fault_memory": 64, "kvm_memory_attributes": 32, "kvm_x86_mce": 64,
    "kvm_device_attr": 24, "kvm_translation": 24, "kvm_msi": 32, "kvm_sync_regs": 520,
    # fixed in the generated layer (were wrong when hand-written):
    "kvm_svm_nested_state_hdr": 16, "kvm_sev_cmd": 24, "kvm_tdx_cmd": 24,
}


def test_named_union_members():
    """Members the kernel names inside unions are reachable by those names."""
    run = uapi.kvm_run
    assert run.tdx.size == 64 and ctypes.sizeof(type(run().tdx)) == 64
    assert run.tdx.offset == 32
    assert uapi.kvm_nested_state.hdr.offset == 8
    assert type(uapi.kvm_nested_state().hdr).svm.offset == 0
    entry = uapi.kvm_ioapic_redirtbl()
    entry.fields.dest_id = 0xAB
    entry.fields.vector = 0x31
    assert entry.bits == (0xAB << 56) | 0x31
    attr = uapi.kvm_xen_hvm_attr()
    attr.u.shared_info.gfn = 7
    assert attr.u.pad[0] == 7

RUN_OFFSETS = {  # offsetof(struct kvm_run, ...)
    "request_interrupt_window": 0, "immediate_exit": 1, "exit_reason": 8,
    "ready_for_interrupt_injection": 12, "if_flag": 13, "flags": 14, "cr8": 16,
    "apic_base": 24, "kvm_valid_regs": 288, "kvm_dirty_regs": 296, "s": 304,
}


@pytest.mark.parametrize("name,value", sorted(REQUESTS.items()))
def test_request_number(name, value):
    assert getattr(uapi, name) == value


@pytest.mark.parametrize("name,size", sorted(SIZES.items()))
def test_struct_size(name, size):
    assert ctypes.sizeof(getattr(uapi, name)) == size


def test_kvm_run_offsets():
    for field, off in RUN_OFFSETS.items():
        assert getattr(uapi.kvm_run, field).offset == off, field
    # exit union members start at 32
    assert uapi.kvm_run.io.offset == uapi.kvm_run.mmio.offset == 32


def test_enums_cover_the_newest_kernel():
    assert len(uapi.Cap) == 246 and max(uapi.Cap) == 251
    assert uapi.Cap.GUEST_MEMFD_FLAGS == 244 and uapi.Cap.VM_TYPES == 235
    assert [int(e) for e in uapi.ExitReason] == list(range(44))
    assert uapi.ExitReason.MEMORY_FAULT == 39 and uapi.ExitReason.ARM_SEA == 41
    assert uapi.ExitReason.SNP_REQ_CERTS == 43
    assert uapi.cap_name(246) == "KVM_CAP_S390_USER_OPEREXEC"
    assert uapi.cap_name(251) == "KVM_CAP_ARM_PMU_V3_STRICT"
    assert uapi.cap_name(999) == "KVM_CAP_999?"


def test_every_request_decodes_and_is_unique_per_name():
    assert len(uapi.IOCTLS) >= 100
    for name, num in uapi.IOCTLS.items():
        assert (num >> 8) & 0xFF == 0xAE, name
        assert uapi.ioctl_name(num) == name or uapi.IOCTL_NAMES[num] != name


def test_flex_allocates_header_plus_entries():
    c = uapi.flex(uapi.kvm_cpuid2, 5)
    assert c.nent == 5 and len(c.entries) == 5
    assert ctypes.sizeof(c) == 8 + 5 * 40
    assert isinstance(c, uapi.kvm_cpuid2)
    m = uapi.flex(uapi.kvm_msrs, 3)
    assert m.nmsrs == 3 and type(m).entries.offset == 8
    with pytest.raises(TypeError):
        uapi.flex(uapi.kvm_regs, 1)
    with pytest.raises(ValueError):
        uapi.flex(uapi.kvm_msrs, -1)


def test_guards_survive_python_O(tmp_path):
    """ioctl-opt's own checks are asserts; ours must hold under -O too."""
    code = (
        "import ctypes, pytest\n"
        "from pykvm.uapi import ioctls\n"
        "class empty(ctypes.Structure):\n    _fields_ = []\n"
        "class huge(ctypes.Structure):\n    _fields_ = [('a', ctypes.c_char * 20000)]\n"
        "for t in (empty, huge):\n"
        "    try:\n        ioctls._req('KVM_BAD', 'W', 0x10, t)\n    except (TypeError, ValueError):\n        pass\n"
        "    else:\n        raise SystemExit('accepted ' + t.__name__)\n"
        "try:\n    ioctls._req('KVM_BAD', '', 0x100)\nexcept ValueError:\n    pass\n"
        "else:\n    raise SystemExit('accepted nr 0x100')\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
