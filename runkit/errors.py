"""The user-facing errors (a problem with the user's input, printed by the CLIs as one ``error:`` line) and warning
(printed by the CLIs as one ``warning:`` line)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


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
