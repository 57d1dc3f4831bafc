"""Progress of long work: a tqdm bar on a terminal, one plain line per interval elsewhere (Slurm, nohup, ``2>log``).

A redrawn bar written to a file is a stream of carriage returns that fills a Slurm log with thousands of partial
lines; on such a stream :class:`Progress` prints at most one line every ``interval`` seconds instead:
``<desc>: 12/500 img, 0.82 img/s, ETA 9m55s, acc 0.917, acr 0.512``, and one last line when it closes.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator, Optional, TextIO

DEFAULT_INTERVAL = 60.0  # seconds between two progress lines when the stream is not a terminal


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes and closed streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_seconds(seconds: float) -> str:
    """``3h02m``, ``9m55s`` or ``42s``: a duration as a person reads it in a log."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts work done out of ``total`` and reports it: a tqdm bar on a terminal, plain lines elsewhere.

    Args:
        iterable: what to iterate over (``for item in progress``), or None to call :meth:`update` by hand.
        total: the amount of work (default ``len(iterable)``).
        desc: what the work is, at the start of each line.
        unit: the unit of the count (``img``, ``it``).
        initial: work already done before this run (a resumed run); not counted in the rate.
        interval: seconds between two lines when the stream is not a terminal.
        stream: where to write (default ``sys.stderr``).
        enabled: False: report nothing (another rank reports, or ``--no_progress``).
        clock: the time source (tests pass a fake one).
    """

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", initial: int = 0, interval: float = DEFAULT_INTERVAL,
                 stream: Optional[TextIO] = None, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.iterable = iterable
        self.total = total if total is not None or iterable is None else len(iterable)  # type: ignore[arg-type]
        self.desc, self.unit, self.interval, self.clock = desc, unit, interval, clock
        self.stream = stream if stream is not None else sys.stderr
        self.n = self.initial = initial
        self.postfix: dict[str, Any] = {}
        self.enabled = enabled
        self.start = self.last_line = clock()
        self.n_at_line = initial
        self.bar = None
        if enabled and is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=initial, desc=desc or None, unit=unit, dynamic_ncols=True,
                            leave=False, file=self.stream)

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        """``n`` more units done; on a non-terminal stream, a line once ``interval`` seconds have passed."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.clock() - self.last_line >= self.interval:
            self.write_line()

    def set_postfix(self, figures: Optional[dict[str, Any]] = None, refresh: bool = False, **more: Any) -> None:
        """Running figures shown after the count (e.g. ``acc``, ``acr``), as tqdm's ``set_postfix``."""
        self.postfix = {**(figures or {}), **more}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=refresh)

    def line(self) -> str:
        """The plain progress line: count, rate, ETA and the running figures."""
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = (self.n - self.initial) / elapsed
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total is not None else f"{self.n} {self.unit}",
                 f"{rate:.3g} {self.unit}/s"]
        if self.total is not None and rate > 0:
            parts.append(f"ETA {format_seconds((self.total - self.n) / rate)}")
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def write_line(self) -> None:
        """Write :meth:`line` now."""
        print(self.line(), file=self.stream, flush=True)
        self.last_line, self.n_at_line = self.clock(), self.n

    def close(self) -> None:
        """End the bar; on a non-terminal stream, one last line if anything was done since the previous one."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.n != self.n_at_line:
            self.write_line()
        self.enabled = False
