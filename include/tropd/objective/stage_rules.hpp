// tropd/objective/stage_rules.hpp: what the token stages do per token or per sequence, as
// TROPD_HD code: the one definition of each rule, used by the host's stages
// (host/token_stages.hpp, loops over the batch) and the device's (gpu/detail/token_kernels.cuh,
// one item per thread, results reduced). tests/test_gpu_emulation.cpp runs the device's
// order of these on the CPU against host::run_token_stages.
//
//   token_record            what stage 3 keeps of tropd::token_result (no status)
//   aggregation rules       the count each mode normalises by, the per-sequence factor, the
//                           normaliser, the weight w_i
//   diag_partial            the sums behind diagnostics, mergeable, and their finish
//   folded_topk             dL_i/d log p_S at a list entry with the tail bucket folded in
//   output_fits             whether a token's weighted outputs fit the output type
#pragma once

#include <stdint.h>

#include <tropd/aggregation/aggregation.hpp>
#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/token.hpp>
#include <tropd/core/token_batch.hpp>
#include <tropd/core/values.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/objective/diagnostics.hpp>
#include <tropd/objective/objective.hpp>

namespace tropd::stage_rules {

/// What the token stages keep of a token after the per-token rule (unweighted).
struct token_record {
  double loss = 0, loss_trust = 0, loss_outlier = 0, loss_guidance = 0;
  double dloss_ds = 0, advantage = 0;
  double teacher_mass = 0, student_mass = 0;
  double tail_coef = 0, tail_teacher = 0;  ///< the tail bucket's c and 1 - S_K (core/sparse_terms.hpp)
  uint8_t flags = 0;
  uint8_t topk_grad = 0;  ///< g_topk holds the raw dL/d log p_S at the top-k ids
  uint8_t trusted = 0;    ///< the region's decision (student tokens)
};

TROPD_HD inline token_record make_record(const token_result& r, bool trusted) noexcept {
  token_record x;
  x.loss = r.loss;
  x.loss_trust = r.loss_trust;
  x.loss_outlier = r.loss_outlier;
  x.loss_guidance = r.loss_guidance;
  x.dloss_ds = r.dloss_ds;
  x.advantage = r.advantage;
  x.teacher_mass = r.teacher_mass;
  x.student_mass = r.student_mass;
  x.tail_coef = r.topk_tail_coef;
  x.tail_teacher = r.topk_tail_teacher;
  x.flags = r.flags;
  x.topk_grad = r.topk_grad ? 1 : 0;
  x.trusted = trusted ? 1 : 0;
  return x;
}

// ---------------------------------------------------------------------------------------------
// Aggregation
// ---------------------------------------------------------------------------------------------

TROPD_HD constexpr bool is_counted(uint8_t f) noexcept { return (f & flags::counted) != 0; }
TROPD_HD constexpr bool is_kept(uint8_t f) noexcept { return (f & flags::kept) != 0; }

/// Whether the mode normalises by sequences.
TROPD_HD constexpr bool sequence_mode(aggregation::mode m) noexcept {
  return m == aggregation::mode::seq_mean_token_mean || m == aggregation::mode::seq_mean_token_sum;
}

/// What token i adds to the count a token mode normalises by (kept tokens for
/// kept_token_mean, counted tokens otherwise).
TROPD_HD constexpr double token_count(const aggregation::aggregation& agg, uint8_t f) noexcept {
  return (agg.how == aggregation::mode::kept_token_mean ? is_kept(f) : is_counted(f)) ? 1.0 : 0.0;
}

/// A sequence's factor from its counted tokens c (0: the sequence is not counted).
TROPD_HD constexpr double sequence_factor(const aggregation::aggregation& agg, double c) noexcept {
  if (!(c > 0)) return 0.0;
  return agg.how == aggregation::mode::seq_mean_token_mean ? 1.0 / c : 1.0;
}

/// The normaliser from the count (token modes: tokens; sequence modes: counted sequences):
/// the external normaliser when set, C for sum_over_constant.
TROPD_HD constexpr double normaliser_of(const aggregation::aggregation& agg, double count) noexcept {
  if (agg.how == aggregation::mode::sum_over_constant) count = agg.constant;
  return agg.normaliser > 0 ? agg.normaliser : count;
}

/// The weight of token i: per (its sequence's factor, or 1 for token modes) over the normaliser.
TROPD_HD constexpr double token_weight(uint8_t f, double per, double normaliser) noexcept {
  const double inv = normaliser > 0 ? 1.0 / normaliser : 0.0;
  return is_counted(f) ? per * inv : 0.0;
}

// ---------------------------------------------------------------------------------------------
// Diagnostics
// ---------------------------------------------------------------------------------------------

struct diag_partial {
  double loss_trust = 0, loss_outlier = 0, loss_guidance = 0, loss_dense = 0;
  double sum_rt = 0, sum_ro = 0, tv = 0, hs = 0, ht = 0, rk = 0, sk = 0, pk = 0;
  int64_t n_counted = 0, n_kept = 0, n_teacher = 0, n_student = 0, n_trusted = 0, n_outlier = 0, n_zero = 0;
  int64_t n_rt = 0, n_ro = 0, n_tk = 0, adv_c = 0, ratio_c = 0;

