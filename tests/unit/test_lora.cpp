// LoRA on Linear: gradients against finite differences, PEFT's properties, merge/unmerge, bad input.
#include <catch2/catch.hpp>

#include "gradcheck.hpp"
#include "test_util.hpp"

using namespace peft;
using namespace peft::test;

namespace {

template <class T>
using LoraLinear = Adapted<Linear<T>, Lora>;

struct Case {
  peft::Index m, in, out;
  int r;
  double alpha;
  bool rslora = false, lora_bias = false, fifo = false;
  double dropout = 0.0;
};

LoraConfig config_of(const Case& c, LoraInit init = LoraInit::off) {
  LoraConfig cfg;
  cfg.r = c.r;
  cfg.lora_alpha = c.alpha;
  cfg.use_rslora = c.rslora;
  cfg.lora_bias = c.lora_bias;
  cfg.fan_in_fan_out = c.fifo;
  cfg.lora_dropout = c.dropout;
  cfg.init_lora_weights = init;
  return cfg;
}

/// A LoRA layer with non-identity init (PEFT's init_lora_weights=False), identical numbers for float and
/// double up to rounding.
template <class T>
LoraLinear<T> make_layer(const Case& c, std::uint64_t seed = 11, LoraInit init = LoraInit::off) {
  Generator gen(seed);
  LoraLinear<T> l(Linear<T>(c.in, c.out, true, gen, c.fifo ? WeightLayout::in_out : WeightLayout::out_in));
  l.add_adapter("default", config_of(c, init), gen);
  return l;
}

template <class T>
Mat<T> run_forward(LoraLinear<T>& l, const Mat<T>& x, std::uint64_t seed = 5) {
  Mat<T> y(x.rows(), l.out_features());
  auto ctx = l.make_context(x.rows());
  l.set_seed(seed);
  l.forward(ctx, x, y);
  return y;
}

}  // namespace

