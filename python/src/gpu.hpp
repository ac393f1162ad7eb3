// python/src/gpu.hpp: the extension's CUDA dispatch (python/src/gpu*.cu, compiled by nvcc when
// the CMake option TROPD_PYTHON_CUDA is ON; python/src/gpu_none.cpp otherwise).
//
// The binding (module.cpp) validates and converts DLPack arrays into the same plain call
// structs as the host path (calls.hpp) and hands them here together with the caller's scratch
// (a uint8 CUDA tensor from torch's caching allocator, sized by *_scratch_bytes with the same
// arguments) and the caller's stream (torch.cuda.current_stream().cuda_stream). The calls
// are tropd::gpu::evaluate_rows / evaluate_tokens (docs/gpu.md) on that stream; nothing here
// allocates. The one synchronisation is the status word's read-back at the end of a call
// (tropd::gpu::read_status), so that a data error raises from the call that made it, with the
// CPU path's exception (docs/python.md "CUDA").
//
// Scratch layout (bytes): [0, A) the library's scratch (A = its *_scratch_bytes rounded up to
// 256; the status word is its first 8 bytes), then the call's tropd::diagnostics and its loss
// (double), which a one-thread kernel converts into the caller's `stats` (float64) and `loss`
// (float32 or float64) tensors on the same stream.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <string>

#include "calls.hpp"

namespace tropd_py::gpu {

/// The detail string of a status that means "the extension has no CUDA dispatch" (module.cpp
/// refuses CUDA arrays before that in a CPU-only build; kept for a build that lost the .cu).
inline constexpr const char* not_bound =
    "this build of tropd's extension has no CUDA dispatch (build it with -C cmake.define.TROPD_PYTHON_CUDA=ON)";

/// Whether a status means "the device backend does not do this" (Python: NotImplementedError):
/// not_bound, or a size beyond the device backend's limits (tropd/gpu/plan.hpp: rows, vocabulary,
/// top-k width) that the host backend takes.
bool not_implemented(const tropd::status& st) noexcept;

/// Whether the extension was compiled with its CUDA dispatch (TROPD_PYTHON_CUDA=ON).
bool compiled() noexcept;

/// The caller's loss and stats tensors of a CUDA call (device memory).
struct device_results {
  void* loss = nullptr;     ///< one float32 or float64 value
  bool loss_f64 = false;
  double* stats = nullptr;  ///< n_stats values (stats.hpp)
};

/// Scratch bytes of a call with these arguments (the library's and the binding's, see the
/// layout above), in *bytes. A spec error (ValueError) or a device limit (NotImplementedError)
/// is returned here; other argument errors are returned by the call itself.
tropd::status rows_scratch_bytes(const objective_spec& spec, const rows_call& c, size_t* bytes, std::string* error);
tropd::status tokens_scratch_bytes(const objective_spec& spec, const tokens_call& c, size_t* bytes, std::string* error);

/// Device evaluation on `stream` (a cudaStream_t as an integer) with caller scratch: argument
/// errors before anything is launched, then the status word (read back: the call's one sync).
/// The rows_call's / tokens_call's loss and diag pointers are not used (the scratch holds them).
tropd::status rows(const objective_spec& spec, const rows_call& c, void* scratch, size_t scratch_bytes, uintptr_t stream,
                   const device_results& res, std::string* error);
tropd::status tokens(const objective_spec& spec, const tokens_call& c, void* scratch, size_t scratch_bytes, uintptr_t stream,
                     const device_results& res, std::string* error);

}  // namespace tropd_py::gpu
