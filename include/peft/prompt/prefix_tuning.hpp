// peft++ — Prefix Tuning (Li & Liang, 2021) with Hugging Face PEFT's semantics (PrefixTuningConfig,
// tuners/prefix_tuning's PrefixEncoder, PeftModel.get_prompt for CAUSAL_LM): a learned prefix of
// num_virtual_tokens key/value pairs for every attention layer of a frozen decoder, fed as past keys/values,
// with the attention mask grown by num_virtual_tokens ones.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "peft/backend/eigen_cpu.hpp"
#include "peft/errors.hpp"
#include "peft/grad_mode.hpp"
#include "peft/layer/linear.hpp"
#include "peft/nn/attention.hpp"
#include "peft/nn/decoder.hpp"
#include "peft/param.hpp"
#include "peft/rng.hpp"
#include "peft/view.hpp"

namespace peft {

/// PEFT's PrefixTuningConfig. token_dim, num_layers and num_attention_heads are what PEFT reads from the
/// model's config (hidden_size, num_hidden_layers, num_attention_heads): 0 here means "take it from the
/// decoder" (`fill_from`). encoder_hidden_size 0 means token_dim (PEFT's default).
struct PrefixTuningConfig {
  Index num_virtual_tokens = 0;   ///< required
  Index token_dim = 0;            ///< the model's hidden size
  Index num_layers = 0;           ///< attention layers receiving a prefix
  Index num_attention_heads = 0;  ///< heads per layer
  bool prefix_projection = false; ///< embedding → Linear → tanh → Linear
  Index encoder_hidden_size = 0;  ///< the projection's hidden width; 0: token_dim
  bool init_weights_zero = false; ///< PEFT's init_weights="zero": the table (or the last Linear) starts at zero
  bool inference_mode = false;    ///< PEFT: the table is the final [nvt, num_layers·2·token_dim] prefix, frozen, no projection

  Index prefix_dim() const noexcept { return num_layers * 2 * token_dim; }
  Index head_dim() const noexcept { return num_attention_heads > 0 ? token_dim / num_attention_heads : 0; }
  Index hidden() const noexcept { return encoder_hidden_size > 0 ? encoder_hidden_size : token_dim; }
  bool projects() const noexcept { return prefix_projection && !inference_mode; }

  /// Fills the fields left at 0 from the decoder's config, as PEFT's _prepare_prompt_learning_config does.
  PrefixTuningConfig& fill_from(const nn::DecoderConfig& m) {
    if (token_dim == 0) token_dim = m.d_model;
    if (num_layers == 0) num_layers = m.num_layers;
    if (num_attention_heads == 0) num_attention_heads = m.num_heads;
    return *this;
  }
  void validate() const {
    if (num_virtual_tokens <= 0)
      throw ConfigError(detail::cat("PrefixTuningConfig: num_virtual_tokens must be positive, got ", num_virtual_tokens));
    if (token_dim <= 0 || num_layers <= 0 || num_attention_heads <= 0)
      throw ConfigError(detail::cat("PrefixTuningConfig: token_dim (", token_dim, "), num_layers (", num_layers, ") and num_attention_heads (",
                                    num_attention_heads, ") must be positive (fill_from(decoder config) takes them from the model)"));
    if (token_dim % num_attention_heads != 0)
      throw ConfigError(detail::cat("PrefixTuningConfig: token_dim ", token_dim, " is not a multiple of num_attention_heads ", num_attention_heads));
    if (encoder_hidden_size < 0) throw ConfigError(detail::cat("PrefixTuningConfig: encoder_hidden_size must be >= 0, got ", encoder_hidden_size));
  }
  /// Throws ShapeError unless the prefix fits the decoder: one key/value pair per layer, the same heads and
  /// head_dim as its attention.
  void check_matches(const nn::DecoderConfig& m) const {
    if (num_layers != m.num_layers)
      throw ShapeError(detail::cat("PrefixTuningConfig: the prefix has num_layers ", num_layers, ", the decoder has ", m.num_layers, " layers"));
    if (num_attention_heads != m.num_heads || token_dim != m.d_model)
      throw ShapeError(detail::cat("PrefixTuningConfig: the prefix has ", num_attention_heads, " heads of head_dim ", head_dim(), " (token_dim ",
                                   token_dim, "), the decoder's attention has ", m.num_heads, " heads of head_dim ", m.head_dim(), " (d_model ",
                                   m.d_model, ")"));
  }
};

/// PEFT's PrefixEncoder and get_prompt: per virtual token t a vector of num_layers·2·token_dim numbers in
/// the order [layer][key|value][head][head_dim], either a trainable table row (`embedding.weight`
/// [nvt, num_layers·2·token_dim]) or, with prefix_projection, transform(embedding) with
/// `embedding.weight` [nvt, token_dim], `transform.0` Linear(token_dim, hidden), tanh, `transform.2`
/// Linear(hidden, num_layers·2·token_dim). Forward lays the prefix out as the decoder's per-layer past
/// keys/values for a batch (every batch row the same); backward takes the decoder's past-key/value gradients
/// (written into the context) back into the encoder's parameters.
template <class T, class Backend = EigenCpu>
class PrefixEncoder {
 public:
  using scalar = T;
  using backend_type = Backend;
  using Buffer = typename Backend::template buffer<T>;

