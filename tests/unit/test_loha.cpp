// LoHa on Linear: gradients against finite differences (several shapes and ranks, rank/module dropout,
// two active adapters, LoHa beside LoRA and LoKr on one layer), PEFT's properties, numbers from real
// Hugging Face PEFT 0.21.2 (tests/reference/data/loha_linear_default_*.json), bad input.
#include <catch2/catch.hpp>
#include <cstdio>
#include <cstdlib>
#include <map>

#include "layer_check.hpp"
#include "reference.hpp"

using namespace peft;
using namespace peft::test;
using json = nlohmann::json;

namespace {

template <class T>
using LohaLinear = Adapted<Linear<T>, Loha>;

struct Case {
  peft::Index m, in, out;
  int r;
  double alpha;
  bool fifo = false;
  double rank_dropout = 0.0, module_dropout = 0.0;
};

LohaConfig config_of(const Case& c, bool init_weights = false) {
  LohaConfig cfg;
  cfg.r = c.r;
  cfg.alpha = c.alpha;
  cfg.rank_dropout = c.rank_dropout;
  cfg.module_dropout = c.module_dropout;
  cfg.init_weights = init_weights;
  return cfg;
}

/// A LoHa layer with non-identity init (PEFT's init_weights=False) unless `init_weights`.
template <class T>
LohaLinear<T> make_layer(const Case& c, std::uint64_t seed = 11, bool init_weights = false) {
  Generator gen(seed);
  LohaLinear<T> l(Linear<T>(c.in, c.out, true, gen, c.fifo ? WeightLayout::in_out : WeightLayout::out_in), "model.layers.0.q_proj");
  l.add_adapter("default", config_of(c, init_weights), gen);
  return l;
}

template <class L>
Mat<typename L::scalar> run_forward(L& l, const Mat<typename L::scalar>& x, std::uint64_t seed = 5) {
  Mat<typename L::scalar> y(x.rows(), l.out_features());
  auto ctx = l.make_context(x.rows());
  l.set_seed(seed);
  l.forward(ctx, x, y);
  return y;
}

/// ΔW by the formula, in double: s · (w1_a w1_b) ⊙ (w2_a w2_b), [out, in].
template <class A>
Mat<double> expected_delta(const A& a) {
  auto d = [](auto v) { return as_mat(v).template cast<double>().eval(); };
  const Mat<double> p1 = d(a.hada_w1_a()) * d(a.hada_w1_b()), p2 = d(a.hada_w2_a()) * d(a.hada_w2_b());
  return double(a.scaling) * p1.cwiseProduct(p2);
}

// ---- reference files ---------------------------------------------------------------------------------

/// peft++'s parameter name ("hada_w1_a.default") → PEFT's state-dict name ("lin.hada_w1_a").
std::string peft_name(const std::string& layer, const std::string& ours) { return layer + "." + ours.substr(0, ours.rfind('.')); }

template <class T>
void check_reference(const std::string& file) {
  INFO("reference file " << file);
  const json j = load_reference(file);
  const double tol = reference_tol<T>();
  const std::string lname = j.at("layer");
  const Mat<T> w = ref_tensor<T>(j, lname + ".weight"), b = ref_tensor<T>(j, lname + ".bias");
  Generator gen(0);
  Linear<T> base(w.cols(), w.rows(), true, gen);
  as_mat(base.weight()) = w;
  as_mat(base.bias()) = b;
  LohaLinear<T> l(std::move(base), lname);
  const auto& c = j.at("config").at("default");
  LohaConfig cfg;
  cfg.r = c.at("r");
  cfg.alpha = c.at("alpha");
  cfg.rank_dropout = c.at("rank_dropout");
  cfg.module_dropout = c.at("module_dropout");
  cfg.init_weights = c.at("init_weights");
  l.add_adapter("default", cfg, gen);
  CHECK(double(loha_adapter(l, "default").scaling) == Approx(j.at("scaling").at("default").at(lname).get<double>()));
  // PEFT's tensors, by name: exactly the trainable set PEFT reports
  std::vector<std::string> names;
  l.visit_parameters([&](ParamRef<T> p) {
    if (!p.trainable) return;
    names.push_back(peft_name(lname, p.name));
    const Mat<T> v = ref_tensor<T>(j, names.back());
    REQUIRE(std::size_t(v.size()) == p.size);
    std::copy(v.data(), v.data() + v.size(), p.value);
  });
  CHECK(names == j.at("trainable").get<std::vector<std::string>>());
  l.eval();

  double worst = 0;
  auto cmp = [&](const std::string& what, const auto& ours, const Mat<T>& theirs) {
    const double e = scaled_diff(ours, theirs);
    INFO(what << ": scaled error " << e);
    CHECK(e < tol);
    worst = std::max(worst, e);
  };
  const Mat<T> x = ref_tensor<T>(j, "x"), g = ref_tensor<T>(j, "grad_out");
  auto ctx = l.make_context(x.rows());
  Mat<T> y(x.rows(), l.out_features()), dx(x.rows(), l.in_features());
  l.forward(ctx, x, y);
  l.backward(ctx, g, dx, GradMode::overwrite);
  cmp("out", y, ref_tensor<T>(j, "out"));
  cmp("grad.x", dx, ref_tensor<T>(j, "grad.x"));
  l.visit_parameters([&](ParamRef<T> p) {
    if (!p.trainable) return;
    const std::string n = "grad." + peft_name(lname, p.name);
    const Mat<T> expect = ref_tensor<T>(j, n);
    cmp(n, Eigen::Map<const Mat<T>>(p.grad, expect.rows(), expect.cols()), expect);
  });
  Mat<T> delta(l.out_features(), l.in_features());
  l.delta_weight("default", delta);
  cmp("delta", delta, ref_tensor<T>(j, "delta." + lname));
  l.disable_adapters();
  cmp("base_out", run_forward(l, x), ref_tensor<T>(j, "base_out"));
  l.enable_adapters();
  l.merge();
  cmp("merged weight", as_mat(l.base().weight()), ref_tensor<T>(j, "merged." + lname + ".weight"));
  cmp("merged bias", as_mat(l.base().bias()), ref_tensor<T>(j, "merged." + lname + ".bias"));
  cmp("merged_out", run_forward(l, x), ref_tensor<T>(j, "merged_out"));
  if (std::getenv("PEFT_PRINT_ERRORS")) std::printf("%s: worst scaled error vs PEFT %.3g\n", file.c_str(), worst);
}

}  // namespace

