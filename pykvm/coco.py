"""Confidential computing: SEV / SEV-ES / SEV-SNP and TDX commands, typed.

KVM drives the AMD Secure Processor and the Intel TDX module through one VM
ioctl, ``KVM_MEMORY_ENCRYPT_OP`` (for TDX also a vCPU ioctl).  Its argument
is a command block -- ``struct kvm_sev_cmd`` (``id``, ``data`` = address of the
command's own structure, ``error`` = the firmware's status, ``sev_fd`` = an
open ``/dev/sev``) or ``struct kvm_tdx_cmd`` (``id``, ``flags``, ``data``,
``hw_error``) -- and the command's structure, which the kernel reads and
fills in.  This module builds both from :mod:`pykvm.uapi` and checks that
each command gets the structure the kernel expects (:data:`SEV_COMMANDS`,
:data:`TDX_COMMANDS`).

The rest of the confidential-computing surface:

* VM types (``KVM_CREATE_VM``'s argument): :data:`VM_TYPES`;
  :func:`supported_vm_types` reads ``KVM_CAP_VM_TYPES``.  A VM must be
  created with ``KVM_X86_SEV_VM`` / ``SEV_ES_VM`` / ``SNP_VM`` / ``TDX_VM``
  before any command other than the legacy ``KVM_SEV_INIT`` is accepted.
* x86 system attributes, read with ``KVM_GET_DEVICE_ATTR`` on the
  ``/dev/kvm`` fd: :func:`system_attr` / :func:`has_system_attr`, e.g.
  ``KVM_X86_GRP_SEV`` / ``KVM_X86_SEV_VMSA_FEATURES`` (the VMSA features
  ``KVM_SEV_INIT2`` accepts) and ``KVM_X86_GRP_SYSTEM`` /
  ``KVM_X86_XCOMP_GUEST_SUPP`` (the XSAVE components a guest may use).
* ``KVM_MEMORY_ENCRYPT_REG_REGION`` / ``UNREG_REGION``: pin (unpin) a range
  of guest memory for an SEV guest (:func:`register_region`).

Every function takes an object with ``fileno()`` (a ``Kvm``, ``Vm`` or
``Vcpu``) and raises :class:`~pykvm.errors.KvmError` with a hint on
failure.  Hosts without SEV or TDX (such as this project's) refuse all of
it: ``ENOTTY`` or ``EINVAL`` from ``KVM_MEMORY_ENCRYPT_OP``, ``ENXIO`` from
the attribute queries.
"""

from __future__ import annotations

import ctypes
import errno
from typing import Protocol, cast

from . import fd as _fd
from .errors import KvmError, hint_for
from .uapi import consts, ioctls
from .uapi import kvm as uapi_kvm
from .uapi import x86 as uapi_x86
from .uapi.enums import Cap

__all__ = [
    "HINTS",
    "SEV_COMMANDS",
    "TDX_COMMANDS",
    "VM_TYPES",
    "has_system_attr",
    "register_region",
    "sev_command",
    "sev_vmsa_features",
    "supported_vm_types",
    "system_attr",
    "tdx_capabilities",
    "tdx_command",
    "unregister_region",
]


class HasFileno(Protocol):
    def fileno(self) -> int: ...


#: KVM_CREATE_VM types on x86 (``KVM_X86_*_VM``).
VM_TYPES: dict[str, int] = {
    "default": consts.KVM_X86_DEFAULT_VM,
    "sw_protected": consts.KVM_X86_SW_PROTECTED_VM,
    "sev": consts.KVM_X86_SEV_VM,
    "sev_es": consts.KVM_X86_SEV_ES_VM,
    "snp": consts.KVM_X86_SNP_VM,
    "tdx": consts.KVM_X86_TDX_VM,
}

_S = uapi_x86

