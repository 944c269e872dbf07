// peft++ — LoKr (low-rank Kronecker product; LyCORIS), as Hugging Face PEFT 0.21 implements it
// (peft/tuners/lokr/layer.py), on Linear and Conv2d base layers.
//
//   (out_l, out_k) = factorization(out, f)    (in_m, in_n) = factorization(in, f)    f = decompose_factor
//   w1 = lokr_w1 [out_l, in_m]   or  lokr_w1_a [out_l, r] · lokr_w1_b [r, in_m]   (only with decompose_both)
//   w2 = lokr_w2 [out_k, in_n]   or  lokr_w2_a [out_k, r] · lokr_w2_b [r, in_n]
//   ΔW = s · kron(w1, w2),  ΔW[i·out_k + p, j·in_n + q] = s · w1[i, j] · w2[p, q],   s = alpha / r
//   y  = base(x) + x ΔWᵀ      (ΔW materialised in the context every forward, as PEFT; s applies even when
//                              both blocks are full matrices)
//
// Train mode only: rank_dropout zeroes whole rows of ΔW (rescaled by 1/mean(keep) only with
// rank_dropout_scale), module_dropout skips the adapter for one forward.
//
// Conv2d (PEFT's lokr.Conv2d): in = in_channels; w2 is [out_k, in_n, kh, kw] (full) or
// w2_a [out_k, r] · w2_b [r, in_n·kh·kw], i.e. a matrix [out_k, in_n·kh·kw], and ΔW = s · kron(w1, w2) is
// the kernel [O, C·kh·kw] (= torch.kron of w1 [out_l, in_m, 1, 1] with the 4-D w2). Forward and backward
// apply ΔW as a convolution (see detail::lycoris::DeltaOps). CP form (use_effective_conv2d, when w2 is
// low rank and the kernel is not 1×1): lokr_t2 [r, r, kh, kw], lokr_w2_a [r, out_k], lokr_w2_b [r, in_n],
//   w2[p, q, y, x] = Σ_{i,j} t2[i, j, y, x] · w2_a[i, p] · w2_b[j, q]        (detail::lycoris::Cp)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "peft/adapter/loha.hpp"  // detail::lycoris: patterns, validation, kaiming init, dropout masks
#include "peft/grad_mode.hpp"
#include "peft/layer/linear.hpp"
#include "peft/param.hpp"
#include "peft/rng.hpp"

namespace peft {

/// PEFT's `factorization(dimension, factor)` (from LyCORIS), reproduced exactly: two numbers whose
/// product is `dimension`. If `factor > 0` divides `dimension` the result is `(factor, dimension /
/// factor)` — *unsorted*, e.g. (8, 4) → (4, 2), despite PEFT's docstring. Otherwise the divisor pair
/// closest to √dimension with the smaller one ≤ factor (−1: no cap) is returned sorted, e.g.
/// (128, −1) → (8, 16), (30, 4) → (3, 10), (81, 2) → (1, 81). The first number goes to w1, the second to w2.
inline std::pair<Index, Index> lokr_factorization(Index dimension, Index factor = -1) {
  if (factor > 0 && dimension % factor == 0) return {factor, dimension / factor};
  if (factor == -1) factor = dimension;
  Index m = 1, n = dimension;
  const Index length = m + n;
  while (m < n) {
    Index new_m = m + 1;
    while (dimension % new_m != 0) ++new_m;
    const Index new_n = dimension / new_m;
    if (new_m + new_n > length || new_m > factor) break;
    m = new_m;
    n = new_n;
  }
  if (m > n) std::swap(m, n);
  return {m, n};
}

/// Which LoKr tensors PEFT creates for a layer, and their shapes (PEFT's update_layer /
/// create_adapter_parameters). `linear` is what LokrBank<Linear> uses; `conv2d` is here for the Conv2d
/// bank and checkpoint loaders.
struct LokrLayout {
  Index out_l = 1, out_k = 1;  ///< factorization(out): w1 rows, w2 rows
  Index in_m = 1, in_n = 1;    ///< factorization(in): w1 cols, w2 cols
  int r = 1;
  bool full_w1 = true;  ///< lokr_w1, else lokr_w1_a · lokr_w1_b
  bool full_w2 = true;  ///< lokr_w2, else lokr_w2_a · lokr_w2_b (or CP with lokr_t2)
  bool conv = false;
  Index kh = 1, kw = 1;    ///< conv kernel
  bool effective = false;  ///< conv CP form: lokr_t2 (r, r, kh, kw), w2_a (r, out_k), w2_b (r, in_n)

