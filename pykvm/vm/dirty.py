"""Dirty-page tracking: bitmap helpers and the per-vCPU dirty ring.

KVM offers two ways to learn which guest pages were written:

* **the dirty bitmap** of a slot with ``KVM_MEM_LOG_DIRTY_PAGES``:
  ``KVM_GET_DIRTY_LOG`` copies one bit per page of the slot (bit *i* of the
  bitmap is page *i* of the slot, in 64-bit little-endian words) and, unless
  ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` is enabled, clears and re-protects it.
  With manual protection the bits stay until ``KVM_CLEAR_DIRTY_LOG``.
  :func:`bitmap_to_pages` / :func:`pages_to_bitmap` convert between a bitmap
  and page numbers; ``Vm.get_dirty_log`` returns a :class:`DirtyPages`, a
  compact sequence of page numbers that keeps the bitmap and decodes it only
  when iterated (``len()`` is a popcount, ``in`` a bit test, :meth:`DirtyPages.ranges`
  gives runs).

* **the dirty ring** (``KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]``, enabled on the VM
  before any vCPU exists): each vCPU has a ring of ``struct kvm_dirty_gfn``
  mapped from its fd at page ``KVM_DIRTY_LOG_PAGE_OFFSET``.  KVM appends
  ``{flags=DIRTY, slot, offset}`` for each page the vCPU dirties.  User space
  harvests entries in ring order, marks each harvested entry ``RESET``, then
  calls ``KVM_RESET_DIRTY_RINGS`` on the VM, which re-protects those pages and
  recycles the entries.  With the ``_ACQ_REL`` flavour the flags word must be
  read with acquire and written with release semantics; x86 is
  total-store-ordered and each access here is a single aligned 4-byte load or
  store, which gives exactly that.  :meth:`DirtyRing.harvest` reads the
  flags of a run of entries first and their ``slot``/``offset`` after, in
  two separate copies, so no entry's data is read before its flags.  A full ring makes ``KVM_RUN`` return a
  ``KVM_EXIT_DIRTY_RING_FULL`` exit.
"""

from __future__ import annotations

import array
import ctypes
import errno
import mmap
from collections.abc import Iterable, Iterator, Sequence
from typing import overload

from .._check import U32 as _U32
from .._check import uint as _uint
from ..errors import KvmClosedError, KvmError
from ..fd import SingleOwner
from ..uapi import ioctls, structs
from ..uapi.enums import Cap
from ..vcpu import Vcpu
from ._state import VmState
from .memory import PAGE_SIZE

__all__ = [
    "DirtyEntries",
    "DirtyLog",
    "DirtyPages",
    "DirtyRing",
    "bitmap_to_pages",
    "bitmap_words",
    "pages_to_bitmap",
]

_GFN_SIZE = ctypes.sizeof(structs.kvm_dirty_gfn)
assert _GFN_SIZE == 16
_F_DIRTY = structs.KVM_DIRTY_GFN_F_DIRTY
_F_RESET = structs.KVM_DIRTY_GFN_F_RESET
#: byte -> 1 if the DIRTY bit (bit 0 of the flags word's low byte) is set, else 0
_DIRTY_BIT = bytes((b & _F_DIRTY) and 1 for b in range(256))


KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1  # the kernel's limit on pages per memslot


def bitmap_words(npages: int) -> int:
    """Number of 64-bit words KVM reads/writes for a slot of *npages* pages."""
    if isinstance(npages, bool) or not isinstance(npages, int):
        raise TypeError(f"npages must be an int, not {type(npages).__name__}")
    if not 0 <= npages <= KVM_MEM_MAX_NR_PAGES:
        raise ValueError(f"npages={npages} out of range [0, {KVM_MEM_MAX_NR_PAGES}]")
    return (npages + 63) // 64


_NONZERO = bytes.maketrans(bytes(range(256)), b"\x00" + b"\x01" * 255)
_BIT_OFFSETS = tuple(tuple(i for i in range(8) if b >> i & 1) for b in range(256))


