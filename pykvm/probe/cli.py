"""``pykvm probe`` and ``pykvm diff``: the host capability probe and the report comparison.

Exit status (:mod:`pykvm.command`):

* ``probe``: 0 when KVM is usable (the device opened read-write and answered
  API version 12), 1 when it is not; with ``--check``, 1 when a check FAILs;
* ``diff``: 0 when nothing compared differs, 1 when the hosts differ, 2 when
  a file is not a probe report this pykvm reads (the message names the file
  and the field);
* 2: usage error; 3: internal error (``PYKVM_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from ..command import EXIT_NO, EXIT_OK, UsageError, run_command
from .loader import ReportError

__all__ = ["diff_main", "main"]


def _out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def _probe_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pykvm probe",
        description="Report what this host's KVM can do, and why not.",
        epilog="Exit status: 0 KVM usable (with --check: no check failed), 1 not usable "
               "(a check failed), 2 usage error, 3 internal error.")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print the report as JSON (stable keys)")
    form.add_argument("--brief", action="store_true",
                      help="a kvm-ok-style verdict: one line, and a hint when KVM is not usable")
    form.add_argument("--check", action="store_true",
                      help="a virt-host-validate-style PASS/WARN/FAIL checklist")
    p.add_argument("--bench", action="store_true",
                   help="add a few seconds of exit-latency measurements")
    p.add_argument("--bench-seconds", type=float, default=0.5, metavar="S",
                   help="seconds per measurement with --bench (default 0.5, at most 60)")
    p.add_argument("--device", default="/dev/kvm", metavar="PATH",
                   help="the KVM device (default /dev/kvm)")
    p.add_argument("--diff", nargs=2, metavar=("A.json", "B.json"),
                   help="compare two saved reports instead of probing (like 'pykvm diff')")
    return p


def _probe(argv: list[str] | None) -> int:
    ns = _probe_parser().parse_args(argv)
    if ns.diff:
        return _diff_files(ns.diff[0], ns.diff[1], as_json=ns.json)
    if not (math.isfinite(ns.bench_seconds) and 0 < ns.bench_seconds <= 60):
        raise UsageError("--bench-seconds must be in (0, 60]")
    from . import probe
    from .check import FAIL, brief, checklist, render_checklist
    from .text import render

    report = probe(ns.device, bench=ns.bench, bench_seconds=ns.bench_seconds)
    if ns.brief:
        _out(brief(report))
    elif ns.check:
        checks = checklist(report)
        _out(render_checklist(checks))
        return EXIT_NO if any(c.status == FAIL for c in checks) else EXIT_OK
    else:
        _out(report.to_json() if ns.json else render(report))
    return report.exit_status


def main(argv: list[str] | None = None) -> int:
    """``pykvm probe`` with *argv* (default ``sys.argv[1:]``); return the exit status."""
    return run_command("probe", lambda: _probe(argv), (ReportError,))


def _diff_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pykvm diff",
        description="Compare two reports from 'pykvm probe --json', field by field, and say "
                    "whether a guest set up on one host can run on the other. With one file, "
                    "compare it with this host now.",
        epilog="Exit status: 0 nothing differs, 1 the hosts differ, 2 a file is not a probe "
               "report this pykvm reads (or a usage error), 3 internal error.")
    p.add_argument("a", metavar="A.json")
    p.add_argument("b", metavar="B.json", nargs="?", help="default: probe this host now")
    p.add_argument("--json", action="store_true", help="print the differences as JSON")
    p.add_argument("--device", default="/dev/kvm", metavar="PATH",
                   help="device to probe when B is omitted")
    return p


def _diff_docs(a: dict[str, Any], b: dict[str, Any], a_name: str, b_name: str, as_json: bool) -> int:
    from .diff import diff, render_diff

    d = diff(a, b, a_name, b_name)
    _out(json.dumps(d.to_dict(), indent=2) if as_json else render_diff(d))
    return EXIT_OK if d.identical else EXIT_NO


def _diff_files(a_path: str, b_path: str | None, *, as_json: bool, device: str = "/dev/kvm") -> int:
    from .loader import load

    a = load(a_path)
    if b_path is None:
        from . import probe

        b, b_name = probe(device).to_dict(), "this host (now)"
    else:
        b, b_name = load(b_path), b_path
    return _diff_docs(a, b, a_path, b_name, as_json)


def _diff(argv: list[str] | None) -> int:
    ns = _diff_parser().parse_args(argv)
    return _diff_files(ns.a, ns.b, as_json=ns.json, device=ns.device)


def diff_main(argv: list[str] | None = None) -> int:
    """``pykvm diff`` with *argv* (default ``sys.argv[1:]``); return the exit status."""
    return run_command("diff", lambda: _diff(argv), (ReportError,))
