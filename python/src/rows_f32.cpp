// host::evaluate_rows for every preset, float student and teacher logits (python/src/rows_impl.hpp).
#include "calls.hpp"
#define TROPD_PY_LOGIT float
#define TROPD_PY_ROWS rows_f32
#include "rows_impl.hpp"
