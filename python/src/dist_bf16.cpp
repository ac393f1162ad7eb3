// dist::rows_call for every preset, tropd::bf16 student and teacher logits (python/src/dist_impl.hpp).
#include "dist.hpp"
#define TROPD_PY_LOGIT tropd::bf16
#define TROPD_PY_SHARDED sharded_bf16
#include "dist_impl.hpp"
