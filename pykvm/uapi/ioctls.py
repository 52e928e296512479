"""Every KVM ioctl request number that applies to an x86-64 host.

Built with ``ioctl_opt.IO/IOR/IOW/IOWR`` from the structures in
:mod:`pykvm.uapi.structs`, named exactly like the kernel's macros.  The table
``IOCTLS`` maps each name to its number and ``IOCTL_NAMES`` the other way (for
error messages).

ioctl-opt checks its ranges with ``assert``, which ``python -O`` removes, and
it accepts a zero-sized type.  :func:`_req` therefore validates every
argument itself and re-decodes the number it gets back, so a misspelled
``_fields_`` or an out-of-range size fails at import time, with or without
``-O``.
"""

from __future__ import annotations

import ctypes
from typing import Dict, Optional

import ioctl_opt

from . import structs as s

__all__ = ["IOCTLS", "IOCTL_NAMES", "KVMIO", "ioctl_name"]

KVMIO = 0xAE

_DIRS = {"": ioctl_opt.IO, "R": ioctl_opt.IOR, "W": ioctl_opt.IOW, "WR": ioctl_opt.IOWR}
_DIRBITS = {"": ioctl_opt.IOC_NONE, "R": ioctl_opt.IOC_READ, "W": ioctl_opt.IOC_WRITE,
            "WR": ioctl_opt.IOC_READ | ioctl_opt.IOC_WRITE}

IOCTLS: Dict[str, int] = {}


def _req(name: str, direction: str, nr: int, argtype: Optional[type] = None) -> int:
    """Build, check and register one request number."""
    if not 0 <= nr <= 0xFF:
        raise ValueError(f"{name}: ioctl nr {nr:#x} out of range")
    if direction == "":
        if argtype is not None:
            raise TypeError(f"{name}: _IO takes no argument type")
        num = ioctl_opt.IO(KVMIO, nr)
        size = 0
    else:
        size = ctypes.sizeof(argtype)
        if size <= 0:
            raise TypeError(f"{name}: argument type {argtype!r} has size 0 (empty _fields_?)")
        if size > ioctl_opt._IOC_SIZEMASK:
            raise ValueError(f"{name}: argument size {size} does not fit 14 bits")
        num = _DIRS[direction](KVMIO, nr, argtype)
    # Re-decode: catches a wrong number even when ioctl-opt's asserts are off.
    if (
        ioctl_opt.IOC_NR(num) != nr
        or ioctl_opt.IOC_TYPE(num) != KVMIO
        or ioctl_opt.IOC_SIZE(num) != size
        or ioctl_opt.IOC_DIR(num) != _DIRBITS[direction]
    ):
        raise AssertionError(f"{name}: request number {num:#x} does not decode back")
    IOCTLS[name] = num
    return num


u64 = ctypes.c_uint64
ulong = ctypes.c_ulong

