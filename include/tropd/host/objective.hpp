// tropd/host/objective.hpp: evaluates a tropd::objective on the CPU, at token level and at row level.
//
// Phases (each callable alone):
//   1. validate      shapes, ids, offsets, finiteness (nothing is written on failure)
//   2. decide        batch decisions (quantiles, sequence masks) then the region rule per
//                    student token -> trusted / outlier
//   3. apply         the per-token rule (objective.hpp: evaluate_token) -> L_i, dL_i/ds,
//                    sparse dL_i/d log p_S at the teacher's top-k ids
//   4. aggregate     weights w_i from the aggregation mode; loss = sum w_i L_i
//   5. (rows only)   dL/dz_i = w_i (dL_i/ds (e_y - p) + sum_k g_ik (e_k - p) + dense term) / T_S
//
// Row level reads each row pair once for phase A (statistics, teacher top-k, gathers) and
// the student row once more for phase 5 (the teacher row too only with a dense term): the
// gradient needs the batch decisions, so it cannot be written during phase A
// (docs/performance.md).
//
// Token level (`evaluate_tokens`): the caller supplies per-token log-probs (and, when the
// policies need them, entropies, the per-position reverse KL, reference log-probs, and top-k
// lists with the student's log-probs at the teacher's ids) and receives dL/ds and the
// sparse top-k gradient to push through its own log_softmax.
// Row level (`evaluate_rows`): the caller supplies student and teacher logits (or teacher
// top-k lists) and the sampled ids and receives the dense dL/dz.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/tokens.hpp>
#include <tropd/core/views.hpp>
#include <tropd/host/rows.hpp>
#include <tropd/objective.hpp>

