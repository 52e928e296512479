"""In-kernel devices created with ``KVM_CREATE_DEVICE`` (``Device``).

``Vm.create_device(type)`` asks KVM for an emulated device and returns a
:class:`Device` owning the new fd.  A device is configured through *device
attributes*: ``(group, attr)`` pairs whose meaning is defined per device type
(``Documentation/virt/kvm/devices/*.rst``); ``addr`` points to user memory
holding the value (usually a ``__u64``, for VFIO an ``__s32`` fd).

``DeviceAttrs`` (the attribute ioctls) lives in :mod:`pykvm.fd` and is
re-exported here.  With ``test=True`` (``KVM_CREATE_DEVICE_TEST``) KVM only says whether it could
create the type, and creates nothing.

On x86 the only device type is ``KVM_DEV_TYPE_VFIO`` (present when the kernel
has ``CONFIG_KVM_VFIO``); the others belong to other architectures.
"""

from __future__ import annotations

import enum

from .fd import DeviceAttrs, FdObject
from .uapi import structs as S

__all__ = ["KVM_DEV_VFIO_FILE", "KVM_DEV_VFIO_FILE_ADD", "KVM_DEV_VFIO_FILE_DEL", "Device", "DeviceAttrs", "DeviceType", "device_type_name"]

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


class Device(DeviceAttrs, FdObject):
    """An in-kernel device: the fd returned by ``KVM_CREATE_DEVICE``.

    Create with :meth:`Vm.create_device <pykvm.vm.Vm.create_device>`; the VM
    closes it when it closes.  ``type`` is the :class:`DeviceType` number.
    """

    _what = "device"

    def __init__(self, fd: int, dev_type: int, vm: object | None = None) -> None:
        super().__init__(fd)
        self.type = dev_type
        self.vm = vm

    def __repr__(self) -> str:
        return f"<Device {device_type_name(self.type)} {self._state()}>"

    # The kvm-ioctls style names are the mixin's; these are the short ones.
    has_attr = DeviceAttrs.has_device_attr
    set_attr = DeviceAttrs.set_device_attr
    get_attr = DeviceAttrs.get_device_attr
