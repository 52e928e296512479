"""Smoke test of the benchmark suite: a tiny configuration, structure only.

No timing assertions: figures on a shared host are noise-prone, and the suite
itself reports medians and spreads.  What is checked is that every group runs,
that the JSON has the documented shape and that every figure is a positive
finite number.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    md = out.with_suffix(".md")
    md.write_text("# Benchmarks\n\nProse stays.\n")
    env = dict(os.environ, PYKVM_BENCH_CACHE=str(out.parent / "cache"))
    cmd = [sys.executable, "-m", "pykvm.bench", "--quick", "--scale", "0.02", "--rounds", "2",
           "--dirty-fractions", "0,0.01", "--ring-fractions", "0.01", "--json", str(out),
           "--markdown", str(md), "-q"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads(out.read_text()), p.stdout, md.read_text()


def test_json_structure(smoke_json):
    data, _, _ = smoke_json
    assert data["schema"] == "pykvm-bench/1"
    assert _positive(data["duration_s"])
    for key in ("kernel", "python", "pykvm", "kvm_module"):
        assert key in data["host"]
    groups = {r["group"] for r in data["rows"]}
    assert {"ioctl", "exit0", "exit3", "inguest", "life", "dirty", "compute"} <= groups
    keys = {r["key"] for r in data["rows"]}
    for k in ("ioctl.api_version", "ioctl.get_regs", "ioctl.run_immediate_exit", "exit0.pio_out",
              "exit3.pio_out", "exit0.rdmsr", "life.cold_start", "life.import_time", "compute.cpl3"):
        assert k in keys, k
    if shutil.which("as") and shutil.which("ld"):  # the VMM start-up row builds its kernel from package data
        assert "life.vmm_tiny" in keys
    names = {t["name"] for t in data["targets"]}
    assert names >= {"exit_typed", "exit_raw", "ioctl_wrappers", "region_same", "bulk", "cold_start",
                     "vmm_vs_qemu", "compute"}
    for t in data["targets"]:  # issue 15: every verdict names the host it was measured on
        assert t["host"] and t["met"] in (True, False, None), t
    if shutil.which("as") and shutil.which("ld"):
        vmm = next(r for r in data["rows"] if r["key"] == "life.vmm_tiny")
        if shutil.which("qemu-system-x86_64"):
            assert "qemu" in vmm["variants"] or "qemu" in vmm.get("errors", {}), vmm.keys()
        else:
            assert vmm["info"]["qemu"].startswith("QEMU not installed")


def test_every_figure_is_positive(smoke_json):
    data, _, _ = smoke_json
    figures = 0
    for row in data["rows"]:
        if row.get("skipped"):
            assert isinstance(row["skipped"], str) and row["skipped"]
            continue
        assert row["variants"], row["key"]
        for name, v in row["variants"].items():
            for stat in ("median", "p25", "p75", "min", "max"):
                assert _positive(v[stat]), (row["key"], name, stat, v[stat])
            assert v["n"] == len(v["samples"]) >= 1
            assert all(_positive(s) for s in v["samples"]), (row["key"], name)
            figures += 1
        for name, r in row["ratios"].items():
            assert _positive(r["median"]), (row["key"], name)
    assert figures > 50


def test_pykvm_and_raw_and_c_side_by_side(smoke_json):
    data, _, _ = smoke_json
    rows = {r["key"]: r for r in data["rows"]}
    pio = rows["exit0.pio_out"]["variants"]
    assert {"pykvm", "raw"} <= set(pio)
    if shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc"):
        assert "c" in pio and "pykvm/c" in rows["exit0.pio_out"]["ratios"]
    assert "no-op in KVM" in rows["life.region_same"]["label"]


def test_table_and_markdown(smoke_json):
    _, stdout, md = smoke_json
    assert "Exit round trips to user space" in stdout and "Targets" in stdout
    assert md.startswith("# Benchmarks\n\nProse stays.")
    assert "<!-- BEGIN RESULTS" in md and "<!-- END RESULTS -->" in md and "| PIO out |" in md
