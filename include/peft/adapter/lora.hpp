// peft++ — LoRA (Hu et al. 2021) with rsLoRA scaling and DoRA (Liu et al. 2024), as Hugging Face PEFT
// implements them.
//
//   y = base(x) + s · (dropout(x) Aᵀ) Bᵀ (+ s · b_B with lora_bias),   A: [r, in], B: [out, r]
//   s = lora_alpha / r, or lora_alpha / √r with use_rslora.
//   ΔW = s · B A ([out, in]; transposed for fan_in_fan_out); merge W += ΔW, unmerge W −= ΔW.
//
// DoRA (use_dora): a magnitude m [out], initialised to ‖W + ΔW‖_row, and g = m / ‖W + ΔW‖_row with the norm
// recomputed every forward and detached (a constant for backward), as PEFT:
//   y ← y + (g − 1) ⊙ (y − b) + g ⊙ s·(x Aᵀ) Bᵀ            (no dropout, or eval mode; y: the running output)
//   y ← y + (g − 1) ⊙ (xd Wᵀ) + g ⊙ s·(xd Aᵀ) Bᵀ            (dropout active, xd = dropout(x))
//   merge W ← (m / ‖W + ΔW‖_row) ⊙ (W + ΔW), the norm cached for unmerge W ← W ⊘ (m / norm) − ΔW.
// See docs/methods/dora.md.
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
  /// DoRA, weight-decomposed LoRA (PEFT's use_dora): adds a trainable magnitude vector per output row
  /// (Linear), output channel (Conv2d) or embedding column (Embedding); lora_bias is rejected with it, as PEFT.
  bool use_dora = false;
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
    if (use_dora && lora_bias)
      throw ConfigError("LoraConfig: the argument lora_bias=True is not supported for DoRA, please pass use_dora=False (as PEFT)");
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
  buffer<T> magnitude, grad_magnitude;  ///< DoRA's m [out] (PEFT's lora_magnitude_vector) and its gradient
  bool requires_grad = false;
  // merge bookkeeping, owned by the bank (do not modify): whether and when this adapter was merged, and
  // for DoRA the row norm ‖W₀ + ΔW‖ it was merged with, which unmerge needs
  bool merged = false;
  std::uint64_t merge_order = 0;
  buffer<T> merge_norm;

  bool dora() const noexcept { return config.use_dora; }

  /// An adapter for a layer with `in` inputs and `out` outputs (the rank and scaling from cfg), with zeroed
  /// weights and gradients of PEFT's shapes: A [r, in], B [out, r], b_B [out] with lora_bias.
  static LoraAdapter shaped(const LoraConfig& cfg, Index in_, Index out_) {
    LoraAdapter a;
    a.config = cfg;
    a.r = cfg.r;
    a.in = in_;
    a.out = out_;
    a.scaling = T(LoraConfig::scaling_for(cfg.lora_alpha, cfg.r, cfg.use_rslora));
    a.a.resize(std::size_t(a.r * a.in));
    a.b.resize(std::size_t(a.out * a.r));
    a.grad_a.resize(a.a.size());
    a.grad_b.resize(a.b.size());
    if (cfg.lora_bias) {
      a.bias.resize(std::size_t(a.out));
      a.grad_bias.resize(a.bias.size());
    }
    return a;
  }

  MatrixView<T> A() { return a.view(r, in); }
  ConstMatrixView<T> A() const { return a.view(r, in); }
  MatrixView<T> B() { return b.view(out, r); }
  ConstMatrixView<T> B() const { return b.view(out, r); }
  MatrixView<T> B_bias() { return config.lora_bias ? bias.view(1, out) : MatrixView<T>{}; }
  MatrixView<T> grad_A() { return grad_a.view(r, in); }
  MatrixView<T> grad_B() { return grad_b.view(out, r); }
  MatrixView<T> grad_B_bias() { return config.lora_bias ? grad_bias.view(1, out) : MatrixView<T>{}; }
  /// DoRA's magnitude m as a [1, out] view (empty without use_dora).
  MatrixView<T> M() { return dora() ? magnitude.view(1, out) : MatrixView<T>{}; }
  ConstMatrixView<T> M() const { return dora() ? magnitude.view(1, out) : ConstMatrixView<T>{}; }
  MatrixView<T> grad_M() { return dora() ? grad_magnitude.view(1, out) : MatrixView<T>{}; }
};

