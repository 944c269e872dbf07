// peft++ against numbers produced by real Hugging Face PEFT (tests/reference/gen_peft_reference.py):
// a Linear(10→20)·ReLU·Linear(20→6) MLP with LoRA on both layers — outputs, gradients, deltas, merged
// weights, and three AdamW steps — for LoRA, rsLoRA, lora_bias, rank/alpha patterns, two active adapters
// and Conv1D-style (fan_in_fan_out) weights, in float32 and float64.
#include <catch2/catch.hpp>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <peft/train.hpp>

#include "reference.hpp"
#include "test_util.hpp"

using namespace peft;
using namespace peft::test;
using json = nlohmann::json;

namespace {

template <class T>
using Layer = Adapted<Linear<T>, Lora>;

template <class T>
struct RefMlp {
  Layer<T> lin0, lin1;
};

/// The reference MLP with PEFT's weights loaded into peft++ layers.
template <class T>
RefMlp<T> build(const json& j) {
  const bool conv1d = j.at("case") == "conv1d";
  const auto layout = conv1d ? WeightLayout::in_out : WeightLayout::out_in;
  Generator gen(0);
  auto make = [&](const std::string& name) {
    const Mat<T> w = ref_tensor<T>(j, name + ".weight"), b = ref_tensor<T>(j, name + ".bias");
    const peft::Index in = conv1d ? w.rows() : w.cols(), out = conv1d ? w.cols() : w.rows();
    Linear<T> base(in, out, true, gen, layout);
    as_mat(base.weight()) = w;
    as_mat(base.bias()) = b;
    Layer<T> l(std::move(base), name);
    for (const std::string& adapter : j.at("adapters").get<std::vector<std::string>>()) {
      const auto& c = j.at("config").at(adapter);
      LoraConfig cfg;
      cfg.r = c.at("r");
      cfg.lora_alpha = c.at("lora_alpha");
      cfg.use_rslora = c.at("use_rslora");
      cfg.lora_bias = c.at("lora_bias");
      cfg.fan_in_fan_out = c.at("fan_in_fan_out");
      cfg.init_lora_weights = LoraInit::zeros;
      for (auto& [k, v] : c.at("rank_pattern").items()) cfg.rank_pattern.emplace_back(k, v.template get<int>());
      for (auto& [k, v] : c.at("alpha_pattern").items()) cfg.alpha_pattern.emplace_back(k, v.template get<double>());
      l.add_adapter(adapter, cfg, gen);
      auto& a = lora_adapter(l, adapter);
      as_mat(a.A()) = ref_tensor<T>(j, name + ".lora_A." + adapter);
      as_mat(a.B()) = ref_tensor<T>(j, name + ".lora_B." + adapter);
      if (cfg.lora_bias) as_mat(a.B_bias()) = ref_tensor<T>(j, name + ".lora_B_bias." + adapter);
      // PEFT's scaling, recorded from its layer, must equal ours
      CHECK(double(a.scaling) == Approx(j.at("scaling").at(adapter).at(name).get<double>()).epsilon(std::is_same_v<T, float> ? 1e-7 : 1e-12));
    }
    l.set_adapter(j.at("adapters").get<std::vector<std::string>>());
    l.eval();
    return l;
  };
  return {make("lin0"), make("lin1")};
}

template <class T>
struct Pass {
  Mat<T> hidden, out, dx;
};

/// out = lin1(relu(lin0(x))); backward of loss = Σ out ⊙ G.
template <class T>
Pass<T> run(RefMlp<T>& m, const Mat<T>& x, const Mat<T>& g, bool backward = true) {
  Pass<T> p;
  const auto n = x.rows();
  p.hidden.resize(n, m.lin0.out_features());
  p.out.resize(n, m.lin1.out_features());
  auto c0 = m.lin0.make_context(n);
  auto c1 = m.lin1.make_context(n);
  m.lin0.forward(c0, x, p.hidden);
  Mat<T> act = p.hidden.cwiseMax(T(0));
  m.lin1.forward(c1, act, p.out);
  if (!backward) return p;
  Mat<T> dact(n, act.cols());
  m.lin1.backward(c1, g, dact, GradMode::overwrite);
  Mat<T> dh = (p.hidden.array() > T(0)).select(dact, T(0));
  p.dx.resize(n, x.cols());
  m.lin0.backward(c0, dh, p.dx, GradMode::overwrite);
  return p;
}

template <class T>
void check_case(const std::string& file) {
  INFO("reference file " << file);
  const json j = load_reference(file);
  auto m = build<T>(j);
  const Mat<T> x = ref_tensor<T>(j, "x"), g = ref_tensor<T>(j, "grad_out");
  const auto p = run(m, x, g);
  CHECK(scaled_diff(p.hidden, ref_tensor<T>(j, "hidden")) < reference_tol<T>());
  CHECK(scaled_diff(p.out, ref_tensor<T>(j, "out")) < reference_tol<T>());
  CHECK(scaled_diff(p.dx, ref_tensor<T>(j, "grad.x")) < reference_tol<T>());
  for (auto* layer : {&m.lin0, &m.lin1}) {
    const std::string name = layer->module_path();
    for (const std::string& adapter : j.at("adapters").get<std::vector<std::string>>()) {
      INFO(name << " / " << adapter);
      auto& a = lora_adapter(*layer, adapter);
      CHECK(scaled_diff(as_mat(a.grad_A()), ref_tensor<T>(j, "grad." + name + ".lora_A." + adapter)) < reference_tol<T>());
      CHECK(scaled_diff(as_mat(a.grad_B()), ref_tensor<T>(j, "grad." + name + ".lora_B." + adapter)) < reference_tol<T>());
      if (a.config.lora_bias)
        CHECK(scaled_diff(as_mat(a.grad_B_bias()), ref_tensor<T>(j, "grad." + name + ".lora_B_bias." + adapter)) < reference_tol<T>());
      const Mat<T> expect = ref_tensor<T>(j, "delta." + name + "." + adapter);
      Mat<T> delta(expect.rows(), expect.cols());
      layer->delta_weight(adapter, delta);
      CHECK(scaled_diff(delta, expect) < reference_tol<T>());
    }
  }
  // disabled adapters give PEFT's base output
  m.lin0.disable_adapters();
  m.lin1.disable_adapters();
  CHECK(scaled_diff(run(m, x, g, false).out, ref_tensor<T>(j, "base_out")) < reference_tol<T>());
  m.lin0.enable_adapters();
  m.lin1.enable_adapters();
  // merged weights and merged output
  m.lin0.merge();
  m.lin1.merge();
  for (auto* layer : {&m.lin0, &m.lin1}) {
    const std::string name = layer->module_path();
    CHECK(scaled_diff(as_mat(layer->base().weight()), ref_tensor<T>(j, "merged." + name + ".weight")) < reference_tol<T>());
    CHECK(scaled_diff(as_mat(layer->base().bias()), ref_tensor<T>(j, "merged." + name + ".bias")) < reference_tol<T>());
  }
  CHECK(scaled_diff(run(m, x, g, false).out, ref_tensor<T>(j, "merged_out")) < reference_tol<T>());
}

}  // namespace

