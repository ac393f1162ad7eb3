// tropd/gpu/detail/block_ops.cuh: the block-wide collectives the kernels share: reductions of
// any mergeable value (CUB BlockReduce), a block-wide flag, and a bitonic sort in shared memory
// (the top-k list checks and selection). Every function is called by every thread of the
// block and ends with a barrier unless noted.
#pragma once

#include <stdint.h>

#include <cub/block/block_reduce.cuh>

#include <tropd/gpu/config.cuh>
#include <tropd/gpu/detail/sort_rules.hpp>

namespace tropd::gpu::detail {

/// Reduces v over the block with op; the result is valid in every thread (broadcast through
/// shared memory). `storage` may be reused after the call.
template <class T, class Op>
__device__ __forceinline__ T block_all_reduce(T v, Op op) {
  using reduce_t = cub::BlockReduce<T, block_threads>;
  __shared__ typename reduce_t::TempStorage storage;
  __shared__ T result;
  const T r = reduce_t(storage).Reduce(v, op);
  if (threadIdx.x == 0) result = r;
  __syncthreads();
  const T out = result;
  __syncthreads();
  return out;
}

struct min_op {
  template <class T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b < a ? b : a; }
};
struct sum_op {
  template <class T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct or_op {
  __device__ __forceinline__ int operator()(int a, int b) const { return a | b; }
};

/// Whether any thread of the block passes true.
__device__ __forceinline__ bool block_any(bool x) { return __syncthreads_or(x ? 1 : 0) != 0; }

/// Sorts a[0, n2) (n2 a power of two) in shared memory so that less(a[i + 1], a[i]) never
/// holds (ascending in `less`). Ends with a barrier.
template <class Key, class Less>
__device__ void block_bitonic_sort(Key* a, int n2, Less less) {
  for (int k = 2; k <= n2; k <<= 1)
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = static_cast<int>(threadIdx.x); i < n2; i += block_threads) bitonic_step(a, k, j, i, less);
      __syncthreads();
    }
}

}  // namespace tropd::gpu::detail
