"""``pykvm vmm KERNEL [--smp N] [--memory MiB] [--append CMDLINE] [--module FILE ...] [--timeout S] [--gdb[=PORT]]``

(also ``python -m pykvm.vmm``.)  The command line is parsed by hand: the
VMM's start-up is part of what it offers, and argparse costs milliseconds to
import.  Every bad argument ends in one line ``pykvm vmm: ...`` and status 2
(:data:`~pykvm.vmm.status.LOAD_ERROR`, the same as :data:`pykvm.command.EXIT_USAGE`).
Arguments that are not valid UTF-8 (file names, ``--append``) reach the guest
byte for byte (Python's ``surrogateescape``).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..command import UsageError, error, run_command
from .status import GDB_SOCKET, LOAD_ERROR

__all__ = ["USAGE", "UsageError", "main", "parse_args"]

PROG = "vmm"

USAGE = """\
usage: pykvm vmm KERNEL [--smp N] [--memory MiB] [--append CMDLINE]
                 [--module FILE ...] [--timeout S] [--gdb[=PORT]]

Boot a multiboot (v1) kernel on /dev/kvm, like `qemu -kernel`.

  KERNEL            32-bit ELF multiboot kernel (or any image with the a.out kludge)
  --smp N           number of CPUs, 1..255 (default 1); APs wait for INIT/SIPI
  --memory MiB      RAM size in MiB, suffixes K/M/G/T accepted, 2 MiB .. 1 TiB
                    (default 128); the kernel and modules together must fit in it
  --append CMDLINE  kernel command line (the kernel sees "KERNEL CMDLINE")
  --module FILE     a multiboot module ("FILE ARGS" sets its string); repeatable,
                    and several files may follow one --module
  --timeout S       stop the guest after S seconds (a positive finite number;
                    exit status 124)
  --gdb[=PORT]      like qemu -s -S: the kernel waits, stopped at its entry, for gdb
                    on a private UNIX socket (only this user can connect); with PORT,
                    on 127.0.0.1:PORT (0 picks a free port) after 'monitor auth TOKEN';
                    the exact gdb command line is printed on stderr; one CPU

