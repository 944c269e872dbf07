// The CP ("effective conv2d") forms of LoHa and LoKr on Conv2d (PEFT's use_effective_conv2d on kernels
// other than 1×1): gradients against finite differences (several geometries with stride, padding,
// dilation and non-square kernels; rank and module dropout with fixed masks; several adapters, CP beside the
// flat form; every init), PEFT's properties (identity at default init, delta = the CP formula, merged =
// unmerged, unmerge restores, 1×1 kernels and full LoKr blocks ignore the flag), the tensors PEFT creates
// for every recorded LoKr conv layer, and numbers from real Hugging Face PEFT 0.21.2
// (tests/reference/gen_cp_conv_reference.py: loha_conv2d_cp*, lokr_conv2d_cp*; and
// gen_adapters_reference.py's loha_conv2d_effective, lokr_conv2d_wide_effective).
#include <catch2/catch.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>

#include "conv_ref.hpp"
#include "layer_check.hpp"
#include "reference.hpp"

using namespace peft;
using namespace peft::test;
using json = nlohmann::json;

namespace {

template <class T>
using LohaConv = Adapted<Conv2d<T>, Loha>;
template <class T>
using LokrConv = Adapted<Conv2d<T>, Lokr>;

/// A geometry with separate height/width values: kernel (kh, kw), stride s, padding (ph, pw), dilation (dh, dw).
Conv2dGeometry geo2(Index c, Index o, Index kh, Index kw, Index s, Index ph, Index pw, Index dh, Index dw, Index h, Index w) {
  Conv2dGeometry g;
  g.in_channels = c;
  g.out_channels = o;
  g.kernel_h = kh;
  g.kernel_w = kw;
  g.stride_h = g.stride_w = s;
  g.pad_h = ph;
  g.pad_w = pw;
  g.dilation_h = dh;
  g.dilation_w = dw;
  g.in_h = h;
  g.in_w = w;
  return g;
}

/// The CP kernel written out from its definition, in double:
/// W[p, c·K + kk] = Σ_{i,j} a[i, p] · t[i, j·K + kk] · b[j, c]   (a [r, P], b [r, C], t [r, r·K]).
template <class A, class B, class Tt>
Mat<double> cp_kernel(const A& a_, const B& b_, const Tt& t_, Index K) {
  const Mat<double> a = as_mat(a_).template cast<double>(), b = as_mat(b_).template cast<double>(), t = as_mat(t_).template cast<double>();
  const Index r = a.rows(), P = a.cols(), C = b.cols();
  Mat<double> w = Mat<double>::Zero(P, C * K);
  for (Index p = 0; p < P; ++p)
    for (Index c = 0; c < C; ++c)
      for (Index kk = 0; kk < K; ++kk) {
        double acc = 0;
        for (Index i = 0; i < r; ++i)
          for (Index j = 0; j < r; ++j) acc += a(i, p) * t(i, j * K + kk) * b(j, c);
        w(p, c * K + kk) = acc;
      }
  return w;
}

/// LoHa (CP): s · K1 ⊙ K2.
template <class A>
Mat<double> loha_cp_delta(const A& a) {
  return double(a.scaling) * cp_kernel(a.hada_w1_a(), a.hada_w1_b(), a.hada_t1(), a.kernel)
                                 .cwiseProduct(cp_kernel(a.hada_w2_a(), a.hada_w2_b(), a.hada_t2(), a.kernel));
}

/// LoKr (CP w2): s · kron(w1, w2) with w2 = the CP kernel [out_k, in_n·K].
template <class A>
Mat<double> lokr_cp_delta(A& a) {
  auto d = [](auto v) { return as_mat(v).template cast<double>().eval(); };
  const Mat<double> w1 = a.layout.full_w1 ? d(a.lokr_w1()) : Mat<double>(d(a.lokr_w1_a()) * d(a.lokr_w1_b()));
  const Mat<double> w2 = cp_kernel(a.lokr_w2_a(), a.lokr_w2_b(), a.lokr_t2(), a.kernel());
  Mat<double> k(w1.rows() * w2.rows(), w1.cols() * w2.cols());
  for (Index i = 0; i < w1.rows(); ++i)
    for (Index j = 0; j < w1.cols(); ++j) k.block(i * w2.rows(), j * w2.cols(), w2.rows(), w2.cols()) = w1(i, j) * w2;
  return double(a.scaling) * k;
}

template <class L>
Mat<typename L::scalar> run_forward(L& l, const Mat<typename L::scalar>& x, std::uint64_t seed = 5) {
  Mat<typename L::scalar> y(x.rows(), l.out_features());
  auto ctx = l.make_context(x.rows());
  l.set_seed(seed);
  l.forward(ctx, x, y);
  return y;
}

LohaConfig loha_cp(int r, double alpha) {
  LohaConfig c;
  c.r = r;
  c.alpha = alpha;
  c.use_effective_conv2d = true;
  c.init_weights = false;
  return c;
}
LokrConfig lokr_cp(int r, double alpha, bool both = false, LokrInit init = LokrInit::off) {
  LokrConfig c;
  c.r = r;
  c.alpha = alpha;
  c.decompose_both = both;
  c.use_effective_conv2d = true;
  c.init_weights = init;
  return c;
}

}  // namespace

