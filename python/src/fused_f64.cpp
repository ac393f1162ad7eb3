// host::fused_lm_head for every preset and teacher form, double hidden states and weight (python/src/fused_impl.hpp).
#include "calls.hpp"
#define TROPD_PY_HEAD double
#define TROPD_PY_FUSED fused_f64
#include "fused_impl.hpp"
