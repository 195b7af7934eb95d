// conv_block, CPU: act(conv2(conv1(x) + b1) + b2 + residual) for the two MobileNet-style pairs,
// with the intermediate map kept in per-thread buffers that stay in L1/L2, never in memory.
//
//   pw_dw (pattern 0): a work item is (image, block of mid channels, band of output rows). It
//     walks the band R output rows at a time, keeping for each channel a window of the
//     intermediate rows the depthwise taps need: new rows come from a register-blocked GEMM
//     (w1 x a few rows of x), each computed once; rows still needed slide to the window's front.
//   dw_pw (pattern 1): a work item is (image, tile of R output rows, block of output channels).
//     The depthwise result of every input channel over the tile goes to a buffer `mid`, then the
//     GEMM w2 x mid writes the output tile.
// The depthwise loops run over zero-padded windows (no border cases), or, for stride 1 with
// "same" width (MobileNet's 3x3 layers), over plain rows with column masks, so that the pw_dw
// GEMM writes the window directly and the outputs come out in their final layout. Bias, residual
// and activation are an epilogue on data still in L1.
//
// The hot loops are written once (always_inline templates) and instantiated twice: for AVX2+FMA
// and for the x86-64 baseline, picked at run time. The GEMM micro-kernel uses GCC vector types
// (no intrinsics); the depthwise and epilogue loops are plain C++ that GCC vectorizes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ek_math.h"
#include "op_args.h"

// Vector-typed values in always_inline helpers would warn about the vector calling convention;
// they never cross a real call.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EK_X86 1
#define EK_AVX2 __attribute__((target("avx2,fma")))
#else
#define EK_X86 0
#define EK_AVX2
#endif
#define EK_INLINE inline __attribute__((always_inline))

namespace ek {

namespace {

// GCC vector types of VB bytes: 32 (8 floats, 4 doubles) for the AVX2 code, 16 for the baseline
// (generic 32-byte vectors on SSE end up spilled to the stack). `U` is the unaligned, may_alias
// view used for loads and stores. Broadcasts are written inline as `scalar * vector` or
// `scalar - V{}` (exact, folded to a broadcast): a splat helper function is lowered for the
// baseline ISA before it is inlined into the AVX2 code and comes out as element inserts.
template <typename T, int VB>
struct Simd {
  typedef T V __attribute__((vector_size(VB)));
  typedef T U __attribute__((vector_size(VB), aligned(sizeof(T)), may_alias));
  static constexpr int L = VB / int(sizeof(T));
};

template <typename T, int VB>
EK_INLINE typename Simd<T, VB>::V vload(const T* p) {
  return *reinterpret_cast<const typename Simd<T, VB>::U*>(p);
}
template <typename T, int VB>
EK_INLINE void vstore(T* p, const typename Simd<T, VB>::V& v) {
  *reinterpret_cast<typename Simd<T, VB>::U*>(p) = v;
}

// GEMM register block: MR rows (output channels) x NV vectors of pixels in accumulators
// (6 x 2 = 12 of the 16 ymm registers, the other ones hold the B row and the broadcast).
constexpr int kMR = 6;
constexpr int kNV = 2;
// K is blocked so one B panel (kKC x 2 vectors) stays in L1 while every row block reuses it.
constexpr int64_t kKC = 256;

// Thread-private scratch, grown on demand and kept across calls (no per-call allocation).
template <typename T, int SLOT>
T* buffer(int64_t n) {
  thread_local std::vector<T> data;
  if (static_cast<int64_t>(data.size()) < n) data.resize(n);
  return data.data();
}

// C[MR x NV*L] (row stride ldc) = init + sum_k A[r][k] * B[k][:], A row stride lda, B row stride
// ldb. init is C itself when `accumulate` (a later K block), else bias[r] (0 without bias).
template <typename T, int VB, int MR, int NV>
EK_INLINE void micro(int64_t K, const T* __restrict A, int64_t lda, const T* __restrict B, int64_t ldb,
                     T* __restrict C, int64_t ldc, const T* bias, bool accumulate) {
  using S = Simd<T, VB>;
  using V = typename S::V;
  constexpr int L = S::L;
  V c[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      c[r][v] = accumulate ? vload<T, VB>(C + r * ldc + v * L) : (bias ? bias[r] : T(0)) - V{};
    }
  }
  const T* a[MR];
  for (int r = 0; r < MR; ++r) a[r] = A + r * lda;
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload<T, VB>(B + k * ldb + v * L);
    for (int r = 0; r < MR; ++r) {
      const T ar = a[r][k];
      for (int v = 0; v < NV; ++v) c[r][v] += ar * b[v];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) vstore<T, VB>(C + r * ldc + v * L, c[r][v]);
  }
}

// All row blocks of one column block: full MR blocks, then one smaller block for the rest.
template <typename T, int VB, int NV>
EK_INLINE void micro_rows(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                          int64_t ldc, const T* bias, bool accumulate) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) {
    const T* bm = bias ? bias + m : nullptr;
    micro<T, VB, kMR, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, bm, accumulate);
  }
  const T* bm = bias ? bias + m : nullptr;
  switch (M - m) {
    case 5: micro<T, VB, 5, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, bm, accumulate); break;
    case 4: micro<T, VB, 4, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, bm, accumulate); break;
    case 3: micro<T, VB, 3, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, bm, accumulate); break;
    case 2: micro<T, VB, 2, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, bm, accumulate); break;
    case 1: micro<T, VB, 1, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, bm, accumulate); break;
    default: break;
  }
}

