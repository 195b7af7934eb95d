"""`conv_block` as Triton kernels: act(conv2(conv1(x) + b1) + b2 + residual) without writing the
intermediate map to memory (GPU; CPU under TRITON_INTERPRET=1, which must be set before triton is
imported). Semantics: the shared conv_block spec (patterns "pw_dw" and "dw_pw", NCHW, dilation 1).

Two kernels, one per pattern. Both tile the OUTPUT: a program owns one image n, a block of output
channels and a block of BLOCK_P flattened output pixels (p = oh * Wo + ow), accumulates that
[channels, BLOCK_P] tile in float32 registers and stores it once, after the epilogue
(+ b2, + residual, activation, cast to x's dtype). The intermediate map exists only as register
tiles.

* pw_dw (`_pw_dw_kernel`, tile [BLOCK_C mid channels, BLOCK_P pixels]): for each of the kh*kw
  depthwise taps, the program loads the x pixels that tap reads ([Cin, BLOCK_P], masked where the
  tap falls in the padding), recomputes the pointwise conv for its channel block there
  (w1[c, :] @ x[:, pixels]: tl.dot over Cin chunks of BLOCK_K, or a loop over Cin of outer
  products when Cin < 16), adds b1 only where the tap is inside the map (the padding of the
  intermediate is zero, not b1), and accumulates (that * w2[c, tap]).
  Why: the depthwise conv needs each mid pixel of a (stride-shifted) neighbourhood, and a halo
  tile cannot be shared between threads in Triton without going through memory, so the pointwise
  result is recomputed per tap: kh*kw times the pointwise FLOPs, but those are tensor-core dots
  over x tiles that hit L1/L2 (neighbouring taps read overlapping pixels), and the intermediate
  (Cmid/Cin times larger than x for an expanding block) is never written or read back.
* dw_pw (`_dw_pw_kernel`, tile [BLOCK_O output channels, BLOCK_P pixels]): loops over Cin in
  chunks of BLOCK_K; per chunk it computes the depthwise conv at the block's pixels
  ([BLOCK_K, BLOCK_P], taps masked at the padding, + b1) and accumulates
  w2[o, chunk] @ mid[chunk, pixels] (tl.dot; when Cin < 16 a loop over the channels, each
  depthwise row followed by an outer product). The depthwise work is repeated once per output
  channel block, so BLOCK_O is as large as the register budget allows (up to 64: usually Cout
  fits in one or two blocks).

Tile sizes (powers of two, tl.constexpr) come from the shapes: BLOCK_P = next_pow2(Ho*Wo) capped at
64; channel blocks next_pow2(C) capped at 64 (so small layers do not pay for masked lanes) and at
least 16 when tl.dot is used (its minimum M/N/K); BLOCK_K = next_pow2(Cin) in [16, 32/64]. tl.dot
is used when the contraction (Cin) is at least 16; below that a dot would be mostly padding and
the outer-product loop is cheaper. The largest tile is 64 x 64 float32 (16 KiB of registers for
4 warps), and the interpreter (numpy, one program at a time) stays quick on these sizes.
Pipelining: Triton's default 3 stages would stage every tap's gather of the Cin loop in shared
memory; compiled for sm_90 (float32, 3x3, 64/64/32 tiles) dw_pw then needs 170 KiB (89 KiB at 2
stages, 16 KiB at 1) and pw_dw 64 KiB (32 KiB at 2), so dw_pw runs with num_stages=1 and pw_dw
with 2 (16-bit types need 8-16 KiB at any stage count). Not yet timed on a GPU.

Precision: float32 dots use input_precision="ieee" (no TF32), so float32 results match torch to
float32 rounding. float16/bfloat16 dots take 16-bit operands and accumulate in float32; in dw_pw's dot path the
depthwise result (float32) is rounded to x's dtype before its dot (the tensor cores take 16-bit
operands; the unfused torch chain stores it in that dtype too), while the outer-product path keeps
it in float32. float64 is rejected (ValueError): Triton dots have no float64 tensor-core path and the
backend would have to be a different kernel. The epilogue's activation is act_count's
(triton_kernels: libdevice math when compiled, the parameter passed as float32 bits), launched
without flush-to-zero; FMA contraction stays on here (see _LAUNCH_OPTIONS). Launches run under a
guard for x's device.

Offsets: every offset that can pass 2**31 (image, channel and output offsets: n * C * H * W,
c * H * W, (n * Cout + o) * Ho * Wo) is computed in int64: the program id of n and the channel
indices are cast to int64 before they are multiplied, pixel offsets ih * W + iw are int64, and
the scalar loops over channels advance 64-bit pointers instead of multiplying an int32 counter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from . import kinds
from .triton_kernels import LAUNCH_OPTIONS, _activation, _param, _round_to_bfloat16, device_guard, launcher, param_bits

PATTERNS = ("pw_dw", "dw_pw")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_P = 64  # output pixels per program
_MAX_C = 64  # output channels per program
_MIN_DOT = 16  # tl.dot's smallest M, N and K
# No flush-to-zero, as for act_count; FMA contraction pinned on (Triton 3.10 changes the default):
# the accumulations are tolerance-compared and an FMA is one instruction where mul + add are two.
_LAUNCH_OPTIONS = dict(LAUNCH_OPTIONS, enable_fp_fusion=True)


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a @ b: float32 operands with IEEE precision (no TF32) when DOT_F32, else the operands'
    own 16-bit type on the tensor cores (float32 accumulation either way)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit(do_not_specialize=["param_bits"])
def _pw_dw_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, res_ptr, out_ptr,
                  Cin, Cmid, H, W, Ho, Wo, stride_h, stride_w, pad_h, pad_w, param_bits,
                  KH: tl.constexpr, KW: tl.constexpr, KIND: tl.constexpr, HAS_RES: tl.constexpr,
                  USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = offs_p < Ho * Wo
    c_mask = offs_c < Cmid
    c64 = offs_c.to(tl.int64)
    oh = offs_p // Wo
    ow = offs_p % Wo

    x_base = x_ptr + n * Cin * H * W  # int64 (n is int64)
    b1 = tl.load(b1_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)

    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for i in tl.static_range(KH):
        ih = oh * stride_h - pad_h + i
        row_ok = p_mask & (ih >= 0) & (ih < H)
        for j in tl.static_range(KW):
            iw = ow * stride_w - pad_w + j
            valid = row_ok & (iw >= 0) & (iw < W)
            pix = ih.to(tl.int64) * W + iw
            # mid[c, p] = sum_k w1[c, k] * x[n, k, ih, iw]  (the intermediate map at this tap)
            mid = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
            if USE_DOT:
                for k0 in range(0, Cin, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_mask = ks < Cin
                    w = tl.load(w1_ptr + c64[:, None] * Cin + ks[None, :],
                                mask=c_mask[:, None] & k_mask[None, :], other=0.0)
                    xv = tl.load(x_base + ks.to(tl.int64)[:, None] * H * W + pix[None, :],
                                 mask=k_mask[:, None] & valid[None, :], other=0.0)
                    mid = _dot(w, xv, mid, DOT_F32)
            else:
                x_k = x_base  # 64-bit pointer walk over the input channels
                w_k = w1_ptr + c64 * Cin
                for k in range(0, Cin):
                    w = tl.load(w_k, mask=c_mask, other=0.0).to(tl.float32)
                    xv = tl.load(x_k + pix, mask=valid, other=0.0).to(tl.float32)
                    mid += w[:, None] * xv[None, :]
                    x_k += H * W
                    w_k += 1
            # + b1 inside the map only: the padding of the intermediate is zero.
            mid = tl.where(valid[None, :], mid + b1[:, None], 0.0)
            wt = tl.load(w2_ptr + c64 * (KH * KW) + (i * KW + j), mask=c_mask, other=0.0)
            acc += wt.to(tl.float32)[:, None] * mid

    b2 = tl.load(b2_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    acc += b2[:, None]
    out_offs = (n * Cmid + c64[:, None]) * Ho * Wo + offs_p[None, :]
    mask = c_mask[:, None] & p_mask[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
    y = _activation(acc, _param(param_bits, False), KIND)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        y = _round_to_bfloat16(y)
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["param_bits"])
def _dw_pw_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, res_ptr, out_ptr,
                  Cin, Cout, H, W, Ho, Wo, stride_h, stride_w, pad_h, pad_w, param_bits,
                  KH: tl.constexpr, KW: tl.constexpr, KIND: tl.constexpr, HAS_RES: tl.constexpr,
                  USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_O: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    p_mask = offs_p < Ho * Wo
    o_mask = offs_o < Cout
    o64 = offs_o.to(tl.int64)
    oh = offs_p // Wo
    ow = offs_p % Wo

    x_base = x_ptr + n * Cin * H * W  # int64 (n is int64)

    acc = tl.zeros([BLOCK_O, BLOCK_P], dtype=tl.float32)
    if USE_DOT:
        for k0 in range(0, Cin, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < Cin
            ks64 = ks.to(tl.int64)
            chan = x_base + ks64[:, None] * H * W  # [BLOCK_K, 1] channel planes
            # depthwise for this chunk of channels at the block's pixels
            mid = tl.zeros([BLOCK_K, BLOCK_P], dtype=tl.float32)
            for i in tl.static_range(KH):
                ih = oh * stride_h - pad_h + i
                row_ok = p_mask & (ih >= 0) & (ih < H)
                for j in tl.static_range(KW):
                    iw = ow * stride_w - pad_w + j
                    valid = row_ok & (iw >= 0) & (iw < W)
                    pix = ih.to(tl.int64) * W + iw
                    xv = tl.load(chan + pix[None, :], mask=k_mask[:, None] & valid[None, :], other=0.0)
                    wt = tl.load(w1_ptr + ks64 * (KH * KW) + (i * KW + j), mask=k_mask, other=0.0)
                    mid += wt.to(tl.float32)[:, None] * xv.to(tl.float32)
            # channels past Cin stay 0 (b1 and w2 load 0 there)
            mid += tl.load(b1_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)[:, None]
            w = tl.load(w2_ptr + o64[:, None] * Cin + ks[None, :],
                        mask=o_mask[:, None] & k_mask[None, :], other=0.0)
            if w.dtype == tl.bfloat16:
                mid = _round_to_bfloat16(mid)
            acc = _dot(w, mid.to(w.dtype), acc, DOT_F32)
    else:
        x_k = x_base  # 64-bit pointer walks over the input channels
        w1_k = w1_ptr
        w2_k = w2_ptr + o64 * Cin
        b1_k = b1_ptr
        for k in range(0, Cin):
            mid = tl.zeros([BLOCK_P], dtype=tl.float32)
            for i in tl.static_range(KH):
                ih = oh * stride_h - pad_h + i
                row_ok = p_mask & (ih >= 0) & (ih < H)
                for j in tl.static_range(KW):
                    iw = ow * stride_w - pad_w + j
                    valid = row_ok & (iw >= 0) & (iw < W)
                    pix = ih.to(tl.int64) * W + iw
                    xv = tl.load(x_k + pix, mask=valid, other=0.0).to(tl.float32)
                    mid += tl.load(w1_k + (i * KW + j)).to(tl.float32) * xv
            mid += tl.load(b1_k).to(tl.float32)
            w = tl.load(w2_k, mask=o_mask, other=0.0).to(tl.float32)
            acc += w[:, None] * mid[None, :]
            x_k += H * W
            w1_k += KH * KW
            w2_k += 1
            b1_k += 1

    b2 = tl.load(b2_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)
    acc += b2[:, None]
    out_offs = (n * Cout + o64[:, None]) * Ho * Wo + offs_p[None, :]
    mask = o_mask[:, None] & p_mask[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
    y = _activation(acc, _param(param_bits, False), KIND)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        y = _round_to_bfloat16(y)
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=mask)


# True when TRITON_INTERPRET=1 made these kernels interpreted functions (CPU).
_INTERPRETED = isinstance(_pw_dw_kernel, InterpretedFunction)


def _pow2_in(value: int, low: int, high: int) -> int:
    return max(low, min(triton.next_power_of_2(max(1, value)), high))


def _check(x, w1, b1, w2, b2, residual, pattern, stride, padding, kind):
    if pattern not in PATTERNS:
        raise ValueError(f"conv_block: pattern must be one of {PATTERNS}, not {pattern!r}")
    if kind not in kinds.KIND_IDS:
        raise ValueError(f"conv_block: unknown activation kind {kind!r}; use one of {', '.join(kinds.KIND_IDS)}")
    tensors = {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    if residual is not None:
        tensors["residual"] = residual
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"conv_block: {name} must be a tensor, not {type(t).__name__}")
    if x.dtype == torch.float64:
        raise ValueError("conv_block: the triton backend does not support float64 (use float32, float16 "
                         "or bfloat16, or another backend)")
    if x.dtype not in _DTYPES:
        raise ValueError(f"conv_block: x must be float32, float16 or bfloat16, not {x.dtype}")
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            raise ValueError(f"conv_block: {name} has dtype {t.dtype}, x has {x.dtype}; all must match")
        if t.device != x.device:
            raise ValueError(f"conv_block: {name} is on {t.device}, x on {x.device}; all must be on one device")
        if not t.is_contiguous():
            raise ValueError(f"conv_block: {name} must be contiguous")
    if x.dim() != 4:
        raise ValueError(f"conv_block: x must be 4-D NCHW, got shape {tuple(x.shape)}")
    if len(stride) != 2 or len(padding) != 2:
        raise ValueError(f"conv_block: stride and padding must be pairs, got {stride}, {padding}")
    sh, sw = (int(s) for s in stride)
    ph, pw = (int(p) for p in padding)
    if sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise ValueError(f"conv_block: stride must be >= 1 and padding >= 0, got {stride}, {padding}")
    n, cin, h, w = x.shape
    pw_w, dw_w, dw_b, pw_b = (w1, w2, b2, b1) if pattern == "pw_dw" else (w2, w1, b1, b2)
    if pw_w.dim() != 2:
        raise ValueError(f"conv_block: the pointwise weight must be 2-D [Cout, Cin], got {tuple(pw_w.shape)}")
    if dw_w.dim() != 3:
        raise ValueError(f"conv_block: the depthwise weight must be 3-D [C, kh, kw], got {tuple(dw_w.shape)}")
    if pattern == "pw_dw":
        cmid = w1.shape[0]
        if w1.shape[1] != cin:
            raise ValueError(f"conv_block: w1 {tuple(w1.shape)} does not match x's {cin} channels")
        if w2.shape[0] != cmid:
            raise ValueError(f"conv_block: w2 {tuple(w2.shape)} must have w1's {cmid} channels")
        cout = cmid
    else:
        if w1.shape[0] != cin:
            raise ValueError(f"conv_block: w1 {tuple(w1.shape)} does not match x's {cin} channels")
        if w2.shape[1] != cin:
            raise ValueError(f"conv_block: w2 {tuple(w2.shape)} must take x's {cin} channels")
        cout = w2.shape[0]
    if pw_b.shape != (pw_w.shape[0],) or dw_b.shape != (dw_w.shape[0],):
        raise ValueError("conv_block: b1 and b2 must be 1-D, one value per output channel of their conv")
    kh, kw = dw_w.shape[1], dw_w.shape[2]
    if kh < 1 or kw < 1:
        raise ValueError(f"conv_block: the depthwise kernel must be at least 1x1, got {kh}x{kw}")
    if h + 2 * ph < kh or w + 2 * pw < kw:
        raise ValueError(f"conv_block: the padded input {h + 2 * ph}x{w + 2 * pw} is smaller than the "
                         f"{kh}x{kw} kernel")
    ho = (h + 2 * ph - kh) // sh + 1
    wo = (w + 2 * pw - kw) // sw + 1
    out_shape = (n, cout, ho, wo)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"conv_block: residual has shape {tuple(residual.shape)}, the output {out_shape}")
    return (n, cin, h, w), cout, (kh, kw), (sh, sw), (ph, pw), (ho, wo)


def conv_block(x, w1, b1, w2, b2, residual, pattern: str, stride: tuple[int, int],
               padding: tuple[int, int], kind: str, param: float) -> torch.Tensor:
    """out = act(conv2(conv1(x) + b1) + b2 + residual) in one Triton launch; returns a new tensor
    [N, Cout, Ho, Wo] in x's dtype. See the module docstring for the tiling."""
    return _conv_block(x, w1, b1, w2, b2, residual, pattern, stride, padding, kind, param)