namespace detail {

/// Weight-space operations shared by the LoRA banks of Linear, Conv2d and Embedding: the delta, DoRA's
/// weight norm, and merge/unmerge with DoRA's rule. `in_out` is the layout of the base weight as the
/// adapter sees it: false for W [out, in] (Linear, Conv2d as [O, C·kh·kw]), true for W [in, out] (Linear
/// with fan_in_fan_out, and Embedding: table [num_embeddings, dim] with A [r, num_embeddings], B [dim, r]).
/// In both layouts ΔW = s·B·A maps "in" to "out", and DoRA's norm is taken per "out" over "in".
template <class T, class Backend>
struct LoraWeightOps {
  using adapter_type = LoraAdapter<T, Backend>;
  using Scratch = typename Backend::template GemmScratch<T>;
  template <class U>
  using buffer = typename Backend::template buffer<U>;

  /// DoRA computes ‖W + s·B·A‖ in blocks of this many "out" rows (no full-size temporary).
  static constexpr Index norm_block_rows = 64;

  /// out = sign · s·B·A + beta · out, in the layout (`[out, in]`, or its transpose).
  static void write_delta(const adapter_type& a, bool in_out, Scratch& scratch, MatrixView<T> out, T sign, T beta) {
    if (!in_out) {
      scratch.reserve_gemm(a.out, a.in, a.r);
      Backend::template gemm<Trans::no, Trans::no>(scratch, sign * a.scaling, a.B(), a.A(), beta, out);
    } else {
      scratch.reserve_gemm(a.in, a.out, a.r);
      Backend::template gemm<Trans::yes, Trans::yes>(scratch, sign * a.scaling, a.A(), a.B(), beta, out);
    }
  }

  /// Grows `scratch` (and `block`, if given) for weight_norm().
  static void reserve_norm(const adapter_type& a, bool in_out, Scratch& scratch, buffer<T>* block = nullptr) {
    const Index nb = std::min(norm_block_rows, a.out), tail = a.out % norm_block_rows;
    for (Index rows : {nb, tail}) {
      if (in_out) scratch.reserve_gemm(a.in, rows, a.r);
      else scratch.reserve_gemm(rows, a.in, a.r);
    }
    if (block) block->resize(std::size_t(nb * a.in));
  }

  /// n[o] = ‖(W + s·B·A)[o, :]‖₂ over "in" (PEFT's get_weight_norm). Blocks of norm_block_rows "out" rows go
  /// through `block` (norm_block_rows · in elements).
  static void weight_norm(const adapter_type& a, bool in_out, ConstMatrixView<T> w, Scratch& scratch, T* block, T* n) {
    for (Index o0 = 0; o0 < a.out; o0 += norm_block_rows) {
      const Index nb = std::min(norm_block_rows, a.out - o0);
      if (!in_out) {
        MatrixView<T> v(block, nb, a.in);
        Backend::copy(w.row_block(o0, nb), v);
        Backend::template gemm<Trans::no, Trans::no>(scratch, a.scaling, a.B().row_block(o0, nb), a.A(), T(1), v);
        Backend::row_norms(ConstMatrixView<T>(v), n + o0);
      } else {
        MatrixView<T> v(block, a.in, nb);
        Backend::copy(ConstMatrixView<T>(w.data + o0, a.in, nb, w.stride), v);
        Backend::template gemm<Trans::yes, Trans::yes>(scratch, a.scaling, a.A(), a.B().row_block(o0, nb), T(1), v);
        Backend::col_norms(ConstMatrixView<T>(v), n + o0);
      }
    }
  }

  /// m ← ‖W + s·B·A‖ (PEFT's DoRA update_layer), after A and B are initialised; sizes the magnitude.
  static void init_magnitude(adapter_type& a, bool in_out, ConstMatrixView<T> w) {
    a.magnitude.resize(std::size_t(a.out));
    a.grad_magnitude.resize(std::size_t(a.out));
    Scratch scratch;
    buffer<T> block;
    reserve_norm(a, in_out, scratch, &block);
    weight_norm(a, in_out, w, scratch, block.data(), a.magnitude.data());
  }

