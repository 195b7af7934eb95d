// Runs counting_cuda.cuh's kernels (the real source) in the SIMT emulator of sim_cuda.h and checks
// counts, the element-visit pattern and y against a plain per-element reference.
#include <cassert>
#include <random>
#include <string>

#include "cuda/counting_cuda.cuh"

using namespace ek::cnt;
using ek::F16Bits;
using ek::BF16Bits;

static int failures = 0;
#define CHECK(cond, ...)                                            \
  do {                                                              \
    if (!(cond)) {                                                  \
      ++failures;                                                   \
      fprintf(stderr, "CHECK FAILED %s:%d: %s | ", __FILE__, __LINE__, #cond); \
      fprintf(stderr, __VA_ARGS__);                                 \
      fprintf(stderr, "\n");                                        \
      if (failures > 20) abort();                                   \
    }                                                               \
  } while (0)

template <typename T> const char* tname();
template <> const char* tname<float>() { return "f32"; }
template <> const char* tname<double>() { return "f64"; }
template <> const char* tname<__half>() { return "f16"; }
template <> const char* tname<__nv_bfloat16>() { return "bf16"; }

static uint64_t mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Element bits: specials, arbitrary bit patterns (NaN payloads, subnormals, both signs), normals.
template <typename T>
uint64_t gen_bits(uint64_t seed, int64_t i) {
  const uint64_t r = mix(seed * 0x1234567ull + uint64_t(i));
  const int kind = int(r % 10);
  const uint64_t rnd = mix(r);
  if constexpr (sizeof(T) == 2) {
    const uint16_t inf = std::is_same<T, __half>::value ? 0x7C00 : 0x7F80;
    const uint16_t specials[] = {0x0000, 0x8000, inf, uint16_t(inf | 0x8000), uint16_t(inf + 1),
                                 uint16_t(inf + 1 + 0x8000), 0x7FFF, 0xFFFF, 0x0001, 0x8001, uint16_t(inf - 1),
                                 uint16_t((inf - 1) | 0x8000)};
    if (kind < 2) return specials[rnd % 12];
    if (kind < 5) return uint16_t(rnd);
    T v = std::is_same<T, __half>::value ? T(__float2half_rn(float(int64_t(rnd % 2001) - 1000) / 37.f))
                                         : T(__float2bfloat16_rn(float(int64_t(rnd % 2001) - 1000) / 37.f));
    uint16_t u;
    memcpy(&u, &v, 2);
    return u;
  } else if constexpr (sizeof(T) == 4) {
    const uint32_t specials[] = {0x00000000u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7FC00000u, 0xFFC00000u,
                                 0x7F800001u, 0x00000001u, 0x80000001u, 0x807FFFFFu, 0x7F7FFFFFu, 0xFF7FFFFFu};
    if (kind < 2) return specials[rnd % 12];
    if (kind < 4) return uint32_t(rnd);
    const float f = float(int64_t(rnd % 2001) - 1000) / 37.f;
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
  } else {
    const uint64_t specials[] = {0, 0x8000000000000000ull, 0x7FF0000000000000ull, 0xFFF0000000000000ull,
                                 0x7FF8000000000000ull, 0xFFF8000000000001ull, 1, 0x8000000000000001ull,
                                 0x7FEFFFFFFFFFFFFFull, 0x800FFFFFFFFFFFFFull};
    if (kind < 2) return specials[rnd % 10];
    if (kind < 4) return rnd;
    const double f = double(int64_t(rnd % 2001) - 1000) / 37.0;
    uint64_t u;
    memcpy(&u, &f, 8);
    return u;
  }
}

// The reference: "on" is x >= 0 (float/double compare; raw-bit rule for 16-bit), NaN apart.
template <typename T>
void ref_flags(uint64_t bits, bool& on, bool& nan) {
  if constexpr (std::is_same<T, float>::value) {
    float f;
    uint32_t u = uint32_t(bits);
    memcpy(&f, &u, 4);
    on = f >= 0.f, nan = f != f;
  } else if constexpr (std::is_same<T, double>::value) {
    double f;
    memcpy(&f, &bits, 8);
    on = f >= 0.0, nan = f != f;
  } else if constexpr (std::is_same<T, __half>::value) {
    on = ek::bits_on<F16Bits>(uint16_t(bits)), nan = ek::bits_nan<F16Bits>(uint16_t(bits));
  } else {
    on = ek::bits_on<BF16Bits>(uint16_t(bits)), nan = ek::bits_nan<BF16Bits>(uint16_t(bits));
  }
}

struct Stats {
  long long rows_runs = 0, rows_v1_runs = 0, columns_runs = 0, blocks = 0;
} stats;

template <typename T, int KIND, bool WRITE>
struct SimLauncher {
  const T* x;
  T* y;
  typename ek::CudaElem<T>::compute_t param;
  int64_t* counts;
  int64_t* nan_counts;
  std::function<void(RowsPlan&)> tweak_rows;
  std::function<void(ColumnsPlan&)> tweak_cols;
  std::function<bool(uint3)> select;
  std::string ran;
  int vran = 0;
  RowsPlan rp{};
  ColumnsPlan cp{};

  template <int V>
  cudaError_t rows(RowsPlan p) {
    if (tweak_rows) tweak_rows(p);
    // Plan invariants.
    const int64_t sub = rows_sub_tile<V>();
    const int64_t positions = int64_t(p.h) + p.total;
    CHECK(p.L % sub == 0 && p.L >= sub && p.L <= kMaxChunk, "L=%lld", (long long)p.L);
    CHECK(p.chunks == ceil_div(positions, p.L), "chunks");
    CHECK(p.grid >= 1 && p.grid <= p.chunks && p.grid <= 0x7fffffff, "grid");
    CHECK(p.h < uint32_t(V), "h");
    if (p.C <= int64_t(kMaxSlots)) CHECK(p.P % p.C == 0 && p.P >= 32, "P=%u C=%lld", p.P, (long long)p.C);
    else CHECK(p.P == kMaxSlots && 2 + (p.L - 2) / p.inner <= int64_t(p.P), "P/L");
    CHECK(2 * 4 * p.P <= 48 * 1024, "shared");
    ran = "rows", vran = V, rp = p;
    (V == 1 ? stats.rows_v1_runs : stats.rows_runs)++;
    sim::bdim = dim3(kBlock, 1, 1);
    sim::gdim = dim3(unsigned(p.grid), 1, 1);
    sim::body = [&] { rows_kernel<T, KIND, WRITE, V>(x, y, p, param, counts, nan_counts); };
    for (int64_t b = 0; b < p.grid; ++b) {
      const uint3 bi = make_uint3(unsigned(b), 0, 0);
      if (!select || select(bi)) sim::run_block(bi, 2 * p.P), ++stats.blocks;
    }
    return cudaSuccess;
  }
  template <int V>
  cudaError_t columns(ColumnsPlan p) {
    if (tweak_cols) tweak_cols(p);
    CHECK(p.W % p.C == 0 && p.W % V == 0 && p.cvw == p.W / V, "W");
    CHECK(p.rows == ceil_div(int64_t(p.h) + p.total, p.W), "rows");
    CHECK(p.grid_x * 32 >= p.cvw && p.grid_x <= 0x7fffffff && p.grid_y >= 1 && p.grid_y <= 65535, "grid");
    CHECK(ceil_div(p.rows, p.grid_y * kWarps) < 65536, "rows per thread");
    CHECK(p.nslots == std::min<int64_t>(p.C, 32 * V) && (p.group & (p.group - 1)) == 0 && p.group <= 32 &&
              p.nslots * p.group <= uint32_t(kBlock),
          "slots");
    CHECK(p.h < uint32_t(V), "h");
    if (p.C % 1 == 0 && (p.cvw % 32) != 0) CHECK(p.cvw >= 1024 || p.W / V == p.cvw, "cvw");
    ran = "columns", vran = V, cp = p;
    stats.columns_runs++;
    sim::bdim = dim3(32, kWarps, 1);
    sim::gdim = dim3(unsigned(p.grid_x), unsigned(p.grid_y), 1);
    sim::body = [&] { columns_kernel<T, KIND, WRITE, V>(x, y, p, param, counts, nan_counts); };
    for (int64_t by = 0; by < p.grid_y; ++by)
      for (int64_t bx = 0; bx < p.grid_x; ++bx) {
        const uint3 bi = make_uint3(unsigned(bx), unsigned(by), 0);
        if (!select || select(bi)) sim::run_block(bi, 2 * kBlock * V), ++stats.blocks;
      }
    return cudaSuccess;
  }
};

static uint8_t* align16(std::vector<uint8_t>& v) {
  return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(v.data()) + 15) & ~uintptr_t(15));
}

