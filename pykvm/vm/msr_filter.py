"""x86 guest policies: the MSR filter (``MsrFilterRange``) and the PMU event filter.

``KVM_X86_SET_MSR_FILTER`` takes up to 16 ranges, each pointing to a bitmap
in user memory.  KVM copies ``BITS_TO_LONGS(nmsrs) * sizeof(long)`` bytes of
each bitmap, i.e. ``nmsrs`` rounded up to a multiple of 64 bits, so pykvm
always hands it a zero-padded private copy of that size: a shorter buffer
would let KVM read host heap bytes into the filter, where a guest could probe
them bit by bit through allowed and refused MSR accesses.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
from collections.abc import Iterable, Sequence

from .._check import U32 as _U32
from .._check import expect as _expect
from .._check import flex_fits as _flex_fits
from .._check import uint as _uint
from ..errors import KvmError
from ..uapi import ioctls, structs
from ._state import VmState

__all__ = ["MsrFilterRange", "X86Policies", "msr_filter_bitmap_size"]


#: ``KVM_PMU_EVENT_FILTER_MAX_EVENTS`` (arch/x86/kvm/pmu.h): more events and KVM answers E2BIG.
KVM_PMU_EVENT_FILTER_MAX_EVENTS = 300


def msr_filter_bitmap_size(nmsrs: int) -> int:
    """Bytes KVM copies from a range's bitmap for *nmsrs* MSRs (whole 64-bit words)."""
    return (nmsrs + 63) // 64 * 8


class X86Policies(VmState):
    """The MSR and PMU filter ioctls of :class:`~pykvm.vm.Vm` (mixed into it)."""

    # -- x86 policies ------------------------------------------------------------------------
    def set_msr_filter(self, ranges: Sequence[MsrFilterRange] = (), *, default_deny: bool = False) -> None:
        """``KVM_X86_SET_MSR_FILTER``: which guest MSR accesses KVM handles and which it refuses.

        Each :class:`MsrFilterRange` covers ``nmsrs`` MSRs from ``base`` for
        reads and/or writes (``flags``); bit *i* of its bitmap set allows MSR
        ``base + i``, clear denies it.  MSRs outside every range follow
        *default_deny*.  A denied access injects #GP, or, with
        ``KVM_CAP_X86_USER_SPACE_MSR`` enabled with ``KVM_MSR_EXIT_REASON_FILTER``,
        exits to user space (``X86Rdmsr``/``X86Wrmsr`` with ``msr_reason`` 4).
        No ranges and ``default_deny=False`` removes the filter.  At most 16 ranges.
        """
        ranges = list(ranges)
        if len(ranges) > structs.KVM_MSR_FILTER_MAX_RANGES:
            raise ValueError(f"at most {structs.KVM_MSR_FILTER_MAX_RANGES} MSR filter ranges, got {len(ranges)}")
        f = structs.kvm_msr_filter(flags=structs.KVM_MSR_FILTER_DEFAULT_DENY if default_deny else 0)
        keep = []
        for i, r in enumerate(ranges):
            _expect(r, MsrFilterRange)
            # KVM copies whole longs of bitmap: hand it exactly that many bytes,
            # zero-padded, never a shorter buffer (host heap bytes would follow).
            size = msr_filter_bitmap_size(r.nmsrs)
            buf = ctypes.create_string_buffer(r.bitmap[:size], max(size, 1))
            keep.append(buf)
            f.ranges[i].flags = r.flags
            f.ranges[i].nmsrs = r.nmsrs
            f.ranges[i].base = r.base
            f.ranges[i].bitmap = ctypes.addressof(buf)
        self._ioctl(ioctls.KVM_X86_SET_MSR_FILTER, f)
        del keep

    def set_pmu_event_filter(self, events: Iterable[int], *, action: int = structs.KVM_PMU_EVENT_ALLOW,
                             fixed_counter_bitmap: int = 0, flags: int = 0) -> None:
        """``KVM_SET_PMU_EVENT_FILTER``: which PMU events the guest may count.

        *action* ``KVM_PMU_EVENT_ALLOW`` allows only *events* (event select |
        unit mask << 8, as in ``PERFEVTSEL``), ``KVM_PMU_EVENT_DENY`` forbids
        them; a filtered counter simply does not count.  *fixed_counter_bitmap*
        does the same for fixed counters, *flags* ``KVM_PMU_EVENT_FLAG_MASKED_EVENTS``
        switches to masked-event entries.  Needs ``KVM_CAP_PMU_EVENT_FILTER``;
        it has a visible effect only when the host exposes a vPMU.
        """
        evs = list(itertools.islice(events, KVM_PMU_EVENT_FILTER_MAX_EVENTS + 1))
        if len(evs) > KVM_PMU_EVENT_FILTER_MAX_EVENTS:  # what KVM would answer, before allocating
            raise KvmError(errno.E2BIG, "KVM_SET_PMU_EVENT_FILTER",
                           f"at most {KVM_PMU_EVENT_FILTER_MAX_EVENTS} events (KVM_PMU_EVENT_FILTER_MAX_EVENTS)")
        buf = structs.flex(structs.kvm_pmu_event_filter, len(evs))
        buf.action = _uint("action", action, _U32)
        buf.fixed_counter_bitmap = _uint("fixed_counter_bitmap", fixed_counter_bitmap, _U32)
        buf.flags = _uint("flags", flags, _U32)
        for i, e in enumerate(evs):
            buf.events[i] = _uint(f"events[{i}]", e)
        _flex_fits(buf, "nevents", "events")
        self._ioctl(ioctls.KVM_SET_PMU_EVENT_FILTER, buf)



