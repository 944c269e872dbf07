// peft++ — LoHa (low-rank Hadamard product; Hyeon-Woo et al., FedPara, 2022; LyCORIS), as Hugging Face
// PEFT 0.21 implements it (peft/tuners/loha/layer.py), on Linear and Conv2d base layers.
//
//   w1_a, w2_a: [out, r]     w1_b, w2_b: [r, in]     s = alpha / r
//   ΔW = s · (w1_a w1_b) ⊙ (w2_a w2_b)                [out, in]; transposed ([in, out]) in a Conv1D-style base
//   y  = base(x) + x ΔWᵀ                              ΔW is materialised in the context every forward, as PEFT
//
// Train mode only: rank_dropout zeroes whole rows of ΔW (rescaled by 1/mean(keep)), module_dropout skips
// the adapter for one forward. This header also holds the helpers LoHa and LoKr share (detail::lycoris).
//
// Conv2d (PEFT's loha.Conv2d): ΔW has the base kernel's layout [O, C·kh·kw], and y_n += ΔW · cols(x_n) per
// image, i.e. conv(x, ΔW) with the base's stride, padding and dilation. Flat form (default): w1_a, w2_a
// [O, r]; w1_b, w2_b [r, C·kh·kw]. CP form (use_effective_conv2d on a kernel other than 1×1; PEFT ignores
// the flag on 1×1 kernels, and so does peft++): hada_t1, hada_t2 [r, r, kh, kw], w1_a, w2_a [r, O],
// w1_b, w2_b [r, C], and
//   K1[o, c, y, x] = Σ_{i,j} t1[i, j, y, x] · w1_a[i, o] · w1_b[j, c]      (K2 likewise)
//   ΔW = s · K1 ⊙ K2
// (see detail::lycoris::Cp). Backward differentiates this exactly; PEFT 0.21's HadaWeightCP.backward gets
// the gradients of w1_a and w2_a wrong (it swaps the two cores), peft++ does not copy that.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <regex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/grad_mode.hpp"
#include "peft/layer/conv2d.hpp"
#include "peft/layer/linear.hpp"
#include "peft/param.hpp"
#include "peft/rng.hpp"

namespace peft {

namespace detail::lycoris {

/// PEFT's get_pattern_key: `key` applies to the module at `path` when `(.*\.)?(key)$` matches it.
inline bool pattern_matches(const std::string& path, const std::string& key) {
  return std::regex_match(path, std::regex("(.*\\.)?(" + key + ")"));
}

/// Resolves rank_pattern / alpha_pattern for one module (first matching key wins) and clears them.
template <class Config>
Config resolve_patterns(const Config& in, std::string_view path) {
  Config c = in;
  c.rank_pattern.clear();
  c.alpha_pattern.clear();
  const std::string p(path);
  for (const auto& [key, r] : in.rank_pattern)
    if (pattern_matches(p, key)) { c.r = r; break; }
  for (const auto& [key, a] : in.alpha_pattern)
    if (pattern_matches(p, key)) { c.alpha = a; break; }
  return c;
}

/// The checks LoHa and LoKr share; `who` names the config type in the message.
template <class Config>
void validate_common(const Config& c, const char* who) {
  if (c.r <= 0) throw ConfigError(cat(who, ": r must be a positive integer, got ", c.r));
  for (const auto& [k, v] : c.rank_pattern)
    if (v <= 0) throw ConfigError(cat(who, ": rank_pattern['", k, "'] must be a positive integer, got ", v));
  if (!std::isfinite(c.alpha)) throw ConfigError(cat(who, ": alpha must be finite, got ", c.alpha));
  for (const auto& [k, v] : c.alpha_pattern)
    if (!std::isfinite(v)) throw ConfigError(cat(who, ": alpha_pattern['", k, "'] must be finite, got ", v));
  if (!(c.rank_dropout >= 0.0 && c.rank_dropout < 1.0))
    throw ConfigError(cat(who, ": rank_dropout must be in [0, 1), got ", c.rank_dropout));
  if (!(c.module_dropout >= 0.0 && c.module_dropout < 1.0))
    throw ConfigError(cat(who, ": module_dropout must be in [0, 1), got ", c.module_dropout));
}

/// torch.nn.init.kaiming_uniform_(w, a=√5) of a 2-D tensor [rows, cols]: U(±1/√cols).
template <class Backend, class T>
void kaiming_uniform(Generator& gen, T* w, Index rows, Index cols) {
  const double bound = 1.0 / std::sqrt(double(cols));
  Backend::random_uniform(gen, MatrixView<T>(w, rows, cols), -bound, bound);
}

/// Dropout streams: one pair per (kind, slot), disjoint from LoRA's input-dropout streams (stream0 + slot).
constexpr std::uint64_t rank_stream(std::uint64_t kind_tag, std::uint64_t stream0, int slot) {
  return stream0 + (kind_tag << 32) + 2 * std::uint64_t(slot);
}
constexpr std::uint64_t module_stream(std::uint64_t kind_tag, std::uint64_t stream0, int slot) {
  return rank_stream(kind_tag, stream0, slot) + 1;
}

/// PEFT's module dropout: the adapter runs unless `torch.rand(1) <= p` (train mode only).
inline bool module_dropped(double p, std::uint64_t seed, std::uint64_t stream) {
  return p > 0 && detail::uniform01(seed, stream, 0) <= p;
}

/// PEFT's rank-dropout mask over the n rows of ΔW: keep row i iff u_i > p; with `rescale` the mask is
/// divided by its mean (LoHa always, LoKr with rank_dropout_scale). If every row is dropped the mask is
/// all zero (PEFT divides 0 by 0 and gets NaN there).
/// The mask is drawn on the host into `host` (sized at context creation) and uploaded into `mask` [1, n].
template <class Backend, class T>
void rank_dropout_mask(std::vector<T>& host, MatrixView<T> mask, double p, bool rescale, std::uint64_t seed, std::uint64_t stream) {
  const Index n = mask.cols;
  Index kept = 0;
  for (Index i = 0; i < n; ++i) {
    const bool keep = detail::uniform01(seed, stream, std::uint64_t(i)) > p;
    host[std::size_t(i)] = keep ? T(1) : T(0);
    kept += keep;
  }
  if (rescale && kept > 0) {
    const T inv_mean = T(double(n) / double(kept));
    for (Index i = 0; i < n; ++i) host[std::size_t(i)] *= inv_mean;
  }
  Backend::template upload<T>(ConstMatrixView<T>(host.data(), 1, n), mask);
}

/// How an additive LyCORIS bank (LoHa, LoKr) applies a materialised ΔW [rows, cols] to its base layer:
/// the three products of forward and backward, and the shape of ΔW. One specialisation per base layer.
template <class Base>
struct DeltaOps;

/// Linear: ΔW is [out, in]; y += x ΔWᵀ, ∂L/∂ΔW = dyᵀ x, dx += dy ΔW.
template <class T, class Backend>
struct DeltaOps<Linear<T, Backend>> {
  using base_type = Linear<T, Backend>;
  using Scratch = typename Backend::template GemmScratch<T>;
  struct State {};

