// Device side of the row-level objective tests (test_objective.cpp), part 2: the dense (GKD)
// objectives, the other logit types and gradient types, the custom objectives.
#include "gpu/objective_harness.cuh"

namespace tropd_gpu_test {
namespace tp = tropd::presets;
TROPD_INSTANTIATE_ROWS(tp::gkd_objective, float, float)
TROPD_INSTANTIATE_ROWS(tp::gkd_objective, tropd::bf16, float)
TROPD_INSTANTIATE_ROWS(k1_jsd_objective, float, double)
TROPD_INSTANTIATE_ROWS(tp::fkl_outlier_objective, tropd::bf16, float)
TROPD_INSTANTIATE_ROWS(tp::fkl_outlier_objective, tropd::fp16, float)
TROPD_INSTANTIATE_ROWS(tp::fkl_outlier_objective, double, double)
TROPD_INSTANTIATE_ROWS(tp::opd_objective, tropd::bf16, float)
TROPD_INSTANTIATE_ROWS(all_outliers_objective, float, float)
TROPD_INSTANTIATE_ROWS(trm_objective, float, float)
}  // namespace tropd_gpu_test
