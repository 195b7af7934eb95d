// Torch side of the CUDA kernels: tensors in, raw pointers and the current stream out.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ek_cuda.h"

namespace ek {

namespace {
ek_dtype to_ek_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return EK_FLOAT32;
    case at::kHalf: return EK_FLOAT16;
    case at::kBFloat16: return EK_BFLOAT16;
    case at::kDouble: return EK_FLOAT64;
    default: TORCH_CHECK(false, "easier_kernels cuda: unsupported dtype ", t);
  }
}
void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "easier_kernels cuda: ", cudaGetErrorString(err)); }
}  // namespace

void count_on_cuda(const at::Tensor& x, at::Tensor& counts, at::Tensor& nan_counts, int64_t outer,
                   int64_t C, int64_t inner) {
  TORCH_CHECK(x.is_cuda() && counts.is_cuda() && nan_counts.is_cuda(), "count_on_cuda: CUDA tensors only");
  const c10::cuda::CUDAGuard guard(x.device());
  check(ek_count_on_cuda(x.const_data_ptr(), to_ek_dtype(x.scalar_type()), outer, C, inner,
                         counts.data_ptr<int64_t>(), nan_counts.data_ptr<int64_t>(),
                         c10::cuda::getCurrentCUDAStream()));
}

at::Tensor act_count_cuda(const at::Tensor& x, at::Tensor& counts, at::Tensor& nan_counts,
                          int64_t kind, double param, int64_t outer, int64_t C, int64_t inner) {
  TORCH_CHECK(x.is_cuda() && counts.is_cuda() && nan_counts.is_cuda(), "act_count_cuda: CUDA tensors only");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);  // keeps x's strides
  check(ek_act_count_cuda(x.const_data_ptr(), y.data_ptr(), to_ek_dtype(x.scalar_type()),
                          static_cast<int>(kind), param, outer, C, inner, counts.data_ptr<int64_t>(),
                          nan_counts.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()));
  return y;
}

}  // namespace ek
