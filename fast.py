"""Opt-in inference speed-ups of f o D; nothing here is on the plain path, which reads like the paper.

``certify.py --fast`` (implied by ``--precision bf16|fp16`` and ``--compile``), ``bench.py``'s fast path and the
frozen denoiser of ``train.py`` ask for them explicitly:

* :func:`precast_weights_`: Linear / Conv weights stored in the autocast dtype (autocast would cast them again on
  every call). Results: exactly those of plain autocast.
* :func:`use_explicit_attention_`: attention layers (timm's ``Attention``, the UNet's ``AttentionBlock``) take the
  explicit ``softmax((q·s)kᵀ)v`` where :func:`explicit_attention_is_faster` (bf16 on CPU).
* :func:`enable_class_token_forward_`: an :class:`classifier.ImageClassifier` over a timm ViT computes its last
  block for the class token only (:func:`vit_class_token_forward`): the same function, ~7 % fewer FLOPs for ViT-B.
* :func:`channels_last_`: a :class:`denoiser.DiffusionDenoiser`'s UNet in channels_last memory format (by default
  on CPU only: :func:`channels_last_default`).
* :func:`compile_for_inference_`: ``torch.compile`` of the UNet and the classifier, inductor weight freezing on CPU.

:func:`prepare_inference_` applies all but compile. Each step dispatches on the real module types.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from classifier import ImageClassifier
from core import DenoisedClassifier
from denoiser import DiffusionDenoiser
from runkit.devices import autocast, precision_dtype
from unet import AttentionBlock, attention

ATTENTION_TYPES = (Attention, AttentionBlock)  # the attention layers whose kernel the fast path chooses


# ---------------------------------------------------------------------------------------------------------------
# Weights and attention
# ---------------------------------------------------------------------------------------------------------------


def precast_weights_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the weight of every Linear / Conv1d / Conv2d of ``model`` in ``dtype`` (bf16/fp16), in place.

    Autocast computes these layers in that dtype anyway but casts each fp32 weight again on every call (a few % of
    the time on an idle CPU, up to half of it on a busy one). Norms, biases, embeddings and the residual streams
    stay fp32, so the results under ``autocast(dtype)`` are those of plain autocast, bit for bit. Afterwards the
    model is for inference under that autocast only.

    Args:
        model: the network, changed in place and returned.
        dtype: ``torch.bfloat16`` or ``torch.float16``, the autocast dtype.
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            m.weight.data = m.weight.data.to(dtype)
    return model


def explicit_attention_is_faster(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the explicit attention form beats the fused kernel for ``dtype`` on ``device``: bf16 on CPU, where two
    oneDNN bf16 GEMMs and a softmax beat PyTorch's CPU flash-attention kernel at the sequence lengths certification
    runs (the measurements: docs/PERFORMANCE.md).

    Args:
        device: where the attention runs.
        dtype: the autocast dtype.
    """
    return torch.device(device).type == "cpu" and dtype == torch.bfloat16


def use_explicit_attention_(model: nn.Module, dtype: torch.dtype) -> int:
    """Switch the attention layers of ``model`` (timm ``Attention``, UNet ``AttentionBlock``) on the device of their
    weights to the explicit form (``fused_attn = False``) where :func:`explicit_attention_is_faster` for ``dtype``;
    returns how many were switched. The same function, with the scores rounded to ``dtype`` before the softmax.

    Args:
        model: the network, changed in place.
        dtype: the autocast dtype.
    """
    switched = 0
    for m in model.modules():
        if isinstance(m, ATTENTION_TYPES):
            weight = next(m.parameters(), None)
            if weight is not None and explicit_attention_is_faster(weight.device, dtype):
                m.fused_attn = False
                switched += 1
    return switched


def channels_last_default(device: torch.device) -> bool:
    """Whether the fast path's UNet goes channels_last on ``device`` unless asked otherwise: on CPU, where oneDNN's
    convolutions prefer it; not on CUDA, where each GroupNorm (the UNet has one before nearly every convolution)
    would convert the layout back and forth, and where the gain is unmeasured (no GPU was available).

    Args:
        device: where the UNet runs.
    """
    return torch.device(device).type == "cpu"


def channels_last_(model: nn.Module) -> nn.Module:
    """Every :class:`denoiser.DiffusionDenoiser` in ``model`` runs its UNet channels_last (may change float
    rounding)."""
    for m in model.modules():
        if isinstance(m, DiffusionDenoiser):
            m.unet.to(memory_format=torch.channels_last)
            m.channels_last = True
    return model


# ---------------------------------------------------------------------------------------------------------------
# The class-token shortcut
# ---------------------------------------------------------------------------------------------------------------


