"""Resuming: a run from the checkpoints in its output folder (which checkpoint, whether a folder already holds a
run, the configuration of the resumed run: the one recorded in its checkpoint, with the flags given now), and a log
from the rows it holds (the read-only checks before a run writes anything: an existing log needs ``--resume``,
checked against the configuration and the device models recorded beside it, or ``--overwrite``)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Mapping, Optional, Sequence, Type, TypeVar

from runkit import checkpoints
from runkit.devices import describe_device_model, stream_difference
from runkit.errors import UserError
from runkit.files import check_changeable, check_fingerprint, check_regular_file, writing
from runkit.logs import LogRow, Row
from runkit.parts import existing_parts, read_done
from runkit.sidecars import read_sidecar, sidecar_path, write_sidecar

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


OVERRIDES = ("device",)  # the checks of a resumed or merged log that --override may skip


def parse_override(text: Optional[str], flags: Optional[Collection[str]] = None) -> frozenset[str]:
    """The names listed by ``--override a,b`` (``--a`` and ``a-b`` spellings accepted), each checked.

    Args:
        text: the ``--override`` flag.
        flags: a resumed run's configuration field names: the flags whose recorded values ``--override`` lets a
            resume change (any other name is no flag). None: the checks of a resumed or merged log,
            :data:`OVERRIDES` (any other name cannot be overridden).
    """
    names = frozenset(n.strip().lstrip("-").replace("-", "_") for n in (text or "").split(",") if n.strip())
    unknown = sorted(names - set(OVERRIDES if flags is None else flags))
    if unknown and flags is not None:
        raise UserError(f"--override {text}: no flag {', '.join('--' + n for n in unknown)}")
    if unknown:
        raise UserError(f"--override {text}: {', '.join(unknown)} cannot be overridden; "
                        f"choose from {', '.join(OVERRIDES)}")
    return names


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
    resolved, overrides = resolve(merged), parse_override(config.override, names)
    changed = []
    for name in sorted((given & recorded.keys()) - set(operational) - set(paths) - overrides):
        new, old = getattr(resolved, name), recorded[name]
        if new != old and not (name in may_grow and new > old):
            changed.append(f"--{name} {new} (the run: {old})")
    if changed:
        raise UserError(f"--resume {config.resume}: {', '.join(changed)} would change the run; leave "
                        "these flags out to continue it as it was, or name them in --override to change them on "
                        "purpose")
    return merged


# ---------------------------------------------------------------------------------------------------------------
# A log resumed from its rows: the checks before a run writes (certify.py, predict.py)
# ---------------------------------------------------------------------------------------------------------------

def check_resume(outfile: Path, config: dict[str, Any], resume_keys: Sequence[str], defaults: Mapping[str, Any],
                 files: Optional[dict[str, tuple[str, str]]] = None) -> None:
    """Refuse to continue a log whose recorded configuration differs from this run's, or whose checkpoint files
    (``files``: role -> (flag, path)) now hold other content than recorded.

    Args:
        outfile: the log.
        config: this run's configuration (what the sidecar records under ``config``).
        resume_keys: the entries that must match.
        defaults: what a sidecar without one of ``resume_keys`` recorded (outputs of older versions).
        files: role -> (flag, path) of the checkpoint files whose content must match.
    """
    files = files or {}
    recorded_config = read_sidecar(outfile, "--resume",
                                   "use another --outfile (or --overwrite to replace it)")["config"]
    recorded_fingerprints = recorded_config.get("fingerprints") or {}
    recorded = {k: recorded_config.get(k, defaults.get(k)) for k in resume_keys}
    diff = [f"{k}={recorded[k]!r} (now {config[k]!r})" for k in resume_keys if recorded[k] != config[k]]
    if diff:
        raise UserError(f"--resume: {outfile} was written with a different configuration: {', '.join(diff)}; "
                        "rerun with the recorded flags, or use another --outfile or --overwrite")
    for role, (flag, path) in files.items():
        check_fingerprint(path, recorded_fingerprints.get(role), flag, f"the log {outfile}")


def recorded_device_models(info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every device model (:func:`runkit.devices.device_model`) that wrote rows of a log, from its sidecar's
    ``info``: ``device_models`` (sidecars of older versions: the type of ``device``)."""
    if "device_models" in info:
        return list(info["device_models"])
    return [{"type": str(info["device"]).split(":")[0]}] if info.get("device") else []


