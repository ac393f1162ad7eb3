// tropd::gpu::evaluate_rows, bf16 student logits (see gpu_rows_impl.cuh).
#define TROPD_PY_LOGIT tropd::bf16
#define TROPD_PY_GPU_ROWS rows_bf16
#include "gpu_rows_impl.cuh"
