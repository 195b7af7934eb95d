"""The ops' registrations that live in Python: the fake kernels (shapes for torch.compile and
export), and the schemas themselves where the native library is missing.

The schemas and the C++/CUDA kernels are registered natively (csrc/library.cpp and
TORCH_LIBRARY_IMPL beside each kernel), so an exported program or AOTInductor calls them without
Python, and the dispatcher picks the CPU or CUDA kernel. Without the compiled extension the same
schemas are defined here, with the plain-torch kernels behind them, so compile and export still
see one op. Autograd is not registered on the op: `torch.library.register_autograd` needs a
functional schema, and a functional act_count would allocate and add count deltas on every call;
`ops.act_count` wraps the op in an autograd.Function instead.
"""

from __future__ import annotations

import torch

from . import reference
from .backends import native_extension

NAMESPACE = "easier_kernels"

# The same strings as csrc/library.cpp (tests/ops/test_library.py checks they agree).
SCHEMAS = {
    "count_on": "count_on(Tensor x, Tensor(a!) counts, Tensor(b!) nan_counts, int channel_dim) -> ()",
    "act_count": "act_count(Tensor x, Tensor(a!) counts, Tensor(b!) nan_counts, str kind, int channel_dim, "
                 "float param) -> Tensor",
    "conv_block": "conv_block(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? residual, str pattern, "
                  "int[] stride, int[] padding, str kind, float param) -> Tensor",
}


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _fake_count_on(x, counts, nan_counts, channel_dim):
    return None


def _fake_act_count(x, counts, nan_counts, kind, channel_dim, param):
    return torch.empty_like(x)


def _fake_conv_block(x, w1, b1, w2, b2, residual, pattern, stride, padding, kind, param):
    dw = w2 if pattern == "pw_dw" else w1  # kernel layouts: depthwise [C, kh, kw]
    sizes = [output_size(s, k, st, p) for s, k, st, p in zip(x.shape[2:], dw.shape[1:], stride, padding)]
    return x.new_empty((x.shape[0], w2.shape[0], *sizes))


FAKES = {"count_on": _fake_count_on, "act_count": _fake_act_count, "conv_block": _fake_conv_block}


def _register() -> torch.library.Library:
    """Loads the native library (which defines the ops) or defines them here; adds the fakes."""
    if native_extension() is None:
        lib = torch.library.Library(NAMESPACE, "DEF")
        for name, schema in SCHEMAS.items():
            lib.define(schema)
            for key in ("CPU", "CUDA"):
                lib.impl(name, getattr(reference, name), key)
    else:
        lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    for name, fake in FAKES.items():
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=lib)
    return lib


_lib = _register()  # must outlive the module's import: dropping it would remove the registrations
