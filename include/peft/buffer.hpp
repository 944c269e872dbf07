// peft++ — owning, 64-byte aligned host storage used by layers, adapters and contexts.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>

#include "peft/view.hpp"

namespace peft {

/// A resizable, zero-initialised, 64-byte aligned array of trivially copyable `T` on the host.
/// Copies are deep. Only construction, `resize` and copy allocate.
template <class T>
class HostBuffer {
  static_assert(std::is_trivially_copyable_v<T>);

 public:
  static constexpr std::size_t alignment = 64;

  HostBuffer() = default;
  explicit HostBuffer(std::size_t n) { resize(n); }
  HostBuffer(const HostBuffer& o) : HostBuffer(o.size_) { if (size_) std::memcpy(data_.get(), o.data_.get(), size_ * sizeof(T)); }
  HostBuffer(HostBuffer&& o) noexcept : data_(std::move(o.data_)), size_(std::exchange(o.size_, 0)) {}
  HostBuffer& operator=(const HostBuffer& o) { if (this != &o) { HostBuffer t(o); *this = std::move(t); } return *this; }
  HostBuffer& operator=(HostBuffer&& o) noexcept { data_ = std::move(o.data_); size_ = std::exchange(o.size_, 0); return *this; }

  /// Resizes to `n` elements, all zero (previous contents are discarded).
  void resize(std::size_t n) {
    if (n == size_) { zero(); return; }
    data_.reset();
    size_ = 0;
    if (n == 0) return;
    const std::size_t bytes = (n * sizeof(T) + alignment - 1) / alignment * alignment;
    void* p = std::aligned_alloc(alignment, bytes);
    if (!p) throw std::bad_alloc();
    data_.reset(static_cast<T*>(p));
    size_ = n;
    zero();
  }
  void zero() noexcept { if (size_) std::memset(data_.get(), 0, size_ * sizeof(T)); }

  T* data() noexcept { return data_.get(); }
  const T* data() const noexcept { return data_.get(); }
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  T& operator[](std::size_t i) noexcept { return data_.get()[i]; }
  const T& operator[](std::size_t i) const noexcept { return data_.get()[i]; }

  /// The first rows*cols elements as a row-major [rows, cols] view.
  MatrixView<T> view(Index rows, Index cols) { check(rows, cols); return {data(), rows, cols}; }
  ConstMatrixView<T> view(Index rows, Index cols) const { check(rows, cols); return {data(), rows, cols}; }

 private:
  struct Free { void operator()(T* p) const noexcept { std::free(p); } };
  void check(Index rows, Index cols) const {
    if (rows < 0 || cols < 0 || std::size_t(rows * cols) > size_)
      throw ShapeError(detail::cat("HostBuffer: a [", rows, ", ", cols, "] view does not fit in ", size_, " elements"));
  }
  std::unique_ptr<T, Free> data_;
  std::size_t size_ = 0;
};

}  // namespace peft
