"""Bad input for every public method of pykvm's object layer (run as a child process).

    python -m tests.reliability.sweep_inputs [--examples N]

Three passes over every method of a live "world" (see ``support_sweep.py``):

1. *truncation*: each int parameter gets 2**64+1, -1, 1.5 and "1" (and None
   unless None is its default); the call must fail with KvmError, ValueError or
   TypeError.  Success would mean the value was silently wrapped or coerced.
2. *types*: each parameter gets None, object(), "x", 1.5, b"x", [object()], {};
   success is fine (the parameter may accept anything), any exception other
   than KvmError/ValueError/TypeError (AttributeError, OverflowError,
   ctypes.ArgumentError, struct.error, SystemError ...) is a violation.
3. *hypothesis*: every parameter at once from a hostile strategy (unbounded
   ints, boundaries, floats, text, bytes, lists, None); same rule as 2, and the
   exception must carry a message.

Prints one JSON line: {"calls": n, "targets": n, "violations": [[key, detail], ...]}.
A crash of the interpreter shows as a non-zero exit status.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

import pykvm
from pykvm.errors import KvmError

from . import support_sweep

ALLOWED = (KvmError, ValueError, TypeError)
#: Methods whose natural "not found" is KeyError (mapping-style lookups).
LOOKUPS = {"desc"}
#: (method, param) where any value is legitimately accepted: truthiness flags and
#: predicates that answer False for values outside the range.
EXEMPT = {("set_irq_line", "active"), ("irq_line_status", "active"), ("contains", "gpa"),
          ("contains", "n")}
#: (method, param) where None is accepted as "not given" (set_clock with a struct).
NONE_MEANS_UNSET = {("set_clock", "flags"), ("set_clock", "realtime")}
#: Parameters that size an allocation: hostile values skip the band between
#: 1 MiB and 2**47 so that the sweep does not allocate gigabytes for real.
SIZE_NAMES = {"size", "memory_size", "length", "num_pages", "n", "max_entries", "size_bytes",
              "offset", "first_page"}
BOUNDARIES = [-2**64, -2**63, -2**31 - 1, -1, 0, 1, 2**8, 2**16 - 1, 2**16, 2**31 - 1, 2**31,
              2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**128]


def _key(kind: str, name: str, param: str = "") -> str:
    return f"{kind}.{name}" + (f"({param})" if param else "")


def _ok_exception(name: str, e: BaseException) -> bool:
    if isinstance(e, ALLOWED):
        return True
    return name in LOOKUPS and isinstance(e, KeyError)


class Sweep:
    def __init__(self, kvm: pykvm.Kvm) -> None:
        self.kvm = kvm
        self.violations = []
        self.calls = 0

    def bad(self, key: str, detail: str) -> None:
        self.violations.append([key, detail[:300]])

    def run(self, fn, kw):
        self.calls += 1
        return support_sweep.call(fn, kw)

    # 1 -------------------------------------------------------------------------------
    def truncation(self, w) -> None:
        for kind, name, fn in support_sweep.targets(w):
            base = support_sweep.valid_args(fn, w)
            for p in support_sweep.parameters(fn):
                if not support_sweep.int_like(p, w) or (name, p.name) in EXEMPT:
                    continue
                values = [2**64 + 1, -1, 1.5, "1"]
                if p.default is not None and (name, p.name) not in NONE_MEANS_UNSET:
                    values.append(None)
                for v in values:
                    kw = dict(base)
                    kw[p.name] = v
                    out, e = self.run(fn, kw)
                    if e is None:
                        self.bad(_key(kind, name, p.name), f"accepted {v!r}: silently wrapped or coerced")
                    elif not _ok_exception(name, e):
                        self.bad(_key(kind, name, p.name), f"{v!r} -> {out}: {e}")

    def elements(self, w) -> None:
        """Lists and mappings of ints: a bad element must not be coerced either."""
        for kind, name, fn in support_sweep.targets(w):
            base = support_sweep.valid_args(fn, w)
            for p in support_sweep.parameters(fn):
                v0 = base[p.name]
                if isinstance(v0, dict):
                    bad_values = [{2**64 + 1: 0}, {-1: 0}, {1.5: 0}, {"1": 0}, {0x174: 2**64},
                                  {0x174: -1}, {0x174: 1.5}, {0x174: "1"}]
                elif isinstance(v0, (list, tuple)) and support_sweep.element_is_int(p):
                    bad_values = [[2**64 + 1], [-1], [1.5], ["1"]]
                else:
                    continue
                for v in bad_values:
                    kw = dict(base)
                    kw[p.name] = v
                    out, e = self.run(fn, kw)
                    if e is None:
                        self.bad(_key(kind, name, p.name), f"accepted {v!r}: silently wrapped or coerced")
                    elif not _ok_exception(name, e):
                        self.bad(_key(kind, name, p.name), f"{v!r} -> {out}: {e}")

    # 2 -------------------------------------------------------------------------------
    def types(self, w) -> None:
        for kind, name, fn in support_sweep.targets(w):
            base = support_sweep.valid_args(fn, w)
            for p in support_sweep.parameters(fn):
                for v in (None, object(), "x", 1.5, b"x", [object()], {}):
                    kw = dict(base)
                    kw[p.name] = v
                    out, e = self.run(fn, kw)
                    if e is not None and not _ok_exception(name, e):
                        self.bad(_key(kind, name, p.name), f"{v!r} -> {out}: {e}")

    # 3 -------------------------------------------------------------------------------
    def hypothesis(self, w, examples: int, rng_seed: int = 0) -> None:
        hostile = st.one_of(
            st.integers(), st.sampled_from(BOUNDARIES), st.none(), st.booleans(),
            st.floats(), st.text(max_size=4), st.binary(max_size=16),
            st.lists(st.integers(min_value=-1, max_value=2**64), max_size=4),
            st.just(object()))
        sized = st.one_of(
            st.integers(max_value=1 << 20), st.integers(min_value=1 << 47),
            st.sampled_from([-1, 2**63, 2**64]), st.none(), st.floats(), st.text(max_size=2))
        for kind, name, fn in support_sweep.targets(w):
            params = support_sweep.parameters(fn)
            base = support_sweep.valid_args(fn, w)
            strategies = {
                p.name: st.one_of(st.just(base[p.name]), sized if p.name in SIZE_NAMES else hostile)
                for p in params}

            @seed(rng_seed)
            @settings(max_examples=examples, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(st.fixed_dictionaries(strategies))
            def check(kw):  # called below, in this iteration: the loop variables are current
                out, e = self.run(fn, kw)  # noqa: B023
                if e is None:
                    return
                assert _ok_exception(name, e), f"{out}: {e}"  # noqa: B023
                assert str(e), f"{out} without a message"

            try:
                check()
            except AssertionError as e:
                notes = " ".join(getattr(e, "__notes__", []))
                self.bad(_key(kind, name), f"{e} {notes}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=25)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    if args.seed is None:
        import random

        args.seed = random.randrange(2**32)
    faulthandler.dump_traceback_later(600, exit=True)
    with pykvm.Kvm() as kvm:
        sweep = Sweep(kvm)
        for phase in ("truncation", "elements", "types", "hypothesis"):
            w = support_sweep.make_world(kvm)
            try:
                if phase == "hypothesis":
                    sweep.hypothesis(w, args.examples, args.seed)
                else:
                    getattr(sweep, phase)(w)
                ntargets = len(support_sweep.targets(w))
            finally:
                support_sweep.close_world(w)
        # after all that, a fresh VM still runs a guest
        from . import fuzz_guests

        fuzz_guests.sanity(kvm)
    print(json.dumps({"seed": args.seed, "calls": sweep.calls, "targets": ntargets, "violations": sweep.violations}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