// C[M x N] = bias + A[M x K] * B[K x N] (row strides lda, ldb, ldc; columns contiguous).
// Each column block of B is packed into `pack` (kKC x kNV*L elements); the last, partial one
// zero-padded and computed into a local tile, so the micro-kernel never reads or writes past N.
template <typename T, int VB>
EK_INLINE void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                    T* C, int64_t ldc, const T* bias, T* pack) {
  constexpr int L = Simd<T, VB>::L;
  constexpr int NR = kNV * L;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, bias ? bias[m] : T(0));
    return;
  }
  const int64_t kblocks = (K + kKC - 1) / kKC;
  const int64_t kc_step = (K + kblocks - 1) / kblocks;
  for (int64_t k0 = 0; k0 < K; k0 += kc_step) {
    const int64_t kc = std::min(kc_step, K - k0);
    const bool accumulate = k0 > 0;
    const T* Ak = A + k0;
    const T* Bk = B + k0 * ldb;
    int64_t n = 0;
    for (; n + NR <= N; n += NR) {
      // B's rows are ldb apart (a channel plane, or a tile row of mid): packed contiguous, the
      // panel is kc * 64 bytes of sequential lines in L1 for all the row blocks that reuse it.
      for (int64_t k = 0; k < kc; ++k) {
        T* __restrict dst = pack + k * NR;
        const T* __restrict src = Bk + k * ldb + n;
        for (int j = 0; j < NR; ++j) dst[j] = src[j];
      }
      micro_rows<T, VB, kNV>(M, kc, Ak, lda, pack, NR, C + n, ldc, bias, accumulate);
    }
    if (n == N) continue;
    // Tail columns: one or two vectors wide, zero-padded in `pack`, computed MR rows at a time
    // into `tile` and copied out.
    const int64_t nr = N - n;
    const int64_t width = nr <= L ? L : NR;
    for (int64_t k = 0; k < kc; ++k) {
      T* dst = pack + k * width;
      const T* src = Bk + k * ldb + n;
      for (int64_t j = 0; j < nr; ++j) dst[j] = src[j];
      for (int64_t j = nr; j < width; ++j) dst[j] = T(0);
    }
    alignas(64) T tile[kMR * NR];
    for (int64_t m = 0; m < M; m += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, M - m);
      if (accumulate) {
        for (int64_t r = 0; r < mr; ++r) {
          for (int64_t j = 0; j < nr; ++j) tile[r * width + j] = C[(m + r) * ldc + n + j];
        }
      }
      const T* bm = bias ? bias + m : nullptr;
      if (width == L) {
        micro_rows<T, VB, 1>(mr, kc, Ak + m * lda, lda, pack, width, tile, width, bm, accumulate);
      } else {
        micro_rows<T, VB, 2>(mr, kc, Ak + m * lda, lda, pack, width, tile, width, bm, accumulate);
      }
      for (int64_t r = 0; r < mr; ++r) {
        for (int64_t j = 0; j < nr; ++j) C[(m + r) * ldc + n + j] = tile[r * width + j];
      }
    }
  }
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Padded-window depthwise loops and the epilogue's rows run in whole steps of this many elements.
constexpr int64_t kDwStep = 8;

// The depthwise convolution as one flat loop. `in` is a zero-padded input window: row stride Wp,
// window row 0 = the first tap row, padding columns and out-of-map rows hold zeros, so there are
// no borders to special-case. With stride 1 several output rows are one loop (see dw_rows):
// output q = oh * Wp + ow reads in[q + i*Wp + j] for tap (i, j), one constant offset per tap,
// and there is no per-row overhead, which matters for the 7x7 and 14x14 maps.
//   out[q] = bias + sum_{i,j} w[i*kw + j] * in[sw*q + i*Wp + j],  q < count rounded up to kDwStep
// (the buffers have slack for the rounding).
// KH/KW/SW > 0 fix the sizes at compile time: the taps unroll and GCC vectorizes over q.
template <typename T, int KH, int KW, int SW>
EK_INLINE void dw_flat(const T* __restrict in, int64_t Wp, const T* w, T bias, int64_t count,
                       T* __restrict out, int64_t kh_rt, int64_t kw_rt, int64_t sw_rt) {
  count = round_up(count, kDwStep);
  if constexpr (KH > 0 && KW > 0 && SW > 0) {
    T wl[KH * KW];
    for (int t = 0; t < KH * KW; ++t) wl[t] = w[t];
    for (int64_t q = 0; q < count; ++q) {
      T acc = bias;
      for (int i = 0; i < KH; ++i) {
        for (int j = 0; j < KW; ++j) acc += wl[i * KW + j] * in[SW * q + i * Wp + j];
      }
      out[q] = acc;
    }
  } else {
    for (int64_t q = 0; q < count; ++q) out[q] = bias;
    for (int64_t i = 0; i < kh_rt; ++i) {
      for (int64_t j = 0; j < kw_rt; ++j) {
        const T wv = w[i * kw_rt + j];
        const T* r = in + i * Wp + j;
        for (int64_t q = 0; q < count; ++q) out[q] += wv * r[sw_rt * q];
      }
    }
  }
}

