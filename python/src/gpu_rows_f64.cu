// tropd::gpu::evaluate_rows, f64 student logits (see gpu_rows_impl.cuh).
#define TROPD_PY_LOGIT double
#define TROPD_PY_GPU_ROWS rows_f64
#include "gpu_rows_impl.cuh"
