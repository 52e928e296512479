"""The snapshot file format: errors, records, the bounded reader and the record writer.

Everything here treats the file as hostile.  The reader knows the file's real
size (``fstat``, or ``seek`` on a file object) and never allocates, zero-fills
or loops on a length or count read from the file before it checked that the
file still holds that many bytes; on a stream of unknown size it reads in
pieces of at most :data:`READ_PIECE` bytes, so memory grows only with data
that really arrived.  Every malformed input ends in :class:`SnapshotCorrupt`
(or :class:`SnapshotIncompatible` for a newer format) naming the file and the
field.  The layout is documented in ``docs/snapshot.md``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import json
import os
import stat
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, Union

from ..uapi import structs

__all__ = [
    "DEFAULT_CHUNK",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CHUNK",
    "MAX_HEADER",
    "ZERO_BLOCK",
    "SnapshotCorrupt",
    "SnapshotError",
    "SnapshotIncompatible",
    "SnapshotInfo",
    "SnapshotRestoreError",
    "Source",
    "read_info",
    "verify",
]

MAGIC = b"PYKVMSNP"
FORMAT_VERSION = 1

#: Guest memory is scanned for all-zero runs in blocks of this size.
ZERO_BLOCK = 64 << 10
#: Default largest data record (bytes of guest memory per ``MEMD`` record).
DEFAULT_CHUNK = 8 << 20
#: Largest ``chunk_size`` a file may declare (and :func:`save` accepts).
MAX_CHUNK = 256 << 20
#: Largest JSON header (the fingerprint is ~3 KB, a region ~110 bytes of a KVM
#: maximum of 32764; the rest is the caller's metadata).
MAX_HEADER = 8 << 20
#: Largest non-memory record (a vCPU's state is ~10 KB; XSAVE areas stay below 64 KiB).
MAX_STATE_RECORD = 4 << 20
#: A stream of unknown size is read in pieces of at most this many bytes.
READ_PIECE = 1 << 20
#: Largest guest CPUID table KVM accepts (``KVM_MAX_CPUID_ENTRIES``).
MAX_CPUID_ENTRIES = 256
#: Largest XSAVE area accepted (``KVM_CAP_XSAVE2`` sizes are a few KiB today).
MAX_XSAVE = 1 << 20
PAGE = 4096

FILE_HDR = struct.Struct("<8sII")      # magic, version, JSON length
REC_HDR = struct.Struct("<4sIQII")     # tag, arg, payload length, payload crc, header crc
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
QQ = struct.Struct("<QQ")
MEMR = struct.Struct("<IIQQ")          # slot, flags, guest_phys_addr, size
TLV = struct.Struct("<HI")             # name length, data length
MSR_ENTRY = struct.Struct("<IIQ")      # index, reserved (0), value

TAG_VM, TAG_VCPU, TAG_MEMR, TAG_MEMD, TAG_MEMZ, TAG_END = (
    b"VMST", b"VCPU", b"MEMR", b"MEMD", b"MEMZ", b"END ")

#: ``KVM_MEM_*`` flags a region may carry (guest_memfd regions are not saved).
MEM_FLAGS = structs.KVM_MEM_LOG_DIRTY_PAGES | structs.KVM_MEM_READONLY
#: Slots of address space 0 only (``add_memory``); KVM's own limit is checked by ``check``.
MAX_SLOT = 0xFFFF
#: ``KVM_MEM_MAX_NR_PAGES``: KVM refuses larger memslots.
MAX_REGION = ((1 << 31) - 1) * PAGE
#: MP states x86 KVM accepts in ``KVM_SET_MP_STATE`` (all but RUNNABLE need an in-kernel LAPIC).
MP_STATES = {structs.KVM_MP_STATE_RUNNABLE, structs.KVM_MP_STATE_UNINITIALIZED,
             structs.KVM_MP_STATE_INIT_RECEIVED, structs.KVM_MP_STATE_HALTED,
             structs.KVM_MP_STATE_SIPI_RECEIVED, structs.KVM_MP_STATE_AP_RESET_HOLD}
EVENT_FLAGS = (structs.KVM_VCPUEVENT_VALID_NMI_PENDING | structs.KVM_VCPUEVENT_VALID_SIPI_VECTOR
               | structs.KVM_VCPUEVENT_VALID_SHADOW | structs.KVM_VCPUEVENT_VALID_SMM
               | structs.KVM_VCPUEVENT_VALID_PAYLOAD | structs.KVM_VCPUEVENT_VALID_TRIPLE_FAULT)
IRQCHIPS = (structs.KVM_IRQCHIP_PIC_MASTER, structs.KVM_IRQCHIP_PIC_SLAVE, structs.KVM_IRQCHIP_IOAPIC)

#: Fixed-size items: name -> ctypes structure (the kernel's x86-64 uapi layout).
FIXED_VCPU_ITEMS: dict[str, Any] = {
    "regs": structs.kvm_regs, "sregs": structs.kvm_sregs, "sregs2": structs.kvm_sregs2,
    "fpu": structs.kvm_fpu, "xcrs": structs.kvm_xcrs, "lapic": structs.kvm_lapic_state,
    "debugregs": structs.kvm_debugregs, "events": structs.kvm_vcpu_events,
    "mp_state": ctypes.c_uint32, "tsc_khz": ctypes.c_uint32,
}
VCPU_ITEMS = frozenset(FIXED_VCPU_ITEMS) | {"xsave", "msrs", "cpuid", "nested"}
VM_ITEMS: dict[str, Any] = {f"irqchip.{c}": structs.kvm_irqchip for c in IRQCHIPS}
VM_ITEMS.update({"pit2": structs.kvm_pit_state2, "clock": structs.kvm_clock_data})

Source = Union[str, "os.PathLike[str]", BinaryIO]


# ---------------------------------------------------------------------------
# errors

class SnapshotError(Exception):
    """Base class of every snapshot problem; the message names the file (and the field)."""


class SnapshotCorrupt(SnapshotError):
    """The file is damaged, truncated, malformed or not a snapshot (nothing was restored)."""


class SnapshotIncompatible(SnapshotError):
    """The snapshot cannot be restored on this host or by this pykvm (nothing was restored)."""


class SnapshotRestoreError(SnapshotError):
    """KVM refused a piece of state while restoring; the new VM was closed."""


# ---------------------------------------------------------------------------
# the bounded reader

class Reader:
    """Sequential reader of a path or binary file object that knows how much is left."""

    def __init__(self, src: Source) -> None:
        self.pos = 0
        self.size: int | None = None        # bytes from the start position; None: a stream
        self.fd: int | None = None
        self.f: Any = None
        if hasattr(src, "read"):
            self.f = src
            self.name = str(getattr(src, "name", "<file object>"))
            self.size = _stream_size(src)
            return
        try:
            self.name = os.fsdecode(os.fspath(src))
        except TypeError:
            raise TypeError(f"a snapshot source is a path or a binary file object, "
                            f"not {type(src).__name__}") from None
        try:
            self.fd = os.open(self.name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            st = os.fstat(self.fd)
        except OSError as e:
            self.close()
            raise SnapshotError(f"cannot open snapshot {self.name}: {e.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            self.close()
            raise SnapshotError(f"cannot open snapshot {self.name}: it is a directory")
        if stat.S_ISREG(st.st_mode):
            self.size = st.st_size
            try:
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass
        else:                                   # a pipe or device: blocking reads
            os.set_blocking(self.fd, True)
        # Buffered: records are small and many; large reads bypass the buffer.
        self.f = open(self.fd, "rb", buffering=256 << 10, closefd=False)  # noqa: SIM115 (closed by close())

    def close(self) -> None:
        if self.fd is not None:
            if self.f is not None:
                self.f.close()
            os.close(self.fd)
            self.fd = None

    def left(self) -> int | None:
        return None if self.size is None else self.size - self.pos

    def need(self, n: int, what: str) -> None:
        """Refuse before reading if the file cannot hold *n* more bytes."""
        left = self.left()
        if left is not None and n > left:
            raise SnapshotCorrupt(f"{self.name}: truncated: {what} at byte {self.pos} needs {n} bytes, "
                                  f"the file has {max(left, 0)} left")

    def _raw(self, n: int) -> bytes:
        try:
            b = self.f.read(n)
        except (OSError, ValueError) as e:
            raise SnapshotError(f"cannot read snapshot {self.name}: {e}") from None
        if not isinstance(b, bytes):
            raise SnapshotError(f"cannot read snapshot {self.name}: the file object returned "
                                f"{type(b).__name__}, not bytes (open it in binary mode)")
        return b

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        if n <= READ_PIECE:                     # the common case: one buffered read
            b = self._raw(n)
            if len(b) == n:
                self.pos += n
                return b
            chunks, got = [b], len(b)
        else:
            chunks, got = [], 0
        while got < n:
            b = self._raw(min(n - got, READ_PIECE))
            if not b:
                raise SnapshotCorrupt(f"{self.name}: truncated: {what} at byte {self.pos} needs {n} "
                                      f"bytes, only {got} left")
            chunks.append(b)
            got += len(b)
        self.pos += n
        return b"".join(chunks)

    def readinto(self, mv: memoryview, what: str) -> None:
        """Fill *mv* (the caller checked its size with :meth:`need` first)."""
        n = len(mv)
        got = 0
        while got < n:
            try:
                k = self.f.readinto(mv[got:])
            except (OSError, ValueError, TypeError, AttributeError) as e:
                raise SnapshotError(f"cannot read snapshot {self.name}: {e}") from None
            if not k:
                raise SnapshotCorrupt(f"{self.name}: truncated: {what} at byte {self.pos} needs {n} "
                                      f"bytes, only {got} left")
            got += k
        self.pos += n

    def crc_of(self, n: int, crc: int, what: str, scratch: bytearray) -> int:
        """CRC32 of the next *n* bytes, read through *scratch* (bounded memory)."""
        self.need(n, what)
        mv = memoryview(scratch)
        while n:
            k = min(n, len(scratch))
            self.readinto(mv[:k], what)
            crc = zlib.crc32(mv[:k], crc)
            n -= k
        return crc

    def at_eof(self) -> bool:
        left = self.left()
        if left is not None and left > 0:
            return False
        return not self._raw(1)

    def header(self) -> tuple[bytes, int, int, int]:
        """Read a record header: (tag, arg, length, payload crc); checks its own CRC."""
        at = self.pos
        raw = self.read(REC_HDR.size, "record header")
        tag, arg, length, crc, hcrc = REC_HDR.unpack(raw)
        if zlib.crc32(raw[:20]) != hcrc:
            raise SnapshotCorrupt(f"{self.name}: record header at byte {at} is damaged (CRC mismatch)")
        return tag, arg, length, crc


def _stream_size(f: Any) -> int | None:
    """Bytes left in a seekable file object from its current position, else None."""
    try:
        if not f.seekable():
            return None
        here = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(here)
        return max(0, int(end) - int(here))
    except (OSError, ValueError, AttributeError, TypeError):
        return None


# ---------------------------------------------------------------------------
# the JSON header

@dataclasses.dataclass
class SnapshotInfo:
    """A snapshot's header, as read by :func:`read_info` or :func:`verify`."""

    path: str
    version: int
    header: dict[str, Any]

    @property
    def metadata(self) -> Any:
        """The *metadata* given to :func:`save`."""
        return self.header["metadata"]

    @property
    def host(self) -> dict[str, Any]:
        """The fingerprint of the host that took the snapshot."""
        host: dict[str, Any] = self.header["host"]
        return host

    @property
    def memory_size(self) -> int:
        """Total guest RAM in the snapshot, in bytes."""
        return sum(int(r["size"]) for r in self.header["vm"]["memory"])


