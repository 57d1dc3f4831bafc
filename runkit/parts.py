"""Rank parts: under ``torchrun`` rank r appends its rows to its own part ``<outfile>.rank<r>`` of each log, and rank 0
merges the parts into one idx-sorted log at the end (:func:`merge_parts`); with one process the log itself is the
only part. A log and its parts are read together (:func:`read_done`), so a resumed run skips what any rank wrote.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Container, Iterator, Optional, Sequence, TextIO, Type

from runkit.distributed import DistInfo, barrier
from runkit.errors import UserError
from runkit.files import atomic_write_text, writing
from runkit.logs import (
    RESULT_COLUMNS,
    LogRow,
    LogWarning,
    R,
    Row,
    format_log,
    numbered_siblings,
    open_for_append,
    read_rows,
)


def part_path(outfile: Path, rank: int) -> Path:
    """``<outfile>.rank<rank>``: the part rank ``rank`` of a ``torchrun`` run writes.

    Args:
        outfile: the log.
        rank: the process's rank.
    """
    return outfile.with_name(f"{outfile.name}.rank{rank}")


def existing_parts(outfile: Path) -> list[Path]:
    """``<outfile>.rank<k>`` files left by a sharded run, by rank."""
    return [p for _, p in numbered_siblings(outfile, r"\.rank(\d+)")]


def read_done(outfile: Path, row_type: Type[R] = Row) -> dict[int, R]:  # type: ignore[assignment]
    """Rows already written: the log itself plus any rank parts (:func:`read_rows`). An idx in two of these files
    with different results is a :class:`UserError` naming both; the same result twice is kept once, with a
    :class:`LogWarning`.

    Args:
        outfile: the log.
        row_type: the rows of the log.
    """
    done: dict[int, R] = {}
    found: dict[int, Path] = {}
    repeated: list[int] = []
    for path in [outfile] + existing_parts(outfile):
        if not path.is_file():
            continue
        for idx, row in read_rows(path, row_type)[0].items():
            if idx in done and _result(done[idx]) != _result(row):
                raise UserError(f"{found[idx]} and {path} both hold idx {idx} with different results (they mix two "
                                "runs); keep one of them")
            if idx in done:
                repeated.append(idx)
            else:
                done[idx], found[idx] = row, path
    if repeated:
        warnings.warn(f"{outfile}: skipped {len(repeated)} repeated row(s) of an idx already read with the same "
                      f"result in another part (idx {', '.join(map(str, repeated[:5]))}"
                      f"{', ...' if len(repeated) > 5 else ''})", LogWarning, stacklevel=2)
    return done


def _result(row: LogRow) -> tuple:
    """What two rows of one idx must agree on (:data:`RESULT_COLUMNS`)."""
    return tuple(getattr(row, name, None) for name in RESULT_COLUMNS)


def merge_parts(outfile: Path, row_type: Type[R] = Row) -> list[R]:  # type: ignore[assignment]
    """Merge ``outfile`` and its rank parts into one idx-sorted ``outfile`` (atomically), then remove the parts.

    Args:
        outfile: the log.
        row_type: the rows of the log.
    """
    parts = existing_parts(outfile)
    rows = sorted(read_done(outfile, row_type).values(), key=lambda r: r.idx)  # type: ignore[attr-defined]
    text = format_log(rows, row_type)
    if parts or not outfile.is_file() or outfile.read_text(encoding="utf-8") != text:
        atomic_write_text(outfile, text)
    for part in parts:
        with writing(part):
            part.unlink()
    return rows


def rank_share(indices: Sequence[int], dones: Sequence[Container[int]], dist_info: DistInfo) -> list[int]:
    """This rank's images: every W-th (from the r-th) of the ``indices`` that some log still lacks.

    Args:
        indices: the selected images, in order.
        dones: per log, the idx it already holds.
        dist_info: this process's rank and world size.
    """
    return [i for i in indices if any(i not in done for done in dones)][dist_info.rank::dist_info.world_size]


@contextlib.contextmanager
def appending_parts(outfiles: Sequence[Path], row_type: Type[LogRow], dist_info: DistInfo) -> Iterator[list[TextIO]]:
    """This rank's part of each log (the log itself with one process), open for appending ``row_type`` rows
    (:func:`runkit.logs.open_for_append`); fsynced when the block ends normally, closed however it ends.

    Args:
        outfiles: the logs.
        row_type: their rows.
        dist_info: this process's rank and world size.
    """
    targets = [o if dist_info.world_size == 1 else part_path(o, dist_info.rank) for o in outfiles]
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open_for_append(t, row_type)) for t in targets]
        yield logs
        for log in logs:
            with writing(log.name):
                os.fsync(log.fileno())


def merge_rank_parts(outfiles: Sequence[Path], row_type: Type[R], dist_info: DistInfo) -> Optional[list[list[R]]]:
    """Once every rank has written its parts (a barrier: call it on every rank), rank 0 merges each log's parts
    (:func:`merge_parts`) and returns the rows of each log; None on the other ranks.

    Args:
        outfiles: the logs.
        row_type: their rows.
        dist_info: this process's rank and world size.
    """
    barrier()
    return [merge_parts(o, row_type) for o in outfiles] if dist_info.is_main else None
