"""The conventions every ``pykvm`` subcommand follows (probe, diff, demo, vmm,
snapshot, gdb, bench, stat ...), in one place.

Exit status, for every subcommand:

* :data:`EXIT_OK` (0): success;
* :data:`EXIT_NO` (1): a "no" answer: KVM unusable, hosts or files differ, a
  guest reported failure (the VMM documents its own guest-status mapping);
* :data:`EXIT_USAGE` (2): bad arguments or an input file that is not what the
  command reads (the message names the file and the field);
* :data:`EXIT_INTERNAL` (3): an internal error in pykvm;
* 130: interrupted (Ctrl-C).

Messages go to stderr as one line, ``pykvm <cmd>: <message>``; a traceback
only with ``PYKVM_DEBUG=1``.  A closed stdout (``pykvm probe | head``) ends
the command quietly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

__all__ = [
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_NO",
    "EXIT_OK",
    "EXIT_USAGE",
    "UsageError",
    "error",
    "run_command",
]

EXIT_OK = 0
EXIT_NO = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad arguments or a bad input file: the command prints the message and exits 2."""


def error(prog: str, message: str) -> None:
    """Print ``pykvm <prog>: <message>`` on stderr (one line)."""
    text = " ".join(str(message).split())
    print(f"pykvm {prog}: {text}" if prog else f"pykvm: {text}", file=sys.stderr, flush=True)


def run_command(prog: str, body: Callable[[], int],
                usage_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run *body* under the conventions above and return the exit status.

    ``SystemExit`` from argparse passes its code through (``--help`` is 0,
    a usage error 2); :class:`UsageError` and the exception types in
    *usage_errors* (e.g. ``SnapshotError``) print one line and give 2;
    anything else is an internal error (3).  A command that has its own
    "no" outcomes (status 1) returns them from *body*.
    """
    refused: tuple[type[BaseException], ...] = (UsageError, *tuple(usage_errors))
    try:
        return int(body() or 0)
    except SystemExit as e:
        code = e.code
        if code is None:
            return EXIT_OK
        if isinstance(code, int):
            return code
        error(prog, str(code))
        return EXIT_USAGE
    except KeyboardInterrupt:
        error(prog, "interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_NO
    except refused as e:
        if os.environ.get("PYKVM_DEBUG"):
            raise
        error(prog, str(e))
        return EXIT_USAGE
    except Exception as e:
        if os.environ.get("PYKVM_DEBUG"):
            raise
        error(prog, f"internal error: {type(e).__name__}: {e} (set PYKVM_DEBUG=1 for the traceback)")
        return EXIT_INTERNAL


def _quiet_stdout() -> None:
    try:  # the reader went away: send the rest of our output nowhere
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
