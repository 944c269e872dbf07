// (IA)³ on Linear: output and input (feed-forward) scaling, several active vectors, (IA)³ beside LoRA on one
// layer; gradients against finite differences; PEFT's properties; bad input.
#include <catch2/catch.hpp>

#include "layer_check.hpp"

using namespace peft;
using namespace peft::test;

namespace {
template <class T>
using Ia3Linear = Adapted<Linear<T>, Ia3>;
template <class T>
using Mixed = Adapted<Linear<T>, Lora, Ia3>;

Ia3Config ia3(bool ff, bool init_ones = false) {
  Ia3Config c;
  c.is_feedforward = ff;
  c.init_ia3_weights = init_ones;
  return c;
}

template <class T, class Layer>
Layer make(bool ff, std::uint64_t seed, WeightLayout layout = WeightLayout::out_in) {
  Generator g(seed);
  Layer l(Linear<T>(7, 5, true, g, layout), ff ? "mlp.down_proj" : "mlp.up_proj");
  Ia3Config c = ia3(ff);
  c.fan_in_fan_out = layout == WeightLayout::in_out;
  l.add_adapter("default", c, g);
  return l;
}
}  // namespace

TEMPLATE_TEST_CASE("ia3: backward matches finite differences", "[ia3][grad]", float, double) {
  using T = TestType;
  for (bool ff : {false, true}) {
    CAPTURE(ff);
    auto l = make<T, Ia3Linear<T>>(ff, 3);
    auto twin = make<double, Ia3Linear<double>>(ff, 3);
    CHECK(ia3_adapter(l, "default").feedforward == ff);
    check_layer_gradients(l, twin, 4);
    // two active vectors multiply
    Generator g(9), gd(9);
    l.add_adapter("second", ia3(ff), g);
    twin.add_adapter("second", ia3(ff), gd);
    l.set_adapter(std::vector<std::string>{"default", "second"});
    twin.set_adapter(std::vector<std::string>{"default", "second"});
    check_layer_gradients(l, twin, 3);
    // full fine-tuning of the base under the scaling
    l.base().set_requires_grad(true);
    twin.base().set_requires_grad(true);
    check_layer_gradients(l, twin, 2);
  }
}

TEMPLATE_TEST_CASE("ia3 beside lora on one layer: the composition rule and its gradients", "[ia3][lora][mixed][grad]", float, double) {
  using T = TestType;
  for (bool ff : {false, true}) {
    CAPTURE(ff);
    auto build = [&](auto tag) {
      using U = decltype(tag);
      Generator g(5);
      Mixed<U> l(Linear<U>(6, 4, true, g), ff ? "down_proj" : "up_proj");
      LoraConfig lc;
      lc.r = 2;
      lc.init_lora_weights = LoraInit::off;
      l.add_adapter("lora", lc, g);
      l.add_adapter("ia3", ia3(ff), g);
      l.set_adapter(std::vector<std::string>{"lora", "ia3"});
      return l;
    };
    auto l = build(T{});
    auto twin = build(double{});
    check_layer_gradients(l, twin, 3);
    // the documented rule: y = (base(x ⊙ l_in) + lora(x ⊙ l_in)) ⊙ l_out
    const Mat<double> x = random_mat<double>(3, 6, 8);
    Mat<double> y(3, 4), y_lora(3, 4);
    auto ctx = twin.make_context(3);
    twin.forward(ctx, x, y);
    twin.set_adapter("lora");
    Mat<double> xs = x;
    const auto& v = ia3_adapter(twin, "ia3").l;
    if (ff)
      for (int j = 0; j < 6; ++j) xs.col(j) *= v[std::size_t(j)];
    twin.forward(ctx, xs, y_lora);
    if (!ff)
      for (int j = 0; j < 4; ++j) y_lora.col(j) *= v[std::size_t(j)];
    CHECK(max_abs_diff(y, y_lora) < 1e-12);
  }
}

