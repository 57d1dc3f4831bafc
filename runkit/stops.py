"""Stop requests: SIGTERM (what Slurm and torchrun send before they kill a job) and SIGINT (Ctrl-C) ask a run to stop
at its next safe point and write a checkpoint there, instead of ending the process where it stands.

The run checks :meth:`StopRequest.requested` (a collective) after each unit of work; a second signal of the same
kind ends the process at once (its previous handler: SIGINT raises ``KeyboardInterrupt``, SIGTERM terminates).
Writes being atomic, that loses only the work since the last checkpoint.
"""
from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any, Optional, Sequence

from runkit.distributed import any_rank

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(Exception):
    """A run stopped on a signal after saving its checkpoint; CLIs exit with 128 + the signal's number."""

    def __init__(self, signum: int, checkpoint: Optional[str]) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_status(self) -> int:
        """128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process it ended."""
        return 128 + self.signum


class StopRequest:
    """While entered (in the main thread; elsewhere signals cannot be caught and it does nothing), SIGTERM and SIGINT
    are recorded as a request to stop instead of ending the process.

    Args:
        what: what the run does on a request, said when one arrives (e.g. ``stopping after this optimizer step``).
        signals: the signals caught.
    """

    def __init__(self, what: str, signals: Sequence[int] = STOP_SIGNALS) -> None:
        self.what, self.signals = what, tuple(signals)
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is not None:  # asked twice: what the signal did before, now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = signum
        print(f"{signal.Signals(signum).name}: {self.what} (send it again to stop at once)", file=sys.stderr,
              flush=True)

    def requested(self) -> bool:
        """Whether a stop was requested on any rank (a collective when distributed: every rank calls it at the same
        points; then every rank has a :attr:`signum`, SIGTERM where another rank got the signal)."""
        if any_rank(self.signum is not None) and self.signum is None:
            self.signum = signal.SIGTERM
        return self.signum is not None
