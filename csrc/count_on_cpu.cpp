// count_on, CPU: per-channel on/NaN counts of a dense [outer, C, inner] buffer, one read pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "counting_cpu.h"
#include "op_args.h"

namespace ek {

void count_on_cpu(const at::Tensor& x, at::Tensor& counts, at::Tensor& nan_counts, int64_t outer,
                  int64_t C, int64_t inner) {
  TORCH_CHECK(x.device().is_cpu() && counts.device().is_cpu(), "count_on_cpu: CPU tensors only");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "count_on_cpu", [&] {
    using compute_t = typename Elem<scalar_t>::compute_t;
    count_pass<scalar_t, kIdentity, false>(x.const_data_ptr<scalar_t>(), nullptr, outer, C, inner,
                                           compute_t(0), counts.data_ptr<int64_t>(),
                                           nan_counts.data_ptr<int64_t>());
  });
}

namespace {
void count_on_op(const at::Tensor& x, at::Tensor& counts, at::Tensor& nan_counts, int64_t channel_dim) {
  const DenseView v = counting_args("count_on", x, counts, nan_counts, channel_dim);
  count_on_cpu(v.x, counts, nan_counts, v.outer, v.channels, v.inner);
}
}  // namespace

TORCH_LIBRARY_IMPL(easier_kernels, CPU, m) { m.impl("count_on", &count_on_op); }

}  // namespace ek
