"""ctypes twins of the x86-64 KVM uapi structures.

Every class here mirrors a ``struct`` of ``include/uapi/linux/kvm.h`` or
``arch/x86/include/uapi/asm/kvm.h`` (newest kernel) field for field and under
the kernel's name, so that ``ctypes.sizeof`` and field offsets equal the C
ones.  ``tests/uapi`` pins the sizes and, where gcc and the headers exist,
compares every one with the C compiler's answer.

Structures ending in a flexible array (``kvm_cpuid2``, ``kvm_msrs``,
``kvm_msr_list``, ``kvm_irq_routing``, ...) are declared with their fixed
header only; :func:`flex` builds a type with room for *n* entries.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    c_char,
    c_int16,
    c_int32,
    c_int64,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
)
from functools import lru_cache
from typing import Type, TypeVar

__all__ = []  # filled at the bottom with every kvm_* name


class _S(ctypes.Structure):
    """Base class: adds a readable ``repr`` listing the fields."""

    def __repr__(self) -> str:
        parts = []
        for name, *_ in self._fields_:
            if name.startswith("_") or name.startswith("pad") or name == "reserved":
                continue
            v = getattr(self, name)
            if isinstance(v, int):
                parts.append(f"{name}={v:#x}")
            elif isinstance(v, ctypes.Array) and len(v) > 8:
                parts.append(f"{name}=[...{len(v)}]")
            elif isinstance(v, ctypes.Array):
                parts.append(f"{name}={list(v)!r}")
            else:
                parts.append(f"{name}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class _U(ctypes.Union):
    pass


# ---------------------------------------------------------------------------
# arch/x86/include/uapi/asm/kvm.h
# ---------------------------------------------------------------------------

KVM_NR_INTERRUPTS = 256
KVM_IOAPIC_NUM_PINS = 24
KVM_MAX_XCRS = 16
KVM_MSR_FILTER_MAX_RANGES = 16
KVM_MSR_FILTER_MAX_BITMAP_SIZE = 0x600


class kvm_pic_state(_S):
    _fields_ = [
        ("last_irr", c_uint8),
        ("irr", c_uint8),
        ("imr", c_uint8),
        ("isr", c_uint8),
        ("priority_add", c_uint8),
        ("irq_base", c_uint8),
        ("read_reg_select", c_uint8),
        ("poll", c_uint8),
        ("special_mask", c_uint8),
        ("init_state", c_uint8),
        ("auto_eoi", c_uint8),
        ("rotate_on_auto_eoi", c_uint8),
        ("special_fully_nested_mode", c_uint8),
        ("init4", c_uint8),
        ("elcr", c_uint8),
        ("elcr_mask", c_uint8),
    ]


class kvm_ioapic_redirtbl(_U):
    """One IOAPIC redirection entry: ``bits`` is the raw 64-bit value."""

    _fields_ = [("bits", c_uint64)]


class kvm_ioapic_state(_S):
    _fields_ = [
        ("base_address", c_uint64),
        ("ioregsel", c_uint32),
        ("id", c_uint32),
        ("irr", c_uint32),
        ("pad", c_uint32),
        ("redirtbl", kvm_ioapic_redirtbl * KVM_IOAPIC_NUM_PINS),
    ]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_NR_IRQCHIPS = 3

KVM_RUN_X86_SMM = 1 << 0
KVM_RUN_X86_BUS_LOCK = 1 << 1
KVM_RUN_X86_GUEST_MODE = 1 << 2


class kvm_regs(_S):
    _fields_ = [
        (n, c_uint64)
        for n in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags"
        ).split()
    ]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(_S):
    """The LAPIC register page.  C declares ``char regs[1024]``; bytes here
    (``c_uint8``), because a ctypes ``c_char`` array field reads back as bytes
    cut at the first NUL."""

    _fields_ = [("regs", c_uint8 * KVM_APIC_REG_SIZE)]


class kvm_segment(_S):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(_S):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


_SEGS = [(n, kvm_segment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
_CRS = [(n, c_uint64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]


class kvm_sregs(_S):
    _fields_ = (
        _SEGS
        + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
        + _CRS
        + [("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64))]
    )


KVM_SREGS2_FLAGS_PDPTRS_VALID = 1


class kvm_sregs2(_S):
    _fields_ = (
        _SEGS
        + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
        + _CRS
        + [("flags", c_uint64), ("pdptrs", c_uint64 * 4)]
    )


class kvm_fpu(_S):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_msr_entry(_S):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(_S):
    """Header of ``struct kvm_msrs``; use ``flex(kvm_msrs, n)`` for entries."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]
    _flex_ = ("entries", kvm_msr_entry)


class kvm_msr_list(_S):
    """Header of ``struct kvm_msr_list``; use ``flex(kvm_msr_list, n)``."""

    _fields_ = [("nmsrs", c_uint32)]
    _flex_ = ("indices", c_uint32)


KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_RANGE_VALID_MASK = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1
KVM_MSR_FILTER_VALID_MASK = KVM_MSR_FILTER_DEFAULT_DENY


