"""Dirty-page tracking: bitmap helpers and the per-vCPU dirty ring.

KVM offers two ways to learn which guest pages were written:

* **the dirty bitmap** of a slot with ``KVM_MEM_LOG_DIRTY_PAGES``:
  ``KVM_GET_DIRTY_LOG`` copies one bit per page of the slot (bit *i* of the
  bitmap is page *i* of the slot, in 64-bit little-endian words) and, unless
  ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` is enabled, clears and re-protects it.
  With manual protection the bits stay until ``KVM_CLEAR_DIRTY_LOG``.
  :func:`bitmap_to_pages` / :func:`pages_to_bitmap` convert between a bitmap
  and page numbers; ``Vm.get_dirty_log`` returns page numbers directly.

* **the dirty ring** (``KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]``, enabled on the VM
  before any vCPU exists): each vCPU has a ring of ``struct kvm_dirty_gfn``
  mapped from its fd at page ``KVM_DIRTY_LOG_PAGE_OFFSET``.  KVM appends
  ``{flags=DIRTY, slot, offset}`` for each page the vCPU dirties.  User space
  harvests entries in ring order, marks each harvested entry ``RESET``, then
  calls ``KVM_RESET_DIRTY_RINGS`` on the VM, which re-protects those pages and
  recycles the entries.  With the ``_ACQ_REL`` flavour the flags word must be
  read with acquire and written with release semantics; x86 is
  total-store-ordered and each access here is a single aligned 4-byte load or
  store, which gives exactly that.  A full ring makes ``KVM_RUN`` return a
  ``KVM_EXIT_DIRTY_RING_FULL`` exit.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from typing import Iterable, List, Optional

from .errors import KvmClosedError, KvmError
from .memory import PAGE_SIZE
from .uapi import structs as S

__all__ = ["bitmap_to_pages", "pages_to_bitmap", "bitmap_words", "DirtyRing"]

_GFN = struct.Struct("<IIQ")  # struct kvm_dirty_gfn: flags, slot, offset
_GFN_SIZE = ctypes.sizeof(S.kvm_dirty_gfn)
_U32 = struct.Struct("<I")
assert _GFN.size == _GFN_SIZE == 16


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


def bitmap_to_pages(bitmap, npages: Optional[int] = None) -> List[int]:
    """Page numbers whose bit is set in *bitmap* (bytes-like or a ctypes array).

    Bit *i* (bit ``i % 8`` of byte ``i // 8``, i.e. little-endian 64-bit words)
    is page *i*.  Bits at or beyond *npages* are ignored when it is given.
    Linear in the bitmap's size: ``translate``/``find`` skip zero bytes at C
    speed, runs of 0xff become ranges (5 ms for a fully dirty 1 GiB slot).
    """
    data = bytes(memoryview(bitmap).cast("B"))
    total = len(data) * 8 if npages is None else min(npages, len(data) * 8)
    data = data[:(total + 7) // 8]
    flags = data.translate(_NONZERO)
    pages: List[int] = []
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
    while pages and pages[-1] >= total:   # bits of the last byte beyond npages
        pages.pop()
    return pages


def pages_to_bitmap(pages: Iterable[int], npages: int) -> "ctypes.Array":
    """A ``c_uint64`` array with the bits of *pages* set (each in ``[0, npages)``)."""
    words = (ctypes.c_uint64 * max(1, bitmap_words(npages)))()
    for p in pages:
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"page numbers must be ints, not {type(p).__name__}")
        if not 0 <= p < npages:
            raise ValueError(f"page {p} outside [0, {npages})")
        words[p // 64] |= 1 << (p % 64)
    return words


class DirtyRing:
    """One vCPU's dirty ring, mapped from the vCPU fd.

    Create with :meth:`Vm.dirty_ring(vcpu) <pykvm.vm.Vm.dirty_ring>` after
    :meth:`Vm.enable_dirty_ring <pykvm.vm.Vm.enable_dirty_ring>`.
    :meth:`harvest` returns the dirty entries (``kvm_dirty_gfn`` copies: ``slot``
    and ``offset`` — the page number within the slot) and marks them for
    reset; then call ``vm.reset_dirty_rings()``.

    The ring is a plain shared mapping: it stays valid after the vCPU object
    is closed (the mapping holds the kernel's vCPU) and is unmapped by
    :meth:`close` or when the VM closes.
    """

    def __init__(self, vcpu, size_bytes: int) -> None:
        if size_bytes <= 0 or size_bytes % _GFN_SIZE or size_bytes & (size_bytes - 1):
            raise ValueError(f"dirty ring size {size_bytes} is not a power of two multiple of {_GFN_SIZE}")
        self.vcpu_id = vcpu.id
        self.size = size_bytes
        self.entries = size_bytes // _GFN_SIZE
        self._mask = self.entries - 1
        self._next = 0  # ring index (free-running) of the next entry to harvest
        self._mm: Optional[mmap.mmap] = None
        fd = vcpu.fileno()  # KvmClosedError when closed, before any syscall
        try:
            self._mm = mmap.mmap(
                fd, size_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                offset=S.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
        except OSError as e:
            raise KvmError(e.errno, "mmap(vcpu fd, KVM_DIRTY_LOG_PAGE_OFFSET)",
                           "the dirty ring is not enabled on this VM, or the size is wrong") from None

    def __repr__(self) -> str:
        state = "closed" if self._mm is None else f"{self.entries} entries, next={self._next}"
        return f"<DirtyRing vcpu={self.vcpu_id} {state}>"

    @property
    def closed(self) -> bool:
        """True once unmapped."""
        return self._mm is None

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            raise KvmClosedError("dirty ring", "harvest")
        return self._mm

    def pending(self) -> int:
        """How many entries are dirty and not yet harvested (reads the flags)."""
        mm = self._map()
        n = 0
        while n < self.entries:
            off = ((self._next + n) & self._mask) * _GFN_SIZE
            if not _U32.unpack_from(mm, off)[0] & S.KVM_DIRTY_GFN_F_DIRTY:
                break
            n += 1
        return n

    def harvest(self, *, reset: bool = True) -> List[S.kvm_dirty_gfn]:
        """Collect the dirty entries in ring order; mark them ``RESET`` if *reset*.

        Stops at the first entry whose flags lack ``KVM_DIRTY_GFN_F_DIRTY``.
        Each returned ``kvm_dirty_gfn`` is a copy: ``slot`` (address space in
        the high 16 bits, slot id in the low 16) and ``offset`` (page number
        within the slot).  With ``reset=False`` the entries stay dirty and the
        next harvest returns them again.  Call ``vm.reset_dirty_rings()``
        afterwards so KVM can reuse the entries.
        """
        mm = self._map()
        out: List[S.kvm_dirty_gfn] = []
        idx = self._next
        for _ in range(self.entries):
            off = (idx & self._mask) * _GFN_SIZE
            flags = _U32.unpack_from(mm, off)[0]       # acquire (x86: plain load)
            if not flags & S.KVM_DIRTY_GFN_F_DIRTY:
                break
            _, slot, offset = _GFN.unpack_from(mm, off)
            out.append(S.kvm_dirty_gfn(flags=flags, slot=slot, offset=offset))
            if reset:
                _U32.pack_into(mm, off, S.KVM_DIRTY_GFN_F_RESET)  # release (x86: plain store)
            idx += 1
        if reset:
            self._next = idx
        return out

    def close(self) -> None:
        """Unmap the ring (idempotent)."""
        mm, self._mm = self._mm, None
        if mm is not None:
            mm.close()

    def __enter__(self) -> "DirtyRing":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