struct Case {
  int64_t outer, C, inner;
};

// A full run on real memory: every block of the grid.
template <typename T, int KIND, bool WRITE>
void run_real(Case cs, int hx, int hy, int64_t target_blocks, uint64_t seed,
              std::function<void(RowsPlan&)> tweak_rows = {}, std::function<void(ColumnsPlan&)> tweak_cols = {}) {
  const int64_t total = cs.outer * cs.C * cs.inner;
  const size_t es = sizeof(T);
  std::vector<uint8_t> xs(total * es + 64), ys(total * es + 64);
  uint8_t* xb = align16(xs) + hx * es;
  uint8_t* yb = align16(ys) + hy * es;
  for (int64_t i = 0; i < total; ++i) {
    const uint64_t b = gen_bits<T>(seed, i);
    memcpy(xb + i * es, &b, es);
  }
  sim::Region rx, ry;
  rx.base = reinterpret_cast<uintptr_t>(xb), rx.elems = total, rx.esize = es, rx.data = xb;
  rx.touches.assign(total, 0);
  ry.base = reinterpret_cast<uintptr_t>(yb), ry.elems = total, ry.esize = es, ry.data = yb, ry.writable = true;
  ry.touches.assign(total, 0);
  sim::regions = {&rx};
  if (WRITE) sim::regions.push_back(&ry);
  std::vector<int64_t> counts(cs.C), nans(cs.C), want(cs.C), want_nan(cs.C);
  std::mt19937_64 rng(seed);
  for (int64_t c = 0; c < cs.C; ++c) counts[c] = want[c] = int64_t(rng() % 1000), nans[c] = want_nan[c] = int64_t(rng() % 7);
  sim::count_arrays = {{reinterpret_cast<uintptr_t>(counts.data()), size_t(cs.C)},
                       {reinterpret_cast<uintptr_t>(nans.data()), size_t(cs.C)}};
  for (int64_t i = 0; i < total; ++i) {
    uint64_t b = 0;
    memcpy(&b, xb + i * es, es);
    bool on, nan;
    ref_flags<T>(b, on, nan);
    const int64_t c = (i / cs.inner) % cs.C;
    want[c] += on, want_nan[c] += nan;
  }
  using CT = typename ek::CudaElem<T>::compute_t;
  const CT param = CT(0.3);
  SimLauncher<T, KIND, WRITE> L{reinterpret_cast<const T*>(xb), WRITE ? reinterpret_cast<T*>(yb) : nullptr, param,
                                counts.data(), nans.data()};
  L.tweak_rows = tweak_rows, L.tweak_cols = tweak_cols;
  // target_blocks encodes a device: SMs = target_blocks / 4 (at least 1), shared 228 KB (or 40 KB when odd).
  const DeviceInfo dev{std::max<int64_t>(1, target_blocks / 4), target_blocks % 2 ? 40 * 1024 : 228 * 1024};
  const cudaError_t err = plan_and_launch<T, WRITE>(xb, WRITE ? yb : nullptr, cs.outer, cs.C, cs.inner, dev, L);
  char tag[256];
  snprintf(tag, sizeof tag, "%s kind=%d write=%d [%lld,%lld,%lld] hx=%d hy=%d blocks=%lld -> %s V=%d", tname<T>(), KIND,
           int(WRITE), (long long)cs.outer, (long long)cs.C, (long long)cs.inner, hx, hy, (long long)target_blocks,
           L.ran.c_str(), L.vran);
  CHECK(err == cudaSuccess, "%s: error %d", tag, int(err));
  if (total == 0) {
    CHECK(L.ran.empty(), "%s: ran on an empty tensor", tag);
    return;
  }
  // The kernel that should have run.
  const constexpr int V = 16 / int(sizeof(T));
  const bool phase_ok = !WRITE || (hx - hy) * int(es) % 16 == 0;
  if (WRITE) CHECK((L.ran == "rows" ? L.rp.y_vec : L.cp.y_vec) == phase_ok, "%s: y_vec", tag);
  if (cs.inner == 1) CHECK(L.ran == "columns" && L.vran == V, "%s: expected columns", tag);
  else CHECK(L.ran == "rows" && L.vran == V, "%s: expected rows", tag);
  int bad = 0;
  for (int64_t c = 0; c < cs.C && bad < 5; ++c) {
    if (counts[c] != want[c] || nans[c] != want_nan[c]) {
      ++bad;
      CHECK(false, "%s: channel %lld on %lld want %lld, nan %lld want %lld", tag, (long long)c, (long long)counts[c],
            (long long)want[c], (long long)nans[c], (long long)want_nan[c]);
    }
  }
  for (int64_t i = 0; i < total; ++i) {
    if (rx.touches[i] != 1) {
      CHECK(false, "%s: x[%lld] read %u times", tag, (long long)i, rx.touches[i]);
      break;
    }
  }
  if (WRITE) {
    for (int64_t i = 0; i < total; ++i) {
      uint64_t b = 0, got = 0;
      memcpy(&b, xb + i * es, es);
      memcpy(&got, yb + i * es, es);
      const uint64_t want_y = uint64_t(activate_bits<KIND, T>(typename Bits<T>::U(b), param));
      if (ry.touches[i] != 1 || got != want_y) {
        CHECK(false, "%s: y[%lld] written %u times, %llx want %llx", tag, (long long)i, ry.touches[i],
              (unsigned long long)got, (unsigned long long)want_y);
        break;
      }
    }
  }
}

