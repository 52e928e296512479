"""Compare two probe reports (JSON documents from ``pykvm probe --json``).

Two parts:

* **CPUID compatibility**, both ways: *can a guest whose CPUID was set up
  from host A's supported CPUID run on host B?*  It can if every feature bit
  A offers is also offered by B (bits that mirror guest state, such as
  OSXSAVE, do not count), B supports every XSAVE component A does, and B has
  at least as many physical address bits.  This works on the raw CPUID
  registers, so it does not depend on pykvm knowing a bit's name.
* **Every field**, generically: the two documents are walked together and
  each difference is reported with a readable path
  (``capabilities[KVM_CAP_NR_VCPUS].system``, ``cpuid.features[avx2]``,
  ``cpuid.supported[0x7.0].ebx``, ``msrs.feature_msrs[0x10a ...].value``).
  Arrays of objects are matched by their key field (name, number, index,
  CPUID function.index), arrays of unique strings or numbers as sets, other
  arrays element by element.  Nothing in the report can change unnoticed.

Fields that differ on every run (time of the report, host name, who ran it,
process ids, timings: :data:`NOT_COUNTED`) are listed apart and do not make
the hosts "differ" (exit status 1).  Reading files is :mod:`.loader`'s job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import cpuid as C
from .loader import ReportError, check, load

__all__ = [
    "NOT_COUNTED",
    "CpuidCompat",
    "Diff",
    "Difference",
    "ReportError",
    "cpuid_compat",
    "diff",
    "load",
    "render_diff",
]

_W = 100

#: paths (and their sub-paths) that change from run to run on one host: shown, not counted
NOT_COUNTED: tuple[str, ...] = (
    "generated_at", "pykvm_version", "host.hostname", "host.python", "host.kernel_version",
    "access.user", "access.uid", "access.groups", "stats.vm.id", "stats.vcpu.id", "bench",
)

#: key fields of arrays of objects, by path (other arrays of objects: the first of
#: name/number/index/id that every element has, with unique values)
_LIST_KEYS: dict[str, tuple[str, ...]] = {
    "modules": ("name",),
    "capabilities": ("number",),
    "cpuid.supported": ("function", "index"),
    "cpuid.emulated": ("function", "index"),
    "msrs.index_list": ("index",),
    "msrs.feature_msrs": ("index",),
    "stats.vm.descriptors": ("name",),
    "stats.vcpu.descriptors": ("name",),
    "bench": ("name",),
}
_AUTO_KEYS = ("name", "number", "index", "id")
_ABSENT = object()


def _entries(doc: dict[str, Any], key: str) -> list[C.CpuidEntry] | None:
    cp = doc.get("cpuid")
    if not isinstance(cp, dict) or not isinstance(cp.get(key), list):
        return None
    out = []
    for e in cp[key]:
        try:
            out.append(C.CpuidEntry(int(e["function"]), int(e["index"]), int(e.get("flags", 0)),
                                    int(e["eax"]), int(e["ebx"]), int(e["ecx"]), int(e["edx"])))
        except (KeyError, TypeError, ValueError):
            continue
    return out


@dataclass
class CpuidCompat:
    """Can a guest CPUID taken from ``src`` run on ``dst``?  (``ok`` None: unknown.)"""

    src: str
    dst: str
    ok: bool | None = None
    reason: str = ""
    missing: list[str] = field(default_factory=list)             #: offered on src, not on dst
    emulated_on_dst: list[str] = field(default_factory=list)     #: of those, dst emulates (slowly)
    missing_xsave: list[str] = field(default_factory=list)
    phys_addr_bits: tuple[int, int] = (0, 0)
    vendor: tuple[str, str] = ("", "")
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"src": self.src, "dst": self.dst, "ok": self.ok, "reason": self.reason,
                "missing": self.missing, "emulated_on_dst": self.emulated_on_dst,
                "missing_xsave": self.missing_xsave,
                "phys_addr_bits": list(self.phys_addr_bits), "vendor": list(self.vendor),
                "warnings": self.warnings}


def cpuid_compat(a: dict[str, Any], b: dict[str, Any], an: str = "A", bn: str = "B") -> CpuidCompat:
    """Whether a guest CPUID from *a*'s supported set can run on *b*."""
    r = CpuidCompat(src=an, dst=bn)
    sa, sb = _entries(a, "supported"), _entries(b, "supported")
    if sa is None or sb is None:
        r.reason = f"no CPUID in {an if sa is None else bn} (KVM was not usable there)"
        return r
    eb = _entries(b, "emulated") or []
    ba, bb, be = C.feature_bits(sa), C.feature_bits(sb), C.feature_bits(eb)
    for reg, va in ba.items():
        miss = va & ~bb.get(reg, 0)
        for bit in range(32):
            if miss >> bit & 1 and (*reg, bit) not in C.DYNAMIC_BITS:
                name = C.bit_name(reg, bit)
                if name in r.missing:
                    continue
                r.missing.append(name)
                if be.get(reg, 0) >> bit & 1:
                    r.emulated_on_dst.append(name)
    ma, mb = C.entry_map(sa), C.entry_map(sb)
    xa, xb = C.xsave_components(ma), C.xsave_components(mb)
    r.missing_xsave = C.component_names((xa[0] | xa[1]) & ~(xb[0] | xb[1]))
    r.phys_addr_bits = (C.address_bits(ma)[0], C.address_bits(mb)[0])
    r.vendor = (C.vendor(ma), C.vendor(mb))
    if r.vendor[0] != r.vendor[1]:
        r.warnings.append(f"CPU vendors differ ({r.vendor[0]} vs {r.vendor[1]}): guests that "
                          "check the vendor (or use SYSCALL/SYSENTER in compat mode) may behave "
                          "differently")
    fa, fb = C.family_model_stepping(ma), C.family_model_stepping(mb)
    if fa != fb:
        r.warnings.append(f"family/model/stepping differ ({fa[0]:#x}/{fa[1]:#x}/{fa[2]} vs "
                          f"{fb[0]:#x}/{fb[1]:#x}/{fb[2]})")
    problems = []
    hard_missing = [m for m in r.missing if m not in r.emulated_on_dst]
    if hard_missing:
        problems.append(f"{len(hard_missing)} feature(s) missing on {bn}")
    if r.emulated_on_dst:
        r.warnings.append(f"{len(r.emulated_on_dst)} feature(s) only emulated on {bn} (slow): "
                          + " ".join(r.emulated_on_dst))
    if r.missing_xsave:
        problems.append(f"XSAVE component(s) missing on {bn}: {' '.join(r.missing_xsave)}")
    if r.phys_addr_bits[1] and r.phys_addr_bits[0] > r.phys_addr_bits[1]:
        problems.append(f"{bn} has {r.phys_addr_bits[1]} physical address bits, {an} "
                        f"{r.phys_addr_bits[0]}")
    r.ok = not problems
    r.reason = "; ".join(problems) if problems else "every feature offered on " + an + \
        " is offered on " + bn
    return r


