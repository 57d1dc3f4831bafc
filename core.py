"""Randomized smoothing over denoise->classify (Cohen et al. 2019; Carlini et al. 2023) and the FT-CADIS objective.

The two halves of this module:

* certification: :class:`DenoisedClassifier` (f o D on noisy inputs) and :class:`Smooth` (CERTIFY / PREDICT);
* fine-tuning: the FT-CADIS step of METHOD §4 as one function per equation, in its order:
  :func:`noise_and_denoise`, :func:`non_hallucinated`, :func:`selective_ce`, :func:`consistency_target`,
  :func:`denoised_attack`, :func:`masked_adversarial_loss`, composed by :func:`cadis_loss` (the loss) and
  :func:`cadis_objective` (forward, attack, loss). The attack radius is on the [0, 1] pixel scale inside the code;
  :func:`eps_pixels` converts the ``--eps`` flag (the paper's units) once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest, norm

from presets import CIFAR10, PRESETS
from runkit.devices import autocast
from runkit.logs import ABSTAIN

# ---------------------------------------------------------------------------------------------------------------
# Section 1: smoothing and certification
# ---------------------------------------------------------------------------------------------------------------

# Samples per independently seeded noise block. Part of a certification log's configuration: the noise (hence the
# log) depends on it, never on the batch size.
NOISE_BLOCK = 1000
# Noise phases of one call: selection and estimation samples of CERTIFY never share a generator.
PHASE_SELECTION, PHASE_ESTIMATION, PHASE_PREDICTION = 0, 1, 2
# Last entry of the seeds of multi-step denoising's per-sample generators (never a noise block's seed).
CHAIN_TAG = 0x636861696E


class DenoisedClassifier(nn.Module):
    """The base classifier of denoised smoothing: x + delta -> f(D(x + delta)) (Carlini et al. 2023).

    D is a one-shot diffusion denoiser called at t_star = ``denoiser.timestep_for_sigma(sigma)`` (the diffusion step
    whose noise level matches sigma, METHOD §1), f the classifier. ``denoiser=None`` gives the classifier alone,
    i.e. plain Gaussian smoothing (Cohen et al. 2019). Input: noisy images ``[B, 3, H, W]`` in pixel space (``[0, 1]``
    plus noise, not clipped); output: logits ``[B, num_classes]``. The noise itself is added by :class:`Smooth`.
    ``multistep``: D runs the whole reverse chain t_star, ..., 0 instead (``denoise_multistep``, t_star + 1 UNet
    calls), its posterior noise drawn from ``generators`` (one per image; :class:`Smooth` seeds them per sample).
    """

    def __init__(self, denoiser: Optional[nn.Module], classifier: nn.Module, sigma: float, multistep: bool = False):
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier
        self.sigma = sigma
        self.multistep = multistep and denoiser is not None
        self.t_star: Optional[int] = None if denoiser is None else int(denoiser.timestep_for_sigma(sigma))

    def forward(self, x_noisy: torch.Tensor, generators: Optional[list[torch.Generator]] = None) -> torch.Tensor:
        if self.multistep:
            x_hat = self.denoiser.denoise_multistep(x_noisy, self.t_star, generators)
        else:  # Smooth has added the noise: no more is drawn (sigma 0)
            x_hat = noise_and_denoise(self.denoiser, x_noisy, self.t_star)
        return self.classifier(x_hat)


class ClassifierStack(nn.Module):
    """K classifiers applied to the same input: logits ``[B, K, num_classes]``.

    As the classifier of a :class:`DenoisedClassifier`, each noisy sample is denoised once and classified by all K;
    :meth:`Smooth.certify_heads` then certifies each of the K base classifiers on its own counts.
    """

    def __init__(self, classifiers: Sequence[nn.Module]):
        super().__init__()
        self.classifiers = nn.ModuleList(classifiers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([classifier(x) for classifier in self.classifiers], 1)


def block_seed(key: int, phase: int, block: int) -> int:
    """The 64-bit seed of noise block ``block`` of phase ``phase`` of a call whose key is ``key``."""
    return int(np.random.SeedSequence([key, phase, block]).generate_state(1, np.uint64)[0])


def sample_generators(key: int, phase: int, start: int, count: int, device: torch.device) -> list[torch.Generator]:
    """Generators for samples ``start .. start + count - 1`` of phase ``phase`` of a call whose key is ``key``, one per
    sample (seeded by (key, phase, sample, "chain")): the posterior noise of multi-step denoising, independent of the
    batch a sample falls in and of the smoothing noise's blocks."""
    out = []
    for i in range(start, start + count):
        seed = int(np.random.SeedSequence([key, phase, i, CHAIN_TAG]).generate_state(1, np.uint64)[0])
        out.append(torch.Generator(device=device).manual_seed(seed))
    return out


