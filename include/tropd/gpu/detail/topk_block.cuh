// tropd/gpu/detail/topk_block.cuh: the block-level top-k pieces of the row kernels:
//
//   block_check_list     every rule of a teacher top-k list (rules::check_topk_list order: per
//                        entry, a NaN / +inf log-prob, an id out of range, an id an earlier
//                        entry already has), O(K log^2 K) in shared memory (a sort of the
//                        (id, entry) pairs), not O(K^2) in global memory
//   block_select_topk    the teacher's top-k from its logits row, as host::select_topk selects
//                        them (larger scaled value first, ties to the lower id; V < K: padded
//                        with (-1, -inf)), in one read of the row (sort_rules.hpp)
//   block_tail_log       the tail bucket's exact log(1 - P_K) (host student_tail_log): the
//                        estimate from the listed log-probs where it is usable, else the row's
//                        mass outside the list summed directly
#pragma once

#include <stdint.h>

#include <tropd/core/numerics.hpp>
#include <tropd/core/token_rules.hpp>
#include <tropd/core/values.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/gpu/config.cuh>
#include <tropd/gpu/detail/block_ops.cuh>
#include <tropd/gpu/detail/sort_rules.hpp>
#include <tropd/gpu/detail/vector_io.cuh>

namespace tropd::gpu::detail {

/// Bytes of shared memory block_check_list needs for lists of K entries.
TROPD_HD constexpr size_t check_list_smem(int K) noexcept { return size_t(next_pow2(K > 0 ? K : 1)) * sizeof(uint64_t); }

/// The first error of a list (ids [K], teacher log-probs [K]) as list_error(entry, kind), or
/// list_error_none; valid in every thread. check_values: also NaN / +inf log-probs (row
/// level); V < 0: ids are only checked >= 0 (token level). keys: check_list_smem(K) bytes.
template <class Q>
__device__ int block_check_list(const int32_t* ids, const Q& teacher, int K, index_t V, bool check_values, uint64_t* keys) {
  const int n2 = next_pow2(K);
  int best = list_error_none;
  for (int e = static_cast<int>(threadIdx.x); e < n2; e += block_threads) {
    uint64_t key = list_key_none;
    if (e < K) {
      const double q = double(teacher[e]);
      const int32_t id = ids[e];
      if (check_values && rules::bad_value(q, true)) best = min_(best, list_error(e, 0));
      if (q != -inf<double>()) {  // padding entries are never checked
        if (id < 0 || (V >= 0 && id >= V)) best = min_(best, list_error(e, 1));
        key = list_key(id, e);
      }
    }
    keys[e] = key;
  }
  __syncthreads();
  block_bitonic_sort(keys, n2, [](uint64_t a, uint64_t b) { return a < b; });
  for (int k = static_cast<int>(threadIdx.x) + 1; k < n2; k += block_threads)
    if (keys[k] != list_key_none && list_key_id(keys[k]) == list_key_id(keys[k - 1])) best = min_(best, list_error(list_key_entry(keys[k]), 2));
  return block_all_reduce(best, min_op{});
}

/// The code and site of a list error found by block_check_list.
__device__ __forceinline__ void list_error_code(int err, errc& code, check_site& site, int& entry) {
  entry = err / 4;
  const int kind = err % 4;
  code = kind == 0 ? errc::non_finite_input : (kind == 1 ? errc::id_out_of_range : errc::duplicate_topk_id);
  site = kind == 0 ? check_site::topk_value : (kind == 1 ? check_site::topk_id_range : check_site::topk_duplicate);
}

/// Bytes of shared memory block_select_topk needs for K (the candidate buffer).
template <class W>
TROPD_HD constexpr size_t select_smem(int K) noexcept {
  return size_t(select_capacity(K)) * sizeof(select_key<W>);
}

/// The K strongest entries of a teacher row, scaled as pass 1 scales them on the host
/// (W(z) * W(1/T_T)), into ids[K] / vals[K] in descending order (ties: the lower id); V < K:
/// padded with (-1, -inf). buf: select_smem<W>(K) bytes. Every thread returns after the
/// outputs are written and visible to the block.
template <class W, class TT>
__device__ void block_select_topk(const TT* zt, index_t V, W itt, int K, select_key<W>* buf, int32_t* ids, W* vals) {
  __shared__ int count;
  __shared__ int have_thr;
  __shared__ select_key<W> thr;
  const int cap = select_capacity(K);
  if (threadIdx.x == 0) {
    count = 0;
    have_thr = 0;
  }
  __syncthreads();
  for (index_t t0 = 0; t0 < V; t0 += select_tile) {
    const bool have = have_thr != 0;
    const select_key<W> th = thr;
#pragma unroll
    for (int e = 0; e < select_tile / block_threads; ++e) {
      const index_t j = t0 + threadIdx.x + index_t(e) * block_threads;
      if (j >= V) break;
      const select_key<W> key = select_key<W>::make(widen<W>(zt[j]) * itt, static_cast<int32_t>(j));
      if (!have || th < key) buf[atomicAdd(&count, 1)] = key;
    }
    __syncthreads();
    const int n = count;  // the same in every thread
    if (n > cap - select_tile) {  // keep the K strongest; the weakest of them is the new threshold
      const int n2 = next_pow2(n);
      for (int i = n + static_cast<int>(threadIdx.x); i < n2; i += block_threads) buf[i] = select_key<W>{};
      __syncthreads();
      block_bitonic_sort(buf, n2, stronger_first{});
      if (threadIdx.x == 0) {
        thr = buf[K - 1];
        have_thr = 1;
        count = K;
      }
    }
    __syncthreads();
  }
  const int n = count;
  const int n2 = next_pow2(n > 0 ? n : 1);
  for (int i = n + static_cast<int>(threadIdx.x); i < n2; i += block_threads) buf[i] = select_key<W>{};
  __syncthreads();
  block_bitonic_sort(buf, n2, stronger_first{});
  for (int i = static_cast<int>(threadIdx.x); i < K; i += block_threads) {
    if (i < n) {
      ids[i] = buf[i].id();
      vals[i] = buf[i].value();
    } else {
      ids[i] = -1;
      vals[i] = -inf<W>();
    }
  }
  __syncthreads();
}

struct lse_merge {
  __device__ __forceinline__ lse_state<double> operator()(lse_state<double> a, const lse_state<double>& b) const {
    a.merge(b);
    return a;
  }
};

/// Bytes of shared memory block_tail_log needs for K.
TROPD_HD constexpr size_t tail_smem(int K) noexcept { return size_t(next_pow2(K > 0 ? K : 1)) * sizeof(int32_t); }

/// log(1 - P_K) of a student row for the list ids[K] (entries whose teacher log-prob lq is -inf
/// are padding), the host's student_tail_log: the estimate log1mexp(logsumexp of the listed
/// log-probs) where estimators::tail_estimate_usable says it is accurate, else the log-mass of
/// the entries outside the list summed from the row (-inf when there is none). sorted:
/// tail_smem(K) bytes. Valid in every thread.
template <class W, class TS>
__device__ double block_tail_log(const TS* zs, index_t V, W its, double lse_s, const int32_t* ids, const double* lq, int K,
                                 int32_t* sorted) {
  lse_state<double> st;
  int n_listed = 0;
  for (int e = static_cast<int>(threadIdx.x); e < K; e += block_threads)
    if (lq[e] != -inf<double>()) {
      st.push(rules::log_prob_at(zs, ids[e], its, lse_s));
      ++n_listed;
    }
  const lse_state<double> all = block_all_reduce(st, lse_merge{});
  n_listed = block_all_reduce(n_listed, sum_op{});
  const double est = log1mexp(min_(all.value(), 0.0));
  if (estimators::tail_estimate_usable(est, n_listed, lse_s)) return est;
  // The direct sum: the listed ids sorted, every other finite entry of the row summed.
  const int n2 = next_pow2(K);
  for (int e = static_cast<int>(threadIdx.x); e < n2; e += block_threads)
    sorted[e] = (e < K && lq[e] != -inf<double>()) ? ids[e] : 0x7fffffff;
  __syncthreads();
  block_bitonic_sort(sorted, n2, [](int32_t a, int32_t b) { return a < b; });
  lse_state<double> out;
  for (index_t j = threadIdx.x; j < V; j += block_threads) {
    int lo = 0, hi = n_listed;  // is j listed? (binary search over the sorted ids)
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (sorted[mid] < j) lo = mid + 1;
      else hi = mid;
    }
    if (lo < n_listed && sorted[lo] == j) continue;
    const W x = widen<W>(zs[j]) * its;
    if (x > -inf<W>()) out.push(double(x));
  }
  const lse_state<double> rest = block_all_reduce(out, lse_merge{});
  return rest.m == -inf<double>() ? -inf<double>() : rest.value() - lse_s;
}

}  // namespace tropd::gpu::detail
