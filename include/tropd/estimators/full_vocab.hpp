// tropd/estimators/full_vocab.hpp: full-vocabulary divergences (method.md 2.2) and the
// rules that turn the row statistics (estimators/row_moments.hpp) into values and gradients.
//
// Notation per row: a = z / T_S, b = u / T_T (student and teacher logits over a temperature),
// ls = a - lse(a) = log p, lt = b - lse(b) = log q, d = ls - lt.
//
//   reverse_kl       sum p (ls - lt)                          grad_a = p * (d - KL)
//   forward_kl       sum q (lt - ls)                          grad_a = p - q
//   jsd{beta}        beta KL(q||m) + (1-beta) KL(p||m),       grad_a = (1-beta) p (g - <g>_p),
//                    m = beta q + (1-beta) p                  g = ls - log m
//                    (beta = 0 is forward KL, beta = 1 reverse KL, by definition)
//   total_variation  0.5 sum |p - q|                          grad_a = 0.5 p (sgn(p-q) - <sgn>_p)
//
// The gradient with respect to the logits z is grad_a / T_S.
//
// -inf logits are legal and mean zero mass. Where the divergence is infinite (reverse KL
// with q_v = 0 < p_v, forward KL with p_v = 0 < q_v) the row reports errc::infinite_divergence.
//
// Each estimator is a policy: an aggregate whose TROPD_HD members give the value from a
// `row_summary` and the per-element gradient; the CPU backend and the CUDA kernels call
// the same members.
#pragma once

#include <concepts>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>
#include <tropd/estimators/row_moments.hpp>

namespace tropd::estimators {

/// A full-vocabulary divergence policy (see reverse_kl for the members it must have).
template <class E>
concept full_vocab_divergence = requires(const E& e, double x, double* acc, const row_summary& r) {
  { E::second_pass } -> std::convertible_to<bool>;
  { e.check() } -> std::same_as<status>;
  { e.accumulate(x, x, x, x, acc) };
  { e.value(r) } -> std::convertible_to<double>;
  { e.finite(r) } -> std::convertible_to<bool>;
  { e.grad(x, x, x, x, r) } -> std::convertible_to<double>;
};

/// KL(p_S || p_T) over the full vocabulary.
struct reverse_kl {
  static constexpr const char* name = "reverse_kl";
  static constexpr bool second_pass = false;
  static constexpr moments_needed summary_reads{false, false, true, false};  ///< rkl
  TROPD_HD constexpr status check() const noexcept { return {}; }
  template <class F>
  TROPD_HD constexpr void accumulate(F, F, F, F, double*) const noexcept {}
  TROPD_HD constexpr double value(const row_summary& r) const noexcept { return r.rkl; }
  TROPD_HD constexpr bool finite(const row_summary& r) const noexcept { return r.rkl < inf<double>(); }
  /// dL/da_v = p_v (ls_v - lt_v - KL); 0 where p_v = 0.
  template <class F>
  TROPD_HD constexpr F grad(F ls, F lt, F p, F, const row_summary& r) const noexcept {
    // Evaluated unconditionally and then selected (not a branch), so the host loop over a
    // row vectorises: a conditional fp32 conversion could trap and blocks if-conversion.
    const F g = p * ((ls - lt) - F(r.rkl));
    return p > F(0) ? g : F(0);
  }
};
static_assert(full_vocab_divergence<reverse_kl>);

/// KL(p_T || p_S) over the full vocabulary.
struct forward_kl {
  static constexpr const char* name = "forward_kl";
  static constexpr bool second_pass = false;
  static constexpr moments_needed summary_reads{false, false, false, true};  ///< fkl
  TROPD_HD constexpr status check() const noexcept { return {}; }
  template <class F>
  TROPD_HD constexpr void accumulate(F, F, F, F, double*) const noexcept {}
  TROPD_HD constexpr double value(const row_summary& r) const noexcept { return r.fkl; }
  TROPD_HD constexpr bool finite(const row_summary& r) const noexcept { return r.fkl < inf<double>(); }
  /// dL/da_v = p_v - q_v.
  template <class F>
  TROPD_HD constexpr F grad(F, F, F p, F q, const row_summary&) const noexcept { return p - q; }
};
static_assert(full_vocab_divergence<forward_kl>);

/// Generalised Jensen-Shannon divergence (GKD / TRL convention):
/// JSD_beta = beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p.
/// beta = 0 is defined as forward KL and beta = 1 as reverse KL.
///
/// log m = log(beta q + (1 - beta) p): the probabilities are mixed, then one logarithm is
/// taken (never a mix of log-probabilities, which is a different quantity). Where m is a
/// normal number this is more accurate than the log-space form logaddexp(lt + log beta,
/// ls + log(1 - beta)), whose additions round at the scale of |lt| (about 2e-6 at -20 in fp32),
/// and it costs one log and no exp once p and q are known. Where m underflows (below the
/// smallest normal number) the element's terms, below 1e-35 here, are taken as 0.
/// Second-pass sums: second[0] = sum q (lt - log m) = KL(q || m), second[1] = sum p (ls - log m)
/// = KL(p || m) = <g>_p, with g = ls - log m.
struct jsd {
  static constexpr const char* name = "jsd";
  static constexpr bool second_pass = true;
  /// fkl (beta = 0) and rkl (beta = 1; grad_lm also evaluates g_rkl before selecting);
  /// the mixture itself reads only second[0] / second[1].
  static constexpr moments_needed summary_reads{false, false, true, true};
  double beta = 0.5;

