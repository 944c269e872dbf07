// peft++ — (IA)³ (Liu et al. 2022), as Hugging Face PEFT implements it: a learned vector that scales the
// layer's output, or — for layers listed in `feedforward_modules` — its input.
//
//   non-feed-forward:  y = (x Wᵀ + b) ⊙ l          l: [out]   (PEFT stores it as (out, 1))
//   feed-forward:      y = (x ⊙ l) Wᵀ + b          l: [in]    (PEFT stores it as (1, in))
//   several active adapters multiply their vectors; merge scales the rows (or columns) of W and, for
//   non-feed-forward layers, the bias; unmerge divides by (l + 1e-8), which is inexact near zero (as in PEFT).
#pragma once

#include <optional>
#include <regex>
#include <string>
#include <string_view>
#include <vector>

#include "peft/grad_mode.hpp"
#include "peft/layer/conv2d.hpp"
#include "peft/layer/embedding.hpp"
#include "peft/layer/linear.hpp"
#include "peft/param.hpp"
#include "peft/rng.hpp"

namespace peft {

/// (IA)³'s configuration with PEFT's names (`IA3Config`).
struct Ia3Config {
  /// PEFT's `feedforward_modules`, list form: a module is feed-forward when its path ends with an entry
  /// (plain suffix match, no dot required — PEFT's rule).
  std::vector<std::string> feedforward_modules;
  /// PEFT's `feedforward_modules`, string form: a regex that must match the whole module path.
  std::optional<std::string> feedforward_regex;
  bool fan_in_fan_out = false;
  /// true (default): ones, so the adapter starts as the identity; false: N(0, 1), as PEFT.
  bool init_ia3_weights = true;
  /// Resolved by `for_module`: whether this layer's input (true) or output (false) is scaled.
  bool is_feedforward = false;

  Ia3Config for_module(std::string_view path) const {
    Ia3Config c = *this;
    const std::string p(path);
    if (feedforward_regex) {
      c.is_feedforward = std::regex_match(p, std::regex(*feedforward_regex));
    } else if (!feedforward_modules.empty()) {
      c.is_feedforward = false;
      for (const auto& m : feedforward_modules)
        if (p.size() >= m.size() && p.compare(p.size() - m.size(), m.size(), m) == 0) c.is_feedforward = true;
    }
    return c;
  }
  void validate() const {}
};

template <class T, class Backend>
struct Ia3Adapter {
  template <class U>
  using buffer = typename Backend::template buffer<U>;
  Ia3Config config;
  bool feedforward = false;
  Index size = 0;  ///< in (feed-forward) or out
  buffer<T> l, grad_l;
  bool requires_grad = false;
  MatrixView<T> vector() { return l.view(1, size); }
  MatrixView<T> grad() { return grad_l.view(1, size); }
};

namespace detail {
/// How an (IA)³ vector maps onto a base layer: a vector over channels, each repeated over positions.
struct Ia3Geometry {
  Index out_channels = 0, out_positions = 1;  ///< output features = out_channels · out_positions
  Index in_channels = 0, in_positions = 1;    ///< input features = in_channels · in_positions
  Index in_kernel = 1;                        ///< weight columns per input channel (kh·kw for Conv2d)
  bool weight_out_major = true;               ///< weight rows are output channels ([out, in]); false: [in, out]
  bool input_scalable = true;                 ///< false for embeddings (the input is token ids)
};
template <class T, class B>
Ia3Geometry ia3_geometry(const Linear<T, B>& l) {
  return {l.out_features(), 1, l.in_features(), 1, 1, l.layout() == WeightLayout::out_in, true};
}
template <class T, class B>
Ia3Geometry ia3_geometry(const Conv2d<T, B>& c) {
  const auto& g = c.geometry();
  return {g.out_channels, g.positions(), g.in_channels, g.in_h * g.in_w, g.kernel_h * g.kernel_w, true, true};
}
template <class T, class B>
Ia3Geometry ia3_geometry(const Embedding<T, B>& e) {
  return {e.embedding_dim(), 1, e.num_embeddings(), 1, 1, false, false};  // the table is [num_embeddings, dim]
}
}  // namespace detail

template <class Base>
class Ia3Bank;

/// The (IA)³ adapter kind: `peft::Adapted<peft::Linear<float>, peft::Ia3>` (or beside LoRA).
struct Ia3 {
  using config_type = Ia3Config;
  static constexpr const char* name = "ia3";
  template <class Base>
  using bank = Ia3Bank<Base>;
};

/// (IA)³ adapters of one Linear, Conv2d or Embedding layer. A *scaling* bank: `Adapted` calls `pre_forward` (input scaling)
/// before the base, `post_forward` (output scaling) after the base and every additive adapter, and the
/// matching backward hooks in reverse order.
template <class Base>
class Ia3Bank {
 public:
  using base_type = Base;
  using T = typename Base::scalar;
  using Backend = typename Base::backend_type;
  using adapter_type = Ia3Adapter<T, Backend>;
  using Scratch = typename Backend::template GemmScratch<T>;
  template <class U>
  using buffer = typename Backend::template buffer<U>;

