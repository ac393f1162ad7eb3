// tropd/estimators/row_moments.hpp: the mergeable statistics of a row pair that every
// full-vocabulary quantity is computed from, and the one rule that builds them.
//
// Per row: a = z / T_S and b = u / T_T (student and teacher logits over their temperatures).
// Relative to running maxima M_s >= max a and M_t >= max b, with w = e^{a - M_s}, v = e^{b - M_t}:
//
//   mass_s   = sum w                            lse_s = M_s + log mass_s
//   moment_s = sum w (a - M_s)                  H(p)  = log mass_s - moment_s / mass_s
//   cross_s  = sum w ((a - M_s) - (b - M_t))    KL(p || q) = cross_s / mass_s - log mass_s + log mass_t
//   mass_t, moment_t, cross_t                   the same with the roles of a and b swapped
//                                               (H(q), KL(q || p))
//
// The support rule: an element with zero weight adds exactly 0 (a -inf logit, or one whose
// e^{x - M} underflows), except that cross_s is +inf as soon as some a > -inf = b (the
// student supports an entry the teacher does not: KL(p || q) = +inf), and cross_t likewise.
// The rule follows supports, not exp underflow, so the infinite-divergence decision is the
// same in fp32 and fp64. `moment_element` is that rule for one element (or one packet of
// elements): the CPU's vectorised chunk sums, the GPU kernels and row_moments::push call it.
//
// row_moments merge associatively (rebase to common maxima, then add), so chunks, threads,
// CUDA blocks and vocabulary shards combine in any grouping.
#pragma once

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>

namespace tropd::estimators {

/// Arithmetic of moment_element on scalars (host and device). A backend that evaluates the
/// rule on packets supplies the same members for its packet type (host/simd.hpp).
template <class F>
struct scalar_ops {
  using scalar = F;
  TROPD_HD static constexpr F set1(F x) noexcept { return x; }
  TROPD_HD static constexpr F add(F x, F y) noexcept { return x + y; }
  TROPD_HD static constexpr F sub(F x, F y) noexcept { return x - y; }
  TROPD_HD static constexpr F mul(F x, F y) noexcept { return x * y; }
  TROPD_HD static constexpr bool lt(F x, F y) noexcept { return x < y; }
  TROPD_HD static constexpr F select(bool m, F x, F y) noexcept { return m ? x : y; }
  TROPD_HD static F exp_nonpos(F x) noexcept { return exp_(x); }
  TROPD_HD static F log(F x) noexcept { return log_(x); }
};

/// Below this, e^x is taken as exactly 0: vectorised exps clamp their argument and return
/// ~e^-88 (fp32) / ~e^-709 (fp64) for anything smaller, which times a huge negative
/// log-ratio (a logit masked with finfo.min instead of -inf) would give an O(1) error.
template <class F>
inline constexpr F exp_floor = sizeof(F) == 4 ? F(-87) : F(-708);

/// What one element pair (a, b) adds to row_moments centred at (ms, mt), into
/// out[moment_w .. moment_cross_t] (see the header comment); `has_t` false: student only (the
/// teacher terms are 0). V is a scalar or a backend's packet, Ops its arithmetic.
enum moment_term : int { moment_w = 0, moment_w_da, moment_cross_s, moment_v, moment_v_db, moment_cross_t };

template <class Ops, class V, class F>
TROPD_HD inline void moment_element(V a, V b, V ms, V mt, bool has_t, F lo_scalar, V (&out)[6]) noexcept {
  const V zero = Ops::set1(F(0)), ninf = Ops::set1(-inf<F>()), pinf = Ops::set1(inf<F>()), lo = Ops::set1(lo_scalar);
  const auto sa = Ops::lt(ninf, a);  // the student supports this entry
  const V da = Ops::sub(a, ms);
  const V w = Ops::select(sa, Ops::select(Ops::lt(da, lo), zero, Ops::exp_nonpos(da)), zero);
  const auto pos_w = Ops::lt(zero, w);
  out[moment_w] = w;
  out[moment_w_da] = Ops::select(pos_w, Ops::mul(w, da), zero);
  if (!has_t) {
    out[moment_cross_s] = out[moment_v] = out[moment_v_db] = out[moment_cross_t] = zero;
    return;
  }
  const auto sb = Ops::lt(ninf, b);
  const V db = Ops::sub(b, mt);
  const V v = Ops::select(sb, Ops::select(Ops::lt(db, lo), zero, Ops::exp_nonpos(db)), zero);
  const auto pos_v = Ops::lt(zero, v);
  out[moment_v] = v;
  out[moment_v_db] = Ops::select(pos_v, Ops::mul(v, db), zero);
  out[moment_cross_s] = Ops::select(sa, Ops::select(sb, Ops::select(pos_w, Ops::mul(w, Ops::sub(da, db)), zero), pinf), zero);
  out[moment_cross_t] = Ops::select(sb, Ops::select(sa, Ops::select(pos_v, Ops::mul(v, Ops::sub(db, da)), zero), pinf), zero);
}

/// Mergeable first-pass statistics of one row pair (or any part of it: a chunk, a thread's
/// share, a CUDA block, a vocabulary shard). Fields: see the header comment.
template <class F>
struct row_moments {
  F max_s = -inf<F>(), mass_s = F(0), moment_s = F(0), cross_s = F(0);
  F max_t = -inf<F>(), mass_t = F(0), moment_t = F(0), cross_t = F(0);

