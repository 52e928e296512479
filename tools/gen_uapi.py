#!/usr/bin/env python3
"""Generate ``pykvm/uapi/`` from the kernel's own KVM headers, as the C compiler sees them.

Two stages, so that the generated modules can be rebuilt without any headers:

1. **extract** (needs gcc and, at development time only, pyelftools): compile
   ``#include <linux/kvm.h>`` with ``-g -fno-eliminate-unused-debug-types`` and
   read every struct, union and enum of ``linux/kvm.h`` and ``asm/kvm.h`` from
   the DWARF (sizes, member offsets, bit-fields, array bounds: the compiler's
   numbers, nothing counted by hand); list every object-like macro of those two
   headers with ``gcc -E -dD`` and have a generated C program print its value
   (request numbers included, computed by the ``_IO*`` macros themselves).
   The result is a *record*, a JSON file (``tests/uapi/kernel-<version>.json``).
2. **render** (pure Python, no headers): write ``x86.py``, ``kvm.py``,
   ``consts.py``, ``enums.py`` and ``ioctls.py`` from a record.  Request
   numbers are rebuilt there with ioctl-opt from the ctypes structures; the
   tests check each against the compiler's value in the record.

Usage::

    # a Debian linux-libc-dev unpack, an include dir, or a kernel source tree
    python tools/gen_uapi.py extract HEADER_ROOT --record tests/uapi/kernel-7.3.json \\
        [--label 7.3-rc7] [--source TEXT] [--sha256 HEX]
    python tools/gen_uapi.py render tests/uapi/kernel-7.3.json      # rewrite pykvm/uapi
    python tools/gen_uapi.py render tests/uapi/kernel-7.3.json --check
    python tools/gen_uapi.py compare tests/uapi/kernel-7.3.json     # checked / equal counts
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
UAPI = ROOT / "pykvm" / "uapi"
TOOL = "tools/gen_uapi.py"

Record = dict[str, Any]

# ---------------------------------------------------------------------------
# Where a header tree keeps its files
# ---------------------------------------------------------------------------

#: Shim headers for a kernel source tree, whose asm/ headers listed in
#: ``generic-y`` exist only after ``make headers``.
_GENERIC_ASM = ("types", "ioctl", "ioctls", "errno", "fcntl", "param", "poll", "socket",
                "sockios", "termbits", "termios", "resource", "mman", "stat", "statfs",
                "swab", "signal", "sembuf", "shmbuf", "msgbuf", "ipcbuf", "bitsperlong",
                "int-ll64", "posix_types")


def header_dirs(root: Path, shim: Path) -> tuple[list[Path], str]:
    """The -I directories for a header tree, and what kind of tree it is."""
    if (root / "usr/include/linux/kvm.h").exists():  # a linux-libc-dev unpack
        inc = root / "usr/include"
        return [inc / "x86_64-linux-gnu", inc], "linux-libc-dev"
    if (root / "include/uapi/linux/kvm.h").exists():  # a kernel source tree
        arch = root / "arch/x86/include/uapi"
        shim_asm = shim / "asm"
        shim_asm.mkdir(parents=True, exist_ok=True)
        for name in _GENERIC_ASM:
            if not (arch / "asm" / f"{name}.h").exists() and \
                    (root / f"include/uapi/asm-generic/{name}.h").exists():
                (shim_asm / f"{name}.h").write_text(f"#include <asm-generic/{name}.h>\n")
        return [arch, root / "include/uapi", shim], "kernel source"
    if (root / "linux/kvm.h").exists():  # an installed include directory
        return [root / "x86_64-linux-gnu", root], "include directory"
    raise SystemExit(f"gen_uapi: no linux/kvm.h under {root}")


def kernel_version(root: Path, dirs: list[Path]) -> str:
    """MAJOR.MINOR.SUB of the tree, from linux/version.h or the kernel Makefile."""
    for d in dirs:
        v = d / "linux/version.h"
        if v.exists():
            text = v.read_text()
            parts = [re.search(rf"LINUX_VERSION_{k}\s+(\d+)", text) for k in
                     ("MAJOR", "PATCHLEVEL", "SUBLEVEL")]
            if all(parts):
                return ".".join(p.group(1) for p in parts if p)
            code = int(re.search(r"LINUX_VERSION_CODE\s+(\d+)", text).group(1))  # type: ignore
            return f"{code >> 16}.{(code >> 8) & 0xFF}.{code & 0xFF}"
    mk = root / "Makefile"
    if mk.exists():
        text = mk.read_text()
        vals = [re.search(rf"^{k}\s*=\s*(\S*)", text, re.M) for k in
                ("VERSION", "PATCHLEVEL", "SUBLEVEL", "EXTRAVERSION")]
        nums = [m.group(1) if m else "" for m in vals]
        return f"{nums[0]}.{nums[1]}.{nums[2]}{nums[3]}"
    return "unknown"


# ---------------------------------------------------------------------------
# Stage 1: extract (gcc + DWARF)
# ---------------------------------------------------------------------------

def _gcc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["gcc", *args], cwd=cwd, capture_output=True, text=True)


def _which_header(path: str) -> str | None:
    """'x86' for asm/kvm.h, 'kvm' for linux/kvm.h, else None."""
    if path.endswith("asm/kvm.h"):
        return "x86"
    if path.endswith("linux/kvm.h"):
        return "kvm"
    return None


def _macros(incs: list[str], work: Path) -> list[dict[str, Any]]:
    """Object-like macros of the two KVM headers, in header order."""
    (work / "m.c").write_text("#include <linux/kvm.h>\n")
    r = _gcc(["-E", "-dD", *incs, "m.c"], work)
    if r.returncode:
        raise SystemExit("gen_uapi: gcc -E failed:\n" + r.stderr)
    out: list[dict[str, Any]] = []
    cur: str | None = None
    line = 0
    for text in r.stdout.splitlines():
        m = re.match(r'^# (\d+) "([^"]+)"', text)
        if m:
            line, cur = int(m.group(1)), _which_header(m.group(2))
            continue
        if cur:
            d = re.match(r"^#define ([A-Za-z_]\w*)(\(?)\s*(.*)$", text)
            if d and not d.group(2) and d.group(3).strip():
                name = d.group(1)
                if not re.match(r"^_*(UAPI_)?(_?LINUX|ASM)_\w*_H$|^__KVM_HAVE", name):
                    out.append({"name": name, "file": cur, "line": line, "body": d.group(3).strip()})
        line += 1
    return out


def _values(names: list[str], incs: list[str], work: Path) -> dict[str, int]:
    """Integer value of each macro that is an integer constant, by gcc."""
    todo = list(dict.fromkeys(names))
    head = ("#include <stdio.h>\n#include <linux/kvm.h>\n"
            "#define P(n, v) do { if ((v) < 0) printf(\"%s %lld\\n\", n, (long long)(v)); "
            "else printf(\"%s %llu\\n\", n, (unsigned long long)(v)); } while (0)\n"
            "int main(void) {\n")
    first = head.count("\n") + 1
    for _ in range(50):
        src = head + "".join(f"P(\"{n}\", ({n}) + 0);\n" for n in todo) + "return 0;\n}\n"
        (work / "v.c").write_text(src)
        r = _gcc(["-w", *incs, "-o", "v", "v.c"], work)
        if r.returncode == 0:
            text = subprocess.run([str(work / "v")], capture_output=True, text=True,
                                  check=True).stdout
            return {k: int(v) for k, v in (ln.split(" ") for ln in text.splitlines())}
        bad = {int(m.group(1)) - first for m in re.finditer(r"v\.c:(\d+):\d+:", r.stderr)}
        bad = {i for i in bad if 0 <= i < len(todo)}
        if not bad:
            raise SystemExit("gen_uapi: value program failed:\n" + r.stderr[-3000:])
        todo = [n for i, n in enumerate(todo) if i not in bad]
    raise SystemExit("gen_uapi: value program did not converge")


def _dwarf(incs: list[str], work: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every struct/union (named and anonymous) and enumerator of the two headers."""
    from elftools.elf.elffile import ELFFile  # dev-time only (the ``dev`` extra)

    (work / "d.c").write_text("#include <linux/kvm.h>\n")
    r = _gcc(["-g", "-gdwarf-5", "-fno-eliminate-unused-debug-types", *incs,
              "-c", "-o", "d.o", "d.c"], work)
    if r.returncode:
        raise SystemExit("gen_uapi: gcc -g failed:\n" + r.stderr)
    types: dict[str, Any] = {}
    enumerators: list[dict[str, Any]] = []
    with open(work / "d.o", "rb") as f:
        elf = ELFFile(f)
        dwarf = elf.get_dwarf_info()
        for cu in dwarf.iter_CUs():
            lp = dwarf.line_program_for_CU(cu)
            files = lp["file_entry"]
            dirs = lp["include_directory"]

            def decl_file(die: Any) -> str | None:
                a = die.attributes.get("DW_AT_decl_file")
                if a is None:
                    return None
                fe = files[a.value]
                name = fe.name.decode()
                d = dirs[fe.dir_index].decode()
                return _which_header(os.path.join(d, name))

            anon_names: dict[int, str] = {}
            naming: dict[str, str] = {}

            def typeref(die: Any, owner: str, member: str) -> str:
                tag = die.tag
                if tag in ("DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type"):
                    return typeref(die.get_DIE_from_attribute("DW_AT_type"), owner, member)
                if tag == "DW_TAG_base_type":
                    name = die.attributes["DW_AT_name"].value.decode()
                    size = die.attributes["DW_AT_byte_size"].value
                    enc = die.attributes["DW_AT_encoding"].value
                    if name == "char":
                        return "char"
                    if enc == 2:
                        return "bool"
                    signed = enc in (5, 6)  # DW_ATE_signed, DW_ATE_signed_char
                    return f"{'s' if signed else 'u'}{size * 8}"
                if tag == "DW_TAG_enumeration_type":
                    return f"u{die.attributes['DW_AT_byte_size'].value * 8}"
                if tag == "DW_TAG_pointer_type":
                    return "ptr"
                if tag == "DW_TAG_array_type":
                    elem = typeref(die.get_DIE_from_attribute("DW_AT_type"), owner, member)
                    dims = ""
                    for sub in die.iter_children():
                        if "DW_AT_count" in sub.attributes:
                            n = sub.attributes["DW_AT_count"].value
                        elif "DW_AT_upper_bound" in sub.attributes:
                            n = sub.attributes["DW_AT_upper_bound"].value + 1
                        else:
                            n = 0  # flexible array member
                        dims += f"[{n}]"
                    return elem + dims
                if tag in ("DW_TAG_structure_type", "DW_TAG_union_type"):
                    return aggregate(die, owner, member)
                raise SystemExit(f"gen_uapi: unhandled DWARF tag {tag} in {owner}.{member}")

            def aggregate(die: Any, owner: str, member: str) -> str:
                # An anonymous aggregate is named after the path to it:
                # kvm_run's unnamed union is _kvm_run_u, its member io is of
                # type _kvm_run_io (unnamed levels do not lengthen the name).
                if "DW_AT_name" in die.attributes:
                    name = die.attributes["DW_AT_name"].value.decode()
                    naming[name] = name
                elif die.offset in anon_names:
                    return anon_names[die.offset]
                else:
                    base = naming.get(owner, owner).lstrip("_")
                    name = f"_{base}_{member.lstrip('_')}"
                    while name in types or name in anon_names.values():
                        name += f"_{member.lstrip('_')}"
                    anon_names[die.offset] = name
                    naming[name] = naming.get(owner, owner) if member.startswith("_u") else name
                if name in types or "DW_AT_declaration" in die.attributes:
                    return name
                kind = "union" if die.tag == "DW_TAG_union_type" else "struct"
                entry: dict[str, Any] = {"kind": kind, "size": die.attributes["DW_AT_byte_size"].value,
                                         "file": decl_file(die), "members": []}
                types[name] = entry
                n_anon = 0
                for m in die.iter_children():
                    if m.tag != "DW_TAG_member":
                        continue
                    if "DW_AT_name" in m.attributes:
                        mname = m.attributes["DW_AT_name"].value.decode()
                        anon = False
                    else:
                        mname = f"_u{n_anon}" if n_anon else "_u"
                        n_anon += 1
                        anon = True
                    loc = m.attributes.get("DW_AT_data_member_location")
                    off = loc.value if loc is not None else 0
                    t = typeref(m.get_DIE_from_attribute("DW_AT_type"), name, mname)
                    row: dict[str, Any] = {"name": mname, "offset": off, "type": t}
                    if anon:
                        row["anonymous"] = True
                    if "DW_AT_bit_size" in m.attributes:
                        bit = m.attributes["DW_AT_data_bit_offset"].value
                        row["offset"] = bit // 8
                        row["bits"] = [m.attributes["DW_AT_bit_size"].value, bit]
                    entry["members"].append(row)
                return name

            for die in cu.get_top_DIE().iter_children():
                where = decl_file(die)
                if where is None:
                    continue
                if die.tag in ("DW_TAG_structure_type", "DW_TAG_union_type") and \
                        "DW_AT_name" in die.attributes and "DW_AT_declaration" not in die.attributes:
                    aggregate(die, "", "")
                elif die.tag == "DW_TAG_enumeration_type":
                    ename = die.attributes.get("DW_AT_name")
                    eline = die.attributes["DW_AT_decl_line"].value
                    for i, e in enumerate(die.iter_children()):
                        if e.tag == "DW_TAG_enumerator":
                            enumerators.append({
                                "name": e.attributes["DW_AT_name"].value.decode(),
                                "value": e.attributes["DW_AT_const_value"].value,
                                "file": where, "line": eline + i * 1e-3,
                                "enum": ename.value.decode() if ename else None})
    return types, enumerators


