"""The library behind ``certify.py`` (and PREDICT-style CLIs): build f o D, run a per-image method over a dataset's
selected images, write and resume Cohen-format logs, split the work over ``torchrun`` processes.

A run (:func:`run`):

1. read-only checks of what is on disk (:func:`runkit.resume.check_outputs`; ``--resume`` compares the sidecar's
   configuration, :data:`RESUME_KEYS`);
2. data and models (:func:`build_base_classifier`, then the opt-in speed-ups of :mod:`fast` when asked);
3. rank 0 writes the configuration sidecar; every rank appends rows to its own part (:func:`run_dataset`,
   :mod:`runkit.parts`);
4. rank 0 merges the parts into one idx-sorted log (:func:`runkit.parts.merge_parts`) and prints a summary.

The run machinery (locks, resume checks, rank parts, shards and their merge) is :mod:`runkit`'s; this module holds
the run of the method and its options.

Image idx's noise comes from a generator seeded by (seed, idx) (:func:`core.image_generator`), so a log depends
neither on the batch size, nor on the number of processes, nor on interruptions. What is computed per image is a
:class:`Method` (CERTIFY: :func:`certify_method`; PREDICT: :func:`predict_method`), with its own row type.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Container, Iterator, Optional, Sequence, TextIO, Type

import torch

from core import (
    NOISE_BLOCK,
    PHASE_ESTIMATION,
    ClassifierStack,
    DenoisedClassifier,
    NoiseStream,
    SampleRange,
    Smooth,
    Steps,
    draw_key,
    image_generator,
)
from pool import run_each, run_pool
from presets import ALPHA, DATASETS, N0, PRESETS, per_dataset
from runkit.cli import check_number
from runkit.devices import (
    DEFAULT_TF32,
    PRECISION_CHOICES,
    TF32_MODES,
    cuda_math,
    device_model,
    resolve_device,
    resolve_precision,
)
from runkit.distributed import DEFAULT_DIST_TIMEOUT_MINUTES, DistInfo, barrier, cleanup_distributed, init_distributed
from runkit.errors import UserError
from runkit.files import (
    check_output,
    file_fingerprint,
    output_folder,
    remove_stale_temporary_files,
    write_failures,
    writing,
)
from runkit.locks import job_run_lock, lock_path
from runkit.logs import ABSTAIN, LogRow, PredictRow, Row, SampledRow, idx_list, read_log
from runkit.memory import AUTO, largest_batch, parse_batch_size
from runkit.parts import appending_parts, merge_rank_parts, rank_share
from runkit.progress import DEFAULT_INTERVAL, Progress
from runkit.resume import add_device_model, check_device_model, check_outputs, parse_override, prepare_outputs
from runkit.shards import Shard, encode_indices, merge_shard_logs, parse_shard, shard_path
from runkit.sidecars import sidecar_path
from sequential import default_sequential_radii, estimate_sequential_steps

LOG_FORMAT = 1
# the defaults by dataset (N, --subset, --skip, --arch) are the paper's protocol, presets.Preset (METHOD §4)
SUBSETS = ("paper", "skip")
# entries of the sidecar's "config" that a --resume must match (the others are informational)
RESUME_KEYS = ("format", "dataset", "split", "sigma", "N0", "N", "alpha", "seed", "skip", "arch", "denoiser",
               "denoiser_ckpt", "classifier", "precision", "noise_block", "subset", "input_norm", "multistep",
               "mode", "radii", "skip_wrong", "tf32")
# the value a sidecar without the entry stands for (compared as such on --resume)
RESUME_DEFAULTS = {"subset": "skip", "input_norm": "model", "multistep": False, "mode": "fixed", "radii": None,
                   "skip_wrong": False, "tf32": DEFAULT_TF32}
RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # the radii of the summary printed after a run
# what a sequential log's radius column holds (its sidecar says it; the log itself stays a plain Cohen log)
SEQUENTIAL_RADIUS = ("the radius at the stop: a valid certificate, but below the fixed-N radius, so the log's ACR "
                     "is a lower bound (ACR≥)")
FSYNC_SECONDS = 60.0
DEFAULT_BATCH_SIZE = 1000  # --batch_size off CUDA (on CUDA: auto)
AUTO_HEADROOM = 16  # --batch_size auto leaves 1/16 of the largest batch that fits free (noise blocks in flight)


# ---------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RunOptions:
    """The resolved options of a run (the flags of :func:`add_run_arguments`; see :func:`resolve_options`)."""

    dataset: str
    sigma: float
    outfile: list[str]  # one log per classifier, in the order of :attr:`classifiers`
    seed: int
    split: str
    skip: Optional[int]
    max: Optional[int]
    N0: Optional[int]  # None: the method draws no selection samples (PREDICT)
    N: Optional[int]
    batch_size: Optional[int | str]  # a size, or "auto" (resolve_options; build_smoothed searches it)
    alpha: float
    arch: Optional[str]
    finetuned_path: Optional[list[str]]
    off_the_shelf: bool
    classifier_ckpt: Optional[str]
    denoiser_ckpt: Optional[str]
    data_dir: Optional[str]
    device: Optional[str]
    precision: str
    compile: bool
    no_pool: Optional[bool]
    fast: bool
    noise_block: int
    resume: bool
    overwrite: bool
    no_progress: bool
    log_interval: float
    subset: Optional[str]
    input_norm: Optional[str]
    multistep: bool
    sequential: Optional[bool]  # certify.py only (None where a CLI has no such flag)
    radii: Optional[list[float]]
    skip_wrong: Optional[bool]
    shard: Optional[str]
    dist_timeout: float
    tf32: str
    cudnn_benchmark: bool
    channels_last: Optional[bool]  # None: fast.channels_last_default
    override: Optional[str]
    # filled by resolve_options
    no_denoiser: bool = False
    classifiers: tuple[Optional[str], ...] = ()  # the checkpoint of each log's classifier; None = pretrained
    finetuned: tuple[bool, ...] = ()
    input_norms: tuple[str, ...] = ()  # the input convention of each classifier
    shard_of: Optional[Shard] = None

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> RunOptions:
        """The options from a parsed command line (flags a CLI does not define are None)."""
        return cls(**{f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls) if f.default is
                      dataclasses.MISSING})

    @property
    def use_fast(self) -> bool:
        """Whether the run takes the opt-in fast path (:mod:`fast`): asked with --fast, implied by a reduced
        precision or --compile."""
        return bool(self.fast or self.compile or self.precision != "fp32")

    @property
    def log_paths(self) -> list[Path]:
        """The logs this run writes: the --outfile(s), or with --shard K/S their shard logs ``<outfile>.shard<K>of<S>``.
        """
        outfiles = [Path(o) for o in ([self.outfile] if isinstance(self.outfile, str) else self.outfile)]
        return outfiles if self.shard_of is None else [shard_path(o, self.shard_of.k, self.shard_of.s)
                                                       for o in outfiles]


def add_run_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every certification-style CLI shares (model, data, noise, precision, output, resume)."""
    _add_data_arguments(p)
    _add_model_arguments(p)
    _add_compute_arguments(p)
    _add_output_arguments(p)
    return p


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The data, noise and estimation flags: which images, sigma, N, alpha, the output logs."""
    p.add_argument("--dataset", required=True, help="cifar10, imagenet or digits")
    p.add_argument("--sigma", type=float, required=True, help="noise level sigma of the smoothed classifier")
    p.add_argument("--outfile", required=True, nargs="+",
                   help="the log to write (with <outfile>.json, its configuration); several classifiers: one log "
                        "each, in their order (the off-the-shelf one first, then each --finetuned_path)")
    p.add_argument("--seed", type=int, default=0, help="image idx's noise is seeded by (seed, idx)")
    p.add_argument("--split", default="test", help="dataset split (default test)")
    p.add_argument("--subset", default=None, choices=SUBSETS,
                   help="which images: 'paper' = the paper's ImageNet rule, one random image per class seeded by "
                        "--seed (default for imagenet); 'skip' = every --skip-th image (the default otherwise)")
    p.add_argument("--skip", type=int, default=None,
                   help="with --subset skip: use every skip-th image (default: 1; imagenet 50, i.e. diffusion "
                        "denoised smoothing's 1,000 images, the first of each class); implies --subset skip")
    p.add_argument("--max_images", "--max", dest="max", type=int, default=None,
                   help="use at most this many images (the first ones); under torchrun write --max_images "
                        "(torchrun's own parser takes --max for an abbreviation of its --max-restarts)")
    p.add_argument("--N", type=int, default=None,
                   help=f"estimation samples (default: {per_dataset('N')})")
    p.add_argument("--batch_size", default=None, metavar="B|auto",
                   help="samples per forward pass of f o D (does not change the log): a number, or auto = the largest "
                        "batch that fits in CUDA memory, found once per run (default on CUDA; elsewhere the default is "
                        f"{DEFAULT_BATCH_SIZE}); a pass that runs out of memory is retried in halves")
    p.add_argument("--alpha", type=float, default=ALPHA, help=f"failure probability (default {ALPHA})")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model flags: the classifier(s), the denoiser, the classifier input, the dataset root."""
    p.add_argument("--arch", default=None, help=f"classifier architecture (default: {per_dataset('arch')}) or any timm "
                                                "model name")
    p.add_argument("--finetuned_path", default=None, nargs="+",
                   help="one or more train.py checkpoints (without --off-the-shelf, they replace the off-the-shelf "
                        "classifier); several classifiers share every denoised sample, one --outfile each")
    p.add_argument("--off-the-shelf", dest="off_the_shelf", action="store_true",
                   help="use the off-the-shelf classifier (--classifier_ckpt, else pretrained weights): the "
                        "default without --finetuned_path; with it, the off-the-shelf one comes first")
    p.add_argument("--classifier_ckpt", default=None,
                   help="off-the-shelf classifier weights (timm/HF/train.py file); default: pretrained")
    p.add_argument("--denoiser_ckpt", default=None,
                   help="diffusion checkpoint (default models/<official file>); 'none' = no denoiser (plain "
                        "Gaussian smoothing of the classifier)")
    p.add_argument("--input_norm", default=None, choices=("paper", "model"),
                   help="classifier input: 'paper' = 2x - 1 (mean = std = 0.5, what the paper's code feeds) or 'model' "
                        "= the model's own mean/std; default: what the checkpoint recorded, else paper for "
                        "imagenet_vit_base and model otherwise (the same for the CIFAR-10 ViT)")
    p.add_argument("--multistep", action="store_true",
                   help="denoise with the whole reverse chain t*, ..., 0 (the paper's multistep=True; t* + 1 UNet calls "
                        "per sample instead of one); default: one-shot, the paper's setting")
    p.add_argument("--data_dir", default=None, help="dataset root (else the dataset's environment variable)")


