// peft++ — the geometry of a 2-D convolution (NCHW, groups = 1), shared by the Conv2d layer, the adapters
// on it and the backends' im2col / col2im.
#pragma once

#include "peft/errors.hpp"
#include "peft/view.hpp"

namespace peft {

struct Conv2dGeometry {
  Index in_channels = 0, out_channels = 0;
  Index kernel_h = 1, kernel_w = 1;
  Index stride_h = 1, stride_w = 1;
  Index pad_h = 0, pad_w = 0;
  Index dilation_h = 1, dilation_w = 1;
  Index in_h = 0, in_w = 0;  ///< input spatial size (fixed per layer; `Conv2d::set_input_size` changes it)

  Index out_h() const noexcept { return (in_h + 2 * pad_h - dilation_h * (kernel_h - 1) - 1) / stride_h + 1; }
  Index out_w() const noexcept { return (in_w + 2 * pad_w - dilation_w * (kernel_w - 1) - 1) / stride_w + 1; }
  Index patch() const noexcept { return in_channels * kernel_h * kernel_w; }    ///< im2col rows: C·kh·kw
  Index positions() const noexcept { return out_h() * out_w(); }                ///< im2col columns: Ho·Wo
  Index in_size() const noexcept { return in_channels * in_h * in_w; }          ///< one input image, C·H·W
  Index out_size() const noexcept { return out_channels * positions(); }        ///< one output image, O·Ho·Wo

  bool same_as(const Conv2dGeometry& o) const noexcept {
    return in_channels == o.in_channels && out_channels == o.out_channels && kernel_h == o.kernel_h && kernel_w == o.kernel_w &&
           stride_h == o.stride_h && stride_w == o.stride_w && pad_h == o.pad_h && pad_w == o.pad_w && dilation_h == o.dilation_h &&
           dilation_w == o.dilation_w && in_h == o.in_h && in_w == o.in_w;
  }
  /// Throws ShapeError naming the field when the geometry is impossible.
  void validate(const char* where) const {
    if (in_channels <= 0 || out_channels <= 0) throw ShapeError(detail::cat(where, ": channels must be positive, got ", in_channels, " -> ", out_channels));
    if (kernel_h <= 0 || kernel_w <= 0) throw ShapeError(detail::cat(where, ": kernel must be positive, got ", kernel_h, "x", kernel_w));
    if (stride_h <= 0 || stride_w <= 0) throw ShapeError(detail::cat(where, ": stride must be positive, got ", stride_h, "x", stride_w));
    if (dilation_h <= 0 || dilation_w <= 0) throw ShapeError(detail::cat(where, ": dilation must be positive, got ", dilation_h, "x", dilation_w));
    if (pad_h < 0 || pad_w < 0) throw ShapeError(detail::cat(where, ": padding must be >= 0, got ", pad_h, "x", pad_w));
    if (in_h <= 0 || in_w <= 0) throw ShapeError(detail::cat(where, ": input size must be positive, got ", in_h, "x", in_w));
    if (in_h + 2 * pad_h < dilation_h * (kernel_h - 1) + 1 || in_w + 2 * pad_w < dilation_w * (kernel_w - 1) + 1)
      throw ShapeError(detail::cat(where, ": a ", kernel_h, "x", kernel_w, " kernel (dilation ", dilation_h, "x", dilation_w, ") does not fit a ", in_h,
                                   "x", in_w, " input with padding ", pad_h, "x", pad_w));
  }
};

}  // namespace peft