def _conv_block(x, w1, b1, w2, b2, residual, pattern, stride, padding, kind, param, use_dot=None):
    """conv_block; use_dot=True/False forces the tl.dot / outer-product path (tests)."""
    (n, cin, h, w), cout, (kh, kw), (sh, sw), (ph, pw), (ho, wo) = _check(
        x, w1, b1, w2, b2, residual, pattern, stride, padding, kind)
    if h * w >= 2**31 or ho * wo >= 2**31:
        raise ValueError(f"conv_block: one channel plane must have fewer than 2**31 pixels, got {h}x{w}")
    out = torch.empty((n, cout, ho, wo), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if use_dot is None:
        use_dot = cin >= _MIN_DOT
    min_block = _MIN_DOT if use_dot else 1
    block_p = _pow2_in(ho * wo, _MIN_DOT if use_dot else 1, _MAX_P)
    block_c = _pow2_in(cout, min_block, _MAX_C)
    block_k = _pow2_in(cin, _MIN_DOT, 64 if pattern == "pw_dw" else 32)
    grid = (triton.cdiv(ho * wo, block_p), triton.cdiv(cout, block_c), n)
    if grid[1] > 65535 or grid[2] > 65535:
        raise ValueError(f"conv_block: too many channel blocks or images for one launch (grid {grid})")
    # float32: IEEE float32 dots. The interpreter multiplies bfloat16 dot operands as their raw
    # uint16 bits, so there bfloat16 dots run on float32 copies (exact products, same result).
    dot_f32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _INTERPRETED)
    res = residual if residual is not None else out  # never read when HAS_RES is False
    common = dict(KH=kh, KW=kw, KIND=kinds.KIND_IDS[kind], HAS_RES=residual is not None,
                  USE_DOT=use_dot, DOT_F32=dot_f32, BLOCK_P=block_p, BLOCK_K=block_k)
    # the parameter as float32 bits, the epilogue's type (compiled and interpreted alike)
    args = (x, w1, b1, w2, b2, res, out, cin, cout, h, w, ho, wo, sh, sw, ph, pw, param_bits(param, False))
    with device_guard(x.device):
        if pattern == "pw_dw":
            launcher(_pw_dw_kernel, x)[grid](*args, BLOCK_C=block_c, num_stages=2, **common, **_LAUNCH_OPTIONS)
        else:
            launcher(_dw_pw_kernel, x)[grid](*args, BLOCK_O=block_c, num_stages=1, **common, **_LAUNCH_OPTIONS)
    return out
