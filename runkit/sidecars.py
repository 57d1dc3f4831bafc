"""The configuration beside an output: ``<outfile>.json``, ``{"config": ..., "info": ...}``: what determines the
output's content (``config``, checked on resume) and what is only information about the run (``info``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runkit.errors import UserError
from runkit.files import atomic_write_text, check_regular_file


def sidecar_path(outfile: Path) -> Path:
    """``<outfile>.json``: the configuration a log was written with."""
    return outfile.with_name(outfile.name + ".json")


def write_sidecar(outfile: Path, config: dict[str, Any], info: dict[str, Any]) -> None:
    """Write ``{"config": config, "info": info}`` to :func:`sidecar_path` (atomically): what determines the rows
    (``config``) and what is only information about the run (``info``).

    Args:
        outfile: the log.
        config: what determines its rows.
        info: information about the run.
    """
    atomic_write_text(sidecar_path(outfile), json.dumps({"config": config, "info": info}, indent=1) + "\n")


def read_sidecar(outfile: Path, flag: str, advice: str) -> dict[str, Any]:
    """The ``{"config": ..., "info": ...}`` recorded beside a log; a :class:`UserError` starting with ``flag`` and
    ending with ``advice`` when it is absent, no regular file, not JSON, or not one.

    Args:
        outfile: the log.
        flag: the flag that names it (the error's start; empty: none).
        advice: what to do (the error's end).
    """
    side, start = sidecar_path(outfile), f"{flag}: " if flag else ""
    if not check_regular_file(side, flag):
        raise UserError(f"{start}{outfile} has no configuration file {side.name} beside it, so it cannot be checked "
                        f"against this run; {advice}")
    try:
        recorded = json.loads(side.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{start}{side} is corrupt (not UTF-8 text); {advice}") from None
    except ValueError as err:
        raise UserError(f"{start}{side} is corrupt (not valid JSON: {err}); {advice}") from None
    if not (isinstance(recorded, dict) and isinstance(recorded.get("config"), dict)):
        raise UserError(f"{start}{side} is not a configuration file of this kind (no \"config\"); {advice}")
    return recorded
