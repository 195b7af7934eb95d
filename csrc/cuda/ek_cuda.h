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

// conv_block: out = act(conv2(conv1(x) + b1) + b2 + residual), the intermediate never in memory.
// pattern 0 (pw_dw): w1 [C, Cin] pointwise, w2 [C, kh, kw] depthwise with the stride and the zero
// padding of the intermediate map. pattern 1 (dw_pw): w1 [Cin, kh, kw] depthwise on x with the
// stride and zero padding, w2 [C, Cin] pointwise. b1/b2 have w1's/w2's first size. x is a dense
// [N, Cin, H, W] buffer; out and residual (nullable) are dense [N, C, Ho, Wo] with
// Ho = (H + 2 pad_h - kh) / stride_h + 1 (Wo likewise). All of one dtype. `kind`/`param` as above.
cudaError_t ek_conv_block_cuda(const void* x, const void* w1, const void* b1, const void* w2,
                               const void* b2, const void* residual, void* out, ek_dtype dtype,
                               int64_t N, int64_t Cin, int64_t H, int64_t W, int64_t C, int64_t kh,
                               int64_t kw, int pattern, int64_t stride_h, int64_t stride_w,
                               int64_t pad_h, int64_t pad_w, int kind, double param,
                               cudaStream_t stream);

#ifdef __cplusplus
}
#endif
