// peft++ — cross-entropy losses for language models, with PyTorch's semantics (mean over the targets that
// are not ignore_index, -100 by default) and the gradient w.r.t. the logits.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>

#include "peft/errors.hpp"
#include "peft/view.hpp"

namespace peft::nn {

namespace impl {
template <class T>
double cross_entropy_rows(ConstMatrixView<T> logits, Index rows_of_targets, auto&& target_of, MatrixView<T> dlogits, std::int64_t ignore_index) {
  const Index V = logits.cols;
  Index count = 0;
  for (Index i = 0; i < rows_of_targets; ++i) {
    const std::int64_t t = target_of(i);
    if (t == ignore_index) continue;
    if (t < 0 || t >= V)
      throw ShapeError(detail::cat("cross_entropy: target ", t, " of row ", i, " is outside [0, ", V, ") and is not ignore_index ", ignore_index));
    ++count;
  }
  double loss = 0;
  const double inv = count > 0 ? 1.0 / double(count) : 0.0;
  for (Index i = 0; i < logits.rows; ++i) {
    const std::int64_t t = i < rows_of_targets ? target_of(i) : ignore_index;
    const T* r = logits.data + i * logits.stride;
    if (t == ignore_index) {
      if (!dlogits.empty())
        for (Index j = 0; j < V; ++j) dlogits(i, j) = T(0);
      continue;
    }
    double mx = -std::numeric_limits<double>::infinity();
    for (Index j = 0; j < V; ++j) mx = std::max(mx, double(r[j]));
    double sum = 0;
    for (Index j = 0; j < V; ++j) sum += std::exp(double(r[j]) - mx);
    loss += std::log(sum) + mx - double(r[t]);
    if (!dlogits.empty())
      for (Index j = 0; j < V; ++j) dlogits(i, j) = T((std::exp(double(r[j]) - mx) / sum - (j == t ? 1.0 : 0.0)) * inv);
  }
  return count > 0 ? loss * inv : std::numeric_limits<double>::quiet_NaN();
}
}  // namespace impl

/// torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index) (reduction "mean"):
/// the mean over rows whose target is not ignore_index of −log softmax(logits[i])[target[i]].
/// requires: logits [n, vocab], targets n entries, each in [0, vocab) or ignore_index; dlogits empty or [n, vocab].
/// ensures: returns the loss (NaN when every target is ignored, as PyTorch); dlogits, when given, is assigned
/// d loss / d logits (zero rows for ignored targets).
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
/// requires: logits [batch · seq, vocab] (row b · seq + s), labels batch · seq entries, dlogits empty or
/// logits' shape. ensures: returns the loss; dlogits assigned (zero at the last position of each sequence
/// and where the next label is ignored).
template <class T>
double causal_lm_loss(ConstMatrixView<T> logits, std::span<const std::int64_t> labels, Index batch, Index seq, MatrixView<T> dlogits = {},
                      std::int64_t ignore_index = -100) {
  if (batch <= 0 || seq <= 0 || logits.rows != batch * seq)
    throw ShapeError(detail::cat("causal_lm_loss: logits have ", logits.rows, " rows, expected batch * seq = ", batch, " * ", seq));
  if (Index(labels.size()) != batch * seq)
    throw ShapeError(detail::cat("causal_lm_loss: ", labels.size(), " labels, expected batch * seq = ", batch * seq));
  if (!dlogits.empty()) require_shape(dlogits, logits.rows, logits.cols, "causal_lm_loss: dlogits");
  auto target = [&](Index i) -> std::int64_t { return i % seq == seq - 1 ? ignore_index : labels[std::size_t(i + 1)]; };
  return impl::cross_entropy_rows(logits, logits.rows, target, dlogits, ignore_index);
}

}  // namespace peft::nn
