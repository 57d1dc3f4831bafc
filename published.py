"""Published certified-accuracy tables as data (``tables/*.json``): what ``analyze.py --compare`` prints beside logs.

One JSON file per source table, copied from its source digit for digit (the file names the paper, the exact file or
table the numbers come from, and the table number where it is known):

    {"name": ..., "paper": ..., "source": ..., "table": <number or null>, "dataset": "cifar10", "split": "test",
     "metric": "approximate certified accuracy", "scale": "fraction" | "percent", "decimals": 2,
     "radii": [0.25, ...], "acr": false, "acr_decimals": 3,
     "rows": [{"method": ..., "sigma": 0.5, "accuracy": [one value per radius], "acr": <value, where "acr">}]}

``scale`` and ``decimals`` are the table's own: a value is compared with one of ours rounded the way the table
writes it (:meth:`PublishedTable.rounded`), so a published number and ours from the same experiment differ by 0.0
points. :func:`load_tables` checks every file (:func:`check_table`); importable without torch.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from runkit.errors import UserError

TABLES = Path(__file__).resolve().parent / "tables"
SCALES = {"fraction": 1.0, "percent": 100.0}  # what 1.0 (every image certified) is written as


@dataclass(frozen=True)
class PublishedRow:
    """One method at one sigma: certified accuracy at the table's radii (as written), ACR where the table gives it."""

    method: str
    sigma: float
    accuracy: tuple[float, ...]
    acr: Optional[float] = None


@dataclass(frozen=True)
class PublishedTable:
    """One published table (a file of ``tables/``); see the module docstring for the fields."""

    name: str
    paper: str
    source: str
    table: Optional[str]
    dataset: str
    split: str
    scale: str
    decimals: int
    radii: tuple[float, ...]
    has_acr: bool
    acr_decimals: int
    rows: tuple[PublishedRow, ...]

    def fraction(self, value: float) -> float:
        """A value of the table as a fraction of the images (0.55 for 55 %)."""
        return value / SCALES[self.scale]

    def rounded(self, fraction: float) -> float:
        """Our ``fraction`` written as the table writes its values (its scale, its decimals), as a fraction."""
        return self.fraction(float(f"{fraction * SCALES[self.scale]:.{self.decimals}f}"))

    def points_decimals(self) -> int:
        """The table's decimals in percentage points (a fraction to 2 decimals: whole points)."""
        return max(0, self.decimals - (2 if self.scale == "fraction" else 0))

    def at(self, row: PublishedRow, radius: float) -> Optional[float]:
        """The row's certified accuracy (a fraction) at ``radius``, or None where the table has no such radius."""
        for r, value in zip(self.radii, row.accuracy):
            if math.isclose(r, radius, rel_tol=0, abs_tol=1e-9):
                return self.fraction(value)
        return None


def _fail(path: Path, what: str) -> UserError:
    return UserError(f"{path}: not a published table of this kind: {what}")


def _decimals_ok(value: float, decimals: int) -> bool:
    return math.isclose(round(value, decimals), value, rel_tol=0, abs_tol=1e-9)


def _check_rows(path: Path, data: dict[str, Any], radii: tuple[float, ...]) -> tuple[PublishedRow, ...]:
    """The rows, each complete and within the table's scale and decimals; (method, sigma) pairs distinct."""
    top, rows = SCALES[data["scale"]], []
    for k, row in enumerate(data["rows"]):
        acc, acr = tuple(float(v) for v in row["accuracy"]), row.get("acr")
        if len(acc) != len(radii):
            raise _fail(path, f"row {k} has {len(acc)} accuracies for {len(radii)} radii")
        if not all(0 <= v <= top and _decimals_ok(v, data["decimals"]) for v in acc):
            raise _fail(path, f"row {k}: accuracies must lie in [0, {top:g}] with at most {data['decimals']} decimals")
        if any(later > earlier + 1e-9 for earlier, later in zip(acc, acc[1:])):
            raise _fail(path, f"row {k}: certified accuracy grows with the radius")
        if data["acr"] != (acr is not None) or (acr is not None and not (math.isfinite(acr) and acr >= 0)):
            raise _fail(path, f"row {k}: an ACR >= 0 is needed exactly where the table has \"acr\": true")
        sigma = float(row["sigma"])
        if not (math.isfinite(sigma) and sigma > 0):
            raise _fail(path, f"row {k}: sigma {sigma} is not a noise level")
        rows.append(PublishedRow(str(row["method"]), sigma, acc, None if acr is None else float(acr)))
    if len({(r.method, r.sigma) for r in rows}) != len(rows) or not rows:
        raise _fail(path, "no rows, or a (method, sigma) pair twice")
    return tuple(rows)


def check_table(path: Path, data: Any) -> PublishedTable:
    """``data`` (a parsed file) as a :class:`PublishedTable`, or a :class:`UserError` naming ``path`` and what is
    wrong: a field missing, radii not increasing from >= 0, a row incomplete or outside the table's scale.

    Args:
        path: the file (for errors).
        data: its parsed JSON.
    """
    fields = ("name", "paper", "source", "table", "dataset", "split", "scale", "decimals", "radii", "acr", "rows")
    if not isinstance(data, dict) or any(f not in data for f in fields):
        raise _fail(path, f"needs the fields {', '.join(fields)}")
    if data["scale"] not in SCALES or not isinstance(data["decimals"], int) or data["name"] != path.stem:
        raise _fail(path, f"scale must be one of {', '.join(SCALES)}, decimals an integer, name the file's stem")
    radii = tuple(float(r) for r in data["radii"])
    if not radii or radii[0] < 0 or any(b <= a for a, b in zip(radii, radii[1:])):
        raise _fail(path, f"radii must increase from >= 0, got {list(radii)}")
    return PublishedTable(name=data["name"], paper=data["paper"], source=data["source"],
                          table=None if data["table"] is None else str(data["table"]), dataset=data["dataset"],
                          split=data["split"], scale=data["scale"], decimals=data["decimals"], radii=radii,
                          has_acr=bool(data["acr"]), acr_decimals=int(data.get("acr_decimals", 3)),
                          rows=_check_rows(path, data, radii))


def load_tables(folder: Path = TABLES) -> list[PublishedTable]:
    """Every table in ``folder`` (``*.json``, by name), checked (:func:`check_table`).

    Args:
        folder: where the tables are.
    """
    tables = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise _fail(path, f"not JSON ({err})") from None
        tables.append(check_table(path, data))
    return tables


def matching_rows(tables: Sequence[PublishedTable], dataset: str, sigma: float,
                  split: Optional[str] = None) -> list[tuple[PublishedTable, PublishedRow]]:
    """The published rows of ``dataset`` at noise level ``sigma`` (and ``split``, where known), table by table.

    Args:
        tables: from :func:`load_tables`.
        dataset: the log's dataset.
        sigma: the log's sigma.
        split: the log's split; None: any.
    """
    return [(t, row) for t in tables if t.dataset == dataset and split in (None, t.split)
            for row in t.rows if math.isclose(row.sigma, sigma, rel_tol=0, abs_tol=1e-9)]
