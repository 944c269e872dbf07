// peft++ — Multitask Prompt Tuning (Wang et al., 2023) with Hugging Face PEFT's semantics
// (MultitaskPromptTuningConfig, tuners/multitask_prompt_tuning's MultitaskPromptEmbedding, PeftModel.get_prompt
// with task_ids): one shared prompt table modulated per task by a rank-r product, prepended to the input
// embeddings of a frozen model.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "peft/backend/eigen_cpu.hpp"
#include "peft/buffer.hpp"
#include "peft/errors.hpp"
#include "peft/grad_mode.hpp"
#include "peft/param.hpp"
#include "peft/prompt/prompt_tuning.hpp"
#include "peft/rng.hpp"
#include "peft/view.hpp"

namespace peft {

/// PEFT's MultitaskPromptTuningInit. The source-task options initialise from a saved multitask prompt
/// (MultitaskSourceState: the tensors PEFT reads from prompt_tuning_init_state_dict_path).
enum class MultitaskPromptTuningInit {
  random,                ///< "RANDOM" (default): the shared table N(0, 1)
  text,                  ///< "TEXT": rows of the word embeddings for the tokenised init text, repeated/truncated
  average_source_tasks,  ///< the source's table, and its task factors averaged over the source tasks (num_tasks must be 1)
  exact_source_task,     ///< the source's table, and the factors of source task prompt_tuning_init_task (num_tasks must be 1)
  only_source_shared,    ///< the source's table only; the factors keep their random init
};

/// A saved multitask prompt, as PEFT writes it: prompt_embeddings [T, d], prefix_task_cols
/// [source_tasks, T, r] and prefix_task_rows [source_tasks, r, d], the last two seen as
/// [source_tasks · T, r] and [source_tasks · r, d] row-major views.
template <class T>
struct MultitaskSourceState {
  ConstMatrixView<T> prompt_embeddings = {};
  ConstMatrixView<T> prefix_task_cols = {};
  ConstMatrixView<T> prefix_task_rows = {};
};

/// PEFT's MultitaskPromptTuningConfig (PromptTuningConfig's fields plus num_tasks and num_ranks).
struct MultitaskPromptTuningConfig {
  Index num_virtual_tokens = 0;  ///< required
  MultitaskPromptTuningInit prompt_tuning_init = MultitaskPromptTuningInit::random;
  std::string prompt_tuning_init_text;       ///< informational
  std::vector<std::int64_t> init_token_ids;  ///< the tokenised init text (TEXT)
  Index token_dim = 0;                       ///< 0: the word embeddings' width
  Index num_transformer_submodules = 1;
  bool inference_mode = false;
  Index num_tasks = 1;
  Index num_ranks = 1;
  Index prompt_tuning_init_task = 0;  ///< the source task for EXACT_SOURCE_TASK

  bool from_source() const noexcept {
    return prompt_tuning_init != MultitaskPromptTuningInit::random && prompt_tuning_init != MultitaskPromptTuningInit::text;
  }
  Index total_virtual_tokens() const noexcept { return num_virtual_tokens * num_transformer_submodules; }
  void validate() const {
    if (num_tasks <= 0 || num_ranks <= 0)
      throw ConfigError(detail::cat("MultitaskPromptTuningConfig: num_tasks (", num_tasks, ") and num_ranks (", num_ranks, ") must be positive"));
    if ((prompt_tuning_init == MultitaskPromptTuningInit::average_source_tasks || prompt_tuning_init == MultitaskPromptTuningInit::exact_source_task) &&
        num_tasks != 1)
      throw ConfigError(detail::cat("MultitaskPromptTuningConfig: AVERAGE_SOURCE_TASKS and EXACT_SOURCE_TASK load task factors of one task, "
                                    "so num_tasks must be 1 (PEFT's load_state_dict fails otherwise), got ", num_tasks));
  }
  PromptTuningConfig shared_config() const {
    PromptTuningConfig c;
    c.num_virtual_tokens = num_virtual_tokens;
    c.prompt_tuning_init = prompt_tuning_init == MultitaskPromptTuningInit::text ? PromptTuningInit::text : PromptTuningInit::random;
    c.prompt_tuning_init_text = prompt_tuning_init_text;
    c.init_token_ids = init_token_ids;
    c.token_dim = token_dim;
    c.num_transformer_submodules = num_transformer_submodules;
    c.inference_mode = inference_mode;
    return c;
  }
};

/// PEFT's MultitaskPromptEmbedding: `embedding.weight` E [T, d] (prompt tuning's table and init),
/// `prefix_task_cols` C [num_tasks, T, r] and `prefix_task_rows` R [num_tasks, r, d], both N(0, 0.02). The
/// prompt of a batch row with task k is E ⊙ (C[k] R[k]) ([T, d]).
template <class T, class Backend = EigenCpu>
class MultitaskPromptEmbedding {
 public:
  using scalar = T;
  using backend_type = Backend;
  using Buffer = typename Backend::template buffer<T>;

