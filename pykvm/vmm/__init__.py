"""pykvm.vmm: a small PC that boots multiboot (v1) kernels, like ``qemu -kernel``.

Run ``python -m pykvm.vmm KERNEL [--smp N] [--memory MiB] [--append CMDLINE]
[--module FILE ...] [--timeout S]``; see ``docs/vmm.md``.  The pieces:

* :mod:`.multiboot` -- header, ELF32 / a.out-kludge loading, boot information
* :mod:`.devices` -- UART, fw_cfg, CMOS, PCI "no device", debug exit, misc ports
* :mod:`.machine` -- :class:`~.machine.Machine`: VM, vCPU threads, reports
* :mod:`.status` -- the exit statuses

Submodules are imported on use, so ``import pykvm.vmm`` stays cheap.
"""

from .status import (EMULATION_FAILURE, INTERNAL_ERROR, INTERRUPTED, LOAD_ERROR, RESET,
                     TIMEOUT, TRIPLE_FAULT, VMM_ERROR, debug_exit_status)

__all__ = ["Machine", "MachineError", "main", "RESET", "LOAD_ERROR", "TRIPLE_FAULT",
           "EMULATION_FAILURE", "INTERNAL_ERROR", "VMM_ERROR", "TIMEOUT", "INTERRUPTED",
           "debug_exit_status"]


def __getattr__(name):
    if name in ("Machine", "MachineError"):
        from . import machine

        return getattr(machine, name)
    if name == "main":
        from .__main__ import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
