// main() of tropd-gpu-tests: the host doctest runner for the CUDA tests.
//
// On a machine without a usable CUDA device the tests were still compiled (that
// is the point of building them everywhere), but cannot run: say so and exit 77,
// which CTest reports as "skipped" (SKIP_RETURN_CODE 77 in tests/CMakeLists.txt).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <cstdio>

namespace {
constexpr int skip_return_code = 77;
}

int main(int argc, char** argv) {
  int device_count = 0;
  const cudaError_t status = cudaGetDeviceCount(&device_count);
  if (status != cudaSuccess || device_count == 0) {
    std::printf(
        "tropd-gpu-tests: GPU tests were compiled but NOT executed: no CUDA device (%s)\n",
        status != cudaSuccess ? cudaGetErrorString(status) : "cudaGetDeviceCount reports 0");
    return skip_return_code;
  }

  doctest::Context context;
  context.applyCommandLine(argc, argv);
  const int result = context.run();
  if (context.shouldExit()) {
    return result;
  }
  // Never let a real failure look like a skip.
  return result == skip_return_code ? 1 : result;
}
