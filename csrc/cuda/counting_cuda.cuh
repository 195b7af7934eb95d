// The CUDA traversal behind count_on and act_count (the analogue of counting_cpu.h). x is a dense
// buffer viewed as [outer, C, inner]. Both kernels read x once with 16-byte vector loads (act_count
// writes y = activation(x) with 16-byte stores), count in registers and shared memory, and add to
// the int64 counts with one global atomic per (block, chunk, channel slot), never per element.
//  * rows_kernel (inner > 1, contiguous NCHW; any inner: 4x4, 7x7, 10^9). The buffer is cut into
//    chunks, one per block at a time (grid-stride). A warp takes a sub-tile of 2 x 32 vectors,
//    lane l holding vector l of each half (coalesced); each lane turns its elements into on/NaN
//    bit masks, a warp prefix sum of the lane counts gives every (o, c) run that meets the
//    sub-tile its count as the difference of the prefix at its two ends, and one lane per run
//    adds it to a shared slot (slot = run mod P, P a multiple of C: a slot is one channel). The
//    cost is per sub-tile, not per run (a sub-tile inside one run is a plain warp sum); NaNs take
//    a second pass only in warps that hold one. At the end of a chunk each used slot goes to
//    counts with one atomic.
//  * columns_kernel (inner == 1: channels_last, tokens). The buffer is a matrix of "wide rows" of
//    W elements (W a multiple of C and of the vector width V; W / V a multiple of 32 when C is
//    small). A warp owns 32 column vectors, so each element of a lane's vector is a fixed channel;
//    8 warps per block walk rows (grid-stride) with register counters, merged per channel in
//    shared memory at the end. Blocks along the rows are few (grid ~ SMs x 4), so the atomics
//    are ~ grid x min(C, 32 V) whatever the tensor's size.
// Grids are the blocks resident at once (SMs x 4, fewer if shared memory says so). A misaligned
// x is read from the 16-byte boundary below it; the elements outside whole vectors (< 2 V, at the
// two ends) are counted by one warp with a lane each. If x and y differ in 16-byte phase (act_count
// on a view), y is stored element by element. Counts follow the raw-bits rule of ek_math.h (-0 is
// on, negative subnormals off, NaN apart; no flush to zero: no --use_fast_math). Element offsets
// are 64-bit; offsets inside a chunk are 32-bit (chunks hold <= 2^30 positions).
// The partitioning is plain C++ shared by host and device, and a CPU simulation (EK_COUNT_SIM:
// memory, warp intrinsics and __syncthreads emulated) runs these kernels thread by thread to check
// that every element is counted once, in the right channel.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "../ek_math.h"
#include "ek_cuda.h"

