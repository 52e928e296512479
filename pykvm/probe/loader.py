"""Reading a probe report from a file that anyone may have written.

A JSON report given to ``pykvm diff`` is untrusted input.  :func:`load`
bounds the work before trusting anything in it:

* at most :data:`MAX_REPORT_BYTES` are read (a real report is under 100 KB;
  ``/dev/zero`` or a 10 GB file is refused after reading the cap, never
  loaded whole);
* the nesting depth is measured on the text before the JSON parser sees it
  (at most :data:`MAX_DEPTH` levels: a real report has five), so a deeply
  nested file cannot reach the parser's recursion;
* duplicate keys, ``NaN``/``Infinity`` and integers of more digits than
  Python converts are refused;
* the header fields and every field the comparison interprets have their
  exact JSON types (:func:`check`); the schema version must be one this
  pykvm reads.

Every problem ends in :class:`ReportError` (a :class:`pykvm.command.UsageError`:
``pykvm diff`` prints it as one line and exits 2), naming the file and the
field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ..command import UsageError
from .model import SCHEMA, SCHEMA_VERSION

__all__ = ["MAX_DEPTH", "MAX_REPORT_BYTES", "ReportError", "check", "load", "parse"]

#: the largest report file :func:`load` reads (a real one is under 100 KB)
MAX_REPORT_BYTES = 1 << 20
#: the deepest nesting of arrays and objects accepted (a real report has 5 levels)
MAX_DEPTH = 32

_U32 = (1 << 32) - 1

# A JSON string, written so that the regular expression engine never backtracks.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_PARENS = bytes.maketrans(b"[{]}", b"(())")


class ReportError(UsageError, ValueError):
    """A file is not a readable probe report (the message names the file and the field)."""


def _kind(v: Any) -> str:
    """The JSON name of *v*'s type, for messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def load(path: str) -> dict[str, Any]:
    """Read the probe report at *path*; raise :class:`ReportError` unless it is one.

    Reads at most ``MAX_REPORT_BYTES + 1`` bytes whatever the file is (a
    pipe, ``/dev/zero``, a huge file), so memory and time stay bounded.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_REPORT_BYTES + 1)
    except IsADirectoryError:
        raise ReportError(f"{path}: is a directory, not a probe report") from None
    except OSError as e:
        raise ReportError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > MAX_REPORT_BYTES:
        raise ReportError(f"{path}: larger than {MAX_REPORT_BYTES} bytes: not a probe report "
                          "(make one with 'pykvm probe --json > FILE')")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ReportError(f"{path}: not UTF-8 text (byte {e.start}): not a probe report") from None
    doc = parse(text, path)
    check(doc, path)
    report: dict[str, Any] = doc
    return report


def nesting_depth(text: str, limit: int = MAX_DEPTH) -> int:
    """The nesting depth of ``[``/``{`` in JSON *text* (brackets in strings do not count).

    Returns a number above *limit* as soon as the depth exceeds it, also for
    openers that are never closed (the parser would recurse on them just the
    same).  Each of at most ``limit + 1`` passes deletes the innermost bracket
    pairs with one regular-expression substitution: linear in the text per pass.
    """
    outside = _STRING.sub("", text).encode("utf-8", "surrogatepass")
    brackets = outside.translate(_PARENS, _NOT_BRACKETS)
    if b"(" * (limit + 1) in brackets:        # the common attack: one long run of openers
        return limit + 1
    depth = 0
    while b"(" in brackets:
        if depth > limit:
            return depth
        brackets = brackets.replace(b"()", b"")
        depth += 1
        # what is left without an opener can only be stray closers: no recursion there
    return depth


def _pairs(what: str):  # type: ignore[no-untyped-def]
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: dict[str, None] = {}
            dup = next(k for k, _ in pairs if k in seen or seen.setdefault(k, None))
            raise ReportError(f"{what}: duplicate key {dup!r} in one JSON object")
        return out
    return hook


def _constant(what: str):  # type: ignore[no-untyped-def]
    def hook(name: str) -> Any:
        raise ReportError(f"{what}: {name} is not a JSON number")
    return hook


def parse(text: str, what: str = "report") -> Any:
    """Parse JSON *text* with the bounds above; :class:`ReportError` names *what* on failure."""
    if len(text) > MAX_REPORT_BYTES:
        raise ReportError(f"{what}: larger than {MAX_REPORT_BYTES} characters: not a probe report")
    depth = nesting_depth(text)
    if depth > MAX_DEPTH:
        outside = _STRING.sub("", text)
        if sum(map(outside.count, "[{")) != sum(map(outside.count, "]}")):
            raise ReportError(f"{what}: not JSON: brackets do not balance")
        raise ReportError(f"{what}: JSON nested deeper than {MAX_DEPTH} levels: not a probe report")
    try:
        return json.loads(text, object_pairs_hook=_pairs(what), parse_constant=_constant(what))
    except ReportError:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError, too many digits for an int
        raise ReportError(f"{what}: not JSON: {e}") from None


# Top-level fields: name -> (allowed JSON types, required).  Every field here is typed exactly;
# fields not listed are compared as they are but interpreted by nothing.
_TOP: Mapping[str, tuple[tuple[type, ...], bool]] = {
    "schema": ((str,), True),
    "schema_version": ((int,), True),
    "usable": ((bool,), True),
    "pykvm_version": ((str,), False),
    "generated_at": ((str,), False),
    "access": ((dict,), False),
    "host": ((dict,), False),
    "modules": ((list,), False),
    "vendor_module": ((str, type(None)), False),
    "capability_range": ((list,), False),
    "capabilities": ((list,), False),
    "vm": ((dict,), False),
    "limits": ((dict, type(None)), False),
    "cpuid": ((dict, type(None)), False),
    "msrs": ((dict, type(None)), False),
    "stats": ((dict,), False),
    "bench": ((list, type(None)), False),
    "errors": ((list,), False),
}
_CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


def _type_ok(v: Any, types: tuple[type, ...]) -> bool:
    if isinstance(v, bool):
        return bool in types
    return isinstance(v, types)


def _field(what: str, path: str, v: Any, expected: str) -> ReportError:
    return ReportError(f"{what}: field {path!r}: expected {expected}, got {_kind(v)}")


def _uint(what: str, path: str, v: Any, top: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= top:
        raise _field(what, path, v, f"an integer in 0..{top:#x}")


def check(doc: Any, what: str = "report") -> None:
    """Raise :class:`ReportError` unless *doc* is a probe report this pykvm reads.

    Checks the schema name and version, the JSON type of every top-level field,
    the host labels, and each CPUID entry (the comparison decodes those
    registers bit by bit).
    """
    if not isinstance(doc, dict):
        raise ReportError(f"{what}: not a pykvm probe report (the JSON is {_kind(doc)}, not an object; "
                          "make one with 'pykvm probe --json > FILE')")
    if doc.get("schema") != SCHEMA:
        raise ReportError(f"{what}: not a pykvm probe report (field 'schema' is not \"{SCHEMA}\"; "
                          "make one with 'pykvm probe --json > FILE')")
    version = doc.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _field(what, "schema_version", version, "an integer")
    if version != SCHEMA_VERSION:
        raise ReportError(f"{what}: unsupported schema_version {version} (this pykvm reads "
                          f"{SCHEMA_VERSION}; compare reports written by the same pykvm version)")
    for name, (types, required) in _TOP.items():
        if name not in doc:
            if required:
                raise ReportError(f"{what}: field {name!r} is missing")
            continue
        v = doc[name]
        if not _type_ok(v, types):
            want = " or ".join(_kind(t()) if t is not type(None) else "null" for t in types)
            raise _field(what, name, v, want)
    for name, v in (doc.get("host") or {}).items():
        if not isinstance(v, (str, int, float, bool, type(None))):
            raise _field(what, f"host.{name}", v, "a string, number, boolean or null")
    _check_cpuid(doc.get("cpuid"), what)


def _check_cpuid(cpuid: dict[str, Any] | None, what: str) -> None:
    if cpuid is None:
        return
    for key in ("supported", "emulated"):
        entries = cpuid.get(key)
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise _field(what, f"cpuid.{key}", entries, "an array of CPUID entries")
        for i, e in enumerate(entries):
            path = f"cpuid.{key}[{i}]"
            if not isinstance(e, dict):
                raise _field(what, path, e, "an object")
            for f in _CPUID_FIELDS:
                if f not in e:
                    if f == "flags":
                        continue
                    raise ReportError(f"{what}: field {path}.{f} is missing")
                _uint(what, f"{path}.{f}", e[f], _U32)
