"""A child process that saves snapshots, for the save-safety tests.

``python -m tests.snapshot.saver PATH BYTE COUNT [hang]`` builds a VM whose
1 MiB of RAM is filled with BYTE and saves it COUNT times to PATH.  With
``hang`` it prints ``mid-save`` after the first bytes of the first save
reached the temporary file and then sleeps, so the test can ``kill -9`` it
in the middle of a save.
"""

from __future__ import annotations

import sys
import time

import pykvm
from pykvm import snapshot
from pykvm.snapshot import atomic

RAM = 1 << 20


def main(argv: list) -> int:
    path, byte, count = argv[1], int(argv[2]), int(argv[3])
    if len(argv) > 4 and argv[4] == "hang":
        write = atomic.AtomicFile.write

        def hang(self: atomic.AtomicFile, parts):  # type: ignore[no-untyped-def]
            n = write(self, parts)
            print("mid-save", flush=True)
            time.sleep(3600)
            return n

        atomic.AtomicFile.write = hang  # type: ignore[method-assign]
    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(0, RAM)
        mem.write(0, bytes([byte]) * RAM)
        vm.create_vcpu(0)
        for _ in range(count):
            snapshot.save(vm, path, kvm=kvm, fsync=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
