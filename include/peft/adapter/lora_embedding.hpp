// peft++ — LoRA on Embedding layers, as PEFT's lora.Embedding:
//
//   A: [r, num_embeddings] (lora_embedding_A)   B: [embedding_dim, r] (lora_embedding_B)
//   y = W[ids] + s · Aᵀ[ids] Bᵀ        ΔW = s · (B A)ᵀ   ([num_embeddings, embedding_dim])
//   init (default): A = 0, B ~ N(0, 1) — the transpose of the Linear rule; no dropout (PEFT ignores it here).
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

  struct Context {
    struct Slot {
      typename Backend::template buffer<T> t;  ///< Aᵀ[ids], [n, r]
      typename Backend::template buffer<T> g;  ///< dy B, [n, r]
    };
    std::vector<Slot> slots;
    std::vector<int> ran;
  };

  std::size_t size() const noexcept { return adapters_.size(); }
  adapter_type& at(int slot) { return adapters_[std::size_t(slot)]; }
  const adapter_type& at(int slot) const { return adapters_[std::size_t(slot)]; }

  int add(const base_type& base, const LoraConfig& cfg, Generator& gen, std::string_view name) {
    cfg.validate();
    if (cfg.use_dora) throw ConfigError(detail::cat("LoRA adapter '", name, "': use_dora (DoRA) is not implemented on an embedding yet"));
    if (cfg.fan_in_fan_out) throw ConfigError(detail::cat("LoRA adapter '", name, "': fan_in_fan_out does not apply to an embedding"));
    if (cfg.lora_bias) throw ConfigError(detail::cat("LoRA adapter '", name, "': lora_bias is not supported on an embedding (as in PEFT)"));
    padding_idx_ = base.padding_idx().value_or(-1);
    adapter_type a = adapter_type::shaped(cfg, base.num_embeddings(), base.embedding_dim());
    switch (cfg.init_lora_weights) {
      case LoraInit::standard:
      case LoraInit::gaussian:  // PEFT treats every truthy init the same on embeddings
        gen.normal(a.b.data(), a.b.size(), 0.0, 1.0);
        break;
      case LoraInit::off:  // torch.randn for both
        gen.normal(a.a.data(), a.a.size(), 0.0, 1.0);
        gen.normal(a.b.data(), a.b.size(), 0.0, 1.0);
        break;
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
      ctx.slots[i].t.resize(std::size_t(max_batch * a.r));
      ctx.slots[i].g.resize(std::size_t(max_batch * a.r));
      scratch.reserve_gemm(max_batch, a.out, a.r);
      scratch.reserve_gemm(max_batch, a.r, a.out);
      scratch.reserve_gemm(a.out, a.r, max_batch);
    }
  }

  void forward(Context& ctx, Scratch& scratch, const std::vector<int>& active, TokenIds ids, MatrixView<T> y, bool, std::uint64_t,
               std::uint64_t) const {
    ctx.ran.assign(active.begin(), active.end());
    const Index n = Index(ids.size());
    for (int slot : active) {
      const auto& a = adapters_[std::size_t(slot)];
      auto t = ctx.slots[std::size_t(slot)].t.view(n, a.r);
      Backend::gather_cols(a.A(), ids.data(), t);
      Backend::template gemm<Trans::no, Trans::yes>(scratch, a.scaling, ConstMatrixView<T>(t), a.B(), T(1), y);
    }
  }

  void backward(Context& ctx, Scratch& scratch, TokenIds ids, ConstMatrixView<T> dy, MatrixView<T>, GradMode mode, std::uint64_t) {
    const Index n = dy.rows;
    const T beta = mode == GradMode::accumulate ? T(1) : T(0);
    for (int slot : ctx.ran) {
      auto& a = adapters_[std::size_t(slot)];
      if (!a.requires_grad) continue;
      auto& s = ctx.slots[std::size_t(slot)];
      auto g = s.g.view(n, a.r);
      Backend::template gemm<Trans::no, Trans::no>(scratch, T(1), dy, a.B(), T(0), g);
      Backend::template gemm<Trans::yes, Trans::no>(scratch, a.scaling, dy, ConstMatrixView<T>(s.t.view(n, a.r)), beta, a.grad_B());
      Backend::scale(a.grad_A(), beta);
      Backend::scatter_add_cols(ConstMatrixView<T>(g), ids.data(), a.scaling, a.grad_A(), padding_idx_);  // as F.embedding(padding_idx)
    }
  }

  void apply_delta(int slot, base_type& base, T sign) const {
    Scratch scratch;
    write_delta(slot, scratch, base.weight(), sign, T(1));
  }
  void merge_preview(int slot, Scratch& scratch, MatrixView<T> w) const { write_delta(slot, scratch, w, T(1), T(1)); }
  /// out = sign · s · (B A)ᵀ + beta · out, [num_embeddings, embedding_dim].
  void write_delta(int slot, Scratch& scratch, MatrixView<T> out, T sign, T beta) const {
    const auto& a = adapters_[std::size_t(slot)];
    scratch.reserve_gemm(a.in, a.out, a.r);
    Backend::template gemm<Trans::yes, Trans::yes>(scratch, sign * a.scaling, a.A(), a.B(), beta, out);
  }

  template <class F>
  void visit_parameters(int slot, std::string_view name, F&& f) {
    auto& a = adapters_[std::size_t(slot)];
    const std::string n(name);
    f(ParamRef<T>{"lora_embedding_A." + n, a.a.data(), a.grad_a.data(), a.a.size(), a.requires_grad});
    f(ParamRef<T>{"lora_embedding_B." + n, a.b.data(), a.grad_b.data(), a.b.size(), a.requires_grad});
  }
  void set_requires_grad(int slot, bool on) { adapters_[std::size_t(slot)].requires_grad = on; }
  void zero_grad(int slot) {
    adapters_[std::size_t(slot)].grad_a.zero();
    adapters_[std::size_t(slot)].grad_b.zero();
  }

 private:
  std::vector<adapter_type> adapters_;
  std::int64_t padding_idx_ = -1;
};

}  // namespace peft
