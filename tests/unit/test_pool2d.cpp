// MaxPool2d: a hand-computed case, against a direct definition, finite differences (float and double,
// overwrite and accumulate modes, overlapping windows), PyTorch's tie and NaN rules, no allocation in the
// hot path, bad input.
#include <catch2/catch.hpp>

#include <atomic>
#include <cstdlib>
#include <new>
#include <peft/layer/pool2d.hpp>

#include "gradcheck.hpp"
#include "test_util.hpp"

// Counts operator new calls (not under AddressSanitizer, which owns operator new).
#include "sanitized.hpp"
#if !defined(PEFT_TEST_SANITIZED)
#define PEFT_POOL_COUNT_NEW 1
namespace {
std::atomic<long> g_news{0};
}
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void* operator new(std::size_t n) {
  ++g_news;
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
#pragma GCC diagnostic pop
#endif

using namespace peft;
using namespace peft::test;

namespace {

Pool2dGeometry pgeo(Index c, Index h, Index w, Index kh, Index kw, Index sh, Index sw) {
  Pool2dGeometry g;
  g.channels = c;
  g.in_h = h;
  g.in_w = w;
  g.kernel_h = kh;
  g.kernel_w = kw;
  g.stride_h = sh;
  g.stride_w = sw;
  return g;
}

/// The definition, in double: y[n, c, i, j] = max over the window.
Mat<double> direct_pool(const Pool2dGeometry& g, const Mat<double>& x) {
  const Index ho = g.out_h(), wo = g.out_w();
  Mat<double> y(x.rows(), g.out_size());
  for (Index n = 0; n < x.rows(); ++n)
    for (Index c = 0; c < g.channels; ++c)
      for (Index i = 0; i < ho; ++i)
        for (Index j = 0; j < wo; ++j) {
          double m = -std::numeric_limits<double>::infinity();
          for (Index a = 0; a < g.kernel_h; ++a)
            for (Index b = 0; b < g.kernel_w; ++b) m = std::max(m, x(n, (c * g.in_h + i * g.stride_h + a) * g.in_w + j * g.stride_w + b));
          y(n, (c * ho + i) * wo + j) = m;
        }
  return y;
}

/// Distinct values at least 0.01 apart in random order, so that a finite-difference step of 1e-4 never
/// changes which element of a window is the maximum.
template <class T>
Mat<T> distinct_mat(Index rows, Index cols, std::uint64_t seed) {
  const Index n = rows * cols;
  std::vector<double> key(static_cast<std::size_t>(n));
  Generator gen(seed);
  gen.uniform(key.data(), key.size(), 0.0, 1.0);
  std::vector<Index> order(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) order[std::size_t(i)] = i;
  std::sort(order.begin(), order.end(), [&](Index a, Index b) { return key[std::size_t(a)] < key[std::size_t(b)]; });
  Mat<T> m(rows, cols);
  for (Index r = 0; r < n; ++r) m.data()[order[std::size_t(r)]] = T(-1.0 + 0.01 * double(r));
  return m;
}

const std::vector<Pool2dGeometry> kGeometries = {
    pgeo(1, 4, 4, 2, 2, 2, 2),  // the classic 2×2 / 2
    pgeo(3, 7, 5, 2, 2, 2, 2),  // odd sizes: the last row and column are dropped (floor mode)
    pgeo(2, 7, 7, 3, 3, 2, 2),  // overlapping windows: one input can be the maximum of several outputs
    pgeo(2, 6, 5, 3, 2, 1, 2),  // rectangular kernel and stride
    pgeo(4, 3, 3, 3, 3, 3, 3),  // global pooling
};

}  // namespace

TEST_CASE("maxpool2d: a hand-computed case", "[pool2d]") {
  // two channels of 4×4, kernel 2, stride 2
  Mat<float> x(1, 32);
  x << 1, 2, 5, 0,  //
      3, 4, -1, 6,  //
      0, 0, 7, 8,   //
      -2, 9, 8, 1,  //
      // channel 1: all negative; a tie (two 3s) in the first window
      -5, 3, -1, -2,  //
      3, -4, -3, -9,  //
      -1, -1, -6, -7,  //
      -1, -2, -8, -6;
  MaxPool2d<float> pool(2, 4, 4, 2);
  CHECK(pool.out_features() == 8);
  auto ctx = pool.make_context(1);
  Mat<float> y(1, 8);
  pool.forward(ctx, x, y);
  Mat<float> expect(1, 8);
  expect << 4, 6, 9, 8, 3, -1, -1, -6;
  CHECK(y == expect);
  // the maxima's positions inside the image (channel offset 16 for channel 1). Ties pick the first maximum in
  // row-major window order: 8 at x[11] before x[14]; 3 at x[17] before x[20]; -1 at x[24]; -6 at x[26]
  const std::int32_t where[8] = {5, 7, 13, 11, 16 + 1, 16 + 2, 16 + 8, 16 + 10};
  for (int k = 0; k < 8; ++k) CHECK(ctx.argmax[std::size_t(k)] == where[k]);
  Mat<float> dy(1, 8);
  dy << 10, 20, 30, 40, 50, 60, 70, 80;
  Mat<float> dx = filled<float>(1, 32, nan<float>());
  pool.backward(ctx, dy, dx, GradMode::accumulate, GradMode::overwrite);
  Mat<float> dexpect = Mat<float>::Zero(1, 32);
  for (int k = 0; k < 8; ++k) dexpect(0, where[k]) = dy(0, k);
  CHECK(dx == dexpect);
}

TEST_CASE("maxpool2d: forward equals the definition", "[pool2d]") {
  for (const auto& g : kGeometries) {
    CAPTURE(g.channels, g.in_h, g.in_w, g.kernel_h, g.kernel_w, g.stride_h, g.stride_w);
    MaxPool2d<double> pool(g);
    const Mat<double> x = random_mat<double>(3, g.in_size(), 5);
    Mat<double> y(3, g.out_size());
    auto ctx = pool.make_context(4);
    pool.forward(ctx, x, y);
    CHECK(max_abs_diff(y, direct_pool(g, x)) == 0.0);
    // a smaller batch through the same context, from a strided view (the top-left block of a wider matrix)
    Mat<double> wide = random_mat<double>(2, g.in_size() + 3, 6);
    Mat<double> y2(2, g.out_size());
    pool.forward(ctx, ConstMatrixView<double>(wide.leftCols(g.in_size())), y2);
    CHECK(max_abs_diff(y2, direct_pool(g, wide.leftCols(g.in_size()))) == 0.0);
  }
}

TEMPLATE_TEST_CASE("maxpool2d: backward matches finite differences", "[pool2d][grad]", float, double) {
  using T = TestType;
  for (const auto& g : kGeometries) {
    CAPTURE(g.channels, g.in_h, g.in_w, g.kernel_h, g.kernel_w, g.stride_h, g.stride_w);
    const Index batch = 3;
    MaxPool2d<T> pool(g);
    MaxPool2d<double> twin(g);
    const Mat<T> x = distinct_mat<T>(batch, g.in_size(), 11);
    const Mat<T> dy = random_mat<T>(batch, g.out_size(), 12);
    Mat<double> xd = x.template cast<double>();
    const Mat<double> dyd = dy.template cast<double>();
    auto tctx = twin.make_context(batch);
    Mat<double> yd(batch, g.out_size());
    auto loss = [&]() -> double {
      twin.forward(tctx, xd, yd);
      return dot(yd, dyd);
    };

    auto ctx = pool.make_context(batch);
    Mat<T> y(batch, g.out_size());
    pool.forward(ctx, x, y);
    CHECK(max_abs_diff(y, direct_pool(g, xd)) == 0.0);

    Mat<T> dx = filled<T>(batch, g.in_size(), nan<T>());  // overwrite never reads dx
    pool.backward(ctx, dy, dx, GradMode::accumulate, GradMode::overwrite);
    const auto rep = check_gradient(xd.data(), dx.data(), std::size_t(xd.size()), loss);
    INFO(rep.str("dx"));
    CHECK(rep.worst < grad_tol<T>());
    CHECK(rep.checked == std::size_t(xd.size()));

    // accumulate adds on top of what is there; backward can be repeated from the same context
    Mat<T> dx2 = filled<T>(batch, g.in_size(), T(9));
    pool.backward(ctx, dy, dx2, GradMode::accumulate, GradMode::accumulate);
    CHECK(max_abs_diff(dx2, (dx.array() + T(9)).matrix()) < 1e3 * value_tol<T>());
    // an empty dx is allowed and does nothing
    pool.backward(ctx, dy, MatrixView<T>{});
  }
}

TEST_CASE("maxpool2d: overlapping windows add their gradients at a shared maximum", "[pool2d]") {
  // 1 channel, 1×5 input would not fit a 3-high kernel: use 3×5 with kernel 3, stride 1 → 1×3 outputs,
  // all three windows share the global maximum in the middle column
  MaxPool2d<double> pool(pgeo(1, 3, 5, 3, 3, 1, 1));
  Mat<double> x = Mat<double>::Zero(1, 15);
  x(0, 7) = 5.0;  // row 1, col 2
  auto ctx = pool.make_context(1);
  Mat<double> y(1, 3);
  pool.forward(ctx, x, y);
  CHECK(y == Mat<double>::Constant(1, 3, 5.0));
  Mat<double> dy(1, 3);
  dy << 1, 2, 4;
  Mat<double> dx(1, 15);
  pool.backward(ctx, dy, dx);
  CHECK(dx(0, 7) == 7.0);
  CHECK(dx.sum() == 7.0);
}

TEST_CASE("maxpool2d: NaN propagates as in PyTorch (the last NaN of a window wins)", "[pool2d]") {
  // 2×4 input, two 2×2 windows: {1, NaN, NaN, 6} and {3, 4, 7, NaN}; the same through the unrolled 2×2
  // path and the general path (a 2×2 kernel with stride 1 has a third window, {NaN, 3, 6, 7})
  Mat<float> x(1, 8);
  x << 1, nan<float>(), 3, 4,  //
      nan<float>(), 6, 7, nan<float>();
  {
    MaxPool2d<float> pool(1, 2, 4, 2);
    auto ctx = pool.make_context(1);
    Mat<float> y(1, 2);
    pool.forward(ctx, x, y);
    CHECK(std::isnan(y(0, 0)));
    CHECK(std::isnan(y(0, 1)));
    CHECK(ctx.argmax[0] == 4);
    CHECK(ctx.argmax[1] == 7);
  }
  {
    MaxPool2d<float> pool(pgeo(1, 2, 4, 2, 2, 1, 1));
    auto ctx = pool.make_context(1);
    Mat<float> y(1, 3);
    pool.forward(ctx, x, y);
    CHECK(std::isnan(y(0, 0)));
    CHECK(std::isnan(y(0, 1)));
    CHECK(std::isnan(y(0, 2)));
    CHECK(ctx.argmax[0] == 4);
    CHECK(ctx.argmax[1] == 1);
    CHECK(ctx.argmax[2] == 7);
  }
}

#if PEFT_POOL_COUNT_NEW
TEST_CASE("maxpool2d: forward and backward allocate nothing after make_context", "[pool2d][alloc]") {
  MaxPool2d<float> pool(16, 28, 28, 2);
  auto ctx = pool.make_context(64);
  const Mat<float> x = random_mat<float>(64, pool.in_features(), 1);
  Mat<float> y(64, pool.out_features()), dy = random_mat<float>(64, pool.out_features(), 2), dx(64, pool.in_features());
  const long before = g_news.load();
  pool.forward(ctx, x, y);
  pool.backward(ctx, dy, dx);
  pool.forward(ctx, ConstMatrixView<float>(x.topRows(7)), MatrixView<float>(y.topRows(7)));
  pool.backward(ctx, ConstMatrixView<float>(dy.topRows(7)), MatrixView<float>(dx.topRows(7)), GradMode::accumulate, GradMode::accumulate);
  CHECK(g_news.load() == before);
}
#endif

TEST_CASE("maxpool2d: bad input names the tensor and shapes", "[pool2d][errors]") {
  using Catch::Matchers::Contains;
  // impossible geometries
  CHECK_THROWS_WITH(MaxPool2d<float>(0, 4, 4, 2), Contains("channels must be positive"));
  CHECK_THROWS_WITH(MaxPool2d<float>(1, 0, 4, 2), Contains("input size must be positive"));
  CHECK_THROWS_WITH(MaxPool2d<float>(1, 4, 4, 0), Contains("kernel must be positive"));
  CHECK_THROWS_WITH(MaxPool2d<float>(1, 4, 4, 5), Contains("a 5x5 window does not fit a 4x4 input"));
  CHECK_THROWS_WITH(MaxPool2d<float>(pgeo(1, 4, 4, 2, 2, 0, 1)), Contains("stride must be positive"));
  CHECK_THROWS_AS(MaxPool2d<float>(1, 4, 4, 5), ShapeError);

  MaxPool2d<float> pool(2, 4, 4, 2);
  CHECK_THROWS_WITH(pool.make_context(0), Contains("max_batch must be positive"));
  auto ctx = pool.make_context(2);
  Mat<float> x = random_mat<float>(2, 32, 1), y(2, 8);
  // backward before forward
  Mat<float> dy(2, 8), dx(2, 32);
  CHECK_THROWS_AS(pool.backward(ctx, dy, dx), StateError);
  CHECK_THROWS_WITH(pool.backward(ctx, dy, dx), Contains("holds no forward pass"));
  // wrong input width
  Mat<float> xbad(2, 31);
  CHECK_THROWS_WITH(pool.forward(ctx, xbad, y), Contains("x has 31 values per image, the layer expects C·H·W = 2·4·4 = 32"));
  // batch above max_batch
  Mat<float> x3(3, 32), y3(3, 8);
  CHECK_THROWS_WITH(pool.forward(ctx, x3, y3), Contains("batch 3 exceeds the context's max_batch 2"));
  // wrong output shape
  Mat<float> ybad(2, 9);
  CHECK_THROWS_WITH(pool.forward(ctx, x, ybad), Contains("y: expected shape [2, 8]"));
  CHECK_THROWS_AS(pool.forward(ctx, x, ybad), ShapeError);
  // y overlapping x
  CHECK_THROWS_WITH(pool.forward(ctx, x, MatrixView<float>(x.data(), 2, 8)), Contains("y overlaps x"));
  // a context of another layer
  MaxPool2d<float> other(2, 6, 6, 2);
  auto octx = other.make_context(2);
  CHECK_THROWS_AS(pool.forward(octx, x, y), StateError);
  MaxPool2d<float>::Context blank;
  CHECK_THROWS_AS(pool.forward(blank, x, y), StateError);

  pool.forward(ctx, x, y);
  Mat<float> dybad(2, 7), dxbad(2, 30), dy1(1, 8);
  CHECK_THROWS_WITH(pool.backward(ctx, dybad, dx), Contains("dy: expected shape [2, 8], got [2, 7]"));
  CHECK_THROWS_WITH(pool.backward(ctx, dy1, dx), Contains("dy: expected shape [2, 8], got [1, 8]"));
  CHECK_THROWS_WITH(pool.backward(ctx, dy, dxbad), Contains("dx: expected shape [2, 32], got [2, 30]"));
  CHECK_THROWS_AS(pool.backward(octx, dy, dx), StateError);
}
