// peft++ — Prompt Tuning (Lester et al., 2021) with Hugging Face PEFT's semantics (PromptTuningConfig,
// tuners/prompt_tuning, PeftModelForCausalLM's prompt path): num_virtual_tokens learned embeddings prepended to
// the input embeddings of a frozen model; the attention mask gets as many ones and the labels as many -100.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "peft/backend/eigen_cpu.hpp"
#include "peft/errors.hpp"
#include "peft/grad_mode.hpp"
#include "peft/layer/linear.hpp"
#include "peft/param.hpp"
#include "peft/rng.hpp"
#include "peft/view.hpp"

namespace peft {

/// PEFT's PromptTuningInit.
enum class PromptTuningInit {
  random,        ///< "RANDOM" (default): N(0, 1), torch.nn.Embedding's init
  text,          ///< "TEXT": rows of the word embeddings for the tokenised init text, repeated or truncated
  sample_vocab,  ///< "SAMPLE_VOCAB": rows of the word embeddings for uniformly drawn token ids
};

/// PEFT's PromptTuningConfig. peft++ has no tokenizer: for TEXT, tokenise `prompt_tuning_init_text` yourself
/// (as PEFT does with `tokenizer_name_or_path`) and put the ids in `init_token_ids`.
struct PromptTuningConfig {
  Index num_virtual_tokens = 0;  ///< required
  PromptTuningInit prompt_tuning_init = PromptTuningInit::random;
  std::string prompt_tuning_init_text;        ///< informational (PEFT records it in adapter_config.json)
  std::vector<std::int64_t> init_token_ids;   ///< the tokenised init text (TEXT)
  Index token_dim = 0;                        ///< the model's hidden size; 0: taken from the word embeddings
  Index num_transformer_submodules = 1;       ///< 1 for decoder-only models (2 for encoder-decoder in PEFT)
  bool inference_mode = false;                ///< PEFT: no init from the vocabulary, the table is frozen

  Index total_virtual_tokens() const noexcept { return num_virtual_tokens * num_transformer_submodules; }
  void validate() const {
    if (num_virtual_tokens <= 0)
      throw ConfigError(detail::cat("PromptTuningConfig: num_virtual_tokens must be positive, got ", num_virtual_tokens));
    if (num_transformer_submodules <= 0)
      throw ConfigError(detail::cat("PromptTuningConfig: num_transformer_submodules must be positive, got ", num_transformer_submodules));
    if (token_dim < 0) throw ConfigError(detail::cat("PromptTuningConfig: token_dim must be >= 0, got ", token_dim));
    if (prompt_tuning_init == PromptTuningInit::text && !inference_mode && init_token_ids.empty())
      throw ConfigError("PromptTuningConfig: prompt_tuning_init = TEXT needs the tokenised init text in init_token_ids");
  }
};

/// The trainable prompt table of prompt tuning, [total_virtual_tokens, token_dim] (PEFT's
/// `prompt_encoder.<name>.embedding.weight`). Forward gives the prompts of a batch (every row the same
/// table, as PEFT expands it over the batch) or writes the decoder's inputs_embeds with the prompts
/// prepended; backward sums the gradient over the batch into the table's gradient.
template <class T, class Backend = EigenCpu>
class PromptEmbedding {
 public:
  using scalar = T;
  using backend_type = Backend;

  struct Context {
    Index max_batch = 0;
    Index batch = 0;
    bool has_forward = false;
  };

  PromptEmbedding() = default;