def image_generator(seed: int, idx: int) -> torch.Generator:
    """A CPU generator seeded by (seed, dataset index): an image's samples do not depend on batching, sharding or
    resuming."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, idx]).generate_state(1, np.uint64)[0]))


# ---------------------------------------------------------------------------------------------------------------
# Sequential CERTIFY: an anytime-valid lower confidence sequence for pA over pre-set checkpoints
# ---------------------------------------------------------------------------------------------------------------

# The plan measured best on Cohen's CIFAR-10 logs (scripts/sequential_savings.py, docs/SEQUENTIAL.md): checkpoints
# n_1 = 100, n_{k+1} = ceil(1.25 n_k) up to n_max; half of alpha on n_max, the other half split evenly over the
# earlier checkpoints; futility judged with a level-0.01 upper bound.
SEQUENTIAL_FIRST = 100
SEQUENTIAL_RATIO = 1.25
SEQUENTIAL_FINAL_SHARE = 0.5
FUTILITY_ALPHA = 0.01


def clopper_pearson_lower(nA: np.ndarray | float, n: int, alpha: float | np.ndarray) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from nA successes of n: Beta^-1(alpha; nA, n - nA + 1).

    Vectorized over ``nA`` (which may be fractional, for projections); 0 where nA = 0. Equals
    ``proportion_confint(nA, n, alpha=2*alpha, method="beta")[0]`` (Cohen's CERTIFY bound).
    """
    nA = np.asarray(nA, dtype=float)
    return np.where(nA > 0, beta_dist.ppf(alpha, np.maximum(nA, 1e-300), n - nA + 1), 0.0)


