// The core: views, the CPU backend's operations, the RNG and the Linear base layer.
#include <catch2/catch.hpp>

#include "gradcheck.hpp"
#include "test_util.hpp"

using namespace peft;
using namespace peft::test;

namespace {
template <class T>
Mat<T> op(const Mat<T>& m, Trans t) { return t == Trans::yes ? Mat<T>(m.transpose()) : m; }

template <Trans TA, Trans TB, class T>
void check_gemm(peft::Index m, peft::Index n, peft::Index k, T alpha, T beta) {
  CAPTURE(m, n, k, int(TA), int(TB), alpha, beta);
  const Mat<T> a = TA == Trans::no ? random_mat<T>(m, k, 1) : random_mat<T>(k, m, 1);
  const Mat<T> b = TB == Trans::no ? random_mat<T>(k, n, 2) : random_mat<T>(n, k, 2);
  Mat<T> c = beta == T(0) ? filled<T>(m, n, nan<T>()) : random_mat<T>(m, n, 3);
  const Mat<double> expect = double(alpha) * (op(a, TA).template cast<double>() * op(b, TB).template cast<double>()) +
                             (beta == T(0) ? Mat<double>::Zero(m, n) : Mat<double>(double(beta) * c.template cast<double>()));
  EigenCpu::GemmScratch<T> s;
  s.reserve_gemm(m, n, k);
  EigenCpu::gemm<TA, TB>(s, alpha, a, b, beta, c);
  CHECK(max_abs_diff(c, expect) < (std::is_same_v<T, float> ? 1e-4 : 1e-11) * double(k));
}
}  // namespace

TEST_CASE("views: Eigen objects, raw pointers and blocks view the same memory", "[core][views]") {
  Mat<float> m = random_mat<float>(4, 6, 1);
  MatrixView<float> v = m;
  CHECK(v.data == m.data());
  CHECK(v.rows == 4);
  CHECK(v.cols == 6);
  CHECK(v.stride == 6);
  ConstMatrixView<float> cv = v;
  CHECK(cv(2, 3) == m(2, 3));
  auto blk = m.block(1, 2, 2, 3);  // a row-major block keeps the parent's row stride
  MatrixView<float> bv = blk;
  CHECK(bv.stride == 6);
  CHECK(bv(1, 2) == m(2, 4));
  Eigen::VectorXf col = Eigen::VectorXf::LinSpaced(5, 0, 4);
  ConstMatrixView<float> colv = col;
  CHECK(colv.rows == 5);
  CHECK(colv.cols == 1);
  CHECK(colv(3, 0) == 3.0f);
  const Mat<float>& cm = m;
  ConstMatrixView<float> ccv = cm;  // const Eigen objects give const views only
  CHECK(ccv.data == m.data());
  static_assert(!std::is_constructible_v<MatrixView<float>, const Mat<float>&>);
  // a column-major matrix (Eigen::MatrixXf) is refused at compile time with a message naming the fix: a
  // conversion that static_asserts, checked by the compile_fail.message.column_major_view test
  CHECK(v.row_block(1, 2)(0, 0) == m(1, 0));
  REQUIRE_THROWS_WITH(MatrixView<float>(nullptr, 2, 2), Catch::Contains("null data"));
  REQUIRE_THROWS_WITH(MatrixView<float>(m.data(), 2, 5, 4), Catch::Contains("row stride 4"));
  REQUIRE_THROWS_WITH(require_shape(cv, 3, 6, "x"), Catch::Contains("x: expected shape [3, 6], got [4, 6]"));
}

TEMPLATE_TEST_CASE("backend: gemm in all four transpose variants, Eigen and BLAS paths", "[core][gemm]", float, double) {
  using T = TestType;
  for (auto [m, n, k] : {std::tuple<peft::Index, peft::Index, peft::Index>{1, 1, 1}, {3, 5, 7}, {17, 8, 33}, {64, 64, 64}, {100, 70, 90}, {8, 130, 300}, {128, 160, 1024}}) {  // the last one is large enough for OpenBLAS
    check_gemm<Trans::no, Trans::no, T>(m, n, k, T(1), T(0));
    check_gemm<Trans::no, Trans::yes, T>(m, n, k, T(0.5), T(1));
    check_gemm<Trans::yes, Trans::no, T>(m, n, k, T(-2), T(0.25));
    check_gemm<Trans::yes, Trans::yes, T>(m, n, k, T(1), T(0));
  }
}