  struct Context {
    std::vector<int> ran;
    bool feedforward = false;  ///< which side the adapters that ran scale
    detail::Ia3Geometry geo;   ///< the base's geometry when the context was made
    buffer<T> expanded;        ///< combined, repeated over positions: one factor per feature
    buffer<T> combined;        ///< Π l over the slots that ran
    buffer<T> others;          ///< Π l over the other slots (for one slot's gradient)
    buffer<T> x_scaled;        ///< x ⊙ c (feed-forward): the input the base and additive adapters see
    buffer<T> dx_scaled;       ///< gradient w.r.t. x ⊙ c (feed-forward)
    buffer<T> y_pre;           ///< output before scaling (non-feed-forward)
    buffer<T> dy_scaled;       ///< dy ⊙ c (non-feed-forward)
    buffer<T> reduce;          ///< Σ_rows of a product, one per feature
    buffer<T> folded;          ///< reduce summed over positions, one per channel
    ConstMatrixView<T> x;      ///< the unscaled input (feed-forward)
  };

  std::size_t size() const noexcept { return adapters_.size(); }
  adapter_type& at(int slot) { return adapters_[std::size_t(slot)]; }
  const adapter_type& at(int slot) const { return adapters_[std::size_t(slot)]; }

  int add(const base_type& base, const Ia3Config& cfg, Generator& gen, std::string_view name) {
    cfg.validate();
    if constexpr (std::is_same_v<Base, Linear<T, Backend>>) {
      if (cfg.fan_in_fan_out != (base.layout() == WeightLayout::in_out))
        throw ConfigError(detail::cat("IA3 adapter '", name, "': fan_in_fan_out does not match the base weight layout"));
    }
    const auto geo = detail::ia3_geometry(base);
    if (cfg.is_feedforward && !geo.input_scalable)
      throw ConfigError(detail::cat("IA3 adapter '", name, "': feed-forward (input) scaling is impossible on an embedding, whose input is token ids"));
    if (!adapters_.empty() && adapters_.front().feedforward != cfg.is_feedforward)
      throw ConfigError(detail::cat("IA3 adapter '", name, "': the layer's IA3 adapters are ", adapters_.front().feedforward ? "" : "not ",
                                    "feed-forward; PEFT fixes is_feedforward per layer"));
    adapter_type a;
    a.config = cfg;
    a.feedforward = cfg.is_feedforward;
    a.size = cfg.is_feedforward ? geo.in_channels : geo.out_channels;
    weight_out_major_ = geo.weight_out_major;
    in_kernel_ = geo.in_kernel;
    a.l.resize(std::size_t(a.size));
    a.grad_l.resize(std::size_t(a.size));
    if (cfg.init_ia3_weights) Backend::fill(a.l.view(1, a.size), T(1));
    else Backend::random_normal(gen, a.l.view(1, a.size), 0.0, 1.0);
    adapters_.push_back(std::move(a));
    return int(adapters_.size() - 1);
  }
  void remove(int slot) { adapters_.erase(adapters_.begin() + slot); }

  void make_context(Context& ctx, Scratch&, Index max_batch, const base_type& base) const {
    ctx.ran.reserve(adapters_.size());
    ctx.geo = detail::ia3_geometry(base);
    if (adapters_.empty()) return;
    const bool ff = adapters_.front().feedforward;
    const Index channels = ff ? ctx.geo.in_channels : ctx.geo.out_channels;
    const Index features = channels * (ff ? ctx.geo.in_positions : ctx.geo.out_positions);
    ctx.combined.resize(std::size_t(channels));
    ctx.others.resize(std::size_t(channels));
    ctx.folded.resize(std::size_t(channels));
    ctx.expanded.resize(std::size_t(features));
    ctx.reduce.resize(std::size_t(features));
    if (ff) {
      ctx.x_scaled.resize(std::size_t(max_batch * features));
      ctx.dx_scaled.resize(std::size_t(max_batch * features));
    } else {
      ctx.y_pre.resize(std::size_t(max_batch * features));
      ctx.dy_scaled.resize(std::size_t(max_batch * features));
    }
  }

