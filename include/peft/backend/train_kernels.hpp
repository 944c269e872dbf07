// peft++ — the training loop's extension point per backend: the optimizer updates, the gradient norm and
// clamp of gradient clipping, and the per-row cross-entropy. `TrainKernels<Backend>` is specialised next to
// each policy (the CPU's in peft/train/kernels.hpp, CUDA's in peft/backend/cuda.hpp); the optimizers, the
// clipping functions and the loss call only these and the backend's own operations. Free of Eigen and CUDA.
#pragma once

#include <cstdint>

#include "peft/half.hpp"

namespace peft {

/// The type optimizers keep their state in for parameters of type T: float for the 16-bit storage types
/// (moments and fp32 master weights), T otherwise.
template <class T>
using optimizer_state_t = compute_type_t<T>;

/// The scalars of one Adam/AdamW update, computed on the host in double (as PyTorch computes them from
/// Python floats). Each backend converts them to the type its kernel computes in.
struct AdamStepScalars {
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
  double step_size = 0;              ///< lr / (1 − beta1^t)
  double bias_correction2_sqrt = 0;  ///< √(1 − beta2^t)
  bool decoupled = true;             ///< AdamW (p ·= 1 − lr·wd) rather than Adam (g += wd·p)
  bool amsgrad = false;
};

/// The scalars of one SGD update.
struct SgdStepScalars {
  double lr = 0, momentum = 0, dampening = 0, weight_decay = 0;
  bool nesterov = false;
  bool first = false;  ///< the first step: the momentum buffer is set to the update, not blended
};

/// Specialised per backend. Every pointer is the backend's memory (a device pointer on a GPU); `n` elements
/// contiguous. Operations (S: the state type, optimizer_state_t<T>):
///   adam_update<T, S>(value, grad, master, m, v, vmax /* nullptr unless amsgrad */, n, const AdamStepScalars&)
///   sgd_update<T, S>(value, grad, master, buf /* nullptr without momentum */, n, const SgdStepScalars&)
///     The update is computed in S. `master` (nullptr: none, the parameter is its own master) holds the
///     parameter in S: the step starts from master[i], unless value[i] differs from master[i] rounded to T
///     (the parameter was written outside the optimizer, or the master is new: zero), in which case it
///     starts from value[i]; it ends with master[i] = the result and value[i] = the result rounded to T.
///   grad_norm<T>(std::span<const ParamRef<T>> params, double norm_type) -> double  (over the trainable ones)
///   scale<T>(g, n, double coef), clamp<T>(g, n, double lo, double hi)
///   cross_entropy_rows<T>(logits, targets /* the backend's memory */, ignore_index, inv_count, dlogits,
///                         double* row_loss /* the backend's memory, logits.rows */)
template <class Backend>
struct TrainKernels;

}  // namespace peft
