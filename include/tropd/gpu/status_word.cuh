// tropd/gpu/status_word.cuh: the device status word, where the kernels record data errors.
//
// Argument errors a call can see on the host (shapes, parameters, scratch size) are returned
// before anything is launched. Data errors need the device (NaN logits, ids out of range, an
// infinite divergence, ...): the kernels record the first one in a 64-bit word at the start of
// the scratch, which each call clears. "First" is the host backend's order (plan.hpp
// check_stage, then row, then column): every check_stage is reported once per row (or block),
// with one atomicMin, never once per element. Read it with read_status() (synchronises the
// stream), or copy it yourself (status_word(), decode_status()), or pass `synchronize = true`
// to the call. A call on the same scratch clears it: read it before reusing the scratch.
//
// What a failed call writes (docs/gpu.md "Errors"): the row functions write NaN losses and NaN
// gradient rows for the failing rows and compute the others; the objective entry points write
// NaN for every floating output (loss, diagnostics, per-token values, gradient rows), 0 flags
// and -1 top-k ids, except that a gradient value found not to fit its type while it is written
// leaves that call's gradient rows partly written (as on the host).
#pragma once

#include <stdint.h>

#include <tropd/gpu/config.cuh>

namespace tropd::gpu {

/// Device address of the status word inside a call's scratch.
inline const uint64_t* status_word(const void* scratch) noexcept { return static_cast<const uint64_t*>(scratch); }

/// Copies the status word back and decodes it. SYNCHRONISES `stream`.
inline status read_status(const void* scratch, cudaStream_t stream) {
  uint64_t word = detail::status_clear;
  cudaError_t e = cudaMemcpyAsync(&word, scratch, sizeof word, cudaMemcpyDeviceToHost, stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) return make_error(errc::backend_error, cudaGetErrorString(e));
  return decode_status(word);
}

namespace detail {

/// Records a data error (the smallest word wins).
__device__ __forceinline__ void report(uint64_t* word, check_stage stage, errc code, check_site site, index_t row, index_t col) {
  atomicMin(reinterpret_cast<unsigned long long*>(word), static_cast<unsigned long long>(encode_status(stage, code, site, row, col)));
}

/// Whether an earlier kernel of the call recorded an error (read once per thread).
__device__ __forceinline__ bool failed(const uint64_t* word) { return *reinterpret_cast<const volatile uint64_t*>(word) != status_clear; }

/// Clears the status word (the first thing every call enqueues).
inline status clear_status(void* scratch, cudaStream_t stream) {
  TROPD_GPU_TRY_CUDA(cudaMemsetAsync(scratch, 0xff, sizeof(uint64_t), stream));
  return {};
}

/// The end of a call: launch errors, then (synchronize) the device checks' status.
inline status finish_call(const void* scratch, cudaStream_t stream, bool synchronize) {
  TROPD_GPU_TRY_CUDA(cudaGetLastError());
  if (!synchronize) return {};
  return read_status(scratch, stream);
}

inline status check_context(const device_context& ctx, size_t need) {
  if (ctx.scratch == nullptr || ctx.scratch_bytes < need)
    return make_error(errc::insufficient_scratch, "device_context: scratch is null or smaller than *_scratch_bytes() asks for");
  if (reinterpret_cast<uintptr_t>(ctx.scratch) % scratch_alignment != 0)
    return make_error(errc::invalid_parameter, "device_context: scratch must be 256-byte aligned (cudaMalloc's alignment)");
  return {};
}

}  // namespace detail
}  // namespace tropd::gpu
