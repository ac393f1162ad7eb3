// tropd/gpu/detail/objective_kernels.cuh: the row kernels of the row-level objective
// (gpu::evaluate_rows), around the token stages (gpu/detail/token_kernels.cuh):
//
//   objective_rows_kernel    per row: the token id's range, pass 1 (or the merge of the split
//                            path's partials), input_policy::mask for bad rows, the dense term's
//                            finiteness and pass 1b, the per-token arrays in double (s, t,
//                            entropies, KL, the summary, the dense value)
//   objective_topk_kernel    per student row: the given list's checks and gather, or the teacher's
//                            top-k selected from its logits; the student's log-probs at the ids;
//                            the tail bucket's exact student tail
//   objective_grad_kernel    per row (or block of a row): the row's sparse terms from the token
//                            stages' results (core/sparse_terms.hpp), then pass 2
// The data flow mirrors host::evaluate_rows; nothing is copied to the host.
#pragma once

#include <stdint.h>

#include <type_traits>

#include <tropd/core/numerics.hpp>
#include <tropd/core/sparse_terms.hpp>
#include <tropd/core/token_rules.hpp>
#include <tropd/core/values.hpp>
#include <tropd/estimators/row_moments.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/gpu/config.cuh>
#include <tropd/gpu/detail/block_ops.cuh>
#include <tropd/gpu/detail/row_passes.cuh>
#include <tropd/gpu/detail/row_rules.hpp>
#include <tropd/gpu/detail/token_kernels.cuh>
#include <tropd/gpu/detail/topk_block.cuh>
#include <tropd/gpu/status_word.cuh>
#include <tropd/objective.hpp>

namespace tropd::gpu::detail {

/// evaluate_rows' per-row arrays in scratch (device pointers; [n] unless noted).
struct row_arrays {
  double *s = nullptr, *t = nullptr, *ent_s = nullptr, *ent_t = nullptr, *rkl = nullptr;
  double* dense_value = nullptr;           ///< the dense divergence of the row (dense objectives)
  estimators::row_summary* sums = nullptr;
  origin* from = nullptr;                  ///< the rows' tags after input_policy::mask
  uint8_t* ok = nullptr;                   ///< the row's statistics are valid
  int32_t* topk_ids = nullptr;             ///< [n x K] -1: padding
  double* topk_teacher = nullptr;          ///< [n x K] -inf: padding
  double* topk_student = nullptr;          ///< [n x K]
  double* tail = nullptr;                  ///< [n] exact log(1 - P_K) (tail bucket), NaN: unknown
  pass1_partial* parts = nullptr;          ///< [n x S] split path
  sum2* sums2 = nullptr;                   ///< [n x S] split path, pass 1b
};

/// The arguments of the objective's row kernels.
template <class TS, class TT>
struct objective_args {
  const TS* zs = nullptr;
  index_t zs_stride = 0;
  const TT* zt = nullptr;  ///< nullptr: a served teacher (its log-probs in t_given)
  index_t zt_stride = 0;
  values_view t_given{};
  index_t n = 0, V = 0, K = 0;
  double its = 1, itt = 1, ts = 1;
  const int32_t* ids = nullptr;
  const origin* from = nullptr;  ///< the caller's tags
  bool mask = false;             ///< input_policy::mask
  uint64_t* status = nullptr;
  unsigned long long* counters = nullptr;  ///< token_scratch::counters ([1]: masked rows)

