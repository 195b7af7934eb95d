"""`conv_block`: two convolutions with batch norm folded in, computed in one kernel without writing
the intermediate map to memory, with bias, residual add and activation in the epilogue.

    y = ek.ops.conv_block(x, w_pw, b_pw, w_dw, b_dw, pattern="pw_dw", stride=2, padding=1,
                          residual=None, activation="relu6")
    # == relu6(conv2d(conv2d(x, w_pw, b_pw), w_dw, b_dw, stride=2, padding=1, groups=C) + residual)

Patterns (2-D, NCHW, dilation 1): "pw_dw" is a pointwise 1x1 conv (w1 [Cmid, Cin, 1, 1]) then a
depthwise one (w2 [Cmid, 1, kh, kw], the stride and the zero padding of the intermediate map);
"dw_pw" is a depthwise conv on x (w1 [Cin, 1, kh, kw], the stride and padding) then a pointwise
one (w2 [Cout, Cin, 1, 1]). These are the chains that merging into one conv makes more expensive
(a pointwise-then-depthwise pair merged is a dense kxk conv with ~k*k times the work). `ek.fold`
times this op against the separate convolutions and keeps whichever is faster.

Registered as `easier_kernels::conv_block` (csrc/library.cpp, fake kernel in library.py), so
torch.compile and export see it; the backend (reference / cpp / triton / cuda) is chosen in
`backends.py`. Inference only:
there is no gradient.
"""

from __future__ import annotations

import torch

from . import kinds, library
from .backends import kernels_for

__all__ = ["conv_block", "PATTERNS", "output_size"]

PATTERNS = ("pw_dw", "dw_pw")

output_size = library.output_size


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"conv_block: {name} must be an int or a pair of ints, got {value!r}")
    return pair


def _shape_error(what: str, got, expected: str) -> ValueError:
    return ValueError(f"conv_block: {what} has shape {tuple(got.shape)}, expected {expected}")


def _check(x, w1, b1, w2, b2, residual, pattern, stride, padding):
    """Kernel-layout weights (pointwise [O, I], depthwise [C, kh, kw]) and biases, after clear checks."""
    if pattern not in PATTERNS:
        raise ValueError(f"conv_block: pattern must be one of {', '.join(PATTERNS)}, not {pattern!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"conv_block: x must be a 4-D [N, C, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not x.is_floating_point():
        raise TypeError(f"conv_block: x must be a floating-point tensor, got {x.dtype}; convert it with x.float()")
    pw, dw = (w1, w2) if pattern == "pw_dw" else (w2, w1)
    if pw.dim() != 4 or pw.shape[2:] != (1, 1):
        raise _shape_error("the pointwise weight", pw, "[O, I, 1, 1]")
    if dw.dim() != 4 or dw.shape[1] != 1:
        raise _shape_error("the depthwise weight", dw, "[C, 1, kh, kw]")
    channels = x.shape[1]
    if pattern == "pw_dw":
        if pw.shape[1] != channels or dw.shape[0] != pw.shape[0]:
            raise ValueError(f"conv_block pw_dw: x has {channels} channels, the pointwise weight reads {pw.shape[1]} and writes "
                             f"{pw.shape[0]}, the depthwise one has {dw.shape[0]}; they must chain")
    elif dw.shape[0] != channels or pw.shape[1] != channels:
        raise ValueError(f"conv_block dw_pw: x has {channels} channels, the depthwise weight {dw.shape[0]}, the pointwise one "
                         f"reads {pw.shape[1]}; they must all be equal")
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"conv_block: stride must be >= 1 and padding >= 0, got {stride} and {padding}")
    sizes = [output_size(s, k, st, p) for s, k, st, p in zip(x.shape[2:], dw.shape[2:], stride, padding)]
    if min(sizes) < 1:
        raise ValueError(f"conv_block: a {tuple(dw.shape[2:])} kernel does not fit the {tuple(x.shape[2:])} input "
                         f"with padding {padding}")
    biases = []
    for name, bias, weight in (("b1", b1, w1), ("b2", b2, w2)):
        if bias is None:
            bias = weight.new_zeros(weight.shape[0])
        elif bias.shape != (weight.shape[0],):
            raise _shape_error(name, bias, f"[{weight.shape[0]}]")
        biases.append(bias.contiguous())
    tensors = [x, w1, w2, *biases] + ([residual] if residual is not None else [])
    if any(t.dtype != x.dtype or t.device != x.device for t in tensors):
        raise ValueError("conv_block: x, weights, biases and residual must share one dtype and device; got "
                         + ", ".join(f"{t.dtype} on {t.device}" for t in tensors))
    out_shape = (x.shape[0], w2.shape[0], *sizes)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise _shape_error("residual", residual, f"the output's {list(out_shape)}")
    flat_pw = pw.reshape(pw.shape[:2]).contiguous()
    flat_dw = dw.reshape(dw.shape[0], *dw.shape[2:]).contiguous()
    k1, k2 = (flat_pw, flat_dw) if pattern == "pw_dw" else (flat_dw, flat_pw)
    return k1, biases[0], k2, biases[1], stride, padding


def conv_block(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None, *,
               pattern: str, stride=1, padding=0, residual: torch.Tensor | None = None, activation: str = "identity",
               **kind_args) -> torch.Tensor:
    """activation(conv2(conv1(x) + b1) + b2 + residual) in one kernel; conv-shaped weights (see the
    module docstring for the patterns). stride and padding belong to the depthwise conv; the
    padding zero-pads the depthwise conv's input, as separate convolutions would."""
    k1, b1, k2, b2, stride, padding = _check(x, w1, b1, w2, b2, residual, pattern, stride, padding)
    kind, param = kinds.resolve(activation, kind_args)
    if residual is not None:
        residual = residual.contiguous()
    x = x.contiguous()
    return kernels_for(x).conv_block(x, k1, b1, k2, b2, residual, pattern, list(stride), list(padding), kind, param)