namespace ek {

// Per-dtype load/store (used by conv_block too). float and double compare as floats; Half and
// BFloat16 test their raw bits and compute in float.
template <typename T>
struct CudaElem {  // float, double
  using compute_t = T;
  __device__ static bool on(T v) { return v >= T(0); }
  __device__ static bool nan(T v) { return v != v; }
  __device__ static T load(T v) { return v; }
  __device__ static T store(T v) { return v; }
};
template <>
struct CudaElem<__half> {
  using compute_t = float;
  __device__ static bool on(__half v) { return bits_on<F16Bits>(__half_as_ushort(v)); }
  __device__ static bool nan(__half v) { return bits_nan<F16Bits>(__half_as_ushort(v)); }
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct CudaElem<__nv_bfloat16> {
  using compute_t = float;
  __device__ static bool on(__nv_bfloat16 v) { return bits_on<BF16Bits>(__bfloat16_as_ushort(v)); }
  __device__ static bool nan(__nv_bfloat16 v) { return bits_nan<BF16Bits>(__bfloat16_as_ushort(v)); }
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

namespace cnt {

constexpr int kBlock = 256;            // threads per block, both kernels
constexpr int kWarps = kBlock / 32;
constexpr int kBlocksPerSm = 4;        // grid = SMs x 4 (1024 threads per SM)
constexpr int kLaneVecs = 2;           // rows kernel: vectors per lane per sub-tile
constexpr int kRowsUnroll = 2;         // rows kernel: sub-tiles in flight per warp (half with y)
constexpr int kColumnsUnroll = 4;      // columns kernel: rows in flight per thread (half with y)
constexpr int kColumnsMinRows = 16;    // columns kernel: rows per thread before adding blocks
constexpr uint32_t kMaxSlots = 4096;   // rows kernel: shared slots (2 x 16 KB at most)
constexpr int64_t kMaxChunk = int64_t(1) << 30;  // positions per chunk (32-bit local offsets)
constexpr uint32_t kOnBits = 0x00FF00FFu, kNanBits = 0xFF00FF00u;  // see bit_of
constexpr unsigned kFull = 0xffffffffu;

// `#pragma unroll` for loops in __host__ __device__ functions (the host compiler warns on it).
#ifdef __CUDA_ARCH__
#define EK_UNROLL _Pragma("unroll")
#else
#define EK_UNROLL
#endif

// ---- integer helpers (host and device; std::min is host-only without relaxed constexpr) ----
EK_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
template <typename A>
EK_HD A imin(A a, A b) {
  return b < a ? b : a;
}
template <typename A>
EK_HD A imax(A a, A b) {
  return a < b ? b : a;
}
EK_HD uint32_t popc(uint32_t v) {
#ifdef __CUDA_ARCH__
  return __popc(v);
#else
  return static_cast<uint32_t>(__builtin_popcount(v));
#endif
}
EK_HD uint32_t umulhi(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}
// The same bits as another type of the same size (std::bit_cast; a register move once compiled).
template <typename To, typename From>
EK_HD To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  To t;
  memcpy(&t, &v, sizeof(To));
  return t;
}

// n / d by multiply and shift, for n < 2^31 and 1 <= d < 2^31 (the form of PyTorch's IntDivider).
struct FastDiv {
  uint32_t d, m, s;
};
inline FastDiv make_fastdiv(uint32_t d) {
  uint32_t s = 0;
  while (s < 32 && (uint64_t(1) << s) < d) ++s;
  const uint64_t m = ((uint64_t(1) << 32) * ((uint64_t(1) << s) - d)) / d + 1;
  return FastDiv{d, static_cast<uint32_t>(m), s};
}
EK_HD uint32_t fast_div(const FastDiv& f, uint32_t n) { return (umulhi(n, f.m) + n) >> f.s; }
EK_HD uint32_t fast_mod(const FastDiv& f, uint32_t n) { return n - fast_div(f, n) * f.d; }

// ---- elements as raw bits ----
template <typename T>
struct Bits;
template <>
struct Bits<float> {
  using U = uint32_t;
  static constexpr bool kPaired = false;
};
template <>
struct Bits<double> {
  using U = uint64_t;
  static constexpr bool kPaired = false;
};
template <>
struct Bits<__half> {
  using U = uint16_t;
  using B = F16Bits;
  static constexpr bool kPaired = true;
};
template <>
struct Bits<__nv_bfloat16> {
  using U = uint16_t;
  using B = BF16Bits;
  static constexpr bool kPaired = true;
};

// E consecutive elements of T as 32-bit words (element k of a 16-bit type is half k & 1 of word
// k / 2, little-endian as memory is).
template <typename T, int E>
struct Raw {
  static constexpr int kBytes = E * static_cast<int>(sizeof(T));
  static constexpr int kWords = kBytes < 4 ? 1 : kBytes / 4;
  uint32_t w[kWords];
};
template <typename T, int E>
EK_HD typename Bits<T>::U get_elem(const Raw<T, E>& r, int k) {
  if constexpr (sizeof(T) == 2) {
    return static_cast<uint16_t>(r.w[k >> 1] >> ((k & 1) * 16));
  } else if constexpr (sizeof(T) == 4) {
    return r.w[k];
  } else {
    return uint64_t(r.w[2 * k]) | (uint64_t(r.w[2 * k + 1]) << 32);
  }
}
template <typename T, int E>
EK_HD void set_elem(Raw<T, E>& r, int k, typename Bits<T>::U u) {
  if constexpr (sizeof(T) == 2) {
    const int shift = (k & 1) * 16;
    r.w[k >> 1] = (r.w[k >> 1] & ~(0xFFFFu << shift)) | (uint32_t(u) << shift);
  } else if constexpr (sizeof(T) == 4) {
    r.w[k] = u;
  } else {
    r.w[2 * k] = static_cast<uint32_t>(u);
    r.w[2 * k + 1] = static_cast<uint32_t>(u >> 32);
  }
}

// The on/NaN masks of a lane's elements: element k's "on" bit is bit_of(k), its NaN bit
// bit_of(k) + 8; all on bits lie in kOnBits, all NaN bits in kNanBits. 16-bit types are tested
// two per 32-bit word, so element 2j sits at bit j and element 2j + 1 at bit 16 + j; others at k.
// below(k) is the on bits of elements 0 .. k-1 (k <= 16 for 16-bit types, <= 8 otherwise).
template <typename T>
EK_HD int bit_of(int k) {
  return Bits<T>::kPaired ? (k & 1) * 16 + (k >> 1) : k;
}
template <typename T>
EK_HD uint32_t below(uint32_t k) {
  if constexpr (Bits<T>::kPaired) {
    return ((1u << ((k + 1) >> 1)) - 1u) | (((1u << (k >> 1)) - 1u) << 16);
  } else {
    return (1u << k) - 1u;
  }
}
// On and NaN bits of elements k0 .. k1-1.
template <typename T>
EK_HD uint32_t valid_bits(uint32_t k0, uint32_t k1) {
  return (below<T>(k1) & ~below<T>(k0)) * 0x101u;
}

template <typename T, int E>
EK_HD uint32_t classify(const Raw<T, E>& r) {
  uint32_t mask = 0;
  if constexpr (sizeof(T) == 2) {
    static_assert(E % 2 == 0 && E <= 16, "16-bit lanes hold an even number of elements, at most 16");
    using B = typename Bits<T>::B;
    // Per half, a = bits without the sign: a + (0x7FFF - inf) carries into bit 15 iff NaN, and
    // a + 0x7FFF iff a != 0; neither carries into the other half. On = (sign clear and not NaN)
    // or -0: exactly bits_on (u <= inf || u == sign); NaN = bits_nan.
    constexpr uint32_t kNanAdd = (0x7FFFu - B::inf) * 0x10001u;
    EK_UNROLL
    for (int j = 0; j < Raw<T, E>::kWords; ++j) {
      const uint32_t w = r.w[j], a = w & 0x7FFF7FFFu;
      const uint32_t nanish = a + kNanAdd, nonzero = a + 0x7FFF7FFFu;
      const uint32_t on = ((~w & ~nanish) | (w & ~nonzero)) & 0x80008000u;
      const uint32_t nan = nanish & 0x80008000u;
      mask |= (on >> (15 - j)) | (nan >> (7 - j));
    }
  } else if constexpr (sizeof(T) == 4) {
    static_assert(E <= 8, "float lanes hold at most 8 elements");
    EK_UNROLL
    for (int k = 0; k < E; ++k) {
      const float f = bit_cast<float>(r.w[k]);  // no flush to zero: -denormal < 0
      mask |= (uint32_t(f >= 0.f) << k) | (uint32_t(f != f) << (k + 8));
    }
  } else {
    static_assert(E <= 8, "double lanes hold at most 8 elements");
    EK_UNROLL
    for (int k = 0; k < E; ++k) {
      const uint64_t u = get_elem(r, k);
      const bool on = u <= 0x7FF0000000000000ull || u == 0x8000000000000000ull;
      const bool nan = (u & 0x7FFFFFFFFFFFFFFFull) > 0x7FF0000000000000ull;
      mask |= (uint32_t(on) << k) | (uint32_t(nan) << (k + 8));
    }
  }
  return mask;
}

// y = activation(x) on raw elements, with the compute type and rounding of CudaElem.
template <int KIND, typename T>
EK_HD typename Bits<T>::U activate_bits(typename Bits<T>::U u, typename CudaElem<T>::compute_t param) {
  if constexpr (sizeof(T) == 4) {
    return bit_cast<uint32_t>(activation<KIND>(bit_cast<float>(u), param));
  } else if constexpr (sizeof(T) == 8) {
    return bit_cast<uint64_t>(activation<KIND>(bit_cast<double>(u), param));
  } else if constexpr (std::is_same<T, __half>::value) {
    return __half_as_ushort(__float2half_rn(activation<KIND>(__half2float(__ushort_as_half(u)), param)));
  } else {
    return __bfloat16_as_ushort(
        __float2bfloat16_rn(activation<KIND>(__bfloat162float(__ushort_as_bfloat16(u)), param)));
  }
}
template <int KIND, typename T, int E>
EK_HD Raw<T, E> activate(const Raw<T, E>& r, typename CudaElem<T>::compute_t param) {
  Raw<T, E> out;
  EK_UNROLL
  for (int i = 0; i < Raw<T, E>::kWords; ++i) out.w[i] = 0;
  EK_UNROLL
  for (int k = 0; k < E; ++k) set_elem(out, k, activate_bits<KIND, T>(get_elem(r, k), param));
  return out;
}

// ---- memory: plain loads and stores on the GPU; checked, counted accesses in the simulation ----
// (16-byte accesses through __ldg / __stwb: a plain uint4 store of four computed floats is split
// into four 4-byte stores by the compiler.)
template <typename W>
__device__ __forceinline__ W mem_load(const void* p) {
#ifdef EK_COUNT_SIM
  return ek_sim_load<W>(p);
#else
  return __ldg(static_cast<const W*>(p));
#endif
}
template <typename W>
__device__ __forceinline__ void mem_store(void* p, W v) {
#ifdef EK_COUNT_SIM
  ek_sim_store<W>(p, v);
#else
  __stwb(static_cast<W*>(p), v);
#endif
}

// Loads the 16 bytes at x + first (16-byte aligned) into elements v V .. v V + V-1 of r.
template <typename T, int E, int V>
__device__ __forceinline__ void load_vec(Raw<T, E>& r, int v, const T* x, int64_t first) {
  static_assert(V * sizeof(T) == 16, "16-byte vectors");
  const uint4 q = mem_load<uint4>(x + first);
  r.w[4 * v] = q.x, r.w[4 * v + 1] = q.y, r.w[4 * v + 2] = q.z, r.w[4 * v + 3] = q.w;
}
// Stores elements v V .. v V + V-1 of r at y + first: 16 bytes at once when `aligned` (y + first
// 16-byte aligned; false when y's phase differs from x's), else element by element.
template <typename T, int E, int V>
__device__ __forceinline__ void store_vec(const Raw<T, E>& r, int v, T* y, int64_t first, bool aligned) {
  using U = typename Bits<T>::U;
  if (aligned) {
    mem_store<uint4>(y + first, make_uint4(r.w[4 * v], r.w[4 * v + 1], r.w[4 * v + 2], r.w[4 * v + 3]));
    return;
  }
#pragma unroll
  for (int k = 0; k < V; ++k) mem_store<U>(y + (first + k), get_elem(r, v * V + k));
}

// The elements outside every whole aligned vector (positions count from the 16-byte boundary at
// or below x, element e at position e + h): the first (V - h) mod V and the last (h + total) mod V,
// fewer than 2 V. The kernels skip the partial vectors; one warp counts these, a lane each, with
// global atomics, and writes their y.
template <typename T, int KIND, bool WRITE, int V>
__device__ __forceinline__ void count_edges(const T* __restrict__ x, T* __restrict__ y, int64_t total, uint32_t h,
                                            int64_t C, int64_t inner, typename CudaElem<T>::compute_t param,
                                            int64_t* counts, int64_t* nan_counts, int lane) {
  using U = typename Bits<T>::U;
  const int64_t head_n = imin<int64_t>(total, (V - h) % V);
  const int64_t tail_start = imax<int64_t>(head_n, (int64_t(h) + total) / V * V - h);
  const int64_t e = lane < 16 ? lane : tail_start + (lane - 16);
  if (lane < 16 ? e >= head_n : e >= total) return;
  Raw<T, 2> r;  // one element, in a lane of the usual layout
#pragma unroll
  for (int i = 0; i < Raw<T, 2>::kWords; ++i) r.w[i] = 0;
  set_elem(r, 0, mem_load<U>(x + e));
  const uint32_t M = classify(r) & valid_bits<T>(0, 1);
  const int64_t c = (e / inner) % C;
  if (M & kOnBits) atomicAdd(reinterpret_cast<unsigned long long*>(counts + c), 1ull);
  if (M & kNanBits) atomicAdd(reinterpret_cast<unsigned long long*>(nan_counts + c), 1ull);
  if constexpr (WRITE) mem_store<U>(y + e, activate_bits<KIND, T>(get_elem(r, 0), param));
}

#ifdef __CUDACC__
__device__ __forceinline__ uint32_t* shared_counters() {
  extern __shared__ uint32_t ek_count_shared[];
  return ek_count_shared;
}
#endif

__device__ __forceinline__ uint32_t warp_sum(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_add_sync(kFull, v);
#else
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
#endif
}

__device__ __forceinline__ void add_to_count(int64_t* target, uint32_t value) {
  if (value != 0) atomicAdd(reinterpret_cast<unsigned long long*>(target), static_cast<unsigned long long>(value));
}

// =============================== rows kernel (inner > 1) ===============================
// Positions count elements from the 16-byte boundary at or below x: element e is at position
// e + h. Chunk q covers positions [q L, q L + L); inside it, offsets d are 32-bit. Local row 0 is
// the (o, c) run holding the chunk's first element (run R0), local row 1 starts at offset b0.
struct RowsPlan {
  int64_t total;     // elements
  int64_t C, inner;
  int64_t L;         // positions per chunk: a multiple of the sub-tile, at most 2^30
  int64_t chunks;    // ceil((h + total) / L)
  uint32_t h;        // x's misalignment in elements
  bool y_vec;        // y has x's 16-byte phase (else y is written element by element)
  uint32_t P;        // shared slots; local row r goes to slot r mod P
  uint32_t inner_lo; // inner mod 2^32
  FastDiv inner_div; // min(inner, 2^30): offsets inside a chunk are < 2^30
  FastDiv slot_div;  // P
  FastDiv chan_div;  // C, when C <= kMaxSlots
  int64_t grid;      // blocks
};

template <int V>
EK_HD int64_t rows_sub_tile() {  // positions per warp sub-tile
  return int64_t(32) * kLaneVecs * V;
}

// What a grid is sized from: the SM count and the shared memory of one SM.
struct DeviceInfo {
  int64_t sms;
  int64_t shared_per_sm;
};
// Blocks that are resident at once (the launch bounds keep registers <= 64 per thread, so 4
// blocks of 256 fit wherever shared memory does): the grid, so that no block waits for a second
// wave while the others idle.
inline int64_t resident_blocks(const DeviceInfo& dev, int64_t shared_per_block) {
  const int64_t by_shared = dev.shared_per_sm / (shared_per_block + 1024);  // 1 KB reserved per block
  return std::max<int64_t>(1, dev.sms) * std::max<int64_t>(1, std::min<int64_t>(kBlocksPerSm, by_shared));
}

// P: a multiple of C of at least 32 (so a slot is one channel whatever the number of runs in a
// chunk, and a warp's up to 31 runs hit different slots) while C <= kMaxSlots; else kMaxSlots,
// with chunks short enough to hold at most P runs.
inline uint32_t rows_slots(int64_t C) {
  return C <= kMaxSlots ? static_cast<uint32_t>(C >= 32 ? C : C * ceil_div(32, C)) : kMaxSlots;
}
inline int64_t rows_shared_bytes(uint32_t P) { return 2 * int64_t(sizeof(uint32_t)) * P; }

template <int V>
inline RowsPlan plan_rows(int64_t total, int64_t C, int64_t inner, uint32_t h, int64_t target_blocks) {
  RowsPlan p{};
  p.total = total, p.C = C, p.inner = inner, p.h = h;
  const int64_t sub = rows_sub_tile<V>();
  const int64_t step = int64_t(kWarps) * kRowsUnroll * sub;  // positions per block iteration
  const int64_t positions = int64_t(h) + total;
  p.P = rows_slots(C);
  int64_t L = ceil_div(ceil_div(positions, step), std::max<int64_t>(1, target_blocks)) * step;
  L = std::min(L, kMaxChunk);
  if (C > kMaxSlots) {  // rows in a chunk <= 2 + (L - 2) / inner <= P
    const int64_t fit = (int64_t(p.P) - 2) * std::min(inner, kMaxChunk) / sub * sub;
    L = std::min(L, std::max(sub, fit));
  }
  p.L = L;
  p.chunks = ceil_div(positions, L);
  p.grid = std::min(p.chunks, std::max<int64_t>(1, target_blocks));
  p.inner_lo = static_cast<uint32_t>(inner);
  p.inner_div = make_fastdiv(static_cast<uint32_t>(std::min(inner, kMaxChunk)));
  p.slot_div = make_fastdiv(p.P);
  p.chan_div = make_fastdiv(static_cast<uint32_t>(std::min<int64_t>(C, kMaxSlots)));
  return p;
}

// Local row of offset d in a chunk whose row 1 starts at b0 (b0 >= 1; b0 = L when none does).
EK_HD uint32_t local_row(uint32_t d, uint32_t b0, const FastDiv& inner) {
  return d < b0 ? 0u : 1u + fast_div(inner, d - b0);
}
// Boundary i (0 .. n) of the n local rows ra .. ra+n-1 met by the sub-tile at offset ds, as an
// offset into the sub-tile: 0, then where each next row starts, then the sub-tile's end. Rows
// that start inside a sub-tile start below 2^31, so the 32-bit wrap-around arithmetic is exact.
template <int V>
EK_HD uint32_t sub_tile_boundary(uint32_t i, uint32_t n, uint32_t ra, uint32_t ds, uint32_t b0,
                                 uint32_t inner_lo) {
  if (i == 0) return 0;
  if (i >= n) return static_cast<uint32_t>(rows_sub_tile<V>());
  return b0 + (ra + i - 1) * inner_lo - ds;
}
// Channel of slot j, given R0 mod C.
EK_HD int64_t slot_channel(const RowsPlan& p, int64_t r0c, uint32_t j) {
  if (p.C <= int64_t(kMaxSlots)) return fast_mod(p.chan_div, static_cast<uint32_t>(r0c) + j);
  const int64_t c = r0c + j;  // j < P <= C here
  return c >= p.C ? c - p.C : c;
}

// Adds one field (on or NaN) of a warp sub-tile to its slots. A sub-tile is 2 halves of 32 V
// elements; lane l holds vector l of each half (coalesced 16-byte accesses), as elements 0 .. V-1
// and V .. 2V-1 of its mask Mf (the field's bits, at the "on" positions). The sub-tile starts at
// chunk offset ds and meets the n local rows ra .. ra+n-1.
template <typename T, int V>
__device__ __forceinline__ void count_field(uint32_t Mf, uint32_t ds, uint32_t ra, uint32_t n, uint32_t b0,
                                            int lane, const RowsPlan& p, uint32_t* slots) {
  constexpr uint32_t kHalf = 32 * V;
  const uint32_t half0 = below<T>(V);
  const uint32_t cnt = popc(Mf & half0) | (popc(Mf & ~half0) << 16);  // <= 256 each: no carry
  if (n == 1) {  // the whole sub-tile is one run
    const uint32_t sum = warp_sum(cnt);
    const uint32_t c = (sum & 0xFFFFu) + (sum >> 16);
    if (lane == 0 && c != 0) atomicAdd(slots + fast_mod(p.slot_div, ra), c);
    return;
  }
  uint32_t incl = cnt;  // inclusive prefix over lanes, of both halves at once
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t t = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += t;
  }
  const uint32_t excl = incl - cnt;
  const uint32_t total0 = __shfl_sync(kFull, incl, 31) & 0xFFFFu;
  // Lane i takes boundary g + i and computes F, the count of the sub-tile's elements before it
  // (half 0's total, the prefix of the lane holding it in its half, that lane's elements below
  // it); run g + i's count is F(next boundary) - F. 31 runs per pass.
  for (uint32_t g = 0; g < n; g += 31) {
    const uint32_t i = g + static_cast<uint32_t>(lane);
    const uint32_t t = sub_tile_boundary<V>(i, n, ra, ds, b0, p.inner_lo);  // 0 .. 2 kHalf
    const uint32_t hv = t >= kHalf ? 1u : 0u, tt = t - hv * kHalf;
    uint32_t src = tt / V, k = tt % V;
    if (src == 32) src = 31, k = V;  // t = 2 kHalf: all of lane 31's second vector
    const uint32_t e = __shfl_sync(kFull, excl, static_cast<int>(src));
    const uint32_t m = __shfl_sync(kFull, Mf, static_cast<int>(src));
    const uint32_t F = (hv ? total0 + (e >> 16) : (e & 0xFFFFu)) + popc(m & below<T>(hv * V + k) & ~below<T>(hv * V));
    const uint32_t Fn = __shfl_down_sync(kFull, F, 1);
    if (lane < 31 && i < n && Fn != F) atomicAdd(slots + fast_mod(p.slot_div, ra + i), Fn - F);
  }
}

template <typename T, int KIND, bool WRITE, int V>
__global__ void __launch_bounds__(kBlock, kBlocksPerSm)
    rows_kernel(const T* __restrict__ x, T* __restrict__ y, const RowsPlan p,
                const typename CudaElem<T>::compute_t param, int64_t* __restrict__ counts,
                int64_t* __restrict__ nan_counts) {
  constexpr int kE = kLaneVecs * V;
  constexpr int kUnroll = WRITE ? kRowsUnroll / 2 : kRowsUnroll;  // y's traffic doubles the bytes in flight
  const uint32_t sub = static_cast<uint32_t>(rows_sub_tile<V>());
  uint32_t* s_on = shared_counters();
  uint32_t* s_nan = s_on + p.P;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  if (blockIdx.x == 0 && warp == 0)
    count_edges<T, KIND, WRITE, V>(x, y, p.total, p.h, p.C, p.inner, param, counts, nan_counts, lane);
  for (uint32_t j = tid; j < p.P; j += kBlock) s_on[j] = 0, s_nan[j] = 0;
  __syncthreads();
  for (int64_t chunk = blockIdx.x; chunk < p.chunks; chunk += gridDim.x) {
    const int64_t p0 = chunk * p.L;
    const int64_t e0 = p0 - int64_t(p.h);  // element at offset 0 (-h in chunk 0)
    const uint32_t lim = static_cast<uint32_t>(imin<int64_t>(p.L, int64_t(p.h) + p.total - p0));
    const uint32_t head = chunk == 0 ? p.h : 0;  // offsets below head are not elements
    const int64_t r0 = e0 > 0 ? e0 / p.inner : 0;
    const uint32_t b0 = static_cast<uint32_t>(imin<int64_t>((r0 + 1) * p.inner - e0, p.L));
    const uint32_t nsub = (lim + sub - 1) / sub;
    for (uint32_t sb = 0; sb < nsub; sb += kWarps * kUnroll) {
      Raw<T, kE> v[kUnroll];
      uint32_t valid[kUnroll];  // ~0u: all of the lane's elements are in the tensor
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint32_t s = sb + u * kWarps + warp;
        valid[u] = 0;
        if (s >= nsub) continue;  // the same in the whole warp
#pragma unroll
        for (int j = 0; j < kLaneVecs; ++j) {  // whole vectors only: count_edges has the rest
          const uint32_t d = s * sub + j * 32 * V + lane * V;
          if (d >= head && d + V <= lim) {
            load_vec<T, kE, V>(v[u], j, x, e0 + d);
            valid[u] |= valid_bits<T>(j * V, j * V + V);
          } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) v[u].w[4 * j + i] = 0;
          }
        }
        if (valid[u] == valid_bits<T>(0, kE)) valid[u] = ~0u;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint32_t s = sb + u * kWarps + warp;  // the same in the whole warp
        if (s >= nsub) continue;
        const uint32_t M = classify(v[u]) & valid[u];
        if constexpr (WRITE) {
          if (valid[u] != 0) {
            const Raw<T, kE> out = activate<KIND>(v[u], param);
#pragma unroll
            for (int j = 0; j < kLaneVecs; ++j) {
              const uint32_t d = s * sub + j * 32 * V + lane * V;
              if (valid[u] & valid_bits<T>(j * V, j * V + 1)) store_vec<T, kE, V>(out, j, y, e0 + d, p.y_vec);
            }
          }
        }
        const uint32_t ds = s * sub;
        const uint32_t last = (ds + sub < lim ? ds + sub : lim) - 1;
        const uint32_t ra = local_row(ds, b0, p.inner_div), n = local_row(last, b0, p.inner_div) - ra + 1;
        count_field<T, V>(M & kOnBits, ds, ra, n, b0, lane, p, s_on);
        if (__any_sync(kFull, (M & kNanBits) != 0)) count_field<T, V>((M >> 8) & kOnBits, ds, ra, n, b0, lane, p, s_nan);
      }
    }
    __syncthreads();
    const uint32_t nrows = local_row(lim - 1, b0, p.inner_div) + 1;
    const uint32_t used = imin(p.P, nrows);
    const int64_t r0c = r0 % p.C;
    // Blocks finish together: each starts its flush at a different slot, so that the atomics on
    // one channel's cache line are spread in time rather than all queued at once.
    const uint32_t rot = static_cast<uint32_t>((uint64_t(chunk) * 67u) % used);
    for (uint32_t jj = tid; jj < used; jj += kBlock) {
      const uint32_t j = jj + rot < used ? jj + rot : jj + rot - used;
      const uint32_t on = s_on[j], nan = s_nan[j];
      if ((on | nan) == 0) continue;
      s_on[j] = 0, s_nan[j] = 0;
      const int64_t c = slot_channel(p, r0c, j);
      add_to_count(counts + c, on);
      add_to_count(nan_counts + c, nan);
    }
    __syncthreads();
  }
}

