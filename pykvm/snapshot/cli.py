"""``pykvm snapshot info|verify|check FILE`` (also ``python -m pykvm.snapshot``).

* ``info``: print the JSON header (checked, not the records);
* ``verify``: check the whole file without KVM (every CRC, structure, sizes, ranges);
* ``check``: can this host restore it?  (``verify`` plus the fingerprint, plus
  building the VM's state in a scratch VM.)

Exit status (:mod:`pykvm.command`): 0 OK / compatible; 1 the file is intact
but this host cannot restore it (``check``; the reasons on stdout); 2 bad
arguments, or a file that is damaged, malformed or unreadable (one line on
stderr naming the file and the field); 3 an internal error.
"""

from __future__ import annotations

import argparse
import json

from ..command import EXIT_NO, EXIT_OK, run_command
from .fileformat import SnapshotError, read_info, verify
from .ops import check_compatible

__all__ = ["main"]

PROG = "snapshot"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pykvm snapshot", description="Inspect pykvm VM snapshots.")
    ap.add_argument("command", choices=("info", "verify", "check"),
                    help="info: print the header; verify: check the whole file; "
                         "check: can this host restore it?")
    ap.add_argument("file")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""

    def body() -> int:
        a = _parser().parse_args(argv)
        if a.command == "info":
            print(json.dumps(read_info(a.file).header, indent=1, sort_keys=True))
        elif a.command == "verify":
            info = verify(a.file)
            print(f"{a.file}: OK (format {info.version}, {len(info.header['vm']['vcpus'])} vCPU(s), "
                  f"{info.memory_size / 2**20:.1f} MiB of guest memory)")
        else:
            problems = check_compatible(a.file)
            if problems:
                print(f"{a.file}: cannot be restored here:")
                for pr in problems:
                    print(f"  - {pr}")
                return EXIT_NO
            print(f"{a.file}: compatible with this host")
        return EXIT_OK

    return run_command(PROG, body, (SnapshotError,))