def _add_compute_arguments(p: argparse.ArgumentParser) -> None:
    """The compute flags: device, precision, TF32, memory format, fast path, compile, noise blocks."""
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available); under torchrun "
                                                   "cuda:N gives local rank r the GPU cuda:N+r")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="autocast of f o D: auto (default) = bf16 where the device computes it natively (CUDA "
                        "Ampere+, CPUs with AVX512-BF16/AMX), else fp16 on CUDA, else fp32; fp32 is exact; bf16/fp16 "
                        "take the fast path (see --fast). The sidecar records the precision used")
    p.add_argument("--tf32", default=DEFAULT_TF32, choices=list(TF32_MODES),
                   help="which fp32 work CUDA GPUs from Ampere on compute in TF32: conv (default: torch's and the "
                        "paper's) = the UNet's convolutions, on = also the matmuls, off = none (exact fp32); recorded, "
                        "part of the configuration; no effect elsewhere")
    p.add_argument("--cudnn_benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms per shape (the choice, and with it the last bits, "
                        "may differ between processes; speed-up unmeasured)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="with bf16/fp16: the UNet in channels_last memory format (default: on CPU, not on CUDA)")
    p.add_argument("--fast", action="store_true",
                   help="the opt-in inference speed-ups of fast.py (class-token shortcut, and with bf16/fp16 "
                        "weights stored in that dtype, channels_last UNet); implied by --precision bf16/fp16 "
                        "and --compile")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and the classifier (tens of seconds; worth it for N in the thousands; "
                        "see README, Performance); every forward pass is padded to the batch size: one shape")
    p.add_argument("--no_pool", action="store_true",
                   help="certify the images one after the other (the same rows): by default many images are in flight "
                        "and their noise samples fill every forward pass up to --batch_size")
    p.add_argument("--noise_block", type=int, default=NOISE_BLOCK,
                   help=f"noise samples per seeded block (default {NOISE_BLOCK}; part of the configuration)")


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    """The run flags: resume, overwrite, progress, shards, the distributed timeout, override, merge."""
    p.add_argument("--resume", action="store_true", help="continue an interrupted log of the same configuration")
    p.add_argument("--overwrite", action="store_true", help="replace an existing log")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--log_interval", type=float, default=DEFAULT_INTERVAL, metavar="SECONDS",
                   help=f"when stderr is not a terminal (Slurm, nohup, 2>log): one progress line every SECONDS "
                        f"(images done, rate, ETA, running accuracy) instead of a redrawn bar (default "
                        f"{DEFAULT_INTERVAL:g})")
    p.add_argument("--shard", default=None, metavar="K/S|auto",
                   help="only the K-th (0-based) of S disjoint parts of the selected images (every S-th from the "
                        "K-th), into <outfile>.shard<K>of<S>, resumable on its own; auto: K and S of a Slurm array "
                        "task (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT); combine with --merge")
    p.add_argument("--dist_timeout", type=float, default=DEFAULT_DIST_TIMEOUT_MINUTES, metavar="MINUTES",
                   help="under torchrun: how long the ranks wait for each other (the final barrier waits for the "
                        "slowest rank; torch's own default, 10 minutes for NCCL, would kill the job); default "
                        f"{DEFAULT_DIST_TIMEOUT_MINUTES:g} (24 hours)")
    p.add_argument("--override", default=None, metavar="device",
                   help="with --resume or --merge: 'device' continues or merges logs of another device model (the "
                        "noise streams differ: certificates stay valid, the log is reproducible on no single device)")
    p.add_argument("--merge", metavar="OUTFILE",
                   help="alone: merge the shard logs <OUTFILE>.shard<K>of<S> into OUTFILE (idx-sorted), refusing "
                        "shards of different configurations, overlapping or missing images")


