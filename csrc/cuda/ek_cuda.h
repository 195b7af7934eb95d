// Plain C launchers of the CUDA kernels: raw pointers and a stream, no torch. The torch binding
// (bindings_cuda.cpp) is the only file that knows about tensors.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { EK_FLOAT32 = 0, EK_FLOAT16 = 1, EK_BFLOAT16 = 2, EK_FLOAT64 = 3 } ek_dtype;

// x is a dense [outer, channels, inner] buffer; counts/nan_counts are int64 [channels] and are
// added to. Returns the launch's cudaError_t.
cudaError_t ek_count_on_cuda(const void* x, ek_dtype dtype, int64_t outer, int64_t channels,
                             int64_t inner, int64_t* counts, int64_t* nan_counts,
                             cudaStream_t stream);

// Same counts, plus y = activation(x) with y laid out like x. `kind` is ek::Kind (ek_math.h);
// `param` is leaky_relu's negative_slope or elu's alpha.
cudaError_t ek_act_count_cuda(const void* x, void* y, ek_dtype dtype, int kind, double param,
                              int64_t outer, int64_t channels, int64_t inner, int64_t* counts,
                              int64_t* nan_counts, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
