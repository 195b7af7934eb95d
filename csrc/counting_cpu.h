// The one CPU traversal behind count_on and act_count: read x once, optionally write
// y = activation(x), and add per-channel on/NaN counts. x is a dense buffer viewed as
// [outer, C, inner] (contiguous NCHW: inner = H*W; channels_last and tokens: inner = 1).
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "ek_math.h"

// The hot helpers are always inlined into the per-ISA entries (count_block_avx2, ...), so each
// ISA compiles its own copy of them at its own width.
#define EK_INLINE __attribute__((always_inline)) inline

namespace ek {

constexpr int64_t kColumnTile = 8192;  // uint32 column counters per tile: 32 KB, fits L1
// Channels whose run of `inner` elements is at least this long (NCHW with H*W >= 256) are counted
// one run at a time, reading memory in order: from DRAM that streams at a plain sum's speed,
// where column tiles of a wide [C, inner] slab jump between rows (0.6-0.7x a sum, one core).
constexpr int64_t kRunMin = 256;
constexpr int64_t kMaxRun = int64_t(1) << 30;  // elements per uint32-counted piece of a run
// From DRAM, runs are read in blocks, each first prefetching the block that lies this far ahead:
// with a few instructions per vector (a plain sum has one) the out-of-order window alone keeps
// too few cache lines in flight to saturate DRAM from one core (0.8x a sum without, 1.0x with).
constexpr int64_t kBlockBytes = 1024, kPrefetchBytes = 8192;
// A tensor larger than this is taken to stream from DRAM (it would fill half of a 32 MiB L3);
// a smaller one may be in cache, where prefetching only costs instructions (one thread on a
// 16 MiB tensor: 0.83x of torch.sum without, 0.77x with).
constexpr int64_t kCachedBytes = int64_t(16) << 20;

// Per-dtype tests and conversions, on what the loops read and write: `Raw<T>`, the value itself
// for float and double, the raw bits for Half and BFloat16 (their only member, so a pointer to
// them is one to their bits, and the loops copy no structs, which GCC would not vectorize).
// `magnitude` is the bits without the sign: >= kInfBits exactly for NaN and +-inf, so a running
// max of it says whether a block held a special value. float and double test "on" as floats;
// Half and BFloat16 test their bits and compute in float.
template <typename T>
struct Elem {
  using compute_t = T;
  using raw_t = T;
  using bits_t = uint32_t;  // double: its high word, which holds the whole exponent
  static constexpr bits_t kInfBits = sizeof(T) == 4 ? 0x7F800000u : 0x7FF00000u;
  static bool on(T v) { return v >= T(0); }
  static bool nan(T v) { return v != v; }
  static bits_t magnitude(T v) {
    std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t> u;
    std::memcpy(&u, &v, sizeof(u));
    return uint32_t(u >> (8 * sizeof(T) - 32)) & 0x7FFFFFFFu;
  }
  static bool special(T v) { return magnitude(v) >= kInfBits; }
  static T load(T v) { return v; }
  static T store(T v) { return v; }
};
template <typename T, typename B>
struct Elem16 {
  using compute_t = float;
  using raw_t = uint16_t;
  using bits_t = uint16_t;
  static constexpr bits_t kInfBits = B::inf;
  static bool on(uint16_t u) { return (u <= B::inf) | (u == B::sign); }  // bits_on, with no branch
  static bool nan(uint16_t u) { return bits_nan<B>(u); }
  static bits_t magnitude(uint16_t u) { return u & 0x7FFFu; }
  static bool special(uint16_t u) { return bits_special<B>(u); }
  static float load(uint16_t u) { return static_cast<float>(T(u, T::from_bits())); }
  static uint16_t store(float v) { return T(v).x; }
};
template <>
struct Elem<c10::Half> : Elem16<c10::Half, F16Bits> {};
template <>
struct Elem<c10::BFloat16> : Elem16<c10::BFloat16, BF16Bits> {};

template <typename T>
using Raw = typename Elem<T>::raw_t;
template <typename T>
Raw<T>* raw(T* p) {
  return reinterpret_cast<Raw<T>*>(p);
}
template <typename T>
const Raw<T>* raw(const T* p) {
  return reinterpret_cast<const Raw<T>*>(p);
}

// Thread-private scratch, grown on demand and reused across calls (no per-call allocation).
template <typename U>
inline U* scratch(int64_t n) {
  thread_local std::vector<U> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  std::fill(buffer.begin(), buffer.begin() + n, U(0));
  return buffer.data();
}

inline void atomic_add(int64_t* target, int64_t value) {
  if (value != 0) __atomic_fetch_add(target, value, __ATOMIC_RELAXED);
}

// Adds column counters to their channels and zeroes them. Column `first + j` of a row holds
// channel ((first + j) / inner) % C; each channel's columns form one contiguous segment, so
// there is one division per segment, not per column.
inline void add_columns(uint32_t* columns, int64_t first, int64_t width, int64_t inner, int64_t C,
                        int64_t* channel_counts) {
  for (int64_t j = 0; j < width;) {
    const int64_t column = first + j, slot = column / inner;
    const int64_t segment = std::min(width - j, (slot + 1) * inner - column);
    uint64_t sum = 0;
    for (int64_t k = j; k < j + segment; ++k) sum += columns[k], columns[k] = 0;
    channel_counts[slot % C] += static_cast<int64_t>(sum);
    j += segment;
  }
}

// Counts a matrix of `rows` rows (row_stride apart) over columns [first, first + width): lanes
// run along the columns into uint32 counters, in tiles that keep the counters in L1, four rows
// per counter update. NaN and inf are rare, so the loop only keeps a running max of magnitudes
// (a register); NaNs are counted in a second pass over a tile where it reached kInfBits. Writes
// y = activation(x) when WRITE. Returns whether any element was not finite (NaN or +-inf).
template <typename T, int KIND, bool WRITE>
EK_INLINE bool count_columns(const Raw<T>* x, Raw<T>* y, int64_t rows, int64_t row_stride, int64_t first, int64_t width,
                             int64_t inner, int64_t C, typename Elem<T>::compute_t param, int64_t* on,
                             int64_t* nan) {
  using E = Elem<T>;
  using bits_t = typename E::bits_t;
  constexpr int64_t kFlushRows = int64_t(1) << 30;  // before a uint32 counter could overflow
  uint32_t* counters = scratch<uint32_t>(std::min(kColumnTile, width));
  bool saw_any_special = false;
  for (int64_t tile = first; tile < first + width; tile += kColumnTile) {
    const int64_t tile_width = std::min(kColumnTile, first + width - tile);
    bits_t top = 0;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      const Raw<T>* x0 = x + r * row_stride + tile;
      const Raw<T> *x1 = x0 + row_stride, *x2 = x1 + row_stride, *x3 = x2 + row_stride;
      Raw<T>* y0 = WRITE ? y + r * row_stride + tile : nullptr;
      Raw<T> *y1 = y0 + row_stride, *y2 = y1 + row_stride, *y3 = y2 + row_stride;
#pragma omp simd reduction(max : top)
      for (int64_t j = 0; j < tile_width; ++j) {
        const Raw<T> v0 = x0[j], v1 = x1[j], v2 = x2[j], v3 = x3[j];
        counters[j] += uint32_t(E::on(v0)) + E::on(v1) + E::on(v2) + E::on(v3);
        const bits_t m01 = std::max(E::magnitude(v0), E::magnitude(v1));
        const bits_t m23 = std::max(E::magnitude(v2), E::magnitude(v3));
        top = std::max(top, std::max(m01, m23));  // one max into `top`: what GCC takes for a reduction
        if constexpr (WRITE) {
          y0[j] = E::store(activation<KIND>(E::load(v0), param));
          y1[j] = E::store(activation<KIND>(E::load(v1), param));
          y2[j] = E::store(activation<KIND>(E::load(v2), param));
          y3[j] = E::store(activation<KIND>(E::load(v3), param));
        }
      }
      if ((r + 4) % kFlushRows == 0) add_columns(counters, tile, tile_width, inner, C, on);
    }
    for (; r < rows; ++r) {
      const Raw<T>* x0 = x + r * row_stride + tile;
      Raw<T>* y0 = WRITE ? y + r * row_stride + tile : nullptr;
#pragma omp simd reduction(max : top)
      for (int64_t j = 0; j < tile_width; ++j) {
        const Raw<T> v = x0[j];
        counters[j] += E::on(v);
        top = std::max(top, E::magnitude(v));
        if constexpr (WRITE) y0[j] = E::store(activation<KIND>(E::load(v), param));
      }
    }
    add_columns(counters, tile, tile_width, inner, C, on);
    if (top >= E::kInfBits) {
      saw_any_special = true;
      for (int64_t row = 0; row < rows; ++row) {
        const Raw<T>* x0 = x + row * row_stride + tile;
        for (int64_t j = 0; j < tile_width; ++j) counters[j] = E::nan(x0[j]);
        add_columns(counters, tile, tile_width, inner, C, nan);
      }
    }
  }
  return saw_any_special;
}

