"""What the :class:`~pykvm.vm.Vm` mixins share, declared once for type checkers.

Each mixin (memory slots, dirty logging, interrupts, ioeventfds, coalesced
I/O, x86 policies) uses the VM's fd, its ``_ioctl`` and some of the state
``Vm._from_fd`` sets.  This class only declares them (annotations, no
values): at run time it adds nothing to a ``Vm``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..errors import KvmClosedError
    from ..fd import FdObject
    from ..uapi import structs
    from ..vcpu import Vcpu
    from .dirty import DirtyRing
    from .memory import GuestMemory


class VmState:
    """Annotations of the VM state and fd methods the mixins use (set by ``Vm._from_fd``)."""

    _fd: int
    _inherited_fd: int
    _what: str
    _vcpu_mmap_size: int
    _memory: dict[int, GuestMemory]
    _slots: dict[int, tuple[int, int, int, int]]
    _regions: dict[int, structs.kvm_userspace_memory_region]
    _parked: list[GuestMemory]
    _vcpus: dict[int, Vcpu]
    _children: weakref.WeakSet[FdObject]
    _max_slots: int | None
    _dirty_ring_size: int
    _dirty_rings: dict[int, DirtyRing]
    _ioctl: Callable[..., int]
    _closed_error: Callable[[str], KvmClosedError]
    check_extension: Callable[[int], int]
    enable_cap: Callable[..., None]
