// Mixed-adapter batches (PEFT's adapter_names=): Adapted::forward_mixed / backward_mixed. Each row must equal
// that row run alone with only its adapter active; the backward is checked by finite differences (float
// against a double twin, and double) and against per-row backward passes; bad input; no allocation.
#include <catch2/catch.hpp>

#include <atomic>
#include <cstdlib>
#include <new>
#include <peft/peft.hpp>

#include "gradcheck.hpp"
#include "test_util.hpp"

#include "alloc_count.hpp"

using namespace peft;
using namespace peft::test;

namespace {

template <class T>
using Layer = Adapted<Linear<T>, Lora, Loha, Lokr>;

/// A layer with four non-identity adapters: LoRA "a" (r 3), LoRA "b" (r 2, rsLoRA, dropout `p`), LoHa "h",
/// LoKr "k". The same numbers for float and double (drawn in double).
template <class T>
Layer<T> make_layer(Index in, Index out, double p = 0.0) {
  Generator g(5);
  Layer<T> l(Linear<T>(in, out, true, g), "lin");
  LoraConfig a;
  a.r = 3;
  a.lora_alpha = 6;
  a.init_lora_weights = LoraInit::off;
  l.add_adapter("a", a, g);
  LoraConfig b;
  b.r = 2;
  b.lora_alpha = 5;
  b.use_rslora = true;
  b.lora_dropout = p;
  b.init_lora_weights = LoraInit::off;
  l.add_adapter("b", b, g);
  LohaConfig h;
  h.r = 2;
  h.alpha = 3;
  h.init_weights = false;
  l.add_adapter("h", h, g);
  LokrConfig k;
  k.r = 2;
  k.alpha = 3;
  k.init_weights = LokrInit::off;
  l.add_adapter("k", k, g);
  return l;
}

template <class L>
std::vector<ParamRef<typename L::scalar>> params_of(L& l) {
  std::vector<ParamRef<typename L::scalar>> out;
  l.visit_parameters([&](ParamRef<typename L::scalar> p) { out.push_back(std::move(p)); });
  return out;
}

const std::vector<std::string> row_names{"a", "__base__", "b", "a", "h", "k", "b", "__base__", "h"};

}  // namespace

TEMPLATE_TEST_CASE("forward_mixed: each row equals the row run alone with its adapter", "[mixed]", float, double) {
  using T = TestType;
  auto l = make_layer<T>(6, 5);
  l.eval();
  const Index n = Index(row_names.size());
  const Mat<T> x = random_mat<T>(n, 6, 11);
  const auto idx = l.adapter_indices(row_names);
  CHECK(idx == std::vector<int>{0, -1, 1, 0, 2, 3, 1, -1, 2});
  auto ctx = l.make_context(n, mixed_batches);
  Mat<T> y(n, 5);
  l.forward_mixed(ctx, x, y, idx);
  auto one = l.make_context(1);
  double worst = 0;
  for (Index i = 0; i < n; ++i) {
    const Mat<T> xi = x.row(i);
    Mat<T> yi(1, 5);
    if (row_names[std::size_t(i)] == "__base__") {
      l.disable_adapters();
      l.forward(one, xi, yi);
      l.enable_adapters();
    } else {
      l.set_adapter(row_names[std::size_t(i)]);
      l.forward(one, xi, yi);
    }
    worst = std::max(worst, max_abs_diff(y.row(i), yi));
  }
  CHECK(worst < 10 * value_tol<T>());
  // the rows differ: every adapter does something
  l.disable_adapters();
  Mat<T> y0(n, 5);
  auto c0 = l.make_context(n);
  l.forward(c0, x, y0);
  for (Index i = 0; i < n; ++i) {
    if (row_names[std::size_t(i)] == "__base__") CHECK(max_abs_diff(y.row(i), y0.row(i)) == 0);
    else CHECK(max_abs_diff(y.row(i), y0.row(i)) > 1e-3);
  }
  // disabled adapters: every row is the base output, as PEFT
  Mat<T> yd(n, 5);
  l.forward_mixed(ctx, x, yd, idx);
  CHECK(max_abs_diff(yd, y0) == 0);
}

