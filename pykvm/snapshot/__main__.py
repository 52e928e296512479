"""``python -m pykvm.snapshot``: the same as ``pykvm snapshot``."""

from .cli import main

raise SystemExit(main())
