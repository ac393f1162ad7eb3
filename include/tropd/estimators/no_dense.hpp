// tropd/estimators/no_dense.hpp: the dense-estimator slot of the row passes when a row has
// only sparse gradient terms (sampled-token and top-k objectives: the gradient pass writes
// -P_j p_j and the sparse entries), and what a dense estimator's per-element rules read.
// One definition for both backends (host/row_passes.hpp, gpu/detail/row_rules.hpp).
#pragma once

#include <type_traits>

#include <tropd/config.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/row_moments.hpp>

namespace tropd::estimators {

/// Estimator placeholder of rows with only sparse gradient terms.
struct no_dense {
  static constexpr bool second_pass = false;
  template <class F>
  TROPD_HD constexpr void accumulate(F, F, F, F, double*) const noexcept {}
  template <class F>
  TROPD_HD constexpr F grad(F, F, F, F, const row_summary&) const noexcept { return F(0); }
};

/// Whether a dense estimator's per-element rules read the teacher probability q (reverse KL
/// reads only p and the log-ratio); unknown estimators are assumed to.
template <class Est>
inline constexpr bool reads_q = !std::is_same_v<Est, reverse_kl> && !std::is_same_v<Est, no_dense>;

/// Whether they read the teacher row at all.
template <class Est>
inline constexpr bool reads_teacher = !std::is_same_v<Est, no_dense>;

}  // namespace tropd::estimators