// Prefetches [p, p + bytes) shifted kPrefetchBytes ahead, a cache line at a time. A prefetch
// never faults, so one past the buffer's end is harmless.
EK_INLINE void prefetch_ahead(const void* p, int64_t bytes) {
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(p) + kPrefetchBytes;
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(reinterpret_cast<const void*>(ahead + i));
}

// One channel's run x[0, n), n <= kMaxRun: returns how many are on and folds the magnitudes into
// `top`; writes y = activation(x) when WRITE; prefetches ahead when x streams from DRAM.
template <typename T, int KIND, bool WRITE>
EK_INLINE uint32_t count_run(const Raw<T>* x, Raw<T>* y, int64_t n, bool prefetch, typename Elem<T>::compute_t param,
                             typename Elem<T>::bits_t& top) {
  using E = Elem<T>;
  constexpr int64_t block = kBlockBytes / int64_t(sizeof(T));
  uint32_t on = 0;
  typename E::bits_t m = top;
  for (int64_t b = 0; b < n; b += block) {
    const int64_t end = std::min(n, b + block);
    if (prefetch) prefetch_ahead(x + b, (end - b) * int64_t(sizeof(T)));
#pragma omp simd reduction(+ : on) reduction(max : m)
    for (int64_t j = b; j < end; ++j) {
      const Raw<T> v = x[j];
      on += E::on(v);
      m = std::max(m, E::magnitude(v));
      if constexpr (WRITE) y[j] = E::store(activation<KIND>(E::load(v), param));
    }
  }
  top = m;
  return on;
}