  /// Token i of batch b (b.from: the tags after masking), its record and weight; dense_value:
  /// the row's dense divergence (read only where w != 0) and the objective's dense weight.
  TROPD_HD void add(const token_batch& b, index_t i, const token_record& r, double w, double dense_weight, double dense_value) noexcept {
    loss_trust += w * r.loss_trust;
    loss_outlier += w * r.loss_outlier;
    loss_guidance += w * r.loss_guidance;
    if (w != 0 && dense_weight != 0) loss_dense += w * dense_weight * dense_value;
    if (is_counted(r.flags)) ++n_counted;
    if (is_kept(r.flags)) ++n_kept;
    const origin from = b.from[i];
    if (from == origin::teacher) ++n_teacher;
    if (from != origin::student) return;
    ++n_student;
    const double R = b.t[i] - (b.s_old.size ? b.s_old[i] : b.s[i]);
    const bool tr = r.trusted != 0;
    if (tr) ++n_trusted;
    else ++n_outlier;
    if (R == -inf<double>()) {
      ++n_zero;
    } else if (tr) {
      sum_rt += R;
      ++n_rt;
    } else {
      sum_ro += R;
      ++n_ro;
    }
    tv += R >= 0 ? 0.0 : -expm1_(R);
    if (r.flags & flags::adv_clipped) ++adv_c;
    if (r.flags & flags::ratio_clipped) ++ratio_c;
    if (b.student_entropy.size) hs += b.student_entropy[i];
    if (b.teacher_entropy.size) ht += b.teacher_entropy[i];
    if (b.rkl.size) rk += b.rkl[i];  // +inf stays +inf: the true mean
    if (r.teacher_mass > 0) {
      sk += r.teacher_mass;
      pk += r.student_mass;
      ++n_tk;
    }
  }
  TROPD_HD void merge(const diag_partial& o) noexcept {
    loss_trust += o.loss_trust;
    loss_outlier += o.loss_outlier;
    loss_guidance += o.loss_guidance;
    loss_dense += o.loss_dense;
    sum_rt += o.sum_rt;
    sum_ro += o.sum_ro;
    tv += o.tv;
    hs += o.hs;
    ht += o.ht;
    rk += o.rk;
    sk += o.sk;
    pk += o.pk;
    n_counted += o.n_counted;
    n_kept += o.n_kept;
    n_teacher += o.n_teacher;
    n_student += o.n_student;
    n_trusted += o.n_trusted;
    n_outlier += o.n_outlier;
    n_zero += o.n_zero;
    n_rt += o.n_rt;
    n_ro += o.n_ro;
    n_tk += o.n_tk;
    adv_c += o.adv_c;
    ratio_c += o.ratio_c;
  }
  /// The diagnostics from the sums (the dense part added as evaluate_rows adds it).
  TROPD_HD diagnostics finish(index_t n, double normaliser, bool has_ent_s, bool has_ent_t, bool has_rkl, index_t n_masked,
                              bool has_dense) const noexcept {
    diagnostics d;
    d.normaliser = normaliser;
    d.n_tokens = n;
    d.loss_trust = loss_trust;
    d.loss_outlier = loss_outlier;
    d.loss_guidance = loss_guidance;
    d.n_counted = n_counted;
    d.n_kept = n_kept;
    d.n_teacher = n_teacher;
    d.n_student = n_student;
    d.n_trusted = n_trusted;
    d.n_outlier = n_outlier;
    d.n_zero_teacher_mass = n_zero;
    const double ns = double(n_student);
    const double nan = quiet_nan<double>();
    d.trust_fraction = ns > 0 ? double(n_trusted) / ns : nan;
    d.outlier_fraction = ns > 0 ? double(n_outlier) / ns : nan;
    d.adv_clip_fraction = ns > 0 ? double(adv_c) / ns : nan;
    d.ratio_clip_fraction = ns > 0 ? double(ratio_c) / ns : nan;
    d.mean_R_trusted = n_rt > 0 ? sum_rt / double(n_rt) : nan;
    d.mean_R_outlier = n_ro > 0 ? sum_ro / double(n_ro) : nan;
    d.tv_estimate = ns > 0 ? tv / ns : nan;
    d.mean_student_entropy = (ns > 0 && has_ent_s) ? hs / ns : nan;
    d.mean_teacher_entropy = (ns > 0 && has_ent_t) ? ht / ns : nan;
    d.mean_rkl = (ns > 0 && has_rkl) ? rk / ns : nan;
    d.mean_topk_teacher_mass = n_tk > 0 ? sk / double(n_tk) : nan;
    d.mean_topk_student_mass = n_tk > 0 ? pk / double(n_tk) : nan;
    d.loss = d.loss_trust + d.loss_outlier + d.loss_guidance;
    if (has_dense) {
      d.loss_dense = loss_dense;
      d.loss += loss_dense;
    }
    d.n_masked_input = n_masked;
    return d;
  }
};

/// Diagnostics of a failed call: every value NaN, every count -1.
TROPD_HD inline diagnostics poisoned_diagnostics() noexcept {
  diagnostics d;
  const double nan = quiet_nan<double>();
  d.loss = d.loss_trust = d.loss_outlier = d.loss_guidance = d.loss_dense = d.normaliser = nan;
  d.n_tokens = d.n_student = d.n_teacher = d.n_counted = d.n_kept = -1;
  d.n_trusted = d.n_outlier = d.n_zero_teacher_mass = d.n_masked_input = -1;
  d.trust_fraction = d.outlier_fraction = d.adv_clip_fraction = d.ratio_clip_fraction = nan;
  d.mean_R_trusted = d.mean_R_outlier = d.tv_estimate = d.mean_student_entropy = d.mean_teacher_entropy = nan;
  d.mean_topk_teacher_mass = d.mean_topk_student_mass = d.mean_rkl = nan;
  return d;
}

// ---------------------------------------------------------------------------------------------
// Outputs
// ---------------------------------------------------------------------------------------------

/// dL_i/d log p_S at list entry k: the raw coefficient g[k] with the tail bucket's c p_k folded
/// in (estimators::fold_tail on the one entry).
TROPD_HD inline double folded_topk(const token_record& r, const double* g, values_row lq, values_row ls, index_t k) noexcept {
  double x = g[k];
  if (r.topk_grad && r.tail_coef != 0) {
    const index_t bytes_q = lq.type == scalar_type::f64 ? 8 : 4, bytes_s = ls.type == scalar_type::f64 ? 8 : 4;
    const values_row q1{static_cast<const char*>(lq.data) + k * bytes_q, lq.type};
    const values_row s1{static_cast<const char*>(ls.data) + k * bytes_s, ls.type};
    estimators::fold_tail(q1, s1, 1, r.tail_coef, &x);
  }
  return x;
}

/// Whether token i's weighted outputs and the gradient entries it induces fit `limit` (the
/// largest finite value of the narrowest output written): |entries at j| + p_j |P_j| is at most
/// sum |g| + |sum g| + 2 (1 - S_K) (core/sparse_terms.hpp), bounded here by twice sum |g|.
TROPD_HD inline bool output_fits(const token_record& r, const double* g, values_row lq, values_row ls, index_t K, double w,
                                 double limit) noexcept {
  const double wi = abs_(w);
  double sum_abs = abs_(r.dloss_ds), folded = 0;
  for (index_t k = 0; k < K; ++k) {
    sum_abs += abs_(g[k]);
    folded = max_(folded, abs_(folded_topk(r, g, lq, ls, k)));
  }
  const double mag = wi * (2.0 * sum_abs + 2.0 * abs_(r.tail_teacher));
  return (mag <= limit) && (wi * folded <= limit) && (abs_(r.advantage) <= limit) && (abs_(r.loss) <= limit);
}

}  // namespace tropd::stage_rules
