"""RMT (Retentive Networks Meet Vision Transformers, CVPR 2024): RMT-T/S/B/L, registered with timm.

Architecture and state-dict keys match the official implementation (qhfan/RMT,
`classfication_release/RMT.py`), so released checkpoints load with `strict=True`. Attribute names
that look odd (`layers.N.Relpos`, `retention_layer_norm`, `pos`) are kept for that reason.

Manhattan Self-Attention (MaSA) adds a decay `log(gamma_head) * manhattan_distance(i, j)` to the
attention logits before the softmax, after a rotary (xPos-like) shift of q and k along the flattened
raster index. Early stages use the decomposed form: attention along W with a 1-D decay, then along H.
Both forms run through `decayed_attention` (explicit matmul + softmax on CPU, SDPA with an additive
mask on GPUs); masks and rotary tables are built once per (H, W, device, dtype) and cached (see
`RetentionPositions`).

Token labeling (RMT-S*/B*/L*, `rmt_{s,b,l}_tl`; official `classification_token_label_release/RMT.py`):
the same network plus `aux_head`, a Linear classifier on every final-stage token, and MixToken in
training (see `RMT.forward_train`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

__all__ = ["RMT", "TokenLabelOutput"]


class InputShapeError(ValueError):
    """An input the model cannot process (wrong channel count, side not divisible by 32)."""


class ChannelsLastConv(nn.Module):
    """Depthwise conv on a (B, H, W, C) tensor: LCE on V, CPE before each block, the FFN's conv."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the rotary partner of each channel pair."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class RetentionPositions(nn.Module):
    """Per-stage rotary tables and decay masks of MaSA (official name: `RetNetRelPos2d`).

    `angle` and `decay` are buffers because the official checkpoints contain them. Everything derived
    from them is a pure function of (H, W), cached per (H, W, device, dtype, decomposed).
    """

    def __init__(self, dim: int, num_heads: int, initial_value: float, heads_range: float):
        super().__init__()
        self.initial_value, self.heads_range = initial_value, heads_range
        head_dim = dim // num_heads
        angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2))
        self.register_buffer("angle", angle.repeat_interleave(2))
        heads = torch.arange(num_heads, dtype=torch.float)
        self.register_buffer("decay", torch.log(1 - 2 ** (-initial_value - heads_range * heads / num_heads)))
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _apply(self, fn, recurse=True):
        self._cache.clear()  # device or dtype of the buffers changes
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, height: int, width: int, dtype: torch.dtype, decomposed: bool):
        """Returns (sin, cos, masks): sin/cos (H, W, 1, head_dim); masks is a (heads, HW, HW) decay mask,
        or for the decomposed form a pair ((heads, H, H), (heads, W, W))."""
        key = (height, width, self.decay.device, dtype, decomposed)
        if torch.compiler.is_compiling():
            return self._build(height, width, dtype, decomposed)
        if key not in self._cache:
            self._cache[key] = self._build(height, width, dtype, decomposed)
        return self._cache[key]

    @torch.no_grad()
    def _build(self, height: int, width: int, dtype: torch.dtype, decomposed: bool):
        decay = self.decay.float()
        index = torch.arange(height * width, device=decay.device, dtype=torch.float)
        phase = (index[:, None] * self.angle.float()[None, :]).reshape(height, width, 1, -1)
        sin, cos = phase.sin().to(dtype), phase.cos().to(dtype)
        if decomposed:
            masks = (self._decay_1d(height, decay).to(dtype), self._decay_1d(width, decay).to(dtype))
        else:
            hh = torch.arange(height, device=decay.device).repeat_interleave(width)
            ww = torch.arange(width, device=decay.device).repeat(height)
            distance = (hh[:, None] - hh[None, :]).abs() + (ww[:, None] - ww[None, :]).abs()
            masks = (decay[:, None, None] * distance).to(dtype)
        return sin, cos, masks

    @staticmethod
    def _decay_1d(length: int, decay: torch.Tensor) -> torch.Tensor:
        index = torch.arange(length, device=decay.device, dtype=torch.float)
        return decay[:, None, None] * (index[:, None] - index[None, :]).abs()


