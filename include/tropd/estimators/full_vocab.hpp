// tropd/estimators/full_vocab.hpp: full-vocabulary divergences (method.md 2.2) and the
// mergeable row statistics they are computed from.
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

namespace tropd::estimators {

/// Mergeable first-pass statistics of one row pair (or any part of it: a chunk, a
/// thread's share, a CUDA block, a vocabulary shard). With w = e^{a - ms}, v = e^{b - mt}:
///   ss = sum w,  es = sum w (a - ms),  xs = sum w ((a - ms) - (b - mt))
///   st = sum v,  et = sum v (b - mt),  xt = sum v ((b - mt) - (a - ms))
/// Terms with zero weight contribute 0 (so -inf entries are exact).
template <class F>
struct row_moments {
  F ms = -inf<F>(), ss = F(0), es = F(0), xs = F(0);
  F mt = -inf<F>(), st = F(0), et = F(0), xt = F(0);

  /// Re-expresses this state relative to new maxima (ms2 >= ms, mt2 >= mt).
  TROPD_HD constexpr void rebase(F ms2, F mt2) noexcept {
    if (ss > F(0)) {
      const F ds = ms - ms2;
      const F dt = (mt == -inf<F>()) ? -inf<F>() : mt - mt2;
      const F f = exp_(ds);
      es = f * (es + ss * ds);
      if (xs != inf<F>()) xs = f * (xs + ss * (ds - dt));  // +inf (support mismatch) stays +inf
      ss *= f;
    }
    if (st > F(0)) {
      const F dt = mt - mt2;
      const F ds = (ms == -inf<F>()) ? -inf<F>() : ms - ms2;
      const F f = exp_(dt);
      et = f * (et + st * dt);
      if (xt != inf<F>()) xt = f * (xt + st * (dt - ds));
      st *= f;
    }
    ms = ms2;
    mt = mt2;
  }
  /// Associative, commutative combination.
  TROPD_HD constexpr void merge(row_moments o) noexcept {
    const F ms2 = max_(ms, o.ms), mt2 = max_(mt, o.mt);
    rebase(ms2, mt2);
    o.rebase(ms2, mt2);
    ss += o.ss; es += o.es; xs += o.xs;
    st += o.st; et += o.et; xt += o.xt;
  }
  /// Adds one element pair (scalar path; backends may instead build chunk states).
  TROPD_HD constexpr void push(F a, F b) noexcept {
    row_moments one;
    one.ms = a;
    one.mt = b;
    if (a != -inf<F>()) one.ss = F(1);
    if (b != -inf<F>()) one.st = F(1);
    if (a != -inf<F>() && b == -inf<F>()) one.xs = inf<F>();
    if (b != -inf<F>() && a == -inf<F>()) one.xt = inf<F>();
    merge(one);
  }
};

/// What every full-vocabulary rule may read about its row, after the first pass.
struct row_summary {
  double lse_s = 0;  ///< log sum e^a
  double lse_t = 0;  ///< log sum e^b
  double rkl = 0;    ///< KL(p || q), may be +inf
  double fkl = 0;    ///< KL(q || p), may be +inf
  double ent_s = 0;  ///< H(p)
  double ent_t = 0;  ///< H(q)
  double sum0 = 0;   ///< second-pass sums of estimators that need them (see each estimator)
  double sum1 = 0;
};

/// Which row_summary fields a caller reads after the first pass. lse_s and lse_t are always
/// computed; a backend may skip the sums behind the others (es -> ent_s, et -> ent_t,
/// xs -> rkl, xt -> fkl) where a flag is false, and then sets those fields to NaN (never a
/// silently wrong value). The CPU row passes use it (host/rows.hpp, row_pass1); user-visible
/// summaries (divergence_rows' `summaries`) are always complete.
struct moments_needed {
  bool ent_s = true;  ///< row_summary::ent_s
  bool ent_t = true;  ///< row_summary::ent_t
  bool rkl = true;    ///< row_summary::rkl
  bool fkl = true;    ///< row_summary::fkl
  constexpr moments_needed operator|(moments_needed o) const noexcept {
    return {ent_s || o.ent_s, ent_t || o.ent_t, rkl || o.rkl, fkl || o.fkl};
  }
  friend constexpr bool operator==(const moments_needed&, const moments_needed&) = default;
};
/// Every field (the default wherever a caller's needs are not known).
inline constexpr moments_needed all_moments{};
/// Only the two log-sum-exps.
inline constexpr moments_needed lse_only{false, false, false, false};

/// The summary fields a full-vocabulary estimator's value / finite / grad read: its
/// `summary_reads` member, or every field for an estimator that does not declare one.
/// (sum0 / sum1 come from the second pass, which reads only lse_s and lse_t.)
template <class E>
constexpr moments_needed summary_reads_of() noexcept {
  if constexpr (requires { E::summary_reads; })
    return moments_needed(E::summary_reads);
  else
    return all_moments;
}

/// Finalises first-pass moments into a summary. Requires ss > 0 and st > 0.
template <class F>
TROPD_HD inline row_summary summarize(const row_moments<F>& m) noexcept {
  row_summary r;
  const double ss = m.ss, st = m.st;
  const double lss = log_(ss), lst = log_(st);
  r.lse_s = double(m.ms) + lss;
  r.lse_t = double(m.mt) + lst;
  r.rkl = double(m.xs) / ss - lss + lst;
  r.fkl = double(m.xt) / st - lst + lss;
  r.ent_s = lss - double(m.es) / ss;
  r.ent_t = lst - double(m.et) / st;
  // Exact zero floors: rounding can give -1e-9 for identical rows.
  r.rkl = max_(r.rkl, 0.0);
  r.fkl = max_(r.fkl, 0.0);
  return r;
}

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
/// beta = 0 is defined as forward KL and beta = 1 as reverse KL. log m is computed as
/// logaddexp(lt + log beta, ls + log(1 - beta)), never by mixing probabilities.
/// Second-pass sums: sum0 = sum q (lt - log m), sum1 = sum p (ls - log m) = <g>_p.
struct jsd {
  static constexpr const char* name = "jsd";
  static constexpr bool second_pass = true;
  /// fkl (beta = 0) and rkl (beta = 1; grad_lm also evaluates g_rkl before selecting);
  /// the mixture itself reads only sum0 / sum1.
  static constexpr moments_needed summary_reads{false, false, true, true};
  double beta = 0.5;