TEMPLATE_TEST_CASE("loha: backward matches finite differences", "[loha][grad]", float, double) {
  using T = TestType;
  const Case c = GENERATE(Case{4, 6, 5, 2, 4.0}, Case{5, 10, 8, 4, 8.0}, Case{3, 7, 9, 1, 2.0}, Case{2, 16, 12, 6, 3.0},
                          Case{6, 9, 7, 3, 6.0, true}, Case{5, 12, 10, 4, 8.0, false, 0.3}, Case{4, 8, 6, 2, 4.0, true, 0.5, 0.5},
                          Case{1, 33, 17, 8, 16.0});
  CAPTURE(c.m, c.in, c.out, c.r, c.alpha, c.fifo, c.rank_dropout, c.module_dropout);
  auto layer = make_layer<T>(c);
  auto twin = make_layer<double>(c);
  check_layer_gradients(layer, twin, c.m);
  SECTION("with the base layer trainable as well (full fine-tuning)") {
    layer.base().set_requires_grad(true);
    twin.base().set_requires_grad(true);
    check_layer_gradients(layer, twin, c.m, 7);
  }
  SECTION("two active adapters sum, both trainable") {
    Case c2 = c;
    c2.r = c.r + 1;
    c2.alpha = 3.0;
    Generator g(21), gd(21);
    layer.add_adapter("second", config_of(c2), g);
    twin.add_adapter("second", config_of(c2), gd);
    layer.set_adapter(std::vector<std::string>{"default", "second"});
    twin.set_adapter(std::vector<std::string>{"default", "second"});
    check_layer_gradients(layer, twin, c.m, 3);
  }
}