  TROPD_HD constexpr status check() const noexcept {
    if (!(beta >= 0.0 && beta <= 1.0)) return make_error(errc::invalid_parameter, "jsd: beta must lie in [0, 1]");
    return {};
  }
  TROPD_HD constexpr bool mixture() const noexcept { return beta > 0.0 && beta < 1.0; }
  /// log m for one element or one packet (Ops: estimators::scalar_ops or a backend's packet
  /// ops with set1 / add / mul / lt / select / log): log(beta q + (1 - beta) p), -inf where m
  /// is below the smallest normal number (see above).
  template <class Ops, class V>
  TROPD_HD V log_m(V p, V q) const noexcept {
    using F = typename Ops::scalar;
    const V m = Ops::add(Ops::mul(Ops::set1(F(beta)), q), Ops::mul(Ops::set1(F(1.0 - beta)), p));
    return Ops::select(Ops::lt(m, Ops::set1(min_normal<F>())), Ops::set1(-inf<F>()), Ops::log(m));
  }
  template <class F>
  TROPD_HD F log_m(F p, F q) const noexcept {
    return log_m<scalar_ops<F>, F>(p, q);
  }
  /// The two second-pass terms of one element given lm = log_m(p, q): q (lt - lm) and
  /// p (ls - lm), 0 where the weight is 0 or m underflowed (and both 0 for beta = 0 or 1,
  /// which need no second pass). A backend may compute log m for a chunk vectorised.
  template <class F>
  TROPD_HD void terms_lm(F ls, F lt, F lm, F p, F q, F& t0, F& t1) const noexcept {
    const bool use = mixture() && lm > -inf<F>();
    const F a = q * (lt - lm), b = p * (ls - lm);
    t0 = use && q > F(0) ? a : F(0);
    t1 = use && p > F(0) ? b : F(0);
  }
  template <class F>
  TROPD_HD void accumulate(F ls, F lt, F p, F q, double* acc) const noexcept {
    if (!mixture()) return;
    F t0, t1;
    terms_lm(ls, lt, log_m(p, q), p, q, t0, t1);
    acc[0] += double(t0);
    acc[1] += double(t1);
  }
  /// KL(q || m) and KL(p || m) from the second-pass sums.
  TROPD_HD static constexpr double kl_teacher_to_mix(const row_summary& r) noexcept { return r.second[0]; }
  TROPD_HD static constexpr double kl_student_to_mix(const row_summary& r) noexcept { return r.second[1]; }
  TROPD_HD double value(const row_summary& r) const noexcept {
    if (beta <= 0.0) return r.fkl;
    if (beta >= 1.0) return r.rkl;
    return max_(beta * kl_teacher_to_mix(r) + (1.0 - beta) * kl_student_to_mix(r), 0.0);
  }
  TROPD_HD constexpr bool finite(const row_summary& r) const noexcept {
    return beta <= 0.0 ? r.fkl < inf<double>() : (beta >= 1.0 ? r.rkl < inf<double>() : true);
  }
  /// grad() given lm = log_m(p, q) (read only for 0 < beta < 1). Branch-free in the element
  /// values (computed, then selected), so a backend's loop over a row vectorises.
  template <class F>
  TROPD_HD F grad_lm(F ls, F lt, F lm, F p, F q, const row_summary& r) const noexcept {
    const F g_fkl = p - q;                                                    // beta = 0
    const F g_rkl = p * ((ls - lt) - F(r.rkl));                               // beta = 1
    const F g_mix = F(1.0 - beta) * p * ((ls - lm) - F(kl_student_to_mix(r)));  // 0 < beta < 1
    const F g_mix0 = lm > -inf<F>() ? g_mix : F(0);
    const F g = beta >= 1.0 ? g_rkl : g_mix0;
    const F g0 = p > F(0) ? g : F(0);
    return beta <= 0.0 ? g_fkl : g0;
  }
  template <class F>
  TROPD_HD F grad(F ls, F lt, F p, F q, const row_summary& r) const noexcept {
    return grad_lm(ls, lt, mixture() ? log_m(p, q) : F(0), p, q, r);
  }
};
static_assert(full_vocab_divergence<jsd>);

/// Total variation 0.5 sum |p - q| (a diagnostic; E[1 - M] of the trust region equals it).
/// Second-pass sums: second[0] = sum |p - q|, second[1] = sum p sgn(p - q) = <sgn(p - q)>_p.
struct total_variation {
  static constexpr const char* name = "total_variation";
  static constexpr bool second_pass = true;
  static constexpr moments_needed summary_reads{false, false, false, false};  ///< only second[0] / second[1]
  TROPD_HD constexpr status check() const noexcept { return {}; }
  /// The two second-pass terms of one element: |p - q| and p sgn(p - q) (branch-free: the
  /// signs are random, and a backend may sum the terms vectorised).
  template <class F>
  TROPD_HD constexpr void terms(F, F, F p, F q, F& t0, F& t1) const noexcept {
    const F d = p - q;
    const F sg = F(d > F(0)) - F(d < F(0));
    t0 = abs_(d);
    t1 = p * sg;
  }
  template <class F>
  TROPD_HD constexpr void accumulate(F ls, F lt, F p, F q, double* acc) const noexcept {
    F t0 = F(0), t1 = F(0);
    terms(ls, lt, p, q, t0, t1);
    acc[0] += double(t0);
    acc[1] += double(t1);
  }
  TROPD_HD constexpr double value(const row_summary& r) const noexcept { return 0.5 * r.second[0]; }
  TROPD_HD constexpr bool finite(const row_summary&) const noexcept { return true; }
  template <class F>
  TROPD_HD constexpr F grad(F, F, F p, F q, const row_summary& r) const noexcept {
    const F d = p - q;
    const F sg = F(d > F(0)) - F(d < F(0));
    return F(0.5) * p * (sg - F(r.second[1]));
  }
};
static_assert(full_vocab_divergence<total_variation>);

}  // namespace tropd::estimators
