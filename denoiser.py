"""One-shot diffusion denoiser D(x + δ) of denoised smoothing (Carlini et al. 2023), METHOD §1-2.

A :class:`DiffusionDenoiser` is a :class:`unet.UNetModel` plus its noise schedule ᾱ_t. For pixel-space noise
level σ it uses t* = min{t ≥ 1 : sqrt((1 − ᾱ_t)/ᾱ_t) ≥ 2σ} and maps a noisy image x + δ in [0, 1] to

    y = 2(x + δ) − 1,   x_t = sqrt(ᾱ) · y,   ε̂ = UNet(x_t, τ)[:, :3]   (τ = t*·1000/T if rescaled, else t*)
    x̂0 = clip(sqrt(1/ᾱ) · x_t − sqrt(1/ᾱ − 1) · ε̂, −1, 1),   D(x + δ) = (x̂0 + 1) / 2.

:meth:`DiffusionDenoiser.denoise_multistep` is the paper's optional ``multistep=True``: from x_t* the whole reverse
chain t*, ..., 0, sampling the posterior with the learned variance at each step (t* + 1 UNet calls instead of one).

``load_denoiser("cifar10" | "imagenet", path)`` builds the paper's configuration (the OpenAI improved-/guided-
diffusion checkpoints) and loads the official file strictly; ``"digits"`` is the small model of the embedded demo.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from runkit import checkpoints
from runkit.devices import precision_dtype, resolve_device
from runkit.errors import UserError
from runkit.files import check_regular_file
from unet import UNetModel

__all__ = [
    "DENOISER_CONFIGS", "DiffusionDenoiser", "build_unet", "create_denoiser", "build_denoiser", "load_denoiser",
    "get_named_beta_schedule", "schedule_timestep", "default_checkpoint_path",
]

REPO_DIR = Path(__file__).resolve().parent
MODELS_DIR = REPO_DIR / "models"

# Default channel_mult by image size when channel_mult == "" (union of improved-diffusion, which alone has 32 px,
# and guided-diffusion, which alone has 128 and 512 px; the two agree on 64 and 256).
_CHANNEL_MULT = {
    32: (1, 2, 2, 2),
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
    512: (0.5, 1, 1, 2, 2, 4, 4),
}
# create_model_and_diffusion kwargs that configure the diffusion rather than the UNet.
_DIFFUSION_KWARGS = ("diffusion_steps", "noise_schedule", "rescale_timesteps", "timestep_respacing", "predict_xstart",
                     "sigma_small", "use_kl", "rescale_learned_sigmas")

# The UNet and schedule of each configuration; a dataset's preset names its configuration (presets.Preset.denoiser).
DENOISER_CONFIGS: dict[str, dict[str, Any]] = {
    # openai/improved-diffusion, L_hybrid, cosine schedule (DDS cifar10/DRM.py).
    "cifar10": {
        "kwargs": dict(
            image_size=32, num_channels=128, num_res_blocks=3, num_heads=4, num_heads_upsample=-1,
            attention_resolutions="16,8", dropout=0.3, learn_sigma=True, sigma_small=False, class_cond=False,
            diffusion_steps=4000, noise_schedule="cosine", timestep_respacing="", use_kl=False, predict_xstart=False,
            rescale_timesteps=True, rescale_learned_sigmas=True, use_checkpoint=False, use_scale_shift_norm=True),
        "checkpoint": "cifar10_uncond_50M_500K.pt",
        "url": "https://openaipublic.blob.core.windows.net/diffusion/march-2021/cifar10_uncond_50M_500K.pt",
    },
    # openai/guided-diffusion 256x256 unconditional, linear schedule (DDS imagenet/DRM.py).
    "imagenet": {
        "kwargs": dict(
            image_size=256, num_channels=256, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
            num_head_channels=64, attention_resolutions="32,16,8", channel_mult="", dropout=0.0, class_cond=False,
            use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=True, use_fp16=False,
            use_new_attention_order=False, learn_sigma=True, diffusion_steps=1000, noise_schedule="linear",
            timestep_respacing="", use_kl=False, predict_xstart=False, rescale_timesteps=False,
            rescale_learned_sigmas=False),
        "checkpoint": "256x256_diffusion_uncond.pt",
        "url": "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",
    },
    # The embedded demo's small denoiser (16 px digits), trained by the demo; CIFAR-10-like schedule.
    "digits": {
        "kwargs": dict(
            image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", num_heads=4, num_heads_upsample=-1,
            attention_resolutions="8", dropout=0.0, learn_sigma=True, class_cond=False, use_checkpoint=False,
            use_scale_shift_norm=True, diffusion_steps=4000, noise_schedule="cosine", timestep_respacing="",
            predict_xstart=False, rescale_timesteps=True),
        "checkpoint": "digits_denoiser.pt",
        "url": None,
    },
}


def get_named_beta_schedule(noise_schedule: str, diffusion_steps: int) -> np.ndarray:
    """β_t (t = 0..T−1), float64, as upstream ``get_named_beta_schedule``.

    linear: evenly from 1e-4·1000/T to 0.02·1000/T; cosine: β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999) with
    ᾱ(s) = cos²((s + 0.008)/1.008 · π/2). Then ᾱ_t = Π_{s≤t} (1 − β_s).
    """
    if noise_schedule == "linear":
        scale = 1000 / diffusion_steps
        return np.linspace(scale * 0.0001, scale * 0.02, diffusion_steps, dtype=np.float64)
    if noise_schedule == "cosine":
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / diffusion_steps) / alpha_bar(i / diffusion_steps), 0.999)
                         for i in range(diffusion_steps)], dtype=np.float64)
    raise UserError(f"unknown noise_schedule {noise_schedule!r}; choose 'linear' or 'cosine'")


def noise_ratio(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sqrt((1 − ᾱ_t)/ᾱ_t): the noise standard deviation of x_t/sqrt(ᾱ_t) on the [−1, 1] scale, as DDS."""
    return np.sqrt(1.0 - alphas_cumprod) / np.sqrt(alphas_cumprod)


