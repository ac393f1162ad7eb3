// tropd/objective.hpp: the composed distillation objective, its per-token rule and the
// named presets (host and device code; no Eigen).
//
//   objective/objective.hpp       objective<Region, Trust, Outlier, Clip, Dense>, flags, token_result
//   objective/evaluate_token.hpp  the per-token rule
//   objective/presets.hpp         opd, eopd, reopold, entropy_opd, clip_outlier, mask_outlier,
//                                 fkl_outlier, tropd, gkd, vopd, gopd
//   objective/diagnostics.hpp     what an evaluation reports besides the loss
#pragma once

#include <tropd/objective/diagnostics.hpp>
#include <tropd/objective/evaluate_token.hpp>
#include <tropd/objective/objective.hpp>
#include <tropd/objective/presets.hpp>
