"""The user-facing errors (a problem with the user's input, printed by the CLIs as one ``error:`` line; an
output that could not be written, a full disk, a quota, a protected file, which becomes one such line too) and
warning (printed by the CLIs as one ``warning:`` line)."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

# errors that only a write raises: a full disk, a quota, a file grown past its limit, a read-only file system
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a checkpoint). CLIs print it as one line, exit 2."""


class FileError(UserError):
    """A file the user gave that cannot be used, with the facts: ``path`` (as shown), ``reason`` (what is wrong with
    it, e.g. ``file not found``) and ``source``, what named the file (the flag that gave it, e.g. ``--finetuned_path``,
    or a role; None: nothing). The message is ``<source> <path>: <reason>``.

    Args:
        path: the file.
        reason: what is wrong with it.
        source: what named it.
    """

    def __init__(self, path: str | Path, reason: str, source: Optional[str] = None) -> None:
        self.path, self.reason, self.source = Path(path), reason, source
        super().__init__(f"{source} {path}: {reason}" if source else f"{path}: {reason}")


class RunWarning(UserWarning):
    """Something the user should know about their input that does not stop the run (CLIs: one ``warning:`` line)."""


class WriteError(OSError):
    """Writing an output failed: the ``OSError`` of the write, with the output's path as its ``filename`` (the error
    of a file object's ``write`` names no file). Raised by :func:`runkit.files.writing`."""


def is_write_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed write: a :class:`WriteError`, or an ``OSError`` only a write raises
    (:data:`WRITE_ERRNOS`)."""
    return isinstance(err, WriteError) or (isinstance(err, OSError) and err.errno in WRITE_ERRNOS)


def write_failure(err: OSError, advice: str) -> UserError:
    """The one line of a failed write: ``cannot write <file>: <why>; the files written before are complete: free
    space (make it writable, check the disk), then <advice>``.

    Args:
        err: the failed write's error.
        advice: what to run once the cause is gone, e.g. ``"rerun the same command with --resume"``.
    """
    why = err.strerror or (os.strerror(err.errno) if err.errno else str(err))
    fix = ("free space" if err.errno in _NO_SPACE else "make it writable" if err.errno in _NOT_WRITABLE
           else "check the disk")
    where: Optional[str] = os.fsdecode(err.filename) if err.filename is not None else None
    return UserError(f"cannot write {where or 'an output file'}: {why}; the files written before it are complete: "
                     f"{fix}, then {advice}")
