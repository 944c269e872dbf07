// peft++ — a small counter-based random number generator, used for initialisation and dropout masks.
//
// Counter-based (a SplitMix64-style mix of (seed, stream, counter)) so that a value depends only on its
// coordinates: masks are reproducible, independent of thread scheduling, and a device backend can compute
// the same numbers in a kernel. PyTorch's generator is not reproduced; numbers that must equal PEFT's are
// loaded, not drawn.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>

namespace peft {

namespace detail {
constexpr std::uint64_t mix64(std::uint64_t z) noexcept {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
/// 64 random bits for element `i` of stream `stream` under `seed`.
constexpr std::uint64_t random_bits(std::uint64_t seed, std::uint64_t stream, std::uint64_t i) noexcept {
  return mix64(mix64(seed ^ mix64(stream + 0x632BE59BD9B4E019ull)) + i);
}
/// Uniform in [0, 1) with 53 random bits.
constexpr double uniform01(std::uint64_t seed, std::uint64_t stream, std::uint64_t i) noexcept {
  return double(random_bits(seed, stream, i) >> 11) * 0x1.0p-53;
}
}  // namespace detail

/// A seeded source of independent streams. Each call to `next_stream()` hands out a new stream id, so
/// layers created one after the other get different numbers from one `Generator`.
class Generator {
 public:
  explicit constexpr Generator(std::uint64_t seed = 0) noexcept : seed_(seed) {}
  constexpr std::uint64_t seed() const noexcept { return seed_; }
  constexpr std::uint64_t next_stream() noexcept { return stream_++; }

  /// Fills `n` values uniform in [lo, hi).
  template <class T>
  void uniform(T* out, std::size_t n, double lo, double hi) {
    const auto s = next_stream();
    for (std::size_t i = 0; i < n; ++i) out[i] = T(lo + (hi - lo) * detail::uniform01(seed_, s, i));
  }
  /// Fills `n` values from N(mean, std²) (Box–Muller on two counter-based uniforms).
  template <class T>
  void normal(T* out, std::size_t n, double mean, double std) {
    const auto s = next_stream();
    for (std::size_t i = 0; i < n; ++i) {
      const double u1 = 1.0 - detail::uniform01(seed_, s, 2 * i);  // (0, 1]
      const double u2 = detail::uniform01(seed_, s, 2 * i + 1);
      out[i] = T(mean + std * std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2));
    }
  }

 private:
  std::uint64_t seed_;
  std::uint64_t stream_ = 0;
};

}  // namespace peft
