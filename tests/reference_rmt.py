"""MaSA written straight from the paper's formulas: the reference the fast path is tested against,
and the "straightforward" baseline of `make bench-model` (explicit softmax(QK^T + log D) V, with the
decay masks and rotary terms rebuilt at every call, the way the official code computes them).

`use_reference(model)` swaps every MaSA layer of an RMT model to this path, weights unchanged.
"""

from __future__ import annotations

import math

import torch

from pipeline.models.rmt import ManhattanSelfAttention, RetentionPositions


def log_gamma(positions: RetentionPositions, num_heads: int) -> torch.Tensor:
    """log of each head's decay rate: gamma_n = 1 - 2^-(init + range * n / heads)."""
    n = torch.arange(num_heads, dtype=torch.float64)
    gamma = 1 - 2.0 ** (-positions.initial_value - positions.heads_range * n / num_heads)
    return torch.log(gamma)


def rotate(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Rotary shift of channel pairs (x_2i, x_2i+1) by theta_i * p, p the raster index h * W + w."""
    d = x.shape[-1]
    freq = 1.0 / 10000 ** torch.linspace(0, 1, d // 2, dtype=torch.float64)
    p = torch.arange(height * width, dtype=torch.float64).reshape(height, width, 1, 1)
    theta = (p * freq).to(x.dtype)  # (H, W, 1, d/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * theta.cos() - odd * theta.sin()
    out[..., 1::2] = odd * theta.cos() + even * theta.sin()
    return out


def _attention(q, k, v, log_decay):
    """softmax(q k^T / sqrt(d) + log_decay) v, with everything materialised."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + log_decay
    return torch.softmax(scores, dim=-1) @ v


def reference_attend(module: ManhattanSelfAttention, q, k, v, positions: RetentionPositions):
    """Same contract as `ManhattanSelfAttention.attend`: (B, H, W, heads, d) in and out."""
    b, h, w, n, d = q.shape
    lg = log_gamma(positions, n).to(q.dtype).view(n, 1, 1)
    q, k = rotate(q, h, w), rotate(k, h, w)
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    if not module.decomposed:
        manhattan = (rows[:, None] - rows[None]).abs() + (cols[:, None] - cols[None]).abs()
        q, k, v = (t.permute(0, 3, 1, 2, 4).reshape(b, n, h * w, d) for t in (q, k, v))
        out = _attention(q, k, v, lg * manhattan.to(q.dtype))
        return out.reshape(b, n, h, w, d).permute(0, 2, 3, 1, 4)
    dist_w = (torch.arange(w)[:, None] - torch.arange(w)[None]).abs().to(q.dtype)
    dist_h = (torch.arange(h)[:, None] - torch.arange(h)[None]).abs().to(q.dtype)
    # along each row (W), then along each column (H)
    q_, k_, v_ = (t.permute(0, 1, 3, 2, 4) for t in (q, k, v))  # (B, H, heads, W, d)
    v = _attention(q_, k_, v_, lg * dist_w)
    q_, k_ = (t.permute(0, 2, 3, 1, 4) for t in (q, k))  # (B, W, heads, H, d)
    out = _attention(q_, k_, v.permute(0, 3, 2, 1, 4), lg * dist_h)
    return out.permute(0, 3, 1, 2, 4)


def use_reference(model: torch.nn.Module) -> torch.nn.Module:
    """Route every MaSA layer of `model` through `reference_attend` (in place; returns the model)."""
    for m in model.modules():
        if isinstance(m, ManhattanSelfAttention):
            m.attend = lambda q, k, v, positions, _m=m: reference_attend(_m, q, k, v, positions)
    return model
