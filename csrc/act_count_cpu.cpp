// act_count, CPU: y = activation(x) and per-channel on/NaN counts in the same pass over memory.
// The relu family and hardswish are computed inside the counting loop. For the transcendental
// kinds (gelu, silu, elu) each chunk is counted and then, while it is still in cache, handed to
// ATen's own vectorized kernel: one pass over DRAM, PyTorch's numerics for finite inputs and the
// special-value rule (ek_math.h) for the rest.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "counting_cpu.h"
#include "op_args.h"

namespace ek {

namespace {

template <typename T, int KIND>
void fused(const at::Tensor& x, at::Tensor& y, int64_t* counts, int64_t* nan_counts, double param,
           int64_t outer, int64_t C, int64_t inner) {
  using compute_t = typename Elem<T>::compute_t;
  count_pass<T, KIND, true>(x.const_data_ptr<T>(), y.data_ptr<T>(), outer, C, inner,
                            static_cast<compute_t>(param), counts, nan_counts);
}

// Applies the ATen activation to one contiguous segment of the flat buffers.
void aten_activation(const at::Tensor& x, at::Tensor& y, int64_t kind, double param) {
  switch (kind) {
    case kGelu: at::gelu_out(y, x, "none"); break;
    case kGeluTanh: at::gelu_out(y, x, "tanh"); break;
    case kSilu: at::silu_out(y, x); break;
    case kElu: at::elu_out(y, x, param, 1, 1); break;
    default: TORCH_CHECK(false, "act_count_cpu: no ATen path for kind ", kind);
  }
}

// ATen's value at NaN and +-inf depends on the CPU (float32 gelu(+inf) is NaN with AVX-512):
// overwrites the segment's non-finite inputs with the special-value rule of ek_math.h.
template <typename T, int KIND>
void apply_special_rule(const T* x, T* y, int64_t n, double param) {
  using E = Elem<T>;
  using compute_t = typename E::compute_t;
  const Raw<T>* xs = raw(x);
  Raw<T>* ys = raw(y);
  for (int64_t i = 0; i < n; ++i) {
    if (E::special(xs[i])) ys[i] = E::store(activation<KIND>(E::load(xs[i]), static_cast<compute_t>(param)));
  }
}

template <typename T, int KIND>
void chunked(const at::Tensor& x, at::Tensor& y, int64_t* counts, int64_t* nan_counts,
             double param, int64_t outer, int64_t C, int64_t inner) {
  // x and y are dense with the same strides: their memory is the flat [outer, C, inner] buffer.
  const at::Tensor x_flat = at::from_blob(const_cast<void*>(x.const_data_ptr()), {x.numel()}, x.options());
  at::Tensor y_flat = at::from_blob(y.data_ptr(), {y.numel()}, y.options());
  auto segment = [&](int64_t offset, int64_t length, bool special) {
    at::Tensor out = y_flat.narrow(0, offset, length);
    aten_activation(x_flat.narrow(0, offset, length), out, KIND, param);
    if (special) apply_special_rule<T, KIND>(x.const_data_ptr<T>() + offset, y.data_ptr<T>() + offset, length, param);
  };
  auto after_chunk = [&](int64_t o0, int64_t o1, int64_t c0, int64_t c1, bool special) {
    const int64_t slab = C * inner;
    if (c0 == 0 && c1 == C) {  // whole slabs: one contiguous region
      segment(o0 * slab, (o1 - o0) * slab, special);
      return;
    }
    for (int64_t o = o0; o < o1; ++o) segment(o * slab + c0 * inner, (c1 - c0) * inner, special);
  };
  count_pass<T, kIdentity, false>(x.const_data_ptr<T>(), nullptr, outer, C, inner,
                                  typename Elem<T>::compute_t(0), counts, nan_counts, after_chunk);
}

}  // namespace

at::Tensor act_count_cpu(const at::Tensor& x, at::Tensor& counts, at::Tensor& nan_counts,
                         int64_t kind, double param, int64_t outer, int64_t C, int64_t inner) {
  TORCH_CHECK(x.device().is_cpu() && counts.device().is_cpu(), "act_count_cpu: CPU tensors only");
  at::Tensor y = at::empty_like(x);  // keeps x's strides (contiguous, channels_last, permuted)
  int64_t* on = counts.data_ptr<int64_t>();
  int64_t* nan = nan_counts.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "act_count_cpu", [&] {
    switch (kind) {
      case kIdentity: fused<scalar_t, kIdentity>(x, y, on, nan, param, outer, C, inner); break;
      case kRelu: fused<scalar_t, kRelu>(x, y, on, nan, param, outer, C, inner); break;
      case kRelu6: fused<scalar_t, kRelu6>(x, y, on, nan, param, outer, C, inner); break;
      case kLeakyRelu: fused<scalar_t, kLeakyRelu>(x, y, on, nan, param, outer, C, inner); break;
      case kHardswish: fused<scalar_t, kHardswish>(x, y, on, nan, param, outer, C, inner); break;
      case kGelu: chunked<scalar_t, kGelu>(x, y, on, nan, param, outer, C, inner); break;
      case kGeluTanh: chunked<scalar_t, kGeluTanh>(x, y, on, nan, param, outer, C, inner); break;
      case kSilu: chunked<scalar_t, kSilu>(x, y, on, nan, param, outer, C, inner); break;
      case kElu: chunked<scalar_t, kElu>(x, y, on, nan, param, outer, C, inner); break;
      default: TORCH_CHECK(false, "act_count_cpu: unknown activation kind ", kind);
    }
  });
  return y;
}

namespace {
at::Tensor act_count_op(const at::Tensor& x, at::Tensor& counts, at::Tensor& nan_counts, c10::string_view kind,
                        int64_t channel_dim, double param) {
  const DenseView v = counting_args("act_count", x, counts, nan_counts, channel_dim);
  return act_count_cpu(v.x, counts, nan_counts, kind_id(kind), param, v.outer, v.channels, v.inner);
}
}  // namespace

TORCH_LIBRARY_IMPL(easier_kernels, CPU, m) { m.impl("act_count", &act_count_op); }

}  // namespace ek
