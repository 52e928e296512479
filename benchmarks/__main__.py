"""``python -m benchmarks``: alias of ``pykvm bench`` (kept for one release)."""

from pykvm.bench.cli import main

raise SystemExit(main())
