// tropd/gpu/detail/row_passes.cuh: the block-level passes over one row (or one block's share
// of a row), shared by every row kernel (row functions and the row-level objective):
//
//   block_pass1    pass 1: thread_moments over the share (gpu/detail/row_rules.hpp), merged
//                  over the block; where the block's elements need it (a flagged element, a NaN
//                  weight, a non-finite maximum) a rescan of the share finds the first bad
//                  logit in the host's order. One read of the rows; no per-element status.
//   row_pass1_status  what a row's merged pass-1 result means: ok, or the error to report
//   block_second   pass 1b (JSD, TV): the estimator's two second-pass sums
//   block_grad     pass 2: writes G(wd est.grad_j - wg p_j) over the share, walking it backwards
//                  (the row's last read: evict-first loads, streaming stores), then the sparse entries of the
//                  row that fall in it (core/sparse_terms.hpp), then, only if a written value
//                  is not finite, a rescan for the first such column (one report per block).
#pragma once

#include <stdint.h>

#include <type_traits>

#include <tropd/core/numerics.hpp>
#include <tropd/core/sparse_terms.hpp>
#include <tropd/core/types.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/row_moments.hpp>
#include <tropd/gpu/config.cuh>
#include <tropd/gpu/detail/block_ops.cuh>
#include <tropd/gpu/detail/row_rules.hpp>
#include <tropd/gpu/detail/vector_io.cuh>
#include <tropd/gpu/status_word.cuh>

namespace tropd::gpu::detail {

// ---------------------------------------------------------------------------------------------
// Pass 1
// ---------------------------------------------------------------------------------------------

template <class W, bool HasT, estimators::moments_needed M, class TS, class TT>
struct pass1_walk {
  const TS* zs;
  const TT* zt;
  thread_moments<W, HasT, M> acc;

