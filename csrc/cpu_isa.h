// Which instruction set the CPU counting kernels (counting_cpu.h) run: each is compiled for
// every ISA below and picked at run time, so one binary runs everywhere at full width, and a
// test can force each ISA the CPU has and compare its counts bit for bit.
#pragma once
#include <string>
#include <vector>

// Per-ISA code needs GCC/clang target attributes and __builtin_cpu_supports (x86-64 only).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EK_X86_ISAS 1
// Not "fma" for AVX2: contracting a * b + c would change rounding against PyTorch.
#define EK_TARGET_AVX2 __attribute__((target("avx2")))
#if defined(__clang__)
#define EK_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#else  // GCC otherwise keeps some loops at 256 bits
#define EK_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,prefer-vector-width=512")))
#endif
#else
#define EK_X86_ISAS 0
#endif

namespace ek {

// default: the x86-64 baseline (SSE2) or the build's own target elsewhere; avx512: F, BW, DQ, VL.
enum class CpuIsa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The ISA the kernels use now: set_cpu_isa's, else EASIER_KERNELS_CPU_ISA's (read once), else the
// best this CPU has. Throws (one line) when the environment names an unknown or missing ISA.
CpuIsa cpu_isa();
std::string cpu_isa_name();

// Forces an ISA by name ("default", "avx2", "avx512"); "" goes back to the environment's or the
// best. Throws (one line) for a name this CPU cannot run.
void set_cpu_isa(const std::string& name);

// The ISAs this CPU can run, baseline first.
std::vector<std::string> cpu_isas();

}  // namespace ek
