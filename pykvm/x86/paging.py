"""Page tables built in guest memory, and a software page walker.

* :class:`Arena` hands out zeroed, aligned pieces of a guest-physical range
  you reserve for tables (GDT, IDT, TSS, page tables, stacks ...).
* :class:`PageTables` builds 4-level long-mode tables (4 KiB, 2 MiB and 1 GiB
  pages); :class:`PageTables32` builds 32-bit two-level tables (4 KiB pages,
  or 4 MiB pages with ``CR4.PSE``).  Both map any range to any range with
  chosen user/supervisor, writable and no-execute bits, and ``identity()``
  maps a range onto itself.
* :func:`translate` (and :func:`walk`, which adds the leaf flags) walks the
  tables of every paging mode the way the CPU does — 32-bit (4 KiB / 4 MiB
  pages), PAE, 4-level and 5-level long mode — reading guest memory from the
  host.  It is the project's one page walker: the run loop's report shows the
  bytes at RIP with it, the GDB stub reads and writes guest virtual memory
  with it.

Intermediate entries are always present, writable and user-accessible, so
the leaf entry alone decides the permissions of a page.

1 GiB pages need ``CPUID.80000001h:EDX.PDPE1GB`` in the vCPU's CPUID
(:func:`pykvm.x86.cpu.setup_cpuid`); without it the CPU treats the PS bit of
a PDPTE as reserved and faults.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .consts import CR0, CR4, EFER, PAGE_1G, PAGE_2M, PAGE_4K, PAGE_4M, PTE

__all__ = [
    "Arena",
    "GuestPhys",
    "PageTables",
    "PageTables32",
    "as_phys",
    "iter_mappings",
    "translate",
    "walk",
]

_ADDR_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12 of an entry
_RW_US = 0x6
_q = struct.Struct("<Q")
_l = struct.Struct("<I")


class GuestPhys(Protocol):
    """What the table builders write through: a ``Vm`` (``read(gpa, n)``/``write(gpa, data)``)."""

    def read(self, gpa: int, n: int) -> bytes: ...

    def write(self, gpa: int, data: Any) -> None: ...


#: Reads *n* bytes of guest physical memory at *gpa* (``Vm.read``).
ReadPhys = Callable[[int, int], bytes]


class _RegionAsPhys:
    """Adapter: a GuestMemory addressed by guest physical address."""

    def __init__(self, mem: Any) -> None:
        self.mem = mem
        self.base: int = mem.guest_phys_addr

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.mem.read(gpa - self.base, n))

    def write(self, gpa: int, data: Any) -> None:
        self.mem.write(gpa - self.base, data)


def as_phys(target: Any) -> GuestPhys:
    """Accept a ``Vm`` or a ``GuestMemory``; return something addressed by guest physical address."""
    if hasattr(target, "guest_phys_addr"):
        return _RegionAsPhys(target)
    phys: GuestPhys = target
    return phys


class Arena:
    """A bump allocator over ``[gpa, gpa + size)`` of guest RAM.

    *target* is the ``Vm`` (or the ``GuestMemory`` holding the range).
    Every allocation is zeroed in guest memory.  Nothing is ever freed: an
    arena holds the tables of one VM set-up.
    """

    def __init__(self, target: Any, gpa: int, size: int) -> None:
        self.phys = as_phys(target)
        self.start = gpa
        self.end = gpa + size
        self.next = gpa

    def alloc(self, size: int, align: int = PAGE_4K) -> int:
        """Reserve *size* zeroed bytes aligned to *align*; return their guest physical address."""
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError(f"arena [{self.start:#x}, {self.end:#x}) is full: cannot place {size:#x} bytes")
        self.next = addr + size
        self.phys.write(addr, bytes(size))
        return addr

    def put(self, data: Any, align: int = 16) -> int:
        """Allocate room for *data*, copy it in, and return its guest physical address."""
        data = bytes(data)
        addr = self.alloc(len(data), align)
        self.phys.write(addr, data)
        return addr

    @property
    def used(self) -> int:
        return self.next - self.start

    def __repr__(self) -> str:
        return f"<Arena [{self.start:#x}, {self.end:#x}) used={self.used:#x}>"


def _check_aligned(what: str, value: int, align: int) -> None:
    if value % align:
        raise ValueError(f"{what} {value:#x} is not aligned to the page size {align:#x}")


class PageTables:
    """4-level (long mode / IA-32e) page tables in guest memory.

    ``cr3`` is the physical address of the PML4 to load into CR3.  Mapping
    a range that is already mapped replaces the leaf entries.
    """

    LEVEL_SHIFTS = (39, 30, 21, 12)  # PML4, PDPT, PD, PT
    _LEAF_LEVEL = {PAGE_1G: 1, PAGE_2M: 2, PAGE_4K: 3}

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.phys = arena.phys
        self.cr3 = arena.alloc(PAGE_4K)

    def _entry(self, table: int, index: int) -> int:
        return int(_q.unpack(self.phys.read(table + 8 * index, 8))[0])

    def _set(self, table: int, index: int, value: int) -> None:
        self.phys.write(table + 8 * index, _q.pack(value))

    def map(self, virt: int, phys: int, size: int, *, page_size: int = PAGE_2M,
            writable: bool = True, user: bool = False, nx: bool = False,
            global_: bool = False) -> None:
        """Map ``[virt, virt+size)`` to ``[phys, phys+size)`` with pages of *page_size*.

        *virt*, *phys* and *size* must be multiples of *page_size*
        (4 KiB, 2 MiB or 1 GiB).  ``user=True`` sets the U/S bit (CPL3 may
        access), ``nx=True`` the no-execute bit (needs ``EFER.NXE``).
        Mapping smaller pages inside an existing larger page splits that page,
        keeping the rest of its mapping.
        """
        if page_size not in self._LEAF_LEVEL:
            raise ValueError("page_size must be 4 KiB, 2 MiB or 1 GiB")
        for what, v in (("virt", virt), ("phys", phys), ("size", size)):
            _check_aligned(what, v, page_size)
        if virt + size > 1 << 47 and virt < 0xFFFF_8000_0000_0000:
            raise ValueError(f"{virt:#x}+{size:#x} is not canonical (48-bit)")
        leaf_level = self._LEAF_LEVEL[page_size]
        flags = PTE.P | (PTE.RW if writable else 0) | (PTE.US if user else 0) \
            | (PTE.NX if nx else 0) | (PTE.G if global_ else 0) | (PTE.PS if leaf_level < 3 else 0)
        inter = PTE.P | PTE.RW | PTE.US
        # Cache of the table at each level for the current walk (speeds big identity maps).
        cache: dict[tuple[int, int], int] = {}
        for off in range(0, size, page_size):
            va = (virt + off) & ((1 << 48) - 1)
            table = self.cr3
            for level in range(leaf_level):
                index = va >> self.LEVEL_SHIFTS[level] & 511
                key = (level, va >> self.LEVEL_SHIFTS[level])
                nxt = cache.get(key)
                if nxt is None:
                    e = self._entry(table, index)
                    if e & PTE.P and not (e & PTE.PS):
                        nxt = e & _ADDR_MASK
                    else:
                        nxt = self.arena.alloc(PAGE_4K)
                        if e & PTE.P and level > 0:  # a larger page: split it, keep its mapping
                            self._split(nxt, e, level)
                        self._set(table, index, nxt | int(inter))
                    cache[key] = nxt
                table = nxt
            index = va >> self.LEVEL_SHIFTS[leaf_level] & 511
            self._set(table, index, (phys + off) | int(flags))

    def _split(self, table: int, entry: int, level: int) -> None:
        """Fill *table* with 512 entries that map what the large *entry* at *level* mapped."""
        child = 1 << self.LEVEL_SHIFTS[level + 1]
        base = entry & _ADDR_MASK
        flags = entry & ~_ADDR_MASK
        if level + 1 == 3:  # 4 KiB entries have no PS bit
            flags &= ~int(PTE.PS)
        raw = b"".join(_q.pack((base + k * child) | flags) for k in range(512))
        self.phys.write(table, raw)

    def identity(self, start: int, end: int, **kw: Any) -> PageTables:
        """Map ``[start, end)`` onto itself (keywords as for :meth:`map`); returns self."""
        self.map(start, start, end - start, **kw)
        return self

    def translate(self, virt: int) -> tuple[int, int] | None:
        """``(physical address, leaf flags)`` for *virt*, or None if not mapped."""
        return _walk4(self.phys.read, self.cr3, virt)


class PageTables32:
    """Two-level 32-bit page tables (no PAE): 4 KiB pages, or 4 MiB pages with ``CR4.PSE``."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.phys = arena.phys
        self.cr3 = arena.alloc(PAGE_4K)

    def _entry(self, table: int, index: int) -> int:
        return int(_l.unpack(self.phys.read(table + 4 * index, 4))[0])

    def _set(self, table: int, index: int, value: int) -> None:
        self.phys.write(table + 4 * index, _l.pack(value))

    def map(self, virt: int, phys: int, size: int, *, page_size: int = PAGE_4M,
            writable: bool = True, user: bool = False) -> None:
        """Map ``[virt, virt+size)`` to physical ``[phys, ...)`` below 4 GiB."""
        if page_size not in (PAGE_4K, PAGE_4M):
            raise ValueError("page_size must be 4 KiB or 4 MiB")
        for what, v in (("virt", virt), ("phys", phys), ("size", size)):
            _check_aligned(what, v, page_size)
        if virt + size > 1 << 32 or phys + size > 1 << 32:
            raise ValueError("32-bit paging maps only the low 4 GiB")
        flags = PTE.P | (PTE.RW if writable else 0) | (PTE.US if user else 0)
        for off in range(0, size, page_size):
            va = virt + off
            pdi = va >> 22
            if page_size == PAGE_4M:
                self._set(self.cr3, pdi, (phys + off) | int(flags | PTE.PS))
                continue
            pde = self._entry(self.cr3, pdi)
            if pde & PTE.P and not pde & PTE.PS:
                pt = pde & 0xFFFFF000
            else:
                pt = self.arena.alloc(PAGE_4K)
                self._set(self.cr3, pdi, pt | int(PTE.P | PTE.RW | PTE.US))
            self._set(pt, va >> 12 & 1023, (phys + off) | int(flags))

    def identity(self, start: int, end: int, **kw: Any) -> PageTables32:
        """Map ``[start, end)`` onto itself; returns self."""
        self.map(start, start, end - start, **kw)
        return self

    def translate(self, virt: int) -> tuple[int, int] | None:
        """``(physical address, leaf flags)`` for *virt*, or None if not mapped."""
        return _walk2(self.phys.read, self.cr3, virt, pse=True)


