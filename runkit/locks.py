"""Run locks: one run at a time on one output (a POSIX lock the kernel releases however the holder exits)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from runkit.errors import UserError
from runkit.files import process_umask, writing

_HELD_LOCKS: dict = {}  # (st_dev, st_ino) of lock files this process holds -> path (POSIX locks ignore own process)


def lock_path(target: str | os.PathLike, is_dir: bool = False) -> Path:
    """The lock file of a run's output: ``<target>.lock`` beside a log, ``<outdir>/.lock`` inside an output folder."""
    target = Path(target)
    return target / ".lock" if is_dir else target.with_name(target.name + ".lock")


def _lock_holder(path: Path) -> str:
    """``pid N on HOST since TIME (COMMAND)`` from a lock file, or ``another process`` if it says nothing yet."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']} since {info['since']} ({info['command'][:120]})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _try_lock(path: Path) -> Optional[int]:
    """An fd holding an exclusive POSIX lock on ``path`` (created if missing), or None when another process holds it.

    A lock file removed and re-created by its holder between our open and our lock is detected (inode check) and
    retried, so two processes can never both believe they hold the lock of one path. Opened with ``O_NOFOLLOW``: a
    symbolic link in the lock file's place fails (``ELOOP``) instead of being followed (its target overwritten).
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666 & ~process_umask())
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            same = os.lstat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _held_here(path: Path) -> bool:
    """Whether this process already holds the lock file ``path`` (checked without opening it: closing any descriptor
    of a file releases a process's POSIX locks on it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) in _HELD_LOCKS


@contextlib.contextmanager
def run_lock(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive advisory lock on the lock file ``path`` for the whole run (see :func:`lock_path`).

    A POSIX ``fcntl`` lock: the kernel releases it when the process exits, however it exits (kill -9 included), so a
    crashed run leaves no stale lock; forked children (data-loader workers) do not inherit it. The file records who
    holds it (pid, host, start, command) and is removed on release.

    Args:
        path: the lock file (its folder must exist).
        what: names the protected output in the error, e.g. ``"--outfile runs/a.tsv"``.

    Raises:
        UserError: another process (or this one) holds the lock: one line naming the holder; or the lock file
            cannot be created, or is a symbolic link.
    """
    path = Path(path)
    try:
        fd = None if _held_here(path) else _try_lock(path)
    except OSError as err:  # e.g. a read-only folder
        if err.errno == errno.ELOOP:
            raise UserError(f"{what}: its lock file {path} is a symbolic link (to {os.readlink(path)}), which a run "
                            "never follows (it would overwrite the target); remove the link") from None
        raise UserError(f"{what}: cannot create its lock file {path} ({err.strerror}); choose a writable location"
                        ) from None
    if fd is None:
        holder = "this process" if _held_here(path) else _lock_holder(path)
        raise UserError(f"{what} is in use by {holder}: wait for that run to finish (or stop it); two runs on one "
                        f"output would mix their results (lock file {path})")
    key = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
    _HELD_LOCKS[key] = path
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)}
    try:
        with writing(path):  # (a full disk: the lock file is removed again below)
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(info) + "\n").encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        del _HELD_LOCKS[key]
        os.close(fd)


@contextlib.contextmanager
def job_run_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """:func:`run_lock` for a whole (possibly ``torchrun``) job: rank 0 holds it, and every rank raises the same
    :class:`UserError` when rank 0 could not take it (a collective: call it on every rank, after
    :func:`init_distributed`). Rank r's own files (e.g. log parts) are covered by rank 0's lock, since no other job
    gets past this point while it is held.

    Args:
        path: the lock file.
        what: names the protected output in the error.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        with run_lock(path, what):
            yield
        return
    with contextlib.ExitStack() as stack:
        message: list = [None]
        if dist.get_rank() == 0:
            try:
                stack.enter_context(run_lock(path, what))
            except UserError as err:
                message = [str(err)]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None:
            raise UserError(message[0])
        yield


@contextlib.contextmanager
def locked_output_folder(folder: str | os.PathLike, what: str, is_main: bool, names: Sequence[str]) -> Iterator[Path]:
    """A run's output folder, created (:func:`runkit.files.output_folder`: removed again if the run fails while it
    is still empty) and held under :func:`job_run_lock` on ``<folder>/.lock``; rank 0 then removes the temporary
    files that killed writers left there (:func:`runkit.files.remove_stale_temporary_files`). A collective.

    Args:
        folder: the folder the run writes into.
        what: names it in the error of a second run (e.g. ``--outdir runs/a``).
        is_main: this process is rank 0.
        names: the files the run writes there (globs): their temporary files are removed.
    """
    from runkit.files import output_folder, remove_stale_temporary_files

    with output_folder(folder) as out, job_run_lock(lock_path(out, is_dir=True), what):
        if is_main:
            remove_stale_temporary_files(out, names)
        yield out
