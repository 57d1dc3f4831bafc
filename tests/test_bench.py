"""bench.py: the re-created reference path is the upstream computation, the fast path agrees with fp32, the CLI runs."""
from __future__ import annotations

import copy
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import reference
from core import PHASE_ESTIMATION, DenoisedClassifier, NoiseStream, Smooth
from denoiser import build_denoiser
from presets import CIFAR10
from runkit.devices import torch_threads
from runkit.errors import UserError

CPU = torch.device("cpu")


def _digits_models(seed: int = 0):
    """The digits-size denoiser and classifier with random weights (no zero-initialised layers), fp32, eval."""
    torch.manual_seed(seed)
    denoiser = build_denoiser("digits")
    bench._randomize_zero_init(denoiser.unet)
    classifier = bench.get_architecture("digits_vit_tiny", num_classes=10)
    return denoiser.eval().requires_grad_(False), classifier.eval().requires_grad_(False)


@pytest.mark.parametrize("name, schedule", [
    ("improved_small", "cifar10_uncond_50M_500K_schedule.json"),
    ("guided_small", "256x256_diffusion_uncond_schedule.json"),
])
def test_reference_diffusion_matches_upstream(fixtures_dir, name, schedule):
    """q_sample and p_mean_variance (pred_xstart, posterior mean, learned-range log-variance) reproduce the
    upstream float64 numbers, given the upstream model output."""
    ref = np.load(fixtures_dir / "diffusion" / f"{name}_denoise_reference.npz")
    sched = json.loads((fixtures_dir / "diffusion" / schedule).read_text())
    meta = json.loads((fixtures_dir / "diffusion" / f"{name}_denoise_reference.json").read_text())
    diffusion = reference.ReferenceDiffusion(np.array(sched["alphas_cumprod"]), sched.get("rescale_timesteps", False))
    t = torch.from_numpy(ref["t"])
    x0, eps = torch.from_numpy(ref["x0"]), torch.from_numpy(ref["eps"])
    seen = {}

    def model(x, tau):
        seen["tau"] = tau
        return torch.from_numpy(ref["model_output"])

    x_t = diffusion.q_sample(x0, t, eps)
    torch.testing.assert_close(x_t, torch.from_numpy(ref["x_t"]), rtol=0, atol=1e-12)
    out = diffusion.p_mean_variance(model, x_t, t)
    np.testing.assert_allclose(seen["tau"].numpy(), ref["model_input_timesteps"], rtol=0, atol=1e-9)
    assert float(seen["tau"][0]) == meta["model_input_timestep"]["value"]
    for key, expected in (("pred_xstart", "pred_xstart"), ("mean", "p_mean"), ("log_variance", "p_log_variance")):
        torch.testing.assert_close(out[key], torch.from_numpy(ref[expected]), rtol=1e-10, atol=1e-10)
    sample = diffusion.p_sample(model, x_t, t)
    assert torch.equal(sample["pred_xstart"], out["pred_xstart"])
    assert not torch.equal(sample["sample"], out["mean"])  # t > 0: the sample carries fresh noise


def test_reference_denoise_is_the_one_shot_denoiser():
    """With matched noise (δ = sqrt(1 − ᾱ)/(2 sqrt(ᾱ))·ε) the reference's q_sample + p_sample equals
    DiffusionDenoiser.denoise: the reference path computes the same function, only with more work."""
    denoiser, classifier = _digits_models()
    denoiser = denoiser.double()
    model = reference.ReferenceDenoisedClassifier(denoiser, classifier, sigma=0.25)
    abar = float(denoiser.alphas_cumprod[model.t])
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 16, 16, generator=g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t_batch = torch.full((4,), model.t)
    x_t = model.diffusion.q_sample(x * 2 - 1, t_batch, eps)
    ours = denoiser.denoise(x + math.sqrt(1 - abar) / (2 * math.sqrt(abar)) * eps, model.t)
    theirs = (model.diffusion.p_sample(denoiser.unet, x_t, t_batch)["pred_xstart"] + 1) / 2
    assert 0.01 < float((theirs - x).abs().mean())  # the UNet does something
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-10)