def supports_class_token_forward(model: nn.Module) -> bool:
    """Whether :func:`vit_class_token_forward` computes exactly ``model(x)``: a timm ``VisionTransformer`` whose
    logits read the class token alone (``global_pool='token'``, no attention pool) and whose last block is a plain
    pre-norm ``Block`` with standard ``Attention`` (no gate)."""
    if type(model) is not VisionTransformer or model.global_pool != "token" or model.attn_pool is not None:
        return False
    if model.num_prefix_tokens < 1 or len(model.blocks) == 0:
        return False
    last = model.blocks[-1]
    return type(last) is Block and type(last.attn) is Attention and getattr(last.attn, "gate", None) is None


def vit_class_token_forward(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with the last block computed for the class token only.

    The logits read token 0 after the last block, and in that block only the attention *query* mixes tokens, so

        h = norm1(z),  a_0 = softmax(q(h_0) k(h)ᵀ / sqrt(d)) v(h),  z_0' = z_0 + proj(a_0),
        z_0'' = z_0' + mlp(norm2(z_0'))

    is all that is needed: keys and values for every token, but the query, output projection and MLP for one. For
    ViT-B/16 at 224 px (197 tokens) this skips 5.9 of the last block's 7.1 M multiply-adds per token, ~7 % of the
    network. Same function (exact in real arithmetic; float rounding may differ in the last bits). Call only when
    :func:`supports_class_token_forward` holds, in eval mode (dropout and drop-path are not applied).

    Args:
        model: a timm ``VisionTransformer`` (:func:`supports_class_token_forward`).
        x: images [B, 3, H, W], normalized as the model expects.
    """
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for blk in model.blocks[:-1]:
        x = blk(x)
    blk = model.blocks[-1]
    attn: Attention = blk.attn
    h = blk.norm1(x)
    B, N, C = h.shape
    dim = attn.attn_dim
    if type(attn.qkv) is nn.Linear:  # q of the class token only; k, v of all tokens
        w, b = attn.qkv.weight, attn.qkv.bias
        q = F.linear(h[:, :1], w[:dim], None if b is None else b[:dim])
        kv = F.linear(h, w[dim:], None if b is None else b[dim:])
    else:  # e.g. LoRAQKV: the module's own qkv for every token
        q, kv = attn.qkv(h).split([dim, 2 * dim], dim=-1)
        q = q[:, :1]
    q = q.reshape(B, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k, v = kv.reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    a = attention(q, k, v, attn.scale, explicit=not attn.fused_attn)  # (B, heads, 1, head_dim)
    a = attn.proj(attn.norm(a.transpose(1, 2).reshape(B, 1, dim)))
    z = x[:, :1] + blk.ls1(a)
    z = z + blk.ls2(blk.mlp(blk.norm2(z)))
    return model.forward_head(model.norm(z))


def enable_class_token_forward_(model: nn.Module) -> int:
    """Every :class:`classifier.ImageClassifier` in ``model`` whose network supports it
    (:func:`supports_class_token_forward`) computes its eval-mode logits by :func:`vit_class_token_forward`;
    returns how many. Train mode keeps the network's own forward."""
    enabled = 0
    for m in model.modules():
        if isinstance(m, ImageClassifier) and supports_class_token_forward(m.model):
            m.inference_forward = vit_class_token_forward
            enabled += 1
    return enabled


# ---------------------------------------------------------------------------------------------------------------
# The whole fast path
# ---------------------------------------------------------------------------------------------------------------


def prepare_inference_(model: nn.Module, precision: str, channels_last: Optional[bool] = None,
                       class_token: bool = True) -> nn.Module:
    """The fast path of ``model`` (e.g. a :class:`core.DenoisedClassifier`, or a denoiser alone), in place.

    Args:
        model: the network; afterwards it is for inference under ``autocast(device, precision)`` only.
        precision: ``fp32`` (only the class-token shortcut, exact up to float rounding), ``bf16`` or ``fp16`` (also
            :func:`precast_weights_`, :func:`use_explicit_attention_`, and :func:`channels_last_` with
            ``channels_last``).
        channels_last: a denoiser's UNet goes channels_last (bf16/fp16 only); None: :func:`channels_last_default`
            for the device of the model's weights.
        class_token: :func:`enable_class_token_forward_`.
    Returns:
        ``model``.
    """
    if class_token:
        enable_class_token_forward_(model)
    if precision == "fp32":
        return model
    dtype = precision_dtype(precision)
    if channels_last is None:
        weight = next(model.parameters(), None)
        channels_last = weight is not None and channels_last_default(weight.device)
    precast_weights_(model, dtype)
    use_explicit_attention_(model, dtype)
    if channels_last:
        channels_last_(model)
    return model


