"""The VMM's one error type for everything that fails before the guest runs."""

from __future__ import annotations

from .status import LOAD_ERROR

__all__ = ["MachineError"]


class MachineError(Exception):
    """Set-up failed before the guest ran; ``status`` is the exit status to use
    (:data:`~pykvm.vmm.status.LOAD_ERROR` for a bad command line or file)."""

    def __init__(self, message: str, status: int = LOAD_ERROR) -> None:
        super().__init__(message)
        self.status = status
