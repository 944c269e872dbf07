// peft++ — optimizers (AdamW, Adam, SGD) and gradient clipping with PyTorch's semantics.
//
// Each optimizer mirrors the single-tensor (foreach=False) code path of torch.optim in PyTorch 1.13:
// the same update formulas, the same order of the elementwise operations, and the same handling of
// scalars (hyper-parameters and bias corrections are computed in double, then converted to the
// parameter type T before they meet the tensors, as PyTorch converts Python scalars to the tensor's
// dtype). For T = double the results agree with PyTorch's float64 results to rounding; for T = float
// they agree with PyTorch's float32 results to a few units in the last place.
//
// Every optimizer and clipping function takes the backend as a second template argument (default
// EigenCpu): the state lives in the backend's buffers and the element loops are TrainKernels<Backend>
// operations, so `AdamW<float, CudaBackend>` updates a GPU model's parameters where they are. Parameters of
// another backend's memory (ParamRef::host_accessible) are refused with std::invalid_argument.
//
// Mixed precision: for parameters in a 16-bit storage type (peft::bf16, peft::half), the optimizers keep
// their state in float (optimizer_state_t<T>): the moments or momentum, and fp32 master weights. Each step
// computes in float from the master and writes the parameter as the master rounded to T, so updates smaller
// than half a 16-bit unit in the last place accumulate instead of vanishing (PEFT gets the same by keeping
// adapter weights in float32 under a bf16 model: autocast_adapter_dtype=True). A master starts at zero and is
// (re)loaded from its parameter whenever the parameter no longer equals the master rounded to T, so writes
// made outside the optimizer (a checkpoint loaded, AdaLoRA's rank masking) are taken up at the next step;
// a write that changes the parameter by less than that rounding is not seen.
#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "peft/backend/eigen_cpu.hpp"
#include "peft/param.hpp"
#include "peft/train/kernels.hpp"

namespace peft {

namespace detail {

/// Returns `value` in its shortest round-trip decimal form (as Python's repr).
inline std::string format_value(double value) {
  char buffer[32];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value);
  return std::string(buffer, result.ptr);
}

/// Builds "<what>: invalid <option> value: <value>" for std::invalid_argument messages.
inline std::string invalid_option_message(std::string_view what, std::string_view option, double value) {
  return std::string(what) + ": invalid " + std::string(option) + " value: " + format_value(value);
}

/// Throws std::invalid_argument naming `option` and `value` unless `ok`.
inline void require_option(bool ok, std::string_view what, std::string_view option, double value) {
  if (!ok) throw std::invalid_argument(invalid_option_message(what, option, value));
}

/// Throws std::invalid_argument naming `p` when its memory is not the kind `Backend` works on (a device
/// model's parameter given to a CPU optimizer, or the reverse).
template <class Backend, class T>
void require_backend_memory(const ParamRef<T>& p, std::string_view what) {
  if (p.host_accessible != Backend::host_accessible) {
    throw std::invalid_argument(std::string(what) + ": parameter '" + p.name + "' is " +
                                (p.host_accessible ? "host memory" : "device memory") + " but this " + std::string(what) +
                                " runs on the " + Backend::name + " backend; give it the model's backend as its second template argument");
  }
}

/// Returns the trainable parameters of `params` (frozen ones are dropped); throws
/// std::invalid_argument for an empty list (as torch.optim), or naming the parameter when a trainable one has
/// no gradient or no value, or lives in memory `Backend` does not work on.
template <class Backend, class T>
std::vector<ParamRef<T>> collect_trainable(std::span<const ParamRef<T>> params, std::string_view what) {
  if (params.empty())  // as torch.optim; also what a model whose layers were not found gives (peft::parameters)
    throw std::invalid_argument(std::string(what) + ": got an empty parameter list");
  std::vector<ParamRef<T>> out;
  for (const auto& p : params) {
    if (!p.trainable) continue;
    require_backend_memory<Backend>(p, what);
    if (p.grad == nullptr && p.size != 0) {
      throw std::invalid_argument(std::string(what) + ": trainable parameter '" + p.name +
                                  "' has no gradient (grad == nullptr)");
    }
    if (p.value == nullptr && p.size != 0) {
      throw std::invalid_argument(std::string(what) + ": trainable parameter '" + p.name +
                                  "' has no value (value == nullptr)");
    }
    out.push_back(p);
  }
  return out;
}

/// The fp32 masters of 16-bit parameters, zero: the first step loads every parameter that is not zero (and
/// a zero parameter is its master already). Nothing to fill, so nothing runs on a stream here.
template <class T, class Backend>
void init_master(typename Backend::template buffer<optimizer_state_t<T>>& master, std::size_t n) {
  if constexpr (is_half_precision_v<T>) master.resize(n);
}

/// The master weights of the parameter at `offset`, or nullptr when the optimizer keeps none.
template <class S, class Buffer>
S* master_at(Buffer& master, std::size_t offset) {
  return master.empty() ? nullptr : master.data() + offset;
}

/// Total number of elements of `params`.
template <class T>
std::size_t total_size(const std::vector<ParamRef<T>>& params) {
  std::size_t n = 0;
  for (const auto& p : params) n += p.size;
  return n;
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Adam and AdamW

/// Options of AdamW (torch.optim.AdamW's defaults).
struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
  bool amsgrad = false;
};

/// Options of Adam (torch.optim.Adam's defaults: no weight decay).
struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool amsgrad = false;
};

