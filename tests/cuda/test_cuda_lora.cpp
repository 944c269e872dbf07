// The CUDA backend against the CPU backend: every backend operation the Linear/LoRA/DoRA path uses (double,
// on strided views, against EigenCpu), dropout masks bit for bit, and the same seeded layers on CPU (double)
// and GPU (float, and double for a tight check of the logic) compared forward, backward, merge and unmerge;
// plus the allocation-free hot path (no cudaMalloc, no change in free device memory).
//
// Tolerances (relative to max(1, max |CPU value|), per tensor): GPU double 1e-11, GPU float 2e-5 (the
// inputs are rounded to float; the CPU reference is double). Seeded weights are compared exactly: the GPU
// draws them on the host with the same Generator.
//
// Without a CUDA device every test that needs one prints "SKIPPED: no CUDA device" and returns; ctest
// reports those as skipped (SKIP_REGULAR_EXPRESSION in tests/CMakeLists.txt). The error-path test runs
// everywhere.
#include <catch2/catch.hpp>
#include <cmath>
#include <iostream>
#include <limits>
#include <optional>
#include <peft/backend/cuda.hpp>
#include <string>
#include <thread>
#include <vector>

#include "gpu_skip.hpp"
#include "test_util.hpp"

using namespace peft;
using peft::test::Mat;
using peft::test::random_mat;

namespace {

using Gpu = CudaBackend;

template <class T>
DeviceBuffer<T> to_device(const Mat<T>& m) {
  DeviceBuffer<T> b(std::size_t(m.size()));
  Gpu::upload<T>(m, b.view(m.rows(), m.cols()));
  return b;
}
template <class T>
Mat<T> to_host(ConstMatrixView<T> v) {
  Mat<T> m(v.rows, v.cols);
  Gpu::download<T>(v, m);
  return m;
}
template <class G>
void upload_cast(ConstMatrixView<double> host, MatrixView<G> device) {
  const Mat<G> c = test::as_mat(host).template cast<G>();
  Gpu::upload<G>(c, device);
}

/// A copy of a (possibly strided) host view.
Mat<double> hm(ConstMatrixView<double> v) {
  Mat<double> m(v.rows, v.cols);
  for (Index i = 0; i < v.rows; ++i)
    for (Index j = 0; j < v.cols; ++j) m(i, j) = v(i, j);
  return m;
}

/// max |gpu − cpu| / max(1, max |cpu|)
template <class A, class B>
double rel_err(const A& gpu, const B& cpu) {
  const double scale = std::max(1.0, cpu.template cast<double>().cwiseAbs().maxCoeff());
  return test::max_abs_diff(gpu, cpu) / scale;
}
template <class G>
double rel_err(ConstMatrixView<G> gpu, ConstMatrixView<double> cpu) {
  return rel_err(to_host<G>(gpu), hm(cpu));
}

template <class G>
constexpr double tol() { return std::is_same_v<G, float> ? 2e-5 : 1e-11; }

/// A host matrix and its device twin; views of the same block of both.
struct Twin {
  Mat<double> h;
  DeviceBuffer<double> d;
  explicit Twin(Mat<double> m) : h(std::move(m)), d(to_device(h)) {}
  MatrixView<double> hv(Index r0, Index c0, Index r, Index c) { return {h.data() + r0 * h.cols() + c0, r, c, Index(h.cols())}; }
  MatrixView<double> dv(Index r0, Index c0, Index r, Index c) { return {d.data() + r0 * h.cols() + c0, r, c, Index(h.cols())}; }
  double err() const { return rel_err(to_host<double>(d.view(h.rows(), h.cols())), h); }
};

}  // namespace

TEST_CASE("cuda: device count, errors and shape checks (runs without a GPU too)", "[cuda]") {
  const int n = cuda::device_count();  // never throws, 0 without a device or driver
  CHECK(n >= 0);
  float host[6] = {};
  const Mat<float> m = Mat<float>::Zero(2, 3);
  // the shapes are checked before any CUDA call
  CHECK_THROWS_AS(Gpu::upload<float>(m, MatrixView<float>(host, 3, 2)), ShapeError);
  CHECK_THROWS_AS(Gpu::download<float>(ConstMatrixView<float>(host, 3, 2), MatrixView<float>(host, 2, 3)), ShapeError);
  // a failed cudaMalloc (no device, or far more memory than any device has) is a CudaError naming the call
  const std::size_t elems = n == 0 ? 16 : (std::size_t(1) << 58);
  CHECK_THROWS_WITH(DeviceBuffer<float>(elems), Catch::Contains("cudaMalloc"));
  CHECK_THROWS_AS(DeviceBuffer<float>(elems), CudaError);
  if (n == 0) CHECK_THROWS_AS(cuda::mem_info(), CudaError);
  // TF32 is off by default (PyTorch's matmul default), per thread
  CHECK_FALSE(cuda::allow_tf32());
  cuda::set_allow_tf32(true);
  CHECK(cuda::allow_tf32());
  std::thread([] { CHECK_FALSE(cuda::allow_tf32()); }).join();
  cuda::set_allow_tf32(false);
}

