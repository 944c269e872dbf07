// peft++ — non-owning row-major matrix views over the caller's memory.
#pragma once

#include <concepts>
#include <cstddef>
#include <string>
#include <string_view>
#include <type_traits>

#include "peft/errors.hpp"

namespace peft {

/// Sizes and indices (signed, as Eigen::Index).
using Index = std::ptrdiff_t;

namespace detail {
/// Anything Eigen-like that exposes a row-major dense block (or a column vector): Eigen::Matrix<..., RowMajor>, Eigen::Map,
/// Eigen::Ref and row-major blocks of them. Checked without including Eigen.
template <class M>
concept RowMajorDense = requires(M& m) {
  { m.data() };
  { m.rows() } -> std::convertible_to<Index>;
  { m.cols() } -> std::convertible_to<Index>;
  { m.outerStride() } -> std::convertible_to<Index>;
  { m.innerStride() } -> std::convertible_to<Index>;
  { std::remove_cvref_t<M>::IsRowMajor };
} && (bool(std::remove_cvref_t<M>::IsRowMajor) || int(std::remove_cvref_t<M>::ColsAtCompileTime) == 1);
/// A column-major Eigen object that is not a column vector (refused with a readable message).
template <class M>
concept ColMajorDense = requires(M& m) {
  { m.data() };
  { m.outerStride() } -> std::convertible_to<Index>;
  { std::remove_cvref_t<M>::IsRowMajor };
} && !bool(std::remove_cvref_t<M>::IsRowMajor) && int(std::remove_cvref_t<M>::ColsAtCompileTime) != 1;
template <class>
inline constexpr bool always_false = false;
}  // namespace detail

/// A row-major matrix view: element (i, j) is `data[i * stride + j]`.
///
/// Trivially copyable and never owning. `T` may be const. A view of a vector is a 1 x n matrix.
/// Views are built from raw pointers, from row-major Eigen objects (`Matrix<T, Dynamic, Dynamic,
/// RowMajor>`, `Map`, `Ref`, row-major blocks) and, through `peft/interop/xtensor.hpp`, from xtensor
/// containers and adaptors. On a device backend the pointer is a device pointer.
template <class T>
struct MatrixView {
  T* data = nullptr;
  Index rows = 0;
  Index cols = 0;
  Index stride = 0;  ///< distance between the starts of two rows, in elements (>= cols)

  constexpr MatrixView() = default;
  constexpr MatrixView(T* p, Index r, Index c) : MatrixView(p, r, c, c) {}
  constexpr MatrixView(T* p, Index r, Index c, Index s) : data(p), rows(r), cols(c), stride(s) {
    if (r < 0 || c < 0 || s < c) throw ShapeError(detail::cat("MatrixView: invalid shape [", r, ", ", c, "] with row stride ", s));
    if (p == nullptr && r * c != 0) throw ShapeError(detail::cat("MatrixView: null data for a [", r, ", ", c, "] view"));
  }

  /// Implicit view of a row-major Eigen object, or of an Eigen column vector as [n, 1] (no copy).
  template <detail::RowMajorDense M>
    requires std::is_convertible_v<decltype(std::declval<M&>().data()), T*>
  MatrixView(M&& m) : MatrixView(m.data(), Index(m.rows()), Index(m.cols()), eigen_row_stride(m)) {}
  /// A column-major Eigen matrix (Eigen's default, e.g. Eigen::MatrixXf) does not convert: this overload only
  /// turns the compiler's "no conversion" into a message.
  template <detail::ColMajorDense M>
  MatrixView(M&&) {
    static_assert(detail::always_false<M>,
                  "peft::MatrixView needs a row-major Eigen object (Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, "
                  "Eigen::RowMajor>) or a column vector: peft stores activations as [batch, features] and weights as "
                  "[out, in], row-major; Eigen::MatrixXf is column-major");
  }

  /// A mutable view converts to a const one.
  template <class U>
    requires(std::is_const_v<T> && std::same_as<std::remove_const_t<T>, U>)
  constexpr MatrixView(MatrixView<U> o) noexcept : data(o.data), rows(o.rows), cols(o.cols), stride(o.stride) {}

 private:
  template <class M>
  static Index eigen_row_stride(const M& m) {
    using E = std::remove_cvref_t<M>;
    static_assert(E::IsRowMajor || E::ColsAtCompileTime == 1,
                  "peft::MatrixView needs a row-major Eigen object (Eigen::RowMajor) or a column vector: "
                  "peft stores activations as [batch, features] and weights as [out, in], row-major");
    if (Index(m.innerStride()) != 1) throw ShapeError("MatrixView: the Eigen object has an inner stride != 1");
    if constexpr (E::IsRowMajor) return m.rows() <= 1 ? Index(m.cols()) : Index(m.outerStride());
    else return 1;
  }

 public:
  constexpr T& operator()(Index i, Index j) const noexcept { return data[i * stride + j]; }
  constexpr Index size() const noexcept { return rows * cols; }
  constexpr bool empty() const noexcept { return rows * cols == 0; }
  constexpr bool contiguous() const noexcept { return stride == cols || rows <= 1; }
  /// Rows [r0, r0 + n).
  constexpr MatrixView row_block(Index r0, Index n) const noexcept { MatrixView v; v.data = data + r0 * stride; v.rows = n; v.cols = cols; v.stride = stride; return v; }
  /// Columns [c0, c0 + n) of every row (same stride).
  constexpr MatrixView col_block(Index c0, Index n) const noexcept { MatrixView v; v.data = data + c0; v.rows = rows; v.cols = n; v.stride = stride; return v; }
};

template <class T>
using ConstMatrixView = MatrixView<const T>;

/// View of `rows * cols` contiguous elements.
template <class T>
constexpr MatrixView<T> view(T* data, Index rows, Index cols) { return MatrixView<T>(data, rows, cols); }

/// A whole buffer (HostBuffer, DeviceBuffer, any type with data() and size()) as one row [1, size].
template <class Buf>
auto flat(Buf& b) {
  return MatrixView<std::remove_pointer_t<decltype(b.data())>>(b.data(), 1, Index(b.size()));
}

/// Whether the memory spans of two views intersect.
template <class A, class B>
bool overlaps(const MatrixView<A>& a, const MatrixView<B>& b) noexcept {
  if (a.empty() || b.empty()) return false;
  const auto* a0 = reinterpret_cast<const char*>(a.data);
  const auto* a1 = reinterpret_cast<const char*>(a.data + (a.rows - 1) * a.stride + a.cols);
  const auto* b0 = reinterpret_cast<const char*>(b.data);
  const auto* b1 = reinterpret_cast<const char*>(b.data + (b.rows - 1) * b.stride + b.cols);
  return a0 < b1 && b0 < a1;
}

/// Throws ShapeError unless `v` is [rows, cols]; `what` names the tensor in the message.
template <class T>
void require_shape(const MatrixView<T>& v, Index rows, Index cols, std::string_view what) {
  if (v.rows != rows || v.cols != cols)
    throw ShapeError(detail::cat(what, ": expected shape [", rows, ", ", cols, "], got [", v.rows, ", ", v.cols, "]"));
}

}  // namespace peft