// ---- huge tensors: virtual memory, only some blocks simulated ----

// x generated on read and y checked on write at addresses past 2^44, the counts, the launcher,
// and the per-element bookkeeping both layouts share. Lambdas capture `this`: not copyable.
template <typename T, bool WRITE>
struct HugeRun {
  static constexpr int KIND = ek::kRelu;
  static constexpr int V = 16 / int(sizeof(T));
  using CT = typename ek::CudaElem<T>::compute_t;
  Case cs;
  uint64_t seed;
  int64_t total, h = 0, ybad = 0, expect_elems = 0;
  uintptr_t xbase, ybase;
  sim::Region rx, ry;
  std::vector<int64_t> counts, nans, want, want_nan;
  SimLauncher<T, KIND, WRITE> Lc;

  HugeRun(Case cs_, int hx, uint64_t seed_)
      : cs(cs_), seed(seed_), total(cs_.outer * cs_.C * cs_.inner),
        xbase((uintptr_t(1) << 44) + hx * sizeof(T)), ybase((uintptr_t(1) << 45) + hx * sizeof(T)),
        counts(cs_.C), nans(cs_.C), want(cs_.C), want_nan(cs_.C),
        Lc{reinterpret_cast<const T*>(xbase), WRITE ? reinterpret_cast<T*>(ybase) : nullptr, CT(0), counts.data(),
           nans.data()} {
    rx.base = xbase, rx.elems = total, rx.esize = sizeof(T), rx.gen = [this](int64_t i) { return gen_bits<T>(seed, i); };
    ry.base = ybase, ry.elems = total, ry.esize = sizeof(T), ry.writable = true;
    ry.on_write = [this](int64_t i, uint64_t got) {
      if (got != uint64_t(activate_bits<KIND, T>(typename Bits<T>::U(gen_bits<T>(seed, i)), CT(0)))) ++ybad;
    };
    sim::regions = {&rx, &ry};
    sim::count_arrays = {{reinterpret_cast<uintptr_t>(counts.data()), size_t(cs.C)},
                         {reinterpret_cast<uintptr_t>(nans.data()), size_t(cs.C)}};
  }
  HugeRun(const HugeRun&) = delete;

