"""Base classes of the generated ctypes structures (hand-written).

``Struct`` and ``Union`` add a readable ``repr`` to ``ctypes.Structure`` /
``ctypes.Union``; padding and reserved members (and the anonymous members
that hold C's unnamed unions) are left out of it.
"""

from __future__ import annotations

import ctypes
from typing import Any

__all__ = ["Struct", "Union"]


def _show(obj: Any) -> str:
    parts: list[str] = []
    for name, *_ in obj._fields_:
        if name.startswith("_") or name.startswith("pad") or name.startswith("reserved"):
            continue
        value = getattr(obj, name)
        if isinstance(value, int):
            parts.append(f"{name}={value:#x}")
        elif isinstance(value, ctypes.Array) and len(value) > 8:
            parts.append(f"{name}=[...{len(value)}]")
        elif isinstance(value, ctypes.Array):
            parts.append(f"{name}={list(value)!r}")
        else:
            parts.append(f"{name}={value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


class Struct(ctypes.Structure):
    """A C ``struct``: ctypes layout, kernel member names, readable ``repr``."""

    def __repr__(self) -> str:
        return _show(self)


class Union(ctypes.Union):
    """A C ``union``: ctypes layout, kernel member names, readable ``repr``."""

    def __repr__(self) -> str:
        return _show(self)