  /// Feed-forward adapters: returns x ⊙ Π l (in the context); otherwise x unchanged.
  ConstMatrixView<T> pre_forward(Context& ctx, const std::vector<int>& active, ConstMatrixView<T> x) const {
    ctx.ran.assign(active.begin(), active.end());
    ctx.feedforward = !active.empty() && adapters_.front().feedforward;
    if (active.empty() || !ctx.feedforward) return x;
    combine(ctx, -1);
    ctx.x = x;
    auto xs = ctx.x_scaled.view(x.rows, x.cols);
    Backend::copy(x, xs);
    Backend::scale_cols(xs, ctx.expanded.data());
    return xs;
  }
  /// Output adapters: y ← y ⊙ Π l, remembering y before scaling.
  void post_forward(Context& ctx, const std::vector<int>& active, MatrixView<T> y) const {
    ctx.ran.assign(active.begin(), active.end());  // (also set by pre_forward, which embeddings skip)
    ctx.feedforward = !active.empty() && adapters_.front().feedforward;
    if (ctx.ran.empty() || ctx.feedforward) return;
    combine(ctx, -1);
    if constexpr (kImages) {  // per image [O, P], one factor per row: y_pre = y and y ⊙= l in one pass
      const Index o = ctx.geo.out_channels, p = ctx.geo.out_positions;
      for (Index n = 0; n < y.rows; ++n)
        Backend::copy_scale_rows(Base::image(y, n, o, p), ctx.combined.data(), Base::image(ctx.y_pre.view(y.rows, y.cols), n, o, p));
      return;
    }
    Backend::copy(ConstMatrixView<T>(y), ctx.y_pre.view(y.rows, y.cols));
    Backend::scale_cols(y, ctx.expanded.data());
  }
  /// Output adapters: dl_k = Σ_rows(dy ⊙ y_pre) ⊙ Π_{j≠k} l_j; returns dy ⊙ Π l for the layers below.
  ConstMatrixView<T> post_backward(Context& ctx, ConstMatrixView<T> dy, GradMode mode) {
    if (ctx.ran.empty() || ctx.feedforward) return dy;
    auto d = ctx.dy_scaled.view(dy.rows, dy.cols);
    if constexpr (kImages) {  // per image [O, P]: the per-channel sums of dy ⊙ y_pre, and d = l ⊙ dy, one pass each
      const Index o = ctx.geo.out_channels, p = ctx.geo.out_positions;
      const auto y_pre = ConstMatrixView<T>(ctx.y_pre.view(dy.rows, dy.cols));
      for (Index n = 0; n < dy.rows; ++n) {
        const auto dyn = Base::image(dy, n, o, p);
        Backend::sum_cols_mul(dyn, Base::image(y_pre, n, o, p), ctx.folded.data(), T(1), n == 0 ? T(0) : T(1));
        Backend::add_scaled_rows(dyn, ctx.combined.data(), T(0), Base::image(d, n, o, p));
      }
      param_grads(ctx, mode, true);
      return d;
    }
    Backend::copy(dy, d);
    Backend::mul(ConstMatrixView<T>(ctx.y_pre.view(dy.rows, dy.cols)), d);  // d = dy ⊙ y_pre
    Backend::sum_rows(ConstMatrixView<T>(d), ctx.reduce.data(), T(1), T(0));
    param_grads(ctx, mode);
    Backend::copy(dy, d);
    Backend::scale_cols(d, ctx.expanded.data());
    return d;
  }
  /// Feed-forward adapters: the layers below write the gradient w.r.t. x ⊙ c here (empty: write dx directly).
  MatrixView<T> input_grad_scratch(Context& ctx, Index rows) {
    if (ctx.ran.empty() || !ctx.feedforward) return {};
    return ctx.dx_scaled.view(rows, ctx.x.cols);
  }
  /// Feed-forward adapters: dl_k = Σ_rows(g ⊙ x) ⊙ Π_{j≠k} l_j and dx (=|+=) g ⊙ Π l, g the scratch gradient.
  void pre_backward(Context& ctx, MatrixView<T> dx, GradMode input, GradMode params) {
    if (ctx.ran.empty() || !ctx.feedforward) return;
    auto g = ctx.dx_scaled.view(ctx.x.rows, ctx.x.cols);
    if (!dx.empty()) Backend::add_scaled_cols(ConstMatrixView<T>(g), ctx.expanded.data(), input == GradMode::accumulate ? T(1) : T(0), dx);
    Backend::mul(ctx.x, g);  // g ⊙ x
    Backend::sum_rows(ConstMatrixView<T>(g), ctx.reduce.data(), T(1), T(0));
    param_grads(ctx, params);
  }

  /// Merge: W rows (or columns) ⊙ l and, for output scaling, bias ⊙ l; unmerge (sign < 0) divides by l + 1e-8.
  void apply_delta(int slot, base_type& base, T sign) const { scale_weight(slot, base.weight(), base.bias(), sign > 0); }
  /// w ← w as merged (a preview used by safe merging).
  void merge_preview(int slot, Scratch&, MatrixView<T> w) const { scale_weight(slot, w, MatrixView<T>{}, true); }

