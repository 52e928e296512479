"""Whole-VM snapshot and restore: save a paused VM to a file, rebuild it in a fresh VM.

::

    from pykvm import snapshot

    snapshot.save(vm, "guest.snap")                 # vm paused: no vCPU inside run()
    ...
    vm2 = snapshot.restore("guest.snap")            # any process on a compatible host
    vm2.vcpus[0].run()                              # carries on where vm stopped

What is saved
    every vCPU's registers, ``sregs2`` (or ``sregs``), XSAVE area (``XSAVE2``
    size, else ``XSAVE``, else ``FPU``), XCRs, in-kernel LAPIC, every MSR of
    the host's ``KVM_GET_MSR_INDEX_LIST`` that KVM lets us read, CPUID table,
    MP state, pending events, debug registers, nested state where the host has
    it, TSC frequency; the in-kernel PIC/IOAPIC, PIT and kvmclock; and every
    memory region added with :meth:`Vm.add_memory <pykvm.vm.Vm.add_memory>`,
    streamed in chunks with all-zero runs left out.

What is not saved
    VM settings KVM cannot report (``KVM_SET_TSS_ADDR``, identity map,
    ``KVM_ENABLE_CAP`` on the VM, the PIT's creation flags, a split irqchip):
    redo them in the *prepare* hook of :func:`restore`.  Device models that
    live in your program (a serial port, virtio queues) are yours to save; the
    header's ``metadata`` (any JSON) can carry small ones.

File format (version 1, little endian, documented in ``docs/snapshot.md``)
    ``b"PYKVMSNP"``, u32 version, u32 header length, the JSON header, u32
    CRC32 of all that; then records, each a 24-byte header
    ``<4sIQII`` (tag, arg, payload length, payload CRC32, CRC32 of the first
    20 header bytes) and its payload.  Tags: ``VMST`` (VM devices), ``VCPU``
    (one vCPU), ``MEMR`` (a region), ``MEMD`` (region data), ``MEMZ`` (a zero
    run), ``END `` (record count and memory total: detects truncation).

Safety
    :func:`restore` checks the header, every state record and the host
    fingerprint before it creates anything, streams memory while checking each
    chunk's CRC, and sets vCPU state only once the whole file is proven
    intact.  On any failure it closes the half-built VM and raises
    :class:`SnapshotCorrupt`, :class:`SnapshotIncompatible` or
    :class:`SnapshotRestoreError`; it never returns a VM that is not fully
    restored.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import errno
import json
import mmap
import os
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import (Any, BinaryIO, Callable, Deque, Dict, Iterator, List, Optional,
                    Sequence, Tuple, Union)

from .fd import ioctl
from .errors import KvmError

from .system import Kvm
from .uapi import ioctls as I
from .uapi import structs as S
from .uapi.enums import Cap
from .vcpu import Vcpu
from .vm import Vm

__all__ = [
    "MAGIC", "FORMAT_VERSION", "save", "restore", "read_info", "verify", "check_compatible",
    "host_fingerprint", "SnapshotInfo", "SaveStats", "SnapshotError", "SnapshotCorrupt",
    "SnapshotIncompatible", "SnapshotRestoreError",
]

MAGIC = b"PYKVMSNP"
FORMAT_VERSION = 1

_FILE_HDR = struct.Struct("<8sII")      # magic, version, JSON length
_REC_HDR = struct.Struct("<4sIQII")     # tag, arg, payload length, payload crc, header crc
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_QQ = struct.Struct("<QQ")
_MEMR = struct.Struct("<IIQQ")          # slot, flags, guest_phys_addr, size
_TLV = struct.Struct("<HI")             # name length, data length

TAG_VM, TAG_VCPU, TAG_MEMR, TAG_MEMD, TAG_MEMZ, TAG_END = (
    b"VMST", b"VCPU", b"MEMR", b"MEMD", b"MEMZ", b"END ")
_STATE_TAGS = (TAG_VM, TAG_VCPU, TAG_MEMR)

#: Guest memory is scanned for all-zero runs in blocks of this size.
ZERO_BLOCK = 64 << 10
#: Largest data record (bytes of guest memory per ``MEMD`` record).
DEFAULT_CHUNK = 8 << 20
_MAX_STATE_RECORD = 64 << 20     # sanity bound for non-memory records
_MAX_HEADER = 16 << 20

from . import _sys
_memcmp = _sys.libc.memcmp
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcmp.restype = ctypes.c_int
_ZEROS = ctypes.create_string_buffer(ZERO_BLOCK)


# ---------------------------------------------------------------------------
# errors

class SnapshotError(Exception):
    """Base class of every snapshot problem."""


class SnapshotCorrupt(SnapshotError):
    """The file is damaged, truncated or not a snapshot (nothing was restored)."""


class SnapshotIncompatible(SnapshotError):
    """The snapshot cannot be restored on this host (nothing was restored)."""


class SnapshotRestoreError(SnapshotError):
    """KVM refused a piece of state while restoring; the new VM was closed."""


# ---------------------------------------------------------------------------
# state access (the ``Vcpu``/``Vm`` wrappers; one raw ioctl for partial MSR writes)

def _raw(obj, request: int, buf) -> int:
    return ioctl(obj.fileno(), request, buf)


def _struct_bytes(obj: ctypes.Structure) -> bytes:
    return bytes(memoryview(obj).cast("B"))


def _from_bytes(cls, data: bytes, what: str):
    if len(data) != ctypes.sizeof(cls):
        raise SnapshotCorrupt(f"{what}: {len(data)} bytes, expected {ctypes.sizeof(cls)} "
                              f"(struct {cls.__name__})")
    return cls.from_buffer_copy(data)


# ---------------------------------------------------------------------------
# host fingerprint

#: CPUID words compared between the guest's table and the host's supported one:
#: (leaf, subleaf, register, bits that change at run time and are ignored).
_FEATURE_WORDS: Tuple[Tuple[int, int, str, int], ...] = (
    (0x1, 0, "ecx", 1 << 27),            # OSXSAVE mirrors CR4
    (0x1, 0, "edx", 0),
    (0x7, 0, "ebx", 0),
    (0x7, 0, "ecx", 1 << 4),             # OSPKE mirrors CR4
    (0x7, 0, "edx", 0),
    (0x7, 1, "eax", 0),
    (0xD, 1, "eax", 0),
    (0x80000001, 0, "ecx", 0),
    (0x80000001, 0, "edx", 0),
    (0x80000008, 0, "ebx", 0),
    (0x40000001, 0, "eax", 0),           # KVM paravirtual features
)

#: Capabilities recorded in the fingerprint (and the ones restore relies on).
_CAPS = ("XSAVE", "XSAVE2", "XCRS", "SREGS2", "VCPU_EVENTS", "DEBUGREGS", "NESTED_STATE",
         "IRQCHIP", "PIT2", "PIT_STATE2", "ADJUST_CLOCK", "MP_STATE", "GET_TSC_KHZ",
         "TSC_CONTROL", "VM_TSC_CONTROL", "SPLIT_IRQCHIP", "EXCEPTION_PAYLOAD",
         "X86_TRIPLE_FAULT_EVENT", "TSC_DEADLINE_TIMER", "MAX_VCPUS", "MAX_VCPU_ID")

_MSR_TSC = 0x10
_MSR_TSC_DEADLINE = 0x6E0


def _find(entries: Sequence[S.kvm_cpuid_entry2], leaf: int, sub: int = 0):
    for e in entries:
        if e.function == leaf and (e.index == sub or not e.flags & S.KVM_CPUID_FLAG_SIGNIFCANT_INDEX):
            return e
    return None


def _vendor(entries: Sequence[S.kvm_cpuid_entry2]) -> str:
    e = _find(entries, 0)
    if e is None:
        return ""
    return struct.pack("<III", e.ebx, e.edx, e.ecx).decode("latin-1")


def _feature_words(entries: Sequence[S.kvm_cpuid_entry2]) -> Dict[str, int]:
    out = {}
    for leaf, sub, reg, _ in _FEATURE_WORDS:
        e = _find(entries, leaf, sub)
        out[f"{leaf:#x}.{sub}.{reg}"] = getattr(e, reg) if e is not None else 0
    return out


def _xcr0_supported(entries: Sequence[S.kvm_cpuid_entry2]) -> int:
    e = _find(entries, 0xD, 0)
    return (e.eax | e.edx << 32) if e is not None else 0x3


def _caps(kvm: Kvm) -> Dict[str, int]:
    out = {}
    for name in _CAPS:
        cap = getattr(Cap, name, None)
        if cap is not None:
            try:
                out[name] = kvm.check_extension(cap)
            except KvmError:
                out[name] = 0
    return out


_probe_cache: Dict[str, Any] = {}


def _probe_host(kvm: Kvm) -> Tuple[Dict[str, int], int]:
    """(feature words a guest gets, TSC kHz of a new vCPU) on this host, via a scratch vCPU.

    The feature words are those of the host's supported CPUID *after* KVM
    accepted it on a vCPU: some vendor modules (PVM) add host features there,
    so the supported list alone would understate what a guest may use.
    """
    if "features" not in _probe_cache:
        sup = kvm.supported_cpuid()
        words = _feature_words(sup)
        khz = 0
        try:
            with kvm.create_vm() as vm:
                v = vm.create_vcpu()
                v.set_cpuid2(sup)
                for k, val in _feature_words(v.get_cpuid2()).items():
                    words[k] |= val
                try:
                    khz = max(0, v.get_tsc_khz())
                except KvmError:
                    pass
        except KvmError:
            pass
        _probe_cache["features"], _probe_cache["tsc_khz"] = words, khz
    return dict(_probe_cache["features"]), _probe_cache["tsc_khz"]


def host_fingerprint(kvm: Kvm) -> Dict[str, Any]:
    """What a snapshot records about the host that took it (JSON-ready).

    CPU vendor and signature, kernel release, KVM API version, the
    capabilities restore depends on, the CPUID feature words this host's KVM
    gives a guest, the XSAVE features it supports, its MSR index list and
    the TSC frequency of a new vCPU.
    """
    sup = kvm.supported_cpuid()
    leaf1 = _find(sup, 1)
    sig = leaf1.eax if leaf1 is not None else 0
    family = (sig >> 8) & 0xF
    model = (sig >> 4) & 0xF
    if family in (0x6, 0xF):
        model |= (sig >> 12) & 0xF0
    if family == 0xF:
        family += (sig >> 20) & 0xFF
    words, khz = _probe_host(kvm)
    return {
        "cpu_vendor": _vendor(sup),
        "cpu_signature": {"family": family, "model": model, "stepping": sig & 0xF},
        "kernel": os.uname().release,
        "kvm_api": kvm.api_version,
        "caps": _caps(kvm),
        "cpuid_features": {k: f"{v:#010x}" for k, v in words.items()},
        "xcr0_supported": f"{_xcr0_supported(sup):#x}",
        "msr_index_list": [f"{i:#x}" for i in kvm.msr_index_list()],
        "tsc_khz": khz,
    }


# ---------------------------------------------------------------------------
# TLV blobs (the payload of VMST and VCPU records)

def _pack_tlv(items: Sequence[Tuple[str, bytes]]) -> bytes:
    out = []
    for name, data in items:
        n = name.encode()
        out += [_TLV.pack(len(n), len(data)), n, data]
    return b"".join(out)


def _unpack_tlv(payload: bytes, what: str) -> Dict[str, bytes]:
    out: Dict[str, bytes] = {}
    pos = 0
    while pos < len(payload):
        if pos + _TLV.size > len(payload):
            raise SnapshotCorrupt(f"{what}: truncated item header at byte {pos}")
        nlen, dlen = _TLV.unpack_from(payload, pos)
        pos += _TLV.size
        if pos + nlen + dlen > len(payload):
            raise SnapshotCorrupt(f"{what}: item at byte {pos} runs past the record")
        name = payload[pos:pos + nlen].decode("ascii", "replace")
        out[name] = payload[pos + nlen:pos + nlen + dlen]
        pos += nlen + dlen
    return out


# ---------------------------------------------------------------------------
# reading state from a live VM

def _read_msrs(vcpu: Vcpu, indices: Sequence[int]) -> Tuple[List[Tuple[int, int]], List[int]]:
    """All readable MSRs of *indices*: ([(index, value)], [unreadable indices])."""
    values: List[Tuple[int, int]] = []
    skipped: List[int] = []
    todo = list(indices)
    while todo:
        got = vcpu.get_msrs(todo)        # KVM stops at the first MSR it cannot read
        n = len(got)
        values += [(i, got[i]) for i in todo[:n]]
        if n >= len(todo):
            break
        skipped.append(todo[n])
        todo = todo[n + 1:]
    return values, skipped


def _complete_pending_io(vcpu: Vcpu) -> None:
    """Let KVM finish the last exit's I/O before the state is read.

    The KVM selftests do the same (``vcpu_run_complete_io`` before
    ``vcpu_save_state``); see :meth:`pykvm.vcpu.Vcpu.complete_pending_exit`.
    """
    ex = vcpu.complete_pending_exit()
    if ex is None:
        return
    err = SnapshotError(f"vCPU {vcpu.id}: completing the last exit produced another one "
                        f"({ex!r}); handle it (it is in .exit) and save again")
    err.exit = ex  # type: ignore[attr-defined]
    raise err


def _absent(e: KvmError) -> bool:
    return e.errno in (errno.EINVAL, errno.ENXIO, errno.ENOTTY)


def _vcpu_state(vm: Vm, vcpu: Vcpu, caps: Dict[str, int], msr_list: Sequence[int],
                skipped_msrs: Dict[str, List[str]]) -> List[Tuple[str, bytes]]:
    items: List[Tuple[str, bytes]] = [("regs", _struct_bytes(vcpu.get_regs()))]
    if caps.get("SREGS2"):
        items.append(("sregs2", _struct_bytes(vcpu.get_sregs2())))
    else:
        items.append(("sregs", _struct_bytes(vcpu.get_sregs())))
    if caps.get("XSAVE2"):
        items.append(("xsave", _struct_bytes(vcpu.get_xsave2())))
    elif caps.get("XSAVE"):
        items.append(("xsave", _struct_bytes(vcpu.get_xsave())))
    else:
        items.append(("fpu", _struct_bytes(vcpu.get_fpu())))
    if caps.get("XCRS"):
        items.append(("xcrs", _struct_bytes(vcpu.get_xcrs())))
    try:
        items.append(("lapic", _struct_bytes(vcpu.get_lapic())))
    except KvmError as e:
        if not _absent(e):             # no in-kernel LAPIC: nothing to save
            raise
    values, skipped = _read_msrs(vcpu, msr_list)
    if skipped:
        skipped_msrs[str(vcpu.id)] = [f"{i:#x}" for i in skipped]
    items.append(("msrs", b"".join(struct.pack("<IIQ", i, 0, v) for i, v in values)))
    items.append(("cpuid", b"".join(_struct_bytes(e) for e in vcpu.get_cpuid2())))
    items.append(("mp_state", _U32.pack(vcpu.get_mp_state())))
    if caps.get("DEBUGREGS"):
        items.append(("debugregs", _struct_bytes(vcpu.get_debug_regs())))
    if caps.get("NESTED_STATE"):
        try:
            ns = vcpu.get_nested_state()
            items.append(("nested", _struct_bytes(ns)[:max(ns.size, ctypes.sizeof(S.kvm_nested_state))]))
        except KvmError as e:
            if not _absent(e):
                raise
    if caps.get("GET_TSC_KHZ"):
        try:
            items.append(("tsc_khz", _U32.pack(vcpu.get_tsc_khz())))
        except KvmError:
            pass
    if caps.get("VCPU_EVENTS"):
        items.append(("events", _struct_bytes(vcpu.get_vcpu_events())))
    return items


def _vm_state(vm: Vm) -> Tuple[List[Tuple[str, bytes]], Dict[str, Any]]:
    items: List[Tuple[str, bytes]] = []
    desc: Dict[str, Any] = {"irqchip": False, "pit": False}
    try:
        for chip in (S.KVM_IRQCHIP_PIC_MASTER, S.KVM_IRQCHIP_PIC_SLAVE, S.KVM_IRQCHIP_IOAPIC):
            items.append((f"irqchip.{chip}", _struct_bytes(vm.get_irqchip(chip))))
        desc["irqchip"] = True
    except KvmError as e:              # ENXIO: no (full) in-kernel irqchip
        if not _absent(e):
            raise
    try:
        items.append(("pit2", _struct_bytes(vm.get_pit2())))
        desc["pit"] = True
    except KvmError as e:
        if not _absent(e):
            raise
    try:
        items.append(("clock", _struct_bytes(vm.get_clock())))
    except KvmError as e:
        if not _absent(e):
            raise
    return items, desc


# ---------------------------------------------------------------------------
# writing

@dataclasses.dataclass
class SaveStats:
    """What :func:`save` did: sizes in bytes, time in seconds."""

    path: Optional[str]
    file_bytes: int
    memory_bytes: int       #: guest RAM covered (all regions)
    data_bytes: int         #: guest RAM written as data (the rest was all-zero)
    seconds: float
    memory_seconds: float   #: the part of *seconds* spent streaming guest RAM

    @property
    def memory_mb_per_s(self) -> float:
        """Guest RAM covered per second of streaming (MB = 10**6 bytes)."""
        return self.memory_bytes / 1e6 / self.memory_seconds if self.memory_seconds else 0.0


class _Writer:
    def __init__(self, dest) -> None:
        self.count = 0
        self.records = 0
        if hasattr(dest, "write"):
            self.f, self.fd = dest, None
        else:
            self.f, self.fd = None, None
            self.path = os.fspath(dest)

    def open(self) -> None:
        if self.f is None:
            d = os.path.dirname(os.path.abspath(self.path))
            self.tmp = os.path.join(d, f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
            try:
                self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise SnapshotError(f"cannot write a snapshot in {d}: {e.strerror}") from None

    def write(self, *parts) -> None:
        if self.fd is not None:
            total = sum(len(p) for p in parts)
            n = os.writev(self.fd, parts)
            if n != total:       # short write: finish piece by piece
                self._finish(parts, n)
            self.count += total
        else:
            for p in parts:
                self.f.write(p)
                self.count += len(p)

    def _finish(self, parts, done: int) -> None:
        for p in parts:
            mv = memoryview(p).cast("B")
            if done >= len(mv):
                done -= len(mv)
                continue
            mv = mv[done:]
            done = 0
            while len(mv):
                mv = mv[os.write(self.fd, mv):]

    def record(self, tag: bytes, arg: int, *payload) -> None:
        crc = 0
        length = 0
        for p in payload:
            crc = zlib.crc32(p, crc)
            length += len(p)
        head = struct.pack("<4sIQI", tag, arg, length, crc)
        self.write(head + _U32.pack(zlib.crc32(head)), *payload)
        self.records += 1

    def commit(self, fsync: bool) -> None:
        if self.fd is not None:
            if fsync:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            # Replacing an earlier snapshot frees its blocks, which waits for its pages
            # still under writeback (0.1-0.5 s per GiB measured here).  Holding it open
            # across the rename moves that work to a background close.
            try:
                old: Optional[int] = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                old = None
            os.replace(self.tmp, self.path)
            if old is not None:
                threading.Thread(target=os.close, args=(old,), name="pykvm-snapshot-unlink",
                                 daemon=True).start()
            if fsync:
                dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        else:
            self.f.flush()

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            try:
                os.unlink(self.tmp)
            except OSError:
                pass


_PAGE = mmap.PAGESIZE
# Top byte of a /proc/self/pagemap entry: bit 63 present, bit 62 swapped.
_PAGEMAP_USED = bytes(1 if x & 0xC0 else 0 for x in range(256))


def _used_pages(addr: int, size: int) -> Optional[bytes]:
    """One byte per page of ``[addr, addr+size)``: 1 if present or swapped, 0 if never touched.

    Pages of a private anonymous mapping that were never touched (neither
    present nor in swap) read as zeros, so the zero scan can skip them without
    faulting them in.  Returns None if ``/proc/self/pagemap`` is unreadable.
    """
    if addr % _PAGE or size % _PAGE:
        return None
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        want = size // _PAGE * 8
        buf = bytearray(want)
        mv = memoryview(buf)
        got = 0
        while got < want:
            n = os.preadv(fd, [mv[got:]], addr // _PAGE * 8 + got)
            if n <= 0:
                return None
            got += n
    except OSError:
        return None
    finally:
        os.close(fd)
    return bytes(buf[7::8]).translate(_PAGEMAP_USED)


def _zero_runs(addr: int, size: int, block: int = ZERO_BLOCK) -> Iterator[Tuple[int, int, bool]]:
    """Split ``[0, size)`` of host memory at *addr* into maximal (offset, length, is_zero) runs.

    Blocks of *block* bytes are compared with zeros (``memcmp``); blocks with
    no page ever touched (see :func:`_used_pages`) are zero without a look.
    """
    used = _used_pages(addr, size)
    per = block // _PAGE
    start, cur_zero = 0, None
    off = 0
    while off < size:
        n = min(block, size - off)
        if used is not None and used.find(1, off // _PAGE, off // _PAGE + per) < 0:
            z = True
            nxt = used.find(1, off // _PAGE)          # jump over the untouched stretch
            n = (size if nxt < 0 else nxt * _PAGE // block * block) - off
            n = max(n, min(block, size - off))
        else:
            z = _memcmp(addr + off, _ZEROS, n) == 0
        if cur_zero is None:
            cur_zero = z
        elif z != cur_zero:
            yield start, off - start, cur_zero
            start, cur_zero = off, z
        off += n
    if size:
        yield start, size - start, bool(cur_zero)


def _lock_vcpus(vm: Vm) -> list:
    """Hold every vCPU (``Vcpu.hold()``: no ``run()`` meanwhile), or raise.

    Returns the holds; the caller releases them.
    """
    held: list = []
    for vcpu in vm.vcpus:
        try:
            held.append(vcpu.hold())
        except KvmError:
            for h in held:
                h.release()
            raise SnapshotError(f"vCPU {vcpu.id} is inside run() in another thread: stop it "
                                "(vcpu.kick() and let run() return) before saving") from None
    return held


def _write_region(w: "_Writer", k: int, m, mv: memoryview, chunk_size: int) -> int:
    """Write region *k*'s records: zero runs as ``MEMZ``, the rest as ``MEMD`` chunks.

    (Computing the CRC of the next chunk in a thread while writing this one
    was measured no faster on a 2-core host: both are memory-bandwidth bound.)
    """
    data = 0
    for off, n, zero in _zero_runs(m.userspace_addr, m.size):
        if zero:
            w.record(TAG_MEMZ, k, _QQ.pack(off, n))
            continue
        end = off + n
        while off < end:
            c = min(chunk_size, end - off)
            w.record(TAG_MEMD, k, _U64.pack(off), mv[off:off + c])
            off += c
            data += c
    return data


def save(vm: Vm, dest: Union[str, "os.PathLike[str]", BinaryIO], *,
         metadata: Optional[Dict[str, Any]] = None, chunk_size: int = DEFAULT_CHUNK,
         fsync: bool = True, kvm: Optional[Kvm] = None) -> SaveStats:
    """Save the paused *vm* (state of every vCPU and device, and its memory) to *dest*.

    *dest* is a path (written to a temporary file beside it, then renamed, so
    an interrupted save never leaves a partial file under that name) or a
    binary file object open for writing.  No vCPU may be inside ``run()``
    meanwhile; the last exit of each vCPU is completed first (KVM_RUN with
    ``immediate_exit``), so answer a pending ``IoIn``/``MmioRead`` before
    saving.  *metadata* (JSON-serialisable) is stored in the header for your
    own device state.  *fsync* makes the file durable before returning.
    """
    if vm.closed:
        raise SnapshotError("the VM is closed")
    if chunk_size < ZERO_BLOCK or chunk_size % ZERO_BLOCK:
        raise ValueError(f"chunk_size must be a multiple of {ZERO_BLOCK}")
    known = {m.slot for m in vm.memory}
    foreign = [s for s in getattr(vm, "_slots", {}) if s not in known]
    if foreign:
        raise SnapshotError(f"memory slot(s) {foreign} were registered with set_user_memory_region; "
                            "snapshot saves only memory added with vm.add_memory()")
    meta_json = json.dumps(metadata if metadata is not None else {})
    t0 = time.perf_counter()
    own_kvm = kvm is None
    if own_kvm:
        kvm = Kvm()
    w = _Writer(dest)
    locked: list = []
    try:
        fp = host_fingerprint(kvm)
        caps = fp["caps"]
        msr_list = kvm.msr_index_list()
        locked = _lock_vcpus(vm)
        for vcpu in vm.vcpus:
            _complete_pending_io(vcpu)
        vm_items, vm_desc = _vm_state(vm)
        skipped: Dict[str, List[str]] = {}
        vcpu_items = [(v.id, _vcpu_state(vm, v, caps, msr_list, skipped)) for v in vm.vcpus]
        regions = vm.memory
        guest_features: Dict[str, int] = {}
        for _, items in vcpu_items:
            for k, v in _feature_words(_cpuid_entries(dict(items)["cpuid"])).items():
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
        w.open()
        head = _FILE_HDR.pack(MAGIC, FORMAT_VERSION, len(hjson)) + hjson
        w.write(head, _U32.pack(zlib.crc32(head)))
        w.record(TAG_VM, 0, _pack_tlv(vm_items))
        for vid, items in vcpu_items:
            w.record(TAG_VCPU, vid, _pack_tlv(items))
        for k, m in enumerate(regions):
            w.record(TAG_MEMR, k, _MEMR.pack(m.slot, m.flags, m.guest_phys_addr, m.size))
        t_mem = time.perf_counter()
        total = data = 0
        for k, m in enumerate(regions):
            mv = memoryview(m)
            try:
                data += _write_region(w, k, m, mv, chunk_size)
            finally:
                mv.release()
            total += m.size
        w.record(TAG_END, 0, _QQ.pack(w.records, total))
        mem_seconds = time.perf_counter() - t_mem
        w.commit(fsync)
    except BaseException:
        w.abort()
        raise
    finally:
        for h in locked:
            h.release()
        if own_kvm:
            kvm.close()
    return SaveStats(getattr(w, "path", None), w.count, total, data,
                     time.perf_counter() - t0, mem_seconds)


def _pykvm_version() -> str:
    try:
        from . import __version__
        return __version__
    except ImportError:  # pragma: no cover
        return "?"


def _cpuid_entries(blob: bytes) -> List[S.kvm_cpuid_entry2]:
    size = ctypes.sizeof(S.kvm_cpuid_entry2)
    if len(blob) % size:
        raise SnapshotCorrupt(f"cpuid: {len(blob)} bytes is not a multiple of {size}")
    return [S.kvm_cpuid_entry2.from_buffer_copy(blob, i) for i in range(0, len(blob), size)]


# ---------------------------------------------------------------------------
# reading

class _Reader:
    def __init__(self, src) -> None:
        self.pos = 0
        self.name = "<file object>"
        if hasattr(src, "read"):
            self.f, self.fd, self.own = src, None, False
            self.name = getattr(src, "name", self.name)
        else:
            self.name = os.fspath(src)
            try:
                self.fd = os.open(self.name, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise SnapshotError(f"cannot open snapshot {self.name}: {e.strerror}") from None
            self.f, self.own = None, True
            try:
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except (AttributeError, OSError):
                pass

    def close(self) -> None:
        if self.own and self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _eof(self, want: int, got: int, what: str) -> SnapshotCorrupt:
        return SnapshotCorrupt(f"{self.name}: truncated: {what} at byte {self.pos} needs {want} bytes, "
                               f"only {got} left")

    def read(self, n: int, what: str) -> bytes:
        chunks = []
        got = 0
        while got < n:
            b = os.read(self.fd, n - got) if self.fd is not None else self.f.read(n - got)
            if not b:
                raise self._eof(n, got, what)
            chunks.append(b)
            got += len(b)
        self.pos += n
        return b"".join(chunks)

    def readinto(self, mv: memoryview, what: str) -> None:
        n = len(mv)
        got = 0
        while got < n:
            if self.fd is not None:
                k = os.readv(self.fd, [mv[got:]])
            else:
                k = self.f.readinto(mv[got:])
            if not k:
                raise self._eof(n, got, what)
            got += k
        self.pos += n

    def at_eof(self) -> bool:
        b = os.read(self.fd, 1) if self.fd is not None else self.f.read(1)
        return not b

    def header(self) -> Tuple[int, int, int, int]:
        """Read a record header: (tag, arg, length, payload crc); checks its own CRC."""
        at = self.pos
        raw = self.read(_REC_HDR.size, "record header")
        tag, arg, length, crc, hcrc = _REC_HDR.unpack(raw)
        if zlib.crc32(raw[:20]) != hcrc:
            raise SnapshotCorrupt(f"{self.name}: record header at byte {at} is damaged (CRC mismatch)")
        return tag, arg, length, crc


@dataclasses.dataclass
class SnapshotInfo:
    """A snapshot's header, as read by :func:`read_info` or :func:`verify`."""

    path: str
    version: int
    header: Dict[str, Any]

    @property
    def metadata(self) -> Dict[str, Any]:
        """The *metadata* given to :func:`save`."""
        return self.header.get("metadata", {})

    @property
    def host(self) -> Dict[str, Any]:
        """The fingerprint of the host that took the snapshot."""
        return self.header.get("host", {})

    @property
    def memory_size(self) -> int:
        """Total guest RAM in the snapshot, in bytes."""
        return sum(r["size"] for r in self.header.get("vm", {}).get("memory", []))