// ============================= columns kernel (inner == 1) =============================
// Position pos = r W + col holds element pos - h (channel (col - h) mod C, as C divides W).
// Block (bx, by): column vectors 32 bx + lane, rows by * 8 + warp + i * gridDim.y * 8.
struct ColumnsPlan {
  int64_t total, C;
  int64_t W;      // wide-row width, a multiple of C and V
  int64_t cvw;    // W / V column vectors
  int64_t rows;   // ceil((h + total) / W)
  uint32_t h;     // x's misalignment in elements
  bool y_vec;     // y has x's 16-byte phase (else y is written element by element)
  uint32_t nslots;  // min(C, 32 V): block column j is added into slot j mod nslots
  uint32_t group;   // threads per slot in the final sum (a power of two <= 32)
  int64_t grid_x, grid_y;
};

EK_HD int64_t gcd64(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t t = a % b;
    a = b, b = t;
  }
  return a;
}

// false where the shape does not suit (then the rows kernel runs).
template <int V>
inline bool plan_columns(ColumnsPlan& p, int64_t total, int64_t C, uint32_t h, int64_t target_blocks) {
  p = ColumnsPlan{};
  p.total = total, p.C = C, p.h = h;
  const int64_t W0 = C * (V / gcd64(C, V));  // lcm(C, V)
  const int64_t cvw0 = W0 / V;
  // Small C: widen the row so a warp's 32 column vectors are all used.
  p.W = (cvw0 % 32 != 0 && cvw0 < 1024) ? W0 * (32 / gcd64(cvw0, 32)) : W0;
  p.cvw = p.W / V;
  p.rows = ceil_div(int64_t(h) + total, p.W);
  p.grid_x = ceil_div(p.cvw, 32);
  if (p.grid_x > 0x7fffffff) return false;
  const int64_t want = ceil_div(std::max<int64_t>(1, target_blocks), p.grid_x);
  p.grid_y = std::max<int64_t>(1, std::min({want, ceil_div(p.rows, kWarps * kColumnsMinRows), int64_t(65535)}));
  // A thread sees < 2^16 rows (16-bit counters in the kernel).
  p.grid_y = std::max(p.grid_y, ceil_div(p.rows, kWarps * int64_t(65535)));
  if (p.grid_y > 65535) return false;
  p.nslots = static_cast<uint32_t>(std::min<int64_t>(C, 32 * V));
  uint32_t group = 1;
  while (group < 32 && p.nslots * group * 2 <= uint32_t(kBlock)) group *= 2;
  p.group = group;
  return true;
}