// ---- finite differences ------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("loha cp conv2d: backward matches finite differences", "[loha][conv2d][cp][grad]", float, double) {
  using T = TestType;
  const std::vector<Conv2dGeometry> geos = {
      geo2(3, 4, 3, 3, 1, 1, 1, 1, 1, 5, 5),  // 'same' 3×3
      geo2(3, 4, 3, 3, 2, 0, 0, 1, 1, 7, 7),  // stride 2, no padding
      geo2(4, 5, 3, 2, 2, 1, 1, 1, 2, 7, 6),  // non-square kernel, stride 2, padding, dilation along w
      geo2(2, 3, 3, 3, 1, 2, 2, 2, 2, 5, 6),  // dilation 2, padding 2
      geo2(5, 2, 2, 2, 1, 0, 1, 1, 1, 4, 4),  // even kernel, asymmetric padding
  };
  for (const auto& g : geos) {
    CAPTURE(g.in_channels, g.out_channels, g.kernel_h, g.kernel_w, g.stride_h, g.pad_h, g.pad_w, g.dilation_h, g.dilation_w, g.in_h, g.in_w);
    for (int variant = 0; variant < 6; ++variant) {
      CAPTURE(variant);
      auto build = [&](auto tag) {
        using U = decltype(tag);
        Generator gen(3);
        LohaConv<U> l(Conv2d<U>(g, true, gen));
        LohaConfig c = loha_cp(3, 6);
        if (variant == 3) c.rank_dropout = 0.5;       // fixed mask per seed (layer_check reseeds every forward)
        if (variant == 4) c.module_dropout = 0.4, c.rank_dropout = 0.3;
        if (variant == 5) c.init_weights = true;      // PEFT's default: w2_b = 0, the identity
        l.add_adapter("default", c, gen);
        if (variant == 1) l.base().set_requires_grad(true);
        if (variant == 2) {  // a second CP adapter and a flat one, all active
          l.add_adapter("second", loha_cp(2, 3), gen);
          LohaConfig flat = loha_cp(2, 4);
          flat.use_effective_conv2d = false;
          l.add_adapter("flat", flat, gen);
          l.set_adapter(std::vector<std::string>{"default", "second", "flat"});
        }
        return l;
      };
      auto l = build(T{});
      auto twin = build(double{});
      REQUIRE(loha_adapter(l, "default").cp);
      if (variant == 2) REQUIRE(!loha_adapter(l, "flat").cp);
      check_layer_gradients(l, twin, 2);
    }
  }
}