// dw_flat with the common kernel sizes and strides fixed at compile time.
template <typename T>
EK_INLINE void dw_any(const T* in, int64_t Wp, const T* w, T bias, int64_t count, T* out, int64_t kh,
                      int64_t kw, int64_t sw) {
  if (kh == 3 && kw == 3 && sw == 1) return dw_flat<T, 3, 3, 1>(in, Wp, w, bias, count, out, kh, kw, sw);
  if (kh == 3 && kw == 3 && sw == 2) return dw_flat<T, 3, 3, 2>(in, Wp, w, bias, count, out, kh, kw, sw);
  if (kh == 5 && kw == 5 && sw == 1) return dw_flat<T, 5, 5, 1>(in, Wp, w, bias, count, out, kh, kw, sw);
  if (kh == 5 && kw == 5 && sw == 2) return dw_flat<T, 5, 5, 2>(in, Wp, w, bias, count, out, kh, kw, sw);
  dw_flat<T, 0, 0, 0>(in, Wp, w, bias, count, out, kh, kw, sw);
}

// `rows` depthwise output rows from the padded window `in` into `out` (row stride Wq). Output row
// oh starts sh * oh window rows down. With stride 1 that is one flat loop (Wq = Wp: Wp - Wo
// scratch columns per row); with other strides a flat index would need Wq = sh * Wp / sw, about
// half scratch, so each row is its own loop (Wq = Wo; a row's rounded-up overrun lands in the
// next row, which is written after it, or in the buffer's slack).
template <typename T>
EK_INLINE void dw_rows(const T* in, int64_t Wp, int64_t Wq, const T* w, T bias, int64_t rows, T* out,
                       int64_t kh, int64_t kw, int64_t sh, int64_t sw) {
  if (sh == 1 && sw == 1) return dw_any<T>(in, Wp, w, bias, rows * Wq, out, kh, kw, sw);
  for (int64_t r = 0; r < rows; ++r) dw_any<T>(in + r * sh * Wp, Wp, w, bias, Wq, out + r * Wq, kh, kw, sw);
}

// Stride 1 with the output as wide as the input (2 * pw == kw - 1, MobileNet's case): the window
// has no padding columns (row stride W), so the pw_dw GEMM writes it directly and the outputs come
// out in their final layout, no copies. A tap whose column falls outside the row is dropped by the
// column masks: mask[j*mstride + q] is all ones iff column q % W + j - pw is inside the map, else
// 0, and is ANDed into the bits of that kernel column's sum. (Not a product: a NaN or inf in the
// neighbouring row must not leak in; not a ?: select: GCC does not if-convert that under the
// default -ftrapping-math and leaves the loop scalar.) `in` has pw readable elements before it and
// kw after the rows.
//   out[q] = bias + sum_j (mask_j[q] & sum_i w[i*kw + j] * in[q + i*W + j - pw]),  q < count
template <typename T>
struct Bits;
template <>
struct Bits<float> { using U = uint32_t; };
template <>
struct Bits<double> { using U = uint64_t; };
template <typename T>
using Mask = typename Bits<T>::U;

