// tropd/outliers/outliers.hpp: what happens to tokens outside the trust region (method.md 4.3).
//
//   drop                   A = 0, the token is not kept (excluded from kept-token normalisers)
//   clip_reward{tau}       A = max(R, tau)                              (REOPOLD-style clip outlier)
//   topk_fkl (form P)      L = FKL_k(current student at the teacher's top-k) differentiated:
//                          the sparse dL/d log p_S(v) at the top-k ids   (the paper's equations)
//   topk_fkl (form C)      A = -FKL_k computed detached from the rollout-time student's
//                          log-probs at the teacher's top-k, optionally A >= -clamp   (authors' code)
//
// Outlier handlers see the same token as the trust estimator (core/token.hpp) plus, for
// topk_fkl, the teacher's top-k list and the student's log-probs at its ids (topk_row).
#pragma once

#include <concepts>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token.hpp>
#include <tropd/estimators/topk.hpp>

namespace tropd::outliers {

/// An outlier handler's answer for one token.
struct outlier_value {
  bool kept = true;       ///< contributes (counted by kept-token normalisers)
  bool pg = true;         ///< A is a PG advantage (else: direct loss with sparse gradient)
  double advantage = 0;   ///< A (pg)
  double loss = 0;        ///< L (direct)
  bool clipped = false;   ///< the reward was clipped / clamped
  double teacher_mass = 0, student_mass = 0;  ///< S_K, P_K (top-k handlers)
  /// Direct top-k losses with the tail bucket: its c and 1 - S_K (times the weight), kept
  /// apart from the raw coefficients written to g (core/sparse_terms.hpp).
  double tail_coef = 0, tail_teacher = 0;
  status st{};
};

template <class O>
concept outlier_handler = requires(const O& o, const token& tk, const topk_row& list, double* g) {
  { o(tk, list, g) } -> std::same_as<outlier_value>;
  { o.check() } -> std::same_as<status>;
  { O::needs_topk } -> std::convertible_to<bool>;
};

/// Drops outliers: no loss, no gradient, not kept.
struct drop {
  static constexpr const char* name = "drop";
  static constexpr bool needs_topk = false;
  TROPD_HD constexpr status check() const noexcept { return {}; }
  TROPD_HD constexpr outlier_value operator()(const token&, const topk_row&, double*) const noexcept {
    outlier_value v;
    v.kept = false;
    v.advantage = 0;
    return v;
  }
};
static_assert(outlier_handler<drop>);

/// Clips the reward from below: A = max(R, tau).
struct clip_reward {
  static constexpr const char* name = "clip_reward";
  static constexpr bool needs_topk = false;
  double tau = -5.0;
  TROPD_HD constexpr status check() const noexcept {
    if (!is_finite(tau)) return make_error(errc::invalid_parameter, "clip_reward: tau must be finite");
    return {};
  }
  TROPD_HD constexpr outlier_value operator()(const token& tk, const topk_row&, double*) const noexcept {
    outlier_value v;
    v.advantage = tk.R > tau ? tk.R : tau;
    v.clipped = !(tk.R > tau);
    return v;
  }
};
static_assert(outlier_handler<clip_reward>);

enum class fkl_form : int {
  p = 0,  ///< differentiable FKL_k term (method.md 4.3, the paper's equations)
  c = 1,  ///< detached advantage A = -FKL_k in the PG surrogate (the authors' code)
};

/// Teacher top-k forward KL on outliers, in form P or form C.
struct topk_fkl {
  static constexpr const char* name = "topk_fkl";
  static constexpr bool needs_topk = true;
  estimators::topk_forward_kl fkl{};  ///< k and tail policy (k = 64, renormalised by default)
  fkl_form form = fkl_form::c;
  double clamp = inf<double>();       ///< form C: A >= -clamp (inf: no clamp)
  double weight = 1.0;                ///< multiplies the term

  TROPD_HD constexpr status check() const noexcept {
    const status s = fkl.check();
    if (!s.ok()) return s;
    if (!(clamp > 0)) return make_error(errc::invalid_parameter, "topk_fkl: clamp must be > 0 (inf: off)");
    if (!is_finite(weight) || weight < 0) return make_error(errc::invalid_parameter, "topk_fkl: weight must be finite and >= 0");
    return {};
  }
  /// g (K entries) receives the raw dL/d log p_S at the top-k ids for form P (the tail
  /// bucket's c p_v apart, in tail_coef); untouched for form C.
  TROPD_HD outlier_value operator()(const token&, const topk_row& tk, double* g) const noexcept {
    outlier_value v;
    if (form == fkl_form::p) {
      const auto r = fkl.eval(tk.teacher, tk.student, tk.k, g, tk.student_tail_log);
      v.st = r.st;
      v.pg = false;
      v.loss = weight * r.value;
      if (g)
        for (int i = 0; i < tk.k; ++i) g[i] *= weight;
      v.tail_coef = weight * r.tail_coef;
      v.tail_teacher = weight * r.tail_teacher;
      v.teacher_mass = r.teacher_mass;
      v.student_mass = r.student_mass;
    } else {
      // Form C reads the rollout-time student (the current one when no rollout-time list was
      // given: make_topk_row points student_old at student then, and the exact tail applies).
      const bool rollout = tk.student_old.data != tk.student.data;
      const auto r = rollout ? fkl.eval(tk.teacher, tk.student_old, tk.k, nullptr)
                             : fkl.eval(tk.teacher, tk.student, tk.k, nullptr, tk.student_tail_log);
      v.st = r.st;
      double a = -r.value;
      if (a < -clamp) { a = -clamp; v.clipped = true; }
      v.advantage = weight * a;
      v.teacher_mass = r.teacher_mass;
      v.student_mass = r.student_mass;
    }
    return v;
  }
};
static_assert(outlier_handler<topk_fkl>);

}  // namespace tropd::outliers
