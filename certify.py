"""Certify the smoothed classifier g(x) = argmax_c P[f(D(x + delta)) = c] on a dataset (Cohen et al. CERTIFY).

For each selected test image (dataset indices 0, skip, 2*skip, ..., at most --max_images of them) it runs
``core.Smooth.certify`` with N0 selection and N estimation samples at failure probability alpha, and writes one row
of a Cohen-format log:

    idx  label  predict  radius  correct  time

(tab-separated; ``predict`` -1 = abstain, ``radius`` at full precision, ``correct`` 0/1, ``time`` seconds). Image
``idx``'s noise comes from a generator seeded by (--seed, idx), so a log depends neither on --batch_size nor on the
number of processes nor on interruptions: under ``torchrun`` rank r certifies every W-th remaining image into
``<outfile>.rank<r>``, and rank 0 merges the parts into one idx-sorted log at the end. ``<outfile>.json`` records
the configuration; ``--resume`` continues an interrupted run (single-process or sharded) after checking it.

    python certify.py --dataset cifar10 --sigma 0.25 --finetuned_path runs/ckpt.pt --outfile logs/c10_025.tsv
    torchrun --nproc_per_node 8 certify.py --dataset imagenet --sigma 0.5 --off-the-shelf --outfile logs/in.tsv
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

import torch
from tqdm import tqdm

import analysis
from core import NOISE_BLOCK, DenoisedClassifier, Smooth, compile_for_inference_, image_generator, prepare_inference_
from utils import (PRECISIONS, UserError, atomic_write_text, barrier, cleanup_distributed, init_distributed,
                   run_cli)

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
LOG_FORMAT = 1
# the paper's protocol (SPEC section 4): CIFAR-10 whole test set with N = 100,000; ImageNet one image per class
# (skip 50 on the class-sorted validation set) with N = 10,000
DEFAULT_N = {"cifar10": 100_000, "imagenet": 10_000, "digits": 10_000}
DEFAULT_SKIP = {"cifar10": 1, "imagenet": 50, "digits": 1}
# entries of the sidecar's "config" that a --resume must match (the others are informational)
RESUME_KEYS = ("format", "dataset", "split", "sigma", "N0", "N", "alpha", "seed", "skip", "arch", "denoiser",
               "denoiser_ckpt", "classifier", "precision", "noise_block")
RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
FSYNC_SECONDS = 60.0


@dataclass(frozen=True)
class Row:
    """One certified image: Cohen's columns."""

    idx: int
    label: int
    predict: int
    radius: float
    correct: int
    time: float

    def line(self) -> str:
        # repr: the shortest string that round-trips the float (Cohen's {:.3} loses precision)
        return f"{self.idx}\t{self.label}\t{self.predict}\t{self.radius!r}\t{self.correct}\t{self.time:.4f}\n"


# ---------------------------------------------------------------------------------------------------------------
# Certification
# ---------------------------------------------------------------------------------------------------------------


def certify_dataset(smoothed: Smooth, dataset: Any, indices: Sequence[int], log: TextIO, n0: int, n: int,
                    alpha: float, batch_size: int, seed: int, device: torch.device, progress: bool = True,
                    done: Sequence[Row] = ()) -> list[Row]:
    """CERTIFY every ``dataset[idx]`` for idx in ``indices``; write each row to ``log`` as soon as it is known.

    Image idx's noise is seeded by (seed, idx) (:func:`core.image_generator`), so a row does not depend on which
    process certifies it, in which order, or with which batch size. ``done`` (rows certified earlier) only feeds the
    progress bar's running figures. Returns the new rows.
    """
    rows: list[Row] = []
    correct, radius_sum = sum(r.correct for r in done), sum(r.radius * r.correct for r in done)
    last_sync = time.monotonic()
    bar = tqdm(indices, disable=not progress, unit="img", dynamic_ncols=True, file=sys.stderr)
    for idx in bar:
        x, label = dataset[idx]
        x, label = x.to(device), int(label)
        t0 = time.perf_counter()
        prediction, radius = smoothed.certify(x, n0, n, alpha, batch_size, generator=image_generator(seed, idx))
        row = Row(int(idx), label, int(prediction), float(radius), int(prediction == label),
                  time.perf_counter() - t0)
        log.write(row.line())
        log.flush()
        if time.monotonic() - last_sync > FSYNC_SECONDS:
            os.fsync(log.fileno())
            last_sync = time.monotonic()
        rows.append(row)
        correct += row.correct
        radius_sum += row.radius * row.correct
        total = len(done) + len(rows)
        bar.set_postfix(acc=f"{correct / total:.3f}", acr=f"{radius_sum / total:.3f}", refresh=False)
    return rows


