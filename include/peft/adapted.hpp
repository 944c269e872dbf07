// peft++ — Adapted<Base, Kinds...>: a base layer composed at compile time with one or more adapter kinds
// (LoRA, ...), each holding any number of named adapters at run time, as Hugging Face PEFT's tuner layers
// do (active set, disable, merge/unmerge stack, delete).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/errors.hpp"
#include "peft/grad_mode.hpp"
#include "peft/param.hpp"
#include "peft/rng.hpp"
#include "peft/view.hpp"

namespace peft {

namespace detail {
/// A process-wide counter: every layer and every change of its adapters gets a value no other layer has,
/// so a context is only ever accepted by the layer (and adapter set) it was made for.
inline std::uint64_t next_generation() {
  static std::atomic<std::uint64_t> counter{1};
  return counter.fetch_add(1, std::memory_order_relaxed);
}
template <class F, std::size_t... I>
constexpr void for_each_index(F&& f, std::index_sequence<I...>) {
  (f(std::integral_constant<std::size_t, I>{}), ...);
}
template <class Config, class... Kinds>
constexpr std::size_t kind_index_of() {
  constexpr bool match[] = {std::is_same_v<typename Kinds::config_type, Config>...};
  for (std::size_t i = 0; i < sizeof...(Kinds); ++i)
    if (match[i]) return i;
  return sizeof...(Kinds);
}
template <class Kind, class... Kinds>
constexpr std::size_t kind_position() {
  constexpr bool match[] = {std::is_same_v<Kinds, Kind>...};
  for (std::size_t i = 0; i < sizeof...(Kinds); ++i)
    if (match[i]) return i;
  return sizeof...(Kinds);
}
}  // namespace detail

/// Tag for make_context: also size the buffers of forward_mixed / backward_mixed (mixed-adapter batches).
struct MixedBatches {};
inline constexpr MixedBatches mixed_batches{};

/// A base layer (e.g. `Linear<float>`) with adapters of the given kinds (e.g. `Lora`).
///
/// Forward: the base assigns y; every active, unmerged adapter adds its contribution (their deltas sum).
/// Backward: the base writes dx per the `input` GradMode, adapters accumulate into dx; parameter
/// gradients of trainable adapters are written per the `params` GradMode. The base weight gets no
/// gradient unless `base().set_requires_grad(true)`.
template <class Base, class... Kinds>
class Adapted {
  static_assert(sizeof...(Kinds) >= 1, "peft::Adapted needs at least one adapter kind, e.g. Adapted<Linear<float>, Lora>");

 public:
  using base_type = Base;
  using scalar = typename Base::scalar;
  using backend_type = typename Base::backend_type;
  using T = scalar;
  using input_type = typename Base::input_type;  ///< ConstMatrixView<T> (Linear) or token ids (Embedding)
  using Scratch = typename backend_type::template GemmScratch<T>;
  using Banks = std::tuple<typename Kinds::template bank<Base>...>;
  static constexpr std::size_t num_kinds = sizeof...(Kinds);

  struct Context {
    typename Base::Context base;
    std::tuple<typename Kinds::template bank<Base>::Context...> banks;
    std::uint64_t generation = 0;
    std::uint64_t seed = 0;
    std::uint64_t merge_state = 0;  ///< the layer's merge state at forward time
    bool image_wise = false;        ///< the last forward ran the additive adapters on the base's columns (Conv2d)
    bool folded = false;            ///< ... and the base's product ran on weff = W + the ΔW the adapters folded into it
    typename backend_type::template buffer<T> weff;  ///< Conv2d: the folded weight [O, C·kh·kw]
    /// forward_mixed's state (buffers sized only by make_context(max_batch, mixed_batches))
    struct Mixed {
      typename backend_type::template buffer<T> x, y, dx;  ///< rows grouped by adapter: [max_batch, in], [max_batch, out], [max_batch, in]
      std::vector<Index> perm;       ///< grouped row i came from batch row perm[i]
      std::vector<Index> offset;     ///< group g holds grouped rows [offset[g], offset[g + 1])
      std::vector<int> entry;        ///< group g's adapter (index into adapter_names())
      std::vector<Index> count;      ///< per adapter, scratch for the grouping
      std::vector<int> one;          ///< the single-slot active list passed to a bank
      Index max_batch = 0;
      std::size_t groups = 0;
      bool sized = false;            ///< made with mixed_batches
      bool last = false;             ///< the last forward on this context was forward_mixed
    } mixed;
  };

  Adapted() = default;
  explicit Adapted(Base base, std::string module_path = {}) : base_(std::move(base)), path_(std::move(module_path)) {}
  // a copy is a different layer: contexts of the original are not valid for it
  Adapted(const Adapted& o) : Adapted(o, 0) {}
  Adapted(Adapted&&) noexcept = default;
  Adapted& operator=(const Adapted& o) {
    if (this != &o) *this = Adapted(o);
    return *this;
  }
  Adapted& operator=(Adapted&&) noexcept = default;

  Base& base() noexcept { return base_; }
  const Base& base() const noexcept { return base_; }
  Index in_features() const noexcept { return base_.in_features(); }
  Index out_features() const noexcept { return base_.out_features(); }
  /// The module path used for rank/alpha patterns and checkpoint keys (e.g. "layers.0.q_proj").
  const std::string& module_path() const noexcept { return path_; }
  void set_module_path(std::string p) { path_ = std::move(p); }

