"""Cohen et al.'s analysis API (locuslab/smoothing ``code/analyze.py``), with FT-CADIS's ``.acr()`` and ACR table.

Same names, signatures and output files as Cohen's, so scripts written against it run unchanged (``analyze.py``
re-exports them: ``from analyze import *``); each is a thin layer over :mod:`analysis` (any log variant
:func:`runkit.logs.read_log` accepts; radii grids without ``np.arange``'s float overshoot). Importable without torch.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from analysis import (
    LowerBoundWarning,
    acr,
    certified_accuracy,
    high_prob_certified_accuracy,
    is_sequential,
    radius_grid,
)
from runkit.errors import UserError
from runkit.logs import read_log

__all__ = ["Accuracy", "ApproximateAccuracy", "HighProbAccuracy", "Line", "plot_certified_accuracy",
           "smallplot_certified_accuracy", "latex_table_certified_accuracy", "markdown_table_certified_accuracy",
           "latex_table_certified_accuracy_acr"]


class Accuracy:
    """A certified-accuracy curve of one log: ``at_radii(radii) -> np.ndarray`` (Cohen's base class)."""

    def __init__(self, data_file_path: str):
        self.data_file_path = data_file_path

    def at_radii(self, radii: np.ndarray) -> np.ndarray:
        """The curve at each radius in ``radii``."""
        return self.curve(read_log(self.data_file_path), radii)

    def at_radius(self, df: pd.DataFrame, radius: float) -> float:
        """The curve at one radius, on a log already read (``df`` from :func:`read_log`)."""
        return float(self.curve(df, [radius])[0])

    def curve(self, df: pd.DataFrame, radii: Sequence[float] | np.ndarray) -> np.ndarray:
        raise NotImplementedError


class ApproximateAccuracy(Accuracy):
    """Approximate certified accuracy (:func:`certified_accuracy`) of the log at ``data_file_path``; ``.acr()`` is
    its average certified radius (:func:`acr`), as the FT-CADIS code adds."""

    def curve(self, df: pd.DataFrame, radii: Sequence[float] | np.ndarray) -> np.ndarray:
        return certified_accuracy(df, radii)

    def acr(self) -> float:
        """ACR = (1/n) sum_i correct_i * radius_i of the log; for a sequential CERTIFY log (radii at the stop) a lower
        bound on the fixed-N ACR, with a :class:`analysis.LowerBoundWarning`."""
        if is_sequential(self.data_file_path):
            warnings.warn(f"{self.data_file_path}: a sequential CERTIFY log (its sidecar says so): the radius column "
                          f"is the radius at the stop, so this ACR is a lower bound on the fixed-N ACR",
                          LowerBoundWarning, stacklevel=2)
        return acr(read_log(self.data_file_path))


class HighProbAccuracy(Accuracy):
    """Cohen's high-probability certified accuracy (:func:`high_prob_certified_accuracy`) of a log.

    Args:
        data_file_path: the CERTIFY log.
        alpha: the certification's failure probability.
        rho: the failure probability of the bound over the draw of the test points.
    """

    def __init__(self, data_file_path: str, alpha: float, rho: float):
        super().__init__(data_file_path)
        self.alpha = alpha
        self.rho = rho

    def curve(self, df: pd.DataFrame, radii: Sequence[float] | np.ndarray) -> np.ndarray:
        return high_prob_certified_accuracy(df, radii, self.alpha, self.rho)


class Line:
    """One curve of a plot or one row of a table (Cohen's ``Line``).

    Args:
        quantity: an :class:`Accuracy` (anything with ``at_radii``).
        legend: its name in the legend or the table's first column.
        plot_fmt: a matplotlib format string (``"b--"``); empty for the default style.
        scale_x: multiplies the radii on the plot's x axis.
    """

    def __init__(self, quantity: Accuracy, legend: str, plot_fmt: str = "", scale_x: float = 1):
        self.quantity = quantity
        self.legend = legend
        self.plot_fmt = plot_fmt
        self.scale_x = scale_x


def _cohen_radii(call: str, start: float, stop: float, step: float) -> np.ndarray:
    """Cohen's ``np.arange(start, stop + step, step)``: start, ..., stop inclusive."""
    return radius_grid(start, stop, step, flag=call, limit=100_000)


def _cohen_accuracies(methods: Sequence[Line], radii: np.ndarray) -> np.ndarray:
    """One row of certified accuracies per method."""
    return np.vstack([np.asarray(m.quantity.at_radii(radii), dtype=np.float64) for m in methods])


def _open_out(outfile: str | Path) -> Path:
    path = Path(outfile)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _draw_lines(ax, lines: Sequence[Line], max_radius: float, radius_step: float, call: str) -> None:
    radii = _cohen_radii(call, 0.0, max_radius, radius_step)
    for line in lines:
        ax.plot(radii * line.scale_x, line.quantity.at_radii(radii), line.plot_fmt)
    ax.set_ylim((0, 1))
    ax.set_xlim((0, max_radius))


def plot_certified_accuracy(outfile: str, title: str, max_radius: float, lines: list[Line],
                            radius_step: float = 0.01) -> None:
    """Cohen's plot: certified accuracy vs radius on [0, max_radius], one curve per line; writes
    ``outfile + ".pdf"`` (without title) and ``outfile + ".png"`` (with title, 300 dpi).

    Args:
        outfile: the output path without suffix.
        title: the PNG's title.
        max_radius: the right end of the x axis.
        lines: the curves (:class:`Line`).
        radius_step: the spacing of the radii the curves are evaluated at.
    """
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    _draw_lines(ax, lines, max_radius, radius_step, "plot_certified_accuracy(max_radius, radius_step)")
    ax.tick_params(labelsize=14)
    ax.set_xlabel("radius", fontsize=16)
    ax.set_ylabel("certified accuracy", fontsize=16)
    ax.legend([line.legend for line in lines], loc="upper right", fontsize=16)
    path = _open_out(outfile)
    fig.savefig(f"{path}.pdf")
    fig.tight_layout()
    ax.set_title(title, fontsize=20)
    fig.tight_layout()
    fig.savefig(f"{path}.png", dpi=300)


def smallplot_certified_accuracy(outfile: str, title: str, max_radius: float, methods: list[Line],
                                 radius_step: float = 0.01, xticks: float = 0.5) -> None:
    """Cohen's small plot (large fonts, ticks every ``xticks``): writes ``outfile + ".pdf"``; ``title`` is unused,
    as in Cohen's.

    Args:
        outfile: the figure's path without ``.pdf``.
        title: unused.
        max_radius: the largest radius shown.
        methods: the lines to draw.
        radius_step: the radius grid.
        xticks: the spacing of the x ticks.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MultipleLocator

    fig = Figure()
    ax = fig.add_subplot()
    _draw_lines(ax, methods, max_radius, radius_step, "smallplot_certified_accuracy(max_radius, radius_step)")
    ax.set_xlabel("radius", fontsize=22)
    ax.set_ylabel("certified accuracy", fontsize=22)
    ax.tick_params(labelsize=20)
    ax.xaxis.set_major_locator(MultipleLocator(xticks))
    ax.legend([m.legend for m in methods], loc="upper right", fontsize=20)
    fig.tight_layout()
    fig.savefig(f"{_open_out(outfile)}.pdf")


def latex_table_certified_accuracy(outfile: str, radius_start: float, radius_stop: float, radius_step: float,
                                   methods: list[Line]) -> None:
    """Cohen's LaTeX table rows: a header ``& $r = 0.25$...``, ``\\midrule``, one row per method with accuracies to
    2 decimals, the best of each column (the first, on ties) in ``\\textbf``.

    Args:
        outfile: the file to write.
        radius_start, radius_stop, radius_step: the radii (stop included).
        methods: the rows (:class:`Line`).
    """
    radii = _cohen_radii("latex_table_certified_accuracy(radius_start, radius_stop, radius_step)",
                         radius_start, radius_stop, radius_step)
    acc = _cohen_accuracies(methods, radii)
    best = acc.argmax(axis=0)
    out = ["".join(f"& $r = {r:.3}$" for r in radii) + "\\\\\n", "\\midrule\n"]
    for i, method in enumerate(methods):
        cells = [r" & \textbf{" + f"{a:.2f}" + "}" if best[j] == i else f" & {a:.2f}" for j, a in enumerate(acc[i])]
        out.append(method.legend + "".join(cells) + "\\\\\n")
    _open_out(outfile).write_text("".join(out))


def markdown_table_certified_accuracy(outfile: str, radius_start: float, radius_stop: float, radius_step: float,
                                      methods: list[Line]) -> None:
    """Cohen's Markdown table (as in his README): accuracies to 2 decimals, the best of each column marked
    ``<b>*</b>``. Arguments as :func:`latex_table_certified_accuracy`."""
    radii = _cohen_radii("markdown_table_certified_accuracy(radius_start, radius_stop, radius_step)",
                         radius_start, radius_stop, radius_step)
    acc = _cohen_accuracies(methods, radii)
    best = acc.argmax(axis=0)
    out = ["|  | " + "".join(f"r = {r:.3} |" for r in radii) + "\n", "| --- | " + " --- |" * len(radii) + "\n"]
    for i, method in enumerate(methods):
        cells = [f"{a:.2f}<b>*</b> |" if best[j] == i else f"{a:.2f} |" for j, a in enumerate(acc[i])]
        out.append(f"<b> {method.legend} </b>| " + "".join(cells) + "\n")
    _open_out(outfile).write_text("".join(out))


def latex_table_certified_accuracy_acr(outfile: str, radius_start: float, radius_stop: float, radius_step: float,
                                       methods: list[Line]) -> None:
    """FT-CADIS's LaTeX table rows with ACR: ``& ACR & $r = ...$``, ``\\midrule``, one row per method with its ACR
    (3 decimals) and certified accuracy in percent (1 decimal). Two fixes over the FT-CADIS code: each row gets its
    own method's ACR (theirs writes the last method's on every row), and the header starts with ``&`` so its
    columns line up with the rows. Arguments as :func:`latex_table_certified_accuracy`; every method's quantity
    needs ``.acr()`` (:class:`ApproximateAccuracy`)."""
    radii = _cohen_radii("latex_table_certified_accuracy_acr(radius_start, radius_stop, radius_step)",
                         radius_start, radius_stop, radius_step)
    acc = _cohen_accuracies(methods, radii)
    out = ["& ACR " + "".join(f"& $r = {r:.3}$" for r in radii) + "\\\\\n", "\\midrule\n"]
    for i, method in enumerate(methods):
        if not hasattr(method.quantity, "acr"):
            raise UserError(f"latex_table_certified_accuracy_acr: the line {method.legend!r} has no ACR "
                            f"({type(method.quantity).__name__}); use ApproximateAccuracy")
        cells = "".join(f" & {100 * a:.1f}" for a in acc[i])
        out.append(f"{method.legend} & {method.quantity.acr():.3f}{cells}\\\\\n")
    _open_out(outfile).write_text("".join(out))
