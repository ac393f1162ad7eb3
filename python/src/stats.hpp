// python/src/stats.hpp: the float64 `stats` vector the evaluations write (its order is
// module.cpp's diagnostic_names()), from tropd::diagnostics. One definition for both paths:
// the host path calls it on the host, the CUDA path (gpu_impl.cuh) in a one-thread kernel on
// the call's stream, so the device's diagnostics never travel to the host.
#pragma once

#include <tropd/config.hpp>
#include <tropd/objective/diagnostics.hpp>

namespace tropd_py {

/// Entries of the stats vector.
inline constexpr int n_stats = 27;

/// Writes d into s[0 .. n_stats) in diagnostic_names()' order (counts as doubles).
TROPD_HD inline void write_stats(const tropd::diagnostics& d, double* s) {
  const double v[n_stats] = {d.loss,
                             d.loss_trust,
                             d.loss_outlier,
                             d.loss_guidance,
                             d.loss_dense,
                             d.normaliser,
                             double(d.n_tokens),
                             double(d.n_student),
                             double(d.n_teacher),
                             double(d.n_counted),
                             double(d.n_kept),
                             double(d.n_trusted),
                             double(d.n_outlier),
                             double(d.n_zero_teacher_mass),
                             double(d.n_masked_input),
                             d.trust_fraction,
                             d.outlier_fraction,
                             d.adv_clip_fraction,
                             d.ratio_clip_fraction,
                             d.mean_R_trusted,
                             d.mean_R_outlier,
                             d.tv_estimate,
                             d.mean_student_entropy,
                             d.mean_teacher_entropy,
                             d.mean_topk_teacher_mass,
                             d.mean_topk_student_mass,
                             d.mean_rkl};
  for (int i = 0; i < n_stats; ++i) s[i] = v[i];
}

}  // namespace tropd_py
