// tropd/gpu/config.cuh: what every call of the CUDA backend takes: where it runs (scratch and
// stream), its options, and the memory-agnostic input / output structs it shares with the
// host backend.
//
// Device code: include the backend (tropd/gpu/gpu.cuh, or rows.cuh / objective.cuh) only from
// .cu files compiled by nvcc with -std=c++20.
#pragma once

#if !defined(__CUDACC__)
#error "tropd/gpu is CUDA code: compile this translation unit with nvcc (host-only code includes <tropd/tropd.hpp>)"
#endif
#if __cplusplus < 202002L
#error "tropd/gpu needs C++20: compile with nvcc -std=c++20 (CMake 3.25 with nvcc 13: add -std=c++20 yourself)"
#endif

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime.h>

#include <tropd/config.hpp>
#include <tropd/core/status.hpp>
#include <tropd/gpu/plan.hpp>
#include <tropd/host/options.hpp>
#include <tropd/host/row_io.hpp>

namespace tropd::gpu {

/// Where a call runs: caller-owned device scratch and the stream everything is ordered on.
/// The scratch holds the status word (first 8 bytes) and the call's intermediate arrays; size
/// it with the entry point's *_scratch_bytes() function (same arguments and options, same
/// current device), 256-byte aligned (cudaMalloc's alignment).
struct device_context {
  void* scratch = nullptr;   ///< device memory of at least *_scratch_bytes() bytes
  size_t scratch_bytes = 0;  ///< its size
  cudaStream_t stream = 0;   ///< every memset, copy and launch of the call goes here
};

/// How a row is spread over blocks (docs/gpu.md "The row kernels").
struct launch_options {
  /// 0: planned from the row kernel's measured occupancy (plan.hpp choose_blocks_per_row);
  /// 1: one block per row (every pass of a row in one block); > 1: the split path, this many
  /// blocks per row (at most 1024).
  int blocks_per_row = 0;
  /// Multiprocessors the plan assumes; 0: ask the current device (cudaDeviceGetAttribute,
  /// no synchronisation).
  int sm_count = 0;
};

/// Options of the row functions (divergence_rows, sampled_rows, topk_forward_kl_rows).
struct row_options {
  double student_temperature = 1.0;  ///< T_S (> 0): student logits are divided by it
  double teacher_temperature = 1.0;  ///< T_T (> 0): teacher logits are divided by it (not given top-k lists)
  launch_options launch{};
  /// true: the call ends by copying its status word back and returns the device checks'
  /// status (this SYNCHRONISES ctx.stream); false (default): stream-ordered, read it later
  /// with read_status().
  bool synchronize = false;
};

/// Options of the objective entry points (evaluate_tokens, evaluate_rows): the host's
/// eval_options less `threads`, plus the launch and synchronisation choices.
struct eval_options {
  uint64_t seed = 0;  ///< keys the stochastic trust region (with step, sequence id, position)
  uint64_t step = 0;  ///< training step (random draws, phase switches)
  host::input_policy bad_input = host::input_policy::reject;
  launch_options launch{};
  bool synchronize = false;  ///< as row_options::synchronize
};

// The memory-agnostic structs of the host backend, taken as they are (device pointers here).
using host::input_policy;
using host::row_inputs;
using host::row_outputs;
using host::teacher_logprobs;
using host::topk_lists;

namespace detail {

inline status cuda_status(cudaError_t e) noexcept {
  return e == cudaSuccess ? status{} : make_error(errc::backend_error, cudaGetErrorString(e));
}

}  // namespace detail
}  // namespace tropd::gpu

/// In a function returning tropd::status: return backend_error when a CUDA call fails.
#define TROPD_GPU_TRY_CUDA(expr)                                                   \
  do {                                                                             \
    const cudaError_t tropd_gpu_e_ = (expr);                                       \
    if (tropd_gpu_e_ != cudaSuccess) return ::tropd::gpu::detail::cuda_status(tropd_gpu_e_); \
  } while (0)
