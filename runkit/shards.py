"""Shards: a run cut into S independent parts (``--shard K/S``, e.g. the tasks of a Slurm array), each with its own
log ``<outfile>.shard<k>of<s>`` (with its own sidecar, parts and lock), and their merge into one idx-sorted log.

A shard's sidecar records the images of the whole run (:func:`encode_indices`), so that :func:`merge_shard_logs`
can check that every image is there, once, from shards of one configuration and of devices that draw one noise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Container, Mapping, NamedTuple, Optional, Sequence, Type

from runkit.devices import describe_device_model, stream_difference
from runkit.errors import UserError
from runkit.files import atomic_write_text, check_regular_file, write_failures
from runkit.locks import lock_path, run_lock
from runkit.logs import LogRow, format_log, idx_list, numbered_siblings
from runkit.parts import read_done
from runkit.resume import parse_override, recorded_device_models
from runkit.sidecars import read_sidecar, write_sidecar


@dataclass(frozen=True)
class Shard:
    """The k-th (0-based) of s disjoint parts of the selected images: every s-th image from the k-th."""

    k: int
    s: int

    def select(self, indices: Sequence[int]) -> list[int]:
        return list(indices)[self.k::self.s]

    def __str__(self) -> str:
        return f"{self.k}/{self.s}"


SLURM_ARRAY = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")


def parse_shard(text: str, environ: Mapping[str, str] = os.environ) -> Shard:
    """``--shard K/S`` (0 <= K < S), or ``auto``: K and S from a Slurm array job's environment.

    With ``auto``, K = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP and
    S = SLURM_ARRAY_TASK_COUNT, so ``--array=0-3`` and ``--array=1-4`` both give shards 0/4 .. 3/4.

    Args:
        text: the flag's value, ``K/S`` or ``auto``.
        environ: where ``auto`` reads the ``SLURM_ARRAY_TASK_*`` variables.
    """
    if text == "auto":
        missing = [name for name in SLURM_ARRAY if name not in environ]
        if missing:
            raise UserError(f"--shard auto: {' and '.join(missing)} not set (not a Slurm array task?); "
                            "give --shard K/S instead")
        try:
            task, count = int(environ[SLURM_ARRAY[0]]), int(environ[SLURM_ARRAY[1]])
            low, step = int(environ.get("SLURM_ARRAY_TASK_MIN", 0)), int(environ.get("SLURM_ARRAY_TASK_STEP", 1))
        except ValueError:
            raise UserError("--shard auto: the SLURM_ARRAY_TASK_* variables are not integers") from None
        k, s = ((task - low) // step if step > 0 and (task - low) % step == 0 else -1), count
        where = f" (from SLURM_ARRAY_TASK_ID={task}, MIN={low}, STEP={step}, COUNT={count}; use --array=0-{count - 1})"
    else:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise UserError(f"--shard {text}: expected K/S with 0 <= K < S (e.g. 0/4), or auto")
        (k, s), where = map(int, match.groups()), ""
    if not 0 <= k < s:
        raise UserError(f"--shard {text}: K must lie in 0..S-1, got {k}/{s}{where}")
    return Shard(k, s)


def shard_path(outfile: Path, k: int, s: int) -> Path:
    """``<outfile>.shard<k>of<s>``: the log of the k-th of s shards of a run (e.g. one task of a Slurm array).

    Args:
        outfile: the log of the whole run.
        k, s: the shard, 0 <= k < s.
    """
    return outfile.with_name(f"{outfile.name}.shard{k}of{s}")


def existing_shards(outfile: Path) -> list[tuple[int, int, Path]]:
    """``(k, s, path)`` of the ``<outfile>.shard<k>of<s>`` logs beside ``outfile``, sorted."""
    return [(k, s, p) for (k, s), p in numbered_siblings(outfile, r"\.shard(\d+)of(\d+)")]


class MergeRequest(NamedTuple):
    """``--merge OUTFILE [--override device]``."""

    outfile: Path
    override: frozenset[str]


def merge_request(argv: Sequence[str]) -> Optional[MergeRequest]:
    """OUTFILE and the checks ``--override`` skips when the command line is ``--merge OUTFILE [--override device]``
    (None without --merge; a :class:`UserError` when other flags come with it: the configuration comes from the
    shard logs)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--merge")
    parser.add_argument("--override")
    known, rest = parser.parse_known_args(list(argv))
    if known.merge is None:
        return None
    if rest:
        raise UserError(f"--merge {known.merge}: give it alone (got also {' '.join(rest)}); the configuration "
                        "comes from the shard logs")
    return MergeRequest(Path(known.merge), parse_override(known.override))


