"""Randomized smoothing over denoise->classify (Cohen et al. 2019; Carlini et al. 2023) and the FT-CADIS objective.

The two halves of this module:

* certification: :class:`DenoisedClassifier` (f o D on noisy inputs) and :class:`Smooth` (CERTIFY / PREDICT);
* fine-tuning: :func:`cadis_loss` (confidence-aware selective CE + masked adversarial loss) and
  :func:`denoised_attack` (the adversarial search on the denoised residual), SPEC section 4.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint

from logs import ABSTAIN
from utils import autocast, explicit_attention_is_faster, precision_dtype

# ---------------------------------------------------------------------------------------------------------------
# Section 1: smoothing and certification
# ---------------------------------------------------------------------------------------------------------------

# Samples per independently seeded noise block. Part of a certification log's configuration: the noise (hence the
# log) depends on it, never on the batch size.
NOISE_BLOCK = 1000
# Noise phases of one call: selection and estimation samples of CERTIFY never share a generator.
PHASE_SELECTION, PHASE_ESTIMATION, PHASE_PREDICTION = 0, 1, 2


class DenoisedClassifier(nn.Module):
    """The base classifier of denoised smoothing: x + delta -> f(D(x + delta)) (Carlini et al. 2023).

    D is a one-shot diffusion denoiser called at t_star = ``denoiser.timestep_for_sigma(sigma)`` (the diffusion step
    whose noise level matches sigma, SPEC section 1), f the classifier. ``denoiser=None`` gives the classifier alone,
    i.e. plain Gaussian smoothing (Cohen et al. 2019). Input: noisy images ``[B, 3, H, W]`` in pixel space (``[0, 1]``
    plus noise, not clipped); output: logits ``[B, num_classes]``. The noise itself is added by :class:`Smooth`.
    """

    def __init__(self, denoiser: Optional[nn.Module], classifier: nn.Module, sigma: float):
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier
        self.sigma = sigma
        self.t_star: Optional[int] = None if denoiser is None else int(denoiser.timestep_for_sigma(sigma))

    def forward(self, x_noisy: torch.Tensor) -> torch.Tensor:
        x_hat = x_noisy if self.denoiser is None else self.denoiser.denoise(x_noisy, self.t_star)
        return self.classifier(x_hat)


def prepare_inference_(model: nn.Module, precision: str, channels_last: bool = True) -> nn.Module:
    """Make ``model`` (e.g. a :class:`DenoisedClassifier`) faster under ``autocast(device, precision)``, in place.

    bf16/fp16: the weight of every Linear / Conv is stored in the autocast dtype. Autocast computes these layers in
    that dtype anyway, but casts each fp32 weight again on every call (a few % of the time on an idle CPU, up to half
    of it on a busy one); norms, biases, embeddings and the residual streams stay fp32, so the results are those of
    plain autocast.
    A denoiser's UNet goes channels_last (``channels_last``; may change float rounding). Where
    ``utils.explicit_attention_is_faster`` (bf16 on CPU), timm attention layers take their explicit
    (non-fused) form, as ``utils.attention`` does. fp32: nothing changes.
    Afterwards the model is for inference under ``autocast(precision)`` only (not for training).
    """
    if precision == "fp32":
        return model
    dtype = precision_dtype(precision)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            m.weight.data = m.weight.data.to(dtype)
        if isinstance(getattr(m, "fused_attn", None), bool):  # a timm attention layer
            weight = next(m.parameters(), None)
            if weight is not None and explicit_attention_is_faster(weight.device, dtype):
                m.fused_attn = False
        if channels_last and hasattr(m, "unet") and hasattr(m, "channels_last"):  # a denoiser.DiffusionDenoiser
            m.unet.to(memory_format=torch.channels_last)
            m.channels_last = True
    return model


def compile_for_inference_(model: DenoisedClassifier, mode: Optional[str] = None) -> DenoisedClassifier:
    """``torch.compile`` the denoiser's UNet and the classifier of ``model`` in place, for inference.

    Static shapes (``dynamic=False``): each distinct batch size compiles once (tens of seconds for the full-size
    networks), which pays off over certification's N = 10^4 to 10^5 samples per image. On CPU, inductor's weight
    freezing is switched on (a process-wide setting): weights become constants that oneDNN prepacks, which is only
    valid while the weights do not change, i.e. for inference. ``mode``: e.g. ``max-autotune`` or
    ``reduce-overhead`` (CUDA graphs).
    """
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cpu":
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True
    if model.denoiser is not None:
        model.denoiser.unet.compile(mode=mode, dynamic=False)
    model.classifier.compile(mode=mode, dynamic=False)
    return model


def block_seed(key: int, phase: int, block: int) -> int:
    """The 64-bit seed of noise block ``block`` of phase ``phase`` of a call whose key is ``key``."""
    return int(np.random.SeedSequence([key, phase, block]).generate_state(1, np.uint64)[0])


def image_generator(seed: int, idx: int) -> torch.Generator:
    """A CPU generator seeded by (seed, dataset index): an image's samples do not depend on batching, sharding or
    resuming."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, idx]).generate_state(1, np.uint64)[0]))


