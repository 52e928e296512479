"""Measure snapshot save/restore speed for a VM with a lot of guest memory.

Run by hand (not part of the test suite; no timing is asserted anywhere)::

    python -m tests.snapshot.bench_snapshot [--gib 1] [--dir /tmp]

It fills guest RAM with non-zero data (worst case: nothing can be skipped),
then compares ``snapshot.save``/``restore`` with the plain bandwidth of the
same file system (one ``os.write``/``os.readv`` stream of the same size, with
and without ``fsync``), interleaved so both see the same (noisy) disk, and
also saves a mostly empty VM.  Old output files are removed before each
timed write (untimed: replacing an existing 1 GiB file first frees it, which
waits for its writeback).  MB = 10**6 bytes.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time
import zlib

import pykvm
from pykvm import snapshot


def _fill(mem, size: int) -> None:
    block = bytes((i * 131 + 7) & 0xFF or 1 for i in range(1 << 20))   # no zero bytes
    for off in range(0, size, len(block)):
        mem[off:off + len(block)] = block


def _fresh(*paths: str) -> None:
    """Remove old output (untimed): freeing 1 GiB of an old file is not what we measure."""
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)
    os.sync()


def _raw_write(path: str, mv: memoryview, fsync: bool) -> float:
    """Write a new file in 8 MiB os.write calls (the baseline for save)."""
    _fresh(path)
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, len(mv), 8 << 20):
            os.write(fd, mv[off:off + (8 << 20)])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


def _raw_read_fresh(path: str, size: int) -> float:
    """Read the file into freshly mapped anonymous memory (what restore does); unmap untimed."""
    t = time.perf_counter()
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # like guest RAM
    mv = memoryview(m)
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(0, size, 8 << 20):
            os.readv(fd, [mv[off:off + (8 << 20)]])
        return time.perf_counter() - t
    finally:
        os.close(fd)
        mv.release()
        m.close()


def _stats(label: str, mb: float, times: list[float]) -> None:
    rates = sorted(mb / t for t in times)
    print(f"{label:34s} median {statistics.median(rates):6.0f} MB/s  "
          f"(min {rates[0]:.0f}, max {rates[-1]:.0f}; {len(times)} runs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="guest RAM in GiB (default 1)")
    ap.add_argument("--dir", default="/tmp", help="where to write the files (default /tmp)")
    ap.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    a = ap.parse_args()
    size = int(a.gib * (1 << 30)) & ~0xFFFFF
    mb = size / 1e6
    path = os.path.join(a.dir, "pykvm-bench.snap")
    raw = os.path.join(a.dir, "pykvm-bench.raw")
    print(f"guest RAM {size / 2**30:.2f} GiB of non-zero data, files in {a.dir}, MB = 10**6 bytes")
    t: dict[str, list[float]] = {k: [] for k in (
        "plain write", "snapshot.save", "plain write + fsync", "snapshot.save(fsync=True)",
        "plain read into fresh memory", "snapshot.restore")}
    file_bytes = 0
    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(0, size)
        vm.create_vcpu()
        _fill(mem, size)
        mv = memoryview(mem)
        try:
            t0 = time.perf_counter()
            zlib.crc32(mv)
            print(f"(crc32 of guest RAM: {mb / (time.perf_counter() - t0):.0f} MB/s)")
            for _ in range(a.runs):     # interleaved, so both see the same disk weather
                t["plain write"].append(_raw_write(raw, mv, False))
                _fresh(path)
                t["snapshot.save"].append(snapshot.save(vm, path, fsync=False, kvm=kvm).seconds)
                t["plain write + fsync"].append(_raw_write(raw, mv, True))
                _fresh(path)
                st = snapshot.save(vm, path, fsync=True, kvm=kvm)
                t["snapshot.save(fsync=True)"].append(st.seconds)
                file_bytes = st.file_bytes
                t["plain read into fresh memory"].append(_raw_read_fresh(raw, size))
                t0 = time.perf_counter()
                with snapshot.restore(path, kvm):
                    t["snapshot.restore"].append(time.perf_counter() - t0)
        finally:
            mv.release()
    print(f"snapshot file: {file_bytes / 2**20:.1f} MiB")
    for k, v in t.items():
        _stats(k, mb, v)
    # A mostly empty VM: only 16 MiB touched.
    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(0, size)
        vm.create_vcpu()
        mem[0:16 << 20] = os.urandom(16 << 20)
        st = snapshot.save(vm, path, fsync=False, kvm=kvm)
        t0 = time.perf_counter()
        with snapshot.restore(path, kvm):
            dt = time.perf_counter() - t0
        print(f"mostly-zero VM (16 MiB touched): save {st.seconds:.3f} s, file "
              f"{st.file_bytes / 2**20:.1f} MiB, restore {dt:.3f} s")
    for p in (path, raw):
        os.unlink(p)


if __name__ == "__main__":
    main()
