// tropd/core/checks.hpp: argument checks shared by the CPU (host/) and CUDA (gpu/) row
// entry points, so both backends reject the same shapes and parameters with the same codes
// and sentences. Host code only (views are inspected, never dereferenced).
#pragma once

#include <stdint.h>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token_batch.hpp>
#include <tropd/core/values.hpp>
#include <tropd/core/views.hpp>

namespace tropd::checks {

/// Temperatures: finite and > 0 (invalid_parameter).
inline status temperatures(double student_temperature, double teacher_temperature) noexcept {
  if (!(student_temperature > 0) || !is_finite(student_temperature))
    return make_error(errc::invalid_parameter, "student temperature must be finite and > 0");
  if (!(teacher_temperature > 0) || !is_finite(teacher_temperature))
    return make_error(errc::invalid_parameter, "teacher temperature must be finite and > 0");
  return {};
}

/// Student logits [rows x V] and the per-row outputs: loss [rows], grad [rows x V] or empty,
/// grad_scale [rows] or empty (shape_mismatch / empty_batch). Values are not read here.
template <class TS, class G>
inline status student_rows(matrix_view<const TS> student, vector_view<double> loss, matrix_view<G> grad,
                           vector_view<const double> grad_scale) noexcept {
  if (!student.valid()) return make_error(errc::shape_mismatch, "student view is malformed (stride < cols or null data)");
  if (student.rows == 0) return make_error(errc::empty_batch, "no rows");
  if (student.cols < 1) return make_error(errc::shape_mismatch, "vocabulary size must be >= 1");
  if (loss.size != student.rows || loss.data == nullptr) return make_error(errc::shape_mismatch, "loss must have one entry per row");
  if (!grad.valid()) return make_error(errc::shape_mismatch, "gradient view is malformed");
  if (grad.rows != 0 && (grad.rows != student.rows || grad.cols != student.cols))
    return make_error(errc::shape_mismatch, "gradient must be [rows x vocab] like the student logits, or empty");
  if (grad_scale.size != 0 && (grad_scale.size != student.rows || grad_scale.data == nullptr))
    return make_error(errc::shape_mismatch, "grad_scale must be empty or have one entry per row");
  return {};
}

/// Teacher logits: [rows x cols] like the student's (shape_mismatch).
template <class TT>
inline status teacher_rows(matrix_view<const TT> teacher, index_t rows, index_t cols) noexcept {
  if (!teacher.valid()) return make_error(errc::shape_mismatch, "teacher view is malformed (stride < cols or null data)");
  if (teacher.rows != rows) return make_error(errc::shape_mismatch, "teacher and student have different numbers of rows");
  if (teacher.cols != cols)
    return make_error(errc::shape_mismatch, "teacher and student vocabulary sizes differ (pad or truncate the teacher vocabulary first)");
  return {};
}

/// A row-level objective call's student logits [n x V] and gradient ([n x V] or empty), after
/// the temperatures (empty_batch / shape_mismatch / invalid_parameter).
template <class TS, class G>
inline status objective_rows(matrix_view<const TS> student, matrix_view<G> grad, double student_temperature,
                             double teacher_temperature) noexcept {
  TROPD_TRY(temperatures(student_temperature, teacher_temperature));
  if (!student.valid()) return make_error(errc::shape_mismatch, "student view is malformed (stride < cols or null data)");
  if (student.rows == 0) return make_error(errc::empty_batch, "no rows");
  if (student.cols < 1) return make_error(errc::shape_mismatch, "vocabulary size must be >= 1");
  if (!grad.valid() || (grad.rows != 0 && (grad.rows != student.rows || grad.cols != student.cols)))
    return make_error(errc::shape_mismatch, "gradient must be [rows x vocab] like the student logits, or empty");
  return {};
}

/// Token ids [rows], each in [0, V) (host memory: the values are read). shape_mismatch /
/// id_out_of_range (row, column = the id).
inline status token_ids(vector_view<const int32_t> ids, index_t rows, index_t V) noexcept {
  if (ids.size != rows || (rows > 0 && ids.data == nullptr)) return make_error(errc::shape_mismatch, "ids must have one entry per row");
  for (index_t r = 0; r < rows; ++r)
    if (ids[r] < 0 || ids[r] >= V) return make_error(errc::id_out_of_range, "sampled token id outside [0, V)", r, ids[r]);
  return {};
}

/// Given teacher top-k lists: ids and log-probs both [rows x K], K >= 1 (shape_mismatch).
inline status topk_lists_shape(matrix_view<const int32_t> ids, const values_matrix& logprobs, index_t rows) noexcept {
  if (!ids.valid() || !logprobs.valid()) return make_error(errc::shape_mismatch, "teacher top-k views are malformed");
  if (ids.rows != rows || logprobs.rows != rows) return make_error(errc::shape_mismatch, "teacher top-k lists need one row per student row");
  if (ids.cols != logprobs.cols || ids.cols < 1)
    return make_error(errc::shape_mismatch, "teacher top-k ids and log-probs must both be [rows x K] with K >= 1");
  return {};
}

/// What token_batch_shapes reads nothing of: the offsets' values and the origin tags. The host
/// passes readers of both (host/token_stages.hpp), so its errors keep one order; the device
/// checks them in its validate kernels.
struct no_batch_reads {
  status offsets(const token_batch&) const noexcept { return {}; }
  status origins(const token_batch&) const noexcept { return {}; }
};

/// A token batch's shapes for an objective: sizes, offsets' count, the optional arrays the
/// objective's policies need, the top-k views (shape_mismatch / empty_batch / unsupported;
/// obj.check() first), in this order, with `reads.offsets(b)` after the offsets' count and
/// `reads.origins(b)` after seq_ids (the host's precedence of errors, which the fuzz oracle
/// states). Top-k ids are the caller's to check.
template <class Obj, class Reads = no_batch_reads>
status token_batch_shapes(const Obj& obj, const token_batch& b, const Reads& reads = {}) {
  TROPD_TRY(obj.check());
  const index_t n = b.s.size;
  if (n == 0) return make_error(errc::empty_batch, "no tokens");
  if (b.t.size != n || b.from.size != n) return make_error(errc::shape_mismatch, "s, t and origin must all have n entries");
  if (b.seq_offsets.size < 2 || b.seq_offsets.data == nullptr) return make_error(errc::shape_mismatch, "seq_offsets needs n_seq + 1 >= 2 entries");
  TROPD_TRY(reads.offsets(b));
  const index_t n_seq = b.seq_offsets.size - 1;
  if (b.seq_ids.size != 0 && b.seq_ids.size != n_seq) return make_error(errc::shape_mismatch, "seq_ids must have n_seq entries");
  TROPD_TRY(reads.origins(b));
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
    if (ids.rows != n || b.topk_teacher.rows != n || b.topk_student.rows != n || ids.cols < 1 || b.topk_teacher.cols != ids.cols ||
        b.topk_student.cols != ids.cols)
      return make_error(errc::shape_mismatch, "this outlier handler needs [n x K] topk_ids, topk_teacher and topk_student (K >= 1)");
    if (b.topk_student_old.rows != 0 && (b.topk_student_old.rows != n || b.topk_student_old.cols != ids.cols))
      return make_error(errc::shape_mismatch, "topk_student_old must be empty or [n x K]");
    if (b.topk_student_tail_log.size != 0 && b.topk_student_tail_log.size != n)
      return make_error(errc::shape_mismatch, "topk_student_tail_log must be empty or have n entries");
    if (!ids.valid() || !b.topk_teacher.valid() || !b.topk_student.valid() || !b.topk_student_old.valid())
      return make_error(errc::shape_mismatch, "top-k views are malformed");
  }
  return {};
}

}  // namespace tropd::checks
