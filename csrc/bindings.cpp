// The Python module `easier_kernels._C`. Importing it loads this library, whose static
// registrations (library.cpp, TORCH_LIBRARY_IMPL beside each kernel) define the
// easier_kernels::* ops; the module itself only says what was built.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "easier_kernels native kernels (C++ CPU, and CUDA where built), registered as torch.ops.easier_kernels";
#ifdef EK_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