_IOC = re.compile(r"^_IO(R|W|WR)?\(\s*KVMIO\s*,\s*([^,()]+?)\s*(?:,\s*(.+?))?\s*\)$")


def _argtype(text: str) -> str:
    text = " ".join(text.split())
    if text.startswith("struct "):
        return text[7:]
    basic = {"__u8": "u8", "__u16": "u16", "__u32": "u32", "__u64": "u64", "__s32": "s32",
             "int": "s32", "unsigned long": "ulong", "unsigned int": "u32"}
    if text not in basic:
        raise SystemExit(f"gen_uapi: unknown ioctl argument type {text!r}")
    return basic[text]


def _exit_reasons(kvm_h: Path) -> list[str]:
    """The KVM_EXIT_* block of linux/kvm.h that starts at KVM_EXIT_UNKNOWN."""
    names: list[str] = []
    started = False
    for line in kvm_h.read_text().splitlines():
        m = re.match(r"#define (KVM_EXIT_\w+)\s", line)
        if m and m.group(1) == "KVM_EXIT_UNKNOWN":
            started = True
        if started:
            if not m:
                break
            names.append(m.group(1))
    return names


def extract(root: Path, label: str | None, source: str | None,
            sha256: str | None) -> Record:
    """Read a header tree with gcc and return the record (see the module docstring)."""
    if shutil.which("gcc") is None:
        raise SystemExit("gen_uapi: gcc is needed to extract")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dirs, kind = header_dirs(root.resolve(), work / "shim")
        incs = [f"-I{d}" for d in dirs]
        macros = _macros(incs, work)
        values = _values([m["name"] for m in macros], incs, work)
        types, enumerators = _dwarf(incs, work)
        kvm_h = next(d / "linux/kvm.h" for d in dirs if (d / "linux/kvm.h").exists())
        exit_reasons = _exit_reasons(kvm_h)
        gcc_version = _gcc(["-dumpfullversion"], work).stdout.strip()
    consts: list[dict[str, Any]] = []
    ioctls: list[dict[str, Any]] = []
    seen = set()
    for m in macros:
        name = m["name"]
        if name not in values or name in seen:
            continue
        seen.add(name)
        ioc = _IOC.match(m["body"].replace("\\", " ").strip())
        if ioc:
            ioctls.append({"name": name, "value": values[name], "file": m["file"],
                           "dir": ioc.group(1) or "", "arg": _argtype(ioc.group(3)) if ioc.group(3) else None})
        else:
            consts.append({"name": name, "value": values[name], "file": m["file"], "line": m["line"]})
    for e in enumerators:
        if e["name"] not in seen:
            seen.add(e["name"])
            consts.append({"name": e["name"], "value": e["value"], "file": e["file"],
                           "line": e["line"], "enum": e["enum"]})
    consts.sort(key=lambda c: (c["file"] != "x86", c["line"]))
    for c in consts:
        del c["line"]
    version = kernel_version(root.resolve(), dirs)
    return {
        "meta": {
            "kernel": version,
            "label": label or version,
            "source": source or f"{kind} at {root}",
            "sha256": sha256,
            "extracted": datetime.date.today().isoformat(),
            "tool": TOOL,
            "compiler": f"gcc {gcc_version}",
        },
        "types": types,
        "consts": consts,
        "ioctls": ioctls,
        "exit_reasons": exit_reasons,
    }


