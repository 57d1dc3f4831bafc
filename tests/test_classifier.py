"""classifier.py: HF->timm ViT conversion against tests/fixtures/hf_vit, the [0,1] wrapper, LoRA, layer decay,
checkpoint loading and its errors. ViT-B is only ever built on the meta device."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import classifier as C
from runkit.errors import UserError
from runkit.files import atomic_torch_save

# ---------------------------------------------------------------------------------------------------------------
# HF -> timm conversion (fixtures/hf_vit)
# ---------------------------------------------------------------------------------------------------------------

WEIGHT_FILES = ["tiny_hf_vit/model.safetensors", "tiny_hf_vit_state_dict.bin"]  # legacy 4.x keys, 5.x keys


@pytest.fixture(scope="module")
def hf_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "hf_vit"


@pytest.fixture(scope="module")
def ref(hf_dir: Path) -> dict:
    return dict(np.load(hf_dir / "tiny_hf_vit_reference.npz"))


@pytest.fixture(scope="module")
def hf_config(hf_dir: Path) -> dict:
    config, _ = C.read_hf_config(hf_dir / "tiny_hf_vit")
    return config


def _tiny_timm(hf_dir: Path, hf_config: dict, weights: str, eps: float | None = None) -> nn.Module:
    raw, _ = C.read_checkpoint(hf_dir / weights)
    config = dict(hf_config, **({"layer_norm_eps": eps} if eps else {}))
    model = C.build_vit_from_hf_config(config).eval()
    C.load_timm_state_dict(model, C.to_timm_state_dict(raw))
    return model


@pytest.mark.parametrize("weights", WEIGHT_FILES)
def test_hf_conversion_reproduces_logits(hf_dir, hf_config, ref, weights):
    model = _tiny_timm(hf_dir, hf_config, weights)
    x = torch.from_numpy(ref["input"])
    with torch.no_grad():
        logits32 = model(x).numpy()
        logits64 = model.double()(x.double()).numpy()
    assert np.abs(logits64 - ref["logits_float64"]).max() < 1e-10
    assert np.abs(logits32 - ref["logits"]).max() < 1e-6
    assert np.abs(logits32 - ref["logits_float32_eager"]).max() < 1e-6


def test_hf_conversion_is_sensitive_to_eps(hf_dir, hf_config, ref):
    """The float64 check does see the 6.8e-5 effect of timm's default eps (README §3.2)."""
    model = _tiny_timm(hf_dir, hf_config, WEIGHT_FILES[0], eps=1e-6).double()
    with torch.no_grad():
        logits = model(torch.from_numpy(ref["input"]).double()).numpy()
    assert np.abs(logits - ref["logits_float64"]).max() > 1e-5


def test_hf_conversion_key_by_key(hf_dir, hf_config):
    """Every timm tensor is the right HF tensor; in particular the k bias sits in rows D..2D of qkv.bias (logits
    cannot tell, README §3.2), and attention.output.dense / output.dense are not confused."""
    legacy, _ = C.read_checkpoint(hf_dir / WEIGHT_FILES[0])
    v5, _ = C.read_checkpoint(hf_dir / WEIGHT_FILES[1])
    conv_legacy, conv_v5 = C.convert_hf_vit_to_timm(legacy), C.convert_hf_vit_to_timm(v5)
    model = C.build_vit_from_hf_config(hf_config)
    assert set(conv_legacy) == set(conv_v5) == set(model.state_dict())
    for key in conv_legacy:
        assert torch.equal(conv_legacy[key], conv_v5[key]), key
    d = hf_config["hidden_size"]
    for n in range(hf_config["num_hidden_layers"]):
        hf = f"vit.encoder.layer.{n}."
        qkv_w, qkv_b = conv_legacy[f"blocks.{n}.attn.qkv.weight"], conv_legacy[f"blocks.{n}.attn.qkv.bias"]
        for i, part in enumerate(("query", "key", "value")):
            assert torch.equal(qkv_w[i * d:(i + 1) * d], legacy[hf + f"attention.attention.{part}.weight"])
            assert torch.equal(qkv_b[i * d:(i + 1) * d], legacy[hf + f"attention.attention.{part}.bias"])
        pairs = {"attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
                 "norm1": "layernorm_before", "norm2": "layernorm_after"}
        for timm_name, hf_name in pairs.items():
            for kind in ("weight", "bias"):
                assert torch.equal(conv_legacy[f"blocks.{n}.{timm_name}.{kind}"], legacy[hf + f"{hf_name}.{kind}"])
    globals_ = {"cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
                "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
                "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
                "norm.weight": "vit.layernorm.weight", "norm.bias": "vit.layernorm.bias",
                "head.weight": "classifier.weight", "head.bias": "classifier.bias"}
    for timm_name, hf_name in globals_.items():
        assert torch.equal(conv_legacy[timm_name], legacy[hf_name])