  static Index rows(const base_type& b) { return b.out_features(); }
  static Index cols(const base_type& b) { return b.in_features(); }
  static bool transposed(const base_type& b) { return b.layout() == WeightLayout::in_out; }
  static void prepare(State&, Scratch& scratch, Index max_batch, const base_type& b) {
    const Index out = rows(b), in = cols(b);
    scratch.reserve_gemm(max_batch, out, in);  // y += x ΔWᵀ
    scratch.reserve_gemm(out, in, max_batch);  // dyᵀ x
    scratch.reserve_gemm(max_batch, in, out);  // dx += dy ΔW
  }
  static void forward(State&, Scratch& scratch, ConstMatrixView<T> delta, ConstMatrixView<T> x, MatrixView<T> y) {
    Backend::template gemm<Trans::no, Trans::yes>(scratch, T(1), x, delta, T(1), y);
  }
  /// g = alpha · ∂L/∂ΔW.
  static void grad(State&, Scratch& scratch, T alpha, ConstMatrixView<T> x, ConstMatrixView<T> dy, MatrixView<T> g) {
    Backend::template gemm<Trans::yes, Trans::no>(scratch, alpha, dy, x, T(0), g);
  }
  static void input_grad(State&, Scratch& scratch, ConstMatrixView<T> delta, ConstMatrixView<T> dy, MatrixView<T> dx) {
    Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), dy, delta, T(1), dx);
  }
};

/// Conv2d (non-CP form): ΔW is the kernel [O, C·kh·kw]; per image n, y_n += ΔW · cols(x_n),
/// ∂L/∂ΔW = Σ_n dy_n · cols(x_n)ᵀ (the columns recomputed), dx_n += col2im(ΔWᵀ · dy_n).
template <class T, class Backend>
struct DeltaOps<Conv2d<T, Backend>> {
  using base_type = Conv2d<T, Backend>;
  using Scratch = typename Backend::template GemmScratch<T>;
  struct State {
    Conv2dGeometry geo;  ///< the base's geometry when the context was made
    typename Backend::template buffer<T> cols;  ///< one image's columns [C·kh·kw, Ho·Wo] (also the col2im input)
    typename Backend::template buffer<T> grad_sum;  ///< on the base's columns: Σ_n dy_n cols(x_n)ᵀ [O, C·kh·kw], shared by the slots
    bool folded = false;  ///< the last forward added ΔW of every slot that ran to the base's product (DeltaImageSteps::fold)
  };

  static Index rows(const base_type& b) { return b.geometry().out_channels; }
  static Index cols(const base_type& b) { return b.geometry().patch(); }
  static bool transposed(const base_type&) { return false; }
  static void prepare(State& st, Scratch& scratch, Index, const base_type& b) {
    st.geo = b.geometry();
    const Index k = st.geo.patch(), p = st.geo.positions(), o = st.geo.out_channels;
    st.cols.resize(std::size_t(k * p));
    st.grad_sum.resize(std::size_t(o * k));
    scratch.reserve_gemm(o, p, k);  // ΔW · cols
    scratch.reserve_gemm(o, k, p);  // dy_n · colsᵀ
    scratch.reserve_gemm(k, p, o);  // ΔWᵀ · dy_n
  }
  static void forward(State& st, Scratch& scratch, ConstMatrixView<T> delta, ConstMatrixView<T> x, MatrixView<T> y) {
    const Index k = st.geo.patch(), p = st.geo.positions(), o = st.geo.out_channels;
    auto cols = st.cols.view(k, p);
    for (Index n = 0; n < x.rows; ++n) {
      Backend::im2col(st.geo, x.data + n * x.stride, cols);
      Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), delta, ConstMatrixView<T>(cols), T(1), base_type::image(y, n, o, p));
    }
  }
  static void grad(State& st, Scratch& scratch, T alpha, ConstMatrixView<T> x, ConstMatrixView<T> dy, MatrixView<T> g) {
    const Index k = st.geo.patch(), p = st.geo.positions(), o = st.geo.out_channels;
    auto cols = st.cols.view(k, p);
    if (dy.rows == 0)
      Backend::fill(g, T(0));
    for (Index n = 0; n < dy.rows; ++n) {
      Backend::im2col(st.geo, x.data + n * x.stride, cols);
      Backend::template gemm<Trans::no, Trans::yes>(scratch, alpha, base_type::image(dy, n, o, p), ConstMatrixView<T>(cols),
                                                    n == 0 ? T(0) : T(1), g);
    }
  }
  static void input_grad(State& st, Scratch& scratch, ConstMatrixView<T> delta, ConstMatrixView<T> dy, MatrixView<T> dx) {
    const Index k = st.geo.patch(), p = st.geo.positions(), o = st.geo.out_channels;
    auto dcols = st.cols.view(k, p);
    for (Index n = 0; n < dy.rows; ++n) {
      Backend::template gemm<Trans::yes, Trans::no>(scratch, T(1), delta, base_type::image(dy, n, o, p), T(0), dcols);
      Backend::col2im(st.geo, ConstMatrixView<T>(dcols), T(1), dx.data + n * dx.stride);
    }
  }
};

