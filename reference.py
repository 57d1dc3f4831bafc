"""The reference path, re-created: how diffusion denoised smoothing (Carlini et al. 2023) certifies on top of Cohen
et al. (2019), and one FT-CADIS fine-tuning step as the paper's code runs it.

* certification: fp32; the diffusion draws its own noise at t* (``q_sample``: x_t = sqrt(abar)·(2x − 1) +
  sqrt(1 − abar)·eps, eps fresh); the full ``p_sample`` step (``p_mean_variance``: learned-range log-variance,
  posterior mean, and a sample, of which only ``pred_xstart`` is used); the classifier; eager attention
  (:func:`eager_attention`); the argmax copied to the host every batch and counted in a Python loop
  (:func:`reference_sample_noise`);
* fine-tuning (:class:`ReferenceFinetuneStep`): that denoising, the attack and the adversarial forward on every
  image, ``torch.optim.AdamW`` defaults, per-parameter clipping with a host sync per parameter
  (:func:`clip_gradients`).

``bench.py`` times our paths against it; the tests use it as an oracle (the same function computed with more work).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, List

import numpy as np
import torch
import torch.nn as nn

from cadis import cadis_objective, eps_pixels
from classifier import ImageClassifier, param_groups_lrd
from denoiser import DiffusionDenoiser
from presets import TrainPreset
from runkit.devices import autocast

# ---------------------------------------------------------------------------------------------------------------
# Certification: DDS's denoised classifier and Cohen's sampling loop
# ---------------------------------------------------------------------------------------------------------------


def _extract(arr: np.ndarray, t: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """arr[t] per sample, broadcast to ``shape``: a numpy float64 table copied to the device on every call, as
    upstream's ``_extract_into_tensor`` (which casts to float32; float64 inputs keep float64 here)."""
    res = torch.from_numpy(arr).to(device=t.device)[t].to(dtype)
    return res.view(-1, *([1] * (len(shape) - 1))).expand(shape)


