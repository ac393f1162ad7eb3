// tropd/estimators/rewards.hpp: trust-part estimators of the objective (method.md 3, 5, 6).
//
// A trust estimator turns one on-policy token into either a detached policy-gradient
// advantage A (the objective then forms the clipped surrogate L = -rho A) or a directly
// differentiated loss L(s) with dL/ds. Inputs (core/token.hpp): s, s_old, t (log-probs of the
// sampled token) and, for some, a per-token extra (the detached reverse KL for vOPD, a reference
// model's log-prob for G-OPD).
//
//   k1_reward           A = R = t - s_old                                   (OPD)
//   sampled_term<E, U>  any sampled<E, U> pair of estimators/sampled.hpp    (k2/k3 losses, ...)
//   vopd_reward         A = R + KL_t (KL_t: detached per-position reverse KL, a control variate)
//   gopd_reward{l}      A = l (t - ref) - (s_old - ref)                     (G-OPD / ExOPD)
//   proximal_reward{a,c} A = c log(a e^R + 1 - a), >= c log(1 - a)         (TOP-D; JSD arm with a = beta, c = 1 - beta)
#pragma once

#include <concepts>
#include <type_traits>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token.hpp>
#include <tropd/estimators/sampled.hpp>

namespace tropd::estimators {

/// A trust estimator's answer: a PG advantage (pg = true) or a direct loss.
struct trust_value {
  bool pg = true;
  double advantage = 0;  ///< A (pg)
  double loss = 0;       ///< L (direct)
  double dloss_ds = 0;   ///< dL/ds (direct)
};

template <class E>
concept trust_estimator = requires(const E& e, const token& tt) {
  { e(tt) } -> std::same_as<trust_value>;
  { e.check() } -> std::same_as<status>;
  { E::needs_rkl } -> std::convertible_to<bool>;
  { E::needs_ref } -> std::convertible_to<bool>;
};

/// OPD's reward: A = t - s_old (the k1 estimator used as a PG reward).
struct k1_reward {
  static constexpr const char* name = "k1_reward";
  static constexpr bool needs_rkl = false, needs_ref = false;
  TROPD_HD constexpr status check() const noexcept { return {}; }
  TROPD_HD constexpr trust_value operator()(const token& x) const noexcept {
    return trust_value{true, x.t - x.s_old, 0, 0};
  }
};
static_assert(trust_estimator<k1_reward>);

/// Any (estimator, usage) pair from estimators/sampled.hpp as the trust term.
template <class E, class U>
struct sampled_term {
  static constexpr const char* name = "sampled_term";
  static constexpr bool needs_rkl = false, needs_ref = false;
  sampled<E, U> est{};
  TROPD_HD constexpr status check() const noexcept { return {}; }
  TROPD_HD trust_value operator()(const token& x) const noexcept {
    if constexpr (std::is_same_v<U, as_pg_reward>) {
      return trust_value{true, -E::value(x.s_old, x.t), 0, 0};
    } else {
      const sampled_result r = est(x.s, x.s_old, x.t);
      return trust_value{false, r.advantage, r.loss, r.dloss_ds};
    }
  }
};
static_assert(trust_estimator<sampled_term<k2, as_loss>>);

/// vOPD: A = R + KL_t with KL_t the detached per-position reverse KL (a baseline).
struct vopd_reward {
  static constexpr const char* name = "vopd_reward";
  static constexpr bool needs_rkl = true, needs_ref = false;
  TROPD_HD constexpr status check() const noexcept { return {}; }
  TROPD_HD constexpr trust_value operator()(const token& x) const noexcept {
    return trust_value{true, (x.t - x.s_old) + x.rkl, 0, 0};
  }
};
static_assert(trust_estimator<vopd_reward>);

/// G-OPD / ExOPD reward extrapolation: A = lambda (t - ref) - (s_old - ref).
struct gopd_reward {
  static constexpr const char* name = "gopd_reward";
  static constexpr bool needs_rkl = false, needs_ref = true;
  double lambda = 1.25;
  TROPD_HD constexpr status check() const noexcept {
    if (!is_finite(lambda)) return make_error(errc::invalid_parameter, "gopd_reward: lambda must be finite");
    return {};
  }
  TROPD_HD constexpr trust_value operator()(const token& x) const noexcept {
    return trust_value{true, lambda * (x.t - x.ref) - (x.s_old - x.ref), 0, 0};
  }
};
static_assert(trust_estimator<gopd_reward>);

/// Proximal reward A = scale * log(alpha e^R + 1 - alpha), computed as
/// scale * logaddexp(log alpha + R, log(1 - alpha)); bounded below by scale * log(1 - alpha).
/// TOP-D: scale = 1. The JSD arm's sampled term: alpha = beta, scale = 1 - beta.
struct proximal_reward {
  static constexpr const char* name = "proximal_reward";
  static constexpr bool needs_rkl = false, needs_ref = false;
  double alpha = 0.5;
  double scale = 1.0;
  TROPD_HD constexpr status check() const noexcept {
    if (!(alpha > 0 && alpha < 1)) return make_error(errc::invalid_parameter, "proximal_reward: alpha must lie in (0, 1)");
    if (!is_finite(scale)) return make_error(errc::invalid_parameter, "proximal_reward: scale must be finite");
    return {};
  }
  TROPD_HD trust_value operator()(const token& x) const noexcept {
    const double a = logaddexp(log_(alpha) + (x.t - x.s_old), log1p_(-alpha));
    return trust_value{true, scale * a, 0, 0};
  }
};
static_assert(trust_estimator<proximal_reward>);

}  // namespace tropd::estimators