def encode_indices(indices: Sequence[int]) -> str:
    """Indices as compact text: runs of 3 or more equally spaced ones as ``start:stop:step`` (stop exclusive), the
    others as numbers, comma-separated (``0:12:3,20,25`` = 0, 3, 6, 9, 20, 25). :func:`decode_indices` inverts it."""
    items, i = [], 0
    while i < len(indices):
        j = i + 1
        step = indices[j] - indices[i] if j < len(indices) else 0
        while step > 0 and j + 1 < len(indices) and indices[j + 1] - indices[j] == step:
            j += 1
        if step > 0 and j - i >= 2:
            items.append(f"{indices[i]}:{indices[j] + step}:{step}")
            i = j + 1
        else:
            items.append(str(indices[i]))
            i += 1
    return ",".join(items)


def decode_indices(text: str) -> list[int]:
    """The indices :func:`encode_indices` wrote."""
    out: list[int] = []
    for item in filter(None, text.split(",")):
        parts = [int(v) for v in item.split(":")]
        out.extend(range(*parts) if len(parts) == 3 else parts)
    return out


@dataclass(frozen=True)
class Merged:
    """What :func:`merge_shard_logs` wrote: the idx-sorted rows, the shards' shared configuration, the shard logs."""

    rows: list[LogRow]
    config: dict[str, Any]
    shards: list[Path]


def _shard_configs(shards: dict[int, Path], split: int, keys: Sequence[str], defaults: Mapping[str, Any],
                   mixed_devices: bool = False) -> tuple[dict[str, Any], dict[str, Any], dict[int, str]]:
    """The shards' shared configuration and info (the most common one; its ``device_models``: those of every shard),
    and for each shard that differs, how (another device model too, unless ``mixed_devices``); ``split``: S."""
    recorded = {k: read_sidecar(p, "--merge", f"restore it, or redo that shard with --shard {k}/{split} --overwrite")
                for k, p in shards.items()}
    names = (*keys, "selection")
    values = {k: [r["config"].get(key, defaults.get(key)) for key in keys]
              + [r.get("info", {}).get("selection")] for k, r in recorded.items()}
    encoded = {k: tuple(json.dumps(v, sort_keys=True) for v in vals) for k, vals in values.items()}
    common = Counter(encoded.values()).most_common(1)[0][0]
    first = next(k for k in sorted(encoded) if encoded[k] == common)
    special = {"selection": "other images selected", "fingerprints": "other checkpoint file contents"}
    foreign = {}
    for k, key in sorted(encoded.items()):
        if key != common:
            diff = [special.get(name) or f"{name}={values[k][i]!r} (the others {values[first][i]!r})"
                    for i, name in enumerate(names) if key[i] != common[i]]
            foreign[k] = f"{shards[k].name} has a different configuration: {', '.join(diff)}"
    models = {k: recorded_device_models(r.get("info", {})) for k, r in recorded.items()}
    if not mixed_devices:
        foreign.update(_other_device_models(shards, models, first, set(foreign)))
    union = [json.loads(m) for m in dict.fromkeys(json.dumps(m, sort_keys=True) for ms in models.values() for m in ms)]
    return recorded[first]["config"], {**recorded[first].get("info", {}), "device_models": union}, foreign


def _other_device_models(shards: dict[int, Path], models: dict[int, list[dict[str, Any]]], first: int,
                         skip: Container[int]) -> dict[int, str]:
    """For each shard (but ``skip``) whose device models draw other noise than those of shard ``first``
    (:func:`runkit.devices.stream_difference`), how."""
    found = {}
    for k in sorted(set(models) - {first}):
        pairs = [(a, b, stream_difference(a, b)) for a in models[first] for b in models[k] if k not in skip]
        for a, b, reason in pairs:
            if reason:
                found[k] = (f"{shards[k].name} ran on {describe_device_model(b)}, {shards[first].name} on "
                            f"{describe_device_model(a)} ({reason}; rerun it there, or pass --override device to "
                            "merge noise streams of different devices: certificates valid, reproducible on no single "
                            "device)")
                break
    return found


