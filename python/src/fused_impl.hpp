// python/src/fused_impl.hpp: the body of fused_<dtype>.cpp: host::fused_lm_head for every
// preset's objective and every teacher form (a head, full logits, served log-probs), student
// head (and teacher) of one element type. Each fused_<dtype>.cpp defines TROPD_PY_HEAD (float or
// double: the host fused call's element types) and TROPD_PY_FUSED (the function's name) and
// includes this file, so the two element types compile in parallel. It only builds views from
// the call and forwards them; every shape rule is the library's (host/fused_lm_head.hpp).
#pragma once

#include <tropd/host/fused_lm_head.hpp>

#include "calls.hpp"

namespace tropd_py {

tropd::status TROPD_PY_FUSED(const objective_spec& spec, fused_call& c, std::string* error) {
  using T = TROPD_PY_HEAD;
  auto matrix = [](const logits_arg& a) { return tropd::matrix_view<const T>{static_cast<const T*>(a.data), a.rows, a.cols, a.stride}; };
  auto head = [&](const head_arg& h) {
    tropd::linear_head<T> r;
    r.hidden = matrix(h.hidden);
    r.weight = matrix(h.weight);
    if (h.bias) r.bias = tropd::vector_view<const T>{static_cast<const T*>(h.bias), h.bias_size};
    r.transform = tropd::logit_transform{h.scale, h.softcap};
    return r;
  };
  const tropd::linear_head<T> student = head(c.student);
  const tropd::index_t n = c.student.hidden.rows, H = c.student.hidden.cols, V = c.student.weight.rows;
  tropd::host::fused_outputs<T> out{};
  if (c.grad_hidden) out.grad_hidden = tropd::matrix_view<T>{static_cast<T*>(c.grad_hidden), n, H, c.grad_hidden_stride};
  if (c.grad_weight) out.grad_weight = tropd::matrix_view<T>{static_cast<T*>(c.grad_weight), V, H, c.grad_weight_stride};
  if (c.grad_bias) out.grad_bias = tropd::vector_view<T>{static_cast<T*>(c.grad_bias), V};
  out.loss = c.loss;
  out.diag = c.diag;
  out.advantage = c.advantage;
  out.flags = c.flags;
  tropd::host::fused_info info;
  out.info = &info;
  tropd::host::fused_options opt;
  opt.eval = c.opt;
  opt.chunk = c.chunk;
  if (c.scratch_budget) opt.scratch_budget = c.scratch_budget;
  const tropd::status st = visit_objective(spec, c.normaliser, error, [&](const auto& obj) -> tropd::status {
    using Obj = std::decay_t<decltype(obj)>;
    if (c.teacher_head.hidden.data) return tropd::host::fused_lm_head(obj, student, head(c.teacher_head), c.in, out, opt);
    if (c.teacher.data) return tropd::host::fused_lm_head(obj, student, matrix(c.teacher), c.in, out, opt);
    if constexpr (takes_served_teacher<Obj>) {
      return tropd::host::fused_lm_head(obj, student, tropd::host::teacher_logprobs{c.teacher_t}, c.in, out, opt);
    } else {
      return tropd::make_error(tropd::errc::unsupported,
                               "this objective reads the teacher's full distribution (entropy, KL or a dense term): pass the teacher's "
                               "head (teacher_hidden, teacher_weight) or its logits");
    }
  });
  c.used_chunk = info.chunk;
  c.scratch_bytes = info.scratch_bytes;
  c.sweeps = info.sweeps;
  return st;
}

}  // namespace tropd_py
