// host::evaluate_rows for every preset, double student and teacher logits (python/src/rows_impl.hpp).
#include "calls.hpp"
#define TROPD_PY_LOGIT double
#define TROPD_PY_ROWS rows_f64
#include "rows_impl.hpp"