# ---------------------------------------------------------------------------
# The walker: the one software page walker of the project (the run loop's
# report, the GDB stub and the tests all use it).  Entries come from guest
# memory, which the guest controls: the walk is bounded (at most 5 reads),
# never follows anything but the address bits of an entry, and counts an
# entry outside the memory the host knows as "not mapped".


class PageFault(LookupError):
    """Deprecated, never raised: :func:`translate` returns None for an unmapped address.

    Kept for one release so that ``from pykvm.x86.paging import PageFault`` still works.
    """


_U64 = (1 << 64) - 1


def _walk_long(read: ReadPhys, cr3: int, virt: int, levels: int) -> tuple[int, int] | None:
    """4-level (``levels=4``) or 5-level (``levels=5``, ``CR4.LA57``) IA-32e walk."""
    top = 12 + 9 * levels                               # 48 or 57 bits of linear address
    high = virt >> (top - 1)
    if high not in (0, (1 << (64 - top + 1)) - 1):
        return None                                     # not canonical: #GP, never a walk
    table = cr3 & _ADDR_MASK
    flags = _RW_US
    for level in range(levels, 0, -1):                  # level 1 holds the 4 KiB PTEs
        shift = 12 + 9 * (level - 1)
        e = _q.unpack(read(table + 8 * (virt >> shift & 511), 8))[0]
        if not e & PTE.P:
            return None
        flags &= e
        if level == 1 or (level in (2, 3) and e & PTE.PS):   # 4 KiB, 2 MiB or 1 GiB page
            page = 1 << shift
            leaf = (e & ~_RW_US) | flags
            return (e & _ADDR_MASK & ~(page - 1)) | (virt & (page - 1)), leaf
        table = e & _ADDR_MASK
    return None  # pragma: no cover


