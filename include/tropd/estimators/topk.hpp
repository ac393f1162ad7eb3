// tropd/estimators/topk.hpp: forward KL on the teacher's top-k support (method.md 2.3).
//
//   FKL_k = sum_{v in K} qk_v (log qk_v - ls_v),   K = TopK_T(k)
//
// ls_v is the student's full-vocabulary log-probability gathered at the teacher's ids
// (the student's log-sum-exp always runs over the whole vocabulary). Three tail policies:
//
//   raw           qk = q (top-k mass S_K <= 1)       dL/dls_v = -q_v
//   renormalised  qk = q / S_K                       dL/dls_v = -q_v / S_K
//   tail_bucket   raw terms + (1 - S_K) log((1 - S_K) / (1 - P_K)),  P_K = sum_K p_v
//                 (a teacher tail 1 - S_K <= 1e-6 counts as empty: fp32 lists covering the
//                 whole vocabulary do not sum to exactly 1. A student tail 1 - P_K = 0 with a
//                 non-empty teacher tail is errc::infinite_divergence; estimated from the
//                 gathered log-probs alone, 1 - P_K < 1e-12 is taken as 0. The host row
//                 passes give eval the exact log(1 - P_K) from the whole student row.)
//                                                    dL/dls_v = -q_v + (1 - S_K) p_v / (1 - P_K)
//
// The rule works on log-probabilities at the K ids and returns the sparse gradient
// g_v = dL/d ls_v; the gradient with respect to the student logits is then
// dL/da_j = g_j - p_j sum_v g_v (zero-extended), e.g. S_K p - q for `raw`.
// For `tail_bucket`, g_v = -q_v + c p_v with c = (1 - S_K) / (1 - P_K), which can be ~1e15
// when the student's tail is tiny: folded into g, c p_v cancels against the c p_v P_K of
// p_j sum g in fp32. eval therefore returns the raw coefficients -q_v in g and c separately
// (topk_result::tail_coef); the dense gradient is then, exactly,
//   on the list:  g_j - p_j (sum g - (1 - S_K))     (= p_j - q_j for the tail bucket alone)
//   elsewhere:    -p_j (sum g - (1 - S_K) + c)       (= p_j (S_K - P_K) / (1 - P_K))
// which is how every row gradient writes it (core/sparse_terms.hpp). fold_tail() gives the
// folded g_v for callers that want dL/d ls_v itself (the token-level outputs).
//
// Teacher lists may come from an inference server: -inf entries are padding (their ids
// are ignored), entries need not be sorted, and for `renormalised` they need not be
// normalised. `raw` and `tail_bucket` require S_K <= 1 (+1e-4 tolerance, then clamped).
#pragma once

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>

namespace tropd::estimators {

enum class topk_tail : int { raw = 0, renormalised = 1, tail_bucket = 2 };

constexpr const char* to_string(topk_tail t) noexcept {
  return t == topk_tail::raw ? "raw" : (t == topk_tail::renormalised ? "renormalised" : "tail_bucket");
}

/// Result of one top-k forward KL evaluation.
struct topk_result {
  double value = 0;          ///< FKL_k
  double teacher_mass = 0;   ///< S_K (after validation; before renormalisation)
  double student_mass = 0;   ///< P_K
  double tail_coef = 0;      ///< tail_bucket: c = (1 - S_K) / (1 - P_K), NOT included in g (0: no tail term)
  double tail_teacher = 0;   ///< tail_bucket: the teacher's tail mass 1 - S_K where the bucket is used (else 0)
  status st{};               ///< infinite_divergence / invalid_topk_list on failure
};

/// Teacher top-k forward KL with a tail policy. Default k = 64, renormalised (the tropd preset).
struct topk_forward_kl {
  static constexpr const char* name = "topk_forward_kl";
  int k = 64;
  topk_tail tail = topk_tail::renormalised;
  /// tail_bucket: teacher tail masses 1 - S_K at or below this are treated as an empty bucket.
  static constexpr double tail_epsilon = 1e-6;
  /// tail_bucket: log(1 - P_K) below this (a student tail < 1e-12) is an infinite divergence.
  static constexpr double student_tail_log_floor = -27.631021115928547;  // log(1e-12)

  TROPD_HD constexpr status check() const noexcept {
    if (k < 1) return make_error(errc::invalid_parameter, "topk_forward_kl: k must be >= 1");
    if (tail != topk_tail::raw && tail != topk_tail::renormalised && tail != topk_tail::tail_bucket)
      return make_error(errc::invalid_parameter, "topk_forward_kl: unknown tail policy");
    return {};
  }

