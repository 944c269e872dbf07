// peft++ — the Embedding base layer: y[i, :] = W[ids[i], :], W stored [num_embeddings, embedding_dim] as
// torch.nn.Embedding.
#pragma once

#include <cstdint>
#include <optional>
#include <span>

#include "peft/backend/eigen_cpu.hpp"
#include "peft/grad_mode.hpp"
#include "peft/layer/linear.hpp"
#include "peft/param.hpp"
#include "peft/rng.hpp"
#include "peft/view.hpp"

namespace peft {

/// Token ids, as torch's LongTensor: a flat span (flatten [batch, seq] row-major).
using TokenIds = std::span<const std::int64_t>;

/// An embedding table, frozen by default. Forward takes token ids and assigns y [n, embedding_dim];
/// backward never writes an input gradient (ids are not differentiable) and, only when the table was made
/// trainable (`set_requires_grad(true)`), scatters dy into the table gradient, skipping `padding_idx`
/// as PyTorch does.
template <class T, class Backend = EigenCpu>
class Embedding {
 public:
  using scalar = T;
  using backend_type = Backend;
  using input_type = TokenIds;

  struct Context {
    Index max_batch = 0;
    TokenIds x;  ///< the ids of the last forward (must stay alive until backward)
    bool has_forward = false;
    typename Backend::template GemmScratch<T> scratch;
    typename Backend::IndexStage ids;  ///< the ids where the backend reads them (a device copy on a GPU)
  };

  Embedding() = default;
  /// An owned table initialised N(0, 1), as torch.nn.Embedding (the padding row zeroed).
  Embedding(Index num_embeddings, Index embedding_dim, Generator& gen, std::optional<std::int64_t> padding_idx = std::nullopt)
      : padding_idx_(padding_idx) {
    if (num_embeddings <= 0 || embedding_dim <= 0)
      throw ShapeError(detail::cat("Embedding: num_embeddings and embedding_dim must be positive, got ", num_embeddings, " and ", embedding_dim));
    weight_ = detail::ParamStorage<T, Backend>::owned(num_embeddings, embedding_dim);
    Backend::random_normal(gen, weight_.view(), 0.0, 1.0);
    check_padding();
    if (padding_idx_) Backend::fill(MatrixView<T>(weight_.data() + *padding_idx_ * embedding_dim, 1, embedding_dim), T(0));
  }
  /// A table over the caller's memory, [num_embeddings, embedding_dim]; nothing is copied.
  static Embedding borrow(MatrixView<T> weight, std::optional<std::int64_t> padding_idx = std::nullopt) {
    Embedding e;
    if (weight.empty()) throw ShapeError("Embedding::borrow: the weight view is empty");
    e.weight_ = detail::ParamStorage<T, Backend>::borrowed(weight);
    e.padding_idx_ = padding_idx;
    e.check_padding();
    return e;
  }

  Index num_embeddings() const noexcept { return weight_.view().rows; }
  Index embedding_dim() const noexcept { return weight_.view().cols; }
  /// PEFT's in_features / out_features of an embedding.
  Index in_features() const noexcept { return num_embeddings(); }
  Index out_features() const noexcept { return embedding_dim(); }
  std::optional<std::int64_t> padding_idx() const noexcept { return padding_idx_; }
  WeightLayout layout() const noexcept { return WeightLayout::out_in; }
  bool has_bias() const noexcept { return false; }
  MatrixView<T> weight() noexcept { return weight_.view(); }
  ConstMatrixView<T> weight() const noexcept { return weight_.view(); }
  MatrixView<T> bias() noexcept { return {}; }

  void set_requires_grad(bool on) {
    requires_grad_ = on;
    if (on) weight_grad_.resize(weight_.size());
    else weight_grad_ = {};
  }
  bool requires_grad() const noexcept { return requires_grad_; }
  MatrixView<T> weight_grad() { return requires_grad_ ? weight_grad_.view(num_embeddings(), embedding_dim()) : MatrixView<T>{}; }

  Context make_context(Index max_batch) const {
    if (max_batch <= 0) throw ShapeError(detail::cat("Embedding::make_context: max_batch must be positive, got ", max_batch));
    Context ctx;
    ctx.max_batch = max_batch;
    ctx.ids.reserve(max_batch);
    return ctx;
  }

