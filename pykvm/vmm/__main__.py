"""``python -m pykvm.vmm``: the same as ``pykvm vmm`` (see :mod:`pykvm.vmm.cli`)."""

from .cli import run_as_program

raise SystemExit(run_as_program())