  // ---- adapter management ------------------------------------------------------------------------

  /// Adds an adapter named `name`. The config's type picks the kind (LoraConfig → Lora). Patterns in the
  /// config are resolved against module_path(). The first adapter of a layer becomes active and
  /// trainable; later ones are added inactive and frozen (PEFT's add_adapter). Contexts made before this
  /// call must be made again.
  template <class Config>
  void add_adapter(const std::string& name, const Config& config, Generator& gen) {
    constexpr std::size_t k = detail::kind_index_of<Config, Kinds...>();
    static_assert(k < num_kinds, "this Adapted layer has no adapter kind for this config type");
    check_new_name(name);
    if constexpr (requires { config.use_dora; }) {
      if (config.use_dora && k > 0)
        throw ConfigError(detail::cat("add_adapter('", name, "'): DoRA rescales the outputs of the adapter kinds declared before Lora; declare Lora first, e.g. Adapted<Base, Lora, Loha>"));
    }
    const int slot = std::get<k>(banks_).add(base_, config.for_module(path_), gen, name);
    entries_.push_back({name, k, slot});
    if (!seed_set_) seed_ = detail::mix64(gen.seed() ^ detail::mix64(gen.next_stream()));  // layers differ in their masks
    generation_ = detail::next_generation();
    if (entries_.size() == 1) set_adapter(name);
  }

  /// Removes an adapter. A merged adapter cannot be deleted (StateError, nothing changes). If it was the
  /// only active one, the alphabetically first remaining adapter becomes active (PEFT's rule).
  void delete_adapter(const std::string& name) {
    const auto it = find(name);
    if (is_merged(name)) throw StateError(detail::cat("delete_adapter: adapter '", name, "' is merged; unmerge it first"));
    const Entry e = *it;
    for_kind(e.kind, [&](auto& bank) { bank.remove(e.slot); });
    entries_.erase(it);
    for (auto& o : entries_)
      if (o.kind == e.kind && o.slot > e.slot) --o.slot;
    const bool was_active = std::find(active_.begin(), active_.end(), name) != active_.end();
    std::erase(active_, name);
    generation_ = detail::next_generation();
    if (was_active && active_.empty() && !entries_.empty()) {  // PEFT: the alphabetically first remaining one
      auto first = std::min_element(entries_.begin(), entries_.end(), [](auto& a, auto& b) { return a.name < b.name; });
      set_adapter(first->name);  // active and trainable
    }
    refresh();
  }

  /// Makes `names` the active adapters (their outputs are summed). Active adapters become trainable and
  /// the others frozen, unless `inference_mode` is set (then all stay frozen).
  void set_adapter(const std::vector<std::string>& names, bool inference_mode = false) {
    for (const auto& n : names) find(n);
    for (std::size_t i = 0; i < names.size(); ++i)
      for (std::size_t j = 0; j < i; ++j)
        if (names[i] == names[j]) throw AdapterError(detail::cat("set_adapter: adapter '", names[i], "' is listed twice"));
    active_ = names;
    for (const auto& e : entries_) {
      const bool on = !inference_mode && std::find(active_.begin(), active_.end(), e.name) != active_.end();
      for_kind(e.kind, [&](auto& bank) { bank.set_requires_grad(e.slot, on); });
    }
    refresh();
  }
  void set_adapter(const std::string& name, bool inference_mode = false) { set_adapter(std::vector<std::string>{name}, inference_mode); }
  /// Turns gradients of one adapter on or off without changing the active set.
  void set_requires_grad(const std::string& name, bool on) {
    const auto& e = *find(name);
    for_kind(e.kind, [&](auto& bank) { bank.set_requires_grad(e.slot, on); });
  }

  const std::vector<std::string>& active_adapters() const noexcept { return active_; }
  std::vector<std::string> adapter_names() const {
    std::vector<std::string> n;
    for (const auto& e : entries_) n.push_back(e.name);
    return n;
  }
  bool has_adapter(std::string_view name) const {
    return std::any_of(entries_.begin(), entries_.end(), [&](auto& e) { return e.name == name; });
  }

  /// Bypasses every adapter: forward gives the base output exactly. Merged adapters are unmerged first.
  void disable_adapters() {
    if (!merged_.empty()) unmerge();
    enabled_ = false;
    refresh();
  }
  void enable_adapters() {
    enabled_ = true;
    refresh();
  }
  bool adapters_enabled() const noexcept { return enabled_; }

  /// Typed access to one adapter's weights, e.g. `layer.adapter<Lora>("default").A()`.
  template <class Kind>
  auto& adapter(const std::string& name) {
    constexpr std::size_t k = detail::kind_position<Kind, Kinds...>();
    static_assert(k < num_kinds, "this Adapted layer has no such adapter kind");
    const auto& e = *find(name);
    if (e.kind != k) throw AdapterError(detail::cat("adapter '", name, "' is not of kind ", Kind::name));
    return std::get<k>(banks_).at(e.slot);
  }
  template <class Kind>
  const auto& adapter(const std::string& name) const { return const_cast<Adapted*>(this)->template adapter<Kind>(name); }

  // ---- merging ---------------------------------------------------------------------------------------

