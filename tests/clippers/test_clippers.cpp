// tropd/clippers/clippers.hpp on its own (method.md 3): no_clip and pg_clip (advantage clip,
// PPO ratio clip with eps_low / eps_high, dual clip) against the definition evaluated here in
// long double, over a grid of advantages and ratios on both sides of and inside the clip
// interval. The interval is asymmetric (eps_low != eps_high) throughout, so that an
// eps_low / eps_high swap, invisible under every symmetric setting, fails here; the same
// cases run through evaluate_tokens and the presets that take the two epsilons.
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

namespace cl = tropd::clippers;
using ld = long double;

namespace {

constexpr double dinf = std::numeric_limits<double>::infinity();
constexpr double dnan = std::numeric_limits<double>::quiet_NaN();

struct want {
  ld A = 0, loss = 0, dlds = 0;
  bool adv_clipped = false, ratio_clipped = false;
};

/// The definition (method.md 3): A' = clamp(A, adv_lo, adv_hi); with rho = e^(s - s_old),
/// L = max(-rho A', -clip(rho, 1 - eps_low, 1 + eps_high) A'), and for A' < 0 with a dual
/// clip c > 1, L = min(L, -c A'); dL/ds = -rho A' where -rho A' is the active branch, else 0.
want reference(const cl::pg_clip& c, double A, double s, double s_old) {
  want w;
  w.A = std::min<ld>(std::max<ld>(A, c.adv_lo), c.adv_hi);
  w.adv_clipped = w.A != ld(A);
  const ld rho = std::exp(ld(s) - ld(s_old));
  const ld lo = 1 - ld(c.eps_low), hi = 1 + ld(c.eps_high);
  const ld unclipped = -rho * w.A, clipped = -std::clamp(rho, lo, hi) * w.A;
  w.loss = std::max(unclipped, clipped);
  bool active_unclipped = !(clipped > unclipped);
  if (c.dual_c > 1 && w.A < 0 && -ld(c.dual_c) * w.A < w.loss) {
    w.loss = -ld(c.dual_c) * w.A;
    active_unclipped = false;
  }
  w.dlds = active_unclipped ? unclipped : 0;
  w.ratio_clipped = !active_unclipped;
  return w;
}

void check_term(const cl::clipped_term& got, const want& w) {
  const ld tol = 1e-14L * std::max<ld>(1, std::fabs(w.loss));
  CHECK(std::fabs(got.advantage - w.A) <= tol);
  CHECK(std::fabs(got.loss - w.loss) <= tol);
  CHECK(std::fabs(got.dloss_ds - w.dlds) <= tol);
  CHECK(got.adv_clipped == w.adv_clipped);
  CHECK(got.ratio_clipped == w.ratio_clipped);
}

/// eps_low = 0.1, eps_high = 0.4: rho is clipped to [0.9, 1.4] (swapped: [0.6, 1.1]).
cl::pg_clip asymmetric(double dual_c = 0) {
  cl::pg_clip c;
  c.eps_low = 0.1;
  c.eps_high = 0.4;
  c.dual_c = dual_c;
  return c;
}

const double ratios[] = {0.5, 0.75, 0.95, 1.0, 1.05, 1.25, 1.6, 2.5, 4.0};
const double advantages[] = {1.5, 0.3, 0.0, -0.7, -1.5};

}  // namespace

TEST_CASE("clippers: no_clip is L = dL/ds = -rho A") {
  const cl::no_clip c;
  CHECK(c.check().ok());
  for (double rho : ratios)
    for (double A : advantages) {
      const double s_old = -1.3, s = s_old + std::log(rho);
      const cl::clipped_term t = c(A, s, s_old);
      const ld r = std::exp(ld(s) - ld(s_old));
      CHECK(std::fabs(t.loss + r * A) <= 1e-15L);
      CHECK(std::fabs(t.dloss_ds + r * A) <= 1e-15L);
      CHECK(t.advantage == A);
      CHECK_FALSE(t.ratio_clipped);
      CHECK_FALSE(t.adv_clipped);
    }
}

TEST_CASE("clippers: pg_clip with eps_low != eps_high, rho below, inside and above the interval, dual clip on and off") {
  int clipped_low = 0, clipped_high = 0, inside = 0, dual = 0, swap_visible = 0;
  for (double dual_c : {0.0, 3.0}) {
    const cl::pg_clip c = asymmetric(dual_c);
    REQUIRE(c.check().ok());
    cl::pg_clip swapped = c;
    std::swap(swapped.eps_low, swapped.eps_high);
    for (double rho : ratios)
      for (double A : advantages) {
        CAPTURE(dual_c);
        CAPTURE(rho);
        CAPTURE(A);
        const double s_old = -2.0, s = s_old + std::log(rho);
        const want w = reference(c, A, s, s_old);
        check_term(c(A, s, s_old), w);
        const want ws = reference(swapped, A, s, s_old);
        swap_visible += std::fabs(ws.loss - w.loss) > 1e-6L || ws.ratio_clipped != w.ratio_clipped;
        clipped_low += w.ratio_clipped && rho < 0.9;
        clipped_high += w.ratio_clipped && rho > 1.4 && A > 0;
        inside += !w.ratio_clipped && rho > 0.9 && rho < 1.4 && A != 0;
        dual += dual_c > 0 && A < 0 && rho > 3;
      }
  }
  // Every region of the grid is exercised, and a swap of the two epsilons changes results.
  CHECK(clipped_low >= 4);
  CHECK(clipped_high >= 4);
  CHECK(inside >= 8);
  CHECK(dual >= 2);
  CHECK(swap_visible >= 8);
}

