"""The `triton` backend: count_on and act_count as Triton kernels (GPU; CPU under
TRITON_INTERPRET=1, which must be set before this module is imported).

Two kernels cover every dense layout [outer, C, inner] (see layout.py):
  * `_runs_kernel` (inner > 1, e.g. contiguous NCHW): rows of `inner` contiguous elements, one
    channel each; a program reduces a tile of rows and adds each row's count to its channel.
  * `_columns_kernel` (inner == 1: channels_last, tokens): the channel is the fastest dim; a
    program reduces a block of channels over a range of rows.
Counts are int64 and offsets are computed in int64.

Numerics, the same compiled and interpreted:
  * The activation's parameter (leaky_relu's slope, elu's alpha) is passed as the IEEE bits of
    its value in the math type (float64 for float64 x, else float32, as torch and the native
    kernels round it) and bitcast back in the kernel: compiled Triton would pass a Python float
    as float32, the interpreter as a double. An integer needs no allocation, and is safe under
    CUDA-graph capture and on any stream.
  * Compiled Triton lowers float32 `/` to div.full.f32 (2 ulp) and tl.exp / tl.log to
    ex2.approx / lg2.approx; the compiled branch of the math helpers below uses libdevice's
    IEEE division and exp / expm1 / erf / tanh instead. The interpreter cannot call libdevice
    (no extern calls), and its numpy functions are already accurate: the helpers pick by mode
    on the constexpr _INTERPRETED, so both run one kernel source.
  * Launch options: no flush-to-zero in libdevice (torch keeps subnormals) and no FMA
    contraction, so the compiled arithmetic is the interpreter's operation by operation.
"""

from __future__ import annotations

import contextlib
import math
import struct

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import kinds
from .layout import dense_view

# True under TRITON_INTERPRET=1: the same knob decides whether @triton.jit interprets.
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))
# Compile options of every launch (the interpreter ignores them): see the module docstring.
LAUNCH_OPTIONS = dict(enable_reflect_ftz=False, enable_fp_fusion=False)


@triton.jit
def _param(param_bits, F64: tl.constexpr):
    # The parameter from its bits (param_bits()): exactly the float64 or float32 the host rounded.
    if F64:
        p = param_bits.to(tl.int64).to(tl.float64, bitcast=True)
    else:
        p = param_bits.to(tl.int32).to(tl.float32, bitcast=True)
    return p


@triton.jit
def _div(a, b):
    # IEEE division (float32 `/` compiles to the 2-ulp div.full.f32). b: a tensor, or a constant
    # exact in float32 (libdevice takes a Python float as float32, so it is cast to a's type).
    if _INTERPRETED:
        q = a / b
    else:
        q = libdevice.div_rn(a, tl.cast(b, a.dtype))
    return q


@triton.jit
def _exp(x):
    if _INTERPRETED:
        y = tl.exp(x)
    else:
        y = libdevice.exp(x)  # tl.exp compiles to ex2.approx.f32 for float32
    return y


@triton.jit
def _expm1(x):
    if _INTERPRETED:
        # Kahan's expm1 on numpy's exp and log: accurate near 0, where exp(x) - 1 cancels.
        u = tl.exp(x)
        um1 = u - 1.0
        y = tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, _div(um1 * x, tl.log(u))))
    else:
        y = libdevice.expm1(x)
    return y


@triton.jit
def _erf(x):
    if _INTERPRETED:
        y = tl.math.erf(x)
    else:
        y = libdevice.erf(x)
    return y


@triton.jit
def _tanh(x):
    if _INTERPRETED:
        t = _expm1(-2.0 * tl.abs(x))
        magnitude = _div(-t, t + 2.0)
        y = tl.where(x < 0, -magnitude, magnitude)
    else:
        y = libdevice.tanh(x)
    return y


@triton.jit
def _formula(x, param, KIND: tl.constexpr):
    # PyTorch's formulas, for finite inputs (_activation adds the special-value rule); KIND ids
    # from kinds.KIND_IDS.
    if KIND == 1:  # relu
        y = tl.where(x < 0, 0.0, x)
    elif KIND == 2:  # relu6
        y = tl.where(x < 0, 0.0, tl.where(x > 6.0, 6.0, x))
    elif KIND == 3:  # leaky_relu
        y = tl.where(x > 0, x, x * param)
    elif KIND == 4:  # gelu (erf)
        y = 0.5 * x * (1.0 + _erf(x * 0.7071067811865476))
    elif KIND == 5:  # gelu (tanh)
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif KIND == 6:  # silu
        y = _div(x, 1.0 + _exp(-x))
    elif KIND == 7:  # hardswish
        shifted = x + 3.0
        y = _div(x * tl.where(shifted < 0, 0.0, tl.where(shifted > 6.0, 6.0, shifted)), 6.0)
    elif KIND == 8:  # elu: x itself at +-0, as torch's CPU kernel (x < 0 picks the exponential)
        y = tl.where(x < 0, param * _expm1(x), x)
    else:  # identity
        y = x
    return y