template <typename T>
EK_INLINE T keep_if(T v, Mask<T> m) {
  Mask<T> bits;
  std::memcpy(&bits, &v, sizeof(T));
  bits &= m;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

template <typename T, int KH, int KW>
EK_INLINE void dw_same(const T* __restrict in, int64_t W, const T* w, T bias, int64_t count,
                       T* __restrict out, const Mask<T>* __restrict mask, int64_t mstride, int64_t pw,
                       int64_t kh_rt, int64_t kw_rt) {
  const T* base = in - pw;
  if constexpr (KH > 0 && KW > 0) {
    T wl[KH * KW];
    for (int t = 0; t < KH * KW; ++t) wl[t] = w[t];
    for (int64_t q = 0; q < count; ++q) {
      T acc = bias;
      for (int j = 0; j < KW; ++j) {
        T col = T(0);
        for (int i = 0; i < KH; ++i) col += wl[i * KW + j] * base[q + i * W + j];
        acc += keep_if(col, mask[j * mstride + q]);
      }
      out[q] = acc;
    }
  } else {
    for (int64_t q = 0; q < count; ++q) out[q] = bias;
    for (int64_t j = 0; j < kw_rt; ++j) {
      const Mask<T>* mj = mask + j * mstride;
      for (int64_t i = 0; i < kh_rt; ++i) {
        const T wv = w[i * kw_rt + j];
        const T* r = base + i * W + j;
        for (int64_t q = 0; q < count; ++q) out[q] += keep_if(wv * r[q], mj[q]);
      }
    }
  }
}

template <typename T>
EK_INLINE void dw_same_any(const T* in, int64_t W, const T* w, T bias, int64_t count, T* out,
                           const Mask<T>* mask, int64_t mstride, int64_t pw, int64_t kh, int64_t kw) {
  if (kh == 3 && kw == 3) return dw_same<T, 3, 3>(in, W, w, bias, count, out, mask, mstride, pw, kh, kw);
  if (kh == 5 && kw == 5) return dw_same<T, 5, 5>(in, W, w, bias, count, out, mask, mstride, pw, kh, kw);
  dw_same<T, 0, 0>(in, W, w, bias, count, out, mask, mstride, pw, kh, kw);
}

// dst[r*cols + c] = act(src[r*src_stride + c] + res[r*cols + c]) for r < rows, c < cols; res may
// be null; src may be dst (in place, rows == 1). Every row but the last runs to a whole number of
// vectors: its overrun lands on the following rows of this call, which are written after, so the
// 7- and 14-wide rows of small maps take one or two vector steps instead of a scalar loop. The
// last row is exact (what follows belongs to another channel, maybe another thread).
template <typename T>
using Epilogue = void (*)(T*, const T*, int64_t, const T*, int64_t, int64_t, T);

template <typename T, int KIND>
EK_INLINE void epilogue_body(T* dst, const T* src, int64_t src_stride, const T* res, int64_t rows,
                             int64_t cols, T param) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = r + 1 < rows ? std::min(round_up(cols, kDwStep), (rows - r) * cols) : cols;
    T* __restrict d = dst + r * cols;
    const T* __restrict rr = res ? res + r * cols : nullptr;
    if (src == dst) {  // in place: only d is accessed, so the loops need no alias check
      if (rr) {
        for (int64_t i = 0; i < n; ++i) d[i] = activation<KIND>(d[i] + rr[i], param);
      } else {
        for (int64_t i = 0; i < n; ++i) d[i] = activation<KIND>(d[i], param);
      }
      continue;
    }
    const T* __restrict s = src + r * src_stride;
    if (rr) {
      for (int64_t i = 0; i < n; ++i) d[i] = activation<KIND>(s[i] + rr[i], param);
    } else {
      for (int64_t i = 0; i < n; ++i) d[i] = activation<KIND>(s[i], param);
    }
  }
}
template <typename T, int KIND>
EK_AVX2 void epilogue_avx2(T* dst, const T* src, int64_t src_stride, const T* res, int64_t rows, int64_t cols,
                           T param) {
  epilogue_body<T, KIND>(dst, src, src_stride, res, rows, cols, param);
}
template <typename T, int KIND>
void epilogue_base(T* dst, const T* src, int64_t src_stride, const T* res, int64_t rows, int64_t cols,
                   T param) {
  epilogue_body<T, KIND>(dst, src, src_stride, res, rows, cols, param);
}
template <typename T, int KIND>
Epilogue<T> epilogue_for(bool avx2) {
  return avx2 ? &epilogue_avx2<T, KIND> : &epilogue_base<T, KIND>;
}

template <typename T>
Epilogue<T> pick_epilogue(int64_t kind, bool avx2) {
  switch (kind) {
#define EK_KIND_CASE(K) \
  case K: return epilogue_for<T, K>(avx2);
    EK_FOR_EACH_KIND(EK_KIND_CASE)
#undef EK_KIND_CASE
  }
  TORCH_CHECK(false, "conv_block_cpu: unknown activation kind ", kind);
}

// Everything a work item needs: the tensors, the geometry and the tiling.
template <typename T>
struct Problem {
  const T *x, *w1, *b1, *w2, *b2, *res;
  T* out;
  int64_t N, Cin, Cout, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw;
  // Depthwise input window: row stride Wp, depthwise output row stride Wq (dw_rows), R output
  // rows per step, cap = the window's rows ((R - 1) * sh + kh), cs = one channel's window with
  // slack for the rounded-up loops, its rows starting at `front`. `same`: dw_same's layout
  // (Wp = W, masks [kw x mstride]), else padded columns and dw_rows.
  bool same;
  int64_t Wp, Wq, R, cap, cs, front, mstride;
  const Mask<T>* masks;
  // pw_dw: mid channels per block, blocks, output rows per band, bands.
  // dw_pw: output channels per block, blocks; a tile is R output rows, ntiles of them.
  int64_t cb, ncb, band, nbands, ntiles;
  Epilogue<T> epilogue;
  bool apply_epilogue;  // dw_pw: false for identity without residual
  T param;
};

