// peft++ — AdaLoRA (Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR
// 2023), as Hugging Face PEFT 0.21 implements it (peft/tuners/adalora/{config,layer,model}.py), on Linear.
//
//   A: [r, in] (right singular vectors)   E: [r, 1] (singular values)   B: [out, r] (left singular vectors)
//   f = scaling / (ranknum + 1e-5),  scaling = lora_alpha (or r when lora_alpha <= 0),  ranknum = init_r
//   y = base(x) + f · ((dropout(x) Aᵀ) ⊙ Eᵀ) Bᵀ
//   ΔW = f · B diag(E) A ([out, in]; transposed for fan_in_fan_out); merge W += ΔW, unmerge W −= ΔW.
//
// Init (PEFT's reset_lora_parameters): E = 0, A and B ~ N(0, 0.02²), so the adapter starts as the identity.
//
// Training (namespace peft::adalora): add_orth_reg() adds PEFT's orthogonal regulariser
// orth_reg_weight · mean over the adapter's A and B matrices of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F (Frobenius
// norms, not squared) and its gradient; RankAllocator is PEFT's RankAllocator plus
// AdaLoraModel.update_and_allocate (importance EMAs, cubic budget, masking E); resize_by_rank_pattern()
// and state_dict() truncate adapters to their kept ranks, ranknum (hence the scale) unchanged.
// See docs/methods/adalora.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/grad_mode.hpp"
#include "peft/layer/linear.hpp"
#include "peft/model.hpp"
#include "peft/param.hpp"
#include "peft/rng.hpp"

namespace peft {

/// AdaLoRA's configuration with PEFT's names and defaults (`AdaLoraConfig`, a LoraConfig subclass; the
/// LoRA fields that AdaLoRA uses are repeated here, `r` is not: AdaLoRA starts every layer at init_r).
struct AdaLoraConfig {
  int target_r = 8;      ///< target average rank per layer: the final budget is target_r · (number of layers)
  int init_r = 12;       ///< initial rank of every layer
  int tinit = 0;         ///< steps of initial warm-up (full budget, no masking)
  int tfinal = 0;        ///< steps of final fine-tuning (the final mask is fixed)
  int deltaT = 1;        ///< interval between two budget allocations in the decreasing phase
  double beta1 = 0.85;   ///< EMA coefficient of the sensitivity
  double beta2 = 0.85;   ///< EMA coefficient of the uncertainty
  double orth_reg_weight = 0.5;  ///< weight of the orthogonal regulariser (adalora::add_orth_reg)
  int total_step = 0;    ///< total training steps; required (> 0), as PEFT (None there)
  double lora_alpha = 8;     ///< scaling = lora_alpha (r when lora_alpha <= 0); the factor is scaling / (ranknum + 1e-5)
  double lora_dropout = 0.0;
  bool init_lora_weights = true;  ///< true: E = 0, A, B ~ N(0, 0.02²); false: all N(0, 1) (torch.randn)
  bool fan_in_fan_out = false;    ///< must match the base weight layout (true exactly for [in, out] weights)
  /// PEFT's rank_pattern: module → keep mask over the init_r singular triplets, as produced by the rank
  /// allocator (RankAllocator::rank_pattern()). A layer whose module path matches a key is created with
  /// the kept rank (sum of the mask) and ranknum = init_r, as PEFT's loading path resizes it. Keys may be
  /// the module path ("fc1"), PEFT's saved form ("fc1.lora_E") or its in-memory form
  /// ("fc1.lora_E.default").
  std::vector<std::pair<std::string, std::vector<bool>>> rank_pattern;

  /// Strips PEFT's ".lora_E" / ".lora_E.<adapter>" suffix from a rank_pattern key: the module path.
  static std::string module_of_key(std::string_view key) {
    const std::string k(key);
    const auto p = k.rfind(".lora_E");
    if (p != std::string::npos && (p + 7 == k.size() || (k[p + 7] == '.' && k.find('.', p + 8) == std::string::npos)))
      return k.substr(0, p);
    if (k.rfind("lora_E", 0) == 0 && (k.size() == 6 || k[6] == '.')) return {};  // a layer without a path
    return k;
  }

  /// The configuration for the module at `path`: rank_pattern keeps only the module's own entry (if any),
  /// under the key `path`. Validates the whole config first.
  AdaLoraConfig for_module(std::string_view path) const {
    validate();
    AdaLoraConfig c = *this;
    c.rank_pattern.clear();
    for (const auto& [key, mask] : rank_pattern)
      if (module_of_key(key) == path) {
        c.rank_pattern.emplace_back(std::string(path), mask);
        break;
      }
    return c;
  }

  /// The rank this module's adapter is created with: init_r, or the kept count of its rank_pattern mask.
  int rank_for_module() const {
    if (rank_pattern.empty()) return init_r;
    return int(std::count(rank_pattern.front().second.begin(), rank_pattern.front().second.end(), true));
  }