  static LokrLayout linear(Index out, Index in, int r, bool decompose_both, Index decompose_factor) {
    LokrLayout l;
    std::tie(l.in_m, l.in_n) = lokr_factorization(in, decompose_factor);
    std::tie(l.out_l, l.out_k) = lokr_factorization(out, decompose_factor);
    l.r = r;
    // PEFT: use_w1 = not (decompose_both and r < max(a, c) / 2); use_w2 = not (r < max(b, d) / 2) (real division)
    l.full_w1 = !(decompose_both && 2 * Index(r) < std::max(l.out_l, l.in_m));
    l.full_w2 = !(2 * Index(r) < std::max(l.out_k, l.in_n));
    return l;
  }
  /// `in` is in_channels / groups.
  static LokrLayout conv2d(Index out, Index in, Index kh, Index kw, int r, bool decompose_both, Index decompose_factor,
                           bool use_effective_conv2d) {
    LokrLayout l = linear(out, in, r, decompose_both, decompose_factor);
    l.conv = true;
    l.kh = kh;
    l.kw = kw;
    l.effective = use_effective_conv2d && !(kh == 1 && kw == 1) && !l.full_w2;
    return l;
  }

  /// PEFT's tensor names (without the adapter name) and shapes, in PEFT's order.
  std::vector<std::pair<std::string, std::vector<Index>>> tensors() const {
    std::vector<std::pair<std::string, std::vector<Index>>> t;
    if (full_w1) {
      t.push_back({"lokr_w1", {out_l, in_m}});
    } else {
      t.push_back({"lokr_w1_a", {out_l, r}});
      t.push_back({"lokr_w1_b", {r, in_m}});
    }
    if (full_w2) {
      if (conv) t.push_back({"lokr_w2", {out_k, in_n, kh, kw}});
      else t.push_back({"lokr_w2", {out_k, in_n}});
    } else if (effective) {
      t.push_back({"lokr_w2_a", {r, out_k}});
      t.push_back({"lokr_w2_b", {r, in_n}});
      t.push_back({"lokr_t2", {r, r, kh, kw}});
    } else {
      t.push_back({"lokr_w2_a", {out_k, r}});
      t.push_back({"lokr_w2_b", {r, conv ? in_n * kh * kw : in_n}});
    }
    return t;
  }
};

/// PEFT's `init_weights` for LoKr.
enum class LokrInit {
  standard,  ///< `True` (default): w1 (or w1_a) = 0, the rest kaiming-uniform(a=√5): the identity at start
  off,       ///< `False`: every tensor kaiming-uniform(a=√5)
  lycoris,   ///< `"lycoris"`: w2 (or w2_b) = 0, the rest kaiming-uniform(a=√5)
};

/// LoKr's configuration with PEFT's names and defaults (`LoKrConfig`).
struct LokrConfig {
  int r = 8;
  double alpha = 8;
  /// Train mode: each row of ΔW is zeroed with this probability (rescaled only with rank_dropout_scale).
  double rank_dropout = 0.0;
  /// Train mode: the whole adapter is skipped for one forward with this probability.
  double module_dropout = 0.0;
  /// Conv only (CP form of a low-rank w2); ignored on Linear, as in PEFT.
  bool use_effective_conv2d = false;
  /// Also factor w1 into w1_a · w1_b when r < max(out_l, in_m) / 2.
  bool decompose_both = false;
  /// The `factor` of `lokr_factorization`: −1 (default, split near √dim) or a positive number (used as is
  /// when it divides the dimension, otherwise as a cap on the smaller factor).
  int decompose_factor = -1;
  /// Rescale the kept rows by 1/mean(keep) under rank_dropout.
  bool rank_dropout_scale = false;
  LokrInit init_weights = LokrInit::standard;
  /// Per-module overrides (PEFT's rank_pattern / alpha_pattern), as LohaConfig.
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;

  /// PEFT's scaling: alpha / r (also when both blocks are full and r plays no other role).
  static double scaling_for(double alpha, int r) { return alpha / double(r); }

  /// The configuration for the module at `path` (patterns applied, then cleared); validates first.
  LokrConfig for_module(std::string_view path) const {
    validate();
    return detail::lycoris::resolve_patterns(*this, path);
  }

  /// Throws ConfigError naming the field for out-of-range values. PEFT accepts any decompose_factor and
  /// silently treats 0 and values below −1 as "no split" ((1, dim)); peft++ rejects them. A positive
  /// factor that does not divide the dimension is valid (PEFT uses it as a cap).
  void validate() const {
    detail::lycoris::validate_common(*this, "LokrConfig");
    if (decompose_factor == 0 || decompose_factor < -1)
      throw ConfigError(detail::cat("LokrConfig: decompose_factor must be -1 (automatic) or a positive integer, got ", decompose_factor));
  }
};



/// One LoKr adapter: its blocks (full or low-rank factors), their gradients and the scaling. ΔW is the
/// base weight as a matrix [rows, cols] = [out, in].
template <class T, class Backend>
struct LokrAdapter {
  template <class U>
  using buffer = typename Backend::template buffer<U>;
  using Scratch = typename Backend::template GemmScratch<T>;

