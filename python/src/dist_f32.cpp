// dist::rows_call for every preset, float student and teacher logits (python/src/dist_impl.hpp).
#include "dist.hpp"
#define TROPD_PY_LOGIT float
#define TROPD_PY_SHARDED sharded_f32
#include "dist_impl.hpp"