  cudaError_t launch() {
    return plan_and_launch<T, WRITE>(reinterpret_cast<const void*>(xbase), reinterpret_cast<void*>(ybase), cs.outer,
                                     cs.C, cs.inner, DeviceInfo{132, 228 * 1024}, Lc);
  }
  // Outside whole aligned vectors (block 0 counts those one by one).
  bool is_edge(int64_t i) const {
    const int64_t vs = (i + h) / V * V;
    return !(vs >= h && vs + V <= h + total);
  }
  void expect_edges() {
    for (int64_t i = 0; i < std::min<int64_t>(total, 2 * V); ++i) if (is_edge(i)) expect(i);
    for (int64_t i = std::max<int64_t>(2 * V, total - 2 * V); i < total; ++i) if (is_edge(i)) expect(i);
  }
  // Element i was simulated: its counts are expected, and it was read (and written) exactly once.
  void expect(int64_t i) {
    bool on, nan;
    ref_flags<T>(gen_bits<T>(seed, i), on, nan);
    const int64_t c = (i / cs.inner) % cs.C;
    want[c] += on, want_nan[c] += nan;
    CHECK(rx.vtouches.count(i) && rx.vtouches[i] == 1, "huge %s x[%lld] read %u times", tname<T>(), (long long)i,
          rx.vtouches.count(i) ? rx.vtouches[i] : 0);
    if (WRITE) CHECK(ry.vtouches.count(i) && ry.vtouches[i] == 1, "huge %s y[%lld]", tname<T>(), (long long)i);
    ++expect_elems;
  }
  void check_totals(const char* what) {
    CHECK(int64_t(rx.vtouches.size()) == expect_elems, "huge %s: %zu elements read, want %lld", what,
          rx.vtouches.size(), (long long)expect_elems);
    CHECK(ybad == 0, "huge %s: %lld wrong y", what, (long long)ybad);
    for (int64_t c = 0; c < cs.C; ++c)
      if (counts[c] != want[c] || nans[c] != want_nan[c]) {
        CHECK(false, "huge %s %s [%lld,%lld,%lld] ch %lld: %lld/%lld vs %lld/%lld", what, tname<T>(),
              (long long)cs.outer, (long long)cs.C, (long long)cs.inner, (long long)c, (long long)counts[c],
              (long long)nans[c], (long long)want[c], (long long)want_nan[c]);
        break;
      }
  }
};

template <typename T, bool WRITE>
void run_huge_rows(Case cs, int hx, std::vector<int64_t> probe_elements, uint64_t seed, int64_t L_override = 0) {
  HugeRun<T, WRITE> run(cs, hx, seed);
  // One chunk per block; simulate the blocks holding the probe elements.
  int64_t L = 0;
  run.Lc.tweak_rows = [&](RowsPlan& p) {
    if (L_override) p.L = L_override, p.chunks = ceil_div(int64_t(p.h) + p.total, p.L);
    p.grid = p.chunks;
    L = p.L, run.h = p.h;
  };
  std::vector<int64_t> chosen;
  run.Lc.select = [&](uint3 b) {
    if (b.x == 0) {  // block 0 also counts the elements outside whole vectors
      chosen.push_back(0);
      return true;
    }
    for (int64_t e : probe_elements)
      if ((e + run.h) / L == int64_t(b.x)) {
        chosen.push_back(b.x);
        return true;
      }
    return false;
  };
  const cudaError_t err = run.launch();
  CHECK(err == cudaSuccess && run.Lc.ran == "rows", "huge rows: err %d ran %s", int(err), run.Lc.ran.c_str());
  run.expect_edges();
  for (int64_t b : chosen) {
    const int64_t lo = std::max<int64_t>(0, b * L - run.h), hi = std::min<int64_t>(run.total, (b + 1) * L - run.h);
    for (int64_t i = lo; i < hi; ++i)
      if (!run.is_edge(i)) run.expect(i);
  }
  run.check_totals("rows");
  printf("huge rows %s [%lld,%lld,%lld] total=%lld h=%d L=%lld: %zu chunks simulated, %lld elements\n", tname<T>(),
         (long long)cs.outer, (long long)cs.C, (long long)cs.inner, (long long)run.total, hx, (long long)L,
         chosen.size(), (long long)run.expect_elems);
}

