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
* :mod:`~pykvm.x86.runloop` — exits dispatched to port/MMIO handlers,
  readable reports when a guest dies; :mod:`~pykvm.x86.devices` — a UART.

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

from .asm import AssemblyError, Program, ToolMissing, assemble, assemble_file
from .consts import (
    APIC_BASE_BSP, APIC_BASE_ENABLE, APIC_DEFAULT_BASE, CR0, CR4, EFER, FEATURES,
    IOAPIC_DEFAULT_BASE, MSR, PAGE_1G, PAGE_2M, PAGE_4K, PAGE_4M, PTE, RFLAGS, Feature, GiB,
    KiB, MiB, SegType, Vector, features_in, find_leaf,
)
from .cpu import cpuid_has, prepare_vm, setup_cpuid
from .descriptors import STAR64, Gdt, Idt, Segment, Tss32, Tss64, gate32, gate64, selector
from .devices import COM1, Uart16550
from .loader import ElfImage, load_elf64, load_flat, parse_elf64
from .modes import (
    LongMode, ProtectedMode, UnsupportedMode, setup_long_mode, setup_protected_mode,
    setup_real_mode,
)
from .paging import Arena, PageTables, PageTables32, translate
from .report import cpu_mode, describe_vcpu, disassemble
from .runloop import Bus, GuestError, RunLoop, Stop
from . import quirks

__all__ = [
    "assemble", "assemble_file", "Program", "AssemblyError", "ToolMissing",
    "CR0", "CR4", "EFER", "RFLAGS", "PTE", "MSR", "Vector", "SegType", "Feature", "FEATURES",
    "features_in", "find_leaf", "KiB", "MiB", "GiB", "PAGE_4K", "PAGE_2M", "PAGE_4M", "PAGE_1G",
    "APIC_BASE_BSP", "APIC_BASE_ENABLE", "APIC_DEFAULT_BASE", "IOAPIC_DEFAULT_BASE",
    "setup_cpuid", "cpuid_has", "prepare_vm",
    "Gdt", "Idt", "Segment", "Tss32", "Tss64", "gate32", "gate64", "selector", "STAR64",
    "Uart16550", "COM1",
    "load_flat", "load_elf64", "parse_elf64", "ElfImage",
    "setup_real_mode", "setup_protected_mode", "setup_long_mode", "ProtectedMode", "LongMode",
    "UnsupportedMode",
    "Arena", "PageTables", "PageTables32", "translate",
    "describe_vcpu", "cpu_mode", "disassemble",
    "RunLoop", "Bus", "Stop", "GuestError", "quirks",
]