class kvm_msr_filter_range(_S):
    _fields_ = [
        ("flags", c_uint32),
        ("nmsrs", c_uint32),
        ("base", c_uint32),
        ("bitmap", ctypes.c_void_p),
    ]


class kvm_msr_filter(_S):
    _fields_ = [
        ("flags", c_uint32),
        ("ranges", kvm_msr_filter_range * KVM_MSR_FILTER_MAX_RANGES),
    ]


class kvm_cpuid_entry(_S):
    _fields_ = [
        ("function", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32),
    ]


class kvm_cpuid(_S):
    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]
    _flex_ = ("entries", kvm_cpuid_entry)


class kvm_cpuid_entry2(_S):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # sic, the kernel's spelling
KVM_CPUID_FLAG_SIGNIFICANT_INDEX = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
KVM_CPUID_FLAG_STATEFUL_FUNC = 1 << 1
KVM_CPUID_FLAG_STATE_READ_NEXT = 1 << 2


class kvm_cpuid2(_S):
    """Header of ``struct kvm_cpuid2``; use ``flex(kvm_cpuid2, n)``."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]
    _flex_ = ("entries", kvm_cpuid_entry2)


class kvm_pit_channel_state(_S):
    _fields_ = [
        ("count", c_uint32),
        ("latched_count", c_uint16),
        ("count_latched", c_uint8),
        ("status_latched", c_uint8),
        ("status", c_uint8),
        ("read_state", c_uint8),
        ("write_state", c_uint8),
        ("write_latch", c_uint8),
        ("rw_mode", c_uint8),
        ("mode", c_uint8),
        ("bcd", c_uint8),
        ("gate", c_uint8),
        ("count_load_time", c_int64),
    ]


class kvm_debug_exit_arch(_S):
    _fields_ = [
        ("exception", c_uint32),
        ("pad", c_uint32),
        ("pc", c_uint64),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
    ]


KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000
KVM_GUESTDBG_BLOCKIRQ = 0x00100000


class kvm_guest_debug_arch(_S):
    _fields_ = [("debugreg", c_uint64 * 8)]


class kvm_pit_state(_S):
    _fields_ = [("channels", kvm_pit_channel_state * 3)]


KVM_PIT_FLAGS_HPET_LEGACY = 0x00000001
KVM_PIT_FLAGS_SPEAKER_DATA_ON = 0x00000002


class kvm_pit_state2(_S):
    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", c_uint32),
        ("reserved", c_uint32 * 9),
    ]


class kvm_reinject_control(_S):
    _fields_ = [("pit_reinject", c_uint8), ("reserved", c_uint8 * 31)]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008
KVM_VCPUEVENT_VALID_PAYLOAD = 0x00000010
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x00000020

KVM_X86_SHADOW_INT_MOV_SS = 0x01
KVM_X86_SHADOW_INT_STI = 0x02


class _vcpu_events_exception(_S):
    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class _vcpu_events_interrupt(_S):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _vcpu_events_nmi(_S):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _vcpu_events_smi(_S):
    _fields_ = [
        ("smm", c_uint8),
        ("pending", c_uint8),
        ("smm_inside_nmi", c_uint8),
        ("latched_init", c_uint8),
    ]


class _vcpu_events_triple_fault(_S):
    _fields_ = [("pending", c_uint8)]


class _vcpu_events_u(_U):
    _fields_ = [("pad", c_uint8 * 27), ("triple_fault", _vcpu_events_triple_fault)]


class kvm_vcpu_events(_S):
    _anonymous_ = ("_u",)
    _fields_ = [
        ("exception", _vcpu_events_exception),
        ("interrupt", _vcpu_events_interrupt),
        ("nmi", _vcpu_events_nmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _vcpu_events_smi),
        ("_u", _vcpu_events_u),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


KVM_DEBUGREGS_FLAGS = 0  # no flags defined yet


class kvm_debugregs(_S):
    _fields_ = [
        ("db", c_uint64 * 4),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    ]


class kvm_xsave(_S):
    """``struct kvm_xsave``: 4 KiB; KVM_GET_XSAVE2 may need more (``flex``)."""

    _fields_ = [("region", c_uint32 * 1024)]
    _flex_ = ("extra", c_uint32)


class kvm_xcr(_S):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(_S):
    _fields_ = [
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", c_uint64 * 16),
    ]


KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2
KVM_SYNC_X86_VALID_FIELDS = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS


class kvm_sync_regs(_S):
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class kvm_vmx_nested_state_data(_S):
    _fields_ = [("vmcs12", c_uint8 * 4096), ("shadow_vmcs12", c_uint8 * 4096)]


class _vmx_hdr_smm(_S):
    _fields_ = [("flags", c_uint16)]


class kvm_vmx_nested_state_hdr(_S):
    _fields_ = [
        ("vmxon_pa", c_uint64),
        ("vmcs12_pa", c_uint64),
        ("smm", _vmx_hdr_smm),
        ("pad", c_uint16),
        ("flags", c_uint32),
        ("preemption_timer_deadline", c_uint64),
    ]


class kvm_svm_nested_state_data(_S):
    _fields_ = [("vmcb12", c_uint8 * 4096)]


class kvm_svm_nested_state_hdr(_S):
    _fields_ = [("vmcb_pa", c_uint64)]


class _nested_hdr(_U):
    _fields_ = [
        ("vmx", kvm_vmx_nested_state_hdr),
        ("svm", kvm_svm_nested_state_hdr),
        ("pad", c_uint8 * 120),
    ]


KVM_STATE_NESTED_FORMAT_VMX = 0
KVM_STATE_NESTED_FORMAT_SVM = 1
KVM_STATE_NESTED_GUEST_MODE = 0x00000001
KVM_STATE_NESTED_RUN_PENDING = 0x00000002
KVM_STATE_NESTED_EVMCS = 0x00000004
KVM_STATE_NESTED_MTF_PENDING = 0x00000008
KVM_STATE_NESTED_GIF_SET = 0x00000100
KVM_STATE_NESTED_SMM_GUEST_MODE = 0x00000001
KVM_STATE_NESTED_SMM_VMXON = 0x00000002
KVM_STATE_NESTED_VMX_VMCS_SIZE = 0x1000
KVM_STATE_NESTED_SVM_VMCB_SIZE = 0x1000
KVM_STATE_VMX_PREEMPTION_TIMER_DEADLINE = 0x00000001


class kvm_nested_state(_S):
    """Header of ``struct kvm_nested_state`` (128 bytes); data follows."""

    _fields_ = [
        ("flags", c_uint16),
        ("format", c_uint16),
        ("size", c_uint32),
        ("hdr", _nested_hdr),
    ]
    _flex_ = ("data", c_uint8)


KVM_PMU_EVENT_ALLOW = 0
KVM_PMU_EVENT_DENY = 1
KVM_PMU_EVENT_FLAG_MASKED_EVENTS = 1 << 0
KVM_PMU_EVENT_FLAGS_VALID_MASK = KVM_PMU_EVENT_FLAG_MASKED_EVENTS


class kvm_pmu_event_filter(_S):
    _fields_ = [
        ("action", c_uint32),
        ("nevents", c_uint32),
        ("fixed_counter_bitmap", c_uint32),
        ("flags", c_uint32),
        ("pad", c_uint32 * 4),
    ]
    _flex_ = ("events", c_uint64)


class kvm_x86_mce(_S):
    _fields_ = [
        ("status", c_uint64),
        ("addr", c_uint64),
        ("misc", c_uint64),
        ("mcg_status", c_uint64),
        ("bank", c_uint8),
        ("pad1", c_uint8 * 7),
        ("pad2", c_uint64 * 3),
    ]


KVM_XEN_HVM_CONFIG_HYPERCALL_MSR = 1 << 0
KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL = 1 << 1
KVM_XEN_HVM_CONFIG_SHARED_INFO = 1 << 2
KVM_XEN_HVM_CONFIG_RUNSTATE = 1 << 3
KVM_XEN_HVM_CONFIG_EVTCHN_2LEVEL = 1 << 4
KVM_XEN_HVM_CONFIG_EVTCHN_SEND = 1 << 5
KVM_XEN_HVM_CONFIG_RUNSTATE_UPDATE_FLAG = 1 << 6
KVM_XEN_HVM_CONFIG_PVCLOCK_TSC_UNSTABLE = 1 << 7
KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA = 1 << 8


class kvm_xen_hvm_config(_S):
    _fields_ = [
        ("flags", c_uint32),
        ("msr", c_uint32),
        ("blob_addr_32", c_uint64),
        ("blob_addr_64", c_uint64),
        ("blob_size_32", c_uint8),
        ("blob_size_64", c_uint8),
        ("pad2", c_uint8 * 30),
    ]


class kvm_xen_hvm_attr(_S):
    """``struct kvm_xen_hvm_attr``: type plus a 64-byte union ``u`` (raw)."""

    _fields_ = [("type", c_uint16), ("pad", c_uint16 * 3), ("u", c_uint64 * 8)]


class kvm_xen_vcpu_attr(_S):
    """``struct kvm_xen_vcpu_attr``: type plus a 64-byte union ``u`` (raw)."""

    _fields_ = [("type", c_uint16), ("pad", c_uint16 * 3), ("u", c_uint64 * 8)]


# Secure Encrypted Virtualization command block (KVM_MEMORY_ENCRYPT_OP).
class kvm_sev_cmd(_S):
    _fields_ = [("id", c_uint32), ("pad0", c_uint32), ("data", c_uint64), ("error", c_uint32), ("sev_fd", c_uint32)]


class kvm_hyperv_eventfd(_S):
    _fields_ = [
        ("conn_id", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("padding", c_uint32 * 3),
    ]


KVM_HYPERV_CONN_ID_MASK = 0x00FFFFFF
KVM_HYPERV_EVENTFD_DEASSIGN = 1 << 0

KVM_X86_QUIRK_LINT0_REENABLED = 1 << 0
KVM_X86_QUIRK_CD_NW_CLEARED = 1 << 1
KVM_X86_QUIRK_LAPIC_MMIO_HOLE = 1 << 2
KVM_X86_QUIRK_OUT_7E_INC_RIP = 1 << 3
KVM_X86_QUIRK_MISC_ENABLE_NO_MWAIT = 1 << 4
KVM_X86_QUIRK_FIX_HYPERCALL_INSN = 1 << 5
KVM_X86_QUIRK_MWAIT_NEVER_UD_FAULTS = 1 << 6
KVM_X86_QUIRK_SLOT_ZAP_ALL = 1 << 7
KVM_X86_QUIRK_STUFF_FEATURE_MSRS = 1 << 8
KVM_X86_QUIRK_IGNORE_GUEST_PAT = 1 << 9
KVM_X86_QUIRK_VMCS12_ALLOW_FREEZE_IN_SMM = 1 << 10

KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1
KVM_X86_SEV_VM = 2
KVM_X86_SEV_ES_VM = 3
KVM_X86_SNP_VM = 4
KVM_X86_TDX_VM = 5

# mmap offsets (in pages) inside a vCPU's mapping
KVM_PIO_PAGE_OFFSET = 1
KVM_COALESCED_MMIO_PAGE_OFFSET = 2
KVM_DIRTY_LOG_PAGE_OFFSET = 64


# ---------------------------------------------------------------------------
# include/uapi/linux/kvm.h
# ---------------------------------------------------------------------------


class kvm_memory_region(_S):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
    ]


class kvm_userspace_memory_region(_S):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class kvm_userspace_memory_region2(_S):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
        ("guest_memfd_offset", c_uint64),
        ("guest_memfd", c_uint32),
        ("pad1", c_uint32),
        ("pad2", c_uint64 * 14),
    ]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2


class _irq_level_u(_U):
    _fields_ = [("irq", c_uint32), ("status", c_int32)]


class kvm_irq_level(_S):
    _anonymous_ = ("_u",)
    _fields_ = [("_u", _irq_level_u), ("level", c_uint32)]


class _irqchip_u(_U):
    _fields_ = [("dummy", c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(_S):
    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _irqchip_u)]


class kvm_pit_config(_S):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class _hyperv_synic(_S):
    _fields_ = [
        ("msr", c_uint32),
        ("pad2", c_uint32),
        ("control", c_uint64),
        ("evt_page", c_uint64),
        ("msg_page", c_uint64),
    ]


class _hyperv_hcall(_S):
    _fields_ = [("input", c_uint64), ("result", c_uint64), ("params", c_uint64 * 2)]


class _hyperv_syndbg(_S):
    _fields_ = [
        ("msr", c_uint32),
        ("pad2", c_uint32),
        ("control", c_uint64),
        ("status", c_uint64),
        ("send_page", c_uint64),
        ("recv_page", c_uint64),
        ("pending_page", c_uint64),
    ]


class _hyperv_u(_U):
    _fields_ = [("synic", _hyperv_synic), ("hcall", _hyperv_hcall), ("syndbg", _hyperv_syndbg)]


KVM_EXIT_HYPERV_SYNIC = 1
KVM_EXIT_HYPERV_HCALL = 2
KVM_EXIT_HYPERV_SYNDBG = 3


class kvm_hyperv_exit(_S):
    _fields_ = [("type", c_uint32), ("pad1", c_uint32), ("u", _hyperv_u)]


class _xen_hcall(_S):
    _fields_ = [
        ("longmode", c_uint32),
        ("cpl", c_uint32),
        ("input", c_uint64),
        ("result", c_uint64),
        ("params", c_uint64 * 6),
    ]


class _xen_u(_U):
    _fields_ = [("hcall", _xen_hcall)]


KVM_EXIT_XEN_HCALL = 1


class kvm_xen_exit(_S):
    _fields_ = [("type", c_uint32), ("u", _xen_u)]


# --- kvm_run exit union members -------------------------------------------


class _run_hw(_S):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class _run_fail_entry(_S):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class _run_ex(_S):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class _run_io(_S):
    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


class _run_debug(_S):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class _run_mmio(_S):
    _fields_ = [
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    ]


class _run_iocsr_io(_S):
    _fields_ = [
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    ]


KVM_EXIT_HYPERCALL_LONG_MODE = 1 << 0


class _run_hypercall_u(_U):
    _fields_ = [("longmode", c_uint32), ("flags", c_uint64)]


class _run_hypercall(_S):
    _anonymous_ = ("_u",)
    _fields_ = [
        ("nr", c_uint64),
        ("args", c_uint64 * 6),
        ("ret", c_uint64),
        ("_u", _run_hypercall_u),
    ]


class _run_tpr_access(_S):
    _fields_ = [("rip", c_uint64), ("is_write", c_uint32), ("pad", c_uint32)]


class _run_s390_sieic(_S):
    _fields_ = [("icptcode", c_uint8), ("ipa", c_uint16), ("ipb", c_uint32)]


class _run_s390_ucontrol(_S):
    _fields_ = [("trans_exc_code", c_uint64), ("pgm_code", c_uint32)]


class _run_dcr(_S):
    _fields_ = [("dcrn", c_uint32), ("data", c_uint32), ("is_write", c_uint8)]


KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0


class _run_internal(_S):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _run_emulation_failure(_S):
    _fields_ = [
        ("suberror", c_uint32),
        ("ndata", c_uint32),
        ("flags", c_uint64),
        ("insn_size", c_uint8),
        ("insn_bytes", c_uint8 * 15),
    ]


class _run_osi(_S):
    _fields_ = [("gprs", c_uint64 * 32)]


class _run_papr_hcall(_S):
    _fields_ = [("nr", c_uint64), ("ret", c_uint64), ("args", c_uint64 * 9)]


class _run_s390_tsch(_S):
    _fields_ = [
        ("subchannel_id", c_uint16),
        ("subchannel_nr", c_uint16),
        ("io_int_parm", c_uint32),
        ("io_int_word", c_uint32),
        ("ipb", c_uint32),
        ("dequeued", c_uint8),
    ]


class _run_epr(_S):
    _fields_ = [("epr", c_uint32)]


KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
KVM_SYSTEM_EVENT_SEV_TERM = 6
KVM_SYSTEM_EVENT_TDX_FATAL = 7


class _run_system_event_u(_U):
    _fields_ = [("flags", c_uint64), ("data", c_uint64 * 16)]


class _run_system_event(_S):
    _anonymous_ = ("_u",)
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("_u", _run_system_event_u)]


class _run_s390_stsi(_S):
    _fields_ = [
        ("addr", c_uint64),
        ("ar", c_uint8),
        ("reserved", c_uint8),
        ("fc", c_uint8),
        ("sel1", c_uint8),
        ("sel2", c_uint16),
    ]


class _run_eoi(_S):
    _fields_ = [("vector", c_uint8)]


class _run_arm_nisv(_S):
    _fields_ = [("esr_iss", c_uint64), ("fault_ipa", c_uint64)]


KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2
KVM_MSR_EXIT_REASON_VALID_MASK = 0x7


class _run_msr(_S):
    _fields_ = [
        ("error", c_uint8),
        ("pad", c_uint8 * 7),
        ("reason", c_uint32),
        ("index", c_uint32),
        ("data", c_uint64),
    ]


class _run_riscv_sbi(_S):
    _fields_ = [
        ("extension_id", ctypes.c_ulong),
        ("function_id", ctypes.c_ulong),
        ("args", ctypes.c_ulong * 6),
        ("ret", ctypes.c_ulong * 2),
    ]


class _run_riscv_csr(_S):
    _fields_ = [
        ("csr_num", ctypes.c_ulong),
        ("new_value", ctypes.c_ulong),
        ("write_mask", ctypes.c_ulong),
        ("ret_value", ctypes.c_ulong),
    ]


KVM_NOTIFY_CONTEXT_INVALID = 1 << 0


class _run_notify(_S):
    _fields_ = [("flags", c_uint32)]


KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3


class _run_memory_fault(_S):
    _fields_ = [("flags", c_uint64), ("gpa", c_uint64), ("size", c_uint64)]


class _run_tdx(_S):
    """KVM_EXIT_TDX: the common head (nr, 4 in/out registers); rest raw."""

    _fields_ = [("flags", c_uint64), ("nr", c_uint64), ("raw", c_uint64 * 5)]


KVM_EXIT_ARM_SEA_FLAG_GPA_VALID = 1 << 0


class _run_arm_sea(_S):
    _fields_ = [("flags", c_uint64), ("esr", c_uint64), ("gva", c_uint64), ("gpa", c_uint64)]


class _run_exit_u(_U):
    _fields_ = [
        ("hw", _run_hw),
        ("fail_entry", _run_fail_entry),
        ("ex", _run_ex),
        ("io", _run_io),
        ("debug", _run_debug),
        ("mmio", _run_mmio),
        ("iocsr_io", _run_iocsr_io),
        ("hypercall", _run_hypercall),
        ("tpr_access", _run_tpr_access),
        ("s390_sieic", _run_s390_sieic),
        ("s390_reset_flags", c_uint64),
        ("s390_ucontrol", _run_s390_ucontrol),
        ("dcr", _run_dcr),
        ("internal", _run_internal),
        ("emulation_failure", _run_emulation_failure),
        ("osi", _run_osi),
        ("papr_hcall", _run_papr_hcall),
        ("s390_tsch", _run_s390_tsch),
        ("epr", _run_epr),
        ("system_event", _run_system_event),
        ("s390_stsi", _run_s390_stsi),
        ("eoi", _run_eoi),
        ("hyperv", kvm_hyperv_exit),
        ("arm_nisv", _run_arm_nisv),
        ("msr", _run_msr),
        ("xen", kvm_xen_exit),
        ("riscv_sbi", _run_riscv_sbi),
        ("riscv_csr", _run_riscv_csr),
        ("notify", _run_notify),
        ("memory_fault", _run_memory_fault),
        ("tdx", _run_tdx),
        ("arm_sea", _run_arm_sea),
        ("padding", c_char * 256),
    ]


class _run_s_u(_U):
    _fields_ = [("regs", kvm_sync_regs), ("padding", c_char * 2048)]


class kvm_run(_S):
    """The vCPU's shared run page (``mmap(vcpu_fd, 0)``).

    The exit union is anonymous, as in C: ``run.io.port``, ``run.mmio.data``.
    """

    _anonymous_ = ("_exit",)
    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),  # was padding1[0]; kernel names it immediate_exit__unsafe
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("_exit", _run_exit_u),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", _run_s_u),
    ]


class _zone_u(_U):
    _fields_ = [("pad", c_uint32), ("pio", c_uint32)]


class kvm_coalesced_mmio_zone(_S):
    _anonymous_ = ("_u",)
    _fields_ = [("addr", c_uint64), ("size", c_uint32), ("_u", _zone_u)]


class kvm_coalesced_mmio(_S):
    _anonymous_ = ("_u",)
    _fields_ = [
        ("phys_addr", c_uint64),
        ("len", c_uint32),
        ("_u", _zone_u),
        ("data", c_uint8 * 8),
    ]


class kvm_coalesced_mmio_ring(_S):
    _fields_ = [("first", c_uint32), ("last", c_uint32)]
    _flex_ = ("coalesced_mmio", kvm_coalesced_mmio)


class kvm_translation(_S):
    _fields_ = [
        ("linear_address", c_uint64),
        ("physical_address", c_uint64),
        ("valid", c_uint8),
        ("writeable", c_uint8),
        ("usermode", c_uint8),
        ("pad", c_uint8 * 5),
    ]


class kvm_interrupt(_S):
    _fields_ = [("irq", c_uint32)]


class kvm_dirty_log(_S):
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", ctypes.c_void_p)]


class kvm_clear_dirty_log(_S):
    _fields_ = [
        ("slot", c_uint32),
        ("num_pages", c_uint32),
        ("first_page", c_uint64),
        ("dirty_bitmap", ctypes.c_void_p),
    ]


class kvm_signal_mask(_S):
    _fields_ = [("len", c_uint32)]
    _flex_ = ("sigset", c_uint8)


class kvm_tpr_access_ctl(_S):
    _fields_ = [("enabled", c_uint32), ("flags", c_uint32), ("reserved", c_uint32 * 8)]


class kvm_vapic_addr(_S):
    _fields_ = [("vapic_addr", c_uint64)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
KVM_MP_STATE_STOPPED = 5
KVM_MP_STATE_CHECK_STOP = 6
KVM_MP_STATE_OPERATING = 7
KVM_MP_STATE_LOAD = 8
KVM_MP_STATE_AP_RESET_HOLD = 9
KVM_MP_STATE_SUSPENDED = 10


class kvm_mp_state(_S):
    _fields_ = [("mp_state", c_uint32)]


KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002


class kvm_guest_debug(_S):
    _fields_ = [("control", c_uint32), ("pad", c_uint32), ("arch", kvm_guest_debug_arch)]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY = 1 << 3
KVM_IOEVENTFD_VALID_FLAG_MASK = (1 << 5) - 1


class kvm_ioeventfd(_S):
    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


KVM_X86_DISABLE_EXITS_MWAIT = 1 << 0
KVM_X86_DISABLE_EXITS_HLT = 1 << 1
KVM_X86_DISABLE_EXITS_PAUSE = 1 << 2
KVM_X86_DISABLE_EXITS_CSTATE = 1 << 3
KVM_X86_DISABLE_EXITS_APERFMPERF = 1 << 4


class kvm_enable_cap(_S):
    _fields_ = [
        ("cap", c_uint32),
        ("flags", c_uint32),
        ("args", c_uint64 * 4),
        ("pad", c_uint8 * 64),
    ]


KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQ_ROUTING_S390_ADAPTER = 3
KVM_IRQ_ROUTING_HV_SINT = 4
KVM_IRQ_ROUTING_XEN_EVTCHN = 5


class kvm_irq_routing_irqchip(_S):
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class _msi_u(_U):
    _fields_ = [("pad", c_uint32), ("devid", c_uint32)]


class kvm_irq_routing_msi(_S):
    _anonymous_ = ("_u",)
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("_u", _msi_u),
    ]


class kvm_irq_routing_s390_adapter(_S):
    _fields_ = [
        ("ind_addr", c_uint64),
        ("summary_addr", c_uint64),
        ("ind_offset", c_uint64),
        ("summary_offset", c_uint32),
        ("adapter_id", c_uint32),
    ]


class kvm_irq_routing_hv_sint(_S):
    _fields_ = [("vcpu", c_uint32), ("sint", c_uint32)]


class kvm_irq_routing_xen_evtchn(_S):
    _fields_ = [("port", c_uint32), ("vcpu", c_uint32), ("priority", c_uint32)]


KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL = 0xFFFFFFFF
KVM_MSI_VALID_DEVID = 1 << 0


class _routing_entry_u(_U):
    _fields_ = [
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("adapter", kvm_irq_routing_s390_adapter),
        ("hv_sint", kvm_irq_routing_hv_sint),
        ("xen_evtchn", kvm_irq_routing_xen_evtchn),
        ("pad", c_uint32 * 8),
    ]


class kvm_irq_routing_entry(_S):
    _fields_ = [
        ("gsi", c_uint32),
        ("type", c_uint32),
        ("flags", c_uint32),
        ("pad", c_uint32),
        ("u", _routing_entry_u),
    ]


class kvm_irq_routing(_S):
    """Header of ``struct kvm_irq_routing``; use ``flex(kvm_irq_routing, n)``."""

    _fields_ = [("nr", c_uint32), ("flags", c_uint32)]
    _flex_ = ("entries", kvm_irq_routing_entry)


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_irqfd(_S):
    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3


class kvm_clock_data(_S):
    _fields_ = [
        ("clock", c_uint64),
        ("flags", c_uint32),
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    ]


class kvm_reg_list(_S):
    _fields_ = [("n", c_uint64)]
    _flex_ = ("reg", c_uint64)


class kvm_one_reg(_S):
    _fields_ = [("id", c_uint64), ("addr", c_uint64)]


# ONE_REG register ids (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h).
KVM_REG_ARCH_MASK = 0xFF00000000000000
KVM_REG_GENERIC = 0x0000000000000000
KVM_REG_X86 = 0x2000000000000000
KVM_REG_SIZE_SHIFT = 52
KVM_REG_SIZE_MASK = 0x00F0000000000000
KVM_REG_SIZE_U8 = 0x0000000000000000
KVM_REG_SIZE_U16 = 0x0010000000000000
KVM_REG_SIZE_U32 = 0x0020000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_SIZE_U128 = 0x0040000000000000
KVM_REG_SIZE_U256 = 0x0050000000000000
KVM_REG_SIZE_U512 = 0x0060000000000000
KVM_REG_SIZE_U1024 = 0x0070000000000000
KVM_REG_SIZE_U2048 = 0x0080000000000000
KVM_X86_REG_TYPE_MSR = 2
KVM_X86_REG_TYPE_KVM = 3
KVM_REG_GUEST_SSP = 0  # the one KVM-defined x86 register (CET shadow-stack pointer)


def KVM_X86_REG_ID(type_: int, index: int) -> int:
    """The kernel macro: an x86 ONE_REG id (every x86 register there is 64-bit)."""
    return KVM_REG_X86 | (type_ << 32) | KVM_REG_SIZE_U64 | index


def KVM_X86_REG_MSR(index: int) -> int:
    """ONE_REG id of MSR *index* (kernel 6.18+)."""
    return KVM_X86_REG_ID(KVM_X86_REG_TYPE_MSR, index)


def KVM_X86_REG_KVM(index: int) -> int:
    """ONE_REG id of KVM-defined register *index* (``KVM_REG_GUEST_SSP``)."""
    return KVM_X86_REG_ID(KVM_X86_REG_TYPE_KVM, index)


class kvm_msi(_S):
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("flags", c_uint32),
        ("devid", c_uint32),
        ("pad", c_uint8 * 12),
    ]


KVM_CREATE_DEVICE_TEST = 1

# enum kvm_device_type
KVM_DEV_TYPE_FSL_MPIC_20 = 1
KVM_DEV_TYPE_FSL_MPIC_42 = 2
KVM_DEV_TYPE_XICS = 3
KVM_DEV_TYPE_VFIO = 4
KVM_DEV_TYPE_ARM_VGIC_V2 = 5
KVM_DEV_TYPE_FLIC = 6
KVM_DEV_TYPE_ARM_VGIC_V3 = 7
KVM_DEV_TYPE_ARM_VGIC_ITS = 8
KVM_DEV_TYPE_XIVE = 9
KVM_DEV_TYPE_ARM_PV_TIME = 10
KVM_DEV_TYPE_RISCV_AIA = 11
KVM_DEV_TYPE_LOONGARCH_IPI = 12
KVM_DEV_TYPE_LOONGARCH_EIOINTC = 13
KVM_DEV_TYPE_LOONGARCH_PCHPIC = 14


class kvm_create_device(_S):
    _fields_ = [("type", c_uint32), ("fd", c_uint32), ("flags", c_uint32)]


class kvm_device_attr(_S):
    _fields_ = [("flags", c_uint32), ("group", c_uint32), ("attr", c_uint64), ("addr", c_uint64)]


KVM_DEV_VFIO_FILE = 1
KVM_DEV_VFIO_FILE_ADD = 1
KVM_DEV_VFIO_FILE_DEL = 2
KVM_DEV_VFIO_GROUP = KVM_DEV_VFIO_FILE
KVM_DEV_VFIO_GROUP_ADD = KVM_DEV_VFIO_FILE_ADD
KVM_DEV_VFIO_GROUP_DEL = KVM_DEV_VFIO_FILE_DEL
KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE = 3

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_GFN_F_MASK = 0x3


class kvm_dirty_gfn(_S):
    _fields_ = [("flags", c_uint32), ("slot", c_uint32), ("offset", c_uint64)]


KVM_BUS_LOCK_DETECTION_OFF = 1 << 0
KVM_BUS_LOCK_DETECTION_EXIT = 1 << 1
KVM_PMU_CAP_DISABLE = 1 << 0
KVM_X86_NOTIFY_VMEXIT_ENABLED = 1 << 0
KVM_X86_NOTIFY_VMEXIT_USER = 1 << 1
KVM_X2APIC_API_USE_32BIT_IDS = 1 << 0
KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK = 1 << 1
KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST = 1 << 2
KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST = 1 << 3
KVM_MSR_EXIT_REASON_INVAL_FLAG = KVM_MSR_EXIT_REASON_INVAL  # alias for readability


class kvm_stats_header(_S):
    _fields_ = [
        ("flags", c_uint32),
        ("name_size", c_uint32),
        ("num_desc", c_uint32),
        ("id_offset", c_uint32),
        ("desc_offset", c_uint32),
        ("data_offset", c_uint32),
    ]


KVM_STATS_NAME_SIZE = 48
KVM_STATS_TYPE_SHIFT = 0
KVM_STATS_TYPE_MASK = 0xF << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_CUMULATIVE = 0x0 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_INSTANT = 0x1 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_PEAK = 0x2 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_LINEAR_HIST = 0x3 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_LOG_HIST = 0x4 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_MAX = KVM_STATS_TYPE_LOG_HIST
KVM_STATS_UNIT_SHIFT = 4
KVM_STATS_UNIT_MASK = 0xF << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_NONE = 0x0 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_BYTES = 0x1 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_SECONDS = 0x2 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_CYCLES = 0x3 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_BOOLEAN = 0x4 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_MAX = KVM_STATS_UNIT_BOOLEAN
KVM_STATS_BASE_SHIFT = 8
KVM_STATS_BASE_MASK = 0xF << KVM_STATS_BASE_SHIFT
KVM_STATS_BASE_POW10 = 0x0 << KVM_STATS_BASE_SHIFT
KVM_STATS_BASE_POW2 = 0x1 << KVM_STATS_BASE_SHIFT
KVM_STATS_BASE_MAX = KVM_STATS_BASE_POW2


class kvm_stats_desc(_S):
    """Header of ``struct kvm_stats_desc``; ``name_size`` bytes of name follow."""

    _fields_ = [
        ("flags", c_uint32),
        ("exponent", c_int16),
        ("size", c_uint16),
        ("offset", c_uint32),
        ("bucket_size", c_uint32),
    ]
    _flex_ = ("name", c_char)


KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3


class kvm_memory_attributes(_S):
    _fields_ = [
        ("address", c_uint64),
        ("size", c_uint64),
        ("attributes", c_uint64),
        ("flags", c_uint64),
    ]


GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1


class kvm_create_guest_memfd(_S):
    _fields_ = [("size", c_uint64), ("flags", c_uint64), ("reserved", c_uint64 * 6)]


class kvm_pre_fault_memory(_S):
    _fields_ = [
        ("gpa", c_uint64),
        ("size", c_uint64),
        ("flags", c_uint64),
        ("padding", c_uint64 * 5),
    ]


class kvm_enc_region(_S):
    _fields_ = [("addr", c_uint64), ("size", c_uint64)]


class kvm_s390_mem_op(_S):
    """Only here so that the (s390) request number has its kernel size."""

    _fields_ = [
        ("gaddr", c_uint64),
        ("flags", c_uint64),
        ("size", c_uint32),
        ("op", c_uint32),
        ("buf", c_uint64),
        ("reserved", c_uint8 * 32),  # union { ar/key/old_addr; sida_offset; reserved[32] }
    ]


# ---------------------------------------------------------------------------
# Flexible arrays
# ---------------------------------------------------------------------------

T = TypeVar("T", bound=ctypes.Structure)


@lru_cache(maxsize=256)
def _flex_type(base: type, n: int) -> type:
    name, etype = base._flex_
    # A subclass appends its fields after the base's: header, then entries,
    # exactly like the C layout; isinstance(obj, base) stays true.
    return type(f"{base.__name__}[{n}]", (base,), {"_fields_": [(name, etype * n)]})


def flex(base: Type[T], n: int) -> ctypes.Structure:
    """Allocate a zeroed ``base`` header followed by *n* flexible-array entries.

    ``flex(kvm_cpuid2, 10)`` returns an instance whose ``entries`` field has 10
    ``kvm_cpuid_entry2`` and whose count field (``nent``, ``nmsrs``, ``nr``...)
    is already set to *n* where the kernel expects it.
    """
    if not hasattr(base, "_flex_"):
        raise TypeError(f"{base.__name__} has no flexible array member")
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"entry count must be an int, not {type(n).__name__}")
    if n < 0 or n > (1 << 24):
        raise ValueError(f"entry count {n} out of range (0..{1 << 24})")
    obj = _flex_type(base, n)()
    count_field = _COUNT_FIELD.get(base.__name__)
    if count_field:
        setattr(obj, count_field, n)
    return obj


_COUNT_FIELD = {
    "kvm_cpuid2": "nent",
    "kvm_cpuid": "nent",
    "kvm_msrs": "nmsrs",
    "kvm_msr_list": "nmsrs",
    "kvm_irq_routing": "nr",
    "kvm_pmu_event_filter": "nevents",
    "kvm_reg_list": "n",
}

__all__ = [n for n in list(globals()) if n.startswith(("kvm_", "KVM_", "GUEST_MEMFD"))] + ["flex"]
