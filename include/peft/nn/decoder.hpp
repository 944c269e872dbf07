// peft++ — a decoder-only language model (GPT-2-like, pre-LN): token embedding + learned positional
// embedding, N DecoderBlocks, a final LayerNorm and an LM head. Forward takes token ids or input embeddings
// directly (`inputs_embeds`, for prompt tuning), per-layer past keys/values (for prefix tuning) and an
// attention mask; backward reaches every trainable parameter, the input embeddings and the past keys/values.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/layer/embedding.hpp"
#include "peft/layer/linear.hpp"
#include "peft/nn/block.hpp"

namespace peft::nn {

/// The model's sizes, with the names PEFT reads from a transformers config in brackets.
struct DecoderConfig {
  Index vocab_size = 0;               ///< token embedding rows and LM-head outputs
  Index max_position_embeddings = 0;  ///< learned positions (n_positions)
  Index d_model = 0;                  ///< hidden size (token_dim: hidden_size | n_embd | d_model)
  Index num_layers = 0;               ///< blocks (num_layers: num_hidden_layers | n_layer)
  Index num_heads = 0;                ///< attention heads (num_attention_heads | n_head)
  Index d_ff = 0;                     ///< MLP width; 0 means 4 · d_model
  GeluApproximate activation = GeluApproximate::tanh;  ///< GPT-2's gelu_new
  double layer_norm_eps = 1e-5;
  double initializer_range = 0.02;    ///< GPT-2's init: N(0, 0.02) weights and embeddings, zero biases

  Index ff() const noexcept { return d_ff > 0 ? d_ff : 4 * d_model; }
  Index head_dim() const noexcept { return num_heads > 0 ? d_model / num_heads : 0; }
  void validate() const {
    if (vocab_size <= 0 || max_position_embeddings <= 0 || d_model <= 0 || num_layers <= 0 || num_heads <= 0 || d_ff < 0)
      throw ConfigError(detail::cat("DecoderConfig: vocab_size (", vocab_size, "), max_position_embeddings (", max_position_embeddings,
                                    "), d_model (", d_model, "), num_layers (", num_layers, ") and num_heads (", num_heads,
                                    ") must be positive and d_ff (", d_ff, ") >= 0"));
    if (d_model % num_heads != 0)
      throw ConfigError(detail::cat("DecoderConfig: d_model ", d_model, " is not a multiple of num_heads ", num_heads));
    if (!(layer_norm_eps > 0)) throw ConfigError(detail::cat("DecoderConfig: layer_norm_eps must be positive, got ", layer_norm_eps));
  }
};

/// What one forward pass reads. Either `input_ids` (batch · seq ids, row-major [batch, seq]) or
/// `inputs_embeds` ([batch · seq, d_model], used instead of the token embedding: prompt tuning prepends
/// its virtual tokens here) must be given, not both. `past_key_values` is empty or has one entry per layer,
/// all with the same past_len. `attention_mask` is empty or [batch, past_len + seq] (1 = attend). Positions
/// are position_offset + s for token s; by default position_offset = past_len, as transformers counts
/// positions after a key/value cache (so a prefix shifts the positions of the real tokens).
template <class T>
struct DecoderInput {
  Index batch = 0;
  Index seq = 0;
  TokenIds input_ids = {};
  ConstMatrixView<T> inputs_embeds = {};
  std::span<const PastKeyValue<T>> past_key_values = {};
  AttentionMask attention_mask = {};
  std::optional<Index> position_offset = {};
};

/// Where backward writes input gradients: `inputs_embeds` (the gradient w.r.t. the embeddings fed to the
/// first block, minus positions — with input_ids, the gradient w.r.t. the looked-up token embeddings),
/// written per backward's `input` mode; `past_key_values`: empty or one entry per layer, each with its
/// own mode. Empty views skip.
template <class T>
struct DecoderGrad {
  MatrixView<T> inputs_embeds = {};
  std::span<const PastKeyValueGrad<T>> past_key_values = {};
};

/// The decoder-only LM. An aggregate walked by the model helpers: parameter names are PyTorch-like,
/// "wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.attn.q_proj.weight",
/// "h.0.attn.q_proj.lora_A.default.weight", "h.1.mlp.fc_out.bias", "ln_f.weight", "lm_head.weight".
/// Make one with `make_decoder`. The whole model is frozen until set_requires_grad / adapters say otherwise.
template <class T, class AttnProj = Linear<T>, class MlpProj = Linear<T>>
struct Decoder {
  using scalar = T;
  using backend_type = typename AttnProj::backend_type;
  using Backend = backend_type;
  using Buffer = typename Backend::template buffer<T>;
  using Block = DecoderBlock<AttnProj, MlpProj>;
  static_assert(std::is_same_v<typename AttnProj::scalar, T> && std::is_same_v<typename MlpProj::scalar, T>,
                "Decoder: the projection types must have the model's scalar type");
  static constexpr std::array<std::string_view, 6> field_names{"wte", "wpe", "h", "ln_f", "lm_head", "config"};

