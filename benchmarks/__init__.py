"""pykvm's benchmark suite: what KVM costs on this host, pykvm next to C and Unicorn.

Run ``python -m benchmarks`` (quick mode, under a minute) or
``python -m benchmarks --full``; ``--help`` lists the options.  Each pykvm
figure is measured interleaved with a C reference doing the same ioctls on
the same guest bytes (``benchmarks/c/kvmbench.c``, compiled at run time), and
where it makes sense with Unicorn running those bytes.  See
``docs/benchmarks.md`` for the results on the project's host and what they
mean.

Modules: :mod:`.guest` (the machines), :mod:`.suite` (the cases),
:mod:`.core` (interleaving, statistics, watchdog), :mod:`.cref` (the C side),
:mod:`.uc` (Unicorn), :mod:`.report` (table, Markdown, JSON, chart).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv=None) -> int:
    """Entry point (also used by ``pykvm bench``); see :mod:`benchmarks.__main__`."""
    from .__main__ import main as _main

    return _main(argv)
