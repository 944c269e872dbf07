// peft++ — LoRA (Hu et al. 2021) with rsLoRA scaling, as Hugging Face PEFT implements it.
//
//   y = base(x) + s · (dropout(x) Aᵀ) Bᵀ (+ s · b_B with lora_bias),   A: [r, in], B: [out, r]
//   s = lora_alpha / r, or lora_alpha / √r with use_rslora.
//   ΔW = s · B A ([out, in]; transposed for fan_in_fan_out); merge W += ΔW, unmerge W −= ΔW.
#pragma once

#include <cmath>
#include <regex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/grad_mode.hpp"
#include "peft/layer/linear.hpp"
#include "peft/param.hpp"
#include "peft/rng.hpp"

namespace peft {

/// PEFT's `init_lora_weights`.
enum class LoraInit {
  standard,  ///< `True` (default): A kaiming-uniform (±1/√in), B = 0: the adapter starts as the identity
  gaussian,  ///< `"gaussian"`: A ~ N(0, 1/r²), B = 0
  off,       ///< `False`: nn.Linear defaults (A ±1/√in, B ±1/√r), so the adapter is *not* the identity
  zeros,     ///< A = B = 0 without drawing numbers: storage to be filled by a checkpoint loader
};

/// LoRA's configuration with PEFT's names and defaults (`LoraConfig`).
struct LoraConfig {
  int r = 8;
  double lora_alpha = 8;
  double lora_dropout = 0.0;
  bool use_rslora = false;
  LoraInit init_lora_weights = LoraInit::standard;
  bool lora_bias = false;
  bool fan_in_fan_out = false;
  /// Per-module overrides, PEFT's rank_pattern / alpha_pattern: a key applies to a module whose path
  /// matches the regex `(.*\.)?(key)$`; the first matching key wins.
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;

  /// PEFT's scaling for rank r and alpha.
  static double scaling_for(double alpha, int r, bool rslora) { return rslora ? alpha / std::sqrt(double(r)) : alpha / double(r); }

  /// The configuration for the module at `path` (rank and alpha patterns applied, patterns cleared).
  LoraConfig for_module(std::string_view path) const {
    LoraConfig c = *this;
    c.rank_pattern.clear();
    c.alpha_pattern.clear();
    const std::string p(path);
    for (const auto& [key, r_] : rank_pattern)
      if (std::regex_match(p, std::regex("(.*\\.)?(" + key + ")"))) { c.r = r_; break; }
    for (const auto& [key, a] : alpha_pattern)
      if (std::regex_match(p, std::regex("(.*\\.)?(" + key + ")"))) { c.lora_alpha = a; break; }
    return c;
  }

  /// Throws ConfigError naming the field for out-of-range values.
  void validate() const {
    if (r <= 0) throw ConfigError(detail::cat("LoraConfig: r must be a positive integer, got ", r));
    for (const auto& [k, v] : rank_pattern)
      if (v <= 0) throw ConfigError(detail::cat("LoraConfig: rank_pattern['", k, "'] must be positive, got ", v));
    if (!(lora_dropout >= 0.0 && lora_dropout < 1.0))
      throw ConfigError(detail::cat("LoraConfig: lora_dropout must be in [0, 1), got ", lora_dropout));
    if (!std::isfinite(lora_alpha)) throw ConfigError("LoraConfig: lora_alpha must be finite");
  }
};

/// One LoRA adapter on one layer: its weights, their gradients, and the derived scaling.
template <class T, class Backend>
struct LoraAdapter {
  template <class U>
  using buffer = typename Backend::template buffer<U>;

  LoraConfig config;  ///< the resolved per-layer config (patterns applied)
  int r = 0;
  T scaling = 0;
  Index in = 0, out = 0;
  buffer<T> a, b, bias;                 ///< A [r, in], B [out, r], b_B [out] (only with lora_bias)
  buffer<T> grad_a, grad_b, grad_bias;  ///< same shapes
  bool requires_grad = false;

