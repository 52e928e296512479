"""The VM fd (``Vm``): memory slots, vCPUs, in-kernel devices.

Create with :meth:`Kvm.create_vm <pykvm.system.Kvm.create_vm>`.  A ``Vm``
owns what it creates: closing it closes its vCPUs and devices first, then the
VM fd, then unmaps the guest memory it allocated — in that order, so guest
memory stays mapped for as long as any fd could make KVM touch it.
"""

from __future__ import annotations

import ctypes
import errno
import weakref
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from .fd import FdObject
from .coalesced import CoalescedRing
from .device import Device
from .dirty import DirtyRing, bitmap_to_pages, bitmap_words, pages_to_bitmap
from ._check import U32 as _U32, U64 as _U64, expect as _expect, uint as _uint
from .errors import KvmClosedError, KvmError
from .eventfd import fd_of
from .gmem import GuestMemfd
from .memory import PAGE_SIZE, GuestMemory
from .uapi import ioctls as I
from .uapi import structs as S
from .uapi.enums import Cap
from .vcpu import Vcpu

if TYPE_CHECKING:  # pragma: no cover
    from .stats import Stats

__all__ = ["Vm", "MsrFilterRange"]



class Vm(FdObject):
    """A virtual machine: an fd from ``KVM_CREATE_VM``."""

    _what = "VM"

    @classmethod
    def _from_fd(cls, fd: int, vcpu_mmap_size: int, kvm=None) -> "Vm":
        vm = cls.__new__(cls)
        FdObject.__init__(vm, fd)
        vm._vcpu_mmap_size = vcpu_mmap_size
        vm._memory: Dict[int, GuestMemory] = {}
        vm._slots: Dict[int, Tuple[int, int, int]] = {}  # slot -> (gpa, size, flags)
        vm._vcpus: Dict[int, Vcpu] = {}
        vm._children = weakref.WeakSet()  # devices, stats fds ...
        vm._max_slots: Optional[int] = None
        vm._dirty_ring_size = 0
        vm._dirty_rings: Dict[int, DirtyRing] = {}
        return vm

    def __init__(self, *a, **k) -> None:  # pragma: no cover - guidance only
        raise TypeError("create a Vm with Kvm().create_vm()")

    def __repr__(self) -> str:
        return f"<Vm {self._state()} vcpus={len(self._vcpus)} slots={len(self._slots)}>"

    # -- capabilities -------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd (may differ from the system fd's)."""
        return self._ioctl(I.KVM_CHECK_EXTENSION, _uint("cap", cap, _U32))

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the VM: turn on *cap* with up to four arguments."""
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
        ec = S.kvm_enable_cap(cap=_uint("cap", cap, _U32), flags=_uint("flags", flags, _U32))
        for i, a in enumerate(args):
            ec.args[i] = _uint(f"args[{i}]", a)
        self._ioctl(I.KVM_ENABLE_CAP, ec)

    # -- memory -----------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION``: map host memory at *userspace_addr* into the guest.

        A *memory_size* of 0 deletes the slot.  The caller keeps the host
        memory mapped while the slot exists (``add_memory`` does it for you).
        """
        region = S.kvm_userspace_memory_region(
            slot=_uint("slot", slot, _U32), flags=_uint("flags", flags, _U32),
            guest_phys_addr=_uint("guest_phys_addr", guest_phys_addr),
            memory_size=_uint("memory_size", memory_size),
            userspace_addr=_uint("userspace_addr", userspace_addr))
        self._ioctl(I.KVM_SET_USER_MEMORY_REGION, region)
        if memory_size:
            self._slots[slot] = (guest_phys_addr, memory_size, flags)
        else:
            self._slots.pop(slot, None)

    def set_user_memory_region2(self, slot: int, guest_phys_addr: int, memory_size: int,
                                userspace_addr: int, flags: int = 0, *,
                                guest_memfd: Union[GuestMemfd, int, None] = None,
                                guest_memfd_offset: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION2``: like :meth:`set_user_memory_region`, plus guest_memfd.

        *flags* are ``KVM_MEM_LOG_DIRTY_PAGES`` (track writes for
        :meth:`get_dirty_log` and the dirty ring), ``KVM_MEM_READONLY`` (guest
        writes become ``MmioWrite`` exits, reads see the memory) and
        ``KVM_MEM_GUEST_MEMFD``, which needs *guest_memfd* (a
        :class:`~pykvm.gmem.GuestMemfd` or fd) and takes private memory from it
        at *guest_memfd_offset*.  Passing *guest_memfd* sets that flag for you.
        Needs ``KVM_CAP_USER_MEMORY2``.
        """
        gfd = 0
        if guest_memfd is not None:
            gfd = fd_of(guest_memfd, "guest_memfd")
            flags |= S.KVM_MEM_GUEST_MEMFD
        elif flags & S.KVM_MEM_GUEST_MEMFD and memory_size:
            raise ValueError("KVM_MEM_GUEST_MEMFD needs guest_memfd=")
        region = S.kvm_userspace_memory_region2(
            slot=_uint("slot", slot, _U32), flags=_uint("flags", flags, _U32),
            guest_phys_addr=_uint("guest_phys_addr", guest_phys_addr),
            memory_size=_uint("memory_size", memory_size),
            userspace_addr=_uint("userspace_addr", userspace_addr),
            guest_memfd_offset=_uint("guest_memfd_offset", guest_memfd_offset),
            guest_memfd=gfd)
        self._ioctl(I.KVM_SET_USER_MEMORY_REGION2, region)
        if memory_size:
            self._slots[slot] = (guest_phys_addr, memory_size, flags)
        else:
            self._slots.pop(slot, None)

    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD``: a file of *size* bytes of guest memory managed by KVM.

        *flags*: ``GUEST_MEMFD_FLAG_MMAP`` (the file can be ``mmap``-ed) and
        ``GUEST_MEMFD_FLAG_INIT_SHARED`` (its pages start shared, so host and
        guest can both touch them); ``KVM_CAP_GUEST_MEMFD_FLAGS`` lists those the
        host accepts.  *size* must be a multiple of the page size.  The fd is
        made close-on-exec and is closed with the VM unless closed before.
        """
        _uint("size", size)
        if size == 0 or size % PAGE_SIZE:
            raise ValueError(f"guest_memfd size {size:#x} must be a non-zero multiple of {PAGE_SIZE:#x}")
        arg = S.kvm_create_guest_memfd(size=size, flags=_uint("flags", flags))
        fd = self._ioctl(I.KVM_CREATE_GUEST_MEMFD, arg)
        g = GuestMemfd(fd, size, flags, self)
        self._children.add(g)
        return g

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES``: set attributes of guest range ``[address, address+size)``.

        The only attribute is ``KVM_MEMORY_ATTRIBUTE_PRIVATE`` (the range's
        memory comes from the slot's guest_memfd).  ``KVM_CAP_MEMORY_ATTRIBUTES``
        (on the VM fd) returns the attributes this VM supports: none on a
        default x86 VM (KVM answers ENOTTY or EINVAL); software-protected and
        confidential VM types support ``PRIVATE``.
        """
        arg = S.kvm_memory_attributes(address=_uint("address", address), size=_uint("size", size),
                                      attributes=_uint("attributes", attributes), flags=_uint("flags", flags))
        self._ioctl(I.KVM_SET_MEMORY_ATTRIBUTES, arg)

    @property
    def max_memslots(self) -> int:
        """Usable slot numbers per address space (``KVM_CAP_NR_MEMSLOTS``)."""
        if self._max_slots is None:
            self._max_slots = self.check_extension(Cap.NR_MEMSLOTS) or 32
        return self._max_slots

    def _free_slot(self) -> int:
        for slot in range(self.max_memslots):
            if slot not in self._slots:
                return slot
        raise KvmError(errno.ENOSPC, "KVM_SET_USER_MEMORY_REGION",
                       f"all {self.max_memslots} memory slots are in use")

    def add_memory(self, guest_phys_addr: int, size: int, *, flags: int = 0,
                   slot: Optional[int] = None) -> GuestMemory:
        """Allocate *size* bytes of anonymous memory and map it at *guest_phys_addr*.

        Uses the lowest free slot unless *slot* is given.  The returned
        :class:`~pykvm.memory.GuestMemory` stays mapped while registered.
        """
        _uint("guest_phys_addr", guest_phys_addr)
        _uint("size", size)
        if size == 0 or size % PAGE_SIZE or guest_phys_addr % PAGE_SIZE:
            raise ValueError(f"guest_phys_addr ({guest_phys_addr:#x}) and size ({size:#x}) must be "
                             f"non-zero multiples of the page size ({PAGE_SIZE:#x})")
        for s, (gpa, sz, _) in self._slots.items():
            if guest_phys_addr < gpa + sz and gpa < guest_phys_addr + size:
                raise KvmError(errno.EEXIST, "KVM_SET_USER_MEMORY_REGION",
                               f"[{guest_phys_addr:#x}, {guest_phys_addr + size:#x}) overlaps slot {s} "
                               f"at [{gpa:#x}, {gpa + sz:#x})")
        if slot is None:
            slot = self._free_slot()
        elif slot in self._slots:
            raise KvmError(errno.EEXIST, "KVM_SET_USER_MEMORY_REGION", f"slot {slot} is in use")
        try:
            mem = GuestMemory._anonymous(size)
        except OSError as e:
            raise KvmError(e.errno, "mmap", f"could not allocate {size:#x} bytes of guest memory") from None
        try:
            self.set_user_memory_region(slot, guest_phys_addr, size, mem.userspace_addr, flags)
        except BaseException:
            mem._unmap()
            raise
        mem.slot, mem.guest_phys_addr, mem.flags, mem._vm = slot, guest_phys_addr, flags, self
        self._memory[slot] = mem
        return mem

    def remove_memory(self, mem: GuestMemory) -> None:
        """Delete *mem*'s slot from the VM, then unmap it."""
        if not isinstance(mem, GuestMemory) or self._memory.get(mem.slot) is not mem:
            raise ValueError(f"{mem!r} is not memory of this VM")
        self.set_user_memory_region(mem.slot, mem.guest_phys_addr, 0, mem.userspace_addr, mem.flags)
        del self._memory[mem.slot]
        mem._unmap()

    @property
    def memory(self) -> List[GuestMemory]:
        """The regions added with :meth:`add_memory`, by guest address."""
        return sorted(self._memory.values(), key=lambda m: m.guest_phys_addr)

    def _chunks(self, gpa: int, n: int) -> Iterator[Tuple[GuestMemory, int, int]]:
        _uint("gpa", gpa)
        if n < 0:
            raise ValueError("length must be >= 0")
        end = gpa + n
        while gpa < end:
            for mem in self._memory.values():
                if mem.guest_phys_addr <= gpa < mem.guest_phys_addr + mem.size:
                    off = gpa - mem.guest_phys_addr
                    k = min(end - gpa, mem.size - off)
                    yield mem, off, k
                    gpa += k
                    break
            else:
                raise ValueError(f"guest physical address {gpa:#x} is not in memory added with add_memory")

    def read(self, gpa: int, n: int) -> bytes:
        """Copy *n* bytes of guest RAM at guest physical *gpa* (may span regions)."""
        return b"".join(mem[off:off + k] for mem, off, k in self._chunks(gpa, n))

    def write(self, gpa: int, data) -> None:
        """Copy *data* into guest RAM at guest physical *gpa* (may span regions)."""
        data = memoryview(data).cast("B")
        pos = 0
        for mem, off, k in list(self._chunks(gpa, len(data))):
            mem[off:off + k] = data[pos:pos + k]
            pos += k

    # -- vCPUs -------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        """``KVM_CREATE_VCPU``: a new vCPU with APIC id *vcpu_id*."""
        _uint("vcpu_id", vcpu_id, _U32)
        if self._fd < 0:
            raise KvmClosedError(self._what, "KVM_CREATE_VCPU")
        if vcpu_id in self._vcpus:
            raise KvmError(errno.EEXIST, "KVM_CREATE_VCPU", f"vCPU {vcpu_id} already exists")
        fd = self._ioctl(I.KVM_CREATE_VCPU, vcpu_id)
        try:
            vcpu = Vcpu(fd, vcpu_id, self._vcpu_mmap_size, self)
        except BaseException:
            import os

            os.close(fd)
            raise
        self._vcpus[vcpu_id] = vcpu
        return vcpu

    @property
    def vcpus(self) -> List[Vcpu]:
        """The vCPUs created so far, by id."""
        return [self._vcpus[k] for k in sorted(self._vcpus)]

    # -- x86 set-up ------------------------------------------------------------------------
    def set_tss_address(self, addr: int) -> None:
        """``KVM_SET_TSS_ADDR``: 3 pages of guest physical space KVM needs on Intel (e.g. 0xfffbd000)."""
        self._ioctl(I.KVM_SET_TSS_ADDR, _uint("addr", addr, 0xFFFFFFFF))

    def set_identity_map_address(self, addr: int) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR``: one page for the EPT identity map (Intel real mode)."""
        self._ioctl(I.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(_uint("addr", addr)))

    def create_irq_chip(self) -> None:
        """``KVM_CREATE_IRQCHIP``: in-kernel PIC, IOAPIC and a LAPIC per vCPU (before vCPUs)."""
        self._ioctl(I.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        """``KVM_CREATE_PIT2``: in-kernel i8254 PIT (needs the irqchip first)."""
        self._ioctl(I.KVM_CREATE_PIT2, S.kvm_pit_config(flags=_uint("flags", flags, _U32)))

    # -- dirty page tracking ------------------------------------------------------------
    def _slot_pages(self, slot: int) -> int:
        _uint("slot", slot, _U32)
        try:
            return self._slots[slot][1] // PAGE_SIZE
        except KeyError:
            raise ValueError(f"slot {slot} is not a memory slot of this VM") from None

    def get_dirty_log(self, slot: int) -> List[int]:
        """``KVM_GET_DIRTY_LOG``: the pages of *slot* written since the last call.

        Returns page numbers relative to the slot's start (page *i* is guest
        physical ``gpa + i * PAGE_SIZE``).  The slot needs
        ``KVM_MEM_LOG_DIRTY_PAGES``.  Without manual protection KVM clears the
        log and write-protects the pages again; with
        ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` enabled the bits stay until
        :meth:`clear_dirty_log`.  KVM answers ENOENT for a slot without dirty
        logging, ENXIO when the dirty ring is in use instead.
        """
        npages = self._slot_pages(slot)
        bitmap = (ctypes.c_uint64 * max(1, bitmap_words(npages)))()
        arg = S.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        self._ioctl(I.KVM_GET_DIRTY_LOG, arg)
        return bitmap_to_pages(bitmap, npages)

    def clear_dirty_log(self, slot: int, first_page: int = 0, num_pages: Optional[int] = None,
                        pages: Optional[Iterable[int]] = None) -> None:
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
        arg = S.kvm_clear_dirty_log(slot=slot, num_pages=num_pages, first_page=first_page,
                                    dirty_bitmap=ctypes.addressof(bitmap))
        self._ioctl(I.KVM_CLEAR_DIRTY_LOG, arg)

    def enable_dirty_ring(self, size_bytes: int, *, acq_rel: Optional[bool] = None) -> int:
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
        return self._ioctl(I.KVM_RESET_DIRTY_RINGS)

    # -- interrupt controllers ------------------------------------------------------------
    def get_irqchip(self, chip_id: int) -> S.kvm_irqchip:
        """``KVM_GET_IRQCHIP``: state of the in-kernel PIC master (0), PIC slave (1) or IOAPIC (2).

        Read ``.chip.pic`` (``kvm_pic_state``) or ``.chip.ioapic``
        (``kvm_ioapic_state``).  ENXIO without a full in-kernel irqchip (none,
        or split).
        """
        chip = S.kvm_irqchip(chip_id=_uint("chip_id", chip_id, S.KVM_NR_IRQCHIPS - 1))
        self._ioctl(I.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: S.kvm_irqchip) -> None:
        """``KVM_SET_IRQCHIP``: load a PIC/IOAPIC state (``chip.chip_id`` says which)."""
        _expect(chip, S.kvm_irqchip)
        _uint("chip_id", chip.chip_id, S.KVM_NR_IRQCHIPS - 1)
        self._ioctl(I.KVM_SET_IRQCHIP, chip)

    def enable_split_irqchip(self, ioapic_pins: int = S.KVM_IOAPIC_NUM_PINS) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)``: LAPICs in the kernel, PIC/IOAPIC/PIT in user space.

        Instead of :meth:`create_irq_chip`, before any vCPU.  *ioapic_pins*
        GSI routes are reserved for the user-space IOAPIC (which then signals
        the LAPICs through MSI routes / :meth:`signal_msi`); PIC and IOAPIC
        accesses exit to user space, and EOIs of level interrupts become
        ``IoapicEoi`` exits.
        """
        self.enable_cap(Cap.SPLIT_IRQCHIP, _uint("ioapic_pins", ioapic_pins, _U32))

    def _irq_level(self, irq: int, active: Union[bool, int]) -> S.kvm_irq_level:
        lvl = S.kvm_irq_level(level=1 if active else 0)
        lvl.irq = _uint("irq", irq, _U32)
        return lvl

    def set_irq_line(self, irq: int, active: Union[bool, int]) -> None:
        """``KVM_IRQ_LINE``: drive GSI *irq* high (*active*) or low.

        An edge-triggered interrupt fires on the low-to-high transition, so
        pulse it: ``set_irq_line(n, True); set_irq_line(n, False)``.
        """
        self._ioctl(I.KVM_IRQ_LINE, self._irq_level(irq, active))

    def irq_line_status(self, irq: int, active: Union[bool, int]) -> int:
        """``KVM_IRQ_LINE_STATUS``: like :meth:`set_irq_line`, returning KVM's status.

        The status is > 0 when the interrupt was delivered (to that many
        targets), 0 when it coalesced with one still pending, < 0 when it was
        masked or ignored (``KVM_CAP_IRQ_INJECT_STATUS``).
        """
        lvl = self._irq_level(irq, active)
        self._ioctl(I.KVM_IRQ_LINE_STATUS, lvl)
        return lvl.status

    def set_gsi_routing(self, entries: Iterable[S.kvm_irq_routing_entry], flags: int = 0) -> None:
        """``KVM_SET_GSI_ROUTING``: replace the whole GSI routing table with *entries*.

        Build entries with :func:`pykvm.irq.irqchip_route` /
        :func:`pykvm.irq.msi_route`; start from :func:`pykvm.irq.default_routes`
        to keep the PIC/IOAPIC routes.  At most ``KVM_CAP_IRQ_ROUTING`` entries.
        """
        lst = list(entries)
        for e in lst:
            _expect(e, S.kvm_irq_routing_entry)
        buf = S.flex(S.kvm_irq_routing, len(lst))
        buf.flags = _uint("flags", flags, _U32)
        for i, e in enumerate(lst):
            buf.entries[i] = e
        self._ioctl(I.KVM_SET_GSI_ROUTING, buf)

    def signal_msi(self, address: int, data: int, *, flags: int = 0, devid: int = 0) -> int:
        """``KVM_SIGNAL_MSI``: inject the MSI (*address*, *data*) directly (no GSI route).

        Returns > 0 when delivered (to that many vCPUs), 0 when the guest
        blocked it (e.g. its LAPIC is software-disabled).  Needs an in-kernel
        LAPIC (full or split irqchip).  See :func:`pykvm.irq.msi_address` /
        :func:`pykvm.irq.msi_data` for the x86 format.
        """
        _uint("address", address)
        msi = S.kvm_msi(address_lo=address & _U32, address_hi=address >> 32, data=_uint("data", data, _U32),
                        flags=_uint("flags", flags, _U32), devid=_uint("devid", devid, _U32))
        return self._ioctl(I.KVM_SIGNAL_MSI, msi)

    def _irqfd(self, fd, gsi: int, flags: int, resamplefd=None) -> None:
        arg = S.kvm_irqfd(fd=fd_of(fd, "fd"), gsi=_uint("gsi", gsi, _U32), flags=flags)
        if resamplefd is not None:
            arg.resamplefd = fd_of(resamplefd, "resamplefd")
        self._ioctl(I.KVM_IRQFD, arg)

    def register_irqfd(self, fd, gsi: int) -> None:
        """``KVM_IRQFD``: a write to eventfd *fd* raises GSI *gsi* (an edge: assert, deassert).

        *fd* is an :class:`~pykvm.eventfd.EventFd` or an fd number.  Needs an
        in-kernel irqchip; EEXIST if *fd* is already an irqfd.
        """
        self._irqfd(fd, gsi, 0)

    def register_irqfd_with_resample(self, fd, resamplefd, gsi: int) -> None:
        """``KVM_IRQFD`` with ``KVM_IRQFD_FLAG_RESAMPLE``: a level-triggered irqfd.

        A write to *fd* asserts GSI *gsi* and keeps it asserted; when the
        guest acknowledges (EOIs) the interrupt, KVM deasserts it and signals
        *resamplefd*, so the device model can check whether to assert again
        (``KVM_CAP_IRQFD_RESAMPLE``; full in-kernel irqchip only).
        """
        self._irqfd(fd, gsi, S.KVM_IRQFD_FLAG_RESAMPLE, resamplefd)

    def unregister_irqfd(self, fd, gsi: int) -> None:
        """``KVM_IRQFD`` with ``KVM_IRQFD_FLAG_DEASSIGN``: stop *fd* from raising *gsi*."""
        self._irqfd(fd, gsi, S.KVM_IRQFD_FLAG_DEASSIGN)

    # -- PIT ---------------------------------------------------------------------------------
    def create_pit(self) -> None:
        """``KVM_CREATE_PIT`` (legacy): like ``create_pit2(KVM_PIT_SPEAKER_DUMMY)``."""
        self._ioctl(I.KVM_CREATE_PIT)

    def get_pit(self) -> S.kvm_pit_state:
        """``KVM_GET_PIT`` (legacy): the three PIT channels, without flags (ENXIO without a PIT)."""
        st = S.kvm_pit_state()
        self._ioctl(I.KVM_GET_PIT, st)
        return st

    def set_pit(self, state: S.kvm_pit_state) -> None:
        """``KVM_SET_PIT`` (legacy): load the three PIT channels."""
        _expect(state, S.kvm_pit_state)
        self._ioctl(I.KVM_SET_PIT, state)

    def get_pit2(self) -> S.kvm_pit_state2:
        """``KVM_GET_PIT2``: PIT channel states and ``flags`` (``KVM_PIT_FLAGS_*``)."""
        st = S.kvm_pit_state2()
        self._ioctl(I.KVM_GET_PIT2, st)
        return st

    def set_pit2(self, state: S.kvm_pit_state2) -> None:
        """``KVM_SET_PIT2``: load channel states and flags (e.g. ``KVM_PIT_FLAGS_SPEAKER_DATA_ON``)."""
        _expect(state, S.kvm_pit_state2)
        self._ioctl(I.KVM_SET_PIT2, state)

    def reinject_control(self, pit_reinject: bool) -> None:
        """``KVM_REINJECT_CONTROL``: whether the PIT re-injects ticks the guest missed.

        With reinjection (the default) every tick lost while the guest had
        interrupts blocked is delivered later; without, they coalesce.  ENXIO
        without an in-kernel PIT.
        """
        self._ioctl(I.KVM_REINJECT_CONTROL, S.kvm_reinject_control(pit_reinject=1 if pit_reinject else 0))

    def set_boot_cpu_id(self, vcpu_id: int) -> None:
        """``KVM_SET_BOOT_CPU_ID``: which vCPU id is the BSP (default 0).

        Before any vCPU exists (EBUSY after).  The BSP's ``IA32_APIC_BASE``
        has the BSP bit (8); with an in-kernel irqchip the others start
        waiting for INIT/SIPI.
        """
        self._ioctl(I.KVM_SET_BOOT_CPU_ID, _uint("vcpu_id", vcpu_id, _U32))

    # -- ioeventfd and coalesced I/O -------------------------------------------------------
    @staticmethod
    def _ioeventfd(fd, addr: int, length: int, datamatch: Optional[int], pio: bool,
                   deassign: bool) -> S.kvm_ioeventfd:
        _uint("addr", addr, 0xFFFF if pio else _U64)
        if length not in (0, 1, 2, 4, 8):
            raise ValueError(f"length={length!r}: expected 0 (any), 1, 2, 4 or 8")
        if pio and length == 8:
            raise ValueError("port I/O is at most 4 bytes wide")
        flags = S.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if deassign:
            flags |= S.KVM_IOEVENTFD_FLAG_DEASSIGN
        dm = 0
        if datamatch is not None:
            if length == 0:
                raise ValueError("datamatch needs a length (1, 2, 4 or 8)")
            dm = _uint("datamatch", datamatch, (1 << (8 * length)) - 1)
            flags |= S.KVM_IOEVENTFD_FLAG_DATAMATCH
        return S.kvm_ioeventfd(datamatch=dm, addr=addr, len=length, fd=fd_of(fd, "fd"), flags=flags)

    def register_ioevent(self, fd, addr: int, *, length: int = 0, datamatch: Optional[int] = None,
                         pio: bool = False) -> None:
        """``KVM_IOEVENTFD``: a guest write to *addr* signals eventfd *fd* instead of exiting.

        *pio* selects port I/O (else MMIO).  *length* is the write width to
        match (1, 2, 4, 8; 0 matches any width, ``KVM_CAP_IOEVENTFD_ANY_LENGTH``).
        With *datamatch* only writes of exactly that value signal; others exit
        to user space as usual.  The guest does not see the write's effect
        beyond that (reads of *addr* still exit).
        """
        self._ioctl(I.KVM_IOEVENTFD, self._ioeventfd(fd, addr, length, datamatch, pio, False))

    def unregister_ioevent(self, fd, addr: int, *, length: int = 0, datamatch: Optional[int] = None,
                           pio: bool = False) -> None:
        """``KVM_IOEVENTFD`` with ``DEASSIGN``: remove the matching ioeventfd (same arguments)."""
        self._ioctl(I.KVM_IOEVENTFD, self._ioeventfd(fd, addr, length, datamatch, pio, True))

    @staticmethod
    def _zone(addr: int, size: int, pio: bool) -> S.kvm_coalesced_mmio_zone:
        z = S.kvm_coalesced_mmio_zone(addr=_uint("addr", addr, 0xFFFF if pio else _U64),
                                      size=_uint("size", size, _U32))
        if size == 0:
            raise ValueError("a coalesced zone needs a non-zero size")
        z.pio = 1 if pio else 0
        return z

    def register_coalesced_mmio(self, addr: int, size: int) -> None:
        """``KVM_REGISTER_COALESCED_MMIO``: guest writes to ``[addr, addr+size)`` go to the ring.

        They no longer exit; read them with :meth:`coalesced_ring`.  Reads of
        the zone still exit.  (``KVM_CAP_COALESCED_MMIO`` is the ring's page offset.)
        """
        self._ioctl(I.KVM_REGISTER_COALESCED_MMIO, self._zone(addr, size, False))

    def unregister_coalesced_mmio(self, addr: int, size: int) -> None:
        """``KVM_UNREGISTER_COALESCED_MMIO``: remove the zones inside ``[addr, addr+size)``."""
        self._ioctl(I.KVM_UNREGISTER_COALESCED_MMIO, self._zone(addr, size, False))

    def register_coalesced_pio(self, port: int, size: int) -> None:
        """``KVM_REGISTER_COALESCED_MMIO`` with ``pio=1``: coalesce ``out`` to ports ``[port, port+size)``.

        Needs ``KVM_CAP_COALESCED_PIO``.  Entries in the ring have ``pio == 1``.
        """
        self._ioctl(I.KVM_REGISTER_COALESCED_MMIO, self._zone(port, size, True))

    def unregister_coalesced_pio(self, port: int, size: int) -> None:
        """``KVM_UNREGISTER_COALESCED_MMIO`` with ``pio=1``."""
        self._ioctl(I.KVM_UNREGISTER_COALESCED_MMIO, self._zone(port, size, True))

    def coalesced_ring(self, vcpu: Optional[Vcpu] = None) -> CoalescedRing:
        """The VM's coalesced MMIO/PIO ring, read through *vcpu*'s mapping (default: the first vCPU)."""
        if vcpu is None:
            if not self._vcpus:
                raise ValueError("the coalesced ring is mapped through a vCPU: create one first")
            vcpu = self.vcpus[0]
        elif not isinstance(vcpu, Vcpu) or self._vcpus.get(vcpu.id) is not vcpu:
            raise ValueError(f"{vcpu!r} is not a vCPU of this VM")
        return CoalescedRing(vcpu)

    # -- clock -------------------------------------------------------------------------------
    def get_clock(self) -> S.kvm_clock_data:
        """``KVM_GET_CLOCK``: the guest's kvmclock in ns (``clock``) and ``flags``.

        ``flags`` has ``KVM_CLOCK_TSC_STABLE`` when the guest clock is stable
        across vCPUs, and ``KVM_CLOCK_REALTIME`` / ``KVM_CLOCK_HOST_TSC`` when
        ``realtime`` / ``host_tsc`` were sampled with it (host on a TSC clocksource).
        """
        c = S.kvm_clock_data()
        self._ioctl(I.KVM_GET_CLOCK, c)
        return c

    def set_clock(self, clock: Union[int, S.kvm_clock_data], *, flags: int = 0, realtime: int = 0) -> None:
        """``KVM_SET_CLOCK``: set the guest's kvmclock to *clock* ns.

        With ``flags=KVM_CLOCK_REALTIME`` and *realtime* (host ``CLOCK_REALTIME``
        ns, e.g. from a migration source's ``get_clock()``), KVM adds the time
        elapsed since *realtime* (``KVM_CAP_ADJUST_CLOCK`` lists the flags
        accepted).  A ``kvm_clock_data`` is passed as it is.
        """
        if isinstance(clock, S.kvm_clock_data):
            if flags or realtime:
                raise ValueError("pass flags/realtime inside the kvm_clock_data, not beside it")
            c = clock
        else:
            c = S.kvm_clock_data(clock=_uint("clock", clock), flags=_uint("flags", flags, _U32),
                                 realtime=_uint("realtime", realtime))
        self._ioctl(I.KVM_SET_CLOCK, c)

    # -- x86 policies ------------------------------------------------------------------------
    def set_msr_filter(self, ranges: Sequence["MsrFilterRange"] = (), *, default_deny: bool = False) -> None:
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
        if len(ranges) > S.KVM_MSR_FILTER_MAX_RANGES:
            raise ValueError(f"at most {S.KVM_MSR_FILTER_MAX_RANGES} MSR filter ranges, got {len(ranges)}")
        f = S.kvm_msr_filter(flags=S.KVM_MSR_FILTER_DEFAULT_DENY if default_deny else 0)
        keep = []
        for i, r in enumerate(ranges):
            _expect(r, MsrFilterRange)
            buf = ctypes.create_string_buffer(bytes(r.bitmap), len(r.bitmap))
            keep.append(buf)
            f.ranges[i].flags = r.flags
            f.ranges[i].nmsrs = r.nmsrs
            f.ranges[i].base = r.base
            f.ranges[i].bitmap = ctypes.addressof(buf)
        self._ioctl(I.KVM_X86_SET_MSR_FILTER, f)
        del keep

    def set_pmu_event_filter(self, events: Iterable[int], *, action: int = S.KVM_PMU_EVENT_ALLOW,
                             fixed_counter_bitmap: int = 0, flags: int = 0) -> None:
        """``KVM_SET_PMU_EVENT_FILTER``: which PMU events the guest may count.

        *action* ``KVM_PMU_EVENT_ALLOW`` allows only *events* (event select |
        unit mask << 8, as in ``PERFEVTSEL``), ``KVM_PMU_EVENT_DENY`` forbids
        them; a filtered counter simply does not count.  *fixed_counter_bitmap*
        does the same for fixed counters, *flags* ``KVM_PMU_EVENT_FLAG_MASKED_EVENTS``
        switches to masked-event entries.  Needs ``KVM_CAP_PMU_EVENT_FILTER``;
        it has a visible effect only when the host exposes a vPMU.
        """
        evs = list(events)
        buf = S.flex(S.kvm_pmu_event_filter, len(evs))
        buf.action = _uint("action", action, _U32)
        buf.fixed_counter_bitmap = _uint("fixed_counter_bitmap", fixed_counter_bitmap, _U32)
        buf.flags = _uint("flags", flags, _U32)
        for i, e in enumerate(evs):
            buf.events[i] = _uint(f"events[{i}]", e)
        self._ioctl(I.KVM_SET_PMU_EVENT_FILTER, buf)

    def set_nr_mmu_pages(self, n: int) -> None:
        """``KVM_SET_NR_MMU_PAGES``: cap the shadow-MMU page cache at *n* pages (>= 64).

        Only meaningful with shadow paging (``KVM_CAP_MMU_SHADOW_CACHE_CONTROL``);
        the default scales with guest memory.
        """
        self._ioctl(I.KVM_SET_NR_MMU_PAGES, _uint("n", n, _U32))

    def get_nr_mmu_pages(self) -> int:
        """``KVM_GET_NR_MMU_PAGES``: the shadow-MMU page limit.

        Removed from the kernel in Linux 6.x (ENOTTY there); kept for older hosts.
        """
        return self._ioctl(I.KVM_GET_NR_MMU_PAGES)

    # -- devices and statistics ---------------------------------------------------------------
    def create_device(self, dev_type: int, *, test: bool = False) -> Optional[Device]:
        """``KVM_CREATE_DEVICE``: an in-kernel device of *dev_type* (:class:`~pykvm.device.DeviceType`).

        Returns the :class:`~pykvm.device.Device` (closed with the VM).  With
        *test* (``KVM_CREATE_DEVICE_TEST``) KVM creates nothing and this returns
        ``None`` if it could, or raises ENODEV if the type is unknown here.
        """
        dev_type = _uint("dev_type", dev_type, _U32)
        cd = S.kvm_create_device(type=dev_type,
                                 flags=S.KVM_CREATE_DEVICE_TEST if test else 0)
        self._ioctl(I.KVM_CREATE_DEVICE, cd)
        if test:
            return None
        # KVM hands out the device fd with O_CLOEXEC already.
        dev = Device(cd.fd, dev_type, self)
        self._children.add(dev)
        return dev

    def supports_device(self, dev_type: int) -> bool:
        """Whether :meth:`create_device` would accept *dev_type* (``KVM_CREATE_DEVICE_TEST``; ENODEV -> False)."""
        try:
            self.create_device(dev_type, test=True)
            return True
        except KvmError as e:
            if e.errno == errno.ENODEV:
                return False
            raise

    def get_stats_fd(self) -> "Stats":
        """``KVM_GET_STATS_FD``: the VM's binary statistics (:class:`pykvm.stats.Stats`), closed with the VM."""
        from .stats import open_stats

        if self._fd < 0:
            raise KvmClosedError(self._what, "KVM_GET_STATS_FD")
        st = open_stats(self.fileno())
        self._children.add(st)
        return st

    # -- Hyper-V, Xen, memory encryption -------------------------------------------------------
    def hyperv_eventfd(self, conn_id: int, fd, *, deassign: bool = False) -> None:
        """``KVM_HYPERV_EVENTFD``: a guest ``HvSignalEvent`` on *conn_id* signals eventfd *fd*.

        With *deassign* remove it.  Needs ``KVM_CAP_HYPERV_EVENTFD`` (kernels
        built with ``CONFIG_KVM_HYPERV``; ENOTTY elsewhere).
        """
        arg = S.kvm_hyperv_eventfd(conn_id=_uint("conn_id", conn_id, S.KVM_HYPERV_CONN_ID_MASK),
                                   fd=fd_of(fd, "fd"),
                                   flags=S.KVM_HYPERV_EVENTFD_DEASSIGN if deassign else 0)
        self._ioctl(I.KVM_HYPERV_EVENTFD, arg)

    def xen_hvm_config(self, *, flags: int = 0, msr: int = 0, blob_addr_32: int = 0, blob_addr_64: int = 0,
                       blob_size_32: int = 0, blob_size_64: int = 0) -> None:
        """``KVM_XEN_HVM_CONFIG``: Xen HVM emulation (hypercall page MSR, ``KVM_XEN_HVM_CONFIG_*`` flags).

        Needs ``KVM_CAP_XEN_HVM`` (kernels built with ``CONFIG_KVM_XEN``; ENOTTY elsewhere).
        """
        arg = S.kvm_xen_hvm_config(flags=_uint("flags", flags, _U32), msr=_uint("msr", msr, _U32),
                                   blob_addr_32=_uint("blob_addr_32", blob_addr_32),
                                   blob_addr_64=_uint("blob_addr_64", blob_addr_64),
                                   blob_size_32=_uint("blob_size_32", blob_size_32, 0xFF),
                                   blob_size_64=_uint("blob_size_64", blob_size_64, 0xFF))
        self._ioctl(I.KVM_XEN_HVM_CONFIG, arg)

    def xen_hvm_get_attr(self, attr_type: int) -> S.kvm_xen_hvm_attr:
        """``KVM_XEN_HVM_GET_ATTR``: read Xen attribute *attr_type* (``u`` holds the raw union)."""
        a = S.kvm_xen_hvm_attr(type=_uint("attr_type", attr_type, 0xFFFF))
        self._ioctl(I.KVM_XEN_HVM_GET_ATTR, a)
        return a

    def xen_hvm_set_attr(self, attr: S.kvm_xen_hvm_attr) -> None:
        """``KVM_XEN_HVM_SET_ATTR``: write a Xen attribute."""
        _expect(attr, S.kvm_xen_hvm_attr)
        self._ioctl(I.KVM_XEN_HVM_SET_ATTR, attr)

    def xen_hvm_evtchn_send(self, port: int, vcpu: int = 0,
                            priority: int = S.KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL) -> None:
        """``KVM_XEN_HVM_EVTCHN_SEND``: raise Xen event channel *port* on *vcpu*."""
        arg = S.kvm_irq_routing_xen_evtchn(port=_uint("port", port, _U32), vcpu=_uint("vcpu", vcpu, _U32),
                                           priority=_uint("priority", priority, _U32))
        self._ioctl(I.KVM_XEN_HVM_EVTCHN_SEND, arg)

    def memory_encrypt_op(self, cmd: ctypes.Structure) -> int:
        """``KVM_MEMORY_ENCRYPT_OP``: a vendor command (SEV: ``kvm_sev_cmd``; TDX: ``kvm_tdx_cmd``).

        *cmd* is passed by address and updated by KVM.  ENOTTY on hosts
        without memory encryption.
        """
        if not isinstance(cmd, (ctypes.Structure, ctypes.Union)):
            raise TypeError(f"expected a ctypes structure, got {type(cmd).__name__}")
        return self._ioctl(I.KVM_MEMORY_ENCRYPT_OP, ctypes.addressof(cmd))

    def memory_encrypt_reg_region(self, addr: int, size: int) -> None:
        """``KVM_MEMORY_ENCRYPT_REG_REGION``: pin host range ``[addr, addr+size)`` for an encrypted guest."""
        self._ioctl(I.KVM_MEMORY_ENCRYPT_REG_REGION,
                    S.kvm_enc_region(addr=_uint("addr", addr), size=_uint("size", size)))

    def memory_encrypt_unreg_region(self, addr: int, size: int) -> None:
        """``KVM_MEMORY_ENCRYPT_UNREG_REGION``: undo :meth:`memory_encrypt_reg_region`."""
        self._ioctl(I.KVM_MEMORY_ENCRYPT_UNREG_REGION,
                    S.kvm_enc_region(addr=_uint("addr", addr), size=_uint("size", size)))

    # -- closing ------------------------------------------------------------------------------
    def _close_children(self) -> None:
        for ring in self._dirty_rings.values():
            ring.close()
        self._dirty_rings.clear()
        for child in list(self._children):
            child.close()
        for vcpu in self._vcpus.values():
            vcpu.close()

    def _after_close(self) -> None:
        for mem in self._memory.values():
            mem._unmap()
        self._memory.clear()
        self._slots.clear()


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

    def __init__(self, flags: int, base: int, bitmap: bytes, nmsrs: int = -1) -> None:
        if not isinstance(bitmap, (bytes, bytearray)):
            raise TypeError(f"bitmap must be bytes, not {type(bitmap).__name__}")
        bitmap = bytes(bitmap)
        if nmsrs == -1:
            nmsrs = 8 * len(bitmap)
        if not flags or flags & ~S.KVM_MSR_FILTER_RANGE_VALID_MASK:
            raise ValueError(f"flags={flags!r}: expected KVM_MSR_FILTER_READ and/or KVM_MSR_FILTER_WRITE")
        _uint("base", base, _U32)
        _uint("nmsrs", nmsrs, 8 * S.KVM_MSR_FILTER_MAX_BITMAP_SIZE)
        if nmsrs == 0 or (nmsrs + 7) // 8 > len(bitmap):
            raise ValueError(f"nmsrs={nmsrs} needs a bitmap of {(nmsrs + 7) // 8} bytes "
                             f"(got {len(bitmap)}) and must be > 0")
        for k, v in (("flags", flags), ("base", base), ("bitmap", bitmap), ("nmsrs", nmsrs)):
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"MsrFilterRange is frozen: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"MsrFilterRange is frozen: cannot delete {name!r}")

    def _key(self):
        return (self.flags, self.base, self.bitmap, self.nmsrs)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"MsrFilterRange(flags={self.flags!r}, base={self.base!r}, bitmap={self.bitmap!r}, "
                f"nmsrs={self.nmsrs!r})")

    @classmethod
    def _of(cls, msrs: Iterable[int], flags: int, allowed: bool) -> "MsrFilterRange":
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
    def deny(cls, msrs: Iterable[int], flags: int = S.KVM_MSR_FILTER_READ | S.KVM_MSR_FILTER_WRITE
             ) -> "MsrFilterRange":
        """A range from min(msrs) to max(msrs) that denies *msrs* and allows the rest of it."""
        return cls._of(msrs, flags, False)

    @classmethod
    def allow(cls, msrs: Iterable[int], flags: int = S.KVM_MSR_FILTER_READ | S.KVM_MSR_FILTER_WRITE
              ) -> "MsrFilterRange":
        """A range from min(msrs) to max(msrs) that allows *msrs* and denies the rest of it."""
        return cls._of(msrs, flags, True)
