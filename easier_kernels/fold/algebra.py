"""The weight algebra of folding: small pure functions, one piece of math each, in the style of
torch/nn/utils/fusion.py (whose `fuse_conv_bn_*` fold batch norm; they are not written again).

    w, b, g = compose_conv(w1, b1, w2, b2, stride1=2)    # conv2(conv1(x)) as one conv, stride s1*s2
    w, b = add_identity(w, b, padding=(1, 1))            # conv(x) + x as one conv
    w, b = compose_linear(w1, b1, w2, b2)                # linear2(linear1(x)) as one linear
    merged, exact = merged_layer([conv1, conv2])         # the layers as one module
    pair = unpad_pointwise(conv1, conv2)                 # a padded 1x1 conv's border carried into conv2

Convolutions composed here have no padding between them: the chain's padding sits on its first
conv (see `ek.linearize`), so the intermediate map is never zero-padded and composing is exact.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import skip_init  # every weight is assigned: no random init, no RNG drawn

__all__ = ["CONVS", "LAYERS", "exactly", "conv1d_as_linear", "linear_as_conv1d",
           "dense_weight", "compose_conv", "add_identity", "without_identity", "compose_linear", "foldable_conv", "merged_layer", "merged_padding", "identity_fits",
           "unpad_pointwise"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# The layers folding acts on, by exact type: a subclass may compute something else with the same
# attributes (timm's StdConv2d standardizes its weight, Conv2dSame pads at run time with
# padding 0), so composing its weights, folding a batch norm in or moving its padding would be
# silently wrong. Subclasses are opaque modules.
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYERS = (*CONVS, nn.Linear)


def exactly(module, types) -> bool:
    """Whether `module` is one of `types` itself, not a subclass (whose forward may differ)."""
    return type(module) in (types if isinstance(types, tuple) else (types,))


def conv1d_as_linear(conv1d: nn.Module) -> nn.Linear:
    """transformers' Conv1D as the nn.Linear it is: the weight transposed, the bias kept."""
    weight = conv1d.weight.detach()
    linear = skip_init(nn.Linear, weight.shape[0], weight.shape[1], bias=conv1d.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    _assign(linear, weight.t(), None if conv1d.bias is None else conv1d.bias.detach())
    linear.requires_grad_(conv1d.weight.requires_grad)
    return linear


def linear_as_conv1d(linear: nn.Linear, conv1d_class: type) -> nn.Module:
    """An nn.Linear as transformers' Conv1D (`conv1d_class`, the class itself: no import here):
    the inverse of `conv1d_as_linear`, so that a written-back GPT-2 keeps its layer types."""
    conv1d = conv1d_class(linear.out_features, linear.in_features)
    conv1d.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        conv1d.weight.copy_(linear.weight.detach().t())
        if linear.bias is None:
            conv1d.bias = None
        else:
            conv1d.bias.copy_(linear.bias.detach())
    return conv1d


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
        mixed = _compose_with_depthwise(w1, w2, stride1, groups1, groups2)
        if mixed is not None:  # a depthwise kernel with a dense one: no dense copy of the depthwise one
            return mixed, _composed_bias(w2, groups2, b1, b2), 1
        w1, w2, groups1, groups2 = dense_weight(w1, groups1), dense_weight(w2, groups2), 1, 1
    groups = groups1
    k2 = w2.shape[2:]
    # Per group j: W[o, i] = sum_m W2[o, m] (*) W1[m, i]. As one grouped conv: the "images" are W1's
    # input channels (batch I/g), its output channels the image channels; W2 flipped is the filter.
    images = w1.transpose(0, 1)  # [I/g, O1, *k1]
    padding = [s * (k - 1) for s, k in zip(stride1, k2)]
    weight = _CONV[dims](images, w2.flip(list(range(2, 2 + dims))), padding=padding, dilation=stride1, groups=groups)
    weight = weight.transpose(0, 1).contiguous()  # [O2, I/g, *K]
    return weight, _composed_bias(w2, groups, b1, b2), groups


def _composed_bias(w2: torch.Tensor, groups2: int, b1: torch.Tensor | None, b2: torch.Tensor | None) -> torch.Tensor | None:
    """b[o] = b2[o] + sum_{m in o's group, taps} W2[o, m, taps] * b1[m]."""
    if b1 is None:
        return b2
    w2_sums = w2.flatten(2).sum(-1).view(groups2, -1, w2.shape[1])  # [g, O2/g, O1/g]
    bias = (w2_sums @ b1.view(groups2, -1, 1)).flatten()
    return bias if b2 is None else bias + b2


def _compose_with_depthwise(w1, w2, stride1: tuple, groups1: int, groups2: int) -> torch.Tensor | None:
    """The dense weight of conv2(conv1(x)) where one conv is depthwise (one input channel per
    group, as many groups as channels) and the other dense, computed per channel (a depthwise
    kernel made dense first would cost channels times more: minutes for Xception's 728 channels).
    None for other groupings."""
    dims = w1.dim() - 2
    spatial = list(range(2, 2 + dims))
    channels = w1.shape[0]
    if groups1 == 1 and groups2 == channels and w2.shape[:2] == (channels, 1):
        # W[m, i] = W2[m] dilated by s1 (*) W1[m, i]: W1's inputs as the batch, one group per channel
        padding = [s * (k - 1) for s, k in zip(stride1, w2.shape[2:])]
        weight = _CONV[dims](w1.transpose(0, 1), w2.flip(spatial), padding=padding, dilation=stride1, groups=channels)
        return weight.transpose(0, 1).contiguous()
    if groups2 == 1 and groups1 == channels and w1.shape[1] == 1:
        # W[o, m] = W2[o, m] dilated by s1 (*) W1[m]: W2's outputs as the batch, one group per channel
        dilated = w2.new_zeros(*w2.shape[:2], *[s * (k - 1) + 1 for s, k in zip(stride1, w2.shape[2:])])
        dilated[(..., *[slice(None, None, s) for s in stride1])] = w2
        padding = [k - 1 for k in w1.shape[2:]]
        return _CONV[dims](dilated, w1.flip(spatial), padding=padding, groups=channels).contiguous()
    return None


def add_identity(weight: torch.Tensor, bias: torch.Tensor | None, *, padding, groups: int = 1,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """conv(x) + x as one conv (stride 1, as many output as input channels): the identity is a 1 at
    tap `padding` of each channel's own kernel, the tap that reads x at the output's position.
    scale=-1 takes an identity added before out again."""
    out_channels, in_per_group = weight.shape[:2]
    dims = weight.dim() - 2
    padding = (padding,) * dims if isinstance(padding, int) else tuple(padding)
    if out_channels != in_per_group * groups:
        raise ValueError(f"an identity skip needs as many output as input channels, not {out_channels} and {in_per_group * groups}")
    if any(not 0 <= p < k for p, k in zip(padding, weight.shape[2:])):
        raise ValueError(f"padding {padding} puts the identity outside the kernel {tuple(weight.shape[2:])}")
    weight = weight.clone()
    channels = torch.arange(out_channels)
    weight[(channels, channels % in_per_group, *padding)] += scale
    return weight, bias


def compose_linear(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """linear2(linear1(x)) as one linear: W = W2 W1, b = W2 b1 + b2."""
    weight = w2 @ w1
    if b1 is None:
        return weight, b2
    bias = w2 @ b1
    return weight, bias if b2 is None else bias + b2


def without_identity(merged: nn.Module) -> nn.Module:
    """A copy of a merged layer that absorbed an identity skip (`merged_layer(..., identity=True)`),
    computing the chain alone again: layer(x) - x."""
    layer = copy.deepcopy(merged)
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            layer.weight.sub_(torch.eye(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device))
        else:
            weight, _ = add_identity(layer.weight, None, padding=layer.padding, groups=layer.groups, scale=-1.0)
            layer.weight.copy_(weight)
    return layer


def foldable_conv(conv: nn.Module) -> bool:
    """A conv the weight algebra can compose and move padding through: zero padding given as
    numbers, no dilation."""
    return (exactly(conv, CONVS) and isinstance(conv.padding, tuple)
            and conv.padding_mode == "zeros" and all(d == 1 for d in conv.dilation))


def merged_layer(layers: list[nn.Module], identity: bool = False) -> tuple[nn.Module, bool]:
    """The layers as one (conv or linear), and whether that is exact: for convs, only when every
    conv after the first has no padding (a plan that merges them moved it onto the first). `identity`
    adds the skip `+ x` into the weights. Composed in float64, stored in the layers' dtype."""
    first = layers[0]
    dtype = first.weight.dtype
    double = lambda t: None if t is None else t.detach().double()  # noqa: E731
    w, b = double(first.weight), double(first.bias)
    if isinstance(first, nn.Linear):
        for layer in layers[1:]:
            w, b = compose_linear(w, b, double(layer.weight), double(layer.bias))
        if identity:
            w = w + torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        merged = skip_init(nn.Linear, w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=dtype)
        _assign(merged, w, b)
        return merged, True
    groups, stride = first.groups, first.stride
    for conv in layers[1:]:
        w, b, groups = compose_conv(w, b, double(conv.weight), double(conv.bias), stride1=stride, groups1=groups,
                                    groups2=conv.groups)
        stride = tuple(s * t for s, t in zip(stride, conv.stride))
    padding = merged_padding(layers)
    if identity:
        w, b = add_identity(w, b, padding=padding, groups=groups)
    exact = all(not any(c.padding) for c in layers[1:])
    merged = skip_init(type(first), w.shape[1] * groups, w.shape[0], w.shape[2:], stride=stride, padding=padding, groups=groups,
                         bias=b is not None, device=w.device, dtype=dtype)
    _assign(merged, w, b)
    return merged, exact


def merged_padding(convs: list[nn.Module]) -> tuple:
    """The padding of the convs composed into one: p1 + s1 p2 + s1 s2 p3 + ... per dim (the input
    padding under which every conv after the first reads only real data)."""
    padding, stride = tuple(convs[0].padding), tuple(convs[0].stride)
    for conv in convs[1:]:
        padding = tuple(p + s * q for p, s, q in zip(padding, stride, conv.padding))
        stride = tuple(s * t for s, t in zip(stride, conv.stride))
    return padding


def _assign(layer: nn.Module, w, b) -> None:
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)


def identity_fits(merged: nn.Module) -> bool:
    """`x + chain(x)` folds into the merged conv's kernel: stride 1, same channels and size."""
    if isinstance(merged, nn.Linear):
        return merged.in_features == merged.out_features
    return (all(s == 1 for s in merged.stride) and merged.in_channels == merged.out_channels
            and all(2 * p == k - 1 for p, k in zip(merged.padding, merged.kernel_size)))


def unpad_pointwise(first: nn.Module, second: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """A padded 1x1 conv before an unpadded conv, as an unpadded 1x1 conv without bias and a padded
    second conv, or None where that does not apply. Exact: where a 1x1 conv reads its zero
    padding it outputs its bias b1 alone, so its output is pad(conv(x) - b1) + b1; the second conv
    then sees b1 everywhere plus the zero-padded rest, which is its own zero padding with
    sum(W2) . b1 added to its bias. The first conv no longer computes the padded border (the
    cost a padding move put on it)."""
    if not (exactly(first, CONVS) and type(first) is type(second)):
        return None
    if (any(k != 1 for k in first.kernel_size) or not any(first.padding) or any(second.padding)
            or isinstance(first.padding, str) or first.padding_mode != "zeros" or second.padding_mode != "zeros"
            or any(p % s for p, s in zip(first.padding, first.stride))):
        return None
    unpadded = skip_init(type(first), first.in_channels, first.out_channels, 1, stride=first.stride, groups=first.groups,
                           bias=False, device=first.weight.device, dtype=first.weight.dtype)
    padded = skip_init(type(second), second.in_channels, second.out_channels, second.kernel_size, stride=second.stride,
                          padding=tuple(p // s for p, s in zip(first.padding, first.stride)), groups=second.groups,
                          bias=True, device=second.weight.device, dtype=second.weight.dtype)
    bias = second.bias.detach() if second.bias is not None else second.weight.new_zeros(second.out_channels)
    if first.bias is not None:
        b1 = first.bias.detach().double()
        w2_sums = second.weight.detach().double().flatten(2).sum(-1).view(second.groups, -1, second.weight.shape[1])
        bias = bias + (w2_sums @ b1.view(second.groups, -1, 1)).flatten().to(bias.dtype)
    _assign(unpadded, first.weight, None)
    _assign(padded, second.weight, bias)
    return unpadded, padded
