// peft++ — MaxPool2d, 2-D max pooling over NCHW images, as torch.nn.MaxPool2d with padding 0, dilation 1
// and floor mode (ceil_mode = False):
//
//   y[n, c, i, j] = max_{0 <= a < kh, 0 <= b < kw} x[n, c, i·sh + a, j·sw + b]
//   Ho = (H − kh) / sh + 1,  Wo = (W − kw) / sw + 1     (integer division; trailing rows/columns are dropped)
//
// Activations are row-major [batch, C·H·W] views (each row one NCHW image), as for Conv2d; the output is
// [batch, C·Ho·Wo]. The layer has no parameters, so model walkers (peft::parameters, zero_grad, ...) skip it
// like any non-layer field. Forward stores, per output element, the index of its maximum inside the image
// (the first maximum in row-major window order; a NaN wins, the last one if several, as PyTorch's CPU kernel) in the
// caller-owned context; backward routes dy there: dx[argmax] += dy. Overlapping windows (stride < kernel)
// accumulate. After make_context, forward and backward allocate nothing.
//
// The loops are written for host memory (the CPU backend); a device backend would need its own kernel.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "peft/backend/eigen_cpu.hpp"
#include "peft/errors.hpp"
#include "peft/grad_mode.hpp"
#include "peft/view.hpp"

namespace peft {

/// The geometry of a 2-D pooling window over C channels of H×W images.
struct Pool2dGeometry {
  Index channels = 0;
  Index in_h = 0, in_w = 0;
  Index kernel_h = 2, kernel_w = 2;
  Index stride_h = 2, stride_w = 2;

  Index out_h() const noexcept { return (in_h - kernel_h) / stride_h + 1; }
  Index out_w() const noexcept { return (in_w - kernel_w) / stride_w + 1; }
  Index positions() const noexcept { return out_h() * out_w(); }
  Index in_size() const noexcept { return channels * in_h * in_w; }        ///< one input image, C·H·W
  Index out_size() const noexcept { return channels * positions(); }      ///< one output image, C·Ho·Wo

  bool same_as(const Pool2dGeometry& o) const noexcept {
    return channels == o.channels && in_h == o.in_h && in_w == o.in_w && kernel_h == o.kernel_h && kernel_w == o.kernel_w &&
           stride_h == o.stride_h && stride_w == o.stride_w;
  }
  /// Throws ShapeError naming the field when the geometry is impossible.
  void validate(const char* where) const {
    if (channels <= 0) throw ShapeError(detail::cat(where, ": channels must be positive, got ", channels));
    if (in_h <= 0 || in_w <= 0) throw ShapeError(detail::cat(where, ": input size must be positive, got ", in_h, "x", in_w));
    if (kernel_h <= 0 || kernel_w <= 0) throw ShapeError(detail::cat(where, ": kernel must be positive, got ", kernel_h, "x", kernel_w));
    if (stride_h <= 0 || stride_w <= 0) throw ShapeError(detail::cat(where, ": stride must be positive, got ", stride_h, "x", stride_w));
    if (kernel_h > in_h || kernel_w > in_w)
      throw ShapeError(detail::cat(where, ": a ", kernel_h, "x", kernel_w, " window does not fit a ", in_h, "x", in_w, " input"));
    if (in_size() > Index(std::numeric_limits<std::int32_t>::max()))
      throw ShapeError(detail::cat(where, ": an image of ", in_size(), " values is too large (argmax indices are 32-bit)"));
  }
};

template <class T, class Backend = EigenCpu>
class MaxPool2d {
 public:
  using scalar = T;
  using backend_type = Backend;

  struct Context {
    Index max_batch = 0;
    Index rows = 0;           ///< batch size of the recorded forward
    bool has_forward = false;
    Pool2dGeometry geo;       ///< the geometry the context was made for
    typename Backend::template buffer<std::int32_t> argmax;  ///< [max_batch, C·Ho·Wo], index inside the image
  };

  MaxPool2d() = default;
  explicit MaxPool2d(const Pool2dGeometry& g) : geo_(g) { geo_.validate("MaxPool2d"); }
  /// C channels of H×W images, a square kernel; stride 0 means stride = kernel (PyTorch's default).
  MaxPool2d(Index channels, Index in_h, Index in_w, Index kernel, Index stride = 0) {
    geo_.channels = channels;
    geo_.in_h = in_h;
    geo_.in_w = in_w;
    geo_.kernel_h = geo_.kernel_w = kernel;
    geo_.stride_h = geo_.stride_w = stride == 0 ? kernel : stride;
    geo_.validate("MaxPool2d");
  }

  const Pool2dGeometry& geometry() const noexcept { return geo_; }
  Index in_features() const noexcept { return geo_.in_size(); }
  Index out_features() const noexcept { return geo_.out_size(); }

  Context make_context(Index max_batch) const {
    if (max_batch <= 0) throw ShapeError(detail::cat("MaxPool2d::make_context: max_batch must be positive, got ", max_batch));
    Context ctx;
    ctx.max_batch = max_batch;
    ctx.geo = geo_;
    ctx.argmax.resize(std::size_t(max_batch * geo_.out_size()));
    return ctx;
  }