def compile_for_inference_(model: DenoisedClassifier, mode: Optional[str] = None) -> DenoisedClassifier:
    """``torch.compile`` the denoiser's UNet and the classifier of ``model`` in place, for inference.

    Static shapes (``dynamic=False``): each distinct batch size compiles once (tens of seconds for the full-size
    networks), which pays off over certification's N = 10^4 to 10^5 samples per image. On CPU, inductor's weight
    freezing is on for these two compilations only (an option of each, not a process-wide setting): weights
    become constants that oneDNN prepacks, which is only valid while the weights do not change, i.e. for
    inference. ``mode``: e.g. ``max-autotune`` or ``reduce-overhead`` (CUDA graphs).

    Args:
        model: f o D, compiled in place and returned.
        mode: a ``torch.compile`` mode; None: the default.
    """
    param = next(model.parameters(), None)
    options: Optional[dict] = None
    if param is not None and param.device.type == "cpu":
        from torch._inductor import list_mode_options
        options = {**(list_mode_options(mode) if mode else {}), "freezing": True}
        mode = None  # torch.compile takes a mode or options, not both
    networks = [model.classifier] if model.denoiser is None else [model.denoiser.unet, model.classifier]
    for net in networks:
        net.compile(mode=mode, options=options, dynamic=False)
    return model


# ---------------------------------------------------------------------------------------------------------------
# The fast path on copies, and its agreement with the plain fp32 path (bench.py, scripts/agreement_vit_b.py)
# ---------------------------------------------------------------------------------------------------------------


def fast_model(denoiser: Optional[DiffusionDenoiser], classifier: nn.Module, sigma: float, precision: str,
               channels_last: bool, compile: bool, compile_mode: Optional[str]) -> DenoisedClassifier:
    """The fast path's f o D, on copies: :func:`fast.prepare_inference_` (Linear/Conv weights stored in the
    autocast dtype, UNet channels_last), and with ``compile`` both networks compiled in place.

    Args:
        denoiser: the fp32 denoiser (copied); None: no denoiser.
        classifier: the fp32 classifier (copied).
        sigma: the noise level.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        channels_last: the UNet channels_last (bf16/fp16).
        compile: ``torch.compile`` both networks.
        compile_mode: the mode of that compile.
    """
    model = DenoisedClassifier(copy.deepcopy(denoiser), copy.deepcopy(classifier), sigma).eval()
    prepare_inference_(model, precision, channels_last)
    if compile:
        compile_for_inference_(model, compile_mode)
    return model


def agreement(denoiser_fp32: DiffusionDenoiser, classifier: ImageClassifier, fast: DenoisedClassifier,
              precision: str, sigma: float, images: torch.Tensor, per_image: int, batch_size: int,
              seed: int) -> Dict[str, float]:
    """Share of samples whose class under ``fast`` (autocast ``precision``) equals the fp32 class on the same noise
    x + sigma·δ, with the logit error beside it: ``margin_median`` (fp32 top-1 minus top-2 logit) against
    ``logit_max_abs_diff``; ``decided_agreement`` counts only samples with margin > 2·max|Δlogit| (must be 1).

    Args:
        denoiser_fp32, classifier: the plain fp32 f o D.
        fast: the fast path's f o D (:func:`fast_model`).
        precision: the fast path's autocast.
        sigma: the noise level.
        images: clean images [num, 3, H, W].
        per_image: noise samples per image.
        batch_size: samples per forward.
        seed: seeds the noise (the same for both paths).
    """
    ref = DenoisedClassifier(denoiser_fp32, classifier, sigma).eval()
    g = torch.Generator(device=images.device).manual_seed(seed)
    z32, zf = [], []
    with torch.inference_mode():
        for x in images:
            noise = torch.randn((per_image, *x.shape), generator=g, device=x.device)
            for chunk in (x + sigma * noise).split(batch_size):
                z32.append(ref(chunk).float())
                with autocast(chunk.device, precision):
                    zf.append(fast(chunk).to(torch.float32, copy=True))  # CUDA graphs reuse output memory
    z32_t, zf_t = torch.cat(z32), torch.cat(zf)
    top2 = z32_t.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    diff = (zf_t - z32_t).abs()
    same = zf_t.argmax(1) == z32_t.argmax(1)
    decided = margin > 2 * diff.max(1).values
    return {
        "samples": int(len(same)),
        "agreement": float(same.float().mean()),
        "logit_max_abs_diff": float(diff.max()),
        "logit_mean_abs_diff": float(diff.mean()),
        "logit_std": float(z32_t.std()),
        "margin_median": float(margin.median()),
        "decided_share": float(decided.float().mean()),
        "decided_agreement": float(same[decided].float().mean()) if bool(decided.any()) else float("nan"),
    }
