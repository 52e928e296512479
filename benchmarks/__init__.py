"""Old home of the benchmark suite, now :mod:`pykvm.bench` (``pykvm bench``).

``python -m benchmarks`` stays as an alias for one release.
"""

from pykvm.bench import main

__all__ = ["main"]
