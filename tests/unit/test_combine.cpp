// add_weighted_adapter (peft/merge.hpp) against real Hugging Face PEFT 0.21 (tests/reference/checkpoints/combine,
// from gen_combine_reference.py): every combination type's delta weights, factors and model outputs; then
// merge_utils' pieces on hand-made numbers, DARE's statistics and determinism, the exact option, and bad input.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <peft/io/pretrained.hpp>
#include <peft/merge.hpp>
#include <peft/model.hpp>

#include "reference.hpp"

using namespace peft;
using namespace peft::test;
namespace fs = std::filesystem;
namespace st = peft::safetensors;
using nlohmann::json;

#ifndef PEFT_CHECKPOINT_DIR
#define PEFT_CHECKPOINT_DIR PEFT_TEST_DATA_DIR "/../checkpoints"
#endif

namespace {

const std::string root = std::string(PEFT_CHECKPOINT_DIR) + "/combine";

template <class T>
struct NetT {
  Adapted<Embedding<T>, Lora> emb;
  Adapted<Linear<T>, Lora> lin0;
  Adapted<Linear<T>, Lora> lin1;
  Adapted<Conv2d<T>, Lora> conv;
};

Conv2dGeometry conv_geo() {
  Conv2dGeometry g;
  g.in_channels = 2;
  g.out_channels = 3;
  g.kernel_h = g.kernel_w = 3;
  g.pad_h = g.pad_w = 1;
  g.in_h = g.in_w = 4;
  return g;
}

/// The reference model with PEFT's base weights and every source adapter loaded under its name.
template <class T>
NetT<T> make_net() {
  st::File base(root + "/base.safetensors");
  Generator g(1);
  using N = NetT<T>;
  N n{decltype(N::emb)(Embedding<T>(7, 6, g), "emb"), decltype(N::lin0)(Linear<T>(6, 5, true, g), "lin0"),
      decltype(N::lin1)(Linear<T>(5, 4, true, g), "lin1"), decltype(N::conv)(Conv2d<T>(conv_geo(), true, g), "conv")};
  auto copy = [&](const std::string& key, MatrixView<T> dst) {
    REQUIRE(base.info(key).numel() == std::uint64_t(dst.size()));
    base.read_as<T>(key, std::span<T>(dst.data, std::size_t(dst.size())));
  };
  copy("emb.weight", n.emb.base().weight());
  copy("lin0.weight", n.lin0.base().weight());
  copy("lin0.bias", n.lin0.base().bias());
  copy("lin1.weight", n.lin1.base().weight());
  copy("lin1.bias", n.lin1.base().bias());
  copy("conv.weight", n.conv.base().weight());
  copy("conv.bias", n.conv.base().bias());
  for (const char* a : {"t1", "t2", "t3", "m2", "m4", "rs1", "rs2"}) io::load_pretrained(n, root + "/adapters/" + a, a);
  eval(n);
  return n;
}

template <class T>
std::pair<Mat<T>, Mat<T>> run(NetT<T>& n, const std::vector<std::int64_t>& ids, const Mat<T>& img) {
  const Index b = Index(ids.size());
  Mat<T> e(b, 6), h(b, 5), y(b, 4), yc(img.rows(), 3 * 16);
  auto ce = n.emb.make_context(b);
  n.emb.forward(ce, TokenIds(ids), e);
  auto c0 = n.lin0.make_context(b);
  n.lin0.forward(c0, e, h);
  h = h.cwiseMax(T(0));
  auto c1 = n.lin1.make_context(b);
  n.lin1.forward(c1, h, y);
  auto cc = n.conv.make_context(img.rows());
  n.conv.forward(cc, img, yc);
  return {y, yc};
}

CombineOptions options_from(const json& kw) {
  CombineOptions o;
  o.type = combination_from_string(kw.at("combination_type").get<std::string>());
  if (kw.contains("density")) o.density = kw["density"].get<double>();
  if (kw.contains("svd_rank")) o.svd_rank = kw["svd_rank"].get<int>();
  if (kw.contains("svd_clamp")) o.svd_clamp = kw["svd_clamp"].get<double>();
  if (kw.contains("majority_sign_method")) o.majority_sign_method = kw["majority_sign_method"] == "frequency" ? MajoritySign::frequency : MajoritySign::total;
  return o;
}

json load_json(const std::string& p) {
  std::ifstream in(p);
  return json::parse(in);
}

template <class L, class F>
void each_layer(NetT<L>& n, F&& f) {
  f(n.emb, "emb");
  f(n.lin0, "lin0");
  f(n.lin1, "lin1");
  f(n.conv, "conv");
}

}  // namespace

