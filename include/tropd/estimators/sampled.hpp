// tropd/estimators/sampled.hpp: sampled-token estimators of KL(p_S || p_T) (method.md 2.1).
//
// With s = log p_S(y), t = log p_T(y), y ~ p_S, and r = exp(t - s):
//   k1 = s - t              unbiased, can be negative
//   k2 = 0.5 (s - t)^2      biased (second order), >= 0
//   k3 = (r - 1) - (t - s)  unbiased, >= 0
//
// How an estimator is *used* decides its gradient. `sampled<E, as_pg_reward>` puts the
// detached advantage A = -E(s_old, t) into a policy-gradient surrogate L = -rho A with
// rho = exp(s - s_old); `sampled<E, as_loss>` differentiates L = E(s, t) through s.
// Either way the gradient with respect to the student logits is dL/ds * (e_y - p).
//
//   pair                 E_y~p[grad]                      status
//   k1 as PG reward      p*(d - KL)  (reverse KL, OPD)    unbiased
//   k2 as loss           p*(d - KL)  (reverse KL)         unbiased
//   k3 as loss           p - q       (forward KL!)        documented
//   k2, k3 as PG reward  biased                           documented
//   k1 as loss           0                                rejected at compile time
//
// Inputs from the model runtime: the sampled token's log-probability under the student
// (current and rollout-time) and under the teacher. O(1) per token.
#pragma once

#include <type_traits>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>

namespace tropd::estimators {

/// k1 = s - t.
struct k1 {
  static constexpr const char* name = "k1";
  TROPD_HD static constexpr double value(double s, double t) noexcept { return s - t; }
  TROPD_HD static constexpr double dvalue_ds(double, double) noexcept { return 1.0; }
};
/// k2 = 0.5 (s - t)^2.
struct k2 {
  static constexpr const char* name = "k2";
  TROPD_HD static constexpr double value(double s, double t) noexcept { return 0.5 * (s - t) * (s - t); }
  TROPD_HD static constexpr double dvalue_ds(double s, double t) noexcept { return s - t; }
};
/// k3 = (r - 1) - log r with r = exp(t - s); computed as expm1(t - s) - (t - s).
struct k3 {
  static constexpr const char* name = "k3";
  TROPD_HD static double value(double s, double t) noexcept { return expm1_(t - s) - (t - s); }
  /// d k3 / ds = 1 - r.
  TROPD_HD static double dvalue_ds(double s, double t) noexcept { return -expm1_(t - s); }
};

/// Usage tag: the estimator's negative, evaluated at the rollout-time student log-prob
/// s_old, is a detached policy-gradient advantage A = -E(s_old, t); L = -rho * A.
struct as_pg_reward {
  static constexpr const char* name = "pg_reward";
};
/// Usage tag: the estimator is a loss L = E(s, t) differentiated through s.
struct as_loss {
  static constexpr const char* name = "loss";
};

/// A sampled-token estimator of one of the kinds above.
template <class E>
concept sampled_estimator = requires(double s, double t) {
  { E::value(s, t) } -> std::convertible_to<double>;
  { E::dvalue_ds(s, t) } -> std::convertible_to<double>;
};
/// One of the two usage tags.
template <class U>
concept estimator_usage = std::is_same_v<U, as_pg_reward> || std::is_same_v<U, as_loss>;

/// Per-token result of a sampled estimator.
struct sampled_result {
  double loss = 0;       ///< L (the surrogate for PG usage; its value is -rho*A)
  double dloss_ds = 0;   ///< dL/ds; the logit gradient is dloss_ds * (e_y - p)
  double advantage = 0;  ///< A for PG usage; for loss usage, -E(s, t) (a diagnostic)
  double estimate = 0;   ///< E evaluated at the current s (the divergence estimate)
};

/// A (estimator, usage) pair. k1 used as a differentiated loss does not compile.
template <sampled_estimator E, estimator_usage U>
struct sampled {
  static_assert(!(std::is_same_v<E, k1> && std::is_same_v<U, as_loss>),
                "tropd: k1 used as a differentiated loss has zero expected gradient "
                "(E_y~p[e_y - p] = 0), so it cannot train anything. Use "
                "sampled<k1, as_pg_reward> (OPD: the detached reward A = t - s_old) or "
                "sampled<k2, as_loss> (unbiased reverse-KL gradient).");
  using estimator = E;
  using usage = U;

  /// s: current student log-prob of y; s_old: rollout-time (detached); t: teacher log-prob.
  /// For PG usage rho = exp(s - s_old) (1 in value on the first update of a step).
  TROPD_HD sampled_result operator()(double s, double s_old, double t) const noexcept {
    sampled_result r;
    if constexpr (std::is_same_v<U, as_pg_reward>) {
      const double a = -E::value(s_old, t);
      const double rho = exp_(s - s_old);
      r.advantage = a;
      r.loss = -rho * a;
      r.dloss_ds = -rho * a;
    } else {
      r.loss = E::value(s, t);
      r.dloss_ds = E::dvalue_ds(s, t);
      r.advantage = -r.loss;
    }
    r.estimate = E::value(s, t);
    return r;
  }
};

}  // namespace tropd::estimators
