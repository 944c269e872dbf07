// peft++ — the CPU's training kernels (TrainKernels<EigenCpu>, see peft/backend/train_kernels.hpp): the
// element loops of torch.optim's single-tensor Adam/AdamW and SGD, the gradient norm and clamp of
// torch.nn.utils.clip_grad_*, and the per-row cross-entropy with its gradient.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>

#include "peft/backend/eigen_cpu.hpp"
#include "peft/backend/train_kernels.hpp"
#include "peft/param.hpp"
#include "peft/view.hpp"

namespace peft {

template <>
struct TrainKernels<EigenCpu> {
  /// The value an update of parameter element `value` starts from (see TrainKernels in
  /// peft/backend/train_kernels.hpp): the master, unless the parameter no longer equals the master rounded to
  /// T (written outside the optimizer, or the master new: zero); the parameter itself without a master.
  template <class T, class S>
  static S start_value(const S* master, std::size_t i, T value) {
    if (master == nullptr) return static_cast<S>(value);
    const S p = master[i];
    return static_cast<S>(static_cast<T>(p)) == static_cast<S>(value) ? p : static_cast<S>(value);
  }

  /// One Adam/AdamW update of n elements, in PyTorch 1.13's single-tensor order of operations, computed in S
  /// with every scalar converted to S first (as PyTorch converts Python scalars to the tensor's dtype).
  template <class T, class S>
  static void adam_update(T* value, const T* grad, S* master, S* m, S* v, S* vmax, std::size_t n, const AdamStepScalars& s) {
    const S decay = static_cast<S>(1.0 - s.lr * s.weight_decay);
    const S wd = static_cast<S>(s.weight_decay);
    const S beta1 = static_cast<S>(s.beta1);
    const S one_minus_beta1 = static_cast<S>(1.0 - s.beta1);
    const S beta2 = static_cast<S>(s.beta2);
    const S one_minus_beta2 = static_cast<S>(1.0 - s.beta2);
    const S bc2_sqrt = static_cast<S>(s.bias_correction2_sqrt);
    const S eps = static_cast<S>(s.eps);
    const S neg_step_size = static_cast<S>(-s.step_size);
    for (std::size_t i = 0; i < n; ++i) {
      S g = static_cast<S>(grad[i]);
      S p = start_value(master, i, value[i]);
      if (s.decoupled) {
        p = p * decay;  // param.mul_(1 - lr * weight_decay)
      } else if (s.weight_decay != 0.0) {
        g = g + wd * p;  // grad.add(param, alpha=weight_decay)
      }
      m[i] = m[i] * beta1;
      m[i] = m[i] + one_minus_beta1 * g;  // exp_avg.mul_(beta1).add_(grad, alpha=1-beta1)
      v[i] = v[i] * beta2;
      v[i] = v[i] + one_minus_beta2 * g * g;  // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1-beta2)
      S denom;
      if (s.amsgrad) {
        if (v[i] > vmax[i] || std::isnan(v[i])) vmax[i] = v[i];  // torch.maximum (NaN propagates)
        denom = std::sqrt(vmax[i]) / bc2_sqrt + eps;
      } else {
        denom = std::sqrt(v[i]) / bc2_sqrt + eps;
      }
      p = p + neg_step_size * m[i] / denom;  // param.addcdiv_(exp_avg, denom, value=-step_size)
      if (master) master[i] = p;
      value[i] = static_cast<T>(p);
    }
  }

  /// One SGD update of n elements (torch.optim.SGD's single-tensor loop), computed in S with the scalars
  /// converted to S.
  template <class T, class S>
  static void sgd_update(T* value, const T* grad, S* master, S* buf, std::size_t n, const SgdStepScalars& s) {
    const S wd = static_cast<S>(s.weight_decay);
    const S momentum = static_cast<S>(s.momentum);
    const S one_minus_dampening = static_cast<S>(1.0 - s.dampening);
    const S neg_lr = static_cast<S>(-s.lr);
    const bool use_wd = s.weight_decay != 0.0;
    const bool use_momentum = s.momentum != 0.0;
    for (std::size_t i = 0; i < n; ++i) {
      S p = start_value(master, i, value[i]);
      S d = static_cast<S>(grad[i]);
      if (use_wd) d = d + wd * p;  // d_p.add(param, alpha=weight_decay)
      if (use_momentum) {
        if (s.first) {
          buf[i] = d;  // torch.clone(d_p)
        } else {
          buf[i] = buf[i] * momentum;
          buf[i] = buf[i] + one_minus_dampening * d;  // buf.mul_(momentum).add_(d_p, alpha=1-dampening)
        }
        d = s.nesterov ? d + momentum * buf[i] : buf[i];
      }
      p = p + neg_lr * d;  // param.add_(d_p, alpha=-lr)
      if (master) master[i] = p;
      value[i] = static_cast<T>(p);
    }
  }

