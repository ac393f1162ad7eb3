// tropd/objective.hpp: the composed distillation objective and its presets (method.md 3-8).
//
//   objective<Region, Trust, Outlier, Clip, Dense>
//
// Per token i (R = t - s_old, rho = exp(s - s_old), M = Region.trusted(i)):
//   student token, M = 1           trust term:   PG  L = clip(-rho A),  A = Trust(s, s_old, t)
//                                                or a direct loss L = Trust(s, t)
//   student token, M = 0           outlier term: Outlier(R, top-k): drop / clipped reward /
//                                                top-k FKL (form P: direct loss, form C: PG)
//                                  outlier_mode::add applies the trust term as well (EOPD)
//   teacher-prefix token           guidance:     L = -beta s (sft), or PG with A = beta (t - s_old)
//   any non-prompt token           dense term:   dense_weight * D(p, q) (row level only; GKD)
//   prompt token                   nothing
// loss = sum_i w_i L_i with w_i from the aggregation mode (aggregation.hpp).
//
// "What" (this header, host and device) is kept apart from "how" (host/objective.hpp
// evaluates it on the CPU; the per-token rule below is the one the GPU path calls).
#pragma once

#include <stdint.h>

#include <concepts>
#include <type_traits>

#include <tropd/aggregation/aggregation.hpp>
#include <tropd/clippers/clippers.hpp>
#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/tokens.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/rewards.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/outliers/outliers.hpp>
#include <tropd/regions/regions.hpp>

namespace tropd {

/// Outliers get the outlier term instead of (replace) or in addition to (add) the trust term.
enum class outlier_mode : int { replace = 0, add = 1 };
/// Off-policy guidance on teacher-prefix tokens: SFT loss -beta s, or PG advantage beta (t - s_old).
enum class guidance_form : int { sft = 0, pg = 1 };

/// No full-vocabulary term (the default: only sampled-token and top-k terms).
struct no_dense_term {
  static constexpr const char* name = "none";
  TROPD_HD constexpr status check() const noexcept { return {}; }
};

/// The Dense slot: no_dense_term, or a full-vocabulary divergence applied to every counted
/// token at row level (estimators/full_vocab.hpp).
template <class D>
concept dense_term = std::is_same_v<D, no_dense_term> || estimators::full_vocab_divergence<D>;

/// Bits of the per-token flags output.
namespace flags {
inline constexpr uint8_t trusted = 1u << 0;        ///< student token inside the trust region
inline constexpr uint8_t outlier = 1u << 1;        ///< student token outside it
inline constexpr uint8_t kept = 1u << 2;           ///< contributes a term
inline constexpr uint8_t adv_clipped = 1u << 3;    ///< a reward / advantage was clipped or clamped
inline constexpr uint8_t ratio_clipped = 1u << 4;  ///< the PPO / dual clip was active
inline constexpr uint8_t guidance = 1u << 5;       ///< teacher-prefix token with guidance
inline constexpr uint8_t counted = 1u << 6;        ///< counted by token normalisers
}  // namespace flags

template <regions::trust_region Region, estimators::trust_estimator Trust, outliers::outlier_handler Outlier,
          clippers::clipper Clip, dense_term Dense = no_dense_term>
struct objective {
  using region_type = Region;
  using trust_type = Trust;
  using outlier_type = Outlier;
  using clip_type = Clip;
  using dense_type = Dense;
  static constexpr bool has_dense = !std::is_same_v<Dense, no_dense_term>;

  Region region{};
  Trust trust{};
  Outlier outlier{};
  Clip clip{};
  Dense dense{};
  double dense_weight = 1.0;          ///< weight of the full-vocabulary term (when Dense is not none)
  outlier_mode mode = outlier_mode::replace;
  double guidance_beta = 0.0;         ///< beta of the off-policy guidance term (TrOPD: 1e-3)
  guidance_form guidance = guidance_form::sft;
  aggregation::aggregation agg{};

