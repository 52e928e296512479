"""pykvm.vmm: a small PC that boots multiboot (v1) kernels, like ``qemu -kernel``.

Run ``pykvm vmm KERNEL [--smp N] [--memory MiB] [--append CMDLINE]
[--module FILE ...] [--timeout S]`` (or ``python -m pykvm.vmm ...``); see
``docs/vmm.md``.  Built on :mod:`pykvm.x86` (bus, run loop, UART, CPUID,
reports); what is here is PC-specific:

* :mod:`.layout` -- the address map: every guest address and port
* :mod:`.multiboot` -- header, ELF32 / a.out-kludge loading, boot information
* :mod:`.files` -- bounded reading of the kernel and module files
* :mod:`.devices` -- fw_cfg, CMOS, PCI "no device", debug exit, misc ports
* :mod:`.tables` -- MP and ACPI tables
* :mod:`.machine` -- :class:`~.machine.Machine`: VM, vCPU threads, reports
* :mod:`.cli` -- the command line (``main(argv)``)
* :mod:`.status` -- the exit statuses

Submodules are imported on use, so ``import pykvm.vmm`` stays cheap.
"""

from .status import (
    EMULATION_FAILURE,
    INTERNAL_ERROR,
    INTERRUPTED,
    LOAD_ERROR,
    RESET,
    TIMEOUT,
    TRIPLE_FAULT,
    VMM_ERROR,
    debug_exit_status,
)

__all__ = [
    "EMULATION_FAILURE",
    "INTERNAL_ERROR",
    "INTERRUPTED",
    "LOAD_ERROR",
    "RESET",
    "TIMEOUT",
    "TRIPLE_FAULT",
    "VMM_ERROR",
    "Machine",
    "MachineError",
    "debug_exit_status",
    "main",
]


def __getattr__(name: str) -> object:
    if name in ("Machine", "MachineError"):
        from . import machine

        return getattr(machine, name)
    if name == "main":
        from .cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
