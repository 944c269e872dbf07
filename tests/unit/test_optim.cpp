// Tests of peft/train: optimizers, gradient clipping and learning-rate schedules, against numbers
// produced by real PyTorch (tests/reference/gen_optim_reference.py -> data/optim_reference.json).
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <new>
#include <span>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "peft/param.hpp"
#include "peft/train.hpp"

// ---------------------------------------------------------------------------------------------
// Heap allocation counter: every global operator new/delete is replaced in this test program, all
// on malloc/free (so that sanitizers see matching pairs), and each allocation is counted.
namespace {
std::atomic<long> g_allocations{0};

void* counted_malloc(std::size_t size) noexcept {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(size == 0 ? 1 : size);
}

void* counted_aligned_alloc(std::size_t size, std::align_val_t align) noexcept {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  const auto a = static_cast<std::size_t>(align);
  return std::aligned_alloc(a, ((size == 0 ? 1 : size) + a - 1) / a * a);
}
}  // namespace

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t size) {
  if (void* p = counted_malloc(size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) {
  if (void* p = counted_malloc(size)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t size, const std::nothrow_t&) noexcept { return counted_malloc(size); }
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept { return counted_malloc(size); }
void* operator new(std::size_t size, std::align_val_t align) {
  if (void* p = counted_aligned_alloc(size, align)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size, std::align_val_t align) {
  if (void* p = counted_aligned_alloc(size, align)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t size, std::align_val_t align, const std::nothrow_t&) noexcept {
  return counted_aligned_alloc(size, align);
}
void* operator new[](std::size_t size, std::align_val_t align, const std::nothrow_t&) noexcept {
  return counted_aligned_alloc(size, align);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

namespace {

using nlohmann::json;

const json& reference() {
  static const json data = [] {
    std::ifstream in(std::string(PEFT_TEST_DATA_DIR) + "/optim_reference.json");
    if (!in) throw std::runtime_error("cannot open " PEFT_TEST_DATA_DIR "/optim_reference.json");
    return json::parse(in);
  }();
  return data;
}

template <class T>
const char* dtype_label() {
  return std::is_same_v<T, double> ? "float64" : "float32";
}

/// Relative tolerance against PyTorch: rounding-level for double, a few float ulps for float.
template <class T>
double tolerance() {
  return std::is_same_v<T, double> ? 1e-12 : 1e-5;
}

/// Worst relative error seen per dtype; printed at exit when PEFT_OPTIM_REPORT_ERRORS is set.
struct ErrorReport {
  double worst[2] = {0.0, 0.0};
  std::string where[2];
  ~ErrorReport() {
    if (std::getenv("PEFT_OPTIM_REPORT_ERRORS") == nullptr) return;
    std::fprintf(stderr, "worst relative error: double %.3e (%s), float %.3e (%s)\n", worst[0],
                 where[0].c_str(), worst[1], where[1].c_str());
  }
};
ErrorReport g_report;

/// Relative error |actual - expected| / |expected| (absolute when expected == 0), recorded in g_report.
template <class T>
double relative_error(double actual, double expected, const std::string& where) {
  const double diff = std::abs(actual - expected);
  // relative, with a floor: parameters here are O(0.1–1), and an entry that cancels to ~1e-3 would
  // otherwise turn one rounding difference (e.g. FMA contraction under -march=native) into a large ratio
  const double err = diff / std::max(std::abs(expected), 1e-2);
  const int k = std::is_same_v<T, double> ? 0 : 1;
  if (err > g_report.worst[k] || std::isnan(err)) {
    g_report.worst[k] = err;
    g_report.where[k] = where;
  }
  return err;
}

/// Owns parameter values and gradients; hands out ParamRefs over them.
template <class T>
struct Tensors {
  std::vector<std::vector<T>> values;
  std::vector<std::vector<T>> grads;

  static Tensors from_json(const json& init) {
    Tensors t;
    for (const auto& p : init) {
      std::vector<T> v;
      for (const auto& x : p) v.push_back(static_cast<T>(x.get<double>()));
      t.grads.emplace_back(v.size(), T(0));
      t.values.push_back(std::move(v));
    }
    return t;
  }

  void set_grads(const json& step_grads) {
    for (std::size_t i = 0; i < grads.size(); ++i)
      for (std::size_t j = 0; j < grads[i].size(); ++j) grads[i][j] = static_cast<T>(step_grads[i][j].get<double>());
  }

  std::vector<peft::ParamRef<T>> refs() {
    std::vector<peft::ParamRef<T>> out;
    for (std::size_t i = 0; i < values.size(); ++i)
      out.push_back({"p" + std::to_string(i), values[i].data(), grads[i].data(), values[i].size(), true});
    return out;
  }
};

/// Largest relative error between `actual` tensors and the JSON `expected` lists (records the worst).
template <class T>
double max_relative_error(const std::vector<std::vector<T>>& actual, const json& expected, const std::string& where,
                          std::string& worst_at) {
  double worst = 0.0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    for (std::size_t j = 0; j < actual[i].size(); ++j) {
      const double e = expected[i][j].get<double>();
      const std::string at = where + " p" + std::to_string(i) + "[" + std::to_string(j) + "]";
      const double err = relative_error<T>(static_cast<double>(actual[i][j]), e, at);
      if (err > worst || std::isnan(err)) {
        worst = err;
        worst_at = at + " actual=" + std::to_string(static_cast<double>(actual[i][j])) + " expected=" + std::to_string(e);
      }
    }
  }
  return worst;
}

/// Feeds the reference gradients to `optimizer` step by step and compares the parameters with the
/// PyTorch trajectory after each step.
template <class T, class Optimizer>
void run_against_reference(Optimizer& optimizer, Tensors<T>& tensors, const json& trajectory, const std::string& name) {
  const json& grads = reference()["grads"];
  for (std::size_t s = 0; s < grads.size(); ++s) {
    tensors.set_grads(grads[s]);
    const auto grads_before = tensors.grads;
    optimizer.step();
    CHECK(tensors.grads == grads_before);  // step() leaves gradients alone
    std::string worst_at;
    const double err = max_relative_error<T>(tensors.values, trajectory[s], name + " step " + std::to_string(s + 1),
                                             worst_at);
    INFO(worst_at);
    REQUIRE(err <= tolerance<T>());
  }
  CHECK(optimizer.step_count() == static_cast<long>(grads.size()));
}

template <class T>
std::vector<peft::ParamRef<T>> single_param(std::vector<T>& value, std::vector<T>& grad, std::string name = "w") {
  return {{std::move(name), value.data(), grad.data(), value.size(), true}};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Against PyTorch

TEMPLATE_TEST_CASE("optimizers match torch.optim step by step", "[optim][reference]", float, double) {
  using T = TestType;
  for (const auto& config : reference()["optimizers"]) {
    const std::string name = config["name"].get<std::string>();
    const std::string kind = config["kind"].get<std::string>();
    const json& o = config["options"];
    DYNAMIC_SECTION(name << " " << dtype_label<T>()) {
      auto tensors = Tensors<T>::from_json(reference()["init"]);
      const auto refs = tensors.refs();
      const json& trajectory = config[dtype_label<T>()];
      if (kind == "AdamW") {
        peft::AdamWOptions opts;
        opts.lr = o["lr"].get<double>();
        opts.beta1 = o["beta1"].get<double>();
        opts.beta2 = o["beta2"].get<double>();
        opts.eps = o["eps"].get<double>();
        opts.weight_decay = o["weight_decay"].get<double>();
        opts.amsgrad = o["amsgrad"].get<bool>();
        peft::AdamW<T> optimizer(refs, opts);
        run_against_reference(optimizer, tensors, trajectory, name);
      } else if (kind == "Adam") {
        peft::AdamOptions opts;
        opts.lr = o["lr"].get<double>();
        opts.beta1 = o["beta1"].get<double>();
        opts.beta2 = o["beta2"].get<double>();
        opts.eps = o["eps"].get<double>();
        opts.weight_decay = o["weight_decay"].get<double>();
        opts.amsgrad = o["amsgrad"].get<bool>();
        peft::Adam<T> optimizer(refs, opts);
        run_against_reference(optimizer, tensors, trajectory, name);
      } else {
        REQUIRE(kind == "SGD");
        peft::SGDOptions opts;
        opts.lr = o["lr"].get<double>();
        opts.momentum = o["momentum"].get<double>();
        opts.dampening = o["dampening"].get<double>();
        opts.weight_decay = o["weight_decay"].get<double>();
        opts.nesterov = o["nesterov"].get<bool>();
        peft::SGD<T> optimizer(refs, opts);
        run_against_reference(optimizer, tensors, trajectory, name);
      }
    }
  }
}

TEMPLATE_TEST_CASE("AdamW driven by a linear warmup schedule matches LambdaLR", "[optim][schedule][reference]", float,
                   double) {
  using T = TestType;
  const json& config = reference()["scheduled_adamw"];
  const json& o = config["options"];
  peft::AdamWOptions opts;
  opts.lr = o["lr"].get<double>();
  opts.beta1 = o["beta1"].get<double>();
  opts.beta2 = o["beta2"].get<double>();
  opts.eps = o["eps"].get<double>();
  opts.weight_decay = o["weight_decay"].get<double>();
  auto tensors = Tensors<T>::from_json(reference()["init"]);
  const auto refs = tensors.refs();
  peft::AdamW optimizer(refs, opts);  // class template argument deduction from the vector
  static_assert(std::is_same_v<decltype(optimizer), peft::AdamW<T>>);
  const peft::LinearWarmup schedule{config["schedule"]["warmup"].get<long>(), config["schedule"]["total"].get<long>()};
  const json& grads = reference()["grads"];
  const json& trajectory = config[dtype_label<T>()];
  for (std::size_t s = 0; s < grads.size(); ++s) {
    const double lr = peft::apply_schedule(optimizer, opts.lr, schedule, static_cast<long>(s));
    const double expected_lr = config["lrs"][s].get<double>();
    CHECK(relative_error<double>(lr, expected_lr, "scheduled lr") <= 1e-15);
    CHECK(optimizer.lr() == lr);
    tensors.set_grads(grads[s]);
    optimizer.step();
    std::string worst_at;
    const double err =
        max_relative_error<T>(tensors.values, trajectory[s], "scheduled_adamw step " + std::to_string(s + 1), worst_at);
    INFO(worst_at);
    REQUIRE(err <= tolerance<T>());
  }
}

TEMPLATE_TEST_CASE("clip_grad_norm matches torch.nn.utils.clip_grad_norm_", "[clip][reference]", float, double) {
  using T = TestType;
  for (const auto& config : reference()["clip_grad_norm"]) {
    const std::string name = config["name"].get<std::string>();
    DYNAMIC_SECTION(name << " " << dtype_label<T>()) {
      const double max_norm = config["max_norm"].get<double>();
      const double norm_type = config["norm_type"].is_string() ? std::numeric_limits<double>::infinity()
                                                               : config["norm_type"].get<double>();
      auto tensors = Tensors<T>::from_json(reference()["init"]);
      tensors.set_grads(reference()["grads"][0]);
      const auto refs = tensors.refs();
      const double total = peft::clip_grad_norm(refs, max_norm, norm_type);
      const json& expected = config[dtype_label<T>()];
      const double expected_total = expected["total_norm"].get<double>();
      CHECK(relative_error<T>(total, expected_total, name + " total_norm") <= tolerance<T>());
      const bool active = max_norm / (expected_total + 1e-6) < 1.0;
      CHECK(active == (name.find("inactive") == std::string::npos));
      std::string worst_at;
      const double err = max_relative_error<T>(tensors.grads, expected["grads"], name + " grads", worst_at);
      INFO(worst_at);
      REQUIRE(err <= tolerance<T>());
      if (!active) {
        // Inactive clipping leaves the gradients bit for bit.
        auto untouched = Tensors<T>::from_json(reference()["init"]);
        untouched.set_grads(reference()["grads"][0]);
        CHECK(tensors.grads == untouched.grads);
      }
    }
  }
}

TEMPLATE_TEST_CASE("clip_grad_value matches torch.nn.utils.clip_grad_value_", "[clip][reference]", float, double) {
  using T = TestType;
  for (const auto& config : reference()["clip_grad_value"]) {
    const std::string name = config["name"].get<std::string>();
    DYNAMIC_SECTION(name << " " << dtype_label<T>()) {
      auto tensors = Tensors<T>::from_json(reference()["init"]);
      tensors.set_grads(reference()["grads"][0]);
      peft::clip_grad_value(tensors.refs(), config["clip_value"].get<double>());
      std::string worst_at;
      const double err = max_relative_error<T>(tensors.grads, config[dtype_label<T>()], name, worst_at);
      INFO(worst_at);
      REQUIRE(err == 0.0);
    }
  }
}

TEST_CASE("schedules match transformers' lr_lambda", "[schedule][reference]") {
  for (const auto& config : reference()["schedules"]) {
    const std::string name = config["name"].get<std::string>();
    const std::string kind = config["kind"].get<std::string>();
    const json& args = config["args"];
    const json& steps = config["steps"];
    const json& expected = config["multipliers"];
    DYNAMIC_SECTION(name) {
      for (std::size_t i = 0; i < steps.size(); ++i) {
        const long step = steps[i].get<long>();
        double m = 0.0;
        if (kind == "linear") {
          m = peft::LinearWarmup{args["warmup"].get<long>(), args["total"].get<long>()}(step);
        } else if (kind == "cosine") {
          m = peft::CosineWarmup{args["warmup"].get<long>(), args["total"].get<long>(), args["cycles"].get<double>()}(step);
        } else {
          REQUIRE(kind == "constant");
          m = peft::ConstantWarmup{args["warmup"].get<long>()}(step);
        }
        const double e = expected[i].get<double>();
        INFO(name << " step " << step << " got " << m << " expected " << e);
        CHECK(relative_error<double>(m, e, name + " step " + std::to_string(step)) <= 1e-15);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Behaviour

TEMPLATE_TEST_CASE("frozen parameters are never touched", "[optim][clip]", float, double) {
  using T = TestType;
  std::vector<T> w{T(0.5), T(-1.0), T(2.0)}, gw{T(0.1), T(-0.2), T(0.3)};
  std::vector<T> f{T(1.0), T(2.0)}, gf{T(7.0), T(-8.0)};   // frozen, with a gradient
  std::vector<T> h{T(3.0), T(4.0)};                        // frozen, without gradient
  const std::vector<peft::ParamRef<T>> refs{{"w", w.data(), gw.data(), w.size(), true},
                                            {"frozen_with_grad", f.data(), gf.data(), f.size(), false},
                                            {"frozen_no_grad", h.data(), nullptr, h.size(), false}};
  const auto f0 = f, gf0 = gf, h0 = h, w0 = w;

  auto check_frozen = [&] {
    CHECK(f == f0);
    CHECK(gf == gf0);
    CHECK(h == h0);
  };

  SECTION("AdamW") {
    peft::AdamW<T> opt(refs, {.lr = 0.1, .weight_decay = 0.5, .amsgrad = true});
    REQUIRE(opt.params().size() == 1);
    for (int i = 0; i < 3; ++i) opt.step();
    opt.zero_grad();
    check_frozen();
    CHECK(w != w0);
  }
  SECTION("Adam") {
    peft::Adam<T> opt(refs, {.lr = 0.1, .weight_decay = 0.5});
    for (int i = 0; i < 3; ++i) opt.step();
    opt.zero_grad();
    check_frozen();
    CHECK(w != w0);
  }
  SECTION("SGD") {
    peft::SGD<T> opt(refs, {.lr = 0.1, .momentum = 0.9, .weight_decay = 0.5, .nesterov = true});
    for (int i = 0; i < 3; ++i) opt.step();
    opt.zero_grad();
    check_frozen();
    CHECK(w != w0);
  }
  SECTION("clip_grad_norm ignores frozen gradients in the norm and in the scaling") {
    const double total = peft::clip_grad_norm(refs, 0.1);
    CHECK(total == Approx(std::sqrt(0.01 + 0.04 + 0.09)).epsilon(1e-6));
    check_frozen();
    const double inf_total = peft::clip_grad_norm(refs, 0.1, std::numeric_limits<double>::infinity());
    CHECK(inf_total <= 0.1 + 1e-6);  // already clipped to norm 0.1
    check_frozen();
  }
  SECTION("clip_grad_value") {
    peft::clip_grad_value(refs, 0.15);
    CHECK(gw == std::vector<T>{T(0.1), T(-0.15), T(0.15)});
    check_frozen();
  }
}

// 16-bit parameters: the optimizer computes in float from fp32 master weights. Its master equals, bit for bit,
// a float optimizer's parameter given the same gradients (converted to float), and the 16-bit parameter is that
// value rounded; small updates accumulate (a bf16 parameter rounded at every step would not move) and a write
// made outside the optimizer is taken up at the next step.
TEMPLATE_TEST_CASE("16-bit parameters train through fp32 master weights", "[optim][mixed]", peft::bf16, peft::half) {
  using H = TestType;
  static_assert(peft::AdamW<H>::has_master_weights && !peft::AdamW<float>::has_master_weights);
  static_assert(std::is_same_v<typename peft::AdamW<H>::state_type, float> && std::is_same_v<typename peft::SGD<H>::state_type, float>);
  const std::vector<float> init{1.0f, -0.5f, 3.0f, 0.0078125f, 100.0f, -2.0f, 0.0f};  // a zero parameter is its new master
  const std::size_t n = init.size();
  auto run = [&](auto make_half, auto make_float) {
    std::vector<H> w(n), g(n);
    std::vector<float> wf(n), gf(n);
    for (std::size_t i = 0; i < n; ++i) {
      w[i] = H(init[i]);
      wf[i] = float(w[i]);
    }
    const std::vector<peft::ParamRef<H>> refs{{"w", w.data(), g.data(), n, true}};
    const std::vector<peft::ParamRef<float>> refs_f{{"w", wf.data(), gf.data(), n, true}};
    auto opt = make_half(refs);
    auto ref = make_float(refs_f);
    for (int step = 0; step < 80; ++step) {
      for (std::size_t i = 0; i < n; ++i) {  // the same gradient, in H and (exactly) in float; mostly positive
        g[i] = H(0.3 * std::sin(0.7 * double(step) + double(i)) + 0.2);
        gf[i] = float(g[i]);
      }
      if (step == 50) {  // written outside the optimizer (a checkpoint loaded, a rank mask): taken up next step
        w[2] = H(0.25f);
        wf[2] = float(w[2]);
        w[4] = H(0.0f);
        wf[4] = 0.0f;
      }
      opt.step();
      ref.step();
      for (std::size_t i = 0; i < n; ++i) {
        INFO("step " << step << ", element " << i << ": " << float(w[i]) << " vs rounded reference " << float(H(wf[i])));
        REQUIRE(float(w[i]) == float(H(wf[i])));
      }
    }
    // the small steps added up: element 0 moved although each update is below half a unit in the last
    // place of 1.0 (a parameter rounded to H at every step stays at 1.0)
    const float one_step = float(H(float(H(1.0f)) - 1e-4f));
    CHECK(one_step == 1.0f);
    CHECK(float(w[0]) != 1.0f);
    CHECK(wf[0] < 1.0f - 2e-3f);
  };
  SECTION("AdamW (AMSGrad)") {
    run([](const auto& r) { return peft::AdamW<H>(r, {.lr = 1e-4, .weight_decay = 0.01, .amsgrad = true}); },
        [](const auto& r) { return peft::AdamW<float>(r, {.lr = 1e-4, .weight_decay = 0.01, .amsgrad = true}); });
  }
  SECTION("Adam (L2)") {
    run([](const auto& r) { return peft::Adam<H>(r, {.lr = 1e-4, .weight_decay = 0.01}); },
        [](const auto& r) { return peft::Adam<float>(r, {.lr = 1e-4, .weight_decay = 0.01}); });
  }
  SECTION("SGD (Nesterov)") {
    run([](const auto& r) { return peft::SGD<H>(r, {.lr = 2e-4, .momentum = 0.5, .nesterov = true}); },
        [](const auto& r) { return peft::SGD<float>(r, {.lr = 2e-4, .momentum = 0.5, .nesterov = true}); });
  }
}

TEMPLATE_TEST_CASE("zero_grad zeros the gradients of the trainable parameters", "[optim]", float, double) {
  using T = TestType;
  std::vector<T> a{T(1), T(2), T(3)}, ga{T(0.5), T(-0.5), T(2)};
  std::vector<T> b{T(4)}, gb{T(9)};
  const std::vector<peft::ParamRef<T>> refs{{"a", a.data(), ga.data(), a.size(), true},
                                            {"b", b.data(), gb.data(), b.size(), true}};
  const std::vector<T> zeros3(3, T(0)), zeros1(1, T(0));
  SECTION("AdamW") {
    peft::AdamW<T> opt(refs);
    opt.zero_grad();
  }
  SECTION("Adam") {
    peft::Adam<T> opt(refs);
    opt.zero_grad();
  }
  SECTION("SGD") {
    peft::SGD<T> opt(refs);
    opt.zero_grad();
  }
  CHECK(ga == zeros3);
  CHECK(gb == zeros1);
  CHECK(a == std::vector<T>{T(1), T(2), T(3)});
}

TEMPLATE_TEST_CASE("lr, set_lr and step_count", "[optim]", float, double) {
  using T = TestType;
  std::vector<T> w{T(1), T(-1)}, g{T(1), T(1)};
  const auto refs = single_param(w, g);
  peft::AdamW<T> adamw(refs, {.lr = 0.25});
  CHECK(adamw.lr() == 0.25);
  adamw.set_lr(0.5);
  CHECK(adamw.lr() == 0.5);
  CHECK(adamw.options().lr == 0.5);
  CHECK(adamw.step_count() == 0);
  adamw.step();
  adamw.step();
  CHECK(adamw.step_count() == 2);

  peft::SGD sgd(refs, peft::SGDOptions{.lr = 0.1});
  static_assert(std::is_same_v<decltype(sgd), peft::SGD<T>>);
  sgd.set_lr(0.0);
  const auto before = w;
  sgd.step();
  CHECK(w == before);  // lr 0: no change
  CHECK(sgd.step_count() == 1);

  // SGD without momentum: p -= lr * g exactly.
  std::vector<T> v{T(1)}, gv{T(0.5)};
  peft::SGD<T> plain(single_param(v, gv), {.lr = 0.5});
  plain.step();
  CHECK(v[0] == T(0.75));

  // No trainable parameter at all: steps are no-ops.
  std::vector<T> frozen{T(1)};
  const std::vector<peft::ParamRef<T>> none{{"frozen", frozen.data(), nullptr, 1, false}};
  peft::AdamW<T> empty(none);
  empty.step();
  empty.zero_grad();
  CHECK(frozen[0] == T(1));
  CHECK(empty.params().empty());
}

TEST_CASE("invalid options throw std::invalid_argument naming the option", "[optim][validation]") {
  using Catch::Contains;
  std::vector<double> w{1.0}, g{1.0};
  const auto refs = single_param(w, g);

  REQUIRE_THROWS_AS(peft::AdamW<double>(refs, {.lr = -1e-3}), std::invalid_argument);
  REQUIRE_THROWS_WITH(peft::AdamW<double>(refs, {.lr = -1e-3}), Contains("lr") && Contains("-0.001"));
  REQUIRE_THROWS_WITH(peft::AdamW<double>(refs, {.lr = std::nan("")}), Contains("lr"));
  REQUIRE_THROWS_WITH(peft::AdamW<double>(refs, {.beta1 = 1.0}), Contains("beta1") && Contains("1"));
  REQUIRE_THROWS_WITH(peft::AdamW<double>(refs, {.beta1 = -0.1}), Contains("beta1") && Contains("-0.1"));
  REQUIRE_THROWS_WITH(peft::AdamW<double>(refs, {.beta2 = 1.5}), Contains("beta2") && Contains("1.5"));
  REQUIRE_THROWS_WITH(peft::AdamW<double>(refs, {.eps = -1e-8}), Contains("eps"));
  REQUIRE_THROWS_WITH(peft::AdamW<double>(refs, {.weight_decay = -0.5}), Contains("weight_decay") && Contains("-0.5"));
  REQUIRE_THROWS_WITH(peft::Adam<double>(refs, {.lr = -1.0}), Contains("Adam") && Contains("lr"));
  REQUIRE_THROWS_WITH(peft::Adam<double>(refs, {.beta2 = 1.0}), Contains("beta2"));
  REQUIRE_THROWS_WITH(peft::Adam<double>(refs, {.weight_decay = -1.0}), Contains("weight_decay"));
  REQUIRE_THROWS_WITH(peft::SGD<double>(refs, {.lr = -0.1}), Contains("SGD") && Contains("lr") && Contains("-0.1"));
  REQUIRE_THROWS_WITH(peft::SGD<double>(refs, {.momentum = -0.9}), Contains("momentum") && Contains("-0.9"));
  REQUIRE_THROWS_WITH(peft::SGD<double>(refs, {.weight_decay = -0.01}), Contains("weight_decay"));
  REQUIRE_THROWS_WITH(peft::SGD<double>(refs, {.nesterov = true}), Contains("nesterov") && Contains("momentum"));
  REQUIRE_THROWS_WITH(peft::SGD<double>(refs, {.momentum = 0.9, .dampening = 0.1, .nesterov = true}),
                      Contains("nesterov") && Contains("dampening"));
  REQUIRE_NOTHROW(peft::SGD<double>(refs, {.momentum = 0.9, .nesterov = true}));
  REQUIRE_NOTHROW(peft::AdamW<double>(refs, {.lr = 0.0, .beta1 = 0.0, .beta2 = 0.0, .eps = 0.0, .weight_decay = 0.0}));

  peft::AdamW<double> adamw(refs);
  REQUIRE_THROWS_WITH(adamw.set_lr(-1.0), Contains("lr"));
  CHECK(adamw.lr() == 1e-3);
  peft::SGD<double> sgd(refs);
  REQUIRE_THROWS_WITH(sgd.set_lr(-1.0), Contains("lr"));

  // An empty list is refused, as torch.optim's (a model whose layers were not found gives one).
  const std::vector<peft::ParamRef<double>> no_params;
  REQUIRE_THROWS_WITH(peft::AdamW<double>(no_params), Contains("AdamW: got an empty parameter list"));
  REQUIRE_THROWS_WITH(peft::Adam<double>(no_params), Contains("Adam: got an empty parameter list"));
  REQUIRE_THROWS_WITH(peft::SGD<double>(no_params), Contains("SGD: got an empty parameter list"));

  // A trainable parameter without gradient is named.
  std::vector<double> v{1.0};
  const std::vector<peft::ParamRef<double>> missing{{"layers.0.lora_A.default", v.data(), nullptr, 1, true}};
  REQUIRE_THROWS_AS(peft::AdamW<double>(missing), std::invalid_argument);
  REQUIRE_THROWS_WITH(peft::AdamW<double>(missing), Contains("layers.0.lora_A.default"));
  REQUIRE_THROWS_WITH(peft::Adam<double>(missing), Contains("layers.0.lora_A.default"));
  REQUIRE_THROWS_WITH(peft::SGD<double>(missing), Contains("layers.0.lora_A.default"));
  REQUIRE_THROWS_WITH(peft::clip_grad_norm(missing, 1.0), Contains("layers.0.lora_A.default"));
  REQUIRE_THROWS_WITH(peft::clip_grad_value(missing, 1.0), Contains("layers.0.lora_A.default"));

  REQUIRE_THROWS_WITH(peft::clip_grad_norm(refs, -1.0), Contains("max_norm"));
  REQUIRE_THROWS_WITH(peft::clip_grad_norm(refs, 1.0, 0.0), Contains("norm_type"));
  REQUIRE_THROWS_WITH(peft::clip_grad_value(refs, -0.5), Contains("clip_value"));
}

TEST_CASE("invalid schedule arguments throw std::invalid_argument naming the argument", "[schedule][validation]") {
  using Catch::Contains;
  REQUIRE_THROWS_AS(peft::LinearWarmup(0, 0), std::invalid_argument);
  REQUIRE_THROWS_WITH(peft::LinearWarmup(0, 0), Contains("total"));
  REQUIRE_THROWS_WITH(peft::LinearWarmup(-1, 10), Contains("warmup") && Contains("-1"));
  REQUIRE_THROWS_WITH(peft::CosineWarmup(2, -5), Contains("total") && Contains("-5"));
  REQUIRE_THROWS_WITH(peft::CosineWarmup(-2, 5), Contains("warmup"));
  REQUIRE_THROWS_WITH(peft::CosineWarmup(2, 5, std::numeric_limits<double>::infinity()), Contains("cycles"));
  REQUIRE_THROWS_WITH(peft::ConstantWarmup(-3), Contains("warmup"));
  REQUIRE_THROWS_WITH(peft::LinearWarmup(1, 10)(-1), Contains("step"));
  REQUIRE_NOTHROW(peft::LinearWarmup(20, 10));  // warmup beyond total is allowed, as in transformers
  CHECK(peft::LinearWarmup(20, 10)(25) == 0.0);
}

TEMPLATE_TEST_CASE("step, zero_grad, clipping and schedules allocate nothing", "[optim][allocation]", float, double) {
  using T = TestType;
  auto tensors = Tensors<T>::from_json(reference()["init"]);
  tensors.set_grads(reference()["grads"][0]);
  const auto refs = tensors.refs();
  peft::AdamW<T> adamw(refs, {.lr = 1e-3});
  peft::AdamW<T> amsgrad(refs, {.lr = 1e-3, .amsgrad = true});
  peft::Adam<T> adam(refs, {.lr = 1e-3, .weight_decay = 0.1});
  peft::SGD<T> sgd(refs, {.lr = 1e-3, .momentum = 0.9, .weight_decay = 0.1, .nesterov = true});
  const peft::CosineWarmup cosine{2, 10};
  const peft::LinearWarmup linear{2, 10};

  const long before = g_allocations.load();
  for (long s = 0; s < 10; ++s) {
    peft::apply_schedule(adamw, 1e-3, cosine, s);
    peft::apply_schedule(sgd, 1e-3, linear, s);
    adamw.step();
    amsgrad.step();
    adam.step();
    sgd.step();
    peft::clip_grad_norm(refs, 1.0);
    peft::clip_grad_norm(refs, 1.0, std::numeric_limits<double>::infinity());
    peft::clip_grad_value(refs, 0.5);
  }
  adamw.zero_grad();
  sgd.zero_grad();
  const long after = g_allocations.load();
  CHECK(after - before == 0);

  // Sanity check of the counter itself.
  const long probe = g_allocations.load();
  auto* leak_check = new std::vector<int>(4);
  delete leak_check;
  CHECK(g_allocations.load() - probe >= 1);
}
