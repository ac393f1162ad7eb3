// 16-bit storage types (core/types.hpp): bf16 and fp16 against an independent decoding and
// an independent round-to-nearest-even.
#include <stdint.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

#include "reference/helpers.hpp"
#include "reference/naive.hpp"

using tropd_test::ld;
namespace naive = tropd_test::naive;

namespace {

constexpr float finf = std::numeric_limits<float>::infinity();

float float_of_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// Round-to-nearest-even of x to a grid of spacing `quantum` (x >= 0, both exact in long double).
ld round_to_grid(ld x, ld quantum) {
  const ld n = x / quantum;  // exact: x has at most 24 significant bits, quantum is a power of 2
  ld lo = std::floor(n);
  const ld frac = n - lo;
  if (frac > 0.5L || (frac == 0.5L && std::fmod(lo, 2.0L) != 0)) lo += 1;
  return lo * quantum;
}

/// IEEE binary16 round-to-nearest-even of a finite or infinite float, as a value.
ld ref_fp16(float f) {
  const ld a = std::fabs(static_cast<ld>(f));
  ld r;
  if (std::isinf(a) || a >= 65520.0L) {
    r = naive::inf;
  } else if (a < std::ldexp(1.0L, -14)) {
    r = round_to_grid(a, std::ldexp(1.0L, -24));
  } else {
    int e;
    std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1): 10 mantissa bits below the leading one
    r = round_to_grid(a, std::ldexp(1.0L, e - 1 - 10));
  }
  return std::signbit(f) ? -r : r;
}

/// bfloat16 round-to-nearest-even of a finite or infinite float, as a value.
ld ref_bf16(float f) {
  const ld a = std::fabs(static_cast<ld>(f));
  ld r;
  if (std::isinf(a)) {
    r = naive::inf;
  } else if (a < std::ldexp(1.0L, -126)) {
    r = round_to_grid(a, std::ldexp(1.0L, -133));  // subnormal bf16: 7 mantissa bits at 2^-126
  } else {
    int e;
    std::frexp(a, &e);
    r = round_to_grid(a, std::ldexp(1.0L, e - 1 - 7));
    if (r >= std::ldexp(1.0L, 128)) r = naive::inf;
  }
  return std::signbit(f) ? -r : r;
}

bool same_value_and_sign(ld a, ld b) { return a == b && std::signbit(a) == std::signbit(b); }

}  // namespace

// ---------------------------------------------------------------------------
// bf16 / fp16
// ---------------------------------------------------------------------------

TEST_CASE("types: bf16 known bit patterns and rounding to nearest even") {
  CHECK(tropd::bf16::from_float(1.0f).bits == 0x3F80);
  CHECK(tropd::bf16::from_float(-2.0f).bits == 0xC000);
  CHECK(tropd::bf16::from_float(0.0f).bits == 0x0000);
  CHECK(tropd::bf16::from_float(-0.0f).bits == 0x8000);
  CHECK(tropd::bf16::from_float(finf).bits == 0x7F80);
  CHECK(tropd::bf16::from_float(-finf).bits == 0xFF80);
  // 1 + 2^-8 lies exactly between 0x3F80 (1) and 0x3F81: ties go to the even 0x3F80.
  CHECK(tropd::bf16::from_float(float_of_bits(0x3F808000u)).bits == 0x3F80);
  // 0x3F818000 lies between 0x3F81 and 0x3F82: the even one is 0x3F82.
  CHECK(tropd::bf16::from_float(float_of_bits(0x3F818000u)).bits == 0x3F82);
  CHECK(tropd::bf16::from_float(float_of_bits(0x3F808001u)).bits == 0x3F81);  // just above the tie
  CHECK(tropd::bf16::from_float(float_of_bits(0x3F807FFFu)).bits == 0x3F80);  // just below
  // The largest finite float rounds up to +inf in bf16 (it is past the bf16 max + half ulp).
  CHECK(tropd::bf16::from_float(std::numeric_limits<float>::max()).bits == 0x7F80);
  CHECK(tropd::bf16::from_float(1.0f).to_float() == 1.0f);
  CHECK(tropd::bf16{0x4049}.to_float() == 3.140625f);
  CHECK(std::isnan(tropd::bf16::from_float(std::numeric_limits<float>::quiet_NaN()).to_float()));
  CHECK(std::isnan(tropd::bf16::from_float(float_of_bits(0x7F800001u)).to_float()));  // signalling NaN stays NaN
  CHECK(std::isnan(tropd::bf16::from_float(float_of_bits(0xFFFFFFFFu)).to_float()));
}

