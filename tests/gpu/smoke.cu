// Smallest CUDA translation unit of the test suite: proves nvcc, CCCL/CUB and the
// tropd include path work together for every architecture in CMAKE_CUDA_ARCHITECTURES.
#include "gpu/smoke.hpp"

#include <tropd/version.hpp>

#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include <vector>

namespace {

constexpr int block_threads = 256;

// out[i] = 2 * i, sum[0] = sum of 0..block_threads-1.
__global__ void smoke_kernel(int* out, int* sum) {
  using block_reduce = cub::BlockReduce<int, block_threads>;
  __shared__ typename block_reduce::TempStorage temp;
  const int i = static_cast<int>(threadIdx.x);
  out[i] = 2 * i;
  const int total = block_reduce(temp).Sum(i);
  if (i == 0) {
    sum[0] = total;
  }
}

}  // namespace

int tropd_gpu_smoke() {
  int* out = nullptr;
  int* sum = nullptr;
  cudaError_t status = cudaMalloc(&out, block_threads * sizeof(int));
  if (status == cudaSuccess) {
    status = cudaMalloc(&sum, sizeof(int));
  }
  std::vector<int> host_out(block_threads, -1);
  int host_sum = -1;
  if (status == cudaSuccess) {
    smoke_kernel<<<1, block_threads>>>(out, sum);
    status = cudaGetLastError();
  }
  if (status == cudaSuccess) {
    status = cudaMemcpy(host_out.data(), out, block_threads * sizeof(int), cudaMemcpyDeviceToHost);
  }
  if (status == cudaSuccess) {
    status = cudaMemcpy(&host_sum, sum, sizeof(int), cudaMemcpyDeviceToHost);
  }
  cudaFree(out);
  cudaFree(sum);
  if (status != cudaSuccess) {
    return static_cast<int>(status);
  }
  for (int i = 0; i < block_threads; ++i) {
    if (host_out[i] != 2 * i) {
      return -1;
    }
  }
  return host_sum == block_threads * (block_threads - 1) / 2 ? 0 : -1;
}