def resolve_options(opts: RunOptions) -> RunOptions:
    """Fill dataset-dependent defaults and reject bad values (nothing is read or written yet); returns ``opts``."""
    if opts.dataset not in DATASETS:
        raise UserError(f"--dataset {opts.dataset!r}: choose one of {', '.join(DATASETS)}")
    preset = PRESETS[opts.dataset]
    opts.N = preset.N if opts.N is None else opts.N
    _resolve_subset(opts)
    opts.arch = preset.arch if opts.arch is None else opts.arch
    check_number("--sigma", opts.sigma, 0, low_open=True)
    check_number("--alpha", opts.alpha, 0, 1, low_open=True, high_open=True)
    check_number("--dist_timeout", opts.dist_timeout, 0, low_open=True)
    check_number("--log_interval", opts.log_interval, 0, low_open=True)
    for flag in ("N0", "N", "skip", "noise_block"):
        if getattr(opts, flag) is not None and getattr(opts, flag) <= 0:
            raise UserError(f"--{flag} {getattr(opts, flag)}: must be a positive integer")
    opts.batch_size = parse_batch_size(opts.batch_size)
    if opts.seed < 0:
        raise UserError(f"--seed {opts.seed}: must be >= 0")
    if opts.max is not None and opts.max < 0:
        raise UserError(f"--max_images {opts.max}: must be >= 0")
    if opts.resume and opts.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    _resolve_classifiers(opts)
    _resolve_sequential(opts)
    opts.no_denoiser = opts.denoiser_ckpt is not None and opts.denoiser_ckpt.lower() == "none"
    if opts.no_denoiser:
        opts.denoiser_ckpt = None
    else:
        from denoiser import default_checkpoint_path
        opts.denoiser_ckpt = opts.denoiser_ckpt or str(default_checkpoint_path(opts.dataset))
    if opts.multistep and opts.no_denoiser:
        raise UserError("--multistep needs a denoiser; drop --denoiser_ckpt none or --multistep")
    # (a missing --denoiser_ckpt is reported by denoiser.load_denoiser, with where to download it)
    for flag, path in [("--finetuned_path", p) for p in opts.finetuned_path or []] + [
            ("--classifier_ckpt", opts.classifier_ckpt)]:
        if path is not None and not Path(path).exists():
            raise UserError(f"{flag} {path}: no such file")
    from classifier import checkpoint_input_norm, resolve_input_norm
    opts.input_norms = tuple(resolve_input_norm(opts.arch, opts.input_norm, checkpoint_input_norm(c), c)
                             for c in opts.classifiers)
    opts.input_norm = opts.input_norms[0]
    for outfile in opts.outfile:
        check_output(outfile, "--outfile")
    device = resolve_device(opts.device)
    opts.precision = resolve_precision(opts.precision, device)  # auto: bf16 where native
    if opts.batch_size is None or (opts.batch_size == AUTO and device.type != "cuda"):
        opts.batch_size = AUTO if device.type == "cuda" else DEFAULT_BATCH_SIZE  # auto searches CUDA memory only
    opts.shard_of = parse_shard(opts.shard) if opts.shard is not None else None
    parse_override(opts.override)
    return opts


def _resolve_subset(opts: RunOptions) -> None:
    """--subset and --skip: defaults by dataset; an explicit --skip means --subset skip; --subset paper takes none."""
    if opts.subset is None:
        opts.subset = "skip" if opts.skip is not None else PRESETS[opts.dataset].subset
    if opts.subset == "paper" and opts.skip is not None:
        raise UserError(f"--skip {opts.skip} contradicts --subset paper (one random image per class); use --subset "
                        "skip --skip N for every N-th image")
    if opts.subset == "skip" and opts.skip is None:
        opts.skip = PRESETS[opts.dataset].skip


def select_indices(dataset: Any, opts: RunOptions) -> list[int]:
    """The dataset indices a run certifies: :func:`datasets.paper_imagenet_subset` (``--subset paper``, seeded by
    --seed) or every --skip-th image, at most --max_images of them (the first ones).

    Args:
        dataset: the dataset (its ``targets`` for ``--subset paper``).
        opts: resolved options (subset, skip, max, seed, dataset).
    """
    from datasets import certification_indices, get_num_classes, paper_imagenet_subset
    if opts.subset != "paper":
        return certification_indices(dataset, opts.skip, opts.max)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise UserError(f"--subset paper: the {opts.dataset} dataset has no list of labels; use --subset skip")
    indices = paper_imagenet_subset(targets, opts.seed, get_num_classes(opts.dataset))
    return indices if opts.max is None or opts.max < 0 else indices[:opts.max]