TEMPLATE_TEST_CASE("lora: backward matches finite differences", "[lora][grad]", float, double) {
  using T = TestType;
  const Case c = GENERATE(Case{4, 6, 5, 2, 4.0}, Case{7, 16, 9, 8, 16.0}, Case{3, 5, 12, 4, 8.0, true},
                          Case{5, 8, 6, 3, 6.0, false, true}, Case{6, 9, 7, 4, 8.0, false, false, true},
                          Case{8, 10, 6, 4, 8.0, false, true, false, 0.25}, Case{1, 33, 17, 16, 32.0, true, true, true, 0.5});
  CAPTURE(c.m, c.in, c.out, c.r, c.alpha, c.rslora, c.lora_bias, c.fifo, c.dropout);

  auto layer = make_layer<T>(c);
  auto twin = make_layer<double>(c);  // finite differences are taken on the double twin
  const Mat<T> x = random_mat<T>(c.m, c.in, 1);
  const Mat<T> dy = random_mat<T>(c.m, c.out, 2);
  Mat<double> xd = x.template cast<double>();
  const Mat<double> dyd = dy.template cast<double>();
  // the twin's parameters are set to the float-rounded values so both compute the same function
  auto& ad = lora_adapter(twin, "default");
  const auto& at = lora_adapter(layer, "default");
  for (std::size_t i = 0; i < ad.a.size(); ++i) ad.a[i] = double(at.a[i]);
  for (std::size_t i = 0; i < ad.b.size(); ++i) ad.b[i] = double(at.b[i]);
  for (std::size_t i = 0; i < ad.bias.size(); ++i) ad.bias[i] = double(at.bias[i]);
  as_mat(twin.base().weight()) = as_mat(ConstMatrixView<T>(layer.base().weight())).template cast<double>();
  as_mat(twin.base().bias()) = as_mat(ConstMatrixView<T>(layer.base().bias())).template cast<double>();

  auto ctx_d = twin.make_context(c.m);
  Mat<double> yd(c.m, c.out);
  auto loss = [&]() -> double {
    twin.set_seed(99);  // the same dropout mask on every evaluation
    twin.forward(ctx_d, xd, yd);
    return dot(yd, dyd);
  };

  auto ctx = layer.make_context(c.m);
  Mat<T> y(c.m, c.out);
  layer.set_seed(99);
  layer.forward(ctx, x, y);
  CHECK(max_abs_diff(y, (loss(), yd)) < 100 * value_tol<T>());

  // overwrite mode: pre-fill every gradient with NaN, so an entry backward forgets to assign is caught
  auto& a = lora_adapter(layer, "default");
  for (auto* buf : {&a.grad_a, &a.grad_b, &a.grad_bias})
    for (std::size_t i = 0; i < buf->size(); ++i) (*buf)[i] = nan<T>();
  Mat<T> dx = filled<T>(c.m, c.in, nan<T>());
  layer.backward(ctx, dy, dx, GradMode::overwrite, GradMode::overwrite);

  const double h = 1e-4;
  auto rA = check_gradient(ad.a.data(), a.grad_a.data(), ad.a.size(), loss, h);
  auto rB = check_gradient(ad.b.data(), a.grad_b.data(), ad.b.size(), loss, h);
  auto rX = check_gradient(xd.data(), dx.data(), std::size_t(xd.size()), loss, h);
  INFO(rA.str("dA") << "\n" << rB.str("dB") << "\n" << rX.str("dx"));
  CHECK(rA.worst < grad_tol<T>());
  CHECK(rB.worst < grad_tol<T>());
  CHECK(rX.worst < grad_tol<T>());
  if (c.lora_bias) {
    auto rb = check_gradient(ad.bias.data(), a.grad_bias.data(), ad.bias.size(), loss, h);
    INFO(rb.str("dbias"));
    CHECK(rb.worst < grad_tol<T>());
  }

  SECTION("accumulate mode adds to what is there; dx accumulates on request") {
    const Mat<T> dA = as_mat(a.grad_A()), dB = as_mat(a.grad_B());
    const Mat<T> dx1 = dx;
    a.grad_a.zero();
    for (std::size_t i = 0; i < a.grad_a.size(); ++i) a.grad_a[i] = T(1.5);
    for (std::size_t i = 0; i < a.grad_b.size(); ++i) a.grad_b[i] = T(-0.5);
    Mat<T> dx2 = filled<T>(c.m, c.in, T(9));
    layer.backward(ctx, dy, dx2, GradMode::accumulate, GradMode::accumulate);
    CHECK(max_abs_diff(as_mat(a.grad_A()), (dA.array() + T(1.5)).matrix()) < 10 * value_tol<T>());
    CHECK(max_abs_diff(as_mat(a.grad_B()), (dB.array() - T(0.5)).matrix()) < 10 * value_tol<T>());
    CHECK(max_abs_diff(dx2, (dx1.array() + T(9)).matrix()) < 10 * value_tol<T>());
  }
  SECTION("the frozen base weight gets no gradient and backward can be repeated") {
    REQUIRE_FALSE(layer.base().requires_grad());
    CHECK(layer.base().weight_grad().empty());
    Mat<T> dx2(c.m, c.in);
    layer.backward(ctx, dy, dx2, GradMode::overwrite);
    CHECK(max_abs_diff(dx2, dx) == 0.0);
  }
}

TEMPLATE_TEST_CASE("lora: full fine-tuning of the base layer gets dW and db", "[lora][grad]", float, double) {
  using T = TestType;
  const Case c{5, 7, 6, 2, 4.0};
  auto layer = make_layer<T>(c);
  layer.base().set_requires_grad(true);
  auto twin = make_layer<double>(c);
  as_mat(twin.base().weight()) = as_mat(ConstMatrixView<T>(layer.base().weight())).template cast<double>();
  as_mat(twin.base().bias()) = as_mat(ConstMatrixView<T>(layer.base().bias())).template cast<double>();
  auto& ad = lora_adapter(twin, "default");
  const auto& at = lora_adapter(layer, "default");
  for (std::size_t i = 0; i < ad.a.size(); ++i) ad.a[i] = double(at.a[i]);
  for (std::size_t i = 0; i < ad.b.size(); ++i) ad.b[i] = double(at.b[i]);
  const Mat<T> x = random_mat<T>(c.m, c.in, 3), dy = random_mat<T>(c.m, c.out, 4);
  const Mat<double> xd = x.template cast<double>(), dyd = dy.template cast<double>();
  auto ctx_d = twin.make_context(c.m);
  Mat<double> yd(c.m, c.out);
  auto loss = [&] { twin.forward(ctx_d, xd, yd); return dot(yd, dyd); };
  auto ctx = layer.make_context(c.m);
  Mat<T> y(c.m, c.out);
  layer.forward(ctx, x, y);
  as_mat(layer.base().weight_grad()).setConstant(nan<T>());
  as_mat(layer.base().bias_grad()).setConstant(nan<T>());
  layer.backward(ctx, dy, MatrixView<T>{}, GradMode::overwrite);
  auto rW = check_gradient(twin.base().weight().data, layer.base().weight_grad().data, std::size_t(c.in * c.out), loss);
  auto rb = check_gradient(twin.base().bias().data, layer.base().bias_grad().data, std::size_t(c.out), loss);
  INFO(rW.str("dW") << "\n" << rb.str("db"));
  CHECK(rW.worst < grad_tol<T>());
  CHECK(rb.worst < grad_tol<T>());
}

