"""Sequential CERTIFY: an anytime-valid lower confidence sequence for pA over pre-set checkpoints.

Cohen's selection (:meth:`core.Smooth.select`), then estimation read from one stream of seeded noise blocks
(:meth:`core.Smooth.counts`) up to growing checkpoints n_1 < ... < n_K = n_max, stopping as soon as the requested
radii are decided. The plan (:func:`sequential_plan`: checkpoints and levels), one checkpoint's decision
(:func:`sequential_step`), the estimation through a :class:`core.Smooth` (:func:`estimate_sequential`,
:func:`certify_sequential`; as :data:`core.Steps`, :func:`estimate_sequential_steps`) and a model-free simulator
with the same rules (:func:`simulate_certify`). Design and measurements: docs/SEQUENTIAL.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from scipy.stats import norm

from core import (
    ABSTAIN,
    PHASE_ESTIMATION,
    NoiseStream,
    SampleRange,
    Smooth,
    Steps,
    certificate,
    clopper_pearson_lower,
    draw_key,
    radius,
)
from presets import CIFAR10, PRESETS

# The plan measured best on Cohen's CIFAR-10 logs (scripts/sequential_savings.py, docs/SEQUENTIAL.md): checkpoints
# n_1 = 100, n_{k+1} = ceil(1.25 n_k) up to n_max; half of alpha on n_max, the other half split evenly over the
# earlier checkpoints; futility judged with a level-0.01 upper bound.
SEQUENTIAL_FIRST = 100
SEQUENTIAL_RATIO = 1.25
SEQUENTIAL_FINAL_SHARE = 0.5
FUTILITY_ALPHA = 0.01


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


def certify_sequential(smooth: Smooth, x: torch.Tensor, n0: int, n_max: int, alpha: float, batch_size: int,
                       radii: Sequence[float], generator: Optional[torch.Generator] = None) -> tuple[int, float, int]:
    """Sequential CERTIFY: Cohen's selection, then estimation that stops as soon as the requested radii are decided.

    Selection as in :meth:`core.Smooth.certify` (cAHat from n0 separate samples). Estimation draws the fresh samples
    in growing batches up to the checkpoints n_1 < ... < n_K = n_max of :func:`sequential_plan` and keeps the lower
    confidence sequence pABar_k = max_{j <= k} CP_lower(nA_j, n_j, alpha_j), with sum_j alpha_j = alpha. It stops
    (:func:`sequential_step`) once pABar_k certifies the largest of ``radii``, or once even an optimistic
    continuation to n_max could not certify the next requested radius (radius 0: pA > 1/2), or at n_max, and
    returns R = sigma * Phi^-1(pABar at the stop), abstaining below 1/2.

    Guarantee: with probability at least 1 - alpha, the returned class (when not ABSTAIN) equals g(x) and g is
    constant on the L2 ball of radius R, as for :meth:`core.Smooth.certify`. Why it survives optional stopping: by
    the union bound, P[exists k: CP_lower(nA_k, n_k, alpha_k) > pA] <= sum_k alpha_k = alpha, so the whole sequence
    (pABar_k)_k lies below pA simultaneously for all k with probability >= 1 - alpha. The stopping time, whatever
    rule chose it (here one looking at the counts only, never at the label), is one of the k, so pABar at the stop
    lies below pA on that same event. The samples behind all checkpoints are one prefix of the estimation stream,
    cut from fixed seeded noise blocks: the result does not depend on ``batch_size``.

    Args:
        smooth: the smoothed classifier (single-head base classifier).
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
    key = draw_key(generator)
    cAHat = smooth.select(x, n0, batch_size, key)
    if len(cAHat) != 1:
        raise ValueError("certify_sequential takes a single-head base classifier; K heads: estimate_sequential")
    return estimate_sequential(smooth, x, cAHat, n_max, alpha, batch_size, radii, key)[0]


def estimate_sequential(smooth: Smooth, x: torch.Tensor, cAHat: Sequence[int], n_max: int, alpha: float,
                        batch_size: int, radii: Sequence[float], key: int, active: Optional[Sequence[bool]] = None
                        ) -> list[tuple[int, float, int]]:
    """The estimation of :func:`certify_sequential` for each head of ``smooth`` (guess ``cAHat[k]``), until every
    head has stopped; each head's count of samples is its own stop, its result the one it would get alone.

    Args:
        smooth, x, n_max, alpha, batch_size, radii: as for :func:`certify_sequential`.
        cAHat: each head's selection guess (:meth:`core.Smooth.select` of the call ``key``).
        key: the call's key (:func:`core.draw_key`).
        active: the heads to estimate (default all); the others get (their guess, 0.0, 0).

    Returns:
        per head: (cAHat or ABSTAIN, radius, estimation samples used).
    """
    return smooth.run_steps(estimate_sequential_steps(smooth, x, cAHat, n_max, alpha, radii, key, active), batch_size)


