"""Old import path of :mod:`pykvm.vcpu.exits` (kept for one release).

``pykvm.exits`` *is* ``pykvm.vcpu.exits`` (the same module object), so every
name, ``isinstance`` check and module-level constant stays identical.
"""

import sys

from .vcpu import exits as _exits

sys.modules[__name__] = _exits
