"""``pykvm probe --brief`` (kvm-ok style) and ``pykvm probe --check`` (virt-host-validate style)."""

from __future__ import annotations

import re

import pytest

import pykvm.probe
from pykvm.cli import main
from pykvm.probe.check import FAIL, PASS, WARN, brief, checklist

_LINE = re.compile(r"^  KVM: (?P<name>.+?) +: (?P<status>PASS|WARN|FAIL)(?: \((?P<hint>.+)\))?$")


def _checks(out):
    rows = []
    for line in out.splitlines():
        m = _LINE.match(line)
        assert m, line
        rows.append((m["name"], m["status"], m["hint"]))
    return rows


def test_brief_on_this_host(capsys):
    assert main(["probe", "--brief"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("KVM acceleration can be used: /dev/kvm answered API version 12")


@pytest.mark.no_kvm_needed
def test_brief_without_a_device(tmp_path, capsys):
    assert main(["probe", "--brief", "--device", str(tmp_path / "kvm")]) == 1
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("KVM acceleration can NOT be used: ") and str(tmp_path / "kvm") in first
    assert second.startswith("hint: ") and len(second) > len("hint: ")


def test_check_on_this_host(capsys):
    assert main(["probe", "--check"]) == 0
    rows = _checks(capsys.readouterr().out)
    status = {name: s for name, s, _ in rows}
    for name in ("Checking if device /dev/kvm exists", "Checking if device /dev/kvm is accessible",
                 "Checking for KVM API version 12", "Checking if a VM can be created",
                 "Checking for a KVM vendor module", "Checking for the capabilities VMMs rely on"):
        assert status[name] == PASS, (name, rows)
    assert FAIL not in status.values()
    for name, s, hint in rows:
        assert (hint is None) == (s == PASS), (name, s, hint)   # every WARN/FAIL says why
    # "usable" never comes from CPU flags: without vmx/svm (PVM) it is a WARN, not a FAIL
    r = pykvm.probe()
    hv = status["Checking for hardware virtualization"]
    assert hv == (PASS if r.host.flags_vmx or r.host.flags_svm else WARN)


@pytest.mark.no_kvm_needed
@pytest.mark.parametrize("device, failing", [
    ("missing", "Checking if device {p} exists"),
    ("/dev/null", "Checking if /dev/null is the KVM device (10:232)"),
])
def test_check_fails_on_a_bad_device(tmp_path, capsys, device, failing):
    path = str(tmp_path / "kvm") if device == "missing" else device
    assert main(["probe", "--check", "--device", path]) == 1
    status = {name: s for name, s, _ in _checks(capsys.readouterr().out)}
    assert status[failing.format(p=path)] == FAIL


@pytest.mark.no_kvm_needed
def test_brief_and_check_read_only_the_report(tmp_path):
    r = pykvm.probe(str(tmp_path / "none"))
    assert "NOT" in brief(r)
    names = [c.name for c in checklist(r)]
    assert "Checking if a VM can be created" not in names      # nothing after the device fails
    assert any(c.status == FAIL for c in checklist(r))


@pytest.mark.no_kvm_needed
def test_brief_check_json_are_exclusive(capsys):
    assert main(["probe", "--brief", "--check"]) == 2
    assert "not allowed with" in capsys.readouterr().err
