"""The FT-CADIS objective (METHOD §4): one function per equation, in the order of the training step.

Step 1, x_hat = D(x + delta), is :func:`core.noise_and_denoise` (the denoising of the smoothed classifier f o D,
shared with certification); then :func:`non_hallucinated` (2), :func:`selective_ce` (3), :func:`consistency_target`
(4), :func:`denoised_attack` (5), :func:`masked_adversarial_loss` (6), composed by :func:`cadis_loss` (7, the loss)
and :func:`cadis_objective` (forward, attack, loss). The attack radius is on the [0, 1] pixel scale inside the code;
:func:`eps_pixels` converts the ``--eps`` flag (the paper's units) once.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        lowest_ce = torch.arange(M, device=ce.device)[:, None] == ce.detach().argmin(0)  # [M, B]
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


ATTACK_GRADIENT_BITS = 6  # the logits' gradient of each sample is scaled to a largest entry in [2^5, 2^6)


def attack_gradient(classifier: nn.Module, clean: torch.Tensor, eta: torch.Tensor, target: torch.Tensor,
                    num_noises: int) -> torch.Tensor:
    """g = d loss / d eta of the attack's loss, loss = sum_i (1/M) sum_j KL(p_bar_i || softmax f(clean_ij + eta_ij)),
    in float32.

    Loss scaling, per sample: under fp16 autocast the classifier's backward runs in fp16, whose smallest normal
    number is 6e-5, while per-pixel gradients at 224 px are ~1e-5 and less (they would lose their digits or flush
    to zero, and the attack its direction). So the gradient flows back from the logits with each sample's row scaled
    by a power of two that brings its largest entry to [2^5, 2^6) (:data:`ATTACK_GRADIENT_BITS`), and is unscaled in
    float32 afterwards: powers of two scale exactly, so fp32 and bf16 compute the same values as without.

    Args:
        classifier: f (frozen, in eval mode).
        clean: ``[M*B', ...]`` clean images, noise-major.
        eta: ``[M*B', ...]`` the current residuals (the gradient's variable).
        target: ``[B', C]`` the consistency targets p_bar (float32, detached).
        num_noises: M.
    """
    M, n = num_noises, clean.shape[0]
    eta = eta.detach().requires_grad_(True)
    logits = _at_least_fp32(classifier(clean + eta))
    loss = _kl(target, F.log_softmax(logits, dim=-1).view(M, n // M, -1)).sum() / M
    (g_logits,) = torch.autograd.grad(loss, [logits], retain_graph=True)
    _, exponent = torch.frexp(g_logits.abs().amax(1, keepdim=True))  # largest = m * 2^e, m in [0.5, 1)
    scale = torch.ldexp(torch.ones_like(g_logits[:, :1]), ATTACK_GRADIENT_BITS - exponent)
    (grad,) = torch.autograd.grad(logits, [eta], grad_outputs=g_logits * scale)
    return grad / scale.view(_per_sample(grad))


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
        eta <- eta + (2 eps / steps) * g / ||g||_2          (g = d loss / d eta, normalized per sample:
                                                            :func:`attack_gradient`)
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
    target = _at_least_fp32(target_probs.detach())
    eta0 = (denoised - clean).detach()
    mean0, rms0 = _mean_rms(eta0)
    step_size = 2.0 * eps / steps
    with _frozen_eval(classifier), torch.enable_grad():
        eta = eta0.clone()
        for _ in range(steps):
            grad = attack_gradient(classifier, clean, eta, target, num_noises)
            grad = grad / (grad.flatten(1).norm(dim=1).view(_per_sample(grad)) + 1e-8)
            delta = eta.detach() + step_size * grad - eta0
            delta_norm = delta.flatten(1).norm(dim=1).view(_per_sample(delta))
            eta = eta0 + delta * (eps / delta_norm.clamp_min(1e-12)).clamp(max=1.0)
            mean, rms = _mean_rms(eta)
            eta = (eta - mean) / rms.clamp_min(1e-12) * rms0 + mean0
    return (clean + eta).detach()


def _mean_rms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's mean and root mean square, shaped to broadcast against ``x``."""
    flat = x.flatten(1)
    return flat.mean(1).view(_per_sample(x)), flat.pow(2).mean(1).sqrt().view(_per_sample(x))


@contextlib.contextmanager
def _frozen_eval(classifier: nn.Module) -> Iterator[None]:
    """``classifier`` in eval mode with its parameters frozen; its training mode and each parameter's
    ``requires_grad`` are restored afterwards."""
    was_training = classifier.training
    requires_grad = [p.requires_grad for p in classifier.parameters()]
    classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(classifier.parameters(), requires_grad):
            p.requires_grad_(flag)
        classifier.train(was_training)


def adversarial_logits(classifier: nn.Module, clean: torch.Tensor, denoised: torch.Tensor, p_bar: torch.Tensor,
                       masked_in: torch.Tensor, num_noises: int, eps: float, steps: int,
                       masked_only: bool = True) -> Optional[torch.Tensor]:
    """The train-mode logits z^adv_ij = f(x_i + eta_ij) of :func:`denoised_attack`'s images, ``[M*B', C]``.

    With ``masked_only`` the attack and the forward run only for the K images whose M copies are all
    non-hallucinated (the only ones with a non-zero L_MAdv) and the rows of the other images are zeros: the same
    loss and gradients with M*(B'-K) fewer rows (identical when the forward has no randomness across rows, e.g.
    drop path 0); None when K = 0. K sizes the attack's batch, so it is read on the host: the one wait for the
    device in a training step (the rows are then gathered without another, ``nonzero_static``); the full attack
    has none.

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
    k = int(masked_in.sum())
    if k == 0:
        return None
    images = torch.nonzero_static(masked_in, size=k).squeeze(1)  # [K], in order
    rows = (torch.arange(M, device=images.device)[:, None] * masked_in.shape[0] + images).flatten()  # noise-major
    logits = classifier(denoised_attack(classifier, clean.index_select(0, rows), denoised.index_select(0, rows),
                                        p_bar.index_select(0, images), M, eps, steps))
    return logits.new_zeros((clean.shape[0], logits.shape[-1])).index_copy(0, rows, logits)


def masked_adversarial_loss(p_bar: torch.Tensor, logits_adv: Optional[torch.Tensor], masked_in: torch.Tensor,
                            num_noises: int, lbd: float) -> torch.Tensor:
    """Step 6: L_MAdv,i = lbd * 1[all M copies of image i non-hallucinated] * max_j KL(p_bar_i || softmax(z^adv_ij)).

    Returns the per-image ``[B']`` terms, in p_bar's dtype.

    Args:
        p_bar: ``[B', C]`` consistency targets, in the graph.
        logits_adv: ``[M*B', C]`` train-mode logits of the adversarial images, noise-major. Rows of masked-out
            images are ignored (their gradient is exactly zero; they must be finite); None when no image is masked in
            (checked: a read of ``masked_in`` on the host, only then).
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
        clean, denoised: ``[M*B', ...]`` noise-major (``denoised`` from :func:`core.noise_and_denoise`).
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
