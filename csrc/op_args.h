// From the registered ops' arguments (easier_kernels::count_on / act_count / conv_block, schemas
// in library.cpp) to what the kernels take: a dense [outer, C, inner] view of x and integer ids
// for the activation kind and the conv_block pattern. Shared by the CPU and CUDA registrations.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <iterator>
#include <string_view>
#include <vector>

#include "ek_math.h"

namespace ek {

// kinds.KIND_IDS in Python; the enum Kind in ek_math.h.
inline int64_t kind_id(std::string_view kind) {
  static constexpr std::string_view names[] = {"identity", "relu",      "relu6",     "leaky_relu", "gelu",
                                               "gelu_tanh", "silu",     "hardswish", "elu"};
  for (int64_t i = 0; i < int64_t(std::size(names)); ++i)
    if (names[i] == kind) return i;
  TORCH_CHECK(false, "easier_kernels: unknown activation kind '", kind,
              "'; use identity, relu, relu6, leaky_relu, gelu, gelu_tanh, silu, hardswish or elu");
}

// conv_block's patterns: 0 = pointwise then depthwise, 1 = depthwise then pointwise.
inline int64_t pattern_id(std::string_view pattern) {
  if (pattern == "pw_dw") return 0;
  if (pattern == "dw_pw") return 1;
  TORCH_CHECK(false, "easier_kernels::conv_block: pattern must be 'pw_dw' or 'dw_pw', got '", pattern, "'");
}

// A tensor whose memory is a dense [outer, channels, inner] buffer around its channel dim.
struct DenseView {
  at::Tensor x;
  int64_t outer, channels, inner;
};

// Any tensor whose elements fill its memory without gaps (contiguous, channels_last, a permuted
// view such as tokens [N, L, C]) maps onto [outer, C, inner] with no copy: order its dims by
// stride, the dims before the channel form `outer`, those after it `inner`. Returns false for
// anything else (gaps, overlaps, broadcast views).
inline bool dense_shape(const at::Tensor& x, int64_t dim, int64_t& outer, int64_t& inner) {
  std::vector<int64_t> order;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (x.size(d) != 1) order.push_back(d);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return x.stride(a) > x.stride(b); });
  int64_t expected = 1;
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    if (x.stride(*it) != expected) return false;
    expected *= x.size(*it);
  }
  if (x.size(dim) == 1) {  // a single channel: every element counts for it
    outer = x.numel();
    inner = 1;
    return true;
  }
  const auto pos = std::find(order.begin(), order.end(), dim) - order.begin();
  outer = inner = 1;
  for (int64_t i = 0; i < int64_t(order.size()); ++i) {
    if (i < pos) outer *= x.size(order[i]);
    if (i > pos) inner *= x.size(order[i]);
  }
  return true;
}

inline DenseView dense_view(const at::Tensor& x, int64_t channel_dim, const char* op) {
  TORCH_CHECK(x.dim() > 0 && channel_dim >= -x.dim() && channel_dim < x.dim(), op, ": channel_dim=",
              channel_dim, " is out of range for a tensor of shape ", x.sizes());
  const int64_t dim = channel_dim < 0 ? channel_dim + x.dim() : channel_dim;
  const int64_t channels = x.size(dim);
  if (x.numel() == 0) return {x, 0, channels, 0};
  int64_t outer = 0, inner = 0;
  if (dense_shape(x, dim, outer, inner)) return {x, outer, channels, inner};
  at::Tensor copy = x.contiguous();  // the slow path: gaps or overlaps in memory
  dense_shape(copy, dim, outer, inner);
  return {copy, outer, channels, inner};
}

// The count buffers the ops add to: int64 [C], contiguous, on x's device.
inline void check_counts(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                         int64_t channels) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == channels && t.is_contiguous() &&
                  t.device() == x.device(),
              op, ": ", name, " must be a contiguous int64 tensor of shape [", channels, "] on ", x.device(),
              ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// (x, counts, nan_counts, channel_dim) checked and x's dense view.
inline DenseView counting_args(const char* op, const at::Tensor& x, const at::Tensor& counts,
                               const at::Tensor& nan_counts, int64_t channel_dim) {
  DenseView v = dense_view(x, channel_dim, op);
  check_counts(op, "counts", counts, x, v.channels);
  check_counts(op, "nan_counts", nan_counts, x, v.channels);
  return v;
}

inline std::pair<int64_t, int64_t> pair_arg(c10::IntArrayRef values, const char* name) {
  TORCH_CHECK(values.size() == 2, "easier_kernels::conv_block: ", name, " must have 2 values, got ", values);
  return {values[0], values[1]};
}

}  // namespace ek
