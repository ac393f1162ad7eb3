// python/src/gpu.hpp: the extension's CUDA dispatch (python/src/gpu.cu, compiled by nvcc when
// the CMake option TROPD_PYTHON_CUDA is ON; python/src/gpu_none.cpp otherwise).
//
// The binding (module.cpp) validates and converts DLPack arrays into the same plain call
// structs as the host path (calls.hpp) and hands them here together with the caller's scratch
// (allocated by torch's caching allocator on the Python side, sized by *_scratch_bytes) and
// the caller's stream (torch.cuda.current_stream().cuda_stream). Nothing here allocates or
// synchronises.
//
// State on this branch: the headers' device entry points for objectives
// (tropd::gpu::evaluate_rows / evaluate_tokens taking the host's input/output structs) are not
// there yet, so every function answers `not_bound` (Python raises NotImplementedError). The
// call structs, the scratch and the stream already travel the whole way.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <string>

#include "calls.hpp"

namespace tropd_py::gpu {

/// The detail string of a status that means "no device entry point for this call in this
/// version of the headers" (module.cpp turns it into NotImplementedError).
inline constexpr const char* not_bound =
    "this version of tropd's headers has no device entry point for objectives (tropd::gpu::evaluate_rows / "
    "evaluate_tokens); CUDA tensors cannot be evaluated yet";

/// Whether the extension was compiled with its CUDA dispatch (TROPD_PYTHON_CUDA=ON).
bool compiled() noexcept;

/// Scratch bytes evaluate_rows needs for this call (0 where not bound).
size_t rows_scratch_bytes(const objective_spec& spec, const rows_call& c);
size_t tokens_scratch_bytes(const objective_spec& spec, const tokens_call& c);

/// Device evaluation on `stream` (a cudaStream_t as an integer) with caller scratch.
tropd::status rows(const objective_spec& spec, const rows_call& c, void* scratch, size_t scratch_bytes, uintptr_t stream,
                   std::string* error);
tropd::status tokens(const objective_spec& spec, const tokens_call& c, void* scratch, size_t scratch_bytes, uintptr_t stream,
                     std::string* error);

}  // namespace tropd_py::gpu