TEST_CASE("cuda: TF32 GEMMs (allow_tf32) stay within TF32's rounding of the FP32 result", "[cuda]") {
  PEFT_REQUIRE_GPU();
  const Index m = 256, k = 512, n = 128;
  const Mat<float> a = test::random_mat<float>(m, k, 1), b = test::random_mat<float>(k, n, 2);
  DeviceBuffer<float> da(std::size_t(m * k)), db(std::size_t(k * n)), dc(std::size_t(m * n));
  Gpu::upload<float>(a, da.view(m, k));
  Gpu::upload<float>(b, db.view(k, n));
  Gpu::GemmScratch<float> s;
  s.reserve_gemm(m, n, k);
  Mat<float> c32(m, n), c_tf32(m, n);
  Gpu::gemm<Trans::no, Trans::no, float>(s, 1.0f, da.view(m, k), db.view(k, n), 0.0f, dc.view(m, n));
  Gpu::download<float>(dc.view(m, n), c32);
  cuda::set_allow_tf32(true);
  Gpu::gemm<Trans::no, Trans::no, float>(s, 1.0f, da.view(m, k), db.view(k, n), 0.0f, dc.view(m, n));
  Gpu::download<float>(dc.view(m, n), c_tf32);
  cuda::set_allow_tf32(false);
  const Mat<double> exact = a.cast<double>() * b.cast<double>();
  const double scale = exact.cwiseAbs().maxCoeff();
  CHECK((c32.cast<double>() - exact).cwiseAbs().maxCoeff() / scale < 1e-5);
  // TF32 keeps 10 mantissa bits of each input (u = 2^-11): per-product errors about 2u, mostly cancelling
  CHECK((c_tf32.cast<double>() - exact).cwiseAbs().maxCoeff() / scale < 2e-2);
}

TEST_CASE("cuda: dropout masks equal the CPU's bit for bit", "[cuda]") {
  PEFT_REQUIRE_GPU();
  const Index rows = 37, cols = 129;
  for (double p : {0.1, 0.5}) {
    const Mat<float> x = random_mat<float>(rows, cols, 3);
    Mat<float> ycpu(rows, cols);
    EigenCpu::dropout<float>(x, ycpu, p, 1234, 7);
    auto dx = to_device(x);
    DeviceBuffer<float> dy(std::size_t(rows * cols));
    Gpu::dropout<float>(dx.view(rows, cols), dy.view(rows, cols), p, 1234, 7);
    const Mat<float> ygpu = to_host<float>(dy.view(rows, cols));
    CHECK((ygpu.array() == ycpu.array()).all());
    const double dropped = double((ycpu.array() == 0.0f).count()) / double(rows * cols);
    CHECK(std::abs(dropped - p) < 0.05);  // the mask is not trivial
    // in place, as LoRA's backward applies it (y == x)
    Gpu::dropout<float>(dx.view(rows, cols), dx.view(rows, cols), p, 1234, 7);
    CHECK((to_host<float>(dx.view(rows, cols)).array() == ycpu.array()).all());
    // another stream gives another mask
    const auto dx2 = to_device(x);
    Gpu::dropout<float>(dx2.view(rows, cols), dy.view(rows, cols), p, 1234, 8);
    CHECK(!(to_host<float>(dy.view(rows, cols)).array() == ycpu.array()).all());
  }
}

