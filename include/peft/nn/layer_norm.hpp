// peft++ — LayerNorm over the last dimension, as torch.nn.LayerNorm(d, eps, elementwise_affine=True):
// y = (x − mean) / √(var + eps) · weight + bias, biased variance, per row of x [rows, d].
#pragma once

#include "peft/backend/eigen_cpu.hpp"
#include "peft/errors.hpp"
#include "peft/grad_mode.hpp"
#include "peft/layer/linear.hpp"
#include "peft/nn/kernels.hpp"
#include "peft/param.hpp"
#include "peft/view.hpp"

namespace peft::nn {

/// A LayerNorm, frozen by default like every base layer (`set_requires_grad(true)` for full training).
/// Parameters "weight" (ones) and "bias" (zeros), [1, d] each, as PyTorch initialises them.
template <class T, class Backend = EigenCpu>
class LayerNorm {
 public:
  using scalar = T;
  using backend_type = Backend;
  using K = NnKernels<Backend>;

  /// Saved by forward for backward: the input view and the per-row mean and 1/std.
  struct Context {
    Index max_batch = 0;
    ConstMatrixView<T> x;
    bool has_forward = false;
    typename Backend::template buffer<compute_type_t<T>> mean, rstd;  ///< float for 16-bit storage
  };

  LayerNorm() = default;
  explicit LayerNorm(Index dim, double eps = 1e-5) : eps_(eps) {
    if (dim <= 0) throw ShapeError(detail::cat("LayerNorm: dim must be positive, got ", dim));
    if (!(eps > 0)) throw ConfigError(detail::cat("LayerNorm: eps must be positive, got ", eps));
    weight_ = detail::ParamStorage<T, Backend>::owned(1, dim);
    bias_ = detail::ParamStorage<T, Backend>::owned(1, dim);
    Backend::fill(weight_.view(), T(1));
  }

  Index dim() const noexcept { return weight_.view().cols; }
  Index in_features() const noexcept { return dim(); }
  Index out_features() const noexcept { return dim(); }
  double eps() const noexcept { return eps_; }
  MatrixView<T> weight() noexcept { return weight_.view(); }
  ConstMatrixView<T> weight() const noexcept { return weight_.view(); }
  MatrixView<T> bias() noexcept { return bias_.view(); }
  ConstMatrixView<T> bias() const noexcept { return bias_.view(); }

  void set_requires_grad(bool on) {
    requires_grad_ = on;
    if (on) {
      weight_grad_.resize(weight_.size());
      bias_grad_.resize(bias_.size());
    } else {
      weight_grad_ = {};
      bias_grad_ = {};
    }
  }
  bool requires_grad() const noexcept { return requires_grad_; }
  MatrixView<T> weight_grad() { return requires_grad_ ? weight_grad_.view(1, dim()) : MatrixView<T>{}; }
  MatrixView<T> bias_grad() { return requires_grad_ ? bias_grad_.view(1, dim()) : MatrixView<T>{}; }

  Context make_context(Index max_batch) const {
    if (max_batch <= 0) throw ShapeError(detail::cat("LayerNorm::make_context: max_batch must be positive, got ", max_batch));
    Context c;
    c.max_batch = max_batch;
    c.mean.resize(std::size_t(max_batch));
    c.rstd.resize(std::size_t(max_batch));
    return c;
  }

  /// requires: x [rows, d] with rows <= ctx.max_batch, y [rows, d] not overlapping x (x is kept for
  /// backward). ensures: y assigned.
  void forward(Context& ctx, ConstMatrixView<T> x, MatrixView<T> y) const {
    if (x.cols != dim())
      throw ShapeError(detail::cat("LayerNorm.forward: x has ", x.cols, " features, the layer normalises ", dim(), " (x is [", x.rows, ", ", x.cols, "])"));
    if (x.rows > ctx.max_batch)
      throw ShapeError(detail::cat("LayerNorm.forward: ", x.rows, " rows exceed the context's max_batch ", ctx.max_batch));
    require_shape(y, x.rows, dim(), "LayerNorm.forward: y");
    if (overlaps(x, y)) throw ShapeError("LayerNorm.forward: y overlaps x (the input is kept for backward)");
    K::layer_norm_forward(x, weight_.data(), bias_.data(), eps_, y, ctx.mean.data(), ctx.rstd.data());
    ctx.x = x;
    ctx.has_forward = true;
  }

  /// dx ([rows, d] or empty) written per `input`; weight and bias gradients per `params` when trainable.
  void backward(Context& ctx, ConstMatrixView<T> dy, MatrixView<T> dx, GradMode params = GradMode::accumulate,
                GradMode input = GradMode::overwrite) {
    if (!ctx.has_forward) throw StateError("LayerNorm.backward: the context holds no forward pass");
    require_shape(dy, ctx.x.rows, dim(), "LayerNorm.backward: dy");
    if (!dx.empty()) require_shape(dx, ctx.x.rows, dim(), "LayerNorm.backward: dx");
    const T bp = params == GradMode::accumulate ? T(1) : T(0);
    K::layer_norm_backward(ctx.x, dy, weight_.data(), ctx.mean.data(), ctx.rstd.data(), dx,
                           input == GradMode::accumulate ? T(1) : T(0), requires_grad_ ? weight_grad_.data() : nullptr,
                           requires_grad_ ? bias_grad_.data() : nullptr, bp);
  }

  template <class F>
  void visit_parameters(F&& f) {
    f(ParamRef<T>{"weight", weight_.data(), requires_grad_ ? weight_grad_.data() : nullptr, weight_.size(), requires_grad_, Backend::host_accessible});
    f(ParamRef<T>{"bias", bias_.data(), requires_grad_ ? bias_grad_.data() : nullptr, bias_.size(), requires_grad_, Backend::host_accessible});
  }
  void zero_grad() { weight_grad_.zero(); bias_grad_.zero(); }

 private:
  detail::ParamStorage<T, Backend> weight_, bias_;
  double eps_ = 1e-5;
  bool requires_grad_ = false;
  typename Backend::template buffer<T> weight_grad_, bias_grad_;
};

}  // namespace peft::nn
