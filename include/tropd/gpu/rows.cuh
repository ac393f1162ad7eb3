// tropd/gpu/rows.cuh: the CUDA backend's row functions, one estimator evaluated per row of
// student (and teacher) logits in device memory, with its exact gradient with respect to the
// student logits: the device twins of host/rows.hpp, same arguments, same rules.
//
//   divergence_rows       full-vocabulary reverse_kl / forward_kl / jsd / total_variation
//   sampled_rows          sampled<k1|k2|k3, as_pg_reward|as_loss> at the given token ids
//   topk_forward_kl_rows  teacher top-k forward KL, the top-k selected from teacher logits
//                         or given as lists (ids + log-probs)
//
// Shapes: student, teacher [rows x V] (fp32, fp64, bf16 or fp16, any row stride); loss [rows]
// (double); grad [rows x V] (fp32 or fp64) or empty (value only); grad_scale [rows] or empty
// (1): grad[r] = grad_scale[r] * dL_r/dz_r. Every pointer is a device pointer. Work type: fp64
// if either logits type is fp64, else fp32 (16-bit inputs widened in registers); row sums are
// merged in double. Each call takes a device_context (scratch sized by the matching
// *_scratch_bytes function with the same arguments, and a stream); none allocates or
// synchronises unless row_options::synchronize asks for it.
//
// Errors. Returned before anything is launched: invalid_parameter, empty_batch,
// shape_mismatch, unsupported (extents beyond the device limits), insufficient_scratch,
// backend_error. Found on the device and recorded in the status word (gpu/status_word.cuh) in
// the host's order: non_finite_input (NaN / +inf logits, s_old, grad_scale, list entries),
// unsupported (a finite logit that leaves the work type once divided by the temperature),
// no_finite_entry, infinite_divergence, id_out_of_range, duplicate_topk_id, invalid_topk_list.
// A failing row gets a NaN loss and a NaN gradient row; the other rows are computed.
//
// How the rows are read and what it costs: docs/gpu.md. The objective at row level:
// gpu/objective.cuh.
#pragma once

#if !defined(__CUDACC__)
#error "tropd/gpu is CUDA code: compile this translation unit with nvcc (host-only code includes <tropd/tropd.hpp>)"
#endif

#include <stddef.h>
#include <stdint.h>

#include <tropd/core/checks.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/types.hpp>
#include <tropd/core/values.hpp>
#include <tropd/core/views.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/sampled.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/gpu/config.cuh>
#include <tropd/gpu/detail/dispatch_rows.cuh>
#include <tropd/gpu/status_word.cuh>