TEST_CASE("cuda: backend operations match EigenCpu in double on strided views", "[cuda]") {
  PEFT_REQUIRE_GPU();
  // [70, 45] blocks at column 3 of [72, 50] matrices: strides, more rows than a reduction block, more
  // columns than a warp
  const Index R = 72, C = 50, r0 = 1, c0 = 3, rows = 70, cols = 45;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  Twin y(random_mat<double>(R, C, 1)), x(random_mat<double>(R, C, 2));
  Twin vr(random_mat<double>(1, C, 3)), vc(random_mat<double>(1, R, 4));
  auto Y = [&](auto& t, bool dev) { return dev ? t.dv(r0, c0, rows, cols) : t.hv(r0, c0, rows, cols); };
  const double tl = 1e-12;

  SECTION("scale, fill, copy, axpby, mul, div") {
    for (double beta : {0.0, 0.7, 1.0}) {
      EigenCpu::scale(Y(y, false), beta);
      Gpu::scale(Y(y, true), beta);
      CHECK(y.err() < tl);
    }
    EigenCpu::fill(Y(y, false), 0.25);
    Gpu::fill(Y(y, true), 0.25);
    CHECK(y.err() < tl);
    EigenCpu::copy<double>(Y(x, false), Y(y, false));
    Gpu::copy<double>(Y(x, true), Y(y, true));
    CHECK(y.err() < tl);
    for (double beta : {0.0, 1.0, 0.3}) {
      EigenCpu::axpby<double>(1.7, Y(x, false), beta, Y(y, false));
      Gpu::axpby<double>(1.7, Y(x, true), beta, Y(y, true));
      CHECK(y.err() < tl);
    }
    EigenCpu::mul<double>(Y(x, false), Y(y, false));
    Gpu::mul<double>(Y(x, true), Y(y, true));
    CHECK(y.err() < tl);
    Twin b((random_mat<double>(R, C, 5).array() + 2.0).matrix());
    EigenCpu::div<double>(Y(x, false), Y(b, false), Y(y, false));
    Gpu::div<double>(Y(x, true), Y(b, true), Y(y, true));
    CHECK(y.err() < tl);
  }
  SECTION("beta == 0 does not read the destination") {
    Twin n(Mat<double>::Constant(R, C, nan));
    Gpu::scale(Y(n, true), 0.0);
    CHECK(to_host<double>(n.dv(r0, c0, rows, cols)).isZero(0.0));
    Twin n2(Mat<double>::Constant(R, C, nan));
    Gpu::axpby<double>(2.0, Y(x, true), 0.0, Y(n2, true));
    CHECK(rel_err(to_host<double>(n2.dv(r0, c0, rows, cols)), Mat<double>(2.0 * hm(ConstMatrixView<double>(Y(x, false))))) < tl);
    Twin n3(Mat<double>::Constant(R, C, nan));
    Gpu::add_scaled_cols<double>(Y(x, true), vr.d.data(), 0.0, Y(n3, true));
    EigenCpu::add_scaled_cols<double>(Y(x, false), vr.h.data(), 0.0, Y(y, false));
    CHECK(rel_err(to_host<double>(n3.dv(r0, c0, rows, cols)), hm(ConstMatrixView<double>(Y(y, false)))) < tl);
  }
  SECTION("row and column broadcasts") {
    EigenCpu::add_row_vector(Y(y, false), vr.h.data(), 0.5);
    Gpu::add_row_vector(Y(y, true), vr.d.data(), 0.5);
    CHECK(y.err() < tl);
    EigenCpu::add_col_vector(Y(y, false), vc.h.data(), -1.5);
    Gpu::add_col_vector(Y(y, true), vc.d.data(), -1.5);
    CHECK(y.err() < tl);
    EigenCpu::scale_cols(Y(y, false), vr.h.data());
    Gpu::scale_cols(Y(y, true), vr.d.data());
    CHECK(y.err() < tl);
    EigenCpu::scale_rows(Y(y, false), vc.h.data());
    Gpu::scale_rows(Y(y, true), vc.d.data());
    CHECK(y.err() < tl);
    EigenCpu::add_scaled_cols<double>(Y(x, false), vr.h.data(), 0.5, Y(y, false));
    Gpu::add_scaled_cols<double>(Y(x, true), vr.d.data(), 0.5, Y(y, true));
    CHECK(y.err() < tl);
  }
  SECTION("reductions") {
    Twin out_c(Mat<double>::Constant(1, C, nan)), out_r(Mat<double>::Constant(1, R, nan));
    // beta == 0 over NaN, then beta != 0
    for (double beta : {0.0, 2.0}) {
      EigenCpu::sum_rows<double>(Y(x, false), out_c.h.data(), 0.5, beta);
      Gpu::sum_rows<double>(Y(x, true), out_c.d.data(), 0.5, beta);
      CHECK(rel_err(to_host<double>(out_c.dv(0, 0, 1, cols)), hm(ConstMatrixView<double>(out_c.hv(0, 0, 1, cols)))) < tl);
      EigenCpu::sum_cols<double>(Y(x, false), out_r.h.data(), 0.5, beta);
      Gpu::sum_cols<double>(Y(x, true), out_r.d.data(), 0.5, beta);
      CHECK(rel_err(to_host<double>(out_r.dv(0, 0, 1, rows)), hm(ConstMatrixView<double>(out_r.hv(0, 0, 1, rows)))) < tl);
      EigenCpu::sum_rows_mul<double>(Y(x, false), Y(y, false), out_c.h.data(), -1.0, beta);
      Gpu::sum_rows_mul<double>(Y(x, true), Y(y, true), out_c.d.data(), -1.0, beta);
      CHECK(rel_err(to_host<double>(out_c.dv(0, 0, 1, cols)), hm(ConstMatrixView<double>(out_c.hv(0, 0, 1, cols)))) < tl);
    }
    EigenCpu::row_norms<double>(Y(x, false), out_r.h.data());
    Gpu::row_norms<double>(Y(x, true), out_r.d.data());
    CHECK(rel_err(to_host<double>(out_r.dv(0, 0, 1, rows)), hm(ConstMatrixView<double>(out_r.hv(0, 0, 1, rows)))) < tl);
    EigenCpu::col_norms<double>(Y(x, false), out_c.h.data());
    Gpu::col_norms<double>(Y(x, true), out_c.d.data());
    CHECK(rel_err(to_host<double>(out_c.dv(0, 0, 1, cols)), hm(ConstMatrixView<double>(out_c.hv(0, 0, 1, cols)))) < tl);
    // a batch of zero rows: sums are zero (beta == 0) or scaled
    Gpu::sum_rows<double>(x.dv(0, 0, 0, cols), out_c.d.data(), 1.0, 0.0);
    CHECK(to_host<double>(out_c.dv(0, 0, 1, cols)).isZero(0.0));
  }
  SECTION("all_finite") {
    CHECK(Gpu::all_finite<double>(Y(x, true)));
    Mat<double> one(1, 1);
    one(0, 0) = std::numeric_limits<double>::infinity();
    Gpu::upload<double>(one, x.dv(r0 + 5, c0 + 7, 1, 1));
    CHECK(!Gpu::all_finite<double>(Y(x, true)));
    CHECK(Gpu::all_finite<double>(x.dv(r0, c0, 5, cols)));  // the bad element is outside this block
  }
}

