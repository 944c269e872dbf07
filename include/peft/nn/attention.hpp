// peft++ — causal multi-head self-attention with q/k/v/o projections that are any linear layer type (the
// library's Linear, or Adapted<Linear, Kinds...> so that LoRA and the other weight adapters apply to them),
// optional past keys/values prepended to the keys/values (what prefix tuning feeds), and an attention mask
// over past + current positions. Backward reaches the projections, the input and the past keys/values.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "peft/backend/eigen_cpu.hpp"
#include "peft/errors.hpp"
#include "peft/grad_mode.hpp"
#include "peft/layer/linear.hpp"
#include "peft/nn/kernels.hpp"
#include "peft/rng.hpp"
#include "peft/view.hpp"

namespace peft::nn {

/// One layer's past keys and values, each [batch, heads, past_len, head_dim] contiguous, seen as a
/// [batch · heads · past_len, head_dim] view: row (b · heads + h) · past_len + t holds position t of head h
/// of batch row b (transformers' past_key_values layout). Empty (past_len 0) when there is no past.
template <class T>
struct PastKeyValue {
  ConstMatrixView<T> key = {};
  ConstMatrixView<T> value = {};
  Index past_len = 0;
};

/// Where backward writes the gradients of a PastKeyValue (same shapes), and how (`mode`: overwrite
/// assigns, accumulate adds). An empty view skips that gradient.
template <class T>
struct PastKeyValueGrad {
  MatrixView<T> key = {};
  MatrixView<T> value = {};
  GradMode mode = GradMode::overwrite;
};

/// transformers' attention_mask: [batch, past_len + seq] row-major, 1 = attend, 0 = masked (padding).
/// An empty span means "attend everywhere" (within the causal limit).
using AttentionMask = std::span<const std::int64_t>;

namespace impl {
/// A projection of type Proj (Linear<T, B> or a layer built from one, such as Adapted<Linear<T, B>, ...>)
/// with PyTorch's default init, `path` as the adapted layer's module path.
template <class Proj>
Proj make_projection(Index in, Index out, bool bias, Generator& gen, const std::string& path) {
  using T = typename Proj::scalar;
  using B = typename Proj::backend_type;
  Linear<T, B> lin(in, out, bias, gen);
  if constexpr (std::is_same_v<Proj, Linear<T, B>>) return lin;
  else return Proj(std::move(lin), path);
}
template <class T>
MatrixView<T> block_of(MatrixView<T> m, Index r0, Index rows, Index c0, Index cols) {
  MatrixView<T> v;
  v.data = m.data + r0 * m.stride + c0;
  v.rows = rows;
  v.cols = cols;
  v.stride = m.stride;
  return v;
}
inline std::string join_path(const std::string& a, const char* b) { return a.empty() ? std::string(b) : a + "." + b; }
}  // namespace impl

/// Causal multi-head self-attention (GPT-2's, with separate q/k/v/o projections):
///   q, k, v = x Wqᵀ + bq, x Wkᵀ + bk, x Wvᵀ + bv                    x [batch · seq, d_model], row b · seq + s
///   per batch row b and head h: K = [past_key; k_h], V = [past_value; v_h]   ([past_len + seq, head_dim])
///   P = softmax(q_h Kᵀ / √head_dim) over the keys query s may see: key j <= past_len + s, and mask[b, j] != 0
///   y = concat_h(P V) Woᵀ + bo
/// A query that sees no key (all masked) gets a zero attention output. No dropout.
///
/// An aggregate (walked by the model helpers; `field_names` gives the parameter paths
/// "q_proj.weight", ...). Make one with `make_causal_self_attention`.
template <class Proj>
struct CausalSelfAttention {
  using scalar = typename Proj::scalar;
  using T = scalar;
  using backend_type = typename Proj::backend_type;
  using Backend = backend_type;
  using K = NnKernels<Backend>;
  using Buffer = typename Backend::template buffer<T>;
  static constexpr std::array<std::string_view, 5> field_names{"q_proj", "k_proj", "v_proj", "o_proj", "num_heads"};

  Proj q_proj;
  Proj k_proj;
  Proj v_proj;
  Proj o_proj;
  Index num_heads = 1;

