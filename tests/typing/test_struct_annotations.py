"""The generated structures' class annotations say what reading a member gives.

tools/gen_uapi.py writes ``rip: int``-style annotations for type checkers
beside each ``_fields_``; ctypes ignores them.  These tests read every
annotated member of every generated class at run time and check its value
against the annotation, and check that every member ctypes exposes is
annotated, so the two cannot drift apart.
"""

from __future__ import annotations

import ctypes
import inspect

import pytest

from pykvm.uapi import kvm as uapi_kvm
from pykvm.uapi import structs
from pykvm.uapi import x86 as uapi_x86

CLASSES = [obj for mod in (uapi_kvm, uapi_x86) for obj in vars(mod).values()
           if isinstance(obj, type) and issubclass(obj, (ctypes.Structure, ctypes.Union))
           and obj.__module__ == mod.__name__]


def _exposed(cls: type) -> set[str]:
    """Member names ctypes exposes on *cls* (anonymous members' promoted, recursively)."""
    names: set[str] = set()
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for name, ctype, *_ in cls._fields_:  # type: ignore[attr-defined]
        names.add(name)
        if name in anonymous:
            names |= {n for n in _exposed(ctype) if n not in getattr(ctype, "_anonymous_", ())}
    return names


def _matches(value: object, annotation: str) -> bool:
    if annotation == "int":
        return type(value) is int
    if annotation == "bool":
        return type(value) is bool
    if annotation == "int | None":
        return value is None or type(value) is int
    if annotation.startswith("Array["):
        return isinstance(value, ctypes.Array)
    return type(value).__name__ == annotation


def test_there_are_generated_classes() -> None:
    assert len(CLASSES) > 100
    assert structs.kvm_regs in CLASSES and structs.kvm_run in CLASSES


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_annotations_match_ctypes(cls: type) -> None:
    annotations = inspect.get_annotations(cls)
    # ``__empty_*`` (the kernel's flexible-array placeholders) would be name-mangled: left out
    assert set(annotations) == {n for n in _exposed(cls) if not n.startswith("__")}
    obj = cls()
    for name, annotation in annotations.items():
        value = getattr(obj, name)
        assert _matches(value, annotation), f"{cls.__name__}.{name}: {annotation} but reads {value!r}"


def test_annotations_do_not_change_layout() -> None:
    # the C sizes (the kernel's ABI): an annotation must not add or move a member
    assert ctypes.sizeof(structs.kvm_regs) == 144
    assert ctypes.sizeof(structs.kvm_sregs) == 312
    assert structs.offsetof(structs.kvm_regs, "rip") == 128
    assert structs.offsetof(structs.kvm_run, "if_flag") == 13
    assert structs.offsetof(structs.kvm_run, "io") == 32  # promoted from the anonymous exit union
    regs = structs.kvm_regs(rip=0x1000)
    assert regs.rip == 0x1000 and bytes(regs)[128:136] == (0x1000).to_bytes(8, "little")


def test_flex_keeps_the_type() -> None:
    cpuid = structs.flex(structs.kvm_cpuid2, 3)
    assert isinstance(cpuid, structs.kvm_cpuid2) and cpuid.nent == 3
