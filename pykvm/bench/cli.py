"""``pykvm bench``: run the suite, print a table, optionally write JSON, Markdown, a chart.

Examples::

    pykvm bench                               # quick mode (< 1 minute)
    pykvm bench --full --json out.json --chart out.png
    pykvm bench --quick --markdown docs/benchmarks.md
    pykvm bench --only exits,ioctl --rounds 3

Exit status (:mod:`pykvm.command`): 0 done, 1 KVM not usable here, 2 usage
error (an output path that cannot be written is refused before the run),
3 internal error.  Progress lines go to stderr (``-q`` silences them).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..command import EXIT_NO, EXIT_OK, UsageError, error, run_command

__all__ = ["main"]

PROG = "bench"


def _parser() -> argparse.ArgumentParser:
    from .cases.base import GROUPS

    p = argparse.ArgumentParser(prog="pykvm bench",
                                description="What KVM costs on this host: pykvm next to C and Unicorn, in one run.",
                                epilog="Exit status: 0 done, 1 KVM not usable, 2 usage error, 3 internal error.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="quick mode (default; under a minute)")
    mode.add_argument("--full", action="store_true", help="full mode: more rounds, bigger batches, "
                      "dirty fractions up to 100%% (a few minutes)")
    p.add_argument("--only", metavar="GROUPS", help=f"comma-separated groups to run: {','.join(GROUPS)}")
    p.add_argument("--rounds", type=int, help="interleaved rounds per measurement (default 11 quick, 25 full)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time batches of ioctls/exits/compute by wall time (default) or by the thread's CPU "
                        "time, which leaves out preemption on a busy host (life cycle and dirty tracking "
                        "always use wall time)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply batch sizes by this (e.g. 0.05 for a smoke run)")
    p.add_argument("--dirty-fractions", metavar="F,F..", help="dirty-log fractions, e.g. 0,0.01,0.1,1")
    p.add_argument("--ring-fractions", metavar="F,F..", help="dirty-ring fractions, e.g. 0.01,0.1")
    p.add_argument("--json", metavar="FILE", type=Path, help="write every sample and summary as JSON")
    p.add_argument("--markdown", metavar="FILE", type=Path,
                   help="regenerate the results block of FILE (e.g. docs/benchmarks.md)")
    p.add_argument("--chart", metavar="FILE.png", type=Path, help="bar chart (needs matplotlib)")
    p.add_argument("--no-c", action="store_true", help="skip the C reference")
    p.add_argument("--no-unicorn", action="store_true", help="skip the Unicorn comparison")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _fractions(option: str, text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option}: not a comma-separated list of numbers: {text!r}") from None
    for f in out:
        if not 0.0 <= f <= 1.0:  # also refuses nan
            raise UsageError(f"{option}: fraction {f} not in [0, 1]")
    return out


def check_output_path(option: str, path: Path) -> None:
    """Refuse (:class:`UsageError`) an output path that cannot be written, before a long run.

    Nothing is created: the directory must exist and be writable, and an
    existing *path* must be a regular file this user may write.
    """
    directory = path.parent if str(path.parent) else Path(".")
    if path.exists() and (path.is_dir() or not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path}: " + ("is a directory" if path.is_dir() else "not writable"))
    if not directory.is_dir():
        raise UsageError(f"{option} {path}: directory {directory} does not exist")
    if not path.exists() and not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: directory {directory} is not writable")


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    import pykvm

    from . import report
    from .cases.base import GROUP_TITLES, GROUPS, Config
    from .suite import Suite, host_info

    cfg = Config.full() if args.full else Config.quick()
    if args.scale != 1.0:
        if not (math.isfinite(args.scale) and 0 < args.scale <= 100):
            raise UsageError(f"--scale {args.scale}: must be in (0, 100]")
        cfg = cfg.scaled(args.scale)
    if args.rounds is not None:
        if not 1 <= args.rounds <= 1000:
            raise UsageError(f"--rounds {args.rounds}: must be in 1..1000")
        cfg.rounds = cfg.cold_rounds = args.rounds
    if args.only:
        groups = [g.strip() for g in args.only.split(",") if g.strip()]
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            raise UsageError(f"--only: unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
        cfg.groups = groups
    if args.dirty_fractions:
        cfg.dirty_fractions = _fractions("--dirty-fractions", args.dirty_fractions)
    if args.ring_fractions:
        cfg.ring_fractions = _fractions("--ring-fractions", args.ring_fractions)
    for option in ("json", "markdown", "chart"):
        path = getattr(args, option)
        if path is not None:
            check_output_path(f"--{option}", path)

    def log(text: str) -> None:
        if not args.quiet:
            print(f"pykvm bench: {text}", file=sys.stderr, flush=True)

    try:
        suite = Suite(cfg, log=log, use_c=not args.no_c, use_unicorn=not args.no_unicorn, clock=args.clock)
    except pykvm.KvmUnavailable as e:
        error(PROG, f"KVM is not usable here: {e}")
        return EXIT_NO
    created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    t0 = time.monotonic()
    try:
        host = host_info(suite.kvm)
        suite.run()
    finally:
        suite.close()
    duration = time.monotonic() - t0
    try:
        host["loadavg_end"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    host.update(suite.info)
    mode = cfg.mode + ("" if args.scale == 1.0 else f", scale {args.scale:g}") + \
        ("" if args.clock == "wall" else ", CPU-time clock")
    host["clock"] = args.clock
    targets = report.evaluate_targets(suite.rows, host)
    notes = list(suite.notes)
    if args.chart:
        msg = report.chart(suite.rows, args.chart)
        if msg:
            notes.append(msg)
    print(report.text_report(suite.rows, GROUP_TITLES, targets, notes, host, mode), end="")
    print(f"({duration:.1f} s)")
    if args.json:
        report.write_json(args.json, report.to_json(suite.rows, targets, notes, host, asdict(cfg), mode,
                                                    created, duration))
    if args.markdown:
        command = "pykvm bench " + " ".join(argv if argv is not None else sys.argv[1:])
        report.write_markdown(args.markdown, report.markdown_section(
            suite.rows, GROUP_TITLES, targets, notes, host, mode, created, command.strip()))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run ``pykvm bench`` with *argv* (default ``sys.argv[1:]``); return the exit status."""
    return run_command(PROG, lambda: _run(argv))