def build_base_classifier(dataset: str, arch: str, classifier_ckpt: Optional[str], denoiser_ckpt: Optional[str],
                          sigma: float, num_classes: int, device: torch.device) -> DenoisedClassifier:
    """f o D: the classifier ``arch`` (weights from ``classifier_ckpt``, else pretrained) after the denoiser of
    config ``dataset`` (``denoiser_ckpt``; None = no denoiser, i.e. plain Gaussian smoothing)."""
    from classifier import get_architecture
    from denoiser import load_denoiser

    denoiser = None if denoiser_ckpt is None else load_denoiser(dataset, denoiser_ckpt, device=device)
    classifier = get_architecture(arch, num_classes=num_classes, pretrained=classifier_ckpt is None,
                                  checkpoint=classifier_ckpt, device=device)
    return DenoisedClassifier(denoiser, classifier, sigma).to(device).eval()


# ---------------------------------------------------------------------------------------------------------------
# Logs, parts and the configuration sidecar
# ---------------------------------------------------------------------------------------------------------------


def sidecar_path(outfile: Path) -> Path:
    return outfile.with_name(outfile.name + ".json")


def part_path(outfile: Path, rank: int) -> Path:
    return outfile.with_name(f"{outfile.name}.rank{rank}")


def existing_parts(outfile: Path) -> list[Path]:
    """``<outfile>.rank<k>`` files left by a sharded run, by rank."""
    pattern = re.compile(re.escape(outfile.name) + r"\.rank(\d+)$")
    if not outfile.parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in outfile.parent.iterdir() if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


def read_rows(path: Path) -> tuple[dict[int, Row], int]:
    """The complete rows of one of our logs (or parts) and the byte length they occupy.

    A last line without its newline is the trace of an interrupted write: it is not a row, and the returned length
    stops before it (appending resumes there). Anything else that is not a row is an error naming the file.
    """
    data = path.read_bytes()
    if not data:
        return {}, 0
    end = data.rfind(b"\n") + 1
    lines = data[:end].decode("utf-8", errors="replace").split("\n")[:-1]
    if not lines:
        return {}, 0
    if lines[0] != HEADER:
        raise UserError(f"{path}: not a log written by certify.py (first line {lines[0][:60]!r}, expected the header "
                        f"{HEADER!r}); move it away or use --overwrite")
    rows: dict[int, Row] = {}
    for num, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        try:
            if len(fields) != 6:
                raise ValueError(f"{len(fields)} fields")
            row = Row(int(fields[0]), int(fields[1]), int(fields[2]), float(fields[3]), int(fields[4]),
                      float(fields[5]))
        except ValueError as err:
            raise UserError(f"{path}: line {num} is not a log row ({err}): {line[:80]!r}; repair or remove it"
                            ) from None
        rows.setdefault(row.idx, row)
    return rows, end


def read_done(outfile: Path) -> dict[int, Row]:
    """Rows already certified: the log itself plus any rank parts (the first occurrence of an idx wins)."""
    done: dict[int, Row] = {}
    for path in [outfile] + existing_parts(outfile):
        if path.is_file():
            for idx, row in read_rows(path)[0].items():
                done.setdefault(idx, row)
    return done