  struct Context {
    Index max_batch = 0;
    Index batch = 0;
    bool has_forward = false;
    Buffer prefix;                 // [nvt, prefix_dim]: the encoder's output (one batch row)
    Buffer hid, act;               // [nvt, hidden]: transform.0 output and tanh of it
    Buffer dprefix, dact;          // gradients of the same
    Buffer keys, values;           // per layer [max_batch · heads · nvt, head_dim], layer-major
    Buffer dkeys, dvalues;         // the decoder writes the gradients here
    typename Linear<T, Backend>::Context t0, t2;
    std::vector<nn::PastKeyValue<T>> past;
    std::vector<nn::PastKeyValueGrad<T>> dpast;
  };

  PrefixEncoder() = default;

  /// requires: config valid (fill_from the decoder's config first). ensures: PEFT's init: the table N(0, 1)
  /// (torch.nn.Embedding), the projection's Linears PyTorch's default (uniform ±1/√fan_in); with
  /// init_weights_zero the table (no projection) or the last Linear is zero. Trainable unless inference_mode.
  PrefixEncoder(const PrefixTuningConfig& config, Generator& gen) : config_(config) {
    config.validate();
    const Index nvt = config.num_virtual_tokens;
    const Index width = config.projects() ? config.token_dim : config.prefix_dim();
    weight_.resize(std::size_t(nvt * width));
    Backend::random_normal(gen, flat(weight_), 0.0, 1.0);
    if (config.projects()) {
      t0_ = Linear<T, Backend>(config.token_dim, config.hidden(), true, gen);
      t2_ = Linear<T, Backend>(config.hidden(), config.prefix_dim(), true, gen);
      if (config.init_weights_zero) {
        Backend::fill(t2_.weight(), T(0));
        Backend::fill(t2_.bias(), T(0));
      }
    } else if (config.init_weights_zero) {
      weight_.zero();
    }
    set_requires_grad(!config.inference_mode);
  }

  /// The same, with the zero fields of `config` taken from the decoder's config and the result checked
  /// against it (ShapeError when the prefix does not fit the model's layers or heads).
  PrefixEncoder(PrefixTuningConfig config, const nn::DecoderConfig& model, Generator& gen) : PrefixEncoder(config.fill_from(model), gen) {
    config_.check_matches(model);
  }

