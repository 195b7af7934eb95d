// The one CPU traversal behind count_on and act_count: read x once, optionally write
// y = activation(x), and add per-channel on/NaN counts. x is a dense buffer viewed as
// [outer, C, inner] (contiguous NCHW: inner = H*W; channels_last and tokens: inner = 1).
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "ek_math.h"

// The hot loops are compiled twice, for AVX2 and for the x86-64 baseline, and picked at load
// time (GCC/clang function multiversioning), so one binary runs everywhere at full width.
// Only "avx2", not "fma": contracting a*b+c would change rounding against PyTorch.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define EK_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define EK_CPU_CLONES
#endif

namespace ek {

constexpr int64_t kColumnTile = 8192;  // uint32 column counters per tile: 32 KB, fits L1

// Per-dtype load/store and on/NaN/not-finite tests. float and double compare as floats (which
// the compiler vectorizes); Half and BFloat16 test their raw bits and compute in float.
template <typename T>
struct Elem {
  using compute_t = T;
  static bool on(T v) { return v >= T(0); }
  static bool nan(T v) { return v != v; }
  static bool special(T v) { return !(std::abs(v) <= std::numeric_limits<T>::max()); }
  static T load(T v) { return v; }
  static T store(T v) { return v; }
};
template <>
struct Elem<c10::Half> {
  using compute_t = float;
  static bool on(c10::Half v) { return bits_on<F16Bits>(v.x); }
  static bool nan(c10::Half v) { return bits_nan<F16Bits>(v.x); }
  static bool special(c10::Half v) { return bits_special<F16Bits>(v.x); }
  static float load(c10::Half v) { return static_cast<float>(v); }
  static c10::Half store(float v) { return c10::Half(v); }
};
template <>
struct Elem<c10::BFloat16> {
  using compute_t = float;
  static bool on(c10::BFloat16 v) { return bits_on<BF16Bits>(v.x); }
  static bool nan(c10::BFloat16 v) { return bits_nan<BF16Bits>(v.x); }
  static bool special(c10::BFloat16 v) { return bits_special<BF16Bits>(v.x); }
  static float load(c10::BFloat16 v) { return static_cast<float>(v); }
  static c10::BFloat16 store(float v) { return c10::BFloat16(v); }
};

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
// per counter update. NaN and inf are rare, so the loop only ORs a "saw one" flag (a register);
// NaNs are counted in a second pass when it is set. Writes y = activation(x) when WRITE.
// Returns whether any element was not finite (NaN or +-inf).
template <typename T, int KIND, bool WRITE>
__attribute__((always_inline)) inline bool count_columns(
    const T* x, T* y, int64_t rows, int64_t row_stride, int64_t first, int64_t width,
    int64_t inner, int64_t C, typename Elem<T>::compute_t param, int64_t* on, int64_t* nan) {
  using E = Elem<T>;
  constexpr int64_t kFlushRows = int64_t(1) << 30;  // before a uint32 counter could overflow
  uint32_t* counters = scratch<uint32_t>(std::min(kColumnTile, width));
  bool saw_any_special = false;
  for (int64_t tile = first; tile < first + width; tile += kColumnTile) {
    const int64_t tile_width = std::min(kColumnTile, first + width - tile);
    uint32_t saw_special = 0;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      const T* x0 = x + r * row_stride + tile;
      const T *x1 = x0 + row_stride, *x2 = x1 + row_stride, *x3 = x2 + row_stride;
      T* y0 = WRITE ? y + r * row_stride + tile : nullptr;
      T *y1 = y0 + row_stride, *y2 = y1 + row_stride, *y3 = y2 + row_stride;
#pragma omp simd reduction(| : saw_special)
      for (int64_t j = 0; j < tile_width; ++j) {
        const T v0 = x0[j], v1 = x1[j], v2 = x2[j], v3 = x3[j];
        counters[j] += uint32_t(E::on(v0)) + E::on(v1) + E::on(v2) + E::on(v3);
        saw_special |= E::special(v0) | E::special(v1) | E::special(v2) | E::special(v3);
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
      const T* x0 = x + r * row_stride + tile;
      T* y0 = WRITE ? y + r * row_stride + tile : nullptr;
#pragma omp simd reduction(| : saw_special)
      for (int64_t j = 0; j < tile_width; ++j) {
        const T v = x0[j];
        counters[j] += E::on(v);
        saw_special |= E::special(v);
        if constexpr (WRITE) y0[j] = E::store(activation<KIND>(E::load(v), param));
      }
    }
    add_columns(counters, tile, tile_width, inner, C, on);
    if (saw_special) {
      saw_any_special = true;
      for (int64_t row = 0; row < rows; ++row) {
        const T* x0 = x + row * row_stride + tile;
        for (int64_t j = 0; j < tile_width; ++j) counters[j] = E::nan(x0[j]);
        add_columns(counters, tile, tile_width, inner, C, nan);
      }
    }
  }
  return saw_any_special;
}

// Rows [o0, o1) x channels [c0, c1) of the [outer, C, inner] buffer, added to on/nan (indexed
// by channel). With all channels, several consecutive [C, inner] slabs form one wider row
// (a column then maps to channel (column / inner) % C), so small slabs still fill whole tiles.
// Returns whether any element was not finite.
template <typename T, int KIND, bool WRITE>
EK_CPU_CLONES bool count_block(const T* x, T* y, int64_t C, int64_t inner, int64_t o0, int64_t o1,
                               int64_t c0, int64_t c1, typename Elem<T>::compute_t param,
                               int64_t* on, int64_t* nan) {
  const int64_t slab = C * inner;
  const T* xs = x + o0 * slab;
  T* ys = WRITE ? y + o0 * slab : nullptr;
  if (c0 != 0 || c1 != C) {
    return count_columns<T, KIND, WRITE>(xs, ys, o1 - o0, slab, c0 * inner, (c1 - c0) * inner,
                                         inner, C, param, on, nan);
  }
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(o1 - o0, kColumnTile / slab));
  const int64_t grouped = (o1 - o0) / group;
  const bool special = count_columns<T, KIND, WRITE>(xs, ys, grouped, group * slab, 0,
                                                     group * slab, inner, C, param, on, nan);
  const int64_t done = grouped * group;
  return count_columns<T, KIND, WRITE>(xs + done * slab, WRITE ? ys + done * slab : nullptr,
                                       o1 - o0 - done, slab, 0, slab, inner, C, param, on, nan) ||
         special;
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
  auto block = [&](int64_t o0, int64_t o1, int64_t c0, int64_t c1, int64_t* on, int64_t* nan) {
    if constexpr (std::is_same_v<AfterChunk, NoAfterChunk>) {
      count_block<T, KIND, WRITE>(x, y, C, inner, o0, o1, c0, c1, param, on, nan);
      return;
    }
    const int64_t row_bytes = (c1 - c0) * inner * int64_t(sizeof(T));
    const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkBytes / row_bytes);
    for (int64_t start = o0; start < o1; start += rows_per_chunk) {
      const int64_t end = std::min(o1, start + rows_per_chunk);
      const bool special = count_block<T, KIND, WRITE>(x, y, C, inner, start, end, c0, c1, param, on, nan);
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