  /// Adds the deltas of `names` (default: the active adapters) into the base weight. Merging an adapter
  /// that is already merged is a StateError. With `safe_merge`, the merged weight is checked for NaN/Inf
  /// first and nothing is changed if any appears (PEFT's safe_merge).
  void merge(std::optional<std::vector<std::string>> names = std::nullopt, bool safe_merge = false) {
    if (!enabled_) throw StateError("merge: adapters are disabled; enable_adapters() first (a disabled layer gives the base output exactly)");
    const auto list = names ? *names : active_;
    for (const auto& n : list) {
      find(n);
      if (is_merged(n)) throw StateError(detail::cat("merge: adapter '", n, "' is already merged"));
    }
    for (const auto& n : list) {
      const auto& e = *find(n);
      if (safe_merge) {
        auto w = base_.weight();
        typename backend_type::template buffer<T> tmp(std::size_t(w.size()));
        auto tv = tmp.view(w.rows, w.cols);
        backend_type::copy(ConstMatrixView<T>(w), tv);
        Scratch s;
        for_kind(e.kind, [&](auto& bank) { bank.merge_preview(e.slot, s, tv); });
        if (!backend_type::all_finite(ConstMatrixView<T>(tv)))  // a backend op: on a device backend tmp is device memory
          throw StateError(detail::cat("NaNs detected in the merged weights. The adapter ", n, " seems to be broken"));
      }
      for_kind(e.kind, [&](auto& bank) { bank.apply_delta(e.slot, base_, T(1)); });
      merged_.push_back(n);
    }
    refresh();
  }
  /// Subtracts every merged delta again, last merged first.
  void unmerge() {
    while (!merged_.empty()) {
      const auto& e = *find(merged_.back());
      for_kind(e.kind, [&](auto& bank) { bank.apply_delta(e.slot, base_, T(-1)); });
      merged_.pop_back();
    }
    refresh();
  }
  const std::vector<std::string>& merged_adapters() const noexcept { return merged_; }
  bool merged() const noexcept { return !merged_.empty(); }

  /// Merges the active adapters (those not merged yet) and returns the plain base layer (PEFT's
  /// merge_and_unload). The Adapted object is consumed.
  Base merge_and_unload() && {
    std::vector<std::string> todo;
    if (enabled_)
      for (const auto& n : active_)
        if (!is_merged(n)) todo.push_back(n);
    merge(todo);
    return std::move(base_);
  }
  /// Returns the base layer without merging (merged adapters are unmerged first; PEFT's unload).
  Base unload() && {
    unmerge();
    return std::move(base_);
  }

  /// The adapter's ΔW in the base weight's layout ([out, in], or [in, out] for fan_in_fan_out).
  void delta_weight(const std::string& name, MatrixView<T> out) const {
    const auto& e = *find(name);
    require_shape(out, base_.weight().rows, base_.weight().cols, detail::cat("delta_weight('", name, "')"));
    Scratch s;
    for_kind(e.kind, [&](auto& bank) {
      if constexpr (requires { bank.write_delta(e.slot, s, out, T(1), T(0)); }) bank.write_delta(e.slot, s, out, T(1), T(0));
      else throw AdapterError(detail::cat("delta_weight: adapter '", name, "' scales the layer; it has no additive delta weight"));
    });
  }

  // ---- training ----------------------------------------------------------------------------------------

  /// Train mode enables dropout; eval mode disables it. Default: train.
  void train(bool on = true) noexcept { training_ = on; }
  void eval() noexcept { training_ = false; }
  bool is_training() const noexcept { return training_; }
  /// Seed of the dropout masks. Every forward in train mode draws new masks; `set_seed` restarts the
  /// sequence, so two forwards after the same `set_seed` use the same masks. Until it is called, the seed
  /// is drawn from the Generator passed to add_adapter, so different layers get different masks.
  void set_seed(std::uint64_t seed) noexcept {
    seed_ = seed;
    seed_set_ = true;
    forwards_ = 0;
  }

  /// A context for batches of up to `max_batch` rows: saved activations and GEMM scratch. After this,
  /// forward and backward allocate nothing. Adding or deleting adapters invalidates it.
  Context make_context(Index max_batch) const {
    Context ctx;
    ctx.base = base_.make_context(max_batch);
    detail::for_each_index(
        [&](auto k) {
          auto& bank = std::get<k>(banks_);
          auto& bctx = std::get<k>(ctx.banks);
          if constexpr (requires { bank.make_context(bctx, ctx.base.scratch, max_batch, base_); })
            bank.make_context(bctx, ctx.base.scratch, max_batch, base_);  // banks that need the base's geometry
          else
            bank.make_context(bctx, ctx.base.scratch, max_batch);
        },
        std::index_sequence_for<Kinds...>{});
    if constexpr (base_per_image && any_bank_folds) ctx.weff.resize(std::size_t(base_.weight().size()));  // (not for Ia3 alone)
    ctx.generation = generation_;
    return ctx;
  }