def test_hf_model_structure(hf_config):
    model = C.build_vit_from_hf_config(hf_config)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * hf_config["num_hidden_layers"] + 1 and all(m.eps == 1e-12 for m in norms)
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert gelus and all(m.approximate == "none" for m in gelus)
    assert model.global_pool == "token"


def test_hf_folder_through_wrapper(hf_dir, ref):
    """--arch hf_vit with the HF folder: [0,1] images normalized with mean = std = 0.5 give the reference logits."""
    clf = C.get_architecture("hf_vit", checkpoint=hf_dir / "tiny_hf_vit").eval()
    assert clf.input_size == (32, 32)
    x01 = torch.from_numpy(ref["input"]) * 0.5 + 0.5
    with torch.no_grad():
        logits = clf(x01).numpy()
    assert np.abs(logits - ref["logits"]).max() < 1e-5


def _hf_vit_b_state_dict(num_labels: int = 10) -> dict:
    """A ViT-B/16 ViTForImageClassification state dict with legacy names, on the meta device (no memory)."""
    D, M, meta = 768, 3072, torch.device("meta")
    sd = {"vit.embeddings.cls_token": (1, 1, D), "vit.embeddings.position_embeddings": (1, 197, D),
          "vit.embeddings.patch_embeddings.projection.weight": (D, 3, 16, 16),
          "vit.embeddings.patch_embeddings.projection.bias": (D,)}
    for n in range(12):
        p = f"vit.encoder.layer.{n}."
        for name in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense"):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = (D, D), (D,)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = (M, D), (M,)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = (D, M), (D,)
        for name in ("layernorm_before", "layernorm_after"):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = (D,), (D,)
    sd.update({"vit.layernorm.weight": (D,), "vit.layernorm.bias": (D,),
               "classifier.weight": (num_labels, D), "classifier.bias": (num_labels,)})
    return {k: torch.zeros(shape, device=meta) for k, shape in sd.items()}


def test_vit_b_hf_state_dict_loads_into_cifar10_vit_base():
    hf = _hf_vit_b_state_dict()
    assert len(hf) == 200 and sum(t.numel() for t in hf.values()) == 85_806_346
    converted = C.convert_hf_vit_to_timm(hf)
    clf = C.get_architecture("cifar10_vit_base", device="meta")
    assert C.count_parameters(clf) == 85_806_346
    assert clf.input_size == (224, 224) and clf.mean.flatten().tolist() == [0.5] * 3
    C.load_timm_state_dict(clf, converted)  # strict
    bad = dict(converted, **{"head.weight": torch.zeros(1000, 768, device="meta")})
    with pytest.raises(UserError, match=r"head\.weight \[1000, 768\] vs \[10, 768\]"):
        C.load_timm_state_dict(clf, bad)


# ---------------------------------------------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------------------------------------------


class _Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.seen: torch.Tensor | None = None

    def forward(self, x):
        self.seen = x
        return x.flatten(1)[:, :3] * self.w


