"""``python -m pykvm.bench``: the same as ``pykvm bench``."""

from .cli import main

raise SystemExit(main())
