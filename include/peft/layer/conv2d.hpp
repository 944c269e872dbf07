// peft++ — the Conv2d base layer (NCHW, groups = 1), as torch.nn.Conv2d, computed per image as
// im2col followed by one GEMM: y_n [O, Ho·Wo] = W [O, C·kh·kw] · cols(x_n) + b.
//
// Activations are row-major [batch, C·H·W] views (each row one NCHW image, exactly PyTorch's memory
// layout); the weight is [O, C·kh·kw], the memory layout of PyTorch's (O, C, kh, kw). The input spatial
// size is part of the layer (its in_features() is C·H·W), so a context is sized once.
#pragma once

#include <cmath>

#include "peft/backend/eigen_cpu.hpp"
#include "peft/conv_geometry.hpp"
#include "peft/grad_mode.hpp"
#include "peft/layer/linear.hpp"
#include "peft/param.hpp"
#include "peft/rng.hpp"
#include "peft/view.hpp"

namespace peft {

template <class T, class Backend = EigenCpu>
class Conv2d {
 public:
  using scalar = T;
  using backend_type = Backend;
  using input_type = ConstMatrixView<T>;

  struct Context {
    Index max_batch = 0;
    ConstMatrixView<T> x;
    bool has_forward = false;
    typename Backend::template GemmScratch<T> scratch;
    typename Backend::template buffer<T> cols;   ///< im2col of one image, [C·kh·kw, Ho·Wo]
    typename Backend::template buffer<T> dcols;  ///< the gradient w.r.t. one image's columns, [C·kh·kw, Ho·Wo]
    Conv2dGeometry geo;                          ///< the geometry the context was made for
    Index cols_image = -1;                       ///< the image of `cols_x` whose columns `cols` still holds (-1: none)
    const T* cols_x = nullptr;
  };
  /// Adapted<Conv2d, ...> runs its adapters on the base's columns (forward_into / backward_images with a per-image callback).
  static constexpr bool per_image = true;

  Conv2d() = default;
  /// An owned layer with PyTorch's default initialisation (weight and bias uniform in ±1/√(C·kh·kw)).
  Conv2d(const Conv2dGeometry& g, bool bias, Generator& gen) : geo_(g) {
    geo_.validate("Conv2d");
    weight_ = detail::ParamStorage<T, Backend>::owned(g.out_channels, g.patch());
    const double bound = 1.0 / std::sqrt(double(g.patch()));
    Backend::random_uniform(gen, flat(weight_), -bound, bound);
    if (bias) {
      bias_ = detail::ParamStorage<T, Backend>::owned(1, g.out_channels);
      Backend::random_uniform(gen, flat(bias_), -bound, bound);
    }
  }
  /// A layer over the caller's memory: weight [O, C·kh·kw] (PyTorch's (O, C, kh, kw) as is), bias empty or O.
  static Conv2d borrow(const Conv2dGeometry& g, MatrixView<T> weight, MatrixView<T> bias = {}) {
    Conv2d c;
    c.geo_ = g;
    c.geo_.validate("Conv2d::borrow");
    require_shape(weight, g.out_channels, g.patch(), "Conv2d::borrow: weight");
    c.weight_ = detail::ParamStorage<T, Backend>::borrowed(weight);
    if (!bias.empty()) {
      if (!bias.contiguous() && !(bias.cols == 1 && bias.stride == 1)) throw ShapeError("Conv2d::borrow: the bias view must be contiguous");
      if (bias.size() != g.out_channels)
        throw ShapeError(detail::cat("Conv2d::borrow: bias has ", bias.size(), " elements, expected out_channels = ", g.out_channels));
      c.bias_ = detail::ParamStorage<T, Backend>::borrowed(MatrixView<T>(bias.data, 1, bias.size()));
    }
    return c;
  }

  const Conv2dGeometry& geometry() const noexcept { return geo_; }
  /// Changes the input spatial size (contexts must be made again).
  void set_input_size(Index h, Index w) {
    Conv2dGeometry g = geo_;
    g.in_h = h;
    g.in_w = w;
    g.validate("Conv2d::set_input_size");
    geo_ = g;
  }
  Index in_features() const noexcept { return geo_.in_size(); }
  Index out_features() const noexcept { return geo_.out_size(); }
  WeightLayout layout() const noexcept { return WeightLayout::out_in; }
  bool has_bias() const noexcept { return !bias_.empty(); }
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
  MatrixView<T> weight_grad() { return requires_grad_ ? weight_grad_.view(geo_.out_channels, geo_.patch()) : MatrixView<T>{}; }
  MatrixView<T> bias_grad() { return requires_grad_ && has_bias() ? bias_grad_.view(1, geo_.out_channels) : MatrixView<T>{}; }

  Context make_context(Index max_batch) const {
    if (max_batch <= 0) throw ShapeError(detail::cat("Conv2d::make_context: max_batch must be positive, got ", max_batch));
    Context ctx;
    ctx.max_batch = max_batch;
    ctx.geo = geo_;
    ctx.cols.resize(std::size_t(geo_.patch() * geo_.positions()));
    ctx.dcols.resize(std::size_t(geo_.patch() * geo_.positions()));
    const Index o = geo_.out_channels, k = geo_.patch(), p = geo_.positions();
    ctx.scratch.reserve_gemm(o, p, k);  // forward
    ctx.scratch.reserve_gemm(k, p, o);  // dcols
    ctx.scratch.reserve_gemm(o, k, p);  // dW
    return ctx;
  }

