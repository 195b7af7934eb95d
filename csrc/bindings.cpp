// Python bindings of the native kernels. The public ops (easier_kernels::count_on / act_count /
// conv_block) are registered with torch.library in easier_kernels/ops; these are the raw entries.
#include <torch/extension.h>

namespace ek {
void count_on_cpu(const at::Tensor& x, at::Tensor& counts, at::Tensor& nan_counts, int64_t outer,
                  int64_t C, int64_t inner);
at::Tensor act_count_cpu(const at::Tensor& x, at::Tensor& counts, at::Tensor& nan_counts,
                         int64_t kind, double param, int64_t outer, int64_t C, int64_t inner);
at::Tensor conv_block_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                          const at::Tensor& w2, const at::Tensor& b2,
                          const std::optional<at::Tensor>& residual, int64_t pattern, int64_t stride_h,
                          int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t kind, double param);
#ifdef EK_WITH_CUDA
void count_on_cuda(const at::Tensor& x, at::Tensor& counts, at::Tensor& nan_counts, int64_t outer,
                   int64_t C, int64_t inner);
at::Tensor act_count_cuda(const at::Tensor& x, at::Tensor& counts, at::Tensor& nan_counts,
                          int64_t kind, double param, int64_t outer, int64_t C, int64_t inner);
at::Tensor conv_block_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                           const at::Tensor& w2, const at::Tensor& b2,
                           const std::optional<at::Tensor>& residual, int64_t pattern, int64_t stride_h,
                           int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t kind, double param);
#endif
}  // namespace ek

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "easier_kernels native kernels (C++ CPU, and CUDA where built)";
  m.def("count_on_cpu", &ek::count_on_cpu);
  m.def("act_count_cpu", &ek::act_count_cpu);
  m.def("conv_block_cpu", &ek::conv_block_cpu);
#ifdef EK_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def("count_on_cuda", &ek::count_on_cuda);
  m.def("act_count_cuda", &ek::act_count_cuda);
  m.def("conv_block_cuda", &ek::conv_block_cuda);
#else
  m.attr("has_cuda") = false;
#endif
}
