"""The fused pointwise/depthwise block (`ek.ops.conv_block`) as a module, and its lowering to
standard torch modules (for runtimes that cannot run our op, and for export).

    block = fused_block(pw_conv, dw_conv, ("relu", {}))  # FusedConvBlock: one kernel, intermediate in cache
    lower_fused(gm)                                     # every FusedConvBlock -> StandardConvBlock
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import skip_init  # every weight is assigned: no random init, no RNG drawn

from .. import ops
from .algebra import exactly, foldable_conv

__all__ = ["FusedConvBlock", "StandardConvBlock", "fused_pattern", "fused_block", "lower_fused"]


class FusedConvBlock(nn.Module):
    """A pointwise/depthwise conv pair run by the fused `ek.ops.conv_block` kernel, with the
    residual add and the next activation in its epilogue. Weights are conv-shaped buffers."""

    def __init__(self, pattern: str, w1, b1, w2, b2, stride, padding, activation: str = "identity", kind_args=None):
        super().__init__()
        self.pattern, self.stride, self.padding = pattern, tuple(stride), tuple(padding)
        self.activation, self.kind_args = activation, dict(kind_args or {})
        for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
            self.register_buffer(name, t.detach().clone().contiguous())

    def forward(self, x, residual=None):
        return ops.conv_block(x, self.w1, self.b1, self.w2, self.b2, pattern=self.pattern, stride=self.stride,
                              padding=self.padding, residual=residual, activation=self.activation, **self.kind_args)

    def extra_repr(self) -> str:
        return (f"{self.pattern}, {self.w1.shape[1] if self.pattern == 'pw_dw' else self.w1.shape[0]} -> {self.w2.shape[0]}, "
                f"kernel={tuple((self.w2 if self.pattern == 'pw_dw' else self.w1).shape[2:])}, stride={self.stride}, "
                f"padding={self.padding}, activation={self.activation}")

    def standard(self) -> "StandardConvBlock":
        """The same computation in standard torch modules (two convs, the add, the activation)."""
        return StandardConvBlock(self)


class StandardConvBlock(nn.Module):
    """A FusedConvBlock lowered to nn.Conv2d modules: conv2(conv1(x)) (+ residual), activation."""

    def __init__(self, block: FusedConvBlock):
        super().__init__()
        pw_dw = block.pattern == "pw_dw"
        w1, w2 = block.w1, block.w2
        dw = w2 if pw_dw else w1
        channels = dw.shape[0]
        self.conv1 = skip_init(nn.Conv2d, w1.shape[1] * (1 if pw_dw else channels), w1.shape[0], w1.shape[2:],
                               stride=1 if pw_dw else block.stride, padding=0 if pw_dw else block.padding,
                               groups=1 if pw_dw else channels, device=w1.device, dtype=w1.dtype)
        self.conv2 = skip_init(nn.Conv2d, w2.shape[0] if pw_dw else w2.shape[1], w2.shape[0], w2.shape[2:],
                               stride=block.stride if pw_dw else 1, padding=block.padding if pw_dw else 0,
                               groups=channels if pw_dw else 1, device=w2.device, dtype=w2.dtype)
        with torch.no_grad():
            for conv, w, b in ((self.conv1, w1, block.b1), (self.conv2, w2, block.b2)):
                conv.weight.copy_(w)
                conv.bias.copy_(b)
        self.activation, self.kind_args = block.activation, dict(block.kind_args)

    def forward(self, x, residual=None):
        out = self.conv2(self.conv1(x))
        if residual is not None:
            out = out + residual
        if self.activation == "identity":
            return out
        return ops.kinds.forward(out, *ops.kinds.resolve(self.activation, self.kind_args))


def _pointwise(conv, padded: bool = False) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
            and (padded or conv.padding == (0, 0)))


def _depthwise(conv) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels


def fused_pattern(first: nn.Module, second: nn.Module) -> str | None:
    """'pw_dw' / 'dw_pw' when the pair of 2-D convs is one the fused kernel runs, else None. A
    padded pointwise conv before an unpadded depthwise one (a pw -> dw pair whose padding was
    moved for a merge) runs too (see `fused_block`)."""
    if not all(exactly(c, nn.Conv2d) and foldable_conv(c) for c in (first, second)):
        return None
    if _pointwise(first, padded=not any(second.padding)) and _depthwise(second):
        return "pw_dw"
    if _depthwise(first) and _pointwise(second):
        return "dw_pw"
    return None


def fused_block(first: nn.Conv2d, second: nn.Conv2d, act_spec=None) -> FusedConvBlock:
    pattern = fused_pattern(first, second)
    b1, b2 = (c.bias if c.bias is not None else c.weight.new_zeros(c.out_channels) for c in (first, second))
    dw = second if pattern == "pw_dw" else first
    padding = dw.padding
    if pattern == "pw_dw" and any(first.padding):
        # The padding sits on the pointwise conv, so the intermediate's border holds b1, not 0:
        # zero-pad instead and carry b1 through the depthwise taps into b2 (exact).
        padding = first.padding
        b2 = b2 + b1 * second.weight.sum((1, 2, 3))
        b1 = torch.zeros_like(b1)
    kind, kind_args = act_spec if act_spec else ("identity", {})
    return FusedConvBlock(pattern, first.weight, b1, second.weight, b2, dw.stride, padding, kind, kind_args)


def lower_fused(model: nn.Module) -> int:
    """Replaces every FusedConvBlock in `model` by its StandardConvBlock (in place); returns how many."""
    lowered = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedConvBlock):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.standard())
            lowered += 1
    return lowered
