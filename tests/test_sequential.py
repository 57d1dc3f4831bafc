"""sequential.py: the confidence sequence's measured validity, its savings on Cohen's logs, the wiring
through Smooth (noise stream, batch size, several heads, the label-aware early exit)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm

import core
import sequential
from certification import certify_method
from core import NoiseStream, Smooth, image_generator
from runkit.devices import torch_threads
from sequential import certify_sequential, sequential_plan, sequential_step, simulate_certify

SIGMA = 0.5
RADII = (0.0, 0.25, 0.5, 0.75)
ALPHA = 0.25  # a large alpha gives the measurement power
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _slack(alpha: float, trials: int) -> float:
    return 3 * math.sqrt(alpha * (1 - alpha) / trials)


def _pA_near_thresholds(radii=RADII, sigma=SIGMA, dz=0.05) -> np.ndarray:
    """pA just below and just above the threshold Phi(r / sigma) of each requested radius."""
    return np.array([norm.cdf(r / sigma + s * dz) for r in radii for s in (-1, 1)])


def _wrong(prediction: np.ndarray, radius: np.ndarray, pA: np.ndarray, sigma: float = SIGMA) -> np.ndarray:
    """A certificate is wrong iff it names another class, or a radius above the true sigma Phi^-1(pA)."""
    certified = prediction != Smooth.ABSTAIN
    return certified & ((prediction != 0) | (radius > sigma * norm.ppf(pA) + 1e-12))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fixed", "sequential"])
def test_validity_measured_with_known_pA(mode):
    """Wrong-certificate rate <= alpha at every pA placed just above / below a requested radius' threshold."""
    trials, rng = 4000, np.random.default_rng(0)
    for pA in _pA_near_thresholds():
        prediction, radius, used = simulate_certify(np.full(trials, pA), 100, 20_000, ALPHA, SIGMA, rng,
                                                    radii=None if mode == "fixed" else RADII)
        assert _wrong(prediction, radius, np.full(trials, pA)).mean() <= ALPHA + _slack(ALPHA, trials), pA
        if mode == "sequential":
            assert set(used) <= set(sequential.checkpoint_schedule(20_000))


def test_validity_measurement_has_power(monkeypatch):
    """The same measurement catches an invalid sequence: Clopper-Pearson at the full alpha at every checkpoint."""
    trials, pA = 4000, norm.cdf(0.5 / SIGMA - 0.05)
    valid = sequential_plan(20_000, ALPHA, RADII, SIGMA)
    naive = sequential.SequentialPlan(valid.checkpoints, (ALPHA,) * len(valid.checkpoints), valid.thresholds)
    monkeypatch.setattr(sequential, "sequential_plan", lambda *args, **kwargs: naive)
    prediction, radius, _ = simulate_certify(np.full(trials, pA), 100, 20_000, ALPHA, SIGMA,
                                             np.random.default_rng(1), radii=RADII)
    assert _wrong(prediction, radius, np.full(trials, pA)).mean() > ALPHA + 3 * _slack(ALPHA, trials)


@pytest.mark.slow
def test_sequential_radii_not_far_below_fixed():
    """At each requested radius, sequential certifies it nearly as often as fixed N, on far fewer samples."""
    trials, rng = 4000, np.random.default_rng(2)
    alpha, n = 0.001, 20_000
    for r in RADII[1:]:
        for dz in (0.1, 0.3, 1.0):  # pA above the threshold of r
            pA = np.full(trials, norm.cdf(r / SIGMA + dz))
            fixed = simulate_certify(pA, 100, n, alpha, SIGMA, rng)
            seq = simulate_certify(pA, 100, n, alpha, SIGMA, rng, radii=RADII)
            rate_fixed, rate_seq = (np.mean((m[0] == 0) & (m[1] >= r)) for m in (fixed, seq))
            assert rate_seq >= rate_fixed - 0.05, (r, dz, rate_fixed, rate_seq)
            assert seq[2].mean() < n


