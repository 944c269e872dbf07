// DoRA (LoRA's use_dora) on Linear, Conv2d and Embedding: gradients against finite differences of independent
// models with the norm held constant (PEFT's detached norm), several active adapters (PEFT's running-result
// rule), the magnitude init, identity at init, merge/unmerge, disable, bad input, and real PEFT numbers.
#include <catch2/catch.hpp>
#include <fstream>
#include <nlohmann/json.hpp>

#include "conv_ref.hpp"
#include "layer_check.hpp"
#include "reference.hpp"

using namespace peft;
using namespace peft::test;
using json = nlohmann::json;

namespace {

template <class T>
using LoraLinear = Adapted<Linear<T>, Lora>;

struct Case {
  peft::Index m, in, out;
  int r;
  double alpha;
  bool rslora = false, fifo = false, bias = true;
  double dropout = 0.0;
};

LoraConfig dora_config(const Case& c, LoraInit init = LoraInit::off, bool dora = true) {
  LoraConfig cfg;
  cfg.r = c.r;
  cfg.lora_alpha = c.alpha;
  cfg.use_rslora = c.rslora;
  cfg.fan_in_fan_out = c.fifo;
  cfg.lora_dropout = c.dropout;
  cfg.init_lora_weights = init;
  cfg.use_dora = dora;
  return cfg;
}

/// m ← m · U(0.5, 1.5), as the reference generator does: otherwise g ≡ 1 and DoRA's own terms vanish.
template <class T>
void scramble_magnitude(LoraLinear<T>& l, const std::string& name, std::uint64_t seed) {
  auto& a = lora_adapter(l, name);
  std::vector<double> u(a.magnitude.size());
  Generator(seed).uniform(u.data(), u.size(), 0.5, 1.5);
  for (std::size_t i = 0; i < u.size(); ++i) a.magnitude[i] = T(double(a.magnitude[i]) * u[i]);
}

/// A DoRA layer with non-identity init (init_lora_weights=False and a scrambled magnitude).
template <class T>
LoraLinear<T> make_layer(const Case& c, std::uint64_t seed = 11) {
  Generator gen(seed);
  LoraLinear<T> l(Linear<T>(c.in, c.out, c.bias, gen, c.fifo ? WeightLayout::in_out : WeightLayout::out_in));
  l.add_adapter("default", dora_config(c), gen);
  scramble_magnitude(l, "default", seed + 1);
  return l;
}

template <class T>
Mat<double> to_double(ConstMatrixView<T> v) {
  return as_mat(v).template cast<double>();
}

/// The test oracle: PEFT's LoRA/DoRA forward on Linear (lora/layer.py Linear.forward, variants.py
/// DoraLinearVariant.forward, dora.py DoraLinearLayer.forward) written directly with Eigen in double.
/// Adapters run in the active order; a DoRA adapter without active dropout rescales the running result.
/// The row norms are computed by make_context() from the parameters at that moment and then held fixed,
/// so central differences of this model are the detached-norm gradient that PEFT's autograd computes
/// (check_layer_gradients makes the twin's context once, after copying the parameters in and before any
/// perturbation). Parameters are visited in the layer's order, so check_layer_gradients pairs them up.
struct RefDora {
  using scalar = double;
  struct Ad {
    Mat<double> A, B, m;  // m: [1, out], DoRA only
    double s = 1, p = 0;
    bool dora = false;
  };
  struct Context {};
  Mat<double> W, b, gW, gb;  // W as stored ([in, out] for fifo); b: [1, out] or empty
  bool fifo = false, base_trainable = false, training = true;
  std::vector<Ad> ads;     // slot (= add) order
  std::vector<int> order;  // the active order
  std::vector<Mat<double>> norms;
  std::uint64_t seed = 0, forwards = 0;

  template <class T>
  static RefDora of(LoraLinear<T>& l) {
    RefDora r;
    r.W = to_double(ConstMatrixView<T>(l.base().weight()));
    if (l.base().has_bias()) r.b = to_double(ConstMatrixView<T>(l.base().bias()));
    r.fifo = l.base().layout() == WeightLayout::in_out;
    r.base_trainable = l.base().requires_grad();
    r.gW = Mat<double>::Zero(r.W.rows(), r.W.cols());
    r.gb = Mat<double>::Zero(1, r.b.size());
    r.training = l.is_training();
    const auto names = l.adapter_names();
    for (const auto& n : names) {
      const auto& a = lora_adapter(l, n);
      REQUIRE_FALSE(a.config.lora_bias);
      r.ads.push_back({to_double(a.A()), to_double(a.B()), a.dora() ? to_double(a.M()) : Mat<double>(), double(a.scaling),
                       a.config.lora_dropout, a.dora()});
    }
    for (const auto& n : l.active_adapters()) r.order.push_back(int(std::find(names.begin(), names.end(), n) - names.begin()));
    return r;
  }

