"""FT-CADIS: fine-tune an off-the-shelf classifier on denoised images (SPEC section 4), under ``torchrun``.

Each loader batch of ``--batch`` clean images is split into M = ``--num_noises`` chunks of B' = batch/M images;
each chunk is repeated M times (noise-major), noised at ``--train_noise_sd`` and denoised once (no gradient), so
one micro-step sees ``--batch`` denoised images. The loss is :func:`core.cadis_objective`: confidence-aware
selective cross-entropy plus lbd x the masked adversarial KL, the adversarial search run only for the images whose
M copies are all classified correctly. Gradients are accumulated over ``--accum_iter`` micro-steps (DDP
``no_sync`` in between) and clipped per parameter; AdamW with layer-wise lr decay, per-iteration lr warmup +
half-cycle cosine and a cosine weight-decay schedule; effective batch = batch x accum_iter x world_size / M and
lr = blr x effective batch / 256 unless ``--lr`` is given.

    torchrun --nproc_per_node 4 train.py --dataset cifar10 --train_noise_sd 1.0 --lbd 4.0 --use_fp16 true ...
    python train.py --dataset digits --train_noise_sd 0.5 --epochs 2 --device cpu     # the embedded demo data

Outputs in ``--outdir``: ``log.txt`` (one TSV row per epoch), ``log_steps.txt`` (one row per logged optimizer
step) and ``checkpoint-<epoch>.pth.tar`` after epoch 1, every 5th and the last (plus ``checkpoint-step<N>.pth.tar``
every ``--ckpt_every_steps`` and when ``--max_steps`` stops the run), written atomically. A checkpoint holds the
model (timm state dict, LoRA unmerged), optimizer, scaler, epoch/step position and every rank's RNG states;
``--resume`` continues from it exactly (see the README, "Outputs, checkpoints, resume", for the one caveat).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from core import cadis_objective, prepare_inference_
from utils import (PRECISIONS, UserError, atomic_torch_save, atomic_write_text, autocast, cleanup_distributed,
                   init_distributed, run_cli)

# test-accuracy subset per epoch (the reference: 100 per class on CIFAR-10, 5 per class on ImageNet); 0 = all
DEFAULT_TEST_PER_CLASS = {"cifar10": 100, "imagenet": 5, "digits": 0}
LOG_HEADER = "epoch\tstep\tlr\twd\ttrain_loss\ttrain_sce\ttrain_madv\ttrain_acc\tmasked_in\ttest_acc\ttime"
STEP_LOG_HEADER = "step\tepoch\tlr\tloss\tsce\tmadv\tacc\tmasked_in"


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
# Schedules, clipping
# ---------------------------------------------------------------------------------------------------------------


def lr_at(progress: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warmup to ``lr`` over ``warmup_epochs``, then half-cycle cosine to ``min_lr`` at ``epochs``.

    ``progress`` is in epochs (fractional: epoch + iteration / iterations per epoch), as MAE's ``lr_sched``.
    """
    if progress < warmup_epochs:
        return lr * progress / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress - warmup_epochs, span) / span))


def cosine_at(progress: float, start: float, end: float, epochs: float) -> float:
    """Cosine from ``start`` (progress 0) to ``end`` (progress ``epochs``): the weight-decay schedule (DINO)."""
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * min(progress / max(epochs, 1e-12), 1.0)))


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """lr x each group's ``lr_scale`` (layer decay); ``weight_decay`` for groups that decay (the others keep 0)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group.get("weight_decay", 0.0) != 0.0:
            group["weight_decay"] = weight_decay


def clip_grad_per_param(parameters: Sequence[torch.Tensor], max_norm: float) -> None:
    """Scale each parameter's gradient to L2 norm <= ``max_norm`` separately (DINO's ``clip_gradients``)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    norms = torch._foreach_norm(grads)
    coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)


# ---------------------------------------------------------------------------------------------------------------
# RNG state, checkpoints, logs
# ---------------------------------------------------------------------------------------------------------------


def rng_state(device: torch.device) -> Dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, numpy, python) as tensors/lists (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def gather_rng_states(device: torch.device) -> List[Dict[str, Any]]:
    """Every rank's RNG state (a list indexed by rank; a collective when distributed)."""
    state = rng_state(device)
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in state.items()})
    return states


