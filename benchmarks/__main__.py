"""``python -m benchmarks``: run the suite, print a table, optionally write JSON, Markdown, a chart.

Examples::

    python -m benchmarks                      # quick mode (< 1 minute)
    python -m benchmarks --full --json out.json --chart out.png
    python -m benchmarks --quick --markdown docs/benchmarks.md
    python -m benchmarks --only exits,ioctl --rounds 3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    from .suite import GROUPS

    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description="What KVM costs on this host: pykvm next to C and Unicorn, in one run.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="quick mode (default; under a minute)")
    mode.add_argument("--full", action="store_true", help="full mode: more rounds, bigger batches, "
                      "dirty fractions up to 100%% (a few minutes)")
    p.add_argument("--only", metavar="GROUPS", help=f"comma-separated groups to run: {','.join(GROUPS)}")
    p.add_argument("--rounds", type=int, help="interleaved rounds per measurement (default 7 quick, 15 full)")
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


def _fractions(s: str) -> List[float]:
    out = [float(x) for x in s.split(",") if x.strip()]
    for f in out:
        if not 0.0 <= f <= 1.0:
            raise argparse.ArgumentTypeError(f"fraction {f} not in [0, 1]")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    import pykvm

    from . import report
    from .suite import GROUP_TITLES, GROUPS, Config, Suite, host_info

    cfg = Config.full() if args.full else Config.quick()
    if args.scale != 1.0:
        if args.scale <= 0:
            print("--scale must be positive", file=sys.stderr)
            return 2
        cfg = cfg.scaled(args.scale)
    if args.rounds:
        cfg.rounds = cfg.cold_rounds = max(1, args.rounds)
    if args.only:
        groups = [g.strip() for g in args.only.split(",") if g.strip()]
        bad = [g for g in groups if g not in GROUPS]
        if bad:
            print(f"unknown group(s) {', '.join(bad)}; choose from {', '.join(GROUPS)}", file=sys.stderr)
            return 2
        cfg.groups = groups
    try:
        if args.dirty_fractions:
            cfg.dirty_fractions = _fractions(args.dirty_fractions)
        if args.ring_fractions:
            cfg.ring_fractions = _fractions(args.ring_fractions)
    except (ValueError, argparse.ArgumentTypeError) as e:
        print(f"bad fractions: {e}", file=sys.stderr)
        return 2

    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        suite = Suite(cfg, log=log, use_c=not args.no_c, use_unicorn=not args.no_unicorn, clock=args.clock)
    except pykvm.KvmUnavailable as e:
        print(f"KVM is not usable here: {e}", file=sys.stderr)
        return 1
    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
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
    host.update({k: v for k, v in suite.info.items()})
    mode = cfg.mode + ("" if args.scale == 1.0 else f", scale {args.scale:g}") + \
        ("" if args.clock == "wall" else ", CPU-time clock")
    host["clock"] = args.clock
    targets = report.evaluate_targets(suite.rows)
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
        command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
        report.write_markdown(args.markdown, report.markdown_section(
            suite.rows, GROUP_TITLES, targets, notes, host, mode, created, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
