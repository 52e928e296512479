"""Diff of two probe reports: CPUID compatibility and the other sections."""

from __future__ import annotations

import copy
import json

import pytest

import pykvm.probe
from pykvm.cli import main
from pykvm.probe.diff import ReportError, cpuid_compat, diff, load, render_diff

from .support_reports import entry as _entry
from .support_reports import report as _doc


@pytest.mark.no_kvm_needed
def test_identical_reports():
    d = diff(_doc(), _doc())
    assert d.identical and d.a_on_b.ok and d.b_on_a.ok
    assert "result: no differences" in render_diff(d)


@pytest.mark.no_kvm_needed
def test_feature_missing_on_b():
    a = _doc()
    b = _doc(**{"7": _entry(7, flags=1)})                # B lacks avx2
    d = diff(a, b)
    assert not d.identical
    assert d.a_on_b.ok is False and d.a_on_b.missing == ["avx2"]
    assert d.b_on_a.ok is True
    txt = render_diff(d)
    assert "== CPUID: can a guest set up on A run on B? ==\n  NO: 1 feature(s) missing on B" in txt
    assert "avx2" in txt


@pytest.mark.no_kvm_needed
def test_unnamed_bits_are_compared_too():
    a = _doc(**{"7": _entry(7, ecx=1 << 26, flags=1)})   # 7.0 ECX bit 26: no name in pykvm
    d = diff(a, _doc())
    assert d.a_on_b.missing == ["7.0.ecx[26]"]
    assert d.b_on_a.missing == ["avx2"]


@pytest.mark.no_kvm_needed
def test_emulated_on_b_is_a_warning_not_a_failure():
    a = _doc(**{"1": _entry(1, eax=0x00B00F21, ecx=(1 << 0) | (1 << 22), edx=1 | 1 << 26)})
    b = _doc()
    b["cpuid"]["emulated"] = [_entry(1, ecx=1 << 22)]  # movbe emulated on B
    c = cpuid_compat(a, b)
    assert c.ok is True and c.missing == ["movbe"] and c.emulated_on_dst == ["movbe"]
    assert any("emulated" in w for w in c.warnings)


@pytest.mark.no_kvm_needed
def test_dynamic_bits_do_not_count():
    a = _doc(**{"1": _entry(1, eax=0x00B00F21, ecx=1 | 1 << 27, edx=1 | 1 << 26)})  # OSXSAVE
    assert cpuid_compat(a, _doc()).ok is True


@pytest.mark.no_kvm_needed
def test_xsave_and_address_bits():
    a = _doc(**{"d": _entry(0xD, eax=0xE7, flags=1), "80000008": _entry(0x80000008, eax=0x3034)})
    c = cpuid_compat(a, _doc())
    assert c.ok is False
    assert c.missing_xsave == ["opmask", "zmm_hi256", "hi16_zmm"]
    assert c.phys_addr_bits == (52, 48)
    assert "physical address bits" in c.reason


def _paths(d, counted=True):
    return {x.path: x for x in d.differences if x.counted == counted}


@pytest.mark.no_kvm_needed
def test_other_sections():
    a, b = _doc(), _doc()
    b["capabilities"][0]["system"] = 4
    b["capabilities"].append({"number": 300, "name": None, "system": 1, "vm": 1})
    b["limits"]["nr_vcpus"] = 4
    b["modules"] = [{"name": "kvm", "parameters": {"halt_poll_ns": "0"}}]
    b["msrs"]["index_list"] = [{"index": 0x10, "name": "IA32_TSC"}]
    b["stats"]["vm"] = {"id": "x", "descriptors": [{"name": "pages_4k"}]}
    d = diff(a, b)
    p = _paths(d)
    assert p["capabilities[KVM_CAP_NR_VCPUS].system"].a == 2 and p["capabilities[KVM_CAP_NR_VCPUS].system"].b == 4
    assert not p["capabilities[300]"].in_a and p["capabilities[300]"].b["number"] == 300
    assert (p["limits.nr_vcpus"].a, p["limits.nr_vcpus"].b) == (2, 4)
    assert not p["modules[kvm]"].in_a
    assert p["msrs.index_list[0x10 IA32_TSC]"].b == {"index": 16, "name": "IA32_TSC"}
    assert p["stats.vm"].a is None and p["stats.vm"].b["descriptors"] == [{"name": "pages_4k"}]
    j = d.to_dict()
    assert j["identical"] is False
    assert {"capabilities[300]", "limits.nr_vcpus"} <= {x["path"] for x in j["differences"]}
    text = render_diff(d)
    assert "limits.nr_vcpus: A 2, B 4" in text and "the hosts differ (6 difference(s))" in text


