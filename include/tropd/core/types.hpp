// tropd/core/types.hpp: 16-bit floating-point storage types and element traits.
//
// tropd reads logits stored as fp32, fp64, bf16 or fp16 and accumulates in fp32 or
// better. `bf16` and `fp16` are 2-byte storage structs, layout-compatible with CUDA's
// __nv_bfloat16 and __half, converted bit-exactly on host and device by the same code.
#pragma once

#include <stdint.h>

#include <type_traits>

#include <tropd/config.hpp>

namespace tropd {

namespace detail {
TROPD_HD inline float bits_to_float(uint32_t u) noexcept {
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}
TROPD_HD inline uint32_t float_to_bits(float f) noexcept {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  return u;
}
}  // namespace detail

/// bfloat16 storage (1 sign, 8 exponent, 7 mantissa bits).
struct bf16 {
  uint16_t bits = 0;
  /// Round-to-nearest-even conversion from fp32 (NaN stays NaN).
  TROPD_HD static bf16 from_float(float f) noexcept {
    uint32_t u = detail::float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return bf16{static_cast<uint16_t>(u >> 16)};
  }
  TROPD_HD float to_float() const noexcept { return detail::bits_to_float(static_cast<uint32_t>(bits) << 16); }
};

/// IEEE binary16 storage (1 sign, 5 exponent, 10 mantissa bits).
struct fp16 {
  uint16_t bits = 0;
  /// Round-to-nearest-even conversion from fp32 (overflow to +-inf, NaN stays NaN).
  TROPD_HD static fp16 from_float(float f) noexcept {
    const uint32_t u = detail::float_to_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t au = u & 0x7fffffffu;
    if (au > 0x7f800000u) return fp16{static_cast<uint16_t>(sign | 0x7e00u)};
    if (au >= 0x477ff000u) return fp16{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
    if (au < 0x38800000u) {  // subnormal half or zero: value = au * 2^-24 in half ulps
      const float af = detail::bits_to_float(au);
      // 2^24 scaling is exact; nearbyint-style rounding to even via the magic-number trick.
      const float scaled = af * 16777216.0f + 8388608.0f;  // 2^24, then add 2^23 to round
      const uint32_t q = detail::float_to_bits(scaled) - 0x4b000000u;
      return fp16{static_cast<uint16_t>(sign | q)};
    }
    uint32_t m = au + 0xc8000fffu + ((au >> 13) & 1u);  // rebias exponent 127 -> 15, round to even
    return fp16{static_cast<uint16_t>(sign | (m >> 13))};
  }
  TROPD_HD float to_float() const noexcept {
    const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    const uint32_t exp = (bits >> 10) & 0x1fu;
    const uint32_t man = bits & 0x3ffu;
    if (exp == 0) {  // zero or subnormal: man * 2^-24
      const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
      return sign ? -v : v;
    }
    if (exp == 31) return detail::bits_to_float(sign | 0x7f800000u | (man << 13));
    return detail::bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  }
};

static_assert(sizeof(bf16) == 2 && sizeof(fp16) == 2, "16-bit storage types must be 2 bytes");

/// Converts any supported element type to its accumulation type (float stays float,
/// double stays double, 16-bit types widen to float).
TROPD_HD inline float to_acc(float x) noexcept { return x; }
TROPD_HD inline double to_acc(double x) noexcept { return x; }
TROPD_HD inline float to_acc(bf16 x) noexcept { return x.to_float(); }
TROPD_HD inline float to_acc(fp16 x) noexcept { return x.to_float(); }

/// The element types tropd reads logits in.
template <class T>
concept logit_element = __is_same(T, float) || __is_same(T, double) || __is_same(T, bf16) || __is_same(T, fp16);

/// The element types tropd writes gradients in.
template <class T>
concept grad_element = __is_same(T, float) || __is_same(T, double);

/// The type the row passes of both backends compute in for student / teacher logits of types
/// TS and TT: double if either is double, else float (16-bit inputs widen to float).
template <class TS, class TT>
using work_type_t = std::conditional_t<std::is_same_v<TS, double> || std::is_same_v<TT, double>, double, float>;

}  // namespace tropd