  LokrConfig config;  ///< the resolved per-layer config
  int r = 0;
  T scaling = 0;
  Index rows = 0, cols = 0;
  LokrLayout layout;
  bool transposed = false;  ///< the base stores its weight [in, out] (Conv1D style)
  buffer<T> w1, w1a, w1b, w2, w2a, w2b, t2;  ///< only those of `layout` are allocated
  buffer<T> grad_w1, grad_w1a, grad_w1b, grad_w2, grad_w2a, grad_w2b, grad_t2;
  bool requires_grad = false;

  using cp_ops = detail::lycoris::Cp<T, Backend>;

  /// w2 as a matrix has in_n·kh·kw columns (in_n for Linear, where kh = kw = 1).
  Index w2_cols() const { return layout.in_n * layout.kh * layout.kw; }
  /// Kernel positions kh·kw.
  Index kernel() const { return layout.kh * layout.kw; }
  /// The CP form of w2 (lokr_t2, lokr_w2_a [r, out_k], lokr_w2_b [r, in_n]).
  bool cp() const { return !layout.full_w2 && layout.effective; }

  // PEFT's tensors; an empty view when the layout has no such tensor.
  MatrixView<T> lokr_w1() { return layout.full_w1 ? w1.view(layout.out_l, layout.in_m) : MatrixView<T>{}; }
  MatrixView<T> lokr_w1_a() { return layout.full_w1 ? MatrixView<T>{} : w1a.view(layout.out_l, r); }
  MatrixView<T> lokr_w1_b() { return layout.full_w1 ? MatrixView<T>{} : w1b.view(r, layout.in_m); }
  MatrixView<T> lokr_w2() { return layout.full_w2 ? w2.view(layout.out_k, w2_cols()) : MatrixView<T>{}; }
  MatrixView<T> lokr_w2_a() { return layout.full_w2 ? MatrixView<T>{} : cp() ? w2a.view(r, layout.out_k) : w2a.view(layout.out_k, r); }
  MatrixView<T> lokr_w2_b() { return layout.full_w2 ? MatrixView<T>{} : w2b.view(r, cp() ? layout.in_n : w2_cols()); }
  /// lokr_t2 [r, r, kh, kw] as [r, r·kh·kw] (CP form only; an empty view otherwise).
  MatrixView<T> lokr_t2() { return cp() ? t2.view(r, r * kernel()) : MatrixView<T>{}; }
  ConstMatrixView<T> lokr_w1() const { return const_cast<LokrAdapter*>(this)->lokr_w1(); }
  ConstMatrixView<T> lokr_w1_a() const { return const_cast<LokrAdapter*>(this)->lokr_w1_a(); }
  ConstMatrixView<T> lokr_w1_b() const { return const_cast<LokrAdapter*>(this)->lokr_w1_b(); }
  ConstMatrixView<T> lokr_w2() const { return const_cast<LokrAdapter*>(this)->lokr_w2(); }
  ConstMatrixView<T> lokr_w2_a() const { return const_cast<LokrAdapter*>(this)->lokr_w2_a(); }
  ConstMatrixView<T> lokr_w2_b() const { return const_cast<LokrAdapter*>(this)->lokr_w2_b(); }
  ConstMatrixView<T> lokr_t2() const { return const_cast<LokrAdapter*>(this)->lokr_t2(); }
  MatrixView<T> grad_lokr_w1() { return layout.full_w1 ? grad_w1.view(layout.out_l, layout.in_m) : MatrixView<T>{}; }
  MatrixView<T> grad_lokr_w1_a() { return layout.full_w1 ? MatrixView<T>{} : grad_w1a.view(layout.out_l, r); }
  MatrixView<T> grad_lokr_w1_b() { return layout.full_w1 ? MatrixView<T>{} : grad_w1b.view(r, layout.in_m); }
  MatrixView<T> grad_lokr_w2() { return layout.full_w2 ? grad_w2.view(layout.out_k, w2_cols()) : MatrixView<T>{}; }
  MatrixView<T> grad_lokr_w2_a() {
    return layout.full_w2 ? MatrixView<T>{} : cp() ? grad_w2a.view(r, layout.out_k) : grad_w2a.view(layout.out_k, r);
  }
  MatrixView<T> grad_lokr_w2_b() { return layout.full_w2 ? MatrixView<T>{} : grad_w2b.view(r, cp() ? layout.in_n : w2_cols()); }
  MatrixView<T> grad_lokr_t2() { return cp() ? grad_t2.view(r, r * kernel()) : MatrixView<T>{}; }

