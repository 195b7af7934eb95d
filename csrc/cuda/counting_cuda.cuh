// The CUDA traversal behind count_on and act_count (the analogue of counting_cpu.h).
// x is a dense [outer, C, inner] buffer. Two kernels:
//  * runs_kernel (inner >= kMinRun): one warp per (o, c) run of `inner` contiguous elements,
//    reduced with shuffles, one atomic per run;
//  * columns_kernel (otherwise, incl. channels_last / tokens with inner == 1): one thread per
//    column of the [outer, C * inner] matrix over a chunk of rows (coalesced loads), one atomic
//    per thread at the end.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "../ek_math.h"
#include "ek_cuda.h"

namespace ek {

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

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMinRun = 64;
constexpr int64_t kMaxBlocks = 8192;

template <typename T, int KIND, bool WRITE>
__device__ __forceinline__ void visit(const T* x, T* y, int64_t i,
                                      typename CudaElem<T>::compute_t param,
                                      unsigned long long& on, unsigned long long& nan) {
  const T v = x[i];
  on += CudaElem<T>::on(v);
  nan += CudaElem<T>::nan(v);
  if (WRITE) y[i] = CudaElem<T>::store(activation<KIND>(CudaElem<T>::load(v), param));
}

template <typename T, int KIND, bool WRITE>
__global__ void __launch_bounds__(kThreads)
    runs_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t runs, int64_t C, int64_t inner,
                typename CudaElem<T>::compute_t param, int64_t* counts, int64_t* nan_counts) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t warp_stride = int64_t(gridDim.x) * kWarps;
  for (int64_t run = warp; run < runs; run += warp_stride) {
    unsigned long long on = 0, nan = 0;
    const int64_t base = run * inner;
    for (int64_t i = lane; i < inner; i += 32) visit<T, KIND, WRITE>(x, y, base + i, param, on, nan);
    for (int offset = 16; offset > 0; offset /= 2) {
      on += __shfl_down_sync(0xffffffffu, on, offset);
      nan += __shfl_down_sync(0xffffffffu, nan, offset);
    }
    if (lane == 0) {
      const int64_t c = run % C;
      if (on) atomicAdd(reinterpret_cast<unsigned long long*>(counts + c), on);
      if (nan) atomicAdd(reinterpret_cast<unsigned long long*>(nan_counts + c), nan);
    }
  }
}

template <typename T, int KIND, bool WRITE>
__global__ void __launch_bounds__(kThreads)
    columns_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t outer, int64_t width,
                   int64_t inner, int64_t rows_per_block, typename CudaElem<T>::compute_t param,
                   int64_t* counts, int64_t* nan_counts) {
  const int64_t column = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (column >= width) return;
  const int64_t first = int64_t(blockIdx.y) * rows_per_block;
  const int64_t last = first + rows_per_block < outer ? first + rows_per_block : outer;
  unsigned long long on = 0, nan = 0;
  for (int64_t o = first; o < last; ++o) visit<T, KIND, WRITE>(x, y, o * width + column, param, on, nan);
  const int64_t c = column / inner;
  if (on) atomicAdd(reinterpret_cast<unsigned long long*>(counts + c), on);
  if (nan) atomicAdd(reinterpret_cast<unsigned long long*>(nan_counts + c), nan);
}

template <typename T, int KIND, bool WRITE>
cudaError_t launch(const void* xv, void* yv, double param, int64_t outer, int64_t C, int64_t inner,
                   int64_t* counts, int64_t* nan_counts, cudaStream_t stream) {
  if (outer == 0 || C == 0 || inner == 0) return cudaSuccess;
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  using compute_t = typename CudaElem<T>::compute_t;
  if (inner >= kMinRun) {
    const int64_t runs = outer * C;
    const int64_t blocks = std::min<int64_t>(kMaxBlocks, (runs + kWarps - 1) / kWarps);
    runs_kernel<T, KIND, WRITE><<<dim3(unsigned(blocks)), kThreads, 0, stream>>>(
        x, y, runs, C, inner, static_cast<compute_t>(param), counts, nan_counts);
  } else {
    const int64_t width = C * inner;
    const int64_t column_blocks = (width + kThreads - 1) / kThreads;
    const int64_t row_blocks =
        std::max<int64_t>(1, std::min<int64_t>({outer, 65535, kMaxBlocks / column_blocks}));
    const int64_t rows_per_block = (outer + row_blocks - 1) / row_blocks;
    const dim3 grid(unsigned(column_blocks), unsigned((outer + rows_per_block - 1) / rows_per_block));
    columns_kernel<T, KIND, WRITE><<<grid, kThreads, 0, stream>>>(
        x, y, outer, width, inner, rows_per_block, static_cast<compute_t>(param), counts, nan_counts);
  }
  return cudaGetLastError();
}

// Calls F<T>() with the element type named by an ek_dtype.
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
