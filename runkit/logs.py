"""Cohen-format certification logs: the one reader and writer (docs/METHOD.md section 5).

A log is tab-separated text, one header line, one row per image:

    idx  label  predict  radius  correct  time      (CERTIFY, :class:`Row`)
    idx  label  predict  radius  correct  time  n   (CERTIFY with the samples used, :class:`SampledRow`)
    idx  label  predict  correct  time              (PREDICT, :class:`PredictRow`)

``predict`` is :data:`ABSTAIN` (-1) when the smoothed classifier abstains, ``radius`` is written at full precision,
``correct`` is 0/1, ``time`` seconds. One parser, :func:`parse_log`, reads every log; two views sit on it:

* :func:`read_log` (analysis): tolerant of the variants found in the wild: ``time`` as seconds or
  ``H:MM:SS.ffffff``, ``correct`` as 0/1, True/False or a running total (diffusion_denoised_smoothing), extra
  columns (FT-CADIS's ``correct_num``), comma or whitespace separators, blank lines, a truncated last line.
  Correctness is always recomputed as ``predict == label and predict != -1``.
* :func:`read_rows` (resuming our own logs): the header must be exactly the row type's; a last line without its
  newline is the trace of an interrupted write and is left out (appending resumes before it); any other line that
  is not a row is an error naming the file and the line.

Every log of ours (these, and train.py's ``log.txt`` / ``log_steps.txt``) is appended to line by line, so its text
after the last newline is a torn write: :func:`complete_text` (the one reader of our logs' text) leaves it out.

Beside a log ``<outfile>`` live its configuration ``<outfile>.json`` (:mod:`runkit.sidecars`) and, while a
``torchrun`` run is under way, one part per rank ``<outfile>.rank<r>`` (:mod:`runkit.parts`). A run cut into
independent shards (Slurm arrays) writes one log per shard, ``<outfile>.shard<k>of<s>`` (:mod:`runkit.shards`).
This module imports neither torch nor the models: analysis starts fast.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence, TextIO, Type, TypeVar

import numpy as np
import pandas as pd

from runkit.errors import RunWarning, UserError
from runkit.files import check_regular_file, writing

ABSTAIN = -1  # the class a smoothed classifier returns when it abstains
COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
RESULT_COLUMNS = ("label", "predict", "radius")  # two rows of one idx that agree on these repeat one result
_TRUE = {"1", "true", "1.0"}
_FALSE = {"0", "false", "0.0"}
_TIMEDELTA = re.compile(r"^(?:(-?\d+) days?, )?(\d+):(\d{1,2}):(\d{1,2}(?:\.\d*)?)$")


class LogWarning(RunWarning):
    """Something in a log was repaired or ignored (a truncated last line, an inconsistent ``correct`` column)."""


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------


class LogRow:
    """Base of the row types: a frozen dataclass whose fields are the log's columns, in order."""

    FORMATS: ClassVar[dict[str, Callable[[Any], str]]] = {
        # repr: the shortest string that round-trips the float (Cohen's {:.3} loses precision)
        "radius": repr,
        "time": lambda seconds: f"{seconds:.4f}",
    }

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def header(cls) -> str:
        """The header line (without its newline)."""
        return "\t".join(cls.columns())

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> LogRow:
        """The row from parsed column values (see :func:`parse_log`), each converted to its field's type."""
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{name: _parser(name, str(kinds[name]))(values[name]) for name in cls.columns()})

    def line(self) -> str:
        """The row as a log line, with its newline."""
        return "\t".join(self.FORMATS.get(name, str)(getattr(self, name)) for name in self.columns()) + "\n"


@dataclass(frozen=True)
class Row(LogRow):
    """One certified image (CERTIFY): Cohen's columns."""

    idx: int
    label: int
    predict: int
    radius: float
    correct: int
    time: float


@dataclass(frozen=True)
class SampledRow(Row):
    """A CERTIFY row with the estimation samples it used, ``n`` (``certify.py --sequential`` / ``--skip_wrong``:
    0 for a row whose selection guess was wrong and skipped estimation)."""

    n: int


