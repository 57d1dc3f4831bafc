"""Tests for unet.py / denoiser.py against the upstream references in tests/fixtures/diffusion."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from denoiser import DENOISER_CONFIGS, DiffusionDenoiser, build_denoiser, build_unet, create_denoiser, load_denoiser
from runkit.devices import torch_threads
from runkit.errors import UserError
from runkit.files import atomic_torch_save
from unet import AttentionBlock, UNetModel

SMALL = ("improved_small", "guided_small")
FULL = {"cifar10": "cifar10_uncond_50M_500K", "imagenet": "256x256_diffusion_uncond"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small convs on a shared CPU: one intra-op thread is faster than two competing ones (and than spinning)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def diffusion_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "diffusion"


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _rule_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fixtures' weight rule: entry i of state_dict() = default_rng(i).standard_normal(shape) * 0.05, float64."""
    return {k: torch.from_numpy(np.random.default_rng(i).standard_normal(tuple(v.shape)) * 0.05)
            for i, (k, v) in enumerate(model.state_dict().items())}


def _small_denoiser(diffusion_dir: Path, name: str, dtype: torch.dtype) -> DiffusionDenoiser:
    kwargs = _json(diffusion_dir / f"{name}_reference.json")["create_model_and_diffusion_kwargs"]
    den = create_denoiser(**kwargs).to(dtype)  # cast first: load_state_dict copies into the params' dtype
    den.unet.load_state_dict({k: v.to(dtype) for k, v in _rule_weights(den.unet).items()}, strict=True)
    return den.eval()


@pytest.fixture(scope="module")
def small_models(diffusion_dir: Path) -> dict:
    cache: dict = {}

    def get(name: str, dtype: torch.dtype) -> DiffusionDenoiser:
        if (name, dtype) not in cache:
            cache[name, dtype] = _small_denoiser(diffusion_dir, name, dtype)
        return cache[name, dtype]
    return get


def _manifest_entries(manifest: dict) -> list:
    return [(k, list(shape)) for k, shape, _ in manifest["state_dict"]]


def _entries(model: nn.Module) -> list:
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]


# ----------------------------------------------------------------------------------------------------------------
# Architecture: keys, shapes, order, parameter counts
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SMALL)
def test_small_state_dict_matches_manifest(diffusion_dir, name):
    manifest = _json(diffusion_dir / f"{name}_state_dict_manifest.json")
    with torch.device("meta"):
        den = create_denoiser(**manifest["create_model_and_diffusion_kwargs"])
    assert _entries(den.unet) == _manifest_entries(manifest)
    assert sum(p.numel() for p in den.unet.parameters()) == manifest["total_parameters"]
    assert list(den.unet.channel_mult) == _json(diffusion_dir / f"{name}_reference.json")["resolved_channel_mult"]


@pytest.mark.parametrize("name", list(FULL))
def test_full_size_unet_matches_manifest(diffusion_dir, name):
    manifest = _json(diffusion_dir / f"{FULL[name]}_state_dict_manifest.json")
    cfg = DENOISER_CONFIGS[name]
    assert cfg["kwargs"] == manifest["create_model_and_diffusion_kwargs"]
    assert cfg["checkpoint"] == manifest["checkpoint"] and cfg["url"].endswith("/" + manifest["checkpoint"])
    with torch.device("meta"):
        den = build_denoiser(name)
    unet = den.unet
    assert _entries(unet) == _manifest_entries(manifest)
    assert len(unet.state_dict()) == manifest["num_state_dict_entries"] == {"cifar10": 446, "imagenet": 566}[name]
    n_params = sum(p.numel() for p in unet.parameters())
    assert n_params == manifest["total_parameters"] == {"cifar10": 52_546_438, "imagenet": 552_814_086}[name]
    assert list(unet.channel_mult) == manifest["resolved_channel_mult"]
    assert sorted(unet.attention_resolutions) == manifest["resolved_attention_downsample_factors"]
    assert not list(unet.buffers())