class ManhattanSelfAttention(nn.Module):
    """MaSA with LCE (a 5x5 depthwise conv on V added to the output); full or decomposed."""

    def __init__(self, dim: int, num_heads: int, decomposed: bool, attn_backend: str = "auto"):
        super().__init__()
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {attn_backend!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.decomposed = decomposed
        self.attn_backend = attn_backend
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.lepe = ChannelsLastConv(dim, 5)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, positions: RetentionPositions) -> torch.Tensor:
        b, h, w, c = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        lepe = self.lepe(v)
        shape = (b, h, w, self.num_heads, self.head_dim)
        out = self.attend(q.view(shape), k.view(shape), v.view(shape), positions)
        return self.out_proj(out.reshape(b, h, w, c) + lepe)

    def attend(self, q, k, v, positions: RetentionPositions) -> torch.Tensor:
        """q, k, v: (B, H, W, heads, head_dim) -> (B, H, W, heads, head_dim)."""
        b, h, w, n, d = q.shape
        backend = self.attn_backend
        if backend == "auto":
            backend = "matmul" if q.device.type == "cpu" else "sdpa"
        sin, cos, masks = positions(h, w, q.dtype, self.decomposed)
        q = (q * cos + rotate_every_two(q) * sin) * d**-0.5
        k = k * cos + rotate_every_two(k) * sin
        if not self.decomposed:
            q, k, v = (t.permute(0, 3, 1, 2, 4).reshape(b, n, h * w, d) for t in (q, k, v))
            out = decayed_attention(q, k, v, masks, backend, positions.decay, grid_width=w)
            return out.view(b, n, h, w, d).permute(0, 2, 3, 1, 4)
        mask_h, mask_w = masks
        # along W: one attention per row, batch (B*H)
        q_w, k_w, v_w = (t.permute(0, 1, 3, 2, 4).reshape(b * h, n, w, d) for t in (q, k, v))
        v = decayed_attention(q_w, k_w, v_w, mask_w, backend, positions.decay).view(b, h, n, w, d)
        # along H: one attention per column, batch (B*W)
        q_h, k_h = (t.permute(0, 2, 3, 1, 4).reshape(b * w, n, h, d) for t in (q, k))
        v_h = v.permute(0, 3, 2, 1, 4).reshape(b * w, n, h, d)
        out = decayed_attention(q_h, k_h, v_h, mask_h, backend, positions.decay).view(b, w, n, h, d)
        return out.permute(0, 3, 1, 2, 4)


ATTN_BACKENDS = ("auto", "matmul", "sdpa", "flex")


def decayed_attention(q, k, v, mask, backend: str, decay: torch.Tensor, grid_width: int | None = None):
    """softmax(q k^T + log-decay mask) v, for q already scaled by 1/sqrt(head_dim).

    backends: "matmul" (explicit matmul + softmax; on CPU faster than SDPA's kernels for these short
    sequences, see `make bench-model`), "sdpa" (`scaled_dot_product_attention` with the additive mask;
    the default on GPUs), "flex" (FlexAttention computing the decay from token positions instead of
    reading a mask; compiled on GPUs, eager elsewhere). `grid_width` is W for the 2-D Manhattan decay,
    None for the 1-D decay of the decomposed form."""
    if backend == "matmul":
        scores = q @ k.transpose(-1, -2)
        return torch.softmax(scores.add_(mask), dim=-1) @ v
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    score_mod = _decay_score_mod(decay.float(), grid_width)
    return _flex_attention(q.device)(q, k, v, score_mod=score_mod, scale=1.0)


