"""The user-facing error: a problem with the user's input, printed by the CLIs as one ``error:`` line."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a checkpoint). CLIs print it as one line, exit 2."""
