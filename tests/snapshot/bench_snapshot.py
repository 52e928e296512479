"""Measure snapshot save/restore speed for a VM with a lot of guest memory.

Run by hand (not part of the test suite; no timing is asserted anywhere)::

    python -m tests.snapshot.bench_snapshot [--gib 1] [--dir /tmp]

It fills guest RAM with non-zero data (worst case: nothing can be skipped),
then compares ``snapshot.save``/``restore`` with the plain bandwidth of the
same file system (one ``os.write``/``os.readv`` stream of the same size, with
and without ``fsync``), and also saves a mostly empty VM.  MB = 10**6 bytes.
"""

from __future__ import annotations

import argparse
import os
import time
import zlib

import pykvm
from pykvm import snapshot


def _fill(mem, size: int) -> None:
    block = bytes((i * 131 + 7) & 0xFF or 1 for i in range(1 << 20))   # no zero bytes
    for off in range(0, size, len(block)):
        mem[off:off + len(block)] = block


def _raw_write(path: str, mv: memoryview, fsync: bool) -> float:
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


def _raw_read(path: str, mv: memoryview) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(0, len(mv), 8 << 20):
            os.readv(fd, [mv[off:off + (8 << 20)]])
    finally:
        os.close(fd)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="guest RAM in GiB (default 1)")
    ap.add_argument("--dir", default="/tmp", help="where to write the files (default /tmp)")
    a = ap.parse_args()
    size = int(a.gib * (1 << 30)) & ~0xFFFFF
    mb = size / 1e6
    path = os.path.join(a.dir, "pykvm-bench.snap")
    raw = os.path.join(a.dir, "pykvm-bench.raw")
    print(f"guest RAM {size / 2**30:.2f} GiB, files in {a.dir}")
    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(0, size)
        vm.create_vcpu()
        _fill(mem, size)
        mv = memoryview(mem)
        try:
            t = time.perf_counter()
            zlib.crc32(mv)
            print(f"crc32 of guest RAM          {mb / (time.perf_counter() - t):8.0f} MB/s")
            for fsync in (False, True):
                tw = _raw_write(raw, mv, fsync)
                st = snapshot.save(vm, path, fsync=fsync, kvm=kvm)
                label = "fsync" if fsync else "page cache"
                print(f"plain write ({label:10s})    {mb / tw:8.0f} MB/s   {tw:6.2f} s")
                print(f"snapshot.save ({label:10s})  {mb / st.seconds:8.0f} MB/s   {st.seconds:6.2f} s"
                      f"   (file {st.file_bytes / 2**20:.0f} MiB)")
            tr = _raw_read(raw, mv)
            print(f"plain read (page cache)     {mb / tr:8.0f} MB/s   {tr:6.2f} s")
        finally:
            mv.release()
    for label in ("restore (page cache)", "restore (page cache) again"):
        t = time.perf_counter()
        with snapshot.restore(path) as vm2:
            dt = time.perf_counter() - t
        print(f"snapshot.{label:27s} {mb / dt:8.0f} MB/s   {dt:6.2f} s")
    # A mostly empty VM: only 16 MiB touched.
    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(0, size)
        vm.create_vcpu()
        mem[0:16 << 20] = os.urandom(16 << 20)
        st = snapshot.save(vm, path, fsync=False, kvm=kvm)
        t = time.perf_counter()
        with snapshot.restore(path, kvm):
            dt = time.perf_counter() - t
        print(f"mostly-zero VM: save {st.seconds:.3f} s ({mb / st.seconds:.0f} MB/s of RAM), "
              f"file {st.file_bytes / 2**20:.1f} MiB, restore {dt:.3f} s")
    for p in (path, raw):
        os.unlink(p)


if __name__ == "__main__":
    main()