def _append(path: Path, header: str, row: str) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a") as f:
        if new:
            f.write(header + "\n")
        f.write(row + "\n")


def _truncate_log(path: Path, max_step: int) -> None:
    """Drop the rows of ``path`` whose ``step`` column exceeds ``max_step`` (what a resumed run will redo)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    if not lines:
        return
    col = lines[0].split("\t").index("step")
    keep = [lines[0]] + [ln for ln in lines[1:] if ln.strip() and int(ln.split("\t")[col]) <= max_step]
    atomic_write_text(path, "\n".join(keep) + "\n")


def read_training_checkpoint(path: str, flag: str) -> Dict[str, Any]:
    """A ``train.py`` checkpoint (``weights_only=True``), checked to be one."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{flag} {p}: file not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file is the user's file problem
        raise UserError(f"{flag} {p}: unreadable checkpoint ({type(err).__name__})") from None
    needed = ("state_dict", "optimizer", "epoch", "step", "micro", "rng", "args")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        raise UserError(f"{flag} {p}: not a train.py checkpoint (needs {', '.join(needed)}); "
                        "to start from other weights use --load_from or --classifier_ckpt")
    return ckpt


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def test_subset(dataset: Any, per_class: int) -> List[int]:
    """The first ``per_class`` indices of each class (``per_class`` 0: all), in dataset order."""
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


@torch.no_grad()
def evaluate(
    classifier: nn.Module,
    denoiser: nn.Module,
    loader: DataLoader,
    sigma: float,
    t_star: int,
    device: torch.device,
    precision: str,
    seed: int,
) -> tuple[int, int]:
    """(correct, total) of f(D(x + delta)) on this rank's share, delta ~ N(0, sigma^2) from a generator seeded
    by ``seed`` (the training RNG is not touched). Summed over ranks when distributed."""
    was_training = classifier.training
    classifier.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        noisy = x + sigma * torch.randn(x.shape, generator=gen, device=device, dtype=x.dtype)
        with autocast(device, precision):
            pred = classifier(denoiser.denoise(noisy, t_star)).argmax(-1)
        correct += (pred == y).sum()
        total += y.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(correct)
        dist.all_reduce(total)
    classifier.train(was_training)
    return int(correct), int(total)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def _build_classifier(arch: str, num_classes: int, ft_method: str, drop_path: float, lora_rank: int,
                      lora_alpha: float, checkpoint: Optional[str], flag: str, device: torch.device,
                      pretrained: bool = True) -> nn.Module:
    """``get_architecture`` with weights from ``checkpoint`` (else the pretrained ones when ``pretrained``),
    its errors naming ``flag``."""
    from classifier import get_architecture
    if checkpoint is not None and not Path(checkpoint).expanduser().exists():
        raise UserError(f"{flag} {checkpoint}: file not found")
    try:
        return get_architecture(arch, num_classes=num_classes, pretrained=pretrained and checkpoint is None, checkpoint=checkpoint,
                                ft_method=ft_method, lora_rank=lora_rank, lora_alpha=lora_alpha, drop_path=drop_path,
                                device=device)
    except UserError as err:
        raise UserError(str(err).replace("--classifier_ckpt", flag)) from None


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