  /// The forward's norm of DoRA adapter `a` and its gains: norm, g = m / norm (detached), g − 1 ([out] each).
  static void gains(const adapter_type& a, bool in_out, ConstMatrixView<T> w, Scratch& scratch, T* block, T* norm, T* g, T* g_m1) {
    weight_norm(a, in_out, w, scratch, block, norm);
    Backend::div(a.M(), ConstMatrixView<T>(norm, 1, a.out), MatrixView<T>(g, 1, a.out));
    MatrixView<T> gm1(g_m1, 1, a.out);
    Backend::fill(gm1, T(-1));
    Backend::axpby(T(1), ConstMatrixView<T>(g, 1, a.out), T(1), gm1);
  }

  /// w ← w ⊙ v per "out" (rows of [out, in], columns of [in, out]).
  static void scale_out(bool in_out, MatrixView<T> w, const T* v) {
    if (!in_out) Backend::scale_rows(w, v);
    else Backend::scale_cols(w, v);
  }

  /// Takes merged adapter `a` out of w: w − ΔW (LoRA), w ⊙ (norm / m) − ΔW (DoRA, the norm cached at merge).
  static void undo_merge(const adapter_type& a, bool in_out, Scratch& scratch, MatrixView<T> w) {
    if (a.dora()) {
      buffer<T> inv(std::size_t(a.out));
      Backend::div(ConstMatrixView<T>(a.merge_norm.view(1, a.out)), a.M(), inv.view(1, a.out));  // 1 / g
      scale_out(in_out, w, inv.data());
    }
    write_delta(a, in_out, scratch, w, T(-1), T(1));
  }

  /// DoRA merge of adapters[slot] into w (the base weight or a copy of it): norm_out ← ‖W₀ + ΔW‖, w ← (m /
  /// norm_out) ⊙ (w + ΔW). W₀ is w with the other merged adapters of the bank undone, last merged first
  /// (PEFT's _unmerged_base_weight).
  static void dora_merge(const std::vector<adapter_type>& adapters, int slot, bool in_out, Scratch& scratch, MatrixView<T> w, T* norm_out) {
    const auto& a = adapters[std::size_t(slot)];
    std::vector<int> merged;
    for (std::size_t j = 0; j < adapters.size(); ++j)
      if (adapters[j].merged && int(j) != slot) merged.push_back(int(j));
    std::sort(merged.begin(), merged.end(), [&](int i, int j) { return adapters[std::size_t(i)].merge_order > adapters[std::size_t(j)].merge_order; });
    buffer<T> w0_buf;
    ConstMatrixView<T> w0 = w;
    if (!merged.empty()) {
      w0_buf.resize(std::size_t(w.size()));
      auto v = w0_buf.view(w.rows, w.cols);
      Backend::copy(ConstMatrixView<T>(w), v);
      for (int j : merged) undo_merge(adapters[std::size_t(j)], in_out, scratch, v);
      w0 = v;
    }
    buffer<T> block;
    reserve_norm(a, in_out, scratch, &block);
    weight_norm(a, in_out, w0, scratch, block.data(), norm_out);
    buffer<T> g(std::size_t(a.out));
    Backend::div(a.M(), ConstMatrixView<T>(norm_out, 1, a.out), g.view(1, a.out));
    write_delta(a, in_out, scratch, w, T(1), T(1));
    scale_out(in_out, w, g.data());
  }

  /// Merges (sign > 0) or unmerges (sign < 0) adapters[slot] in the base weight `w` (and bias, for lora_bias),
  /// with the bank's merge bookkeeping. LoRA: W ± ΔW. DoRA: see dora_merge; unmerge with the cached norm.
  static void apply(std::vector<adapter_type>& adapters, int slot, bool in_out, MatrixView<T> w, MatrixView<T> bias, T sign,
                    std::uint64_t& merge_counter) {
    auto& a = adapters[std::size_t(slot)];
    Scratch scratch;
    if (!a.dora()) {
      write_delta(a, in_out, scratch, w, sign, T(1));
      if (a.config.lora_bias) Backend::axpby(sign * a.scaling, ConstMatrixView<T>(a.bias.view(1, a.out)), T(1), bias);
    } else if (sign > 0) {
      a.merge_norm.resize(std::size_t(a.out));
      dora_merge(adapters, slot, in_out, scratch, w, a.merge_norm.data());
    } else {
      undo_merge(a, in_out, scratch, w);
    }
    a.merged = sign > 0;
    a.merge_order = sign > 0 ? ++merge_counter : 0;
  }

