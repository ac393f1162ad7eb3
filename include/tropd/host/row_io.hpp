// tropd/host/row_io.hpp: the inputs and outputs of the row-level objective (evaluate_rows),
// apart from the entry point so that a backend can take the same structs without the CPU
// backend's passes (the CUDA backend's gpu::evaluate_rows does). Memory-space agnostic: the
// host backend reads and writes them on the host, the GPU backend on the device.
#pragma once

#include <stdint.h>

#include <tropd/config.hpp>
#include <tropd/core/token.hpp>
#include <tropd/core/types.hpp>
#include <tropd/core/values.hpp>
#include <tropd/core/views.hpp>
#include <tropd/host/options.hpp>
#include <tropd/objective/diagnostics.hpp>

namespace tropd::host {

/// Per-row inputs of evaluate_rows besides the logits (n rows).
struct row_inputs {
  vector_view<const int32_t> ids{};          ///< [n] the token at each row (sampled, or a teacher-prefix token)
  vector_view<const origin> from{};          ///< [n] origin tags
  vector_view<const index_t> seq_offsets{};  ///< [n_seq + 1] CSR sequence offsets
  vector_view<const uint64_t> seq_ids{};     ///< [n_seq] optional global sequence ids (default: the index in the batch)
  values_view s_old{};                       ///< [n] optional rollout-time log p_S(y) (default: from the rows, rho = 1)
  values_view ref{};                         ///< [n] optional reference-model log-probs (G-OPD)
  /// [n x K] optional rollout-time log p_S at the teacher's top-k ids, in the order of the
  /// lists the call uses (given lists; or the selected ones, descending teacher probability).
  values_matrix topk_student_old{};
  /// Optional given teacher top-k lists [n x K], K = the objective's k (else selected from
  /// the teacher logits where the outlier handler needs them, K = min(k, V)).
  topk_lists teacher_topk{};
  double student_temperature = 1.0;        ///< T_S: student logits are divided by it
  double teacher_temperature = 1.0;        ///< T_T: teacher logits are divided by it (not given lists or log-probs)
};

/// The teacher of evaluate_rows given as its log-probs of the rows' tokens instead of logits
/// (a served teacher): t [n], log p_T(y) at the temperature the objective should see.
/// Optional top-k lists go in row_inputs::teacher_topk. Objectives that read teacher entropies,
/// the per-position KL or a dense term need the teacher's logits (errc::unsupported).
struct teacher_logprobs {
  values_view t{};
};

/// Outputs of evaluate_rows (each optional except that something should be asked for).
template <grad_element G = float>
struct row_outputs {
  matrix_view<G> grad{};               ///< [n x V] dL/dz of the student logits
  double* loss = nullptr;            ///< the aggregated loss
  diagnostics* diag = nullptr;       ///< diagnostics computed in the same pass
  values_out dloss_ds{};               ///< [n] dL/ds_i
  values_out advantage{};              ///< [n] the advantage after clipping
  values_matrix_out dloss_dtopk{};     ///< [n x K] dL/d log p_S at the top-k ids
  vector_view<uint8_t> flags{};        ///< [n] tropd::flags bits
  /// [n x K] the teacher top-k ids the call used (selected or given; -1 for padding and for
  /// rows that are not student samples), so dloss_dtopk can be read. K: the lists' width.
  matrix_view<int32_t> topk_ids{};
};

}  // namespace tropd::host