def test_our_finetune_step_is_the_reference_step_on_the_same_denoised_images():
    """Given the same denoised images, our step (attack on the masked-in images only, foreach clipping, fused AdamW)
    computes the reference step's clipped gradients and update (attack on every image, per-parameter clipping loop,
    for-loop AdamW): masking the attack changes the work, not the loss."""
    denoiser, classifier = _digits_models()
    g = torch.Generator().manual_seed(2)
    images = torch.rand(6, 3, 16, 16, generator=g)
    with torch.no_grad():
        targets = classifier(images).argmax(1)
    targets[:2] = (targets[:2] + 1) % 10  # two images the classifier gets wrong: never masked in

    def denoise(clean):  # the same "denoised" images for both steps
        return (clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)

    results = []
    for make in (lambda clf: reference.ReferenceFinetuneStep(clf, denoiser, 0.25, CIFAR10.train, "fp32", CPU),
                 lambda clf: bench.FinetuneStep(clf, denoiser, 0.25, CIFAR10.train, "fp32", CPU, masked_only=True)):
        clf = copy.deepcopy(classifier).requires_grad_(True)
        step = make(clf)
        step.denoise = denoise
        before = [p.detach().clone() for p in step.params]
        torch.manual_seed(0)
        step(images, targets)
        results.append((step.masked_in[0], [p.grad.clone() for p in step.params],
                        [p.detach().clone() for p in step.params]))
    (ref_share, ref_grads, ref_params), (share, grads, params) = results
    assert ref_share == share and 0 < share < 1  # some images masked in, some not: the masking matters
    for a, b in zip(ref_grads + ref_params, grads + params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)
    moved = max(float((p - q).abs().max()) for p, q in zip(params, before))
    assert moved > 1e-6  # the step changed the weights


@pytest.mark.slow
@torch_threads(1)  # small ops: one thread is faster, and immune to a busy second core
def test_fast_path_agrees_with_fp32_on_same_noise():
    """bf16 autocast + channels_last vs fp32, same noise, digits-size models: >= 99% of classes match, logits close."""
    denoiser, classifier = _digits_models()
    fast = bench.fast_model(denoiser, classifier, 0.25, "bf16", channels_last=True, compile=False, compile_mode=None)
    assert fast.classifier.model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert classifier.model.blocks[0].attn.qkv.weight.dtype == torch.float32  # the fp32 model is untouched
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    stats = bench.agreement(denoiser, classifier, fast, "bf16", 0.25, images, per_image=64, batch_size=256, seed=3)
    assert stats["samples"] == 256
    assert stats["agreement"] >= 0.99
    assert stats["decided_agreement"] == 1.0
    assert stats["logit_max_abs_diff"] < 0.1 * stats["logit_std"] + 0.05
    assert stats["logit_mean_abs_diff"] < 0.02 * stats["logit_std"] + 0.01

    # the certification loop itself (on-device noise and counts): same key, same noise -> nearly the same counts
    x = images[0]
    counts = {}
    for precision, base in (("fp32", DenoisedClassifier(denoiser, classifier, 0.25)), ("bf16", fast)):
        smooth = Smooth(base, 10, 0.25, precision=precision)
        counts[precision] = smooth.counts(x, 0, 300, NoiseStream(x, 7, PHASE_ESTIMATION, length=300), 150)[0].numpy()
    assert counts["fp32"].sum() == counts["bf16"].sum() == 300
    assert np.abs(counts["fp32"] - counts["bf16"]).sum() <= 6  # <= 1% of the samples change class


@pytest.mark.slow
@torch_threads(1)
def test_fast_path_agrees_on_shipped_digits_models():
    """Trained weights (the demo's shipped models), digits test images: bf16 fast path == fp32 on >= 99% of samples."""
    models = bench.build_models("digits", torch.device("cpu"), "auto")
    assert models["weights"] == "shipped"  # models/digits_*.pt ship with the repository
    denoiser, classifier = models["denoiser"], models["classifier"]
    fast = bench.fast_model(denoiser, classifier, 0.25, "bf16", channels_last=True, compile=False, compile_mode=None)
    images, _ = bench.test_images("digits", 4, torch.device("cpu"))
    stats = bench.agreement(denoiser, classifier, fast, "bf16", 0.25, images, per_image=64, batch_size=256, seed=5)
    assert stats["agreement"] >= 0.99
    assert stats["margin_median"] > 10 * stats["logit_max_abs_diff"]  # trained: margins dwarf the bf16 error


