"""``pykvm stat --pid PID``: a live, top-like view of any process's KVM statistics.

Works on any process that holds KVM VM fds: QEMU, Firecracker, a pykvm
script.  The statistics come from the binary statistics fds of the process's
VM and vCPU fds (borrowed with ``pidfd_getfd``; needs ptrace access to the
process), or, when that is refused, from debugfs (``/sys/kernel/debug/kvm``,
root only).  Every frame shows each statistic's total and its rate per second
over the last interval, busiest first; statistics that are still zero are left
out unless ``--all``.

Exit status: 0 ok; 1 the statistics cannot be read (not a KVM process, no
permission and no fallback: the message names the missing permission);
2 usage (bad arguments, no such process); 3 internal error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from typing import Any, TextIO

from ..command import EXIT_NO, EXIT_OK, UsageError, error, run_command
from .source import DebugfsSource, FdSource, NoAccess, NoStatsFd, StatSourceError, process_name

__all__ = ["main", "rates", "render"]

PROG = "stat"
Source = FdSource | DebugfsSource


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pykvm stat",
        description="Show the KVM statistics of a running process (QEMU, Firecracker, a pykvm "
                    "script) live, as rates per second, busiest first.",
        epilog="Exit status: 0 ok, 1 statistics unreadable (the message says which permission is "
               "missing), 2 usage error, 3 internal error.")
    p.add_argument("--pid", "-p", type=int, required=True, help="the process that holds the VM")
    p.add_argument("-f", "--fields", metavar="REGEX",
                   help="show only statistics whose name matches this regular expression")
    p.add_argument("-i", "--interval", type=float, default=1.0, metavar="S",
                   help="seconds between frames (default 1; 0.05 .. 3600)")
    p.add_argument("-1", "--once", action="store_true",
                   help="one frame (two samples one interval apart) and exit")
    p.add_argument("-n", "--count", type=int, default=0, metavar="N",
                   help="stop after N frames (default: until Ctrl-C or the process exits)")
    p.add_argument("--json", action="store_true",
                   help="print each frame as one JSON object per line")
    p.add_argument("-a", "--all", action="store_true", help="also show statistics that are zero")
    p.add_argument("--source", choices=("auto", "fd", "debugfs"), default="auto",
                   help="stats fds via pidfd_getfd, debugfs, or the first that works (default)")
    return p


def rates(before: dict[str, int], after: dict[str, int], seconds: float) -> dict[str, dict[str, float]]:
    """``{name: {"total": after, "rate": (after - before) / seconds}}`` for every name in *after*."""
    return {name: {"total": value, "rate": (value - before.get(name, value)) / seconds}
            for name, value in after.items()}


def _rows(frame: dict[str, dict[str, float]], pattern: re.Pattern[str] | None,
          show_all: bool) -> list[tuple[str, float, float]]:
    rows = [(name, v["total"], v["rate"]) for name, v in frame.items()
            if (pattern is None or pattern.search(name)) and (show_all or v["total"] or v["rate"])]
    rows.sort(key=lambda r: (-r[2], -r[1], r[0]))
    return rows


def render(rows: list[tuple[str, float, float]], header: str, limit: int | None = None) -> str:
    """The text of one frame: a header line, then name, total and rate per second."""
    width = max([len("statistic")] + [len(r[0]) for r in rows])
    lines = [header, f"{'statistic':<{width}} {'total':>16} {'per second':>14}"]
    for name, total, rate in rows[:limit]:
        lines.append(f"{name:<{width}} {int(total):>16} {rate:>14.1f}")
    if limit is not None and len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more (narrow with -f)")
    return "\n".join(lines) + "\n"


def _open(pid: int, which: str) -> Source:
    if which == "debugfs":
        return DebugfsSource(pid)
    try:
        return FdSource(pid)
    except (NoAccess, NoStatsFd) as e:
        if which == "fd":
            raise
        try:
            src = DebugfsSource(pid)
            error(PROG, f"{e}; reading debugfs instead")
            return src
        except StatSourceError as fallback:
            raise type(e)(f"{e}; the debugfs fallback failed too: {fallback}") from None


def _check(ns: argparse.Namespace) -> re.Pattern[str] | None:
    if not 0 < ns.pid <= 2**22:
        raise UsageError(f"--pid {ns.pid} is not a process id")
    if not 0.05 <= ns.interval <= 3600:
        raise UsageError(f"--interval {ns.interval} is out of range (0.05 .. 3600 seconds)")
    if ns.count < 0:
        raise UsageError(f"--count {ns.count} is negative")
    if not os.path.exists(f"/proc/{ns.pid}"):
        raise UsageError(f"no process {ns.pid}")
    try:
        return re.compile(ns.fields) if ns.fields is not None else None
    except re.error as e:
        raise UsageError(f"-f {ns.fields!r} is not a regular expression: {e}") from None


def _loop(ns: argparse.Namespace, src: Source, pattern: re.Pattern[str] | None, out: TextIO) -> int:
    tty = out.isatty() and not ns.json
    frames = 1 if ns.once else ns.count
    comm = process_name(ns.pid)
    before, t0 = src.sample(), time.monotonic()
    unreadable = getattr(src, "unreadable", {})
    if unreadable:
        reasons = sorted(set(unreadable.values()))
        error(PROG, f"{len(unreadable)} debugfs statistics unreadable ({', '.join(reasons)}), "
                    f"e.g. {', '.join(sorted(unreadable)[:3])}: they are left out")
    shown = 0
    while frames == 0 or shown < frames:
        time.sleep(ns.interval)
        if src.exited():
            error(PROG, f"process {ns.pid} ({comm}) exited")
            return EXIT_OK if shown else EXIT_NO
        after, t1 = src.sample(), time.monotonic()
        frame = rates(before, after, max(t1 - t0, 1e-9))
        rows = _rows(frame, pattern, ns.all)
        if ns.json:
            doc: dict[str, Any] = {
                "pid": ns.pid, "comm": comm, "source": src.name, "vms": src.vms, "vcpus": src.vcpus,
                "interval": round(t1 - t0, 6),
                "stats": {name: {"total": int(total), "rate": rate} for name, total, rate in rows}}
            out.write(json.dumps(doc) + "\n")
        else:
            header = (f"pykvm stat: pid {ns.pid} ({comm}), {src.vms} VM(s), {src.vcpus} vCPU(s), "
                      f"source {src.name}, interval {t1 - t0:.2f} s")
            limit = shutil.get_terminal_size().lines - 3 if tty else None
            out.write(("\x1b[H\x1b[2J" if tty else "") + render(rows, header, limit)
                      + ("" if tty else "\n"))
        out.flush()
        shown += 1
        before, t0 = after, t1
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run ``pykvm stat`` with *argv* (default ``sys.argv[1:]``); return the exit status."""

    def body() -> int:
        ns = _parser().parse_args(argv)
        pattern = _check(ns)
        try:
            src = _open(ns.pid, ns.source)
        except StatSourceError as e:
            if not os.path.exists(f"/proc/{ns.pid}"):
                raise UsageError(f"no process {ns.pid}") from None
            error(PROG, str(e))
            return EXIT_NO
        with src:
            try:
                return _loop(ns, src, pattern, sys.stdout)
            except KeyboardInterrupt:
                return EXIT_OK  # Ctrl-C is how a live view ends

    return run_command(PROG, body)