class Smooth:
    """A smoothed classifier g(x) = argmax_c P[f(x + delta) = c], delta ~ N(0, sigma^2 I) (Cohen et al. 2019).

    The noise is drawn here, on x's device, exactly at sigma (and in float32 even under ``precision``, which only
    autocasts the base classifier). Each call draws one key from ``generator`` (default: torch's global RNG); block b
    of ``noise_block`` samples of phase p then comes from its own generator seeded by (key, p, b). The samples are thus
    a function of the generator's state, n0, n and ``noise_block`` only, not of ``batch_size``, and CERTIFY's
    selection and estimation samples are independent. Class counts stay on the device until one transfer per call.
    """

    # to abstain, Smooth returns this int (logs.ABSTAIN)
    ABSTAIN = ABSTAIN

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float, precision: str = "fp32",
                 noise_block: int = NOISE_BLOCK):
        """
        :param base_classifier: maps noisy images [B x C x H x W] to logits [B x num_classes]
        :param num_classes: number of classes (>= 2)
        :param sigma: the noise level hyperparameter (> 0)
        :param precision: ``fp32`` (exact), ``bf16`` or ``fp16``: autocast of the base classifier
        :param noise_block: samples per independently seeded noise block
        """
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if num_classes < 2 or noise_block < 1:
            raise ValueError(f"need num_classes >= 2 and noise_block >= 1, got {num_classes}, {noise_block}")
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = sigma
        self.precision = precision
        self.noise_block = noise_block

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                generator: Optional[torch.Generator] = None) -> tuple[int, float]:
        """Monte Carlo algorithm for certifying that g's prediction around x is constant within some L2 radius.

        With probability at least 1 - alpha over the noise, the class returned by this method equals g(x), and g's
        prediction is constant within the L2 ball of radius R = sigma * Phi^-1(pABar) around x, where pABar is the
        one-sided (1 - alpha) Clopper-Pearson lower bound on P[f(x + delta) = cAHat] from n fresh samples; cAHat is the
        most frequent class among n0 separate selection samples.

        :param x: the input [C x H x W] in [0, 1], on the base classifier's device
        :param n0: the number of Monte Carlo samples to use for selection
        :param n: the number of Monte Carlo samples to use for estimation
        :param alpha: the failure probability
        :param batch_size: batch size to use when evaluating the base classifier (does not change the result)
        :param generator: CPU generator from which this call's noise is seeded (default: torch's global RNG)
        :return: (predicted class cAHat, certified radius); on abstention (pABar < 0.5) the class is ABSTAIN and the
                 radius 0.0
        """
        self.base_classifier.eval()
        key = self._draw_key(generator)
        counts = torch.stack([self._sample_noise(x, n0, batch_size, key, PHASE_SELECTION),
                              self._sample_noise(x, n, batch_size, key, PHASE_ESTIMATION)]).cpu().numpy()
        # use the selection samples to take a guess at the top class, the estimation samples to lower-bound pA
        counts_selection, counts_estimation = counts
        cAHat = int(counts_selection.argmax())
        nA = int(counts_estimation[cAHat])
        pABar = self._lower_confidence_bound(nA, n, alpha)
        if pABar < 0.5:
            return Smooth.ABSTAIN, 0.0
        return cAHat, float(self.sigma * norm.ppf(pABar))

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int,
                generator: Optional[torch.Generator] = None) -> int:
        """Monte Carlo algorithm for evaluating the prediction of g at x. With probability at least 1 - alpha, the
        class returned by this method equals g(x).

        Hypothesis test of https://arxiv.org/abs/1610.03944 for the top category of a multinomial: with top two
        counts c1 >= c2 among n samples, abstain unless the two-sided binomial test of c1 ~ Bin(c1 + c2, 1/2) rejects
        at level alpha (``scipy.stats.binomtest(c1, c1 + c2, 0.5).pvalue > alpha`` -> abstain).

        :param x: the input [C x H x W] in [0, 1]
        :param n: the number of Monte Carlo samples to use
        :param alpha: the failure probability
        :param batch_size: batch size to use when evaluating the base classifier (does not change the result)
        :param generator: CPU generator from which this call's noise is seeded (default: torch's global RNG)
        :return: the predicted class, or ABSTAIN
        """
        self.base_classifier.eval()
        counts = self._sample_noise(x, n, batch_size, self._draw_key(generator), PHASE_PREDICTION).cpu().numpy()
        top2 = np.argsort(-counts, kind="stable")[:2]
        count1, count2 = int(counts[top2[0]]), int(counts[top2[1]])
        if binomtest(count1, count1 + count2, p=0.5).pvalue > alpha:
            return Smooth.ABSTAIN
        return int(top2[0])

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int, key: int, phase: int) -> torch.Tensor:
        """Counts of the base classifier's predictions f(x + delta) over ``num`` noise samples of phase ``phase``.

        :return: a LongTensor [num_classes] on x's device (no host synchronization)
        """
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=x.device)
        ones = torch.ones(min(batch_size, num), dtype=torch.long, device=x.device)
        with torch.inference_mode():
            for noise in self._noise_batches(x, num, batch_size, key, phase):
                with autocast(x.device, self.precision):
                    predictions = self.base_classifier(x + self.sigma * noise).argmax(1)
                # index_add_ rather than bincount: CUDA bincount reads max/min back to the host (a sync per batch)
                counts.index_add_(0, predictions, ones[: len(predictions)])
        return counts

    def _noise_batches(self, x: torch.Tensor, num: int, batch_size: int, key: int, phase: int
                       ) -> Iterator[torch.Tensor]:
        """Standard normal noise [<= batch_size x C x H x W] for ``num`` samples, cut from fixed-size seeded blocks."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        pending: list[torch.Tensor] = []
        buffered = 0
        for block, start in enumerate(range(0, num, self.noise_block)):
            g = torch.Generator(device=x.device)
            g.manual_seed(block_seed(key, phase, block))
            pending.append(torch.randn((min(self.noise_block, num - start), *x.shape), generator=g,
                                       device=x.device, dtype=dtype))
            buffered += len(pending[-1])
            while buffered >= batch_size:
                noise = pending[0] if len(pending) == 1 else torch.cat(pending)
                pending = [noise[batch_size:]] if len(noise) > batch_size else []
                buffered -= batch_size
                yield noise[:batch_size]
        if buffered:
            yield pending[0] if len(pending) == 1 else torch.cat(pending)

    @staticmethod
    def _draw_key(generator: Optional[torch.Generator]) -> int:
        device = generator.device if generator is not None else torch.device("cpu")
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())

    @staticmethod
    def _lower_confidence_bound(NA: int, N: int, alpha: float) -> float:
        """A one-sided (1 - alpha) Clopper-Pearson lower confidence bound on a Bernoulli proportion from NA of N."""
        return float(proportion_confint(NA, N, alpha=2 * alpha, method="beta")[0])


# ---------------------------------------------------------------------------------------------------------------
# Section 2: the FT-CADIS objective
# ---------------------------------------------------------------------------------------------------------------


def _per_sample(x: torch.Tensor) -> tuple[int, ...]:
    """Shape that broadcasts one value per sample (dim 0) over the rest of ``x``."""
    return (x.shape[0],) + (1,) * (x.dim() - 1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in float32 (float64 stays float64), whatever the autocast dtype of the logits."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _kl(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_c p_c (log p_c - log q_c) over the last dim, 0 log 0 = 0 (also in the gradient)."""
    return (p * (p.clamp_min(torch.finfo(p.dtype).tiny).log() - log_q)).sum(-1)


