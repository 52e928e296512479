"""The VMM's parts without KVM: multiboot parsing and layout, devices, the command line."""

from __future__ import annotations

import struct

import pytest

from pykvm import x86
from pykvm.vmm import devices as D
from pykvm.vmm import multiboot as MB
from pykvm.vmm import tables as T
from pykvm.vmm.cli import UsageError, parse_args

pytestmark = pytest.mark.no_kvm_needed

RAM = [MB.Region(0, 64 << 20)]


class FakeRam:
    """Fresh guest RAM (zeros) that records every write as (gpa, length)."""

    def __init__(self, size: int = 64 << 20) -> None:
        self.mem = bytearray(size)
        self.writes = []

    def write(self, gpa: int, data) -> None:
        self.writes.append((gpa, len(data)))
        self.mem[gpa:gpa + len(data)] = data

    def written(self, start: int, end: int) -> bool:
        """Did any write touch [start, end)?"""
        return any(g < end and start < g + n for g, n in self.writes)

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.mem[gpa:gpa + n])

    def u32(self, gpa: int) -> int:
        return struct.unpack_from("<I", self.mem, gpa)[0]

    def cstr(self, gpa: int) -> str:
        return self.mem[gpa:self.mem.index(0, gpa)].decode()


def header(flags: int, *fields: int, pad: int = 0) -> bytes:
    return b"\0" * pad + struct.pack("<III", MB.HEADER_MAGIC, flags,
                                     -(MB.HEADER_MAGIC + flags) & 0xFFFFFFFF) + struct.pack(
        f"<{len(fields)}I", *fields)


def elf32(segments, entry: int) -> bytes:
    """A minimal ELF32 i386 executable; *segments* are (vaddr, paddr, data, memsz)."""
    ph_off, n = 52, len(segments)
    data_off = ph_off + 32 * n
    mb = header(0)
    data_off += len(mb)
    out = bytearray(struct.pack("<16sHHIIIIIHHHHHH", b"\x7fELF\x01\x01\x01" + b"\0" * 9, 2, 3, 1,
                                entry, ph_off, 0, 0, 52, 32, n, 40, 0, 0))
    blobs = b""
    phdrs = b""
    for vaddr, paddr, data, memsz in segments:
        phdrs += struct.pack("<8I", 1, data_off + len(blobs), vaddr, paddr, len(data), memsz, 7, 0x1000)
        blobs += data
    return bytes(out) + phdrs + mb + blobs


# -- header -------------------------------------------------------------------------------------

def test_find_header_alignment_and_checksum():
    h = MB.find_header(header(3, pad=64))
    assert (h.offset, h.flags, h.aout_kludge) == (64, 3, False)
    bad = bytearray(header(3, pad=64))
    bad[72] ^= 1                                         # checksum
    with pytest.raises(MB.MultibootError, match="no multiboot header"):
        MB.find_header(bytes(bad))
    with pytest.raises(MB.MultibootError, match="no multiboot header"):
        MB.find_header(header(0, pad=2))                 # not 4-byte aligned
    with pytest.raises(MB.MultibootError, match="no multiboot header"):
        MB.find_header(header(0, pad=8192))              # beyond the first 8 KiB


def test_unknown_required_flags_are_refused():
    with pytest.raises(MB.MultibootError, match="0x8"):
        MB.find_header(header(1 << 3))
    assert MB.find_header(header(1 << 20)).flags == 1 << 20    # optional bits are fine


# -- a.out kludge -------------------------------------------------------------------------------

def aout_image(load_end_delta: int = 0, bss: int = 0x100, junk: bytes = b"\xaa" * 64) -> bytes:
    load = 0x200000
    body = header(MB.F_AOUT_KLUDGE, load, load, 0, 0, 0)      # fields patched below
    code = b"\x90" * 32
    size = len(body) + len(code)
    img = bytearray(body + code + junk)
    struct.pack_into("<5I", img, 12, load, load, load + size + load_end_delta,
                     load + size + bss, load + 48)
    return bytes(img)


def test_aout_loads_only_to_load_end_and_never_writes_bss():
    ram = FakeRam()
    h, img = MB.load_kernel(ram, aout_image(), RAM)
    size = 32 + 32                                            # header (12 + 5 fields), code
    assert h.aout_kludge and img.entry == 0x200030 and img.low == 0x200000
    assert img.high == 0x200000 + size + 0x100
    assert ram.read(0x200020, 32) == b"\x90" * 32
    assert ram.read(0x200000 + size, 0x100) == bytes(0x100)     # junk not loaded
    assert ram.writes == [(0x200000, size)]                     # fresh RAM: the bss is not written


