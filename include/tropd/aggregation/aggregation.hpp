// tropd/aggregation/aggregation.hpp: how per-token losses become one number (method.md 8).
//
//   token_mean            sum_i L_i / N_tok          N_tok: counted tokens (TrOPD, EOPD): student
//                                                    tokens, plus teacher-prefix tokens when the
//                                                    guidance term (beta > 0) or a dense term applies
//   kept_token_mean       sum_i L_i / N_kept         N_kept: tokens that contribute (REOPOLD)
//   seq_mean_token_mean   (1/N_seq) sum_j (1/n_j) sum_{i in j} L_i     n_j: counted tokens of j
//   seq_mean_token_sum    (1/N_seq) sum_j sum_{i in j} L_i
//   sum_over_constant     sum_i L_i / C              (Dr. GRPO style)
//
// `normaliser > 0` replaces the count in the denominator (N_tok, N_kept or N_seq; C for
// sum_over_constant), so micro-batches and ranks can share one global count. Sequences
// without counted tokens are not counted in N_seq.
#pragma once

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>

namespace tropd::aggregation {

enum class mode : int { token_mean = 0, kept_token_mean, seq_mean_token_mean, seq_mean_token_sum, sum_over_constant };

constexpr const char* to_string(mode m) noexcept {
  switch (m) {
    case mode::token_mean: return "token_mean";
    case mode::kept_token_mean: return "kept_token_mean";
    case mode::seq_mean_token_mean: return "seq_mean_token_mean";
    case mode::seq_mean_token_sum: return "seq_mean_token_sum";
    case mode::sum_over_constant: return "sum_over_constant";
  }
  return "?";
}

struct aggregation {
  mode how = mode::token_mean;
  double constant = 1.0;    ///< C for sum_over_constant
  double normaliser = 0.0;  ///< > 0: external denominator (global count across micro-batches / ranks)

  TROPD_HD constexpr status check() const noexcept {
    if (!(normaliser >= 0) || !is_finite(normaliser)) return make_error(errc::invalid_parameter, "aggregation: normaliser must be finite and >= 0");
    if (how == mode::sum_over_constant && !(constant > 0 && is_finite(constant)))
      return make_error(errc::invalid_parameter, "aggregation: constant must be finite and > 0");
    return {};
  }
};

}  // namespace tropd::aggregation
