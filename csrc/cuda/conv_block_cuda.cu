// conv_block, CUDA: out = act(conv2(conv1(x) + b1) + b2 + residual) for the two separable chains,
// with the intermediate map kept in shared memory (it never goes to global memory):
//  * pattern 0, pw_dw: pointwise w1 [Cmid, Cin], then depthwise w2 [Cmid, kh, kw] with the stride and
//    the zero padding of the intermediate map. A block owns (n, a 2-D tile of output pixels, a block
//    of mid channels): it computes the intermediate over the tile's halo (its receptive field) into
//    shared memory, Cin in chunks, then the depthwise outputs from there.
//  * pattern 1, dw_pw: depthwise w1 [Cin, kh, kw] on x (stride, zero padding of x), then pointwise
//    w2 [Cout, Cin]. A block owns (n, a run of output pixels, a block of output channels): per Cin
//    chunk it computes the depthwise values at its pixels into shared memory, then every thread adds
//    them into its outputs' pointwise sums, kept in registers.
// Sums are in float for half/bfloat16 and in the tensor's type otherwise; the intermediate is not
// rounded to the tensor's type. Offsets into tensors are 64-bit.
#include <climits>

#include "counting_cuda.cuh"  // CudaElem (load/store/compute_t) and dispatch_dtype

