// tests/dist/nccl_check.cu: the NCCL adapters of include/tropd/dist/nccl.cuh, compiled by nvcc
// (sm_80, sm_90) and linked against NCCL. On a machine with a GPU it creates a one-rank NCCL
// communicator (the test's own: tropd never creates one) and checks, through both adapters,
// an all-gather of bytes and a typed all-reduce, then dist::evaluate_rows with the staging
// adapter as its tensor group (a group of one: no exchange) against host::evaluate_rows.
// Exit status: 0 pass, 1 fail, 77 no GPU (skipped).
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdio>

#include <tropd/dist/nccl.cuh>

namespace dist = tropd::dist;

int nccl_rows_check(ncclComm_t comm, cudaStream_t stream);  // nccl_rows.cpp

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("tropd-nccl-check: no CUDA device: skipped (the adapter compiled and linked)\n");
    return 77;
  }
  ncclComm_t comm;
  const int dev = 0;
  if (ncclCommInitAll(&comm, 1, &dev) != ncclSuccess) {
    std::printf("tropd-nccl-check: ncclCommInitAll failed\n");
    return 1;
  }
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  int bad = 0;

  // Device buffers through nccl_communicator.
  dist::nccl_communicator nc{comm, stream};
  static_assert(dist::device_communicator<dist::nccl_communicator>);
  double host_in[3] = {1.5, -2.0, 4.0}, host_out[3] = {0, 0, 0};
  double* d = nullptr;
  cudaMalloc(&d, 6 * sizeof(double));
  cudaMemcpy(d, host_in, sizeof host_in, cudaMemcpyHostToDevice);
  bad += !nc.all_gather(d, d + 3, 3 * sizeof(double)).ok();
  bad += !dist::all_reduce(nc, d + 3, d + 3, 3, dist::reduce_op::sum).ok();
  cudaStreamSynchronize(stream);
  cudaMemcpy(host_out, d + 3, sizeof host_out, cudaMemcpyDeviceToHost);
  for (int i = 0; i < 3; ++i) bad += host_out[i] != host_in[i];
  bad += nc.size() != 1 || nc.rank() != 0;
  cudaFree(d);

  // Host buffers through nccl_host_staging, and a sharded call driven by it (host code:
  // tests/dist/nccl_rows.cpp, compiled by the host compiler).
  bad += nccl_rows_check(comm, stream);

  cudaStreamDestroy(stream);
  ncclCommDestroy(comm);
  std::printf("tropd-nccl-check: %s\n", bad ? "FAILED" : "passed");
  return bad ? 1 : 0;
}