TEMPLATE_TEST_CASE("loha beside lora and lokr on one layer: outputs add up, gradients match finite differences",
                   "[loha][lora][lokr][mixed][grad]", float, double) {
  using T = TestType;
  auto build2 = [](auto tag) {
    using U = decltype(tag);
    Generator g(5);
    Adapted<Linear<U>, Lora, Loha> l(Linear<U>(9, 8, true, g), "mlp.up_proj");
    LoraConfig lc;
    lc.r = 3;
    lc.init_lora_weights = LoraInit::off;
    l.add_adapter("lora", lc, g);
    l.add_adapter("loha", config_of(Case{0, 0, 0, 2, 4.0}), g);
    l.set_adapter(std::vector<std::string>{"lora", "loha"});
    return l;
  };
  auto l2 = build2(T{});
  auto t2 = build2(double{});
  check_layer_gradients(l2, t2, 4);

  auto build3 = [](auto tag) {
    using U = decltype(tag);
    Generator g(6);
    Adapted<Linear<U>, Lora, Loha, Lokr> l(Linear<U>(12, 10, true, g), "mlp.up_proj");
    LoraConfig lc;
    lc.r = 2;
    lc.init_lora_weights = LoraInit::off;
    l.add_adapter("lora", lc, g);
    l.add_adapter("loha", config_of(Case{0, 0, 0, 3, 6.0}), g);
    LokrConfig kc;
    kc.r = 1;
    kc.alpha = 2;
    kc.init_weights = LokrInit::off;
    kc.decompose_both = true;
    l.add_adapter("lokr", kc, g);
    l.set_adapter(std::vector<std::string>{"lora", "loha", "lokr"});
    return l;
  };
  auto l3 = build3(T{});
  auto t3 = build3(double{});
  check_layer_gradients(l3, t3, 3);

  // the sum rule, and every kind's delta: y − base = x (ΔW_lora + ΔW_loha + ΔW_lokr)ᵀ; merge all, unmerge all
  const Mat<double> x = random_mat<double>(3, 12, 8);
  Mat<double> y = run_forward(t3, x);
  t3.disable_adapters();
  const Mat<double> y0 = run_forward(t3, x);
  t3.enable_adapters();
  Mat<double> sum = Mat<double>::Zero(10, 12), d(10, 12);
  for (const char* n : {"lora", "loha", "lokr"}) {
    t3.delta_weight(n, d);
    sum += d;
  }
  CHECK(max_abs_diff(y - y0, x * sum.transpose()) < 1e-12);
  CHECK(max_abs_diff(d, Mat<double>::Zero(10, 12)) > 1e-3);
  const Mat<double> w0 = as_mat(t3.base().weight());
  t3.merge();
  CHECK(max_abs_diff(as_mat(t3.base().weight()), w0 + sum) < 1e-12);
  CHECK(max_abs_diff(run_forward(t3, x), y) < 1e-12);
  t3.unmerge();
  CHECK(max_abs_diff(as_mat(t3.base().weight()), w0) < 1e-14);
}

