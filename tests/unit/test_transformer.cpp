// Transformer building blocks (peft/nn/): LayerNorm, GELU, causal self-attention with past keys/values
// and a padding mask, the MLP block, the pre-LN residual block, the decoder-only LM and its loss —
// gradients against finite differences (float and double), LoRA on q/v through Adapted, numbers from a
// PyTorch model of the same layout (and real PEFT for LoRA), model-helper names, bad input.
#include <catch2/catch.hpp>

#include <functional>
#include <map>
#include <peft/nn/decoder.hpp>
#include <peft/nn/loss.hpp>
#include <sstream>

#include "gradcheck.hpp"
#include "reference.hpp"
#include "test_util.hpp"

using namespace peft;
using namespace peft::test;

namespace {

template <class T>
using LoraLinear = Adapted<Linear<T>, Lora>;

/// Fourth-order central differences (error O(h⁴)): the blocks are not multilinear in their inputs, and
/// the double tolerance (1e-7 relative) is below what a second-order difference resolves.
template <class A>
GradReport check_gradient4(double* param, const A* analytic, std::size_t n, const std::function<double()>& loss, double h = 1e-3) {
  GradReport r;
  for (std::size_t i = 0; i < n; ++i) {
    const double old = param[i];
    auto at = [&](double v) { param[i] = v; return loss(); };
    const double num = (-at(old + 2 * h) + 8 * at(old + h) - 8 * at(old - h) + at(old - 2 * h)) / (12 * h);
    param[i] = old;
    const double e = rel_err(double(analytic[i]), num);
    ++r.checked;
    if (e > r.worst || !std::isfinite(double(analytic[i]))) {
      r.worst = std::isfinite(double(analytic[i])) ? e : std::numeric_limits<double>::infinity();
      r.worst_index = i;
      r.analytic = double(analytic[i]);
      r.numeric = num;
    }
  }
  return r;
}

/// Every parameter set to seeded values of a useful size: LayerNorm weights near 1, the rest in ±0.5.
template <class M>
void randomize(M& m, std::uint64_t seed) {
  Generator g(seed);
  for_each_layer(m, [&](auto& layer, const std::string&) {
    layer.visit_parameters([&](auto p) {
      using S = std::remove_pointer_t<decltype(p.value)>;
      std::vector<double> v(p.size);
      g.uniform(v.data(), v.size(), -0.5, 0.5);
      const bool ln_weight = p.name == "weight" && p.size > 0 && double(p.value[0]) == 1.0;  // a LayerNorm at init
      for (std::size_t k = 0; k < p.size; ++k) p.value[k] = S(ln_weight ? 1.0 + 0.6 * v[k] : v[k]);
    });
  });
}

template <class T, class M>
std::vector<ParamRef<T>> params(M& m) { return parameters<T>(m); }

template <class T, class MD, class M>
void set_twin(M& m, MD& twin) {
  auto p = params<T>(m);
  auto q = params<double>(twin);
  REQUIRE(p.size() == q.size());
  for (std::size_t i = 0; i < p.size(); ++i) {
    REQUIRE(p[i].name == q[i].name);
    REQUIRE(p[i].size == q[i].size);
    for (std::size_t k = 0; k < p[i].size; ++k) q[i].value[k] = double(p[i].value[k]);
  }
}

/// The generic check: f = <y, dy> for a fixed dy; every trainable parameter of m and every tensor in
/// `in` (the differentiable inputs: x or inputs_embeds, then past keys/values) against fourth-order
/// differences on the double twin; overwrite mode with NaN-filled gradients, then accumulate mode.
template <class T, class M, class MD, class Case>
void check_grads(M& m, MD& twin, const Case& c, const std::vector<Mat<T>>& in0, Index out_rows, Index out_cols, std::uint64_t seed = 7) {
  set_twin<T>(m, twin);
  std::vector<Mat<T>> in = in0;
  std::vector<Mat<double>> ind;
  for (const auto& x : in) ind.push_back(x.template cast<double>());
  const Mat<T> dy = random_mat<T>(out_rows, out_cols, seed);
  const Mat<double> dyd = dy.template cast<double>();
  auto tctx = c.make_ctx(twin);
  Mat<double> yd(out_rows, out_cols);
  auto loss = [&]() -> double {
    c.forward(twin, tctx, ind, yd);
    return dot(yd, dyd);
  };
  auto ctx = c.make_ctx(m);
  Mat<T> y(out_rows, out_cols);
  c.forward(m, ctx, in, y);
  loss();
  CHECK(max_abs_diff(y, yd) < 100 * value_tol<T>());

  auto p = params<T>(m);
  auto q = params<double>(twin);
  std::size_t trainable = 0;
  for (auto& r : p)
    if (r.trainable) {
      ++trainable;
      for (std::size_t k = 0; k < r.size; ++k) r.grad[k] = nan<T>();
    }
  CHECK(trainable > 0);
  std::vector<Mat<T>> g;
  for (const auto& x : in) g.push_back(filled<T>(x.rows(), x.cols(), nan<T>()));
  c.backward(m, ctx, dy, g, GradMode::overwrite, GradMode::overwrite);
  std::vector<std::vector<T>> first;
  for (std::size_t i = 0; i < p.size(); ++i) {
    if (!p[i].trainable) continue;
    first.emplace_back(p[i].grad, p[i].grad + p[i].size);
    const auto rep = check_gradient4(q[i].value, p[i].grad, p[i].size, loss);
    INFO(rep.str(p[i].name));
    CHECK(rep.worst < grad_tol<T>());
  }
  for (std::size_t i = 0; i < in.size(); ++i) {
    const auto rep = check_gradient4(ind[i].data(), g[i].data(), std::size_t(ind[i].size()), loss);
    INFO(rep.str("input " + std::to_string(i)));
    CHECK(rep.worst < grad_tol<T>());
  }
  // accumulate: parameters and inputs add to what is there
  for (auto& r : p)
    if (r.trainable)
      for (std::size_t k = 0; k < r.size; ++k) r.grad[k] = T(1.5);
  std::vector<Mat<T>> g2;
  for (const auto& x : in) g2.push_back(filled<T>(x.rows(), x.cols(), T(9)));
  c.backward(m, ctx, dy, g2, GradMode::accumulate, GradMode::accumulate);
  std::size_t t = 0;
  for (auto& r : p) {
    if (!r.trainable) continue;
    double worst = 0;
    for (std::size_t k = 0; k < r.size; ++k) worst = std::max(worst, std::abs(double(r.grad[k]) - (1.5 + double(first[t][k]))));
    INFO("accumulate " << r.name);
    CHECK(worst < 1e3 * value_tol<T>());
    ++t;
  }
  for (std::size_t i = 0; i < in.size(); ++i) {
    INFO("accumulate input " << i);
    CHECK(max_abs_diff(g2[i], (g[i].array() + T(9)).matrix()) < 1e3 * value_tol<T>());
  }
}

// ---- cases: how to run each block ---------------------------------------------------------------------

/// Layers with forward(ctx, x, y) / backward(ctx, dy, dx, params, input) and make_context(rows).
struct RowsCase {
  Index rows;
  template <class Mod>
  auto make_ctx(Mod& m) const { return m.make_context(rows); }
  template <class Mod, class Ctx, class S>
  void forward(Mod& m, Ctx& ctx, std::vector<Mat<S>>& in, Mat<S>& y) const { m.forward(ctx, in[0], y); }
  template <class Mod, class Ctx, class S>
  void backward(Mod& m, Ctx& ctx, const Mat<S>& dy, std::vector<Mat<S>>& g, GradMode params, GradMode input) const {
    m.backward(ctx, dy, g[0], params, input);
  }
};

/// Attention and residual blocks: x, then (when past > 0) past key and past value.
struct SeqCase {
  Index batch, seq, past = 0;
  std::vector<std::int64_t> mask;
  Index max_batch = 0, max_seq = 0, max_past = 0;  // 0: the shapes above
  template <class Mod>
  auto make_ctx(Mod& m) const {
    return m.make_context(max_batch ? max_batch : batch, max_seq ? max_seq : seq, max_past ? max_past : past);
  }
  template <class Mod, class Ctx, class S>
  void forward(Mod& m, Ctx& ctx, std::vector<Mat<S>>& in, Mat<S>& y) const {
    nn::PastKeyValue<S> p;
    if (past > 0) p = {in[1], in[2], past};
    m.forward(ctx, in[0], batch, seq, y, p, mask);
  }
  template <class Mod, class Ctx, class S>
  void backward(Mod& m, Ctx& ctx, const Mat<S>& dy, std::vector<Mat<S>>& g, GradMode params, GradMode input) const {
    nn::PastKeyValueGrad<S> pg;
    if (past > 0) pg = {g[1], g[2], input};
    m.backward(ctx, dy, g[0], pg, params, input);
  }
};

/// The decoder: input_ids (when non-empty) or in[0] as inputs_embeds, then per layer past key and value.
struct DecoderCase {
  Index batch, seq, past = 0, layers = 2;
  std::vector<std::int64_t> ids, mask;
  template <class Mod>
  auto make_ctx(Mod& m) const { return m.make_context(batch, seq, past); }
  bool embeds() const { return ids.empty(); }
  template <class Mod, class Ctx, class S>
  void forward(Mod& m, Ctx& ctx, std::vector<Mat<S>>& in, Mat<S>& y) const {
    nn::DecoderInput<S> di;
    di.batch = batch;
    di.seq = seq;
    const std::size_t o = embeds() ? 1 : 0;
    if (embeds()) di.inputs_embeds = in[0];
    else di.input_ids = ids;
    std::vector<nn::PastKeyValue<S>> pk;
    if (past > 0)
      for (Index l = 0; l < layers; ++l) pk.push_back({in[o + 2 * l], in[o + 2 * l + 1], past});
    di.past_key_values = pk;
    di.attention_mask = mask;
    m.forward(ctx, di, y);
  }
  template <class Mod, class Ctx, class S>
  void backward(Mod& m, Ctx& ctx, const Mat<S>& dy, std::vector<Mat<S>>& g, GradMode params, GradMode input) const {
    nn::DecoderGrad<S> dg;
    const std::size_t o = embeds() ? 1 : 0;
    if (embeds()) dg.inputs_embeds = g[0];
    std::vector<nn::PastKeyValueGrad<S>> pg;
    if (past > 0)
      for (Index l = 0; l < layers; ++l) pg.push_back({g[o + 2 * l], g[o + 2 * l + 1], input});
    dg.past_key_values = pg;
    m.backward(ctx, dy, dg, params, input);
  }
};

nn::DecoderConfig small_config() {
  nn::DecoderConfig c;
  c.vocab_size = 11;
  c.max_position_embeddings = 8;
  c.d_model = 16;
  c.num_layers = 2;
  c.num_heads = 2;
  c.d_ff = 32;
  return c;
}

template <class T>
std::vector<Mat<T>> past_tensors(Index layers, Index batch, Index heads, Index past, Index hd, std::uint64_t seed) {
  std::vector<Mat<T>> v;
  for (Index l = 0; l < 2 * layers; ++l) v.push_back(random_mat<T>(batch * heads * past, hd, seed + std::uint64_t(l)));
  return v;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// LayerNorm and GELU

TEMPLATE_TEST_CASE("nn: LayerNorm backward matches finite differences", "[nn][grad]", float, double) {
  using T = TestType;
  nn::LayerNorm<T> ln(12);
  nn::LayerNorm<double> twin(12);
  ln.set_requires_grad(true);
  twin.set_requires_grad(true);
  Generator g(3);
  g.uniform(ln.weight().data, 12, 0.5, 1.5);
  g.uniform(ln.bias().data, 12, -0.5, 0.5);
  check_grads(ln, twin, RowsCase{7}, std::vector<Mat<T>>{random_mat<T>(7, 12, 1) * T(2)}, 7, 12);
}

TEST_CASE("nn: LayerNorm forward is PyTorch's (biased variance, eps inside the root)", "[nn]") {
  nn::LayerNorm<double> ln(4, 1e-5);
  Mat<double> x(1, 4), y(1, 4);
  x << 1, 2, 3, 6;
  auto ctx = ln.make_context(1);
  ln.forward(ctx, x, y);
  const double mean = 3, var = (4 + 1 + 0 + 9) / 4.0;
  for (int j = 0; j < 4; ++j) CHECK(y(0, j) == Approx((x(0, j) - mean) / std::sqrt(var + 1e-5)).epsilon(1e-14));
}

TEMPLATE_TEST_CASE("nn: GELU (exact and tanh) values and backward", "[nn][grad]", float, double) {
  using T = TestType;
  const auto a = GENERATE(nn::GeluApproximate::none, nn::GeluApproximate::tanh);
  nn::Gelu<T> gelu(a);
  nn::Gelu<double> twin(a);
  // torch.nn.functional.gelu(torch.tensor([1.0, -0.5], dtype=torch.float64), approximate=...)
  Mat<double> x1(1, 2), y1(1, 2);
  x1 << 1.0, -0.5;
  auto c1 = twin.make_context(1);
  twin.forward(c1, x1, y1);
  if (a == nn::GeluApproximate::none) {
    CHECK(y1(0, 0) == Approx(0.8413447460685429).epsilon(1e-14));
    CHECK(y1(0, 1) == Approx(-0.15426876936299344).epsilon(1e-14));
  } else {
    CHECK(y1(0, 0) == Approx(0.8411919906082768).epsilon(1e-14));
    CHECK(y1(0, 1) == Approx(-0.15428599017485606).epsilon(1e-14));
  }
  Mat<T> x = random_mat<T>(5, 9, 4);
  x *= T(3);
  const Mat<T> dy = random_mat<T>(5, 9, 5);
  Mat<double> xd = x.template cast<double>(), yd(5, 9);
  auto tctx = twin.make_context(5);
  auto loss = [&] { twin.forward(tctx, xd, yd); return dot(yd, dy.template cast<double>()); };
  auto ctx = gelu.make_context(5);
  Mat<T> y(5, 9), dx = filled<T>(5, 9, nan<T>());
  gelu.forward(ctx, x, y);
  gelu.backward(ctx, dy, dx);
  const auto r = check_gradient4(xd.data(), dx.data(), std::size_t(xd.size()), loss);
  INFO(r.str("dx"));
  CHECK(r.worst < grad_tol<T>());
  Mat<T> dx2 = filled<T>(5, 9, T(9));
  gelu.backward(ctx, dy, dx2, GradMode::accumulate);
  CHECK(max_abs_diff(dx2, (dx.array() + T(9)).matrix()) < 10 * value_tol<T>());
}

// ---------------------------------------------------------------------------------------------------------
// attention

TEMPLATE_TEST_CASE("nn: causal self-attention backward matches finite differences (past, mask, past gradient)", "[nn][grad][attention]",
                   float, double) {
  using T = TestType;
  struct Setup {
    const char* what;
    Index batch, seq, past;
    std::vector<std::int64_t> mask;
  };
  const Setup s = GENERATE(Setup{"no past, no mask", 2, 5, 0, {}},
                           Setup{"no past, padding mask (a fully masked query in row 1)", 2, 4, 0, {1, 1, 1, 0, 0, 1, 1, 1}},
                           Setup{"past keys/values", 2, 4, 3, {}},
                           Setup{"past keys/values and a mask over past + current", 2, 3, 2, {1, 1, 1, 1, 0, 1, 0, 1, 1, 0}},
                           Setup{"one token after a long past", 1, 1, 5, {}});
  INFO(s.what);
  const Index d = 12, heads = 3, hd = 4;
  Generator g(5), gd(5);
  auto attn = nn::make_causal_self_attention<Linear<T>>(d, heads, g);
  auto twin = nn::make_causal_self_attention<Linear<double>>(d, heads, gd);
  set_base_requires_grad(attn, true);
  set_base_requires_grad(twin, true);
  randomize(attn, 17);
  std::vector<Mat<T>> in{random_mat<T>(s.batch * s.seq, d, 21)};
  if (s.past > 0) {
    in.push_back(random_mat<T>(s.batch * heads * s.past, hd, 22));
    in.push_back(random_mat<T>(s.batch * heads * s.past, hd, 23));
  }
  check_grads(attn, twin, SeqCase{s.batch, s.seq, s.past, s.mask}, in, s.batch * s.seq, d);
}

TEST_CASE("nn: attention weights follow the causal limit and the mask; a query that sees nothing gets zeros", "[nn][attention]") {
  Generator g(1);
  auto attn = nn::make_causal_self_attention<Linear<double>>(8, 2, g);
  const Index batch = 2, seq = 3, past = 2;
  const std::vector<std::int64_t> mask{1, 1, 1, 1, 1, 0, 0, 0, 1, 1};  // row 1: past masked, its first token masked
  auto ctx = attn.make_context(batch, seq, past);
  const Mat<double> x = random_mat<double>(batch * seq, 8, 2);
  const Mat<double> pk = random_mat<double>(batch * 2 * past, 4, 3), pv = random_mat<double>(batch * 2 * past, 4, 4);
  Mat<double> y(batch * seq, 8);
  attn.forward(ctx, x, batch, seq, y, {pk, pv, past}, mask);
  for (Index h = 0; h < 2; ++h) {
    const auto w0 = attn.attention_weights(ctx, 0, h);
    for (Index s = 0; s < seq; ++s) {
      double sum = 0;
      for (Index j = 0; j < past + seq; ++j) {
        if (j > past + s) CHECK(w0(s, j) == 0.0);
        sum += w0(s, j);
      }
      CHECK(sum == Approx(1.0));
    }
    const auto w1 = attn.attention_weights(ctx, 1, h);
    for (Index j = 0; j < past + seq; ++j) CHECK(w1(0, j) == 0.0);  // query 0 of row 1 sees only masked keys
    CHECK(w1(1, 3) == Approx(1.0));                                 // query 1 sees only itself
  }
  // the zero attention output of the blind query: y row = o_proj bias
  const auto bo = attn.o_proj.bias();
  for (Index j = 0; j < 8; ++j) CHECK(y(seq, j) == Approx(bo(0, j)));
}

TEMPLATE_TEST_CASE("nn: LoRA on q/v inside the attention (Adapted projections) matches finite differences", "[nn][grad][lora]", float, double) {
  using T = TestType;
  Generator g(8), gd(8);
  auto attn = nn::make_causal_self_attention<LoraLinear<T>>(12, 2, g, "attn");
  auto twin = nn::make_causal_self_attention<LoraLinear<double>>(12, 2, gd, "attn");
  LoraConfig cfg;
  cfg.r = 3;
  cfg.lora_alpha = 6;
  cfg.init_lora_weights = LoraInit::off;
  for (auto* a : {&attn.q_proj, &attn.v_proj}) a->add_adapter("default", cfg, g);
  for (auto* a : {&twin.q_proj, &twin.v_proj}) a->add_adapter("default", cfg, gd);
  CHECK(attn.q_proj.module_path() == "attn.q_proj");
  randomize(attn, 31);
  // only the adapters train: the base weights are frozen
  for (const auto& p : parameters<T>(attn)) CHECK(p.trainable == (p.name.find("lora_") != std::string::npos));
  std::vector<Mat<T>> in{random_mat<T>(2 * 3, 12, 1), random_mat<T>(2 * 2 * 2, 6, 2), random_mat<T>(2 * 2 * 2, 6, 3)};
  check_grads(attn, twin, SeqCase{2, 3, 2, {1, 0, 1, 1, 1, 1, 1, 1, 1, 0}}, in, 2 * 3, 12);
}

// ---------------------------------------------------------------------------------------------------------
// MLP and residual block

TEMPLATE_TEST_CASE("nn: MLP block backward matches finite differences", "[nn][grad]", float, double) {
  using T = TestType;
  const auto a = GENERATE(nn::GeluApproximate::none, nn::GeluApproximate::tanh);
  Generator g(2), gd(2);
  auto mlp = nn::make_mlp_block<Linear<T>>(8, 20, g, a);
  auto twin = nn::make_mlp_block<Linear<double>>(8, 20, gd, a);
  set_base_requires_grad(mlp, true);
  set_base_requires_grad(twin, true);
  randomize(mlp, 4);
  check_grads(mlp, twin, RowsCase{6}, std::vector<Mat<T>>{random_mat<T>(6, 8, 9)}, 6, 8);
}

TEMPLATE_TEST_CASE("nn: pre-LN residual block backward matches finite differences", "[nn][grad]", float, double) {
  using T = TestType;
  const bool with_past = GENERATE(false, true);
  Generator g(4), gd(4);
  auto blk = nn::make_decoder_block<Linear<T>>(12, 3, 24, g);
  auto twin = nn::make_decoder_block<Linear<double>>(12, 3, 24, gd);
  set_base_requires_grad(blk, true);
  set_base_requires_grad(twin, true);
  randomize(blk, 6);
  const Index batch = 2, seq = 4, past = with_past ? 2 : 0;
  std::vector<Mat<T>> in{random_mat<T>(batch * seq, 12, 1)};
  std::vector<std::int64_t> mask;
  if (with_past) {
    in.push_back(random_mat<T>(batch * 3 * past, 4, 2));
    in.push_back(random_mat<T>(batch * 3 * past, 4, 3));
    mask = {1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0};
  }
  check_grads(blk, twin, SeqCase{batch, seq, past, mask}, in, batch * seq, 12);
}

// ---------------------------------------------------------------------------------------------------------
// decoder

TEMPLATE_TEST_CASE("nn: decoder backward matches finite differences (all parameters, inputs_embeds, past keys/values)", "[nn][grad][decoder]",
                   float, double) {
  using T = TestType;
  struct Setup {
    const char* what;
    bool embeds;
    Index past;
    std::vector<std::int64_t> mask;
  };
  const Setup s = GENERATE(Setup{"input_ids", false, 0, {}}, Setup{"inputs_embeds", true, 0, {1, 1, 1, 1, 1, 1, 1, 1, 0, 0}},
                           Setup{"input_ids with past keys/values and a mask", false, 3, {1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0}},
                           Setup{"inputs_embeds with past keys/values", true, 2, {}});
  INFO(s.what);
  const auto cfg = small_config();
  const Index batch = 2, seq = 5;
  Generator g(11), gd(11);
  auto m = nn::make_decoder<T>(cfg, g);
  auto twin = nn::make_decoder<double>(cfg, gd);
  set_base_requires_grad(m, true);
  set_base_requires_grad(twin, true);
  randomize(m, 12);
  DecoderCase c{batch, seq, s.past, cfg.num_layers, {}, s.mask};
  std::vector<Mat<T>> in;
  if (s.embeds) in.push_back(random_mat<T>(batch * seq, cfg.d_model, 3));
  else c.ids = {3, 7, 0, 10, 3, 5, 5, 1, 9, 2};
  for (auto& p : past_tensors<T>(cfg.num_layers, batch, cfg.num_heads, s.past, cfg.head_dim(), 40))
    if (s.past > 0) in.push_back(p);
  check_grads(m, twin, c, in, batch * seq, cfg.vocab_size);
}

TEMPLATE_TEST_CASE("nn: decoder with LoRA on q/v: only the adapters train, gradients match finite differences", "[nn][grad][decoder][lora]",
                   float, double) {
  using T = TestType;
  const auto cfg = small_config();
  Generator g(2), gd(2);
  auto m = nn::make_decoder<T, LoraLinear<T>>(cfg, g);
  auto twin = nn::make_decoder<double, LoraLinear<double>>(cfg, gd);
  LoraConfig lc;
  lc.r = 2;
  lc.lora_alpha = 4;
  lc.init_lora_weights = LoraInit::off;
  for (auto& b : m.h) for (auto* a : {&b.attn.q_proj, &b.attn.v_proj}) a->add_adapter("default", lc, g);
  for (auto& b : twin.h) for (auto* a : {&b.attn.q_proj, &b.attn.v_proj}) a->add_adapter("default", lc, gd);
  randomize(m, 5);
  std::vector<std::string> trainable;
  for (const auto& p : trainable_parameters<T>(m)) trainable.push_back(p.name);
  CHECK(trainable == std::vector<std::string>{"h.0.attn.q_proj.lora_A.default.weight", "h.0.attn.q_proj.lora_B.default.weight",
                                              "h.0.attn.v_proj.lora_A.default.weight", "h.0.attn.v_proj.lora_B.default.weight",
                                              "h.1.attn.q_proj.lora_A.default.weight", "h.1.attn.q_proj.lora_B.default.weight",
                                              "h.1.attn.v_proj.lora_A.default.weight", "h.1.attn.v_proj.lora_B.default.weight"});
  DecoderCase c{2, 4, 2, cfg.num_layers, {1, 2, 3, 4, 5, 6, 7, 8}, {}};
  check_grads(m, twin, c, past_tensors<T>(cfg.num_layers, 2, cfg.num_heads, 2, cfg.head_dim(), 60), 2 * 4, cfg.vocab_size);
}

TEST_CASE("nn: decoder parameter names are PyTorch-like and the model helpers walk it", "[nn][decoder][model]") {
  const auto cfg = small_config();
  Generator g(1);
  auto m = nn::make_decoder<float, LoraLinear<float>>(cfg, g);
  std::vector<std::string> names;
  for (const auto& p : parameters<float>(m)) names.push_back(p.name);
  REQUIRE(names.size() == 2 + 2 * 16 + 3);
  CHECK(names[0] == "wte.weight");
  CHECK(names[1] == "wpe.weight");
  CHECK(names[2] == "h.0.ln_1.weight");
  CHECK(names[4] == "h.0.attn.q_proj.weight");
  CHECK(names[11] == "h.0.attn.o_proj.bias");
  CHECK(names[14] == "h.0.mlp.fc_in.weight");
  CHECK(names[17] == "h.0.mlp.fc_out.bias");
  CHECK(names[18] == "h.1.ln_1.weight");
  CHECK(names[34] == "ln_f.weight");
  CHECK(names[36] == "lm_head.weight");
  const auto c0 = count_parameters(m);
  CHECK(c0.trainable == 0);
  CHECK(c0.total == 176 + 128 + 2 * (4 * 16 + 4 * 272 + 16 * 32 + 32 + 32 * 16 + 16) + 32 + 176);
  LoraConfig lc;
  lc.r = 4;
  for (auto& b : m.h) for (auto* a : {&b.attn.q_proj, &b.attn.v_proj}) a->add_adapter("default", lc, g);
  for (auto& b : m.h) b.attn.q_proj.add_adapter("other", lc, g);
  const auto c1 = count_parameters(m);
  CHECK(c1.trainable == 4 * 4 * (16 + 16));
  set_adapter(m, "other");
  CHECK(count_parameters(m).trainable == 2 * 4 * (16 + 16));
  CHECK(m.h[0].attn.v_proj.active_adapters().empty());
  set_adapter(m, "default");
  std::ostringstream os;
  print_trainable_parameters(m, os);
  CHECK(os.str().rfind("trainable params: 512 || all params: ", 0) == 0);
  eval(m);
  CHECK_FALSE(m.h[1].attn.q_proj.is_training());
  train(m);
  CHECK(m.h[1].attn.q_proj.is_training());
  // merged adapters give the unmerged logits
  const std::vector<std::int64_t> ids{1, 2, 3, 4, 5, 6};
  auto ctx = m.make_context(2, 3);
  Mat<float> y0(6, 11), y1(6, 11);
  nn::DecoderInput<float> in{2, 3, ids};
  for (auto& b : m.h) for (auto* a : {&b.attn.q_proj, &b.attn.v_proj}) {  // non-zero B so the adapters matter
    auto& ad = lora_adapter(*a, "default");
    for (std::size_t i = 0; i < ad.b.size(); ++i) ad.b[i] = 0.1f * float(i % 7) - 0.3f;
  }
  m.forward(ctx, in, y0);
  merge_adapters(m);
  m.forward(ctx, in, y1);
  CHECK(max_abs_diff(y0, y1) < 1e-5);
  unmerge_adapters(m);
  disable_adapters(m);
  m.forward(ctx, in, y1);
  CHECK(max_abs_diff(y0, y1) > 1e-4);
}

// ---------------------------------------------------------------------------------------------------------
// loss

TEMPLATE_TEST_CASE("nn: cross-entropy and the causal-LM loss (ignore_index -100) with their gradients", "[nn][loss][grad]", float, double) {
  using T = TestType;
  const Mat<T> logits = random_mat<T>(6, 5, 3) * T(3);
  const std::vector<std::int64_t> t{1, -100, 4, 0, -100, 2};
  Mat<T> dl = filled<T>(6, 5, nan<T>());
  const double loss = nn::cross_entropy<T>(logits, t, dl);
  double ref = 0;
  for (int i : {0, 2, 3, 5}) {
    double sum = 0;  // a scalar loop: g++ 12 warns falsely inside Eigen's vectorised exp with AVX-512
    for (Index k = 0; k < 5; ++k) sum += std::exp(double(logits(i, k)));
    ref += std::log(sum) - double(logits(i, t[std::size_t(i)]));
  }
  CHECK(loss == Approx(ref / 4).epsilon(1e-6));
  CHECK(dl.row(1).cwiseAbs().maxCoeff() == 0);
  Mat<double> ld = logits.template cast<double>();
  auto f = [&] { return nn::cross_entropy<double>(ld, t); };
  const auto r = check_gradient4(ld.data(), dl.data(), std::size_t(ld.size()), f);
  INFO(r.str("dlogits"));
  CHECK(r.worst < grad_tol<T>());

  // the causal shift: position s predicts label s + 1; equal to cross_entropy on the shifted targets
  const std::vector<std::int64_t> labels{2, 1, -100, 4, 3, 0};  // batch 2, seq 3
  Mat<T> dc(6, 5);
  const double lc = nn::causal_lm_loss<T>(logits, labels, 2, 3, dc);
  const std::vector<std::int64_t> shifted{1, -100, -100, 3, 0, -100};
  Mat<T> ds(6, 5);
  CHECK(lc == Approx(nn::cross_entropy<T>(logits, shifted, ds)).epsilon(1e-12));
  CHECK(max_abs_diff(dc, ds) == 0);

  const std::vector<std::int64_t> none(6, -100);
  CHECK(std::isnan(nn::cross_entropy<T>(logits, none)));  // PyTorch's mean over no target
  const std::vector<std::int64_t> bad{1, 2, 5, 0, 0, 0};
  CHECK_THROWS_WITH(nn::cross_entropy<T>(logits, bad), Catch::Contains("target 5 of row 2"));
}

// ---------------------------------------------------------------------------------------------------------
// numbers from PyTorch (the same decoder written in torch) and real PEFT (LoRA on q/v)

TEMPLATE_TEST_CASE("nn: decoder matches the PyTorch model (logits, loss, every gradient, inputs_embeds, past keys/values)",
                   "[nn][reference][decoder]", float, double) {
  using T = TestType;
  const auto j = load_reference(std::is_same_v<T, float> ? "transformer_f32.json" : "transformer_f64.json");
  const auto cfg = small_config();
  const Index batch = 2, seq = 5, past = 3, d = cfg.d_model, V = cfg.vocab_size;
  const auto ids = j.at("tensors").at("ids").at("data").template get<std::vector<std::int64_t>>();
  const auto mask = j.at("tensors").at("mask").at("data").template get<std::vector<std::int64_t>>();
  const auto labels = j.at("tensors").at("labels").at("data").template get<std::vector<std::int64_t>>();
  std::vector<Mat<T>> pk;
  for (Index l = 0; l < cfg.num_layers; ++l)
    for (const char* kv : {"key", "value"}) pk.push_back(ref_tensor<T>(j, "past." + std::to_string(l) + "." + kv, batch * cfg.num_heads * past));
  std::vector<nn::PastKeyValue<T>> pkv;
  for (Index l = 0; l < cfg.num_layers; ++l) pkv.push_back({pk[std::size_t(2 * l)], pk[std::size_t(2 * l + 1)], past});
  auto compare = [&](const auto& got, const std::string& name) {
    const Mat<T> want = ref_tensor<T>(j, name, got.rows());
    REQUIRE(want.cols() == got.cols());
    INFO(name << ": scaled error " << scaled_diff(got, want));
    CHECK(scaled_diff(got, want) < reference_tol<T>());
  };

  SECTION("full model trainable") {
    Generator g(0);
    auto m = nn::make_decoder<T>(cfg, g);
    set_base_requires_grad(m, true);
    std::size_t loaded = 0;
    for (auto& p : parameters<T>(m)) {
      const Mat<T> w = ref_tensor<T>(j, "w." + p.name, 1);
      REQUIRE(std::size_t(w.size()) == p.size);
      std::copy_n(w.data(), p.size, p.value);
      ++loaded;
    }
    std::size_t in_file = 0;
    for (auto& [k, v] : j.at("tensors").items()) in_file += k.rfind("w.", 0) == 0;
    CHECK(loaded == in_file);
    auto ctx = m.make_context(batch, seq, past);
    Mat<T> logits(batch * seq, V), dl(batch * seq, V), demb = filled<T>(batch * seq, d, nan<T>());
    nn::DecoderInput<T> in{batch, seq, ids, {}, pkv, mask};
    m.forward(ctx, in, logits);
    compare(logits, "full.logits");
    const double loss = nn::causal_lm_loss<T>(logits, labels, batch, seq, dl);
    CHECK(std::abs(loss - ref_tensor<double>(j, "full.loss")(0, 0)) < reference_tol<T>() * std::max(1.0, loss));
    std::vector<Mat<T>> gp;
    for (const auto& p : pk) gp.push_back(filled<T>(p.rows(), p.cols(), nan<T>()));
    std::vector<nn::PastKeyValueGrad<T>> gpv;
    for (Index l = 0; l < cfg.num_layers; ++l) gpv.push_back({gp[std::size_t(2 * l)], gp[std::size_t(2 * l + 1)]});
    m.backward(ctx, dl, {demb, gpv}, GradMode::overwrite);
    for (auto& p : parameters<T>(m)) compare(Eigen::Map<const Mat<T>>(p.grad, 1, Index(p.size)), "full.grad." + p.name);
    for (Index l = 0; l < cfg.num_layers; ++l) {
      compare(gp[std::size_t(2 * l)], "full.grad.past." + std::to_string(l) + ".key");
      compare(gp[std::size_t(2 * l + 1)], "full.grad.past." + std::to_string(l) + ".value");
    }
    compare(demb, "full.grad.inputs_embeds");

    // the same through inputs_embeds = wte(ids)
    const Mat<T> emb = ref_tensor<T>(j, "full.inputs_embeds", batch * seq);
    nn::DecoderInput<T> in2{batch, seq, {}, emb, pkv, mask};
    Mat<T> logits2(batch * seq, V), demb2(batch * seq, d);
    m.forward(ctx, in2, logits2);
    compare(logits2, "full.logits");
    m.backward(ctx, dl, {demb2, {}}, GradMode::overwrite);
    compare(demb2, "full.grad.inputs_embeds");
    CHECK(as_mat(m.wte.weight_grad()).cwiseAbs().maxCoeff() == 0);  // not used: zeroed in overwrite mode

    // no past, no mask: positions from 0
    auto ctx0 = m.make_context(batch, seq);
    m.forward(ctx0, nn::DecoderInput<T>{batch, seq, ids}, logits);
    compare(logits, "nopast.logits");
    const double loss0 = nn::causal_lm_loss<T>(logits, labels, batch, seq);
    CHECK(std::abs(loss0 - ref_tensor<double>(j, "nopast.loss")(0, 0)) < reference_tol<T>() * std::max(1.0, loss0));
  }

  SECTION("LoRA on q_proj and v_proj (real PEFT, init_lora_weights=False, r=2, lora_alpha=4)") {
    Generator g(0);
    auto m = nn::make_decoder<T, LoraLinear<T>>(cfg, g);
    LoraConfig lc;
    lc.r = 2;
    lc.lora_alpha = 4;
    lc.init_lora_weights = LoraInit::off;
    for (auto& b : m.h) for (auto* a : {&b.attn.q_proj, &b.attn.v_proj}) a->add_adapter("default", lc, g);
    for (auto& p : parameters<T>(m)) {
      const bool lora = p.name.find("lora_") != std::string::npos;
      const Mat<T> w = ref_tensor<T>(j, (lora ? "lora.w." : "w.") + p.name, 1);
      REQUIRE(std::size_t(w.size()) == p.size);
      std::copy_n(w.data(), p.size, p.value);
    }
    auto ctx = m.make_context(batch, seq, past);
    Mat<T> logits(batch * seq, V), dl(batch * seq, V);
    m.forward(ctx, nn::DecoderInput<T>{batch, seq, ids, {}, pkv, mask}, logits);
    compare(logits, "lora.logits");
    const double loss = nn::causal_lm_loss<T>(logits, labels, batch, seq, dl);
    CHECK(std::abs(loss - ref_tensor<double>(j, "lora.loss")(0, 0)) < reference_tol<T>() * std::max(1.0, loss));
    std::vector<Mat<T>> gp;
    for (const auto& p : pk) gp.push_back(Mat<T>(p.rows(), p.cols()));
    std::vector<nn::PastKeyValueGrad<T>> gpv;
    for (Index l = 0; l < cfg.num_layers; ++l) gpv.push_back({gp[std::size_t(2 * l)], gp[std::size_t(2 * l + 1)]});
    m.backward(ctx, dl, {{}, gpv}, GradMode::overwrite);
    std::size_t checked = 0;
    for (auto& p : trainable_parameters<T>(m)) {
      compare(Eigen::Map<const Mat<T>>(p.grad, 1, Index(p.size)), "lora.grad." + p.name);
      ++checked;
    }
    CHECK(checked == 8);
    for (Index l = 0; l < cfg.num_layers; ++l) {
      compare(gp[std::size_t(2 * l)], "lora.grad.past." + std::to_string(l) + ".key");
      compare(gp[std::size_t(2 * l + 1)], "lora.grad.past." + std::to_string(l) + ".value");
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// bad input

TEST_CASE("nn: bad input gives clear exceptions", "[nn][errors]") {
  Generator g(1);
  SECTION("head dimensions") {
    CHECK_THROWS_AS(nn::make_causal_self_attention<Linear<float>>(16, 3, g), ShapeError);
    auto a = nn::make_causal_self_attention<Linear<float>>(16, 2, g);
    a.k_proj = Linear<float>(16, 12, true, g);
    CHECK_THROWS_WITH(a.make_context(1, 4), Catch::Contains("k_proj maps 16 -> 12"));
    a.k_proj = Linear<float>(16, 16, true, g);
    a.num_heads = 3;
    CHECK_THROWS_WITH(a.make_context(1, 4), Catch::Contains("not a multiple of num_heads 3"));
    nn::DecoderConfig c = small_config();
    c.num_heads = 5;
    CHECK_THROWS_AS(nn::make_decoder<float>(c, g), ConfigError);
  }
  auto a = nn::make_causal_self_attention<Linear<float>>(16, 2, g);
  auto ctx = a.make_context(2, 4, 3);
  const Mat<float> x = random_mat<float>(2 * 4, 16, 1);
  Mat<float> y(8, 16);
  SECTION("sequence longer than the context") {
    const Mat<float> x5 = random_mat<float>(2 * 5, 16, 1);
    Mat<float> y5(10, 16);
    CHECK_THROWS_WITH(a.forward(ctx, x5, 2, 5, y5), Catch::Contains("sequence length 5 exceeds the context's max_seq 4"));
    const Mat<float> x3 = random_mat<float>(3 * 4, 16, 1);
    Mat<float> y3(12, 16);
    CHECK_THROWS_WITH(a.forward(ctx, x3, 3, 4, y3), Catch::Contains("batch 3 exceeds the context's max_batch 2"));
    CHECK_THROWS_WITH(a.forward(ctx, x, 2, 3, y), Catch::Contains("x [batch * seq, d_model]"));
  }
  SECTION("prefix shapes that do not match the heads") {
    const Mat<float> k_bad_hd = random_mat<float>(2 * 2 * 3, 4, 2), v = random_mat<float>(2 * 2 * 3, 8, 3);
    CHECK_THROWS_WITH(a.forward(ctx, x, 2, 4, y, {k_bad_hd, v, 3}), Catch::Contains("past key has head_dim 4, the attention has 2 heads of head_dim 8"));
    const Mat<float> k_bad_rows = random_mat<float>(2 * 3 * 3, 8, 2);  // 3 heads
    CHECK_THROWS_WITH(a.forward(ctx, x, 2, 4, y, {k_bad_rows, v, 3}),
                      Catch::Contains("past key: expected [batch * heads * past_len, head_dim] = [2 * 2 * 3, 8] = [12, 8], got [18, 8]"));
    const Mat<float> k4 = random_mat<float>(2 * 2 * 4, 8, 2), v4 = random_mat<float>(2 * 2 * 4, 8, 2);
    CHECK_THROWS_WITH(a.forward(ctx, x, 2, 4, y, {k4, v4, 4}), Catch::Contains("past_len 4 exceeds the context's max_past 3"));
    const std::vector<std::int64_t> short_mask(7, 1);
    CHECK_THROWS_WITH(a.forward(ctx, x, 2, 4, y, {}, short_mask), Catch::Contains("attention_mask has 7 entries, expected batch * (past_len + seq) = 2 * 4 = 8"));
    a.forward(ctx, x, 2, 4, y);
    Mat<float> dx(8, 16), gk(12, 8);
    CHECK_THROWS_WITH(a.backward(ctx, y, dx, {gk, {}}), Catch::Contains("the forward had no past"));
  }
  SECTION("decoder inputs") {
    const auto cfg = small_config();
    auto m = nn::make_decoder<float>(cfg, g);
    auto dctx = m.make_context(2, 5, 2);
    const std::vector<std::int64_t> ids(12, 1), ids10(10, 1), bad_ids{1, 2, 3, 4, 11, 0, 0, 0, 0, 0};
    Mat<float> logits(12, 11), l10(10, 11);
    CHECK_THROWS_WITH(m.forward(dctx, nn::DecoderInput<float>{2, 6, ids}, logits), Catch::Contains("sequence length 6 exceeds the context's max_seq 5"));
    CHECK_THROWS_WITH(m.forward(dctx, nn::DecoderInput<float>{2, 5, bad_ids}, l10), Catch::Contains("token id 11 at position 4 is out of range"));
    const Mat<float> emb = random_mat<float>(10, 16, 1);
    CHECK_THROWS_WITH(m.forward(dctx, nn::DecoderInput<float>{2, 5, ids10, emb}, l10), Catch::Contains("exactly one of input_ids and inputs_embeds"));
    const Mat<float> k = random_mat<float>(2 * 2 * 2, 8, 1);
    const std::vector<nn::PastKeyValue<float>> one{{k, k, 2}};
    CHECK_THROWS_WITH(m.forward(dctx, nn::DecoderInput<float>{2, 5, ids10, {}, one}, l10), Catch::Contains("1 past key/value entries, expected one per layer (2)"));
    const std::vector<nn::PastKeyValue<float>> two{{k, k, 2}, {k, k, 2}};
    m.forward(dctx, nn::DecoderInput<float>{2, 5, ids10, {}, two}, l10);  // positions 2 .. 6 fit
    const std::vector<std::int64_t> ids4(8, 1);
    Mat<float> l8(8, 11);
    m.forward(dctx, nn::DecoderInput<float>{2, 4, ids4, {}, two}, l8);  // positions 2 .. 5 fit
    nn::DecoderInput<float> late{2, 4, ids4, {}, two};
    late.position_offset = 5;
    CHECK_THROWS_WITH(m.forward(dctx, late, l8), Catch::Contains("positions 5 .. 8 exceed max_position_embeddings 8"));
    auto fresh = m.make_context(1, 2);
    CHECK_THROWS_AS(m.backward(fresh, l8), StateError);
  }
}