TEMPLATE_TEST_CASE("add_weighted_adapter reproduces PEFT for every combination type", "[combine][reference]", float, double) {
  using T = TestType;
  const json ref = load_json(root + "/reference.json");
  auto net = make_net<T>();
  const auto ids = ref.at("ids").get<std::vector<std::int64_t>>();
  const Mat<T> img = ref_tensor<T>(ref, "img", 2);
  double worst_delta = 0, worst_out = 0, worst_factor = 0;
  int cases = 0;
  for (const auto& item : ref.at("cases").items()) {
    const std::string name = item.key();
    const json& c = item.value();
    INFO("case " << name);
    const auto adapters = c.at("adapters").get<std::vector<std::string>>();
    const auto weights = c.at("weights").get<std::vector<double>>();
    const CombineOptions opt = options_from(c.at("kwargs"));
    const CombineResult res = add_weighted_adapter(net, adapters, weights, name, opt);
    CHECK(res.rank == c.at("r").get<int>());
    CHECK(res.config.r == c.at("r").get<int>());
    CHECK(res.config.lora_alpha == c.at("lora_alpha").get<double>());
    CHECK(res.config.use_rslora == c.at("use_rslora").get<bool>());
    std::vector<std::string> mods;
    for (const auto& mi : c.at("modules").items()) mods.push_back(mi.key());
    auto got = res.modules;
    std::sort(got.begin(), got.end());
    CHECK(got == mods);
    const bool svd = merging::is_svd(res.type);
    each_layer(net, [&](auto& layer, const std::string& path) {
      if (!c.at("modules").contains(path)) {
        CHECK(!layer.has_adapter(name));
        return;
      }
      INFO("module " << path);
      const json m{{"tensors", c["modules"][path]}};
      REQUIRE(layer.has_adapter(name));
      // not active, frozen (PEFT's _freeze_adapter)
      CHECK(std::find(layer.active_adapters().begin(), layer.active_adapters().end(), name) == layer.active_adapters().end());
      const auto& a = layer.template adapter<Lora>(name);
      CHECK(double(a.scaling) == Approx(c.at("scaling").at(path).get<double>()).epsilon(std::is_same_v<T, float> ? 1e-7 : 1e-12));
      if (opt.svd_clamp) return;  // sign-dependent: checked in its own test case
      const Mat<T> dref = ref_tensor<T>(m, "delta");
      Mat<T> d(layer.base().weight().rows, layer.base().weight().cols);
      REQUIRE(d.size() == dref.size());
      layer.delta_weight(name, d);
      const double e = scaled_diff(d, Eigen::Map<const Mat<T>>(dref.data(), d.rows(), d.cols()));
      worst_delta = std::max(worst_delta, e);
      CHECK(e < 2e-5);
      const Mat<T> A = ref_tensor<T>(m, "A"), B = ref_tensor<T>(m, "B");
      REQUIRE(a.r * a.in == A.size());
      REQUIRE(a.out * a.r == B.size());
      if (!svd) {  // no sign ambiguity: the factors themselves agree
        const double ea = scaled_diff(as_mat(ConstMatrixView<T>(a.A())), Eigen::Map<const Mat<T>>(A.data(), a.r, a.in));
        const double eb = scaled_diff(as_mat(ConstMatrixView<T>(a.B())), Eigen::Map<const Mat<T>>(B.data(), a.out, a.r));
        worst_factor = std::max({worst_factor, ea, eb});
        CHECK(ea < 2e-5);
        CHECK(eb < 2e-5);
      }
    });
    if (opt.svd_clamp) continue;
    set_adapter(net, name);
    const auto [y, yc] = run(net, ids, img);
    const json outs{{"tensors", c.at("outputs")}};
    const double eo = std::max(scaled_diff(y, ref_tensor<T>(outs, "y_mlp")), scaled_diff(yc, ref_tensor<T>(outs, "y_conv", 2)));
    worst_out = std::max(worst_out, eo);
    CHECK(eo < 2e-5);
    ++cases;
  }
  CHECK(cases == 19);  // and svd_rank2_clamp, in the next test case
  WARN("PEFT vs peft++ (" << (sizeof(T) == 4 ? "float" : "double") << "): worst scaled difference: delta weights " << worst_delta << ", factors (non-SVD types) "
                          << worst_factor << ", outputs " << worst_out);
}

