// peft++ — LoRA on Embedding layers, as PEFT's lora.Embedding:
//
//   A: [r, num_embeddings] (lora_embedding_A)   B: [embedding_dim, r] (lora_embedding_B)
//   y = W[ids] + s · Aᵀ[ids] Bᵀ        ΔW = s · (B A)ᵀ   ([num_embeddings, embedding_dim])
//   init (default): A = 0, B ~ N(0, 1) — the transpose of the Linear rule; no dropout (PEFT ignores it here).
//
// DoRA (use_dora), as PEFT's DoraEmbeddingLayer: m [dim], norm per embedding column over the vocabulary
// (‖(W + ΔW)[:, j]‖, detached), g = m / norm, y ← g ⊙ y + g ⊙ s·Aᵀ[ids] Bᵀ (y: the running output).
#pragma once

#include <string>
#include <vector>

#include "peft/adapter/lora.hpp"
#include "peft/layer/embedding.hpp"

namespace peft {

template <class T, class Backend>
class LoraBank<Embedding<T, Backend>> {
 public:
  using base_type = Embedding<T, Backend>;
  using adapter_type = LoraAdapter<T, Backend>;
  using Scratch = typename Backend::template GemmScratch<T>;
  template <class U>
  using buffer = typename Backend::template buffer<U>;
  using Ops = detail::LoraWeightOps<T, Backend>;
  /// The table [num_embeddings, dim] is W in the [in, out] layout: ΔW = s·(B A)ᵀ, DoRA's norm per column.
  static constexpr bool in_out = true;

  struct Context {
    struct Slot {
      buffer<T> t;  ///< Aᵀ[ids], [n, r]
      buffer<T> g;  ///< dy B, [n, r]
      // DoRA only:
      buffer<T> q;                      ///< [n, dim]: running output + s·lora; dm = Σ dy ⊙ q / norm
      buffer<T> norm, scale, scale_m1;  ///< [dim]: ‖W[:, j] + s·ΔW[:, j]‖ (detached), g = m / norm, g − 1
    };
    std::vector<Slot> slots;
    std::vector<int> ran;
    buffer<T> work0, work1;  ///< [n, dim] (DoRA): the scaled LoRA term in forward; running gradients in backward
    buffer<T> wblock;        ///< a block of W + s·ΔW for the norm (DoRA)
    buffer<T> vec;           ///< [dim] (DoRA)
    typename Backend::IndexStage ids;  ///< the ids where the backend reads them (a device copy on a GPU)
  };

  std::size_t size() const noexcept { return adapters_.size(); }
  adapter_type& at(int slot) { return adapters_[std::size_t(slot)]; }
  const adapter_type& at(int slot) const { return adapters_[std::size_t(slot)]; }

  int add(const base_type& base, const LoraConfig& cfg, Generator& gen, std::string_view name) {
    cfg.validate();
    if (cfg.fan_in_fan_out) throw ConfigError(detail::cat("LoRA adapter '", name, "': fan_in_fan_out does not apply to an embedding"));
    if (cfg.lora_bias) throw ConfigError(detail::cat("LoRA adapter '", name, "': lora_bias is not supported on an embedding (as in PEFT)"));
    padding_idx_ = base.padding_idx().value_or(-1);
    adapter_type a = adapter_type::shaped(cfg, base.num_embeddings(), base.embedding_dim());
    switch (cfg.init_lora_weights) {
      case LoraInit::standard:
      case LoraInit::gaussian:  // PEFT treats every truthy init the same on embeddings
        Backend::random_normal(gen, a.B(), 0.0, 1.0);
        break;
      case LoraInit::off:  // torch.randn for both
        Backend::random_normal(gen, a.A(), 0.0, 1.0);
        Backend::random_normal(gen, a.B(), 0.0, 1.0);
        break;
      case LoraInit::zeros: break;
    }
    if (cfg.use_dora) Ops::init_magnitude(a, in_out, base.weight());  // m = column norms of W + s·ΔW ([dim])
    adapters_.push_back(std::move(a));
    if (cfg.use_dora) bind_base(const_cast<base_type&>(base));
    return int(adapters_.size() - 1);
  }
  void remove(int slot) { adapters_.erase(adapters_.begin() + slot); }

  /// DoRA reads the table; Adapted binds its base before every forward and backward.
  void bind_base(base_type& base) noexcept {
    base_ = &base;
    self_ = this;
  }

