// The ops' schemas. Kernels are registered per backend beside them (TORCH_LIBRARY_IMPL in
// *_cpu.cpp and cuda/*), fake kernels and autograd in Python (easier_kernels/ops/library.py).
// Defined here, in C++, so an exported program or AOTInductor calls the kernels without Python.
#include <torch/library.h>

TORCH_LIBRARY(easier_kernels, m) {
  m.set_python_module("easier_kernels.ops.library");  // where the fake kernels are registered
  // counts[c] += #{x >= 0}, nan_counts[c] += #{NaN} over channel c of x (dim channel_dim).
  m.def("count_on(Tensor x, Tensor(a!) counts, Tensor(b!) nan_counts, int channel_dim) -> ()");
  // The same counts, and returns activation(x) laid out like x; param: leaky_relu's slope, elu's alpha.
  m.def(
      "act_count(Tensor x, Tensor(a!) counts, Tensor(b!) nan_counts, str kind, int channel_dim, float param) "
      "-> Tensor");
  // act(conv2(conv1(x) + b1) + b2 + residual); kernel layouts pointwise [O, I], depthwise [C, kh, kw].
  m.def(
      "conv_block(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? residual, str pattern, "
      "int[] stride, int[] padding, str kind, float param) -> Tensor");
}
