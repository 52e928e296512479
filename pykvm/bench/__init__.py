"""pykvm's benchmark suite: what KVM costs on this host, pykvm next to C and Unicorn.

Run ``pykvm bench`` (quick mode, under a minute) or ``pykvm bench --full``;
``--help`` lists the options.  Each pykvm figure is measured interleaved with
a C reference doing the same ioctls on the same guest bytes
(``pykvm/bench/c/kvmbench.c``, package data, compiled at run time), and where
it makes sense with Unicorn running those bytes.  See ``docs/benchmarks.md``
for the results on the project's host and what they mean.

Modules: :mod:`.guest` (the machines), :mod:`.suite` (the suite),
:mod:`.cases` (one module per group: ``ioctl``, ``exits`` + ``inguest``,
``life``, ``dirty``, ``compute``), :mod:`.core` (interleaving, statistics,
watchdog), :mod:`.cref` (the C side), :mod:`.uc` (Unicorn), :mod:`.report`
(table, Markdown, JSON, chart), :mod:`.cli` (the command).  Only pykvm's
public API is used, so the suite runs from an installed wheel.
"""

from __future__ import annotations

from typing import List, Optional

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``pykvm bench`` (see :mod:`pykvm.bench.cli`)."""
    from .cli import main as cli_main

    return cli_main(argv)