  struct Context {
    Index max_batch = 0, batch = 0;
    bool has_forward = false;
    HostBuffer<std::int64_t> task_ids;  // [max_batch]
    Buffer m;                           // [max_batch · T, d]: C[k] R[k] per batch row
    Buffer dm, dcols, drows;            // [T, d], [T, r], [r, d]
    typename Backend::template GemmScratch<T> scratch;
  };

  MultitaskPromptEmbedding() = default;

  /// requires: config valid; word_embeddings [vocab, d] (needed by TEXT). ensures: PEFT's init, in its order:
  /// the shared table as prompt tuning (RANDOM N(0, 1) / TEXT rows), then C, then R from N(0, 0.02).
  MultitaskPromptEmbedding(const MultitaskPromptTuningConfig& config, ConstMatrixView<T> word_embeddings, Generator& gen)
      : MultitaskPromptEmbedding(config, word_embeddings, MultitaskSourceState<T>{}, gen) {}

  /// The same for the source-task inits (PEFT reads `source` from prompt_tuning_init_state_dict_path): after the
  /// RANDOM init, the table is the source's prompt_embeddings and, for AVERAGE_SOURCE_TASKS / EXACT_SOURCE_TASK,
  /// the task factors its mean over the source tasks / its task prompt_tuning_init_task. Throws ConfigError when
  /// a source init has no source, ShapeError when the source's shapes do not fit.
  MultitaskPromptEmbedding(const MultitaskPromptTuningConfig& config, ConstMatrixView<T> word_embeddings, const MultitaskSourceState<T>& source,
                           Generator& gen)
      : config_(config), shared_((config.validate(), config.shared_config()), word_embeddings, gen) {
    config_.token_dim = shared_.token_dim();
    const Index n = num_virtual_tokens(), d = token_dim(), r = config.num_ranks, K = config.num_tasks;
    cols_.resize(std::size_t(K * n * r));
    rows_.resize(std::size_t(K * r * d));
    Backend::random_normal(gen, flat(cols_), 0.0, 0.02);
    Backend::random_normal(gen, flat(rows_), 0.0, 0.02);
    if (config.from_source()) load_source(source);
    set_requires_grad(!config.inference_mode);
  }

  const MultitaskPromptTuningConfig& config() const noexcept { return config_; }
  Index num_virtual_tokens() const noexcept { return config_.total_virtual_tokens(); }
  Index token_dim() const noexcept { return shared_.token_dim(); }
  Index num_tasks() const noexcept { return config_.num_tasks; }
  Index num_ranks() const noexcept { return config_.num_ranks; }
  MatrixView<T> weight() { return shared_.weight(); }
  ConstMatrixView<T> weight() const { return shared_.weight(); }
  /// C[task] [T, r] and R[task] [r, d].
  MatrixView<T> task_cols(Index task) { check_task(task, 0); return MatrixView<T>(cols_.data() + task * num_virtual_tokens() * num_ranks(), num_virtual_tokens(), num_ranks()); }
  MatrixView<T> task_rows(Index task) { check_task(task, 0); return MatrixView<T>(rows_.data() + task * num_ranks() * token_dim(), num_ranks(), token_dim()); }
  /// What PEFT saves as `prompt_embeddings`: the shared table (saved beside prefix_task_cols and prefix_task_rows).
  ConstMatrixView<T> prompt_embeddings() const { return shared_.weight(); }