  MatrixView<T> A() { return a.view(r, in); }
  ConstMatrixView<T> A() const { return a.view(r, in); }
  MatrixView<T> B() { return b.view(out, r); }
  ConstMatrixView<T> B() const { return b.view(out, r); }
  MatrixView<T> B_bias() { return config.lora_bias ? bias.view(1, out) : MatrixView<T>{}; }
  MatrixView<T> grad_A() { return grad_a.view(r, in); }
  MatrixView<T> grad_B() { return grad_b.view(out, r); }
  MatrixView<T> grad_B_bias() { return config.lora_bias ? grad_bias.view(1, out) : MatrixView<T>{}; }
};

template <class Base>
class LoraBank;

/// The LoRA adapter kind, used as `peft::Adapted<peft::Linear<float>, peft::Lora>`.
struct Lora {
  using config_type = LoraConfig;
  static constexpr const char* name = "lora";
  template <class Base>
  using bank = LoraBank<Base>;
};

/// LoRA adapters of one Linear layer, one slot per named adapter. Driven by `Adapted`, which owns the
/// names, the active set and the merge state; the bank does the math.
template <class T, class Backend>
class LoraBank<Linear<T, Backend>> {
 public:
  using base_type = Linear<T, Backend>;
  using adapter_type = LoraAdapter<T, Backend>;
  using Scratch = typename Backend::template GemmScratch<T>;

  /// Per-forward state: which slots ran, and their saved activations.
  struct Context {
    struct Slot {
      typename Backend::template buffer<T> t;   ///< dropout(x) Aᵀ, [batch, r]
      typename Backend::template buffer<T> g;   ///< dy B, [batch, r]
      typename Backend::template buffer<T> xd;   ///< dropout(x) [batch, in] (only when lora_dropout > 0)
      typename Backend::template buffer<T> dxd;  ///< gradient w.r.t. dropout(x) (only when lora_dropout > 0)
      bool dropped = false;                      ///< dropout was applied in this forward
      std::uint64_t stream = 0;                  ///< dropout stream of this forward
    };
    std::vector<Slot> slots;
    std::vector<int> ran;  ///< slots that contributed to the last forward (capacity = slots.size())
  };

  std::size_t size() const noexcept { return adapters_.size(); }
  adapter_type& at(int slot) { return adapters_[std::size_t(slot)]; }
  const adapter_type& at(int slot) const { return adapters_[std::size_t(slot)]; }

  /// Adds an adapter for `base` with a resolved config; returns its slot.
  int add(const base_type& base, const LoraConfig& cfg, Generator& gen, std::string_view name) {
    cfg.validate();
    if (cfg.fan_in_fan_out != (base.layout() == WeightLayout::in_out))
      throw ConfigError(detail::cat("LoRA adapter '", name, "': fan_in_fan_out = ", cfg.fan_in_fan_out ? "true" : "false",
                                    " does not match the base weight layout (", base.layout() == WeightLayout::in_out ? "[in, out]" : "[out, in]",
                                    "); PEFT sets fan_in_fan_out = true exactly for Conv1D-style [in, out] weights"));
    if (cfg.lora_bias && !base.has_bias())
      throw ConfigError(detail::cat("LoRA adapter '", name, "': lora_bias needs a base layer with a bias"));
    adapter_type a;
    a.config = cfg;
    a.r = cfg.r;
    a.in = base.in_features();
    a.out = base.out_features();
    a.scaling = T(LoraConfig::scaling_for(cfg.lora_alpha, cfg.r, cfg.use_rslora));
    a.a.resize(std::size_t(a.r * a.in));
    a.b.resize(std::size_t(a.out * a.r));
    a.grad_a.resize(a.a.size());
    a.grad_b.resize(a.b.size());
    if (cfg.lora_bias) {
      a.bias.resize(std::size_t(a.out));
      a.grad_bias.resize(a.bias.size());
    }
    const double bound_a = 1.0 / std::sqrt(double(a.in));
    switch (cfg.init_lora_weights) {
      case LoraInit::standard: gen.uniform(a.a.data(), a.a.size(), -bound_a, bound_a); break;
      case LoraInit::gaussian: gen.normal(a.a.data(), a.a.size(), 0.0, 1.0 / double(a.r)); break;
      case LoraInit::off: {
        const double bound_b = 1.0 / std::sqrt(double(a.r));
        gen.uniform(a.a.data(), a.a.size(), -bound_a, bound_a);
        gen.uniform(a.b.data(), a.b.size(), -bound_b, bound_b);
        if (cfg.lora_bias) gen.uniform(a.bias.data(), a.bias.size(), -bound_b, bound_b);
        break;
      }
      case LoraInit::zeros: break;
    }
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
      s.t.resize(std::size_t(max_batch * a.r));
      s.g.resize(std::size_t(max_batch * a.r));
      if (a.config.lora_dropout > 0) {
        s.xd.resize(std::size_t(max_batch * a.in));
        s.dxd.resize(std::size_t(max_batch * a.in));
      }
      scratch.reserve_gemm(max_batch, a.r, a.in);   // t = xd Aᵀ
      scratch.reserve_gemm(max_batch, a.out, a.r);  // y += s t Bᵀ
      scratch.reserve_gemm(max_batch, a.r, a.out);  // g = dy B
      scratch.reserve_gemm(a.out, a.r, max_batch);  // dB
      scratch.reserve_gemm(a.r, a.in, max_batch);   // dA
      scratch.reserve_gemm(max_batch, a.in, a.r);   // dx
    }
  }

