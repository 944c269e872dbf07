// AdaLoRA on Linear: gradients against finite differences (layer and orthogonal regulariser, float and
// double), numbers from real Hugging Face PEFT 0.21.2 (adalora_linear_*.json), the rank allocator replayed
// against a PEFT training run (adalora_alloc_f64.json: budget, scores, threshold, masks, E, EMAs,
// rank_pattern, truncated state dict), truncation, bad configs, and the allocation-free hot path.
#define EIGEN_RUNTIME_NO_MALLOC
#include <stdexcept>
#define eigen_assert(x) \
  if (!(x)) throw std::runtime_error("eigen_assert failed: " #x)

#include <catch2/catch.hpp>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <new>

#include <peft/adapter/adalora.hpp>

#include "layer_check.hpp"
#include "reference.hpp"

#include "alloc_count.hpp"

using namespace peft;
using namespace peft::test;
using json = nlohmann::json;

namespace {

template <class F>
long allocations_in(F&& f) {
  return count_allocations(std::forward<F>(f)).total();
}

template <class T>
using AdaLinear = Adapted<Linear<T>, AdaLora>;

struct Case {
  peft::Index m, in, out;
  int init_r;
  double alpha;
  bool fifo = false;
  double dropout = 0.0;
};

AdaLoraConfig config_of(const Case& c) {
  AdaLoraConfig cfg;
  cfg.init_r = c.init_r;
  cfg.target_r = std::min(2, c.init_r);
  cfg.total_step = 100;
  cfg.lora_alpha = c.alpha;
  cfg.lora_dropout = c.dropout;
  cfg.init_lora_weights = false;  // E != 0, so every gradient path is exercised
  cfg.fan_in_fan_out = c.fifo;
  return cfg;
}

template <class T>
AdaLinear<T> make_layer(const Case& c, std::uint64_t seed = 11) {
  Generator gen(seed);
  AdaLinear<T> l(Linear<T>(c.in, c.out, true, gen, c.fifo ? WeightLayout::in_out : WeightLayout::out_in), "model.layers.0.q_proj");
  l.add_adapter("default", config_of(c), gen);
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

/// ΔW by the formula in double: scaling / (ranknum + 1e-5) · B diag(E) A, [out, in].
template <class A>
Mat<double> expected_delta(const A& a) {
  auto d = [](auto v) { return as_mat(v).template cast<double>().eval(); };
  const Mat<double> e = d(a.E());
  return a.scaling / (a.ranknum + 1e-5) * d(a.B()) * e.col(0).asDiagonal() * d(a.A());
}

/// Two adapted layers, as the reference training run.
template <class T>
struct Net {
  AdaLinear<T> fc1;
  AdaLinear<T> fc2;
};

template <class T>
Net<T> make_net(const AdaLoraConfig& cfg, std::uint64_t seed = 3) {
  Generator g(seed);
  Net<T> n{AdaLinear<T>(Linear<T>(6, 5, true, g), "fc1"), AdaLinear<T>(Linear<T>(5, 3, true, g), "fc2")};
  n.fc1.add_adapter("default", cfg, g);
  n.fc2.add_adapter("default", cfg, g);
  return n;
}

// ---- PEFT's single-layer numbers ---------------------------------------------------------------------

template <class T>
void check_layer_reference(const std::string& file) {
  INFO("reference file " << file);
  const json j = load_reference(file);
  const double tol = reference_tol<T>();
  const Mat<T> w = ref_tensor<T>(j, "lin.weight"), b = ref_tensor<T>(j, "lin.bias");
  Generator gen(0);
  Linear<T> base(w.cols(), w.rows(), true, gen);
  as_mat(base.weight()) = w;
  as_mat(base.bias()) = b;
  AdaLinear<T> l(std::move(base), "lin");
  const auto& c = j.at("config");
  AdaLoraConfig cfg;
  cfg.init_r = c.at("init_r");
  cfg.target_r = c.at("target_r");
  cfg.lora_alpha = c.at("lora_alpha");
  cfg.total_step = c.at("total_step");
  cfg.orth_reg_weight = c.at("orth_reg_weight");
  cfg.init_lora_weights = c.at("init_lora_weights");
  l.add_adapter("default", cfg, gen);
  auto& a = adalora_adapter(l, "default");
  CHECK(a.scaling == j.at("scaling").get<double>());
  CHECK(a.ranknum == j.at("ranknum").get<double>());
  std::vector<std::string> names;
  l.visit_parameters([&](ParamRef<T> p) {
    if (!p.trainable) return;
    names.push_back("lin." + p.name.substr(0, p.name.rfind('.')));
    const Mat<T> v = ref_tensor<T>(j, names.back());
    REQUIRE(std::size_t(v.size()) == p.size);
    std::copy(v.data(), v.data() + v.size(), p.value);
  });
  CHECK(names == j.at("trainable").get<std::vector<std::string>>());  // lora_A, lora_B, lora_E (PEFT also lists ranknum)
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
  auto grads = [&](const std::string& prefix) {
    l.visit_parameters([&](ParamRef<T> p) {
      if (!p.trainable) return;
      const std::string n = prefix + "lin." + p.name.substr(0, p.name.rfind('.'));
      const Mat<T> expect = ref_tensor<T>(j, n);
      cmp(n, Eigen::Map<const Mat<T>>(p.grad, expect.rows(), expect.cols()), expect);
    });
  };
  grads("grad.");
  // the regulariser through the model-level call, on top of the task gradient
  const double reg = adalora::add_orth_reg(l, cfg.orth_reg_weight);
  CHECK(std::abs(reg - j.at("orth_reg").get<double>()) < tol * std::max(1.0, std::abs(reg)));
  grads("grad_total.");
  Mat<T> delta(l.out_features(), l.in_features());
  l.delta_weight("default", delta);
  cmp("delta", delta, ref_tensor<T>(j, "delta.lin"));
  l.disable_adapters();
  cmp("base_out", run_forward(l, x), ref_tensor<T>(j, "base_out"));
  l.enable_adapters();
  l.merge();
  cmp("merged weight", as_mat(l.base().weight()), ref_tensor<T>(j, "merged.lin.weight"));
  cmp("merged bias", as_mat(l.base().bias()), ref_tensor<T>(j, "merged.lin.bias"));
  cmp("merged_out", run_forward(l, x), ref_tensor<T>(j, "merged_out"));
  if (std::getenv("PEFT_PRINT_ERRORS")) std::printf("%s: worst scaled error vs PEFT %.3g\n", file.c_str(), worst);
}

}  // namespace

// ---- gradients -------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("adalora: backward matches finite differences", "[adalora][grad]", float, double) {
  using T = TestType;
  const Case c = GENERATE(Case{4, 6, 5, 2, 8.0}, Case{5, 10, 8, 4, 8.0}, Case{3, 7, 9, 1, 2.0}, Case{2, 16, 12, 6, 32.0},
                          Case{6, 9, 7, 3, 6.0, true}, Case{5, 12, 10, 4, 8.0, false, 0.3}, Case{4, 8, 6, 3, 0.0},
                          Case{1, 33, 17, 12, 16.0, true, 0.5});
  CAPTURE(c.m, c.in, c.out, c.init_r, c.alpha, c.fifo, c.dropout);
  auto layer = make_layer<T>(c);
  auto twin = make_layer<double>(c);
  check_layer_gradients(layer, twin, c.m);
  SECTION("with the base layer trainable as well") {
    layer.base().set_requires_grad(true);
    twin.base().set_requires_grad(true);
    check_layer_gradients(layer, twin, c.m, 7);
  }
  SECTION("two active adapters sum, both trainable") {
    Case c2 = c;
    c2.init_r = c.init_r + 1;
    c2.alpha = 3.0;
    Generator g(21), gd(21);
    layer.add_adapter("second", config_of(c2), g);
    twin.add_adapter("second", config_of(c2), gd);
    layer.set_adapter(std::vector<std::string>{"default", "second"});
    twin.set_adapter(std::vector<std::string>{"default", "second"});
    check_layer_gradients(layer, twin, c.m, 3);
  }
}

TEMPLATE_TEST_CASE("adalora beside lora on one layer: gradients match finite differences", "[adalora][lora][grad]", float, double) {
  using T = TestType;
  auto build = [](auto tag) {
    using U = decltype(tag);
    Generator g(5);
    Adapted<Linear<U>, Lora, AdaLora> l(Linear<U>(9, 8, true, g), "mlp.up_proj");
    LoraConfig lc;
    lc.r = 3;
    lc.lora_dropout = 0.2;
    lc.init_lora_weights = LoraInit::off;
    l.add_adapter("lora", lc, g);
    AdaLoraConfig ac = config_of(Case{0, 0, 0, 4, 8.0, false, 0.2});
    l.add_adapter("ada", ac, g);
    l.set_adapter(std::vector<std::string>{"lora", "ada"});
    return l;
  };
  auto l = build(T{});
  auto t = build(double{});
  check_layer_gradients(l, t, 4);
}

TEMPLATE_TEST_CASE("adalora: the orthogonal regulariser's gradient matches finite differences", "[adalora][orth][grad]", float, double) {
  using T = TestType;
  AdaLoraConfig cfg = config_of(Case{0, 0, 0, 4, 8.0});
  const double w = GENERATE(0.5, 0.1);
  auto net = make_net<T>(cfg);
  auto twin = make_net<double>(cfg);
  std::vector<ParamRef<T>> p = parameters<T>(net);
  std::vector<ParamRef<double>> q = parameters<double>(twin);
  REQUIRE(p.size() == q.size());
  for (std::size_t i = 0; i < p.size(); ++i)
    for (std::size_t k = 0; k < p[i].size; ++k) q[i].value[k] = double(p[i].value[k]);
  // accumulate on top of known values, as after a backward
  for (auto& r : p)
    if (r.trainable) std::fill_n(r.grad, r.size, T(0.25));
  const double reg = adalora::add_orth_reg(net, w);
  auto loss = [&]() { return adalora::add_orth_reg(twin, w); };
  CHECK(std::abs(reg - loss()) < 1e3 * value_tol<T>() * std::max(1.0, reg));
  // the value by hand: w · mean of the four Frobenius norms
  double by_hand = 0;
  for (auto* l : {&twin.fc1, &twin.fc2}) {
    const auto& a = adalora_adapter(*l, "default");
    const Mat<double> A = as_mat(a.A()), B = as_mat(a.B());
    by_hand += (A * A.transpose() - Mat<double>::Identity(4, 4)).norm() + (B.transpose() * B - Mat<double>::Identity(4, 4)).norm();
  }
  CHECK(std::abs(loss() - w * by_hand / 4) < 1e-12 * by_hand);
  int checked = 0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    if (!p[i].trainable) continue;
    std::vector<double> analytic(p[i].size);
    for (std::size_t k = 0; k < p[i].size; ++k) analytic[k] = double(p[i].grad[k]) - 0.25;
    const auto rep = check_gradient(q[i].value, analytic.data(), p[i].size, loss);
    INFO(rep.str(p[i].name));
    CHECK(rep.worst < grad_tol<T>());
    if (p[i].name.find("lora_E") != std::string::npos) {
      for (double v : analytic) CHECK(v == 0.0);  // E does not enter the regulariser
    }
    ++checked;
  }
  CHECK(checked == 6);
  SECTION("frozen adapters get no gradient, but still count in the mean (PEFT iterates all parameters)") {
    net.fc2.set_requires_grad("default", false);
    for (auto& r : p)
      if (r.trainable) std::fill_n(r.grad, r.size, T(0));
    const double reg2 = adalora::add_orth_reg(net, w);
    CHECK(std::abs(reg2 - reg) < 1e3 * value_tol<T>() * std::max(1.0, reg));
    for (auto& r : parameters<T>(net))
      if (r.name.rfind("fc2.", 0) == 0)
        for (std::size_t k = 0; k < r.size && r.grad; ++k) CHECK(r.grad[k] == T(0));
  }
  SECTION("orth_reg_weight < 0 is rejected with PEFT's message") {
    CHECK_THROWS_WITH(adalora::add_orth_reg(net, -0.1), Catch::Contains("orth_reg_weight should be greater than or equal to 0"));
  }
}