  /// Re-expresses the sums relative to new maxima (max_s2 >= max_s, max_t2 >= max_t).
  /// A +inf cross sum (a support mismatch) stays +inf.
  TROPD_HD constexpr void rebase(F max_s2, F max_t2) noexcept {
    if (mass_s > F(0)) {
      const F ds = max_s - max_s2;
      const F dt = (max_t == -inf<F>()) ? -inf<F>() : max_t - max_t2;
      const F f = exp_(ds);
      moment_s = f * (moment_s + mass_s * ds);
      if (cross_s != inf<F>()) cross_s = f * (cross_s + mass_s * (ds - dt));
      mass_s *= f;
    }
    if (mass_t > F(0)) {
      const F dt = max_t - max_t2;
      const F ds = (max_s == -inf<F>()) ? -inf<F>() : max_s - max_s2;
      const F f = exp_(dt);
      moment_t = f * (moment_t + mass_t * dt);
      if (cross_t != inf<F>()) cross_t = f * (cross_t + mass_t * (dt - ds));
      mass_t *= f;
    }
    max_s = max_s2;
    max_t = max_t2;
  }
  /// Associative, commutative combination.
  TROPD_HD constexpr void merge(row_moments o) noexcept {
    const F ms2 = max_(max_s, o.max_s), mt2 = max_(max_t, o.max_t);
    rebase(ms2, mt2);
    o.rebase(ms2, mt2);
    mass_s += o.mass_s; moment_s += o.moment_s; cross_s += o.cross_s;
    mass_t += o.mass_t; moment_t += o.moment_t; cross_t += o.cross_t;
  }
  /// Adds one element pair (a scalar reference path; backends add whole chunks).
  TROPD_HD constexpr void push(F a, F b) noexcept {
    if (a > max_s || b > max_t) rebase(max_(max_s, a), max_(max_t, b));
    F e[6];
    moment_element<scalar_ops<F>>(a, b, max_s, max_t, true, exp_floor<F>, e);
    mass_s += e[moment_w]; moment_s += e[moment_w_da]; cross_s += e[moment_cross_s];
    mass_t += e[moment_v]; moment_t += e[moment_v_db]; cross_t += e[moment_cross_t];
  }
};

/// What every full-vocabulary rule may read about its row after the first pass.
struct row_summary {
  double lse_s = 0;  ///< log sum e^a, the student's log-sum-exp
  double lse_t = 0;  ///< log sum e^b
  double rkl = 0;    ///< KL(p || q) (may be +inf)
  double fkl = 0;    ///< KL(q || p) (may be +inf)
  double ent_s = 0;  ///< H(p)
  double ent_t = 0;  ///< H(q)
  /// The sums of an estimator's second pass over the row (estimators with second_pass):
  /// each estimator states what its two are (jsd: KL(q || m), KL(p || m); total_variation:
  /// sum |p - q|, sum p sgn(p - q)).
  double second[2] = {0, 0};
};

/// Which row_summary fields a caller reads after the first pass. lse_s and lse_t are always
/// computed; a backend may skip the sums behind the others (moment_s -> ent_s, moment_t ->
/// ent_t, cross_s -> rkl, cross_t -> fkl) where a flag is false, and then sets those fields
/// to NaN (never a silently wrong value). User-visible summaries are always complete.
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
template <class E>
constexpr moments_needed summary_reads_of() noexcept {
  if constexpr (requires { E::summary_reads; })
    return moments_needed(E::summary_reads);
  else
    return all_moments;
}

/// Finalises first-pass moments into a summary. Requires mass_s > 0 and mass_t > 0.
/// KL values that rounding makes slightly negative (identical rows) are 0: a KL is >= 0.
template <class F>
TROPD_HD inline row_summary summarize(const row_moments<F>& m) noexcept {
  row_summary r;
  const double ms = m.mass_s, mt = m.mass_t;
  const double lms = log_(ms), lmt = log_(mt);
  r.lse_s = double(m.max_s) + lms;
  r.lse_t = double(m.max_t) + lmt;
  r.rkl = max_(double(m.cross_s) / ms - lms + lmt, 0.0);
  r.fkl = max_(double(m.cross_t) / mt - lmt + lms, 0.0);
  r.ent_s = lms - double(m.moment_s) / ms;
  r.ent_t = lmt - double(m.moment_t) / mt;
  return r;
}

}  // namespace tropd::estimators
