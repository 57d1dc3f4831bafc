"""Train the two small models the embedded digits demo ships in ``models/``, reproducibly, on CPU.

* ``models/digits_denoiser.pt``: the ``"digits"`` configuration of ``denoiser.DENOISER_CONFIGS`` (our UNet, cosine
  schedule, T = 4000, rescaled timesteps), trained as a DDPM ε-predictor: x0 in [−1, 1], t ~ schedule,
  x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε, loss = ||ε − ε̂(x_t, t·1000/T)[:, :3]||². Half of each batch draws t
  uniformly from 1..T−1, the other half from the t range of the pixel-scale noise levels σ in [0.2, 1.0]
  (sqrt((1 − ᾱ_t)/ᾱ_t) = 2σ), where denoised smoothing uses the model. The learned-variance output channels
  3..5 get no loss and stay at their initialisation: one-shot denoising never reads them.
  The weights saved are an exponential moving average (EMA) of the training weights.
* ``models/digits_vit_tiny.pt``: the ``digits_vit_tiny`` timm ViT trained with cross-entropy on the clean train
  split (random shifts of up to 2 px), i.e. an "off-the-shelf" classifier that never saw noise.

Both are fp32 state dicts (``load_denoiser("digits", path)`` / ``get_architecture("digits_vit_tiny",
checkpoint=path)`` read them with ``weights_only=True``). ``models/digits_metrics.json`` records how they were trained,
their training time and their quality on the test split (clean accuracy; one-shot denoising MSE / PSNR at
σ = 0.25 / 0.5 / 1.0 and the classifier's accuracy on the denoised noisy images).

    python scripts/train_demo_models.py                 # both models, 1 thread, seed 0
    python scripts/train_demo_models.py --what classifier --outdir /tmp/m

Reproducible: fixed seeds; on CPU with the same ``--threads`` and the same torch build the weights come out the
same run to run (different thread counts change floating-point reduction order, hence the last bits).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from classifier import ImageClassifier, get_architecture  # noqa: E402
from datasets import get_dataset  # noqa: E402
from denoiser import DiffusionDenoiser, build_denoiser, load_denoiser  # noqa: E402
from runkit.cli import run_cli  # noqa: E402
from runkit.devices import autocast, resolve_device  # noqa: E402
from runkit.errors import UserError  # noqa: E402
from runkit.files import atomic_torch_save  # noqa: E402

DENOISER_FILE = "digits_denoiser.pt"
CLASSIFIER_FILE = "digits_vit_tiny.pt"
METRICS_FILE = "digits_metrics.json"
EVAL_SIGMAS = (0.25, 0.5, 1.0)


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits ``split`` as ([n, 3, 16, 16] in [0, 1], [n] labels)."""
    dataset = get_dataset("digits", split)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by an integer (dy, dx) in [−max_shift, max_shift]², filling with zeros (background)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def cosine_lr(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warmup for ``warmup`` steps, then half-cycle cosine from ``lr`` to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def timestep_range(denoiser: DiffusionDenoiser, sigma_min: float, sigma_max: float) -> tuple[int, int]:
    """[t(σ_min), t(σ_max)]: the timesteps whose noise level sqrt((1 − ᾱ)/ᾱ)/2 covers σ_min..σ_max."""
    return denoiser.timestep_for_sigma(sigma_min), denoiser.timestep_for_sigma(sigma_max)


def train_denoiser(
        x_train: torch.Tensor,
        steps: int = 800,
        batch_size: int = 128,
        lr: float = 2e-3,
        warmup: int = 100,
        ema_decay: float = 0.995,
        focus_sigmas: tuple[float, float] = (0.2, 1.0),
        focus_fraction: float = 0.5,
        seed: int = 0,
        device: torch.device = torch.device("cpu"),
        log_every: int = 100,
) -> tuple[DiffusionDenoiser, dict[str, Any]]:
    """DDPM ε-prediction training of ``build_denoiser("digits")`` on ``x_train`` (pixel scale [0, 1]).

    Loss = mean ||ε − ε̂(sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε, τ_t)[:, :3]||², x0 = 2x − 1, AdamW, warmup + cosine lr.
    Returns the EMA denoiser (eval mode) and a training record.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    denoiser = build_denoiser("digits").to(device)
    unet = denoiser.unet.train()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    alphas_cumprod = torch.as_tensor(denoiser._alphas_cumprod, dtype=torch.float32)
    T = denoiser.num_timesteps
    t_lo, t_hi = timestep_range(denoiser, *focus_sigmas)
    n_focus = int(round(batch_size * focus_fraction))
    x0_all = x_train.mul(2).sub(1)
    start, cpu_start, losses = time.time(), time.process_time(), []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)
        idx = torch.randint(0, len(x0_all), (batch_size,), generator=generator)
        x0 = x0_all[idx]
        t = torch.cat([torch.randint(t_lo, t_hi + 1, (n_focus,), generator=generator),
                       torch.randint(1, T, (batch_size - n_focus,), generator=generator)])
        eps = torch.randn(x0.shape, generator=generator)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        tau = t.float() * (1000.0 / T) if denoiser.rescale_timesteps else t.float()
        eps_hat = unet(x_t.to(device), tau.to(device))[:, :3]
        loss = F.mse_loss(eps_hat, eps.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(ema_decay).add_(v.detach(), alpha=1 - ema_decay)
                else:
                    ema[k].copy_(v)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(f"  denoiser step {step + 1}/{steps}  loss {recent:.4f}  ({time.time() - start:.0f} s)", flush=True)
    unet.load_state_dict(ema)
    record = dict(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
                  focus_sigmas=list(focus_sigmas), focus_timesteps=[t_lo, t_hi], focus_fraction=focus_fraction,
                  seed=seed, final_loss=sum(losses[-log_every:]) / len(losses[-log_every:]),
                  train_seconds=round(time.time() - start, 1),
                  cpu_seconds=round(time.process_time() - cpu_start, 1))
    return denoiser.eval().requires_grad_(False), record


def train_classifier(
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        epochs: int = 60,
        batch_size: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: int = 3,
        max_shift: int = 2,
        label_smoothing: float = 0.1,
        seed: int = 0,
        device: torch.device = torch.device("cpu"),
        classifier: Optional[ImageClassifier] = None,
        precision: str = "fp32",
        log_every: int = 10,
) -> tuple[ImageClassifier, dict[str, Any]]:
    """Cross-entropy training of ``classifier`` (default: a random-init ``digits_vit_tiny``) on clean images;
    AdamW, warmup + cosine lr, autocast ``precision`` (fp32 for the shipped model)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if classifier is None:
        classifier = get_architecture("digits_vit_tiny", device=device)
    classifier = classifier.to(device).train()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total, start, cpu_start = epochs * steps_per_epoch, time.time(), time.process_time()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        running, seen = 0.0, 0
        for i in range(0, len(order), batch_size):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, lr, warmup_epochs * steps_per_epoch)
            idx = order[i:i + batch_size]
            x = random_shift(x_train[idx], max_shift, generator).to(device)
            with autocast(device, precision):
                loss = F.cross_entropy(classifier(x), y_train[idx].to(device), label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(idx)
            seen += len(idx)
            step += 1
        if (epoch + 1) % log_every == 0 or epoch + 1 == epochs:
            print(f"  classifier epoch {epoch + 1}/{epochs}  loss {running / seen:.4f}  ({time.time() - start:.0f} s)",
                  flush=True)
    record = dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                  max_shift=max_shift, label_smoothing=label_smoothing, seed=seed, precision=precision,
                  train_seconds=round(time.time() - start, 1),
                  cpu_seconds=round(time.process_time() - cpu_start, 1))
    return classifier.eval().requires_grad_(False), record


