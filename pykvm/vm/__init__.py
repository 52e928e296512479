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
from typing import TYPE_CHECKING, Any

from .._check import U32 as _U32
from .._check import expect as _expect
from .._check import uint as _uint
from ..device import Device
from ..errors import KvmClosedError, KvmError
from ..fd import Capabilities, FdObject
from ..uapi import ioctls, structs
from ..vcpu import Vcpu, create_vcpu
from .coalesced import CoalescedIo, CoalescedRing
from .dirty import DirtyLog, DirtyRing
from .eventfd import EventFd, FdLike, IoEvents, fd_of
from .irq import Interrupts
from .memory import GuestMemfd, GuestMemory, MemorySlots
from .msr_filter import MsrFilterRange, X86Policies

if TYPE_CHECKING:  # pragma: no cover
    from ..stats import Stats

__all__ = ["CoalescedRing", "DirtyRing", "EventFd", "GuestMemfd", "GuestMemory", "MsrFilterRange", "Vm"]


class Vm(Capabilities, MemorySlots, DirtyLog, Interrupts, IoEvents, CoalescedIo, X86Policies, FdObject):
    """A virtual machine: an fd from ``KVM_CREATE_VM``.

    The ioctls are grouped by concern in the modules of this package and mixed
    in here: :class:`~pykvm.vm.memory.MemorySlots`,
    :class:`~pykvm.vm.dirty.DirtyLog`, :class:`~pykvm.vm.irq.Interrupts`,
    :class:`~pykvm.vm.eventfd.IoEvents`, :class:`~pykvm.vm.coalesced.CoalescedIo`,
    :class:`~pykvm.vm.msr_filter.X86Policies`; ``check_extension`` and
    ``enable_cap`` come from :class:`pykvm.fd.Capabilities`.
    """

    _what = "VM"

    @classmethod
    def _from_fd(cls, fd: int, vcpu_mmap_size: int, kvm: Any = None) -> Vm:
        vm = cls.__new__(cls)
        FdObject.__init__(vm, fd)
        vm._vcpu_mmap_size = vcpu_mmap_size
        vm._memory = {}         # slot -> GuestMemory made by add_memory
        vm._slots = {}          # slot -> (gpa, size, userspace_addr, flags)
        vm._regions = {}        # slot -> the kvm_userspace_memory_region last passed
        vm._parked = []         # unmapped only after the VM fd is closed (see remove_memory)
        vm._vcpus = {}
        vm._children = weakref.WeakSet()  # devices, stats fds, guest_memfds ...
        vm._max_slots = None
        vm._dirty_ring_size = 0
        vm._dirty_rings = {}
        return vm

    def __init__(self, *a: object, **k: object) -> None:  # pragma: no cover - guidance only
        raise TypeError("create a Vm with Kvm().create_vm()")

    def __repr__(self) -> str:
        return f"<Vm {self._state()} vcpus={len(self._vcpus)} slots={len(self._slots)}>"

    # -- vCPUs -------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        """``KVM_CREATE_VCPU``: a new vCPU with APIC id *vcpu_id*."""
        _uint("vcpu_id", vcpu_id, _U32)
        if self._fd < 0:
            raise KvmClosedError(self._what, "KVM_CREATE_VCPU")
        if vcpu_id in self._vcpus:
            raise KvmError(errno.EEXIST, "KVM_CREATE_VCPU", f"vCPU {vcpu_id} already exists")
        # A set-up failure after KVM_CREATE_VCPU keeps the fd parked for a retry:
        # KVM frees a vCPU only with the VM, so a closed fd would lose the id for good.
        vcpu = create_vcpu(self, vcpu_id, self._vcpu_mmap_size,
                           lambda: self._ioctl(ioctls.KVM_CREATE_VCPU, vcpu_id))
        self._vcpus[vcpu_id] = vcpu
        return vcpu

    @property
    def vcpus(self) -> list[Vcpu]:
        """The vCPUs created so far, by id."""
        return [self._vcpus[k] for k in sorted(self._vcpus)]

    # -- x86 set-up ------------------------------------------------------------------------
    def set_tss_address(self, addr: int) -> None:
        """``KVM_SET_TSS_ADDR``: 3 pages of guest physical space KVM needs on Intel (e.g. 0xfffbd000)."""
        self._ioctl(ioctls.KVM_SET_TSS_ADDR, _uint("addr", addr, 0xFFFFFFFF))

    def set_identity_map_address(self, addr: int) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR``: one page for the EPT identity map (Intel real mode)."""
        self._ioctl(ioctls.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(_uint("addr", addr)))


    # -- clock -------------------------------------------------------------------------------
    def get_clock(self) -> structs.kvm_clock_data:
        """``KVM_GET_CLOCK``: the guest's kvmclock in ns (``clock``) and ``flags``.

        ``flags`` has ``KVM_CLOCK_TSC_STABLE`` when the guest clock is stable
        across vCPUs, and ``KVM_CLOCK_REALTIME`` / ``KVM_CLOCK_HOST_TSC`` when
        ``realtime`` / ``host_tsc`` were sampled with it (host on a TSC clocksource).
        """
        c = structs.kvm_clock_data()
        self._ioctl(ioctls.KVM_GET_CLOCK, c)
        return c

    def set_clock(self, clock: int | structs.kvm_clock_data, *, flags: int = 0, realtime: int = 0) -> None:
        """``KVM_SET_CLOCK``: set the guest's kvmclock to *clock* ns.

        With ``flags=KVM_CLOCK_REALTIME`` and *realtime* (host ``CLOCK_REALTIME``
        ns, e.g. from a migration source's ``get_clock()``), KVM adds the time
        elapsed since *realtime* (``KVM_CAP_ADJUST_CLOCK`` lists the flags
        accepted).  A ``kvm_clock_data`` is passed as it is.
        """
        if isinstance(clock, structs.kvm_clock_data):
            if flags or realtime:
                raise ValueError("pass flags/realtime inside the kvm_clock_data, not beside it")
            c = clock
        else:
            c = structs.kvm_clock_data(clock=_uint("clock", clock), flags=_uint("flags", flags, _U32),
                                 realtime=_uint("realtime", realtime))
        self._ioctl(ioctls.KVM_SET_CLOCK, c)


    def set_nr_mmu_pages(self, n: int) -> None:
        """``KVM_SET_NR_MMU_PAGES``: cap the shadow-MMU page cache at *n* pages (>= 64).

        Only meaningful with shadow paging (``KVM_CAP_MMU_SHADOW_CACHE_CONTROL``);
        the default scales with guest memory.
        """
        self._ioctl(ioctls.KVM_SET_NR_MMU_PAGES, _uint("n", n, _U32))

    def get_nr_mmu_pages(self) -> int:
        """``KVM_GET_NR_MMU_PAGES``: the shadow-MMU page limit.

        Removed from the kernel in Linux 6.x (ENOTTY there); kept for older hosts.
        """
        return self._ioctl(ioctls.KVM_GET_NR_MMU_PAGES)

    # -- devices and statistics ---------------------------------------------------------------
    def create_device(self, dev_type: int, *, test: bool = False) -> Device | None:
        """``KVM_CREATE_DEVICE``: an in-kernel device of *dev_type* (:class:`~pykvm.device.DeviceType`).

        Returns the :class:`~pykvm.device.Device` (closed with the VM).  With
        *test* (``KVM_CREATE_DEVICE_TEST``) KVM creates nothing and this returns
        ``None`` if it could, or raises ENODEV if the type is unknown here.
        """
        dev_type = _uint("dev_type", dev_type, _U32)
        cd = structs.kvm_create_device(type=dev_type,
                                 flags=structs.KVM_CREATE_DEVICE_TEST if test else 0)
        self._ioctl(ioctls.KVM_CREATE_DEVICE, cd)
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

    def get_stats_fd(self) -> Stats:
        """``KVM_GET_STATS_FD``: the VM's binary statistics (:class:`pykvm.stats.Stats`), closed with the VM."""
        from ..stats import open_stats

        if self._fd < 0:
            raise KvmClosedError(self._what, "KVM_GET_STATS_FD")
        st = open_stats(self.fileno())
        self._children.add(st)
        return st

    # -- Hyper-V, Xen, memory encryption -------------------------------------------------------
    def hyperv_eventfd(self, conn_id: int, fd: FdLike, *, deassign: bool = False) -> None:
        """``KVM_HYPERV_EVENTFD``: a guest ``HvSignalEvent`` on *conn_id* signals eventfd *fd*.

        With *deassign* remove it.  Needs ``KVM_CAP_HYPERV_EVENTFD`` (kernels
        built with ``CONFIG_KVM_HYPERV``; ENOTTY elsewhere).
        """
        arg = structs.kvm_hyperv_eventfd(conn_id=_uint("conn_id", conn_id, structs.KVM_HYPERV_CONN_ID_MASK),
                                   fd=fd_of(fd, "fd"),
                                   flags=structs.KVM_HYPERV_EVENTFD_DEASSIGN if deassign else 0)
        self._ioctl(ioctls.KVM_HYPERV_EVENTFD, arg)

    def xen_hvm_config(self, *, flags: int = 0, msr: int = 0, blob_addr_32: int = 0, blob_addr_64: int = 0,
                       blob_size_32: int = 0, blob_size_64: int = 0) -> None:
        """``KVM_XEN_HVM_CONFIG``: Xen HVM emulation (hypercall page MSR, ``KVM_XEN_HVM_CONFIG_*`` flags).

        Needs ``KVM_CAP_XEN_HVM`` (kernels built with ``CONFIG_KVM_XEN``; ENOTTY elsewhere).
        """
        arg = structs.kvm_xen_hvm_config(flags=_uint("flags", flags, _U32), msr=_uint("msr", msr, _U32),
                                   blob_addr_32=_uint("blob_addr_32", blob_addr_32),
                                   blob_addr_64=_uint("blob_addr_64", blob_addr_64),
                                   blob_size_32=_uint("blob_size_32", blob_size_32, 0xFF),
                                   blob_size_64=_uint("blob_size_64", blob_size_64, 0xFF))
        self._ioctl(ioctls.KVM_XEN_HVM_CONFIG, arg)

    def xen_hvm_get_attr(self, attr_type: int) -> structs.kvm_xen_hvm_attr:
        """``KVM_XEN_HVM_GET_ATTR``: read Xen attribute *attr_type* (``u`` holds the raw union)."""
        a = structs.kvm_xen_hvm_attr(type=_uint("attr_type", attr_type, 0xFFFF))
        self._ioctl(ioctls.KVM_XEN_HVM_GET_ATTR, a)
        return a

    def xen_hvm_set_attr(self, attr: structs.kvm_xen_hvm_attr) -> None:
        """``KVM_XEN_HVM_SET_ATTR``: write a Xen attribute."""
        _expect(attr, structs.kvm_xen_hvm_attr)
        self._ioctl(ioctls.KVM_XEN_HVM_SET_ATTR, attr)

    def xen_hvm_evtchn_send(self, port: int, vcpu: int = 0,
                            priority: int = structs.KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL) -> None:
        """``KVM_XEN_HVM_EVTCHN_SEND``: raise Xen event channel *port* on *vcpu*."""
        arg = structs.kvm_irq_routing_xen_evtchn(port=_uint("port", port, _U32), vcpu=_uint("vcpu", vcpu, _U32),
                                           priority=_uint("priority", priority, _U32))
        self._ioctl(ioctls.KVM_XEN_HVM_EVTCHN_SEND, arg)

    def memory_encrypt_op(self, cmd: ctypes.Structure) -> int:
        """``KVM_MEMORY_ENCRYPT_OP``: a vendor command (SEV: ``kvm_sev_cmd``; TDX: ``kvm_tdx_cmd``).

        *cmd* is passed by address and updated by KVM.  ENOTTY on hosts
        without memory encryption.
        """
        if not isinstance(cmd, (ctypes.Structure, ctypes.Union)):
            raise TypeError(f"expected a ctypes structure, got {type(cmd).__name__}")
        return self._ioctl(ioctls.KVM_MEMORY_ENCRYPT_OP, ctypes.addressof(cmd))

    def memory_encrypt_reg_region(self, addr: int, size: int) -> None:
        """``KVM_MEMORY_ENCRYPT_REG_REGION``: pin host range ``[addr, addr+size)`` for an encrypted guest."""
        from .. import coco
        coco.register_region(self, addr, size)

    def memory_encrypt_unreg_region(self, addr: int, size: int) -> None:
        """``KVM_MEMORY_ENCRYPT_UNREG_REGION``: undo :meth:`memory_encrypt_reg_region`."""
        from .. import coco
        coco.unregister_region(self, addr, size)

    def sev_command(self, cmd_id: int, data: ctypes.Structure | None = None,
                    sev_fd: int = 0) -> structs.kvm_sev_cmd:
        """``KVM_MEMORY_ENCRYPT_OP`` with SEV command *cmd_id*; see :func:`pykvm.coco.sev_command`."""
        from .. import coco
        return coco.sev_command(self, cmd_id, data, sev_fd)

    def tdx_command(self, cmd_id: int, data: int | ctypes.Structure | None = None,
                    flags: int = 0) -> structs.kvm_tdx_cmd:
        """``KVM_MEMORY_ENCRYPT_OP`` with TDX command *cmd_id*; see :func:`pykvm.coco.tdx_command`."""
        from .. import coco
        return coco.tdx_command(self, cmd_id, data, flags)

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
        for mem in self._parked:
            mem._unmap()
        self._memory.clear()
        self._parked.clear()
        self._slots.clear()
        self._regions.clear()

    def _after_fork_in_child(self) -> None:
        # The child's copy of guest memory is its own (private anonymous
        # mappings are copied on write): let the child unmap it freely.
        for mem in self._memory.values():
            mem._vm = None

    def _close_inherited(self) -> None:
        # Only fd numbers; each child object gives up its own inherited fd.
        for vcpu in list(self._vcpus.values()):
            vcpu.close()
        for child in list(self._children):
            child.close()


