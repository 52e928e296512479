"""The `pykvm` command: exit statuses, bad devices, dispatch of demo/bench."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest

from pykvm import cli
from pykvm.cli import main

from .test_json import run_cli


@pytest.mark.no_kvm_needed
def test_help_version_and_usage(capsys):
    assert main(["--help"]) == 0
    assert "probe" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert main([]) == 2
    assert main(["probe", "--no-such-option"]) == 2
    assert main(["probe", "--bench-seconds", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err


@pytest.mark.no_kvm_needed
def test_missing_device(tmp_path, capsys):
    assert main(["probe", "--device", str(tmp_path / "kvm")]) == 1
    out = capsys.readouterr().out
    assert "KVM usable: NO" in out and "does not exist" in out


@pytest.mark.no_kvm_needed
@pytest.mark.parametrize("path,words", [("/dev/null", "is not the KVM device"),
                                         ("/tmp", "directory")])
def test_wrong_kind_of_file(path, words, capsys):
    assert main(["probe", "--device", path]) == 1
    out = capsys.readouterr().out
    assert "KVM usable: NO" in out and words in out


def test_python_dash_m_and_exit_status():
    p = run_cli("probe")
    assert p.returncode == 0 and p.stdout.splitlines()[1].startswith("KVM usable: yes")
    p = run_cli("probe", "--device", "/nonexistent/kvm")
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr


@pytest.mark.no_kvm_needed
def test_internal_errors_are_one_line(monkeypatch, capsys):
    def boom(*a, **k):
        raise RuntimeError("kaputt")

    monkeypatch.setattr("pykvm.probe.probe", boom)
    monkeypatch.delenv("PYKVM_DEBUG", raising=False)
    assert main(["probe"]) == 3
    err = capsys.readouterr().err
    assert err.strip() == ("pykvm: internal error: RuntimeError: kaputt "
                           "(set PYKVM_DEBUG=1 for the traceback)")


@pytest.mark.no_kvm_needed
def test_demo_dispatch(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pykvm.demo" else real(name, *a))
    assert main(["demo"]) == 2
    assert "demo is not part of this installation" in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec", real)
    fake = type(sys)("pykvm.demo")
    fake.main = lambda argv: 5 if argv == ["--x"] else 0
    monkeypatch.setitem(sys.modules, "pykvm.demo", fake)
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: object())
    assert main(["demo", "--x"]) == 5


@pytest.mark.no_kvm_needed
def test_bench_dispatch(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "_find_benchmarks", lambda: False)
    assert main(["bench"]) == 2
    assert "benchmark suite lives in the source checkout" in capsys.readouterr().err
    monkeypatch.undo()
    pkg = tmp_path / "benchmarks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(textwrap.dedent("""
        def main(argv):
            return 7 if argv == ["--quick"] else 0
    """))
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(cli, "_checkout", lambda: str(tmp_path))  # a checkout with a fake suite
    try:
        assert main(["bench", "--quick"]) == 7
        assert main(["bench"]) == 0
    finally:  # do not leave the fake suite where the real one would be imported
        for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
            del sys.modules[name]
