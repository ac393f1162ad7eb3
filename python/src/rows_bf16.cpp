// host::evaluate_rows for every preset, tropd::bf16 student and teacher logits (python/src/rows_impl.hpp).
#include "calls.hpp"
#define TROPD_PY_LOGIT tropd::bf16
#define TROPD_PY_ROWS rows_bf16
#include "rows_impl.hpp"
