"""The `triton` backend's entries, in the ops' schema order. Eager calls run the launchers
directly; traced calls (torch.compile, export) go to `easier_kernels::<op>_triton`, registered
with `torch.library.triton_op` so Inductor and AOTInductor see the Triton kernels themselves.

Under TRITON_INTERPRET=1 (the CPU tests) a kernel cannot run on fake tensors, so there the ops
are plain custom ops with the fake kernels of library.py.
"""

from __future__ import annotations

import types

import torch

from . import library, triton_conv_block, triton_kernels
from .backends import triton_interpreted


def count_on(x: torch.Tensor, counts: torch.Tensor, nan_counts: torch.Tensor, channel_dim: int) -> None:
    triton_kernels.count_on(x, counts, nan_counts, channel_dim)


def act_count(x: torch.Tensor, counts: torch.Tensor, nan_counts: torch.Tensor, kind: str, channel_dim: int,
              param: float) -> torch.Tensor:
    return triton_kernels.act_count(x, counts, nan_counts, kind, channel_dim, param)


def conv_block(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
               residual: torch.Tensor | None, pattern: str, stride: list[int], padding: list[int], kind: str,
               param: float) -> torch.Tensor:
    return triton_conv_block.conv_block(x, w1, b1, w2, b2, residual, pattern, tuple(stride), tuple(padding), kind, param)


_MUTATES = {"count_on": ("counts", "nan_counts"), "act_count": ("counts", "nan_counts"), "conv_block": ()}


def _register(name: str, fn):
    qualname = f"{library.NAMESPACE}::{name}_triton"
    if triton_interpreted():
        op = torch.library.custom_op(qualname, fn, mutates_args=_MUTATES[name])
        op.register_fake(library.FAKES[name])
        return op
    return torch.library.triton_op(qualname, fn, mutates_args=_MUTATES[name])


eager = types.SimpleNamespace(count_on=count_on, act_count=act_count, conv_block=conv_block)
traced = types.SimpleNamespace(**{name: _register(name, fn) for name, fn in vars(eager).items()})
