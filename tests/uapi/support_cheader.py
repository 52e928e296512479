"""Build and run a C program that prints what the system's KVM headers say.

Used by ``test_against_c.py``: for every request number, constant, structure
size and field offset (nested members included) that pykvm defines and the
installed headers also define, the C compiler's value is printed as
``NAME VALUE`` lines.  Names the headers lack (they may be older than the
kernel pykvm was generated from) are dropped: a line the compiler rejects is
removed and the program rebuilt, until it compiles.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable

from .support_layout import ctypes_paths

HEADERS = ("/usr/include/linux/kvm.h", "/usr/include/x86_64-linux-gnu/asm/kvm.h",
           "/usr/include/asm/kvm.h")


def available() -> str | None:
    """Return why the C check cannot run here, or None when it can."""
    if shutil.which("gcc") is None:
        return "gcc not installed"
    if not os.path.exists(HEADERS[0]):
        return "linux/kvm.h not installed (Debian package linux-libc-dev)"
    return None


def header_structs() -> set:
    names = set()
    for h in HEADERS:
        if os.path.exists(h):
            with open(h) as f:
                names |= set(re.findall(r"^struct (kvm_\w+) \{", f.read(), re.M))
    return names


def lines(macros: Iterable[str], structs: Iterable[tuple[str, type]]) -> list[str]:
    out = []
    for m in macros:
        out.append(f'#ifdef {m}\n  printf("{m} %llu\\n", (unsigned long long)({m}));\n#endif')
    for name, cls in structs:
        out.append(f'  printf("sizeof({name}) %zu\\n", sizeof(struct {name}));')
        for path in ctypes_paths(cls):
            out.append(
                f'  printf("offsetof({name}.{path}) %zu\\n", offsetof(struct {name}, {path}));')
    return out


def run(macros: Iterable[str], structs: Iterable[tuple[str, type]],
        include: list[str] | None = None) -> dict[str, int]:
    """Compile and run the program; names the headers lack are left out."""
    body = lines(macros, structs)
    head = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>",
            "int main(void) {"]
    with tempfile.TemporaryDirectory() as d:
        c = os.path.join(d, "k.c")
        exe = os.path.join(d, "k")
        for _ in range(20):
            src, where = list(head), {}
            for i, chunk in enumerate(body):
                for _line in chunk.split("\n"):
                    src.append(_line)
                    where[len(src)] = i
            src.append("  return 0;\n}")
            with open(c, "w") as f:
                f.write("\n".join(src) + "\n")
            flags = [f"-I{p}" for p in include or []]
            r = subprocess.run(["gcc", "-w", *flags, "-o", exe, c], capture_output=True, text=True)
            if r.returncode == 0:
                break
            bad = {where[int(n)] for n in re.findall(r"k\.c:(\d+):\d+: error", r.stderr)
                   if int(n) in where}
            if not bad:
                raise RuntimeError("C program did not compile:\n" + r.stderr[-4000:])
            body = [b for i, b in enumerate(body) if i not in bad]
        else:
            raise RuntimeError("C program did not converge")
        text = subprocess.run([exe], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines())}
