// peft++ — element-wise and row-wise kernels of the transformer building blocks (LayerNorm, GELU, masked
// causal softmax), per backend. `NnKernels<Backend>` is specialised for every backend; the blocks in
// peft/nn/ call only these and the backend's own operations (gemm, copy, axpby, ...), so a new backend
// provides a specialisation next to its policy and nothing in the blocks changes.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <type_traits>

#include "peft/backend/eigen_cpu.hpp"
#include "peft/backend/nn_kernels.hpp"
#include "peft/half.hpp"
#include "peft/view.hpp"

namespace peft::nn {

/// The CPU kernels. Every function works on row-major views and allocates nothing.
template <>
struct NnKernels<EigenCpu> {
  /// y = (x − mean) · rstd · gamma + beta per row; mean[i] and rstd[i] = 1/√(var + eps) are saved in
  /// compute_type_t<T> (float for 16-bit storage, as PyTorch saves them) (biased variance, as
  /// torch.nn.LayerNorm). Accumulates in double for float inputs.
  template <class T>
  static void layer_norm_forward(ConstMatrixView<T> x, const T* gamma, const T* beta, double eps, MatrixView<T> y, compute_type_t<T>* mean,
                                 compute_type_t<T>* rstd) {
    using Acc = std::conditional_t<std::is_same_v<T, float>, double, T>;
    const Index d = x.cols;
    for (Index i = 0; i < x.rows; ++i) {
      const T* xr = x.data + i * x.stride;
      Acc s = 0;
      for (Index j = 0; j < d; ++j) s += Acc(xr[j]);
      const Acc mu = s / Acc(d);
      Acc v = 0;
      for (Index j = 0; j < d; ++j) v += (Acc(xr[j]) - mu) * (Acc(xr[j]) - mu);
      const Acc r = Acc(1) / std::sqrt(v / Acc(d) + Acc(eps));
      mean[i] = compute_type_t<T>(mu);
      rstd[i] = compute_type_t<T>(r);
      T* yr = y.data + i * y.stride;
      for (Index j = 0; j < d; ++j) yr[j] = T((Acc(xr[j]) - mu) * r) * gamma[j] + beta[j];
    }
  }

  /// dx = beta_dx · dx + rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)), g = dy ⊙ gamma, x̂ = (x − mean) · rstd.
  /// When dgamma is non-null: dgamma = beta_p · dgamma + Σ_rows dy ⊙ x̂ and dbeta = beta_p · dbeta + Σ_rows dy
  /// (beta == 0 never reads the old values).
  template <class T>
  static void layer_norm_backward(ConstMatrixView<T> x, ConstMatrixView<T> dy, const T* gamma, const compute_type_t<T>* mean,
                                  const compute_type_t<T>* rstd, MatrixView<T> dx, T beta_dx, T* dgamma, T* dbeta, T beta_p) {
    using Acc = std::conditional_t<std::is_same_v<T, float>, double, T>;
    const Index d = x.cols;
    if (dgamma) {
      for (Index j = 0; j < d; ++j) {
        dgamma[j] = beta_p == T(0) ? T(0) : beta_p * dgamma[j];
        if (dbeta) dbeta[j] = beta_p == T(0) ? T(0) : beta_p * dbeta[j];
      }
    }
    for (Index i = 0; i < x.rows; ++i) {
      const T* xr = x.data + i * x.stride;
      const T* gr = dy.data + i * dy.stride;
      const Acc mu = mean[i], r = rstd[i];
      if (dgamma)
        for (Index j = 0; j < d; ++j) {
          dgamma[j] += T(Acc(gr[j]) * (Acc(xr[j]) - mu) * r);
          if (dbeta) dbeta[j] += gr[j];
        }
      if (dx.empty()) continue;
      Acc mg = 0, mgx = 0;
      for (Index j = 0; j < d; ++j) {
        const Acc g = Acc(gr[j]) * Acc(gamma[j]);
        mg += g;
        mgx += g * (Acc(xr[j]) - mu) * r;
      }
      mg /= Acc(d);
      mgx /= Acc(d);
      T* dr = dx.data + i * dx.stride;
      for (Index j = 0; j < d; ++j) {
        const Acc g = Acc(gr[j]) * Acc(gamma[j]);
        const T v = T(r * (g - mg - (Acc(xr[j]) - mu) * r * mgx));
        dr[j] = beta_dx == T(0) ? v : beta_dx * dr[j] + v;
      }
    }
  }