# ---------------------------------------------------------------------------
# Stage 2: render (pure Python)
# ---------------------------------------------------------------------------

_CTYPES = {"u8": "c_uint8", "u16": "c_uint16", "u32": "c_uint32", "u64": "c_uint64",
           "s8": "c_int8", "s16": "c_int16", "s32": "c_int32", "s64": "c_int64",
           "bool": "c_bool", "ptr": "c_void_p", "ulong": "c_ulong",
           # C's char arrays hold bytes (LAPIC page, padding, stats names); a
           # ctypes c_char array would read back as bytes cut at the first NUL.
           "char": "c_uint8"}

#: Which fd an x86 or generic ioctl is issued on (Documentation/virt/kvm/api.rst
#: "Type:").  A new ioctl that is in neither this table nor OTHER_ARCH stops the
#: generator: classify it here.
SECTIONS: dict[str, list[str]] = {
    "system ioctls (on the /dev/kvm fd)": ["KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_MSR_INDEX_LIST",
               "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID",
               "KVM_GET_EMULATED_CPUID", "KVM_GET_MSR_FEATURE_INDEX_LIST"],
    "VM ioctls": ["KVM_CREATE_VCPU", "KVM_GET_DIRTY_LOG",
           "KVM_SET_NR_MMU_PAGES", "KVM_GET_NR_MMU_PAGES", "KVM_SET_USER_MEMORY_REGION",
           "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR", "KVM_SET_USER_MEMORY_REGION2",
           "KVM_CREATE_IRQCHIP", "KVM_IRQ_LINE", "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP",
           "KVM_CREATE_PIT", "KVM_GET_PIT", "KVM_SET_PIT", "KVM_IRQ_LINE_STATUS",
           "KVM_REGISTER_COALESCED_MMIO", "KVM_UNREGISTER_COALESCED_MMIO",
           "KVM_SET_GSI_ROUTING", "KVM_REINJECT_CONTROL", "KVM_IRQFD", "KVM_CREATE_PIT2",
           "KVM_SET_BOOT_CPU_ID", "KVM_IOEVENTFD", "KVM_XEN_HVM_CONFIG", "KVM_SET_CLOCK",
           "KVM_GET_CLOCK", "KVM_GET_PIT2", "KVM_SET_PIT2", "KVM_SIGNAL_MSI",
           "KVM_SET_PMU_EVENT_FILTER", "KVM_MEMORY_ENCRYPT_OP",
           "KVM_MEMORY_ENCRYPT_REG_REGION", "KVM_MEMORY_ENCRYPT_UNREG_REGION",
           "KVM_HYPERV_EVENTFD", "KVM_CLEAR_DIRTY_LOG", "KVM_X86_SET_MSR_FILTER",
           "KVM_RESET_DIRTY_RINGS", "KVM_XEN_HVM_GET_ATTR", "KVM_XEN_HVM_SET_ATTR",
           "KVM_XEN_HVM_EVTCHN_SEND", "KVM_SET_MEMORY_ATTRIBUTES", "KVM_CREATE_GUEST_MEMFD",
           "KVM_CREATE_DEVICE"],
    "generic ioctls valid on several fd kinds": [
        "KVM_ENABLE_CAP", "KVM_SET_DEVICE_ATTR", "KVM_GET_DEVICE_ATTR",
        "KVM_HAS_DEVICE_ATTR", "KVM_GET_STATS_FD", "KVM_SET_TSC_KHZ", "KVM_GET_TSC_KHZ"],
    "vCPU ioctls": ["KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS",
             "KVM_TRANSLATE", "KVM_INTERRUPT", "KVM_GET_MSRS", "KVM_SET_MSRS",
             "KVM_SET_CPUID", "KVM_SET_SIGNAL_MASK", "KVM_GET_FPU", "KVM_SET_FPU",
             "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_SET_CPUID2", "KVM_GET_CPUID2",
             "KVM_TPR_ACCESS_REPORTING", "KVM_SET_VAPIC_ADDR", "KVM_GET_MP_STATE",
             "KVM_SET_MP_STATE", "KVM_NMI", "KVM_SET_GUEST_DEBUG", "KVM_X86_SETUP_MCE",
             "KVM_X86_GET_MCE_CAP_SUPPORTED", "KVM_X86_SET_MCE", "KVM_GET_VCPU_EVENTS",
             "KVM_SET_VCPU_EVENTS", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS",
             "KVM_GET_XSAVE", "KVM_SET_XSAVE", "KVM_GET_XCRS", "KVM_SET_XCRS",
             "KVM_GET_ONE_REG", "KVM_SET_ONE_REG", "KVM_KVMCLOCK_CTRL", "KVM_GET_REG_LIST",
             "KVM_SMI", "KVM_GET_NESTED_STATE", "KVM_SET_NESTED_STATE",
             "KVM_GET_SUPPORTED_HV_CPUID", "KVM_XEN_VCPU_GET_ATTR", "KVM_XEN_VCPU_SET_ATTR",
             "KVM_GET_SREGS2", "KVM_SET_SREGS2", "KVM_GET_XSAVE2", "KVM_PRE_FAULT_MEMORY"],
}

