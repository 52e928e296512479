"""ctypes twins of the x86-64 KVM uapi structures, plus the hand-written helpers.

The structures themselves are generated (``tools/gen_uapi.py``) from the
kernel's headers into :mod:`pykvm.uapi.x86` (``arch/x86/include/uapi/asm/kvm.h``)
and :mod:`pykvm.uapi.kvm` (``include/uapi/linux/kvm.h``); the constants into
:mod:`pykvm.uapi.consts`.  This module re-exports them all under the names
the rest of pykvm has always used, and adds what a generator cannot know:

* :func:`flex`: a structure ending in a flexible array (``kvm_cpuid2``,
  ``kvm_msrs``, ``kvm_irq_routing`` ...) with room for *n* entries, its count
  field set;
* the kernel's function-like macros that pykvm needs (``KVM_X86_REG_ID`` ...);
* a few names kept for older callers (``kvm_ioapic_redirtbl``, the correctly
  spelled ``KVM_CPUID_FLAG_SIGNIFICANT_INDEX``).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Any, TypeVar

from . import consts as _consts
from . import kvm as _kvm
from . import x86 as _x86
from .consts import *  # noqa: F403
from .kvm import *  # noqa: F403
from .x86 import *  # noqa: F403

# kvm_nested_state.data is a union of two flexible arrays (vmx, svm); flex()
# gives it as raw bytes, whose first 8 KiB are vmcs12/vmcb12 + shadow_vmcs12.
_x86.kvm_nested_state._flex_ = ("data", ctypes.c_uint8)  # type: ignore[attr-defined]

# Names kept for older callers.
kvm_ioapic_redirtbl = _x86._kvm_ioapic_state_redirtbl
KVM_CPUID_FLAG_SIGNIFICANT_INDEX = _consts.KVM_CPUID_FLAG_SIGNIFCANT_INDEX  # kernel: sic
KVM_MSR_EXIT_REASON_INVAL_FLAG = _consts.KVM_MSR_EXIT_REASON_INVAL


def KVM_X86_REG_ID(type_: int, index: int) -> int:
    """The kernel macro: an x86 ONE_REG id (every x86 register there is 64-bit)."""
    return _consts.KVM_REG_X86 | (type_ << 32) | _consts.KVM_REG_SIZE_U64 | index


def KVM_X86_REG_MSR(index: int) -> int:
    """ONE_REG id of MSR *index* (kernel 6.18+)."""
    return KVM_X86_REG_ID(_consts.KVM_X86_REG_TYPE_MSR, index)


def KVM_X86_REG_KVM(index: int) -> int:
    """ONE_REG id of KVM-defined register *index* (``KVM_REG_GUEST_SSP``)."""
    return KVM_X86_REG_ID(_consts.KVM_X86_REG_TYPE_KVM, index)


def offsetof(struct: type[ctypes.Structure] | type[ctypes.Union], member: str) -> int:
    """C's ``offsetof``: the byte offset of *member* (also one an anonymous member promotes).

    ``kvm_run.if_flag.offset`` says the same at run time, but the class
    annotations tell type checkers that ``if_flag`` is an ``int``.
    """
    field = getattr(struct, member)
    offset: int = field.offset
    return offset


def KVM_PMU_ENCODE_MASKED_ENTRY(event_select: int, mask: int, match: int, exclude: int) -> int:
    """The kernel macro: one masked PMU event filter entry (``KVM_PMU_EVENT_FLAG_MASKED_EVENTS``)."""
    return ((event_select & 0xFF) | ((event_select & 0xF00) << 24)
            | ((mask & 0xFF) << 56) | ((match & 0xFF) << 8)
            | ((1 if exclude else 0) << 55))


# ---------------------------------------------------------------------------
# Flexible arrays
# ---------------------------------------------------------------------------

T = TypeVar("T", bound=ctypes.Structure)

#: The member the kernel reads as the entry count, per flexible-array struct.
_COUNT_FIELD: dict[str, str] = {
    "kvm_cpuid2": "nent",
    "kvm_cpuid": "nent",
    "kvm_msrs": "nmsrs",
    "kvm_msr_list": "nmsrs",
    "kvm_irq_routing": "nr",
    "kvm_pmu_event_filter": "nevents",
    "kvm_reg_list": "n",
    "kvm_signal_mask": "len",
}


@lru_cache(maxsize=256)
def _flex_type(base: type, n: int) -> type:
    flex_member: tuple[str, Any] = base._flex_  # type: ignore[attr-defined]
    name, etype = flex_member
    # A subclass appends its fields after the base's: header, then entries,
    # exactly like the C layout; isinstance(obj, base) stays true.
    # The kernel wraps most flexible arrays in an unnamed struct
    # (__DECLARE_FLEX_ARRAY); the subclass must not re-expose that member's
    # zero-length array over its own, hence the empty _anonymous_.
    return type(f"{base.__name__}[{n}]", (base,),
                {"_fields_": [(name, etype * n)], "_anonymous_": ()})


def flex(base: type[T], n: int) -> T:
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
    obj: T = _flex_type(base, n)()
    count_field = _COUNT_FIELD.get(base.__name__)
    if count_field:
        setattr(obj, count_field, n)
    return obj


__all__ = sorted(set(_consts.__all__) | set(_kvm.__all__) | set(_x86.__all__) | {
    "flex", "kvm_ioapic_redirtbl", "KVM_CPUID_FLAG_SIGNIFICANT_INDEX",
    "KVM_MSR_EXIT_REASON_INVAL_FLAG", "KVM_X86_REG_ID", "KVM_X86_REG_MSR", "KVM_X86_REG_KVM",
    "KVM_PMU_ENCODE_MASKED_ENTRY", "offsetof"})