  Embedding<T, Backend> wte;
  Embedding<T, Backend> wpe;
  std::vector<Block> h;
  LayerNorm<T, Backend> ln_f;
  Linear<T, Backend> lm_head;
  DecoderConfig config;

  struct Context {
    typename Embedding<T, Backend>::Context wte, wpe;
    std::vector<typename Block::Context> blocks;
    typename LayerNorm<T, Backend>::Context ln_f;
    typename Linear<T, Backend>::Context lm_head;
    Index max_batch = 0, max_seq = 0, max_past = 0;
    Index batch = 0, seq = 0, past = 0;
    bool used_ids = false, has_forward = false;
    HostBuffer<std::int64_t> pos_ids;  // [max_batch · max_seq]
    Buffer pos;                        // [max_batch · max_seq, d_model]
    std::vector<Buffer> hidden;        // num_layers + 1 of [max_batch · max_seq, d_model]: the input of each block, then the last output
    Buffer final_hidden, g0, g1;       // [max_batch · max_seq, d_model]
  };

  Index num_layers() const noexcept { return Index(h.size()); }
  Index d_model() const noexcept { return config.d_model; }

  /// A context for batches of up to max_batch sequences of up to max_seq tokens with up to max_past past
  /// positions per layer. Forward and backward allocate nothing after this; adding adapters to the
  /// projections invalidates it.
  Context make_context(Index max_batch, Index max_seq, Index max_past = 0) const {
    config.validate();
    if (max_batch <= 0 || max_seq <= 0 || max_past < 0)
      throw ShapeError(detail::cat("Decoder::make_context: max_batch and max_seq must be positive and max_past >= 0, got ", max_batch, ", ",
                                   max_seq, ", ", max_past));
    if (max_seq > config.max_position_embeddings)
      throw ShapeError(detail::cat("Decoder::make_context: max_seq ", max_seq, " exceeds max_position_embeddings ", config.max_position_embeddings));
    Context c;
    c.max_batch = max_batch;
    c.max_seq = max_seq;
    c.max_past = max_past;
    const Index rows = max_batch * max_seq, d = d_model();
    c.wte = wte.make_context(rows);
    c.wpe = wpe.make_context(rows);
    for (const auto& b : h) c.blocks.push_back(b.make_context(max_batch, max_seq, max_past));
    c.ln_f = ln_f.make_context(rows);
    c.lm_head = lm_head.make_context(rows);
    c.pos_ids.resize(std::size_t(rows));
    c.pos.resize(std::size_t(rows * d));
    c.hidden.resize(h.size() + 1);
    for (auto& b : c.hidden) b.resize(std::size_t(rows * d));
    for (Buffer* b : {&c.final_hidden, &c.g0, &c.g1}) b->resize(std::size_t(rows * d));
    return c;
  }

