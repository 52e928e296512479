"""The three operations on snapshot files: :func:`save`, :func:`restore`, :func:`check_compatible`."""

from __future__ import annotations

import calendar
import collections
import dataclasses
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from ..errors import KvmError
from ..memory import GuestMemory
from ..system import Kvm
from ..vm import Vm
from . import compat, state
from .atomic import AtomicFile
from .fileformat import (
    DEFAULT_CHUNK,
    FILE_HDR,
    FORMAT_VERSION,
    MAGIC,
    MAX_CHUNK,
    MAX_HEADER,
    MEMR,
    QQ,
    REC_HDR,
    TAG_END,
    TAG_MEMD,
    TAG_MEMR,
    TAG_MEMZ,
    TAG_VCPU,
    TAG_VM,
    U32,
    U64,
    ZERO_BLOCK,
    Parsed,
    Reader,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotIncompatible,
    SnapshotRestoreError,
    Source,
    check_memory,
    cpuid_entries,
    memory_records,
    pack_items,
    read_state,
)

__all__ = ["MAX_RESTORE_REGIONS", "SaveStats", "check_compatible", "restore", "save"]


# ---------------------------------------------------------------------------
# saving

@dataclasses.dataclass
class SaveStats:
    """What :func:`save` did: sizes in bytes, time in seconds."""

    path: str | None
    file_bytes: int
    memory_bytes: int       #: guest RAM covered (all regions)
    data_bytes: int         #: guest RAM written as data (the rest was all-zero)
    seconds: float
    memory_seconds: float   #: the part of *seconds* spent streaming guest RAM

    @property
    def memory_mb_per_s(self) -> float:
        """Guest RAM covered per second of streaming (MB = 10**6 bytes)."""
        return self.memory_bytes / 1e6 / self.memory_seconds if self.memory_seconds else 0.0


class _Records:
    """Frames records onto an :class:`AtomicFile` or a binary file object."""

    def __init__(self, out: AtomicFile | BinaryIO) -> None:
        self.out = out
        self.count = 0
        self.records = 0

    def write(self, *parts: bytes | memoryview) -> None:
        if isinstance(self.out, AtomicFile):
            self.count += self.out.write(parts)
            return
        for p in parts:
            try:
                self.out.write(p)
            except (OSError, ValueError) as e:
                raise SnapshotError(f"cannot write snapshot {getattr(self.out, 'name', '<file object>')}: "
                                    f"{e}") from None
            self.count += len(p)

    def record(self, tag: bytes, arg: int, *payload: bytes | memoryview) -> None:
        crc = 0
        length = 0
        for p in payload:
            crc = zlib.crc32(p, crc)
            length += len(p)
        head = REC_HDR.pack(tag, arg, length, crc, 0)[:20]
        self.write(head + U32.pack(zlib.crc32(head)), *payload)
        self.records += 1


def _write_region(w: _Records, k: int, m: GuestMemory, mv: memoryview, chunk_size: int) -> int:
    """Region *k*'s records in offset order: zero runs as ``MEMZ``, the rest as ``MEMD`` chunks."""
    data = 0
    for off, n, zero in state.zero_runs(mv, m.userspace_addr):
        if zero:
            w.record(TAG_MEMZ, k, QQ.pack(off, n))
            continue
        end = off + n
        while off < end:
            c = min(chunk_size, end - off)
            w.record(TAG_MEMD, k, U64.pack(off), mv[off:off + c])
            off += c
            data += c
    return data


