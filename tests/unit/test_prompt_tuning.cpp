// Prompt Tuning on the transformer decoder: PEFT's initialisations (RANDOM, TEXT repeated/truncated,
// SAMPLE_VOCAB), prompts prepended to inputs_embeds with the mask and labels padded, the table gradient
// against finite differences (float and double), numbers from real PEFT (PeftModelForCausalLM with a
// PromptTuningConfig), bad input.
#include <catch2/catch.hpp>

#include <peft/nn/decoder.hpp>
#include <peft/nn/loss.hpp>
#include <peft/prompt/prompt_tuning.hpp>

#include "gradcheck.hpp"
#include "reference.hpp"
#include "test_util.hpp"

using namespace peft;
using namespace peft::test;

namespace {

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

/// Runs decoder(prompt ++ wte(ids)) and returns the causal-LM loss; writes the logits and, when asked,
/// runs backward into the prompt table (the decoder frozen).
template <class T>
struct PromptRun {
  nn::Decoder<T>& m;
  PromptEmbedding<T>& pe;
  Index batch, seq;
  std::vector<std::int64_t> ids, mask, labels;
  typename nn::Decoder<T>::Context dctx;
  typename Embedding<T>::Context ectx;
  typename PromptEmbedding<T>::Context pctx;
  Mat<T> tok, emb, logits, dlogits, demb;
  std::vector<std::int64_t> mask_p, labels_p;

  PromptRun(nn::Decoder<T>& m_, PromptEmbedding<T>& pe_, Index b, Index s, std::vector<std::int64_t> i, std::vector<std::int64_t> mk,
            std::vector<std::int64_t> lb)
      : m(m_), pe(pe_), batch(b), seq(s), ids(std::move(i)), mask(std::move(mk)), labels(std::move(lb)) {
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
    pe.prepend(pctx, tok, batch, seq, emb);
    m.forward(dctx, nn::DecoderInput<T>{batch, L, {}, emb, {}, mask_p}, logits);
    return nn::causal_lm_loss<T>(logits, labels_p, batch, L, dlogits);
  }
  void backward(GradMode params) {
    m.backward(dctx, dlogits, {demb, {}});
    pe.backward_from_inputs_embeds(pctx, demb, seq, params);
  }
};

}  // namespace

TEST_CASE("prompt tuning: PEFT's initialisations", "[prompt]") {
  Generator g(1);
  Mat<double> vocab = random_mat<double>(11, 6, 2);
  SECTION("TEXT repeats a short init text and truncates a long one") {
    PromptTuningConfig c;
    c.num_virtual_tokens = 5;
    c.prompt_tuning_init = PromptTuningInit::text;
    c.init_token_ids = {3, 7};
    PromptEmbedding<double> pe(c, vocab, g);
    const std::int64_t want[] = {3, 7, 3, 7, 3};
    for (int i = 0; i < 5; ++i) CHECK(as_mat(pe.weight()).row(i) == vocab.row(want[i]));
    c.num_virtual_tokens = 2;
    c.init_token_ids = {9, 1, 4, 4};
    PromptEmbedding<double> pe2(c, vocab, g);
    CHECK(as_mat(pe2.weight()).row(0) == vocab.row(9));
    CHECK(as_mat(pe2.weight()).row(1) == vocab.row(1));
    CHECK(pe2.requires_grad());
    CHECK(pe2.prompt_embeddings().data == pe2.weight().data);
  }
  SECTION("RANDOM is N(0, 1)") {
    PromptTuningConfig c;
    c.num_virtual_tokens = 100;
    c.token_dim = 64;
    PromptEmbedding<double> pe(c, {}, g);
    const auto w = as_mat(pe.weight());
    const double mean = w.mean(), sd = std::sqrt((w.array() - mean).square().mean());
    CHECK(std::abs(mean) < 0.05);
    CHECK(std::abs(sd - 1.0) < 0.05);
  }
  SECTION("SAMPLE_VOCAB copies rows of the vocabulary") {
    PromptTuningConfig c;
    c.num_virtual_tokens = 20;
    c.prompt_tuning_init = PromptTuningInit::sample_vocab;
    PromptEmbedding<double> pe(c, vocab, g);
    for (Index i = 0; i < 20; ++i) {
      bool found = false;
      for (Index v = 0; v < 11; ++v) found = found || as_mat(pe.weight()).row(i) == vocab.row(v);
      CHECK(found);
    }
  }
  SECTION("inference mode: frozen, no init from the vocabulary") {
    PromptTuningConfig c;
    c.num_virtual_tokens = 3;
    c.prompt_tuning_init = PromptTuningInit::text;
    c.inference_mode = true;
    PromptEmbedding<double> pe(c, vocab, g);
    CHECK_FALSE(pe.requires_grad());
  }
  SECTION("bad configurations") {
    PromptTuningConfig c;
    CHECK_THROWS_WITH(PromptEmbedding<double>(c, vocab, g), Catch::Contains("num_virtual_tokens must be positive"));
    c.num_virtual_tokens = 4;
    c.prompt_tuning_init = PromptTuningInit::text;
    CHECK_THROWS_WITH(PromptEmbedding<double>(c, vocab, g), Catch::Contains("needs the tokenised init text"));
    c.init_token_ids = {2, 11};
    CHECK_THROWS_WITH(PromptEmbedding<double>(c, vocab, g), Catch::Contains("init token id 11 is out of range [0, 11)"));
    c.init_token_ids = {2};
    c.token_dim = 5;
    CHECK_THROWS_WITH(PromptEmbedding<double>(c, vocab, g), Catch::Contains("token_dim 5 differs"));
  }
}