/// The steps of a bank that materialises ΔW per slot (LoHa, LoKr; flat and CP forms) on the columns of an
/// Adapted<Conv2d, ...>'s base (one im2col per image for the base and every slot): per image, y_n += ΔW·cols
/// for every slot that ran; in backward ∂L/∂ΔW = Σ_n dy_n cols(x_n)ᵀ summed once for all the bank's slots
/// (into the Conv2d DeltaOps state) and ΔWᵀ·dy_n added to the base's dcols; `end` then hands every trainable
/// slot s·∂L/∂ΔW. The bank's Context has `ran`, `skipped`, `slots[i].delta`, `grad_delta` and `op`.
template <class T, class Backend>
struct DeltaImageSteps {
  using Scratch = typename Backend::template GemmScratch<T>;

  /// w += ΔW for every slot that ran (w: the base weight of this forward's product); forward and backward then
  /// leave y and dcols to the base. Always worth it: one [O, C·kh·kw] sum against a product of that size per image.
  template <class Ctx, class Adapters>
  static void fold(const Adapters& ads, Ctx& ctx, MatrixView<T> w) {
    for (int slot : ctx.ran) {
      const auto& a = ads[std::size_t(slot)];
      Backend::axpby(T(1), ConstMatrixView<T>(ctx.slots[std::size_t(slot)].delta.view(a.rows, a.cols)), T(1), w);
    }
    ctx.op.folded = true;
  }
  template <class Ctx, class Adapters>
  static void forward(const Adapters& ads, Ctx& ctx, Scratch& scratch, ConstMatrixView<T> cols, MatrixView<T> yn) {
    if (ctx.op.folded) return;
    for (int slot : ctx.ran) {
      const auto& a = ads[std::size_t(slot)];
      Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), ConstMatrixView<T>(ctx.slots[std::size_t(slot)].delta.view(a.rows, a.cols)),
                                                   cols, T(1), yn);
    }
  }
  template <class Ctx, class Adapters>
  static bool needs_columns(const Adapters& ads, const Ctx& ctx) {
    return std::any_of(ctx.ran.begin(), ctx.ran.end(), [&](int slot) { return ads[std::size_t(slot)].requires_grad; });
  }
  template <class Ctx, class Adapters>
  static void backward(const Adapters& ads, Ctx& ctx, Scratch& scratch, bool first, ConstMatrixView<T> cols, ConstMatrixView<T> dyn,
                       MatrixView<T> dcols) {
    if (ctx.ran.empty()) return;
    if (needs_columns(ads, ctx))
      Backend::template gemm<Trans::no, Trans::yes>(scratch, T(1), dyn, cols, first ? T(0) : T(1), ctx.op.grad_sum.view(dyn.rows, cols.rows));
    if (dcols.empty() || ctx.op.folded) return;
    for (int slot : ctx.ran) {
      const auto& a = ads[std::size_t(slot)];
      Backend::template gemm<Trans::yes, Trans::no>(scratch, T(1), ConstMatrixView<T>(ctx.slots[std::size_t(slot)].delta.view(a.rows, a.cols)),
                                                    dyn, T(1), dcols);
    }
  }
  /// slot_grads(slot, g, beta): the bank's factor gradients from g = s·∂L/∂ΔW (rank-dropout mask not yet applied).
  template <class Ctx, class Adapters, class SlotGrads>
  static void end(Adapters& ads, Ctx& ctx, GradMode mode, Index rows, SlotGrads&& slot_grads) {
    const T beta = mode == GradMode::accumulate ? T(1) : T(0);
    for (int slot : ctx.skipped) {
      auto& a = ads[std::size_t(slot)];
      if (a.requires_grad && mode == GradMode::overwrite) a.zero_grad();
    }
    for (int slot : ctx.ran) {
      auto& a = ads[std::size_t(slot)];
      if (!a.requires_grad) continue;
      auto g = ctx.grad_delta.view(a.rows, a.cols);
      if (rows == 0) Backend::fill(g, T(0));
      else Backend::axpby(a.scaling, ConstMatrixView<T>(ctx.op.grad_sum.view(a.rows, a.cols)), T(0), g);
      slot_grads(slot, g, beta);
    }
  }
};

/// PEFT's use_effective_conv2d selects the CP form on conv kernels other than 1×1 (PEFT ignores it on 1×1
/// kernels and on Linear). Returns the kernel's number of positions kh·kw when the CP form applies, else 0.
template <class T, class Backend>
Index effective_kernel(const Conv2d<T, Backend>& base, bool use_effective_conv2d) {
  const auto& g = base.geometry();
  return use_effective_conv2d && !(g.kernel_h == 1 && g.kernel_w == 1) ? g.kernel_h * g.kernel_w : 0;
}
template <class T, class Backend>
Index effective_kernel(const Linear<T, Backend>&, bool) {
  return 0;
}
/// Input channels of the base (C of a conv kernel [O, C, kh, kw]).
template <class T, class Backend>
Index in_channels(const Conv2d<T, Backend>& base) {
  return base.geometry().in_channels;
}
template <class T, class Backend>
Index in_channels(const Linear<T, Backend>& base) {
  return base.in_features();
}