  status check() const noexcept {
    TROPD_TRY(region.check());
    TROPD_TRY(trust.check());
    TROPD_TRY(outlier.check());
    TROPD_TRY(clip.check());
    TROPD_TRY(dense.check());
    TROPD_TRY(agg.check());
    if (!(guidance_beta >= 0) || !is_finite(guidance_beta))
      return make_error(errc::invalid_parameter, "objective: guidance_beta must be finite and >= 0");
    if (!(dense_weight >= 0) || !is_finite(dense_weight))
      return make_error(errc::invalid_parameter, "objective: dense_weight must be finite and >= 0");
    return {};
  }
};

/// Everything the per-token rule reads about one token.
struct token_input {
  double s = 0, s_old = 0, t = 0;
  origin from = origin::prompt;
  double rkl = 0, ref = 0;
  outliers::topk_row topk{};
};

/// What the per-token rule produces (unweighted: aggregation weights come later).
struct token_result {
  double loss = 0;           ///< L_i = trust + outlier + guidance parts
  double dloss_ds = 0;       ///< dL_i/ds_i
  double advantage = 0;      ///< the advantage after clipping (0 where none)
  double loss_trust = 0, loss_outlier = 0, loss_guidance = 0;
  double teacher_mass = 0, student_mass = 0;  ///< S_K, P_K where a top-k term ran
  bool topk_grad = false;    ///< g_topk holds dL_i/d log p_S at the top-k ids
  uint8_t flags = 0;
  status st{};
};

/// The per-token rule of an objective (host and device). `trusted` is the region's
/// decision for student tokens; g_topk (K entries) receives form-P sparse gradients.
template <class Obj>
TROPD_HD token_result evaluate_token(const Obj& obj, const token_input& in, bool trusted, double* g_topk) noexcept {
  token_result r;
  if (in.from == origin::prompt) return r;
  if (in.from == origin::teacher) {
    if (obj.guidance_beta > 0) {
      r.flags = flags::guidance | flags::kept | flags::counted;
      if (obj.guidance == guidance_form::sft) {
        r.loss_guidance = -obj.guidance_beta * in.s;
        r.dloss_ds = -obj.guidance_beta;
      } else {
        const double a = obj.guidance_beta * (in.t - in.s_old);
        const double rho = exp_(in.s - in.s_old);
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
  const double R = in.t - in.s_old;
  if (trusted || obj.mode == outlier_mode::add) {
    const estimators::trust_value tv = obj.trust(estimators::token_terms{in.s, in.s_old, in.t, in.rkl, in.ref});
    if (tv.pg) {
      // The clipper sees the raw advantage first: an advantage clip (adv_lo) turns the
      // -inf reward of a zero-teacher-mass token into a finite one (REOPOLD, clipped OPD).
      const clippers::clipped_term c = obj.clip(tv.advantage, in.s, in.s_old);
      if (is_nan(tv.advantage) || !is_finite(c.advantage) || !is_finite(c.loss) || !is_finite(c.dloss_ds)) {
        r.st = make_error(errc::infinite_divergence,
                          "the trust term's reward is not finite (the teacher gives zero mass to a trusted token: "
                          "use a trust region, an outlier handler or a reward clip)");
        return r;
      }
      r.loss_trust = c.loss;
      r.dloss_ds += c.dloss_ds;
      r.advantage += c.advantage;
      if (c.adv_clipped) r.flags |= flags::adv_clipped;
      if (c.ratio_clipped) r.flags |= flags::ratio_clipped;
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
    const outliers::outlier_value ov = obj.outlier(R, in.topk, g_topk);
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
        const clippers::clipped_term c = obj.clip(ov.advantage, in.s, in.s_old);
        if (is_nan(ov.advantage) || !is_finite(c.advantage) || !is_finite(c.loss) || !is_finite(c.dloss_ds)) {
          r.st = make_error(errc::infinite_divergence, "the outlier term's advantage is not finite");
          return r;
        }
        r.loss_outlier = c.loss;
        r.dloss_ds += c.dloss_ds;
        r.advantage += c.advantage;
        if (c.adv_clipped) r.flags |= flags::adv_clipped;
        if (c.ratio_clipped) r.flags |= flags::ratio_clipped;
      } else {
        r.loss_outlier = ov.loss;
        r.topk_grad = true;
      }
    }
  }
  r.loss = r.loss_trust + r.loss_outlier;
  return r;
}

/// Named objectives (method.md sections 3-6); each is a plain function returning a
/// configured objective. Parameters not published by the sources are arguments.
namespace presets {

using opd_objective = objective<regions::all_trusted, estimators::k1_reward, outliers::drop, clippers::pg_clip>;

/// OPD (Thinking Machines / Tinker; GKD lambda = 1): A = t - s_old on every student token,
/// token-mean, no clipping (pass a pg_clip for PPO-style ratio clipping).
inline opd_objective opd(clippers::pg_clip clip = {}) {
  opd_objective o;
  o.clip = clip;
  return o;
}

using eopd_objective = objective<regions::teacher_entropy_gate, estimators::k1_reward, outliers::topk_fkl, clippers::pg_clip>;

/// EOPD (arXiv 2603.07079): PPO-clipped K1 on every token plus I[H_T > tau] FKL_k (form P,
/// k = 16, additive), tau = 0.8 nats, eps 0.2/0.2. Needs the teacher's full-vocabulary entropy.
inline eopd_objective eopd(double tau = 0.8, int k = 16, double eps_low = 0.2, double eps_high = 0.2) {
  eopd_objective o;
  o.region.tau = tau;
  o.outlier.fkl = estimators::topk_forward_kl{k, estimators::topk_tail::renormalised};
  o.outlier.form = outliers::fkl_form::p;
  o.mode = outlier_mode::add;
  o.clip.eps_low = eps_low;
  o.clip.eps_high = eps_high;
  return o;
}

using reopold_objective = objective<regions::phase_switch<regions::log_ratio_threshold, regions::entropy_top_fraction>,
                                    estimators::k1_reward, outliers::drop, clippers::pg_clip>;

/// Converts REOPOLD's lambda to a reward floor, the two ways the sources write it.
inline double reopold_floor_ratio(double lambda) { return log_(lambda) / (1.0 - lambda); }  ///< log(l)/(1-l)
inline double reopold_floor_logit(double lambda) { return log_(lambda / (1.0 - lambda)); }  ///< log(l/(1-l))

/// REOPOLD (arXiv 2603.11137): A = max(R, floor), mean over kept tokens. Phase I keeps
/// tokens with R >= floor (here: R > floor - 1e-12); from `switch_step` (phase II) it keeps
/// the top `entropy_fraction` of student tokens by student entropy. Needs student entropies
/// in phase II.
inline reopold_objective reopold(double floor, long long switch_step, double entropy_fraction = 0.2) {
  reopold_objective o;
  o.region.first.tau = floor - 1e-12;
  o.region.second.fraction = entropy_fraction;
  o.region.switch_step = switch_step;
  o.clip.adv_lo = floor;
  o.agg.how = aggregation::mode::kept_token_mean;
  return o;
}

using entropy_opd_objective = objective<regions::entropy_top_fraction, estimators::k1_reward, outliers::drop, clippers::pg_clip>;

/// Entropy OPD (TrOPD paper's baseline): A = I[H_S in the top 20% of the batch] R.
inline entropy_opd_objective entropy_opd(double fraction = 0.2) {
  entropy_opd_objective o;
  o.region.fraction = fraction;
  return o;
}

using clip_outlier_objective = objective<regions::log_ratio_threshold, estimators::k1_reward, outliers::clip_reward, clippers::pg_clip>;

/// Clip outlier: A = max(R, tau) (static tau < 0; unpublished in the paper, so required here).
inline clip_outlier_objective clip_outlier(double tau, double guidance_beta = 0.0) {
  clip_outlier_objective o;
  o.region.tau = tau;
  o.outlier.tau = tau;
  o.guidance_beta = guidance_beta;
  return o;
}

using mask_outlier_objective = objective<regions::log_ratio_threshold, estimators::k1_reward, outliers::drop, clippers::pg_clip>;

/// Mask outlier: A = R if R > tau, else the token is dropped (token-mean over all tokens).
inline mask_outlier_objective mask_outlier(double tau, double guidance_beta = 0.0) {
  mask_outlier_objective o;
  o.region.tau = tau;
  o.guidance_beta = guidance_beta;
  return o;
}

using fkl_outlier_objective = objective<regions::stochastic_acceptance, estimators::k1_reward, outliers::topk_fkl, clippers::pg_clip>;

/// FKL outlier: the stochastic trust region with top-k forward KL on outliers (form C by
/// default, k = 64, renormalised), no guidance.
inline fkl_outlier_objective fkl_outlier(int k = 64, outliers::fkl_form form = outliers::fkl_form::c,
                                         double clamp = inf<double>()) {
  fkl_outlier_objective o;
  o.outlier.fkl = estimators::topk_forward_kl{k, estimators::topk_tail::renormalised};
  o.outlier.form = form;
  o.outlier.clamp = clamp;
  return o;
}

/// TrOPD (arXiv 2606.01249): stochastic trust region, form C top-64 forward KL on outliers
/// (renormalised teacher top-k), off-policy guidance beta = 1e-3 (SFT form), token-mean.
inline fkl_outlier_objective tropd(double guidance_beta = 1e-3, int k = 64,
                                   outliers::fkl_form form = outliers::fkl_form::c, double clamp = inf<double>()) {
  fkl_outlier_objective o = fkl_outlier(k, form, clamp);
  o.guidance_beta = guidance_beta;
  return o;
}

/// GKD (Agarwal et al.; TRL): full-vocabulary generalised JSD(beta) on every non-prompt
/// token (row level only); no sampled-token term. Whether the sequences are the
/// student's samples (probability lambda) or dataset sequences is the driver's choice.
struct gkd_trust_off {
  static constexpr const char* name = "none";
  static constexpr bool needs_rkl = false, needs_ref = false;
  TROPD_HD constexpr status check() const noexcept { return {}; }
  TROPD_HD constexpr estimators::trust_value operator()(const estimators::token_terms&) const noexcept {
    return estimators::trust_value{false, 0, 0, 0};
  }
};
static_assert(estimators::trust_estimator<gkd_trust_off>);
using gkd_objective = objective<regions::all_trusted, gkd_trust_off, outliers::drop, clippers::no_clip, estimators::jsd>;
inline gkd_objective gkd(double beta = 0.5) {
  gkd_objective o;
  o.dense.beta = beta;
  return o;
}

using vopd_objective = objective<regions::all_trusted, estimators::vopd_reward, outliers::drop, clippers::pg_clip>;

/// vOPD (arXiv 2605.07865): A = R + KL_t with the detached per-position reverse KL.
inline vopd_objective vopd() { return vopd_objective{}; }

using gopd_objective = objective<regions::all_trusted, estimators::gopd_reward, outliers::drop, clippers::pg_clip>;

/// G-OPD / ExOPD (arXiv 2602.12125): A = lambda (t - ref) - (s_old - ref), lambda > 1.
inline gopd_objective gopd(double lambda = 1.25) {
  gopd_objective o;
  o.trust.lambda = lambda;
  return o;
}

}  // namespace presets
}  // namespace tropd