namespace tropd::gpu {

namespace detail {

template <estimators::full_vocab_divergence Est, class TS, class TT, class G, class F>
inline auto with_divergence_task(const Est& est, bool all, F&& f) {
  if (all) return f(dense_task<Est, estimators::all_moments>{est});
  return f(dense_task<Est, estimators::summary_reads_of<Est>()>{est});
}

template <class TS, class TT, class G>
inline status divergence_checks(matrix_view<const TS> student, matrix_view<const TT> teacher, vector_view<double> loss, matrix_view<G> grad,
                                const row_options& opt, vector_view<const double> grad_scale,
                                vector_view<estimators::row_summary> summaries) {
  TROPD_TRY(check_row_shapes(opt, student, loss, grad, grad_scale));
  TROPD_TRY(checks::teacher_rows(teacher, student.rows, student.cols));
  if (summaries.size != 0 && summaries.size != student.rows)
    return make_error(errc::shape_mismatch, "summaries must be empty or have one entry per row");
  return {};
}

}  // namespace detail

/// Scratch bytes of divergence_rows (the same arguments as the call).
template <estimators::full_vocab_divergence Est, logit_element TS, logit_element TT, grad_element G = float>
size_t divergence_rows_scratch_bytes(const Est& est, matrix_view<const TS> student, matrix_view<const TT> teacher, vector_view<double> = {},
                                     matrix_view<G> = {}, const row_options& opt = {}, vector_view<const double> = {},
                                     vector_view<estimators::row_summary> summaries = {}) {
  (void)teacher;
  return detail::with_divergence_task<Est, TS, TT, G>(est, summaries.size != 0, [&](const auto& t) {
    return detail::plan_rows<std::decay_t<decltype(t)>, TS, TT, G>(t, student.rows, student.cols, opt.launch).bytes;
  });
}

/// Full-vocabulary divergence per row on the device: loss[r] = D(p_r, q_r),
/// grad[r] = grad_scale[r] * dD/dz_r (host::divergence_rows). summaries [rows] or empty: every
/// row's statistics (estimators/row_moments.hpp; pass 1 then computes every moment).
template <estimators::full_vocab_divergence Est, logit_element TS, logit_element TT, grad_element G = float>
status divergence_rows(const device_context& ctx, const Est& est, matrix_view<const TS> student, matrix_view<const TT> teacher,
                       vector_view<double> loss, matrix_view<G> grad = {}, const row_options& opt = {},
                       vector_view<const double> grad_scale = {}, vector_view<estimators::row_summary> summaries = {}) {
  TROPD_TRY(est.check());
  TROPD_TRY(detail::divergence_checks(student, teacher, loss, grad, opt, grad_scale, summaries));
  const auto a = detail::make_row_args(student, teacher.data, teacher.stride, loss, grad, opt, grad_scale,
                                       summaries.size ? summaries.data : nullptr);
  return detail::with_divergence_task<Est, TS, TT, G>(est, summaries.size != 0, [&](const auto& t) {
    return detail::launch_rows(ctx, t, a, opt.launch, opt.synchronize);
  });
}

/// Scratch bytes of sampled_rows.
template <class E, class U, logit_element TS, logit_element TT, grad_element G = float>
size_t sampled_rows_scratch_bytes(const estimators::sampled<E, U>& est, matrix_view<const TS> student, matrix_view<const TT>,
                                  vector_view<const int32_t> = {}, vector_view<const double> = {}, vector_view<double> = {},
                                  matrix_view<G> = {}, const row_options& opt = {}, vector_view<const double> = {}) {
  const detail::sampled_task<E, U> t{est};
  return detail::plan_rows<detail::sampled_task<E, U>, TS, TT, G>(t, student.rows, student.cols, opt.launch).bytes;
}

/// Sampled-token estimator per row with full teacher logits (host::sampled_rows):
/// s = log p_S(y_r), t = log p_T(y_r) from the rows; s_old [rows] or empty (s_old = s, rho = 1);
/// loss[r] = the estimator's loss; grad[r] = grad_scale[r] * dL/ds * (e_y - p) / T_S. Ids are
/// checked on the device (id_out_of_range, column: the id, or -1 for a negative id).
template <class E, class U, logit_element TS, logit_element TT, grad_element G = float>
status sampled_rows(const device_context& ctx, const estimators::sampled<E, U>& est, matrix_view<const TS> student,
                    matrix_view<const TT> teacher, vector_view<const int32_t> ids, vector_view<const double> s_old,
                    vector_view<double> loss, matrix_view<G> grad = {}, const row_options& opt = {},
                    vector_view<const double> grad_scale = {}) {
  TROPD_TRY(detail::check_row_shapes(opt, student, loss, grad, grad_scale));
  TROPD_TRY(checks::teacher_rows(teacher, student.rows, student.cols));
  if (ids.size != student.rows || ids.data == nullptr) return make_error(errc::shape_mismatch, "ids must have one entry per row");
  if (s_old.size != 0 && s_old.size != student.rows) return make_error(errc::shape_mismatch, "s_old must be empty or one per row");
  detail::sampled_task<E, U> t{est};
  t.ids = ids.data;
  t.s_old = s_old.size ? s_old.data : nullptr;
  const auto a = detail::make_row_args(student, teacher.data, teacher.stride, loss, grad, opt, grad_scale, nullptr);
  return detail::launch_rows(ctx, t, a, opt.launch, opt.synchronize);
}

namespace detail {
template <class TS, class TT>
inline auto selected_topk_task(const estimators::topk_forward_kl& est, index_t V) {
  topk_task<true, work_type_t<TS, TT>> t;
  t.est = est;
  t.K = static_cast<int>(est.k < V ? est.k : V);  // k > V selects the whole row
  return t;
}
template <class TS>
inline auto given_topk_task(const estimators::topk_forward_kl& est, const topk_lists& lists) {
  topk_task<false, work_type_t<TS, float>> t;
  t.est = est;
  t.K = static_cast<int>(lists.ids.cols);
  t.ids = lists.ids;
  t.logprobs = lists.logprobs;
  return t;
}
}  // namespace detail

/// Scratch bytes of topk_forward_kl_rows with teacher logits.
template <logit_element TS, logit_element TT, grad_element G = float>
size_t topk_forward_kl_rows_scratch_bytes(const estimators::topk_forward_kl& est, matrix_view<const TS> student, matrix_view<const TT>,
                                          vector_view<double> = {}, matrix_view<G> = {}, const row_options& opt = {},
                                          vector_view<const double> = {}) {
  const auto t = detail::selected_topk_task<TS, TT>(est, student.cols);
  return detail::plan_rows<std::decay_t<decltype(t)>, TS, TT, G>(t, student.rows, student.cols, opt.launch).bytes;
}

/// Teacher top-k forward KL per row with full teacher logits: the top min(est.k, V) ids are
/// selected per row (ties: the lower id; one read of the teacher row besides pass 1's),
/// loss[r] = FKL_k, grad[r] = grad_scale[r] * dFKL_k/dz / T_S; the tail bucket's student tail
/// is exact (summed from the row where the listed log-probs cannot resolve it). K <= 1024.
template <logit_element TS, logit_element TT, grad_element G = float>
status topk_forward_kl_rows(const device_context& ctx, const estimators::topk_forward_kl& est, matrix_view<const TS> student,
                            matrix_view<const TT> teacher, vector_view<double> loss, matrix_view<G> grad = {},
                            const row_options& opt = {}, vector_view<const double> grad_scale = {}) {
  TROPD_TRY(est.check());
  TROPD_TRY(detail::check_row_shapes(opt, student, loss, grad, grad_scale));
  TROPD_TRY(checks::teacher_rows(teacher, student.rows, student.cols));
  if (est.k > max_topk && student.cols > max_topk)
    return make_error(errc::unsupported, "tropd::gpu: top-k lists longer than max_topk (1024)");
  const auto t = detail::selected_topk_task<TS, TT>(est, student.cols);
  const auto a = detail::make_row_args(student, teacher.data, teacher.stride, loss, grad, opt, grad_scale, nullptr);
  return detail::launch_rows(ctx, t, a, opt.launch, opt.synchronize);
}

/// Scratch bytes of topk_forward_kl_rows with given lists.
template <logit_element TS, grad_element G = float>
size_t topk_forward_kl_rows_scratch_bytes(const estimators::topk_forward_kl& est, matrix_view<const TS> student, const topk_lists& lists,
                                          vector_view<double> = {}, matrix_view<G> = {}, const row_options& opt = {},
                                          vector_view<const double> = {}) {
  const auto t = detail::given_topk_task<TS>(est, lists);
  return detail::plan_rows<std::decay_t<decltype(t)>, TS, TS, G>(t, student.rows, student.cols, opt.launch).bytes;
}

/// The same with given teacher top-k lists (ids + log-probs [rows x K] in device memory,
/// K = est.k <= 1024, fp32 or fp64 log-probs, -inf padding allowed, entries in any order, any
/// normalisation for the renormalised tail). The teacher temperature does not apply to given
/// lists. Every list rule is checked on the device (rules::check_topk_list's order).
template <logit_element TS, grad_element G = float>
status topk_forward_kl_rows(const device_context& ctx, const estimators::topk_forward_kl& est, matrix_view<const TS> student,
                            const topk_lists& teacher, vector_view<double> loss, matrix_view<G> grad = {}, const row_options& opt = {},
                            vector_view<const double> grad_scale = {}) {
  TROPD_TRY(est.check());
  TROPD_TRY(detail::check_row_shapes(opt, student, loss, grad, grad_scale));
  TROPD_TRY(checks::topk_lists_shape(teacher.ids, teacher.logprobs, student.rows));
  if (teacher.ids.cols != est.k)
    return make_error(errc::invalid_parameter, "the teacher lists' width K differs from the estimator's k (set k to the lists' width)");
  if (teacher.ids.cols > max_topk) return make_error(errc::unsupported, "tropd::gpu: top-k lists longer than max_topk (1024)");
  const auto t = detail::given_topk_task<TS>(est, teacher);
  const auto a = detail::make_row_args(student, static_cast<const TS*>(nullptr), 0, loss, grad, opt, grad_scale, nullptr);
  return detail::launch_rows(ctx, t, a, opt.launch, opt.synchronize);
}

}  // namespace tropd::gpu