// ---- PEFT's numbers ------------------------------------------------------------------------------------

TEST_CASE("adalora: forward, backward, regulariser, delta and merge match real PEFT", "[adalora][reference]") {
  check_layer_reference<float>("adalora_linear_f32.json");
  check_layer_reference<double>("adalora_linear_f64.json");
}

TEST_CASE("adalora: the rank allocator replays a PEFT training run", "[adalora][allocator][reference]") {
  using T = double;
  const json j = load_reference("adalora_alloc_f64.json");
  const auto& c = j.at("config");
  AdaLoraConfig cfg;
  cfg.init_r = c.at("init_r");
  cfg.target_r = c.at("target_r");
  cfg.tinit = c.at("tinit");
  cfg.tfinal = c.at("tfinal");
  cfg.deltaT = c.at("deltaT");
  cfg.total_step = c.at("total_step");
  cfg.orth_reg_weight = c.at("orth_reg_weight");
  cfg.beta1 = c.at("beta1");
  cfg.beta2 = c.at("beta2");
  cfg.lora_alpha = c.at("lora_alpha");
  auto net = make_net<T>(cfg);
  for (const char* name : {"fc1", "fc2"}) {
    auto& l = std::string(name) == "fc1" ? net.fc1 : net.fc2;
    as_mat(l.base().weight()) = ref_tensor<T>(j, std::string(name) + ".weight");
    as_mat(l.base().bias()) = ref_tensor<T>(j, std::string(name) + ".bias");
    auto& a = adalora_adapter(l, "default");
    as_mat(a.A()) = ref_tensor<T>(j, std::string(name) + ".lora_A");
    as_mat(a.B()) = ref_tensor<T>(j, std::string(name) + ".lora_B");
    as_mat(a.E()) = ref_tensor<T>(j, std::string(name) + ".lora_E");
  }
  const Mat<T> x = ref_tensor<T>(j, "x"), target = ref_tensor<T>(j, "target");
  const double lr = j.at("lr");
  adalora::RankAllocator<T> alloc(net, cfg);
  CHECK(alloc.init_budget() == j.at("init_budget").get<int>());
  CHECK(alloc.target_budget() == j.at("target_budget").get<int>());
  const int final_step = cfg.total_step - cfg.tfinal;

  const Index m = x.rows();
  auto c1 = net.fc1.make_context(m);
  auto c2 = net.fc2.make_context(m);
  Mat<T> h(m, 5), act(m, 5), y(m, 3), dy(m, 3), dact(m, 5), dh(m, 5);
  double worst_e = 0, worst_score = 0, worst_loss = 0, min_margin = 1e300;
  int masks_seen = 0;
  for (const auto& s : j.at("steps")) {
    const int step = s.at("step");
    INFO("step " << step);
    net.fc1.forward(c1, x, h);
    act = h.array().tanh().matrix();
    net.fc2.forward(c2, act, y);
    const double loss = (y - target).squaredNorm() / double(y.size());
    dy = 2.0 * (y - target) / double(y.size());
    net.fc2.backward(c2, dy, dact);
    dh = (dact.array() * (1.0 - act.array().square())).matrix();
    net.fc1.backward(c1, dh, MatrixView<T>{});
    const double reg = adalora::add_orth_reg(net, cfg.orth_reg_weight);
    worst_loss = std::max({worst_loss, std::abs(loss - s.at("loss").get<double>()), std::abs(reg - s.at("orth_reg").get<double>())});
    for (auto& p : trainable_parameters<T>(net))
      for (std::size_t k = 0; k < p.size; ++k) p.value[k] -= lr * p.grad[k];
    const auto r = alloc.update_and_allocate(net, step);
    CHECK(r.budget == s.at("budget").get<int>());
    CHECK(r.masked == (s.at("mask").get<bool>() || step >= final_step));
    CHECK(r.final == (step == final_step));
    if (s.contains("scores")) {
      ++masks_seen;
      REQUIRE(r.masked);
      REQUIRE(alloc.scores().size() == 2);
      std::vector<double> all;
      for (const auto& [path, ours] : alloc.scores()) {
        const auto theirs = s.at("scores").at(path).get<std::vector<double>>();
        REQUIRE(ours.size() == theirs.size());
        for (std::size_t i = 0; i < ours.size(); ++i) {
          const double e = std::abs(ours[i] - theirs[i]) / std::max(std::abs(theirs[i]), 1e-300);
          worst_score = std::max(worst_score, e);
          CHECK(e < 1e-9);
          all.push_back(theirs[i]);
        }
      }
      REQUIRE(alloc.threshold().has_value());
      const double th = s.at("threshold");
      CHECK(std::abs(*alloc.threshold() - th) <= 1e-9 * std::abs(th));
      // how far PEFT's scores are from a tie at the threshold (the replay could not flip a mask otherwise)
      std::sort(all.begin(), all.end());
      const int k = s.at("k");
      if (k < int(all.size())) min_margin = std::min(min_margin, (all[std::size_t(k)] - all[std::size_t(k - 1)]) / std::abs(th));
    }
    for (const char* name : {"fc1", "fc2"}) {
      const auto theirs = s.at("E").at(name).get<std::vector<double>>();
      const auto& a = adalora_adapter(std::string(name) == "fc1" ? net.fc1 : net.fc2, "default");
      for (int i = 0; i < a.r; ++i) {
        worst_e = std::max(worst_e, std::abs(a.e[std::size_t(i)] - theirs[std::size_t(i)]));
        if (theirs[std::size_t(i)] == 0.0) CHECK(a.e[std::size_t(i)] == 0.0);  // masked exactly where PEFT masked
      }
      if (s.at("ema_E").contains(name)) {
        const auto [ipt, unc] = alloc.ema(name, "lora_E");
        const auto ti = s.at("ema_E").at(name).at("ipt").get<std::vector<double>>();
        const auto tu = s.at("ema_E").at(name).at("unc").get<std::vector<double>>();
        REQUIRE(ipt.size() == ti.size());
        for (std::size_t i = 0; i < ti.size(); ++i) {
          CHECK(std::abs(ipt[i] - ti[i]) <= 1e-9 * std::abs(ti[i]) + 1e-300);
          CHECK(std::abs(unc[i] - tu[i]) <= 1e-9 * std::abs(tu[i]) + 1e-300);
        }
      } else {
        CHECK(alloc.ema(name, "lora_E").first.empty());  // reset after the final allocation
      }
    }
    if (s.contains("rank_pattern")) {
      REQUIRE(alloc.rank_pattern().size() == 2);
      for (const auto& [path, keep] : alloc.rank_pattern()) CHECK(keep == s.at("rank_pattern").at(path).get<std::vector<bool>>());
    }
    net.fc1.zero_grad();
    net.fc2.zero_grad();
  }
  CHECK(masks_seen == 4);
  CHECK(worst_e < 1e-12);
  CHECK(worst_loss < 1e-12);
  CHECK(min_margin > 1e-6);
  if (std::getenv("PEFT_PRINT_ERRORS"))
    std::printf("allocator replay: worst |E| diff %.3g, worst score rel diff %.3g, worst loss diff %.3g, min threshold margin %.3g\n", worst_e,
                worst_score, worst_loss, min_margin);

  // the final rank pattern as PEFT saves it ("fc1.lora_E" keys), and the kept ranks
  const auto saved = j.at("saved_rank_pattern").get<std::map<std::string, std::vector<bool>>>();
  REQUIRE(saved.size() == alloc.rank_pattern().size());
  for (const auto& [key, keep] : saved) {
    const std::string path = AdaLoraConfig::module_of_key(key);
    auto it = std::find_if(alloc.rank_pattern().begin(), alloc.rank_pattern().end(), [&](auto& e) { return e.first == path; });
    REQUIRE(it != alloc.rank_pattern().end());
    CHECK(it->second == keep);
  }
  CHECK(alloc.ranks() == std::vector<std::pair<std::string, int>>{{"fc1", 1}, {"fc2", 3}});

  // saving truncates to the kept triplets, exactly PEFT's state dict
  const auto sd = adalora::state_dict<T>(net, alloc.rank_pattern());
  const auto& theirs = j.at("state_dict");
  REQUIRE(sd.size() == theirs.size());
  for (const auto& t : sd) {
    INFO(t.key);
    REQUIRE(theirs.contains(t.key));
    CHECK(t.shape == theirs.at(t.key).at("shape").get<std::vector<peft::Index>>());
    const auto v = theirs.at(t.key).at("data").get<std::vector<double>>();
    REQUIRE(v.size() == t.data.size());
    for (std::size_t i = 0; i < v.size(); ++i) CHECK(std::abs(t.data[i] - v[i]) < 1e-12);
  }

  // the output before truncation (masked triplets have E = 0) ...
  Mat<T> y_full(m, 3), y_trunc(m, 3), y_loaded(m, 3);
  auto forward_net = [&](auto& n, Mat<T>& out) {
    auto k1 = n.fc1.make_context(m);
    auto k2 = n.fc2.make_context(m);
    Mat<T> hh(m, 5);
    n.fc1.forward(k1, x, hh);
    const Mat<T> aa = hh.array().tanh().matrix();
    n.fc2.forward(k2, aa, out);
  };
  forward_net(net, y_full);
  SECTION("truncating in place keeps the output and the scale (ranknum stays init_r)") {
    const T factor = adalora_adapter(net.fc1, "default").factor;
    CHECK(adalora::resize_by_rank_pattern(net, alloc.rank_pattern()) == 2);
    CHECK_THROWS_AS(net.fc1.forward(c1, x, h), StateError);  // a context of the old rank
    const auto& a1 = adalora_adapter(net.fc1, "default");
    CHECK(a1.r == 1);
    CHECK(a1.ranknum == 4.0);
    CHECK(a1.factor == factor);
    CHECK(adalora_adapter(net.fc2, "default").r == 3);
    forward_net(net, y_trunc);
    CHECK(max_abs_diff(y_trunc, y_full) < 1e-14);
  }
  SECTION("a config with PEFT's saved rank_pattern creates layers at the kept ranks, the state dict loads into them") {
    AdaLoraConfig lc = cfg;
    for (const auto& [key, keep] : saved) lc.rank_pattern.emplace_back(key, keep);
    auto loaded = make_net<T>(lc, 99);
    as_mat(loaded.fc1.base().weight()) = as_mat(net.fc1.base().weight());
    as_mat(loaded.fc1.base().bias()) = as_mat(net.fc1.base().bias());
    as_mat(loaded.fc2.base().weight()) = as_mat(net.fc2.base().weight());
    as_mat(loaded.fc2.base().bias()) = as_mat(net.fc2.base().bias());
    CHECK(adalora_adapter(loaded.fc1, "default").r == 1);
    CHECK(adalora_adapter(loaded.fc2, "default").r == 3);
    CHECK(adalora_adapter(loaded.fc2, "default").ranknum == 4.0);
    std::map<std::string, std::vector<double>> by_key;
    for (const auto& t : sd) by_key[t.key] = t.data;
    for (auto& p : parameters<T>(loaded)) {
      if (!p.trainable) continue;
      const std::string key = "base_model.model." + p.name.substr(0, p.name.rfind('.'));
      REQUIRE(by_key.count(key));
      REQUIRE(by_key[key].size() == p.size);
      std::copy(by_key[key].begin(), by_key[key].end(), p.value);
    }
    forward_net(loaded, y_loaded);
    CHECK(max_abs_diff(y_loaded, y_full) < 1e-14);
  }
}

