// tropd/objective/presets.hpp: named objectives (method.md sections 3-6), each a plain
// function of a config struct whose every field has its documented default:
//
//   auto o = tropd::presets::tropd();                                   // the paper's defaults
//   auto p = tropd::presets::tropd({.k = 16, .form = tropd::outliers::fkl_form::p});
//
// Parameters the sources do not publish (the static tau of clip / mask outlier, REOPOLD's
// floor and switch step) have a default chosen here and named as such; set them for your run.
// Aggregation and the other objective fields can be changed on the returned object.
#pragma once

#include <tropd/aggregation/aggregation.hpp>
#include <tropd/clippers/clippers.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/rewards.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/objective/objective.hpp>
#include <tropd/outliers/outliers.hpp>
#include <tropd/regions/regions.hpp>

namespace tropd::presets {

using estimators::topk_tail;
using outliers::fkl_form;

using opd_objective = objective<regions::all_trusted, estimators::k1_reward, outliers::drop, clippers::pg_clip>;

struct opd_config {
  clippers::pg_clip clip{};  ///< no clipping by default (set eps_low / eps_high for PPO, dual_c for the dual clip)
};
/// OPD (Thinking Machines / Tinker; GKD lambda = 1): A = t - s_old on every student token,
/// token-mean, no clipping by default.
inline opd_objective opd(const opd_config& c = {}) {
  opd_objective o;
  o.clip = c.clip;
  return o;
}

using eopd_objective = objective<regions::teacher_entropy_gate, estimators::k1_reward, outliers::topk_fkl, clippers::pg_clip>;

struct eopd_config {
  double tau = 0.8;        ///< teacher-entropy gate, nats
  int k = 16;              ///< top-k of the forward-KL term
  double eps_low = 0.2;    ///< PPO clip, rho >= 1 - eps_low
  double eps_high = 0.2;   ///< PPO clip, rho <= 1 + eps_high
  topk_tail tail = topk_tail::renormalised;  ///< method.md leaves it open; renormalised (10.2)
};
/// EOPD (arXiv 2603.07079): PPO-clipped K1 on every token plus I[H_T > tau] FKL_k (form P,
/// additive). Needs the teacher's full-vocabulary entropy.
inline eopd_objective eopd(const eopd_config& c = {}) {
  eopd_objective o;
  o.region.tau = c.tau;
  o.outlier.fkl = estimators::topk_forward_kl{c.k, c.tail};
  o.outlier.form = fkl_form::p;
  o.mode = outlier_mode::add;
  o.clip.eps_low = c.eps_low;
  o.clip.eps_high = c.eps_high;
  return o;
}

using reopold_objective = objective<regions::phase_switch<regions::log_ratio_threshold, regions::entropy_top_fraction>,
                                    estimators::k1_reward, outliers::drop, clippers::pg_clip>;

/// Converts REOPOLD's lambda to a reward floor, the two ways the sources write it.
inline double reopold_floor_ratio(double lambda) { return log_(lambda) / (1.0 - lambda); }  ///< log(l)/(1-l)
inline double reopold_floor_logit(double lambda) { return log_(lambda / (1.0 - lambda)); }  ///< log(l/(1-l))

struct reopold_config {
  /// Reward floor: A = max(R, floor). Not fixed by method.md (the sources disagree on the
  /// lambda conversion); -2 is tropd's default, about reopold_floor_ratio(0.2).
  double floor = -2.0;
  /// First step of phase II. "Mid-training" in the source; 100 = half of the paper's 200 steps.
  long long switch_step = 100;
  double entropy_fraction = 0.2;  ///< phase II keeps this top fraction of tokens by student entropy
};
/// REOPOLD (arXiv 2603.11137): A = max(R, floor), mean over kept tokens. Phase I keeps
/// tokens with R >= floor (here: R > floor - 1e-12); from switch_step (phase II) it keeps
/// the top entropy_fraction of student tokens by student entropy.
inline reopold_objective reopold(const reopold_config& c = {}) {
  reopold_objective o;
  o.region.first.tau = c.floor - 1e-12;
  o.region.second.fraction = c.entropy_fraction;
  o.region.switch_step = c.switch_step;
  o.clip.adv_lo = c.floor;
  o.agg.how = aggregation::mode::kept_token_mean;
  return o;
}

using entropy_opd_objective = objective<regions::entropy_top_fraction, estimators::k1_reward, outliers::drop, clippers::pg_clip>;

struct entropy_opd_config {
  double fraction = 0.2;  ///< keep the top 20% of student tokens by student entropy
};
/// Entropy OPD (TrOPD paper's baseline): A = I[H_S in the top fraction of the batch] R.
inline entropy_opd_objective entropy_opd(const entropy_opd_config& c = {}) {
  entropy_opd_objective o;
  o.region.fraction = c.fraction;
  return o;
}

using clip_outlier_objective = objective<regions::log_ratio_threshold, estimators::k1_reward, outliers::clip_reward, clippers::pg_clip>;

/// The static-threshold variants (clip / mask outlier): tokens with R <= tau are outliers.
struct threshold_config {
  double tau = -5.0;            ///< static threshold (unpublished in the paper; tropd's default)
  double guidance_beta = 0.0;   ///< off-policy guidance (the TrOPD variant: 1e-3)
};
using clip_outlier_config = threshold_config;
using mask_outlier_config = threshold_config;

/// Clip outlier: A = max(R, tau).
inline clip_outlier_objective clip_outlier(const clip_outlier_config& c = {}) {
  clip_outlier_objective o;
  o.region.tau = c.tau;
  o.outlier.tau = c.tau;
  o.guidance_beta = c.guidance_beta;
  return o;
}

using mask_outlier_objective = objective<regions::log_ratio_threshold, estimators::k1_reward, outliers::drop, clippers::pg_clip>;

/// Mask outlier: A = R if R > tau, else the token is dropped (token-mean over all tokens).
inline mask_outlier_objective mask_outlier(const mask_outlier_config& c = {}) {
  mask_outlier_objective o;
  o.region.tau = c.tau;
  o.guidance_beta = c.guidance_beta;
  return o;
}

using fkl_outlier_objective = objective<regions::stochastic_acceptance, estimators::k1_reward, outliers::topk_fkl, clippers::pg_clip>;

struct fkl_outlier_config {
  int k = 64;                                ///< top-k of the outlier term
  fkl_form form = fkl_form::c;               ///< C: the authors' code (default); P: the paper's equations
  double clamp = inf<double>();              ///< form C: A >= -clamp (inf: off)
  topk_tail tail = topk_tail::renormalised;  ///< method.md 10.2
};
/// FKL outlier: the stochastic trust region with top-k forward KL on outliers, no guidance.
inline fkl_outlier_objective fkl_outlier(const fkl_outlier_config& c = {}) {
  fkl_outlier_objective o;
  o.outlier.fkl = estimators::topk_forward_kl{c.k, c.tail};
  o.outlier.form = c.form;
  o.outlier.clamp = c.clamp;
  return o;
}

struct tropd_config {
  double beta = 1e-3;                        ///< off-policy guidance weight
  int k = 64;                                ///< top-k of the outlier term
  fkl_form form = fkl_form::c;               ///< C: the authors' code (default); P: the paper's equations
  double clamp = inf<double>();              ///< form C: A >= -clamp (inf: off)
  topk_tail tail = topk_tail::renormalised;  ///< method.md 10.2
  guidance_form guidance = guidance_form::sft;  ///< -beta log p_S(x) on teacher-prefix tokens
};
/// TrOPD (arXiv 2606.01249): stochastic trust region, form-C top-64 forward KL on outliers
/// (renormalised teacher top-k), off-policy guidance beta = 1e-3 (SFT form), token-mean.
inline fkl_outlier_objective tropd(const tropd_config& c = {}) {
  fkl_outlier_objective o = fkl_outlier({.k = c.k, .form = c.form, .clamp = c.clamp, .tail = c.tail});
  o.guidance_beta = c.beta;
  o.guidance = c.guidance;
  return o;
}

/// GKD's trust slot: no sampled-token term.
struct gkd_trust_off {
  static constexpr const char* name = "none";
  static constexpr bool needs_rkl = false, needs_ref = false;
  TROPD_HD constexpr status check() const noexcept { return {}; }
  TROPD_HD constexpr estimators::trust_value operator()(const token&) const noexcept {
    return estimators::trust_value{false, 0, 0, 0};
  }
};
static_assert(estimators::trust_estimator<gkd_trust_off>);
using gkd_objective = objective<regions::all_trusted, gkd_trust_off, outliers::drop, clippers::no_clip, estimators::jsd>;

struct gkd_config {
  double beta = 0.5;  ///< JSD weight (0: forward KL, 1: reverse KL)
};
/// GKD (Agarwal et al.; TRL): full-vocabulary generalised JSD(beta) on every non-prompt
/// token (row level only); no sampled-token term. Whether the sequences are the student's
/// samples (probability lambda) or dataset sequences is the driver's choice.
inline gkd_objective gkd(const gkd_config& c = {}) {
  gkd_objective o;
  o.dense.beta = c.beta;
  return o;
}

using vopd_objective = objective<regions::all_trusted, estimators::vopd_reward, outliers::drop, clippers::pg_clip>;

/// vOPD (arXiv 2605.07865): A = R + KL_t with the detached per-position reverse KL
/// (full vocabulary: needs logits, or the per-position KL at token level).
inline vopd_objective vopd() { return vopd_objective{}; }

using gopd_objective = objective<regions::all_trusted, estimators::gopd_reward, outliers::drop, clippers::pg_clip>;

struct gopd_config {
  double lambda = 1.25;  ///< reward extrapolation (> 1)
};
/// G-OPD / ExOPD (arXiv 2602.12125): A = lambda (t - ref) - (s_old - ref).
inline gopd_objective gopd(const gopd_config& c = {}) {
  gopd_objective o;
  o.trust.lambda = c.lambda;
  return o;
}

}  // namespace tropd::presets