// pw_dw work items [begin, end): item = ((n * ncb) + mid channel block) * nbands + band.
// Each step of R output rows first extends the channels' windows with the intermediate rows it
// needs (zero rows outside the map; the GEMM of w1 and x rows inside, written straight into the
// windows in `same` mode, else into `flat` and copied between the padding columns), each row
// computed once per item; then the depthwise and the epilogue per channel.
template <typename T, int VB>
EK_INLINE void pw_dw_items(const Problem<T>& p, int64_t begin, int64_t end) {
  const int64_t HW = p.H * p.W, Wp = p.Wp, cs = p.cs;
  T* win = buffer<T, 0>(p.cb * cs);
  T* flat = buffer<T, 1>(p.same ? 0 : p.cb * p.cap * p.W);  // padded mode: GEMM output before `win`
  T* dwo = buffer<T, 2>(p.R * p.Wq + kDwStep);
  T* pack = buffer<T, 3>(kKC * kNV * Simd<T, VB>::L);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t band = item % p.nbands, rest = item / p.nbands;
    const int64_t m0 = (rest % p.ncb) * p.cb, n = rest / p.ncb;
    const int64_t mcount = std::min(p.cb, p.Cout - m0);
    const int64_t oh0 = band * p.band, oh1 = std::min(p.Ho, oh0 + p.band);
    const T* xn = p.x + n * p.Cin * HW;
    std::fill(win, win + mcount * cs, T(0));
    T* rows0 = win + p.front;  // a channel's window rows start at rows0 + m * cs
    int64_t top = oh0 * p.sh, filled = 0;  // the windows hold padded rows [top, top + filled)
    for (int64_t oa = oh0; oa < oh1; oa += p.R) {
      const int64_t ob = std::min(oh1, oa + p.R);
      const int64_t need_lo = oa * p.sh, need_hi = (ob - 1) * p.sh + p.kh;
      if (need_lo > top) {  // drop the rows above; the overlap moves to the front
        const int64_t keep = std::max<int64_t>(0, top + filled - need_lo);
        if (keep > 0) {
          for (int64_t m = 0; m < mcount; ++m) {
            T* w = rows0 + m * cs;
            std::memmove(w, w + (need_lo - top) * Wp, keep * Wp * sizeof(T));
          }
        }
        top = need_lo, filled = keep;
      }
      // New padded rows [top + filled, need_hi): zeros outside the map, GEMM rows inside.
      const int64_t r0 = top + filled;
      for (int64_t ip = r0; ip < need_hi; ++ip) {
        if (ip - p.ph >= 0 && ip - p.ph < p.H) continue;
        for (int64_t m = 0; m < mcount; ++m) std::fill_n(rows0 + m * cs + (ip - top) * Wp, Wp, T(0));
      }
      const int64_t a = std::max<int64_t>(r0 - p.ph, 0), b = std::min(need_hi - p.ph, p.H);
      if (a < b && p.same) {  // the window rows are plain rows: the GEMM writes them in place
        gemm<T, VB>(mcount, (b - a) * p.W, p.Cin, p.w1 + m0 * p.Cin, p.Cin, xn + a * p.W, HW,
                    rows0 + (a + p.ph - top) * Wp, cs, p.b1 + m0, pack);
      } else if (a < b) {
        const int64_t npx = (b - a) * p.W;
        gemm<T, VB>(mcount, npx, p.Cin, p.w1 + m0 * p.Cin, p.Cin, xn + a * p.W, HW, flat, npx, p.b1 + m0,
                    pack);
        for (int64_t m = 0; m < mcount; ++m) {
          for (int64_t ih = a; ih < b; ++ih) {
            std::memcpy(win + m * cs + (ih + p.ph - top) * Wp + p.pw, flat + m * npx + (ih - a) * p.W,
                        p.W * sizeof(T));
          }
        }
      }
      filled = need_hi - top;
      for (int64_t m = 0; m < mcount; ++m) {
        const int64_t c = m0 + m;
        const T* w2 = p.w2 + c * p.kh * p.kw;
        const int64_t offset = ((n * p.Cout + c) * p.Ho + oa) * p.Wo;
        T* o = p.out + offset;
        const T* r = p.res ? p.res + offset : nullptr;
        if (p.same) {  // straight into the output, then the epilogue in place
          const int64_t count = (ob - oa) * p.Wo;
          dw_same_any<T>(rows0 + m * cs, p.W, w2, p.b2[c], count, o, p.masks, p.mstride, p.pw, p.kh, p.kw);
          if (p.apply_epilogue) p.epilogue(o, o, count, r, 1, count, p.param);
        } else {
          dw_rows<T>(win + m * cs, Wp, p.Wq, w2, p.b2[c], ob - oa, dwo, p.kh, p.kw, p.sh, p.sw);
          p.epilogue(o, dwo, p.Wq, r, ob - oa, p.Wo, p.param);
        }
      }
    }
  }
}

// dw_pw work items [begin, end): item = ((n * ntiles) + tile) * ncb + output channel block.
// The depthwise result of every input channel over the tile's R output rows goes to `mid`
// [Cin x R*Wo]; then out = w2 x mid + b2, and the epilogue in place.
template <typename T, int VB>
EK_INLINE void dw_pw_items(const Problem<T>& p, int64_t begin, int64_t end) {
  const int64_t HW = p.H * p.W, P = p.Ho * p.Wo, Wp = p.Wp;
  T* mid = buffer<T, 0>(p.Cin * p.R * p.Wo + kDwStep);
  T* win = buffer<T, 1>(p.cs);
  T* dwo = buffer<T, 2>(p.R * p.Wq + kDwStep);
  T* pack = buffer<T, 3>(kKC * kNV * Simd<T, VB>::L);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t cblock = item % p.ncb, rest = item / p.ncb;
    const int64_t t = rest % p.ntiles, n = rest / p.ntiles;
    const int64_t oa = t * p.R, ob = std::min(p.Ho, oa + p.R), np = (ob - oa) * p.Wo;
    const int64_t co0 = cblock * p.cb, cocount = std::min(p.cb, p.Cout - co0);
    const int64_t need_lo = oa * p.sh, need_hi = (ob - 1) * p.sh + p.kh;
    const int64_t a = std::max<int64_t>(need_lo - p.ph, 0), b = std::min(need_hi - p.ph, p.H);  // map rows
    std::fill(win, win + p.cs, T(0));  // padding columns, guards and out-of-map rows stay zero
    for (int64_t c = 0; c < p.Cin; ++c) {
      const T* plane = p.x + (n * p.Cin + c) * HW;
      T* d = mid + c * np;
      const T* w = p.w1 + c * p.kh * p.kw;
      if (p.same) {  // rows a..b are one contiguous copy; outputs straight into mid
        if (a < b) {
          std::memcpy(win + p.front + (a + p.ph - need_lo) * Wp, plane + a * p.W, (b - a) * p.W * sizeof(T));
        }
        dw_same_any<T>(win + p.front, p.W, w, p.b1[c], np, d, p.masks, p.mstride, p.pw, p.kh, p.kw);
        continue;
      }
      for (int64_t ih = a; ih < b; ++ih) {
        std::memcpy(win + (ih + p.ph - need_lo) * Wp + p.pw, plane + ih * p.W, p.W * sizeof(T));
      }
      if (p.Wq == p.Wo) {  // no scratch columns: straight into mid (the overrun lands in slack)
        dw_rows<T>(win, Wp, p.Wq, w, p.b1[c], ob - oa, d, p.kh, p.kw, p.sh, p.sw);
      } else {
        dw_rows<T>(win, Wp, p.Wq, w, p.b1[c], ob - oa, dwo, p.kh, p.kw, p.sh, p.sw);
        // Whole vectors per row: the overrun lands on the next row (copied next) or the slack.
        const int64_t width = round_up(p.Wo, kDwStep);
        for (int64_t r = 0; r < ob - oa; ++r) {
          T* __restrict to = d + r * p.Wo;
          const T* __restrict from = dwo + r * p.Wq;
          for (int64_t i = 0; i < width; ++i) to[i] = from[i];
        }
      }
    }
    T* dst = p.out + (n * p.Cout + co0) * P + oa * p.Wo;
    gemm<T, VB>(cocount, np, p.Cin, p.w2 + co0 * p.Cin, p.Cin, mid, np, dst, P, p.b2 + co0, pack);
    if (p.apply_epilogue) {
      for (int64_t co = 0; co < cocount; ++co) {
        const int64_t offset = (n * p.Cout + co0 + co) * P + oa * p.Wo;
        p.epilogue(p.out + offset, p.out + offset, np, p.res ? p.res + offset : nullptr, 1, np, p.param);
      }
    }
  }
}

