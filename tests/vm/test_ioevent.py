"""ioeventfd (PIO and MMIO, with and without datamatch) and coalesced MMIO/PIO zones.

The proof each time: the guest's write signals the eventfd (or lands in the
coalesced ring) *without* an exit — the first exit the host sees is the
guest's later ``out 0xe9`` — while a write that does not match exits as usual.
"""

from __future__ import annotations

import errno

import pytest

import pykvm
from pykvm import Cap
from pykvm.coalesced import COALESCED_MMIO_MAX
from pykvm.eventfd import EventFd
from tests.support.guests import HLT, OUT_E9, RAM, long_mode, real_mode
from tests.support.runs import run_to_exit
from tests.vm.support_irqguest import es_segment, es_write_byte, es_write_word, mmio_write64, pio_write

PORT = 0x700
MMIO = RAM            # 0x200000: mapped by long_mode's page tables, no memory behind it
VALUES = {1: 0x5A, 2: 0xBEEF, 4: 0x12345678, 8: 0x1122334455667788}


def _mask(width: int) -> int:
    return (1 << (8 * width)) - 1


@pytest.mark.parametrize("width", [1, 2, 4])
def test_pio_ioeventfd_with_datamatch(vm, watchdog, width):
    value = VALUES[width]
    code = pio_write(PORT, value, width) + pio_write(PORT, value ^ 1, width) + OUT_E9 + HLT
    vcpu = real_mode(vm, code)
    with EventFd() as efd:
        vm.register_ioevent(efd, PORT, length=width, datamatch=value, pio=True)
        # The matching write signals the eventfd inside KVM; the other one exits.
        e = run_to_exit(vcpu)
        assert e == pykvm.IoOut(PORT, width, 1, (value ^ 1).to_bytes(width, "little"))
        assert efd.read() == 1
        assert run_to_exit(vcpu).port == 0xE9


@pytest.mark.parametrize("length", [0, 2])
def test_pio_ioeventfd_without_datamatch(vm, watchdog, length):
    # length 0 matches a write of any width; length 2 only 16-bit writes.
    code = pio_write(PORT, 1, 2) + pio_write(PORT, 2, 2) + pio_write(PORT, 3, 1) + OUT_E9 + HLT
    vcpu = real_mode(vm, code)
    with EventFd() as efd:
        vm.register_ioevent(efd, PORT, length=length, pio=True)
        if length == 0:
            assert run_to_exit(vcpu).port == 0xE9
            assert efd.read() == 3
        else:
            assert run_to_exit(vcpu) == pykvm.IoOut(PORT, 1, 1, b"\x03")
            assert efd.read() == 2


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_mmio_ioeventfd_with_datamatch(vm, watchdog, width):
    value = VALUES[width]
    addr = MMIO + 0x100
    code = mmio_write64(addr, value, width) + mmio_write64(addr, value ^ 1, width) + OUT_E9 + HLT
    vcpu = long_mode(vm, code)
    with EventFd() as efd:
        vm.register_ioevent(efd, addr, length=width, datamatch=value)
        e = run_to_exit(vcpu)
        assert e == pykvm.MmioWrite(addr, (value ^ 1).to_bytes(width, "little"))
        assert efd.read() == 1


def test_mmio_ioeventfd_without_datamatch_and_unregister(vm, watchdog):
    assert vm.check_extension(Cap.IOEVENTFD_ANY_LENGTH)
    addr = MMIO + 0x200
    code = (mmio_write64(addr, 7, 4) + mmio_write64(addr, 8, 8) + OUT_E9
            + mmio_write64(addr, 9, 4) + OUT_E9 + HLT)
    vcpu = long_mode(vm, code)
    with EventFd() as efd:
        vm.register_ioevent(efd, addr)                       # length 0: any width, any value
        assert run_to_exit(vcpu).port == 0xE9
        assert efd.read() == 2
        vm.unregister_ioevent(efd, addr)
        assert run_to_exit(vcpu) == pykvm.MmioWrite(addr, (9).to_bytes(4, "little"))
        assert efd.read() == 0


