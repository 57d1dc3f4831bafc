"""The embedded end-to-end demo: FT-CADIS on scikit-learn's digits, on a CPU, in a few minutes.

It runs the work of the project's scripts, in-process through their libraries (``certification.py``,
``training.py``, ``analysis.py``), on the shipped small models (``models/``):

1. ``certify.py``: certify the off-the-shelf classifier (``digits_vit_tiny`` trained on clean digits) under denoised
   smoothing g(x) = argmax_c P[f(D(x + δ)) = c], δ ~ N(0, σ²I), with the shipped diffusion denoiser D;
2. ``train.py``: fine-tune the classifier with FT-CADIS (confidence-aware selective CE + masked adversarial loss on
   denoised images at σ), a short schedule;
3. ``certify.py`` again, on the fine-tuned classifier (same images, same noise seeds), then once more with
   ``--sequential`` (estimation stops once the table's radii are decided);
4. ``analyze.py``: the comparison table (certified accuracy at l2 radii, ACR) and a plot; the fine-tuned
   classifier's sequential table and samples per image beside its fixed-N one.

Everything goes under ``--outdir`` (default ``demo_output/``); a second run replaces its own earlier outputs.

    python demo.py                      # sigma 0.5, 100 test images, N0 = 50, N = 250, 3 epochs of FT-CADIS
    python demo.py --quick              # a much shorter run (the test's)
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from runkit.cli import check_number, exit_on_interrupt, run_cli

exit_on_interrupt(__name__)  # a Ctrl-C while the libraries below load exits 130, no traceback

import torch

from classifier import DIGITS_CHECKPOINT
from denoiser import default_checkpoint_path
from presets import DIGITS
from runkit.devices import resolve_device, torch_threads
from runkit.errors import UserError
from runkit.files import check_output
from runkit.locks import lock_path, run_lock

DENOISER_CKPT = default_checkpoint_path(DIGITS.denoiser)  # the shipped models/digits_denoiser.pt
CLASSIFIER_CKPT = DIGITS_CHECKPOINT  # the shipped models/digits_vit_tiny.pt
MARKER = ".ft_cadis_demo"  # marks an output folder as the demo's own, so a rerun may replace what is in it
LOCK = lock_path(".", is_dir=True).name  # the run lock inside --outdir (held while a demo writes there)
OFF_THE_SHELF, FT_CADIS = "off-the-shelf", "FT-CADIS"
OUTPUTS = ("off_the_shelf.tsv", "off_the_shelf.tsv.json", "ft_cadis.tsv", "ft_cadis.tsv.json", "table.txt",
           "table.md", "table.csv", "certified_accuracy.png", "summary.json", "ft_cadis", "ft_cadis_sequential.tsv",
           "ft_cadis_sequential.tsv.json", "table_sequential.txt")
RADIUS_STEP = 0.25  # the table's radii: 0, 0.25, ... up to the largest radius N samples can certify
# --quick: the shortened end-to-end run of tests/test_demo.py
QUICK = dict(N0=10, N=40, max_images=10, epochs=1, max_steps=6, batch_size=200)


def _stage(number: int, title: str, start: float) -> None:
    print(f"\n[{number}/4] {title}  (demo time {time.perf_counter() - start:.0f} s)", flush=True)


def prepare_outdir(outdir: Path) -> None:
    """Create ``outdir``, or clear the demo's own outputs in it (announced); refuse a foreign non-empty folder."""
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"--outdir {outdir}: exists and is not a folder; choose another --outdir")
    if outdir.is_dir() and any(p.name != LOCK for p in outdir.iterdir()):
        if not (outdir / MARKER).is_file():
            raise UserError(f"--outdir {outdir}: exists, is not empty and was not written by demo.py; choose another "
                            "--outdir (or empty it)")
        old = [outdir / name for name in OUTPUTS if (outdir / name).exists()]
        if old:
            print(f"note: replacing the previous demo outputs in {outdir}/ ({', '.join(p.name for p in old)})",
                  flush=True)
        for path in old:
            _remove_training_outputs(path) if path.is_dir() else path.unlink()
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / MARKER).write_text("written by demo.py; its outputs here are replaced by the next run\n")