  /// The norm_type-norm of the gradients of the trainable parameters of `params` together (as if
  /// concatenated), accumulated in double in the order of the parameters and their elements; +infinity: the
  /// largest magnitude (NaN propagates). Allocates nothing.
  template <class T>
  static double grad_norm(std::span<const ParamRef<T>> params, double norm_type) {
    const bool inf_norm = std::isinf(norm_type);
    double total = 0.0;
    for (const auto& p : params) {
      if (!p.trainable) continue;
      for (std::size_t i = 0; i < p.size; ++i) {
        const double a = std::abs(static_cast<double>(p.grad[i]));
        if (inf_norm) {
          total = (a > total || std::isnan(a)) ? a : total;
        } else if (norm_type == 2.0) {
          total += a * a;
        } else if (norm_type == 1.0) {
          total += a;
        } else {
          total += std::pow(a, norm_type);
        }
      }
      if (inf_norm && std::isnan(total)) break;
    }
    if (!inf_norm) {
      if (norm_type == 2.0) {
        total = std::sqrt(total);
      } else if (norm_type != 1.0) {
        total = std::pow(total, 1.0 / norm_type);
      }
    }
    return total;
  }

  /// g[i] = g[i] · T(coef).
  template <class T>
  static void scale(T* g, std::size_t n, double coef) {
    const T c = static_cast<T>(coef);
    for (std::size_t i = 0; i < n; ++i) g[i] = g[i] * c;
  }

  /// g[i] clamped to [T(lo), T(hi)] (NaN stays NaN).
  template <class T>
  static void clamp(T* g, std::size_t n, double lo, double hi) {
    const T l = static_cast<T>(lo), h = static_cast<T>(hi);
    for (std::size_t i = 0; i < n; ++i) {
      if (g[i] < l) g[i] = l;
      else if (g[i] > h) g[i] = h;
    }
  }

  /// One row r of V logits with target t (not ignore_index): returns logsumexp(r) − r[t], computed in double;
  /// drow (when not null) = (softmax(r) − onehot(t)) · inv_count.
  template <class T>
  static double cross_entropy_row(const T* r, Index V, std::int64_t t, double inv_count, T* drow) {
    double mx = -std::numeric_limits<double>::infinity();
    for (Index j = 0; j < V; ++j) mx = std::max(mx, double(r[j]));
    double sum = 0;
    for (Index j = 0; j < V; ++j) sum += std::exp(double(r[j]) - mx);
    const double loss = std::log(sum) + mx - double(r[t]);  // before drow is written: it may be r itself
    if (drow)
      for (Index j = 0; j < V; ++j) drow[j] = T((std::exp(double(r[j]) - mx) / sum - (j == t ? 1.0 : 0.0)) * inv_count);
    return loss;
  }

  /// Per row i of logits [n, V]: row_loss[i] = logsumexp(logits[i]) − logits[i, t] (0 where t ==
  /// ignore_index), computed in double; dlogits (when not empty) = (softmax(logits[i]) − onehot(t)) ·
  /// inv_count, zero rows where ignored. Targets are range-checked by the caller.
  template <class T>
  static void cross_entropy_rows(ConstMatrixView<T> logits, const std::int64_t* targets, std::int64_t ignore_index, double inv_count,
                                 MatrixView<T> dlogits, double* row_loss) {
    for (Index i = 0; i < logits.rows; ++i) {
      T* drow = dlogits.empty() ? nullptr : dlogits.data + i * dlogits.stride;
      if (targets[i] == ignore_index) {
        row_loss[i] = 0.0;
        if (drow) std::fill(drow, drow + logits.cols, T(0));
        continue;
      }
      row_loss[i] = cross_entropy_row(logits.data + i * logits.stride, logits.cols, targets[i], inv_count, drow);
    }
  }
};

}  // namespace peft