// Adds a vector's masks to a thread's column counters (see columns_kernel).
template <typename T, int V>
__device__ __forceinline__ void column_add(uint32_t M, uint32_t* on, uint32_t* my_nan) {
  constexpr int kOnRegs = Bits<T>::kPaired ? V / 2 : V;
#pragma unroll
  for (int k = 0; k < kOnRegs; ++k) on[k] += (M >> k) & (Bits<T>::kPaired ? 0x10001u : 1u);
  if (M & kNanBits) {
#pragma unroll
    for (int k = 0; k < V; ++k) my_nan[k] += (M >> (bit_of<T>(k) + 8)) & 1u;
  }
}

template <typename T, int KIND, bool WRITE, int V>
__global__ void __launch_bounds__(kBlock, kBlocksPerSm)
    columns_kernel(const T* __restrict__ x, T* __restrict__ y, const ColumnsPlan p,
                   const typename CudaElem<T>::compute_t param, int64_t* __restrict__ counts,
                   int64_t* __restrict__ nan_counts) {
  constexpr uint32_t kCols = 32 * V;  // columns of a block
  constexpr int kUnroll = WRITE ? kColumnsUnroll / 2 : kColumnsUnroll;  // rows in flight
  uint32_t* s_on = shared_counters();
  uint32_t* s_nan = s_on + kBlock * V;
  const int lane = static_cast<int>(threadIdx.x), row_lane = static_cast<int>(threadIdx.y);
  const int tid = row_lane * 32 + lane;
  const int64_t cv = int64_t(blockIdx.x) * 32 + lane;
  const int64_t end = int64_t(p.h) + p.total;  // positions [h, end) are elements
  if (blockIdx.x == 0 && blockIdx.y == 0 && row_lane == 0)
    count_edges<T, KIND, WRITE, V>(x, y, p.total, p.h, p.C, 1, param, counts, nan_counts, lane);
  // "On" counters in registers (16-bit types: two 16-bit counters per register, elements 2j and
  // 2j + 1, as the plan keeps a thread below 2^16 rows); NaN counters (rarely touched) in this
  // thread's shared slots.
  constexpr int kOnRegs = Bits<T>::kPaired ? V / 2 : V;
  uint32_t on[kOnRegs];
  uint32_t* my_nan = s_nan + tid * V;
#pragma unroll
  for (int k = 0; k < kOnRegs; ++k) on[k] = 0;
#pragma unroll
  for (int k = 0; k < V; ++k) my_nan[k] = 0;
  if (cv < p.cvw) {
    const int64_t col = cv * V;
    const int64_t step = int64_t(gridDim.y) * kWarps;
    const int64_t stride = step * p.W;  // positions between a thread's rows
    for (int64_t r = int64_t(blockIdx.y) * kWarps + row_lane; r < p.rows; r += kUnroll * step) {
      const int64_t pos = r * p.W + col;  // position of this pass's first row
      if (r + (kUnroll - 1) * step < p.rows && pos >= int64_t(p.h) &&
          pos + (kUnroll - 1) * stride + V <= end) {  // all whole vectors: the fast path
        Raw<T, V> v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) load_vec<T, V, V>(v[u], 0, x, pos - p.h + u * stride);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          column_add<T, V>(classify(v[u]), on, my_nan);
          if constexpr (WRITE)
            store_vec<T, V, V>(activate<KIND>(v[u], param), 0, y, pos - p.h + u * stride, p.y_vec);
        }
        continue;
      }
      for (int u = 0; u < kUnroll; ++u) {  // the last rows; whole vectors only (count_edges)
        const int64_t pu = pos + u * stride;
        if (r + u * step >= p.rows) break;
        if (pu < int64_t(p.h) || pu + V > end) continue;
        Raw<T, V> v;
        load_vec<T, V, V>(v, 0, x, pu - p.h);
        column_add<T, V>(classify(v), on, my_nan);
        if constexpr (WRITE) store_vec<T, V, V>(activate<KIND>(v, param), 0, y, pu - p.h, p.y_vec);
      }
    }
  }
  // Per-column counters to shared memory ([row_lane][lane * V + k]), then each slot (channel) is
  // summed by `group` threads over the 8 row lanes and the block columns it holds.
