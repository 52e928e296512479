"""Saving a file so that it is never lost, mixed or exposed: exclusive temp file, fsync, rename.

The rules (``docs/snapshot.md``, "Saving never loses, mixes or exposes data"):

* The data goes to a temporary file created *exclusively* in the destination's
  directory (``mkstemp``: ``O_CREAT | O_EXCL`` and a random name, mode 0600).
  ``O_EXCL`` never follows a symlink and never opens an existing file, so a
  name planted in a world-writable directory cannot redirect the write.
  (``O_TMPFILE`` would avoid the name altogether, but giving it a name
  through ``/proc/self/fd`` fails with EXDEV on some file systems, e.g.
  overlayfs.)
* It is ``fsync``'d, then ``rename``'d over the destination (atomic: a reader
  sees the old file or the new one, never a mix; of two concurrent saves, one
  complete file wins), then the directory is ``fsync``'d.
* New files are 0600 (a snapshot holds guest RAM).  Replacing an existing
  regular file keeps its permission bits if it belongs to us; a file of
  another user is replaced by a 0600 file of ours (its owner chose its mode,
  not the content's).
* A destination that is a symbolic link is refused (:class:`SnapshotError`):
  following it would let whoever planted it choose which file a save
  replaces.  A directory, or anything else that is not a regular file, is
  refused too.  The check is advisory: ``rename`` replaces a directory entry,
  never the file a link points to, so a link planted after the check is
  replaced, not followed.
* Names of temporary files start with ``.<name>.pykvm-tmp-<pid>-``; a save
  removes those of its destination that belong to us and whose process is
  gone (a save killed with ``kill -9``).  A killed save's file stays until
  the next save to the same destination, or longer if its pid was reused by
  a live process meanwhile.

Every failure raises :class:`SnapshotError` naming the path; the old file is
untouched.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from collections.abc import Sequence

from .fileformat import SnapshotError

__all__ = ["AtomicFile"]

_TMP_MARK = ".pykvm-tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:            # EPERM: it exists
        return True
    return True


class AtomicFile:
    """Write *path* through an exclusive temporary file, then rename it into place."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = os.fsdecode(os.fspath(path))
        self.dir = os.path.dirname(os.path.abspath(self.path))
        self.base = os.path.basename(self.path)
        self.fsync = fsync
        self.fd: int | None = None
        self.tmp: str | None = None          # the temp file's name (mkstemp only)
        self.mode = 0o600
        if not self.base:
            raise SnapshotError(f"cannot save a snapshot to {self.path!r}: it names a directory")

    def _fail(self, what: str, e: OSError) -> SnapshotError:
        return SnapshotError(f"cannot save snapshot {self.path}: {what}: {e.strerror or e}")

    def open(self) -> None:
        """Check the destination, clean our stale temp files, create the temporary file."""
        try:
            st: os.stat_result | None = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise self._fail("cannot look at it", e) from None
        if st is not None:
            if stat.S_ISLNK(st.st_mode):
                raise SnapshotError(f"cannot save snapshot {self.path}: it is a symbolic link "
                                    "(refused: save to the real path)")
            if not stat.S_ISREG(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise SnapshotError(f"cannot save snapshot {self.path}: it is {kind}")
            if st.st_uid == os.geteuid():
                self.mode = stat.S_IMODE(st.st_mode) & 0o777
        self._clean_stale()
        try:
            self.fd, self.tmp = tempfile.mkstemp(prefix=self._prefix(), dir=self.dir)
        except OSError as e:
            raise self._fail(f"cannot create a file in {self.dir}", e) from None
        try:
            os.fchmod(self.fd, self.mode)
        except OSError as e:
            self.abort()
            raise self._fail("cannot set its mode", e) from None

    def _prefix(self) -> str:
        return f".{self.base}{_TMP_MARK}{os.getpid()}-"

    def _clean_stale(self) -> None:
        """Remove ``.<base>.pykvm-tmp-<pid>-*`` files of ours whose process is gone."""
        head = f".{self.base}{_TMP_MARK}"
        try:
            names = [n for n in os.listdir(self.dir) if n.startswith(head)]
        except OSError:
            return
        me = os.geteuid()
        for name in names:
            pid_text = name[len(head):].split("-", 1)[0]
            if not pid_text.isdigit() or _pid_alive(int(pid_text)):
                continue
            full = os.path.join(self.dir, name)
            try:
                st = os.lstat(full)
                if stat.S_ISREG(st.st_mode) and st.st_uid == me:
                    os.unlink(full)
            except OSError:
                pass

    def write(self, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        """Write every byte of *parts* (``writev``; a short write is finished piece by piece)."""
        assert self.fd is not None
        total = sum(len(p) for p in parts)
        try:
            done = os.writev(self.fd, parts)
            if done != total:
                self._finish(parts, done)
        except OSError as e:
            raise self._fail("write failed", e) from None
        return total

    def _finish(self, parts: Sequence[bytes | bytearray | memoryview], done: int) -> None:
        assert self.fd is not None
        for p in parts:
            mv = memoryview(p).cast("B")
            if done >= len(mv):
                done -= len(mv)
                continue
            mv = mv[done:]
            done = 0
            while len(mv):
                mv = mv[os.write(self.fd, mv):]

    def commit(self) -> None:
        """fsync, rename into place (atomic), fsync the directory."""
        assert self.fd is not None and self.tmp is not None
        old: int | None = None
        try:
            if self.fsync:
                os.fsync(self.fd)
            old = self._open_old()
            os.replace(self.tmp, self.path)
        except OSError as e:
            if old is not None:
                os.close(old)
            self.abort()
            raise self._fail("cannot put it in place", e) from None
        self.tmp = None
        os.close(self.fd)
        self.fd = None
        if old is not None:
            # Replacing an earlier snapshot frees its blocks, which waits for its pages
            # still under writeback; closing the last reference in a thread moves that
            # work out of the caller's way.
            threading.Thread(target=os.close, args=(old,), name="pykvm-snapshot-unlink",
                             daemon=True).start()
        if self.fsync:
            try:
                dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError as e:
                raise self._fail("the file is in place but the directory fsync failed", e) from None

    def _open_old(self) -> int | None:
        """The file about to be replaced, if it is a regular file (see :meth:`commit`)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
        except OSError:
            pass
        os.close(fd)
        return None

    def abort(self) -> None:
        """Drop the temporary file (nothing of it remains)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None