  /// Saved activations, buffers and GEMM scratch for batches of up to max_batch rows of up to max_seq
  /// tokens with up to max_past past positions. Owned by the caller; forward/backward allocate nothing.
  struct Context {
    typename Proj::Context q, k, v, o;
    Index max_batch = 0, max_seq = 0, max_past = 0;
    Index batch = 0, seq = 0, past = 0;
    ConstMatrixView<T> x;
    bool has_forward = false;
    Buffer qb, kb, vb, attn, dattn, dq, dk, dv;  // [max_batch · max_seq, d_model]
    Buffer kcat, vcat;                           // [max_batch · heads · (max_past + max_seq), head_dim]
    Buffer probs;                                // [max_batch · heads · max_seq, max_past + max_seq]
    Buffer dprobs;                               // [max_seq, max_past + max_seq]
    Buffer dkc, dvc;                             // [max_past + max_seq, head_dim]
    typename Backend::template GemmScratch<T> scratch;
    typename Backend::IndexStage mask;           ///< the attention mask where the backend reads it (a device copy on a GPU)
  };

  Index d_model() const noexcept { return q_proj.in_features(); }
  Index head_dim() const noexcept { return num_heads > 0 ? q_proj.out_features() / num_heads : 0; }

  /// Throws ShapeError unless the projections and the head count fit together: q/k/v map d_model to
  /// d_model, o maps d_model back, and d_model is a multiple of num_heads.
  void check_shapes() const {
    const Index d = q_proj.in_features();
    if (num_heads <= 0) throw ShapeError(detail::cat("CausalSelfAttention: num_heads must be positive, got ", num_heads));
    const std::pair<const char*, const Proj*> ps[] = {{"q_proj", &q_proj}, {"k_proj", &k_proj}, {"v_proj", &v_proj}, {"o_proj", &o_proj}};
    for (auto [name, p] : ps)
      if (p->in_features() != d || p->out_features() != d)
        throw ShapeError(detail::cat("CausalSelfAttention: ", name, " maps ", p->in_features(), " -> ", p->out_features(),
                                     " features, expected ", d, " -> ", d, " (d_model of q_proj)"));
    if (d % num_heads != 0)
      throw ShapeError(detail::cat("CausalSelfAttention: d_model ", d, " is not a multiple of num_heads ", num_heads,
                                   " (head_dim would not be an integer)"));
  }

  Context make_context(Index max_batch, Index max_seq, Index max_past = 0) const {
    check_shapes();
    if (max_batch <= 0 || max_seq <= 0 || max_past < 0)
      throw ShapeError(detail::cat("CausalSelfAttention::make_context: max_batch and max_seq must be positive and max_past >= 0, got ",
                                   max_batch, ", ", max_seq, ", ", max_past));
    Context c;
    c.max_batch = max_batch;
    c.max_seq = max_seq;
    c.max_past = max_past;
    const Index rows = max_batch * max_seq, d = d_model(), hd = head_dim(), len = max_past + max_seq;
    c.q = q_proj.make_context(rows);
    c.k = k_proj.make_context(rows);
    c.v = v_proj.make_context(rows);
    c.o = o_proj.make_context(rows);
    for (Buffer* b : {&c.qb, &c.kb, &c.vb, &c.attn, &c.dattn, &c.dq, &c.dk, &c.dv}) b->resize(std::size_t(rows * d));
    c.kcat.resize(std::size_t(max_batch * num_heads * len * hd));
    c.vcat.resize(std::size_t(max_batch * num_heads * len * hd));
    c.probs.resize(std::size_t(max_batch * num_heads * max_seq * len));
    c.dprobs.resize(std::size_t(max_seq * len));
    c.dkc.resize(std::size_t(len * hd));
    c.dvc.resize(std::size_t(len * hd));
    // every product below, at every seq <= max_seq and past <= max_past (each call covers one size fully)
    for (Index s = 1; s <= max_seq; ++s) {
      c.scratch.reserve_gemm(s, len, hd);  // scores, dP
      c.scratch.reserve_gemm(s, hd, len);  // P V, dS K
    }
    for (Index l = 1; l <= len; ++l) c.scratch.reserve_gemm(l, hd, max_seq);  // dV = Pᵀ dO, dK = dSᵀ Q
    c.mask.reserve(max_batch * len);
    return c;
  }