TEST_CASE("types: fp16 known bit patterns, max half, subnormals, overflow") {
  CHECK(tropd::fp16::from_float(1.0f).bits == 0x3C00);
  CHECK(tropd::fp16::from_float(-2.0f).bits == 0xC000);
  CHECK(tropd::fp16::from_float(0.0f).bits == 0x0000);
  CHECK(tropd::fp16::from_float(-0.0f).bits == 0x8000);
  CHECK(tropd::fp16::from_float(65504.0f).bits == 0x7BFF);
  CHECK(tropd::fp16{0x7BFF}.to_float() == 65504.0f);
  CHECK(tropd::fp16::from_float(65519.996f).bits == 0x7BFF);  // below the half-way point to 65536
  CHECK(tropd::fp16::from_float(65520.0f).bits == 0x7C00);    // the tie rounds to even = overflow
  CHECK(tropd::fp16::from_float(-1e6f).bits == 0xFC00);
  CHECK(tropd::fp16::from_float(finf).bits == 0x7C00);
  CHECK(tropd::fp16{0x7C00}.to_float() == finf);
  CHECK(tropd::fp16{0xFC00}.to_float() == -finf);
  const float tiny = std::ldexp(1.0f, -24);  // smallest subnormal half
  CHECK(tropd::fp16::from_float(tiny).bits == 0x0001);
  CHECK(tropd::fp16{0x0001}.to_float() == tiny);
  CHECK(tropd::fp16::from_float(-tiny).bits == 0x8001);
  CHECK(tropd::fp16::from_float(std::ldexp(1.0f, -25)).bits == 0x0000);         // tie between 0 and 2^-24: even = 0
  CHECK(tropd::fp16::from_float(1.5f * std::ldexp(1.0f, -25)).bits == 0x0001);  // above the tie
  CHECK(tropd::fp16::from_float(3.0f * std::ldexp(1.0f, -25)).bits == 0x0002);  // tie between 1 and 2 ulps: even = 2
  CHECK(tropd::fp16::from_float(std::ldexp(1.0f, -14)).bits == 0x0400);         // smallest normal
  CHECK(tropd::fp16{0x03FF}.to_float() == std::ldexp(1023.0f, -24));            // largest subnormal
  CHECK(tropd::fp16::from_float(0.1f).bits == 0x2E66);
  CHECK(tropd::fp16::from_float(1.0f + std::ldexp(1.0f, -11)).bits == 0x3C00);  // tie at 1: even
  CHECK(tropd::fp16::from_float(1.0f + 3 * std::ldexp(1.0f, -11)).bits == 0x3C02);
  CHECK(std::isnan(tropd::fp16::from_float(std::numeric_limits<float>::quiet_NaN()).to_float()));
  CHECK(std::isnan(tropd::fp16::from_float(float_of_bits(0x7F800001u)).to_float()));
  CHECK(std::isnan(tropd::fp16{0x7E00}.to_float()));
}

