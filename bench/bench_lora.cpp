// peft++ — LoRA Linear benchmarks on the CPU backend: peft++ against the same math written by hand, and
// against the frozen base layer alone (the number we sell is the overhead of the adapter path).
//
//   BM_Peft_Fwd_M<M>_D<D>_r<r>         Adapted<Linear<float>, Lora>::forward
//   BM_Handwritten_Fwd_M<M>_D<D>_r<r>  y = x Wᵀ + b + s·(x Aᵀ) Bᵀ by hand (see below)
//   BM_Peft_FwdBwd_...                 forward + backward (dx, dA, dB; frozen base, no dW)
//   BM_Handwritten_FwdBwd_...          the same by hand
//   BM_Base_Fwd_M<M>_D<D>              the frozen base Linear<float> alone through peft++
//   BM_BaseBlas_Fwd_M<M>_D<D>          plain cblas_sgemm + bias (only with PEFT_WITH_OPENBLAS)
//   BM_BaseEigen_Fwd_M<M>_D<D>         plain Eigen `y.noalias() = x * W.transpose()` + bias
//
// M = tokens (batch rows), D = in = out features, r = LoRA rank. Square layers only.
//
// Counters:
//   GFLOPS           flops of the math per second (GEMM flops only: base 2·M·D·D, LoRA 2·M·r·(D+D),
//                    backward 2·M·D·D for dx plus 4 rank-r products of 2·M·r·D each; bias adds ignored)
//   allocs_per_iter  global operator new calls per iteration (operator new/delete replaced below)
//   mallocs_per_iter C-level malloc/calloc/realloc/aligned_alloc/posix_memalign/memalign calls per
//                    iteration that did not come from operator new (glibc only). Eigen's GEMM gets its
//                    packing buffers above 128 KiB from std::malloc, not operator new, so this is the
//                    counter that proves (or disproves) an allocation-free hot path.
//   max_rel_diff     (hand-written benchmarks) largest |peft - hand| over the outputs relative to the
//                    largest |value|: 0 where both run the same kernels, ~1e-7 where they do not
// Repetitions also report their minimum ("_min") beside mean/median/stddev/cv.
//
// Run single-threaded (OpenBLAS's pthread build otherwise uses every core):
//   OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 bench_lora --benchmark_repetitions=5
//       --benchmark_report_aggregates_only=true --benchmark_min_time=0.2
//       --benchmark_enable_random_interleaving=true
// OpenBLAS 0.3.21 does not know recent Intel CPUs and silently runs its Prescott (SSE3) kernels there:
// check openblas_get_corename(), and set e.g. OPENBLAS_CORETYPE=SkylakeX. See docs/benchmarks.md for the
// measured numbers.

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "peft/peft.hpp"

#if defined(PEFT_WITH_OPENBLAS)
#include <cblas.h>
#endif

// ---------------------------------------------------------------------------------------------
// Allocation counters. operator new/delete are replaced (counted in g_new); on glibc the C allocation
// functions are interposed too (counted in g_malloc), with operator new calling glibc's internal
// __libc_malloc directly so that the two counters are disjoint.
namespace {
std::atomic<long> g_new{0};
std::atomic<long> g_malloc{0};
}  // namespace

#if defined(__GLIBC__)
extern "C" {
void* __libc_malloc(std::size_t);
void __libc_free(void*);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);

void* malloc(std::size_t n) noexcept {
  g_malloc.fetch_add(1, std::memory_order_relaxed);
  return __libc_malloc(n);
}
void free(void* p) noexcept { __libc_free(p); }
void* calloc(std::size_t n, std::size_t s) noexcept {
  g_malloc.fetch_add(1, std::memory_order_relaxed);
  return __libc_calloc(n, s);
}
void* realloc(void* p, std::size_t n) noexcept {
  g_malloc.fetch_add(1, std::memory_order_relaxed);
  return __libc_realloc(p, n);
}
void* memalign(std::size_t a, std::size_t n) noexcept {
  g_malloc.fetch_add(1, std::memory_order_relaxed);
  return __libc_memalign(a, n);
}
void* aligned_alloc(std::size_t a, std::size_t n) noexcept {
  g_malloc.fetch_add(1, std::memory_order_relaxed);
  return __libc_memalign(a, n);
}
int posix_memalign(void** out, std::size_t a, std::size_t n) noexcept {
  g_malloc.fetch_add(1, std::memory_order_relaxed);
  void* p = __libc_memalign(a, n);
  if (!p) return 12;  // ENOMEM
  *out = p;
  return 0;
}
}  // extern "C"
#define PEFT_BENCH_RAW_MALLOC(n) __libc_malloc(n)
#define PEFT_BENCH_RAW_ALIGNED(a, n) __libc_memalign(a, n)
#define PEFT_BENCH_RAW_FREE(p) __libc_free(p)
#else
#define PEFT_BENCH_RAW_MALLOC(n) std::malloc(n)
#define PEFT_BENCH_RAW_ALIGNED(a, n) std::aligned_alloc(a, ((n) + (a) - 1) / (a) * (a))
#define PEFT_BENCH_RAW_FREE(p) std::free(p)
#endif