TEMPLATE_TEST_CASE("loha: PEFT's properties", "[loha][props]", float, double) {
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

  SECTION("default init (init_weights=true) is the identity exactly: w2_b = 0, the others kaiming-uniform(a=√5)") {
    LohaLinear<T> l(plain);
    Generator g(9);
    LohaConfig cfg;  // r = alpha = 8
    l.add_adapter("default", cfg, g);
    CHECK(run_forward(l, x) == y_base);
    const auto& a = loha_adapter(l, "default");
    CHECK(a.r == 8);
    CHECK(a.scaling == T(1));
    CHECK(as_mat(a.hada_w2_b()).cwiseAbs().maxCoeff() == T(0));
    for (auto [v, fan_in] : {std::pair{a.hada_w1_a(), 8}, std::pair{a.hada_w1_b(), int(c.in)}, std::pair{a.hada_w2_a(), 8}}) {
      const double m = double(as_mat(v).cwiseAbs().maxCoeff());
      CHECK(m <= 1.0 / std::sqrt(double(fan_in)));
      CHECK(m > 0.5 / std::sqrt(double(fan_in)));
    }
    Mat<T> delta(c.out, c.in);
    l.delta_weight("default", delta);
    CHECK(delta.cwiseAbs().maxCoeff() == T(0));
  }
  SECTION("init_weights=false is not the identity; delta_weight is s·(w1_a w1_b)⊙(w2_a w2_b) and y − base = x ΔWᵀ") {
    LohaLinear<T> l(plain);
    Generator g(9);
    l.add_adapter("default", config_of(c), g);
    const Mat<T> y = run_forward(l, x);
    CHECK(max_abs_diff(y, y_base) > 1e-3);
    const auto& a = loha_adapter(l, "default");
    CHECK(a.scaling == T(2));
    CHECK(as_mat(a.hada_w2_b()).cwiseAbs().maxCoeff() > T(0));
    Mat<T> delta(c.out, c.in);
    l.delta_weight("default", delta);
    CHECK(max_abs_diff(delta, expected_delta(a)) < 10 * value_tol<T>());
    CHECK(max_abs_diff(y - y_base, x * delta.transpose()) < 20 * value_tol<T>());
  }
  SECTION("parameter names are PEFT's (bare Parameters: no '.weight'), the shapes PEFT's") {
    LohaLinear<T> l(plain);
    Generator g(9);
    l.add_adapter("default", config_of(c), g);
    l.add_adapter("other", config_of(Case{0, 0, 0, 2, 2.0}), g);
    std::vector<std::string> names;
    std::vector<std::size_t> sizes;
    l.visit_parameters([&](ParamRef<T> p) { names.push_back(p.name), sizes.push_back(p.size); });
    CHECK(names == std::vector<std::string>{"weight", "bias", "hada_w1_a.default", "hada_w1_b.default", "hada_w2_a.default",
                                            "hada_w2_b.default", "hada_w1_a.other", "hada_w1_b.other", "hada_w2_a.other", "hada_w2_b.other"});
    CHECK(sizes == std::vector<std::size_t>{120, 10, 40, 48, 40, 48, 20, 24, 20, 24});
  }
  SECTION("merge gives the unmerged output, unmerge restores the weights, the bias never changes; Conv1D layout too") {
    for (bool fifo : {false, true}) {
      CAPTURE(fifo);
      Case cc = c;
      cc.fifo = fifo;
      auto l = make_layer<T>(cc, 5);
      l.eval();
      const Mat<T> y = run_forward(l, x);
      const Mat<T> w0 = as_mat(l.base().weight()), b0 = as_mat(l.base().bias());
      Mat<T> delta(w0.rows(), w0.cols());
      l.delta_weight("default", delta);
      const Mat<double> expect = expected_delta(loha_adapter(l, "default"));
      CHECK(max_abs_diff(delta, fifo ? Mat<double>(expect.transpose()) : expect) < 10 * value_tol<T>());
      l.merge();
      CHECK(max_abs_diff(as_mat(l.base().weight()), (w0 + delta).eval()) < 10 * value_tol<T>());
      CHECK(as_mat(l.base().bias()) == b0);
      CHECK(max_abs_diff(run_forward(l, x), y) < 100 * value_tol<T>());
      l.unmerge();
      CHECK(max_abs_diff(as_mat(l.base().weight()), w0) < 10 * value_tol<T>());
      Linear<T> merged = std::move(l).merge_and_unload();
      Mat<T> ym(c.m, c.out);
      auto ctx = merged.make_context(c.m);
      merged.forward(ctx, x, ym);
      CHECK(max_abs_diff(ym, y) < 100 * value_tol<T>());
    }
  }
  SECTION("disabled adapters give the base output exactly, also after a merge; safe merge rejects Inf") {
    LohaLinear<T> l(plain);
    Generator g(2);
    l.add_adapter("default", config_of(c), g);
    l.disable_adapters();
    CHECK(run_forward(l, x) == y_base);
    l.enable_adapters();
    l.merge();
    l.disable_adapters();
    CHECK(!l.merged());
    CHECK(max_abs_diff(run_forward(l, x), y_base) < 10 * value_tol<T>());
    l.enable_adapters();
    loha_adapter(l, "default").w2b[3] = std::numeric_limits<T>::infinity();
    const Mat<T> w0 = as_mat(l.base().weight());
    REQUIRE_THROWS_WITH(l.merge(std::nullopt, true), Catch::Contains("NaNs detected in the merged weights") && Catch::Contains("default"));
    CHECK(as_mat(l.base().weight()) == w0);
  }
  SECTION("two adapters: outputs add; deleting one leaves the other") {
    LohaLinear<T> l(plain);
    Generator g(2);
    l.add_adapter("a", config_of(c), g);
    l.add_adapter("b", config_of(Case{0, 0, 0, 2, 3.0}), g);
    const Mat<T> ya = run_forward(l, x);
    l.set_adapter("b");
    const Mat<T> yb = run_forward(l, x);
    l.set_adapter(std::vector<std::string>{"a", "b"});
    const Mat<T> yab = run_forward(l, x);
    CHECK(max_abs_diff(yab - y_base, (ya - y_base) + (yb - y_base)) < 10 * value_tol<T>());
    l.delete_adapter("a");
    CHECK(max_abs_diff(run_forward(l, x), yb) == 0.0);
  }
  SECTION("rank_pattern and alpha_pattern follow the module path (PEFT's (.*\\.)?(key)$)") {
    LohaConfig cfg = config_of(c);
    cfg.rank_pattern = {{"q_proj", 2}};
    cfg.alpha_pattern = {{"layers\\.1\\.q_proj", 3.0}};
    Generator g(1);
    LohaLinear<T> l(plain, "model.layers.1.q_proj");
    l.add_adapter("default", cfg, g);
    CHECK(loha_adapter(l, "default").r == 2);
    CHECK(loha_adapter(l, "default").scaling == Approx(1.5));
    LohaLinear<T> other(plain, "model.layers.1.xq_proj");
    other.add_adapter("default", cfg, g);
    CHECK(loha_adapter(other, "default").r == 4);
    CHECK(loha_adapter(other, "default").scaling == Approx(2.0));
  }
  SECTION("rank dropout (train mode): whole rows of ΔW dropped, the kept ones scaled by 1/mean(keep); eval is exact") {
    Case cd = c;
    cd.rank_dropout = 0.4;
    LohaLinear<T> l(plain), l0(plain);
    Generator g(17), g0(17);
    l.add_adapter("default", config_of(cd), g);
    l0.add_adapter("default", config_of(c), g0);
    l.eval();
    CHECK(run_forward(l, x) == run_forward(l0, x));
    l.train();
    const Mat<T> y1 = run_forward(l, x, 1), y1b = run_forward(l, x, 1);
    CHECK(y1 == y1b);
    Mat<T> delta(c.out, c.in);
    l.delta_weight("default", delta);
    auto ctx = l.make_context(c.m);
    Mat<T> y(c.m, c.out);
    int patterns = 0;
    for (std::uint64_t seed = 1; seed <= 6; ++seed) {
      l.set_seed(seed);
      l.forward(ctx, x, y);
      const auto& mask = std::get<0>(ctx.banks).slots[0].mask;
      int kept = 0;
      for (peft::Index i = 0; i < c.out; ++i) kept += mask[std::size_t(i)] != T(0);
      patterns += kept > 0 && kept < c.out;
      Mat<T> masked = delta;
      for (peft::Index i = 0; i < c.out; ++i) {
        const T v = mask[std::size_t(i)];
        CHECK((v == T(0) || std::abs(double(v) - double(c.out) / kept) < 1e-6));
        masked.row(i) *= v;
      }
      CHECK(max_abs_diff(y - y_base, x * masked.transpose()) < 50 * value_tol<T>());
    }
    CHECK(patterns >= 4);
  }
  SECTION("module dropout (train mode): the adapter is skipped in about p of the forwards, never in eval mode") {
    Case cd = c;
    cd.module_dropout = 0.3;
    LohaLinear<T> l(plain);
    Generator g(17);
    l.add_adapter("default", config_of(cd), g);
    const Mat<T> y_on = (l.eval(), run_forward(l, x));
    CHECK(max_abs_diff(y_on, y_base) > 1e-3);
    l.train();
    int skipped = 0;
    for (std::uint64_t seed = 0; seed < 200; ++seed) {
      const Mat<T> y = run_forward(l, x, seed);
      if (y == y_base) ++skipped;
      else CHECK(max_abs_diff(y, y_on) < 10 * value_tol<T>());
    }
    CHECK(skipped > 40);
    CHECK(skipped < 80);
    // a skipped, trainable adapter gets zero gradients in overwrite mode (PyTorch: no contribution) and
    // leaves dx to the base
    std::uint64_t seed = 0;
    while (run_forward(l, x, seed) != y_base) ++seed;
    auto ctx = l.make_context(c.m);
    Mat<T> y(c.m, c.out), dx(c.m, c.in), dx0(c.m, c.in);
    const Mat<T> dy = random_mat<T>(c.m, c.out, 3);
    l.set_seed(seed);
    l.forward(ctx, x, y);
    REQUIRE(y == y_base);
    auto& a = loha_adapter(l, "default");
    for (auto* g : {&a.grad_w1a, &a.grad_w1b, &a.grad_w2a, &a.grad_w2b})
      for (std::size_t i = 0; i < g->size(); ++i) (*g)[i] = nan<T>();
    l.backward(ctx, dy, dx, GradMode::overwrite);
    for (auto* g : {&a.grad_w1a, &a.grad_w1b, &a.grad_w2a, &a.grad_w2b})
      for (std::size_t i = 0; i < g->size(); ++i) CHECK((*g)[i] == T(0));
    auto pctx = plain.make_context(c.m);
    plain.forward(pctx, x, y);
    plain.backward(pctx, dy, dx0);
    CHECK(dx == dx0);
  }
}