TEST_CASE("cuda: gemm matches EigenCpu for every transposition, strided, beta 0 (NaN c) / 1 / 0.5", "[cuda]") {
  PEFT_REQUIRE_GPU();
  const Index m = 37, n = 29, k = 53;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  auto run = [&](auto ta, auto tb) {
    constexpr Trans TA = decltype(ta)::value, TB = decltype(tb)::value;
    const Index ar = TA == Trans::no ? m : k, ac = TA == Trans::no ? k : m;
    const Index br = TB == Trans::no ? k : n, bc = TB == Trans::no ? n : k;
    Twin a(random_mat<double>(ar + 2, ac + 5, 11)), b(random_mat<double>(br + 1, bc + 3, 12));
    for (double beta : {0.0, 1.0, 0.5}) {
      Twin c(beta == 0.0 ? Mat<double>::Constant(m + 3, n + 4, nan) : random_mat<double>(m + 3, n + 4, 13));
      Twin cref(random_mat<double>(m + 3, n + 4, 13));
      EigenCpu::GemmScratch<double> hs;
      hs.reserve_gemm(m, n, k);
      Gpu::GemmScratch<double> ds;
      ds.reserve_gemm(m, n, k);
      EigenCpu::gemm<TA, TB, double>(hs, 0.7, a.hv(1, 2, ar, ac), b.hv(1, 1, br, bc), beta, cref.hv(2, 3, m, n));
      Gpu::gemm<TA, TB, double>(ds, 0.7, a.dv(1, 2, ar, ac), b.dv(1, 1, br, bc), beta, c.dv(2, 3, m, n));
      const Mat<double> got = to_host<double>(c.dv(2, 3, m, n));
      CHECK(rel_err(got, hm(ConstMatrixView<double>(cref.hv(2, 3, m, n)))) < 1e-12);
      // the elements around the block are untouched
      if (beta != 0.0) {
        Mat<double> whole = to_host<double>(c.d.view(m + 3, n + 4));
        whole.block(2, 3, m, n) = cref.h.block(2, 3, m, n);
        CHECK(test::max_abs_diff(whole, cref.h) == 0.0);
      }
    }
  };
  run(std::integral_constant<Trans, Trans::no>{}, std::integral_constant<Trans, Trans::no>{});
  run(std::integral_constant<Trans, Trans::no>{}, std::integral_constant<Trans, Trans::yes>{});
  run(std::integral_constant<Trans, Trans::yes>{}, std::integral_constant<Trans, Trans::no>{});
  run(std::integral_constant<Trans, Trans::yes>{}, std::integral_constant<Trans, Trans::yes>{});
}