#: SEV command id -> the structure its ``data`` points to (None: no data).
#: From Documentation/virt/kvm/x86/amd-memory-encryption.rst.
SEV_COMMANDS: dict[int, type | None] = {
    consts.KVM_SEV_INIT: None,
    consts.KVM_SEV_ES_INIT: None,
    consts.KVM_SEV_INIT2: _S.kvm_sev_init,
    consts.KVM_SEV_LAUNCH_START: _S.kvm_sev_launch_start,
    consts.KVM_SEV_LAUNCH_UPDATE_DATA: _S.kvm_sev_launch_update_data,
    consts.KVM_SEV_LAUNCH_UPDATE_VMSA: None,
    consts.KVM_SEV_LAUNCH_SECRET: _S.kvm_sev_launch_secret,
    consts.KVM_SEV_LAUNCH_MEASURE: _S.kvm_sev_launch_measure,
    consts.KVM_SEV_LAUNCH_FINISH: None,
    consts.KVM_SEV_SEND_START: _S.kvm_sev_send_start,
    consts.KVM_SEV_SEND_UPDATE_DATA: _S.kvm_sev_send_update_data,
    consts.KVM_SEV_SEND_FINISH: None,
    consts.KVM_SEV_SEND_CANCEL: None,
    consts.KVM_SEV_RECEIVE_START: _S.kvm_sev_receive_start,
    consts.KVM_SEV_RECEIVE_UPDATE_DATA: _S.kvm_sev_receive_update_data,
    consts.KVM_SEV_RECEIVE_FINISH: None,
    consts.KVM_SEV_GUEST_STATUS: _S.kvm_sev_guest_status,
    consts.KVM_SEV_DBG_DECRYPT: _S.kvm_sev_dbg,
    consts.KVM_SEV_DBG_ENCRYPT: _S.kvm_sev_dbg,
    consts.KVM_SEV_GET_ATTESTATION_REPORT: _S.kvm_sev_attestation_report,
    consts.KVM_SEV_SNP_LAUNCH_START: _S.kvm_sev_snp_launch_start,
    consts.KVM_SEV_SNP_LAUNCH_UPDATE: _S.kvm_sev_snp_launch_update,
    consts.KVM_SEV_SNP_LAUNCH_FINISH: _S.kvm_sev_snp_launch_finish,
    consts.KVM_SEV_SNP_ENABLE_REQ_CERTS: None,
    # In the kernel's enum, but KVM has no handler: refused with EINVAL.
    consts.KVM_SEV_SEND_UPDATE_VMSA: None,
    consts.KVM_SEV_RECEIVE_UPDATE_VMSA: None,
    consts.KVM_SEV_CERT_EXPORT: None,
}

#: TDX command id -> (fd kind, structure its ``data`` points to, or int for
#: a value passed in ``data`` itself).  From Documentation/virt/kvm/x86/intel-tdx.rst.
TDX_COMMANDS: dict[int, tuple[str, type | None]] = {
    consts.KVM_TDX_CAPABILITIES: ("vm", _S.kvm_tdx_capabilities),
    consts.KVM_TDX_INIT_VM: ("vm", _S.kvm_tdx_init_vm),
    consts.KVM_TDX_INIT_VCPU: ("vcpu", int),
    consts.KVM_TDX_INIT_MEM_REGION: ("vcpu", _S.kvm_tdx_init_mem_region),
    consts.KVM_TDX_FINALIZE_VM: ("vm", None),
    consts.KVM_TDX_GET_CPUID: ("vcpu", _S.kvm_cpuid2),
}

#: Hints that say more than pykvm.errors' general table in this module's context
#: (ioctl, errno) -> text; everything else comes from :data:`pykvm.errors.HINTS`.
HINTS: dict[tuple[str, int], str] = {
    ("KVM_GET_DEVICE_ATTR", errno.ENXIO):
        "this host's KVM does not have this x86 attribute group/attribute "
        "(KVM_X86_GRP_SEV exists only where SEV is enabled)",
    ("KVM_CREATE_VM", errno.EINVAL):
        "this VM type is not supported here (see KVM_CAP_VM_TYPES)",
}


def _raise(err: int, request: int, extra: str = "") -> KvmError:
    name = ioctls.ioctl_name(request)
    hint = HINTS.get((name, err)) or hint_for(name, err)
    if extra:
        hint = f"{hint}; {extra}" if hint else extra
    return _fd.raise_error(err, request, hint)


def _ioctl(obj: HasFileno, request: int, arg: int | ctypes.Structure, extra: str = "") -> int:
    fd = obj.fileno()  # a closed object raises KvmClosedError here, unchanged
    try:
        return _fd.ioctl(fd, request, arg)
    except KvmError as e:
        raise _raise(e.errno or 0, request, extra) from None