  /// y = base(x) + Σ active adapters. requires: x [batch, in], y [batch, out], batch <= max_batch of ctx.
  void forward(Context& ctx, input_type x, MatrixView<T> y) {
    check_context(ctx, "forward");
    base_.check_io(ctx.base, x, y, "Adapted.forward");
    bind_base();
    ctx.merge_state = merge_state_;
    ctx.mixed.last = false;
    ctx.seed = detail::random_bits(seed_, 0x5EEDull, forwards_++);  // distinct for every (seed, forward count)
    // 1. input-scaling adapters ((IA)³ on feed-forward layers): the base and additive adapters see x ⊙ l
    input_type xin = x;
    each_kind([&](auto& bank, auto& bctx, const auto& active) {
      if constexpr (requires { bank.pre_forward(bctx, active, xin); }) xin = bank.pre_forward(bctx, active, xin);
    }, ctx);
    // 2. the base assigns y, 3. additive adapters (LoRA, ...) add their deltas. On a Conv2d base whose additive
    // banks all can, 2 and 3 run image by image on the base's im2col columns (one im2col per image for all).
    ctx.image_wise = false;
    ctx.folded = false;
    if constexpr (base_per_image) {
      if (image_wise_ready(ctx, xin, y)) {
        ctx.image_wise = true;
        each_kind([&](auto& bank, auto& bctx, const auto& active) {
          if constexpr (requires { bank.image_begin(bctx, ctx.base.scratch, active, xin, training_, ctx.seed, 0); })
            bank.image_begin(bctx, ctx.base.scratch, active, xin, training_, ctx.seed, 0);
        }, ctx);
        // when every additive bank that runs can, its ΔW joins the base's product: y_n = (W + Σ ΔW)·cols_n
        ConstMatrixView<T> w{};
        if (fold_ready(ctx, xin.rows)) {
          auto wf = ctx.weff.view(base_.weight().rows, base_.weight().cols);
          backend_type::copy(ConstMatrixView<T>(base_.weight()), wf);
          each_kind([&](auto& bank, auto& bctx, const auto& active) {
            if constexpr (requires { bank.image_fold(bctx, ctx.base.scratch, wf); })
              if (!active.empty()) bank.image_fold(bctx, ctx.base.scratch, wf);
          }, ctx);
          ctx.folded = true;
          w = wf;
        }
        const Index o = base_.geometry().out_channels, p = base_.geometry().positions();
        base_.forward_into(ctx.base, xin, y, [&](Index n, ConstMatrixView<T> cols) {
          const MatrixView<T> yn = Base::image(y, n, o, p);
          each_kind([&](auto& bank, auto& bctx, const auto&) {
            if constexpr (requires { bank.image_forward(bctx, ctx.base.scratch, n, cols, yn); }) bank.image_forward(bctx, ctx.base.scratch, n, cols, yn);
          }, ctx);
        }, w);
      }
    }
    if (!ctx.image_wise) {
      base_.forward_into(ctx.base, xin, y);
      each_kind([&](auto& bank, auto& bctx, const auto& active) {
        if constexpr (requires { bank.forward(bctx, ctx.base.scratch, active, xin, y, training_, ctx.seed, 0); })
          bank.forward(bctx, ctx.base.scratch, active, xin, y, training_, ctx.seed, 0);
      }, ctx);
    }
    ctx.base.x = xin;
    ctx.base.has_forward = true;
    // 4. output-scaling adapters ((IA)³) scale the sum
    each_kind([&](auto& bank, auto& bctx, const auto& active) {
      if constexpr (requires { bank.post_forward(bctx, active, y); }) bank.post_forward(bctx, active, y);
    }, ctx);
  }

