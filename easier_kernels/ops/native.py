"""The `cpp` and `cuda` backends: thin calls into the compiled extension `easier_kernels._C`."""

from __future__ import annotations

from . import kinds
from .layout import dense_view

PATTERN_IDS = {"pw_dw": 0, "dw_pw": 1}  # csrc/conv_block_cpu.cpp, csrc/cuda/conv_block_cuda.cu


class NativeBackend:
    """One device's kernels from `_C`: `count_on_<suffix>`, `act_count_<suffix>`, `conv_block_<suffix>`."""

    def __init__(self, ext, suffix: str):
        self._count_on = getattr(ext, f"count_on_{suffix}")
        self._act_count = getattr(ext, f"act_count_{suffix}")
        self._conv_block = getattr(ext, f"conv_block_{suffix}")

    def count_on(self, x, counts, nan_counts, channel_dim):
        x, outer, channels, inner = dense_view(x, channel_dim)
        self._count_on(x, counts, nan_counts, outer, channels, inner)

    def act_count(self, x, counts, nan_counts, channel_dim, kind, param):
        x, outer, channels, inner = dense_view(x, channel_dim)
        return self._act_count(x, counts, nan_counts, kinds.KIND_IDS[kind], param, outer, channels, inner)

    def conv_block(self, x, w1, b1, w2, b2, residual, pattern, stride, padding, kind, param):
        return self._conv_block(x, w1, b1, w2, b2, residual, PATTERN_IDS[pattern], *stride, *padding, kinds.KIND_IDS[kind], param)