  /// Throws ConfigError naming the field for values PEFT rejects, and for those that would make PEFT fail
  /// later with a less helpful error (target_r > init_r, deltaT < 1, negative phases, betas outside (0, 1)).
  void validate() const {
    if (total_step <= 0)
      throw ConfigError(detail::cat("AdaLoraConfig: AdaLoRA does not work when total_step is not set; supply a value > 0 (got ", total_step, ")"));
    if (init_r < 1) throw ConfigError(detail::cat("AdaLoraConfig: init_r must be a positive integer, got ", init_r));
    if (target_r < 0) throw ConfigError(detail::cat("AdaLoraConfig: target_r must be >= 0, got ", target_r));
    if (target_r > init_r)
      throw ConfigError(detail::cat("AdaLoraConfig: target_r (", target_r, ") must not exceed init_r (", init_r,
                                    "): the rank budget only falls, from init_r to target_r per layer"));
    if (tinit < 0) throw ConfigError(detail::cat("AdaLoraConfig: tinit must be >= 0, got ", tinit));
    if (tfinal < 0) throw ConfigError(detail::cat("AdaLoraConfig: tfinal must be >= 0, got ", tfinal));
    if (tinit >= total_step - tfinal)
      throw ConfigError(detail::cat("AdaLoraConfig: the supplied schedule values don't allow for a budgeting phase (tinit = ", tinit,
                                    " must be < total_step - tfinal = ", total_step, " - ", tfinal,
                                    "). Decrease tfinal/tinit or increase total_step."));
    if (deltaT < 1) throw ConfigError(detail::cat("AdaLoraConfig: deltaT must be a positive integer, got ", deltaT));
    if (!(beta1 > 0.0 && beta1 < 1.0)) throw ConfigError(detail::cat("AdaLoraConfig: beta1 must be in (0, 1), got ", beta1));
    if (!(beta2 > 0.0 && beta2 < 1.0)) throw ConfigError(detail::cat("AdaLoraConfig: beta2 must be in (0, 1), got ", beta2));
    if (!(orth_reg_weight >= 0.0))
      throw ConfigError(detail::cat("AdaLoraConfig: orth_reg_weight should be greater than or equal to 0, but the value passed is ", orth_reg_weight));
    if (!(lora_dropout >= 0.0 && lora_dropout < 1.0))
      throw ConfigError(detail::cat("AdaLoraConfig: lora_dropout must be in [0, 1), got ", lora_dropout));
    if (!std::isfinite(lora_alpha)) throw ConfigError(detail::cat("AdaLoraConfig: lora_alpha must be finite, got ", lora_alpha));
    for (const auto& [k, mask] : rank_pattern)
      if (mask.size() != std::size_t(init_r))
        throw ConfigError(detail::cat("AdaLoraConfig: rank_pattern['", k, "'] has ", mask.size(), " entries; it must have init_r = ", init_r));
  }
};

/// One AdaLoRA adapter on one layer: A, E, B, their gradients, ranknum and the derived factor.
template <class T, class Backend>
struct AdaLoraAdapter {
  template <class U>
  using buffer = typename Backend::template buffer<U>;
  using backend_type = Backend;

  AdaLoraConfig config;  ///< the resolved per-layer config
  int r = 0;             ///< current rank (init_r, or the kept rank after truncation)
  double ranknum = 0;    ///< PEFT's ranknum: the initial rank; unchanged by truncation (not trained, not saved)
  double scaling = 0;    ///< PEFT's scaling: lora_alpha, or r when lora_alpha <= 0
  T factor = 0;          ///< scaling / (ranknum + 1e-5): ΔW = factor · B diag(E) A
  Index in = 0, out = 0;
  buffer<T> a, e, b;                 ///< A [r, in], E [r] (PEFT: [r, 1]), B [out, r]
  buffer<T> grad_a, grad_e, grad_b;  ///< same shapes
  bool requires_grad = false;
  std::uint64_t version = 0;  ///< changes when the rank changes (truncate): contexts made before are refused
  // the orthogonal regulariser's workspace (sized with the rank, so add_orth_reg allocates nothing)
  buffer<T> cov;                                            ///< [r, r]
  std::vector<T> cov_host;  ///< [r, r] on a device backend: the regulariser's norm is taken on the host
  typename Backend::template GemmScratch<T> orth_scratch;

  MatrixView<T> A() { return a.view(r, in); }
  ConstMatrixView<T> A() const { return a.view(r, in); }
  MatrixView<T> E() { return e.view(r, 1); }
  ConstMatrixView<T> E() const { return e.view(r, 1); }
  MatrixView<T> B() { return b.view(out, r); }
  ConstMatrixView<T> B() const { return b.view(out, r); }
  MatrixView<T> grad_A() { return grad_a.view(r, in); }
  MatrixView<T> grad_E() { return grad_e.view(r, 1); }
  MatrixView<T> grad_B() { return grad_b.view(out, r); }

  /// Allocates every buffer for rank r_ (zeroed) and sets the factor from ranknum.
  void shape(int r_) {
    r = r_;
    a.resize(std::size_t(r * in));
    e.resize(std::size_t(r));
    b.resize(std::size_t(out * r));
    grad_a.resize(a.size());
    grad_e.resize(e.size());
    grad_b.resize(b.size());
    cov.resize(std::size_t(r * r));
    if constexpr (!Backend::host_accessible) cov_host.assign(std::size_t(r * r), T(0));
    orth_scratch.reserve_gemm(r, r, in);    // A Aᵀ
    orth_scratch.reserve_gemm(r, in, r);    // cov A
    orth_scratch.reserve_gemm(r, r, out);   // Bᵀ B
    orth_scratch.reserve_gemm(out, r, r);   // B cov
    factor = T(T(scaling) / (T(ranknum) + T(1e-5)));
    ++version;
  }

  /// Keeps the singular triplets i with keep[i] (PEFT's resize_modules_by_rank_pattern): A's rows, E's
  /// entries, B's columns. ranknum and the factor are unchanged; gradients are reset to zero. Contexts of
  /// this layer must be made again.
  void truncate(const std::vector<bool>& keep) {
    if (keep.size() != std::size_t(r))
      throw ShapeError(detail::cat("AdaLoRA truncate: the keep mask has ", keep.size(), " entries, the adapter has rank ", r));
    const buffer<T> a0 = a, e0 = e, b0 = b;
    const int r0 = r;
    if (config.lora_alpha <= 0) scaling = double(std::count(keep.begin(), keep.end(), true));  // PEFT's update_layer(rank)
    shape(int(std::count(keep.begin(), keep.end(), true)));
    int k = 0;
    for (int i = 0; i < r0; ++i) {
      if (!keep[std::size_t(i)]) continue;
      Backend::copy(ConstMatrixView<T>(a0.data() + i * in, 1, in), MatrixView<T>(a.data() + k * in, 1, in));  // row i of A
      Backend::copy(ConstMatrixView<T>(e0.data() + i, 1, 1), MatrixView<T>(e.data() + k, 1, 1));
      Backend::copy(ConstMatrixView<T>(b0.data() + i, out, 1, r0), MatrixView<T>(b.data() + k, out, 1, r));  // column i of B
      ++k;
    }
  }