def _trim(data: bytes, npages: int | None) -> tuple[bytes, int]:
    """*data* cut to the bytes of *npages* bits, bits beyond it cleared; and the bit count."""
    if npages is not None:
        _uint("npages", npages, KVM_MEM_MAX_NR_PAGES)
    total = len(data) * 8 if npages is None else min(npages, len(data) * 8)
    data = data[:(total + 7) // 8]
    if total % 8:
        data = data[:-1] + bytes((data[-1] & ((1 << (total % 8)) - 1),))
    return data, total


def _decode(data: bytes) -> list[int]:
    # Linear in the bitmap's size: translate/find skip zero bytes at C speed,
    # runs of 0xff become ranges.
    flags = data.translate(_NONZERO)
    pages: list[int] = []
    app, ext, offsets = pages.append, pages.extend, _BIT_OFFSETS
    find, count, n = flags.find, data.count, len(data)
    i = find(1)
    while i >= 0:
        j = find(0, i)
        if j < 0:
            j = n
        if j - i > 1 and count(255, i, j) == j - i:
            ext(range(i * 8, j * 8))
        else:
            for k in range(i, j):
                base = k * 8
                for o in offsets[data[k]]:
                    app(base + o)
        i = find(1, j)
    return pages


def bitmap_to_pages(bitmap: object, npages: int | None = None) -> list[int]:
    """Page numbers whose bit is set in *bitmap* (bytes-like or a ctypes array).

    Bit *i* (bit ``i % 8`` of byte ``i // 8``, i.e. little-endian 64-bit words)
    is page *i*.  Bits at or beyond *npages* are ignored when it is given.
    """
    data, _ = _trim(bytes(memoryview(bitmap).cast("B")), npages)  # type: ignore[arg-type]
    return _decode(data)


def pages_to_bitmap(pages: Iterable[int], npages: int) -> ctypes.Array[ctypes.c_uint64]:
    """A ``c_uint64`` array with the bits of *pages* set (each in ``[0, npages)``)."""
    words = (ctypes.c_uint64 * max(1, bitmap_words(npages)))()
    if isinstance(pages, range) and pages.step == 1:  # a whole range: set bytes in bulk
        lo, hi = pages.start, pages.stop
        if lo < hi:
            if lo < 0 or hi > npages:
                raise ValueError(f"pages [{lo}, {hi}) outside [0, {npages})")
            buf = memoryview(words).cast("B")
            for p in range(lo, min(hi, (lo + 7) // 8 * 8)):
                buf[p // 8] |= 1 << (p % 8)
            a, b = (lo + 7) // 8, hi // 8
            if a < b:
                buf[a:b] = b"\xff" * (b - a)
            for p in range(max(lo, b * 8), hi):
                buf[p // 8] |= 1 << (p % 8)
        return words
    for p in pages:
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"page numbers must be ints, not {type(p).__name__}")
        if not 0 <= p < npages:
            raise ValueError(f"page {p} outside [0, {npages})")
        words[p // 64] |= 1 << (p % 64)
    return words


class DirtyPages(Sequence[int]):
    """The dirty pages of one slot: a read-only sequence of slot-relative page numbers.

    Keeps the bitmap (``bitmap``, bytes; bit *i* is page *i*) and decodes it
    only when iterated or indexed (once, then cached).  ``len()`` is a
    popcount, ``p in pages`` one bit test and :meth:`ranges` the dirty runs,
    none of which makes a Python int per page.  Compares equal to a list of
    the same page numbers.
    """

    __slots__ = ("bitmap", "npages", "_count", "_list")

    def __init__(self, bitmap: bytes | bytearray | memoryview, npages: int | None = None) -> None:
        self.bitmap, self.npages = _trim(bytes(bitmap), npages)
        self._count: int | None = None
        self._list: list[int] | None = None

    def __len__(self) -> int:
        if self._count is None:
            self._count = int.from_bytes(self.bitmap, "little").bit_count()
        return self._count

    def tolist(self) -> list[int]:
        """The page numbers as a new list (ascending)."""
        if self._list is None:
            self._list = _decode(self.bitmap)
        return list(self._list)

    def __iter__(self) -> Iterator[int]:
        if self._list is None:
            self._list = _decode(self.bitmap)
        return iter(self._list)

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...
    def __getitem__(self, i: int | slice) -> int | list[int]:
        if self._list is None:
            self._list = _decode(self.bitmap)
        return self._list[i]

    def __contains__(self, page: object) -> bool:
        if isinstance(page, bool) or not isinstance(page, int) or not 0 <= page < self.npages:
            return False
        return bool(self.bitmap[page >> 3] >> (page & 7) & 1)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DirtyPages):
            return self.npages == other.npages and self.bitmap == other.bitmap
        if isinstance(other, (list, tuple, range)):
            return len(self) == len(other) and self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def ranges(self) -> list[tuple[int, int]]:
        """The dirty runs as ``(first, stop)`` page ranges, ascending."""
        out: list[tuple[int, int]] = []
        for p in self:
            if out and out[-1][1] == p:
                out[-1] = (out[-1][0], p + 1)
            else:
                out.append((p, p + 1))
        return out

    def __repr__(self) -> str:
        return f"<DirtyPages {len(self)} of {self.npages} pages>"


class DirtyEntries(Sequence["structs.kvm_dirty_gfn"]):
    """Harvested dirty-ring entries, stored compactly.

    ``slots`` (``array('I')``: address space << 16 | slot id) and ``offsets``
    (``array('Q')``: page number within the slot) hold one value per entry,
    in ring order.  Indexing builds a ``kvm_dirty_gfn`` copy on demand.
    Compares equal to a list of entries with the same ``(slot, offset)`` pairs.
    """

    __slots__ = ("slots", "offsets")

    def __init__(self, slots: array.array[int], offsets: array.array[int]) -> None:
        self.slots, self.offsets = slots, offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def _gfn(self, i: int) -> structs.kvm_dirty_gfn:
        return structs.kvm_dirty_gfn(flags=_F_DIRTY, slot=self.slots[i], offset=self.offsets[i])

    @overload
    def __getitem__(self, i: int) -> structs.kvm_dirty_gfn: ...
    @overload
    def __getitem__(self, i: slice) -> list[structs.kvm_dirty_gfn]: ...
    def __getitem__(self, i: int | slice) -> structs.kvm_dirty_gfn | list[structs.kvm_dirty_gfn]:
        if isinstance(i, slice):
            return [self._gfn(k) for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("dirty entry index out of range")
        return self._gfn(i)

    def __iter__(self) -> Iterator[structs.kvm_dirty_gfn]:
        return (self._gfn(k) for k in range(len(self)))

    def pairs(self) -> list[tuple[int, int]]:
        """``[(slot, offset), ...]`` in ring order."""
        return list(zip(self.slots, self.offsets, strict=False))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DirtyEntries):
            return self.slots == other.slots and self.offsets == other.offsets
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(
                (getattr(g, "slot", None), getattr(g, "offset", None)) == p for g, p in zip(other, self.pairs(), strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<DirtyEntries {len(self)}>"


class DirtyRing(SingleOwner):
    """One vCPU's dirty ring, mapped from the vCPU fd.

    Create with :meth:`Vm.dirty_ring(vcpu) <pykvm.vm.Vm.dirty_ring>` after
    :meth:`Vm.enable_dirty_ring <pykvm.vm.Vm.enable_dirty_ring>`.
    :meth:`harvest` returns the dirty entries (a :class:`DirtyEntries`:
    ``slot`` and ``offset`` — the page number within the slot — per entry)
    and marks them for reset; then call ``vm.reset_dirty_rings()``.

    The ring is a plain shared mapping: it stays valid after the vCPU object
    is closed (the mapping holds the kernel's vCPU) and is unmapped by
    :meth:`close` or when the VM closes.  Cannot be copied or pickled.
    """

    def __init__(self, vcpu: Vcpu, size_bytes: int) -> None:
        if size_bytes <= 0 or size_bytes % _GFN_SIZE or size_bytes & (size_bytes - 1):
            raise ValueError(f"dirty ring size {size_bytes} is not a power of two multiple of {_GFN_SIZE}")
        self.vcpu_id = vcpu.id
        self.size = size_bytes
        self.entries = size_bytes // _GFN_SIZE
        self._mask = self.entries - 1
        self._next = 0  # ring index (free-running) of the next entry to harvest
        self._mm: mmap.mmap | None = None
        fd = vcpu.fileno()  # KvmClosedError when closed, before any syscall
        try:
            mm = mmap.mmap(
                fd, size_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                offset=structs.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
        except OSError as e:
            raise KvmError(e.errno, "mmap(vcpu fd, KVM_DIRTY_LOG_PAGE_OFFSET)",
                           "the dirty ring is not enabled on this VM, or the size is wrong") from None
        self._mm = mm

    def __repr__(self) -> str:
        state = "closed" if self._mm is None else f"{self.entries} entries, next={self._next}"
        return f"<DirtyRing vcpu={self.vcpu_id} {state}>"

    @property
    def closed(self) -> bool:
        """True once unmapped."""
        return self._mm is None

    def _count(self, limit: int) -> int:
        """How many entries from ``_next`` on are DIRTY (at most *limit*): reads flags only."""
        mm = self._mm
        if mm is None:
            raise KvmClosedError("dirty ring", "harvest")
        mask, n, chunk = self._mask, 0, 256
        while n < limit:
            i = (self._next + n) & mask
            k = min(chunk, limit - n, self.entries - i)  # never across the ring's end
            # One contiguous copy; byte 0 of each 16-byte entry is the flags' low byte.
            lows = mm[_GFN_SIZE * i:_GFN_SIZE * (i + k):_GFN_SIZE].translate(_DIRTY_BIT)
            j = lows.find(0)
            if j >= 0:
                return n + j
            n += k
            chunk = min(chunk * 4, 1 << 16)
        return n

    def pending(self) -> int:
        """How many entries are dirty and not yet harvested (reads the flags)."""
        return self._count(self.entries)

    def harvest(self, *, reset: bool = True) -> DirtyEntries:
        """Collect the dirty entries in ring order; mark them ``RESET`` if *reset*.

        Stops at the first entry whose flags lack ``KVM_DIRTY_GFN_F_DIRTY``.
        Each entry has ``slot`` (address space in the high 16 bits, slot id in
        the low 16) and ``offset`` (page number within the slot).  With
        ``reset=False`` the entries stay dirty and the next harvest returns
        them again.  Call ``vm.reset_dirty_rings()`` afterwards so KVM can
        reuse the entries.
        """
        n = self._count(self.entries)   # flags first (acquire: x86 loads are not reordered)
        mm = self._mm
        assert mm is not None
        slots, offsets = array.array("I"), array.array("Q")
        done = 0
        while done < n:
            i = (self._next + done) & self._mask
            k = min(n - done, self.entries - i)
            lo, hi = _GFN_SIZE * i, _GFN_SIZE * (i + k)
            raw = mm[lo:hi]            # read after the flags above: their data is complete
            words = array.array("I", raw)
            slots.extend(words[1::4])
            offsets.frombytes(array.array("Q", raw)[1::2].tobytes())
            if reset:   # release: after every read above (x86 keeps stores after older loads)
                words[0::4] = array.array("I", (_F_RESET,)) * k
                mm[lo:hi] = words.tobytes()   # these entries are ours until KVM_RESET_DIRTY_RINGS
            done += k
        if reset:
            self._next += n
        return DirtyEntries(slots, offsets)

    def close(self) -> None:
        """Unmap the ring (idempotent)."""
        mm, self._mm = self._mm, None
        if mm is not None:
            mm.close()

    def __enter__(self) -> DirtyRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DirtyLog(VmState):
    """The dirty-tracking ioctls of :class:`~pykvm.vm.Vm` (mixed into it)."""

    # -- dirty page tracking ------------------------------------------------------------
    def _slot_pages(self, slot: int) -> int:
        _uint("slot", slot, _U32)
        try:
            return self._slots[slot][1] // PAGE_SIZE
        except KeyError:
            raise ValueError(f"slot {slot} is not a memory slot of this VM") from None

    def get_dirty_log(self, slot: int) -> DirtyPages:
        """``KVM_GET_DIRTY_LOG``: the pages of *slot* written since the last call.

        Returns a :class:`DirtyPages`: page numbers relative to the slot's
        start (page *i* is guest physical ``gpa + i * PAGE_SIZE``), kept as
        the bitmap and decoded on demand.  The slot needs
        ``KVM_MEM_LOG_DIRTY_PAGES``.  Without manual protection KVM clears the
        log and write-protects the pages again; with
        ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` enabled the bits stay until
        :meth:`clear_dirty_log`.  KVM answers ENOENT for a slot without dirty
        logging, ENXIO when the dirty ring is in use instead.
        """
        npages = self._slot_pages(slot)
        # KVM writes ALIGN(npages, 64) / 8 bytes: exactly this buffer's size.
        bitmap = ctypes.create_string_buffer(8 * max(1, bitmap_words(npages)))
        arg = structs.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        self._ioctl(ioctls.KVM_GET_DIRTY_LOG, arg)
        return DirtyPages(bitmap.raw, npages)

    def clear_dirty_log(self, slot: int, first_page: int = 0, num_pages: int | None = None,
                        pages: Iterable[int] | None = None) -> None:
        """``KVM_CLEAR_DIRTY_LOG``: clear dirty bits and write-protect those pages again.

        Made for ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` (where :meth:`get_dirty_log`
        leaves the bits set and the pages writable); KVM accepts it without
        that capability enabled too.  Works on
        ``[first_page, first_page + num_pages)`` of *slot* (default: to the end
        of the slot); clears the pages listed in *pages* (slot-relative page
        numbers inside that range), or all of them when *pages* is ``None``.
        KVM requires *first_page* to be a multiple of 64 and *num_pages* too,
        unless the range ends at the end of the slot.
        """
        npages = self._slot_pages(slot)
        _uint("first_page", first_page, npages)
        if num_pages is None:
            num_pages = npages - first_page
        _uint("num_pages", num_pages, min(npages - first_page, _U32))
        if first_page % 64:
            raise ValueError(f"first_page={first_page} must be a multiple of 64")
        if num_pages % 64 and first_page + num_pages != npages:
            raise ValueError(f"num_pages={num_pages} must be a multiple of 64 unless the range ends the slot")
        if pages is None:
            rel: Iterable[int] = range(num_pages)
        else:
            rel = []
            for p in pages:
                if isinstance(p, bool) or not isinstance(p, int):
                    raise TypeError(f"page numbers must be ints, not {type(p).__name__}")
                if not first_page <= p < first_page + num_pages:
                    raise ValueError(f"page {p} outside [{first_page}, {first_page + num_pages})")
                rel.append(p - first_page)
        bitmap = pages_to_bitmap(rel, max(1, num_pages))
        arg = structs.kvm_clear_dirty_log(slot=slot, num_pages=num_pages, first_page=first_page,
                                    dirty_bitmap=ctypes.addressof(bitmap))
        self._ioctl(ioctls.KVM_CLEAR_DIRTY_LOG, arg)

    def enable_dirty_ring(self, size_bytes: int, *, acq_rel: bool | None = None) -> int:
        """Turn on the per-vCPU dirty ring (``KVM_ENABLE_CAP`` of ``KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]``).

        Must come before any vCPU exists.  *size_bytes* is each ring's size:
        a power of two, at least one page, at most what the capability reports
        (16 bytes per ``kvm_dirty_gfn``).  *acq_rel* picks
        ``KVM_CAP_DIRTY_LOG_RING_ACQ_REL`` (True), the plain ring (False), or
        the former when the host has it (None).  Returns the capability used.
        After this, slots with ``KVM_MEM_LOG_DIRTY_PAGES`` report to the rings
        (map them with :meth:`dirty_ring`) and ``KVM_GET_DIRTY_LOG`` fails.
        """
        _uint("size_bytes", size_bytes, _U32)
        if size_bytes < PAGE_SIZE or size_bytes & (size_bytes - 1):
            raise ValueError(f"dirty ring size {size_bytes} must be a power of two >= {PAGE_SIZE}")
        if acq_rel is None:
            acq_rel = bool(self.check_extension(Cap.DIRTY_LOG_RING_ACQ_REL))
        cap = Cap.DIRTY_LOG_RING_ACQ_REL if acq_rel else Cap.DIRTY_LOG_RING
        if self._vcpus:
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", "enable the dirty ring before creating vCPUs")
        self.enable_cap(cap, size_bytes)
        self._dirty_ring_size = size_bytes
        return int(cap)

    def dirty_ring(self, vcpu: Vcpu) -> DirtyRing:
        """The dirty ring of *vcpu* (mapped on first use, unmapped when the VM closes)."""
        if not isinstance(vcpu, Vcpu) or self._vcpus.get(vcpu.id) is not vcpu:
            raise ValueError(f"{vcpu!r} is not a vCPU of this VM")
        if not self._dirty_ring_size:
            raise KvmError(errno.EINVAL, "mmap(vcpu fd, KVM_DIRTY_LOG_PAGE_OFFSET)",
                           "call vm.enable_dirty_ring(size) before creating vCPUs")
        ring = self._dirty_rings.get(vcpu.id)
        if ring is None or ring.closed:
            ring = DirtyRing(vcpu, self._dirty_ring_size)
            self._dirty_rings[vcpu.id] = ring
        return ring

    def reset_dirty_rings(self) -> int:
        """``KVM_RESET_DIRTY_RINGS``: recycle the ring entries marked ``RESET``.

        KVM write-protects those pages again (so the next write is logged
        again) and returns how many entries it reset.
        """
        return self._ioctl(ioctls.KVM_RESET_DIRTY_RINGS)