TEST_CASE("add_weighted_adapter: svd_clamp equals PEFT's once the SVD signs agree", "[combine][reference]") {
  // PEFT's clamp threshold is a quantile of the *signed* factor entries, so it depends on LAPACK's sign
  // choice. Take peft++'s unclamped rank-2 factors, give each singular pair the sign of PEFT's unclamped
  // factors (case svd_rank2), clamp, and compare with PEFT's clamped factors (case svd_rank2_clamp).
  const json ref = load_json(root + "/reference.json");
  auto net = make_net<double>();
  CombineOptions o;
  o.type = Combination::svd;
  o.svd_rank = 2;
  add_weighted_adapter(net, {"t1", "t2", "t3"}, {1.0, 0.6, -0.4}, "r2", o);
  double worst = 0;
  int flips = 0;
  each_layer(net, [&](auto& layer, const std::string& path) {
    INFO(path);
    const auto& a = layer.template adapter<Lora>("r2");
    merging::Mat A = as_mat(ConstMatrixView<double>(a.A())), B = as_mat(ConstMatrixView<double>(a.B()));
    const json un{{"tensors", ref["cases"]["svd_rank2"]["modules"][path]}}, cl{{"tensors", ref["cases"]["svd_rank2_clamp"]["modules"][path]}};
    const Mat<double> pa = ref_tensor<double>(un, "A"), pb = ref_tensor<double>(un, "B");
    for (Index k = 0; k < 2; ++k)
      if (A.row(k).dot(pa.row(k)) < 0) {
        A.row(k) *= -1;
        B.col(k) *= -1;
        ++flips;
      }
    CHECK(scaled_diff(A, pa) < 2e-5);  // the unclamped factors agree once signs are aligned
    CHECK(scaled_diff(B, Eigen::Map<const Mat<double>>(pb.data(), B.rows(), 2)) < 2e-5);
    merging::clamp_factors(A, B, 0.9);
    const Mat<double> ca = ref_tensor<double>(cl, "A"), cb = ref_tensor<double>(cl, "B");
    const double e = std::max(scaled_diff(A, ca), scaled_diff(B, Eigen::Map<const Mat<double>>(cb.data(), B.rows(), 2)));
    worst = std::max(worst, e);
    CHECK(e < 2e-5);
  });
  WARN("svd_clamp after sign alignment: worst scaled difference " << worst << " (" << flips << " of 8 singular pairs had the other sign)");
  // and the clamp is applied by add_weighted_adapter: the clamped factors stay within [-q, q]
  o.svd_clamp = 0.9;
  add_weighted_adapter(net, {"t1", "t2", "t3"}, {1.0, 0.6, -0.4}, "r2c", o);
  const auto& a = net.lin0.adapter<Lora>("r2c");
  const double hi = std::max(as_mat(ConstMatrixView<double>(a.A())).maxCoeff(), as_mat(ConstMatrixView<double>(a.B())).maxCoeff());
  const double lo = std::min(as_mat(ConstMatrixView<double>(a.A())).minCoeff(), as_mat(ConstMatrixView<double>(a.B())).minCoeff());
  CHECK(lo >= -hi - 1e-15);
}

