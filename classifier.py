"""Off-the-shelf classifiers f for denoised smoothing: timm models, Hugging Face ViT conversion, LoRA, layer decay.

Every classifier is an :class:`ImageClassifier`: it takes ``[0, 1]`` images of any size, resizes them to the model's
input size (bicubic, antialias) and maps them to the model's input scale (METHOD §3), so the denoiser's output goes
in as it is. The input convention (``input_norm``) is ``paper`` (x -> 2x - 1, i.e. mean = std = 0.5, what the paper's
code feeds every classifier) or ``model`` (the model's own mean/std); ``imagenet_vit_base`` defaults to ``paper``, every
other architecture to ``model`` (for the CIFAR-10 and digits ViTs the two are the same).

* ``cifar10_vit_base``: ViT-B/16 at 224 px, 10 classes, LayerNorm eps 1e-12, exact GELU, mean = std = 0.5: the
  structure of the paper's Hugging Face checkpoint ``aaraki/vit-base-patch16-224-in21k-finetuned-cifar10``, run as a
  timm ``VisionTransformer`` (:func:`convert_hf_vit_to_timm`).
* ``imagenet_vit_base``: timm ``vit_base_patch16_clip_384.laion2b_ft_in12k_in1k`` (384 px; fed 2x - 1 as in the paper,
  or its CLIP mean/std with ``input_norm="model"``).
* ``digits_vit_tiny``: a small ViT for the embedded 16x16 digits demo (weights shipped in ``models/``).
* ``hf_vit``: any Hugging Face ``ViTForImageClassification`` folder, the structure read from its ``config.json``.
* any other timm model name.

LoRA (Hu et al. 2022) on q and v of each block's fused qkv: W_q <- W_q + (alpha/r) B_q A_q, likewise W_v; k untouched.
Layer-wise lr decay (BEiT/MAE): lr scale = layer_decay^(L+1-layer) with layer 0 = embeddings, i+1 = block i,
L+1 = the rest.

Checkpoints written by the paper's code (``{"state_dict": ...}`` with every key under ``classifier.``) load in their
three layouts (:func:`convert_upstream_state_dict`): Hugging Face ViT keys (CIFAR-10 full fine-tuning), timm keys
(ImageNet full fine-tuning) and timm keys under ``lora_vit.`` with the paper's LoRA modules (ImageNet LoRA, scale
alpha // r).
"""
from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer

from runkit import checkpoints
from runkit.checkpoints import DDP_PREFIX, strip_prefix
from runkit.errors import UserError

REPO = Path(__file__).resolve().parent
ARCHS = ("cifar10_vit_base", "imagenet_vit_base", "digits_vit_tiny", "hf_vit")
FT_METHODS = ("full", "lora")
# The classifier's input convention: "paper" = 2x - 1 (mean = std = 0.5), "model" = the model's own mean/std.
INPUT_NORMS = ("paper", "model")
PAPER_MEAN_STD = (0.5, 0.5, 0.5)
# The paper's code feeds the ImageNet CLIP ViT 2x - 1, not its CLIP statistics (METHOD §3).
DEFAULT_INPUT_NORM = {"imagenet_vit_base": "paper"}
IMAGENET_TIMM_NAME = "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k"
CIFAR10_HF_REPO = "aaraki/vit-base-patch16-224-in21k-finetuned-cifar10"
DIGITS_CHECKPOINT = REPO / "models" / "digits_vit_tiny.pt"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# The fields of the paper's CIFAR-10 checkpoint config.json that fix the architecture (fixtures/hf_vit/README.md §5).
CIFAR10_HF_CONFIG: Dict[str, Any] = dict(
    model_type="vit", image_size=224, patch_size=16, num_channels=3, hidden_size=768, num_hidden_layers=12,
    num_attention_heads=12, intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True,
    num_labels=10,
)
# The embedded digits demo: 16x16 inputs, 4x4 patches (16 tokens + CLS), ~0.2 M parameters.
DIGITS_VIT_KWARGS: Dict[str, Any] = dict(
    img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0, num_classes=10,
)

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# The wrapper: [0, 1] images of any size -> logits
# ---------------------------------------------------------------------------------------------------------------