  const PrefixTuningConfig& config() const noexcept { return config_; }
  Index num_virtual_tokens() const noexcept { return config_.num_virtual_tokens; }
  Index prefix_dim() const noexcept { return config_.prefix_dim(); }
  /// `embedding.weight`: [nvt, prefix_dim] (no projection) or [nvt, token_dim] (projection).
  MatrixView<T> weight() { return weight_.view(num_virtual_tokens(), table_width()); }
  ConstMatrixView<T> weight() const { return weight_.view(num_virtual_tokens(), table_width()); }
  MatrixView<T> weight_grad() { return requires_grad_ ? grad_.view(num_virtual_tokens(), table_width()) : MatrixView<T>{}; }
  /// transform.0 and transform.2 (only with prefix_projection).
  Linear<T, Backend>& transform0() { return t0_; }
  Linear<T, Backend>& transform2() { return t2_; }

  void set_requires_grad(bool on) {
    requires_grad_ = on;
    if (on) grad_.resize(weight_.size());
    else grad_ = {};
    if (config_.projects()) {
      t0_.set_requires_grad(on);
      t2_.set_requires_grad(on);
    }
  }
  bool requires_grad() const noexcept { return requires_grad_; }

  Context make_context(Index max_batch) const {
    if (max_batch <= 0) throw ShapeError(detail::cat("PrefixEncoder::make_context: max_batch must be positive, got ", max_batch));
    Context c;
    c.max_batch = max_batch;
    const Index nvt = num_virtual_tokens(), P = prefix_dim(), L = config_.num_layers;
    c.prefix.resize(std::size_t(nvt * P));
    c.dprefix.resize(std::size_t(nvt * P));
    if (config_.projects()) {
      for (Buffer* b : {&c.hid, &c.act, &c.dact}) b->resize(std::size_t(nvt * config_.hidden()));
      c.t0 = t0_.make_context(nvt);
      c.t2 = t2_.make_context(nvt);
    }
    const std::size_t per = std::size_t(max_batch * config_.token_dim * nvt);  // heads · head_dim = token_dim
    for (Buffer* b : {&c.keys, &c.values, &c.dkeys, &c.dvalues}) b->resize(per * std::size_t(L));
    c.past.resize(std::size_t(L));
    c.dpast.resize(std::size_t(L));
    return c;
  }

  /// The prefix for one row ([nvt, prefix_dim], PEFT's encoder output before the batch layout): the table, or
  /// transform(table). requires: out [nvt, prefix_dim].
  void encode(Context& ctx, MatrixView<T> out) const {
    require_shape(out, num_virtual_tokens(), prefix_dim(), "PrefixEncoder.encode: out [num_virtual_tokens, num_layers * 2 * token_dim]");
    if (!config_.projects()) {
      Backend::copy(weight(), out);
      return;
    }
    const Index nvt = num_virtual_tokens(), H = config_.hidden();
    auto hid = MatrixView<T>(ctx.hid.data(), nvt, H), act = MatrixView<T>(ctx.act.data(), nvt, H);
    t0_.forward(ctx.t0, weight(), hid);
    Backend::tanh_forward(ConstMatrixView<T>(hid), act);
    t2_.forward(ctx.t2, act, out);
  }