namespace {
void* counted_new(std::size_t n) {
  g_new.fetch_add(1, std::memory_order_relaxed);
  if (void* p = PEFT_BENCH_RAW_MALLOC(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* counted_new_aligned(std::size_t n, std::align_val_t al) {
  g_new.fetch_add(1, std::memory_order_relaxed);
  if (void* p = PEFT_BENCH_RAW_ALIGNED(static_cast<std::size_t>(al), n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
}  // namespace

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t n) { return counted_new(n); }
void* operator new[](std::size_t n) { return counted_new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { try { return counted_new(n); } catch (...) { return nullptr; } }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { try { return counted_new(n); } catch (...) { return nullptr; } }
void* operator new(std::size_t n, std::align_val_t a) { return counted_new_aligned(n, a); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted_new_aligned(n, a); }
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept { try { return counted_new_aligned(n, a); } catch (...) { return nullptr; } }
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept { try { return counted_new_aligned(n, a); } catch (...) { return nullptr; } }
void operator delete(void* p) noexcept { PEFT_BENCH_RAW_FREE(p); }
void operator delete[](void* p) noexcept { PEFT_BENCH_RAW_FREE(p); }
void operator delete(void* p, std::size_t) noexcept { PEFT_BENCH_RAW_FREE(p); }
void operator delete[](void* p, std::size_t) noexcept { PEFT_BENCH_RAW_FREE(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { PEFT_BENCH_RAW_FREE(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { PEFT_BENCH_RAW_FREE(p); }
void operator delete(void* p, std::align_val_t) noexcept { PEFT_BENCH_RAW_FREE(p); }
void operator delete[](void* p, std::align_val_t) noexcept { PEFT_BENCH_RAW_FREE(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { PEFT_BENCH_RAW_FREE(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { PEFT_BENCH_RAW_FREE(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { PEFT_BENCH_RAW_FREE(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { PEFT_BENCH_RAW_FREE(p); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

namespace {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Map = Eigen::Map<RowMat, Eigen::Aligned64>;
using RowVec = Eigen::Map<const Eigen::Matrix<float, 1, Eigen::Dynamic>>;
using Layer = peft::Adapted<peft::Linear<float>, peft::Lora>;

// Shapes of the sweep. M = 2048 with D = 4096 is left out: one forward alone is 69 GFLOP (0.5 s on one
// core at best, several seconds with a generic OpenBLAS kernel), which would triple the suite's run time.
constexpr int kMs[] = {32, 512, 2048};
constexpr int kDs[] = {256, 1024, 4096};
constexpr int kRs[] = {8, 16};
bool skipped(int m, int d) { return m == 2048 && d == 4096; }

double fwd_flops(double m, double d, double r) { return 2 * m * d * d + 2 * m * r * (d + d); }
double bwd_flops(double m, double d, double r) { return 2 * m * d * d + 4 * (2 * m * r * d); }

/// Counts allocations between construction and `finish`, per iteration.
struct AllocProbe {
  long n0 = g_new.load(std::memory_order_relaxed), m0 = g_malloc.load(std::memory_order_relaxed);
  void finish(benchmark::State& state) const {
    const double it = double(std::max<benchmark::IterationCount>(state.iterations(), 1));
    state.counters["allocs_per_iter"] = double(g_new.load(std::memory_order_relaxed) - n0) / it;
    state.counters["mallocs_per_iter"] = double(g_malloc.load(std::memory_order_relaxed) - m0) / it;
  }
};
void set_flops(benchmark::State& state, double flops) {
  state.counters["GFLOPS"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

/// Inputs shared by the variants of one shape, filled with the library's generator.
struct Data {
  int m, d;
  peft::HostBuffer<float> x, dy;
  Data(int m_, int d_) : m(m_), d(d_), x(std::size_t(m_) * d_), dy(std::size_t(m_) * d_) {
    peft::Generator g(7);
    g.uniform(x.data(), x.size(), -1.0, 1.0);
    g.uniform(dy.data(), dy.size(), -1.0, 1.0);
  }
};

/// The peft++ LoRA layer with a context, and the hand-written version's own copies of W, b, A, B plus
/// preallocated intermediates (t = x Aᵀ and g = dy B), so the two never share memory.
struct Problem {
  int m, d, r;
  Data data;
  Layer layer;
  Layer::Context ctx;
  peft::HostBuffer<float> y, dx;  // peft++ outputs
  // hand-written state
  float s = 0;
  peft::HostBuffer<float> W, b, A, B, hy, hdx, t, g, dA, dB;
  // One untimed call per variant before its first timed loop (first touch of the outputs, OpenBLAS's
  // buffer pool); later runs of the same cached problem are already warm.
  bool warm_fwd = false, warm_bwd = false, warm_hfwd = false, warm_hbwd = false;
  double diff_fwd = -1, diff_bwd = -1;  // max_rel_diff, computed once

  Problem(int m_, int d_, int r_)
      : m(m_), d(d_), r(r_), data(m_, d_), layer(make_layer(d_, r_)), ctx(layer.make_context(m_)),
        y(std::size_t(m_) * d_), dx(std::size_t(m_) * d_), W(std::size_t(d_) * d_), b(std::size_t(d_)),
        A(std::size_t(r_) * d_), B(std::size_t(d_) * r_), hy(std::size_t(m_) * d_), hdx(std::size_t(m_) * d_),
        t(std::size_t(m_) * r_), g(std::size_t(m_) * r_), dA(std::size_t(r_) * d_), dB(std::size_t(d_) * r_) {
    auto& a = peft::lora_adapter(layer, "default");
    s = a.scaling;
    std::copy_n(layer.base().weight().data, W.size(), W.data());
    std::copy_n(layer.base().bias().data, b.size(), b.data());
    std::copy_n(a.A().data, A.size(), A.data());
    std::copy_n(a.B().data, B.size(), B.data());
  }
  static Layer make_layer(int d, int r) {
    peft::Generator gen(1);
    Layer l(peft::Linear<float>(d, d, /*bias=*/true, gen));
    peft::LoraConfig cfg;
    cfg.r = r;
    cfg.lora_alpha = 2.0 * r;
    cfg.init_lora_weights = peft::LoraInit::off;  // non-zero B, so the adapter path does real work
    l.add_adapter("default", cfg, gen);
    return l;
  }

  // ---- peft++ ------------------------------------------------------------------------------------
  void peft_forward() { layer.forward(ctx, peft::ConstMatrixView<float>(data.x.data(), m, d), y.view(m, d)); }
  void peft_backward() {
    layer.backward(ctx, peft::ConstMatrixView<float>(data.dy.data(), m, d), dx.view(m, d), peft::GradMode::overwrite);
  }

  // ---- by hand -------------------------------------------------------------------------------------
  // Eigen::Map over preallocated row-major buffers, one product per statement with .noalias(). The base
  // GEMM x Wᵀ (and dy W in backward) is a direct cblas_sgemm call when OpenBLAS is available — that is
  // what a careful hand-writer does on a machine with OpenBLAS, and what peft++ itself routes large
  // GEMMs to — and Eigen otherwise. The skinny rank-r products use plain Eigen.
  void hand_forward() {
    Map X(data.x.data(), m, d), Y(hy.data(), m, d), Am(A.data(), r, d), Bm(B.data(), d, r), T(t.data(), m, r);
#if defined(PEFT_WITH_OPENBLAS)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, d, d, 1.0f, data.x.data(), d, W.data(), d, 0.0f, hy.data(), d);
#else
    Map Wm(W.data(), d, d);
    Y.noalias() = X * Wm.transpose();
#endif
    Y.rowwise() += RowVec(b.data(), d);
    T.noalias() = X * Am.transpose();
    Y.noalias() += s * T * Bm.transpose();
  }
  void hand_backward() {
    Map X(data.x.data(), m, d), dY(data.dy.data(), m, d), dX(hdx.data(), m, d), Am(A.data(), r, d), Bm(B.data(), d, r),
        T(t.data(), m, r), G(g.data(), m, r), dAm(dA.data(), r, d), dBm(dB.data(), d, r);
#if defined(PEFT_WITH_OPENBLAS)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, d, d, 1.0f, data.dy.data(), d, W.data(), d, 0.0f, hdx.data(), d);
#else
    Map Wm(W.data(), d, d);
    dX.noalias() = dY * Wm;
#endif
    G.noalias() = dY * Bm;
    dBm.noalias() = s * dY.transpose() * T;
    dAm.noalias() = s * G.transpose() * X;
    dX.noalias() += s * G * Am;
  }

  /// Largest |peft - hand| over y (and dx, dA, dB after a backward), relative to the largest |value|.
  double max_rel_diff(bool with_backward) {
    auto rel = [](const float* p, const float* q, std::size_t n) {
      double num = 0, den = 0;
      for (std::size_t i = 0; i < n; ++i) {
        num = std::max(num, double(std::abs(p[i] - q[i])));
        den = std::max(den, double(std::abs(q[i])));
      }
      return den > 0 ? num / den : num;
    };
    double e = rel(y.data(), hy.data(), y.size());
    if (with_backward) {
      auto& a = peft::lora_adapter(layer, "default");
      e = std::max({e, rel(dx.data(), hdx.data(), dx.size()), rel(a.grad_A().data, dA.data(), dA.size()),
                    rel(a.grad_B().data, dB.data(), dB.size())});
    }
    return e;
  }
};

/// The frozen base layer alone, with its hand-written references.
struct BaseProblem {
  int m, d;
  Data data;
  peft::Linear<float> base;
  peft::Linear<float>::Context ctx;
  peft::HostBuffer<float> y;
  bool warm_peft = false, warm_blas = false, warm_eigen = false;
  BaseProblem(int m_, int d_) : m(m_), d(d_), data(m_, d_), base(make_base(d_)), ctx(base.make_context(m_)), y(std::size_t(m_) * d_) {}
  static peft::Linear<float> make_base(int d) {
    peft::Generator gen(1);
    return peft::Linear<float>(d, d, /*bias=*/true, gen);
  }
};

// Problems are built once per shape and kept for the whole run (about 1 GB in all): with
// --benchmark_enable_random_interleaving every repetition is a separate run, and rebuilding [4096, 4096]
// weights each time would dominate the run time.
template <class P, class... K>
P& cached(K... key) {
  static std::map<std::tuple<K...>, std::unique_ptr<P>> cache;
  auto& p = cache[std::tuple<K...>(key...)];
  if (!p) p = std::make_unique<P>(key...);
  return *p;
}

// ---- benchmarks ------------------------------------------------------------------------------------

void BM_Peft_Fwd(benchmark::State& state, int m, int d, int r) {
  auto& p = cached<Problem>(m, d, r);
  if (!std::exchange(p.warm_fwd, true)) p.peft_forward();
  AllocProbe probe;
  for (auto _ : state) {
    p.peft_forward();
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  probe.finish(state);
  set_flops(state, fwd_flops(m, d, r));
}

void BM_Handwritten_Fwd(benchmark::State& state, int m, int d, int r) {
  auto& p = cached<Problem>(m, d, r);
  if (!std::exchange(p.warm_hfwd, true)) p.hand_forward();
  AllocProbe probe;
  for (auto _ : state) {
    p.hand_forward();
    benchmark::DoNotOptimize(p.hy.data());
    benchmark::ClobberMemory();
  }
  probe.finish(state);
  set_flops(state, fwd_flops(m, d, r));
  if (p.diff_fwd < 0) {
    p.peft_forward();
    p.diff_fwd = p.max_rel_diff(false);
  }
  state.counters["max_rel_diff"] = p.diff_fwd;  // hand-written vs peft++: 0, or ~1e-6 where they pick different GEMMs
}

void BM_Peft_FwdBwd(benchmark::State& state, int m, int d, int r) {
  auto& p = cached<Problem>(m, d, r);
  if (!std::exchange(p.warm_bwd, true)) p.peft_forward(), p.peft_backward();
  AllocProbe probe;
  for (auto _ : state) {
    p.peft_forward();
    p.peft_backward();
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  probe.finish(state);
  set_flops(state, fwd_flops(m, d, r) + bwd_flops(m, d, r));
}

void BM_Handwritten_FwdBwd(benchmark::State& state, int m, int d, int r) {
  auto& p = cached<Problem>(m, d, r);
  if (!std::exchange(p.warm_hbwd, true)) p.hand_forward(), p.hand_backward();
  AllocProbe probe;
  for (auto _ : state) {
    p.hand_forward();
    p.hand_backward();
    benchmark::DoNotOptimize(p.hdx.data());
    benchmark::ClobberMemory();
  }
  probe.finish(state);
  set_flops(state, fwd_flops(m, d, r) + bwd_flops(m, d, r));
  if (p.diff_bwd < 0) {
    p.peft_forward();
    p.peft_backward();
    p.diff_bwd = p.max_rel_diff(true);
  }
  state.counters["max_rel_diff"] = p.diff_bwd;
}

void BM_Base_Fwd(benchmark::State& state, int m, int d) {
  auto& p = cached<BaseProblem>(m, d);
  const peft::ConstMatrixView<float> x(p.data.x.data(), m, d);
  const auto y = p.y.view(m, d);
  if (!std::exchange(p.warm_peft, true)) p.base.forward(p.ctx, x, y);
  AllocProbe probe;
  for (auto _ : state) {
    p.base.forward(p.ctx, x, y);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  probe.finish(state);
  set_flops(state, 2.0 * m * d * d);
}

#if defined(PEFT_WITH_OPENBLAS)
void BM_BaseBlas_Fwd(benchmark::State& state, int m, int d) {
  auto& p = cached<BaseProblem>(m, d);
  const float* x = p.data.x.data();
  const float* w = p.base.weight().data;
  const RowVec bias(p.base.bias().data, d);
  float* y = p.y.data();
  Map Y(y, m, d);
  auto run = [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, d, d, 1.0f, x, d, w, d, 0.0f, y, d);
    Y.rowwise() += bias;
  };
  if (!std::exchange(p.warm_blas, true)) run();
  AllocProbe probe;
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(y);
    benchmark::ClobberMemory();
  }
  probe.finish(state);
  set_flops(state, 2.0 * m * d * d);
}
#endif

void BM_BaseEigen_Fwd(benchmark::State& state, int m, int d) {
  auto& p = cached<BaseProblem>(m, d);
  Map X(p.data.x.data(), m, d), Y(p.y.data(), m, d);
  Eigen::Map<const RowMat, Eigen::Aligned64> Wm(p.base.weight().data, d, d);
  const RowVec bias(p.base.bias().data, d);
  auto run = [&] {
    Y.noalias() = X * Wm.transpose();
    Y.rowwise() += bias;
  };
  if (!std::exchange(p.warm_eigen, true)) run();
  AllocProbe probe;
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  probe.finish(state);
  set_flops(state, 2.0 * m * d * d);
}

std::string shape_name(const char* prefix, int m, int d, int r = 0) {
  char buf[96];
  if (r > 0) std::snprintf(buf, sizeof buf, "%s_M%d_D%d_r%d", prefix, m, d, r);
  else std::snprintf(buf, sizeof buf, "%s_M%d_D%d", prefix, m, d);
  return buf;
}

// Registered per shape so that each peft++ / hand-written pair runs back to back (or randomly interleaved
// with --benchmark_enable_random_interleaving=true). Besides mean/median/stddev/cv, repetitions report
// their minimum ("_min"), the least noise-sensitive estimate on a shared machine.
double min_of(const std::vector<double>& v) { return v.empty() ? 0.0 : *std::min_element(v.begin(), v.end()); }

template <class F, class... A>
void add(const std::string& name, F f, A... args) {
  benchmark::RegisterBenchmark(name.c_str(), f, args...)->Unit(benchmark::kMicrosecond)->ComputeStatistics("min", min_of);
}

const bool registered = [] {
  for (int d : kDs)
    for (int m : kMs) {
      if (skipped(m, d)) continue;
      add(shape_name("BM_Base_Fwd", m, d), BM_Base_Fwd, m, d);
#if defined(PEFT_WITH_OPENBLAS)
      add(shape_name("BM_BaseBlas_Fwd", m, d), BM_BaseBlas_Fwd, m, d);
#endif
      add(shape_name("BM_BaseEigen_Fwd", m, d), BM_BaseEigen_Fwd, m, d);
      for (int r : kRs) {
        add(shape_name("BM_Peft_Fwd", m, d, r), BM_Peft_Fwd, m, d, r);
        add(shape_name("BM_Handwritten_Fwd", m, d, r), BM_Handwritten_Fwd, m, d, r);
        add(shape_name("BM_Peft_FwdBwd", m, d, r), BM_Peft_FwdBwd, m, d, r);
        add(shape_name("BM_Handwritten_FwdBwd", m, d, r), BM_Handwritten_FwdBwd, m, d, r);
      }
    }
  return true;
}();

}  // namespace

BENCHMARK_MAIN();
