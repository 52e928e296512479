"""``python -m pykvm ...``: the same as the ``pykvm`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
