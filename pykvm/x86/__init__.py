"""``pykvm.x86``: the x86 set-up every small hypervisor script repeats.

* :mod:`~pykvm.x86.consts` — named CR0/CR4/EFER/RFLAGS/PTE bits, MSRs,
  exception vectors, CPUID features (``Feature.LM``);
* :mod:`~pykvm.x86.descriptors` — GDT, IDT, TSS builders (bytes for the
  guest, ``kvm_segment`` for KVM);
* :mod:`~pykvm.x86.paging` — an :class:`Arena` of guest memory for tables,
  long-mode and 32-bit page tables, a software page walker;
* :mod:`~pykvm.x86.modes` — a vCPU in real, protected or long mode;
* :mod:`~pykvm.x86.cpu` — CPUID from the supported list, VM preparation;
* :mod:`~pykvm.x86.loader` — flat binaries and ELF64 images;
* :mod:`~pykvm.x86.asm` — guest code from GNU ``as`` source, cached;
* :mod:`~pykvm.x86.bus` — the port/MMIO :class:`Bus` and :class:`RunLoop`:
  exits dispatched to handlers; :mod:`~pykvm.x86.report` — readable reports
  when a guest dies; :mod:`~pykvm.x86.devices` — a 16550 UART.

Submodules load on first use of one of their names (PEP 562), so
``import pykvm.x86`` costs almost nothing until you touch, say, ``x86.assemble``.

A 64-bit guest in a few lines::

    import pykvm
    from pykvm import x86

    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(0, 2 * x86.MiB)
        prog = x86.assemble('''
            mov  dx, 0x3f8
            lea  rsi, [rip + msg]
        1:  lodsb
            test al, al
            jz   2f
            out  dx, al
            jmp  1b
        2:  hlt
        msg: .asciz "hello from long mode\\n"
        ''', base=0x10000)
        prog.load(vm)
        vcpu = vm.create_vcpu()
        x86.setup_cpuid(kvm, vcpu)
        x86.setup_long_mode(vcpu, x86.Arena(vm, 0x1000, 0xF000), entry=prog.entry, stack=0x80000)
        loop = x86.RunLoop(vcpu)
        uart = loop.add(x86.Uart16550())
        loop.run(timeout=5)
        print(uart.text, end="")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs follow; at run time __getattr__ below
    from . import quirks
    from .asm import AssemblyError, Program, ToolMissing, assemble, assemble_file
    from .bus import Bus, GuestError, RunLoop, RunResult
    from .consts import (
        APIC_BASE_BSP,
        APIC_BASE_ENABLE,
        APIC_DEFAULT_BASE,
        CR0,
        CR4,
        EFER,
        FEATURES,
        IOAPIC_DEFAULT_BASE,
        MSR,
        PAGE_1G,
        PAGE_2M,
        PAGE_4K,
        PAGE_4M,
        PTE,
        RFLAGS,
        Feature,
        GiB,
        KiB,
        MiB,
        SegType,
        Vector,
        features_in,
        find_leaf,
    )
    from .cpu import cpuid_has, prepare_vm, setup_cpuid
    from .descriptors import STAR64, Gdt, Idt, Segment, Tss32, Tss64, gate32, gate64, selector
    from .devices import COM1, Uart16550
    from .loader import ElfImage, load_elf64, load_flat, parse_elf64
    from .modes import LongMode, ProtectedMode, UnsupportedMode, setup_long_mode, setup_protected_mode, setup_real_mode
    from .paging import Arena, PageTables, PageTables32, translate
    from .report import cpu_mode, describe_vcpu, disassemble

_SUBMODULE_OF: dict[str, str] = {
    **dict.fromkeys(
        ['AssemblyError', 'Program', 'ToolMissing', 'assemble', 'assemble_file'], 'asm'),
    **dict.fromkeys(
        ['APIC_BASE_BSP', 'APIC_BASE_ENABLE', 'APIC_DEFAULT_BASE', 'CR0', 'CR4', 'EFER',
        'FEATURES', 'Feature', 'GiB', 'IOAPIC_DEFAULT_BASE', 'KiB', 'MSR', 'MiB', 'PAGE_1G',
        'PAGE_2M', 'PAGE_4K', 'PAGE_4M', 'PTE', 'RFLAGS', 'SegType', 'Vector', 'features_in',
        'find_leaf'], 'consts'),
    **dict.fromkeys(['cpuid_has', 'prepare_vm', 'setup_cpuid'], 'cpu'),
    **dict.fromkeys(
        ['Gdt', 'Idt', 'STAR64', 'Segment', 'Tss32', 'Tss64', 'gate32', 'gate64', 'selector'], 'descriptors'),
    **dict.fromkeys(['COM1', 'Uart16550'], 'devices'),
    **dict.fromkeys(['ElfImage', 'load_elf64', 'load_flat', 'parse_elf64'], 'loader'),
    **dict.fromkeys(
        ['LongMode', 'ProtectedMode', 'UnsupportedMode', 'setup_long_mode',
        'setup_protected_mode', 'setup_real_mode'], 'modes'),
    **dict.fromkeys(['Arena', 'PageTables', 'PageTables32', 'translate'], 'paging'),
    **dict.fromkeys(['cpu_mode', 'describe_vcpu', 'disassemble'], 'report'),
    **dict.fromkeys(['Bus', 'GuestError', 'RunLoop', 'RunResult'], 'bus'),
}
_SUBMODULES = frozenset({'asm', 'bus', 'consts', 'cpu', 'descriptors', 'devices', 'features',
                         'loader', 'msr', 'vectors',
                         'modes', 'paging', 'quirks', 'report', 'runloop'})

# A literal list: type checkers read it as the explicit re-export list of the
# TYPE_CHECKING imports above (tests/x86/test_x86_lazy.py keeps it resolvable).
__all__ = [
    "APIC_BASE_BSP",
    "APIC_BASE_ENABLE",
    "APIC_DEFAULT_BASE",
    "COM1",
    "CR0",
    "CR4",
    "EFER",
    "FEATURES",
    "IOAPIC_DEFAULT_BASE",
    "MSR",
    "PAGE_1G",
    "PAGE_2M",
    "PAGE_4K",
    "PAGE_4M",
    "PTE",
    "RFLAGS",
    "STAR64",
    "Arena",
    "AssemblyError",
    "Bus",
    "ElfImage",
    "Feature",
    "Gdt",
    "GiB",
    "GuestError",
    "Idt",
    "KiB",
    "LongMode",
    "MiB",
    "PageTables",
    "PageTables32",
    "Program",
    "ProtectedMode",
    "RunLoop",
    "RunResult",
    "SegType",
    "Segment",
    "ToolMissing",
    "Tss32",
    "Tss64",
    "Uart16550",
    "UnsupportedMode",
    "Vector",
    "assemble",
    "assemble_file",
    "cpu_mode",
    "cpuid_has",
    "describe_vcpu",
    "disassemble",
    "features_in",
    "find_leaf",
    "gate32",
    "gate64",
    "load_elf64",
    "load_flat",
    "parse_elf64",
    "prepare_vm",
    "quirks",
    "selector",
    "setup_cpuid",
    "setup_long_mode",
    "setup_protected_mode",
    "setup_real_mode",
    "translate",
]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines *name* on first use (PEP 562)."""
    mod = _SUBMODULE_OF.get(name)
    if mod is not None:
        value = getattr(importlib.import_module(f".{mod}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value          # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
