// A tiny SIMT emulator for running counting_cuda.cuh's kernels on the CPU: every CUDA thread is a
// ucontext fiber; warp intrinsics and __syncthreads are rendezvous points checked for convergence
// (all 32 lanes at the same intrinsic on the same source line, full mask). Memory accesses go
// through ek_sim_load / ek_sim_store, which check bounds and natural alignment against registered
// regions and count per-element reads / writes. Force-included before the header.
#pragma once
#define EK_COUNT_SIM 1
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <unordered_map>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim

namespace sim {

enum Op { kRun, kShflIdx, kShflUp, kShflDown, kShflXor, kRedux, kAny, kSync, kDone };

struct Lane {
  ucontext_t ctx;
  std::vector<char> stack;
  Op op = kRun;
  int line = 0;
  uint64_t val = 0, res = 0;
  int arg = 0;
  unsigned mask = 0;
  uint3 tid;
};

inline std::vector<Lane> lanes;
inline ucontext_t sched_ctx;
inline int cur = 0;
inline dim3 bdim, gdim;
inline uint3 bidx;
inline std::vector<uint32_t> smem;
inline std::function<void()> body;
inline long long warp_ops = 0, syncs = 0;

[[noreturn]] inline void fail(const char* what, int line) {
  fprintf(stderr, "SIM FAILURE: %s (line %d) block (%u,%u) thread %d\n", what, line, bidx.x, bidx.y, cur);
  abort();
}

inline void trampoline() {
  body();
  lanes[cur].op = kDone;
  swapcontext(&lanes[cur].ctx, &sched_ctx);
}

inline uint64_t rendezvous(Op op, int line, uint64_t v, int arg, unsigned mask) {
  Lane& L = lanes[cur];
  L.op = op, L.line = line, L.val = v, L.arg = arg, L.mask = mask;
  swapcontext(&L.ctx, &sched_ctx);
  return lanes[cur].res;
}

// Runs one block of the current grid: body() in every thread.
inline void run_block(uint3 block, size_t smem_words) {
  bidx = block;
  const int n = int(bdim.x * bdim.y * bdim.z);
  if (n % 32 != 0) fail("block size not a multiple of 32", 0);
  if (int(lanes.size()) != n) {
    lanes.clear();
    lanes.resize(n);
  }
  smem.assign(smem_words + 64, 0xDEADBEEFu);  // garbage, as on the GPU; 64 guard words after
  for (int i = 0; i < n; ++i) {
    Lane& L = lanes[i];
    L.op = kRun;
    if (L.stack.empty()) L.stack.resize(128 * 1024);
    L.tid = make_uint3(i % bdim.x, (i / bdim.x) % bdim.y, i / (bdim.x * bdim.y));
    getcontext(&L.ctx);
    L.ctx.uc_stack.ss_sp = L.stack.data();
    L.ctx.uc_stack.ss_size = L.stack.size();
    L.ctx.uc_link = nullptr;
    makecontext(&L.ctx, trampoline, 0);
  }
  for (;;) {
    for (int i = 0; i < n; ++i) {
      if (lanes[i].op != kRun) continue;
      cur = i;
      swapcontext(&sched_ctx, &lanes[i].ctx);
    }
    bool all_done = true, progressed = false;
    for (int i = 0; i < n; ++i) all_done &= lanes[i].op == kDone;
    if (all_done) {
      for (size_t i = smem_words; i < smem.size(); ++i)
        if (smem[i] != 0xDEADBEEFu) fail("write past the shared memory size", 0);
      return;
    }
    for (int w = 0; w < n / 32; ++w) {
      Lane* W = &lanes[w * 32];
      int at_warp_op = 0;
      for (int l = 0; l < 32; ++l) at_warp_op += W[l].op >= kShflIdx && W[l].op <= kAny;
      if (at_warp_op == 0) continue;
      if (at_warp_op != 32) cur = w * 32, fail("warp op with part of the warp elsewhere (divergence)", W[0].line);
      for (int l = 1; l < 32; ++l)
        if (W[l].op != W[0].op || W[l].line != W[0].line) cur = w * 32 + l, fail("lanes at different warp ops", W[l].line);
      for (int l = 0; l < 32; ++l)
        if (W[l].mask != 0xffffffffu) cur = w * 32 + l, fail("partial mask", W[l].line);
      const Op op = W[0].op;
      if (op == kShflUp || op == kShflDown || op == kShflXor)
        for (int l = 1; l < 32; ++l)
          if (W[l].arg != W[0].arg) fail("non-uniform shuffle delta", W[l].line);
      uint64_t sum = 0, any = 0;
      for (int l = 0; l < 32; ++l) sum += uint32_t(W[l].val), any |= W[l].val != 0;
      for (int l = 0; l < 32; ++l) {
        const int a = W[l].arg;
        switch (op) {
          case kShflIdx: W[l].res = W[a & 31].val; break;
          case kShflUp: W[l].res = l >= a ? W[l - a].val : W[l].val; break;
          case kShflDown: W[l].res = l + a < 32 ? W[l + a].val : W[l].val; break;
          case kShflXor: W[l].res = W[(l ^ a) & 31].val; break;
          case kRedux: W[l].res = uint32_t(sum); break;
          case kAny: W[l].res = any; break;
          default: break;
        }
      }
      for (int l = 0; l < 32; ++l) W[l].op = kRun;
      ++warp_ops;
      progressed = true;
    }
    if (progressed) continue;
    int at_sync = 0, done = 0, line = -1;
    for (int i = 0; i < n; ++i) {
      if (lanes[i].op == kSync) {
        if (line >= 0 && lanes[i].line != line) cur = i, fail("threads at different __syncthreads", lanes[i].line);
        line = lanes[i].line;
        ++at_sync;
      }
      done += lanes[i].op == kDone;
    }
    if (at_sync == 0) fail("deadlock", 0);
    if (done != 0) fail("__syncthreads with exited threads", line);
    for (int i = 0; i < n; ++i) lanes[i].op = kRun;
    ++syncs;
  }
}

template <typename V>
inline uint64_t pack(V v) {
  static_assert(sizeof(V) <= 8, "");
  uint64_t u = 0;
  memcpy(&u, &v, sizeof(V));
  return u;
}
template <typename V>
inline V unpack(uint64_t u) {
  V v;
  memcpy(&v, &u, sizeof(V));
  return v;
}
template <typename V>
inline V shfl(Op op, int line, unsigned mask, V v, int arg, int width) {
  if (width != 32) fail("width != 32 not emulated", line);
  return unpack<V>(rendezvous(op, line, pack(v), arg, mask));
}

// ---- memory regions ----
struct Region {
  uintptr_t base = 0;
  size_t elems = 0, esize = 0;
  bool writable = false;
  uint8_t* data = nullptr;                         // real bytes of element 0, or null (virtual)
  std::function<uint64_t(int64_t)> gen;            // virtual: element bits
  std::function<void(int64_t, uint64_t)> on_write; // virtual y
  std::vector<uint32_t> touches;                   // real: per element
  std::unordered_map<int64_t, uint32_t> vtouches;  // virtual
};
inline std::vector<Region*> regions;

inline Region* find(const void* p, size_t bytes, int64_t& first) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (Region* r : regions) {
    if (a >= r->base && a + bytes <= r->base + r->elems * r->esize) {
      if ((a - r->base) % r->esize != 0) fail("access not at an element boundary", 0);
      first = int64_t((a - r->base) / r->esize);
      return r;
    }
  }
  fail("access outside every region", 0);
}
inline void touch(Region* r, int64_t first, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    if (r->data) ++r->touches[first + i];
    else ++r->vtouches[first + i];
  }
}

}  // namespace sim

