// tropd::gpu::evaluate_rows, f32 student logits (see gpu_rows_impl.cuh).
#define TROPD_PY_LOGIT float
#define TROPD_PY_GPU_ROWS rows_f32
#include "gpu_rows_impl.cuh"
