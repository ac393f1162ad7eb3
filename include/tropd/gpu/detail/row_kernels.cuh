// tropd/gpu/detail/row_kernels.cuh: the kernels of the row functions (gpu/rows.cuh) and the
// per-row tasks that make them one estimator each.
//
// A row's work, whatever the estimator: argument checks (task.prepare) -> pass 1 -> what the
// row derives from its statistics (task.after_pass1: the divergence's finiteness, the sampled
// token's log-probs and estimator, the top-k list's selection / gather / evaluation) -> pass
// 1b (second-pass divergences) -> the loss, the summary and the gradient coefficients
// (publish) -> pass 2. Two paths run the same block functions:
//
//   row_per_block  one block per row, every stage in one kernel (grid: rows); the row's state
//                  and sparse list live in shared memory
//   split          S blocks per row: pass-1 partials -> one block per row finishes the row
//                  (state and sparse list to scratch) -> [pass 1b partials -> finish] -> pass 2
#pragma once

#include <stdint.h>

#include <type_traits>

#include <tropd/core/numerics.hpp>
#include <tropd/core/sparse_terms.hpp>
#include <tropd/core/token_rules.hpp>
#include <tropd/core/types.hpp>
#include <tropd/core/values.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/row_moments.hpp>
#include <tropd/estimators/sampled.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/gpu/config.cuh>
#include <tropd/gpu/detail/block_ops.cuh>
#include <tropd/gpu/detail/row_passes.cuh>
#include <tropd/gpu/detail/row_rules.hpp>
#include <tropd/gpu/detail/topk_block.cuh>
#include <tropd/gpu/status_word.cuh>

namespace tropd::gpu::detail {

/// The arguments every row kernel takes (device pointers; strides in elements).
template <class TS, class TT, class G>
struct row_args {
  const TS* zs = nullptr;
  index_t zs_stride = 0;
  const TT* zt = nullptr;  ///< nullptr for student-only tasks
  index_t zt_stride = 0;
  index_t rows = 0, V = 0;
  double its = 1, itt = 1;  ///< 1 / T_S, 1 / T_T
  double ts = 1;            ///< T_S
  G* grad = nullptr;        ///< nullptr: value only
  index_t grad_stride = 0;
  const double* grad_scale = nullptr;
  double* loss = nullptr;
  estimators::row_summary* summaries = nullptr;
  uint64_t* status = nullptr;