  /// Backward of the forward recorded in ctx. dx ([batch, in], or empty) is written per `input` by the
  /// base and accumulated by the adapters; adapter parameter gradients per `params`.
  void backward(Context& ctx, ConstMatrixView<T> dy, MatrixView<T> dx, GradMode params = GradMode::accumulate,
                GradMode input = GradMode::overwrite) {
    check_context(ctx, "backward");
    if (ctx.mixed.last) throw StateError("Adapted.backward: the last forward on this context was forward_mixed; use backward_mixed");
    base_.check_backward(ctx.base, dy, dx, "Adapted.backward");
    bind_base();
    if (!merged_.empty())
      throw StateError(detail::cat("Adapted.backward: adapter '", merged_.front(), "' is merged into the base weight; unmerge before training"));
    if (ctx.merge_state != merge_state_)
      throw StateError("Adapted.backward: adapters were merged, unmerged, enabled or disabled since this forward; run forward again");
    // reverse order of forward: output scaling, then base and additive adapters, then input scaling
    ConstMatrixView<T> dyin = dy;
    each_kind([&](auto& bank, auto& bctx, const auto&) {
      if constexpr (requires { bank.post_backward(bctx, dyin, params); }) dyin = bank.post_backward(bctx, dyin, params);
    }, ctx);
    MatrixView<T> dxin = dx;  // with input scaling, the layers below write the gradient w.r.t. x ⊙ l to a scratch
    bool scaled_input = false;
    each_kind([&](auto& bank, auto& bctx, const auto&) {
      if constexpr (requires { bank.input_grad_scratch(bctx, dy.rows); }) {
        if (auto s = bank.input_grad_scratch(bctx, dy.rows); !s.empty()) {
          dxin = s;
          scaled_input = true;
        }
      }
    }, ctx);
    // banks that rescale the base output (DoRA) may hand the base the gradient of its own output
    ConstMatrixView<T> dybase = dyin;
    each_kind([&](auto& bank, auto& bctx, const auto&) {
      if constexpr (requires { bank.base_output_grad(bctx, dybase); }) dybase = bank.base_output_grad(bctx, dybase);
    }, ctx);
    const bool base_accumulates = !scaled_input && input == GradMode::accumulate;
    const T input_beta = base_accumulates ? T(1) : T(0), params_beta = params == GradMode::accumulate ? T(1) : T(0);
    if (params == GradMode::overwrite)  // the contract: overwrite assigns every adapter gradient, also of those that did not run
      each_kind([&](auto& bank, auto& bctx, const auto&) {
        for (std::size_t s = 0; s < bank.size(); ++s)
          if (std::find(bctx.ran.begin(), bctx.ran.end(), int(s)) == bctx.ran.end()) bank.zero_grad(int(s));
      }, ctx);
    if constexpr (base_per_image) {
      if (ctx.image_wise) {
        // one pass over the images: one im2col for every parameter gradient that needs columns, the base's and the
        // adapters' input gradients summed in one dcols, one col2im
        bool need_cols = false;
        each_kind([&](auto& bank, auto& bctx, const auto&) {
          if constexpr (requires { bank.image_needs_columns(bctx); }) need_cols = need_cols || bank.image_needs_columns(bctx);
        }, ctx);
        const Index o = base_.geometry().out_channels, p = base_.geometry().positions();
        base_.backward_images(ctx.base, ctx.base.x, dybase, dxin, input_beta, params_beta, need_cols,
                              [&](Index n, ConstMatrixView<T> cols, MatrixView<T> dcols, bool first) {
                                const ConstMatrixView<T> dyn = Base::image(dyin, n, o, p);
                                each_kind([&](auto& bank, auto& bctx, const auto&) {
                                  if constexpr (requires { bank.image_backward(bctx, ctx.base.scratch, n, first, cols, dyn, dcols, params); })
                                    bank.image_backward(bctx, ctx.base.scratch, n, first, cols, dyn, dcols, params);
                                }, ctx);
                              },
                              ctx.folded ? ConstMatrixView<T>(ctx.weff.view(base_.weight().rows, base_.weight().cols)) : ConstMatrixView<T>{});
        each_kind([&](auto& bank, auto& bctx, const auto&) {
          if constexpr (requires { bank.image_end(bctx, ctx.base.scratch, dxin, dy.rows, params, ctx.seed); })
            bank.image_end(bctx, ctx.base.scratch, dxin, dy.rows, params, ctx.seed);
        }, ctx);
      }
    }
    if (!ctx.image_wise) {
      base_.backward_input(ctx.base, dybase, dxin, input_beta);
      if (base_.requires_grad()) base_.backward_params(ctx.base, ctx.base.x, dybase, params_beta);
      each_kind([&](auto& bank, auto& bctx, const auto&) {
        if constexpr (requires { bank.backward(bctx, ctx.base.scratch, ctx.base.x, dyin, dxin, params, ctx.seed); })
          bank.backward(bctx, ctx.base.scratch, ctx.base.x, dyin, dxin, params, ctx.seed);
      }, ctx);
    }
    each_kind([&](auto& bank, auto& bctx, const auto&) {
      if constexpr (requires { bank.pre_backward(bctx, dx, input, params); }) bank.pre_backward(bctx, dx, input, params);
    }, ctx);
  }

  // ---- mixed-adapter batches (PEFT's adapter_names) ------------------------------------------------

  /// make_context, plus the buffers of forward_mixed / backward_mixed: two [max_batch, in] and one
  /// [max_batch, out] matrix and a few index lists. After this, the mixed path allocates nothing either.
  Context make_context(Index max_batch, MixedBatches) const {
    Context ctx = make_context(max_batch);
    auto& m = ctx.mixed;
    m.x.resize(std::size_t(max_batch * in_features()));
    m.dx.resize(std::size_t(max_batch * in_features()));
    m.y.resize(std::size_t(max_batch * out_features()));
    m.perm.resize(std::size_t(max_batch));
    m.offset.resize(entries_.size() + 1);
    m.entry.resize(entries_.size());
    m.count.resize(entries_.size());
    m.one.reserve(1);
    m.max_batch = max_batch;
    m.sized = true;
    return ctx;
  }

  /// Per-row adapter indices for forward_mixed, from PEFT-style names: "__base__" (no adapter) → -1. An
  /// unknown name is an AdapterError, or -1 with `missing_is_base` (PEFT's rule on one layer: a layer
  /// without that adapter gives the base output for those rows). Indices are valid until adapters are
  /// added or deleted. Allocates; call it once per batch layout, not in the hot path.
  std::vector<int> adapter_indices(const std::vector<std::string>& names, bool missing_is_base = false) const {
    std::vector<int> out;
    out.reserve(names.size());
    for (const auto& n : names) {
      if (n == "__base__") {
        out.push_back(-1);
        continue;
      }
      auto it = std::find_if(entries_.begin(), entries_.end(), [&](auto& e) { return e.name == n; });
      if (it == entries_.end()) {
        if (missing_is_base) {
          out.push_back(-1);
          continue;
        }
        find(n);  // throws, listing the layer's adapters
      }
      out.push_back(int(it - entries_.begin()));
    }
    return out;
  }

