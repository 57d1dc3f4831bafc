"""core.py: Cohen's CERTIFY/PREDICT, measured validity, the noise stream, DenoisedClassifier."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import beta, binom, norm

import core
from core import DenoisedClassifier, NoiseStream, Smooth, block_seed, image_generator
from runkit.devices import torch_threads

SIGMA = 0.5
REPS = 2000  # repetitions for the measured validity tests



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads are many times slower for these tiny models."""
    with torch_threads(1):
        yield

class LinearThreshold(torch.nn.Module):
    """f(z) = 0 iff z_0 / sigma < a, else 1 (or 1/2 split by z_1 when three classes).

    At x = 0, P[f(x + delta) = 0] = Phi(a) =: pA exactly, and the smoothed classifier g predicts 0 exactly on the
    half-space x_0 < a * sigma, so the true robust radius at 0 is sigma * Phi^-1(pA): a certificate is wrong iff it
    names another class or a larger radius.
    """

    def __init__(self, pA: float, sigma: float, num_classes: int = 3):
        super().__init__()
        self.a, self.sigma, self.num_classes = float(norm.ppf(pA)), sigma, num_classes

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.flatten(1)
        other = torch.where(z[:, 1] > 0, 1, 2) if self.num_classes > 2 else torch.ones_like(z[:, 0], dtype=torch.long)
        return F.one_hot(torch.where(z[:, 0] / self.sigma < self.a, 0, other), self.num_classes).float()


def _certify_rates(smooth: Smooth, pA: float, n0: int, n: int, alpha: float, reps: int = REPS):
    """(rate of wrong certificates, rate of abstentions) over ``reps`` independent runs at x = 0."""
    x = torch.zeros(1, 2, 2)
    wrong = abstain = 0
    for r in range(reps):
        cAHat, radius = smooth.certify(x, n0, n, alpha, batch_size=64, generator=image_generator(1234, r))
        if cAHat == Smooth.ABSTAIN:
            abstain += 1
            assert radius == 0.0
        elif cAHat != 0 or radius > SIGMA * norm.ppf(pA) + 1e-12:
            wrong += 1
    return wrong / reps, abstain / reps


def _slack(alpha: float, reps: int = REPS) -> float:
    return 3 * math.sqrt(alpha * (1 - alpha) / reps)


@pytest.mark.slow
@pytest.mark.parametrize("pA", [0.5, 0.7, 0.9, 0.99])
def test_certify_validity_measured(pA):
    alpha = 0.2
    wrong, abstain = _certify_rates(Smooth(LinearThreshold(pA, SIGMA), 3, SIGMA), pA, n0=20, n=100, alpha=alpha)
    assert wrong <= alpha + _slack(alpha)
    if pA == 0.5:  # g is a tie at x: any certificate is wrong, so CERTIFY must abstain with prob >= 1 - alpha
        assert abstain >= 1 - alpha - _slack(alpha)
        assert wrong + abstain == 1.0
    if pA >= 0.9:  # clear majority: pABar >= 0.5 essentially always
        assert abstain <= 0.005
    if pA == 0.99:
        assert wrong == 0.0  # pABar <= nA/n < 0.99 almost surely with n = 100 at alpha = 0.2


@pytest.mark.slow
def test_validity_test_has_power(monkeypatch):
    """The measurement above catches a broken CERTIFY: a point estimate of pA, or selection and estimation sharing
    their samples."""
    alpha, pA = 0.2, 0.7
    smooth = Smooth(LinearThreshold(pA, SIGMA), 3, SIGMA)
    with monkeypatch.context() as m:
        m.setattr(core, "clopper_pearson_lower", lambda nA, n, a: nA / n)
        wrong, _ = _certify_rates(smooth, pA, n0=20, n=100, alpha=alpha, reps=500)
    assert wrong > alpha + _slack(alpha, 500) + 0.1

    # a two-class tie: the correct CERTIFY abstains; one that selects with its estimation samples does not
    tie = Smooth(LinearThreshold(0.5, SIGMA, num_classes=2), 2, SIGMA)
    wrong_ok, _ = _certify_rates(tie, 0.5, n0=100, n=100, alpha=alpha)
    assert wrong_ok <= alpha + _slack(alpha)
    real = Smooth.counts
    with monkeypatch.context() as m:
        m.setattr(Smooth, "counts", lambda self, x, start, stop, stream, bs: real(
            self, x, start, stop, NoiseStream(x, stream.key, 0, stream.noise_block, stream.length), bs))
        wrong_shared, _ = _certify_rates(tie, 0.5, n0=100, n=100, alpha=alpha)
    assert wrong_shared > alpha + 2 * _slack(alpha)