  __device__ const TS* student(index_t r) const { return zs + r * zs_stride; }
  __device__ const TT* teacher(index_t r) const { return zt ? zt + r * zt_stride : nullptr; }
};

/// The dense divergence of an objective (or no_dense).
template <class Obj>
using dense_of = std::conditional_t<Obj::has_dense, typename Obj::dense_type, no_dense>;
template <class Obj>
__device__ __forceinline__ dense_of<Obj> dense_estimator(const Obj& obj) {
  if constexpr (Obj::has_dense)
    return obj.dense;
  else
    return no_dense{};
}

/// A moments_needed value as a type (kernel templates take types: nvcc's host stubs cannot
/// spell a class-type template argument of a __global__ function).
template <estimators::moments_needed M>
struct moments_tag {
  static constexpr estimators::moments_needed value = M;
};

/// Split path, pass 1 (grid n x S): block (r, b)'s partial.
template <class Mt, bool Logits, class TS, class TT>
__global__ void __launch_bounds__(block_threads) objective_pass1_kernel(objective_args<TS, TT> a, row_arrays ra, int S) {
  using W = work_type_t<TS, TT>;
  constexpr estimators::moments_needed M = Mt::value;
  const index_t r = blockIdx.x / S;
  const int b = static_cast<int>(blockIdx.x % S);
  const pass1_partial p = block_pass1<W, Logits, M>(a.student(r), a.teacher(r), a.V, a.its, a.itt, b, S);
  if (threadIdx.x == 0) ra.parts[r * S + b] = p;
}

/// Per row: pass 1 (S = 1) or the merge of S partials (S > 1), then what the row gives the
/// token batch (host evaluate_rows' first loop). Grid: n.
template <class Obj, class Mt, bool Logits, class TS, class TT>
__global__ void __launch_bounds__(block_threads) objective_rows_kernel(Obj obj, objective_args<TS, TT> a, row_arrays ra, int S) {
  using W = work_type_t<TS, TT>;
  constexpr estimators::moments_needed M = Mt::value;
  __shared__ estimators::row_summary sm;
  __shared__ int ok, masked, second;
  const index_t r = blockIdx.x;
  const int32_t y = a.ids[r];
  const origin from = a.from[r];
  pass1_partial p;
  if (S == 1) {
    p = block_pass1<W, Logits, M>(a.student(r), a.teacher(r), a.V, a.its, a.itt, 0, 1);
  } else {
    for (int b = static_cast<int>(threadIdx.x); b < S; b += block_threads) p.merge(ra.parts[r * S + b]);
    p = block_all_reduce(p, merge_pass1{});
  }
  if (threadIdx.x == 0) {
    ok = 1;
    masked = 0;
    second = 0;
    if (y < 0 || y >= a.V) {
      report(a.status, check_stage::token_ids, errc::id_out_of_range, check_site::token_id, r, y < 0 ? -1 : y);
      ok = 0;
    }
    estimators::row_summary s{};
    const pass1_verdict v = row_pass1_status<M>(p, Logits, s);
    sm = s;
    if (v.code != errc::ok) {
      if (a.mask && (v.code == errc::non_finite_input || v.code == errc::no_finite_entry)) {
        masked = 1;  // the row becomes a prompt row
        if (from != origin::prompt) atomicAdd(&a.counters[1], 1ull);
      } else {
        report(a.status, check_stage::rows, v.code, v.site, r, v.col);
      }
      ok = 0;
    }
    if constexpr (Obj::has_dense && Logits) {
      if (ok && from != origin::prompt) {
        if (!obj.dense.finite(s)) {
          report(a.status, check_stage::rows, errc::infinite_divergence, check_site::divergence, r, -1);
          ok = 0;
        } else {
          second = Obj::dense_type::second_pass ? 1 : 0;
        }
      }
    }
  }
  __syncthreads();
  if constexpr (Obj::has_dense && Logits) {
    if constexpr (Obj::dense_type::second_pass) {
      if (second && S == 1) {  // uniform
        const sum2 s2 = block_second<W>(obj.dense, a.student(r), a.teacher(r), a.V, a.its, a.itt, sm, 0, 1);
        if (threadIdx.x == 0) {
          sm.second[0] = s2.v0;
          sm.second[1] = s2.v1;
        }
        __syncthreads();
      }
    }
  }
  if (threadIdx.x != 0) return;
  const estimators::row_summary s = sm;
  const bool valid = ok && y >= 0 && y < a.V;
  ra.ok[r] = valid ? (second && S > 1 ? 2 : 1) : 0;  // 2: pass 1b still to run (split path)
  ra.from[r] = masked ? origin::prompt : from;
  ra.sums[r] = s;
  ra.s[r] = valid ? rules::log_prob_at(a.student(r), y, W(a.its), s.lse_s) : 0.0;
  if constexpr (Logits) {
    ra.t[r] = valid ? rules::log_prob_at(a.teacher(r), y, W(a.itt), s.lse_t) : 0.0;
    ra.ent_t[r] = s.ent_t;
    ra.rkl[r] = s.rkl;  // may be +inf: the rule that reads it decides
  } else {
    ra.t[r] = a.t_given[r];
    ra.ent_t[r] = quiet_nan<double>();
    ra.rkl[r] = quiet_nan<double>();
  }
  ra.ent_s[r] = s.ent_s;
  if constexpr (Obj::has_dense) ra.dense_value[r] = valid && from != origin::prompt ? obj.dense.value(s) : 0.0;
  if (valid && from != origin::prompt && ra.s[r] == -inf<double>())
    report(a.status, check_stage::rows, errc::infinite_divergence, check_site::student_zero_mass, r, y);
}

/// Split path, pass 1b of a dense second-pass term (grid n x S).
template <class Obj, class TS, class TT>
__global__ void __launch_bounds__(block_threads) objective_second_kernel(Obj obj, objective_args<TS, TT> a, row_arrays ra, int S) {
  using W = work_type_t<TS, TT>;
  const index_t r = blockIdx.x / S;
  const int b = static_cast<int>(blockIdx.x % S);
  if (ra.ok[r] != 2) return;  // uniform
  if constexpr (Obj::has_dense) {
    const sum2 s2 = block_second<W>(obj.dense, a.student(r), a.teacher(r), a.V, a.its, a.itt, ra.sums[r], b, S);
    if (threadIdx.x == 0) ra.sums2[r * S + b] = s2;
  }
}

/// Split path, after pass 1b (a thread per row): the sums, the dense value.
template <class Obj, class TS, class TT>
__global__ void __launch_bounds__(block_threads) objective_second_finish_kernel(Obj obj, objective_args<TS, TT> a, row_arrays ra, int S) {
  const index_t r = index_t(blockIdx.x) * block_threads + threadIdx.x;
  if (r >= a.n || ra.ok[r] != 2) return;
  if constexpr (Obj::has_dense) {
    double s0 = 0, s1 = 0;
    for (int b = 0; b < S; ++b) {
      s0 += ra.sums2[r * S + b].v0;
      s1 += ra.sums2[r * S + b].v1;
    }
    ra.sums[r].second[0] = s0;
    ra.sums[r].second[1] = s1;
    ra.dense_value[r] = obj.dense.value(ra.sums[r]);
  }
  ra.ok[r] = 1;
}

/// Shared memory of objective_topk_kernel for K (work type W).
template <class W>
TROPD_HD constexpr size_t objective_topk_smem(int K, bool selected, bool tail) noexcept {
  size_t area = selected ? select_smem<W>(K) : check_list_smem(K);
  if (tail && tail_smem(K) > area) area = tail_smem(K);
  return (size_t(K) * sizeof(W) + 15) / 16 * 16 + area;
}

/// Per row (grid n): the top-k list of a student row and the student's log-probs at its ids
/// (host evaluate_rows' list part): given lists are checked (every rule, rows the caller tagged
/// student) and gathered, or the teacher's top-k is selected from its logits; padding entries
/// get id -1, teacher -inf, student 0; rows that are not (unmasked) student rows get padding.
template <class Obj, bool Logits, bool Selected, class TS, class TT>
__global__ void __launch_bounds__(block_threads) objective_topk_kernel(Obj obj, objective_args<TS, TT> a, row_arrays ra, topk_lists lists) {
  using W = work_type_t<TS, TT>;
  extern __shared__ __align__(16) unsigned char dyn[];
  const index_t r = blockIdx.x;
  const int K = static_cast<int>(a.K);
  int32_t* ids = ra.topk_ids + r * K;
  double* lq = ra.topk_teacher + r * K;
  double* ls = ra.topk_student + r * K;
  W* vals = reinterpret_cast<W*>(dyn);
  unsigned char* area = dyn + (size_t(K) * sizeof(W) + 15) / 16 * 16;
  if constexpr (!Selected) {
    if (a.from[r] == origin::student) {  // uniform; the host checks the lists before anything else
      const int err = block_check_list(lists.ids.row(r), lists.logprobs.row(r), K, a.V, true, reinterpret_cast<uint64_t*>(area));
      if (err != list_error_none && threadIdx.x == 0) {
        errc code;
        check_site site;
        int entry;
        list_error_code(err, code, site, entry);
        report(a.status, check_stage::arguments, code, site, r, entry);
      }
      __syncthreads();
    }
  }
  const bool use = ra.from[r] == origin::student && ra.ok[r] != 0;  // uniform
  if (!use) {
    for (int k = static_cast<int>(threadIdx.x); k < K; k += block_threads) {
      ids[k] = -1;
      lq[k] = -inf<double>();
      ls[k] = 0.0;
    }
    if (threadIdx.x == 0 && ra.tail) ra.tail[r] = quiet_nan<double>();
    return;
  }
  const estimators::row_summary s = ra.sums[r];
  if constexpr (Selected) {
    block_select_topk<W>(a.teacher(r), a.V, W(a.itt), K, reinterpret_cast<select_key<W>*>(area), ids, vals);
    for (int k = static_cast<int>(threadIdx.x); k < K; k += block_threads) lq[k] = ids[k] < 0 ? -inf<double>() : double(vals[k]) - s.lse_t;
  } else {
    const values_row lp = lists.logprobs.row(r);
    for (int k = static_cast<int>(threadIdx.x); k < K; k += block_threads) {
      lq[k] = lp[k];
      ids[k] = lq[k] == -inf<double>() ? -1 : lists.ids(r, k);
    }
  }
  __syncthreads();
  for (int k = static_cast<int>(threadIdx.x); k < K; k += block_threads)
    ls[k] = lq[k] == -inf<double>() ? 0.0 : rules::log_prob_at(a.student(r), ids[k], W(a.its), s.lse_s);
  __syncthreads();
  if (ra.tail) {
    const double tail = block_tail_log<W>(a.student(r), a.V, W(a.its), s.lse_s, ids, lq, K, reinterpret_cast<int32_t*>(area));
    if (threadIdx.x == 0) ra.tail[r] = tail;
  }
  (void)obj;
}

/// Pass 2 of the objective (grid n x S): dL/dz_r = w_r / T_S (dense_weight dense_r + the row's
/// sparse terms), built from the token stages' results as host evaluate_rows builds them; a
/// dense objective's prompt rows are exact zeros. Where an earlier stage failed: NaN rows.
/// Dynamic shared memory: (K + 1) x 12 bytes.
template <class Obj, bool Logits, class TS, class TT, class G>
__global__ void __launch_bounds__(block_threads) objective_grad_kernel(Obj obj, objective_args<TS, TT> a, row_arrays ra, token_scratch sc,
                                                                        double dense_weight, matrix_view<G> grad, int S) {
  using W = work_type_t<TS, TT>;
  using Est = std::conditional_t<Obj::has_dense && Logits, dense_of<Obj>, no_dense>;
  extern __shared__ __align__(16) unsigned char dyn[];
  __shared__ grad_coefs c;
  __shared__ sparse_terms sp;
  __shared__ int row_ok;
  const index_t r = blockIdx.x / S;
  const int b = static_cast<int>(blockIdx.x % S);
  const int K = static_cast<int>(a.K);
  double* coef = reinterpret_cast<double*>(dyn);
  int32_t* sids = reinterpret_cast<int32_t*>(coef + K + 1);
  if (threadIdx.x == 0) {
    row_ok = !failed(a.status);
    if (row_ok) {
      const token_record rec = sc.rec[r];
      sp = build_sparse_terms(ra.topk_ids + r * K, values_row{ra.topk_teacher + r * K, scalar_type::f64},
                              rec.topk_grad ? sc.g_topk + r * K : nullptr, K, rec.tail_coef, rec.tail_teacher, a.ids[r], rec.dloss_ds, sids, coef);
      double scale = sc.w[r] / a.ts;
      double dw = 0;
      if constexpr (Obj::has_dense && Logits) {
        if (ra.from[r] != origin::prompt) dw = dense_weight;
        else scale = 0.0;
      }
      c = make_grad_coefs(sp, scale, dw);
    }
  }
  __syncthreads();
  Est est{};
  if constexpr (!std::is_same_v<Est, no_dense>) est = dense_estimator(obj);
  block_grad<W>(est, a.student(r), Logits ? a.teacher(r) : static_cast<const TT*>(nullptr), grad.row(r), a.V, a.its, a.itt, ra.sums[r], sp, c,
                row_ok != 0, b, S, a.status, r);
}

}  // namespace tropd::gpu::detail
