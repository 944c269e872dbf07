// Prefix Tuning, P-Tuning (MLP and LSTM prompt encoders) and MultiTask Prompt Tuning on the transformer
// decoder: gradients through the whole path (encoder → frozen decoder → causal-LM loss) against finite
// differences (float and double), numbers from real PEFT (PeftModelForCausalLM), export, bad input, and no
// heap allocation in forward/backward after make_context (operator new counted, Eigen's no-malloc mode).
#define EIGEN_RUNTIME_NO_MALLOC
#include <stdexcept>
#define eigen_assert(x) \
  if (!(x)) throw std::runtime_error("eigen_assert failed: " #x)

#include <catch2/catch.hpp>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <tuple>
#include <new>

#include <peft/nn/decoder.hpp>
#include <peft/nn/loss.hpp>
#include <peft/prompt/multitask_prompt_tuning.hpp>
#include <peft/prompt/p_tuning.hpp>
#include <peft/prompt/prefix_tuning.hpp>

#include "gradcheck.hpp"
#include "reference.hpp"
#include "test_util.hpp"

#include "sanitized.hpp"
#if !defined(PEFT_TEST_SANITIZED)
#define PEFT_PROMPT_COUNTS_NEW 1
namespace {
std::atomic<long> g_news{0};
}
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"  // operator new is malloc-based here
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
#endif

using namespace peft;
using namespace peft::test;

namespace {

/// The largest reference error seen per scalar type; printed at exit when PEFT_PRINT_REFERENCE_ERRORS is set
/// (the numbers the docs quote).
struct RefErrors {
  double worst[2] = {0, 0};
  ~RefErrors() {
    if (std::getenv("PEFT_PRINT_REFERENCE_ERRORS")) std::fprintf(stderr, "worst scaled reference error: float %.3g, double %.3g\n", worst[0], worst[1]);
  }
};
RefErrors g_ref_errors;
template <class T, class A, class B>
double ref_err(const A& a, const B& b) {
  const double e = scaled_diff(a, b);
  double& w = g_ref_errors.worst[std::is_same_v<T, float> ? 0 : 1];
  w = std::max(w, e);
  return e;
}

/// check_gradient with a fourth-order central difference (−f(+2h) + 8f(+h) − 8f(−h) + f(−2h)) / 12h: the
/// double checks keep a wide margin under grad_tol<double>() (second order leaves ~5e-8 here).
template <class A>
GradReport check_gradient4(double* param, const A* analytic, std::size_t n, const std::function<double()>& loss, double h = 1e-4) {
  GradReport r;
  for (std::size_t i = 0; i < n; ++i) {
    const double old = param[i];
    auto at = [&](double dx) { param[i] = old + dx; return loss(); };
    const double num = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h);
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

/// A decoder and its double twin with the same weights of a useful size.
template <class T>
struct Models {
  Generator g{4}, gd{4};
  nn::Decoder<T> m;
  nn::Decoder<double> twin;
  Models() : m(nn::make_decoder<T>(small_config(), g)), twin(nn::make_decoder<double>(small_config(), gd)) {
    auto p = parameters<T>(m);
    auto q = parameters<double>(twin);
    Generator r(7);
    for (std::size_t i = 0; i < p.size(); ++i) {
      std::vector<double> v(p[i].size);
      r.uniform(v.data(), v.size(), -0.5, 0.5);
      const bool ln = p[i].name.find("ln_") != std::string::npos && p[i].name.ends_with("weight");
      for (std::size_t k = 0; k < p[i].size; ++k) q[i].value[k] = double(p[i].value[k] = T(ln ? 1 + v[k] : v[k]));
    }
  }
};

/// Copies every parameter value of `src` into `dst` (same visiting order and sizes), converting the scalar.
template <class A, class B>
void copy_params(A& src, B& dst) {
  std::vector<std::vector<double>> vals;
  src.visit_parameters([&](auto p) { vals.emplace_back(p.value, p.value + p.size); });
  std::size_t i = 0;
  dst.visit_parameters([&](auto p) {
    REQUIRE(vals.at(i).size() == p.size);
    for (std::size_t k = 0; k < p.size; ++k) p.value[k] = decltype(+p.value[0])(vals[i][k]);
    ++i;
  });
  REQUIRE(i == vals.size());
}

template <class E>
std::map<std::string, ParamRef<typename E::scalar>> param_map(E& e) {
  std::map<std::string, ParamRef<typename E::scalar>> out;
  e.visit_parameters([&](auto p) { out.emplace(p.name, p); });
  return out;
}

template <class T>
void load_decoder(nn::Decoder<T>& m, const nlohmann::json& j) {
  for (auto& p : parameters<T>(m)) {
    const Mat<T> w = ref_tensor<T>(j, "w." + p.name, 1);
    REQUIRE(std::size_t(w.size()) == p.size);
    std::copy_n(w.data(), p.size, p.value);
  }
}

template <class E>
void load_params(E& e, const nlohmann::json& j, const std::string& prefix) {
  using T = typename E::scalar;
  e.visit_parameters([&](ParamRef<T> p) {
    INFO(p.name);
    const Mat<T> w = ref_tensor<T>(j, prefix + ".param." + p.name, 1);
    REQUIRE(std::size_t(w.size()) == p.size);
    std::copy_n(w.data(), p.size, p.value);
  });
}

std::vector<std::int64_t> ints(const nlohmann::json& j, const std::string& n) {
  return j.at("tensors").at(n).at("data").get<std::vector<std::int64_t>>();
}

const std::vector<std::int64_t> kIds{1, 5, 7, 2, 9, 9, 3, 0}, kMask{1, 1, 1, 1, 1, 1, 0, 0}, kLabels{1, 5, 7, 2, 9, 9, -100, -100};

// ---- prefix tuning ---------------------------------------------------------------------------------

/// decoder(ids, past = prefix) and the causal-LM loss; backward into the prefix encoder.
template <class T>
struct PrefixRun {
  nn::Decoder<T>& m;
  PrefixEncoder<T>& pe;
  Index batch, seq;
  std::vector<std::int64_t> ids, mask, labels, mask_p;
  typename nn::Decoder<T>::Context dctx;
  typename PrefixEncoder<T>::Context pctx;
  Mat<T> logits, dlogits;

  PrefixRun(nn::Decoder<T>& m_, PrefixEncoder<T>& pe_, Index b, Index s, std::vector<std::int64_t> i, std::vector<std::int64_t> mk,
            std::vector<std::int64_t> lb)
      : m(m_), pe(pe_), batch(b), seq(s), ids(std::move(i)), mask(std::move(mk)), labels(std::move(lb)) {
    const Index nvt = pe.num_virtual_tokens();
    dctx = m.make_context(batch, seq, nvt);
    pctx = pe.make_context(batch);
    logits.resize(batch * seq, m.config.vocab_size);
    dlogits.resize(batch * seq, m.config.vocab_size);
    mask_p.resize(std::size_t(batch * (nvt + seq)));
    pe.prepend_mask(mask, batch, seq, mask_p);
  }
  double forward() {
    pe.forward(pctx, batch);
    m.forward(dctx, nn::DecoderInput<T>{batch, seq, ids, {}, pe.past_key_values(pctx), mask_p}, logits);
    return nn::causal_lm_loss<T>(logits, labels, batch, seq, dlogits);
  }
  void backward(GradMode params) {
    m.backward(dctx, dlogits, nn::DecoderGrad<T>{{}, pe.past_key_value_grads(pctx)});
    pe.backward(pctx, params);
  }
};

// ---- prompts prepended to inputs_embeds (P-tuning, multitask prompt tuning) ----------------------------

/// decoder(encoder prompts ++ wte(ids)) and the causal-LM loss; backward into the encoder.
template <class T, class E>
struct EmbedsRun {
  nn::Decoder<T>& m;
  E& pe;
  Index batch, seq;
  std::vector<std::int64_t> ids, mask, labels, task_ids;
  typename nn::Decoder<T>::Context dctx;
  typename Embedding<T>::Context ectx;
  typename E::Context pctx;
  Mat<T> tok, emb, logits, dlogits, demb;
  std::vector<std::int64_t> mask_p, labels_p;

  EmbedsRun(nn::Decoder<T>& m_, E& pe_, Index b, Index s, std::vector<std::int64_t> i, std::vector<std::int64_t> mk, std::vector<std::int64_t> lb,
            std::vector<std::int64_t> tasks = {})
      : m(m_), pe(pe_), batch(b), seq(s), ids(std::move(i)), mask(std::move(mk)), labels(std::move(lb)), task_ids(std::move(tasks)) {
    const Index L = pe.num_virtual_tokens() + seq, d = m.d_model();
    dctx = m.make_context(batch, L);
    ectx = m.wte.make_context(batch * seq);
    pctx = pe.make_context(batch);
    tok.resize(batch * seq, d);
    emb.resize(batch * L, d);
    demb.resize(batch * L, d);
    logits.resize(batch * L, m.config.vocab_size);
    dlogits.resize(batch * L, m.config.vocab_size);
    mask_p.resize(std::size_t(batch * L));
    labels_p.resize(std::size_t(batch * L));
    pe.prepend_mask(mask, batch, seq, mask_p);
    pe.prepend_labels(labels, batch, seq, labels_p);
  }
  double forward() {
    const Index L = pe.num_virtual_tokens() + seq;
    m.wte.forward(ectx, ids, tok);
    if constexpr (requires { pctx.dropout_step; }) pctx.dropout_step = 0;  // the same dropout masks every time
    if constexpr (requires { pe.prepend(pctx, tok, task_ids, seq, emb); }) pe.prepend(pctx, tok, task_ids, seq, emb);
    else pe.prepend(pctx, tok, batch, seq, emb);
    m.forward(dctx, nn::DecoderInput<T>{batch, L, {}, emb, {}, mask_p}, logits);
    return nn::causal_lm_loss<T>(logits, labels_p, batch, L, dlogits);
  }
  void backward(GradMode params) {
    m.backward(dctx, dlogits, {demb, {}});
    pe.backward_from_inputs_embeds(pctx, demb, seq, params);
  }
};

/// Every parameter gradient of `pe` (float or double) against central differences on the double twin `ped`.
template <class T, class E, class ED>
void check_encoder_gradients(EmbedsRun<T, E>& run, EmbedsRun<double, ED>& rund, E& pe, ED& ped, std::size_t expected_tensors) {
  const double loss = run.forward();
  CHECK(std::abs(loss - rund.forward()) < 100 * value_tol<T>());
  CHECK(count_parameters(run.m).trainable == 0);
  for (auto& [name, p] : param_map(pe)) std::fill_n(p.grad, p.size, nan<T>());
  run.backward(GradMode::overwrite);
  auto pd = param_map(ped);
  auto f = [&] { return rund.forward(); };
  std::size_t n = 0;
  for (auto& [name, p] : param_map(pe)) {
    const auto rep = check_gradient4(pd.at(name).value, p.grad, p.size, f, 1e-3);
    INFO(rep.str(name));
    CHECK(rep.worst < grad_tol<T>());
    ++n;
  }
  CHECK(n == expected_tensors);
  std::map<std::string, Mat<T>> first;
  for (auto& [name, p] : param_map(pe)) first[name] = Eigen::Map<Mat<T>>(p.grad, 1, Index(p.size));
  run.backward(GradMode::accumulate);
  for (auto& [name, p] : param_map(pe))
    CHECK(max_abs_diff(Eigen::Map<Mat<T>>(p.grad, 1, Index(p.size)), (2 * first[name].array()).matrix()) <
          10 * value_tol<T>() * std::max(1.0, double(first[name].cwiseAbs().maxCoeff())));
}

/// Logits, loss, every parameter gradient and prompt_embeddings against PEFT's (case `name`).
template <class T, class E>
void compare_with_peft(EmbedsRun<T, E>& run, E& pe, const nlohmann::json& j, const std::string& name, std::size_t expected_tensors) {
  const double loss = run.forward();
  const Mat<T> prompts = ref_tensor<T>(j, name + ".prompts", run.batch * pe.num_virtual_tokens());
  for (Index b = 0; b < run.batch; ++b)
    for (Index t = 0; t < pe.num_virtual_tokens(); ++t) {
      const Index L = pe.num_virtual_tokens() + run.seq;
      CHECK(ref_err<T>(run.emb.row(b * L + t), prompts.row(b * pe.num_virtual_tokens() + t)) < reference_tol<T>());
    }
  const double le = ref_err<T>(run.logits, ref_tensor<T>(j, name + ".logits"));
  INFO("logits scaled error " << le);
  CHECK(le < reference_tol<T>());
  CHECK(std::abs(loss - ref_tensor<double>(j, name + ".loss")(0, 0)) < reference_tol<T>() * std::max(1.0, loss));
  run.backward(GradMode::overwrite);
  std::size_t n = 0;
  for (auto& [pn, p] : param_map(pe)) {
    const double e = ref_err<T>(Eigen::Map<Mat<T>>(p.grad, 1, Index(p.size)), ref_tensor<T>(j, name + ".grad." + pn, 1));
    INFO(pn << " gradient scaled error " << e);
    CHECK(e < reference_tol<T>());
    ++n;
  }
  CHECK(n == expected_tensors);
}

}  // namespace

TEMPLATE_TEST_CASE("prefix tuning: encoder gradients through the frozen decoder match finite differences", "[prefix][grad]", float, double) {
  using T = TestType;
  Models<T> M;
  const bool projection = GENERATE(false, true);
  INFO("prefix_projection " << projection);
  PrefixTuningConfig pc;
  pc.num_virtual_tokens = 3;
  pc.prefix_projection = projection;
  pc.encoder_hidden_size = 5;
  Generator g(11), gd(12);
  PrefixEncoder<T> pe(pc, M.m.config, g);
  PrefixEncoder<double> ped(pc, M.twin.config, gd);
  for (Index i = 0; i < pe.weight().rows; ++i)  // a table of about the scale of the model's activations
    for (Index k = 0; k < pe.weight().cols; ++k) pe.weight()(i, k) *= T(0.5);
  copy_params(pe, ped);
  PrefixRun<T> run(M.m, pe, 2, 4, kIds, kMask, kLabels);
  PrefixRun<double> rund(M.twin, ped, 2, 4, kIds, kMask, kLabels);
  const double loss = run.forward();
  CHECK(std::abs(loss - rund.forward()) < 100 * value_tol<T>());
  CHECK(count_parameters(M.m).trainable == 0);
  for (auto& [name, p] : param_map(pe)) std::fill_n(p.grad, p.size, nan<T>());
  run.backward(GradMode::overwrite);
  auto pd = param_map(ped);
  auto f = [&] { return rund.forward(); };
  std::size_t n = 0;
  for (auto& [name, p] : param_map(pe)) {
    const auto rep = check_gradient4(pd.at(name).value, p.grad, p.size, f, 1e-3);
    INFO(rep.str(name));
    CHECK(rep.worst < grad_tol<T>());
    ++n;
  }
  CHECK(n == (projection ? 5u : 1u));
  // accumulate mode adds
  std::map<std::string, Mat<T>> first;
  for (auto& [name, p] : param_map(pe)) first[name] = Eigen::Map<Mat<T>>(p.grad, 1, Index(p.size));
  run.backward(GradMode::accumulate);
  for (auto& [name, p] : param_map(pe))
    CHECK(max_abs_diff(Eigen::Map<Mat<T>>(p.grad, 1, Index(p.size)), (2 * first[name].array()).matrix()) <
          10 * value_tol<T>() * std::max(1.0, double(first[name].cwiseAbs().maxCoeff())));
  // the mask: nvt ones, then the caller's mask
  for (Index b = 0; b < 2; ++b)
    for (Index t = 0; t < 3; ++t) CHECK(run.mask_p[std::size_t(b * 7 + t)] == 1);
  CHECK(run.mask_p[std::size_t(7 + 3 + 2)] == 0);
}

TEMPLATE_TEST_CASE("prefix tuning: numbers from real PEFT (with and without prefix_projection)", "[prefix][reference]", float, double) {
  using T = TestType;
  const auto j = load_reference(std::is_same_v<T, float> ? "prompt_methods_f32.json" : "prompt_methods_f64.json");
  Generator g(0);
  auto m = nn::make_decoder<T>(small_config(), g);
  load_decoder(m, j);
  const std::string name = GENERATE(std::string("prefix"), std::string("prefix_proj"));
  INFO(name);
  PrefixTuningConfig pc;
  pc.num_virtual_tokens = 3;
  pc.prefix_projection = name == "prefix_proj";
  pc.encoder_hidden_size = 6;
  PrefixEncoder<T> pe(pc, m.config, g);
  load_params(pe, j, name);
  PrefixRun<T> run(m, pe, 2, 5, ints(j, "ids"), ints(j, "mask"), ints(j, "labels"));
  const double loss = run.forward();
  for (Index l = 0; l < 2; ++l) {
    const auto& kv = pe.past_key_values(run.pctx)[std::size_t(l)];
    CHECK(kv.past_len == 3);
    const std::string p = name + ".past." + std::to_string(l);
    CHECK(ref_err<T>(as_mat(kv.key), ref_tensor<T>(j, p + ".key", 2 * 2 * 3)) < reference_tol<T>());
    CHECK(ref_err<T>(as_mat(kv.value), ref_tensor<T>(j, p + ".value", 2 * 2 * 3)) < reference_tol<T>());
  }
  const double le = ref_err<T>(run.logits, ref_tensor<T>(j, name + ".logits"));
  INFO("logits scaled error " << le);
  CHECK(le < reference_tol<T>());
  CHECK(std::abs(loss - ref_tensor<double>(j, name + ".loss")(0, 0)) < reference_tol<T>() * std::max(1.0, loss));
  run.backward(GradMode::overwrite);
  std::size_t n = 0;
  for (auto& [pn, p] : param_map(pe)) {
    const Mat<T> ref = ref_tensor<T>(j, name + ".grad." + pn, 1);
    const double e = ref_err<T>(Eigen::Map<Mat<T>>(p.grad, 1, Index(p.size)), ref);
    INFO(pn << " gradient scaled error " << e);
    CHECK(e < reference_tol<T>());
    ++n;
  }
  CHECK(n == (pc.prefix_projection ? 5u : 1u));
  const auto pemb = pe.prompt_embeddings();
  const Mat<T> pref = ref_tensor<T>(j, name + ".prompt_embeddings");
  REQUIRE(Index(pemb.size()) == pref.size());
  CHECK(ref_err<T>(Eigen::Map<const Mat<T>>(pemb.data(), pref.rows(), pref.cols()), pref) < reference_tol<T>());
  // export: the saved prompt_embeddings in an inference-mode encoder give the same past keys/values
  PrefixTuningConfig ic = pc;
  ic.inference_mode = true;
  PrefixEncoder<T> inf(ic, m.config, g);
  CHECK_FALSE(inf.requires_grad());
  REQUIRE(inf.weight().size() == Index(pemb.size()));
  std::copy(pemb.begin(), pemb.end(), inf.weight().data);
  auto ictx = inf.make_context(2);
  inf.forward(ictx, 2);
  for (Index l = 0; l < 2; ++l) {
    CHECK(max_abs_diff(as_mat(inf.past_key_values(ictx)[std::size_t(l)].key), as_mat(pe.past_key_values(run.pctx)[std::size_t(l)].key)) == 0);
    CHECK(max_abs_diff(as_mat(inf.past_key_values(ictx)[std::size_t(l)].value), as_mat(pe.past_key_values(run.pctx)[std::size_t(l)].value)) == 0);
  }
}

TEST_CASE("prefix tuning: init, prefixes that do not fit the model, bad input", "[prefix][errors]") {
  const auto cfg = small_config();
  Generator g(1);
  auto m = nn::make_decoder<float>(cfg, g);
  PrefixTuningConfig pc;
  pc.num_virtual_tokens = 2;
  SECTION("PEFT's init") {
    PrefixTuningConfig big = pc;
    big.num_virtual_tokens = 50;
    PrefixEncoder<double> pe(big, cfg, g);
    CHECK(pe.weight().rows == 50);
    CHECK(pe.weight().cols == 2 * 2 * 16);
    const auto w = as_mat(pe.weight());
    const double mean = w.mean(), sd = std::sqrt((w.array() - mean).square().mean());
    CHECK(std::abs(mean) < 0.05);
    CHECK(std::abs(sd - 1.0) < 0.05);
    big.init_weights_zero = true;
    CHECK(as_mat(PrefixEncoder<double>(big, cfg, g).weight()).cwiseAbs().maxCoeff() == 0);
    big.prefix_projection = true;
    PrefixEncoder<double> pz(big, cfg, g);
    CHECK(pz.weight().cols == 16);
    CHECK(as_mat(pz.transform2().weight()).cwiseAbs().maxCoeff() == 0);
    CHECK(pz.transform2().weight().rows == 64);
    CHECK(pz.transform0().weight().rows == 16);  // encoder_hidden_size 0 → token_dim
    CHECK(as_mat(pz.transform0().weight()).cwiseAbs().maxCoeff() <= 0.25);  // ±1/√16
    CHECK(as_mat(pz.transform0().weight()).cwiseAbs().maxCoeff() > 0.2);
  }
  SECTION("prefix shapes that do not match the model's heads and layers") {
    PrefixTuningConfig bad = pc;
    bad.num_attention_heads = 4;
    CHECK_THROWS_WITH(PrefixEncoder<float>(bad, cfg, g),
                      Catch::Contains("the prefix has 4 heads of head_dim 4 (token_dim 16), the decoder's attention has 2 heads of head_dim 8"));
    bad = pc;
    bad.num_layers = 3;
    CHECK_THROWS_WITH(PrefixEncoder<float>(bad, cfg, g), Catch::Contains("the prefix has num_layers 3, the decoder has 2 layers"));
    bad = pc;
    bad.token_dim = 12;
    CHECK_THROWS_AS(PrefixEncoder<float>(bad, cfg, g), ShapeError);
    bad.num_attention_heads = 5;
    CHECK_THROWS_WITH(PrefixEncoder<float>(bad, cfg, g), Catch::Contains("token_dim 12 is not a multiple of num_attention_heads 5"));
    // an encoder made without the model check is refused by the decoder
    PrefixTuningConfig heads4 = pc;
    heads4.token_dim = 16;
    heads4.num_layers = 2;
    heads4.num_attention_heads = 4;
    PrefixEncoder<float> pe4(heads4, g);
    auto c4 = pe4.make_context(1);
    pe4.forward(c4, 1);
    auto dctx = m.make_context(1, 4, 2);
    Mat<float> logits(4, 11);
    const std::vector<std::int64_t> ids{1, 2, 3, 4};
    CHECK_THROWS_WITH(m.forward(dctx, nn::DecoderInput<float>{1, 4, ids, {}, pe4.past_key_values(c4)}, logits),
                      Catch::Contains("past key has head_dim 4, the attention has 2 heads of head_dim 8"));
    PrefixTuningConfig layers3 = heads4;
    layers3.num_attention_heads = 2;
    layers3.num_layers = 3;
    PrefixEncoder<float> pe3(layers3, g);
    auto c3 = pe3.make_context(1);
    pe3.forward(c3, 1);
    CHECK_THROWS_WITH(m.forward(dctx, nn::DecoderInput<float>{1, 4, ids, {}, pe3.past_key_values(c3)}, logits),
                      Catch::Contains("3 past key/value entries, expected one per layer (2)"));
  }
  SECTION("more virtual tokens than the model's positions, bad batches, bad config") {
    PrefixTuningConfig six = pc;
    six.num_virtual_tokens = 6;
    PrefixEncoder<float> pe(six, cfg, g);
    auto pctx = pe.make_context(1);
    pe.forward(pctx, 1);
    auto dctx = m.make_context(1, 4, 6);
    Mat<float> logits(4, 11);
    const std::vector<std::int64_t> ids{1, 2, 3, 4};
    CHECK_THROWS_WITH(m.forward(dctx, nn::DecoderInput<float>{1, 4, ids, {}, pe.past_key_values(pctx)}, logits),
                      Catch::Contains("positions 6 .. 9 exceed max_position_embeddings 8"));
    auto small = m.make_context(1, 2, 3);
    Mat<float> l2(2, 11);
    CHECK_THROWS_WITH(m.forward(small, nn::DecoderInput<float>{1, 2, std::span(ids).first(2), {}, pe.past_key_values(pctx)}, l2),
                      Catch::Contains("past_len 6 exceeds the context's max_past 3"));
    CHECK_THROWS_WITH(pe.forward(pctx, 2), Catch::Contains("batch 2 must be positive and at most the context's max_batch 1"));
    auto fresh = pe.make_context(1);
    CHECK_THROWS_AS(pe.backward(fresh), StateError);
    CHECK_THROWS_AS(pe.past_key_values(fresh), StateError);
    std::vector<std::int64_t> out(9);
    CHECK_THROWS_WITH(pe.prepend_mask({}, 1, 4, out), Catch::Contains("expected batch * (num_virtual_tokens + seq) = 10"));
    PrefixTuningConfig zero;
    CHECK_THROWS_WITH(PrefixEncoder<float>(zero, cfg, g), Catch::Contains("num_virtual_tokens must be positive"));
    CHECK_THROWS_WITH(PrefixEncoder<float>(pc, g), Catch::Contains("fill_from"));
  }
}

// ---- P-tuning ----------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("p-tuning: MLP and LSTM encoder gradients (through time) match finite differences", "[ptuning][grad]", float, double) {
  using T = TestType;
  Models<T> M;
  const int kind = GENERATE(0, 1, 2);  // MLP, LSTM (2 layers), LSTM (3 layers, dropout 0.3)
  INFO("encoder " << kind);
  PromptEncoderConfig pc;
  pc.num_virtual_tokens = 3;
  pc.token_dim = 16;
  pc.encoder_hidden_size = kind == 0 ? 6 : 4;
  pc.encoder_reparameterization_type = kind == 0 ? PromptEncoderReparameterizationType::mlp : PromptEncoderReparameterizationType::lstm;
  pc.encoder_num_layers = kind == 2 ? 3 : 2;
  pc.encoder_dropout = kind == 2 ? 0.3 : 0.0;
  Generator g(21), gd(22);
  PromptEncoder<T> pe(pc, g);
  PromptEncoder<double> ped(pc, gd);
  copy_params(pe, ped);
  EmbedsRun<T, PromptEncoder<T>> run(M.m, pe, 2, 4, kIds, kMask, kLabels);
  EmbedsRun<double, PromptEncoder<double>> rund(M.twin, ped, 2, 4, kIds, kMask, kLabels);
  if (kind == 2) {  // dropout really drops: the output differs from the evaluation-mode output
    run.forward();
    const Mat<T> train_out = run.emb.topRows(3);
    const auto eval = pe.prompt_embeddings();
    CHECK(max_abs_diff(train_out, Eigen::Map<const Mat<T>>(eval.data(), 3, 16)) > 1e-3);
  }
  check_encoder_gradients(run, rund, pe, ped, kind == 0 ? 7u : 1u + 8u * std::size_t(pc.encoder_num_layers) + 4u);
}

TEMPLATE_TEST_CASE("p-tuning: numbers from real PEFT (MLP and LSTM prompt encoders)", "[ptuning][reference]", float, double) {
  using T = TestType;
  const auto j = load_reference(std::is_same_v<T, float> ? "prompt_methods_f32.json" : "prompt_methods_f64.json");
  Generator g(0);
  auto m = nn::make_decoder<T>(small_config(), g);
  load_decoder(m, j);
  const std::string name = GENERATE(std::string("ptune_mlp"), std::string("ptune_lstm"));
  INFO(name);
  PromptEncoderConfig pc;
  pc.num_virtual_tokens = 3;
  pc.token_dim = 16;
  const bool lstm = name == "ptune_lstm";
  pc.encoder_reparameterization_type = lstm ? PromptEncoderReparameterizationType::lstm : PromptEncoderReparameterizationType::mlp;
  pc.encoder_hidden_size = lstm ? 4 : 5;
  PromptEncoder<T> pe(pc, g);
  load_params(pe, j, name);
  EmbedsRun<T, PromptEncoder<T>> run(m, pe, 2, 5, ints(j, "ids"), ints(j, "mask"), ints(j, "labels"));
  compare_with_peft(run, pe, j, name, lstm ? 21u : 7u);
  const auto pemb = pe.prompt_embeddings();
  const Mat<T> pref = ref_tensor<T>(j, name + ".prompt_embeddings");
  CHECK(ref_err<T>(Eigen::Map<const Mat<T>>(pemb.data(), 3, 16), pref) < reference_tol<T>());
  // export: an inference-mode encoder holding the saved prompt_embeddings prepends the same prompts
  PromptEncoderConfig ic = pc;
  ic.inference_mode = true;
  PromptEncoder<T> inf(ic, g);
  CHECK_FALSE(inf.requires_grad());
  std::copy(pemb.begin(), pemb.end(), inf.weight().data);
  auto ictx = inf.make_context(2);
  Mat<T> prompts(6, 16);
  inf.forward(ictx, 2, prompts);
  CHECK(max_abs_diff(prompts.topRows(3), run.emb.topRows(3)) == 0);
  CHECK(max_abs_diff(prompts.bottomRows(3), run.emb.middleRows(8, 3)) == 0);
}

TEST_CASE("p-tuning: PEFT's init and bad input", "[ptuning][errors]") {
  Generator g(3);
  PromptEncoderConfig pc;
  pc.num_virtual_tokens = 40;
  pc.token_dim = 16;
  pc.encoder_reparameterization_type = PromptEncoderReparameterizationType::lstm;
  pc.encoder_num_layers = 2;
  PromptEncoder<double> pe(pc, g);
  const auto w = as_mat(pe.weight());
  const double mean = w.mean(), sd = std::sqrt((w.array() - mean).square().mean());
  CHECK(std::abs(mean) < 0.1);
  CHECK(std::abs(sd - 1.0) < 0.1);
  auto pm = param_map(pe);
  CHECK(pm.size() == 1 + 16 + 4);
  CHECK(pm.at("lstm_head.weight_ih_l0").size == 4 * 16 * 16);  // hidden 0 → token_dim
  CHECK(pm.at("lstm_head.weight_ih_l1_reverse").size == 4 * 16 * 32);
  CHECK(pm.at("mlp_head.2.weight").size == 16 * 32);
  for (auto& [name, p] : pm)
    if (name.starts_with("lstm_head")) {  // uniform ±1/√h
      const auto v = Eigen::Map<const Mat<double>>(p.value, 1, Index(p.size));
      CHECK(v.cwiseAbs().maxCoeff() <= 0.25);
    }
  PromptEncoderConfig bad = pc;
  bad.num_virtual_tokens = 0;
  CHECK_THROWS_WITH(PromptEncoder<float>(bad, g), Catch::Contains("num_virtual_tokens (0)"));
  bad = pc;
  bad.token_dim = 0;
  CHECK_THROWS_WITH(PromptEncoder<float>(bad, g), Catch::Contains("token_dim must be positive"));
  bad = pc;
  bad.encoder_num_layers = 0;
  CHECK_THROWS_WITH(PromptEncoder<float>(bad, g), Catch::Contains("encoder_num_layers must be positive for LSTM"));
  bad = pc;
  bad.encoder_dropout = 1.0;
  CHECK_THROWS_WITH(PromptEncoder<float>(bad, g), Catch::Contains("encoder_dropout must be in [0, 1)"));
  PromptEncoder<float> pf(pc, g);
  auto ctx = pf.make_context(1);
  Mat<float> prompts(80, 16), wrong(79, 16);
  CHECK_THROWS_WITH(pf.forward(ctx, 2, prompts), Catch::Contains("batch 2 must be positive and at most the context's max_batch 1"));
  CHECK_THROWS_WITH(pf.forward(ctx, 1, wrong), Catch::Contains("prompts [batch * num_virtual_tokens, token_dim]"));
  CHECK_THROWS_AS(pf.backward(ctx, prompts), StateError);
  // more virtual tokens + tokens than the model's positions
  auto m = nn::make_decoder<float>(small_config(), g);
  CHECK_THROWS_WITH(m.make_context(1, 40 + 2), Catch::Contains("max_seq 42 exceeds max_position_embeddings 8"));
}

// ---- multitask prompt tuning -------------------------------------------------------------------------

TEMPLATE_TEST_CASE("multitask prompt tuning: shared table and task factors match finite differences", "[mpt][grad]", float, double) {
  using T = TestType;
  Models<T> M;
  MultitaskPromptTuningConfig pc;
  pc.num_virtual_tokens = 3;
  pc.num_tasks = 3;
  pc.num_ranks = 2;
  Generator g(31), gd(32);
  MultitaskPromptEmbedding<T> pe(pc, M.m.wte.weight(), g);
  MultitaskPromptEmbedding<double> ped(pc, M.twin.wte.weight(), gd);
  {  // task factors of order one (PEFT's N(0, 0.02) gives a near-zero prompt, a weak test)
    Generator r(33);
    pe.visit_parameters([&](ParamRef<T> p) {
      if (p.name == "embedding.weight") return;
      std::vector<double> v(p.size);
      r.uniform(v.data(), v.size(), -1.0, 1.0);
      for (std::size_t k = 0; k < p.size; ++k) p.value[k] = T(v[k]);
    });
  }
  copy_params(pe, ped);
  const std::vector<std::int64_t> tasks{2, 0};
  EmbedsRun<T, MultitaskPromptEmbedding<T>> run(M.m, pe, 2, 4, kIds, kMask, kLabels, tasks);
  EmbedsRun<double, MultitaskPromptEmbedding<double>> rund(M.twin, ped, 2, 4, kIds, kMask, kLabels, tasks);
  check_encoder_gradients(run, rund, pe, ped, 3u);
  // the task absent from the batch gets zero factor gradients; the prompt is E ⊙ (C[k] R[k])
  run.backward(GradMode::overwrite);
  CHECK(as_mat(MatrixView<T>(param_map(pe).at("prefix_task_cols").grad + 1 * 3 * 2, 3, 2)).cwiseAbs().maxCoeff() == 0);
  CHECK(as_mat(MatrixView<T>(param_map(pe).at("prefix_task_cols").grad + 2 * 3 * 2, 3, 2)).cwiseAbs().maxCoeff() > 0);
  const Mat<T> want = as_mat(pe.weight()).array() * (as_mat(pe.task_cols(2)) * as_mat(pe.task_rows(2))).array();
  CHECK(max_abs_diff(run.emb.topRows(3), want) < 10 * value_tol<T>());
}

TEMPLATE_TEST_CASE("multitask prompt tuning: numbers from real PEFT per task id (RANDOM and TEXT)", "[mpt][reference]", float, double) {
  using T = TestType;
  const auto j = load_reference(std::is_same_v<T, float> ? "prompt_methods_f32.json" : "prompt_methods_f64.json");
  Generator g(0);
  auto m = nn::make_decoder<T>(small_config(), g);
  load_decoder(m, j);
  const std::string init = GENERATE(std::string("random"), std::string("text"));
  const int task = GENERATE(0, 1, 2);
  const std::string name = "mpt_" + init + "_t" + std::to_string(task);
  INFO(name);
  MultitaskPromptTuningConfig pc;
  pc.num_virtual_tokens = 3;
  pc.num_tasks = 3;
  pc.num_ranks = 2;
  if (init == "text") {
    pc.prompt_tuning_init = MultitaskPromptTuningInit::text;
    pc.init_token_ids = {'a' % 11, 'b' % 11};  // the generator's stub tokenizer: byte mod vocab
  }
  MultitaskPromptEmbedding<T> pe(pc, m.wte.weight(), g);
  const Mat<T> table = ref_tensor<T>(j, name + ".param.embedding.weight");
  if (init == "text") CHECK(max_abs_diff(as_mat(pe.weight()), table) == 0);  // PEFT's rows (a b a), exactly
  load_params(pe, j, name);
  const auto tasks = ints(j, name + ".task_ids");
  REQUIRE(tasks == std::vector<std::int64_t>{task, (task + 1) % 3});
  EmbedsRun<T, MultitaskPromptEmbedding<T>> run(m, pe, 2, 5, ints(j, "ids"), ints(j, "mask"), ints(j, "labels"), tasks);
  compare_with_peft(run, pe, j, name, 3u);
  CHECK(ref_err<T>(as_mat(pe.prompt_embeddings()), ref_tensor<T>(j, name + ".prompt_embeddings")) < reference_tol<T>());
}

TEMPLATE_TEST_CASE("multitask prompt tuning: the source-task inits match real PEFT", "[mpt][reference]", float, double) {
  using T = TestType;
  const auto j = load_reference(std::is_same_v<T, float> ? "prompt_methods_f32.json" : "prompt_methods_f64.json");
  const Mat<T> src_pe = ref_tensor<T>(j, "mpt_source.prompt_embeddings"), src_cols = ref_tensor<T>(j, "mpt_source.prefix_task_cols", 9),
               src_rows = ref_tensor<T>(j, "mpt_source.prefix_task_rows", 6);
  const MultitaskSourceState<T> src{src_pe, src_cols, src_rows};
  Generator g(2);
  const Mat<double> vocab = random_mat<double>(11, 16, 2);
  const Mat<T> vocab_t = vocab.template cast<T>();
  for (auto [init, name, tasks] : {std::tuple{MultitaskPromptTuningInit::average_source_tasks, "mpt_average_source_tasks", 1},
                                   std::tuple{MultitaskPromptTuningInit::exact_source_task, "mpt_exact_source_task", 1},
                                   std::tuple{MultitaskPromptTuningInit::only_source_shared, "mpt_only_source_shared", 3}}) {
    INFO(name);
    MultitaskPromptTuningConfig pc;
    pc.num_virtual_tokens = 3;
    pc.num_ranks = 2;
    pc.num_tasks = tasks;
    pc.prompt_tuning_init = init;
    pc.prompt_tuning_init_task = 1;
    MultitaskPromptEmbedding<T> pe(pc, vocab_t, src, g);
    auto pm = param_map(pe);
    CHECK(max_abs_diff(as_mat(pe.weight()), ref_tensor<T>(j, std::string(name) + ".param.embedding.weight")) == 0);
    if (init == MultitaskPromptTuningInit::only_source_shared) continue;  // the factors stay random (peft++'s generator)
    for (std::string f : {"prefix_task_cols", "prefix_task_rows"}) {
      const Mat<T> ref = ref_tensor<T>(j, std::string(name) + ".param." + f, 1);
      REQUIRE(Index(pm.at(f).size) == ref.size());
      const double e = ref_err<T>(Eigen::Map<const Mat<T>>(pm.at(f).value, 1, ref.size()), ref);
      INFO(f << " scaled error " << e);
      CHECK(e < reference_tol<T>());
    }
  }
}

TEST_CASE("multitask prompt tuning: PEFT's init, task ids out of range, bad input", "[mpt][errors]") {
  Generator g(5);
  Mat<float> vocab = random_mat<float>(11, 16, 2);
  MultitaskPromptTuningConfig pc;
  pc.num_virtual_tokens = 4;
  pc.num_tasks = 50;
  pc.num_ranks = 4;
  MultitaskPromptEmbedding<float> pe(pc, vocab, g);
  {
    auto pm = param_map(pe);
    const auto c = Eigen::Map<const Mat<float>>(pm.at("prefix_task_cols").value, 1, Index(pm.at("prefix_task_cols").size));
    const double sd = std::sqrt(c.template cast<double>().array().square().mean());
    CHECK(pm.at("prefix_task_cols").size == 50 * 4 * 4);
    CHECK(pm.at("prefix_task_rows").size == 50 * 4 * 16);
    CHECK(std::abs(sd - 0.02) < 0.003);
  }
  auto ctx = pe.make_context(2);
  Mat<float> prompts(8, 16);
  const std::vector<std::int64_t> over{0, 50}, neg{-1, 0}, three{0, 1, 2};
  CHECK_THROWS_WITH(pe.forward(ctx, over, prompts), Catch::Contains("task id 50 (batch row 1) is out of range [0, num_tasks = 50)"));
  CHECK_THROWS_WITH(pe.forward(ctx, neg, prompts), Catch::Contains("task id -1 (batch row 0) is out of range"));
  CHECK_THROWS_WITH(pe.forward(ctx, three, prompts), Catch::Contains("batch (task_ids.size()) 3 must be positive and at most the context's max_batch 2"));
  CHECK_THROWS_AS(pe.backward(ctx, prompts), StateError);
  const std::vector<std::int64_t> ok{49, 0};
  pe.forward(ctx, ok, prompts);
  Mat<float> wrong(7, 16);
  CHECK_THROWS_WITH(pe.backward(ctx, wrong), Catch::Contains("dprompts [batch * num_virtual_tokens, token_dim]"));
  MultitaskPromptTuningConfig bad = pc;
  bad.prompt_tuning_init = MultitaskPromptTuningInit::exact_source_task;
  CHECK_THROWS_WITH(MultitaskPromptEmbedding<float>(bad, vocab, g), Catch::Contains("num_tasks must be 1"));
  bad.num_tasks = 1;
  CHECK_THROWS_WITH(MultitaskPromptEmbedding<float>(bad, vocab, g), Catch::Contains("needs the source's tensors"));
  {
    const Mat<float> pe_src = random_mat<float>(4, 16, 3), cols_src = random_mat<float>(2 * 4, 4, 4), rows_src = random_mat<float>(2 * 4, 16, 5);
    bad.prompt_tuning_init_task = 2;
    CHECK_THROWS_WITH(MultitaskPromptEmbedding<float>(bad, vocab, {pe_src, cols_src, rows_src}, g),
                      Catch::Contains("prompt_tuning_init_task 2 is out of range [0, 2)"));
    const Mat<float> cols_bad = random_mat<float>(7, 4, 4);
    CHECK_THROWS_WITH(MultitaskPromptEmbedding<float>(bad, vocab, {pe_src, cols_bad, rows_src}, g), Catch::Contains("source prefix_task_cols must be"));
    const Mat<float> pe_bad = random_mat<float>(3, 16, 3);
    CHECK_THROWS_WITH(MultitaskPromptEmbedding<float>(bad, vocab, {pe_bad, cols_src, rows_src}, g), Catch::Contains("source prompt_embeddings"));
  }
  bad = pc;
  bad.num_tasks = 0;
  CHECK_THROWS_WITH(MultitaskPromptEmbedding<float>(bad, vocab, g), Catch::Contains("num_tasks (0)"));
  bad = pc;
  bad.prompt_tuning_init = MultitaskPromptTuningInit::text;
  CHECK_THROWS_WITH(MultitaskPromptEmbedding<float>(bad, vocab, g), Catch::Contains("needs the tokenised init text"));
}

// ---- no allocation in the hot path ---------------------------------------------------------------------

#ifdef PEFT_PROMPT_COUNTS_NEW
namespace {
template <class F>
long count_news(F&& f) {
  const long n0 = g_news;
  Eigen::internal::set_is_malloc_allowed(false);
  try {
    f();
  } catch (...) {
    Eigen::internal::set_is_malloc_allowed(true);
    throw;
  }
  Eigen::internal::set_is_malloc_allowed(true);
  return g_news - n0;
}
}  // namespace

TEMPLATE_TEST_CASE("prompt methods: forward and backward allocate nothing after make_context", "[prefix][ptuning][mpt][alloc]", float, double) {
  using T = TestType;
#if defined(PEFT_WITH_OPENBLAS)
  openblas_set_num_threads(1);  // the threaded driver mallocs job structures; peft++'s own code does not
#endif
  CHECK(count_news([] { ::operator delete(::operator new(64)); }) == 1);  // the counter sees allocations
  Eigen::MatrixXf big;
  REQUIRE_THROWS_WITH(count_news([&] { big.resize(300, 300); }), Catch::Contains("eigen_assert"));
  Models<T> M;
  Generator g(9);
  SECTION("prefix tuning, with projection") {
    PrefixTuningConfig pc;
    pc.num_virtual_tokens = 3;
    pc.prefix_projection = true;
    PrefixEncoder<T> pe(pc, M.m.config, g);
    PrefixRun<T> run(M.m, pe, 2, 4, kIds, kMask, kLabels);
    run.forward();
    run.backward(GradMode::overwrite);
    CHECK(count_news([&] {
            run.forward();
            run.backward(GradMode::accumulate);
            pe.forward(run.pctx, 1);
          }) == 0);
  }
  SECTION("p-tuning, MLP and LSTM with dropout") {
    for (auto kind : {PromptEncoderReparameterizationType::mlp, PromptEncoderReparameterizationType::lstm}) {
      PromptEncoderConfig pc;
      pc.num_virtual_tokens = 3;
      pc.token_dim = 16;
      pc.encoder_reparameterization_type = kind;
      pc.encoder_num_layers = 3;
      pc.encoder_dropout = 0.2;
      PromptEncoder<T> pe(pc, g);
      EmbedsRun<T, PromptEncoder<T>> run(M.m, pe, 2, 4, kIds, kMask, kLabels);
      run.forward();
      run.backward(GradMode::overwrite);
      CHECK(count_news([&] {
              run.forward();
              run.backward(GradMode::accumulate);
            }) == 0);
    }
  }
  SECTION("multitask prompt tuning") {
    MultitaskPromptTuningConfig pc;
    pc.num_virtual_tokens = 3;
    pc.num_tasks = 3;
    pc.num_ranks = 2;
    MultitaskPromptEmbedding<T> pe(pc, M.m.wte.weight(), g);
    EmbedsRun<T, MultitaskPromptEmbedding<T>> run(M.m, pe, 2, 4, kIds, kMask, kLabels, {1, 2});
    run.forward();
    run.backward(GradMode::overwrite);
    CHECK(count_news([&] {
            run.forward();
            run.backward(GradMode::accumulate);
          }) == 0);
  }
}
#endif
