"""The FT-CADIS fine-tuning library behind ``train.py`` (METHOD §4), one process of a ``torchrun`` job.

The story of a run, in the order of :func:`train`:

1. :class:`TrainConfig` holds every setting; its fields define train.py's flags, their defaults and help once
   (:func:`add_config_arguments`); :func:`resolve_config` checks them and fills the dataset-dependent defaults.
2. :func:`build_run` builds the run: processes and seeds (:func:`run_seed`), classifier and frozen denoiser,
   optimizer, data, and the position of a resumed run.
3. :func:`run_epoch` runs one epoch. Each loader batch of ``batch`` clean images is split into M = ``num_noises``
   chunks of B' = batch/M images; each chunk is repeated M times (noise-major) and makes one micro-step
   (:func:`micro_step`: :func:`core.noise_and_denoise`, then :func:`cadis.cadis_objective`, backward).
   Gradients are accumulated over ``accum_iter`` micro-steps (DDP ``no_sync`` in between), then
   :func:`optimizer_step` clips per parameter and steps AdamW (layer-wise lr decay, per-iteration lr warmup +
   half-cycle cosine, cosine weight decay).
4. Checkpoints (:func:`save_checkpoint`) and logs (``log.txt`` per epoch, ``log_steps.txt`` per logged optimizer
   step; formats in docs/ARCHITECTURE.md) are written by rank 0.

Effective batch = batch x accum_iter x world_size / M; lr = blr x effective batch / 256 unless ``lr`` is given.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from cadis import cadis_objective, eps_pixels
from core import noise_and_denoise
from fast import prepare_inference_
from presets import DATASETS, PRESETS, TRAIN_DEFAULTS, per_dataset
from runkit.cli import check_number
from runkit.devices import (
    DEFAULT_TF32,
    PRECISION_CHOICES,
    TF32_MODES,
    autocast,
    cuda_math,
    device_model,
    resolve_device,
    resolve_precision,
)
from runkit.distributed import DEFAULT_DIST_TIMEOUT_MINUTES, DistInfo, barrier, cleanup_distributed, init_distributed
from runkit.errors import UserError
from runkit.files import (
    atomic_torch_save,
    atomic_write_text,
    check_changeable,
    check_fingerprint,
    check_output,
    file_fingerprint,
    write_failures,
    writing,
)
from runkit.locks import locked_output_folder
from runkit.logs import complete_lines
from runkit.progress import DEFAULT_INTERVAL, Progress
from runkit.resume import (
    flags_not_at_default,
    newest_checkpoint,
    read_run_checkpoint,
    refuse_existing_run,
    resumed_config,
)
from runkit.rng import gather_rng_states, seed_everything, set_rng_state
from runkit.stops import RunStopped, StopRequest

LOG_HEADER = "epoch\tstep\tlr\twd\ttrain_loss\ttrain_sce\ttrain_madv\ttrain_acc\tmasked_in\ttest_acc\ttime"
STEP_LOG_HEADER = "step\tepoch\tlr\tloss\tsce\tmadv\tacc\tmasked_in"
RUN_FILES = ("checkpoint-*", "log.txt", "log_steps.txt", "events.out.tfevents.*")  # what a run writes in --outdir
RUN_LOGS = ("log.txt", "log_steps.txt")  # its logs (a run killed before its first checkpoint leaves only those)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the run stops without writing a checkpoint."""


