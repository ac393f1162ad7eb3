// Scalar numerics (core/numerics.hpp) and the mergeable row statistics
// (estimators/full_vocab.hpp: row_moments, summarize), each against an independent reference.
// 16-bit storage types: tests/core/test_types.cpp; Philox: tests/core/test_random.cpp.
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

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

/// log(1 - e^x) in long double: log(-expm1 x) where 1 - e^x is small, log1p(-e^x) where
/// e^x is small (either form alone loses digits of long double at the other end).
ld ref_log1mexp(ld x) { return x > -0.5L ? std::log(-std::expm1(x)) : std::log1p(-std::exp(x)); }

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
