"""Compare pykvm.uapi with whatever KVM headers this machine has installed.

Runs where gcc and the kernel headers are installed (Debian's linux-libc-dev
6.1 on this project's machines).  Every request number, constant, struct
size and field offset (nested members too) that both define must agree,
except where the kernel itself changed a layout after the installed headers
(``CHANGED``).  The newest kernel's values are checked in test_record.py.
"""

from __future__ import annotations

import ctypes

import pytest

from pykvm import uapi
from pykvm.uapi import structs

from . import support_cheader as cheader

pytestmark = pytest.mark.no_kvm_needed

#: Layouts the kernel changed after 6.1 (pykvm follows the newest kernel).
CHANGED = {
    "sizeof(kvm_svm_nested_state_hdr)",  # gains gpat in 7.x
}


def _ours(key: str) -> int:
    if key.startswith("sizeof("):
        return ctypes.sizeof(getattr(structs, key[7:-1]))
    if key.startswith("offsetof("):
        sname, path = key[9:-1].split(".", 1)
        from .support_layout import ctypes_paths
        return ctypes_paths(getattr(structs, sname))[path]
    return int(getattr(uapi, key))


def test_values_equal_the_c_compilers():
    why = cheader.available()
    if why:
        pytest.skip(why)
    macros = [n for n in uapi.__all__ if n.startswith(("KVM_", "GUEST_MEMFD"))
              and isinstance(getattr(uapi, n), int)]
    in_headers = cheader.header_structs()
    pairs = [(n, getattr(structs, n)) for n in dir(structs) if n.startswith("kvm_") and n in in_headers]
    values = cheader.run(macros, pairs)
    assert len(values) > 1000  # the headers really were read
    mismatches = []
    for key, c_value in values.items():
        ours = _ours(key)
        if ours != c_value and key not in CHANGED:
            mismatches.append(f"{key}: pykvm {ours:#x} C {c_value:#x}")
    assert not mismatches, "\n".join(mismatches)
