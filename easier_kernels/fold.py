"""The weight algebra of folding (DESIGN.md, "Folding: the math and the traps"): small pure
functions, one piece of math each, in the style of torch/nn/utils/fusion.py (whose
`fuse_conv_bn_weights` / `fuse_linear_bn_weights` fold batch norm; they are not written again).

    w, b = compose_conv(w1, b1, w2, b2, stride1=2)       # conv2(conv1(x)) as one conv, stride s1*s2
    w, b = add_identity(w, b, padding=(1, 1))            # conv(x) + x as one conv
    w, b = compose_linear(w1, b1, w2, b2)                # linear2(linear1(x)) as one linear

Convolutions here have no padding between them: `ek.linearize(exact_fold=True)` moves a chain's
padding onto its first conv, so that the intermediate map is never zero-padded and composing the
kernels is exact. The graph pass that finds the chains and decides per chain whether to merge is
built on these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dense_weight", "compose_conv", "add_identity", "compose_linear"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def dense_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv weight [O, I/g, *k] as the dense one [O, I, *k] (zero outside the groups)."""
    if groups == 1:
        return weight
    out_channels, in_per_group = weight.shape[:2]
    dense = weight.new_zeros(out_channels, in_per_group * groups, *weight.shape[2:])
    out_per_group = out_channels // groups
    for g in range(groups):
        rows, cols = slice(g * out_per_group, (g + 1) * out_per_group), slice(g * in_per_group, (g + 1) * in_per_group)
        dense[rows, cols] = weight[rows]
    return dense


def compose_conv(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None, *,
                 stride1=1, groups1: int = 1, groups2: int = 1) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """conv2(conv1(x)) as one conv: returns (weight, bias, groups).

    Kernel k1 + s1 * (k2 - 1) per dim: W[o, i] = sum_m W2[o, m] (*) W1[m, i], the full convolution of
    the kernels, with W2 dilated by conv1's stride s1; the merged conv has stride s1 * s2. Bias
    b2 + sum(W2) . b1. Equal groups whose channels line up (depthwise then depthwise) stay grouped;
    otherwise both become dense first (a depthwise kernel merged with a dense one is dense).
    """
    dims = w1.dim() - 2
    stride1 = (stride1,) * dims if isinstance(stride1, int) else tuple(stride1)
    if w2.shape[1] * groups2 != w1.shape[0]:
        raise ValueError(f"conv2 reads {w2.shape[1] * groups2} channels but conv1 writes {w1.shape[0]}")
    if groups1 != groups2:
        w1, w2, groups1, groups2 = dense_weight(w1, groups1), dense_weight(w2, groups2), 1, 1
    groups = groups1
    k2 = w2.shape[2:]
    # Per group j: W[o, i] = sum_m W2[o, m] (*) W1[m, i]. As one grouped conv: the "images" are W1's
    # input channels (batch I/g), its output channels the image channels; W2 flipped is the filter.
    images = w1.transpose(0, 1)  # [I/g, O1, *k1]
    padding = [s * (k - 1) for s, k in zip(stride1, k2)]
    weight = _CONV[dims](images, w2.flip(list(range(2, 2 + dims))), padding=padding, dilation=stride1, groups=groups)
    weight = weight.transpose(0, 1).contiguous()  # [O2, I/g, *K]
    if b1 is None:
        return weight, b2, groups
    # b[o] = b2[o] + sum_{m in o's group, taps} W2[o, m, taps] * b1[m]
    w2_sums = w2.flatten(2).sum(-1).view(groups, -1, w2.shape[1])  # [g, O2/g, O1/g]
    bias = (w2_sums @ b1.view(groups, -1, 1)).flatten()
    return weight, bias if b2 is None else bias + b2, groups


def add_identity(weight: torch.Tensor, bias: torch.Tensor | None, *, padding, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """conv(x) + x as one conv (stride 1, as many output as input channels): the identity is a 1 at
    tap `padding` of each channel's own kernel, the tap that reads x at the output's position."""
    out_channels, in_per_group = weight.shape[:2]
    dims = weight.dim() - 2
    padding = (padding,) * dims if isinstance(padding, int) else tuple(padding)
    if out_channels != in_per_group * groups:
        raise ValueError(f"an identity skip needs as many output as input channels, not {out_channels} and {in_per_group * groups}")
    if any(not 0 <= p < k for p, k in zip(padding, weight.shape[2:])):
        raise ValueError(f"padding {padding} puts the identity outside the kernel {tuple(weight.shape[2:])}")
    weight = weight.clone()
    channels = torch.arange(out_channels)
    weight[(channels, channels % in_per_group, *padding)] += 1
    return weight, bias


def compose_linear(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """linear2(linear1(x)) as one linear: W = W2 W1, b = W2 b1 + b2."""
    weight = w2 @ w1
    if b1 is None:
        return weight, b2
    bias = w2 @ b1
    return weight, bias if b2 is None else bias + b2