  peft::Index in_features() const { return fifo ? W.rows() : W.cols(); }
  peft::Index out_features() const { return fifo ? W.cols() : W.rows(); }
  Mat<double> weight_out_in() const { return fifo ? Mat<double>(W.transpose()) : W; }
  void set_seed(std::uint64_t s) {
    seed = s;
    forwards = 0;
  }
  template <class F>
  void visit_parameters(F&& f) {
    f(ParamRef<double>{"weight", W.data(), gW.data(), std::size_t(W.size()), base_trainable});
    if (b.size()) f(ParamRef<double>{"bias", b.data(), gb.data(), std::size_t(b.size()), base_trainable});
    for (auto& a : ads) {
      f(ParamRef<double>{"A", a.A.data(), nullptr, std::size_t(a.A.size()), true});
      f(ParamRef<double>{"B", a.B.data(), nullptr, std::size_t(a.B.size()), true});
      if (a.dora) f(ParamRef<double>{"m", a.m.data(), nullptr, std::size_t(a.m.size()), true});
    }
  }
  Context make_context(peft::Index) {
    norms.clear();
    const Mat<double> w = weight_out_in();
    for (auto& a : ads) norms.push_back(a.dora ? Mat<double>((w + a.s * a.B * a.A).rowwise().norm().transpose()) : Mat<double>());
    return {};
  }
  void forward(Context&, const Mat<double>& x, Mat<double>& y) {
    const std::uint64_t fseed = peft::detail::random_bits(seed, 0x5EEDull, forwards++);  // as Adapted::forward
    const Mat<double> w = weight_out_in();
    Mat<double> bias_rows = Mat<double>::Zero(x.rows(), out_features());
    if (b.size()) bias_rows.rowwise() += Eigen::RowVectorXd(b.row(0));
    y = x * w.transpose() + bias_rows;
    for (int k : order) {
      const auto& a = ads[std::size_t(k)];
      Mat<double> xk = x;
      const bool dropped = training && a.p > 0;
      if (dropped) EigenCpu::dropout<double>(ConstMatrixView<double>(x), MatrixView<double>(xk), a.p, fseed, std::uint64_t(k));
      const Mat<double> lora = a.s * (xk * a.A.transpose() * a.B.transpose());
      if (!a.dora) {
        y += lora;
        continue;
      }
      const Eigen::RowVectorXd g = (a.m.array() / norms[std::size_t(k)].array()).matrix();
      const Mat<double> base_result = dropped ? Mat<double>(xk * w.transpose()) : Mat<double>(y - bias_rows);
      Mat<double> extra(y.rows(), y.cols());
      for (peft::Index i = 0; i < y.rows(); ++i)
        extra.row(i) = ((g.array() - 1) * base_result.row(i).array() + g.array() * lora.row(i).array()).matrix();
      y += extra;
    }
  }
};

template <class T>
Mat<T> forward_of(LoraLinear<T>& l, const Mat<T>& x) {
  Mat<T> y(x.rows(), l.out_features());
  auto ctx = l.make_context(x.rows());
  l.set_seed(5);
  l.forward(ctx, x, y);
  return y;
}

template <class T>
Mat<T> base_forward(const Linear<T>& base, const Mat<T>& x) {
  Mat<T> y(x.rows(), base.out_features());
  auto ctx = base.make_context(x.rows());
  base.forward(ctx, x, y);
  return y;
}

/// ‖W + s·B·A‖_row in double, W as stored.
template <class T>
Mat<double> row_norms_of(LoraLinear<T>& l, const std::string& name) {
  const auto& a = lora_adapter(l, name);
  Mat<double> w = to_double(ConstMatrixView<T>(l.base().weight()));
  if (a.config.fan_in_fan_out) w.transposeInPlace();
  return (w + double(a.scaling) * to_double(a.B()) * to_double(a.A())).rowwise().norm().transpose();
}

template <class T>
double eps() { return std::numeric_limits<T>::epsilon(); }

/// max |a − b| / max(1, max |b|): absolute for O(1) values, relative for large ones.
template <class A, class B>
double scaled_diff_of(const A& a, const B& b) {
  return max_abs_diff(a, b) / std::max(1.0, b.template cast<double>().cwiseAbs().maxCoeff());
}

const Case kCases[] = {
    Case{4, 6, 5, 2, 4.0},
    Case{7, 16, 9, 8, 16.0},
    Case{3, 5, 12, 4, 8.0, true},
    Case{6, 9, 7, 4, 8.0, false, true},
    Case{8, 10, 6, 4, 8.0, false, false, true, 0.25},
    Case{5, 20, 130, 3, 6.0, false, false, false},            // three norm blocks (64 + 64 + 2 rows), no bias
    Case{1, 33, 70, 16, 32.0, true, true, true, 0.5},         // two norm blocks in the [in, out] layout, dropout
    Case{3, 12, 66, 5, 10.0, false, true, false, 0.3},        // [in, out], no bias, dropout
};

}  // namespace

TEMPLATE_TEST_CASE("dora: backward matches finite differences of the detached-norm function", "[dora][grad]", float, double) {
  using T = TestType;
  for (const Case& c : kCases) {
    CAPTURE(c.m, c.in, c.out, c.r, c.alpha, c.rslora, c.fifo, c.bias, c.dropout);
    auto l = make_layer<T>(c);
    auto twin = RefDora::of(l);
    check_layer_gradients(l, twin, c.m);
    // full fine-tuning of the base under DoRA: W appears in x Wᵀ (and in the norm, which is detached)
    l.base().set_requires_grad(true);
    auto twin2 = RefDora::of(l);
    check_layer_gradients(l, twin2, c.m, 7);
    l.base().set_requires_grad(false);
    // eval mode: no dropout, the base term is the running result
    l.eval();
    auto twin3 = RefDora::of(l);
    check_layer_gradients(l, twin3, c.m, 9);
  }
}

TEMPLATE_TEST_CASE("dora: several active adapters follow PEFT's running-result rule", "[dora][grad][multi]", float, double) {
  using T = TestType;
  for (double p : {0.0, 0.2}) {
    for (bool fifo : {false, true}) {
      CAPTURE(p, fifo);
      const Case c{5, 11, 9, 3, 6.0, false, fifo, true, p};
      auto l = make_layer<T>(c, 21);
      Generator g(3);
      l.add_adapter("second", dora_config(Case{5, 11, 9, 2, 3.0, true, fifo, true, p}), g);
      scramble_magnitude(l, "second", 4);
      l.add_adapter("plain", dora_config(Case{5, 11, 9, 4, 8.0, false, fifo, true, p}, LoraInit::off, false), g);
      using V = std::vector<std::string>;
      for (const V& active : {V{"default", "second"}, V{"second", "default"}, V{"plain", "default", "second"}, V{"default", "plain"}}) {
        CAPTURE(active);
        l.set_adapter(active);
        for (bool train : {true, false}) {
          CAPTURE(train);
          l.train(train);
          auto twin = RefDora::of(l);
          check_layer_gradients(l, twin, 5, 13);
        }
      }
      // the order matters, as in PEFT: the later adapter rescales the earlier one's contribution
      l.eval();
      const Mat<T> x = random_mat<T>(5, 11, 6);
      l.set_adapter(V{"default", "second"});
      const Mat<T> y12 = forward_of(l, x);
      l.set_adapter(V{"second", "default"});
      const Mat<T> y21 = forward_of(l, x);
      CHECK(max_abs_diff(y12, y21) > 1e-3);
    }
  }
}