  void forward(Context& ctx, ConstMatrixView<T> x, MatrixView<T> y) const {
    check_io(ctx, x, y, "Conv2d.forward");
    forward_into(ctx, x, y);
    ctx.x = x;
    ctx.has_forward = true;
  }
  void backward(Context& ctx, ConstMatrixView<T> dy, MatrixView<T> dx, GradMode params = GradMode::accumulate,
                GradMode input = GradMode::overwrite) {
    check_backward(ctx, dy, dx, "Conv2d.backward");
    backward_images(ctx, ctx.x, dy, dx, input == GradMode::accumulate ? T(1) : T(0), params == GradMode::accumulate ? T(1) : T(0), false,
                    [](Index, ConstMatrixView<T>, MatrixView<T>, bool) {});
  }

  // ---- pieces used by adapted layers -------------------------------------------------------------------
  /// The [O, Ho·Wo] view of image n of an output batch y.
  static MatrixView<T> image(MatrixView<T> y, Index n, Index channels, Index positions) { return MatrixView<T>(y.data + n * y.stride, channels, positions); }
  static ConstMatrixView<T> image(ConstMatrixView<T> y, Index n, Index channels, Index positions) {
    return ConstMatrixView<T>(y.data + n * y.stride, channels, positions);
  }

  void forward_into(Context& ctx, ConstMatrixView<T> x, MatrixView<T> y) const {
    forward_into(ctx, x, y, [](Index, ConstMatrixView<T>) {});
  }
  /// forward_into, calling per_image(n, cols) after image n's product, with cols = im2col(x_n) [C·kh·kw, Ho·Wo]:
  /// adapters that see the same input add their terms from the same columns (one im2col per image in all).
  /// `weight` (empty: the layer's) replaces W in the product: adapters that fold their ΔW into it (W + ΔW).
  template <class F>
  void forward_into(Context& ctx, ConstMatrixView<T> x, MatrixView<T> y, F&& per_image, ConstMatrixView<T> weight = {}) const {
    const Index k = geo_.patch(), p = geo_.positions(), o = geo_.out_channels;
    const ConstMatrixView<T> w = weight.empty() ? ConstMatrixView<T>(weight_.view()) : weight;
    auto cols = ctx.cols.view(k, p);
    for (Index n = 0; n < x.rows; ++n) {
      Backend::im2col(geo_, x.data + n * x.stride, cols);
      auto yn = image(y, n, o, p);
      Backend::template gemm<Trans::no, Trans::no>(ctx.scratch, T(1), w, ConstMatrixView<T>(cols), T(0), yn);
      if (has_bias()) Backend::add_col_vector(yn, bias_.data(), T(1));
      per_image(n, ConstMatrixView<T>(cols));
    }
    ctx.cols_image = x.rows - 1;  // the last image's columns stay for backward_images
    ctx.cols_x = x.data;
  }
  /// One pass over the images (last first) for the base's backward and the adapters sharing its input x (the input
  /// of the last forward on ctx): per image n, dcols = Wᵀ·dy_n (when dx is wanted), cols = im2col(x_n) (when
  /// `need_cols` or the weight is trainable; the last image's columns are kept from forward), the weight and bias
  /// gradients (params_beta for the first image processed), then per_image(n, cols, dcols, first), which may add its
  /// terms to dcols, and one col2im of dcols into dx_n (dx = input_beta · dx + ...). cols and dcols are empty views
  /// when not computed. `weight` (empty: the layer's) is the W of dcols = Wᵀ·dy_n: the W + ΔW of a forward_into
  /// that folded adapters into its product (the weight gradient is the same either way).
  template <class F>
  void backward_images(Context& ctx, ConstMatrixView<T> x, ConstMatrixView<T> dy, MatrixView<T> dx, T input_beta, T params_beta,
                       bool need_cols, F&& per_image, ConstMatrixView<T> weight = {}) {
    const Index k = geo_.patch(), p = geo_.positions(), o = geo_.out_channels;
    const ConstMatrixView<T> w = weight.empty() ? ConstMatrixView<T>(weight_.view()) : weight;
    const bool want_cols = need_cols || requires_grad_;
    auto cols = ctx.cols.view(k, p);
    auto dcols = ctx.dcols.view(k, p);
    if (requires_grad_ && dy.rows == 0 && params_beta == T(0)) zero_grad();
    for (Index n = dy.rows - 1; n >= 0; --n) {
      const bool first = n == dy.rows - 1;
      const auto dyn = image(dy, n, o, p);
      if (!dx.empty()) Backend::template gemm<Trans::yes, Trans::no>(ctx.scratch, T(1), w, dyn, T(0), dcols);
      if (want_cols && !(n == ctx.cols_image && x.data == ctx.cols_x)) {
        Backend::im2col(geo_, x.data + n * x.stride, cols);
        ctx.cols_image = n;
        ctx.cols_x = x.data;
      }
      if (requires_grad_) {
        const T b = first ? params_beta : T(1);
        Backend::template gemm<Trans::no, Trans::yes>(ctx.scratch, T(1), dyn, ConstMatrixView<T>(cols), b, weight_grad());
        if (has_bias()) Backend::sum_cols(dyn, bias_grad_.data(), T(1), b);
      }
      per_image(n, want_cols ? ConstMatrixView<T>(cols) : ConstMatrixView<T>{}, dx.empty() ? MatrixView<T>{} : dcols, first);
      if (!dx.empty()) Backend::col2im(geo_, ConstMatrixView<T>(dcols), input_beta, dx.data + n * dx.stride);
    }
  }
  void backward_input(Context& ctx, ConstMatrixView<T> dy, MatrixView<T> dx, T beta) const {
    if (dx.empty()) return;
    const Index k = geo_.patch(), p = geo_.positions(), o = geo_.out_channels;
    auto dcols = ctx.dcols.view(k, p);
    for (Index n = 0; n < dy.rows; ++n) {
      Backend::template gemm<Trans::yes, Trans::no>(ctx.scratch, T(1), weight_.view(), image(dy, n, o, p), T(0), dcols);
      Backend::col2im(geo_, ConstMatrixView<T>(dcols), beta, dx.data + n * dx.stride);
    }
  }
  void backward_params(Context& ctx, ConstMatrixView<T> x, ConstMatrixView<T> dy, T beta) {
    const Index k = geo_.patch(), p = geo_.positions(), o = geo_.out_channels;
    auto cols = ctx.cols.view(k, p);
    ctx.cols_image = -1;
    for (Index n = 0; n < x.rows; ++n) {
      Backend::im2col(geo_, x.data + n * x.stride, cols);
      const T b = n == 0 ? beta : T(1);
      Backend::template gemm<Trans::no, Trans::yes>(ctx.scratch, T(1), image(dy, n, o, p), ConstMatrixView<T>(cols), b, weight_grad());
      if (has_bias()) Backend::sum_cols(image(dy, n, o, p), bias_grad_.data(), T(1), b);
    }
  }
  void check_io(const Context& ctx, ConstMatrixView<T> x, ConstMatrixView<T> y, const char* where) const {
    if (x.cols != in_features())
      throw ShapeError(detail::cat(where, ": x has ", x.cols, " values per image, the layer expects C·H·W = ", geo_.in_channels, "·", geo_.in_h, "·",
                                   geo_.in_w, " = ", in_features()));
    if (x.rows > ctx.max_batch)
      throw ShapeError(detail::cat(where, ": batch ", x.rows, " exceeds the context's max_batch ", ctx.max_batch));
    if (!ctx.geo.same_as(geo_))
      throw StateError(detail::cat(where, ": the context was made for another input size; call make_context() again"));
    if (overlaps(x, y)) throw ShapeError(detail::cat(where, ": y overlaps x"));
    if (y.rows != x.rows || y.cols != out_features())
      throw ShapeError(detail::cat(where, ": y: expected shape [", x.rows, ", ", out_features(), "] (O·Ho·Wo = ", geo_.out_channels, "·", geo_.out_h(),
                                   "·", geo_.out_w(), "), got [", y.rows, ", ", y.cols, "]"));
  }
  void check_backward(const Context& ctx, ConstMatrixView<T> dy, ConstMatrixView<T> dx, const char* where) const {
    if (!ctx.has_forward) throw StateError(detail::cat(where, ": the context holds no forward pass"));
    if (dy.rows != ctx.x.rows || dy.cols != out_features())
      throw ShapeError(detail::cat(where, ": dy: expected shape [", ctx.x.rows, ", ", out_features(), "], got [", dy.rows, ", ", dy.cols, "]"));
    if (!dx.empty() && (dx.rows != ctx.x.rows || dx.cols != in_features()))
      throw ShapeError(detail::cat(where, ": dx: expected shape [", ctx.x.rows, ", ", in_features(), "], got [", dx.rows, ", ", dx.cols, "]"));
    if (overlaps(dx, dy) || overlaps(dx, ctx.x)) throw ShapeError(detail::cat(where, ": dx overlaps dy or the saved input x"));
  }

  template <class F>
  void visit_parameters(F&& f) {
    f(ParamRef<T>{"weight", weight_.data(), requires_grad_ ? weight_grad_.data() : nullptr, weight_.size(), requires_grad_, Backend::host_accessible});
    if (has_bias()) f(ParamRef<T>{"bias", bias_.data(), requires_grad_ ? bias_grad_.data() : nullptr, bias_.size(), requires_grad_, Backend::host_accessible});
  }
  void zero_grad() {
    weight_grad_.zero();
    bias_grad_.zero();
  }

 private:
  Conv2dGeometry geo_;
  detail::ParamStorage<T, Backend> weight_, bias_;
  bool requires_grad_ = false;
  typename Backend::template buffer<T> weight_grad_, bias_grad_;
};

}  // namespace peft
