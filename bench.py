"""Throughput of denoised smoothing: certification samples/s and the time of one FT-CADIS fine-tuning step.

For each configuration (``cifar10``, ``imagenet``, ``digits``) one run times, on the same device and weights:

* the **reference path** (:mod:`reference`), a re-creation of how Carlini et al. (2023) certify on top of Cohen et
  al. (2019): fp32, the diffusion's own noise at t*, the full ``p_sample`` step, eager attention, the argmax counted
  on the host batch by batch;
* the **fast path**: :class:`core.Smooth` over :class:`core.DenoisedClassifier` after
  :func:`fast.prepare_inference_` (what ``certify.py --precision bf16`` runs): noise drawn on the device at sigma,
  bf16/fp16 autocast with the Linear/Conv weights stored in that dtype, channels_last UNet, SDPA attention
  (``unet.attention``: its explicit form for bf16 on CPU), optional ``torch.compile``, class counts kept on the
  device (one transfer per call);

and reports every fast figure as a ratio to the reference, the share of samples whose predicted class matches the
fp32 path on the same noise, and one FT-CADIS step (noise + denoise without grad, train forward, attack, backward,
AdamW): the reference's (:class:`reference.ReferenceFinetuneStep`: all images attacked, for-loop AdamW,
per-parameter clipping with a host sync each) and ours (:class:`FinetuneStep`: attack on masked-in images only,
fused AdamW, foreach clipping).

    python bench.py --configs digits cifar10 --compile --json runs/bench_cpu.json

Weights are random (timing only) except for ``digits``, whose shipped models are used; ``--denoiser_ckpt`` and
``--classifier_ckpt`` (one configuration) time and check real checkpoints instead, so that the agreement figure is
that of the model one certifies:

    python bench.py --configs cifar10 --denoiser_ckpt models/cifar10_uncond_50M_500K.pt \
        --classifier_ckpt vit_cifar10.pth --compile
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from runkit.cli import exit_on_interrupt, run_cli

exit_on_interrupt(__name__)  # a Ctrl-C while the libraries below load exits 130, no traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from certification import certify_method
from classifier import DIGITS_CHECKPOINT, ImageClassifier, apply_lora, get_architecture
from core import (
    PHASE_ESTIMATION,
    ClassifierStack,
    DenoisedClassifier,
    NoiseStream,
    Smooth,
    image_generator,
    noise_and_denoise,
)
from denoiser import DiffusionDenoiser, build_denoiser, default_checkpoint_path, load_denoiser
from fast import agreement, channels_last_default, fast_model, prepare_inference_
from pool import run_each, run_pool
from presets import CIFAR10, DIGITS, IMAGENET, N0, Preset
from reference import ReferenceDenoisedClassifier, ReferenceFinetuneStep, eager_attention, reference_sample_noise
from runkit.devices import (
    DEFAULT_TF32,
    PRECISION_CHOICES,
    TF32_MODES,
    cpu_model,
    cuda_math,
    device_model,
    precision_dtype,
    resolve_device,
    resolve_precision,
    torch_threads,
)
from runkit.errors import UserError
from runkit.files import atomic_write_text, check_output
from runkit.memory import largest_batch, parse_batch_size
from sequential import default_sequential_radii
from training import clip_grad_per_param


@dataclass(frozen=True)
class BenchConfig:
    """One configuration: ``preset`` gives the models, image size and classes, ``protocol`` the paper's N and
    fine-tuning settings (METHOD §4; digits is timed with CIFAR-10's), ``cpu`` / ``cuda`` the default batch sizes and
    iteration counts per device (CPU: small, so that a run takes minutes)."""

    preset: Preset
    protocol: Preset
    cpu: Dict[str, int]
    cuda: Dict[str, int]


CONFIGS: Dict[str, BenchConfig] = {
    "cifar10": BenchConfig(CIFAR10, CIFAR10, cpu=dict(batch_size=16, iters=2, ft_images=1),
                           cuda=dict(batch_size=500, iters=10, ft_images=8)),
    "imagenet": BenchConfig(IMAGENET, IMAGENET, cpu=dict(batch_size=2, iters=1, ft_images=1),
                            cuda=dict(batch_size=64, iters=5, ft_images=8)),
    "digits": BenchConfig(DIGITS, CIFAR10, cpu=dict(batch_size=256, iters=4, ft_images=8),
                          cuda=dict(batch_size=4096, iters=10, ft_images=32)),
}


# ---------------------------------------------------------------------------------------------------------------
# Models, devices, memory
# ---------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or the process's peak RSS (Linux ``clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA ``max_memory_allocated`` or the process's peak resident set size (VmHWM, else ``ru_maxrss``), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _randomize_zero_init(module: nn.Module) -> None:
    """Give the UNet's zero-initialised layers (output convs, attention projections) PyTorch's default init, scaled
    by 0.1: with them at zero a random UNet predicts ε̂ = 0 and the denoiser is the identity, which would hide its
    share of the bf16 error in the agreement figure."""
    g = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and not m.weight.detach().any():
            bound = 0.1 / math.sqrt(m.weight[0].numel())
            with torch.no_grad():
                m.weight.copy_(torch.empty_like(m.weight).uniform_(-bound, bound, generator=g))


def build_models(name: str, device: torch.device, weights: str, denoiser_ckpt: Optional[str] = None,
                 classifier_ckpt: Optional[str] = None) -> Dict[str, Any]:
    """The denoiser and classifier of a configuration: ``denoiser_ckpt`` / ``classifier_ckpt`` when given (as
    ``certify.py`` loads them), else shipped weights for ``digits`` when present (``weights`` = ``auto``), else
    random weights (timing only; ``weights`` = ``random`` forces them)."""
    cfg = CONFIGS[name].preset
    shipped = (name == "digits" and weights == "auto" and default_checkpoint_path("digits").is_file()
               and DIGITS_CHECKPOINT.is_file())
    torch.manual_seed(0)
    if denoiser_ckpt is not None:
        denoiser = load_denoiser(cfg.denoiser, denoiser_ckpt, device=device)
    elif shipped:
        denoiser = load_denoiser("digits", device=device)
    else:
        denoiser = build_denoiser(cfg.denoiser)
        _randomize_zero_init(denoiser.unet)
    if classifier_ckpt is not None:
        classifier = get_architecture(cfg.arch, num_classes=cfg.num_classes, checkpoint=classifier_ckpt,
                                      device=device)
    elif shipped:
        classifier = get_architecture(cfg.arch, pretrained=True, device=device)
    else:
        classifier = get_architecture(cfg.arch, num_classes=cfg.num_classes)
    kinds = ["checkpoint" if denoiser_ckpt else "shipped" if shipped else "random",
             "checkpoint" if classifier_ckpt else "shipped" if shipped else "random"]
    denoiser = denoiser.to(device).eval().requires_grad_(False)
    classifier = classifier.to(device).eval().requires_grad_(False)
    return {"denoiser": denoiser, "classifier": classifier,
            "weights": kinds[0] if kinds[0] == kinds[1] else f"denoiser {kinds[0]}, classifier {kinds[1]}",
            "denoiser_params": sum(p.numel() for p in denoiser.parameters()),
            "classifier_params": sum(p.numel() for p in classifier.parameters())}


def test_images(name: str, count: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` clean images [count, 3, S, S] in [0, 1] and labels: digits test images for ``digits``, else smooth
    random images (bilinear upsampling of 4x4 uniform noise; random weights have no data to match)."""
    size = CONFIGS[name].preset.image_size
    if name == "digits":
        from datasets import get_dataset
        data = get_dataset("digits", "test")
        step = max(len(data) // count, 1)
        items = [data[i * step] for i in range(count)]
        return (torch.stack([x for x, _ in items]).to(device),
                torch.tensor([y for _, y in items], device=device))
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(count, 3, 4, 4, generator=g), size=(size, size), mode="bilinear",
                      align_corners=False)
    return x.to(device), torch.randint(0, CONFIGS[name].preset.num_classes, (count,), generator=g).to(device)


# ---------------------------------------------------------------------------------------------------------------
# Certification throughput
# ---------------------------------------------------------------------------------------------------------------


class CertifyPath:
    """One way of drawing ``num`` samples of f(D(x + δ)) for one image and counting the classes."""

    def __init__(self, label: str, precision: str, compiled: bool, channels_last: bool, batch_size: int,
                 sample: Callable[[torch.Tensor, int, int], Any]):
        self.label, self.precision, self.compiled, self.channels_last = label, precision, compiled, channels_last
        self.batch_size = batch_size
        self.sample = sample
        self.seconds = 0.0
        self.samples = 0
        self.rates: List[float] = []
        self.warmup_s = 0.0
        self.peak_mb = 0.0

    def run(self, x: torch.Tensor, num: int, device: torch.device) -> float:
        _sync(device)
        t0 = time.perf_counter()
        self.sample(x, num, self.batch_size)
        _sync(device)
        return time.perf_counter() - t0


def reference_path(denoiser: DiffusionDenoiser, classifier: ImageClassifier, sigma: float, num_classes: int,
                   batch_size: int) -> CertifyPath:
    model = ReferenceDenoisedClassifier(denoiser, classifier, sigma).eval()

    def sample(x: torch.Tensor, num: int, batch: int) -> np.ndarray:
        with eager_attention():
            return reference_sample_noise(model, x, num, batch, num_classes)

    return CertifyPath("reference", "fp32", False, False, batch_size, sample)


def fast_path(model: DenoisedClassifier, num_classes: int, precision: str, compiled: bool, channels_last: bool,
              batch_size: int) -> CertifyPath:
    """``core.Smooth`` over ``model``: on-device noise at sigma, autocast ``precision``, on-device counts."""
    smooth = Smooth(model, num_classes, model.sigma, precision=precision)
    key = iter(range(1, 1 << 30))

    def sample(x: torch.Tensor, num: int, batch: int) -> np.ndarray:
        stream = NoiseStream(x, next(key), PHASE_ESTIMATION, smooth.noise_block, num)
        return smooth.counts(x, 0, num, stream, batch)[0].cpu().numpy()

    label = "fast" + (" compiled" if compiled else "")
    return CertifyPath(label, precision, compiled, channels_last and precision != "fp32", batch_size, sample)


def path_batch_size(path: CertifyPath, x: torch.Tensor, device: torch.device, start: int, cap: int) -> int:
    """``--batch_size auto``: the largest batch (at most ``cap``) with which one batch of ``path`` runs on ``device``
    (:func:`runkit.memory.largest_batch`, trying sizes from ``start``)."""
    best = largest_batch(lambda b: path.sample(x, b, b), device, cap, start)
    if not best:
        raise UserError(f"--batch_size auto: even a batch of 1 does not fit on {device} ({path.label} "
                        f"{path.precision})")
    return best


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning step
# ---------------------------------------------------------------------------------------------------------------


class FinetuneStep(ReferenceFinetuneStep):
    """Our step (``train.py``'s) in the reference step's frame: :func:`core.noise_and_denoise` (noise at sigma,
    one-shot denoise without grad) by a denoiser prepared with :func:`fast.prepare_inference_`, fused AdamW,
    foreach clipping (:func:`training.clip_grad_per_param`); with ``masked_only`` the attack and the adversarial
    forward only on the masked-in images.

    Args:
        args: as :class:`reference.ReferenceFinetuneStep`.
        masked_only: attack the masked-in images only (train.py's way).
    """

    def __init__(self, *args: Any, masked_only: bool, **kwargs: Any):
        self.masked_only = masked_only
        super().__init__(*args, **kwargs)

    def prepare(self, denoiser: DiffusionDenoiser) -> None:
        """A copy of the denoiser with the inference speed-ups of :mod:`fast` at the step's precision."""
        self.denoiser = prepare_inference_(copy.deepcopy(denoiser), self.precision)

    def make_optimizer(self, groups: List[Dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        """Fused AdamW."""
        return torch.optim.AdamW(groups, lr=lr, fused=True)

    def denoise(self, clean: torch.Tensor) -> torch.Tensor:
        """D(x + delta) with delta at sigma, one-shot at t*."""
        return noise_and_denoise(self.denoiser, clean, self.t_star, self.sigma)

    def clip(self) -> None:
        """Each parameter's gradient norm capped, foreach (no host sync)."""
        clip_grad_per_param(self.params, self.clip_grad)


# ---------------------------------------------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class BenchOptions:
    """What a bench run measures for each configuration: bench.py's flags, resolved (defaults live in the parser).

    ``batch_size``/``iters``/``N``/``ft_images`` None: the configuration's default for the device; ``modes``:
    (N, images) for certify.py's modes, None to skip; ``heads``: K classifiers after one denoising pass, 0 to skip.
    """

    sigma: float
    precisions: Sequence[str]
    compile: bool
    compile_mode: Optional[str]
    channels_last: bool
    batch_size: Optional[int | str]
    iters: Optional[int]
    rounds: int
    N: Optional[int]
    agreement_samples: int
    certify: bool
    finetune: bool
    ft_images: Optional[int]
    ft_iters: int
    weights: str
    seed: int
    denoiser_ckpt: Optional[str]
    classifier_ckpt: Optional[str]
    modes: Optional[tuple[int, int]]
    heads: int


def bench_config(name: str, device: torch.device, opts: BenchOptions, log: Callable[[str], None] = print
                 ) -> Dict[str, Any]:
    """Time the reference and the fast paths of configuration ``name``; returns its JSON record."""
    cfg = CONFIGS[name]
    dflt = cfg.cuda if device.type == "cuda" else cfg.cpu
    N = opts.N or cfg.protocol.N
    iters = opts.iters or dflt["iters"]
    models = build_models(name, device, opts.weights, opts.denoiser_ckpt, opts.classifier_ckpt)
    denoiser, classifier, sigma = models["denoiser"], models["classifier"], opts.sigma
    t_star = denoiser.timestep_for_sigma(sigma)
    log(f"[{name}] denoiser {models['denoiser_params'] / 1e6:.1f}M + classifier "
        f"{models['classifier_params'] / 1e6:.1f}M params ({models['weights']} weights), sigma {sigma}, t* {t_star}")
    rows = []
    if opts.certify:
        batch_size = opts.batch_size
        if batch_size is None or (batch_size == "auto" and device.type != "cuda"):
            batch_size = dflt["batch_size"]  # 'auto' searches CUDA memory only
        rows = bench_certify(name, denoiser, classifier, device, opts, batch_size, iters, N, log)
    finetune = []
    if opts.finetune:
        finetune = bench_finetune(name, denoiser, classifier, sigma, device, opts.precisions,
                                  opts.ft_images or dflt["ft_images"], opts.ft_iters, opts.seed, log)
    extras = {}
    if opts.modes:
        batch = opts.batch_size if isinstance(opts.batch_size, int) else dflt["batch_size"]
        extras["modes"] = bench_modes(name, models, sigma, device, opts.modes[0], opts.modes[1], batch, opts.seed)
    if opts.heads:
        extras["heads"] = bench_heads(name, models, sigma, device, opts.heads, dflt["batch_size"], iters)
    return {
        **extras, "config": name, "weights": models["weights"], "denoiser": cfg.preset.denoiser,
        "classifier": cfg.preset.arch, "denoiser_params": models["denoiser_params"],
        "classifier_params": models["classifier_params"], "image_size": cfg.preset.image_size, "sigma": sigma, "t_star": t_star, "N": N, "N0": N0,
        "rounds": opts.rounds, "iters_per_round": iters, "certify": rows, "finetune": finetune,
    }


def time_paths(paths: Sequence[CertifyPath], images: torch.Tensor, rounds: int, iters: int, device: torch.device,
               log: Callable[[str], None]) -> None:
    """Warm each path up (one batch; compiles the compiled ones), then ``rounds`` rounds of ``iters`` batches per
    path, alternating the paths so that a change of machine load hits all of them alike; the figures are added to
    each :class:`CertifyPath`.

    Args:
        paths: the paths, timed in this order within each round.
        images: clean images [n, 3, S, S]; round r samples image r mod n.
        rounds, iters: rounds, and batches per path and round.
        device: where they run (synchronized around each timing).
        log: one line per path and round.
    """
    for p in paths:
        reset_peak_memory(device)
        t0 = time.perf_counter()
        p.run(images[0], p.batch_size, device)
        p.warmup_s = time.perf_counter() - t0
        p.peak_mb = peak_memory_mb(device)
    for r in range(rounds):
        x = images[r % len(images)]
        for p in paths:
            num = iters * p.batch_size
            reset_peak_memory(device)
            dt = p.run(x, num, device)
            p.peak_mb = max(p.peak_mb, peak_memory_mb(device))
            p.seconds += dt
            p.samples += num
            p.rates.append(num / dt)
            log(f"round {r + 1}/{rounds} {p.label:<14} {p.precision}: {num / dt:8.2f} samples/s")


def bench_certify(name: str, denoiser: DiffusionDenoiser, classifier: ImageClassifier, device: torch.device,
                  opts: BenchOptions, batch_size: int | str, iters: int, N: int, log: Callable[[str], None]
                  ) -> List[Dict[str, Any]]:
    """Samples/s of the reference path and of each fast variant (precision x compiled), ratios, agreement."""
    num_classes = CONFIGS[name].preset.num_classes
    sigma, rounds, seed, channels_last = opts.sigma, opts.rounds, opts.seed, opts.channels_last
    x_clean, _ = test_images(name, max(4, rounds), device, seed)
    start = 32 if batch_size == "auto" else int(batch_size)
    paths: List[CertifyPath] = []
    fast_modules: Dict[tuple, DenoisedClassifier] = {}
    for compiled in ([False, True] if opts.compile else [False]):
        for precision in opts.precisions:
            model = fast_model(denoiser, classifier, sigma, precision, channels_last, compiled, opts.compile_mode)
            fast_modules[(precision, compiled)] = model
            paths.append(fast_path(model, num_classes, precision, compiled, channels_last, start))
    ref = reference_path(denoiser, classifier, sigma, num_classes, start)
    if batch_size == "auto" and device.type == "cuda":
        found: Dict[str, int] = {}
        for p in paths:  # a compiled path takes its eager twin's size: each size it tried would compile a graph
            if p.precision not in found:
                found[p.precision] = path_batch_size(p, x_clean[0], device, start, max(N, start))
            p.batch_size = found[p.precision]
        ref.batch_size = path_batch_size(ref, x_clean[0], device, start, max(p.batch_size for p in paths))
        log(f"[{name}] batch sizes: reference {ref.batch_size}, fast {', '.join(str(p.batch_size) for p in paths)}")
    all_paths = [ref, *paths]
    time_paths(all_paths, x_clean, rounds, iters, device, lambda text: log(f"[{name}] {text}"))
    ref_rate = ref.samples / ref.seconds
    ref_gflops = gflops_per_sample(ReferenceDenoisedClassifier(denoiser, classifier, sigma).eval(), x_clean)
    fast_gflops = gflops_per_sample(fast_model(denoiser, classifier, sigma, "fp32", False, False, None), x_clean)
    rows = []
    for p in all_paths:
        rate = p.samples / p.seconds
        row: Dict[str, Any] = {
            "path": p.label, "precision": p.precision, "compiled": p.compiled, "channels_last": p.channels_last,
            "batch_size": p.batch_size, "samples": p.samples, "seconds": p.seconds, "samples_per_s": rate,
            "rates_per_round": p.rates, "speedup_vs_reference": rate / ref_rate,
            "speedup_per_round": [a / b for a, b in zip(p.rates, ref.rates)],
            "sec_per_image": (N0 + N) / rate, "warmup_s": p.warmup_s, "peak_memory_mb": p.peak_mb,
            "gflops_per_sample": ref_gflops if p is ref else fast_gflops,
        }
        row["achieved_gflops_per_s"] = rate * row["gflops_per_sample"]
        if p is not ref and opts.agreement_samples > 0:
            per_image = max(1, opts.agreement_samples // len(x_clean))
            row["agreement_vs_fp32"] = agreement(
                denoiser, classifier, fast_modules[(p.precision, p.compiled)], p.precision, sigma, x_clean,
                per_image, p.batch_size, seed)
            log(f"[{name}] agreement {p.label} {p.precision} vs fp32: "
                f"{row['agreement_vs_fp32']['agreement']:.4f} over {row['agreement_vs_fp32']['samples']} samples")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Fewer samples and one denoising pass for several classifiers: certify.py's modes
# ---------------------------------------------------------------------------------------------------------------

# certify.py's modes: (--sequential, --skip_wrong, the pool of images in flight; without it --no_pool)
MODES = {"fixed": (False, False, False), "sequential": (True, False, False), "sequential_pool": (True, False, True),
         "skip_wrong": (False, True, False), "both": (True, True, False), "both_pool": (True, True, True)}


def bench_modes(name: str, models: Dict[str, Any], sigma: float, device: torch.device, N: int, images: int,
                batch_size: int, seed: int, alpha: float = 0.001) -> Dict[str, Any]:
    """certify.py's modes (:data:`MODES`: fixed N, --sequential, --skip_wrong, both; one image after the other, as
    with --no_pool, or in the pool of images in flight) on ``images`` test images, fp32, through
    ``certification.certify_method`` and the drivers of :mod:`pool`: estimation samples per image, wall seconds per
    image (selection included), the mean forward-pass batch, certified accuracy at the default sequential radii
    (meaningful with trained weights only, i.e. digits), and for a pool mode whether its results equal those of the
    same mode one image after the other."""
    num_classes = CONFIGS[name].preset.num_classes
    smooth = Smooth(DenoisedClassifier(models["denoiser"], models["classifier"], sigma).eval(), num_classes, sigma)
    radii = default_sequential_radii(name, sigma, N, alpha)
    x, labels = test_images(name, images, device)
    y = [int(label) for label in labels]
    result: Dict[str, Any] = {"N": N, "N0": N0, "images": images, "alpha": alpha, "radii": radii,
                              "batch_size": batch_size}
    outcomes: Dict[tuple, list] = {}
    for mode, (sequential, skip_wrong, pooled) in MODES.items():
        method = certify_method(smooth, N0, N, alpha, batch_size, radii if sequential else None, skip_wrong)
        computations = ((i, method.steps(x[i], image_generator(seed, i), y[i])) for i in range(images))
        smooth.passes = smooth.samples = 0
        _sync(device)
        t0 = time.perf_counter()
        done = dict((i, r) for i, [r], _ in (run_pool if pooled else run_each)(smooth, computations, batch_size))
        _sync(device)
        seconds = time.perf_counter() - t0
        rows = [done[i] for i in range(images)]  # (prediction, radius, n) per image
        hits = np.array([[int(p == y[i] and r >= radius) for radius in radii] for i, (p, r, _) in enumerate(rows)])
        result[mode] = {"samples_per_image": float(np.mean([n for _, _, n in rows])), "sec_per_image": seconds / images,
                        "pool": pooled, "mean_forward_batch": smooth.samples / max(smooth.passes, 1),
                        "certified_accuracy": hits.mean(0).tolist()}
        if pooled:
            result[mode]["same_results_as_one_by_one"] = rows == outcomes[(sequential, skip_wrong)]
        outcomes.setdefault((sequential, skip_wrong), rows)
    return result


def bench_heads(name: str, models: Dict[str, Any], sigma: float, device: torch.device, K: int, batch_size: int,
                iters: int) -> Dict[str, Any]:
    """Seconds per noise sample of f o D with one classifier and with K classifiers after one denoiser
    (``core.ClassifierStack``, what ``certify.py --finetuned_path A B ...`` runs), fp32: K single runs cost K times
    the first, one K-classifier run the second."""
    num_classes = CONFIGS[name].preset.num_classes
    x = test_images(name, 1, device)[0][0]
    denoiser, classifier = models["denoiser"], models["classifier"]
    per_sample = {}
    for label, model in (("single", DenoisedClassifier(denoiser, classifier, sigma)),
                         ("stack", DenoisedClassifier(denoiser, ClassifierStack([classifier] * K), sigma))):
        smooth = Smooth(model.eval(), num_classes, sigma)
        warm_up, timed = (NoiseStream(x, key, PHASE_ESTIMATION, smooth.noise_block) for key in (0, 1))
        smooth.counts(x, 0, batch_size, warm_up, batch_size)
        _sync(device)
        t0 = time.perf_counter()
        smooth.counts(x, 0, batch_size * iters, timed, batch_size)
        _sync(device)
        per_sample[label] = (time.perf_counter() - t0) / (batch_size * iters)
    return {"K": K, "batch_size": batch_size, "iters": iters, "sec_per_sample_single": per_sample["single"],
            "sec_per_sample_K": per_sample["stack"], "speedup_vs_K_runs": K * per_sample["single"] / per_sample["stack"]}


def format_modes_and_heads(name: str, record: Dict[str, Any]) -> List[str]:
    """The lines of :func:`bench_modes` / :func:`bench_heads` results of one configuration."""
    lines = []
    modes = record.get("modes")
    if modes:
        lines += ["", f"{name}: certify.py modes, fp32, {modes['images']} images, N0 {modes['N0']}, N {modes['N']}, "
                      f"radii {modes['radii']}",
                  f"{'mode':<16}{'samples/img':>12}{'s/img':>9}{'batch':>8}  certified accuracy at the radii"]
        for mode in MODES:
            m = modes[mode]
            lines.append(f"{mode:<16}{m['samples_per_image']:>12.0f}{m['sec_per_image']:>9.3f}"
                         f"{m['mean_forward_batch']:>8.0f}  " + " ".join(f"{a:.2f}" for a in m["certified_accuracy"])
                         + ("" if m.get("same_results_as_one_by_one", True) else "  (results differ: a bug)"))
        lines.append(f"(batch: the mean forward pass, of --batch_size {modes['batch_size']}; *_pool: the images in "
                     "flight of certify.py's default, the others one after the other as with --no_pool)")
    heads = record.get("heads")
    if heads:
        lines.append(f"{name}: {heads['K']} classifiers, one denoising pass: {heads['sec_per_sample_K'] * 1e3:.1f} ms/"
                     f"sample vs {heads['sec_per_sample_single'] * 1e3:.1f} for one ({heads['K']} single runs: "
                     f"{heads['K'] * heads['sec_per_sample_single'] * 1e3:.1f}), {heads['speedup_vs_K_runs']:.2f}x "
                     f"(batch {heads['batch_size']} x {heads['iters']}, fp32)")
    return lines


def bench_finetune(name: str, denoiser: DiffusionDenoiser, classifier: ImageClassifier, sigma: float,
                   device: torch.device, precisions: Sequence[str], ft_images: int, ft_iters: int, seed: int,
                   log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Time the reference step, ours with the attack on every image (the cost when all images are masked in)
    and ours as ``train.py`` runs it (attack on masked-in images only; its time depends on the masked-in share,
    reported). Same images, targets = the classifier's own predictions, same seed for each path."""
    settings = CONFIGS[name].protocol.train
    ft_method = settings.ft_method
    images, _ = test_images(name, ft_images, device, seed + 1)
    with torch.inference_mode():
        targets = classifier(denoiser.denoise(images, denoiser.timestep_for_sigma(sigma))).argmax(1).clone()
    ref_precision = "fp16" if device.type == "cuda" else "fp32"
    fast_precision = next((p for p in precisions if p != "fp32"), "fp32")
    rows = []
    for label, reference, masked_only, precision in (("reference", True, False, ref_precision),
                                                     ("fast (all)", False, False, fast_precision),
                                                     ("fast (masked)", False, True, fast_precision)):
        clf = copy.deepcopy(classifier).requires_grad_(True)
        if ft_method == "lora":
            apply_lora(clf, rank=4, alpha=4.0)
        step = (ReferenceFinetuneStep(clf, denoiser, sigma, settings, precision, device) if reference
                else FinetuneStep(clf, denoiser, sigma, settings, precision, device, masked_only=masked_only))
        torch.manual_seed(seed)
        reset_peak_memory(device)
        step(images, targets)  # warm-up (optimizer state, allocator)
        step.masked_in.clear()
        times = []
        for _ in range(ft_iters):
            _sync(device)
            t0 = time.perf_counter()
            step(images, targets)
            _sync(device)
            times.append(time.perf_counter() - t0)
        rows.append({"path": label, "precision": precision, "images": ft_images, "num_noises": step.M,
                     "denoised_per_step": ft_images * step.M, "attack_steps": step.steps,
                     "ft_method": ft_method, "optimizer": "AdamW (default)" if reference else "AdamW (fused)",
                     "attack_on": "masked-in images" if masked_only else "all images",
                     "sec_per_step": float(np.mean(times)), "sec_per_step_all": times,
                     "masked_in_share": float(np.mean(step.masked_in)), "peak_memory_mb": peak_memory_mb(device)})
        log(f"[{name}] fine-tuning step {label} {precision}: {np.mean(times):.3f} s "
            f"(masked-in share {rows[-1]['masked_in_share']:.2f})")
        del step, clf
    for r in rows:
        r["speedup_vs_reference"] = rows[0]["sec_per_step"] / r["sec_per_step"]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The ceiling: FLOPs per sample and the device's matrix-multiply rate
# ---------------------------------------------------------------------------------------------------------------


def gflops_per_sample(model: nn.Module, x: torch.Tensor) -> float:
    """GFLOPs (2 per multiply-add) of one sample through ``model``, counted by ``torch.utils.flop_counter`` on a
    batch of one in fp32: the matrix multiplies, convolutions and attention, i.e. the work a faster kernel cannot
    avoid. Elementwise work (norms, activations, noise) is not counted."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), eager_attention(), counter:
        model(x[:1])
    return counter.get_total_flops() / 1e9


def matmul_gflops(device: torch.device, precisions: Sequence[str], shape: Sequence[int] = (3152, 768, 3072),
                  repeats: int = 5) -> Dict[str, float]:
    """The best of ``repeats`` GFLOP/s of one (m x k) @ (k x n) matrix multiply per dtype: fp32 and each precision.
    The default shape is ViT-B's MLP at batch 16 (16 x 197 tokens, 768 -> 3072). Speed-up ceiling of a precision
    over fp32 for matmul-bound work = its rate / the fp32 rate."""
    m, k, n = shape
    rates = {}
    for precision in dict.fromkeys(["fp32", *precisions]):
        dtype = torch.float32 if precision == "fp32" else precision_dtype(precision)
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        best = math.inf
        for _ in range(repeats + 1):  # the first is a warm-up
            _sync(device)
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        rates[precision] = 2 * m * k * n / best / 1e9
    return rates


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> Dict[str, Any]:
    env: Dict[str, Any] = {
        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "peak_memory": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS (VmHWM)",
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["tf32"] = {"cudnn_conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
        env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    env["device_model"] = device_model(device)
    return env


def format_table(result: Dict[str, Any]) -> str:
    """The readable table: one row per certification path, then one per fine-tuning step."""
    lines = [f"device {result['env']['device']} ({result['env'].get('gpu') or result['env']['cpu']}), "
             f"{result['env']['threads']} threads, torch {result['env']['torch']}, load average at start "
             f"{result['env']['load_average']}"]
    head = (f"{'config':<9}{'path':<15}{'prec':<6}{'batch':>6}{'samples/s':>11}{'x ref':>7}{'s/img@N':>10}"
            f"{'N':>8}{'agree':>8}{'peak MiB':>10}{'GFLOP':>8}{'GFLOP/s':>9}")
    rates = result["env"].get("matmul_gflops_per_s")
    if rates:
        lines.append("matrix multiply (ViT-B MLP shape) GFLOP/s: "
                     + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
                     + "".join(f"; {k}/fp32 {v / rates['fp32']:.2f}x" for k, v in rates.items() if k != "fp32"))
    lines += ["", "certification (noise -> denoise -> classify -> count)", head, "-" * len(head)]
    for c in result["configs"]:
        for r in c["certify"]:
            agree = r.get("agreement_vs_fp32", {}).get("agreement")
            lines.append(f"{c['config']:<9}{r['path']:<15}{r['precision']:<6}{r['batch_size']:>6}"
                         f"{r['samples_per_s']:>11.2f}{r['speedup_vs_reference']:>7.2f}{r['sec_per_image']:>10.1f}"
                         f"{c['N']:>8}{'' if agree is None else f'{100 * agree:.2f}%':>8}{r['peak_memory_mb']:>10.0f}"
                         f"{r['gflops_per_sample']:>8.4g}{r['achieved_gflops_per_s']:>9.0f}")
    if any(c["finetune"] for c in result["configs"]):
        head = (f"{'config':<9}{'path':<15}{'prec':<6}{'imgs x M':>9}{'s/step':>9}{'x ref':>7}{'masked-in':>10}"
                f"{'peak MiB':>10}")
        lines += ["", "fine-tuning step (denoise, forward, attack, backward, AdamW)", head, "-" * len(head)]
        for c in result["configs"]:
            for r in c["finetune"]:
                lines.append(f"{c['config']:<9}{r['path']:<15}{r['precision']:<6}"
                             f"{str(r['images']) + ' x ' + str(r['num_noises']):>9}{r['sec_per_step']:>9.3f}"
                             f"{r['speedup_vs_reference']:>7.2f}{r['masked_in_share']:>10.2f}"
                             f"{r['peak_memory_mb']:>10.0f}")
    for c in result["configs"]:
        lines += format_modes_and_heads(c["config"], c)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                   help="configurations to time (default: digits cifar10, plus imagenet on CUDA)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("--sigma", type=float, default=0.25, help="noise level (sets t*; default 0.25)")
    p.add_argument("--precisions", nargs="+", default=None, choices=PRECISION_CHOICES,
                   help="fast-path autocast precisions (default: auto, i.e. bf16 where the device computes it "
                        "natively, else fp32 on CPU; on CUDA auto and fp16)")
    p.add_argument("--compile", action="store_true", help="also time the fast path under torch.compile")
    p.add_argument("--compile_mode", default=None,
                   help="torch.compile mode, e.g. max-autotune or reduce-overhead (CUDA graphs)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last UNet on the bf16/fp16 fast path (default as certify.py: on CPU, not on CUDA)")
    p.add_argument("--tf32", default=DEFAULT_TF32, choices=list(TF32_MODES),
                   help="fp32 work in TF32 on CUDA Ampere+ (as certify.py): conv (default, torch's) = the UNet's "
                        "convolutions, on = also matmuls, off = none")
    p.add_argument("--cudnn_benchmark", action="store_true", help="cuDNN's autotuner (as certify.py)")
    p.add_argument("--batch_size", default=None,
                   help="samples per batch for every path (default: per config and device); 'auto' on CUDA: the "
                        "largest batch that fits, found per path (CPU: the default)")
    p.add_argument("--iters", type=int, default=None, help="timed batches per path and round (default: per config)")
    p.add_argument("--rounds", type=int, default=2,
                   help="timing rounds (default 2); the paths alternate within each round")
    p.add_argument("--N", type=int, default=None,
                   help="certification samples per image for the s/image column (default: "
                        + ", ".join(f"{name} {c.protocol.N}" for name, c in CONFIGS.items()) + f"); N0 = {N0} is added")
    p.add_argument("--agreement_samples", type=int, default=64,
                   help="samples on which the fast path's classes are compared with fp32 (default 64; 0: skip)")
    p.add_argument("--no_certify", action="store_true", help="skip the certification paths")
    p.add_argument("--no_finetune", action="store_true", help="skip the fine-tuning step")
    p.add_argument("--ft_images", type=int, default=None, help="clean images per fine-tuning step (x M noises)")
    p.add_argument("--ft_iters", type=int, default=1,
                   help="timed fine-tuning steps per path, after one warm-up (default 1)")
    p.add_argument("--weights", default="auto", choices=("auto", "random"),
                   help="auto: the shipped digits models when present; random: random weights everywhere")
    p.add_argument("--denoiser_ckpt", default=None,
                   help="diffusion checkpoint of the (single) configuration, instead of random weights")
    p.add_argument("--classifier_ckpt", default=None,
                   help="classifier weights (timm/HF/train.py file, as certify.py) of the (single) configuration")
    p.add_argument("--modes", type=int, nargs=2, default=None, metavar=("N", "IMAGES"),
                   help="also run certify.py's modes (fixed N, --sequential, --skip_wrong, both; one image after the "
                        "other and, for the sequential ones, the pool of images in flight) with N samples on IMAGES "
                        "test images, fp32, at --batch_size (a number; else the configuration's default): samples "
                        "and seconds per image, the mean forward batch (meaningful with trained weights: digits)")
    p.add_argument("--heads", type=int, default=0, metavar="K",
                   help="also time K classifiers after one denoising pass against one (certify.py with several "
                        "classifiers), fp32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results as JSON to this file (replacing an earlier bench "
                                                "result; any other file only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="let --json replace a file that is not a bench result")
    return p


def is_bench_result(path: Path) -> bool:
    """Whether ``path`` holds what ``--json`` writes (a JSON object with ``env``, ``args`` and ``configs``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"env", "args", "configs"} <= set(data)


def check_json_output(path: str, overwrite: bool) -> None:
    """Before the run: ``--json`` can be written, and replaces no file but an earlier bench result (unless
    ``overwrite``).

    Args:
        path: the --json file.
        overwrite: the --overwrite flag.
    """
    check_output(path, "--json")
    if Path(path).exists() and not overwrite and not is_bench_result(Path(path)):
        raise UserError(f"--json {path}: exists and is not a bench result; pass --overwrite to replace it, or "
                        "choose another file")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be >= 1")
    batch_size = parse_batch_size(args.batch_size)
    for flag in ("iters", "rounds", "N", "ft_images", "ft_iters"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} {value}: must be >= 1")
    if args.heads < 0 or (args.modes and min(args.modes) < 1):
        raise UserError("--heads K: K >= 0; --modes N IMAGES: both >= 1")
    if not args.sigma > 0:
        raise UserError(f"--sigma {args.sigma}: must be > 0")
    configs = args.configs or (["digits", "cifar10"] + (["imagenet"] if device.type == "cuda" else []))
    if (args.denoiser_ckpt or args.classifier_ckpt) and len(configs) != 1:
        raise UserError("--denoiser_ckpt / --classifier_ckpt belong to one configuration: pass --configs NAME")
    for flag in ("denoiser_ckpt", "classifier_ckpt"):
        if getattr(args, flag) and not Path(getattr(args, flag)).exists():
            raise UserError(f"--{flag} {getattr(args, flag)}: no such file")
    precisions = list(dict.fromkeys(resolve_precision(p, device, "--precisions") for p in args.precisions or (
        ["auto", "fp16"] if device.type == "cuda" else ["auto"])))
    if args.json:  # fail before the long run, not after it
        check_json_output(args.json, args.overwrite)

    options = BenchOptions(
        sigma=args.sigma, precisions=precisions, compile=args.compile, compile_mode=args.compile_mode,
        channels_last=channels_last_default(device) if args.channels_last is None else args.channels_last,
        batch_size=batch_size, iters=args.iters, rounds=args.rounds, N=args.N,
        agreement_samples=args.agreement_samples, certify=not args.no_certify, finetune=not args.no_finetune,
        ft_images=args.ft_images, ft_iters=args.ft_iters, weights=args.weights, seed=args.seed,
        denoiser_ckpt=args.denoiser_ckpt, classifier_ckpt=args.classifier_ckpt,
        modes=tuple(args.modes) if args.modes else None, heads=args.heads)
    with torch_threads(args.threads), cuda_math(args.tf32, args.cudnn_benchmark):
        result: Dict[str, Any] = {"env": environment(device), "args": vars(args), "configs": []}
        result["env"]["matmul_gflops_per_s"] = matmul_gflops(device, precisions)
        for name in configs:
            result["configs"].append(bench_config(name, device, options, log=print))
    result["env"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(format_table(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    run_cli(main)
