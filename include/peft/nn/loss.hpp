// peft++ — cross-entropy losses for language models, with PyTorch's semantics (mean over the targets that
// are not ignore_index, -100 by default) and the gradient w.r.t. the logits.
//
// `cross_entropy` and `causal_lm_loss` read host memory. `CrossEntropyLoss<T, Backend>` computes the same
// numbers on any backend (logits and dlogits in the backend's memory, targets on the host): it reserves its
// device memory at construction, so a training loop's loss allocates nothing.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "peft/backend/eigen_cpu.hpp"
#include "peft/errors.hpp"
#include "peft/train/kernels.hpp"
#include "peft/view.hpp"

namespace peft::nn {

namespace impl {
/// Range-checks target_of(i) for i < rows (ShapeError naming the row) and returns how many are not ignored.
inline Index count_targets(Index rows, Index V, auto&& target_of, std::int64_t ignore_index) {
  Index count = 0;
  for (Index i = 0; i < rows; ++i) {
    const std::int64_t t = target_of(i);
    if (t == ignore_index) continue;
    if (t < 0 || t >= V)
      throw ShapeError(detail::cat("cross_entropy: target ", t, " of row ", i, " is outside [0, ", V, ") and is not ignore_index ", ignore_index));
    ++count;
  }
  return count;
}

template <class T>
double cross_entropy_rows(ConstMatrixView<T> logits, Index rows_of_targets, auto&& target_of, MatrixView<T> dlogits, std::int64_t ignore_index) {
  const Index V = logits.cols;
  const Index count = count_targets(rows_of_targets, V, target_of, ignore_index);
  double loss = 0;
  const double inv = count > 0 ? 1.0 / double(count) : 0.0;
  for (Index i = 0; i < logits.rows; ++i) {
    const std::int64_t t = i < rows_of_targets ? target_of(i) : ignore_index;
    T* drow = dlogits.empty() ? nullptr : dlogits.data + i * dlogits.stride;
    if (t == ignore_index) {
      if (drow)
        for (Index j = 0; j < V; ++j) drow[j] = T(0);
      continue;
    }
    loss += TrainKernels<EigenCpu>::cross_entropy_row(logits.data + i * logits.stride, V, t, inv, drow);
  }
  return count > 0 ? loss * inv : std::numeric_limits<double>::quiet_NaN();
}

/// Checks the shapes of causal_lm_loss / CrossEntropyLoss::causal_lm.
template <class T>
void check_causal_lm(const char* what, ConstMatrixView<T> logits, std::size_t labels, Index batch, Index seq, const MatrixView<T>& dlogits) {
  if (batch <= 0 || seq <= 0 || logits.rows != batch * seq)
    throw ShapeError(detail::cat(what, ": logits have ", logits.rows, " rows, expected batch * seq = ", batch, " * ", seq));
  if (Index(labels) != batch * seq) throw ShapeError(detail::cat(what, ": ", labels, " labels, expected batch * seq = ", batch * seq));
  if (!dlogits.empty() && (dlogits.rows != logits.rows || dlogits.cols != logits.cols))
    require_shape(dlogits, logits.rows, logits.cols, detail::cat(what, ": dlogits"));  // throws (the message only built then)
}
}  // namespace impl

/// torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index) (reduction "mean"):
/// the mean over rows whose target is not ignore_index of −log softmax(logits[i])[target[i]].
/// requires: logits [n, vocab] in host memory, targets n entries, each in [0, vocab) or ignore_index; dlogits
/// empty or [n, vocab]. ensures: returns the loss (NaN when every target is ignored, as PyTorch); dlogits,
/// when given, is assigned d loss / d logits (zero rows for ignored targets).
template <class T>
double cross_entropy(ConstMatrixView<T> logits, std::span<const std::int64_t> targets, MatrixView<T> dlogits = {},
                     std::int64_t ignore_index = -100) {
  if (Index(targets.size()) != logits.rows)
    throw ShapeError(detail::cat("cross_entropy: ", targets.size(), " targets for ", logits.rows, " rows of logits"));
  if (!dlogits.empty()) require_shape(dlogits, logits.rows, logits.cols, "cross_entropy: dlogits");
  return impl::cross_entropy_rows(logits, logits.rows, [&](Index i) { return targets[std::size_t(i)]; }, dlogits, ignore_index);
}

/// The causal-LM loss of transformers' *ForCausalLM models: position s of each sequence predicts label
/// s + 1 (logits[:, :-1] against labels[:, 1:]), mean over the labels that are not ignore_index.
/// requires: logits [batch · seq, vocab] (row b · seq + s) in host memory, labels batch · seq entries,
/// dlogits empty or logits' shape. ensures: returns the loss; dlogits assigned (zero at the last position of
/// each sequence and where the next label is ignored).
template <class T>
double causal_lm_loss(ConstMatrixView<T> logits, std::span<const std::int64_t> labels, Index batch, Index seq, MatrixView<T> dlogits = {},
                      std::int64_t ignore_index = -100) {
  impl::check_causal_lm("causal_lm_loss", logits, labels.size(), batch, seq, dlogits);
  auto target = [&](Index i) -> std::int64_t { return i % seq == seq - 1 ? ignore_index : labels[std::size_t(i + 1)]; };
  return impl::cross_entropy_rows(logits, logits.rows, target, dlogits, ignore_index);
}

/// cross_entropy and causal_lm_loss on any backend. Logits and dlogits are the backend's memory (device
/// memory on a GPU), targets and labels stay on the host, where they are range-checked; the per-row losses
/// come back to the host (one small download: the call waits for the stream) and are added there in row
/// order, so the result equals the host functions' on the CPU backend bit for bit.
/// Construction reserves room for `max_rows` rows (targets staged to the device, per-row losses): a call
/// with more rows throws ShapeError; calls allocate nothing. dlogits may be the logits' own memory.
template <class T, class Backend = EigenCpu>
class CrossEntropyLoss {
 public:
  explicit CrossEntropyLoss(Index max_rows, std::int64_t ignore_index = -100)
      : ignore_(ignore_index), max_rows_(checked(max_rows)), targets_(std::size_t(max_rows_)), host_loss_(std::size_t(max_rows_)) {
    staged_.reserve(max_rows);
    row_loss_.resize(std::size_t(max_rows));
  }