/// The CP ("effective conv2d") form of a conv kernel, as LyCORIS and PEFT build it (PEFT's
/// einsum "i j k l, j r, i p -> p r k l"):
///
///   W[p, c, kk] = Σ_{i,j} a[i, p] · t[i, j, kk] · b[j, c]
///
/// with a [r, P] (the out-channel mode), b [r, C] (the in-channel mode), the core t [r, r, kh, kw] held as
/// a [r, r·K] matrix (K = kh·kw, kk = ky·kw + kx), and W [P, C·K] — the kernel layout [P, C, kh, kw]. It
/// is computed through U = t ×₂ b, U[i, c·K + kk] = Σ_j t[i, j, kk] · b[j, c] ([r, C·K]; row i, read as a
/// [C, K] matrix, is bᵀ · T_i with T_i = t[i] as [r, K]), then W = aᵀ U: r + 1 GEMMs, no permutation.
/// Backward from G = ∂L/∂W: ∂a = U Gᵀ, ∂U = a G, ∂b = Σ_i T_i ∂U_iᵀ, ∂T_i = b ∂U_i.
template <class T, class Backend>
struct Cp {
  using Scratch = typename Backend::template GemmScratch<T>;

  /// Row i of a [rows, n·K] matrix read as an [n, K] matrix (rows contiguous).
  static ConstMatrixView<T> slice(ConstMatrixView<T> m, Index i, Index n, Index K) { return ConstMatrixView<T>(m.data + i * m.stride, n, K, K); }
  static MatrixView<T> slice(MatrixView<T> m, Index i, Index n, Index K) { return MatrixView<T>(m.data + i * m.stride, n, K, K); }

  /// u [r, C·K] = t ×₂ b.
  static void core(Scratch& s, ConstMatrixView<T> t, ConstMatrixView<T> b, Index K, MatrixView<T> u) {
    const Index r = t.rows, C = b.cols;
    for (Index i = 0; i < r; ++i) Backend::template gemm<Trans::yes, Trans::no>(s, T(1), b, slice(t, i, r, K), T(0), slice(u, i, C, K));
  }
  /// w [P, C·K] = alpha · aᵀ u + beta · w.
  static void rebuild(Scratch& s, T alpha, ConstMatrixView<T> a, ConstMatrixView<T> u, T beta, MatrixView<T> w) {
    Backend::template gemm<Trans::yes, Trans::no>(s, alpha, a, u, beta, w);
  }
  /// The gradients of a, b and t from g = ∂L/∂W [P, C·K], given the core u of the same a, b, t; stored per
  /// beta (0 overwrite, 1 accumulate). `du` [r, C·K] is scratch.
  static void grads(Scratch& s, ConstMatrixView<T> g, ConstMatrixView<T> a, ConstMatrixView<T> b, ConstMatrixView<T> t, ConstMatrixView<T> u,
                    MatrixView<T> du, MatrixView<T> da, MatrixView<T> db, MatrixView<T> dt, Index K, T beta) {
    const Index r = t.rows, C = b.cols;
    Backend::template gemm<Trans::no, Trans::yes>(s, T(1), u, g, beta, da);  // ∂a = U Gᵀ          [r, P]
    Backend::template gemm<Trans::no, Trans::no>(s, T(1), a, g, T(0), du);   // ∂U = a G            [r, C·K]
    for (Index i = 0; i < r; ++i) {
      const auto dui = slice(ConstMatrixView<T>(du), i, C, K);
      Backend::template gemm<Trans::no, Trans::yes>(s, T(1), slice(t, i, r, K), dui, i == 0 ? beta : T(1), db);  // ∂b += T_i ∂U_iᵀ
      Backend::template gemm<Trans::no, Trans::no>(s, T(1), b, dui, beta, slice(dt, i, r, K));                  // ∂T_i = b ∂U_i
    }
  }
  /// Reserves the scratch for every product above.
  static void reserve(Scratch& s, Index r, Index P, Index C, Index K) {
    s.reserve_gemm(C, K, r);      // core
    s.reserve_gemm(P, C * K, r);  // rebuild
    s.reserve_gemm(r, P, C * K);  // ∂a
    s.reserve_gemm(r, C * K, P);  // ∂U
    s.reserve_gemm(r, C, K);      // ∂b
    s.reserve_gemm(r, K, C);      // ∂t
  }
};

}  // namespace detail::lycoris

/// LoHa's configuration with PEFT's names and defaults (`LoHaConfig`).
struct LohaConfig {
  int r = 8;
  double alpha = 8;
  /// Train mode: each row of ΔW is zeroed with this probability, the kept rows rescaled by 1/mean(keep).
  double rank_dropout = 0.0;
  /// Train mode: the whole adapter is skipped for one forward with this probability.
  double module_dropout = 0.0;
  /// Conv2d/Conv1d with kernel > 1 only (CP decomposition, hada_t1/hada_t2); ignored on Linear, as in PEFT.
  bool use_effective_conv2d = false;
  /// true (default): w1_a, w1_b, w2_a kaiming-uniform(a=√5), w2_b = 0, so the adapter starts as the
  /// identity; false: all four kaiming-uniform (PEFT's reset_adapter_parameters_random).
  bool init_weights = true;
  /// Per-module overrides (PEFT's rank_pattern / alpha_pattern): key k applies to a module whose path
  /// matches `(.*\.)?(k)$`; the first matching key wins.
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;

  /// PEFT's scaling: alpha / r.
  static double scaling_for(double alpha, int r) { return alpha / double(r); }

  /// The configuration for the module at `path` (patterns applied, then cleared). Validates the whole
  /// config first, so a bad rank_pattern value is reported even where it does not match.
  LohaConfig for_module(std::string_view path) const {
    validate();
    return detail::lycoris::resolve_patterns(*this, path);
  }

  /// Throws ConfigError naming the field for out-of-range values.
  void validate() const { detail::lycoris::validate_common(*this, "LohaConfig"); }
};