TEST_CASE("backend: a scratch sized for smaller products is reported, not overrun", "[core][gemm]") {
  EigenCpu::GemmScratch<float> s;
  s.reserve_gemm(4, 4, 4);
  const Mat<float> a = random_mat<float>(40, 50, 1), b = random_mat<float>(50, 8, 2);
  Mat<float> c(40, 8);
  REQUIRE_THROWS_WITH((EigenCpu::gemm<Trans::no, Trans::no, float>(s, 1.f, a, b, 0.f, c)), Catch::Contains("scratch of"));
}

TEST_CASE("backend: element-wise operations", "[core][ops]") {
  Mat<double> y = random_mat<double>(3, 4, 1);
  const Mat<double> y0 = y, x = random_mat<double>(3, 4, 2);
  const double v[4] = {1, 2, 3, 4};
  EigenCpu::add_row_vector<double>(y, v, 0.5);
  for (int j = 0; j < 4; ++j) CHECK(y(1, j) == Approx(y0(1, j) + 0.5 * v[j]));
  double s[4] = {nan<double>(), nan<double>(), nan<double>(), nan<double>()};
  EigenCpu::sum_rows<double>(x, s, 2.0, 0.0);  // beta = 0 never reads NaN
  for (int j = 0; j < 4; ++j) CHECK(s[j] == Approx(2.0 * x.col(j).sum()));
  Mat<double> z = filled<double>(3, 4, nan<double>());
  EigenCpu::axpby<double>(3.0, x, 0.0, z);
  CHECK(max_abs_diff(z, Mat<double>(3.0 * x)) == 0.0);
  EigenCpu::scale<double>(z, 0.0);
  CHECK(z.isZero());
  // dropout: same (seed, stream) → same mask; inverted scaling; about p dropped
  Mat<double> ones = filled<double>(50, 40, 1.0), d1(50, 40), d2(50, 40), d3(50, 40);
  EigenCpu::dropout<double>(ones, d1, 0.3, 7, 1);
  EigenCpu::dropout<double>(ones, d2, 0.3, 7, 1);
  EigenCpu::dropout<double>(ones, d3, 0.3, 7, 2);
  CHECK(d1 == d2);
  CHECK(d1 != d3);
  const double dropped = double((d1.array() == 0).count()) / 2000.0;
  CHECK(dropped == Approx(0.3).margin(0.05));
  CHECK(((d1.array() == 0) || ((d1.array() - 1.0 / 0.7).abs() < 1e-12)).all());
}

TEST_CASE("rng: streams are reproducible and distributions have the right moments", "[core][rng]") {
  Generator g1(42), g2(42);
  std::vector<double> a(20000), b(20000), c(20000);
  g1.normal(a.data(), a.size(), 1.0, 2.0);
  g2.normal(b.data(), b.size(), 1.0, 2.0);
  CHECK(a == b);
  g1.normal(c.data(), c.size(), 1.0, 2.0);  // the next stream differs
  CHECK(a != c);
  double mean = 0, var = 0;
  for (double x : a) mean += x;
  mean /= double(a.size());
  for (double x : a) var += (x - mean) * (x - mean);
  var /= double(a.size());
  CHECK(mean == Approx(1.0).margin(0.05));
  CHECK(std::sqrt(var) == Approx(2.0).margin(0.05));
  std::vector<float> u(10000);
  g1.uniform(u.data(), u.size(), -0.5, 0.5);
  CHECK(*std::min_element(u.begin(), u.end()) >= -0.5f);
  CHECK(*std::max_element(u.begin(), u.end()) < 0.5f);
}