  void zero_grad() {
    grad_a.zero();
    grad_e.zero();
    grad_b.zero();
  }
};

template <class Base>
class AdaLoraBank;

/// The AdaLoRA adapter kind: `peft::Adapted<peft::Linear<float>, peft::AdaLora>`.
struct AdaLora {
  using config_type = AdaLoraConfig;
  static constexpr const char* name = "adalora";
  template <class Base>
  using bank = AdaLoraBank<Base>;
};

/// AdaLoRA adapters of one Linear layer (Conv1D-style [in, out] weights included), one slot per named
/// adapter. An additive bank: forward adds f · ((dropout(x) Aᵀ) ⊙ Eᵀ) Bᵀ for every active slot.
template <class T, class Backend>
class AdaLoraBank<Linear<T, Backend>> {
 public:
  using base_type = Linear<T, Backend>;
  using adapter_type = AdaLoraAdapter<T, Backend>;
  using Scratch = typename Backend::template GemmScratch<T>;
  template <class U>
  using buffer = typename Backend::template buffer<U>;
  static constexpr std::uint64_t stream_tag = 0x4164614Cull;  // "AdaL": dropout streams apart from LoRA's

  struct Context {
    struct Slot {
      buffer<T> t;    ///< dropout(x) Aᵀ, [batch, r]
      buffer<T> u;    ///< t ⊙ Eᵀ, [batch, r]
      buffer<T> g;    ///< dy B, then (dy B) ⊙ Eᵀ, [batch, r]
      buffer<T> xd;   ///< dropout(x) (only when lora_dropout > 0)
      buffer<T> dxd;  ///< gradient w.r.t. dropout(x) (only when lora_dropout > 0)
      bool dropped = false;
      std::uint64_t stream = 0;
      std::uint64_t version = 0;  ///< the adapter's version when the context was made
    };
    std::vector<Slot> slots;
    std::vector<int> ran;
  };

  std::size_t size() const noexcept { return adapters_.size(); }
  adapter_type& at(int slot) { return adapters_[std::size_t(slot)]; }
  const adapter_type& at(int slot) const { return adapters_[std::size_t(slot)]; }

  int add(const base_type& base, const AdaLoraConfig& cfg, Generator& gen, std::string_view name) {
    cfg.validate();
    if (cfg.fan_in_fan_out != (base.layout() == WeightLayout::in_out))
      throw ConfigError(detail::cat("AdaLoRA adapter '", name, "': fan_in_fan_out = ", cfg.fan_in_fan_out ? "true" : "false",
                                    " does not match the base weight layout (", base.layout() == WeightLayout::in_out ? "[in, out]" : "[out, in]",
                                    "); PEFT sets fan_in_fan_out = true exactly for Conv1D-style [in, out] weights"));
    adapter_type a;
    a.config = cfg;
    a.in = base.in_features();
    a.out = base.out_features();
    a.ranknum = double(cfg.init_r);
    const int r = cfg.rank_for_module();
    // PEFT: scaling = lora_alpha if lora_alpha > 0 else float(r), with r the rank update_layer is called with
    a.scaling = cfg.lora_alpha > 0 ? cfg.lora_alpha : double(r);
    a.shape(r);
    const double sd = cfg.init_lora_weights ? 0.02 : 1.0;
    Backend::random_normal(gen, flat(a.a), 0.0, sd);
    Backend::random_normal(gen, flat(a.b), 0.0, sd);
    if (!cfg.init_lora_weights) Backend::random_normal(gen, flat(a.e), 0.0, 1.0);  // else E = 0 (resize zeroes)
    adapters_.push_back(std::move(a));
    return int(adapters_.size() - 1);
  }
  void remove(int slot) { adapters_.erase(adapters_.begin() + slot); }

  void make_context(Context& ctx, Scratch& scratch, Index max_batch) const {
    ctx.slots.resize(adapters_.size());
    ctx.ran.reserve(adapters_.size());
    for (std::size_t i = 0; i < adapters_.size(); ++i) {
      const auto& a = adapters_[i];
      auto& s = ctx.slots[i];
      for (auto* buf : {&s.t, &s.u, &s.g}) buf->resize(std::size_t(max_batch * a.r));
      if (a.config.lora_dropout > 0) {
        s.xd.resize(std::size_t(max_batch * a.in));
        s.dxd.resize(std::size_t(max_batch * a.in));
      }
      s.version = a.version;
      scratch.reserve_gemm(max_batch, a.r, a.in);   // t = xd Aᵀ
      scratch.reserve_gemm(max_batch, a.out, a.r);  // y += f u Bᵀ
      scratch.reserve_gemm(max_batch, a.r, a.out);  // g = dy B
      scratch.reserve_gemm(a.out, a.r, max_batch);  // dB
      scratch.reserve_gemm(a.r, a.in, max_batch);   // dA
      scratch.reserve_gemm(max_batch, a.in, a.r);   // dx
    }
  }