TEMPLATE_TEST_CASE("lokr cp conv2d: backward matches finite differences", "[lokr][conv2d][cp][grad]", float, double) {
  using T = TestType;
  struct G {
    Conv2dGeometry geo;
    int r;
    bool both;  ///< decompose_both makes w1 low rank too for this geometry and r
  };
  const std::vector<G> geos = {
      {geo2(3, 4, 3, 3, 1, 1, 1, 1, 1, 5, 5), 1, false},   // w1 (2,1), CP w2 (2,3): r = 1
      {geo2(6, 10, 3, 3, 2, 0, 0, 1, 1, 7, 7), 2, false},  // w1 (2,2), CP w2 (5,3) at r = 2
      {geo2(5, 6, 3, 2, 2, 1, 1, 1, 2, 7, 6), 2, false},   // non-square kernel, stride 2, dilation along w
      {geo2(8, 9, 2, 3, 1, 1, 0, 2, 1, 5, 5), 1, true},    // w1 (3,2) low rank with decompose_both, dilation along h
      {geo2(4, 6, 3, 3, 1, 2, 2, 2, 2, 6, 6), 1, false},   // dilation 2, padding 2
  };
  for (const auto& gc : geos) {
    const auto& g = gc.geo;
    CAPTURE(g.in_channels, g.out_channels, g.kernel_h, g.kernel_w, g.stride_h, g.pad_h, g.pad_w, g.dilation_h, g.dilation_w, gc.r, gc.both);
    for (int variant = 0; variant < 7; ++variant) {
      CAPTURE(variant);
      auto build = [&](auto tag) {
        using U = decltype(tag);
        Generator gen(4);
        LokrConv<U> l(Conv2d<U>(g, true, gen));
        LokrConfig c = lokr_cp(gc.r, 2.0 * gc.r + 1, gc.both);
        if (variant == 3) c.rank_dropout = 0.5, c.rank_dropout_scale = true;
        if (variant == 4) c.module_dropout = 0.4, c.rank_dropout = 0.3;
        if (variant == 5) c.init_weights = LokrInit::standard;  // w1 = 0
        if (variant == 6) c.init_weights = LokrInit::lycoris;   // w2_b = 0
        l.add_adapter("default", c, gen);
        if (variant == 1) l.base().set_requires_grad(true);
        if (variant == 2) {  // a second CP adapter (the other decompose_both) and a flat one
          l.add_adapter("second", lokr_cp(gc.r, 3.0, !gc.both), gen);
          LokrConfig flat = lokr_cp(gc.r, 2.0);
          flat.use_effective_conv2d = false;
          l.add_adapter("flat", flat, gen);
          l.set_adapter(std::vector<std::string>{"default", "second", "flat"});
        }
        return l;
      };
      auto l = build(T{});
      auto twin = build(double{});
      const auto& a = lokr_adapter(l, "default");
      REQUIRE(a.cp());
      REQUIRE(a.layout.full_w1 == !gc.both);
      if (variant == 2) REQUIRE(!lokr_adapter(l, "flat").cp());
      check_layer_gradients(l, twin, 2);
    }
  }
}