# --- system ioctls (on the /dev/kvm fd) ------------------------------------
KVM_GET_API_VERSION = _req("KVM_GET_API_VERSION", "", 0x00)
KVM_CREATE_VM = _req("KVM_CREATE_VM", "", 0x01)
KVM_GET_MSR_INDEX_LIST = _req("KVM_GET_MSR_INDEX_LIST", "WR", 0x02, s.kvm_msr_list)
KVM_CHECK_EXTENSION = _req("KVM_CHECK_EXTENSION", "", 0x03)
KVM_GET_VCPU_MMAP_SIZE = _req("KVM_GET_VCPU_MMAP_SIZE", "", 0x04)
KVM_GET_SUPPORTED_CPUID = _req("KVM_GET_SUPPORTED_CPUID", "WR", 0x05, s.kvm_cpuid2)
KVM_GET_EMULATED_CPUID = _req("KVM_GET_EMULATED_CPUID", "WR", 0x09, s.kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _req("KVM_GET_MSR_FEATURE_INDEX_LIST", "WR", 0x0A, s.kvm_msr_list)

# --- VM ioctls ---------------------------------------------------------------
KVM_SET_MEMORY_REGION = _req("KVM_SET_MEMORY_REGION", "W", 0x40, s.kvm_memory_region)
KVM_CREATE_VCPU = _req("KVM_CREATE_VCPU", "", 0x41)
KVM_GET_DIRTY_LOG = _req("KVM_GET_DIRTY_LOG", "W", 0x42, s.kvm_dirty_log)
KVM_SET_NR_MMU_PAGES = _req("KVM_SET_NR_MMU_PAGES", "", 0x44)
KVM_GET_NR_MMU_PAGES = _req("KVM_GET_NR_MMU_PAGES", "", 0x45)
KVM_SET_USER_MEMORY_REGION = _req("KVM_SET_USER_MEMORY_REGION", "W", 0x46, s.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _req("KVM_SET_TSS_ADDR", "", 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _req("KVM_SET_IDENTITY_MAP_ADDR", "W", 0x48, u64)
KVM_SET_USER_MEMORY_REGION2 = _req("KVM_SET_USER_MEMORY_REGION2", "W", 0x49, s.kvm_userspace_memory_region2)

KVM_CREATE_IRQCHIP = _req("KVM_CREATE_IRQCHIP", "", 0x60)
KVM_IRQ_LINE = _req("KVM_IRQ_LINE", "W", 0x61, s.kvm_irq_level)
KVM_GET_IRQCHIP = _req("KVM_GET_IRQCHIP", "WR", 0x62, s.kvm_irqchip)
KVM_SET_IRQCHIP = _req("KVM_SET_IRQCHIP", "R", 0x63, s.kvm_irqchip)  # sic: _IOR in the kernel
KVM_CREATE_PIT = _req("KVM_CREATE_PIT", "", 0x64)
KVM_GET_PIT = _req("KVM_GET_PIT", "WR", 0x65, s.kvm_pit_state)
KVM_SET_PIT = _req("KVM_SET_PIT", "R", 0x66, s.kvm_pit_state)  # sic: _IOR in the kernel
KVM_IRQ_LINE_STATUS = _req("KVM_IRQ_LINE_STATUS", "WR", 0x67, s.kvm_irq_level)
KVM_REGISTER_COALESCED_MMIO = _req("KVM_REGISTER_COALESCED_MMIO", "W", 0x67, s.kvm_coalesced_mmio_zone)
KVM_UNREGISTER_COALESCED_MMIO = _req("KVM_UNREGISTER_COALESCED_MMIO", "W", 0x68, s.kvm_coalesced_mmio_zone)
KVM_SET_GSI_ROUTING = _req("KVM_SET_GSI_ROUTING", "W", 0x6A, s.kvm_irq_routing)
KVM_REINJECT_CONTROL = _req("KVM_REINJECT_CONTROL", "", 0x71)
KVM_IRQFD = _req("KVM_IRQFD", "W", 0x76, s.kvm_irqfd)
KVM_CREATE_PIT2 = _req("KVM_CREATE_PIT2", "W", 0x77, s.kvm_pit_config)
KVM_SET_BOOT_CPU_ID = _req("KVM_SET_BOOT_CPU_ID", "", 0x78)
KVM_IOEVENTFD = _req("KVM_IOEVENTFD", "W", 0x79, s.kvm_ioeventfd)
KVM_XEN_HVM_CONFIG = _req("KVM_XEN_HVM_CONFIG", "W", 0x7A, s.kvm_xen_hvm_config)
KVM_SET_CLOCK = _req("KVM_SET_CLOCK", "W", 0x7B, s.kvm_clock_data)
KVM_GET_CLOCK = _req("KVM_GET_CLOCK", "R", 0x7C, s.kvm_clock_data)
KVM_GET_PIT2 = _req("KVM_GET_PIT2", "R", 0x9F, s.kvm_pit_state2)
KVM_SET_PIT2 = _req("KVM_SET_PIT2", "W", 0xA0, s.kvm_pit_state2)
KVM_SIGNAL_MSI = _req("KVM_SIGNAL_MSI", "W", 0xA5, s.kvm_msi)
KVM_SET_PMU_EVENT_FILTER = _req("KVM_SET_PMU_EVENT_FILTER", "W", 0xB2, s.kvm_pmu_event_filter)
KVM_MEMORY_ENCRYPT_OP = _req("KVM_MEMORY_ENCRYPT_OP", "WR", 0xBA, ulong)
KVM_MEMORY_ENCRYPT_REG_REGION = _req("KVM_MEMORY_ENCRYPT_REG_REGION", "R", 0xBB, s.kvm_enc_region)
KVM_MEMORY_ENCRYPT_UNREG_REGION = _req("KVM_MEMORY_ENCRYPT_UNREG_REGION", "R", 0xBC, s.kvm_enc_region)
KVM_HYPERV_EVENTFD = _req("KVM_HYPERV_EVENTFD", "W", 0xBD, s.kvm_hyperv_eventfd)
KVM_CLEAR_DIRTY_LOG = _req("KVM_CLEAR_DIRTY_LOG", "WR", 0xC0, s.kvm_clear_dirty_log)
KVM_X86_SET_MSR_FILTER = _req("KVM_X86_SET_MSR_FILTER", "W", 0xC6, s.kvm_msr_filter)
KVM_RESET_DIRTY_RINGS = _req("KVM_RESET_DIRTY_RINGS", "", 0xC7)
KVM_XEN_HVM_GET_ATTR = _req("KVM_XEN_HVM_GET_ATTR", "WR", 0xC8, s.kvm_xen_hvm_attr)
KVM_XEN_HVM_SET_ATTR = _req("KVM_XEN_HVM_SET_ATTR", "W", 0xC9, s.kvm_xen_hvm_attr)
KVM_XEN_HVM_EVTCHN_SEND = _req("KVM_XEN_HVM_EVTCHN_SEND", "W", 0xD0, s.kvm_irq_routing_xen_evtchn)
KVM_SET_MEMORY_ATTRIBUTES = _req("KVM_SET_MEMORY_ATTRIBUTES", "W", 0xD2, s.kvm_memory_attributes)
KVM_CREATE_GUEST_MEMFD = _req("KVM_CREATE_GUEST_MEMFD", "WR", 0xD4, s.kvm_create_guest_memfd)

# --- generic ioctls valid on several fd kinds -------------------------------
KVM_ENABLE_CAP = _req("KVM_ENABLE_CAP", "W", 0xA3, s.kvm_enable_cap)
KVM_CREATE_DEVICE = _req("KVM_CREATE_DEVICE", "WR", 0xE0, s.kvm_create_device)
KVM_SET_DEVICE_ATTR = _req("KVM_SET_DEVICE_ATTR", "W", 0xE1, s.kvm_device_attr)
KVM_GET_DEVICE_ATTR = _req("KVM_GET_DEVICE_ATTR", "W", 0xE2, s.kvm_device_attr)
KVM_HAS_DEVICE_ATTR = _req("KVM_HAS_DEVICE_ATTR", "W", 0xE3, s.kvm_device_attr)
KVM_GET_STATS_FD = _req("KVM_GET_STATS_FD", "", 0xCE)

# --- vCPU ioctls -------------------------------------------------------------
KVM_RUN = _req("KVM_RUN", "", 0x80)
KVM_GET_REGS = _req("KVM_GET_REGS", "R", 0x81, s.kvm_regs)
KVM_SET_REGS = _req("KVM_SET_REGS", "W", 0x82, s.kvm_regs)
KVM_GET_SREGS = _req("KVM_GET_SREGS", "R", 0x83, s.kvm_sregs)
KVM_SET_SREGS = _req("KVM_SET_SREGS", "W", 0x84, s.kvm_sregs)
KVM_TRANSLATE = _req("KVM_TRANSLATE", "WR", 0x85, s.kvm_translation)
KVM_INTERRUPT = _req("KVM_INTERRUPT", "W", 0x86, s.kvm_interrupt)
KVM_GET_MSRS = _req("KVM_GET_MSRS", "WR", 0x88, s.kvm_msrs)
KVM_SET_MSRS = _req("KVM_SET_MSRS", "W", 0x89, s.kvm_msrs)
KVM_SET_CPUID = _req("KVM_SET_CPUID", "W", 0x8A, s.kvm_cpuid)
KVM_SET_SIGNAL_MASK = _req("KVM_SET_SIGNAL_MASK", "W", 0x8B, s.kvm_signal_mask)
KVM_GET_FPU = _req("KVM_GET_FPU", "R", 0x8C, s.kvm_fpu)
KVM_SET_FPU = _req("KVM_SET_FPU", "W", 0x8D, s.kvm_fpu)
KVM_GET_LAPIC = _req("KVM_GET_LAPIC", "R", 0x8E, s.kvm_lapic_state)
KVM_SET_LAPIC = _req("KVM_SET_LAPIC", "W", 0x8F, s.kvm_lapic_state)
KVM_SET_CPUID2 = _req("KVM_SET_CPUID2", "W", 0x90, s.kvm_cpuid2)
KVM_GET_CPUID2 = _req("KVM_GET_CPUID2", "WR", 0x91, s.kvm_cpuid2)
KVM_TPR_ACCESS_REPORTING = _req("KVM_TPR_ACCESS_REPORTING", "WR", 0x92, s.kvm_tpr_access_ctl)
KVM_SET_VAPIC_ADDR = _req("KVM_SET_VAPIC_ADDR", "W", 0x93, s.kvm_vapic_addr)
KVM_GET_MP_STATE = _req("KVM_GET_MP_STATE", "R", 0x98, s.kvm_mp_state)
KVM_SET_MP_STATE = _req("KVM_SET_MP_STATE", "W", 0x99, s.kvm_mp_state)
KVM_NMI = _req("KVM_NMI", "", 0x9A)
KVM_SET_GUEST_DEBUG = _req("KVM_SET_GUEST_DEBUG", "W", 0x9B, s.kvm_guest_debug)
KVM_X86_SETUP_MCE = _req("KVM_X86_SETUP_MCE", "W", 0x9C, u64)
KVM_X86_GET_MCE_CAP_SUPPORTED = _req("KVM_X86_GET_MCE_CAP_SUPPORTED", "R", 0x9D, u64)
KVM_X86_SET_MCE = _req("KVM_X86_SET_MCE", "W", 0x9E, s.kvm_x86_mce)
KVM_GET_VCPU_EVENTS = _req("KVM_GET_VCPU_EVENTS", "R", 0x9F, s.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _req("KVM_SET_VCPU_EVENTS", "W", 0xA0, s.kvm_vcpu_events)
KVM_GET_DEBUGREGS = _req("KVM_GET_DEBUGREGS", "R", 0xA1, s.kvm_debugregs)
KVM_SET_DEBUGREGS = _req("KVM_SET_DEBUGREGS", "W", 0xA2, s.kvm_debugregs)
KVM_SET_TSC_KHZ = _req("KVM_SET_TSC_KHZ", "", 0xA2)
KVM_GET_TSC_KHZ = _req("KVM_GET_TSC_KHZ", "", 0xA3)
KVM_GET_XSAVE = _req("KVM_GET_XSAVE", "R", 0xA4, s.kvm_xsave)
KVM_SET_XSAVE = _req("KVM_SET_XSAVE", "W", 0xA5, s.kvm_xsave)
KVM_GET_XCRS = _req("KVM_GET_XCRS", "R", 0xA6, s.kvm_xcrs)
KVM_SET_XCRS = _req("KVM_SET_XCRS", "W", 0xA7, s.kvm_xcrs)
KVM_GET_ONE_REG = _req("KVM_GET_ONE_REG", "W", 0xAB, s.kvm_one_reg)
KVM_SET_ONE_REG = _req("KVM_SET_ONE_REG", "W", 0xAC, s.kvm_one_reg)
KVM_KVMCLOCK_CTRL = _req("KVM_KVMCLOCK_CTRL", "", 0xAD)
KVM_GET_REG_LIST = _req("KVM_GET_REG_LIST", "WR", 0xB0, s.kvm_reg_list)
KVM_SMI = _req("KVM_SMI", "", 0xB7)
KVM_GET_NESTED_STATE = _req("KVM_GET_NESTED_STATE", "WR", 0xBE, s.kvm_nested_state)
KVM_SET_NESTED_STATE = _req("KVM_SET_NESTED_STATE", "W", 0xBF, s.kvm_nested_state)
KVM_GET_SUPPORTED_HV_CPUID = _req("KVM_GET_SUPPORTED_HV_CPUID", "WR", 0xC1, s.kvm_cpuid2)
KVM_XEN_VCPU_GET_ATTR = _req("KVM_XEN_VCPU_GET_ATTR", "WR", 0xCA, s.kvm_xen_vcpu_attr)
KVM_XEN_VCPU_SET_ATTR = _req("KVM_XEN_VCPU_SET_ATTR", "W", 0xCB, s.kvm_xen_vcpu_attr)
KVM_GET_SREGS2 = _req("KVM_GET_SREGS2", "R", 0xCC, s.kvm_sregs2)
KVM_SET_SREGS2 = _req("KVM_SET_SREGS2", "W", 0xCD, s.kvm_sregs2)
KVM_GET_XSAVE2 = _req("KVM_GET_XSAVE2", "R", 0xCF, s.kvm_xsave)
KVM_PRE_FAULT_MEMORY = _req("KVM_PRE_FAULT_MEMORY", "WR", 0xD5, s.kvm_pre_fault_memory)

IOCTL_NAMES: Dict[int, str] = {}
for _name, _num in IOCTLS.items():
    # Two names share a number nowhere on x86; keep the first if they ever do.
    IOCTL_NAMES.setdefault(_num, _name)
del _name, _num

__all__ += list(IOCTLS)


def ioctl_name(request: int) -> str:
    """The kernel macro name of a request number, or its hex form."""
    return IOCTL_NAMES.get(request, f"ioctl {request:#x}")
