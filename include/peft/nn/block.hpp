// peft++ — the pre-LN residual transformer block (GPT-2's):  a = x + attn(ln_1(x));  y = a + mlp(ln_2(a)).
#pragma once

#include <array>
#include <string>
#include <string_view>

#include "peft/nn/attention.hpp"
#include "peft/nn/layer_norm.hpp"
#include "peft/nn/mlp.hpp"

namespace peft::nn {

/// A pre-LN decoder block. AttnProj is the type of q/k/v/o, MlpProj that of fc_in/fc_out (Linear, or an
/// Adapted Linear). An aggregate walked by the model helpers (paths "ln_1.weight", "attn.q_proj.weight",
/// "mlp.fc_in.weight", ...). Make one with `make_decoder_block`.
template <class AttnProj, class MlpProj = AttnProj>
struct DecoderBlock {
  using scalar = typename AttnProj::scalar;
  using T = scalar;
  using backend_type = typename AttnProj::backend_type;
  using Backend = backend_type;
  using Buffer = typename Backend::template buffer<T>;
  static constexpr std::array<std::string_view, 4> field_names{"ln_1", "attn", "ln_2", "mlp"};

  LayerNorm<T, Backend> ln_1;
  CausalSelfAttention<AttnProj> attn;
  LayerNorm<T, Backend> ln_2;
  MlpBlock<MlpProj> mlp;

  struct Context {
    typename LayerNorm<T, Backend>::Context ln_1, ln_2;
    typename CausalSelfAttention<AttnProj>::Context attn;
    typename MlpBlock<MlpProj>::Context mlp;
    Index rows = 0;
    bool has_forward = false;
    Buffer h1, mid, h2, dh2, dmid, dh1;  // [max_batch · max_seq, d_model]
  };

  Index d_model() const noexcept { return attn.d_model(); }

  Context make_context(Index max_batch, Index max_seq, Index max_past = 0) const {
    const Index d = d_model();
    if (ln_1.dim() != d || ln_2.dim() != d || mlp.d_model() != d)
      throw ShapeError(detail::cat("DecoderBlock: ln_1 (", ln_1.dim(), "), ln_2 (", ln_2.dim(), ") and the MLP (", mlp.d_model(),
                                   ") must all have the attention's d_model ", d));
    Context c;
    c.attn = attn.make_context(max_batch, max_seq, max_past);
    const Index rows = max_batch * max_seq;
    c.ln_1 = ln_1.make_context(rows);
    c.ln_2 = ln_2.make_context(rows);
    c.mlp = mlp.make_context(rows);
    for (Buffer* b : {&c.h1, &c.mid, &c.h2, &c.dh2, &c.dmid, &c.dh1}) b->resize(std::size_t(rows * d));
    return c;
  }

  /// requires: as CausalSelfAttention::forward (x, y [batch · seq, d_model], y not overlapping x).
  /// ensures: y assigned; ctx keeps x until backward.
  void forward(Context& ctx, ConstMatrixView<T> x, Index batch, Index seq, MatrixView<T> y, PastKeyValue<T> past = {},
               AttentionMask mask = {}) {
    const Index rows = batch * seq, d = d_model();
    require_shape(x, rows, d, "DecoderBlock.forward: x [batch * seq, d_model]");
    require_shape(y, rows, d, "DecoderBlock.forward: y [batch * seq, d_model]");
    if (overlaps(x, y)) throw ShapeError("DecoderBlock.forward: y overlaps x");
    if (batch <= 0 || seq <= 0 || batch > ctx.attn.max_batch || seq > ctx.attn.max_seq)
      throw ShapeError(detail::cat("DecoderBlock.forward: batch ", batch, " and sequence length ", seq, " must be positive and fit the context's max_batch ",
                                   ctx.attn.max_batch, " and max_seq ", ctx.attn.max_seq));
    auto h1 = MatrixView<T>(ctx.h1.data(), rows, d), mid = MatrixView<T>(ctx.mid.data(), rows, d), h2 = MatrixView<T>(ctx.h2.data(), rows, d);
    ln_1.forward(ctx.ln_1, x, h1);
    attn.forward(ctx.attn, h1, batch, seq, mid, past, mask);
    Backend::axpby(T(1), x, T(1), mid);
    ln_2.forward(ctx.ln_2, mid, h2);
    mlp.forward(ctx.mlp, h2, y);
    Backend::axpby(T(1), ConstMatrixView<T>(mid), T(1), y);
    ctx.rows = rows;
    ctx.has_forward = true;
  }

  /// dx ([batch · seq, d_model] or empty) per `input`; trainable parameters per `params`; past-key/value
  /// gradients per dpast.mode.
  void backward(Context& ctx, ConstMatrixView<T> dy, MatrixView<T> dx, PastKeyValueGrad<T> dpast = {},
                GradMode params = GradMode::accumulate, GradMode input = GradMode::overwrite) {
    if (!ctx.has_forward) throw StateError("DecoderBlock.backward: the context holds no forward pass");
    const Index rows = ctx.rows, d = d_model();
    require_shape(dy, rows, d, "DecoderBlock.backward: dy");
    if (!dx.empty()) require_shape(dx, rows, d, "DecoderBlock.backward: dx");
    auto dh2 = MatrixView<T>(ctx.dh2.data(), rows, d), dmid = MatrixView<T>(ctx.dmid.data(), rows, d), dh1 = MatrixView<T>(ctx.dh1.data(), rows, d);
    mlp.backward(ctx.mlp, dy, dh2, params, GradMode::overwrite);
    Backend::copy(dy, dmid);
    ln_2.backward(ctx.ln_2, dh2, dmid, params, GradMode::accumulate);
    attn.backward(ctx.attn, dmid, dh1, dpast, params, GradMode::overwrite);
    if (!dx.empty()) Backend::axpby(T(1), ConstMatrixView<T>(dmid), input == GradMode::accumulate ? T(1) : T(0), dx);
    ln_1.backward(ctx.ln_1, dh1, dx, params, GradMode::accumulate);
  }
};

/// A block with PyTorch-initialised layers; adapted projections get module paths under `path`
/// ("<path>.attn.q_proj", "<path>.mlp.fc_in", ...).
template <class AttnProj, class MlpProj = AttnProj>
DecoderBlock<AttnProj, MlpProj> make_decoder_block(Index d_model, Index num_heads, Index d_ff, Generator& gen,
                                                   GeluApproximate act = GeluApproximate::tanh, double eps = 1e-5,
                                                   const std::string& path = {}) {
  using T = typename AttnProj::scalar;
  using B = typename AttnProj::backend_type;
  return DecoderBlock<AttnProj, MlpProj>{LayerNorm<T, B>(d_model, eps),
                                         make_causal_self_attention<AttnProj>(d_model, num_heads, gen, impl::join_path(path, "attn")),
                                         LayerNorm<T, B>(d_model, eps),
                                         make_mlp_block<MlpProj>(d_model, d_ff, gen, act, impl::join_path(path, "mlp"))};
}

}  // namespace peft::nn
