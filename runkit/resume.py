"""Resuming a run from the checkpoints in its output folder: which checkpoint, whether a folder already holds a run,
and the configuration of the resumed run (the one recorded in its checkpoint, with the flags given now)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Mapping, Optional, Sequence, TypeVar

from runkit import checkpoints
from runkit.errors import UserError

C = TypeVar("C")


def newest_checkpoint(outdir: Path, pattern: str = "checkpoint-*.pth.tar") -> Optional[str]:
    """The most recently written checkpoint in ``outdir`` (None when there is none).

    Args:
        outdir: the run's output folder.
        pattern: the names of its checkpoints (a glob).
    """
    found = sorted(outdir.glob(pattern), key=lambda p: p.stat().st_mtime_ns)
    return str(found[-1]) if found else None


def read_run_checkpoint(path: str, flag: str, needed: Sequence[str], what: str, advice: str) -> Dict[str, Any]:
    """A run's checkpoint (:func:`runkit.checkpoints.load`, ``weights_only``), checked to hold the ``needed`` keys.

    Args:
        path: the checkpoint file.
        flag: the flag that gave it (for errors).
        needed: the keys every checkpoint of such a run holds.
        what: what it should be, e.g. ``a train.py checkpoint``.
        advice: what to do instead, said at the end of the error.
    """
    p = Path(path).expanduser()
    ckpt = checkpoints.load(p, flag)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        raise UserError(f"{flag} {p}: not {what} (needs {', '.join(needed)}); {advice}")
    return ckpt


def refuse_existing_run(out: Path, logs: Sequence[str]) -> None:
    """A new run does not write into the folder of another: name its newest checkpoint to resume, if any.

    Args:
        out: the ``--outdir`` of the new run.
        logs: the names of the logs a run writes there (a run without a checkpoint leaves only those).
    """
    newest = newest_checkpoint(out)
    if newest:
        raise UserError(f"--outdir {out} already holds a run; continue it with --resume {newest} (its newest "
                        "checkpoint; or --resume auto) or pick another --outdir")
    if any((out / name).exists() for name in logs):
        raise UserError(f"--outdir {out} holds the logs of a run that stopped before its first checkpoint, so there "
                        "is nothing to resume; start it over with --resume auto (which drops those logs) or pick "
                        "another --outdir")


def override_names(override: Optional[str], names: Collection[str]) -> set[str]:
    """The field names listed by ``--override a,b`` (``--a`` and ``a-b`` spellings accepted), checked to exist.

    Args:
        override: the ``--override`` flag.
        names: the configuration's field names.
    """
    chosen = {n.strip().lstrip("-").replace("-", "_") for n in (override or "").split(",") if n.strip()}
    unknown = sorted(chosen - set(names))
    if unknown:
        raise UserError(f"--override {override}: no flag {', '.join('--' + n for n in unknown)}")
    return chosen


def flags_not_at_default(config: Any) -> set[str]:
    """The fields of the dataclass ``config`` that differ from their defaults, and the required ones.

    Args:
        config: a dataclass instance whose required fields are its only ones without a default.
    """
    fields = dataclasses.fields(config)
    required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    defaults = type(config)(**{name: getattr(config, name) for name in required})
    return {f.name for f in fields if getattr(config, f.name) != getattr(defaults, f.name)} | required


def resumed_config(config: C, given: Optional[set[str]], recorded: Mapping[str, Any], resolve: Callable[[C], C],
                  operational: Collection[str], paths: Collection[str], may_grow: Collection[str] = ()) -> C:
    """The configuration of a resumed run: the run's own (``recorded``), with the flags given now.

    Flags left out take the run's values; a flag given with a value that changes what the run computes (every field
    but ``operational`` and ``paths``) is refused unless the config's ``override`` field names it; a ``may_grow``
    field may grow.

    Args:
        config: the flags of this invocation (a dataclass with the fields ``resume`` and ``override``).
        given: names of the flags given explicitly (None: :func:`flags_not_at_default`).
        recorded: the run's resolved configuration, as its checkpoint recorded it.
        resolve: completes a configuration (its defaults that depend on other flags), as the run did.
        operational: fields a resume may change freely (where and how the run executes, not what it computes);
            left out, they keep this invocation's values.
        paths: files the run read: they may move (their content is for the caller to check).
        may_grow: numeric fields that may grow (e.g. ``epochs``: the schedules stretch).
    """
    given = flags_not_at_default(config) if given is None else given
    names = {f.name for f in dataclasses.fields(config)}
    merged = dataclasses.replace(config, **{k: v for k, v in recorded.items()
                                            if k in names and k not in given and k not in operational})
    resolved, overrides = resolve(merged), override_names(getattr(config, "override"), names)
    changed = []
    for name in sorted((given & recorded.keys()) - set(operational) - set(paths) - overrides):
        new, old = getattr(resolved, name), recorded[name]
        if new != old and not (name in may_grow and new > old):
            changed.append(f"--{name} {new} (the run: {old})")
    if changed:
        raise UserError(f"--resume {getattr(config, 'resume')}: {', '.join(changed)} would change the run; leave "
                        "these flags out to continue it as it was, or name them in --override to change them on "
                        "purpose")
    return merged