  void set_requires_grad(bool on) {
    shared_.set_requires_grad(on);
    requires_grad_ = on;
    if (on) {
      dcols_.resize(cols_.size());
      drows_.resize(rows_.size());
    } else {
      dcols_ = {};
      drows_ = {};
    }
  }
  bool requires_grad() const noexcept { return requires_grad_; }

  Context make_context(Index max_batch) const {
    if (max_batch <= 0) throw ShapeError(detail::cat("MultitaskPromptEmbedding::make_context: max_batch must be positive, got ", max_batch));
    Context c;
    c.max_batch = max_batch;
    const Index n = num_virtual_tokens(), d = token_dim(), r = num_ranks();
    c.task_ids.resize(std::size_t(max_batch));
    c.m.resize(std::size_t(max_batch * n * d));
    c.dm.resize(std::size_t(n * d));
    c.dcols.resize(std::size_t(n * r));
    c.drows.resize(std::size_t(r * d));
    c.scratch.reserve_gemm(n, d, r);  // C R
    c.scratch.reserve_gemm(n, r, d);  // dM Rᵀ
    c.scratch.reserve_gemm(r, d, n);  // Cᵀ dM
    return c;
  }

  /// prompts [batch · T, d] with batch = task_ids.size(): row block b = E ⊙ (C[task_ids[b]] R[task_ids[b]]).
  /// Throws ShapeError for a task id outside [0, num_tasks).
  void forward(Context& ctx, std::span<const std::int64_t> task_ids, MatrixView<T> prompts) const {
    const Index batch = begin(ctx, task_ids, "MultitaskPromptEmbedding.forward");
    require_shape(prompts, batch * num_virtual_tokens(), token_dim(), "MultitaskPromptEmbedding.forward: prompts [batch * num_virtual_tokens, token_dim]");
    for (Index b = 0; b < batch; ++b) write_prompt(ctx, b, prompts.row_block(b * num_virtual_tokens(), num_virtual_tokens()));
    ctx.has_forward = true;
  }

  /// The decoder input with each row's task prompt prepended (as PromptEmbedding::prepend), batch = task_ids.size().
  void prepend(Context& ctx, ConstMatrixView<T> token_embeds, std::span<const std::int64_t> task_ids, Index seq, MatrixView<T> inputs_embeds) const {
    const Index batch = begin(ctx, task_ids, "MultitaskPromptEmbedding.prepend");
    const Index nv = num_virtual_tokens(), L = nv + seq;
    require_shape(token_embeds, batch * seq, token_dim(), "MultitaskPromptEmbedding.prepend: token_embeds [batch * seq, token_dim]");
    require_shape(inputs_embeds, batch * L, token_dim(), "MultitaskPromptEmbedding.prepend: inputs_embeds [batch * (num_virtual_tokens + seq), token_dim]");
    for (Index b = 0; b < batch; ++b) {
      write_prompt(ctx, b, inputs_embeds.row_block(b * L, nv));
      Backend::copy(token_embeds.row_block(b * seq, seq), inputs_embeds.row_block(b * L + nv, seq));
    }
    ctx.has_forward = true;
  }