def _resolve_classifiers(opts: RunOptions) -> None:
    """The classifiers of a run, one log each: the off-the-shelf one (without --finetuned_path, or with
    --off-the-shelf), then each --finetuned_path."""
    opts.outfile = [opts.outfile] if isinstance(opts.outfile, str) else list(opts.outfile)
    finetuned = list(opts.finetuned_path or [])
    off_the_shelf = [opts.classifier_ckpt] if opts.off_the_shelf or not finetuned else []
    opts.classifiers = tuple(off_the_shelf + finetuned)
    opts.finetuned = tuple([False] * len(off_the_shelf) + [True] * len(finetuned))
    if len(opts.outfile) != len(opts.classifiers):
        names = ["--off-the-shelf"] * len(off_the_shelf) + finetuned
        raise UserError(f"--outfile: {len(opts.outfile)} log(s) for {len(opts.classifiers)} classifier(s) "
                        f"({', '.join(names)}); give one --outfile per classifier, in that order")
    if len({Path(o).resolve() for o in opts.outfile}) != len(opts.outfile):
        raise UserError(f"--outfile {' '.join(opts.outfile)}: the same log twice; give each classifier its own")


def _resolve_sequential(opts: RunOptions) -> None:
    """--sequential's radii (default: 0 and the paper's table radii that --N could certify) and their checks."""
    if opts.radii is not None and not opts.sequential:
        raise UserError("--radii: only with --sequential (fixed-N CERTIFY certifies whatever radius N gives)")
    if opts.sequential and opts.radii is None:
        n = opts.N if opts.N is not None else PRESETS[opts.dataset].N
        opts.radii = default_sequential_radii(opts.dataset, opts.sigma, n, opts.alpha)
    if opts.radii is not None:
        if not opts.radii or any(not (math.isfinite(r) and r >= 0) for r in opts.radii):
            raise UserError(f"--radii {' '.join(map(str, opts.radii))}: give one or more radii >= 0")
        opts.radii = sorted(set(float(r) for r in opts.radii))


def classifier_flag(opts: RunOptions, k: int = 0) -> str:
    """The flag that gave the checkpoint of log ``k``'s classifier: ``--finetuned_path`` or ``--classifier_ckpt``.

    Args:
        opts: resolved options.
        k: the log (classifier) index.
    """
    return "--finetuned_path" if opts.finetuned[k] else "--classifier_ckpt"


def checkpoint_files(opts: RunOptions, k: int = 0) -> dict[str, tuple[str, str]]:
    """The checkpoint files log ``k`` depends on, by role (``classifier``, ``denoiser``): (the flag naming it, its
    path). A pretrained classifier's is the file its weights come from, where known
    (:func:`classifier.pretrained_weights_file`; the shipped digits classifier).

    Args:
        opts: resolved options.
        k: the log (classifier) index.
    """
    from classifier import pretrained_weights_file

    files = {}
    if opts.classifiers[k]:
        files["classifier"] = (classifier_flag(opts, k), opts.classifiers[k])
    elif (pretrained := pretrained_weights_file(opts.arch)) is not None:
        files["classifier"] = (f"--arch {opts.arch} (pretrained weights)", str(pretrained))
    if opts.denoiser_ckpt:
        files["denoiser"] = ("--denoiser_ckpt", opts.denoiser_ckpt)
    return files


def run_config(opts: RunOptions, k: int = 0) -> dict[str, Any]:
    """What determines the rows of log ``k`` (:data:`RESUME_KEYS`) plus information about the run.

    Args:
        opts: resolved options.
        k: the log (classifier) index.
    """
    classifier = opts.classifiers[k]
    return {
        "format": LOG_FORMAT, "dataset": opts.dataset, "split": opts.split, "sigma": opts.sigma, "N0": opts.N0,
        "N": opts.N, "alpha": opts.alpha, "seed": opts.seed, "skip": opts.skip, "arch": opts.arch,
        "denoiser": None if opts.no_denoiser else opts.dataset,
        "denoiser_ckpt": None if opts.no_denoiser else Path(opts.denoiser_ckpt).name,
        "classifier": Path(classifier).name if classifier else "pretrained",
        "precision": opts.precision, "noise_block": opts.noise_block, "subset": opts.subset,
        "input_norm": opts.input_norms[k], "multistep": bool(opts.multistep),
        "mode": "sequential" if opts.sequential else "fixed", "radii": opts.radii, "skip_wrong": bool(opts.skip_wrong),
        "tf32": opts.tf32,
        # informational
        "max": opts.max, "finetuned": opts.finetuned[k], "radius": SEQUENTIAL_RADIUS if opts.sequential else "fixed N",
        # checked on --resume (check_resume): the content of each checkpoint file used
        "fingerprints": {role: file_fingerprint(path, flag) if Path(path).exists() else None
                         for role, (flag, path) in checkpoint_files(opts, k).items()},
        "shard": None if opts.shard_of is None else str(opts.shard_of),
    }


# ---------------------------------------------------------------------------------------------------------------
# Per-image methods and the loop over a dataset
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """What a run computes for one image and how each result becomes a log row.

    ``steps(x, generator, label)`` is the computation (:data:`core.Steps`) of image x, whose noise comes from
    ``generator``, returning one result per classifier (log); ``to_row(idx, label, result, seconds)`` the row of type
    ``row_type`` of one result. ``smoothed`` counts the samples in forward passes of at most ``batch_size``, of many
    images at once with ``pool`` (:func:`pool.run_pool`; the same results).
    """

    row_type: Type[LogRow]
    steps: Callable[[torch.Tensor, torch.Generator, int], Steps]
    to_row: Callable[[int, int, Any, float], LogRow]
    smoothed: Smooth
    batch_size: int
    pool: bool = True  # many images in flight per forward pass (pool.run_pool), else one after the other

    def compute(self, x: torch.Tensor, generator: torch.Generator, label: int) -> list[Any]:
        """The results of image x alone (:meth:`core.Smooth.run_steps`)."""
        return self.smoothed.run_steps(self.steps(x, generator, label), self.batch_size)


