"""Compare every request number, constant, struct size and field offset with C.

Runs where gcc and the kernel headers are installed (they are on this
project's machines); names newer than the installed headers are pinned in
test_layout.py instead.
"""

from __future__ import annotations

import ctypes

import pytest

from pykvm import uapi
from pykvm.uapi import structs as S

from . import cheader

pytestmark = pytest.mark.no_kvm_needed


def test_values_equal_the_c_compilers():
    why = cheader.available()
    if why:
        pytest.skip(why)
    macros = [n for n in uapi.__all__ if n.startswith(("KVM_", "GUEST_MEMFD"))]
    in_headers = cheader.header_structs()
    structs = [(n, getattr(S, n)) for n in dir(S) if n.startswith("kvm_") and n in in_headers]
    values = cheader.run(macros, structs)
    assert len(values) > 500  # the headers really were read
    mismatches = []
    for key, c_value in values.items():
        if key.startswith("sizeof("):
            ours = ctypes.sizeof(getattr(S, key[7:-1]))
        elif key.startswith("offsetof("):
            sname, field = key[9:-1].split(".")
            ours = getattr(getattr(S, sname), field).offset
        else:
            ours = int(getattr(uapi, key))
        if ours != c_value:
            mismatches.append(f"{key}: pykvm {ours:#x} C {c_value:#x}")
    assert not mismatches, "\n".join(mismatches)