def test_flop_count_and_matmul_rate():
    """The ceiling figures: the shortcut saves FLOPs exactly where expected; matmul rates are positive."""
    denoiser, classifier = _digits_models()
    x = torch.rand(1, 3, 16, 16)
    full = bench.gflops_per_sample(reference.ReferenceDenoisedClassifier(denoiser, classifier, 0.25).eval(), x)
    plain = bench.gflops_per_sample(DenoisedClassifier(denoiser, classifier, 0.25).eval(), x)
    fast = bench.gflops_per_sample(bench.fast_model(denoiser, classifier, 0.25, "fp32", False, False, None), x)
    unet = bench.gflops_per_sample(lambda y: denoiser.denoise(y, 100), x)
    vit = full - unet
    # digits ViT: 17 tokens, dim 64, MLP 256; the last block keeps k, v for 17 tokens and the rest for 1 token
    per_token_block = 2 * (3 * 64 * 64 + 64 * 64 + 2 * 64 * 256)
    assert full - fast == pytest.approx(16 * (per_token_block - 2 * 2 * 64 * 64) / 1e9
                                        + 2 * 2 * 4 * 16 * 17 * 16 / 1e9, rel=1e-6)
    assert 0 < vit and 0 < unet and plain == pytest.approx(full, rel=1e-9)  # the plain path: every token
    rates = bench.matmul_gflops(torch.device("cpu"), ["bf16"], shape=(64, 64, 64), repeats=1)
    assert set(rates) == {"fp32", "bf16"} and min(rates.values()) > 0


