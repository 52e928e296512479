"""The run-time assembler and the ELF loader."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from pykvm import x86
from pykvm.x86 import asm as asm_mod

from .support_guest import collect_out, needs_binutils

pure = pytest.mark.no_kvm_needed


@pure
@needs_binutils
def test_symbols_sections_and_bss() -> None:
    prog = x86.assemble("""
    _start: lea rsi, [rip + msg]
            hlt
    msg:    .asciz "hi"
    .data
    var:    .quad 0x1122
    .bss
    buf:    .skip 32
    """, base=0x40000, cache=False)
    assert prog.base == 0x40000 and prog.entry == prog["_start"] == 0x40000
    assert prog.code[prog["msg"] - prog.base:][:3] == b"hi\0"
    assert struct.unpack_from("<Q", prog.code, prog["var"] - prog.base)[0] == 0x1122
    assert prog.end >= prog["buf"] + 32 and prog.code[-32:] == bytes(32)
    with pytest.raises(KeyError, match="no symbol 'nope'"):
        prog["nope"]


@pure
@needs_binutils
def test_bits_and_att_syntax() -> None:
    assert x86.assemble("mov ax, 1", bits=16, cache=False).code == b"\xb8\x01\x00"
    assert x86.assemble("mov eax, 1", bits=32, cache=False).code == b"\xb8\x01\x00\x00\x00"
    assert x86.assemble("movl $1, %eax", syntax="att", cache=False).code == b"\xb8\x01\x00\x00\x00"


@pure
@needs_binutils
def test_errors_name_the_line() -> None:
    with pytest.raises(x86.AssemblyError, match=r"boot\.s:3: Error"):
        x86.assemble("nop\nnop\nmov rax, [\n", name="boot.s", cache=False)


@pure
@needs_binutils
def test_disk_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PYKVM_CACHE_DIR", str(tmp_path))
    asm_mod._memo.clear()
    src = "mov eax, 0x1234567  # cache test"
    first = x86.assemble(src)
    files = list((tmp_path / "asm").glob("*.elf"))
    assert len(files) == 1
    asm_mod._memo.clear()
    calls = []
    real_run = asm_mod._run
    monkeypatch.setattr(asm_mod, "_run", lambda *a: (calls.append(a), real_run(*a)))
    assert x86.assemble(src).code == first.code and calls == []      # served from disk
    assert x86.assemble(src + " ").code == first.code
    assert len(calls) == 2  # a different source: as and ld run again


@pure
@needs_binutils
def test_include_dirs(tmp_path) -> None:
    (tmp_path / "lib.s").write_text("lib_fn: ret\n")
    (tmp_path / "main.s").write_text('_start: call lib_fn\n.include "lib.s"\n')
    prog = x86.assemble_file(tmp_path / "main.s", cache=False)
    assert "lib_fn" in prog.symbols
    with pytest.raises(x86.AssemblyError, match="not found"):
        x86.assemble('.include "missing.s"', include_dirs=[tmp_path], cache=False)


@pure
def test_missing_binutils_is_explained(monkeypatch) -> None:
    monkeypatch.setattr(asm_mod, "_tools", None)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(x86.ToolMissing, match="binutils"):
        x86.assemble("nop")
    monkeypatch.setattr(asm_mod, "_tools", None)


@pure
def test_parse_elf_rejects_garbage() -> None:
    with pytest.raises(x86.loader.ElfError, match="not an ELF"):
        x86.parse_elf64(b"MZ" + bytes(100))
    hdr = bytearray(b"\x7fELF\x01\x01" + bytes(58))
    with pytest.raises(x86.loader.ElfError, match="ELF64"):
        x86.parse_elf64(bytes(hdr))


C_KERNEL = r"""
static inline void outb(unsigned short port, unsigned char v)
{ __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }

static unsigned long fib(int n)
{ unsigned long a = 0, b = 1; while (n--) { unsigned long t = a + b; a = b; b = t; } return a; }

unsigned long result;               /* .bss: zeroed by the loader */
const char msg[] = "elf ok\n";

void _start(void)
{
    result = fib(40);
    for (const char *p = msg; *p; p++)
        outb(0xf0, *p);
    __asm__ volatile("hlt");
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_elf64_from_c(kvm, vm, tmp_path) -> None:
    src = tmp_path / "k.c"
    src.write_text(C_KERNEL)
    elf = tmp_path / "k.elf"
    subprocess.run(["gcc", "-O2", "-ffreestanding", "-fno-pic", "-no-pie", "-nostdlib", "-static",
                    "-mno-red-zone", "-fno-stack-protector", "-Wl,-Ttext=0x100000",
                    "-Wl,--build-id=none", "-o", str(elf), str(src)], check=True)
    vm.add_memory(0, 4 * x86.MiB)
    vm.write(0x100000, b"\xff" * 0x100000)        # garbage where .bss will be
    image = x86.load_elf64(vm, elf)
    assert image.entry == image.symbols["_start"]
    assert struct.unpack("<Q", vm.read(image.symbols["result"], 8))[0] == 0
    vcpu = vm.create_vcpu()
    x86.setup_cpuid(kvm, vcpu)
    x86.setup_long_mode(vcpu, x86.Arena(vm, 0x1000, 0xF000), entry=image.entry, stack=0x80000)
    loop = x86.RunLoop(vcpu)
    got = collect_out(loop)
    assert loop.run(timeout=20).reason == "hlt"
    assert bytes(got).decode() == "elf ok\n"
    assert struct.unpack("<Q", vm.read(image.symbols["result"], 8))[0] == 102334155
