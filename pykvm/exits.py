"""Old import path of :mod:`pykvm.vcpu.exits` (kept for one release).

``pykvm.exits`` *is* ``pykvm.vcpu.exits`` (the same module object), so every
name, ``isinstance`` check and module-level constant stays identical.
"""

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .vcpu.exits import *  # noqa: F403
    from .vcpu.exits import DECODE_TABLE, DECODERS, INTERRUPTED, decode  # noqa: F401
else:
    from .vcpu import exits as _exits

    sys.modules[__name__] = _exits
