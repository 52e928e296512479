"""Flatten a structure's layout into ``{"a.b.c": offset}``, as C's offsetof sees it.

The same walk runs over the ctypes classes of :mod:`pykvm.uapi` and over a
record written by ``tools/gen_uapi.py`` (the compiler's DWARF), so the two can
be compared key for key.  Unnamed members (``_anonymous_`` in ctypes, no name
in C) add no path component; bit-fields and arrays' elements are not
addressable by offsetof and are left out (their container's offset is kept).
"""

from __future__ import annotations

import ctypes
import re
from typing import Any


def ctypes_paths(cls: type, prefix: str = "", base: int = 0,
                 out: dict[str, int] | None = None) -> dict[str, int]:
    out = {} if out is None else out
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for spec in cls.__dict__.get("_fields_", cls._fields_):
        name, ftype = spec[0], spec[1]
        off = base + getattr(cls, name).offset if name not in anonymous else \
            base + cls.__dict__[name].offset
        if len(spec) == 3:
            continue  # a bit-field: offsetof() cannot name it
        if name in anonymous:
            ctypes_paths(ftype, prefix, off, out)
            continue
        path = prefix + name
        out[path] = off
        if isinstance(ftype, type) and issubclass(ftype, (ctypes.Structure, ctypes.Union)):
            ctypes_paths(ftype, path + ".", off, out)
    return out


def record_paths(types: dict[str, Any], name: str, prefix: str = "", base: int = 0,
                 out: dict[str, int] | None = None) -> dict[str, int]:
    out = {} if out is None else out
    for m in types[name]["members"]:
        if "bits" in m:
            continue
        off = base + m["offset"]
        t = m["type"]
        if m.get("anonymous"):
            record_paths(types, t, prefix, off, out)
            continue
        path = prefix + m["name"]
        out[path] = off
        if t in types:  # a struct/union member, not an array of them
            record_paths(types, t, path + ".", off, out)
    return out


def is_array(t: str) -> bool:
    return bool(re.search(r"\[\d+\]$", t))