#: Defined in linux/kvm.h for other architectures only (ENOTTY/EINVAL on x86).
OTHER_ARCH = re.compile(r"^KVM_(S390|PPC|ARM|RISCV|LOONGARCH)_|^KVM_(CREATE_SPAPR_TCE(_64)?|"
                        r"ALLOCATE_RMA|DIRTY_TLB)$")

OTHER_SECTION = "ioctls of other architectures (in linux/kvm.h; not for x86)"
_SECTION_ORDER = list(SECTIONS) + [OTHER_SECTION]


def _split_type(t: str) -> tuple[str, list[int]]:
    base = t.split("[", 1)[0]
    dims = [int(x) for x in re.findall(r"\[(\d+)\]", t)]
    return base, dims


def _ctype(t: str) -> str:
    base, dims = _split_type(t)
    expr = _CTYPES.get(base, base)
    for n in reversed(dims):
        expr = f"{expr} * {n}" if expr.isidentifier() else f"({expr}) * {n}"
    return expr


def _deps(types: Record, name: str) -> list[str]:
    out = []
    for m in types[name]["members"]:
        base, _ = _split_type(m["type"])
        if base in types:
            out.append(base)
    return out


def _order(types: Record, names: list[str]) -> list[str]:
    """Dependencies first, otherwise header (DWARF) order."""
    done: list[str] = []
    seen = set()

    def visit(n: str) -> None:
        if n in seen:
            return
        seen.add(n)
        for d in _deps(types, n):
            if d in names:
                visit(d)
        done.append(n)

    for n in names:
        visit(n)
    return done


