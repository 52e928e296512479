"""CPUID set-up and VM-wide x86 preparation.

A fresh vCPU has an empty CPUID table: the guest's ``cpuid`` returns zeros,
and KVM itself consults that table (for instance, 1 GiB pages are reserved
bits, and ``wrmsr EFER.LME`` faults, unless the table says the CPU has them).
:func:`setup_cpuid` gives a vCPU what the host supports
(``KVM_GET_SUPPORTED_CPUID``), with the per-vCPU APIC ids filled in and any
features you remove or add.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import KvmError
from ..uapi.structs import kvm_cpuid_entry2
from .consts import find_leaf

if TYPE_CHECKING:
    from .consts import Feature

__all__ = ["IDENTITY_MAP_ADDRESS", "TSS_ADDRESS", "cpuid_has", "prepare_vm", "setup_cpuid"]

#: Where :func:`prepare_vm` puts the three pages KVM needs for real mode on Intel without
#: "unrestricted guest", and the EPT identity-map page just below them (both must not
#: overlap guest RAM or MMIO).
TSS_ADDRESS = 0xFFFBD000
IDENTITY_MAP_ADDRESS = 0xFFFBC000


def setup_cpuid(kvm: Any, vcpu: Any, *, apic_id: int | None = None,
                disable: Iterable[Feature] = (), enable: Iterable[Feature] = (),
                entries: Sequence[kvm_cpuid_entry2] | None = None
                ) -> list[kvm_cpuid_entry2]:
    """Give *vcpu* the CPUID the host supports and return the table set.

    * *apic_id* (default ``vcpu.id``) goes into ``CPUID.1:EBX[31:24]``, the
      x2APIC id of leaves 0xB / 0x1F and AMD's extended APIC id
      (``0x8000001E:EAX``), so each vCPU reads its own;
    * *disable* / *enable* are :class:`~pykvm.x86.consts.Feature` bits to
      clear or set (setting one KVM cannot provide is the caller's risk);
    * *entries* replaces ``kvm.supported_cpuid()`` as the starting table
      (fetch it once when setting up many vCPUs).
    """
    table: list[kvm_cpuid_entry2] = [kvm_cpuid_entry2.from_buffer_copy(e) for e in
             (entries if entries is not None else kvm.supported_cpuid())]
    aid = vcpu.id if apic_id is None else apic_id
    for e in table:
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | (aid & 0xFF) << 24
        elif e.function in (0xB, 0x1F):
            e.edx = aid
        elif e.function == 0x8000001E:
            # AMD's extended APIC id.  KVM_GET_SUPPORTED_CPUID reports this leaf with
            # zeros (KVM does not pass host topology), QEMU fills EAX with the vCPU's
            # APIC id, and Linux reads it as the initial APIC id when TOPOEXT is set:
            # left at zero, every vCPU would claim APIC id 0.
            e.eax = aid
    for feat, on in [(f, False) for f in disable] + [(f, True) for f in enable]:
        leaf = find_leaf(table, feat.leaf, feat.subleaf)
        if leaf is None:
            if not on:
                continue
            raise ValueError(f"{feat!r}: leaf {feat.leaf:#x} is not in the CPUID table")
        v = getattr(leaf, feat.reg)
        setattr(leaf, feat.reg, (v | 1 << feat.bit) if on else (v & ~(1 << feat.bit)))
    vcpu.set_cpuid2(table)
    return table


def cpuid_has(entries: Iterable[kvm_cpuid_entry2], feature: Feature) -> bool:
    """True if *feature* is set in a CPUID entry list (e.g. ``kvm.supported_cpuid()``)."""
    return bool(feature.in_entries(entries))


def prepare_vm(vm: Any, *, tss_address: int = TSS_ADDRESS,
               identity_map_address: int | None = IDENTITY_MAP_ADDRESS) -> None:
    """The VM-wide x86 set-up KVM expects before the first vCPU runs.

    Sets the TSS address (``KVM_SET_TSS_ADDR``: three pages Intel hosts
    without unrestricted guest use to run real mode) and the identity map
    address; harmless where unused (AMD, PVM).  Call before creating vCPUs.
    """
    vm.set_tss_address(tss_address)
    if identity_map_address is not None:
        try:
            vm.set_identity_map_address(identity_map_address)
        except KvmError:
            pass  # not supported by this host (older kernels, some vendors): not fatal