TEMPLATE_TEST_CASE("backward_mixed equals per-row backward passes", "[mixed]", float, double) {
  using T = TestType;
  auto l = make_layer<T>(6, 5);
  l.eval();
  const Index n = Index(row_names.size());
  const Mat<T> x = random_mat<T>(n, 6, 21), dy = random_mat<T>(n, 5, 22);
  const auto idx = l.adapter_indices(row_names);
  for (const auto& name : l.adapter_names()) l.set_requires_grad(name, true);
  auto ctx = l.make_context(n, mixed_batches);
  Mat<T> y(n, 5), dx = Mat<T>::Constant(n, 6, nan<T>());
  for (auto& p : params_of(l))
    if (p.trainable) std::fill(p.grad, p.grad + p.size, nan<T>());
  l.forward_mixed(ctx, x, y, idx);
  l.backward_mixed(ctx, dy, dx, GradMode::overwrite, GradMode::overwrite);
  std::vector<std::vector<double>> mixed;
  for (auto& p : params_of(l)) mixed.push_back(p.trainable ? std::vector<double>(p.grad, p.grad + p.size) : std::vector<double>{});

  // reference: each row alone, accumulating
  l.zero_grad();
  auto one = l.make_context(1);
  Mat<T> dx_ref(n, 6);
  for (Index i = 0; i < n; ++i) {
    const Mat<T> xi = x.row(i), dyi = dy.row(i);
    Mat<T> yi(1, 5), dxi(1, 6);
    const auto& nm = row_names[std::size_t(i)];
    if (nm == "__base__") l.disable_adapters();
    else l.set_adapter(nm);
    for (const auto& name : l.adapter_names()) l.set_requires_grad(name, true);
    l.forward(one, xi, yi);
    l.backward(one, dyi, dxi, GradMode::accumulate, GradMode::overwrite);
    l.enable_adapters();
    dx_ref.row(i) = dxi;
  }
  CHECK(max_abs_diff(dx, dx_ref) < 10 * value_tol<T>());
  auto ps = params_of(l);
  REQUIRE(ps.size() == mixed.size());
  for (std::size_t k = 0; k < ps.size(); ++k) {
    INFO(ps[k].name);
    if (!ps[k].trainable) continue;
    double e = 0;
    for (std::size_t j = 0; j < ps[k].size; ++j) e = std::max(e, std::abs(mixed[k][j] - double(ps[k].grad[j])));
    CHECK(e < 10 * value_tol<T>());
  }
}