  /// The merged weight of adapters[slot], computed in `w`, a copy of the base weight (safe merging).
  static void preview(const std::vector<adapter_type>& adapters, int slot, bool in_out, Scratch& scratch, MatrixView<T> w) {
    const auto& a = adapters[std::size_t(slot)];
    if (!a.dora()) {
      write_delta(a, in_out, scratch, w, T(1), T(1));
      return;
    }
    buffer<T> norm(std::size_t(a.out));
    dora_merge(adapters, slot, in_out, scratch, w, norm.data());
  }
};

}  // namespace detail

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
///
/// Active slots run in the order of the active set. With DoRA the order matters, as in PEFT: a DoRA slot
/// without dropout rescales the running output (everything added before it, minus the base bias).
template <class T, class Backend>
class LoraBank<Linear<T, Backend>> {
 public:
  using base_type = Linear<T, Backend>;
  using adapter_type = LoraAdapter<T, Backend>;
  using Scratch = typename Backend::template GemmScratch<T>;
  template <class U>
  using buffer = typename Backend::template buffer<U>;
  using Ops = detail::LoraWeightOps<T, Backend>;

  /// DoRA computes ‖W + s·B·A‖_row in blocks of this many output rows (no [out, in] temporary).
  static constexpr Index norm_block_rows = Ops::norm_block_rows;

  /// Per-forward state: which slots ran, and their saved activations.
  struct Context {
    struct Slot {
      buffer<T> t;    ///< dropout(x) Aᵀ, [batch, r]
      buffer<T> g;    ///< dy B, [batch, r]
      buffer<T> xd;   ///< dropout(x) [batch, in] (only when lora_dropout > 0)
      buffer<T> dxd;  ///< gradient w.r.t. dropout(x) (only when lora_dropout > 0)
      // DoRA only:
      buffer<T> q;         ///< [batch, out]: base term + s·(x Aᵀ) Bᵀ; the magnitude gradient is Σ_rows dy ⊙ q / norm
      buffer<T> norm;      ///< [out]: ‖W + s·B·A‖_row of this forward (detached)
      buffer<T> scale;     ///< [out]: g = m / norm
      buffer<T> scale_m1;  ///< [out]: g − 1
      bool dropped = false;                      ///< dropout was applied in this forward
      std::uint64_t stream = 0;                  ///< dropout stream of this forward
    };
    std::vector<Slot> slots;
    std::vector<int> ran;  ///< slots that contributed to the last forward, in order (capacity = slots.size())
    // DoRA only (empty without DoRA adapters):
    buffer<T> work0, work1;  ///< [batch, out]: the scaled LoRA term in forward; running output gradients in backward
    buffer<T> wblock;        ///< [norm_block_rows, in]: a block of W + s·B·A
    buffer<T> vec;           ///< [out]: the magnitude gradient before accumulation
    buffer<T> base_grad;     ///< [batch, out]: (Π g) ⊙ dy, the gradient of the base output (see base_output_grad)
    buffer<T> prod;          ///< [out]: Π g over the DoRA slots without dropout
    bool base_grad_given = false;  ///< the base's backward ran on base_grad: backward() adds no correction
  };

  std::size_t size() const noexcept { return adapters_.size(); }
  adapter_type& at(int slot) { return adapters_[std::size_t(slot)]; }
  const adapter_type& at(int slot) const { return adapters_[std::size_t(slot)]; }

