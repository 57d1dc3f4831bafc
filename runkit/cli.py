"""What the command-line scripts share: running ``main`` (``error:`` line, exit 2; a Ctrl-C: exit 130, also while
the script still imports its libraries), which flags were given, and number checks that name their flag.

Imports nothing heavy: scripts import it before torch.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from runkit.errors import RunWarning, UserError, is_write_failure, write_failure

if TYPE_CHECKING:
    import argparse


INTERRUPTED = 130  # the exit status of a process ended by SIGINT (128 + 2), as shells report a Ctrl-C


def _exit_interrupted(signum: int, frame: Any) -> None:
    os.write(2, b"interrupted\n")
    os._exit(INTERRUPTED)


def exit_on_interrupt(name: str) -> None:
    """For a script run as ``__main__`` (``name``: its ``__name__``; imported, nothing changes): until
    :func:`run_cli` starts, a Ctrl-C (SIGINT) ends the process at once with ``interrupted`` and exit status 130, no
    traceback. Scripts call it before their heavy imports (torch takes seconds); nothing is written before
    ``main`` runs, so nothing is left half-done.

    Args:
        name: the calling module's ``__name__``.
    """
    if name == "__main__":
        signal.signal(signal.SIGINT, _exit_interrupted)


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> None:
    """Run a script's ``main`` and turn a :class:`UserError` (and a failed write:
    :func:`runkit.errors.is_write_failure`) into ``error: <message>`` and exit status 2, a Ctrl-C
    (``KeyboardInterrupt``, which unwinds ``main``'s ``finally`` blocks: locks released, files closed) into
    ``interrupted`` and exit status 130; a :class:`RunWarning` is shown as one line ``warning: <message>``."""
    if signal.getsignal(signal.SIGINT) is _exit_interrupted:  # from here on, Python's KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings(warnings.showwarning)
        _run_main(main, argv)


def _one_line_warnings(show: Callable[..., None]) -> Callable[..., None]:
    """``warnings.showwarning`` that writes a :class:`RunWarning` as ``warning: <message>``, others by ``show``."""
    def showwarning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                    line: Optional[str] = None) -> None:
        if issubclass(category, RunWarning):
            print(f"warning: {message}", file=sys.stderr if file is None else file)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


def _run_main(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]]) -> None:
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # an output the library did not report itself (a full disk, ...): one line too
        if not is_write_failure(err):
            raise
        print(f"error: {write_failure(err, 'run it again')}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)


def flags_given(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> set[str]:
    """The destinations of the options ``argv`` gives explicitly (a flag given at its default value counts).

    Args:
        parser: the CLI's parser.
        argv: its arguments (None: ``sys.argv[1:]``).
    """
    import argparse

    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=namespace)
    return {name for name, value in vars(namespace).items() if value is not unset}


def check_number(flag: str, value: Optional[float], low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Refuse a flag value that is not a finite number in [low, high] (an end is excluded when ``*_open``).

    Args:
        flag: the flag, e.g. ``"--sigma"`` (named in the error).
        value: its value; None (flag not given) passes.
        low: smallest allowed value (None: no bound).
        high: largest allowed value (None: no bound).
        low_open: exclude ``low`` itself.
        high_open: exclude ``high`` itself.
    """
    if value is None:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        bounds = ([] if low is None else [f"{'>' if low_open else '>='} {low:g}"]) + \
                 ([] if high is None else [f"{'<' if high_open else '<='} {high:g}"])
        wanted = "a finite number"
        if bounds:
            wanted += " " + " and ".join(bounds)
        raise UserError(f"{flag} {value}: must be {wanted}")