class ImageClassifier(nn.Module):
    """logits = model((resize(x) - mean) / std) for images x in [0, 1] of any size.

    The resize is bicubic with antialias (skipped when x already has ``input_size``); mean/std are the model's own.
    ``inference_forward`` (set by :mod:`fast` only) replaces ``model(x)`` in eval mode by an equal computation.
    """

    def __init__(
            self,
            model: nn.Module,
            input_size: Union[int, Sequence[int]],
            mean: Sequence[float],
            std: Sequence[float],
            input_norm: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.input_norm = input_norm  # the convention mean/std came from ("paper", "model"), recorded in checkpoints
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size[-2:])
        self.input_size: Tuple[int, int] = (int(size[0]), int(size[1]))
        device = next(iter(model.parameters()), torch.empty(0)).device
        device = torch.device("cpu") if device.type == "meta" else device  # keep mean/std readable on meta models
        as_buffer = partial(torch.tensor, dtype=torch.float32, device=device)
        self.register_buffer("mean", as_buffer(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", as_buffer(std).view(1, -1, 1, 1), persistent=False)
        # another computation of model(x) for eval mode, e.g. fast.vit_class_token_forward (None: the model's own)
        self.inference_forward: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Resize to ``input_size`` (bicubic, antialias, align_corners=False) and normalize with mean/std."""
        x = x.to(self.mean.dtype)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if self.inference_forward is not None and not self.training:  # opted in by fast.py
            return self.inference_forward(self.model, x)
        return self.model(x)

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, input_norm={self.input_norm}, mean={self.mean.flatten().tolist()}, "
                f"std={self.std.flatten().tolist()}")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face transformers ViT -> timm VisionTransformer
# ---------------------------------------------------------------------------------------------------------------

# Per-layer HF names (legacy 4.x) -> timm names; the fused qkv is built from query/key/value.
_HF_LAYER_KEYS = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
# transformers 5.x in-memory names -> legacy names (5.x `conversion_mapping.py`, "ViTModel").
_HF_V5_LAYER_KEYS = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
    "layernorm_before": "layernorm_before",
    "layernorm_after": "layernorm_after",
}
_HF_GLOBAL_KEYS = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "pos_embed",
    "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "vit.layernorm.weight": "norm.weight",
    "vit.layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
# Unused by ViTForImageClassification: the pooler of a bare ViTModel and the masked-image-modelling token.
_HF_IGNORED_PREFIXES = ("vit.pooler.", "vit.embeddings.mask_token")
_HF_LAYER_RE = re.compile(r"^vit\.(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def is_hf_vit_state_dict(state_dict: StateDict) -> bool:
    """True for a ``transformers`` ViT state dict (``vit.*`` or a bare ViTModel's ``embeddings.*`` keys)."""
    return any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in state_dict)


def convert_hf_vit_to_timm(state_dict: StateDict) -> StateDict:
    """Convert a ``transformers`` ViT(ForImageClassification) state dict to timm ``VisionTransformer`` keys.

    Accepts legacy (4.x: ``vit.encoder.layer.N.attention.attention.query``) and 5.x (``vit.layers.N.attention.q_proj``)
    names. qkv = cat[q; k; v] along the output dim (timm's ``reshape(B, N, 3, H, hd)`` layout); the classifier reads
    the CLS token after the final LayerNorm, as timm's ``global_pool='token'`` does. The model must use eps 1e-12
    (see :func:`vit_kwargs_from_hf_config`).
    """
    sd = strip_prefix(state_dict, DDP_PREFIX)
    if not any(k.startswith("vit.") for k in sd):  # a bare ViTModel: embeddings.*, encoder.layer.*, layernorm.*
        sd = {(k if k.startswith("classifier.") else "vit." + k): v for k, v in sd.items()}
    out: StateDict = {}
    qkv: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
    unknown: List[str] = []
    for key, tensor in sd.items():
        if key.startswith(_HF_IGNORED_PREFIXES):
            continue
        if key in _HF_GLOBAL_KEYS:
            out[_HF_GLOBAL_KEYS[key]] = tensor
            continue
        m = _HF_LAYER_RE.match(key)
        if m is None:
            unknown.append(key)
            continue
        layer, name, kind = int(m.group(1)), m.group(2), m.group(3)
        if key.startswith("vit.layers."):
            name = _HF_V5_LAYER_KEYS.get(name, "?")
        target = _HF_LAYER_KEYS.get(name)
        if target is None:
            unknown.append(key)
        elif target in ("q", "k", "v"):
            qkv.setdefault((layer, kind), {})[target] = tensor
        else:
            out[f"blocks.{layer}.{target}.{kind}"] = tensor
    if unknown:
        raise UserError(f"not a Hugging Face ViT state dict: unexpected keys {_few(unknown)}")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise UserError(f"Hugging Face ViT state dict: layer {layer} lacks the {'/'.join(missing)} {kind}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def vit_kwargs_from_hf_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """timm ``VisionTransformer`` keyword arguments reproducing a ``transformers`` ``ViTConfig`` (a config.json dict).

    Pre-norm blocks, CLS-token pooling after the final norm, LayerNorm eps = ``layer_norm_eps`` (1e-12, not timm's
    1e-6), exact-erf GELU for ``hidden_act="gelu"``.
    """
    if config.get("model_type", "vit") != "vit":
        raise UserError(f"config.json: model_type {config.get('model_type')!r} is not a ViT ('vit')")
    act = config.get("hidden_act", "gelu")
    act_layer = {"gelu": nn.GELU, "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
    if act_layer is None:
        raise UserError(f"config.json: hidden_act {act!r} is not supported (gelu, gelu_new, gelu_pytorch_tanh)")
    num_classes = config.get("num_labels") or len(config.get("id2label") or {})
    if not num_classes:
        raise UserError("config.json: no num_labels / id2label; cannot size the classifier head")
    hidden = int(config["hidden_size"])
    return dict(
        img_size=int(config.get("image_size", 224)),
        patch_size=int(config.get("patch_size", 16)),
        in_chans=int(config.get("num_channels", 3)),
        num_classes=int(num_classes),
        embed_dim=hidden,
        depth=int(config["num_hidden_layers"]),
        num_heads=int(config["num_attention_heads"]),
        mlp_ratio=int(config.get("intermediate_size", 4 * hidden)) / hidden,
        qkv_bias=bool(config.get("qkv_bias", True)),
        global_pool="token",
        class_token=True,
        norm_layer=partial(LayerNorm, eps=float(config.get("layer_norm_eps", 1e-12))),
        act_layer=act_layer,
    )


def build_vit_from_hf_config(
        config: Dict[str, Any], drop_path: float = 0.0, num_classes: Optional[int] = None,
) -> VisionTransformer:
    """A timm ``VisionTransformer`` with the structure of a ``transformers`` ViT config (randomly initialised)."""
    kwargs = vit_kwargs_from_hf_config(config)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return VisionTransformer(**kwargs, drop_path_rate=drop_path)


def read_hf_config(folder: PathLike) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """(config.json, preprocessor_config.json) of a Hugging Face model folder, each ``None`` when absent."""
    out = []
    for name in ("config.json", "preprocessor_config.json"):
        path = Path(folder) / name
        if not path.is_file():
            out.append(None)
            continue
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: unreadable JSON ({err})") from None
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints written by the paper's code (suhyeok-jang/FT-CADIS)
# ---------------------------------------------------------------------------------------------------------------

# The paper's code wraps each classifier in a module whose attribute ``classifier`` holds the network, so every key
# of its checkpoints starts with this (after ``module.`` when a DDP-wrapped model was saved).
UPSTREAM_PREFIX = "classifier."
# Its ImageNet LoRA wrapper (LoRA_ViT_timm) holds the timm model as ``lora_vit`` and replaces each block's
# ``attn.qkv`` by a module with the original Linear as ``qkv`` and four bias-free adapters.
_UPSTREAM_LORA_PREFIX = "lora_vit."
_UPSTREAM_LORA_KEYS = {
    "attn.qkv.qkv.weight": "attn.qkv.weight",
    "attn.qkv.qkv.bias": "attn.qkv.bias",
    "attn.qkv.linear_a_q.weight": "attn.qkv.lora_q_A",
    "attn.qkv.linear_b_q.weight": "attn.qkv.lora_q_B",
    "attn.qkv.linear_a_v.weight": "attn.qkv.lora_v_A",
    "attn.qkv.linear_b_v.weight": "attn.qkv.lora_v_B",
}
_TIMM_VIT_KEYS = ("cls_token", "pos_embed", "patch_embed.", "blocks.")


def is_upstream_state_dict(state_dict: StateDict) -> bool:
    """True for a state dict saved by the paper's code: every key under ``classifier.`` (after ``module.``)."""
    sd = strip_prefix(state_dict, DDP_PREFIX)
    return bool(sd) and all(k.startswith(UPSTREAM_PREFIX) for k in sd)


def upstream_layout(state_dict: StateDict) -> str:
    """Which of the paper's three layouts a state dict (``classifier.`` already stripped) is in.

    ``hf_vit``: Hugging Face ``ViTForImageClassification`` keys (CIFAR-10 full fine-tuning); ``timm_lora``: timm keys
    under ``lora_vit.`` with the LoRA adapters (ImageNet LoRA); ``timm``: plain timm ViT keys (ImageNet full
    fine-tuning). Anything else is a one-line error naming the keys it saw.
    """
    if any(k.startswith(_UPSTREAM_LORA_PREFIX) for k in state_dict):
        return "timm_lora"
    if is_hf_vit_state_dict(state_dict):
        return "hf_vit"
    if any(k.startswith(_TIMM_VIT_KEYS) for k in state_dict):
        return "timm"
    raise UserError(f"a checkpoint of the paper's code (keys under {UPSTREAM_PREFIX!r}) in a layout not recognised: "
                    f"keys {_few([UPSTREAM_PREFIX + k for k in state_dict])}; known: classifier.vit.* (Hugging Face "
                    "ViT), classifier.blocks.* (timm), classifier.lora_vit.* (timm with LoRA)")


def convert_upstream_lora(state_dict: StateDict, lora_alpha: float = 4.0) -> StateDict:
    """The paper's LoRA layout (keys under ``lora_vit.``) -> our :class:`LoRAQKV` keys.

    The paper's module computes qkv = W x + b, then qkv[..., :D] += (alpha // r) B_q A_q x and
    qkv[..., -D:] += (alpha // r) B_v A_v x, with A = ``linear_a_*.weight`` [r, D], B = ``linear_b_*.weight`` [D, r].
    That is :class:`LoRAQKV` with ``lora_scaling`` = alpha // r: an *integer* division (r = alpha = 4: 1), kept so
    that the logits are those of the paper's model (alpha = 6, r = 4 gives 1, not 1.5).
    """
    out: StateDict = {}
    for key, tensor in strip_prefix(state_dict, _UPSTREAM_LORA_PREFIX).items():
        head, sep, tail = key.partition(".attn.qkv.")
        name = _UPSTREAM_LORA_KEYS.get("attn.qkv." + tail) if sep else None
        if sep and name is None:
            raise UserError(f"the paper's LoRA checkpoint: unexpected key {_UPSTREAM_LORA_PREFIX + key}")
        out[f"{head}.{name}" if name else key] = tensor
        if name == "attn.qkv.lora_q_A":
            rank = tensor.shape[0]
            out[f"{head}.attn.qkv.lora_scaling"] = torch.tensor(float(lora_alpha // rank), dtype=torch.float32)
    return out


def convert_upstream_state_dict(state_dict: StateDict, lora_alpha: float = 4.0) -> StateDict:
    """A state dict saved by the paper's code (:func:`is_upstream_state_dict`) -> timm keys (LoRA kept unmerged).

    Strips ``module.`` and ``classifier.`` (once), then converts by :func:`upstream_layout`: Hugging Face keys with
    :func:`convert_hf_vit_to_timm`, LoRA with :func:`convert_upstream_lora` (``lora_alpha``: the paper's alpha, 4),
    timm keys as they are.
    """
    sd = strip_prefix(strip_prefix(state_dict, DDP_PREFIX), UPSTREAM_PREFIX)
    layout = upstream_layout(sd)
    if layout == "hf_vit":
        return convert_hf_vit_to_timm(sd)
    if layout == "timm_lora":
        return convert_upstream_lora(sd, lora_alpha)
    return sd


# ---------------------------------------------------------------------------------------------------------------
# LoRA on the fused qkv
# ---------------------------------------------------------------------------------------------------------------


class LoRAQKV(nn.Module):
    """A fused qkv ``nn.Linear`` with LoRA on q and v: qkv(x) + [s B_q A_q x; 0; s B_v A_v x], s = alpha / rank.

    Keeps the base ``weight``/``bias`` names (so the base keys of a state dict do not change); A is Kaiming-uniform,
    B is zero, so the model is unchanged at the start. ``lora_scaling`` is a buffer, saved with the checkpoint.
    """

    def __init__(self, qkv: nn.Linear, rank: int = 4, alpha: float = 4.0) -> None:
        super().__init__()
        if rank < 1:
            raise UserError(f"LoRA rank must be >= 1 (got {rank})")
        self.in_features, self.out_features = qkv.in_features, qkv.out_features
        dim, dev, dtype = qkv.out_features // 3, qkv.weight.device, qkv.weight.dtype
        self.weight = qkv.weight
        self.bias = qkv.bias
        self.lora_q_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dtype))
        self.lora_q_B = nn.Parameter(torch.zeros(dim, rank, device=dev, dtype=dtype))
        self.lora_v_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dtype))
        self.lora_v_B = nn.Parameter(torch.zeros(dim, rank, device=dev, dtype=dtype))
        self.register_buffer("lora_scaling", torch.tensor(float(alpha) / rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_q_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_v_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.weight, self.bias).chunk(3, dim=-1)
        dq = F.linear(F.linear(x, self.lora_q_A), self.lora_q_B) * self.lora_scaling
        dv = F.linear(F.linear(x, self.lora_v_A), self.lora_v_B) * self.lora_scaling
        return torch.cat([q + dq.to(q.dtype), k, v + dv.to(v.dtype)], dim=-1)

    def merged_weight(self) -> torch.Tensor:
        """W + [s B_q A_q; 0; s B_v A_v]."""
        return _merge_qkv(self.weight, self.lora_q_A, self.lora_q_B, self.lora_v_A, self.lora_v_B, self.lora_scaling)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora_q_A.shape[0]}"


def _merge_qkv(weight: torch.Tensor, q_A: torch.Tensor, q_B: torch.Tensor, v_A: torch.Tensor, v_B: torch.Tensor,
               scaling: torch.Tensor | float) -> torch.Tensor:
    """W + [s B_q A_q; 0; s B_v A_v] (computed in float64, returned in W's dtype)."""
    s = scaling.to(torch.float64) if torch.is_tensor(scaling) else float(scaling)
    delta_q = (q_B.to(torch.float64) @ q_A.to(torch.float64)) * s
    delta_v = (v_B.to(torch.float64) @ v_A.to(torch.float64)) * s
    zeros = torch.zeros_like(delta_q)
    return (weight.to(torch.float64) + torch.cat([delta_q, zeros, delta_v], dim=0)).to(weight.dtype)


def _timm_model(model: nn.Module) -> nn.Module:
    """The timm model inside DDP / :class:`ImageClassifier` wrappers."""
    model = getattr(model, "module", model)
    return model.model if isinstance(model, ImageClassifier) else model


def apply_lora(model: nn.Module, rank: int = 4, alpha: float = 4.0) -> nn.Module:
    """Put LoRA on q and v of every ``*.attn.qkv``; freeze everything except LoRA and the classifier head.

    Returns the (in-place modified) model. ViT-B/16 with 1000 classes: 0.92 M of 87.3 M parameters trainable.
    """
    net = _timm_model(model)
    targets = [name for name, mod in net.named_modules() if name.endswith("attn.qkv") and type(mod) is nn.Linear]
    if not targets:
        raise UserError("--ft_method lora needs a ViT with a fused attn.qkv projection; use --ft_method full")
    for p in net.parameters():
        p.requires_grad_(False)
    for name in targets:
        parent, child = name.rsplit(".", 1)
        setattr(net.get_submodule(parent), child, LoRAQKV(getattr(net.get_submodule(parent), child), rank, alpha))
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if isinstance(head, nn.Module):
        for p in head.parameters():
            p.requires_grad_(True)
    for mod in net.modules():
        if isinstance(mod, LoRAQKV):
            for p in (mod.lora_q_A, mod.lora_q_B, mod.lora_v_A, mod.lora_v_B):
                p.requires_grad_(True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA into its qkv weight (W <- W + s B A on the q and v rows); in place, returns the model."""
    net = _timm_model(model)
    for name, mod in list(net.named_modules()):
        if isinstance(mod, LoRAQKV):
            linear = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                               device=mod.weight.device, dtype=mod.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(mod.merged_weight())
                if mod.bias is not None:
                    linear.bias.copy_(mod.bias)
            linear.requires_grad_(mod.weight.requires_grad)
            parent, child = name.rsplit(".", 1) if "." in name else ("", name)
            setattr(net.get_submodule(parent), child, linear)
    return model


def has_lora_keys(state_dict: StateDict) -> bool:
    return any(".lora_q_A" in k for k in state_dict)


def merge_lora_state_dict(state_dict: StateDict, alpha: float = 4.0) -> StateDict:
    """A LoRA (unmerged) state dict -> plain timm keys with W_qkv + [s B_q A_q; 0; s B_v A_v].

    s comes from the saved ``lora_scaling`` buffer, else alpha / rank.
    """
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".lora_q_A")]:
        prefix = key[: -len("lora_q_A")]
        parts = [out.pop(prefix + n, None) for n in ("lora_q_A", "lora_q_B", "lora_v_A", "lora_v_B")]
        scaling = out.pop(prefix + "lora_scaling", None)
        if any(p is None for p in parts) or prefix + "weight" not in out:
            raise UserError(f"incomplete LoRA weights for {prefix[:-1]} (need weight, lora_q_A/B, lora_v_A/B)")
        if scaling is None:
            scaling = alpha / parts[0].shape[0]
        out[prefix + "weight"] = _merge_qkv(out[prefix + "weight"], *parts, scaling)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay
# ---------------------------------------------------------------------------------------------------------------


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """0 for cls token / position embedding / patch embedding, i+1 for ``blocks.i``, ``num_layers + 1`` otherwise."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def param_groups_lrd(
        model: nn.Module,
        weight_decay: float = 0.05,
        layer_decay: float = 0.75,
        no_weight_decay_list: Iterable[str] = (),
) -> List[Dict[str, Any]]:
    """AdamW parameter groups with layer-wise lr decay (METHOD §3), trainable parameters only.

    lr_scale = layer_decay^(L+1-layer); weight decay 0 for 1-D parameters, biases, cls token, position embedding and
    names in ``no_weight_decay_list``. Each group: ``params``, ``lr_scale``, ``weight_decay``, ``layer_id``.
    A model without ``blocks`` gets one scale (1.0).
    """
    net = _timm_model(model)
    num_layers = len(net.blocks) if hasattr(net, "blocks") else 0
    no_wd = {"cls_token", "pos_embed", "reg_token", *no_weight_decay_list}
    groups: Dict[Tuple[int, bool], Dict[str, Any]] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim == 1 or name.endswith(".bias") or name in no_wd)
        layer = layer_id_for_vit(name, num_layers) if num_layers else 0
        scale = layer_decay ** (num_layers + 1 - layer) if num_layers else 1.0
        group = groups.setdefault((layer, decay), {
            "params": [], "lr_scale": scale, "weight_decay": weight_decay if decay else 0.0, "layer_id": layer})
        group["params"].append(p)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------------------------
