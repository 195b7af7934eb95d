// The Python module `easier_kernels._C`. Importing it loads this library, whose static
// registrations (library.cpp, TORCH_LIBRARY_IMPL beside each kernel) define the
// easier_kernels::* ops. The module adds eager entries to the counting ops: the same dispatcher
// call, without the ~2-3 us per call of Python's torch.ops argument parsing (the meter calls
// them once per activation call); and the CPU counting kernels' ISA switch (cpu_isa.h).
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include "cpu_isa.h"

namespace {

void count_on(const at::Tensor& x, at::Tensor& counts, at::Tensor& nan_counts, int64_t channel_dim) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("easier_kernels::count_on", "")
                             .typed<void(const at::Tensor&, at::Tensor&, at::Tensor&, int64_t)>();
  op.call(x, counts, nan_counts, channel_dim);
}

at::Tensor act_count(const at::Tensor& x, at::Tensor& counts, at::Tensor& nan_counts, c10::string_view kind,
                     int64_t channel_dim, double param) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("easier_kernels::act_count", "")
          .typed<at::Tensor(const at::Tensor&, at::Tensor&, at::Tensor&, c10::string_view, int64_t, double)>();
  return op.call(x, counts, nan_counts, kind, channel_dim, param);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "easier_kernels native kernels (C++ CPU, and CUDA where built), registered as torch.ops.easier_kernels";
#ifdef EK_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  m.def("count_on", &count_on, "easier_kernels::count_on through the dispatcher");
  m.def("act_count", &act_count, "easier_kernels::act_count through the dispatcher");
  // ops.cpu_isas / ops.cpu_isa / ops.use_cpu_isa (easier_kernels/ops/backends.py) wrap these.
  m.def("cpu_isas", &ek::cpu_isas, "the ISAs this CPU can run the counting kernels with, baseline first");
  m.def("cpu_isa", &ek::cpu_isa_name, "the ISA the CPU counting kernels use now");
  m.def("set_cpu_isa", &ek::set_cpu_isa, "force an ISA by name; '' goes back to EASIER_KERNELS_CPU_ISA or the best");
}