  /// Mixed-adapter batch (PEFT's `adapter_names=`): row i of the output is base(x_i) plus the delta of
  /// adapter row_adapter[i] only (an index from adapter_indices; -1: the base output alone), whatever the
  /// active set — the same numbers as running that row alone with only that adapter active (up to the
  /// order of floating-point sums). Rows are grouped by adapter (a stable counting sort into the context's
  /// buffers); each group runs the adapter's usual forward on its gathered rows. Additive adapters only
  /// (LoRA, LoHa, LoKr, ...); DoRA and scaling adapters ((IA)³) are refused, as is a merged layer. With
  /// adapters disabled every row gets the base output. Needs make_context(max_batch, mixed_batches).
  void forward_mixed(Context& ctx, ConstMatrixView<T> x, MatrixView<T> y, std::span<const int> row_adapter)
    requires std::is_same_v<input_type, ConstMatrixView<T>>
  {
    check_context(ctx, "forward_mixed");
    auto& m = ctx.mixed;
    if (!m.sized) throw StateError("Adapted.forward_mixed: the context was made without mixed_batches; use make_context(max_batch, peft::mixed_batches)");
    base_.check_io(ctx.base, x, y, "Adapted.forward_mixed");
    if (Index(row_adapter.size()) != x.rows)
      throw ShapeError(detail::cat("Adapted.forward_mixed: ", row_adapter.size(), " adapter indices for a batch of ", x.rows, " rows"));
    if (!merged_.empty())
      throw StateError(detail::cat("Adapted.forward_mixed: adapter '", merged_.front(), "' is merged; mixed batches need unmerged adapters (as PEFT)"));
    for (int a : row_adapter) {
      if (a < -1 || a >= int(entries_.size()))
        throw AdapterError(detail::cat("Adapted.forward_mixed: adapter index ", a, " out of range (this layer has ", entries_.size(), " adapters; -1 is the base)"));
      if (a >= 0) check_mixable(ctx, entries_[std::size_t(a)]);
    }
    bind_base();
    ctx.merge_state = merge_state_;
    ctx.seed = detail::random_bits(seed_, 0x5EEDull, forwards_++);
    base_.forward_into(ctx.base, x, y);
    ctx.base.x = x;
    ctx.base.has_forward = true;
    m.last = true;
    // stable counting sort of the rows by adapter (base rows, and every row when disabled, are left out)
    const std::size_t E = entries_.size();
    std::fill(m.count.begin(), m.count.end(), Index(0));
    if (enabled_)
      for (int a : row_adapter)
        if (a >= 0) ++m.count[std::size_t(a)];
    m.groups = 0;
    Index at = 0;
    for (std::size_t e = 0; e < E; ++e) {
      if (m.count[e] == 0) continue;
      m.entry[m.groups] = int(e);
      m.offset[m.groups++] = at;
      const Index n = m.count[e];
      m.count[e] = at;  // from now on: the next free grouped row of adapter e
      at += n;
    }
    m.offset[m.groups] = at;
    if (enabled_)
      for (Index i = 0; i < x.rows; ++i)
        if (const int a = row_adapter[std::size_t(i)]; a >= 0) m.perm[std::size_t(m.count[std::size_t(a)]++)] = i;
    const Index in = in_features(), out = out_features();
    for (std::size_t g = 0; g < m.groups; ++g) {
      const Entry& e = entries_[std::size_t(m.entry[g])];
      const Index r0 = m.offset[g], n = m.offset[g + 1] - r0;
      auto xg = m.x.view(m.max_batch, in).row_block(r0, n);
      auto yg = m.y.view(m.max_batch, out).row_block(r0, n);
      for (Index i = 0; i < n; ++i) backend_type::copy(x.row_block(m.perm[std::size_t(r0 + i)], 1), xg.row_block(i, 1));
      backend_type::fill(yg, T(0));
      m.one.assign(1, e.slot);
      detail::for_each_index([&](auto k) {
        if (k != e.kind) return;
        auto& bank = std::get<k>(banks_);
        auto& bctx = std::get<k>(ctx.banks);  // (named first: clang 14 judges the requires-expression false with std::get<k> inside)
        const ConstMatrixView<T> xgc = xg;
        if constexpr (requires { bank.forward(bctx, ctx.base.scratch, m.one, xgc, yg, training_, ctx.seed, 0); })
          bank.forward(bctx, ctx.base.scratch, m.one, xgc, yg, training_, ctx.seed, 0);
        else
          throw StateError(detail::cat("Adapted.forward_mixed: adapter '", e.name, "' has no additive forward"));  // check_mixable refuses it first
      }, std::index_sequence_for<Kinds...>{});
      for (Index i = 0; i < n; ++i)
        backend_type::axpby(T(1), ConstMatrixView<T>(yg.row_block(i, 1)), T(1), y.row_block(m.perm[std::size_t(r0 + i)], 1));
    }
  }

