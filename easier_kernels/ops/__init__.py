"""Streaming on/off counts (`count_on`, `act_count`) and the fused conv block (`conv_block`, in
conv_block.py): ops registered natively (schemas and C++/CUDA kernels in csrc/, fakes in library.py).

    counts = ek.ops.count_on(x, channel_dim=1)            # int64 [C]: how many x >= 0 per channel
    y = ek.ops.act_count(x, counts, "relu")               # y = relu(x); counts += count_on(x)

Both read x once. NaN is neither on nor off: pass `nan_counts=` (an int64 [C] tensor) to
accumulate NaNs per channel without a device sync; without it a NaN raises ValueError.
The backend (reference / cpp / triton / cuda), and the cpp kernels' instruction set
(`use_cpu_isa`), are chosen in `backends.py`.
"""

from __future__ import annotations

import torch

from . import kinds
from .backends import BACKENDS, available_backends, cpu_isa, cpu_isas, kernels_for, use_backend, use_cpu_isa

__all__ = ["count_on", "act_count", "act_count_resolved", "conv_block", "available_backends", "use_backend", "BACKENDS", "KINDS",
           "cpu_isas", "cpu_isa", "use_cpu_isa"]

KINDS = kinds.KINDS
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---- the registered ops (library.py; schemas and native kernels in csrc/): what torch.compile
# and export see. The dispatcher picks the device's native kernel; backends.py says when another
# backend (triton, reference) runs instead.
from . import library  # noqa: E402,F401  (registers the ops)


class _ActCountFunction(torch.autograd.Function):
    """The activation's ordinary gradient around the op (register_autograd needs a functional
    schema, and act_count mutates its counts; the counts take no gradient)."""

    @staticmethod
    def forward(ctx, x, counts, nan_counts, kind, channel_dim, param):
        ctx.save_for_backward(x)
        ctx.kind, ctx.param = kind, param
        return _act_into(x, counts, nan_counts, kind, channel_dim, param)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return kinds.backward(grad, x, ctx.kind, ctx.param), None, None, None, None, None


# ---- the public API


def _count_into(x, counts, nans, channel_dim):
    kernels_for(x).count_on(x, counts, nans, channel_dim)


def _act_into(x, counts, nans, kind, channel_dim, param):
    return kernels_for(x).act_count(x, counts, nans, kind, channel_dim, param)


def _check(x: torch.Tensor, channel_dim: int, op: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float32/float16/bfloat16/float64, got {x.dtype}; convert it with x.float()")
    if x.dim() == 0 or not -x.dim() <= channel_dim < x.dim():
        raise ValueError(f"{op}: channel_dim={channel_dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return x.shape[channel_dim]


def _check_counts(name: str, t: torch.Tensor, x: torch.Tensor, channels: int, op: str) -> None:
    if t.dtype != torch.int64 or t.shape != (channels,) or t.device != x.device or not t.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be a contiguous int64 tensor of shape [{channels}] on {x.device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}; create it with torch.zeros({channels}, dtype=torch.int64)"
        )


def _raise_on_nan(nan_counts: torch.Tensor, op: str) -> None:
    if bool(nan_counts.any()):
        channels = nan_counts.nonzero().flatten().tolist()
        shown = ", ".join(map(str, channels[:8])) + (", ..." if len(channels) > 8 else "")
        raise ValueError(
            f"{op}: the input holds {int(nan_counts.sum())} NaN values (channels {shown}); NaN is neither on nor off. "
            "Fix the NaNs, or pass nan_counts=torch.zeros(C, dtype=torch.int64) to count them instead of raising"
        )


def count_on(x: torch.Tensor, channel_dim: int = 1, *, nan_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Per channel, how many elements of x satisfy x >= 0 (exact zeros count as on): int64 [C].

    channel_dim=1 for [N, C, *] (contiguous or channels_last), -1 for tokens [..., C].
    NaNs are added to `nan_counts` when given; otherwise a NaN raises ValueError.
    """
    channels = _check(x, channel_dim, "count_on")
    counts = torch.zeros(channels, dtype=torch.int64, device=x.device)
    nans = torch.zeros_like(counts) if nan_counts is None else nan_counts
    _check_counts("nan_counts", nans, x, channels, "count_on")
    _count_into(x, counts, nans, channel_dim)
    if nan_counts is None:
        _raise_on_nan(nans, "count_on")
    return counts


def act_count(
    x: torch.Tensor,
    counts: torch.Tensor,
    kind: str = "relu",
    channel_dim: int = 1,
    *,
    nan_counts: torch.Tensor | None = None,
    **kind_args,
) -> torch.Tensor:
    """y = activation(x) and counts += count_on(x), in one pass over x.

    kind: relu, relu6, leaky_relu (negative_slope), gelu (approximate='none'|'tanh'), silu,
    hardswish, elu (alpha), identity (counts only and returns x itself). Gradients are the
    activation's ordinary ones; counts take none.
    """
    channels = _check(x, channel_dim, "act_count")
    op_kind, param = kinds.resolve(kind, kind_args)
    _check_counts("counts", counts, x, channels, "act_count")
    nans = torch.zeros_like(counts) if nan_counts is None else nan_counts
    _check_counts("nan_counts", nans, x, channels, "act_count")
    y = act_count_resolved(x, counts, nans, op_kind, channel_dim, param)
    if nan_counts is None:
        _raise_on_nan(nans, "act_count")
    return y


def act_count_resolved(x: torch.Tensor, counts: torch.Tensor, nan_counts: torch.Tensor, kind: str, channel_dim: int,
                       param: float) -> torch.Tensor:
    """act_count for callers that checked x and the count buffers and resolved the kind once
    (`kinds.resolve`), as the meter's probes do: per call only the kernel runs, and the autograd
    node when x needs a gradient. NaNs are added to nan_counts, never raised."""
    if kind == "identity":
        _count_into(x, counts, nan_counts, channel_dim)
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _ActCountFunction.apply(x, counts, nan_counts, kind, channel_dim, param)
    return _act_into(x, counts, nan_counts, kind, channel_dim, param)


from .conv_block import conv_block  # noqa: E402  (it adds to the op namespace defined above)
from . import onnx as _onnx  # noqa: E402  (torch.onnx.export's forms of conv_block; torch only)

_onnx.register()
