"""Argument checks shared by the object layer.

KVM takes fixed-width unsigned integers; Python ints are unbounded and
``ctypes`` silently truncates.  These checks refuse what would be truncated
or coerced (floats, numeric strings, bools) with a message naming the
argument, before any ioctl is issued.
"""

from __future__ import annotations

import ctypes

U8 = 0xFF
U16 = 0xFFFF
U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF


def int_arg(name: str, value: object) -> int:
    """*value* as a plain int; refuse bools, floats and strings instead of coercing them."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return int(value)  # a plain int, also for IntEnum members


def uint(name: str, value: object, limit: int = U64) -> int:
    """*value* if it is an int in ``[0, limit]`` (else TypeError / ValueError)."""
    value = int_arg(name, value)
    if not 0 <= value <= limit:
        raise ValueError(f"{name}={value:#x} out of range [0, {limit:#x}]")
    return value


def expect(obj: object, cls: type) -> None:
    """Raise TypeError unless *obj* is a *cls* (a ctypes struct, usually)."""
    if not isinstance(obj, cls):
        raise TypeError(f"expected {cls.__name__}, got {type(obj).__name__}")


def flex_fits(buf: ctypes.Structure, count_field: str, array_field: str) -> None:
    """Raise ValueError unless ``buf.<count_field>`` entries of ``buf.<array_field>`` lie inside *buf*.

    For structures that end in a flexible array (``kvm_cpuid2.nent``,
    ``kvm_msrs.nmsrs``, ``kvm_irq_routing.nr`` ...): the kernel trusts the
    count and reads or writes that many entries, so a count larger than the
    buffer would make it touch the host heap beyond the Python object.
    """
    n = getattr(buf, count_field)
    field = getattr(type(buf), array_field)
    entry = ctypes.sizeof(getattr(buf, array_field)._type_)
    room = (ctypes.sizeof(buf) - field.offset) // entry
    if not 0 <= n <= room:
        raise ValueError(f"{type(buf).__name__}.{count_field}={n} but the buffer holds {room} entries")
