// python/src/gpu_rows_impl.cuh: the body of gpu_rows_<dtype>.cu: tropd::gpu::evaluate_rows for
// every preset's objective, student (and teacher) logits of one element type (the CUDA twin of
// rows_impl.hpp). Each gpu_rows_<dtype>.cu defines TROPD_PY_LOGIT and TROPD_PY_GPU_ROWS and
// includes this file.
#pragma once

#include <algorithm>
#include <type_traits>

#include <tropd/gpu/objective.cuh>

#include "gpu_impl.hpp"

namespace tropd_py::gpu::detail {

tropd::status TROPD_PY_GPU_ROWS(const objective_spec& spec, const rows_call& c, void* scratch, size_t scratch_bytes,
                                uintptr_t stream, const device_results& res, std::string* error, size_t* bytes_only) {
  namespace tg = tropd::gpu;
  using T = TROPD_PY_LOGIT;
  using G = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const tropd::matrix_view<const T> student{static_cast<const T*>(c.student.data), c.student.rows, c.student.cols, c.student.stride};
  tg::row_outputs<G> out{};
  if (c.grad) out.grad = tropd::matrix_view<G>{static_cast<G*>(c.grad), c.student.rows, c.student.cols, c.grad_stride};
  out.dloss_ds = c.dloss_ds;
  out.advantage = c.advantage;
  out.flags = c.flags;
  tg::eval_options opt;
  opt.seed = c.opt.seed;
  opt.step = c.opt.step;
  opt.bad_input = c.opt.bad_input;
  unsigned char* const base = static_cast<unsigned char*>(scratch);
  // The loss and diagnostics are always written (the stats tensor). For the size query they
  // point at host objects: evaluate_rows_scratch_bytes only plans (it reads no output).
  double size_loss = 0;
  tropd::diagnostics size_diag;
  if (bytes_only) {
    out.loss = &size_loss;
    out.diag = &size_diag;
  } else if (base != nullptr) {
    out.loss = reinterpret_cast<double*>(base + binding_layout::loss);
    out.diag = reinterpret_cast<tropd::diagnostics*>(base + binding_layout::diag);
  }
  return visit_objective(spec, c.normaliser, error, [&](const auto& obj) -> tropd::status {
    using Obj = std::decay_t<decltype(obj)>;
    int64_t K = 0;
    if constexpr (Obj::outlier_type::needs_topk)
      K = c.in.teacher_topk.ids.rows != 0 ? c.in.teacher_topk.ids.cols : std::min<int64_t>(obj.outlier.fkl.k, c.student.cols);
    TROPD_TRY(check_device_limits(c.student.rows, c.student.cols, K));
    auto run = [&](const auto& teacher) -> tropd::status {
      binding_layout L;
      L.lib_bytes = tg::evaluate_rows_scratch_bytes(obj, student, teacher, c.in, out, opt);
      if (bytes_only) {
        *bytes_only = L.total();
        return {};
      }
      // lib_bytes == 0: the library rejects the arguments, and the call says why (before any
      // launch, whatever the scratch).
      if (L.lib_bytes != 0 && (scratch == nullptr || scratch_bytes < L.total()))
        return tropd::make_error(tropd::errc::insufficient_scratch, "the scratch tensor is smaller than the scratch-size query asked for");
      const tg::device_context ctx{base != nullptr ? base + binding_layout::lib : nullptr, L.lib_bytes, reinterpret_cast<cudaStream_t>(stream)};
      TROPD_TRY(tg::evaluate_rows(ctx, obj, student, teacher, c.in, out, opt));
      return finish(scratch, stream, res);
    };
    if (c.teacher.data) {
      const tropd::matrix_view<const T> teacher{static_cast<const T*>(c.teacher.data), c.teacher.rows, c.teacher.cols, c.teacher.stride};
      return run(teacher);
    }
    if constexpr (takes_served_teacher<Obj>) {
      return run(tg::teacher_logprobs{c.teacher_t});
    } else {
      return tropd::make_error(tropd::errc::unsupported, needs_teacher_logits);
    }
  });
}

}  // namespace tropd_py::gpu::detail