  /// Backward of forward_mixed, with backward()'s gradient contract: the base writes dx per `input` (and
  /// its weight gradient when trainable), each group's adapter adds to its rows of dx, and every adapter
  /// parameter gradient is written per `params` (with overwrite, adapters that ran in no group get zeros).
  void backward_mixed(Context& ctx, ConstMatrixView<T> dy, MatrixView<T> dx, GradMode params = GradMode::accumulate,
                      GradMode input = GradMode::overwrite)
    requires std::is_same_v<input_type, ConstMatrixView<T>>
  {
    check_context(ctx, "backward_mixed");
    auto& m = ctx.mixed;
    if (!m.last) throw StateError("Adapted.backward_mixed: the last forward on this context was not forward_mixed");
    base_.check_backward(ctx.base, dy, dx, "Adapted.backward_mixed");
    bind_base();
    if (!merged_.empty()) throw StateError(detail::cat("Adapted.backward_mixed: adapter '", merged_.front(), "' is merged"));
    if (ctx.merge_state != merge_state_)
      throw StateError("Adapted.backward_mixed: adapters were merged, unmerged, enabled or disabled since this forward; run forward again");
    base_.backward_input(ctx.base, dy, dx, input == GradMode::accumulate ? T(1) : T(0));
    if (base_.requires_grad()) base_.backward_params(ctx.base, ctx.base.x, dy, params == GradMode::accumulate ? T(1) : T(0));
    if (params == GradMode::overwrite)
      for (std::size_t e = 0; e < entries_.size(); ++e) {
        bool ran = false;
        for (std::size_t g = 0; g < m.groups; ++g) ran = ran || m.entry[g] == int(e);
        if (!ran) for_kind(entries_[e].kind, [&](auto& bank) { bank.zero_grad(entries_[e].slot); });
      }
    const Index in = in_features(), out = out_features();
    for (std::size_t g = 0; g < m.groups; ++g) {
      const Entry& e = entries_[std::size_t(m.entry[g])];
      const Index r0 = m.offset[g], n = m.offset[g + 1] - r0;
      auto xg = m.x.view(m.max_batch, in).row_block(r0, n);
      auto dyg = m.y.view(m.max_batch, out).row_block(r0, n);  // forward's y rows are no longer needed
      auto dxg = m.dx.view(m.max_batch, in).row_block(r0, n);
      for (Index i = 0; i < n; ++i) backend_type::copy(dy.row_block(m.perm[std::size_t(r0 + i)], 1), dyg.row_block(i, 1));
      if (!dx.empty()) backend_type::fill(dxg, T(0));
      detail::for_each_index([&](auto k) {
        if (k != e.kind) return;
        auto& bank = std::get<k>(banks_);
        auto& bctx = std::get<k>(ctx.banks);
        m.one.assign(1, e.slot);
        bctx.ran.assign(m.one.begin(), m.one.end());
        if constexpr (requires { bank.backward(bctx, ctx.base.scratch, ConstMatrixView<T>(xg), ConstMatrixView<T>(dyg), dxg, params, ctx.seed); })
          bank.backward(bctx, ctx.base.scratch, ConstMatrixView<T>(xg), ConstMatrixView<T>(dyg), dx.empty() ? MatrixView<T>{} : dxg, params, ctx.seed);
        else
          throw StateError(detail::cat("Adapted.backward_mixed: adapter '", e.name, "' has no additive backward"));
      }, std::index_sequence_for<Kinds...>{});
      if (!dx.empty())
        for (Index i = 0; i < n; ++i)
          backend_type::axpby(T(1), ConstMatrixView<T>(dxg.row_block(i, 1)), T(1), dx.row_block(m.perm[std::size_t(r0 + i)], 1));
    }
  }

  /// Visits base parameters ("weight", "bias") and adapter parameters ("lora_A.<name>.weight", ...).
  template <class F>
  void visit_parameters(F&& f) {
    base_.visit_parameters(f);
    for (const auto& e : entries_) for_kind(e.kind, [&](auto& bank) { bank.visit_parameters(e.slot, e.name, f); });
  }
  void zero_grad() {
    base_.zero_grad();
    for (const auto& e : entries_) for_kind(e.kind, [&](auto& bank) { bank.zero_grad(e.slot); });
  }

 private:
  Adapted(const Adapted& o, int)
      : base_(o.base_), path_(o.path_), banks_(o.banks_), entries_(o.entries_), active_(o.active_), merged_(o.merged_),
        active_slots_(o.active_slots_), enabled_(o.enabled_), training_(o.training_), seed_(o.seed_), seed_set_(o.seed_set_),
        forwards_(o.forwards_), merge_state_(o.merge_state_) {}

  struct Entry {
    std::string name;
    std::size_t kind;
    int slot;
  };

  void check_new_name(const std::string& name) const {
    if (name.empty()) throw AdapterError("add_adapter: the adapter name is empty");
    if (name.find('.') != std::string::npos)
      throw AdapterError(detail::cat("add_adapter: adapter name '", name, "' contains '.', which breaks checkpoint keys"));
    if (has_adapter(name)) throw AdapterError(detail::cat("add_adapter: adapter '", name, "' already exists"));
  }
  typename std::vector<Entry>::const_iterator find(std::string_view name) const {
    auto it = std::find_if(entries_.begin(), entries_.end(), [&](auto& e) { return e.name == name; });
    if (it == entries_.end()) {
      std::string known;
      for (const auto& e : entries_) known += (known.empty() ? "'" : ", '") + e.name + "'";
      throw AdapterError(detail::cat("Adapter ", name, " does not exist (this layer has: ", known.empty() ? "none" : known, ")"));
    }
    return it;
  }
  typename std::vector<Entry>::iterator find(std::string_view name) {
    auto cit = std::as_const(*this).find(name);
    return entries_.begin() + (cit - entries_.cbegin());
  }
  bool is_merged(std::string_view name) const { return std::find(merged_.begin(), merged_.end(), name) != merged_.end(); }