// ---- properties ---------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("adalora: PEFT's init, scaling, delta and merge", "[adalora][props]", float, double) {
  using T = TestType;
  const Mat<T> x = random_mat<T>(6, 40, 21);
  Generator gen(4);
  Linear<T> plain(40, 30, true, gen);
  Mat<T> y_base(6, 30);
  {
    auto ctx = plain.make_context(6);
    plain.forward(ctx, x, y_base);
  }
  SECTION("default init is the identity: E = 0, A and B ~ N(0, 0.02²); scaling = lora_alpha / (init_r + 1e-5)") {
    AdaLinear<T> l(plain);
    Generator g(9);
    AdaLoraConfig cfg;
    cfg.total_step = 10;  // init_r = 12, lora_alpha = 8
    l.add_adapter("default", cfg, g);
    CHECK(run_forward(l, x) == y_base);
    const auto& a = adalora_adapter(l, "default");
    CHECK(a.r == 12);
    CHECK(a.ranknum == 12.0);
    CHECK(a.scaling == 8.0);
    CHECK(double(a.factor) == Approx(8.0 / 12.00001).epsilon(1e-6));
    CHECK(as_mat(a.E()).cwiseAbs().maxCoeff() == T(0));
    for (auto v : {as_mat(a.A()).template cast<double>().eval(), as_mat(a.B()).template cast<double>().eval()}) {
      const double mean = v.mean(), sd = std::sqrt((v.array() - mean).square().mean());
      CHECK(std::abs(mean) < 0.004);
      CHECK(sd == Approx(0.02).epsilon(0.1));
    }
  }
  SECTION("init_lora_weights = false: all N(0, 1); lora_alpha <= 0 uses scaling = r") {
    AdaLinear<T> l(plain);
    Generator g(9);
    AdaLoraConfig cfg;
    cfg.total_step = 10;
    cfg.init_lora_weights = false;
    cfg.lora_alpha = 0;
    l.add_adapter("default", cfg, g);
    const auto& a = adalora_adapter(l, "default");
    CHECK(a.scaling == 12.0);
    const Mat<double> v = as_mat(a.A()).template cast<double>();
    CHECK(std::sqrt(v.array().square().mean()) == Approx(1.0).epsilon(0.1));
    CHECK(as_mat(a.E()).cwiseAbs().minCoeff() > T(0));
  }
  SECTION("delta = f · B diag(E) A; merge equals the unmerged output; unmerge restores; Conv1D layout gets ΔWᵀ") {
    for (bool fifo : {false, true}) {
      Generator g(3);
      AdaLinear<T> l(Linear<T>(40, 30, true, g, fifo ? WeightLayout::in_out : WeightLayout::out_in));
      AdaLoraConfig cfg = config_of(Case{0, 0, 0, 5, 8.0, fifo});
      l.add_adapter("default", cfg, g);
      l.eval();
      const auto& a = adalora_adapter(l, "default");
      const Mat<double> expect = expected_delta(a);
      Mat<T> d = fifo ? Mat<T>(40, 30) : Mat<T>(30, 40);
      l.delta_weight("default", d);
      CHECK(max_abs_diff(fifo ? Mat<double>(d.template cast<double>().transpose()) : Mat<double>(d.template cast<double>()), expect) <
            100 * value_tol<T>());
      const Mat<T> w0 = as_mat(l.base().weight());
      const Mat<T> y = run_forward(l, x);
      l.merge();
      CHECK(max_abs_diff(run_forward(l, x), y) < 1e3 * value_tol<T>());
      CHECK_THROWS_AS(l.merge(), StateError);
      l.unmerge();
      CHECK(max_abs_diff(as_mat(l.base().weight()), w0) < 10 * value_tol<T>());
      l.disable_adapters();
      CHECK(max_abs_diff(run_forward(l, x), y) > 1e-3);
    }
  }
  SECTION("parameters have PEFT's names and shapes; ranknum is not a parameter") {
    AdaLinear<T> l(plain, "fc");
    Generator g(9);
    AdaLoraConfig cfg;
    cfg.total_step = 10;
    cfg.init_r = 6;
    cfg.target_r = 3;
    l.add_adapter("default", cfg, g);
    std::vector<std::pair<std::string, std::size_t>> got;
    l.visit_parameters([&](ParamRef<T> p) { if (p.trainable) got.emplace_back(p.name, p.size); });
    CHECK(got == std::vector<std::pair<std::string, std::size_t>>{{"lora_A.default", 6 * 40}, {"lora_B.default", 30 * 6}, {"lora_E.default", 6}});
  }
}