TEMPLATE_TEST_CASE("lora: two active adapters sum, and each backward matches finite differences", "[lora][grad][multi]", float, double) {
  using T = TestType;
  Generator gen(3);
  LoraLinear<T> l(Linear<T>(8, 6, true, gen));
  LoraConfig ca = config_of(Case{0, 0, 0, 4, 8.0}), cb = config_of(Case{0, 0, 0, 2, 4.0, true});
  l.add_adapter("a", ca, gen);
  l.add_adapter("b", cb, gen);
  CHECK(l.active_adapters() == std::vector<std::string>{"a"});
  const Mat<T> x = random_mat<T>(5, 8, 7), dy = random_mat<T>(5, 6, 8);
  auto ctx = l.make_context(5);
  Mat<T> ya(5, 6), yb(5, 6), yab(5, 6), y0(5, 6);
  l.forward(ctx, x, ya);
  l.set_adapter("b");
  l.forward(ctx, x, yb);
  l.set_adapter(std::vector<std::string>{"a", "b"});
  l.forward(ctx, x, yab);
  l.disable_adapters();
  l.forward(ctx, x, y0);
  l.enable_adapters();
  CHECK(max_abs_diff(yab - y0, (ya - y0) + (yb - y0)) < 10 * value_tol<T>());
  CHECK(max_abs_diff(ya, yb) > 1e-3);

  // both adapters are trainable when both are active; check both gradients against differences on a double twin
  Generator gen_d(3);
  LoraLinear<double> twin(Linear<double>(8, 6, true, gen_d));
  twin.add_adapter("a", ca, gen_d);
  twin.add_adapter("b", cb, gen_d);
  twin.set_adapter(std::vector<std::string>{"a", "b"});
  for (const char* n : {"a", "b"}) {
    auto& d = lora_adapter(twin, n);
    const auto& f = lora_adapter(l, n);
    for (std::size_t i = 0; i < d.a.size(); ++i) d.a[i] = double(f.a[i]);
    for (std::size_t i = 0; i < d.b.size(); ++i) d.b[i] = double(f.b[i]);
  }
  as_mat(twin.base().weight()) = as_mat(ConstMatrixView<T>(l.base().weight())).template cast<double>();
  as_mat(twin.base().bias()) = as_mat(ConstMatrixView<T>(l.base().bias())).template cast<double>();
  const Mat<double> xd = x.template cast<double>(), dyd = dy.template cast<double>();
  auto ctx_d = twin.make_context(5);
  Mat<double> yd(5, 6);
  auto loss = [&] { twin.forward(ctx_d, xd, yd); return dot(yd, dyd); };
  l.forward(ctx, x, yab);
  l.backward(ctx, dy, MatrixView<T>{}, GradMode::overwrite);
  for (const char* n : {"a", "b"}) {
    auto rA = check_gradient(lora_adapter(twin, n).a.data(), lora_adapter(l, n).grad_a.data(), lora_adapter(l, n).a.size(), loss);
    auto rB = check_gradient(lora_adapter(twin, n).b.data(), lora_adapter(l, n).grad_b.data(), lora_adapter(l, n).b.size(), loss);
    INFO(n << ": " << rA.str("dA") << " / " << rB.str("dB"));
    CHECK(rA.worst < grad_tol<T>());
    CHECK(rB.worst < grad_tol<T>());
  }
}