The serial port (COM1) is stdin/stdout.  Exit status: (v << 1) | 1 for a
write of v to port 0xf4; 0 guest reset; 2 usage or load error; 4 triple
fault; 6 emulation failure; 8 other internal error; 10 VMM error;
124 timeout; 130 interrupted.
"""


class _Help(Exception):
    pass


def _finite(v: float) -> bool:
    return v - v == 0.0             # False for nan and +-inf (and no `math` import)


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
    if not _finite(v) or v != int(v) or v <= 0:
        raise UsageError(f"--memory {text!r}: want a whole, positive number of MiB")
    return int(v)


def _decimal(option: str, text: str, low: int, high: int, what: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise UsageError(f"{option} {text!r}: not a number") from None
    if not low <= n <= high:
        raise UsageError(f"{option} {text!r}: want {what} {low}..{high}")
    return n


def _smp(text: str) -> int:
    first = text.split(",")[0]
    return _decimal("--smp", first[5:] if first.startswith("cpus=") else first, 1, 255, "CPUs")


def _timeout(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise UsageError(f"--timeout {text!r}: not a number of seconds") from None
    if not (_finite(v) and 0 < v <= threading.TIMEOUT_MAX):
        raise UsageError(f"--timeout {text!r}: want a positive, finite number of seconds")
    return v




def _port(text: str) -> int:
    return _decimal("--gdb", text, 0, 0xFFFF, "a port")


def parse_args(argv: list[str]) -> dict[str, Any]:
    """The options as a dict of :class:`~pykvm.vmm.machine.Machine` arguments (raises UsageError)."""
    opts: dict[str, Any] = {"smp": 1, "memory_mib": 128, "append": "", "modules": [],
                            "timeout": None, "gdb": None}
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
            raise _Help()
        if name == "--smp":
            opts["smp"] = _smp(value(name))
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
            opts["timeout"] = _timeout(value(name))
            taking_modules = False
        elif name == "--gdb":
            opts["gdb"] = _port(a.split("=", 1)[1]) if "=" in a else GDB_SOCKET
            taking_modules = False
        elif a == "--":
            rest = argv[i + 1:]
            if kernel is None and rest:
                kernel, rest = rest[0], rest[1:]
            if rest:
                raise UsageError(f"unexpected arguments: {' '.join(rest)!r}")
            break
        elif a.startswith("-") and a != "-":
            raise UsageError(f"unknown option {a!r}")
        elif kernel is None and not taking_modules:
            kernel = a
        elif taking_modules:
            opts["modules"].append(a)
        else:
            raise UsageError(f"unexpected argument {a!r} (one KERNEL only)")
        i += 1
    if kernel is None:
        raise UsageError("no KERNEL given")
    if opts["memory_mib"] < 2 or opts["memory_mib"] > 1 << 20:
        raise UsageError(f"--memory {opts['memory_mib']} MiB: want 2 MiB .. 1 TiB")
    if opts["gdb"] is not None and opts["smp"] != 1:
        raise UsageError("--gdb debugs one CPU: use --smp 1")
    opts["kernel"] = kernel
    return opts


_machine: Any = None


def main(argv: list[str] | None = None,
         ready: Callable[[Any], None] | None = None) -> int:
    """Run the VMM with *argv* (default ``sys.argv[1:]``); return the exit status.

    *ready(machine)* is called once the VM is set up, before the guest runs.
    """
    args = sys.argv[1:] if argv is None else list(argv)

    def body() -> int:
        global _machine
        try:
            opts = parse_args(args)
        except _Help:
            sys.stdout.write(USAGE)
            return 0
        except UsageError as e:
            error(PROG, f"{e} (see --help)")
            return LOAD_ERROR
        from .errors import MachineError
        from .machine import Machine
        from .status import VMM_ERROR

        kernel = opts.pop("kernel")
        try:
            _machine = Machine(kernel, **opts)
            return int(_machine.run(ready))
        except MachineError as e:
            error(PROG, str(e))
            return e.status
        except Exception as e:          # a VMM bug: the VMM's own status, not command's 3
            if os.environ.get("PYKVM_DEBUG"):
                raise
            error(PROG, f"internal error: {type(e).__name__}: {e} "
                        "(set PYKVM_DEBUG=1 for the traceback)")
            return VMM_ERROR

    return run_command(PROG, body)


def run_as_program(argv: list[str] | None = None) -> int:
    """``python -m pykvm.vmm`` (and ``pykvm vmm``, given *argv*): run :func:`main`,
    flush, and leave without teardown.  Returns (the status) only when no guest
    was started (``--help``, a usage or load error); otherwise never returns.

    The process exits through ``os._exit``: no interpreter teardown runs while
    vCPU threads may still sit in ``KVM_RUN``, and the VM's destruction (KVM
    waits for RCU/SRCU grace periods, tens of milliseconds on a busy host) is
    handed to a helper process (:func:`hand_over_teardown`), so whoever waits
    for our exit status does not wait for it.  The helper is started after the
    run and holds ``/dev/kvm`` as well: on some hosts (PVM) dropping that fd,
    or state the run created, costs as much as the VM itself.
    """
    status = main(argv)
    if _machine is None:
        return status
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        if not os.environ.get("PYKVM_VMM_SYNC_TEARDOWN"):
            hand_over_teardown(_machine)
    finally:
        os._exit(status)


_CAT = ("/bin/cat", "/usr/bin/cat")


def hand_over_teardown(machine: Any) -> int | None:
    """Give the last references to the VM to a helper that outlives us; return its pid.

    KVM destroys a VM when the last reference goes: its fd, its vCPU fds (and
    their mappings); closing ``/dev/kvm`` can cost as much on some hosts (PVM).
    ``posix_spawn`` starts ``cat`` with copies of those fds
    and a pipe as stdin whose other end only this process holds; stdout and
    stderr go to ``/dev/null``, so a reader of our output sees end of file as
    we exit.  When we exit, ``cat`` reads end of file, exits, and pays for the
    destruction.  Unlike ``fork()`` this is safe in a threaded process (Python
    3.12+ warns about ``fork`` there); when no other thread is left (the usual
    case: the vCPU threads are gone and stdin is not a terminal still being
    read) a forked child does the same job for less.  Returns None (the caller then destroys
    the VM itself) when there is nothing to hand over or no ``cat``.
    """
    vm = getattr(machine, "vm", None)
    if vm is None or vm.closed:
        return None
    cat = next((p for p in _CAT if os.access(p, os.X_OK)), None)
    if cat is None:
        return None
    kvm = getattr(machine, "kvm", None)
    fds = [vm.fileno()] + [v.fileno() for v in getattr(machine, "vcpus", []) if not v.closed]
    if kvm is not None and not kvm.closed:
        fds.append(kvm.fileno())
    try:
        r, w = os.pipe()                # both close-on-exec: w stays ours alone
    except OSError:
        return None
    if threading.active_count() == 1:
        # No other thread (the vCPU threads are gone, stdin is at its end): fork is
        # safe here and cheaper than starting a program.  The child keeps copies of
        # every fd, closes stdio so readers of our output see its end, and waits.
        try:
            pid = os.fork()
        except OSError:
            pid = -1
        if pid == 0:
            try:
                os.closerange(0, 3)
                os.close(w)
                os.read(r, 1)           # end of file: we have exited
            finally:
                os._exit(0)
        if pid > 0:
            os.close(r)
            return pid
    actions: list[Any] = [(os.POSIX_SPAWN_DUP2, r, 0),
                          (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                          (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)]
    actions += [(os.POSIX_SPAWN_DUP2, fd, 3 + k) for k, fd in enumerate(fds)]
    try:
        return os.posix_spawn(cat, [cat], {}, file_actions=actions)
    except OSError:
        os.close(w)
        return None
    finally:
        os.close(r)                     # w stays open until we exit