TEST_CASE("adalora: budget schedule is PEFT's cubic decay", "[adalora][allocator]") {
  AdaLoraConfig cfg;
  cfg.init_r = 12;
  cfg.target_r = 4;
  cfg.tinit = 10;
  cfg.tfinal = 20;
  cfg.deltaT = 5;
  cfg.total_step = 100;
  auto net = make_net<double>(cfg);
  adalora::RankAllocator<double> alloc(net, cfg);
  CHECK(alloc.init_budget() == 24);
  CHECK(alloc.target_budget() == 8);
  int prev = 24;
  for (int step = 0; step <= 100; ++step) {
    const auto b = alloc.budget_schedule(step);
    INFO("step " << step);
    if (step <= 10) {
      CHECK(b.budget == 24);
      CHECK_FALSE(b.mask);
    } else if (step > 80) {
      CHECK(b.budget == 8);
      CHECK(b.mask);
    } else {
      const double c = 1.0 - double(step - 10) / 70.0;
      CHECK(b.budget == int(16.0 * c * c * c + 8.0));
      CHECK(b.mask == (step % 5 == 0));
    }
    CHECK(b.budget <= prev);
    prev = b.budget;
  }
  // PEFT's numbers for a few steps: int(16 * (1 - 25/70)**3 + 8) = 12, step 45: int(16 * 0.5**3 + 8) = 10
  CHECK(alloc.budget_schedule(35).budget == 12);
  CHECK(alloc.budget_schedule(45).budget == 10);
  CHECK(alloc.budget_schedule(80).budget == 8);
  SECTION("a frozen adapter cannot be allocated") {
    net.fc1.set_requires_grad("default", false);
    CHECK_THROWS_AS(alloc.update_and_allocate(net, 1), StateError);
  }
  SECTION("past the final step without a final allocation") {
    CHECK_THROWS_WITH(alloc.update_and_allocate(net, 85), Catch::Contains("no final rank pattern"));
  }
  SECTION("init_r == target_r: nothing is ever masked (PEFT's kthvalue(k=0) raises there)") {
    AdaLoraConfig same = cfg;
    same.target_r = 12;
    auto n2 = make_net<double>(same);
    adalora::RankAllocator<double> a2(n2, same);
    for (int step = 0; step <= 80; ++step) a2.update_and_allocate(n2, step);
    for (const auto& [path, keep] : a2.rank_pattern()) CHECK(std::count(keep.begin(), keep.end(), true) == 12);
  }
  SECTION("no layer with the adapter") {
    CHECK_THROWS_AS(adalora::RankAllocator<double>(net, cfg, "other"), AdapterError);
  }
}