def certify_method(smoothed: Smooth, n0: int, n: int, alpha: float, batch_size: int,
                   radii: Optional[Sequence[float]] = None, skip_wrong: bool = False) -> Method:
    """Cohen et al.'s CERTIFY of each classifier (head) of ``smoothed``: rows ``idx label predict radius correct time``.

    Selection (:meth:`core.Smooth.select`), then estimation: fixed n (:meth:`core.Smooth.estimate`) or, with
    ``radii``, sequential CERTIFY up to n_max = n (:func:`sequential.estimate_sequential`). The heads share every
    noise sample; each gets the result it would get alone. ``skip_wrong`` (evaluation only, never for deployment:
    it reads the label): a head whose selection guess is not the label gets the row (guess, radius 0, correct 0)
    without estimation, and no estimation at all is drawn when every head's guess is wrong. Either adds the column
    ``n``, the estimation samples used (:class:`logs.SampledRow`).

    Args:
        smoothed: the smoothed classifier.
        n0, n: selection and estimation samples (n: n_max with ``radii``).
        alpha: the failure probability.
        batch_size: the base-classifier batch.
        radii: the requested radii of sequential CERTIFY; None: fixed n.
        skip_wrong: write wrong selection guesses without estimation.
    """
    row_type = certify_row_type(radii, skip_wrong)

    def steps(x: torch.Tensor, generator: torch.Generator, label: int) -> Steps:
        key = draw_key(generator)
        cAHat = yield from smoothed.select_steps(x, n0, key)
        # the label-aware early exit: a wrong guess is written as (guess, radius 0) without estimation
        skipped = [(c, 0.0, 0) for c in cAHat]
        estimated = [not skip_wrong or c == label for c in cAHat]
        if not any(estimated):
            return skipped
        if radii is None:
            results = [(c, r, n) for c, r in (yield from smoothed.estimate_steps(x, cAHat, n, alpha, key))]
        else:
            results = yield from estimate_sequential_steps(smoothed, x, cAHat, n, alpha, radii, key, active=estimated)
        return [result if keep else skip for result, keep, skip in zip(results, estimated, skipped)]

    def to_row(idx: int, label: int, result: tuple[int, float, int], seconds: float) -> Row:
        prediction, radius, used = result
        values = (idx, label, int(prediction), float(radius), int(prediction == label), seconds)
        return SampledRow(*values, int(used)) if row_type is SampledRow else Row(*values)

    return Method(row_type, steps, to_row, smoothed, batch_size)


def certify_row_type(radii: Optional[Sequence[float]], skip_wrong: bool) -> Type[Row]:
    """The rows of :func:`certify_method`: :class:`logs.SampledRow` (with the column ``n``) for sequential CERTIFY
    (``radii``) or ``skip_wrong``, else :class:`logs.Row`.

    Args:
        radii, skip_wrong: as for :func:`certify_method`.
    """
    return SampledRow if radii is not None or skip_wrong else Row


def predict_method(smoothed: Smooth, n: int, alpha: float, batch_size: int) -> Method:
    """Cohen et al.'s PREDICT (:meth:`core.Smooth.predict`): rows ``idx label predict correct time``.

    Args:
        smoothed: the smoothed classifier.
        n: the samples of the test.
        alpha: the failure probability.
        batch_size: the base-classifier batch.
    """
    def steps(x: torch.Tensor, generator: torch.Generator, label: int) -> Steps:
        return [(yield from smoothed.predict_steps(x, n, alpha, generator))]

    def to_row(idx: int, label: int, prediction: int, seconds: float) -> PredictRow:
        return PredictRow(idx, label, int(prediction), int(prediction == label), seconds)

    return Method(PredictRow, steps, to_row, smoothed, batch_size)


def run_dataset(method: Method, dataset: Any, indices: Sequence[int], logs: Sequence[TextIO], seed: int,
                device: torch.device, progress: bool = True, done: Sequence[LogRow] = (),
                written: Sequence[Container[int]] = (), log_interval: float = DEFAULT_INTERVAL) -> list[LogRow]:
    """Run ``method`` on every ``dataset[idx]`` for idx in ``indices``; write each row to its log (``logs``: one per
    result of the method) as soon as it is known (fsync at least every :data:`FSYNC_SECONDS`).

    Image idx's noise is seeded by (seed, idx) (:func:`core.image_generator`), so a row does not depend on which
    process computes it, in which order, or with which batch size; with ``method.pool`` the images finish, and their
    rows are written, in another order than ``indices`` (the logs' readers and merges sort by idx). ``written[k]``
    (resuming several logs): the idx that log k already holds, not written again. ``done`` (rows written earlier)
    only feeds the progress bar's running figures. Returns the new rows of the first log.

    Args:
        method: what to compute per image (:func:`certify_method`, :func:`predict_method`).
        dataset: ``dataset[idx]`` gives (x, label).
        indices: the images to compute, in order.
        logs: one open text file per result of the method.
        seed: the run's seed.
        device: where x goes.
        progress: show progress (a bar on a terminal, else a line every ``log_interval`` seconds).
        done: rows written earlier (progress bar only).
        written: per log, the idx it already holds.
        log_interval: seconds between two progress lines when stderr is not a terminal.
    """
    written = list(written) or [()] * len(logs)
    rows: list[LogRow] = []
    last_sync = time.monotonic()
    bar = Progress(total=len(indices), unit="img", enabled=progress, interval=log_interval)

    def computations() -> Iterator[tuple[tuple[int, int], Steps]]:  # each image loaded when its computation starts
        for idx in indices:
            x, label = dataset[idx]
            yield (int(idx), int(label)), method.steps(x.to(device), image_generator(seed, idx), int(label))

    drive = run_pool if method.pool else run_each
    for (idx, label), results, seconds in drive(method.smoothed, computations(), method.batch_size):
        for k, (out, result) in enumerate(zip(logs, results)):
            row = method.to_row(idx, label, result, seconds)
            if idx not in written[k]:
                with writing(out.name):
                    out.write(row.line())
                    out.flush()
            if k == 0:
                rows.append(row)
        if time.monotonic() - last_sync > FSYNC_SECONDS:
            for out in logs:
                with writing(out.name):
                    os.fsync(out.fileno())
            last_sync = time.monotonic()
        bar.update(1)
        if progress:
            bar.set_postfix(_running_figures([*done, *rows]), refresh=False)
    bar.close()
    return rows


