"""Coverage-guided fuzzing of the snapshot reader with atheris (by hand, not in CI).

::

    pip install atheris
    python -m tests.snapshot.fuzz_atheris -atheris_runs=1000000 [-max_len=200000] [CORPUS_DIR]

Seeds itself with a valid snapshot of a small VM (needs /dev/kvm once); then
feeds mutated bytes to ``snapshot.verify``.  Any exception other than
``SnapshotError`` is a crash that atheris reports with its input.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from pykvm import snapshot

import pykvm

from . import support_forge as forge


def one_input(data: bytes) -> None:
    try:
        snapshot.verify(io.BytesIO(data))
    except snapshot.SnapshotError:
        pass


def main() -> None:
    args = list(sys.argv)
    if not any(not a.startswith("-") for a in args[1:]):
        corpus = tempfile.mkdtemp(prefix="pykvm-snap-corpus-")
        with pykvm.Kvm() as kvm, open(os.path.join(corpus, "seed.snap"), "wb") as f:
            f.write(forge.small_snapshot(kvm))
        args.append(corpus)
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