  /// y += Σ_{active} f · ((dropout(x) Aᵀ) ⊙ Eᵀ) Bᵀ, PEFT's SVDLinear.forward.
  void forward(Context& ctx, Scratch& scratch, const std::vector<int>& active, ConstMatrixView<T> x, MatrixView<T> y,
               bool dropout_on, std::uint64_t seed, std::uint64_t stream0) const {
    for (int slot : active) check_version(ctx, slot, "forward");
    ctx.ran.assign(active.begin(), active.end());
    const Index m = x.rows;
    for (int slot : active) {
      const auto& a = adapters_[std::size_t(slot)];
      auto& s = ctx.slots[std::size_t(slot)];
      ConstMatrixView<T> xin = x;
      s.dropped = dropout_on && a.config.lora_dropout > 0;
      if (s.dropped) {
        s.stream = stream0 + (stream_tag << 32) + std::uint64_t(slot);
        auto xd = s.xd.view(m, a.in);
        Backend::dropout(x, xd, a.config.lora_dropout, seed, s.stream);
        xin = xd;
      }
      auto t = s.t.view(m, a.r);
      auto u = s.u.view(m, a.r);
      Backend::template gemm<Trans::no, Trans::yes>(scratch, T(1), xin, a.A(), T(0), t);
      Backend::add_scaled_cols(ConstMatrixView<T>(t), a.e.data(), T(0), u);
      Backend::template gemm<Trans::no, Trans::yes>(scratch, a.factor, ConstMatrixView<T>(u), a.B(), T(1), y);
    }
  }

  /// Backward of the slots that ran: with g = dy B,
  ///   dB = f · dyᵀ u,  dE = f · Σ_rows g ⊙ t,  dA = f · (g ⊙ Eᵀ)ᵀ dropout(x),  dx += f · (g ⊙ Eᵀ) A
  /// (dx through the dropout mask); parameter gradients of trainable slots per `mode`.
  void backward(Context& ctx, Scratch& scratch, ConstMatrixView<T> x, ConstMatrixView<T> dy, MatrixView<T> dx, GradMode mode,
                std::uint64_t seed) {
    for (int slot : ctx.ran) check_version(ctx, slot, "backward");
    const Index m = dy.rows;
    const T beta = mode == GradMode::accumulate ? T(1) : T(0);
    for (int slot : ctx.ran) {
      auto& a = adapters_[std::size_t(slot)];
      auto& s = ctx.slots[std::size_t(slot)];
      auto g = s.g.view(m, a.r);
      const auto t = ConstMatrixView<T>(s.t.view(m, a.r));
      Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), dy, a.B(), T(0), g);
      ConstMatrixView<T> xin = s.dropped ? ConstMatrixView<T>(s.xd.view(m, a.in)) : x;
      if (a.requires_grad) {
        Backend::template gemm<Trans::yes, Trans::no>(scratch, a.factor, dy, ConstMatrixView<T>(s.u.view(m, a.r)), beta, a.grad_B());
        Backend::sum_rows_mul(ConstMatrixView<T>(g), t, a.grad_e.data(), a.factor, beta);
      }
      Backend::scale_cols(g, a.e.data());  // g ⊙ Eᵀ
      if (a.requires_grad) Backend::template gemm<Trans::yes, Trans::no>(scratch, a.factor, ConstMatrixView<T>(g), xin, beta, a.grad_A());
      if (dx.empty()) continue;
      if (!s.dropped) {
        Backend::template gemm<Trans::no, Trans::no>(scratch, a.factor, ConstMatrixView<T>(g), a.A(), T(1), dx);
      } else {
        auto dxd = s.dxd.view(m, a.in);
        Backend::template gemm<Trans::no, Trans::no>(scratch, a.factor, ConstMatrixView<T>(g), a.A(), T(0), dxd);
        Backend::dropout(ConstMatrixView<T>(dxd), dxd, a.config.lora_dropout, seed, s.stream);
        Backend::axpby(T(1), ConstMatrixView<T>(dxd), T(1), dx);
      }
    }
  }

  /// W ± ΔW in the base layout (the bias is unchanged, as PEFT).
  void apply_delta(int slot, base_type& base, T sign) const {
    Scratch scratch;
    write_delta(slot, scratch, base.weight(), sign, T(1));
  }
  void merge_preview(int slot, Scratch& scratch, MatrixView<T> w) const { write_delta(slot, scratch, w, T(1), T(1)); }

  /// out = sign · ΔW + beta · out, ΔW = f · B (E ⊙_rows A) in the base layout (PEFT's get_delta_weight).
  /// Allocates an [r, in] temporary (merge time, not the hot path).
  void write_delta(int slot, Scratch& scratch, MatrixView<T> out, T sign, T beta) const {
    const auto& a = adapters_[std::size_t(slot)];
    buffer<T> ea_buf(std::size_t(a.r * a.in));
    auto ea = ea_buf.view(a.r, a.in);
    Backend::copy(a.A(), ea);
    Backend::scale_rows(ea, a.e.data());
    if (!a.config.fan_in_fan_out) {
      require_shape(out, a.out, a.in, "AdaLoRA write_delta: out");
      scratch.reserve_gemm(a.out, a.in, a.r);
      Backend::template gemm<Trans::no, Trans::no>(scratch, sign * a.factor, a.B(), ConstMatrixView<T>(ea), beta, out);
    } else {
      require_shape(out, a.in, a.out, "AdaLoRA write_delta: out");
      scratch.reserve_gemm(a.in, a.out, a.r);
      Backend::template gemm<Trans::yes, Trans::yes>(scratch, sign * a.factor, ConstMatrixView<T>(ea), a.B(), beta, out);
    }
  }

  /// Visits lora_A.<name>, lora_B.<name>, lora_E.<name> (PEFT's in-memory names and order; ranknum is not
  /// a parameter here: it is constant, see docs/methods/adalora.md).
  template <class F>
  void visit_parameters(int slot, std::string_view name, F&& f) {
    auto& a = adapters_[std::size_t(slot)];
    const std::string n(name);
    f(ParamRef<T>{"lora_A." + n, a.a.data(), a.grad_a.data(), a.a.size(), a.requires_grad, Backend::host_accessible});
    f(ParamRef<T>{"lora_B." + n, a.b.data(), a.grad_b.data(), a.b.size(), a.requires_grad, Backend::host_accessible});
    f(ParamRef<T>{"lora_E." + n, a.e.data(), a.grad_e.data(), a.e.size(), a.requires_grad, Backend::host_accessible});
  }
  void set_requires_grad(int slot, bool on) { adapters_[std::size_t(slot)].requires_grad = on; }
  void zero_grad(int slot) { adapters_[std::size_t(slot)].zero_grad(); }

 private:
  void check_version(const Context& ctx, int slot, const char* where) const {
    if (ctx.slots[std::size_t(slot)].version != adapters_[std::size_t(slot)].version)
      throw StateError(detail::cat("AdaLoRA ", where, ": an adapter of this layer was resized (truncated to its kept rank) after the context was made; call make_context() again"));
  }

  std::vector<adapter_type> adapters_;
};