def check_device_model(outfile: Path, model: dict[str, Any], override: Optional[str]) -> bool:
    """On ``--resume``: refuse to continue a log written on a device model whose noise streams differ from those of
    ``model``, this run's (:func:`runkit.devices.stream_difference`), unless ``--override device``; returns whether
    the log now mixes streams.

    Args:
        outfile: the log.
        model: this run's device model.
        override: the ``--override`` flag.
    """
    recorded = read_sidecar(outfile, "--resume", "use another --outfile (or --overwrite to replace it)")
    for earlier in recorded_device_models(recorded.get("info", {})):
        reason = stream_difference(earlier, model)
        if reason is None:
            continue
        if "device" in parse_override(override):
            return True
        raise UserError(f"--resume: {outfile} was written on {describe_device_model(earlier)}, this run is on "
                        f"{describe_device_model(model)}, and one seed gives other noise there ({reason}): the log "
                        "would mix noise streams, its certificates valid but reproducible on no single device; resume "
                        "on the same device model, or pass --override device to accept that")
    return False


def add_device_model(outfile: Path, model: dict[str, Any]) -> None:
    """Add ``model`` to the device models the sidecar of ``outfile`` records (:func:`recorded_device_models`)."""
    recorded = read_sidecar(outfile, "--resume", "use another --outfile")
    models = recorded_device_models(recorded.get("info", {}))
    if model not in models:
        write_sidecar(outfile, recorded["config"], {**recorded.get("info", {}), "device_models": models + [model]})


def check_outputs(outfile: Path, config: dict[str, Any], resume: bool, overwrite: bool, resume_keys: Sequence[str],
                  defaults: Mapping[str, Any], row_type: Type[LogRow] = Row,
                  files: Optional[dict[str, tuple[str, str]]] = None) -> tuple[list[Path], dict[int, LogRow]]:
    """Read-only checks before anything is written: (existing output files, rows already done).

    An existing log, sidecar or part needs ``resume`` (checked against ``config``) or ``overwrite``, and must be a
    regular file the run may change (:func:`runkit.files.check_changeable`: not append-only or immutable).

    Args:
        outfile: the log.
        config: this run's configuration.
        resume, overwrite: the flags.
        resume_keys, defaults: as for :func:`check_resume`.
        row_type: the rows of the log.
        files: as for :func:`check_resume`.
    """
    existing = [p for p in [outfile, sidecar_path(outfile)] + existing_parts(outfile) if p.exists()]
    if existing and not (resume or overwrite):
        raise UserError(f"--outfile {outfile}: {existing[0]} already exists; pass --resume to continue it or "
                        "--overwrite to replace it")
    for path in existing:  # (appended to, cut back, replaced or removed below: each must be changeable)
        check_regular_file(path, f"--outfile {outfile}:")
        check_changeable(path, f"--outfile {outfile}: ")
    if resume and existing:
        check_resume(outfile, config, resume_keys, defaults, files=files)
    return existing, (read_done(outfile, row_type) if resume else {})


def prepare_outputs(outfile: Path, existing: Sequence[Path], overwrite: bool, config: dict[str, Any],
                    info: dict[str, Any]) -> None:
    """Rank 0, before any row is written: remove what ``overwrite`` replaces, write the sidecar if absent.

    Args:
        outfile: the log.
        existing: what :func:`check_outputs` found on disk.
        overwrite: the flag.
        config, info: what the sidecar records.
    """
    if overwrite:
        for path in existing:
            with writing(path):
                path.unlink()
    outfile.parent.mkdir(parents=True, exist_ok=True)
    if not sidecar_path(outfile).is_file():
        write_sidecar(outfile, config, info)
