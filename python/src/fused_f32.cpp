// host::fused_lm_head for every preset and teacher form, float hidden states and weight (python/src/fused_impl.hpp).
#include "calls.hpp"
#define TROPD_PY_HEAD float
#define TROPD_PY_FUSED fused_f32
#include "fused_impl.hpp"