/// One LoHa adapter: the factors of ΔW ([rows, cols] = the base weight as a matrix, [out, in] for
/// Linear, [O, C·kh·kw] for Conv2d), their gradients and the scaling. In the CP form (`cp`) the factors
/// are PEFT's hada_t1/hada_t2 [r, r, kh, kw] (held [r, r·K]), hada_w*_a [r, O] and hada_w*_b [r, C].
template <class T, class Backend>
struct LohaAdapter {
  template <class U>
  using buffer = typename Backend::template buffer<U>;
  using Scratch = typename Backend::template GemmScratch<T>;
  using cp_ops = detail::lycoris::Cp<T, Backend>;

  LohaConfig config;  ///< the resolved per-layer config (patterns applied)
  int r = 0;
  T scaling = 0;
  Index rows = 0, cols = 0;     ///< ΔW as a matrix: [out, in]
  bool transposed = false;      ///< the base stores its weight [in, out] (Conv1D style): ΔW is written transposed
  bool cp = false;              ///< CP form (use_effective_conv2d on a conv kernel other than 1×1)
  Index channels = 0;           ///< CP: in channels C (cols = C·kernel)
  Index kernel = 1;             ///< CP: kernel positions K = kh·kw
  buffer<T> w1a, w1b, w2a, w2b;  ///< hada_w1_a [rows, r], hada_w1_b [r, cols], hada_w2_a [rows, r], hada_w2_b [r, cols]
                                 ///< (CP: hada_w*_a [r, rows], hada_w*_b [r, channels])
  buffer<T> t1, t2;              ///< CP only: hada_t1, hada_t2 [r, r, kh, kw] as [r, r·K]
  buffer<T> grad_w1a, grad_w1b, grad_w2a, grad_w2b, grad_t1, grad_t2;
  bool requires_grad = false;

  Index a_rows() const { return cp ? r : rows; }
  Index a_cols() const { return cp ? rows : r; }
  Index b_cols() const { return cp ? channels : cols; }
  MatrixView<T> hada_w1_a() { return w1a.view(a_rows(), a_cols()); }
  MatrixView<T> hada_w1_b() { return w1b.view(r, b_cols()); }
  MatrixView<T> hada_w2_a() { return w2a.view(a_rows(), a_cols()); }
  MatrixView<T> hada_w2_b() { return w2b.view(r, b_cols()); }
  /// CP only (an empty view otherwise).
  MatrixView<T> hada_t1() { return cp ? t1.view(r, r * kernel) : MatrixView<T>{}; }
  MatrixView<T> hada_t2() { return cp ? t2.view(r, r * kernel) : MatrixView<T>{}; }
  ConstMatrixView<T> hada_w1_a() const { return w1a.view(a_rows(), a_cols()); }
  ConstMatrixView<T> hada_w1_b() const { return w1b.view(r, b_cols()); }
  ConstMatrixView<T> hada_w2_a() const { return w2a.view(a_rows(), a_cols()); }
  ConstMatrixView<T> hada_w2_b() const { return w2b.view(r, b_cols()); }
  ConstMatrixView<T> hada_t1() const { return cp ? t1.view(r, r * kernel) : ConstMatrixView<T>{}; }
  ConstMatrixView<T> hada_t2() const { return cp ? t2.view(r, r * kernel) : ConstMatrixView<T>{}; }
  MatrixView<T> grad_hada_w1_a() { return grad_w1a.view(a_rows(), a_cols()); }
  MatrixView<T> grad_hada_w1_b() { return grad_w1b.view(r, b_cols()); }
  MatrixView<T> grad_hada_w2_a() { return grad_w2a.view(a_rows(), a_cols()); }
  MatrixView<T> grad_hada_w2_b() { return grad_w2b.view(r, b_cols()); }
  MatrixView<T> grad_hada_t1() { return cp ? grad_t1.view(r, r * kernel) : MatrixView<T>{}; }
  MatrixView<T> grad_hada_t2() { return cp ? grad_t2.view(r, r * kernel) : MatrixView<T>{}; }

  /// Allocates the factors for a [rows, cols] weight matrix and initialises them as PEFT does.
  void init(const LohaConfig& cfg, Index rows_, Index cols_, bool transposed_, Generator& gen) {
    config = cfg;
    r = cfg.r;
    rows = rows_;
    cols = cols_;
    transposed = transposed_;
    scaling = T(LohaConfig::scaling_for(cfg.alpha, cfg.r));
    for (auto* b : {&w1a, &w2a, &grad_w1a, &grad_w2a}) b->resize(std::size_t(rows * r));
    for (auto* b : {&w1b, &w2b, &grad_w1b, &grad_w2b}) b->resize(std::size_t(r * cols));
    detail::lycoris::kaiming_uniform<Backend>(gen, w1a.data(), rows, r);
    detail::lycoris::kaiming_uniform<Backend>(gen, w1b.data(), r, cols);
    detail::lycoris::kaiming_uniform<Backend>(gen, w2a.data(), rows, r);
    if (!cfg.init_weights) detail::lycoris::kaiming_uniform<Backend>(gen, w2b.data(), r, cols);  // else zero (resize zeroes)
  }