def _read_header(r: _Reader) -> SnapshotInfo:
    raw = r.read(_FILE_HDR.size, "file header")
    magic, version, hlen = _FILE_HDR.unpack(raw)
    if magic != MAGIC:
        raise SnapshotCorrupt(f"{r.name}: not a pykvm snapshot (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise SnapshotIncompatible(f"{r.name}: snapshot format version {version}; this pykvm reads "
                                   f"version {FORMAT_VERSION} only")
    if hlen > _MAX_HEADER:
        raise SnapshotCorrupt(f"{r.name}: header length {hlen} is implausible (damaged file?)")
    hjson = r.read(hlen, "JSON header")
    (crc,) = _U32.unpack(r.read(4, "header CRC"))
    if zlib.crc32(raw + hjson) != crc:
        raise SnapshotCorrupt(f"{r.name}: the header is damaged (CRC mismatch)")
    try:
        header = json.loads(hjson)
    except ValueError as e:
        raise SnapshotCorrupt(f"{r.name}: header is not valid JSON: {e}") from None
    return SnapshotInfo(r.name, version, header)


def read_info(src: Union[str, "os.PathLike[str]", BinaryIO]) -> SnapshotInfo:
    """Read and check only the header (fast; does not check the records)."""
    r = _Reader(src)
    try:
        return _read_header(r)
    finally:
        r.close()