  /// As cross_entropy(logits, targets, dlogits, ignore_index()).
  double operator()(ConstMatrixView<T> logits, std::span<const std::int64_t> targets, MatrixView<T> dlogits = {}) {
    if (Index(targets.size()) != logits.rows)
      throw ShapeError(detail::cat("CrossEntropyLoss: ", targets.size(), " targets for ", logits.rows, " rows of logits"));
    if (!dlogits.empty()) require_shape(dlogits, logits.rows, logits.cols, "CrossEntropyLoss: dlogits");
    return run(logits, dlogits, [&](Index i) { return targets[std::size_t(i)]; });
  }

  /// As causal_lm_loss(logits, labels, batch, seq, dlogits, ignore_index()).
  double causal_lm(ConstMatrixView<T> logits, std::span<const std::int64_t> labels, Index batch, Index seq, MatrixView<T> dlogits = {}) {
    impl::check_causal_lm("CrossEntropyLoss::causal_lm", logits, labels.size(), batch, seq, dlogits);
    return run(logits, dlogits, [&](Index i) -> std::int64_t { return i % seq == seq - 1 ? ignore_ : labels[std::size_t(i + 1)]; });
  }

  [[nodiscard]] std::int64_t ignore_index() const noexcept { return ignore_; }
  [[nodiscard]] Index max_rows() const noexcept { return max_rows_; }

 private:
  static Index checked(Index max_rows) {
    if (max_rows < 0) throw ShapeError(detail::cat("CrossEntropyLoss: max_rows = ", max_rows, " is negative"));
    return max_rows;
  }
  double run(ConstMatrixView<T> logits, MatrixView<T> dlogits, auto&& target_of) {
    const Index n = logits.rows;
    if (n > max_rows_) throw ShapeError(detail::cat("CrossEntropyLoss: ", n, " rows of logits exceed the ", max_rows_, " reserved"));
    const Index count = impl::count_targets(n, logits.cols, target_of, ignore_);
    for (Index i = 0; i < n; ++i) targets_[std::size_t(i)] = target_of(i);
    const std::int64_t* staged = staged_.stage(std::span<const std::int64_t>(targets_.data(), std::size_t(n)));
    const double inv = count > 0 ? 1.0 / double(count) : 0.0;
    TrainKernels<Backend>::cross_entropy_rows(logits, staged, ignore_, inv, dlogits, row_loss_.data());
    if (n == 0) return std::numeric_limits<double>::quiet_NaN();
    Backend::template download<double>(ConstMatrixView<double>(row_loss_.data(), 1, n), MatrixView<double>(host_loss_.data(), 1, n));
    double loss = 0;
    for (Index i = 0; i < n; ++i) loss += host_loss_[std::size_t(i)];
    return count > 0 ? loss * inv : std::numeric_limits<double>::quiet_NaN();
  }

  std::int64_t ignore_;
  Index max_rows_;
  std::vector<std::int64_t> targets_;
  std::vector<double> host_loss_;
  typename Backend::IndexStage staged_;
  typename Backend::template buffer<double> row_loss_;
};

}  // namespace peft::nn