TEMPLATE_TEST_CASE("reference: LoHa on Linear matches Hugging Face PEFT", "[reference][loha]", float, double) {
  using T = TestType;
  check_reference<T>(std::is_same_v<T, float> ? "loha_linear_default_f32.json" : "loha_linear_default_f64.json");
}

TEST_CASE("loha: bad input gets a clear exception naming the field", "[loha][errors]") {
  Generator g(1);
  LohaLinear<float> l(Linear<float>(4, 3, true, g));
  LohaConfig ok;
  ok.r = 2;
  l.add_adapter("default", ok, g);
  auto bad = [&](auto edit, const char* message) {
    LohaConfig c = ok;
    edit(c);
    REQUIRE_THROWS_AS(l.add_adapter("bad", c, g), ConfigError);
    REQUIRE_THROWS_WITH(l.add_adapter("bad", c, g), Catch::Contains(message));
  };
  bad([](LohaConfig& c) { c.r = 0; }, "LohaConfig: r must be a positive integer, got 0");
  bad([](LohaConfig& c) { c.r = -2; }, "r must be a positive integer, got -2");
  bad([](LohaConfig& c) { c.rank_pattern = {{"q", 0}}; }, "rank_pattern['q'] must be a positive integer");
  bad([](LohaConfig& c) { c.module_dropout = 1.0; }, "module_dropout must be in [0, 1), got 1");
  bad([](LohaConfig& c) { c.module_dropout = -0.1; }, "module_dropout must be in [0, 1)");
  bad([](LohaConfig& c) { c.rank_dropout = 1.5; }, "rank_dropout must be in [0, 1), got 1.5");
  bad([](LohaConfig& c) { c.alpha = std::numeric_limits<double>::quiet_NaN(); }, "alpha must be finite");
  CHECK(l.adapter_names() == std::vector<std::string>{"default"});  // failed adds leave nothing behind
  // a rank pattern resolving to a bad rank for this module is caught at add time
  LohaConfig p = ok;
  p.rank_pattern = {{"q_proj", -1}};
  LohaLinear<float> q(Linear<float>(4, 3, true, g), "layers.0.q_proj");
  REQUIRE_THROWS_WITH(q.add_adapter("default", p, g), Catch::Contains("rank_pattern['q_proj']"));
  // the rest of the state machine is Adapted's: backward while merged, a stale context
  auto ctx = l.make_context(2);
  Mat<float> x = random_mat<float>(2, 4, 1), y(2, 3), dy = random_mat<float>(2, 3, 2), dx(2, 4);
  REQUIRE_THROWS_WITH(l.backward(ctx, dy, dx), Catch::Contains("no forward pass"));
  l.forward(ctx, x, y);
  l.merge();
  REQUIRE_THROWS_WITH(l.backward(ctx, dy, dx), Catch::Contains("merged into the base weight"));
  l.unmerge();
  l.add_adapter("second", ok, g);
  REQUIRE_THROWS_WITH(l.forward(ctx, x, y), Catch::Contains("call make_context() again"));
  REQUIRE_THROWS_WITH(loha_adapter(l, "nope"), Catch::Contains("does not exist"));
}

