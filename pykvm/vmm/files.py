"""Reading the kernel and module files: bounded, whatever the path names.

A kernel or module may be anything a user can name: a huge file, a pipe,
``/dev/zero``, a directory.  :func:`read_image` never reads more than it will
accept: a regular file larger than *cap* is refused from its ``st_size``
before a byte is read; a pipe or device is read until *cap* (and at most
:data:`STREAM_CAP`) plus one byte, so an endless source ends in the same error.
"""

from __future__ import annotations

import os
import stat

from .errors import MachineError

__all__ = ["STREAM_CAP", "read_image"]

STREAM_CAP = 64 << 20        #: the most read from a pipe or character device
_CHUNK = 1 << 20


def _mib(n: int) -> str:
    return f"{n} bytes" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def read_image(path: str, what: str, cap: int) -> bytes:
    """The contents of *path* (a *what*: "kernel", "module"), at most *cap* bytes.

    Raises :class:`~pykvm.vmm.errors.MachineError` (load error) naming the
    file when it cannot be opened or read, or holds more than *cap* bytes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise MachineError(f"cannot read {what} {path!r}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise MachineError(f"cannot read {what} {path!r}: is a directory")
        regular = stat.S_ISREG(st.st_mode)
        limit = cap if regular else min(cap, STREAM_CAP)
        if regular and st.st_size > cap:
            raise MachineError(f"{what} {path!r} is {_mib(st.st_size)}: larger than the "
                               f"{_mib(cap)} it may take (the guest RAM)")
        chunks = []
        total = 0
        while total <= limit:
            want = min(_CHUNK, limit + 1 - total)
            try:
                data = os.read(fd, want)
            except OSError as e:
                raise MachineError(f"cannot read {what} {path!r}: {e.strerror}") from None
            if not data:
                break
            chunks.append(data)
            total += len(data)
        if total > limit:
            kind = "file" if regular else "stream"
            raise MachineError(f"{what} {path!r}: {kind} holds more than the {_mib(limit)} "
                               "it may take" + ("" if regular else " (a pipe or device is read "
                                                f"up to {_mib(STREAM_CAP)})"))
        return b"".join(chunks)
    finally:
        os.close(fd)