def open_for_append(path: Path) -> TextIO:
    """Open a log or part for appending rows: drop a half-written last line, write the header if new."""
    length = read_rows(path)[1] if path.is_file() else 0
    log = open(path, "r+" if path.is_file() else "w", encoding="utf-8")
    log.truncate(length)
    log.seek(length)
    if length == 0:
        log.write(HEADER + "\n")
        log.flush()
    return log


def merge_parts(outfile: Path) -> list[Row]:
    """Merge ``outfile`` and its rank parts into one idx-sorted ``outfile`` (atomically), then remove the parts."""
    parts = existing_parts(outfile)
    rows = sorted(read_done(outfile).values(), key=lambda r: r.idx)
    text = HEADER + "\n" + "".join(r.line() for r in rows)
    if parts or not outfile.is_file() or outfile.read_text(encoding="utf-8") != text:
        atomic_write_text(outfile, text)
    for part in parts:
        part.unlink()
    return rows


def check_resume(outfile: Path, config: dict[str, Any]) -> None:
    """Refuse to continue a log whose recorded configuration differs from this run's."""
    side = sidecar_path(outfile)
    if not side.is_file():
        raise UserError(f"--resume: {outfile} has no configuration file {side.name} beside it, so it cannot be checked "
                        "against this run; use another --outfile (or --overwrite to replace it)")
    try:
        recorded = json.loads(side.read_text(encoding="utf-8"))["config"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"--resume: {side} is not a certify.py configuration file; use another --outfile") from None
    diff = [f"{k}={recorded.get(k)!r} (now {config[k]!r})" for k in RESUME_KEYS if recorded.get(k) != config[k]]
    if diff:
        raise UserError(f"--resume: {outfile} was written with a different configuration: {', '.join(diff)}; "
                        "rerun with the recorded flags, or use another --outfile or --overwrite")


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Certify a denoised-smoothed classifier (Cohen et al. CERTIFY); writes "
                                            "a tab-separated log 'idx label predict radius correct time'.")
    p.add_argument("--dataset", required=True, help="cifar10, imagenet or digits")
    p.add_argument("--sigma", type=float, required=True, help="noise level sigma of the smoothed classifier")
    p.add_argument("--outfile", required=True, help="the log to write (with <outfile>.json, its configuration)")
    p.add_argument("--seed", type=int, default=0, help="image idx's noise is seeded by (seed, idx)")
    p.add_argument("--split", default="test", help="dataset split (default test)")
    p.add_argument("--skip", type=int, default=None, help="certify every skip-th image (default: 1; imagenet 50)")
    p.add_argument("--max_images", "--max", dest="max", type=int, default=None,
                   help="certify at most this many images (the first ones); under torchrun write --max_images "
                        "(torchrun's own parser takes --max for an abbreviation of its --max-restarts)")
    p.add_argument("--N0", type=int, default=100, help="selection samples (default 100)")
    p.add_argument("--N", type=int, default=None,
                   help="estimation samples (default: cifar10 100000, imagenet 10000, digits 10000)")
    p.add_argument("--batch_size", type=int, default=1000, help="base-classifier batch (does not change the log)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    p.add_argument("--arch", default=None, help="classifier architecture (default: cifar10_vit_base, "
                                                "imagenet_vit_base or digits_vit_tiny) or any timm model name")
    p.add_argument("--finetuned_path", default=None, help="a train.py checkpoint (takes precedence over "
                                                          "--classifier_ckpt)")
    p.add_argument("--off-the-shelf", dest="off_the_shelf", action="store_true",
                   help="certify the off-the-shelf classifier (--classifier_ckpt, else pretrained weights); the "
                        "default when --finetuned_path is not given")
    p.add_argument("--classifier_ckpt", default=None,
                   help="off-the-shelf classifier weights (timm/HF/train.py file); default: pretrained")
    p.add_argument("--denoiser_ckpt", default=None,
                   help="diffusion checkpoint (default models/<official file>); 'none' = no denoiser (plain "
                        "Gaussian smoothing of the classifier)")
    p.add_argument("--data_dir", default=None, help="dataset root (else the dataset's environment variable)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="autocast of f o D (fp32 is exact)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and the classifier (each batch size compiles once, tens of seconds; "
                        "worth it for N in the thousands; see README, Performance)")
    p.add_argument("--noise_block", type=int, default=NOISE_BLOCK,
                   help=f"noise samples per seeded block (default {NOISE_BLOCK}; part of the configuration)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted log of the same configuration")
    p.add_argument("--overwrite", action="store_true", help="replace an existing log")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Fill dataset-dependent defaults and reject bad values (nothing is read or written yet)."""
    from datasets import DATASETS, DEFAULT_ARCH

    if args.dataset not in DATASETS:
        raise UserError(f"--dataset {args.dataset!r}: choose one of {', '.join(DATASETS)}")
    args.N = DEFAULT_N.get(args.dataset, 100_000) if args.N is None else args.N
    args.skip = DEFAULT_SKIP.get(args.dataset, 1) if args.skip is None else args.skip
    if args.arch is None:
        args.arch = DEFAULT_ARCH[args.dataset]
    if not (math.isfinite(args.sigma) and args.sigma > 0):
        raise UserError(f"--sigma {args.sigma}: must be > 0")
    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha {args.alpha}: must lie in (0, 1)")
    for flag in ("N0", "N", "batch_size", "skip", "noise_block"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be a positive integer")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: must be >= 0")
    if args.max is not None and args.max < 0:
        raise UserError(f"--max_images {args.max}: must be >= 0")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if args.finetuned_path and args.off_the_shelf:
        raise UserError("--finetuned_path and --off-the-shelf contradict each other; pick one")
    if args.denoiser_ckpt is not None and args.denoiser_ckpt.lower() == "none":
        args.denoiser_ckpt = None
        args.no_denoiser = True
    else:
        from denoiser import default_checkpoint_path
        args.no_denoiser = False
        args.denoiser_ckpt = args.denoiser_ckpt or str(default_checkpoint_path(args.dataset))
    args.classifier = args.finetuned_path or args.classifier_ckpt
    # (a missing --denoiser_ckpt is reported by denoiser.load_denoiser, with where to download it)
    for flag, path in (("--finetuned_path", args.finetuned_path), ("--classifier_ckpt", args.classifier_ckpt)):
        if path is not None and not Path(path).exists():
            raise UserError(f"{flag} {path}: no such file")
    if Path(args.outfile).is_dir():
        raise UserError(f"--outfile {args.outfile}: is a directory; name a file")


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """What determines a log's rows (RESUME_KEYS) plus information about the run."""
    return {
        "format": LOG_FORMAT, "dataset": args.dataset, "split": args.split, "sigma": args.sigma, "N0": args.N0,
        "N": args.N, "alpha": args.alpha, "seed": args.seed, "skip": args.skip, "arch": args.arch,
        "denoiser": None if args.no_denoiser else args.dataset,
        "denoiser_ckpt": None if args.no_denoiser else Path(args.denoiser_ckpt).name,
        "classifier": Path(args.classifier).name if args.classifier else "pretrained",
        "precision": args.precision, "noise_block": args.noise_block,
        # informational
        "max": args.max, "finetuned": bool(args.finetuned_path),
    }


def print_summary(outfile: Path, config: dict[str, Any], num_new: int, wall: float) -> None:
    """Certified accuracy at a few radii, ACR, abstentions and time of the merged log."""
    df = analysis.read_log(outfile)
    acc = analysis.certified_accuracy(df, RADII)
    total = float(df["time"].sum())
    print(f"{outfile}: {len(df)} images, sigma={config['sigma']}, N0={config['N0']}, N={config['N']}, "
          f"alpha={config['alpha']} ({num_new} certified in this run, {wall:.1f} s)")
    print("  certified accuracy  " + "  ".join(f"r={r:g}: {a:.3f}" for r, a in zip(RADII, acc)))
    print(f"  ACR {analysis.acr(df):.4f}, abstentions {int((df['predict'] == Smooth.ABSTAIN).sum())} "
          f"({analysis.abstention_rate(df):.1%}), certification time {total:.1f} s "
          f"({total / len(df):.3f} s/image)")


def main(argv: Optional[Sequence[str]] = None) -> Optional[list[Row]]:
    """Run the certification; returns the merged log's rows on rank 0 (None on the other ranks)."""
    args = get_parser().parse_args(argv)
    _check_args(args)
    config = run_config(args)
    outfile = Path(args.outfile)
    side = sidecar_path(outfile)

    # 1. read-only checks of what is on disk (every rank reads the same files before anyone writes)
    existing = [p for p in [outfile, side] + existing_parts(outfile) if p.exists()]
    if existing and not (args.resume or args.overwrite):
        raise UserError(f"--outfile {outfile}: {existing[0]} already exists; pass --resume to continue it or "
                        "--overwrite to replace it")
    if args.resume and existing:
        check_resume(outfile, config)
    done = read_done(outfile) if args.resume else {}

    dist_info = init_distributed(args.device)
    try:
        device = dist_info.device
        # 2. data and models (a missing file is a UserError here, before anything is written)
        from datasets import certification_indices, get_dataset, get_num_classes
        dataset = get_dataset(args.dataset, args.split, data_dir=args.data_dir)
        indices = certification_indices(dataset, args.skip, args.max)
        model = build_base_classifier(args.dataset, args.arch, args.classifier,
                                      None if args.no_denoiser else args.denoiser_ckpt, args.sigma,
                                      get_num_classes(args.dataset), device)
        prepare_inference_(model, args.precision)  # bf16/fp16: weights kept in that dtype, UNet channels_last
        if args.compile:
            compile_for_inference_(model)
        smoothed = Smooth(model, get_num_classes(args.dataset), args.sigma, precision=args.precision,
                          noise_block=args.noise_block)
        barrier()

        # 3. rank 0 prepares the output; then every rank appends to its own file
        if dist_info.is_main:
            if args.overwrite:
                for path in existing:
                    path.unlink()
            outfile.parent.mkdir(parents=True, exist_ok=True)
            if not side.is_file():
                info = {"argv": list(sys.argv if argv is None else argv), "batch_size": args.batch_size,
                        "world_size": dist_info.world_size, "device": str(device), "compile": args.compile,
                        "torch": torch.__version__,
                        "started": time.strftime("%Y-%m-%d %H:%M:%S")}
                atomic_write_text(side, json.dumps({"config": config, "info": info}, indent=1) + "\n")
        barrier()
        todo = [i for i in indices if i not in done][dist_info.rank::dist_info.world_size]
        target = outfile if dist_info.world_size == 1 else part_path(outfile, dist_info.rank)
        if dist_info.is_main and done:
            print(f"resuming {outfile}: {sum(i in done for i in indices)} of {len(indices)} images already done",
                  file=sys.stderr)
        start = time.perf_counter()
        with open_for_append(target) as log:
            certify_dataset(smoothed, dataset, todo, log, args.N0, args.N, args.alpha, args.batch_size,
                                  args.seed, device, progress=dist_info.is_main and not args.no_progress,
                                  done=[done[i] for i in indices if i in done])
            os.fsync(log.fileno())
        barrier()

        # 4. rank 0 merges the parts into one idx-sorted log
        if not dist_info.is_main:
            return None
        rows = merge_parts(outfile)
        if rows:
            print_summary(outfile, config, len(rows) - len(done), time.perf_counter() - start)
        else:
            print(f"{outfile}: no images selected (--max_images {args.max}, --skip {args.skip})")
        return rows
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    run_cli(main)
