"""Certified-accuracy tables, ACR and plots from Cohen-style certification logs: the command line.

    python analyze.py LOG [LOG ...] [--labels ...] [--radii START STOP STEP] [--format table|markdown|latex|csv]
                      [--out FILE] [--plot FILE.png|FILE.pdf] [--envelope] [--high-prob ALPHA RHO]
                      [--style paper [--sigmas S ...]] [--compare paper|DATASET|TABLE]
    python analyze.py --train RUN_DIR [--plot FILE.png|FILE.pdf]      # training curves from train.py's text logs

The library is :mod:`analysis`. Scripts written against Cohen et al.'s ``analyze.py`` keep working:
``from analyze import ApproximateAccuracy, Line, plot_certified_accuracy, ...`` gets the names of
:mod:`cohen_analysis` re-exported here.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from runkit.cli import exit_on_interrupt, run_cli

exit_on_interrupt(__name__)  # a Ctrl-C while the libraries below load exits 130, no traceback

import numpy as np
import pandas as pd

from analysis import (
    FORMATS,
    FORMATTERS,
    LogWarning,
    check_outputs_are_not_inputs,
    check_plot_path,
    check_sigma,
    comparison_table,
    default_labels,
    default_radii,
    expand_logs,
    format_comparison,
    format_paper_latex,
    format_paper_markdown,
    log_dataset,
    log_sigma,
    log_split,
    paper_table,
    plot_curves,
    plot_training_curves,
    published_cells,
    radius_grid,
    read_log,
    summary_table,
)
from cohen_analysis import (  # noqa: F401 (re-exported)
    Accuracy,
    ApproximateAccuracy,
    HighProbAccuracy,
    Line,
    latex_table_certified_accuracy,
    latex_table_certified_accuracy_acr,
    markdown_table_certified_accuracy,
    plot_certified_accuracy,
    smallplot_certified_accuracy,
)
from presets import DATASETS
from published import PublishedTable, load_tables, matching_rows
from runkit.errors import UserError
from runkit.files import atomic_write_text

# Cohen et al.'s analysis API (and FT-CADIS's ACR table), re-exported for scripts written against their analyze.py
__all__ = ["Accuracy", "ApproximateAccuracy", "HighProbAccuracy", "Line", "plot_certified_accuracy",
           "smallplot_certified_accuracy", "latex_table_certified_accuracy", "markdown_table_certified_accuracy",
           "latex_table_certified_accuracy_acr", "main"]


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Certified-accuracy tables, ACR and plots from Cohen-style "
                                                 "certification logs (CERTIFY or PREDICT).")
    parser.add_argument("logs", nargs="*", help="log files, or directories to search for logs")
    parser.add_argument("--labels", nargs="+", help="one label per log (default: from the paths); with --style paper "
                                                    "the method of each log, repeated across sigmas")
    parser.add_argument("--radii", nargs=3, type=float, metavar=("START", "STOP", "STEP"),
                        help="radii of the table (STOP included); default 0 to the largest certified radius")
    parser.add_argument("--format", choices=FORMATS, default="table", help="table output format")
    parser.add_argument("--out", help="write the table here instead of standard output")
    parser.add_argument("--plot", help="also plot certified accuracy vs radius to FILE.png or FILE.pdf")
    parser.add_argument("--envelope", action="store_true", help="add the best over all logs at each radius")
    parser.add_argument("--high-prob", nargs=2, type=float, metavar=("ALPHA", "RHO"),
                        help="Cohen's high-probability certified accuracy instead of the approximate one")
    parser.add_argument("--title", help="plot title")
    parser.add_argument("--style", choices=("plain", "paper"), default="plain",
                        help="paper: rows grouped by sigma, ACR first, accuracy in percent with one decimal, best in "
                             "bold (--format latex or markdown); with --envelope the best of sigma per method")
    parser.add_argument("--train", metavar="RUN_DIR",
                        help="instead of logs: plot the training curves of a train.py run folder (its log_steps.txt "
                             "and log.txt) to RUN_DIR/training_curves.png and .pdf, or to --plot FILE")
    parser.add_argument("--sigmas", nargs="+", type=float,
                        help="with --style paper or --compare: the sigma of each log (default: from <log>.json or a "
                             "sigma_<s> path component)")
    parser.add_argument("--compare", metavar="paper|DATASET|TABLE",
                        help="print the published rows of each log's dataset and sigma beside it (tables/*.json: "
                             "Cohen et al. 2019's CIFAR-10 and ImageNet tables), with the difference in points, ours "
                             "rounded as the table writes its values (0.0 for the same experiment); a radius column "
                             "per published radius unless --radii. paper: every table; DATASET (cifar10, imagenet): "
                             "that dataset's tables, and the dataset of logs whose <log>.json or path names none; "
                             "TABLE: one table by name. Plain style: a second table after yours (--format csv: that "
                             "table alone); --style paper: the published rows in each sigma group; --plot: the "
                             "published points as markers. A log without published rows gets a note on stderr")
    return parser


def _labels(args: argparse.Namespace, paths: list[Path]) -> list[str]:
    if args.labels is not None and len(args.labels) != len(paths):
        raise UserError(f"--labels: got {len(args.labels)} labels for {len(paths)} logs ({', '.join(map(str, paths))})")
    labels = args.labels if args.labels is not None else default_labels(paths)
    if args.style != "paper" and len(set(labels)) != len(labels):
        raise UserError(f"--labels: labels must be distinct, got {labels}")
    return labels


def _log_sigmas(args: argparse.Namespace, paths: list[Path]) -> list[Optional[float]]:
    """The sigma of each log (--sigmas, else what the log's sidecar or path says; None: unknown)."""
    if args.sigmas is not None:
        if len(args.sigmas) != len(paths):
            raise UserError(f"--sigmas: got {len(args.sigmas)} values for {len(paths)} logs")
        return [check_sigma(s, f"--sigmas {s:g}") for s in args.sigmas]
    return [log_sigma(p) for p in paths]


def _sigmas(args: argparse.Namespace, paths: list[Path]) -> list[float]:
    """--style paper: the sigma of each log (:func:`_log_sigmas`), every one known."""
    sigmas = _log_sigmas(args, paths)
    unknown = [str(p) for p, s in zip(paths, sigmas) if s is None]
    if unknown:
        raise UserError(f"--style paper: no sigma known for {', '.join(unknown)} (no <log>.json beside it, no "
                        f"sigma_<s> in its path); pass --sigmas, one per log")
    return sigmas


def _compare_tables(what: str) -> tuple[list[PublishedTable], Optional[str]]:
    """--compare WHAT: the published tables it names and the dataset it gives logs that name none."""
    tables = load_tables()
    if what == "paper":
        return tables, None
    if what in DATASETS:
        return [t for t in tables if t.dataset == what], what
    named = [t for t in tables if t.name == what]
    if not named:
        raise UserError(f"--compare {what}: choose paper (every table in tables/), a dataset ({', '.join(DATASETS)}) "
                        f"or a table ({', '.join(t.name for t in tables)})")
    return named, named[0].dataset


def _no_rows_note(path: Path, dataset: Optional[str], sigma: Optional[float], split: Optional[str],
                  tables: list[PublishedTable]) -> str:
    """Why a log gets no published rows."""
    if dataset is None:
        return (f"no published rows for {path}: no dataset known (no <log>.json naming one, no "
                f"{'/'.join(DATASETS)} in its path); give --compare DATASET")
    ours = [t for t in tables if t.dataset == dataset]
    if not ours:
        others = ", ".join(sorted({t.dataset for t in tables}))
        return f"no published rows for {dataset}" + (f" (the tables are of {others})" if tables else "")
    if sigma is None:
        return f"no published rows for {path}: no sigma known (no <log>.json, no sigma_<s> in its path); give --sigmas"
    if split is not None and all(t.split != split for t in ours):
        return f"no published rows for the {dataset} {split} split (the tables are of {ours[0].split})"
    known = ", ".join(f"{s:g}" for s in sorted({row.sigma for t in ours for row in t.rows}))
    return f"no published rows for {dataset} at sigma {sigma:g} (the tables have sigma {known})"


def _matches(args: argparse.Namespace, paths: list[Path], dfs: list[pd.DataFrame]) -> list[list[tuple]]:
    """--compare: per log, the published (table, row) pairs of its dataset, sigma and split; a note for the others."""
    if args.high_prob:
        raise UserError("--compare: the published tables are approximate certified accuracy; leave out --high-prob")
    tables, default = _compare_tables(args.compare)
    found, notes = [], []
    for path, df, sigma in zip(paths, dfs, _log_sigmas(args, paths)):
        dataset, split = log_dataset(path) or default, log_split(path)
        rows = (matching_rows(tables, dataset, sigma, split)
                if None not in (dataset, sigma) and df.attrs["kind"] != "predict" else [])
        found.append(rows)
        if not rows:
            notes.append(f"{path}: a PREDICT log has no certified accuracy to compare" if df.attrs["kind"] == "predict"
                         else _no_rows_note(path, dataset, sigma, split, tables))
    for note in dict.fromkeys(notes):
        print(f"note: --compare {args.compare}: {note}", file=sys.stderr)
    return found


def _compare_radii(matches: list[list[tuple]]) -> np.ndarray:
    """The radii of the published tables matched (sorted, each once)."""
    return np.array(sorted({r for found in matches for table, _ in found for r in table.radii}))


def _paper_text(args: argparse.Namespace, paths: list[Path], dfs: list[pd.DataFrame], labels: list[str],
                radii: np.ndarray, high_prob: Optional[tuple[float, float]],
                matches: list[list[tuple]]) -> tuple[pd.DataFrame, str]:
    predict = [str(p) for p, df in zip(paths, dfs) if df.attrs["kind"] == "predict"]
    if predict:
        raise UserError(f"--style paper: needs CERTIFY logs (with a radius column); {', '.join(predict)} "
                        f"is a PREDICT log")
    if args.format == "csv":
        raise UserError("--style paper: use --format latex or markdown (csv is --style plain)")
    published = [published_cells(t, row, radii) for found in matches for t, row in found]
    table = paper_table(dfs, labels, _sigmas(args, paths), radii, high_prob=high_prob, with_envelope=args.envelope,
                        published=published)
    return table, (format_paper_latex if args.format == "latex" else format_paper_markdown)(table)


def _plain_text(args: argparse.Namespace, dfs: list[pd.DataFrame], labels: list[str], radii: np.ndarray,
                high_prob: Optional[tuple[float, float]], matches: list[list[tuple]]) -> tuple[pd.DataFrame, str]:
    """The summary table; with published rows, the comparison after it (--format csv: the comparison alone)."""
    table = summary_table(dfs, labels, radii, high_prob=high_prob, with_envelope=args.envelope)
    text = FORMATTERS[args.format](table)
    if any(matches):
        comparison = comparison_table(dfs, labels, matches, radii)
        table.attrs["comparison"] = comparison
        extra = format_comparison(comparison, args.format)
        text = extra if args.format == "csv" else f"{text}\n{extra}"
    return table, text


def _plot(args: argparse.Namespace, dfs: list[pd.DataFrame], labels: list[str],
          high_prob: Optional[tuple[float, float]], matches: list[list[tuple]]) -> None:
    """--plot: the curves, with the published points of each log as markers."""
    if args.radii:
        start, stop = args.radii[0], args.radii[1]
    else:  # from 0 to where the last curve reaches zero
        start, stop = 0.0, max([float(df["radius"].max()) for df in dfs if df.attrs["kind"] != "predict"] or [1.0])
    markers = [(k, f"{row.method} σ={row.sigma:g} (published)", table.radii, [table.fraction(v) for v in row.accuracy])
               for k, found in enumerate(matches) for table, row in found]
    plot_curves(args.plot, dfs, labels, start, stop, high_prob=high_prob, with_envelope=args.envelope,
                title=args.title, markers=markers)
    print(f"wrote {args.plot}", file=sys.stderr)


def _train_curves(args: argparse.Namespace) -> dict[str, list[str]]:
    """--train RUN_DIR: the training curves from train.py's text logs."""
    if args.logs:
        raise UserError(f"--train {args.train}: plots one run folder; give no logs with it (got {args.logs[0]})")
    outputs = [check_plot_path(args.plot)] if args.plot else [Path(args.train) / f"training_curves{suffix}"
                                                              for suffix in (".png", ".pdf")]
    panels = plot_training_curves(args.train, outputs)
    for out in outputs:
        print(f"wrote {out} ({', '.join(panels)})", file=sys.stderr)
    return panels


def main(argv: Optional[Sequence[str]] = None) -> pd.DataFrame | dict[str, list[str]]:
    args = get_parser().parse_args(argv)
    if args.train:
        return _train_curves(args)
    if not args.logs:
        raise UserError("give the logs to analyze (files or directories)")
    paths = expand_logs(args.logs)
    labels = _labels(args, paths)
    high_prob = tuple(args.high_prob) if args.high_prob else None
    if high_prob and not (0 < high_prob[0] < 1 and 0 < high_prob[1] < 1):
        raise UserError(f"--high-prob {high_prob[0]} {high_prob[1]}: ALPHA and RHO must lie in (0, 1)")
    if args.plot:
        check_plot_path(args.plot)
    check_outputs_are_not_inputs({"--out": args.out, "--plot": args.plot}, paths)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LogWarning)
        dfs = [read_log(p) for p in paths]
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if (args.plot or args.envelope) and all(df.attrs["kind"] == "predict" for df in dfs):
        raise UserError(f"--{'plot' if args.plot else 'envelope'}: needs at least one CERTIFY log (with a radius "
                        f"column); all {len(paths)} logs are PREDICT logs (e.g. {paths[0]})")

    matches = _matches(args, paths, dfs) if args.compare else [[] for _ in dfs]
    radii = (radius_grid(*args.radii) if args.radii else _compare_radii(matches) if any(matches)
             else default_radii(dfs))
    if args.style == "paper":
        table, text = _paper_text(args, paths, dfs, labels, radii, high_prob, matches)
    else:
        table, text = _plain_text(args, dfs, labels, radii, high_prob, matches)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out, text)
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.plot:
        _plot(args, dfs, labels, high_prob, matches)
    return table


if __name__ == "__main__":
    run_cli(main)
