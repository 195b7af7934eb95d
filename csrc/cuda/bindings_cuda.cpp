// Torch side of the CUDA kernels: the ops' CUDA registrations. Tensors in, raw pointers and the
// current stream of x's device out.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ek_cuda.h"
#include "op_args.h"

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

void count_on_cuda(const at::Tensor& x, at::Tensor& counts, at::Tensor& nan_counts, int64_t channel_dim) {
  TORCH_CHECK(x.is_cuda(), "count_on (cuda): CUDA tensors only, got one on ", x.device());
  const DenseView v = counting_args("count_on", x, counts, nan_counts, channel_dim);
  const c10::cuda::CUDAGuard guard(x.device());
  check(ek_count_on_cuda(v.x.const_data_ptr(), to_ek_dtype(x.scalar_type()), v.outer, v.channels, v.inner,
                         counts.data_ptr<int64_t>(), nan_counts.data_ptr<int64_t>(),
                         c10::cuda::getCurrentCUDAStream()));
}

at::Tensor act_count_cuda(const at::Tensor& x, at::Tensor& counts, at::Tensor& nan_counts, c10::string_view kind,
                          int64_t channel_dim, double param) {
  TORCH_CHECK(x.is_cuda(), "act_count (cuda): CUDA tensors only, got one on ", x.device());
  const DenseView v = counting_args("act_count", x, counts, nan_counts, channel_dim);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(v.x);  // keeps the dense view's strides
  check(ek_act_count_cuda(v.x.const_data_ptr(), y.data_ptr(), to_ek_dtype(x.scalar_type()),
                          static_cast<int>(kind_id(kind)), param, v.outer, v.channels, v.inner,
                          counts.data_ptr<int64_t>(), nan_counts.data_ptr<int64_t>(),
                          c10::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor conv_block_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                           const at::Tensor& w2, const at::Tensor& b2,
                           const std::optional<at::Tensor>& residual, c10::string_view pattern_name,
                           c10::IntArrayRef stride, c10::IntArrayRef padding, c10::string_view kind_name,
                           double param) {
  const int64_t pattern = pattern_id(pattern_name), kind = kind_id(kind_name);
  const auto [stride_h, stride_w] = pair_arg(stride, "stride");
  const auto [pad_h, pad_w] = pair_arg(padding, "padding");
  const bool has_res = residual.has_value() && residual->defined();
  for (const at::Tensor* t : {&x, &w1, &b1, &w2, &b2}) {
    TORCH_CHECK(t->is_cuda(), "conv_block_cuda: CUDA tensors only, got one on ", t->device());
    TORCH_CHECK(t->device() == x.device(), "conv_block_cuda: all tensors must be on ", x.device(), ", got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "conv_block_cuda: all tensors must be ",
                x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), "conv_block_cuda: tensors must be contiguous");
  }
  const ek_dtype dtype = to_ek_dtype(x.scalar_type());
  TORCH_CHECK(x.dim() == 4, "conv_block_cuda: x must be 4-D [N, Cin, H, W], got ", x.sizes());
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  // Kernel layouts: pointwise [O, I], depthwise [C, kh, kw].
  const at::Tensor& pw = pattern == 0 ? w1 : w2;
  const at::Tensor& dw = pattern == 0 ? w2 : w1;
  TORCH_CHECK(pw.dim() == 2, "conv_block_cuda: the pointwise weight must be [O, I], got ", pw.sizes());
  TORCH_CHECK(dw.dim() == 3, "conv_block_cuda: the depthwise weight must be [C, kh, kw], got ", dw.sizes());
  const int64_t C = pw.size(0), kh = dw.size(1), kw = dw.size(2);
  if (pattern == 0) {
    TORCH_CHECK(pw.size(1) == Cin && dw.size(0) == C, "conv_block_cuda pw_dw: x has ", Cin,
                " channels; w1 must be [Cmid, ", Cin, "] and w2 [Cmid, kh, kw], got ", w1.sizes(), " and ",
                w2.sizes());
  } else {
    TORCH_CHECK(dw.size(0) == Cin && pw.size(1) == Cin, "conv_block_cuda dw_pw: x has ", Cin,
                " channels; w1 must be [", Cin, ", kh, kw] and w2 [Cout, ", Cin, "], got ", w1.sizes(),
                " and ", w2.sizes());
  }
  TORCH_CHECK(kh >= 1 && kw >= 1, "conv_block_cuda: empty depthwise kernel ", dw.sizes());
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == w1.size(0), "conv_block_cuda: b1 must be [", w1.size(0),
              "], got ", b1.sizes());
  TORCH_CHECK(b2.dim() == 1 && b2.size(0) == w2.size(0), "conv_block_cuda: b2 must be [", w2.size(0),
              "], got ", b2.sizes());
  TORCH_CHECK(stride_h >= 1 && stride_w >= 1, "conv_block_cuda: stride must be >= 1, got (", stride_h, ", ",
              stride_w, ")");
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, "conv_block_cuda: padding must be >= 0, got (", pad_h, ", ", pad_w,
              ")");
  TORCH_CHECK(H + 2 * pad_h >= kh && W + 2 * pad_w >= kw, "conv_block_cuda: a (", kh, ", ", kw,
              ") kernel does not fit the (", H, ", ", W, ") input with padding (", pad_h, ", ", pad_w, ")");
  const int64_t Ho = (H + 2 * pad_h - kh) / stride_h + 1, Wo = (W + 2 * pad_w - kw) / stride_w + 1;
  if (has_res) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.is_cuda() && r.device() == x.device(), "conv_block_cuda: residual must be on ", x.device(),
                ", got ", r.device());
    TORCH_CHECK(r.scalar_type() == x.scalar_type(), "conv_block_cuda: residual must be ", x.scalar_type(),
                ", got ", r.scalar_type());
    TORCH_CHECK(r.sizes() == at::IntArrayRef({N, C, Ho, Wo}), "conv_block_cuda: residual must be [", N, ", ",
                C, ", ", Ho, ", ", Wo, "] like the output, got ", r.sizes());
    TORCH_CHECK(r.is_contiguous(), "conv_block_cuda: residual must be contiguous");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({N, C, Ho, Wo}, x.options());
  if (out.numel() == 0) return out;
  check(ek_conv_block_cuda(x.const_data_ptr(), w1.const_data_ptr(), b1.const_data_ptr(), w2.const_data_ptr(),
                           b2.const_data_ptr(), has_res ? residual->const_data_ptr() : nullptr, out.data_ptr(),
                           dtype, N, Cin, H, W, C, kh, kw, static_cast<int>(pattern), stride_h, stride_w, pad_h,
                           pad_w, static_cast<int>(kind), param, c10::cuda::getCurrentCUDAStream()));
  return out;
}

TORCH_LIBRARY_IMPL(easier_kernels, CUDA, m) {
  m.impl("count_on", &count_on_cuda);
  m.impl("act_count", &act_count_cuda);
  m.impl("conv_block", &conv_block_cuda);
}

}  // namespace ek