def _decay_score_mod(decay: torch.Tensor, grid_width: int | None):
    if grid_width is None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + decay[h] * (q_idx - kv_idx).abs()
    else:
        def score_mod(score, b, h, q_idx, kv_idx):
            dy = (q_idx // grid_width - kv_idx // grid_width).abs()
            dx = (q_idx % grid_width - kv_idx % grid_width).abs()
            return score + decay[h] * (dy + dx)
    return score_mod


@functools.cache
def _flex_attention(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if device.type == "cuda" else flex_attention


class FeedForward(nn.Module):
    """fc1 -> GELU -> (+ 3x3 depthwise conv, residual) -> fc2."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = ChannelsLastConv(hidden_dim, 3)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x))
        return self.fc2(x + self.dwconv(x))


class RetentionBlock(nn.Module):
    """CPE (3x3 depthwise conv, residual), then pre-norm MaSA and FFN with optional layer scale."""

    def __init__(self, dim, num_heads, ffn_dim, decomposed, drop_path=0.0, layer_scale_init=None,
                 attn_backend="auto"):
        super().__init__()
        self.pos = ChannelsLastConv(dim, 3)
        self.retention_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.retention = ManhattanSelfAttention(dim, num_heads, decomposed, attn_backend)
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = FeedForward(dim, ffn_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layerscale = layer_scale_init is not None
        if self.layerscale:
            # (1, 1, 1, C) as in the official checkpoints
            self.gamma_1 = nn.Parameter(torch.full((1, 1, 1, dim), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((1, 1, 1, dim), float(layer_scale_init)))

    def forward(self, x: torch.Tensor, positions: RetentionPositions) -> torch.Tensor:
        x = x + self.pos(x)
        attn = self.retention(self.retention_layer_norm(x), positions)
        ffn_in = x + self.drop_path(self.gamma_1 * attn if self.layerscale else attn)
        ffn = self.ffn(self.final_layer_norm(ffn_in))
        return ffn_in + self.drop_path(self.gamma_2 * ffn if self.layerscale else ffn)


class Downsample(nn.Module):
    """3x3 stride-2 conv + BatchNorm between stages (official name: `PatchMerging`)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class RMTStage(nn.Module):
    """Blocks at one resolution, then (except in the last stage) the downsampling to the next."""

    def __init__(self, dim, out_dim, depth, num_heads, init_value, heads_range, ffn_dim, decomposed,
                 drop_path: Sequence[float], layer_scale_init, attn_backend):
        super().__init__()
        self.Relpos = RetentionPositions(dim, num_heads, init_value, heads_range)
        self.blocks = nn.ModuleList([
            RetentionBlock(dim, num_heads, ffn_dim, decomposed, drop_path[i], layer_scale_init, attn_backend)
            for i in range(depth)
        ])
        self.downsample = Downsample(dim, out_dim) if out_dim is not None else None
        self.grad_checkpointing = False

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, self.Relpos, use_reentrant=False)
            else:
                x = block(x, self.Relpos)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return self.downsample(x) if self.downsample is not None else x


def conv_stem(in_chans: int, dim: int) -> nn.Sequential:
    """Four 3x3 convs with BatchNorm (stride 4 in all); indices match the official `patch_embed.proj`."""
    half = dim // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.GELU(),
        nn.Conv2d(dim, dim, 3, 1, 1), nn.BatchNorm2d(dim),
    )


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = conv_stem(in_chans, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class RMT(nn.Module):
    """RMT backbone and classifier. Internally channels-last (B, H, W, C); outputs are NCHW.

    The head is per-token Linear projection -> BatchNorm -> SiLU (the official "swish") -> global
    average pool -> Linear classifier. `attn_backend` picks how MaSA is computed (`decayed_attention`).

    `token_label=True` adds `aux_head` (RMT-S*/B*/L*): the output in eval mode is then
    `head logits + 0.5 * max over tokens of aux logits`, and in training mode a `TokenLabelOutput`
    (with MixToken unless `mix_token=False`), as the official token-labeling model returns them.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 8, 2),
        num_heads: Sequence[int] = (4, 4, 8, 16),
        init_values: Sequence[float] = (2, 2, 2, 2),
        heads_ranges: Sequence[float] = (4, 4, 6, 6),
        mlp_ratios: Sequence[float] = (3, 3, 3, 3),
        decomposed: Sequence[bool] = (True, True, False, False),
        layer_scale: Sequence[bool] = (False, False, False, False),
        layer_scale_init: float = 1e-6,
        projection: int = 1024,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        global_pool: str = "avg",
        attn_backend: str = "auto",
        token_label: bool = False,
        mix_token: bool | None = None,
        mix_token_beta: float = 1.0,
    ):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (got {global_pool!r})")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = embed_dims[-1]
        self.head_hidden_size = projection
        self.drop_rate = drop_rate
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(RMTStage(
                dim=embed_dims[i],
                out_dim=embed_dims[i + 1] if i < len(depths) - 1 else None,
                depth=depth,
                num_heads=num_heads[i],
                init_value=init_values[i],
                heads_range=heads_ranges[i],
                ffn_dim=int(mlp_ratios[i] * embed_dims[i]),
                decomposed=decomposed[i],
                drop_path=dpr[start:start + depth],
                layer_scale_init=layer_scale_init if layer_scale[i] else None,
                attn_backend=attn_backend,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"layers.{i}"))
        self.proj = nn.Linear(self.num_features, projection)
        self.norm = nn.BatchNorm2d(projection)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(projection, num_classes) if num_classes > 0 else nn.Identity()
        self.token_label = token_label
        self.mix_token = token_label if mix_token is None else mix_token
        self.mix_token_beta = mix_token_beta
        self.aux_head = self._make_aux_head()
        self.apply(self._init_weights)

    def _make_aux_head(self) -> nn.Linear | None:
        """Token-labeling classifier on every final-stage token (official name `aux_head`)."""
        if not self.token_label or self.num_classes <= 0:
            return None
        return nn.Linear(self.num_features, self.num_classes)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # The official model applies this last, so it also replaces the xavier init that its
        # retention layers set up for themselves.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- timm conventions -------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay besides norms and biases: the layer scales."""
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in ("gamma_1", "gamma_2")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.downsample", (0,)),
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^proj|^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool | Sequence[bool] = True) -> None:
        """Non-reentrant activation checkpointing of every block; a sequence enables it per stage."""
        flags = [enable] * len(self.layers) if isinstance(enable, bool) else list(enable)
        if len(flags) != len(self.layers):
            raise ValueError(
                f"set_grad_checkpointing needs {len(self.layers)} per-stage flags, got {len(flags)}")
        for stage, flag in zip(self.layers, flags, strict=True):
            stage.grad_checkpointing = bool(flag)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        if reset_other:  # drop the projection head too: pre-logits become the last stage's features
            self.proj, self.norm = nn.Identity(), nn.Identity()
            self.head_hidden_size = self.num_features
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = self._make_aux_head()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise InputShapeError(
                f"RMT expects images shaped (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise InputShapeError(
                f"RMT needs image sides divisible by 32 (4 stages, total stride 32), got "
                f"{x.shape[-2]}x{x.shape[-1]}: resize or crop to e.g. "
                f"{max(32, round(x.shape[-2] / 32) * 32)}x{max(32, round(x.shape[-1] / 32) * 32)}")

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stage outputs (before each stage's downsampling), strides 4/8/16/32, NCHW."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        stages = self.layers[: max_index + 1] if stop_early else self.layers
        intermediates = []
        x = self.patch_embed(x)
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x)
            if i in take_indices:
                intermediates.append(x.permute(0, 3, 1, 2) if output_fmt == "NCHW" else x)
            if stage.downsample is not None:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return x.permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        self.layers[-1].downsample = None
        if prune_head or max_index < len(self.feature_info) - 1:
            self.num_features = self.feature_info[max_index]["num_chs"]
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> last stage's features (B, C, H/32, W/32)."""
        self._check_input(x)
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return x.permute(0, 3, 1, 2)

    def _class_logits(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The plain head on NCHW features: (B, classes), or per position (B, classes, H, W) when
        `global_pool=""` (the classifier acts on channels, as timm's un-pooled conv-classifier heads)."""
        x = F.silu(self.norm(self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)))
        if self.global_pool == "avg":
            x = self.head_drop(x.mean(dim=(2, 3)))
            return x if pre_logits else self.head(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """NCHW features -> logits; with the token-labeling head (and pooling) plus 0.5 x the maximum
        over tokens of the aux logits, the official starred models' inference output."""
        logits = self._class_logits(x, pre_logits)
        if pre_logits or self.aux_head is None or self.global_pool != "avg":
            return logits
        return logits + 0.5 * self.aux_head(x.flatten(2).transpose(1, 2)).amax(dim=1)

    def forward_train(self, x: torch.Tensor) -> TokenLabelOutput:
        """Token-labeling training forward (needs `token_label=True`).

        MixToken (when `self.mix_token`): a box drawn as `mix_token_box` on the final-stage grid
        (scaled by 8 onto the stem's stride-4 tokens) takes its stem tokens from the batch-flipped
        samples; the aux logits inside the box are swapped back, so each sample's token logits line
        up with its own label map, while the class target must be mixed by
        `lam = 1 - box area / tokens` (the loss does it). Randomness comes from torch's global RNG.
        """
        if self.aux_head is None:
            raise ValueError("forward_train needs a token-labeling model (token_label=True, num_classes > 0)")
        self._check_input(x)
        x = self.patch_embed(x)
        scale = 2 ** (len(self.layers) - 1)  # stem tokens per final-stage token, per side
        box = (0, 0, 0, 0)
        if self.mix_token and self.training:
            box = mix_token_box(x.shape[1] // scale, x.shape[2] // scale, self.mix_token_beta)
            x = swap_box(x, box, scale)
        for stage in self.layers:
            x = stage(x)
        logits = self._class_logits(x.permute(0, 3, 1, 2))
        aux = swap_box(self.aux_head(x), box, 1)
        return TokenLabelOutput(logits, aux.flatten(1, 2), box)

    def forward(self, x: torch.Tensor) -> torch.Tensor | TokenLabelOutput:
        if self.training and self.aux_head is not None:
            return self.forward_train(x)
        return self.forward_head(self.forward_features(x))


class TokenLabelOutput(NamedTuple):
    """Training output of a token-labeling model, what `TokenLabelCrossEntropy` takes."""

    logits: torch.Tensor  # (B, classes), from the plain head
    aux_logits: torch.Tensor  # (B, h * w, classes): every final-stage token, raster order, un-mixed
    box: tuple[int, int, int, int]  # MixToken box (row0, col0, row1, col1), final-stage grid units


def mix_token_box(grid_h: int, grid_w: int, beta: float = 1.0) -> tuple[int, int, int, int]:
    """The official MixToken box on a (grid_h, grid_w) token grid: lam ~ Beta(beta, beta), a box of
    int(side * sqrt(1 - lam)) per side around a uniform centre, half-sides floored, clipped to the grid.
    Drawn from torch's global RNG (the trainer reseeds it per micro-step, so resume is exact)."""
    lam = torch.distributions.Beta(torch.tensor(float(beta)), torch.tensor(float(beta))).sample().item()
    cut = math.sqrt(1.0 - lam)
    half_h, half_w = int(grid_h * cut) // 2, int(grid_w * cut) // 2
    cy, cx = int(torch.randint(grid_h, ())), int(torch.randint(grid_w, ()))
    return (min(max(cy - half_h, 0), grid_h), min(max(cx - half_w, 0), grid_w),
            min(cy + half_h, grid_h), min(cx + half_w, grid_w))


def swap_box(x: torch.Tensor, box: tuple[int, int, int, int], scale: int) -> torch.Tensor:
    """(B, H, W, C) with the region `box * scale` taken from the batch-flipped tensor (sample b gets
    sample B-1-b's tokens there). Its own inverse: MixToken uses it to mix and to un-mix."""
    r0, c0, r1, c1 = (v * scale for v in box)
    if r0 >= r1 or c0 >= c1:
        return x
    out = x.clone()
    out[:, r0:r1, c0:c1] = x.flip(0)[:, r0:r1, c0:c1]
    return out


# ---- checkpoints --------------------------------------------------------------------------------
def checkpoint_filter_fn(state_dict: dict, model: RMT) -> dict:
    """Official checkpoint layouts -> our state dict: `{'model': ...}`, `{'model_ema': ...}`,
    `{'state_dict': ...}` or a plain dict; `module.` prefixes (DDP/DeepSpeed) are stripped."""
    for key in ("model", "state_dict", "model_ema", "module"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


# ---- registry ------------------------------------------------------------------------------------
def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0", "classifier": "head",
        "license": "unknown", "paper_ids": "arXiv:2309.11523",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "rmt_t.in1k": _cfg(),
    "rmt_s.in1k": _cfg(),
    "rmt_b.in1k": _cfg(),
    "rmt_l.in1k": _cfg(),
    # token labeling (RMT-S*/B*/L*): the official starred evaluation uses crop_pct 0.96
    "rmt_s_tl.in1k": _cfg(crop_pct=0.96),
    "rmt_b_tl.in1k": _cfg(crop_pct=0.96),
    "rmt_l_tl.in1k": _cfg(crop_pct=0.96),
})

# Architectures of the official factories: RMT_T3, RMT_S, RMT_M2 (= RMT-B), RMT_L6 (= RMT-L). The drop
# path rates are the official per-variant defaults (hard-coded in those factories, the token-labeling
# ones included): `timm.create_model(name)` without `drop_path_rate` uses them (`default_drop_path`).
MODEL_ARGS: dict[str, dict] = {
    "rmt_t": dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16),
                  heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3), decomposed=(True, True, False, False),
                  drop_path_rate=0.1),
    "rmt_s": dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(4, 4, 8, 16),
                  heads_ranges=(4, 4, 6, 6), mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False),
                  drop_path_rate=0.15),
    "rmt_b": dict(embed_dims=(80, 160, 320, 512), depths=(4, 8, 25, 8), num_heads=(5, 5, 10, 16),
                  heads_ranges=(5, 5, 6, 6), mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False),
                  layer_scale=(False, False, True, True), drop_path_rate=0.4),
    "rmt_l": dict(embed_dims=(112, 224, 448, 640), depths=(4, 8, 25, 8), num_heads=(7, 7, 14, 20),
                  heads_ranges=(6, 6, 6, 6), mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False),
                  layer_scale=(False, False, True, True), drop_path_rate=0.5),
}
# The token-labeling models (official `classification_token_label_release/RMT.py`, `token_label=True`):
# separate names because their weights and eval crop differ, as timm names its variants.
MODEL_ARGS.update({f"{name}_tl": {**MODEL_ARGS[name], "token_label": True}
                   for name in ("rmt_s", "rmt_b", "rmt_l")})


