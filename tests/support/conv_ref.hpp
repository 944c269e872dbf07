// Test helpers for Conv2d: a geometry in one call, and the convolution written from its definition.
#pragma once

#include <peft/conv_geometry.hpp>

#include "test_util.hpp"

namespace peft::test {

inline Conv2dGeometry geo(Index c, Index o, Index k, Index s, Index p, Index d, Index h, Index w) {
  Conv2dGeometry g;
  g.in_channels = c;
  g.out_channels = o;
  g.kernel_h = g.kernel_w = k;
  g.stride_h = g.stride_w = s;
  g.pad_h = g.pad_w = p;
  g.dilation_h = g.dilation_w = d;
  g.in_h = h;
  g.in_w = w;
  return g;
}

/// The definition: y[n, o, i, j] = b[o] + Σ_{c, ki, kj} W[o, c, ki, kj] · x[n, c, i·s − p + ki·d, j·s − p + kj·d].
inline Mat<double> direct_conv(const Conv2dGeometry& g, const Mat<double>& x, const Mat<double>& w, const Mat<double>& b) {
  const Index ho = g.out_h(), wo = g.out_w();
  Mat<double> y = Mat<double>::Zero(x.rows(), g.out_channels * ho * wo);
  for (Index n = 0; n < x.rows(); ++n)
    for (Index o = 0; o < g.out_channels; ++o)
      for (Index i = 0; i < ho; ++i)
        for (Index j = 0; j < wo; ++j) {
          double acc = b.size() ? b(0, o) : 0.0;
          for (Index c = 0; c < g.in_channels; ++c)
            for (Index ki = 0; ki < g.kernel_h; ++ki)
              for (Index kj = 0; kj < g.kernel_w; ++kj) {
                const Index ih = i * g.stride_h - g.pad_h + ki * g.dilation_h, iw = j * g.stride_w - g.pad_w + kj * g.dilation_w;
                if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) continue;
                acc += w(o, (c * g.kernel_h + ki) * g.kernel_w + kj) * x(n, (c * g.in_h + ih) * g.in_w + iw);
              }
          y(n, (o * ho + i) * wo + j) = acc;
        }
  return y;
}

}  // namespace peft::test