TEST_CASE("clippers: pg_clip's asymmetric interval, case by case") {
  const cl::pg_clip c = asymmetric();
  const double s_old = -1.0;
  auto at = [&](const cl::pg_clip& clip, double A, double rho) { return clip(A, s_old + std::log(rho), s_old); };
  // A > 0, rho = 1.25: inside [0.9, 1.4] -> unclipped, L = dL/ds = -1.875 (a swapped clip caps rho at 1.1).
  {
    const auto t = at(c, 1.5, 1.25);
    CHECK(t.loss == doctest::Approx(-1.875).epsilon(1e-14));
    CHECK(t.dloss_ds == doctest::Approx(-1.875).epsilon(1e-14));
    CHECK_FALSE(t.ratio_clipped);
  }
  // A < 0, rho = 0.75: below 1 - eps_low = 0.9 -> clipped, L = 0.9 * 1.5 = 1.35, dL/ds = 0
  // (a swapped clip would leave it inside [0.6, 1.1]).
  {
    const auto t = at(c, -1.5, 0.75);
    CHECK(t.loss == doctest::Approx(1.35).epsilon(1e-14));
    CHECK(t.dloss_ds == 0);
    CHECK(t.ratio_clipped);
  }
  // A > 0, rho = 1.6: above 1 + eps_high = 1.4 -> clipped, L = -1.4 * 1.5 = -2.1.
  {
    const auto t = at(c, 1.5, 1.6);
    CHECK(t.loss == doctest::Approx(-2.1).epsilon(1e-14));
    CHECK(t.dloss_ds == 0);
    CHECK(t.ratio_clipped);
  }
  // A > 0 at low rho and A < 0 at high rho: PPO takes the unclipped (larger) loss.
  {
    const auto t = at(c, 1.5, 0.5);
    CHECK(t.loss == doctest::Approx(-0.75).epsilon(1e-14));
    CHECK(t.dloss_ds == doctest::Approx(-0.75).epsilon(1e-14));
    CHECK_FALSE(t.ratio_clipped);
    const auto u = at(c, -1.5, 4.0);
    CHECK(u.loss == doctest::Approx(6.0).epsilon(1e-14));
    CHECK(u.dloss_ds == doctest::Approx(6.0).epsilon(1e-14));
    CHECK_FALSE(u.ratio_clipped);
  }
  // The dual clip (c = 3) caps L = -rho A at -3 A for A < 0 only.
  {
    const cl::pg_clip d = asymmetric(3.0);
    const auto t = at(d, -1.5, 4.0);
    CHECK(t.loss == doctest::Approx(4.5).epsilon(1e-14));
    CHECK(t.dloss_ds == 0);
    CHECK(t.ratio_clipped);
    const auto u = at(d, -1.5, 2.5);  // 3.75 < 4.5: the dual clip is not active
    CHECK(u.loss == doctest::Approx(3.75).epsilon(1e-14));
    CHECK_FALSE(u.ratio_clipped);
    const auto v = at(d, 1.5, 4.0);  // A > 0: the PPO clip at 1.4
    CHECK(v.loss == doctest::Approx(-2.1).epsilon(1e-14));
  }
  // One-sided clips: eps_low alone, eps_high alone (the other inf).
  {
    cl::pg_clip lo_only;
    lo_only.eps_low = 0.1;
    CHECK(at(lo_only, -1.5, 0.75).ratio_clipped);
    CHECK_FALSE(at(lo_only, 1.5, 5.0).ratio_clipped);
    cl::pg_clip hi_only;
    hi_only.eps_high = 0.4;
    CHECK(at(hi_only, 1.5, 1.6).ratio_clipped);
    CHECK_FALSE(at(hi_only, -1.5, 0.01).ratio_clipped);
  }
}

TEST_CASE("clippers: pg_clip's advantage clip applies before the ratio clip; -inf advantages get the floor") {
  cl::pg_clip c = asymmetric(3.0);
  c.adv_lo = -2.0;
  c.adv_hi = 0.5;
  REQUIRE(c.check().ok());
  for (double A : {-5.0, -2.0, -1.0, 0.25, 0.5, 0.9, -dinf})
    for (double rho : ratios) {
      CAPTURE(A);
      CAPTURE(rho);
      const double s_old = -0.5, s = s_old + std::log(rho);
      check_term(c(A, s, s_old), reference(c, A, s, s_old));
    }
  const auto t = c(-dinf, -1.0, -1.0);
  CHECK(t.advantage == -2.0);
  CHECK(t.adv_clipped);
  CHECK(t.loss == 2.0);
}