TEMPLATE_TEST_CASE("reference: LoRA matches Hugging Face PEFT", "[reference][lora]", float, double) {
  using T = TestType;
  const std::string suffix = std::is_same_v<T, float> ? "_f32.json" : "_f64.json";
  const std::string which = GENERATE("lora", "rslora", "lora_bias", "pattern", "multi", "conv1d");
  check_case<T>("lora_" + which + suffix);
}

TEMPLATE_TEST_CASE("reference: three AdamW steps on LoRA parameters match PyTorch + PEFT", "[reference][lora][optim]", float, double) {
  using T = TestType;
  const json j = load_reference(std::is_same_v<T, float> ? "lora_adamw_f32.json" : "lora_adamw_f64.json");
  auto m = build<T>(j);
  m.lin0.train();
  m.lin1.train();
  const auto& o = j.at("optimizer");
  AdamWOptions opt;
  opt.lr = o.at("lr");
  opt.beta1 = o.at("betas")[0];
  opt.beta2 = o.at("betas")[1];
  opt.eps = o.at("eps");
  opt.weight_decay = o.at("weight_decay");
  auto params = trainable_parameters<T>(m);
  REQUIRE(params.size() == 4);  // lora_A and lora_B of both layers; the base stays frozen
  AdamW<T> adamw(params, opt);
  const Mat<T> x = ref_tensor<T>(j, "x"), g = ref_tensor<T>(j, "grad_out");
  const Mat<T> w0 = as_mat(m.lin0.base().weight());
  const Mat<T> losses = ref_tensor<T>(j, "losses");
  const double step_tol = std::is_same_v<T, float> ? 1e-4 : 1e-11;
  for (int step = 1; step <= 3; ++step) {
    adamw.zero_grad();
    const auto p = run(m, x, g);
    CHECK(dot(p.out, g) == Approx(double(losses(0, step - 1))).epsilon(std::is_same_v<T, float> ? 1e-5 : 1e-12));
    adamw.step();
    for (auto* layer : {&m.lin0, &m.lin1}) {
      const std::string name = layer->module_path();
      auto& a = lora_adapter(*layer, "default");
      INFO("step " << step << " " << name);
      CHECK(scaled_diff(as_mat(a.A()), ref_tensor<T>(j, "step" + std::to_string(step) + "." + name + ".lora_A")) < step_tol);
      CHECK(scaled_diff(as_mat(a.B()), ref_tensor<T>(j, "step" + std::to_string(step) + "." + name + ".lora_B")) < step_tol);
    }
  }
  CHECK(as_mat(m.lin0.base().weight()) == w0);  // bit-identical: only adapter parameters moved
  CHECK(scaled_diff(run(m, x, g, false).out, ref_tensor<T>(j, "trained_out")) < step_tol);
}
