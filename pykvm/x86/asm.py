"""Build guest code from GNU ``as`` source at run time (cached by hash).

::

    prog = assemble('''
        mov  dx, 0x3f8
        mov  al, 'A'
        out  dx, al
        hlt
    ''', base=0x10000)
    vm.write(prog.base, prog.code)     # or prog.load(vm)
    print(hex(prog.symbols["_start"]))

The source is Intel syntax without ``%`` prefixes by default
(``.intel_syntax noprefix``; pass ``syntax="att"`` for AT&T).  ``bits``
selects the starting mode (16, 32 or 64); the source may switch with
``.code16`` / ``.code32`` / ``.code64``, e.g. in an AP trampoline.

The steps are ``as --64`` then ``ld`` with a linker script that places every
section (``.text``, ``.rodata``, ``.data``, then ``.bss``) one after the other
from *base*; the linked ELF is parsed by :mod:`pykvm.x86.loader`, so the
result carries its symbols.  GNU binutils must be installed (Debian:
``apt-get install binutils``); nothing else is needed.

Results are cached on disk by the SHA-256 of the source, the options and
the identity of the installed ``as``/``ld``, in ``$PYKVM_CACHE_DIR`` or
``$XDG_CACHE_HOME/pykvm/asm`` (default ``~/.cache/pykvm/asm``); an unwritable
cache directory only disables the disk cache.  ``.include "file"`` lines are
expanded (from *include_dirs*) before hashing, so an edited include
invalidates the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .loader import ElfImage, parse_elf64
from .paging import as_phys

__all__ = ["AssemblyError", "Program", "ToolMissing", "assemble", "assemble_file", "cache_dir", "expand_includes"]

_LINKER_SCRIPT = """\
ENTRY(_start)
SECTIONS
{{
  . = {base:#x};
  .text : {{ *(.text.start) *(.text .text.*) *(.rodata .rodata.*) *(.data .data.*) }}
  .bss : {{ *(.bss .bss.*) *(COMMON) }}
  /DISCARD/ : {{ *(.note*) *(.eh_frame*) *(.comment) }}
}}
"""


class AssemblyError(RuntimeError):
    """``as`` or ``ld`` rejected the source; the message holds their diagnostics."""


class ToolMissing(AssemblyError):
    """GNU ``as``/``ld`` are not installed."""


@dataclass
class Program:
    """Assembled guest code: a flat image meant to be loaded at ``base``.

    ``code`` includes zeroed ``.bss`` at its end.  ``symbols`` maps every
    label to its address; ``prog["label"]`` is the same.  ``entry`` is the
    ``_start`` label if there is one, else ``base``.
    """

    code: bytes
    base: int
    symbols: dict[str, int] = field(default_factory=dict)

    @property
    def entry(self) -> int:
        return self.symbols.get("_start", self.base)

    @property
    def end(self) -> int:
        """One past the last byte of the image."""
        return self.base + len(self.code)

    def __getitem__(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise KeyError(f"no symbol {name!r} in the program (have: {', '.join(sorted(self.symbols))})") from None

    def __len__(self) -> int:
        return len(self.code)

    def load(self, target) -> int:
        """Copy the image into guest memory (a ``Vm`` or ``GuestMemory``) at ``base``; return ``entry``."""
        as_phys(target).write(self.base, self.code)
        return self.entry


def cache_dir() -> Path:
    """Where assembled programs are cached."""
    env = os.environ.get("PYKVM_CACHE_DIR")
    if env:
        return Path(env) / "asm"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "pykvm" / "asm"


_memo: dict[str, Program] = {}
_tools: dict[str, str] | None = None


def _find_tools() -> dict[str, str]:
    global _tools
    if _tools is None:
        found = {}
        for name in ("as", "ld"):
            path = shutil.which(name)
            if path is None:
                raise ToolMissing(
                    f"GNU '{name}' is not installed: pykvm.x86.assemble needs binutils "
                    "(Debian/Ubuntu: apt-get install binutils)")
            found[name] = path
        _tools = found
    return _tools


def _tool_identity(tools: dict[str, str]) -> str:
    parts = []
    for name, path in sorted(tools.items()):
        st = os.stat(os.path.realpath(path))
        parts.append(f"{name}:{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}")
    return ";".join(parts)


def assemble(source: str, *, base: int = 0, bits: int = 64, syntax: str = "intel",
             name: str = "guest.s", include_dirs: Sequence[str | os.PathLike] = (),
             cache: bool = True) -> Program:
    """Assemble and link *source* for loading at *base*; return a :class:`Program`.

    *bits* (16, 32, 64) is the initial code size; *syntax* is ``"intel"``
    (no register prefixes) or ``"att"``.  ``.include "file"`` lines are
    replaced by the file found in *include_dirs* before assembling (so the
    cache key covers them; line numbers in messages then count included
    lines too).  *name* appears in error messages.  Raises
    :class:`AssemblyError` with the assembler's messages on failure.
    """
    if include_dirs:
        source = expand_includes(source, list(include_dirs))
    if bits not in (16, 32, 64):
        raise ValueError("bits must be 16, 32 or 64")
    if syntax not in ("intel", "att"):
        raise ValueError('syntax must be "intel" or "att"')
    tools = _find_tools()
    # The prologue shares line 1 with the source so the assembler's line numbers match the file's.
    prologue = (".intel_syntax noprefix; " if syntax == "intel" else "") + f".code{bits}; "
    text = prologue + source + "\n"
    key = hashlib.sha256(json.dumps(
        [text, base, _tool_identity(tools), 1]).encode()).hexdigest()
    if cache and key in _memo:
        return _memo[key]
    cdir = cache_dir()
    cached = cdir / f"{key}.elf"
    if cache and cached.is_file():
        try:
            prog = _program(parse_elf64(cached.read_bytes()), base)
            _memo[key] = prog
            return prog
        except Exception:
            pass  # a damaged cache file: rebuild it
    with tempfile.TemporaryDirectory(prefix="pykvm-asm-") as tmp:
        src = os.path.join(tmp, name)
        obj = os.path.join(tmp, "guest.o")
        elf = os.path.join(tmp, "guest.elf")
        script = os.path.join(tmp, "guest.ld")
        with open(src, "w") as f:
            f.write(text)
        with open(script, "w") as f:
            f.write(_LINKER_SCRIPT.format(base=base))
        _run([tools["as"], "--64", "-o", obj, src], "as", name)
        _run([tools["ld"], "-m", "elf_x86_64", "-static", "-nostdlib", "-N", "-T", script,
              "-o", elf, obj], "ld", name)
        with open(elf, "rb") as f:
            raw = f.read()
    prog = _program(parse_elf64(raw), base)
    if cache:
        _memo[key] = prog
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            fd, tmpname = tempfile.mkstemp(dir=cdir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            os.replace(tmpname, cached)
        except OSError:
            pass  # no disk cache; the in-process one still works
    return prog


def _run(cmd, what: str, name: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).strip()
        # Messages name the temporary file; show just the source name.
        msg = re.sub(r"/[^\s:]*/" + re.escape(name), name, msg)
        raise AssemblyError(f"{what} failed on {name}:\n{msg}")


def _program(elf: ElfImage, base: int) -> Program:
    flat = elf.flat()
    if elf.low != base:
        flat = bytes(elf.low - base) + flat if elf.low > base else flat
    return Program(code=flat, base=base, symbols=dict(elf.symbols))


_INCLUDE = re.compile(r'^[ \t]*\.include[ \t]+"([^"]+)"[ \t]*(?:#.*)?$', re.M)


def expand_includes(text: str, search: Sequence[str | os.PathLike], depth: int = 0) -> str:
    """Replace each ``.include "name"`` line of *text* by the file, looked up in *search* dirs."""
    if depth > 16:
        raise AssemblyError(".include nested too deeply")

    def repl(m: re.Match[str]) -> str:
        for d in search:
            cand = Path(d) / m.group(1)
            if cand.is_file():
                return expand_includes(cand.read_text(), [cand.parent, *search], depth + 1)
        raise AssemblyError(f'.include "{m.group(1)}": not found in {[str(d) for d in search]}')

    return _INCLUDE.sub(repl, text)


def assemble_file(path: str | os.PathLike, **kw) -> Program:
    """Assemble the file at *path* (keywords as for :func:`assemble`).

    ``.include "other.s"`` is looked up next to the file, then in
    *include_dirs*.
    """
    p = Path(path)
    kw.setdefault("name", p.name)
    kw["include_dirs"] = [p.parent, *kw.get("include_dirs", ())]
    return assemble(p.read_text(), **kw)