  /// requires: `in` as DecoderInput describes, batch <= max_batch, seq <= max_seq, past_len <= max_past of
  /// ctx, position_offset + seq <= max_position_embeddings; logits [batch · seq, vocab_size].
  /// ensures: logits assigned (row b · seq + s); ctx keeps what backward needs. input_ids must stay alive
  /// until backward (the token-embedding gradient scatters by them); inputs_embeds, the past keys/values and
  /// the mask are consumed by forward (copied into the context) and may change afterwards.
  void forward(Context& ctx, const DecoderInput<T>& in, MatrixView<T> logits) {
    check_input(ctx, in);
    const Index rows = in.batch * in.seq, d = d_model(), seq = in.seq;
    const Index past = in.past_key_values.empty() ? 0 : in.past_key_values[0].past_len;
    const Index offset = in.position_offset.value_or(past);
    require_shape(logits, rows, config.vocab_size, "Decoder.forward: logits [batch * seq, vocab_size]");
    auto x0 = MatrixView<T>(ctx.hidden[0].data(), rows, d);
    if (!in.input_ids.empty()) wte.forward(ctx.wte, in.input_ids, x0);
    else Backend::copy(in.inputs_embeds, x0);
    for (Index i = 0; i < rows; ++i) ctx.pos_ids[std::size_t(i)] = offset + i % seq;
    auto pos = MatrixView<T>(ctx.pos.data(), rows, d);
    wpe.forward(ctx.wpe, TokenIds(ctx.pos_ids.data(), std::size_t(rows)), pos);
    Backend::axpby(T(1), ConstMatrixView<T>(pos), T(1), x0);
    for (std::size_t l = 0; l < h.size(); ++l) {
      const PastKeyValue<T> pkv = in.past_key_values.empty() ? PastKeyValue<T>{} : in.past_key_values[l];
      h[l].forward(ctx.blocks[l], ConstMatrixView<T>(ctx.hidden[l].data(), rows, d), in.batch, seq,
                   MatrixView<T>(ctx.hidden[l + 1].data(), rows, d), pkv, in.attention_mask);
    }
    auto fin = MatrixView<T>(ctx.final_hidden.data(), rows, d);
    ln_f.forward(ctx.ln_f, ConstMatrixView<T>(ctx.hidden[h.size()].data(), rows, d), fin);
    lm_head.forward(ctx.lm_head, fin, logits);
    ctx.batch = in.batch;
    ctx.seq = seq;
    ctx.past = past;
    ctx.used_ids = !in.input_ids.empty();
    ctx.has_forward = true;
  }

  /// Backward of the forward recorded in ctx, from dlogits [batch · seq, vocab_size].
  /// ensures: trainable parameters (adapters; base weights after set_requires_grad) per `params`;
  /// grad.inputs_embeds per `input`; each past-key/value gradient per its own mode. With inputs_embeds, a
  /// trainable token embedding gets no gradient (zeroed in overwrite mode).
  void backward(Context& ctx, ConstMatrixView<T> dlogits, const DecoderGrad<T>& grad = {}, GradMode params = GradMode::accumulate,
                GradMode input = GradMode::overwrite) {
    if (!ctx.has_forward) throw StateError("Decoder.backward: the context holds no forward pass");
    const Index rows = ctx.batch * ctx.seq, d = d_model();
    require_shape(dlogits, rows, config.vocab_size, "Decoder.backward: dlogits [batch * seq, vocab_size]");
    if (!grad.inputs_embeds.empty()) require_shape(grad.inputs_embeds, rows, d, "Decoder.backward: inputs_embeds gradient [batch * seq, d_model]");
    if (!grad.past_key_values.empty() && grad.past_key_values.size() != h.size())
      throw ShapeError(detail::cat("Decoder.backward: ", grad.past_key_values.size(), " past key/value gradients, expected one per layer (",
                                   h.size(), ")"));
    auto g = MatrixView<T>(ctx.g0.data(), rows, d), gn = MatrixView<T>(ctx.g1.data(), rows, d);
    lm_head.backward(ctx.lm_head, dlogits, gn, params, GradMode::overwrite);  // gn: d final hidden
    ln_f.backward(ctx.ln_f, gn, g, params, GradMode::overwrite);
    for (std::size_t l = h.size(); l-- > 0;) {
      const PastKeyValueGrad<T> pg = grad.past_key_values.empty() ? PastKeyValueGrad<T>{} : grad.past_key_values[l];
      h[l].backward(ctx.blocks[l], g, gn, pg, params, GradMode::overwrite);
      std::swap(g, gn);
    }
    if (!grad.inputs_embeds.empty()) Backend::axpby(T(1), ConstMatrixView<T>(g), input == GradMode::accumulate ? T(1) : T(0), grad.inputs_embeds);
    if (ctx.used_ids) wte.backward(ctx.wte, g, {}, params);
    else if (wte.requires_grad() && params == GradMode::overwrite) Backend::scale(wte.weight_grad(), T(0));
    wpe.backward(ctx.wpe, g, {}, params);
  }