def train(
    *,
    dataset: str,
    arch: Optional[str] = None,
    ft_method: str = "full",
    epochs: int = 30,
    warmup_epochs: float = 3,
    batch: int = 32,
    accum_iter: int = 1,
    lr: Optional[float] = None,
    blr: float = 1e-3,
    min_lr: float = 1e-6,
    train_noise_sd: float = 0.25,
    test_noise_sd: Optional[float] = None,
    eps: float = 64.0,
    num_steps: int = 4,
    lbd: float = 1.0,
    eps_double: bool = False,
    warmup_eps: int = 10000,
    layer_decay: float = 0.65,
    weight_decay: float = 0.04,
    weight_decay_end: Optional[float] = 0.4,
    use_fp16: bool = False,
    clip_grad: float = 0.3,
    drop_path: float = 0.2,
    num_noises: int = 4,
    warm_start: bool = True,
    resume: Optional[str] = None,
    load_from: Optional[str] = None,
    seed: int = 0,
    workers: int = 4,
    outdir: Optional[str] = None,
    device: Optional[str] = None,
    precision: str = "fp32",
    denoiser_ckpt: Optional[str] = None,
    classifier_ckpt: Optional[str] = None,
    data_dir: Optional[str] = None,
    download: bool = False,
    lora_rank: int = 4,
    lora_alpha: float = 4.0,
    max_steps: Optional[int] = None,
    ckpt_every_steps: int = 0,
    log_every: int = 10,
    test_per_class: Optional[int] = None,
    no_test: bool = False,
    full_attack: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Run FT-CADIS fine-tuning (arguments = the CLI flags, see ``--help``). Returns the final position and stats.

    ``eps`` is in the paper's units: eps/256 on the [-1, 1] scale, i.e. eps/512 on our [0, 1] pixels.
    """
    from datasets import get_dataset, get_num_classes
    from denoiser import load_denoiser
    from classifier import param_groups_lrd, count_parameters

    # ---- arguments
    config = {k: v for k, v in locals().items() if k not in ("get_dataset", "get_num_classes", "load_denoiser",
                                                             "param_groups_lrd", "count_parameters")}
    if use_fp16:
        if precision not in ("fp32", "fp16"):
            raise UserError(f"--use_fp16 true contradicts --precision {precision}; pass one of them")
        precision = "fp16"
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    ft_method = "full" if ft_method == "full-ft" else ft_method
    M = num_noises
    if M < 1:
        raise UserError(f"--num_noises {M}: must be >= 1")
    if batch < 1 or batch % M:
        raise UserError(f"--batch {batch} is not divisible by --num_noises {M} (each batch is split into "
                        f"{M} chunks of batch/M images, each denoised under M noises); use a multiple of {M}")
    for name, value, low in (("--accum_iter", accum_iter, 1), ("--epochs", epochs, 1), ("--num-steps", num_steps, 0),
                             ("--log_every", log_every, 1), ("--ckpt_every_steps", ckpt_every_steps, 0),
                             ("--workers", workers, 0)):
        if value < low:
            raise UserError(f"{name} {value}: must be >= {low}")
    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max_steps {max_steps}: must be >= 1")
    for name, value in (("--eps", eps), ("--lbd", lbd), ("--clip_grad", clip_grad), ("--blr", blr),
                        ("--warmup_epochs", warmup_epochs), ("--min_lr", min_lr)):
        if value < 0:
            raise UserError(f"{name} {value}: must be >= 0")
    if resume and load_from:
        raise UserError("--resume continues a run (weights, optimizer, position); --load_from starts a new run from "
                        "weights: pass only one of them")
    from datasets import DEFAULT_ARCH

    arch = arch or DEFAULT_ARCH.get(dataset)
    if arch is None:
        raise UserError(f"--dataset {dataset!r}: unknown dataset; choose one of {', '.join(DEFAULT_ARCH)}")
    test_noise_sd = train_noise_sd if test_noise_sd is None else test_noise_sd
    weight_decay_end = weight_decay if weight_decay_end is None else weight_decay_end
    if test_per_class is None:
        test_per_class = DEFAULT_TEST_PER_CLASS.get(dataset, 0)

    ckpt: Optional[Dict[str, Any]] = None
    if resume:
        ckpt = read_training_checkpoint(resume, "--resume")
        for key, value in (("dataset", dataset), ("arch", arch), ("ft_method", ft_method)):
            if ckpt.get(key) not in (None, value):
                raise UserError(f"--resume {resume}: the run used --{key} {ckpt[key]}, not {value}")
        if ckpt["args"].get("num_noises") not in (None, M):
            raise UserError(f"--resume {resume}: the run used --num_noises {ckpt['args']['num_noises']}, not {M}")
    if outdir is None:
        outdir = (os.path.dirname(os.path.abspath(resume)) if resume else os.path.join(
            "runs", "ft-cadis", dataset, ft_method, f"noise_{train_noise_sd}", f"lbd_{lbd}_eps_{eps:g}_M{M}_seed{seed}"))
    out = Path(outdir)

    # ---- processes, devices, seeds
    info = init_distributed(device)
    dev, rank, world = info.device, info.rank, info.world_size
    try:
        if not resume and ((out / "log.txt").exists() or (out / "log_steps.txt").exists()
                           or any(out.glob("checkpoint-*.pth.tar"))):
            raise UserError(f"--outdir {out} already holds a run (logs/checkpoints); continue it with --resume "
                            f"{out}/checkpoint-<N>.pth.tar or pick another --outdir")
        seed_everything(seed + rank)
        eff_batch = batch * accum_iter * world // M
        if lr is None:
            lr = blr * eff_batch / 256
        eps_pixels = eps / 512.0  # eps/256 on [-1, 1] = eps/512 on [0, 1]

        # ---- models
        num_classes = get_num_classes(dataset)
        if ckpt is not None:
            from classifier import has_lora_keys, load_timm_state_dict, to_timm_state_dict
            classifier = _build_classifier(arch, num_classes, ft_method, drop_path, lora_rank, lora_alpha,
                                           classifier_ckpt if arch == "hf_vit" else None, "--classifier_ckpt", dev,
                                           pretrained=False)
            if ft_method == "lora" and not has_lora_keys(ckpt["state_dict"]):
                raise UserError(f"--resume {resume}: no LoRA weights in the checkpoint, but --ft_method lora")
            load_timm_state_dict(classifier, to_timm_state_dict(ckpt["state_dict"]), source=f"--resume {resume}")
        elif load_from is not None:
            classifier = _build_classifier(arch, num_classes, ft_method, drop_path, lora_rank, lora_alpha, load_from,
                                           "--load_from", dev)
        else:
            classifier = _build_classifier(arch, num_classes, ft_method, drop_path, lora_rank, lora_alpha,
                                           classifier_ckpt, "--classifier_ckpt", dev)
        denoiser = load_denoiser(dataset, denoiser_ckpt, device=dev)
        prepare_inference_(denoiser, precision)  # frozen, only run under autocast(precision): weights in that dtype
        t_train, t_test = denoiser.timestep_for_sigma(train_noise_sd), denoiser.timestep_for_sigma(test_noise_sd)

        groups = param_groups_lrd(classifier, weight_decay=weight_decay, layer_decay=layer_decay)
        fast = {"fused": True}  # CUDA and CPU; on CPU ~3x faster than foreach for ViT-B (bench.py)
        optimizer = torch.optim.AdamW(groups, lr=lr, **fast)
        scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
        params = [p for g in groups for p in g["params"]]
        model: nn.Module = classifier
        if world > 1:
            model = DistributedDataParallel(classifier, device_ids=[dev.index] if dev.type == "cuda" else None)

        # ---- data
        train_set = get_dataset(dataset, "train", data_dir=data_dir, download=download)
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        iters = len(sampler) // batch
        if iters < 1:
            raise UserError(f"--batch {batch}: larger than this process's share of the training set "
                            f"({len(sampler)} images)")
        test_loader = None
        if not no_test:
            test_set = get_dataset(dataset, "test", data_dir=data_dir, download=download)
            test_idx = test_subset(test_set, test_per_class)[rank::world]
            test_loader = DataLoader(Subset(test_set, test_idx), batch_size=batch, shuffle=False,
                                     num_workers=workers, pin_memory=dev.type == "cuda")

        # ---- position
        start_epoch, step, start_micro = 0, 0, 0
        if ckpt is not None:
            _load_optimizer(optimizer, ckpt["optimizer"], resume)
            if ckpt.get("scaler") and scaler.is_enabled():
                scaler.load_state_dict(ckpt["scaler"])
            start_epoch, step, start_micro = int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt["micro"])
            saved = ckpt["args"]
            same_layout = len(ckpt["rng"]) == world and saved.get("batch") == batch and saved.get("seed") == seed
            if start_micro and not same_layout:
                raise UserError(f"--resume {resume}: a mid-epoch checkpoint continues only with the same number of "
                                f"processes ({len(ckpt['rng'])}), --batch ({saved.get('batch')}) and --seed "
                                f"({saved.get('seed')})")
            if len(ckpt["rng"]) == world:
                set_rng_state(ckpt["rng"][rank], dev)
            else:
                seed_everything(seed + rank + 1000 * step)
            if info.is_main:
                for name in ("log.txt", "log_steps.txt"):
                    _truncate_log(out / name, step)
        if max_steps is not None and step >= max_steps:
            if info.is_main:
                print(f"--resume {resume}: already at step {step} >= --max_steps {max_steps}; nothing to do")
            return {"epoch": start_epoch, "step": step, "checkpoint": resume, "classifier": classifier}
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            print(f"FT-CADIS {dataset}/{arch} ({ft_method}): {count_parameters(classifier, trainable_only=True):,} "
                  f"trainable of {count_parameters(classifier):,} parameters; {world} process(es) on {dev.type}, "
                  f"{precision}")
            print(f"  sigma {train_noise_sd} (t*={t_train}), test sigma {test_noise_sd} (t*={t_test}); M={M}, "
                  f"lbd={lbd}, eps={eps:g}/256 on [-1,1] = {eps_pixels:.4g} pixels, {num_steps} attack steps")
            print(f"  lr {lr:.3g} (effective batch {eff_batch}), {iters} iterations/epoch, "
                  f"from epoch {start_epoch + 1} step {step}" + (f", stopping at step {max_steps}" if max_steps else ""))

        def save(name: str, epoch_done: int, micro: int) -> Path:
            rngs = gather_rng_states(dev)
            path = out / name
            if info.is_main:
                atomic_torch_save({
                    "epoch": epoch_done, "step": step, "micro": micro, "arch": arch, "dataset": dataset,
                    "ft_method": ft_method, "state_dict": classifier.model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": rngs,
                    "args": {k: v for k, v in config.items() if v is None or isinstance(v, (str, int, float, bool))},
                    "world_size": world,
                }, path)
            return path

        # ---- loop
        stats = {}
        last_ckpt: Optional[Path] = Path(resume) if resume else None
        stopped = False
        for epoch in range(start_epoch, epochs):
            t0 = time.time()
            skip_micro = start_micro if epoch == start_epoch else 0
            first_batch = skip_micro // M
            sampler.set_epoch(epoch)
            indices = list(sampler)[first_batch * batch: iters * batch]
            loader = DataLoader(Subset(train_set, indices), batch_size=batch, shuffle=False, drop_last=True,
                                num_workers=workers, pin_memory=dev.type == "cuda",
                                generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            scale = 2.0 if eps_double and epoch >= warmup_eps else 1.0
            model.train()
            sums = torch.zeros(6, dtype=torch.float64, device=dev)  # loss, sce, madv, acc, masked-in, micro-steps
            window = torch.zeros(6, dtype=torch.float64, device=dev)
            cur_lr = cur_wd = 0.0
            bar = tqdm(loader, total=iters, initial=first_batch, desc=f"epoch {epoch + 1}/{epochs}",
                       disable=not (progress and info.is_main), dynamic_ncols=True, leave=False)
            micro = skip_micro
            for i, (x, y) in enumerate(bar, start=first_batch):
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                n = batch // M
                for j in range(M):
                    k = i * M + j  # micro-step within the epoch
                    if k < skip_micro:
                        continue
                    if k % accum_iter == 0:
                        prog = epoch + (i + j / M) / iters
                        cur_lr = lr_at(prog, lr, min_lr, warmup_epochs, epochs)
                        cur_wd = cosine_at(prog, weight_decay, weight_decay_end, epochs)
                        set_lr_wd(optimizer, cur_lr, cur_wd)
                        optimizer.zero_grad(set_to_none=True)
                        window.zero_()
                    sync = (k + 1) % accum_iter == 0
                    clean = x[j * n:(j + 1) * n].repeat(M, 1, 1, 1)
                    targets = y[j * n:(j + 1) * n]
                    with (model.no_sync() if world > 1 and not sync else contextlib.nullcontext()):
                        with autocast(dev, precision):
                            with torch.no_grad():
                                noisy = clean + train_noise_sd * torch.randn_like(clean)
                                denoised = denoiser.denoise(noisy, t_train).to(clean.dtype)
                            loss, loss_sce, loss_madv, correct = cadis_objective(
                                classifier, clean, denoised, targets, M, lbd, eps_pixels * scale, num_steps,
                                warm_start=warm_start, masked_only=not full_attack, forward_model=model)
                        cur = torch.stack([loss.detach().double(), loss_sce.detach().double().mean(),
                                           loss_madv.detach().double().mean(), correct.double().mean(),
                                           correct.all(0).double().mean(), torch.ones((), device=dev,
                                                                                      dtype=torch.float64)])
                        if world > 1:
                            dist.all_reduce(cur)
                            cur[:5] /= world
                            cur[5] = 1
                        if not math.isfinite(float(cur[0])):
                            raise NonFiniteLossError(
                                f"non-finite loss ({float(cur[0])}) at epoch {epoch + 1}, step {step + 1}; stopping. "
                                f"Nothing was saved for this state; the last good checkpoint is "
                                f"{last_ckpt if last_ckpt else '(none yet)'}. Try a lower --blr/--lr, --clip_grad, "
                                "or --precision fp32/bf16.")
                        scaler.scale(loss / accum_iter).backward()
                    window += cur
                    sums += cur
                    micro = k + 1
                    if not sync:
                        continue
                    if clip_grad > 0:
                        scaler.unscale_(optimizer)
                        clip_grad_per_param(params, clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    step += 1
                    w = (window[:5] / window[5]).tolist()
                    if info.is_main and (step % log_every == 0 or step == max_steps):
                        _append(out / "log_steps.txt", STEP_LOG_HEADER,
                                f"{step}\t{epoch + 1}\t{cur_lr:.6g}\t{w[0]:.8g}\t{w[1]:.8g}\t{w[2]:.8g}\t{w[3]:.6f}"
                                f"\t{w[4]:.6f}")
                        bar.set_postfix(loss=f"{w[0]:.4f}", acc=f"{w[3]:.3f}", masked=f"{w[4]:.2f}", lr=f"{cur_lr:.2e}")
                    if max_steps is not None and step >= max_steps:
                        stopped = True
                        break
                    if ckpt_every_steps and step % ckpt_every_steps == 0 and micro < iters * M:
                        last_ckpt = save(f"checkpoint-step{step}.pth.tar", epoch, micro)
                if stopped:
                    break
            bar.close()
            complete = micro >= iters * M
            avg = (sums[:5] / sums[5].clamp_min(1)).tolist()
            test_acc = float("nan")
            if test_loader is not None:
                c, t = evaluate(classifier, denoiser, test_loader, test_noise_sd, t_test, dev, precision, seed)
                test_acc = c / max(t, 1)
            stats = {"epoch": epoch + 1, "step": step, "lr": cur_lr, "train_loss": avg[0], "train_sce": avg[1],
                     "train_madv": avg[2], "train_acc": avg[3], "masked_in": avg[4], "test_acc": test_acc,
                     "time": time.time() - t0}
            if info.is_main:
                _append(out / "log.txt", LOG_HEADER,
                        f"{epoch + 1}\t{step}\t{cur_lr:.6g}\t{cur_wd:.6g}\t{avg[0]:.6g}\t{avg[1]:.6g}\t{avg[2]:.6g}"
                        f"\t{avg[3]:.4f}\t{avg[4]:.4f}\t{test_acc:.4f}\t{stats['time']:.1f}")
                print(f"epoch {epoch + 1}{'' if complete else ' (partial)'}: step {step}, loss {avg[0]:.4f} "
                      f"(sce {avg[1]:.4f}, madv {avg[2]:.4f}), train acc {avg[3]:.3f}, masked-in {avg[4]:.2f}, "
                      f"test acc {test_acc:.3f}, {stats['time']:.0f}s")
            if complete and (epoch == 0 or (epoch + 1) % 5 == 0 or epoch + 1 == epochs):
                last_ckpt = save(f"checkpoint-{epoch + 1}.pth.tar", epoch + 1, 0)
            if stopped:
                last_ckpt = save(f"checkpoint-step{step}.pth.tar", epoch + 1 if complete else epoch,
                                 0 if complete else micro)
                break
        if info.is_main and last_ckpt is not None:
            print(f"last checkpoint: {last_ckpt}")
        return {**stats, "checkpoint": str(last_ckpt) if last_ckpt else None, "classifier": classifier}
    finally:
        cleanup_distributed()


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="FT-CADIS fine-tuning of an off-the-shelf classifier on denoised images (run under torchrun for "
                    "several GPUs/processes).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", required=True, help="cifar10, imagenet or digits")
    a("--arch", default=None, help="classifier architecture (default: cifar10_vit_base / imagenet_vit_base / "
                                   "digits_vit_tiny by dataset; or any timm model name)")
    a("--ft_method", default="full", choices=("full", "full-ft", "lora"), help="full fine-tuning or LoRA on q/v")
    a("--epochs", type=int, default=30, help="epochs")
    a("--warmup_epochs", type=float, default=3, help="epochs of linear lr warmup")
    a("--batch", type=int, default=32, help="images per loader batch and process (split into --num_noises chunks)")
    a("--accum_iter", type=int, default=1, help="micro-steps (chunks) accumulated per optimizer step")
    a("--lr", type=float, default=None, help="absolute lr (default: blr x effective batch / 256)")
    a("--blr", type=float, default=1e-3, help="base lr; effective batch = batch x accum_iter x world_size / M")
    a("--min_lr", type=float, default=1e-6, help="final lr of the cosine schedule")
    a("--train_noise_sd", type=float, default=0.25, help="sigma of the training noise (pixel scale [0, 1])")
    a("--test_noise_sd", type=float, default=None, help="sigma of the per-epoch test accuracy (default: train's)")
    a("--eps", type=float, default=64.0,
      help="attack radius in the paper's units: eps/256 on the [-1, 1] scale = eps/512 on [0, 1] pixels "
           "(64 -> 0.25 on [-1, 1] = 0.125 pixels)")
    a("--num-steps", "--num_steps", dest="num_steps", type=int, default=4, help="attack steps")
    a("--lbd", type=float, default=1.0, help="lambda, the weight of the masked adversarial loss")
    a("--eps_double", action="store_true", help="double eps from epoch --warmup_eps on")
    a("--warmup_eps", type=int, default=10000, help="0-based epoch from which --eps_double applies")
    a("--layer_decay", type=float, default=0.65, help="layer-wise lr decay")
    a("--weight_decay", type=float, default=0.04, help="initial weight decay (cosine schedule)")
    a("--weight_decay_end", type=float, default=0.4, help="final weight decay")
    a("--use_fp16", type=bool_flag, nargs="?", const=True, default=False,
      help="fp16 autocast with loss scaling (the paper's --use_fp16 true); same as --precision fp16")
    a("--precision", default="fp32", choices=PRECISIONS, help="autocast: fp32 (exact), bf16 (no scaler), fp16")
    a("--clip_grad", type=float, default=0.3, help="per-parameter gradient norm cap (0: off)")
    a("--drop_path", type=float, default=0.2, help="drop path rate")
    a("--num_noises", type=int, default=4, help="M, noises (denoised copies) per image")
    a("--warm_start", type=bool_flag, nargs="?", const=True, default=True,
      help="count the lowest-CE copy of an image with no correct copy (--warm_start false: off)")
    a("--resume", default=None, metavar="CKPT", help="continue a run from its checkpoint (weights, optimizer, "
                                                     "schedule position, RNG)")
    a("--load_from", default=None, metavar="CKPT", help="start a new run from these classifier weights (a "
                                                        "train.py checkpoint or a state dict)")
    a("--seed", type=int, default=0, help="seed (process r uses seed + r)")
    a("--workers", type=int, default=4, help="data loading workers per process")
    a("--outdir", default=None, help="output folder (default: runs/ft-cadis/...; with --resume: the checkpoint's)")
    a("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    a("--denoiser_ckpt", default=None, help="diffusion checkpoint (default: models/<official file name>)")
    a("--classifier_ckpt", default=None, help="off-the-shelf classifier weights (default: the architecture's "
                                              "pretrained weights; digits: models/digits_vit_tiny.pt)")
    a("--data_dir", default=None, help="dataset root (else the dataset's environment variable)")
    a("--download", action="store_true", help="download CIFAR-10 if missing")
    a("--lora_rank", type=int, default=4, help="LoRA rank")
    a("--lora_alpha", type=float, default=4.0, help="LoRA alpha")
    a("--max_steps", type=int, default=None, help="stop after this many optimizer steps in total (smoke runs); "
                                                  "writes checkpoint-step<N>.pth.tar")
    a("--ckpt_every_steps", type=int, default=0, help="also checkpoint every N optimizer steps (0: off)")
    a("--log_every", type=int, default=10, help="write log_steps.txt every N optimizer steps")
    a("--test_per_class", type=int, default=None,
      help="test images per class for the per-epoch accuracy (default: cifar10 100, imagenet 5, digits all)")
    a("--no_test", action="store_true", help="skip the per-epoch test accuracy")
    a("--full_attack", action="store_true", help="attack every image, not only the masked-in ones (same loss, "
                                                 "slower; for comparison)")
    a("--no_progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    try:
        return train(**vars(args))
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    run_cli(main)
