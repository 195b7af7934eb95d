"""ONNX forms of `easier_kernels::conv_block`, so that a plain `torch.onnx.export` of an eager fold
(one holding fused blocks) works with both of torch's exporters, not only `ek.export` (which lowers
the blocks to standard modules first). Each form is the op in standard operators: the two convolutions,
the residual add, the activation (kernel kinds, kinds.py); no custom domain is written.

- TorchScript exporter (`dynamo=False`): a symbolic registered with
  `torch.onnx.register_custom_op_symbolic` (opset 9 and later), written in ONNX operators.
- torch.export-based exporter (`dynamo=True`, torch's default): it decomposes every op that has no
  ONNX function but an entry in torch's global decomposition table (`torch._decomp`), before it
  translates the graph; the op's entry is the same computation in aten ops. Only tracing reads that
  table (this exporter, and fake tensors with symbolic shapes, where it gives the fake kernel's
  shape): eager dispatch, torch.compile (inductor's table) and `torch.export`'s default
  decompositions keep the op, so the fused kernel still runs everywhere else.

Both are pure torch: importing this needs neither onnx nor onnxscript. Non-finite inputs follow the
ONNX operators, not the kernels' special-value rule (kinds.py), as in `ek.export`'s lowering.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import kinds

__all__ = ["register", "decomposed", "symbolic", "OP", "SYMBOLIC_OPSET"]

OP = "easier_kernels::conv_block"
SYMBOLIC_OPSET = 9  # the symbolic serves this opset and every later one
_SYMBOLIC_ARGS = ("v",) * 6 + ("s", "is", "is", "s", "f")  # x .. residual, then the constants (schema order)


# ---- dynamo=True: the decomposition the exporter applies


def decomposed(x, w1, b1, w2, b2, residual, pattern, stride, padding, kind, param):
    """conv_block in aten ops (kernel-layout weights: pointwise [O, I], depthwise [C, kh, kw])."""
    # Reshapes, not unsqueezes: the exporter's optimizer cancels them against the op's caller's
    # reshape of conv-shaped weights (FusedConvBlock's), so the file holds the weights as they are.
    pointwise = lambda t, w, b: F.conv2d(t, w.reshape(*w.shape, 1, 1), b)  # noqa: E731
    depthwise = lambda t, w, b: F.conv2d(t, w.reshape(w.shape[0], 1, *w.shape[1:]), b, stride=stride,  # noqa: E731
                                         padding=padding, groups=w.shape[0])
    first, second = (pointwise, depthwise) if pattern == "pw_dw" else (depthwise, pointwise)
    out = second(first(x, w1, b1), w2, b2)
    if residual is not None:
        out = out + residual
    return out if kind == "identity" else kinds.forward(out, kind, param)


# ---- dynamo=False: the TorchScript symbolic


def _const(g, value, like):
    dtype = torch.onnx.JitScalarType.from_value(like, torch.onnx.JitScalarType.FLOAT).dtype()
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _unsqueeze(g, t, axes):
    if g.opset < 13:
        return g.op("Unsqueeze", t, axes_i=axes)
    return g.op("Unsqueeze", t, g.op("Constant", value_t=torch.tensor(axes, dtype=torch.int64)))


def _conv(g, x, w, b, groups, stride=(1, 1), padding=(0, 0)):
    return g.op("Conv", x, w, b, group_i=groups, strides_i=list(stride), pads_i=list(padding) * 2,
                dilations_i=[1, 1])


def _gelu(g, x, tanh: bool):
    half_x = g.op("Mul", x, _const(g, 0.5, x))
    if tanh:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = g.op("Mul", g.op("Mul", x, x), x)
        inner = g.op("Add", x, g.op("Mul", cube, _const(g, 0.044715, x)))
        core = g.op("Tanh", g.op("Mul", inner, _const(g, math.sqrt(2 / math.pi), x)))
    else:  # 0.5 x (1 + erf(x / sqrt(2)))
        core = g.op("Erf", g.op("Mul", x, _const(g, math.sqrt(0.5), x)))
    return g.op("Mul", half_x, g.op("Add", core, _const(g, 1.0, x)))


def _activation(g, x, kind: str, param: float):
    if kind == "identity":
        return x
    if kind == "relu":
        return g.op("Relu", x)
    if kind == "relu6":
        if g.opset < 11:
            return g.op("Clip", x, min_f=0.0, max_f=6.0)
        return g.op("Clip", x, _const(g, 0.0, x), _const(g, 6.0, x))
    if kind == "leaky_relu":
        return g.op("LeakyRelu", x, alpha_f=param)
    if kind == "elu":
        return g.op("Elu", x, alpha_f=param)
    if kind in ("gelu", "gelu_tanh"):
        return _gelu(g, x, kind == "gelu_tanh")
    if kind == "silu":
        return g.op("Mul", x, g.op("Sigmoid", x))
    if kind == "hardswish":
        return g.op("HardSwish", x) if g.opset >= 14 else g.op("Mul", x, g.op("HardSigmoid", x, alpha_f=1 / 6))
    raise ValueError(f"conv_block: unknown kernel activation kind {kind!r}")


def symbolic(g, x, w1, b1, w2, b2, residual, pattern: str, stride: list, padding: list, kind: str, param: float):
    """conv_block in ONNX operators: Conv (1x1), Conv (depthwise, group=C), Add, the activation.
    The constant arguments arrive parsed (`register` wraps this in `symbolic_helper.parse_args`)."""
    from torch.onnx import symbolic_helper as sh

    dw = w2 if pattern == "pw_dw" else w1
    channels = sh._get_tensor_dim_size(dw, 0)
    if channels is None:
        raise RuntimeError(f"ONNX export of {OP}: the depthwise weight's channel count is unknown; trace the module "
                           "(torch.onnx.export does) rather than scripting it, or use ek.export(...)")
    pw_w, dw_w = _unsqueeze(g, w1 if pattern == "pw_dw" else w2, [2, 3]), _unsqueeze(g, dw, [1])
    if pattern == "pw_dw":
        out = _conv(g, _conv(g, x, pw_w, b1, 1), dw_w, b2, channels, stride, padding)
    else:
        out = _conv(g, _conv(g, x, dw_w, b1, channels, stride, padding), pw_w, b2, 1)
    if not sh._is_none(residual):
        out = g.op("Add", out, residual)
    return _activation(g, out, kind, param)


# ---- registration (at `easier_kernels.ops` import: cheap, torch only)


def register() -> None:
    """Registers both forms; idempotent. The symbolic is skipped where torch no longer has the
    TorchScript exporter."""
    op = torch.ops.easier_kernels.conv_block.default
    if op not in torch._decomp.decomposition_table:
        torch._decomp.register_decomposition(op)(decomposed)
    if hasattr(torch.onnx, "register_custom_op_symbolic"):  # the TorchScript exporter (deprecated)
        parsed = torch.onnx.symbolic_helper.parse_args(*_SYMBOLIC_ARGS)(symbolic)
        torch.onnx.register_custom_op_symbolic(OP, parsed, SYMBOLIC_OPSET)