  /// Computes the prefix and lays it out for `batch` rows as the decoder's past keys/values
  /// (`past_key_values(ctx)`, one per layer, past_len = nvt): element e of head h of layer l's key at virtual
  /// token t of batch row b is prefix[t][((2l) · heads + h) · head_dim + e] (value: 2l + 1), as PEFT's
  /// get_prompt reshapes to (batch, nvt, 2L, heads, head_dim) and permutes to (2L, batch, heads, nvt, head_dim).
  void forward(Context& ctx, Index batch) const {
    if (ctx.max_batch == 0) throw StateError("PrefixEncoder.forward: the context was not made by make_context");
    if (batch <= 0 || batch > ctx.max_batch)
      throw ShapeError(detail::cat("PrefixEncoder.forward: batch ", batch, " must be positive and at most the context's max_batch ", ctx.max_batch));
    const Index nvt = num_virtual_tokens(), P = prefix_dim(), L = config_.num_layers, NH = config_.num_attention_heads, hd = config_.head_dim();
    auto pre = MatrixView<T>(ctx.prefix.data(), nvt, P);
    encode(ctx, pre);
    const Index rows = batch * NH * nvt, per = ctx.max_batch * NH * nvt * hd;
    for (Index l = 0; l < L; ++l) {
      auto k = MatrixView<T>(ctx.keys.data() + l * per, rows, hd), v = MatrixView<T>(ctx.values.data() + l * per, rows, hd);
      for (Index b = 0; b < batch; ++b)
        for (Index h = 0; h < NH; ++h) {  // rows [(b·NH + h)·nvt, +nvt) of k / v: head h's columns of the prefix
          const Index r = (b * NH + h) * nvt;
          Backend::copy(ConstMatrixView<T>(pre.col_block(((2 * l) * NH + h) * hd, hd)), k.row_block(r, nvt));
          Backend::copy(ConstMatrixView<T>(pre.col_block(((2 * l + 1) * NH + h) * hd, hd)), v.row_block(r, nvt));
        }
      ctx.past[std::size_t(l)] = nn::PastKeyValue<T>{k, v, nvt};
      ctx.dpast[std::size_t(l)] = nn::PastKeyValueGrad<T>{MatrixView<T>(ctx.dkeys.data() + l * per, rows, hd),
                                                          MatrixView<T>(ctx.dvalues.data() + l * per, rows, hd), GradMode::overwrite};
    }
    ctx.batch = batch;
    ctx.has_forward = true;
  }

  /// The decoder's `past_key_values` of the last forward (one per layer).
  std::span<const nn::PastKeyValue<T>> past_key_values(const Context& ctx) const {
    if (!ctx.has_forward) throw StateError("PrefixEncoder.past_key_values: the context holds no forward pass");
    return ctx.past;
  }
  /// Where the decoder's backward writes the past-key/value gradients (DecoderGrad::past_key_values).
  std::span<const nn::PastKeyValueGrad<T>> past_key_value_grads(const Context& ctx) const {
    if (!ctx.has_forward) throw StateError("PrefixEncoder.past_key_value_grads: the context holds no forward pass");
    return ctx.dpast;
  }

  /// Backward from the past-key/value gradients the decoder wrote into the context (past_key_value_grads):
  /// summed over the batch into d prefix, then into the table (and the projection), per `params`.
  void backward(Context& ctx, GradMode params = GradMode::accumulate) {
    if (!ctx.has_forward) throw StateError("PrefixEncoder.backward: the context holds no forward pass");
    const Index nvt = num_virtual_tokens(), P = prefix_dim(), L = config_.num_layers, NH = config_.num_attention_heads, hd = config_.head_dim();
    const Index batch = ctx.batch, per = ctx.max_batch * NH * nvt * hd;
    auto dpre = MatrixView<T>(ctx.dprefix.data(), nvt, P);
    Backend::fill(dpre, T(0));
    for (Index l = 0; l < L; ++l) {
      const auto dk = ConstMatrixView<T>(ctx.dkeys.data() + l * per, batch * NH * nvt, hd);
      const auto dv = ConstMatrixView<T>(ctx.dvalues.data() + l * per, batch * NH * nvt, hd);
      for (Index b = 0; b < batch; ++b)
        for (Index h = 0; h < NH; ++h) {
          const Index r = (b * NH + h) * nvt;
          Backend::axpby(T(1), dk.row_block(r, nvt), T(1), dpre.col_block(((2 * l) * NH + h) * hd, hd));
          Backend::axpby(T(1), dv.row_block(r, nvt), T(1), dpre.col_block(((2 * l + 1) * NH + h) * hd, hd));
        }
    }
    backward_prefix(ctx, dpre, params);
  }

