"""The ``pykvm`` command (also ``python -m pykvm``): one command, one subcommand per application.

::

    pykvm probe     what this host's KVM can do, and why not (--brief, --check, --json)
    pykvm diff      compare two probe reports field by field
    pykvm demo      a hello-world guest and a capability summary
    pykvm vmm       boot a multiboot kernel (like qemu -kernel)
    pykvm snapshot  inspect, verify and check snapshot files
    pykvm gdb       debug a guest with gdb (the GDB remote stub)
    pykvm bench     the benchmark suite (pykvm next to C and Unicorn)
    pykvm stat      live KVM statistics of any running VM

Each subcommand is a ``main(argv) -> int`` in its application's ``cli``
module, imported only when it is asked for (``pykvm probe`` does not load
the VMM).  ``python -m pykvm.vmm``, ``python -m pykvm.snapshot`` ... stay as
aliases of the same ``main``.  Every subcommand follows :mod:`pykvm.command`:
exit status 0 ok, 1 "no" (KVM unusable, hosts differ, a check failed, a guest
reported failure), 2 usage error, 3 internal error; messages are one line
``pykvm <cmd>: ...``; ``docs/cli.md`` describes them all.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from .command import EXIT_OK, EXIT_USAGE, error, run_command

__all__ = ["COMMANDS", "main", "resolve"]

# name -> (one-line help, entry points "module:function", the first importable one wins).
# The later entries are the entry points of before the one-command layout: kept until
# every application has its cli module (see docs/cli.md).
COMMANDS: dict[str, tuple[str, Sequence[str]]] = {
    "probe": ("what this host's KVM can do, and why not (--brief, --check, --json)",
              ("pykvm.probe.cli:main",)),
    "diff": ("compare two probe reports (JSON) field by field",
             ("pykvm.probe.cli:diff_main",)),
    "demo": ("a hello-world guest and a capability summary", ("pykvm.demo:main",)),
    "vmm": ("boot a multiboot kernel on /dev/kvm (like qemu -kernel)",
            ("pykvm.vmm.cli:run_as_program",)),
    "snapshot": ("inspect, verify and check pykvm snapshot files",
                 ("pykvm.snapshot.cli:main",)),
    "gdb": ("debug a guest with gdb through the GDB remote stub",
            ("pykvm.gdbstub.cli:main",)),
    "bench": ("the benchmark suite: what KVM and pykvm cost on this host",
              ("pykvm.bench.cli:main",)),
    "stat": ("live KVM statistics of a running VM (any process, like kvm_stat)",
             ("pykvm.kvm_stat.cli:main",)),
}


def resolve(name: str) -> Callable[[list[str] | None], int] | None:
    """The ``main`` of subcommand *name*, or None if no entry point of it is installed.

    Only a missing module counts as "not installed": an error while importing
    an existing module propagates (an internal error, exit status 3).
    """
    for spec in COMMANDS[name][1]:
        module_name, _, func = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
                continue
            raise
        fn = getattr(module, func, None)
        if callable(fn):
            return fn  # type: ignore[no-any-return]
    return None


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: pykvm [--version] [--help] COMMAND [ARGS...]", "",
             "pykvm: a thin Python binding over Linux /dev/kvm.", "", "commands:"]
    lines += [f"  {n:<{width}}  {h}" for n, (h, _) in COMMANDS.items()]
    lines += ["", "'pykvm COMMAND --help' describes a command.",
              "Exit status: 0 ok, 1 no (KVM unusable, hosts differ, a check failed, guest failure),",
              "2 usage error, 3 internal error (PYKVM_DEBUG=1 shows the traceback)."]
    return "\n".join(lines) + "\n"


def _version() -> str:
    from . import __version__

    return f"pykvm {__version__} (distribution kvmbind, Python {sys.version.split()[0]})\n"


def _dispatch(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write(_usage())
        return EXIT_USAGE
    first = argv[0]
    if first in ("-h", "--help", "help") and len(argv) == 1:
        sys.stdout.write(_usage())
        return EXIT_OK
    if first == "help":                    # pykvm help COMMAND == pykvm COMMAND --help
        return _dispatch([argv[1], "--help"])
    if first in ("-V", "--version"):
        sys.stdout.write(_version())
        return EXIT_OK
    if first not in COMMANDS:
        error("", f"unknown command {first!r}; choose from {', '.join(COMMANDS)} "
                  "('pykvm --help' lists them)")
        return EXIT_USAGE
    fn = resolve(first)
    if fn is None:
        error(first, "not part of this installation of pykvm")
        return EXIT_USAGE
    return int(fn(argv[1:]) or 0)


def main(argv: list[str] | None = None) -> int:
    """Run the ``pykvm`` command with *argv* (default ``sys.argv[1:]``); return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    return run_command("", lambda: _dispatch(args))
