"""The diffusion UNet of improved-diffusion (Nichol & Dhariwal 2021) and guided-diffusion (Dhariwal & Nichol 2021).

One :class:`UNetModel` covers both families (written from the published architecture, not copied):

* ResBlocks with timestep conditioning, additive or scale-shift ("FiLM", ``h = norm(h)·(1 + s) + b``);
* down/upsampling by strided conv / nearest+conv, or by ResBlocks (``resblock_updown``);
* self-attention at chosen downsampling factors, heads given by count (``num_heads``) or by width
  (``num_head_channels``), with the legacy (heads, then q/k/v) or the new (q/k/v, then heads) channel split;
* learned sigma is simply ``out_channels = 6`` (ε and the variance interpolation v).

``state_dict()`` keys, shapes and order are exactly those of the upstream models, so the official checkpoints
load with ``strict=True``. Numerics follow upstream: GroupNorm and the sinusoidal timestep embedding are computed
in float32 (float64 when the input is float64) and cast back, so the model also runs under bf16/fp16 autocast.
Attention is :func:`attention` (``F.scaled_dot_product_attention``; the explicit form where fast.py asks for it):
softmax(q·kᵀ/sqrt(d))·v is the same function upstream writes as softmax((q·d^-1/4)·(k·d^-1/4)ᵀ)·v. Tensors may be channels_last.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

__all__ = ["UNetModel", "ResBlock", "AttentionBlock", "attention", "timestep_embedding"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, explicit: bool = False
              ) -> torch.Tensor:
    """softmax(q kᵀ · scale) v over the last two dimensions: ``[..., T_q, d]``, ``[..., T, d]`` -> ``[..., T_q, d]``.

    ``F.scaled_dot_product_attention``; with ``explicit`` (chosen by the fast path, :mod:`fast`) the explicit
    ``softmax((q·scale) kᵀ) v``: the same function, with the scores rounded to q's dtype before the softmax (the
    fused kernels keep them in fp32).
    """
    if explicit:
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other dtype is upcast to float32 (as upstream's ``.float()``)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def timestep_embedding(
        timesteps: torch.Tensor, dim: int, max_period: float = 10000.0, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sinusoidal embedding [cos(t·f_i), sin(t·f_i)], f_i = max_period^(-i/half), i < half = dim // 2.

    Computed in ``dtype`` (float32 as upstream, float64 for exact references); ``timesteps`` may be fractional.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=timesteps.device) / half)
    args = timesteps[:, None].to(dtype) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (float64 kept) and cast back to the input dtype, as upstream."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = _compute_dtype(x)
        weight = self.weight.to(dt) if self.weight is not None else None
        bias = self.bias.to(dt) if self.bias is not None else None
        return F.group_norm(x.to(dt), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialise a module's parameters (output convs start as the identity residual)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepBlock(nn.Module):
    """A module whose ``forward`` takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that passes ``emb`` to the children that are :class:`TimestepBlock`."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 conv or 2x2 average pooling (key ``op``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
        else:
            assert out_channels in (None, channels)
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """h = conv(SiLU(norm(x))); h += emb (or h = norm(h)·(1 + scale) + shift); out = skip(x) + conv(SiLU(...)).

    ``up``/``down`` resample both branches between the first norm/SiLU and the first conv (guided-diffusion).
    """

    def __init__(
            self,
            channels: int,
            emb_channels: int,
            dropout: float = 0.0,
            out_channels: Optional[int] = None,
            use_scale_shift_norm: bool = False,
            up: bool = False,
            down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm_in, act_in, conv_in = self.in_layers
        if self.updown:
            h = conv_in(self.h_upd(act_in(norm_in(x))))
            x = self.x_upd(x)
        else:
            h = conv_in(act_in(norm_in(x)))
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm_out, act_out, drop, conv_out = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = norm_out(h) * (1 + scale) + shift
        else:
            h = norm_out(h + emb_out)
        h = conv_out(drop(act_out(h)))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """x + proj_out(attention(qkv(norm(x)))) over the spatial positions.

    The 1x1 convs ``qkv`` [3C, C, 1] and ``proj_out`` [C, C, 1] are applied as matmuls in token-major layout
    ([B, T, C], free for channels_last inputs). Channel split of qkv, per position:
    legacy (improved-diffusion, guided ``QKVAttentionLegacy``): [heads, 3, head_dim];
    new order (guided ``QKVAttention``): [3, heads, head_dim].
    """

    def __init__(
            self,
            channels: int,
            num_heads: int = 1,
            num_head_channels: int = -1,
            use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"attention channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"attention channels {channels} not divisible by num_heads {self.num_heads}")
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))
        self.fused_attn = True  # as timm's Attention: False = the explicit form (set by fast.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        n = math.prod(spatial)
        heads = self.num_heads
        head_dim = c // heads
        tokens = self.norm(x).reshape(b, c, n).transpose(1, 2)  # [B, T, C]
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)  # [B, T, 3C]
        if self.use_new_attention_order:
            qkv = qkv.view(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        else:
            qkv = qkv.view(b, n, heads, 3, head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, T, head_dim]
        a = attention(q, k, v, 1.0 / math.sqrt(head_dim), explicit=not self.fused_attn)
        a = a.transpose(1, 2).reshape(b, n, c)
        h = F.linear(a, self.proj_out.weight.squeeze(-1), self.proj_out.bias)  # [B, T, C]
        return x + h.transpose(1, 2).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The diffusion UNet: eps_and_v = UNet(x_t, timesteps).

    Args:
        in_channels / out_channels: image channels in and out (out = 6 with learned sigma).
        model_channels: base width; level i has ``int(channel_mult[i] * model_channels)`` channels.
        num_res_blocks: ResBlocks per level (the decoder has one more).
        attention_resolutions: downsampling factors (1, 2, 4, ...) at which attention blocks are inserted.
        dropout: dropout in the ResBlocks.
        channel_mult: width multiplier per level; ``len(channel_mult) - 1`` downsamplings.
        conv_resample: learned (conv) resampling rather than plain pooling / nearest.
        num_classes: class-conditional when set (adds ``label_emb``).
        use_checkpoint: gradient checkpointing of each block while training.
        num_heads / num_head_channels / num_heads_upsample: attention heads by count, or by width when
            ``num_head_channels != -1``; ``num_heads_upsample = -1`` means ``num_heads``.
        use_scale_shift_norm: FiLM-style conditioning in the ResBlocks.
        resblock_updown: down/upsample with ResBlocks (guided-diffusion).
        use_new_attention_order: split q/k/v before heads (guided ``QKVAttention``); else legacy order.
    """

    def __init__(
            self,
            in_channels: int,
            model_channels: int,
            out_channels: int,
            num_res_blocks: int,
            attention_resolutions: Sequence[int],
            dropout: float = 0.0,
            channel_mult: Sequence[float] = (1, 2, 4, 8),
            conv_resample: bool = True,
            num_classes: Optional[int] = None,
            use_checkpoint: bool = False,
            num_heads: int = 1,
            num_head_channels: int = -1,
            num_heads_upsample: int = -1,
            use_scale_shift_norm: bool = False,
            resblock_updown: bool = False,
            use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.dropout = dropout
        self.conv_resample = conv_resample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resblock_updown = resblock_updown
        self.use_new_attention_order = use_new_attention_order
        self.time_embed_dim = time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        input_ch = int(channel_mult[0] * model_channels)
        ch, input_block_chans, ds = self._build_input_blocks(input_ch)
        self.middle_block = TimestepEmbedSequential(
            self._res_block(ch, ch), self._attn_block(ch, num_heads), self._res_block(ch, ch))
        ch = self._build_output_blocks(ch, input_block_chans, ds)
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1)))

    def _res_block(self, ch_in: int, ch_out: int, **updown: bool) -> ResBlock:
        return ResBlock(ch_in, self.time_embed_dim, self.dropout, out_channels=ch_out,
                        use_scale_shift_norm=self.use_scale_shift_norm, **updown)

    def _attn_block(self, ch: int, heads: int) -> AttentionBlock:
        return AttentionBlock(ch, num_heads=heads, num_head_channels=self.num_head_channels,
                              use_new_attention_order=self.use_new_attention_order)

    def _build_input_blocks(self, ch: int) -> tuple[int, list[int], int]:
        """The encoder ``self.input_blocks`` from width ``ch``; returns (its last width, the width of each block's
        output, which the decoder's skip connections take, the downsampling factor reached)."""
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(self.in_channels, ch, 3, padding=1))])
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers: list[nn.Module] = [self._res_block(ch, int(mult * self.model_channels))]
                ch = int(mult * self.model_channels)
                if ds in self.attention_resolutions:
                    layers.append(self._attn_block(ch, self.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = (self._res_block(ch, ch, down=True) if self.resblock_updown
                        else Downsample(ch, self.conv_resample, ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2
        return ch, input_block_chans, ds

    def _build_output_blocks(self, ch: int, input_block_chans: list[int], ds: int) -> int:
        """The decoder ``self.output_blocks`` from width ``ch``, taking the skip widths ``input_block_chans`` (last
        first) and upsampling from factor ``ds``; returns its last width."""
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks + 1):
                layers = [self._res_block(ch + input_block_chans.pop(), int(self.model_channels * mult))]
                ch = int(self.model_channels * mult)
                if ds in self.attention_resolutions:
                    layers.append(self._attn_block(ch, self.num_heads_upsample))
                if level and i == self.num_res_blocks:
                    layers.append(self._res_block(ch, ch, up=True) if self.resblock_updown
                                  else Upsample(ch, self.conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        return ch

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights (inputs are cast to it, as upstream's ``x.type(self.dtype)``)."""
        return self.input_blocks[0][0].weight.dtype

    @property
    def downsample_factor(self) -> int:
        """Input height and width must be multiples of this: 2 ** (number of downsamplings)."""
        return 2 ** (len(self.channel_mult) - 1)

    def _block(self, module: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(module, h, emb, use_reentrant=False)
        return module(h, emb)

    def forward(
            self, x: torch.Tensor, timesteps: torch.Tensor | float, y: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: [B, C_in, H, W] (diffusion scale); timesteps: [B] (or a scalar for all), possibly fractional.

        Returns [B, C_out, H, W] in x's dtype: ε̂ (and the variance interpolation v when learning sigma).
        A scalar timestep's embedding is computed once and broadcast over the batch: the same function as [B]
        copies of it (float rounding may differ in the last bits), without B identical rows through the embedding
        MLP and every block's projection.
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass class labels y if and only if the model is class-conditional")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.reshape(1)
        t_emb = timestep_embedding(timesteps, self.model_channels, dtype=_compute_dtype(x))
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)

        h = x.to(self.dtype)
        hs = []
        for module in self.input_blocks:
            h = self._block(module, h, emb)
            hs.append(h)
        h = self._block(self.middle_block, h, emb)
        for module in self.output_blocks:
            h = self._block(module, torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)
