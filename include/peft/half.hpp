// peft++ — 16-bit storage types for the CUDA backend: peft::bf16 (bfloat16) and peft::half (IEEE binary16).
//
// They are storage types: host code converts them to float to compute (implicitly), and converts back with
// round-to-nearest-even (the rounding of CUDA's __float2bfloat16_rn / __float2half_rn and of PyTorch's
// `.to(torch.bfloat16)` from float32). The layout is CUDA's __nv_bfloat16 / __half (16 bits, no padding),
// so device memory holding either is read by the CUDA kernels as those types. The CPU backend does not
// compute in them; on the GPU every kernel loads them as float, computes in float and stores the result
// (fp32 accumulation), and GEMMs run through cublasGemmEx with CUBLAS_COMPUTE_32F.
#pragma once

#include <bit>
#include <cstdint>
#include <type_traits>

namespace peft {

namespace detail {
/// float → bfloat16 bits, round to nearest, ties to even; NaN stays a (quiet) NaN.
constexpr std::uint16_t float_to_bf16_bits(float f) noexcept {
  std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return std::uint16_t(u >> 16);
}
constexpr float bf16_bits_to_float(std::uint16_t b) noexcept { return std::bit_cast<float>(std::uint32_t(b) << 16); }

/// float → IEEE binary16 bits, round to nearest, ties to even (subnormals, overflow to ±inf, NaN kept).
constexpr std::uint16_t float_to_half_bits(float f) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return std::uint16_t(sign | 0x7e00u);   // NaN
  if (a >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // >= 65520 rounds to infinity
  if (a < 0x38800000u) {                                       // below 2^-14: a subnormal half (or zero)
    if (a <= 0x33000000u) return std::uint16_t(sign);          // <= 2^-25 rounds to zero (2^-25 ties to even: 0)
    const std::uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const int shift = 126 - int(a >> 23);                      // |f| / 2^-24 = m >> shift
    const std::uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    return std::uint16_t(sign | (q + ((rem > halfway || (rem == halfway && (q & 1u))) ? 1u : 0u)));
  }
  a -= 0x38000000u;  // exponent bias 127 → 15
  return std::uint16_t(sign | ((a + 0xfffu + ((a >> 13) & 1u)) >> 13));
}
constexpr float half_bits_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = float(m) * 5.9604644775390625e-08f;  // m · 2^-24 (zero or subnormal)
    return sign ? -v : v;
  }
  if (e == 31) return std::bit_cast<float>(sign | 0x7f800000u | (m << 13));
  return std::bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}
}  // namespace detail

namespace detail {
/// The encodings: bits from float (round to nearest even) and back.
struct Bf16Format {
  static constexpr std::uint16_t encode(float f) noexcept { return float_to_bf16_bits(f); }
  static constexpr float decode(std::uint16_t b) noexcept { return bf16_bits_to_float(b); }
};
struct HalfFormat {
  static constexpr std::uint16_t encode(float f) noexcept { return float_to_half_bits(f); }
  static constexpr float decode(std::uint16_t b) noexcept { return half_bits_to_float(b); }
};
}  // namespace detail

/// A 16-bit floating-point storage type of the given encoding: converts implicitly to float, from any arithmetic
/// type with one rounding (to float first for double: a double that lies within a float rounding of a tie can
/// round differently from a direct double → 16-bit conversion).
template <class Format>
struct Float16 {
  std::uint16_t bits;
  Float16() = default;
  template <class U>
    requires std::is_arithmetic_v<U>
  constexpr Float16(U v) noexcept : bits(Format::encode(float(v))) {}
  constexpr operator float() const noexcept { return Format::decode(bits); }
  static constexpr Float16 from_bits(std::uint16_t b) noexcept {
    Float16 r;
    r.bits = b;
    return r;
  }
  // compound assignment: computed in float, rounded once
  constexpr Float16& operator+=(float v) noexcept { return *this = Float16(float(*this) + v); }
  constexpr Float16& operator-=(float v) noexcept { return *this = Float16(float(*this) - v); }
  constexpr Float16& operator*=(float v) noexcept { return *this = Float16(float(*this) * v); }
  constexpr Float16& operator/=(float v) noexcept { return *this = Float16(float(*this) / v); }
};

/// bfloat16 storage (8-bit exponent, 8-bit significand).
using bf16 = Float16<detail::Bf16Format>;
/// IEEE binary16 storage (5-bit exponent, 11-bit significand; largest finite 65504).
using half = Float16<detail::HalfFormat>;

static_assert(sizeof(bf16) == 2 && sizeof(half) == 2 && std::is_trivially_copyable_v<bf16> && std::is_trivially_copyable_v<half>);

/// Whether T is one of the 16-bit storage types.
template <class T>
inline constexpr bool is_half_precision_v = std::is_same_v<T, bf16> || std::is_same_v<T, half>;

/// The type values of a T computation are kept in when they must not lose precision between steps (LayerNorm's
/// saved statistics, optimizer state): float for the 16-bit storage types, T otherwise.
template <class T>
using compute_type_t = std::conditional_t<is_half_precision_v<T>, float, T>;

}  // namespace peft