  __device__ const TS* student(index_t r) const { return zs + r * zs_stride; }
  __device__ const TT* teacher(index_t r) const { return zt ? zt + r * zt_stride : nullptr; }
  __device__ G* grad_row(index_t r) const { return grad + r * grad_stride; }
};

/// A row's state between its stages.
struct row_state {
  estimators::row_summary s{};
  double value = 0;  ///< the row's loss
  int ok = 0;        ///< statistics valid and every check passed
  int n_sparse = 0, n_listed = 0;
  double tail_coef = 0, tail_teacher = 0;
  grad_coefs c{};
};

/// The sparse list of a row as core/sparse_terms.hpp sees it.
__device__ __forceinline__ sparse_terms sparse_of(const row_state& st, const int32_t* ids, const double* coef) {
  sparse_terms sp;
  sp.ids = ids;
  sp.coef = coef;
  sp.n = st.n_sparse;
  sp.n_listed = st.n_listed;
  sp.tail_coef = st.tail_coef;
  sp.tail_teacher = st.tail_teacher;
  return sp;
}

/// A task's shared-memory work area and the row's sparse list (row_per_block) or only the work
/// area (the split path's finish kernel; the list goes to scratch).
struct task_smem {
  unsigned char* work = nullptr;
  int32_t* sp_ids = nullptr;
  double* sp_coef = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Tasks
// ---------------------------------------------------------------------------------------------

/// divergence_rows: a full-vocabulary divergence. M: the moments pass 1 computes.
template <class Est, estimators::moments_needed M>
struct dense_task {
  using est_type = Est;
  static constexpr bool has_teacher = true, second = Est::second_pass;
  static constexpr estimators::moments_needed moments = M;
  static constexpr double dense_weight = 1.0;
  Est est{};
  TROPD_HD int max_sparse() const { return 0; }
  TROPD_HD size_t work_bytes() const { return 0; }
  template <class A>
  __device__ void prepare(const A&, index_t, row_state&, const task_smem&) const {}
  template <class W, class A>
  __device__ void after_pass1(const A& a, index_t r, row_state& st, const task_smem&) const {
    if (threadIdx.x == 0 && st.ok) {
      if (!est.finite(st.s)) {
        report(a.status, check_stage::rows, errc::infinite_divergence, check_site::divergence, r, -1);
        st.ok = 0;
      } else if constexpr (!Est::second_pass) {
        st.value = est.value(st.s);
      }
    }
    __syncthreads();
  }
};

/// sampled_rows: sampled<E, U> at the rows' token ids with full teacher logits.
template <class E, class U>
struct sampled_task {
  using est_type = no_dense;
  static constexpr bool has_teacher = true, second = false;
  static constexpr estimators::moments_needed moments = estimators::lse_only;
  static constexpr double dense_weight = 0.0;
  estimators::sampled<E, U> est{};
  const int32_t* ids = nullptr;
  const double* s_old = nullptr;
  TROPD_HD int max_sparse() const { return 1; }
  TROPD_HD size_t work_bytes() const { return 0; }
  template <class A>
  __device__ void prepare(const A& a, index_t r, row_state& st, const task_smem&) const {
    if (threadIdx.x == 0) {
      const int32_t y = ids[r];
      if (y < 0 || y >= a.V) {
        report(a.status, check_stage::token_ids, errc::id_out_of_range, check_site::token_id, r, y < 0 ? -1 : y);
        st.ok = 0;
      }
      if (s_old && !is_finite(s_old[r])) {
        report(a.status, check_stage::arguments, errc::non_finite_input, check_site::s_old, r, -1);
        st.ok = 0;
      }
    }
    __syncthreads();
  }
  template <class W, class A>
  __device__ void after_pass1(const A& a, index_t r, row_state& st, const task_smem& sm) const {
    if (threadIdx.x == 0 && st.ok) {
      const int32_t y = ids[r];
      const double sy = rules::log_prob_at(a.student(r), y, W(a.its), st.s.lse_s);
      const double ty = rules::log_prob_at(a.teacher(r), y, W(a.itt), st.s.lse_t);
      if (sy == -inf<double>()) {
        report(a.status, check_stage::rows, errc::infinite_divergence, check_site::student_zero_mass, r, y);
        st.ok = 0;
      } else if (ty == -inf<double>()) {
        report(a.status, check_stage::rows, errc::infinite_divergence, check_site::teacher_zero_mass, r, y);
        st.ok = 0;
      } else {
        const estimators::sampled_result v = est(sy, s_old ? s_old[r] : sy, ty);
        if (!is_finite(v.loss) || !is_finite(v.dloss_ds)) {
          report(a.status, check_stage::rows, errc::infinite_divergence, check_site::estimator, r, y);
          st.ok = 0;
        } else {
          st.value = v.loss;
          sm.sp_ids[0] = y;
          sm.sp_coef[0] = v.dloss_ds;
          st.n_sparse = 1;
          st.n_listed = 0;
        }
      }
    }
    __syncthreads();
  }
};

/// topk_forward_kl_rows: teacher top-k forward KL, the lists given (Selected = false: ids and
/// log-probs [rows x K]) or selected from the teacher logits (Selected = true, K = min(k, V)).
template <bool Selected, class W>
struct topk_task {
  using est_type = no_dense;
  static constexpr bool has_teacher = Selected, second = false;
  static constexpr estimators::moments_needed moments = estimators::lse_only;
  static constexpr double dense_weight = 0.0;
  estimators::topk_forward_kl est{};
  int K = 0;
  matrix_view<const int32_t> ids{};  ///< given lists
  values_matrix logprobs{};