@dataclasses.dataclass
class _Parsed:
    info: SnapshotInfo
    vm: Dict[str, bytes]
    vcpus: List[Tuple[int, Dict[str, bytes]]]
    regions: List[Tuple[int, int, int, int]]     # slot, flags, gpa, size
    first_mem: Optional[Tuple[int, int, int, int]]  # header of the first memory record
    records: int


def _read_state(r: _Reader) -> _Parsed:
    """Header and every state record (up to the first memory record), all CRC-checked."""
    info = _read_header(r)
    vm_items: Optional[Dict[str, bytes]] = None
    vcpus: List[Tuple[int, Dict[str, bytes]]] = []
    regions: List[Tuple[int, int, int, int]] = []
    records = 0
    while True:
        at = r.pos
        tag, arg, length, crc = r.header()
        if tag not in _STATE_TAGS:
            first = (tag, arg, length, crc)
            break
        if length > _MAX_STATE_RECORD:
            raise SnapshotCorrupt(f"{r.name}: {tag.decode()} record at byte {at} claims {length} bytes")
        payload = r.read(length, f"{tag.decode()} record")
        if zlib.crc32(payload) != crc:
            raise SnapshotCorrupt(f"{r.name}: {tag.decode()} record at byte {at} is damaged (CRC mismatch)")
        records += 1
        if tag == TAG_VM:
            vm_items = _unpack_tlv(payload, "VM state")
        elif tag == TAG_VCPU:
            vcpus.append((arg, _unpack_tlv(payload, f"vCPU {arg} state")))
        else:
            if length != _MEMR.size or arg != len(regions):
                raise SnapshotCorrupt(f"{r.name}: memory region record at byte {at} is malformed")
            regions.append(_MEMR.unpack(payload))
    if vm_items is None:
        raise SnapshotCorrupt(f"{r.name}: no VM state record")
    desc = info.header.get("vm", {})
    listed = [(m.get("slot"), m.get("flags"), m.get("guest_phys_addr"), m.get("size"))
              for m in desc.get("memory", [])]
    if [v for v, _ in vcpus] != list(desc.get("vcpus", [])) or listed != [tuple(x) for x in regions]:
        raise SnapshotCorrupt(f"{r.name}: records do not match the header's vCPU/memory list")
    return _Parsed(info, vm_items, vcpus, regions, first, records)