template <typename W>
inline W ek_sim_load(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % sizeof(W) != 0) sim::fail("misaligned load", int(sizeof(W)));
  int64_t first;
  sim::Region* r = sim::find(p, sizeof(W), first);
  const size_t count = sizeof(W) / r->esize;
  if (count * r->esize != sizeof(W)) sim::fail("load size not a whole number of elements", 0);
  sim::touch(r, first, count);
  W out;
  if (r->data) {
    memcpy(&out, r->data + first * r->esize, sizeof(W));
  } else {
    unsigned char buf[16];
    for (size_t i = 0; i < count; ++i) {
      const uint64_t bits = r->gen(first + int64_t(i));
      memcpy(buf + i * r->esize, &bits, r->esize);
    }
    memcpy(&out, buf, sizeof(W));
  }
  return out;
}
template <typename W>
inline void ek_sim_store(void* p, W v) {
  if (reinterpret_cast<uintptr_t>(p) % sizeof(W) != 0) sim::fail("misaligned store", int(sizeof(W)));
  int64_t first;
  sim::Region* r = sim::find(p, sizeof(W), first);
  if (!r->writable) sim::fail("store to a read-only region", 0);
  const size_t count = sizeof(W) / r->esize;
  sim::touch(r, first, count);
  if (r->data) {
    memcpy(r->data + first * r->esize, &v, sizeof(W));
  } else {
    unsigned char buf[16];
    memcpy(buf, &v, sizeof(W));
    for (size_t i = 0; i < count; ++i) {
      uint64_t bits = 0;
      memcpy(&bits, buf + i * r->esize, r->esize);
      r->on_write(first + int64_t(i), bits);
    }
  }
}

#define threadIdx (sim::lanes[sim::cur].tid)
#define blockIdx (sim::bidx)
#define blockDim (sim::bdim)
#define gridDim (sim::gdim)
#define __shfl_sync(m, v, s) sim::shfl(sim::kShflIdx, __LINE__, (m), (v), (s), 32)
#define __shfl_up_sync(m, v, d) sim::shfl(sim::kShflUp, __LINE__, (m), (v), (d), 32)
#define __shfl_down_sync(m, v, d) sim::shfl(sim::kShflDown, __LINE__, (m), (v), (d), 32)
#define __shfl_xor_sync(m, v, d) sim::shfl(sim::kShflXor, __LINE__, (m), (v), (d), 32)
#define __reduce_add_sync(m, v) uint32_t(sim::rendezvous(sim::kRedux, __LINE__, uint32_t(v), 0, (m)))
#define __any_sync(m, pred) (sim::rendezvous(sim::kAny, __LINE__, (pred) ? 1 : 0, 0, (m)) != 0)
#define __syncthreads() (void)sim::rendezvous(sim::kSync, __LINE__, 0, 0, 0xffffffffu)

inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
namespace sim {
inline std::vector<std::pair<uintptr_t, size_t>> count_arrays;  // (base, entries) of int64 counts
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  bool ok = false;
  for (auto& a : sim::count_arrays)
    ok |= reinterpret_cast<uintptr_t>(p) >= a.first && reinterpret_cast<uintptr_t>(p) < a.first + 8 * a.second &&
          (reinterpret_cast<uintptr_t>(p) - a.first) % 8 == 0;
  if (!ok) sim::fail("global atomic outside the count arrays", 0);
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}

namespace ek {
namespace cnt {
inline uint32_t* shared_counters() { return sim::smem.data(); }
}  // namespace cnt
}  // namespace ek