  /// requires: config valid; `word_embeddings` [vocab, token_dim] (the model's token embedding, needed by TEXT
  /// and SAMPLE_VOCAB; may be empty for RANDOM when config.token_dim is set).
  /// ensures: the table initialised as PEFT does: RANDOM N(0, 1) from `gen`; TEXT the rows of init_token_ids,
  /// truncated to total_virtual_tokens or repeated (ids · ⌈T / n⌉, then the first T); SAMPLE_VOCAB the rows of
  /// T ids drawn uniformly from the vocabulary. Trainable unless inference_mode.
  PromptEmbedding(const PromptTuningConfig& config, ConstMatrixView<T> word_embeddings, Generator& gen) : config_(config) {
    config.validate();
    const Index d = config.token_dim > 0 ? config.token_dim : word_embeddings.cols;
    if (d <= 0) throw ConfigError("PromptEmbedding: token_dim is 0 and no word embeddings were given to take it from");
    if (!word_embeddings.empty() && word_embeddings.cols != d)
      throw ShapeError(detail::cat("PromptEmbedding: token_dim ", d, " differs from the word embeddings' dimension ", word_embeddings.cols));
    config_.token_dim = d;
    const Index n = config.total_virtual_tokens();
    weight_.resize(std::size_t(n * d));
    auto w = weight();
    const bool from_vocab = !config.inference_mode && config.prompt_tuning_init != PromptTuningInit::random;
    if (from_vocab && word_embeddings.empty())
      throw ShapeError("PromptEmbedding: TEXT and SAMPLE_VOCAB initialisation need the model's word embeddings");
    if (!from_vocab) {
      Backend::random_normal(gen, flat(weight_), 0.0, 1.0);
    } else {
      std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
      if (config.prompt_tuning_init == PromptTuningInit::text) {
        const auto& t = config.init_token_ids;  // PEFT: truncate, or repeat ⌈n / len⌉ times, then keep the first n
        for (Index i = 0; i < n; ++i) ids[std::size_t(i)] = t[std::size_t(i) % t.size()];
      } else {
        std::vector<double> u(static_cast<std::size_t>(n));
        gen.uniform(u.data(), u.size(), 0.0, double(word_embeddings.rows));
        for (Index i = 0; i < n; ++i) ids[std::size_t(i)] = std::min<std::int64_t>(std::int64_t(u[std::size_t(i)]), word_embeddings.rows - 1);
      }
      for (Index i = 0; i < n; ++i)
        if (ids[std::size_t(i)] < 0 || ids[std::size_t(i)] >= word_embeddings.rows)
          throw ShapeError(detail::cat("PromptEmbedding: init token id ", ids[std::size_t(i)], " is out of range [0, ", word_embeddings.rows, ")"));
      typename Backend::IndexStage staged;  // where the backend reads ids (a device copy on a GPU)
      staged.reserve(n);
      Backend::gather_rows(word_embeddings, staged.stage(ids), T(1), T(0), w);
    }
    set_requires_grad(!config.inference_mode);
  }

  const PromptTuningConfig& config() const noexcept { return config_; }
  Index num_virtual_tokens() const noexcept { return config_.total_virtual_tokens(); }
  Index token_dim() const noexcept { return config_.token_dim; }
  MatrixView<T> weight() { return weight_.view(num_virtual_tokens(), token_dim()); }
  ConstMatrixView<T> weight() const { return weight_.view(num_virtual_tokens(), token_dim()); }
  /// What PEFT saves as `prompt_embeddings` ([num_virtual_tokens, token_dim]): for prompt tuning the table itself.
  ConstMatrixView<T> prompt_embeddings() const { return weight(); }

  void set_requires_grad(bool on) {
    requires_grad_ = on;
    if (on) grad_.resize(weight_.size());
    else grad_ = {};
  }
  bool requires_grad() const noexcept { return requires_grad_; }
  MatrixView<T> weight_grad() { return requires_grad_ ? grad_.view(num_virtual_tokens(), token_dim()) : MatrixView<T>{}; }

  Context make_context(Index max_batch) const {
    if (max_batch <= 0) throw ShapeError(detail::cat("PromptEmbedding::make_context: max_batch must be positive, got ", max_batch));
    Context c;
    c.max_batch = max_batch;
    return c;
  }

  /// prompts [batch · num_virtual_tokens, token_dim]: row b · T + t = table row t.
  void forward(Context& ctx, Index batch, MatrixView<T> prompts) const {
    check_batch(ctx, batch, "PromptEmbedding.forward");
    require_shape(prompts, batch * num_virtual_tokens(), token_dim(), "PromptEmbedding.forward: prompts [batch * num_virtual_tokens, token_dim]");
    for (Index b = 0; b < batch; ++b) Backend::copy(weight(), prompts.row_block(b * num_virtual_tokens(), num_virtual_tokens()));
    ctx.batch = batch;
    ctx.has_forward = true;
  }

  /// The decoder input with the prompts prepended (PeftModelForCausalLM): for every batch row b,
  /// inputs_embeds rows [b · (T + seq), b · (T + seq) + T) = the table and the next seq rows = token_embeds
  /// rows [b · seq, (b + 1) · seq). requires: token_embeds [batch · seq, token_dim], inputs_embeds
  /// [batch · (T + seq), token_dim].
  void prepend(Context& ctx, ConstMatrixView<T> token_embeds, Index batch, Index seq, MatrixView<T> inputs_embeds) const {
    check_batch(ctx, batch, "PromptEmbedding.prepend");
    const Index nv = num_virtual_tokens(), L = nv + seq;
    require_shape(token_embeds, batch * seq, token_dim(), "PromptEmbedding.prepend: token_embeds [batch * seq, token_dim]");
    require_shape(inputs_embeds, batch * L, token_dim(), "PromptEmbedding.prepend: inputs_embeds [batch * (num_virtual_tokens + seq), token_dim]");
    for (Index b = 0; b < batch; ++b) {
      Backend::copy(weight(), inputs_embeds.row_block(b * L, nv));
      Backend::copy(token_embeds.row_block(b * seq, seq), inputs_embeds.row_block(b * L + nv, seq));
    }
    ctx.batch = batch;
    ctx.has_forward = true;
  }