  void make_context(Context& ctx, Scratch& scratch, Index max_batch) const {
    ctx.slots.resize(adapters_.size());
    ctx.ran.reserve(adapters_.size());
    ctx.ids.reserve(max_batch);
    Index dora_dim = 0, vocab = 0;
    for (std::size_t i = 0; i < adapters_.size(); ++i) {
      const auto& a = adapters_[i];
      auto& s = ctx.slots[i];
      s.t.resize(std::size_t(max_batch * a.r));
      s.g.resize(std::size_t(max_batch * a.r));
      scratch.reserve_gemm(max_batch, a.out, a.r);
      scratch.reserve_gemm(max_batch, a.r, a.out);
      scratch.reserve_gemm(a.out, a.r, max_batch);
      if (a.dora()) {
        s.q.resize(std::size_t(max_batch * a.out));
        for (auto* v : {&s.norm, &s.scale, &s.scale_m1}) v->resize(std::size_t(a.out));
        Ops::reserve_norm(a, in_out, scratch);
        dora_dim = a.out;
        vocab = a.in;
      }
    }
    if (dora_dim > 0) {
      ctx.work0.resize(std::size_t(max_batch * dora_dim));
      ctx.work1.resize(std::size_t(max_batch * dora_dim));
      ctx.wblock.resize(std::size_t(std::min(Ops::norm_block_rows, dora_dim) * vocab));
      ctx.vec.resize(std::size_t(dora_dim));
    }
  }

  /// y += s · Aᵀ[ids] Bᵀ per active slot, in order. DoRA (PEFT's DoraEmbeddingLayer; no dropout on
  /// embeddings): y ← g ⊙ y + g ⊙ s·Aᵀ[ids] Bᵀ, g = m / norm per column, y the running output.
  void forward(Context& ctx, Scratch& scratch, const std::vector<int>& active, TokenIds ids, MatrixView<T> y, bool, std::uint64_t,
               std::uint64_t) const {
    ctx.ran.assign(active.begin(), active.end());
    const Index n = Index(ids.size());
    const std::int64_t* staged = active.empty() ? nullptr : ctx.ids.stage(ids);
    for (int slot : active) {
      const auto& a = adapters_[std::size_t(slot)];
      auto& s = ctx.slots[std::size_t(slot)];
      auto t = s.t.view(n, a.r);
      Backend::gather_cols(a.A(), staged, t);
      if (!a.dora()) {
        Backend::template gemm<Trans::no, Trans::yes>(scratch, a.scaling, ConstMatrixView<T>(t), a.B(), T(1), y);
        continue;
      }
      const base_type& base = bound_base("forward");
      auto lora = ctx.work0.view(n, a.out);
      Backend::template gemm<Trans::no, Trans::yes>(scratch, a.scaling, ConstMatrixView<T>(t), a.B(), T(0), lora);
      Ops::gains(a, in_out, base.weight(), scratch, ctx.wblock.data(), s.norm.data(), s.scale.data(), s.scale_m1.data());
      auto q = s.q.view(n, a.out);
      Backend::copy(ConstMatrixView<T>(y), q);
      Backend::add_scaled_cols(ConstMatrixView<T>(q), s.scale_m1.data(), T(1), y);
      Backend::add_scaled_cols(ConstMatrixView<T>(lora), s.scale.data(), T(1), y);
      Backend::axpby(T(1), ConstMatrixView<T>(lora), T(1), q);
    }
  }

