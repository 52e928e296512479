"""What the :class:`~pykvm.vcpu.Vcpu` mixins share, declared once for type checkers.

The run engine (:mod:`.run`) owns the fd, the run page and the VM reference;
the other mixins only use them.  This class declares them (annotations, no
values): at run time it adds nothing to a ``Vcpu``.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..uapi import structs
    from ..vm import Vm


class VcpuState:
    """Annotations of the vCPU state and fd methods the mixins use (set by the run engine)."""

    _ioctl: Callable[..., int]
    _mm: mmap.mmap
    id: int
    vm: Vm
    fileno: Callable[[], int]

    if TYPE_CHECKING:  # pragma: no cover - the run engine's property
        @property
        def kvm_run(self) -> structs.kvm_run: ...