  template <int N>
  struct regs {
    raw<TS, N> a;
    std::conditional_t<HasT, raw<TT, N>, no_raw> b;
  };
  template <int N>
  __device__ __forceinline__ void load(index_t j, regs<N>& x) const {
    x.a = load_raw<N, load_kind::keep>(zs + j);
    if constexpr (HasT) x.b = load_raw<N, load_kind::keep>(zt + j);
  }
  template <int N>
  __device__ __forceinline__ void compute(index_t, const regs<N>& x) {
    W z[N], u[N];
    decode(x.a, z);
    if constexpr (HasT) decode(x.b, u);
    acc.template add<N>(z, u);
  }
};

/// The vector width of a pass reading the student row and, with HasT, the teacher row.
template <bool HasT, class TS, class TT>
inline constexpr int pass_width = HasT ? vec_width<TS, TT> : vec_width<TS, TS>;

/// Pass 1 of block b of S over row (zs, zt) of V columns; zt is ignored without HasT. The
/// result (valid in every thread) carries the merged moments and, after a rescan, the first
/// bad logit of the share.
template <class W, bool HasT, estimators::moments_needed M, class TS, class TT>
__device__ pass1_partial block_pass1(const TS* zs, const TT* zt, index_t V, double its, double itt, int b, int S) {
  constexpr int VW = pass_width<HasT, TS, TT>;
  const row_geometry g = make_geometry<VW>(zs, HasT ? zt : static_cast<const TT*>(nullptr), static_cast<const float*>(nullptr), V);
  __shared__ estimators::row_moments<double> acc[block_threads];  // each thread's fp64 moments
  pass1_walk<W, HasT, M, TS, TT> f{zs, zt, thread_moments<W, HasT, M>(its, itt, &acc[threadIdx.x])};
  sweep<VW>(g, b, S, f);
  pass1_partial p = block_all_reduce(f.acc.finish(), merge_pass1{});
  if (p.needs_rescan(HasT)) {  // uniform: every thread holds the same p
    const col_range r = columns_of<VW>(g, b, S);
    const W ws = W(its), wt = W(itt);
    int64_t best = pass1_partial::bad_none;
    for (index_t j = r.c0 + threadIdx.x; j < r.c1; j += block_threads) {
      const errc es = scaled_error<W>(zs[j], ws);
      if (es != errc::ok) best = min_(best, pass1_error_key(j, 0) * 16 + int64_t(es));
      if constexpr (HasT) {
        const errc et = scaled_error<W>(zt[j], wt);
        if (et != errc::ok) best = min_(best, pass1_error_key(j, 1) * 16 + int64_t(et));
      }
    }
    p.bad = block_all_reduce(best, min_op{});
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// Pass 1b
// ---------------------------------------------------------------------------------------------

template <class W, class Est, class TS, class TT>
struct second_walk {
  const TS* zs;
  const TT* zt;
  Est est;
  prob_split<W> ps, pt;
  W w0 = W(0), w1 = W(0);  // W sums of the current window
  double acc[2] = {0, 0};
  int pending = 0;

  template <int N>
  struct regs {
    raw<TS, N> a;
    raw<TT, N> b;
  };
  template <int N>
  __device__ __forceinline__ void load(index_t j, regs<N>& x) const {
    x.a = load_raw<N, load_kind::keep>(zs + j);
    x.b = load_raw<N, load_kind::keep>(zt + j);
  }
  template <int N>
  __device__ __forceinline__ void compute(index_t, const regs<N>& x) {
    W z[N], u[N];
    decode(x.a, z);
    decode(x.b, u);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const W xs = ps.exponent(z[i]), xt = pt.exponent(u[i]);
      const W p = ps.prob(xs), q = pt.prob(xt), ls = ps.log_prob(xs), lt = pt.log_prob(xt);
      if constexpr (has_terms<Est>) {
        W t0, t1;
        second_terms<W>(est, ls, lt, p, q, t0, t1);
        w0 += t0;
        w1 += t1;
      } else {
        est.accumulate(ls, lt, p, q, acc);
      }
    }
    if (++pending == flush_vectors) flush();
  }
  __device__ __forceinline__ void flush() {
    acc[0] += double(w0);
    acc[1] += double(w1);
    w0 = w1 = W(0);
    pending = 0;
  }
};

struct sum2 {
  double v0 = 0, v1 = 0;
};
struct sum2_op {
  __device__ __forceinline__ sum2 operator()(sum2 a, const sum2& b) const { return sum2{a.v0 + b.v0, a.v1 + b.v1}; }
};

/// Pass 1b of block b of S: the estimator's two second-pass sums over the share (valid in
/// every thread).
template <class W, class Est, class TS, class TT>
__device__ sum2 block_second(const Est& est, const TS* zs, const TT* zt, index_t V, double its, double itt,
                             const estimators::row_summary& s, int b, int S) {
  constexpr int VW = vec_width<TS, TT>;
  const row_geometry g = make_geometry<VW>(zs, zt, static_cast<const float*>(nullptr), V);
  second_walk<W, Est, TS, TT> f{zs, zt, est, prob_split<W>(s.lse_s, pass_units<W>::scale(its)),
                                prob_split<W>(s.lse_t, pass_units<W>::scale(itt))};
  sweep<VW, true>(g, b, S, f);  // backwards after pass 1 (then pass 2 forwards): each starts where the last one ended
  f.flush();
  return block_all_reduce(sum2{f.acc[0], f.acc[1]}, sum2_op{});
}

// ---------------------------------------------------------------------------------------------
// Pass 2
// ---------------------------------------------------------------------------------------------

template <class W, class Est, class TS, class TT, class G>
struct grad_walk {
  static constexpr bool teacher = reads_teacher<Est>;
  const TS* zs;
  const TT* zt;
  G* out;
  Est est;
  estimators::row_summary s;
  prob_split<W> ps, pt;
  W wd, wg;
  G check = G(0);  // sum of the written values: not finite iff some value is not (or the sum overflowed)

  template <int N>
  struct regs {
    raw<TS, N> a;
    std::conditional_t<teacher, raw<TT, N>, no_raw> b;
  };
  template <int N>
  __device__ __forceinline__ void load(index_t j, regs<N>& x) const {
    x.a = load_raw<N, load_kind::last>(zs + j);
    if constexpr (teacher) x.b = load_raw<N, load_kind::last>(zt + j);
  }
  template <int N>
  __device__ __forceinline__ void compute(index_t j, const regs<N>& x) {
    W z[N], u[N];
    decode(x.a, z);
    if constexpr (teacher) decode(x.b, u);
    G o[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      o[i] = grad_value<W, Est, G>(est, ps, pt, z[i], teacher ? u[i] : W(0), wd, wg, s);
      check += o[i];
    }
    store_vec<N>(out + j, o);
  }
};

/// Writes `v` over block b of S's columns of an output row (a failed row: NaN; a row with a
/// zero scale: exact zeros).
template <int VW, class G>
__device__ void block_fill(G* out, index_t V, const row_geometry& g, int b, int S, G v) {
  const col_range r = columns_of<VW>(g, b, S);
  for (index_t j = r.c0 + threadIdx.x; j < r.c1; j += block_threads) out[j] = v;
}

template <class Est>
inline constexpr bool second_pass_of = Est::second_pass;

/// The width of the gradient pass's vectors for an estimator.
template <class Est, class TS, class TT>
inline constexpr int grad_width = reads_teacher<Est> ? vec_width<TS, TT> : vec_width<TS, TS>;

/// Pass 2 of block b of S over row r: the dense sweep, then the sparse entries in the share
/// (sp and c in shared memory, set by the caller), then the output check. `fill` >= 0: the
/// row failed (write NaN) instead. Reports a value that does not fit G (check_stage::gradient).
template <class W, class Est, class TS, class TT, class G>
__device__ void block_grad(const Est& est, const TS* zs, const TT* zt, G* out, index_t V, double its, double itt,
                           const estimators::row_summary& s, const sparse_terms& sp, const grad_coefs& c, bool row_ok, int b,
                           int S, uint64_t* status, index_t row) {
  constexpr int VW = grad_width<Est, TS, TT>;
  const TT* zt_read = reads_teacher<Est> ? zt : static_cast<const TT*>(nullptr);
  const row_geometry g = make_geometry<VW>(zs, zt_read, out, V);
  if (!row_ok) {
    block_fill<VW>(out, V, g, b, S, quiet_nan<G>());
    return;
  }
  if (c.scale == 0.0) {  // prompt rows and rows without a term: an exact zero gradient (the host's rule)
    block_fill<VW>(out, V, g, b, S, G(0));
    return;
  }
  const W cs = pass_units<W>::scale(its), ct = pass_units<W>::scale(itt);
  const prob_split<W> ps(s.lse_s, cs), pt(reads_teacher<Est> ? prob_split<W>(s.lse_t, ct) : prob_split<W>());
  const W wd = W(c.wd), wg = W(c.wg);
  grad_walk<W, Est, TS, TT, G> f{zs, zt_read, out, est, s, ps, pt, wd, wg};
  // Backwards after pass 1, forwards after pass 1b: each pass starts where the last one ended
  // (that part of the row may still be in L2).
  sweep<VW, !second_pass_of<Est>>(g, b, S, f);
  __syncthreads();  // the block's dense values are visible to every thread of the block
  const col_range r = columns_of<VW>(g, b, S);
  bool bad = !is_finite(f.check);
  // The sparse entries in the share (sparse_entry_value: the host's order per id).
  for (int e = static_cast<int>(threadIdx.x); e < sp.n; e += block_threads) {
    const int32_t j = sp.ids[e];
    if (j < r.c0 || j >= r.c1) continue;
    G v;
    if (!sparse_entry_value<W, Est, G>(est, ps, pt, zs, zt_read, out, sp, c, e, wd, s, v)) continue;
    out[j] = v;
    bad = bad || !is_finite(v);
  }
  if (block_any(bad)) {  // cold: find the first column that does not fit G
    index_t first = max_cols + 1;
    for (index_t j = r.c0 + threadIdx.x; j < r.c1; j += block_threads)
      if (!is_finite(out[j])) {
        first = j;
        break;
      }
    first = block_all_reduce(first, min_op{});
    if (threadIdx.x == 0 && first <= max_cols) report(status, check_stage::gradient, errc::infinite_divergence, check_site::gradient, row, first);
  }
}

}  // namespace tropd::gpu::detail