/// The AdaLoRA adapter `name` of an adapted layer (A, E, B, gradients, ranknum, factor).
template <class Layer>
auto& adalora_adapter(Layer& layer, const std::string& name) {
  return layer.template adapter<AdaLora>(name);
}

namespace adalora {

namespace detail {
template <class Tuple, class X>
struct tuple_has;
template <class... Ts, class X>
struct tuple_has<std::tuple<Ts...>, X> : std::bool_constant<(std::is_same_v<Ts, X> || ...)> {};

/// A layer type that can hold AdaLoRA adapters: Adapted<Base, ..., AdaLora, ...>.
template <class L>
concept AdaLoraLayer = requires {
  typename L::Banks;
  typename L::base_type;
} && tuple_has<typename L::Banks, AdaLoraBank<typename L::base_type>>::value;

/// Calls f(adapter, path) for the AdaLoRA adapter `name` of every layer of `model` that has one, in
/// declaration order.
template <class Model, class F>
void for_each_adapter(Model& model, const std::string& name, F&& f) {
  peft::for_each_layer(model, [&](auto& layer, const std::string& path) {
    using L = std::remove_cvref_t<decltype(layer)>;
    if constexpr (AdaLoraLayer<L>) {
      if (!layer.has_adapter(name)) return;
      auto* a = [&]() -> decltype(&layer.template adapter<AdaLora>(name)) {
        try {
          return &layer.template adapter<AdaLora>(name);
        } catch (const AdapterError&) {  // an adapter of another kind with this name
          return nullptr;
        }
      }();
      if (a) f(*a, path);
    }
  });
}

/// Host access to n elements of Backend memory p: p itself on a host backend, otherwise a copy downloaded
/// into `scratch` (the rank allocator's statistics live on the host).
template <class Backend, class T>
const T* host_read(const T* p, std::size_t n, std::vector<T>& scratch) {
  if constexpr (Backend::host_accessible) {
    return p;
  } else {
    scratch.resize(n);
    if (n) Backend::template download<T>(ConstMatrixView<T>(p, 1, Index(n)), MatrixView<T>(scratch.data(), 1, Index(n)));
    return scratch.data();
  }
}
/// The kept triplets of adapter `a` (keep[i] for each of its r) as host values: A's kept rows [k, in], B's
/// kept columns [out, k] and E's kept entries [k] (PEFT's resize_state_dict_by_rank_pattern); a device
/// adapter's tensors are downloaded first.
template <class T, class A>
void kept_triplets(const A& a, const std::vector<bool>& keep, std::vector<T>& va, std::vector<T>& vb, std::vector<T>& ve) {
  using B = typename A::backend_type;
  std::vector<T> ha, hb, he;  // host copies on a device backend
  const T* pa = host_read<B>(a.a.data(), a.a.size(), ha);
  const T* pb = host_read<B>(a.b.data(), a.b.size(), hb);
  const T* pe = host_read<B>(a.e.data(), a.e.size(), he);
  for (int i = 0; i < a.r; ++i) {
    if (!keep[std::size_t(i)]) continue;
    va.insert(va.end(), pa + i * a.in, pa + (i + 1) * a.in);
    ve.push_back(pe[i]);
  }
  for (Index o = 0; o < a.out; ++o)
    for (int i = 0; i < a.r; ++i)
      if (keep[std::size_t(i)]) vb.push_back(pb[o * a.r + i]);
}
/// p[i] = v in Backend memory.
template <class Backend, class T>
void set_element(T* p, std::size_t i, T v) {
  if constexpr (Backend::host_accessible) p[i] = v;
  else Backend::template fill<T>(MatrixView<T>(p + i, 1, 1), v);
}
}  // namespace detail

/// ‖M‖_F-style regulariser of one adapter: returns ‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F and, when the adapter is
/// trainable, adds coeff · (their gradients) to grad_A and grad_B:
///   ∂‖A Aᵀ − I‖_F/∂A = 2 (A Aᵀ − I) A / ‖A Aᵀ − I‖_F,   ∂‖Bᵀ B − I‖_F/∂B = 2 B (Bᵀ B − I) / ‖Bᵀ B − I‖_F
/// (zero where a norm is zero, as PyTorch's). Allocates nothing.
template <class T, class Backend>
double orth_reg_adapter(AdaLoraAdapter<T, Backend>& a, double coeff) {
  if (a.r == 0) return 0.0;
  auto cov = a.cov.view(a.r, a.r);
  auto minus_identity_norm = [&]() {  // on the host (a round trip of the r x r matrix on a device backend)
    const Index r = a.r;
    T* c = a.cov.data();
    if constexpr (!Backend::host_accessible) {
      c = a.cov_host.data();
      Backend::template download<T>(ConstMatrixView<T>(cov), MatrixView<T>(c, r, r));
    }
    for (Index i = 0; i < r; ++i) c[i * r + i] -= T(1);
    double s = 0;
    for (Index k = 0; k < r * r; ++k) s += double(c[k]) * double(c[k]);
    if constexpr (!Backend::host_accessible) Backend::template upload<T>(ConstMatrixView<T>(c, r, r), cov);
    return std::sqrt(s);
  };
  Backend::template gemm<Trans::no, Trans::yes>(a.orth_scratch, T(1), a.A(), a.A(), T(0), cov);  // A Aᵀ
  const double na = minus_identity_norm();
  if (a.requires_grad && na > 0 && coeff != 0)
    Backend::template gemm<Trans::no, Trans::no>(a.orth_scratch, T(2 * coeff / na), ConstMatrixView<T>(cov), a.A(), T(1), a.grad_A());
  Backend::template gemm<Trans::yes, Trans::no>(a.orth_scratch, T(1), a.B(), a.B(), T(0), cov);  // Bᵀ B
  const double nb = minus_identity_norm();
  if (a.requires_grad && nb > 0 && coeff != 0)
    Backend::template gemm<Trans::no, Trans::no>(a.orth_scratch, T(2 * coeff / nb), a.B(), ConstMatrixView<T>(cov), T(1), a.grad_B());
  return na + nb;
}

/// PEFT's orthogonal regularisation (AdaLoraModel.forward): over the AdaLoRA adapter `name` of every layer
/// in `model`, R = orth_reg_weight · (Σ_layers ‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F) / (2 · number of layers).
/// Returns R (add it to the loss value) and accumulates ∂R/∂A, ∂R/∂B into the gradients of trainable
/// adapters, PyTorch style: call it after backward (GradMode::accumulate) and before the optimizer step.
/// orth_reg_weight < 0 is a ConfigError (PEFT's message). Allocates nothing but the walk's path strings.
template <class Model>
double add_orth_reg(Model& model, double orth_reg_weight, const std::string& name = "default") {
  if (!(orth_reg_weight >= 0.0))
    throw ConfigError(peft::detail::cat("add_orth_reg: orth_reg_weight should be greater than or equal to 0, got ", orth_reg_weight));
  std::size_t n = 0;
  detail::for_each_adapter(model, name, [&](auto&, const std::string&) { n += 2; });
  if (n == 0) return 0.0;
  const double coeff = orth_reg_weight / double(n);
  double sum = 0;
  detail::for_each_adapter(model, name, [&](auto& a, const std::string&) { sum += orth_reg_adapter(a, coeff); });
  return orth_reg_weight * sum / double(n);
}

/// Module path → keep mask over the singular triplets (PEFT's rank_pattern values).
using RankPattern = std::vector<std::pair<std::string, std::vector<bool>>>;

/// What update_and_allocate did at one step.
struct AllocationStep {
  int budget = 0;        ///< budget_schedule(step).budget
  bool masked = false;   ///< E was masked at this step (by a new allocation or by the fixed final pattern)
  bool final = false;    ///< step == total_step - tfinal: the final allocation, rank_pattern fixed
};

/// PEFT's RankAllocator and AdaLoraModel.update_and_allocate for the AdaLoRA adapter `name` of a model
/// (any aggregate `for_each_layer` walks; the allocator keys layers by their path). Its statistics live on
/// the host: on a device backend update_ipt downloads each adapter's A, E, B and their gradients (into
/// buffers the allocator keeps), and masking writes the zeroed E entries with the backend's fill.
template <class T>
class RankAllocator {
 public:
  struct Budget {
    int budget = 0;
    bool mask = false;
  };

