// Device side of the token-level objective tests (test_objective.cpp): gpu::evaluate_tokens
// for every preset objective type and the custom ones of runs.hpp.
#include "gpu/objective_harness.cuh"

namespace tropd_gpu_test {
namespace tp = tropd::presets;
TROPD_INSTANTIATE_TOKENS(tp::opd_objective)
TROPD_INSTANTIATE_TOKENS(tp::eopd_objective)
TROPD_INSTANTIATE_TOKENS(tp::reopold_objective)
TROPD_INSTANTIATE_TOKENS(tp::entropy_opd_objective)
TROPD_INSTANTIATE_TOKENS(tp::clip_outlier_objective)
TROPD_INSTANTIATE_TOKENS(tp::mask_outlier_objective)
TROPD_INSTANTIATE_TOKENS(tp::fkl_outlier_objective)
TROPD_INSTANTIATE_TOKENS(tp::gkd_objective)
TROPD_INSTANTIATE_TOKENS(tp::vopd_objective)
TROPD_INSTANTIATE_TOKENS(tp::gopd_objective)
TROPD_INSTANTIATE_TOKENS(trm_objective)
TROPD_INSTANTIATE_TOKENS(k3_loss_objective)
TROPD_INSTANTIATE_TOKENS(proximal_objective)
}  // namespace tropd_gpu_test
