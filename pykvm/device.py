"""In-kernel devices created with ``KVM_CREATE_DEVICE`` (``Device``).

``Vm.create_device(type)`` asks KVM for an emulated device and returns a
:class:`Device` owning the new fd.  A device is configured through *device
attributes*: ``(group, attr)`` pairs whose meaning is defined per device type
(``Documentation/virt/kvm/devices/*.rst``); ``addr`` points to user memory
holding the value (usually a ``__u64``, for VFIO an ``__s32`` fd).

With ``test=True`` (``KVM_CREATE_DEVICE_TEST``) KVM only says whether it could
create the type, and creates nothing.

On x86 the only device type is ``KVM_DEV_TYPE_VFIO`` (present when the kernel
has ``CONFIG_KVM_VFIO``); the others belong to other architectures.
"""

from __future__ import annotations

import ctypes
import enum
import errno
from typing import Union

from ._check import U32 as _U32, U64 as _U64, uint as _u
from .fd import FdObject
from .errors import KvmError
from .uapi import ioctls as I
from .uapi import structs as S

__all__ = ["Device", "DeviceAttrs", "DeviceType", "device_type_name", "KVM_DEV_VFIO_FILE", "KVM_DEV_VFIO_FILE_ADD", "KVM_DEV_VFIO_FILE_DEL"]

KVM_DEV_VFIO_FILE = S.KVM_DEV_VFIO_FILE
KVM_DEV_VFIO_FILE_ADD = S.KVM_DEV_VFIO_FILE_ADD
KVM_DEV_VFIO_FILE_DEL = S.KVM_DEV_VFIO_FILE_DEL



class DeviceType(enum.IntEnum):
    """``enum kvm_device_type`` (``include/uapi/linux/kvm.h``); only ``VFIO`` exists on x86."""

    FSL_MPIC_20 = S.KVM_DEV_TYPE_FSL_MPIC_20
    FSL_MPIC_42 = S.KVM_DEV_TYPE_FSL_MPIC_42
    XICS = S.KVM_DEV_TYPE_XICS
    VFIO = S.KVM_DEV_TYPE_VFIO
    ARM_VGIC_V2 = S.KVM_DEV_TYPE_ARM_VGIC_V2
    FLIC = S.KVM_DEV_TYPE_FLIC
    ARM_VGIC_V3 = S.KVM_DEV_TYPE_ARM_VGIC_V3
    ARM_VGIC_ITS = S.KVM_DEV_TYPE_ARM_VGIC_ITS
    XIVE = S.KVM_DEV_TYPE_XIVE
    ARM_PV_TIME = S.KVM_DEV_TYPE_ARM_PV_TIME
    RISCV_AIA = S.KVM_DEV_TYPE_RISCV_AIA
    LOONGARCH_IPI = S.KVM_DEV_TYPE_LOONGARCH_IPI
    LOONGARCH_EIOINTC = S.KVM_DEV_TYPE_LOONGARCH_EIOINTC
    LOONGARCH_PCHPIC = S.KVM_DEV_TYPE_LOONGARCH_PCHPIC


def device_type_name(t: int) -> str:
    """``KVM_DEV_TYPE_<NAME>`` for a known type number, else ``KVM_DEV_TYPE_<n>?``."""
    try:
        return "KVM_DEV_TYPE_" + DeviceType(t).name
    except ValueError:
        return f"KVM_DEV_TYPE_{t}?"