  TROPD_HD int max_sparse() const { return K; }
  // Work area: ids int32[K], values W[K] (selection), lq, ls, g double[K], then the scratch
  // of the list check / selection / tail sum (they run one after the other).
  TROPD_HD size_t arrays_bytes() const { return (size_t(K) * (4 + sizeof(W) + 24) + 15) / 16 * 16; }
  TROPD_HD size_t work_bytes() const {
    size_t area = Selected ? select_smem<W>(K) : check_list_smem(K);
    if (est.tail == estimators::topk_tail::tail_bucket && tail_smem(K) > area) area = tail_smem(K);
    return arrays_bytes() + area;
  }
  struct arrays {
    int32_t* ids;
    W* vals;
    double *lq, *ls, *g;
    unsigned char* area;
  };
  __device__ arrays carve(unsigned char* w) const {
    arrays x;
    x.lq = reinterpret_cast<double*>(w);
    x.ls = x.lq + K;
    x.g = x.ls + K;
    x.vals = reinterpret_cast<W*>(x.g + K);
    x.ids = reinterpret_cast<int32_t*>(x.vals + K);
    x.area = w + arrays_bytes();
    return x;
  }
  template <class A>
  __device__ void prepare(const A& a, index_t r, row_state& st, const task_smem& sm) const {
    if constexpr (!Selected) {
      const arrays x = carve(sm.work);
      const int err = block_check_list(ids.row(r), logprobs.row(r), K, a.V, true, reinterpret_cast<uint64_t*>(x.area));
      if (err != list_error_none) {
        if (threadIdx.x == 0) {
          errc code;
          check_site site;
          int entry;
          list_error_code(err, code, site, entry);
          report(a.status, check_stage::arguments, code, site, r, entry);
          st.ok = 0;
        }
      }
      __syncthreads();
    }
  }
  template <class, class A>
  __device__ void after_pass1(const A& a, index_t r, row_state& st, const task_smem& sm) const {
    if (!st.ok) return;  // uniform
    const arrays x = carve(sm.work);
    const auto* zs = a.student(r);
    if constexpr (Selected) {
      block_select_topk<W>(a.teacher(r), a.V, W(a.itt), K, reinterpret_cast<select_key<W>*>(x.area), x.ids, x.vals);
      for (int i = static_cast<int>(threadIdx.x); i < K; i += block_threads)
        x.lq[i] = x.ids[i] < 0 ? -inf<double>() : double(x.vals[i]) - st.s.lse_t;
    } else {
      const values_row lp = logprobs.row(r);
      for (int i = static_cast<int>(threadIdx.x); i < K; i += block_threads) {
        x.lq[i] = lp[i];
        x.ids[i] = ids(r, i);
      }
    }
    __syncthreads();
    for (int i = static_cast<int>(threadIdx.x); i < K; i += block_threads)
      x.ls[i] = x.lq[i] == -inf<double>() ? 0.0 : rules::log_prob_at(zs, x.ids[i], W(a.its), st.s.lse_s);
    __syncthreads();
    double tail = quiet_nan<double>();
    if (est.tail == estimators::topk_tail::tail_bucket)
      tail = block_tail_log<W>(zs, a.V, W(a.its), st.s.lse_s, x.ids, x.lq, K, reinterpret_cast<int32_t*>(x.area));
    if (threadIdx.x == 0) {
      const estimators::topk_result res = est.eval(x.lq, x.ls, K, x.g, tail);
      if (!res.st.ok()) {
        report(a.status, check_stage::rows, res.st.code, check_site::topk_eval, r, res.st.col);
        st.ok = 0;
      } else {
        st.value = res.value;
        const sparse_terms sp = build_sparse_terms(x.ids, values_row{x.lq, scalar_type::f64}, x.g, K, res.tail_coef, res.tail_teacher, -1,
                                                   0.0, sm.sp_ids, sm.sp_coef);
        st.n_sparse = sp.n;
        st.n_listed = sp.n_listed;
        st.tail_coef = sp.tail_coef;
        st.tail_teacher = sp.tail_teacher;
      }
    }
    __syncthreads();
  }
};

template <class Task, class TS, class TT>
using task_work_t = work_type_t<TS, std::conditional_t<Task::has_teacher, TT, TS>>;

/// The estimator pass 1b and pass 2 evaluate: the divergence of a dense task, no_dense otherwise.
template <class Task>
__device__ __forceinline__ typename Task::est_type dense_estimator_of(const Task& t) {
  if constexpr (std::is_same_v<typename Task::est_type, no_dense>)
    return no_dense{};
  else
    return t.est;
}

// ---------------------------------------------------------------------------------------------
// Stages shared by both paths
// ---------------------------------------------------------------------------------------------

/// The row's state before pass 1: grad_scale's check (every row function's first), then the
/// task's argument checks. Block-cooperative.
template <class Task, class A>
__device__ void row_prepare(const Task& t, const A& a, index_t r, row_state& st, const task_smem& sm) {
  if (threadIdx.x == 0) {
    st = row_state{};
    st.ok = 1;
    if (a.grad_scale && !is_finite(a.grad_scale[r])) {
      report(a.status, check_stage::grad_scale, errc::non_finite_input, check_site::grad_scale, r, -1);
      st.ok = 0;
    }
  }
  __syncthreads();
  t.prepare(a, r, st, sm);
}

/// The row's verdict from its merged pass-1 result (thread 0).
template <class Task, class A>
__device__ void row_verdict(const A& a, index_t r, const pass1_partial& p, row_state& st) {
  estimators::row_summary s{};
  const pass1_verdict v = row_pass1_status<Task::moments>(p, Task::has_teacher, s);
  st.s = s;
  if (v.code != errc::ok) {
    report(a.status, check_stage::rows, v.code, v.site, r, v.col);
    st.ok = 0;
  }
}

/// Loss, summary and the gradient coefficients (thread 0).
template <class Task, class A>
__device__ void row_publish(const Task& t, const A& a, index_t r, row_state& st, const int32_t* sp_ids, const double* sp_coef) {
  if (st.ok && !is_finite(st.value)) {
    report(a.status, check_stage::row_loss, errc::infinite_divergence, check_site::dense_loss, r, -1);
    a.loss[r] = quiet_nan<double>();
  } else {
    a.loss[r] = st.ok ? st.value : quiet_nan<double>();
  }
  if (a.summaries) {
    estimators::row_summary s = st.s;
    if (!st.ok) s.lse_s = s.lse_t = quiet_nan<double>();
    a.summaries[r] = s;
  }
  const double scale = (a.grad_scale ? a.grad_scale[r] : 1.0) / a.ts;
  st.c = make_grad_coefs(sparse_of(st, sp_ids, sp_coef), scale, Task::dense_weight);
  (void)t;
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

/// One block per row: every stage of row blockIdx.x. Dynamic shared memory: the sparse list
/// (max_sparse x 12 bytes) and the task's work area.
template <class Task, class TS, class TT, class G>
__global__ void __launch_bounds__(block_threads) rows_row_per_block_kernel(Task t, row_args<TS, TT, G> a) {
  using W = task_work_t<Task, TS, TT>;
  extern __shared__ __align__(16) unsigned char dyn[];
  __shared__ row_state st;
  const index_t r = blockIdx.x;
  const int M = t.max_sparse();
  task_smem sm;
  sm.sp_coef = reinterpret_cast<double*>(dyn);
  sm.sp_ids = reinterpret_cast<int32_t*>(sm.sp_coef + M);
  sm.work = dyn + (size_t(M) * 12 + 15) / 16 * 16;
  row_prepare(t, a, r, st, sm);
  const pass1_partial p = block_pass1<W, Task::has_teacher, Task::moments>(a.student(r), a.teacher(r), a.V, a.its, a.itt, 0, 1);
  if (threadIdx.x == 0) row_verdict<Task>(a, r, p, st);
  __syncthreads();
  t.template after_pass1<W>(a, r, st, sm);
  if constexpr (Task::second) {
    if (st.ok) {  // uniform
      const sum2 s2 = block_second<W>(t.est, a.student(r), a.teacher(r), a.V, a.its, a.itt, st.s, 0, 1);
      if (threadIdx.x == 0) {
        st.s.second[0] = s2.v0;
        st.s.second[1] = s2.v1;
        st.value = t.est.value(st.s);
      }
    }
  }
  if (threadIdx.x == 0) row_publish(t, a, r, st, sm.sp_ids, sm.sp_coef);
  __syncthreads();
  if (a.grad) {
    const row_state s = st;
    block_grad<W>(dense_estimator_of(t), a.student(r), a.teacher(r), a.grad_row(r), a.V, a.its, a.itt, s.s, sparse_of(s, sm.sp_ids, sm.sp_coef), s.c,
                  s.ok != 0, 0, 1, a.status, r);
  }
}

/// Split path, stage 1 (grid rows x S): block (r, b) writes its pass-1 partial.
template <class Task, class TS, class TT, class G>
__global__ void __launch_bounds__(block_threads) rows_pass1_kernel(Task, row_args<TS, TT, G> a, int S, pass1_partial* parts) {
  using W = task_work_t<Task, TS, TT>;
  const index_t r = blockIdx.x / S;
  const int b = static_cast<int>(blockIdx.x % S);
  const pass1_partial p = block_pass1<W, Task::has_teacher, Task::moments>(a.student(r), a.teacher(r), a.V, a.its, a.itt, b, S);
  if (threadIdx.x == 0) parts[r * S + b] = p;
}

/// Split path, stage 2 (grid rows): merges a row's partials, runs its checks and derivations,
/// and keeps its state and sparse list in scratch (M entries per row). Without a second pass
/// it also publishes the row.
template <class Task, class TS, class TT, class G>
__global__ void __launch_bounds__(block_threads) rows_finish_kernel(Task t, row_args<TS, TT, G> a, int S, const pass1_partial* parts,
                                                                     row_state* states, int32_t* sp_ids, double* sp_coef) {
  using W = task_work_t<Task, TS, TT>;
  extern __shared__ __align__(16) unsigned char dyn[];
  __shared__ row_state st;
  const index_t r = blockIdx.x;
  const int M = t.max_sparse();
  task_smem sm;
  sm.sp_ids = sp_ids + r * M;
  sm.sp_coef = sp_coef + r * M;
  sm.work = dyn;
  row_prepare(t, a, r, st, sm);
  pass1_partial mine;
  for (int b = static_cast<int>(threadIdx.x); b < S; b += block_threads) mine.merge(parts[r * S + b]);
  const pass1_partial p = block_all_reduce(mine, merge_pass1{});
  if (threadIdx.x == 0) row_verdict<Task>(a, r, p, st);
  __syncthreads();
  t.template after_pass1<W>(a, r, st, sm);
  if (threadIdx.x == 0) {
    if constexpr (!Task::second) row_publish(t, a, r, st, sm.sp_ids, sm.sp_coef);
    states[r] = st;
  }
}

/// Split path, pass 1b (grid rows x S): block (r, b)'s second-pass sums.
template <class Task, class TS, class TT, class G>
__global__ void __launch_bounds__(block_threads) rows_second_kernel(Task t, row_args<TS, TT, G> a, int S, const row_state* states,
                                                                     sum2* sums) {
  using W = task_work_t<Task, TS, TT>;
  const index_t r = blockIdx.x / S;
  const int b = static_cast<int>(blockIdx.x % S);
  if (!states[r].ok) return;  // uniform
  const sum2 s2 = block_second<W>(t.est, a.student(r), a.teacher(r), a.V, a.its, a.itt, states[r].s, b, S);
  if (threadIdx.x == 0) sums[r * S + b] = s2;
}

/// Split path, after pass 1b (a thread per row): the sums in block order, the loss, publish.
template <class Task, class TS, class TT, class G>
__global__ void __launch_bounds__(block_threads) rows_second_finish_kernel(Task t, row_args<TS, TT, G> a, int S, row_state* states,
                                                                            const sum2* sums, const int32_t* sp_ids, const double* sp_coef) {
  const index_t r = index_t(blockIdx.x) * block_threads + threadIdx.x;
  if (r >= a.rows) return;
  row_state st = states[r];
  if (st.ok) {
    double s0 = 0, s1 = 0;
    for (int b = 0; b < S; ++b) {
      s0 += sums[r * S + b].v0;
      s1 += sums[r * S + b].v1;
    }
    st.s.second[0] = s0;
    st.s.second[1] = s1;
    st.value = t.est.value(st.s);
  }
  const int M = t.max_sparse();
  row_publish(t, a, r, st, sp_ids + r * M, sp_coef + r * M);
  states[r] = st;
}

/// Split path, pass 2 (grid rows x S).
template <class Task, class TS, class TT, class G>
__global__ void __launch_bounds__(block_threads) rows_grad_kernel(Task t, row_args<TS, TT, G> a, int S, const row_state* states,
                                                                   const int32_t* sp_ids, const double* sp_coef) {
  using W = task_work_t<Task, TS, TT>;
  __shared__ row_state st;
  const index_t r = blockIdx.x / S;
  const int b = static_cast<int>(blockIdx.x % S);
  if (threadIdx.x == 0) st = states[r];
  __syncthreads();
  const int M = t.max_sparse();
  const row_state s = st;
  block_grad<W>(dense_estimator_of(t), a.student(r), a.teacher(r), a.grad_row(r), a.V, a.its, a.itt, s.s,
                sparse_of(s, sp_ids + r * M, sp_coef + r * M), s.c, s.ok != 0, b, S, a.status, r);
}

}  // namespace tropd::gpu::detail
