// act_count, CPU: y = activation(x) and per-channel on/NaN counts in the same pass over memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "counting_cpu.h"

namespace ek {

namespace {
template <typename T, int KIND>
void run(const at::Tensor& x, at::Tensor& y, at::Tensor& counts, at::Tensor& nan_counts,
         double param, int64_t outer, int64_t C, int64_t inner) {
  using compute_t = typename Elem<T>::compute_t;
  count_pass<T, KIND, true>(x.const_data_ptr<T>(), y.data_ptr<T>(), outer, C, inner,
                            static_cast<compute_t>(param), counts.data_ptr<int64_t>(),
                            nan_counts.data_ptr<int64_t>());
}
}  // namespace

at::Tensor act_count_cpu(const at::Tensor& x, at::Tensor& counts, at::Tensor& nan_counts,
                         int64_t kind, double param, int64_t outer, int64_t C, int64_t inner) {
  TORCH_CHECK(x.device().is_cpu() && counts.device().is_cpu(), "act_count_cpu: CPU tensors only");
  at::Tensor y = at::empty_like(x);  // keeps x's strides (contiguous, channels_last, permuted)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "act_count_cpu", [&] {
    switch (kind) {
      case kIdentity: run<scalar_t, kIdentity>(x, y, counts, nan_counts, param, outer, C, inner); break;
      case kRelu: run<scalar_t, kRelu>(x, y, counts, nan_counts, param, outer, C, inner); break;
      case kRelu6: run<scalar_t, kRelu6>(x, y, counts, nan_counts, param, outer, C, inner); break;
      case kLeakyRelu: run<scalar_t, kLeakyRelu>(x, y, counts, nan_counts, param, outer, C, inner); break;
      case kGelu: run<scalar_t, kGelu>(x, y, counts, nan_counts, param, outer, C, inner); break;
      case kGeluTanh: run<scalar_t, kGeluTanh>(x, y, counts, nan_counts, param, outer, C, inner); break;
      case kSilu: run<scalar_t, kSilu>(x, y, counts, nan_counts, param, outer, C, inner); break;
      case kHardswish: run<scalar_t, kHardswish>(x, y, counts, nan_counts, param, outer, C, inner); break;
      case kElu: run<scalar_t, kElu>(x, y, counts, nan_counts, param, outer, C, inner); break;
      default: TORCH_CHECK(false, "act_count_cpu: unknown activation kind ", kind);
    }
  });
  return y;
}

}  // namespace ek