@pytest.mark.slow
def test_bench_cli_digits_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main(["--configs", "digits", "--device", "cpu", "--threads", "1", "--weights", "random",
                         "--batch_size", "16",
                         "--iters", "1", "--rounds", "1", "--agreement_samples", "8", "--ft_images", "1",
                         "--precisions", "bf16", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["configs"][0]["config"] == "digits" and data["env"]["device"] == "cpu"
    rows = data["configs"][0]["certify"]
    assert [r["path"] for r in rows] == ["reference", "fast"]
    assert rows[0]["precision"] == "fp32" and rows[1]["precision"] == "bf16"
    assert rows[1]["speedup_vs_reference"] == pytest.approx(rows[1]["samples_per_s"] / rows[0]["samples_per_s"])
    for r in rows:
        assert r["samples"] == 16 and r["samples_per_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["sec_per_image"] == pytest.approx((100 + 100_000) / r["samples_per_s"])
    agreement = rows[1]["agreement_vs_fp32"]
    assert agreement["samples"] == 8 and agreement["agreement"] * 8 == round(agreement["agreement"] * 8)
    ft = data["configs"][0]["finetune"]
    assert [r["path"] for r in ft] == ["reference", "fast (all)", "fast (masked)"]
    assert all(r["sec_per_step"] > 0 and r["denoised_per_step"] == 4 for r in ft)
    assert result["configs"][0]["t_star"] == data["configs"][0]["t_star"] > 0
    table = capsys.readouterr().out
    assert "certification" in table and "fine-tuning step" in table and "digits" in table


@pytest.mark.parametrize("argv, match", [
    (["--batch_size", "many"], "--batch_size"),
    (["--batch_size", "0"], "--batch_size"),
    (["--iters", "0"], "--iters"),
    (["--sigma", "-1"], "--sigma"),
])
def test_bench_cli_rejects_bad_flags(argv, match):
    with pytest.raises(UserError, match=match):
        bench.main(["--configs", "digits", "--device", "cpu", *argv])


@pytest.mark.parametrize("argv, match", [
    (["--json", "{file}/r.json"], r"^error: --json .*file\.txt/r\.json: .*file\.txt is a file, not a folder"),
    (["--json", "{dir}"], r"^error: --json .*: is a folder; name a file"),
    (["--sigma", "nan"], r"^error: --sigma nan"),
    (["--device", "meta"], r"^error: --device meta: not a device this program runs on"),
])
def test_bench_bad_outputs_and_values_fail_before_work(tmp_path, cli_error, files_of, argv, match):
    (tmp_path / "file.txt").write_text("x")
    before = files_of(tmp_path)
    argv = ["--configs", "digits", "--device", "cpu"] + [a.format(file=tmp_path / "file.txt", dir=tmp_path)
                                                         for a in argv]
    line = cli_error(bench.main, argv)  # (a repeated --device: the last one counts)
    assert re.search(match, line), line
    assert files_of(tmp_path) == before



@pytest.mark.slow
def test_bench_with_checkpoints(tmp_path):
    """--denoiser_ckpt / --classifier_ckpt: the given (here: the shipped, trained) weights are timed and checked,
    the record says so; a missing file or several configurations are refused."""
    models = Path(__file__).resolve().parents[1] / "models"
    den, clf = models / "digits_denoiser.pt", models / "digits_vit_tiny.pt"
    with torch_threads(1):
        result = bench.main(["--configs", "digits", "--device", "cpu", "--weights", "random", "--no_finetune",
                             "--denoiser_ckpt", str(den), "--classifier_ckpt", str(clf), "--batch_size", "64",
                             "--iters", "1", "--rounds", "1", "--agreement_samples", "128"])
    record = result["configs"][0]
    assert record["weights"] == "checkpoint"  # not random, although --weights random
    assert record["certify"][1]["agreement_vs_fp32"]["agreement"] >= 0.99  # trained: bf16 keeps the classes
    with pytest.raises(UserError, match="no such file"):
        bench.main(["--configs", "digits", "--device", "cpu", "--denoiser_ckpt", str(tmp_path / "nope.pt")])
    with pytest.raises(UserError, match="one configuration"):
        bench.main(["--configs", "digits", "cifar10", "--device", "cpu", "--classifier_ckpt", str(clf)])


@pytest.mark.slow
def test_agreement_vit_b_script_on_a_saved_model(tmp_path):
    """scripts/agreement_vit_b.py with an existing checkpoint (no training): ViT-B/16 structure, every figure."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import agreement_vit_b as script
    assert bench.default_checkpoint_path("digits").is_file()  # ships with the repository
    clf = script.vit_b(32)
    assert clf.model.embed_dim == 768 and len(clf.model.blocks) == 12 and clf.model.norm.eps == 1e-12
    ckpt = tmp_path / "vit.pt"
    torch.save(clf.model.state_dict(), ckpt)
    with torch_threads(1):
        result = script.main(["--img_size", "32", "--checkpoint", str(ckpt), "--per_image", "2",
                              "--test_images", "20", "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["agreement"]["bf16"]["samples"] == 40
    assert result["clean_accuracy"] * 20 == pytest.approx(round(result["clean_accuracy"] * 20))  # of 20 images
    assert result["margin_median"] > 0
    assert result["agreement"]["bf16"]["agreement"] * 40 == pytest.approx(round(result["agreement"]["bf16"]["agreement"] * 40))
    assert result["agreement"]["bf16"]["agreement"] > 0.5
    with pytest.raises(UserError, match="multiple of the patch size"):
        script.vit_b(30)
    with pytest.raises(UserError, match="no such file"):
        script.main(["--init", str(tmp_path / "missing.pt"), "--checkpoint", str(tmp_path / "new.pt")])
    # --init at another size: every weight carried over, the position embedding resampled to the new grid
    big = script.vit_b(48)
    script.load_resampled(big, ckpt)
    assert big.model.pos_embed.shape == (1, 1 + 3 * 3, 768)
    assert torch.equal(big.model.pos_embed[:, :1], clf.model.pos_embed[:, :1])  # the class token's is kept
    assert torch.equal(big.model.blocks[5].mlp.fc1.weight, clf.model.blocks[5].mlp.fc1.weight)
    same = script.vit_b(32)
    script.load_resampled(same, ckpt)  # same grid: identical
    assert torch.equal(same.model.pos_embed, clf.model.pos_embed)


@pytest.mark.slow
def test_modes_and_several_classifiers_on_the_digits_models():
    """bench.py --modes / --heads: the four certify.py modes (skip_wrong changes no certified accuracy, sequential
    uses fewer samples) and K classifiers after one denoiser."""
    device = torch.device("cpu")
    models = bench.build_models("digits", device, "auto")
    with torch_threads(1):
        modes = bench.bench_modes("digits", models, 0.5, device, N=200, images=3, batch_size=128, seed=1)
        heads = bench.bench_heads("digits", models, 0.5, device, K=2, batch_size=16, iters=1)
    assert modes["fixed"]["samples_per_image"] == 200
    assert modes["sequential"]["samples_per_image"] < 200
    assert modes["skip_wrong"]["certified_accuracy"] == modes["fixed"]["certified_accuracy"]
    assert modes["both"]["certified_accuracy"] == modes["sequential"]["certified_accuracy"]
    assert modes["both"]["samples_per_image"] <= modes["sequential"]["samples_per_image"]
    for mode in ("sequential", "both"):  # the pool: the same results, fuller forward passes
        pooled, alone = modes[mode + "_pool"], modes[mode]
        assert pooled["same_results_as_one_by_one"] is True and pooled["pool"] and not alone["pool"]
        assert pooled["samples_per_image"] == alone["samples_per_image"]
        assert pooled["certified_accuracy"] == alone["certified_accuracy"]
        assert alone["mean_forward_batch"] <= pooled["mean_forward_batch"] <= 128
    assert modes["sequential"]["mean_forward_batch"] < modes["sequential_pool"]["mean_forward_batch"]
    assert heads["K"] == 2 and heads["sec_per_sample_K"] > 0 and heads["sec_per_sample_single"] > 0
    lines = bench.format_modes_and_heads("digits", {"modes": modes, "heads": heads})
    assert any(line.startswith("sequential") for line in lines) and "2 classifiers" in lines[-1]