@dataclass(frozen=True)
class PredictRow(LogRow):
    """One predicted image (PREDICT): Cohen's columns."""

    idx: int
    label: int
    predict: int
    correct: int
    time: float


R = TypeVar("R", bound=LogRow)
HEADER = Row.header()
PREDICT_HEADER = PredictRow.header()


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------


def _parse_time(value: Any) -> float:
    """Seconds from ``12.3`` or ``H:MM:SS.ffffff`` (``str(datetime.timedelta)``, also ``1 day, H:MM:SS``)."""
    m = _TIMEDELTA.match(value) if isinstance(value, str) else None
    if m:
        days, hours, minutes, seconds = m.groups()
        return int(days or 0) * 86400.0 + int(hours) * 3600.0 + int(minutes) * 60.0 + float(seconds)
    return float(value)


def _parse_int(value: Any) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def _parse_correct(value: Any) -> int:
    """0/1, True/False, or a non-negative integer (a running total of correct rows)."""
    low = str(value).lower()
    if low in _TRUE:
        return 1
    if low in _FALSE:
        return 0
    number = _parse_int(value)
    if number < 0:
        raise ValueError(value)
    return number


_PARSERS: dict[str, Callable[[Any], Any]] = {"idx": _parse_int, "label": _parse_int, "predict": _parse_int,
                                             "radius": float, "correct": _parse_correct, "time": _parse_time}
_BY_TYPE: dict[str, Callable[[Any], Any]] = {"int": _parse_int, "float": float, "str": str}


def _parser(name: str, type_name: str = "str") -> Callable[[Any], Any]:
    """The parser of column ``name``: the standard columns' own, else by the row field's type."""
    return _PARSERS.get(name) or _BY_TYPE.get(type_name, str)


def _split_header(line: str) -> tuple[list[str], Optional[str]]:
    """Column names (the standard ones in lower case) and the separator: tab (Cohen), comma, or whitespace."""
    sep = "\t" if "\t" in line else ("," if "," in line else None)
    names = [name.strip() for name in line.split(sep)]
    return [name.lower() if name.lower() in COLUMNS else name for name in names], sep


@dataclass
class ParsedLog:
    """What :func:`parse_log` found: the header line and its column names, and the rows as typed values."""

    path: Path
    header: str
    names: list[str]
    rows: list[list[Any]]  # standard columns parsed, other columns as the strings written
    line_numbers: list[int]
    dropped: int = 0  # 1 when an incomplete last line was left out