# Reading weights
# ---------------------------------------------------------------------------------------------------------------


def _few(keys: Sequence[str], n: int = 4) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def read_checkpoint(path: PathLike, flag: str = "--classifier_ckpt") -> Tuple[StateDict, Dict[str, Any]]:
    """Read classifier weights -> (state dict as saved, info).

    info: ``arch`` (train.py checkpoints), ``input_norm`` (:func:`input_norm_record`), ``hf_config`` /
    ``hf_preprocessor`` (HF config.json files beside the weights), ``path``.

    Args:
        path: a ``.safetensors`` or ``torch.save`` file (a bare state dict, or a ``train.py`` checkpoint with
            ``state_dict``/``arch``), or a Hugging Face folder with ``model.safetensors`` / ``pytorch_model.bin``.
        flag: the flag that gave the file, named by the errors.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / n for n in HF_WEIGHT_FILES if (path / n).is_file()]
        if not found:
            raise UserError(f"{flag} {path}: folder has no {' or '.join(HF_WEIGHT_FILES)}")
        path = found[0]
    obj = checkpoints.load(path, flag)
    info: Dict[str, Any] = {"path": str(path)}
    info["hf_config"], info["hf_preprocessor"] = read_hf_config(path.parent)
    recorded_norm = input_norm_record(obj)
    if recorded_norm is not None:
        info["input_norm"] = recorded_norm
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and obj.get("arch") is not None:
        info["arch"] = str(obj["arch"])
    state_dict = checkpoints.state_dict_of(obj, path, flag,
                                           "a dict of tensors, or a train.py checkpoint with 'state_dict'")
    return state_dict, info


def input_norm_record(obj: Any) -> Optional[str]:
    """The input convention a loaded checkpoint object records, None when it says nothing.

    A train.py checkpoint's ``input_norm``; a train.py checkpoint from before that entry existed (it has ``args``):
    ``model``, the model's own mean/std, which train.py used then; a checkpoint of the paper's code (every key of
    its state dict under ``classifier.``): ``paper``, what that code fed its classifiers.
    """
    if not isinstance(obj, dict):
        return None
    if obj.get("input_norm") in INPUT_NORMS:
        return str(obj["input_norm"])
    if "args" in obj and isinstance(obj.get("state_dict"), dict):
        return "model"
    state_dict = obj.get("state_dict") if isinstance(obj.get("state_dict"), dict) else obj
    return "paper" if is_upstream_state_dict(state_dict) else None


def checkpoint_input_norm(path: Optional[PathLike]) -> Optional[str]:
    """:func:`input_norm_record` of a checkpoint file, read without loading its tensors (``torch.load`` with mmap);
    None for no path, a folder, a ``.safetensors`` file or a file that does not load (read_checkpoint reports it)."""
    path = None if path is None else Path(path).expanduser()
    if path is None or not path.is_file() or path.suffix == ".safetensors":
        return None
    try:
        obj = checkpoints.load(path, "checkpoint", mmap=True, verify=False)
    except UserError:  # not a checkpoint: read_checkpoint says so, naming the flag
        return None
    return input_norm_record(obj)


def to_timm_state_dict(state_dict: StateDict, lora_alpha: float = 4.0) -> StateDict:
    """Strip ``module.`` (DDP) and ``model.`` (:class:`ImageClassifier`) prefixes; convert HF ViT keys to timm and the
    paper's checkpoints (:func:`convert_upstream_state_dict`, ``lora_alpha`` for its LoRA scale) to ours."""
    if is_upstream_state_dict(state_dict):
        return convert_upstream_state_dict(state_dict, lora_alpha)
    sd = strip_prefix(strip_prefix(state_dict, DDP_PREFIX), "model.")
    if is_hf_vit_state_dict(sd):
        sd = convert_hf_vit_to_timm(sd)
    return sd