  /// Adds an adapter for `base` with a resolved config; returns its slot. `base` is the adapted layer's
  /// own base (DoRA reads its weight in forward and backward).
  int add(const base_type& base, const LoraConfig& cfg, Generator& gen, std::string_view name) {
    cfg.validate();
    if (cfg.fan_in_fan_out != (base.layout() == WeightLayout::in_out))
      throw ConfigError(detail::cat("LoRA adapter '", name, "': fan_in_fan_out = ", cfg.fan_in_fan_out ? "true" : "false",
                                    " does not match the base weight layout (", base.layout() == WeightLayout::in_out ? "[in, out]" : "[out, in]",
                                    "); PEFT sets fan_in_fan_out = true exactly for Conv1D-style [in, out] weights"));
    if (cfg.lora_bias && !base.has_bias())
      throw ConfigError(detail::cat("LoRA adapter '", name, "': lora_bias needs a base layer with a bias"));
    adapter_type a = adapter_type::shaped(cfg, base.in_features(), base.out_features());
    const double bound_a = 1.0 / std::sqrt(double(a.in));
    switch (cfg.init_lora_weights) {
      // backend ops (the same numbers as Generator::uniform/normal): on a device backend A and B are device memory
      case LoraInit::standard: Backend::random_uniform(gen, a.A(), -bound_a, bound_a); break;
      case LoraInit::gaussian: Backend::random_normal(gen, a.A(), 0.0, 1.0 / double(a.r)); break;
      case LoraInit::off: {
        const double bound_b = 1.0 / std::sqrt(double(a.r));
        Backend::random_uniform(gen, a.A(), -bound_a, bound_a);
        Backend::random_uniform(gen, a.B(), -bound_b, bound_b);
        if (cfg.lora_bias) Backend::random_uniform(gen, a.B_bias(), -bound_b, bound_b);
        break;
      }
      case LoraInit::zeros: break;
    }
    if (cfg.use_dora) {
      // PEFT's DoraLinearLayer.update_layer: m = ‖W + s·B·A‖_row, after A and B are initialised
      Ops::init_magnitude(a, a.config.fan_in_fan_out, base.weight());
    }
    adapters_.push_back(std::move(a));
    if (cfg.use_dora) bind_base(const_cast<base_type&>(base));  // Adapted's base_ is not const; only add() sees it as const
    return int(adapters_.size() - 1);
  }
  void remove(int slot) { adapters_.erase(adapters_.begin() + slot); }

  /// DoRA reads the base weight (and bias) in forward and backward. The bank keeps a pointer to its
  /// layer's base, set by add(), apply_delta() and this hook. A bank that was copied or moved since (with
  /// its Adapted) refuses to run a DoRA adapter rather than read another layer's weight; an Adapted that
  /// calls bind_base(base_) before forward and backward lifts that restriction.
  void bind_base(base_type& base) noexcept {
    base_ = &base;
    self_ = this;
  }