def test_wrapper_resizes_and_normalizes():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    clf = C.ImageClassifier(_Probe(), 24, mean, std)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = torch.rand(2, 3, 24, 24)
    clf(x)
    assert torch.equal(clf.model.seen, (x - m) / s)  # already the input size: no resampling
    x = torch.rand(2, 3, 32, 40)
    clf(x)
    expected = (F.interpolate(x, size=(24, 24), mode="bicubic", antialias=True, align_corners=False) - m) / s
    assert clf.model.seen.shape == (2, 3, 24, 24)
    assert torch.allclose(clf.model.seen, expected, atol=1e-6)


def test_builtin_archs_meta():
    imnet = C.get_architecture("imagenet_vit_base", device="meta")
    assert imnet.input_size == (384, 384) and imnet.model.num_classes == 1000
    norms = [m.eps for m in imnet.model.modules() if isinstance(m, nn.LayerNorm)]
    assert set(norms) == {1e-5}  # the CLIP tower's eps
    digits = C.get_architecture("digits_vit_tiny")
    assert digits.input_size == (16, 16) and digits.mean.flatten().tolist() == [0.5] * 3
    assert digits(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    other = C.get_architecture("test_vit", num_classes=7)
    assert other(torch.rand(1, 3, 50, 50)).shape == (1, 7)


def test_imagenet_mean_std():
    """imagenet_vit_base normalizes with its own (CLIP) mean/std at 384 px."""
    from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    clf = C.get_architecture("imagenet_vit_base", device="meta")
    assert C._data_config(clf.model) == ((384, 384), tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD))
    assert clf.mean.shape == clf.std.shape == (1, 3, 1, 1)


def test_wrapper_autocast_and_channels_last():
    torch.manual_seed(0)
    clf = C.get_architecture("digits_vit_tiny").eval()
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        ref = clf(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = clf(x)
        clf = clf.to(memory_format=torch.channels_last)
        cl = clf(x.to(memory_format=torch.channels_last))
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), ref, atol=0.05)
    assert torch.allclose(cl, ref, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------


def test_lora_trainable_fraction_vit_b():
    clf = C.get_architecture("imagenet_vit_base", device="meta", ft_method="lora")
    total, trainable = C.count_parameters(clf), C.count_parameters(clf, trainable_only=True)
    assert trainable == 12 * 2 * (4 * 768 + 768 * 4) + 768 * 1000 + 1000  # 916,456
    assert 0.009 < trainable / total < 0.012
    names = [n for n, p in clf.model.named_parameters() if p.requires_grad]
    assert all(re.search(r"\.lora_[qv]_[AB]$", n) or n.startswith("head.") for n in names)
    assert not any("lora_k" in n for n in names)


def _randomize_lora(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, C.LoRAQKV):
            nn.init.normal_(mod.lora_q_B)
            nn.init.normal_(mod.lora_v_B)


def test_lora_only_lora_and_head_change():
    torch.manual_seed(0)
    clf = C.get_architecture("digits_vit_tiny", ft_method="lora")
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    loss = F.cross_entropy(clf(torch.rand(8, 3, 16, 16)), torch.arange(8))
    loss.backward()
    opt.step()
    after = clf.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k or k.startswith("head.") for k in changed)
    assert {"head.weight", "blocks.0.attn.qkv.lora_q_B", "blocks.3.attn.qkv.lora_v_B"} <= changed
    assert "blocks.0.attn.qkv.weight" not in changed and "blocks.0.attn.qkv.bias" not in changed