def merge_shard_logs(outfile: Path, row_types: Sequence[Type[LogRow]], keys: Sequence[str],
                     defaults: Mapping[str, Any], merged_by: Mapping[str, str], override: Container[str] = ()
                     ) -> Merged:
    """Merge the shard logs ``<outfile>.shard<k>of<s>`` (k = 0..s-1) into one idx-sorted ``outfile`` with its sidecar;
    their rows are of the one of ``row_types`` whose header the first shard log has.

    Refused, with the list of missing idx, when a shard log is missing or incomplete, when one was written with
    another configuration (``keys``) or, unless ``override`` holds ``device``, on a device model whose
    noise streams differ (:func:`runkit.devices.stream_difference`), or when one holds images outside its share.
    The merged rows equal a one-process run's (image idx's noise depends only on the seed, idx and device model).
    The shard logs are kept.

    Args:
        outfile: the merged log to write; its shard logs lie beside it.
        row_types: the row types the shard logs may have.
        keys: the entries of the sidecars' configuration that every shard must share.
        defaults: what a sidecar without one of ``keys`` recorded.
        merged_by: header -> the script that merges logs of that kind (named when a shard log is of another).
        override: the checks to skip (``device``).
    """
    found = existing_shards(outfile)
    if not found:
        raise UserError(f"--merge {outfile}: no shard logs {outfile.name}.shard<K>of<S> beside it (written by "
                        "--shard K/S)")
    splits = sorted({s for _, s, _ in found})
    if len(splits) > 1:
        raise UserError(f"--merge {outfile}: shard logs of {len(splits)} different splits "
                        f"({', '.join(p.name for _, _, p in found)}); keep those of one --shard K/S split")
    s = splits[0]
    shards = {k: p for k, _, p in found}
    row_type = _shard_row_type(outfile, shards, row_types, merged_by)
    config, info, foreign = _shard_configs(shards, s, keys, defaults, "device" in override)
    if "selection" not in info:
        raise UserError(f"--merge {outfile}: the shard sidecars do not record the images selected (not written by "
                        "--shard K/S); rerun the shards")
    selected = decode_indices(info["selection"])
    rows, problems = _shard_rows(outfile, shards, s, selected, foreign, row_type)
    missing = sorted(set(selected) - set(rows))
    if problems:
        raise UserError(f"--merge {outfile}: refused: {'; '.join(problems)}; missing idx: {idx_list(missing)}")
    merged = Merged([rows[i] for i in sorted(rows)], config, list(shards.values()))
    _write_merged(outfile, merged, row_type, info)
    return merged


def _shard_row_type(outfile: Path, shards: dict[int, Path], row_types: Sequence[Type[LogRow]],
                    merged_by: Mapping[str, str]) -> Type[LogRow]:
    """The one of ``row_types`` whose header every shard log has; a shard log of another kind (e.g. CERTIFY shards
    given to predict.py) is refused naming the script that wrote it, which merges it."""
    types = {t.header(): t for t in row_types}
    found = set()
    for _k, path in sorted(shards.items()):
        check_regular_file(path, "--merge")
        with open(path, encoding="utf-8", errors="replace") as f:
            header = f.readline().rstrip("\r\n")
        if header not in types:
            writer = merged_by.get(header)
            raise UserError(f"--merge {outfile}: {path.name} is not a log of this kind (first line {header[:60]!r}, "
                            f"expected {' or '.join(map(repr, types))}); merge it with the script that wrote it"
                            + (f": {writer} --merge {outfile}" if writer else ""))
        found.add(header)
    if len(found) > 1:
        raise UserError(f"--merge {outfile}: the shard logs have different headers ({' and '.join(map(repr, found))})"
                        "; they are not the shards of one run")
    return types[found.pop()]


def _shard_rows(outfile: Path, shards: dict[int, Path], s: int, selected: Sequence[int], foreign: dict[int, str],
                row_type: Type[LogRow]) -> tuple[dict[int, LogRow], list[str]]:
    """The rows of the shard logs that hold their share (by idx), and what is wrong with the others."""
    rows: dict[int, LogRow] = {}
    problems = []
    for k in range(s):
        share = set(Shard(k, s).select(selected))
        if k not in shards:
            problems.append(f"no log for shard {k}/{s} ({outfile.name}.shard{k}of{s}; run --shard {k}/{s})")
            continue
        if k in foreign:  # its rows count as missing
            problems.append(foreign[k])
            continue
        done = read_done(shards[k], row_type)
        outside = sorted(set(done) - share)
        if outside:
            problems.append(f"{shards[k].name} holds idx outside its share: {idx_list(outside)}")
            continue
        if len(done) < len(share):
            problems.append(f"{shards[k].name} is incomplete ({len(done)} of {len(share)} images; continue it with "
                            f"--shard {k}/{s} --resume)")
        rows.update(done)
    return rows, problems


def _write_merged(outfile: Path, merged: Merged, row_type: Type[LogRow], info: dict[str, Any]) -> None:
    """Write the merged log (refusing to replace a different one) and its sidecar."""
    text = format_log(merged.rows, row_type)
    with write_failures(f"rerun --merge {outfile}"), run_lock(lock_path(outfile), f"--merge {outfile}"):
        if outfile.exists() and outfile.read_text(encoding="utf-8", errors="replace") != text:
            raise UserError(f"--merge {outfile}: it already exists with other rows; move it away to merge again")
        atomic_write_text(outfile, text)
        merged_info = {"merged_from": [p.name for p in merged.shards], "selection": info["selection"],
                       "device_models": info["device_models"], "merged": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_sidecar(outfile, {**merged.config, "shard": None}, merged_info)
