"""The FT-CADIS objective and the denoised-space attack (cadis.py) on small hand-made cases."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cadis import cadis_loss, cadis_objective, denoised_attack, non_hallucinated


def _ce(z: list[float], y: int) -> float:
    return -math.log(math.exp(z[y]) / sum(math.exp(v) for v in z))


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


# ----------------------------------------------------------------------------------------------------- the loss
def test_all_hallucinated_warm_start_picks_lowest_ce():
    # one image (label 0), M = 3 copies, none predicts 0; copy 1 has the lowest CE
    z = [[0.0, 2.0, 0.0], [1.0, 1.5, 0.0], [0.0, 0.0, 3.0]]
    logits = torch.tensor(z)
    y = torch.tensor([0])
    loss, sce, madv = cadis_loss(logits, None, y, num_noises=3, lbd=2.0, warm_start=True)
    assert sce.item() == pytest.approx(_ce(z[1], 0) / 3, rel=1e-6)  # the divisor stays M
    assert madv.item() == 0.0 and loss.item() == pytest.approx(sce.item())
    loss, sce, _ = cadis_loss(logits, None, y, num_noises=3, lbd=2.0, warm_start=False)
    assert sce.item() == 0.0 and loss.item() == 0.0


def test_mixed_and_all_confident_with_known_values():
    # B' = 2 images (labels 0 and 1), M = 2; noise-major rows: [img0 noise0, img1 noise0, img0 noise1, img1 noise1]
    z = [[2.0, 0.0], [0.0, 1.0], [0.5, 1.0], [-1.0, 3.0]]
    za = [[0.0, 0.0], [1.0, 1.0], [3.0, 0.0], [2.0, 0.0]]  # adversarial logits, same layout
    y = torch.tensor([0, 1])
    lbd = 1.5
    loss, sce, madv = cadis_loss(torch.tensor(z), torch.tensor(za), y, 2, lbd)
    # image 0: copy 0 correct, copy 1 hallucinated -> only copy 0's CE, divided by M = 2; masked out
    assert sce[0].item() == pytest.approx(_ce(z[0], 0) / 2, rel=1e-6)
    assert madv[0].item() == 0.0
    # image 1: both correct -> mean CE and lbd * max_j KL(p_bar || q_j)
    assert sce[1].item() == pytest.approx((_ce(z[1], 1) + _ce(z[3], 1)) / 2, rel=1e-6)
    p_bar = [(a + b) / 2 for a, b in zip(_softmax(z[1]), _softmax(z[3]))]
    kls = [_kl(p_bar, _softmax(za[1])), _kl(p_bar, _softmax(za[3]))]
    assert kls[0] != pytest.approx(kls[1])
    assert madv[1].item() == pytest.approx(lbd * max(kls), rel=1e-6)
    assert loss.item() == pytest.approx((sce.sum() + madv.sum()).item() / 2, rel=1e-6)


def test_max_over_noises_sends_gradient_to_the_worst_copy_only():
    z = torch.tensor([[3.0, 0.0, 0.0]] * 3)  # one image, M = 3, all correct (label 0)
    za = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    _, _, madv = cadis_loss(z, za, torch.tensor([0]), 3, lbd=1.0)
    p_bar = _softmax([3.0, 0.0, 0.0])
    assert madv.item() == pytest.approx(_kl(p_bar, _softmax([0.0, 1.0, 0.0])), rel=1e-6)
    madv.sum().backward()
    assert za.grad[1].abs().sum() > 0
    assert za.grad[0].abs().sum() == 0 and za.grad[2].abs().sum() == 0


def _loop_loss(zd, za, y, M, lbd, warm_start):
    """A straightforward per-image loop over METHOD §4, steps 3-7."""
    B = len(y)
    sces, madvs = [], []
    for i in range(B):
        rows = [j * B + i for j in range(M)]
        ces = [F.cross_entropy(zd[r : r + 1], y[i : i + 1]) for r in rows]
        ok = [bool(zd[r].argmax() == y[i]) for r in rows]
        all_ok = all(ok)
        if warm_start and not any(ok):
            ok[min(range(M), key=lambda j: ces[j].item())] = True
        sces.append(sum(c for c, o in zip(ces, ok) if o) / M if any(ok) else zd.sum() * 0)
        p_bar = sum(F.softmax(zd[r], -1) for r in rows) / M
        if all_ok:
            kls = [(p_bar * (p_bar.log() - F.log_softmax(za[r], -1))).sum() for r in rows]
            madvs.append(lbd * torch.stack(kls).max())
        else:
            madvs.append(zd.sum() * 0)
    sce, madv = torch.stack(sces), torch.stack(madvs)
    return (sce + madv).mean(), sce, madv


@pytest.mark.parametrize("warm_start", [True, False])
def test_loss_and_gradients_match_a_loop_implementation(warm_start):
    g = torch.Generator().manual_seed(0)
    M, B, C = 4, 6, 3
    y = torch.randint(0, C, (B,), generator=g)
    zd = torch.randn(M * B, C, generator=g, dtype=torch.float64)
    zd.view(M, B, C)[:, :3] += 4 * F.one_hot(y[:3], C)  # images 0-2: all copies correct
    zd.view(M, B, C)[:, 3] -= 4 * F.one_hot(y[3], C)  # image 3: all hallucinated
    za = torch.randn(M * B, C, generator=g, dtype=torch.float64)
    correct = non_hallucinated(zd, y, M)
    assert correct.all(0)[:3].all() and not correct[:, 3].any() and 0 < correct.all(0).sum() < B

    zd1, za1 = zd.clone().requires_grad_(), za.clone().requires_grad_()
    out = cadis_loss(zd1, za1, y, M, 2.0, warm_start)
    out[0].backward()
    zd2, za2 = zd.clone().requires_grad_(), za.clone().requires_grad_()
    ref = _loop_loss(zd2, za2, y, M, 2.0, warm_start)
    ref[0].backward()
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(zd1.grad, zd2.grad, rtol=1e-5, atol=1e-7)  # incl. the gradient through p_bar
    torch.testing.assert_close(za1.grad, za2.grad, rtol=1e-5, atol=1e-7)

    # the rows of masked-out images are ignored: other values there give the same loss and gradients, and they
    # receive no gradient (what lets cadis_objective attack the masked-in images only)
    mask = correct.all(0)
    za_other = za.clone()
    za_other.view(M, B, C)[:, ~mask] = torch.randn(M, int((~mask).sum()), C, generator=g, dtype=torch.float64) * 5
    zd3, za3 = zd.clone().requires_grad_(), za_other.requires_grad_()
    other = cadis_loss(zd3, za3, y, M, 2.0, warm_start)
    other[0].backward()
    for a, b in zip(out, other):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(zd3.grad, zd1.grad)
    torch.testing.assert_close(za3.grad, za1.grad)
    assert (za1.grad.view(M, B, C)[:, ~mask] == 0).all() and za1.grad.view(M, B, C)[:, mask].abs().sum() > 0


def test_loss_rejects_bad_shapes():
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="noise-major"):
        cadis_loss(torch.zeros(5, 2), None, y, 2, 1.0)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # both images masked in
    with pytest.raises(ValueError, match="logits_adv"):
        cadis_loss(z, None, y, 2, 1.0)
    with pytest.raises(ValueError, match="logits_adv"):
        cadis_loss(z, torch.zeros(6, 2), y, 2, 1.0)


# --------------------------------------------------------------------------------------------------- the attack
class _Recorder(nn.Module):
    """A small classifier that records its mode at every forward."""

    def __init__(self, in_features: int, num_classes: int, dtype=torch.float32):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 16), nn.Tanh(), nn.Linear(16, num_classes))
        self.to(dtype)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.net(x)


def _residual_problem(M=3, B=4, C=5, seed=0, dtype=torch.float32, noise=0.2):
    g = torch.Generator().manual_seed(seed)
    clean_b = torch.rand(B, 3, 8, 8, generator=g, dtype=dtype)
    clean = clean_b.repeat(M, 1, 1, 1)
    denoised = clean + noise * torch.randn(clean.shape, generator=g, dtype=dtype)
    return clean, denoised


def test_attack_ball_mean_rms_kl_and_frozen_classifier():
    torch.manual_seed(0)
    M, B, C, eps, steps = 3, 4, 5, 0.5, 4
    clf = _Recorder(3 * 8 * 8, C)
    clf.net[1].bias.requires_grad_(False)  # a frozen parameter must stay frozen
    flags = [p.requires_grad for p in clf.parameters()]
    clean, denoised = _residual_problem(M, B, C)
    with torch.no_grad():
        p_bar = F.softmax(clf(denoised), -1).view(M, B, C).mean(0)
    clf.train()
    clf.modes.clear()
    adv = denoised_attack(clf, clean, denoised, p_bar, M, eps, steps)

    assert clf.modes == [False] * steps  # eval mode during the search ...
    assert clf.training and [p.requires_grad for p in clf.parameters()] == flags  # ... restored afterwards
    assert all(p.grad is None for p in clf.parameters())  # nothing accumulated
    assert not adv.requires_grad and adv.shape == denoised.shape

    eta0, eta = (denoised - clean).flatten(1), (adv - clean).flatten(1)
    dist = (eta - eta0).norm(dim=1)
    assert (dist > 0.5 * eps).all()  # it moved ...
    assert (dist <= eps * 1.01).all()  # ... within the eps-ball (re-standardization moves it O(eps^2/|eta0|))
    torch.testing.assert_close(eta.mean(1), eta0.mean(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(eta.pow(2).mean(1).sqrt(), eta0.pow(2).mean(1).sqrt(), rtol=2e-3, atol=0)

    def kl_of(x):
        with torch.no_grad():
            clf.eval()
            log_q = F.log_softmax(clf(x), -1).view(M, B, C)
            clf.train()
            return (p_bar * (p_bar.log() - log_q)).sum(-1).mean(0)  # per image

    assert (kl_of(adv) > kl_of(denoised)).all()


def test_attack_follows_the_stated_update():
    """One step on a linear model, recomputed by hand: ascent, projection, re-standardization."""
    torch.manual_seed(1)
    M, B, C, eps = 2, 3, 4, 0.3
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, C)).double()
    clean, denoised = _residual_problem(M, B, C, seed=1, dtype=torch.float64)
    p_bar = torch.softmax(torch.randn(B, C, dtype=torch.float64), -1)
    adv = denoised_attack(lin, clean, denoised, p_bar, M, eps, steps=1)

    eta0 = (denoised - clean).requires_grad_()
    log_q = F.log_softmax(lin(clean + eta0), -1).view(M, B, C)
    loss = (p_bar * (p_bar.log() - log_q)).sum() / M
    (g,) = torch.autograd.grad(loss, eta0)
    eta0 = eta0.detach().flatten(1)
    g = g.flatten(1)
    d = 2 * eps * g / (g.norm(dim=1, keepdim=True) + 1e-8)  # step 2 eps / steps
    d = d * torch.clamp(eps / d.norm(dim=1, keepdim=True), max=1)  # projection onto the eps-ball
    eta = eta0 + d
    mu, rms = eta.mean(1, keepdim=True), eta.pow(2).mean(1, keepdim=True).sqrt()
    eta = (eta - mu) / rms * eta0.pow(2).mean(1, keepdim=True).sqrt() + eta0.mean(1, keepdim=True)
    torch.testing.assert_close((adv - clean).flatten(1), eta, rtol=1e-10, atol=1e-12)


def test_attack_without_steps_returns_the_denoised_images():
    clf = _Recorder(3 * 8 * 8, 5)
    clean, denoised = _residual_problem()
    adv = denoised_attack(clf, clean, denoised, torch.full((4, 5), 0.2), 3, eps=0.5, steps=0)
    torch.testing.assert_close(adv, denoised)
    assert clf.modes == []


# --------------------------------------------------------------------------------------- one objective evaluation
def _objective_case(dtype=torch.float64):
    """Tiny classifier + images where some (not all) images have all M copies correct."""
    torch.manual_seed(3)
    M, B, C = 3, 8, 4
    clf = _Recorder(3 * 8 * 8, C, dtype=dtype)
    clean, denoised = _residual_problem(M, B, C, seed=3, dtype=dtype, noise=0.02)
    with torch.no_grad():
        pred = clf(denoised).argmax(-1).view(M, B)
    agree = (pred == pred[0]).all(0)
    y = torch.where(torch.arange(B) % 2 == 0, pred[0], (pred[0] + 1) % C)  # odd images: hallucinated
    mask = agree & (torch.arange(B) % 2 == 0)
    assert 0 < int(mask.sum()) < B
    return clf, clean, denoised, y, M


def test_masked_only_attack_gives_the_same_loss_and_gradients():
    clf, clean, denoised, y, M = _objective_case()
    results = {}
    for masked_only in (False, True):
        clf.zero_grad(set_to_none=True)
        clf.train()
        clf.modes.clear()
        loss, sce, madv, correct = cadis_objective(clf, clean, denoised, y, M, lbd=4.0, eps=0.3, steps=3,
                                                   masked_only=masked_only)
        loss.backward()
        results[masked_only] = (loss.detach(), sce.detach(), madv.detach(),
                                [p.grad.clone() for p in clf.parameters()], len(clf.modes))
    full, masked = results[False], results[True]
    assert (full[2] > 0).any()  # the adversarial term is active
    for a, b in zip(full[:3], masked[:3]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(full[3], masked[3]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert full[4] == masked[4] == 1 + 3 + 1  # logits, 3 attack steps, adversarial logits


def test_gradients_reach_the_classifier_only():
    clf, clean, _, y, M = _objective_case(torch.float32)
    denoiser = nn.Conv2d(3, 3, 3, padding=1)
    with torch.no_grad():  # as train.py does: no gradient through D
        denoised = clean + denoiser(clean + 0.1 * torch.randn_like(clean)) * 0.01
    clf.train()
    loss, *_ = cadis_objective(clf, clean, denoised, y, M, lbd=1.0, eps=0.2, steps=2)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in clf.parameters())
    assert all(p.grad is None for p in denoiser.parameters())
    assert not clean.requires_grad and not denoised.requires_grad


def test_objective_without_masked_in_images_skips_the_attack():
    clf, clean, denoised, y, M = _objective_case()
    clf.train()
    clf.modes.clear()
    with torch.no_grad():
        wrong = (clf(denoised).argmax(-1).view(M, -1)[0] + 1) % 4
    clf.modes.clear()
    loss, sce, madv, correct = cadis_objective(clf, clean, denoised, wrong, M, lbd=1.0, eps=0.2, steps=2)
    assert clf.modes == [True]  # only the logits of the denoised images
    assert (madv == 0).all() and not correct.all(0).any()
    loss.backward()


def test_attack_direction_under_fp16_autocast_matches_fp32():
    """The paper's CIFAR-10 shape: 32x32 images resized to 224 for a ViT/16 (a small random one here, its head
    scaled down so that the per-pixel gradients are as small as a trained ViT-B's, below fp16's normal range). The
    attack's gradient under fp16 autocast points where the fp32 one does (loss scaling, per sample), and the attack
    moves the images the same way; without the scaling the direction is lost (so this test can fail)."""
    import torch.nn.functional as F
    from timm.models.vision_transformer import VisionTransformer

    from cadis import _kl, attack_gradient
    from classifier import ImageClassifier

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=96, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():
        vit.head.weight *= 1e-3
    classifier = ImageClassifier(vit, 224, (0.5,) * 3, (0.5,) * 3).eval()
    M, B = 2, 2
    clean = torch.rand(B, 3, 32, 32)
    denoised = (clean + 0.05 * torch.randn_like(clean)).clamp(0, 1).repeat(M, 1, 1, 1)
    clean = clean.repeat(M, 1, 1, 1)
    with torch.no_grad():
        p_bar = 0.5 * F.softmax(classifier(denoised), -1).view(M, B, -1).mean(0) + 0.5 * torch.eye(10)[:B]

    def cosine(a, b):
        return F.cosine_similarity(a.flatten(1), b.flatten(1))

    def run(fn, fp16: bool):
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16), torch.enable_grad():
            return fn()

    g32, g16 = (run(lambda: attack_gradient(classifier, clean, denoised - clean, p_bar, M), fp16)
                for fp16 in (False, True))
    assert g32.abs().mean() < 1e-6  # per 32-px pixel; at 224 px ~50x smaller
    assert cosine(g32, g16).min() >= 0.999

    def unscaled():
        eta = (denoised - clean).requires_grad_(True)
        log_q = F.log_softmax(classifier(clean + eta).float(), -1).view(M, B, -1)
        return torch.autograd.grad(_kl(p_bar, log_q).sum() / M, [eta])[0]
    assert cosine(g32, run(unscaled, True)).min() < 0.99

    moved = [run(lambda: denoised_attack(classifier, clean, denoised, p_bar, M, 0.125, 1), fp16) - denoised
             for fp16 in (False, True)]
    assert cosine(moved[0], moved[1]).min() >= 0.999
