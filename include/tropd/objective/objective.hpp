// tropd/objective/objective.hpp: the composed distillation objective (method.md 3-8): what
// to compute, kept apart from how (host/objective.hpp and gpu/ evaluate it).
//
//   objective<Region, Trust, Outlier, Clip, Dense>
//
// Per token i (R = t - s_old, rho = exp(s - s_old), M = Region.trusted(token i)):
//   student token, M = 1           trust term:   PG  L = clip(-rho A),  A = Trust(token)
//                                                or a direct loss L = Trust(token)
//   student token, M = 0           outlier term: Outlier(token, top-k): drop / clipped reward /
//                                                top-k FKL (form P: direct loss, form C: PG)
//                                  outlier_mode::add applies the trust term as well (EOPD)
//   teacher-prefix token           guidance:     L = -beta s (sft), or PG with A = beta (t - s_old)
//   any non-prompt token           dense term:   dense_weight * D(p, q) (row level only; GKD)
//   prompt token                   nothing
// loss = sum_i w_i L_i with w_i from the aggregation mode (aggregation/aggregation.hpp).
// The per-token rule is objective/evaluate_token.hpp; named objectives objective/presets.hpp.
#pragma once

#include <stdint.h>

#include <concepts>
#include <type_traits>

#include <tropd/aggregation/aggregation.hpp>
#include <tropd/clippers/clippers.hpp>
#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/rewards.hpp>
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

/// What the per-token rule produces (unweighted: aggregation weights come later).
struct token_result {
  double loss = 0;           ///< L_i = trust + outlier + guidance parts
  double dloss_ds = 0;       ///< dL_i/ds_i
  double advantage = 0;      ///< the advantage after clipping (0 where none)
  double loss_trust = 0, loss_outlier = 0, loss_guidance = 0;
  double teacher_mass = 0, student_mass = 0;  ///< S_K, P_K where a top-k term ran
  bool topk_grad = false;    ///< g_topk holds the raw dL_i/d log p_S at the top-k ids (form P)
  double topk_tail_coef = 0, topk_tail_teacher = 0;  ///< the tail bucket's c and 1 - S_K (core/sparse_terms.hpp)
  uint8_t flags = 0;
  status st{};
};

}  // namespace tropd
