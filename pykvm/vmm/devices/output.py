"""A guest's byte stream (serial port, debug console) to a file descriptor."""

from __future__ import annotations

import os

__all__ = ["FdOutput"]


class FdOutput:
    """Write each byte to *fd* at once; after the first failure (EPIPE ...) drop
    output quietly, like a serial line nobody listens to, so the guest still
    reaches its exit.  Nothing is buffered: a reader that stops reading makes
    the writing vCPU wait, it never makes the VMM grow."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def __call__(self, data: bytes) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, data)
        except OSError:
            self.fd = None