#pragma unroll
  for (int k = 0; k < V; ++k) s_on[tid * V + k] = Bits<T>::kPaired ? (on[k >> 1] >> ((k & 1) * 16)) & 0xFFFFu : on[k];
  __syncthreads();
  // (The slots are taken from a block-dependent rotation, as in rows_kernel's flush.)
  const uint32_t group = p.group, gi = static_cast<uint32_t>(tid) % group;
  const uint32_t rot = static_cast<uint32_t>((uint64_t(blockIdx.y) * 67u) % p.nslots);
  uint32_t slot = static_cast<uint32_t>(tid) / group;
  if (slot < p.nslots) slot = slot + rot < p.nslots ? slot + rot : slot + rot - p.nslots;
  uint32_t son = 0, snan = 0;
  if (slot < p.nslots) {
    for (int rl = 0; rl < kWarps; ++rl)
      for (uint32_t j = slot + gi * p.nslots; j < kCols; j += group * p.nslots)
        son += s_on[rl * kCols + j], snan += s_nan[rl * kCols + j];
  }
  for (uint32_t o = group / 2; o > 0; o >>= 1) {
    son += __shfl_xor_sync(kFull, son, static_cast<int>(o));
    snan += __shfl_xor_sync(kFull, snan, static_cast<int>(o));
  }
  if (gi == 0 && slot < p.nslots && (son | snan) != 0) {
    const int64_t base = ((int64_t(blockIdx.x) * kCols - p.h) % p.C + p.C) % p.C;
    const int64_t c = base + slot >= p.C ? base + slot - p.C : base + slot;
    add_to_count(counts + c, son);
    add_to_count(nan_counts + c, snan);
  }
}

