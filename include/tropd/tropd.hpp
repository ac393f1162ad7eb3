// tropd/tropd.hpp: umbrella header for host code: the maths (tropd/policies.hpp) and the CPU
// backend (host/rows.hpp: one estimator per row; host/objective.hpp: an objective at token
// and row level; host/fused_lm_head.hpp: an objective from hidden states and the output weight).
#pragma once

#include <tropd/host/fused_lm_head.hpp>
#include <tropd/host/objective.hpp>
#include <tropd/host/options.hpp>
#include <tropd/host/rows.hpp>
#include <tropd/policies.hpp>
