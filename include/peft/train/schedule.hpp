// peft++ — learning-rate schedules with Hugging Face transformers' semantics.
//
// Each schedule is a small value type whose call operator returns the multiplier of the base
// learning rate at a step, exactly as the `lr_lambda` of transformers' get_linear_schedule_with_warmup,
// get_cosine_schedule_with_warmup and get_constant_schedule_with_warmup. As with torch's LambdaLR
// driven by a Trainer, step 0 is the first optimizer step: before optimizer step k (counting from 0)
// the learning rate is `base_lr * schedule(k)`.
#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <concepts>
#include <numbers>
#include <stdexcept>
#include <string>
#include <string_view>

namespace peft {

namespace detail {

/// Throws std::invalid_argument "<what>: invalid <option> value: <value>" unless `ok`.
inline void require_schedule_argument(bool ok, std::string_view what, std::string_view option, double value) {
  if (ok) return;
  char buffer[32];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value);
  throw std::invalid_argument(std::string(what) + ": invalid " + std::string(option) +
                              " value: " + std::string(buffer, result.ptr));
}

/// transformers' warm-up branch: `step / max(1, warmup)`.
inline double warmup_fraction(long step, long warmup) {
  return static_cast<double>(step) / static_cast<double>(std::max(1L, warmup));
}

}  // namespace detail

/// A learning-rate schedule: callable with a step, returning the multiplier of the base rate.
template <class S>
concept LrSchedule = requires(const S& schedule, long step) {
  { schedule(step) } -> std::convertible_to<double>;
};

/// Anything whose learning rate can be assigned (the optimizers of peft/train/optim.hpp).
template <class O>
concept LrSettable = requires(O& optimizer, double lr) { optimizer.set_lr(lr); };

/// transformers' get_linear_schedule_with_warmup: rises linearly from 0 to 1 over `warmup` steps,
/// then falls linearly to 0 at step `total`, and stays 0 after it.
struct LinearWarmup {
  long warmup = 0;
  long total = 1;

  /// Validates the arguments: std::invalid_argument if warmup < 0 or total <= 0.
  LinearWarmup(long warmup_steps, long total_steps) : warmup(warmup_steps), total(total_steps) {
    detail::require_schedule_argument(warmup >= 0, "LinearWarmup", "warmup (num_warmup_steps)",
                                      static_cast<double>(warmup));
    detail::require_schedule_argument(total > 0, "LinearWarmup", "total (num_training_steps)",
                                      static_cast<double>(total));
  }

  /// Returns the multiplier at `step` (>= 0; std::invalid_argument otherwise):
  /// `step / max(1, warmup)` during warm-up, else `max(0, (total - step) / max(1, total - warmup))`.
  [[nodiscard]] double operator()(long step) const {
    detail::require_schedule_argument(step >= 0, "LinearWarmup", "step", static_cast<double>(step));
    if (step < warmup) return detail::warmup_fraction(step, warmup);
    return std::max(0.0, static_cast<double>(total - step) / static_cast<double>(std::max(1L, total - warmup)));
  }
};

/// transformers' get_cosine_schedule_with_warmup: rises linearly from 0 to 1 over `warmup` steps,
/// then follows `cycles` cosine periods (0.5: a half cosine from 1 down to 0 at step `total`).
struct CosineWarmup {
  long warmup = 0;
  long total = 1;
  double cycles = 0.5;

  /// Validates the arguments: std::invalid_argument if warmup < 0, total <= 0 or cycles not finite.
  CosineWarmup(long warmup_steps, long total_steps, double num_cycles = 0.5)
      : warmup(warmup_steps), total(total_steps), cycles(num_cycles) {
    detail::require_schedule_argument(warmup >= 0, "CosineWarmup", "warmup (num_warmup_steps)",
                                      static_cast<double>(warmup));
    detail::require_schedule_argument(total > 0, "CosineWarmup", "total (num_training_steps)",
                                      static_cast<double>(total));
    detail::require_schedule_argument(std::isfinite(cycles), "CosineWarmup", "cycles (num_cycles)", cycles);
  }

  /// Returns the multiplier at `step` (>= 0; std::invalid_argument otherwise): `step / max(1, warmup)`
  /// during warm-up, else `max(0, 0.5 * (1 + cos(pi * cycles * 2 * progress)))` with
  /// `progress = (step - warmup) / max(1, total - warmup)`.
  [[nodiscard]] double operator()(long step) const {
    detail::require_schedule_argument(step >= 0, "CosineWarmup", "step", static_cast<double>(step));
    if (step < warmup) return detail::warmup_fraction(step, warmup);
    const double progress =
        static_cast<double>(step - warmup) / static_cast<double>(std::max(1L, total - warmup));
    return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * cycles * 2.0 * progress)));
  }
};

/// transformers' get_constant_schedule_with_warmup: rises linearly from 0 to 1 over `warmup` steps,
/// then stays 1.
struct ConstantWarmup {
  long warmup = 0;

  /// Validates the argument: std::invalid_argument if warmup < 0.
  explicit ConstantWarmup(long warmup_steps) : warmup(warmup_steps) {
    detail::require_schedule_argument(warmup >= 0, "ConstantWarmup", "warmup (num_warmup_steps)",
                                      static_cast<double>(warmup));
  }

  /// Returns the multiplier at `step` (>= 0; std::invalid_argument otherwise):
  /// `step / max(1, warmup)` during warm-up, else 1.
  [[nodiscard]] double operator()(long step) const {
    detail::require_schedule_argument(step >= 0, "ConstantWarmup", "step", static_cast<double>(step));
    if (step < warmup) return detail::warmup_fraction(step, warmup);
    return 1.0;
  }
};

/// Assigns `base_lr * schedule(step)` as the learning rate of `optimizer` (via set_lr) and returns
/// it. Call it with step k before the k-th optimizer step (k counted from 0), as LambdaLR does.
template <LrSettable Optimizer, LrSchedule Schedule>
double apply_schedule(Optimizer& optimizer, double base_lr, const Schedule& schedule, long step) {
  const double lr = base_lr * static_cast<double>(schedule(step));
  optimizer.set_lr(lr);
  return lr;
}

}  // namespace peft