// ================================== dispatch ==================================
// Picks the kernel and its plan; `launcher` runs it (on the GPU, or in the CPU simulation).
template <int V>
inline int64_t columns_shared_bytes() {
  return 2 * int64_t(sizeof(uint32_t)) * kBlock * V;
}

template <typename T, bool WRITE, typename Launcher>
cudaError_t plan_and_launch(const void* x, const void* y, int64_t outer, int64_t C, int64_t inner,
                            const DeviceInfo& dev, Launcher& launcher) {
  if (outer < 0 || C < 0 || inner < 0) return cudaErrorInvalidValue;
  if (outer == 0 || C == 0 || inner == 0) return cudaSuccess;
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  const int64_t total = outer * C * inner;
  const uintptr_t ax = reinterpret_cast<uintptr_t>(x), ay = reinterpret_cast<uintptr_t>(y);
  if (ax % sizeof(T) != 0 || (WRITE && ay % sizeof(T) != 0)) return cudaErrorMisalignedAddress;
  const bool y_vec = !WRITE || (ax - ay) % 16 == 0;  // else y is stored element by element
  const uint32_t h = static_cast<uint32_t>((ax % 16) / sizeof(T));
  if (inner == 1) {
    ColumnsPlan cp;
    if (plan_columns<V>(cp, total, C, h, resident_blocks(dev, columns_shared_bytes<V>()))) {
      cp.y_vec = y_vec;
      return launcher.template columns<V>(cp);
    }
  }
  RowsPlan rp = plan_rows<V>(total, C, inner, h, resident_blocks(dev, rows_shared_bytes(rows_slots(C))));
  rp.y_vec = y_vec;
  return launcher.template rows<V>(rp);
}