TEMPLATE_TEST_CASE("dora: the magnitude starts at the row norms of W + s·B·A", "[dora][init]", float, double) {
  using T = TestType;
  for (bool fifo : {false, true}) {
    for (LoraInit init : {LoraInit::standard, LoraInit::gaussian, LoraInit::off, LoraInit::zeros}) {
      CAPTURE(fifo, int(init));
      Generator gen(17);
      LoraLinear<T> l(Linear<T>(13, 70, true, gen, fifo ? WeightLayout::in_out : WeightLayout::out_in));
      l.add_adapter("default", dora_config(Case{1, 13, 70, 4, 8.0, false, fifo}, init), gen);
      const auto& a = lora_adapter(l, "default");
      REQUIRE(a.magnitude.size() == 70);
      const Mat<double> expect = row_norms_of(l, "default");
      const Mat<double> got = to_double(a.M());
      const double rel = ((got - expect).array().abs() / expect.array()).maxCoeff();
      CHECK(rel < 4 * eps<T>());
      if (init != LoraInit::off) {  // B = 0: ‖W‖ per output row
        Mat<double> w = to_double(ConstMatrixView<T>(l.base().weight()));
        if (fifo) w.transposeInPlace();
        CHECK(((got - Mat<double>(w.rowwise().norm().transpose())).array().abs() / got.array()).maxCoeff() < 4 * eps<T>());
      }
    }
  }
}

