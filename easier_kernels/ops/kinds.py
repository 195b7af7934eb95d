"""Activation kinds: their parameters, the plain-torch forward and the ordinary gradient.

The integer ids are shared with the native kernels (csrc/ek_math.h, enum Kind).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KIND_IDS = {
    "identity": 0,
    "relu": 1,
    "relu6": 2,
    "leaky_relu": 3,
    "gelu": 4,
    "gelu_tanh": 5,
    "silu": 6,
    "hardswish": 7,
    "elu": 8,
}

# Public kinds and the keyword arguments each accepts (with PyTorch's defaults).
_KIND_ARGS = {
    "identity": {},
    "relu": {},
    "relu6": {},
    "leaky_relu": {"negative_slope": 0.01},
    "gelu": {"approximate": "none"},
    "silu": {},
    "hardswish": {},
    "elu": {"alpha": 1.0},
}
KINDS = tuple(_KIND_ARGS)


def resolve(kind: str, kind_args: dict) -> tuple[str, float]:
    """Public (kind, kwargs) -> (kernel kind, its one float parameter)."""
    if not kind_args and kind in _RESOLVED_DEFAULTS:  # the common call, once per activation call
        return _RESOLVED_DEFAULTS[kind]
    return _resolve(kind, kind_args)


def _resolve(kind: str, kind_args: dict) -> tuple[str, float]:
    if kind not in _KIND_ARGS:
        raise ValueError(f"unknown activation kind {kind!r}; use one of {', '.join(KINDS)}")
    unknown = set(kind_args) - set(_KIND_ARGS[kind])
    if unknown:
        allowed = ", ".join(_KIND_ARGS[kind]) or "none"
        raise TypeError(f"{kind} takes no argument {sorted(unknown)[0]!r}; it accepts: {allowed}")
    args = {**_KIND_ARGS[kind], **kind_args}
    if kind == "gelu":
        if args["approximate"] not in ("none", "tanh"):
            raise ValueError(f"gelu approximate must be 'none' or 'tanh', not {args['approximate']!r}")
        return ("gelu_tanh" if args["approximate"] == "tanh" else "gelu"), 0.0
    if kind == "leaky_relu":
        return kind, float(args["negative_slope"])
    if kind == "elu":
        return kind, float(args["alpha"])
    return kind, 0.0


_RESOLVED_DEFAULTS = {kind: _resolve(kind, {}) for kind in KINDS}


def forward(x: torch.Tensor, kind: str, param: float) -> torch.Tensor:
    """The activation exactly as PyTorch computes it (kernel kind names)."""
    if kind == "identity":
        return x.clone()
    if kind == "relu":
        return F.relu(x)
    if kind == "relu6":
        return F.relu6(x)
    if kind == "leaky_relu":
        return F.leaky_relu(x, param)
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "silu":
        return F.silu(x)
    if kind == "hardswish":
        return F.hardswish(x)
    if kind == "elu":
        return F.elu(x, param)
    raise ValueError(f"unknown kernel activation kind {kind!r}")


# The special-value rule, the same on every backend (README, "Special values"; csrc/ek_math.h
# writes it for the native kernels): at +-inf an activation gives its limit, a zero limit with
# the sign the formula gives to large finite inputs; NaN stays NaN. Torch is no rule here: its
# float32 gelu(+inf) is NaN on AVX-512 CPUs, and gelu, silu, hardswish give NaN at -inf.
def limits(kind: str, param: float) -> tuple[float, float]:
    """(value at +inf, value at -inf) of a kernel kind with its parameter."""
    inf = float("inf")
    at_minus_inf = {
        "identity": -inf,
        "relu": 0.0,
        "relu6": 0.0,
        "leaky_relu": -inf * param if param != 0 else -0.0,
        "elu": -param,
    }.get(kind, -0.0)  # gelu, gelu_tanh, silu, hardswish
    return (6.0 if kind == "relu6" else inf), at_minus_inf


def with_special_rule(x: torch.Tensor, y: torch.Tensor, kind: str, param: float) -> torch.Tensor:
    """y = activation(x) with the special-value rule imposed where x is NaN or +-inf."""
    at_plus_inf, at_minus_inf = limits(kind, param)
    y = torch.where(x == float("inf"), torch.tensor(at_plus_inf, dtype=y.dtype, device=y.device), y)
    y = torch.where(x == float("-inf"), torch.tensor(at_minus_inf, dtype=y.dtype, device=y.device), y)
    return torch.where(torch.isnan(x), x, y)


def backward(grad: torch.Tensor, x: torch.Tensor, kind: str, param: float) -> torch.Tensor:
    """d activation / dx applied to grad: the same aten backward ops autograd uses."""
    aten = torch.ops.aten
    if kind == "identity":
        return grad
    if kind == "relu":
        return aten.threshold_backward(grad, x, 0)
    if kind == "relu6":
        return aten.hardtanh_backward(grad, x, 0.0, 6.0)
    if kind == "leaky_relu":
        return aten.leaky_relu_backward(grad, x, param, False)
    if kind in ("gelu", "gelu_tanh"):
        return aten.gelu_backward(grad, x, approximate="tanh" if kind == "gelu_tanh" else "none")
    if kind == "silu":
        return aten.silu_backward(grad, x)
    if kind == "hardswish":
        return aten.hardswish_backward(grad, x)
    if kind == "elu":
        return aten.elu_backward(grad, param, 1, 1, False, x)
    raise ValueError(f"unknown kernel activation kind {kind!r}")