  /// Allocates the tensors of `layout_` and initialises them as PEFT does.
  void init(const LokrConfig& cfg, const LokrLayout& layout_, Index rows_, Index cols_, bool transposed_, Generator& gen) {
    namespace ly = detail::lycoris;
    config = cfg;
    r = cfg.r;
    layout = layout_;
    rows = rows_;
    cols = cols_;
    transposed = transposed_;
    scaling = T(LokrConfig::scaling_for(cfg.alpha, cfg.r));
    const Index a = layout.out_l, c = layout.in_m, b = layout.out_k, d = w2_cols();
    const bool zero_w1 = cfg.init_weights == LokrInit::standard, zero_w2 = cfg.init_weights == LokrInit::lycoris;
    if (layout.full_w1) {
      w1.resize(std::size_t(a * c));
      grad_w1.resize(w1.size());
      if (!zero_w1) ly::kaiming_uniform<Backend>(gen, w1.data(), a, c);
    } else {
      w1a.resize(std::size_t(a * r));
      w1b.resize(std::size_t(r * c));
      grad_w1a.resize(w1a.size());
      grad_w1b.resize(w1b.size());
      if (!zero_w1) ly::kaiming_uniform<Backend>(gen, w1a.data(), a, r);
      ly::kaiming_uniform<Backend>(gen, w1b.data(), r, c);
    }
    if (layout.full_w2) {
      w2.resize(std::size_t(b * d));
      grad_w2.resize(w2.size());
      if (!zero_w2) ly::kaiming_uniform<Backend>(gen, w2.data(), b, d);
    } else if (cp()) {  // PEFT: w2_a (r, out_k), w2_b (r, in_n), t2 (r, r, kh, kw), t2 always kaiming
      const Index n = layout.in_n, k = kernel();
      w2a.resize(std::size_t(r * b));
      w2b.resize(std::size_t(r * n));
      t2.resize(std::size_t(r * r * k));
      grad_w2a.resize(w2a.size());
      grad_w2b.resize(w2b.size());
      grad_t2.resize(t2.size());
      ly::kaiming_uniform<Backend>(gen, w2a.data(), r, b);
      if (!zero_w2) ly::kaiming_uniform<Backend>(gen, w2b.data(), r, n);
      ly::kaiming_uniform<Backend>(gen, t2.data(), r, r * k);
    } else {
      w2a.resize(std::size_t(b * r));
      w2b.resize(std::size_t(r * d));
      grad_w2a.resize(w2a.size());
      grad_w2b.resize(w2b.size());
      ly::kaiming_uniform<Backend>(gen, w2a.data(), b, r);
      if (!zero_w2) ly::kaiming_uniform<Backend>(gen, w2b.data(), r, d);
    }
  }