TEMPLATE_TEST_CASE("ia3: PEFT's properties", "[ia3][props]", float, double) {
  using T = TestType;
  const Mat<T> x = random_mat<T>(4, 7, 2);
  for (bool ff : {false, true}) {
    for (WeightLayout layout : {WeightLayout::out_in, WeightLayout::in_out}) {
      CAPTURE(ff, int(layout));
      Generator g(1);
      Linear<T> base(7, 5, true, g, layout);
      Mat<T> y0(4, 5);
      {
        auto c = base.make_context(4);
        base.forward(c, x, y0);
      }
      Ia3Linear<T> l(base, ff ? "down_proj" : "q");
      Ia3Config c = ia3(ff, /*init_ones=*/true);
      c.fan_in_fan_out = layout == WeightLayout::in_out;
      l.add_adapter("default", c, g);
      auto ctx = l.make_context(4);
      Mat<T> y(4, 5);
      l.forward(ctx, x, y);
      CHECK(y == y0);  // ones: the identity, exactly
      // non-trivial vector: merged output equals unmerged; unmerge is close (it divides by l + 1e-8)
      auto& a = ia3_adapter(l, "default");
      for (std::size_t i = 0; i < a.l.size(); ++i) a.l[i] = T(0.5 + 0.25 * double(i));
      l.forward(ctx, x, y);
      CHECK(max_abs_diff(y, y0) > 1e-3);
      const Mat<T> w0 = as_mat(l.base().weight()), b0 = as_mat(l.base().bias());
      l.merge();
      Mat<T> ym(4, 5);
      l.forward(ctx, x, ym);
      CHECK(max_abs_diff(ym, y) < 100 * value_tol<T>());
      l.unmerge();
      CHECK(max_abs_diff(as_mat(l.base().weight()), w0) < (std::is_same_v<T, float> ? 1e-6 : 1e-7));
      CHECK(max_abs_diff(as_mat(l.base().bias()), b0) < (std::is_same_v<T, float> ? 1e-6 : 1e-7));
      l.disable_adapters();
      l.forward(ctx, x, ym);
      CHECK(max_abs_diff(ym, y0) < (std::is_same_v<T, float> ? 1e-5 : 1e-7));  // the inexact unmerge, as in PEFT
      REQUIRE_THROWS_WITH(l.delta_weight("default", MatrixView<T>(as_mat(l.base().weight()))), Catch::Contains("no additive delta weight"));
    }
  }
}

TEST_CASE("ia3: feedforward_modules follow PEFT's matching rules", "[ia3][config]") {
  Ia3Config c;
  c.feedforward_modules = {"down_proj", "fc2"};
  CHECK(c.for_module("model.layers.0.mlp.down_proj").is_feedforward);
  CHECK(c.for_module("xfc2").is_feedforward);  // a plain suffix, no dot, as PEFT
  CHECK_FALSE(c.for_module("model.layers.0.self_attn.q_proj").is_feedforward);
  Ia3Config r;
  r.feedforward_regex = ".*\\.mlp\\..*";
  CHECK(r.for_module("layers.1.mlp.w2").is_feedforward);
  CHECK_FALSE(r.for_module("layers.1.attn.w2").is_feedforward);
}

TEST_CASE("ia3: bad input gets a clear exception", "[ia3][errors]") {
  Generator g(1);
  Ia3Linear<float> l(Linear<float>(4, 3, true, g), "q");
  l.add_adapter("default", ia3(false), g);
  REQUIRE_THROWS_WITH(l.add_adapter("ff", ia3(true), g), Catch::Contains("PEFT fixes is_feedforward per layer"));
  Ia3Config fifo = ia3(false);
  fifo.fan_in_fan_out = true;
  REQUIRE_THROWS_WITH(l.add_adapter("fifo", fifo, g), Catch::Contains("fan_in_fan_out"));
  CHECK(l.adapter_names() == std::vector<std::string>{"default"});
}

#include "reference.hpp"

namespace {
Conv2dGeometry conv_geo() {
  Conv2dGeometry g;
  g.in_channels = 3;
  g.out_channels = 4;
  g.kernel_h = g.kernel_w = 3;
  g.pad_h = g.pad_w = 1;
  g.in_h = g.in_w = 6;
  return g;
}
}  // namespace

TEMPLATE_TEST_CASE("ia3 on conv2d: backward matches finite differences, merge matches", "[ia3][conv2d][grad]", float, double) {
  using T = TestType;
  for (bool ff : {false, true}) {
    CAPTURE(ff);
    auto build = [&](auto tag) {
      using U = decltype(tag);
      Generator g(4);
      Adapted<Conv2d<U>, Lora, Ia3> l(Conv2d<U>(conv_geo(), true, g));
      l.add_adapter("ia3", ia3(ff), g);
      l.add_adapter("second", ia3(ff), g);
      LoraConfig lc;
      lc.r = 2;
      lc.init_lora_weights = LoraInit::off;
      l.add_adapter("lora", lc, g);
      l.set_adapter(std::vector<std::string>{"ia3", "second", "lora"});
      return l;
    };
    auto l = build(T{});
    auto twin = build(double{});
    check_layer_gradients(l, twin, 2);
    // merging the (IA)³ vectors (and the LoRA) reproduces the output
    const Mat<T> x = random_mat<T>(2, conv_geo().in_size(), 3);
    Mat<T> y(2, conv_geo().out_size()), ym(2, conv_geo().out_size());
    auto ctx = l.make_context(2);
    l.forward(ctx, x, y);
    l.set_adapter(std::vector<std::string>{"ia3", "second"});
    l.forward(ctx, x, y);
    l.merge();
    l.forward(ctx, x, ym);
    CHECK(max_abs_diff(ym, y) < 100 * value_tol<T>());
  }
}