def _running_figures(rows: Sequence[LogRow]) -> dict[str, str]:
    """The progress bar's accuracy (and average certified radius, for CERTIFY rows) so far."""
    figures = {"acc": f"{sum(r.correct for r in rows) / len(rows):.3f}"}  # type: ignore[attr-defined]
    if isinstance(rows[-1], Row):  # CERTIFY rows (also SampledRow) have a radius
        figures["acr"] = f"{sum(r.radius * r.correct for r in rows) / len(rows):.3f}"  # type: ignore[attr-defined]
    return figures


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def build_base_classifier(dataset: str, arch: str, classifier_ckpt: Optional[str] | Sequence[Optional[str]],
                          denoiser_ckpt: Optional[str], sigma: float, num_classes: int, device: torch.device,
                          input_norm: Optional[str] | Sequence[Optional[str]] = None, multistep: bool = False,
                          flags: str | Sequence[str] = "--classifier_ckpt") -> DenoisedClassifier:
    """f o D: the classifier ``arch`` (weights from ``classifier_ckpt``, else pretrained; input convention
    ``input_norm``, None = the checkpoint's or the architecture's) after the denoiser of config ``dataset``
    (``denoiser_ckpt``; None = no denoiser, i.e. plain Gaussian smoothing), one-shot or ``multistep``. Lists of
    checkpoints (and of their input conventions) give K classifiers after one denoiser
    (:class:`core.ClassifierStack`, logits [B, K, classes]).

    Args:
        dataset: the denoiser's configuration (``cifar10``, ``imagenet``, ``digits``).
        arch: the classifier architecture.
        classifier_ckpt: a checkpoint, a list of them, or None (pretrained).
        denoiser_ckpt: the diffusion checkpoint; None: no denoiser.
        sigma: the noise level.
        num_classes: the classifier's classes.
        device: where the models go.
        input_norm: the input convention, or one per checkpoint; None: the checkpoint's or the architecture's.
        multistep: denoise with the whole reverse chain.
        flags: the flag that gave each checkpoint (or one for all), named by the errors about it.
    """
    from classifier import get_architecture
    from denoiser import load_denoiser

    denoiser = None if denoiser_ckpt is None else load_denoiser(dataset, denoiser_ckpt, device=device)
    ckpts = [classifier_ckpt] if classifier_ckpt is None or isinstance(classifier_ckpt, str) else list(classifier_ckpt)
    norms = [input_norm] * len(ckpts) if input_norm is None or isinstance(input_norm, str) else list(input_norm)
    flags = [flags] * len(ckpts) if isinstance(flags, str) else list(flags)
    classifiers = [get_architecture(arch, num_classes=num_classes, pretrained=ckpt is None, checkpoint=ckpt,
                                    device=device, input_norm=norm, checkpoint_flag=flag)
                   for ckpt, norm, flag in zip(ckpts, norms, flags)]
    classifier = classifiers[0] if len(classifiers) == 1 else ClassifierStack(classifiers)
    return DenoisedClassifier(denoiser, classifier, sigma, multistep=multistep).to(device).eval()


def build_smoothed(opts: RunOptions, device: torch.device) -> Smooth:
    """The smoothed classifier of a run: f o D, sped up by :mod:`fast` when the options ask for it; ``--batch_size
    auto`` becomes a size here (:func:`auto_batch_size`).

    Args:
        opts: resolved options.
        device: where the models go.
    """
    from datasets import get_num_classes

    num_classes = get_num_classes(opts.dataset)
    flags = [classifier_flag(opts, k) for k in range(len(opts.classifiers))]  # what a classifier's errors name
    model = build_base_classifier(opts.dataset, opts.arch, opts.classifiers, opts.denoiser_ckpt, opts.sigma,
                                  num_classes, device, opts.input_norms, bool(opts.multistep), flags)
    smoothed = Smooth(model, num_classes, opts.sigma, precision=opts.precision, noise_block=opts.noise_block,
                      per_sample_generators=bool(opts.multistep),  # multi-step denoising: chains seeded per sample
                      fixed_batch=bool(opts.compile))  # one shape: the compiled networks compile once
    if opts.use_fast:
        from fast import prepare_inference_
        prepare_inference_(model, opts.precision, opts.channels_last)  # bf16/fp16: weights in that dtype
    if opts.batch_size == AUTO:  # on the eager networks: compiled ones would compile a graph for every size tried
        opts.batch_size = auto_batch_size(smoothed, opts, device)
    if opts.compile:
        from fast import compile_for_inference_
        compile_for_inference_(model)
    return smoothed


def auto_batch_size(smoothed: Smooth, opts: RunOptions, device: torch.device) -> int:
    """``--batch_size auto``: the largest forward pass of f o D (at most max(N, N0) samples) that fits on the CUDA
    ``device`` (:func:`runkit.memory.largest_batch`, on an image of the dataset's size), less 1/:data:`AUTO_HEADROOM`
    for the noise blocks of the images in flight. A pass that runs out of memory later is retried in halves all the
    same (:meth:`core.Smooth.count_ranges`).

    Args:
        smoothed: the smoothed classifier (its networks not compiled yet).
        opts: resolved options (dataset, N, N0).
        device: the CUDA device.
    """
    size = PRESETS[opts.dataset].image_size
    x = torch.zeros(3, size, size, device=device)

    def attempt(b: int) -> None:  # one pass, no retry in halves (that would hide the failure)
        with torch.inference_mode():
            smoothed.count_pass([SampleRange(NoiseStream(x, 0, PHASE_ESTIMATION, smoothed.noise_block, b), 0, b)], b)

    best = largest_batch(attempt, device, max(opts.N or 1, opts.N0 or 1), start=16)
    smoothed.passes = smoothed.samples = 0  # the search's passes are not the run's
    if not best:
        raise UserError(f"--batch_size auto: not even one sample of f o D fits in the memory of {device}")
    print(f"--batch_size auto: {best - best // AUTO_HEADROOM} samples per forward pass on {device} (the largest "
          f"that fits: {best})", file=sys.stderr)
    return best - best // AUTO_HEADROOM


# ---------------------------------------------------------------------------------------------------------------
# Outputs: the rows a resumed log holds
# ---------------------------------------------------------------------------------------------------------------


def check_done_rows(outfile: Path, done: Container[int], indices: Sequence[int], dataset: Any, opts: RunOptions
                    ) -> None:
    """Refuse to resume a log holding rows of images this run does not select: their rows would be kept and counted.

    Rows beyond a smaller ``--max_images`` than the log's (a resume never shrinks a log, so that its summary and
    "already done" count the same images) name the --max_images that keeps them; any other row (an idx outside the
    dataset, or not selected by --skip/--subset/--shard) means that the log is not of this run.

    Args:
        outfile: the log.
        done: the idx of its rows.
        indices: the images this run (this shard) selects.
        dataset: the dataset (for the selection without --max_images).
        opts: resolved options.
    """
    outside = sorted(set(done) - set(indices))  # type: ignore[arg-type]
    if not outside:
        return
    unlimited = select_indices(dataset, dataclasses.replace(opts, max=None))
    position = {idx: k for k, idx in enumerate(unlimited)}
    share = set(opts.shard_of.select(unlimited) if opts.shard_of is not None else unlimited)
    if opts.max is not None and all(idx in share for idx in outside):
        raise UserError(f"--max_images {opts.max}: {outfile} already holds {len(set(done))} images, idx "
                        f"{idx_list(outside)} beyond the first {opts.max} selected; resume with --max_images "
                        f"{max(position[i] for i in outside) + 1} or more (or without it): a resume never drops rows")
    foreign = [idx for idx in outside if idx not in share]
    raise UserError(f"--resume: {outfile} holds idx {idx_list(foreign)}, not among the images this run selects "
                    f"(the dataset has {len(dataset)}; --skip/--subset/--shard select others): the log is not of this "
                    "run; repair it or use another --outfile")