#ifdef __CUDACC__
// The current device's SM count and shared memory per SM, asked once per device.
inline cudaError_t device_info(DeviceInfo& info) {
  static std::atomic<int> sms_cache[64], shared_cache[64];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const bool cached = dev >= 0 && dev < 64;
  int sms = cached ? sms_cache[dev].load(std::memory_order_relaxed) : 0;
  int shared = cached ? shared_cache[dev].load(std::memory_order_relaxed) : 0;
  if (sms <= 0 || shared <= 0) {
    if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&shared, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev)) != cudaSuccess)
      return err;
    if (cached) sms_cache[dev].store(sms, std::memory_order_relaxed), shared_cache[dev].store(shared, std::memory_order_relaxed);
  }
  info = DeviceInfo{sms, shared};
  return cudaSuccess;
}

template <typename T, int KIND, bool WRITE>
struct CudaLauncher {
  const T* x;
  T* y;
  typename CudaElem<T>::compute_t param;
  int64_t* counts;
  int64_t* nan_counts;
  cudaStream_t stream;
  template <int V>
  cudaError_t rows(const RowsPlan& p) {
    const size_t shared = static_cast<size_t>(rows_shared_bytes(p.P));
    rows_kernel<T, KIND, WRITE, V><<<dim3(static_cast<unsigned>(p.grid)), kBlock, shared, stream>>>(
        x, y, p, param, counts, nan_counts);
    return cudaGetLastError();
  }
  template <int V>
  cudaError_t columns(const ColumnsPlan& p) {
    const size_t shared = static_cast<size_t>(columns_shared_bytes<V>());
    const dim3 grid(static_cast<unsigned>(p.grid_x), static_cast<unsigned>(p.grid_y));
    columns_kernel<T, KIND, WRITE, V><<<grid, dim3(32, kWarps), shared, stream>>>(x, y, p, param, counts,
                                                                                  nan_counts);
    return cudaGetLastError();
  }
};
#endif  // __CUDACC__

}  // namespace cnt