  template <class T>
  static T gelu(T x, GeluApproximate a) {
    if (a == GeluApproximate::none) return T(0.5) * x * (T(1) + std::erf(x * T(std::numbers::sqrt2 / 2)));
    const T k = T(std::sqrt(2.0 / std::numbers::pi));
    return T(0.5) * x * (T(1) + std::tanh(k * (x + T(0.044715) * x * x * x)));
  }
  template <class T>
  static T gelu_grad(T x, GeluApproximate a) {
    if (a == GeluApproximate::none) {
      const T cdf = T(0.5) * (T(1) + std::erf(x * T(std::numbers::sqrt2 / 2)));
      const T pdf = std::exp(T(-0.5) * x * x) * T(0.5 * std::numbers::inv_sqrtpi * std::numbers::sqrt2);
      return cdf + x * pdf;
    }
    const T k = T(std::sqrt(2.0 / std::numbers::pi));
    const T t = std::tanh(k * (x + T(0.044715) * x * x * x));
    return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * k * (T(1) + T(3 * 0.044715) * x * x);
  }
  /// y = gelu(x).
  template <class T>
  static void gelu_forward(ConstMatrixView<T> x, MatrixView<T> y, GeluApproximate a) {
    for (Index i = 0; i < x.rows; ++i)
      for (Index j = 0; j < x.cols; ++j) y(i, j) = gelu(x(i, j), a);
  }
  /// dx = beta · dx + dy ⊙ gelu'(x) (beta == 0 does not read dx).
  template <class T>
  static void gelu_backward(ConstMatrixView<T> x, ConstMatrixView<T> dy, MatrixView<T> dx, T beta, GeluApproximate a) {
    for (Index i = 0; i < x.rows; ++i)
      for (Index j = 0; j < x.cols; ++j) {
        const T v = dy(i, j) * gelu_grad(x(i, j), a);
        dx(i, j) = beta == T(0) ? v : beta * dx(i, j) + v;
      }
  }

  /// In place: row s of `scores` [seq, past + seq] becomes the softmax over the keys query s may see —
  /// key j is visible when j <= past + s (causal) and `mask` (past + seq entries, or null) is non-zero at j —
  /// with probability 0 for the others. A row that sees no key becomes all zeros.
  template <class T>
  static void masked_causal_softmax(MatrixView<T> scores, Index past, const std::int64_t* mask) {
    const Index len = scores.cols;
    for (Index s = 0; s < scores.rows; ++s) {
      T* r = scores.data + s * scores.stride;
      const Index last = std::min(len, past + s + 1);  // keys [0, last) are causally visible
      T mx = -std::numeric_limits<T>::infinity();
      for (Index j = 0; j < last; ++j)
        if (!mask || mask[j] != 0) mx = std::max(mx, r[j]);
      if (mx == -std::numeric_limits<T>::infinity()) {  // nothing visible
        for (Index j = 0; j < len; ++j) r[j] = T(0);
        continue;
      }
      T sum = 0;
      for (Index j = 0; j < len; ++j) {
        const bool vis = j < last && (!mask || mask[j] != 0);
        r[j] = vis ? std::exp(r[j] - mx) : T(0);
        sum += r[j];
      }
      const T inv = T(1) / sum;
      for (Index j = 0; j < len; ++j) r[j] *= inv;
    }
  }
  /// In place: dp [rows, len] becomes scale · p ⊙ (dp − Σ_j p ⊙ dp) (the softmax backward, times the
  /// score scale).
  template <class T>
  static void softmax_backward(ConstMatrixView<T> p, MatrixView<T> dp, T scale) {
    for (Index s = 0; s < p.rows; ++s) {
      const T* pr = p.data + s * p.stride;
      T* dr = dp.data + s * dp.stride;
      T dot = 0;
      for (Index j = 0; j < p.cols; ++j) dot += pr[j] * dr[j];
      for (Index j = 0; j < p.cols; ++j) dr[j] = scale * pr[j] * (dr[j] - dot);
    }
  }
};

}  // namespace peft::nn
