// peft++ — GELU, exact (erf) or tanh-approximated, as torch.nn.GELU(approximate="none" | "tanh").
#pragma once

#include "peft/backend/eigen_cpu.hpp"
#include "peft/errors.hpp"
#include "peft/grad_mode.hpp"
#include "peft/nn/kernels.hpp"
#include "peft/view.hpp"

namespace peft::nn {

/// GELU on activations [rows, cols]. No parameters (model walkers skip it).
template <class T, class Backend = EigenCpu>
class Gelu {
 public:
  using scalar = T;
  using backend_type = Backend;
  using K = NnKernels<Backend>;

  struct Context {
    Index max_batch = 0;
    ConstMatrixView<T> x;
    bool has_forward = false;
  };

  Gelu() = default;
  explicit Gelu(GeluApproximate approximate) : approximate_(approximate) {}
  GeluApproximate approximate() const noexcept { return approximate_; }

  Context make_context(Index max_batch) const {
    if (max_batch <= 0) throw ShapeError(detail::cat("Gelu::make_context: max_batch must be positive, got ", max_batch));
    Context c;
    c.max_batch = max_batch;
    return c;
  }
  /// y = gelu(x). requires: y has x's shape and does not overlap it (x is kept for backward).
  void forward(Context& ctx, ConstMatrixView<T> x, MatrixView<T> y) const {
    if (x.rows > ctx.max_batch) throw ShapeError(detail::cat("Gelu.forward: ", x.rows, " rows exceed the context's max_batch ", ctx.max_batch));
    require_shape(y, x.rows, x.cols, "Gelu.forward: y");
    if (overlaps(x, y)) throw ShapeError("Gelu.forward: y overlaps x (the input is kept for backward)");
    K::gelu_forward(x, y, approximate_);
    ctx.x = x;
    ctx.has_forward = true;
  }
  /// dx = dy ⊙ gelu'(x), written per `input`.
  void backward(Context& ctx, ConstMatrixView<T> dy, MatrixView<T> dx, GradMode input = GradMode::overwrite) const {
    if (!ctx.has_forward) throw StateError("Gelu.backward: the context holds no forward pass");
    require_shape(dy, ctx.x.rows, ctx.x.cols, "Gelu.backward: dy");
    require_shape(dx, ctx.x.rows, ctx.x.cols, "Gelu.backward: dx");
    K::gelu_backward(ctx.x, dy, dx, input == GradMode::accumulate ? T(1) : T(0), approximate_);
  }

 private:
  GeluApproximate approximate_ = GeluApproximate::none;  // torch.nn.GELU()'s default
};

}  // namespace peft::nn
