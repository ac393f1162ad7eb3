// tropd/objective/diagnostics.hpp: what an evaluation of an objective reports besides the
// loss, computed in the same pass (host and device evaluations fill the same struct).
//
// Fractions are over student tokens. A value that is undefined (no student token, no top-k
// term ran, an input the call did not have) is NaN; a value that is infinite is +inf (e.g.
// mean_rkl when some position's KL(p_S || p_T) is infinite). Never a stand-in value.
#pragma once

#include <tropd/config.hpp>

namespace tropd {

struct diagnostics {
  double loss = 0;             ///< the aggregated loss
  double loss_trust = 0, loss_outlier = 0, loss_guidance = 0, loss_dense = 0;  ///< its parts (aggregated)
  double normaliser = 0;       ///< the denominator used
  index_t n_tokens = 0, n_student = 0, n_teacher = 0, n_counted = 0, n_kept = 0;
  index_t n_trusted = 0, n_outlier = 0, n_zero_teacher_mass = 0;
  double trust_fraction = 0, outlier_fraction = 0;
  double adv_clip_fraction = 0, ratio_clip_fraction = 0;
  double mean_R_trusted = 0, mean_R_outlier = 0;  ///< over finite R
  double tv_estimate = 0;      ///< mean over student tokens of 1 - min(1, e^R): an unbiased TV(p, q) estimate
  double mean_student_entropy = 0, mean_teacher_entropy = 0;
  double mean_topk_teacher_mass = 0, mean_topk_student_mass = 0;  ///< over tokens where a top-k term ran
  double mean_rkl = 0;         ///< mean detached KL(p_S || p_T) over student tokens (when known; may be +inf)
  index_t n_masked_input = 0;  ///< tokens dropped by input_policy::mask
};

}  // namespace tropd