TEMPLATE_TEST_CASE("lora: PEFT's properties", "[lora][props]", float, double) {
  using T = TestType;
  const Case c{6, 12, 10, 4, 8.0};
  const Mat<T> x = random_mat<T>(c.m, c.in, 21);
  Generator gen(4);
  Linear<T> plain(c.in, c.out, true, gen);
  Mat<T> y_base(c.m, c.out);
  {
    auto ctx = plain.make_context(c.m);
    plain.forward(ctx, x, y_base);
  }

  SECTION("identity at initialisation: standard and gaussian init give the base output exactly") {
    for (LoraInit init : {LoraInit::standard, LoraInit::gaussian}) {
      Generator g(9);
      LoraLinear<T> l(plain);
      LoraConfig cfg = config_of(c, init);
      l.add_adapter("default", cfg, g);
      CHECK(run_forward(l, x) == y_base);
      const auto& a = lora_adapter(l, "default");
      CHECK(as_mat(a.B()).cwiseAbs().maxCoeff() == T(0));
      CHECK(as_mat(a.A()).cwiseAbs().maxCoeff() > T(0));
      if (init == LoraInit::standard) CHECK(as_mat(a.A()).cwiseAbs().maxCoeff() <= T(1.0 / std::sqrt(double(c.in))));
    }
  }
  SECTION("init off (PEFT's False) is not the identity, and the adapter's delta is s·B·A") {
    LoraLinear<T> l(plain);
    Generator g(9);
    l.add_adapter("default", config_of(c), g);
    const Mat<T> y = run_forward(l, x);
    CHECK(max_abs_diff(y, y_base) > 1e-3);
    const auto& a = lora_adapter(l, "default");
    CHECK(a.scaling == T(2));
    Mat<T> delta(c.out, c.in);
    l.delta_weight("default", delta);
    const Mat<T> expect = T(2) * as_mat(a.B()) * as_mat(a.A());
    CHECK(max_abs_diff(delta, expect) < 10 * value_tol<T>());
    // y − base = x ΔWᵀ
    CHECK(max_abs_diff(y - y_base, x * delta.transpose()) < 20 * value_tol<T>());
  }
  SECTION("rsLoRA scales by alpha/sqrt(r); rank_pattern and alpha_pattern follow the module path") {
    LoraConfig cfg = config_of(Case{0, 0, 0, 4, 8.0, true});
    cfg.rank_pattern = {{"q_proj", 2}};
    cfg.alpha_pattern = {{"layers\\.1\\.q_proj", 3.0}};
    LoraLinear<T> l(plain, "model.layers.1.q_proj");
    Generator g(1);
    l.add_adapter("default", cfg, g);
    const auto& a = lora_adapter(l, "default");
    CHECK(a.r == 2);
    CHECK(a.scaling == Approx(3.0 / std::sqrt(2.0)));
    LoraLinear<T> other(plain, "model.layers.1.k_proj");
    other.add_adapter("default", cfg, g);
    CHECK(lora_adapter(other, "default").r == 4);
    CHECK(lora_adapter(other, "default").scaling == Approx(8.0 / 2.0));
    LoraLinear<T> suffix(plain, "model.layers.1.xq_proj");  // "(.*\.)?(key)$": a bare suffix does not match
    suffix.add_adapter("default", cfg, g);
    CHECK(lora_adapter(suffix, "default").r == 4);
  }
  SECTION("merge gives the unmerged output; unmerge restores the weights; merge_and_unload is a plain Linear") {
    for (bool fifo : {false, true}) {
      for (bool lora_bias : {false, true}) {
        CAPTURE(fifo, lora_bias);
        Generator g(5);
        Linear<T> base(c.in, c.out, true, g, fifo ? WeightLayout::in_out : WeightLayout::out_in);
        LoraLinear<T> l(base);
        Case cc = c;
        cc.fifo = fifo;
        cc.lora_bias = lora_bias;
        l.add_adapter("default", config_of(cc), g);
        if (lora_bias) for (std::size_t i = 0; i < lora_adapter(l, "default").bias.size(); ++i) lora_adapter(l, "default").bias[i] = T(0.1 * double(i));
        l.eval();
        const Mat<T> y = run_forward(l, x);
        const Mat<T> w0 = as_mat(l.base().weight()), b0 = as_mat(l.base().bias());
        l.merge();
        CHECK(l.merged_adapters() == std::vector<std::string>{"default"});
        CHECK(max_abs_diff(as_mat(l.base().weight()), w0) > 1e-4);
        CHECK(max_abs_diff(run_forward(l, x), y) < 100 * value_tol<T>());
        l.unmerge();
        CHECK(!l.merged());
        CHECK(max_abs_diff(as_mat(l.base().weight()), w0) < 10 * value_tol<T>());
        CHECK(max_abs_diff(as_mat(l.base().bias()), b0) < 10 * value_tol<T>());
        Linear<T> merged = std::move(l).merge_and_unload();
        Mat<T> ym(c.m, c.out);
        auto ctx = merged.make_context(c.m);
        merged.forward(ctx, x, ym);
        CHECK(max_abs_diff(ym, y) < 100 * value_tol<T>());
      }
    }
  }
  SECTION("disabled adapters give the base output exactly, also after a merge") {
    LoraLinear<T> l(plain);
    Generator g(2);
    l.add_adapter("default", config_of(c), g);
    l.disable_adapters();
    CHECK(run_forward(l, x) == y_base);
    l.enable_adapters();
    l.merge();
    l.disable_adapters();  // unmerges first, as PEFT does
    CHECK(!l.merged());
    CHECK(max_abs_diff(run_forward(l, x), y_base) < 10 * value_tol<T>());
  }
  SECTION("dropout: eval mode is deterministic and equals no dropout; train mode draws masks from the seed") {
    Case cd = c;
    cd.dropout = 0.5;
    auto l = make_layer<T>(cd, 17);
    auto l0 = make_layer<T>(c, 17);
    l.eval();
    CHECK(run_forward(l, x, 1) == run_forward(l0, x, 1));
    l.train();
    const Mat<T> y1 = run_forward(l, x, 1), y1b = run_forward(l, x, 1), y2 = run_forward(l, x, 2);
    CHECK(y1 == y1b);
    CHECK(max_abs_diff(y1, y2) > 1e-4);
    // roughly half of the adapter inputs are dropped
    auto ctx = l.make_context(c.m);
    Mat<T> y(c.m, c.out);
    l.set_seed(3);
    l.forward(ctx, x, y);
    const auto& xd = std::get<0>(ctx.banks).slots[0].xd;
    std::size_t zeros = 0;
    for (peft::Index i = 0; i < c.m * c.in; ++i) zeros += xd[std::size_t(i)] == T(0);
    CHECK(zeros > std::size_t(c.m * c.in) / 4);
    CHECK(zeros < std::size_t(c.m * c.in) * 3 / 4);
  }
  SECTION("deleting adapters: the active one falls back to the first remaining; the last leaves the base") {
    LoraLinear<T> l(plain);
    Generator g(2);
    l.add_adapter("zeta", config_of(c), g);
    l.add_adapter("alpha", config_of(c), g);
    l.add_adapter("beta", config_of(c), g);
    l.delete_adapter("zeta");
    CHECK(l.active_adapters() == std::vector<std::string>{"alpha"});
    l.delete_adapter("alpha");
    l.delete_adapter("beta");
    CHECK(l.active_adapters().empty());
    CHECK(run_forward(l, x) == y_base);
  }
  SECTION("safe merge rejects non-finite weights and leaves the layer untouched") {
    LoraLinear<T> l(plain);
    Generator g(2);
    l.add_adapter("default", config_of(c), g);
    lora_adapter(l, "default").b[3] = std::numeric_limits<T>::infinity();
    const Mat<T> w0 = as_mat(l.base().weight());
    REQUIRE_THROWS_WITH(l.merge(std::nullopt, true), Catch::Contains("NaNs detected in the merged weights") && Catch::Contains("default"));
    CHECK(!l.merged());
    CHECK(as_mat(l.base().weight()) == w0);
  }
}