// Rows [0, rows) (row_stride apart) x channels [c0, c1), each channel a run of `inner`
// contiguous elements, counted run by run in memory order; a run that held a NaN or an inf is
// read again for its NaNs. Returns whether any element was not finite.
template <typename T, int KIND, bool WRITE>
EK_INLINE bool count_runs(const Raw<T>* x, Raw<T>* y, int64_t rows, int64_t row_stride, int64_t c0, int64_t c1, int64_t inner,
                          bool prefetch, typename Elem<T>::compute_t param, int64_t* on, int64_t* nan) {
  using E = Elem<T>;
  bool saw_any_special = false;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t start = 0; start < inner; start += kMaxRun) {
        const int64_t offset = r * row_stride + c * inner + start, n = std::min(kMaxRun, inner - start);
        typename E::bits_t top = 0;
        on[c] += count_run<T, KIND, WRITE>(x + offset, WRITE ? y + offset : nullptr, n, prefetch, param, top);
        if (top < E::kInfBits) continue;
        saw_any_special = true;
        int64_t nans = 0;
        for (int64_t j = 0; j < n; ++j) nans += E::nan(x[offset + j]);
        nan[c] += nans;
      }
    }
  }
  return saw_any_special;
}

// Where one thread's block of work lies: rows [o0, o1) x channels [c0, c1) of the [outer, C,
// inner] buffer, added to on/nan (indexed by channel); `from_dram`: x is larger than kCachedBytes.
template <typename T>
struct Block {
  const T* x;
  T* y;
  int64_t C, inner, o0, o1, c0, c1;
  bool from_dram;
  typename Elem<T>::compute_t param;
  int64_t* on;
  int64_t* nan;
};

// Counts a block: runs when they are long, else column tiles. With all channels, several
// consecutive [C, inner] slabs form one wider row (a column then maps to channel
// (column / inner) % C), so small slabs still fill whole tiles. Returns whether any element
// was not finite.
template <typename T, int KIND, bool WRITE>
EK_INLINE bool count_block_body(const Block<T>& b) {
  const int64_t slab = b.C * b.inner;
  const Raw<T>* xs = raw(b.x) + b.o0 * slab;
  Raw<T>* ys = WRITE ? raw(b.y) + b.o0 * slab : nullptr;
  if (b.inner >= kRunMin) {
    return count_runs<T, KIND, WRITE>(xs, ys, b.o1 - b.o0, slab, b.c0, b.c1, b.inner, b.from_dram, b.param, b.on,
                                      b.nan);
  }
  if (b.c0 != 0 || b.c1 != b.C) {
    return count_columns<T, KIND, WRITE>(xs, ys, b.o1 - b.o0, slab, b.c0 * b.inner, (b.c1 - b.c0) * b.inner,
                                         b.inner, b.C, b.param, b.on, b.nan);
  }
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(b.o1 - b.o0, kColumnTile / slab));
  const int64_t grouped = (b.o1 - b.o0) / group;
  const bool special = count_columns<T, KIND, WRITE>(xs, ys, grouped, group * slab, 0, group * slab, b.inner,
                                                     b.C, b.param, b.on, b.nan);
  const int64_t done = grouped * group;
  return count_columns<T, KIND, WRITE>(xs + done * slab, WRITE ? ys + done * slab : nullptr, b.o1 - b.o0 - done,
                                       slab, 0, slab, b.inner, b.C, b.param, b.on, b.nan) ||
         special;
}

