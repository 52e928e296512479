"""``python -m pykvm.vmm KERNEL [--smp N] [--memory MiB] [--append CMDLINE] [--module FILE ...] [--timeout S]``

The command line is parsed by hand: argparse alone costs ~6 ms of the
start-up budget.  The process exits with the run's status (see
:mod:`pykvm.vmm.status`) through ``os._exit``, skipping interpreter
teardown, and leaves the slow destruction of the VM to a forked child (see
:func:`_teardown_elsewhere`; ``PYKVM_VMM_SYNC_TEARDOWN=1`` turns that off).
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

USAGE = """\
usage: python -m pykvm.vmm KERNEL [--smp N] [--memory MiB] [--append CMDLINE]
                           [--module FILE ...] [--timeout S]

Boot a multiboot (v1) kernel on /dev/kvm, like `qemu -kernel`.

  KERNEL            32-bit ELF multiboot kernel (or any image with the a.out kludge)
  --smp N           number of CPUs (default 1); APs wait for INIT/SIPI
  --memory MiB      RAM size in MiB, suffixes K/M/G accepted (default 128)
  --append CMDLINE  kernel command line (the kernel sees "KERNEL CMDLINE")
  --module FILE     a multiboot module ("FILE ARGS" sets its string); repeatable,
                    and several files may follow one --module
  --timeout S       stop the guest after S seconds (exit status 124)

The serial port (COM1) is stdin/stdout.  Exit status: (v << 1) | 1 for a
write of v to port 0xf4; 0 guest reset; 2 usage or load error; 4 triple
fault; 6 emulation failure; 8 other internal error; 10 VMM error;
124 timeout; 130 interrupted.
"""


class UsageError(Exception):
    pass


def _memory(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1 << 20}
    try:
        if t and t[-1] in mult:
            v = float(t[:-1]) * mult[t[-1]]
        elif t.endswith("B") and t[-2:-1] in mult:
            v = float(t[:-2]) * mult[t[-2]]
        else:
            v = float(t)
    except ValueError:
        raise UsageError(f"--memory {text!r}: not a size") from None
    if v != int(v) or v <= 0:
        raise UsageError(f"--memory {text!r}: want a whole number of MiB")
    return int(v)


def parse_args(argv: List[str]) -> dict:
    """The options as a dict of :class:`~pykvm.vmm.machine.Machine` arguments (raises UsageError)."""
    opts = {"smp": 1, "memory_mib": 128, "append": "", "modules": [], "timeout": None}
    kernel = None
    i = 0
    taking_modules = False

    def value(name: str) -> str:
        nonlocal i
        if "=" in argv[i]:
            return argv[i].split("=", 1)[1]
        i += 1
        if i >= len(argv):
            raise UsageError(f"{name} needs a value")
        return argv[i]

    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0] if a.startswith("--") else a
        if name in ("-h", "--help"):
            raise SystemExit(USAGE)
        if name == "--smp":
            v = value(name)
            try:
                opts["smp"] = int(v.split(",")[0].split("=")[-1])
            except ValueError:
                raise UsageError(f"--smp {v!r}: not a number") from None
            taking_modules = False
        elif name in ("--memory", "-m"):
            opts["memory_mib"] = _memory(value(name))
            taking_modules = False
        elif name == "--append":
            opts["append"] = value(name)
            taking_modules = False
        elif name == "--module":
            opts["modules"].append(value(name))
            taking_modules = True
        elif name == "--timeout":
            v = value(name)
            try:
                opts["timeout"] = float(v)
            except ValueError:
                raise UsageError(f"--timeout {v!r}: not a number of seconds") from None
            if not opts["timeout"] > 0:
                raise UsageError("--timeout must be positive")
            taking_modules = False
        elif a == "--":
            rest = argv[i + 1:]
            if kernel is None and rest:
                kernel, rest = rest[0], rest[1:]
            if rest:
                raise UsageError(f"unexpected arguments: {' '.join(rest)}")
            break
        elif a.startswith("-") and a != "-":
            raise UsageError(f"unknown option {a}")
        elif kernel is None and not taking_modules:
            kernel = a
        elif taking_modules:
            opts["modules"].append(a)
        else:
            raise UsageError(f"unexpected argument {a!r} (one KERNEL only)")
        i += 1
    if kernel is None:
        raise UsageError("no KERNEL given")
    opts["kernel"] = kernel
    return opts


def main(argv: Optional[List[str]] = None) -> int:
    """Run the VMM with *argv* (default ``sys.argv[1:]``); return the exit status."""
    from .status import LOAD_ERROR

    args = sys.argv[1:] if argv is None else list(argv)
    try:
        opts = parse_args(args)
    except UsageError as e:
        sys.stderr.write(f"{USAGE.splitlines()[0]}\npykvm.vmm: error: {e}\n")
        return LOAD_ERROR
    except SystemExit as e:          # --help
        sys.stdout.write(str(e.code))
        return 0
    from .machine import Machine, MachineError

    kernel = opts.pop("kernel")
    try:
        m = Machine(kernel, **opts)
    except MachineError as e:
        sys.stderr.write(f"pykvm.vmm: {e}\n")
        return e.status
    global _machine
    _machine = m
    return m.run()


_machine = None


def _teardown_elsewhere() -> None:
    """Let a child process drop the last references to the VM after we exit.

    Destroying a VM with an in-kernel irqchip takes 3-25 ms here (KVM waits
    for RCU/SRCU grace periods), and it happens in whichever process closes
    the last fd, before that process's exit status is delivered.  A forked
    child inherits the fds, closes stdio at once (so pipes see EOF when we
    exit), waits until we are gone, and pays for the teardown itself.
    """
    vm = getattr(_machine, "vm", None)
    if vm is None or vm.closed or os.environ.get("PYKVM_VMM_SYNC_TEARDOWN"):
        return
    try:
        r, w = os.pipe()
        pid = os.fork()
    except OSError:
        return
    if pid == 0:
        try:
            os.closerange(0, 3)
            os.close(w)
            os.read(r, 1)               # EOF: the parent has exited
        finally:
            os._exit(0)
    os.close(r)                         # the parent keeps w open until it exits


if __name__ == "__main__":
    status = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        _teardown_elsewhere()
    finally:
        os._exit(status)
