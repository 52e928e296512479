"""docs/api-coverage.md is generated from the code: it must equal a fresh generation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _gen():
    spec = importlib.util.spec_from_file_location("gen_coverage", ROOT / "tools" / "gen_coverage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.no_kvm_needed
def test_committed_coverage_doc_is_up_to_date():
    gen = _gen()
    doc = ROOT / "docs" / "api-coverage.md"
    assert doc.exists(), "docs/api-coverage.md is missing: run python tools/gen_coverage.py"
    assert doc.read_text() == gen.generate(), \
        "docs/api-coverage.md is stale: run python tools/gen_coverage.py and commit the result"


@pytest.mark.no_kvm_needed
def test_every_vm_ioctl_has_a_wrapper_or_a_reason():
    gen = _gen()
    wrapped = gen.scan()
    sections = gen._sections()
    missing = [name for name, section in sections.items()
               if section.startswith("VM") and not wrapped[name] and name not in gen.NOTES]
    assert missing == []
    assert "vm.Vm.get_dirty_log" in wrapped["KVM_GET_DIRTY_LOG"]
    assert "vm.Vm.get_stats_fd" in wrapped["KVM_GET_STATS_FD"]          # through stats.open_stats
    assert set(wrapped["KVM_IRQFD"]) == {"vm.Vm.register_irqfd", "vm.Vm.register_irqfd_with_resample",
                                         "vm.Vm.unregister_irqfd"}       # through Vm._irqfd