  template <class F>
  void visit_parameters(int slot, std::string_view name, F&& f) {
    auto& a = adapters_[std::size_t(slot)];
    f(ParamRef<T>{"ia3_l." + std::string(name), a.l.data(), a.grad_l.data(), a.l.size(), a.requires_grad, Backend::host_accessible});
  }
  void set_requires_grad(int slot, bool on) { adapters_[std::size_t(slot)].requires_grad = on; }
  void zero_grad(int slot) { adapters_[std::size_t(slot)].grad_l.zero(); }

 private:
  /// ctx.combined = Π l over ctx.ran, skipping `skip`; into ctx.others when skip >= 0.
  void combine(Context& ctx, int skip) const {
    auto& out = skip < 0 ? ctx.combined : ctx.others;
    const Index n = Index(out.size());
    auto o = out.view(1, n);
    Backend::fill(o, T(1));
    for (int s : ctx.ran)
      if (s != skip) Backend::mul(adapters_[std::size_t(s)].l.view(1, n), o);
    if (skip < 0 && !(kImages && !ctx.feedforward))  // one factor per feature: channel c covers features [c·P, (c+1)·P)
      expand(ctx.combined.data(), ctx.expanded.view(n, Index(ctx.expanded.size()) / n));
  }
  /// e[c, :] = v[c] for every channel c of e [channels, positions].
  static void expand(const T* v, MatrixView<T> e) {
    Backend::fill(e, T(0));
    Backend::add_col_vector(e, v, T(1));
  }
  /// dl_k from the per-feature sums in ctx.reduce (folded over positions here), or from ctx.folded as given.
  void param_grads(Context& ctx, GradMode mode, bool folded_given = false) {
    const T beta = mode == GradMode::accumulate ? T(1) : T(0);
    const Index channels = Index(ctx.folded.size());
    if (!folded_given)
      Backend::sum_cols(ConstMatrixView<T>(ctx.reduce.view(channels, Index(ctx.reduce.size()) / channels)), ctx.folded.data(), T(1), T(0));
    for (int s : ctx.ran) {
      auto& a = adapters_[std::size_t(s)];
      if (!a.requires_grad) continue;
      combine(ctx, s);
      auto others = ctx.others.view(1, channels);
      Backend::mul(ConstMatrixView<T>(ctx.folded.view(1, channels)), others);  // folded ⊙ Π_{j≠k} l_j
      Backend::axpby(T(1), ConstMatrixView<T>(others), beta, a.grad_l.view(1, channels));
    }
  }
  /// Merge: w ⊙ l per row or column (and bias ⊙ l); unmerge: w ⊙ 1 / (l + 1e-8). Not on the hot path: allocates.
  void scale_weight(int slot, MatrixView<T> w, MatrixView<T> bias, bool merge) const {
    const auto& a = adapters_[std::size_t(slot)];
    // the stored weight is [out, in·kernel] (or [in, out]); the vector runs over output or input channels
    const bool along_cols = a.feedforward == weight_out_major_;
    const Index per = a.feedforward && weight_out_major_ ? in_kernel_ : 1;
    buffer<T> f(std::size_t(a.size)), wide;
    auto fv = f.view(1, a.size);
    if (merge) {
      Backend::copy(a.l.view(1, a.size), fv);
    } else {  // 1 / (l + 1e-8), PEFT's unmerge divisor
      buffer<T> one(std::size_t(a.size));
      Backend::fill(fv, T(1e-8));
      Backend::axpby(T(1), a.l.view(1, a.size), T(1), fv);
      Backend::fill(one.view(1, a.size), T(1));
      Backend::div(one.view(1, a.size), ConstMatrixView<T>(fv), fv);
    }
    const T* factors = f.data();
    if (along_cols && per > 1) {  // Conv2d input channels: column j of [O, C·kh·kw] belongs to channel j / (kh·kw)
      wide.resize(std::size_t(a.size * per));
      expand(f.data(), wide.view(a.size, per));
      factors = wide.data();
    }
    if (along_cols) Backend::scale_cols(w, factors);
    else Backend::scale_rows(w, factors);
    if (!a.feedforward && !bias.empty()) Backend::scale_cols(MatrixView<T>(bias.data, 1, bias.size()), f.data());
  }

  /// Conv2d: output scaling runs per image on [channels, positions] views with per-row factors.
  static constexpr bool kImages = requires { Base::per_image; };

  std::vector<adapter_type> adapters_;
  bool weight_out_major_ = true;
  Index in_kernel_ = 1;
};

template <class Layer>
auto& ia3_adapter(Layer& layer, const std::string& name) {
  return layer.template adapter<Ia3>(name);
}

}  // namespace peft