TEMPLATE_TEST_CASE("prompt tuning: the prompt gradient through the frozen decoder matches finite differences", "[prompt][grad]", float, double) {
  using T = TestType;
  const auto cfg = small_config();
  Generator g(4), gd(4);
  auto m = nn::make_decoder<T>(cfg, g);
  auto twin = nn::make_decoder<double>(cfg, gd);
  {  // weights of a useful size, the same numbers in the twin
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
  PromptTuningConfig pc;
  pc.num_virtual_tokens = 3;
  PromptEmbedding<T> pe(pc, m.wte.weight(), g);
  PromptEmbedding<double> ped(pc, twin.wte.weight(), gd);
  as_mat(ped.weight()) = as_mat(pe.weight()).template cast<double>();
  const std::vector<std::int64_t> ids{1, 5, 7, 2, 9, 9, 3, 0}, mask{1, 1, 1, 1, 1, 1, 0, 0}, labels{1, 5, 7, 2, 9, 9, -100, -100};
  PromptRun<T> run(m, pe, 2, 4, ids, mask, labels);
  PromptRun<double> rund(twin, ped, 2, 4, ids, mask, labels);
  const double loss = run.forward();
  CHECK(std::abs(loss - rund.forward()) < 100 * value_tol<T>());
  CHECK(count_parameters(m).trainable == 0);
  as_mat(pe.weight_grad()).setConstant(nan<T>());
  run.backward(GradMode::overwrite);
  auto f = [&] { return rund.forward(); };
  const auto rep = check_gradient(ped.weight().data, pe.weight_grad().data, std::size_t(3 * 16), f, 1e-5);
  INFO(rep.str("prompt"));
  CHECK(rep.worst < grad_tol<T>());
  const Mat<T> g1 = as_mat(pe.weight_grad());
  run.backward(GradMode::accumulate);
  CHECK(max_abs_diff(as_mat(pe.weight_grad()), (2 * g1.array()).matrix()) < 10 * value_tol<T>());
  // the labels of the virtual tokens are -100 and their mask ones
  for (Index b = 0; b < 2; ++b)
    for (Index t = 0; t < 3; ++t) {
      CHECK(run.labels_p[std::size_t(b * 7 + t)] == -100);
      CHECK(run.mask_p[std::size_t(b * 7 + t)] == 1);
    }
}

TEMPLATE_TEST_CASE("prompt tuning: numbers from real PEFT (TEXT short and long, RANDOM)", "[prompt][reference]", float, double) {
  using T = TestType;
  const auto j = load_reference(std::is_same_v<T, float> ? "transformer_prompt_f32.json" : "transformer_prompt_f64.json");
  const auto cfg = small_config();
  Generator g(0);
  auto m = nn::make_decoder<T>(cfg, g);
  for (auto& p : parameters<T>(m)) {
    const Mat<T> w = ref_tensor<T>(j, "w." + p.name, 1);
    REQUIRE(std::size_t(w.size()) == p.size);
    std::copy_n(w.data(), p.size, p.value);
  }
  auto ints = [&](const std::string& n) { return j.at("tensors").at(n).at("data").template get<std::vector<std::int64_t>>(); };
  const std::string name = GENERATE(std::string("text_short"), std::string("text_long"), std::string("random"));
  INFO(name);
  PromptTuningConfig pc;
  pc.num_virtual_tokens = 3;
  pc.init_token_ids = ints(name + ".init_ids");
  pc.prompt_tuning_init = pc.init_token_ids.empty() ? PromptTuningInit::random : PromptTuningInit::text;
  PromptEmbedding<T> pe(pc, m.wte.weight(), g);
  const Mat<T> table = ref_tensor<T>(j, name + ".prompt");
  if (pc.prompt_tuning_init == PromptTuningInit::text) CHECK(max_abs_diff(as_mat(pe.weight()), table) == 0);  // PEFT's rows, exactly
  else as_mat(pe.weight()) = table;  // RANDOM: torch's generator, not reproduced; take PEFT's table
  PromptRun<T> run(m, pe, 2, 5, ints("ids"), ints("mask"), ints("labels"));
  const double loss = run.forward();
  INFO("logits scaled error " << scaled_diff(run.logits, ref_tensor<T>(j, name + ".logits", run.logits.rows())));
  CHECK(scaled_diff(run.logits, ref_tensor<T>(j, name + ".logits", run.logits.rows())) < reference_tol<T>());
  CHECK(std::abs(loss - ref_tensor<double>(j, name + ".loss")(0, 0)) < reference_tol<T>() * std::max(1.0, loss));
  run.backward(GradMode::overwrite);
  const Mat<T> grad_ref = ref_tensor<T>(j, name + ".grad.prompt");
  INFO("grad scaled error " << scaled_diff(as_mat(pe.weight_grad()), grad_ref));
  CHECK(scaled_diff(as_mat(pe.weight_grad()), grad_ref) < reference_tol<T>());
  CHECK(scaled_diff(as_mat(pe.prompt_embeddings()), ref_tensor<T>(j, name + ".prompt_embeddings")) < reference_tol<T>());
}

TEST_CASE("prompt tuning: more virtual tokens than the model's context, bad shapes", "[prompt][errors]") {
  const auto cfg = small_config();
  Generator g(1);
  auto m = nn::make_decoder<float>(cfg, g);
  PromptTuningConfig pc;
  pc.num_virtual_tokens = 6;
  PromptEmbedding<float> pe(pc, m.wte.weight(), g);
  // 6 virtual tokens + 5 tokens do not fit 8 positions
  CHECK_THROWS_WITH(m.make_context(1, 6 + 5), Catch::Contains("max_seq 11 exceeds max_position_embeddings 8"));
  auto ctx = m.make_context(1, 8);
  auto pctx = pe.make_context(1);
  const Mat<float> tok = random_mat<float>(5, 16, 1);
  Mat<float> emb(11, 16), logits(11, 11);
  pe.prepend(pctx, tok, 1, 5, emb);
  CHECK_THROWS_WITH(m.forward(ctx, nn::DecoderInput<float>{1, 11, {}, emb}, logits), Catch::Contains("sequence length 11 exceeds the context's max_seq 8"));
  Mat<float> wrong(10, 16);
  CHECK_THROWS_WITH(pe.prepend(pctx, tok, 1, 5, wrong), Catch::Contains("inputs_embeds [batch * (num_virtual_tokens + seq), token_dim]"));
  CHECK_THROWS_WITH(pe.prepend(pctx, tok, 2, 5, emb), Catch::Contains("batch 2 must be positive and at most the context's max_batch 1"));
  std::vector<std::int64_t> out(10);
  CHECK_THROWS_WITH(pe.prepend_mask({}, 1, 5, out), Catch::Contains("expected batch * (num_virtual_tokens + seq) = 11"));
  auto fresh = pe.make_context(1);
  CHECK_THROWS_AS(pe.backward(fresh, emb), StateError);
}