// The same code compiled once per ISA (cpu_isa.h). GCC's avx512f target also enables FMA; the
// loops hold no a * b + c to contract, and tests/ops/test_cpu_isa.py checks every ISA's y and
// counts bit for bit.
template <typename T, int KIND, bool WRITE>
bool count_block_default(const Block<T>& b) {
  return count_block_body<T, KIND, WRITE>(b);
}
#if EK_X86_ISAS
template <typename T, int KIND, bool WRITE>
EK_TARGET_AVX2 bool count_block_avx2(const Block<T>& b) {
  return count_block_body<T, KIND, WRITE>(b);
}
template <typename T, int KIND, bool WRITE>
EK_TARGET_AVX512 bool count_block_avx512(const Block<T>& b) {
  return count_block_body<T, KIND, WRITE>(b);
}
#endif

template <typename T, int KIND, bool WRITE>
bool count_block(CpuIsa isa, const Block<T>& b) {
#if EK_X86_ISAS
  if (isa == CpuIsa::kAvx512) return count_block_avx512<T, KIND, WRITE>(b);
  if (isa == CpuIsa::kAvx2) return count_block_avx2<T, KIND, WRITE>(b);
#endif
  return count_block_default<T, KIND, WRITE>(b);
}

// Bytes of x per chunk: a chunk is counted, then handed to `after_chunk` while it is still in
// cache (how act_count applies ATen's own vectorized kernels for the transcendental
// activations). 2 MB measured best on a 2-core EPYC (vs 128 KB and 512 KB), see bench/RESULTS.md.
constexpr int64_t kChunkBytes = int64_t(2) << 20;

struct NoAfterChunk {
  void operator()(int64_t, int64_t, int64_t, int64_t, bool) const {}
};

// Splits the work over threads: over `outer` when there is enough of it (each thread keeps
// private per-channel counters and adds them atomically once), else over channels (each thread
// owns its channels and writes them directly). Each thread walks its block in chunks of rows;
// after_chunk(o0, o1, c0, c1, saw_special) runs on every chunk right after it was counted
// (saw_special: the chunk holds a NaN or an inf).
template <typename T, int KIND, bool WRITE, typename AfterChunk = NoAfterChunk>
void count_pass(const T* x, T* y, int64_t outer, int64_t C, int64_t inner,
                typename Elem<T>::compute_t param, int64_t* counts, int64_t* nan_counts,
                AfterChunk after_chunk = {}) {
  if (outer == 0 || C == 0 || inner == 0) return;
  const CpuIsa isa = cpu_isa();  // once per call, outside the threads (it may throw)
  const bool from_dram = outer * C * inner * int64_t(sizeof(T)) > kCachedBytes;
  auto block = [&](int64_t o0, int64_t o1, int64_t c0, int64_t c1, int64_t* on, int64_t* nan) {
    if constexpr (std::is_same_v<AfterChunk, NoAfterChunk>) {
      count_block<T, KIND, WRITE>(isa, {x, y, C, inner, o0, o1, c0, c1, from_dram, param, on, nan});
      return;
    }
    const int64_t row_bytes = (c1 - c0) * inner * int64_t(sizeof(T));
    const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkBytes / row_bytes);
    for (int64_t start = o0; start < o1; start += rows_per_chunk) {
      const int64_t end = std::min(o1, start + rows_per_chunk);
      const bool special =
          count_block<T, KIND, WRITE>(isa, {x, y, C, inner, start, end, c0, c1, from_dram, param, on, nan});
      after_chunk(start, end, c0, c1, special);
    }
  };
  const int64_t threads = at::get_num_threads();
  if (outer >= threads) {
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (C * inner));
    at::parallel_for(0, outer, grain, [&](int64_t o0, int64_t o1) {
      int64_t* local = scratch<int64_t>(2 * C);
      block(o0, o1, 0, C, local, local + C);
      for (int64_t c = 0; c < C; ++c) {
        atomic_add(counts + c, local[c]);
        atomic_add(nan_counts + c, local[C + c]);
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (outer * inner));
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      block(0, outer, c0, c1, counts, nan_counts);
    });
  }
}

}  // namespace ek
