"""The raw layer: the kernel's KVM uapi for x86-64, in ctypes.

Generated from the kernel's own headers by ``tools/gen_uapi.py`` (see the
provenance header of each generated module):

* :mod:`pykvm.uapi.x86` -- the structures of ``asm/kvm.h``;
* :mod:`pykvm.uapi.kvm` -- the structures of ``linux/kvm.h``;
* :mod:`pykvm.uapi.consts` -- every integer constant of both headers;
* :mod:`pykvm.uapi.enums` -- ``Cap`` and ``ExitReason``;
* :mod:`pykvm.uapi.ioctls` -- every request number, built with ioctl-opt.

:mod:`pykvm.uapi.structs` re-exports the structures and constants and adds
:func:`~pykvm.uapi.structs.flex` and the kernel's function-like macros.
Names are the kernel's own.  Nothing here opens a file or calls ``ioctl``;
the object layer (:mod:`pykvm.system`, :mod:`pykvm.vm`, :mod:`pykvm.vcpu`
...) does that.
"""

from .enums import *  # noqa: F403
from .enums import __all__ as _enums_all
from .ioctls import *  # noqa: F403
from .ioctls import __all__ as _ioctls_all
from .structs import *  # noqa: F403
from .structs import __all__ as _structs_all

KVM_API_VERSION = 12

__all__ = sorted(set(_enums_all) | set(_ioctls_all) | set(_structs_all) | {"KVM_API_VERSION"})