def test_build_unet_resolves_upstream_defaults():
    with torch.device("meta"):
        assert build_unet(image_size=128).channel_mult == (1, 1, 2, 3, 4)
        assert build_unet(image_size=64, attention_resolutions="16,8").attention_resolutions == (4, 8)
        unet512 = build_unet(image_size=512, num_channels=64, num_res_blocks=1)
        assert unet512.channel_mult[0] == 0.5 and unet512.input_blocks[0][0].out_channels == 32
        custom = build_unet(image_size=16, channel_mult="1,2,2", attention_resolutions="8", num_channels=32,
                            num_res_blocks=1, num_heads=4, num_heads_upsample=2, learn_sigma=True)
        assert custom.channel_mult == (1, 2, 2) and custom.attention_resolutions == (2,) and custom.out_channels == 6
        attn = [m for m in custom.modules() if isinstance(m, AttentionBlock)]
        assert [m.num_heads for m in attn] == [4, 4, 2, 2]  # input block, middle, 2 output blocks at ds=2
        by_width = build_unet(image_size=64, num_channels=64, num_head_channels=32, num_heads=1)
        assert {m.channels // m.num_heads for m in by_width.modules() if isinstance(m, AttentionBlock)} == {32}
    with pytest.raises(UserError, match="channel_mult"):
        build_unet(image_size=48)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_orders_match_upstream_formula(new_order):
    """Both q/k/v channel splits equal upstream's einsum attention (softmax((q·d^-1/4)ᵀ(k·d^-1/4))·v) in float64."""
    torch.manual_seed(0)
    block = AttentionBlock(64, num_heads=4, use_new_attention_order=new_order).double()
    for p in block.parameters():
        nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 64, 5, 6, dtype=torch.float64)
    b, c, n, heads = 2, 64, 30, 4
    qkv = block.qkv(block.norm(x).reshape(b, c, n))
    ch = c // heads
    if new_order:
        q, k, v = (z.reshape(b * heads, ch, n) for z in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, n).split(ch, dim=1)
    s = 1 / math.sqrt(math.sqrt(ch))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, n)
    expected = (x.reshape(b, c, n) + block.proj_out(a)).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, atol=1e-12, rtol=0)
    other = AttentionBlock(64, num_heads=4, use_new_attention_order=not new_order).double()
    other.load_state_dict(block.state_dict())
    assert (other(x) - expected).abs().max() > 1e-3  # the two orders really differ


