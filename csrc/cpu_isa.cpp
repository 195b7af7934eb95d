// The CPU counting kernels' ISA choice (cpu_isa.h). Python reaches it through easier_kernels._C
// (ops.cpu_isas, ops.use_cpu_isa); exported programs and AOTInductor read the environment.
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace ek {

namespace {

constexpr const char* kNames[] = {"default", "avx2", "avx512"};
constexpr const char* kEnvVar = "EASIER_KERNELS_CPU_ISA";

bool supported(CpuIsa isa) {
#if EK_X86_ISAS
  switch (isa) {
    case CpuIsa::kAvx2: return __builtin_cpu_supports("avx2");
    case CpuIsa::kAvx512:  // also checks that the OS saves the zmm registers
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    default: return true;
  }
#else
  return isa == CpuIsa::kDefault;
#endif
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& name : names) out += (out.empty() ? "" : ", ") + name;
  return out;
}

CpuIsa parse(const std::string& name, const char* source) {
  for (int i = 0; i < 3; ++i) {
    if (name != kNames[i]) continue;
    TORCH_CHECK(supported(CpuIsa(i)), "easier_kernels: CPU ISA '", name, "' (", source,
                ") is not supported by this CPU; it supports: ", joined(cpu_isas()));
    return CpuIsa(i);
  }
  TORCH_CHECK(false, "easier_kernels: unknown CPU ISA '", name, "' (", source, "); use one of ",
              joined(cpu_isas()));
}

CpuIsa best() {
  return supported(CpuIsa::kAvx512) ? CpuIsa::kAvx512 : supported(CpuIsa::kAvx2) ? CpuIsa::kAvx2 : CpuIsa::kDefault;
}

// Read once; a throwing initializer is retried on the next call, so a bad value keeps failing.
CpuIsa from_environment() {
  static const CpuIsa isa = [] {
    const char* value = std::getenv(kEnvVar);
    return value != nullptr && *value != '\0' ? parse(value, kEnvVar) : best();
  }();
  return isa;
}

std::atomic<int> forced{-1};  // set_cpu_isa's choice; -1: none

}  // namespace

CpuIsa cpu_isa() {
  const int isa = forced.load(std::memory_order_relaxed);
  return isa >= 0 ? CpuIsa(isa) : from_environment();
}

std::string cpu_isa_name() { return kNames[int(cpu_isa())]; }

void set_cpu_isa(const std::string& name) {
  forced.store(name.empty() ? -1 : int(parse(name, "set_cpu_isa")), std::memory_order_relaxed);
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (int i = 0; i < 3; ++i)
    if (supported(CpuIsa(i))) names.push_back(kNames[i]);
  return names;
}

}  // namespace ek
