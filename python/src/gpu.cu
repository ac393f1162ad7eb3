// The extension's CUDA dispatch (TROPD_PYTHON_CUDA=ON; nvcc, C++20). See gpu.hpp.
//
// It is the thin second dispatch of the binding: the call structs (calls.hpp) hold device
// pointers here, `scratch` is caller memory from torch's caching allocator and `stream` is
// torch's current stream. When the headers gain the device objective entry points
// (tropd::gpu::evaluate_rows(ctx, obj, student, teacher, inputs, outputs, options) with
// ctx = {scratch, scratch_bytes, stream} and *_scratch_bytes), each function below becomes
//
//   return visit_objective(spec, c.normaliser, error, [&](const auto& obj) {
//     return tropd::gpu::evaluate_rows(tropd::gpu::device_context{scratch, scratch_bytes,
//                                      reinterpret_cast<cudaStream_t>(stream)}, obj, ...);
//   });
//
// and the device status word goes back to Python as a device tensor (no synchronisation).
// Until then every call answers not_bound (NotImplementedError in Python); the rest of the
// path (device checks, stream, scratch) is exercised by the extension's CUDA build.
#include <cuda_runtime.h>

#include "gpu.hpp"

#if !defined(__CUDACC__)
#error "python/src/gpu.cu must be compiled by nvcc"
#endif

namespace tropd_py::gpu {

bool compiled() noexcept { return true; }

size_t rows_scratch_bytes(const objective_spec&, const rows_call&) { return 0; }
size_t tokens_scratch_bytes(const objective_spec&, const tokens_call&) { return 0; }

namespace {
/// The stream handle the call would run on (checked now, so a bad handle is seen early).
tropd::status check_stream(uintptr_t stream) {
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  unsigned int flags = 0;
  if (s != nullptr && cudaStreamGetFlags(s, &flags) != cudaSuccess)
    return tropd::make_error(tropd::errc::backend_error, "the CUDA stream handle passed by the caller is not valid");
  return {};
}
}  // namespace

tropd::status rows(const objective_spec& spec, const rows_call& c, void*, size_t, uintptr_t stream, std::string* error) {
  // The objective is still built (so a bad spec is a ValueError on either device).
  TROPD_TRY(visit_objective(spec, c.normaliser, error, [](const auto&) -> tropd::status { return {}; }));
  TROPD_TRY(check_stream(stream));
  return tropd::make_error(tropd::errc::unsupported, not_bound);
}

tropd::status tokens(const objective_spec& spec, const tokens_call& c, void*, size_t, uintptr_t stream, std::string* error) {
  TROPD_TRY(visit_objective(spec, c.normaliser, error, [](const auto&) -> tropd::status { return {}; }));
  TROPD_TRY(check_stream(stream));
  return tropd::make_error(tropd::errc::unsupported, not_bound);
}

}  // namespace tropd_py::gpu
