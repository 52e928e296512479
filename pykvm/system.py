"""The system fd: ``/dev/kvm`` itself (``Kvm``).

Queries that concern the host rather than one VM live here: the API version,
capabilities, the vCPU mmap size, the CPUID the host can offer guests and the
MSR lists.  ``create_vm()`` returns a :class:`~pykvm.vm.Vm`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ._check import U32 as _U32
from ._check import flex_fits
from ._check import uint as _uint
from .errors import KvmError, KvmUnavailable
from .fd import CheckExtension, DeviceAttrs, FdObject, grow_on_e2big, ioctl
from .host import diagnose
from .uapi import ioctls as I
from .uapi import structs as S
from .uapi.enums import Cap
from .vcpu.msrs import msrs_buffer

if TYPE_CHECKING:  # pragma: no cover
    from .vm import Vm

__all__ = ["KVM_API_VERSION", "Kvm"]

KVM_API_VERSION = 12
_MAX_CPUID_ENTRIES = 1 << 16
_MAX_MSR_LIST = 1 << 16


class Kvm(CheckExtension, DeviceAttrs, FdObject):
    """An open ``/dev/kvm`` (``O_RDWR | O_CLOEXEC``).

    Raises :class:`~pykvm.errors.KvmUnavailable` with a hint when the path is
    missing, not the KVM device, not permitted, or speaks another API version.
    """

    _what = "KVM system fd"
    # System attributes (KVM_CAP_SYS_ATTRIBUTES) are absent on older kernels: no error.
    _ATTR_ABSENT = (errno.ENXIO, errno.ENOTTY, errno.EINVAL)

    def __init__(self, path: str = "/dev/kvm") -> None:
        # An untyped caller's int: os.stat/os.open would take it as an fd number.
        if isinstance(path, int):  # type: ignore[unreachable]
            raise TypeError(f"path must be a str, bytes or os.PathLike, not {type(path).__name__}")
        path = os.fspath(path)
        self.path = path
        # Look before opening: opening some other device has side effects (a
        # watchdog arms, a tty may block for carrier), so only the KVM device
        # node (misc char 10:232) is ever opened.
        try:
            st = os.stat(path)
        except OSError as e:
            raise KvmUnavailable(e.errno, f"open({path})", diagnose.explain(path, e.errno)) from None
        if stat.S_ISDIR(st.st_mode):
            raise KvmUnavailable(errno.EISDIR, f"open({path})", diagnose.explain(path, errno.EISDIR))
        if not stat.S_ISCHR(st.st_mode):
            raise KvmUnavailable(errno.ENODEV, f"open({path})",
                                 f"{path} is not a character device, so not the KVM device")
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if rdev != (diagnose.KVM_MAJOR, diagnose.KVM_MINOR):
            raise KvmUnavailable(errno.ENODEV, f"open({path})",
                                 f"{path} is not the KVM device (it is character device "
                                 f"{rdev[0]}:{rdev[1]}; KVM is {diagnose.KVM_MAJOR}:{diagnose.KVM_MINOR})")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmUnavailable(e.errno, f"open({path})", diagnose.explain(path, e.errno)) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISCHR(st.st_mode):  # replaced between stat and open
                raise KvmUnavailable(errno.ENODEV, f"open({path})",
                                     f"{path} is not a character device, so not the KVM device")
            try:
                version = ioctl(fd, I.KVM_GET_API_VERSION)
            except KvmError as e:
                raise KvmUnavailable(e.errno, "KVM_GET_API_VERSION",
                                     diagnose.explain(path, errno.ENOTTY)) from None
            if version != KVM_API_VERSION:
                raise KvmUnavailable(errno.EINVAL, "KVM_GET_API_VERSION",
                                     f"{path} speaks KVM API {version}, pykvm needs {KVM_API_VERSION}")
        except BaseException:
            os.close(fd)
            raise
        super().__init__(fd)
        self._api_version = version
        self._mmap_size: int | None = None

    def __repr__(self) -> str:
        return f"<Kvm {self.path} {self._state()}>"

    # -- simple queries -------------------------------------------------------
    @property
    def api_version(self) -> int:
        """``KVM_GET_API_VERSION``: always 12 on any kernel pykvm accepts."""
        return self._ioctl(I.KVM_GET_API_VERSION)

    @property
    def vcpu_mmap_size(self) -> int:
        """``KVM_GET_VCPU_MMAP_SIZE``: bytes to map from each vCPU fd."""
        if self._mmap_size is None:
            self._mmap_size = self._ioctl(I.KVM_GET_VCPU_MMAP_SIZE)
        return self._mmap_size

    @property
    def nr_vcpus(self) -> int:
        """Recommended vCPU count (``KVM_CAP_NR_VCPUS``)."""
        return self.check_extension(Cap.NR_VCPUS)

    @property
    def max_vcpus(self) -> int:
        """Maximum vCPUs per VM (``KVM_CAP_MAX_VCPUS``, else NR_VCPUS)."""
        return self.check_extension(Cap.MAX_VCPUS) or self.nr_vcpus

    @property
    def nr_memslots(self) -> int:
        """Memory slots per address space (``KVM_CAP_NR_MEMSLOTS``)."""
        return self.check_extension(Cap.NR_MEMSLOTS)

    # -- VM creation ------------------------------------------------------------
    def create_vm(self, vm_type: int = 0) -> Vm:
        """``KVM_CREATE_VM``: a new VM of *vm_type* (0 = default x86 VM)."""
        from .vm import Vm

        fd = self._ioctl(I.KVM_CREATE_VM, _uint("vm_type", vm_type))
        return Vm._from_fd(fd, self.vcpu_mmap_size, self)

    # -- CPUID -------------------------------------------------------------------
    def _get_cpuid(self, request: int) -> list[S.kvm_cpuid_entry2]:
        def attempt(n: int) -> list[S.kvm_cpuid_entry2]:
            buf = S.flex(S.kvm_cpuid2, n)
            self._ioctl(request, buf)
            flex_fits(buf, "nent", "entries")  # KVM never raises nent; check before reading
            return [S.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

        return grow_on_e2big(attempt, 128, _MAX_CPUID_ENTRIES)

    def supported_cpuid(self) -> list[S.kvm_cpuid_entry2]:
        """``KVM_GET_SUPPORTED_CPUID``: the CPUID leaves KVM can give a guest.

        The buffer grows on E2BIG, so no fixed entry limit applies.  Pass the
        list (possibly edited) to :meth:`Vcpu.set_cpuid2 <pykvm.vcpu.Vcpu.set_cpuid2>`.
        """
        return self._get_cpuid(I.KVM_GET_SUPPORTED_CPUID)

    def emulated_cpuid(self) -> list[S.kvm_cpuid_entry2]:
        """``KVM_GET_EMULATED_CPUID``: leaves KVM emulates (possibly slowly)."""
        return self._get_cpuid(I.KVM_GET_EMULATED_CPUID)

    def supported_hv_cpuid(self) -> list[S.kvm_cpuid_entry2]:
        """``KVM_GET_SUPPORTED_HV_CPUID`` on the system fd (``KVM_CAP_SYS_HYPERV_CPUID``)."""
        return self._get_cpuid(I.KVM_GET_SUPPORTED_HV_CPUID)

    # -- MSRs ----------------------------------------------------------------------
    def _msr_list(self, request: int) -> list[int]:
        # KVM answers E2BIG with the count it needs in nmsrs; the list may also
        # grow between calls, so the buffer grows until it fits.
        needed = [0]

        def attempt(n: int) -> list[int]:
            buf = S.flex(S.kvm_msr_list, n)
            try:
                self._ioctl(request, buf)
            except KvmError:
                needed[0] = buf.nmsrs
                raise
            flex_fits(buf, "nmsrs", "indices")
            return list(buf.indices[: buf.nmsrs])

        return grow_on_e2big(attempt, 0, _MAX_MSR_LIST,
                             lambda n: min(max(needed[0], n * 2, 1), _MAX_MSR_LIST))

    def msr_index_list(self) -> list[int]:
        """``KVM_GET_MSR_INDEX_LIST``: MSRs a VMM can save/restore with GET/SET_MSRS."""
        return self._msr_list(I.KVM_GET_MSR_INDEX_LIST)

    def msr_feature_index_list(self) -> list[int]:
        """``KVM_GET_MSR_FEATURE_INDEX_LIST``: feature MSRs readable via :meth:`get_msrs`."""
        return self._msr_list(I.KVM_GET_MSR_FEATURE_INDEX_LIST)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """``KVM_GET_MSRS`` on the system fd: values of feature MSRs.

        Returns ``{index: value}`` for the MSRs the kernel read; it stops at the
        first one it cannot read, so missing keys were not readable.
        """
        indices = [_uint("MSR index", i, _U32) for i in indices]
        buf = msrs_buffer(indices)
        n = self._ioctl(I.KVM_GET_MSRS, buf)
        if not 0 <= n <= len(indices):  # KVM returns how many it read
            raise KvmError(errno.EIO, "KVM_GET_MSRS", f"KVM reported {n} MSRs read of {len(indices)}")
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def mce_cap_supported(self) -> int:
        """``KVM_X86_GET_MCE_CAP_SUPPORTED``: the MCG_CAP bits KVM supports."""
        val = ctypes.c_uint64()
        self._ioctl(I.KVM_X86_GET_MCE_CAP_SUPPORTED, val)
        return val.value

    def vm_types(self) -> list[int]:
        """VM types this host accepts for ``create_vm`` (from ``KVM_CAP_VM_TYPES``)."""
        mask = self.check_extension(Cap.VM_TYPES)
        return [t for t in range(64) if mask >> t & 1] or [0]