  /// w1 as a matrix [out_l, in_m]: lokr_w1, or lokr_w1_a · lokr_w1_b computed into `tmp`.
  ConstMatrixView<T> block1(Scratch& scratch, MatrixView<T> tmp) const {
    if (layout.full_w1) return lokr_w1();
    Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), lokr_w1_a(), lokr_w1_b(), T(0), tmp);
    return tmp;
  }
  /// w2 as a matrix [out_k, in_n·kh·kw]: lokr_w2, or lokr_w2_a · lokr_w2_b computed into `tmp`, or (CP)
  /// w2_aᵀ (t2 ×₂ w2_b) with the core written to `u` [r, in_n·kh·kw].
  ConstMatrixView<T> block2(Scratch& scratch, MatrixView<T> tmp, MatrixView<T> u = {}) const {
    if (layout.full_w2) return lokr_w2();
    if (cp()) {
      cp_ops::core(scratch, lokr_t2(), lokr_w2_b(), kernel(), u);
      cp_ops::rebuild(scratch, T(1), lokr_w2_a(), ConstMatrixView<T>(u), T(0), tmp);
      return tmp;
    }
    Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), lokr_w2_a(), lokr_w2_b(), T(0), tmp);
    return tmp;
  }

  /// Parameter gradients from g = ∂L/∂kron(w1, w2) (s and the rank-dropout mask applied), per beta.
  /// `gw1` [out_l, in_m] and `gw2` [out_k, in_n·kh·kw] are scratch for the low-rank blocks; in the CP form
  /// `u` is the core of the forward and `du` [r, in_n·kh·kw] scratch.
  void factor_grads(Scratch& scratch, ConstMatrixView<T> g, ConstMatrixView<T> b1, ConstMatrixView<T> b2, MatrixView<T> gw1,
                    MatrixView<T> gw2, T beta, ConstMatrixView<T> u = {}, MatrixView<T> du = {}) {
    if (layout.full_w1) {
      Backend::kron_grad_a(g, b2, beta, grad_lokr_w1());
    } else {
      Backend::kron_grad_a(g, b2, T(0), gw1);
      Backend::template gemm<Trans::no, Trans::yes>(scratch, T(1), ConstMatrixView<T>(gw1), lokr_w1_b(), beta, grad_lokr_w1_a());
      Backend::template gemm<Trans::yes, Trans::no>(scratch, T(1), lokr_w1_a(), ConstMatrixView<T>(gw1), beta, grad_lokr_w1_b());
    }
    if (layout.full_w2) {
      Backend::kron_grad_b(g, b1, beta, grad_lokr_w2());
    } else if (cp()) {
      Backend::kron_grad_b(g, b1, T(0), gw2);
      cp_ops::grads(scratch, ConstMatrixView<T>(gw2), lokr_w2_a(), lokr_w2_b(), lokr_t2(), u, du, grad_lokr_w2_a(), grad_lokr_w2_b(),
                    grad_lokr_t2(), kernel(), beta);
    } else {
      Backend::kron_grad_b(g, b1, T(0), gw2);
      Backend::template gemm<Trans::no, Trans::yes>(scratch, T(1), ConstMatrixView<T>(gw2), lokr_w2_b(), beta, grad_lokr_w2_a());
      Backend::template gemm<Trans::yes, Trans::no>(scratch, T(1), lokr_w2_a(), ConstMatrixView<T>(gw2), beta, grad_lokr_w2_b());
    }
  }

  void reserve(Scratch& scratch) const {
    const Index a = layout.out_l, c = layout.in_m, b = layout.out_k, d = w2_cols();
    if (!layout.full_w1) {
      scratch.reserve_gemm(a, c, r);
      scratch.reserve_gemm(a, r, c);
      scratch.reserve_gemm(r, c, a);
    }
    if (cp()) {
      cp_ops::reserve(scratch, r, b, layout.in_n, kernel());
    } else if (!layout.full_w2) {
      scratch.reserve_gemm(b, d, r);
      scratch.reserve_gemm(b, r, d);
      scratch.reserve_gemm(r, d, b);
    }
  }
  void zero_grad() {
    for (auto* g : {&grad_w1, &grad_w1a, &grad_w1b, &grad_w2, &grad_w2a, &grad_w2b, &grad_t2}) g->zero();
  }
};

template <class Base>
class LokrBank;

/// The LoKr adapter kind: `peft::Adapted<peft::Linear<float>, peft::Lokr>` (or beside other kinds).
struct Lokr {
  using config_type = LokrConfig;
  static constexpr const char* name = "lokr";
  template <class Base>
  using bank = LokrBank<Base>;
};

namespace detail::lokr {

/// The tensors PEFT creates for a LoKr adapter on `base`.
template <class T, class Backend>
LokrLayout layout_for(const Linear<T, Backend>& base, const LokrConfig& cfg, std::string_view) {
  return LokrLayout::linear(base.out_features(), base.in_features(), cfg.r, cfg.decompose_both, cfg.decompose_factor);
}
template <class T, class Backend>
LokrLayout layout_for(const Conv2d<T, Backend>& base, const LokrConfig& cfg, std::string_view) {
  const auto& g = base.geometry();
  return LokrLayout::conv2d(g.out_channels, g.in_channels, g.kernel_h, g.kernel_w, cfg.r, cfg.decompose_both, cfg.decompose_factor,
                            cfg.use_effective_conv2d);
}

/// LoKr adapters of one layer (Linear or Conv2d, per detail::lycoris::DeltaOps<Base>), one slot per named
/// adapter. An additive bank (as LoraBank).
template <class T, class Backend, class Base>
class LokrBankImpl {
 public:
  using base_type = Base;
  using ops = detail::lycoris::DeltaOps<Base>;
  using adapter_type = LokrAdapter<T, Backend>;
  using Scratch = typename Backend::template GemmScratch<T>;
  template <class U>
  using buffer = typename Backend::template buffer<U>;
  static constexpr std::uint64_t stream_tag = 0x4C6F4B72;  // "LoKr"
  static constexpr bool is_conv = std::is_same_v<Base, Conv2d<T, Backend>>;
  using steps = detail::lycoris::DeltaImageSteps<T, Backend>;

