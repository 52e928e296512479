"""pykvm.stats: binary statistics fds, checked against a raw os.pread of the same fd."""

from __future__ import annotations

import fcntl
import os
import struct

import pytest

import pykvm
from pykvm.errors import KvmClosedError, KvmError
from pykvm.stats import STAT_TYPES, STAT_UNITS, Stats, open_stats
from tests.support.guests import REAL_MODE_HELLO, real_mode


def raw_read(fd: int):
    """Header, id, descriptors and data of a stats fd with os.pread only."""
    _flags, name_size, num_desc, id_off, desc_off, data_off = struct.unpack("=6I", os.pread(fd, 24, 0))
    ident = os.pread(fd, name_size, id_off).split(b"\0")[0].decode()
    step = 16 + name_size
    raw = os.pread(fd, step * num_desc, desc_off)
    out = {}
    for i in range(num_desc):
        dflags, exponent, size, offset, bucket = struct.unpack_from("=IhHII", raw, i * step)
        name = raw[i * step + 16:(i + 1) * step].split(b"\0")[0].decode()
        vals = list(struct.unpack(f"={size}Q", os.pread(fd, 8 * size, data_off + offset)))
        out[name] = (dflags, exponent, size, offset, bucket, vals)
    return ident, name_size, out


def test_vm_stats_match_raw_read(vm):
    with open_stats(vm.fileno()) as st:
        ident, name_size, raw = raw_read(st.fileno())
        assert st.id == ident and ident.startswith("kvm-")
        assert st.name_size == name_size
        assert st.names == list(raw)
        assert len(st) == len(raw) and "remote_tlb_flush" in st
        for d in st.descriptors:
            flags, exponent, size, offset, bucket, _vals = raw[d.name]
            assert (d.flags, d.exponent, d.size, d.offset, d.bucket_size) == (
                flags, exponent, size, offset, bucket)
            assert d.type == STAT_TYPES[flags & 0xF]
            assert d.unit == STAT_UNITS[flags & 0xF0]
            assert d.base == (10 if flags & 0xF00 == 0 else 2)
        values = st.read()
        _, _, raw2 = raw_read(st.fileno())
        for name, v in values.items():
            want = raw2[name][5]
            assert (v if isinstance(v, list) else [v]) == want


def test_vcpu_stats_count_exits(vm, watchdog):
    vcpu = real_mode(vm, REAL_MODE_HELLO, rax=1, rbx=2)
    with open_stats(vcpu.fileno()) as st:
        assert st.id.endswith("/vcpu-0")
        before = st["exits"]
        with watchdog(vcpu):
            while not isinstance(vcpu.run(), pykvm.Hlt):
                pass
        after = st["exits"]
        # two `out` and one `hlt` reach user space (io_exits stays 0 on hosts that
        # emulate CPL0 code, e.g. PVM, so count all exits)
        assert after >= before + 3
        _, _, raw = raw_read(st.fileno())
        assert raw["exits"][5] == [after]
        assert st.read()["exits"] == after
        hist = [d for d in st.descriptors if d.is_histogram]
        for d in hist:
            v = st[d.name]
            assert isinstance(v, list) and len(v) == d.size
            assert v == raw[d.name][5]
        assert st.read_raw()  # the whole block, as u64 values


def test_fd_is_owned_and_close_on_exec(vm):
    st = open_stats(vm)  # any object with fileno() works too
    fd = st.fileno()
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert not os.get_inheritable(fd)
    assert "Stats 'kvm-" in repr(st)
    st.close()
    assert st.closed
    st.close()  # idempotent
    with pytest.raises(KvmClosedError):
        st.read()
    with pytest.raises(KvmClosedError):
        st.fileno()
    with pytest.raises(OSError):
        os.fstat(fd)  # the fd is really gone


def test_errors(vm, kvm):
    with open_stats(vm.fileno()) as st:
        with pytest.raises(KeyError):
            st["no_such_stat"]
        with pytest.raises(KeyError):
            st.desc("no_such_stat")
    with pytest.raises(KvmError) as ei:
        open_stats(kvm.fileno())  # the system fd has no stats
    assert ei.value.ioctl == "KVM_GET_STATS_FD"


def test_stats_from_a_raw_fd(vm):
    fd = fcntl.ioctl(vm.fileno(), pykvm.uapi.KVM_GET_STATS_FD, 0)
    with Stats(fd) as st:
        assert st.fileno() == fd and st.names
    with pytest.raises(OSError):
        os.close(fd)