def supported_vm_types(kvm: HasFileno) -> set[int]:
    """VM types this host can create (``KVM_CAP_VM_TYPES`` bit mask; {0} without the cap)."""
    mask = _ioctl(kvm, ioctls.KVM_CHECK_EXTENSION, int(Cap.VM_TYPES))
    return {t for t in range(64) if mask >> t & 1} or {consts.KVM_X86_DEFAULT_VM}


def _check_u32(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} must be an int in 0..0xffffffff, not {value!r}")
    return value


def _check_u64(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64:
        raise ValueError(f"{name} must be an unsigned 64-bit int, not {value!r}")
    return value


def system_attr(kvm: HasFileno, group: int, attr: int) -> int:
    """``KVM_GET_DEVICE_ATTR`` on the system fd: the 64-bit value of an x86 attribute.

    *group* is ``KVM_X86_GRP_SYSTEM`` or ``KVM_X86_GRP_SEV``; *attr* e.g.
    ``KVM_X86_XCOMP_GUEST_SUPP``, ``KVM_X86_SEV_VMSA_FEATURES``,
    ``KVM_X86_SNP_POLICY_BITS``.  ``ENXIO`` when the host lacks it.
    """
    value = ctypes.c_uint64(0)
    da = uapi_kvm.kvm_device_attr(group=_check_u32("group", group), attr=_check_u64("attr", attr),
                                  addr=ctypes.addressof(value))
    _ioctl(kvm, ioctls.KVM_GET_DEVICE_ATTR, da)
    return value.value


def has_system_attr(kvm: HasFileno, group: int, attr: int) -> bool:
    """``KVM_HAS_DEVICE_ATTR`` on the system fd (False on ``ENXIO``)."""
    da = uapi_kvm.kvm_device_attr(group=_check_u32("group", group), attr=_check_u64("attr", attr))
    fd = kvm.fileno()  # a closed object raises KvmClosedError here, unchanged
    try:
        _fd.ioctl(fd, ioctls.KVM_HAS_DEVICE_ATTR, da)
    except KvmError as e:
        if e.errno in (errno.ENXIO, errno.EINVAL):
            return False
        raise _raise(e.errno or 0, ioctls.KVM_HAS_DEVICE_ATTR) from None
    return True


def sev_vmsa_features(kvm: HasFileno) -> int:
    """``KVM_X86_GRP_SEV`` / ``KVM_X86_SEV_VMSA_FEATURES``: the features ``KVM_SEV_INIT2`` accepts."""
    return system_attr(kvm, consts.KVM_X86_GRP_SEV, consts.KVM_X86_SEV_VMSA_FEATURES)


def sev_command(vm: HasFileno, cmd_id: int, data: ctypes.Structure | None = None,
                sev_fd: int = 0) -> _S.kvm_sev_cmd:
    """Issue SEV command *cmd_id* (``KVM_SEV_*``) on *vm* with its structure *data*.

    *data* must be an instance of ``SEV_COMMANDS[cmd_id]`` (the kernel fills
    it in for the query commands); *sev_fd* is an open ``/dev/sev`` where the
    command needs one (``SEND_START``, ``RECEIVE_START`` ...).  Returns the
    command block; on failure the KvmError's hint names the firmware status
    (``error``), which the kernel writes even when the ioctl fails.
    """
    if cmd_id not in SEV_COMMANDS:
        raise ValueError(f"unknown SEV command {cmd_id!r}")
    want = SEV_COMMANDS[cmd_id]
    if want is None and data is not None:
        raise TypeError(f"SEV command {cmd_id} takes no data")
    if want is not None and not isinstance(data, want):
        raise TypeError(f"SEV command {cmd_id} takes a {want.__name__}, not {type(data).__name__}")
    cmd = _S.kvm_sev_cmd(id=cmd_id, data=ctypes.addressof(data) if data is not None else 0,
                         sev_fd=_check_u32("sev_fd", sev_fd))
    fd = vm.fileno()  # a closed object raises KvmClosedError here, unchanged
    try:
        # The address, not the buffer: the kernel writes cmd.error in place,
        # also when the call fails.
        _fd.ioctl(fd, ioctls.KVM_MEMORY_ENCRYPT_OP, ctypes.addressof(cmd))
    except KvmError as e:
        extra = f"firmware status {cmd.error:#x}" if cmd.error else ""
        raise _raise(e.errno or 0, ioctls.KVM_MEMORY_ENCRYPT_OP, extra) from None
    return cmd


def tdx_command(target: HasFileno, cmd_id: int,
                data: int | ctypes.Structure | None = None, flags: int = 0) -> _S.kvm_tdx_cmd:
    """Issue TDX command *cmd_id* (``KVM_TDX_*``) on a VM or vCPU (see :data:`TDX_COMMANDS`).

    ``KVM_TDX_INIT_VCPU`` takes an int (the vCPU's initial RCX); the others
    their structure or nothing.  Returns the command block (``hw_error`` is
    the TDX module's status).
    """
    if cmd_id not in TDX_COMMANDS:
        raise ValueError(f"unknown TDX command {cmd_id!r}")
    _kind, want = TDX_COMMANDS[cmd_id]
    if want is None:
        if data is not None:
            raise TypeError(f"TDX command {cmd_id} takes no data")
        address = 0
    elif want is int:
        if not isinstance(data, int) or isinstance(data, bool) or not 0 <= data < 2**64:
            raise TypeError(f"TDX command {cmd_id} takes a 64-bit int")
        address = data
    else:
        if not isinstance(data, want):
            raise TypeError(f"TDX command {cmd_id} takes a {want.__name__}, not {type(data).__name__}")
        address = ctypes.addressof(cast(ctypes.Structure, data))
    cmd = _S.kvm_tdx_cmd(id=cmd_id, flags=_check_u32("flags", flags), data=address)
    fd = target.fileno()  # a closed object raises KvmClosedError here, unchanged
    try:
        _fd.ioctl(fd, ioctls.KVM_MEMORY_ENCRYPT_OP, ctypes.addressof(cmd))
    except KvmError as e:
        extra = f"TDX module status {cmd.hw_error:#x}" if cmd.hw_error else ""
        raise _raise(e.errno or 0, ioctls.KVM_MEMORY_ENCRYPT_OP, extra) from None
    return cmd


def tdx_capabilities(vm: HasFileno, n_cpuid: int = 256) -> _S.kvm_tdx_capabilities:
    """``KVM_TDX_CAPABILITIES``: what the TDX module supports.

    The structure ends in a ``kvm_cpuid2`` whose flexible array gets room for
    *n_cpuid* leaves (``cpuid.nent`` set; the kernel answers E2BIG if short).
    """
    if not isinstance(n_cpuid, int) or isinstance(n_cpuid, bool) or not 0 < n_cpuid <= 4096:
        raise ValueError(f"n_cpuid must be an int in 1..4096, not {n_cpuid!r}")
    sized = type(f"kvm_tdx_capabilities[{n_cpuid}]", (_S.kvm_tdx_capabilities,),
                 {"_fields_": [("cpuid_entries", _S.kvm_cpuid_entry2 * n_cpuid)],
                  "_anonymous_": ()})
    caps = cast(_S.kvm_tdx_capabilities, sized())
    caps.cpuid.nent = n_cpuid
    tdx_command(vm, consts.KVM_TDX_CAPABILITIES, caps)
    return caps


def _region(addr: int, size: int) -> ctypes.Structure:
    return uapi_kvm.kvm_enc_region(addr=_check_u64("addr", addr), size=_check_u64("size", size))


def register_region(vm: HasFileno, addr: int, size: int) -> None:
    """``KVM_MEMORY_ENCRYPT_REG_REGION``: pin *size* bytes of user memory at *addr* (SEV)."""
    _ioctl(vm, ioctls.KVM_MEMORY_ENCRYPT_REG_REGION, _region(addr, size))


def unregister_region(vm: HasFileno, addr: int, size: int) -> None:
    """``KVM_MEMORY_ENCRYPT_UNREG_REGION``: unpin a range registered before."""
    _ioctl(vm, ioctls.KVM_MEMORY_ENCRYPT_UNREG_REGION, _region(addr, size))
