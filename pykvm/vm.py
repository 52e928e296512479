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
from typing import Dict, Iterator, List, Optional, Tuple

from ._ioctl import FdObject
from .errors import KvmError
from .memory import PAGE_SIZE, GuestMemory
from .uapi import ioctls as I
from .uapi import structs as S
from .uapi.enums import Cap
from .vcpu import Vcpu

__all__ = ["Vm"]

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


def _uint(name: str, value: object, limit: int = _U64) -> int:
    """Check that *value* is an int in [0, limit]; return it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= limit:
        raise ValueError(f"{name}={value:#x} out of range [0, {limit:#x}]")
    return value


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
        return vm

    def __init__(self, *a, **k) -> None:  # pragma: no cover - guidance only
        raise TypeError("create a Vm with Kvm().create_vm()")

    def __repr__(self) -> str:
        return f"<Vm {self._state()} vcpus={len(self._vcpus)} slots={len(self._slots)}>"

    # -- capabilities -------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd (may differ from the system fd's)."""
        return self._ioctl(I.KVM_CHECK_EXTENSION, _uint("cap", int(cap), _U32))

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the VM: turn on *cap* with up to four arguments."""
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
        ec = S.kvm_enable_cap(cap=_uint("cap", int(cap), _U32), flags=_uint("flags", flags, _U32))
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
        if self._memory.get(getattr(mem, "slot", None)) is not mem:
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

    # -- closing ------------------------------------------------------------------------------
    def _close_children(self) -> None:
        for child in list(self._children):
            child.close()
        for vcpu in self._vcpus.values():
            vcpu.close()

    def _after_close(self) -> None:
        for mem in self._memory.values():
            mem._unmap()
        self._memory.clear()
        self._slots.clear()
