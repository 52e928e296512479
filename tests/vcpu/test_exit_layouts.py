"""The one kvm_run exit layout table, the one answer encoder, and a typed exit for every
exit reason x86 KVM reports.

Exits this host never produces (Hyper-V, Xen, TDX, SNP, SET_TPR, NMI, AP reset hold)
are decoded from a run page filled as KVM fills it (field by field from the kernel
header's layout, Linux 7.3); the answers are read back from the page where KVM reads them.
"""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

import pykvm
from pykvm.uapi import structs as S
from pykvm.vcpu import exits

# Offsets of union members in Linux 7.3's struct kvm_run, as gcc lays them out (offsetof).
KERNEL_OFFSETS = {
    "io.port": 34, "io.data_offset": 40, "mmio.data": 40, "mmio.len": 48, "mmio.is_write": 52,
    "hypercall.ret": 88, "hypercall.flags": 96, "msr.reason": 40, "msr.index": 44, "msr.data": 48,
    "hyperv.u.hcall.result": 48, "xen.u.hcall.result": 56, "xen.u.hcall.params": 64,
    "memory_fault.gpa": 40, "tdx.nr": 40, "tdx.ret": 48, "snp_req_certs.npages": 40,
    "snp_req_certs.ret": 48,
}

# Every exit reason x86 KVM can report (include/uapi/linux/kvm.h, Linux 7.3).
X86_REASONS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 17, 24, 26, 27, 29, 30, 31, 32, 33, 34,
               37, 39, 40, 43]


def _page(reason: int, member: str, *values: object) -> bytearray:
    page = bytearray(4096)
    struct.pack_into("<I", page, 8, reason)
    layout = exits.LAYOUTS[member]
    layout.format.pack_into(page, layout.offset, *values)
    return page


def test_layout_offsets_are_the_kernels():
    got = {
        "io.port": exits._field("io", "port"), "io.data_offset": exits._field("io", "data_offset"),
        "mmio.data": exits.MMIO_DATA_OFFSET, "mmio.len": exits._field("mmio", "len"),
        "mmio.is_write": exits._field("mmio", "is_write"), "hypercall.ret": exits._HCALL_RET,
        "hypercall.flags": exits._field("hypercall", "flags"),
        "msr.reason": exits._field("msr", "reason"), "msr.index": exits._field("msr", "index"),
        "msr.data": exits._MSR_DATA, "hyperv.u.hcall.result": exits._HV_RESULT,
        "xen.u.hcall.result": exits._XEN_RESULT, "xen.u.hcall.params": exits._field("xen.hcall", "params[6]"),
        "memory_fault.gpa": exits._field("memory_fault", "gpa"), "tdx.nr": exits._field("tdx", "nr"),
        "tdx.ret": exits._TDX_RET, "snp_req_certs.npages": exits._SNP_NPAGES,
        "snp_req_certs.ret": exits._SNP_RET,
    }
    assert got == KERNEL_OFFSETS
    for layout in exits.LAYOUTS.values():  # every member fits in the 256-byte union
        assert layout.offset + layout.format.size <= exits.EXIT_UNION_OFFSET + exits.EXIT_UNION_SIZE


def test_layouts_agree_with_the_ctypes_kvm_run():
    """Where pykvm.uapi has the member, ctypes (the compiler-checked twin) gives the same offsets."""
    run = S.kvm_run
    assert run.io.offset == exits.IO_LAYOUT.offset == exits.EXIT_UNION_OFFSET
    assert ctypes.sizeof(S.kvm_run().io) == exits.IO_LAYOUT.format.size
    assert S.kvm_run.mmio.offset + S.kvm_run().mmio.__class__.data.offset == exits.MMIO_DATA_OFFSET
    assert ctypes.sizeof(S.kvm_run().memory_fault) == exits.LAYOUTS["memory_fault"].format.size
    assert ctypes.sizeof(S.kvm_hyperv_exit) >= exits.LAYOUTS["hyperv.syndbg"].format.size + 8


def test_every_x86_exit_reason_has_a_typed_exit():
    for reason in X86_REASONS:
        page = bytearray(4096)
        struct.pack_into("<I", page, 8, reason)
        e = exits.decode(page)
        assert not isinstance(e, exits.Unknown), reason
        assert int(e.reason) == reason
    for reason in (*exits.NON_X86_REASONS, 44, 63, 64, 1000):
        page = bytearray(4096)
        struct.pack_into("<I", page, 8, reason)
        assert isinstance(exits.decode(page), exits.Unknown)


