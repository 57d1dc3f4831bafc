"""Certified-accuracy tables, ACR and plots from Cohen-style certification logs (METHOD §5): the library.

A log is tab-separated with the header ``idx label predict radius correct time`` (CERTIFY, Cohen et al. 2019)
or ``idx label predict correct time`` (PREDICT). Logs from other repositories vary; :func:`read_log` accepts
``time`` as seconds or ``H:MM:SS.ffffff``, ``correct`` as 0/1, True/False or a running total
(diffusion_denoised_smoothing), an extra ``correct_num`` column (FT-CADIS) or any other extra column, blank
lines and a truncated last line. Correctness is always ``predict == label and predict != -1``.

Metrics on a log of n rows (abstentions, ``predict == -1``, count as wrong):

* approximate certified accuracy  acc(r) = (1/n) sum_i 1[correct_i and radius_i >= r];
* Cohen's high-probability accuracy  acc(r) - alpha - sqrt(alpha (1 - alpha) log(1/rho) / n) - log(1/rho) / (3n);
* average certified radius  ACR = (1/n) sum_i correct_i * radius_i;
* clean accuracy of the smoothed classifier  (1/n) sum_i correct_i;  abstention rate  (1/n) sum_i 1[predict_i = -1];
* the envelope of several curves (e.g. best over sigma): the pointwise maximum.

The command line is ``analyze.py``; this module is its library (importable without torch).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import pandas as pd

from presets import DATASETS
from runkit.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
from runkit.files import atomic_save_figure
from runkit.logs import ABSTAIN, LogWarning, complete_lines, expand_logs, is_log, read_log  # noqa: F401 (re-exported)
from runkit.sidecars import read_sidecar, sidecar_path

FORMATS = ("table", "markdown", "latex", "csv")
PLOT_SUFFIXES = (".png", ".pdf")


# ---------------------------------------------------------------------------------------------------------------
# Labels (reading logs: logs.py)
# ---------------------------------------------------------------------------------------------------------------


def default_labels(paths: Sequence[str | Path]) -> list[str]:
    """Short distinguishing labels from paths: the path components not shared by all of them.

    One log: its last three components (``noise_0.50/test/sigma_0.50``). Several: components common to every
    path are dropped (``.../noise_0.25/test/sigma_0.25`` and ``.../noise_0.50/test/sigma_0.50`` ->
    ``noise_0.25/sigma_0.25``, ``noise_0.50/sigma_0.50``); the file name is always kept.
    """
    if len(paths) == 1:
        return ["/".join(Path(paths[0]).parts[-3:])]
    parts = [Path(p).resolve().parts for p in paths]
    common = set.intersection(*(set(p[:-1]) for p in parts))
    labels = ["/".join([c for c in p[:-1] if c not in common] + [p[-1]]) for p in parts]
    if len(set(labels)) < len(labels):  # identical leftovers: fall back to the paths as given
        labels = [str(p) for p in paths]
    return labels


# ---------------------------------------------------------------------------------------------------------------
# What a log's sidecar (or path) says: sigma, mode
# ---------------------------------------------------------------------------------------------------------------


class LowerBoundWarning(UserWarning):
    """An ACR asked of a sequential CERTIFY log: its radius column is the radius at the stop, so the ACR is a lower
    bound on the fixed-N one."""


def log_config(path: Optional[str | Path]) -> dict:
    """The configuration recorded beside a log (``config`` of its sidecar ``<log>.json``); ``{}`` when it has none
    (a corrupt one is a :class:`UserError`: it would be taken for none)."""
    if path is None or not sidecar_path(Path(path)).exists():
        return {}
    return read_sidecar(Path(path), "", "repair it, or remove it to read the log without it")["config"]


def is_sequential(path: Optional[str | Path]) -> bool:
    """Whether a log is sequential CERTIFY's (its sidecar records mode ``sequential``): its radius column is the
    radius at the stop, a valid certificate but below the fixed-N radius, so its ACR is only a lower bound."""
    return log_config(path).get("mode") == "sequential"


_SIGMA_IN_NAME = re.compile(r"(?:^|[^a-z])sigma[_=-]?(\d+(?:\.\d+)?)", re.IGNORECASE)


def log_sigma(path: str | Path) -> Optional[float]:
    """The noise level sigma a log was certified at, or None when nothing says it.

    Read from ``config.sigma`` of the log's sidecar ``<log>.json`` (certify.py writes it), else from the nearest path
    component with ``sigma_<s>`` (Cohen's layout ``.../noise_0.50/test/sigma_0.50``).
    """
    try:
        sigma = float(log_config(path)["sigma"])
    except (ValueError, KeyError, TypeError):  # no sidecar of ours, or one without a sigma
        sigma = None
    if sigma is not None:
        return check_sigma(sigma, f"{sidecar_path(Path(path))}: records sigma {sigma:g}")
    for part in reversed(Path(path).parts):
        match = _SIGMA_IN_NAME.search(part)
        if match:
            return float(match.group(1))
    return None


def log_dataset(path: str | Path, datasets: Sequence[str] = DATASETS) -> Optional[str]:
    """The dataset a log was certified on, or None when nothing says it: ``config.dataset`` of its sidecar, else the
    nearest path component that names one of ``datasets`` (Cohen's layout ``certify/cifar10/resnet110/...``).

    Args:
        path: the log.
        datasets: the names a path component may give.
    """
    recorded = log_config(path).get("dataset")
    if isinstance(recorded, str):
        return recorded
    return next((part.lower() for part in reversed(Path(path).parts[:-1]) if part.lower() in datasets), None)


def log_split(path: str | Path) -> Optional[str]:
    """The split a log was certified on (``config.split`` of its sidecar, else a path component ``train`` or
    ``test``, Cohen's layout), or None."""
    recorded = log_config(path).get("split")
    if isinstance(recorded, str):
        return recorded
    return next((part for part in reversed(Path(path).parts[:-1]) if part in ("train", "test")), None)


def check_sigma(sigma: float, where: str) -> float:
    """``sigma`` when it is a noise level (a finite number > 0); else a :class:`UserError` starting with ``where``.

    Args:
        sigma: the value.
        where: what gave it (the error's start).
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise UserError(f"{where}: a noise level sigma is a finite number > 0")
    return sigma


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def _radii(df: pd.DataFrame, what: str) -> np.ndarray:
    if df.attrs.get("kind") == "predict" or df["radius"].isna().all():
        raise UserError(f"{df.attrs.get('path', 'log')}: a PREDICT log (no radius column) has no {what}; "
                        f"only clean accuracy and abstention rate")
    return df["radius"].to_numpy()


def radius_grid(start: float, stop: float, step: float, flag: str = "--radii", limit: int = 1000) -> np.ndarray:
    """start, start + step, ..., up to and including stop (rounded to 10 decimals, so 0.1*3 == 0.3).

    Args:
        start, stop, step: the grid; 0 <= start <= stop, step > 0.
        flag: what errors name (the CLI flag or the API call the values came from).
        limit: the most radii accepted.
    """
    if not (math.isfinite(start) and math.isfinite(stop) and math.isfinite(step)):
        raise UserError(f"{flag} {start} {stop} {step}: values must be finite")
    if step <= 0 or start < 0 or stop < start:
        raise UserError(f"{flag} {start} {stop} {step}: need 0 <= START <= STOP and STEP > 0")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > limit:
        raise UserError(f"{flag} {start} {stop} {step}: {count} radii is too many (at most {limit})")
    return np.round(start + step * np.arange(count), 10)


def certified_accuracy(df: pd.DataFrame, radii: Sequence[float] | np.ndarray) -> np.ndarray:
    """Approximate certified accuracy (1/n) sum_i 1[correct_i and radius_i >= r] at each r in ``radii``.

    Args:
        df: a CERTIFY log (:func:`read_log`).
        radii: the radii r.
    """
    radius = _radii(df, "certified accuracy")
    r = np.round(np.asarray(radii, dtype=np.float64), 10)
    correct = df["correct"].to_numpy(dtype=bool)
    return ((radius[None, :] >= r[:, None]) & correct[None, :]).mean(axis=1)


def high_prob_certified_accuracy(df: pd.DataFrame, radii: Sequence[float] | np.ndarray, alpha: float,
                                 rho: float) -> np.ndarray:
    """Cohen et al.'s bound, holding with probability >= 1 - rho over the draw of the n test points:
    acc(r) - alpha - sqrt(alpha (1 - alpha) log(1/rho) / n) - log(1/rho) / (3n).

    Args:
        df: a CERTIFY log (:func:`read_log`).
        radii: the radii r.
        alpha: the certification's failure probability.
        rho: the failure probability of the bound.
    """
    if not (0 < alpha < 1 and 0 < rho < 1):
        raise UserError(f"--high-prob {alpha} {rho}: ALPHA and RHO must lie in (0, 1)")
    n = len(df)
    log_term = math.log(1 / rho)
    return (certified_accuracy(df, radii) - alpha - math.sqrt(alpha * (1 - alpha) * log_term / n)
            - log_term / (3 * n))


def acr(df: pd.DataFrame) -> float:
    """Average certified radius (1/n) sum_i correct_i * radius_i (wrong and abstained rows count 0)."""
    radius = _radii(df, "ACR")
    return float(np.where(df["correct"].to_numpy(dtype=bool), radius, 0.0).mean())


def abstention_rate(df: pd.DataFrame) -> float:
    """Share of rows where the smoothed classifier abstained (predict == -1)."""
    return float((df["predict"].to_numpy() == ABSTAIN).mean())


def clean_accuracy(df: pd.DataFrame) -> float:
    """Accuracy of the smoothed classifier's prediction (abstentions are wrong); = certified accuracy at r = 0."""
    return float(df["correct"].to_numpy(dtype=bool).mean())


def envelope(curves: Sequence[Sequence[float] | np.ndarray]) -> np.ndarray:
    """Pointwise maximum of curves on the same radii (e.g. the best over sigma at each radius)."""
    if len(curves) == 0:
        raise ValueError("envelope of no curves")
    stacked = np.vstack([np.asarray(c, dtype=np.float64) for c in curves])
    return stacked.max(axis=0)


def default_radii(dfs: Sequence[pd.DataFrame]) -> np.ndarray:
    """0 to the largest radius of a correct row, in steps of 0.25, 0.5, 1, 2, 5, ... (at most 9 radii)."""
    certs = [df for df in dfs if df.attrs.get("kind") != "predict"]
    if not certs:
        return np.zeros(0)
    max_r = max(float(df["radius"][df["correct"]].max()) if df["correct"].any() else 0.0 for df in certs)
    step = 0.25
    while max_r / step > 8:
        step = {0.25: 0.5, 0.5: 1.0, 1.0: 2.0, 2.0: 5.0}.get(step, step * 2)
    return radius_grid(0.0, math.floor(max_r / step + 1e-9) * step, step)


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------

ENVELOPE_LABEL = "envelope (best)"
STAT_COLUMNS = ("ACR", "clean", "abstain", "n")
ACR_BOUND = "ACR≥"  # the ACR of a sequential CERTIFY log: a lower bound (:func:`is_sequential`)
SAMPLES_COLUMN = "samples/img"  # the mean of a log's column n (estimation samples used), where it has one


def radius_names(radii: np.ndarray) -> list[str]:
    """Column names for radii, with as many decimals as they need (at least 2)."""
    decimals = 2
    while decimals < 6 and np.any(np.abs(np.round(radii, decimals) - radii) > 1e-9):
        decimals += 1
    return [f"{r:.{decimals}f}" for r in radii]


def summary_table(dfs: Sequence[pd.DataFrame], labels: Sequence[str], radii: np.ndarray,
                  high_prob: Optional[tuple[float, float]] = None, with_envelope: bool = False) -> pd.DataFrame:
    """One row per log: certified accuracy at each radius (approximate, or Cohen's high-probability bound with
    ``high_prob = (alpha, rho)``), ACR, clean accuracy, abstention rate, n; and, when a log has the column ``n``
    (certify.py --sequential / --skip_wrong), samples/img, its mean. A sequential CERTIFY log's ACR is a lower bound
    (:func:`is_sequential`): it goes in the column ``ACR≥`` (:data:`ACR_BOUND`), never in ``ACR``. PREDICT logs get
    NaN where a radius is needed. ``with_envelope`` adds a last row with the best certified accuracy over the logs
    at each radius.

    Args:
        dfs: the logs (:func:`read_log`).
        labels: one name per log.
        radii: the radii of the certified-accuracy columns.
        high_prob: (alpha, rho) for Cohen's bound; None: approximate accuracy.
        with_envelope: add the best-over-logs row.
    """
    names = radius_names(radii)
    rows = []
    for df in dfs:
        row = dict.fromkeys(names, np.nan)
        row.update(ACR=np.nan, clean=clean_accuracy(df), abstain=abstention_rate(df), n=len(df))
        if df.attrs.get("kind") != "predict":
            acc = (high_prob_certified_accuracy(df, radii, *high_prob) if high_prob
                   else certified_accuracy(df, radii))
            row.update(zip(names, acc))
            row[ACR_BOUND if is_sequential(df.attrs.get("path")) else "ACR"] = acr(df)
        if "n" in df.columns:  # certify.py --sequential / --skip_wrong: the estimation samples of each image
            row[SAMPLES_COLUMN] = float(df["n"].mean())
        rows.append(row)
    samples = [SAMPLES_COLUMN] if any(SAMPLES_COLUMN in row for row in rows) else []
    stats = ["ACR", *([ACR_BOUND] if any(ACR_BOUND in row for row in rows) else []), *STAT_COLUMNS[1:]]
    table = pd.DataFrame(rows, index=pd.Index(list(labels), name="log"), columns=[*names, *stats, *samples])
    if with_envelope:
        curves = [table.loc[lab, names].to_numpy(dtype=np.float64)
                  for lab, df in zip(labels, dfs) if df.attrs.get("kind") != "predict"]
        if not curves:
            raise UserError("--envelope: needs at least one CERTIFY log (with a radius column)")
        best = dict.fromkeys(table.columns, np.nan)
        best.update(zip(names, envelope(curves)))
        table.loc[ENVELOPE_LABEL] = best
    table.attrs.update(radii=radii, radius_columns=names, high_prob=high_prob, envelope=with_envelope)
    return table


def best_mask(table: pd.DataFrame) -> pd.DataFrame:
    """True where a value is the column's best over the logs (ties all count; the envelope row is excluded).

    Columns: the radii, ACR and clean accuracy (higher is better); a column with fewer than 2 values, or with all
    values equal, has none."""
    mask = pd.DataFrame(False, index=table.index, columns=table.columns)
    rows = [lab for lab in table.index if not (table.attrs.get("envelope") and lab == ENVELOPE_LABEL)]
    for col in [*table.attrs["radius_columns"], "ACR", "clean"]:
        values = table.loc[rows, col].astype(float)
        if values.notna().sum() >= 2 and values.max() > values.min():  # all equal: nothing stands out
            mask.loc[rows, col] = np.isclose(values, values.max(), rtol=0, atol=1e-12) & values.notna()
    return mask


def _cell(col: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if col == SAMPLES_COLUMN:
        return f"{value:.0f}"
    return str(int(value)) if col == "n" else f"{value:.3f}"


def _caption(table: pd.DataFrame, stats: bool = True) -> str:
    hp = table.attrs.get("high_prob")
    kind = (f"Cohen's high-probability certified accuracy (alpha={hp[0]:g}, rho={hp[1]:g})" if hp
            else "approximate certified accuracy")
    samples = f"; {SAMPLES_COLUMN} = mean estimation samples per image" if SAMPLES_COLUMN in table.columns else ""
    return f"{kind} at l2 radius r; ACR = average certified radius" + (
        f"; {BOUND_NOTE}" if ACR_BOUND in table.columns else "") + (
        "; clean = smoothed-classifier accuracy; abstain = abstention rate" + samples if stats else "")


BOUND_NOTE = ("ACR≥ = a lower bound on ACR (sequential CERTIFY: its radius column is the radius at the stop, below "
              "the fixed-N radius)")


def format_text(table: pd.DataFrame) -> str:
    """A plain aligned table for the console."""
    body = [[str(lab), *(_cell(c, table.loc[lab, c]) for c in table.columns)] for lab in table.index]
    return aligned_text(_caption(table), ["log", *table.columns], body)


def aligned_text(caption: str, header: list[str], body: list[list[str]], left: int = 1) -> str:
    """A caption, then ``header`` and ``body`` as aligned columns: the first ``left`` flush left, the others right.

    Args:
        caption: the first line.
        header: the column names.
        body: the rows' cells.
        left: how many leading columns are text.
    """
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    rule = "-" * len(line(header))
    return "\n".join([caption, line(header), rule, *map(line, body)]) + "\n"


def format_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table; the best value of each column in bold."""
    mask = best_mask(table)
    out = ["| log | " + " | ".join(table.columns) + " |",
           "|:---|" + "---:|" * len(table.columns)]
    for lab in table.index:
        cells = [f"**{_cell(c, table.loc[lab, c])}**" if mask.loc[lab, c] else _cell(c, table.loc[lab, c])
                 for c in table.columns]
        out.append(f"| {markdown_escape(str(lab))} | " + " | ".join(cells) + " |")
    return f"{_caption(table)}\n\n" + "\n".join(out) + "\n"


def markdown_escape(text: str) -> str:
    """A label as one Markdown table cell: ``|`` escaped, line breaks as spaces."""
    return " ".join(text.replace("|", r"\|").splitlines()) if text else text


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "σ": r"$\sigma$", "ℓ": r"$\ell$", "α": r"$\alpha$", "ρ": r"$\rho$", "λ": r"$\lambda$",
                  "ε": r"$\epsilon$", "∈": r"$\in$", "≥": r"$\geq$", "Δ": r"$\Delta$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def format_latex(table: pd.DataFrame) -> str:
    """A booktabs ``tabular``: certified accuracy at each radius and ACR, the best of each column in bold."""
    mask = best_mask(table)
    cols = [*table.attrs["radius_columns"], *(c for c in ("ACR", ACR_BOUND) if c in table.columns)]
    k = len(table.attrs["radius_columns"])
    out = [f"% {_caption(table, stats=False)} (analyze.py)", r"\begin{tabular}{l" + "c" * len(cols) + "}", r"\toprule"]
    if k:
        out += [" & \\multicolumn{" + str(k) + "}{c}{Certified accuracy at $\\ell_2$ radius $r$}"
                + " &" * (len(cols) - k) + " \\\\", "\\cmidrule(lr){2-" + str(k + 1) + "}"]
    out.append("Model & " + " & ".join(["$r = " + c + "$" for c in cols[:k]] + [latex_escape(c) for c in cols[k:]])
               + r" \\")
    out.append(r"\midrule")
    for lab in table.index:
        if table.attrs.get("envelope") and lab == ENVELOPE_LABEL:
            out.append(r"\midrule")
        cells = []
        for c in cols:
            value = table.loc[lab, c]
            text = "--" if math.isnan(value) else _cell(c, value)
            cells.append(r"\textbf{" + text + "}" if mask.loc[lab, c] else text)
        out.append(latex_escape(str(lab)) + " & " + " & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def format_csv(table: pd.DataFrame) -> str:
    """Comma-separated values at full precision (empty where a value does not apply)."""
    return table.to_csv(float_format="%.10g")


FORMATTERS = {"table": format_text, "markdown": format_markdown, "latex": format_latex, "csv": format_csv}


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------


def check_plot_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise UserError(f"--plot {path}: the file name must end in .png or .pdf")
    return path


def check_outputs_are_not_inputs(outputs: dict[str, Optional[str | Path]], inputs: Sequence[str | Path]) -> None:
    """Refuse an output that is one of the logs read (``analyze.py LOG --out LOG`` would replace the log) or that
    two outputs share; then check each output location (:func:`runkit.files.check_output`).

    Args:
        outputs: flag -> output path (None: not given).
        inputs: the log files read.
    """
    from runkit.files import check_output

    def same(a: Path, b: Path) -> bool:
        if a.exists() and b.exists():
            return a.samefile(b)
        return a.resolve() == b.resolve()

    given = [(flag, Path(path)) for flag, path in outputs.items() if path is not None]
    for k, (flag, out) in enumerate(given):
        for log in map(Path, inputs):
            if same(out, log):
                raise UserError(f"{flag} {out}: is one of the logs read ({log}); writing there would replace it, "
                                f"choose another {flag}")
        for other_flag, other in given[k + 1:]:
            if same(out, other):
                raise UserError(f"{flag} and {other_flag} name the same file {out}; give two different files")
        check_output(out, flag)


def plot_curves(path: str | Path, dfs: Sequence[pd.DataFrame], labels: Sequence[str],
                start: float, stop: float, high_prob: Optional[tuple[float, float]] = None,
                with_envelope: bool = False, title: Optional[str] = None,
                markers: Sequence[tuple[int, str, Sequence[float], Sequence[float]]] = ()) -> Figure:
    """Certified accuracy vs l2 radius on [start, stop], one line per CERTIFY log (PNG or PDF by suffix),
    optionally with the envelope (best over the logs) as a dashed black line, and published points as markers in
    the colour of the log they are compared with. Headless (Agg/PDF canvases).

    Args:
        path: the figure file (``.png`` or ``.pdf``).
        dfs: the logs (:func:`read_log`).
        labels: one name per log.
        start, stop: the radius range.
        high_prob: (alpha, rho) for Cohen's bound; None: approximate accuracy.
        with_envelope: draw the best-over-logs line.
        title: the figure's title.
        markers: ``(k, label, radii, accuracies)``: points (accuracies as fractions) drawn beside log ``k``'s line.

    Returns:
        the figure written (a ``matplotlib.figure.Figure``).
    """
    from matplotlib.figure import Figure

    path = check_plot_path(path)
    pairs = [(k, df, lab) for k, (df, lab) in enumerate(zip(dfs, labels)) if df.attrs.get("kind") != "predict"]
    if not pairs:
        raise UserError(f"--plot {path}: needs at least one CERTIFY log (with a radius column)")
    stop = stop if stop > start else start + 1.0
    grid = np.round(np.linspace(start, stop, 801), 10)
    curves = [high_prob_certified_accuracy(df, grid, *high_prob) if high_prob else certified_accuracy(df, grid)
              for _, df, _ in pairs]

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    colours = {}
    for curve, (k, _, lab) in zip(curves, pairs):
        colours[k] = ax.plot(grid, curve, linewidth=1.5, label=lab)[0].get_color()
    for k, lab, radii, values in markers:
        ax.plot(radii, values, linestyle="none", marker="o", markerfacecolor="none", color=colours[k], label=lab)
    if with_envelope:
        ax.plot(grid, envelope(curves), color="black", linestyle="--", linewidth=1.5, label=ENVELOPE_LABEL)
    ax.set_xlim(start, stop)
    ax.set_ylim(min(0.0, float(np.min(curves))), 1.0)
    ax.set_xlabel(r"$\ell_2$ radius")
    ax.set_ylabel("certified accuracy" + (f" (α={high_prob[0]:g}, ρ={high_prob[1]:g})" if high_prob else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")  # curves start high at r = 0 and fall to the right
    if title:
        ax.set_title(title)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=150)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Paper-style tables (analyze.py --style paper)
# ---------------------------------------------------------------------------------------------------------------
# Rows grouped by sigma, one row per method in each group; columns ACR (3 decimals) then certified accuracy in
# percent (1 decimal); the best of each column in bold. Optionally the envelope over sigma per method ("best of
# sigma in {...}": at each radius the highest certified accuracy any of the method's sigmas reaches, with the clean
# accuracy of the sigma that reaches it in parentheses).

def envelope_label(sigmas: Sequence[float]) -> str:
    """The envelope group's name, e.g. ``best of σ ∈ {0.25, 0.50, 1.00}``."""
    return "best of σ ∈ {" + ", ".join(f"{s:.2f}" for s in sorted(set(sigmas))) + "}"


def _is_envelope(group: str) -> bool:
    return group.startswith("best of σ")


def _best_of_sigma(acc: np.ndarray, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per radius (column of ``acc``, one row per sigma): the best accuracy and the clean accuracy of the sigma that
    reaches it (on ties, the sigma with the higher clean accuracy)."""
    best = acc.max(axis=0)
    tied = np.isclose(acc, best[None, :], rtol=0, atol=1e-12)
    return best, np.where(tied, clean[:, None], -np.inf).max(axis=0)


def paper_table(dfs: Sequence[pd.DataFrame], labels: Sequence[str], sigmas: Sequence[float], radii: np.ndarray,
                high_prob: Optional[tuple[float, float]] = None, with_envelope: bool = False,
                published: Sequence[PublishedCells] = ()) -> pd.DataFrame:
    """The paper's table: index (sigma group, method), columns ACR then certified accuracy in percent at each radius.

    Args:
        dfs: CERTIFY logs (:func:`read_log`).
        labels: the method of each log (repeated across sigmas); (sigma, method) pairs must be distinct.
        sigmas: the sigma of each log (:func:`log_sigma`).
        radii: the radii of the columns.
        high_prob: ``(alpha, rho)`` for Cohen's high-probability accuracy instead of the approximate one.
        with_envelope: add the group :func:`envelope_label` with each method's best over its sigmas (ACR NaN);
            ``attrs["clean_of_best"]`` then holds, per method and radius, the clean accuracy (%) of that sigma.
        published: published rows (:func:`published_cells`), each added to its sigma's group after the logs'
            methods, as the table writes it (``attrs["decimals"]``: their (ACR, accuracy) decimals); none enters an
            envelope.

    ``attrs["acr_lower_bound"]``: the rows of sequential CERTIFY logs, whose ACR is a lower bound
    (:func:`is_sequential`).
    """
    pairs = list(zip(sigmas, labels))
    if len(set(pairs)) != len(pairs):
        dup = sorted({p for p in pairs if pairs.count(p) > 1})[0]
        raise UserError(f"--style paper: two logs for method {dup[1]!r} at sigma {dup[0]:g}; give distinct --labels")
    names = radius_names(radii)
    methods = list(dict.fromkeys(labels))
    rows, index, curves, bounds, decimals = [], [], {}, [], {}
    for sigma in sorted(set(sigmas)):
        for method in methods:
            if (sigma, method) in pairs:
                df = dfs[pairs.index((sigma, method))]
                acc = 100 * (high_prob_certified_accuracy(df, radii, *high_prob) if high_prob
                             else certified_accuracy(df, radii))
                curves.setdefault(method, []).append((acc, 100 * clean_accuracy(df)))
                rows.append([acr(df), *acc])
                index.append((f"{sigma:.2f}", method))
                if is_sequential(df.attrs.get("path")):
                    bounds.append(index[-1])
        for ref in published:
            key = (f"{sigma:.2f}", ref.method)
            if math.isclose(ref.sigma, sigma, rel_tol=0, abs_tol=1e-9) and key not in decimals and key not in index:
                rows.append([ref.acr, *ref.accuracy])
                index.append(key)
                decimals[key] = (ref.acr_decimals, ref.decimals)
    clean_of_best = pd.DataFrame(columns=names, dtype=float)
    if with_envelope:
        for method in methods:
            best, clean_of_best.loc[method] = _best_of_sigma(np.vstack([c[0] for c in curves[method]]),
                                                             np.array([c[1] for c in curves[method]]))
            rows.append([np.nan, *best])
            index.append((envelope_label(sigmas), method))
    table = pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["sigma", "method"]),
                         columns=["ACR", *names])
    table.attrs.update(radius_columns=names, high_prob=high_prob, envelope=with_envelope, decimals=decimals,
                       clean_of_best=clean_of_best, acr_lower_bound=bounds,
                       published=sorted({ref.source for ref in published}))
    return table


def paper_bold(table: pd.DataFrame) -> pd.DataFrame:
    """True where a shown value (ACR to 3 decimals, accuracy to 1) is the best among the rows it is compared with:
    the methods of its sigma group; when every sigma group holds one method, all sigma rows; the envelope rows
    among themselves. Ties are all bold; a comparison of fewer than 2 values, or of equal ones, has none. An ACR that
    is only a lower bound (``attrs["acr_lower_bound"]``) is compared with none, nor is a published row (written to
    its table's decimals, which ours are not)."""
    shown = table.copy()
    shown["ACR"] = shown["ACR"].round(3)
    shown[table.attrs["radius_columns"]] = shown[table.attrs["radius_columns"]].round(1)
    for row in table.attrs.get("decimals", {}):  # published rows, written to other decimals: never compared
        shown.loc[row] = np.nan
    for row in table.attrs.get("acr_lower_bound", []):
        shown.loc[row, "ACR"] = np.nan
    groups = table.index.get_level_values("sigma")
    env = np.array([_is_envelope(g) for g in groups], dtype=bool)
    ours = np.array([row not in table.attrs.get("decimals", {}) for row in table.index], dtype=bool)
    sigma_groups = pd.Series(groups[~env & ours]).value_counts()
    key = np.where(env, "envelope", "sigma" if (sigma_groups == 1).all() else groups)
    mask = pd.DataFrame(False, index=table.index, columns=table.columns)
    for group in set(key):
        rows = key == group
        for col in table.columns:
            values = shown.loc[rows, col]
            if values.notna().sum() >= 2 and values.max() > values.min():
                mask.loc[rows, col] = (values == values.max()).to_numpy()
    return mask


def _paper_caption(table: pd.DataFrame) -> str:
    hp = table.attrs.get("high_prob")
    kind = (f"Cohen's high-probability certified accuracy (alpha={hp[0]:g}, rho={hp[1]:g})" if hp
            else "Approximate certified accuracy")
    text = f"{kind} (%) at l2 radius r and ACR; best of each column in bold"
    if table.attrs.get("envelope"):
        text += "; best of sigma: the highest accuracy over sigma, (clean accuracy of that sigma)"
    if table.attrs.get("acr_lower_bound"):
        text += "; ≥ before an ACR: a lower bound (sequential CERTIFY: the radius column is the radius at the stop)"
    if table.attrs.get("published"):
        text += ("; (published): as the table writes it, from " + ", ".join(
            f"tables/{name}.json" for name in table.attrs["published"]) + ", never bold")
    return text


def _paper_cells(table: pd.DataFrame, bold: tuple[str, str], sup: tuple[str, str], missing: str,
                 geq: str) -> list[tuple[str, str, list[str]]]:
    """(group, shown on its first row only, method, cells) per row; ``bold``/``sup`` wrap bold values and the clean
    accuracies of the envelope rows; ``missing`` stands for a value that does not apply, ``geq`` precedes an ACR that
    is a lower bound."""
    mask, clean = paper_bold(table), table.attrs["clean_of_best"]
    bounds, decimals = set(table.attrs.get("acr_lower_bound", [])), table.attrs.get("decimals", {})
    out, previous = [], None
    for (group, method), values in table.iterrows():
        cells, (acr_places, places) = [], decimals.get((group, method), (3, 1))
        for col, value in values.items():
            text = missing if math.isnan(value) else f"{value:.{acr_places if col == 'ACR' else places}f}"
            if col == "ACR" and (group, method) in bounds:
                text = geq + text
            if mask.loc[(group, method), col]:
                text = bold[0] + text + bold[1]
            if _is_envelope(group) and col != "ACR":
                text += sup[0] + f"{clean.loc[method, col]:.1f}" + sup[1]
            cells.append(text)
        out.append((group if group != previous else "", method, cells))
        previous = group
    return out


def format_paper_markdown(table: pd.DataFrame) -> str:
    """:func:`paper_table` as a GitHub Markdown table."""
    head = "| σ | method | ACR | " + " | ".join(table.attrs["radius_columns"]) + " |"
    lines = [head, "|:---|:---|" + "---:|" * (1 + len(table.attrs["radius_columns"]))]
    for group, method, cells in _paper_cells(table, ("**", "**"), (" (", ")"), "-", "≥"):
        lines.append(f"| {markdown_escape(group)} | {markdown_escape(method)} | " + " | ".join(cells) + " |")
    return f"{_paper_caption(table)}\n\n" + "\n".join(lines) + "\n"


def format_paper_latex(table: pd.DataFrame) -> str:
    """:func:`paper_table` as a booktabs ``tabular`` (a rule between sigma groups)."""
    k = len(table.attrs["radius_columns"])
    out = [f"% {_paper_caption(table)} (analyze.py --style paper)", r"\begin{tabular}{llc" + "c" * k + "}",
           r"\toprule",
           " & & & \\multicolumn{" + str(k) + "}{c}{Certified accuracy (\\%) at $\\ell_2$ radius $r$} \\\\",
           "\\cmidrule(lr){4-" + str(k + 3) + "}",
           "$\\sigma$ & Method & ACR & " + " & ".join(f"${c}$" for c in table.attrs["radius_columns"]) + r" \\"]
    for group, method, cells in _paper_cells(table, (r"\textbf{", "}"), ("$^{(", ")}$"), "--", r"$\geq$"):
        if group:
            out.append(r"\midrule")
        out.append(f"{latex_escape(group)} & {latex_escape(method)} & " + " & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Beside the published tables (analyze.py --compare)
# ---------------------------------------------------------------------------------------------------------------
# Per log with published rows of its dataset and sigma (published.matching_rows): its own row ("yours"), each
# published row, and the difference in percentage points, ours written the way the table writes its values first
# (published.PublishedTable.rounded: Cohen et al.'s 0.55 is our 0.546), so the same experiment differs by 0.0.

YOURS = "yours"


@dataclass(frozen=True)
class PublishedCells:
    """A published row on our radii: certified accuracy in percent (NaN at a radius the table lacks), its ACR (NaN
    where the table gives none) and the decimals the table writes them with."""

    sigma: float
    method: str
    accuracy: np.ndarray
    acr: float
    decimals: int
    acr_decimals: int
    source: str


def published_cells(table, row, radii: np.ndarray) -> PublishedCells:
    """A :class:`published.PublishedRow` of ``table`` (a :class:`published.PublishedTable`) on ``radii``."""
    acc = [table.at(row, r) for r in radii]
    return PublishedCells(row.sigma, f"{row.method} (published)",
                          np.array([np.nan if a is None else 100 * a for a in acc]),
                          np.nan if row.acr is None else row.acr, table.points_decimals(), table.acr_decimals,
                          table.name)


def comparison_table(dfs: Sequence[pd.DataFrame], labels: Sequence[str], matches: Sequence[Sequence[tuple]],
                     radii: np.ndarray) -> pd.DataFrame:
    """Index (log, source), columns the radii (certified accuracy in %) and ACR: per log with published rows, its
    row ``yours``, each published row, and ``Δ <table>``: ours rounded as the table writes its values, minus the
    table's, in points (ACR: in radius units; none for a sequential log's ACR, a lower bound).

    Args:
        dfs: CERTIFY logs (:func:`read_log`).
        labels: one name per log.
        matches: per log, its ``(table, row)`` pairs (:func:`published.matching_rows`).
        radii: the radii of the columns.
    """
    rows, index, styles = [], [], []
    for df, label, found in zip(dfs, labels, matches):
        if not found:
            continue
        acc, ours_acr, bound = certified_accuracy(df, radii), acr(df), is_sequential(df.attrs.get("path"))
        rows.append([*(100 * acc), ours_acr])
        index.append((label, YOURS))
        styles.append(("yours", 1, 3, bound))
        for table, row in found:
            ref = published_cells(table, row, radii)
            rounded = np.array([100 * table.rounded(a) for a in acc])
            acr_delta = (round(ours_acr, ref.acr_decimals) - ref.acr) if not bound else np.nan
            rows += [[*ref.accuracy, ref.acr], [*np.round(rounded - ref.accuracy, 10), acr_delta]]
            index += [(label, f"{row.method}, σ={row.sigma:.2f} [{table.name}]"), (label, f"Δ {table.name}")]
            styles += [("published", ref.decimals, ref.acr_decimals, False), ("delta", 1, ref.acr_decimals, False)]
    table = pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["log", "source"]),
                         columns=[*radius_names(radii), "ACR"])
    table.attrs.update(styles=styles)
    return table


def _comparison_cells(table: pd.DataFrame, geq: str, missing: str) -> list[list[str]]:
    """[log (its first row only), source, cells...] per row of :func:`comparison_table`."""
    out, previous = [], None
    for ((log, source), values), (kind, decimals, acr_decimals, bound) in zip(table.iterrows(), table.attrs["styles"]):
        cells = []
        for col, value in values.items():
            places = acr_decimals if col == "ACR" else decimals
            text = missing if math.isnan(value) else (f"{value + 0.0:+.{places}f}" if kind == "delta"
                                                      else f"{value:.{places}f}")
            cells.append(geq + text if bound and col == "ACR" else text)
        out.append([log if log != previous else "", source, *cells])
        previous = log
    return out


def _comparison_caption(table: pd.DataFrame) -> str:
    text = ("Beside the published rows of the same dataset and σ: approximate certified accuracy (%) at l2 radius r "
            "and ACR; Δ = yours, written as the table writes its values, minus the published value, in points "
            "(ACR: in radius units)")
    return text + (f"; {BOUND_NOTE}" if any(style[3] for style in table.attrs["styles"]) else "")


def format_comparison(table: pd.DataFrame, fmt: str) -> str:
    """:func:`comparison_table` as ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "csv":
        return table.to_csv(float_format="%.10g")
    cols = list(table.columns)
    if fmt == "table":
        return aligned_text(_comparison_caption(table), ["log", "source", *cols],
                            _comparison_cells(table, "≥", "-"), left=2)
    if fmt == "markdown":
        lines = ["| log | source | " + " | ".join(cols) + " |", "|:---|:---|" + "---:|" * len(cols)]
        lines += ["| " + " | ".join(map(markdown_escape, cells)) + " |"
                  for cells in _comparison_cells(table, "≥", "-")]
        return f"{_comparison_caption(table)}\n\n" + "\n".join(lines) + "\n"
    out = [f"% {_comparison_caption(table)} (analyze.py --compare)", r"\begin{tabular}{ll" + "c" * len(cols) + "}",
           r"\toprule", "Log & Source & " + " & ".join([f"$r = {c}$" for c in cols[:-1]] + ["ACR"]) + r" \\"]
    for log, source, *cells in _comparison_cells(table, r"$\geq$", "--"):
        out += [r"\midrule"] if log else []
        out.append(f"{latex_escape(log)} & {latex_escape(source)} & " + " & ".join(cells) + r" \\")
    return "\n".join(out + [r"\bottomrule", r"\end{tabular}"]) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Training curves from train.py's text logs (analyze.py --train RUN_DIR)
# ---------------------------------------------------------------------------------------------------------------
# train.py writes RUN_DIR/log_steps.txt (one row per logged optimizer step) and RUN_DIR/log.txt (one row per
# epoch), tab-separated with a header. Every numeric column is plotted against the optimizer step: the per-step
# values as lines, the per-epoch values as dots at the epoch's last step, one panel per quantity.

TRAIN_LOGS = ("log_steps.txt", "log.txt")
# panel title -> what a column name contains to go there (first match wins); other columns get a panel each
TRAIN_PANELS = {"loss and its parts": ("loss", "sce", "madv"), "accuracy": ("acc",), "masked-in share": ("masked",),
                "learning rate": ("lr",), "weight decay": ("wd",)}
_NOT_PLOTTED = ("step", "epoch", "time")


def read_training_log(path: str | Path) -> pd.DataFrame:
    """A tab-separated training log with a header (train.py's ``log.txt`` / ``log_steps.txt``) as numbers.

    An incomplete last line (a run killed while writing) is dropped; any other malformed line, a missing ``step``
    column or no rows is a :class:`UserError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    complete = complete_lines(path)  # (a killed write leaves a partial last line)
    if not complete or "step" not in complete[0].split("\t"):
        raise UserError(f"{path}: not a train.py log (the first line has no 'step' column)")
    names = complete[0].split("\t")
    rows = []
    for num, line in enumerate(complete[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            if len(fields) != len(names):
                raise ValueError(f"{len(fields)} fields, the header has {len(names)}")
            rows.append([float(f) for f in fields])
        except ValueError as err:
            raise UserError(f"{path}: line {num} is malformed ({err}): {line[:80]!r}") from None
    if not rows:
        raise UserError(f"{path}: no rows after the header")
    return pd.DataFrame(rows, columns=names)


def training_panels(columns: Sequence[str]) -> dict[str, list[str]]:
    """Which columns go in which panel (:data:`TRAIN_PANELS`; unknown columns one panel each, in order)."""
    panels: dict[str, list[str]] = {}
    for col in columns:
        if col in _NOT_PLOTTED:
            continue
        title = next((t for t, keys in TRAIN_PANELS.items() if any(k in col for k in keys)), col)
        panels.setdefault(title, []).append(col)
    return panels


def plot_training_curves(run_dir: str | Path, outputs: Sequence[str | Path]) -> dict[str, list[str]]:
    """Plot the training curves of a train.py run folder to each of ``outputs`` (PNG or PDF by suffix).

    Args:
        run_dir: the run's ``--outdir`` (holds ``log_steps.txt`` and/or ``log.txt``).
        outputs: the files to write.

    Returns:
        panel title -> the columns drawn in it (as ``"log_steps.txt:loss"``).
    """
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    logs = {name: read_training_log(run_dir / name) for name in TRAIN_LOGS if (run_dir / name).is_file()}
    if not logs:
        raise UserError(f"--train {run_dir}: no {' or '.join(TRAIN_LOGS)} in it (is it a train.py --outdir?)")
    panels: dict[str, list[tuple[str, str]]] = {}
    for name, df in logs.items():
        for title, cols in training_panels(df.columns).items():
            panels.setdefault(title, []).extend((name, c) for c in cols if df[c].notna().any())
    order = [*TRAIN_PANELS, *(t for t in panels if t not in TRAIN_PANELS)]
    panels = {t: panels[t] for t in order if panels.get(t)}
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(6.0 * ncols, 3.2 * nrows))
    for k, (title, series) in enumerate(panels.items()):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        for name, col in series:
            df = logs[name]
            style = dict(marker="o", linestyle="--") if name == "log.txt" else dict(linewidth=1.2)
            ax.plot(df["step"], df[col], label=f"{col} ({'per epoch' if name == 'log.txt' else 'per step'})",
                    **style)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"training curves: {run_dir}")
    fig.tight_layout()
    for out in outputs:
        atomic_save_figure(fig, check_plot_path(out), dpi=120)
    return {t: [f"{name}:{col}" for name, col in v] for t, v in panels.items()}