namespace detail {

/// Adam's machinery shared by Adam (L2 penalty added to the gradient) and AdamW (decoupled decay).
template <class T, bool Decoupled, class Backend>
class AdamCore {
 public:
  /// Validates the options, keeps the trainable parameters of `params` and allocates all state
  /// (first and second moments, and the running maximum for AMSGrad), zero-initialised.
  AdamCore(std::span<const ParamRef<T>> params, double lr, double beta1, double beta2, double eps,
           double weight_decay, bool amsgrad)
      : lr_(lr), beta1_(beta1), beta2_(beta2), eps_(eps), weight_decay_(weight_decay), amsgrad_(amsgrad) {
    constexpr std::string_view what = Decoupled ? "AdamW" : "Adam";
    require_option(lr >= 0.0, what, "lr (learning rate)", lr);
    require_option(eps >= 0.0, what, "eps (epsilon)", eps);
    require_option(beta1 >= 0.0 && beta1 < 1.0, what, "beta1 (beta parameter at index 0)", beta1);
    require_option(beta2 >= 0.0 && beta2 < 1.0, what, "beta2 (beta parameter at index 1)", beta2);
    require_option(weight_decay >= 0.0, what, "weight_decay", weight_decay);
    params_ = collect_trainable<Backend>(params, what);
    const std::size_t n = total_size(params_);
    exp_avg_.resize(n);  // zero-initialised, in the backend's memory
    exp_avg_sq_.resize(n);
    if (amsgrad_) max_exp_avg_sq_.resize(n);
    init_master<T, Backend>(master_, n);
  }

  /// Performs one update: increments step_count(), then updates every trainable parameter's value
  /// and its moments (and AMSGrad maximum) from its current gradient. Gradients are not modified.
  /// Allocates nothing.
  void step() {
    ++step_;
    const double step = static_cast<double>(step_);
    AdamStepScalars sc;
    sc.lr = lr_;
    sc.beta1 = beta1_;
    sc.beta2 = beta2_;
    sc.eps = eps_;
    sc.weight_decay = weight_decay_;
    sc.step_size = lr_ / (1.0 - std::pow(beta1_, step));
    sc.bias_correction2_sqrt = std::sqrt(1.0 - std::pow(beta2_, step));
    sc.decoupled = Decoupled;
    sc.amsgrad = amsgrad_;
    std::size_t offset = 0;
    for (const auto& p : params_) {
      TrainKernels<Backend>::template adam_update<T, S>(p.value, static_cast<const T*>(p.grad), master_at<S>(master_, offset),
                                                        exp_avg_.data() + offset, exp_avg_sq_.data() + offset,
                                                        amsgrad_ ? max_exp_avg_sq_.data() + offset : nullptr, p.size, sc);
      offset += p.size;
    }
  }