  /// y += Σ_{slot in active} s · dropout(x) Aᵀ Bᵀ (+ s·b_B). `dropout_on` is the layer's train mode.
  void forward(Context& ctx, Scratch& scratch, const std::vector<int>& active, ConstMatrixView<T> x, MatrixView<T> y,
               bool dropout_on, std::uint64_t seed, std::uint64_t stream0) const {
    ctx.ran.assign(active.begin(), active.end());
    const Index m = x.rows;
    for (int slot : active) {
      const auto& a = adapters_[std::size_t(slot)];
      auto& s = ctx.slots[std::size_t(slot)];
      ConstMatrixView<T> xin = x;
      s.dropped = dropout_on && a.config.lora_dropout > 0;
      if (s.dropped) {
        s.stream = stream0 + std::uint64_t(slot);
        auto xd = s.xd.view(m, a.in);
        Backend::dropout(x, xd, a.config.lora_dropout, seed, s.stream);
        xin = xd;
      }
      auto t = s.t.view(m, a.r);
      Backend::template gemm<Trans::no, Trans::yes>(scratch, T(1), xin, a.A(), T(0), t);
      Backend::template gemm<Trans::no, Trans::yes>(scratch, a.scaling, ConstMatrixView<T>(t), a.B(), T(1), y);
      if (a.config.lora_bias) Backend::add_row_vector(y, a.bias.data(), a.scaling);
    }
  }