@triton.jit
def _negative_zero(x):
    # -1 * 0, computed: a -0.0 literal loses its sign in some Triton versions (3.7's interpreter).
    return tl.full(x.shape, -1.0, x.dtype) * 0.0


@triton.jit
def _at_minus_inf(x, param, KIND: tl.constexpr):
    # The special-value rule's value at -inf (kinds.limits; csrc/ek_math.h writes it too).
    if KIND == 1 or KIND == 2:  # relu, relu6
        y = tl.zeros_like(x)
    elif KIND == 3:  # leaky_relu: -inf * slope, but -0 for a slope of 0
        y = tl.where(param == 0, _negative_zero(x), x * param)
    elif KIND == 8:  # elu: -alpha, -0 for an alpha of 0 (0 - alpha would give +0)
        y = tl.full(x.shape, -1.0, x.dtype) * param
    elif KIND == 0:  # identity
        y = x
    else:  # gelu, gelu_tanh, silu, hardswish
        y = _negative_zero(x)
    return y


@triton.jit
def _activation(x, param, KIND: tl.constexpr):
    """The formula, and the special-value rule at +-inf and NaN, selected explicitly: what a GPU's
    erf/exp give at the infinities is not ours to assume."""
    y = _formula(x, param, KIND)
    if KIND == 2:  # relu6
        at_plus_inf = tl.full(x.shape, 6.0, x.dtype)
    else:
        at_plus_inf = x
    y = tl.where(x == float("inf"), at_plus_inf, y)
    y = tl.where(x == -float("inf"), _at_minus_inf(x, param, KIND), y)
    return tl.where(x != x, x, y)


@triton.jit
def _round_to_bfloat16(y):
    """float32 -> the nearest bfloat16 value (ties to even), still as float32. Triton's own cast
    does this on a GPU, but the interpreter truncates; rounding here makes both agree with torch."""
    bits = y.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(y != y, y, rounded.to(tl.float32, bitcast=True))


@triton.jit
def _count_and_apply(x_ptr, y_ptr, offsets, mask, param_bits, KIND: tl.constexpr, WRITE: tl.constexpr,
                     F64: tl.constexpr, INF16: tl.constexpr, AXIS: tl.constexpr):
    """Loads a tile, writes its activation when WRITE, returns its (on, nan) sums along AXIS."""
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if INF16 != 0:
        # 16-bit floats: decide on the raw bits, as the C++ and CUDA kernels do (exact for
        # subnormals, and the interpreter keeps bfloat16 as bits anyway).
        u = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        on_mask = (u <= INF16) | (u == 0x8000)
        nan_mask = (u & 0x7FFF) > INF16
    else:
        on_mask = x >= 0
        nan_mask = x != x
    on = tl.sum((on_mask & mask).to(tl.int64), axis=AXIS)
    nan = tl.sum((nan_mask & mask).to(tl.int64), axis=AXIS)
    if WRITE:
        xc = x.to(tl.float64) if F64 else x.to(tl.float32)
        y = _activation(xc, _param(param_bits, F64), KIND)
        if y_ptr.dtype.element_ty == tl.bfloat16:
            y = _round_to_bfloat16(y)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    return on, nan