  /// Assigns zero to every element of the gradients of the trainable parameters (frozen
  /// parameters are not touched).
  void zero_grad() {
    for (const auto& p : params_)
      if (p.size) Backend::template fill<T>(MatrixView<T>(p.grad, 1, Index(p.size)), T(0));
  }

  /// Returns the learning rate used by the next step().
  [[nodiscard]] double lr() const noexcept { return lr_; }

  /// Assigns the learning rate used by subsequent steps; throws std::invalid_argument if negative.
  void set_lr(double lr) {
    require_option(lr >= 0.0, Decoupled ? "AdamW" : "Adam", "lr (learning rate)", lr);
    lr_ = lr;
  }

  /// Returns the number of step() calls so far (PyTorch's state["step"]).
  [[nodiscard]] long step_count() const noexcept { return step_; }

  /// Returns the trainable parameters this optimizer updates, in the order given.
  [[nodiscard]] std::span<const ParamRef<T>> params() const noexcept { return params_; }

  /// The type of the moments (and master weights): float for 16-bit parameters, T otherwise.
  using state_type = optimizer_state_t<T>;
  /// Whether fp32 master weights are kept (16-bit parameters).
  static constexpr bool has_master_weights = is_half_precision_v<T>;

 protected:
  using S = state_type;
  double lr_, beta1_, beta2_, eps_, weight_decay_;
  bool amsgrad_;
  long step_ = 0;
  std::vector<ParamRef<T>> params_;
  typename Backend::template buffer<S> exp_avg_, exp_avg_sq_, max_exp_avg_sq_, master_;
};

}  // namespace detail

/// torch.optim.AdamW: Adam with decoupled weight decay (`p *= 1 - lr * weight_decay` before the
/// Adam update), bias-corrected moments, denominator `sqrt(v) / sqrt(1 - beta2^t) + eps` (or with
/// the running maximum of v under AMSGrad) and step size `lr / (1 - beta1^t)`.
///
/// Only the parameters with `trainable == true` are kept and updated; frozen ones are ignored.
/// The ParamRefs are copied: the tensors they point to must outlive the optimizer.
template <class T, class Backend = EigenCpu>
class AdamW : public detail::AdamCore<T, true, Backend> {
 public:
  /// Validates `options` (std::invalid_argument naming the option), keeps the trainable parameters
  /// of `params` (std::invalid_argument naming a trainable one without gradient) and allocates the
  /// zero-initialised moment buffers.
  explicit AdamW(std::span<const ParamRef<T>> params, const AdamWOptions& options = {})
      : detail::AdamCore<T, true, Backend>(params, options.lr, options.beta1, options.beta2, options.eps,
                                  options.weight_decay, options.amsgrad),
        options_(options) {}

  /// Returns the options given at construction, with `lr` as it currently is.
  [[nodiscard]] AdamWOptions options() const noexcept {
    AdamWOptions o = options_;
    o.lr = this->lr_;
    return o;
  }

 private:
  AdamWOptions options_;
};

/// torch.optim.Adam: weight decay as an L2 penalty added to the gradient (`g + weight_decay * p`)
/// before the moments are updated; otherwise as AdamW.
template <class T, class Backend = EigenCpu>
class Adam : public detail::AdamCore<T, false, Backend> {
 public:
  /// Validates `options`, keeps the trainable parameters of `params` and allocates the
  /// zero-initialised moment buffers (see AdamW).
  explicit Adam(std::span<const ParamRef<T>> params, const AdamOptions& options = {})
      : detail::AdamCore<T, false, Backend>(params, options.lr, options.beta1, options.beta2, options.eps,
                                   options.weight_decay, options.amsgrad),
        options_(options) {}

  /// Returns the options given at construction, with `lr` as it currently is.
  [[nodiscard]] AdamOptions options() const noexcept {
    AdamOptions o = options_;
    o.lr = this->lr_;
    return o;
  }

 private:
  AdamOptions options_;
};

template <class T>
AdamW(const std::vector<ParamRef<T>>&) -> AdamW<T>;
template <class T>
AdamW(const std::vector<ParamRef<T>>&, const AdamWOptions&) -> AdamW<T>;
template <class T>
Adam(const std::vector<ParamRef<T>>&) -> Adam<T>;
template <class T>
Adam(const std::vector<ParamRef<T>>&, const AdamOptions&) -> Adam<T>;

