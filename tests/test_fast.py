"""fast.py: every opt-in speed-up computes the plain path's function (exactly where the trick is exact)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import classifier as C
import fast
from core import DenoisedClassifier
from denoiser import build_denoiser
from runkit.devices import torch_threads
from unet import attention

_SMALL_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, num_classes=5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _random_vit(**kw) -> nn.Module:
    """A small timm ViT with every parameter (LayerNorms, biases, class token) random, in float64."""
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(**{**_SMALL_VIT, **kw}).double().eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return vit


def _digits_model(seed: int = 0) -> DenoisedClassifier:
    """f o D at digits size with random weights (the UNet's zero-initialised layers made non-zero), fp32, eval."""
    import bench
    torch.manual_seed(seed)
    denoiser = build_denoiser("digits")
    bench._randomize_zero_init(denoiser.unet)
    classifier = C.get_architecture("digits_vit_tiny", num_classes=10)
    return DenoisedClassifier(denoiser.requires_grad_(False), classifier.requires_grad_(False), 0.25).eval()


# ---------------------------------------------------------------------------------------------------------------
# The class-token shortcut
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {},  # the cifar10_vit_base structure (CLS token, post-norm head)
    dict(pre_norm=True, qkv_bias=True),  # the CLIP tower of imagenet_vit_base
    dict(reg_tokens=2, init_values=0.1, qk_norm=True),  # registers, LayerScale, q/k norms
    dict(qkv_bias=False),
])
def test_class_token_forward_is_the_full_forward(kw):
    vit = _random_vit(**kw)
    assert fast.supports_class_token_forward(vit)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        full, short = vit(x), fast.vit_class_token_forward(vit, x)
        assert full.std() > 0.1  # a real signal, not a near-constant
        assert torch.allclose(short, full, rtol=0, atol=1e-12)
        # a change of a non-class token at the input still reaches the logits (through keys and values)
        x2 = x.clone()
        x2[:, :, -8:, -8:] += 1.0
        assert not torch.allclose(fast.vit_class_token_forward(vit, x2), short, atol=1e-6)


def test_class_token_forward_only_when_enabled_and_with_lora():
    """The plain ImageClassifier runs timm's forward; fast.enable_class_token_forward_ switches the shortcut on
    for eval mode only."""
    vit = _random_vit()
    clf = C.ImageClassifier(vit, 32, (0.5,) * 3, (0.5,) * 3).double().eval()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    calls = []
    handle = vit.register_forward_hook(lambda *_: calls.append(1))  # fires only for the full vit(x)
    with torch.no_grad():
        full = clf(x)
        assert calls == [1]  # plain: the model's own forward
        assert fast.enable_class_token_forward_(nn.Sequential(clf)) == 1
        short = clf(x)
        assert calls == [1]  # eval: the shortcut ran
        assert torch.allclose(short, full, rtol=0, atol=1e-12)
        clf.train()
        clf(x)
        assert len(calls) == 2  # train mode (dropout, drop-path): the model's own forward
    handle.remove()
    clf.eval()
    C.apply_lora(clf, rank=2)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p))
        lora_full = vit(clf.normalize(x))
        assert not torch.allclose(lora_full, full, atol=1e-3)  # the adapters matter
        assert torch.allclose(clf(x), lora_full, rtol=0, atol=1e-12)


def test_class_token_forward_only_where_exact():
    assert not fast.supports_class_token_forward(_random_vit(global_pool="avg"))
    assert not fast.supports_class_token_forward(_random_vit(class_token=False, global_pool="avg"))
    assert not fast.supports_class_token_forward(nn.Linear(2, 2))
    assert fast.supports_class_token_forward(C.get_architecture("cifar10_vit_base", device="meta").model)
    assert fast.supports_class_token_forward(C.get_architecture("imagenet_vit_base", device="meta").model)
    assert fast.supports_class_token_forward(C.get_architecture("digits_vit_tiny").model)
    avg = C.ImageClassifier(_random_vit(global_pool="avg"), 32, (0.5,) * 3, (0.5,) * 3)
    assert fast.enable_class_token_forward_(avg) == 0 and avg.inference_forward is None