TEST_CASE("add_weighted_adapter: quirks kept from PEFT", "[combine]") {
  auto net = make_net<double>();
  // linear combines A and B separately: B·A has cross terms, unlike cat (exact)
  CombineOptions lin;
  lin.type = Combination::linear;
  add_weighted_adapter(net, {"t1", "t2"}, {1.0, 1.0}, "lin", lin);
  CombineOptions cat;
  cat.type = Combination::cat;
  add_weighted_adapter(net, {"t1", "t2"}, {1.0, 1.0}, "cat", cat);
  Mat<double> dl(5, 6), dc(5, 6), d1(5, 6), d2(5, 6);
  net.lin0.delta_weight("lin", dl);
  net.lin0.delta_weight("cat", dc);
  net.lin0.delta_weight("t1", d1);
  net.lin0.delta_weight("t2", d2);
  CHECK(max_abs_diff(dc, d1 + d2) < 1e-12);
  CHECK(max_abs_diff(dl, d1 + d2) > 1e-2);
  // with one adapter, every type is linear (PEFT's rule): new rank = that adapter's, density ignored
  CombineOptions one;
  one.type = Combination::ties_svd;
  one.svd_rank = 1;
  const auto r = add_weighted_adapter(net, {"t3"}, {2.0}, "one", one);
  CHECK(r.type == Combination::linear);
  CHECK(r.rank == 3);
  Mat<double> d3(5, 6), d1b(5, 6);
  net.lin0.delta_weight("t3", d3);
  net.lin0.delta_weight("one", d1b);
  CHECK(max_abs_diff(d1b, 2.0 * d3) < 1e-12);
  // rsLoRA: the new adapter keeps use_rslora with r = alpha, so its scaling is sqrt(r), not 1
  CombineOptions svd;
  svd.type = Combination::svd;
  const auto rs = add_weighted_adapter(net, {"rs1", "rs2"}, {1.0, 0.5}, "rs", svd);
  CHECK(rs.config.use_rslora);
  CHECK(net.lin0.adapter<Lora>("rs").scaling == Approx(std::sqrt(2.0)));
}

TEST_CASE("merge_utils pieces on hand-made numbers", "[combine]") {
  using merging::merge_tasks;
  {
    std::vector<double> t{0.5, -3, 2, 0.1, -0.2, 1};
    merging::prune_magnitude(t, 0.5);  // int(0.5 * 6) = 3 largest |t|
    CHECK(t == std::vector<double>{0, -3, 2, 0, 0, 1});
    std::vector<double> u{1, -1, 1, -1};
    merging::prune_magnitude(u, 0.5);  // ties in |t|: lower index first
    CHECK(u == std::vector<double>{1, -1, 0, 0});
    std::vector<double> z{1, 2};
    merging::prune_magnitude(z, 0.49);  // int(0.98) = 0: everything pruned
    CHECK(z == std::vector<double>{0, 0});
    std::vector<double> all{1, 2};
    merging::prune_magnitude(all, 1.5);
    CHECK(all == std::vector<double>{1, 2});
  }
  {
    // ties, no pruning: entry 0 signs (+, +, −) sum +: mean of the weighted positives; entry 1 total sum
    // −0.5 − 0.5 + 0.8 < 0 → −; frequency: two − → −; entry 2: all zero → 0
    CombineOptions o;
    o.density = 1.0;
    std::vector<std::vector<double>> t{{1, -0.5, 0}, {2, -0.5, 0}, {-4, 0.8, 0}};
    const std::vector<double> w{1, 2, 3};
    auto tt = t;
    const auto r = merge_tasks(Combination::ties, tt, w, o, 0);
    // total: 1 + 2 − 4 = −1 < 0 → sign −: only the third counts: 3·(−4) / 1
    CHECK(r[0] == Approx(-12.0));
    CHECK(r[1] == Approx((1 * -0.5 + 2 * -0.5) / 2));
    CHECK(r[2] == 0);
    o.majority_sign_method = MajoritySign::frequency;
    tt = t;
    const auto f = merge_tasks(Combination::ties, tt, w, o, 0);
    CHECK(f[0] == Approx((1 * 1 + 2 * 2) / 2.0));  // two + against one −
    CHECK(f[1] == Approx((1 * -0.5 + 2 * -0.5) / 2));
    tt = t;
    const auto l = merge_tasks(Combination::linear, tt, w, o, 0);
    CHECK(l[0] == Approx(1 + 4 - 12));
  }
  CHECK(merging::quantile({4, 1, 3, 2}, 0.5) == Approx(2.5));  // torch.quantile's linear interpolation
  CHECK(merging::quantile({1, 2, 3}, 1.0) == 3);
}