def non_hallucinated(logits_denoised: torch.Tensor, targets: torch.Tensor, num_noises: int) -> torch.Tensor:
    """``[M, B']`` bool: argmax z_ij == y_i, for logits in the noise-major layout (row j*B' + i is noise j, image i)."""
    M = num_noises
    if logits_denoised.shape[0] != M * targets.shape[0]:
        raise ValueError(f"expected {M} x {targets.shape[0]} rows of logits (noise-major), got {logits_denoised.shape[0]}")
    return logits_denoised.detach().argmax(-1).view(M, -1) == targets


def cadis_loss(
    logits_denoised: torch.Tensor,
    logits_adv: torch.Tensor | None,
    targets: torch.Tensor,
    num_noises: int,
    lbd: float,
    warm_start: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FT-CADIS objective (SPEC section 4, steps 3, 4, 6, 7) for B' images with M denoised copies each.

    ``logits_denoised``: ``[M*B', C]`` logits z_ij of the denoised images in train mode, noise-major
    (rows j*B' .. (j+1)*B'-1 hold noise j); ``targets``: ``[B']`` labels y_i.

    * L_SCE,i = (1/M) sum_j 1[argmax z_ij = y_i] CE(z_ij, y_i); with ``warm_start``, an image with no correct
      copy counts its lowest-CE copy instead (the divisor stays M).
    * p_bar_i = (1/M) sum_j softmax(z_ij), kept in the graph (as in the reference).
    * L_MAdv,i = lbd * 1[all M copies of image i correct] * max_j KL(p_bar_i || softmax(z^adv_ij)).
    * loss = mean_i (L_SCE,i + L_MAdv,i).

    ``logits_adv`` are the train-mode logits of the adversarial inputs, noise-major, either for all B' images
    (``[M*B', C]``; rows of masked-out images are ignored, their gradient is exactly zero) or only for the K
    masked-in images (``[M*K, C]``, images in increasing index order, as :func:`cadis_objective` produces
    them); ``None`` (or zero rows) when K = 0. Both give the same loss and gradients.

    Returns ``(loss, loss_sce, loss_madv)``: the scalar total and the per-image ``[B']`` terms (float32, or
    float64 for float64 logits).
    """
    M, B = num_noises, targets.shape[0]
    correct = non_hallucinated(logits_denoised, targets, M)  # [M, B]
    z = _at_least_fp32(logits_denoised).view(M, B, -1)
    ce = F.cross_entropy(z.flatten(0, 1), targets.repeat(M), reduction="none").view(M, B)
    selected = correct
    if warm_start:
        lowest_ce = F.one_hot(ce.detach().argmin(0), M).T.bool()  # [M, B]
        selected = correct | (lowest_ce & ~correct.any(0))
    loss_sce = (ce * selected).sum(0) / M

    p_bar = F.softmax(z, dim=-1).mean(0)  # [B, C], in the graph
    mask = correct.all(0)  # [B]
    loss_madv = torch.zeros_like(loss_sce)
    num_in = int(mask.sum())
    n_adv = 0 if logits_adv is None else logits_adv.shape[0]
    if n_adv == M * B:  # all images (also the subset layout when every image is masked in)
        kl = _kl(p_bar, F.log_softmax(_at_least_fp32(logits_adv).view(M, B, -1), dim=-1))  # [M, B]
        loss_madv = torch.where(mask, lbd * kl.max(0).values, loss_madv)
    elif n_adv == M * num_in and num_in > 0:  # masked-in images only
        kl = _kl(p_bar[mask], F.log_softmax(_at_least_fp32(logits_adv).view(M, num_in, -1), dim=-1))  # [M, K]
        loss_madv = loss_madv.masked_scatter(mask, lbd * kl.max(0).values)
    elif num_in > 0 or n_adv != 0:
        raise ValueError(
            f"logits_adv has {n_adv} rows; expected {M * B} (all images) or {M * num_in} (the {num_in} masked-in images)"
        )
    return (loss_sce + loss_madv).mean(), loss_sce, loss_madv


def denoised_attack(
    classifier: nn.Module,
    clean: torch.Tensor,
    denoised: torch.Tensor,
    target_probs: torch.Tensor,
    num_noises: int,
    eps: float,
    steps: int,
) -> torch.Tensor:
    """Adversarial search on the denoised residual (SPEC section 4, step 5); returns ``clean + eta``.

    ``clean`` and ``denoised`` are ``[M*B', ...]`` in the noise-major layout (``clean`` repeated M times),
    ``target_probs`` the ``[B', C]`` consistency targets p_bar (used detached). With eta0 = denoised - clean,
    ``steps`` times:

        loss = sum_i (1/M) sum_j KL(p_bar_i || softmax f(clean_ij + eta_ij))
        eta <- eta + (2 eps / steps) * g / ||g||_2          (g = d loss / d eta, normalized per sample)
        eta <- eta0 + Proj_{||.||_2 <= eps}(eta - eta0)      (per sample)
        eta <- (eta - mean eta) / rms eta * rms eta0 + mean eta0   (per sample)

    ``eps`` is in the inputs' own units. Our images are [0, 1] pixels; the reference works on [-1, 1] with
    eps = eps_ref / 256, so ``--eps 64`` is 64/256 = 0.25 there and **0.125** here (the search is otherwise
    scale-free). The classifier runs in eval mode with its parameters frozen; its training mode and each
    parameter's ``requires_grad`` are restored afterwards, and no ``.grad`` is touched.

    As in the reference, the re-standardization comes after the projection: it keeps each sample's mean exactly
    and its RMS up to the change of the mean (rms' = sqrt(mean0^2 + var(eta) rms0^2 / rms(eta)^2)), and may move
    eta by O(eps^2 / ||eta0 - mean0||) beyond the eps-ball; both are negligible for denoising residuals.
    """
    if steps <= 0 or eps <= 0:
        return denoised.detach().clone()
    M = num_noises
    n = clean.shape[0]
    target = _at_least_fp32(target_probs.detach())
    eta0 = (denoised - clean).detach()
    mean0 = eta0.flatten(1).mean(1).view(_per_sample(eta0))
    rms0 = eta0.flatten(1).pow(2).mean(1).sqrt().view(_per_sample(eta0))
    step_size = 2.0 * eps / steps

    was_training = classifier.training
    requires_grad = [p.requires_grad for p in classifier.parameters()]
    classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    try:
        eta = eta0.clone()
        with torch.enable_grad():
            for _ in range(steps):
                eta.requires_grad_(True)
                log_q = F.log_softmax(_at_least_fp32(classifier(clean + eta)), dim=-1).view(M, n // M, -1)
                loss = _kl(target, log_q).sum() / M
                (grad,) = torch.autograd.grad(loss, [eta])
                grad = grad / (grad.flatten(1).norm(dim=1).view(_per_sample(grad)) + 1e-8)
                delta = eta.detach() + step_size * grad - eta0
                delta_norm = delta.flatten(1).norm(dim=1).view(_per_sample(delta))
                eta = eta0 + delta * (eps / delta_norm.clamp_min(1e-12)).clamp(max=1.0)
                mean = eta.flatten(1).mean(1).view(_per_sample(eta))
                rms = eta.flatten(1).pow(2).mean(1).sqrt().view(_per_sample(eta))
                eta = (eta - mean) / rms.clamp_min(1e-12) * rms0 + mean0
    finally:
        for p, flag in zip(classifier.parameters(), requires_grad):
            p.requires_grad_(flag)
        classifier.train(was_training)
    return (clean + eta).detach()


def cadis_objective(
    classifier: nn.Module,
    clean: torch.Tensor,
    denoised: torch.Tensor,
    targets: torch.Tensor,
    num_noises: int,
    lbd: float,
    eps: float,
    steps: int,
    warm_start: bool = True,
    masked_only: bool = True,
    forward_model: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One FT-CADIS loss evaluation on denoised images: logits, attack, adversarial logits, :func:`cadis_loss`.

    ``clean``/``denoised``: ``[M*B', ...]`` noise-major, ``targets``: ``[B']``. The classifier should be in train
    mode. ``forward_model`` (default ``classifier``; e.g. its ``DistributedDataParallel`` wrapper) computes the
    logits of the denoised images; the attack and the adversarial forward use ``classifier`` itself.
    With ``masked_only`` the attack and the adversarial forward run only for the K images whose M copies are
    all non-hallucinated (the only ones with a non-zero L_MAdv): same loss and gradients, M*(B'-K) fewer rows
    (identical only when the forward has no randomness across rows, e.g. drop path 0).

    Returns ``(loss, loss_sce, loss_madv, correct)``, ``correct`` the ``[M, B']`` non-hallucinated mask.
    """
    M = num_noises
    logits = (forward_model if forward_model is not None else classifier)(denoised)
    correct = non_hallucinated(logits, targets, M)
    p_bar = F.softmax(_at_least_fp32(logits).view(M, targets.shape[0], -1), dim=-1).mean(0)
    if masked_only:
        mask = correct.all(0)
        rows = mask.repeat(M)
        logits_adv = None
        if bool(mask.any()):
            adv = denoised_attack(classifier, clean[rows], denoised[rows], p_bar[mask], M, eps, steps)
            logits_adv = classifier(adv)
    else:
        adv = denoised_attack(classifier, clean, denoised, p_bar, M, eps, steps)
        logits_adv = classifier(adv)
    loss, loss_sce, loss_madv = cadis_loss(logits, logits_adv, targets, M, lbd, warm_start)
    return loss, loss_sce, loss_madv, correct
