"""The ``pykvm`` command (also ``python -m pykvm``).

Subcommands::

    pykvm probe [--json] [--bench] [--device PATH]   what this host's KVM can do, and why not
    pykvm probe --diff A.json B.json                 same as 'pykvm diff A.json B.json'
    pykvm diff A.json [B.json] [--json]              compare two hosts (B defaults to this host, now)
    pykvm demo [...]                                 a guest in a few lines (pykvm.demo)
    pykvm bench [...]                                the benchmark suite (benchmarks/, in a checkout)

Exit status:

* ``probe``: 0 when KVM is usable (the device opened read-write and answered
  API version 12), 1 when it is not (the output says why and what to do);
* ``diff``: 0 when nothing compared differs, 1 when the hosts differ;
* 2: usage error, or an input file that is not a probe report;
* 3: an internal error in pykvm (one line on stderr; ``PYKVM_DEBUG=1`` shows
  the traceback); 130: interrupted.

No subcommand prints a Python traceback for an environment problem.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import List, Optional

__all__ = ["main", "EXIT_OK", "EXIT_UNUSABLE", "EXIT_DIFFERENT", "EXIT_USAGE", "EXIT_INTERNAL"]

EXIT_OK = 0
EXIT_UNUSABLE = 1
EXIT_DIFFERENT = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="pykvm", description="pykvm: a thin Python binding over Linux /dev/kvm.",
        epilog="Exit status: probe 0 = KVM usable, 1 = not usable; diff 0 = same, 1 = different; "
               "2 = usage error; 3 = internal error.")
    p.add_argument("--version", action="version", version=f"pykvm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    pr = sub.add_parser("probe", help="report what this host's KVM can do (and why not)",
                        description="Report what this host's KVM can do, and why not. "
                                    "Exit status 0 if KVM is usable, 1 if not.")
    pr.add_argument("--json", action="store_true", help="print the report as JSON (stable keys)")
    pr.add_argument("--bench", action="store_true",
                    help="add a few seconds of exit-latency measurements")
    pr.add_argument("--bench-seconds", type=float, default=0.5, metavar="S",
                    help="seconds per measurement with --bench (default 0.5)")
    pr.add_argument("--device", default="/dev/kvm", metavar="PATH",
                    help="the KVM device (default /dev/kvm)")
    pr.add_argument("--diff", nargs=2, metavar=("A.json", "B.json"),
                    help="compare two saved reports instead of probing (like 'pykvm diff')")

    df = sub.add_parser("diff", help="compare two probe reports (JSON)",
                        description="Compare two reports from 'pykvm probe --json'. With one file, "
                                    "compare it with this host now. Exit status 0 if nothing "
                                    "differs, 1 if the hosts differ, 2 if a file is not a report.")
    df.add_argument("a", metavar="A.json")
    df.add_argument("b", metavar="B.json", nargs="?", help="default: probe this host now")
    df.add_argument("--json", action="store_true", help="print the differences as JSON")
    df.add_argument("--device", default="/dev/kvm", metavar="PATH",
                    help="device to probe when B is omitted")

    for name, text in (("demo", "run the demo guest (pykvm.demo)"),
                       ("bench", "run the benchmark suite (benchmarks/ in a source checkout)")):
        sp = sub.add_parser(name, help=text, add_help=False)
        sp.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(f"pykvm: {text}\n")


def _cmd_probe(ns: argparse.Namespace) -> int:
    if ns.diff:
        return _diff_files(ns.diff[0], ns.diff[1], as_json=ns.json)
    if ns.bench_seconds <= 0 or ns.bench_seconds > 60:
        _err("--bench-seconds must be in (0, 60]")
        return EXIT_USAGE
    from .probe import probe

    report = probe(ns.device, bench=ns.bench, bench_seconds=ns.bench_seconds)
    _out(report.to_json() if ns.json else report.text())
    return report.exit_status


def _diff_docs(a: dict, b: dict, a_name: str, b_name: str, as_json: bool) -> int:
    from .probe.diff import diff, render_diff

    d = diff(a, b, a_name, b_name)
    _out(json.dumps(d.to_dict(), indent=2) if as_json else render_diff(d))
    return EXIT_OK if d.identical else EXIT_DIFFERENT


def _diff_files(a_path: str, b_path: Optional[str], *, as_json: bool,
                device: str = "/dev/kvm") -> int:
    from .probe.diff import ReportError, load

    try:
        a = load(a_path)
        if b_path is None:
            from .probe import probe

            b, b_name = probe(device).to_dict(), "this host (now)"
        else:
            b, b_name = load(b_path), b_path
    except ReportError as e:
        _err(str(e))
        return EXIT_USAGE
    return _diff_docs(a, b, a_path, b_name, as_json)


def _dispatch_demo(args: List[str]) -> int:
    if importlib.util.find_spec("pykvm.demo") is None:
        _err("the demo is not part of this installation (pykvm/demo.py is missing)")
        return EXIT_USAGE
    mod = importlib.import_module("pykvm.demo")
    return int(mod.main(args) or 0)


def _checkout() -> str:
    """The directory holding the pykvm package (the source checkout in an editable install)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _find_benchmarks() -> bool:
    """Make ``benchmarks.__main__`` importable; the checkout's suite comes first."""
    checkout = _checkout()
    if os.path.isfile(os.path.join(checkout, "benchmarks", "__main__.py")):
        if checkout not in sys.path:
            sys.path.insert(0, checkout)
            importlib.invalidate_caches()
        return True
    try:
        return importlib.util.find_spec("benchmarks.__main__") is not None
    except (ImportError, ValueError):
        return False


def _dispatch_bench(args: List[str]) -> int:
    if not _find_benchmarks():
        _err("the benchmark suite lives in the source checkout (benchmarks/), which is not "
             "importable from here: run 'pykvm bench' from a checkout (pip install -e .), or "
             "'python -m benchmarks' in it; for a quick measurement use 'pykvm probe --bench'")
        return EXIT_USAGE
    mod = importlib.import_module("benchmarks.__main__")
    return int(mod.main(args) or 0)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``pykvm`` command with *argv* (default ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # demo/bench take their own options: pass everything after the name through.
        if argv and argv[0] in ("demo", "bench"):
            return (_dispatch_demo if argv[0] == "demo" else _dispatch_bench)(argv[1:])
        parser = _parser()
        ns = parser.parse_args(argv)
        if ns.command is None:
            parser.print_help()
            return EXIT_USAGE
        if ns.command == "probe":
            return _cmd_probe(ns)
        if ns.command == "diff":
            return _diff_files(ns.a, ns.b, as_json=ns.json, device=ns.device)
        parser.error(f"unknown command {ns.command!r}")
    except SystemExit as e:  # argparse: --help, --version, usage errors
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        try:  # the reader went away (pykvm probe | head): stay quiet
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 1
    except Exception as e:  # an internal error: one line, no traceback unless asked
        if os.environ.get("PYKVM_DEBUG"):
            raise
        _err(f"internal error: {type(e).__name__}: {e} (set PYKVM_DEBUG=1 for the traceback)")
        return EXIT_INTERNAL
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
