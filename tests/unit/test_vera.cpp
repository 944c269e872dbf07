// VeRA on Linear: gradients against finite differences (several shapes, dropout with a fixed mask, two
// adapters, two chained layers of different sizes sharing one pair of projections), PEFT's properties,
// numbers from real Hugging Face PEFT 0.21.2 (tests/reference/data/vera_*.json, with PEFT's projections
// loaded), no allocation in forward/backward, bad input.
#include "sanitized.hpp"
#if !defined(PEFT_TEST_SANITIZED)
#define EIGEN_RUNTIME_NO_MALLOC
#include <stdexcept>
#define eigen_assert(x) \
  if (!(x)) throw std::runtime_error("eigen_assert failed: " #x)
#endif

#include <catch2/catch.hpp>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <new>

#include "layer_check.hpp"
#include "reference.hpp"
#include <peft/adapter/vera.hpp>
#include <peft/train.hpp>

#if !defined(PEFT_TEST_SANITIZED)
#define PEFT_VERA_COUNT_NEW 1
namespace {
std::atomic<long> g_news{0};
}
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
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
#pragma GCC diagnostic pop
#endif

using namespace peft;
using namespace peft::test;
using json = nlohmann::json;

namespace {

template <class T>
using VeraLinear = Adapted<Linear<T>, Vera>;
template <class T>
using Proj = std::shared_ptr<VeraProjections<T>>;

struct Case {
  Index m, in, out;
  int r;
  Index max_in, max_out;
  bool fifo = false;
  double dropout = 0.0;
};

VeraConfig config_of(const Case& c, std::shared_ptr<const detail::VeraProjectionsBase> p, bool init_weights = false) {
  VeraConfig cfg;
  cfg.r = c.r;
  cfg.vera_dropout = c.dropout;
  cfg.fan_in_fan_out = c.fifo;
  cfg.init_weights = init_weights;
  cfg.projections = std::move(p);
  return cfg;
}

/// Random, non-trivial λ_b (PEFT's init_weights=False leaves it at ones).
template <class L>
void randomize_lambda_b(L& l, const std::string& name, std::uint64_t seed) {
  auto& a = vera_adapter(l, name);
  Generator g(seed);
  g.uniform(a.lambda_b.data(), a.lambda_b.size(), -1.5, 1.5);
}

/// A VeRA layer with random λ's (init_weights = false, then λ_b randomised) unless `init_weights`.
template <class T>
VeraLinear<T> make_layer(const Case& c, const Proj<T>& p, std::uint64_t seed = 11, bool init_weights = false) {
  Generator gen(seed);
  VeraLinear<T> l(Linear<T>(c.in, c.out, true, gen, c.fifo ? WeightLayout::in_out : WeightLayout::out_in), "model.layers.0.q_proj");
  l.add_adapter("default", config_of(c, p, init_weights), gen);
  if (!init_weights) randomize_lambda_b(l, "default", seed + 100);
  return l;
}

/// The double twin of float projections (the same values).
template <class T>
Proj<double> twin_of(const Proj<T>& p) {
  return VeraProjections<double>::from_tensors(p->A(), p->B());
}

template <class L>
Mat<typename L::scalar> run_forward(L& l, const Mat<typename L::scalar>& x, std::uint64_t seed = 5) {
  Mat<typename L::scalar> y(x.rows(), l.out_features());
  auto ctx = l.make_context(x.rows());
  l.set_seed(seed);
  l.forward(ctx, x, y);
  return y;
}

/// A (possibly strided) view as a double matrix.
template <class T>
Mat<double> to_double(MatrixView<T> v) {
  Mat<double> m(v.rows, v.cols);
  for (Index i = 0; i < v.rows; ++i)
    for (Index j = 0; j < v.cols; ++j) m(i, j) = double(v(i, j));
  return m;
}

/// ΔW by the formula, in double: diag(λ_b) B_s diag(λ_d) A_s, [out, in].
template <class A>
Mat<double> expected_delta(const A& a) {
  auto d = [](auto v) { return to_double(v); };
  const Mat<double> lb = d(a.vera_lambda_b()), ld = d(a.vera_lambda_d());
  const Mat<double> As = d(a.A()), Bs = d(a.B());
  return lb.transpose().asDiagonal() * Bs * ld.transpose().asDiagonal() * As;
}

/// Two VeRA layers chained, l1: in → hidden, l2: hidden → out, sharing one pair of projections; the
/// interface check_layer_gradients needs.
template <class T>
struct Chain {
  using scalar = T;
  VeraLinear<T> l1, l2;
  struct Context {
    typename VeraLinear<T>::Context c1, c2;
    Mat<T> h, dh;
  };
  Index in_features() const { return l1.in_features(); }
  Index out_features() const { return l2.out_features(); }
  Context make_context(Index b) const { return {l1.make_context(b), l2.make_context(b), Mat<T>(b, l1.out_features()), Mat<T>(b, l1.out_features())}; }
  void set_seed(std::uint64_t s) {
    l1.set_seed(s);
    l2.set_seed(s + 1);
  }
  void forward(Context& c, ConstMatrixView<T> x, MatrixView<T> y) {
    l1.forward(c.c1, x, c.h);
    l2.forward(c.c2, c.h, y);
  }
  void backward(Context& c, ConstMatrixView<T> dy, MatrixView<T> dx, GradMode params, GradMode input) {
    l2.backward(c.c2, dy, c.dh, params, GradMode::overwrite);
    l1.backward(c.c1, c.dh, dx, params, input);
  }
  template <class F>
  void visit_parameters(F&& f) {
    l1.visit_parameters(f);
    l2.visit_parameters(f);
  }
};

template <class T>
Chain<T> make_chain(const Proj<T>& p, double dropout) {
  Generator g(77);
  Chain<T> c{VeraLinear<T>(Linear<T>(10, 7, true, g), "l1"), VeraLinear<T>(Linear<T>(7, 12, true, g), "l2")};
  c.l1.add_adapter("default", config_of(Case{0, 10, 7, 4, 10, 12, false, dropout}, p), g);
  c.l2.add_adapter("default", config_of(Case{0, 7, 12, 4, 10, 12, false, dropout}, p), g);
  randomize_lambda_b(c.l1, "default", 1);
  randomize_lambda_b(c.l2, "default", 2);
  return c;
}

// ---- reference files ---------------------------------------------------------------------------------

/// Names of one layer's tensors in a reference file: the single-layer files of gen_adapters_reference.py
/// ("x", "lin.vera_lambda_b", "grad.lin.vera_lambda_b", "delta.lin", "merged.lin.weight") or the
/// multi-layer files of gen_vera_reference.py ("lin0.x", "lin0.grad.vera_lambda_b", "lin0.delta", ...).
struct RefNames {
  std::string layer;
  bool single;
  std::string io(const std::string& k) const { return single ? k : layer + "." + k; }
  std::string param(const std::string& k) const { return layer + "." + k; }
  std::string grad(const std::string& k) const { return single ? "grad." + layer + "." + k : layer + ".grad." + k; }
  std::string delta() const { return single ? "delta." + layer : layer + ".delta"; }
  std::string merged(const std::string& k) const { return single ? "merged." + layer + "." + k : layer + ".merged." + k; }
};

/// One layer of a reference file, with PEFT's projections (shared by the file's layers) loaded.
template <class T>
double check_reference_layer(const json& j, const RefNames& n, bool fifo, const std::shared_ptr<VeraProjections<T>>& proj,
                             const VeraConfig& base_cfg) {
  INFO("layer " << n.layer << (fifo ? " (Conv1D layout)" : ""));
  const double tol = reference_tol<T>();
  const Mat<T> w = ref_tensor<T>(j, n.param("weight")), b = ref_tensor<T>(j, n.param("bias"));
  const Index in = fifo ? w.rows() : w.cols(), out = fifo ? w.cols() : w.rows();
  Generator gen(0);
  Linear<T> base(in, out, true, gen, fifo ? WeightLayout::in_out : WeightLayout::out_in);
  as_mat(base.weight()) = w;
  as_mat(base.bias()) = b;
  VeraLinear<T> l(std::move(base), n.layer);
  VeraConfig cfg = base_cfg;
  cfg.fan_in_fan_out = fifo;
  cfg.projections = proj;
  l.add_adapter("default", cfg, gen);
  auto& a = vera_adapter(l, "default");
  CHECK(a.A().data == proj->A().data);  // a view into the shared projections, no copy
  const Mat<T> lb = ref_tensor<T>(j, n.param("vera_lambda_b")), ld = ref_tensor<T>(j, n.param("vera_lambda_d"));
  if (cfg.init_weights) {  // the default init is PEFT's exactly
    CHECK(as_mat(a.vera_lambda_b()) == lb);
    CHECK(as_mat(a.vera_lambda_d()) == ld);
  }
  as_mat(a.vera_lambda_b()) = lb;
  as_mat(a.vera_lambda_d()) = ld;
  l.eval();

  double worst = 0;
  auto cmp = [&](const std::string& what, const auto& ours, const Mat<T>& theirs) {
    const double e = scaled_diff(ours, theirs);
    INFO(what << ": scaled error " << e);
    CHECK(e < tol);
    worst = std::max(worst, e);
  };
  const Mat<T> x = ref_tensor<T>(j, n.io("x")), g = ref_tensor<T>(j, n.io("grad_out"));
  auto ctx = l.make_context(x.rows());
  Mat<T> y(x.rows(), out), dx(x.rows(), in);
  l.forward(ctx, x, y);
  a.grad_lambda_b.zero();
  a.grad_lambda_d[0] = nan<T>();  // overwrite mode must assign
  l.backward(ctx, g, dx, GradMode::overwrite);
  cmp("out", y, ref_tensor<T>(j, n.io("out")));
  cmp("grad.x", dx, ref_tensor<T>(j, n.io("grad.x")));
  cmp("grad lambda_b", as_mat(a.grad_vera_lambda_b()), ref_tensor<T>(j, n.grad("vera_lambda_b")));
  cmp("grad lambda_d", as_mat(a.grad_vera_lambda_d()), ref_tensor<T>(j, n.grad("vera_lambda_d")));
  Mat<T> delta(w.rows(), w.cols());
  l.delta_weight("default", delta);
  cmp("delta", delta, ref_tensor<T>(j, n.delta()));
  l.disable_adapters();
  const Mat<T> y0 = run_forward(l, x);
  cmp("base_out", y0, ref_tensor<T>(j, n.io("base_out")));
  if (cfg.init_weights) CHECK(y == y0);  // λ_b = 0: the identity exactly
  l.enable_adapters();
  l.merge();
  cmp("merged weight", as_mat(l.base().weight()), ref_tensor<T>(j, n.merged("weight")));
  CHECK(as_mat(l.base().bias()) == ref_tensor<T>(j, n.merged("bias")));
  cmp("merged_out", run_forward(l, x), ref_tensor<T>(j, n.io("merged_out")));
  return worst;
}

VeraConfig config_from(const json& c) {
  VeraConfig cfg;
  cfg.r = c.at("r");
  cfg.d_initial = c.at("d_initial");
  cfg.vera_dropout = c.at("vera_dropout");
  cfg.init_weights = c.at("init_weights");
  cfg.projection_prng_key = c.at("projection_prng_key");
  cfg.save_projection = c.at("save_projection");
  CHECK(c.at("bias") == "none");
  return cfg;
}

template <class T>
void check_reference_file(const std::string& file) {
  INFO("reference file " << file);
  const json j = load_reference(file);
  const VeraConfig cfg = config_from(j.at("config").at("default"));
  auto proj = VeraProjections<T>::from_tensors(ref_tensor<T>(j, "vera_A"), ref_tensor<T>(j, "vera_B"));
  double worst = 0;
  if (j.contains("layers")) {
    CHECK(proj->r() == j.at("projection_shapes").at("vera_A")[0].get<int>());
    CHECK(proj->max_in() == j.at("projection_shapes").at("vera_A")[1].get<Index>());
    CHECK(proj->max_out() == j.at("projection_shapes").at("vera_B")[0].get<Index>());
    // PEFT's checkpoint: base_model.model.<path>.<our parameter name without the adapter> and the projections
    std::map<std::string, std::vector<Index>> ours;
    ours[VeraProjections<T>::checkpoint_key_A] = {proj->r(), proj->max_in()};
    ours[VeraProjections<T>::checkpoint_key_B] = {proj->max_out(), proj->r()};
    for (const auto& L : j.at("layers")) {
      const std::string name = L.at("name").get<std::string>();
      worst = std::max(worst, check_reference_layer<T>(j, RefNames{name, false}, L.at("fan_in_fan_out").get<bool>(), proj, cfg));
      Generator g(0);
      VeraConfig c = cfg;
      c.fan_in_fan_out = L.at("fan_in_fan_out").get<bool>();
      c.projections = proj;
      VeraLinear<T> l(Linear<T>(L.at("in_features").get<Index>(), L.at("out_features").get<Index>(), true, g, c.fan_in_fan_out ? WeightLayout::in_out : WeightLayout::out_in), name);
      l.add_adapter("default", c, g);
      l.visit_parameters([&](ParamRef<T> p) {
        if (!p.trainable) return;
        const std::string key = "base_model.model." + l.module_path() + "." + p.name.substr(0, p.name.rfind('.'));
        ours[key] = {Index(p.size)};
      });
    }
    std::map<std::string, std::vector<Index>> theirs;
    for (const auto& [k, v] : j.at("checkpoint_keys").items()) theirs[k] = v.template get<std::vector<Index>>();
    CHECK(ours == theirs);
  } else {
    worst = check_reference_layer<T>(j, RefNames{j.at("layer").get<std::string>(), true}, false, proj, cfg);
  }
  if (std::getenv("PEFT_PRINT_ERRORS")) std::printf("%s: worst scaled error vs PEFT %.3g\n", file.c_str(), worst);
}

}  // namespace

TEMPLATE_TEST_CASE("vera: backward matches finite differences", "[vera][grad]", float, double) {
  using T = TestType;
  const Case c = GENERATE(Case{4, 6, 5, 2, 6, 5}, Case{5, 10, 8, 4, 10, 12}, Case{3, 7, 9, 1, 11, 9}, Case{2, 16, 12, 6, 20, 30},
                          Case{6, 9, 7, 3, 9, 10, true}, Case{5, 12, 10, 4, 15, 10, false, 0.3}, Case{4, 8, 6, 5, 8, 8, true, 0.5},
                          Case{1, 33, 17, 8, 40, 17});
  CAPTURE(c.m, c.in, c.out, c.r, c.max_in, c.max_out, c.fifo, c.dropout);
  auto proj = VeraProjections<T>::random(c.r, c.max_in, c.max_out, 3);
  auto layer = make_layer<T>(c, proj);
  auto twin = make_layer<double>(c, twin_of(proj));
  check_layer_gradients(layer, twin, c.m);
  SECTION("with the base layer trainable as well (full fine-tuning)") {
    layer.base().set_requires_grad(true);
    twin.base().set_requires_grad(true);
    check_layer_gradients(layer, twin, c.m, 7);
  }
  SECTION("two active adapters with their own projections (another rank) sum, both trainable") {
    Case c2 = c;
    c2.r = c.r + 2;
    auto p2 = VeraProjections<T>::random(c2.r, c.in + 3, c.out + 1, 9);
    Generator g(21), gd(21);
    layer.add_adapter("second", config_of(c2, p2), g);
    twin.add_adapter("second", config_of(c2, twin_of(p2)), gd);
    randomize_lambda_b(layer, "second", 5);
    layer.set_adapter(std::vector<std::string>{"default", "second"});
    twin.set_adapter(std::vector<std::string>{"default", "second"});
    check_layer_gradients(layer, twin, c.m, 3);
  }
  SECTION("in train mode with dropout, eval mode gives the undropped output") {
    if (c.dropout > 0) {
      const Mat<T> x = random_mat<T>(c.m, c.in, 4);
      const Mat<T> y_train = run_forward(layer, x, 1);
      CHECK(y_train == run_forward(layer, x, 1));  // a fixed (seed, forward) gives a fixed mask
      layer.eval();
      const Mat<T> y_eval = run_forward(layer, x, 1);
      CHECK(max_abs_diff(y_train, y_eval) > 1e-4);
      Mat<T> delta(layer.base().weight().rows, layer.base().weight().cols);
      layer.delta_weight("default", delta);
      auto plain = layer;
      plain.disable_adapters();
      const Mat<T> dw = c.fifo ? Mat<T>(delta.transpose()) : delta;
      CHECK(max_abs_diff(y_eval - run_forward(plain, x), x * dw.transpose()) < 50 * value_tol<T>());
    }
  }
}

TEMPLATE_TEST_CASE("vera: two layers of different sizes share one pair of projections (chained, finite differences)",
                   "[vera][grad][shared]", float, double) {
  using T = TestType;
  const double dropout = GENERATE(0.0, 0.25);
  CAPTURE(dropout);
  auto proj = VeraProjections<T>::random(4, 10, 12, 0);
  auto chain = make_chain<T>(proj, dropout);
  auto twin = make_chain<double>(twin_of(proj), dropout);
  // one storage: each layer's slices are views into the same projections (no per-layer copy)
  const auto& a1 = vera_adapter(chain.l1, "default");
  const auto& a2 = vera_adapter(chain.l2, "default");
  CHECK(a1.projections.get() == proj.get());
  CHECK(a2.projections.get() == proj.get());
  CHECK(a1.A().data == proj->A().data);
  CHECK(a2.B().data == proj->B().data);
  CHECK(a1.A().cols == 10);
  CHECK(a1.B().rows == 7);
  CHECK(a2.A().cols == 7);
  CHECK(a2.A().stride == 10);
  CHECK(a2.B().rows == 12);
  CHECK(proj.use_count() >= 3);
  check_layer_gradients(chain, twin, 5);
  // no gradient ever reaches the projections (they are not parameters)
  std::vector<std::string> names;
  chain.visit_parameters([&](ParamRef<T> p) { names.push_back(p.name); });
  CHECK(names == std::vector<std::string>{"weight", "bias", "vera_lambda_b.default", "vera_lambda_d.default", "weight", "bias",
                                          "vera_lambda_b.default", "vera_lambda_d.default"});
}

TEMPLATE_TEST_CASE("vera: PEFT's properties", "[vera][props]", float, double) {
  using T = TestType;
  const Case c{6, 12, 10, 4, 16, 14};
  const Mat<T> x = random_mat<T>(c.m, c.in, 21);
  Generator gen(4);
  Linear<T> plain(c.in, c.out, true, gen);
  Mat<T> y_base(c.m, c.out);
  {
    auto ctx = plain.make_context(c.m);
    plain.forward(ctx, x, y_base);
  }
  auto proj = VeraProjections<T>::random(c.r, c.max_in, c.max_out, 0);

  SECTION("default init: λ_b = 0, λ_d = d_initial, the identity exactly; defaults are PEFT's") {
    VeraConfig def;
    CHECK(def.r == 256);
    CHECK(def.projection_prng_key == 0);
    CHECK(def.save_projection);
    CHECK(def.vera_dropout == 0.0);
    CHECK(def.d_initial == 0.1);
    CHECK(!def.fan_in_fan_out);
    CHECK(def.bias == VeraBias::none);
    CHECK(def.init_weights);
    VeraLinear<T> l(plain);
    Generator g(9);
    VeraConfig cfg = config_of(c, proj, true);
    cfg.d_initial = 0.25;
    l.add_adapter("default", cfg, g);
    CHECK(run_forward(l, x) == y_base);
    const auto& a = vera_adapter(l, "default");
    CHECK(as_mat(a.vera_lambda_b()).cwiseAbs().maxCoeff() == T(0));
    CHECK((as_mat(a.vera_lambda_d()).array() == T(0.25)).all());
    Mat<T> delta(c.out, c.in);
    l.delta_weight("default", delta);
    CHECK(delta.cwiseAbs().maxCoeff() == T(0));
    // but the gradient of λ_b is not zero: training starts
    auto ctx = l.make_context(c.m);
    Mat<T> y(c.m, c.out), dx(c.m, c.in);
    l.forward(ctx, x, y);
    l.backward(ctx, random_mat<T>(c.m, c.out, 2), dx, GradMode::overwrite);
    CHECK(as_mat(vera_adapter(l, "default").grad_vera_lambda_b()).cwiseAbs().maxCoeff() > T(1e-3));
    CHECK(as_mat(vera_adapter(l, "default").grad_vera_lambda_d()).cwiseAbs().maxCoeff() == T(0));  // ∝ λ_b = 0
  }
  SECTION("init_weights = false: λ_b = 1, λ_d ~ N(0, 1) (PEFT's), y − base = x ΔWᵀ, ΔW the formula") {
    VeraLinear<T> l(plain);
    Generator g(9);
    l.add_adapter("default", config_of(c, proj), g);
    const auto& a = vera_adapter(l, "default");
    CHECK((as_mat(a.vera_lambda_b()).array() == T(1)).all());
    CHECK(as_mat(a.vera_lambda_d()).cwiseAbs().maxCoeff() > T(0.1));
    randomize_lambda_b(l, "default", 3);
    const Mat<T> y = run_forward(l, x);
    CHECK(max_abs_diff(y, y_base) > 1e-3);
    Mat<T> delta(c.out, c.in);
    l.delta_weight("default", delta);
    CHECK(max_abs_diff(delta, expected_delta(a)) < 10 * value_tol<T>());
    CHECK(max_abs_diff(y - y_base, x * delta.transpose()) < 20 * value_tol<T>());
  }
  SECTION("the seeded projection init: PEFT's distribution and shapes, deterministic per key, float = double") {
    const auto& A = as_mat(proj->A());
    const auto& B = as_mat(proj->B());
    CHECK(A.rows() == c.r);
    CHECK(A.cols() == c.max_in);
    CHECK(B.rows() == c.max_out);
    CHECK(B.cols() == c.r);
    const double ba = std::sqrt(6.0 / double(c.max_in)), bb = std::sqrt(6.0 / double(c.r));
    CHECK(A.cwiseAbs().maxCoeff() <= T(ba));
    CHECK(A.cwiseAbs().maxCoeff() > T(0.8 * ba));
    CHECK(B.cwiseAbs().maxCoeff() <= T(bb));
    CHECK(B.cwiseAbs().maxCoeff() > T(0.8 * bb));
    auto big = VeraProjections<T>::random(64, 256, 256, 0);
    const double mean = as_mat(big->A()).template cast<double>().mean();
    const double var = as_mat(big->A()).template cast<double>().array().square().mean();
    CHECK(std::abs(mean) < 0.01 * std::sqrt(6.0 / 256));
    CHECK(var == Approx(2.0 / 256).epsilon(0.03));  // U(±b): b²/3 = 2/fan_in (kaiming, gain √2)
    const auto same = VeraProjections<T>::random(c.r, c.max_in, c.max_out, 0), other = VeraProjections<T>::random(c.r, c.max_in, c.max_out, 1);
    CHECK(as_mat(same->A()) == A);
    CHECK(as_mat(same->B()) == B);
    CHECK(as_mat(other->A()) != A);
    auto pd = VeraProjections<double>::random(c.r, c.max_in, c.max_out, 0);
    CHECK(max_abs_diff(as_mat(pd->B()), B) < 2 * value_tol<T>());
  }
  SECTION("parameter names are PEFT's (bare Parameters), λ shapes [out] and [r]; projections are not parameters") {
    VeraLinear<T> l(plain);
    Generator g(9);
    l.add_adapter("default", config_of(c, proj), g);
    auto p2 = VeraProjections<T>::random(2, c.in, c.out, 0);
    l.add_adapter("other", config_of(Case{0, 0, 0, 2, 0, 0}, p2), g);
    std::vector<std::string> names;
    std::vector<std::size_t> sizes;
    std::vector<bool> trainable;
    l.visit_parameters([&](ParamRef<T> p) { names.push_back(p.name), sizes.push_back(p.size), trainable.push_back(p.trainable); });
    CHECK(names == std::vector<std::string>{"weight", "bias", "vera_lambda_b.default", "vera_lambda_d.default", "vera_lambda_b.other",
                                            "vera_lambda_d.other"});
    CHECK(sizes == std::vector<std::size_t>{120, 10, 10, 4, 10, 2});
    CHECK(trainable == std::vector<bool>{false, false, true, true, false, false});  // PEFT: only the active adapter trains
  }
  SECTION("merge gives the unmerged output, unmerge restores the weights, the bias never changes; Conv1D layout too") {
    for (bool fifo : {false, true}) {
      CAPTURE(fifo);
      Case cc = c;
      cc.fifo = fifo;
      auto l = make_layer<T>(cc, proj, 5);
      const Mat<T> y = run_forward(l, x);
      const Mat<T> w0 = as_mat(l.base().weight()), b0 = as_mat(l.base().bias());
      Mat<T> delta(w0.rows(), w0.cols());
      l.delta_weight("default", delta);
      const Mat<double> expect = expected_delta(vera_adapter(l, "default"));
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
    VeraLinear<T> l(plain);
    Generator g(2);
    l.add_adapter("default", config_of(c, proj), g);
    randomize_lambda_b(l, "default", 8);
    l.disable_adapters();
    CHECK(run_forward(l, x) == y_base);
    l.enable_adapters();
    l.merge();
    l.disable_adapters();
    CHECK(!l.merged());
    CHECK(max_abs_diff(run_forward(l, x), y_base) < 10 * value_tol<T>());
    l.enable_adapters();
    vera_adapter(l, "default").lambda_b[3] = std::numeric_limits<T>::infinity();
    const Mat<T> w0 = as_mat(l.base().weight());
    REQUIRE_THROWS_WITH(l.merge(std::nullopt, true), Catch::Contains("NaNs detected in the merged weights") && Catch::Contains("default"));
    CHECK(as_mat(l.base().weight()) == w0);
  }
  SECTION("two adapters: outputs add; deleting one leaves the other") {
    VeraLinear<T> l(plain);
    Generator g(2);
    l.add_adapter("a", config_of(c, proj), g);
    l.add_adapter("b", config_of(c, proj), g);
    randomize_lambda_b(l, "a", 1);
    randomize_lambda_b(l, "b", 2);
    const Mat<T> ya = run_forward(l, x);
    l.set_adapter("b");
    const Mat<T> yb = run_forward(l, x);
    l.set_adapter(std::vector<std::string>{"a", "b"});
    const Mat<T> yab = run_forward(l, x);
    CHECK(max_abs_diff(yab - y_base, (ya - y_base) + (yb - y_base)) < 10 * value_tol<T>());
    l.delete_adapter("a");
    CHECK(max_abs_diff(run_forward(l, x), yb) == 0.0);
  }
  SECTION("loading projections in place (a checkpoint) changes every layer that shares them") {
    auto l1 = make_layer<T>(c, proj, 5);
    Generator g(3);
    VeraLinear<T> l2(Linear<T>(c.max_in, c.max_out, true, g));
    l2.add_adapter("default", config_of(Case{0, c.max_in, c.max_out, c.r, 0, 0}, proj), g);
    randomize_lambda_b(l2, "default", 4);
    const Mat<T> x2 = random_mat<T>(3, c.max_in, 5);
    const Mat<T> y1 = run_forward(l1, x), y2 = run_forward(l2, x2);
    const Mat<T> newA = random_mat<T>(c.r, c.max_in, 40), newB = random_mat<T>(c.max_out, c.r, 41);
    proj->load(newA, newB);
    CHECK(as_mat(proj->A()) == newA);
    const Mat<T> y1b = run_forward(l1, x), y2b = run_forward(l2, x2);
    CHECK(max_abs_diff(y1, y1b) > 1e-3);
    CHECK(max_abs_diff(y2, y2b) > 1e-3);
    Mat<T> delta(c.out, c.in);
    l1.delta_weight("default", delta);
    const Mat<double> lb = as_mat(vera_adapter(l1, "default").vera_lambda_b()).template cast<double>();
    const Mat<double> ld = as_mat(vera_adapter(l1, "default").vera_lambda_d()).template cast<double>();
    const Mat<double> expect = lb.transpose().asDiagonal() * newB.template cast<double>().topRows(c.out) * ld.transpose().asDiagonal() *
                               newA.template cast<double>().leftCols(c.in);
    CHECK(max_abs_diff(delta, expect) < 10 * value_tol<T>());
  }
  SECTION("an AdamW step changes only the λ's (the base and the projections stay)") {
    auto l = make_layer<T>(c, proj, 5);
    const Mat<T> w0 = as_mat(l.base().weight()), b0 = as_mat(l.base().bias());
    const Mat<T> A0 = as_mat(proj->A()), B0 = as_mat(proj->B());
    auto& a = vera_adapter(l, "default");
    const Mat<T> lb0 = as_mat(a.vera_lambda_b()), ld0 = as_mat(a.vera_lambda_d());
    std::vector<ParamRef<T>> params;
    l.visit_parameters([&](ParamRef<T> p) { params.push_back(p); });
    AdamW<T> opt(params, AdamWOptions{.lr = 0.05});
    auto ctx = l.make_context(c.m);
    Mat<T> y(c.m, c.out), dx(c.m, c.in);
    l.forward(ctx, x, y);
    l.backward(ctx, random_mat<T>(c.m, c.out, 6), dx, GradMode::overwrite);
    opt.step();
    CHECK(as_mat(l.base().weight()) == w0);
    CHECK(as_mat(l.base().bias()) == b0);
    CHECK(as_mat(proj->A()) == A0);
    CHECK(as_mat(proj->B()) == B0);
    CHECK(((as_mat(a.vera_lambda_b()) - lb0).array() != T(0)).all());
    CHECK(((as_mat(a.vera_lambda_d()) - ld0).array() != T(0)).all());
  }
}

TEMPLATE_TEST_CASE("reference: VeRA on Linear matches Hugging Face PEFT (projections loaded from PEFT's tensors)",
                   "[reference][vera]", float, double) {
  using T = TestType;
  const std::string sfx = std::is_same_v<T, float> ? "_f32.json" : "_f64.json";
  for (const char* f : {"vera_linear_default", "vera_shared", "vera_conv1d", "vera_init"}) check_reference_file<T>(f + sfx);
}

TEST_CASE("vera: the seeded init is documented as not bit-identical to PEFT's", "[vera][init]") {
  // vera_init_f32.json holds PEFT's projections for projection_prng_key = 0, r = 4, max_in = 10, max_out = 12
  const json j = load_reference("vera_init_f32.json");
  REQUIRE(j.at("config").at("default").at("projection_prng_key") == 0);
  auto ours = VeraProjections<float>::random(4, 10, 12, 0);
  const Mat<float> theirs = ref_tensor<float>(j, "vera_A");
  CHECK(max_abs_diff(as_mat(ours->A()), theirs) > 0.1);
  // the same bound (PEFT's arithmetic), hence the same distribution
  CHECK(theirs.cwiseAbs().maxCoeff() <= float(VeraProjections<float>::kaiming_bound(10)));
}

TEMPLATE_TEST_CASE("vera: forward and backward allocate nothing after make_context", "[vera][alloc]", float, double) {
#ifdef PEFT_VERA_COUNT_NEW
  using T = TestType;
  for (double dropout : {0.0, 0.2}) {
    for (Index batch : {1, 32}) {
      auto proj = VeraProjections<T>::random(16, 96, 80, 1);
      Generator g(1);
      VeraLinear<T> l(Linear<T>(64, 80, true, g));
      l.add_adapter("a", config_of(Case{0, 64, 80, 16, 0, 0, false, dropout}, proj), g);
      l.add_adapter("b", config_of(Case{0, 64, 80, 16, 0, 0, false, dropout}, proj), g);
      l.set_adapter(std::vector<std::string>{"a", "b"});
      auto ctx = l.make_context(batch);
      const Mat<T> x = random_mat<T>(batch, 64, 1), dy = random_mat<T>(batch, 80, 2);
      Mat<T> y(batch, 80), dx(batch, 64);
      const long n0 = g_news;
      Eigen::internal::set_is_malloc_allowed(false);
      for (int it = 0; it < 3; ++it) {
        l.forward(ctx, x, y);
        l.backward(ctx, dy, dx, it == 0 ? GradMode::overwrite : GradMode::accumulate);
      }
      Eigen::internal::set_is_malloc_allowed(true);
      const long news = g_news - n0;
      CAPTURE(dropout, batch);
      CHECK(news == 0);
    }
  }
  // the counter sees allocations (this test can fail)
  const long n0 = g_news;
  ::operator delete(::operator new(64));
  CHECK(g_news - n0 == 1);
#else
  SUCCEED("operator new is not counted under AddressSanitizer");
#endif
}

TEST_CASE("vera: bad input gets a clear exception naming the tensor or field", "[vera][errors]") {
  Generator g(1);
  auto proj = VeraProjections<float>::random(4, 10, 12, 0);
  VeraLinear<float> l(Linear<float>(10, 12, true, g), "layers.0.q_proj");
  VeraConfig ok;
  ok.r = 4;
  ok.projections = proj;
  l.add_adapter("default", ok, g);
  auto bad = [&](auto edit, const char* message, auto error_tag) {
    VeraConfig c = ok;
    edit(c);
    REQUIRE_THROWS_AS(l.add_adapter("bad", c, g), decltype(error_tag));
    REQUIRE_THROWS_WITH(l.add_adapter("bad", c, g), Catch::Contains(message));
  };
  const ConfigError cfg_err("");
  const ShapeError shape_err("");
  bad([](VeraConfig& c) { c.r = 0; }, "r should be a positive integer value but the value passed is 0", cfg_err);
  bad([](VeraConfig& c) { c.vera_dropout = 1.0; }, "vera_dropout must be in [0, 1), got 1", cfg_err);
  bad([](VeraConfig& c) { c.d_initial = std::numeric_limits<double>::infinity(); }, "d_initial must be finite", cfg_err);
  bad([](VeraConfig& c) { c.bias = VeraBias::vera_only; }, "bias = 'all' / 'vera_only'", cfg_err);
  bad([](VeraConfig& c) { c.projections = nullptr; }, "projections is not set", cfg_err);
  bad([](VeraConfig& c) { c.fan_in_fan_out = true; }, "fan_in_fan_out = true does not match the base weight layout ([out, in])", cfg_err);
  bad([](VeraConfig& c) { c.projections = VeraProjections<double>::random(4, 10, 12, 0); },
      "the projections hold double values (or another backend) but the layer computes in float", cfg_err);
  bad([](VeraConfig& c) { c.projections = VeraProjections<float>::random(4, 9, 12, 0); },
      "vera_A has a size of 9 but 10 or greater is required", shape_err);
  bad([](VeraConfig& c) { c.projections = VeraProjections<float>::random(4, 10, 11, 0); },
      "vera_B has a size of 11 but 12 or greater is required", shape_err);
  bad([](VeraConfig& c) { c.r = 8; }, "the projections have rank 4 but the config has r = 8", shape_err);
  CHECK(l.adapter_names() == std::vector<std::string>{"default"});  // failed adds leave nothing behind

  // projections from tensors: shapes that do not fit
  const Mat<float> A = random_mat<float>(4, 10, 1), B = random_mat<float>(12, 4, 2), B3 = random_mat<float>(12, 3, 3);
  REQUIRE_THROWS_AS(VeraProjections<float>::from_tensors(A, B3), ShapeError);
  REQUIRE_THROWS_WITH(VeraProjections<float>::from_tensors(A, B3),
                      Catch::Contains("vera_A is [4, 10] and vera_B is [12, 3]") && Catch::Contains("must be equal"));
  REQUIRE_THROWS_WITH(VeraProjections<float>::from_tensors(Mat<float>(0, 10), B), Catch::Contains("vera_A is empty"));
  REQUIRE_THROWS_WITH(proj->load(random_mat<float>(4, 9, 1), B), Catch::Contains("base_model.vera_A: expected shape [4, 10], got [4, 9]"));
  REQUIRE_THROWS_WITH(proj->load(A, random_mat<float>(11, 4, 1)), Catch::Contains("base_model.vera_B: expected shape [12, 4], got [11, 4]"));
  REQUIRE_THROWS_AS(VeraProjections<float>::random(0, 10, 12, 0), ConfigError);
  REQUIRE_THROWS_WITH(VeraProjections<float>::random(4, 0, 12, 0), Catch::Contains("max_in = 0"));
  // a float checkpoint converts into double projections
  auto pd = VeraProjections<double>::from_tensors(ConstMatrixView<float>(A), ConstMatrixView<float>(B));
  CHECK(max_abs_diff(as_mat(pd->A()), A) == 0.0);

  // the state machine is Adapted's: backward without forward, while merged, a stale context
  auto ctx = l.make_context(2);
  Mat<float> x = random_mat<float>(2, 10, 1), y(2, 12), dy = random_mat<float>(2, 12, 2), dx(2, 10);
  REQUIRE_THROWS_WITH(l.backward(ctx, dy, dx), Catch::Contains("no forward pass"));
  l.forward(ctx, x, y);
  REQUIRE_THROWS_AS(l.forward(ctx, random_mat<float>(2, 9, 1), y), ShapeError);
  l.merge();
  REQUIRE_THROWS_WITH(l.backward(ctx, dy, dx), Catch::Contains("merged into the base weight"));
  l.unmerge();
  l.add_adapter("second", ok, g);
  REQUIRE_THROWS_WITH(l.forward(ctx, x, y), Catch::Contains("call make_context() again"));
  REQUIRE_THROWS_WITH(vera_adapter(l, "nope"), Catch::Contains("does not exist"));
}

TEMPLATE_TEST_CASE("vera beside lora on one layer: outputs add up, gradients match finite differences", "[vera][lora][mixed][grad]", float,
                   double) {
  using T = TestType;
  auto proj = VeraProjections<T>::random(3, 12, 10, 2);
  auto build = [](auto tag, auto p) {
    using U = decltype(tag);
    Generator g(5);
    Adapted<Linear<U>, Lora, Vera> l(Linear<U>(9, 8, true, g), "mlp.up_proj");
    LoraConfig lc;
    lc.r = 2;
    lc.init_lora_weights = LoraInit::off;
    l.add_adapter("lora", lc, g);
    l.add_adapter("vera", config_of(Case{0, 9, 8, 3, 0, 0}, p), g);
    randomize_lambda_b(l, "vera", 3);
    l.set_adapter(std::vector<std::string>{"lora", "vera"});
    return l;
  };
  auto l = build(T{}, proj);
  auto t = build(double{}, twin_of(proj));
  check_layer_gradients(l, t, 4);
  const Mat<double> x = random_mat<double>(3, 9, 8);
  const Mat<double> y = run_forward(t, x);
  t.disable_adapters();
  const Mat<double> y0 = run_forward(t, x);
  t.enable_adapters();
  Mat<double> sum = Mat<double>::Zero(8, 9), d(8, 9);
  for (const char* n : {"lora", "vera"}) {
    t.delta_weight(n, d);
    sum += d;
  }
  CHECK(max_abs_diff(y - y0, x * sum.transpose()) < 1e-12);
  t.merge();
  CHECK(max_abs_diff(run_forward(t, x), y) < 1e-12);
}