def _provenance(rec: Record, what: str) -> str:
    m = rec["meta"]
    return (f'"""{what}\n\n'
            f"Generated by {m['tool']} -- do not edit; re-run the tool instead.\n"
            f"Kernel: Linux {m['label']} (version {m['kernel']})\n"
            f"Headers: {m['source']}\n"
            + (f"Headers sha256: {m['sha256']}\n" if m.get("sha256") else "")
            + f"Extracted: {m['extracted']} with {m['compiler']} (DWARF and C-evaluated macros)\n"
            f'"""\n')


def _flex_member(types: Record, t: Record) -> tuple[str, str] | None:
    """(name, element type) of a struct's trailing flexible array, also when
    the kernel wraps it in ``__DECLARE_FLEX_ARRAY`` (an unnamed struct)."""
    if t["kind"] != "struct" or not t["members"]:
        return None
    last = t["members"][-1]
    if last["type"].endswith("[0]"):
        return last["name"], last["type"][:-3]
    if last.get("anonymous"):
        return _flex_member(types, types[last["type"]])
    return None


#: What reading a member gives, per ctypes scalar (for the class annotations).
_PYTYPES = {"c_bool": "bool", "c_void_p": "int | None"}


def _pytype(types: Record, t: str) -> str:
    """The type a Python reader of a member of C type *t* gets (``int``, a struct class, ``Array[...]``)."""
    base, dims = _split_type(t)
    if base in types:
        expr = base
        scalar = base
    else:
        scalar = _CTYPES.get(base, base)
        expr = _PYTYPES.get(scalar, "int")
    if not dims:
        return expr
    elem = scalar
    for _ in dims[1:]:
        elem = f"Array[{elem}]"
    return f"Array[{elem}]"