def test_fp32_fast_path_agrees_with_the_plain_path():
    """fp32: the fast path changes only the class-token computation: logits within 1e-5 of the plain path's."""
    model = _digits_model()
    quick = fast.prepare_inference_(copy.deepcopy(model), "fp32")
    assert quick.classifier.inference_forward is fast.vit_class_token_forward
    assert model.classifier.inference_forward is None  # the plain model is untouched
    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)) + 0.25 * torch.randn(
        64, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        plain, short = model(x), quick(x)
    assert plain.std() > 0.1
    torch.testing.assert_close(short, plain, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Weights in the autocast dtype, explicit attention
# ---------------------------------------------------------------------------------------------------------------


def test_precast_weights_is_plain_autocast():
    """Weights stored in bf16 (contiguous UNet): bit for bit the logits of plain autocast with the same attention
    kernels and the shortcut; fp32: only the shortcut."""
    model = _digits_model()
    quick = fast.prepare_inference_(copy.deepcopy(model), "bf16", channels_last=False)
    assert quick.denoiser.unet.out[2].weight.dtype == torch.bfloat16
    layers = [m for m in quick.modules() if isinstance(m, fast.ATTENTION_TYPES)]
    assert len(layers) == 8 and not any(m.fused_attn for m in layers)  # 4 ViT blocks + 4 UNet blocks, on CPU
    assert fast.use_explicit_attention_(model, torch.bfloat16) == 8
    fast.enable_class_token_forward_(model)
    assert quick.classifier.model.pos_embed.dtype == quick.classifier.model.norm.weight.dtype == torch.float32
    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(4)) + 0.25
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(quick(x), model(x))
    assert fast.prepare_inference_(model, "fp32") is model
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_attention_sdpa_and_explicit_form():
    """unet.attention: SDPA (= the textbook formula in float64); the explicit form is bit for bit
    ``softmax((q·s)kᵀ)v`` in bf16, within bf16 rounding of the float64 result. fast chooses it for bf16 on CPU."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 29, 16, generator=g, dtype=torch.float64) for _ in range(3))
    exact = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v
    torch.testing.assert_close(attention(q, k, v, 0.25), exact, atol=1e-12, rtol=0)
    torch.testing.assert_close(attention(q[:, :, :1], k, v, 0.25), exact[:, :, :1], atol=1e-12, rtol=0)
    torch.testing.assert_close(attention(q, k, v, 0.25, explicit=True), exact, atol=1e-12, rtol=0)
    assert fast.explicit_attention_is_faster(torch.device("cpu"), torch.bfloat16)
    assert not fast.explicit_attention_is_faster(torch.device("cpu"), torch.float32)
    assert not fast.explicit_attention_is_faster(torch.device("cuda"), torch.bfloat16)
    qb, kb, vb = (z.bfloat16() for z in (q, k, v))
    out = attention(qb, kb, vb, 0.25, explicit=True)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ((qb * 0.25) @ kb.transpose(-2, -1)).softmax(-1) @ vb)
    assert (out.double() - exact).abs().max() < 0.03  # a few bf16 ulps of values of size ~1


# ---------------------------------------------------------------------------------------------------------------
# Compile
# ---------------------------------------------------------------------------------------------------------------


def test_compile_for_inference_compiles_both_networks(monkeypatch):
    """Both the UNet and the classifier wrapper go through torch.compile, with static shapes and inductor weight
    freezing on CPU as an option of these compilations (the process-wide flag untouched); without a denoiser, the
    classifier alone. torch.compile is replaced by a pass-through spy, so this checks what is compiled and that the
    forward runs through it, without paying for inductor."""
    import torch._inductor.config as inductor_config
    from torch._inductor import list_mode_options
    compiled = {}

    def spy(fn, **kwargs):
        def run(*args, **kw):
            compiled[type(fn.__self__).__name__]["calls"] += 1
            return fn(*args, **kw)
        compiled[type(fn.__self__).__name__] = {"kwargs": kwargs, "calls": 0}
        return run

    monkeypatch.setattr(torch, "compile", spy)
    # torch's process-wide flag is off by default and must stay so (monkeypatching a torch config module breaks
    # its later reads in this process: the attribute vanishes on undo)
    assert not inductor_config.freezing
    plain = _digits_model()
    model = fast.compile_for_inference_(copy.deepcopy(plain))
    assert set(compiled) == {"UNetModel", "ImageClassifier"} and not inductor_config.freezing
    assert all(c["kwargs"] == {"mode": None, "options": {"freezing": True}, "dynamic": False} and c["calls"] == 0
               for c in compiled.values())
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain(x))
    assert [c["calls"] for c in compiled.values()] == [1, 1]
    compiled.clear()
    fast.compile_for_inference_(DenoisedClassifier(None, copy.deepcopy(plain.classifier), 0.25), mode="max-autotune")
    options = {**list_mode_options("max-autotune"), "freezing": True}  # CPU: the mode's options, plus freezing
    assert compiled == {"ImageClassifier": {"kwargs": {"mode": None, "options": options, "dynamic": False},
                                            "calls": 0}}