TEMPLATE_TEST_CASE("ia3 matches Hugging Face PEFT on linear and conv2d, output and feed-forward", "[ia3][reference]", float, double) {
  using T = TestType;
  const std::string sfx = std::is_same_v<T, float> ? "_f32.json" : "_f64.json";
  for (std::string which : {"linear_default", "linear_ff", "conv2d_default", "conv2d_ff"}) {
    INFO(which);
    const auto j = load_reference("ia3_" + which + sfx);
    const bool conv = which.rfind("conv2d", 0) == 0, ff = which.find("_ff") != std::string::npos;
    const std::string L = conv ? "conv" : "lin";
    auto run = [&](auto& l, Index in, Index out) {
      as_mat(l.base().weight()) = ref_tensor<T>(j, L + ".weight");
      as_mat(l.base().bias()) = ref_tensor<T>(j, L + ".bias");
      Generator g(0);
      l.add_adapter("default", ia3(ff), g);
      auto& a = ia3_adapter(l, "default");
      const Mat<T> lv = ref_tensor<T>(j, L + ".ia3_l", 1);
      REQUIRE(Index(a.l.size()) == lv.size());
      for (std::size_t i = 0; i < a.l.size(); ++i) a.l[i] = lv(0, Index(i));
      const Mat<T> x = ref_tensor<T>(j, "x"), dy = ref_tensor<T>(j, "grad_out");
      auto ctx = l.make_context(x.rows());
      Mat<T> y(x.rows(), out), dx(x.rows(), in);
      l.forward(ctx, x, y);
      CHECK(scaled_diff(y, ref_tensor<T>(j, "out")) < reference_tol<T>());
      l.backward(ctx, dy, dx, GradMode::overwrite);
      CHECK(scaled_diff(dx, ref_tensor<T>(j, "grad.x")) < reference_tol<T>());
      CHECK(scaled_diff(as_mat(a.grad()), ref_tensor<T>(j, "grad." + L + ".ia3_l", 1)) < reference_tol<T>());
      l.merge();
      CHECK(scaled_diff(as_mat(l.base().weight()), ref_tensor<T>(j, "merged." + L + ".weight")) < reference_tol<T>());
      CHECK(scaled_diff(as_mat(l.base().bias()), ref_tensor<T>(j, "merged." + L + ".bias")) < reference_tol<T>());
      l.forward(ctx, x, y);
      CHECK(scaled_diff(y, ref_tensor<T>(j, "merged_out")) < reference_tol<T>());
      l.unmerge();
      CHECK(scaled_diff(as_mat(l.base().weight()), ref_tensor<T>(j, "unmerged." + L + ".weight")) < reference_tol<T>());
    };
    Generator g(0);
    if (conv) {
      Adapted<Conv2d<T>, Ia3> l(Conv2d<T>(conv_geo(), true, g), L);
      run(l, conv_geo().in_size(), conv_geo().out_size());
    } else {
      Adapted<Linear<T>, Ia3> l(Linear<T>(10, 8, true, g), L);
      run(l, 10, 8);
    }
  }
}

TEST_CASE("ia3 on embedding: output scaling works, input scaling is refused", "[ia3][embedding]") {
  Generator g(1);
  Adapted<Embedding<double>, Ia3> e(Embedding<double>(6, 4, g), "emb");
  e.add_adapter("default", ia3(false), g);
  auto& a = ia3_adapter(e, "default");
  for (std::size_t i = 0; i < a.l.size(); ++i) a.l[i] = 0.5 + double(i);
  const std::vector<std::int64_t> ids = {1, 5, 1};
  auto ctx = e.make_context(3);
  Mat<double> y(3, 4), ym(3, 4);
  e.forward(ctx, ids, y);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) CHECK(y(i, j) == Approx(e.base().weight()(ids[std::size_t(i)], j) * (0.5 + j)));
  const Mat<double> dy = random_mat<double>(3, 4, 2);
  e.backward(ctx, dy, {}, GradMode::overwrite);
  for (int j = 0; j < 4; ++j) {
    double expect = 0;
    for (int i = 0; i < 3; ++i) expect += dy(i, j) * e.base().weight()(ids[std::size_t(i)], j);
    CHECK(a.grad_l[std::size_t(j)] == Approx(expect));
  }
  e.merge();
  e.forward(ctx, ids, ym);
  CHECK(max_abs_diff(ym, y) < 1e-12);
  Adapted<Embedding<double>, Ia3> f(Embedding<double>(6, 4, g), "emb");
  REQUIRE_THROWS_WITH(f.add_adapter("ff", ia3(true), g), Catch::Contains("impossible on an embedding"));
}
