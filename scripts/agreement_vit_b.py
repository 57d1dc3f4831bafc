"""Does bf16 keep a *trained* ViT-B/16's predictions? The agreement check of bench.py with trained weights.

bench.py measures the fast path's agreement with fp32 on the CIFAR-10 configuration with *random* weights, whose
classes are nearly tied (median top-1/top-2 logit margin ~0.1), so that the small bf16 logit error flips a few
per cent of the samples. No trained CIFAR-10 ViT-B can be downloaded here, so this script makes one that is
trained: the ``cifar10_vit_base`` structure (ViT-B/16: depth 12, width 768, 12 heads, LayerNorm eps 1e-12,
exact GELU, mean = std = 0.5) at ``--img_size`` px, trained from random init with cross-entropy on the embedded
digits (train split, clean images, random shifts; bf16 autocast), then measures on the digits test split, under
denoised smoothing with the shipped digits denoiser at sigma:

* clean and denoised-noisy accuracy of the trained model (fp32), and its median logit margin;
* the agreement of the fast path (``fast.fast_model``: what ``certify.py --precision bf16`` runs; with
  ``--compile`` also the compiled one) with fp32 on the same noise (``fast.agreement``).

The default input size is smaller than CIFAR-10's 224 px (64 px = 16 tokens + class token) so that training takes
minutes on a CPU; depth, width and the precision of every layer are those of the CIFAR-10 classifier. For the
CIFAR-10 classifier's own input size, ``--init`` fine-tunes the 64-px model at 224 px (196 tokens + class token; the
position embedding is resampled to the new grid), which costs about 9 minutes an epoch on 2 cores (3 epochs: 90.6 %
test accuracy, README "Performance"):

    python scripts/agreement_vit_b.py --epochs 30 --lr 1e-4 --compile --json runs/agreement_vit_b.json
    python scripts/agreement_vit_b.py --img_size 224 --init runs/vit_b_digits.pt --checkpoint runs/vit_b_digits_224.pt \
        --epochs 3 --warmup_epochs 0 --lr 1e-4 --batch_size 32 --per_image 2 --compile --json runs/agreement_vit_b_224.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "scripts"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from train_demo_models import accuracy, load_split, train_classifier  # noqa: E402

import fast  # noqa: E402
from classifier import CIFAR10_HF_CONFIG, ImageClassifier, build_vit_from_hf_config  # noqa: E402
from core import DenoisedClassifier  # noqa: E402
from denoiser import load_denoiser  # noqa: E402
from runkit.cli import run_cli  # noqa: E402
from runkit.devices import resolve_device, torch_threads  # noqa: E402
from runkit.errors import UserError  # noqa: E402
from runkit.files import atomic_torch_save  # noqa: E402


def vit_b(img_size: int, num_classes: int = 10) -> ImageClassifier:
    """The ``cifar10_vit_base`` structure (the paper's HF ViT-B/16 config) at ``img_size`` px, random init."""
    if img_size % 16:
        raise UserError(f"--img_size {img_size}: must be a multiple of the patch size 16")
    model = build_vit_from_hf_config({**CIFAR10_HF_CONFIG, "image_size": img_size}, num_classes=num_classes)
    return ImageClassifier(model, img_size, (0.5,) * 3, (0.5,) * 3)


def load_resampled(classifier: ImageClassifier, path: Path) -> None:
    """Load a ViT-B state dict saved by this script at any input size into ``classifier``; the position embedding
    (class token + g×g grid) is resampled bicubically to the classifier's grid (timm's ``resample_abs_pos_embed``)."""
    from timm.layers import resample_abs_pos_embed
    state = torch.load(path, map_location="cpu", weights_only=True)
    grid = classifier.model.patch_embed.grid_size
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(grid), num_prefix_tokens=1)
    classifier.model.load_state_dict(state)


