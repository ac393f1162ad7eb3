// Scalar numerics (core/numerics.hpp), 16-bit storage types (core/types.hpp), the mergeable
// row statistics (estimators/full_vocab.hpp: row_moments, summarize) and Philox
// (core/random.hpp), each against an independent reference.
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <Random123/philox.h>
#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

#include "reference/helpers.hpp"
#include "reference/naive.hpp"

using tropd_test::ld;
using tropd_test::vec;
namespace naive = tropd_test::naive;

namespace {

constexpr double dinf = std::numeric_limits<double>::infinity();
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

/// log(1 - e^x) in long double: log(-expm1 x) where 1 - e^x is small, log1p(-e^x) where
/// e^x is small (either form alone loses digits of long double at the other end).
ld ref_log1mexp(ld x) { return x > -0.5L ? std::log(-std::expm1(x)) : std::log1p(-std::exp(x)); }

bool same_value_and_sign(ld a, ld b) { return a == b && std::signbit(a) == std::signbit(b); }

}  // namespace

// ---------------------------------------------------------------------------
// logaddexp, log1mexp
// ---------------------------------------------------------------------------

TEST_CASE("numerics: logaddexp against long double, -inf is the identity") {
  const double pairs[][2] = {{0, 0},       {1, 2},     {-3, 5},      {100, 100.5}, {1000, 999},
                             {-1000, -1001}, {0, -800}, {-800, 0},    {1e-10, -1e-10}, {30, -30}};
  for (const auto& pr : pairs) {
    const double x = pr[0], y = pr[1];
    const ld m = std::max<ld>(x, y);
    const ld ref = m + std::log(std::exp(static_cast<ld>(x) - m) + std::exp(static_cast<ld>(y) - m));
    CAPTURE(x);
    CAPTURE(y);
    CHECK(std::fabs(tropd::logaddexp(x, y) - ref) <= 1e-15L * std::max<ld>(1, std::fabs(ref)));
    CHECK(tropd::logaddexp(x, y) == tropd::logaddexp(y, x));
    const float fx = static_cast<float>(x), fy = static_cast<float>(y);
    const ld fm = std::max<ld>(fx, fy);
    const ld fref = fm + std::log(std::exp(static_cast<ld>(fx) - fm) + std::exp(static_cast<ld>(fy) - fm));
    CHECK(std::fabs(tropd::logaddexp(fx, fy) - fref) <= 4e-7L * std::max<ld>(1, std::fabs(fref)));
  }
  CHECK(tropd::logaddexp(-dinf, -dinf) == -dinf);
  CHECK(tropd::logaddexp(-dinf, 3.0) == 3.0);
  CHECK(tropd::logaddexp(3.0, -dinf) == 3.0);
  CHECK(tropd::logaddexp(-finf, -2.5f) == -2.5f);
  CHECK(tropd::logaddexp(-finf, -finf) == -finf);
  CHECK(tropd::logaddexp(0.0, -800.0) == 0.0);  // e^-800 is below double's resolution at 1
}

TEST_CASE("numerics: log1mexp on both branches, at 0 and at -inf") {
  const double xs[] = {-1e-300, -1e-20, -1e-10, -1e-3, -0.1, -0.5, -0.69, -0.6931471805599453, -0.7,
                       -1,      -2,     -10,    -30,   -50,  -100, -700,  -800};
  for (double x : xs) {
    const ld ref = ref_log1mexp(x);
    CAPTURE(x);
    CHECK(std::fabs(tropd::log1mexp(x) - ref) <= 4e-16L * std::max<ld>(1e-300L, std::fabs(ref)));
    const float fx = static_cast<float>(x);
    if (fx == 0.0f) continue;  // -1e-300 underflows to -0 in float
    const ld fref = ref_log1mexp(fx);
    CHECK(std::fabs(tropd::log1mexp(fx) - fref) <= 3e-7L * std::max<ld>(1e-30L, std::fabs(fref)));
  }
  CHECK(tropd::log1mexp(0.0) == -dinf);
  CHECK(tropd::log1mexp(-0.0) == -dinf);
  CHECK(tropd::log1mexp(0.0f) == -finf);
  CHECK(tropd::log1mexp(-dinf) == 0.0);
  CHECK(tropd::log1mexp(-finf) == 0.0f);
  CHECK(std::isnan(tropd::log1mexp(0.5)));
  CHECK(std::isnan(tropd::log1mexp(1e-300)));
}

