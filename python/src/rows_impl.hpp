// python/src/rows_impl.hpp: the body of rows_<dtype>.cpp: host::evaluate_rows for every
// preset's objective, student (and teacher) logits of one element type. Each rows_<dtype>.cpp
// defines TROPD_PY_LOGIT (the element type) and TROPD_PY_ROWS (the function's name) and
// includes this file, so the four element types compile in parallel, and the row passes
// (which depend on the element type, not the objective) are instantiated once per unit.
#pragma once

#include "calls.hpp"

namespace tropd_py {

tropd::status TROPD_PY_ROWS(const objective_spec& spec, const rows_call& c, std::string* error) {
  using T = TROPD_PY_LOGIT;
  using G = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const tropd::matrix_view<const T> student{static_cast<const T*>(c.student.data), c.student.rows, c.student.cols, c.student.stride};
  tropd::host::row_outputs<G> out{};
  if (c.grad) out.grad = tropd::matrix_view<G>{static_cast<G*>(c.grad), c.student.rows, c.student.cols, c.grad_stride};
  out.loss = c.loss;
  out.diag = c.diag;
  out.dloss_ds = c.dloss_ds;
  out.advantage = c.advantage;
  out.flags = c.flags;
  return visit_objective(spec, c.normaliser, error, [&](const auto& obj) -> tropd::status {
    using Obj = std::decay_t<decltype(obj)>;
    if (c.teacher.data) {
      const tropd::matrix_view<const T> teacher{static_cast<const T*>(c.teacher.data), c.teacher.rows, c.teacher.cols, c.teacher.stride};
      return tropd::host::evaluate_rows(obj, student, teacher, c.in, out, c.opt);
    }
    if constexpr (takes_served_teacher<Obj>) {
      return tropd::host::evaluate_rows(obj, student, tropd::host::teacher_logprobs{c.teacher_t}, c.in, out, c.opt);
    } else {
      return tropd::make_error(tropd::errc::unsupported, needs_teacher_logits);
    }
  });
}

}  // namespace tropd_py