def test_ioeventfd_unregister_pio_with_datamatch(vm, watchdog):
    code = pio_write(PORT, 0x42, 1) + OUT_E9 + pio_write(PORT, 0x42, 1) + HLT
    vcpu = real_mode(vm, code)
    with EventFd() as efd:
        vm.register_ioevent(efd, PORT, length=1, datamatch=0x42, pio=True)
        assert run_to_exit(vcpu).port == 0xE9
        vm.unregister_ioevent(efd, PORT, length=1, datamatch=0x42, pio=True)
        assert run_to_exit(vcpu) == pykvm.IoOut(PORT, 1, 1, b"\x42")
        assert efd.read() == 1
        with pytest.raises(pykvm.KvmError) as ei:            # nothing left to remove
            vm.unregister_ioevent(efd, PORT, length=1, datamatch=0x42, pio=True)
        assert ei.value.ioctl == "KVM_IOEVENTFD" and ei.value.errno == errno.ENOENT


def test_ioeventfd_bad_input(vm):
    with EventFd() as efd:
        with pytest.raises(ValueError):
            vm.register_ioevent(efd, PORT, length=3, pio=True)
        with pytest.raises(ValueError):
            vm.register_ioevent(efd, PORT, length=8, pio=True)
        with pytest.raises(ValueError):
            vm.register_ioevent(efd, PORT, length=1, datamatch=0x100, pio=True)
        with pytest.raises(ValueError):
            vm.register_ioevent(efd, MMIO, datamatch=1)      # datamatch needs a width
        with pytest.raises(ValueError):
            vm.register_ioevent(efd, 0x10000, length=1, pio=True)
        vm.register_ioevent(efd, PORT, length=1, datamatch=1, pio=True)
        with pytest.raises(pykvm.KvmError) as ei:
            vm.register_ioevent(efd, PORT, length=1, datamatch=1, pio=True)
        assert ei.value.errno == errno.EEXIST and ei.value.ioctl == "KVM_IOEVENTFD"


# --- coalesced MMIO / PIO ---------------------------------------------------------------
def test_coalesced_mmio_and_pio_land_in_the_ring(vm, watchdog):
    assert vm.check_extension(Cap.COALESCED_MMIO) == pykvm.uapi.KVM_COALESCED_MMIO_PAGE_OFFSET
    assert vm.check_extension(Cap.COALESCED_PIO)
    code = (pio_write(PORT, 0xA1, 1) + pio_write(PORT + 1, 0xB2C3, 2)
            + es_segment(0x2000)                                     # es:0 = guest 0x20000
            + es_write_byte(0x10, 0x55) + es_write_word(0x20, 0x6677)
            + OUT_E9 + HLT)
    vcpu = real_mode(vm, code)
    vm.register_coalesced_pio(PORT, 3)                     # an access must lie wholly inside
    vm.register_coalesced_mmio(0x20000, 0x1000)
    assert run_to_exit(vcpu).port == 0xE9        # four writes, no exit
    ring = vm.coalesced_ring()
    assert len(ring) == 4
    got = [(e.phys_addr, e.len, e.pio, bytes(e.data[:e.len])) for e in ring.drain()]
    assert got == [(PORT, 1, 1, b"\xa1"), (PORT + 1, 2, 1, b"\xc3\xb2"),
                   (0x20010, 1, 0, b"\x55"), (0x20020, 2, 0, b"\x77\x66")]
    assert len(ring) == 0 and ring.drain() == []
    assert COALESCED_MMIO_MAX == 170 or pykvm.memory.PAGE_SIZE != 4096


def test_unregistered_coalesced_zones_exit_again(vm, watchdog):
    code = (pio_write(PORT, 0xA1, 1) + es_segment(0x2000) + es_write_byte(0x10, 0x55)
            + OUT_E9 + HLT)
    vcpu = real_mode(vm, code)
    vm.register_coalesced_pio(PORT, 1)
    vm.register_coalesced_mmio(0x20000, 0x1000)
    vm.unregister_coalesced_pio(PORT, 1)
    vm.unregister_coalesced_mmio(0x20000, 0x1000)
    assert run_to_exit(vcpu) == pykvm.IoOut(PORT, 1, 1, b"\xa1")
    assert run_to_exit(vcpu) == pykvm.MmioWrite(0x20010, b"\x55")
    assert vm.coalesced_ring(vcpu).drain() == []


def test_coalesced_bad_input(vm):
    with pytest.raises(ValueError):
        vm.register_coalesced_mmio(0x20000, 0)
    with pytest.raises(ValueError):
        vm.register_coalesced_pio(0x10000, 1)
    with pytest.raises(ValueError):
        vm.coalesced_ring()                                    # no vCPU to map it through
    vm.unregister_coalesced_mmio(0x30000, 0x1000)              # no such zone: KVM accepts it
