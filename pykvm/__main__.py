"""``python -m pykvm ...``: the same as the ``pykvm`` console script."""

from .cli import main

raise SystemExit(main())