  /// Backward of `encode` from d prefix [nvt, prefix_dim] (the prefix of the last forward on ctx).
  void backward_prefix(Context& ctx, ConstMatrixView<T> dprefix, GradMode params = GradMode::accumulate) {
    if (!ctx.has_forward) throw StateError("PrefixEncoder.backward: the context holds no forward pass");
    require_shape(dprefix, num_virtual_tokens(), prefix_dim(), "PrefixEncoder.backward_prefix: dprefix [num_virtual_tokens, num_layers * 2 * token_dim]");
    if (!requires_grad_) return;
    const T beta = params == GradMode::accumulate ? T(1) : T(0);
    if (!config_.projects()) {
      Backend::axpby(T(1), dprefix, beta, weight_grad());
      return;
    }
    const Index nvt = num_virtual_tokens(), H = config_.hidden();
    auto dact = MatrixView<T>(ctx.dact.data(), nvt, H);
    auto act = MatrixView<T>(ctx.act.data(), nvt, H);
    t2_.backward(ctx.t2, dprefix, dact, params, GradMode::overwrite);
    Backend::tanh_backward(ConstMatrixView<T>(act), dact);
    t0_.backward(ctx.t0, dact, weight_grad(), params, params);
  }

  /// PEFT's mask for the decoder: [batch, nvt + seq] = nvt ones then `mask` (all ones when empty).
  void prepend_mask(std::span<const std::int64_t> mask, Index batch, Index seq, std::span<std::int64_t> mask_out) const {
    const Index nv = num_virtual_tokens();
    if (!mask.empty() && Index(mask.size()) != batch * seq)
      throw ShapeError(detail::cat("PrefixEncoder.prepend_mask: ", mask.size(), " entries, expected batch * seq = ", batch * seq));
    if (Index(mask_out.size()) != batch * (nv + seq))
      throw ShapeError(detail::cat("PrefixEncoder.prepend_mask: the output has ", mask_out.size(),
                                   " entries, expected batch * (num_virtual_tokens + seq) = ", batch * (nv + seq)));
    for (Index b = 0; b < batch; ++b)
      for (Index j = 0; j < nv + seq; ++j) mask_out[std::size_t(b * (nv + seq) + j)] = j < nv ? 1 : (mask.empty() ? 1 : mask[std::size_t(b * seq + j - nv)]);
  }

  /// What PEFT's save_pretrained writes as `prompt_embeddings` ([nvt, num_layers·2·token_dim]): the table, or
  /// with prefix_projection the projected table (the inference-time prefix; load it into an inference_mode
  /// encoder). Allocates (not a hot-path call).
  std::vector<T> prompt_embeddings() const {
    auto ctx = make_context(1);
    const auto pre = MatrixView<T>(ctx.prefix.data(), num_virtual_tokens(), prefix_dim());
    encode(ctx, pre);
    std::vector<T> out(std::size_t(pre.size()));
    Backend::template download<T>(ConstMatrixView<T>(pre), MatrixView<T>(out.data(), pre.rows, pre.cols));
    return out;
  }

  /// Parameters with PEFT's names inside prompt_encoder.<adapter>: "embedding.weight", and with the
  /// projection "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias".
  template <class F>
  void visit_parameters(F&& f) {
    f(ParamRef<T>{"embedding.weight", weight_.data(), requires_grad_ ? grad_.data() : nullptr, weight_.size(), requires_grad_, Backend::host_accessible});
    if (!config_.projects()) return;
    t0_.visit_parameters([&](ParamRef<T> p) { p.name = p.name == "weight" ? "transform.0.weight" : "transform.0.bias"; f(p); });
    t2_.visit_parameters([&](ParamRef<T> p) { p.name = p.name == "weight" ? "transform.2.weight" : "transform.2.bias"; f(p); });
  }
  void zero_grad() {
    grad_.zero();
    if (config_.projects()) {
      t0_.zero_grad();
      t2_.zero_grad();
    }
  }

 private:
  Index table_width() const noexcept { return config_.projects() ? config_.token_dim : config_.prefix_dim(); }

  PrefixTuningConfig config_;
  Buffer weight_, grad_;
  Linear<T, Backend> t0_, t2_;
  bool requires_grad_ = false;
};

}  // namespace peft
