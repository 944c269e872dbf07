// peft++ — the Linear base layer: y = x Wᵀ + b, with W stored [out, in] (nn.Linear) or [in, out]
// (transformers' Conv1D, PEFT's fan_in_fan_out).
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <utility>

#include "peft/backend/eigen_cpu.hpp"
#include "peft/grad_mode.hpp"
#include "peft/param.hpp"
#include "peft/rng.hpp"
#include "peft/view.hpp"

namespace peft {

/// Storage order of a linear weight.
enum class WeightLayout {
  out_in,  ///< [out, in], as torch.nn.Linear
  in_out,  ///< [in, out], as transformers' Conv1D (PEFT's fan_in_fan_out = True)
};

namespace detail {

/// A parameter tensor that a layer either owns or borrows from the user. Copies of an owned tensor are
/// deep; copies of a borrowed one share the user's memory.
template <class T, class Backend>
class ParamStorage {
 public:
  ParamStorage() = default;
  static ParamStorage owned(Index rows, Index cols) {
    ParamStorage p;
    p.own_.resize(std::size_t(rows * cols));
    p.view_ = MatrixView<T>(p.own_.data(), rows, cols);
    return p;
  }
  static ParamStorage borrowed(MatrixView<T> v) {
    if (!v.contiguous()) throw ShapeError("a borrowed parameter must be contiguous (row stride == cols)");
    ParamStorage p;
    p.view_ = v;
    return p;
  }
  ParamStorage(const ParamStorage& o) : own_(o.own_), view_(o.view_) { rebind(o); }
  ParamStorage(ParamStorage&& o) noexcept : own_(std::move(o.own_)), view_(o.view_) { o.view_ = {}; }
  ParamStorage& operator=(const ParamStorage& o) { if (this != &o) { own_ = o.own_; view_ = o.view_; rebind(o); } return *this; }
  ParamStorage& operator=(ParamStorage&& o) noexcept { own_ = std::move(o.own_); view_ = o.view_; o.view_ = {}; return *this; }

  MatrixView<T> view() noexcept { return view_; }
  ConstMatrixView<T> view() const noexcept { return view_; }
  T* data() noexcept { return view_.data; }
  const T* data() const noexcept { return view_.data; }
  std::size_t size() const noexcept { return std::size_t(view_.size()); }
  bool empty() const noexcept { return view_.size() == 0; }
  bool is_owned() const noexcept { return !own_.empty() || view_.size() == 0; }

 private:
  void rebind(const ParamStorage& o) {
    if (!o.own_.empty()) view_.data = own_.data();
  }
  typename Backend::template buffer<T> own_;
  MatrixView<T> view_;
};

}  // namespace detail

/// A fully connected layer, frozen by default (PEFT's base layer). Bound to a backend by its second
/// template argument; the layer code itself is backend-independent.
///
/// Forward assigns `y = x Wᵀ + b`. Backward writes `dx` per its `input` GradMode and, only when the layer
/// was made trainable (`set_requires_grad(true)`, full fine-tuning), `dW` and `db` per its `params` mode.
template <class T, class Backend = EigenCpu>
class Linear {
 public:
  using scalar = T;
  using backend_type = Backend;
  using input_type = ConstMatrixView<T>;  ///< what forward takes: activations [batch, in]
  template <class U>
  using rebind_backend = Linear<T, U>;

  /// Activations saved by forward for backward, and the GEMM scratch. Owned by the caller, one per
  /// forward in flight; made by `make_context`, after which forward/backward allocate nothing.
  struct Context {
    Index max_batch = 0;
    ConstMatrixView<T> x;  ///< the input of the last forward (must stay alive until backward)
    bool has_forward = false;
    typename Backend::template GemmScratch<T> scratch;
  };

  Linear() = default;

  /// An owned layer with PyTorch's default initialisation (weight and bias uniform in ±1/√in).
  Linear(Index in_features, Index out_features, bool bias, Generator& gen, WeightLayout layout = WeightLayout::out_in)
      : layout_(layout) {
    if (in_features <= 0 || out_features <= 0)
      throw ShapeError(detail::cat("Linear: in_features and out_features must be positive, got ", in_features, " and ", out_features));
    const auto [r, c] = stored_shape(in_features, out_features, layout);
    weight_ = detail::ParamStorage<T, Backend>::owned(r, c);
    const double bound = 1.0 / std::sqrt(double(in_features));
    Backend::random_uniform(gen, weight_.view(), -bound, bound);  // a backend op: on a device backend the weight is device memory
    if (bias) {
      bias_ = detail::ParamStorage<T, Backend>::owned(1, out_features);
      Backend::random_uniform(gen, bias_.view(), -bound, bound);
    }
  }