TEST_CASE("types: every bf16 and fp16 bit pattern decodes correctly and round-trips") {
  int bad_bf = 0, bad_fp = 0, bad_bf_dec = 0, bad_fp_dec = 0;
  for (uint32_t b = 0; b < 65536; ++b) {
    const tropd::bf16 x{static_cast<uint16_t>(b)};
    const ld want = naive::decode_bf16(x.bits);
    const float got = x.to_float();
    if (std::isnan(want)) {
      if (!std::isnan(got) || !std::isnan(tropd::bf16::from_float(got).to_float())) ++bad_bf;
      continue;
    }
    if (!same_value_and_sign(got, want)) ++bad_bf_dec;
    if (tropd::bf16::from_float(got).bits != x.bits) ++bad_bf;
  }
  for (uint32_t b = 0; b < 65536; ++b) {
    const tropd::fp16 x{static_cast<uint16_t>(b)};
    const ld want = naive::decode_fp16(x.bits);
    const float got = x.to_float();
    if (std::isnan(want)) {
      if (!std::isnan(got) || !std::isnan(tropd::fp16::from_float(got).to_float())) ++bad_fp;
      continue;
    }
    if (!same_value_and_sign(got, want)) ++bad_fp_dec;
    if (tropd::fp16::from_float(got).bits != x.bits) ++bad_fp;
  }
  CHECK(bad_bf_dec == 0);
  CHECK(bad_bf == 0);
  CHECK(bad_fp_dec == 0);
  CHECK(bad_fp == 0);
}

TEST_CASE("types: fp32 -> bf16 / fp16 rounding agrees with an independent round-to-nearest-even") {
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<uint32_t> bits;
  std::uniform_real_distribution<double> mant(1.0, 2.0);
  std::uniform_int_distribution<int> ex(-30, 17);
  int bad_bf = 0, bad_fp = 0;
  auto check_one = [&](float f) {
    if (std::isnan(f)) return;
    if (!same_value_and_sign(naive::decode_bf16(tropd::bf16::from_float(f).bits), ref_bf16(f))) ++bad_bf;
    if (!same_value_and_sign(naive::decode_fp16(tropd::fp16::from_float(f).bits), ref_fp16(f))) ++bad_fp;
  };
  for (int i = 0; i < 100000; ++i) check_one(float_of_bits(bits(rng)));  // whole float range
  for (int i = 0; i < 100000; ++i) {                                     // the fp16 range, both signs
    const float f = static_cast<float>(std::ldexp(mant(rng), ex(rng)));
    check_one((i & 1) ? -f : f);
  }
  // Exact ties of both formats around a few binades (mantissa ends in a single 1 bit).
  for (int e = -26; e < 16; ++e)
    for (uint32_t m = 0; m < 64; ++m) {
      check_one(std::ldexp(static_cast<float>(1024 + m) + 0.5f, e - 10));
      check_one(std::ldexp(static_cast<float>(128 + m) + 0.5f, e - 7));
    }
  CHECK(bad_bf == 0);
  CHECK(bad_fp == 0);
}

// ---------------------------------------------------------------------------
// The work type of a pair of element types
// ---------------------------------------------------------------------------

namespace {

/// work_type_t in a function template's signature, as user code (and the row functions)
/// may write it: the alias must be built from library traits, since a compiler built-in
/// trait there cannot be mangled (g++: "use of built-in trait in function signature";
/// clang 14: "cannot yet mangle expression type TypeTraitExpr").
template <class TS, class TT>
tropd::work_type_t<TS, TT> work_sum(TS a, TT b) {
  using W = tropd::work_type_t<TS, TT>;
  return static_cast<W>(tropd::to_acc(a)) + static_cast<W>(tropd::to_acc(b));
}

}  // namespace

TEST_CASE("types: work_type_t is double if either input is double, else float (also in a signature)") {
  static_assert(std::is_same_v<tropd::work_type_t<float, float>, float>);
  static_assert(std::is_same_v<tropd::work_type_t<double, float>, double>);
  static_assert(std::is_same_v<tropd::work_type_t<tropd::bf16, double>, double>);
  static_assert(std::is_same_v<tropd::work_type_t<tropd::bf16, tropd::fp16>, float>);
  static_assert(std::is_same_v<decltype(work_sum(1.0f, 2.0)), double>);
  static_assert(std::is_same_v<decltype(work_sum(tropd::bf16::from_float(1.0f), 2.0f)), float>);
  CHECK(work_sum(1.5f, 2.25) == 3.75);
  CHECK(work_sum(tropd::bf16::from_float(1.0f), tropd::fp16::from_float(2.0f)) == 3.0f);
}