def read_text(path: str | Path) -> str:
    """A log file's text; a one-line :class:`UserError` naming the file when it is missing, a folder or not text."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a log file (the CLI expands directories)")
    if not check_regular_file(path):
        raise UserError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    if b"\0" in data:
        raise UserError(f"{path}: not a text log (binary data); expected a tab-separated certification log")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text log (not UTF-8); expected a tab-separated certification log") from None


def parse_log(path: str | Path, text: str, strict: bool = False) -> Optional[ParsedLog]:
    """Parse a log's ``text`` (``path`` only names it in errors); None when it holds no line at all.

    The header must have ``label`` and ``predict``. Blank lines are skipped. A malformed last line is left out
    (with a :class:`LogWarning`) unless ``strict``; any other malformed line is a :class:`UserError` naming it.

    Args:
        path: names the log in errors and warnings.
        text: the log's content.
        strict: a malformed last line is an error too.
    """
    path = Path(path)
    lines = [(num, line.rstrip("\r\n")) for num, line in enumerate(text.split("\n"), start=1)]
    lines = [(num, line) for num, line in lines if line.strip()]
    if not lines:
        return None
    names, sep = _split_header(lines[0][1])
    if "label" not in names or "predict" not in names:
        missing = ", ".join(c for c in ("label", "predict") if c not in names)
        raise UserError(f"{path}: not a certification log: no column {missing} in the first line "
                        f"{lines[0][1][:80]!r} (expected 'idx label predict radius correct time')")
    if len(set(names)) != len(names):
        raise UserError(f"{path}: repeated column names in the header {lines[0][1]!r}")
    parsed = ParsedLog(path, lines[0][1], names, [], [])
    parsers = [_parser(name) for name in names]
    body = lines[1:]
    for k, (num, line) in enumerate(body):
        fields = [field.strip() for field in line.split(sep)]
        try:
            if len(fields) != len(names):
                raise ValueError(f"{len(fields)} fields, the header has {len(names)}")
            parsed.rows.append([parse(field) for parse, field in zip(parsers, fields)])
            parsed.line_numbers.append(num)
        except ValueError as err:
            if not strict and k == len(body) - 1 and len(fields) <= len(names):
                parsed.dropped = 1
                warnings.warn(f"{path}: dropped the incomplete last line {num} ({line[:60]!r})", LogWarning,
                              stacklevel=3)
                break
            raise UserError(f"{path}: line {num} is malformed ({err}): {line[:80]!r}; repair or remove it"
                            ) from None
    return parsed


# ---------------------------------------------------------------------------------------------------------------
# Any log, for analysis
# ---------------------------------------------------------------------------------------------------------------


def _as_number(values: list[str]) -> np.ndarray | list[str]:
    """An extra column as numbers when every value is one, else as the strings it holds."""
    try:
        return np.array([float(v) for v in values])
    except ValueError:
        return values


def read_log(path: str | Path) -> pd.DataFrame:
    """Read a CERTIFY or PREDICT log into a DataFrame.

    Columns: ``idx``, ``label``, ``predict`` (int; -1 = abstain), ``radius`` (float; NaN for a PREDICT log),
    ``correct`` (bool, recomputed as ``predict == label and predict != -1``), ``time`` (seconds; NaN if absent),
    then any extra columns of the file. ``df.attrs`` holds ``path``, ``kind`` (``"certify"``/``"predict"``),
    ``correct_column`` (``"flags"``, ``"running total"``, ``"inconsistent"`` or ``"absent"``) and ``dropped``
    (1 when an incomplete last line was dropped). Raises :class:`UserError` naming the file when it is missing,
    empty, not text, lacks the ``label``/``predict`` columns or has a malformed row.
    """
    path = Path(path)
    parsed = parse_log(path, read_text(path))
    if parsed is None:
        raise UserError(f"{path}: empty file; expected a header 'idx label predict radius correct time' and rows")
    if not parsed.rows:
        raise UserError(f"{path}: no complete rows after the header")
    rows, _ = _checked_rows(path, parsed.names, parsed.rows, parsed.line_numbers)
    names, n = parsed.names, len(rows)
    cols = dict(zip(names, map(list, zip(*rows))))
    label = np.asarray(cols["label"], dtype=np.int64)
    predict = np.asarray(cols["predict"], dtype=np.int64)
    correct = (predict == label) & (predict != ABSTAIN)
    df = pd.DataFrame({
        "idx": np.asarray(cols["idx"], dtype=np.int64) if "idx" in cols else np.arange(n, dtype=np.int64),
        "label": label,
        "predict": predict,
        "radius": np.asarray(cols["radius"], dtype=np.float64) if "radius" in cols else np.full(n, np.nan),
        "correct": correct,
        "time": np.asarray(cols["time"], dtype=np.float64) if "time" in cols else np.full(n, np.nan),
    })
    for name in names:
        if name not in COLUMNS:
            df[name] = _as_number(cols[name])
    df.attrs.update(path=str(path), kind="certify" if "radius" in cols else "predict", dropped=parsed.dropped,
                    correct_column=_check_correct(path, cols.get("correct"), correct))
    return df


def _checked_rows(path: Path, names: list[str], rows: list[list], line_numbers: list[int]
                  ) -> tuple[list[list], list[int]]:
    """Refuse impossible radii; drop repeated idx rows that repeat the same result, refuse conflicting ones.

    A certified radius is a finite number >= 0 (CERTIFY writes 0 for an abstention), so a NaN, infinite or negative
    radius is an error naming its line: it would otherwise count as "not certified" (NaN) or break the table (inf).
    An idx that appears twice with the same label, prediction and radius is what an appended re-run of an image
    leaves (a restarted Cohen-era script): its later rows are skipped with a warning. Two rows of one idx that
    disagree are an error naming both lines: the log mixes two runs.
    """
    radius = names.index("radius") if "radius" in names else None
    idx = names.index("idx") if "idx" in names else None
    key = [names.index(c) for c in RESULT_COLUMNS if c in names]
    first: dict[int, tuple[int, list]] = {}
    kept, kept_lines, repeated = [], [], []
    for row, num in zip(rows, line_numbers):
        if radius is not None:
            _check_radius(path, row[radius], num)
        if idx is not None and row[idx] in first:
            num0, row0 = first[row[idx]]
            if [row0[i] for i in key] != [row[i] for i in key]:
                raise UserError(f"{path}: lines {num0} and {num} both certify idx {row[idx]} with different "
                                "results (the log mixes two runs); keep one of them")
            repeated.append(num)
            continue
        if idx is not None:
            first[row[idx]] = (num, row)
        kept.append(row)
        kept_lines.append(num)
    if repeated:
        warnings.warn(f"{path}: skipped {len(repeated)} repeated row(s) of an idx already read with the same result "
                      f"(line(s) {', '.join(map(str, repeated[:5]))}{', ...' if len(repeated) > 5 else ''})",
                      LogWarning, stacklevel=3)
    return kept, kept_lines


def _check_radius(path: Path, radius: float, num: int) -> None:
    """Refuse a radius that no certification gives (NaN, infinite, negative), naming the file and the line."""
    if not (math.isfinite(radius) and radius >= 0):
        raise UserError(f"{path}: line {num} has radius {radius}; a certified radius is a finite number >= 0 (the log "
                        "is corrupt: repair or remove that line)")


def _check_correct(path: Path, written: Optional[list[int]], correct: np.ndarray) -> str:
    """How the file's ``correct`` column relates to ``predict == label``; warn when it disagrees."""
    if written is None:
        return "absent"
    written = np.asarray(written, dtype=np.int64)
    if np.array_equal(written, correct.astype(np.int64)):
        return "flags"
    steps = np.diff(written, prepend=written[0] - int(correct[0]))
    if np.array_equal(steps, correct.astype(np.int64)):  # a running total (possibly resumed, with an offset)
        return "running total"
    if written.max() <= 1:
        bad = int((written != correct).sum())
    else:
        bad = int((steps != correct).sum())
    warnings.warn(f"{path}: the 'correct' column disagrees with predict == label on {bad} row(s); "
                  f"using predict == label", LogWarning, stacklevel=3)
    return "inconsistent"


