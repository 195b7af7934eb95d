"""The `reference` backend: plain torch, the oracle every other backend is tested against."""

from __future__ import annotations

import torch

from . import kinds


def reduce_dims(x: torch.Tensor, channel_dim: int) -> list[int]:
    """Every dim but the channel dim: what a per-channel count sums over."""
    dim = channel_dim % x.dim()
    return [d for d in range(x.dim()) if d != dim]


def count_on(x, counts, nan_counts, channel_dim):
    dims = reduce_dims(x, channel_dim)
    counts += (x >= 0).sum(dims, dtype=torch.int64) if dims else (x >= 0).long()
    nan_counts += torch.isnan(x).sum(dims, dtype=torch.int64) if dims else torch.isnan(x).long()


def act_count(x, counts, nan_counts, channel_dim, kind, param):
    count_on(x, counts, nan_counts, channel_dim)
    return kinds.forward(x, kind, param)
