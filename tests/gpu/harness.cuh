// Test-harness helpers shared by the CUDA test translation units (nvcc only): an owning
// device buffer, a stream, and the CUDA-error plumbing of run_status.
#pragma once

#include <cuda_runtime.h>

#include <stddef.h>

#include <vector>

#include "gpu/runs.hpp"

namespace tropd_gpu_test {

/// Owning device allocation of n elements of T (cudaMalloc'd, so 256-byte aligned).
template <class T>
struct device_buffer {
  T* ptr = nullptr;
  size_t n = 0;
  device_buffer() = default;
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() {
    if (ptr) cudaFree(ptr);
  }
  cudaError_t alloc(size_t count) {
    n = count;
    return cudaMalloc(reinterpret_cast<void**>(&ptr), (count ? count : 1) * sizeof(T));
  }
  /// Allocates and copies v (nothing to copy for an empty v).
  cudaError_t upload(const std::vector<T>& v) {
    cudaError_t e = alloc(v.size());
    if (e == cudaSuccess && !v.empty()) e = cudaMemcpy(ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
    return e;
  }
  /// Fills every byte with 0xff: NaN for float and double outputs.
  cudaError_t poison() { return cudaMemset(ptr, 0xff, (n ? n : 1) * sizeof(T)); }
  cudaError_t download(std::vector<T>& v) const {
    v.resize(n);
    return n ? cudaMemcpy(v.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost) : cudaSuccess;
  }
  T* get() const { return n ? ptr : nullptr; }
};

/// A non-default stream, so the entry points' stream ordering is exercised.
struct scoped_stream {
  cudaStream_t s = nullptr;
  ~scoped_stream() {
    if (s) cudaStreamDestroy(s);
  }
};

}  // namespace tropd_gpu_test

/// In a function returning run_status: record a failing CUDA call and return.
#define TROPD_TEST_CUDA(rs, expr)                \
  do {                                           \
    const cudaError_t tropd_test_e_ = (expr);    \
    if (tropd_test_e_ != cudaSuccess) {          \
      (rs).cuda_error = int(tropd_test_e_);      \
      (rs).where = #expr;                        \
      (rs).where += ": ";                        \
      (rs).where += cudaGetErrorString(tropd_test_e_); \
      return (rs);                               \
    }                                            \
  } while (0)
