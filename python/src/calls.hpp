// python/src/calls.hpp: one evaluation as plain views (no nanobind, no Python), so the
// translation units that instantiate tropd's templates stay free of binding code and can be
// compiled in parallel: rows_<dtype>.cpp (one per student logits dtype), tokens.cpp, and,
// with TROPD_PYTHON_CUDA, gpu.cu.
#pragma once

#include <stdint.h>

#include <string>

#include <tropd/host/objective.hpp>
#include <tropd/host/options.hpp>

#include "spec.hpp"

namespace tropd_py {

/// The refusal of a served teacher (token log-probs) for an objective that reads the teacher's
/// full distribution, on either device (the headers' own check is the same rule).
inline constexpr const char* needs_teacher_logits =
    "this objective reads the teacher's full distribution (entropy, KL or a dense term): pass teacher logits";

/// The refusal of the token level for an objective with a full-vocabulary term (GKD), on
/// either device.
inline constexpr const char* needs_logits = "objective has a full-vocabulary term: it needs logits (use distill_loss)";

/// Element type of a logits matrix (the student's; a teacher's must be the same).
enum class logit_type : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

/// A [rows x cols] matrix with a row stride (elements) of any logit_type.
struct logits_arg {
  const void* data = nullptr;
  tropd::index_t rows = 0, cols = 0, stride = 0;
  logit_type type = logit_type::f32;
};

/// evaluate_rows: the student logits, the teacher (logits, or token log-probs when
/// teacher.data is null), the per-row inputs and the outputs. The gradient is fp32 for fp32 /
/// bf16 / fp16 logits and fp64 for fp64 logits (grad == nullptr: not computed).
struct rows_call {
  logits_arg student;
  logits_arg teacher;                   ///< data == nullptr: the teacher is teacher_t (+ in.teacher_topk)
  tropd::values_view teacher_t{};       ///< [n] log p_T(y) of a served teacher
  tropd::host::row_inputs in{};
  void* grad = nullptr;                 ///< [n x V], row stride grad_stride (float or double)
  tropd::index_t grad_stride = 0;
  double* loss = nullptr;
  tropd::diagnostics* diag = nullptr;
  tropd::values_out dloss_ds{};
  tropd::values_out advantage{};
  tropd::vector_view<uint8_t> flags{};
  tropd::host::eval_options opt{};
  double normaliser = 0;                ///< > 0: the aggregation's external normaliser
};

/// evaluate_tokens: the batch and the outputs.
struct tokens_call {
  tropd::token_batch batch{};
  tropd::token_outputs out{};
  tropd::host::eval_options opt{};
  double normaliser = 0;
};

/// Row level, one function per student logits dtype (rows_f32.cpp, ...). Spec errors set *error.
tropd::status rows_f32(const objective_spec& spec, const rows_call& c, std::string* error);
tropd::status rows_f64(const objective_spec& spec, const rows_call& c, std::string* error);
tropd::status rows_bf16(const objective_spec& spec, const rows_call& c, std::string* error);
tropd::status rows_f16(const objective_spec& spec, const rows_call& c, std::string* error);
/// Token level (tokens.cpp).
tropd::status tokens(const objective_spec& spec, const tokens_call& c, std::string* error);

}  // namespace tropd_py