@torch.no_grad()
def denoised_accuracy_and_margin(denoiser, classifier: ImageClassifier, x: torch.Tensor, y: torch.Tensor,
                                 sigma: float, seed: int, batch_size: int = 256) -> tuple[float, float]:
    """fp32 accuracy of f(D(x + sigma·delta)) (one noise draw per image) and the median top-1/top-2 logit margin."""
    model = DenoisedClassifier(denoiser, classifier, sigma).eval()
    g = torch.Generator().manual_seed(seed)
    logits = torch.cat([model(xb + sigma * torch.randn(xb.shape, generator=g)) for xb in x.split(batch_size)])
    top2 = logits.topk(2, dim=1).values
    return float((logits.argmax(1) == y).float().mean()), float((top2[:, 0] - top2[:, 1]).median())


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--img_size", type=int, default=64, help="ViT-B/16 input size (default 64: 17 tokens)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW peak lr (default 1e-4; then cosine to 0)")
    p.add_argument("--warmup_epochs", type=int, default=3, help="linear lr warmup epochs (default 3)")
    p.add_argument("--init", default=None,
                   help="start training from this saved ViT-B (any --img_size; position embedding resampled)")
    p.add_argument("--sigma", type=float, default=0.25, help="noise level of the agreement check (default 0.25)")
    p.add_argument("--per_image", type=int, default=8, help="noise samples per test image")
    p.add_argument("--test_images", type=int, default=None, help="the first K test images (default: all 360)")
    p.add_argument("--compile", action="store_true", help="also check the compiled fast path")
    p.add_argument("--checkpoint", default="runs/vit_b_digits.pt",
                   help="the trained model: loaded when it exists, else trained and saved there")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the results here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = get_parser().parse_args(argv)
    for flag in ("epochs", "batch_size", "per_image", "test_images"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1")
    if args.warmup_epochs < 0:
        raise UserError("--warmup_epochs must be >= 0")
    if args.init is not None and not Path(args.init).is_file():
        raise UserError(f"--init {args.init}: no such file")
    device = resolve_device(args.device)
    denoiser = load_denoiser("digits", device=device)  # the shipped, trained digits denoiser
    x_train, y_train = load_split("train")
    x_test, y_test = load_split("test")
    x_test, y_test = x_test[:args.test_images], y_test[:args.test_images]
    result: dict[str, Any] = {"img_size": args.img_size, "sigma": args.sigma, "torch": torch.__version__}
    with torch_threads(args.threads):
        result["threads"] = torch.get_num_threads()
        classifier = vit_b(args.img_size)
        ckpt = Path(args.checkpoint)
        if ckpt.is_file():
            classifier.model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
            result["training"] = json.loads(ckpt.with_suffix(".json").read_text()) \
                if ckpt.with_suffix(".json").is_file() else {"loaded": str(ckpt)}
            print(f"loaded {ckpt}", flush=True)
        else:
            if args.init is not None:
                load_resampled(classifier, Path(args.init))
            print(f"training ViT-B/16 at {args.img_size} px on digits ({args.epochs} epochs"
                  f"{', from ' + args.init if args.init else ''})", flush=True)
            classifier, record = train_classifier(
                x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                device=device, classifier=classifier, precision="bf16", log_every=1,
                warmup_epochs=args.warmup_epochs)
            record["init"] = args.init
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(classifier.model.state_dict(), ckpt)
            ckpt.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
            result["training"] = record
        classifier = classifier.to(device).eval().requires_grad_(False)
        result["clean_accuracy"] = accuracy(classifier, x_test, y_test)
        result["denoised_accuracy"], result["margin_median"] = denoised_accuracy_and_margin(
            denoiser, classifier, x_test, y_test, args.sigma, args.seed + 1)
        print(f"test accuracy: clean {result['clean_accuracy']:.4f}, denoised at sigma {args.sigma} "
              f"{result['denoised_accuracy']:.4f}; median logit margin {result['margin_median']:.2f}", flush=True)
        result["agreement"] = {}
        for compiled in ([False, True] if args.compile else [False]):
            label = "bf16 compiled" if compiled else "bf16"
            quick = fast.fast_model(denoiser, classifier, args.sigma, "bf16", channels_last=True, compile=compiled,
                                    compile_mode=None)
            t0 = time.perf_counter()
            stats = fast.agreement(denoiser, classifier, quick, "bf16", args.sigma, x_test.to(device),
                                    args.per_image, 256, args.seed + 2)
            stats["seconds"] = time.perf_counter() - t0
            result["agreement"][label] = stats
            print(f"agreement {label} vs fp32: {100 * stats['agreement']:.2f} % of {stats['samples']} samples; "
                  f"max |dlogit| {stats['logit_max_abs_diff']:.4f}, median margin {stats['margin_median']:.2f}",
                  flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    run_cli(main)
