// The extension's CUDA dispatch when it is built without CUDA (TROPD_PYTHON_CUDA=OFF): CUDA
// arrays are refused by module.cpp before anything here runs.
#include "gpu.hpp"

namespace tropd_py::gpu {

bool not_implemented(const tropd::status& st) noexcept { return st.code == tropd::errc::unsupported && st.detail == not_bound; }
bool compiled() noexcept { return false; }
tropd::status rows_scratch_bytes(const objective_spec&, const rows_call&, size_t* bytes, std::string*) {
  *bytes = 0;
  return tropd::make_error(tropd::errc::unsupported, not_bound);
}
tropd::status tokens_scratch_bytes(const objective_spec&, const tokens_call&, size_t* bytes, std::string*) {
  *bytes = 0;
  return tropd::make_error(tropd::errc::unsupported, not_bound);
}
tropd::status rows(const objective_spec&, const rows_call&, void*, size_t, uintptr_t, const device_results&, std::string*) {
  return tropd::make_error(tropd::errc::unsupported, not_bound);
}
tropd::status tokens(const objective_spec&, const tokens_call&, void*, size_t, uintptr_t, const device_results&, std::string*) {
  return tropd::make_error(tropd::errc::unsupported, not_bound);
}

}  // namespace tropd_py::gpu