namespace {
LohaConfig loha_conv_config(const json& c) {
  LohaConfig cfg;
  cfg.r = c.at("r");
  cfg.alpha = c.at("alpha");
  cfg.rank_dropout = c.at("rank_dropout");
  cfg.module_dropout = c.at("module_dropout");
  cfg.use_effective_conv2d = c.at("use_effective_conv2d");
  cfg.init_weights = c.at("init_weights").get<bool>();
  return cfg;
}
LohaConfig loha_fd_config(int variant, int which) {
  LohaConfig cfg;
  cfg.r = which == 0 ? 3 : 2;
  cfg.alpha = which == 0 ? 6 : 3;
  cfg.init_weights = false;  // all four factors random, so every gradient is non-trivial
  return cfg;
}
template <class T>
void loha_reference_cases(const std::string& sfx);
}  // namespace

// ---- loha on Conv2d (non-CP form) ----

namespace {

Conv2dGeometry loha_lc_geo(Index c, Index o, Index k, Index s, Index p, Index d, Index h, Index w) {
  Conv2dGeometry g;
  g.in_channels = c;
  g.out_channels = o;
  g.kernel_h = g.kernel_w = k;
  g.stride_h = g.stride_w = s;
  g.pad_h = g.pad_w = p;
  g.dilation_h = g.dilation_w = d;
  g.in_h = h;
  g.in_w = w;
  return g;
}

/// PEFT numbers for loha on a Conv2d base: out, grad.x, every factor gradient, delta, merged weight, merged_out.
template <class T>
void check_conv_reference(const std::string& file, const Conv2dGeometry& geo) {
  INFO("reference file " << file);
  const json j = load_reference(file);
  const double tol = reference_tol<T>();
  const std::string lname = j.at("layer");
  Generator gen(0);
  Adapted<Conv2d<T>, Loha> l(Conv2d<T>(geo, true, gen), lname);
  as_mat(l.base().weight()) = ref_tensor<T>(j, lname + ".weight");
  as_mat(l.base().bias()) = ref_tensor<T>(j, lname + ".bias");
  const auto& c = j.at("config").at("default");
  LohaConfig cfg = loha_conv_config(c);
  l.add_adapter("default", cfg, gen);
  CHECK(double(l.template adapter<Loha>("default").scaling) == Approx(j.at("scaling").at("default").at(lname).get<double>()));
  std::vector<std::string> names;
  l.visit_parameters([&](ParamRef<T> p) {
    if (!p.trainable) return;
    names.push_back(peft_name(lname, p.name));
    const Mat<T> v = ref_tensor<T>(j, names.back());
    REQUIRE(std::size_t(v.size()) == p.size);
    std::copy(v.data(), v.data() + v.size(), p.value);
  });
  CHECK(names == j.at("trainable").get<std::vector<std::string>>());  // exactly PEFT's tensors
  l.eval();
  double worst = 0;
  auto cmp = [&](const std::string& what, const auto& ours, const Mat<T>& theirs) {
    const double e = scaled_diff(ours, theirs);
    INFO(what << ": scaled error " << e);
    CHECK(e < tol);
    worst = std::max(worst, e);
  };
  const Mat<T> x = ref_tensor<T>(j, "x"), g = ref_tensor<T>(j, "grad_out");
  auto ctx = l.make_context(x.rows());
  Mat<T> y(x.rows(), geo.out_size()), dx(x.rows(), geo.in_size());
  l.forward(ctx, x, y);
  l.backward(ctx, g, dx, GradMode::overwrite);
  cmp("out", y, ref_tensor<T>(j, "out"));
  cmp("grad.x", dx, ref_tensor<T>(j, "grad.x"));
  l.visit_parameters([&](ParamRef<T> p) {
    if (!p.trainable) return;
    const std::string n = "grad." + peft_name(lname, p.name);
    const Mat<T> expect = ref_tensor<T>(j, n);
    REQUIRE(std::size_t(expect.size()) == p.size);
    cmp(n, Eigen::Map<const Mat<T>>(p.grad, expect.rows(), expect.cols()), expect);
  });
  Mat<T> delta(geo.out_channels, geo.patch());
  l.delta_weight("default", delta);
  cmp("delta", delta, ref_tensor<T>(j, "delta." + lname));
  l.disable_adapters();
  l.forward(ctx, x, y);
  cmp("base_out", y, ref_tensor<T>(j, "base_out"));
  l.enable_adapters();
  l.merge();
  cmp("merged weight", as_mat(l.base().weight()), ref_tensor<T>(j, "merged." + lname + ".weight"));
  cmp("merged bias", as_mat(l.base().bias()), ref_tensor<T>(j, "merged." + lname + ".bias"));
  l.forward(ctx, x, y);
  cmp("merged_out", y, ref_tensor<T>(j, "merged_out"));
  l.unmerge();
  cmp("unmerged weight", as_mat(l.base().weight()), ref_tensor<T>(j, lname + ".weight"));
  if (std::getenv("PEFT_PRINT_ERRORS")) std::printf("%s: worst scaled error vs PEFT %.3g\n", file.c_str(), worst);
}

}  // namespace