  /// Counts the initial budget as PEFT's _set_budget_scheduler: init_bgt = Σ_layers rank of A, target_bgt
  /// = target_r · number of layers. Throws ConfigError for a bad config, AdapterError if no layer has the
  /// adapter.
  template <class Model>
  RankAllocator(Model& model, const AdaLoraConfig& config, std::string name = "default") : cfg_(config), name_(std::move(name)) {
    cfg_.validate();
    int layers = 0;
    detail::for_each_adapter(model, name_, [&](auto& a, const std::string&) {
      init_bgt_ += a.r;
      ++layers;
    });
    if (layers == 0) throw AdapterError(peft::detail::cat("RankAllocator: no layer of the model has an AdaLoRA adapter named '", name_, "'"));
    target_bgt_ = cfg_.target_r * layers;
  }

  int init_budget() const noexcept { return init_bgt_; }
  int target_budget() const noexcept { return target_bgt_; }
  const AdaLoraConfig& config() const noexcept { return cfg_; }

  /// PEFT's budget_schedule: full budget up to tinit, target budget after total_step - tfinal, and in
  /// between int((init - target) · (1 - (step - tinit) / (total - tfinal - tinit))³ + target), masking every
  /// deltaT steps.
  Budget budget_schedule(int step) const {
    const int tinit = cfg_.tinit, tfinal = cfg_.tfinal, total = cfg_.total_step;
    if (step <= tinit) return {init_bgt_, false};
    if (step > total - tfinal) return {target_bgt_, true};
    const double mul_coeff = 1.0 - double(step - tinit) / double(total - tfinal - tinit);
    const double v = double(init_bgt_ - target_bgt_) * std::pow(mul_coeff, 3.0) + double(target_bgt_);
    return {int(v), step % cfg_.deltaT == 0};
  }