class ReferenceDiffusion:
    """The part of improved-/guided-diffusion's ``GaussianDiffusion`` that DDS calls, with the learned-range
    variance (``learn_sigma=True``) and ε-prediction of both official checkpoints. From ᾱ_t: β_t = 1 − ᾱ_t/ᾱ_{t−1}.

        q_sample:  x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε
        p_mean_variance:  ε̂, v = UNet(x_t, τ);  x̂_0 = clip(sqrt(1/ᾱ_t)·x_t − sqrt(1/ᾱ_t − 1)·ε̂, −1, 1)
                   mean = c1_t·x̂_0 + c2_t·x_t,  log var = f·log β_t + (1 − f)·log β̃_t,  f = (v + 1)/2
        p_sample:  sample = mean + 1[t > 0]·exp(log var / 2)·z,  z fresh;  returns sample and x̂_0
    """

    def __init__(self, alphas_cumprod: np.ndarray, rescale_timesteps: bool):
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        ac_prev = np.append(1.0, ac[:-1])
        self.num_timesteps = len(ac)
        self.rescale_timesteps = rescale_timesteps
        self.betas = 1.0 - ac / ac_prev
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        self.posterior_variance = self.betas * (1.0 - ac_prev) / (1.0 - ac)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - self.betas) / (1.0 - ac)
        self.log_betas = np.log(self.betas)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        s, d = x_start.shape, x_start.dtype
        return (_extract(self.sqrt_alphas_cumprod, t, s, d) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, s, d) * noise)

    def p_mean_variance(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                        t: torch.Tensor) -> Dict[str, torch.Tensor]:
        s, d = x.shape, x.dtype
        tau = t.to(d) * (1000.0 / self.num_timesteps) if self.rescale_timesteps else t
        model_output, model_var_values = torch.split(model(x, tau), x.shape[1], dim=1)
        min_log = _extract(self.posterior_log_variance_clipped, t, s, d)
        max_log = _extract(self.log_betas, t, s, d)
        frac = (model_var_values + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = (_extract(self.sqrt_recip_alphas_cumprod, t, s, d) * x
                       - _extract(self.sqrt_recipm1_alphas_cumprod, t, s, d) * model_output).clamp(-1, 1)
        mean = (_extract(self.posterior_mean_coef1, t, s, d) * pred_xstart
                + _extract(self.posterior_mean_coef2, t, s, d) * x)
        return {"mean": mean, "variance": torch.exp(model_log_variance), "log_variance": model_log_variance,
                "pred_xstart": pred_xstart}

    def p_sample(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                 t: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = self.p_mean_variance(model, x, t)
        noise = torch.randn_like(x)
        nonzero_mask = (t != 0).to(x.dtype).view(-1, *([1] * (len(x.shape) - 1)))
        return {"sample": out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise,
                "pred_xstart": out["pred_xstart"]}


class ReferenceDenoisedClassifier(nn.Module):
    """DDS's ``DiffusionRobustModel``: x in [0, 1] (clean: the diffusion adds the noise) -> logits of f(x̂_0).

    x_in = 2x − 1; x_t = q_sample(x_in, t*, fresh ε); x̂_0 = p_sample(UNet, x_t, t*)["pred_xstart"]; f((x̂_0 + 1)/2).
    """

    def __init__(self, denoiser: DiffusionDenoiser, classifier: nn.Module, sigma: float):
        super().__init__()
        self.unet = denoiser.unet
        self.classifier = classifier
        self.diffusion = ReferenceDiffusion(denoiser.alphas_cumprod.cpu().numpy(), denoiser.rescale_timesteps)
        self.t = denoiser.timestep_for_sigma(sigma)

    def denoise(self, x_start: torch.Tensor) -> torch.Tensor:
        t_batch = torch.tensor([self.t] * len(x_start), device=x_start.device)
        x_t = self.diffusion.q_sample(x_start, t_batch, torch.randn_like(x_start))
        with torch.no_grad():
            return self.diffusion.p_sample(self.unet, x_t, t_batch)["pred_xstart"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = (self.denoise(x * 2 - 1) + 1) / 2
        return self.classifier.model(self.classifier.normalize(x_hat))  # every token through every block


def _count_arr(arr: np.ndarray, length: int) -> np.ndarray:
    counts = np.zeros(length, dtype=int)
    for idx in arr:
        counts[idx] += 1
    return counts


def reference_sample_noise(model: nn.Module, x: torch.Tensor, num: int, batch_size: int, num_classes: int
                           ) -> np.ndarray:
    """Cohen's ``Smooth._sample_noise`` as DDS runs it: the clean image repeated, noised inside the model, the
    predictions copied to the host and counted in Python, batch by batch."""
    with torch.no_grad():
        counts = np.zeros(num_classes, dtype=int)
        for _ in range(math.ceil(num / batch_size)):
            this_batch_size = min(batch_size, num)
            num -= this_batch_size
            batch = x.repeat((this_batch_size, 1, 1, 1))
            predictions = model(batch).argmax(1)
            counts += _count_arr(predictions.cpu().numpy(), num_classes)
        return counts


@contextlib.contextmanager
def eager_attention() -> Any:
    """Scaled dot-product attention as the upstream code writes it (matmul, softmax, matmul): SDPA's math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.MATH]):
        yield


# ---------------------------------------------------------------------------------------------------------------
# The fine-tuning step
# ---------------------------------------------------------------------------------------------------------------


def clip_gradients(model: nn.Module, clip: float) -> None:
    """DINO's ``clip_gradients`` as FT-CADIS calls it: each parameter's gradient norm capped, one host sync each."""
    for p in model.parameters():
        if p.grad is not None:
            clip_coef = clip / (p.grad.data.norm(2) + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)


class ReferenceFinetuneStep:
    """One FT-CADIS micro-step with accum_iter = 1 on B' clean images x M noises (noise-major), METHOD §4, as the
    paper's code runs it: noise from ``q_sample`` + the full ``p_sample``, the attack and the adversarial forward on
    every image, ``torch.optim.AdamW`` defaults (a for-loop on CPU), :func:`clip_gradients`; precision fp16 with
    loss scaling is the paper's ``--use_fp16 true``. After a call the parameters' ``.grad`` hold the clipped gradient.

    A subclass replaces the parts (:meth:`prepare`, :meth:`make_optimizer`, :meth:`denoise`, :meth:`clip`,
    :attr:`masked_only`) and keeps the step.

    Args:
        classifier: the classifier to fine-tune (put in train mode).
        denoiser: the frozen denoiser.
        sigma: the training noise level.
        settings: M, lambda, attack steps, eps (``--eps`` units), weight and layer decay, clip_grad.
        precision: the autocast precision (``fp16``: with a gradient scaler).
        device: where it runs.
        lr: the optimizer's learning rate.
    """

    masked_only = False  # attack every image

    def __init__(self, classifier: ImageClassifier, denoiser: DiffusionDenoiser, sigma: float, settings: TrainPreset,
                 precision: str, device: torch.device, lr: float = 1e-5):
        self.classifier = classifier.train()
        self.sigma, self.t_star = sigma, denoiser.timestep_for_sigma(sigma)
        self.M, self.lbd, self.steps = settings.num_noises, settings.lbd, settings.num_steps
        self.eps_pixels, self.clip_grad = eps_pixels(settings.eps), settings.clip_grad
        self.precision, self.device = precision, device
        groups = param_groups_lrd(classifier, weight_decay=settings.weight_decay, layer_decay=settings.layer_decay)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = self.make_optimizer(groups, lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.masked_in: List[float] = []
        self.prepare(denoiser)

    def prepare(self, denoiser: DiffusionDenoiser) -> None:
        """The denoising model: DDS's :class:`ReferenceDenoisedClassifier` around the classifier."""
        self.ref_model = ReferenceDenoisedClassifier(denoiser, self.classifier, self.sigma)

    def make_optimizer(self, groups: List[Dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        """``torch.optim.AdamW`` with its defaults over the layer-decay parameter groups."""
        return torch.optim.AdamW(groups, lr=lr)

    def denoise(self, clean: torch.Tensor) -> torch.Tensor:
        """The denoised images of ``clean`` (repeated M times): q_sample's own noise at t*, then p_sample's x̂_0."""
        with torch.no_grad():
            return (self.ref_model.denoise(clean * 2 - 1) + 1) / 2

    def clip(self) -> None:
        """:func:`clip_gradients` at ``clip_grad``."""
        clip_gradients(self.classifier, self.clip_grad)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """One step on ``images`` [B', 3, H, W] with labels ``targets``; records the masked-in share."""
        clean = images.repeat(self.M, 1, 1, 1)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            denoised = self.denoise(clean)
            loss, _, _, correct = cadis_objective(self.classifier, clean, denoised, targets, self.M, self.lbd,
                                                  self.eps_pixels, self.steps, masked_only=self.masked_only)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        self.clip()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.masked_in.append(float(correct.all(0).float().mean()))
