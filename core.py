"""Randomized smoothing over denoise->classify (Cohen et al. 2019; Carlini et al. 2023).

The base classifier f o D (:class:`DenoisedClassifier`: a one-shot diffusion denoiser D, then a classifier f; K
classifiers sharing D with :class:`ClassifierStack`) and the smoothed classifier g(x) = argmax_c P[f(D(x + delta)) = c]
(:class:`Smooth`: Cohen et al.'s CERTIFY and PREDICT). The noise of a call is a function of its seed only: each phase
(selection, estimation, prediction) reads its own :class:`NoiseStream` of seeded blocks. Sequential CERTIFY is
in :mod:`sequential`, the FT-CADIS fine-tuning objective in :mod:`cadis`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Generator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest, norm

from runkit.devices import autocast
from runkit.errors import UserError
from runkit.logs import ABSTAIN
from runkit.memory import BatchSize, run_in_batches

# Samples per independently seeded noise block. Part of a certification log's configuration: the noise (hence the
# log) depends on it, never on the batch size.
NOISE_BLOCK = 1000
# Noise phases of one call: selection and estimation samples of CERTIFY never share a generator.
PHASE_SELECTION, PHASE_ESTIMATION, PHASE_PREDICTION = 0, 1, 2
# Last entry of the seeds of multi-step denoising's per-sample generators (never a noise block's seed).
CHAIN_TAG = 0x636861696E


class NonFiniteLogitsError(UserError):
    """The base classifier returned NaN/inf logits while counting (broken weights, an overflow): no result."""


# ---------------------------------------------------------------------------------------------------------------
# The base classifier f o D
# ---------------------------------------------------------------------------------------------------------------


def noise_and_denoise(denoiser: Optional[nn.Module], x: torch.Tensor, t_star: Optional[int], sigma: float = 0.0,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x_hat = D(x + delta), delta ~ N(0, sigma^2 I), one-shot at t_star, no gradient through D.

    The one place where images are noised and denoised for the classifier: :class:`DenoisedClassifier` (whose input
    :class:`Smooth` has already noised: it passes ``sigma=0``, so no noise is drawn here), and step 1 of FT-CADIS
    (:mod:`cadis`) in the training loop, the per-epoch test accuracy and bench.py's fine-tuning step.

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


class DenoisedClassifier(nn.Module):
    """The base classifier of denoised smoothing: x + delta -> f(D(x + delta)) (Carlini et al. 2023).

    D is a one-shot diffusion denoiser called at t_star = ``denoiser.timestep_for_sigma(sigma)`` (the diffusion step
    whose noise level matches sigma, METHOD §1), f the classifier. ``denoiser=None`` gives the classifier alone,
    i.e. plain Gaussian smoothing (Cohen et al. 2019). Input: noisy images ``[B, 3, H, W]`` in pixel space (``[0, 1]``
    plus noise, not clipped); output: logits ``[B, num_classes]``. The noise itself is added by :class:`Smooth`.
    ``multistep``: D runs the whole reverse chain t_star, ..., 0 instead (``denoise_multistep``, t_star + 1 UNet
    calls), its posterior noise drawn from ``generators`` (one per image; a :class:`Smooth` built with
    ``per_sample_generators=True`` seeds them per sample).
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
    :class:`Smooth` counts each head on its own (:meth:`Smooth.counts` is ``[K, num_classes]``), and each of the K
    base classifiers gets exactly the certificate it would get alone with the same generator.
    """

    def __init__(self, classifiers: Sequence[nn.Module]):
        super().__init__()
        self.classifiers = nn.ModuleList(classifiers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([classifier(x) for classifier in self.classifiers], 1)


# ---------------------------------------------------------------------------------------------------------------
# Seeding: the noise of a call is a function of its key only
# ---------------------------------------------------------------------------------------------------------------


def _seed(*entries: int) -> int:
    """A 64-bit seed from a sequence of integers (numpy's SeedSequence: distinct sequences, independent seeds)."""
    return int(np.random.SeedSequence(list(entries)).generate_state(1, np.uint64)[0])


def block_seed(key: int, phase: int, block: int) -> int:
    """The 64-bit seed of noise block ``block`` of phase ``phase`` of a call whose key is ``key``."""
    return _seed(key, phase, block)


def sample_generators(key: int, phase: int, start: int, count: int, device: torch.device) -> list[torch.Generator]:
    """Generators for samples ``start .. start + count - 1`` of phase ``phase`` of a call whose key is ``key``, one per
    sample (seeded by (key, phase, sample, "chain")): the posterior noise of multi-step denoising, independent of the
    batch a sample falls in and of the smoothing noise's blocks."""
    return [torch.Generator(device=device).manual_seed(_seed(key, phase, i, CHAIN_TAG))
            for i in range(start, start + count)]


def image_generator(seed: int, idx: int) -> torch.Generator:
    """A CPU generator seeded by (seed, dataset index): an image's samples do not depend on batching, sharding or
    resuming."""
    return torch.Generator().manual_seed(_seed(seed, idx))


def draw_key(generator: Optional[torch.Generator] = None) -> int:
    """The key of one call (CERTIFY or PREDICT of one image): one draw from ``generator`` (default: torch's global
    RNG). Every noise sample of the call is then seeded by (key, phase, ...)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


@dataclass(eq=False)
class NoiseStream:
    """Standard normal noise samples 0, 1, 2, ... of one phase of one call, each shaped like the input ``x``.

    Sample i is row i mod ``noise_block`` of block b = i // ``noise_block``, drawn on x's device from its own
    generator seeded by :func:`block_seed` (key, phase, b), in float32 (float64 for a float64 x). With ``length``
    (a fixed number of samples, e.g. CERTIFY's n) the last block has only the rows up to ``length``; without it every
    block is full, so any prefix is the same whatever the ranges it is read in (sequential CERTIFY's checkpoints).
    :meth:`take` keeps the blocks a later range may still need and drops the earlier ones: read forward. The
    samples of several images' streams may share one forward pass (their takes concatenated through
    :meth:`Smooth.logits`, each image's rows tallied apart) without changing any image's counts.
    """

    x: torch.Tensor
    key: int
    phase: int
    noise_block: int = NOISE_BLOCK
    length: Optional[int] = None
    blocks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def block(self, b: int) -> torch.Tensor:
        """Block ``b``: [rows x C x H x W], rows = noise_block (fewer for the last block of a ``length``)."""
        if b not in self.blocks:
            size = self.noise_block
            rows = size if self.length is None else min(size, self.length - b * size)
            g = torch.Generator(device=self.x.device).manual_seed(block_seed(self.key, self.phase, b))
            self.blocks[b] = torch.randn((rows, *self.x.shape), generator=g, device=self.x.device,
                                         dtype=torch.promote_types(self.x.dtype, torch.float32))
        return self.blocks[b]

    def take(self, start: int, stop: int) -> torch.Tensor:
        """Samples ``start .. stop - 1`` [stop - start x C x H x W], cut from the seeded blocks."""
        size = self.noise_block
        parts = [self.block(b)[max(start - b * size, 0): stop - b * size]
                 for b in range(start // size, (stop - 1) // size + 1)]
        for b in [b for b in self.blocks if b < stop // size]:  # no later range reads them
            del self.blocks[b]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def generators(self, start: int, stop: int) -> list[torch.Generator]:
        """The per-sample generators of samples ``start .. stop - 1`` (:func:`sample_generators`)."""
        return sample_generators(self.key, self.phase, start, stop - start, self.x.device)


@dataclass(frozen=True)
class SampleRange:
    """Samples ``start .. stop - 1`` of a noise stream (of the image ``stream.x``): what a computation asks to have
    counted."""

    stream: NoiseStream
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


# A computation over noise samples, one image's CERTIFY or PREDICT: a generator that yields the sample ranges it needs
# counted, is sent each one's class counts [K x num_classes] (on the device), and returns its result. Who counts
# decides the forward passes: Smooth.run_steps one image at a time, pool.run_pool many images' ranges per pass.
Steps = Generator[SampleRange, torch.Tensor, Any]


# ---------------------------------------------------------------------------------------------------------------
# The bound, the radius and the counts
# ---------------------------------------------------------------------------------------------------------------


def clopper_pearson_lower(nA: np.ndarray | float, n: int, alpha: float | np.ndarray) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from nA successes of n: Beta^-1(alpha; nA, n - nA + 1).

    Vectorized over ``nA`` (which may be fractional, for projections); 0 where nA = 0. Equals
    ``proportion_confint(nA, n, alpha=2*alpha, method="beta")[0]`` (Cohen's CERTIFY bound).
    """
    nA = np.asarray(nA, dtype=float)
    return np.where(nA > 0, beta_dist.ppf(alpha, np.maximum(nA, 1e-300), n - nA + 1), 0.0)


def radius(pABar: np.ndarray | float, sigma: float) -> np.ndarray:
    """R = sigma Phi^-1(pABar) (Cohen et al. Theorem 1): if pABar >= 1/2 is a lower bound on P[f(x + delta) = cAHat],
    g predicts cAHat on the whole L2 ball of radius R around x. Vectorized over ``pABar``."""
    return sigma * norm.ppf(pABar)


def certificate(cAHat: int, pABar: float, sigma: float) -> tuple[int, float]:
    """CERTIFY's answer from the lower bound pABar: (ABSTAIN, 0.0) when pABar < 1/2, else (cAHat, :func:`radius`)."""
    if pABar < 0.5:
        return ABSTAIN, 0.0
    return cAHat, float(radius(pABar, sigma))


def tally(predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class counts [K x num_classes] of predictions [B x K] (K heads): counts[k, c] = #{b: predictions[b, k] = c}."""
    return tally_groups(predictions, num_classes, [len(predictions)])[0]


def tally_groups(predictions: torch.Tensor, num_classes: int, sizes: Sequence[int]) -> torch.Tensor:
    """Class counts [G x K x num_classes] of predictions [B x K] cut into G consecutive groups of ``sizes`` rows
    (sum = B): counts[g, k, c] = #{b in group g: predictions[b, k] = c}. One ``index_add_``, no host sync (CUDA's
    ``bincount`` reads max/min back to the host)."""
    device, heads = predictions.device, predictions.shape[1]
    flat = predictions + num_classes * torch.arange(heads, device=device)
    if len(sizes) > 1:
        group = torch.cat([torch.full((size,), g, dtype=torch.long, device=device) for g, size in enumerate(sizes)])
        flat = flat + heads * num_classes * group[:, None]
    counts = torch.zeros(len(sizes) * heads * num_classes, dtype=torch.long, device=device)
    return counts.index_add_(0, flat.flatten(), torch.ones_like(flat.flatten())).view(len(sizes), heads, num_classes)


# ---------------------------------------------------------------------------------------------------------------
# The smoothed classifier
# ---------------------------------------------------------------------------------------------------------------


class Smooth:
    """A smoothed classifier g(x) = argmax_c P[f(x + delta) = c], delta ~ N(0, sigma^2 I) (Cohen et al. 2019).

    The noise is drawn here, on x's device, exactly at sigma (and in float32 even under ``precision``, which only
    autocasts the base classifier). Each call draws one key from its generator (:func:`draw_key`); each phase then
    reads its own :class:`NoiseStream` of ``noise_block``-sample seeded blocks. The samples are thus a function of
    the generator's state, n0, n and ``noise_block`` only, not of ``batch_size``, and CERTIFY's selection and
    estimation samples are independent. Class counts stay on the device until they are read.
    """

    # to abstain, Smooth returns this int (runkit.logs.ABSTAIN)
    ABSTAIN = ABSTAIN

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float, precision: str = "fp32",
                 noise_block: int = NOISE_BLOCK, per_sample_generators: bool = False, fixed_batch: bool = False):
        """
        :param base_classifier: maps noisy images [B x C x H x W] to logits [B x num_classes] (K heads:
            [B x K x num_classes])
        :param num_classes: number of classes (>= 2)
        :param sigma: the noise level hyperparameter (> 0)
        :param precision: ``fp32`` (exact), ``bf16`` or ``fp16``: autocast of the base classifier
        :param noise_block: samples per independently seeded noise block
        :param per_sample_generators: call ``base_classifier(x_noisy, generators)`` with one generator per sample
            (:func:`sample_generators`; multi-step denoising's posterior noise)
        :param fixed_batch: every forward pass has exactly the batch size (a short one padded with copies of its
            first sample, whose predictions are dropped): one shape, so a compiled base classifier compiles once
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
        self.per_sample_generators = per_sample_generators
        self.fixed_batch = fixed_batch
        # the most samples of one forward pass: halved for the rest of the run when the device runs out of memory
        self.fitting = BatchSize(sys.maxsize)
        self.passes = 0  # forward passes so far, and the samples they counted (padding left out)
        self.samples = 0

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
        key = draw_key(generator)
        # draw samples of f(x + epsilon) and use them to take a guess at the top class
        cAHat = self.select(x, n0, batch_size, key)
        if len(cAHat) != 1:
            raise ValueError("certify takes a single-head base classifier; K heads: select, then estimate")
        # draw more samples of f(x + epsilon), use them to estimate a lower bound on pA, and certify
        [(prediction, R)] = self.estimate(x, cAHat, n, alpha, batch_size, key)
        return prediction, R

    def select(self, x: torch.Tensor, n0: int, batch_size: int, key: int) -> list[int]:
        """CERTIFY's selection: each head's guess cAHat at the top class, the most frequent one among the n0
        selection samples of the call ``key`` (ties: the lowest class)."""
        return self.run_steps(self.select_steps(x, n0, key), batch_size)

    def select_steps(self, x: torch.Tensor, n0: int, key: int) -> Steps:
        """:meth:`select` as :data:`Steps`."""
        counts_selection = yield SampleRange(NoiseStream(x, key, PHASE_SELECTION, self.noise_block, n0), 0, n0)
        return [int(c) for c in counts_selection.argmax(1).cpu()]

    def estimate(self, x: torch.Tensor, cAHat: Sequence[int], n: int, alpha: float, batch_size: int, key: int
                 ) -> list[tuple[int, float]]:
        """CERTIFY's estimation: with nA the count of each head's cAHat among the n estimation samples of the call
        ``key``, pABar = CP_lower(nA, n, alpha) and (cAHat, sigma Phi^-1(pABar)), or (ABSTAIN, 0.0) below 1/2."""
        return self.run_steps(self.estimate_steps(x, cAHat, n, alpha, key), batch_size)

    def estimate_steps(self, x: torch.Tensor, cAHat: Sequence[int], n: int, alpha: float, key: int) -> Steps:
        """:meth:`estimate` as :data:`Steps`."""
        counts_estimation = (yield SampleRange(NoiseStream(x, key, PHASE_ESTIMATION, self.noise_block, n), 0, n)).cpu()
        nA = [int(counts_estimation[head, c]) for head, c in enumerate(cAHat)]
        pABar = [float(clopper_pearson_lower(a, n, alpha)) for a in nA]
        return [certificate(c, p, self.sigma) for c, p in zip(cAHat, pABar)]

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
        return self.run_steps(self.predict_steps(x, n, alpha, generator), batch_size)

    def predict_steps(self, x: torch.Tensor, n: int, alpha: float, generator: Optional[torch.Generator] = None
                      ) -> Steps:
        """:meth:`predict` as :data:`Steps`."""
        stream = NoiseStream(x, draw_key(generator), PHASE_PREDICTION, self.noise_block, n)
        counts = (yield SampleRange(stream, 0, n)).cpu().numpy()
        if len(counts) != 1:
            raise ValueError("predict takes a single-head base classifier (logits [B x num_classes])")
        top2 = np.argsort(-counts[0], kind="stable")[:2]
        count1, count2 = int(counts[0, top2[0]]), int(counts[0, top2[1]])
        if binomtest(count1, count1 + count2, p=0.5).pvalue > alpha:
            return Smooth.ABSTAIN
        return int(top2[0])

    def run_steps(self, steps: Steps, batch_size: int) -> Any:
        """Run the computation ``steps`` (:data:`Steps`) of one image to its end, counting each range it asks for
        with :meth:`counts`, and return its result."""
        try:
            request = next(steps)
            while True:
                request = steps.send(self.counts(request.stream.x, request.start, request.stop, request.stream,
                                                 batch_size))
        except StopIteration as end:
            return end.value

    def counts(self, x: torch.Tensor, start: int, stop: int, stream: NoiseStream, batch_size: int) -> torch.Tensor:
        """Class counts [K x num_classes] of f(x + sigma * noise_i) over samples i = start .. stop - 1 (stop > start)
        of ``stream`` (whose image is x), in batches of <= batch_size; K = 1 for logits [B x num_classes]. On x's
        device.

        The samples depend only on the stream and their indices: counting a range in pieces (and, with
        ``per_sample_generators``, multi-step denoising too) gives the same counts whatever the batches.
        A NaN/inf logit (argmax would take it for the top class) is a :class:`NonFiniteLogitsError`: such samples
        are counted on the device, batch by batch, and read once at the end (one host sync per call, where every
        caller reads the counts next; none per batch).
        """
        if stream.x is not x:
            raise ValueError("counts: x must be the stream's image")
        if stop <= start:
            raise ValueError(f"empty sample range {start} .. {stop - 1}")
        [counts], [non_finite] = self.count_ranges([SampleRange(stream, start, stop)], batch_size)
        self.check_finite(non_finite)
        return counts

    def check_finite(self, non_finite: torch.Tensor) -> None:
        """A :class:`NonFiniteLogitsError` when ``non_finite`` (samples with a NaN/inf logit) is not 0: the one host
        sync of a count, made where the counts are read next anyway."""
        if int(non_finite):
            raise NonFiniteLogitsError(f"the base classifier returned non-finite logits (NaN or inf) on "
                                       f"{int(non_finite)} noise samples of an image: its weights hold NaN/inf, or "
                                       f"{self.precision} overflows; argmax over them would certify garbage")

    def count_ranges(self, ranges: Sequence[SampleRange], batch_size: int
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Class counts [K x num_classes] of each of ``ranges`` (of one or several images' streams), their samples
        concatenated in order into forward passes of at most ``batch_size`` samples, each range's rows tallied
        apart, and each range's number of samples with a NaN/inf logit (for :meth:`check_finite`). On the device,
        no host sync.

        A pass that runs out of device memory is computed again in halves, and no later pass is larger
        (:func:`runkit.memory.run_in_batches`; only a single sample that does not fit is an error): the counts are
        the same whatever the passes.
        """
        self.base_classifier.eval()
        ends = np.cumsum([0] + [r.size for r in ranges])
        totals: list[Optional[torch.Tensor]] = [None] * len(ranges)  # per range: [K + 1, C], the last row non-finite

        def count(start: int, stop: int) -> None:  # samples start .. stop - 1 of the concatenation
            parts = [(i, SampleRange(r.stream, r.start + max(start - ends[i], 0),
                                     r.start + min(stop, ends[i + 1]) - ends[i]))
                     for i, r in enumerate(ranges) if ends[i] < stop and ends[i + 1] > start]
            found = self.count_pass([part for _, part in parts], min(batch_size, self.fitting.size))
            added = [c if totals[i] is None else totals[i] + c for (i, _), c in zip(parts, found)]
            for (i, _), c in zip(parts, added):  # kept only once the whole pass has succeeded
                totals[i] = c

        with torch.inference_mode():
            run_in_batches(int(ends[-1]), self.fitting, count, ranges[0].stream.x.device, largest=batch_size)
        return [t[:-1] for t in totals], [t[-1, 1] for t in totals]  # type: ignore[index]

    def count_pass(self, ranges: Sequence[SampleRange], size: int) -> torch.Tensor:
        """One forward pass over the samples of ``ranges`` (with ``fixed_batch``, padded to ``size``): the class
        counts [len(ranges) x (K + 1) x num_classes] of each range, the last row counting the samples with a
        non-finite logit (in its column 1: tallied as a head whose class is 1 for such a sample, 0 otherwise)."""
        inputs = [r.stream.x + self.sigma * r.stream.take(r.start, r.stop) for r in ranges]
        x_noisy = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
        generators = ([g for r in ranges for g in r.stream.generators(r.start, r.stop)]
                      if self.per_sample_generators else None)
        real = len(x_noisy)
        if self.fixed_batch and real < size:  # copies of the first sample, dropped below
            x_noisy = torch.cat([x_noisy, x_noisy[:1].expand(size - real, *x_noisy.shape[1:])])
            if generators is not None:
                generators += [torch.Generator(device=x_noisy.device) for _ in range(size - real)]
        logits = self.logits(x_noisy, generators)[:real]
        self.passes, self.samples = self.passes + 1, self.samples + real
        non_finite = (~torch.isfinite(logits)).flatten(1).any(1).long()
        predictions = torch.cat([logits.argmax(-1), non_finite[:, None]], 1)
        return tally_groups(predictions, self.num_classes, [r.size for r in ranges])

    def logits(self, x_noisy: torch.Tensor, generators: Optional[list[torch.Generator]] = None) -> torch.Tensor:
        """Each head's logits f(x_noisy) [B x K x num_classes] (autocast ``precision``); ``generators``: one per
        sample, passed to the base classifier as its second argument."""
        with autocast(x_noisy.device, self.precision):
            logits = (self.base_classifier(x_noisy) if generators is None
                      else self.base_classifier(x_noisy, generators))
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"the base classifier gives {logits.shape[-1]} logits, expected {self.num_classes}")
        return logits.reshape(len(x_noisy), -1, self.num_classes)