  /// PEFT's update_ipt: for every element p of A, E and B with gradient g: ipt = |p·g|,
  /// Ī ← β1 Ī + (1 − β1) ipt, Ū ← β2 Ū + (1 − β2) |ipt − Ī| (with the new Ī).
  template <class Model>
  void update_ipt(Model& model) {
    detail::for_each_adapter(model, name_, [&](auto& a, const std::string& path) {
      if (!a.requires_grad)
        throw StateError(peft::detail::cat("RankAllocator: the AdaLoRA adapter '", name_, "' of layer '", path,
                                           "' is frozen; the allocator needs the gradients of a trainable adapter"));
      using B = typename std::remove_cvref_t<decltype(a)>::backend_type;
      auto& st = stats_[path];
      using detail::host_read;
      update(st.a, host_read<B>(a.a.data(), a.a.size(), host_p_), host_read<B>(a.grad_a.data(), a.a.size(), host_g_), a.a.size());
      update(st.e, host_read<B>(a.e.data(), a.e.size(), host_p_), host_read<B>(a.grad_e.data(), a.e.size(), host_g_), a.e.size());
      update(st.b, host_read<B>(a.b.data(), a.b.size(), host_p_), host_read<B>(a.grad_b.data(), a.b.size(), host_g_), a.b.size());
    });
  }

  /// PEFT's mask_to_budget: the triplet score of singular index i is S(E_i) + mean_j S(A_ij) + mean_o S(B_oi)
  /// with S = Ī ⊙ Ū; the threshold is the k-th smallest score over all layers, k = init_budget - budget;
  /// every triplet whose score is <= the threshold gets E_i = 0. Returns the keep masks. (k = 0 masks
  /// nothing; PEFT's torch.kthvalue raises there.)
  template <class Model>
  RankPattern mask_to_budget(Model& model, int budget) {
    scores_.clear();
    std::vector<T> all;
    detail::for_each_adapter(model, name_, [&](auto& a, const std::string& path) {
      auto it = stats_.find(path);
      std::vector<T> s(std::size_t(a.r), T(0));
      if (it != stats_.end() && it->second.e.avg_ipt.size() == a.e.size()) {
        const auto& st = it->second;
        for (int i = 0; i < a.r; ++i) {
          double ma = 0, mb = 0;
          for (Index j = 0; j < a.in; ++j) ma += double(element_score(st.a, std::size_t(i * a.in + j)));
          for (Index o = 0; o < a.out; ++o) mb += double(element_score(st.b, std::size_t(o * a.r + i)));
          const T mean_a = a.in ? T(ma / double(a.in)) : T(0), mean_b = a.out ? T(mb / double(a.out)) : T(0);
          s[std::size_t(i)] = element_score(st.e, std::size_t(i)) + (mean_a + mean_b);
        }
      }
      all.insert(all.end(), s.begin(), s.end());
      scores_.emplace_back(path, std::move(s));
    });
    const int k = init_bgt_ - budget;
    if (k > int(all.size()))
      throw StateError(peft::detail::cat("RankAllocator: budget ", budget, " needs ", k, " triplets masked, but the model has only ", all.size(),
                                         " (adapters were truncated after the allocator was made?)"));
    RankPattern pattern;
    bool any = k > 0;
    T threshold = T(0);
    if (any) {
      std::nth_element(all.begin(), all.begin() + (k - 1), all.end());
      threshold = all[std::size_t(k - 1)];
    }
    threshold_ = any ? std::optional<double>(double(threshold)) : std::nullopt;
    std::size_t li = 0;
    detail::for_each_adapter(model, name_, [&](auto& a, const std::string& path) {
      const auto& s = scores_[li++].second;
      std::vector<bool> keep(std::size_t(a.r), true);
      for (int i = 0; i < a.r; ++i)
        if (any && s[std::size_t(i)] <= threshold) {
          keep[std::size_t(i)] = false;
          detail::set_element<typename std::remove_cvref_t<decltype(a)>::backend_type>(a.e.data(), std::size_t(i), T(0));
        }
      pattern.emplace_back(path, std::move(keep));
    });
    return pattern;
  }

  /// Zeroes E_i wherever `pattern` says the triplet is not kept (PEFT's mask_using_rank_pattern). Keys are
  /// matched as AdaLoraConfig::rank_pattern keys (module path, or PEFT's "<path>.lora_E[.<name>]").
  template <class Model>
  void mask_using_rank_pattern(Model& model, const RankPattern& pattern) {
    detail::for_each_adapter(model, name_, [&](auto& a, const std::string& path) {
      for (const auto& [key, keep] : pattern) {
        if (AdaLoraConfig::module_of_key(key) != path) continue;
        if (keep.size() != std::size_t(a.r))
          throw ShapeError(peft::detail::cat("RankAllocator: rank_pattern['", key, "'] has ", keep.size(), " entries, layer '", path,
                                             "' has rank ", a.r));
        for (int i = 0; i < a.r; ++i)
          if (!keep[std::size_t(i)]) detail::set_element<typename std::remove_cvref_t<decltype(a)>::backend_type>(a.e.data(), std::size_t(i), T(0));
        return;
      }
      throw StateError(peft::detail::cat("RankAllocator: the rank pattern has no entry for layer '", path, "'"));
    });
  }

  /// PEFT's AdaLoraModel.update_and_allocate: call it every step after backward (and the optimizer step),
  /// before zeroing the gradients.
  ///   step <  total_step - tfinal: update the importance; mask to the scheduled budget when due
  ///   step == total_step - tfinal: final mask to target_budget(), rank_pattern fixed, statistics reset
  ///   step >  total_step - tfinal: re-apply the fixed rank_pattern
  template <class Model>
  AllocationStep update_and_allocate(Model& model, int global_step) {
    const int final_step = cfg_.total_step - cfg_.tfinal;
    AllocationStep out;
    const Budget b = budget_schedule(global_step);
    out.budget = b.budget;
    if (global_step < final_step) {
      update_ipt(model);
      if (b.mask) {
        rank_pattern_ = mask_to_budget(model, b.budget);
        out.masked = true;
      }
    } else if (global_step == final_step) {
      rank_pattern_ = mask_to_budget(model, b.budget);
      final_ = true;
      reset_ipt();
      out.masked = true;
      out.final = true;
    } else {
      if (!final_)
        throw StateError(peft::detail::cat("RankAllocator: step ", global_step, " is past the final allocation (step ", final_step,
                                           ") but update_and_allocate was not called at that step, so there is no final rank pattern"));
      mask_using_rank_pattern(model, rank_pattern_);
      out.masked = true;
    }
    return out;
  }

