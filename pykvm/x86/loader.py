"""Loading guest images: flat binaries and ELF64 executables.

:func:`load_flat` copies bytes to a guest physical address.
:func:`load_elf64` parses an x86-64 ELF executable (``ET_EXEC`` or a
position-dependent ``ET_DYN``), copies each ``PT_LOAD`` segment to its
physical address (``p_paddr``), zeroes the rest of its ``p_memsz`` (the
``.bss``), and returns the entry point and the symbol table.

Only the headers needed for loading are read (ELF-64 Object File Format,
version 1.5): no relocation is done, so link the image at the addresses it
runs at.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from .paging import as_phys

__all__ = ["ElfError", "ElfImage", "ElfSegment", "load_elf64", "load_flat", "parse_elf64"]

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")

PT_LOAD = 1
SHT_SYMTAB = 2
EM_X86_64 = 62


class ElfError(ValueError):
    """The bytes are not an ELF64 x86-64 image this loader understands."""


@dataclass
class ElfSegment:
    """One ``PT_LOAD`` segment."""

    paddr: int
    vaddr: int
    data: bytes     #: the file part (``p_filesz`` bytes)
    memsz: int      #: size in memory; bytes past ``len(data)`` are zero
    flags: int      #: ``PF_X`` 1, ``PF_W`` 2, ``PF_R`` 4


@dataclass
class ElfImage:
    """A parsed ELF64 executable."""

    entry: int
    segments: list[ElfSegment]
    symbols: dict[str, int] = field(default_factory=dict)

    @property
    def low(self) -> int:
        """Lowest physical address loaded."""
        return min(s.paddr for s in self.segments)

    @property
    def high(self) -> int:
        """One past the highest physical address loaded (including .bss)."""
        return max(s.paddr + s.memsz for s in self.segments)

    def flat(self) -> bytes:
        """The image as one flat binary from :attr:`low` to :attr:`high` (gaps and .bss zeroed)."""
        out = bytearray(self.high - self.low)
        for s in self.segments:
            off = s.paddr - self.low
            out[off:off + len(s.data)] = s.data
        return bytes(out)


def parse_elf64(image: bytes) -> ElfImage:
    """Parse ELF64 x86-64 *image* (bytes): segments, entry point, symbols."""
    if len(image) < _EHDR.size or image[:4] != b"\x7fELF":
        raise ElfError("not an ELF file")
    (ident, e_type, machine, _ver, entry, phoff, shoff, _flags, _ehsize, phentsize, phnum,
     shentsize, shnum, _shstrndx) = _EHDR.unpack_from(image)
    if ident[4] != 2 or ident[5] != 1:
        raise ElfError("not a little-endian ELF64 file")
    if machine != EM_X86_64:
        raise ElfError(f"e_machine {machine} is not x86-64 ({EM_X86_64})")
    if e_type not in (2, 3):
        raise ElfError(f"e_type {e_type} is not an executable (ET_EXEC=2 or ET_DYN=3)")
    segments = []
    for i in range(phnum):
        p_type, p_flags, off, vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(image, phoff + i * phentsize)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or off + filesz > len(image):
            raise ElfError(f"segment {i} is truncated or inconsistent")
        segments.append(ElfSegment(paddr, vaddr, bytes(image[off:off + filesz]), memsz, p_flags))
    if not segments:
        raise ElfError("no PT_LOAD segment")
    symbols: dict[str, int] = {}
    if shoff and shnum:
        sections = [_SHDR.unpack_from(image, shoff + i * shentsize) for i in range(shnum)]
        for sh in sections:
            if sh[1] != SHT_SYMTAB:
                continue
            strtab = sections[sh[6]]
            str_off, str_size = strtab[4], strtab[5]
            strings = image[str_off:str_off + str_size]
            for k in range(sh[5] // _SYM.size):
                name_off, info, _other, shndx, value, _size = _SYM.unpack_from(image, sh[4] + k * _SYM.size)
                if not name_off or shndx == 0:
                    continue
                if info & 0xF in (3, 4):  # STT_SECTION, STT_FILE
                    continue
                end = strings.index(b"\0", name_off)
                symbols.setdefault(strings[name_off:end].decode(), value)
    return ElfImage(entry, segments, symbols)


def load_flat(target, gpa: int, data) -> int:
    """Copy the flat binary *data* to guest physical *gpa*; return the address after it.

    *target* is a ``Vm`` or a ``GuestMemory``.
    """
    data = bytes(data)
    as_phys(target).write(gpa, data)
    return gpa + len(data)


def load_elf64(target, image: bytes | str | os.PathLike) -> ElfImage:
    """Load an ELF64 executable (bytes or a path) into guest memory; return the parsed image.

    Segments go to their physical addresses (``p_paddr``); ``.bss`` is zeroed.
    Start the vCPU at ``image.entry``.
    """
    if not isinstance(image, (bytes, bytearray, memoryview)):
        with open(image, "rb") as f:
            image = f.read()
    elf = parse_elf64(bytes(image))
    phys = as_phys(target)
    for s in elf.segments:
        phys.write(s.paddr, s.data + bytes(s.memsz - len(s.data)))
    return elf
