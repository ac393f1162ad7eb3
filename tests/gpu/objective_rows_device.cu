// Device side of the row-level objective tests (test_objective.cpp), part 1: gpu::evaluate_rows
// for every preset objective type with fp32 logits (teacher logits or a served teacher).
#include "gpu/objective_harness.cuh"

namespace tropd_gpu_test {
namespace tp = tropd::presets;
TROPD_INSTANTIATE_ROWS(tp::opd_objective, float, float)
TROPD_INSTANTIATE_ROWS(tp::eopd_objective, float, float)
TROPD_INSTANTIATE_ROWS(tp::reopold_objective, float, float)
TROPD_INSTANTIATE_ROWS(tp::entropy_opd_objective, float, float)
TROPD_INSTANTIATE_ROWS(tp::clip_outlier_objective, float, float)
TROPD_INSTANTIATE_ROWS(tp::mask_outlier_objective, float, float)
TROPD_INSTANTIATE_ROWS(tp::fkl_outlier_objective, float, float)
TROPD_INSTANTIATE_ROWS(tp::vopd_objective, float, float)
TROPD_INSTANTIATE_ROWS(tp::gopd_objective, float, float)
}  // namespace tropd_gpu_test