def _memory_records(r: _Reader, p: _Parsed) -> Iterator[Tuple[bytes, int, int, int, int]]:
    """Yield (tag, region, length, crc, at) for memory records, then check END."""
    tag, arg, length, crc = p.first_mem
    at = r.pos - _REC_HDR.size
    records = p.records
    while True:
        if tag == TAG_END:
            if length != _QQ.size:
                raise SnapshotCorrupt(f"{r.name}: END record is malformed")
            payload = r.read(length, "END record")
            if zlib.crc32(payload) != crc:
                raise SnapshotCorrupt(f"{r.name}: END record is damaged (CRC mismatch)")
            count, total = _QQ.unpack(payload)
            if count != records or total != sum(x[3] for x in p.regions):
                raise SnapshotCorrupt(f"{r.name}: END record says {count} records / {total} bytes of "
                                      f"memory, the file has {records} records (records lost?)")
            if not r.at_eof():
                raise SnapshotCorrupt(f"{r.name}: trailing data after the END record")
            return
        if tag not in (TAG_MEMD, TAG_MEMZ):
            raise SnapshotCorrupt(f"{r.name}: unexpected record {tag!r} at byte {at}")
        if arg >= len(p.regions):
            raise SnapshotCorrupt(f"{r.name}: memory record at byte {at} names region {arg}, "
                                  f"the file has {len(p.regions)}")
        yield tag, arg, length, crc, at
        records += 1
        at = r.pos
        tag, arg, length, crc = r.header()