def test_lora_leaves_k_alone():
    torch.manual_seed(0)
    base = C.get_architecture("digits_vit_tiny").model
    qkv = base.blocks[0].attn.qkv
    lora = C.LoRAQKV(qkv, rank=2, alpha=3.0)
    nn.init.normal_(lora.lora_q_B)
    nn.init.normal_(lora.lora_v_B)
    x = torch.randn(5, 64)
    with torch.no_grad():
        out, plain = lora(x), qkv(x)
        merged = lora.merged_weight()
    assert torch.equal(out[:, 64:128], plain[:, 64:128])
    assert not torch.allclose(out[:, :64], plain[:, :64]) and not torch.allclose(out[:, 128:], plain[:, 128:])
    assert torch.equal(merged[64:128], qkv.weight[64:128])
    assert torch.allclose(F.linear(x, merged, qkv.bias), out, atol=1e-5)


def test_merge_lora_same_outputs_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    clf = C.get_architecture("digits_vit_tiny", ft_method="lora", lora_alpha=8.0).eval()
    _randomize_lora(clf)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        unmerged = clf(x)
    ckpt = tmp_path / "checkpoint-last.pth"
    sd = {"module." + k: v for k, v in clf.model.state_dict().items()}  # as saved from a DDP model
    atomic_torch_save({"epoch": 1, "arch": "digits_vit_tiny", "state_dict": sd, "args": {}}, ckpt)
    for ft_method in ("full", "lora"):  # merged while loading / loaded into LoRA modules
        loaded = C.get_architecture("digits_vit_tiny", checkpoint=ckpt, ft_method=ft_method).eval()
        has_lora = any(isinstance(m, C.LoRAQKV) for m in loaded.modules())
        assert has_lora == (ft_method == "lora")
        with torch.no_grad():
            assert torch.allclose(loaded(x), unmerged, atol=1e-5)
    C.merge_lora(clf)
    assert not any(isinstance(m, C.LoRAQKV) for m in clf.modules())
    assert set(clf.model.state_dict()) == set(C.get_architecture("digits_vit_tiny").model.state_dict())
    with torch.no_grad():
        assert torch.allclose(clf(x), unmerged, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Layer-wise lr decay
# ---------------------------------------------------------------------------------------------------------------


def test_param_groups_lrd_follow_the_rule():
    clf = C.get_architecture("digits_vit_tiny")
    decay, wd = 0.65, 0.04
    groups = C.param_groups_lrd(clf, weight_decay=wd, layer_decay=decay)
    L = len(clf.model.blocks)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(clf.model.named_parameters())
    assert len(by_param) == len(named)
    for name, p in named.items():
        g = by_param[id(p)]
        layer = 0 if name.split(".")[0] in ("cls_token", "pos_embed", "patch_embed") else (
            int(name.split(".")[1]) + 1 if name.startswith("blocks.") else L + 1)
        assert g["lr_scale"] == pytest.approx(decay ** (L + 1 - layer)), name
        no_wd = p.ndim == 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed")
        assert g["weight_decay"] == (0.0 if no_wd else wd), name
    assert by_param[id(named["head.weight"])]["lr_scale"] == 1.0
    assert by_param[id(named["patch_embed.proj.weight"])]["lr_scale"] == pytest.approx(decay ** (L + 1))
    assert by_param[id(named["pos_embed"])]["weight_decay"] == 0.0
    extra = C.param_groups_lrd(clf, wd, decay, no_weight_decay_list=("head.weight",))
    assert any(id(named["head.weight"]) in map(id, g["params"]) and g["weight_decay"] == 0.0 for g in extra)


def test_param_groups_lrd_only_trainable():
    clf = C.get_architecture("digits_vit_tiny", ft_method="lora")
    groups = C.param_groups_lrd(clf, weight_decay=0.01, layer_decay=0.9)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == sum(1 for p in clf.parameters() if p.requires_grad) == 4 * 4 + 2
    torch.optim.AdamW(groups, lr=1e-3)  # the groups are valid optimizer groups


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and errors
# ---------------------------------------------------------------------------------------------------------------


def test_bare_timm_state_dict_and_wrapper_state_dict(tmp_path):
    torch.manual_seed(0)
    clf = C.get_architecture("digits_vit_tiny").eval()
    x = torch.rand(2, 3, 16, 16)
    for i, sd in enumerate([clf.model.state_dict(), clf.state_dict()]):  # timm keys / "model."-prefixed keys
        torch.save(sd, tmp_path / f"w{i}.pt")
        loaded = C.get_architecture("digits_vit_tiny", checkpoint=tmp_path / f"w{i}.pt").eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), clf(x))
    from safetensors.torch import save_file
    save_file(clf.model.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = C.get_architecture("digits_vit_tiny", checkpoint=tmp_path / "w.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), clf(x))


def test_any_timm_model_takes_head_size_from_checkpoint(tmp_path):
    model = C.get_architecture("test_vit", num_classes=3)
    torch.save(model.model.state_dict(), tmp_path / "w.pt")
    loaded = C.get_architecture("test_vit", checkpoint=tmp_path / "w.pt")
    assert loaded.model.num_classes == 3


def test_errors(tmp_path):
    with pytest.raises(UserError, match="unknown architecture"):
        C.get_architecture("no_such_net")
    with pytest.raises(UserError, match="file not found"):
        C.get_architecture("digits_vit_tiny", checkpoint=tmp_path / "missing.pt")
    with pytest.raises(UserError, match="no model.safetensors or pytorch_model.bin"):
        C.get_architecture("digits_vit_tiny", checkpoint=tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="unreadable"):
        C.get_architecture("digits_vit_tiny", checkpoint=tmp_path / "garbage.pt")
    torch.save({"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(2)}, tmp_path / "wrong_keys.pt")
    with pytest.raises(UserError, match=r"does not fit this architecture: \d+ missing keys \(e\.g\. cls_token.*; "
                                        r"2 unexpected keys \(e\.g\. foo\.weight"):
        C.get_architecture("digits_vit_tiny", checkpoint=tmp_path / "wrong_keys.pt")
    torch.save(C.get_architecture("digits_vit_tiny", num_classes=5).model.state_dict(), tmp_path / "five.pt")
    with pytest.raises(UserError, match=r"2 tensors have the wrong shape \(file vs model: "
                                        r"head\.weight \[5, 64\] vs \[10, 64\]"):
        C.get_architecture("digits_vit_tiny", checkpoint=tmp_path / "five.pt")
    torch.save({"arch": "cifar10_vit_base", "state_dict": {"x": torch.zeros(1)}}, tmp_path / "other_arch.pt")
    with pytest.raises(UserError, match="written for --arch cifar10_vit_base"):
        C.get_architecture("digits_vit_tiny", checkpoint=tmp_path / "other_arch.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not a state dict"):
        C.get_architecture("digits_vit_tiny", checkpoint=tmp_path / "list.pt")
    with pytest.raises(UserError, match="ft_method"):
        C.get_architecture("digits_vit_tiny", ft_method="adapter")
    with pytest.raises(UserError, match="hf_vit needs"):
        C.get_architecture("hf_vit")
    with pytest.raises(UserError, match="fused attn.qkv"):
        C.apply_lora(nn.Sequential(nn.Linear(2, 2)))


def test_hf_checkpoint_for_the_wrong_arch(hf_dir, tmp_path):
    """The tiny HF folder is not the paper's ViT-B/16: its config.json says so; without it, the shapes do."""
    import shutil
    shutil.copytree(hf_dir / "tiny_hf_vit", tmp_path / "tiny")
    with pytest.raises(UserError, match="not the paper's ViT-B/16.*hidden_size=48"):
        C.get_architecture("cifar10_vit_base", checkpoint=tmp_path / "tiny", device="meta")
    (tmp_path / "tiny" / "config.json").unlink()
    with pytest.raises(UserError, match=r"does not fit this architecture: \d+ missing keys \(e\.g\. blocks\.2\."):
        C.get_architecture("cifar10_vit_base", checkpoint=tmp_path / "tiny", device="meta")


def test_hf_conversion_errors(hf_dir):
    legacy, _ = C.read_checkpoint(hf_dir / WEIGHT_FILES[0])
    broken = {k: v for k, v in legacy.items() if "attention.attention.key" not in k}
    with pytest.raises(UserError, match="lacks the k"):
        C.convert_hf_vit_to_timm(broken)
    with pytest.raises(UserError, match="unexpected keys vit.encoder.layer.0.extra.weight"):
        C.convert_hf_vit_to_timm(dict(legacy, **{"vit.encoder.layer.0.extra.weight": torch.zeros(1)}))


def test_pretrained_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for arch in ("cifar10_vit_base", "test_vit.r160_in1k"):
        with pytest.raises(UserError, match="--classifier_ckpt"):
            C.get_architecture(arch, pretrained=True)


# ---------------------------------------------------------------------------------------------------------------
# The paper's input convention, attention dropout and checkpoints
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_imagenet_vit_base_input_paper_and_model():
    """imagenet_vit_base (random weights) computes, in eval mode, the timm model on resize_384(2x - 1) by default and
    on the CLIP-normalized 384-px input with input_norm="model"."""
    from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    torch.manual_seed(0)
    paper = C.get_architecture("imagenet_vit_base").eval()
    torch.manual_seed(0)
    model = C.get_architecture("imagenet_vit_base", input_norm="model").eval()
    assert (paper.input_norm, model.input_norm) == ("paper", "model")
    assert torch.equal(paper.model.pos_embed, model.model.pos_embed)  # the same random weights
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    resize = dict(size=(384, 384), mode="bicubic", antialias=True)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected_paper = paper.model(F.interpolate(2 * x - 1, **resize))  # the paper's code: 2x - 1, then resize
        expected_model = paper.model((F.interpolate(x, **resize) - mean) / std)
        got_paper, got_model = paper(x), model(x)
    assert (got_paper - expected_paper).abs().max() < 1e-4
    assert (got_model - expected_model).abs().max() < 1e-4
    assert (expected_paper - expected_model).abs().max() > 1e-2  # the two conventions give other logits


def test_input_norm_defaults_record_and_contradiction(tmp_path):
    """Defaults per arch; a checkpoint's recorded convention wins; a contradicting flag is an error."""
    half = [0.5] * 3
    assert C.get_architecture("imagenet_vit_base", device="meta").mean.flatten().tolist() == half
    assert C.get_architecture("cifar10_vit_base", device="meta").input_norm == "model"
    net = C.get_architecture("test_byobnet")
    imagenet_mean = [pytest.approx(m) for m in (0.485, 0.456, 0.406)]
    assert net.input_norm == "model" and net.mean.flatten().tolist() == imagenet_mean
    assert C.get_architecture("test_byobnet", input_norm="paper").std.flatten().tolist() == half
    sd = net.model.state_dict()
    cases = {"recorded_paper": ({"state_dict": sd, "input_norm": "paper", "args": {}}, "paper"),
             "old_train_py": ({"state_dict": sd, "args": {}}, "model"),  # before the option: the model's statistics
             "paper_code": ({"state_dict": {"classifier." + k: v for k, v in sd.items()}}, "paper"),
             "bare": (sd, "model")}
    for name, (obj, recorded) in cases.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        if name == "paper_code":  # (its loading is test_paper_checkpoint_*: the paper's code only had ViTs)
            assert C.checkpoint_input_norm(tmp_path / f"{name}.pt") == "paper"
            continue
        loaded = C.get_architecture("test_byobnet", checkpoint=tmp_path / f"{name}.pt")
        assert loaded.input_norm == recorded, name
        assert C.checkpoint_input_norm(tmp_path / f"{name}.pt") == (None if name == "bare" else recorded), name
        assert loaded.mean.flatten().tolist() == (half if recorded == "paper" else imagenet_mean), name
    with pytest.raises(UserError, match="--input_norm model contradicts .*recorded_paper.pt.*--input_norm paper"):
        C.get_architecture("test_byobnet", checkpoint=tmp_path / "recorded_paper.pt", input_norm="model")
    with pytest.raises(UserError, match="--input_norm 'clip'"):
        C.get_architecture("test_byobnet", input_norm="clip")


def test_attn_drop_rate_is_the_papers_per_block_dropout():
    """Block i's attention dropout is linspace(0, R, depth)[i], drop path 0; eval logits unchanged; the fused
    attention applies it in train mode."""
    vit_b = C.get_architecture("cifar10_vit_base", attn_drop_rate=0.2, device="meta")
    expected = torch.linspace(0, 0.2, 12)
    for i, block in enumerate(vit_b.model.blocks):
        assert block.attn.attn_drop.p == pytest.approx(float(expected[i]), abs=0)
        assert isinstance(block.drop_path1, nn.Identity) and isinstance(block.drop_path2, nn.Identity)
    assert vit_b.model.blocks[0].attn.attn_drop.p == 0.0
    assert vit_b.model.blocks[-1].attn.attn_drop.p == pytest.approx(0.2, abs=1e-7)  # float32 linspace, as the paper's
    torch.manual_seed(0)
    plain = C.get_architecture("digits_vit_tiny")
    torch.manual_seed(0)
    dropped = C.get_architecture("digits_vit_tiny", attn_drop_rate=0.5)
    assert [b.attn.attn_drop.p for b in dropped.model.blocks] == [0.0, pytest.approx(1 / 6), pytest.approx(1 / 3),
                                                                  0.5]
    assert all(b.attn.fused_attn for b in dropped.model.blocks)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), dropped.eval()(x))
        plain.train(), dropped.train()
        assert torch.equal(plain(x), plain(x))  # no dropout anywhere in the plain model
        assert not torch.allclose(dropped(x), dropped(x))  # the fused path drops attention probabilities
    with pytest.raises(UserError, match="--attn_drop_rate 1.0: must be in"):
        C.get_architecture("digits_vit_tiny", attn_drop_rate=1.0)
    with pytest.raises(UserError, match="needs a ViT"):
        C.get_architecture("test_byobnet", attn_drop_rate=0.1)


def _paper_checkpoint(path: Path, state_dict: dict, prefix: str = "classifier.", arch: str | None = None) -> Path:
    """A checkpoint as the paper's train.py writes it: epoch, arch, state_dict (of its wrapper), optimizer."""
    obj = {"epoch": 1, "state_dict": {prefix + k: v for k, v in state_dict.items()},
           "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}}
    if arch is not None:
        obj["arch"] = arch
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("prefix", ["classifier.", "module.classifier."])
def test_paper_checkpoint_hf_layout(hf_dir, ref, tmp_path, prefix):
    """CIFAR-10 full fine-tuning: Hugging Face ViT keys under classifier. (tiny HF ViT fixture)."""
    import shutil
    raw, _ = C.read_checkpoint(hf_dir / WEIGHT_FILES[0])
    (tmp_path / "run").mkdir()
    shutil.copy(hf_dir / "tiny_hf_vit" / "config.json", tmp_path / "run" / "config.json")
    path = _paper_checkpoint(tmp_path / "run" / "checkpoint-1.pth.tar", raw, prefix, arch="hf_vit")
    assert C.upstream_layout({k[len("classifier."):]: v for k, v in {"classifier." + k: v
                                                                      for k, v in raw.items()}.items()}) == "hf_vit"
    loaded = C.get_architecture("hf_vit", checkpoint=path).eval()
    with torch.no_grad():
        logits = loaded.model(torch.from_numpy(ref["input"])).numpy()
    assert np.abs(logits - ref["logits"]).max() < 1e-5


def test_paper_checkpoint_timm_layout(tmp_path):
    """ImageNet full fine-tuning: timm keys under classifier."""
    torch.manual_seed(0)
    net = C.get_architecture("test_vit", num_classes=7).model.eval()
    path = _paper_checkpoint(tmp_path / "full.pth.tar", net.state_dict())
    loaded = C.get_architecture("test_vit", checkpoint=path).eval()
    assert loaded.input_norm == "paper"  # what the paper's code fed its classifiers
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert (loaded.model(x) - net(x)).abs().max() < 1e-5


class _PaperLoRAQKV(nn.Module):
    """The forward of the paper's LoRA qkv module, written from its formula: qkv[..., :D] += (alpha // r) B_q A_q x,
    qkv[..., -D:] += (alpha // r) B_v A_v x."""

    def __init__(self, qkv: nn.Linear, rank: int, alpha: int) -> None:
        super().__init__()
        dim = qkv.in_features
        self.qkv, self.rank, self.alpha = qkv, rank, alpha
        self.scale = alpha // rank
        self.linear_a_q, self.linear_a_v = nn.Linear(dim, rank, bias=False), nn.Linear(dim, rank, bias=False)
        self.linear_b_q, self.linear_b_v = nn.Linear(rank, dim, bias=False), nn.Linear(rank, dim, bias=False)
        for lin in (self.linear_b_q, self.linear_b_v):  # nonzero B: the adapters change the logits
            nn.init.normal_(lin.weight, std=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv, dim = self.qkv(x), self.qkv.in_features
        qkv[:, :, :dim] += self.scale * self.linear_b_q(self.linear_a_q(x))
        qkv[:, :, -dim:] += self.scale * self.linear_b_v(self.linear_a_v(x))
        return qkv


@pytest.mark.parametrize("alpha", [4, 6])
@pytest.mark.parametrize("ft_method", ["full", "lora"])
def test_paper_checkpoint_lora_layout(tmp_path, alpha, ft_method):
    """ImageNet LoRA: timm keys under classifier.lora_vit., adapters applied with scale alpha // r (r = 4)."""
    torch.manual_seed(0)
    net = C.get_architecture("test_vit", num_classes=5).model.eval()
    for block in net.blocks:
        block.attn.qkv = _PaperLoRAQKV(block.attn.qkv, rank=4, alpha=alpha)
    sd = net.state_dict()
    assert "blocks.0.attn.qkv.qkv.weight" in sd and sd["blocks.0.attn.qkv.linear_a_q.weight"].shape == (4, 64)
    path = _paper_checkpoint(tmp_path / "lora.pth.tar", sd, prefix="classifier.lora_vit.")
    loaded = C.get_architecture("test_vit", checkpoint=path, ft_method=ft_method, lora_alpha=alpha).eval()
    assert any(isinstance(m, C.LoRAQKV) for m in loaded.modules()) == (ft_method == "lora")
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        expected = net(x)
        assert (loaded.model(x) - expected).abs().max() < 1e-5
        if alpha == 6:  # alpha / r = 1.5 would be another model: the integer division matters
            float_scale = C.get_architecture("test_vit", checkpoint=path, lora_alpha=6.4).eval()
            assert (float_scale.model(x) - expected).abs().max() < 1e-5  # 6.4 // 4 == 1 as well
            for m in net.modules():
                if isinstance(m, _PaperLoRAQKV):
                    m.scale = m.alpha / m.rank  # 1.5
            assert (net(x) - expected).abs().max() > 1e-3


def test_paper_checkpoint_unknown_layout_is_named(tmp_path):
    path = _paper_checkpoint(tmp_path / "odd.pth.tar", {"encoder.weight": torch.zeros(2), "fc.bias": torch.zeros(2)})
    with pytest.raises(UserError, match=r"paper's code .* not recognised: keys classifier\.encoder\.weight, "
                                        r"classifier\.fc\.bias; known: classifier\.vit\.\*"):
        C.get_architecture("test_vit", checkpoint=path)