// ---- properties ----------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("loha cp conv2d: PEFT's properties", "[loha][conv2d][cp][props]", float, double) {
  using T = TestType;
  const Conv2dGeometry g = geo2(4, 5, 3, 2, 2, 1, 1, 1, 2, 7, 6);
  const Index K = 6;
  const Mat<T> x = random_mat<T>(3, g.in_size(), 21);
  Generator gen(4);
  Conv2d<T> plain(g, true, gen);
  Mat<T> y_base(3, g.out_size());
  {
    auto ctx = plain.make_context(3);
    plain.forward(ctx, x, y_base);
  }

  SECTION("default init is the identity exactly; PEFT's tensors, shapes, names and init ranges") {
    LohaConv<T> l(plain, "unet.conv_in");
    Generator g2(9);
    LohaConfig cfg;  // r = alpha = 8, init_weights = true
    cfg.use_effective_conv2d = true;
    l.add_adapter("default", cfg, g2);
    CHECK(run_forward(l, x) == y_base);
    const auto& a = loha_adapter(l, "default");
    REQUIRE(a.cp);
    CHECK(a.kernel == K);
    CHECK(a.channels == 4);
    CHECK(a.rows == 5);
    CHECK(a.cols == 4 * K);
    CHECK(a.scaling == T(1));
    CHECK(as_mat(a.hada_w2_b()).cwiseAbs().maxCoeff() == T(0));
    struct R {
      ConstMatrixView<T> v;
      Index rows, cols;
      double bound;
    };
    for (const R& e : {R{a.hada_w1_a(), 8, 5, 1 / std::sqrt(5.0)}, R{a.hada_w1_b(), 8, 4, 1 / std::sqrt(4.0)},
                       R{a.hada_w2_a(), 8, 5, 1 / std::sqrt(5.0)}, R{a.hada_t1(), 8, 8 * K, 1 / std::sqrt(8.0 * K)},
                       R{a.hada_t2(), 8, 8 * K, 1 / std::sqrt(8.0 * K)}}) {
      CHECK(e.v.rows == e.rows);
      CHECK(e.v.cols == e.cols);
      const double m = double(as_mat(e.v).cwiseAbs().maxCoeff());
      CHECK(m <= e.bound);
      CHECK(m > 0.5 * e.bound);
    }
    Mat<T> delta(5, 4 * K);
    l.delta_weight("default", delta);
    CHECK(delta.cwiseAbs().maxCoeff() == T(0));
    std::vector<std::string> names;
    std::vector<std::size_t> sizes;
    l.visit_parameters([&](ParamRef<T> p) { names.push_back(p.name), sizes.push_back(p.size); });
    CHECK(names == std::vector<std::string>{"weight", "bias", "hada_w1_a.default", "hada_w1_b.default", "hada_w2_a.default",
                                            "hada_w2_b.default", "hada_t1.default", "hada_t2.default"});
    CHECK(sizes == std::vector<std::size_t>{std::size_t(5 * 4 * K), 5, 40, 32, 40, 32, std::size_t(64 * K), std::size_t(64 * K)});
  }
  SECTION("delta is s·K1⊙K2 (the CP formula written out); y − base = conv(x, ΔW); merge = unmerged; unmerge restores") {
    LohaConv<T> l(plain);
    Generator g2(9);
    l.add_adapter("default", loha_cp(3, 12), g2);
    l.eval();
    const Mat<T> y = run_forward(l, x);
    CHECK(max_abs_diff(y, y_base) > 1e-3);
    Mat<T> delta(5, 4 * K);
    l.delta_weight("default", delta);
    CHECK(max_abs_diff(delta, loha_cp_delta(loha_adapter(l, "default"))) < 10 * value_tol<T>());
    const Mat<double> dconv = direct_conv(g, x.template cast<double>(), delta.template cast<double>(), Mat<double>());
    CHECK(max_abs_diff(y - y_base, dconv) < 50 * value_tol<T>());
    const Mat<T> w0 = as_mat(l.base().weight()), b0 = as_mat(l.base().bias());
    l.merge();
    CHECK(max_abs_diff(as_mat(l.base().weight()), (w0 + delta).eval()) < 10 * value_tol<T>());
    CHECK(as_mat(l.base().bias()) == b0);
    CHECK(max_abs_diff(run_forward(l, x), y) < 100 * value_tol<T>());
    l.unmerge();
    CHECK(max_abs_diff(as_mat(l.base().weight()), w0) < 10 * value_tol<T>());
    Conv2d<T> merged = std::move(l).merge_and_unload();
    Mat<T> ym(3, g.out_size());
    auto ctx = merged.make_context(3);
    merged.forward(ctx, x, ym);
    CHECK(max_abs_diff(ym, y) < 100 * value_tol<T>());
  }
  SECTION("rank dropout masks whole output channels of ΔW (rescaled by 1/mean); module dropout skips the adapter") {
    LohaConfig cfg = loha_cp(2, 6);
    cfg.rank_dropout = 0.5;
    LohaConv<T> l(plain);
    Generator g2(17);
    l.add_adapter("default", cfg, g2);
    Mat<T> delta(5, 4 * K);
    l.delta_weight("default", delta);
    auto ctx = l.make_context(3);
    Mat<T> y(3, g.out_size());
    int patterns = 0;
    for (std::uint64_t seed = 1; seed <= 6; ++seed) {
      l.set_seed(seed);
      l.forward(ctx, x, y);
      const auto& mask = std::get<0>(ctx.banks).slots[0].mask;
      int kept = 0;
      for (Index i = 0; i < 5; ++i) kept += mask[std::size_t(i)] != T(0);
      patterns += kept > 0 && kept < 5;
      Mat<double> masked = delta.template cast<double>();
      for (Index i = 0; i < 5; ++i) {
        const double v = double(mask[std::size_t(i)]);
        CHECK((v == 0.0 || std::abs(v - 5.0 / kept) < 1e-6));
        masked.row(i) *= v;
      }
      CHECK(max_abs_diff(y - y_base, direct_conv(g, x.template cast<double>(), masked, Mat<double>())) < 50 * value_tol<T>());
    }
    CHECK(patterns >= 3);

    LohaConfig md = loha_cp(2, 6);
    md.module_dropout = 0.5;
    LohaConv<T> m(plain);
    m.add_adapter("default", md, g2);
    std::uint64_t seed = 0;
    while (run_forward(m, x, seed) != y_base) ++seed;  // a forward that skipped the adapter
    auto mctx = m.make_context(3);
    m.set_seed(seed);
    m.forward(mctx, x, y);
    REQUIRE(y == y_base);
    auto& a = loha_adapter(m, "default");
    for (auto* gb : {&a.grad_w1a, &a.grad_w1b, &a.grad_w2a, &a.grad_w2b, &a.grad_t1, &a.grad_t2})
      for (std::size_t i = 0; i < gb->size(); ++i) (*gb)[i] = nan<T>();
    Mat<T> dx(3, g.in_size());
    m.backward(mctx, random_mat<T>(3, g.out_size(), 3), dx, GradMode::overwrite);
    for (auto* gb : {&a.grad_w1a, &a.grad_w1b, &a.grad_w2a, &a.grad_w2b, &a.grad_t1, &a.grad_t2})
      for (std::size_t i = 0; i < gb->size(); ++i) CHECK((*gb)[i] == T(0));
  }
  SECTION("a 1×1 kernel ignores use_effective_conv2d (PEFT's rule): the flat factors") {
    Generator g2(1);
    LohaConv<T> one(Conv2d<T>(geo2(3, 4, 1, 1, 1, 0, 0, 1, 1, 5, 5), true, g2));
    one.add_adapter("default", loha_cp(2, 4), g2);
    const auto& a = loha_adapter(one, "default");
    CHECK(!a.cp);
    CHECK(a.hada_w1_a().rows == 4);  // [out, r]
    CHECK(a.hada_t1().empty());
    std::size_t n = 0;
    one.visit_parameters([&](ParamRef<T>) { ++n; });
    CHECK(n == 6);  // weight, bias and the four factors
  }
}