def test_aout_header_not_at_file_start():
    """header_addr - load_addr says how far into the image the header is."""
    load = 0x300000
    prefix = b"\xf4" * 16                                    # image bytes before the header
    img = bytearray(prefix + header(MB.F_AOUT_KLUDGE, 0, 0, 0, 0, 0))
    struct.pack_into("<5I", img, 16 + 12, load + 16, load, 0, 0, load)
    ram = FakeRam()
    _, im = MB.load_kernel(ram, bytes(img), RAM)
    assert ram.read(load, 16) == prefix and im.high == load + len(img)


@pytest.mark.parametrize("patch,match", [
    ((0x1FFFFF, None, None, None, None), "header_addr"),      # header below load_addr
    ((None, None, 0x100000, None, None), "load_end_addr"),    # load_end < load
    ((None, None, None, 0x200001, None), "bss_end_addr"),     # bss_end < end of image
    ((None, None, None, None, 0x900000), "entry_addr"),       # entry outside
    ((None, 0x7F00000, None, 0, 0x7F00000), "not inside guest RAM"),
])
def test_aout_field_checks(patch, match):
    img = bytearray(aout_image())
    fields = list(struct.unpack_from("<5I", img, 12))
    for i, v in enumerate(patch):
        if v is not None:
            fields[i] = v
    if patch[1] is not None:                                   # keep header_addr >= load_addr
        fields[0] = fields[1]
        fields[2] = 0
    struct.pack_into("<5I", img, 12, *fields)
    with pytest.raises(MB.MultibootError, match=match):
        MB.load_kernel(FakeRam(), bytes(img), RAM)


# -- ELF ----------------------------------------------------------------------------------------

def test_elf32_segments_bss_and_higher_half_entry():
    code, data = b"\xf4" * 64, b"\x11" * 16
    img = elf32([(0xC0100000, 0x100000, code, 64), (0xC0200000, 0x200000, data, 0x1000)],
                entry=0xC0100010)
    ram = FakeRam()
    h, im = MB.load_kernel(ram, img, RAM)
    assert im.entry == 0x100010                  # translated like GRUB does
    assert (im.low, im.high, im.format) == (0x100000, 0x201000, "ELF32")
    assert ram.read(0x100000, 64) == code
    assert ram.read(0x200000, 16) == data
    assert not ram.written(0x200010, 0x201000)   # the bss: fresh RAM is already zero


def test_elf_errors():
    with pytest.raises(MB.MultibootError, match="not an ELF"):
        MB.load_kernel(FakeRam(), header(0) + bytes(64), RAM)
    e64 = bytearray(elf32([(0x100000, 0x100000, b"x", 1)], 0x100000))
    e64[4] = 2
    with pytest.raises(MB.MultibootError, match="64-bit ELF"):
        MB.load_kernel(FakeRam(), bytes(e64), RAM)
    with pytest.raises(MB.MultibootError, match="not inside guest RAM"):
        MB.load_kernel(FakeRam(), elf32([(0x8000000, 0x8000000, b"x", 1)], 0x8000000), RAM)


# -- boot information -----------------------------------------------------------------------------

def test_build_info_layout():
    ram = FakeRam()
    mmap = [MB.Region(0, 0x9FC00), MB.Region(0x9FC00, 0x400, MB.RESERVED),
            MB.Region(0x100000, 63 << 20)]
    addr, placed = MB.build_info(ram, image_end=0x123456, cmdline="k.elf a=1",
                                 modules=[(b"ABC", "m1 x"), (b"D" * 5000, "m2")],
                                 memory_map=mmap, ram_regions=RAM)
    assert addr == MB.INFO_ADDR
    assert placed == [(0x124000, 0x124003, "m1 x"), (0x125000, 0x125000 + 5000, "m2")]
    flags = ram.u32(addr)
    assert flags == 0b1001001111                 # mem, bootdev, cmdline, mods, mmap, loader name
    assert (ram.u32(addr + 4), ram.u32(addr + 8)) == (639, 63 << 10)
    assert ram.cstr(ram.u32(addr + 16)) == "k.elf a=1"
    assert ram.u32(addr + 20) == 2
    mods = ram.u32(addr + 24)
    assert [struct.unpack_from("<III", ram.mem, mods + 16 * i)[:2] for i in range(2)] == \
        [(0x124000, 0x124003), (0x125000, 0x125000 + 5000)]
    assert ram.cstr(ram.u32(mods + 8)) == "m1 x" and ram.cstr(ram.u32(mods + 24)) == "m2"
    assert ram.read(0x124000, 3) == b"ABC"
    length, maddr = ram.u32(addr + 44), ram.u32(addr + 48)
    assert (length, maddr) == (72, MB.MMAP_ADDR)
    entries = [struct.unpack_from("<IQQI", ram.mem, maddr + 24 * i) for i in range(3)]
    assert entries == [(20, 0, 0x9FC00, 1), (20, 0x9FC00, 0x400, 2), (20, 0x100000, 63 << 20, 1)]
    assert ram.cstr(ram.u32(addr + 64)) == "pykvm"
    assert max(ram.u32(addr + 16), ram.u32(mods + 8)) < 0xA000      # strings stay low