TEMPLATE_TEST_CASE("linear: forward, and backward against finite differences in both weight layouts", "[core][linear][grad]", float, double) {
  using T = TestType;
  for (WeightLayout layout : {WeightLayout::out_in, WeightLayout::in_out}) {
    CAPTURE(int(layout));
    Generator g(3), gd(3);
    Linear<T> lin(7, 5, true, g, layout);
    Linear<double> twin(7, 5, true, gd, layout);
    as_mat(twin.weight()) = as_mat(ConstMatrixView<T>(lin.weight())).template cast<double>();
    as_mat(twin.bias()) = as_mat(ConstMatrixView<T>(lin.bias())).template cast<double>();
    CHECK(as_mat(ConstMatrixView<T>(lin.weight())).cwiseAbs().maxCoeff() <= T(1 / std::sqrt(7.0)));  // PyTorch's default bound
    lin.set_requires_grad(true);
    const Mat<T> x = random_mat<T>(4, 7, 5), dy = random_mat<T>(4, 5, 6);
    const Mat<double> dyd = dy.template cast<double>();
    Mat<double> xd = x.template cast<double>();
    auto ctx = lin.make_context(4);
    Mat<T> y(4, 5);
    lin.forward(ctx, x, y);
    const Mat<T> w = layout == WeightLayout::out_in ? Mat<T>(as_mat(ConstMatrixView<T>(lin.weight()))) : Mat<T>(as_mat(ConstMatrixView<T>(lin.weight())).transpose());
    const Mat<T> expect = (x * w.transpose()).rowwise() + as_mat(ConstMatrixView<T>(lin.bias())).row(0);
    CHECK(max_abs_diff(y, expect) < 10 * value_tol<T>());
    Mat<T> dx = filled<T>(4, 7, nan<T>());
    as_mat(lin.weight_grad()).setConstant(nan<T>());
    as_mat(lin.bias_grad()).setConstant(nan<T>());
    lin.backward(ctx, dy, dx, GradMode::overwrite);
    auto tctx = twin.make_context(4);
    Mat<double> yd(4, 5);
    auto loss = [&] { twin.forward(tctx, xd, yd); return dot(yd, dyd); };
    auto rx = check_gradient(xd.data(), dx.data(), std::size_t(xd.size()), loss);
    auto rw = check_gradient(twin.weight().data, lin.weight_grad().data, 35, loss);
    auto rb = check_gradient(twin.bias().data, lin.bias_grad().data, 5, loss);
    INFO(rx.str("dx") << "\n" << rw.str("dW") << "\n" << rb.str("db"));
    CHECK(rx.worst < grad_tol<T>());
    CHECK(rw.worst < grad_tol<T>());
    CHECK(rb.worst < grad_tol<T>());
    // accumulate mode adds
    const Mat<T> gw = as_mat(lin.weight_grad());
    lin.backward(ctx, dy, dx, GradMode::accumulate);
    CHECK(max_abs_diff(as_mat(lin.weight_grad()), Mat<T>(2 * gw)) < 10 * value_tol<T>());
  }
}

TEST_CASE("linear: frozen by default, copies of owned layers are deep, borrowed ones share memory", "[core][linear]") {
  Generator g(1);
  Linear<float> a(3, 2, true, g);
  CHECK_FALSE(a.requires_grad());
  int visited = 0;
  a.visit_parameters([&](const ParamRef<float>& p) {
    ++visited;
    CHECK_FALSE(p.trainable);
    CHECK(p.grad == nullptr);
  });
  CHECK(visited == 2);
  Linear<float> b = a;
  CHECK(b.weight().data != a.weight().data);
  b.weight()(0, 0) += 1;
  CHECK(b.weight()(0, 0) != a.weight()(0, 0));
  Mat<float> w = random_mat<float>(2, 3, 1);
  Linear<float> c = Linear<float>::borrow(w);
  Linear<float> d = c;
  CHECK(d.weight().data == w.data());
  CHECK_FALSE(d.has_bias());
  Mat<float> x(1, 3), y(1, 2);
  auto ctx = c.make_context(1);
  REQUIRE_THROWS_WITH(c.backward(ctx, y, x), Catch::Contains("no forward pass"));
}

TEST_CASE("contexts: one context serves every batch size up to max_batch, on both GEMM routes", "[core][gemm][context]") {
  // Eigen's block sizes are not monotonic in the batch; the context must still suffice for every size
  Generator g(2);
  Adapted<Linear<float>, Lora> l(Linear<float>(300, 260, true, g));
  LoraConfig c;
  c.r = 8;
  c.init_lora_weights = LoraInit::off;
  l.add_adapter("default", c, g);
  l.base().set_requires_grad(true);
  auto ctx = l.make_context(320);
  for (Index m : {1, 7, 31, 32, 33, 64, 255, 256, 257, 288, 289, 300, 319, 320}) {
    CAPTURE(m);
    const Mat<float> x = random_mat<float>(m, 300, 1), dy = random_mat<float>(m, 260, 2);
    Mat<float> y(m, 260), dx(m, 300);
    REQUIRE_NOTHROW(l.forward(ctx, x, y));
    REQUIRE_NOTHROW(l.backward(ctx, dy, dx));
  }
}
