// Finite-difference gradient checking for peft++ tests (after dlib's test_layer and ggml's grad mode).
//
// The loss is f = <y, dy> for a fixed random upstream gradient dy, so ∂f/∂θ is exactly what backward
// computes. Reference derivatives are central differences taken on a double-precision twin of the layer
// under test, so float layers are checked against double numerics. Every element is checked when a
// tensor has at most `max_checked` entries, otherwise a seeded sample.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace peft::test {

/// Relative error used everywhere: |a − b| / max(|a|, |b|, floor).
inline double rel_err(double a, double b, double floor = 1e-3) {
  return std::abs(a - b) / std::max({std::abs(a), std::abs(b), floor});
}

/// Tolerances stated in one place.
template <class T>
constexpr double grad_tol() { return std::is_same_v<T, float> ? 2e-3 : 1e-7; }
template <class T>
constexpr double value_tol() { return std::is_same_v<T, float> ? 1e-5 : 1e-12; }

struct GradReport {
  double worst = 0;
  std::size_t worst_index = 0;
  double analytic = 0, numeric = 0;
  std::size_t checked = 0;
  std::string str(const std::string& what) const {
    std::ostringstream os;
    os << what << ": worst relative error " << worst << " at index " << worst_index << " (analytic " << analytic << ", numeric "
       << numeric << "), " << checked << " entries checked";
    return os.str();
  }
};

/// Compares `analytic[i]` with the central difference of `loss()` with respect to `param[i]` (a double
/// tensor of the twin layer), for every i or a sample. `loss` recomputes the forward pass.
template <class A>
GradReport check_gradient(double* param, const A* analytic, std::size_t n, const std::function<double()>& loss, double h = 1e-4,
                          std::size_t max_checked = 4000) {
  GradReport r;
  std::vector<std::size_t> idx;
  if (n <= max_checked) {
    for (std::size_t i = 0; i < n; ++i) idx.push_back(i);
  } else {
    std::uint64_t s = 0x9E3779B97F4A7C15ull;
    for (std::size_t k = 0; k < max_checked; ++k) {
      s ^= s << 13, s ^= s >> 7, s ^= s << 17;
      idx.push_back(std::size_t(s % n));
    }
  }
  for (std::size_t i : idx) {
    const double old = param[i];
    param[i] = old + h;
    const double fp = loss();
    param[i] = old - h;
    const double fm = loss();
    param[i] = old;
    const double num = (fp - fm) / (2 * h);
    const double e = rel_err(double(analytic[i]), num);
    ++r.checked;
    if (e > r.worst || !std::isfinite(double(analytic[i]))) {
      r.worst = std::isfinite(double(analytic[i])) ? e : std::numeric_limits<double>::infinity();
      r.worst_index = i;
      r.analytic = double(analytic[i]);
      r.numeric = num;
    }
  }
  return r;
}

}  // namespace peft::test