  /// Backward of the slots that ran: dx += s · (dy B) A (through the dropout mask); parameter gradients of
  /// trainable slots per `mode`: dA = s (dy B)ᵀ dropout(x), dB = s dyᵀ t, db_B = s Σ_rows dy.
  void backward(Context& ctx, Scratch& scratch, ConstMatrixView<T> x, ConstMatrixView<T> dy, MatrixView<T> dx, GradMode mode,
                std::uint64_t seed) {
    const Index m = dy.rows;
    const T beta = mode == GradMode::accumulate ? T(1) : T(0);
    for (int slot : ctx.ran) {
      auto& a = adapters_[std::size_t(slot)];
      auto& s = ctx.slots[std::size_t(slot)];
      auto g = s.g.view(m, a.r);
      Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), dy, a.B(), T(0), g);
      ConstMatrixView<T> xin = s.dropped ? ConstMatrixView<T>(s.xd.view(m, a.in)) : x;
      if (a.requires_grad) {
        Backend::template gemm<Trans::yes, Trans::no>(scratch, a.scaling, dy, ConstMatrixView<T>(s.t.view(m, a.r)), beta, a.grad_B());
        Backend::template gemm<Trans::yes, Trans::no>(scratch, a.scaling, ConstMatrixView<T>(g), xin, beta, a.grad_A());
        if (a.config.lora_bias) Backend::sum_rows(dy, a.grad_bias.data(), a.scaling, beta);
      }
      if (dx.empty()) continue;
      if (!s.dropped) {
        Backend::template gemm<Trans::no, Trans::no>(scratch, a.scaling, ConstMatrixView<T>(g), a.A(), T(1), dx);
      } else {
        // d(dropout(x)) = s g A, then through the same mask (recomputed from the counter-based stream).
        auto dxd = s.dxd.view(m, a.in);
        Backend::template gemm<Trans::no, Trans::no>(scratch, a.scaling, ConstMatrixView<T>(g), a.A(), T(0), dxd);
        Backend::dropout(ConstMatrixView<T>(dxd), dxd, a.config.lora_dropout, seed, s.stream);
        Backend::axpby(T(1), ConstMatrixView<T>(dxd), T(1), dx);
      }
    }
  }

  /// W += sign · ΔW (and bias += sign · s · b_B), in the base weight's layout.
  void apply_delta(int slot, base_type& base, T sign) const {
    const auto& a = adapters_[std::size_t(slot)];
    Scratch scratch;
    write_delta(slot, scratch, base.weight(), sign, T(1));
    if (a.config.lora_bias) Backend::axpby(sign * a.scaling, ConstMatrixView<T>(a.bias.view(1, a.out)), T(1), base.bias());
  }

  /// w ← w + ΔW: the merged weight, computed in a copy (safe merging).
  void merge_preview(int slot, Scratch& scratch, MatrixView<T> w) const { write_delta(slot, scratch, w, T(1), T(1)); }

  /// out = sign · ΔW + beta · out, ΔW = s · B A in the base layout ([out, in], or [in, out] for fan_in_fan_out).
  void write_delta(int slot, Scratch& scratch, MatrixView<T> out, T sign, T beta) const {
    const auto& a = adapters_[std::size_t(slot)];
    if (!a.config.fan_in_fan_out) {
      scratch.reserve_gemm(a.out, a.in, a.r);
      Backend::template gemm<Trans::no, Trans::no>(scratch, sign * a.scaling, a.B(), a.A(), beta, out);
    } else {
      scratch.reserve_gemm(a.in, a.out, a.r);
      Backend::template gemm<Trans::yes, Trans::yes>(scratch, sign * a.scaling, a.A(), a.B(), beta, out);
    }
  }

  template <class F>
  void visit_parameters(int slot, std::string_view name, F&& f) {
    auto& a = adapters_[std::size_t(slot)];
    const std::string n(name);
    f(ParamRef<T>{"lora_A." + n + ".weight", a.a.data(), a.grad_a.data(), a.a.size(), a.requires_grad});
    f(ParamRef<T>{"lora_B." + n + ".weight", a.b.data(), a.grad_b.data(), a.b.size(), a.requires_grad});
    if (a.config.lora_bias) f(ParamRef<T>{"lora_B." + n + ".bias", a.bias.data(), a.grad_bias.data(), a.bias.size(), a.requires_grad});
  }
  void set_requires_grad(int slot, bool on) { adapters_[std::size_t(slot)].requires_grad = on; }
  void zero_grad(int slot) {
    auto& a = adapters_[std::size_t(slot)];
    a.grad_a.zero();
    a.grad_b.zero();
    a.grad_bias.zero();
  }

 private:
  std::vector<adapter_type> adapters_;
};

}  // namespace peft

namespace peft {
/// The LoRA adapter `name` of an adapted layer (its A, B, gradients, scaling); shorthand for
/// `layer.template adapter<Lora>(name)` that needs no `template` keyword in generic code.
template <class Layer>
auto& lora_adapter(Layer& layer, const std::string& name) {
  return layer.template adapter<Lora>(name);
}
}  // namespace peft
