// tropd/core/token_batch.hpp: the per-token arrays of a batch (inputs of the token-level entry
// points and of the stages behind the row level) and the per-token outputs.
//
// Memory-space agnostic: the host backend reads and writes these views on the host, the GPU
// backend on the device. Arrays are [n] (one entry per token) unless noted; an empty view
// means "not supplied". Value arrays are fp32 or fp64 (core/values.hpp).
#pragma once

#include <stdint.h>

#include <tropd/config.hpp>
#include <tropd/core/token.hpp>
#include <tropd/core/values.hpp>
#include <tropd/core/views.hpp>

namespace tropd {

/// Per-token inputs. Which optional arrays an objective needs follows from its policies
/// (validation says which one is missing).
struct token_batch {
  values_view s{};                          ///< log p_S(y), current student (required)
  values_view s_old{};                      ///< rollout-time log p_S(y) (optional: = s)
  values_view t{};                          ///< log p_T(y) (required; -inf allowed)
  vector_view<const origin> from{};         ///< origin tag of each token (required)
  vector_view<const index_t> seq_offsets{}; ///< [n_seq + 1] CSR offsets (required)
  vector_view<const uint64_t> seq_ids{};    ///< [n_seq] global sequence ids (optional: the index in the batch)
  values_view student_entropy{};            ///< H_S per position (regions that read it)
  values_view teacher_entropy{};            ///< H_T per position (regions that read it)
  values_view rkl{};                        ///< detached per-position KL(p_S || p_T), may be +inf (vOPD)
  values_view ref{};                        ///< reference-model log-prob of y (G-OPD)
  matrix_view<const int32_t> topk_ids{};    ///< [n x K] teacher top-k ids (outlier handlers that need them)
  values_matrix topk_teacher{};             ///< [n x K] log p_T at those ids (-inf: padding)
  values_matrix topk_student{};             ///< [n x K] current log p_S at those ids
  values_matrix topk_student_old{};         ///< [n x K] rollout-time log p_S at those ids (optional: = current)
  /// [n] optional: log(1 - P_K), the current student's exact log-mass outside the list (-inf:
  /// none; NaN entries: unknown). Read only by the tail-bucket policy, which otherwise
  /// estimates it from topk_student (meaningless for tails below ~1e-6 with fp32 log-probs).
  /// The row level fills it from the whole student row.
  values_view topk_student_tail_log{};

  TROPD_HD constexpr index_t size() const noexcept { return s.size; }
  TROPD_HD constexpr index_t num_sequences() const noexcept { return seq_offsets.size - 1; }
};

struct diagnostics;

/// Per-token outputs (each optional) and the aggregated results. Per-token values are
/// weighted by the aggregation weight w_i, i.e. they are derivatives of the returned loss.
struct token_outputs {
  double* loss = nullptr;             ///< the aggregated loss
  diagnostics* diag = nullptr;        ///< diagnostics computed in the same pass (objective/diagnostics.hpp)
  values_out dloss_ds{};                ///< [n] dL/ds_i (push through log_softmax: dL/dz_i = dL/ds_i (e_y - p_i))
  values_out advantage{};               ///< [n] the advantage after clipping (0 where none; unweighted)
  values_matrix_out dloss_dtopk{};      ///< [n x K] dL/d log p_S at the top-k ids (zeros where no top-k term)
  vector_view<uint8_t> flags{};         ///< [n] tropd::flags bits (objective/objective.hpp)
};

}  // namespace tropd