  /// requires: x [batch · seq, d_model] (row b · seq + s), batch <= max_batch, seq <= max_seq of ctx;
  /// y [batch · seq, d_model]; `past` empty or [batch · heads · past_len, head_dim] each with
  /// past_len <= max_past; `mask` empty or batch · (past_len + seq) entries.
  /// ensures: y assigned; ctx keeps x (alive and unchanged until backward) and the attention weights.
  void forward(Context& ctx, ConstMatrixView<T> x, Index batch, Index seq, MatrixView<T> y, PastKeyValue<T> past = {},
               AttentionMask mask = {}) {
    check_forward(ctx, x, batch, seq, y, past, mask);
    const Index rows = batch * seq, d = d_model(), hd = head_dim(), H = num_heads, P = past.past_len, L = P + seq;
    auto qv = MatrixView<T>(ctx.qb.data(), rows, d), kv = MatrixView<T>(ctx.kb.data(), rows, d), vv = MatrixView<T>(ctx.vb.data(), rows, d);
    auto av = MatrixView<T>(ctx.attn.data(), rows, d);
    q_proj.forward(ctx.q, x, qv);
    k_proj.forward(ctx.k, x, kv);
    v_proj.forward(ctx.v, x, vv);
    const T scale = T(1) / std::sqrt(T(hd));
    const std::int64_t* staged_mask = mask.empty() ? nullptr : ctx.mask.stage(mask);
    for (Index b = 0; b < batch; ++b)
      for (Index h = 0; h < H; ++h) {
        const Index bh = b * H + h;
        auto kc = MatrixView<T>(ctx.kcat.data() + bh * L * hd, L, hd), vc = MatrixView<T>(ctx.vcat.data() + bh * L * hd, L, hd);
        if (P > 0) {
          Backend::copy(past.key.row_block(bh * P, P), kc.row_block(0, P));
          Backend::copy(past.value.row_block(bh * P, P), vc.row_block(0, P));
        }
        Backend::copy(ConstMatrixView<T>(impl::block_of(kv, b * seq, seq, h * hd, hd)), kc.row_block(P, seq));
        Backend::copy(ConstMatrixView<T>(impl::block_of(vv, b * seq, seq, h * hd, hd)), vc.row_block(P, seq));
        auto sc = MatrixView<T>(ctx.probs.data() + bh * seq * L, seq, L);
        Backend::template gemm<Trans::no, Trans::yes>(ctx.scratch, scale, impl::block_of(qv, b * seq, seq, h * hd, hd), kc, T(0), sc);
        K::masked_causal_softmax(sc, P, staged_mask ? staged_mask + b * L : nullptr);
        Backend::template gemm<Trans::no, Trans::no>(ctx.scratch, T(1), sc, vc, T(0), impl::block_of(av, b * seq, seq, h * hd, hd));
      }
    o_proj.forward(ctx.o, av, y);
    ctx.x = x;
    ctx.batch = batch;
    ctx.seq = seq;
    ctx.past = P;
    ctx.has_forward = true;
  }