  /// Backward of the slots that ran, last first; no input gradient (ids). DoRA: dm = Σ_rows d ⊙ q / norm,
  /// the LoRA gradients with g ⊙ d, and d ← g ⊙ d for what ran before; a trainable table gets the difference.
  void backward(Context& ctx, Scratch& scratch, TokenIds, ConstMatrixView<T> dy, MatrixView<T>, GradMode mode, std::uint64_t) {
    const Index n = dy.rows;
    const std::int64_t* ids = ctx.ids.staged();  // the forward's
    const T beta = mode == GradMode::accumulate ? T(1) : T(0);
    ConstMatrixView<T> d = dy;
    MatrixView<T> d_buf;
    for (auto it = ctx.ran.rbegin(); it != ctx.ran.rend(); ++it) {
      auto& a = adapters_[std::size_t(*it)];
      auto& s = ctx.slots[std::size_t(*it)];
      ConstMatrixView<T> dl = d;
      if (a.dora()) {
        auto gd = (d_buf.data == ctx.work0.data() ? ctx.work1 : ctx.work0).view(n, a.out);
        Backend::add_scaled_cols(d, s.scale.data(), T(0), gd);
        if (a.requires_grad) {
          auto v = ctx.vec.view(1, a.out);
          Backend::sum_rows_mul(d, ConstMatrixView<T>(s.q.view(n, a.out)), v.data, T(1), T(0));
          Backend::div(ConstMatrixView<T>(v), ConstMatrixView<T>(s.norm.view(1, a.out)), v);
          Backend::axpby(T(1), ConstMatrixView<T>(v), beta, a.grad_M());
        }
        dl = gd;
        d = gd;
        d_buf = gd;
      }
      if (!a.requires_grad) continue;
      auto g = s.g.view(n, a.r);
      Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), dl, a.B(), T(0), g);
      Backend::template gemm<Trans::yes, Trans::no>(scratch, a.scaling, dl, ConstMatrixView<T>(s.t.view(n, a.r)), beta, a.grad_B());
      Backend::scale(a.grad_A(), beta);
      Backend::scatter_add_cols(ConstMatrixView<T>(g), ids, a.scaling, a.grad_A(), padding_idx_);  // as F.embedding(padding_idx)
    }
    if (d_buf.data) {
      auto& base = bound_base("backward");
      if (base.requires_grad()) {  // the table's rows fed an output DoRA rescaled: add (d − dy) to their gradient
        Backend::axpby(T(-1), dy, T(1), d_buf);
        Backend::scatter_add_rows(ConstMatrixView<T>(d_buf), ids, T(1), base.weight_grad(), padding_idx_);
      }
    }
  }

  void apply_delta(int slot, base_type& base, T sign) {
    if (adapters_[std::size_t(slot)].dora()) bind_base(base);
    Ops::apply(adapters_, slot, in_out, base.weight(), MatrixView<T>{}, sign, merge_counter_);
  }
  void merge_preview(int slot, Scratch& scratch, MatrixView<T> w) const { Ops::preview(adapters_, slot, in_out, scratch, w); }
  /// out = sign · s · (B A)ᵀ + beta · out, [num_embeddings, embedding_dim] (the plain LoRA delta for DoRA too).
  void write_delta(int slot, Scratch& scratch, MatrixView<T> out, T sign, T beta) const {
    Ops::write_delta(adapters_[std::size_t(slot)], in_out, scratch, out, sign, beta);
  }

  /// lora_embedding_A.<name>, lora_embedding_B.<name>, and for DoRA lora_magnitude_vector.<name>.weight.
  template <class F>
  void visit_parameters(int slot, std::string_view name, F&& f) {
    auto& a = adapters_[std::size_t(slot)];
    const std::string n(name);
    f(ParamRef<T>{"lora_embedding_A." + n, a.a.data(), a.grad_a.data(), a.a.size(), a.requires_grad, Backend::host_accessible});
    f(ParamRef<T>{"lora_embedding_B." + n, a.b.data(), a.grad_b.data(), a.b.size(), a.requires_grad, Backend::host_accessible});
    if (a.dora())
      f(ParamRef<T>{"lora_magnitude_vector." + n + ".weight", a.magnitude.data(), a.grad_magnitude.data(), a.magnitude.size(),
                    a.requires_grad, Backend::host_accessible});
  }
  void set_requires_grad(int slot, bool on) { adapters_[std::size_t(slot)].requires_grad = on; }
  void zero_grad(int slot) {
    auto& a = adapters_[std::size_t(slot)];
    a.grad_a.zero();
    a.grad_b.zero();
    a.grad_magnitude.zero();
  }

 private:
  base_type& bound_base(const char* where) const {
    if (base_ == nullptr || self_ != this)
      throw StateError(detail::cat("LoRA (DoRA) on Embedding ", where, ": the adapter's bank was copied or moved outside its Adapted layer"));
    return *base_;
  }

  std::vector<adapter_type> adapters_;
  std::int64_t padding_idx_ = -1;
  base_type* base_ = nullptr;
  const void* self_ = nullptr;
  std::uint64_t merge_counter_ = 0;
};

}  // namespace peft