@torch.no_grad()
def accuracy(classifier: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``classifier`` on images ``x`` ([0, 1] scale)."""
    device = next(classifier.parameters()).device
    correct = sum(int((classifier(x[i:i + batch_size].to(device)).argmax(1).cpu() == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


@torch.no_grad()
def denoise_quality(denoiser: DiffusionDenoiser, x: torch.Tensor, sigma: float, seed: int = 1,
                    batch_size: int = 500) -> tuple[torch.Tensor, dict[str, float]]:
    """One-shot denoise x + δ, δ ~ N(0, σ²I) at t* = t(σ): (denoised images, MSE / PSNR of noisy and denoised)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(denoiser.parameters()).device
    noisy = x + sigma * torch.randn(x.shape, generator=generator)
    t_star = denoiser.timestep_for_sigma(sigma)
    denoised = torch.cat([denoiser.denoise(noisy[i:i + batch_size].to(device), t_star).cpu()
                          for i in range(0, len(x), batch_size)])
    mse_noisy = float((noisy - x).pow(2).mean())
    mse = float((denoised - x).pow(2).mean())
    return denoised, dict(sigma=sigma, t_star=t_star, mse_noisy=mse_noisy, psnr_noisy=-10 * math.log10(mse_noisy),
                          mse_denoised=mse, psnr_denoised=-10 * math.log10(mse))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--what", choices=("both", "denoiser", "classifier"), default="both",
                        help="which model to train (the other one is loaded from --outdir for the evaluation)")
    parser.add_argument("--outdir", default=str(REPO / "models"), help="where the weights and metrics go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (part of the reproducibility)")
    parser.add_argument("--device", default="cpu", help="cpu (reproducible, as shipped) or cuda")
    parser.add_argument("--denoiser_steps", type=int, default=800)
    parser.add_argument("--denoiser_batch", type=int, default=128)
    parser.add_argument("--denoiser_lr", type=float, default=2e-3)
    parser.add_argument("--classifier_epochs", type=int, default=60)
    parser.add_argument("--classifier_lr", type=float, default=1e-3)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = get_parser().parse_args(argv)
    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be >= 1")
    for flag in ("denoiser_steps", "denoiser_batch", "classifier_epochs"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be >= 1")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    metrics_path = outdir / METRICS_FILE
    metrics: dict[str, Any] = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics.update(threads=args.threads, device=str(device), torch=torch.__version__)
    x_train, y_train = load_split("train")
    x_test, y_test = load_split("test")
    print(f"digits: {len(x_train)} train / {len(x_test)} test images, {tuple(x_train.shape[1:])}; "
          f"{args.threads} threads on {device}", flush=True)

    if args.what in ("both", "classifier"):
        print(f"training the classifier digits_vit_tiny ({args.classifier_epochs} epochs)", flush=True)
        classifier, record = train_classifier(x_train, y_train, epochs=args.classifier_epochs, lr=args.classifier_lr,
                                              seed=args.seed, device=device)
        atomic_torch_save({k: v.detach().cpu().float().contiguous() for k, v in classifier.model.state_dict().items()},
                          outdir / CLASSIFIER_FILE)
        metrics["classifier"] = record
    classifier = None
    if (outdir / CLASSIFIER_FILE).is_file():
        classifier = get_architecture("digits_vit_tiny", checkpoint=outdir / CLASSIFIER_FILE, device=device).eval()
        metrics.setdefault("classifier", {})
        metrics["classifier"]["parameters"] = sum(p.numel() for p in classifier.parameters())
        metrics["classifier"]["train_accuracy"] = accuracy(classifier, x_train, y_train)
        metrics["classifier"]["test_accuracy"] = accuracy(classifier, x_test, y_test)
        print(f"classifier: clean accuracy train {metrics['classifier']['train_accuracy']:.4f}, "
              f"test {metrics['classifier']['test_accuracy']:.4f}", flush=True)

    if args.what in ("both", "denoiser"):
        print(f"training the denoiser 'digits' ({args.denoiser_steps} steps of {args.denoiser_batch})", flush=True)
        denoiser, record = train_denoiser(x_train, steps=args.denoiser_steps, batch_size=args.denoiser_batch,
                                          lr=args.denoiser_lr, seed=args.seed, device=device)
        atomic_torch_save({k: v.detach().cpu().float().contiguous() for k, v in denoiser.unet.state_dict().items()},
                          outdir / DENOISER_FILE)
        metrics["denoiser"] = record
    if not (outdir / DENOISER_FILE).is_file():
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"no {outdir / DENOISER_FILE} yet: denoising quality not measured", flush=True)
        return metrics
    denoiser = load_denoiser("digits", outdir / DENOISER_FILE, device=device)
    metrics.setdefault("denoiser", {})
    metrics["denoiser"]["parameters"] = sum(p.numel() for p in denoiser.unet.parameters())
    quality = []
    for sigma in EVAL_SIGMAS:
        denoised, q = denoise_quality(denoiser, x_test, sigma)
        noisy = x_test + sigma * torch.randn(x_test.shape, generator=torch.Generator().manual_seed(1))
        line = (f"sigma {sigma}: t*={q['t_star']}  PSNR noisy {q['psnr_noisy']:.2f} dB -> denoised "
                f"{q['psnr_denoised']:.2f} dB (MSE {q['mse_denoised']:.4f})")
        if classifier is not None:
            q["classifier_accuracy_denoised"] = accuracy(classifier, denoised, y_test)
            q["classifier_accuracy_noisy"] = accuracy(classifier, noisy, y_test)
            line += (f"; classifier accuracy on noisy {q['classifier_accuracy_noisy']:.3f}, "
                     f"on denoised {q['classifier_accuracy_denoised']:.3f}")
        quality.append(q)
        print(line, flush=True)
    metrics["denoiser"]["test_quality"] = quality
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {metrics_path} (weights in {outdir})", flush=True)
    return metrics


if __name__ == "__main__":
    run_cli(main)