  /// Backward of the forward recorded in ctx, with dy [batch · seq, d_model].
  /// ensures: dx ([batch · seq, d_model], or empty) written per `input`; the projections' trainable
  /// parameters (adapters, or the weights after set_requires_grad) per `params`; the past-key/value
  /// gradients (when the forward had a past and dpast's views are non-empty) per dpast.mode.
  void backward(Context& ctx, ConstMatrixView<T> dy, MatrixView<T> dx, PastKeyValueGrad<T> dpast = {},
                GradMode params = GradMode::accumulate, GradMode input = GradMode::overwrite) {
    if (!ctx.has_forward) throw StateError("CausalSelfAttention.backward: the context holds no forward pass");
    const Index batch = ctx.batch, seq = ctx.seq, rows = batch * seq, d = d_model(), hd = head_dim(), H = num_heads, P = ctx.past,
                L = P + seq;
    require_shape(dy, rows, d, "CausalSelfAttention.backward: dy");
    if (!dx.empty()) require_shape(dx, rows, d, "CausalSelfAttention.backward: dx");
    for (auto [g, name] : {std::pair{dpast.key, "key"}, std::pair{dpast.value, "value"}}) {
      if (g.empty()) continue;
      if (P == 0)
        throw ShapeError(detail::cat("CausalSelfAttention.backward: a past ", name, " gradient was given but the forward had no past keys/values"));
      if (g.rows != batch * H * P || g.cols != hd)
        throw ShapeError(detail::cat("CausalSelfAttention.backward: past ", name, " gradient: expected [batch * heads * past_len, head_dim] = [",
                                     batch * H * P, ", ", hd, "], got [", g.rows, ", ", g.cols, "]"));
    }
    const T past_beta = dpast.mode == GradMode::accumulate ? T(1) : T(0);
    auto qv = MatrixView<T>(ctx.qb.data(), rows, d);
    auto dav = MatrixView<T>(ctx.dattn.data(), rows, d);
    auto dqv = MatrixView<T>(ctx.dq.data(), rows, d), dkv = MatrixView<T>(ctx.dk.data(), rows, d), dvv = MatrixView<T>(ctx.dv.data(), rows, d);
    o_proj.backward(ctx.o, dy, dav, params, GradMode::overwrite);
    const T scale = T(1) / std::sqrt(T(hd));
    for (Index b = 0; b < batch; ++b)
      for (Index h = 0; h < H; ++h) {
        const Index bh = b * H + h;
        auto kc = MatrixView<T>(ctx.kcat.data() + bh * L * hd, L, hd), vc = MatrixView<T>(ctx.vcat.data() + bh * L * hd, L, hd);
        auto p = MatrixView<T>(ctx.probs.data() + bh * seq * L, seq, L);
        auto dp = MatrixView<T>(ctx.dprobs.data(), seq, L);
        auto dkc = MatrixView<T>(ctx.dkc.data(), L, hd), dvc = MatrixView<T>(ctx.dvc.data(), L, hd);
        const auto dO = ConstMatrixView<T>(impl::block_of(dav, b * seq, seq, h * hd, hd));
        Backend::template gemm<Trans::no, Trans::yes>(ctx.scratch, T(1), dO, vc, T(0), dp);  // dP = dO Vᵀ
        Backend::template gemm<Trans::yes, Trans::no>(ctx.scratch, T(1), p, dO, T(0), dvc);  // dV = Pᵀ dO
        K::softmax_backward(ConstMatrixView<T>(p), dp, scale);                              // dS (scaled)
        Backend::template gemm<Trans::no, Trans::no>(ctx.scratch, T(1), dp, kc, T(0), impl::block_of(dqv, b * seq, seq, h * hd, hd));
        Backend::template gemm<Trans::yes, Trans::no>(ctx.scratch, T(1), dp, impl::block_of(qv, b * seq, seq, h * hd, hd), T(0), dkc);
        if (P > 0) {
          if (!dpast.key.empty()) Backend::axpby(T(1), dkc.row_block(0, P), past_beta, dpast.key.row_block(bh * P, P));
          if (!dpast.value.empty()) Backend::axpby(T(1), dvc.row_block(0, P), past_beta, dpast.value.row_block(bh * P, P));
        }
        Backend::copy(ConstMatrixView<T>(dkc.row_block(P, seq)), impl::block_of(dkv, b * seq, seq, h * hd, hd));
        Backend::copy(ConstMatrixView<T>(dvc.row_block(P, seq)), impl::block_of(dvv, b * seq, seq, h * hd, hd));
      }
    q_proj.backward(ctx.q, dqv, dx, params, input);
    k_proj.backward(ctx.k, dkv, dx, params, dx.empty() ? input : GradMode::accumulate);
    v_proj.backward(ctx.v, dvv, dx, params, dx.empty() ? input : GradMode::accumulate);
  }

  /// The attention weights of the last forward for batch row b and head h: [seq, past_len + seq].
  ConstMatrixView<T> attention_weights(const Context& ctx, Index b, Index h) const {
    const Index L = ctx.past + ctx.seq;
    return ConstMatrixView<T>(ctx.probs.data() + (b * num_heads + h) * ctx.seq * L, ctx.seq, L);
  }