TEST_CASE("clippers: pg_clip check() rejects parameters outside the domain") {
  auto with = [](auto f) {
    cl::pg_clip c;
    f(c);
    return c.check().code == tropd::errc::invalid_parameter;
  };
  CHECK(cl::pg_clip{}.check().ok());
  CHECK(with([](cl::pg_clip& c) { c.adv_lo = dnan; }));
  CHECK(with([](cl::pg_clip& c) { c.adv_hi = dnan; }));
  CHECK(with([](cl::pg_clip& c) { c.adv_lo = 1; c.adv_hi = 0; }));
  CHECK(with([](cl::pg_clip& c) { c.eps_low = -0.1; }));
  CHECK(with([](cl::pg_clip& c) { c.eps_high = -0.1; }));
  CHECK(with([](cl::pg_clip& c) { c.eps_low = dnan; }));
  CHECK(with([](cl::pg_clip& c) { c.eps_high = dnan; }));
  CHECK(with([](cl::pg_clip& c) { c.dual_c = 1; }));
  CHECK(with([](cl::pg_clip& c) { c.dual_c = 0.5; }));
  CHECK(with([](cl::pg_clip& c) { c.dual_c = -3; }));
  CHECK(with([](cl::pg_clip& c) { c.dual_c = dnan; }));
  CHECK_FALSE(with([](cl::pg_clip& c) { c.eps_low = 0; c.eps_high = 0; }));
  CHECK_FALSE(with([](cl::pg_clip& c) { c.adv_lo = 0.5; c.adv_hi = 0.5; }));
  CHECK_FALSE(with([](cl::pg_clip& c) { c.dual_c = 1.0000001; }));
  CHECK(cl::no_clip{}.check().ok());
}

TEST_CASE("clippers: the asymmetric clip through evaluate_tokens and the presets that take eps_low / eps_high") {
  // One student token per (rho, A) pair of the grid; A = R = t - s_old, rho = e^(s - s_old).
  std::vector<double> s, s_old, t;
  std::vector<tropd::origin> from;
  for (double rho : ratios)
    for (double A : advantages) {
      if (A > 0) continue;  // t <= 0: R > 0 needs t > s_old, kept small below
      s_old.push_back(-2.0);
      s.push_back(-2.0 + std::log(rho));
      t.push_back(-2.0 + A);
      from.push_back(tropd::origin::student);
    }
  for (double rho : ratios) {  // A = +0.3 (t = -1.7)
    s_old.push_back(-2.0);
    s.push_back(-2.0 + std::log(rho));
    t.push_back(-1.7);
    from.push_back(tropd::origin::student);
  }
  const tropd::index_t n = static_cast<tropd::index_t>(s.size());
  const std::vector<tropd::index_t> off = {0, n};
  tropd::token_batch b;
  b.s = {s.data(), n};
  b.s_old = {s_old.data(), n};
  b.t = {t.data(), n};
  b.from = {from.data(), n};
  b.seq_offsets = {off.data(), 2};
  for (double dual_c : {0.0, 3.0}) {
    CAPTURE(dual_c);
    const cl::pg_clip c = asymmetric(dual_c);
    std::vector<double> dlds(static_cast<size_t>(n)), adv(static_cast<size_t>(n));
    std::vector<uint8_t> fl(static_cast<size_t>(n));
    double loss = 0;
    tropd::token_outputs out;
    out.dloss_ds = tropd::view_of(dlds);
    out.advantage = tropd::view_of(adv);
    out.flags = tropd::view_of(fl);
    out.loss = &loss;
    auto o = tropd::presets::opd({.clip = c});
    o.agg.how = tropd::aggregation::mode::sum_over_constant;  // weight 1 per token
    REQUIRE(tropd::host::evaluate_tokens(o, b, out).ok());
    ld total = 0;
    for (tropd::index_t i = 0; i < n; ++i) {
      CAPTURE(i);
      const size_t u = static_cast<size_t>(i);
      const want w = reference(c, t[u] - s_old[u], s[u], s_old[u]);
      total += w.loss;
      CHECK(std::fabs(dlds[u] - w.dlds) <= 1e-14L * std::max<ld>(1, std::fabs(w.dlds)));
      CHECK(std::fabs(adv[u] - w.A) <= 1e-15L);
      CHECK(((fl[u] & tropd::flags::ratio_clipped) != 0) == w.ratio_clipped);
    }
    CHECK(std::fabs(loss - total) <= 1e-13L * std::max<ld>(1, std::fabs(total)));
  }
  // The presets hand the two epsilons to the clip unswapped.
  const auto e = tropd::presets::eopd({.eps_low = 0.1, .eps_high = 0.4});
  CHECK(e.clip.eps_low == 0.1);
  CHECK(e.clip.eps_high == 0.4);
  const auto p = tropd::presets::opd({.clip = asymmetric(3.0)});
  CHECK(p.clip.eps_low == 0.1);
  CHECK(p.clip.eps_high == 0.4);
  CHECK(p.clip.dual_c == 3.0);
}
