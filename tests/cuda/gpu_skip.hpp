// The CUDA tests' skip rule: without a CUDA device a test that needs one prints "SKIPPED: no CUDA device" and
// returns; ctest reports it as skipped (SKIP_REGULAR_EXPRESSION in tests/CMakeLists.txt).
#pragma once

#include <catch2/catch.hpp>
#include <iostream>
#include <peft/backend/cuda.hpp>

namespace peft::test {
inline bool gpu_available() {
  static const bool yes = cuda::device_count() > 0;
  return yes;
}
}  // namespace peft::test

#define PEFT_REQUIRE_GPU()                                                                                           \
  do {                                                                                                               \
    if (!::peft::test::gpu_available()) {                                                                            \
      std::cout << "SKIPPED: no CUDA device (cudaGetDeviceCount reports none); this test needs a GPU" << std::endl; \
      WARN("SKIPPED: no CUDA device");                                                                               \
      return;                                                                                                        \
    }                                                                                                                \
  } while (0)