@pytest.mark.no_kvm_needed
def test_every_field_is_compared():
    """Issue 16: an edit anywhere in a report is a difference, with a readable path."""
    a = _doc()
    a["cpuid"]["features"] = ["fpu", "sse2", "avx2"]
    a["errors"] = []
    a["host"]["cpu_model"] = "X"
    edits = {
        "cpuid.features[avx2]": lambda d: d["cpuid"]["features"].remove("avx2"),
        "cpuid.features[avx512f]": lambda d: d["cpuid"]["features"].append("avx512f"),
        "host.cpu_model": lambda d: d["host"].update(cpu_model="Y"),
        "errors[cpuid: EINVAL]": lambda d: d["errors"].append("cpuid: EINVAL"),
        "usable": lambda d: d.update(usable=False),
        "limits.nr_vcpus": lambda d: d["limits"].update(nr_vcpus=True),       # 1 vs true differ
        "newfield": lambda d: d.update(newfield={"x": 1}),
        "cpuid.supported[0x7.0].ebx": lambda d: d["cpuid"]["supported"][2].update(ebx=0),
    }
    for path, edit in edits.items():
        b = copy.deepcopy(a)
        edit(b)
        d = diff(a, b)
        assert not d.identical and path in _paths(d), (path, [x.path for x in d.differences])
    b = copy.deepcopy(a)
    b["cpuid"]["supported"][2]["ebx"] = 0
    assert _paths(diff(a, b))["cpuid.supported[0x7.0].ebx"].note == "only A: avx2"


@pytest.mark.no_kvm_needed
def test_per_run_facts_are_shown_but_not_counted():
    a, b = _doc(), _doc()
    b["generated_at"], b["host"]["hostname"] = "later", "other"
    b["stats"]["vm"] = None
    a["stats"]["vm"] = None
    b["cpuid"]["supported"][1]["ebx"] = 3 << 24          # leaf 1 EBX[31:24]: initial APIC ID
    d = diff(a, b)
    assert d.identical
    assert {"generated_at", "host.hostname", "cpuid.supported[0x1.0].ebx"} <= set(_paths(d, counted=False))
    assert "Per-run facts, not counted (3)" in render_diff(d)
    b["cpuid"]["supported"][1]["ebx"] |= 1              # a bit outside the APIC ID
    assert not diff(a, b).identical


@pytest.mark.no_kvm_needed
def test_unusable_side_gives_unknown():
    b = _doc()
    b["usable"], b["cpuid"] = False, None
    d = diff(_doc(), b)
    assert d.a_on_b.ok is None and "no CPUID in B" in d.a_on_b.reason
    assert "unknown: no CPUID in B" in render_diff(d)


@pytest.mark.no_kvm_needed
def test_cli_diff_files_and_exit_status(tmp_path, capsys):
    pa, pb, bad = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "bad.json"
    pa.write_text(json.dumps(_doc()))
    pb.write_text(json.dumps(_doc(**{"7": _entry(7, flags=1)})))
    bad.write_text("{\"schema\": \"other\"}")
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(dict(_doc(), schema_version=2)))
    assert main(["diff", str(pa), str(pa)]) == 0
    assert main(["diff", str(pa), str(pb)]) == 1
    assert "NO: 1 feature(s) missing on B" in capsys.readouterr().out
    assert main(["probe", "--diff", str(pa), str(pb), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["cpuid_a_on_b"]["missing"] == ["avx2"]
    assert main(["diff", str(bad), str(pa)]) == 2
    assert "not a pykvm probe report" in capsys.readouterr().err
    assert main(["diff", str(tmp_path / "none.json"), str(pa)]) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{not json")
    assert main(["diff", str(tmp_path / "junk.json"), str(pa)]) == 2
    assert capsys.readouterr().err.startswith(f"pykvm diff: {tmp_path / 'junk.json'}: not JSON")
    assert main(["diff", str(pa), str(newer)]) == 2
    assert capsys.readouterr().err == (f"pykvm diff: {newer}: unsupported schema_version 2 (this pykvm "
                                       "reads 1; compare reports written by the same pykvm version)\n")
    with pytest.raises(ReportError):
        load(str(bad))


def test_live_report_against_itself_and_a_changed_copy():
    a = pykvm.probe().to_dict()
    b = json.loads(json.dumps(a))
    assert diff(a, b).identical
    c = copy.deepcopy(a)
    for e in c["cpuid"]["supported"]:
        if e["function"] == 1:
            e["edx"] &= ~1  # B without fpu
    d = pykvm.probe.compare(a, c)
    assert d.a_on_b.ok is False and "fpu" in d.a_on_b.missing
    assert d.b_on_a.ok is True