def clopper_pearson_upper(nA: np.ndarray | float, n: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on p from nA of n: Beta^-1(1 - alpha; nA + 1, n - nA)."""
    return 1.0 - clopper_pearson_lower(n - np.asarray(nA, dtype=float), n, alpha)


def checkpoint_schedule(n_max: int, first: int = SEQUENTIAL_FIRST, ratio: float = SEQUENTIAL_RATIO) -> list[int]:
    """Sample counts n_1 = min(first, n_max) < n_2 < ... < n_K = n_max with n_{k+1} = min(ceil(ratio n_k), n_max)."""
    checkpoints = [min(first, n_max)]
    while checkpoints[-1] < n_max:
        checkpoints.append(min(n_max, max(checkpoints[-1] + 1, math.ceil(checkpoints[-1] * ratio))))
    return checkpoints


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """sigma * Phi^-1(alpha^(1/n)): the radius of nA = n, the largest that n samples at level alpha can certify."""
    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def default_sequential_radii(dataset: str, sigma: float, n_max: int, alpha: float) -> list[float]:
    """0 and the paper's table radii of ``dataset`` up to the largest radius sequential CERTIFY can certify with
    n_max samples (at n_max it spends alpha_K = SEQUENTIAL_FINAL_SHARE * alpha); another dataset: CIFAR-10's radii
    (:attr:`presets.Preset.table_radii`)."""
    largest = max_certifiable_radius(sigma, n_max, SEQUENTIAL_FINAL_SHARE * alpha)
    return [0.0] + [r for r in PRESETS.get(dataset, CIFAR10).table_radii if r <= largest]


@dataclass(frozen=True)
class SequentialPlan:
    """What sequential CERTIFY decides with: checkpoints n_k, their levels alpha_k (sum_k alpha_k = alpha), the pA
    thresholds Phi(r / sigma) of the requested radii (radius 0 -> 1/2), and the futility level."""

    checkpoints: tuple[int, ...]
    alphas: tuple[float, ...]
    thresholds: tuple[float, ...]
    futility_alpha: float = FUTILITY_ALPHA

    @property
    def n_max(self) -> int:
        return self.checkpoints[-1]


def sequential_plan(n_max: int, alpha: float, radii: Sequence[float], sigma: float,
                    first: int = SEQUENTIAL_FIRST, ratio: float = SEQUENTIAL_RATIO,
                    final_share: float = SEQUENTIAL_FINAL_SHARE, futility_alpha: float = FUTILITY_ALPHA
                    ) -> SequentialPlan:
    """The union-bound plan: alpha_K = final_share * alpha at n_K = n_max, (1 - final_share) * alpha / (K - 1) at
    each earlier checkpoint (all of alpha at n_max when K = 1).

    Args:
        n_max: the most estimation samples (the last checkpoint).
        alpha: the failure probability of the whole sequence.
        radii: the requested radii (>= 0); each gives the threshold pA > Phi(r / sigma).
        sigma: the noise level.
        first, ratio: the checkpoint schedule (:func:`checkpoint_schedule`).
        final_share: the part of alpha spent at n_max.
        futility_alpha: level of the upper bound that decides futility stops (never affects validity).
    """
    if not radii or min(radii) < 0:
        raise ValueError(f"radii must be a non-empty list of radii >= 0, got {list(radii)}")
    checkpoints = checkpoint_schedule(n_max, first, ratio)
    K = len(checkpoints)
    alphas = [alpha] if K == 1 else [(1 - final_share) * alpha / (K - 1)] * (K - 1) + [final_share * alpha]
    thresholds = sorted({float(norm.cdf(r / sigma)) for r in radii})
    return SequentialPlan(tuple(checkpoints), tuple(alphas), tuple(thresholds), futility_alpha)


def sequential_step(plan: SequentialPlan, k: int, nA: np.ndarray, lower_so_far: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One checkpoint of sequential CERTIFY, vectorized over images: ``(pABar, stop)`` after nA successes of n_k.

    pABar_k = max(pABar_{k-1}, CP_lower(nA, n_k, alpha_k)) (the running maximum: still inside the union bound).
    Stop when pABar_k certifies the largest threshold, at n_max, or when even an optimistic continuation cannot
    certify the next threshold t above pABar_k: with U = CP_upper(nA, n_k, futility_alpha), the projected count
    nA + U (n_max - n_k) at n_max would still give CP_lower(., n_max, alpha_K) < t. That includes U < t, i.e.
    pA > t is implausible; with t = 1/2, abstention. Only the stopping time depends on U; validity does not.
    """
    n = plan.checkpoints[k]
    lower = np.maximum(lower_so_far, clopper_pearson_lower(nA, n, plan.alphas[k]))
    if k == len(plan.checkpoints) - 1:
        return lower, np.ones_like(lower, dtype=bool)
    thresholds = np.asarray(plan.thresholds)
    above = lower[:, None] < thresholds[None, :]
    next_threshold = np.where(above.any(1), thresholds[above.argmax(1)], np.inf)
    upper = clopper_pearson_upper(nA, n, plan.futility_alpha)
    projected = clopper_pearson_lower(nA + upper * (plan.n_max - n), plan.n_max, plan.alphas[-1])
    return lower, ~above.any(1) | (projected < next_threshold)


def radius_from_bound(pABar: float, sigma: float) -> tuple[bool, float]:
    """(certified, R): R = sigma Phi^-1(pABar) when pABar >= 1/2 (Cohen et al. Theorem 1), else (False, 0.0)."""
    if pABar < 0.5:
        return False, 0.0
    return True, float(sigma * norm.ppf(pABar))


class Smooth:
    """A smoothed classifier g(x) = argmax_c P[f(x + delta) = c], delta ~ N(0, sigma^2 I) (Cohen et al. 2019).

    The noise is drawn here, on x's device, exactly at sigma (and in float32 even under ``precision``, which only
    autocasts the base classifier). Each call draws one key from ``generator`` (default: torch's global RNG); block b
    of ``noise_block`` samples of phase p then comes from its own generator seeded by (key, p, b). The samples are thus
    a function of the generator's state, n0, n and ``noise_block`` only, not of ``batch_size``, and CERTIFY's
    selection and estimation samples are independent. Class counts stay on the device until the selection guess
    and the estimation counts are read (sequential CERTIFY: the counts at each checkpoint).
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
        prediction, radius, _ = self.certify_heads(x, n0, n, alpha, batch_size, generator=generator)[0]
        return prediction, radius

    def certify_sequential(self, x: torch.Tensor, n0: int, n_max: int, alpha: float, batch_size: int,
                           radii: Sequence[float], generator: Optional[torch.Generator] = None
                           ) -> tuple[int, float, int]:
        """Sequential CERTIFY: Cohen's selection, then estimation that stops as soon as the requested radii are decided.

        Selection as in :meth:`certify` (cAHat from n0 separate samples). Estimation draws the fresh samples in
        growing batches up to the checkpoints n_1 < ... < n_K = n_max of :func:`sequential_plan` and keeps the lower
        confidence sequence pABar_k = max_{j <= k} CP_lower(nA_j, n_j, alpha_j), with sum_j alpha_j = alpha. It stops
        (:func:`sequential_step`) once pABar_k certifies the largest of ``radii``, or once even an optimistic
        continuation to n_max could not certify the next requested radius (radius 0: pA > 1/2), or at n_max, and
        returns R = sigma * Phi^-1(pABar at the stop), abstaining below 1/2.

        Guarantee: with probability at least 1 - alpha, the returned class (when not ABSTAIN) equals g(x) and g is
        constant on the L2 ball of radius R, as for :meth:`certify`. Why it survives optional stopping: by the union
        bound, P[exists k: CP_lower(nA_k, n_k, alpha_k) > pA] <= sum_k alpha_k = alpha, so the whole sequence
        (pABar_k)_k lies below pA simultaneously for all k with probability >= 1 - alpha. The stopping time, whatever
        rule chose it (here one looking at the counts only, never at the label), is one of the k, so pABar at the
        stop lies below pA on that same event. The samples behind all checkpoints are one prefix of the estimation
        stream, cut from fixed seeded noise blocks: the result does not depend on ``batch_size``.

        Args:
            x: the input [C x H x W] in [0, 1], on the base classifier's device.
            n0: selection samples.
            n_max: the most estimation samples.
            alpha: the failure probability.
            batch_size: base-classifier batch (does not change the result).
            radii: the requested radii (>= 0), e.g. a paper table's (include 0 to decide abstentions early).
            generator: CPU generator from which this call's noise is seeded (default: torch's global RNG).

        Returns:
            (cAHat or ABSTAIN, radius, estimation samples used).
        """
        return self.certify_heads(x, n0, n_max, alpha, batch_size, radii=radii, generator=generator)[0]

    def certify_heads(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                      radii: Optional[Sequence[float]] = None, generator: Optional[torch.Generator] = None,
                      label: Optional[int] = None) -> list[tuple[int, float, int]]:
        """CERTIFY (``radii`` None, n estimation samples) or sequential CERTIFY (n = n_max) of every head at once.

        A base classifier with logits [B x K x num_classes] is K base classifiers sharing each noise sample (e.g. one
        denoiser, K classifiers): each head gets exactly the result it would get alone with the same generator. With
        ``radii``, sampling goes on until every head has stopped; each head's count is its own stop.
        ``label`` (evaluation only, never for deployment): a head whose selection guess differs from it skips
        estimation and gets (guess, 0.0, 0), i.e. a row that counts as wrong; no estimation at all if every head does.

        Args:
            x, n0, n, alpha, batch_size, generator: as in :meth:`certify` (n = n_max with ``radii``).
            radii: requested radii of sequential CERTIFY (:meth:`certify_sequential`); None = fixed n.
            label: the true label, for the label-aware early exit.

        Returns:
            per head: (cAHat or ABSTAIN, radius, estimation samples used).
        """
        self.base_classifier.eval()
        key = self._draw_key(generator)
        cAHat = self._sample_noise(x, n0, batch_size, key, PHASE_SELECTION).reshape(-1, self.num_classes)
        cAHat = [int(c) for c in cAHat.argmax(1).cpu()]  # cAHat: the selection guess of each head
        skipped = [label is not None and c != label for c in cAHat]
        if all(skipped):
            results = [(c, 0.0, 0) for c in cAHat]
        elif radii is None:
            counts = self._sample_noise(x, n, batch_size, key, PHASE_ESTIMATION).reshape(-1, self.num_classes).cpu()
            results = [self._fixed_result(int(counts[k, c]), n, alpha, c) for k, c in enumerate(cAHat)]
        else:
            results = self._sequential_results(x, cAHat, skipped, n, alpha, batch_size, radii, key)
        return [(c, 0.0, 0) if skip else result for c, skip, result in zip(cAHat, skipped, results)]

    def _fixed_result(self, nA: int, n: int, alpha: float, cAHat: int) -> tuple[int, float, int]:
        certified, radius = radius_from_bound(self._lower_confidence_bound(nA, n, alpha), self.sigma)
        return (cAHat if certified else Smooth.ABSTAIN), radius, n

    def _sequential_results(self, x: torch.Tensor, cAHat: list[int], skipped: list[bool], n_max: int, alpha: float,
                            batch_size: int, radii: Sequence[float], key: int) -> list[tuple[int, float, int]]:
        """Estimation of :meth:`certify_sequential` for every head not ``skipped``, until all have stopped."""
        plan = sequential_plan(n_max, alpha, radii, self.sigma)
        heads = np.arange(len(cAHat))
        active = ~np.asarray(skipped)
        lower, used = np.zeros(len(cAHat)), np.zeros(len(cAHat), dtype=int)
        counts = torch.zeros(len(cAHat), self.num_classes, dtype=torch.long, device=x.device)
        blocks: dict[int, torch.Tensor] = {}
        start = 0
        for k, n in enumerate(plan.checkpoints):
            batches = self._range_batches(x, start, n, batch_size, key, PHASE_ESTIMATION, blocks)
            counts += self._count(x, batches, min(batch_size, n - start), key, PHASE_ESTIMATION,
                                  start).reshape(len(cAHat), -1)
            start = n
            nA = counts.cpu().numpy()[heads, cAHat]
            new_lower, stop = sequential_step(plan, k, nA[active], lower[active])
            lower[active] = new_lower
            used[np.flatnonzero(active)[stop]] = n
            active[np.flatnonzero(active)[stop]] = False
            if not active.any():
                break
        results = []
        for c, pABar, n in zip(cAHat, lower, used):
            certified, radius = radius_from_bound(float(pABar), self.sigma)
            results.append(((c if certified else Smooth.ABSTAIN), radius, int(n)))
        return results

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
        if counts.ndim != 1:
            raise ValueError("predict takes a single-head base classifier (logits [B x num_classes])")
        top2 = np.argsort(-counts, kind="stable")[:2]
        count1, count2 = int(counts[top2[0]]), int(counts[top2[1]])
        if binomtest(count1, count1 + count2, p=0.5).pvalue > alpha:
            return Smooth.ABSTAIN
        return int(top2[0])

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int, key: int, phase: int) -> torch.Tensor:
        """Counts of the base classifier's predictions f(x + delta) over ``num`` noise samples of phase ``phase``.

        :return: a LongTensor [num_classes] (a multi-head base classifier: [K x num_classes]) on x's device (no host
                 synchronization)
        """
        return self._count(x, self._noise_batches(x, num, batch_size, key, phase), min(batch_size, num), key, phase)

    def _count(self, x: torch.Tensor, batches: Iterator[torch.Tensor], max_batch: int, key: int, phase: int,
               start: int = 0) -> torch.Tensor:
        """Class counts of f(x + sigma * noise) over the noise ``batches`` (each of at most ``max_batch`` samples),
        samples ``start, start + 1, ...`` of phase ``phase`` of the call with key ``key``."""
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=x.device)
        ones = torch.ones(max(max_batch, 1), dtype=torch.long, device=x.device)
        with torch.inference_mode():
            for noise in batches:
                with autocast(x.device, self.precision):
                    predictions = self._logits(x + self.sigma * noise, key, phase, start).argmax(-1)
                if predictions.dim() == 2:  # K heads: count head k's class c at k * num_classes + c
                    if counts.numel() == self.num_classes:
                        counts = counts.repeat(predictions.shape[1])
                    predictions = predictions + self.num_classes * torch.arange(predictions.shape[1],
                                                                                device=x.device)
                    predictions = predictions.flatten()
                    if len(ones) < len(predictions):
                        ones = torch.ones(len(predictions), dtype=torch.long, device=x.device)
                # index_add_ rather than bincount: CUDA bincount reads max/min back to the host (a sync per batch)
                counts.index_add_(0, predictions, ones[: len(predictions)])
                start += len(noise)
        return counts if counts.numel() == self.num_classes else counts.view(-1, self.num_classes)

    def _block(self, x: torch.Tensor, key: int, phase: int, block: int, size: int) -> torch.Tensor:
        """The first ``size`` standard normal samples [size x C x H x W] of noise block ``block`` of ``phase``."""
        g = torch.Generator(device=x.device)
        g.manual_seed(block_seed(key, phase, block))
        return torch.randn((size, *x.shape), generator=g, device=x.device,
                           dtype=torch.promote_types(x.dtype, torch.float32))

    def _logits(self, x_noisy: torch.Tensor, key: int, phase: int, start: int) -> torch.Tensor:
        """The base classifier on samples ``start ..`` of a phase; a multi-step denoiser gets per-sample generators."""
        model = self.base_classifier
        if isinstance(model, DenoisedClassifier) and model.multistep:
            return model(x_noisy, sample_generators(key, phase, start, len(x_noisy), x_noisy.device))
        return model(x_noisy)

    def _noise_batches(self, x: torch.Tensor, num: int, batch_size: int, key: int, phase: int
                       ) -> Iterator[torch.Tensor]:
        """Standard normal noise [<= batch_size x C x H x W] for ``num`` samples, cut from fixed-size seeded blocks."""
        pending: list[torch.Tensor] = []
        buffered = 0
        for block, start in enumerate(range(0, num, self.noise_block)):
            pending.append(self._block(x, key, phase, block, min(self.noise_block, num - start)))
            buffered += len(pending[-1])
            while buffered >= batch_size:
                noise = pending[0] if len(pending) == 1 else torch.cat(pending)
                pending = [noise[batch_size:]] if len(noise) > batch_size else []
                buffered -= batch_size
                yield noise[:batch_size]
        if buffered:
            yield pending[0] if len(pending) == 1 else torch.cat(pending)

    def _range_batches(self, x: torch.Tensor, start: int, stop: int, batch_size: int, key: int, phase: int,
                       blocks: dict[int, torch.Tensor]) -> Iterator[torch.Tensor]:
        """Noise samples start .. stop - 1 of ``phase`` in batches of <= batch_size, cut from FULL seeded blocks.

        Full blocks, so that any prefix of the stream is the same whatever the checkpoints (for n a multiple of
        noise_block, the first n samples are those of :meth:`_noise_batches`). ``blocks`` caches the blocks a later
        range still needs.
        """
        size = self.noise_block
        for s in range(start, stop, batch_size):
            e = min(stop, s + batch_size)
            parts = []
            for b in range(s // size, (e - 1) // size + 1):
                if b not in blocks:
                    blocks[b] = self._block(x, key, phase, b, size)
                parts.append(blocks[b][max(s - b * size, 0): min(e - b * size, size)])
            for b in [b for b in blocks if b < e // size]:
                del blocks[b]
            yield parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def _draw_key(generator: Optional[torch.Generator]) -> int:
        device = generator.device if generator is not None else torch.device("cpu")
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())

    @staticmethod
    def _lower_confidence_bound(NA: int, N: int, alpha: float) -> float:
        """A one-sided (1 - alpha) Clopper-Pearson lower confidence bound on a Bernoulli proportion from NA of N:
        Beta^-1(alpha; NA, N - NA + 1) (:func:`clopper_pearson_lower`, bit for bit statsmodels' ``proportion_confint(NA,
        N, alpha=2*alpha, method="beta")[0]``, Cohen's call)."""
        return float(clopper_pearson_lower(NA, N, alpha))