class DeviceAttrs:
    """``KVM_{HAS,SET,GET}_DEVICE_ATTR``, shared by every fd kind that has attributes.

    Device fds, vCPU fds (``KVM_CAP_VCPU_ATTRIBUTES``: TSC control on x86) and
    the system fd (``KVM_CAP_SYS_ATTRIBUTES``) take the same ``kvm_device_attr``;
    the meaning of *(group, attr)* depends on the fd.  Subclasses provide
    ``_ioctl`` (:class:`~pykvm.fd.FdObject`).
    """

    #: errnos for which ``has_device_attr`` answers False instead of raising
    _ATTR_ABSENT: tuple = (errno.ENXIO,)

    def _attr(self, group: int, attr: int, addr: int = 0, flags: int = 0) -> S.kvm_device_attr:
        return S.kvm_device_attr(flags=_u("flags", flags, _U32), group=_u("group", group, _U32),
                                 attr=_u("attr", attr, _U64), addr=addr)

    def has_device_attr(self, group: int, attr: int) -> bool:
        """``KVM_HAS_DEVICE_ATTR``: does the device know attribute *(group, attr)*?

        KVM answers 0 (yes) or ENXIO (no); any other error is raised.
        """
        try:
            self._ioctl(I.KVM_HAS_DEVICE_ATTR, self._attr(group, attr))
            return True
        except KvmError as e:
            if e.errno in self._ATTR_ABSENT:
                return False
            raise

    def set_device_attr(self, group: int, attr: int,
                        value: Union[int, bytes, bytearray, ctypes._SimpleCData, ctypes.Structure, None] = None,
                        *, flags: int = 0) -> None:
        """``KVM_SET_DEVICE_ATTR``: write attribute *(group, attr)*.

        *value* is what ``addr`` points to: an int is passed as a ``__u64``,
        ``bytes``/ctypes objects as they are (e.g. ``ctypes.c_int32(fd)`` for
        ``KVM_DEV_VFIO_FILE_ADD``), ``None`` passes ``addr = 0``.  KVM refuses
        with ENXIO an attribute the device does not know, EPERM one it cannot set.
        """
        keep, addr = _buffer(value)
        self._ioctl(I.KVM_SET_DEVICE_ATTR, self._attr(group, attr, addr, flags))
        del keep

    def get_device_attr(self, group: int, attr: int,
                        value: Union[ctypes._SimpleCData, ctypes.Structure, bytearray, None] = None,
                        *, flags: int = 0) -> Union[int, ctypes._SimpleCData, ctypes.Structure, bytearray]:
        """``KVM_GET_DEVICE_ATTR``: read attribute *(group, attr)*.

        KVM writes the value to ``addr``: by default into a ``__u64`` whose
        value is returned as an int; pass a ctypes object or ``bytearray`` of
        the attribute's size to get it filled and returned instead.  Devices
        without a read accessor (VFIO) answer EPERM, unknown attributes ENXIO.
        """
        if value is None:
            out = ctypes.c_uint64()
            self._ioctl(I.KVM_GET_DEVICE_ATTR, self._attr(group, attr, ctypes.addressof(out), flags))
            return out.value
        if isinstance(value, (bytes, int)):
            raise TypeError("get_device_attr needs a writable buffer (ctypes object or bytearray), not "
                            f"{type(value).__name__}")
        keep, addr = _buffer(value)
        self._ioctl(I.KVM_GET_DEVICE_ATTR, self._attr(group, attr, addr, flags))
        del keep
        return value


class Device(DeviceAttrs, FdObject):
    """An in-kernel device: the fd returned by ``KVM_CREATE_DEVICE``.

    Create with :meth:`Vm.create_device <pykvm.vm.Vm.create_device>`; the VM
    closes it when it closes.  ``type`` is the :class:`DeviceType` number.
    """

    _what = "device"

    def __init__(self, fd: int, dev_type: int, vm=None) -> None:
        super().__init__(fd)
        self.type = dev_type
        self.vm = vm

    def __repr__(self) -> str:
        return f"<Device {device_type_name(self.type)} {self._state()}>"

    # The kvm-ioctls style names are the mixin's; these are the short ones.
    has_attr = DeviceAttrs.has_device_attr
    set_attr = DeviceAttrs.set_device_attr
    get_attr = DeviceAttrs.get_device_attr


def _buffer(value) -> tuple:
    """(object to keep alive, address) for a device attribute value."""
    if value is None:
        return None, 0
    if isinstance(value, bool):
        raise TypeError("attribute value must be an int, bytes or a ctypes object, not bool")
    if isinstance(value, int):
        buf = ctypes.c_uint64(_u("value", value, _U64))
        return buf, ctypes.addressof(buf)
    if isinstance(value, bytes):
        buf = ctypes.create_string_buffer(value, len(value))
        return buf, ctypes.addressof(buf)
    if isinstance(value, bytearray):
        buf = (ctypes.c_char * len(value)).from_buffer(value)
        return buf, ctypes.addressof(buf)
    if isinstance(value, (ctypes._SimpleCData, ctypes.Structure, ctypes.Union, ctypes.Array)):
        return value, ctypes.addressof(value)
    raise TypeError(f"attribute value must be an int, bytes, bytearray or a ctypes object, "
                    f"not {type(value).__name__}")

