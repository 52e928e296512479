"""``import pykvm.x86`` is lazy (PEP 562) and every public name still resolves;
the VMM's start path stays off the heavy modules (start-up is part of its promise)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.no_kvm_needed


def modules_after(code: str) -> set:
    p = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                       capture_output=True, text=True, check=True, timeout=60)
    return set(json.loads(p.stdout.splitlines()[-1]))


def test_import_loads_no_submodule() -> None:
    mods = modules_after("import pykvm.x86")
    assert not {m for m in mods if m.startswith("pykvm.x86.")}
    assert not {"subprocess", "hashlib", "dataclasses"} & (mods - modules_after("import pykvm"))


def test_every_public_name_resolves() -> None:
    from pykvm import x86

    for name in x86.__all__:
        assert getattr(x86, name) is not None, name
    assert x86.Uart16550.__module__ == "pykvm.x86.devices.uart16550"
    assert x86.RunLoop.__module__ == "pykvm.x86.bus"
    assert set(x86.__all__) <= set(dir(x86))
    with pytest.raises(AttributeError):
        x86.NoSuchThing  # noqa: B018


def test_old_runloop_path_is_a_shim() -> None:
    from pykvm.x86 import bus, runloop

    assert runloop.RunLoop is bus.RunLoop and runloop.Stop is bus.RunResult
    assert not hasattr(runloop, "MmioRead") and not hasattr(bus, "MmioRead")


def test_vmm_start_path_stays_light() -> None:
    mods = modules_after("import pykvm.vmm.cli, pykvm.vmm.machine")
    heavy = {"argparse", "dataclasses", "inspect", "subprocess", "hashlib",
             "pykvm.x86.asm", "pykvm.x86.report", "pykvm.x86.paging", "pykvm.gdbstub"}
    assert not heavy & mods, heavy & mods
