// tropd/core/checks.hpp: argument checks shared by the CPU (host/) and CUDA (gpu/) row
// entry points, so both backends reject the same shapes and parameters with the same codes
// and sentences. Host code only (views are inspected, never dereferenced).
#pragma once

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>
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

}  // namespace tropd::checks
