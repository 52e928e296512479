"""Restore a counter snapshot in this (new) process and run it to the end.

``python -m tests.snapshot.runner FILE`` writes the guest's output to stdout
(raw bytes) and exits with the guest's exit code; a snapshot error prints
``SNAPSHOT-ERROR <class>: <message>`` on stderr and exits with 99.
"""

from __future__ import annotations

import sys

from pykvm import snapshot

from .support_guest import run_guest


def main(argv: list) -> int:
    try:
        vm = snapshot.restore(argv[1])
    except snapshot.SnapshotError as e:
        print(f"SNAPSHOT-ERROR {type(e).__name__}: {e}", file=sys.stderr)
        return 99
    with vm:
        out = bytearray()
        code = run_guest(vm.vcpus[0], out)
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    return code if code is not None else 98


if __name__ == "__main__":
    sys.exit(main(sys.argv))