TEMPLATE_TEST_CASE("lokr cp conv2d: PEFT's properties", "[lokr][conv2d][cp][props]", float, double) {
  using T = TestType;
  const Conv2dGeometry g = geo2(8, 9, 2, 3, 2, 1, 1, 1, 1, 5, 5);
  const Index K = 6;
  const Mat<T> x = random_mat<T>(3, g.in_size(), 22);
  Generator gen(4);
  Conv2d<T> plain(g, true, gen);
  Mat<T> y_base(3, g.out_size());
  {
    auto ctx = plain.make_context(3);
    plain.forward(ctx, x, y_base);
  }

  SECTION("standard and lycoris init are the identity exactly, 'off' is not; PEFT's tensors, shapes and init ranges") {
    for (bool both : {false, true}) {
      for (LokrInit init : {LokrInit::standard, LokrInit::lycoris, LokrInit::off}) {
        CAPTURE(both, int(init));
        LokrConv<T> l(plain);
        Generator g2(9);
        l.add_adapter("default", lokr_cp(1, 2, both, init), g2);
        const auto& a = lokr_adapter(l, "default");
        REQUIRE(a.cp());
        if (init == LokrInit::off) {
          CHECK(max_abs_diff(run_forward(l, x), y_base) > 1e-3);
        } else {
          CHECK(run_forward(l, x) == y_base);
        }
        // w2: lokr_w2_a (r, out_k) = (1, 3), lokr_w2_b (r, in_n) = (1, 4), lokr_t2 (r, r, kh, kw) = (1, 1, 2, 3)
        CHECK(a.lokr_w2_a().rows == 1);
        CHECK(a.lokr_w2_a().cols == 3);
        CHECK(a.lokr_w2_b().cols == 4);
        CHECK(a.lokr_t2().cols == K);
        const double w2a = double(as_mat(a.lokr_w2_a()).cwiseAbs().maxCoeff()), w2b = double(as_mat(a.lokr_w2_b()).cwiseAbs().maxCoeff());
        const double t2 = double(as_mat(a.lokr_t2()).cwiseAbs().maxCoeff());
        CHECK(w2a <= 1 / std::sqrt(3.0));
        CHECK(w2a > 0);
        CHECK(t2 <= 1 / std::sqrt(1.0 * K));
        CHECK(t2 > 0.3 / std::sqrt(1.0 * K));
        CHECK((w2b == 0.0) == (init == LokrInit::lycoris));
        if (w2b > 0) CHECK(w2b <= 1 / std::sqrt(4.0));
        std::vector<std::string> names;
        l.visit_parameters([&](ParamRef<T> p) { names.push_back(p.name); });
        if (both)
          CHECK(names == std::vector<std::string>{"weight", "bias", "lokr_w1_a.default", "lokr_w1_b.default", "lokr_w2_a.default",
                                                  "lokr_w2_b.default", "lokr_t2.default"});
        else
          CHECK(names == std::vector<std::string>{"weight", "bias", "lokr_w1.default", "lokr_w2_a.default", "lokr_w2_b.default",
                                                  "lokr_t2.default"});
      }
    }
  }
  SECTION("delta is s·kron(w1, CP w2); y − base = conv(x, ΔW); merge = unmerged; unmerge restores") {
    for (bool both : {false, true}) {
      CAPTURE(both);
      LokrConv<T> l(plain);
      Generator g2(5);
      l.add_adapter("default", lokr_cp(1, 3, both), g2);
      l.eval();
      const Mat<T> y = run_forward(l, x);
      CHECK(max_abs_diff(y, y_base) > 1e-3);
      Mat<T> delta(9, 8 * K);
      l.delta_weight("default", delta);
      CHECK(max_abs_diff(delta, lokr_cp_delta(lokr_adapter(l, "default"))) < 10 * value_tol<T>());
      CHECK(max_abs_diff(y - y_base, direct_conv(g, x.template cast<double>(), delta.template cast<double>(), Mat<double>())) <
            50 * value_tol<T>());
      const Mat<T> w0 = as_mat(l.base().weight()), b0 = as_mat(l.base().bias());
      l.merge();
      CHECK(max_abs_diff(as_mat(l.base().weight()), (w0 + delta).eval()) < 10 * value_tol<T>());
      CHECK(as_mat(l.base().bias()) == b0);
      CHECK(max_abs_diff(run_forward(l, x), y) < 100 * value_tol<T>());
      l.unmerge();
      CHECK(max_abs_diff(as_mat(l.base().weight()), w0) < 10 * value_tol<T>());
    }
  }
  SECTION("rank dropout without rank_dropout_scale keeps the kept channels as they are") {
    LokrConfig cfg = lokr_cp(1, 3);
    cfg.rank_dropout = 0.5;
    LokrConv<T> l(plain);
    Generator g2(17);
    l.add_adapter("default", cfg, g2);
    Mat<T> delta(9, 8 * K);
    l.delta_weight("default", delta);
    auto ctx = l.make_context(3);
    Mat<T> y(3, g.out_size());
    l.set_seed(2);
    l.forward(ctx, x, y);
    const auto& mask = std::get<0>(ctx.banks).slots[0].mask;
    Mat<double> masked = delta.template cast<double>();
    int kept = 0;
    for (Index i = 0; i < 9; ++i) {
      const double v = double(mask[std::size_t(i)]);
      CHECK((v == 0.0 || v == 1.0));
      kept += v != 0.0;
      masked.row(i) *= v;
    }
    CHECK(kept > 0);
    CHECK(kept < 9);
    CHECK(max_abs_diff(y - y_base, direct_conv(g, x.template cast<double>(), masked, Mat<double>())) < 50 * value_tol<T>());
  }
  SECTION("the flag changes nothing where PEFT ignores it: full w2, or a 1×1 kernel") {
    Generator g2(1);
    LokrConv<T> full(plain);
    full.add_adapter("default", lokr_cp(4, 4), g2);  // 4 >= max(3, 4)/2: lokr_w2 (3, 4, 2, 3)
    CHECK(!lokr_adapter(full, "default").cp());
    CHECK(lokr_adapter(full, "default").layout.full_w2);
    CHECK(lokr_adapter(full, "default").lokr_t2().empty());
    LokrConv<T> one(Conv2d<T>(geo2(8, 9, 1, 1, 1, 0, 0, 1, 1, 3, 3), true, g2));
    one.add_adapter("default", lokr_cp(1, 2), g2);
    const auto& a = lokr_adapter(one, "default");
    CHECK(!a.cp());
    CHECK(!a.layout.full_w2);
    CHECK(a.lokr_w2_a().rows == 3);  // flat form: [out_k, r]
  }
}