namespace {

template <class G>
void check_linear(WeightLayout layout) {
  const Index in = 96, out = 80, batch = 33;
  Generator gc(11), gg(11);
  Linear<double> cpu(in, out, true, gc, layout);
  Linear<G, Gpu> gpu(in, out, true, gg, layout);
  // seeded weights: the GPU holds the CPU's numbers rounded to G
  CHECK(test::max_abs_diff(to_host<G>(gpu.weight()), Mat<G>(test::as_mat(cpu.weight()).template cast<G>())) == 0.0);
  CHECK(test::max_abs_diff(to_host<G>(gpu.bias()), Mat<G>(test::as_mat(cpu.bias()).template cast<G>())) == 0.0);
  cpu.set_requires_grad(true);
  gpu.set_requires_grad(true);

  const Mat<double> x = random_mat<double>(batch, in, 5), dy = random_mat<double>(batch, out, 6);
  const auto xd = to_device(Mat<G>(x.cast<G>())), dyd = to_device(Mat<G>(dy.cast<G>()));
  Mat<double> y(batch, out), dx(batch, in);
  DeviceBuffer<G> yd(std::size_t(batch * out)), dxd(std::size_t(batch * in));
  auto cc = cpu.make_context(40);
  auto gc_ = gpu.make_context(40);
  cpu.forward(cc, x, y);
  gpu.forward(gc_, xd.view(batch, in), yd.view(batch, out));
  CHECK(rel_err(to_host<G>(yd.view(batch, out)), y) < tol<G>());
  for (auto mode : {GradMode::overwrite, GradMode::accumulate}) {
    cpu.backward(cc, dy, dx, mode, mode);
    gpu.backward(gc_, dyd.view(batch, out), dxd.view(batch, in), mode, mode);
    CHECK(rel_err(to_host<G>(dxd.view(batch, in)), dx) < tol<G>());
    CHECK(rel_err<G>(gpu.weight_grad(), cpu.weight_grad()) < tol<G>());
    CHECK(rel_err<G>(gpu.bias_grad(), cpu.bias_grad()) < tol<G>());
  }
}

struct LoraCase {
  const char* name;
  LoraConfig cfg;
  WeightLayout layout = WeightLayout::out_in;
  bool second = false;  ///< a second active adapter "b"
};

std::vector<LoraCase> lora_cases() {
  std::vector<LoraCase> v;
  LoraConfig c;
  c.r = 8;
  c.lora_alpha = 16;
  c.init_lora_weights = LoraInit::off;  // B != 0: the adapter contributes from the start
  v.push_back({"lora", c});
  LoraConfig d = c;
  d.r = 4;
  d.lora_dropout = 0.3;
  d.lora_bias = true;
  v.push_back({"lora, dropout 0.3, lora_bias", d});
  LoraConfig f = c;
  f.fan_in_fan_out = true;
  f.use_rslora = true;
  f.lora_dropout = 0.2;
  v.push_back({"lora, fan_in_fan_out, rslora, dropout 0.2", f, WeightLayout::in_out});
  LoraConfig two = c;
  two.lora_dropout = 0.1;
  v.push_back({"two active lora adapters", two, WeightLayout::out_in, true});
  LoraConfig dora = c;
  dora.r = 6;
  dora.lora_alpha = 12;
  dora.use_dora = true;
  v.push_back({"dora", dora});
  LoraConfig dora_d = dora;
  dora_d.lora_dropout = 0.25;
  v.push_back({"dora, dropout 0.25", dora_d});
  LoraConfig dora_f = dora;
  dora_f.fan_in_fan_out = true;
  v.push_back({"dora, fan_in_fan_out, with a second lora adapter", dora_f, WeightLayout::in_out, true});
  return v;
}

template <class G>
void check_lora(const LoraCase& lc) {
  INFO(lc.name);
  const Index in = 72, out = 56, batch = 29;
  Generator gc(21), gg(21);
  Adapted<Linear<double>, Lora> cpu(Linear<double>(in, out, true, gc, lc.layout));
  Adapted<Linear<G, Gpu>, Lora> gpu(Linear<G, Gpu>(in, out, true, gg, lc.layout));
  cpu.add_adapter("a", lc.cfg, gc);
  gpu.add_adapter("a", lc.cfg, gg);
  std::vector<std::string> names{"a"};
  if (lc.second) {
    LoraConfig b;
    b.r = 3;
    b.lora_alpha = 5;
    b.init_lora_weights = LoraInit::off;
    b.fan_in_fan_out = lc.cfg.fan_in_fan_out;
    cpu.add_adapter("b", b, gc);
    gpu.add_adapter("b", b, gg);
    names.push_back("b");
    cpu.set_adapter(names);
    gpu.set_adapter(names);
  }
  cpu.set_seed(99);
  gpu.set_seed(99);
  for (const auto& n : names) {
    auto& ac = lora_adapter(cpu, n);
    auto& ag = lora_adapter(gpu, n);
    CHECK(test::max_abs_diff(to_host<G>(ag.A()), Mat<G>(test::as_mat(ac.A()).template cast<G>())) == 0.0);
    CHECK(test::max_abs_diff(to_host<G>(ag.B()), Mat<G>(test::as_mat(ac.B()).template cast<G>())) == 0.0);
    if (ac.config.lora_bias) CHECK(test::max_abs_diff(to_host<G>(ag.B_bias()), Mat<G>(test::as_mat(ac.B_bias()).template cast<G>())) == 0.0);
    if (ac.dora()) {
      // the magnitude init ‖W + s·B·A‖_row, computed on each backend
      CHECK(rel_err<G>(ag.M(), ac.M()) < tol<G>());
      // then m ← m · U(0.5, 1.5) on both (otherwise g ≡ 1 and DoRA's own terms vanish)
      test::as_mat(ac.M()).array() *= (1.0 + random_mat<double>(1, out, 77).array()) * 0.5 + 0.25;
      upload_cast<G>(ac.M(), ag.M());
    }
  }

  const Mat<double> x = random_mat<double>(batch, in, 5), dy = random_mat<double>(batch, out, 6);
  const auto xd = to_device(Mat<G>(x.cast<G>())), dyd = to_device(Mat<G>(dy.cast<G>()));
  Mat<double> y(batch, out), dx(batch, in);
  DeviceBuffer<G> yd(std::size_t(batch * out)), dxd(std::size_t(batch * in));
  auto cc = cpu.make_context(32);
  auto gcx = gpu.make_context(32);
  // two steps: overwrite, then accumulate (new dropout masks in the second forward, the same on both)
  for (auto mode : {GradMode::overwrite, GradMode::accumulate}) {
    cpu.forward(cc, x, y);
    gpu.forward(gcx, xd.view(batch, in), yd.view(batch, out));
    CHECK(rel_err(to_host<G>(yd.view(batch, out)), y) < tol<G>());
    cpu.backward(cc, dy, dx, mode, mode);
    gpu.backward(gcx, dyd.view(batch, out), dxd.view(batch, in), mode, mode);
    CHECK(rel_err(to_host<G>(dxd.view(batch, in)), dx) < tol<G>());
    for (const auto& n : names) {
      INFO("adapter " << n);
      auto& ac = lora_adapter(cpu, n);
      auto& ag = lora_adapter(gpu, n);
      CHECK(rel_err<G>(ag.grad_A(), ac.grad_A()) < tol<G>());
      CHECK(rel_err<G>(ag.grad_B(), ac.grad_B()) < tol<G>());
      if (ac.config.lora_bias) CHECK(rel_err<G>(ag.grad_B_bias(), ac.grad_B_bias()) < tol<G>());
      if (ac.dora()) CHECK(rel_err<G>(ag.grad_M(), ac.grad_M()) < tol<G>());
    }
  }

  // merge (safe_merge on the GPU: its NaN check runs on the device) and unmerge
  cpu.eval();
  gpu.eval();
  const Mat<double> w0 = test::as_mat(cpu.base().weight()), b0 = test::as_mat(cpu.base().bias());
  Mat<double> y_eval(batch, out);
  cpu.forward(cc, x, y_eval);
  cpu.merge();
  gpu.merge(std::nullopt, true);
  CHECK(rel_err<G>(gpu.base().weight(), cpu.base().weight()) < tol<G>());
  CHECK(rel_err<G>(gpu.base().bias(), cpu.base().bias()) < tol<G>());
  CHECK(rel_err(test::as_mat(cpu.base().weight()), w0) > 1e-3);  // the merge changed the weight
  gpu.forward(gcx, xd.view(batch, in), yd.view(batch, out));  // the merged base alone
  CHECK(rel_err(to_host<G>(yd.view(batch, out)), y_eval) < tol<G>());
  cpu.unmerge();
  gpu.unmerge();
  CHECK(rel_err<G>(gpu.base().weight(), ConstMatrixView<double>(w0)) < tol<G>());
  CHECK(rel_err<G>(gpu.base().bias(), ConstMatrixView<double>(b0)) < tol<G>());
  gpu.forward(gcx, xd.view(batch, in), yd.view(batch, out));
  CHECK(rel_err(to_host<G>(yd.view(batch, out)), y_eval) < tol<G>());
}

}  // namespace