def simulate_certify(pA: np.ndarray, n0: int, n: int, alpha: float, sigma: float, rng: np.random.Generator,
                     radii: Optional[Sequence[float]] = None, num_classes: int = 10,
                     label_is_top: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CERTIFY (``radii`` None) or sequential CERTIFY of images whose pA is known, without a model: vectorized.

    Image i's base classifier returns class 0 with probability pA[i] and each of the other num_classes - 1 classes
    with probability (1 - pA[i]) / (num_classes - 1); the count of a class among m samples is then Binomial(m, p),
    drawn directly. Selection, bounds and stopping are those of :class:`Smooth` (:func:`sequential_step`). For
    planning N and alpha, and for measuring validity and savings over many trials.

    Args:
        pA: [m] the probability of class 0 for each image.
        n0, n, alpha, sigma: as in :meth:`Smooth.certify` (n = n_max with ``radii``).
        rng: numpy generator of the counts.
        radii: requested radii of sequential CERTIFY; None = fixed n.
        num_classes: classes of the simulated base classifier (>= 2).
        label_is_top: [m] whether class 0 is image i's label, for the label-aware early exit (``certify.py
            --skip_wrong``): an image whose selection guess is not its label gets (guess, 0.0, 0). None: no exit.

    Returns:
        (prediction [m]: 0 = the class of pA, 1 = another class, ABSTAIN; radius [m]; estimation samples used [m]).
    """
    pA = np.asarray(pA, dtype=float)
    p_other = (1 - pA) / (num_classes - 1)
    selection = rng.multinomial(n0, np.stack([pA] + [p_other] * (num_classes - 1), axis=-1))
    top = selection.argmax(1) == 0
    p = np.where(top, pA, p_other)  # P[f = cAHat]
    if radii is None:
        lower, used = clopper_pearson_lower(rng.binomial(n, p), n, alpha), np.full(len(p), n)
    else:
        lower, used = _simulate_sequential(p, sequential_plan(n, alpha, radii, sigma), rng)
    certified = lower >= 0.5
    radius = np.where(certified, sigma * norm.ppf(np.where(certified, lower, 0.5)), 0.0)
    prediction = np.where(certified, np.where(top, 0, 1), Smooth.ABSTAIN)
    if label_is_top is not None:  # the skipped rows (estimation drawn above all the same, for a common stream)
        skipped = ~(top & np.asarray(label_is_top, dtype=bool))
        prediction = np.where(skipped, np.where(top, 0, 1), prediction)
        radius, used = np.where(skipped, 0.0, radius), np.where(skipped, 0, used)
    return prediction, radius, used


def _simulate_sequential(p: np.ndarray, plan: SequentialPlan, rng: np.random.Generator
                         ) -> tuple[np.ndarray, np.ndarray]:
    """pABar at the stop and the samples used, for images whose P[f = cAHat] is ``p``."""
    nA, lower, used = np.zeros(len(p)), np.zeros(len(p)), np.zeros(len(p), dtype=int)
    active = np.ones(len(p), dtype=bool)
    start = 0
    for k, n in enumerate(plan.checkpoints):
        nA[active] += rng.binomial(n - start, p[active])
        start = n
        index = np.flatnonzero(active)
        lower[index], stop = sequential_step(plan, k, nA[index], lower[index])
        used[index[stop]] = n
        active[index[stop]] = False
        if not active.any():
            break
    return lower, used


# ---------------------------------------------------------------------------------------------------------------
# Section 2: the FT-CADIS objective
# ---------------------------------------------------------------------------------------------------------------

# The one unit of the attack radius eps inside the code is the [0, 1] pixel scale. The ``--eps`` flag is in the
# paper's units (eps/256 on the [-1, 1] scale, METHOD §4 step 5); :func:`eps_pixels` is the only conversion.
EPS_FLAG_DIVISOR = 512.0  # eps/256 on [-1, 1] = eps/512 on [0, 1]


def eps_pixels(eps: float) -> float:
    """The attack radius on our [0, 1] pixels for ``--eps eps``: eps/256 on [-1, 1] = eps/512 here (64 -> 0.125).

    Args:
        eps: the radius in the paper's units (the ``--eps`` flag of train.py, e.g. 64).
    """
    return eps / EPS_FLAG_DIVISOR


def _per_sample(x: torch.Tensor) -> tuple[int, ...]:
    """Shape that broadcasts one value per sample (dim 0) over the rest of ``x``."""
    return (x.shape[0],) + (1,) * (x.dim() - 1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in float32 (float64 stays float64), whatever the autocast dtype of the logits."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _kl(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_c p_c (log p_c - log q_c) over the last dim, 0 log 0 = 0 (also in the gradient)."""
    return (p * (p.clamp_min(torch.finfo(p.dtype).tiny).log() - log_q)).sum(-1)