def test_sequential_step_rules():
    plan = sequential_plan(10_000, 0.001, [0.0, 0.5], 0.5)
    assert abs(sum(plan.alphas) - 0.001) < 1e-15 and plan.alphas[-1] == 0.0005
    assert plan.checkpoints[0] == 100 and plan.checkpoints[-1] == 10_000
    assert all(b > a for a, b in zip(plan.checkpoints, plan.checkpoints[1:]))
    # all 100 correct: pABar ~ 0.86 > Phi(1) = 0.84 certifies the largest radius at once; 30/100: futile; 70: go on
    lower, stop = sequential_step(plan, 0, np.array([100.0, 30.0, 70.0]), np.zeros(3))
    assert stop.tolist() == [True, True, False]
    assert lower[0] > norm.cdf(1.0) and lower[1] < 0.5
    # the running maximum: a later, lower bound never lowers pABar
    lower2, _ = sequential_step(plan, 1, np.array([60.0]), np.array([0.7]))
    assert lower2[0] == 0.7
    assert sequential_step(plan, len(plan.checkpoints) - 1, np.array([5000.0]), np.zeros(1))[1].all()


def test_savings_on_cohen_cifar10_logs():
    """The target: >= 10x fewer estimation samples than N = 100,000 on every CIFAR-10 log, tables within 1 point."""
    sys.path.insert(0, str(REPO / "scripts"))
    import sequential_savings

    results = sequential_savings.main(["--dataset", "cifar10", "--trials", "1"])
    assert len(results) == 3
    for name, result in results.items():
        assert result["saving"] >= 10, name
        assert result["max_diff"] <= 0.01, name
        assert len(result["radii"]) >= 4 and result["radii"][0] == 0.0
        by_mode = result["samples_by_mode"]  # --skip_wrong saves on wrong guesses, in both modes
        assert by_mode["skip_wrong"] < by_mode["fixed"] and by_mode["both"] < by_mode["sequential"]


def test_simulated_skip_wrong_keeps_the_correct_rows():
    pA = np.array([0.99, 0.99, 0.3, 0.9])
    label_is_top = np.array([True, False, True, True])
    full = simulate_certify(pA, 100, 1000, 0.001, SIGMA, np.random.default_rng(4))
    skip = simulate_certify(pA, 100, 1000, 0.001, SIGMA, np.random.default_rng(4), label_is_top=label_is_top)
    assert skip[2].tolist() == [1000, 0, 1000, 1000] and skip[1][1] == 0.0 and skip[0][1] == 0
    assert skip[1][[0, 2, 3]].tolist() == full[1][[0, 2, 3]].tolist()


# ---------------------------------------------------------------------------------------------------------------
# Through the real Smooth
# ---------------------------------------------------------------------------------------------------------------


class PixelThreshold(torch.nn.Module):
    """f(z) = 0 iff z_0 / sigma < a (P[f(0 + delta) = 0] = Phi(a) = pA exactly), else 1 or 2 by the sign of z_1.
    With ``heads``, several such classifiers with their own pA: logits [B x K x 3]."""

    def __init__(self, pAs, sigma: float):
        super().__init__()
        self.a = torch.tensor([float(norm.ppf(p)) for p in pAs])
        self.sigma = sigma

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.flatten(1)
        other = torch.where(z[:, 1] > 0, 1, 2)[:, None]
        classes = torch.where(z[:, :1] / self.sigma < self.a[None, :], 0, other)  # [B, K]
        logits = F.one_hot(classes, 3).float()
        return logits[:, 0] if len(self.a) == 1 else logits


@pytest.mark.slow
def test_smooth_certify_sequential_validity_measured():
    reps, x = 300, torch.zeros(1, 2, 2)
    for pA in (norm.cdf(0.25 / SIGMA + 0.1), norm.cdf(0.5 / SIGMA - 0.1)):
        smooth = Smooth(PixelThreshold([pA], SIGMA), 3, SIGMA, noise_block=500)
        wrong = 0
        for r in range(reps):
            c, radius, used = certify_sequential(smooth, x, 20, 2000, ALPHA, 256, RADII, image_generator(5, r))
            wrong += c != Smooth.ABSTAIN and (c != 0 or radius > SIGMA * norm.ppf(pA))
            assert used in sequential.checkpoint_schedule(2000)
        assert wrong / reps <= ALPHA + _slack(ALPHA, reps)