# ----------------------------------------------------------------------------------------------------------------
# Numerical references (forward and one-shot denoise)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SMALL)
def test_forward_matches_reference(diffusion_dir, small_models, name):
    ref = np.load(diffusion_dir / f"{name}_reference.npz")
    x, ts = torch.from_numpy(ref["x"]), torch.from_numpy(ref["timesteps"])
    with torch.no_grad():
        out64 = small_models(name, torch.float64).unet(x, ts)
        out32 = small_models(name, torch.float32).unet(x.float(), ts.float())
        out_int = small_models(name, torch.float64).unet(x, ts.long())
    assert out64.dtype == torch.float64 and out32.dtype == torch.float32
    np.testing.assert_allclose(out64.numpy(), ref["output"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(out_int.numpy(), ref["output"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(out32.numpy(), ref["output"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out32.numpy(), ref["output_fp32_upstream"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", SMALL)
def test_denoise_matches_reference(diffusion_dir, small_models, name):
    ref = np.load(diffusion_dir / f"{name}_denoise_reference.npz")
    den64 = small_models(name, torch.float64)
    t = int(ref["t"][0])
    assert den64.timestep_for_sigma(0.5) == t == {"improved_small": 1984, "guided_small": 259}[name]
    assert den64.model_timestep(t) == float(ref["model_input_timesteps"][0])
    abar = float(den64.alphas_cumprod[t])
    # x_noisy such that sqrt(abar)·(2·x_noisy − 1) is the fixture's x_t
    x_noisy = (torch.from_numpy(ref["x_t"]) / math.sqrt(abar) + 1) / 2
    expected = (ref["pred_xstart"] + 1) / 2
    with torch.no_grad():
        out64 = den64.denoise(x_noisy, t)
        out32 = small_models(name, torch.float32).denoise(x_noisy.float(), t)
    assert out64.dtype == torch.float64 and out32.dtype == torch.float32
    np.testing.assert_allclose(out64.numpy(), expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out32.numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out32.numpy(), (ref["pred_xstart_fp32_upstream"] + 1) / 2, rtol=0, atol=1e-6)
    assert out64.min() >= 0 and out64.max() <= 1 and (out64 == 1).any()  # clipped, as pred_xstart is


# ----------------------------------------------------------------------------------------------------------------
# Schedules and sigma -> t*
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FULL))
def test_schedule_and_timestep_for_sigma(diffusion_dir, name):
    schedule = _json(diffusion_dir / f"{FULL[name]}_schedule.json")
    with torch.device("meta"):  # the schedule is built from numpy, off the meta device
        den = build_denoiser(name)
    assert den.alphas_cumprod.device.type == "cpu" and den.alphas_cumprod.dtype == torch.float64 and den.num_timesteps == schedule["num_timesteps"]
    np.testing.assert_allclose(den.alphas_cumprod.numpy(), schedule["alphas_cumprod"], rtol=0, atol=1e-12)
    den.to(torch.float32)  # the schedule stays float64
    assert den.alphas_cumprod.dtype == torch.float64
    expected = {"cifar10": [573, 1158, 1984, 2809], "imagenet": [70, 145, 259, 396]}[name]
    assert [den.timestep_for_sigma(s) for s in (0.12, 0.25, 0.5, 1.0)] == expected
    for entry in schedule["sigma_to_timestep"]:
        rule = entry["first_t_with_ratio_ge_target"]
        assert den.timestep_for_sigma(entry["sigma_pixel"]) == rule["t"]
        assert den.model_timestep(rule["t"]) == rule["model_input_timestep"]
    assert den.timestep_for_sigma(1e-9) == 1  # t = 0 is never chosen


@pytest.mark.parametrize("sigma, match", [(0.0, "sigma must be > 0"), (-0.5, "sigma must be > 0"),
                                          (float("nan"), "sigma must be > 0"), (1e6, "beyond the largest noise")])
def test_timestep_for_sigma_rejects_bad_sigma(sigma, match):
    den = build_denoiser("digits")
    with pytest.raises(UserError, match=match) as err:
        den.timestep_for_sigma(sigma)
    assert "\n" not in str(err.value)
    assert den.timestep_for_sigma(den.max_sigma) == den.num_timesteps - 1


# ----------------------------------------------------------------------------------------------------------------
# Precision, memory format, input sizes, gradients
# ----------------------------------------------------------------------------------------------------------------

def test_bf16_autocast_and_channels_last_close_to_fp32(diffusion_dir, small_models):
    den = small_models("improved_small", torch.float32)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x_noisy = x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    t = den.timestep_for_sigma(0.25)
    with torch.no_grad():
        ref = den.denoise(x_noisy, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = den.denoise(x_noisy, t)
        with torch.autocast("cpu", dtype=torch.float16):
            fp16 = den.denoise(x_noisy, t)
        den_cl = _small_denoiser(diffusion_dir, "improved_small", torch.float32)
        den_cl.channels_last = True
        den_cl.unet.to(memory_format=torch.channels_last)
        cl = den_cl.denoise(x_noisy.contiguous(memory_format=torch.channels_last), t)
    assert bf16.dtype == fp16.dtype == cl.dtype == torch.float32
    err_bf16, err_fp16 = (bf16 - ref).abs().max().item(), (fp16 - ref).abs().max().item()
    assert 0 < err_bf16 < 2e-3 and 0 < err_fp16 < 3e-4, (err_bf16, err_fp16)  # measured 1.7e-4 / 1.8e-5
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=0)


def test_any_multiple_of_downsampling_and_bad_sizes(small_models):
    den = small_models("guided_small", torch.float32)  # 64-px model, downsamples by 8
    x = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        out = den.denoise(x, 100)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    with pytest.raises(UserError, match="not a multiple of 8"):
        den.denoise(torch.rand(1, 3, 36, 56), 100)
    with pytest.raises(UserError, match=r"\[B, 3, H, W\]"):
        den.denoise(torch.rand(1, 1, 40, 56), 100)
    with pytest.raises(UserError, match="outside 0..999"):
        den.denoise(x, 1000)


def test_gradient_flows_to_input_only_when_asked():
    den = build_denoiser("digits").eval().requires_grad_(False)
    for p in den.unet.parameters():
        nn.init.normal_(p, std=0.05)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    den.denoise(x, 500).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert den.denoise(x.detach(), 500).grad_fn is None


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: round trip and clear errors
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_state_dict() -> dict:
    den = build_denoiser("digits")
    return {k: v.float() for k, v in _rule_weights(den.unet).items()}


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model_module", "denoiser"])
def test_checkpoint_round_trip(tmp_path, digits_state_dict, wrap):
    den = build_denoiser("digits")
    den.unet.load_state_dict(digits_state_dict)
    den.eval()
    sd = den.unet.state_dict()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3},
           "model_module": {"model": {"module." + k: v for k, v in sd.items()}},
           "denoiser": den.state_dict()}[wrap]
    path = tmp_path / "digits.pt"
    atomic_torch_save(obj, path)
    loaded = load_denoiser("digits", path, device="cpu")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.denoise(x, 1158), den.denoise(x, 1158), atol=0, rtol=0)
    for k, v in loaded.unet.state_dict().items():
        assert torch.equal(v, sd[k]), k
    half = load_denoiser("digits", path, device="cpu", dtype="bf16", channels_last=True)
    assert half.unet.dtype == torch.bfloat16 and half.alphas_cumprod.dtype == torch.float64
    with torch.no_grad():
        out = half.denoise(x, 1158)
    assert out.dtype == torch.float32 and (out - den.denoise(x, 1158)).abs().max() < 5e-2


def _load_error(name: str, path: Path) -> str:
    with pytest.raises(UserError) as err:
        load_denoiser(name, path, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_load_errors(tmp_path, digits_state_dict):
    msg = _load_error("cifar10", tmp_path / "cifar10_uncond_50M_500K.pt")
    assert "not found" in msg and DENOISER_CONFIGS["cifar10"]["url"] in msg
    msg = _load_error("imagenet", tmp_path / "nope.pt")
    assert DENOISER_CONFIGS["imagenet"]["url"] in msg

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    assert "--denoiser_ckpt" in _load_error("digits", garbage) and "unreadable checkpoint" in _load_error("digits", garbage)

    as_list = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], as_list)
    assert "not a state dict" in _load_error("digits", as_list)
    no_tensors = tmp_path / "no_tensors.pt"
    torch.save({"epoch": 3, "lr": 0.1}, no_tensors)
    assert "not a state dict" in _load_error("digits", no_tensors)
    pickled = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), pickled)
    assert "pickled Python objects" in _load_error("digits", pickled)

    wrong_keys = dict(digits_state_dict)
    del wrong_keys["out.2.bias"]
    wrong_keys["extra.weight"] = torch.zeros(3)
    path = tmp_path / "wrong_keys.pt"
    torch.save(wrong_keys, path)
    msg = _load_error("digits", path)
    assert "1 missing keys (e.g. out.2.bias)" in msg and "1 unexpected keys (e.g. extra.weight)" in msg
    n = len(digits_state_dict)
    assert f"expected {n} entries, the file has {n}" in msg

    path = tmp_path / "digits_as_cifar.pt"
    torch.save(digits_state_dict, path)
    msg = _load_error("cifar10", path)
    assert "'cifar10' UNet" in msg and "expected 446 entries" in msg

    wrong_shape = dict(digits_state_dict)
    wrong_shape["out.2.weight"] = torch.zeros(3, 32, 3, 3)
    path = tmp_path / "wrong_shape.pt"
    torch.save(wrong_shape, path)
    msg = _load_error("digits", path)
    assert "1 tensors have the wrong shape" in msg and "out.2.weight [3, 32, 3, 3] vs [6, 32, 3, 3]" in msg

    with pytest.raises(UserError, match="unknown denoiser 'mnist'"):
        load_denoiser("mnist", path)


