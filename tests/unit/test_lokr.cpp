// LoKr on Linear: PEFT's factorization and tensor-layout rules against PEFT itself
// (tests/reference/data/lokr_factorization.json), gradients against finite differences (full and low-rank
// blocks, decompose_both, decompose_factor, rank/module dropout, two adapters), PEFT's properties, numbers
// from real Hugging Face PEFT 0.21.2 (lokr_linear*_*.json) and bad input. (The allocation-free hot path of LoHa
// and LoKr layers is tested in test_alloc.cpp.)
#include <catch2/catch.hpp>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <new>

#include "layer_check.hpp"
#include "reference.hpp"

using namespace peft;
using namespace peft::test;
using json = nlohmann::json;

namespace {

template <class T>
using LokrLinear = Adapted<Linear<T>, Lokr>;

struct Case {
  peft::Index m, in, out;
  int r;
  double alpha;
  bool decompose_both = false;
  int factor = -1;
  bool fifo = false;
  double rank_dropout = 0.0;
  bool rank_dropout_scale = false;
  double module_dropout = 0.0;
};

LokrConfig config_of(const Case& c, LokrInit init = LokrInit::off) {
  LokrConfig cfg;
  cfg.r = c.r;
  cfg.alpha = c.alpha;
  cfg.decompose_both = c.decompose_both;
  cfg.decompose_factor = c.factor;
  cfg.rank_dropout = c.rank_dropout;
  cfg.rank_dropout_scale = c.rank_dropout_scale;
  cfg.module_dropout = c.module_dropout;
  cfg.init_weights = init;
  return cfg;
}

template <class T>
LokrLinear<T> make_layer(const Case& c, std::uint64_t seed = 11, LokrInit init = LokrInit::off) {
  Generator gen(seed);
  LokrLinear<T> l(Linear<T>(c.in, c.out, true, gen, c.fifo ? WeightLayout::in_out : WeightLayout::out_in), "model.layers.0.v_proj");
  l.add_adapter("default", config_of(c, init), gen);
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

/// ΔW by the formula, in double: s · kron(w1, w2) with w1 = lokr_w1 or w1_a w1_b, w2 likewise.
template <class A>
Mat<double> expected_delta(A& a) {
  auto d = [](auto v) { return as_mat(v).template cast<double>().eval(); };
  const Mat<double> w1 = a.layout.full_w1 ? d(a.lokr_w1()) : Mat<double>(d(a.lokr_w1_a()) * d(a.lokr_w1_b()));
  const Mat<double> w2 = a.layout.full_w2 ? d(a.lokr_w2()) : Mat<double>(d(a.lokr_w2_a()) * d(a.lokr_w2_b()));
  Mat<double> k(w1.rows() * w2.rows(), w1.cols() * w2.cols());
  for (peft::Index i = 0; i < w1.rows(); ++i)
    for (peft::Index j = 0; j < w1.cols(); ++j) k.block(i * w2.rows(), j * w2.cols(), w2.rows(), w2.cols()) = w1(i, j) * w2;
  return double(a.scaling) * k;
}

// ---- reference files ---------------------------------------------------------------------------------

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
  LokrLinear<T> l(std::move(base), lname);
  const auto& c = j.at("config").at("default");
  LokrConfig cfg;
  cfg.r = c.at("r");
  cfg.alpha = c.at("alpha");
  cfg.rank_dropout = c.at("rank_dropout");
  cfg.module_dropout = c.at("module_dropout");
  cfg.decompose_both = c.at("decompose_both");
  cfg.decompose_factor = c.at("decompose_factor");
  cfg.rank_dropout_scale = c.at("rank_dropout_scale");
  cfg.init_weights = c.at("init_weights").get<bool>() ? LokrInit::standard : LokrInit::off;
  l.add_adapter("default", cfg, gen);
  CHECK(double(lokr_adapter(l, "default").scaling) == Approx(j.at("scaling").at("default").at(lname).get<double>()));
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

TEST_CASE("lokr: factorization reproduces PEFT's for every recorded (dimension, factor)", "[lokr][factorization]") {
  const json j = load_reference("lokr_factorization.json");
  std::size_t n = 0;
  for (const auto& e : j.at("factorization")) {
    const peft::Index dim = e.at("dimension"), factor = e.at("factor");
    const auto expect = e.at("result").get<std::vector<peft::Index>>();
    CAPTURE(dim, factor);
    const auto [m, k] = lokr_factorization(dim, factor);
    CHECK(m == expect[0]);
    CHECK(k == expect[1]);
    ++n;
  }
  CHECK(n == 125);
  // the documented examples, including the unsorted pair when the factor divides
  CHECK(lokr_factorization(768) == std::pair<peft::Index, peft::Index>{24, 32});
  CHECK(lokr_factorization(11008) == std::pair<peft::Index, peft::Index>{86, 128});
  CHECK(lokr_factorization(8, 4) == std::pair<peft::Index, peft::Index>{4, 2});
  CHECK(lokr_factorization(16, 16) == std::pair<peft::Index, peft::Index>{16, 1});
  CHECK(lokr_factorization(30, 4) == std::pair<peft::Index, peft::Index>{3, 10});
  CHECK(lokr_factorization(81, 2) == std::pair<peft::Index, peft::Index>{1, 81});
}

TEST_CASE("lokr: which tensors exist, and their shapes, follow PEFT for every recorded layer", "[lokr][layout]") {
  const json j = load_reference("lokr_factorization.json");
  std::size_t n = 0, built = 0;
  for (const auto& e : j.at("shapes")) {
    const bool conv = e.at("layer") == "conv2d";
    const peft::Index out = e.at("out"), in = e.at("in");
    const int r = e.at("r"), factor = e.at("decompose_factor");
    const bool both = e.at("decompose_both");
    CAPTURE(e.dump());
    const LokrLayout l = conv ? LokrLayout::conv2d(out, in, e.at("kernel")[0].get<peft::Index>(), e.at("kernel")[1].get<peft::Index>(), r, both,
                                                         factor, e.at("use_effective_conv2d").get<bool>())
                              : LokrLayout::linear(out, in, r, both, factor);
    CHECK(std::vector<peft::Index>{l.out_l, l.out_k} == e.at("out_factors").get<std::vector<peft::Index>>());
    CHECK(std::vector<peft::Index>{l.in_m, l.in_n} == e.at("in_factors").get<std::vector<peft::Index>>());
    std::map<std::string, std::vector<peft::Index>> ours, theirs;
    for (const auto& [name, shape] : l.tensors()) ours[name] = shape;
    for (const auto& [name, shape] : e.at("tensors").items()) theirs[name] = shape.get<std::vector<peft::Index>>();
    CHECK(ours == theirs);
    ++n;
    if (!conv) {  // the Linear bank allocates exactly these tensors, under PEFT's names
      Generator g(1);
      LokrLinear<float> layer(Linear<float>(in, out, false, g));
      LokrConfig cfg;
      cfg.r = r;
      cfg.decompose_both = both;
      cfg.decompose_factor = factor;
      layer.add_adapter("default", cfg, g);
      std::map<std::string, std::size_t> sizes;
      layer.visit_parameters([&](ParamRef<float> p) { if (p.name != "weight") sizes[p.name] = p.size; });
      std::map<std::string, std::size_t> expect;
      for (const auto& [name, shape] : theirs) expect[name + ".default"] = std::size_t(shape[0] * shape[1]);
      CHECK(sizes == expect);
      ++built;
    }
  }
  CHECK(n == 72);
  CHECK(built > 20);
}

TEMPLATE_TEST_CASE("lokr: backward matches finite differences", "[lokr][grad]", float, double) {
  using T = TestType;
  const Case c = GENERATE(Case{5, 10, 8, 4, 8.0},                          // both blocks full
                          Case{2, 81, 6, 4, 8.0},                          // w2 low rank
                          Case{3, 81, 6, 4, 8.0, true},                    // decompose_both: both low rank
                          Case{2, 81, 6, 4, 8.0, false, 2},                // decompose_factor 2 (does not divide 81)
                          Case{4, 24, 16, 1, 2.0, true, 4},                // factor 4 divides both; r = 1
                          Case{3, 30, 12, 2, 3.0, false, -1, true},        // Conv1D layout
                          Case{4, 20, 12, 1, 4.0, true, -1, false, 0.4},   // rank dropout, unscaled
                          Case{4, 20, 12, 1, 4.0, false, -1, true, 0.4, true, 0.5},  // scaled, + module dropout
                          Case{1, 7, 5, 3, 6.0});                          // prime sizes: (1, n) blocks
  CAPTURE(c.m, c.in, c.out, c.r, c.alpha, c.decompose_both, c.factor, c.fifo, c.rank_dropout, c.rank_dropout_scale, c.module_dropout);
  auto layer = make_layer<T>(c);
  auto twin = make_layer<double>(c);
  check_layer_gradients(layer, twin, c.m);
  SECTION("two active adapters (one decompose_both), both trainable") {
    Case c2 = c;
    c2.r = 1;
    c2.decompose_both = !c.decompose_both;
    c2.alpha = 3.0;
    Generator g(21), gd(21);
    layer.add_adapter("second", config_of(c2), g);
    twin.add_adapter("second", config_of(c2), gd);
    layer.set_adapter(std::vector<std::string>{"default", "second"});
    twin.set_adapter(std::vector<std::string>{"default", "second"});
    check_layer_gradients(layer, twin, c.m, 3);
  }
  SECTION("frozen adapter: dx only; base fine-tuned") {
    layer.set_requires_grad("default", false);
    twin.set_requires_grad("default", false);
    layer.base().set_requires_grad(true);
    twin.base().set_requires_grad(true);
    check_layer_gradients(layer, twin, c.m, 9);
  }
}

TEMPLATE_TEST_CASE("lokr: PEFT's properties", "[lokr][props]", float, double) {
  using T = TestType;
  const Case c{6, 24, 16, 1, 3.0, true};  // 24 = 4·6, 16 = 4·4: with r = 1 both blocks are low rank (1 < 4/2)
  const Mat<T> x = random_mat<T>(c.m, c.in, 21);
  Generator gen(4);
  Linear<T> plain(c.in, c.out, true, gen);
  Mat<T> y_base(c.m, c.out);
  {
    auto ctx = plain.make_context(c.m);
    plain.forward(ctx, x, y_base);
  }

  SECTION("default and 'lycoris' init are the identity exactly; False is not") {
    for (bool both : {false, true}) {
      CAPTURE(both);
      Case cc = c;
      cc.decompose_both = both;
      for (LokrInit init : {LokrInit::standard, LokrInit::lycoris}) {
        LokrLinear<T> l(plain);
        Generator g(9);
        l.add_adapter("default", config_of(cc, init), g);
        CHECK(run_forward(l, x) == y_base);
        auto& a = lokr_adapter(l, "default");
        const bool w1_zero = init == LokrInit::standard;
        auto maxabs = [](auto v) { return v.empty() ? -1.0 : double(as_mat(v).cwiseAbs().maxCoeff()); };
        if (a.layout.full_w1) CHECK((maxabs(a.lokr_w1()) == 0.0) == w1_zero);
        else CHECK((maxabs(a.lokr_w1_a()) == 0.0) == w1_zero);
        CHECK((maxabs(a.layout.full_w2 ? a.lokr_w2() : a.lokr_w2_b()) == 0.0) == !w1_zero);
        if (!a.layout.full_w2) CHECK(maxabs(a.lokr_w2_a()) > 0);
      }
      LokrLinear<T> l(plain);
      Generator g(9);
      l.add_adapter("default", config_of(cc, LokrInit::off), g);
      CHECK(max_abs_diff(run_forward(l, x), y_base) > 1e-3);
    }
    LokrLinear<T> d(plain);
    Generator g(1);
    d.add_adapter("default", LokrConfig{}, g);  // r = alpha = 8 on 24 → 16: w1 (4, 4), w2 (4, 6) full, s = 1
    const auto& a = lokr_adapter(d, "default");
    CHECK(a.layout.full_w1);
    CHECK(a.layout.full_w2);
    CHECK(a.scaling == T(1));
    CHECK(as_mat(a.lokr_w2()).cwiseAbs().maxCoeff() <= T(1.0 / std::sqrt(6.0)));
  }
  SECTION("delta_weight is s·kron(w1, w2) in either layout; merge = unmerged; unmerge restores; bias untouched") {
    for (bool fifo : {false, true}) {
      for (bool both : {false, true}) {
        CAPTURE(fifo, both);
        Case cc = c;
        cc.fifo = fifo;
        cc.decompose_both = both;
        auto l = make_layer<T>(cc, 5);
        CHECK(lokr_adapter(l, "default").layout.full_w1 == !both);
        CHECK(!lokr_adapter(l, "default").layout.full_w2);
        l.eval();
        const Mat<T> y = run_forward(l, x);
        CHECK(max_abs_diff(y, y_base) > 1e-3);
        const Mat<T> w0 = as_mat(l.base().weight()), b0 = as_mat(l.base().bias());
        Mat<T> delta(w0.rows(), w0.cols());
        l.delta_weight("default", delta);
        const Mat<double> expect = expected_delta(lokr_adapter(l, "default"));
        CHECK(max_abs_diff(delta, fifo ? Mat<double>(expect.transpose()) : expect) < 10 * value_tol<T>());
        const Mat<T> dW = fifo ? Mat<T>(delta.transpose()) : delta;
        l.merge();
        CHECK(max_abs_diff(as_mat(l.base().weight()), (w0 + delta).eval()) < 10 * value_tol<T>());
        CHECK(as_mat(l.base().bias()) == b0);
        CHECK(max_abs_diff(run_forward(l, x), y) < 100 * value_tol<T>());
        l.unmerge();
        CHECK(max_abs_diff(as_mat(l.base().weight()), w0) < 10 * value_tol<T>());
        l.disable_adapters();
        const Mat<T> y0 = run_forward(l, x);
        CHECK(max_abs_diff(y - y0, x * dW.transpose()) < 20 * value_tol<T>());
      }
    }
  }
  SECTION("parameter names are PEFT's bare tensor names with the adapter name") {
    LokrLinear<T> l(plain);
    Generator g(3);
    l.add_adapter("default", config_of(c), g);
    Case full = c;
    full.r = 8;
    l.add_adapter("full", config_of(full), g);
    std::vector<std::string> names;
    l.visit_parameters([&](ParamRef<T> p) { names.push_back(p.name); });
    CHECK(names == std::vector<std::string>{"weight", "bias", "lokr_w1_a.default", "lokr_w1_b.default", "lokr_w2_a.default",
                                            "lokr_w2_b.default", "lokr_w1.full", "lokr_w2.full"});
  }
  SECTION("rank_pattern and alpha_pattern; the alpha/r scale applies even with full blocks") {
    LokrConfig cfg = config_of(c);
    cfg.rank_pattern = {{"v_proj", 16}};
    cfg.alpha_pattern = {{"layers\\.0\\.v_proj", 4.0}};
    Generator g(1);
    LokrLinear<T> l(plain, "model.layers.0.v_proj");
    l.add_adapter("default", cfg, g);
    const auto& a = lokr_adapter(l, "default");
    CHECK(a.r == 16);
    CHECK(a.layout.full_w1);
    CHECK(a.layout.full_w2);
    CHECK(a.scaling == Approx(0.25));
  }
  SECTION("rank dropout rescales by 1/mean(keep) only with rank_dropout_scale; module dropout skips the adapter") {
    for (bool scale : {false, true}) {
      Case cd = c;
      cd.rank_dropout = 0.5;
      cd.rank_dropout_scale = scale;
      auto l = make_layer<T>(cd, 17);
      Mat<T> delta(c.out, c.in);
      l.delta_weight("default", delta);
      auto ctx = l.make_context(c.m);
      Mat<T> y(c.m, c.out);
      l.set_seed(2);
      l.forward(ctx, x, y);
      const auto& mask = std::get<0>(ctx.banks).slots[0].mask;
      int kept = 0;
      for (peft::Index i = 0; i < c.out; ++i) kept += mask[std::size_t(i)] != T(0);
      REQUIRE(kept > 0);
      REQUIRE(kept < c.out);
      for (peft::Index i = 0; i < c.out; ++i) {
        const double v = double(mask[std::size_t(i)]);
        CHECK((v == 0.0 || std::abs(v - (scale ? double(c.out) / kept : 1.0)) < 1e-6));
        delta.row(i) *= T(v);
      }
      l.disable_adapters();
      const Mat<T> y0 = run_forward(l, x);
      CHECK(max_abs_diff(y - y0, x * delta.transpose()) < 50 * value_tol<T>());
    }
    Case cm = c;
    cm.module_dropout = 0.6;
    LokrLinear<T> l(plain);
    Generator g(17);
    l.add_adapter("default", config_of(cm), g);
    int skipped = 0;
    for (std::uint64_t seed = 0; seed < 200; ++seed) skipped += run_forward(l, x, seed) == y_base;
    CHECK(skipped > 95);
    CHECK(skipped < 145);
    l.eval();
    CHECK(max_abs_diff(run_forward(l, x), y_base) > 1e-3);
  }
}

TEMPLATE_TEST_CASE("reference: LoKr on Linear matches Hugging Face PEFT", "[reference][lokr]", float, double) {
  using T = TestType;
  const std::string which = GENERATE("linear_default", "linear81_default", "linear81_decompose_both", "linear81_factor2");
  check_reference<T>("lokr_" + which + (std::is_same_v<T, float> ? "_f32.json" : "_f64.json"));
}

TEST_CASE("lokr: bad input gets a clear exception naming the field", "[lokr][errors]") {
  Generator g(1);
  LokrLinear<float> l(Linear<float>(8, 6, true, g));
  LokrConfig ok;
  ok.r = 2;
  l.add_adapter("default", ok, g);
  auto bad = [&](auto edit, const char* message) {
    LokrConfig c = ok;
    edit(c);
    REQUIRE_THROWS_AS(l.add_adapter("bad", c, g), ConfigError);
    REQUIRE_THROWS_WITH(l.add_adapter("bad", c, g), Catch::Contains(message));
  };
  bad([](LokrConfig& c) { c.r = 0; }, "LokrConfig: r must be a positive integer, got 0");
  bad([](LokrConfig& c) { c.r = -1; }, "got -1");
  bad([](LokrConfig& c) { c.rank_pattern = {{"x", -4}}; }, "rank_pattern['x'] must be a positive integer, got -4");
  bad([](LokrConfig& c) { c.decompose_factor = 0; }, "decompose_factor must be -1 (automatic) or a positive integer, got 0");
  bad([](LokrConfig& c) { c.decompose_factor = -3; }, "decompose_factor must be -1 (automatic) or a positive integer, got -3");
  bad([](LokrConfig& c) { c.module_dropout = 1.0; }, "module_dropout must be in [0, 1), got 1");
  bad([](LokrConfig& c) { c.module_dropout = -0.5; }, "module_dropout must be in [0, 1)");
  bad([](LokrConfig& c) { c.rank_dropout = -0.1; }, "rank_dropout must be in [0, 1)");
  bad([](LokrConfig& c) { c.alpha = std::numeric_limits<double>::infinity(); }, "alpha must be finite");
  CHECK(l.adapter_names() == std::vector<std::string>{"default"});
  // a factor that does not divide the dimension is valid, as in PEFT: it caps the smaller factor
  LokrConfig f = ok;
  f.decompose_factor = 5;
  l.add_adapter("factor5", f, g);
  CHECK(lokr_adapter(l, "factor5").layout.out_l * lokr_adapter(l, "factor5").layout.out_k == 6);
  REQUIRE_THROWS_WITH(lokr_adapter(l, "nope"), Catch::Contains("does not exist"));
  // typed access checks the kind
  Adapted<Linear<float>, Loha, Lokr> mixed(Linear<float>(8, 6, true, g));
  mixed.add_adapter("k", ok, g);
  REQUIRE_THROWS_WITH(loha_adapter(mixed, "k"), Catch::Contains("is not of kind loha"));
}

namespace {
LokrConfig lokr_conv_config(const json& c) {
  LokrConfig cfg;
  cfg.r = c.at("r");
  cfg.alpha = c.at("alpha");
  cfg.rank_dropout = c.at("rank_dropout");
  cfg.module_dropout = c.at("module_dropout");
  cfg.decompose_both = c.at("decompose_both");
  cfg.decompose_factor = c.at("decompose_factor");
  cfg.rank_dropout_scale = c.at("rank_dropout_scale");
  cfg.use_effective_conv2d = c.at("use_effective_conv2d");
  cfg.init_weights = c.at("init_weights").get<bool>() ? LokrInit::standard : LokrInit::off;
  return cfg;
}
/// variant 0: default blocks; 1: r = 1 with decompose_both (low-rank w1 and w2 where the shapes allow);
/// 2: a second adapter beside the first.
LokrConfig lokr_fd_config(int variant, int which) {
  LokrConfig cfg;
  cfg.r = which == 0 ? (variant == 1 ? 1 : 2) : 1;
  cfg.alpha = which == 0 ? 4 : 3;
  cfg.decompose_both = variant == 1 || which == 1;
  cfg.init_weights = LokrInit::off;
  return cfg;
}
template <class T>
void lokr_reference_cases(const std::string& sfx);
}  // namespace

// ---- lokr on Conv2d (non-CP form) ----

namespace {

Conv2dGeometry lokr_lc_geo(Index c, Index o, Index k, Index s, Index p, Index d, Index h, Index w) {
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

/// PEFT numbers for lokr on a Conv2d base: out, grad.x, every factor gradient, delta, merged weight, merged_out.
template <class T>
void check_conv_reference(const std::string& file, const Conv2dGeometry& geo) {
  INFO("reference file " << file);
  const json j = load_reference(file);
  const double tol = reference_tol<T>();
  const std::string lname = j.at("layer");
  Generator gen(0);
  Adapted<Conv2d<T>, Lokr> l(Conv2d<T>(geo, true, gen), lname);
  as_mat(l.base().weight()) = ref_tensor<T>(j, lname + ".weight");
  as_mat(l.base().bias()) = ref_tensor<T>(j, lname + ".bias");
  const auto& c = j.at("config").at("default");
  LokrConfig cfg = lokr_conv_config(c);
  l.add_adapter("default", cfg, gen);
  CHECK(double(l.template adapter<Lokr>("default").scaling) == Approx(j.at("scaling").at("default").at(lname).get<double>()));
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

TEMPLATE_TEST_CASE("lokr on conv2d: backward matches finite differences", "[lokr][conv2d][grad]", float, double) {
  using T = TestType;
  const std::vector<Conv2dGeometry> geos = {lokr_lc_geo(3, 4, 3, 1, 1, 1, 6, 6), lokr_lc_geo(3, 4, 3, 2, 0, 1, 7, 7),
                                            lokr_lc_geo(2, 3, 3, 1, 2, 2, 5, 6), lokr_lc_geo(4, 2, 1, 1, 0, 1, 3, 3),
                                            lokr_lc_geo(5, 6, 3, 1, 1, 1, 4, 4)};
  for (const auto& g : geos) {
    CAPTURE(g.in_channels, g.out_channels, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h, g.in_h, g.in_w);
    for (int variant = 0; variant < 3; ++variant) {
      CAPTURE(variant);
      auto build = [&](auto tag) {
        using U = decltype(tag);
        Generator gen(3);
        Adapted<Conv2d<U>, Lokr> l(Conv2d<U>(g, true, gen));
        l.add_adapter("default", lokr_fd_config(variant, 0), gen);
        if (variant == 1) l.base().set_requires_grad(true);
        if (variant == 2) {
          l.add_adapter("second", lokr_fd_config(variant, 1), gen);
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

TEMPLATE_TEST_CASE("reference: lokr on Conv2d matches Hugging Face PEFT", "[reference][lokr][conv2d]", float, double) {
  using T = TestType;
  const std::string sfx = std::is_same_v<T, float> ? "_f32.json" : "_f64.json";
  lokr_reference_cases<T>(sfx);
}

namespace {
template <class T>
void lokr_reference_cases(const std::string& sfx) {
  check_conv_reference<T>("lokr_conv2d_default" + sfx, lokr_lc_geo(3, 4, 3, 1, 1, 1, 6, 6));     // w1 (2,1), full 4-D w2
  check_conv_reference<T>("lokr_conv2d_effective" + sfx, lokr_lc_geo(3, 4, 3, 1, 1, 1, 6, 6));   // full w2: no CP form
  check_conv_reference<T>("lokr_conv2d_wide_lowrank" + sfx, lokr_lc_geo(5, 6, 3, 1, 1, 1, 4, 4));  // w2_a (3,2), w2_b (2,45)
}
}  // namespace

TEST_CASE("lokr on conv2d: use_effective_conv2d with a low-rank w2 selects the CP form", "[lokr][conv2d][cp]") {
  // (the CP form itself is tested in test_cp_conv.cpp)
  Generator g(1);
  LokrConfig c;
  c.r = 2;
  c.alpha = 4;
  c.use_effective_conv2d = true;
  Adapted<Conv2d<float>, Lokr> l(Conv2d<float>(lokr_lc_geo(5, 6, 3, 1, 1, 1, 4, 4), true, g));
  l.add_adapter("default", c, g);
  const auto& a = lokr_adapter(l, "default");
  CHECK(a.cp());
  CHECK(a.lokr_t2().cols == 2 * 9);
  CHECK(a.lokr_w2_a().rows == 2);  // PEFT's (r, out_k) in the CP form
  CHECK(a.lokr_w2_a().cols == 3);
  CHECK(a.lokr_w2_b().cols == 5);
  c.use_effective_conv2d = false;
  Adapted<Conv2d<float>, Lokr> flat(Conv2d<float>(lokr_lc_geo(5, 6, 3, 1, 1, 1, 4, 4), true, g));
  flat.add_adapter("default", c, g);
  const auto& b = lokr_adapter(flat, "default");
  CHECK(!b.cp());
  CHECK(!b.layout.full_w2);
  CHECK(b.lokr_w2_b().cols == 45);
}