// ---------------------------------------------------------------------------
// lse_state
// ---------------------------------------------------------------------------

TEST_CASE("numerics: lse_state push / merge of random splits equals the single pass") {
  std::mt19937_64 rng(1234);
  std::normal_distribution<double> nd(0, 40);
  std::uniform_int_distribution<int> coin(0, 9);
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<double> x(500);
    for (auto& v : x) v = coin(rng) == 0 ? -dinf : nd(rng);
    vec xl(x.begin(), x.end());
    const ld ref = naive::logsumexp(xl);

    tropd::lse_state<double> single;
    for (double v : x) single.push(v);
    CHECK(std::fabs(single.value() - ref) <= 1e-14L * std::max<ld>(1, std::fabs(ref)));

    // Random split into pieces, each pushed on its own, merged in a random order.
    std::vector<size_t> cuts = {0, x.size()};
    for (int c = 0; c < 1 + trial % 7; ++c) cuts.push_back(std::uniform_int_distribution<size_t>(0, x.size())(rng));
    std::sort(cuts.begin(), cuts.end());
    std::vector<tropd::lse_state<double>> parts;
    for (size_t i = 0; i + 1 < cuts.size(); ++i) {
      tropd::lse_state<double> s;
      for (size_t j = cuts[i]; j < cuts[i + 1]; ++j) s.push(x[j]);
      parts.push_back(s);
    }
    std::shuffle(parts.begin(), parts.end(), rng);
    tropd::lse_state<double> left;  // left fold
    for (const auto& p : parts) left.merge(p);
    tropd::lse_state<double> right;  // right fold: (p0 + (p1 + (p2 + ...)))
    for (size_t i = parts.size(); i-- > 0;) {
      tropd::lse_state<double> t = parts[i];
      t.merge(right);
      right = t;
    }
    CHECK(std::fabs(left.value() - single.value()) <= 1e-14L * std::max<ld>(1, std::fabs(ref)));
    CHECK(std::fabs(right.value() - single.value()) <= 1e-14L * std::max<ld>(1, std::fabs(ref)));
  }
}

TEST_CASE("numerics: lse_state empty state and -inf elements") {
  tropd::lse_state<double> e;
  CHECK(e.value() == -dinf);
  e.push(-dinf);
  CHECK(e.value() == -dinf);
  tropd::lse_state<double> a;
  a.push(2.0);
  a.push(-dinf);
  CHECK(a.value() == 2.0);
  tropd::lse_state<double> b = a;
  b.merge(e);  // merging the empty state is the identity
  CHECK(b.value() == 2.0);
  tropd::lse_state<double> c;
  c.merge(a);
  CHECK(c.value() == 2.0);
  a.push(2.0);
  CHECK(std::fabs(a.value() - (2.0 + std::log(2.0))) <= 1e-15);
  tropd::lse_state<float> f;
  for (float v : {1000.0f, 999.0f, -finf, 1001.0f}) f.push(v);
  const ld ref = naive::logsumexp({1000.0L, 999.0L, 1001.0L});
  CHECK(std::fabs(f.value() - ref) <= 1e-4L);
}

// ---------------------------------------------------------------------------
// row_moments / summarize
// ---------------------------------------------------------------------------