@pytest.mark.slow
def test_predict_validity_measured():
    alpha, reps = 0.1, 1000
    x = torch.zeros(1, 2, 2)
    tie = Smooth(LinearThreshold(0.5, SIGMA, num_classes=2), 2, SIGMA)
    answered = sum(tie.predict(x, 100, alpha, 64, generator=image_generator(7, r)) != Smooth.ABSTAIN
                   for r in range(reps))
    assert answered / reps <= alpha + _slack(alpha, reps)  # at a tie every answer is wrong
    clear = Smooth(LinearThreshold(0.8, SIGMA, num_classes=2), 2, SIGMA)
    preds = np.array([clear.predict(x, 100, alpha, 64, generator=image_generator(8, r)) for r in range(reps)])
    assert (preds == 1).mean() <= alpha / 2 + _slack(alpha / 2, reps)
    assert (preds == Smooth.ABSTAIN).mean() <= 0.01  # 80 vs 20 of 100 is far beyond the test's threshold


def _mock_counts(monkeypatch, smooth: Smooth, *count_vectors):
    """Make the next calls to ``smooth.counts`` return the given count vectors (one head), in order."""
    queue = [torch.tensor([c], dtype=torch.long) for c in count_vectors]
    calls = []

    def fake(x, start, stop, stream, batch_size):
        calls.append((stop - start, stream.phase))
        counts = queue.pop(0)
        assert int(counts.sum()) == stop - start
        return counts

    monkeypatch.setattr(smooth, "counts", fake)
    return calls