  struct Context {
    struct Slot {
      buffer<T> delta;   ///< ΔW as the last forward used it, [out, in]
      buffer<T> mask;    ///< rank-dropout row mask [out] (only when rank_dropout > 0)
      std::vector<T> mask_host;  ///< the mask as drawn on the host, before its upload
      buffer<T> w1, w2;  ///< the low-rank blocks' products (only for low-rank blocks)
      buffer<T> u;       ///< CP form: the core t2 ×₂ w2_b of the last forward, [r, in_n·kh·kw]
      bool masked = false;
    };
    std::vector<Slot> slots;
    std::vector<int> ran;
    std::vector<int> skipped;  ///< active slots skipped by module dropout
    buffer<T> grad_delta;      ///< ∂L/∂kron(w1, w2), [out, in], shared
    buffer<T> gw1, gw2;        ///< ∂L/∂w1, ∂L/∂w2 of low-rank blocks, shared (largest slot)
    buffer<T> du;              ///< CP form: ∂L/∂core, shared (largest slot)
    typename ops::State op;    ///< the base-layer products' state (Conv2d: geometry and columns)
  };

  std::size_t size() const noexcept { return adapters_.size(); }
  adapter_type& at(int slot) { return adapters_[std::size_t(slot)]; }
  const adapter_type& at(int slot) const { return adapters_[std::size_t(slot)]; }

  int add(const base_type& base, const LokrConfig& cfg, Generator& gen, std::string_view name) {
    cfg.validate();
    adapter_type a;
    a.init(cfg, layout_for(base, cfg, name), ops::rows(base), ops::cols(base), ops::transposed(base), gen);
    adapters_.push_back(std::move(a));
    return int(adapters_.size() - 1);
  }
  void remove(int slot) { adapters_.erase(adapters_.begin() + slot); }

  void make_context(Context& ctx, Scratch& scratch, Index max_batch, const base_type& base) const {
    ctx.slots.resize(adapters_.size());
    ctx.ran.reserve(adapters_.size());
    ctx.skipped.reserve(adapters_.size());
    if (adapters_.empty()) return;
    ops::prepare(ctx.op, scratch, max_batch, base);
    const Index out = adapters_.front().rows, in = adapters_.front().cols;
    ctx.grad_delta.resize(std::size_t(out * in));
    std::size_t n1 = 0, n2 = 0, nu = 0;
    for (std::size_t i = 0; i < adapters_.size(); ++i) {
      const auto& a = adapters_[i];
      const auto& l = a.layout;
      auto& s = ctx.slots[i];
      s.delta.resize(std::size_t(out * in));
      if (a.config.rank_dropout > 0) {
        s.mask.resize(std::size_t(out));
        s.mask_host.resize(std::size_t(out));
      }
      if (!l.full_w1) s.w1.resize(std::size_t(l.out_l * l.in_m));
      if (!l.full_w2) s.w2.resize(std::size_t(l.out_k * a.w2_cols()));
      if (a.cp()) {
        s.u.resize(std::size_t(a.r * a.w2_cols()));
        nu = std::max(nu, s.u.size());
      }
      n1 = std::max(n1, std::size_t(l.out_l * l.in_m));
      n2 = std::max(n2, std::size_t(l.out_k * a.w2_cols()));
      a.reserve(scratch);
    }
    ctx.gw1.resize(n1);
    ctx.gw2.resize(n2);
    ctx.du.resize(nu);
  }

  /// y += Σ_{active} x ΔWᵀ (Linear) or conv(x, ΔW) (Conv2d), with module and rank dropout in train mode.
  void forward(Context& ctx, Scratch& scratch, const std::vector<int>& active, ConstMatrixView<T> x, MatrixView<T> y, bool dropout_on,
               std::uint64_t seed, std::uint64_t stream0) const {
    prepare(ctx, scratch, active, dropout_on, seed, stream0);
    for (int slot : ctx.ran) {
      const auto& a = adapters_[std::size_t(slot)];
      ops::forward(ctx.op, scratch, ConstMatrixView<T>(ctx.slots[std::size_t(slot)].delta.view(a.rows, a.cols)), x, y);
    }
  }

  /// dx += dy ΔW for every slot that ran; trainable slots get their gradients per `mode` from
  /// ∂L/∂ΔW = dyᵀ x. A trainable slot skipped by module dropout gets zero gradients in overwrite mode.
  void backward(Context& ctx, Scratch& scratch, ConstMatrixView<T> x, ConstMatrixView<T> dy, MatrixView<T> dx, GradMode mode,
                std::uint64_t) {
    const T beta = mode == GradMode::accumulate ? T(1) : T(0);
    for (int slot : ctx.skipped) {
      auto& a = adapters_[std::size_t(slot)];
      if (a.requires_grad && mode == GradMode::overwrite) a.zero_grad();
    }
    for (int slot : ctx.ran) {
      auto& a = adapters_[std::size_t(slot)];
      auto& s = ctx.slots[std::size_t(slot)];
      if (a.requires_grad) {
        auto g = ctx.grad_delta.view(a.rows, a.cols);
        ops::grad(ctx.op, scratch, a.scaling, x, dy, g);  // s · ∂L/∂ΔW
        slot_grads(ctx, scratch, slot, g, beta);
      }
      if (!dx.empty()) ops::input_grad(ctx.op, scratch, ConstMatrixView<T>(s.delta.view(a.rows, a.cols)), dy, dx);
    }
  }