  void make_context(Context& ctx, Scratch& scratch, Index max_batch) const {
    ctx.slots.resize(adapters_.size());
    ctx.ran.reserve(adapters_.size());
    Index dora_out = 0, dora_in = 0;
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
      if (a.dora()) {
        s.q.resize(std::size_t(max_batch * a.out));
        s.norm.resize(std::size_t(a.out));
        s.scale.resize(std::size_t(a.out));
        s.scale_m1.resize(std::size_t(a.out));
        dora_out = a.out;
        dora_in = a.in;
        Ops::reserve_norm(a, a.config.fan_in_fan_out, scratch);
        scratch.reserve_gemm(max_batch, a.out, a.in);  // xd Wᵀ (dropout)
        scratch.reserve_gemm(max_batch, a.in, a.out);  // dx += G W
        scratch.reserve_gemm(a.out, a.in, max_batch);  // dW ([out, in])
        scratch.reserve_gemm(a.in, a.out, max_batch);  // dW ([in, out])
      }
    }
    if (dora_out > 0) {
      ctx.work0.resize(std::size_t(max_batch * dora_out));
      ctx.work1.resize(std::size_t(max_batch * dora_out));
      ctx.wblock.resize(std::size_t(std::min(norm_block_rows, dora_out) * dora_in));
      ctx.vec.resize(std::size_t(dora_out));
      ctx.base_grad.resize(std::size_t(max_batch * dora_out));
      ctx.prod.resize(std::size_t(dora_out));
    }
  }

  /// Called by Adapted before the base layer's backward. DoRA slots without dropout rescale the running
  /// output, the base output included, so the gradient of the base output is (Π g) ⊙ dy. Returns it (in the
  /// context) so that the base computes dx and dW from it with its own GEMMs, and backward() need not add a
  /// correction through W (one GEMM saved). Returns dy unchanged when no such slot ran, or when the base is
  /// trainable with a bias (the bias is not rescaled; backward() then corrects dx and dW itself).
  ConstMatrixView<T> base_output_grad(Context& ctx, ConstMatrixView<T> dy) {
    ctx.base_grad_given = false;
    int scaled = 0;
    for (int slot : ctx.ran) scaled += adapters_[std::size_t(slot)].dora() && !ctx.slots[std::size_t(slot)].dropped;
    if (scaled == 0) return dy;
    const base_type& base = bound_base("backward");
    if (base.requires_grad() && base.has_bias()) return dy;
    const Index out = base.out_features();
    auto prod = ctx.prod.view(1, out);
    Backend::fill(prod, T(1));
    for (int slot : ctx.ran)
      if (adapters_[std::size_t(slot)].dora() && !ctx.slots[std::size_t(slot)].dropped)
        Backend::mul(ConstMatrixView<T>(ctx.slots[std::size_t(slot)].scale.view(1, out)), prod);
    auto g = ctx.base_grad.view(dy.rows, out);
    Backend::add_scaled_cols(dy, prod.data, T(0), g);
    ctx.base_grad_given = true;
    return g;
  }

  /// y += Σ_{slot in active} s · dropout(x) Aᵀ Bᵀ (+ s·b_B), in order; DoRA slots as in the file comment.
  /// `dropout_on` is the layer's train mode.
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
      if (a.dora()) {
        dora_forward(ctx, s, scratch, a, xin, y);
        continue;
      }
      Backend::template gemm<Trans::no, Trans::yes>(scratch, a.scaling, ConstMatrixView<T>(t), a.B(), T(1), y);
      if (a.config.lora_bias) Backend::add_row_vector(y, a.bias.data(), a.scaling);
    }
  }

  /// Backward of the slots that ran, last first. LoRA: dx += s · (dy B) A (through the dropout mask);
  /// parameter gradients of trainable slots per `mode`: dA = s (dy B)ᵀ dropout(x), dB = s dyᵀ t,
  /// db_B = s Σ_rows dy. DoRA (norm detached): the same with dy replaced by g ⊙ dy, dm = Σ_rows dy ⊙ q / norm,
  /// and the base term's gradient (g − 1) ⊙ dy through W (into dx, and into dW when the base is trainable).
  void backward(Context& ctx, Scratch& scratch, ConstMatrixView<T> x, ConstMatrixView<T> dy, MatrixView<T> dx, GradMode mode,
                std::uint64_t seed) {
    const Index m = dy.rows;
    const T beta = mode == GradMode::accumulate ? T(1) : T(0);
    ConstMatrixView<T> d = dy;  // gradient w.r.t. the running output after the slot being processed
    MatrixView<T> d_buf;        // the work buffer d lives in once a DoRA slot without dropout has scaled it
    for (auto it = ctx.ran.rbegin(); it != ctx.ran.rend(); ++it) {
      const int slot = *it;
      auto& a = adapters_[std::size_t(slot)];
      auto& s = ctx.slots[std::size_t(slot)];
      ConstMatrixView<T> dl = d;  // upstream gradient of this slot's s·B·A branch
      MatrixView<T> gd;
      if (a.dora()) {
        // the branch is g ⊙ s·lora: its gradient is g ⊙ d; into the work buffer that does not hold d
        gd = (d_buf.data == ctx.work0.data() ? ctx.work1 : ctx.work0).view(m, a.out);
        Backend::add_scaled_cols(d, s.scale.data(), T(0), gd);
        dl = gd;
        if (a.requires_grad) {
          auto v = ctx.vec.view(1, a.out);
          Backend::sum_rows_mul(d, ConstMatrixView<T>(s.q.view(m, a.out)), v.data, T(1), T(0));
          Backend::div(ConstMatrixView<T>(v), ConstMatrixView<T>(s.norm.view(1, a.out)), v);
          Backend::axpby(T(1), ConstMatrixView<T>(v), beta, a.grad_M());
        }
      }
      auto g = s.g.view(m, a.r);
      Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), dl, a.B(), T(0), g);
      ConstMatrixView<T> xin = s.dropped ? ConstMatrixView<T>(s.xd.view(m, a.in)) : x;
      if (a.requires_grad) {
        Backend::template gemm<Trans::yes, Trans::no>(scratch, a.scaling, dl, ConstMatrixView<T>(s.t.view(m, a.r)), beta, a.grad_B());
        Backend::template gemm<Trans::yes, Trans::no>(scratch, a.scaling, ConstMatrixView<T>(g), xin, beta, a.grad_A());
        if (a.config.lora_bias) Backend::sum_rows(dl, a.grad_bias.data(), a.scaling, beta);
      }
      const bool dora_base_term = a.dora() && s.dropped;  // (g − 1) ⊙ (dropout(x) Wᵀ), dropout active
      if (a.dora() && !s.dropped) {
        // y_k = y_{k-1} + (g − 1) ⊙ (y_{k-1} − b) + …: the gradient reaching the earlier output is g ⊙ d
        d = gd;
        d_buf = gd;
      }
      if (dora_base_term) {
        Backend::add_scaled_cols(d, s.scale_m1.data(), T(0), gd);  // gd ← (g − 1) ⊙ d (g ⊙ d is no longer needed)
        auto& base = bound_base("backward");
        if (base.requires_grad()) weight_grad_add(scratch, base, ConstMatrixView<T>(gd), xin);
      }
      if (dx.empty()) continue;
      if (!s.dropped) {
        Backend::template gemm<Trans::no, Trans::no>(scratch, a.scaling, ConstMatrixView<T>(g), a.A(), T(1), dx);
      } else {
        // d(dropout(x)) = s g A (+ ((g − 1) ⊙ d) W for DoRA), then through the same mask (recomputed from
        // the counter-based stream).
        auto dxd = s.dxd.view(m, a.in);
        Backend::template gemm<Trans::no, Trans::no>(scratch, a.scaling, ConstMatrixView<T>(g), a.A(), T(0), dxd);
        if (dora_base_term) input_grad_add(scratch, bound_base("backward"), ConstMatrixView<T>(gd), dxd);
        Backend::dropout(ConstMatrixView<T>(dxd), dxd, a.config.lora_dropout, seed, s.stream);
        Backend::axpby(T(1), ConstMatrixView<T>(dxd), T(1), dx);
      }
    }
    if (d_buf.data && !ctx.base_grad_given) {
      // The base (and whatever ran before this bank) fed an output that DoRA rescaled: its gradient is d,
      // not the dy the base layer's backward used. Add the difference through W.
      Backend::axpby(T(-1), dy, T(1), d_buf);  // d − dy
      auto& base = bound_base("backward");
      if (!dx.empty()) input_grad_add(scratch, base, ConstMatrixView<T>(d_buf), dx);
      if (base.requires_grad()) weight_grad_add(scratch, base, ConstMatrixView<T>(d_buf), x);
    }
  }

  /// Merges (sign > 0) or unmerges (sign < 0) the adapter in the base weight. LoRA: W ± ΔW, bias ± s·b_B.
  /// DoRA (PEFT's rule): W ← (m / n) ⊙ (W + ΔW), n = ‖W₀ + ΔW‖_row over the base weight W₀ with this bank's
  /// other merged adapters taken out (PEFT's _unmerged_base_weight); n is cached for the unmerge
  /// W ← W ⊘ (m / n) − ΔW.
  void apply_delta(int slot, base_type& base, T sign) {
    if (adapters_[std::size_t(slot)].dora()) bind_base(base);
    Ops::apply(adapters_, slot, adapters_[std::size_t(slot)].config.fan_in_fan_out, base.weight(), base.bias(), sign, merge_counter_);
  }

  /// The merged weight, computed in `w`, a copy of the base weight (safe merging).
  void merge_preview(int slot, Scratch& scratch, MatrixView<T> w) const {
    Ops::preview(adapters_, slot, adapters_[std::size_t(slot)].config.fan_in_fan_out, scratch, w);
  }

  /// out = sign · ΔW + beta · out, ΔW = s · B A in the base layout ([out, in], or [in, out] for fan_in_fan_out).
  /// For a DoRA adapter this is the plain LoRA delta too, as PEFT's get_delta_weight.
  void write_delta(int slot, Scratch& scratch, MatrixView<T> out, T sign, T beta) const {
    const auto& a = adapters_[std::size_t(slot)];
    Ops::write_delta(a, a.config.fan_in_fan_out, scratch, out, sign, beta);
  }

  /// Visits lora_A.<name>.weight, lora_B.<name>.weight (+ lora_B.<name>.bias with lora_bias) and, for DoRA,
  /// lora_magnitude_vector.<name>.weight (PEFT's in-memory name; its checkpoint key drops ".<name>.weight").
  template <class F>
  void visit_parameters(int slot, std::string_view name, F&& f) {
    auto& a = adapters_[std::size_t(slot)];
    const std::string n(name);
    f(ParamRef<T>{"lora_A." + n + ".weight", a.a.data(), a.grad_a.data(), a.a.size(), a.requires_grad, Backend::host_accessible});
    f(ParamRef<T>{"lora_B." + n + ".weight", a.b.data(), a.grad_b.data(), a.b.size(), a.requires_grad, Backend::host_accessible});
    if (a.config.lora_bias) f(ParamRef<T>{"lora_B." + n + ".bias", a.bias.data(), a.grad_bias.data(), a.bias.size(), a.requires_grad, Backend::host_accessible});
    if (a.dora())
      f(ParamRef<T>{"lora_magnitude_vector." + n + ".weight", a.magnitude.data(), a.grad_magnitude.data(), a.magnitude.size(),
                    a.requires_grad, Backend::host_accessible});
  }
  void set_requires_grad(int slot, bool on) { adapters_[std::size_t(slot)].requires_grad = on; }
  void zero_grad(int slot) {
    auto& a = adapters_[std::size_t(slot)];
    a.grad_a.zero();
    a.grad_b.zero();
    a.grad_bias.zero();
    a.grad_magnitude.zero();
  }

 private:
  base_type& bound_base(const char* where) const {
    if (base_ == nullptr || self_ != this)
      throw StateError(detail::cat("LoRA (DoRA) ", where,
                                   ": this layer was copied or moved after its DoRA adapter was added, so the adapter cannot "
                                   "find the base weight it reads; add DoRA adapters once the layer is in its final place"));
    return *base_;
  }

  /// One DoRA slot's forward (t = xin Aᵀ is computed): norm, g, the saved q, and y += (g − 1) ⊙ base term +
  /// g ⊙ s·t Bᵀ.
  void dora_forward(Context& ctx, typename Context::Slot& s, Scratch& scratch, const adapter_type& a, ConstMatrixView<T> xin,
                    MatrixView<T> y) const {
    const base_type& base = bound_base("forward");
    const Index m = y.rows;
    const auto norm = s.norm.view(1, a.out);
    const auto scale = s.scale.view(1, a.out);
    const auto scale_m1 = s.scale_m1.view(1, a.out);
    Ops::gains(a, a.config.fan_in_fan_out, base.weight(), scratch, ctx.wblock.data(), norm.data, scale.data, scale_m1.data);  // g = m / ‖W + s·B·A‖ (detached)
    auto q = s.q.view(m, a.out);
    if (!s.dropped) {
      // PEFT passes the running result: the base output and every slot before this one, minus the base bias
      Backend::copy(ConstMatrixView<T>(y), q);
      if (base.has_bias()) Backend::add_row_vector(q, base.bias().data, T(-1));
    } else if (!a.config.fan_in_fan_out) {
      Backend::template gemm<Trans::no, Trans::yes>(scratch, T(1), xin, base.weight(), T(0), q);  // dropout(x) Wᵀ
    } else {
      Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), xin, base.weight(), T(0), q);
    }
    auto lora = ctx.work0.view(m, a.out);
    Backend::template gemm<Trans::no, Trans::yes>(scratch, a.scaling, ConstMatrixView<T>(s.t.view(m, a.r)), a.B(), T(0), lora);
    Backend::add_scaled_cols(ConstMatrixView<T>(q), scale_m1.data, T(1), y);
    Backend::add_scaled_cols(ConstMatrixView<T>(lora), scale.data, T(1), y);
    Backend::axpby(T(1), ConstMatrixView<T>(lora), T(1), q);
  }

  /// dx += g W (g: [batch, out]), whatever the base layout.
  static void input_grad_add(Scratch& scratch, const base_type& base, ConstMatrixView<T> g, MatrixView<T> dx) {
    if (base.layout() == WeightLayout::out_in) Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), g, base.weight(), T(1), dx);
    else Backend::template gemm<Trans::no, Trans::yes>(scratch, T(1), g, base.weight(), T(1), dx);
  }
  /// dW += gᵀ x in the base layout (base weight trainable).
  static void weight_grad_add(Scratch& scratch, base_type& base, ConstMatrixView<T> g, ConstMatrixView<T> x) {
    if (base.layout() == WeightLayout::out_in) Backend::template gemm<Trans::yes, Trans::no>(scratch, T(1), g, x, T(1), base.weight_grad());
    else Backend::template gemm<Trans::yes, Trans::no>(scratch, T(1), x, g, T(1), base.weight_grad());
  }

  std::vector<adapter_type> adapters_;
  base_type* base_ = nullptr;   ///< the adapted layer's base (DoRA); see bind_base
  const void* self_ = nullptr;  ///< this bank's address when base_ was set: a copy or move invalidates base_
  std::uint64_t merge_counter_ = 0;
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