def is_log(path: str | Path) -> bool:
    """Whether ``path`` is a text file whose first non-blank line is a log header (has label and predict)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        if b"\0" in head:
            return False
        for line in head.decode("utf-8", errors="replace").splitlines():
            if line.strip():
                names, _ = _split_header(line)
                return "label" in names and "predict" in names
    except OSError:
        pass
    return False


def expand_logs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; a directory becomes the logs found under it (sorted, hidden files skipped)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file()
                           and not any(part.startswith(".") for part in q.relative_to(p).parts) and is_log(q))
            if not found:
                raise UserError(f"{p}: directory holds no certification logs (files whose header has "
                                f"label and predict)")
            out.extend(found)
        else:
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Our own logs: complete lines, strict rows, appending
# ---------------------------------------------------------------------------------------------------------------


def complete_text(path: Path) -> tuple[str, int]:
    """The complete lines of one of our logs (of any kind: a certification log, a rank part, a shard log, train.py's
    ``log.txt`` / ``log_steps.txt``) as text, and the byte length they occupy.

    Our logs are appended to line by line, so the text after the last newline is the trace of an interrupted write
    (a torn last line): it is not part of the log, and appending resumes before it.

    Args:
        path: the log.
    """
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8", errors="replace"), end


def complete_lines(path: Path) -> list[str]:
    """The complete lines of one of our logs (:func:`complete_text`), without their line ends.

    Args:
        path: the log.
    """
    return [line.rstrip("\r") for line in complete_text(path)[0].split("\n")[:-1]]


def read_rows(path: Path, row_type: Type[R] = Row) -> tuple[dict[int, R], int]:  # type: ignore[assignment]
    """The complete rows (by idx) of one of our logs or parts, and the byte length they occupy.

    A last line without its newline is the trace of an interrupted write: it is not a row, and the returned length
    stops before it (appending resumes there). A header other than ``row_type``'s, or any other line that is not a
    row, is a :class:`UserError` naming the file; so are a radius no run writes (NaN, infinite, negative) and two rows
    of one idx with different results (the file mixes two runs), while a repeat of the same result is skipped with a
    :class:`LogWarning` (as :func:`read_log` does). A resume reads its logs before any work.

    Args:
        path: the log or part.
        row_type: the row type whose header the file must have.
    """
    text, end = complete_text(path)
    parsed = parse_log(path, text, strict=True) if end else None
    if parsed is None:
        return {}, 0
    if parsed.header != row_type.header():
        raise UserError(f"{path}: not a log of this kind (first line {parsed.header[:60]!r}, expected the header "
                        f"{row_type.header()!r}); move it away or use --overwrite")
    rows: dict[int, R] = {}
    for values in _checked_rows(path, parsed.names, parsed.rows, parsed.line_numbers)[0]:
        row = row_type.from_values(dict(zip(parsed.names, values)))
        rows[row.idx] = row  # type: ignore[attr-defined]
    return rows, end


def numbered_siblings(outfile: Path, suffix: str) -> list[tuple[tuple[int, ...], Path]]:
    """Files ``<outfile><suffix>`` beside ``outfile`` (``suffix`` a regex whose groups are integers), sorted by them."""
    pattern = re.compile(re.escape(outfile.name) + suffix + "$")
    if not outfile.parent.is_dir():
        return []
    found = [(tuple(map(int, m.groups())), p) for p in outfile.parent.iterdir() if (m := pattern.match(p.name))]
    return sorted(found)


def idx_list(idx: Sequence[int], shown: int = 20) -> str:
    """``1, 4, 7`` or, for many, the first ones, ``...`` and the last one, with the count."""
    idx = sorted(idx)
    if len(idx) <= shown:
        return ", ".join(map(str, idx))
    return ", ".join(map(str, idx[:shown - 1])) + f", ..., {idx[-1]} ({len(idx)} in all)"


@contextlib.contextmanager
def open_for_append(path: Path, row_type: Type[LogRow] = Row) -> Iterator[TextIO]:
    """A log or part open for appending rows, for the block: a half-written last line dropped, the header written if
    new. A failed write (:func:`runkit.files.writing`: a :class:`~runkit.errors.WriteError` naming ``path``) is not
    hidden by the close after it, which retries the write; what was written before stays (a row cut short is the
    half-written last line a resume drops).

    Args:
        path: the log or part.
        row_type: the rows of the log.
    """
    with warnings.catch_warnings():  # (what the rows hold was reported when they were read for the resume)
        warnings.simplefilter("ignore", LogWarning)
        length = read_rows(path, row_type)[1] if path.is_file() else 0
    with writing(path):
        log = open(path, "r+" if path.is_file() else "w", encoding="utf-8")
    try:
        with writing(path):
            log.truncate(length)
            log.seek(length)
            if length == 0:
                log.write(row_type.header() + "\n")
                log.flush()
        yield log
    except BaseException:
        with contextlib.suppress(OSError):
            log.close()
        raise
    with writing(path):
        log.close()


def format_log(rows: Sequence[LogRow], row_type: Type[LogRow] = Row) -> str:
    """The text of a log holding ``rows`` in the given order.

    Args:
        rows: the rows.
        row_type: gives the header.
    """
    return row_type.header() + "\n" + "".join(r.line() for r in rows)


