// tropd/host/options.hpp: the option structs of the CPU backend's entry points.
#pragma once

#include <stdint.h>

#include <tropd/config.hpp>
#include <tropd/core/values.hpp>
#include <tropd/core/views.hpp>

namespace tropd::host {

/// The order in which the row functions (host/rows.hpp) work through a batch.
enum class row_order : int {
  /// Every row's statistics are computed and validated before anything is written: a failed
  /// call leaves every output untouched. Reads each row twice (the gradient pass walks rows
  /// backwards so the last rows come from cache).
  validate_first = 0,
  /// Statistics and gradient per row while it is in cache (each row read once from memory;
  /// the gradient pass reuses pass 1's exponentials; O(V) scratch per thread). On failure any
  /// gradient row may already be written (with threads > 1 the other blocks run on: rows
  /// after the failing one too); the losses are untouched.
  single_read = 1,
};

/// Options of the row functions (divergence_rows, sampled_rows, topk_forward_kl_rows).
struct row_options {
  double student_temperature = 1.0;  ///< T_S: student logits are divided by it (> 0)
  double teacher_temperature = 1.0;  ///< T_T: teacher logits are divided by it (> 0); not applied to given top-k lists
  row_order order = row_order::validate_first;
  int threads = 1;                   ///< rows are split statically over this many threads
};

/// A teacher top-k list per row: ids [rows x K] and log-probabilities [rows x K] (any
/// normalisation). -inf log-probs are padding (their ids are ignored).
struct topk_lists {
  matrix_view<const int32_t> ids;
  values_matrix logprobs;  ///< fp32 or fp64
};

/// What to do with non-finite or out-of-range per-token values (docs/robustness.md).
enum class input_policy : int {
  reject = 0,  ///< default: fail with an error naming the first bad token (nothing written)
  mask = 1,    ///< opt-in: treat bad tokens (and rows with NaN/+inf logits) as prompt tokens
               ///< (no loss, zero gradient) and count them in diagnostics::n_masked_input
};

/// Options of the objective entry points (evaluate_tokens, evaluate_rows).
struct eval_options {
  uint64_t seed = 0;  ///< keys the stochastic trust region (with step, sequence id, position)
  uint64_t step = 0;  ///< training step (random draws, phase switches)
  input_policy bad_input = input_policy::reject;
  int threads = 1;    ///< evaluate_rows: rows are split statically over this many threads
};

}  // namespace tropd::host