def test_unet_forward_scalar_timestep_and_class_cond():
    torch.manual_seed(0)
    unet = UNetModel(3, 32, 3, 1, (2,), channel_mult=(1, 2), num_heads=2, num_classes=5)
    for p in unet.parameters():
        nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 8, 8)
    y = torch.tensor([1, 3])
    out = unet(x, 10.0, y)
    torch.testing.assert_close(out, unet(x, torch.tensor([10.0, 10.0]), y))
    assert not torch.allclose(out, unet(x, 10.0, torch.tensor([2, 3])))
    with pytest.raises(ValueError, match="class-conditional"):
        unet(x, 10.0)


# ----------------------------------------------------------------------------------------------------------------
# Multi-step denoising (the paper's multistep=True)
# ----------------------------------------------------------------------------------------------------------------

def _posterior_chain(unet: nn.Module, schedule: dict, x_noisy: torch.Tensor, t: int, seeds: list) -> torch.Tensor:
    """The reverse chain t, ..., 0 written out from the schedule file's betas / alphas_cumprod (upstream's arrays):
    p_sample with clip_denoised=True and the learned-range variance, posterior noise from one generator per image."""
    betas, abar = np.array(schedule["betas"]), np.array(schedule["alphas_cumprod"])
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    log_post_var = np.log(np.append(post_var[1], post_var[1:]))
    coef1, coef2 = betas * np.sqrt(abar_prev) / (1 - abar), (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)
    scale = 1000.0 / schedule["num_timesteps"] if schedule["rescale_timesteps"] else 1.0
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = math.sqrt(abar[t]) * (2 * x_noisy - 1)
    for s in range(t, -1, -1):
        out = unet(x, torch.full((len(x),), s * scale, dtype=torch.float64))
        eps, v = out[:, :3], out[:, 3:]
        x0 = (math.sqrt(1 / abar[s]) * x - math.sqrt(1 / abar[s] - 1) * eps).clamp(-1, 1)
        mean = coef1[s] * x0 + coef2[s] * x
        if s == 0:
            x = mean
            break
        log_var = (v + 1) / 2 * math.log(betas[s]) + (1 - (v + 1) / 2) * log_post_var[s]
        z = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64) for g in gens])
        x = mean + torch.exp(0.5 * log_var) * z
    return (x + 1) / 2


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL)
def test_multistep_denoise_is_the_posterior_chain(diffusion_dir, small_models, name):
    """Multi-step denoising equals the chain computed directly from the schedule's posterior formulas (float64, same
    noise), does not depend on the batch an image is in, and its noise matters."""
    den = small_models(name, torch.float64)
    schedule = _json(diffusion_dir / f"{FULL['cifar10' if name == 'improved_small' else 'imagenet']}_schedule.json")
    size = 32 if name == "improved_small" else 64
    x_noisy = torch.from_numpy(np.random.default_rng(5).uniform(-0.2, 1.2, (2, 3, size, size)))
    t, seeds = 6, [11, 12]
    with torch.no_grad():
        expected = _posterior_chain(den.unet, schedule, x_noisy, t, seeds)
        got = den.denoise_multistep(x_noisy, t, [torch.Generator().manual_seed(s) for s in seeds])
        alone = den.denoise_multistep(x_noisy[1:], t, [torch.Generator().manual_seed(seeds[1])])
        other_noise = den.denoise_multistep(x_noisy, t, [torch.Generator().manual_seed(s + 100) for s in seeds])
    assert got.dtype == torch.float64 and got.shape == x_noisy.shape
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(alone.numpy(), got[1:].numpy(), rtol=0, atol=1e-10)
    assert (other_noise - got).abs().max() > 1e-3
    assert got.min() >= -1e-9 and got.max() <= 1 + 1e-9  # the last step returns the clipped x0 estimate
    with pytest.raises(ValueError, match="1 generators for 2 images"):
        den.denoise_multistep(x_noisy, t, [torch.Generator()])


def test_multistep_needs_learned_variance():
    den = build_denoiser("digits", learn_sigma=False)
    with pytest.raises(UserError, match="learn_sigma"):
        den.denoise_multistep(torch.rand(1, 3, 16, 16), 3)