 private:
  void check_input(const Context& ctx, const DecoderInput<T>& in) const {
    if (ctx.max_batch == 0) throw StateError("Decoder.forward: the context was not made by make_context");
    if (ctx.blocks.size() != h.size()) throw StateError("Decoder.forward: the context was made for a model with a different number of layers");
    if (in.batch <= 0 || in.seq <= 0) throw ShapeError(detail::cat("Decoder.forward: batch and seq must be positive, got ", in.batch, " and ", in.seq));
    if (in.batch > ctx.max_batch)
      throw ShapeError(detail::cat("Decoder.forward: batch ", in.batch, " exceeds the context's max_batch ", ctx.max_batch));
    if (in.seq > ctx.max_seq)
      throw ShapeError(detail::cat("Decoder.forward: sequence length ", in.seq, " exceeds the context's max_seq ", ctx.max_seq,
                                   "; make the context with a larger max_seq"));
    const Index rows = in.batch * in.seq;
    if (in.input_ids.empty() == in.inputs_embeds.empty())
      throw ShapeError("Decoder.forward: give exactly one of input_ids and inputs_embeds");
    if (!in.input_ids.empty() && Index(in.input_ids.size()) != rows)
      throw ShapeError(detail::cat("Decoder.forward: input_ids has ", in.input_ids.size(), " ids, expected batch * seq = ", rows));
    if (!in.inputs_embeds.empty()) require_shape(in.inputs_embeds, rows, d_model(), "Decoder.forward: inputs_embeds [batch * seq, d_model]");
    Index past = 0;
    if (!in.past_key_values.empty()) {
      if (in.past_key_values.size() != h.size())
        throw ShapeError(detail::cat("Decoder.forward: ", in.past_key_values.size(), " past key/value entries, expected one per layer (", h.size(), ")"));
      past = in.past_key_values[0].past_len;
      for (std::size_t l = 1; l < h.size(); ++l)
        if (in.past_key_values[l].past_len != past)
          throw ShapeError(detail::cat("Decoder.forward: layer ", l, " has past_len ", in.past_key_values[l].past_len, ", layer 0 has ", past,
                                       "; every layer must have the same past length"));
    }
    const Index offset = in.position_offset.value_or(past);
    if (offset < 0 || offset + in.seq > config.max_position_embeddings)
      throw ShapeError(detail::cat("Decoder.forward: positions ", offset, " .. ", offset + in.seq - 1, " exceed max_position_embeddings ",
                                   config.max_position_embeddings, " (position_offset ", offset, ", seq ", in.seq, ")"));
  }
};

/// A decoder with GPT-2's initialisation (weights and embeddings N(0, initializer_range), biases zero,
/// LayerNorms ones and zeros) and an untied LM head (d_model → vocab_size, no bias). Adapted projections
/// get module paths "h.<i>.attn.q_proj", "h.<i>.mlp.fc_in", ... (the names LoRA's target patterns match).
template <class T, class AttnProj = Linear<T>, class MlpProj = Linear<T>>
Decoder<T, AttnProj, MlpProj> make_decoder(const DecoderConfig& cfg, Generator& gen) {
  cfg.validate();
  using B = typename AttnProj::backend_type;
  Decoder<T, AttnProj, MlpProj> m{Embedding<T, B>(cfg.vocab_size, cfg.d_model, gen), Embedding<T, B>(cfg.max_position_embeddings, cfg.d_model, gen),
                                  {}, LayerNorm<T, B>(cfg.d_model, cfg.layer_norm_eps), Linear<T, B>(cfg.d_model, cfg.vocab_size, false, gen), cfg};
  for (Index l = 0; l < cfg.num_layers; ++l)
    m.h.push_back(make_decoder_block<AttnProj, MlpProj>(cfg.d_model, cfg.num_heads, cfg.ff(), gen, cfg.activation, cfg.layer_norm_eps,
                                                        "h." + std::to_string(l)));
  // GPT-2's init on top of the default-constructed layers
  const double sd = cfg.initializer_range;
  auto init = [&](auto& layer) {
    layer.visit_parameters([&](ParamRef<T> p) {  // (pointers of the backend's memory: filled by its operations)
      const auto v = MatrixView<T>(p.value, 1, Index(p.size));
      if (p.name == "weight") B::random_normal(gen, v, 0.0, sd);
      else if (p.name == "bias") B::fill(v, T(0));
    });
  };
  init(m.wte);
  init(m.wpe);
  init(m.lm_head);
  auto base_of = [](auto& proj) -> auto& {
    if constexpr (requires { proj.base(); }) return proj.base();
    else return proj;
  };
  for (auto& b : m.h)
    for (auto* p : {&b.attn.q_proj, &b.attn.k_proj, &b.attn.v_proj, &b.attn.o_proj}) init(base_of(*p));
  for (auto& b : m.h)
    for (auto* p : {&b.mlp.fc_in, &b.mlp.fc_out}) init(base_of(*p));
  return m;
}

}  // namespace peft::nn