def save(vm: Vm, dest: str | os.PathLike[str] | BinaryIO, *,
         metadata: Any = None, chunk_size: int = DEFAULT_CHUNK,
         fsync: bool = True, kvm: Kvm | None = None) -> SaveStats:
    """Save the paused *vm* (state of every vCPU and device, and its memory) to *dest*.

    *dest* is a path or a binary file object open for writing.  A path is
    written through an exclusive temporary file in its directory that is
    fsync'd and renamed into place (see :mod:`pykvm.snapshot.atomic`: never a
    partial or mixed file under that name; new files 0600; a symbolic link is
    refused).  No vCPU may be inside ``run()`` meanwhile; the last exit of
    each vCPU is completed first (KVM_RUN with ``immediate_exit``), so answer
    a pending ``IoIn``/``MmioRead`` before saving.  *metadata* (any JSON
    value) is stored in the header for your own device state.  *fsync*
    makes the file durable before returning.  Every failure raises
    :class:`SnapshotError` naming the path; an existing file is left intact.
    """
    if vm.closed:
        raise SnapshotError("the VM is closed")
    if not (isinstance(chunk_size, int) and ZERO_BLOCK <= chunk_size <= MAX_CHUNK
            and chunk_size % ZERO_BLOCK == 0):
        raise ValueError(f"chunk_size must be a multiple of {ZERO_BLOCK} up to {MAX_CHUNK}")
    foreign = state.foreign_slots(vm)
    if foreign:
        raise SnapshotError(f"memory slot(s) {foreign} were registered with set_user_memory_region; "
                            "snapshot saves only memory added with vm.add_memory()")
    try:
        meta_json = json.dumps(metadata if metadata is not None else {}, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SnapshotError(f"metadata is not JSON-serialisable: {e}") from None
    out: AtomicFile | BinaryIO = dest if hasattr(dest, "write") else AtomicFile(dest, fsync=fsync)  # type: ignore[assignment]
    t0 = time.perf_counter()
    own_kvm = kvm is None
    if kvm is None:
        kvm = Kvm()
    w = _Records(out)
    locked: list[Any] = []
    try:
        fp = compat.host_fingerprint(kvm)
        caps = fp["caps"]
        msr_list = kvm.msr_index_list()
        locked = state.lock_vcpus(vm)
        for vcpu in vm.vcpus:
            state.complete_pending_io(vcpu)
        vm_items, vm_desc = state.vm_state(vm)
        skipped: dict[str, list[str]] = {}
        vcpu_items = [(v.id, state.vcpu_state(v, caps, msr_list, skipped)) for v in vm.vcpus]
        regions = vm.memory
        guest_features: dict[str, int] = {}
        for _, items in vcpu_items:
            for k, v in compat.feature_words(cpuid_entries(dict(items)["cpuid"])).items():
                guest_features[k] = guest_features.get(k, 0) | v
        header = {
            "format": "pykvm-snapshot",
            "version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "writer": f"pykvm {_pykvm_version()} (Python {sys.version.split()[0]})",
            "host": fp,
            "guest": {"cpuid_features": {k: f"{v:#010x}" for k, v in guest_features.items()}},
            "vm": dict(vm_desc, vcpus=[v.id for v in vm.vcpus],
                       memory=[{"slot": m.slot, "guest_phys_addr": m.guest_phys_addr,
                                "size": m.size, "flags": m.flags} for m in regions]),
            "unreadable_msrs": skipped,
            "chunk_size": chunk_size,
            "metadata": json.loads(meta_json),
        }
        hjson = json.dumps(header, indent=1, sort_keys=True).encode()
        if len(hjson) > MAX_HEADER:
            raise SnapshotError(f"the header would be {len(hjson)} bytes, over the limit of {MAX_HEADER}: "
                                "keep metadata small (save large device state in a file of your own)")
        if isinstance(out, AtomicFile):
            out.open()
        head = FILE_HDR.pack(MAGIC, FORMAT_VERSION, len(hjson)) + hjson
        w.write(head, U32.pack(zlib.crc32(head)))
        w.record(TAG_VM, 0, pack_items(vm_items))
        for vid, items in vcpu_items:
            w.record(TAG_VCPU, vid, pack_items(items))
        for index, m in enumerate(regions):
            w.record(TAG_MEMR, index, MEMR.pack(m.slot, m.flags, m.guest_phys_addr, m.size))
        t_mem = time.perf_counter()
        total = data = 0
        for index, m in enumerate(regions):
            mv = memoryview(m)
            try:
                data += _write_region(w, index, m, mv, chunk_size)
            finally:
                mv.release()
            total += m.size
        w.record(TAG_END, 0, QQ.pack(w.records, total))
        mem_seconds = time.perf_counter() - t_mem
        if isinstance(out, AtomicFile):
            out.commit()
        else:
            try:
                out.flush()
            except (OSError, ValueError) as e:
                raise SnapshotError(f"cannot write snapshot {getattr(out, 'name', '<file object>')}: "
                                    f"{e}") from None
    except BaseException:
        if isinstance(out, AtomicFile):
            out.abort()
        raise
    finally:
        for h in locked:
            h.release()
        if own_kvm:
            kvm.close()
    return SaveStats(out.path if isinstance(out, AtomicFile) else None, w.count, total, data,
                     time.perf_counter() - t0, mem_seconds)


def _pykvm_version() -> str:
    try:
        from .. import __version__
        return str(__version__)
    except ImportError:  # pragma: no cover
        return "?"


# ---------------------------------------------------------------------------
# restoring

def _stream_memory(r: Reader, p: Parsed, sink: Sequence[memoryview]) -> None:
    """Read every memory record into *sink* regions, checking bounds, coverage and CRCs.

    The CRC of a chunk is checked in a worker thread while the next one is
    read (both release the GIL); a mismatch raises before this returns.
    """
    pending: collections.deque[tuple[Future[int], int, int, int, int]] = collections.deque()

    def check(limit: int) -> None:
        while len(pending) > limit:
            fut, crc, k, off, at = pending.popleft()
            if fut.result() != crc:
                raise SnapshotCorrupt(f"{r.name}: guest memory at region {k} offset {off:#x} "
                                      f"(file byte {at}) is damaged (CRC mismatch)")

    with ThreadPoolExecutor(1, thread_name_prefix="pykvm-snapshot-crc") as pool:
        for tag, k, off, n, crc, at in memory_records(r, p):
            if tag == TAG_MEMZ:        # fresh anonymous memory is already zero
                continue
            dst = sink[k][off:off + n]
            r.readinto(dst, "guest memory data")
            pending.append((pool.submit(zlib.crc32, dst, zlib.crc32(U64.pack(off))), crc, k, off, at))
            check(1)
        check(0)


def _memory_limit() -> int:
    """Physical RAM of this host: the default bound on the guest RAM a file may ask for."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover
        return 1 << 40


def _build(r: Reader, p: Parsed, kvm: Kvm, prepare: Callable[[Vm], None] | None,
           clock: str, stream: bool) -> Vm:
    """Create the VM of *p*: devices, memory (streamed in if *stream*), vCPUs, state."""
    vm = kvm.create_vm()
    try:
        if prepare is not None:
            prepare(vm)
        try:
            if any(k.startswith("irqchip.") for k in p.vm) and not state.has_irqchip(vm):
                vm.create_irq_chip()
            if "pit2" in p.vm and not state.has_pit(vm):
                vm.create_pit2()
            for slot, flags, gpa, size in p.regions:
                vm.add_memory(gpa, size, flags=flags, slot=slot)
        except (KvmError, OSError, ValueError) as e:
            raise SnapshotRestoreError(f"{r.name}: re-creating the VM's devices and memory: {e}") from None
        if stream:
            by_slot = {m.slot: m for m in vm.memory}
            views = [memoryview(by_slot[slot]) for slot, _, _, _ in p.regions]
            try:
                _stream_memory(r, p, views)
            finally:
                for v in views:
                    v.release()
        for vid, items in p.vcpus:
            try:
                vcpu = vm.create_vcpu(vid)
            except KvmError as e:
                raise SnapshotRestoreError(f"{r.name}: creating vCPU {vid}: {e}") from None
            if "lapic" in items and not state.has_lapic(vcpu):
                raise SnapshotIncompatible(
                    f"{r.name}: vCPU {vid} had an in-kernel LAPIC but the new VM has none: the snapshot's "
                    "VM used a split irqchip; enable it in prepare(vm)")
            state.apply_vcpu(vcpu, items, f"vCPU {vid}")
        state.apply_devices(vm, p.vm)
        state.apply_clock(vm, p.vm, clock, _parse_time(p.info.header["created"]))
    except SnapshotRestoreError as e:
        vm.close()
        msg = str(e)
        raise SnapshotRestoreError(msg if msg.startswith(r.name) else f"{r.name}: {msg}") from None
    except BaseException:
        vm.close()
        raise
    return vm


#: Most memory regions :func:`restore` re-creates: each is a ``KVM_SET_USER_MEMORY_REGION``
#: whose kernel cost grows with the number of slots already there, so a small file
#: listing tens of thousands of one-page regions would cost minutes of kernel time.
MAX_RESTORE_REGIONS = 1024


def _checked_state(r: Reader, kvm: Kvm, allow_tsc_mismatch: bool, max_memory: int | None) -> Parsed:
    p = read_state(r)
    if len(p.regions) > MAX_RESTORE_REGIONS:
        raise SnapshotIncompatible(f"{r.name}: the snapshot has {len(p.regions)} memory regions; restore "
                                   f"re-creates at most {MAX_RESTORE_REGIONS}")
    total = sum(size for _, _, _, size in p.regions)
    limit = _memory_limit() if max_memory is None else max_memory
    if total > limit:
        raise SnapshotIncompatible(f"{r.name}: the snapshot's guest has {total} bytes of RAM, more than "
                                   f"the limit of {limit} (this host's RAM; pass max_memory= to change)")
    found = compat.problems(p, kvm, allow_tsc_mismatch=allow_tsc_mismatch)
    if found:
        raise SnapshotIncompatible(f"{r.name} cannot be restored on this host:\n  - " + "\n  - ".join(found))
    return p


def restore(src: Source, kvm: Kvm | None = None, *,
            prepare: Callable[[Vm], None] | None = None, clock: str = "saved",
            allow_tsc_mismatch: bool = False, max_memory: int | None = None) -> Vm:
    """Rebuild the VM saved in *src* in a fresh VM and return it, ready to ``run()``.

    * *kvm*: the ``/dev/kvm`` to use (opened and closed here if omitted; the
      returned VM does not need it);
    * *prepare(vm)*: called on the new, empty VM before devices and vCPUs are
      created, for the set-up a snapshot cannot hold (``set_tss_address``,
      ``enable_cap``, a split irqchip, a PIT with special flags ...);
    * *clock*: ``"saved"`` restores kvmclock to its saved value (the guest
      sees no time pass), ``"realtime"`` advances it by the wall time since
      the snapshot;
    * *allow_tsc_mismatch*: restore even if this host's TSC frequency differs
      by more than 0.1 % and cannot be scaled;
    * *max_memory*: the most guest RAM (bytes) a file may make this map
      (default: this host's physical RAM).

    Raises :class:`SnapshotCorrupt`, :class:`SnapshotIncompatible` (both
    before any VM exists, except memory damage, found while streaming) or
    :class:`SnapshotRestoreError`; the half-built VM is closed in every case.
    """
    if clock not in ("saved", "realtime"):
        raise ValueError('clock must be "saved" or "realtime"')
    own_kvm = kvm is None
    r = Reader(src)
    try:
        if kvm is None:
            kvm = Kvm()
        p = _checked_state(r, kvm, allow_tsc_mismatch, max_memory)
        return _build(r, p, kvm, prepare, clock, stream=True)
    finally:
        r.close()
        if own_kvm and kvm is not None:
            kvm.close()


def check_compatible(src: Source, kvm: Kvm | None = None, *,
                     prepare: Callable[[Vm], None] | None = None, allow_tsc_mismatch: bool = False,
                     max_memory: int | None = None) -> list[str]:
    """Reasons the snapshot cannot be restored on this host (empty list: :func:`restore` succeeds).

    Checks the whole file as :func:`verify` does (raises
    :class:`SnapshotCorrupt` if it is damaged), compares the fingerprint,
    then builds the VM in a scratch VM (with *prepare*, as :func:`restore`
    would) without its memory contents and closes it: a piece of state KVM
    refuses becomes a reason too.
    """
    own_kvm = kvm is None
    r = Reader(src)
    try:
        if kvm is None:
            kvm = Kvm()
        try:
            p = _checked_state(r, kvm, allow_tsc_mismatch, max_memory)
        except SnapshotIncompatible as e:
            lines = str(e).split("\n  - ")
            return lines[1:] if len(lines) > 1 else [str(e)]
        check_memory(r, p)
        try:
            _build(r, p, kvm, prepare, "saved", stream=False).close()
        except (SnapshotRestoreError, SnapshotIncompatible) as e:
            return [str(e)]
        return []
    finally:
        r.close()
        if own_kvm and kvm is not None:
            kvm.close()


def _parse_time(s: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(s, "%Y-%m-%dT%H:%M:%SZ")))
    except (ValueError, OverflowError):
        return None