  /// n entries: lq[i] teacher log-prob (may be -inf: padding), ls[i] student log-prob at
  /// the same id (any indexable: pointers, values_row). Writes g[i] = dL/d ls_i without the
  /// tail bucket's c p_i (may be nullptr; see the header comment). Works in double.
  /// `log_student_tail` (tail_bucket only): log(1 - P_K) computed exactly by a caller that
  /// has the student's whole row (-inf: the student has no mass outside the list); NaN
  /// (the default) estimates it from the ls entries as log1mexp(logsumexp ls), which cannot
  /// resolve a student tail below ~1e-12 (then reported as infinite_divergence).
  template <class Q, class S>
  TROPD_HD topk_result eval(const Q& lq, const S& ls, int n, double* g,
                            double log_student_tail = quiet_nan<double>()) const noexcept {
    topk_result r;
    // Teacher mass in log space: log S_K = logsumexp of the finite entries, so unnormalised
    // lists (log-probs above 709, or all below -745) neither overflow nor underflow.
    double lse_q = -inf<double>(), pk = 0, lse_ls = -inf<double>();
    for (int i = 0; i < n; ++i) {
      if (double(lq[i]) == -inf<double>()) continue;
      lse_q = logaddexp(lse_q, double(lq[i]));
      pk += exp_(double(ls[i]));
      lse_ls = logaddexp(lse_ls, double(ls[i]));
      if (double(ls[i]) == -inf<double>()) {
        r.st = make_error(errc::infinite_divergence, "topk_forward_kl: the student gives zero mass to a teacher top-k id", -1, i);
        return r;
      }
    }
    if (lse_q == -inf<double>()) {
      r.st = make_error(errc::invalid_topk_list, "topk_forward_kl: the teacher top-k list has no finite entry");
      return r;
    }
    if (tail != topk_tail::renormalised) {
      if (lse_q > 9.9995000333308e-05) {  // log(1 + 1e-4)
        r.st = make_error(errc::invalid_topk_list,
                          "topk_forward_kl: teacher top-k mass exceeds 1; normalise the list or use the renormalised tail");
        return r;
      }
      lse_q = min_(lse_q, 0.0);
    }
    const double sk = exp_(lse_q);  // may be +inf for an unnormalised renormalised list (unused then)
    r.teacher_mass = sk;
    r.student_mass = pk;
    double val = 0;
    for (int i = 0; i < n; ++i) {
      const double lqi = double(lq[i]);
      if (lqi == -inf<double>()) {
        if (g) g[i] = 0;
        continue;
      }
      const double lsi = double(ls[i]);
      if (tail == topk_tail::renormalised) {
        const double lqn = lqi - lse_q;  // log of the renormalised teacher probability
        const double qn = exp_(lqn);
        val += qn * (lqn - lsi);
        if (g) g[i] = -qn;
      } else {
        const double q = exp_(lqi);
        val += q * (lqi - lsi);
        if (g) g[i] = -q;
      }
    }
    if (tail == topk_tail::tail_bucket) {
      // A teacher tail below 1e-6 is below the resolution of a sum of fp32 probabilities
      // (e.g. a list that covers the whole vocabulary sums to 1 - 1e-8): the bucket is empty.
      const double tail_t = -expm1_(lse_q);  // 1 - S_K
      if (tail_t > tail_epsilon) {
        const bool exact = log_student_tail == log_student_tail;  // not NaN
        const double log_tail_s = exact ? min_(log_student_tail, 0.0) : log1mexp(min_(lse_ls, 0.0));  // log(1 - P_K)
        // Estimated: a student tail below 1e-12 is below the resolution of log-probs gathered
        // from logits (the student's mass on K rounds to 1): the divergence is reported
        // infinite. Exact: only a student with no mass outside the list is.
        if (exact ? log_tail_s == -inf<double>() : log_tail_s < student_tail_log_floor) {
          r.st = make_error(errc::infinite_divergence,
                            "topk_forward_kl: the student puts all its mass on the teacher top-k but the teacher does not (tail bucket)");
          return r;
        }
        val += tail_t * (log_(tail_t) - log_tail_s);
        r.tail_coef = tail_t * exp_(-log_tail_s);  // (1 - S_K) / (1 - P_K)
        r.tail_teacher = tail_t;
      }
    }
    r.value = val;  // raw can be negative (S_K < 1); the others are >= 0 up to rounding
    return r;
  }
};

/// Whether a row backend may use the student tail estimated from the n listed log-probs,
/// log(1 - P_K) = log1mexp(logsumexp ls) = `estimate`, instead of summing the entries outside
/// the list (one more read of the row). Each listed log-prob carries an absolute rounding
/// error of ~eps |lse_s| (the logits' scale), so with n |lse_s| < 1e6 the listed mass is
/// known to ~2e-10, i.e. a tail above 1e-3 to a relative 2e-7 (and then surely > 0).
TROPD_HD constexpr bool tail_estimate_usable(double estimate, int n, double lse_s) noexcept {
  return estimate > -6.907755278982137 && double(n) * abs_(lse_s) < 1e6;  // log(1e-3)
}

/// Folds the tail bucket's c p_v into raw coefficients: g[i] += c exp(ls[i]) on the finite
/// entries, giving dL/d ls_i itself (see the header comment for why the row passes do not).
template <class Q, class S>
TROPD_HD inline void fold_tail(const Q& lq, const S& ls, int n, double c, double* g) noexcept {
  if (c == 0.0) return;
  for (int i = 0; i < n; ++i)
    if (double(lq[i]) != -inf<double>()) g[i] += c * exp_(double(ls[i]));
}

}  // namespace tropd::estimators
