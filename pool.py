"""Many images in flight: their noise-sample ranges packed into full forward passes.

Sequential CERTIFY reads an image's estimation samples up to checkpoints 100, 125, 157, ...: alone, an image asks for
tens of samples at a time at first, forward passes that a GPU runs at a fraction of its throughput (and CERTIFY's
n0 = 100 selection samples are one short pass per image in every mode). :func:`run_pool` keeps a pool of images in
flight, each a :data:`core.Steps` computation, and fills every forward pass up to the batch size with their next
sample ranges, oldest image first (:meth:`core.Smooth.count_ranges`). Every image's samples still come from its own
seeded noise streams, so every result is the one it gets alone (:func:`run_each`, one image after the other): only
the order in which the images finish changes. ``certify.py`` and ``predict.py`` run the pool unless ``--no_pool``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch

from core import SampleRange, Smooth, Steps

# What a run's computations are: (tag, the image's computation); the drivers yield (tag, result, seconds) per image.
Computations = Iterable[tuple[Any, Steps]]


def run_each(smooth: Smooth, computations: Computations, batch_size: int) -> Iterator[tuple[Any, Any, float]]:
    """The plain way: each image's computation alone and to its end (:meth:`core.Smooth.run_steps`), in order;
    yields (tag, result, seconds of the image)."""
    for tag, steps in computations:
        start = time.perf_counter()
        result = smooth.run_steps(steps, batch_size)
        yield tag, result, time.perf_counter() - start


@dataclass(eq=False)
class Flight:
    """One image in flight: its computation, the range it asks for, what of that range is counted."""

    tag: Any
    steps: Steps
    request: Optional[SampleRange] = None
    done: int = 0  # samples of the request counted so far
    counts: Optional[torch.Tensor] = None
    non_finite: Optional[torch.Tensor] = None  # of those samples, how many had a NaN/inf logit
    seconds: float = 0.0  # its share of the passes it was in
    result: Any = None

    @property
    def remaining(self) -> int:
        return self.request.size - self.done if self.request is not None else 0

    def advance(self, counts: Optional[torch.Tensor]) -> bool:
        """Send the computation the counts of its request (None: start it); True when it has returned its
        result."""
        try:
            self.request = self.steps.send(counts)
        except StopIteration as end:
            self.request, self.result = None, end.value
            return True
        if self.request.size <= 0:
            raise ValueError(f"empty sample range {self.request.start} .. {self.request.stop - 1}")
        self.done, self.counts, self.non_finite = 0, None, None
        return False


def run_pool(smooth: Smooth, computations: Computations, batch_size: int) -> Iterator[tuple[Any, Any, float]]:
    """Run every computation, many at once; yield (tag, result, seconds) of each image as it finishes.

    Before each forward pass, images join (in the order given) while the pending samples do not fill a pass of
    ``batch_size`` (or of the smaller :attr:`core.Smooth.fitting` after an out-of-memory error); the pass then takes
    the next samples of each image's range, oldest image first (:func:`fill`), and an image whose range is complete
    is sent its counts and asks for its next range, or returns. An image's seconds are its share, by samples, of the
    wall time of the passes it was in (its loading and host work included): they add up to the run's time.

    Args:
        smooth: counts the samples (:meth:`core.Smooth.count_ranges`).
        computations: (tag, steps) per image, read lazily (an image is loaded when it joins).
        batch_size: the samples of a full forward pass.
    """
    source, flights, last = iter(computations), [], time.perf_counter()
    while True:
        size, finished = min(batch_size, smooth.fitting.size), []
        while sum(f.remaining for f in flights) < size and (item := next(source, None)) is not None:
            flight = Flight(*item)
            (finished if flight.advance(None) else flights).append(flight)
        if not flights and not finished:
            return
        pieces = fill(flights, size)
        counts, non_finite = smooth.count_ranges([piece for _, piece in pieces], size) if pieces else ([], [])
        for (flight, piece), c, bad in zip(pieces, counts, non_finite):
            flight.counts = c if flight.counts is None else flight.counts + c
            flight.non_finite = bad if flight.non_finite is None else flight.non_finite + bad
            flight.done += piece.size
            if not flight.remaining:  # (the range's counts are read next: no sync before)
                smooth.check_finite(flight.non_finite)
                if flight.advance(flight.counts):
                    finished.append(flight)
        now, total = time.perf_counter(), sum(piece.size for _, piece in pieces)
        for flight, piece in pieces:
            flight.seconds += (now - last) * piece.size / total
        last = now
        flights = [f for f in flights if f not in finished]
        for flight in finished:
            yield flight.tag, flight.result, flight.seconds


def fill(flights: list[Flight], size: int) -> list[tuple[Flight, SampleRange]]:
    """One forward pass's samples: the next ones of each flight's range, in order, up to ``size`` in all."""
    pieces, room = [], size
    for flight in flights:
        take = min(flight.remaining, room)
        if take:
            start = flight.request.start + flight.done
            pieces.append((flight, SampleRange(flight.request.stream, start, start + take)))
            room -= take
    return pieces