def _walk4(read: ReadPhys, cr3: int, virt: int) -> tuple[int, int] | None:
    return _walk_long(read, cr3, virt, 4)


def _walk_pae(read: ReadPhys, cr3: int, virt: int) -> tuple[int, int] | None:
    pdpte = _q.unpack(read((cr3 & 0xFFFFFFE0) + 8 * (virt >> 30 & 3), 8))[0]
    if not pdpte & PTE.P:
        return None
    table = pdpte & _ADDR_MASK
    e = _q.unpack(read(table + 8 * (virt >> 21 & 511), 8))[0]
    if not e & PTE.P:
        return None
    if e & PTE.PS:
        return (e & _ADDR_MASK & ~(PAGE_2M - 1)) | (virt & (PAGE_2M - 1)), e
    table = e & _ADDR_MASK
    e2 = _q.unpack(read(table + 8 * (virt >> 12 & 511), 8))[0]
    if not e2 & PTE.P:
        return None
    return (e2 & _ADDR_MASK) | (virt & 0xFFF), e2 & (e | ~_RW_US)


def _walk2(read: ReadPhys, cr3: int, virt: int, pse: bool) -> tuple[int, int] | None:
    virt &= 0xFFFFFFFF
    pde = _l.unpack(read((cr3 & 0xFFFFF000) + 4 * (virt >> 22), 4))[0]
    if not pde & PTE.P:
        return None
    if pse and pde & PTE.PS:
        # 4 MiB page; PSE-36 puts physical address bits 39:32 in PDE bits 20:13.
        high = ((pde >> 13) & 0xFF) << 32
        return high | (pde & 0xFFC00000) | (virt & (PAGE_4M - 1)), pde
    pte = _l.unpack(read((pde & 0xFFFFF000) + 4 * (virt >> 12 & 1023), 4))[0]
    if not pte & PTE.P:
        return None
    return (pte & 0xFFFFF000) | (virt & 0xFFF), pte & (pde | ~_RW_US)