  /// Gradients of E, C and R (per `params`) from d prompts [batch · T, d]; only the tasks in the batch get
  /// non-zero C/R gradients.
  void backward(Context& ctx, ConstMatrixView<T> dprompts, GradMode params = GradMode::accumulate) {
    if (!ctx.has_forward) throw StateError("MultitaskPromptEmbedding.backward: the context holds no forward pass");
    require_shape(dprompts, ctx.batch * num_virtual_tokens(), token_dim(), "MultitaskPromptEmbedding.backward: dprompts [batch * num_virtual_tokens, token_dim]");
    backward_rows(ctx, dprompts, num_virtual_tokens(), params);
  }
  void backward_from_inputs_embeds(Context& ctx, ConstMatrixView<T> d_inputs_embeds, Index seq, GradMode params = GradMode::accumulate) {
    if (!ctx.has_forward) throw StateError("MultitaskPromptEmbedding.backward: the context holds no forward pass");
    require_shape(d_inputs_embeds, ctx.batch * (num_virtual_tokens() + seq), token_dim(),
                  "MultitaskPromptEmbedding.backward_from_inputs_embeds: d_inputs_embeds [batch * (num_virtual_tokens + seq), token_dim]");
    backward_rows(ctx, d_inputs_embeds, num_virtual_tokens() + seq, params);
  }

  void prepend_mask(std::span<const std::int64_t> mask, Index batch, Index seq, std::span<std::int64_t> mask_out) const {
    shared_.prepend_mask(mask, batch, seq, mask_out);
  }
  void prepend_labels(std::span<const std::int64_t> labels, Index batch, Index seq, std::span<std::int64_t> labels_out) const {
    shared_.prepend_labels(labels, batch, seq, labels_out);
  }

  /// PEFT's names: "embedding.weight", "prefix_task_cols" [num_tasks, T, r], "prefix_task_rows" [num_tasks, r, d].
  template <class F>
  void visit_parameters(F&& f) {
    shared_.visit_parameters(f);
    f(ParamRef<T>{"prefix_task_cols", cols_.data(), requires_grad_ ? dcols_.data() : nullptr, cols_.size(), requires_grad_, Backend::host_accessible});
    f(ParamRef<T>{"prefix_task_rows", rows_.data(), requires_grad_ ? drows_.data() : nullptr, rows_.size(), requires_grad_, Backend::host_accessible});
  }
  void zero_grad() {
    shared_.zero_grad();
    dcols_.zero();
    drows_.zero();
  }

 private:
  void load_source(const MultitaskSourceState<T>& src) {
    if (src.prompt_embeddings.empty())
      throw ConfigError("MultitaskPromptEmbedding: a source-task init (AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK, ONLY_SOURCE_SHARED) needs the "
                        "source's tensors (PEFT's prompt_tuning_init_state_dict_path)");
    const Index n = num_virtual_tokens(), d = token_dim(), r = num_ranks();
    require_shape(src.prompt_embeddings, n, d, "MultitaskPromptEmbedding: source prompt_embeddings [num_virtual_tokens, token_dim]");
    Backend::copy(src.prompt_embeddings, shared_.weight());
    if (config_.prompt_tuning_init == MultitaskPromptTuningInit::only_source_shared) return;
    const auto& c = src.prefix_task_cols;
    const auto& w = src.prefix_task_rows;
    if (c.empty() || c.cols != r || c.rows % n != 0)
      throw ShapeError(detail::cat("MultitaskPromptEmbedding: source prefix_task_cols must be [source_tasks * num_virtual_tokens, num_ranks] = [k * ", n,
                                   ", ", r, "], got [", c.rows, ", ", c.cols, "]"));
    const Index ks = c.rows / n;
    require_shape(w, ks * r, d, "MultitaskPromptEmbedding: source prefix_task_rows [source_tasks * num_ranks, token_dim]");
    auto cols = MatrixView<T>(cols_.data(), n, r);
    auto rows = MatrixView<T>(rows_.data(), r, d);
    if (config_.prompt_tuning_init == MultitaskPromptTuningInit::exact_source_task) {
      const Index k = config_.prompt_tuning_init_task;
      if (k < 0 || k >= ks)
        throw ConfigError(detail::cat("MultitaskPromptEmbedding: prompt_tuning_init_task ", k, " is out of range [0, ", ks, ") of the source's tasks"));
      Backend::copy(c.row_block(k * n, n), cols);
      Backend::copy(w.row_block(k * r, r), rows);
      return;
    }
    Backend::fill(cols, T(0));
    Backend::fill(rows, T(0));
    for (Index k = 0; k < ks; ++k) {
      Backend::axpby(T(1), c.row_block(k * n, n), T(1), cols);
      Backend::axpby(T(1), w.row_block(k * r, r), T(1), rows);
    }
    Backend::scale(cols, T(1) / T(ks));
    Backend::scale(rows, T(1) / T(ks));
  }
  void check_task(std::int64_t task, Index row) const {
    if (task < 0 || task >= num_tasks())
      throw ShapeError(detail::cat("MultitaskPromptEmbedding: task id ", task, " (batch row ", row, ") is out of range [0, num_tasks = ", num_tasks(), ")"));
  }
  Index begin(Context& ctx, std::span<const std::int64_t> task_ids, const char* where) const {
    if (ctx.max_batch == 0) throw StateError(detail::cat(where, ": the context was not made by make_context"));
    const Index batch = Index(task_ids.size());
    if (batch <= 0 || batch > ctx.max_batch)
      throw ShapeError(detail::cat(where, ": batch (task_ids.size()) ", batch, " must be positive and at most the context's max_batch ", ctx.max_batch));
    for (Index b = 0; b < batch; ++b) check_task(task_ids[std::size_t(b)], b);
    for (Index b = 0; b < batch; ++b) ctx.task_ids[std::size_t(b)] = task_ids[std::size_t(b)];
    ctx.batch = batch;
    return batch;
  }
  ConstMatrixView<T> cols_of(Index k) const { return ConstMatrixView<T>(cols_.data() + k * num_virtual_tokens() * num_ranks(), num_virtual_tokens(), num_ranks()); }
  ConstMatrixView<T> rows_of(Index k) const { return ConstMatrixView<T>(rows_.data() + k * num_ranks() * token_dim(), num_ranks(), token_dim()); }

