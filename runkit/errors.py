"""The user-facing error (a problem with the user's input, printed by the CLIs as one ``error:`` line) and warning
(printed by the CLIs as one ``warning:`` line)."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a checkpoint). CLIs print it as one line, exit 2."""


class RunWarning(UserWarning):
    """Something the user should know about their input that does not stop the run (CLIs: one ``warning:`` line)."""