@pytest.mark.parametrize("nA", [0, 1, 50, 55, 56, 57, 60, 90, 99, 100])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_certify_equals_cohen_formula(monkeypatch, nA, alpha):
    n0, n, sigma = 10, 100, 0.25
    smooth = Smooth(torch.nn.Identity(), 4, sigma)
    # selection favours class 2 (ties broken towards the lower index would give 1, so make 2 strictly larger)
    selection = [1, 3, 4, 2]
    estimation = [n - nA - (n - nA) // 2, (n - nA) // 2, nA, 0]
    calls = _mock_counts(monkeypatch, smooth, selection, estimation)
    cAHat, radius = smooth.certify(torch.zeros(3, 2, 2), n0, n, alpha, 16)
    assert calls == [(n0, core.PHASE_SELECTION), (n, core.PHASE_ESTIMATION)]
    # direct Clopper-Pearson one-sided lower bound: the alpha quantile of Beta(nA, n - nA + 1)
    pABar = beta.ppf(alpha, nA, n - nA + 1) if nA > 0 else 0.0
    if pABar < 0.5:
        assert (cAHat, radius) == (Smooth.ABSTAIN, 0.0)
    else:
        assert cAHat == 2
        assert radius == pytest.approx(sigma * norm.ppf(pABar), rel=1e-9, abs=1e-12)
        assert radius > 0


def test_certify_uses_selection_class_not_estimation_argmax(monkeypatch):
    smooth = Smooth(torch.nn.Identity(), 3, 1.0)
    _mock_counts(monkeypatch, smooth, [5, 5, 0], [0, 100, 0])  # selection tie -> class 0 (first), nA = 0
    assert smooth.certify(torch.zeros(3, 2, 2), 10, 100, 0.001, 8) == (Smooth.ABSTAIN, 0.0)


@pytest.mark.parametrize("counts", [[60, 40, 0], [61, 39, 0], [70, 30, 0], [0, 50, 50], [3, 97, 0], [100, 0, 0],
                                    [40, 35, 25], [10, 5, 85]])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_predict_equals_binomial_test(monkeypatch, counts, alpha):
    smooth = Smooth(torch.nn.Identity(), 3, 0.5)
    calls = _mock_counts(monkeypatch, smooth, counts)
    pred = smooth.predict(torch.zeros(3, 2, 2), sum(counts), alpha, 16)
    assert calls == [(sum(counts), core.PHASE_PREDICTION)]
    c = np.array(counts)
    top = int(np.argmax(c))
    c1, c2 = sorted(counts, reverse=True)[:2]
    # exact two-sided binomial p-value under p = 1/2 (symmetric): 2 * P[Bin(c1 + c2, 1/2) <= c2], capped at 1
    pvalue = min(1.0, 2 * binom.cdf(c2, c1 + c2, 0.5))
    assert pred == (Smooth.ABSTAIN if pvalue > alpha else top)


class Recorder(torch.nn.Module):
    """Records every input batch; predicts class 0."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.inputs: list[torch.Tensor] = []
        self.num_classes = num_classes

    def forward(self, z):
        self.inputs.append(z.detach().clone())
        return torch.zeros(len(z), self.num_classes)


def _noise_seen(batch_size: int, seed: int = 0, n0: int = 23, n: int = 173, noise_block: int = 50):
    rec = Recorder()
    smooth = Smooth(rec, 3, SIGMA, noise_block=noise_block)
    x = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(5))
    out = smooth.certify(x, n0, n, 0.01, batch_size, generator=image_generator(seed, 11))
    assert all(len(b) <= batch_size for b in rec.inputs)
    seen = torch.cat(rec.inputs)
    assert len(seen) == n0 + n
    return x, seen, out


def test_noise_independent_of_batch_size_and_phases_disjoint():
    x, ref, out = _noise_seen(batch_size=1000)
    assert out == (0, pytest.approx(SIGMA * norm.ppf(beta.ppf(0.01, 173, 1))))  # the recorder always says 0
    for batch_size in (1, 7, 50, 64, 173):
        _, seen, _ = _noise_seen(batch_size)
        assert torch.equal(seen, ref), batch_size
    # selection (first 23) and estimation (next 173) samples are different draws
    noise = (ref - x) / SIGMA
    assert not torch.allclose(noise[:23], noise[23:46])
    # another seed, another stream; the same seed again, the same stream
    assert not torch.allclose(_noise_seen(1000, seed=1)[1], ref)
    assert torch.equal(_noise_seen(64, seed=0)[1], ref)


def test_noise_is_exactly_sigma_times_the_seeded_blocks():
    sigma, noise_block, n = 0.37, 64, 150
    rec = Recorder()
    smooth = Smooth(rec, 3, sigma, noise_block=noise_block)
    x = torch.rand(3, 5, 5)
    smooth.predict(x, n, 0.01, 40, generator=image_generator(3, 4))
    seen = torch.cat(rec.inputs)
    key = int(torch.randint(0, 2**62, (1,), generator=image_generator(3, 4)).item())
    blocks = [torch.randn((min(noise_block, n - s), *x.shape),
                          generator=torch.Generator().manual_seed(block_seed(key, core.PHASE_PREDICTION, b)))
              for b, s in enumerate(range(0, n, noise_block))]
    torch.testing.assert_close(seen, x + sigma * torch.cat(blocks), rtol=0, atol=0)
    # and it is N(0, sigma^2): standardized sample moments
    big = Recorder()
    Smooth(big, 3, sigma).predict(torch.zeros(3, 8, 8), 2000, 0.01, 500, generator=image_generator(0, 0))
    z = torch.cat(big.inputs).flatten().double() / sigma
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * z.numel())


def _counts(smooth: Smooth, x: torch.Tensor, num: int, batch_size: int, key: int, phase: int) -> torch.Tensor:
    """The counts [K x C] of ``num`` samples of a phase, read as certify and predict read them (a stream of that
    length)."""
    return smooth.counts(x, 0, num, NoiseStream(x, key, phase, smooth.noise_block, num), batch_size)


def test_counts_and_precision():
    rec = Recorder()
    smooth = Smooth(rec, 3, SIGMA, precision="bf16")
    assert smooth.certify(torch.rand(3, 4, 4), 5, 37, 0.1, 8, generator=image_generator(0, 0))[0] == 0
    assert all(b.dtype == torch.float32 for b in rec.inputs)  # the noise is added in float32
    counts = _counts(Smooth(LinearThreshold(0.5, SIGMA), 3, SIGMA), torch.zeros(1, 2, 2), 77, 10, 5, 1)
    assert counts.dtype == torch.long and counts.shape == (1, 3) and int(counts.sum()) == 77
    with pytest.raises(ValueError):
        Smooth(rec, 3, 0.0)


def test_global_rng_when_no_generator():
    rec1, rec2, rec3 = Recorder(), Recorder(), Recorder()
    torch.manual_seed(0)
    Smooth(rec1, 3, SIGMA).predict(torch.zeros(1, 2, 2), 5, 0.5, 4)
    Smooth(rec2, 3, SIGMA).predict(torch.zeros(1, 2, 2), 5, 0.5, 4)
    torch.manual_seed(0)
    Smooth(rec3, 3, SIGMA).predict(torch.zeros(1, 2, 2), 5, 0.5, 4)
    assert not torch.equal(torch.cat(rec1.inputs), torch.cat(rec2.inputs))  # fresh noise per call
    assert torch.equal(torch.cat(rec1.inputs), torch.cat(rec3.inputs))  # seeded by torch.manual_seed


class FakeDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls: list = []

    def timestep_for_sigma(self, sigma):
        self.calls.append(("t", sigma))
        return 42

    def denoise(self, x_noisy, t):
        self.calls.append(("denoise", t))
        return x_noisy.clamp(0, 1) * 0.5


def test_denoised_classifier():
    den, clf = FakeDenoiser(), torch.nn.Flatten()
    model = DenoisedClassifier(den, clf, 0.25)
    assert model.t_star == 42 and den.calls == [("t", 0.25)]
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(model(x), (x.clamp(0, 1) * 0.5).flatten(1))
    model(x)
    assert den.calls == [("t", 0.25), ("denoise", 42), ("denoise", 42)]  # t_star computed once
    plain = DenoisedClassifier(None, clf, 0.25)
    assert plain.t_star is None
    torch.testing.assert_close(plain(x), x.flatten(1))


@pytest.mark.slow
def test_multistep_denoising_samples_do_not_depend_on_the_batch():
    """Smooth(per_sample_generators=True) gives a multi-step DenoisedClassifier per-sample generators: the counts do
    not depend on batch_size, and the chain's noise is in play (other keys, other counts of the denoised-logit
    argmax)."""
    from denoiser import build_denoiser
    torch.manual_seed(0)
    denoiser = build_denoiser("digits").eval()
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5))
    model = DenoisedClassifier(denoiser, head, sigma=0.005, multistep=True)
    assert model.multistep and model.t_star == 9
    smooth = Smooth(model, 5, sigma=0.005, noise_block=4, per_sample_generators=True)
    x = torch.rand(3, 16, 16)
    counts = {b: _counts(smooth, x, 10, b, key=7, phase=core.PHASE_ESTIMATION)[0].tolist() for b in (3, 10)}
    assert counts[3] == counts[10] and sum(counts[3]) == 10
    with torch.no_grad():  # the first 3 samples by hand: the smoothing noise of block 0, chains seeded per sample
        g = torch.Generator().manual_seed(block_seed(7, core.PHASE_ESTIMATION, 0))
        noisy = x + 0.005 * torch.randn((4, *x.shape), generator=g)[:3]
        gens = core.sample_generators(7, core.PHASE_ESTIMATION, 0, 3, torch.device("cpu"))
        by_hand = head(denoiser.denoise_multistep(noisy, 9, gens)).argmax(1)
        one_shot = head(denoiser.denoise(noisy, 9))
    assert _counts(smooth, x, 3, 3, key=7, phase=core.PHASE_ESTIMATION)[0].tolist() == \
        torch.bincount(by_hand, minlength=5).tolist()
    with torch.no_grad():
        fresh = core.sample_generators(7, core.PHASE_ESTIMATION, 0, 3, torch.device("cpu"))
        assert not torch.allclose(model(noisy, fresh), one_shot)  # multi-step is another denoiser than one-shot
