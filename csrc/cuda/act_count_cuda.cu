// act_count, CUDA: y = activation(x) and per-channel on/NaN counts in one pass over memory.
#include "counting_cuda.cuh"

namespace {
template <typename T>
struct ActCount {
  static cudaError_t run(const void* x, void* y, int kind, double param, int64_t outer, int64_t C,
                         int64_t inner, int64_t* counts, int64_t* nan_counts, cudaStream_t stream) {
    using namespace ek;
    switch (kind) {
#define EK_KIND_CASE(K) \
  case K: return launch<T, K, true>(x, y, param, outer, C, inner, counts, nan_counts, stream);
      EK_FOR_EACH_KIND(EK_KIND_CASE)
#undef EK_KIND_CASE
    }
    return cudaErrorInvalidValue;
  }
};
}  // namespace

extern "C" cudaError_t ek_act_count_cuda(const void* x, void* y, ek_dtype dtype, int kind, double param,
                                         int64_t outer, int64_t channels, int64_t inner, int64_t* counts,
                                         int64_t* nan_counts, cudaStream_t stream) {
  return ek::dispatch_dtype<ActCount>(dtype, x, y, kind, param, outer, channels, inner, counts,
                                      nan_counts, stream);
}