  /// The CP form for a conv kernel [rows, channels, kh, kw] with kernel = kh·kw positions, initialised as
  /// PEFT does: w1_a, w1_b, w2_a kaiming-uniform (U(±1/√rows), U(±1/√channels)), w2_b zero (random with
  /// init_weights = false), t1 and t2 kaiming-uniform U(±1/√(r·kh·kw)) in either case.
  void init_cp(const LohaConfig& cfg, Index rows_, Index channels_, Index kernel_, Generator& gen) {
    config = cfg;
    r = cfg.r;
    rows = rows_;
    channels = channels_;
    kernel = kernel_;
    cols = channels * kernel;
    transposed = false;
    cp = true;
    scaling = T(LohaConfig::scaling_for(cfg.alpha, cfg.r));
    for (auto* b : {&w1a, &w2a, &grad_w1a, &grad_w2a}) b->resize(std::size_t(r * rows));
    for (auto* b : {&w1b, &w2b, &grad_w1b, &grad_w2b}) b->resize(std::size_t(r * channels));
    for (auto* b : {&t1, &t2, &grad_t1, &grad_t2}) b->resize(std::size_t(r * r * kernel));
    detail::lycoris::kaiming_uniform<Backend>(gen, w1a.data(), r, rows);
    detail::lycoris::kaiming_uniform<Backend>(gen, w1b.data(), r, channels);
    detail::lycoris::kaiming_uniform<Backend>(gen, w2a.data(), r, rows);
    if (!cfg.init_weights) detail::lycoris::kaiming_uniform<Backend>(gen, w2b.data(), r, channels);  // else zero
    detail::lycoris::kaiming_uniform<Backend>(gen, t1.data(), r, r * kernel);
    detail::lycoris::kaiming_uniform<Backend>(gen, t2.data(), r, r * kernel);
  }

  /// CP form: out = alpha · K1 ⊙ K2 ([rows, cols]); `u1`, `u2` [r, cols] receive the cores t ×₂ w_b (kept for
  /// backward), `temp` is a [rows, cols] scratch.
  void delta_cp(Scratch& scratch, T alpha, MatrixView<T> out, MatrixView<T> temp, MatrixView<T> u1, MatrixView<T> u2) const {
    cp_ops::core(scratch, hada_t1(), hada_w1_b(), kernel, u1);
    cp_ops::core(scratch, hada_t2(), hada_w2_b(), kernel, u2);
    cp_ops::rebuild(scratch, T(1), hada_w1_a(), ConstMatrixView<T>(u1), T(0), temp);
    cp_ops::rebuild(scratch, alpha, hada_w2_a(), ConstMatrixView<T>(u2), T(0), out);
    Backend::mul(ConstMatrixView<T>(temp), out);
  }
  /// CP form: the six gradients from g = ∂L/∂(K1 ⊙ K2) (s and the rank-dropout mask applied), per beta:
  /// ∂K1 = g ⊙ K2 and ∂K2 = g ⊙ K1, each taken through Cp::grads. `u1`, `u2` are the forward's cores,
  /// `temp` [rows, cols] and `du` [r, cols] scratch. (The exact gradient: PEFT 0.21's HadaWeightCP.backward
  /// uses the other factor's core for ∂w1_a and ∂w2_a.)
  void factor_grads_cp(Scratch& scratch, ConstMatrixView<T> g, MatrixView<T> temp, ConstMatrixView<T> u1, ConstMatrixView<T> u2,
                       MatrixView<T> du, T beta) {
    cp_ops::rebuild(scratch, T(1), hada_w2_a(), u2, T(0), temp);  // K2
    Backend::mul(g, temp);                                        // ∂K1
    cp_ops::grads(scratch, ConstMatrixView<T>(temp), hada_w1_a(), hada_w1_b(), hada_t1(), u1, du, grad_hada_w1_a(), grad_hada_w1_b(),
                  grad_hada_t1(), kernel, beta);
    cp_ops::rebuild(scratch, T(1), hada_w1_a(), u1, T(0), temp);  // K1
    Backend::mul(g, temp);                                        // ∂K2
    cp_ops::grads(scratch, ConstMatrixView<T>(temp), hada_w2_a(), hada_w2_b(), hada_t2(), u2, du, grad_hada_w2_a(), grad_hada_w2_b(),
                  grad_hada_t2(), kernel, beta);
  }

  /// out = alpha · (w1_a w1_b) ⊙ (w2_a w2_b) ([rows, cols]); `temp` is a [rows, cols] scratch.
  void delta(typename Backend::template GemmScratch<T>& scratch, T alpha, MatrixView<T> out, MatrixView<T> temp) const {
    Backend::template gemm<Trans::no, Trans::no>(scratch, alpha, hada_w1_a(), hada_w1_b(), T(0), temp);
    Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), hada_w2_a(), hada_w2_b(), T(0), out);
    Backend::mul(ConstMatrixView<T>(temp), out);
  }
  /// The same, transposed: out = alpha · (w1_a w1_b)ᵀ ⊙ (w2_a w2_b)ᵀ ([cols, rows]); `temp` is [cols, rows].
  void delta_transposed(typename Backend::template GemmScratch<T>& scratch, T alpha, MatrixView<T> out, MatrixView<T> temp) const {
    Backend::template gemm<Trans::yes, Trans::yes>(scratch, alpha, hada_w1_b(), hada_w1_a(), T(0), temp);
    Backend::template gemm<Trans::yes, Trans::yes>(scratch, T(1), hada_w2_b(), hada_w2_a(), T(0), out);
    Backend::mul(ConstMatrixView<T>(temp), out);
  }
  /// Factor gradients from g = ∂L/∂(P1 ⊙ P2) (s and the rank-dropout mask already applied), per `beta`
  /// (0 overwrite, 1 accumulate): ∂P1 = g ⊙ P2 → dw1_a = ∂P1 w1_bᵀ, dw1_b = w1_aᵀ ∂P1; same for P2.
  /// `temp` is a [rows, cols] scratch. This is PEFT's HadaWeight.backward.
  void factor_grads(typename Backend::template GemmScratch<T>& scratch, ConstMatrixView<T> g, MatrixView<T> temp, T beta) {
    Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), hada_w2_a(), hada_w2_b(), T(0), temp);
    Backend::mul(g, temp);
    Backend::template gemm<Trans::no, Trans::yes>(scratch, T(1), ConstMatrixView<T>(temp), hada_w1_b(), beta, grad_hada_w1_a());
    Backend::template gemm<Trans::yes, Trans::no>(scratch, T(1), hada_w1_a(), ConstMatrixView<T>(temp), beta, grad_hada_w1_b());
    Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), hada_w1_a(), hada_w1_b(), T(0), temp);
    Backend::mul(g, temp);
    Backend::template gemm<Trans::no, Trans::yes>(scratch, T(1), ConstMatrixView<T>(temp), hada_w2_b(), beta, grad_hada_w2_a());
    Backend::template gemm<Trans::yes, Trans::no>(scratch, T(1), hada_w2_a(), ConstMatrixView<T>(temp), beta, grad_hada_w2_b());
  }
  /// Reserves the scratch for every product above.
  void reserve(typename Backend::template GemmScratch<T>& scratch) const {
    if (cp) {
      cp_ops::reserve(scratch, r, rows, channels, kernel);
      return;
    }
    scratch.reserve_gemm(rows, cols, r);
    scratch.reserve_gemm(rows, r, cols);
    scratch.reserve_gemm(r, cols, rows);
  }
  void zero_grad() {
    for (auto* b : {&grad_w1a, &grad_w1b, &grad_w2a, &grad_w2b, &grad_t1, &grad_t2}) b->zero();
  }
};