  /// A layer over the caller's memory: `weight` is [out, in] (or [in, out] for WeightLayout::in_out) and
  /// `bias` is empty or has out elements (any [1, out] or [out, 1] view). Nothing is copied; the caller
  /// keeps the memory alive. Merging an adapter writes into it.
  static Linear borrow(MatrixView<T> weight, MatrixView<T> bias = {}, WeightLayout layout = WeightLayout::out_in) {
    Linear l;
    l.layout_ = layout;
    if (weight.empty()) throw ShapeError("Linear::borrow: the weight view is empty");
    l.weight_ = detail::ParamStorage<T, Backend>::borrowed(weight);
    if (!bias.empty()) {
      if (!bias.contiguous() && !(bias.cols == 1 && bias.stride == 1))
        throw ShapeError("Linear::borrow: the bias view must be contiguous");
      if (bias.size() != l.out_features())
        throw ShapeError(detail::cat("Linear::borrow: bias has ", bias.size(), " elements, expected out_features = ", l.out_features()));
      l.bias_ = detail::ParamStorage<T, Backend>::borrowed(MatrixView<T>(bias.data, 1, bias.size()));
    }
    return l;
  }

  Index in_features() const noexcept { return layout_ == WeightLayout::out_in ? weight_.view().cols : weight_.view().rows; }
  Index out_features() const noexcept { return layout_ == WeightLayout::out_in ? weight_.view().rows : weight_.view().cols; }
  WeightLayout layout() const noexcept { return layout_; }
  bool has_bias() const noexcept { return !bias_.empty(); }

  /// The weight as stored ([out, in] or [in, out]).
  MatrixView<T> weight() noexcept { return weight_.view(); }
  ConstMatrixView<T> weight() const noexcept { return weight_.view(); }
  /// The bias as a [1, out] view (empty without bias).
  MatrixView<T> bias() noexcept { return bias_.view(); }
  ConstMatrixView<T> bias() const noexcept { return bias_.view(); }

  /// Full fine-tuning of this layer: allocates (or frees) weight and bias gradients.
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
  MatrixView<T> weight_grad() { return requires_grad_ ? weight_grad_.view(weight_.view().rows, weight_.view().cols) : MatrixView<T>{}; }
  MatrixView<T> bias_grad() { return requires_grad_ && has_bias() ? bias_grad_.view(1, out_features()) : MatrixView<T>{}; }

  Context make_context(Index max_batch) const {
    if (max_batch <= 0) throw ShapeError(detail::cat("Linear::make_context: max_batch must be positive, got ", max_batch));
    Context ctx;
    ctx.max_batch = max_batch;
    reserve(ctx.scratch, max_batch);
    return ctx;
  }
  /// Grows a scratch for every product this layer runs at batch <= max_batch.
  void reserve(typename Backend::template GemmScratch<T>& s, Index max_batch) const {
    const Index in = in_features(), out = out_features();
    s.reserve_gemm(max_batch, out, in);                                  // forward
    s.reserve_gemm(max_batch, in, out);                                  // dx
    if (layout_ == WeightLayout::out_in) s.reserve_gemm(out, in, max_batch);  // dW
    else s.reserve_gemm(in, out, max_batch);
  }

  /// y = x Wᵀ + b. requires: x is [batch, in] with batch <= ctx.max_batch, y is [batch, out] and does not
  /// overlap x. ensures: y assigned; ctx remembers x for backward.
  void forward(Context& ctx, ConstMatrixView<T> x, MatrixView<T> y) const {
    check_io(ctx, x, y, "Linear.forward");
    forward_into(ctx, x, y);
    ctx.x = x;
    ctx.has_forward = true;
  }

  /// Backward of the last forward on ctx, with upstream gradient dy [batch, out].
  /// ensures: dx ([batch, in], or empty to skip) written per `input`; when requires_grad(), dW and db
  /// written per `params`. The frozen weight never gets a gradient.
  void backward(Context& ctx, ConstMatrixView<T> dy, MatrixView<T> dx, GradMode params = GradMode::accumulate,
                GradMode input = GradMode::overwrite) {
    check_backward(ctx, dy, dx, "Linear.backward");
    backward_input(ctx, dy, dx, input == GradMode::accumulate ? T(1) : T(0));
    if (requires_grad_) backward_params(ctx, ctx.x, dy, params == GradMode::accumulate ? T(1) : T(0));
  }

