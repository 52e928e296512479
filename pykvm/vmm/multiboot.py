"""Multiboot (v1, spec 0.6.96) kernels: header, image loading, boot information.

:func:`find_header` locates the header in the first 8 KiB of the file.
:func:`load_kernel` places the image in guest RAM, either from the header's
address fields (the "a.out kludge", flag 16, which wins when set, as in GRUB
and QEMU) or from the ``PT_LOAD`` segments of a 32-bit ELF file (at
``p_paddr``), and returns the entry point and the image's extent.  The bss
is never written: guest RAM starts as fresh anonymous memory, which is
already zero, so a kernel with a 3 GiB bss costs no more than a small one
(the loader only checks that the bss lies in RAM and overlaps nothing).  :func:`build_info` lays out the multiboot information structure,
the memory map, command lines and module list the way QEMU does: memory map
at 0x9000, information structure at 0x9500, strings and module list after
them in the same low page (spilling above the image when they do not fit).

All guest writes go through ``ram.write(gpa, data)``, so any object with that
method (a :class:`~pykvm.vm.Vm`) will do; it must read as zero where nothing
was written.  Every offset and length read from the file is checked against
the file's real size before use, and every malformed file raises
:class:`MultibootError` naming the field.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Protocol

from .layout import HIGH_MEMORY, INFO_ADDR, INFO_AREA_END, MMAP_ADDR

__all__ = [
    "BOOTLOADER_MAGIC",
    "HEADER_MAGIC",
    "INFO_ADDR",
    "MMAP_ADDR",
    "Header",
    "Image",
    "MultibootError",
    "Region",
    "build_info",
    "find_header",
    "load_kernel",
]

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH = 8192

# Header flags (bits 0-15 are requirements: refuse what we do not know).
F_PAGE_ALIGN = 1 << 0      # modules page aligned (always true here)
F_MEMORY_INFO = 1 << 1     # mem_* and mmap_* wanted (always given)
F_VIDEO_MODE = 1 << 2      # video mode wanted (not available: warned about)
F_AOUT_KLUDGE = 1 << 16    # header_addr ... entry_addr are valid
_KNOWN_REQUIRED = F_PAGE_ALIGN | F_MEMORY_INFO | F_VIDEO_MODE

# multiboot_info.flags
I_MEMORY, I_BOOTDEV, I_CMDLINE, I_MODS = 1 << 0, 1 << 1, 1 << 2, 1 << 3
I_MMAP, I_LOADER_NAME = 1 << 6, 1 << 9

INFO_SIZE = 116             # through the framebuffer fields, all zero but ours
PAGE = 0x1000

# Memory map types
RAM, RESERVED = 1, 2


class GuestRam(Protocol):
    """Where the loader writes: ``write(gpa, data)`` (a :class:`~pykvm.vm.Vm` will do)."""

    def write(self, gpa: int, data: bytes) -> object: ...


class MultibootError(ValueError):
    """The file is not a multiboot kernel this loader can boot (message says why)."""


class Header:
    """The multiboot header: where it is, its flags, and the a.out-kludge address fields."""

    __slots__ = ("offset", "flags", "header_addr", "load_addr", "load_end_addr",
                 "bss_end_addr", "entry_addr")

    def __init__(self, offset: int, flags: int) -> None:
        self.offset, self.flags = offset, flags      # file offset of the header, its flags
        self.header_addr = self.load_addr = self.load_end_addr = 0
        self.bss_end_addr = self.entry_addr = 0

    @property
    def aout_kludge(self) -> bool:
        return bool(self.flags & F_AOUT_KLUDGE)


class Region:
    """A memory map entry: ``[base, base + length)`` of *type* (1 RAM, 2 reserved)."""

    __slots__ = ("base", "length", "type")

    def __init__(self, base: int, length: int, type: int = RAM) -> None:
        self.base, self.length, self.type = base, length, type

    def __repr__(self) -> str:
        return f"Region({self.base:#x}, {self.length:#x}, {self.type})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Region) and (self.base, self.length, self.type) == (
            other.base, other.length, other.type)


class Image:
    """Where a kernel went: entry point, lowest and highest (exclusive) address,
    the format ("ELF32" or "a.out kludge") and the (paddr, filesz, memsz) of each piece."""

    __slots__ = ("entry", "low", "high", "format", "segments")

    def __init__(self, entry: int, low: int, high: int, format: str,
                 segments: list[tuple[int, int, int]]) -> None:
        self.entry, self.low, self.high, self.format, self.segments = entry, low, high, format, segments

    def __repr__(self) -> str:
        return f"Image(entry={self.entry:#x}, low={self.low:#x}, high={self.high:#x}, format={self.format!r})"


def find_header(data: bytes) -> Header:
    """The multiboot header in the first 8 KiB of *data* (4-byte aligned, checksum ok)."""
    limit = min(len(data), SEARCH) - 12
    for off in range(0, max(limit + 1, 0), 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            break
    else:
        raise MultibootError("no multiboot header (magic 0x1BADB002 with a valid checksum) "
                             "in the first 8 KiB")
    unknown = flags & 0xFFFF & ~_KNOWN_REQUIRED
    if unknown:
        raise MultibootError(f"the kernel requires multiboot features {unknown:#x} "
                             "this loader does not provide")
    h = Header(off, flags)
    if flags & F_AOUT_KLUDGE:
        if off + 32 > len(data):
            raise MultibootError("multiboot header truncated (a.out kludge fields missing)")
        (h.header_addr, h.load_addr, h.load_end_addr, h.bss_end_addr,
         h.entry_addr) = struct.unpack_from("<5I", data, off + 12)
    return h


def _check_ram(ram_regions: Sequence[Region], start: int, end: int, what: str) -> None:
    for r in ram_regions:
        if r.type == RAM and r.base <= start and end <= r.base + r.length:
            return
    raise MultibootError(f"{what} [{start:#x}, {end:#x}) is not inside guest RAM "
                         f"(try a larger --memory)")


def _load_aout(ram: GuestRam, data: bytes, h: Header, ram_regions: Sequence[Region]) -> Image:
    if h.header_addr < h.load_addr:
        raise MultibootError(f"header_addr {h.header_addr:#x} is below load_addr {h.load_addr:#x}")
    file_off = h.offset - (h.header_addr - h.load_addr)
    if file_off < 0:
        raise MultibootError("load_addr puts the image start before the file start")
    if h.load_end_addr:
        if h.load_end_addr < h.load_addr:
            raise MultibootError(f"load_end_addr {h.load_end_addr:#x} < load_addr {h.load_addr:#x}")
        size = h.load_end_addr - h.load_addr
        if file_off + size > len(data):
            raise MultibootError(f"load_end_addr {h.load_end_addr:#x} lies beyond the end of the file")
    else:
        size = len(data) - file_off
    end = h.load_addr + size
    if h.bss_end_addr:
        if h.bss_end_addr < end:
            raise MultibootError(f"bss_end_addr {h.bss_end_addr:#x} < end of the loaded image {end:#x}")
        top = h.bss_end_addr
    else:
        top = end
    _check_ram(ram_regions, h.load_addr, max(top, h.load_addr + 1), "the kernel image")
    if not h.load_addr <= h.entry_addr < max(top, h.load_addr + 1):
        raise MultibootError(f"entry_addr {h.entry_addr:#x} is outside the loaded image")
    ram.write(h.load_addr, data[file_off:file_off + size])
    return Image(h.entry_addr, h.load_addr, top, "a.out kludge",
                 [(h.load_addr, size, top - h.load_addr)])


_EHDR32 = struct.Struct("<16sHHIIIIIHHHHHH")
_PHDR32 = struct.Struct("<8I")


def _load_elf32(ram: GuestRam, data: bytes, ram_regions: Sequence[Region]) -> Image:
    if len(data) < _EHDR32.size or data[:4] != b"\x7fELF":
        raise MultibootError("not an ELF file, and the multiboot header has no address "
                             "fields (flag 16, the a.out kludge)")
    if data[4] == 2:
        raise MultibootError("64-bit ELF: multiboot v1 boots 32-bit ELF images; a 64-bit "
                             "kernel needs the header's address fields (flag 16)")
    if data[4] != 1 or data[5] != 1:
        raise MultibootError("not a little-endian 32-bit ELF file")
    (_, e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum,
     _, _, _) = _EHDR32.unpack_from(data)
    if e_type not in (2, 3) or e_machine not in (3, 6):
        raise MultibootError(f"ELF type {e_type} machine {e_machine}: want an i386 executable")
    if e_phnum == 0 or e_phentsize < _PHDR32.size or e_phoff + e_phnum * e_phentsize > len(data):
        raise MultibootError("ELF program headers missing or truncated")
    segs = []
    entry: int | None = None
    for i in range(e_phnum):
        p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _, _ = _PHDR32.unpack_from(
            data, e_phoff + i * e_phentsize)
        if p_type != 1 or p_memsz == 0:
            continue
        if p_filesz > p_memsz or p_offset + p_filesz > len(data):
            raise MultibootError(f"ELF segment {i} is malformed (file size beyond memory size or file end)")
        _check_ram(ram_regions, p_paddr, p_paddr + p_memsz, f"ELF segment {i}")
        segs.append((p_paddr, p_offset, p_filesz, p_memsz))
        # Higher-half kernels link at p_vaddr != p_paddr: translate e_entry the
        # way GRUB does when it falls inside a segment's virtual range.
        if entry is None and p_vaddr <= e_entry < p_vaddr + p_memsz:
            entry = e_entry - p_vaddr + p_paddr
    if not segs:
        raise MultibootError("the ELF file has no loadable segment")
    # Segments that overlap would need the bss of one written over the data of
    # another: refuse them (no linker makes them), so RAM is never zero-filled.
    ordered = sorted(segs)
    for (a, _, _, am), (b, _, _, _) in zip(ordered, ordered[1:]):
        if b < a + am:
            raise MultibootError(f"ELF segments at {a:#x} and {b:#x} overlap")
    for paddr, off, filesz, memsz in segs:
        ram.write(paddr, data[off:off + filesz])
    if entry is None:
        entry = e_entry
    low = min(s[0] for s in segs)
    high = max(s[0] + s[3] for s in segs)
    return Image(entry, low, high, "ELF32", [(p, f, m) for p, _, f, m in segs])


def load_kernel(ram: GuestRam, data: bytes, ram_regions: Sequence[Region]) -> tuple[Header, Image]:
    """Parse the header and load *data* into guest RAM; return both descriptions."""
    h = find_header(data)
    if h.aout_kludge:
        return h, _load_aout(ram, data, h, ram_regions)
    return h, _load_elf32(ram, data, ram_regions)


def _align(x: int, a: int = PAGE) -> int:
    return (x + a - 1) & ~(a - 1)


def build_info(ram: GuestRam, *, image_end: int, cmdline: str, modules: Sequence[tuple[bytes, str]],
               memory_map: Sequence[Region], ram_regions: Sequence[Region],
               loader_name: str = "pykvm") -> tuple[int, list[tuple[int, int, str]]]:
    """Write modules and the boot information; return (info address, [(start, end, string)]).

    Modules go page aligned after *image_end*, like QEMU.  The memory map and
    the information structure go at :data:`MMAP_ADDR` / :data:`INFO_ADDR`;
    strings and the module list follow them below 0xA000 when they fit,
    else after the last module.
    """
    # Modules (above 1 MiB even when the kernel lives below it)
    placed = []
    addr = max(_align(image_end), HIGH_MEMORY)
    for content, string in modules:
        _check_ram(ram_regions, addr, addr + max(len(content), 1), f"module {string!r}")
        ram.write(addr, content)
        placed.append((addr, addr + len(content), string))
        addr = _align(addr + len(content))
    high = addr

    # Memory map: each entry is size(=20), base u64, length u64, type u32.
    mmap = b"".join(struct.pack("<IQQI", 20, r.base, r.length, r.type) for r in memory_map)
    if MMAP_ADDR + len(mmap) > INFO_ADDR:
        raise MultibootError("memory map too long")

    # Strings and the module list: packed after the info structure.
    blobs: list[bytes] = []
    strings = [cmdline, loader_name] + [s for _, _, s in placed]
    for s in strings:
        # surrogateescape: a non-UTF-8 file name or --append reaches the guest as given
        blobs.append(s.encode("utf-8", "surrogateescape").replace(b"\0", b" ") + b"\0")
    total = sum(_align(len(b), 4) for b in blobs) + 16 * len(placed)
    base = INFO_ADDR + INFO_SIZE
    if base + total > INFO_AREA_END:
        base = high
        _check_ram(ram_regions, base, base + total, "the boot information")
    # module list first (16-byte entries, aligned), then strings
    mods_addr = base
    p = base + 16 * len(placed)
    string_addrs = []
    for b in blobs:
        ram.write(p, b)
        string_addrs.append(p)
        p += _align(len(b), 4)
    mods = b"".join(struct.pack("<IIII", s, e, string_addrs[2 + i], 0)
                    for i, (s, e, _) in enumerate(placed))
    ram.write(mods_addr, mods)
    ram.write(MMAP_ADDR, mmap)

    low_kib, upper_kib = _mem_lower_upper(memory_map)
    info = bytearray(INFO_SIZE)
    struct.pack_into("<IIIIIII", info, 0,
                     I_MEMORY | I_BOOTDEV | I_CMDLINE | I_MODS | I_MMAP | I_LOADER_NAME,
                     low_kib, upper_kib, 0x8000FFFF, string_addrs[0], len(placed), mods_addr)
    struct.pack_into("<II", info, 44, len(mmap), MMAP_ADDR)
    struct.pack_into("<I", info, 64, string_addrs[1])
    ram.write(INFO_ADDR, bytes(info))
    return INFO_ADDR, placed


def _mem_lower_upper(memory_map: Sequence[Region]) -> tuple[int, int]:
    """KiB of RAM from 0 (below 640 KiB), and from 1 MiB up to the first hole."""
    lower = upper = 0
    for r in memory_map:
        if r.type == RAM and r.base == 0:
            lower = min(r.length, 0xA0000) // 1024
        if r.type == RAM and r.base == HIGH_MEMORY:
            upper = r.length // 1024
    return lower, upper