TEST_CASE("DARE: statistics and determinism of the random masks", "[combine]") {
  const std::size_t n = 200000;
  for (double density : {0.1, 0.5, 0.9}) {
    std::vector<double> t(n, 1.0);
    merging::prune_random(t, density, 7, 3);
    std::size_t kept = 0;
    double sum = 0;
    for (double v : t) {
      if (v != 0) {
        ++kept;
        CHECK(v == Approx(1.0 / density));  // survivors rescaled
      }
      sum += v;
    }
    const double frac = double(kept) / double(n), sigma = std::sqrt(density * (1 - density) / double(n));
    CHECK(std::abs(frac - density) < 5 * sigma);                       // kept fraction = density
    CHECK(std::abs(sum / double(n) - 1.0) < 5 * sigma / density);      // expectation preserved
    std::vector<double> again(n, 1.0), other(n, 1.0), stream(n, 1.0);
    merging::prune_random(again, density, 7, 3);
    merging::prune_random(other, density, 8, 3);
    merging::prune_random(stream, density, 7, 4);
    CHECK(again == t);
    CHECK(other != t);
    CHECK(stream != t);
  }
  // on a model: same seed, same adapter; another seed, another; density 1 = linear / ties exactly
  auto net = make_net<double>();
  CombineOptions o;
  o.type = Combination::dare_ties;
  o.density = 0.5;
  o.seed = 11;
  add_weighted_adapter(net, {"t1", "t2", "t3"}, {1, 1, 1}, "x1", o);
  add_weighted_adapter(net, {"t1", "t2", "t3"}, {1, 1, 1}, "x2", o);
  o.seed = 12;
  add_weighted_adapter(net, {"t1", "t2", "t3"}, {1, 1, 1}, "x3", o);
  Mat<double> a(5, 6), b(5, 6), c(5, 6), a0(4, 5), b0(4, 5);
  net.lin0.delta_weight("x1", a);
  net.lin0.delta_weight("x2", b);
  net.lin0.delta_weight("x3", c);
  CHECK(a == b);
  CHECK(a != c);
  net.lin1.delta_weight("x1", a0);  // layers draw different masks
  CHECK(a0.size() > 0);
  o.density = 1.0;
  add_weighted_adapter(net, {"t1", "t2", "t3"}, {1, 0.5, 2}, "dense_dare", o);
  o.type = Combination::ties;
  add_weighted_adapter(net, {"t1", "t2", "t3"}, {1, 0.5, 2}, "dense_ties", o);
  net.lin0.delta_weight("dense_dare", a);
  net.lin0.delta_weight("dense_ties", b);
  CHECK(a == b);
  // the A masks of one layer: about half of A's entries survive
  const auto& A = net.lin0.adapter<Lora>("x1");
  (void)A;
}

TEST_CASE("add_weighted_adapter: the exact option", "[combine]") {
  auto net = make_net<double>();
  CombineOptions o;
  o.exact = true;
  o.type = Combination::linear;
  const auto r = add_weighted_adapter(net, {"t1", "t2", "m4"}, {1.0, -0.5, 0.3}, "ex", o);
  CHECK(!r.config.use_rslora);
  each_layer(net, [&](auto& layer, const std::string& path) {
    INFO(path);
    const Index R = layer.base().weight().rows, C = layer.base().weight().cols;
    Mat<double> want = Mat<double>::Zero(R, C), d(R, C), got(R, C);
    int sum_r = 0;
    const std::vector<std::pair<std::string, double>> terms{{"t1", 1.0}, {"t2", -0.5}, {"m4", 0.3}};
    for (const auto& [n, w] : terms)
      if (layer.has_adapter(n)) {
        layer.delta_weight(n, d);
        want += w * d;
        sum_r += layer.template adapter<Lora>(n).r;
      }
    layer.delta_weight("ex", got);
    CHECK(max_abs_diff(got, want) < 1e-12);
    const auto& a = layer.template adapter<Lora>("ex");
    CHECK(a.r == std::min<int>({sum_r, int(a.in), int(a.out)}));
    CHECK(a.scaling == 1.0);
  });
  // a pruning type: the method on the delta weights, stored at full rank (ties_svd's delta, untruncated)
  o.type = Combination::ties;
  o.density = 0.5;
  add_weighted_adapter(net, {"t1", "t2", "t3"}, {1.0, 0.5, 2.0}, "ex_ties", o);
  const auto& a = net.lin0.adapter<Lora>("ex_ties");
  CHECK(a.r == 5);
  Mat<double> d1(5, 6), d2(5, 6), d3(5, 6), got(5, 6);
  net.lin0.delta_weight("t1", d1);
  net.lin0.delta_weight("t2", d2);
  net.lin0.delta_weight("t3", d3);
  std::vector<std::vector<double>> t{{d1.data(), d1.data() + 30}, {d2.data(), d2.data() + 30}, {d3.data(), d3.data() + 30}};
  const std::vector<double> w{1.0, 0.5, 2.0};
  const auto want = merging::merge_tasks(Combination::ties, t, w, o, 0);
  net.lin0.delta_weight("ex_ties", got);
  CHECK(max_abs_diff(got, Eigen::Map<const Mat<double>>(want.data(), 5, 6)) < 1e-12);
}

