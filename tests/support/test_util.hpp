// Shared helpers for peft++ tests: row-major Eigen matrices, seeded random fills, twin layers.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <limits>
#include <peft/peft.hpp>

namespace peft::test {

template <class T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A [rows, cols] matrix of values uniform in [-1, 1), the same numbers for float and double (drawn in
/// double, then rounded).
template <class T>
Mat<T> random_mat(Index rows, Index cols, std::uint64_t seed) {
  Mat<T> m(rows, cols);
  Generator g(seed);
  g.uniform(m.data(), std::size_t(m.size()), -1.0, 1.0);
  return m;
}

template <class T>
Mat<T> filled(Index rows, Index cols, T v) {
  return Mat<T>::Constant(rows, cols, v);
}

template <class T>
T nan() { return std::numeric_limits<T>::quiet_NaN(); }

template <class A, class B>
double max_abs_diff(const A& a, const B& b) {
  return (a.template cast<double>() - b.template cast<double>()).cwiseAbs().maxCoeff();
}

/// Σ y ⊙ dy in double.
template <class A, class B>
double dot(const A& y, const B& dy) {
  return (y.template cast<double>().array() * dy.template cast<double>().array()).sum();
}

template <class T>
Eigen::Map<Mat<T>> as_mat(MatrixView<T> v) { return Eigen::Map<Mat<T>>(v.data, v.rows, v.cols); }
template <class T>
Eigen::Map<const Mat<T>> as_mat(ConstMatrixView<T> v) { return Eigen::Map<const Mat<T>>(v.data, v.rows, v.cols); }

}  // namespace peft::test