def first_timestep(ratio: np.ndarray, sigma: float, noise_schedule: str) -> int:
    """t* = the smallest t ≥ 1 with ratio[t] = sqrt((1 − ᾱ_t)/ᾱ_t) ≥ 2σ (DDS certify.py rule; t is 0-based).

    Args:
        ratio: :func:`noise_ratio` of the schedule.
        sigma: the pixel-scale noise level (> 0).
        noise_schedule: the schedule's name (for the error message).
    """
    sigma = float(sigma)
    if not sigma > 0:
        raise UserError(f"sigma must be > 0 for denoised smoothing (got {sigma})")
    hits = np.flatnonzero(ratio[1:] >= 2 * sigma)
    if hits.size == 0:
        raise UserError(f"sigma={sigma} is beyond the largest noise level of this {len(ratio)}-step "
                        f"{noise_schedule} schedule (max sigma {float(ratio[-1]) / 2:.4g}); use a smaller sigma")
    return int(hits[0]) + 1


def schedule_timestep(name: str, sigma: float) -> int:
    """t* at ``sigma`` of the named configuration's schedule (:func:`first_timestep`), without building its UNet.

    Args:
        name: a :data:`DENOISER_CONFIGS` name.
        sigma: the pixel-scale noise level.
    """
    kwargs = _config(name)["kwargs"]
    schedule = kwargs.get("noise_schedule", "linear")
    alphas_cumprod = np.cumprod(1.0 - get_named_beta_schedule(schedule, kwargs.get("diffusion_steps", 1000)))
    return first_timestep(noise_ratio(alphas_cumprod), sigma, schedule)