@dataclass(frozen=True)
class Difference:
    """One place where the reports differ.  ``a``/``b`` are None with ``in_a``/``in_b`` False
    when the place exists on one side only."""

    path: str
    a: Any
    b: Any
    in_a: bool = True
    in_b: bool = True
    counted: bool = True
    note: str = ""                      #: e.g. the CPUID flags behind a changed register

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``pykvm diff --json``)."""
        return {"path": self.path, "a": self.a, "b": self.b, "in_a": self.in_a, "in_b": self.in_b,
                "counted": self.counted, "note": self.note or None}


def _counted(path: str) -> bool:
    return not any(path == p or path.startswith(p + ".") or path.startswith(p + "[") for p in NOT_COUNTED)


def _same(x: Any, y: Any) -> bool:
    """Equal as JSON values: ``true`` is not ``1``, ``1`` is not ``1.0``."""
    return type(x) is type(y) and x == y


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _key_text(path: str, fields: tuple[str, ...], elem: dict[str, Any]) -> str:
    vals = [elem.get(f) for f in fields]
    if path.startswith("cpuid."):
        return ".".join(f"{v:#x}" if i == 0 and isinstance(v, int) else str(v) for i, v in enumerate(vals))
    text = ".".join(f"{v:#x}" if isinstance(v, int) and path.startswith("msrs.") else str(v) for v in vals)
    name = elem.get("name")
    if "name" not in fields and isinstance(name, str) and name:
        return f"{name}" if path == "capabilities" else f"{text} {name}"
    return text


def _keyed(path: str, items: Sequence[Any]) -> tuple[tuple[str, ...], dict[Any, dict[str, Any]]] | None:
    """*items* indexed by their key fields, or None if they have no usable unique key."""
    if not all(isinstance(e, dict) for e in items):
        return None
    candidates = [_LIST_KEYS[path]] if path in _LIST_KEYS else [(k,) for k in _AUTO_KEYS]
    for fields in candidates:
        index: dict[Any, dict[str, Any]] = {}
        for e in items:
            key = tuple(e.get(f, _ABSENT) for f in fields)
            if any(k is _ABSENT or not _scalar(k) or isinstance(k, float) for k in key) or key in index:
                break
            index[key] = e
        else:
            return fields, index
    return None


def _walk(path: str, x: Any, y: Any) -> Iterator[Difference]:
    """Every difference between the JSON values *x* (A) and *y* (B) at *path*."""
    if isinstance(x, dict) and isinstance(y, dict):
        for k in sorted(set(x) | set(y), key=str):
            p = _join(path, k)
            if k not in y:
                yield Difference(p, x[k], None, in_b=False, counted=_counted(p))
            elif k not in x:
                yield Difference(p, None, y[k], in_a=False, counted=_counted(p))
            else:
                yield from _walk(p, x[k], y[k])
        return
    if isinstance(x, list) and isinstance(y, list):
        yield from _walk_list(path, x, y)
        return
    if not _same(x, y):
        if _cpuid_apic_id_only(path, x, y):
            yield Difference(path, x, y, counted=False, note="APIC ID of the CPU the probe ran on")
        else:
            yield Difference(path, x, y, counted=_counted(path), note=_cpuid_note(path, x, y))


def _tag(v: Any) -> tuple[str, Any] | None:
    """*v* as a set member that keeps JSON types apart (``true`` is not ``1``); None if unsuitable."""
    if isinstance(v, (str, int)) and not isinstance(v, float):
        return (type(v).__name__, v)
    return None


def _walk_list(path: str, x: list[Any], y: list[Any]) -> Iterator[Difference]:
    if len(x) == len(y) and x == y and json.dumps(x) == json.dumps(y):
        return          # equal, also in JSON types (the text tells true from 1): nothing to walk
    kx, ky = _keyed(path, x), _keyed(path, y)
    if kx is not None and ky is not None and kx[0] == ky[0]:
        fields, ix, iy = kx[0], kx[1], ky[1]
        order = list(ix) + [k for k in iy if k not in ix]
        for key in order:
            elem = ix.get(key) or iy[key]
            p = f"{path}[{_key_text(path, fields, elem)}]"
            if key not in iy:
                yield Difference(p, ix[key], None, in_b=False, counted=_counted(p))
            elif key not in ix:
                yield Difference(p, None, iy[key], in_a=False, counted=_counted(p))
            else:
                yield from _walk(p, ix[key], iy[key])
        return
    tx, ty = [_tag(v) for v in x], [_tag(v) for v in y]
    if (all(t is not None for t in tx + ty) and len(set(tx)) == len(tx) and len(set(ty)) == len(ty)):
        sx, sy = set(tx), set(ty)
        for v, t in zip(x, tx, strict=True):
            if t not in sy:
                p = f"{path}[{v}]"
                yield Difference(p, v, None, in_b=False, counted=_counted(p))
        for v, t in zip(y, ty, strict=True):
            if t not in sx:
                p = f"{path}[{v}]"
                yield Difference(p, None, v, in_a=False, counted=_counted(p))
        return
    for i in range(max(len(x), len(y))):
        p = f"{path}[{i}]"
        if i >= len(y):
            yield Difference(p, x[i], None, in_b=False, counted=_counted(p))
        elif i >= len(x):
            yield Difference(p, None, y[i], in_a=False, counted=_counted(p))
        else:
            yield from _walk(p, x[i], y[i])


#: CPUID register bits that name the host CPU the probing thread ran on (they change from run
#: to run on one host): (leaf, register) -> mask
_APIC_ID_BITS: dict[tuple[int, str], int] = {
    (0x1, "ebx"): 0xFF000000,          # initial APIC ID
    (0xB, "edx"): 0xFFFFFFFF,          # x2APIC ID
    (0x1F, "edx"): 0xFFFFFFFF,         # x2APIC ID (V2 extended topology)
    (0x8000001E, "eax"): 0xFFFFFFFF,   # extended APIC ID (AMD)
}


def _cpuid_register(path: str) -> tuple[int, int, str] | None:
    """``(function, index, register)`` of a path ``cpuid.supported[0x7.0].ebx``, else None."""
    if not path.startswith(("cpuid.supported[", "cpuid.emulated[")):
        return None
    head, _, reg = path.rpartition("].")
    if reg not in ("eax", "ebx", "ecx", "edx"):
        return None
    try:
        fn_text, idx_text = head.split("[", 1)[1].split(".")
        return int(fn_text, 16), int(idx_text), reg
    except ValueError:
        return None


def _ints(x: Any, y: Any) -> bool:
    return isinstance(x, int) and isinstance(y, int) and not isinstance(x, bool) and not isinstance(y, bool)


def _cpuid_apic_id_only(path: str, x: Any, y: Any) -> bool:
    """True if CPUID registers *x* and *y* differ only in APIC-ID bits."""
    reg = _cpuid_register(path)
    if reg is None or not _ints(x, y):
        return False
    mask = _APIC_ID_BITS.get((reg[0], reg[2]), 0)
    return bool((int(x) ^ int(y)) & ~mask == 0)


def _cpuid_note(path: str, x: Any, y: Any) -> str:
    """For a CPUID register that changed: the flags only A / only B has."""
    key = _cpuid_register(path)
    if key is None or not _ints(x, y):
        return ""
    if key not in C.FEATURE_REGS:
        return ""
    parts = []
    only_a, only_b = C.decode_mask(key, x & ~y), C.decode_mask(key, y & ~x)
    if only_a:
        parts.append("only A: " + " ".join(only_a))
    if only_b:
        parts.append("only B: " + " ".join(only_b))
    return "; ".join(parts)


@dataclass
class Diff:
    """Everything that differs between two reports A and B."""

    a_label: str
    b_label: str
    usable: tuple[bool, bool]
    a_on_b: CpuidCompat
    b_on_a: CpuidCompat
    #: every difference, counted ones and per-run facts (``counted`` False)
    differences: list[Difference] = field(default_factory=list)

    @property
    def counted(self) -> list[Difference]:
        """The differences that make the hosts differ."""
        return [d for d in self.differences if d.counted]

    @property
    def identical(self) -> bool:
        """True if no field differs except the per-run facts of :data:`NOT_COUNTED`."""
        return not self.counted

    def to_dict(self) -> dict[str, Any]:
        """JSON form of the diff (``pykvm diff --json``)."""
        return {
            "a": self.a_label, "b": self.b_label, "identical": self.identical,
            "usable": {"a": self.usable[0], "b": self.usable[1]},
            "cpuid_a_on_b": self.a_on_b.to_dict(), "cpuid_b_on_a": self.b_on_a.to_dict(),
            "differences": [d.to_dict() for d in self.differences],
        }


def _label(doc: dict[str, Any], name: str) -> str:
    h = doc.get("host") or {}
    return f"{name} ({h.get('hostname', '?')}, Linux {h.get('kernel_release', '?')}, " \
           f"{doc.get('vendor_module') or 'no KVM module'}, {doc.get('generated_at', '?')})"


def diff(a: dict[str, Any], b: dict[str, Any], a_name: str = "A", b_name: str = "B") -> Diff:
    """Compare two report documents (``ProbeReport.to_dict()`` or loaded JSON).

    Raises :class:`ReportError` if either is not a report this pykvm reads.
    """
    check(a, a_name)
    check(b, b_name)
    return Diff(a_label=_label(a, a_name), b_label=_label(b, b_name),
                usable=(a["usable"], b["usable"]),
                a_on_b=cpuid_compat(a, b, "A", "B"), b_on_a=cpuid_compat(b, a, "B", "A"),
                differences=list(_walk("", a, b)))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10:
        return f"{v} ({v:#x})"
    return str(v)


def _wrapped(words: list[str], indent: str = "    ") -> list[str]:
    import textwrap

    if not words:
        return [indent + "(none)"]
    return textwrap.wrap(" ".join(words), _W, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False)


def _compat_lines(c: CpuidCompat) -> list[str]:
    out = ["", f"== CPUID: can a guest set up on {c.src} run on {c.dst}? =="]
    if c.ok is None:
        return [*out, f"  unknown: {c.reason}"]
    out.append(f"  {'YES' if c.ok else 'NO'}: {c.reason}")
    if c.missing:
        emu = f", {len(c.emulated_on_dst)} of them emulated on {c.dst}" if c.emulated_on_dst else ""
        out.append(f"  offered on {c.src}, missing on {c.dst} ({len(c.missing)}{emu}):")
        out += _wrapped(c.missing)
    if c.missing_xsave:
        out.append(f"  XSAVE components missing on {c.dst}: {' '.join(c.missing_xsave)}")
    out.append(f"  physical address bits: {c.src} {c.phys_addr_bits[0]}, {c.dst} {c.phys_addr_bits[1]}")
    for w in c.warnings:
        out.append(f"  warning: {w}")
    return out


def _value(d: Difference, side: str) -> str:
    present = d.in_a if side == "a" else d.in_b
    if not present:
        return "absent"
    v = d.a if side == "a" else d.b
    text = _fmt(v) if _scalar(v) else json.dumps(v, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


def _diff_line(d: Difference) -> str:
    if not d.in_b and _scalar(d.a) and d.path.endswith(f"[{d.a}]"):
        line = f"  {d.path}: only on A"
    elif not d.in_a and _scalar(d.b) and d.path.endswith(f"[{d.b}]"):
        line = f"  {d.path}: only on B"
    else:
        line = f"  {d.path}: A {_value(d, 'a')}, B {_value(d, 'b')}"
    return line + (f"  ({d.note})" if d.note else "")


def render_diff(d: Diff) -> str:
    """The diff as text for a person."""
    counted = d.counted
    out = ["pykvm diff", f"  A = {d.a_label}", f"  B = {d.b_label}",
           f"  KVM usable: A {'yes' if d.usable[0] else 'NO'}, B {'yes' if d.usable[1] else 'NO'}",
           "  result: " + ("no differences" if d.identical else
                           f"the hosts differ ({len(counted)} difference(s))")]
    out += _compat_lines(d.a_on_b)
    out += _compat_lines(d.b_on_a)
    sections: dict[str, list[Difference]] = {}
    for x in counted:
        sections.setdefault(x.path.split(".", 1)[0].split("[", 1)[0], []).append(x)
    out += ["", f"== Differences ({len(counted)}) =="]
    if not counted:
        out.append("  (none)")
    for name, rows in sections.items():
        out.append(f"  -- {name} ({len(rows)})")
        out += [_diff_line(x) for x in rows]
    per_run = [x for x in d.differences if not x.counted]
    if per_run:
        out += ["", f"== Per-run facts, not counted ({len(per_run)}) =="]
        out += [_diff_line(x) for x in per_run]
    return "\n".join(out) + "\n"