TEMPLATE_TEST_CASE("backward_mixed: finite differences, overwrite and accumulate", "[mixed][gradcheck]", float, double) {
  using T = TestType;
  for (double p : {0.0, 0.3}) {
    INFO("dropout " << p);
    auto l = make_layer<T>(6, 5, p);
    auto twin = make_layer<double>(6, 5, p);
    l.train();
    twin.train();
    for (const auto& name : l.adapter_names()) {
      l.set_requires_grad(name, true);
      twin.set_requires_grad(name, true);
    }
    auto lp = params_of(l);
    auto tp = params_of(twin);
    REQUIRE(lp.size() == tp.size());
    for (std::size_t i = 0; i < lp.size(); ++i)
      for (std::size_t k = 0; k < lp[i].size; ++k) tp[i].value[k] = double(lp[i].value[k]);
    const Index n = Index(row_names.size());
    const Mat<T> x = random_mat<T>(n, 6, 31), dy = random_mat<T>(n, 5, 32);
    Mat<double> xd = x.template cast<double>();
    const Mat<double> dyd = dy.template cast<double>();
    const auto idx = l.adapter_indices(row_names);
    auto tctx = twin.make_context(n, mixed_batches);
    Mat<double> yd(n, 5);
    auto loss = [&]() -> double {
      twin.set_seed(77);
      twin.forward_mixed(tctx, xd, yd, idx);
      return dot(yd, dyd);
    };
    auto ctx = l.make_context(n, mixed_batches);
    Mat<T> y(n, 5);
    // overwrite: NaN-filled gradients must all be assigned
    for (auto& r : lp)
      if (r.trainable) std::fill(r.grad, r.grad + r.size, nan<T>());
    Mat<T> dx = Mat<T>::Constant(n, 6, nan<T>());
    l.set_seed(77);
    l.forward_mixed(ctx, x, y, idx);
    loss();
    CHECK(max_abs_diff(y, yd) < 100 * value_tol<T>());
    l.backward_mixed(ctx, dy, dx, GradMode::overwrite, GradMode::overwrite);
    const GradReport rx = check_gradient(xd.data(), dx.data(), std::size_t(dx.size()), loss);
    INFO(rx.str("dx"));
    CHECK(rx.worst < grad_tol<T>());
    CHECK(rx.checked == std::size_t(dx.size()));
    for (std::size_t i = 0; i < lp.size(); ++i) {
      if (!lp[i].trainable) continue;
      const GradReport r = check_gradient(tp[i].value, lp[i].grad, lp[i].size, loss);
      INFO(r.str(lp[i].name));
      CHECK(r.worst < grad_tol<T>());
    }
    // accumulate: a second backward adds the same amount to the parameters and, with input = accumulate, to dx
    std::vector<std::vector<double>> g1;
    for (auto& r : lp) g1.push_back(r.trainable ? std::vector<double>(r.grad, r.grad + r.size) : std::vector<double>{});
    const Mat<T> dx1 = dx;
    l.backward_mixed(ctx, dy, dx, GradMode::accumulate, GradMode::accumulate);
    CHECK(max_abs_diff(dx, (2 * dx1.template cast<double>()).eval()) < 10 * value_tol<T>());
    for (std::size_t i = 0; i < lp.size(); ++i) {
      if (!lp[i].trainable) continue;
      double e = 0;
      for (std::size_t k = 0; k < lp[i].size; ++k) e = std::max(e, std::abs(double(lp[i].grad[k]) - 2 * g1[i][k]));
      CHECK(e < 10 * value_tol<T>());
    }
  }
}

TEST_CASE("forward_mixed on Conv2d: rows are images", "[mixed]") {
  Conv2dGeometry geo;
  geo.in_channels = 2;
  geo.out_channels = 3;
  geo.kernel_h = geo.kernel_w = 3;
  geo.pad_h = geo.pad_w = 1;
  geo.in_h = geo.in_w = 4;
  Generator g(9);
  Adapted<Conv2d<double>, Lora> c(Conv2d<double>(geo, true, g), "conv");
  LoraConfig a;
  a.r = 2;
  a.init_lora_weights = LoraInit::off;
  c.add_adapter("a", a, g);
  a.r = 3;
  c.add_adapter("b", a, g);
  c.eval();
  const Mat<double> x = random_mat<double>(3, c.in_features(), 3);
  auto ctx = c.make_context(3, mixed_batches);
  Mat<double> y(3, c.out_features());
  c.forward_mixed(ctx, x, y, c.adapter_indices({"b", "__base__", "a"}));
  auto one = c.make_context(1);
  for (Index i = 0; i < 3; ++i) {
    const Mat<double> xi = x.row(i);
    Mat<double> yi(1, c.out_features());
    if (i == 1) c.disable_adapters();
    else c.set_adapter(i == 0 ? "b" : "a");
    c.forward(one, xi, yi);
    c.enable_adapters();
    CHECK(max_abs_diff(y.row(i), yi) < 1e-12);
  }
}