# ---------------------------------------------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------------------------------------------


def run_parts(method: Method, dataset: Any, indices: Sequence[int], outfiles: Sequence[Path],
              dones: Sequence[dict[int, LogRow]], seed: int, dist_info: DistInfo, progress: Optional[float]
              ) -> Optional[list[list[LogRow]]]:
    """Every rank computes every W-th image that some log still lacks into its own part of each log (the logs
    themselves with one process); rank 0 then merges each log's parts into one idx-sorted log and returns the rows
    of each (None on the other ranks).

    Args:
        method: what to compute per image.
        dataset: ``dataset[idx]`` gives (x, label).
        indices: the selected images.
        outfiles: one log per result of the method.
        dones: per log, the rows already there.
        seed: the run's seed.
        dist_info: this process's rank, world size and device.
        progress: rank 0 shows progress (a bar on a terminal, else a line every ``progress`` seconds); None: no
            progress.
    """
    todo = rank_share(indices, dones, dist_info)
    done = dones[0]
    if dist_info.is_main and done:
        print(f"resuming {outfiles[0]}: {sum(i in done for i in indices)} of {len(indices)} images already done",
              file=sys.stderr)
    with appending_parts(outfiles, method.row_type, dist_info) as logs:
        run_dataset(method, dataset, todo, logs, seed, dist_info.device,
                    progress=dist_info.is_main and progress is not None, log_interval=progress or DEFAULT_INTERVAL,
                    done=[done[i] for i in indices if i in done], written=[set(d) for d in dones])
    return merge_rank_parts(outfiles, method.row_type, dist_info)


def summary(outfile: Path, config: dict[str, Any], num_new: int, wall: float, done: Optional[str] = None) -> str:
    """Certified accuracy at :data:`RADII`, ACR, abstentions and time of a merged CERTIFY log (accuracy,
    abstentions and time of a PREDICT log); ``done`` replaces "(num_new certified in this run, wall s)".

    Args:
        outfile: the merged log.
        config: its :func:`run_config`.
        num_new: rows computed in this run.
        wall: seconds of this run.
        done: replaces the parenthesis.
    """
    import analysis

    df = read_log(outfile)
    certify = df.attrs["kind"] == "certify"
    total = float(df["time"].sum())
    done = done or f"{num_new} {'certified' if certify else 'predicted'} in this run, {wall:.1f} s"
    lines = [f"{outfile}: {len(df)} images, sigma={config['sigma']}, "
             + (f"N0={config['N0']}, " if config.get("N0") is not None else "")
             + f"N={config['N']}, alpha={config['alpha']} ({done})"]
    if certify:
        acc = analysis.certified_accuracy(df, RADII)
        lines.append("  certified accuracy  " + "  ".join(f"r={r:g}: {a:.3f}" for r, a in zip(RADII, acc)))
        sequential = config.get("mode") == "sequential"  # radii at the stop: the ACR is a lower bound
        head = f"  ACR{'≥' if sequential else ''} {analysis.acr(df):.4f}" + (" (a lower bound)" if sequential else "")
    else:
        head = f"  accuracy {analysis.clean_accuracy(df):.3f}"
    lines.append(f"{head}, abstentions {int((df['predict'] == ABSTAIN).sum())} ({analysis.abstention_rate(df):.1%}), "
                 f"{'certification' if certify else 'prediction'} time {total:.1f} s ({total / len(df):.3f} s/image)")
    if "n" in df.columns:
        lines.append(f"  {config.get('mode', 'fixed')} mode (radii {config.get('radii')}"
                     f"{', --skip_wrong' if config.get('skip_wrong') else ''}): "
                     f"{float(df['n'].mean()):.0f} estimation samples per image (N={config['N']})")
    return "\n".join(lines)


def run(opts: RunOptions, row_type: Type[LogRow], make_method: Callable[[Smooth, RunOptions], Method],
        argv: Sequence[str]) -> Optional[list[list[LogRow]]]:
    """A whole run (see the module docstring) with resolved ``opts``; returns the rows of each merged log on rank 0
    (None on the other ranks). ``make_method`` gives the per-image method (whose rows are ``row_type``, one result
    per log) for the smoothed classifier; ``argv`` is recorded in the sidecars.

    The job holds ``<outfile>.lock`` of every log (:func:`runkit.locks.job_run_lock`) from before the checks of what
    is on disk to the end, so that a second run on one of the logs (another job, a requeued copy) stops at once
    instead of mixing rows; a run refused before its first row leaves no folder it created.

    Args:
        opts: resolved options (:func:`resolve_options`).
        row_type: the rows of the logs.
        make_method: (smoothed classifier, opts) -> the per-image method.
        argv: the command line, recorded in the sidecars.
    """
    outfiles = opts.log_paths
    configs = [run_config(opts, k) for k in range(len(outfiles))]
    dist_info = init_distributed(opts.device, opts.dist_timeout)
    try:
        with write_failures("rerun the same command with --resume"), contextlib.ExitStack() as stack:
            stack.enter_context(cuda_math(opts.tf32, opts.cudnn_benchmark))
            for outfile in outfiles:
                stack.enter_context(output_folder(outfile.parent))
                stack.enter_context(job_run_lock(lock_path(outfile), f"--outfile {outfile}"))
                if dist_info.is_main:  # what a killed run's atomic writes left
                    remove_stale_temporary_files(outfile.parent, [glob.escape(p.name) for p in
                                                                  (outfile, sidecar_path(outfile))])
            checked = [check_outputs(o, c, opts.resume, opts.overwrite, RESUME_KEYS, RESUME_DEFAULTS, row_type,
                                     checkpoint_files(opts, k)) for k, (o, c) in enumerate(zip(outfiles, configs))]
            return _run_locked(opts, outfiles, configs, checked, make_method, argv, dist_info)
    finally:
        cleanup_distributed()


