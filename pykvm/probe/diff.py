"""Compare two probe reports (JSON documents from ``pykvm probe --json``).

The central question is *can a guest whose CPUID was set up from host A's
supported CPUID run on host B?*  It can if every feature bit A offers is
also offered by B (bits that mirror guest state, such as OSXSAVE, do not
count), B supports every XSAVE component A does, and B has at least as many
physical address bits.  The comparison works on the raw CPUID registers
in the JSON, so it does not depend on pykvm knowing a bit's name.

Besides that: capabilities (present on one side only, or different values),
limits, module parameters, MSR lists and feature-MSR values, and the names of
binary statistics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from . import cpuid as C
from .model import SCHEMA

__all__ = ["load", "diff", "Diff", "CpuidCompat", "ReportError", "render_diff"]

_W = 100


class ReportError(ValueError):
    """A file is not a readable probe report."""


def load(path: str) -> Dict[str, Any]:
    """Read a probe JSON file; raise :class:`ReportError` with a clear message if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise ReportError(f"{path}: cannot read: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not JSON: {e}") from None
    check(doc, path)
    return doc


def check(doc: Any, what: str = "report") -> None:
    """Raise :class:`ReportError` unless *doc* looks like a probe report."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ReportError(f"{what}: not a pykvm probe report (no \"schema\": \"{SCHEMA}\"; "
                          "make one with 'pykvm probe --json > FILE')")
    v = doc.get("schema_version")
    if not isinstance(v, int) or v < 1:
        raise ReportError(f"{what}: bad schema_version {v!r}")


def _entries(doc: Dict[str, Any], key: str) -> Optional[List[C.CpuidEntry]]:
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
    ok: Optional[bool] = None
    reason: str = ""
    missing: List[str] = field(default_factory=list)             #: offered on src, not on dst
    emulated_on_dst: List[str] = field(default_factory=list)     #: of those, dst emulates (slowly)
    missing_xsave: List[str] = field(default_factory=list)
    phys_addr_bits: Tuple[int, int] = (0, 0)
    vendor: Tuple[str, str] = ("", "")
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"src": self.src, "dst": self.dst, "ok": self.ok, "reason": self.reason,
                "missing": self.missing, "emulated_on_dst": self.emulated_on_dst,
                "missing_xsave": self.missing_xsave,
                "phys_addr_bits": list(self.phys_addr_bits), "vendor": list(self.vendor),
                "warnings": self.warnings}


def cpuid_compat(a: Dict[str, Any], b: Dict[str, Any], an: str = "A", bn: str = "B") -> CpuidCompat:
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
            if miss >> bit & 1 and reg + (bit,) not in C.DYNAMIC_BITS:
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


def _present_caps(doc: Dict[str, Any]) -> Dict[int, Dict[str, Any]]:
    out = {}
    for c in doc.get("capabilities") or []:
        if c.get("system") or c.get("vm"):
            out[int(c["number"])] = c
    return out


def _cap_label(c: Dict[str, Any]) -> str:
    return (c.get("name") or f"KVM_CAP_{c.get('number')}?") + f" ({c.get('number')})"


def _dict_diff(a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]]) -> List[Tuple[str, Any, Any]]:
    a, b = a or {}, b or {}
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@dataclass
class Diff:
    """Everything that differs between two reports A and B."""

    a_label: str
    b_label: str
    usable: Tuple[bool, bool]
    a_on_b: CpuidCompat
    b_on_a: CpuidCompat
    caps_only_a: List[str] = field(default_factory=list)
    caps_only_b: List[str] = field(default_factory=list)
    caps_changed: List[Tuple[str, Dict[str, Any], Dict[str, Any]]] = field(default_factory=list)
    limits: List[Tuple[str, Any, Any]] = field(default_factory=list)
    modules: List[Tuple[str, Any, Any]] = field(default_factory=list)
    msrs_only_a: List[str] = field(default_factory=list)
    msrs_only_b: List[str] = field(default_factory=list)
    feature_msrs: List[Tuple[str, Any, Any]] = field(default_factory=list)
    stats: Dict[str, Tuple[List[str], List[str]]] = field(default_factory=dict)
    host: List[Tuple[str, Any, Any]] = field(default_factory=list)
    #: why capabilities, limits, MSRs and stats were not compared ("" if they were)
    not_compared: str = ""

    @property
    def identical(self) -> bool:
        """True if nothing compared differs (host names and times are not compared)."""
        return (self.usable[0] == self.usable[1] and not self.a_on_b.missing
                and not self.b_on_a.missing and not self.a_on_b.missing_xsave
                and not self.b_on_a.missing_xsave
                and self.a_on_b.phys_addr_bits[0] == self.a_on_b.phys_addr_bits[1]
                and not (self.caps_only_a or self.caps_only_b or self.caps_changed or self.limits
                         or self.modules or self.msrs_only_a or self.msrs_only_b
                         or self.feature_msrs or any(x or y for x, y in self.stats.values())))

    def to_dict(self) -> Dict[str, Any]:
        """JSON form of the diff (``pykvm diff --json``)."""
        def triples(t):
            return [{"key": k, "a": x, "b": y} for k, x, y in t]

        return {
            "a": self.a_label, "b": self.b_label, "identical": self.identical,
            "usable": {"a": self.usable[0], "b": self.usable[1]},
            "cpuid_a_on_b": self.a_on_b.to_dict(), "cpuid_b_on_a": self.b_on_a.to_dict(),
            "capabilities": {"only_a": self.caps_only_a, "only_b": self.caps_only_b,
                             "changed": [{"key": k, "a": x, "b": y} for k, x, y in self.caps_changed]},
            "limits": triples(self.limits), "modules": triples(self.modules),
            "msrs": {"only_a": self.msrs_only_a, "only_b": self.msrs_only_b,
                     "feature_values": triples(self.feature_msrs)},
            "stats": {k: {"only_a": v[0], "only_b": v[1]} for k, v in self.stats.items()},
            "host": triples(self.host), "not_compared": self.not_compared or None,
        }


def _label(doc: Dict[str, Any], name: str) -> str:
    h = doc.get("host") or {}
    return f"{name} ({h.get('hostname', '?')}, Linux {h.get('kernel_release', '?')}, " \
           f"{doc.get('vendor_module') or 'no KVM module'}, {doc.get('generated_at', '?')})"


def _msr_names(doc: Dict[str, Any], key: str) -> Dict[int, Dict[str, Any]]:
    m = doc.get("msrs") or {}
    return {int(x["index"]): x for x in m.get(key) or []}


def _msr_label(x: Dict[str, Any]) -> str:
    return f"{int(x['index']):#x} {x.get('name') or '?'}"


def diff(a: Dict[str, Any], b: Dict[str, Any], a_name: str = "A", b_name: str = "B") -> Diff:
    """Compare two report documents (``ProbeReport.to_dict()`` or loaded JSON)."""
    check(a, a_name)
    check(b, b_name)
    d = Diff(a_label=_label(a, a_name), b_label=_label(b, b_name),
             usable=(bool(a.get("usable")), bool(b.get("usable"))),
             a_on_b=cpuid_compat(a, b, "A", "B"), b_on_a=cpuid_compat(b, a, "B", "A"))
    ma = {m["name"]: m for m in a.get("modules") or []}
    mb = {m["name"]: m for m in b.get("modules") or []}
    for name in sorted(set(ma) | set(mb)):
        if name not in mb:
            d.modules.append((name, "loaded", None))
        elif name not in ma:
            d.modules.append((name, None, "loaded"))
        else:
            for k, x, y in _dict_diff(ma[name].get("parameters"), mb[name].get("parameters")):
                d.modules.append((f"{name}.{k}", x, y))
    ha, hb = dict(a.get("host") or {}), dict(b.get("host") or {})
    for k in ("hostname", "python", "kernel_version"):
        ha.pop(k, None)
        hb.pop(k, None)
    d.host = _dict_diff(ha, hb)
    if not (d.usable[0] and d.usable[1]):
        side = " and ".join(n for n, u in zip(("A", "B"), d.usable) if not u)
        d.not_compared = f"KVM was not usable on {side}"
        return d
    ca, cb = _present_caps(a), _present_caps(b)
    d.caps_only_a = [_cap_label(ca[n]) for n in sorted(set(ca) - set(cb))]
    d.caps_only_b = [_cap_label(cb[n]) for n in sorted(set(cb) - set(ca))]
    for n in sorted(set(ca) & set(cb)):
        va = {"system": ca[n].get("system"), "vm": ca[n].get("vm")}
        vb = {"system": cb[n].get("system"), "vm": cb[n].get("vm")}
        if va != vb:
            d.caps_changed.append((_cap_label(ca[n]), va, vb))
    d.limits = _dict_diff(a.get("limits"), b.get("limits"))
    ia, ib = _msr_names(a, "index_list"), _msr_names(b, "index_list")
    d.msrs_only_a = [_msr_label(ia[i]) for i in sorted(set(ia) - set(ib))]
    d.msrs_only_b = [_msr_label(ib[i]) for i in sorted(set(ib) - set(ia))]
    fa, fb = _msr_names(a, "feature_msrs"), _msr_names(b, "feature_msrs")
    for i in sorted(set(fa) | set(fb)):
        x = fa.get(i, {}).get("value") if i in fa else "absent"
        y = fb.get(i, {}).get("value") if i in fb else "absent"
        if x != y:
            d.feature_msrs.append((_msr_label(fa.get(i) or fb[i]), x, y))
    for kind in ("vm", "vcpu"):
        sa = ((a.get("stats") or {}).get(kind) or {}).get("descriptors") or []
        sb = ((b.get("stats") or {}).get(kind) or {}).get("descriptors") or []
        na, nb = [x["name"] for x in sa], [x["name"] for x in sb]
        d.stats[kind] = ([n for n in na if n not in nb], [n for n in nb if n not in na])
    return d


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10:
        return f"{v} ({v:#x})"
    return str(v)


def _wrapped(words: List[str], indent: str = "    ") -> List[str]:
    import textwrap

    if not words:
        return [indent + "(none)"]
    return textwrap.wrap(" ".join(words), _W, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False)


def _compat_lines(c: CpuidCompat) -> List[str]:
    out = ["", f"== CPUID: can a guest set up on {c.src} run on {c.dst}? =="]
    if c.ok is None:
        return out + [f"  unknown: {c.reason}"]
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


def render_diff(d: Diff) -> str:
    """The diff as text for a person."""
    out = ["pykvm diff", f"  A = {d.a_label}", f"  B = {d.b_label}",
           f"  KVM usable: A {'yes' if d.usable[0] else 'NO'}, B {'yes' if d.usable[1] else 'NO'}",
           "  result: " + ("no differences" if d.identical else "the hosts differ")]
    out += _compat_lines(d.a_on_b)
    out += _compat_lines(d.b_on_a)
    if d.not_compared:
        for title, rows in (("Modules", d.modules), ("Host", d.host)):
            out += ["", f"== {title} =="]
            out += [f"  {k}: A {_fmt(x)}, B {_fmt(y)}" for k, x, y in rows] or ["  (same)"]
        out += ["", f"(capabilities, limits, MSRs and statistics not compared: {d.not_compared})"]
        return "\n".join(out) + "\n"
    out += ["", "== Capabilities =="]
    out.append(f"  present only on A ({len(d.caps_only_a)}):")
    out += _wrapped(d.caps_only_a)
    out.append(f"  present only on B ({len(d.caps_only_b)}):")
    out += _wrapped(d.caps_only_b)
    out.append(f"  different values ({len(d.caps_changed)}):")
    if not d.caps_changed:
        out.append("    (none)")
    for k, x, y in d.caps_changed:
        out.append(f"    {k}: A system {_fmt(x['system'])} vm {_fmt(x['vm'])}; "
                   f"B system {_fmt(y['system'])} vm {_fmt(y['vm'])}")
    for title, rows in (("Limits", d.limits), ("Modules", d.modules), ("Host", d.host)):
        out += ["", f"== {title} =="]
        out += [f"  {k}: A {_fmt(x)}, B {_fmt(y)}" for k, x, y in rows] or ["  (same)"]
    out += ["", "== MSRs =="]
    out.append(f"  index list only on A ({len(d.msrs_only_a)}): {' '.join(d.msrs_only_a) or '-'}")
    out.append(f"  index list only on B ({len(d.msrs_only_b)}): {' '.join(d.msrs_only_b) or '-'}")
    for k, x, y in d.feature_msrs:
        out.append(f"  feature MSR {k}: A {_fmt(x)}, B {_fmt(y)}")
    out += ["", "== Statistics =="]
    for kind, (oa, ob) in d.stats.items():
        out.append(f"  {kind}: only on A: {' '.join(oa) or '-'}; only on B: {' '.join(ob) or '-'}")
    return "\n".join(out) + "\n"