def default_drop_path(name: str) -> float:
    """The official drop path rate of a registered RMT variant (0.1 / 0.15 / 0.4 / 0.5 for T/S/B/L)."""
    if name not in MODEL_ARGS:
        raise ValueError(f"unknown RMT model {name!r}: choose one of {sorted(MODEL_ARGS)}")
    return MODEL_ARGS[name]["drop_path_rate"]


def _create_rmt(variant: str, pretrained: bool = False, **kwargs) -> RMT:
    args = {**MODEL_ARGS[variant], **kwargs}
    return build_model_with_cfg(
        RMT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **args,
    )


@register_model
def rmt_t(pretrained: bool = False, **kwargs) -> RMT:
    return _create_rmt("rmt_t", pretrained, **kwargs)


@register_model
def rmt_s(pretrained: bool = False, **kwargs) -> RMT:
    return _create_rmt("rmt_s", pretrained, **kwargs)


@register_model
def rmt_b(pretrained: bool = False, **kwargs) -> RMT:
    return _create_rmt("rmt_b", pretrained, **kwargs)


@register_model
def rmt_l(pretrained: bool = False, **kwargs) -> RMT:
    return _create_rmt("rmt_l", pretrained, **kwargs)


@register_model
def rmt_s_tl(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-S* (token labeling)."""
    return _create_rmt("rmt_s_tl", pretrained, **kwargs)


@register_model
def rmt_b_tl(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-B* (token labeling)."""
    return _create_rmt("rmt_b_tl", pretrained, **kwargs)


@register_model
def rmt_l_tl(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-L* (token labeling)."""
    return _create_rmt("rmt_l_tl", pretrained, **kwargs)