#ifdef __CUDACC__
template <typename T, int KIND, bool WRITE>
cudaError_t launch(const void* xv, void* yv, double param, int64_t outer, int64_t C, int64_t inner,
                   int64_t* counts, int64_t* nan_counts, cudaStream_t stream) {
  if (outer == 0 || C == 0 || inner == 0) return cudaSuccess;
  cnt::DeviceInfo dev{};
  const cudaError_t err = cnt::device_info(dev);
  if (err != cudaSuccess) return err;
  using compute_t = typename CudaElem<T>::compute_t;
  cnt::CudaLauncher<T, KIND, WRITE> launcher{static_cast<const T*>(xv), static_cast<T*>(yv),
                                             static_cast<compute_t>(param), counts, nan_counts, stream};
  return cnt::plan_and_launch<T, WRITE>(xv, yv, outer, C, inner, dev, launcher);
}
#endif  // __CUDACC__

// Calls F<T>::run() with the element type named by an ek_dtype.
template <template <typename> class F, typename... Args>
cudaError_t dispatch_dtype(ek_dtype dtype, Args... args) {
  switch (dtype) {
    case EK_FLOAT32: return F<float>::run(args...);
    case EK_FLOAT16: return F<__half>::run(args...);
    case EK_BFLOAT16: return F<__nv_bfloat16>::run(args...);
    case EK_FLOAT64: return F<double>::run(args...);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ek