def estimate_sequential_steps(smooth: Smooth, x: torch.Tensor, cAHat: Sequence[int], n_max: int, alpha: float,
                              radii: Sequence[float], key: int, active: Optional[Sequence[bool]] = None) -> Steps:
    """:func:`estimate_sequential` as :data:`core.Steps`: it asks for samples n_{k-1} .. n_k - 1 of the estimation
    stream at each checkpoint k. That stream has full blocks (``NoiseStream`` without a length): a prefix does not
    depend on where the checkpoints cut it."""
    plan = sequential_plan(n_max, alpha, radii, smooth.sigma)
    stream = NoiseStream(x, key, PHASE_ESTIMATION, smooth.noise_block)
    heads, counts, start = np.arange(len(cAHat)), 0, 0
    run = SequentialRun(plan, np.ones(len(cAHat), dtype=bool) if active is None else np.array(active, dtype=bool))
    while (n := run.next_checkpoint()) is not None:  # every head's count of its guess among samples 0 .. n - 1
        counts, start = counts + (yield SampleRange(stream, start, n)), n
        run.update(counts.cpu().numpy()[heads, cAHat])
    return [certificate(c, float(pABar), smooth.sigma) + (int(n),) if n else (c, 0.0, 0)
            for c, pABar, n in zip(cAHat, run.lower, run.used)]


class SequentialRun:
    """The checkpoints of ``plan`` for m images (or heads), one at a time, until each has stopped.

    ``lower``: pABar at the stop (so far) [m]; ``used``: the samples at the stop [m] (0 for those never active);
    ``active``: [m] bool, the images still running (updated in place).
    """

    def __init__(self, plan: SequentialPlan, active: np.ndarray):
        self.plan, self.active, self.k = plan, active, 0
        self.lower, self.used = np.zeros(len(active)), np.zeros(len(active), dtype=int)

    def next_checkpoint(self) -> Optional[int]:
        """n_k of the next checkpoint, or None once every image has stopped."""
        return self.plan.checkpoints[self.k] if self.active.any() else None

    def update(self, nA: np.ndarray) -> None:
        """The decision of checkpoint k (:func:`sequential_step`) from the [m] counts nA after n_k samples (read only
        where active)."""
        index = np.flatnonzero(self.active)
        self.lower[index], stop = sequential_step(self.plan, self.k, nA[index], self.lower[index])
        self.used[index[stop]] = self.plan.checkpoints[self.k]
        self.active[index[stop]] = False
        self.k += 1


def run_sequential(plan: SequentialPlan, active: np.ndarray, nA_at: Callable[[int, np.ndarray], np.ndarray]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoints of ``plan`` for m images (or heads) until each has stopped (:class:`SequentialRun`): (pABar
    at the stop [m], samples used [m]; 0 for those never ``active``).

    Args:
        plan: the plan.
        active: [m] bool, the images to run; updated in place (False once stopped).
        nA_at: ``nA_at(n_k, active)`` gives the [m] counts nA after n_k samples (read only where active).
    """
    run = SequentialRun(plan, active)
    while (n := run.next_checkpoint()) is not None:
        run.update(nA_at(n, active))
    return run.lower, run.used


def simulate_certify(pA: np.ndarray, n0: int, n: int, alpha: float, sigma: float, rng: np.random.Generator,
                     radii: Optional[Sequence[float]] = None, num_classes: int = 10,
                     label_is_top: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CERTIFY (``radii`` None) or sequential CERTIFY of images whose pA is known, without a model: vectorized.

    Image i's base classifier returns class 0 with probability pA[i] and each of the other num_classes - 1 classes
    with probability (1 - pA[i]) / (num_classes - 1); the count of a class among m samples is then Binomial(m, p),
    drawn directly. Selection, bounds and stopping are those of :class:`core.Smooth` (:func:`sequential_step`). For
    planning N and alpha, and for measuring validity and savings over many trials.

    Args:
        pA: [m] the probability of class 0 for each image.
        n0, n, alpha, sigma: as in :meth:`core.Smooth.certify` (n = n_max with ``radii``).
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
    R = np.where(certified, radius(np.where(certified, lower, 0.5), sigma), 0.0)
    prediction = np.where(certified, np.where(top, 0, 1), ABSTAIN)
    if label_is_top is not None:  # the skipped rows (estimation drawn above all the same, for a common stream)
        skipped = ~(top & np.asarray(label_is_top, dtype=bool))
        prediction = np.where(skipped, np.where(top, 0, 1), prediction)
        R, used = np.where(skipped, 0.0, R), np.where(skipped, 0, used)
    return prediction, R, used


def _simulate_sequential(p: np.ndarray, plan: SequentialPlan, rng: np.random.Generator
                         ) -> tuple[np.ndarray, np.ndarray]:
    """pABar at the stop and the samples used, for images whose P[f = cAHat] is ``p``."""
    nA, start = np.zeros(len(p)), 0

    def nA_at(n: int, active: np.ndarray) -> np.ndarray:  # the samples start .. n - 1 as one binomial
        nonlocal start
        nA[active] += rng.binomial(n - start, p[active])
        start = n
        return nA

    return run_sequential(plan, np.ones(len(p), dtype=bool), nA_at)