TEST_CASE("cuda: Linear forward and backward, CPU double vs GPU float and double", "[cuda]") {
  PEFT_REQUIRE_GPU();
  for (auto layout : {WeightLayout::out_in, WeightLayout::in_out}) {
    check_linear<double>(layout);
    check_linear<float>(layout);
  }
}

TEST_CASE("cuda: LoRA and DoRA forward, backward, merge, unmerge, CPU double vs GPU double", "[cuda]") {
  PEFT_REQUIRE_GPU();
  for (const auto& lc : lora_cases()) check_lora<double>(lc);
}

TEST_CASE("cuda: LoRA and DoRA forward, backward, merge, unmerge, CPU double vs GPU float", "[cuda]") {
  PEFT_REQUIRE_GPU();
  for (const auto& lc : lora_cases()) check_lora<float>(lc);
}

TEST_CASE("cuda: forward and backward make no device allocation", "[cuda][alloc]") {
  PEFT_REQUIRE_GPU();
  const Index in = 256, out = 192, max_batch = 128;
  for (bool dora : {false, true}) {
    INFO("dora: " << dora);
    Generator g(5);
    Adapted<Linear<float, Gpu>, Lora> layer(Linear<float, Gpu>(in, out, true, g));
    LoraConfig a;
    a.r = 16;
    a.lora_alpha = 32;
    a.lora_dropout = 0.1;
    a.init_lora_weights = LoraInit::off;
    a.use_dora = dora;
    LoraConfig b = a;
    b.r = 8;
    b.lora_dropout = 0.0;
    b.use_dora = false;
    layer.add_adapter("a", a, g);
    layer.add_adapter("b", b, g);
    layer.set_adapter(std::vector<std::string>{"a", "b"});
    const auto x = to_device(random_mat<float>(max_batch, in, 1)), dy = to_device(random_mat<float>(max_batch, out, 2));
    DeviceBuffer<float> y(std::size_t(max_batch * out)), dx(std::size_t(max_batch * in));
    auto ctx = layer.make_context(max_batch);
    auto step = [&](Index m) {
      layer.forward(ctx, x.view(m, in), y.view(m, out));
      layer.backward(ctx, dy.view(m, out), dx.view(m, in), GradMode::accumulate);
    };
    const auto count0 = cuda::allocation_count();
    for (Index m : {max_batch, Index(1), Index(77)}) step(m);  // warm-up: the first launch of a kernel may load it
    cuda::synchronize();
    const auto free0 = cuda::mem_info().free;
    for (int it = 0; it < 3; ++it)
      for (Index m : {max_batch, Index(1), Index(77)}) step(m);
    cuda::synchronize();
    CHECK(cuda::allocation_count() == count0);  // peft's own cudaMalloc calls, from the first step on
    // and nothing else (cuBLAS included) after the warm-up: a cuBLAS workspace of its own would be MiBs; the
    // driver may still grow per-thread local memory by a little
    const auto free1 = cuda::mem_info().free;
    INFO("free device memory " << free0 << " -> " << free1);
    CHECK(free1 + (std::size_t(4) << 20) >= free0);
  }
}