  TROPD_HD constexpr status check() const noexcept {
    if (!(beta >= 0.0 && beta <= 1.0)) return make_error(errc::invalid_parameter, "jsd: beta must lie in [0, 1]");
    return {};
  }
  /// log m = logaddexp(lt + wt, ls + ws) with wt = log beta, ws = log(1 - beta).
  TROPD_HD void log_m_weights(double& wt, double& ws) const noexcept {
    wt = log_(beta);
    ws = log1p_(-beta);
  }
  template <class F>
  TROPD_HD F log_m(F ls, F lt) const noexcept {
    double wt, ws;
    log_m_weights(wt, ws);
    return logaddexp(lt + F(wt), ls + F(ws));
  }
  /// The two second-pass terms of one element given lm = log_m(ls, lt): q (lt - lm) and
  /// p (ls - lm), 0 where the weight is 0 (and both 0 for beta = 0 or 1, which need no second
  /// pass). A backend may compute log m and sum the terms vectorised.
  template <class F>
  TROPD_HD void terms_lm(F ls, F lt, F lm, F p, F q, F& t0, F& t1) const noexcept {
    const bool mix = beta > 0.0 && beta < 1.0;
    const F a = q * (lt - lm), b = p * (ls - lm);
    t0 = mix && q > F(0) ? a : F(0);
    t1 = mix && p > F(0) ? b : F(0);
  }
  /// accumulate() given lm = log_m(ls, lt).
  template <class F>
  TROPD_HD void accumulate_lm(F ls, F lt, F lm, F p, F q, double* acc) const noexcept {
    if (beta <= 0.0 || beta >= 1.0) return;
    F t0, t1;
    terms_lm(ls, lt, lm, p, q, t0, t1);
    acc[0] += double(t0);
    acc[1] += double(t1);
  }
  template <class F>
  TROPD_HD void accumulate(F ls, F lt, F p, F q, double* acc) const noexcept {
    if (beta <= 0.0 || beta >= 1.0) return;
    accumulate_lm(ls, lt, log_m(ls, lt), p, q, acc);
  }
  TROPD_HD double value(const row_summary& r) const noexcept {
    if (beta <= 0.0) return r.fkl;
    if (beta >= 1.0) return r.rkl;
    return max_(beta * r.sum0 + (1.0 - beta) * r.sum1, 0.0);
  }
  TROPD_HD constexpr bool finite(const row_summary& r) const noexcept {
    return beta <= 0.0 ? r.fkl < inf<double>() : (beta >= 1.0 ? r.rkl < inf<double>() : true);
  }
  /// grad() given lm = log_m(ls, lt) (read only for 0 < beta < 1). Branch-free in the element
  /// values (computed, then selected), so a backend's loop over a row vectorises.
  template <class F>
  TROPD_HD F grad_lm(F ls, F lt, F lm, F p, F q, const row_summary& r) const noexcept {
    const F g_fkl = p - q;                                      // beta = 0
    const F g_rkl = p * ((ls - lt) - F(r.rkl));                 // beta = 1
    const F g_mix = F(1.0 - beta) * p * ((ls - lm) - F(r.sum1));  // 0 < beta < 1
    const F g = beta >= 1.0 ? g_rkl : g_mix;
    const F g0 = p > F(0) ? g : F(0);
    return beta <= 0.0 ? g_fkl : g0;
  }
  template <class F>
  TROPD_HD F grad(F ls, F lt, F p, F q, const row_summary& r) const noexcept {
    if (beta <= 0.0 || beta >= 1.0 || !(p > F(0))) return grad_lm(ls, lt, F(0), p, q, r);
    return grad_lm(ls, lt, log_m(ls, lt), p, q, r);
  }
};
static_assert(full_vocab_divergence<jsd>);

/// Total variation 0.5 sum |p - q| (a diagnostic; E[1 - M] of the trust region equals it).
/// Second-pass sums: sum0 = sum |p - q|, sum1 = sum p sgn(p - q).
struct total_variation {
  static constexpr const char* name = "total_variation";
  static constexpr bool second_pass = true;
  static constexpr moments_needed summary_reads{false, false, false, false};  ///< only sum0 / sum1
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
  TROPD_HD constexpr double value(const row_summary& r) const noexcept { return 0.5 * r.sum0; }
  TROPD_HD constexpr bool finite(const row_summary&) const noexcept { return true; }
  template <class F>
  TROPD_HD constexpr F grad(F, F, F p, F q, const row_summary& r) const noexcept {
    const F d = p - q;
    const F sg = F(d > F(0)) - F(d < F(0));
    return F(0.5) * p * (sg - F(r.sum1));
  }
};
static_assert(full_vocab_divergence<total_variation>);

}  // namespace tropd::estimators