  /// Table gradient (when trainable) per `params`: Σ_b dprompts rows [b · T, (b + 1) · T).
  void backward(Context& ctx, ConstMatrixView<T> dprompts, GradMode params = GradMode::accumulate) {
    if (!ctx.has_forward) throw StateError("PromptEmbedding.backward: the context holds no forward pass");
    const Index nv = num_virtual_tokens();
    require_shape(dprompts, ctx.batch * nv, token_dim(), "PromptEmbedding.backward: dprompts [batch * num_virtual_tokens, token_dim]");
    accumulate_rows(dprompts, nv, params);
  }
  /// The same from the gradient of the prepended inputs_embeds ([batch · (T + seq), token_dim]); the token
  /// rows are ignored (route them to the token embedding yourself if it trains).
  void backward_from_inputs_embeds(Context& ctx, ConstMatrixView<T> d_inputs_embeds, Index seq, GradMode params = GradMode::accumulate) {
    if (!ctx.has_forward) throw StateError("PromptEmbedding.backward: the context holds no forward pass");
    const Index nv = num_virtual_tokens();
    require_shape(d_inputs_embeds, ctx.batch * (nv + seq), token_dim(),
                  "PromptEmbedding.backward_from_inputs_embeds: d_inputs_embeds [batch * (num_virtual_tokens + seq), token_dim]");
    accumulate_rows(d_inputs_embeds, nv + seq, params);
  }

  /// PEFT's mask and label padding: mask_out [batch, T + seq] = ones then `mask` (all ones when empty);
  /// labels_out = -100 × T then `labels`.
  void prepend_mask(std::span<const std::int64_t> mask, Index batch, Index seq, std::span<std::int64_t> mask_out) const {
    prepend_rows(mask, batch, seq, 1, mask_out, "prepend_mask");
  }
  void prepend_labels(std::span<const std::int64_t> labels, Index batch, Index seq, std::span<std::int64_t> labels_out) const {
    if (labels.empty()) throw ShapeError("PromptEmbedding.prepend_labels: labels are empty");
    prepend_rows(labels, batch, seq, -100, labels_out, "prepend_labels");
  }

  /// The table as parameter "embedding.weight" (PEFT's name inside prompt_encoder.<adapter>).
  template <class F>
  void visit_parameters(F&& f) {
    f(ParamRef<T>{"embedding.weight", weight_.data(), requires_grad_ ? grad_.data() : nullptr, weight_.size(), requires_grad_, Backend::host_accessible});
  }
  void zero_grad() { grad_.zero(); }

 private:
  void check_batch(const Context& ctx, Index batch, const char* where) const {
    if (batch <= 0 || batch > ctx.max_batch)
      throw ShapeError(detail::cat(where, ": batch ", batch, " must be positive and at most the context's max_batch ", ctx.max_batch));
  }
  void accumulate_rows(ConstMatrixView<T> d, Index period, GradMode params) {
    if (!requires_grad_) return;
    auto g = weight_grad();
    const Index nv = num_virtual_tokens();
    Backend::scale(g, params == GradMode::accumulate ? T(1) : T(0));
    for (Index b = 0; b < d.rows / period; ++b) Backend::axpby(T(1), d.row_block(b * period, nv), T(1), g);
  }
  void prepend_rows(std::span<const std::int64_t> in, Index batch, Index seq, std::int64_t fill, std::span<std::int64_t> out, const char* what) const {
    const Index nv = num_virtual_tokens();
    if (!in.empty() && Index(in.size()) != batch * seq)
      throw ShapeError(detail::cat("PromptEmbedding.", what, ": ", in.size(), " entries, expected batch * seq = ", batch * seq));
    if (Index(out.size()) != batch * (nv + seq))
      throw ShapeError(detail::cat("PromptEmbedding.", what, ": the output has ", out.size(), " entries, expected batch * (num_virtual_tokens + seq) = ",
                                   batch * (nv + seq)));
    for (Index b = 0; b < batch; ++b)
      for (Index j = 0; j < nv + seq; ++j)
        out[std::size_t(b * (nv + seq) + j)] = j < nv ? fill : (in.empty() ? 1 : in[std::size_t(b * seq + j - nv)]);
  }

  PromptTuningConfig config_;
  typename Backend::template buffer<T> weight_, grad_;
  bool requires_grad_ = false;
};

}  // namespace peft
