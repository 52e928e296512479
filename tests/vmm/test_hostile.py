"""Hostile inputs to the VMM: guests that try to make it grow, files that try to
make it read, allocate or crash, and arguments that try to confuse it.

Each attack runs the real ``python -m pykvm.vmm`` on /dev/kvm (or the loader in
process) and checks the documented outcome: a bounded device, one line and
status 2, or a normal boot.  Peak memory is read from the child's rusage.
"""

from __future__ import annotations

import math
import os
import resource
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.vmm import multiboot as MB
from pykvm.vmm import status as S
from pykvm.vmm.cli import UsageError, parse_args
from pykvm.vmm.errors import MachineError
from pykvm.vmm.files import STREAM_CAP, read_image

from .conftest import PROCESS_TIMEOUT, VMM_TIMEOUT
from .test_units import FakeRam, elf32

EXIT_0 = bytes([0x31, 0xC0, 0xE6, 0xF4, 0xF4])            # xor eax, eax; out 0xf4, al; hlt


def vmm_raw(args, input=b""):
    """``python -m pykvm.vmm *args`` with bytes arguments; (status, out, err, peak RSS KiB)."""
    cmd = [os.fsencode(sys.executable), b"-m", b"pykvm.vmm", *[os.fsencode(a) if isinstance(a, str)
                                                              else a for a in args]]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(input, timeout=PROCESS_TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    # the child has been reaped by communicate(): its rusage is in RUSAGE_CHILDREN's maximum
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return p.returncode, out, err, peak


# -- guests ------------------------------------------------------------------------------------

def attack(kernels, name, vmm):
    r = vmm(kernels["flood"], "--append", name)
    assert r.status == 1, r
    return r


def test_loopback_flood_stops_at_the_16_byte_fifo(kernels, vmm):
    r = attack(kernels, "loopback", vmm)
    # 5000 bytes written in loopback: 16 kept, the rest overran (LSR: DR | OE | THRE | TEMT)
    assert r.lines == ["loopback: drained 16 lsr 00000063"], r


@pytest.mark.parametrize("name", ["mmio", "ports"])
def test_unhandled_accesses_are_logged_a_bounded_number_of_times(kernels, vmm, name):
    r = attack(kernels, name, vmm)
    assert r.lines == [f"{name}: 2000 reads"], r
    err = r.err.splitlines()
    assert len(err) == 65 and err[-1] == "pykvm vmm: too many unhandled addresses: not logging more", r


def test_fw_cfg_selections_and_reads_past_the_end(kernels, vmm):
    r = attack(kernels, "fwcfg", vmm)
    assert r.lines == ["fwcfg: QEMU"], r


def test_cmos_index_wraps_at_128(kernels, vmm):
    r = attack(kernels, "cmos", vmm)
    # index 0xc0 (0x40 with the NMI-mask bit) and 0x40 are one byte
    assert r.lines == ["cmos: 0x40 = 0000005a"], r


def test_debug_console_is_written_through(kernels, vmm):
    r = attack(kernels, "debugcon", vmm)
    assert r.out == "." * 4096 + "debugcon: 4096 bytes\n", r


# -- kernel and module files -----------------------------------------------------------------------

def one_line_load_error(status, err, *words):
    text = err.decode("utf-8", "replace")
    assert status == S.LOAD_ERROR, (status, text)
    assert text.count("\n") == 1 and text.startswith("pykvm vmm: "), text
    for w in words:
        assert w in text, text


def test_dev_zero_as_kernel_and_module(kernels):
    status, _, err, _ = vmm_raw(["/dev/zero"])
    one_line_load_error(status, err, "stream holds more than")
    status, _, err, _ = vmm_raw([kernels["tiny"], "--module", "/dev/zero"])
    one_line_load_error(status, err, "module", "stream holds more than")


def test_endless_fifo_is_cut_off(tmp_path):
    """A FIFO whose writer never stops: read up to the cap, then the load error."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"exec cat /dev/zero > {fifo}"])
    try:
        status, _, err, _ = vmm_raw([str(fifo), "--memory", "8"])
    finally:
        writer.kill()
        writer.wait()
    one_line_load_error(status, err, "stream holds more than the 8.0 MiB")


def test_huge_sparse_file_is_refused_before_reading(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(64 << 30)                        # 64 GiB, no disk blocks
    status, _, err, peak = vmm_raw([str(big), "--memory", "16"])
    one_line_load_error(status, err, "is 65536.0 MiB: larger than the 16.0 MiB")
    status, _, err, _ = vmm_raw(["/dev/null", "--module", str(big), "--memory", "16"])
    one_line_load_error(status, err)


def test_directory_and_missing_file(tmp_path):
    status, _, err, _ = vmm_raw([str(tmp_path)])
    one_line_load_error(status, err, "is a directory")
    status, _, err, _ = vmm_raw([str(tmp_path / "nope")])
    one_line_load_error(status, err, "cannot read kernel")


def test_huge_bss_is_never_committed(tmp_path):
    """A 4 KiB ELF whose segment has a 3 GiB bss: the kernel reads the last dword
    of its bss (must be zero: debug exit 0, status 1) and the VMM's peak memory
    stays far below the 3 GiB that zero-filling would commit."""
    bss = 3 << 30
    last = 0x100000 + bss - 4
    code = b"\xa1" + struct.pack("<I", last) + b"\xe6\xf4\xf4"    # mov eax,[last]; out 0xf4,al; hlt
    k = tmp_path / "bss.elf"
    k.write_bytes(elf32([(0x100000, 0x100000, code, bss)], entry=0x100000))
    status, out, err, peak_kib = vmm_raw([str(k), "--memory", "3500", "--timeout", str(VMM_TIMEOUT)])
    assert status == 1, err
    assert peak_kib < 512 << 10, peak_kib           # far below 3 GiB


def test_aout_kernel_with_huge_bss(tmp_path):
    flags = 1 << 16
    load = 0x100000
    code = EXIT_0
    hdr = struct.pack("<8I", 0x1BADB002, flags, -(0x1BADB002 + flags) & 0xFFFFFFFF,
                      load, load, load + 32 + len(code), load + (3 << 30), load + 32)
    k = tmp_path / "bss.bin"
    k.write_bytes(hdr + code)
    status, _, err, peak_kib = vmm_raw([str(k), "--memory", "3500", "--timeout", str(VMM_TIMEOUT)])
    assert status == 1, err
    assert peak_kib < 512 << 10, peak_kib


def test_overlapping_segments_are_refused():
    img = elf32([(0x100000, 0x100000, b"\x90" * 16, 0x2000), (0x101000, 0x101000, b"\xf4", 1)],
                entry=0x100000)
    with pytest.raises(MB.MultibootError, match="overlap"):
        MB.load_kernel(FakeRam(), img, [MB.Region(0, 64 << 20)])


class BoundedRam:
    """Guest RAM that only checks writes: every write must lie in the regions."""

    def __init__(self, regions):
        self.regions = regions

    def write(self, gpa, data):
        end = gpa + len(data)
        assert any(r.base <= gpa and end <= r.base + r.length for r in self.regions), hex(gpa)


VALID = elf32([(0xC0100000, 0x100000, b"\xf4" * 64, 64), (0xC0200000, 0x200000, b"\x11" * 16, 0x1000)],
              entry=0xC0100010)
AOUT = struct.pack("<8I", 0x1BADB002, 1 << 16, -(0x1BADB002 + (1 << 16)) & 0xFFFFFFFF,
                   0x100000, 0x100000, 0x100028, 0x101000, 0x100020) + EXIT_0 * 2


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(base=st.sampled_from([VALID, AOUT]),
       edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 0xFFFFFFFF)), max_size=6),
       cut=st.integers(0, 400))
def test_mutated_kernels_end_in_the_load_error(base, edits, cut):
    """Header fields overwritten with any 32-bit values, files truncated anywhere:
    loading either succeeds inside RAM or raises MultibootError, nothing else."""
    data = bytearray(base)
    for off, value in edits:
        if off + 4 <= len(data):
            struct.pack_into("<I", data, off, value)
    data = bytes(data[:max(cut, 1)] if cut < len(data) else data)
    regions = [MB.Region(0, 64 << 20)]
    try:
        MB.load_kernel(BoundedRam(regions), data, regions)
    except MB.MultibootError:
        pass


def test_read_image_caps(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    assert read_image(str(f), "kernel", 100) == b"x" * 100
    with pytest.raises(MachineError, match="larger than"):
        read_image(str(f), "kernel", 99)
    r, w = os.pipe()
    os.write(w, b"y" * 50)
    os.close(w)
    try:
        with pytest.raises(MachineError, match="stream holds more than"):
            read_image(f"/proc/self/fd/{r}", "module", 49)
    finally:
        os.close(r)
    assert STREAM_CAP == 64 << 20


# -- arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["--smp", "--memory", "--timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "1e400", "", "0x10", "1e-400"])
def test_bad_numbers_are_usage_errors(option, value):
    if option == "--smp" and value == "0x10":
        pass                                        # not decimal: refused like the others
    with pytest.raises(UsageError):
        parse_args(["k", option, value])


def test_numbers_that_work():
    assert parse_args(["k", "--timeout", "1e-3"])["timeout"] == 1e-3
    assert parse_args(["k", "--memory", "0.5G"])["memory_mib"] == 512
    assert parse_args(["k", "--smp", "cpus=3,sockets=1"])["smp"] == 3
    with pytest.raises(UsageError):
        parse_args(["k", "--timeout", "1e12"])      # beyond threading.TIMEOUT_MAX
    assert not math.isnan(parse_args(["k"])["memory_mib"])


def test_bad_number_is_one_line(kernels):
    status, out, err, _ = vmm_raw([kernels["tiny"], "--memory", "nan"])
    assert (status, out) == (S.LOAD_ERROR, b""), err
    assert err == b"pykvm vmm: --memory 'nan': want a whole, positive number of MiB (see --help)\n"


def test_non_utf8_kernel_name_and_append_reach_the_guest(kernels, tmp_path):
    name = os.fsencode(str(tmp_path)) + b"/k\xff\xfe.elf"
    with open(kernels["hello"], "rb") as src, open(name, "wb") as dst:
        dst.write(src.read())
    status, out, err, _ = vmm_raw([name, "--append", b"exit=5 \xe9t\xe9"])
    assert status == 11, err
    assert b"cmdline: " + name + b" exit=5 \xe9t\xe9\n" in out, out


def test_tiny_timeout_works(kernels):
    status, out, err, _ = vmm_raw([kernels["timer"], "--append", "spin", "--timeout", "1e-6"])
    assert status == S.TIMEOUT, err
    assert b"timeout: no exit after" in err
