#!/usr/bin/env python3
"""Generate docs/api-coverage.md: every KVM ioctl pykvm knows, and the methods that wrap it.

The table is derived from the code, so it cannot drift:

* the ioctls are ``pykvm.uapi.ioctls.IOCTLS`` (generated from the kernel's
  headers by ``tools/gen_uapi.py``; in their source order, grouped by the
  ``# --- ...`` section comments of ``pykvm/uapi/ioctls.py``), except those
  of other architectures;
* a function or method *wraps* an ioctl when its body names the request
  (``I.KVM_X``, ``uapi.KVM_X``, ``ioctls.KVM_X``, or a module-level alias
  ``_KVM_X = I.KVM_X``).  A private helper (``_name``) is credited to the
  public functions/methods of the same module that call it (``self._name(...)``
  or ``_name(...)``), transitively.

Scanned: the top-level modules of the ``pykvm`` package and the modules of
the fd-kind packages in ``PACKAGES`` (``pykvm/vm/*.py`` count as module
``vm``), except private modules (``_*.py``) and the consumers listed in
``SKIP_MODULES`` (they issue ioctls to *use* KVM, not to wrap it).  A method
of a mixin class (``MemorySlots``, ``Capabilities``, ``DeviceAttrs`` ...) is
credited to every scanned class that inherits it, and the mixin itself is
not listed.

Usage::

    python tools/gen_coverage.py            # rewrite docs/api-coverage.md
    python tools/gen_coverage.py --check    # exit 1 if the file is stale
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pykvm"
DOC = ROOT / "docs" / "api-coverage.md"

#: Top-level modules that call ioctls as clients, not as the API's wrappers.
SKIP_MODULES = {"demo", "cli", "snapshot", "__main__"}

#: Packages whose modules together form one fd kind's API (reported under the package name).
PACKAGES = ("vm", "vcpu")

#: Why an ioctl has no wrapper (shown in the table when nothing wraps it).
NOTES = {
    "KVM_GET_NR_MMU_PAGES": "removed from Linux 6.x x86 (ENOTTY there)",
}

#: What the kernel added for x86 after 6.19, up to the pinned headers (7.3):
#: found by diffing the generated record against the previous hand-written
#: layer; shown under the table.  (name, what it is, where pykvm has it)
NEWEST = [
    ("KVM_EXIT_SNP_REQ_CERTS (43)", "SEV-SNP guest asks the VMM for its certificate table; "
     "`kvm_run.snp_req_certs` (`struct kvm_exit_snp_req_certs`: gpa, npages, ret)",
     "`ExitReason.SNP_REQ_CERTS`, `pykvm.uapi.kvm.kvm_exit_snp_req_certs`"),
    ("KVM_SEV_SNP_ENABLE_REQ_CERTS (103)", "KVM_MEMORY_ENCRYPT_OP command turning those exits on",
     "`coco.sev_command`"),
    ("KVM_X86_SEV_SNP_REQ_CERTS", "KVM_X86_GRP_SEV attribute: the kernel supports the command/exit",
     "`coco.has_system_attr`"),
    ("KVM_X86_QUIRK_NESTED_SVM_SHARED_PAT", "quirk bit (KVM_CAP_DISABLE_QUIRKS2) for nested SVM's guest PAT handling",
     "`pykvm.uapi.KVM_X86_QUIRK_NESTED_SVM_SHARED_PAT`"),
    ("kvm_svm_nested_state_hdr.gpat", "nested SVM state carries L2's guest PAT (header 16 bytes)",
     "`pykvm.uapi.kvm_svm_nested_state_hdr`"),
    ("KVM_CAP 247..251", "S390_KEYOP, S390_VSIE_ESAMODE, S390_HPAGE_2G, PPC_COMPAT_CAPS, "
     "ARM_PMU_V3_STRICT: other architectures (named by the probe)", "`Cap`"),
]

#: The section of ioctls.py that holds other architectures' requests
#: (defined in linux/kvm.h, refused on x86): left out of the table.
OTHER_ARCH_SECTION = "ioctls of other architectures"

_SECTION = re.compile(r"^# --- (.+?) -+$")
_REQ = re.compile(r'^(KVM_\w+)\s*=\s*_req\("(KVM_\w+)"')


def _sections() -> dict[str, str]:
    """ioctl name -> section title, from the comments of pykvm/uapi/ioctls.py."""
    out: dict[str, str] = {}
    section = "other"
    for line in (PACKAGE / "uapi" / "ioctls.py").read_text().splitlines():
        m = _SECTION.match(line.strip())
        if m:
            section = m.group(1).strip()
            continue
        m = _REQ.match(line.strip())
        if m:
            out[m.group(2)] = section
    return out


def _is_public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


class _Scanner(ast.NodeVisitor):
    """Collect, per function, the ioctl names it references and the local helpers it calls."""

    def __init__(self, module: str, ioctls: set[str], aliases: dict[str, str]) -> None:
        self.module = module
        self.ioctls = ioctls
        self.aliases = aliases
        self.stack: list[str] = []
        self.uses: dict[str, set[str]] = {}
        self.calls: dict[str, set[str]] = {}
        self.owner: dict[str, str] = {}  # qualname -> enclosing class ("" for functions)

    def _qual(self, name: str) -> str:
        return ".".join([*self.stack, name])

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    def _visit_func(self, node) -> None:
        qual = self._qual(node.name)
        self.owner[qual] = ".".join(self.stack)
        uses = self.uses.setdefault(qual, set())
        calls = self.calls.setdefault(qual, set())
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute):
                if sub.attr in self.ioctls:
                    uses.add(sub.attr)
                elif isinstance(sub.value, ast.Name) and sub.value.id in ("self", "cls"):
                    calls.add(sub.attr)
            elif isinstance(sub, ast.Name):
                if sub.id in self.aliases:
                    uses.add(self.aliases[sub.id])
                else:
                    calls.add(sub.id)
        # Nested functions are part of this one; do not descend separately.

    visit_FunctionDef = _visit_func
    visit_AsyncFunctionDef = _visit_func


def _module_aliases(tree: ast.Module, ioctls: set[str]) -> dict[str, str]:
    aliases = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Attribute) and node.value.attr in ioctls):
            aliases[node.targets[0].id] = node.value.attr
    return aliases


def _imports(tree: ast.Module, package: str = "") -> dict[str, tuple[str, str]]:
    """Local name -> (module, name) for every ``from .module import name`` in the file.

    In a module of *package*, ``from .x import`` names the package itself and
    ``from ..x import`` a top-level module.
    """
    out = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or not node.module or "." in node.module:
            continue
        if package:
            target = package if node.level == 1 else node.module if node.level == 2 else None
        else:
            target = node.module if node.level == 1 else None
        if target is not None:
            for a in node.names:
                out[a.asname or a.name] = (target, a.name)
    return out


def _class_bases(tree: ast.Module) -> dict[str, list[str]]:
    return {node.name: [b.id for b in node.bases if isinstance(b, ast.Name)]
            for node in tree.body if isinstance(node, ast.ClassDef)}


def scan() -> dict[str, list[str]]:
    """ioctl name -> sorted ``module.Class.method`` / ``module.function`` names that wrap it."""
    sys.path.insert(0, str(ROOT))
    try:
        from pykvm.uapi.ioctls import IOCTLS
    finally:
        sys.path.pop(0)
    ioctls = set(IOCTLS)
    scanned = []
    bases: dict[tuple[str, str], list[str]] = {}   # (module, class) -> base class names
    files = [(p.stem, p, "") for p in sorted(PACKAGE.glob("*.py"))]
    for pkg in PACKAGES:
        files += [(pkg, p, pkg) for p in sorted((PACKAGE / pkg).glob("*.py"))]
    for module, path, pkg in files:
        if (path.stem.startswith("_") and path.stem != "__init__") or module in SKIP_MODULES:
            continue
        tree = ast.parse(path.read_text(), str(path))
        sc = _Scanner(module, ioctls, _module_aliases(tree, ioctls))
        sc.visit(tree)
        scanned.append((module, sc, _imports(tree, pkg)))
        for cls, bs in _class_bases(tree).items():
            bases[(module, cls)] = bs
    effective: dict[tuple[str, str], set[str]] = {}
    for module, sc, _ in scanned:
        for q, u in sc.uses.items():
            effective[(module, q)] = set(u)
    # Credit a callee's ioctls to its callers: private helpers of the same scope
    # (``self._helper()``, ``_helper()``), and public functions imported from
    # another scanned module (``from .stats import open_stats``), transitively.
    changed = True
    while changed:
        changed = False
        for module, sc, imports in scanned:
            for q, calls in sc.calls.items():
                scope = sc.owner[q]
                mine = effective[(module, q)]
                before = len(mine)
                for name in calls:
                    for cand in ((f"{scope}.{name}" if scope else name), name):
                        if (module, cand) in effective and cand != q and not _is_public(name):
                            mine |= effective[(module, cand)]
                    if name in imports and _is_public(imports[name][1]):
                        mine |= effective.get(imports[name], set())
                changed |= len(mine) != before
    # Mixins: credit each inherited method to the inheriting class (by class name).
    where = {cls: module for (module, cls) in bases}
    mixins = {b for bs in bases.values() for b in bs if b in where}

    def _mro(module: str, cls: str) -> list[tuple[str, str]]:
        out = [(module, cls)]
        for b in bases.get((module, cls), []):
            if b in where:
                out += [x for x in _mro(where[b], b) if x not in out]
        return out

    for (module, cls) in list(bases):
        if cls in mixins:
            continue
        for (bmod, bcls) in _mro(module, cls)[1:]:
            for (m, q), used in list(effective.items()):
                if m == bmod and q.startswith(bcls + ".") and q.count(".") == 1:
                    name = q.split(".", 1)[1]
                    own = (module, f"{cls}.{name}")
                    if own not in effective:
                        effective[own] = set(used)
    wrappers: dict[str, set[str]] = {name: set() for name in IOCTLS}
    for (module, q), used in effective.items():
        if q.split(".")[0] in mixins:
            continue
        if used and all(_is_public(part) for part in q.split(".")):
            for name in used:
                wrappers[name].add(f"{module}.{q}")
    order = {"system": 0, "vm": 1, "vcpu": 2}
    return {name: sorted(ws, key=lambda w: (order.get(w.split(".")[0], 9), w)) for name, ws in wrappers.items()}


def generate() -> str:
    """The Markdown text of docs/api-coverage.md."""
    sys.path.insert(0, str(ROOT))
    try:
        from pykvm.uapi.ioctls import IOCTLS
    finally:
        sys.path.pop(0)
    sections = _sections()
    x86 = {n: v for n, v in IOCTLS.items()
           if not sections.get(n, "").startswith(OTHER_ARCH_SECTION)}
    wrapped = scan()
    n_wrapped = sum(1 for n in x86 if wrapped[n])
    kernel = re.search(r"^Kernel: Linux (\S+)", (PACKAGE / "uapi" / "ioctls.py").read_text(), re.M)
    lines = [
        "# KVM ioctl coverage",
        "",
        "<!-- Generated by tools/gen_coverage.py from the code; do not edit by hand.",
        "     Regenerate with: python tools/gen_coverage.py -->",
        "",
        f"pykvm knows every x86-64 KVM ioctl of Linux {kernel.group(1) if kernel else '?'}: "
        f"**{len(x86)}** (`pykvm.uapi.IOCTLS`, generated from the kernel's headers by "
        f"`tools/gen_uapi.py`); **{n_wrapped}** have a wrapper.",
        f"`IOCTLS` also holds the {len(IOCTLS) - len(x86)} requests that `linux/kvm.h` defines "
        "for other architectures; they are not listed here.",
        "A wrapper is a public function or method whose code issues the request",
        "(directly or through a private helper of its module).",
        "",
    ]
    current = None
    for name, number in x86.items():
        section = sections.get(name, "other")
        if section != current:
            current = section
            title = section if section[1:2].isupper() else section[:1].upper() + section[1:]
            lines += ["", f"## {title}", "",
                      "| ioctl | request | wrapped by |", "| --- | --- | --- |"]
        ws = wrapped[name]
        cell = ", ".join(f"`{w}`" for w in ws) if ws else "—" + (f" ({NOTES[name]})" if name in NOTES else "")
        lines.append(f"| `{name}` | `{number:#010x}` | {cell} |")
    lines += ["", "## Added for x86 after Linux 6.19", "",
              "No new x86 ioctl; new commands, exits, attributes and layouts:", "",
              "| name | what | in pykvm |", "| --- | --- | --- |"]
    lines += [f"| `{n}` | {what} | {where} |" for n, what, where in NEWEST]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if docs/api-coverage.md is stale")
    args = ap.parse_args(argv)
    text = generate()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC.relative_to(ROOT)} is stale: run python tools/gen_coverage.py", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__: tuple[str, ...] = ("generate", "main", "scan")
