"""Report files given to ``pykvm diff`` are hostile input (issue 12).

Every malformed file ends in exit status 2 with one line ``pykvm diff: FILE: ...``
naming the field, never a traceback; work is bounded by the file size cap and
the nesting check; unknown schema versions are refused.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.probe.cli import diff_main
from pykvm.probe.loader import MAX_DEPTH, MAX_REPORT_BYTES, ReportError, nesting_depth, parse

from .support_reports import report as _doc

pytestmark = pytest.mark.no_kvm_needed


def _run(capsys, path_a, path_b):
    rc = diff_main([str(path_a), str(path_b)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "good.json"
    p.write_text(json.dumps(_doc()))
    return p


def _mutated(**changes):
    doc = _doc()
    for path, value in changes.items():
        node = doc
        *parents, last = path.split("/")
        for k in parents:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return json.dumps(doc)


_DELETE = object()


@pytest.mark.parametrize("text, words", [
    ("", "not JSON"),
    ("{not json", "not JSON"),
    ("[]", "the JSON is an array"),
    ('"pykvm-probe"', "the JSON is a string"),
    ('{"schema": "other"}', "field 'schema'"),
    (_mutated(schema_version=True), "field 'schema_version': expected an integer, got a boolean"),
    (_mutated(schema_version="1"), "field 'schema_version': expected an integer, got a string"),
    (_mutated(schema_version=2), "unsupported schema_version 2"),
    (_mutated(schema_version=0), "unsupported schema_version 0"),
    (_mutated(usable="yes"), "field 'usable': expected a boolean, got a string"),
    (_mutated(usable=_DELETE), "field 'usable' is missing"),
    (_mutated(host=[]), "field 'host': expected an object, got an array"),
    (_mutated(**{"host/hostname": {"x": 1}}), "field 'host.hostname'"),
    (_mutated(generated_at=5), "field 'generated_at': expected a string, got an integer"),
    (_mutated(capabilities={}), "field 'capabilities': expected an array, got an object"),
    (_mutated(cpuid=[]), "field 'cpuid': expected an object or null, got an array"),
    (_mutated(**{"cpuid/supported": {}}), "field 'cpuid.supported'"),
    (_mutated(**{"cpuid/supported/0": 7}), "field 'cpuid.supported[0]': expected an object"),
    (_mutated(**{"cpuid/supported/1/eax": -1}), "field 'cpuid.supported[1].eax': expected an integer in 0..0xffffffff"),
    (_mutated(**{"cpuid/supported/1/eax": 1 << 32}), "cpuid.supported[1].eax"),
    (_mutated(**{"cpuid/supported/1/ebx": "1"}), "cpuid.supported[1].ebx"),
    (_mutated(**{"cpuid/supported/1/ecx": 1.5}), "cpuid.supported[1].ecx"),
    (_mutated(**{"cpuid/supported/1/function": _DELETE}), "cpuid.supported[1].function is missing"),
    ('{"schema": "pykvm-probe", "schema": "pykvm-probe"}', "duplicate key 'schema'"),
    ('{"schema": "pykvm-probe", "schema_version": NaN}', "NaN is not a JSON number"),
    ('{"schema": "pykvm-probe", "schema_version": ' + "9" * 5000 + "}", "not JSON"),
    ("[" * 100_000, "not JSON: brackets do not balance"),
    ("[" * 100_000 + "]" * 100_000, f"nested deeper than {MAX_DEPTH} levels"),
    ('{"a":' * 40 + "1" + "}" * 40, f"nested deeper than {MAX_DEPTH} levels"),
])
def test_malformed_report_is_one_line_exit_2(tmp_path, good, capsys, text, words):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    for a, b in ((bad, good), (good, bad)):
        rc, out, err = _run(capsys, a, b)
        assert rc == 2 and out == ""
        assert err.startswith(f"pykvm diff: {bad}: ") and err.count("\n") == 1, err
        assert words in err, err


def test_binary_directory_missing_and_endless_files(tmp_path, good, capsys):
    (tmp_path / "bin.json").write_bytes(b'{"schema": "\xff\xfe"}')
    cases = {tmp_path / "bin.json": "not UTF-8 text (byte 12)",
             tmp_path: "is a directory",
             tmp_path / "missing.json": "cannot read",
             Path("/dev/zero"): f"larger than {MAX_REPORT_BYTES} bytes"}
    big = tmp_path / "big.json"
    with open(big, "wb") as f:          # sparse: 1 GiB on the file system, nothing read past the cap
        f.truncate(1 << 30)
    cases[big] = "larger than"
    for path, words in cases.items():
        rc, _out, err = _run(capsys, path, good)
        assert rc == 2 and err.count("\n") == 1 and words in err and str(path) in err, err


def test_unreadable_file(tmp_path, good, capsys):
    if os.geteuid() == 0:
        pytest.skip("root reads a mode-000 file")
    p = tmp_path / "secret.json"
    p.write_text(json.dumps(_doc()))
    p.chmod(0)
    rc, _, err = _run(capsys, p, good)
    assert rc == 2 and "cannot read: Permission denied" in err


def test_nesting_depth_ignores_brackets_in_strings():
    assert nesting_depth('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}') == 1
    assert nesting_depth('{"a": "\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}') == 1
    assert nesting_depth("[[1], [[2]], {}]") == 3
    assert nesting_depth("[" * MAX_DEPTH + "]" * MAX_DEPTH) == MAX_DEPTH
    assert nesting_depth("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)) > MAX_DEPTH
    assert nesting_depth("[{" * 20) > MAX_DEPTH            # unclosed openers count too
    parse("[" * MAX_DEPTH + "]" * MAX_DEPTH)               # the limit itself is accepted
    with pytest.raises(ReportError):
        parse("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))


# --- property-based: mutated valid reports ------------------------------------------------

_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                          st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
_json_values = st.recursive(_json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12)


def _nodes(doc, path=()):
    yield path
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _nodes(v, (*path, i))


@st.composite
def _mutated_reports(draw):
    doc = copy.deepcopy(_doc())
    doc["cpuid"]["features"] = ["fpu", "sse2", "avx2"]
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _nodes(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(_json_values)
    text = json.dumps(doc)
    how = draw(st.sampled_from(["as is", "truncate", "splice"]))
    if how == "truncate":
        text = text[:draw(st.integers(0, len(text)))]
    elif how == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["[", "{", "]", "}", '"', ",", "\\", "\x00", "NaN", "1e999"])) + text[at:]
    return text


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "good.json").write_text(json.dumps(_doc()))
    return d


@settings(max_examples=int(os.environ.get("PYKVM_FUZZ_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=_mutated_reports(), first=st.booleans())
def test_mutated_reports_never_crash(fuzz_dir, capsys, text, first):
    """Only three outcomes: 0 same, 1 different, 2 refused in one line; never a traceback."""
    bad = fuzz_dir / "mutated.json"
    bad.write_text(text, encoding="utf-8", errors="surrogatepass")
    good = fuzz_dir / "good.json"
    rc, out, err = _run(capsys, bad, good) if first else _run(capsys, good, bad)
    assert rc in (0, 1, 2), (rc, err)
    if rc == 2:
        assert out == "" and err.startswith(f"pykvm diff: {bad}: ") and err.count("\n") == 1, err
    else:
        assert err == "" and out.startswith("pykvm diff\n")
