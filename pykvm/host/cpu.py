"""Facts about the host CPU from /proc/cpuinfo and from the CPUID instruction.

``/proc/cpuinfo`` shows what the kernel decided (it clears ``vmx`` when the
firmware locked VT-x off); executing CPUID shows what the CPU itself says.
The two together tell "disabled in firmware" from "not there".  CPUID is run
from a tiny machine-code stub in an executable anonymous mapping; if the
system forbids such mappings, :func:`cpuid` returns ``None`` and the probe
does without.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable
from typing import Any

__all__ = ["cpu_flags", "cpuid", "cpuinfo"]

# push rbx; mov eax,edi; mov ecx,esi; mov r8,rdx; cpuid;
# mov [r8],eax; mov [r8+4],ebx; mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret
_STUB = bytes([
    0x53,
    0x89, 0xF8,
    0x89, 0xF1,
    0x49, 0x89, 0xD0,
    0x0F, 0xA2,
    0x41, 0x89, 0x00,
    0x41, 0x89, 0x58, 0x04,
    0x41, 0x89, 0x48, 0x08,
    0x41, 0x89, 0x50, 0x0C,
    0x5B,
    0xC3,
])

_Regs = ctypes.c_uint32 * 4
_fn = None
_failed = False
_keep: list[object] = []  # the mapping and the ctypes view that pins it


def _load() -> Callable[[int, int, Any], None] | None:
    global _fn, _failed
    if _fn is not None or _failed:
        return _fn
    if os.uname().machine not in ("x86_64", "AMD64"):  # not platform: it imports subprocess (3.10)
        _failed = True
        return None
    try:
        mm = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        mm.write(_STUB)
        buf = ctypes.c_char.from_buffer(mm)
        proto = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(_Regs))
        _fn = proto(ctypes.addressof(buf))
        _keep.extend([mm, buf])
    except (OSError, ValueError, TypeError, AttributeError):
        _failed = True
        _fn = None
    return _fn


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int] | None:
    """Execute CPUID(*leaf*, *subleaf*) on this CPU: (eax, ebx, ecx, edx), or None."""
    fn = _load()
    if fn is None:
        return None
    regs = _Regs()
    fn(leaf & 0xFFFFFFFF, subleaf & 0xFFFFFFFF, ctypes.byref(regs))
    eax, ebx, ecx, edx = regs
    return (eax, ebx, ecx, edx)


def cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as {key: value} (empty if unreadable)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if out:
                        break
                    continue
                k, _, v = line.partition(":")
                out.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return out


def cpu_flags() -> set[str]:
    """The ``flags`` of /proc/cpuinfo as a set."""
    return set(cpuinfo().get("flags", "").split())