template <typename T, bool WRITE>
void run_huge_columns(Case cs, int hx, std::vector<int64_t> probe_elements, uint64_t seed) {
  HugeRun<T, WRITE> run(cs, hx, seed);
  constexpr int V = HugeRun<T, WRITE>::V;
  ColumnsPlan plan{};
  run.Lc.tweak_cols = [&](ColumnsPlan& p) {
    p.grid_y = std::min<int64_t>(65535, ceil_div(p.rows, kWarps));  // ~1 row per thread
    plan = p;
    run.h = p.h;
  };
  // Blocks (bx, by) covering the probes: position = e + h, row = pos / W, column vector = pos % W / V.
  struct BI { int64_t bx, by; };
  std::vector<BI> chosen;
  run.Lc.select = [&](uint3 b) {
    if (b.x == 0 && b.y == 0) {  // also counts the elements outside whole vectors
      chosen.push_back({0, 0});
      return true;
    }
    for (int64_t e : probe_elements) {
      const int64_t pos = e + plan.h, r = pos / plan.W, cvv = pos % plan.W / V;
      if (cvv / 32 == int64_t(b.x) && (r / kWarps) % plan.grid_y == int64_t(b.y)) {
        chosen.push_back({b.x, b.y});
        return true;
      }
    }
    return false;
  };
  const cudaError_t err = run.launch();
  CHECK(err == cudaSuccess && run.Lc.ran == "columns", "huge columns: err %d ran %s", int(err), run.Lc.ran.c_str());
  run.expect_edges();
  for (BI b : chosen) {
    for (int64_t r = b.by * kWarps; r < plan.rows; r += plan.grid_y * kWarps)
      for (int64_t rl = 0; rl < kWarps; ++rl) {
        const int64_t rr = r + rl;
        if (rr >= plan.rows || rr - r >= kWarps) continue;
        for (int64_t cvv = b.bx * 32; cvv < std::min(plan.cvw, b.bx * 32 + 32); ++cvv)
          for (int k = 0; k < V; ++k) {
            const int64_t i = rr * plan.W + cvv * V + k - plan.h;
            if (i < 0 || i >= run.total || run.is_edge(i)) continue;
            run.expect(i);
          }
      }
  }
  run.check_totals("columns");
  printf("huge columns %s [%lld,%lld,1] total=%lld h=%d W=%lld grid=(%lld,%lld): %zu blocks, %lld elements\n",
         tname<T>(), (long long)cs.outer, (long long)cs.C, (long long)run.total, hx, (long long)plan.W,
         (long long)plan.grid_x, (long long)plan.grid_y, chosen.size(), (long long)run.expect_elems);
}

// ---- unit checks ----
static void check_fastdiv() {
  std::mt19937_64 rng(7);
  std::vector<uint32_t> ds;
  for (uint32_t d = 1; d < 5000; ++d) ds.push_back(d);
  for (int s = 12; s <= 30; ++s) {
    const uint32_t b = 1u << s;
    ds.insert(ds.end(), {b - 1, b, b + 1, b + 3});
  }
  for (int i = 0; i < 2000; ++i) ds.push_back(uint32_t(rng() % (1u << 30)) + 1);
  for (uint32_t d : ds) {
    const FastDiv f = make_fastdiv(d);
    std::vector<uint32_t> ns = {0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, (1u << 30) - 1, (1u << 30), (1u << 31) - 1};
    for (int i = 0; i < 200; ++i) ns.push_back(uint32_t(rng() % (1u << 31)));
    for (int i = 0; i < 50; ++i) ns.push_back(uint32_t(rng() % 10000));
    for (uint32_t n : ns) {
      if (n >= (1u << 31)) continue;
      if (fast_div(f, n) != n / d || fast_mod(f, n) != n % d) {
        CHECK(false, "fastdiv %u / %u", n, d);
        return;
      }
    }
  }
  printf("fastdiv ok (%zu divisors)\n", ds.size());
}

template <typename T>
void check_classify16() {
  using B = typename Bits<T>::B;
  // Every value in every position of a 16-element lane.
  for (uint32_t u = 0; u < 65536; ++u) {
    for (int pos = 0; pos < 16; ++pos) {
      Raw<T, 16> r;
      uint32_t other = mix(u * 16 + pos);
      for (int k = 0; k < 16; ++k) set_elem(r, k, uint16_t(k == pos ? u : (other >> (k % 16)) * 0x9E37u));
      const uint32_t M = classify(r);
      for (int k = 0; k < 16; ++k) {
        const uint16_t e = get_elem(r, k);
        const bool on = (M >> bit_of<T>(k)) & 1, nan = (M >> (bit_of<T>(k) + 8)) & 1;
        if (on != ek::bits_on<B>(e) || nan != ek::bits_nan<B>(e)) {
          CHECK(false, "classify %s %04x at %d", tname<T>(), e, k);
          return;
        }
      }
      if (M & ~(kOnBits | kNanBits)) CHECK(false, "stray bits");
    }
  }
  printf("classify %s exhaustive ok\n", tname<T>());
}
template <typename T, int E>
void check_layout() {
  // below(k) is exactly the on bits of elements < k; valid_bits; bit_of distinct, inside kOnBits.
  uint32_t all = 0;
  for (int k = 0; k < E; ++k) {
    const int b = bit_of<T>(k);
    CHECK(((kOnBits >> b) & 1) && ((kNanBits >> (b + 8)) & 1) && !((all >> b) & 1), "bit_of %d", k);
    all |= 1u << b;
  }
  for (int k = 0; k <= E; ++k) {
    uint32_t want = 0;
    for (int j = 0; j < k; ++j) want |= 1u << bit_of<T>(j);
    CHECK(below<T>(k) == want, "below %d", k);
    for (int k0 = 0; k0 <= k; ++k0) {
      uint32_t w = 0;
      for (int j = k0; j < k; ++j) w |= (1u << bit_of<T>(j)) | (1u << (bit_of<T>(j) + 8));
      CHECK(valid_bits<T>(k0, k) == w, "valid_bits");
    }
  }
}
template <typename T, int E>
void check_classify_random() {
  std::mt19937_64 rng(11);
  for (int it = 0; it < 200000; ++it) {
    Raw<T, E> r;
    for (int i = 0; i < Raw<T, E>::kWords; ++i) r.w[i] = 0;
    for (int k = 0; k < E; ++k) set_elem(r, k, typename Bits<T>::U(gen_bits<T>(rng(), k)));
    const uint32_t M = classify(r);
    for (int k = 0; k < E; ++k) {
      bool on, nan;
      ref_flags<T>(get_elem(r, k), on, nan);
      if (on != bool((M >> bit_of<T>(k)) & 1) || nan != bool((M >> (bit_of<T>(k) + 8)) & 1)) {
        CHECK(false, "classify %s E=%d elem %d bits %llx", tname<T>(), E, k, (unsigned long long)get_elem(r, k));
        return;
      }
    }
  }
}

