"""runkit.memory: out-of-memory errors become smaller batches, and the largest batch that fits (injected failures)."""
from __future__ import annotations

import pytest
import torch

from runkit.errors import UserError
from runkit.memory import BatchSize, is_out_of_memory, largest_batch, out_of_memory, parse_batch_size, run_in_batches

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_garbage_collection(monkeypatch):
    """gc.collect after each injected failure takes a large part of a second on a loaded machine: skipped here."""
    monkeypatch.setattr("runkit.memory.gc.collect", lambda: 0)


def _limited(limit: int, tried: list[int]):
    """An attempt that runs out of memory above ``limit`` samples, recording the sizes tried."""
    def attempt(size: int) -> None:
        tried.append(size)
        if size > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {size} MiB")
    return attempt


def test_which_errors_are_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("CUDNN_STATUS_ALLOC_FAILED"))
    assert out_of_memory(lambda: None, CPU) is None
    assert out_of_memory(lambda: _limited(0, [])(1), CPU) == "CUDA out of memory. Tried to allocate 1 MiB"

    def broken() -> None:
        raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="shape"):  # any other error propagates
        out_of_memory(broken, CPU)


@pytest.mark.parametrize("limit, start, cap", [(300, 1, 10_000), (300, 32, 10_000), (5, 32, 10_000),
                                               (10_000, 1, 777), (1, 16, 100), (1000, 1, 1000)])
def test_largest_batch_is_within_its_resolution_of_the_limit(limit, start, cap):
    tried: list[int] = []
    best = largest_batch(_limited(limit, tried), CPU, cap, start)
    target = min(limit, cap)
    assert best <= target and best >= target - max(1, target // 8)
    assert max(tried) <= cap and len(tried) <= 2 * 14 + 4  # doubling, then bisection: a few tries
    tried.clear()
    assert largest_batch(_limited(limit, tried), CPU, cap, start, resolution=10**9) == target  # exact


def test_largest_batch_when_nothing_fits():
    assert largest_batch(_limited(0, []), CPU, 1000, 16) == 0


def test_run_in_batches_halves_on_out_of_memory_and_keeps_only_finished_ranges():
    done: list[tuple[int, int]] = []
    tried: list[int] = []
    attempt = _limited(30, tried)

    def run(start: int, stop: int) -> None:
        attempt(stop - start)
        done.append((start, stop))  # kept only once the range has finished

    batch = BatchSize(100)
    run_in_batches(250, batch, run, CPU)
    assert [s for r in done for s in range(*r)] == list(range(250))  # every item once, in order
    assert batch.size == 25 and batch.halvings == 2 and tried[:3] == [100, 50, 25]
    assert all(stop - start <= 25 for start, stop in done)
    run_in_batches(10, batch, run, CPU)  # the halving lasts: the next call starts at 25
    assert batch.size == 25 and tried[-1] == 10


def test_run_in_batches_halves_the_pass_that_failed_not_the_requested_size():
    batch, tried = BatchSize(1000), []
    attempt = _limited(3, tried)
    run_in_batches(8, batch, lambda s, e: attempt(e - s), CPU)
    assert tried[:2] == [8, 4] and batch.size == 2  # 8 failed: at most 4, then 2


def test_a_single_sample_that_does_not_fit_is_one_user_error():
    with pytest.raises(UserError, match=r"^cpu: out of memory even for a batch of 1 sample \(CUDA out of memory"):
        run_in_batches(5, BatchSize(4), lambda s, e: _limited(0, [])(e - s), CPU)


@pytest.mark.parametrize("text, value", [(None, None), ("auto", "auto"), ("64", 64), (7, 7)])
def test_parse_batch_size(text, value):
    assert parse_batch_size(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "many", "1.5"])
def test_parse_batch_size_refuses(text):
    with pytest.raises(UserError, match="--batch_size"):
        parse_batch_size(text)
