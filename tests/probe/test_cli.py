"""The `pykvm` command: exit statuses, bad devices, dispatch to every subcommand."""

from __future__ import annotations

import sys

import pytest

import pykvm
from pykvm import cli
from pykvm.cli import main

from .support_cli import run_cli


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
    assert err.strip() == ("pykvm probe: internal error: RuntimeError: kaputt "
                           "(set PYKVM_DEBUG=1 for the traceback)")


@pytest.mark.no_kvm_needed
def test_every_subcommand_is_listed_and_resolves(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("probe", "diff", "demo", "vmm", "snapshot", "gdb", "bench", "stat"):
        assert f"\n  {name} " in out, name
    # the applications of this checkout: each one's main is found (stat and gdb may not be merged yet)
    for name in ("probe", "diff", "demo", "vmm", "snapshot", "bench"):
        assert callable(cli.resolve(name)), name


@pytest.mark.no_kvm_needed
@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_subcommand_has_help_or_says_it_is_missing(name):
    p = run_cli(name, "--help")
    if cli.resolve(name) is None:
        assert p.returncode == 2 and p.stderr == f"pykvm {name}: not part of this installation of pykvm\n"
    else:
        assert p.returncode == 0, p.stderr
        assert "usage" in p.stdout.lower() and "Traceback" not in p.stderr


@pytest.mark.no_kvm_needed
def test_unknown_command_and_help_command(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pykvm: unknown command 'frobnicate'") and err.count("\n") == 1
    assert main(["help", "diff"]) == 0
    assert "usage: pykvm diff" in capsys.readouterr().out


@pytest.mark.no_kvm_needed
def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"pykvm {pykvm.__version__} ")


@pytest.mark.no_kvm_needed
def test_dispatch_falls_back_to_the_older_entry_point(monkeypatch):
    calls = []
    old = type(sys)("pykvm_fake_old")
    old.main = lambda argv: calls.append(argv) or 7
    monkeypatch.setitem(sys.modules, "pykvm_fake_old", old)
    monkeypatch.setitem(cli.COMMANDS, "vmm", ("x", ("pykvm_no_such_module.cli:main", "pykvm_fake_old:main")))
    assert main(["vmm", "--x"]) == 7 and calls == [["--x"]]
    monkeypatch.setitem(cli.COMMANDS, "vmm", ("x", ("pykvm_no_such_module.cli:main",)))
    assert cli.resolve("vmm") is None


@pytest.mark.no_kvm_needed
def test_an_import_error_inside_a_subcommand_is_internal(monkeypatch, capsys):
    broken = type(sys)("pykvm_fake_broken")
    monkeypatch.setitem(cli.COMMANDS, "stat", ("x", ("pykvm_fake_broken_pkg.cli:main",)))

    def imp(name):
        raise ModuleNotFoundError("No module named 'somedep'", name="somedep")
    monkeypatch.setattr(cli.importlib, "import_module", imp)
    monkeypatch.delenv("PYKVM_DEBUG", raising=False)
    assert main(["stat"]) == 3
    assert "somedep" in capsys.readouterr().err
    del broken


def test_broken_pipe_is_quiet():
    import subprocess

    # the reader exits at once (long before the probe's first write): the write fails with EPIPE
    p = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m pykvm probe --json | true"],
                       capture_output=True, text=True, timeout=60)
    assert p.stderr == "" and p.returncode == 1