def test_hyperv_exits_decode_and_answer():
    page = _page(27, "hyperv", 1, 0)
    exits.LAYOUTS["hyperv.synic"].format.pack_into(page, exits.LAYOUTS["hyperv.synic"].offset,
                                                    0x40000080, 0, 1, 0x5000, 0x6000)
    assert exits.decode(page) == exits.HypervSynic(0x40000080, 1, 0x5000, 0x6000)
    page = _page(27, "hyperv", 2, 0)
    exits.LAYOUTS["hyperv.hcall"].format.pack_into(page, exits.LAYOUTS["hyperv.hcall"].offset,
                                                    0x5C, 0, 7, 8)
    e = exits.decode(page)
    assert (type(e), e.input, e.params) == (exits.HypervHcall, 0x5C, (7, 8))
    e.set_result(0x1234)
    assert struct.unpack_from("<Q", page, KERNEL_OFFSETS["hyperv.u.hcall.result"])[0] == 0x1234
    page = _page(27, "hyperv", 3, 0)
    exits.LAYOUTS["hyperv.syndbg"].format.pack_into(page, exits.LAYOUTS["hyperv.syndbg"].offset,
                                                     0x400000F1, 0, 2, 3, 4, 5, 6)
    assert exits.decode(page) == exits.HypervSyndbg(0x400000F1, 2, 3, 4, 5, 6)
    assert type(exits.decode(_page(27, "hyperv", 9, 0))) is exits.Hyperv


def test_xen_hcall_decodes_and_answers():
    page = _page(34, "xen", 1)
    exits.LAYOUTS["xen.hcall"].format.pack_into(page, exits.LAYOUTS["xen.hcall"].offset,
                                                 1, 0, 24, 0, 1, 2, 3, 4, 5, 6)
    e = exits.decode(page)
    assert (type(e), e.longmode, e.cpl, e.input, e.params) == (exits.XenHcall, 1, 0, 24, (1, 2, 3, 4, 5, 6))
    e.set_result(-38)  # -ENOSYS, as the guest sees it
    assert struct.unpack_from("<q", page, KERNEL_OFFSETS["xen.u.hcall.result"])[0] == -38
    assert type(exits.decode(_page(34, "xen", 7))) is exits.Xen


def test_tdx_exit_decodes_and_answers():
    page = _page(40, "tdx", 0, 0x10002, 1, 0x8000, 0x1000, 0, 0, 0)
    e = exits.decode(page)
    assert (type(e), e.nr, e.ret, e.args) == (exits.Tdx, 0x10002, 1, (0x8000, 0x1000, 0, 0, 0))
    e.set_ret(0)
    e.set_outputs(1, 2)
    assert struct.unpack_from("<Q", page, KERNEL_OFFSETS["tdx.ret"])[0] == 0
    assert struct.unpack_from("<QQ", page, KERNEL_OFFSETS["tdx.ret"] + 16) == (1, 2)
    with pytest.raises(ValueError):
        e.set_outputs(1, 2, 3, 4, 5)


def test_snp_certificate_request_write_back():
    page = _page(43, "snp_req_certs", 0x9000, 4, 0)
    e = exits.decode(page)
    assert (type(e), e.gpa, e.npages) == (exits.SnpReqCerts, 0x9000, 4)
    assert int(e.reason) == 43
    e.set_ret(errno.ENOSPC, npages=9)  # the table needs 9 pages: the guest retries
    assert struct.unpack_from("<QQ", page, KERNEL_OFFSETS["snp_req_certs.npages"]) == (9, errno.ENOSPC)
    e.set_ret(0)
    assert struct.unpack_from("<Q", page, KERNEL_OFFSETS["snp_req_certs.ret"])[0] == 0
    for bad in ((errno.EINVAL,), (errno.ENOSPC,), (0, 3)):
        with pytest.raises(ValueError):
            e.set_ret(*bad)


def test_answer_encoder_raises_instead_of_truncating():
    buf = bytearray(16)
    exits.write_answer(buf, 4, 2, 0xBEEF, "test")
    exits.write_answer(buf, 8, 1, -1, "test")  # -1: all ones
    assert buf[4:6] == b"\xef\xbe" and buf[8] == 0xFF
    with pytest.raises(ValueError):
        exits.write_answer(buf, 0, 1, 0x100, "port 0x60 value")
    with pytest.raises(ValueError):
        exits.write_answer(buf, 0, 2, b"\x01", "port 0x60 value")
    with pytest.raises(TypeError):
        exits.write_answer(buf, 0, 2, True, "port 0x60 value")  # type: ignore[arg-type]


def test_old_import_path_is_the_same_module():
    import pykvm.exits as old

    assert old is exits and pykvm.IoOut is exits.IoOut