def walk(target: Any, sregs: Any, virt: int) -> tuple[int, int] | None:
    """``(guest physical address, leaf flags)`` of linear *virt* under *sregs*, or None.

    Like :func:`translate`, plus the flags of the leaf entry (``PTE.*``; the
    U/S and R/W bits are the AND over every level, as the CPU combines them).
    Without paging the flags are ``PTE.P | PTE.RW | PTE.US``.
    """
    if isinstance(virt, bool) or not isinstance(virt, int):
        raise TypeError(f"virt must be an int, not {type(virt).__name__}")
    if not 0 <= virt <= _U64:
        raise ValueError(f"virt={virt:#x} is not a 64-bit linear address")
    phys = as_phys(target)
    if not sregs.cr0 & CR0.PG:
        return virt & 0xFFFFFFFF, int(PTE.P | PTE.RW | PTE.US)
    try:
        if sregs.efer & EFER.LMA:
            return _walk_long(phys.read, sregs.cr3, virt, 5 if sregs.cr4 & CR4.LA57 else 4)
        if sregs.cr4 & CR4.PAE:
            return _walk_pae(phys.read, sregs.cr3, virt & 0xFFFFFFFF)
        return _walk2(phys.read, sregs.cr3, virt, bool(sregs.cr4 & CR4.PSE))
    except (ValueError, IndexError, struct.error):  # a table outside the memory the host knows
        return None


def translate(target: Any, sregs: Any, virt: int) -> int | None:
    """The guest physical address of linear address *virt* under *sregs* (None if unmapped).

    *target* is a ``Vm`` (or ``GuestMemory``) whose memory holds the tables;
    *sregs* a ``kvm_sregs`` (only ``cr0``, ``cr3``, ``cr4`` and ``efer`` are
    read).  Walks the tables the way the CPU does, for every paging mode:

    * no paging (``CR0.PG`` clear): the low 32 bits are the physical address;
    * 32-bit paging: 4 KiB pages, 4 MiB pages with ``CR4.PSE`` (PSE-36 bits);
    * PAE: 4 KiB and 2 MiB pages;
    * long mode (``EFER.LMA``): 4-level, or 5-level with ``CR4.LA57``;
      4 KiB, 2 MiB and 1 GiB pages; a non-canonical address is not mapped.

    Permissions are not checked (a debugger may read supervisor pages; use
    :func:`walk` for the flags).  Entries in memory the host cannot read
    count as not mapped.  *virt* outside ``[0, 2**64)`` raises ValueError.
    """
    r = walk(target, sregs, virt)
    return None if r is None else r[0]


def iter_mappings(pt: PageTables) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(virt, phys, size, flags)`` for every leaf of 4-level tables (for debugging)."""
    read = pt.phys.read

    def rec(table: int, level: int, base: int) -> Iterator[tuple[int, int, int, int]]:
        shift = PageTables.LEVEL_SHIFTS[level]
        raw = read(table, 4096)
        for i in range(512):
            e = _q.unpack_from(raw, 8 * i)[0]
            if not e & PTE.P:
                continue
            va = base | i << shift
            if level == 3 or (level in (1, 2) and e & PTE.PS):
                yield va, e & _ADDR_MASK & ~((1 << shift) - 1), 1 << shift, e & ~_ADDR_MASK
            else:
                yield from rec(e & _ADDR_MASK, level + 1, va)

    yield from rec(pt.cr3, 0, 0)

