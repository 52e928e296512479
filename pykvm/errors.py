"""Exceptions raised by pykvm.

Every failing ioctl raises :class:`KvmError` (an ``OSError``) whose message
names the ioctl, the errno and, where pykvm knows it, the likely cause.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = ["HINTS", "KvmClosedError", "KvmError", "KvmInheritedError", "KvmUnavailable", "hint_for"]


class KvmError(OSError):
    """An ioctl (or another KVM operation) failed.

    ``.errno`` and ``.strerror`` are those of the failing call, ``.ioctl`` is
    the kernel's name of the request (``"KVM_SET_USER_MEMORY_REGION"``) and
    ``.hint`` a sentence on the likely cause, or ``None``.
    """

    def __init__(self, err: int | None, ioctl: str, hint: str | None = None) -> None:
        super().__init__(err, os.strerror(err) if err else "error")
        self.ioctl = ioctl
        self.hint = hint

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno)) if self.errno is not None else "None"
        msg = f"{self.ioctl} failed: {name} ({self.strerror})"
        if self.hint:
            msg += f": {self.hint}"
        return msg

    def __reduce__(self) -> tuple[type[KvmError], tuple[int | None, str, str | None]]:  # picklable across processes
        return (type(self), (self.errno, self.ioctl, self.hint))


class KvmUnavailable(KvmError):
    """``/dev/kvm`` is missing, not the KVM device, or not openable by this user."""


class KvmClosedError(KvmError, ValueError):
    """The object was closed; no ioctl was issued (its fd number may be reused).

    Also a ``ValueError``, like Python's "I/O operation on closed file".
    """

    def __init__(self, what: str, ioctl: str = "operation") -> None:
        super().__init__(_errno.EBADF, ioctl, f"the {what} is closed")


class KvmInheritedError(KvmClosedError):
    """The object was inherited across ``fork()``: it belongs to the parent process.

    Its ioctls are refused with EIO before any syscall (what KVM answers: a VM
    serves only the process that created it); ``close()`` gives up the child's
    copy of the fd number and nothing else.
    """

    def __init__(self, what: str, ioctl: str = "operation") -> None:
        KvmError.__init__(self, _errno.EIO, ioctl,
                          f"the {what} was inherited across fork(): it belongs to the parent process "
                          f"(create a new VM in the child; close() here only drops the inherited fd)")


_NO_LAPIC = "this vCPU has no in-kernel LAPIC: call vm.create_irq_chip() before creating vCPUs"

#: The one table of likely causes: (ioctl name, errno) -> hint; ``None`` as the
#: name means "any ioctl".  A specific entry wins over the generic one.
HINTS = {
    (None, _errno.ENOTTY): "this kernel or this fd kind does not know the ioctl (check the capability)",
    (None, _errno.EBADF): "the fd is not open (was the object closed?)",
    (None, _errno.EFAULT): "the kernel could not read or write the argument buffer",
    (None, _errno.EPERM): "operation not permitted for this user",
    (None, _errno.EACCES): "permission denied",
    (None, _errno.EMFILE): "this process has no free file descriptor (RLIMIT_NOFILE, 'ulimit -n'); "
                           "close unused VMs (each vCPU holds two fds: its own and its kvm_run mapping's)",
    (None, _errno.ENFILE): "the system-wide file table is full",
    (None, _errno.EIO): "a VM can only be used by the process that created it (after fork(), "
                        "create a new VM in the child)",
    (None, _errno.ENOMEM): "the host is out of memory (or a limit such as RLIMIT_AS or the memory "
                           "cgroup was reached)",
    ("KVM_CREATE_VM", _errno.EINVAL): "VM type not supported by this host (see KVM_CAP_VM_TYPES)",
    ("KVM_CREATE_VM", _errno.ENOMEM): "the host is out of memory",
    ("KVM_CREATE_VCPU", _errno.EEXIST): "a vCPU with this id already exists in the VM",
    ("KVM_CREATE_VCPU", _errno.EINVAL): "vCPU id out of range or too many vCPUs (see KVM_CAP_MAX_VCPU_ID, KVM_CAP_MAX_VCPUS)",
    ("KVM_SET_USER_MEMORY_REGION", _errno.EEXIST): "the region overlaps another slot's guest physical range",
    ("KVM_SET_USER_MEMORY_REGION", _errno.EINVAL): "slot out of range, address or size not page aligned, or bad flags",
    ("KVM_SET_USER_MEMORY_REGION2", _errno.EEXIST): "the region overlaps another slot's guest physical range",
    ("KVM_SET_USER_MEMORY_REGION2", _errno.EINVAL): "slot out of range, address or size not page aligned, or bad flags",
    ("KVM_RUN", _errno.ENOSPC): "the VM has no memory region (or a needed one is missing)",
    ("KVM_RUN", _errno.EFAULT): "guest memory could not be accessed by the host (unmapped region?)",
    ("KVM_RUN", _errno.EINVAL): "the vCPU state is invalid for entry (check sregs/cpuid)",
    ("KVM_RUN", _errno.EBUSY): "the vCPU is in use by another thread",
    ("KVM_SET_SREGS", _errno.EINVAL): "inconsistent control registers / segments",
    ("KVM_CREATE_IRQCHIP", _errno.EEXIST): "the VM already has an irqchip",
    ("KVM_CREATE_IRQCHIP", _errno.EINVAL): "create the irqchip before any vCPU",
    ("KVM_CREATE_PIT2", _errno.EEXIST): "the VM already has a PIT",
    ("KVM_CREATE_PIT2", _errno.ENOENT): "create the in-kernel irqchip before the PIT",
    ("KVM_GET_SUPPORTED_CPUID", _errno.E2BIG): "the buffer holds too few entries",
    ("KVM_GET_MSR_INDEX_LIST", _errno.E2BIG): "the buffer holds too few entries",
    ("KVM_GET_MSRS", _errno.E2BIG): "too many MSRs in one call (KVM takes at most 255)",
    ("KVM_SET_MSRS", _errno.E2BIG): "too many MSRs in one call (KVM takes at most 255)",
    ("KVM_SET_CPUID2", _errno.E2BIG): "more CPUID entries than KVM accepts (KVM_MAX_CPUID_ENTRIES, 256)",
    ("KVM_SET_CPUID", _errno.E2BIG): "more CPUID entries than KVM accepts (KVM_MAX_CPUID_ENTRIES, 256)",
    ("KVM_ENABLE_CAP", _errno.EINVAL): "capability not supported here, or bad arguments, or enabled too late",
    ("KVM_KVMCLOCK_CTRL", _errno.EINVAL): "the guest has not enabled kvmclock",
    ("KVM_IRQFD", _errno.EINVAL): "no in-kernel irqchip, or bad gsi/fd",
    ("KVM_IOEVENTFD", _errno.EEXIST): "an ioeventfd with this address/datamatch exists already",
    ("KVM_IOEVENTFD", _errno.ENOENT): "no ioeventfd with this address/datamatch/length is registered",
    ("KVM_IRQFD", _errno.EBUSY): "this eventfd is already an irqfd of the VM",
    ("KVM_GET_DIRTY_LOG", _errno.ENOENT): "the slot was not created with KVM_MEM_LOG_DIRTY_PAGES",
    ("KVM_GET_DIRTY_LOG", _errno.ENXIO): "the VM uses a dirty ring; harvest the rings instead",
    ("KVM_GET_IRQCHIP", _errno.ENXIO): "the VM has no full in-kernel irqchip (create_irq_chip, not split)",
    ("KVM_SET_IRQCHIP", _errno.ENXIO): "the VM has no full in-kernel irqchip (create_irq_chip, not split)",
    ("KVM_REINJECT_CONTROL", _errno.ENXIO): "the VM has no in-kernel PIT (create_pit2 first)",
    ("KVM_CREATE_DEVICE", _errno.ENODEV): "this host's KVM does not know that device type",
    ("KVM_SET_BOOT_CPU_ID", _errno.EBUSY): "set the boot CPU before creating any vCPU",
    ("KVM_X86_SET_MSR_FILTER", _errno.EINVAL): "bad flags, an empty range, or a range's bitmap too large",
    ("KVM_SET_GSI_ROUTING", _errno.EINVAL): "more entries than KVM_CAP_IRQ_ROUTING, or a bad entry (type, pin, flags)",
    ("KVM_CLEAR_DIRTY_LOG", _errno.EINVAL): "first_page/num_pages not multiples of 64 or outside the slot",
    ("KVM_CLEAR_DIRTY_LOG", _errno.ENOENT): "the slot was not created with KVM_MEM_LOG_DIRTY_PAGES",
    # vCPU ioctls (formerly pykvm.vcpu._VCPU_HINTS, keyed by request number)
    ("KVM_GET_LAPIC", _errno.EINVAL): _NO_LAPIC,
    ("KVM_SET_LAPIC", _errno.EINVAL): _NO_LAPIC,
    ("KVM_SET_VAPIC_ADDR", _errno.EINVAL): _NO_LAPIC,
    ("KVM_SET_MP_STATE", _errno.EINVAL):
        "unknown state, or no in-kernel irqchip (then only KVM_MP_STATE_RUNNABLE is accepted)",
    ("KVM_INTERRUPT", _errno.ENXIO):
        "the VM has an in-kernel irqchip: raise interrupts through it (IRQ lines, MSIs), not KVM_INTERRUPT",
    ("KVM_PRE_FAULT_MEMORY", _errno.EOPNOTSUPP):
        "KVM uses shadow paging here (no EPT/NPT): nothing to pre-fault (KVM_CAP_PRE_FAULT_MEMORY is 0)",
    ("KVM_GET_NESTED_STATE", _errno.EINVAL):
        "no nested virtualization on this host (KVM_CAP_NESTED_STATE is 0), or the buffer is too small",
    ("KVM_SET_NESTED_STATE", _errno.EINVAL):
        "no nested virtualization on this host (KVM_CAP_NESTED_STATE is 0), or an inconsistent state",
    ("KVM_SMI", _errno.ENOTTY): "this KVM has no SMM support (KVM_CAP_X86_SMM is 0)",
    ("KVM_SET_TSC_KHZ", _errno.EINVAL):
        "without TSC scaling (KVM_CAP_TSC_CONTROL) the guest rate cannot be below the host's",
    ("KVM_SET_XCRS", _errno.EINVAL):
        "XCR0 needs bit 0 (x87) and only components the guest's CPUID leaf 0xD allows (set_cpuid2 first)",
    ("KVM_SET_CPUID2", _errno.EINVAL): "bad entries, or the vCPU has run already (its CPUID is then fixed)",
    ("KVM_SET_CPUID", _errno.EINVAL): "bad entries, or the vCPU has run already (its CPUID is then fixed)",
    ("KVM_GET_ONE_REG", _errno.EINVAL):
        "unknown register id (x86: KVM_X86_REG_MSR(index) of an MSR KVM handles, 64-bit size)",
    ("KVM_SET_ONE_REG", _errno.EINVAL):
        "unknown register id or value refused (x86: KVM_X86_REG_MSR(index), 64-bit size)",
    ("KVM_X86_SETUP_MCE", _errno.EINVAL):
        "bank count must be 1..32 and the other bits within Kvm.mce_cap_supported()",
    ("KVM_X86_SET_MCE", _errno.EINVAL):
        "bank beyond setup_mce's count (or no setup_mce yet), or MCi_STATUS.VAL (bit 63) clear",
    ("KVM_SET_SREGS2", _errno.EINVAL):
        "PDPTRS_VALID outside PAE paging, unknown flags, or inconsistent control registers",
    ("KVM_SET_GUEST_DEBUG", _errno.EBUSY): "an exception is already pending: run the vCPU first",
    ("KVM_GET_SUPPORTED_HV_CPUID", _errno.EINVAL):
        "KVM was built without Hyper-V emulation (KVM_CAP_HYPERV_CPUID is 0)",
    ("KVM_XEN_VCPU_GET_ATTR", _errno.EINVAL):
        "no Xen emulation (KVM_CAP_XEN_HVM is 0) or Xen not configured on the VM",
    ("KVM_XEN_VCPU_SET_ATTR", _errno.EINVAL):
        "no Xen emulation (KVM_CAP_XEN_HVM is 0) or Xen not configured on the VM",
    ("KVM_GET_DEVICE_ATTR", _errno.ENXIO):
        "unknown attribute of this fd (x86 vCPU: group 0 KVM_VCPU_TSC_CTRL, attribute 0 KVM_VCPU_TSC_OFFSET)",
    ("KVM_SET_DEVICE_ATTR", _errno.ENXIO):
        "unknown attribute of this fd (x86 vCPU: group 0 KVM_VCPU_TSC_CTRL, attribute 0 KVM_VCPU_TSC_OFFSET)",
    ("KVM_GET_XSAVE", _errno.EINVAL): "the guest's XSAVE state is larger than 4 KiB: use get_xsave2()",
    ("KVM_SET_VCPU_EVENTS", _errno.EINVAL):
        "invalid event state (an exception vector above 31, SMM fields without SMM support ...)",
    ("KVM_MEMORY_ENCRYPT_OP", _errno.ENOTTY):
        "this host's KVM has no memory encryption (the vendor module offers neither SEV nor TDX)",
    ("KVM_MEMORY_ENCRYPT_OP", _errno.EINVAL):
        "the VM is not a confidential VM of this kind (create it with KVM_X86_SEV_VM, "
        "KVM_X86_SNP_VM or KVM_X86_TDX_VM on a host with SEV/TDX), or the command is unknown",
    ("KVM_MEMORY_ENCRYPT_REG_REGION", _errno.ENOTTY):
        "this host's KVM has no memory encryption (no SEV): there is nothing to pin",
    ("KVM_MEMORY_ENCRYPT_UNREG_REGION", _errno.ENOTTY):
        "this host's KVM has no memory encryption (no SEV): there is nothing to unpin",
    ("KVM_MEMORY_ENCRYPT_REG_REGION", _errno.EINVAL):
        "the VM is not an SEV guest, or the range is not page-aligned user memory",
    ("KVM_MEMORY_ENCRYPT_UNREG_REGION", _errno.EINVAL):
        "no region with exactly this address and size is registered",
}
_HINTS = HINTS  # old private name


def hint_for(ioctl: str, err: int | None) -> str | None:
    """The likely cause of *err* from *ioctl*, if pykvm knows one."""
    if err is None:
        return None
    return HINTS.get((ioctl, err)) or HINTS.get((None, err))
