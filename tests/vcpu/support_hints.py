"""The vCPU hint texts that moved from ``pykvm.vcpu`` into ``pykvm.errors``' one table.

Until the branch that moves them (h-vm) is merged, ``pykvm.errors.hint_for``
does not know them: :func:`require_hint` then skips, saying so.  Once merged,
every text must be there and identical.
"""

from __future__ import annotations

import errno

import pytest

from pykvm.errors import hint_for

#: (ioctl name, errno) -> the hint text, exactly as pykvm.vcpu gave it before the move.
VCPU_HINTS = {
    ("KVM_GET_LAPIC", errno.EINVAL): "this vCPU has no in-kernel LAPIC: call vm.create_irq_chip() before creating vCPUs",
    ("KVM_SET_LAPIC", errno.EINVAL): "this vCPU has no in-kernel LAPIC: call vm.create_irq_chip() before creating vCPUs",
    ("KVM_SET_VAPIC_ADDR", errno.EINVAL): "this vCPU has no in-kernel LAPIC: call vm.create_irq_chip() before creating vCPUs",
    ("KVM_SET_MP_STATE", errno.EINVAL):
        "unknown state, or no in-kernel irqchip (then only KVM_MP_STATE_RUNNABLE is accepted)",
    ("KVM_INTERRUPT", errno.ENXIO):
        "the VM has an in-kernel irqchip: raise interrupts through it (IRQ lines, MSIs), not KVM_INTERRUPT",
    ("KVM_PRE_FAULT_MEMORY", errno.EOPNOTSUPP):
        "KVM uses shadow paging here (no EPT/NPT): nothing to pre-fault (KVM_CAP_PRE_FAULT_MEMORY is 0)",
    ("KVM_GET_NESTED_STATE", errno.EINVAL):
        "no nested virtualization on this host (KVM_CAP_NESTED_STATE is 0), or the buffer is too small",
    ("KVM_SET_NESTED_STATE", errno.EINVAL):
        "no nested virtualization on this host (KVM_CAP_NESTED_STATE is 0), or an inconsistent state",
    ("KVM_SMI", errno.ENOTTY): "this KVM has no SMM support (KVM_CAP_X86_SMM is 0)",
    ("KVM_SET_TSC_KHZ", errno.EINVAL):
        "without TSC scaling (KVM_CAP_TSC_CONTROL) the guest rate cannot be below the host's",
    ("KVM_SET_XCRS", errno.EINVAL):
        "XCR0 needs bit 0 (x87) and only components the guest's CPUID leaf 0xD allows (set_cpuid2 first)",
    ("KVM_SET_CPUID2", errno.EINVAL): "bad entries, or the vCPU has run already (its CPUID is then fixed)",
    ("KVM_SET_CPUID", errno.EINVAL): "bad entries, or the vCPU has run already (its CPUID is then fixed)",
    ("KVM_GET_ONE_REG", errno.EINVAL):
        "unknown register id (x86: KVM_X86_REG_MSR(index) of an MSR KVM handles, 64-bit size)",
    ("KVM_SET_ONE_REG", errno.EINVAL):
        "unknown register id or value refused (x86: KVM_X86_REG_MSR(index), 64-bit size)",
    ("KVM_X86_SETUP_MCE", errno.EINVAL):
        "bank count must be 1..32 and the other bits within Kvm.mce_cap_supported()",
    ("KVM_X86_SET_MCE", errno.EINVAL):
        "bank beyond setup_mce's count (or no setup_mce yet), or MCi_STATUS.VAL (bit 63) clear",
    ("KVM_SET_SREGS2", errno.EINVAL):
        "PDPTRS_VALID outside PAE paging, unknown flags, or inconsistent control registers",
    ("KVM_SET_GUEST_DEBUG", errno.EBUSY): "an exception is already pending: run the vCPU first",
    ("KVM_GET_SUPPORTED_HV_CPUID", errno.EINVAL):
        "KVM was built without Hyper-V emulation (KVM_CAP_HYPERV_CPUID is 0)",
    ("KVM_XEN_VCPU_GET_ATTR", errno.EINVAL):
        "no Xen emulation (KVM_CAP_XEN_HVM is 0) or Xen not configured on the VM",
    ("KVM_XEN_VCPU_SET_ATTR", errno.EINVAL):
        "no Xen emulation (KVM_CAP_XEN_HVM is 0) or Xen not configured on the VM",
    ("KVM_GET_DEVICE_ATTR", errno.ENXIO):
        "unknown attribute of this fd (x86 vCPU: group 0 KVM_VCPU_TSC_CTRL, attribute 0 KVM_VCPU_TSC_OFFSET)",
    ("KVM_SET_DEVICE_ATTR", errno.ENXIO):
        "unknown attribute of this fd (x86 vCPU: group 0 KVM_VCPU_TSC_CTRL, attribute 0 KVM_VCPU_TSC_OFFSET)",
    ("KVM_GET_XSAVE", errno.EINVAL): "the guest's XSAVE state is larger than 4 KiB: use get_xsave2()",
    ("KVM_SET_VCPU_EVENTS", errno.EINVAL):
        "invalid event state (an exception vector above 31, SMM fields without SMM support ...)",
}


def merged() -> bool:
    """True once pykvm.errors carries the vCPU hints (any of them)."""
    return any(hint_for(name, err) == text for (name, err), text in VCPU_HINTS.items())


def check_hint(exc: BaseException) -> None:
    """*exc* (a KvmError) carries the moved vCPU hint for its (ioctl, errno).

    Before the merge of the hints table only the key is checked (the texts are
    then held by ``test_hints.py``, which skips until the merge, saying so).
    """
    key = (exc.ioctl, exc.errno)  # type: ignore[attr-defined]
    assert key in VCPU_HINTS, key
    if merged():
        assert exc.hint == VCPU_HINTS[key]  # type: ignore[attr-defined]
        assert VCPU_HINTS[key] in str(exc)


def skip_unless_merged() -> None:
    if not merged():
        pytest.skip("pykvm.errors does not carry the vCPU hints yet (moved there by branch h-vm)")