TEMPLATE_TEST_CASE("loha on conv2d: backward matches finite differences", "[loha][conv2d][grad]", float, double) {
  using T = TestType;
  const std::vector<Conv2dGeometry> geos = {loha_lc_geo(3, 4, 3, 1, 1, 1, 6, 6), loha_lc_geo(3, 4, 3, 2, 0, 1, 7, 7),
                                            loha_lc_geo(2, 3, 3, 1, 2, 2, 5, 6), loha_lc_geo(4, 2, 1, 1, 0, 1, 3, 3),
                                            loha_lc_geo(5, 6, 3, 1, 1, 1, 4, 4)};
  for (const auto& g : geos) {
    CAPTURE(g.in_channels, g.out_channels, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h, g.in_h, g.in_w);
    for (int variant = 0; variant < 3; ++variant) {
      CAPTURE(variant);
      auto build = [&](auto tag) {
        using U = decltype(tag);
        Generator gen(3);
        Adapted<Conv2d<U>, Loha> l(Conv2d<U>(g, true, gen));
        l.add_adapter("default", loha_fd_config(variant, 0), gen);
        if (variant == 1) l.base().set_requires_grad(true);
        if (variant == 2) {
          l.add_adapter("second", loha_fd_config(variant, 1), gen);
          l.set_adapter(std::vector<std::string>{"default", "second"});
        }
        return l;
      };
      auto l = build(T{});
      auto twin = build(double{});
      check_layer_gradients(l, twin, 2);
    }
  }
}