def load_timm_state_dict(model: nn.Module, state_dict: StateDict, source: str = "checkpoint") -> None:
    """Strict load with one-line errors naming missing / unexpected keys and wrong shapes.

    Unmerged LoRA weights are merged on the fly when ``model`` has no LoRA; into a LoRA model they load as they are.
    """
    net = _timm_model(model)
    model_has_lora = any(isinstance(m, LoRAQKV) for m in net.modules())
    if has_lora_keys(state_dict) and not model_has_lora:
        state_dict = merge_lora_state_dict(state_dict)
    wrong_shape = "wrong --arch or number of classes?" if set(state_dict) == set(net.state_dict()) else "wrong --arch?"
    checkpoints.check_state_dict(net.state_dict(), state_dict, source, "this architecture", wrong_shape)
    is_meta = any(p.is_meta for p in net.parameters())
    net.load_state_dict(state_dict, strict=True, assign=is_meta)


# ---------------------------------------------------------------------------------------------------------------
# Architectures by name
# ---------------------------------------------------------------------------------------------------------------


def _pretrained_error(what: str, err: BaseException) -> UserError:
    msg = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0][:160]
    return UserError(f"could not download the pretrained weights of {what} ({msg}); download them on a machine with "
                     "internet (README: \"Getting the paper's classifiers onto an offline machine\") and pass the file "
                     "with --classifier_ckpt")