template <typename T>
EK_AVX2 void pw_dw_avx2(const Problem<T>& p, int64_t begin, int64_t end) {
  pw_dw_items<T, 32>(p, begin, end);
}
template <typename T>
void pw_dw_base(const Problem<T>& p, int64_t begin, int64_t end) {
  pw_dw_items<T, 16>(p, begin, end);
}
template <typename T>
EK_AVX2 void dw_pw_avx2(const Problem<T>& p, int64_t begin, int64_t end) {
  dw_pw_items<T, 32>(p, begin, end);
}
template <typename T>
void dw_pw_base(const Problem<T>& p, int64_t begin, int64_t end) {
  dw_pw_items<T, 16>(p, begin, end);
}

// EK_CONV_BLOCK_BASELINE (a build flag for testing) forces the baseline code.
bool has_avx2_fma() {
#if EK_X86 && !defined(EK_CONV_BLOCK_BASELINE)
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

// Per-thread budgets: the pw_dw windows (+ GEMM output) and the dw_pw tile buffer stay in L2
// (512 KB per core on the 2-core EPYC this was tuned on); one channel's part is in L1 while it
// is being worked on.
constexpr int64_t kWindowBytes = 192 << 10;
constexpr int64_t kTileBytes = 256 << 10;
// Output pixels per depthwise step (pw_dw) or tile (dw_pw) to aim for: long flat loops and GEMMs.
constexpr int64_t kStepPixels = 128;
constexpr int64_t kMinTilePixels = 64;
constexpr int64_t kMinBandRows = 8;

template <typename T>
void plan_window(Problem<T>& p, int64_t rows) {
  p.same = p.sh == 1 && p.sw == 1 && p.Wo == p.W;
  p.R = std::max<int64_t>(1, std::min(p.Ho, rows));
  p.cap = (p.R - 1) * p.sh + p.kh;
  if (p.same) {
    p.Wp = p.Wq = p.W;
    p.front = round_up(p.pw, 16);
    p.cs = round_up(p.front + p.cap * p.Wp + p.kw, 16);
    p.mstride = p.R * p.W;
  } else {
    p.Wp = p.W + 2 * p.pw;
    p.Wq = p.sh == 1 && p.sw == 1 ? p.Wp : p.Wo;
    p.front = 0;
    p.cs = round_up(p.cap * p.Wp + p.sw * kDwStep + p.kw, 16);
    p.mstride = 0;
  }
}

template <typename T>
void plan_pw_dw(Problem<T>& p, int64_t threads) {
  plan_window(p, ceil_div(kStepPixels, p.Wo));
  // Mid channels per block: as many as the window budget holds, since every block streams all
  // of x again. Then, when images x blocks cannot keep the threads busy, bands of output rows
  // (each recomputes kh - sh intermediate rows, so bands stay >= kMinBandRows tall), and only
  // then smaller channel blocks.
  const int64_t groups = ceil_div(p.Cout, kMR);
  const int64_t per_channel = (p.cs + (p.same ? 0 : p.cap * p.W)) * int64_t(sizeof(T));
  const int64_t by_cache = std::max<int64_t>(1, kWindowBytes / (per_channel * kMR));
  int64_t ncb = ceil_div(groups, by_cache);
  p.nbands = 1;
  const int64_t want = 4 * threads;
  if (p.N * ncb < want) {
    p.nbands = std::max<int64_t>(1, std::min(ceil_div(want, p.N * ncb), p.Ho / kMinBandRows));
    if (p.N * ncb * p.nbands < want) ncb = std::max(ncb, std::min(groups, ceil_div(want, p.N * p.nbands)));
  }
  p.cb = ceil_div(groups, ncb) * kMR;
  p.ncb = ceil_div(p.Cout, p.cb);
  p.band = ceil_div(p.Ho, p.nbands);
  p.nbands = ceil_div(p.Ho, p.band);
}

template <typename T>
void plan_dw_pw(Problem<T>& p, int64_t threads) {
  // Tile rows: the depthwise buffer [Cin x R*Wo] within budget, but at least kMinTilePixels
  // pixels so the GEMM has whole column blocks and reuses its weights; more tiles when images x
  // tiles cannot keep the threads busy; then equal tiles. Then output channel blocks (each
  // recomputes its tile's depthwise, about kh*kw / Cout of the GEMM's work).
  const int64_t row_bytes = std::max<int64_t>(1, p.Cin) * p.Wo * int64_t(sizeof(T));
  const int64_t rows_min = std::min(p.Ho, ceil_div(kMinTilePixels, p.Wo));
  const int64_t rows = std::max(rows_min, std::min(p.Ho, kTileBytes / row_bytes));
  int64_t ntiles = ceil_div(p.Ho, rows);
  if (p.N * ntiles < 2 * threads) {
    ntiles = std::max(ntiles, std::min(ceil_div(2 * threads, p.N), p.Ho / rows_min));
  }
  plan_window(p, ceil_div(p.Ho, ntiles));
  p.ntiles = ceil_div(p.Ho, p.R);
  p.ncb = 1;
  if (p.N * p.ntiles < 2 * threads) {
    p.ncb = std::min(ceil_div(p.Cout, kMR), ceil_div(2 * threads, p.N * p.ntiles));
  }
  p.cb = round_up(ceil_div(p.Cout, p.ncb), kMR);
  p.ncb = ceil_div(p.Cout, p.cb);
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
         const at::Tensor& b2, const std::optional<at::Tensor>& residual, at::Tensor& out, int64_t pattern,
         int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t kind, double param) {
  const bool avx2 = has_avx2_fma();
  Problem<T> p{};
  p.x = x.const_data_ptr<T>();
  p.w1 = w1.const_data_ptr<T>();
  p.b1 = b1.const_data_ptr<T>();
  p.w2 = w2.const_data_ptr<T>();
  p.b2 = b2.const_data_ptr<T>();
  p.res = residual.has_value() ? residual->const_data_ptr<T>() : nullptr;
  p.out = out.data_ptr<T>();
  p.N = x.size(0), p.Cin = x.size(1), p.H = x.size(2), p.W = x.size(3);
  p.Cout = out.size(1), p.Ho = out.size(2), p.Wo = out.size(3);
  p.kh = kh, p.kw = kw, p.sh = sh, p.sw = sw, p.ph = ph, p.pw = pw;
  p.epilogue = pick_epilogue<T>(kind, avx2);
  p.apply_epilogue = kind != kIdentity || p.res != nullptr;
  p.param = static_cast<T>(param);
  if (out.numel() == 0) return;
  const int64_t threads = at::get_num_threads();
  std::vector<Mask<T>> masks;
  auto make_masks = [&] {  // dw_same's column masks, shared read-only by the threads
    if (!p.same) return;
    masks.assign(p.kw * p.mstride, 0);
    for (int64_t j = 0; j < p.kw; ++j) {
      for (int64_t q = 0; q < p.mstride; ++q) {
        const int64_t col = q % p.W + j - p.pw;
        masks[j * p.mstride + q] = col >= 0 && col < p.W ? ~Mask<T>(0) : Mask<T>(0);
      }
    }
    p.masks = masks.data();
  };
  if (pattern == 0) {
    plan_pw_dw(p, threads);
    make_masks();
    const int64_t items = p.N * p.ncb * p.nbands;
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      if (avx2) pw_dw_avx2<T>(p, begin, end); else pw_dw_base<T>(p, begin, end);
    });
  } else {
    plan_dw_pw(p, threads);
    make_masks();
    const int64_t items = p.N * p.ntiles * p.ncb;
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      if (avx2) dw_pw_avx2<T>(p, begin, end); else dw_pw_base<T>(p, begin, end);
    });
  }
}

}  // namespace