  // ---- on the base's columns (Adapted<Conv2d, ...>; see detail::lycoris::DeltaImageSteps) -------------------------
  bool image_ready(const std::vector<int>&) const requires is_conv { return true; }
  void image_begin(Context& ctx, Scratch& scratch, const std::vector<int>& active, ConstMatrixView<T>, bool dropout_on, std::uint64_t seed,
                   std::uint64_t stream0) const requires is_conv {
    ctx.op.folded = false;
    prepare(ctx, scratch, active, dropout_on, seed, stream0);
  }
  bool image_can_fold(const Context&, Index) const requires is_conv { return true; }
  void image_fold(Context& ctx, Scratch&, MatrixView<T> w) const requires is_conv { steps::fold(adapters_, ctx, w); }
  void image_forward(Context& ctx, Scratch& scratch, Index, ConstMatrixView<T> cols, MatrixView<T> yn) const requires is_conv {
    steps::forward(adapters_, ctx, scratch, cols, yn);
  }
  bool image_needs_columns(const Context& ctx) const requires is_conv { return steps::needs_columns(adapters_, ctx); }
  void image_backward(Context& ctx, Scratch& scratch, Index, bool first, ConstMatrixView<T> cols, ConstMatrixView<T> dyn, MatrixView<T> dcols,
                      GradMode) requires is_conv {
    steps::backward(adapters_, ctx, scratch, first, cols, dyn, dcols);
  }
  void image_end(Context& ctx, Scratch& scratch, MatrixView<T>, Index rows, GradMode mode, std::uint64_t) requires is_conv {
    steps::end(adapters_, ctx, mode, rows, [&](int slot, MatrixView<T> g, T beta) { slot_grads(ctx, scratch, slot, g, beta); });
  }

  /// W += sign · ΔW in the base weight's layout (the bias is unchanged, as in PEFT).
  void apply_delta(int slot, base_type& base, T sign) const {
    Scratch scratch;
    write_delta(slot, scratch, base.weight(), sign, T(1));
  }
  void merge_preview(int slot, Scratch& scratch, MatrixView<T> w) const { write_delta(slot, scratch, w, T(1), T(1)); }

  /// out = sign · ΔW + beta · out, in the base layout ([out, in], or [in, out] for a Conv1D-style base).
  /// Allocates the low-rank blocks' products (merge time, not the hot path).
  void write_delta(int slot, Scratch& scratch, MatrixView<T> out, T sign, T beta) const {
    const auto& a = adapters_[std::size_t(slot)];
    const auto& l = a.layout;
    require_shape(out, a.transposed ? a.cols : a.rows, a.transposed ? a.rows : a.cols, "LoKr write_delta: out");
    a.reserve(scratch);
    buffer<T> t1(l.full_w1 ? 0 : std::size_t(l.out_l * l.in_m)), t2(l.full_w2 ? 0 : std::size_t(l.out_k * a.w2_cols()));
    buffer<T> u(a.cp() ? std::size_t(a.r * a.w2_cols()) : 0);
    const auto b1 = a.block1(scratch, l.full_w1 ? MatrixView<T>{} : t1.view(l.out_l, l.in_m));
    const auto b2 = a.block2(scratch, l.full_w2 ? MatrixView<T>{} : t2.view(l.out_k, a.w2_cols()),
                             a.cp() ? u.view(a.r, a.w2_cols()) : MatrixView<T>{});
    Backend::kron(sign * a.scaling, b1, b2, beta, out, a.transposed);
  }

  template <class F>
  void visit_parameters(int slot, std::string_view name, F&& f) {
    auto& a = adapters_[std::size_t(slot)];
    const std::string n(name);
    auto visit = [&](const char* tensor, buffer<T>& v, buffer<T>& g) {
      if (!v.empty()) f(ParamRef<T>{std::string(tensor) + "." + n, v.data(), g.data(), v.size(), a.requires_grad, Backend::host_accessible});
    };
    visit("lokr_w1", a.w1, a.grad_w1);
    visit("lokr_w1_a", a.w1a, a.grad_w1a);
    visit("lokr_w1_b", a.w1b, a.grad_w1b);
    visit("lokr_w2", a.w2, a.grad_w2);
    visit("lokr_w2_a", a.w2a, a.grad_w2a);
    visit("lokr_w2_b", a.w2b, a.grad_w2b);
    visit("lokr_t2", a.t2, a.grad_t2);  // CP form only; PEFT registers it last
  }
  void set_requires_grad(int slot, bool on) { adapters_[std::size_t(slot)].requires_grad = on; }
  void zero_grad(int slot) { adapters_[std::size_t(slot)].zero_grad(); }

