// tropd/host/rows.hpp: the CPU backend's row functions, one estimator evaluated per row of
// student (and teacher) logits, with its exact gradient with respect to the student logits.
//
//   divergence_rows       full-vocabulary reverse_kl / forward_kl / jsd / total_variation
//   sampled_rows          sampled<k1|k2|k3, as_pg_reward|as_loss> at the given token ids
//   topk_forward_kl_rows  teacher top-k forward KL, the top-k selected from teacher logits
//                         or given as lists (ids + log-probs)
//
// Shapes: student, teacher [rows x V] (fp32, fp64, bf16 or fp16, any row stride); loss
// [rows] (double); grad [rows x V] (fp32 or fp64) or empty (value only); grad_scale [rows]
// or empty (1): grad[r] = grad_scale[r] * dL_r/dz_r. Work type: fp64 if either logits type
// is fp64, else fp32 (16-bit inputs are widened in registers); sums are merged in double.
//
// Errors (tropd::status, first failing row and column): empty_batch, shape_mismatch,
// invalid_parameter, non_finite_input (NaN / +inf logits), unsupported (a finite logit that
// leaves the work type's range once divided by the temperature), no_finite_entry,
// infinite_divergence, id_out_of_range, duplicate_topk_id, invalid_topk_list. Nothing is
// written on failure, except in row_order::single_read and when a gradient value does not fit
// the output type (found while it is written; gradient rows may then be partly written, the
// losses never). An ok status means every output is finite.
//
// How the passes work and what they cost: host/row_passes.hpp, docs/performance.md. The
// objective at row level (trust region, outliers, aggregation): host/objective.hpp.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <vector>

#include <tropd/config.hpp>
#include <tropd/core/sparse_terms.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token_rules.hpp>
#include <tropd/core/types.hpp>
#include <tropd/core/values.hpp>
#include <tropd/core/views.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/sampled.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/host/options.hpp>
#include <tropd/host/row_passes.hpp>
#include <tropd/host/row_schedule.hpp>
#include <tropd/host/topk_select.hpp>

