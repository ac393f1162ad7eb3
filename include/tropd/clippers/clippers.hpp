// tropd/clippers/clippers.hpp: advantage and importance-ratio clipping of PG terms (method.md 3).
//
// For a PG term with advantage A and rho = exp(s - s_old):
//   A'  = clamp(A, adv_lo, adv_hi)                              (asymmetric advantage clip)
//   L   = max(-rho A', -clip(rho, 1 - eps_low, 1 + eps_high) A') (PPO; eps = inf turns it off)
//   L   = min(L, -dual_c A')   when A' < 0 and dual_c > 1         (dual clip; dual_c = 0 turns it off)
//   dL/ds = -rho A' when the unclipped branch is active, else 0.
#pragma once

#include <concepts>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>

namespace tropd::clippers {

struct clipped_term {
  double advantage = 0;   ///< A' after the advantage clip
  double loss = 0;        ///< surrogate L
  double dloss_ds = 0;    ///< dL/ds
  bool adv_clipped = false;
  bool ratio_clipped = false;
};

template <class C>
concept clipper = requires(const C& c, double a, double s, double s_old) {
  { c(a, s, s_old) } -> std::same_as<clipped_term>;
  { c.check() } -> std::same_as<status>;
};

/// No clipping: L = -rho A.
struct no_clip {
  static constexpr const char* name = "no_clip";
  TROPD_HD constexpr status check() const noexcept { return {}; }
  TROPD_HD clipped_term operator()(double a, double s, double s_old) const noexcept {
    const double rho = exp_(s - s_old);
    return clipped_term{a, -rho * a, -rho * a, false, false};
  }
};
static_assert(clipper<no_clip>);

/// Advantage clip + PPO ratio clip + dual clip; every part is off by default.
struct pg_clip {
  static constexpr const char* name = "pg_clip";
  double adv_lo = -inf<double>();
  double adv_hi = inf<double>();
  double eps_low = inf<double>();   ///< PPO: rho >= 1 - eps_low (0.2 typical)
  double eps_high = inf<double>();  ///< PPO: rho <= 1 + eps_high (0.2, or 0.28 "clip-higher")
  double dual_c = 0;                ///< dual clip constant (> 1, e.g. 3); 0 = off

  TROPD_HD constexpr status check() const noexcept {
    if (is_nan(adv_lo) || is_nan(adv_hi) || !(adv_lo <= adv_hi))
      return make_error(errc::invalid_parameter, "pg_clip: need adv_lo <= adv_hi");
    if (!(eps_low >= 0) || !(eps_high >= 0)) return make_error(errc::invalid_parameter, "pg_clip: eps must be >= 0");
    if (!(dual_c == 0 || dual_c > 1)) return make_error(errc::invalid_parameter, "pg_clip: dual_c must be 0 (off) or > 1");
    return {};
  }
  TROPD_HD clipped_term operator()(double a, double s, double s_old) const noexcept {
    clipped_term r;
    r.advantage = a < adv_lo ? adv_lo : (a > adv_hi ? adv_hi : a);
    r.adv_clipped = r.advantage != a;
    const double A = r.advantage;
    const double rho = exp_(s - s_old);
    const double lo = 1.0 - eps_low, hi = 1.0 + eps_high;
    const double rc = rho < lo ? lo : (rho > hi ? hi : rho);
    const double l1 = -rho * A, l2 = -rc * A;
    double L = l1;
    bool unclipped = true;
    if (l2 > l1) { L = l2; unclipped = false; }
    if (dual_c > 1 && A < 0 && -dual_c * A < L) { L = -dual_c * A; unclipped = false; }
    r.loss = L;
    r.dloss_ds = unclipped ? l1 : 0.0;
    r.ratio_clipped = !unclipped;
    return r;
  }
};
static_assert(clipper<pg_clip>);

}  // namespace tropd::clippers