TEST_CASE("lora: borrowed weights are used in place and merging writes into them", "[lora][views]") {
  Mat<float> w = random_mat<float>(6, 4, 1);
  Mat<float> b = random_mat<float>(1, 6, 2);
  const Mat<float> w0 = w;
  LoraLinear<float> l(Linear<float>::borrow(w, b));
  CHECK(l.base().weight().data == w.data());
  Generator g(1);
  l.add_adapter("default", config_of(Case{0, 0, 0, 2, 2.0}), g);
  l.merge();
  CHECK(max_abs_diff(w, w0) > 1e-4);
  l.unmerge();
  CHECK(max_abs_diff(w, w0) < 1e-6);
  // raw pointers and Eigen maps work as views without copies
  std::vector<float> xs(3 * 4, 0.5f), ys(3 * 6);
  auto ctx = l.make_context(3);
  l.forward(ctx, view(xs.data(), 3, 4), view(ys.data(), 3, 6));
  Eigen::Map<const Mat<float>> xm(xs.data(), 3, 4);
  Mat<float> y2(3, 6);
  l.forward(ctx, xm, y2);
  CHECK(max_abs_diff(Eigen::Map<Mat<float>>(ys.data(), 3, 6), y2) == 0.0);
}

TEST_CASE("lora: bad input gets a clear exception", "[lora][errors]") {
  Generator g(1);
  LoraLinear<float> l(Linear<float>(4, 3, true, g));
  LoraConfig cfg;
  cfg.r = 2;
  l.add_adapter("default", cfg, g);
  auto ctx = l.make_context(4);
  Mat<float> x(2, 4), y(2, 3), dy(2, 3), dx(2, 4);
  x.setRandom();
  dy.setRandom();

  SECTION("shapes") {
    Mat<float> xbad(2, 5), ybad(2, 4);
    REQUIRE_THROWS_AS(l.forward(ctx, xbad, y), ShapeError);
    REQUIRE_THROWS_WITH(l.forward(ctx, xbad, y), Catch::Contains("in_features = 4") && Catch::Contains("[2, 5]"));
    REQUIRE_THROWS_WITH(l.forward(ctx, x, ybad), Catch::Contains("y: expected shape [2, 3], got [2, 4]"));
    Mat<float> xbig(5, 4), ybig(5, 3);
    REQUIRE_THROWS_WITH(l.forward(ctx, xbig, ybig), Catch::Contains("max_batch 4"));
    l.forward(ctx, x, y);
    Mat<float> dybad(2, 2);
    REQUIRE_THROWS_WITH(l.backward(ctx, dybad, dx), Catch::Contains("dy: expected shape [2, 3]"));
    Mat<float> dxbad(3, 4);
    REQUIRE_THROWS_WITH(l.backward(ctx, dy, dxbad), Catch::Contains("dx: expected shape [2, 4]"));
    REQUIRE_THROWS_AS(MatrixView<float>(x.data(), 2, 4, 3), ShapeError);
    REQUIRE_THROWS_WITH(Linear<float>(0, 3, true, g), Catch::Contains("must be positive"));
    float wb[6] = {};
    float bb[2] = {};
    REQUIRE_THROWS_WITH(Linear<float>::borrow(view(wb, 3, 2), view(bb, 1, 2)), Catch::Contains("bias has 2 elements, expected out_features = 3"));
    REQUIRE_THROWS_WITH(l.forward(ctx, x, x), Catch::Contains("expected shape"));
  }
  SECTION("configs") {
    LoraConfig bad;
    bad.r = 0;
    REQUIRE_THROWS_AS(l.add_adapter("r0", bad, g), ConfigError);
    REQUIRE_THROWS_WITH(l.add_adapter("r0", bad, g), Catch::Contains("r must be a positive integer, got 0"));
    bad.r = -3;
    REQUIRE_THROWS_WITH(l.add_adapter("rneg", bad, g), Catch::Contains("got -3"));
    bad.r = 2;
    bad.lora_dropout = 1.0;
    REQUIRE_THROWS_WITH(l.add_adapter("drop", bad, g), Catch::Contains("lora_dropout must be in [0, 1)"));
    bad.lora_dropout = 0;
    bad.fan_in_fan_out = true;
    REQUIRE_THROWS_WITH(l.add_adapter("fifo", bad, g), Catch::Contains("fan_in_fan_out"));
    LoraLinear<float> nobias(Linear<float>(4, 3, false, g));
    LoraConfig lb;
    lb.lora_bias = true;
    REQUIRE_THROWS_WITH(nobias.add_adapter("default", lb, g), Catch::Contains("lora_bias needs a base layer with a bias"));
    CHECK(l.adapter_names() == std::vector<std::string>{"default"});  // failed adds leave nothing behind
  }
  SECTION("names") {
    REQUIRE_THROWS_AS(l.set_adapter("nope"), AdapterError);
    REQUIRE_THROWS_WITH(l.set_adapter("nope"), Catch::Contains("Adapter nope does not exist") && Catch::Contains("'default'"));
    REQUIRE_THROWS_WITH(l.add_adapter("default", cfg, g), Catch::Contains("already exists"));
    REQUIRE_THROWS_WITH(l.add_adapter("a.b", cfg, g), Catch::Contains("contains '.'"));
    REQUIRE_THROWS_WITH(l.delete_adapter("nope"), Catch::Contains("does not exist"));
    REQUIRE_THROWS_WITH(lora_adapter(l, "nope"), Catch::Contains("does not exist"));
  }
  SECTION("state") {
    REQUIRE_THROWS_WITH(l.backward(ctx, dy, dx), Catch::Contains("no forward pass"));
    l.forward(ctx, x, y);
    l.merge();
    REQUIRE_THROWS_AS(l.merge(), StateError);
    REQUIRE_THROWS_WITH(l.merge(), Catch::Contains("already merged"));
    REQUIRE_THROWS_WITH(l.backward(ctx, dy, dx), Catch::Contains("merged into the base weight"));
    REQUIRE_THROWS_WITH(l.delete_adapter("default"), Catch::Contains("is merged"));
    l.unmerge();
    l.forward(ctx, x, y);  // a forward with the same merge state as its backward
    l.backward(ctx, dy, dx);
    l.add_adapter("second", cfg, g);
    REQUIRE_THROWS_WITH(l.forward(ctx, x, y), Catch::Contains("call make_context() again"));
  }
}

