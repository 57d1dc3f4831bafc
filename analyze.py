"""Certified-accuracy tables, ACR and plots from Cohen-style certification logs: the command line.

    python analyze.py LOG [LOG ...] [--labels ...] [--radii START STOP STEP] [--format table|markdown|latex|csv]
                      [--out FILE] [--plot FILE.png|FILE.pdf] [--envelope] [--high-prob ALPHA RHO]
                      [--style paper [--sigmas S ...]]
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

import numpy as np
import pandas as pd

from analysis import (FORMATS, FORMATTERS, LogWarning, check_outputs_are_not_inputs, check_plot_path, check_sigma,
                      default_labels, default_radii, expand_logs, format_paper_latex, format_paper_markdown, log_sigma,
                      paper_table, plot_curves, plot_training_curves, radius_grid, read_log, summary_table)
from cohen_analysis import (Accuracy, ApproximateAccuracy, HighProbAccuracy, Line,  # noqa: F401 (re-exported)
                            latex_table_certified_accuracy, latex_table_certified_accuracy_acr,
                            markdown_table_certified_accuracy, plot_certified_accuracy, smallplot_certified_accuracy)
from runkit.cli import run_cli
from runkit.errors import UserError

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
                        help="with --style paper: the sigma of each log (default: from <log>.json or a sigma_<s> "
                             "path component)")
    return parser


def _labels(args: argparse.Namespace, paths: list[Path]) -> list[str]:
    if args.labels is not None and len(args.labels) != len(paths):
        raise UserError(f"--labels: got {len(args.labels)} labels for {len(paths)} logs ({', '.join(map(str, paths))})")
    labels = args.labels if args.labels is not None else default_labels(paths)
    if args.style != "paper" and len(set(labels)) != len(labels):
        raise UserError(f"--labels: labels must be distinct, got {labels}")
    return labels


def _sigmas(args: argparse.Namespace, paths: list[Path]) -> list[float]:
    """--style paper: the sigma of each log (--sigmas, else what the log's sidecar or path says)."""
    if args.sigmas is not None:
        if len(args.sigmas) != len(paths):
            raise UserError(f"--sigmas: got {len(args.sigmas)} values for {len(paths)} logs")
        return [check_sigma(s, f"--sigmas {s:g}") for s in args.sigmas]
    sigmas = [log_sigma(p) for p in paths]
    unknown = [str(p) for p, s in zip(paths, sigmas) if s is None]
    if unknown:
        raise UserError(f"--style paper: no sigma known for {', '.join(unknown)} (no <log>.json beside it, no "
                        f"sigma_<s> in its path); pass --sigmas, one per log")
    return sigmas


def _paper_text(args: argparse.Namespace, paths: list[Path], dfs: list[pd.DataFrame], labels: list[str],
                radii: np.ndarray, high_prob: Optional[tuple[float, float]]) -> tuple[pd.DataFrame, str]:
    predict = [str(p) for p, df in zip(paths, dfs) if df.attrs["kind"] == "predict"]
    if predict:
        raise UserError(f"--style paper: needs CERTIFY logs (with a radius column); {', '.join(predict)} "
                        f"is a PREDICT log")
    if args.format == "csv":
        raise UserError("--style paper: use --format latex or markdown (csv is --style plain)")
    table = paper_table(dfs, labels, _sigmas(args, paths), radii, high_prob=high_prob, with_envelope=args.envelope)
    return table, (format_paper_latex if args.format == "latex" else format_paper_markdown)(table)


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

    radii = radius_grid(*args.radii) if args.radii else default_radii(dfs)
    if args.style == "paper":
        table, text = _paper_text(args, paths, dfs, labels, radii, high_prob)
    else:
        table = summary_table(dfs, labels, radii, high_prob=high_prob, with_envelope=args.envelope)
        text = FORMATTERS[args.format](table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.plot:
        if args.radii:
            start, stop = args.radii[0], args.radii[1]
        else:  # from 0 to where the last curve reaches zero
            start, stop = 0.0, max([float(df["radius"].max()) for df in dfs if df.attrs["kind"] != "predict"] or [1.0])
        plot_curves(args.plot, dfs, labels, start, stop, high_prob=high_prob, with_envelope=args.envelope,
                    title=args.title)
        print(f"wrote {args.plot}", file=sys.stderr)
    return table


if __name__ == "__main__":
    run_cli(main)