// ---------------------------------------------------------------------------------------------
// SGD

/// Options of SGD (torch.optim.SGD's defaults; PyTorch has no default lr, peft uses 1e-2).
struct SGDOptions {
  double lr = 1e-2;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
};

/// torch.optim.SGD: `d = g + weight_decay * p`; with momentum, `buf = d` on the first step and
/// `buf = momentum * buf + (1 - dampening) * d` afterwards, then `d = d + momentum * buf` (Nesterov)
/// or `d = buf`; finally `p -= lr * d`.
///
/// Only the parameters with `trainable == true` are kept and updated; frozen ones are ignored.
template <class T, class Backend = EigenCpu>
class SGD {
 public:
  /// Validates `options` (std::invalid_argument naming the option), keeps the trainable parameters
  /// of `params` and, when momentum != 0, allocates the momentum buffers.
  explicit SGD(std::span<const ParamRef<T>> params, const SGDOptions& options = {}) : options_(options) {
    constexpr std::string_view what = "SGD";
    detail::require_option(options.lr >= 0.0, what, "lr (learning rate)", options.lr);
    detail::require_option(options.momentum >= 0.0, what, "momentum", options.momentum);
    detail::require_option(options.weight_decay >= 0.0, what, "weight_decay", options.weight_decay);
    detail::require_option(std::isfinite(options.dampening), what, "dampening", options.dampening);
    if (options.nesterov && !(options.momentum > 0.0 && options.dampening == 0.0)) {
      throw std::invalid_argument("SGD: nesterov momentum requires momentum > 0 and dampening == 0 (got momentum = " +
                                  detail::format_value(options.momentum) +
                                  ", dampening = " + detail::format_value(options.dampening) + ")");
    }
    params_ = detail::collect_trainable<Backend>(params, what);
    if (options_.momentum != 0.0) momentum_buffer_.resize(detail::total_size(params_));  // zero, in the backend's memory
    detail::init_master<T, Backend>(master_, detail::total_size(params_));
  }

  /// Performs one update: increments step_count() and updates every trainable parameter's value
  /// (and momentum buffer) from its current gradient. Gradients are not modified. Allocates nothing.
  void step() {
    SgdStepScalars sc;
    sc.first = step_ == 0;
    ++step_;
    sc.lr = options_.lr;
    sc.momentum = options_.momentum;
    sc.dampening = options_.dampening;
    sc.weight_decay = options_.weight_decay;
    sc.nesterov = options_.nesterov;
    const bool use_momentum = options_.momentum != 0.0;
    std::size_t offset = 0;
    for (const auto& p : params_) {
      TrainKernels<Backend>::template sgd_update<T, S>(p.value, static_cast<const T*>(p.grad), detail::master_at<S>(master_, offset),
                                                       use_momentum ? momentum_buffer_.data() + offset : nullptr, p.size, sc);
      offset += p.size;
    }
  }

  /// Assigns zero to every element of the gradients of the trainable parameters (frozen
  /// parameters are not touched).
  void zero_grad() {
    for (const auto& p : params_)
      if (p.size) Backend::template fill<T>(MatrixView<T>(p.grad, 1, Index(p.size)), T(0));
  }

  /// Returns the learning rate used by the next step().
  [[nodiscard]] double lr() const noexcept { return options_.lr; }

  /// Assigns the learning rate used by subsequent steps; throws std::invalid_argument if negative.
  void set_lr(double lr) {
    detail::require_option(lr >= 0.0, "SGD", "lr (learning rate)", lr);
    options_.lr = lr;
  }

  /// Returns the number of step() calls so far.
  [[nodiscard]] long step_count() const noexcept { return step_; }

  /// Returns the options given at construction, with `lr` as it currently is.
  [[nodiscard]] const SGDOptions& options() const noexcept { return options_; }

  /// Returns the trainable parameters this optimizer updates, in the order given.
  [[nodiscard]] std::span<const ParamRef<T>> params() const noexcept { return params_; }