  /// y = maxpool(x). x [batch, C·H·W], y [batch, C·Ho·Wo], batch <= the context's max_batch.
  void forward(Context& ctx, ConstMatrixView<T> x, MatrixView<T> y) const {
    check_io(ctx, x, y, "MaxPool2d.forward");
    const Index c_n = geo_.channels, h = geo_.in_h, w = geo_.in_w, ho = geo_.out_h(), wo = geo_.out_w();
    const Index kh = geo_.kernel_h, kw = geo_.kernel_w, sh = geo_.stride_h, sw = geo_.stride_w;
    const Index out = geo_.out_size(), plane = h * w;
    // PyTorch's rule: a value replaces the running maximum when it is larger or NaN (so a NaN wins)
    auto better = [](T v, T m) { return (v > m) | (v != v); };  // v != v: v is NaN
    for (Index n = 0; n < x.rows; ++n) {
      const T* xn = x.data + n * x.stride;
      T* yn = y.data + n * y.stride;
      std::int32_t* an = ctx.argmax.data() + n * out;
      for (Index c = 0; c < c_n; ++c) {
        const T* xc = xn + c * plane;
        T* yc = yn + c * ho * wo;
        std::int32_t* ac = an + c * ho * wo;
        for (Index i = 0; i < ho; ++i) {
          const Index top = i * sh * w;  // first input row of this output row
          if (kh == 2 && kw == 2 && sw == 2) {  // the common 2×2 window: unrolled
            const T* r0 = xc + top;
            const T* r1 = r0 + w;
            for (Index j = 0; j < wo; ++j) {
              const Index k = 2 * j;
              // selects instead of branches: which element is the maximum is data-dependent and unpredictable
              T m = r0[k];
              Index best = top + k;
              bool g = better(r0[k + 1], m);
              m = g ? r0[k + 1] : m, best = g ? top + k + 1 : best;
              g = better(r1[k], m);
              m = g ? r1[k] : m, best = g ? top + w + k : best;
              g = better(r1[k + 1], m);
              m = g ? r1[k + 1] : m, best = g ? top + w + k + 1 : best;
              yc[i * wo + j] = m;
              ac[i * wo + j] = std::int32_t(c * plane + best);
            }
            continue;
          }
          for (Index j = 0; j < wo; ++j) {
            Index best = top + j * sw;
            T m = xc[best];
            for (Index a = 0; a < kh; ++a) {
              const Index row = top + a * w + j * sw;
              for (Index b = 0; b < kw; ++b)
                if (better(xc[row + b], m)) m = xc[row + b], best = row + b;
            }
            yc[i * wo + j] = m;
            ac[i * wo + j] = std::int32_t(c * plane + best);
          }
        }
      }
    }
    ctx.rows = x.rows;
    ctx.has_forward = true;
  }

  /// dx from dy for the forward recorded in ctx. `input` = overwrite assigns dx (zeros where no maximum
  /// was, never reading dx), accumulate adds to it. `params` is accepted for the uniform layer signature;
  /// the layer has no parameters. An empty dx does nothing.
  void backward(Context& ctx, ConstMatrixView<T> dy, MatrixView<T> dx, GradMode params = GradMode::accumulate,
                GradMode input = GradMode::overwrite) const {
    (void)params;
    check_backward(ctx, dy, dx, "MaxPool2d.backward");
    if (dx.empty()) return;
    const Index out = geo_.out_size(), in = geo_.in_size();
    for (Index n = 0; n < dy.rows; ++n) {
      T* dxn = dx.data + n * dx.stride;
      const T* dyn = dy.data + n * dy.stride;
      const std::int32_t* an = ctx.argmax.data() + n * out;
      if (input == GradMode::overwrite)
        for (Index k = 0; k < in; ++k) dxn[k] = T(0);
      for (Index o = 0; o < out; ++o) dxn[an[o]] += dyn[o];
    }
  }

  void check_io(const Context& ctx, ConstMatrixView<T> x, ConstMatrixView<T> y, const char* where) const {
    if (!ctx.geo.same_as(geo_) || ctx.max_batch <= 0)
      throw StateError(detail::cat(where, ": the context was not made by this layer's make_context() (or for another geometry)"));
    if (x.cols != in_features())
      throw ShapeError(detail::cat(where, ": x has ", x.cols, " values per image, the layer expects C·H·W = ", geo_.channels, "·", geo_.in_h, "·",
                                   geo_.in_w, " = ", in_features()));
    if (x.rows > ctx.max_batch) throw ShapeError(detail::cat(where, ": batch ", x.rows, " exceeds the context's max_batch ", ctx.max_batch));
    if (y.rows != x.rows || y.cols != out_features())
      throw ShapeError(detail::cat(where, ": y: expected shape [", x.rows, ", ", out_features(), "] (C·Ho·Wo = ", geo_.channels, "·", geo_.out_h(), "·",
                                   geo_.out_w(), "), got [", y.rows, ", ", y.cols, "]"));
    if (overlaps(x, y)) throw ShapeError(detail::cat(where, ": y overlaps x"));
  }
  void check_backward(const Context& ctx, ConstMatrixView<T> dy, ConstMatrixView<T> dx, const char* where) const {
    if (!ctx.geo.same_as(geo_)) throw StateError(detail::cat(where, ": the context was made for another geometry; call make_context() again"));
    if (!ctx.has_forward) throw StateError(detail::cat(where, ": the context holds no forward pass"));
    if (dy.rows != ctx.rows || dy.cols != out_features())
      throw ShapeError(detail::cat(where, ": dy: expected shape [", ctx.rows, ", ", out_features(), "], got [", dy.rows, ", ", dy.cols, "]"));
    if (!dx.empty() && (dx.rows != ctx.rows || dx.cols != in_features()))
      throw ShapeError(detail::cat(where, ": dx: expected shape [", ctx.rows, ", ", in_features(), "], got [", dx.rows, ", ", dx.cols, "]"));
    if (overlaps(dx, dy)) throw ShapeError(detail::cat(where, ": dx overlaps dy"));
  }

 private:
  Pool2dGeometry geo_;
};

}  // namespace peft