  // ---- pieces used by adapted layers (no checks beyond the public entry points) -------------------

  void forward_into(Context& ctx, ConstMatrixView<T> x, MatrixView<T> y) const {
    auto& s = ctx.scratch;
    if (layout_ == WeightLayout::out_in) Backend::template gemm<Trans::no, Trans::yes>(s, T(1), x, weight_.view(), T(0), y);
    else Backend::template gemm<Trans::no, Trans::no>(s, T(1), x, weight_.view(), T(0), y);
    if (has_bias()) Backend::add_row_vector(y, bias_.data(), T(1));
  }
  void backward_input(Context& ctx, ConstMatrixView<T> dy, MatrixView<T> dx, T beta) const {
    auto& s = ctx.scratch;
    if (dx.empty()) return;
    if (layout_ == WeightLayout::out_in) Backend::template gemm<Trans::no, Trans::no>(s, T(1), dy, weight_.view(), beta, dx);
    else Backend::template gemm<Trans::no, Trans::yes>(s, T(1), dy, weight_.view(), beta, dx);
  }
  void backward_params(Context& ctx, ConstMatrixView<T> x, ConstMatrixView<T> dy, T beta) {
    auto& s = ctx.scratch;
    if (layout_ == WeightLayout::out_in) Backend::template gemm<Trans::yes, Trans::no>(s, T(1), dy, x, beta, weight_grad());
    else Backend::template gemm<Trans::yes, Trans::no>(s, T(1), x, dy, beta, weight_grad());
    if (has_bias()) Backend::sum_rows(dy, bias_grad_.data(), T(1), beta);
  }
  void check_backward(const Context& ctx, ConstMatrixView<T> dy, ConstMatrixView<T> dx, const char* where) const {
    if (!ctx.has_forward) throw StateError(detail::cat(where, ": the context holds no forward pass"));
    if (dy.rows != ctx.x.rows || dy.cols != out_features())
      throw ShapeError(detail::cat(where, ": dy: expected shape [", ctx.x.rows, ", ", out_features(), "], got [", dy.rows, ", ", dy.cols, "]"));
    if (!dx.empty() && (dx.rows != ctx.x.rows || dx.cols != in_features()))
      throw ShapeError(detail::cat(where, ": dx: expected shape [", ctx.x.rows, ", ", in_features(), "], got [", dx.rows, ", ", dx.cols, "]"));
    if (overlaps(dx, dy) || overlaps(dx, ctx.x)) throw ShapeError(detail::cat(where, ": dx overlaps dy or the saved input x"));
  }
  void check_io(const Context& ctx, ConstMatrixView<T> x, ConstMatrixView<T> y, const char* where) const {
    if (x.cols != in_features())
      throw ShapeError(detail::cat(where, ": x has ", x.cols, " features, the layer expects in_features = ", in_features(), " (x is [", x.rows, ", ", x.cols, "])"));
    if (x.rows > ctx.max_batch)
      throw ShapeError(detail::cat(where, ": batch ", x.rows, " exceeds the context's max_batch ", ctx.max_batch, "; make the context with a larger max_batch"));
    if (y.rows != x.rows || y.cols != out_features())  // the message is built only on failure: no allocation otherwise
      throw ShapeError(detail::cat(where, ": y: expected shape [", x.rows, ", ", out_features(), "], got [", y.rows, ", ", y.cols, "]"));
    if (overlaps(x, y)) throw ShapeError(detail::cat(where, ": y overlaps x"));
  }

  /// Visits the layer's parameters as ParamRef (names "weight", "bias"); trainable iff requires_grad().
  template <class F>
  void visit_parameters(F&& f) {
    f(ParamRef<T>{"weight", weight_.data(), requires_grad_ ? weight_grad_.data() : nullptr, weight_.size(), requires_grad_, Backend::host_accessible});
    if (has_bias()) f(ParamRef<T>{"bias", bias_.data(), requires_grad_ ? bias_grad_.data() : nullptr, bias_.size(), requires_grad_, Backend::host_accessible});
  }
  void zero_grad() { weight_grad_.zero(); bias_grad_.zero(); }

 private:
  static std::pair<Index, Index> stored_shape(Index in, Index out, WeightLayout l) {
    return l == WeightLayout::out_in ? std::pair{out, in} : std::pair{in, out};
  }
  WeightLayout layout_ = WeightLayout::out_in;
  detail::ParamStorage<T, Backend> weight_, bias_;
  bool requires_grad_ = false;
  typename Backend::template buffer<T> weight_grad_, bias_grad_;
};

}  // namespace peft
