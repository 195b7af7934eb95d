// The one CPU traversal behind count_on and act_count: read x once, optionally write
// y = activation(x), and add per-channel on/NaN counts. x is a dense buffer viewed as
// [outer, C, inner] (contiguous NCHW: inner = H*W; channels_last and tokens: inner = 1).
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
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
#ifndef EK_MAX_COLUMNS
#define EK_MAX_COLUMNS 8192
#endif

namespace ek {

// Per-dtype load/store and on/NaN tests. float and double compare as floats (which the
// compiler vectorizes); Half and BFloat16 test their raw bits and compute in float.
template <typename T>
struct Elem {
  using compute_t = T;
  static bool on(T v) { return v >= T(0); }
  static bool nan(T v) { return v != v; }
  static T load(T v) { return v; }
  static T store(T v) { return v; }
};
template <>
struct Elem<c10::Half> {
  using compute_t = float;
  static bool on(c10::Half v) { return bits_on<F16Bits>(v.x); }
  static bool nan(c10::Half v) { return bits_nan<F16Bits>(v.x); }
  static float load(c10::Half v) { return static_cast<float>(v); }
  static c10::Half store(float v) { return c10::Half(v); }
};
template <>
struct Elem<c10::BFloat16> {
  using compute_t = float;
  static bool on(c10::BFloat16 v) { return bits_on<BF16Bits>(v.x); }
  static bool nan(c10::BFloat16 v) { return bits_nan<BF16Bits>(v.x); }
  static float load(c10::BFloat16 v) { return static_cast<float>(v); }
  static c10::BFloat16 store(float v) { return c10::BFloat16(v); }
};

// Counts of one contiguous run of n elements (and y for it when WRITE).
// uint32 lanes keep the loop vectorized; runs are cut at 2^31 so they cannot overflow.
template <typename T, int KIND, bool WRITE>
inline void count_run(const T* x, T* y, int64_t n, typename Elem<T>::compute_t param,
                      int64_t& on_total, int64_t& nan_total) {
  constexpr int64_t kMaxRun = int64_t(1) << 31;
  for (int64_t start = 0; start < n; start += kMaxRun) {
    const int64_t end = std::min(n, start + kMaxRun);
    uint32_t on = 0, nan = 0;
#pragma omp simd reduction(+ : on, nan)
    for (int64_t i = start; i < end; ++i) {
      const T v = x[i];
      on += Elem<T>::on(v);
      nan += Elem<T>::nan(v);
      if constexpr (WRITE) y[i] = Elem<T>::store(activation<KIND>(Elem<T>::load(v), param));
    }
    on_total += on;
    nan_total += nan;
  }
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

// Channels [c0, c1) of rows [o0, o1), accumulated into this thread's local counters, which
// are indexed by channel. Layout [outer, C, inner] with inner > 1: each (o, c) is one run.
template <typename T, int KIND, bool WRITE>
EK_CPU_CLONES void count_block_strided(const T* x, T* y, int64_t C, int64_t inner, int64_t o0, int64_t o1,
                         int64_t c0, int64_t c1, typename Elem<T>::compute_t param, int64_t* on,
                         int64_t* nan) {
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t offset = (o * C + c) * inner;
      count_run<T, KIND, WRITE>(x + offset, WRITE ? y + offset : nullptr, inner, param, on[c],
                                nan[c]);
    }
  }
}

// Same when a whole [C, inner] slab is small (always for inner == 1: channels_last, tokens):
// lanes run along the slab's columns (c, i) into uint32 counters, summed over i per channel
// when flushed (before they could overflow). No short runs, no per-run reduction.
template <typename T, int KIND, bool WRITE>
EK_CPU_CLONES void count_block_columns(const T* x, T* y, int64_t C, int64_t inner, int64_t o0,
                                       int64_t o1, int64_t c0, int64_t c1,
                                       typename Elem<T>::compute_t param, int64_t* on,
                                       int64_t* nan) {
  const int64_t row_stride = C * inner, first = c0 * inner, width = (c1 - c0) * inner;
  uint32_t* on32 = scratch<uint32_t>(2 * width);
  uint32_t* nan32 = on32 + width;
  constexpr int64_t kFlushRows = int64_t(1) << 31;
  for (int64_t start = o0; start < o1; start += kFlushRows) {
    const int64_t end = std::min(o1, start + kFlushRows);
    for (int64_t o = start; o < end; ++o) {
      const T* row = x + o * row_stride + first;
      T* out = WRITE ? y + o * row_stride + first : nullptr;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const T v = row[j];
        on32[j] += Elem<T>::on(v);
        nan32[j] += Elem<T>::nan(v);
        if constexpr (WRITE) out[j] = Elem<T>::store(activation<KIND>(Elem<T>::load(v), param));
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      on[c0 + j / inner] += on32[j];
      nan[c0 + j / inner] += nan32[j];
      on32[j] = nan32[j] = 0;
    }
  }
}

// Column counters up to this many per thread (2 x uint32 each) stay in L1/L2.
constexpr int64_t kMaxColumns = EK_MAX_COLUMNS;

// Splits the work over threads: over `outer` when there is enough of it (each thread keeps
// private per-channel counters and adds them atomically once), else over channels (each thread
// owns its channels and writes them directly).
template <typename T, int KIND, bool WRITE>
void count_pass(const T* x, T* y, int64_t outer, int64_t C, int64_t inner,
                typename Elem<T>::compute_t param, int64_t* counts, int64_t* nan_counts) {
  if (outer == 0 || C == 0 || inner == 0) return;
  auto block = [&](int64_t o0, int64_t o1, int64_t c0, int64_t c1, int64_t* on, int64_t* nan) {
    if (inner == 1 || (c1 - c0) * inner <= kMaxColumns) {
      count_block_columns<T, KIND, WRITE>(x, y, C, inner, o0, o1, c0, c1, param, on, nan);
    } else {
      count_block_strided<T, KIND, WRITE>(x, y, C, inner, o0, o1, c0, c1, param, on, nan);
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