TEST_CASE("adalora: bad configs are rejected with clear messages", "[adalora][config]") {
  auto bad = [](auto edit, const char* msg) {
    AdaLoraConfig c;
    c.total_step = 100;
    edit(c);
    CHECK_THROWS_WITH(c.validate(), Catch::Contains(msg));
    Generator g(1);
    AdaLinear<float> l(Linear<float>(4, 3, true, g));
    CHECK_THROWS_AS(l.add_adapter("default", c, g), ConfigError);
    CHECK(l.adapter_names().empty());  // unchanged
  };
  bad([](auto& c) { c.total_step = 0; }, "total_step");
  bad([](auto& c) { c.tinit = 50, c.tfinal = 50; }, "don't allow for a budgeting phase");
  bad([](auto& c) { c.tinit = 60, c.tfinal = 50; }, "don't allow for a budgeting phase");
  bad([](auto& c) { c.target_r = 13; }, "target_r (13) must not exceed init_r (12)");
  bad([](auto& c) { c.init_r = 0; }, "init_r must be a positive integer");
  bad([](auto& c) { c.target_r = -1; }, "target_r must be >= 0");
  bad([](auto& c) { c.deltaT = 0; }, "deltaT must be a positive integer");
  bad([](auto& c) { c.beta1 = 1.0; }, "beta1 must be in (0, 1)");
  bad([](auto& c) { c.beta2 = 0.0; }, "beta2 must be in (0, 1)");
  bad([](auto& c) { c.orth_reg_weight = -0.5; }, "orth_reg_weight should be greater than or equal to 0");
  bad([](auto& c) { c.lora_dropout = 1.0; }, "lora_dropout must be in [0, 1)");
  bad([](auto& c) { c.tinit = -1; }, "tinit must be >= 0");
  bad([](auto& c) { c.rank_pattern = {{"fc1", std::vector<bool>(5, true)}}; }, "rank_pattern['fc1'] has 5 entries");
  Generator g(1);
  AdaLinear<float> l(Linear<float>(4, 3, true, g));
  AdaLoraConfig c;
  c.total_step = 100;
  c.fan_in_fan_out = true;  // an [out, in] base
  CHECK_THROWS_WITH(l.add_adapter("default", c, g), Catch::Contains("fan_in_fan_out = true does not match the base weight layout"));
}