TEST_CASE("lora: state and aliasing traps are refused, and overwrite assigns every gradient", "[lora][errors][state]") {
  Generator g(1);
  LoraConfig cfg;
  cfg.r = 2;
  cfg.init_lora_weights = LoraInit::off;
  LoraLinear<float> a(Linear<float>(4, 4, true, g)), b(Linear<float>(4, 4, true, g));
  a.add_adapter("default", cfg, g);
  b.add_adapter("default", cfg, g);
  auto ctx_a = a.make_context(2);
  Mat<float> x = random_mat<float>(2, 4, 1), y(2, 4), dy = random_mat<float>(2, 4, 2), dx(2, 4);
  SECTION("a context belongs to the layer it was made for, also after a copy") {
    REQUIRE_THROWS_WITH(b.forward(ctx_a, x, y), Catch::Contains("make_context() again"));
    LoraLinear<float> c = a;
    REQUIRE_THROWS_WITH(c.forward(ctx_a, x, y), Catch::Contains("make_context() again"));
  }
  SECTION("dx may not alias dy or the saved input") {
    a.forward(ctx_a, x, y);
    REQUIRE_THROWS_WITH(a.backward(ctx_a, dy, dy), Catch::Contains("dx overlaps dy"));
    REQUIRE_THROWS_WITH(a.backward(ctx_a, dy, x), Catch::Contains("dx overlaps dy or the saved input"));
  }
  SECTION("merging between forward and backward, or while disabled, is refused") {
    a.forward(ctx_a, x, y);
    a.merge();
    a.unmerge();
    REQUIRE_THROWS_WITH(a.backward(ctx_a, dy, dx), Catch::Contains("run forward again"));
    a.disable_adapters();
    REQUIRE_THROWS_WITH(a.merge(), Catch::Contains("adapters are disabled"));
  }
  SECTION("deleting the active adapter activates the first remaining one, trainable") {
    a.add_adapter("zz", cfg, g);
    a.add_adapter("mm", cfg, g);
    a.delete_adapter("default");
    CHECK(a.active_adapters() == std::vector<std::string>{"mm"});
    CHECK(lora_adapter(a, "mm").requires_grad);
    CHECK_FALSE(lora_adapter(a, "zz").requires_grad);
    a.delete_adapter("zz");  // not active: the active set is untouched
    CHECK(a.active_adapters() == std::vector<std::string>{"mm"});
  }
  SECTION("overwrite mode zeroes the gradients of adapters that did not run") {
    a.add_adapter("other", cfg, g);
    a.set_adapter(std::vector<std::string>{"default", "other"});
    a.forward(ctx_a = a.make_context(2), x, y);
    a.backward(ctx_a, dy, dx, GradMode::overwrite);
    CHECK(as_mat(lora_adapter(a, "other").grad_A()).cwiseAbs().maxCoeff() > 0);
    a.set_adapter("default");
    a.set_requires_grad("other", true);  // trainable, but inactive: its gradient must not be last step's
    a.forward(ctx_a, x, y);
    a.backward(ctx_a, dy, dx, GradMode::overwrite);
    CHECK(as_mat(lora_adapter(a, "other").grad_A()).isZero());
  }
}