def _consume_memory(r: _Reader, p: _Parsed, sink: Optional[List[memoryview]]) -> None:
    """Read every memory record, checking CRCs and bounds; copy data into *sink* regions.

    The CRC of a chunk is checked in a worker thread while the next one is
    read (both release the GIL); a mismatch raises before this returns.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="pykvm-snapshot-crc") as pool:
        _consume_memory_with(r, p, sink, pool)


def _consume_memory_with(r: _Reader, p: _Parsed, sink: Optional[List[memoryview]],
                         pool: ThreadPoolExecutor) -> None:
    covered = [0] * len(p.regions)
    pending: Deque[Tuple[Any, int, int, int, int]] = collections.deque()
    scratch: List[bytearray] = [bytearray(0), bytearray(0), bytearray(0)]

    def check(limit: int) -> None:
        while len(pending) > limit:
            fut, crc, k, off, at = pending.popleft()
            if fut.result() != crc:
                raise SnapshotCorrupt(f"{r.name}: guest memory at region {k} offset {off:#x} "
                                      f"(file byte {at}) is damaged (CRC mismatch)")

    for tag, k, length, crc, at in _memory_records(r, p):
        size = p.regions[k][3]
        if tag == TAG_MEMZ:
            if length != _QQ.size:
                raise SnapshotCorrupt(f"{r.name}: zero-run record at byte {at} is malformed")
            payload = r.read(length, "zero-run record")
            if zlib.crc32(payload) != crc:
                raise SnapshotCorrupt(f"{r.name}: zero-run record at byte {at} is damaged (CRC mismatch)")
            off, n = _QQ.unpack(payload)
            if off + n > size:
                raise SnapshotCorrupt(f"{r.name}: zero run at byte {at} lies outside region {k}")
            covered[k] += n
            continue
        if length < 8:
            raise SnapshotCorrupt(f"{r.name}: data record at byte {at} is malformed")
        offb = r.read(8, "data record offset")
        (off,) = _U64.unpack(offb)
        n = length - 8
        if off + n > size:
            raise SnapshotCorrupt(f"{r.name}: data record at byte {at} ([{off:#x}, {off + n:#x})) lies "
                                  f"outside region {k} (size {size:#x})")
        if sink is not None:
            dst = sink[k][off:off + n]
        else:                      # verify(): rotate 3 buffers (at most 2 CRCs in flight)
            buf = scratch.pop(0)
            if len(buf) < n:
                buf = bytearray(n)
            scratch.append(buf)
            dst = memoryview(buf)[:n]
        r.readinto(dst, "guest memory data")
        pending.append((pool.submit(zlib.crc32, dst, zlib.crc32(offb)), crc, k, off, at))
        check(1)
        covered[k] += n
    check(0)
    for k, (slot, _, gpa, size) in enumerate(p.regions):
        if covered[k] != size:
            raise SnapshotCorrupt(f"{r.name}: region {k} (slot {slot}, {size:#x} bytes at {gpa:#x}) is "
                                  f"covered by {covered[k]:#x} bytes of records")


def verify(src: Union[str, "os.PathLike[str]", BinaryIO]) -> SnapshotInfo:
    """Check every CRC and the structure of the whole file, without KVM.

    Raises :class:`SnapshotCorrupt` (or :class:`SnapshotIncompatible` for an
    unknown format version); returns the header on success.
    """
    r = _Reader(src)
    try:
        p = _read_state(r)
        for _, items in p.vcpus:
            _check_items(items, _VCPU_ITEMS, "vCPU")
        _check_items(p.vm, _VM_ITEMS, "VM")
        _consume_memory(r, p, None)
        return p.info
    finally:
        r.close()


_VCPU_ITEMS = {"regs", "sregs", "sregs2", "xsave", "fpu", "xcrs", "lapic", "msrs", "cpuid",
               "mp_state", "events", "debugregs", "nested", "tsc_khz"}
_VM_ITEMS = {"irqchip.0", "irqchip.1", "irqchip.2", "pit2", "clock"}


def _check_items(items: Dict[str, bytes], known: set, what: str) -> None:
    unknown = sorted(set(items) - known)
    if unknown:
        raise SnapshotIncompatible(f"{what} state has item(s) {unknown} this pykvm cannot restore "
                                   "(written by a newer version?)")


# ---------------------------------------------------------------------------
# compatibility

def _compat_problems(p: _Parsed, kvm: Kvm, *, allow_tsc_mismatch: bool) -> List[str]:
    hdr = p.info.header
    snap_host = hdr.get("host", {})
    here = host_fingerprint(kvm)
    problems: List[str] = []
    if snap_host.get("cpu_vendor") != here["cpu_vendor"]:
        problems.append(f"CPU vendor differs: snapshot taken on a {snap_host.get('cpu_vendor')!r} host, "
                        f"this host is {here['cpu_vendor']!r}")
    if snap_host.get("kvm_api") != here["kvm_api"]:
        problems.append(f"KVM API version differs: {snap_host.get('kvm_api')} vs {here['kvm_api']}")
    caps = here["caps"]
    host_msrs = set(int(x, 16) for x in here["msr_index_list"])
    sup_words = {k: int(v, 16) for k, v in here["cpuid_features"].items()}
    xcr0_ok = int(here["xcr0_supported"], 16)
    ignore = {f"{leaf:#x}.{sub}.{reg}": mask for leaf, sub, reg, mask in _FEATURE_WORDS}
    nv = len(p.vcpus)
    if nv > max(caps.get("MAX_VCPUS", 0), 1):
        problems.append(f"the snapshot has {nv} vCPUs, this host allows {caps.get('MAX_VCPUS')}")

    def need(cap: str, what: str) -> None:
        if not caps.get(cap):
            problems.append(f"{what} needs KVM_CAP_{cap}, which this host lacks")

    if any(k.startswith("irqchip.") for k in p.vm):
        need("IRQCHIP", "the in-kernel irqchip")
    if "pit2" in p.vm:
        need("PIT_STATE2", "the in-kernel PIT")
    for vid, items in p.vcpus:
        tag = f"vCPU {vid}"
        if "sregs2" in items:
            need("SREGS2", f"{tag} sregs2")
        if "xsave" in items:
            size = len(items["xsave"])
            if size > 4096:
                if caps.get("XSAVE2", 0) < size:
                    problems.append(f"{tag}: XSAVE area of {size} bytes, this host's KVM handles "
                                    f"{max(caps.get('XSAVE2', 0), 4096 if caps.get('XSAVE') else 0)}")
            else:
                need("XSAVE", f"{tag} XSAVE state")
            if size >= 520:
                (xstate_bv,) = _U64.unpack_from(items["xsave"], 512)
                if xstate_bv & ~xcr0_ok:
                    problems.append(f"{tag}: XSAVE state uses components {xstate_bv & ~xcr0_ok:#x} "
                                    f"this host does not support (supported XCR0 {xcr0_ok:#x})")
        if "xcrs" in items:
            need("XCRS", f"{tag} XCRs")
            xcrs = _from_bytes(S.kvm_xcrs, items["xcrs"], f"{tag} xcrs")
            for i in range(min(xcrs.nr_xcrs, S.KVM_MAX_XCRS)):
                if xcrs.xcrs[i].xcr == 0 and xcrs.xcrs[i].value & ~xcr0_ok:
                    problems.append(f"{tag}: guest XCR0 {xcrs.xcrs[i].value:#x} enables features this "
                                    f"host lacks (supported {xcr0_ok:#x})")
        if "events" in items:
            need("VCPU_EVENTS", f"{tag} events")
        if "debugregs" in items:
            need("DEBUGREGS", f"{tag} debug registers")
        if "nested" in items and len(items["nested"]) > ctypes.sizeof(S.kvm_nested_state):
            need("NESTED_STATE", f"{tag} nested virtualization state")
        if "lapic" in items and not any(k.startswith("irqchip.") for k in p.vm):
            if not caps.get("SPLIT_IRQCHIP"):
                need("SPLIT_IRQCHIP", f"{tag} LAPIC without an irqchip")
        if "msrs" in items:
            blob = items["msrs"]
            if len(blob) % 16:
                raise SnapshotCorrupt(f"{tag}: MSR list of {len(blob)} bytes is malformed")
            missing = sorted({struct.unpack_from("<I", blob, o)[0] for o in range(0, len(blob), 16)}
                             - host_msrs)
            if missing:
                problems.append(f"{tag}: MSRs {[hex(m) for m in missing]} are not in this host's "
                                "KVM_GET_MSR_INDEX_LIST")
        if "cpuid" in items:
            words = _feature_words(_cpuid_entries(items["cpuid"]))
            for key, val in words.items():
                extra = val & ~sup_words.get(key, 0) & ~ignore.get(key, 0)
                if extra:
                    leaf, sub, reg = key.split(".")
                    bits = [b for b in range(32) if extra >> b & 1]
                    problems.append(f"{tag}: guest CPUID leaf {leaf} subleaf {sub} {reg} bits {bits} are "
                                    "features this host's KVM cannot offer")
        if "tsc_khz" in items and caps.get("GET_TSC_KHZ") and not allow_tsc_mismatch:
            (khz,) = _U32.unpack(items["tsc_khz"])
            here_khz = here["tsc_khz"]
            if here_khz and khz and abs(here_khz - khz) * 1000 > khz and not caps.get("TSC_CONTROL"):
                problems.append(f"{tag}: guest TSC runs at {khz} kHz, this host at {here_khz} kHz and "
                                "cannot scale it (KVM_CAP_TSC_CONTROL); pass allow_tsc_mismatch=True "
                                "to restore anyway")
    return problems


def check_compatible(src: Union[str, "os.PathLike[str]", BinaryIO], kvm: Optional[Kvm] = None, *,
                     allow_tsc_mismatch: bool = False) -> List[str]:
    """Reasons the snapshot cannot be restored on this host (empty list: it can).

    Reads the header and state records (not the memory); raises
    :class:`SnapshotCorrupt` if those are damaged.
    """
    own = kvm is None
    kvm = kvm or Kvm()
    r = _Reader(src)
    try:
        return _compat_problems(_read_state(r), kvm, allow_tsc_mismatch=allow_tsc_mismatch)
    finally:
        r.close()
        if own:
            kvm.close()


# ---------------------------------------------------------------------------
# restoring

def _set(what: str, fn: Callable[..., Any], *args: Any) -> None:
    """Call a ``Vcpu``/``Vm`` setter; a KVM refusal becomes a :class:`SnapshotRestoreError`."""
    try:
        fn(*args)
    except KvmError as e:
        raise SnapshotRestoreError(f"restoring {what}: {e}") from None


def _restore_vcpu(vm: Vm, vcpu: Vcpu, items: Dict[str, bytes], tag: str) -> None:
    """Load one vCPU's state in the order KVM needs (see docs/snapshot.md, "Restore order")."""
    # 1. CPUID first: KVM derives valid MSRs, CR4 bits and XSAVE features from it.
    entries = _cpuid_entries(items.get("cpuid", b""))
    if entries:
        _set(f"{tag} CPUID", vcpu.set_cpuid2, entries)
    # 2. TSC frequency (only if this host differs; refusal was checked or allowed before).
    if "tsc_khz" in items:
        (khz,) = _U32.unpack(items["tsc_khz"])
        try:
            if khz and vcpu.get_tsc_khz() != khz:
                vcpu.set_tsc_khz(khz)
        except KvmError:
            pass
    # 3. Segments, control registers, EFER, APIC base.
    if "sregs2" in items:
        _set(f"{tag} sregs2", vcpu.set_sregs2, _from_bytes(S.kvm_sregs2, items["sregs2"], f"{tag} sregs2"))
    elif "sregs" in items:
        _set(f"{tag} sregs", vcpu.set_sregs, _from_bytes(S.kvm_sregs, items["sregs"], f"{tag} sregs"))
    # 4. MSRs (after CPUID and EFER; the TSC deadline waits for the LAPIC).
    msrs: List[Tuple[int, int]] = []
    blob = items.get("msrs", b"")
    for o in range(0, len(blob), 16):
        i, _, v = struct.unpack_from("<IIQ", blob, o)
        msrs.append((i, v))
    _write_msrs(vcpu, [(i, v) for i, v in msrs if i != _MSR_TSC_DEADLINE], tag)
    # 5. XCRs before the XSAVE area whose components XCR0 enables.
    if "xcrs" in items:
        _set(f"{tag} XCRs", vcpu.set_xcrs, _from_bytes(S.kvm_xcrs, items["xcrs"], f"{tag} xcrs"))
    if "xsave" in items:
        data = items["xsave"]
        extra = max(0, (len(data) - ctypes.sizeof(S.kvm_xsave) + 3) // 4)
        xs = S.flex(S.kvm_xsave, extra) if extra else S.kvm_xsave()
        ctypes.memmove(ctypes.addressof(xs), data, len(data))
        _set(f"{tag} XSAVE area", vcpu.set_xsave, xs)
    elif "fpu" in items:
        _set(f"{tag} FPU", vcpu.set_fpu, _from_bytes(S.kvm_fpu, items["fpu"], f"{tag} fpu"))
    # 6. LAPIC (after sregs set the APIC base), then the TSC deadline it arms.
    if "lapic" in items:
        _set(f"{tag} LAPIC", vcpu.set_lapic, _from_bytes(S.kvm_lapic_state, items["lapic"], f"{tag} lapic"))
    _write_msrs(vcpu, [(i, v) for i, v in msrs if i == _MSR_TSC_DEADLINE], tag)
    # 7. MP state, debug registers, general registers.
    if "mp_state" in items:
        (mp,) = _U32.unpack(items["mp_state"])
        _set(f"{tag} MP state", vcpu.set_mp_state, mp)
    if "debugregs" in items:
        _set(f"{tag} debug registers", vcpu.set_debug_regs,
             _from_bytes(S.kvm_debugregs, items["debugregs"], f"{tag} debugregs"))
    _set(f"{tag} registers", vcpu.set_regs, _from_bytes(S.kvm_regs, items["regs"], f"{tag} regs"))
    # 8. Nested state, then pending events last (KVM_SET_REGS drops a pending exception).
    if "nested" in items and len(items["nested"]) >= ctypes.sizeof(S.kvm_nested_state):
        data = items["nested"]
        ns = S.flex(S.kvm_nested_state, len(data) - ctypes.sizeof(S.kvm_nested_state))
        ctypes.memmove(ctypes.addressof(ns), data, len(data))
        if ns.size > ctypes.sizeof(S.kvm_nested_state) or ns.flags:
            _set(f"{tag} nested state", vcpu.set_nested_state, ns)
    if "events" in items:
        _set(f"{tag} pending events", vcpu.set_vcpu_events,
             _from_bytes(S.kvm_vcpu_events, items["events"], f"{tag} events"))


def _write_msrs(vcpu: Vcpu, values: List[Tuple[int, int]], tag: str) -> None:
    """KVM_SET_MSRS; an MSR KVM refuses is fine only if the new vCPU already holds the value.

    (The raw ioctl, not ``Vcpu.set_msrs``: the count KVM wrote tells which MSR it refused.)

    (Example: ``MSR_KVM_ASYNC_PF_INT`` reads 0 without an in-kernel LAPIC but
    cannot be written then, not even with 0.)
    """
    todo = list(values)
    while todo:
        buf = S.flex(S.kvm_msrs, len(todo))
        for k, (i, v) in enumerate(todo):
            buf.entries[k].index, buf.entries[k].data = i, v
        try:
            n = _raw(vcpu, I.KVM_SET_MSRS, buf)
        except KvmError as e:
            raise SnapshotRestoreError(f"restoring {tag} MSRs: {e}") from None
        if n >= len(todo):
            return
        i, v = todo[n]
        cur, _ = _read_msrs(vcpu, [i])
        if cur != [(i, v)]:
            now = f"{cur[0][1]:#x}" if cur else "unreadable"
            raise SnapshotRestoreError(f"restoring {tag} MSRs: KVM refused MSR {i:#x} = {v:#x} "
                                       f"(the new vCPU holds {now})")
        todo = todo[n + 1:]


def _restore_devices(vm: Vm, items: Dict[str, bytes]) -> None:
    if "pit2" in items:
        _set("PIT state", vm.set_pit2, _from_bytes(S.kvm_pit_state2, items["pit2"], "PIT"))
    for chip in (S.KVM_IRQCHIP_PIC_MASTER, S.KVM_IRQCHIP_PIC_SLAVE, S.KVM_IRQCHIP_IOAPIC):
        key = f"irqchip.{chip}"
        if key in items:
            _set(f"irqchip {chip}", vm.set_irqchip, _from_bytes(S.kvm_irqchip, items[key], key))


def _restore_clock(vm: Vm, items: Dict[str, bytes], clock: str, saved_at: Optional[float]) -> None:
    if "clock" not in items:
        return
    c = _from_bytes(S.kvm_clock_data, items["clock"], "clock")
    if clock == "realtime" and saved_at is not None:
        # Advance kvmclock by the wall time that passed since the snapshot.
        c.clock += max(0, int((time.time() - saved_at) * 1e9))
    c.flags = 0
    c.realtime = c.host_tsc = 0
    _set("kvmclock", vm.set_clock, c)


def _has_irqchip(vm: Vm) -> bool:
    try:
        vm.get_irqchip(S.KVM_IRQCHIP_PIC_MASTER)
        return True
    except KvmError as e:
        if _absent(e):
            return False
        raise


def _has_pit(vm: Vm) -> bool:
    try:
        vm.get_pit2()
        return True
    except KvmError as e:
        if _absent(e):
            return False
        raise


def _has_lapic(vcpu: Vcpu) -> bool:
    try:
        vcpu.get_lapic()
        return True
    except KvmError as e:
        if _absent(e):
            return False
        raise


def restore(src: Union[str, "os.PathLike[str]", BinaryIO], kvm: Optional[Kvm] = None, *,
            prepare: Optional[Callable[[Vm], None]] = None, clock: str = "saved",
            allow_tsc_mismatch: bool = False) -> Vm:
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
      by more than 0.1 % and cannot be scaled.

    Raises :class:`SnapshotCorrupt`, :class:`SnapshotIncompatible` (both
    before any VM exists, except memory damage, found while streaming) or
    :class:`SnapshotRestoreError`; the half-built VM is closed in every case.
    """
    if clock not in ("saved", "realtime"):
        raise ValueError('clock must be "saved" or "realtime"')
    own_kvm = kvm is None
    r = _Reader(src)
    vm: Optional[Vm] = None
    try:
        p = _read_state(r)
        for vid, items in p.vcpus:
            _check_items(items, _VCPU_ITEMS, f"vCPU {vid}")
            if "regs" not in items:
                raise SnapshotCorrupt(f"{r.name}: vCPU {vid} has no registers")
        _check_items(p.vm, _VM_ITEMS, "VM")
        if own_kvm:
            kvm = Kvm()
        problems = _compat_problems(p, kvm, allow_tsc_mismatch=allow_tsc_mismatch)
        if problems:
            raise SnapshotIncompatible(f"{r.name} cannot be restored on this host:\n  - "
                                       + "\n  - ".join(problems))
        vm = kvm.create_vm()
        if prepare is not None:
            prepare(vm)
        try:
            if any(k.startswith("irqchip.") for k in p.vm) and not _has_irqchip(vm):
                vm.create_irq_chip()
            if "pit2" in p.vm and not _has_pit(vm):
                vm.create_pit2()
            for slot, flags, gpa, size in p.regions:
                vm.add_memory(gpa, size, flags=flags, slot=slot)
        except KvmError as e:
            raise SnapshotRestoreError(f"re-creating the VM's devices and memory: {e}") from None
        by_slot = {m.slot: m for m in vm.memory}
        views = [memoryview(by_slot[slot]) for slot, _, _, _ in p.regions]
        try:
            _consume_memory(r, p, views)
        finally:
            for v in views:
                v.release()
        for vid, items in p.vcpus:
            try:
                vcpu = vm.create_vcpu(vid)
            except KvmError as e:
                raise SnapshotRestoreError(f"creating vCPU {vid}: {e}") from None
            if "lapic" in items and not _has_lapic(vcpu):
                raise SnapshotIncompatible(
                    f"vCPU {vid} had an in-kernel LAPIC but the new VM has none: the snapshot's VM "
                    "used a split irqchip; enable it in prepare(vm)")
            _restore_vcpu(vm, vcpu, items, f"vCPU {vid}")
        _restore_devices(vm, p.vm)
        saved_at = _parse_time(p.info.header.get("created"))
        _restore_clock(vm, p.vm, clock, saved_at)
        done, vm = vm, None
        return done
    finally:
        r.close()
        if vm is not None:
            vm.close()
        if own_kvm and kvm is not None:
            kvm.close()


def _parse_time(s: Optional[str]) -> Optional[float]:
    if not s:
        return None
    try:
        import calendar
        return float(calendar.timegm(time.strptime(s, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# command line: python -m pykvm.snapshot info|verify|check FILE

def _main(argv: Optional[List[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pykvm.snapshot",
                                 description="Inspect pykvm VM snapshots.")
    ap.add_argument("command", choices=("info", "verify", "check"),
                    help="info: print the header; verify: check every CRC; "
                         "check: can this host restore it?")
    ap.add_argument("file")
    a = ap.parse_args(argv)
    try:
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
                return 1
            print(f"{a.file}: compatible with this host")
    except SnapshotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main())
