// tropd/dist/nccl.cuh: NCCL adapters of dist::communicator.
//
//   tropd::dist::nccl_communicator tp{comm, stream};      // device buffers, enqueued on `stream`
//   tropd::dist::nccl_host_staging tps{{comm, stream}};   // host buffers through NCCL (copies)
//
// Both wrap the caller's ncclComm_t and cudaStream_t (tropd never calls ncclCommInitRank or
// ncclCommDestroy, and never creates a stream).
//
// nccl_communicator is a device_communicator: its collectives take device pointers, are
// enqueued on the caller's stream and return without synchronising (as a GPU engine needs).
// nccl_host_staging is a host_communicator for the host backend (dist/rows.hpp) on a machine
// whose ranks talk through NCCL only: it copies the host buffers into a device buffer of its
// own (allocated with cudaMalloc on first use, grown when needed, freed by its destructor: the
// one allocation the caller asks for by creating it), runs the collective on the stream and
// copies back, then synchronises the stream (every call does, and says so here).
//
// A .cuh because it needs the CUDA toolkit (headers and libraries), but host code only (no
// device code): nvcc or a host compiler with the toolkit's include path both work. It
// includes <cuda_runtime.h> and <nccl.h>; link cudart and NCCL (libnccl.so ships with the CUDA
// toolkit, e.g. under its lib/ directory, and with PyTorch's nvidia-nccl wheel). Where either
// header is missing it defines nothing but TROPD_HAS_NCCL = 0 (every tropd header compiles
// alone anywhere); with both it is 1.
#pragma once

#if !__has_include(<cuda_runtime.h>) || !__has_include(<nccl.h>)
#define TROPD_HAS_NCCL 0
#else
#define TROPD_HAS_NCCL 1

#include <cuda_runtime.h>
#include <nccl.h>

#include <stddef.h>

#include <tropd/core/status.hpp>
#include <tropd/dist/communicator.hpp>

namespace tropd::dist {

namespace detail {
inline ncclDataType_t nccl_type(element e) noexcept {
  switch (e) {
    case element::f64: return ncclFloat64;
    case element::f32: return ncclFloat32;
    case element::i64: return ncclInt64;
    case element::i32: return ncclInt32;
    case element::u8: return ncclUint8;
  }
  return ncclUint8;
}
inline ncclRedOp_t nccl_op(reduce_op op) noexcept {
  return op == reduce_op::sum ? ncclSum : (op == reduce_op::max ? ncclMax : ncclMin);
}
}  // namespace detail

/// NCCL over device buffers, enqueued on the caller's stream (no synchronisation).
struct nccl_communicator {
  ncclComm_t comm = nullptr;
  cudaStream_t stream_ = nullptr;

  static constexpr memory_space space = memory_space::device;

  cudaStream_t stream() const noexcept { return stream_; }
  int rank() const noexcept {
    int r = 0;
    ncclCommUserRank(comm, &r);
    return r;
  }
  int size() const noexcept {
    int s = 1;
    ncclCommCount(comm, &s);
    return s;
  }
  /// recv (device, size() * bytes) = every rank's send (device, bytes), in rank order.
  status all_gather(const void* send, void* recv, size_t bytes) noexcept {
    if (ncclAllGather(send, recv, bytes, ncclUint8, comm, stream_) != ncclSuccess)
      return make_error(errc::backend_error, "ncclAllGather failed");
    return {};
  }
  status all_reduce(const void* send, void* recv, size_t count, element e, reduce_op op) noexcept {
    if (ncclAllReduce(send, recv, count, detail::nccl_type(e), detail::nccl_op(op), comm, stream_) != ncclSuccess)
      return make_error(errc::backend_error, "ncclAllReduce failed");
    return {};
  }
};
static_assert(device_communicator<nccl_communicator>);

/// Host buffers through NCCL: host -> device copy, collective, device -> host copy, then a
/// synchronisation of the stream. Owns one device buffer (see the header comment).
struct nccl_host_staging {
  nccl_communicator nccl{};
  void* buffer = nullptr;
  size_t capacity = 0;

  static constexpr memory_space space = memory_space::host;

  nccl_host_staging() = default;
  explicit nccl_host_staging(nccl_communicator c) noexcept : nccl(c) {}
  nccl_host_staging(const nccl_host_staging&) = delete;
  nccl_host_staging& operator=(const nccl_host_staging&) = delete;
  ~nccl_host_staging() {
    if (buffer) cudaFree(buffer);
  }

  int rank() const noexcept { return nccl.rank(); }
  int size() const noexcept { return nccl.size(); }

  status all_gather(const void* send, void* recv, size_t bytes) noexcept {
    const size_t total = bytes * size_t(size());
    TROPD_TRY(reserve(bytes + total));
    char* dsend = static_cast<char*>(buffer);
    char* drecv = dsend + bytes;
    if (cudaMemcpyAsync(dsend, send, bytes, cudaMemcpyHostToDevice, nccl.stream()) != cudaSuccess)
      return make_error(errc::backend_error, "nccl_host_staging: cudaMemcpyAsync to the device failed");
    TROPD_TRY(nccl.all_gather(dsend, drecv, bytes));
    if (cudaMemcpyAsync(recv, drecv, total, cudaMemcpyDeviceToHost, nccl.stream()) != cudaSuccess)
      return make_error(errc::backend_error, "nccl_host_staging: cudaMemcpyAsync to the host failed");
    return sync();
  }
  status all_reduce(const void* send, void* recv, size_t count, element e, reduce_op op) noexcept {
    const size_t bytes = count * element_bytes(e);
    TROPD_TRY(reserve(bytes));
    if (cudaMemcpyAsync(buffer, send, bytes, cudaMemcpyHostToDevice, nccl.stream()) != cudaSuccess)
      return make_error(errc::backend_error, "nccl_host_staging: cudaMemcpyAsync to the device failed");
    TROPD_TRY(nccl.all_reduce(buffer, buffer, count, e, op));
    if (cudaMemcpyAsync(recv, buffer, bytes, cudaMemcpyDeviceToHost, nccl.stream()) != cudaSuccess)
      return make_error(errc::backend_error, "nccl_host_staging: cudaMemcpyAsync to the host failed");
    return sync();
  }

 private:
  status reserve(size_t bytes) noexcept {
    if (bytes <= capacity) return {};
    if (buffer) cudaFree(buffer);
    buffer = nullptr;
    capacity = 0;
    if (cudaMalloc(&buffer, bytes) != cudaSuccess) return make_error(errc::backend_error, "nccl_host_staging: cudaMalloc failed");
    capacity = bytes;
    return {};
  }
  status sync() noexcept {
    if (cudaStreamSynchronize(nccl.stream()) != cudaSuccess)
      return make_error(errc::backend_error, "nccl_host_staging: the stream failed");
    return {};
  }
};
static_assert(host_communicator<nccl_host_staging>);

}  // namespace tropd::dist

#endif  // __has_include(<cuda_runtime.h>) && __has_include(<nccl.h>)
