"""The C reference: compile ``benchmarks/c/kvmbench.c`` and talk to it.

The source is compiled with the system C compiler (``$CC``, else ``cc``,
``gcc``, ``clang``) at run time, into a cache directory
(``$PYKVM_BENCH_CACHE``, else ``$XDG_CACHE_HOME/pykvm-bench``, else a
temporary directory); the binary's name carries a hash of the source and the
compiler, so an edit recompiles and nothing is ever committed.

:class:`CRef` keeps one ``kvmbench serve`` process for the whole run and asks
it for one batch at a time, between the pykvm batches: that is what makes the
measurements interleaved.  The child times itself (``CLOCK_MONOTONIC`` around
the loop), so the pipe round trip is not in its figures.
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("c") / "kvmbench.c"
CFLAGS = ["-O2", "-Wall"]


class CRefError(RuntimeError):
    pass


def cache_dir() -> Path:
    """Where built helpers are cached: $PYKVM_BENCH_CACHE, else the user's cache directory."""
    env = os.environ.get("PYKVM_BENCH_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or (os.path.expanduser("~/.cache") if os.path.expanduser("~") != "~" else "")
    if xdg:
        return Path(xdg) / "pykvm-bench"
    return Path(tempfile.gettempdir()) / f"pykvm-bench-{os.getuid()}"


def find_compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def compile_reference() -> Path:
    """Compile kvmbench.c (or reuse the cached binary); return its path."""
    cc = find_compiler()
    if cc is None:
        raise CRefError("no C compiler found (set $CC)")
    src = SOURCE.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CRefError(f"{cc} --version failed: {e}") from None
    tag = hashlib.sha256(src + version + " ".join(CFLAGS).encode()).hexdigest()[:16]
    for d in (cache_dir(), Path(tempfile.gettempdir()) / f"pykvm-bench-{os.getuid()}"):
        exe = d / f"kvmbench-{tag}"
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
        try:
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".kvmbench-{tag}.{os.getpid()}"
            r = subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(SOURCE)],
                               capture_output=True, text=True, timeout=120)
        except OSError:
            continue  # cache dir not writable: try the next one
        if r.returncode != 0:
            raise CRefError(f"{cc} failed:\n{r.stderr.strip()}")
        os.replace(tmp, exe)
        return exe
    raise CRefError("no writable cache directory for the C reference")


class CRef:
    """One ``kvmbench serve`` child; ``bench()`` returns the numbers it answers."""

    def __init__(self, exe: Path, workdir: Path, cpu_clock: bool = False) -> None:
        self.exe = exe
        self.workdir = workdir
        self._spec_n = 0
        self.proc = subprocess.Popen([str(exe), "serve"] + (["cpu"] if cpu_clock else []), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)

    def _ask(self, line: str, timeout: float = 120.0) -> list[str]:
        p = self.proc
        if p.poll() is not None:
            raise CRefError(f"C reference exited ({p.returncode}): {p.stderr.read().strip()}")
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(line + "\n")
        p.stdin.flush()
        ready, _, _ = select.select([p.stdout], [], [], timeout)
        if not ready:
            p.kill()
            raise CRefError(f"C reference did not answer {line!r} within {timeout:.0f} s")
        ans = p.stdout.readline().split()
        if not ans:
            raise CRefError(f"C reference died on {line!r}: {p.stderr.read().strip()}")
        if ans[0] != "ok":
            raise CRefError(" ".join(ans[1:]) or "error")
        return ans[1:]

    def load(self, spec) -> None:
        """Build the machine described by *spec* (a built :class:`benchmarks.guest.Spec`)."""
        self._spec_n += 1
        path = self.workdir / f"spec{self._spec_n}.bin"
        path.write_bytes(spec.to_bytes())
        try:
            self._ask(f"load {path}")
        finally:
            path.unlink()

    def bench(self, name: str, n: int, arg: int = 0) -> list[float]:
        return [float(x) for x in self._ask(f"bench {name} {n} {arg}")]

    def close(self) -> None:
        p = self.proc
        if p.poll() is None:
            try:
                assert p.stdin is not None
                p.stdin.write("quit\n")
                p.stdin.flush()
                p.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()
                p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            if f:
                f.close()