def _annotations(types: Record, t: Record, top: bool = True) -> list[str]:
    """``name: type`` for every member a reader can reach, with those of
    anonymous members, which ctypes promotes to the outer class (the
    promoted members' own anonymous members are promoted, not reachable)."""
    out: list[str] = []
    for m in t["members"]:
        if m["name"].startswith("__"):
            continue  # the kernel's __empty_* placeholders: Python would mangle the name
        if top or not m.get("anonymous"):
            out.append(f"    {m['name']}: {_pytype(types, m['type'])}")
        if m.get("anonymous"):
            out.extend(_annotations(types, types[m["type"]], False))
    return out


def _class(types: Record, name: str, t: Record) -> list[str]:
    base = "Union" if t["kind"] == "union" else "Struct"
    lines = [f"class {name}({base}):"]
    # Annotations without values: for type checkers only (ctypes reads _fields_).
    lines.extend(_annotations(types, t))
    fields: list[str] = []
    anon = [m["name"] for m in t["members"] if m.get("anonymous")]
    for m in t["members"]:
        ct = _ctype(m["type"])
        if "bits" in m:
            fields.append(f"        ({m['name']!r}, {ct}, {m['bits'][0]}),")
        else:
            fields.append(f"        ({m['name']!r}, {ct}),")
    if anon:
        lines.append(f"    _anonymous_ = ({', '.join(repr(a) for a in anon)},)")
    flex = None if name.startswith("_") else _flex_member(types, t)
    if flex:
        lines.append(f"    _flex_ = ({flex[0]!r}, {_ctype(flex[1])})")
    if fields:
        lines.append("    _fields_ = [")
        lines.extend(fields)
        lines.append("    ]")
    else:
        lines.append("    _fields_ = []")
    return lines


def render_types(rec: Record, file: str) -> str:
    types = rec["types"]
    names = [n for n, t in types.items() if t["file"] == file]
    header = "arch/x86/include/uapi/asm/kvm.h" if file == "x86" else "include/uapi/linux/kvm.h"
    out = [_provenance(rec, f"The structures and unions of ``{header}``, in ctypes."), "",
           "from __future__ import annotations", "",
           "from ctypes import (Array, c_bool, c_char, c_int8, c_int16, c_int32, c_int64,  # noqa: F401",
           "                    c_uint8, c_uint16, c_uint32, c_uint64, c_ulong, c_void_p)", "",
           "from ._base import Struct, Union"]
    if file == "kvm":
        used = sorted({b for n in names for b in _deps(types, n) if types[b]["file"] == "x86"})
        if used:
            out.append("from .x86 import (  # noqa: F401")
            out.extend(f"    {u}," for u in used)
            out.append(")")
    out.append("")
    public = []
    for n in _order(types, names):
        out.append("")
        out.extend(_class(types, n, types[n]))
        out.append("")
        if not n.startswith("_"):
            public.append(n)
    out.append("")
    out.append("__all__ = [")
    out.extend(f"    {p!r}," for p in public)
    out.append("]")
    return "\n".join(out) + "\n"