at::Tensor conv_block_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                          const at::Tensor& w2, const at::Tensor& b2,
                          const std::optional<at::Tensor>& residual, int64_t pattern, int64_t stride_h,
                          int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t kind, double param) {
  TORCH_CHECK(pattern == 0 || pattern == 1, "conv_block_cpu: pattern must be 0 (pw_dw) or 1 (dw_pw), got ",
              pattern);
  TORCH_CHECK(kind >= kIdentity && kind <= kElu, "conv_block_cpu: unknown activation kind ", kind);
  TORCH_CHECK(x.dim() == 4, "conv_block_cpu: x must be 4-D [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "conv_block_cpu: tensors must be on the CPU, got ", x.device());
  TORCH_CHECK(x.is_contiguous(), "conv_block_cpu: x must be contiguous (NCHW)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "conv_block_cpu: x must be float32 or float64, got ", x.scalar_type());
  const std::pair<const char*, const at::Tensor*> params[] = {
      {"w1", &w1}, {"b1", &b1}, {"w2", &w2}, {"b2", &b2}};
  for (const auto& [name, t] : params) {
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == x.scalar_type(), "conv_block_cpu: ", name,
                " must have x's dtype and device (", x.scalar_type(), ", ", x.device(), "), got ",
                t->scalar_type(), ", ", t->device());
    TORCH_CHECK(t->is_contiguous(), "conv_block_cpu: ", name, " must be contiguous");
  }
  TORCH_CHECK(stride_h >= 1 && stride_w >= 1, "conv_block_cpu: stride must be >= 1, got (", stride_h, ", ",
              stride_w, ")");
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, "conv_block_cpu: padding must be >= 0, got (", pad_h, ", ", pad_w,
              ")");
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const at::Tensor& dw = pattern == 0 ? w2 : w1;  // the depthwise weight [C, kh, kw]
  const at::Tensor& pt = pattern == 0 ? w1 : w2;  // the pointwise weight [Cout, Cin']
  TORCH_CHECK(dw.dim() == 3, "conv_block_cpu: the depthwise weight must be [C, kh, kw], got ", dw.sizes());
  TORCH_CHECK(pt.dim() == 2, "conv_block_cpu: the pointwise weight must be [Cout, Cin], got ", pt.sizes());
  TORCH_CHECK(b1.dim() == 1 && b2.dim() == 1, "conv_block_cpu: the biases must be 1-D, got ", b1.sizes(),
              " and ", b2.sizes());
  const int64_t kh = dw.size(1), kw = dw.size(2);
  TORCH_CHECK(kh >= 1 && kw >= 1, "conv_block_cpu: the depthwise kernel must be at least 1x1, got ", kh, "x",
              kw);
  const char* name = pattern == 0 ? "conv_block_cpu pw_dw: " : "conv_block_cpu dw_pw: ";
  int64_t Cout = 0;
  if (pattern == 0) {  // pw_dw: w1 [Cmid, Cin], b1 [Cmid], w2 [Cmid, kh, kw], b2 [Cmid]
    Cout = w1.size(0);
    TORCH_CHECK(w1.size(1) == Cin, name, "w1 must be [Cmid, ", Cin, "], got ", w1.sizes());
    TORCH_CHECK(b1.size(0) == Cout, name, "b1 must be [", Cout, "], got ", b1.sizes());
    TORCH_CHECK(w2.size(0) == Cout, name, "w2 must be [", Cout, ", kh, kw], got ", w2.sizes());
    TORCH_CHECK(b2.size(0) == Cout, name, "b2 must be [", Cout, "], got ", b2.sizes());
  } else {  // dw_pw: w1 [Cin, kh, kw], b1 [Cin], w2 [Cout, Cin], b2 [Cout]
    Cout = w2.size(0);
    TORCH_CHECK(w1.size(0) == Cin, name, "w1 must be [", Cin, ", kh, kw], got ", w1.sizes());
    TORCH_CHECK(b1.size(0) == Cin, name, "b1 must be [", Cin, "], got ", b1.sizes());
    TORCH_CHECK(w2.size(1) == Cin, name, "w2 must be [Cout, ", Cin, "], got ", w2.sizes());
    TORCH_CHECK(b2.size(0) == Cout, name, "b2 must be [", Cout, "], got ", b2.sizes());
  }
  const int64_t Ho = H + 2 * pad_h >= kh ? (H + 2 * pad_h - kh) / stride_h + 1 : 0;
  const int64_t Wo = W + 2 * pad_w >= kw ? (W + 2 * pad_w - kw) / stride_w + 1 : 0;
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "conv_block_cpu: the ", kh, "x", kw, " kernel with padding (", pad_h, ", ",
              pad_w, ") does not fit the ", H, "x", W, " input (the output would be ", Ho, "x", Wo, ")");
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.sizes() == at::IntArrayRef({N, Cout, Ho, Wo}),
                "conv_block_cpu: residual must have the output's shape [", N, ", ", Cout, ", ", Ho, ", ", Wo,
                "], got ", r.sizes());
    TORCH_CHECK(r.device() == x.device() && r.scalar_type() == x.scalar_type(),
                "conv_block_cpu: residual must have x's dtype and device, got ", r.scalar_type(), ", ",
                r.device());
    TORCH_CHECK(r.is_contiguous(), "conv_block_cpu: residual must be contiguous (NCHW)");
  }
  at::Tensor out = at::empty({N, Cout, Ho, Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_block_cpu", [&] {
    run<scalar_t>(x, w1, b1, w2, b2, residual, out, pattern, kh, kw, stride_h, stride_w, pad_h, pad_w, kind,
                  param);
  });
  return out;
}

namespace {
at::Tensor conv_block_op(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                         const at::Tensor& b2, const std::optional<at::Tensor>& residual, c10::string_view pattern,
                         c10::IntArrayRef stride, c10::IntArrayRef padding, c10::string_view kind, double param) {
  const auto [stride_h, stride_w] = pair_arg(stride, "stride");
  const auto [pad_h, pad_w] = pair_arg(padding, "padding");
  return conv_block_cpu(x, w1, b1, w2, b2, residual, pattern_id(pattern), stride_h, stride_w, pad_h, pad_w,
                        kind_id(kind), param);
}
}  // namespace

TORCH_LIBRARY_IMPL(easier_kernels, CPU, m) { m.impl("conv_block", &conv_block_op); }

}  // namespace ek
