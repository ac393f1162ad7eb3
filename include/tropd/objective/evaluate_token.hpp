// tropd/objective/evaluate_token.hpp: the per-token rule of an objective (host and device).
//
//   evaluate_token(obj, token, topk_row, trusted, g_topk) -> token_result
//
// `trusted` is the region's decision for a student token (made by the caller's decide stage,
// which may need batch values); g_topk (k entries, or nullptr) receives a form-P outlier
// term's raw sparse gradient dL/d log p_S at the top-k ids. Results are unweighted: the
// aggregation weight w_i multiplies them later. Every backend calls this function; it is
// the only place the trust, outlier and guidance terms are combined.
#pragma once

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token.hpp>
#include <tropd/objective/objective.hpp>

namespace tropd {

namespace detail {

/// Adds one clipped policy-gradient term L = clip(-rho A) to r (part: the trust or the
/// outlier loss); false (r.st set) when A or the clipped surrogate is not finite.
template <class Clip>
TROPD_HD inline bool add_pg_term(const Clip& clip, double advantage, const token& tk, double& part, token_result& r,
                                 const char* what) noexcept {
  // The clipper sees the raw advantage first: an advantage clip (adv_lo) turns the -inf
  // reward of a zero-teacher-mass token into a finite one (REOPOLD, clipped OPD).
  const clippers::clipped_term c = clip(advantage, tk.s, tk.s_old);
  if (is_nan(advantage) || !is_finite(c.advantage) || !is_finite(c.loss) || !is_finite(c.dloss_ds)) {
    r.st = make_error(errc::infinite_divergence, what);
    return false;
  }
  part = c.loss;
  r.dloss_ds += c.dloss_ds;
  r.advantage += c.advantage;
  if (c.adv_clipped) r.flags |= flags::adv_clipped;
  if (c.ratio_clipped) r.flags |= flags::ratio_clipped;
  return true;
}

}  // namespace detail

/// Whether evaluate_token marks a token of origin `from` flags::counted, whatever its values:
/// every student token; a teacher-prefix token when the guidance term or a dense term applies.
/// The counted tokens are thus known before any log-prob is, which lets the fused LM head
/// (host/fused_lm_head.hpp) compute the aggregation weights before the logits exist; it
/// checks every token's result against this.
template <class Obj>
TROPD_HD constexpr bool counted_by(const Obj& obj, origin from) noexcept {
  if (from == origin::student) return true;
  if (from == origin::teacher) return obj.guidance_beta > 0 || Obj::has_dense;
  return false;
}

template <class Obj>
TROPD_HD token_result evaluate_token(const Obj& obj, const token& tk, const topk_row& list, bool trusted, double* g_topk) noexcept {
  token_result r;
  if (tk.from == origin::prompt) return r;
  if (tk.from == origin::teacher) {
    if (obj.guidance_beta > 0) {
      r.flags = flags::guidance | flags::kept | flags::counted;
      if (obj.guidance == guidance_form::sft) {
        r.loss_guidance = -obj.guidance_beta * tk.s;
        r.dloss_ds = -obj.guidance_beta;
      } else {
        const double a = obj.guidance_beta * (tk.t - tk.s_old);
        const double rho = exp_(tk.s - tk.s_old);
        r.advantage = a;
        r.loss_guidance = -rho * a;
        r.dloss_ds = -rho * a;
      }
      if (!is_finite(r.loss_guidance))
        r.st = make_error(errc::infinite_divergence, "guidance term is not finite (teacher-prefix token with -inf log-prob)");
    } else if constexpr (Obj::has_dense) {
      r.flags = flags::counted | flags::kept;
    }
    r.loss = r.loss_guidance;
    return r;
  }
  // Student token.
  r.flags = flags::counted | (trusted ? flags::trusted : flags::outlier);
  if (trusted || obj.mode == outlier_mode::add) {
    const estimators::trust_value tv = obj.trust(tk);
    if (tv.pg) {
      if (!detail::add_pg_term(obj.clip, tv.advantage, tk, r.loss_trust, r,
                               "the trust term's reward is not finite (the teacher gives zero mass to a trusted token, or "
                               "an infinite per-position KL: use a trust region, an outlier handler or a reward clip)"))
        return r;
    } else {
      if (!is_finite(tv.loss) || !is_finite(tv.dloss_ds)) {
        r.st = make_error(errc::infinite_divergence, "the trust term's loss is not finite (teacher gives zero mass to a trusted token)");
        return r;
      }
      r.loss_trust = tv.loss;
      r.dloss_ds += tv.dloss_ds;
      r.advantage += tv.advantage;
    }
    r.flags |= flags::kept;
  }
  if (!trusted) {
    const outliers::outlier_value ov = obj.outlier(tk, list, g_topk);
    if (!ov.st.ok()) {
      r.st = ov.st;
      return r;
    }
    r.teacher_mass = ov.teacher_mass;
    r.student_mass = ov.student_mass;
    if (ov.clipped) r.flags |= flags::adv_clipped;
    if (ov.kept) {
      r.flags |= flags::kept;
      if (ov.pg) {
        if (!detail::add_pg_term(obj.clip, ov.advantage, tk, r.loss_outlier, r, "the outlier term's advantage is not finite")) return r;
      } else {
        r.loss_outlier = ov.loss;
        r.topk_grad = true;
        r.topk_tail_coef = ov.tail_coef;
        r.topk_tail_teacher = ov.tail_teacher;
      }
    }
  }
  r.loss = r.loss_trust + r.loss_outlier;
  return r;
}

}  // namespace tropd
