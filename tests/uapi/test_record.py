"""pykvm.uapi against the recorded values of the pinned kernel headers.

``kernel-7.3.json`` was written by ``tools/gen_uapi.py extract`` from Debian's
linux-libc-dev 7.3~rc7 (``tools/uapi-pin.json``): every size and offset is
gcc's DWARF, every constant and request number the value gcc computed from
the kernel's macros.  Nothing in it comes from pykvm.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
from pathlib import Path

import pytest

from pykvm import uapi
from pykvm.uapi import consts, enums, ioctls, kvm, x86

from .support_layout import ctypes_paths, record_paths

pytestmark = pytest.mark.no_kvm_needed

ROOT = Path(__file__).resolve().parents[2]
RECORD = json.loads((Path(__file__).parent / "kernel-7.3.json").read_text())
TYPES = RECORD["types"]


def _gen():
    spec = importlib.util.spec_from_file_location("gen_uapi", ROOT / "tools" / "gen_uapi.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_files_are_what_the_tool_makes_from_the_record():
    for name, text in _gen().render(RECORD).items():
        committed = (ROOT / "pykvm" / "uapi" / name).read_text()
        assert committed == text, f"pykvm/uapi/{name} drifted: run tools/gen_uapi.py render"


def test_record_is_the_pinned_one():
    pin = json.loads((ROOT / "tools" / "uapi-pin.json").read_text())
    assert RECORD["meta"]["sha256"] == pin["sha256"]
    assert RECORD["meta"]["kernel"] == "7.3.0"


def _cls(name):
    module = x86 if TYPES[name]["file"] == "x86" else kvm
    return getattr(module, name)


@pytest.mark.parametrize("name", sorted(TYPES))
def test_struct_size_and_every_offset(name):
    cls = _cls(name)
    assert ctypes.sizeof(cls) == TYPES[name]["size"]
    assert issubclass(cls, ctypes.Union) == (TYPES[name]["kind"] == "union")
    assert ctypes_paths(cls) == record_paths(TYPES, name)


def test_bitfields_sit_where_gcc_put_them():
    checked = 0
    for name, t in TYPES.items():
        for m in t["members"]:
            if "bits" in m:
                width, bit = m["bits"]
                obj = _cls(name)()
                setattr(obj, m["name"], (1 << width) - 1)
                raw = int.from_bytes(bytes(obj), "little")
                assert raw == ((1 << width) - 1) << bit, (name, m["name"])
                checked += 1
    assert checked >= 8  # the IOAPIC redirection entry alone has 7


def test_every_constant():
    for c in RECORD["consts"]:
        assert getattr(consts, c["name"]) == c["value"], c["name"]
        assert getattr(uapi, c["name"]) == c["value"], c["name"]


def test_every_request_number_built_by_ioctl_opt_equals_gccs():
    assert len(RECORD["ioctls"]) >= 100
    for i in RECORD["ioctls"]:
        assert getattr(ioctls, i["name"]) == i["value"], i["name"]
        assert ioctls.IOCTLS[i["name"]] == i["value"]
    assert set(ioctls.IOCTLS) == {i["name"] for i in RECORD["ioctls"]}


def test_every_cap_and_exit_reason():
    caps = {c["name"][8:]: c["value"] for c in RECORD["consts"] if c["name"].startswith("KVM_CAP_")}
    assert {m.name: int(m) for m in enums.Cap} == caps
    values = {c["name"]: c["value"] for c in RECORD["consts"]}
    assert {m.name: int(m) for m in enums.ExitReason} == \
        {n[9:]: values[n] for n in RECORD["exit_reasons"]}
    assert max(enums.Cap) == 251 and max(enums.ExitReason) == 43
