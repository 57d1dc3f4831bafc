"""Fault injection for the tests: a small disk that fills up, an ``OSError`` at the k-th write of a writer, a
Ctrl-C while a script imports its libraries.

In-process (pytest):

* :func:`small_tmpfs`: a tmpfs of a few hundred KiB mounted on a folder (needs root and a kernel that lets this
  process mount; yields None where mounting is refused, or with ``FT_CADIS_NO_TMPFS=1``, and the caller falls back
  to :func:`write_faults`), and
  :func:`fill` to leave only so many bytes of it free.
* :func:`write_faults`: every write into files whose name matches a glob, from the k-th on, raises
  ``OSError(errno)`` (a disk that is full from then on). It covers ``open``/``io.open``/``os.fdopen`` file
  objects (logs, atomic writes, ``torch.save`` into a file, PIL, TensorBoard's event files) and ``os.write`` on
  descriptors from ``os.open`` (lock files).

In a process of its own (``python tests/faults.py SCRIPT ARGS...``, also as the script of ``torchrun``): the same
faults, described by the environment variable ``FT_CADIS_FAULTS`` (JSON: ``{"write": {"match": GLOB, "k": K,
"errno": E, "ranks": [R, ...]}, "sigint_on_import": [MODULE, ...]}``), then SCRIPT runs as ``__main__``.
"""
from __future__ import annotations

import builtins
import contextlib
import errno as errno_codes
import fnmatch
import io
import json
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

ENV = "FT_CADIS_FAULTS"
PAGE = 4096  # tmpfs allocates whole pages


# ---------------------------------------------------------------------------------------------------------------
# A small disk
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(folder: Path, size_kib: int = 256) -> Iterator[Optional[Path]]:
    """Mount a tmpfs of ``size_kib`` KiB on ``folder`` (created) for the block; yield ``folder``, or None when this
    process may not mount one (not root, or a container that forbids it). Unmounted at the end (lazily if busy)."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(folder)]
    try:  # (FT_CADIS_NO_TMPFS=1: as where mounting is refused, to run the callers' fallback)
        mounted = not os.environ.get("FT_CADIS_NO_TMPFS") and subprocess.run(cmd, capture_output=True,
                                                                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        mounted = False
    try:
        yield folder if mounted else None
    finally:
        if mounted and subprocess.run(["umount", str(folder)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def free_bytes(folder: Path) -> int:
    """Bytes still free for this process on the file system of ``folder``."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` up to ``leave`` free bytes (rounded down to pages) with one file,
    ``folder/.fill``, whose removal frees the space again."""
    filler = folder / ".fill"
    with open(filler, "ab") as f:
        missing = free_bytes(folder) - leave // PAGE * PAGE
        while missing > 0:
            try:
                f.write(b"\0" * min(missing, 1 << 20))
                f.flush()
            except OSError as err:
                if err.errno != errno_codes.ENOSPC:
                    raise
                break
            missing = free_bytes(folder) - leave // PAGE * PAGE
    return filler


# ---------------------------------------------------------------------------------------------------------------
# An OSError at the k-th write
# ---------------------------------------------------------------------------------------------------------------


class WriteFaults:
    """Counts the writes into files whose name matches ``match`` and fails the k-th and every later one."""

    def __init__(self, match: str, k: int = 1, code: int = errno_codes.ENOSPC):
        self.match, self.k, self.code = match, k, code
        self.writes = 0  # writes seen so far (the failed ones included)
        self.failed: list[str] = []  # the files whose writes failed

    def matches(self, path: Any) -> bool:
        try:
            name = os.path.basename(os.fsdecode(path))
        except TypeError:
            return False
        return fnmatch.fnmatchcase(name, self.match)

    def tick(self, path: str) -> None:
        """One more write into ``path``: raise the fault from the k-th on."""
        self.writes += 1
        if self.writes >= self.k:
            self.failed.append(path)
            raise OSError(self.code, os.strerror(self.code))


class FailingFile:
    """A file object whose writes go through :meth:`WriteFaults.tick` first."""

    def __init__(self, file: Any, faults: WriteFaults, path: str):
        self._file, self._faults, self._path = file, faults, path

    def write(self, data: Any) -> int:
        self._faults.tick(self._path)
        return self._file.write(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __enter__(self) -> FailingFile:
        self._file.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._file.__exit__(*exc)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._file)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def _writes(mode: Any) -> bool:
    return isinstance(mode, str) and any(c in mode for c in "wax+")


@contextlib.contextmanager
def write_faults(match: str, k: int = 1, code: int = errno_codes.ENOSPC) -> Iterator[WriteFaults]:
    """Inside the block, the k-th and every later write into a file named like ``match`` (a glob on the file name,
    e.g. ``"log.tsv"``, ``".log.tsv.*.tmp"`` for an atomic write's temporary file) raises ``OSError(code)``."""
    faults = WriteFaults(match, k, code)
    real_open, real_fdopen, real_os_open, real_write = builtins.open, os.fdopen, os.open, os.write
    fd_paths: dict[int, str] = {}

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        return FailingFile(f, faults, os.fsdecode(file)) if _writes(mode) and faults.matches(file) else f

    def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_fdopen(fd, mode, *args, **kwargs)
        path = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        return FailingFile(f, faults, path) if _writes(mode) and faults.matches(path) else f

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_os_open(path, flags, *args, **kwargs)
        if faults.matches(path):
            fd_paths[fd] = os.fsdecode(path)
        else:
            fd_paths.pop(fd, None)
        return fd

    def os_write(fd: int, data: Any) -> int:
        if fd in fd_paths:
            faults.tick(fd_paths[fd])
        return real_write(fd, data)

    patches = [(builtins, "open", open_), (io, "open", open_), (os, "fdopen", fdopen), (os, "open", os_open),
               (os, "write", os_write)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield faults
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


# ---------------------------------------------------------------------------------------------------------------
# A script in a process of its own, with faults
# ---------------------------------------------------------------------------------------------------------------


class _InterruptOnImport:
    """A meta-path finder that sends this process SIGINT the first time one of ``modules`` is imported (as a Ctrl-C
    while a script loads torch would)."""

    def __init__(self, modules: Sequence[str]):
        self.modules = set(modules)

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name in self.modules:
            self.modules.clear()
            os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before kill() returns
        return None


def command(script: str | Path, *args: str) -> list[str]:
    """The command line that runs ``script`` with ``args`` under the faults of ``$FT_CADIS_FAULTS``."""
    return [sys.executable, str(Path(__file__).resolve()), str(script), *map(str, args)]


def environment(write: Optional[dict] = None, sigint_on_import: Sequence[str] = (), **env: str) -> dict[str, str]:
    """``os.environ`` plus ``env`` and the faults (see the module docstring) in ``$FT_CADIS_FAULTS``."""
    spec = {"write": write, "sigint_on_import": list(sigint_on_import)}
    return {**os.environ, **env, ENV: json.dumps(spec)}


def _main(argv: list[str]) -> None:
    spec = json.loads(os.environ.get(ENV, "{}"))
    script = os.path.abspath(argv[0])
    sys.argv = [script, *argv[1:]]
    sys.path[0] = os.path.dirname(script)
    if spec.get("sigint_on_import"):
        sys.meta_path.insert(0, _InterruptOnImport(spec["sigint_on_import"]))
    write = spec.get("write")
    rank = int(os.environ.get("RANK", "0"))
    with contextlib.ExitStack() as stack:
        if write and rank in write.get("ranks", [rank]):
            stack.enter_context(write_faults(write["match"], write.get("k", 1), write.get("errno", errno_codes.ENOSPC)))
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    _main(sys.argv[1:])