  /// y[i, :] = W[ids[i], :]. requires: every id in [0, num_embeddings), ids.size() <= ctx.max_batch,
  /// y [ids.size(), embedding_dim].
  void forward(Context& ctx, TokenIds ids, MatrixView<T> y) const {
    check_io(ctx, ids, y, "Embedding.forward");
    forward_into(ctx, ids, y);
    ctx.x = ids;
    ctx.has_forward = true;
  }
  /// Writes the table gradient (when trainable) per `params`; `dx` must be empty (ids have no gradient).
  void backward(Context& ctx, ConstMatrixView<T> dy, MatrixView<T> dx = {}, GradMode params = GradMode::accumulate,
                GradMode = GradMode::overwrite) {
    check_backward(ctx, dy, dx, "Embedding.backward");
    if (requires_grad_) backward_params(ctx, ctx.x, dy, params == GradMode::accumulate ? T(1) : T(0));
  }

  // ---- pieces used by adapted layers -------------------------------------------------------------------
  void forward_into(Context& ctx, TokenIds ids, MatrixView<T> y) const {
    Backend::gather_rows(weight_.view(), ctx.ids.stage(ids), T(1), T(0), y);
  }
  void backward_input(Context&, ConstMatrixView<T>, MatrixView<T>, T) const {}
  /// `ids` are the last forward's (ctx.x), staged there.
  void backward_params(Context& ctx, TokenIds ids, ConstMatrixView<T> dy, T beta) {
    auto g = weight_grad();
    Backend::scale(g, beta);
    if (dy.rows != Index(ids.size())) throw ShapeError(detail::cat("Embedding.backward: dy has ", dy.rows, " rows for ", ids.size(), " ids"));
    Backend::scatter_add_rows(dy, ctx.ids.staged(), T(1), g, padding_idx_.value_or(-1));
  }
  void check_io(const Context& ctx, TokenIds ids, ConstMatrixView<T> y, const char* where) const {
    const Index n = Index(ids.size());
    if (n > ctx.max_batch)
      throw ShapeError(detail::cat(where, ": ", n, " ids exceed the context's max_batch ", ctx.max_batch, "; make the context with a larger max_batch"));
    for (Index i = 0; i < n; ++i)
      if (ids[std::size_t(i)] < 0 || ids[std::size_t(i)] >= num_embeddings())
        throw ShapeError(detail::cat(where, ": token id ", ids[std::size_t(i)], " at position ", i, " is out of range [0, ", num_embeddings(), ")"));
    if (y.rows != n || y.cols != embedding_dim())
      throw ShapeError(detail::cat(where, ": y: expected shape [", n, ", ", embedding_dim(), "], got [", y.rows, ", ", y.cols, "]"));
  }
  void check_backward(const Context& ctx, ConstMatrixView<T> dy, ConstMatrixView<T> dx, const char* where) const {
    if (!ctx.has_forward) throw StateError(detail::cat(where, ": the context holds no forward pass"));
    if (dy.rows != Index(ctx.x.size()) || dy.cols != embedding_dim())
      throw ShapeError(detail::cat(where, ": dy: expected shape [", ctx.x.size(), ", ", embedding_dim(), "], got [", dy.rows, ", ", dy.cols, "]"));
    if (!dx.empty()) throw ShapeError(detail::cat(where, ": an embedding has no input gradient; pass an empty dx"));
  }

  template <class F>
  void visit_parameters(F&& f) {
    f(ParamRef<T>{"weight", weight_.data(), requires_grad_ ? weight_grad_.data() : nullptr, weight_.size(), requires_grad_, Backend::host_accessible});
  }
  void zero_grad() { weight_grad_.zero(); }

 private:
  void check_padding() const {
    if (padding_idx_ && (*padding_idx_ < 0 || *padding_idx_ >= num_embeddings()))
      throw ShapeError(detail::cat("Embedding: padding_idx ", *padding_idx_, " is out of range [0, ", num_embeddings(), ")"));
  }
  detail::ParamStorage<T, Backend> weight_;
  std::optional<std::int64_t> padding_idx_;
  bool requires_grad_ = false;
  typename Backend::template buffer<T> weight_grad_;
};

}  // namespace peft
