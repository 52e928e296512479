"""The raw layer: the kernel's KVM uapi for x86-64, in ctypes.

Names are the kernel's own: structures (``kvm_regs``, ``kvm_run`` ...),
request numbers (``KVM_GET_REGS`` ...), flags (``KVM_MEM_READONLY`` ...), and
the ``Cap`` / ``ExitReason`` enums.  Nothing here opens a file or calls
``ioctl``; the object layer (:mod:`pykvm.system`, :mod:`pykvm.vm`,
:mod:`pykvm.vcpu` ...) does that.
"""

from .enums import *  # noqa: F401,F403
from .enums import __all__ as _enums_all
from .ioctls import *  # noqa: F401,F403
from .ioctls import __all__ as _ioctls_all
from .structs import *  # noqa: F401,F403
from .structs import __all__ as _structs_all

KVM_API_VERSION = 12

__all__ = sorted(set(_enums_all) | set(_ioctls_all) | set(_structs_all) | {"KVM_API_VERSION"})