TEST_CASE("add_weighted_adapter: bad input is refused and changes nothing", "[combine]") {
  auto net = make_net<float>();
  auto names_before = [&] { return std::make_tuple(net.emb.adapter_names(), net.lin0.adapter_names(), net.lin1.adapter_names(), net.conv.adapter_names()); };
  const auto before = names_before();
  auto expect = [&]<class E>(std::type_identity<E>, std::vector<std::string> ads, std::vector<double> w, std::string name, CombineOptions o, std::string what) {
    try {
      add_weighted_adapter(net, ads, w, name, o);
      FAIL("no exception");
    } catch (const E& e) {
      CAPTURE(e.what());
      CHECK(std::string(e.what()).find(what) != std::string::npos);
    }
    CHECK(names_before() == before);
  };
  CombineOptions lin;
  lin.type = Combination::linear;
  expect(std::type_identity<AdapterError>{}, {"t1", "nope"}, {1, 1}, "x", lin, "adapter 'nope' does not exist");
  expect(std::type_identity<AdapterError>{}, {"t1", "t2"}, {1, 1}, "t3", lin, "'t3' already exists");
  expect(std::type_identity<ConfigError>{}, {"t1", "t2"}, {1}, "x", lin, "2 adapters but 1 weights");
  expect(std::type_identity<ConfigError>{}, {"t1", "m4"}, {1, 1}, "x", lin, "same r value");
  CombineOptions ties;
  ties.type = Combination::ties;
  expect(std::type_identity<ConfigError>{}, {"t1", "t2"}, {1, 1}, "x", ties, "needs a density");
  ties.density = -0.1;
  expect(std::type_identity<ConfigError>{}, {"t1", "t2"}, {1, 1}, "x", ties, "density must be >= 0");
  CombineOptions dare;
  dare.type = Combination::dare_linear;
  dare.density = 0;
  expect(std::type_identity<ConfigError>{}, {"t1", "t2"}, {1, 1}, "x", dare, "density 0");
  CombineOptions svd;
  svd.svd_rank = 4;  // conv's delta is [3, 18]
  expect(std::type_identity<ConfigError>{}, {"t1", "t2"}, {1, 1}, "x", svd, "layer 'conv': the SVD rank 4 is larger than min(out, in) = 3");
  CHECK_THROWS_WITH(combination_from_string("avg"), Catch::Contains("unknown combination type 'avg'") && Catch::Contains("magnitude_prune_svd"));

  // DoRA and lora_bias adapters, and adapters of another kind
  Generator g(3);
  Adapted<Linear<float>, Lora, Loha> l(Linear<float>(4, 3, true, g), "l");
  LoraConfig dora;
  dora.use_dora = true;
  l.add_adapter("d", dora, g);
  LoraConfig plain;
  l.add_adapter("p", plain, g);
  LohaConfig lo;
  l.add_adapter("h", lo, g);
  LoraConfig bias;
  bias.lora_bias = true;
  l.add_adapter("b", bias, g);
  CHECK_THROWS_WITH(add_weighted_adapter(l, {"p", "d"}, {1, 1}, "x", lin), Catch::Contains("'d' on layer 'l' uses DoRA"));
  CHECK_THROWS_WITH(add_weighted_adapter(l, {"p", "h"}, {1, 1}, "x", lin), Catch::Contains("'h' on layer 'l' is not a LoRA adapter"));
  CHECK_THROWS_WITH(add_weighted_adapter(l, {"p", "b"}, {1, 1}, "x", lin), Catch::Contains("lora_bias"));
  CHECK(l.adapter_names().size() == 4);
  // a single layer works too
  add_weighted_adapter(l, {"p"}, {2.0}, "x", lin);
  Mat<float> dp(3, 4), dx(3, 4);
  l.delta_weight("p", dp);
  l.delta_weight("x", dx);
  CHECK(max_abs_diff(dx, 2.0f * dp) < 1e-6);
}