def test_modules_stay_above_1mib_for_a_low_kernel():
    ram = FakeRam()
    _, placed = MB.build_info(ram, image_end=0x21000, cmdline="k", modules=[(b"M", "m")],
                              memory_map=[MB.Region(0, 0x9FC00)], ram_regions=RAM)
    assert placed == [(0x100000, 0x100001, "m")]


def test_long_cmdline_spills_above_modules():
    ram = FakeRam()
    cmd = "x" * 10000
    addr, placed = MB.build_info(ram, image_end=0x200000, cmdline=cmd, modules=[],
                                 memory_map=[MB.Region(0, 0x9FC00)], ram_regions=RAM)
    p = ram.u32(addr + 16)
    assert p >= 0x200000 and ram.cstr(p) == cmd


# -- devices ----------------------------------------------------------------------------------------

def test_fw_cfg_items_and_file_directory():
    f = D.FwCfg(cpus=3, ram_size=256 << 20, cmdline=b"k a",
                e820=[(0, 0x9FC00, 1)], files={"opt/x": b"hi"})

    def read(key, n):
        f.select(0x510, key.to_bytes(2, "little"))
        return bytes(f.data(0x511, 1) for _ in range(n))

    assert read(0x00, 4) == b"QEMU"
    assert read(0x01, 4) == b"\x01\0\0\0"
    assert read(0x05, 2) == b"\x03\0"
    assert read(0x03, 8) == struct.pack("<Q", 256 << 20)
    assert read(0x15, 4) == b"k a\0"
    d = read(0x19, 4 + 2 * 64)
    assert struct.unpack(">I", d[:4]) == (2,)
    entries = [struct.unpack(">IHH56s", d[4 + 64 * i:68 + 64 * i]) for i in range(2)]
    names = {e[3].rstrip(b"\0"): (e[0], e[1]) for e in entries}
    assert names[b"etc/e820"][0] == 20 and names[b"opt/x"][0] == 2
    assert read(names[b"opt/x"][1], 4) == b"hi\0\0"      # past the end: zeros
    assert read(0x1234, 2) == b"\0\0"
    f.select(0x510, b"\x05\x00")
    assert f.data(0x511, 2) == 3                          # wider reads: little endian


def test_fw_cfg_hostile_reads_do_not_grow():
    """Reading far past an item's end, and every selector, allocates nothing."""
    f = D.FwCfg(cpus=1, ram_size=1 << 20, cmdline=b"", e820=[])
    f.select(0x510, b"\x00\x00")
    for _ in range(10000):
        f.data(0x511, 4)
    assert f.offset == 4                                  # stops at the item's end
    items = dict(f.items)
    for key in range(0x10000):
        f.select(0x510, key.to_bytes(2, "little"))
        f.data(0x511, 1)
    assert f.items == items


def test_cmos_memory_bytes_and_clock():
    c = D.Cmos(low_ram=512 << 20, high_ram=1 << 30, cpus=4)

    def rd(i):
        c.select(0x70, bytes([i | 0x80]))                 # NMI-mask bit ignored
        return c.read(0x71, 1)

    def wr(i, v):
        c.select(0x70, bytes([i]))
        c.write(0x71, bytes([v]))

    assert rd(0x15) | rd(0x16) << 8 == 640
    assert rd(0x30) | rd(0x31) << 8 == 0xFFFF             # capped
    assert rd(0x34) | rd(0x35) << 8 == (512 - 16) << 4
    assert rd(0x5B) | rd(0x5C) << 8 | rd(0x5D) << 16 == (1 << 30) >> 16
    assert rd(0x5F) == 3
    assert rd(0x0A) & 0x80 == 0 and rd(0x0D) == 0x80
    sec = rd(0)
    assert sec >> 4 <= 5 and sec & 0xF <= 9               # BCD
    wr(0x0B, 0x06)                                        # binary, 24 h
    assert 0 <= rd(0) <= 59 and 0 <= rd(4) <= 23
    wr(0x40, 0x99)
    assert rd(0x40) == 0x99                               # plain NVRAM
    for i in range(256):                                  # every index a guest can write
        wr(i, 0xAA)
    assert len(c.nvram) == D.cmos.NVRAM_SIZE


def bus_with(*devices):
    bus = x86.Bus()
    for d in devices:
        bus.add(d)
    return bus