def _remove_training_outputs(folder: Path) -> None:
    """Remove what fine-tuning wrote into ``folder`` (:data:`training.RUN_FILES`), and the folder if that empties it:
    a file of the user's in it stays."""
    from training import RUN_FILES

    for path in folder.iterdir():
        if path.is_file() and any(fnmatch.fnmatchcase(path.name, pattern) for pattern in RUN_FILES):
            path.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="End-to-end FT-CADIS demo on scikit-learn's digits (CPU, minutes): "
                                            "certify the off-the-shelf classifier, fine-tune it with FT-CADIS, "
                                            "certify again, compare.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sigma", type=float, default=0.5, help="noise level of smoothing and of the fine-tuning")
    p.add_argument("--N", type=int, default=None, help="estimation samples per image (default 250; --quick 40)")
    p.add_argument("--N0", type=int, default=None, help="selection samples per image (default 50; --quick 10)")
    p.add_argument("--alpha", type=float, default=DIGITS.alpha, help="failure probability of each certificate")
    p.add_argument("--max_images", type=int, default=None,
                   help="certify this many test images (every 360/max_images-th of the 360; default 100; --quick 10)")
    p.add_argument("--epochs", type=int, default=None, help="FT-CADIS epochs over the 1,437 train images "
                                                            "(default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="stop FT-CADIS after this many optimizer steps "
                                                           "(default: all epochs; --quick 6)")
    p.add_argument("--num_noises", type=int, default=DIGITS.train.num_noises, help="M, noises per image in FT-CADIS")
    p.add_argument("--lbd", type=float, default=DIGITS.train.lbd, help="lambda, weight of the masked adversarial loss")
    p.add_argument("--blr", type=float, default=1e-2, help="FT-CADIS base lr (lr = blr x effective batch / 256)")
    p.add_argument("--batch", type=int, default=DIGITS.train.batch,
                   help="FT-CADIS images per loader batch (split into M chunks)")
    p.add_argument("--batch_size", type=int, default=None, help="certification batch (default 1000; --quick 200)")
    p.add_argument("--outdir", default="demo_output", help="output folder (the demo's earlier outputs in it are "
                                                           "replaced)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the certification noise and of the fine-tuning")
    p.add_argument("--denoiser_ckpt", default=str(DENOISER_CKPT), help="the digits diffusion denoiser")
    p.add_argument("--classifier_ckpt", default=str(CLASSIFIER_CKPT), help="the off-the-shelf digits classifier")
    p.add_argument("--quick", action="store_true", help="a much shorter run (10 images, N=40, 6 FT-CADIS steps)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults (normal or ``--quick``) and check the values."""
    normal = dict(N0=50, N=250, max_images=100, epochs=3, max_steps=None, batch_size=1000)
    defaults = QUICK if args.quick else normal
    for key, flag in (("N0", "N0"), ("N", "N"), ("max_images", "max_images"), ("epochs", "epochs"),
                      ("max_steps", "steps"), ("batch_size", "batch_size")):
        if getattr(args, flag) is None:
            setattr(args, flag, defaults[key])
    args.max_steps = args.steps
    for flag in ("N", "N0", "max_images", "epochs", "batch_size", "num_noises", "batch"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--steps {args.max_steps}: must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be >= 1")
    check_number("--sigma", args.sigma, 0, low_open=True)
    check_number("--alpha", args.alpha, 0, 1, low_open=True, high_open=True)
    check_number("--blr", args.blr, 0, low_open=True)
    check_number("--lbd", args.lbd, 0)
    resolve_device(args.device)
    check_output(args.outdir, "--outdir", folder=True)
    for flag, path in (("--denoiser_ckpt", args.denoiser_ckpt), ("--classifier_ckpt", args.classifier_ckpt)):
        if not Path(path).is_file():
            raise UserError(f"{flag} {path}: not found; the demo models ship in models/ (re-create them with "
                            "python scripts/train_demo_models.py)")
    return args


def certify_args(args: argparse.Namespace, outfile: Path, skip: int, weights: list[str]) -> list[str]:
    """certify.py's command line for one of the two certifications (identical but for the classifier)."""
    argv = ["--dataset", "digits", "--sigma", str(args.sigma), "--outfile", str(outfile), "--N0", str(args.N0),
            "--N", str(args.N), "--alpha", str(args.alpha), "--skip", str(skip), "--max_images", str(args.max_images),
            "--batch_size", str(args.batch_size), "--seed", str(args.seed), "--denoiser_ckpt", args.denoiser_ckpt,
            "--device", args.device, "--precision", "fp32", "--overwrite", *weights]  # (reproducible on any CPU)
    return argv + (["--no_progress"] if args.no_progress else [])


def certify(argv: list[str]) -> None:
    """certify.py's work for its command line ``argv``, in this process (:func:`certification.run_certify`)."""
    from certification import RunOptions, certify_parser, resolve_options, run_certify

    run_certify(resolve_options(RunOptions.from_namespace(certify_parser().parse_args(argv))), argv)


def fine_tune(args: argparse.Namespace, outdir: Path) -> dict[str, Any]:
    """train.py's work (:func:`training.train`): FT-CADIS on digits at the demo's sigma, a short schedule, fp32
    (reproducible on any CPU); returns its result (``checkpoint``, ``test_acc``, ...)."""
    from training import NonFiniteLossError, TrainConfig, train

    config = TrainConfig(
        dataset="digits", classifier_ckpt=args.classifier_ckpt, denoiser_ckpt=args.denoiser_ckpt,
        train_noise_sd=args.sigma, epochs=args.epochs, warmup_epochs=min(1.0, args.epochs / 3), batch=args.batch,
        num_noises=args.num_noises, lbd=args.lbd, blr=args.blr, drop_path=0.1, workers=0, seed=args.seed,
        device=args.device, precision="fp32", outdir=str(outdir), max_steps=args.max_steps or None,
        progress=not args.no_progress)
    try:
        return train(config)
    except NonFiniteLossError as err:  # as train.py: one line, exit status 1
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def write_tables(paths: Sequence[Path], labels: Sequence[str], radii: Sequence[float],
                 outputs: Sequence[tuple[str, Optional[Path]]]) -> Any:
    """analyze.py's table of the logs ``paths`` at ``radii`` in each (format, file) of ``outputs`` (file None:
    standard output); returns the table (:func:`analysis.summary_table`)."""
    from analysis import FORMATTERS, read_log, summary_table

    table = summary_table([read_log(p) for p in paths], labels, radii)
    for fmt, out in outputs:
        text = FORMATTERS[fmt](table)
        if out is None:
            sys.stdout.write(text)
        else:
            out.write_text(text, encoding="utf-8")
            print(f"wrote {out}", file=sys.stderr)
    return table


def compare_sequential(fixed_log: Path, sequential_log: Path, radii: Sequence[float], N: int, out: Path
                       ) -> dict[str, Any]:
    """Print (and write to ``out``) the fine-tuned classifier's table under fixed-N and sequential CERTIFY, with the
    estimation samples per image of each; returns them."""
    from runkit.logs import read_log

    labels = [f"{FT_CADIS} fixed N", f"{FT_CADIS} sequential"]
    print(f"\n{FT_CADIS} under fixed-N and sequential CERTIFY (certify.py --sequential; same guarantee):")
    table = write_tables([fixed_log, sequential_log], labels, radii, [("table", out), ("table", None)])
    samples = float(read_log(sequential_log)["n"].mean())
    print(f"estimation samples per image: fixed N {N}, sequential {samples:.0f} ({N / samples:.1f}x fewer)\n"
          "sequential CERTIFY's radius column is the radius at the stop: a valid certificate, but below the "
          "fixed-N radius, so its ACR is only a lower bound (column ACR≥); compare certified accuracy at the radii "
          "it decided",
          flush=True)
    values = {col: float(table.iloc[1][col]) for col in table.columns if col != "samples/img"}
    return {"samples_per_image": samples, "N": N, "table": {k: v for k, v in values.items() if not math.isnan(v)}}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = resolve_args(get_parser().parse_args(argv))
    with torch_threads(args.threads):
        return run_demo(args)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """The four stages (see the module docstring) with the resolved ``args``; returns the summary."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    from datasets import get_dataset

    num_test = len(get_dataset("digits", "test"))  # 360, 36 per class
    if args.max_images > num_test:
        raise UserError(f"--max_images {args.max_images}: the digits test split has only {num_test} images")
    skip = num_test // args.max_images  # spread the images over the test split
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    with run_lock(lock_path(outdir, is_dir=True), f"--outdir {outdir}"):
        prepare_outdir(outdir)
        return run_stages(args, outdir, skip)


def announce(args: argparse.Namespace, outdir: Path, skip: int) -> tuple[float, float]:
    """Print what the demo runs; returns the largest certifiable radius and the table's last radius.

    Args:
        args: the resolved flags.
        outdir: the output folder.
        skip: the spacing of the certified test images.
    """
    from sequential import max_certifiable_radius

    print(f"FT-CADIS demo on scikit-learn digits (16x16): sigma={args.sigma}, {args.max_images} test images "
          f"(dataset indices 0, {skip}, {2 * skip}, ...), N0={args.N0}, N={args.N}, alpha={args.alpha}; "
          f"FT-CADIS {args.epochs} epoch(s)" + (f", at most {args.max_steps} steps" if args.max_steps else "")
          + f"; {torch.get_num_threads()} CPU thread(s), device {args.device}; outputs in {outdir}/", flush=True)
    r_max = max_certifiable_radius(args.sigma, args.N, args.alpha)
    r_stop = max(RADIUS_STEP, math.floor(r_max / RADIUS_STEP + 1e-9) * RADIUS_STEP)
    print(f"with N={args.N} and alpha={args.alpha} no certified radius can exceed sigma * Phi^-1(alpha^(1/N)) = "
          f"{r_max:.3f}; the table shows radii 0 to {r_stop:g}", flush=True)
    return r_max, r_stop


def run_stages(args: argparse.Namespace, outdir: Path, skip: int) -> dict[str, Any]:
    """Stages 1-4 into the prepared ``outdir`` (held locked by :func:`run_demo`); returns the summary."""
    import analysis

    off_log, ft_log, ft_dir = outdir / "off_the_shelf.tsv", outdir / "ft_cadis.tsv", outdir / "ft_cadis"
    start = time.perf_counter()
    r_max, r_stop = announce(args, outdir, skip)
    timings: dict[str, float] = {}

    _stage(1, "certify the off-the-shelf classifier under denoised smoothing (certify.py)", start)
    t0 = time.perf_counter()
    certify(certify_args(args, off_log, skip, ["--classifier_ckpt", args.classifier_ckpt]))
    timings["certify_off_the_shelf"] = time.perf_counter() - t0

    _stage(2, f"fine-tune it with FT-CADIS at sigma={args.sigma} (train.py)", start)
    t0 = time.perf_counter()
    result = fine_tune(args, ft_dir)
    checkpoint = result.get("checkpoint")
    if not checkpoint:
        raise UserError("train.py wrote no checkpoint (nothing to certify); raise --epochs or --steps")
    timings["fine_tune"] = time.perf_counter() - t0

    _stage(3, "certify the FT-CADIS classifier (certify.py, same images and noise)", start)
    t0 = time.perf_counter()
    certify(certify_args(args, ft_log, skip, ["--finetuned_path", str(checkpoint)]))
    timings["certify_ft_cadis"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    seq_log = outdir / "ft_cadis_sequential.tsv"
    certify(certify_args(args, seq_log, skip, ["--finetuned_path", str(checkpoint), "--sequential"]))
    timings["certify_ft_cadis_sequential"] = time.perf_counter() - t0

    _stage(4, "compare (analyze.py)", start)
    logs, labels = [off_log, ft_log], [OFF_THE_SHELF, FT_CADIS]
    radii = analysis.radius_grid(0.0, r_stop, RADIUS_STEP)
    plot = outdir / "certified_accuracy.png"
    title = f"digits, sigma={args.sigma}, N={args.N}, {args.max_images} images"
    table = write_tables(logs, labels, radii, [("markdown", outdir / "table.md"), ("csv", outdir / "table.csv"),
                                               ("table", outdir / "table.txt"), ("table", None)])
    # the curves run on to the largest certifiable radius (the table stops at the last multiple of 0.25)
    analysis.plot_curves(plot, [analysis.read_log(off_log), analysis.read_log(ft_log)], [OFF_THE_SHELF, FT_CADIS],
                         0.0, r_max, title=title)
    print(f"wrote {plot}", file=sys.stderr)
    sequential = compare_sequential(ft_log, seq_log, radii, args.N, outdir / "table_sequential.txt")
    timings["total"] = time.perf_counter() - start

    summary = {
        "sigma": args.sigma, "N0": args.N0, "N": args.N, "alpha": args.alpha, "images": args.max_images, "skip": skip,
        "max_certifiable_radius": r_max, "radii": list(table.attrs["radius_columns"]),
        "epochs": args.epochs, "max_steps": args.max_steps, "num_noises": args.num_noises, "lbd": args.lbd,
        "blr": args.blr, "batch": args.batch, "threads": torch.get_num_threads(), "device": args.device,
        "checkpoint": str(checkpoint), "fine_tune_test_acc": result.get("test_acc"),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "table": {label: {col: float(table.loc[label, col]) for col in table.columns} for label in table.index},
        "sequential": sequential,
    }
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ndemo finished in {timings['total']:.0f} s: table in {outdir / 'table.md'}, plot {plot}, "
          f"logs {off_log.name} / {ft_log.name}, fine-tuning run {ft_dir}/", flush=True)
    return summary


if __name__ == "__main__":
    run_cli(main)