def build_unet(
        image_size: int = 64,
        num_channels: int = 128,
        num_res_blocks: int = 2,
        num_heads: int = 4,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        attention_resolutions: str | tuple[int, ...] = "16,8",
        channel_mult: str | tuple[float, ...] = "",
        dropout: float = 0.0,
        learn_sigma: bool = False,
        class_cond: bool = False,
        use_checkpoint: bool = False,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        use_fp16: bool = False,
        use_new_attention_order: bool = False,
) -> UNetModel:
    """``create_model`` of improved-/guided-diffusion, with their kwarg names and defaults.

    ``channel_mult=""`` picks the multipliers from ``image_size`` (32, 64, 128, 256, 512);
    ``attention_resolutions`` are resolutions in pixels ("16,8" -> downsampling factors image_size // 16, // 8);
    ``num_head_channels != -1`` overrides ``num_heads``; ``num_heads_upsample=-1`` means ``num_heads``.
    ``use_fp16`` is accepted for compatibility and ignored: use autocast or ``load_denoiser(dtype=...)``.
    """
    del use_fp16
    if channel_mult in ("", None, ()):
        if image_size not in _CHANNEL_MULT:
            raise UserError(f"no default channel_mult for image_size={image_size} "
                            f"(known: {sorted(_CHANNEL_MULT)}); pass channel_mult, e.g. '1,2,2'")
        mult = _CHANNEL_MULT[image_size]
    else:
        mult = tuple(int(m) for m in channel_mult.split(",")) if isinstance(channel_mult, str) else tuple(channel_mult)
    if isinstance(attention_resolutions, str):
        resolutions = [int(r) for r in attention_resolutions.split(",") if r.strip()]
    else:
        resolutions = [int(r) for r in attention_resolutions]
    return UNetModel(
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(image_size // r for r in resolutions),
        dropout=dropout,
        channel_mult=mult,
        num_classes=1000 if class_cond else None,
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


class DiffusionDenoiser(nn.Module):
    """D(x + δ) = (clip(sqrt(1/ᾱ)·x_t − sqrt(1/ᾱ − 1)·ε̂(x_t, τ), −1, 1) + 1)/2, x_t = sqrt(ᾱ)·(2(x + δ) − 1).

    ``alphas_cumprod`` (ᾱ_t, t = 0..T−1, 0-based as upstream) is a float64 buffer that stays float64 under
    ``.to(dtype)``; the UNet's dtype is free (fp32, or bf16/fp16 weights), and autocast applies inside.
    """

    alphas_cumprod: torch.Tensor

    def __init__(
            self,
            unet: UNetModel,
            noise_schedule: str = "cosine",
            diffusion_steps: int = 4000,
            rescale_timesteps: bool = True,
            channels_last: bool = False,
    ):
        super().__init__()
        self.unet = unet
        self.noise_schedule = noise_schedule
        self.num_timesteps = int(diffusion_steps)
        self.rescale_timesteps = rescale_timesteps
        self.channels_last = channels_last
        self._betas = get_named_beta_schedule(noise_schedule, self.num_timesteps)
        self._alphas_cumprod = np.cumprod(1.0 - self._betas)
        self._noise_ratio = noise_ratio(self._alphas_cumprod)
        self.register_buffer("alphas_cumprod", torch.from_numpy(self._alphas_cumprod.copy()), persistent=False)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)

    def _apply(self, fn: Any, recurse: bool = True) -> DiffusionDenoiser:  # keep ᾱ float64 under .to(dtype)
        super()._apply(fn, recurse)
        device = self.alphas_cumprod.device
        self.alphas_cumprod = torch.from_numpy(self._alphas_cumprod.copy()).to(device)
        return self

    @property
    def max_sigma(self) -> float:
        """The largest pixel-scale σ this schedule can denoise: ratio[T−1] / 2."""
        return float(self._noise_ratio[-1]) / 2

    def timestep_for_sigma(self, sigma: float) -> int:
        """t* = the smallest t ≥ 1 with sqrt((1 − ᾱ_t)/ᾱ_t) ≥ 2σ (DDS certify.py rule; t is 0-based)."""
        return first_timestep(self._noise_ratio, sigma, self.noise_schedule)

    def model_timestep(self, t: int) -> float:
        """τ, the value the UNet receives: t·1000/T with rescaled timesteps, else t."""
        return t * (1000.0 / self.num_timesteps) if self.rescale_timesteps else float(t)

    def _check_input(self, x_noisy: torch.Tensor, t: int) -> None:
        """One-line errors for a timestep outside the schedule and images the UNet cannot take."""
        if not 0 <= t < self.num_timesteps:
            raise UserError(f"denoiser timestep t={t} outside 0..{self.num_timesteps - 1}")
        if x_noisy.dim() != 4 or x_noisy.shape[1] != self.unet.in_channels:
            raise UserError(f"denoiser expects images [B, {self.unet.in_channels}, H, W], got {list(x_noisy.shape)}")
        f = self.unet.downsample_factor
        if x_noisy.shape[-2] % f or x_noisy.shape[-1] % f:
            raise UserError(f"denoiser input size {x_noisy.shape[-2]}x{x_noisy.shape[-1]} is not a multiple of {f} "
                            f"(the UNet downsamples by {f}); resize or crop the images")

    def denoise(self, x_noisy: torch.Tensor, t: int) -> torch.Tensor:
        """One-shot denoise of x_noisy = x + δ ([B, 3, H, W], pixel scale, unclipped) at timestep t (an int).

        Returns x̂ in [0, 1], in x_noisy's dtype. H and W must be multiples of ``unet.downsample_factor``.
        Gradients flow only if x_noisy requires grad (``load_denoiser`` freezes the weights).
        """
        t = int(t)
        self._check_input(x_noisy, t)
        abar = float(self._alphas_cumprod[t])
        x_t = math.sqrt(abar) * (2 * x_noisy - 1)  # the noisy image on the [-1, 1] scale, as the diffusion's x_t
        x_in = x_t.to(self.unet.dtype)
        if self.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        tau_dtype = torch.float64 if x_in.dtype == torch.float64 else torch.float32
        tau = torch.full((), self.model_timestep(t), dtype=tau_dtype, device=x_t.device)  # one embedding, broadcast
        eps_hat = self.unet(x_in, tau)[:, :3].to(x_t.dtype)
        x0 = (math.sqrt(1.0 / abar) * x_t - math.sqrt(1.0 / abar - 1) * eps_hat).clamp(-1.0, 1.0)
        return ((x0 + 1) / 2).to(x_noisy.dtype)

    def posterior_coefficients(self, s: int) -> tuple[float, float, float, float]:
        """(c1, c2, log β̃_s, log β_s) of the reverse step at s (float64, upstream ``GaussianDiffusion``'s arrays):

            μ = c1·x̂0 + c2·x_s,  c1 = β_s·sqrt(ᾱ_{s−1})/(1 − ᾱ_s),  c2 = (1 − ᾱ_{s−1})·sqrt(α_s)/(1 − ᾱ_s),
            β̃_s = β_s·(1 − ᾱ_{s−1})/(1 − ᾱ_s)  (ᾱ_{−1} = 1; the log uses β̃_1 at s = 0, as upstream's "clipped" log).
        """
        abar = self._alphas_cumprod
        abar_prev = np.append(1.0, abar[:-1])
        post_var = self._betas * (1.0 - abar_prev) / (1.0 - abar)
        c1 = self._betas[s] * math.sqrt(abar_prev[s]) / (1.0 - abar[s])
        c2 = (1.0 - abar_prev[s]) * math.sqrt(1.0 - self._betas[s]) / (1.0 - abar[s])
        return float(c1), float(c2), float(math.log(post_var[max(s, 1)])), float(math.log(self._betas[s]))

    def reverse_step(self, x_s: torch.Tensor, s: int, noise: Optional[torch.Tensor]) -> torch.Tensor:
        """One posterior sample x_{s−1} = μ + exp(½·log σ²)·z of the learned-variance model (upstream ``p_sample``
        with ``clip_denoised=True``; ``noise`` z is unused and may be None at s = 0):

            ε̂, v = UNet(x_s, τ_s);  x̂0 = clip(sqrt(1/ᾱ_s)·x_s − sqrt(1/ᾱ_s − 1)·ε̂, −1, 1)
            μ = c1·x̂0 + c2·x_s;  log σ² = f·log β_s + (1 − f)·log β̃_s,  f = (v + 1)/2   (:meth:`posterior_coefficients`)
        """
        abar = float(self._alphas_cumprod[s])
        tau_dtype = torch.float64 if x_s.dtype == torch.float64 else torch.float32
        tau = torch.full((), self.model_timestep(s), dtype=tau_dtype, device=x_s.device)  # a fill, no host copy
        x_in = x_s.to(self.unet.dtype)
        if self.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        out = self.unet(x_in, tau).to(x_s.dtype)
        eps, v = out[:, :3], out[:, 3:6]
        x0 = (math.sqrt(1.0 / abar) * x_s - math.sqrt(1.0 / abar - 1.0) * eps).clamp(-1.0, 1.0)
        c1, c2, log_post_var, log_beta = self.posterior_coefficients(s)
        mean = c1 * x0 + c2 * x_s
        if s == 0:
            return mean
        frac = (v + 1.0) / 2.0
        log_var = frac * log_beta + (1.0 - frac) * log_post_var
        return mean + torch.exp(0.5 * log_var) * noise

    def denoise_multistep(self, x_noisy: torch.Tensor, t: int,
                          generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
        """Multi-step denoise of x_noisy = x + δ (the paper's ``multistep=True``): x_t = sqrt(ᾱ_t)·(2(x + δ) − 1),
        then x_{s−1} = :meth:`reverse_step` (x_s, s) for s = t, t − 1, ..., 0; returns (x_{−1} + 1)/2.

        t + 1 UNet calls (one-shot :meth:`denoise` is one). The paper's loop runs s = t − 1, ..., 0 on x_t, i.e. its
        first step treats x_t as if it were x_{t−1}; here the chain starts at t, where x_t is.

        Args:
            x_noisy: [B, 3, H, W] noisy images on the pixel scale.
            t: the timestep t* of x_t (:meth:`timestep_for_sigma`).
            generators: one generator per image, on x_noisy's device, from which that image's posterior noise z_s is
                drawn (s = t, ..., 1, one ``randn`` of the image's shape each), so an image's chain does not depend
                on the batch it is in; None: torch's global generator.
        """
        self._check_input(x_noisy, t)
        if self.unet.out_channels != 6:
            raise UserError("multi-step denoising samples with the learned variance: it needs a learn_sigma UNet "
                            "(6 output channels)")
        if generators is not None and len(generators) != len(x_noisy):
            raise ValueError(f"{len(generators)} generators for {len(x_noisy)} images")
        sqrt_abar = math.sqrt(float(self._alphas_cumprod[t]))
        x = x_noisy.mul(2 * sqrt_abar).sub_(sqrt_abar)  # sqrt(ᾱ)·(2x − 1)
        shape, dtype = x.shape[1:], torch.promote_types(x.dtype, torch.float32)
        for s in range(t, -1, -1):
            noise = None
            if s > 0 and generators is None:
                noise = torch.randn(x.shape, device=x.device, dtype=dtype)
            elif s > 0:
                noise = torch.stack([torch.randn(shape, generator=g, device=x.device, dtype=dtype)
                                     for g in generators])
            x = self.reverse_step(x, s, noise)
        return (x + 1.0) / 2.0

    def forward(self, x_noisy: torch.Tensor, t: int) -> torch.Tensor:
        """Alias of :meth:`denoise`."""
        return self.denoise(x_noisy, t)


def _config(name: str) -> dict[str, Any]:
    if name not in DENOISER_CONFIGS:
        raise UserError(f"unknown denoiser {name!r}; choose one of {', '.join(DENOISER_CONFIGS)}")
    return DENOISER_CONFIGS[name]


def create_denoiser(channels_last: bool = False, **kwargs: Any) -> DiffusionDenoiser:
    """A randomly initialised denoiser from upstream ``create_model_and_diffusion`` kwargs (UNet + diffusion).

    Only the plain DDPM parameterisation is supported (ε prediction, no timestep respacing); ``sigma_small``,
    ``use_kl`` and ``rescale_learned_sigmas`` only affect training losses / sampling and are ignored.
    """
    diff = {k: kwargs.pop(k) for k in _DIFFUSION_KWARGS if k in kwargs}
    if diff.get("timestep_respacing") not in (None, ""):
        raise UserError(f"timestep_respacing={diff['timestep_respacing']!r} is not supported (one-shot denoising "
                        "uses the full schedule); use ''")
    if diff.get("predict_xstart", False):
        raise UserError("predict_xstart=True is not supported: the denoiser expects an ε-prediction model")
    try:
        unet = build_unet(**kwargs)
    except TypeError as err:
        raise UserError(f"bad UNet configuration: {err}") from None
    return DiffusionDenoiser(
        unet,
        noise_schedule=diff.get("noise_schedule", "linear"),
        diffusion_steps=diff.get("diffusion_steps", 1000),
        rescale_timesteps=diff.get("rescale_timesteps", False),
        channels_last=channels_last,
    )


def build_denoiser(name: str, **overrides: Any) -> DiffusionDenoiser:
    """The named configuration of :data:`DENOISER_CONFIGS`, randomly initialised (``overrides`` change kwargs)."""
    return create_denoiser(**{**_config(name)["kwargs"], **overrides})


def default_checkpoint_path(name: str) -> Path:
    """Where ``load_denoiser`` looks when no path is given: ``models/<checkpoint file>`` in the repository."""
    return MODELS_DIR / _config(name)["checkpoint"]


def _missing_file_hint(name: str) -> str:
    cfg = _config(name)
    if cfg["url"]:
        return f"download it from {cfg['url']} (e.g. wget -P models {cfg['url']})"
    return f"it ships as models/{cfg['checkpoint']}; re-create it with the demo's denoiser training"


def load_denoiser(
        name: str,
        checkpoint_path: Optional[str | Path] = None,
        device: Optional[str | torch.device] = None,
        dtype: torch.dtype | str = torch.float32,
        channels_last: bool = False,
        flag: str = "--denoiser_ckpt",
) -> DiffusionDenoiser:
    """Build the named configuration and load its checkpoint strictly (:mod:`checkpoints`, ``weights_only``).

    ``checkpoint_path`` defaults to ``models/<file>``; ``device`` None -> CUDA when available; ``dtype`` is the
    UNet weight dtype (fp32 default; bf16/fp16 weights or autocast for speed); ``flag`` is what errors name.
    Returns the denoiser in eval mode with frozen weights.
    """
    cfg = _config(name)
    path = Path(checkpoint_path) if checkpoint_path else default_checkpoint_path(name)
    if not check_regular_file(path, flag):
        raise UserError(f"{flag} {path}: denoiser checkpoint not found; {_missing_file_hint(name)}")
    if isinstance(dtype, str):
        dtype = precision_dtype(dtype)
    dev = resolve_device(None if device is None else str(device))
    sd, _ = checkpoints.read_state_dict(path, flag, prefixes=(checkpoints.DDP_PREFIX, "unet."), mmap=True,
                                        expected="the official .pt file or model.state_dict()")
    with torch.device("meta"):  # no random init, no double memory: the checkpoint's tensors are assigned
        denoiser = create_denoiser(**cfg["kwargs"])
    checkpoints.check_state_dict(denoiser.unet.state_dict(), sd, f"{flag} {path}", f"the {name!r} UNet",
                                 f"wrong checkpoint for {name!r}?")
    denoiser.unet.load_state_dict(sd, strict=True, assign=True)
    denoiser.to(device=dev)  # also re-creates the float64 schedule buffer (off the meta device)
    denoiser.unet.to(dtype=dtype)
    if channels_last:
        denoiser.unet.to(memory_format=torch.channels_last)
    denoiser.channels_last = channels_last
    return denoiser.eval().requires_grad_(False)
