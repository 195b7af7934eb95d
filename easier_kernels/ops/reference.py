"""The `reference` backend: plain torch, the oracle every other backend is tested against.
Activations are torch's, with the special-value rule imposed at NaN and +-inf (kinds.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kinds


def reduce_dims(x: torch.Tensor, channel_dim: int) -> list[int]:
    """Every dim but the channel dim: what a per-channel count sums over."""
    dim = channel_dim % x.dim()
    return [d for d in range(x.dim()) if d != dim]


def count_on(x, counts, nan_counts, channel_dim):
    dims = reduce_dims(x, channel_dim)
    counts += (x >= 0).sum(dims, dtype=torch.int64) if dims else (x >= 0).long()
    nan_counts += torch.isnan(x).sum(dims, dtype=torch.int64) if dims else torch.isnan(x).long()


def act_count(x, counts, nan_counts, kind, channel_dim, param):
    count_on(x, counts, nan_counts, channel_dim)
    return activation(x, kind, param)


def activation(x, kind, param):
    return kinds.with_special_rule(x, kinds.forward(x, kind, param), kind, param)


def conv_block(x, w1, b1, w2, b2, residual, pattern, stride, padding, kind, param):
    """Two separate convolutions (kernel layouts: pointwise [O, I], depthwise [C, kh, kw])."""
    pointwise = lambda t, w, b: F.conv2d(t, w[:, :, None, None], b)  # noqa: E731
    depthwise = lambda t, w, b: F.conv2d(t, w[:, None], b, stride=stride, padding=padding, groups=w.shape[0])  # noqa: E731
    first, second = (pointwise, depthwise) if pattern == "pw_dw" else (depthwise, pointwise)
    out = second(first(x, w1, b1), w2, b2)
    if residual is not None:
        out = out + residual
    return activation(out, kind, param)