TEMPLATE_TEST_CASE("dora: the identity at PEFT's default init, exactly", "[dora][init]", float, double) {
  using T = TestType;
  for (bool fifo : {false, true}) {
    for (bool bias : {true, false}) {
      for (double p : {0.0, 0.3}) {
        for (LoraInit init : {LoraInit::standard, LoraInit::gaussian}) {
          CAPTURE(fifo, bias, p, int(init));
          Generator gen(23);
          LoraLinear<T> l(Linear<T>(19, 70, bias, gen, fifo ? WeightLayout::in_out : WeightLayout::out_in));
          l.add_adapter("default", dora_config(Case{1, 19, 70, 8, 16.0, false, fifo, bias, p}, init), gen);
          const Mat<T> x = random_mat<T>(6, 19, 1);
          const Mat<T> y0 = base_forward(l.base(), x);
          auto ctx = l.make_context(6);
          Mat<T> y(6, 70);
          l.forward(ctx, x, y);  // train mode: dropout runs when p > 0
          CHECK(y == y0);        // bit-identical: g = m / norm is exactly 1 and B = 0
          const auto& s = std::get<0>(ctx.banks).slots[0];
          const auto& a = lora_adapter(l, "default");
          for (std::size_t i = 0; i < 70; ++i) REQUIRE(s.norm[i] == a.magnitude[i]);
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("dora: merge gives the unmerged output; unmerge restores the weights", "[dora][merge]", float, double) {
  using T = TestType;
  // Stated tolerances (measured worst values are printed): outputs scaled by max(1, |y|), weights absolute
  // (|W| < 0.25 here). Unmerge divides by m / norm: float loses a few ulps of W + ΔW.
  const double out_tol = std::is_same_v<T, float> ? 1e-5 : 1e-13;
  const double w_tol = std::is_same_v<T, float> ? 1e-6 : 1e-15;
  double worst_merged = 0, worst_w = 0, worst_after = 0;
  using V = std::vector<std::string>;
  for (bool fifo : {false, true}) {
    for (bool safe : {false, true}) {
      for (const V& active : {V{"default"}, V{"default", "second"}, V{"second", "plain", "default"}}) {
        CAPTURE(fifo, safe, active);
        const Case c{6, 17, 70, 4, 8.0, false, fifo};
        auto l = make_layer<T>(c, 31);
        Generator g(5);
        l.add_adapter("second", dora_config(Case{6, 17, 70, 6, 3.0, true, fifo}), g);
        scramble_magnitude(l, "second", 6);
        l.add_adapter("plain", dora_config(Case{6, 17, 70, 2, 4.0, false, fifo}, LoraInit::off, false), g);
        l.set_adapter(active);
        l.eval();
        const Mat<T> x = random_mat<T>(6, 17, 2);
        const Mat<T> y = forward_of(l, x);
        const Mat<T> w0 = as_mat(l.base().weight()), b0 = as_mat(l.base().bias());
        l.merge(std::nullopt, safe);
        const double e_merged = scaled_diff_of(forward_of(l, x), y);
        CHECK(e_merged < out_tol);
        CHECK(as_mat(l.base().bias()) == b0);  // DoRA leaves the bias alone
        l.unmerge();
        const double e_w = max_abs_diff(as_mat(l.base().weight()), w0);
        const double e_after = scaled_diff_of(forward_of(l, x), y);
        CHECK(e_w < w_tol);
        CHECK(e_after < out_tol);
        worst_merged = std::max(worst_merged, e_merged);
        worst_w = std::max(worst_w, e_w);
        worst_after = std::max(worst_after, e_after);
      }
    }
  }
  WARN("DoRA merge (" << (std::is_same_v<T, float> ? "float" : "double") << "): merged vs unmerged output " << worst_merged
                      << ", weight after unmerge " << worst_w << ", output after unmerge " << worst_after);
}

TEMPLATE_TEST_CASE("dora: merging one adapter at a time and merge_and_unload", "[dora][merge]", float, double) {
  using T = TestType;
  const Case c{4, 9, 8, 3, 6.0};
  auto l = make_layer<T>(c, 41);
  Generator g(8);
  l.add_adapter("second", dora_config(Case{4, 9, 8, 2, 2.0}), g);
  scramble_magnitude(l, "second", 9);
  l.set_adapter(std::vector<std::string>{"default", "second"});
  l.eval();
  const Mat<T> x = random_mat<T>(4, 9, 3);
  const Mat<T> y = forward_of(l, x);
  // the weight after merging "default" then "second", from the formula in double
  Mat<double> w = to_double(ConstMatrixView<T>(l.base().weight()));
  for (const char* n : {"default", "second"}) {
    const auto& a = lora_adapter(l, n);
    const Mat<double> delta = double(a.scaling) * to_double(a.B()) * to_double(a.A());
    const Mat<double> norm = row_norms_of(l, n);  // over the unmerged base weight
    const Eigen::VectorXd gv = (to_double(a.M()).array() / norm.array()).transpose();
    w = gv.asDiagonal() * (w + delta);
  }
  l.merge(std::vector<std::string>{"default"});
  l.merge(std::vector<std::string>{"second"});
  CHECK(max_abs_diff(as_mat(l.base().weight()), w) < (std::is_same_v<T, float> ? 2e-6 : 1e-14));
  l.unmerge();
  Linear<T> merged = std::move(l).merge_and_unload();
  CHECK(max_abs_diff(base_forward(merged, x), y) < (std::is_same_v<T, float> ? 2e-5 : 1e-13));
}

TEMPLATE_TEST_CASE("dora: disabled adapters give the base output exactly", "[dora][props]", float, double) {
  using T = TestType;
  for (bool fifo : {false, true}) {
    const Case c{3, 8, 6, 2, 4.0, false, fifo, true, 0.1};
    auto l = make_layer<T>(c);
    const Mat<T> x = random_mat<T>(3, 8, 4);
    const Mat<T> y0 = base_forward(l.base(), x);
    CHECK(max_abs_diff(forward_of(l, x), y0) > 1e-3);
    l.disable_adapters();
    CHECK(forward_of(l, x) == y0);
    l.enable_adapters();
    l.merge();
    l.disable_adapters();  // unmerges first, as PEFT
    CHECK(max_abs_diff(forward_of(l, x), y0) < (std::is_same_v<T, float> ? 2e-6 : 1e-14));
  }
}

TEMPLATE_TEST_CASE("dora: parameters, delta weight, contexts", "[dora][props]", float, double) {
  using T = TestType;
  const Case c{4, 7, 5, 2, 4.0};
  auto l = make_layer<T>(c);
  std::vector<std::string> names;
  std::size_t msize = 0;
  l.visit_parameters([&](ParamRef<T> p) {
    names.push_back(p.name);
    if (p.name == "lora_magnitude_vector.default.weight") {
      msize = p.size;
      CHECK(p.trainable);
    }
  });
  CHECK(names == std::vector<std::string>{"weight", "bias", "lora_A.default.weight", "lora_B.default.weight",
                                          "lora_magnitude_vector.default.weight"});
  CHECK(msize == 5);
  // delta_weight is the plain LoRA delta s·B·A, as PEFT's get_delta_weight for DoRA adapters
  const auto& a = lora_adapter(l, "default");
  Mat<T> delta(5, 7);
  l.delta_weight("default", delta);
  CHECK(max_abs_diff(delta, (double(a.scaling) * to_double(a.B()) * to_double(a.A())).template cast<T>()) < 10 * eps<T>());
  // two forwards in flight, then their backwards; a backward repeated gives the same gradients
  const Mat<T> x1 = random_mat<T>(4, 7, 1), x2 = random_mat<T>(3, 7, 2);
  const Mat<T> d1 = random_mat<T>(4, 5, 3), d2 = random_mat<T>(3, 5, 4);
  auto grads = [&](auto& ctx, const Mat<T>& d) {
    Mat<T> dx(d.rows(), 7);
    l.zero_grad();
    l.backward(ctx, d, dx, GradMode::overwrite);
    Mat<T> gm = as_mat(lora_adapter(l, "default").grad_M());
    return std::pair{dx, gm};
  };
  auto c1 = l.make_context(4), c2 = l.make_context(4);
  Mat<T> y1(4, 5), y2(3, 5);
  l.forward(c1, x1, y1);
  const auto r1 = grads(c1, d1);
  l.forward(c2, x2, y2);
  const auto r1b = grads(c1, d1);
  CHECK(r1.first == r1b.first);
  CHECK(r1.second == r1b.second);
  const auto r2 = grads(c2, d2);
  CHECK(max_abs_diff(r2.second, r1.second) > 0);
}

TEST_CASE("dora: bad input gets a clear exception, and a relocated layer does not read a stale weight", "[dora][errors]") {
  Generator g(1);
  LoraLinear<float> l(Linear<float>(4, 3, true, g), "q");
  LoraConfig c;
  c.use_dora = true;
  c.lora_bias = true;
  REQUIRE_THROWS_AS(l.add_adapter("default", c, g), ConfigError);
  REQUIRE_THROWS_WITH(l.add_adapter("default", c, g), Catch::Contains("not supported for DoRA"));
  CHECK(l.adapter_names().empty());
  c.lora_bias = false;
  c.init_lora_weights = LoraInit::off;
  l.add_adapter("default", c, g);
  const Mat<float> x = random_mat<float>(2, 4, 1);
  const Mat<float> y = forward_of(l, x);
  // a copy of the layer either finds its own base weight or refuses; it never reads the original's
  LoraLinear<float> copy = l;
  as_mat(copy.base().weight()).array() += 1.0f;
  auto oracle = RefDora::of(copy);
  Mat<double> expect;
  {
    auto octx = oracle.make_context(2);
    oracle.set_seed(5);
    oracle.forward(octx, x.cast<double>(), expect);
  }
  bool refused = false;
  Mat<float> yc;
  try {
    yc = forward_of(copy, x);
  } catch (const StateError& e) {
    refused = true;
    CHECK_THAT(e.what(), Catch::Contains("copied or moved"));
  }
  if (!refused) CHECK(max_abs_diff(yc, expect) < 1e-5);
  CHECK(forward_of(l, x) == y);  // the original is untouched
}

// ---- real PEFT numbers ----------------------------------------------------------------------------------

namespace {

}  // namespace

TEMPLATE_TEST_CASE("dora: matches Hugging Face PEFT (dora_linear_default)", "[dora][reference]", float, double) {
  using T = TestType;
  const json j = load_reference(std::is_same_v<T, float> ? "dora_linear_default_f32.json" : "dora_linear_default_f64.json");
  const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
  const auto& cfgj = j.at("config").at("default");
  const Mat<T> w = ref_tensor<T>(j, "lin.weight"), b = ref_tensor<T>(j, "lin.bias");
  Generator gen(0);
  Linear<T> base(w.cols(), w.rows(), true, gen);
  as_mat(base.weight()) = w;
  as_mat(base.bias()) = b;
  LoraLinear<T> l(std::move(base), "lin");
  LoraConfig cfg;
  cfg.r = cfgj.at("r");
  cfg.lora_alpha = cfgj.at("lora_alpha");
  cfg.use_dora = cfgj.at("use_dora");
  cfg.init_lora_weights = LoraInit::zeros;
  l.add_adapter("default", cfg, gen);
  auto& a = lora_adapter(l, "default");
  CHECK(double(a.scaling) == j.at("scaling").at("default").at("lin").get<double>());
  as_mat(a.A()) = ref_tensor<T>(j, "lin.lora_A.weight");
  as_mat(a.B()) = ref_tensor<T>(j, "lin.lora_B.weight");
  as_mat(a.M()) = ref_tensor<T>(j, "lin.lora_magnitude_vector");
  l.eval();

  const Mat<T> x = ref_tensor<T>(j, "x"), gout = ref_tensor<T>(j, "grad_out");
  auto ctx = l.make_context(x.rows());
  Mat<T> y(x.rows(), w.rows()), dx(x.rows(), w.cols());
  l.forward(ctx, x, y);
  l.backward(ctx, gout, dx, GradMode::overwrite);
  const auto& slot = std::get<0>(ctx.banks).slots[0];
  const Mat<T> norm = as_mat(ConstMatrixView<T>(slot.norm.view(1, w.rows())));

  const std::pair<const char*, double> results[] = {
      {"weight_norm", scaled_diff_of(norm, ref_tensor<T>(j, "weight_norm.lin"))},
      {"init magnitude (= ‖W + s·B·A‖)", scaled_diff_of(norm, ref_tensor<T>(j, "init.lin.lora_magnitude_vector"))},
      {"out", scaled_diff_of(y, ref_tensor<T>(j, "out"))},
      {"grad.x", scaled_diff_of(dx, ref_tensor<T>(j, "grad.x"))},
      {"grad.lora_A", scaled_diff_of(as_mat(a.grad_A()), ref_tensor<T>(j, "grad.lin.lora_A.weight"))},
      {"grad.lora_B", scaled_diff_of(as_mat(a.grad_B()), ref_tensor<T>(j, "grad.lin.lora_B.weight"))},
      {"grad.lora_magnitude_vector", scaled_diff_of(as_mat(a.grad_M()), ref_tensor<T>(j, "grad.lin.lora_magnitude_vector"))},
  };
  double worst = 0;
  for (const auto& [what, err] : results) {
    INFO(what << ": " << err);
    CHECK(err < tol);
    worst = std::max(worst, err);
  }
  Mat<T> delta(w.rows(), w.cols());
  l.delta_weight("default", delta);
  CHECK(scaled_diff_of(delta, ref_tensor<T>(j, "delta.lin")) < tol);
  l.disable_adapters();
  CHECK(scaled_diff_of(forward_of(l, x), ref_tensor<T>(j, "base_out")) < tol);
  l.enable_adapters();
  l.merge();
  const double merged_w = scaled_diff_of(as_mat(l.base().weight()), ref_tensor<T>(j, "merged.lin.weight"));
  const double merged_out = scaled_diff_of(forward_of(l, x), ref_tensor<T>(j, "merged_out"));
  CHECK(merged_w < tol);
  CHECK(as_mat(l.base().bias()) == ref_tensor<T>(j, "merged.lin.bias"));
  CHECK(merged_out < tol);
  WARN("PEFT reference (" << (std::is_same_v<T, float> ? "f32" : "f64") << "): worst scaled error " << std::max({worst, merged_w, merged_out})
                          << " (forward/backward " << worst << ", merged weight " << merged_w << ", merged output " << merged_out << ")");
}

// ---- DoRA on Conv2d and Embedding -----------------------------------------------------------------------

namespace {

template <class T>
using LoraConvL = Adapted<Conv2d<T>, Lora>;
template <class T>
using LoraEmb = Adapted<Embedding<T>, Lora>;

LoraConfig conv_config(int r, double alpha, double p, bool dora, LoraInit init = LoraInit::off) {
  LoraConfig cfg;
  cfg.r = r;
  cfg.lora_alpha = alpha;
  cfg.lora_dropout = p;
  cfg.use_dora = dora;
  cfg.init_lora_weights = init;
  return cfg;
}

/// The conv oracle: PEFT's lora.Conv2d forward with DoraConv2dLayer (variants.py _DoraConvNdVariant), written
/// with the definition of the convolution (direct_conv) in double. Norms per output channel over
/// (C, kh, kw), frozen at make_context as in RefDora, so central differences give the detached gradient.
struct RefDoraConv {
  using scalar = double;
  struct Ad {
    Mat<double> A, B, m;
    double s = 1, p = 0;
    bool dora = false;
  };
  struct Context {};
  Conv2dGeometry g;
  Mat<double> W, b, gW, gb;
  bool base_trainable = false, training = true;
  std::vector<Ad> ads;
  std::vector<int> order;
  std::vector<Mat<double>> norms;
  std::uint64_t seed = 0, forwards = 0;

  template <class T>
  static RefDoraConv of(LoraConvL<T>& l) {
    RefDoraConv r;
    r.g = l.base().geometry();
    r.W = to_double(ConstMatrixView<T>(l.base().weight()));
    if (l.base().has_bias()) r.b = to_double(ConstMatrixView<T>(l.base().bias()));
    r.base_trainable = l.base().requires_grad();
    r.gW = Mat<double>::Zero(r.W.rows(), r.W.cols());
    r.gb = Mat<double>::Zero(1, r.b.size());
    r.training = l.is_training();
    const auto names = l.adapter_names();
    for (const auto& n : names) {
      const auto& a = lora_adapter(l, n);
      r.ads.push_back({to_double(a.A()), to_double(a.B()), a.dora() ? to_double(a.M()) : Mat<double>(), double(a.scaling),
                       a.config.lora_dropout, a.dora()});
    }
    for (const auto& n : l.active_adapters()) r.order.push_back(int(std::find(names.begin(), names.end(), n) - names.begin()));
    return r;
  }
  peft::Index in_features() const { return g.in_size(); }
  peft::Index out_features() const { return g.out_size(); }
  void set_seed(std::uint64_t s) {
    seed = s;
    forwards = 0;
  }
  template <class F>
  void visit_parameters(F&& f) {
    f(ParamRef<double>{"weight", W.data(), gW.data(), std::size_t(W.size()), base_trainable});
    if (b.size()) f(ParamRef<double>{"bias", b.data(), gb.data(), std::size_t(b.size()), base_trainable});
    for (auto& a : ads) {
      f(ParamRef<double>{"A", a.A.data(), nullptr, std::size_t(a.A.size()), true});
      f(ParamRef<double>{"B", a.B.data(), nullptr, std::size_t(a.B.size()), true});
      if (a.dora) f(ParamRef<double>{"m", a.m.data(), nullptr, std::size_t(a.m.size()), true});
    }
  }
  Context make_context(peft::Index) {
    norms.clear();
    for (auto& a : ads) norms.push_back(a.dora ? Mat<double>((W + a.s * a.B * a.A).rowwise().norm().transpose()) : Mat<double>());
    return {};
  }
  void forward(Context&, const Mat<double>& x, Mat<double>& y) {
    const std::uint64_t fseed = peft::detail::random_bits(seed, 0x5EEDull, forwards++);
    const peft::Index o = g.out_channels, p = g.positions();
    y = direct_conv(g, x, W, b);
    for (int k : order) {
      const auto& a = ads[std::size_t(k)];
      Mat<double> xk = x;
      const bool dropped = training && a.p > 0;
      if (dropped) EigenCpu::dropout<double>(ConstMatrixView<double>(x), MatrixView<double>(xk), a.p, fseed, std::uint64_t(k));
      const Mat<double> lora = direct_conv(g, xk, Mat<double>(a.s * a.B * a.A), Mat<double>());
      if (!a.dora) {
        y += lora;
        continue;
      }
      const Mat<double> base_result = dropped ? direct_conv(g, xk, W, Mat<double>()) : Mat<double>(y);
      Mat<double> extra(y.rows(), y.cols());
      for (peft::Index n = 0; n < y.rows(); ++n)
        for (peft::Index c = 0; c < o; ++c) {
          const double gc = a.m(0, c) / norms[std::size_t(k)](0, c), bc = (!dropped && b.size()) ? b(0, c) : 0.0;
          for (peft::Index q = 0; q < p; ++q)
            extra(n, c * p + q) = (gc - 1) * (base_result(n, c * p + q) - bc) + gc * lora(n, c * p + q);
        }
      y += extra;
    }
  }
};

template <class T>
LoraConvL<T> make_conv_layer(const Conv2dGeometry& g, bool bias, std::uint64_t seed) {
  Generator gen(seed);
  return LoraConvL<T>(Conv2d<T>(g, bias, gen), "conv");
}

template <class T, class L>
void scramble_all(L& l, std::uint64_t seed) {
  for (const auto& n : l.adapter_names()) {
    auto& a = lora_adapter(l, n);
    if (!a.dora()) continue;
    std::vector<double> u(a.magnitude.size());
    Generator(seed++).uniform(u.data(), u.size(), 0.5, 1.5);
    for (std::size_t i = 0; i < u.size(); ++i) a.magnitude[i] = T(double(a.magnitude[i]) * u[i]);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("dora on conv2d: backward matches finite differences of the detached-norm function", "[dora][conv2d][grad]", float, double) {
  using T = TestType;
  const Conv2dGeometry geos[] = {geo(3, 4, 3, 1, 1, 1, 6, 6), geo(3, 4, 3, 2, 0, 1, 7, 7), geo(2, 3, 3, 1, 2, 2, 5, 6), geo(2, 5, 2, 2, 1, 1, 5, 4)};
  using V = std::vector<std::string>;
  int gi = 0;
  for (const auto& g : geos) {
    for (double p : {0.0, 0.3}) {
      const bool bias = gi++ % 2 == 0;
      CAPTURE(g.in_channels, g.out_channels, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h, p, bias);
      auto l = make_conv_layer<T>(g, bias, 40 + std::uint64_t(gi));
      Generator gen(7);
      l.add_adapter("default", conv_config(3, 6.0, p, true), gen);
      l.add_adapter("plain", conv_config(2, 4.0, p, false), gen);
      l.add_adapter("second", conv_config(2, 3.0, p, true), gen);
      scramble_all<T>(l, 9);
      for (const V& active : {V{"default"}, V{"default", "plain", "second"}, V{"second", "default"}}) {
        CAPTURE(active);
        l.set_adapter(active);
        for (bool train : {true, false}) {
          CAPTURE(train);
          l.train(train);
          auto twin = RefDoraConv::of(l);
          check_layer_gradients(l, twin, 3, 17);
        }
      }
      // full fine-tuning of the base under DoRA
      l.set_adapter(V{"default", "second"});
      l.train(true);
      l.base().set_requires_grad(true);
      auto twin = RefDoraConv::of(l);
      check_layer_gradients(l, twin, 2, 19);
    }
  }
}

TEMPLATE_TEST_CASE("dora on conv2d: identity at default init, merge, unmerge, disable", "[dora][conv2d][merge]", float, double) {
  using T = TestType;
  const auto g = geo(3, 70, 3, 1, 1, 1, 5, 5);  // 70 channels: two norm blocks
  auto l = make_conv_layer<T>(g, true, 3);
  Generator gen(4);
  l.add_adapter("default", conv_config(4, 8.0, 0.3, true, LoraInit::standard), gen);
  const Mat<T> x = random_mat<T>(2, g.in_size(), 5);
  auto ctx = l.make_context(2);
  Mat<T> y0(2, g.out_size()), y(2, g.out_size()), ym(2, g.out_size());
  l.disable_adapters();
  l.forward(ctx, x, y0);
  l.enable_adapters();
  l.forward(ctx, x, y);  // train mode, dropout active
  CHECK(y == y0);        // g = m / norm is exactly 1 and B = 0
  l.add_adapter("second", conv_config(3, 3.0, 0.0, true), gen);
  l.add_adapter("plain", conv_config(2, 4.0, 0.0, false), gen);
  scramble_all<T>(l, 11);
  l.set_adapter(std::vector<std::string>{"second", "plain", "default"});
  l.eval();
  auto ctx2 = l.make_context(2);
  l.forward(ctx2, x, y);
  CHECK(max_abs_diff(y, y0) > 1e-3);
  const Mat<T> w0 = as_mat(l.base().weight()), b0 = as_mat(l.base().bias());
  const double out_tol = std::is_same_v<T, float> ? 1e-5 : 1e-13, w_tol = std::is_same_v<T, float> ? 1e-6 : 1e-15;
  for (bool safe : {false, true}) {
    l.merge(std::nullopt, safe);
    l.forward(ctx2, x, ym);
    CHECK(scaled_diff_of(ym, y) < out_tol);
    CHECK(as_mat(l.base().bias()) == b0);
    l.unmerge();
    CHECK(max_abs_diff(as_mat(l.base().weight()), w0) < w_tol);
  }
  l.disable_adapters();
  l.forward(ctx2, x, ym);
  CHECK(scaled_diff_of(ym, y0) < out_tol);
}

TEMPLATE_TEST_CASE("dora on conv2d: matches Hugging Face PEFT (dora_conv2d_default)", "[dora][conv2d][reference]", float, double) {
  using T = TestType;
  const json j = load_reference(std::is_same_v<T, float> ? "dora_conv2d_default_f32.json" : "dora_conv2d_default_f64.json");
  const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
  const auto g = geo(3, 4, 3, 1, 1, 1, 6, 6);
  auto l = make_conv_layer<T>(g, true, 0);
  as_mat(l.base().weight()) = ref_tensor<T>(j, "conv.weight");
  as_mat(l.base().bias()) = ref_tensor<T>(j, "conv.bias");
  Generator gen(0);
  l.add_adapter("default", conv_config(j.at("config").at("default").at("r"), j.at("config").at("default").at("lora_alpha"), 0.0, true, LoraInit::zeros), gen);
  auto& a = lora_adapter(l, "default");
  as_mat(a.A()) = ref_tensor<T>(j, "conv.lora_A.weight");
  as_mat(a.B()) = ref_tensor<T>(j, "conv.lora_B.weight");
  as_mat(a.M()) = ref_tensor<T>(j, "conv.lora_magnitude_vector");
  const Mat<T> x = ref_tensor<T>(j, "x"), gout = ref_tensor<T>(j, "grad_out");
  auto ctx = l.make_context(x.rows());
  Mat<T> y(x.rows(), g.out_size()), dx(x.rows(), g.in_size());
  l.forward(ctx, x, y);
  l.backward(ctx, gout, dx, GradMode::overwrite);
  const auto& slot = std::get<0>(ctx.banks).slots[0];
  const Mat<T> norm = as_mat(ConstMatrixView<T>(slot.norm.view(1, 4)));
  double worst = 0;
  for (const auto& [what, err] : std::initializer_list<std::pair<const char*, double>>{
           {"weight_norm", scaled_diff_of(norm, ref_tensor<T>(j, "weight_norm.conv"))},
           {"out", scaled_diff_of(y, ref_tensor<T>(j, "out"))},
           {"grad.x", scaled_diff_of(dx, ref_tensor<T>(j, "grad.x"))},
           {"grad.lora_A", scaled_diff_of(as_mat(a.grad_A()), ref_tensor<T>(j, "grad.conv.lora_A.weight"))},
           {"grad.lora_B", scaled_diff_of(as_mat(a.grad_B()), ref_tensor<T>(j, "grad.conv.lora_B.weight"))},
           {"grad.lora_magnitude_vector", scaled_diff_of(as_mat(a.grad_M()), ref_tensor<T>(j, "grad.conv.lora_magnitude_vector"))}}) {
    INFO(what << ": " << err);
    CHECK(err < tol);
    worst = std::max(worst, err);
  }
  // the magnitude PEFT initialised from this W, A, B
  LoraConvL<T> fresh = make_conv_layer<T>(g, true, 0);
  as_mat(fresh.base().weight()) = ref_tensor<T>(j, "conv.weight");
  fresh.add_adapter("default", conv_config(4, 8.0, 0.0, true, LoraInit::zeros), gen);
  CHECK(scaled_diff_of(as_mat(lora_adapter(fresh, "default").M()), as_mat(ConstMatrixView<T>(fresh.base().weight())).rowwise().norm().transpose().eval()) < tol);
  Mat<T> delta(4, g.patch());
  l.delta_weight("default", delta);
  CHECK(scaled_diff_of(delta, ref_tensor<T>(j, "delta.conv")) < tol);
  l.merge();
  const double merged_w = scaled_diff_of(as_mat(l.base().weight()), ref_tensor<T>(j, "merged.conv.weight"));
  CHECK(merged_w < tol);
  CHECK(as_mat(l.base().bias()) == ref_tensor<T>(j, "merged.conv.bias"));
  l.eval();
  l.forward(ctx, x, y);
  const double merged_out = scaled_diff_of(y, ref_tensor<T>(j, "merged_out"));
  CHECK(merged_out < tol);
  WARN("PEFT reference dora_conv2d (" << (std::is_same_v<T, float> ? "f32" : "f64") << "): forward/backward " << worst << ", merged weight "
                                      << merged_w << ", merged output " << merged_out);
}

namespace {

/// The embedding oracle (PEFT's DoraEmbeddingLayer): y = W[ids]; per active slot y ← y + s·Aᵀ[ids]Bᵀ or, for
/// DoRA, y ← g ⊙ (y + s·Aᵀ[ids]Bᵀ) with g = m / ‖(W + s·(BA)ᵀ)[:, j]‖ frozen at construction.
struct RefDoraEmb {
  struct Ad {
    Mat<double> A, B, m, norm;
    double s = 1;
    bool dora = false;
  };
  Mat<double> W;
  std::vector<Ad> ads;
  std::vector<int> order;
  template <class T>
  static RefDoraEmb of(LoraEmb<T>& l) {
    RefDoraEmb r;
    r.W = to_double(ConstMatrixView<T>(l.base().weight()));
    const auto names = l.adapter_names();
    for (const auto& n : names) {
      const auto& a = lora_adapter(l, n);
      Ad d{to_double(a.A()), to_double(a.B()), a.dora() ? to_double(a.M()) : Mat<double>(), Mat<double>(), double(a.scaling), a.dora()};
      if (d.dora) d.norm = (r.W + d.s * (d.B * d.A).transpose()).colwise().norm();
      r.ads.push_back(d);
    }
    for (const auto& n : l.active_adapters()) r.order.push_back(int(std::find(names.begin(), names.end(), n) - names.begin()));
    return r;
  }
  Mat<double> forward(const std::vector<std::int64_t>& ids) const {
    Mat<double> y(Index(ids.size()), W.cols());
    for (std::size_t i = 0; i < ids.size(); ++i) y.row(Index(i)) = W.row(ids[i]);
    for (int k : order) {
      const auto& a = ads[std::size_t(k)];
      for (std::size_t i = 0; i < ids.size(); ++i) {
        const Eigen::RowVectorXd lora = a.s * a.A.col(ids[i]).transpose() * a.B.transpose();
        if (!a.dora) y.row(Index(i)) += lora;
        else y.row(Index(i)) = ((a.m.array() / a.norm.array()) * (y.row(Index(i)) + lora).array()).matrix();
      }
    }
    return y;
  }
};

}  // namespace

TEMPLATE_TEST_CASE("dora on embedding: gradients, identity, merge, and PEFT's numbers", "[dora][embedding]", float, double) {
  using T = TestType;
  const std::vector<std::int64_t> ids = {3, 0, 7, 3, 9, 1, 3, 11, 6};  // not padding_idx 5 (no gradient there, as F.embedding)
  const Index n = Index(ids.size());
  using V = std::vector<std::string>;
  Generator gen(12);
  LoraEmb<T> l(Embedding<T>(12, 70, gen, /*padding_idx=*/5), "emb");  // 70 columns: two norm blocks
  l.add_adapter("default", conv_config(4, 8.0, 0.0, true, LoraInit::standard), gen);
  {  // identity at PEFT's default init (A = 0): exactly
    auto ctx = l.make_context(n);
    Mat<T> y(n, 70);
    l.forward(ctx, ids, y);
    for (Index i = 0; i < n; ++i) CHECK(y.row(i) == as_mat(l.base().weight()).row(ids[std::size_t(i)]));
  }
  gen.normal(lora_adapter(l, "default").a.data(), lora_adapter(l, "default").a.size(), 0.0, 1.0);
  l.add_adapter("plain", conv_config(3, 3.0, 0.0, false), gen);
  l.add_adapter("second", conv_config(2, 4.0, 0.0, true), gen);
  scramble_all<T>(l, 3);
  const Mat<T> dy = random_mat<T>(n, 70, 4);
  for (const V& active : {V{"default"}, V{"default", "plain", "second"}, V{"second", "default"}}) {
    CAPTURE(active);
    l.set_adapter(active);
    for (bool base_trainable : {false, true}) {
      l.base().set_requires_grad(base_trainable);
      auto ref = RefDoraEmb::of(l);
      auto ctx = l.make_context(n);
      Mat<T> y(n, 70);
      l.forward(ctx, ids, y);
      CHECK(max_abs_diff(y, ref.forward(ids)) < 100 * value_tol<T>());
      l.zero_grad();
      l.backward(ctx, dy, {}, GradMode::overwrite);
      const Mat<double> dyd = dy.template cast<double>();
      auto loss = [&] { return dot(ref.forward(ids), dyd); };
      for (int k : ref.order) {
        auto& a = lora_adapter(l, l.adapter_names()[std::size_t(k)]);
        auto& d = ref.ads[std::size_t(k)];
        const auto rA = check_gradient(d.A.data(), a.grad_a.data(), a.a.size(), loss);
        const auto rB = check_gradient(d.B.data(), a.grad_b.data(), a.b.size(), loss);
        INFO(rA.str("dA") << "\n" << rB.str("dB"));
        CHECK(rA.worst < grad_tol<T>());
        CHECK(rB.worst < grad_tol<T>());
        if (d.dora) {
          const auto rm = check_gradient(d.m.data(), a.grad_magnitude.data(), a.magnitude.size(), loss);
          INFO(rm.str("dm"));
          CHECK(rm.worst < grad_tol<T>());
        }
      }
      if (base_trainable) {
        const auto rW = check_gradient(ref.W.data(), l.base().weight_grad().data, std::size_t(ref.W.size()), loss);
        INFO(rW.str("dW"));
        CHECK(rW.worst < grad_tol<T>());
      }
    }
  }
  l.base().set_requires_grad(false);
  // merge = unmerged output; unmerge restores
  l.set_adapter(V{"second", "plain", "default"});
  auto ctx = l.make_context(n);
  Mat<T> y(n, 70), ym(n, 70);
  l.forward(ctx, ids, y);
  const Mat<T> w0 = as_mat(l.base().weight());
  l.merge();
  l.forward(ctx, ids, ym);
  CHECK(scaled_diff_of(ym, y) < (std::is_same_v<T, float> ? 1e-5 : 1e-13));
  l.unmerge();
  CHECK(scaled_diff_of(as_mat(l.base().weight()), w0) < (std::is_same_v<T, float> ? 1e-6 : 1e-14));

  // real PEFT
  const json j = load_reference(std::is_same_v<T, float> ? "dora_embedding_default_f32.json" : "dora_embedding_default_f64.json");
  const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
  const auto rids = j.at("tensors").at("ids").at("data").template get<std::vector<std::int64_t>>();
  const Index rn = Index(rids.size());
  auto rows = [&](const char* name) { return ref_tensor<T>(j, name, rn); };  // [2, 5, 8] → [10, 8]
  const Mat<T> w = ref_tensor<T>(j, "emb.weight");
  LoraEmb<T> r(Embedding<T>(w.rows(), w.cols(), gen), "emb");
  as_mat(r.base().weight()) = w;
  r.add_adapter("default", conv_config(j.at("config").at("default").at("r"), j.at("config").at("default").at("lora_alpha"), 0.0, true, LoraInit::zeros), gen);
  auto& a = lora_adapter(r, "default");
  as_mat(a.A()) = ref_tensor<T>(j, "emb.lora_embedding_A");
  as_mat(a.B()) = ref_tensor<T>(j, "emb.lora_embedding_B");
  as_mat(a.M()) = ref_tensor<T>(j, "emb.lora_magnitude_vector", 1);
  auto rctx = r.make_context(rn);
  Mat<T> ry(rn, w.cols());
  r.forward(rctx, rids, ry);
  r.backward(rctx, rows("grad_out"), {}, GradMode::overwrite);
  const auto& slot = std::get<0>(rctx.banks).slots[0];
  CHECK(scaled_diff_of(as_mat(ConstMatrixView<T>(slot.norm.view(1, w.cols()))), ref_tensor<T>(j, "weight_norm.emb", 1)) < tol);
  CHECK(scaled_diff_of(ry, rows("out")) < tol);
  CHECK(scaled_diff_of(as_mat(a.grad_A()), ref_tensor<T>(j, "grad.emb.lora_embedding_A")) < tol);
  CHECK(scaled_diff_of(as_mat(a.grad_B()), ref_tensor<T>(j, "grad.emb.lora_embedding_B")) < tol);
  CHECK(scaled_diff_of(as_mat(a.grad_M()), ref_tensor<T>(j, "grad.emb.lora_magnitude_vector", 1)) < tol);
  Mat<T> delta(w.rows(), w.cols());
  r.delta_weight("default", delta);
  CHECK(scaled_diff_of(delta, ref_tensor<T>(j, "delta.emb")) < tol);
  r.merge();
  CHECK(scaled_diff_of(as_mat(r.base().weight()), ref_tensor<T>(j, "merged.emb.weight")) < tol);
  r.forward(rctx, rids, ry);
  CHECK(scaled_diff_of(ry, rows("merged_out")) < tol);
}