class MsrFilterRange:
    """One range of ``KVM_X86_SET_MSR_FILTER`` (``struct kvm_msr_filter_range``).

    ``flags`` is ``KVM_MSR_FILTER_READ`` and/or ``KVM_MSR_FILTER_WRITE``;
    the range covers MSRs ``base .. base + nmsrs - 1``; bit *i* of ``bitmap``
    (``bytes``, little-endian bit order) set allows MSR ``base + i``.  Build
    one with :meth:`deny` or :meth:`allow` for a list of MSRs.
    """
    # A plain frozen class, not a dataclass: importing dataclasses (and inspect
    # with it) is 5-6 ms of `import pykvm` (benchmarks/, -X importtime).
    __slots__ = ("flags", "base", "bitmap", "nmsrs")
    flags: int
    base: int
    bitmap: bytes
    nmsrs: int

    def __init__(self, flags: int, base: int, bitmap: bytes, nmsrs: int = -1) -> None:
        if not isinstance(bitmap, (bytes, bytearray)):
            raise TypeError(f"bitmap must be bytes, not {type(bitmap).__name__}")
        bitmap = bytes(bitmap)
        if nmsrs == -1:
            nmsrs = 8 * len(bitmap)
        if not flags or flags & ~structs.KVM_MSR_FILTER_RANGE_VALID_MASK:
            raise ValueError(f"flags={flags!r}: expected KVM_MSR_FILTER_READ and/or KVM_MSR_FILTER_WRITE")
        _uint("base", base, _U32)
        _uint("nmsrs", nmsrs, 8 * structs.KVM_MSR_FILTER_MAX_BITMAP_SIZE)
        if nmsrs == 0 or (nmsrs + 7) // 8 > len(bitmap):
            raise ValueError(f"nmsrs={nmsrs} needs a bitmap of {(nmsrs + 7) // 8} bytes "
                             f"(got {len(bitmap)}) and must be > 0")
        for k, v in (("flags", flags), ("base", base), ("bitmap", bitmap), ("nmsrs", nmsrs)):
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"MsrFilterRange is frozen: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"MsrFilterRange is frozen: cannot delete {name!r}")

    def _key(self) -> tuple[int, int, bytes, int]:
        return (self.flags, self.base, self.bitmap, self.nmsrs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MsrFilterRange) and type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"MsrFilterRange(flags={self.flags!r}, base={self.base!r}, bitmap={self.bitmap!r}, "
                f"nmsrs={self.nmsrs!r})")

    @classmethod
    def _of(cls, msrs: Iterable[int], flags: int, allowed: bool) -> MsrFilterRange:
        idx = sorted({_uint("msr", m, _U32) for m in msrs})
        if not idx:
            raise ValueError("no MSRs given")
        base, n = idx[0], idx[-1] - idx[0] + 1
        listed = {m - base for m in idx}
        bits = bytearray((n + 7) // 8)
        for i in range(n):
            if (i in listed) == allowed:     # bit set = access allowed
                bits[i // 8] |= 1 << (i % 8)
        return cls(flags, base, bytes(bits), n)

    @classmethod
    def deny(cls, msrs: Iterable[int], flags: int = structs.KVM_MSR_FILTER_READ | structs.KVM_MSR_FILTER_WRITE
             ) -> MsrFilterRange:
        """A range from min(msrs) to max(msrs) that denies *msrs* and allows the rest of it."""
        return cls._of(msrs, flags, False)

    @classmethod
    def allow(cls, msrs: Iterable[int], flags: int = structs.KVM_MSR_FILTER_READ | structs.KVM_MSR_FILTER_WRITE
              ) -> MsrFilterRange:
        """A range from min(msrs) to max(msrs) that allows *msrs* and denies the rest of it."""
        return cls._of(msrs, flags, True)
