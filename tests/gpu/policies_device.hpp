// Host entry point of tests/gpu/policies_device.cu (plain function: doctest stays out of nvcc).
#pragma once

#include <string>

/// Runs every policy's TROPD_HD members (numerics, Philox, 16-bit conversions, row_moments,
/// the sampled and full-vocabulary estimators, top-k FKL, trust rewards, regions, outlier
/// handlers, clippers, and evaluate_token for every preset objective type) in __global__
/// kernels and the same code on the host, and compares the values.
/// Returns 0 when every value agrees (1e-12 relative, bit-exact for integers and decisions),
/// a cudaError_t value (> 0) if a CUDA call failed, or -(number of mismatches); `report`
/// lists the first mismatches.
int tropd_gpu_policies_check(std::string* report);