def test_pci_no_device_and_reset_register():
    resets = []
    bus = bus_with(D.Pci(resets.append))
    bus.outs[0xCF8](0xCF8, (0x80001234).to_bytes(4, "little"))
    assert bus.ins[0xCF8](0xCF8, 4) == 0x80001234
    assert bus.ins[0xCFC](0xCFC, 4) == 0xFFFFFFFF and bus.ins[0xCFE](0xCFE, 2) == 0xFFFF
    bus.outs[0xCF9](0xCF9, b"\x02")
    assert resets == []
    bus.outs[0xCF9](0xCF9, b"\x06")
    assert len(resets) == 1


def test_debug_exit_status():
    got = []
    d = D.DebugExit(lambda status, why: got.append(status))
    for v, size in ((0, 1), (1, 1), (0x10, 1), (0x7F, 1), (0x80, 1), (0xFFFFFFFF, 4)):
        d.write(0xF4, v.to_bytes(size, "little"))
    assert got == [1, 3, 0x21, 0xFF, 1, 0xFF]


def test_misc_debug_console_writes_through():
    out = []
    bus = bus_with(D.Misc(out.append, lambda why: None))
    bus.outs[0xE9](0xE9, b"hi")
    bus.outs[0x3D4](0x3D4, b"\x0e\x07")                   # outw: index + data
    assert out == [b"hi"] and bus.ins[0x3D5](0x3D5, 1) == 0x07


# -- firmware tables --------------------------------------------------------------------------------

def test_mp_table():
    blob = T.mp_table(3, addr=0xF0000)
    fp, cfg = blob[:16], blob[16:]
    assert fp[:4] == b"_MP_" and sum(fp) % 256 == 0
    assert struct.unpack_from("<IBB", fp, 4) == (0xF0010, 1, 4)
    assert cfg[:4] == b"PCMP" and sum(cfg) % 256 == 0
    length, count, lapic = struct.unpack_from("<H", cfg, 4)[0], *struct.unpack_from("<HI", cfg, 34)
    assert length == len(cfg) and lapic == 0xFEE00000
    p, cpus, assigns = 44, [], {}
    for _ in range(count):
        kind = cfg[p]
        if kind == 0:
            cpus.append((cfg[p + 1], cfg[p + 3]))
            p += 20
            continue
        if kind == 3 and cfg[p + 1] == 0:
            assigns[cfg[p + 5]] = cfg[p + 7]            # ISA IRQ -> IOAPIC pin
        p += 8
    assert p == length
    assert cpus == [(0, 3), (1, 1), (2, 1)]              # (APIC id, flags): BSP first
    assert assigns[0] == 2 and assigns[4] == 4 and 2 not in assigns


def test_acpi_madt():
    blob = T.acpi_tables(2, addr=0xF8000)
    rsdp = blob[:20]
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp) % 256 == 0
    rsdt_addr = struct.unpack_from("<I", rsdp, 16)[0]
    rsdt = blob[rsdt_addr - 0xF8000:][:40]
    assert rsdt[:4] == b"RSDT" and sum(rsdt) % 256 == 0
    madt_off = struct.unpack_from("<I", rsdt, 36)[0] - 0xF8000
    length = struct.unpack_from("<I", blob, madt_off + 4)[0]
    madt = blob[madt_off:madt_off + length]
    assert madt[:4] == b"APIC" and sum(madt) % 256 == 0 and len(madt) == length
    p, kinds = 44, []
    while p < length:
        kinds.append(madt[p])
        if madt[p] == 2:
            assert struct.unpack_from("<BBI", madt, p + 2) == (0, 0, 2)   # IRQ 0 -> GSI 2
        p += madt[p + 1]
    assert kinds == [0, 0, 1, 2, 4]


def test_tables_fit_for_255_cpus():
    assert T.MP_ADDR + len(T.mp_table(255)) <= T.RSDP_ADDR
    assert T.RSDP_ADDR + len(T.acpi_tables(255)) <= 0x100000


# -- command line -----------------------------------------------------------------------------------

def test_parse_args():
    o = parse_args(["k.elf", "--smp", "4", "--memory", "1G", "--append", "a b",
                    "--module", "m1 args", "m2", "--module=m3", "--timeout", "2.5"])
    assert o == {"kernel": "k.elf", "smp": 4, "memory_mib": 1024, "append": "a b",
                 "modules": ["m1 args", "m2", "m3"], "timeout": 2.5, "gdb": None}
    assert parse_args(["--smp=2", "k"])["smp"] == 2
    assert parse_args(["k", "-m", "512M"])["memory_mib"] == 512
    for bad in (["--smp", "x", "k"], [], ["k", "--bogus"], ["k", "j"], ["k", "--timeout", "0"],
                ["k", "--memory", "1.5"], ["k", "--append"]):
        with pytest.raises(UsageError):
            parse_args(bad)