TEST_CASE("lokr: the Conv2d bank allocates exactly PEFT's tensors for every recorded conv layer", "[lokr][conv2d][cp][layout]") {
  const json j = load_reference("lokr_factorization.json");
  std::size_t n = 0, cp = 0;
  for (const auto& e : j.at("shapes")) {
    if (e.at("layer") != "conv2d") continue;
    const Index out = e.at("out").get<Index>(), in = e.at("in").get<Index>();
    const Index kh = e.at("kernel")[0].get<Index>(), kw = e.at("kernel")[1].get<Index>();
    if (out * in * kh * kw > 1'000'000) continue;  // keep the test light (the layout itself is checked in test_lokr)
    CAPTURE(e.dump());
    Generator g(1);
    LokrConv<float> layer(Conv2d<float>(geo2(in, out, kh, kw, 1, 0, 0, 1, 1, kh, kw), false, g));
    LokrConfig cfg;
    cfg.r = e.at("r");
    cfg.decompose_both = e.at("decompose_both");
    cfg.decompose_factor = e.at("decompose_factor");
    cfg.use_effective_conv2d = e.at("use_effective_conv2d");
    layer.add_adapter("default", cfg, g);
    std::map<std::string, std::size_t> sizes, expect;
    layer.visit_parameters([&](ParamRef<float> p) { if (p.name != "weight") sizes[p.name] = p.size; });
    for (const auto& [name, shape] : e.at("tensors").items()) {
      std::size_t s = 1;
      for (const auto& d : shape) s *= d.get<std::size_t>();
      expect[name + ".default"] = s;
    }
    CHECK(sizes == expect);
    cp += expect.count("lokr_t2.default");
    ++n;
  }
  CHECK(n >= 20);
  CHECK(cp >= 4);
}

