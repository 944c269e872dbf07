// peft++ — views of xtensor containers and adaptors (xtensor 0.24, Debian's). The only peft++ header that
// names xtensor include paths. Link `peft::xtensor` (or `xtensor`) to use it.
#pragma once

#include <cstddef>
#include <type_traits>
#include <xtensor/xlayout.hpp>

#include "peft/view.hpp"

namespace peft {

/// A row-major view of a 2-D (or 1-D, as [1, n]) xtensor expression with contiguous rows:
/// `xt::xtensor<T, 2>`, `xt::xarray<T>` with row-major layout, and `xt::adapt(ptr, ...)` adaptors.
/// No copy is made. Throws ShapeError for other dimensions or for column-major/strided inner layouts.
template <class E>
auto xview(E& e) -> MatrixView<std::remove_pointer_t<decltype(e.data())>> {
  using V = std::remove_pointer_t<decltype(e.data())>;
  const auto& shape = e.shape();
  const auto& strides = e.strides();
  const std::size_t dim = shape.size();
  if (dim == 1) return MatrixView<V>(e.data() + e.data_offset(), 1, Index(shape[0]));
  if (dim != 2) throw ShapeError(detail::cat("peft::xview: expected a 1-D or 2-D xtensor expression, got ", dim, " dimensions"));
  const Index rows = Index(shape[0]), cols = Index(shape[1]);
  // xtensor reports a stride of 0 along dimensions of extent 1
  const Index inner = cols == 1 ? 1 : Index(strides[1]);
  const Index outer = rows == 1 ? cols : Index(strides[0]);
  if (inner != 1 || outer < cols)
    throw ShapeError(detail::cat("peft::xview: the xtensor expression is not row-major with contiguous rows (strides [", strides[0], ", ",
                                 strides[1], "] for shape [", rows, ", ", cols, "])"));
  return MatrixView<V>(e.data() + e.data_offset(), rows, cols, outer);
}

}  // namespace peft
