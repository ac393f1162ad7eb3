// host::evaluate_rows for every preset, tropd::fp16 student and teacher logits (python/src/rows_impl.hpp).
#include "calls.hpp"
#define TROPD_PY_LOGIT tropd::fp16
#define TROPD_PY_ROWS rows_f16
#include "rows_impl.hpp"
