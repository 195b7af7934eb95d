"""How a kernel walks a tensor: as a dense buffer [outer, C, inner] around the channel dim.

Any tensor whose elements fill its memory without gaps (contiguous, channels_last, a permuted
view such as tokens `[N, L, C]`) maps onto that shape with no copy: sort its dims by stride and
the dims before the channel form `outer`, those after it `inner`. Anything else (slices with
gaps, broadcast views) is the slow path: copied to contiguous first.
"""

from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=4096)
def _dense_shape(sizes: tuple, strides: tuple, dim: int):
    """(outer, C, inner) when the layout is dense, else None."""
    dims = [i for i, s in enumerate(sizes) if s != 1]
    order = sorted(dims, key=lambda i: -strides[i])
    expected = 1
    for i in reversed(order):
        if strides[i] != expected:
            return None
        expected *= sizes[i]
    if sizes[dim] == 1:  # a single channel: every element counts for it
        return math.prod(sizes), 1, 1
    pos = order.index(dim)
    outer = math.prod(sizes[i] for i in order[:pos])
    inner = math.prod(sizes[i] for i in order[pos + 1 :])
    return outer, sizes[dim], inner


def dense_view(x: torch.Tensor, channel_dim: int):
    """Return (tensor, outer, C, inner) with tensor's memory a dense [outer, C, inner] buffer."""
    dim = channel_dim % x.dim()
    if x.numel() == 0:
        return x, 0, x.shape[dim], 0
    shape = _dense_shape(tuple(x.shape), tuple(x.stride()), dim)
    if shape is None:  # slow path: gaps or overlaps in memory
        x = x.contiguous()
        shape = _dense_shape(tuple(x.shape), tuple(x.stride()), dim)
    return (x, *shape)