@triton.jit(do_not_specialize=["param_bits"])  # one compilation for every parameter value
def _runs_kernel(x_ptr, y_ptr, on_ptr, nan_ptr, n_rows, C, inner, param_bits, KIND: tl.constexpr,
                 WRITE: tl.constexpr, F64: tl.constexpr, INF16: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_I: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < n_rows
    on = tl.zeros([BLOCK_R], dtype=tl.int64)
    nan = tl.zeros([BLOCK_R], dtype=tl.int64)
    for start in range(0, inner, BLOCK_I):
        cols = start + tl.arange(0, BLOCK_I).to(tl.int64)
        mask = row_mask[:, None] & (cols < inner)[None, :]
        offsets = rows[:, None] * inner + cols[None, :]
        tile_on, tile_nan = _count_and_apply(x_ptr, y_ptr, offsets, mask, param_bits, KIND, WRITE, F64, INF16, 1)
        on += tile_on
        nan += tile_nan
    channel = rows % C
    tl.atomic_add(on_ptr + channel, on, mask=row_mask)
    tl.atomic_add(nan_ptr + channel, nan, mask=row_mask)


@triton.jit(do_not_specialize=["param_bits"])
def _columns_kernel(x_ptr, y_ptr, on_ptr, nan_ptr, n_rows, C, rows_per_program, param_bits,
                    KIND: tl.constexpr, WRITE: tl.constexpr, F64: tl.constexpr, INF16: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    first_row = tl.program_id(1).to(tl.int64) * rows_per_program
    on = tl.zeros([BLOCK_C], dtype=tl.int64)
    nan = tl.zeros([BLOCK_C], dtype=tl.int64)
    for start in range(0, rows_per_program, BLOCK_R):
        rows = first_row + start + tl.arange(0, BLOCK_R).to(tl.int64)
        row_mask = (rows < n_rows) & (start + tl.arange(0, BLOCK_R) < rows_per_program)
        mask = row_mask[:, None] & channel_mask[None, :]
        offsets = rows[:, None] * C + channels[None, :]
        tile_on, tile_nan = _count_and_apply(x_ptr, y_ptr, offsets, mask, param_bits, KIND, WRITE, F64, INF16, 0)
        on += tile_on
        nan += tile_nan
    tl.atomic_add(on_ptr + channels, on, mask=channel_mask)
    tl.atomic_add(nan_ptr + channels, nan, mask=channel_mask)


_INF16 = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}  # +inf's bits; 0: not a 16-bit type
_TILE = 2048  # elements per tile
_TARGET_PROGRAMS = 1024  # enough to fill a GPU; each program loops over its share


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device, not on its tensors': make that x's device (a
    tensor on cuda:1 would otherwise be read by a kernel on cuda:0). CPU (interpreted): none."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launcher(kernel, x: torch.Tensor):
    """The kernel itself on real tensors; wrapped where x is a fake or functional tensor (the
    triton ops traced by torch.compile or export), so the launch is recorded in the graph."""
    return kernel if type(x) is torch.Tensor else torch.library.wrap_triton(kernel)


def param_bits(value: float, f64: bool) -> int:
    """The activation's parameter as the signed integer bits of its float64 value (f64) or of
    its float32 rounding (otherwise; to nearest, as torch rounds it); _param() reverses it."""
    if f64:
        return struct.unpack("<q", struct.pack("<d", value))[0]
    try:
        return struct.unpack("<i", struct.pack("<f", value))[0]
    except OverflowError:  # rounds past float32's largest: +-inf, as a cast does
        return struct.unpack("<i", struct.pack("<f", math.copysign(math.inf, value)))[0]


def _launch(x, outer, channels, inner, y, counts, nan_counts, kind_id, param):
    """Counts the dense [outer, channels, inner] buffer x into counts/nan_counts and, when y
    (laid out like x) is given, writes y = activation(x)."""
    if x.numel() == 0:
        return
    write = y is not None
    y_buffer = y if write else x  # never written when WRITE is False
    common = dict(KIND=kind_id, WRITE=write, F64=x.dtype == torch.float64, INF16=_INF16.get(x.dtype, 0),
                  **LAUNCH_OPTIONS)
    bits = param_bits(param, x.dtype == torch.float64)
    if inner > 1:
        block_i = min(triton.next_power_of_2(inner), _TILE)
        block_r = max(1, _TILE // block_i)
        n_rows = outer * channels
        grid = (triton.cdiv(n_rows, block_r),)
        with device_guard(x.device):
            launcher(_runs_kernel, x)[grid](x, y_buffer, counts, nan_counts, n_rows, channels, inner, bits,
                               BLOCK_R=block_r, BLOCK_I=block_i, **common)
    else:
        block_c = min(triton.next_power_of_2(channels), 128)
        block_r = max(1, _TILE // block_c)
        column_programs = triton.cdiv(channels, block_c)
        row_programs = max(1, min(triton.cdiv(outer, block_r), _TARGET_PROGRAMS // column_programs))
        rows_per_program = triton.cdiv(triton.cdiv(outer, row_programs), block_r) * block_r
        grid = (column_programs, triton.cdiv(outer, rows_per_program))
        with device_guard(x.device):
            launcher(_columns_kernel, x)[grid](x, y_buffer, counts, nan_counts, outer, channels, rows_per_program,
                                  bits, BLOCK_R=block_r, BLOCK_C=block_c, **common)


def count_on(x, counts, nan_counts, channel_dim):
    _launch(*dense_view(x, channel_dim), None, counts, nan_counts, kinds.KIND_IDS["identity"], 0.0)


def act_count(x, counts, nan_counts, kind, channel_dim, param):
    dense, outer, channels, inner = dense_view(x, channel_dim)
    y = torch.empty_like(dense)  # same strides as dense, so the kernel writes y in x's order
    _launch(dense, outer, channels, inner, y, counts, nan_counts, kinds.KIND_IDS[kind], param)
    return y