  void reset_ipt() { stats_.clear(); }

  /// The last allocation's keep masks (PEFT's config.rank_pattern), by layer path.
  const RankPattern& rank_pattern() const noexcept { return rank_pattern_; }
  /// Kept rank per layer from rank_pattern().
  std::vector<std::pair<std::string, int>> ranks() const {
    std::vector<std::pair<std::string, int>> r;
    for (const auto& [k, m] : rank_pattern_) r.emplace_back(k, int(std::count(m.begin(), m.end(), true)));
    return r;
  }
  /// The triplet scores of the last mask_to_budget, by layer path, and its threshold (none when k = 0).
  const std::vector<std::pair<std::string, std::vector<T>>>& scores() const noexcept { return scores_; }
  std::optional<double> threshold() const noexcept { return threshold_; }

  /// Ī and Ū of one parameter of one layer ("lora_A", "lora_E", "lora_B"), for inspection; empty if none.
  std::pair<std::vector<T>, std::vector<T>> ema(const std::string& path, std::string_view param) const {
    auto it = stats_.find(path);
    if (it == stats_.end()) return {};
    const Ema& e = param == "lora_A" ? it->second.a : param == "lora_E" ? it->second.e : it->second.b;
    return {e.avg_ipt, e.avg_unc};
  }

 private:
  struct Ema {
    std::vector<T> avg_ipt, avg_unc;
  };
  struct Stats {
    Ema a, e, b;
  };

  void update(Ema& s, const T* p, const T* g, std::size_t n) const {
    if (s.avg_ipt.size() != n) {
      s.avg_ipt.assign(n, T(0));
      s.avg_unc.assign(n, T(0));
    }
    const T b1 = T(cfg_.beta1), b2 = T(cfg_.beta2);
    for (std::size_t i = 0; i < n; ++i) {
      const T ipt = std::abs(p[i] * g[i]);
      s.avg_ipt[i] = b1 * s.avg_ipt[i] + (T(1) - b1) * ipt;
      s.avg_unc[i] = b2 * s.avg_unc[i] + (T(1) - b2) * std::abs(ipt - s.avg_ipt[i]);
    }
  }
  static T element_score(const Ema& s, std::size_t i) { return s.avg_ipt[i] * s.avg_unc[i]; }

  AdaLoraConfig cfg_;
  std::string name_;
  int init_bgt_ = 0, target_bgt_ = 0;
  std::map<std::string, Stats> stats_;
  RankPattern rank_pattern_;
  bool final_ = false;
  std::vector<std::pair<std::string, std::vector<T>>> scores_;
  std::optional<double> threshold_;
  std::vector<T> host_p_, host_g_;  // device backends: the downloaded parameter and gradient of update_ipt
};

/// Truncates the AdaLoRA adapter `name` of every layer that `pattern` names to its kept triplets (PEFT's
/// resize_modules_by_rank_pattern): ranknum, hence the factor, stays that of the initial rank. Contexts of
/// resized layers must be made again. Returns the number of layers resized.
template <class Model>
int resize_by_rank_pattern(Model& model, const RankPattern& pattern, const std::string& name = "default") {
  int n = 0;
  detail::for_each_adapter(model, name, [&](auto& a, const std::string& path) {
    for (const auto& [key, keep] : pattern)
      if (AdaLoraConfig::module_of_key(key) == path) {
        a.truncate(keep);
        ++n;
        return;
      }
  });
  return n;
}

/// One tensor of a state dict: PEFT's checkpoint key, shape and values (row-major).
template <class T>
struct NamedTensor {
  std::string key;
  std::vector<Index> shape;
  std::vector<T> data;
};

/// The AdaLoRA adapter `name` of `model` as PEFT's get_peft_model_state_dict writes it:
/// "base_model.model.<path>.lora_A" [r', in], ".lora_B" [out, r'], ".lora_E" [r', 1], per layer in
/// declaration order, truncated to the kept triplets of `pattern` where it names the layer (r' = kept
/// rank; PEFT's resize_state_dict_by_rank_pattern). ranknum is not saved; a loader recreates it as init_r
/// (AdaLoraConfig::rank_pattern does that), so the scale stays lora_alpha / init_r.
template <class T, class Model>
std::vector<NamedTensor<T>> state_dict(Model& model, const RankPattern& pattern = {}, const std::string& name = "default") {
  std::vector<NamedTensor<T>> out;
  detail::for_each_adapter(model, name, [&](auto& a, const std::string& path) {
    std::vector<bool> keep(std::size_t(a.r), true);
    for (const auto& [key, k] : pattern)
      if (AdaLoraConfig::module_of_key(key) == path) {
        if (k.size() != std::size_t(a.r))
          throw ShapeError(peft::detail::cat("adalora::state_dict: rank_pattern['", key, "'] has ", k.size(), " entries, layer '", path,
                                             "' has rank ", a.r));
        keep = k;
        break;
      }
    const Index rk = Index(std::count(keep.begin(), keep.end(), true));
    const std::string p = "base_model.model." + (path.empty() ? std::string() : path + ".");
    NamedTensor<T> ta{p + "lora_A", {rk, a.in}, {}}, tb{p + "lora_B", {a.out, rk}, {}}, te{p + "lora_E", {rk, 1}, {}};
    detail::kept_triplets<T>(a, keep, ta.data, tb.data, te.data);
    out.push_back(std::move(ta));
    out.push_back(std::move(tb));
    out.push_back(std::move(te));
  });
  return out;
}

}  // namespace adalora
}  // namespace peft