def _download_hf_checkpoint(repo: str) -> Path:
    """The weights file of a Hugging Face model repository (via the hub cache; an error offline)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError
    for filename in HF_WEIGHT_FILES[::-1]:  # pytorch_model.bin first: the paper's repository has no safetensors on main
        try:
            return Path(hf_hub_download(repo, filename))
        except RemoteEntryNotFoundError as err:  # the hub answered: no such file; try the other name
            last: BaseException = err
        except Exception as err:  # noqa: BLE001 - offline, network, authentication: no point trying again
            raise _pretrained_error(repo, err) from None
    raise _pretrained_error(repo, last)


def _data_config(model: nn.Module) -> Tuple[Tuple[int, int], Tuple[float, ...], Tuple[float, ...]]:
    cfg = timm.data.resolve_model_data_config(model)
    return tuple(cfg["input_size"][-2:]), tuple(cfg["mean"]), tuple(cfg["std"])


def _build(
        arch: str, num_classes: Optional[int], pretrained: bool, drop_path: float, info: Dict[str, Any],
        flag: str = "--classifier_ckpt") -> Tuple[nn.Module, Tuple[int, int], Tuple[float, ...], Tuple[float, ...]]:
    """(timm model, input size, mean, std) for ``arch``; pretrained weights only where ``pretrained``; errors name
    ``flag`` as the flag of the weights file."""
    half = (0.5, 0.5, 0.5)
    if arch == "cifar10_vit_base":
        model = build_vit_from_hf_config(CIFAR10_HF_CONFIG, drop_path, num_classes)
        return model, (224, 224), half, half
    if arch == "digits_vit_tiny":
        kwargs = dict(DIGITS_VIT_KWARGS, num_classes=num_classes or DIGITS_VIT_KWARGS["num_classes"])
        return VisionTransformer(**kwargs, drop_path_rate=drop_path), (16, 16), half, half
    if arch == "hf_vit":
        config = info.get("hf_config")
        if config is None:
            raise UserError(f"--arch hf_vit needs {flag} pointing to a Hugging Face folder (or a weights file) "
                            "with its config.json beside it")
        model = build_vit_from_hf_config(config, drop_path, num_classes)
        pre = info.get("hf_preprocessor") or {}
        size = int(config.get("image_size", 224))
        return model, (size, size), tuple(pre.get("image_mean", half)), tuple(pre.get("image_std", half))
    name = IMAGENET_TIMM_NAME if arch == "imagenet_vit_base" else arch
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, list(ARCHS) + timm.list_models(), n=4)
        raise UserError(f"--arch {arch}: unknown architecture; use one of {', '.join(ARCHS)} or a timm model name"
                        + (f" (close: {', '.join(close)})" if close else ""))
    kwargs: Dict[str, Any] = {"drop_path_rate": drop_path} if drop_path else {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - hub download errors (offline, missing file, ...)
        if pretrained:
            raise _pretrained_error(f"timm model {name}", err) from None
        raise UserError(f"--arch {arch}: timm could not build it ({err})") from None
    return (model, *_data_config(model))


def get_architecture(
        arch: str,
        num_classes: Optional[int] = None,
        pretrained: bool = False,
        checkpoint: Optional[PathLike] = None,
        ft_method: str = "full",
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        drop_path: float = 0.0,
        device: Optional[Union[str, torch.device]] = None,
        input_norm: Optional[str] = None,
        attn_drop_rate: float = 0.0,
        checkpoint_flag: str = "--classifier_ckpt",
) -> ImageClassifier:
    """Build the classifier ``arch`` (see module docstring) as an :class:`ImageClassifier`.

    Args:
        arch: ``cifar10_vit_base``, ``imagenet_vit_base``, ``digits_vit_tiny``, ``hf_vit`` or a timm model name.
        num_classes: head size (default: the architecture's, or the checkpoint's for other timm models).
        pretrained: timm's hub download; for ``cifar10_vit_base`` the paper's HF checkpoint from the hub, converted;
            for ``digits_vit_tiny`` the shipped ``models/digits_vit_tiny.pt``. Unused with ``checkpoint``.
        checkpoint: a local file or HF folder (:func:`read_checkpoint`; train.py's, the paper's code's, timm's or
            Hugging Face's); else ``pretrained``, else random init.
        ft_method: ``"full"`` or ``"lora"`` (LoRA(rank, alpha) on q/v, only LoRA + head trainable). A checkpoint
            with unmerged LoRA weights loads into either: merged on the fly for ``"full"`` (certification), kept as
            LoRA for ``"lora"``.
        lora_rank, lora_alpha: LoRA rank and alpha (``lora_alpha`` is also the paper's alpha of its LoRA checkpoints).
        drop_path: timm stochastic depth rate.
        device: where to build; ``"meta"`` builds without memory (for counting parameters).
        input_norm: ``"paper"`` (2x - 1) or ``"model"`` (the model's mean/std); None: the one the checkpoint
            recorded, else :data:`DEFAULT_INPUT_NORM` (``paper`` for imagenet_vit_base, ``model`` otherwise). A value
            that contradicts the checkpoint's record is an error.
        attn_drop_rate: the paper's CIFAR-10 regularizer, block i's attention dropout linspace(0, rate, depth)[i]
            (:func:`set_attention_dropout`).
        checkpoint_flag: the flag that gave ``checkpoint`` (``--load_from``, ...), named by the errors about it.
    """
    ft_method = _check_build_options(ft_method, num_classes, drop_path, attn_drop_rate)
    checkpoint = _default_checkpoint(arch, checkpoint, pretrained)
    state_dict, info = _read_for_arch(arch, checkpoint, lora_alpha, checkpoint_flag)
    if state_dict is not None and num_classes is None and arch not in ARCHS:  # any timm model: the checkpoint's head
        num_classes = _head_size(arch, state_dict)
    norm = resolve_input_norm(arch, input_norm, info.get("input_norm"), checkpoint)
    meta = device is not None and torch.device(device).type == "meta"
    with torch.device("meta") if meta else contextlib.nullcontext():
        model, input_size, mean, std = _build(arch, num_classes, pretrained and checkpoint is None, drop_path, info,
                                              checkpoint_flag)
    if state_dict is not None:
        _load_weights(model, state_dict, ft_method, lora_alpha, f"{checkpoint_flag} {info.get('path', checkpoint)}")
    if ft_method == "lora" and not any(isinstance(m, LoRAQKV) for m in model.modules()):
        apply_lora(model, rank=lora_rank, alpha=lora_alpha)
    if attn_drop_rate:
        set_attention_dropout(model, attn_drop_rate)
    if norm == "paper":
        mean = std = PAPER_MEAN_STD
    classifier = ImageClassifier(model, input_size, mean, std, input_norm=norm)
    if device is not None and not meta:
        classifier = classifier.to(device)
    return classifier


def _check_build_options(ft_method: str, num_classes: Optional[int], drop_path: float, attn_drop_rate: float) -> str:
    """Reject bad :func:`get_architecture` options; returns ``ft_method`` with the alias ``full-ft`` as ``full``."""
    if ft_method == "full-ft":
        ft_method = "full"
    if ft_method not in FT_METHODS:
        raise UserError(f"--ft_method {ft_method!r}: choose one of {', '.join(FT_METHODS)}")
    if num_classes is not None and num_classes < 1:
        raise UserError(f"number of classes must be >= 1 (got {num_classes})")
    for flag, rate in (("--drop_path", drop_path), ("--attn_drop_rate", attn_drop_rate)):
        if not 0.0 <= rate < 1.0:
            raise UserError(f"{flag} {rate}: must be in [0, 1)")
    return ft_method


def _read_for_arch(arch: str, checkpoint: Optional[PathLike], lora_alpha: float,
                   flag: str) -> Tuple[Optional[StateDict], Dict[str, Any]]:
    """(timm state dict, info) of ``checkpoint`` for ``arch`` ((None, {}) without one); errors name ``flag``."""
    if checkpoint is None:
        return None, {}
    state_dict, info = read_checkpoint(checkpoint, flag)
    if info.get("arch") not in (None, arch):
        raise UserError(f"{flag} {checkpoint}: written for --arch {info['arch']}, not {arch}")
    if arch == "cifar10_vit_base" and is_hf_vit_state_dict(state_dict) and info.get("hf_config"):
        _check_cifar10_hf_config(info["hf_config"], checkpoint, flag)
    return to_timm_state_dict(state_dict, lora_alpha), info


def _load_weights(model: nn.Module, state_dict: StateDict, ft_method: str, lora_alpha: float, source: str) -> None:
    """Load ``state_dict`` into ``model``; for ``ft_method`` lora a state dict with LoRA weights first gets LoRA
    modules of its rank."""
    if ft_method == "lora" and has_lora_keys(state_dict):
        first = next(k for k in state_dict if k.endswith(".lora_q_A"))
        apply_lora(model, rank=state_dict[first].shape[0], alpha=lora_alpha)
    load_timm_state_dict(model, state_dict, source=source)


def _default_checkpoint(arch: str, checkpoint: Optional[PathLike], pretrained: bool) -> Optional[PathLike]:
    """The weights file behind ``pretrained`` where it is a file (digits: shipped; CIFAR-10: the HF hub download)."""
    if checkpoint is None and pretrained and arch == "digits_vit_tiny":
        if not DIGITS_CHECKPOINT.is_file():
            raise UserError(f"{DIGITS_CHECKPOINT} not found; retrain the demo models (see README) "
                            "or pass --classifier_ckpt")
        return DIGITS_CHECKPOINT
    if checkpoint is None and pretrained and arch == "cifar10_vit_base":
        return _download_hf_checkpoint(CIFAR10_HF_REPO)
    return checkpoint


def pretrained_weights_file(arch: str) -> Optional[Path]:
    """The file that ``pretrained`` weights of ``arch`` are read from, where it is known without downloading (so that
    a run can fingerprint it): the shipped ``models/digits_vit_tiny.pt``, the paper's CIFAR-10 classifier once in the
    Hugging Face cache; None otherwise (timm's hub weights).

    Args:
        arch: the architecture name.
    """
    if arch == "digits_vit_tiny":
        return DIGITS_CHECKPOINT
    if arch == "cifar10_vit_base":
        from huggingface_hub import try_to_load_from_cache
        for filename in HF_WEIGHT_FILES[::-1]:  # the order of _download_hf_checkpoint
            cached = try_to_load_from_cache(CIFAR10_HF_REPO, filename)
            if isinstance(cached, str):
                return Path(cached)
    return None


def resolve_input_norm(arch: str, requested: Optional[str], recorded: Optional[str],
                       checkpoint: Optional[PathLike] = None) -> str:
    """The classifier's input convention: ``requested`` (the --input_norm flag), else the checkpoint's ``recorded``
    one, else the architecture's default (:data:`DEFAULT_INPUT_NORM`, ``model`` when not listed).

    Args:
        arch: the architecture name.
        requested: the flag's value or None.
        recorded: what the checkpoint recorded (train.py writes it; the paper's code implies ``paper``) or None.
        checkpoint: the checkpoint's path, for the error message.
    """
    if requested is not None and requested not in INPUT_NORMS:
        raise UserError(f"--input_norm {requested!r}: choose one of {', '.join(INPUT_NORMS)}")
    if requested is not None and recorded is not None and requested != recorded:
        raise UserError(f"--input_norm {requested} contradicts {checkpoint}, which was trained with --input_norm "
                        f"{recorded}; drop the flag (the checkpoint's convention is used)")
    return requested or recorded or DEFAULT_INPUT_NORM.get(arch, "model")


def set_attention_dropout(model: nn.Module, rate: float) -> List[float]:
    """The paper's CIFAR-10 regularizer: block i's attention-probability dropout p_i = linspace(0, rate, depth)[i].

    The paper's code sets these on the Hugging Face ViT when it is given ``--drop_path``; here they go on timm's
    ``attn_drop``, which timm's attention applies in its fused (``scaled_dot_product_attention(dropout_p=...)``) and
    explicit forms alike, in train mode only. Returns the probabilities set.

    Args:
        model: a timm ViT (or an :class:`ImageClassifier` around one) whose blocks have ``attn.attn_drop``.
        rate: the last block's probability, in [0, 1).
    """
    net = _timm_model(model)
    drops = [getattr(getattr(block, "attn", None), "attn_drop", None) for block in getattr(net, "blocks", [])]
    if not drops or not all(isinstance(d, nn.Dropout) for d in drops):
        raise UserError(f"--attn_drop_rate needs a ViT whose blocks have attn.attn_drop (a timm VisionTransformer), "
                        f"not {type(net).__name__}; use --drop_path (stochastic depth) instead")
    probabilities = [float(p) for p in torch.linspace(0, rate, len(drops))]
    for dropout, p in zip(drops, probabilities):
        dropout.p = p
    return probabilities


def _check_cifar10_hf_config(config: Dict[str, Any], checkpoint: PathLike, flag: str = "--classifier_ckpt") -> None:
    """The config.json beside an HF checkpoint (given by ``flag``) must describe the ViT-B/16 that
    ``cifar10_vit_base`` builds."""
    wrong = [f"{k}={config[k]!r} (expected {v!r})" for k, v in CIFAR10_HF_CONFIG.items()
             if k in config and k != "num_labels" and config[k] != v]
    if wrong:
        raise UserError(f"{flag} {checkpoint}: its config.json is not the paper's ViT-B/16 "
                        f"({', '.join(wrong[:3])}); use --arch hf_vit to build the model from its config.json")


def _head_size(arch: str, state_dict: StateDict) -> Optional[int]:
    """Rows of the classifier weight in a checkpoint for timm model ``arch`` (None when not found)."""
    try:
        head = timm.models.get_pretrained_cfg_value(arch.split(".")[0], "classifier") or "head"
    except Exception:  # noqa: BLE001
        head = "head"
    heads = head if isinstance(head, (list, tuple)) else [head]
    for h in heads:
        w = state_dict.get(f"{h}.weight")
        if w is not None and w.ndim >= 1:
            return int(w.shape[0])
    return None


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