def _int(v: int) -> str:
    return str(v) if -256 < v < 256 else (f"-{-v:#x}" if v < 0 else f"{v:#x}")


def render_consts(rec: Record) -> str:
    out = [_provenance(rec, "Every integer constant of the KVM headers (macros and enumerators)."),
           "", "from __future__ import annotations", ""]
    file = None
    names = []
    for c in rec["consts"]:
        if c["file"] != file:
            file = c["file"]
            out.append("")
            out.append("# " + ("arch/x86/include/uapi/asm/kvm.h" if file == "x86"
                               else "include/uapi/linux/kvm.h"))
        note = f"  # enum {c['enum']}" if c.get("enum") else ""
        out.append(f"{c['name']} = {_int(c['value'])}{note}")
        names.append(c["name"])
    out.append("")
    out.append("__all__ = [")
    out.extend(f"    {n!r}," for n in names)
    out.append("]")
    return "\n".join(out) + "\n"


def render_enums(rec: Record) -> str:
    consts = {c["name"]: c["value"] for c in rec["consts"]}
    caps = [(c["name"], c["value"]) for c in rec["consts"] if c["name"].startswith("KVM_CAP_")]
    exits = [(n, consts[n]) for n in rec["exit_reasons"]]
    out = [_provenance(rec, "``Cap`` and ``ExitReason``: every ``KVM_CAP_*`` and ``KVM_EXIT_*`` "
                            "reason of the kernel."),
           "", "from __future__ import annotations", "", "import enum", "",
           '__all__ = ["Cap", "ExitReason", "cap_name", "exit_name"]', "", "",
           "class Cap(enum.IntEnum):",
           '    """``KVM_CAP_*`` of every architecture (a probe must name whatever a host '
           'reports)."""', ""]
    out.extend(f"    {n[8:]} = {v}" for n, v in caps)
    out += ["", "", "class ExitReason(enum.IntEnum):",
            '    """``kvm_run.exit_reason``: ``KVM_EXIT_*``."""', ""]
    out.extend(f"    {n[9:]} = {v}" for n, v in exits)
    out += ["", "", "def cap_name(value: int) -> str:",
            '    """``KVM_CAP_<NAME>`` for a capability number, ``KVM_CAP_<n>?`` if unknown."""',
            "    try:", "        return f\"KVM_CAP_{Cap(value).name}\"",
            "    except ValueError:", "        return f\"KVM_CAP_{value}?\"", "", "",
            "def exit_name(value: int) -> str:",
            '    """``KVM_EXIT_<NAME>`` for an exit reason, ``KVM_EXIT_<n>?`` if unknown."""',
            "    try:", "        return f\"KVM_EXIT_{ExitReason(value).name}\"",
            "    except ValueError:", "        return f\"KVM_EXIT_{value}?\""]
    return "\n".join(out) + "\n"


def ioctl_section(name: str) -> str:
    """The fd kind an ioctl belongs to (a section title of ioctls.py)."""
    for section, names in SECTIONS.items():
        if name in names:
            return section
    if OTHER_ARCH.match(name):
        return OTHER_SECTION
    raise SystemExit(f"gen_uapi: classify the new ioctl {name} in SECTIONS")


def render_ioctls(rec: Record) -> str:
    by_section: dict[str, list[Record]] = {s: [] for s in _SECTION_ORDER}
    for i in rec["ioctls"]:
        by_section[ioctl_section(i["name"])].append(i)
    types = rec["types"]
    out = [_provenance(rec, "Every KVM ioctl request number defined for x86-64, built with "
                            "ioctl-opt from the ctypes structures."),
           "", "from __future__ import annotations", "",
           "from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64, c_ulong  # noqa: F401",
           "", "from . import kvm, x86  # noqa: F401",
           "from ._req import IOCTL_NAMES as IOCTL_NAMES",
           "from ._req import IOCTLS as IOCTLS",
           "from ._req import KVMIO as KVMIO",
           "from ._req import _req",
           "from ._req import ioctl_name as ioctl_name",
           ""]
    names = []
    for section in _SECTION_ORDER:
        out.append(f"# --- {section} " + "-" * max(3, 70 - len(section)))
        for i in sorted(by_section[section], key=lambda x: (x["value"] & 0xFF, x["name"])):
            nr = i["value"] & 0xFF
            arg = i["arg"]
            if arg is None:
                expr = f'_req("{i["name"]}", "", {nr:#04x})'
            else:
                if arg in types:
                    ref = f"{types[arg]['file']}.{arg}"
                else:
                    ref = _CTYPES[arg] if arg != "s32" else "c_int32"
                expr = f'_req("{i["name"]}", "{i["dir"]}", {nr:#04x}, {ref})'
            out.append(f"{i['name']} = {expr}")
            names.append(i["name"])
        out.append("")
    out.append("IOCTL_NAMES.update({num: name for name, num in reversed(list(IOCTLS.items()))})")
    out.append("")
    out.append('__all__ = ["IOCTLS", "IOCTL_NAMES", "KVMIO", "ioctl_name"] + list(IOCTLS)')
    return "\n".join(out) + "\n"