// local_row / sub_tile_boundary for large offsets and runs against 64-bit arithmetic.
static void check_local_math() {
  std::mt19937_64 rng(3);
  for (int it = 0; it < 2000000; ++it) {
    int64_t inner = int64_t(rng() % 4) == 0 ? int64_t(rng() % (int64_t(1) << 40)) + 1 : int64_t(rng() % 100000) + 1;
    if (it % 7 == 0) inner = (int64_t(1) << 32) + int64_t(rng() % 5);
    const int64_t L = int64_t(1) << 30;
    const int64_t off0 = int64_t(rng() % uint64_t(inner));  // chunk start's offset in its run
    const int64_t b0_64 = std::min<int64_t>(inner - off0, L);
    const uint32_t b0 = uint32_t(b0_64);
    const FastDiv f = make_fastdiv(uint32_t(std::min<int64_t>(inner, kMaxChunk)));
    const uint32_t d = uint32_t(rng() % uint64_t(L));
    const int64_t want = d < b0_64 ? 0 : 1 + (d - b0_64) / inner;
    if (local_row(d, b0, f) != uint32_t(want)) {
      CHECK(false, "local_row d=%u inner=%lld b0=%lld", d, (long long)inner, (long long)b0_64);
      return;
    }
    // boundary of a row starting inside a sub-tile of 64 V positions (V = 8 here)
    const uint32_t sub = 128;
    const uint32_t ds = d / sub * sub;
    const uint32_t ra = local_row(ds, b0, f), rb = local_row(std::min<uint32_t>(ds + sub, uint32_t(L)) - 1, b0, f);
    for (uint32_t i = 1; i < rb - ra + 1; ++i) {
      const int64_t start = b0_64 + int64_t(ra + i - 1) * inner - ds;
      const uint32_t got = sub_tile_boundary<2>(i, rb - ra + 1, ra, ds, b0, uint32_t(inner));
      if (start <= 0 || start >= sub || got != uint32_t(start)) {
        CHECK(false, "boundary inner=%lld ds=%u i=%u got %u want %lld", (long long)inner, ds, i, got, (long long)start);
        return;
      }
    }
  }
  printf("local row math ok\n");
}

template <typename T>
void real_suite(uint64_t seed) {
  constexpr int V = 16 / int(sizeof(T));
  std::mt19937_64 rng(seed);
  std::vector<Case> cases = {
      {0, 3, 5},     {2, 0, 5},      {2, 3, 0},      {1, 1, 1},      {1, 1, 7},     {3, 1, 1},    {5, 1, 2},
      {2, 3, 4},     {3, 5, 7},      {4, 6, 16},     {2, 5, 49},     {3, 4, 63},    {2, 3, 64},   {2, 3, 65},
      {1, 2, 1000},  {2, 64, 3},     {4, 32, 16},    {3, 40, 49},    {2, 33, 9},    {1, 7, 4097}, {17, 1, 1},
      {100, 3, 1},   {64, 5, 1},     {33, 8, 1},     {9, 40, 1},     {5, 256, 1},   {3, 1001, 1}, {2, 130, 1},
      {300, 7, 1},   {1, 3000, 1},   {2, 4100, 2},   {1, 5000, 3},   {2, 4097, 1},  {1, 1, 20000}, {7, 2, 777},
      {129, 1, 33},  {3, 1280, 5},   {2, 127, 1},    {40, 33, 1},    {1, 2, 65536}, {2, 4096, 3},  {1, 1, 2},
  };
  for (const Case& cs : cases) {
    const int64_t blocks[] = {1, 3, 4, 132 * 4};
    const int64_t tb = blocks[rng() % 4];
    const int hx = int(rng() % V);
    run_real<T, ek::kIdentity, false>(cs, hx, 0, tb, rng());
    const int hy_same = hx, hy_diff = (hx + 1 + int(rng() % (V > 1 ? V - 1 : 1))) % V;
    run_real<T, ek::kRelu, true>(cs, hx, hy_same, blocks[rng() % 4], rng());
    if (V > 1) run_real<T, ek::kLeakyRelu, true>(cs, hx, hy_diff, blocks[rng() % 4], rng());
  }
  // Small chunks: many chunks per block (grid-stride), runs crossing chunk boundaries.
  for (const Case& cs : std::vector<Case>{{3, 5, 49}, {5, 7, 16}, {2, 3, 1000}, {4, 40, 3}, {2, 3, 100000}, {3, 33, 7}}) {
    for (int64_t Lmul : {1, 2, 3}) {
      auto tweak = [&](RowsPlan& p) {
        p.L = Lmul * rows_sub_tile<V>();
        p.chunks = ceil_div(int64_t(p.h) + p.total, p.L);
        p.grid = std::min<int64_t>(p.chunks, 3);
      };
      run_real<T, ek::kIdentity, false>(cs, int(rng() % V), 0, 1, rng(), tweak);
    }
  }
  // Columns: several rows per thread, grid-stride over rows.
  for (const Case& cs : std::vector<Case>{{100, 3, 1}, {50, 64, 1}, {20, 300, 1}, {70, 1, 1}}) {
    for (int64_t gy : {1, 2, 5}) {
      auto tweak = [&](ColumnsPlan& p) { p.grid_y = gy; };
      const int h = int(rng() % V);
      run_real<T, ek::kRelu, true>(cs, h, h, 1, rng(), {}, tweak);
    }
  }
  printf("real suite %s done\n", tname<T>());
}

