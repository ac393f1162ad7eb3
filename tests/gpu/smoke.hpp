// Host entry points of tests/gpu/smoke.cu (plain functions: doctest stays out of nvcc).
#pragma once

/// Launches a trivial kernel (CUB block reduction of 0..255 plus an elementwise
/// write) and checks the results on the host.
/// Returns 0 on success, a cudaError_t value (> 0) if a CUDA call failed, or -1
/// if the kernel ran but produced wrong values.
int tropd_gpu_smoke();