template <class Base>
class LohaBank;

/// The LoHa adapter kind: `peft::Adapted<peft::Linear<float>, peft::Loha>` (or beside LoRA, LoKr, (IA)³).
struct Loha {
  using config_type = LohaConfig;
  static constexpr const char* name = "loha";
  template <class Base>
  using bank = LohaBank<Base>;
};

namespace detail::lycoris {

/// LoHa adapters of one layer (Linear or Conv2d, per DeltaOps<Base>), one slot per named adapter. An
/// *additive* bank (as LoraBank): forward adds the base-layer product with ΔW of every active slot
/// (x ΔWᵀ for Linear, conv(x, ΔW) for Conv2d), with ΔW materialised in the context.
template <class T, class Backend, class Base>
class LohaBankImpl {
 public:
  using base_type = Base;
  using ops = DeltaOps<Base>;
  using adapter_type = LohaAdapter<T, Backend>;
  using Scratch = typename Backend::template GemmScratch<T>;
  template <class U>
  using buffer = typename Backend::template buffer<U>;
  static constexpr std::uint64_t stream_tag = 0x4C6F4861;  // "LoHa"
  static constexpr bool is_conv = std::is_same_v<Base, Conv2d<T, Backend>>;
  using steps = DeltaImageSteps<T, Backend>;

  struct Context {
    struct Slot {
      buffer<T> delta;   ///< ΔW as the last forward used it (scaled, rank-dropout mask applied), [out, in]
      buffer<T> mask;    ///< rank-dropout row mask [out] (only when rank_dropout > 0)
      std::vector<T> mask_host;  ///< the mask as drawn on the host, before its upload
      buffer<T> u1, u2;  ///< CP form only: the cores t ×₂ w_b of the last forward, [r, in]
      bool masked = false;
    };
    std::vector<Slot> slots;
    std::vector<int> ran;      ///< slots that contributed to the last forward
    std::vector<int> skipped;  ///< active slots skipped by module dropout in the last forward
    buffer<T> grad_delta;      ///< ∂L/∂(P1 ⊙ P2), [out, in], shared by the slots
    buffer<T> temp;            ///< [out, in] scratch, shared
    buffer<T> du;              ///< CP form: ∂L/∂core, [r, in] of the largest rank, shared
    typename ops::State op;    ///< the base-layer products' state (Conv2d: geometry and columns)
  };

  std::size_t size() const noexcept { return adapters_.size(); }
  adapter_type& at(int slot) { return adapters_[std::size_t(slot)]; }
  const adapter_type& at(int slot) const { return adapters_[std::size_t(slot)]; }

  int add(const base_type& base, const LohaConfig& cfg, Generator& gen, std::string_view name) {
    cfg.validate();
    (void)name;
    adapter_type a;
    if (const Index k = effective_kernel(base, cfg.use_effective_conv2d); k > 0)
      a.init_cp(cfg, ops::rows(base), in_channels(base), k, gen);
    else
      a.init(cfg, ops::rows(base), ops::cols(base), ops::transposed(base), gen);
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
    ctx.temp.resize(std::size_t(out * in));
    std::size_t ndu = 0;
    for (std::size_t i = 0; i < adapters_.size(); ++i) {
      const auto& a = adapters_[i];
      auto& s = ctx.slots[i];
      s.delta.resize(std::size_t(out * in));
      if (a.config.rank_dropout > 0) {
        s.mask.resize(std::size_t(out));
        s.mask_host.resize(std::size_t(out));
      }
      if (a.cp) {
        s.u1.resize(std::size_t(a.r * in));
        s.u2.resize(std::size_t(a.r * in));
        ndu = std::max(ndu, std::size_t(a.r * in));
      }
      a.reserve(scratch);
    }
    ctx.du.resize(ndu);
  }

  /// y += Σ_{active} x ΔWᵀ (Linear) or conv(x, ΔW) (Conv2d). In train mode (`dropout_on`), module dropout may skip a slot and rank dropout
  /// masks the rows of ΔW, with masks drawn from (seed, stream).
  void forward(Context& ctx, Scratch& scratch, const std::vector<int>& active, ConstMatrixView<T> x, MatrixView<T> y, bool dropout_on,
               std::uint64_t seed, std::uint64_t stream0) const {
    prepare(ctx, scratch, active, dropout_on, seed, stream0);
    for (int slot : ctx.ran) {
      const auto& a = adapters_[std::size_t(slot)];
      ops::forward(ctx.op, scratch, ConstMatrixView<T>(ctx.slots[std::size_t(slot)].delta.view(a.rows, a.cols)), x, y);
    }
  }

  /// dx += dy ΔW (Linear; col2im(ΔWᵀ dy_n) for Conv2d) for every slot that ran; trainable slots get their
  /// factor gradients per `mode` from ∂L/∂ΔW = dyᵀ x (Σ_n dy_n cols(x_n)ᵀ for Conv2d). A trainable slot skipped by module dropout gets zero gradients in overwrite mode.
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

