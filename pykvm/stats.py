"""KVM binary statistics: the fd from ``KVM_GET_STATS_FD`` (``Stats``).

A VM fd and every vCPU fd can hand out a read-only *stats fd*
(``KVM_CAP_BINARY_STATS_FD``).  Its content is a small self-describing file::

    header      struct kvm_stats_header   (flags, name_size, num_desc,
                                           id_offset, desc_offset, data_offset)
    id string   name_size bytes at id_offset ("kvm-1234", "kvm-1234/vcpu-0")
    descriptors num_desc records at desc_offset, each a struct kvm_stats_desc
                followed by name_size bytes of NUL-padded name
    data        at data_offset + desc.offset: desc.size u64 values per stat

The header, id and descriptors never change for the life of the fd; only the
data block does, so :class:`Stats` reads the former once and the data on each
:meth:`Stats.read` (one ``pread`` of the whole block, so the values of one
call belong together).

Use :func:`open_stats` on a VM or vCPU fd (``Vm.get_stats_fd()`` /
``Vcpu.get_stats_fd()`` call it)::

    with open_stats(vm.fileno()) as st:
        print(st.id, st.names)
        print(st.read())            # {"remote_tlb_flush": 0, ...}
        print(st["pages_4k"])       # one value, read now
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .errors import KvmError
from .fd import FdObject, ioctl
from .uapi import ioctls as I
from .uapi import structs as S

__all__ = ["STAT_BASES", "STAT_TYPES", "STAT_UNITS", "StatDesc", "Stats", "open_stats"]

#: ``KVM_STATS_TYPE_*`` values (``flags & KVM_STATS_TYPE_MASK``) by name.
STAT_TYPES: dict[int, str] = {
    S.KVM_STATS_TYPE_CUMULATIVE: "cumulative",
    S.KVM_STATS_TYPE_INSTANT: "instant",
    S.KVM_STATS_TYPE_PEAK: "peak",
    S.KVM_STATS_TYPE_LINEAR_HIST: "linear_hist",
    S.KVM_STATS_TYPE_LOG_HIST: "log_hist",
}
#: ``KVM_STATS_UNIT_*`` values (``flags & KVM_STATS_UNIT_MASK``) by name.
STAT_UNITS: dict[int, str] = {
    S.KVM_STATS_UNIT_NONE: "none",
    S.KVM_STATS_UNIT_BYTES: "bytes",
    S.KVM_STATS_UNIT_SECONDS: "seconds",
    S.KVM_STATS_UNIT_CYCLES: "cycles",
    S.KVM_STATS_UNIT_BOOLEAN: "boolean",
}
#: ``KVM_STATS_BASE_*`` values (``flags & KVM_STATS_BASE_MASK``) -> the base (10 or 2).
STAT_BASES: dict[int, int] = {S.KVM_STATS_BASE_POW10: 10, S.KVM_STATS_BASE_POW2: 2}

_HDR_SIZE = ctypes.sizeof(S.kvm_stats_header)
_DESC_SIZE = ctypes.sizeof(S.kvm_stats_desc)  # 16, the name follows


@dataclass(frozen=True)
class StatDesc:
    """One statistic's descriptor (``struct kvm_stats_desc``), decoded.

    ``type``/``unit`` are names (``"cumulative"``, ``"bytes"``; an unknown code
    is shown as ``"type7"``/``"unit9"``), ``base`` is 10 or 2 and a value is
    ``raw * base ** exponent`` in ``unit``.  ``size`` is the number of u64
    values (1 for a plain counter, the bucket count for a histogram);
    ``bucket_size`` is the width of a linear histogram's buckets.
    """

    name: str
    flags: int
    type: str
    unit: str
    base: int
    exponent: int
    size: int
    offset: int
    bucket_size: int

    @property
    def is_histogram(self) -> bool:
        """True for linear and logarithmic histograms (``size`` buckets)."""
        return self.type in ("linear_hist", "log_hist")

    def as_dict(self) -> dict[str, str | int]:
        """The descriptor as a JSON-friendly dict (without ``offset``/``flags``)."""
        return {"name": self.name, "type": self.type, "unit": self.unit, "base": self.base,
                "exponent": self.exponent, "size": self.size, "bucket_size": self.bucket_size}


def _decode_desc(raw: bytes, name_size: int) -> StatDesc:
    d = S.kvm_stats_desc.from_buffer_copy(raw[:_DESC_SIZE])
    name = raw[_DESC_SIZE:_DESC_SIZE + name_size].split(b"\0", 1)[0].decode("ascii", "replace")
    t = d.flags & S.KVM_STATS_TYPE_MASK
    u = d.flags & S.KVM_STATS_UNIT_MASK
    b = d.flags & S.KVM_STATS_BASE_MASK
    return StatDesc(
        name=name, flags=d.flags,
        type=STAT_TYPES.get(t, f"type{t >> S.KVM_STATS_TYPE_SHIFT}"),
        unit=STAT_UNITS.get(u, f"unit{u >> S.KVM_STATS_UNIT_SHIFT}"),
        base=STAT_BASES.get(b, b >> S.KVM_STATS_BASE_SHIFT),
        exponent=d.exponent, size=d.size, offset=d.offset, bucket_size=d.bucket_size)


class Stats(FdObject):
    """A KVM binary statistics fd (owned; close-on-exec; ``with`` closes it).

    ``Stats(fd)`` takes ownership of *fd* and reads its header and
    descriptors at once (a malformed file raises :class:`KvmError` and
    closes the fd).  Values: :meth:`read` (all, as a dict), ``stats[name]``
    (one), :meth:`read_raw` (the data block as a tuple of u64).
    """

    _what = "stats fd"

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        try:
            os.set_inheritable(fd, False)  # the kernel sets O_CLOEXEC already; make sure
            self._load()
        except BaseException:
            self.close()
            raise

    def _pread(self, n: int, offset: int) -> bytes:
        fd = self.fileno()
        try:
            data = os.pread(fd, n, offset)
        except OSError as e:
            raise KvmError(e.errno, "pread(stats fd)") from None
        if len(data) != n:
            raise KvmError(errno.EIO, "pread(stats fd)",
                           f"short read: {len(data)} of {n} bytes at offset {offset}")
        return data

    def _load(self) -> None:
        hdr = S.kvm_stats_header.from_buffer_copy(self._pread(_HDR_SIZE, 0))
        if hdr.name_size == 0 or hdr.name_size > 4096 or hdr.num_desc > 1 << 16:
            raise KvmError(errno.EINVAL, "KVM_GET_STATS_FD",
                           f"implausible stats header (name_size={hdr.name_size}, num_desc={hdr.num_desc})")
        self.header = hdr
        self.name_size: int = hdr.name_size
        self.id: str = self._pread(hdr.name_size, hdr.id_offset).split(b"\0", 1)[0].decode("ascii", "replace")
        step = _DESC_SIZE + hdr.name_size
        raw = self._pread(step * hdr.num_desc, hdr.desc_offset) if hdr.num_desc else b""
        descs = [_decode_desc(raw[i * step:(i + 1) * step], hdr.name_size) for i in range(hdr.num_desc)]
        self.descriptors: tuple[StatDesc, ...] = tuple(descs)
        self._by_name: dict[str, StatDesc] = {d.name: d for d in descs}
        self.data_size: int = max((d.offset + 8 * d.size for d in descs), default=0)
        if any(d.offset % 8 for d in descs):
            raise KvmError(errno.EINVAL, "KVM_GET_STATS_FD", "a statistic's offset is not a multiple of 8")
        self._words = struct.Struct(f"={self.data_size // 8}Q")
        # name, first word, word count (None: a plain counter) -- decoded once, used by every read()
        self._layout: tuple[tuple[str, int, int | None], ...] = tuple(
            (d.name, d.offset // 8, None if d.size == 1 and not d.is_histogram else d.size) for d in descs)

    def __repr__(self) -> str:
        ident = getattr(self, "id", "?")
        return f"<Stats {ident!r} {len(getattr(self, 'descriptors', ()))} stats {self._state()}>"

    # -- descriptors ---------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The statistics' names, in the kernel's order."""
        return [d.name for d in self.descriptors]

    def desc(self, name: str) -> StatDesc:
        """The descriptor of statistic *name* (``KeyError`` if there is none)."""
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.descriptors)

    # -- values ----------------------------------------------------------------------
    def read_raw(self) -> tuple[int, ...]:
        """The whole data block now, as native-endian u64 values (one ``pread``)."""
        n = self.data_size
        if n == 0:
            return ()
        return self._words.unpack(self._pread(n, self.header.data_offset))

    @staticmethod
    def _value(d: StatDesc, words: Sequence[int], base: int = 0) -> int | list[int]:
        i = (d.offset - base) // 8
        if d.size == 1 and not d.is_histogram:
            return words[i]
        return list(words[i:i + d.size])

    def read(self) -> dict[str, int | list[int]]:
        """All values now: ``{name: int}``, or ``{name: [buckets...]}`` for histograms
        (and any statistic whose ``size`` is not 1)."""
        words = self.read_raw()
        return {name: words[i] if size is None else list(words[i:i + size])
                for name, i, size in self._layout}

    def __getitem__(self, name: str) -> int | list[int]:
        """The value of one statistic, read now (a list for histograms)."""
        d = self._by_name[name]
        if d.size == 0:
            return []
        raw = self._pread(8 * d.size, self.header.data_offset + d.offset)
        return self._value(d, struct.unpack(f"={d.size}Q", raw), d.offset)


def open_stats(fd_owner_fileno: int | object) -> Stats:
    """Issue ``KVM_GET_STATS_FD`` on a VM or vCPU fd and return the owned :class:`Stats`.

    *fd_owner_fileno* is the VM/vCPU fd number (or any object with
    ``fileno()``).  Raises :class:`KvmError` (ENOTTY on kernels without
    ``KVM_CAP_BINARY_STATS_FD``).
    """
    fd = fd_owner_fileno if isinstance(fd_owner_fileno, int) else fd_owner_fileno.fileno()  # type: ignore[attr-defined]
    return Stats(ioctl(fd, I.KVM_GET_STATS_FD))