  /// forward_mixed runs additive adapters that need no running output: not DoRA, not scaling kinds.
  void check_mixable(Context& ctx, const Entry& e) {
    detail::for_each_index([&](auto k) {
      if (k != e.kind) return;
      auto& bank = std::get<k>(banks_);
      auto& bctx = std::get<k>(ctx.banks);
      if constexpr (!requires { bank.forward(bctx, ctx.base.scratch, ctx.mixed.one, ConstMatrixView<T>(), MatrixView<T>(), training_, ctx.seed, 0); }) {
        throw AdapterError(detail::cat("Adapted.forward_mixed: adapter '", e.name, "' scales the layer; mixed batches support additive adapters (LoRA, LoHa, LoKr, ...)"));
      } else if constexpr (requires { bank.at(e.slot).dora(); }) {
        if (bank.at(e.slot).dora()) throw AdapterError(detail::cat("Adapted.forward_mixed: adapter '", e.name, "' uses DoRA, which mixed batches do not support"));
      }
    }, std::index_sequence_for<Kinds...>{});
  }

  template <class F>
  void for_kind(std::size_t kind, F&& f) {
    detail::for_each_index([&](auto k) { if (k == kind) f(std::get<k>(banks_)); }, std::index_sequence_for<Kinds...>{});
  }
  template <class F>
  void for_kind(std::size_t kind, F&& f) const {
    detail::for_each_index([&](auto k) { if (k == kind) f(std::get<k>(banks_)); }, std::index_sequence_for<Kinds...>{});
  }

  /// Banks that read the base weight in forward/backward (DoRA) get a pointer to it; it may have moved
  /// since the adapter was added (a copied or moved layer).
  void bind_base() {
    detail::for_each_index(
        [&](auto k) {
          auto& bank = std::get<k>(banks_);
          if constexpr (requires { bank.bind_base(base_); }) bank.bind_base(base_);
        },
        std::index_sequence_for<Kinds...>{});
  }

  /// f(bank, bank context, active slots) for every kind, in declaration order.
  template <class F>
  void each_kind(F&& f, Context& ctx) {
    detail::for_each_index([&](auto k) { f(std::get<k>(banks_), std::get<k>(ctx.banks), active_slots_[k]); }, std::index_sequence_for<Kinds...>{});
  }

  static constexpr bool base_per_image = requires { Base::per_image; };
  /// Whether a kind's bank can fold its ΔW into a Conv2d base's product (has image_fold).
  template <class Bank>
  static constexpr bool bank_folds = requires(const Bank& b, typename Bank::Context& c, Scratch& s, MatrixView<T> w) { b.image_fold(c, s, w); };
  /// Whether any kind can: only then does a context hold the weight-sized folded-weight buffer.
  static constexpr bool any_bank_folds = (bank_folds<typename Kinds::template bank<Base>> || ...);

  /// Whether forward can run every additive bank on the base's columns (each has the per-image steps and accepts its
  /// active slots; banks that scale the layer, such as (IA)³, keep their own steps around it).
  bool image_wise_ready(Context& ctx, ConstMatrixView<T> x, MatrixView<T> y) {
    bool ok = true;
    each_kind([&](auto& bank, auto& bctx, const auto& active) {
      if constexpr (requires { bank.forward(bctx, ctx.base.scratch, active, x, y, training_, ctx.seed, 0); }) {
        if constexpr (requires { bank.image_ready(active); }) ok = ok && bank.image_ready(active);
        else ok = false;
      }
    }, ctx);
    return ok;
  }

  /// Whether the additive banks that run this image-wise forward all fold their ΔW into the base's product (each
  /// has image_fold and accepts its slots and the batch); scaling banks do not take part.
  bool fold_ready(Context& ctx, Index batch) {
    bool any = false, ok = true;
    each_kind([&](auto& bank, auto& bctx, const auto& active) {
      if constexpr (requires { bank.image_begin(bctx, ctx.base.scratch, active, ConstMatrixView<T>{}, training_, ctx.seed, 0); }) {
        if (active.empty()) return;
        any = true;
        if constexpr (requires { bank.image_can_fold(bctx, batch); }) ok = ok && bank.image_can_fold(bctx, batch);
        else ok = false;
      }
    }, ctx);
    return any && ok;
  }

  /// Recomputes the slots each kind runs in forward: active, enabled and not merged.
  void refresh() {
    ++merge_state_;
    for (auto& v : active_slots_) v.clear();
    if (!enabled_) return;
    for (const auto& n : active_) {
      if (is_merged(n)) continue;
      const auto& e = *find(n);
      active_slots_[e.kind].push_back(e.slot);
    }
  }
  void check_context(const Context& ctx, const char* where) const {
    if (ctx.generation != generation_)
      throw StateError(detail::cat("Adapted.", where, ": the context was made before adapters were added or deleted; call make_context() again"));
  }

  Base base_;
  std::string path_;
  Banks banks_;
  std::vector<Entry> entries_;
  std::vector<std::string> active_;
  std::vector<std::string> merged_;
  std::array<std::vector<int>, sizeof...(Kinds)> active_slots_;
  bool enabled_ = true;
  bool training_ = true;
  std::uint64_t generation_ = detail::next_generation();
  std::uint64_t seed_ = 0;
  bool seed_set_ = false;
  std::uint64_t forwards_ = 0;
  std::uint64_t merge_state_ = 0;
};

}  // namespace peft
