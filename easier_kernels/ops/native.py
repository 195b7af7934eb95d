"""The `cpp` and `cuda` backends: the registered ops themselves, whose dispatcher runs the kernel
of the tensors' device (csrc/). In eager the counting ops are entered from C++ (`_C.count_on`,
`_C.act_count`): the same dispatcher call without Python's argument parsing, ~1.5 us less a call."""

from __future__ import annotations

import types

import torch

from . import library  # noqa: F401  (the ops exist once it is imported)
from .backends import native_extension

_ops = torch.ops.easier_kernels
traced = types.SimpleNamespace(count_on=_ops.count_on.default, act_count=_ops.act_count.default,
                               conv_block=_ops.conv_block.default)
_ext = native_extension()
eager = traced if _ext is None else types.SimpleNamespace(count_on=_ext.count_on, act_count=_ext.act_count,
                                                          conv_block=_ops.conv_block.default)