def bool_flag(value: str) -> bool:
    """``true/false, yes/no, 1/0, on/off`` -> bool (the paper's ``--use_fp16 true``)."""
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on", "y", "t"):
        return True
    if v in ("0", "false", "no", "off", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# The configuration: its fields are train.py's flags
# ---------------------------------------------------------------------------------------------------------------


def config_field(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A :class:`TrainConfig` field: its default and the ``argparse`` help (and e.g. ``choices``, ``flags``).

    The flag is ``--<name>``; a bool that defaults to True is ``--no_<name>``; ``bool_value=True`` makes a bool a
    ``--<name> true|false`` flag; ``flags`` names the option strings explicitly.

    Args:
        default: the flag's default.
        help: the ``argparse`` help.
        argparse_kwargs: more ``add_argument`` keywords, and ``flags`` / ``bool_value``.
    """
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def paper_default(name: str, help: str, **argparse_kwargs: Any) -> Any:
    """A :func:`config_field` whose default is the paper's ``train.py``'s: :data:`presets.TRAIN_DEFAULTS`' ``name``
    (``train_noise_sd``: its ``noise_sd``).

    Args:
        name: the :class:`presets.TrainPreset` attribute.
        help: the ``argparse`` help.
        argparse_kwargs: as :func:`config_field`.
    """
    return config_field(getattr(TRAIN_DEFAULTS, name), help, **argparse_kwargs)


@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run; one field per ``train.py`` flag (adding a flag = adding a field).

    The defaults are the paper's ``train.py``'s (:data:`presets.TRAIN_DEFAULTS`), but ``lbd``: left out, the
    dataset's paper value (:attr:`presets.TrainPreset.lbd`). The paper's settings per dataset
    (:attr:`presets.Preset.train`) are what ``train_cifar10.sh`` / ``train_imagenet.sh`` pass.
    """

    dataset: Optional[str] = config_field(
        None, f"{', '.join(DATASETS)}; required for a new run (a --resume takes the run's)")
    arch: Optional[str] = config_field(
        None, f"classifier architecture (default by dataset: {per_dataset('arch')}; or any timm model name)")
    ft_method: str = paper_default("ft_method", "full fine-tuning or LoRA on q/v",
                                   choices=("full", "full-ft", "lora"))
    epochs: int = paper_default("epochs", "epochs")
    warmup_epochs: float = paper_default("warmup_epochs", "epochs of linear lr warmup")
    batch: int = paper_default("batch", "images per loader batch and process (split into --num_noises chunks)")
    accum_iter: int = paper_default("accum_iter", "micro-steps (chunks) accumulated per optimizer step")
    lr: Optional[float] = config_field(None, "absolute lr (default: blr x effective batch / 256)")
    blr: float = paper_default("blr", "base lr; effective batch = batch x accum_iter x world_size / M")
    min_lr: float = config_field(1e-6, "final lr of the cosine schedule")
    train_noise_sd: float = paper_default("noise_sd", "sigma of the training noise (pixel scale [0, 1])")
    test_noise_sd: Optional[float] = config_field(None, "sigma of the per-epoch test accuracy (default: train's)")
    eps: float = paper_default(
        "eps", "attack radius in the paper's units: eps/256 on the [-1, 1] scale = eps/512 on [0, 1] pixels "
               "(64 -> 0.25 on [-1, 1] = 0.125 pixels)")
    num_steps: int = paper_default("num_steps", "attack steps", flags=("--num-steps", "--num_steps"))
    lbd: Optional[float] = config_field(
        None, f"lambda, the weight of the masked adversarial loss (default: the dataset's paper value, "
              f"{per_dataset('train.lbd')})")
    eps_double: bool = config_field(False, "double eps from epoch --warmup_eps on")
    warmup_eps: int = config_field(10000, "0-based epoch from which --eps_double applies")
    layer_decay: float = paper_default("layer_decay", "layer-wise lr decay")
    weight_decay: float = paper_default("weight_decay", "initial weight decay (cosine schedule)")
    weight_decay_end: Optional[float] = paper_default("weight_decay_end", "final weight decay")
    use_fp16: bool = paper_default(
        "use_fp16", "fp16 autocast with loss scaling (the paper's --use_fp16 true); same as --precision fp16",
        bool_value=True)
    clip_grad: float = paper_default("clip_grad", "per-parameter gradient norm cap (0: off)")
    drop_path: float = paper_default("drop_path", "timm stochastic depth rate (per block, linearly increasing to this)")
    attn_drop_rate: float = paper_default(
        "attn_drop_rate", "the paper's CIFAR-10 regularizer: block i's attention-probability dropout linspace(0, R, "
                          "depth)[i] (what the paper's --drop_path did to its Hugging Face ViT; train_cifar10.sh "
                          "passes --attn_drop_rate 0.2 --drop_path 0)")
    input_norm: Optional[str] = config_field(
        None, "classifier input: paper = 2x - 1 (mean = std = 0.5), model = the model's own mean/std (default: the "
              "checkpoint's, else paper for imagenet_vit_base, model otherwise); recorded in the checkpoints",
        choices=("paper", "model"))
    num_noises: int = paper_default("num_noises", "M, noises (denoised copies) per image")
    warm_start: bool = paper_default(
        "warm_start", "count the lowest-CE copy of an image with no correct copy (--warm_start false: off)",
        bool_value=True)
    resume: Optional[str] = config_field(
        None, "continue a run from its checkpoint (weights, optimizer, schedule position, RNG, configuration: flags "
              "left out take the run's values); 'auto': the newest checkpoint in --outdir, or a fresh start when "
              "there is none; the paper's form --resume --load_from CKPT works too", metavar="CKPT", nargs="?",
        const="")
    override: Optional[str] = config_field(
        None, "with --resume: comma-separated flags whose new values may change the run's meaning, e.g. --override "
              "lr,train_noise_sd (else refused)")
    load_from: Optional[str] = config_field(
        None, "start a new run from these classifier weights (a train.py checkpoint or a state dict)", metavar="CKPT")
    local_rank: Optional[int] = config_field(
        None, "set by python -m torch.distributed.launch (the paper's launcher); ignored: the rank comes from the "
              "environment (RANK, LOCAL_RANK)", flags=("--local-rank", "--local_rank"))
    seed: int = config_field(0, "seed (see training.run_seed; process r uses seed + r)")
    workers: int = config_field(4, "data loading workers per process")
    outdir: Optional[str] = config_field(
        None, "output folder (default: runs/ft-cadis/...; with --resume: the checkpoint's)")
    device: Optional[str] = config_field(
        None, "cuda, cuda:1, cpu (default: cuda when available); under torchrun cuda:N gives local rank r cuda:N+r")
    dist_timeout: float = config_field(
        DEFAULT_DIST_TIMEOUT_MINUTES, "under torchrun: minutes the ranks wait for each other in a collective "
                                      "(torch's own default, 10 minutes for NCCL, kills a run whose ranks drift apart)")
    precision: str = config_field(
        "auto", "autocast: auto = bf16 where the device computes it natively (CUDA Ampere+, CPUs with "
                "AVX512-BF16/AMX), else fp16 on CUDA, else fp32; fp32 (exact), bf16 (no scaler), fp16",
        choices=PRECISION_CHOICES)
    tf32: str = config_field(
        DEFAULT_TF32, "fp32 work in TF32 on CUDA Ampere+: conv = the UNet's convolutions (torch's default, the "
                      "paper's), on = also matmuls, off = none (exact fp32); recorded in the checkpoints",
        choices=tuple(TF32_MODES))
    cudnn_benchmark: bool = config_field(
        False, "let cuDNN time its convolution algorithms per shape (the paper's train.py does; the last bits may "
               "then differ between processes, so a resume is not bit-exact; speed-up unmeasured)")
    denoiser_ckpt: Optional[str] = config_field(None, "diffusion checkpoint (default: models/<official file name>)")
    classifier_ckpt: Optional[str] = config_field(
        None, "off-the-shelf classifier weights (default: the architecture's pretrained weights; digits: "
              "models/digits_vit_tiny.pt)")
    data_dir: Optional[str] = config_field(None, "dataset root (else the dataset's environment variable)")
    download: bool = config_field(False, "download CIFAR-10 if missing")
    lora_rank: int = config_field(4, "LoRA rank")
    lora_alpha: float = config_field(4.0, "LoRA alpha")
    max_steps: Optional[int] = config_field(
        None, "stop after this many optimizer steps in total (smoke runs); writes checkpoint-step<N>.pth.tar")
    ckpt_every_steps: int = config_field(0, "also checkpoint every N optimizer steps (0: off)")
    log_every: int = config_field(10, "write log_steps.txt every N optimizer steps")
    test_per_class: Optional[int] = config_field(
        None, f"test images per class for the per-epoch accuracy (default: {per_dataset('test_per_class')}; 0: all)")
    no_test: bool = config_field(False, "skip the per-epoch test accuracy")
    full_attack: bool = config_field(
        False, "attack every image, not only the masked-in ones (same loss, slower; for comparison)")
    progress: bool = config_field(True, "no progress bar")
    log_interval: float = config_field(
        DEFAULT_INTERVAL, "when stderr is not a terminal (Slurm, nohup): one progress line every SECONDS instead of "
                          "a redrawn bar", metavar="SECONDS")
    tensorboard: bool = config_field(
        True, "write no TensorBoard event files (by default rank 0 writes the training curves into --outdir; tags: "
              "docs/USAGE.md)")


def add_config_arguments(parser: argparse.ArgumentParser, config_type: type = TrainConfig) -> None:
    """Add one flag per field of ``config_type`` to ``parser`` (dest = the field name, default = the field's).

    Args:
        parser: the parser of train.py (or of a script that runs the training itself).
        config_type: :class:`TrainConfig` (or a dataclass with fields made by :func:`config_field`).
    """
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        meta = dict(f.metadata)
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        bool_value = meta.pop("bool_value", False)
        flags = meta.pop("flags", None)
        kwargs: Dict[str, Any] = {"dest": f.name, **meta}
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        if kind is bool and bool_value:
            kwargs.update(type=bool_flag, nargs="?", const=True)
        elif kind is bool:
            kwargs["action"] = "store_false" if f.default else "store_true"
        elif kind is not str:
            kwargs["type"] = kind
        negated = kind is bool and not bool_value and f.default is True
        parser.add_argument(*(flags or [f"--no_{f.name}" if negated else f"--{f.name}"]), **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed flags (other attributes of ``args`` are ignored)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def _check_ranges(cfg: TrainConfig) -> None:
    """Flag values that can never work -> :class:`UserError` naming the flag."""
    M = cfg.num_noises
    if M < 1:
        raise UserError(f"--num_noises {M}: must be >= 1")
    if cfg.batch < 1 or cfg.batch % M:
        raise UserError(f"--batch {cfg.batch} is not divisible by --num_noises {M} (each batch is split into "
                        f"{M} chunks of batch/M images, each denoised under M noises); use a multiple of {M}")
    for name, value, low in (("--accum_iter", cfg.accum_iter, 1), ("--epochs", cfg.epochs, 1),
                             ("--num-steps", cfg.num_steps, 0), ("--log_every", cfg.log_every, 1),
                             ("--ckpt_every_steps", cfg.ckpt_every_steps, 0), ("--workers", cfg.workers, 0)):
        if value < low:
            raise UserError(f"{name} {value}: must be >= {low}")
    if not cfg.log_interval > 0:
        raise UserError(f"--log_interval {cfg.log_interval}: must be > 0 (seconds)")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UserError(f"--max_steps {cfg.max_steps}: must be >= 1")
    for name, value in (("--eps", cfg.eps), ("--lbd", cfg.lbd), ("--clip_grad", cfg.clip_grad), ("--blr", cfg.blr),
                        ("--warmup_epochs", cfg.warmup_epochs), ("--min_lr", cfg.min_lr), ("--drop_path", cfg.drop_path),
                        ("--weight_decay", cfg.weight_decay), ("--weight_decay_end", cfg.weight_decay_end),
                        ("--lora_alpha", cfg.lora_alpha)):
        check_number(name, value, 0)
    check_number("--dist_timeout", cfg.dist_timeout, 0, low_open=True)
    for name, value in (("--lr", cfg.lr), ("--train_noise_sd", cfg.train_noise_sd),
                        ("--test_noise_sd", cfg.test_noise_sd), ("--layer_decay", cfg.layer_decay)):
        check_number(name, value, 0, low_open=True)
    if cfg.resume and cfg.load_from:
        raise UserError("--resume continues a run (weights, optimizer, position); --load_from starts a new run from "
                        "weights: pass only one of them")


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` checked, with the defaults that depend on other flags filled in (precision, arch, test sigma, ...).

    Args:
        cfg: the flags as given.
    """
    cfg = _paper_resume_form(cfg)
    precision = cfg.precision
    if cfg.use_fp16:
        if precision not in ("auto", "fp32", "fp16"):
            raise UserError(f"--use_fp16 true contradicts --precision {precision}; pass one of them")
        precision = "fp16"
    precision = resolve_precision(precision, resolve_device(cfg.device))  # auto: bf16 where native
    _check_ranges(cfg)
    preset = PRESETS.get(cfg.dataset)
    if preset is None:
        raise UserError(f"--dataset {cfg.dataset!r}: unknown dataset; choose one of {', '.join(DATASETS)}")
    arch, lbd = cfg.arch or preset.arch, preset.train.lbd if cfg.lbd is None else cfg.lbd
    ft_method = "full" if cfg.ft_method == "full-ft" else cfg.ft_method
    outdir = cfg.outdir
    if outdir is None:
        outdir = (os.path.dirname(os.path.abspath(cfg.resume)) if cfg.resume else os.path.join(
            "runs", "ft-cadis", cfg.dataset, ft_method, f"noise_{cfg.train_noise_sd}",
            f"lbd_{lbd}_eps_{cfg.eps:g}_M{cfg.num_noises}_seed{cfg.seed}"))
    check_output(outdir, "--outdir", folder=True)
    return dataclasses.replace(
        cfg, precision=precision, ft_method=ft_method, arch=arch, lbd=lbd, outdir=outdir,
        test_noise_sd=cfg.train_noise_sd if cfg.test_noise_sd is None else cfg.test_noise_sd,
        weight_decay_end=cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end,
        test_per_class=preset.test_per_class if cfg.test_per_class is None else cfg.test_per_class)


def _paper_resume_form(cfg: TrainConfig) -> TrainConfig:
    """The paper's ``--resume --load_from CKPT`` (a bare --resume) is ``--resume CKPT``."""
    if cfg.resume != "":
        return cfg
    if not cfg.load_from:
        raise UserError("--resume needs a checkpoint: --resume CKPT (or the paper's form --resume --load_from CKPT)")
    return dataclasses.replace(cfg, resume=cfg.load_from, load_from=None)


# flags a --resume may change freely: where and how the run executes, not what it computes; left out, those of
# RESUME_KEPT keep the run's values, the others (where and until when this invocation runs) take their defaults. The
# checkpoint files (RESUME_PATHS; left out: the run's) may move, their content is checked (fingerprints). --epochs may
# grow: the cosine lr and weight-decay schedules then stretch over the new total from the current position on. Every
# other flag given must equal the run's value, or be named by --override.
RESUME_OPERATIONAL = frozenset({"resume", "override", "outdir", "device", "dist_timeout", "cudnn_benchmark",
                                "workers", "progress", "log_interval",
                                "log_every", "ckpt_every_steps", "max_steps", "data_dir", "download", "no_test",
                                "test_per_class", "load_from", "tensorboard", "local_rank"})
RESUME_PATHS = frozenset({"denoiser_ckpt", "classifier_ckpt"})
# what the run writes (its test pass, curves, step log, checkpoints) and how it loads its data
RESUME_KEPT = frozenset({"no_test", "test_per_class", "tensorboard", "log_every", "ckpt_every_steps", "workers"})


def resume_config(config: TrainConfig, given: Optional[set[str]], ckpt: Dict[str, Any]) -> TrainConfig:
    """The configuration of a resumed run: the run's own (recorded in its checkpoint), with the flags given now
    (:func:`runkit.resume.resumed_config`): flags left out take the run's values; a flag given with a value that
    changes what the run computes (sigma, lbd, M, eps, lr, schedule, seed, precision, ...: everything but
    :data:`RESUME_OPERATIONAL`) is refused unless ``--override`` names it; ``--epochs`` may grow. Of the operational
    flags, those of :data:`RESUME_KEPT` left out are the run's too; the others are this invocation's.

    Args:
        config: the flags of this invocation.
        given: names of the flags given explicitly (None: those that differ from their defaults).
        ckpt: the checkpoint of ``--resume``.
    """
    recorded = ckpt.get("config") or ckpt["args"]  # the resolved configuration, else the flags
    merged = resumed_config(config, given, recorded, resolve_config, RESUME_OPERATIONAL, RESUME_PATHS,
                            may_grow=("epochs",))
    given = flags_not_at_default(config) if given is None else given
    return dataclasses.replace(merged, **{k: recorded[k] for k in RESUME_KEPT - given if k in recorded})


def checkpoint_files(cfg: TrainConfig) -> Dict[str, tuple[str, str]]:
    """The files a run reads besides its own checkpoint, by role: (flag, path) of the denoiser (the default one too)
    and of the classifier weights it started from (those that exist; pretrained ones where their file is known,
    :func:`classifier.pretrained_weights_file`)."""
    from classifier import pretrained_weights_file
    from denoiser import default_checkpoint_path

    files = {"denoiser": ("--denoiser_ckpt", cfg.denoiser_ckpt or str(default_checkpoint_path(cfg.dataset))),
             "classifier_ckpt": ("--classifier_ckpt", cfg.classifier_ckpt), "load_from": ("--load_from", cfg.load_from)}
    if cfg.classifier_ckpt is None and cfg.load_from is None:
        pretrained = pretrained_weights_file(cfg.arch)
        files["pretrained"] = (f"--arch {cfg.arch} (pretrained weights)", pretrained and str(pretrained))
    return {role: (flag, path) for role, (flag, path) in files.items() if path and Path(path).exists()}


def check_resume_checkpoint(cfg: TrainConfig, ckpt: Optional[Dict[str, Any]]) -> None:
    """Refuse a ``--resume`` checkpoint of another dataset/arch/method or M, or whose denoiser (classifier) file now
    holds other content than the one the run used (:func:`runkit.files.file_fingerprint`).

    Args:
        cfg: the resolved configuration.
        ckpt: the ``--resume`` checkpoint (:func:`read_training_checkpoint`); None: a new run.
    """
    if ckpt is None:
        return
    for key, value in (("dataset", cfg.dataset), ("arch", cfg.arch), ("ft_method", cfg.ft_method)):
        if ckpt.get(key) not in (None, value):
            raise UserError(f"--resume {cfg.resume}: the run used --{key} {ckpt[key]}, not {value}")
    if ckpt["args"].get("num_noises") not in (None, cfg.num_noises):
        raise UserError(f"--resume {cfg.resume}: the run used --num_noises {ckpt['args']['num_noises']}, "
                        f"not {cfg.num_noises}")
    recorded = ckpt.get("fingerprints") or {}
    for role, (flag, path) in checkpoint_files(cfg).items():
        check_fingerprint(path, recorded.get(role), flag, f"the run of --resume {cfg.resume}")


# ---------------------------------------------------------------------------------------------------------------
# Seeds, schedules, clipping
# ---------------------------------------------------------------------------------------------------------------


def run_seed(seed: int, purpose: str, rank: int = 0, epoch: int = 0, step: int = 0, index: int = 0) -> int:
    """Every seed of a run, derived from ``--seed`` here and nowhere else.

    * ``"process"``: seed + rank, the global torch/numpy/python RNGs of process ``rank`` (training noise, dropout,
      drop path, new layers' initialization);
    * ``"resume"``: seed + rank + 1000 * step, the same RNGs re-seeded when a run resumes at optimizer step ``step``
      with a different number of processes (the saved RNG states do not fit);
    * ``"sampler"``: seed, the shuffle of the ``DistributedSampler`` (the same on every rank, epoch added by it);
    * ``"loader"``: seed * 100003 + epoch, the base seed of the epoch's ``DataLoader`` (its workers' seeds);
    * ``"test"``: seed, the noise of the per-epoch test accuracy and its loader (the same images and noise every
      epoch);
    * ``"augment"``: ((seed * 100003 + epoch) * 2^24 + index) mod 2^63, torch's CPU RNG while training image
      ``index`` is loaded in ``epoch`` (:class:`SeededItems`: its random crop and flip).

    Args:
        seed: the ``--seed`` flag.
        purpose: one of the names above.
        rank, epoch, step, index: where the seed is used.
    """
    seeds = {"process": seed + rank, "resume": seed + rank + 1000 * step, "sampler": seed,
             "loader": seed * 100003 + epoch, "test": seed,
             "augment": ((seed * 100003 + epoch) * 2**24 + index) % 2**63}
    if purpose not in seeds:
        raise ValueError(f"unknown seed purpose {purpose!r}; one of {', '.join(seeds)}")
    return seeds[purpose]


def lr_at(progress: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warmup to ``lr`` over ``warmup_epochs``, then half-cycle cosine to ``min_lr`` at ``epochs`` (MAE's
    ``lr_sched``): with p = progress, w = warmup_epochs, E = epochs,

        lr(p) = lr * p / w                                                            (p < w)
        lr(p) = min_lr + (lr - min_lr) * (1 + cos(pi * min(p - w, E - w) / (E - w))) / 2   (p >= w)

    Args:
        progress: in epochs, fractional (epoch + iteration / iterations per epoch).
        lr, min_lr: the peak and the final learning rate.
        warmup_epochs, epochs: the end of the warmup and of the schedule, in epochs.
    """
    if progress < warmup_epochs:
        return lr * progress / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress - warmup_epochs, span) / span))


def cosine_at(progress: float, start: float, end: float, epochs: float) -> float:
    """Cosine from ``start`` (progress 0) to ``end`` (progress ``epochs``), the weight-decay schedule (DINO):
    wd(p) = end + (start - end) * (1 + cos(pi * min(p / E, 1))) / 2 with p = progress, E = epochs.

    Args:
        progress: in epochs, fractional.
        start, end: the values at progress 0 and at ``epochs`` (and after).
        epochs: the length of the schedule, in epochs.
    """
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * min(progress / max(epochs, 1e-12), 1.0)))


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """lr x each group's ``lr_scale`` (layer decay); ``weight_decay`` for groups that decay (the others keep 0).

    Args:
        optimizer: its parameter groups are set in place.
        lr: the scheduled learning rate.
        weight_decay: the scheduled weight decay.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group.get("weight_decay", 0.0) != 0.0:
            group["weight_decay"] = weight_decay


def clip_grad_per_param(parameters: Sequence[torch.Tensor], max_norm: float) -> Optional[torch.Tensor]:
    """Scale each parameter's gradient to L2 norm <= ``max_norm`` separately (DINO's ``clip_gradients``).

    Returns the total gradient norm before clipping, sqrt(sum_p ||g_p||^2) (None without gradients). ``max_norm``
    <= 0: no clipping, only the norm.

    Args:
        parameters: the parameters whose gradients are clipped in place.
        max_norm: the largest L2 norm of each parameter's gradient.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads)
    if max_norm > 0:
        coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, coefs)
    return torch.linalg.vector_norm(torch.stack(norms))


# ---------------------------------------------------------------------------------------------------------------
# Logs, checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _append(path: Path, header: str, row: str) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with writing(path), open(path, "a") as f:
        if new:
            f.write(header + "\n")
        f.write(row + "\n")


def _truncate_log(path: Path, max_step: int, before_epoch: Optional[int] = None) -> None:
    """Drop the rows of ``path`` whose ``step`` column exceeds ``max_step`` or, given ``before_epoch``, whose
    ``epoch`` column is not below it (what a resumed run will redo)."""
    if not path.exists():
        return
    lines = complete_lines(path)  # (a killed write leaves a partial last line)
    if not lines:
        return
    names = lines[0].split("\t")
    step, epoch = names.index("step"), names.index("epoch")

    def kept(fields: list[str]) -> bool:
        return int(fields[step]) <= max_step and (before_epoch is None or int(fields[epoch]) < before_epoch)
    keep = [lines[0]] + [ln for ln in lines[1:] if ln.strip() and kept(ln.split("\t"))]
    atomic_write_text(path, "\n".join(keep) + "\n")


def read_training_checkpoint(path: str, flag: str) -> Dict[str, Any]:
    """A ``train.py`` checkpoint (``weights_only=True``), checked to be one.

    Args:
        path: the checkpoint file.
        flag: the flag that gave it (for errors).
    """
    return read_run_checkpoint(path, flag, ("state_dict", "optimizer", "epoch", "step", "micro", "rng", "args"),
                               "a train.py checkpoint",
                               "to start from other weights use --load_from or --classifier_ckpt")


# ---------------------------------------------------------------------------------------------------------------
# Data, evaluation
# ---------------------------------------------------------------------------------------------------------------


def test_subset(dataset: Any, per_class: int) -> List[int]:
    """The first ``per_class`` indices of each class (``per_class`` 0: all), in dataset order.

    Args:
        dataset: a dataset (its ``targets``, else its items' labels).
        per_class: images per class; 0: all.
    """
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = [int(dataset[i][1]) for i in range(len(dataset))]
    if per_class <= 0:
        return list(range(len(labels)))
    seen: Dict[int, int] = {}
    out = []
    for i, y in enumerate(labels):
        y = int(y)
        if seen.get(y, 0) < per_class:
            seen[y] = seen.get(y, 0) + 1
            out.append(i)
    return out


class SeededItems(Dataset):
    """``dataset`` whose item i is made with torch's CPU RNG seeded by (seed, epoch, i) (:func:`run_seed`
    ``"augment"``), the RNG's state restored afterwards: a random augmentation is a function of the image and the
    epoch alone, not of the loader's workers or of the micro-step a resumed run starts from, and loading in the main
    process (``--workers 0``) leaves the training RNG as it was.

    Args:
        dataset: the training set (its transforms draw from torch's global RNG, as torchvision's do).
        seed: the ``--seed`` flag.
        epoch: the epoch, 0-based.
    """

    def __init__(self, dataset: Any, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(run_seed(self.seed, "augment", epoch=self.epoch, index=index))
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


@torch.no_grad()
def evaluate(classifier: nn.Module, denoiser: nn.Module, loader: DataLoader, sigma: float, t_star: int,
             device: torch.device, precision: str, seed: int,
             should_stop: Callable[[], bool] = lambda: False) -> Optional[tuple[int, int]]:
    """(correct, total) of argmax f(D(x + delta)) on this rank's share (summed over ranks when distributed).

    The training RNG is not touched (the noise has its own generator, the loader must have one: a ``DataLoader``
    without draws its seed from torch's global RNG), so a run with this evaluation trains exactly as one without.

    Args:
        classifier, denoiser: f and D.
        loader: this rank's test images (with a ``generator``).
        sigma, t_star: the noise level and its diffusion step.
        device, precision: where and in which autocast precision.
        seed: seeds the generator of delta.
        should_stop: asked before each batch (a collective when distributed); True: None is returned at once.
    """
    if loader.generator is None:
        raise ValueError("evaluate: the test loader needs its own generator (else it draws from the training RNG)")
    was_training = classifier.training
    classifier.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for x, y in loader:
            if should_stop():
                return None
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, precision):
                pred = classifier(noise_and_denoise(denoiser, x, t_star, sigma, generator=gen)).argmax(-1)
            correct += (pred == y).sum()
            total += y.numel()
    finally:
        classifier.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(correct)
        dist.all_reduce(total)
    return int(correct), int(total)


# ---------------------------------------------------------------------------------------------------------------
# Building the run
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything one process of a run holds: the resolved config, models, optimizer, data and position."""

    cfg: TrainConfig
    args: Dict[str, Any]  # the flags as given (saved in checkpoints)
    info: DistInfo
    out: Path
    classifier: nn.Module
    model: nn.Module  # the classifier, or its DistributedDataParallel wrapper
    denoiser: nn.Module
    t_train: int
    t_test: int
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    params: List[torch.Tensor]
    train_set: Any
    sampler: DistributedSampler
    iters: int  # loader batches per epoch and process
    test_loader: Optional[DataLoader]
    lr: float  # the peak lr
    eff_batch: int
    eps: float  # the attack radius on [0, 1] pixels (before --eps_double)
    start_epoch: int = 0
    start_micro: int = 0
    step: int = 0  # optimizer steps done
    last_ckpt: Optional[Path] = None
    writer: Any = None  # rank 0's TensorBoard SummaryWriter (open_tensorboard), or None
    clock: float = 0.0  # time.perf_counter() at the last read of the metrics (images/s)
    start_metrics: Optional[Metrics] = None  # a mid-epoch checkpoint's sums of its epoch so far
    fingerprints: Dict[str, str] = field(default_factory=dict)  # of checkpoint_files(cfg), saved in checkpoints
    pending: List[StepRecord] = field(default_factory=list)  # optimizer steps whose metrics were not read yet
    stop: StopRequest = field(default_factory=lambda: StopRequest(
        "stopping after this optimizer step, with a checkpoint"))  # SIGTERM / SIGINT while the epochs run

    @property
    def dev(self) -> torch.device:
        return self.info.device

    @property
    def world(self) -> int:
        return self.info.world_size


def _build_classifier(cfg: TrainConfig, checkpoint: Optional[str], flag: str, device: torch.device,
                      pretrained: bool = True, input_norm: Optional[str] = None) -> nn.Module:
    """``get_architecture`` for ``cfg`` with weights from ``checkpoint`` (else the pretrained ones when
    ``pretrained``), input convention ``input_norm`` (else ``--input_norm``), its errors naming ``flag``."""
    from classifier import get_architecture
    from datasets import get_num_classes
    if checkpoint is not None and not Path(checkpoint).expanduser().exists():
        raise UserError(f"{flag} {checkpoint}: file not found")
    return get_architecture(cfg.arch, num_classes=get_num_classes(cfg.dataset),
                            pretrained=pretrained and checkpoint is None, checkpoint=checkpoint,
                            ft_method=cfg.ft_method, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                            drop_path=cfg.drop_path, device=device, input_norm=input_norm or cfg.input_norm,
                            attn_drop_rate=cfg.attn_drop_rate, checkpoint_flag=flag)


def build_classifier(cfg: TrainConfig, ckpt: Optional[Dict[str, Any]], device: torch.device) -> nn.Module:
    """The classifier to fine-tune: a resumed run's weights (and input convention), ``--load_from``'s, or the
    off-the-shelf ones.

    Args:
        cfg: the resolved configuration.
        ckpt: the ``--resume`` checkpoint, or None.
        device: where the model goes.
    """
    from classifier import (
        has_lora_keys,
        input_norm_record,
        load_timm_state_dict,
        resolve_input_norm,
        to_timm_state_dict,
    )

    if ckpt is not None:
        norm = resolve_input_norm(cfg.arch, cfg.input_norm, input_norm_record(ckpt), cfg.resume)
        classifier = _build_classifier(cfg, cfg.classifier_ckpt if cfg.arch == "hf_vit" else None,
                                       "--classifier_ckpt", device, pretrained=False, input_norm=norm)
        if cfg.ft_method == "lora" and not has_lora_keys(ckpt["state_dict"]):
            raise UserError(f"--resume {cfg.resume}: no LoRA weights in the checkpoint, but --ft_method lora")
        load_timm_state_dict(classifier, to_timm_state_dict(ckpt["state_dict"], cfg.lora_alpha),
                             source=f"--resume {cfg.resume}")
        return classifier
    if cfg.load_from is not None:
        return _build_classifier(cfg, cfg.load_from, "--load_from", device)
    return _build_classifier(cfg, cfg.classifier_ckpt, "--classifier_ckpt", device)


def _load_optimizer(optimizer: torch.optim.Optimizer, state: Dict[str, Any], path: str) -> None:
    """Load an optimizer state, keeping this machine's ``fused``/``foreach`` choice."""
    mine = optimizer.param_groups
    if len(state.get("param_groups", [])) != len(mine):
        raise UserError(f"--resume {path}: optimizer has {len(state.get('param_groups', []))} parameter groups, this "
                        f"model {len(mine)} (different --arch/--ft_method/--layer_decay setup?)")
    for saved, cur in zip(state["param_groups"], mine):
        for key in ("fused", "foreach", "capturable"):
            if key in cur:
                saved[key] = cur[key]
    optimizer.load_state_dict(state)


def _build_data(cfg: TrainConfig, info: DistInfo) -> Dict[str, Any]:
    """The training set, its sampler and iterations per epoch, and this rank's per-epoch test loader."""
    from datasets import get_dataset

    train_set = get_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, download=cfg.download)
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=run_seed(cfg.seed, "sampler"))
    iters = len(sampler) // cfg.batch
    if iters < 1:
        raise UserError(f"--batch {cfg.batch}: larger than this process's share of the training set "
                        f"({len(sampler)} images)")
    test_loader = None
    if not cfg.no_test:
        test_set = get_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, download=cfg.download)
        test_idx = test_subset(test_set, cfg.test_per_class)[info.rank::info.world_size]
        test_loader = DataLoader(Subset(test_set, test_idx), batch_size=cfg.batch, shuffle=False,
                                 num_workers=cfg.workers, pin_memory=info.device.type == "cuda",
                                 generator=torch.Generator().manual_seed(run_seed(cfg.seed, "test")))
    return {"train_set": train_set, "sampler": sampler, "iters": iters, "test_loader": test_loader}


def build_run(cfg: TrainConfig, args: Dict[str, Any], ckpt: Optional[Dict[str, Any]], info: DistInfo) -> Run:
    """Seeds, models, optimizer and data of one process (``cfg`` resolved, ``args`` the flags as given).

    Args:
        cfg: the resolved configuration.
        args: the flags as given (recorded in checkpoints).
        ckpt: the ``--resume`` checkpoint, or None.
        info: this process's rank, world size and device.
    """
    from classifier import param_groups_lrd
    from denoiser import load_denoiser

    out, dev, world = Path(cfg.outdir), info.device, info.world_size
    if not cfg.resume:
        refuse_existing_run(out, RUN_LOGS)
    seed_everything(run_seed(cfg.seed, "process", rank=info.rank))
    eff_batch = cfg.batch * cfg.accum_iter * world // cfg.num_noises
    lr = cfg.blr * eff_batch / 256 if cfg.lr is None else cfg.lr

    classifier = build_classifier(cfg, ckpt, dev)
    denoiser = load_denoiser(cfg.dataset, cfg.denoiser_ckpt, device=dev)
    prepare_inference_(denoiser, cfg.precision)  # frozen, only run under autocast(precision): weights in that dtype
    groups = param_groups_lrd(classifier, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=True)  # CUDA and CPU (why: docs/PERFORMANCE.md)
    model: nn.Module = classifier
    if world > 1:
        model = DistributedDataParallel(classifier, device_ids=[dev.index] if dev.type == "cuda" else None)
    run = Run(cfg=cfg, args=args, info=info, out=out, classifier=classifier, model=model, denoiser=denoiser,
              t_train=denoiser.timestep_for_sigma(cfg.train_noise_sd),
              t_test=denoiser.timestep_for_sigma(cfg.test_noise_sd), optimizer=optimizer,
              scaler=torch.amp.GradScaler(dev.type, enabled=cfg.precision == "fp16"),
              params=[p for g in groups for p in g["params"]], **_build_data(cfg, info), lr=lr,
              eff_batch=eff_batch, eps=eps_pixels(cfg.eps),
              fingerprints={role: file_fingerprint(path, flag) for role, (flag, path) in checkpoint_files(cfg).items()})
    if ckpt is not None:
        restore_position(run, ckpt)
    return run


def restore_position(run: Run, ckpt: Dict[str, Any]) -> None:
    """Optimizer, scaler, epoch/step/micro-step and RNG states of a resumed run (its logs are cut by :func:`cut_logs`
    once it has work to do).

    Args:
        run: the run being built, changed in place.
        ckpt: the ``--resume`` checkpoint.
    """
    cfg = run.cfg
    _load_optimizer(run.optimizer, ckpt["optimizer"], cfg.resume)
    if ckpt.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(ckpt["scaler"])
    run.start_epoch, run.step, run.start_micro = int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt["micro"])
    run.last_ckpt = Path(cfg.resume)
    saved = ckpt["args"]
    same_layout = len(ckpt["rng"]) == run.world and saved.get("batch") == cfg.batch and saved.get("seed") == cfg.seed
    if run.start_micro and not same_layout:
        raise UserError(f"--resume {cfg.resume}: a mid-epoch checkpoint continues only with the same number of "
                        f"processes ({len(ckpt['rng'])}), --batch ({saved.get('batch')}) and --seed "
                        f"({saved.get('seed')})")
    if len(ckpt["rng"]) == run.world:
        set_rng_state(ckpt["rng"][run.info.rank], run.dev)
    else:
        seed_everything(run_seed(cfg.seed, "resume", rank=run.info.rank, step=run.step))
    if run.start_micro and ckpt.get("epoch_metrics"):  # the epoch's row will average all its micro-steps
        run.start_metrics = Metrics(**ckpt["epoch_metrics"])


def cut_logs(run: Run) -> None:
    """Rank 0 of a resumed run that has work to do: drop the log rows after its checkpoint (what it will redo).

    Args:
        run: the resumed run (:func:`restore_position` done).
    """
    if run.info.is_main:
        _truncate_log(run.out / "log_steps.txt", run.step)
        # a mid-epoch resume redoes its epoch's row (a --max_steps stop wrote a partial one)
        _truncate_log(run.out / "log.txt", run.step, before_epoch=run.start_epoch + 1 if run.start_micro else None)


def announce(run: Run) -> None:
    """Rank 0 creates the output folder and prints what the run is."""
    from classifier import count_parameters

    cfg = run.cfg
    if not run.info.is_main:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    print(f"FT-CADIS {cfg.dataset}/{cfg.arch} ({cfg.ft_method}): "
          f"{count_parameters(run.classifier, trainable_only=True):,} trainable of "
          f"{count_parameters(run.classifier):,} parameters; {run.world} process(es) on {run.dev.type}, "
          f"{cfg.precision}")
    print(f"  sigma {cfg.train_noise_sd} (t*={run.t_train}), test sigma {cfg.test_noise_sd} (t*={run.t_test}); "
          f"M={cfg.num_noises}, lbd={cfg.lbd}, eps={cfg.eps:g}/256 on [-1,1] = {run.eps:.4g} pixels, "
          f"{cfg.num_steps} attack steps")
    print(f"  lr {run.lr:.3g} (effective batch {run.eff_batch}), {run.iters} iterations/epoch, from epoch "
          f"{run.start_epoch + 1} step {run.step}" + (f", stopping at step {cfg.max_steps}" if cfg.max_steps else ""))


# ---------------------------------------------------------------------------------------------------------------
# One optimizer step, one epoch
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Metrics:
    """Training metrics summed over micro-steps (each averaged over processes), and the number summed."""

    loss: float = 0.0  # the FT-CADIS loss, mean_i (L_SCE,i + L_MAdv,i)
    sce: float = 0.0  # mean_i L_SCE,i
    madv: float = 0.0  # mean_i L_MAdv,i
    acc: float = 0.0  # share of non-hallucinated denoised images
    masked_in: float = 0.0  # share of images whose M copies are all non-hallucinated
    count: int = 0  # micro-steps summed

    def mean(self) -> Metrics:
        """The mean per micro-step (count 1)."""
        n = max(self.count, 1)
        return Metrics(self.loss / n, self.sce / n, self.madv / n, self.acc / n, self.masked_in / n, 1)


METRIC_NAMES = ("loss", "sce", "madv", "acc", "masked_in")  # the order of micro_step's values


def _mean_over_processes(values: torch.Tensor, world: int) -> torch.Tensor:
    """``values`` (this process's) averaged over the processes, in place (a collective when distributed)."""
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return values


class MetricSums:
    """Sums of :func:`micro_step`'s values, kept on the device: adding one is no host sync, :meth:`read` is one.

    Args:
        device: where the sums are kept.
        start: the sums to start from (a mid-epoch checkpoint's), or None.
    """

    def __init__(self, device: torch.device, start: Optional[Metrics] = None) -> None:
        self.sums = torch.zeros(len(METRIC_NAMES), dtype=torch.float64, device=device)
        self.count = 0
        if start is not None:
            self.sums += torch.tensor([getattr(start, n) for n in METRIC_NAMES], dtype=torch.float64).to(device)
            self.count = start.count

    def add(self, values: torch.Tensor) -> None:
        """Add one micro-step's values."""
        self.sums += values
        self.count += 1

    def read(self, world: int) -> Metrics:
        """The sums as :class:`Metrics`, each averaged over the processes (a collective when distributed)."""
        return Metrics(*_mean_over_processes(self.sums.clone(), world).tolist(), count=self.count)


@dataclass
class StepRecord:
    """An optimizer step whose metrics are still on the device (until :func:`read_steps`)."""

    step: int
    epoch: int  # 0-based
    lr: float
    wd: float
    window: MetricSums  # of its micro-steps
    grad_norm: Optional[torch.Tensor]  # before clipping, when TensorBoard records it


def micro_step(run: Run, clean: torch.Tensor, targets: torch.Tensor, eps: float, sync: bool) -> torch.Tensor:
    """One micro-step: noise and denoise, the FT-CADIS objective, backward of loss / accum_iter (no DDP gradient
    all-reduce unless ``sync``). Returns its metrics (:data:`METRIC_NAMES`), this process's, as a float64 tensor on
    the device: nothing here waits for the device (the loss is checked to be finite where the metrics are read,
    :func:`read_steps`).

    Args:
        run: the run.
        clean: ``[M*B', ...]`` clean images, noise-major; targets: their ``[B']`` labels.
        eps: the attack radius on [0, 1] pixels for this epoch.
        sync: the last micro-step before an optimizer step.
    """
    cfg, M = run.cfg, run.cfg.num_noises
    with (run.model.no_sync() if run.world > 1 and not sync else contextlib.nullcontext()):
        with autocast(run.dev, cfg.precision):
            denoised = noise_and_denoise(run.denoiser, clean, run.t_train, cfg.train_noise_sd)
            loss, loss_sce, loss_madv, correct = cadis_objective(
                run.classifier, clean, denoised, targets, M, cfg.lbd, eps, cfg.num_steps,
                warm_start=cfg.warm_start, masked_only=not cfg.full_attack, forward_model=run.model)
        run.scaler.scale(loss / cfg.accum_iter).backward()
    return torch.stack([loss.detach().double(), loss_sce.detach().double().mean(), loss_madv.detach().double().mean(),
                        correct.double().mean(), correct.all(0).double().mean()])


def scheduled(run: Run, progress: float) -> tuple[float, float]:
    """The scheduled (lr, weight decay) at ``progress`` (epochs, fractional: :func:`lr_at`, :func:`cosine_at`).

    Args:
        run: the run (its peak lr and the schedule's flags).
        progress: in epochs, fractional.
    """
    cfg = run.cfg
    return (lr_at(progress, run.lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs),
            cosine_at(progress, cfg.weight_decay, cfg.weight_decay_end, cfg.epochs))


def start_accumulation(run: Run, progress: float) -> tuple[float, float]:
    """Set the scheduled lr and weight decay at ``progress`` (epochs) and zero the gradients; returns (lr, wd).

    Args:
        run: the run.
        progress: in epochs, fractional.
    """
    lr, wd = scheduled(run, progress)
    set_lr_wd(run.optimizer, lr, wd)
    run.optimizer.zero_grad(set_to_none=True)
    return lr, wd


def optimizer_step(run: Run) -> Optional[torch.Tensor]:
    """Per-parameter gradient clipping (after unscaling) and one AdamW step (skipped by the scaler on inf/NaN; the
    fused AdamW takes the scaler's inf check on the device, so no step waits for it).

    Returns the gradient norm before clipping, on the device, when TensorBoard records it (else None).
    """
    norm = None
    if run.cfg.clip_grad > 0 or run.writer is not None:
        run.scaler.unscale_(run.optimizer)  # GradScaler.step would unscale the same way
        norm = clip_grad_per_param(run.params, run.cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.step += 1
    return norm if run.writer is not None else None


def _progress(run: Run, k: int) -> float:
    """Micro-step k = i*M + j of an epoch (chunk j of batch i) as a fraction of the epoch."""
    i, j = divmod(k, run.cfg.num_noises)
    return (i + j / run.cfg.num_noises) / run.iters


def _micro_batches(run: Run, loader: Iterator, first_batch: int, skip_micro: int) -> Iterator[tuple]:
    """``(k, progress in the epoch, clean, targets)`` per micro-step k = i*M + j >= ``skip_micro``: chunk j of
    batch i, its B' images repeated M times (noise-major)."""
    M = run.cfg.num_noises
    n = run.cfg.batch // M
    for i, (x, y) in enumerate(loader, start=first_batch):
        x, y = x.to(run.dev, non_blocking=True), y.to(run.dev, non_blocking=True)
        for j in range(M):
            k = i * M + j
            if k >= skip_micro:
                yield k, _progress(run, k), x[j * n:(j + 1) * n].repeat(M, 1, 1, 1), y[j * n:(j + 1) * n]


@dataclass
class EpochResult:
    """What one call of :func:`run_epoch` did."""

    metrics: MetricSums  # over the epoch's micro-steps (a resumed epoch: from its checkpoint's sums)
    lr: float  # the last scheduled lr and weight decay
    wd: float
    micro: int  # micro-steps of the epoch done
    stopped: Optional[str] = None  # "max_steps" (reached) or "signal" (a stop request, StopRequest)


def _resumed_epoch(run: Run, epoch: int, skip_micro: int) -> EpochResult:
    """The :class:`EpochResult` an epoch starts from: a resumed epoch's sums so far and its last scheduled lr/wd."""
    if not skip_micro:
        return EpochResult(MetricSums(run.dev), 0.0, 0.0, 0)
    last_start = (skip_micro - 1) // run.cfg.accum_iter * run.cfg.accum_iter  # of the last accumulation done
    return EpochResult(MetricSums(run.dev, run.start_metrics), *scheduled(run, epoch + _progress(run, last_start)),
                       skip_micro)


def run_epoch(run: Run, epoch: int) -> EpochResult:
    """Train one epoch (from a resumed run's micro-step), with step logs and ``--ckpt_every_steps`` checkpoints; a
    stop (``--max_steps``, a stop request) ends it after an optimizer step.

    The metrics stay on the device; they are read (:func:`read_steps`) every ``--log_every`` steps, before each
    checkpoint, at a stop and at the epoch's end.

    Args:
        run: the run.
        epoch: the epoch, 0-based.
    """
    cfg, M = run.cfg, run.cfg.num_noises
    skip_micro = run.start_micro if epoch == run.start_epoch else 0
    first_batch = skip_micro // M
    run.sampler.set_epoch(epoch)
    indices = list(run.sampler)[first_batch * cfg.batch: run.iters * cfg.batch]
    loader = DataLoader(Subset(SeededItems(run.train_set, cfg.seed, epoch), indices), batch_size=cfg.batch,
                        shuffle=False, drop_last=True, num_workers=cfg.workers, pin_memory=run.dev.type == "cuda",
                        generator=torch.Generator().manual_seed(run_seed(cfg.seed, "loader", epoch=epoch)))
    eps = run.eps * (2.0 if cfg.eps_double and epoch >= cfg.warmup_eps else 1.0)
    run.model.train()
    result, window = _resumed_epoch(run, epoch, skip_micro), MetricSums(run.dev)
    bar = Progress(loader, total=run.iters, initial=first_batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", enabled=cfg.progress and run.info.is_main, interval=cfg.log_interval)
    run.clock = time.perf_counter()
    for k, progress, clean, targets in _micro_batches(run, bar, first_batch, skip_micro):
        if k % cfg.accum_iter == 0:
            result.lr, result.wd = start_accumulation(run, epoch + progress)
            window = MetricSums(run.dev)
        sync = (k + 1) % cfg.accum_iter == 0
        values = micro_step(run, clean, targets, eps, sync)
        window.add(values)
        result.metrics.add(values)
        result.micro = k + 1
        if not sync:
            continue
        grad_norm = optimizer_step(run)
        run.pending.append(StepRecord(run.step, epoch, result.lr, result.wd, window, grad_norm))
        reached = cfg.max_steps is not None and run.step >= cfg.max_steps
        result.stopped = "max_steps" if reached else "signal" if run.stop.requested() else None
        due = bool(cfg.ckpt_every_steps) and run.step % cfg.ckpt_every_steps == 0 and result.micro < run.iters * M
        if result.stopped or due or run.step % cfg.log_every == 0:
            read_steps(run, bar)
        if result.stopped:
            break
        if due:
            run.last_ckpt = save_checkpoint(run, f"checkpoint-step{run.step}.pth.tar", epoch, result.micro,
                                            result.metrics.read(run.world))
            run.clock = time.perf_counter()
    read_steps(run, bar)
    bar.close()
    return result


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and logs
# ---------------------------------------------------------------------------------------------------------------


def save_checkpoint(run: Run, name: str, epoch_done: int, micro: int, metrics: Optional[Metrics] = None) -> Path:
    """Write ``outdir/name`` (rank 0; every rank's RNG state is gathered first). Format: docs/ARCHITECTURE.md; besides
    the flags as given (``args``) it records the resolved configuration (``config``, authoritative on --resume), the
    :func:`checkpoint_files`' fingerprints and, mid-epoch, the epoch's metric sums so far (``epoch_metrics``).

    Args:
        run: the run.
        name: the file name in the output folder.
        epoch_done: the epochs completed.
        micro: the micro-steps done in the current epoch.
        metrics: mid-epoch, the epoch's metric sums so far.
    """
    rngs = gather_rng_states(run.dev)
    path = run.out / name
    if run.info.is_main:
        cfg = run.cfg
        atomic_torch_save({
            "epoch": epoch_done, "step": run.step, "micro": micro, "arch": cfg.arch, "dataset": cfg.dataset,
            "ft_method": cfg.ft_method, "input_norm": run.classifier.input_norm,
            "state_dict": run.classifier.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None, "rng": rngs,
            "args": {k: v for k, v in run.args.items() if v is None or isinstance(v, (str, int, float, bool))},
            "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                       if v is None or isinstance(v, (str, int, float, bool))},
            "fingerprints": run.fingerprints, "world_size": run.world, "device_model": device_model(run.dev),
            "epoch_metrics": dataclasses.asdict(metrics) if metrics is not None and micro else None,
        }, path)
    return path


def read_steps(run: Run, bar: Any) -> None:
    """Read the metrics of the optimizer steps not read yet (one host sync; a collective when distributed): their
    ``log_steps.txt`` rows (steps that are multiples of ``--log_every``, and ``--max_steps``) and TensorBoard
    scalars.

    The non-finite loss check is here, not in the step, so that no step waits for the device: a bad step is found at
    the next read, the steps after it having run on; every checkpoint is written after a read, so none holds them.

    Args:
        run: the run (its ``pending`` steps, emptied).
        bar: the progress bar.
    Raises:
        NonFiniteLossError: at the first of the steps whose loss is NaN/inf.
    """
    pending, run.pending = run.pending, []
    if not pending:
        return
    means = _mean_over_processes(torch.stack([p.window.sums / max(p.window.count, 1) for p in pending]), run.world)
    nan = means.new_full((), math.nan)
    norms = torch.stack([nan if p.grad_norm is None else p.grad_norm.double() for p in pending])
    rows = torch.cat([means, norms[:, None]], 1).tolist()  # the one host sync
    images_per_s = run.eff_batch * len(pending) / max(time.perf_counter() - run.clock, 1e-9)
    for p, row in zip(pending, rows):
        m = Metrics(*row[:len(METRIC_NAMES)], count=1)
        if not math.isfinite(m.loss):
            raise NonFiniteLossError(
                f"non-finite loss ({m.loss}) at epoch {p.epoch + 1}, step {p.step}; stopping (found at step "
                f"{pending[-1].step}: the loss is checked every --log_every steps and before each checkpoint). "
                f"Nothing was saved after it; the last good checkpoint is "
                f"{run.last_ckpt if run.last_ckpt else '(none yet)'}. Try a lower --blr/--lr, --clip_grad, or "
                "--precision fp32/bf16.")
        if run.info.is_main and (p.step % run.cfg.log_every == 0 or p.step == run.cfg.max_steps):
            log_step(run, p, m, bar)
        tensorboard(run, functools.partial(write_step_scalars, run, p, m, row[-1],
                                           images_per_s if p is pending[-1] else None))
    run.clock = time.perf_counter()


def log_step(run: Run, record: StepRecord, m: Metrics, bar: Any) -> None:
    """One ``log_steps.txt`` row (and the progress bar's figures) for an optimizer step.

    Args:
        run: the run.
        record: the step.
        m: its metrics.
        bar: the progress bar.
    """
    _append(run.out / "log_steps.txt", STEP_LOG_HEADER,
            f"{record.step}\t{record.epoch + 1}\t{record.lr:.6g}\t{m.loss:.8g}\t{m.sce:.8g}\t{m.madv:.8g}"
            f"\t{m.acc:.6f}\t{m.masked_in:.6f}")
    bar.set_postfix(loss=f"{m.loss:.4f}", acc=f"{m.acc:.3f}", masked=f"{m.masked_in:.2f}", lr=f"{record.lr:.2e}")


# TensorBoard scalars (rank 0, global step = optimizer steps done): per optimizer step the means over its
# micro-steps (and processes), per epoch the denoised test accuracy.
TB_STEP_TAGS = ("train/loss", "train/sce", "train/madv", "train/acc", "train/masked_in", "train/lr",
                "train/weight_decay", "train/grad_norm", "train/images_per_s")


def open_tensorboard(run: Run) -> None:
    """Rank 0 (unless ``--no_tensorboard``): a ``SummaryWriter`` on the outdir. A resumed run purges the events
    its previous run wrote after the resumed step (TensorBoard hides them), so no step is shown twice. The curves are
    not worth the run: a failure to write them (a full disk) warns once and training goes on (:func:`tensorboard`)."""
    if not (run.cfg.tensorboard and run.info.is_main):
        return
    from torch.utils.tensorboard import SummaryWriter

    threading.excepthook = _quiet_event_writer_thread(threading.excepthook)
    try:
        run.writer = SummaryWriter(log_dir=str(run.out), purge_step=run.step + 1 if run.cfg.resume else None)
    except Exception as err:  # noqa: BLE001 - whatever it raises, the run goes on without TensorBoard
        _tensorboard_failed(run, err)


def tensorboard(run: Run, call: Callable[[], Any]) -> None:
    """``call()``, a write of ``run.writer``, while TensorBoard writes; when it fails, one warning, and the run goes
    on without TensorBoard (its text logs hold the same curves).

    Args:
        run: the run.
        call: what to do with ``run.writer``.
    """
    if run.writer is None:
        return
    try:
        call()
    except Exception as err:  # noqa: BLE001 - whatever the event writer raises (its thread's OSError), the run goes on
        _tensorboard_failed(run, err)


def _tensorboard_failed(run: Run, err: Exception) -> None:
    writer, run.writer = run.writer, None
    print(f"warning: TensorBoard: cannot write its event file in {run.out} ({err}); training goes on without "
          "TensorBoard curves (log_steps.txt and log.txt hold them)", file=sys.stderr)
    with contextlib.suppress(Exception):
        if writer is not None:
            writer.close()


def close_tensorboard(run: Run) -> None:
    """Close the run's ``SummaryWriter`` (:func:`tensorboard`: a failure warns) and its thread's error handling."""
    if run.writer is not None:
        tensorboard(run, run.writer.close)
    run.writer = None
    threading.excepthook = getattr(threading.excepthook, "previous", threading.excepthook)


def _quiet_event_writer_thread(previous: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``threading.excepthook`` less the error of TensorBoard's event-writer thread, which TensorBoard raises again in
    the training thread at the next scalar (where :func:`tensorboard` warns): no traceback from the thread."""
    def hook(args: Any) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)
    hook.previous = previous  # type: ignore[attr-defined]
    return hook


def write_step_scalars(run: Run, record: StepRecord, m: Metrics, grad_norm: float,
                       images_per_s: Optional[float]) -> None:
    """The scalars of :data:`TB_STEP_TAGS` for an optimizer step (images/s, at the steps where the metrics are read:
    clean images of the effective batch per second of wall time since the previous read, checkpoint writing
    excluded).

    Args:
        run: the run (its ``writer``).
        record: the step.
        m: its metrics.
        grad_norm: the gradient norm before clipping (NaN: not measured).
        images_per_s: the throughput, or None.
    """
    values = (m.loss, m.sce, m.madv, m.acc, m.masked_in, record.lr, record.wd,
              grad_norm if math.isfinite(grad_norm) else None, images_per_s)
    for tag, value in zip(TB_STEP_TAGS, values):
        if value is not None:
            run.writer.add_scalar(tag, value, record.step)


def stop_on_request(run: Run, epoch: int, micro: int, sums: Metrics) -> None:
    """Honour a stop request (SIGTERM, SIGINT): write ``checkpoint-step<N>.pth.tar`` at this position, which a resumed
    run continues from (an epoch whose training is done but whose evaluation and row are not: ``micro`` = all of its
    micro-steps), and raise :class:`runkit.stops.RunStopped`.

    Args:
        run: the run.
        epoch: the epoch, 0-based.
        micro: its micro-steps done.
        sums: its metric sums so far.
    """
    run.last_ckpt = save_checkpoint(run, f"checkpoint-step{run.step}.pth.tar", epoch, micro, sums)
    if run.info.is_main:
        print(f"stopped at step {run.step}: {run.last_ckpt}; continue with --resume {run.last_ckpt} (or --resume "
              "auto)")
    raise RunStopped(run.stop.signum or signal.SIGTERM, str(run.last_ckpt))


def finish_epoch(run: Run, epoch: int, result: EpochResult, epoch_start: float) -> Dict[str, Any]:
    """The epoch's test accuracy, its ``log.txt`` row and summary line, and the epoch checkpoint policy; on a stop
    request (before or during the evaluation) :func:`stop_on_request` instead.

    Args:
        run: the run.
        epoch: the epoch, 0-based.
        result: what :func:`run_epoch` returned.
        epoch_start: ``time.time()`` when the epoch started.
    """
    cfg = run.cfg
    complete = result.micro >= run.iters * cfg.num_noises
    sums = result.metrics.read(run.world)
    if not math.isfinite(sums.loss):
        raise NonFiniteLossError(f"non-finite loss in epoch {epoch + 1}; stopping. Nothing was saved for this state; "
                                 f"the last good checkpoint is {run.last_ckpt if run.last_ckpt else '(none yet)'}.")
    if result.stopped == "signal":
        stop_on_request(run, epoch, result.micro, sums)
    avg, test_acc = sums.mean(), float("nan")
    if run.test_loader is not None:
        counts = evaluate(run.classifier, run.denoiser, run.test_loader, cfg.test_noise_sd, run.t_test, run.dev,
                          cfg.precision, run_seed(cfg.seed, "test"), should_stop=run.stop.requested)
        if counts is None:
            stop_on_request(run, epoch, result.micro, sums)
        test_acc = counts[0] / max(counts[1], 1)
        tensorboard(run, lambda: run.writer.add_scalar("test/acc", test_acc, run.step))
    stats = {"epoch": epoch + 1, "step": run.step, "lr": result.lr, "train_loss": avg.loss, "train_sce": avg.sce,
             "train_madv": avg.madv, "train_acc": avg.acc, "masked_in": avg.masked_in, "test_acc": test_acc,
             "time": time.time() - epoch_start}
    if run.info.is_main:
        _append(run.out / "log.txt", LOG_HEADER,
                f"{epoch + 1}\t{run.step}\t{result.lr:.6g}\t{result.wd:.6g}\t{avg.loss:.6g}\t{avg.sce:.6g}"
                f"\t{avg.madv:.6g}\t{avg.acc:.4f}\t{avg.masked_in:.4f}\t{test_acc:.4f}\t{stats['time']:.1f}")
        print(f"epoch {epoch + 1}{'' if complete else ' (partial)'}: step {run.step}, loss {avg.loss:.4f} "
              f"(sce {avg.sce:.4f}, madv {avg.madv:.4f}), train acc {avg.acc:.3f}, masked-in {avg.masked_in:.2f}, "
              f"test acc {test_acc:.3f}, {stats['time']:.0f}s")
    if complete and (epoch == 0 or (epoch + 1) % 5 == 0 or epoch + 1 == cfg.epochs):
        run.last_ckpt = save_checkpoint(run, f"checkpoint-{epoch + 1}.pth.tar", epoch + 1, 0)
    if result.stopped:
        run.last_ckpt = save_checkpoint(run, f"checkpoint-step{run.step}.pth.tar", epoch + 1 if complete else epoch,
                                        0 if complete else result.micro, sums)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


NO_DATASET = "--dataset: required for a new run (--resume CKPT or --resume auto takes the run's)"
RESUME_ADVICE = "rerun the same command with --resume auto (it continues from the newest checkpoint)"


def train(config: TrainConfig, given: Optional[set[str]] = None) -> Dict[str, Any]:
    """Run FT-CADIS fine-tuning. Returns the last epoch's stats, ``checkpoint`` (the last one written) and
    ``classifier``.

    Every flag and the output folder are checked first; then the job locks ``<outdir>/.lock`` (a second run on the
    folder stops at once) and, with ``--resume``, takes the run's configuration from its checkpoint
    (:func:`resume_config`).

    Args:
        config: the flags (:class:`TrainConfig`); checked and completed by :func:`resolve_config`.
        given: names of the flags given explicitly (train.py's command line); None: those not at their default.
    """
    config = _paper_resume_form(config)
    if config.resume == "auto" and not config.outdir:
        raise UserError("--resume auto: needs --outdir (the folder whose newest checkpoint it continues)")
    if config.override and not config.resume:
        raise UserError(f"--override {config.override}: only with --resume (a new run takes any flag)")
    if config.dataset is None and not config.resume:
        raise UserError(NO_DATASET)
    # every flag and the output folder checked before anything runs (a --resume without --dataset: with any dataset's
    # defaults until its checkpoint is read; no check depends on them)
    out = Path(resolve_config(config if config.dataset else dataclasses.replace(config, dataset=DATASETS[0])).outdir)
    for name in RUN_LOGS:  # (appended to, cut back on resume)
        check_changeable(out / name, f"--outdir {out}: ")
    info = init_distributed(config.device, config.dist_timeout)
    try:
        with write_failures(RESUME_ADVICE), locked_output_folder(out, f"--outdir {out}", info.is_main, RUN_FILES):
            config, cfg, ckpt = _resumed(config, given, out, info)
            with cuda_math(cfg.tf32, cfg.cudnn_benchmark):  # a resumed run: its recorded --tf32
                return _train(cfg, dataclasses.asdict(config), ckpt, info)
    finally:
        cleanup_distributed()


def _resumed(config: TrainConfig, given: Optional[set[str]], out: Path, info: DistInfo
             ) -> tuple[TrainConfig, TrainConfig, Optional[Dict[str, Any]]]:
    """(flags, resolved configuration, checkpoint) of the run: with ``--resume`` the run's configuration; ``--resume
    auto`` continues the newest checkpoint in ``out``, or starts afresh (dropping the logs of a run that stopped
    before its first checkpoint) when there is none."""
    resume = config.resume
    if resume == "auto":
        resume = newest_checkpoint(out)
        if resume is None and config.dataset is None:  # (a fresh start: before the logs are dropped)
            raise UserError(NO_DATASET)
        if resume is None and info.is_main:
            for name in RUN_LOGS:
                (out / name).unlink(missing_ok=True)
        barrier()
    config = dataclasses.replace(config, resume=resume)
    ckpt = read_training_checkpoint(resume, "--resume") if resume else None
    if ckpt is not None:
        config = resume_config(config, given, ckpt)
    cfg = resolve_config(config)
    check_resume_checkpoint(cfg, ckpt)
    return config, cfg, ckpt


def _train(cfg: TrainConfig, args: Dict[str, Any], ckpt: Optional[Dict[str, Any]], info: DistInfo
           ) -> Dict[str, Any]:
    """:func:`train` once the output folder is locked and the configuration final: build the run, the epochs."""
    run = build_run(cfg, args, ckpt, info)
    if cfg.max_steps is not None and run.step >= cfg.max_steps:
        if info.is_main:
            print(f"--resume {cfg.resume}: already at step {run.step} >= --max_steps {cfg.max_steps}; nothing to do")
        return {"epoch": run.start_epoch, "step": run.step, "checkpoint": cfg.resume, "classifier": run.classifier}
    if ckpt is not None:  # (not before: a requeue of a finished run keeps its logs whole)
        cut_logs(run)
    announce(run)
    open_tensorboard(run)
    try:
        stats: Dict[str, Any] = {}
        with run.stop:  # SIGTERM/SIGINT from here on: a checkpoint at the next optimizer step, then RunStopped
            for epoch in range(run.start_epoch, cfg.epochs):
                t0 = time.time()
                result = run_epoch(run, epoch)
                stats = finish_epoch(run, epoch, result, t0)
                if result.stopped:
                    break
    finally:
        close_tensorboard(run)
    if info.is_main and run.last_ckpt is not None:
        print(f"last checkpoint: {run.last_ckpt}")
    return {**stats, "checkpoint": str(run.last_ckpt) if run.last_ckpt else None, "classifier": run.classifier}