class _Schema:
    """Checks the header's JSON types, naming the field that is wrong."""

    def __init__(self, name: str) -> None:
        self.name = name

    def bad(self, field: str, want: str, got: Any) -> SnapshotCorrupt:
        shown = repr(got)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return SnapshotCorrupt(f"{self.name}: header field {field} must be {want}, not {shown}")

    def obj(self, d: dict[str, Any], key: str, path: str) -> dict[str, Any]:
        v = self.get(d, key, path)
        if not isinstance(v, dict):
            raise self.bad(f"{path}{key}", "an object", v)
        return v

    def get(self, d: dict[str, Any], key: str, path: str) -> Any:
        if key not in d:
            raise SnapshotCorrupt(f"{self.name}: header field {path}{key} is missing")
        return d[key]

    def int_(self, v: Any, field: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.bad(field, f"an integer in [{lo}, {hi:#x}]", v)
        return v

    def str_(self, v: Any, field: str) -> str:
        if not isinstance(v, str):
            raise self.bad(field, "a string", v)
        return v

    def hex_(self, v: Any, field: str) -> int:
        s = self.str_(v, field)
        if not (s.startswith("0x") and 2 < len(s) <= 18):
            raise self.bad(field, "a hexadecimal string 0x...", v)
        try:
            return int(s, 16)
        except ValueError:
            raise self.bad(field, "a hexadecimal string 0x...", v) from None

    def list_(self, v: Any, field: str) -> list[Any]:
        if not isinstance(v, list):
            raise self.bad(field, "a list", v)
        return v


def check_header(header: Any, name: str) -> dict[str, Any]:
    """Check every header field pykvm uses has its JSON type and range (extra keys are allowed)."""
    sc = _Schema(name)
    if not isinstance(header, dict):
        raise sc.bad("(top level)", "an object", header)
    if sc.get(header, "format", "") != "pykvm-snapshot":
        raise sc.bad("format", '"pykvm-snapshot"', header["format"])
    if sc.int_(sc.get(header, "version", ""), "version", 0, 2**32 - 1) != FORMAT_VERSION:
        raise SnapshotIncompatible(f"{name}: header field version is {header['version']}; this pykvm "
                                   f"reads version {FORMAT_VERSION} only")
    sc.str_(sc.get(header, "created", ""), "created")
    sc.str_(sc.get(header, "writer", ""), "writer")
    host = sc.obj(header, "host", "")
    sc.str_(sc.get(host, "cpu_vendor", "host."), "host.cpu_vendor")
    sc.str_(sc.get(host, "kernel", "host."), "host.kernel")
    sc.int_(sc.get(host, "kvm_api", "host."), "host.kvm_api", 0, 2**31 - 1)
    sc.int_(sc.get(host, "tsc_khz", "host."), "host.tsc_khz", 0, 2**32 - 1)
    sig = sc.obj(host, "cpu_signature", "host.")
    for k, v in sig.items():
        sc.int_(v, f"host.cpu_signature.{k}", 0, 2**32 - 1)
    for k, v in sc.obj(host, "caps", "host.").items():
        sc.int_(v, f"host.caps.{k}", -(2**31), 2**63 - 1)
    for k, v in sc.obj(host, "cpuid_features", "host.").items():
        sc.hex_(v, f"host.cpuid_features.{k}")
    sc.hex_(sc.get(host, "xcr0_supported", "host."), "host.xcr0_supported")
    for i, v in enumerate(sc.list_(sc.get(host, "msr_index_list", "host."), "host.msr_index_list")):
        sc.hex_(v, f"host.msr_index_list[{i}]")
    guest = sc.obj(header, "guest", "")
    for k, v in sc.obj(guest, "cpuid_features", "guest.").items():
        sc.hex_(v, f"guest.cpuid_features.{k}")
    vm = sc.obj(header, "vm", "")
    ids = [sc.int_(v, f"vm.vcpus[{i}]", 0, 2**32 - 1)
           for i, v in enumerate(sc.list_(sc.get(vm, "vcpus", "vm."), "vm.vcpus"))]
    if len(set(ids)) != len(ids):
        raise sc.bad("vm.vcpus", "a list of distinct vCPU ids", ids)
    for i, m in enumerate(sc.list_(sc.get(vm, "memory", "vm."), "vm.memory")):
        if (type(m) is dict and type(m.get("slot")) is int and type(m.get("flags")) is int
                and type(m.get("guest_phys_addr")) is int and type(m.get("size")) is int
                and 0 <= m["slot"] <= MAX_SLOT and 0 <= m["flags"] <= MEM_FLAGS
                and 0 <= m["guest_phys_addr"] < 2**64 and PAGE <= m["size"] <= MAX_REGION):
            continue                            # the common case, checked in one go
        if not isinstance(m, dict):
            raise sc.bad(f"vm.memory[{i}]", "an object", m)
        sc.int_(sc.get(m, "slot", f"vm.memory[{i}]."), f"vm.memory[{i}].slot", 0, MAX_SLOT)
        sc.int_(sc.get(m, "flags", f"vm.memory[{i}]."), f"vm.memory[{i}].flags", 0, MEM_FLAGS)
        sc.int_(sc.get(m, "guest_phys_addr", f"vm.memory[{i}]."), f"vm.memory[{i}].guest_phys_addr")
        sc.int_(sc.get(m, "size", f"vm.memory[{i}]."), f"vm.memory[{i}].size", PAGE, MAX_REGION)
    for key in ("irqchip", "pit"):
        if not isinstance(sc.get(vm, key, "vm."), bool):
            raise sc.bad(f"vm.{key}", "true or false", vm[key])
    for k, v in sc.obj(header, "unreadable_msrs", "").items():
        for i, x in enumerate(sc.list_(v, f"unreadable_msrs.{k}")):
            sc.hex_(x, f"unreadable_msrs.{k}[{i}]")
    chunk = sc.int_(sc.get(header, "chunk_size", ""), "chunk_size", ZERO_BLOCK, MAX_CHUNK)
    if chunk % ZERO_BLOCK:
        raise sc.bad("chunk_size", f"a multiple of {ZERO_BLOCK}", chunk)
    sc.get(header, "metadata", "")
    return header


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("an object has a key twice")
    return out


def parse_header_json(hjson: bytes, name: str) -> Any:
    """Strict UTF-8 JSON: no NaN/Infinity, no duplicate keys; every failure is SnapshotCorrupt."""
    try:
        text = hjson.decode("utf-8")
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as e:
        raise SnapshotCorrupt(f"{name}: header is not UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise SnapshotCorrupt(f"{name}: header JSON is nested too deeply") from None
    except ValueError as e:               # JSONDecodeError, int digits limit, NaN, duplicate key
        raise SnapshotCorrupt(f"{name}: header is not valid JSON: {e}") from None


def read_header(r: Reader) -> SnapshotInfo:
    raw = r.read(FILE_HDR.size, "file header")
    magic, version, hlen = FILE_HDR.unpack(raw)
    if magic != MAGIC:
        raise SnapshotCorrupt(f"{r.name}: not a pykvm snapshot (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise SnapshotIncompatible(f"{r.name}: snapshot format version {version}; this pykvm reads "
                                   f"version {FORMAT_VERSION} only")
    if hlen > MAX_HEADER:
        raise SnapshotCorrupt(f"{r.name}: header length {hlen} is over the limit of {MAX_HEADER} bytes")
    hjson = r.read(hlen, "JSON header")
    (crc,) = U32.unpack(r.read(4, "header CRC"))
    if zlib.crc32(raw + hjson) != crc:
        raise SnapshotCorrupt(f"{r.name}: the header is damaged (CRC mismatch)")
    header = check_header(parse_header_json(hjson, r.name), r.name)
    return SnapshotInfo(r.name, version, header)


def read_info(src: Source) -> SnapshotInfo:
    """Read and check only the header (fast; does not check the records)."""
    r = Reader(src)
    try:
        return read_header(r)
    finally:
        r.close()


# ---------------------------------------------------------------------------
# items (the payload of VMST and VCPU records)

def pack_items(items: Sequence[tuple[str, bytes]]) -> bytes:
    out: list[bytes] = []
    for name, data in items:
        n = name.encode("ascii")
        out += [TLV.pack(len(n), len(data)), n, data]
    return b"".join(out)


def unpack_items(payload: bytes, what: str, known: Any) -> dict[str, bytes]:
    """Split an items payload; names are ASCII, distinct and known; refuses anything else."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(payload):
        if pos + TLV.size > len(payload):
            raise SnapshotCorrupt(f"{what}: truncated item header at byte {pos}")
        nlen, dlen = TLV.unpack_from(payload, pos)
        pos += TLV.size
        if pos + nlen + dlen > len(payload):
            raise SnapshotCorrupt(f"{what}: item at byte {pos} runs past the record")
        try:
            name = payload[pos:pos + nlen].decode("ascii")
        except UnicodeDecodeError:
            raise SnapshotCorrupt(f"{what}: item name at byte {pos} is not ASCII") from None
        if name in out:
            raise SnapshotCorrupt(f"{what}: item {name!r} appears twice")
        if name not in known:
            shown = name if name.isprintable() else repr(name)
            raise SnapshotIncompatible(f"{what}: item {shown!r} is one this pykvm cannot restore "
                                       "(written by a newer version?)")
        out[name] = payload[pos + nlen:pos + nlen + dlen]
        pos += nlen + dlen
    return out


def from_bytes(cls: Any, data: bytes, what: str) -> Any:
    if len(data) != ctypes.sizeof(cls):
        raise SnapshotCorrupt(f"{what}: {len(data)} bytes, expected {ctypes.sizeof(cls)} "
                              f"(struct {cls.__name__})")
    return cls.from_buffer_copy(data)


def cpuid_entries(blob: bytes, what: str = "cpuid") -> list[structs.kvm_cpuid_entry2]:
    size = ctypes.sizeof(structs.kvm_cpuid_entry2)
    if len(blob) % size or len(blob) // size > MAX_CPUID_ENTRIES:
        raise SnapshotCorrupt(f"{what}: {len(blob)} bytes is not a table of at most "
                              f"{MAX_CPUID_ENTRIES} entries of {size} bytes")
    return [structs.kvm_cpuid_entry2.from_buffer_copy(blob, i) for i in range(0, len(blob), size)]


def msr_values(blob: bytes, what: str) -> list[tuple[int, int]]:
    if len(blob) % MSR_ENTRY.size:
        raise SnapshotCorrupt(f"{what}: {len(blob)} bytes is not a list of {MSR_ENTRY.size}-byte entries")
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    for index, reserved, value in MSR_ENTRY.iter_unpack(blob):
        if reserved:
            raise SnapshotCorrupt(f"{what}: MSR {index:#x} has a non-zero reserved field")
        if index in seen:
            raise SnapshotCorrupt(f"{what}: MSR {index:#x} appears twice")
        seen.add(index)
        out.append((index, value))
    return out


def check_vcpu_items(items: dict[str, bytes], what: str) -> None:
    """Sizes, counts and enumerations of one vCPU's items, exactly."""
    for name, cls in FIXED_VCPU_ITEMS.items():
        if name in items:
            from_bytes(cls, items[name], f"{what} item {name}")
    if "regs" not in items:
        raise SnapshotCorrupt(f"{what}: item regs is missing")
    if ("sregs" in items) == ("sregs2" in items):
        raise SnapshotCorrupt(f"{what}: exactly one of the items sregs, sregs2 must be present")
    if "xsave" in items and "fpu" in items:
        raise SnapshotCorrupt(f"{what}: both items xsave and fpu are present")
    if "sregs2" in items:
        s2 = structs.kvm_sregs2.from_buffer_copy(items["sregs2"])
        if s2.flags & ~structs.KVM_SREGS2_FLAGS_PDPTRS_VALID:
            raise SnapshotCorrupt(f"{what} item sregs2: unknown flags {s2.flags:#x}")
    if "xsave" in items:
        n = len(items["xsave"])
        if n < ctypes.sizeof(structs.kvm_xsave) or n % 4 or n > MAX_XSAVE:
            raise SnapshotCorrupt(f"{what} item xsave: {n} bytes (want a multiple of 4 in "
                                  f"[{ctypes.sizeof(structs.kvm_xsave)}, {MAX_XSAVE}])")
    if "xcrs" in items:
        xcrs = structs.kvm_xcrs.from_buffer_copy(items["xcrs"])
        if xcrs.nr_xcrs > structs.KVM_MAX_XCRS or xcrs.flags:
            raise SnapshotCorrupt(f"{what} item xcrs: nr_xcrs {xcrs.nr_xcrs} (at most "
                                  f"{structs.KVM_MAX_XCRS}) or flags {xcrs.flags:#x} out of range")
    if "mp_state" in items:
        (mp,) = U32.unpack(items["mp_state"])
        if mp not in MP_STATES or (mp != structs.KVM_MP_STATE_RUNNABLE and "lapic" not in items):
            raise SnapshotCorrupt(f"{what} item mp_state: {mp} is not an MP state KVM accepts here")
    if "debugregs" in items:
        dr = structs.kvm_debugregs.from_buffer_copy(items["debugregs"])
        if dr.flags or dr.dr6 >> 32 or dr.dr7 >> 32:
            raise SnapshotCorrupt(f"{what} item debugregs: flags or upper DR6/DR7 bits are set")
    if "events" in items:
        ev = structs.kvm_vcpu_events.from_buffer_copy(items["events"])
        if ev.flags & ~EVENT_FLAGS:
            raise SnapshotCorrupt(f"{what} item events: unknown flags {ev.flags:#x}")
    if "msrs" in items:
        msr_values(items["msrs"], f"{what} item msrs")
    if "cpuid" in items:
        cpuid_entries(items["cpuid"], f"{what} item cpuid")
    if "nested" in items:
        data = items["nested"]
        hdr = ctypes.sizeof(structs.kvm_nested_state)
        if len(data) < hdr:
            raise SnapshotCorrupt(f"{what} item nested: {len(data)} bytes, less than its {hdr}-byte header")
        size = structs.kvm_nested_state.from_buffer_copy(data).size
        if len(data) != max(size, hdr):
            raise SnapshotCorrupt(f"{what} item nested: {len(data)} bytes but its size field says {size}")


def check_vm_items(items: dict[str, bytes], what: str) -> None:
    for name, cls in VM_ITEMS.items():
        if name in items:
            obj = from_bytes(cls, items[name], f"{what} item {name}")
            if name.startswith("irqchip.") and obj.chip_id != int(name[8:]):
                raise SnapshotCorrupt(f"{what} item {name}: chip_id {obj.chip_id} does not match")
    chips = [f"irqchip.{c}" in items for c in IRQCHIPS]
    if any(chips) and not all(chips):
        raise SnapshotCorrupt(f"{what}: the irqchip items are incomplete")


# ---------------------------------------------------------------------------
# reading the state records

@dataclasses.dataclass
class Parsed:
    """The header and state records of a file, every one checked; memory not read yet."""

    info: SnapshotInfo
    vm: dict[str, bytes]
    vcpus: list[tuple[int, dict[str, bytes]]]
    regions: list[tuple[int, int, int, int]]       # slot, flags, gpa, size
    first_mem: tuple[bytes, int, int, int]         # header of the first memory record
    first_at: int
    records: int


def read_state(r: Reader) -> Parsed:
    """Header and every state record (up to the first memory record), all checked."""
    info = read_header(r)
    desc = info.header["vm"]
    vm_items: dict[str, bytes] | None = None
    vcpus: list[tuple[int, dict[str, bytes]]] = []
    regions: list[tuple[int, int, int, int]] = []
    records = 0
    order = {TAG_VM: 0, TAG_VCPU: 1, TAG_MEMR: 2}
    stage = -1
    while True:
        at = r.pos
        tag, arg, length, crc = r.header()
        if tag not in order:
            break
        name = tag.decode()
        if order[tag] < stage or (tag == TAG_VM and vm_items is not None):
            raise SnapshotCorrupt(f"{r.name}: {name} record at byte {at} is out of order")
        stage = order[tag]
        if length > MAX_STATE_RECORD:
            raise SnapshotCorrupt(f"{r.name}: {name} record at byte {at} claims {length} bytes "
                                  f"(limit {MAX_STATE_RECORD})")
        payload = r.read(length, f"{name} record")
        if zlib.crc32(payload) != crc:
            raise SnapshotCorrupt(f"{r.name}: {name} record at byte {at} is damaged (CRC mismatch)")
        records += 1
        if tag == TAG_VM:
            if arg:
                raise SnapshotCorrupt(f"{r.name}: VMST record at byte {at} has arg {arg}, expected 0")
            vm_items = unpack_items(payload, f"{r.name}: VM state", VM_ITEMS)
            check_vm_items(vm_items, f"{r.name}: VM state")
        elif tag == TAG_VCPU:
            if len(vcpus) >= len(desc["vcpus"]):
                raise SnapshotCorrupt(f"{r.name}: more VCPU records than the header's vm.vcpus lists")
            what = f"{r.name}: vCPU {arg} state"
            items = unpack_items(payload, what, VCPU_ITEMS)
            check_vcpu_items(items, what)
            vcpus.append((arg, items))
        else:
            if length != MEMR.size or arg != len(regions):
                raise SnapshotCorrupt(f"{r.name}: memory region record at byte {at} is malformed")
            if len(regions) >= len(desc["memory"]):
                raise SnapshotCorrupt(f"{r.name}: more MEMR records than the header's vm.memory lists")
            regions.append(MEMR.unpack(payload))
    if vm_items is None:
        raise SnapshotCorrupt(f"{r.name}: no VM state record")
    listed = [(m["slot"], m["flags"], m["guest_phys_addr"], m["size"]) for m in desc["memory"]]
    if [v for v, _ in vcpus] != desc["vcpus"] or listed != regions:
        raise SnapshotCorrupt(f"{r.name}: records do not match the header's vm.vcpus / vm.memory lists")
    if desc["irqchip"] != ("irqchip.0" in vm_items) or desc["pit"] != ("pit2" in vm_items):
        raise SnapshotCorrupt(f"{r.name}: header fields vm.irqchip / vm.pit do not match the VM state")
    _check_regions(regions, r.name)
    return Parsed(info, vm_items, vcpus, regions, (tag, arg, length, crc), at, records)


def _check_regions(regions: list[tuple[int, int, int, int]], name: str) -> None:
    """Slots distinct, regions page-aligned, non-empty, in range and not overlapping."""
    slots: set[int] = set()
    for k, (slot, flags, gpa, size) in enumerate(regions):
        if slot in slots or slot > MAX_SLOT:
            raise SnapshotCorrupt(f"{name}: region {k}: slot {slot} is repeated or out of range")
        slots.add(slot)
        if flags & ~MEM_FLAGS:
            raise SnapshotCorrupt(f"{name}: region {k}: unknown memory flags {flags:#x}")
        if gpa % PAGE or size % PAGE or not 0 < size <= MAX_REGION or gpa + size > 2**64:
            raise SnapshotCorrupt(f"{name}: region {k}: [{gpa:#x}, +{size:#x}) is not a page-aligned, "
                                  "non-empty guest range")
    spans = sorted((gpa, gpa + size, k) for k, (_, _, gpa, size) in enumerate(regions))
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):
        if start < end:
            raise SnapshotCorrupt(f"{name}: regions {a} and {b} overlap in guest physical memory")


# ---------------------------------------------------------------------------
# reading the memory records

def memory_records(r: Reader, p: Parsed) -> Iterator[tuple[bytes, int, int, int, int, int]]:
    """Yield (tag, region, offset, length, payload crc, at) for each memory record in file order, then check END.

    Enforces exact coverage: region by region, offset by offset, each record
    starting where the previous one ended (no byte twice, none missing).
    """
    tag, arg, length, crc = p.first_mem
    at = p.first_at
    records = p.records
    k, covered = 0, 0
    chunk = p.info.header["chunk_size"]
    while True:
        while k < len(p.regions) and covered == p.regions[k][3]:
            k, covered = k + 1, 0
        if tag == TAG_END:
            if length != QQ.size:
                raise SnapshotCorrupt(f"{r.name}: END record is malformed")
            payload = r.read(length, "END record")
            if zlib.crc32(payload) != crc:
                raise SnapshotCorrupt(f"{r.name}: END record is damaged (CRC mismatch)")
            count, total = QQ.unpack(payload)
            if count != records or total != sum(x[3] for x in p.regions):
                raise SnapshotCorrupt(f"{r.name}: END record says {count} records / {total} bytes of "
                                      f"memory, the file has {records} records (records lost?)")
            if k < len(p.regions):
                raise SnapshotCorrupt(f"{r.name}: region {k} is covered only up to offset {covered:#x} "
                                      f"of {p.regions[k][3]:#x} (records lost?)")
            if not r.at_eof():
                raise SnapshotCorrupt(f"{r.name}: trailing data after the END record")
            return
        if tag not in (TAG_MEMD, TAG_MEMZ):
            raise SnapshotCorrupt(f"{r.name}: unexpected record {tag!r} at byte {at}")
        if arg != k:
            raise SnapshotCorrupt(f"{r.name}: memory record at byte {at} is for region {arg}; region "
                                  f"{k} is covered only up to offset {covered:#x} (records lost or out of order?)")
        if tag == TAG_MEMZ:
            if length != QQ.size:
                raise SnapshotCorrupt(f"{r.name}: zero-run record at byte {at} is malformed")
            payload = r.read(length, "zero-run record")
            if zlib.crc32(payload) != crc:
                raise SnapshotCorrupt(f"{r.name}: zero-run record at byte {at} is damaged (CRC mismatch)")
            off, n = QQ.unpack(payload)
        else:
            if not 8 < length <= 8 + chunk:
                raise SnapshotCorrupt(f"{r.name}: data record at byte {at} holds {length} bytes "
                                      f"(expected 9 to {8 + chunk}: chunk_size {chunk})")
            r.need(length, "data record")
            (off,) = U64.unpack(r.read(8, "data record offset"))
            n = length - 8
        if off != covered or n == 0 or off + n > p.regions[k][3]:
            raise SnapshotCorrupt(f"{r.name}: memory record at byte {at} covers region {k} "
                                  f"[{off:#x}, +{n:#x}); expected a non-empty run from {covered:#x} "
                                  f"within {p.regions[k][3]:#x} bytes (records lost or repeated?)")
        # The caller reads a MEMD record's data (and checks *crc*) before the next header.
        yield tag, k, off, n, crc, at
        covered += n
        records += 1
        at = r.pos
        tag, arg, length, crc = r.header()


def check_memory(r: Reader, p: Parsed) -> None:
    """Read every memory record without keeping it: CRCs, bounds and coverage (``verify``)."""
    scratch = bytearray(min(READ_PIECE, p.info.header["chunk_size"]))
    for tag, k, off, n, crc, at in memory_records(r, p):
        if tag == TAG_MEMD:
            got = r.crc_of(n, zlib.crc32(U64.pack(off)), "guest memory data", scratch)
            if got != crc:
                raise SnapshotCorrupt(f"{r.name}: guest memory at region {k} offset {off:#x} "
                                      f"(file byte {at}) is damaged (CRC mismatch)")


def verify(src: Source) -> SnapshotInfo:
    """Check the whole file without KVM: every CRC, the structure, the types, sizes and ranges.

    Raises :class:`SnapshotCorrupt` (or :class:`SnapshotIncompatible` for
    another format version or unknown items); returns the header on success.
    A file ``verify`` accepts is never refused by :func:`restore` as corrupt
    (only as incompatible with the host, or where KVM refuses a value: use
    ``check_compatible`` for that).
    """
    r = Reader(src)
    try:
        p = read_state(r)
        check_memory(r, p)
        return p.info
    finally:
        r.close()
