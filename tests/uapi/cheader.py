"""Build and run a C program that prints what the system's KVM headers say.

Used by ``test_against_c.py``: for every request number, capability, exit
reason, structure size and top-level field offset that pykvm defines and the
installed headers also define, the C compiler's value is printed as
``NAME VALUE`` lines.  Names the headers lack (they may be older than the
newest kernel) are simply absent from the output.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict, Iterable, Optional, Tuple

HEADERS = ("/usr/include/linux/kvm.h", "/usr/include/x86_64-linux-gnu/asm/kvm.h",
           "/usr/include/asm/kvm.h")


# Fields whose name changed between older installed headers and the newest
# kernel (pykvm follows the newest); their offsets are pinned in test_layout.
RENAMED = {
    ("kvm_run", "immediate_exit"),  # immediate_exit__unsafe since 6.10
    ("kvm_sev_cmd", "pad0"),  # implicit padding before 6.9
}


def available() -> Optional[str]:
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
            names |= set(re.findall(r"^struct (kvm_\w+) \{", open(h).read(), re.M))
    return names


def program(macros: Iterable[str], structs: Iterable[Tuple[str, type]]) -> str:
    out = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for m in macros:
        out.append(f'#ifdef {m}\n  printf("{m} %llu\\n", (unsigned long long)({m}));\n#endif')
    for name, cls in structs:
        out.append(f'  printf("sizeof({name}) %zu\\n", sizeof(struct {name}));')
        for fname, *_ in cls._fields_:
            if fname.startswith("_"):
                continue
            if (name, fname) in RENAMED:
                continue
            out.append(
                f'  printf("offsetof({name}.{fname}) %zu\\n", offsetof(struct {name}, {fname}));')
    out.append("  return 0;\n}")
    return "\n".join(out)


def run(macros: Iterable[str], structs: Iterable[Tuple[str, type]]) -> Dict[str, int]:
    src = program(macros, structs)
    with tempfile.TemporaryDirectory() as d:
        c = os.path.join(d, "k.c")
        exe = os.path.join(d, "k")
        open(c, "w").write(src)
        r = subprocess.run(["gcc", "-w", "-o", exe, c], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError("C program did not compile:\n" + r.stderr[-4000:])
        text = subprocess.run([exe], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines())}
