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

/// A linear head as plain views: hidden [n x H], weight [V x H], optional bias [V] (data ==
/// nullptr: none), all of one element type (f32 or f64: the host fused call's types), and its
/// logit transform.
struct head_arg {
  logits_arg hidden;
  logits_arg weight;
  const void* bias = nullptr;           ///< [bias_size] contiguous (nullptr: none)
  tropd::index_t bias_size = 0;
  double scale = 1.0, softcap = 0.0;
};

/// host::fused_lm_head: the student head, the teacher (a head when teacher_head.hidden.data,
/// else logits when teacher.data, else log-probs teacher_t + in.teacher_topk), the per-row
/// inputs and the outputs. Gradients have the head's element type; grad_* == nullptr: not
/// computed (grad_weight / grad_bias are ADDED to: the caller zeroes them).
struct fused_call {
  head_arg student;
  head_arg teacher_head;                ///< hidden.data == nullptr: not a head
  logits_arg teacher;                   ///< [n x V] teacher logits (data == nullptr: none)
  tropd::values_view teacher_t{};       ///< [n] log p_T(y) of a served teacher
  tropd::host::row_inputs in{};
  void* grad_hidden = nullptr;          ///< [n x H], row stride grad_hidden_stride
  tropd::index_t grad_hidden_stride = 0;
  void* grad_weight = nullptr;          ///< [V x H], row stride grad_weight_stride
  tropd::index_t grad_weight_stride = 0;
  void* grad_bias = nullptr;            ///< [V] contiguous
  double* loss = nullptr;
  tropd::diagnostics* diag = nullptr;
  tropd::values_out advantage{};
  tropd::vector_view<uint8_t> flags{};
  tropd::host::eval_options opt{};
  tropd::index_t chunk = 0;             ///< rows per chunk (0: from scratch_budget)
  size_t scratch_budget = 0;            ///< bytes of chunk buffers (chunk = 0)
  double normaliser = 0;
  tropd::index_t used_chunk = 0;        ///< written: the chunk the call used
  size_t scratch_bytes = 0;             ///< written: the bytes of chunk buffers it allocated
  int sweeps = 0;                       ///< written: 1 or 2
};

/// Row level, one function per student logits dtype (rows_f32.cpp, ...). Spec errors set *error.
tropd::status rows_f32(const objective_spec& spec, const rows_call& c, std::string* error);
tropd::status rows_f64(const objective_spec& spec, const rows_call& c, std::string* error);
tropd::status rows_bf16(const objective_spec& spec, const rows_call& c, std::string* error);
tropd::status rows_f16(const objective_spec& spec, const rows_call& c, std::string* error);
/// The fused LM head, one function per head element type (fused_f32.cpp, fused_f64.cpp).
tropd::status fused_f32(const objective_spec& spec, fused_call& c, std::string* error);
tropd::status fused_f64(const objective_spec& spec, fused_call& c, std::string* error);
/// Token level (tokens.cpp).
tropd::status tokens(const objective_spec& spec, const tokens_call& c, std::string* error);

}  // namespace tropd_py