  /// The type of the momentum buffers (and master weights): float for 16-bit parameters, T otherwise.
  using state_type = optimizer_state_t<T>;
  /// Whether fp32 master weights are kept (16-bit parameters).
  static constexpr bool has_master_weights = is_half_precision_v<T>;

 private:
  using S = state_type;
  SGDOptions options_;
  long step_ = 0;
  std::vector<ParamRef<T>> params_;
  typename Backend::template buffer<S> momentum_buffer_, master_;
};

template <class T>
SGD(const std::vector<ParamRef<T>>&) -> SGD<T>;
template <class T>
SGD(const std::vector<ParamRef<T>>&, const SGDOptions&) -> SGD<T>;

// ---------------------------------------------------------------------------------------------
// Gradient clipping

/// torch.nn.utils.clip_grad_norm_: computes the `norm_type`-norm of all gradients of the trainable
/// parameters together (as if concatenated; `norm_type` > 0 or +infinity, accumulated in double),
/// then, when `clip_coef = max_norm / (total_norm + 1e-6)` is below 1, multiplies every such
/// gradient by clip_coef (as PyTorch, a NaN total norm makes the coefficient, and so the gradients,
/// NaN). Returns the total norm before clipping. Frozen parameters are not touched; a trainable
/// parameter without gradient, a negative or NaN max_norm, or a norm_type that is not positive
/// throws std::invalid_argument.
template <class T, class Backend = EigenCpu>
double clip_grad_norm(std::span<const ParamRef<T>> params, double max_norm, double norm_type = 2.0) {
  detail::require_option(max_norm >= 0.0, "clip_grad_norm", "max_norm", max_norm);
  detail::require_option(norm_type > 0.0, "clip_grad_norm", "norm_type", norm_type);
  for (const auto& p : params) {
    if (!p.trainable) continue;
    if (p.grad == nullptr && p.size != 0) {
      throw std::invalid_argument("clip_grad_norm: trainable parameter '" + p.name +
                                  "' has no gradient (grad == nullptr)");
    }
    detail::require_backend_memory<Backend>(p, "clip_grad_norm");
  }
  const double total = TrainKernels<Backend>::grad_norm(params, norm_type);
  const double clip_coef = max_norm / (total + 1e-6);
  if (!(clip_coef >= 1.0)) {  // clamp(clip_coef, max=1); a NaN coefficient propagates as in PyTorch
    for (const auto& p : params)
      if (p.trainable && p.size) TrainKernels<Backend>::scale(p.grad, p.size, clip_coef);
  }
  return total;
}

/// Overload of clip_grad_norm for a vector of parameter handles.
template <class T, class Backend = EigenCpu>
double clip_grad_norm(const std::vector<ParamRef<T>>& params, double max_norm, double norm_type = 2.0) {
  return clip_grad_norm<T, Backend>(std::span<const ParamRef<T>>(params), max_norm, norm_type);
}

/// torch.nn.utils.clip_grad_value_: assigns to each gradient element of the trainable parameters
/// its value clamped to [-clip_value, clip_value]. Throws std::invalid_argument if clip_value is
/// negative or NaN, or if a trainable parameter has no gradient. Frozen parameters are not touched.
template <class T, class Backend = EigenCpu>
void clip_grad_value(std::span<const ParamRef<T>> params, double clip_value) {
  detail::require_option(clip_value >= 0.0, "clip_grad_value", "clip_value", clip_value);
  for (const auto& p : params) {
    if (p.trainable && p.grad == nullptr && p.size != 0) {
      throw std::invalid_argument("clip_grad_value: trainable parameter '" + p.name +
                                  "' has no gradient (grad == nullptr)");
    }
    if (p.trainable) detail::require_backend_memory<Backend>(p, "clip_grad_value");
  }
  for (const auto& p : params)
    if (p.trainable && p.size) TrainKernels<Backend>::clamp(p.grad, p.size, -clip_value, clip_value);
}

/// Overload of clip_grad_value for a vector of parameter handles.
template <class T, class Backend = EigenCpu>
void clip_grad_value(const std::vector<ParamRef<T>>& params, double clip_value) {
  clip_grad_value<T, Backend>(std::span<const ParamRef<T>>(params), clip_value);
}

}  // namespace peft