def _run_locked(opts: RunOptions, outfiles: list[Path], configs: list[dict[str, Any]],
                checked: list[tuple[list[Path], dict[int, LogRow]]],
                make_method: Callable[[Smooth, RunOptions], Method], argv: Sequence[str], dist_info: DistInfo
                ) -> Optional[list[list[LogRow]]]:
    """:func:`run` once the logs are locked and checked (``checked``: each log's existing files and rows done):
    models, sidecars, rows, merge, summaries."""
    from datasets import get_dataset
    dataset = get_dataset(opts.dataset, opts.split, data_dir=opts.data_dir)
    indices = select_indices(dataset, opts)
    selection = encode_indices(indices)  # a shard records the whole run's images, for --merge
    if opts.shard_of is not None:
        indices = opts.shard_of.select(indices)
    for outfile, (_, done) in zip(outfiles, checked):
        check_done_rows(outfile, done, indices, dataset, opts)
    model = device_model(dist_info.device)
    mixed = [opts.resume and bool(existing) and check_device_model(o, model, opts.override)
             for o, (existing, _) in zip(outfiles, checked)]
    method = make_method(build_smoothed(opts, dist_info.device), opts)  # a missing file: UserError, here
    method = dataclasses.replace(method, pool=not opts.no_pool)
    barrier()
    if dist_info.is_main:
        info = {"argv": list(argv), "batch_size": opts.batch_size, "world_size": dist_info.world_size,
                "device": str(dist_info.device), "device_models": [model], "compile": opts.compile,
                "fast": opts.use_fast, "cudnn_benchmark": opts.cudnn_benchmark,
                "classifiers": len(outfiles), "torch": torch.__version__,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                **({"selection": selection} if opts.shard_of is not None else {})}
        for outfile, config, (existing, _), mixes in zip(outfiles, configs, checked, mixed):
            prepare_outputs(outfile, existing, opts.overwrite, config, info)
            if mixes:  # --override device: the sidecar records every device model that wrote rows
                add_device_model(outfile, model)
    barrier()
    start = time.perf_counter()
    logs = run_parts(method, dataset, indices, outfiles, [done for _, done in checked], opts.seed, dist_info,
                     None if opts.no_progress else opts.log_interval)
    if logs is None:
        return None
    for outfile, config, rows, (_, done) in zip(outfiles, configs, logs, checked):
        if rows:
            print(summary(outfile, config, len(rows) - len(done), time.perf_counter() - start))
        else:
            print(f"{outfile}: no images selected (--max_images {opts.max}, --skip {opts.skip})")
    if method.smoothed.passes:
        print(forward_passes(method, dist_info.world_size))
    return logs


def forward_passes(method: Method, world_size: int = 1) -> str:
    """The summary's line on the forward passes of this run (of rank 0): how full they were on average."""
    smoothed = method.smoothed
    mean = smoothed.samples / smoothed.passes
    return (f"  forward passes{' (rank 0)' if world_size > 1 else ''}: {smoothed.passes}, mean batch {mean:.1f} "
            f"samples = {mean / method.batch_size:.1%} of --batch_size {method.batch_size} "
            f"({'pool of images in flight' if method.pool else 'one image at a time, --no_pool'}"
            + (f"; halved {smoothed.fitting.halvings}x after running out of memory" if smoothed.fitting.halvings
               else "") + ")")


# ---------------------------------------------------------------------------------------------------------------
# Shards (--shard K/S, e.g. the tasks of a Slurm array) and --merge
# ---------------------------------------------------------------------------------------------------------------

# the script that merges the shard logs of each header (named when another one is given them)
MERGED_BY = {Row.header(): "certify.py", SampledRow.header(): "certify.py", PredictRow.header(): "predict.py"}
MERGE_KEYS = (*RESUME_KEYS, "max", "fingerprints")  # what every shard of one run must share (and its images)


def merge_shards(outfile: Path, row_types: Sequence[Type[LogRow]] = (Row,), override: Container[str] = ()
                 ) -> list[LogRow]:
    """``--merge OUTFILE``: the shard logs ``<outfile>.shard<k>of<s>`` merged into one idx-sorted ``outfile`` with its
    sidecar (:func:`runkit.shards.merge_shard_logs`; every shard must share :data:`MERGE_KEYS`; a shard log of
    another kind names the script that merges it, :data:`MERGED_BY`), and its summary printed. The shard logs are
    kept.

    Args:
        outfile: the merged log to write; its shard logs lie beside it.
        row_types: the row types the shard logs may have.
        override: the checks to skip (``device``: shards of device models that draw other noise).
    """
    merged = merge_shard_logs(outfile, row_types, MERGE_KEYS, RESUME_DEFAULTS, MERGED_BY, override)
    print(summary(outfile, merged.config, 0, 0.0, done=f"merged from {len(merged.shards)} shard logs"))
    return merged.rows


# ---------------------------------------------------------------------------------------------------------------
# CERTIFY (certify.py)
# ---------------------------------------------------------------------------------------------------------------


def certify_parser() -> argparse.ArgumentParser:
    """certify.py's flags: :func:`add_run_arguments` and CERTIFY's own (N0, --sequential, --radii, --skip_wrong)."""
    p = argparse.ArgumentParser(description="Certify a denoised-smoothed classifier (Cohen et al. CERTIFY); writes "
                                            "a tab-separated log 'idx label predict radius correct time'.")
    add_run_arguments(p)
    p.add_argument("--N0", type=int, default=N0, help=f"selection samples (default {N0})")
    p.add_argument("--sequential", action="store_true",
                   help="sequential CERTIFY: stop estimating once the --radii are decided (--N is the most samples)")
    p.add_argument("--radii", type=float, nargs="+", default=None,
                   help="with --sequential: the radii to decide (default: 0 and the paper's table radii of the "
                        "dataset that --N samples can certify)")
    p.add_argument("--skip_wrong", action="store_true",
                   help="for measuring accuracy only (not deployment): where the selection guess is not the label, "
                        "write (guess, radius 0, correct 0) without estimation; same certified accuracy and ACR")
    return p


def run_certify(opts: RunOptions, argv: Sequence[str]) -> Optional[list[list[LogRow]]]:
    """CERTIFY (fixed N, ``--sequential``, ``--skip_wrong``) with resolved ``opts`` (:func:`run`).

    Args:
        opts: from :func:`certify_parser` and :func:`resolve_options`.
        argv: the command line, recorded in the sidecar.
    Returns:
        on rank 0 the rows of each log (one per classifier), else None.
    """
    def make_method(smoothed: Smooth, o: RunOptions) -> Method:
        return certify_method(smoothed, o.N0, o.N, o.alpha, o.batch_size, o.radii, bool(o.skip_wrong))

    return run(opts, certify_row_type(opts.radii, bool(opts.skip_wrong)), make_method, list(argv))
