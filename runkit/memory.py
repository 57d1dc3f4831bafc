"""Device memory: out-of-memory errors, batches that halve when the device runs out of memory, and the largest batch
that fits (``--batch_size auto`` of certify.py, predict.py and bench.py).

Certification's noise samples depend on their indices only, never on the forward pass they fall in
(:class:`core.NoiseStream`), so a smaller batch changes no result: :func:`run_in_batches` retries a range that ran
out of memory in halves, and :func:`largest_batch` may try batch sizes freely.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from runkit.errors import UserError

# RuntimeErrors that are an allocation failure too (cuDNN's and cuBLAS's own workspace allocations)
ALLOCATION_FAILURES = ("CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a device running out of memory: ``torch.OutOfMemoryError`` (which
    ``torch.cuda.OutOfMemoryError`` is), or a cuDNN/cuBLAS allocation failure."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and any(name in str(err) for name in ALLOCATION_FAILURES))


def free_cached_memory(device: torch.device, collect: bool = True) -> None:
    """Give the memory of dropped tensors back: collect garbage (``collect``), then empty the CUDA allocator's
    cache."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def out_of_memory(call: Callable[[], object], device: torch.device, synchronize: bool = False) -> Optional[str]:
    """Run ``call()``: None when it finished, the error's first line when it ran out of device memory, after freeing
    the memory it held (:func:`free_cached_memory`). Any other error propagates. The allocators raise the error when
    an allocation is asked for, i.e. on the host while ``call`` runs; ``synchronize`` also waits for the kernels
    ``call`` launched on CUDA (for measuring, never in a hot loop)."""
    message = None
    try:
        call()
        if synchronize and device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:  # re-raised unless it is an allocation failure
        if not is_out_of_memory(err):
            raise
        message = (str(err).splitlines() or ["out of memory"])[0]
    # outside the except block: the traceback's frames, which hold the failed batch's tensors, are gone
    if message is not None:
        free_cached_memory(device)
    return message


def fits(attempt: Callable[[int], object], size: int, device: torch.device) -> bool:
    """Whether ``attempt(size)`` runs without running out of device memory (:func:`out_of_memory`)."""
    fitted = out_of_memory(lambda: attempt(size), device, synchronize=True) is None
    free_cached_memory(device, collect=False)  # what the attempt cached is not the run's
    return fitted


def largest_batch(attempt: Callable[[int], object], device: torch.device, cap: int, start: int = 1,
                  resolution: int = 8) -> int:
    """The largest batch b <= ``cap`` for which ``attempt(b)`` (one forward pass of b samples) fits in memory, within
    1/``resolution`` of it: doubling from ``start`` to the first failure, then bisecting; 0 when not even one
    sample fits.

    Args:
        attempt: runs one batch of the given size (raising the device's out-of-memory error when it does not fit).
        device: where it runs.
        cap: the largest batch worth having.
        start: the first size tried.
        resolution: bisect until the gap between the best fit and the smallest failure is <= best / resolution.
    """
    best, size = 0, max(1, min(start, cap))
    while fits(attempt, size, device):
        best = size
        if size == cap:
            return cap
        size = min(2 * size, cap)
    failed = size  # the smallest size known not to fit
    while failed - best > max(1, best // resolution):
        middle = (best + failed) // 2
        best, failed = (middle, failed) if fits(attempt, middle, device) else (best, middle)
    return best


@dataclass
class BatchSize:
    """The most samples of one forward pass: the requested ``size``, lowered by :func:`run_in_batches` to half of a
    pass that ran out of memory, for the rest of the run (``halvings``: how often)."""

    size: int
    halvings: int = 0

    def halve(self, failed: int, device: torch.device, message: str = "out of memory") -> None:
        """After a pass of ``failed`` samples ran out of memory (``message``): at most half of it from now on; a
        :class:`runkit.errors.UserError` when it was a single sample."""
        if failed <= 1:
            raise UserError(f"{device}: out of memory even for a batch of 1 sample ({message}); free the device or "
                            "use one with more memory")
        self.size, self.halvings = min(self.size, failed // 2), self.halvings + 1


def run_in_batches(total: int, batch: BatchSize, run: Callable[[int, int], None], device: torch.device,
                   largest: Optional[int] = None) -> None:
    """``run(s, e)`` for consecutive ranges s .. e - 1 covering 0 .. total - 1, each of at most ``batch.size`` (and
    ``largest``) items. A range that runs out of device memory is given up (``run`` must only keep what a range
    returns once it has finished), the memory freed, ``batch`` halved, and the range computed again in smaller
    pieces; only a batch of 1 that does not fit is an error (:meth:`BatchSize.halve`).

    Args:
        total: the number of items.
        batch: the batch size (shared by every call of a run, so that a halving lasts).
        run: computes items s .. e - 1 and keeps their result.
        device: where ``run`` computes.
        largest: the most items of a range, whatever ``batch.size``.
    """
    start = 0
    while start < total:
        stop = min(total, start + min(batch.size, largest or batch.size))
        message = out_of_memory(lambda s=start, e=stop: run(s, e), device)
        if message is None:
            start = stop
        else:
            batch.halve(stop - start, device, message)


AUTO = "auto"


def parse_batch_size(text: Optional[str | int], flag: str = "--batch_size") -> Optional[int | str]:
    """A batch-size flag's value: a positive integer, ``auto`` (the largest batch that fits, :func:`largest_batch`)
    or None (not given); a :class:`runkit.errors.UserError` otherwise.

    Args:
        text: the value as given.
        flag: the flag named in the error.
    """
    if text is None or text == AUTO:
        return text
    try:
        size = int(text)
    except ValueError:
        raise UserError(f"{flag} {text!r}: give a positive integer or '{AUTO}'") from None
    if size < 1:
        raise UserError(f"{flag} {size}: must be a positive integer or '{AUTO}'")
    return size