// ---- real PEFT numbers ---------------------------------------------------------------------------------

namespace {

Conv2dGeometry geometry_of(const json& j) {
  const auto& b = j.at("base_layer");
  const auto xs = b.at("x_shape").get<std::vector<Index>>();
  Conv2dGeometry g;
  g.in_channels = b.at("in_channels");
  g.out_channels = b.at("out_channels");
  g.kernel_h = b.at("kernel_size")[0];
  g.kernel_w = b.at("kernel_size")[1];
  g.stride_h = b.at("stride")[0];
  g.stride_w = b.at("stride")[1];
  g.pad_h = b.at("padding")[0];
  g.pad_w = b.at("padding")[1];
  g.dilation_h = b.at("dilation")[0];
  g.dilation_w = b.at("dilation")[1];
  g.in_h = xs[2];
  g.in_w = xs[3];
  REQUIRE(b.at("groups") == 1);
  return g;
}

LohaConfig config_from(const json& c, Loha) {
  LohaConfig cfg;
  cfg.r = c.at("r");
  cfg.alpha = c.at("alpha");
  cfg.rank_dropout = c.at("rank_dropout");
  cfg.module_dropout = c.at("module_dropout");
  cfg.use_effective_conv2d = c.at("use_effective_conv2d");
  cfg.init_weights = c.at("init_weights").get<bool>();
  return cfg;
}
LokrConfig config_from(const json& c, Lokr) {
  LokrConfig cfg;
  cfg.r = c.at("r");
  cfg.alpha = c.at("alpha");
  cfg.rank_dropout = c.at("rank_dropout");
  cfg.module_dropout = c.at("module_dropout");
  cfg.use_effective_conv2d = c.at("use_effective_conv2d");
  cfg.decompose_both = c.at("decompose_both");
  cfg.decompose_factor = c.at("decompose_factor");
  cfg.rank_dropout_scale = c.at("rank_dropout_scale");
  cfg.init_weights = c.at("init_weights").get<bool>() ? LokrInit::standard : LokrInit::off;
  return cfg;
}

/// Loads PEFT's base and adapter tensors into a peft++ layer and compares out, grad.x, every parameter
/// gradient (the exact one where PEFT's is wrong), delta, the disabled output, the merged weight, bias and
/// output, and the weight after unmerge. Returns the worst scaled error.
template <class T, class Kind>
double check_cp_reference(const std::string& file) {
  INFO("reference file " << file);
  const json j = load_reference(file);
  const double tol = reference_tol<T>();
  const std::string lname = j.at("layer");
  const Conv2dGeometry geo = geometry_of(j);
  Generator gen(0);
  Adapted<Conv2d<T>, Kind> l(Conv2d<T>(geo, true, gen), lname);
  as_mat(l.base().weight()) = ref_tensor<T>(j, lname + ".weight");
  as_mat(l.base().bias()) = ref_tensor<T>(j, lname + ".bias");
  l.add_adapter("default", config_from(j.at("config").at("default"), Kind{}), gen);
  CHECK(double(l.template adapter<Kind>("default").scaling) == Approx(j.at("scaling").at("default").at(lname).get<double>()));
  std::vector<std::string> names;
  l.visit_parameters([&](ParamRef<T> p) {
    if (!p.trainable) return;
    names.push_back(lname + "." + p.name.substr(0, p.name.rfind('.')));
    const Mat<T> v = ref_tensor<T>(j, names.back());
    REQUIRE(std::size_t(v.size()) == p.size);
    std::copy(v.data(), v.data() + v.size(), p.value);
  });
  std::sort(names.begin(), names.end());
  CHECK(names == j.at("trainable").get<std::vector<std::string>>());  // exactly PEFT's tensors (the file lists them sorted)
  l.eval();
  double worst = 0;
  auto cmp = [&](const std::string& what, const auto& ours, const Mat<T>& theirs) {
    const double e = scaled_diff(ours, theirs);
    INFO(what << ": scaled error " << e);
    CHECK(e < tol);
    worst = std::max(worst, e);
  };
  const Mat<T> x = ref_tensor<T>(j, "x", 2), g = ref_tensor<T>(j, "grad_out", 2);
  REQUIRE(x.cols() == geo.in_size());
  REQUIRE(g.cols() == geo.out_size());
  auto ctx = l.make_context(x.rows());
  Mat<T> y(x.rows(), geo.out_size()), dx(x.rows(), geo.in_size());
  l.forward(ctx, x, y);
  l.backward(ctx, g, dx, GradMode::overwrite);
  cmp("out", y, ref_tensor<T>(j, "out", 2));
  cmp("grad.x", dx, ref_tensor<T>(j, "grad.x", 2));
  const auto& tensors = j.at("tensors");
  l.visit_parameters([&](ParamRef<T> p) {
    if (!p.trainable) return;
    const std::string n = lname + "." + p.name.substr(0, p.name.rfind('.'));
    const bool peft_wrong = tensors.contains("grad_exact." + n);  // PEFT 0.21.2's LoHa CP bug (hada_w1_a, hada_w2_a)
    const Mat<T> expect = ref_tensor<T>(j, (peft_wrong ? "grad_exact." : "grad.") + n);
    REQUIRE(std::size_t(expect.size()) == p.size);
    const Eigen::Map<const Mat<T>> ours(p.grad, expect.rows(), expect.cols());
    cmp((peft_wrong ? "grad_exact." : "grad.") + n, ours, expect);
    if (peft_wrong) CHECK(scaled_diff(ours, ref_tensor<T>(j, "grad." + n)) > 1e-4);  // and not PEFT's wrong value
  });
  Mat<T> delta(geo.out_channels, geo.patch());
  l.delta_weight("default", delta);
  cmp("delta", delta, ref_tensor<T>(j, "delta." + lname));
  l.disable_adapters();
  l.forward(ctx, x, y);
  cmp("base_out", y, ref_tensor<T>(j, "base_out", 2));
  l.enable_adapters();
  l.merge();
  cmp("merged weight", as_mat(l.base().weight()), ref_tensor<T>(j, "merged." + lname + ".weight"));
  cmp("merged bias", as_mat(l.base().bias()), ref_tensor<T>(j, "merged." + lname + ".bias"));
  l.forward(ctx, x, y);
  cmp("merged_out", y, ref_tensor<T>(j, "merged_out", 2));
  l.unmerge();
  cmp("unmerged weight", as_mat(l.base().weight()), ref_tensor<T>(j, lname + ".weight"));
  if (std::getenv("PEFT_PRINT_ERRORS")) std::printf("%s: worst scaled error vs PEFT %.3g\n", file.c_str(), worst);
  return worst;
}

}  // namespace

TEMPLATE_TEST_CASE("reference: LoHa and LoKr CP conv2d match Hugging Face PEFT", "[reference][loha][lokr][conv2d][cp]", float, double) {
  using T = TestType;
  const std::string sfx = std::is_same_v<T, float> ? "_f32.json" : "_f64.json";
  for (const char* f : {"loha_conv2d_cp", "loha_conv2d_cp_s2", "loha_conv2d_effective"}) check_cp_reference<T, Loha>(f + sfx);
  for (const char* f : {"lokr_conv2d_cp", "lokr_conv2d_cp_both", "lokr_conv2d_wide_effective"}) check_cp_reference<T, Lokr>(f + sfx);
}
