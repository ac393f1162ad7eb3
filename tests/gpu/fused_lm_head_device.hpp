// Host entry points of tests/gpu/fused_lm_head_device.cu (plain functions: doctest stays out of nvcc).
#pragma once

/// Instantiates gpu::fused_lm_head for bf16 / fp16 / fp32 operands and fp32 / operand-type
/// gradients, one-sweep, two-sweep and dense objectives, with a test evaluator, and calls
/// each with an empty batch (no device work). Returns 0 when every call gave empty_batch.
int tropd_gpu_fused_compile_check();

/// Runs the device fused LM head (bf16 operands, logit scale, soft-cap, bias, chunk 3 of
/// n = 10) with an evaluator whose dL/dz is z itself, and compares dL/dh, dL/dW (added to a
/// prefilled buffer) and dL/db with a host computation from the same bf16 values. Returns 0 on
/// success, a cudaError_t / cublasStatus_t value (> 0) if a call failed, -1 on wrong values;
/// *max_rel_err gets the largest error relative to each output's scale.
int tropd_gpu_fused_echo_check(double* max_rel_err);