namespace {

template <class F>
void check_summary_against_naive(const tropd::estimators::row_summary& s, const vec& a, const vec& b, ld tol) {
  const vec ls = naive::log_softmax(a), lt = naive::log_softmax(b);
  const ld lse_a = naive::logsumexp(a), lse_b = naive::logsumexp(b);
  CHECK(tropd_test::close_value(s.lse_s, lse_a, tol));
  CHECK(tropd_test::close_value(s.lse_t, lse_b, tol));
  CHECK(tropd_test::close_value(s.ent_s, naive::entropy(ls), tol));
  CHECK(tropd_test::close_value(s.ent_t, naive::entropy(lt), tol));
  const ld rkl = naive::reverse_kl(a, b).value, fkl = naive::forward_kl(a, b).value;
  if (std::isinf(rkl))
    CHECK(s.rkl == dinf);
  else
    CHECK(tropd_test::close_value(s.rkl, rkl, tol));
  if (std::isinf(fkl))
    CHECK(s.fkl == dinf);
  else
    CHECK(tropd_test::close_value(s.fkl, fkl, tol));
}

template <class F>
void row_moments_case(std::mt19937_64& rng, int n, double sd, int ninf_a, int ninf_b, ld tol) {
  std::normal_distribution<double> nd(0, sd);
  std::vector<F> a(static_cast<size_t>(n)), b(static_cast<size_t>(n));
  for (auto& v : a) v = static_cast<F>(nd(rng));
  for (auto& v : b) v = static_cast<F>(nd(rng));
  for (int i = 0; i < ninf_a; ++i) a[static_cast<size_t>((7 * i + 3) % n)] = -std::numeric_limits<F>::infinity();
  for (int i = 0; i < ninf_b; ++i) b[static_cast<size_t>((11 * i + 5) % n)] = -std::numeric_limits<F>::infinity();
  const vec al(a.begin(), a.end()), bl(b.begin(), b.end());

  tropd::estimators::row_moments<F> one;
  for (int i = 0; i < n; ++i) one.push(a[static_cast<size_t>(i)], b[static_cast<size_t>(i)]);
  check_summary_against_naive<F>(tropd::estimators::summarize(one), al, bl, tol);

  // Chunks of random sizes, each pushed element by element, merged in a random order.
  std::vector<tropd::estimators::row_moments<F>> parts;
  for (int i = 0; i < n;) {
    const int len = std::uniform_int_distribution<int>(1, 40)(rng);
    tropd::estimators::row_moments<F> m;
    for (int j = i; j < std::min(n, i + len); ++j) m.push(a[static_cast<size_t>(j)], b[static_cast<size_t>(j)]);
    parts.push_back(m);
    i += len;
  }
  std::shuffle(parts.begin(), parts.end(), rng);
  tropd::estimators::row_moments<F> merged;
  for (const auto& p : parts) merged.merge(p);
  check_summary_against_naive<F>(tropd::estimators::summarize(merged), al, bl, tol);
}

}  // namespace

TEST_CASE("numerics: row_moments merged chunks equal the one-by-one pass and the naive summary") {
  std::mt19937_64 rng(99);
  SUBCASE("double, finite") {
    for (int t = 0; t < 5; ++t) row_moments_case<double>(rng, 300, 3.0, 0, 0, 1e-12L);
  }
  SUBCASE("double, wide range") { row_moments_case<double>(rng, 300, 300.0, 0, 0, 1e-12L); }
  SUBCASE("double, -inf teacher entries (reverse KL infinite)") { row_moments_case<double>(rng, 200, 2.0, 0, 5, 1e-12L); }
  SUBCASE("double, -inf student entries (forward KL infinite)") { row_moments_case<double>(rng, 200, 2.0, 5, 0, 1e-12L); }
  SUBCASE("float, finite") { row_moments_case<float>(rng, 300, 3.0, 0, 0, 2e-5L); }
}

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
// Philox4x32-10
// ---------------------------------------------------------------------------

namespace {
void check_philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  r123::Philox4x32 ref;
  r123::Philox4x32::ctr_type rc = {{c0, c1, c2, c3}};
  r123::Philox4x32::key_type rk = {{k0, k1}};
  const auto want = ref(rc, rk);
  const auto got = tropd::philox4x32_10::apply({{c0, c1, c2, c3}}, {{k0, k1}});
  for (int i = 0; i < 4; ++i) CHECK(got.v[i] == want.v[i]);
}
}  // namespace