  // ---- on the base's columns (Adapted<Conv2d, ...>; see DeltaImageSteps) ----------------------------------------
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
  /// w ← w + ΔW (safe merging computes the merged weight in a copy first).
  void merge_preview(int slot, Scratch& scratch, MatrixView<T> w) const { write_delta(slot, scratch, w, T(1), T(1)); }

  /// out = sign · ΔW + beta · out, in the base layout ([out, in], or [in, out] for a Conv1D-style base).
  /// Allocates two temporaries (merge time, not the hot path).
  void write_delta(int slot, Scratch& scratch, MatrixView<T> out, T sign, T beta) const {
    const auto& a = adapters_[std::size_t(slot)];
    const Index rows = a.transposed ? a.cols : a.rows, cols = a.transposed ? a.rows : a.cols;
    require_shape(out, rows, cols, "LoHa write_delta: out");
    buffer<T> d(std::size_t(rows * cols)), t(std::size_t(rows * cols));
    if (a.cp) {
      buffer<T> u1(std::size_t(a.r * cols)), u2(std::size_t(a.r * cols));
      a.reserve(scratch);
      a.delta_cp(scratch, sign * a.scaling, d.view(rows, cols), t.view(rows, cols), u1.view(a.r, cols), u2.view(a.r, cols));
    } else if (!a.transposed) {
      a.reserve(scratch);
      a.delta(scratch, sign * a.scaling, d.view(rows, cols), t.view(rows, cols));
    } else {
      scratch.reserve_gemm(rows, cols, a.r);
      a.delta_transposed(scratch, sign * a.scaling, d.view(rows, cols), t.view(rows, cols));
    }
    Backend::axpby(T(1), ConstMatrixView<T>(d.view(rows, cols)), beta, out);
  }

  template <class F>
  void visit_parameters(int slot, std::string_view name, F&& f) {
    auto& a = adapters_[std::size_t(slot)];
    const std::string n(name);
    f(ParamRef<T>{"hada_w1_a." + n, a.w1a.data(), a.grad_w1a.data(), a.w1a.size(), a.requires_grad, Backend::host_accessible});
    f(ParamRef<T>{"hada_w1_b." + n, a.w1b.data(), a.grad_w1b.data(), a.w1b.size(), a.requires_grad, Backend::host_accessible});
    f(ParamRef<T>{"hada_w2_a." + n, a.w2a.data(), a.grad_w2a.data(), a.w2a.size(), a.requires_grad, Backend::host_accessible});
    f(ParamRef<T>{"hada_w2_b." + n, a.w2b.data(), a.grad_w2b.data(), a.w2b.size(), a.requires_grad, Backend::host_accessible});
    if (a.cp) {  // PEFT registers hada_t1 / hada_t2 after the four factors
      f(ParamRef<T>{"hada_t1." + n, a.t1.data(), a.grad_t1.data(), a.t1.size(), a.requires_grad, Backend::host_accessible});
      f(ParamRef<T>{"hada_t2." + n, a.t2.data(), a.grad_t2.data(), a.t2.size(), a.requires_grad, Backend::host_accessible});
    }
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
      auto delta = s.delta.view(a.rows, a.cols);
      if (a.cp) a.delta_cp(scratch, a.scaling, delta, ctx.temp.view(a.rows, a.cols), s.u1.view(a.r, a.cols), s.u2.view(a.r, a.cols));
      else a.delta(scratch, a.scaling, delta, ctx.temp.view(a.rows, a.cols));
      s.masked = dropout_on && a.config.rank_dropout > 0;
      if (s.masked) {
        detail::lycoris::rank_dropout_mask<Backend>(s.mask_host, s.mask.view(1, a.rows), a.config.rank_dropout, /*rescale=*/true, seed,
                                                    detail::lycoris::rank_stream(stream_tag, stream0, slot));
        Backend::scale_rows(delta, s.mask.data());
      }
    }
  }
  /// A slot's factor gradients (per beta) from g = s·∂L/∂ΔW; applies the rank-dropout mask to g first.
  void slot_grads(Context& ctx, Scratch& scratch, int slot, MatrixView<T> g, T beta) {
    auto& a = adapters_[std::size_t(slot)];
    auto& s = ctx.slots[std::size_t(slot)];
    if (s.masked) Backend::scale_rows(g, s.mask.data());
    if (a.cp)
      a.factor_grads_cp(scratch, ConstMatrixView<T>(g), ctx.temp.view(a.rows, a.cols), ConstMatrixView<T>(s.u1.view(a.r, a.cols)),
                        ConstMatrixView<T>(s.u2.view(a.r, a.cols)), ctx.du.view(a.r, a.cols), beta);
    else
      a.factor_grads(scratch, ConstMatrixView<T>(g), ctx.temp.view(a.rows, a.cols), beta);
  }

  std::vector<adapter_type> adapters_;
};

}  // namespace detail::lycoris

/// LoHa adapters of one Linear layer (Conv1D-style [in, out] weights included).
template <class T, class Backend>
class LohaBank<Linear<T, Backend>> : public detail::lycoris::LohaBankImpl<T, Backend, Linear<T, Backend>> {};

/// LoHa adapters of one Conv2d layer (PEFT's loha.Conv2d, flat or CP form): ΔW [O, C·kh·kw].
template <class T, class Backend>
class LohaBank<Conv2d<T, Backend>> : public detail::lycoris::LohaBankImpl<T, Backend, Conv2d<T, Backend>> {};

/// The LoHa adapter `name` of an adapted layer (factors, gradients, scaling).
template <class Layer>
auto& loha_adapter(Layer& layer, const std::string& name) {
  return layer.template adapter<Loha>(name);
}

}  // namespace peft