def noise_and_denoise(denoiser: Optional[nn.Module], x: torch.Tensor, t_star: Optional[int], sigma: float = 0.0,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Step 1: x_hat = D(x + delta), delta ~ N(0, sigma^2 I), one-shot at t_star, no gradient through D.

    The one place where images are noised and denoised for the classifier: the training loop, the per-epoch test
    accuracy, bench.py's fine-tuning step and :class:`DenoisedClassifier` (whose input :class:`Smooth` has already
    noised: it passes ``sigma=0``, so no noise is drawn here).

    Args:
        denoiser: a ``denoiser.DiffusionDenoiser``, or None for plain Gaussian smoothing (x_hat = x + delta).
        x: images ``[B, 3, H, W]`` on the [0, 1] pixel scale (or already noisy ones with ``sigma=0``).
        t_star: the diffusion step whose noise level matches sigma (``denoiser.timestep_for_sigma``).
        sigma: the noise level; 0 draws no noise.
        generator: the generator of delta (default: torch's global RNG on x's device).

    Returns:
        x_hat ``[B, 3, H, W]`` in x's dtype, not requiring grad.
    """
    with torch.no_grad():
        if sigma:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x if denoiser is None else denoiser.denoise(x, t_star)


def non_hallucinated(logits_denoised: torch.Tensor, targets: torch.Tensor, num_noises: int) -> torch.Tensor:
    """Step 2: the mask 1[argmax z_ij = y_i] of non-hallucinated denoised images, ``[M, B']`` bool.

    Args:
        logits_denoised: ``[M*B', C]`` logits z_ij, noise-major (row j*B' + i is noise j, image i).
        targets: ``[B']`` labels y_i.
        num_noises: M.
    """
    M = num_noises
    if logits_denoised.shape[0] != M * targets.shape[0]:
        raise ValueError(f"expected {M} x {targets.shape[0]} rows of logits (noise-major), got {logits_denoised.shape[0]}")
    return logits_denoised.detach().argmax(-1).view(M, -1) == targets


def selective_ce(logits_denoised: torch.Tensor, targets: torch.Tensor, correct: torch.Tensor,
                 warm_start: bool = True) -> torch.Tensor:
    """Step 3: L_SCE,i = (1/M) sum_j 1[non-hallucinated_ij] CE(z_ij, y_i), per image ``[B']``.

    Warm start: an image with no non-hallucinated copy counts its lowest-CE copy instead (the divisor stays M).

    Args:
        logits_denoised: ``[M*B', C]`` logits z_ij, noise-major.
        targets: ``[B']`` labels y_i.
        correct: the ``[M, B']`` mask of :func:`non_hallucinated`.
        warm_start: count the lowest-CE copy of an image with no correct copy.
    """
    M, B = correct.shape
    z = _at_least_fp32(logits_denoised).view(M, B, -1)
    ce = F.cross_entropy(z.flatten(0, 1), targets.repeat(M), reduction="none").view(M, B)
    selected = correct
    if warm_start:
        lowest_ce = F.one_hot(ce.detach().argmin(0), M).T.bool()  # [M, B]
        selected = correct | (lowest_ce & ~correct.any(0))
    return (ce * selected).sum(0) / M


def consistency_target(logits_denoised: torch.Tensor, num_noises: int) -> torch.Tensor:
    """Step 4: p_bar_i = (1/M) sum_j softmax(z_ij), ``[B', C]``, kept in the graph (as in the reference).

    Args:
        logits_denoised: ``[M*B', C]`` logits z_ij, noise-major.
        num_noises: M.
    """
    M = num_noises
    return F.softmax(_at_least_fp32(logits_denoised).view(M, logits_denoised.shape[0] // M, -1), dim=-1).mean(0)


def denoised_attack(
    classifier: nn.Module,
    clean: torch.Tensor,
    denoised: torch.Tensor,
    target_probs: torch.Tensor,
    num_noises: int,
    eps: float,
    steps: int,
) -> torch.Tensor:
    """Step 5: the adversarial search on the denoised residual; returns ``clean + eta``.

    With eta0 = denoised - clean, ``steps`` times (per sample where marked):

        loss = sum_i (1/M) sum_j KL(p_bar_i || softmax f(clean_ij + eta_ij))
        eta <- eta + (2 eps / steps) * g / ||g||_2          (g = d loss / d eta, normalized per sample)
        eta <- eta0 + Proj_{||.||_2 <= eps}(eta - eta0)      (per sample)
        eta <- (eta - mean eta) / rms eta * rms eta0 + mean eta0   (per sample)

    The classifier runs in eval mode with its parameters frozen; its training mode and each parameter's
    ``requires_grad`` are restored afterwards, and no ``.grad`` is touched. As in the reference, the
    re-standardization comes after the projection: it keeps each sample's mean exactly and its RMS up to the change
    of the mean, and may move eta by O(eps^2 / ||eta0 - mean0||) beyond the eps-ball; both are negligible for
    denoising residuals.

    Args:
        classifier: f.
        clean: ``[M*B', ...]`` clean images, noise-major (each image repeated M times).
        denoised: ``[M*B', ...]`` their denoised copies, same layout.
        target_probs: the ``[B', C]`` consistency targets p_bar (used detached).
        num_noises: M.
        eps: the radius on the [0, 1] pixel scale (:func:`eps_pixels` of the ``--eps`` flag).
        steps: search steps (0: no search, the denoised images are returned).
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


def adversarial_logits(classifier: nn.Module, clean: torch.Tensor, denoised: torch.Tensor, p_bar: torch.Tensor,
                       masked_in: torch.Tensor, num_noises: int, eps: float, steps: int,
                       masked_only: bool = True) -> Optional[torch.Tensor]:
    """The train-mode logits z^adv_ij = f(x_i + eta_ij) of :func:`denoised_attack`'s images, ``[M*B', C]``.

    With ``masked_only`` the attack and the forward run only for the K images whose M copies are all
    non-hallucinated (the only ones with a non-zero L_MAdv) and the rows of the other images are zeros: the same
    loss and gradients with M*(B'-K) fewer rows (identical when the forward has no randomness across rows, e.g.
    drop path 0); None when K = 0.

    Args:
        classifier: f, in train mode.
        clean, denoised: ``[M*B', ...]`` noise-major.
        p_bar: ``[B', C]`` consistency targets (:func:`consistency_target`).
        masked_in: ``[B']`` bool, all M copies non-hallucinated (``non_hallucinated(...).all(0)``).
        num_noises: M.
        eps, steps: the attack's radius (pixels) and steps.
        masked_only: attack only the masked-in images.
    """
    M = num_noises
    if not masked_only:
        return classifier(denoised_attack(classifier, clean, denoised, p_bar, M, eps, steps))
    if not bool(masked_in.any()):
        return None
    rows = masked_in.repeat(M)
    logits = classifier(denoised_attack(classifier, clean[rows], denoised[rows], p_bar[masked_in], M, eps, steps))
    return logits.new_zeros((rows.shape[0], logits.shape[-1])).index_put((rows,), logits)


def masked_adversarial_loss(p_bar: torch.Tensor, logits_adv: Optional[torch.Tensor], masked_in: torch.Tensor,
                            num_noises: int, lbd: float) -> torch.Tensor:
    """Step 6: L_MAdv,i = lbd * 1[all M copies of image i non-hallucinated] * max_j KL(p_bar_i || softmax(z^adv_ij)).

    Returns the per-image ``[B']`` terms, in p_bar's dtype.

    Args:
        p_bar: ``[B', C]`` consistency targets, in the graph.
        logits_adv: ``[M*B', C]`` train-mode logits of the adversarial images, noise-major. Rows of masked-out
            images are ignored (their gradient is exactly zero; they must be finite); None when no image is masked in.
        masked_in: ``[B']`` bool, all M copies of image i non-hallucinated.
        num_noises: M.
        lbd: lambda, the weight of the masked adversarial loss.
    """
    M, B = num_noises, p_bar.shape[0]
    zeros = torch.zeros(B, dtype=p_bar.dtype, device=p_bar.device)
    if logits_adv is None and not bool(masked_in.any()):
        return zeros
    if logits_adv is None or logits_adv.shape[0] != M * B:
        rows = 0 if logits_adv is None else logits_adv.shape[0]
        raise ValueError(f"logits_adv has {rows} rows; expected {M * B} (M x B' images, noise-major)")
    kl = _kl(p_bar, F.log_softmax(_at_least_fp32(logits_adv).view(M, B, -1), dim=-1))  # [M, B]
    return torch.where(masked_in, lbd * kl.max(0).values, zeros)


def cadis_loss(
    logits_denoised: torch.Tensor,
    logits_adv: Optional[torch.Tensor],
    targets: torch.Tensor,
    num_noises: int,
    lbd: float,
    warm_start: bool = True,
    *,
    correct: Optional[torch.Tensor] = None,
    p_bar: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 7: loss = mean_i (L_SCE,i + L_MAdv,i) for B' images with M denoised copies each (steps 2-4 and 6).

    Returns ``(loss, loss_sce, loss_madv)``: the scalar total and the per-image ``[B']`` terms (float32, or float64
    for float64 logits).

    Args:
        logits_denoised: ``[M*B', C]`` train-mode logits z_ij of the denoised images, noise-major.
        logits_adv: ``[M*B', C]`` logits of the adversarial images (see :func:`masked_adversarial_loss`).
        targets: ``[B']`` labels y_i.
        num_noises: M.
        lbd: lambda.
        warm_start: see :func:`selective_ce`.
        correct, p_bar: the mask and the consistency target if the caller has them already (each is computed once).
    """
    logits_denoised = _at_least_fp32(logits_denoised)  # one conversion: its gradient is summed in float32
    if correct is None:
        correct = non_hallucinated(logits_denoised, targets, num_noises)
    if p_bar is None:
        p_bar = consistency_target(logits_denoised, num_noises)
    loss_sce = selective_ce(logits_denoised, targets, correct, warm_start)
    loss_madv = masked_adversarial_loss(p_bar, logits_adv, correct.all(0), num_noises, lbd)
    return (loss_sce + loss_madv).mean(), loss_sce, loss_madv


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
    forward_model: Optional[nn.Module] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One FT-CADIS loss evaluation on denoised images (METHOD §4, steps 2-7, in order).

    Returns ``(loss, loss_sce, loss_madv, correct)``, ``correct`` the ``[M, B']`` non-hallucinated mask.

    Args:
        classifier: f, in train mode; the attack and the adversarial forward use it.
        clean, denoised: ``[M*B', ...]`` noise-major (``denoised`` from :func:`noise_and_denoise`).
        targets: ``[B']`` labels.
        num_noises, lbd: M and lambda.
        eps, steps: the attack's radius on [0, 1] pixels (:func:`eps_pixels`) and steps.
        warm_start: see :func:`selective_ce`.
        masked_only: see :func:`adversarial_logits`.
        forward_model: computes the logits of the denoised images (default ``classifier``; e.g. its
            ``DistributedDataParallel`` wrapper).
    """
    M = num_noises
    logits = _at_least_fp32((forward_model if forward_model is not None else classifier)(denoised))
    correct = non_hallucinated(logits, targets, M)
    p_bar = consistency_target(logits, M)
    logits_adv = adversarial_logits(classifier, clean, denoised, p_bar, correct.all(0), M, eps, steps, masked_only)
    loss, loss_sce, loss_madv = cadis_loss(logits, logits_adv, targets, M, lbd, warm_start, correct=correct,
                                           p_bar=p_bar)
    return loss, loss_sce, loss_madv, correct