namespace tropd::host {

/// Full-vocabulary divergence per row: loss[r] = D(p_r, q_r), grad[r] = grad_scale[r] * dD/dz_r.
/// summaries [rows] or empty: every row's statistics (estimators/row_moments.hpp).
template <estimators::full_vocab_divergence Est, logit_element TS, logit_element TT, grad_element G = float>
status divergence_rows(const Est& est, matrix_view<const TS> student, matrix_view<const TT> teacher,
                       vector_view<double> loss, matrix_view<G> grad = {}, const row_options& opt = {},
                       vector_view<const double> grad_scale = {},
                       vector_view<estimators::row_summary> summaries = {}) {
  using W = work_type_t<TS, TT>;
  TROPD_TRY(est.check());
  TROPD_TRY(detail::check_temperatures(opt));
  TROPD_TRY(detail::check_student_and_outputs(student, loss, grad, grad_scale));
  TROPD_TRY(detail::check_teacher_rows(teacher, student.rows, student.cols));
  if (summaries.size != 0 && summaries.size != student.rows)
    return make_error(errc::shape_mismatch, "summaries must be empty or have one entry per row");
  const index_t V = student.cols;
  const W its = W(1.0 / opt.student_temperature), itt = W(1.0 / opt.teacher_temperature);
  const bool stream = detail::stream_gradient(grad);
  std::vector<estimators::row_summary> sums;
  // Pass 1 computes only the moments the estimator reads, unless the caller asked for the
  // summaries (then every field).
  constexpr estimators::moments_needed need = estimators::summary_reads_of<Est>();
  auto stats = [&](index_t r, detail::row_scratch<W>& buf, estimators::row_summary& s) -> status {
    if (summaries.size)
      TROPD_TRY(detail::row_pass1<estimators::all_moments>(student.row(r), teacher.row(r), V, its, itt, buf, r, s));
    else
      TROPD_TRY(detail::row_pass1<need>(student.row(r), teacher.row(r), V, its, itt, buf, r, s));
    if (!est.finite(s))
      return make_error(errc::infinite_divergence,
                        "the divergence is infinite: one distribution gives zero mass where the other has mass", r);
    if constexpr (Est::second_pass) detail::row_pass1b(est, student.row(r), teacher.row(r), V, its, itt, buf, s);
    return {};
  };
  auto gradf = [&](index_t r, detail::row_scratch<W>& buf, const estimators::row_summary& s) -> status {
    if (grad.rows == 0) return {};
    const double scale = (grad_scale.size ? grad_scale[r] : 1.0) / opt.student_temperature;
    return detail::gradient_status(
        r, detail::row_pass2(est, student.row(r), teacher.row(r), V, its, itt, buf, s, 1.0, sparse_terms{}, scale, grad.row(r), stream));
  };
  const detail::keep_plan keep{grad.rows != 0, detail::reads_q<Est>, Est::second_pass, detail::mixture_divergence<Est>};
  TROPD_TRY(detail::run_rows<W>(student.rows, V, opt.order, opt.threads, sums, keep, [](detail::row_scratch<W>&) {}, stats, gradf));
  std::vector<double> val(static_cast<size_t>(student.rows));
  for (index_t r = 0; r < student.rows; ++r) val[static_cast<size_t>(r)] = est.value(sums[static_cast<size_t>(r)]);
  TROPD_TRY(detail::write_losses(loss, val));
  for (index_t r = 0; r < summaries.size; ++r) summaries[r] = sums[static_cast<size_t>(r)];
  return {};
}

/// Sampled-token estimator per row with full teacher logits:
/// s = log p_S(y_r), t = log p_T(y_r) from the rows, s_old[r] (empty: s_old = s, so rho = 1).
/// loss[r] = the estimator's loss; grad[r] = grad_scale[r] * dL/ds * (e_y - p) / T_S.
template <class E, class U, logit_element TS, logit_element TT, grad_element G = float>
status sampled_rows(const estimators::sampled<E, U>& est, matrix_view<const TS> student, matrix_view<const TT> teacher,
                    vector_view<const int32_t> ids, vector_view<const double> s_old, vector_view<double> loss,
                    matrix_view<G> grad = {}, const row_options& opt = {}, vector_view<const double> grad_scale = {}) {
  using W = work_type_t<TS, TT>;
  TROPD_TRY(detail::check_temperatures(opt));
  TROPD_TRY(detail::check_student_and_outputs(student, loss, grad, grad_scale));
  TROPD_TRY(detail::check_teacher_rows(teacher, student.rows, student.cols));
  TROPD_TRY(checks::token_ids(ids, student.rows, student.cols));
  if (s_old.size != 0 && s_old.size != student.rows) return make_error(errc::shape_mismatch, "s_old must be empty or one per row");
  for (index_t r = 0; r < s_old.size; ++r)
    if (!is_finite(s_old[r])) return make_error(errc::non_finite_input, "s_old is not finite", r);
  const index_t V = student.cols;
  const W its = W(1.0 / opt.student_temperature), itt = W(1.0 / opt.teacher_temperature);
  const bool stream = detail::stream_gradient(grad);
  std::vector<estimators::sampled_result> res(static_cast<size_t>(student.rows));
  std::vector<estimators::row_summary> sums;
  auto stats = [&](index_t r, detail::row_scratch<W>& buf, estimators::row_summary& s) -> status {
    // Reads lse_s and lse_t only (here and in the gradient pass).
    TROPD_TRY(detail::row_pass1<estimators::lse_only>(student.row(r), teacher.row(r), V, its, itt, buf, r, s));
    const int32_t y = ids[r];
    const double sy = rules::log_prob_at(student.row(r), y, its, s.lse_s);
    const double ty = rules::log_prob_at(teacher.row(r), y, itt, s.lse_t);
    if (sy == -inf<double>()) return make_error(errc::infinite_divergence, "the student gives zero mass to the sampled token", r, y);
    if (ty == -inf<double>())
      return make_error(errc::infinite_divergence,
                        "the teacher gives zero mass to the sampled token (infinite log-ratio); use a trust region or a reward clip", r, y);
    const auto v = est(sy, s_old.size ? s_old[r] : sy, ty);
    if (!is_finite(v.loss) || !is_finite(v.dloss_ds))
      return make_error(errc::infinite_divergence, "the estimator overflows for this token", r, y);
    res[static_cast<size_t>(r)] = v;
    return {};
  };
  auto gradf = [&](index_t r, detail::row_scratch<W>& buf, const estimators::row_summary& s) -> status {
    if (grad.rows == 0) return {};
    const double scale = (grad_scale.size ? grad_scale[r] : 1.0) / opt.student_temperature;
    const double c = res[static_cast<size_t>(r)].dloss_ds;
    const int32_t y = ids[r];
    const sparse_terms sp{&y, &c, 1, 0};
    return detail::gradient_status(r, detail::row_pass2(detail::no_dense{}, student.row(r), static_cast<const TT*>(nullptr), V, its,
                                                        itt, buf, s, 0.0, sp, scale, grad.row(r), stream));
  };
  TROPD_TRY(detail::run_rows<W>(student.rows, V, opt.order, opt.threads, sums, detail::keep_plan{grad.rows != 0},
                                [](detail::row_scratch<W>&) {}, stats, gradf));
  std::vector<double> val(static_cast<size_t>(student.rows));
  for (index_t r = 0; r < student.rows; ++r) val[static_cast<size_t>(r)] = res[static_cast<size_t>(r)].loss;
  return detail::write_losses(loss, val);
}

namespace detail {

/// topk_forward_kl_rows for either teacher form (Teacher: matrix_view<const TT> logits, or
/// topk_lists): pass 1 (with the teacher's top-k selected in the same read, or the student
/// row only), eval at the list, the sparse terms, pass 2.
template <class W, class TS, class Teacher, class G>
status topk_rows(const estimators::topk_forward_kl& est, matrix_view<const TS> student, const Teacher& teacher, int K,
                 vector_view<double> loss, matrix_view<G> grad, const row_options& opt, vector_view<const double> grad_scale) {
  constexpr bool logits = !std::is_same_v<Teacher, topk_lists>;
  const index_t V = student.cols, N = student.rows;
  const W its = W(1.0 / opt.student_temperature), itt = W(1.0 / opt.teacher_temperature);
  const bool stream = stream_gradient(grad);
  // Per row: the list's ids and teacher log-probs (selected rows: in descending order, -1 /
  // -inf padding where V < k), the raw coefficients, the tail terms.
  std::vector<int32_t> kid(static_cast<size_t>(N * K));
  std::vector<double> klq(static_cast<size_t>(N * K)), kg(static_cast<size_t>(N * K));
  std::vector<double> val(static_cast<size_t>(N)), ktc(static_cast<size_t>(N), 0.0), ktt(static_cast<size_t>(N), 0.0);
  std::vector<estimators::row_summary> sums;
  auto setup = [&](row_scratch<W>& buf) {
    buf.prepare_topk(K);
    buf.row_ids.resize(static_cast<size_t>(K));
    buf.row_coef.resize(static_cast<size_t>(K));
  };
  auto stats = [&](index_t r, row_scratch<W>& buf, estimators::row_summary& s) -> status {
    int32_t* ids = kid.data() + r * K;
    double* lq = klq.data() + r * K;
    if constexpr (logits) {
      // Reads lse_s and lse_t only (here and in the gradient pass).
      TROPD_TRY(row_pass1<estimators::lse_only>(student.row(r), teacher.row(r), V, its, itt, buf, r, s, K));
      for (int i = 0; i < K; ++i) {
        ids[i] = buf.topk_ids[static_cast<size_t>(i)];
        lq[i] = ids[i] < 0 ? -inf<double>() : double(buf.topk_vals[static_cast<size_t>(i)]) - s.lse_t;
      }
    } else {
      TROPD_TRY(row_pass1<estimators::lse_only>(student.row(r), static_cast<const float*>(nullptr), V, its, W(1), buf, r, s));
      const values_row tlp = teacher.logprobs.row(r);
      for (int i = 0; i < K; ++i) {
        ids[i] = teacher.ids(r, i);
        lq[i] = tlp[i];
      }
    }
    for (int i = 0; i < K; ++i)
      buf.ls[static_cast<size_t>(i)] = lq[i] == -inf<double>() ? 0.0 : rules::log_prob_at(student.row(r), ids[i], its, s.lse_s);
    double tail = quiet_nan<double>();
    if (est.tail == estimators::topk_tail::tail_bucket) tail = student_tail_log(student.row(r), V, its, s.lse_s, ids, lq, K, buf);
    const auto res = est.eval(lq, buf.ls.data(), K, kg.data() + r * K, tail);
    if (!res.st.ok()) return make_error(res.st.code, res.st.detail, r, res.st.col);
    val[static_cast<size_t>(r)] = res.value;
    ktc[static_cast<size_t>(r)] = res.tail_coef;
    ktt[static_cast<size_t>(r)] = res.tail_teacher;
    return {};
  };
  auto gradf = [&](index_t r, row_scratch<W>& buf, const estimators::row_summary& s) -> status {
    if (grad.rows == 0) return {};
    const double scale = (grad_scale.size ? grad_scale[r] : 1.0) / opt.student_temperature;
    const size_t rr = static_cast<size_t>(r);
    const sparse_terms sp = build_sparse_terms(kid.data() + r * K, values_row{klq.data() + r * K, scalar_type::f64}, kg.data() + r * K,
                                               K, ktc[rr], ktt[rr], -1, 0.0, buf.row_ids.data(), buf.row_coef.data());
    return gradient_status(r, row_pass2(no_dense{}, student.row(r), static_cast<const float*>(nullptr), V, its, W(1), buf, s, 0.0, sp,
                                        scale, grad.row(r), stream));
  };
  TROPD_TRY(run_rows<W>(N, V, opt.order, opt.threads, sums, keep_plan{grad.rows != 0}, setup, stats, gradf));
  return write_losses(loss, val);
}

}  // namespace detail

/// Teacher top-k forward KL per row with full teacher logits: the top min(est.k, V) ids are
/// selected per row (ties: the lower id) in the same read as the row statistics.
/// loss[r] = FKL_k; grad[r] = grad_scale[r] * dFKL_k/dz / T_S. The student's log-sum-exp runs
/// over the whole row; the tail bucket's student tail is exact (summed from the row).
template <logit_element TS, logit_element TT, grad_element G = float>
status topk_forward_kl_rows(const estimators::topk_forward_kl& est, matrix_view<const TS> student,
                            matrix_view<const TT> teacher, vector_view<double> loss, matrix_view<G> grad = {},
                            const row_options& opt = {}, vector_view<const double> grad_scale = {}) {
  TROPD_TRY(est.check());
  TROPD_TRY(detail::check_temperatures(opt));
  TROPD_TRY(detail::check_student_and_outputs(student, loss, grad, grad_scale));
  TROPD_TRY(detail::check_teacher_rows(teacher, student.rows, student.cols));
  const int K = static_cast<int>(std::min<index_t>(est.k, student.cols));  // k > V selects the whole row
  return detail::topk_rows<work_type_t<TS, TT>>(est, student, teacher, K, loss, grad, opt, grad_scale);
}

/// The same with given teacher top-k lists (ids + log-probs [rows x K], K = est.k, -inf
/// padding allowed, entries in any order, any normalisation for the renormalised tail). The
/// teacher temperature does not apply to given lists (they were scored by their server).
template <logit_element TS, grad_element G = float>
status topk_forward_kl_rows(const estimators::topk_forward_kl& est, matrix_view<const TS> student,
                            const topk_lists& teacher, vector_view<double> loss, matrix_view<G> grad = {},
                            const row_options& opt = {}, vector_view<const double> grad_scale = {}) {
  TROPD_TRY(est.check());
  TROPD_TRY(detail::check_temperatures(opt));
  TROPD_TRY(detail::check_student_and_outputs(student, loss, grad, grad_scale));
  TROPD_TRY(checks::topk_lists_shape(teacher.ids, teacher.logprobs, student.rows));
  if (teacher.ids.cols != est.k)
    return make_error(errc::invalid_parameter, "the teacher lists' width K differs from the estimator's k (set k to the lists' width)");
  const int K = static_cast<int>(teacher.ids.cols);
  for (index_t r = 0; r < student.rows; ++r)
    TROPD_TRY(rules::check_topk_list(teacher.ids.row(r), teacher.logprobs.row(r), K, student.cols, r));
  return detail::topk_rows<work_type_t<TS, float>>(est, student, teacher, K, loss, grad, opt, grad_scale);
}

}  // namespace tropd::host