TEST_CASE("mixed batches: bad input", "[mixed]") {
  auto l = make_layer<float>(6, 5);
  l.eval();
  const Mat<float> x = random_mat<float>(3, 6, 1);
  Mat<float> y(3, 5), dx(3, 6);
  auto plain = l.make_context(3);
  auto ctx = l.make_context(3, mixed_batches);
  const auto idx = l.adapter_indices({"a", "b", "__base__"});
  CHECK_THROWS_WITH(l.adapter_indices({"a", "nope"}), Catch::Contains("Adapter nope does not exist") && Catch::Contains("'a', 'b', 'h', 'k'"));
  CHECK(l.adapter_indices({"a", "nope"}, true) == std::vector<int>{0, -1});
  CHECK_THROWS_AS(l.forward_mixed(plain, x, y, idx), StateError);
  CHECK_THROWS_AS(l.forward_mixed(ctx, x, y, std::vector<int>{0, 1}), ShapeError);
  CHECK_THROWS_WITH(l.forward_mixed(ctx, x, y, std::vector<int>{0, 4, -1}), Catch::Contains("index 4 out of range"));
  // backward that does not match the forward
  l.forward(ctx, x, y);
  CHECK_THROWS_WITH(l.backward_mixed(ctx, y, dx), Catch::Contains("not forward_mixed"));
  l.forward_mixed(ctx, x, y, idx);
  CHECK_THROWS_WITH(l.backward(ctx, y, dx), Catch::Contains("use backward_mixed"));
  // merged adapters
  l.set_adapter("a");
  l.merge();
  CHECK_THROWS_WITH(l.forward_mixed(ctx, x, y, idx), Catch::Contains("'a' is merged"));
  l.unmerge();
  // a stale context
  Generator g(1);
  LoraConfig dora;
  dora.use_dora = true;
  l.add_adapter("d", dora, g);
  CHECK_THROWS_AS(l.forward_mixed(ctx, x, y, idx), StateError);
  auto ctx2 = l.make_context(3, mixed_batches);
  CHECK_THROWS_WITH(l.forward_mixed(ctx2, x, y, l.adapter_indices({"d", "a", "a"})), Catch::Contains("'d' uses DoRA"));
  // scaling adapters
  Adapted<Linear<float>, Lora, Ia3> s(Linear<float>(6, 5, true, g), "s");
  s.add_adapter("l", LoraConfig{}, g);
  s.add_adapter("i", Ia3Config{}, g);
  auto sc = s.make_context(3, mixed_batches);
  CHECK_THROWS_WITH(s.forward_mixed(sc, x, y, s.adapter_indices({"l", "i", "l"})), Catch::Contains("'i' scales the layer"));
  s.forward_mixed(sc, x, y, s.adapter_indices({"l", "__base__", "l"}));  // the LoRA rows alone are fine
}

TEST_CASE("forward_mixed / backward_mixed allocate nothing after make_context", "[mixed][alloc]") {
  if (!alloc_counting) {
    WARN("allocation counting is off in sanitizer builds");
    return;
  }
  {  // the counter sees allocations
    std::vector<int>* v = nullptr;
    void* m = nullptr;
    const auto c = count_allocations([&] {
      v = new std::vector<int>(100);
      m = std::malloc(64);
    });
    delete v;
    std::free(m);
    CHECK(c.total() >= 3);
  }
  for (Index width : {64, 512}) {
    auto l = make_layer<float>(width, width, 0.1);
    l.train();
    for (const auto& name : l.adapter_names()) l.set_requires_grad(name, true);
    const Index n = 96;
    std::vector<std::string> names;
    for (Index i = 0; i < n; ++i) names.push_back(row_names[std::size_t(i) % row_names.size()]);
    const auto idx = l.adapter_indices(names);
    const Mat<float> x = random_mat<float>(n, width, 4), dy = random_mat<float>(n, width, 5);
    Mat<float> y(n, width), dx(n, width);
    auto ctx = l.make_context(n, mixed_batches);
    l.forward_mixed(ctx, x, y, idx);  // warm-up (nothing is lazily allocated, but be fair to the libraries)
    l.backward_mixed(ctx, dy, dx);
    const auto c = count_allocations([&] {
      for (int rep = 0; rep < 3; ++rep) {
        l.forward_mixed(ctx, x, y, idx);
        l.backward_mixed(ctx, dy, dx, GradMode::overwrite);
        l.forward_mixed(ctx, x.topRows(n / 2), y.topRows(n / 2), std::span<const int>(idx.data(), std::size_t(n / 2)));
      }
    });
    INFO("width " << width);
    CHECK(c.total() == 0);
  }
}
