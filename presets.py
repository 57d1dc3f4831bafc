"""The paper's settings per dataset, in one place: what certify.py, train.py, bench.py, demo.py and the docs default to.

One frozen :class:`Preset` per dataset (``cifar10``, ``imagenet``, ``digits``): the data (classes, image size), the
models (default classifier architecture, the denoiser configuration that fixes t*), the certification protocol
(N0, N, alpha, which test images), the radii of the paper's tables, the per-epoch test subset, and the fine-tuning
hyper-parameters (:class:`TrainPreset`). Sources: docs/METHOD.md §4 and the paper's code (its launchers
``train_cifar10.sh`` / ``train_imagenet.sh`` and the commands of its README; where the two differ, ImageNet's
``--batch`` 16 and weight decays, the README's command is taken, as in our ``train_imagenet.sh``).

``train.py`` without flags keeps the paper's ``train.py`` defaults (:data:`TRAIN_DEFAULTS`; the paper's runs pass
their settings through the launchers, whose flags ``tests/test_presets.py`` checks against :attr:`Preset.train`),
except lambda: ``--lbd`` left out is the dataset's :attr:`TrainPreset.lbd` (CIFAR-10 4.0, ImageNet 2.0, digits 1.0).
``digits`` is the embedded demo's data set; it has no paper values, its training preset is train.py's defaults.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

N0 = 100  # CERTIFY's selection samples (Cohen et al.; the paper's certify.py), every dataset
ALPHA = 0.001  # the failure probability of every certificate, every dataset


@dataclass(frozen=True)
class TrainPreset:
    """Fine-tuning hyper-parameters (train.py's flags of the same names; ``noise_sd``: the launchers' ``--noise``).

    Effective batch = batch x accum_iter x GPUs / num_noises (128 with the paper's 4 GPUs); ``eps`` in the paper's
    units (eps/256 on [-1, 1]); ``drop_path`` is timm's stochastic depth, ``attn_drop_rate`` the per-block attention
    dropout that the paper's ``--drop_path 0.2`` set on its Hugging Face ViT (METHOD §4).
    """

    ft_method: str
    epochs: int
    warmup_epochs: float
    blr: float
    batch: int
    accum_iter: int
    num_noises: int
    lbd: float
    eps: float
    num_steps: int
    weight_decay: float
    weight_decay_end: float
    layer_decay: float
    drop_path: float
    attn_drop_rate: float
    clip_grad: float
    noise_sd: float
    use_fp16: bool
    warm_start: bool


# The defaults of the paper's train.py (its argparse) that our train.py keeps; ours differ in use_fp16 (off: --precision
# auto decides) and warm_start (on; the paper's launchers always pass it).
TRAIN_DEFAULTS = TrainPreset(
    ft_method="full", epochs=30, warmup_epochs=3.0, blr=1e-3, batch=32, accum_iter=1, num_noises=4, lbd=1.0,
    eps=64.0, num_steps=4, weight_decay=0.04, weight_decay_end=0.4, layer_decay=0.65, drop_path=0.2,
    attn_drop_rate=0.0, clip_grad=0.3, noise_sd=0.25, use_fp16=False, warm_start=True)


@dataclass(frozen=True)
class Preset:
    """One dataset's settings.

    Attributes:
        name: the ``--dataset`` name.
        num_classes, image_size: the data (``image_size``: the side of the images the dataset returns; ImageNet:
            the 224-px center crop).
        arch: the default classifier ``--arch``.
        denoiser: the name of the denoiser configuration (``denoiser.DENOISER_CONFIGS``); its noise schedule fixes
            t* (:meth:`t_star`).
        N, N0, alpha: CERTIFY's estimation and selection samples and failure probability.
        subset, skip: which test images certify.py takes: ``paper`` (one random image per class) or ``skip`` (every
            ``skip``-th image).
        table_radii: the l2 radii of the paper's certified-accuracy tables.
        test_per_class: test images per class of train.py's per-epoch accuracy (0: the whole test set).
        train: the fine-tuning hyper-parameters.
    """

    name: str
    num_classes: int
    image_size: int
    arch: str
    denoiser: str
    N: int
    subset: str
    skip: int
    table_radii: tuple[float, ...]
    test_per_class: int
    train: TrainPreset
    N0: int = N0
    alpha: float = ALPHA

    def t_star(self, sigma: float) -> int:
        """t* of the one-shot denoiser at ``sigma``: the smallest t >= 1 with sqrt((1 - abar_t)/abar_t) >= 2 sigma
        on this dataset's denoiser schedule (METHOD §1; ``denoiser.schedule_timestep``)."""
        from denoiser import schedule_timestep
        return schedule_timestep(self.denoiser, sigma)


CIFAR10 = Preset(
    name="cifar10", num_classes=10, image_size=32, arch="cifar10_vit_base", denoiser="cifar10", N=100_000,
    subset="skip", skip=1, table_radii=(0.25, 0.5, 0.75, 1.0), test_per_class=100,
    train=dataclasses.replace(TRAIN_DEFAULTS, blr=1e-4, accum_iter=4, lbd=4.0, drop_path=0.0, attn_drop_rate=0.2,
                              noise_sd=1.0, use_fp16=True))
IMAGENET = Preset(
    name="imagenet", num_classes=1000, image_size=224, arch="imagenet_vit_base", denoiser="imagenet", N=10_000,
    subset="paper", skip=50, table_radii=(0.5, 1.0, 1.5, 2.0, 3.0), test_per_class=5,
    train=TrainPreset(ft_method="lora", epochs=10, warmup_epochs=1.0, blr=4e-4, batch=16, accum_iter=4, num_noises=2,
                      lbd=2.0, eps=64.0, num_steps=1, weight_decay=0.01, weight_decay_end=0.1, layer_decay=0.9,
                      drop_path=0.0, attn_drop_rate=0.0, clip_grad=1.0, noise_sd=1.0, use_fp16=True,
                      warm_start=True))
DIGITS = Preset(
    name="digits", num_classes=10, image_size=16, arch="digits_vit_tiny", denoiser="digits", N=10_000,
    subset="skip", skip=1, table_radii=(0.25, 0.5, 0.75, 1.0), test_per_class=0, train=TRAIN_DEFAULTS)

PRESETS: dict[str, Preset] = {p.name: p for p in (CIFAR10, IMAGENET, DIGITS)}
DATASETS: tuple[str, ...] = tuple(PRESETS)


def per_dataset(field: str) -> str:
    """``field`` of every preset for a help text, e.g. ``cifar10 100000, imagenet 10000, digits 10000``.

    Args:
        field: a :class:`Preset` attribute (``train.lbd`` reads a :class:`TrainPreset` one).
    """
    def value(p: object) -> object:
        for part in field.split("."):
            p = getattr(p, part)
        return p
    return ", ".join(f"{name} {value(p)}" for name, p in PRESETS.items())