TEST_CASE("random: philox4x32_10 matches Random123's Philox4x32") {
  // Random123's known-answer vectors (kat_vectors: philox4x32 10 rounds).
  {
    const auto r = tropd::philox4x32_10::apply({{0, 0, 0, 0}}, {{0, 0}});
    CHECK(r.v[0] == 0x6627e8d5u);
    CHECK(r.v[1] == 0xe169c58du);
    CHECK(r.v[2] == 0xbc57ac4cu);
    CHECK(r.v[3] == 0x9b00dbd8u);
  }
  {
    const auto r = tropd::philox4x32_10::apply({{~0u, ~0u, ~0u, ~0u}}, {{~0u, ~0u}});
    CHECK(r.v[0] == 0x408f276du);
    CHECK(r.v[1] == 0x41c83b0eu);
    CHECK(r.v[2] == 0xa20bc7c6u);
    CHECK(r.v[3] == 0x6d5451fdu);
  }
  {
    const auto r = tropd::philox4x32_10::apply({{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
                                               {{0xa4093822u, 0x299f31d0u}});
    CHECK(r.v[0] == 0xd16cfe09u);
    CHECK(r.v[1] == 0x94fdccebu);
    CHECK(r.v[2] == 0x5001e420u);
    CHECK(r.v[3] == 0x24126ea1u);
  }
  check_philox(0, 0, 0, 0, 0, 0);
  check_philox(1, 0, 0, 0, 0, 0);
  check_philox(0, 0, 0, 1, 0, 0);
  check_philox(0, 0, 0, 0, 0, 1);
  check_philox(~0u, ~0u, ~0u, ~0u, ~0u, ~0u);
  std::mt19937_64 rng(2024);
  std::uniform_int_distribution<uint32_t> u32;
  for (int i = 0; i < 64; ++i) check_philox(u32(rng), u32(rng), u32(rng), u32(rng), u32(rng), u32(rng));
}

TEST_CASE("random: uniform_open0_closed1 lies in (0, 1], is deterministic and roughly uniform") {
  const int n = 200000;
  double sum = 0, sum_sq = 0;
  int below_quarter = 0, out_of_range = 0;
  tropd::draw_key k;
  k.seed = 0x123456789abcdefull;
  k.step = 3;
  k.stream = tropd::streams::trust_region;
  for (int i = 0; i < n; ++i) {
    k.sequence = static_cast<uint64_t>(i / 1000);
    k.position = static_cast<uint64_t>(i % 1000);
    const double u = tropd::uniform_open0_closed1(k);
    if (!(u > 0.0 && u <= 1.0)) ++out_of_range;
    sum += u;
    sum_sq += u * u;
    below_quarter += u < 0.25;
  }
  CHECK(out_of_range == 0);
  const double mean = sum / n;
  const double sigma = std::sqrt(1.0 / 12.0 / n);
  CHECK(std::fabs(mean - 0.5) < 5 * sigma);
  // E[u^2] = 1/3, Var[u^2] = 1/5 - 1/9.
  CHECK(std::fabs(sum_sq / n - 1.0 / 3.0) < 5 * std::sqrt((0.2 - 1.0 / 9.0) / n));
  CHECK(std::fabs(below_quarter / double(n) - 0.25) < 5 * std::sqrt(0.25 * 0.75 / n));

  tropd::draw_key a{42, 7, 8, 9, tropd::streams::trust_region};
  const double ua = tropd::uniform_open0_closed1(a);
  CHECK(tropd::uniform_open0_closed1(a) == ua);  // same key, same number
  tropd::draw_key b = a;
  b.stream = tropd::streams::prefix_fraction;
  CHECK(tropd::uniform_open0_closed1(b) != ua);
  tropd::draw_key c = a;
  c.step += 1ull << 32;  // high bits of the step are folded in, not dropped
  CHECK(tropd::uniform_open0_closed1(c) != ua);
  tropd::draw_key d = a;
  d.seed += 1ull << 32;  // both halves of the seed key the generator
  CHECK(tropd::uniform_open0_closed1(d) != ua);
  CHECK(tropd::log_uniform(a) <= 0.0);
  CHECK(std::fabs(tropd::log_uniform(a) - std::log(ua)) <= 1e-15);
}