// Random shapes: inner around the sub-tile and chunk sizes, odd C, misalignment, small chunks.
template <typename T>
void random_suite(uint64_t seed, int n) {
  constexpr int V = 16 / int(sizeof(T));
  const int64_t sub = rows_sub_tile<V>();
  std::mt19937_64 rng(seed);
  for (int it = 0; it < n; ++it) {
    Case cs;
    const int pick = int(rng() % 6);
    cs.outer = 1 + int64_t(rng() % 12);
    cs.C = 1 + int64_t(rng() % (rng() % 2 ? 9 : 70));
    if (pick == 0) cs.inner = 1;
    else if (pick == 1) cs.inner = sub - 4 + int64_t(rng() % 9);           // around a sub-tile
    else if (pick == 2) cs.inner = 2 + int64_t(rng() % 40);
    else if (pick == 3) cs.inner = sub / 2 - 3 + int64_t(rng() % 7);
    else cs.inner = 1 + int64_t(rng() % 700);
    if (pick == 0) cs.outer *= 1 + int64_t(rng() % 30);
    while (cs.outer * cs.C * cs.inner > 60000) cs.outer = std::max<int64_t>(1, cs.outer / 2), cs.C = std::max<int64_t>(1, cs.C - 7);
    const int hx = int(rng() % V);
    const int64_t tb = int64_t(1 + rng() % 20);
    std::function<void(RowsPlan&)> tweak;
    const int64_t Lmul = 1 + int64_t(rng() % 5);
    if (rng() % 2) tweak = [&](RowsPlan& p) {
      p.L = Lmul * rows_sub_tile<V>() * (p.h == 0 && V == 1 ? 1 : 1);
      if (p.C > int64_t(kMaxSlots)) return;
      p.chunks = ceil_div(int64_t(p.h) + p.total, p.L);
      p.grid = std::min<int64_t>(p.chunks, 1 + int64_t(rng() % 4));
    };
    std::function<void(ColumnsPlan&)> tweak_cols;
    const int64_t gy = 1 + int64_t(rng() % 4);
    if (rng() % 2) tweak_cols = [&](ColumnsPlan& p) { p.grid_y = gy; };
    switch (rng() % 3) {
      case 0: run_real<T, ek::kIdentity, false>(cs, hx, 0, tb, rng(), tweak, tweak_cols); break;
      case 1: run_real<T, ek::kRelu, true>(cs, hx, hx, tb, rng(), tweak, tweak_cols); break;
      default: run_real<T, ek::kHardswish, true>(cs, hx, int(rng() % V), tb, rng(), tweak, tweak_cols); break;
    }
  }
  printf("random suite %s: %d cases\n", tname<T>(), n);
}