def render(rec: Record) -> dict[str, str]:
    """File name (in pykvm/uapi) -> generated text."""
    return {
        "x86.py": render_types(rec, "x86"),
        "kvm.py": render_types(rec, "kvm"),
        "consts.py": render_consts(rec),
        "enums.py": render_enums(rec),
        "ioctls.py": render_ioctls(rec),
    }


def compare(rec: Record) -> dict[str, tuple[int, int]]:
    """Check pykvm.uapi (as imported) against a record: kind -> (checked, equal)."""
    import ctypes
    import importlib.util

    sys.path.insert(0, str(ROOT))
    from pykvm import uapi
    from pykvm.uapi import enums, kvm, x86
    spec = importlib.util.spec_from_file_location("layout", ROOT / "tests/uapi/support_layout.py")
    layout = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(layout)  # type: ignore[union-attr]
    out: dict[str, list[int]] = {k: [0, 0] for k in
                                 ("ioctl numbers", "struct sizes", "field offsets", "constants",
                                  "caps", "exit reasons")}

    def tally(kind: str, ok: bool) -> None:
        out[kind][0] += 1
        out[kind][1] += int(ok)

    for i in rec["ioctls"]:
        tally("ioctl numbers", getattr(uapi, i["name"], None) == i["value"])
    for name, t in rec["types"].items():
        cls = getattr(x86 if t["file"] == "x86" else kvm, name, None)
        tally("struct sizes", cls is not None and ctypes.sizeof(cls) == t["size"])
        ours = layout.ctypes_paths(cls) if cls is not None else {}
        for path, off in layout.record_paths(rec["types"], name).items():
            tally("field offsets", ours.get(path) == off)
    for c in rec["consts"]:
        tally("constants", getattr(uapi, c["name"], None) == c["value"])
        if c["name"].startswith("KVM_CAP_"):
            tally("caps", getattr(enums.Cap, c["name"][8:], None) == c["value"])
    values = {c["name"]: c["value"] for c in rec["consts"]}
    for n in rec["exit_reasons"]:
        tally("exit reasons", getattr(enums.ExitReason, n[9:], None) == values[n])
    return {k: (v[0], v[1]) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gen_uapi", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract", help="read a header tree into a record (needs gcc, pyelftools)")
    e.add_argument("headers", type=Path)
    e.add_argument("--record", type=Path, required=True)
    e.add_argument("--label")
    e.add_argument("--source")
    e.add_argument("--sha256")
    e.add_argument("--render", action="store_true", help="also rewrite pykvm/uapi")
    r = sub.add_parser("render", help="write pykvm/uapi from a record")
    r.add_argument("record", type=Path)
    r.add_argument("--check", action="store_true", help="exit 1 if a file differs")
    r.add_argument("--out", type=Path, default=UAPI)
    c = sub.add_parser("compare", help="count pykvm.uapi values equal to a record's")
    c.add_argument("record", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "compare":
        counts = compare(json.loads(args.record.read_text()))
        for kind, (checked, equal) in counts.items():
            print(f"{kind:15} {equal:5} / {checked:5} equal")
        total = [sum(v[i] for v in counts.values()) for i in (0, 1)]
        print(f"{'total':15} {total[1]:5} / {total[0]:5} equal")
        return 0 if total[0] == total[1] else 1
    if args.cmd == "extract":
        rec = extract(args.headers, args.label, args.source, args.sha256)
        args.record.write_text(json.dumps(rec, indent=1) + "\n")
        print(f"{args.record}: {len(rec['types'])} types, {len(rec['consts'])} constants, "
              f"{len(rec['ioctls'])} ioctls")
        if not args.render:
            return 0
        record, out, check = rec, UAPI, False
    else:
        record, out, check = json.loads(args.record.read_text()), args.out, args.check
    stale = []
    for fname, text in render(record).items():
        path = out / fname
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(fname)
        else:
            path.write_text(text)
    if stale:
        print("stale: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