 private:
  /// The slots that run (module dropout) and their ΔW (scaled, rank-dropout rows masked) in the context.
  void prepare(Context& ctx, Scratch& scratch, const std::vector<int>& active, bool dropout_on, std::uint64_t seed, std::uint64_t stream0) const {
    ctx.ran.clear();
    ctx.skipped.clear();
    for (int slot : active) {
      const auto& a = adapters_[std::size_t(slot)];
      if (dropout_on && detail::lycoris::module_dropped(a.config.module_dropout, seed, detail::lycoris::module_stream(stream_tag, stream0, slot))) {
        ctx.skipped.push_back(slot);
        continue;
      }
      ctx.ran.push_back(slot);
      auto& s = ctx.slots[std::size_t(slot)];
      const auto b1 = block1(a, s, scratch), b2 = block2(a, s, scratch);
      auto delta = s.delta.view(a.rows, a.cols);
      Backend::kron(a.scaling, b1, b2, T(0), delta, false);
      s.masked = dropout_on && a.config.rank_dropout > 0;
      if (s.masked) {
        detail::lycoris::rank_dropout_mask<Backend>(s.mask_host, s.mask.view(1, a.rows), a.config.rank_dropout, a.config.rank_dropout_scale,
                                                    seed, detail::lycoris::rank_stream(stream_tag, stream0, slot));
        Backend::scale_rows(delta, s.mask.data());
      }
    }
  }
  /// A slot's gradients (per beta) from g = s·∂L/∂ΔW; applies the rank-dropout mask to g first.
  void slot_grads(Context& ctx, Scratch& scratch, int slot, MatrixView<T> g, T beta) {
    auto& a = adapters_[std::size_t(slot)];
    auto& s = ctx.slots[std::size_t(slot)];
    const auto& l = a.layout;
    if (s.masked) Backend::scale_rows(g, s.mask.data());
    // the blocks as forward used them (the products of low-rank blocks are kept in the context)
    const ConstMatrixView<T> b1 = l.full_w1 ? a.lokr_w1() : ConstMatrixView<T>(s.w1.view(l.out_l, l.in_m));
    const ConstMatrixView<T> b2 = l.full_w2 ? a.lokr_w2() : ConstMatrixView<T>(s.w2.view(l.out_k, a.w2_cols()));
    a.factor_grads(scratch, ConstMatrixView<T>(g), b1, b2, l.full_w1 ? MatrixView<T>{} : ctx.gw1.view(l.out_l, l.in_m),
                   l.full_w2 ? MatrixView<T>{} : ctx.gw2.view(l.out_k, a.w2_cols()), beta,
                   a.cp() ? ConstMatrixView<T>(s.u.view(a.r, a.w2_cols())) : ConstMatrixView<T>{},
                   a.cp() ? ctx.du.view(a.r, a.w2_cols()) : MatrixView<T>{});
  }
  static ConstMatrixView<T> block1(const adapter_type& a, typename Context::Slot& s, Scratch& scratch) {
    return a.block1(scratch, a.layout.full_w1 ? MatrixView<T>{} : s.w1.view(a.layout.out_l, a.layout.in_m));
  }
  static ConstMatrixView<T> block2(const adapter_type& a, typename Context::Slot& s, Scratch& scratch) {
    return a.block2(scratch, a.layout.full_w2 ? MatrixView<T>{} : s.w2.view(a.layout.out_k, a.w2_cols()),
                    a.cp() ? s.u.view(a.r, a.w2_cols()) : MatrixView<T>{});
  }

  std::vector<adapter_type> adapters_;
};

}  // namespace detail::lokr

/// LoKr adapters of one Linear layer (Conv1D-style [in, out] weights included).
template <class T, class Backend>
class LokrBank<Linear<T, Backend>> : public detail::lokr::LokrBankImpl<T, Backend, Linear<T, Backend>> {};

/// LoKr adapters of one Conv2d layer (PEFT's lokr.Conv2d, flat or CP form of w2): ΔW [O, C·kh·kw].
template <class T, class Backend>
class LokrBank<Conv2d<T, Backend>> : public detail::lokr::LokrBankImpl<T, Backend, Conv2d<T, Backend>> {};

/// The LoKr adapter `name` of an adapted layer (blocks, gradients, layout, scaling).
template <class Layer>
auto& lokr_adapter(Layer& layer, const std::string& name) {
  return layer.template adapter<Lokr>(name);
}

}  // namespace peft
