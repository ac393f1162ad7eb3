// The extension's CUDA dispatch when it is built without CUDA (TROPD_PYTHON_CUDA=OFF): CUDA
// arrays are refused by module.cpp before anything here runs.
#include "gpu.hpp"

namespace tropd_py::gpu {

bool compiled() noexcept { return false; }
size_t rows_scratch_bytes(const objective_spec&, const rows_call&) { return 0; }
size_t tokens_scratch_bytes(const objective_spec&, const tokens_call&) { return 0; }
tropd::status rows(const objective_spec&, const rows_call&, void*, size_t, uintptr_t, std::string*) {
  return tropd::make_error(tropd::errc::unsupported, not_bound);
}
tropd::status tokens(const objective_spec&, const tokens_call&, void*, size_t, uintptr_t, std::string*) {
  return tropd::make_error(tropd::errc::unsupported, not_bound);
}

}  // namespace tropd_py::gpu
