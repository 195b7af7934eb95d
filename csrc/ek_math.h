// Shared by the C++ (CPU) and CUDA kernels: what "on" means and the activation math.
// Plain C++ with no torch headers, so the .cu files compile alone with nvcc.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define EK_HD __host__ __device__ __forceinline__
#else
#define EK_HD inline
#endif

namespace ek {

// "On" is x >= 0, decided on the raw IEEE bits so every backend and dtype agrees bit for bit:
// +0, -0, positive finite and +inf are on; NaN (either sign) is neither: it is counted apart.
// For float and double this is exactly `x >= 0` and `x != x`; the bit form serves 16-bit types.
struct F16Bits { using U = uint16_t; static constexpr U inf = 0x7C00u, sign = 0x8000u; };
struct BF16Bits { using U = uint16_t; static constexpr U inf = 0x7F80u, sign = 0x8000u; };

template <typename B>
EK_HD bool bits_on(typename B::U u) {
  return u <= B::inf || u == B::sign;
}
template <typename B>
EK_HD bool bits_nan(typename B::U u) {
  return static_cast<typename B::U>(u & static_cast<typename B::U>(~B::sign)) > B::inf;
}
// Not finite: +-inf or NaN.
template <typename B>
EK_HD bool bits_special(typename B::U u) {
  return static_cast<typename B::U>(u & static_cast<typename B::U>(~B::sign)) >= B::inf;
}

// Transcendentals by precision: the float overloads keep float math float on host and device.
EK_HD float ek_erf(float x) { return erff(x); }
EK_HD double ek_erf(double x) { return ::erf(x); }
EK_HD float ek_tanh(float x) { return tanhf(x); }
EK_HD double ek_tanh(double x) { return ::tanh(x); }
EK_HD float ek_exp(float x) { return expf(x); }
EK_HD double ek_exp(double x) { return ::exp(x); }
EK_HD float ek_expm1(float x) { return expm1f(x); }
EK_HD double ek_expm1(double x) { return ::expm1(x); }

// Activation kinds; the numbering is shared with easier_kernels/ops/kinds.py.
enum Kind : int {
  kIdentity = 0,
  kRelu = 1,
  kRelu6 = 2,
  kLeakyRelu = 3,
  kGelu = 4,
  kGeluTanh = 5,
  kSilu = 6,
  kHardswish = 7,
  kElu = 8,
};

// Every Kind once, for switches that turn a run-time kind into a template argument:
// `switch (kind) { EK_FOR_EACH_KIND(CASE) }` with CASE(K) expanding to `case K: ...`.
#define EK_FOR_EACH_KIND(X) \
  X(kIdentity) X(kRelu) X(kRelu6) X(kLeakyRelu) X(kGelu) X(kGeluTanh) X(kSilu) X(kHardswish) X(kElu)

// The activation every native kernel computes: PyTorch's formula for finite inputs, and the
// special-value rule (README, "Special values") written into it, because torch and the math
// libraries disagree at the infinities across CPUs and dtypes (torch's float32 gelu(+inf) is
// NaN on AVX-512 machines): at +-inf an activation gives its limit, a zero limit with the sign
// its formula gives to large finite inputs (+0 for relu and relu6, -0 for the rest); NaN stays
// NaN. relu, relu6 and elu meet the rule as written (NaN fails every comparison; expm1(-inf)
// is -1), leaky_relu and hardswish are written so that they do, gelu and silu select their
// limits where the formula would compute inf * 0 or inf / inf. The relu family and hardswish
// run in the CPU's counting loop: their forms are ones GCC vectorizes (-fopt-info-vec says
// which). `param` is leaky_relu's negative_slope or elu's alpha.
template <int KIND, typename T>
EK_HD T activation(T x, T param) {
  constexpr T inf = T(INFINITY);
  if constexpr (KIND == kIdentity) {
    return x;
  } else if constexpr (KIND == kRelu) {
    return x < T(0) ? T(0) : x;
  } else if constexpr (KIND == kRelu6) {
    return x < T(0) ? T(0) : (x > T(6) ? T(6) : x);
  } else if constexpr (KIND == kLeakyRelu) {
    // x * slope is NaN only for x = NaN, or at -inf with a slope of 0 (whose limit is -0).
    const T scaled = x * param;
    const T negative = scaled != scaled ? T(-0.0) : scaled;
    return x > T(0) ? x : (x != x ? x : negative);
  } else if constexpr (KIND == kGelu) {
    const T y = T(0.5) * x * (T(1) + ek_erf(x * T(0.70710678118654752440)));
    return x == inf ? x : (x == -inf ? T(-0.0) : y);
  } else if constexpr (KIND == kGeluTanh) {
    const T inner = T(0.79788456080286535588) * (x + T(0.044715) * x * x * x);
    const T y = T(0.5) * x * (T(1) + ek_tanh(inner));
    return x == inf ? x : (x == -inf ? T(-0.0) : y);
  } else if constexpr (KIND == kSilu) {
    return x == -inf ? T(-0.0) : x / (T(1) + ek_exp(-x));
  } else if constexpr (KIND == kHardswish) {
    const T shifted = x + T(3);
    const T clamped = shifted < T(0) ? T(0) : (shifted > T(6) ? T(6) : shifted);
    const T low = x < T(-3) ? T(-3) : x;  // where clamped is 0: -3 * 0 = -0, at -inf too
    return low * clamped / T(6);
  } else {  // kElu: x itself at +-0 and NaN, as torch's CPU kernel (its CUDA one gives alpha * +-0)
    return x < T(0) ? param * ek_expm1(x) : x;
  }
}

}  // namespace ek