// Plan invariants (no run) over many shapes, huge ones included.
template <int V>
void plan_sweep(uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (int it = 0; it < 200000; ++it) {
    const int64_t total_max = int64_t(1) << (10 + rng() % 31);
    int64_t C = 1 + int64_t(rng() % (rng() % 3 == 0 ? 100000 : 5000));
    int64_t inner = rng() % 3 == 0 ? 1 : 1 + int64_t(rng() % (uint64_t(1) << (rng() % 34)));
    int64_t outer = std::max<int64_t>(1, total_max / std::max<int64_t>(1, C * inner));
    if (outer * C > total_max * 4 || C * inner > (int64_t(1) << 41)) continue;
    const uint32_t h = uint32_t(rng() % V);
    const int64_t tb = 1 + int64_t(rng() % 2000);
    const int64_t total = outer * C * inner;
    RowsPlan p = plan_rows<V>(total, C, inner, h, tb);
    const int64_t sub = rows_sub_tile<V>();
    CHECK(p.L % sub == 0 && p.L >= sub && p.L <= kMaxChunk && p.chunks == ceil_div(int64_t(h) + total, p.L) &&
              p.grid >= 1 && p.grid <= p.chunks && p.grid <= 0x7fffffff,
          "rows plan [%lld,%lld,%lld]", (long long)outer, (long long)C, (long long)inner);
    if (C <= int64_t(kMaxSlots)) CHECK(p.P % C == 0 && p.P >= 32 && p.P <= 2 * kMaxSlots, "P");
    else CHECK(2 + (p.L - 2) / inner <= int64_t(p.P), "rows per chunk > P: [%lld,%lld,%lld]", (long long)outer, (long long)C, (long long)inner);
    if (inner == 1) {
      ColumnsPlan c;
      if (plan_columns<V>(c, total, C, h, tb)) {
        CHECK(c.W % C == 0 && c.W % V == 0 && c.grid_x * 32 >= c.cvw && c.grid_y <= 65535 &&
                  ceil_div(c.rows, c.grid_y * kWarps) < 65536,
              "columns plan [%lld,%lld]", (long long)outer, (long long)C);
      }
    }
  }
  printf("plan sweep V=%d ok\n", V);
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  check_fastdiv();
  check_classify16<__half>();
  check_classify16<__nv_bfloat16>();
  check_layout<__half, 16>();
  check_layout<__half, 8>();
  check_layout<__half, 2>();
  check_layout<float, 8>();
  check_layout<float, 4>();
  check_layout<double, 4>();
  check_layout<double, 2>();
  check_classify_random<float, 8>();
  check_classify_random<float, 4>();
  check_classify_random<double, 4>();
  check_classify_random<double, 2>();
  check_classify_random<__half, 16>();
  check_classify_random<__nv_bfloat16, 2>();
  printf("unit checks done, failures=%d\n", failures);
  real_suite<float>(1);
  real_suite<__half>(2);
  if (!quick) {
    real_suite<double>(3);
    real_suite<__nv_bfloat16>(4);
  }
  check_local_math();
  plan_sweep<1>(1);
  plan_sweep<2>(2);
  plan_sweep<4>(3);
  plan_sweep<8>(4);
  {
    // columns: a thread with the most rows the plan allows (16-bit counters); grid_y forced to 1
    // where the plan allows it.
    ColumnsPlan c;
    CHECK(plan_columns<8>(c, int64_t(8) << 22, 8, 0, 1) && ceil_div(c.rows, c.grid_y * kWarps) < 65536, "16-bit rows");
  }
  const int nrand = quick ? 60 : 400;
  random_suite<float>(21, nrand);
  random_suite<__half>(22, nrand);
  if (!quick) {
    random_suite<double>(23, nrand);
    random_suite<__nv_bfloat16>(24, nrand);
  }
  // Tensors past 2^31 / 2^32 elements, virtual memory; the chunks / blocks around the probes.
  const int64_t G = int64_t(1) << 30;
  {
    const int64_t inner = G + 7;
    run_huge_rows<__half, true>({3, 5, inner}, 3, {2 * G - 2, 2 * G + 5, 4 * G, inner - 1, 2 * inner + 1, 15 * inner - 1}, 5,
                                rows_sub_tile<8>() * 32);
  }
  run_huge_rows<float, false>({(1 << 20) + 3, 1000, 3}, 1, {2 * G - 1, 2 * G + 700, 4 * G - 3, 3 * int64_t(((1 << 20) + 3)) * 1000 - 1}, 6,
                              rows_sub_tile<4>() * 32);
  run_huge_rows<float, true>({(1 << 20) + 3, 1000, 3}, 2, {2 * G - 1, 4 * G + 5}, 6, 0 /* default L: big chunks */ == 0 ? rows_sub_tile<4>() * 16 : 0);
  run_huge_rows<__nv_bfloat16, true>({3, 5000, (1 << 18) + 1}, 5, {2 * G + 3, 4 * G - 1, 3 * int64_t(5000) * ((1 << 18) + 1) - 2}, 7,
                                     rows_sub_tile<8>() * 16);
  {
    const int64_t inner = 4 * G + 3;  // inner mod 2^32 = 3
    run_huge_rows<double, true>({2, 3, inner}, 1, {inner - 2, inner + 1, 2 * inner, 3 * inner + 5, 6 * inner - 1}, 8,
                                rows_sub_tile<2>() * 64);
  }
  run_huge_columns<__half, true>({(1 << 18) + 5, 16384, 1}, 3, {2 * G - 5, 2 * G + 4000, 4 * G, ((1 << 18) + 5) * int64_t(16384) - 1}, 9);
  run_huge_columns<float, false>({300, (1 << 23) + 8, 1}, 1, {2 * G - 1, 2 * G + 1, 300 * int64_t((1 << 23) + 8) - 1}, 10);
  run_huge_columns<__nv_bfloat16, true>({(1 << 26) + 1, 67, 1}, 7, {2 * G - 5, 4 * G + 9, int64_t((1 << 26) + 1) * 67 - 1}, 11);
  printf("stats: rows %lld, rows V=1 %lld, columns %lld, blocks %lld, warp ops %lld, syncs %lld\n",
         stats.rows_runs, stats.rows_v1_runs, stats.columns_runs, stats.blocks, sim::warp_ops, sim::syncs);
  printf("FAILURES: %d\n", failures);
  return failures ? 1 : 0;
}