  void write_prompt(Context& ctx, Index b, MatrixView<T> out) const {
    const Index n = num_virtual_tokens(), d = token_dim(), k = Index(ctx.task_ids[std::size_t(b)]);
    auto m = MatrixView<T>(ctx.m.data() + b * n * d, n, d);
    Backend::template gemm<Trans::no, Trans::no>(ctx.scratch, T(1), cols_of(k), rows_of(k), T(0), m);
    Backend::copy(weight(), out);
    Backend::mul(ConstMatrixView<T>(m), out);
  }

  void backward_rows(Context& ctx, ConstMatrixView<T> d, Index period, GradMode params) {
    if (!requires_grad_) return;
    const Index n = num_virtual_tokens(), dm_ = token_dim(), r = num_ranks();
    auto ge = shared_.weight_grad();
    const auto e = weight();
    if (params == GradMode::overwrite) {
      Backend::fill(ge, T(0));
      dcols_.zero();
      drows_.zero();
    }
    auto dm = MatrixView<T>(ctx.dm.data(), n, dm_);
    for (Index b = 0; b < ctx.batch; ++b) {
      const Index k = Index(ctx.task_ids[std::size_t(b)]);
      const auto dp = d.row_block(b * period, n);
      const auto m = ConstMatrixView<T>(ctx.m.data() + b * n * dm_, n, dm_);
      Backend::copy(dp, dm);  // ge += dp ⊙ m (dm as scratch), then dm = dp ⊙ e
      Backend::mul(m, dm);
      Backend::axpby(T(1), ConstMatrixView<T>(dm), T(1), ge);
      Backend::copy(dp, dm);
      Backend::mul(e, dm);
      auto gc = MatrixView<T>(dcols_.data() + k * n * r, n, r), gr = MatrixView<T>(drows_.data() + k * r * dm_, r, dm_);
      Backend::template gemm<Trans::no, Trans::yes>(ctx.scratch, T(1), dm, rows_of(k), T(1), gc);
      Backend::template gemm<Trans::yes, Trans::no>(ctx.scratch, T(1), cols_of(k), dm, T(1), gr);
    }
  }

  MultitaskPromptTuningConfig config_;
  PromptEmbedding<T, Backend> shared_;
  Buffer cols_, rows_, dcols_, drows_;
  bool requires_grad_ = false;
};

}  // namespace peft
