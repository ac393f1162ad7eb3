// tropd/core/checks.hpp: argument checks shared by the CPU (host/) and CUDA (gpu/) row
// entry points, so both backends reject the same shapes and parameters with the same codes
// and sentences. Host code only (views are inspected, never dereferenced).
#pragma once

#include <stdint.h>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>
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

}  // namespace tropd::checks