def test_smooth_sequential_does_not_depend_on_batch_size_and_matches_the_simulated_rules():
    x, pA = torch.zeros(1, 2, 2), norm.cdf(0.6 / SIGMA)
    smooth = Smooth(PixelThreshold([pA], SIGMA), 3, SIGMA, noise_block=300)
    runs = [[certify_sequential(smooth, x, 20, 3000, 0.01, bs, RADII, generator=image_generator(9, r))
             for r in range(6)] for bs in (7, 64, 1000)]
    assert runs[0] == runs[1] == runs[2]
    for c, radius, used in runs[0]:
        assert c == 0 and radius >= 0.5 and used < 3000  # certifies 0.5 and stops: 0.75 is out of reach


def test_estimation_stream_prefix_is_the_fixed_stream():
    """For n a multiple of noise_block, sequential's first n estimation samples are fixed-N CERTIFY's n samples."""
    x = torch.zeros(3, 2, 2)
    smooth = Smooth(torch.nn.Identity(), 3, SIGMA, noise_block=100)
    fixed_stream = NoiseStream(x, 11, core.PHASE_ESTIMATION, smooth.noise_block, length=300)
    fixed = torch.cat([fixed_stream.take(s, min(300, s + 64)) for s in range(0, 300, 64)])
    stream = NoiseStream(x, 11, core.PHASE_ESTIMATION, smooth.noise_block)  # full blocks, as sequential reads it
    parts = [torch.cat([stream.take(s, min(b, s + 64)) for s in range(a, b, 64)])
             for a, b in ((0, 37), (37, 125), (125, 300))]
    assert torch.equal(torch.cat(parts), fixed)


@pytest.mark.parametrize("radii", [None, RADII])
def test_several_heads_equal_single_runs(radii):
    x, pAs = torch.zeros(1, 2, 2), [0.3, norm.cdf(0.3 / SIGMA), norm.cdf(0.9 / SIGMA), 0.999]
    multi = Smooth(PixelThreshold(pAs, SIGMA), 3, SIGMA, noise_block=200)
    for r in range(4):
        together = certify_method(multi, 20, 2000, 0.01, 128, radii).compute(x, image_generator(3, r), 0)
        for head, pA in enumerate(pAs):
            single = Smooth(PixelThreshold([pA], SIGMA), 3, SIGMA, noise_block=200)
            [alone] = certify_method(single, 20, 2000, 0.01, 128, radii).compute(x, image_generator(3, r), 0)
            assert together[head] == alone, (r, head)
        if radii is not None:
            assert max(used for *_, used in together) > min(used for *_, used in together)


def test_label_skips_estimation_of_wrong_guesses(monkeypatch):
    x = torch.zeros(1, 2, 2)
    smooth = Smooth(PixelThreshold([0.999, 0.001], SIGMA), 3, SIGMA)
    full = certify_method(smooth, 20, 500, 0.01, 64).compute(x, image_generator(1, 0), 0)
    skip_wrong = certify_method(smooth, 20, 500, 0.01, 64, skip_wrong=True)
    skipped = skip_wrong.compute(x, image_generator(1, 0), 0)
    assert skipped[0] == full[0] and full[0][0] == 0
    assert skipped[1][1:] == (0.0, 0) and skipped[1][0] in (1, 2)  # pA of class 0 is 0.001: the guess is wrong
    calls = []
    real = Smooth.counts
    monkeypatch.setattr(Smooth, "counts", lambda self, *a: calls.append(a[3].phase) or real(self, *a))
    assert skip_wrong.compute(x, image_generator(1, 0), 2)[0][2] == 0
    assert calls == [core.PHASE_SELECTION]  # every head's guess is wrong: no estimation at all
