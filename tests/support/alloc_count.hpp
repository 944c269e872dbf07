// Counting heap allocations in a test executable: replaces the global operator new/delete and, on glibc,
// the C allocation functions (so allocations inside Eigen's GEMM or OpenBLAS are seen too), each counted
// only while count_allocations() runs its function. Include it from exactly one translation unit of an
// executable (each test executable here is one TU).
//
// Sanitizer builds own malloc and operator new: there the replacements are left out, alloc_counting is false,
// and tests skip their allocation checks (see PEFT_ALLOC_CHECK below), so an ASan build never mixes two
// allocators.
#pragma once

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <new>

#include "sanitized.hpp"

namespace peft::test {

#ifdef PEFT_TEST_SANITIZED
inline constexpr bool alloc_counting = false;
#else
inline constexpr bool alloc_counting = true;
#endif

namespace alloc_detail {
inline std::atomic<long> news{0}, mallocs{0};
inline std::atomic<bool> counting{false};
}  // namespace alloc_detail

/// Allocations made while f() ran: operator new calls and (glibc) C-level malloc/calloc/realloc/
/// aligned_alloc/posix_memalign calls not made by operator new. With EIGEN_RUNTIME_NO_MALLOC defined
/// before Eigen is included, Eigen's own no-malloc mode is on as well (its assertion fires on a heap
/// allocation inside Eigen).
struct AllocCount {
  long news = 0, mallocs = 0;
  long total() const { return news + mallocs; }
};

template <class F>
AllocCount count_allocations(F&& f) {
  using namespace alloc_detail;
  const long n0 = news, m0 = mallocs;
  auto on = [](bool v) {
#ifdef EIGEN_RUNTIME_NO_MALLOC
    Eigen::internal::set_is_malloc_allowed(!v);
#endif
    counting = v;
  };
  on(true);
  try {
    f();
  } catch (...) {
    on(false);
    throw;
  }
  on(false);
  return {news - n0, mallocs - m0};
}

}  // namespace peft::test

#ifndef PEFT_TEST_SANITIZED
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"  // operator new is malloc-based here
#endif
#if defined(__GLIBC__)
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
}
#define PEFT_TEST_RAW_MALLOC(n) __libc_malloc(n)
#else
#define PEFT_TEST_RAW_MALLOC(n) std::malloc(n)
#endif

void* operator new(std::size_t n) {
  if (peft::test::alloc_detail::counting.load(std::memory_order_relaxed)) ++peft::test::alloc_detail::news;
  if (void* p = PEFT_TEST_RAW_MALLOC(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

#if defined(__GLIBC__)
extern "C" {
inline void count_c_allocation() {
  if (peft::test::alloc_detail::counting.load(std::memory_order_relaxed)) ++peft::test::alloc_detail::mallocs;
}
void* malloc(std::size_t n) {
  count_c_allocation();
  return __libc_malloc(n);
}
void* calloc(std::size_t a, std::size_t b) {
  count_c_allocation();
  return __libc_calloc(a, b);
}
void* realloc(void* p, std::size_t n) {
  count_c_allocation();
  return __libc_realloc(p, n);
}
void* aligned_alloc(std::size_t al, std::size_t n) {
  count_c_allocation();
  return __libc_memalign(al, n);
}
int posix_memalign(void** out, std::size_t al, std::size_t n) {
  count_c_allocation();
  *out = __libc_memalign(al, n);
  return *out ? 0 : ENOMEM;
}
}
#endif
#endif  // PEFT_TEST_SANITIZED
