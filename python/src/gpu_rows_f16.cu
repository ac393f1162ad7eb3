// tropd::gpu::evaluate_rows, f16 student logits (see gpu_rows_impl.cuh).
#define TROPD_PY_LOGIT tropd::fp16
#define TROPD_PY_GPU_ROWS rows_f16
#include "gpu_rows_impl.cuh"