namespace tropd::host {

/// Per-token inputs of the token-level entry point. Arrays are [n] unless noted; empty
/// optional arrays mean "not supplied".
struct token_batch {
  vector_view<const float> s;                 ///< current student log-prob of each token (required)
  vector_view<const float> s_old;             ///< rollout-time student log-prob (optional: = s)
  vector_view<const float> t;                 ///< teacher log-prob (required; -inf allowed)
  vector_view<const origin> from;             ///< origin tag of each token (required)
  vector_view<const index_t> seq_offsets;     ///< [n_seq + 1] CSR offsets (required)
  vector_view<const uint64_t> seq_ids;        ///< [n_seq] global sequence ids (optional: index in batch)
  vector_view<const float> student_entropy;   ///< H_S per position (regions that need it)
  vector_view<const float> teacher_entropy;   ///< H_T per position (regions that need it)
  vector_view<const float> rkl;               ///< detached per-position reverse KL (vOPD)
  vector_view<const float> ref;               ///< reference-model log-prob (G-OPD)
  matrix_view<const int32_t> topk_ids;        ///< [n x K] teacher top-k ids (outlier handlers that need them)
  matrix_view<const float> topk_teacher;      ///< [n x K] teacher log-probs at those ids (-inf: padding)
  matrix_view<const float> topk_student;      ///< [n x K] current student log-probs at those ids
  matrix_view<const float> topk_student_old;  ///< [n x K] rollout-time student log-probs (optional: = current)
  /// [n] optional: log(1 - P_K), the current student's exact log-mass outside the top-k list
  /// (-inf: none; NaN entries: unknown). Read only by the tail-bucket policy, which otherwise
  /// estimates it as 1 - sum exp(topk_student): with fp32 log-probs that estimate is
  /// meaningless for tails below ~1e-6 (and below 1e-12 taken as 0). evaluate_rows fills it.
  vector_view<const double> topk_student_tail_log;
};

/// What to do with non-finite or out-of-range per-token values (docs/robustness.md).
enum class input_policy : int {
  reject = 0,  ///< default: fail with an error naming the first bad token (nothing written)
  mask = 1,    ///< opt-in: treat bad tokens (and rows with NaN/+inf logits) as prompt tokens
               ///< (no loss, zero gradient) and count them in diagnostics::n_masked_input
};

/// Options of an evaluation.
struct eval_options {
  uint64_t seed = 0;  ///< keys the stochastic trust region (with step, sequence id, position)
  uint64_t step = 0;  ///< training step (random draws, phase switches)
  input_policy bad_input = input_policy::reject;
};

/// Optional per-token outputs (empty views are skipped).
struct token_outputs {
  vector_view<float> dloss_ds;      ///< [n] w_i dL_i/ds_i
  vector_view<float> advantage;     ///< [n] the advantage after clipping (0 where none)
  matrix_view<float> dloss_dtopk;   ///< [n x K] w_i dL_i/d log p_S at the top-k ids (zeros elsewhere)
  vector_view<uint8_t> flags;       ///< [n] tropd::flags bits
};

/// Diagnostics computed in the same pass (fractions are over student tokens; NaN where undefined).
struct diagnostics {
  double loss = 0;             ///< the aggregated loss
  double loss_trust = 0, loss_outlier = 0, loss_guidance = 0, loss_dense = 0;  ///< its parts (aggregated)
  double normaliser = 0;       ///< the denominator used
  index_t n_tokens = 0, n_student = 0, n_teacher = 0, n_counted = 0, n_kept = 0;
  index_t n_trusted = 0, n_outlier = 0, n_zero_teacher_mass = 0;
  double trust_fraction = 0, outlier_fraction = 0;
  double adv_clip_fraction = 0, ratio_clip_fraction = 0;
  double mean_R_trusted = 0, mean_R_outlier = 0;  ///< over finite R
  double tv_estimate = 0;      ///< mean over student tokens of 1 - min(1, e^R): an unbiased TV(p, q) estimate
  double mean_student_entropy = 0, mean_teacher_entropy = 0;
  double mean_topk_teacher_mass = 0, mean_topk_student_mass = 0;  ///< over tokens where a top-k term ran
  double mean_rkl = 0;         ///< mean detached reverse KL over student tokens (when known)
  index_t n_masked_input = 0;  ///< tokens dropped by input_policy::mask
};

namespace detail {

inline double nan_d() { return quiet_nan<double>(); }

template <class V>
inline bool has(const V& v) { return v.size != 0; }

inline bool bad_value(float x, bool allow_neg_inf) {
  return is_nan(x) || x == inf<float>() || (!allow_neg_inf && x == -inf<float>());
}

/// Structural validation of a token batch for an objective: shapes, offsets, origin tags,
/// required optional inputs. Always an error when it fails (whatever the input policy).
template <class Obj>
status validate_structure(const Obj& obj, const token_batch& b) {
  TROPD_TRY(obj.check());
  const index_t n = b.s.size;
  if (n == 0) return make_error(errc::empty_batch, "no tokens");
  if (b.t.size != n || b.from.size != n) return make_error(errc::shape_mismatch, "s, t and origin must all have n entries");
  if (b.seq_offsets.size < 2) return make_error(errc::shape_mismatch, "seq_offsets needs n_seq + 1 >= 2 entries");
  if (b.seq_offsets[0] != 0 || b.seq_offsets[b.seq_offsets.size - 1] != n)
    return make_error(errc::shape_mismatch, "seq_offsets must start at 0 and end at n");
  for (index_t j = 1; j < b.seq_offsets.size; ++j)
    if (b.seq_offsets[j] < b.seq_offsets[j - 1]) return make_error(errc::shape_mismatch, "seq_offsets must be non-decreasing", j);
  const index_t n_seq = b.seq_offsets.size - 1;
  if (b.seq_ids.size != 0 && b.seq_ids.size != n_seq) return make_error(errc::shape_mismatch, "seq_ids must have n_seq entries");
  for (index_t i = 0; i < n; ++i)
    if (static_cast<uint8_t>(b.from[i]) > 2) return make_error(errc::invalid_parameter, "origin tag must be prompt, teacher or student", i);
  if (b.s_old.size != 0 && b.s_old.size != n) return make_error(errc::shape_mismatch, "s_old must be empty or have n entries");
  using R = typename Obj::region_type;
  using T = typename Obj::trust_type;
  using O = typename Obj::outlier_type;
  if constexpr (R::needs_student_entropy)
    if (b.student_entropy.size == 0) return make_error(errc::unsupported, "this region needs student entropies (token_batch::student_entropy)");
  if constexpr (R::needs_teacher_entropy)
    if (b.teacher_entropy.size == 0) return make_error(errc::unsupported, "this region needs teacher entropies (token_batch::teacher_entropy)");
  if constexpr (T::needs_rkl)
    if (b.rkl.size == 0) return make_error(errc::unsupported, "this trust estimator needs the per-position reverse KL (token_batch::rkl)");
  if constexpr (T::needs_ref)
    if (b.ref.size == 0) return make_error(errc::unsupported, "this trust estimator needs reference log-probs (token_batch::ref)");
  if (b.student_entropy.size != 0 && b.student_entropy.size != n) return make_error(errc::shape_mismatch, "student_entropy must be empty or have n entries");
  if (b.teacher_entropy.size != 0 && b.teacher_entropy.size != n) return make_error(errc::shape_mismatch, "teacher_entropy must be empty or have n entries");
  if (b.rkl.size != 0 && b.rkl.size != n) return make_error(errc::shape_mismatch, "rkl must be empty or have n entries");
  if (b.ref.size != 0 && b.ref.size != n) return make_error(errc::shape_mismatch, "ref must be empty or have n entries");
  if constexpr (O::needs_topk) {
    const auto& ids = b.topk_ids;
    if (ids.rows != n || b.topk_teacher.rows != n || b.topk_student.rows != n || ids.cols < 1 ||
        b.topk_teacher.cols != ids.cols || b.topk_student.cols != ids.cols)
      return make_error(errc::shape_mismatch, "this outlier handler needs [n x K] topk_ids, topk_teacher and topk_student (K >= 1)");
    if (b.topk_student_old.rows != 0 && (b.topk_student_old.rows != n || b.topk_student_old.cols != ids.cols))
      return make_error(errc::shape_mismatch, "topk_student_old must be empty or [n x K]");
    if (b.topk_student_tail_log.size != 0 && b.topk_student_tail_log.size != n)
      return make_error(errc::shape_mismatch, "topk_student_tail_log must be empty or have n entries");
    if (!ids.valid() || !b.topk_teacher.valid() || !b.topk_student.valid() || !b.topk_student_old.valid())
      return make_error(errc::shape_mismatch, "top-k views are malformed");
    // Ids are structure: a negative or repeated id (among non-padding entries) is an error
    // under either input policy, as at row level.
    const index_t K = ids.cols;
    for (index_t i = 0; i < n; ++i) {
      if (b.from[i] != origin::student) continue;
      const float* lq = b.topk_teacher.row(i);
      const int32_t* id = ids.row(i);
      for (index_t k = 0; k < K; ++k) {
        if (lq[k] == -inf<float>()) continue;
        if (id[k] < 0) return make_error(errc::id_out_of_range, "topk id is negative", i, k);
        for (index_t j = 0; j < k; ++j)
          if (lq[j] != -inf<float>() && id[j] == id[k]) return make_error(errc::duplicate_topk_id, "top-k list repeats an id", i, k);
      }
    }
  }
  return {};
}

/// Value validation of one token (non-prompt tokens only): finiteness and ranges of its
/// log-probs, entropies, extras and top-k entries. Returns the first violation.
template <class Obj>
status check_token_values(const Obj&, const token_batch& b, index_t i) {
  if (b.from[i] == origin::prompt) return {};
  if (!is_finite(b.s[i])) return make_error(errc::non_finite_input, "student log-prob s is not finite", i);
  if (b.s[i] > 1e-4f) return make_error(errc::invalid_parameter, "student log-prob s is > 0 (pass log-probabilities, not logits)", i);
  if (bad_value(b.t[i], true)) return make_error(errc::non_finite_input, "teacher log-prob t is NaN or +inf", i);
  if (b.t[i] > 1e-4f) return make_error(errc::invalid_parameter, "teacher log-prob t is > 0 (pass log-probabilities, not logits)", i);
  if (b.s_old.size && !is_finite(b.s_old[i])) return make_error(errc::non_finite_input, "s_old is not finite", i);
  if (b.student_entropy.size && bad_value(b.student_entropy[i], false)) return make_error(errc::non_finite_input, "student_entropy is not finite", i);
  if (b.teacher_entropy.size && bad_value(b.teacher_entropy[i], false)) return make_error(errc::non_finite_input, "teacher_entropy is not finite", i);
  if (b.rkl.size && bad_value(b.rkl[i], false)) return make_error(errc::non_finite_input, "rkl is not finite", i);
  if (b.ref.size && bad_value(b.ref[i], true)) return make_error(errc::non_finite_input, "ref is NaN or +inf", i);
  if constexpr (Obj::outlier_type::needs_topk) {
    if (b.from[i] != origin::student) return {};
    const index_t K = b.topk_ids.cols;
    const float* lq = b.topk_teacher.row(i);
    for (index_t k = 0; k < K; ++k) {
      if (bad_value(lq[k], true)) return make_error(errc::non_finite_input, "topk_teacher is NaN or +inf", i, k);
      if (lq[k] == -inf<float>()) continue;
      if (bad_value(b.topk_student(i, k), true)) return make_error(errc::non_finite_input, "topk_student is NaN or +inf", i, k);
      if (b.topk_student_old.rows && bad_value(b.topk_student_old(i, k), true))
        return make_error(errc::non_finite_input, "topk_student_old is NaN or +inf", i, k);
    }
    if (b.topk_student_tail_log.size && b.topk_student_tail_log[i] > 1e-9)
      return make_error(errc::invalid_parameter, "topk_student_tail_log is > 0 (a log-mass)", i);
  }
  return {};
}

/// Validates a token batch (structure, then every token's values; reject policy).
template <class Obj>
status validate_tokens(const Obj& obj, const token_batch& b) {
  TROPD_TRY(validate_structure(obj, b));
  for (index_t i = 0; i < b.s.size; ++i) TROPD_TRY(check_token_values(obj, b, i));
  return {};
}

/// Input policy "mask": tokens whose values fail check_token_values become prompt tokens
/// (no loss, zero gradient) in `from_out`; returns how many. Structure errors stay errors.
template <class Obj>
index_t mask_bad_tokens(const Obj& obj, const token_batch& b, std::vector<origin>& from_out) {
  from_out.assign(b.from.begin(), b.from.end());
  index_t masked = 0;
  for (index_t i = 0; i < b.s.size; ++i)
    if (!check_token_values(obj, b, i).ok()) {
      from_out[static_cast<size_t>(i)] = origin::prompt;
      ++masked;
    }
  return masked;
}

/// Sequence index of every token (from CSR offsets).
inline std::vector<index_t> token_sequences(vector_view<const index_t> off, index_t n) {
  std::vector<index_t> seq(static_cast<size_t>(n));
  for (index_t j = 0; j + 1 < off.size; ++j)
    for (index_t i = off[j]; i < off[j + 1]; ++i) seq[static_cast<size_t>(i)] = j;
  return seq;
}

}  // namespace detail

/// Phase 2: region decisions for every token (1 = trusted; meaningful for student tokens).
/// Validates nothing: call after detail::validate_tokens (evaluate_tokens does).
template <class Obj>
status decide(const Obj& obj, const token_batch& b, const eval_options& opt, std::vector<uint8_t>& trusted) {
  const index_t n = b.s.size;
  const index_t n_seq = b.seq_offsets.size - 1;
  const std::vector<index_t> seq = detail::token_sequences(b.seq_offsets, n);
  std::vector<double> R, hs, ht;
  std::vector<index_t> sidx;
  for (index_t i = 0; i < n; ++i) {
    if (b.from[i] != origin::student) continue;
    const double so = b.s_old.size ? double(b.s_old[i]) : double(b.s[i]);
    R.push_back(double(b.t[i]) - so);
    hs.push_back(b.student_entropy.size ? double(b.student_entropy[i]) : detail::nan_d());
    ht.push_back(b.teacher_entropy.size ? double(b.teacher_entropy[i]) : detail::nan_d());
    sidx.push_back(seq[static_cast<size_t>(i)]);
  }
  regions::batch_context ctx{opt.seed, opt.step, 0, nullptr};
  regions::batch_storage storage;
  regions::batch_tokens bt{R.data(), hs.data(), ht.data(), sidx.data(), static_cast<index_t>(R.size()), n_seq};
  if constexpr (requires { obj.region.prepare(bt, ctx, storage); }) TROPD_TRY(obj.region.prepare(bt, ctx, storage));
  trusted.assign(static_cast<size_t>(n), 0);
  index_t k = 0;
  for (index_t i = 0; i < n; ++i) {
    if (b.from[i] != origin::student) continue;
    const index_t j = seq[static_cast<size_t>(i)];
    regions::token_view tv;
    tv.s = b.s[i];
    tv.s_old = b.s_old.size ? double(b.s_old[i]) : double(b.s[i]);
    tv.t = b.t[i];
    tv.R = R[static_cast<size_t>(k)];
    tv.ent_s = hs[static_cast<size_t>(k)];
    tv.ent_t = ht[static_cast<size_t>(k)];
    tv.seq_id = b.seq_ids.size ? b.seq_ids[j] : static_cast<uint64_t>(j);
    tv.position = static_cast<uint64_t>(i - b.seq_offsets[j]);
    tv.seq_index = j;
    trusted[static_cast<size_t>(i)] = obj.region.trusted(tv, ctx) ? 1 : 0;
    ++k;
  }
  return {};
}

/// Result of phase 3 for a batch (unweighted per-token values).
struct applied {
  std::vector<token_result> tok;
  std::vector<double> g_topk;  ///< [n x K] unweighted sparse gradients (form P)
  index_t K = 0;
};

/// Phase 3: the per-token rule over the batch.
template <class Obj>
status apply(const Obj& obj, const token_batch& b, const std::vector<uint8_t>& trusted, applied& out) {
  const index_t n = b.s.size;
  out.K = b.topk_ids.cols;
  out.tok.assign(static_cast<size_t>(n), token_result{});
  out.g_topk.assign(static_cast<size_t>(n * out.K), 0.0);
  for (index_t i = 0; i < n; ++i) {
    token_input in;
    in.s = b.s[i];
    in.s_old = b.s_old.size ? double(b.s_old[i]) : double(b.s[i]);
    in.t = b.t[i];
    in.from = b.from[i];
    in.rkl = b.rkl.size ? double(b.rkl[i]) : detail::nan_d();
    in.ref = b.ref.size ? double(b.ref[i]) : detail::nan_d();
    double* g = nullptr;
    if (out.K > 0 && b.topk_teacher.rows == n) {
      in.topk.teacher = b.topk_teacher.row(i);
      in.topk.student = b.topk_student.rows ? b.topk_student.row(i) : nullptr;
      in.topk.student_old = b.topk_student_old.rows ? b.topk_student_old.row(i) : nullptr;
      in.topk.student_tail_log = b.topk_student_tail_log.size ? b.topk_student_tail_log[i] : detail::nan_d();
      in.topk.k = static_cast<int>(out.K);
      g = out.g_topk.data() + i * out.K;
    }
    token_result r = evaluate_token(obj, in, trusted[static_cast<size_t>(i)] != 0, g);
    if (!r.st.ok()) return make_error(r.st.code, r.st.detail, i, r.st.col);
    if (!r.topk_grad && g)
      for (index_t k = 0; k < out.K; ++k) g[k] = 0;
    out.tok[static_cast<size_t>(i)] = r;
  }
  return {};
}

/// Phase 4: aggregation weights w_i and the normaliser.
template <class Obj>
status aggregate_weights(const Obj& obj, const token_batch& b, const applied& a, std::vector<double>& w, double& normaliser) {
  const index_t n = b.s.size;
  w.assign(static_cast<size_t>(n), 0.0);
  const auto& agg = obj.agg;
  using aggregation::mode;
  auto counted = [&](index_t i) { return (a.tok[static_cast<size_t>(i)].flags & flags::counted) != 0; };
  auto kept = [&](index_t i) { return (a.tok[static_cast<size_t>(i)].flags & flags::kept) != 0; };
  if (agg.how == mode::token_mean || agg.how == mode::kept_token_mean || agg.how == mode::sum_over_constant) {
    double cnt = 0;
    for (index_t i = 0; i < n; ++i) cnt += (agg.how == mode::kept_token_mean ? kept(i) : counted(i)) ? 1 : 0;
    if (agg.how == mode::sum_over_constant) cnt = agg.constant;
    normaliser = agg.normaliser > 0 ? agg.normaliser : cnt;
    const double inv = normaliser > 0 ? 1.0 / normaliser : 0.0;
    for (index_t i = 0; i < n; ++i) w[static_cast<size_t>(i)] = counted(i) ? inv : 0.0;
    return {};
  }
  // Sequence modes.
  const index_t n_seq = b.seq_offsets.size - 1;
  double seqs = 0;
  std::vector<double> per(static_cast<size_t>(n_seq), 0.0);
  for (index_t j = 0; j < n_seq; ++j) {
    double c = 0;
    for (index_t i = b.seq_offsets[j]; i < b.seq_offsets[j + 1]; ++i) c += counted(i) ? 1 : 0;
    if (c > 0) {
      seqs += 1;
      per[static_cast<size_t>(j)] = agg.how == mode::seq_mean_token_mean ? 1.0 / c : 1.0;
    }
  }
  normaliser = agg.normaliser > 0 ? agg.normaliser : seqs;
  const double inv = normaliser > 0 ? 1.0 / normaliser : 0.0;
  for (index_t j = 0; j < n_seq; ++j)
    for (index_t i = b.seq_offsets[j]; i < b.seq_offsets[j + 1]; ++i)
      w[static_cast<size_t>(i)] = counted(i) ? per[static_cast<size_t>(j)] * inv : 0.0;
  return {};
}

namespace detail {

/// Fills diagnostics and the aggregated loss from phases 2-4.
template <class Obj>
void summarise(const Obj&, const token_batch& b, const std::vector<uint8_t>& trusted, const applied& a,
               const std::vector<double>& w, double normaliser, diagnostics& d) {
  const index_t n = b.s.size;
  d = diagnostics{};
  d.normaliser = normaliser;
  d.n_tokens = n;
  double sum_rt = 0, sum_ro = 0, n_rt = 0, n_ro = 0, tv = 0, hs = 0, ht = 0, sk = 0, pk = 0, n_tk = 0, rk = 0;
  index_t adv_c = 0, ratio_c = 0;
  for (index_t i = 0; i < n; ++i) {
    const token_result& r = a.tok[static_cast<size_t>(i)];
    const double wi = w[static_cast<size_t>(i)];
    d.loss_trust += wi * r.loss_trust;
    d.loss_outlier += wi * r.loss_outlier;
    d.loss_guidance += wi * r.loss_guidance;
    if (r.flags & flags::counted) ++d.n_counted;
    if (r.flags & flags::kept) ++d.n_kept;
    if (b.from[i] == origin::teacher) ++d.n_teacher;
    if (b.from[i] != origin::student) continue;
    ++d.n_student;
    const double R = double(b.t[i]) - (b.s_old.size ? double(b.s_old[i]) : double(b.s[i]));
    const bool tr = trusted[static_cast<size_t>(i)] != 0;
    (tr ? d.n_trusted : d.n_outlier) += 1;
    if (R == -inf<double>()) ++d.n_zero_teacher_mass;
    else if (tr) { sum_rt += R; n_rt += 1; }
    else { sum_ro += R; n_ro += 1; }
    tv += R >= 0 ? 0.0 : -expm1_(R);
    if (r.flags & flags::adv_clipped) ++adv_c;
    if (r.flags & flags::ratio_clipped) ++ratio_c;
    if (b.student_entropy.size) hs += b.student_entropy[i];
    if (b.teacher_entropy.size) ht += b.teacher_entropy[i];
    if (b.rkl.size) rk += b.rkl[i];
    if (r.teacher_mass > 0) { sk += r.teacher_mass; pk += r.student_mass; n_tk += 1; }
  }
  const double ns = double(d.n_student);
  const double nan = nan_d();
  d.trust_fraction = ns > 0 ? double(d.n_trusted) / ns : nan;
  d.outlier_fraction = ns > 0 ? double(d.n_outlier) / ns : nan;
  d.adv_clip_fraction = ns > 0 ? double(adv_c) / ns : nan;
  d.ratio_clip_fraction = ns > 0 ? double(ratio_c) / ns : nan;
  d.mean_R_trusted = n_rt > 0 ? sum_rt / n_rt : nan;
  d.mean_R_outlier = n_ro > 0 ? sum_ro / n_ro : nan;
  d.tv_estimate = ns > 0 ? tv / ns : nan;
  d.mean_student_entropy = (ns > 0 && b.student_entropy.size) ? hs / ns : nan;
  d.mean_teacher_entropy = (ns > 0 && b.teacher_entropy.size) ? ht / ns : nan;
  d.mean_rkl = (ns > 0 && b.rkl.size) ? rk / ns : nan;
  d.mean_topk_teacher_mass = n_tk > 0 ? sk / n_tk : nan;
  d.mean_topk_student_mass = n_tk > 0 ? pk / n_tk : nan;
  d.loss = d.loss_trust + d.loss_outlier + d.loss_guidance;
}

inline status check_token_outputs(const token_outputs& o, index_t n, index_t K) {
  if (o.dloss_ds.size != 0 && o.dloss_ds.size != n) return make_error(errc::shape_mismatch, "dloss_ds must be empty or have n entries");
  if (o.advantage.size != 0 && o.advantage.size != n) return make_error(errc::shape_mismatch, "advantage must be empty or have n entries");
  if (o.flags.size != 0 && o.flags.size != n) return make_error(errc::shape_mismatch, "flags must be empty or have n entries");
  if (o.dloss_dtopk.rows != 0 && (o.dloss_dtopk.rows != n || o.dloss_dtopk.cols != K || !o.dloss_dtopk.valid()))
    return make_error(errc::shape_mismatch, "dloss_dtopk must be empty or [n x K] like topk_ids");
  return {};
}

/// Checks, before anything is written, that every weighted per-token output fits the fp32
/// outputs (and the fp32 gradient rows): a finite double that overflows float is an error,
/// never a silent inf.
inline status check_output_range(const token_batch& b, const applied& a, const std::vector<double>& w) {
  constexpr double fmax = 3.4028234663852886e38;
  for (index_t i = 0; i < b.s.size; ++i) {
    const token_result& r = a.tok[static_cast<size_t>(i)];
    const double wi = w[static_cast<size_t>(i)];
    // 2x margin: a dense gradient entry is at most |g_y| + p_j |sum g| <= 2 max|coefficient sum|.
    double mag = abs_(wi * r.dloss_ds);
    for (index_t k = 0; k < a.K; ++k) mag += abs_(wi * a.g_topk[static_cast<size_t>(i * a.K + k)]);
    if (!(2.0 * mag <= fmax) || !(abs_(r.advantage) <= fmax) || !(abs_(r.loss) <= fmax))
      return make_error(errc::infinite_divergence, "a per-token loss, advantage or gradient overflows fp32 (e.g. rho = exp(s - s_old) too large)", i);
  }
  return {};
}

inline void write_token_outputs(const token_batch& b, const applied& a, const std::vector<double>& w, const token_outputs& o) {
  const index_t n = b.s.size;
  for (index_t i = 0; i < n; ++i) {
    const token_result& r = a.tok[static_cast<size_t>(i)];
    const double wi = w[static_cast<size_t>(i)];
    if (o.dloss_ds.size) o.dloss_ds[i] = static_cast<float>(wi * r.dloss_ds);
    if (o.advantage.size) o.advantage[i] = static_cast<float>(r.advantage);
    if (o.flags.size) o.flags[i] = r.flags;
    if (o.dloss_dtopk.rows)
      for (index_t k = 0; k < a.K; ++k) o.dloss_dtopk(i, k) = static_cast<float>(wi * a.g_topk[static_cast<size_t>(i * a.K + k)]);
  }
}

}  // namespace detail

/// Token-level evaluation: loss, dL/ds, the sparse top-k gradient, flags and diagnostics.
/// Nothing is written on failure. Objectives with a dense full-vocabulary term (GKD)
/// need logits: they return errc::unsupported here (use evaluate_rows).
template <class Obj>
status evaluate_tokens(const Obj& obj, const token_batch& b, const eval_options& opt, const token_outputs& out,
                       double* loss, diagnostics* diag = nullptr) {
  if constexpr (Obj::has_dense) {
    return make_error(errc::unsupported, "objective has a full-vocabulary term: it needs logits (use evaluate_rows)");
  } else {
    TROPD_TRY(detail::validate_structure(obj, b));
    TROPD_TRY(detail::check_token_outputs(out, b.s.size, b.topk_ids.cols));
    token_batch bb = b;
    std::vector<origin> from_masked;
    index_t n_masked = 0;
    if (opt.bad_input == input_policy::mask) {
      n_masked = detail::mask_bad_tokens(obj, b, from_masked);
      bb.from = {from_masked.data(), b.s.size};
    } else {
      for (index_t i = 0; i < b.s.size; ++i) TROPD_TRY(detail::check_token_values(obj, b, i));
    }
    std::vector<uint8_t> trusted;
    TROPD_TRY(decide(obj, bb, opt, trusted));
    applied a;
    TROPD_TRY(apply(obj, bb, trusted, a));
    std::vector<double> w;
    double norm = 0;
    TROPD_TRY(aggregate_weights(obj, bb, a, w, norm));
    diagnostics d;
    detail::summarise(obj, bb, trusted, a, w, norm, d);
    d.n_masked_input = n_masked;
    TROPD_TRY(detail::check_output_range(bb, a, w));
    detail::write_token_outputs(bb, a, w, out);
    if (loss) *loss = d.loss;
    if (diag) *diag = d;
    return {};
  }
}

/// Per-row token metadata of the row-level entry point.
struct row_tokens {
  vector_view<const int32_t> ids;          ///< [n] the token at each row (sampled or teacher-prefix)
  vector_view<const origin> from;          ///< [n]
  vector_view<const index_t> seq_offsets;  ///< [n_seq + 1]
  vector_view<const uint64_t> seq_ids;     ///< [n_seq] optional
  vector_view<const float> s_old;          ///< [n] optional rollout-time log-probs (default: from the rows)
  vector_view<const float> ref;            ///< [n] optional reference log-probs (G-OPD)
  matrix_view<const float> topk_student_old;  ///< [n x K] optional rollout-time log-probs at the teacher's top-k
};

/// Row-level evaluation with full teacher logits (teacher top-k ids are selected from the
/// teacher rows where the outlier handler needs them; K = min(obj.outlier.fkl.k, V)) or with given
/// teacher top-k lists (pass `lists`; then teacher logits give t and H_T). grad [n x V] receives
/// dL/dz. Entropies, the per-position reverse KL and log-probs are computed from the rows.
template <class Obj, logit_element TS, logit_element TT, grad_element G = float>
status evaluate_rows(const Obj& obj, matrix_view<const TS> student, matrix_view<const TT> teacher, const row_tokens& tok,
                     const eval_options& opt, matrix_view<G> grad, double* loss, diagnostics* diag = nullptr,
                     const token_outputs& tout = {}, const row_options& ropt = {}, const topk_lists* lists = nullptr) {
  using W = detail::work_t<TS, TT>;
  TROPD_TRY(obj.check());
  TROPD_TRY(detail::check_temperatures(ropt));
  const index_t n = student.rows, V = student.cols;
  std::vector<double> dummy_loss(static_cast<size_t>(n));
  TROPD_TRY(detail::check_student_and_outputs(student, vector_view<double>{dummy_loss.data(), n}, grad, {}));
  TROPD_TRY(detail::check_teacher_rows(teacher, n, V));
  TROPD_TRY(check_ids(tok.ids, n, V));
  if (tok.from.size != n) return make_error(errc::shape_mismatch, "origin must have one entry per row");
  if (tok.s_old.size != 0 && tok.s_old.size != n) return make_error(errc::shape_mismatch, "s_old must be empty or one per row");
  constexpr bool need_topk = Obj::outlier_type::needs_topk;
  index_t K = 0;
  if constexpr (need_topk) {
    if (lists) {
      if (lists->ids.rows != n || lists->logprobs.rows != n || lists->ids.cols != lists->logprobs.cols || lists->ids.cols < 1 ||
          !lists->ids.valid() || !lists->logprobs.valid())
        return make_error(errc::shape_mismatch, "teacher top-k lists must be [n x K] ids and log-probs, K >= 1");
      K = lists->ids.cols;
      for (index_t r = 0; r < n; ++r)
        if (tok.from[r] == origin::student) TROPD_TRY(check_topk_row(lists->ids.row(r), lists->logprobs.row(r), int(K), V, r));
    } else {
      K = std::min<index_t>(obj.outlier.fkl.k, V);  // k > V: the whole vocabulary
    }
    if (tok.topk_student_old.rows != 0 && (tok.topk_student_old.rows != n || tok.topk_student_old.cols != K))
      return make_error(errc::shape_mismatch, "topk_student_old must be empty or [n x K]");
  }
  const W its = W(1.0 / ropt.student_temperature), itt = W(1.0 / ropt.teacher_temperature);

  // Phase A: row statistics (one read of both rows; nothing written). Under
  // input_policy::mask a row with NaN/+inf logits (or no finite entry) becomes a prompt row.
  // For student rows the teacher's top-k entries (when the outlier handler needs them and no
  // lists are given) are selected in the same read, and the student's log-probs at the top-k
  // ids are gathered while the row is in cache.
  const bool mask_bad = opt.bad_input == input_policy::mask;
  // The moments pass 1 computes: both log-sum-exps always; the entropies and the reverse KL
  // where the region / trust estimator / dense term read them, or for the diagnostics (their
  // means); the forward KL only for a dense term that reads it. Per-token arrays that are not
  // computed stay out of the token batch (empty views), so nothing reads their NaN.
  using R = typename Obj::region_type;
  constexpr estimators::moments_needed dense_reads = [] {
    if constexpr (Obj::has_dense) return estimators::summary_reads_of<typename Obj::dense_type>();
    else return estimators::lse_only;
  }();
  constexpr estimators::moments_needed need_min =
      estimators::moments_needed{R::needs_student_entropy, R::needs_teacher_entropy, Obj::trust_type::needs_rkl, false} |
      dense_reads;
  constexpr estimators::moments_needed need_diag = need_min | estimators::moments_needed{true, true, true, false};
  const estimators::moments_needed need = diag ? need_diag : need_min;
  std::vector<origin> from_eff(tok.from.begin(), tok.from.end());
  std::vector<uint8_t> row_masked(static_cast<size_t>(n), 0);
  std::vector<estimators::row_summary> sums(static_cast<size_t>(n));
  std::vector<float> s(static_cast<size_t>(n)), t(static_cast<size_t>(n)), hs(static_cast<size_t>(n)),
      ht(static_cast<size_t>(n)), rk(static_cast<size_t>(n));
  std::vector<int32_t> kid(static_cast<size_t>(n * K), 0);
  std::vector<float> klq(static_cast<size_t>(n * K), -inf<float>()), kls(static_cast<size_t>(n * K), 0.f);
  std::vector<double> ktail;  // exact log(1 - P_K) per row for the tail-bucket policy (NaN: not computed)
  bool exact_tail = false;
  if constexpr (need_topk) {
    exact_tail = obj.outlier.fkl.tail == estimators::topk_tail::tail_bucket;
    if (exact_tail) ktail.assign(static_cast<size_t>(n), detail::nan_d());
  }
  TROPD_TRY(parallel_rows(n, ropt.threads, [&](index_t b0, index_t e0) -> status {
    auto buf = std::make_unique<detail::row_scratch<W>>();
    if (need_topk && !lists) buf->prepare_topk(int(K));
    for (index_t r = b0; r < e0; ++r) {
      auto& sm = sums[static_cast<size_t>(r)];
      const int select = need_topk && !lists && tok.from[r] == origin::student ? int(K) : 0;
      const status st1 = diag ? detail::row_pass1<need_diag>(student.row(r), teacher.row(r), V, its, itt, *buf, r, sm, select)
                              : detail::row_pass1<need_min>(student.row(r), teacher.row(r), V, its, itt, *buf, r, sm, select);
      if (!st1.ok()) {
        if (mask_bad && (st1.code == errc::non_finite_input || st1.code == errc::no_finite_entry)) {
          row_masked[static_cast<size_t>(r)] = 1;
          continue;  // s, t, entropies stay 0; the row gets origin::prompt below
        }
        return st1;
      }
      if constexpr (Obj::has_dense) {
        if (from_eff[static_cast<size_t>(r)] != origin::prompt) {
          if (!obj.dense.finite(sm)) return make_error(errc::infinite_divergence, "the dense divergence is infinite for this row", r);
          if constexpr (Obj::dense_type::second_pass)
            detail::row_pass1b(obj.dense, student.row(r), teacher.row(r), V, its, itt, *buf, sm);
        }
      }
      const int32_t y = tok.ids[r];
      s[static_cast<size_t>(r)] = float(double(W(to_acc(student.row(r)[y])) * its) - sm.lse_s);
      t[static_cast<size_t>(r)] = float(double(W(to_acc(teacher.row(r)[y])) * itt) - sm.lse_t);
      hs[static_cast<size_t>(r)] = float(sm.ent_s);
      ht[static_cast<size_t>(r)] = float(sm.ent_t);
      rk[static_cast<size_t>(r)] = float(min_(sm.rkl, 1e30));
      if (from_eff[static_cast<size_t>(r)] != origin::prompt && s[static_cast<size_t>(r)] == -inf<float>())
        return make_error(errc::infinite_divergence, "the student gives zero mass to the token at this row", r, y);
      if (!need_topk || tok.from[r] != origin::student) continue;
      // Top-k lists and the student's log-probs at them.
      int32_t* ids = kid.data() + r * K;
      float* lq = klq.data() + r * K;
      float* ls = kls.data() + r * K;
      if (lists) {
        for (index_t k = 0; k < K; ++k) {
          lq[k] = lists->logprobs(r, k);
          ids[k] = lq[k] == -inf<float>() ? 0 : lists->ids(r, k);
        }
      } else {
        for (index_t k = 0; k < K; ++k) {
          const int32_t id = buf->topk_ids[static_cast<size_t>(k)];
          lq[k] = id < 0 ? -inf<float>() : float(double(buf->topk_vals[static_cast<size_t>(k)]) - sm.lse_t);
          ids[k] = id < 0 ? 0 : id;
        }
      }
      for (index_t k = 0; k < K; ++k)
        ls[k] = lq[k] == -inf<float>() ? 0.f : float(double(W(to_acc(student.row(r)[ids[k]])) * its) - sm.lse_s);
      if (exact_tail)
        ktail[static_cast<size_t>(r)] =
            detail::student_tail_log(student.row(r), V, its, sm.lse_s, ids, int(K), [&](int k) { return lq[k] == -inf<float>(); }, *buf);
    }
    return {};
  }));

  index_t n_masked = 0;
  for (index_t r = 0; r < n; ++r)
    if (row_masked[static_cast<size_t>(r)] && from_eff[static_cast<size_t>(r)] != origin::prompt) {
      from_eff[static_cast<size_t>(r)] = origin::prompt;
      ++n_masked;
    }

  // Phases 2-4 on the token view of the rows.
  token_batch b;
  b.s = {s.data(), n};
  b.s_old = tok.s_old;
  b.t = {t.data(), n};
  b.from = {from_eff.data(), n};
  b.seq_offsets = tok.seq_offsets;
  b.seq_ids = tok.seq_ids;
  if (need.ent_s) b.student_entropy = {hs.data(), n};
  if (need.ent_t) b.teacher_entropy = {ht.data(), n};
  if (need.rkl) b.rkl = {rk.data(), n};
  b.ref = tok.ref;
  if constexpr (need_topk) {
    b.topk_ids = make_matrix<const int32_t>(kid.data(), n, K);
    b.topk_teacher = make_matrix<const float>(klq.data(), n, K);
    b.topk_student = make_matrix<const float>(kls.data(), n, K);
    b.topk_student_old = tok.topk_student_old;
    if (exact_tail) b.topk_student_tail_log = {ktail.data(), n};
  }
  TROPD_TRY(detail::validate_structure(obj, b));
  TROPD_TRY(detail::check_token_outputs(tout, n, K));
  if (mask_bad) {
    std::vector<origin> f2;
    n_masked += detail::mask_bad_tokens(obj, b, f2);
    from_eff = std::move(f2);
    b.from = {from_eff.data(), n};
  } else {
    for (index_t i = 0; i < n; ++i) TROPD_TRY(detail::check_token_values(obj, b, i));
  }
  std::vector<uint8_t> trusted;
  TROPD_TRY(decide(obj, b, opt, trusted));
  applied a;
  TROPD_TRY(apply(obj, b, trusted, a));
  std::vector<double> w;
  double norm = 0;
  TROPD_TRY(aggregate_weights(obj, b, a, w, norm));
  diagnostics d;
  detail::summarise(obj, b, trusted, a, w, norm, d);
  d.n_masked_input = n_masked;
  if constexpr (Obj::has_dense) {
    for (index_t r = 0; r < n; ++r)
      d.loss_dense += w[static_cast<size_t>(r)] * obj.dense_weight * obj.dense.value(sums[static_cast<size_t>(r)]);
    d.loss += d.loss_dense;
  }

  TROPD_TRY(detail::check_output_range(b, a, w));

  // Phase 5: dense gradient rows (reads the student row, and the teacher row only for a
  // dense term). Each block walks its rows backwards: the rows phase A read last may still
  // be in the last-level cache.
  if (grad.rows) {
    const bool stream = detail::stream_gradient(grad);
    TROPD_TRY(parallel_rows(n, ropt.threads, [&](index_t b0, index_t e0) -> status {
      auto buf = std::make_unique<detail::row_scratch<W>>();
      std::vector<int32_t> ids(static_cast<size_t>(K + 1));
      std::vector<double> coef(static_cast<size_t>(K + 1));
      status first{};  // the lowest failing row of the block (the walk goes on after a failure)
      for (index_t r = e0; r-- > b0;) {
        const double wi = w[static_cast<size_t>(r)];
        const token_result& tr = a.tok[static_cast<size_t>(r)];
        int m = 0;
        ids[0] = tok.ids[r];
        coef[0] = tr.dloss_ds;
        m = 1;
        if (tr.topk_grad)
          for (index_t k = 0; k < K; ++k) {
            ids[static_cast<size_t>(m)] = kid[static_cast<size_t>(r * K + k)];
            coef[static_cast<size_t>(m)] = a.g_topk[static_cast<size_t>(r * K + k)];
            ++m;
          }
        const double scale = wi / ropt.student_temperature;
        const auto& sm = sums[static_cast<size_t>(r)];
        if constexpr (Obj::has_dense) {
          if (from_eff[static_cast<size_t>(r)] != origin::prompt) {
            const status st = detail::gradient_status(r, detail::row_pass2(obj.dense, student.row(r), teacher.row(r), V, its, itt, *buf, sm,
                                                                           obj.dense_weight, detail::sparse_terms{ids.data(), coef.data(), m},
                                                                           scale, grad.row(r), stream));
            if (!st.ok()) first = st;
            continue;
          }
        }
        const status st = detail::gradient_status(r, detail::row_pass2(detail::no_dense{}, student.row(r), static_cast<const TT*>(nullptr), V,
                                                                       its, itt, *buf, sm, 0.0, detail::sparse_terms{ids.data(), coef.data(), m},
                                                                       scale, grad.row(r), stream));
        if (!st.ok()) first = st;
      }
      return first;
    }));
  }
  detail::write_token_outputs(b, a, w, tout);
  if (loss) *loss = d.loss;
  if (diag) *diag = d;
  return {};
}

}  // namespace tropd::host