namespace {
using ek::CudaElem;

constexpr int kConvThreads = 256;
constexpr int kMidsPerItem = 4;  // pw_dw: mid channels one thread sums per halo pixel (16-byte weight loads)
constexpr int kOutsPerItem = 8;  // dw_pw: output channels one thread sums per pixel
constexpr int64_t kDefaultSmem = 48 * 1024;  // dynamic shared memory without the opt-in attribute

template <typename I>
__host__ __device__ __forceinline__ I min_of(I a, I b) { return a < b ? a : b; }
template <typename I>
__host__ __device__ __forceinline__ I max_of(I a, I b) { return a < b ? b : a; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Shapes and pointers; C is the output's channel count (Cmid for pw_dw, Cout for dw_pw).
struct Problem {
  const void *x, *w1, *b1, *w2, *b2, *residual;  // residual may be null
  void* out;
  int64_t N, Cin, H, W, C, Ho, Wo, kh, kw, sh, sw, ph, pw;
};

struct PwDwTiles {
  int th, tw;  // output tile (rows, columns)
  int cm;      // mid channels per block (a multiple of kMidsPerItem)
  int ck;      // input channels per chunk
  int64_t tiles_h, tiles_w, mid_blocks, blocks;
};

struct DwPwTiles {
  int tp;  // output pixels per block (divides kConvThreads)
  int ng;  // output-channel groups per block: kConvThreads = tp * ng
  int co;  // output channels per block = ng * kOutsPerItem
  int ck;  // input channels per chunk
  int64_t tiles, co_blocks, blocks;
};

// Reads N consecutive values of a 16-byte aligned shared array with 16-byte loads (the same address
// across a warp is one broadcast). A is float or double.
template <int N, typename A>
__device__ __forceinline__ void load_aligned(const A* p, A (&v)[N]) {
  constexpr int kPer = int(16 / sizeof(A));
  static_assert(N % kPer == 0, "load_aligned: N must fill whole 16-byte words");
#pragma unroll
  for (int i = 0; i < N / kPer; ++i) {
    if constexpr (sizeof(A) == 4) {
      const float4 t = reinterpret_cast<const float4*>(p)[i];
      v[4 * i] = t.x, v[4 * i + 1] = t.y, v[4 * i + 2] = t.z, v[4 * i + 3] = t.w;
    } else {
      const double2 t = reinterpret_cast<const double2*>(p)[i];
      v[2 * i] = t.x, v[2 * i + 1] = t.y;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// pw_dw. Shared memory (A = compute type), P = halo pixels of the block's tile:
//   w1s  [ck][cm]  the chunk's pointwise weights (first: 16-byte aligned for load_aligned)
//   mids [cm][P]   the intermediate over the halo, summed chunk by chunk
//   xs   [ck][P]   the chunk of x over the halo (0 where the halo leaves the map)
// ---------------------------------------------------------------------------------------------
template <typename T, int KIND>
__global__ void __launch_bounds__(kConvThreads)
    pw_dw_kernel(const T* __restrict__ x, const T* __restrict__ w1, const T* __restrict__ b1,
                 const T* __restrict__ w2, const T* __restrict__ b2, const T* __restrict__ res,
                 T* __restrict__ out, Problem s, PwDwTiles t, typename CudaElem<T>::compute_t param) {
  using E = CudaElem<T>;
  using A = typename E::compute_t;
  constexpr int MPT = kMidsPerItem;
  extern __shared__ __align__(16) unsigned char smem[];
  const int cm = t.cm, ck = t.ck;
  const int pmax = ((t.th - 1) * int(s.sh) + int(s.kh)) * ((t.tw - 1) * int(s.sw) + int(s.kw));
  A* w1s = reinterpret_cast<A*>(smem);
  A* mids = w1s + ck * cm;
  A* xs = mids + cm * pmax;
  const int tid = threadIdx.x;
  const int kh = int(s.kh), kw = int(s.kw), sh = int(s.sh), sw = int(s.sw);

  for (int64_t b = blockIdx.x; b < t.blocks; b += gridDim.x) {
    // Mid-channel blocks vary fastest: blocks that read the same x tile run together (L2 reuse).
    const int64_t mb = b % t.mid_blocks;
    int64_t r = b / t.mid_blocks;
    const int64_t tx = r % t.tiles_w;
    r /= t.tiles_w;
    const int64_t ty = r % t.tiles_h;
    const int64_t n = r / t.tiles_h;
    const int64_t m0 = mb * cm, oh0 = ty * t.th, ow0 = tx * t.tw;
    const int cm_b = int(min_of<int64_t>(cm, s.C - m0));
    const int th = int(min_of<int64_t>(t.th, s.Ho - oh0)), tw = int(min_of<int64_t>(t.tw, s.Wo - ow0));
    // The halo: the intermediate pixels the tile's outputs read, from (ih0, iw0) on; edge tiles are
    // smaller. Rows/columns before 0 or past the map are the depthwise conv's zero padding.
    const int hh = (th - 1) * sh + kh, hw = (tw - 1) * sw + kw, P = hh * hw;
    const int64_t ih0 = oh0 * s.sh - s.ph, iw0 = ow0 * s.sw - s.pw;
    const int items = P * ((cm_b + MPT - 1) / MPT);  // (halo pixel, group of MPT mid channels)
    const T* xn = x + n * s.Cin * s.H * s.W;

    // Phase 1: mids = w1 . x + b1 over the halo, Cin in chunks; 0 in the padding (not b1).
    // The do-while runs once even for Cin == 0, so mids still gets b1.
    int64_t c0 = 0;
    do {
      const int ck_b = int(max_of<int64_t>(0, min_of<int64_t>(ck, s.Cin - c0)));
      const bool first = c0 == 0, last = c0 + ck >= s.Cin;
      __syncthreads();  // everyone is done with w1s, xs (previous chunk) and mids (previous block)
      for (int e = tid; e < ck_b * cm; e += kConvThreads) {
        const int k = e % ck_b, m = e / ck_b;  // k fastest: w1's rows are contiguous in Cin
        w1s[k * cm + m] = m < cm_b ? E::load(w1[(m0 + m) * s.Cin + c0 + k]) : A(0);
      }
      for (int e = tid; e < ck_b * P; e += kConvThreads) {
        const int k = e / P, p = e % P;
        const int64_t ih = ih0 + p / hw, iw = iw0 + p % hw;
        const bool inside = ih >= 0 && ih < s.H && iw >= 0 && iw < s.W;
        xs[e] = inside ? E::load(xn[((c0 + k) * s.H + ih) * s.W + iw]) : A(0);
      }
      __syncthreads();
      // Consecutive threads take consecutive halo pixels: conflict-free xs/mids, broadcast w1s.
      for (int e = tid; e < items; e += kConvThreads) {
        const int p = e % P, g = e / P;
        const int64_t ih = ih0 + p / hw, iw = iw0 + p % hw;
        const bool inside = ih >= 0 && ih < s.H && iw >= 0 && iw < s.W;
        A* mp = mids + g * MPT * P + p;
        A acc[MPT];
#pragma unroll
        for (int j = 0; j < MPT; ++j) acc[j] = first ? A(0) : mp[j * P];
        if (inside) {  // padding pixels stay 0: skip their sums
          for (int k = 0; k < ck_b; ++k) {
            const A xv = xs[k * P + p];
            A wv[MPT];
            load_aligned(w1s + k * cm + g * MPT, wv);
#pragma unroll
            for (int j = 0; j < MPT; ++j) acc[j] += wv[j] * xv;
          }
        }
#pragma unroll
        for (int j = 0; j < MPT; ++j) {
          const int m = g * MPT + j;
          if (!last) mp[j * P] = acc[j];
          else if (m < cm_b) mp[j * P] = inside ? acc[j] + E::load(b1[m0 + m]) : A(0);
        }
      }
      c0 += ck;
    } while (c0 < s.Cin);
    __syncthreads();  // mids complete

    // Phase 2: the depthwise conv over mids, then bias, residual and activation. Consecutive
    // threads take consecutive output columns: coalesced stores.
    const int outs = cm_b * th * tw;
    for (int e = tid; e < outs; e += kConvThreads) {
      const int ox = e % tw, oy = (e / tw) % th, m = e / (tw * th);
      const A* mp = mids + m * P + oy * sh * hw + ox * sw;
      const T* wk = w2 + (m0 + m) * s.kh * s.kw;
      A acc = A(0);
      for (int ky = 0; ky < kh; ++ky)
        for (int kx = 0; kx < kw; ++kx) acc += E::load(wk[ky * kw + kx]) * mp[ky * hw + kx];
      const int64_t o = ((n * s.C + m0 + m) * s.Ho + oh0 + oy) * s.Wo + ow0 + ox;
      A v = acc + E::load(b2[m0 + m]);
      if (res != nullptr) v += E::load(res[o]);
      out[o] = E::store(ek::activation<KIND>(v, param));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dw_pw. Shared memory (A = compute type):
//   w2s [ck][co]  the chunk's pointwise weights (first: 16-byte aligned for load_aligned)
//   ds  [ck][tp]  the depthwise output (+ b1) of the chunk at the block's pixels
// Thread tid owns pixel q = tid % tp of the run and output channels g*8 .. g*8+7, g = tid / tp.
// ---------------------------------------------------------------------------------------------
template <typename T, int KIND>
__global__ void __launch_bounds__(kConvThreads)
    dw_pw_kernel(const T* __restrict__ x, const T* __restrict__ w1, const T* __restrict__ b1,
                 const T* __restrict__ w2, const T* __restrict__ b2, const T* __restrict__ res,
                 T* __restrict__ out, Problem s, DwPwTiles t, typename CudaElem<T>::compute_t param) {
  using E = CudaElem<T>;
  using A = typename E::compute_t;
  constexpr int OPT = kOutsPerItem;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tp = t.tp, co = t.co, ck = t.ck;
  A* w2s = reinterpret_cast<A*>(smem);
  A* ds = w2s + ck * co;
  const int tid = threadIdx.x;
  const int q = tid % tp, g = tid / tp;
  const int64_t HoWo = s.Ho * s.Wo;

  for (int64_t b = blockIdx.x; b < t.blocks; b += gridDim.x) {
    // Output-channel blocks vary fastest: blocks that read the same x pixels run together.
    const int64_t cb = b % t.co_blocks;
    const int64_t r = b / t.co_blocks;
    const int64_t tile = r % t.tiles;
    const int64_t n = r / t.tiles;
    const int64_t o0 = cb * co;
    const int co_b = int(min_of<int64_t>(co, s.C - o0));
    const int64_t pix = tile * tp + q;  // flat output pixel oh * Wo + ow
    const bool valid = pix < HoWo;
    const int64_t oh = valid ? pix / s.Wo : 0, ow = valid ? pix % s.Wo : 0;
    const int64_t ih0 = oh * s.sh - s.ph, iw0 = ow * s.sw - s.pw;
    const T* xn = x + n * s.Cin * s.H * s.W;

    A acc[OPT];
#pragma unroll
    for (int j = 0; j < OPT; ++j) acc[j] = A(0);

    for (int64_t c0 = 0; c0 < s.Cin; c0 += ck) {
      const int ck_b = int(min_of<int64_t>(ck, s.Cin - c0));
      __syncthreads();  // everyone is done with w2s and ds (previous chunk or block)
      for (int e = tid; e < ck_b * co; e += kConvThreads) {
        const int k = e % ck_b, o = e / ck_b;  // k fastest: w2's rows are contiguous in Cin
        w2s[k * co + o] = o < co_b ? E::load(w2[(o0 + o) * s.Cin + c0 + k]) : A(0);
      }
      // Depthwise of the chunk at the block's pixels. tp divides the block, so each thread computes
      // its own pixel q, for channels g, g + ng, ...; x's zero padding is skipped.
      for (int k = g; k < ck_b; k += t.ng) {
        const int64_t c = c0 + k;
        A v = A(0);
        if (valid) {
          const T* xc = xn + c * s.H * s.W;
          const T* wc = w1 + c * s.kh * s.kw;
          for (int64_t ky = 0; ky < s.kh; ++ky) {
            const int64_t ih = ih0 + ky;
            if (ih < 0 || ih >= s.H) continue;
            const T* xrow = xc + ih * s.W;
            const T* wrow = wc + ky * s.kw;
            for (int64_t kx = 0; kx < s.kw; ++kx) {
              const int64_t iw = iw0 + kx;
              if (iw >= 0 && iw < s.W) v += E::load(wrow[kx]) * E::load(xrow[iw]);
            }
          }
          v += E::load(b1[c]);
        }
        ds[k * tp + q] = v;
      }
      __syncthreads();
      // Pointwise: one ds read and two 16-byte (broadcast) weight reads per 8 multiply-adds.
      for (int k = 0; k < ck_b; ++k) {
        const A dv = ds[k * tp + q];
        A wv[OPT];
        load_aligned(w2s + k * co + g * OPT, wv);
#pragma unroll
        for (int j = 0; j < OPT; ++j) acc[j] += wv[j] * dv;
      }
    }

    if (valid) {
#pragma unroll
      for (int j = 0; j < OPT; ++j) {
        const int o = g * OPT + j;
        if (o >= co_b) break;
        const int64_t idx = (n * s.C + o0 + o) * HoWo + pix;  // consecutive threads: consecutive pixels
        A v = acc[j] + E::load(b2[o0 + o]);
        if (res != nullptr) v += E::load(res[idx]);
        out[idx] = E::store(ek::activation<KIND>(v, param));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch configuration, sized from the shapes. One-dimensional grid-stride over the blocks, so
// any problem size fits the grid limits.
// ---------------------------------------------------------------------------------------------
struct Device {
  int sms, smem_optin;
};

template <typename T, int KIND>
cudaError_t launch_pw_dw(const Problem& s, double param, const Device& dev, cudaStream_t stream) {
  using A = typename CudaElem<T>::compute_t;
  constexpr int64_t MPT = kMidsPerItem;
  const int64_t esz = sizeof(A);
  int64_t cm = round_up(min_of<int64_t>(s.C, 16), MPT);
  int64_t tw = min_of<int64_t>(s.Wo, 16);
  int64_t th = min_of<int64_t>(s.Ho, max_of<int64_t>(1, 128 / tw));
  int64_t ck = max_of<int64_t>(1, min_of<int64_t>(s.Cin, 32));
  auto halo = [&] { return ((th - 1) * s.sh + s.kh) * ((tw - 1) * s.sw + s.kw); };
  auto blocks = [&] { return s.N * ceil_div(s.Ho, th) * ceil_div(s.Wo, tw) * ceil_div(s.C, cm); };
  auto bytes = [&] { return (ck * cm + (cm + ck) * halo()) * esz; };
  // A wide stride or kernel makes the halo much larger than the tile: shrink the tile.
  while (halo() > 400 && th > 1) th = (th + 1) / 2;
  while (halo() > 400 && tw > 1) tw = (tw + 1) / 2;
  // Small problems: narrower mid-channel blocks, so that every SM gets work.
  while (blocks() < 2 * int64_t(dev.sms) && cm > MPT) cm = round_up(cm / 2, MPT);
  // Fit the shared memory: fewer channels per chunk, then smaller tiles, then fewer mid channels.
  auto fit = [&](int64_t budget) {
    while (bytes() > budget) {
      if (ck > 8) ck = (ck + 1) / 2;
      else if (th > 1) th = (th + 1) / 2;
      else if (tw > 1) tw = (tw + 1) / 2;
      else if (cm > MPT) cm = round_up(cm / 2, MPT);
      else if (ck > 1) ck = (ck + 1) / 2;
      else return false;
    }
    return true;
  };
  if (!fit(kDefaultSmem) && !fit(dev.smem_optin)) return cudaErrorInvalidConfiguration;  // a huge kernel
  if (bytes() > kDefaultSmem) {
    const cudaError_t err = cudaFuncSetAttribute(pw_dw_kernel<T, KIND>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes()));
    if (err != cudaSuccess) return err;
  }
  PwDwTiles t;
  t.th = int(th), t.tw = int(tw), t.cm = int(cm), t.ck = int(ck);
  t.tiles_h = ceil_div(s.Ho, th), t.tiles_w = ceil_div(s.Wo, tw), t.mid_blocks = ceil_div(s.C, cm);
  t.blocks = blocks();
  const unsigned grid = unsigned(min_of<int64_t>(t.blocks, INT_MAX));
  pw_dw_kernel<T, KIND><<<dim3(grid), kConvThreads, size_t(bytes()), stream>>>(
      static_cast<const T*>(s.x), static_cast<const T*>(s.w1), static_cast<const T*>(s.b1),
      static_cast<const T*>(s.w2), static_cast<const T*>(s.b2), static_cast<const T*>(s.residual),
      static_cast<T*>(s.out), s, t, static_cast<A>(param));
  return cudaGetLastError();
}

template <typename T, int KIND>
cudaError_t launch_dw_pw(const Problem& s, double param, const Device& dev, cudaStream_t stream) {
  (void)dev;
  using A = typename CudaElem<T>::compute_t;
  const int64_t esz = sizeof(A);
  // Output channels per block: the smallest of 8, 16, ..., 64 that covers C; the block's
  // 256 threads then span 256 / ng pixels.
  int64_t ng = 1;
  while (ng < 8 && ng * kOutsPerItem < s.C) ng *= 2;
  const int64_t tp = kConvThreads / ng, co = ng * kOutsPerItem;
  int64_t ck = max_of<int64_t>(1, min_of<int64_t>(s.Cin, 32));
  while (ck > 1 && ck * (tp + co) * esz > kDefaultSmem) ck = (ck + 1) / 2;
  const int64_t bytes = ck * (tp + co) * esz;
  DwPwTiles t;
  t.tp = int(tp), t.ng = int(ng), t.co = int(co), t.ck = int(ck);
  t.tiles = ceil_div(s.Ho * s.Wo, tp), t.co_blocks = ceil_div(s.C, co);
  t.blocks = s.N * t.tiles * t.co_blocks;
  const unsigned grid = unsigned(min_of<int64_t>(t.blocks, INT_MAX));
  dw_pw_kernel<T, KIND><<<dim3(grid), kConvThreads, size_t(bytes), stream>>>(
      static_cast<const T*>(s.x), static_cast<const T*>(s.w1), static_cast<const T*>(s.b1),
      static_cast<const T*>(s.w2), static_cast<const T*>(s.b2), static_cast<const T*>(s.residual),
      static_cast<T*>(s.out), s, t, static_cast<A>(param));
  return cudaGetLastError();
}

template <typename T>
struct ConvBlock {
  static cudaError_t run(Problem s, int pattern, int kind, double param, Device dev, cudaStream_t stream) {
    using namespace ek;
    switch (kind) {
#define EK_KIND_CASE(K)                                                         \
  case K:                                                                       \
    return pattern == 0 ? launch_pw_dw<T, K>(s, param, dev, stream)             \
                        : launch_dw_pw<T, K>(s, param, dev, stream);
      EK_FOR_EACH_KIND(EK_KIND_CASE)
#undef EK_KIND_CASE
    }
    return cudaErrorInvalidValue;
  }
};
}  // namespace

extern "C" cudaError_t ek_conv_block_cuda(const void* x, const void* w1, const void* b1, const void* w2,
                                          const void* b2, const void* residual, void* out, ek_dtype dtype,
                                          int64_t N, int64_t Cin, int64_t H, int64_t W, int64_t C,
                                          int64_t kh, int64_t kw, int pattern, int64_t stride_h,
                                          int64_t stride_w, int64_t pad_h, int64_t pad_w, int kind,
                                          double param, cudaStream_t stream) {
  if ((pattern != 0 && pattern != 1) || stride_h < 1 || stride_w < 1 || pad_h < 0 || pad_w < 0 ||
      kh < 1 || kw < 1 || N < 0 || Cin < 0 || C < 0 || H + 2 * pad_h < kh || W + 2 * pad_w < kw)
    return cudaErrorInvalidValue;
  Problem s;
  s.x = x, s.w1 = w1, s.b1 = b1, s.w2 = w2, s.b2 = b2, s.residual = residual, s.out = out;
  s.N = N, s.Cin = Cin, s.H = H, s.W = W, s.C = C, s.kh = kh, s.kw = kw;
  s.sh = stride_h, s.sw = stride_w, s.ph = pad_h, s.pw = pad_w;
  s.Ho = (H + 2 * pad_h - kh) / stride_h + 1;
  s.Wo = (W + 2 * pad_w - kw) / stride_w + 1;
  if (N == 0 || C == 0) return cudaSuccess;  // an empty output
  Device dev;
  int id = 0;
  cudaError_t err = cudaGetDevice(&id);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&dev.sms, cudaDevAttrMultiProcessorCount, id);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&dev.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, id);
  if (err != cudaSuccess) return err;
  return ek::dispatch_dtype<ConvBlock>(dtype, s, pattern, kind, param, dev, stream);
}