 private:
  void check_forward(const Context& ctx, ConstMatrixView<T> x, Index batch, Index seq, ConstMatrixView<T> y, const PastKeyValue<T>& past,
                     AttentionMask mask) const {
    if (ctx.max_batch == 0) throw StateError("CausalSelfAttention.forward: the context was not made by make_context");
    if (batch <= 0 || seq <= 0) throw ShapeError(detail::cat("CausalSelfAttention.forward: batch and seq must be positive, got ", batch, " and ", seq));
    if (batch > ctx.max_batch)
      throw ShapeError(detail::cat("CausalSelfAttention.forward: batch ", batch, " exceeds the context's max_batch ", ctx.max_batch));
    if (seq > ctx.max_seq)
      throw ShapeError(detail::cat("CausalSelfAttention.forward: sequence length ", seq, " exceeds the context's max_seq ", ctx.max_seq,
                                   "; make the context with a larger max_seq"));
    require_shape(x, batch * seq, d_model(), "CausalSelfAttention.forward: x [batch * seq, d_model]");
    require_shape(y, batch * seq, d_model(), "CausalSelfAttention.forward: y [batch * seq, d_model]");
    if (overlaps(x, y)) throw ShapeError("CausalSelfAttention.forward: y overlaps x");
    const Index P = past.past_len, hd = head_dim();
    if (P < 0) throw ShapeError(detail::cat("CausalSelfAttention.forward: past_len must be >= 0, got ", P));
    if (P > ctx.max_past)
      throw ShapeError(detail::cat("CausalSelfAttention.forward: past_len ", P, " exceeds the context's max_past ", ctx.max_past,
                                   "; make the context with a larger max_past"));
    if (P > 0)
      for (auto [v, name] : {std::pair{past.key, "key"}, std::pair{past.value, "value"}}) {
        if (v.cols != hd)
          throw ShapeError(detail::cat("CausalSelfAttention.forward: past ", name, " has head_dim ", v.cols, ", the attention has ", num_heads,
                                       " heads of head_dim ", hd, " (d_model ", d_model(), ")"));
        if (v.rows != batch * num_heads * P)
          throw ShapeError(detail::cat("CausalSelfAttention.forward: past ", name, ": expected [batch * heads * past_len, head_dim] = [", batch,
                                       " * ", num_heads, " * ", P, ", ", hd, "] = [", batch * num_heads * P, ", ", hd, "], got [", v.rows, ", ",
                                       v.cols, "]"));
      }
    else if (!past.key.empty() || !past.value.empty())
      throw ShapeError("CausalSelfAttention.forward: past key/value views are given with past_len 0");
    if (!mask.empty() && Index(mask.size()) != batch * (P + seq))
      throw ShapeError(detail::cat("CausalSelfAttention.forward: attention_mask has ", mask.size(), " entries, expected batch * (past_len + seq) = ",
                                   batch, " * ", P + seq, " = ", batch * (P + seq)));
  }
};

/// An attention block with PyTorch-initialised projections (bias on all four, as GPT-2). Adapted
/// projections get the module paths "<path>.q_proj", ... (what LoRA's target patterns match).
template <class Proj>
CausalSelfAttention<Proj> make_causal_self_attention(Index d_model, Index num_heads, Generator& gen, const std::string& path = {},
                                                     bool bias = true) {
  if (num_heads <= 0 || d_model <= 0 || d_model % num_heads != 0)
    throw ShapeError(detail::cat("make_causal_self_attention: d_model ", d_model, " must be a positive multiple of num_heads ", num_heads));
  CausalSelfAttention<Proj> a{impl::make_projection<Proj>(d_model, d_model, bias, gen, impl::join_path(path, "q_proj")),
                              impl::make_projection<Proj>(d_model, d_model, bias, gen, impl::join_path(path, "k_proj")),
                              impl::make_projection<Proj>(d_model, d_model, bias, gen, impl::join_path(path, "v_proj")),
                              impl::make_projection<Proj>(d_model, d_model, bias, gen, impl::join_path(path, "o_proj")), num_heads};
  return a;
}

}  // namespace peft::nn
