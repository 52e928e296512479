"""pykvm: a thin, complete Python binding over Linux ``/dev/kvm`` (x86-64).

Two layers:

* :mod:`pykvm.uapi` — the kernel's structures, request numbers and enums,
  under the kernel's names.
* the object layer — :class:`Kvm` (system fd), :class:`Vm`, :class:`Vcpu`,
  :class:`GuestMemory`, typed exits (:mod:`pykvm.exits`) and errors.

A guest in a few lines::

    import pykvm
    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(0x1000, 0x1000)
        mem.write(0, bytes([0xB0, 0x41, 0xE6, 0xE9, 0xF4]))  # mov al,'A'; out 0xe9,al; hlt
        vcpu = vm.create_vcpu()
        sregs = vcpu.get_sregs(); sregs.cs.base = 0; sregs.cs.selector = 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs(); regs.rip = 0x1000; regs.rflags = 2
        vcpu.set_regs(regs)
        print(vcpu.run())   # IoOut(port=0xe9, size=1, count=1, data=b'A')
"""

from typing import TYPE_CHECKING

from . import exits, uapi
from .errors import KvmClosedError, KvmError, KvmInheritedError, KvmUnavailable
from .exits import (
    Debug,
    Exit,
    FailEntry,
    Hlt,
    Hypercall,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    IrqWindowOpen,
    MemoryFault,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    TprAccess,
    Unknown,
    X86Rdmsr,
    X86Wrmsr,
)
from .system import Kvm
from .uapi.enums import Cap, ExitReason
from .vcpu import Vcpu
from .vm import Vm
from .vm.memory import GuestMemory

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover - what __getattr__ loads on first use, for type checkers
    from . import device as device
    from . import dirty as dirty
    from . import gdbstub as gdbstub
    from . import probe as probe
    from . import snapshot as snapshot
    from . import stats as stats
    from . import x86 as x86
    from .device import Device as Device
    from .device import DeviceType as DeviceType
    from .stats import Stats as Stats
    from .vm.coalesced import CoalescedRing as CoalescedRing
    from .vm.dirty import DirtyPages as DirtyPages
    from .vm.dirty import DirtyRing as DirtyRing
    from .vm.eventfd import EventFd as EventFd
    from .vm.memory import GuestMemfd as GuestMemfd
    from .vm.msr_filter import MsrFilterRange as MsrFilterRange

# Heavier parts load on first use so that ``import pykvm`` stays cheap.
_LAZY = ("probe", "stats", "x86", "device", "dirty", "snapshot", "gdbstub")


_LAZY_NAMES = {
    "EventFd": "vm.eventfd", "Device": "device", "DeviceType": "device", "GuestMemfd": "vm.memory",
    "DirtyRing": "vm.dirty", "DirtyPages": "vm.dirty", "CoalescedRing": "vm.coalesced",
    "MsrFilterRange": "vm.msr_filter", "Stats": "stats",
}


def __getattr__(name: str) -> object:
    import importlib

    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'pykvm' has no attribute {name!r}")

__all__ = [
    "Kvm", "Vm", "Vcpu", "GuestMemory", "Cap", "ExitReason",
    "KvmError", "KvmUnavailable", "KvmClosedError", "KvmInheritedError",
    "Exit", "IoOut", "IoIn", "MmioWrite", "MmioRead", "Hlt", "Shutdown", "FailEntry",
    "InternalError", "SystemEvent", "Hypercall", "Debug", "Interrupted", "X86Rdmsr",
    "X86Wrmsr", "MemoryFault", "IrqWindowOpen", "TprAccess", "Unknown", "exits", "uapi",
    *_LAZY_NAMES,
]
