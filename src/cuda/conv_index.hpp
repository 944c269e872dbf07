// peft++ — the index arithmetic of the CUDA backend's im2col and col2im kernels, as plain functions of one
// element. Host and device share them: tests/unit/test_conv2d.cpp runs them on the CPU against EigenCpu's
// im2col/col2im, so the kernels' indexing is checked on machines without a GPU.
#pragma once

#include "peft/conv_geometry.hpp"

#if defined(__CUDACC__)
#define PEFT_HOST_DEVICE __host__ __device__
#else
#define PEFT_HOST_DEVICE
#endif

namespace peft::cuda::detail {

/// A Conv2dGeometry with its output size computed on the host, passed to kernels by value.
struct ConvShape {
  Index C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
  static ConvShape of(const Conv2dGeometry& g) {
    return {g.in_channels, g.in_h,     g.in_w,       g.kernel_h,   g.kernel_w, g.stride_h, g.stride_w,
            g.pad_h,       g.pad_w,    g.dilation_h, g.dilation_w, g.out_h(),  g.out_w()};
  }
};

/// cols[r, p] of one image x [C·H·W]: r = (c·kh + ki)·kw + kj, p = oh·Wo + ow; zero outside the padded border.
template <class T>
PEFT_HOST_DEVICE inline T im2col_at(const ConvShape& s, const T* x, Index r, Index p) {
  const Index kj = r % s.kw, ki = (r / s.kw) % s.kh, c = r / (s.kw * s.kh);
  const Index oh = p / s.Wo, ow = p % s.Wo;
  const Index ih = oh * s.sh - s.ph + ki * s.dh, iw = ow * s.sw - s.pw + kj * s.dw;
  return (ih >= 0 && ih < s.H && iw >= 0 && iw < s.W) ? x[(c * s.H + ih) * s.W + iw] : T{};  // T{}: zero bits, also for bf16/half
}

/// acc + the patch gradients that read input element (c, ih, iw), from dcols [C·kh·kw, Ho·Wo] (row stride ld),
/// added in the order of ki, then kj: the order in which EigenCpu::col2im adds them to that element. `load`
/// turns a stored element into the accumulator's type (float for 16-bit storage).
template <class T, class A, class Load>
PEFT_HOST_DEVICE inline A col2im_at(const ConvShape& s, const T* dcols, Index ld, Index c, Index ih, Index iw, A acc, Load load) {
  for (Index ki = 0; ki < s.kh; ++ki) {
    const Index th = ih + s.ph - ki * s.dh;  // = oh · sh for the output row that reads (ih) through ki
    if (th < 0 || th % s.sh != 0 || th / s.sh >= s.Ho) continue;
    const Index oh = th / s.sh;
    for (Index kj = 0; kj < s.kw; ++kj) {
      const Index tw = iw + s.pw - kj * s.dw;
      if (tw < 0 || tw % s.sw != 0 || tw / s.sw >= s.Wo) continue;
      acc += load(dcols[((c * s.kh + ki) * s.kw + kj) * ld + oh * s.Wo + tw / s.sw]);
    }
  }
  return acc;
}
template <class T>
PEFT_HOST_DEVICE inline T col2im_at(const ConvShape& s, const T* dcols, Index ld, Index c, Index ih, Index iw, T acc) {
  return col2im_at(s, dcols, ld, c, ih, iw, acc, [](T v) { return v; });
}

}  // namespace peft::cuda::detail