TEST_CASE("adalora: rank_pattern keys in PEFT's forms", "[adalora][config]") {
  CHECK(AdaLoraConfig::module_of_key("fc1") == "fc1");
  CHECK(AdaLoraConfig::module_of_key("model.layers.0.q.lora_E") == "model.layers.0.q");
  CHECK(AdaLoraConfig::module_of_key("model.layers.0.q.lora_E.default") == "model.layers.0.q");
  AdaLoraConfig c;
  c.total_step = 10;
  c.init_r = 3;
  c.target_r = 1;
  c.rank_pattern = {{"encoder.fc1.lora_E", {true, false, true}}};
  CHECK(c.for_module("encoder.fc1").rank_for_module() == 2);
  CHECK(c.for_module("fc1").rank_for_module() == 3);  // exact module paths, not suffixes
}

TEMPLATE_TEST_CASE("adalora: forward, backward and the regulariser allocate nothing after make_context", "[adalora][alloc]", float, double) {
  if (!alloc_counting) {
    WARN("allocation counting is off in sanitizer builds");
    return;
  }
  using T = TestType;
  for (Index batch : {1, 32, 256}) {
    for (double p : {0.0, 0.1}) {
      CAPTURE(batch, p);
      Generator g(2);
      Adapted<Linear<T>, Lora, AdaLora> l(Linear<T>(64, 48, true, g));
      AdaLoraConfig c = config_of(Case{0, 0, 0, 12, 8.0, false, p});
      l.add_adapter("a", c, g);
      l.add_adapter("b", c, g);
      LoraConfig lc;
      lc.r = 8;
      l.add_adapter("lora", lc, g);
      l.set_adapter(std::vector<std::string>{"a", "b", "lora"});
      const Mat<T> x = random_mat<T>(batch, 64, 1), dy = random_mat<T>(batch, 48, 2);
      Mat<T> y(batch, 48), dx(batch, 64);
      auto ctx = l.make_context(256);
      auto& a = adalora_adapter(l, "a");
      const long n = allocations_in([&] {
        for (int rep = 0; rep < 2; ++rep) {
          l.forward(ctx, x, y);
          l.backward(ctx, dy, dx);
          adalora::orth_reg_adapter(a, 0.1);
        }
      });
      CHECK(n == 0);
    }
  }
  // the counter sees allocations (this test can fail)
  CHECK(allocations_in([] { std::vector<int> v(100); (void)v; }) > 0);
}