TEMPLATE_TEST_CASE("reference: loha on Conv2d matches Hugging Face PEFT", "[reference][loha][conv2d]", float, double) {
  using T = TestType;
  const std::string sfx = std::is_same_v<T, float> ? "_f32.json" : "_f64.json";
  loha_reference_cases<T>(sfx);
}

namespace {
template <class T>
void loha_reference_cases(const std::string& sfx) {
  check_conv_reference<T>("loha_conv2d_default" + sfx, loha_lc_geo(3, 4, 3, 1, 1, 1, 6, 6));
  check_conv_reference<T>("loha_conv2d_s2_default" + sfx, loha_lc_geo(3, 4, 3, 2, 0, 1, 7, 7));
}
}  // namespace

TEST_CASE("loha on conv2d: use_effective_conv2d selects the CP form, except on 1x1 kernels", "[loha][conv2d][cp]") {
  // (the CP form itself is tested in test_cp_conv.cpp)
  Generator g(1);
  LohaConfig c;
  c.r = 2;
  c.use_effective_conv2d = true;
  Adapted<Conv2d<float>, Loha> l(Conv2d<float>(loha_lc_geo(3, 4, 3, 1, 1, 1, 6, 6), true, g));
  l.add_adapter("default", c, g);
  const auto& a = loha_adapter(l, "default");
  CHECK(a.cp);
  CHECK(a.hada_t1().rows == 2);
  CHECK(a.hada_t1().cols == 2 * 9);
  CHECK(a.hada_w1_a().rows == 2);  // PEFT's (r, out) in the CP form
  CHECK(a.hada_w1_a().cols == 4);
  CHECK(a.hada_w1_b().cols == 3);
  Adapted<Conv2d<float>, Loha> one(Conv2d<float>(loha_lc_geo(3, 4, 1, 1, 0, 1, 5, 5), true, g));
  one.add_adapter("default", c, g);  // PEFT ignores use_effective_conv2d on 1×1 kernels
  CHECK(!loha_adapter(one, "default").cp);
  CHECK(loha_adapter(one, "default").cols == 3);
}
