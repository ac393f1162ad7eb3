// tropd/host/rows.hpp: the CPU backend's row passes.
//
// For each row pair (student logits z, teacher logits u, or a teacher top-k list):
//   pass 1  one read of both rows: mergeable moments (both log-sum-exps, entropies,
//           the centred sums behind both KLs), NaN/+inf detection with the position;
//   pass 1b (only JSD / TV) the estimator's second-pass sums;
//   pass 2  one read of the rows and one write of dL/dz:
//           dL/dz_j = scale / T_S * ( w * grad_est_j + g_j - p_j * sum_v g_v )
//           where grad_est is a full-vocabulary estimator's dL/da and g a sparse list of
//           dL/d log p_S(v) (the sampled token, top-k ids).
// Rows are processed in chunks of `chunk` elements with Eigen's vectorised exp; no
// [rows x vocab] probability array is ever built. Extra memory: O(chunk) per thread plus
// one row_summary per row.
//
// Order of work (row_options::fused):
//   false (default) every row's statistics are computed and validated before anything is
//         written: a failed call leaves every output untouched. Reads each row twice.
//   true  statistics and gradient per row while it is in cache (fewer bytes from memory);
//         on failure the rows before the failing one may already hold gradients and the
//         losses are untouched.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/types.hpp>
#include <tropd/core/views.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/sampled.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/host/parallel.hpp>

namespace tropd::host {

/// Options shared by the row-level entry points.
struct row_options {
  double student_temperature = 1.0;  ///< T_S: student logits are divided by it (> 0)
  double teacher_temperature = 1.0;  ///< T_T: teacher logits are divided by it (> 0); not applied to given top-k lists
  bool fused = false;                ///< see the header comment
  int threads = 1;                   ///< rows are split statically over this many threads
};

/// A teacher top-k list per row: ids [rows x K] and log-probabilities [rows x K].
/// -inf log-probs are padding (their ids are ignored).
struct topk_lists {
  matrix_view<const int32_t> ids;
  matrix_view<const float> logprobs;
};

namespace detail {

inline constexpr index_t chunk = 1024;

template <class TS, class TT>
using work_t = std::conditional_t<std::is_same_v<TS, double> || std::is_same_v<TT, double>, double, float>;

// Note: Eigen's vectorised exp does not return exactly 0 for -inf (it clamps its argument and
// returns a denormal on some instruction sets), so every exp below masks -inf inputs to an
// exact 0: a -inf logit must contribute nothing, also not 0 * (-inf) = NaN.
template <class W>
using arr = Eigen::Map<Eigen::Array<W, Eigen::Dynamic, 1>, Eigen::Aligned64>;
template <class W>
using carr = Eigen::Map<const Eigen::Array<W, Eigen::Dynamic, 1>, Eigen::Aligned64>;

template <class W, class T>
inline void load_scaled(const T* src, index_t n, W inv_t, W* dst) noexcept {
  for (index_t i = 0; i < n; ++i) dst[i] = static_cast<W>(to_acc(src[i])) * inv_t;
}

/// Index of the first NaN or +inf in x[0, n), or -1.
template <class W>
inline index_t first_bad(const W* x, index_t n) noexcept {
  if ((carr<W>(x, n) < inf<W>()).all()) return -1;
  for (index_t i = 0; i < n; ++i)
    if (!(x[i] < inf<W>())) return i;
  return -1;
}

/// Scratch for one thread: chunk buffers.
template <class W>
struct alignas(64) chunk_buffers {
  alignas(64) W a[chunk];
  alignas(64) W b[chunk];
  alignas(64) W wa[chunk];
  alignas(64) W wb[chunk];
};

/// Moments of one chunk (student a[0,n), optional teacher b[0,n)).
template <class W>
inline estimators::row_moments<W> chunk_moments(chunk_buffers<W>& buf, index_t n, bool has_teacher) noexcept {
  estimators::row_moments<W> m;
  carr<W> A(buf.a, n);
  m.ms = A.maxCoeff();
  if (has_teacher) m.mt = carr<W>(buf.b, n).maxCoeff();
  if (m.ms > -inf<W>()) {
    arr<W> WA(buf.wa, n);
    WA = (A == -inf<W>()).select(W(0), (A - m.ms).exp());
    m.ss = WA.sum();
    m.es = (WA > W(0)).select(WA * (A - m.ms), W(0)).sum();
    if (has_teacher) {
      carr<W> B(buf.b, n);
      if (m.mt > -inf<W>())
        m.xs = (WA > W(0)).select(WA * ((A - m.ms) - (B - m.mt)), W(0)).sum();
      else
        m.xs = inf<W>();
      // (B - mt) is -inf where b = -inf, so xs is +inf exactly when p > 0 = q somewhere.
    }
  }
  if (has_teacher && m.mt > -inf<W>()) {
    carr<W> B(buf.b, n);
    arr<W> WB(buf.wb, n);
    WB = (B == -inf<W>()).select(W(0), (B - m.mt).exp());
    m.st = WB.sum();
    m.et = (WB > W(0)).select(WB * (B - m.mt), W(0)).sum();
    if (m.ms > -inf<W>())
      m.xt = (WB > W(0)).select(WB * ((B - m.mt) - (A - m.ms)), W(0)).sum();
    else
      m.xt = inf<W>();
  }
  return m;
}

template <class W>
inline estimators::row_moments<double> widen(const estimators::row_moments<W>& m) noexcept {
  estimators::row_moments<double> d;
  d.ms = m.ms; d.ss = m.ss; d.es = m.es; d.xs = m.xs;
  d.mt = m.mt; d.st = m.st; d.et = m.et; d.xt = m.xt;
  return d;
}

/// Pass 1 over one row pair; teacher may be nullptr (student-only statistics).
template <class W, class TS, class TT>
inline status row_pass1(const TS* zs, const TT* zt, index_t V, W inv_ts, W inv_tt, chunk_buffers<W>& buf,
                        index_t row, estimators::row_summary& out) noexcept {
  estimators::row_moments<double> mom;
  const bool has_t = zt != nullptr;
  for (index_t c0 = 0; c0 < V; c0 += chunk) {
    const index_t n = std::min(chunk, V - c0);
    load_scaled(zs + c0, n, inv_ts, buf.a);
    if (const index_t i = first_bad(buf.a, n); i >= 0)
      return make_error(errc::non_finite_input, "student logits contain NaN or +inf", row, c0 + i);
    if (has_t) {
      load_scaled(zt + c0, n, inv_tt, buf.b);
      if (const index_t i = first_bad(buf.b, n); i >= 0)
        return make_error(errc::non_finite_input, "teacher logits contain NaN or +inf", row, c0 + i);
    }
    mom.merge(widen(chunk_moments(buf, n, has_t)));
  }
  if (!(mom.ss > 0)) return make_error(errc::no_finite_entry, "student logits row is -inf everywhere", row);
  if (has_t && !(mom.st > 0)) return make_error(errc::no_finite_entry, "teacher logits row is -inf everywhere", row);
  if (!has_t) { mom.mt = 0; mom.st = 1; mom.xs = 0; mom.xt = 0; mom.et = 0; }
  out = estimators::summarize(mom);
  if (!has_t) { out.lse_t = 0; out.rkl = out.fkl = out.ent_t = 0; }
  return {};
}

/// Estimator placeholder for rows with only sparse gradient terms.
struct no_dense {
  static constexpr bool second_pass = false;
  template <class F>
  TROPD_HD constexpr void accumulate(F, F, F, F, double*) const noexcept {}
  template <class F>
  TROPD_HD constexpr F grad(F, F, F, F, const estimators::row_summary&) const noexcept { return F(0); }
};

/// Second-pass sums of an estimator (JSD, TV).
template <class W, class TS, class TT, class Est>
inline void row_pass1b(const Est& est, const TS* zs, const TT* zt, index_t V, W inv_ts, W inv_tt,
                       chunk_buffers<W>& buf, estimators::row_summary& s) noexcept {
  double acc[2] = {0, 0};
  for (index_t c0 = 0; c0 < V; c0 += chunk) {
    const index_t n = std::min(chunk, V - c0);
    load_scaled(zs + c0, n, inv_ts, buf.a);
    load_scaled(zt + c0, n, inv_tt, buf.b);
    arr<W> A(buf.a, n), B(buf.b, n), P(buf.wa, n), Q(buf.wb, n);
    A -= W(s.lse_s);
    B -= W(s.lse_t);
    P = (A == -inf<W>()).select(W(0), A.exp());
    Q = (B == -inf<W>()).select(W(0), B.exp());
    double part[2] = {0, 0};
    for (index_t i = 0; i < n; ++i) est.accumulate(buf.a[i], buf.b[i], buf.wa[i], buf.wb[i], part);
    acc[0] += part[0];
    acc[1] += part[1];
  }
  s.sum0 = acc[0];
  s.sum1 = acc[1];
}

/// Sparse part of a row gradient: g[i] = dL/d log p_S(ids[i]).
struct sparse_terms {
  const int32_t* ids = nullptr;
  const double* coef = nullptr;
  int n = 0;
};

/// Pass 2: writes out[j] = scale * (w * est.grad_j + g_j - p_j * sum g).
template <class W, class TS, class TT, class Est, class G>
inline void row_pass2(const Est& est, const TS* zs, const TT* zt, index_t V, W inv_ts, W inv_tt,
                      chunk_buffers<W>& buf, const estimators::row_summary& s, double w, sparse_terms sp,
                      double scale, G* out) noexcept {
  if (scale == 0.0) {  // prompt rows and rows without a term: an exact zero gradient
    for (index_t j = 0; j < V; ++j) out[j] = G(0);
    return;
  }
  double gsum = 0;
  for (int i = 0; i < sp.n; ++i) gsum += sp.coef[i];
  const W wd = W(w * scale), wg = W(gsum * scale);
  constexpr bool dense = !std::is_same_v<Est, no_dense>;
  for (index_t c0 = 0; c0 < V; c0 += chunk) {
    const index_t n = std::min(chunk, V - c0);
    load_scaled(zs + c0, n, inv_ts, buf.a);
    arr<W> A(buf.a, n), P(buf.wa, n);
    A -= W(s.lse_s);
    P = (A == -inf<W>()).select(W(0), A.exp());
    if constexpr (dense) {
      load_scaled(zt + c0, n, inv_tt, buf.b);
      arr<W> B(buf.b, n), Q(buf.wb, n);
      B -= W(s.lse_t);
      Q = (B == -inf<W>()).select(W(0), B.exp());
      for (index_t i = 0; i < n; ++i)
        out[c0 + i] = static_cast<G>(wd * est.grad(buf.a[i], buf.b[i], buf.wa[i], buf.wb[i], s) - wg * buf.wa[i]);
    } else {
      for (index_t i = 0; i < n; ++i) out[c0 + i] = static_cast<G>(-wg * buf.wa[i]);
    }
  }
  for (int i = 0; i < sp.n; ++i) out[sp.ids[i]] += static_cast<G>(sp.coef[i] * scale);
}

inline status check_temperatures(const row_options& o) noexcept {
  if (!(o.student_temperature > 0) || !is_finite(o.student_temperature))
    return make_error(errc::invalid_parameter, "student temperature must be finite and > 0");
  if (!(o.teacher_temperature > 0) || !is_finite(o.teacher_temperature))
    return make_error(errc::invalid_parameter, "teacher temperature must be finite and > 0");
  return {};
}

template <class TS, class G>
inline status check_student_and_outputs(matrix_view<const TS> student, vector_view<double> loss,
                                        matrix_view<G> grad, vector_view<const double> grad_scale) noexcept {
  if (!student.valid()) return make_error(errc::shape_mismatch, "student view is malformed (stride < cols or null data)");
  if (student.rows == 0) return make_error(errc::empty_batch, "no rows");
  if (student.cols < 1) return make_error(errc::shape_mismatch, "vocabulary size must be >= 1");
  if (loss.size != student.rows) return make_error(errc::shape_mismatch, "loss must have one entry per row");
  if (!grad.valid()) return make_error(errc::shape_mismatch, "gradient view is malformed");
  if (grad.rows != 0 && (grad.rows != student.rows || grad.cols != student.cols))
    return make_error(errc::shape_mismatch, "gradient must be [rows x vocab] like the student logits, or empty");
  if (grad_scale.size != 0 && grad_scale.size != student.rows)
    return make_error(errc::shape_mismatch, "grad_scale must be empty or have one entry per row");
  for (index_t r = 0; r < grad_scale.size; ++r)
    if (!is_finite(grad_scale[r])) return make_error(errc::non_finite_input, "grad_scale is not finite", r);
  return {};
}

template <class TT>
inline status check_teacher_rows(matrix_view<const TT> teacher, index_t rows, index_t cols) noexcept {
  if (!teacher.valid()) return make_error(errc::shape_mismatch, "teacher view is malformed (stride < cols or null data)");
  if (teacher.rows != rows) return make_error(errc::shape_mismatch, "teacher and student have different numbers of rows");
  if (teacher.cols != cols)
    return make_error(errc::shape_mismatch, "teacher and student vocabulary sizes differ (pad or truncate the teacher vocabulary first)");
  return {};
}

/// Runs `stats(r, buf, summary&) -> status` then `grad(r, buf, summary)` over rows,
/// in the order row_options::fused asks for.
template <class W, class Stats, class Grad>
inline status run_rows(index_t rows, const row_options& opt, std::vector<estimators::row_summary>& sums, Stats&& stats,
                       Grad&& grad) {
  sums.resize(static_cast<size_t>(rows));
  if (opt.fused) {
    return parallel_rows(rows, opt.threads, [&](index_t b, index_t e) -> status {
      auto buf = std::make_unique<chunk_buffers<W>>();
      for (index_t r = b; r < e; ++r) {
        TROPD_TRY(stats(r, *buf, sums[static_cast<size_t>(r)]));
        grad(r, *buf, sums[static_cast<size_t>(r)]);
      }
      return {};
    });
  }
  TROPD_TRY(parallel_rows(rows, opt.threads, [&](index_t b, index_t e) -> status {
    auto buf = std::make_unique<chunk_buffers<W>>();
    for (index_t r = b; r < e; ++r) TROPD_TRY(stats(r, *buf, sums[static_cast<size_t>(r)]));
    return {};
  }));
  return parallel_rows(rows, opt.threads, [&](index_t b, index_t e) -> status {
    auto buf = std::make_unique<chunk_buffers<W>>();
    for (index_t r = b; r < e; ++r) grad(r, *buf, sums[static_cast<size_t>(r)]);
    return {};
  });
}

}  // namespace detail

/// Full-vocabulary divergence per row: loss[r] = D(p_r, q_r), grad[r] = grad_scale[r] * dD/dz_r.
///
/// student [rows x V], teacher [rows x V] (any logit_element types), loss [rows],
/// grad [rows x V] or empty (value only), grad_scale [rows] or empty (1).
/// Errors: empty_batch, shape_mismatch, non_finite_input (NaN/+inf, with position),
/// no_finite_entry, infinite_divergence, invalid_parameter.
template <estimators::full_vocab_divergence Est, logit_element TS, logit_element TT, grad_element G = float>
status divergence_rows(const Est& est, matrix_view<const TS> student, matrix_view<const TT> teacher,
                       vector_view<double> loss, matrix_view<G> grad = {}, const row_options& opt = {},
                       vector_view<const double> grad_scale = {},
                       vector_view<estimators::row_summary> summaries = {}) {
  using W = detail::work_t<TS, TT>;
  TROPD_TRY(est.check());
  TROPD_TRY(detail::check_temperatures(opt));
  TROPD_TRY(detail::check_student_and_outputs(student, loss, grad, grad_scale));
  TROPD_TRY(detail::check_teacher_rows(teacher, student.rows, student.cols));
  if (summaries.size != 0 && summaries.size != student.rows)
    return make_error(errc::shape_mismatch, "summaries must be empty or have one entry per row");
  const index_t V = student.cols;
  const W its = W(1.0 / opt.student_temperature), itt = W(1.0 / opt.teacher_temperature);
  std::vector<estimators::row_summary> sums;
  auto stats = [&](index_t r, detail::chunk_buffers<W>& buf, estimators::row_summary& s) -> status {
    TROPD_TRY(detail::row_pass1(student.row(r), teacher.row(r), V, its, itt, buf, r, s));
    if (!est.finite(s))
      return make_error(errc::infinite_divergence,
                        "the divergence is infinite: one distribution gives zero mass where the other has mass", r);
    if constexpr (Est::second_pass) detail::row_pass1b(est, student.row(r), teacher.row(r), V, its, itt, buf, s);
    return {};
  };
  auto gradf = [&](index_t r, detail::chunk_buffers<W>& buf, const estimators::row_summary& s) {
    if (grad.rows == 0) return;
    const double scale = (grad_scale.size ? grad_scale[r] : 1.0) / opt.student_temperature;
    detail::row_pass2(est, student.row(r), teacher.row(r), V, its, itt, buf, s, 1.0, {}, scale, grad.row(r));
  };
  TROPD_TRY(detail::run_rows<W>(student.rows, opt, sums, stats, gradf));
  for (index_t r = 0; r < student.rows; ++r) {
    loss[r] = est.value(sums[static_cast<size_t>(r)]);
    if (summaries.size) summaries[r] = sums[static_cast<size_t>(r)];
  }
  return {};
}

/// Checks one token id against [0, V).
inline status check_ids(vector_view<const int32_t> ids, index_t rows, index_t V) noexcept {
  if (ids.size != rows) return make_error(errc::shape_mismatch, "ids must have one entry per row");
  for (index_t r = 0; r < rows; ++r)
    if (ids[r] < 0 || ids[r] >= V) return make_error(errc::id_out_of_range, "sampled token id outside [0, V)", r, ids[r]);
  return {};
}

/// Sampled-token estimator per row with full teacher logits:
/// s = log p_S(y_r), t = log p_T(y_r) from the rows, s_old[r] (empty: s_old = s, so rho = 1).
/// loss[r] = the estimator's loss; grad[r] = grad_scale[r] * dL/ds * (e_y - p) / T_S.
template <class E, class U, logit_element TS, logit_element TT, grad_element G = float>
status sampled_rows(const estimators::sampled<E, U>& est, matrix_view<const TS> student, matrix_view<const TT> teacher,
                    vector_view<const int32_t> ids, vector_view<const double> s_old, vector_view<double> loss,
                    matrix_view<G> grad = {}, const row_options& opt = {}, vector_view<const double> grad_scale = {}) {
  using W = detail::work_t<TS, TT>;
  TROPD_TRY(detail::check_temperatures(opt));
  TROPD_TRY(detail::check_student_and_outputs(student, loss, grad, grad_scale));
  TROPD_TRY(detail::check_teacher_rows(teacher, student.rows, student.cols));
  TROPD_TRY(check_ids(ids, student.rows, student.cols));
  if (s_old.size != 0 && s_old.size != student.rows) return make_error(errc::shape_mismatch, "s_old must be empty or one per row");
  for (index_t r = 0; r < s_old.size; ++r)
    if (!is_finite(s_old[r])) return make_error(errc::non_finite_input, "s_old is not finite", r);
  const index_t V = student.cols;
  const W its = W(1.0 / opt.student_temperature), itt = W(1.0 / opt.teacher_temperature);
  std::vector<estimators::sampled_result> res(static_cast<size_t>(student.rows));
  std::vector<estimators::row_summary> sums;
  auto stats = [&](index_t r, detail::chunk_buffers<W>& buf, estimators::row_summary& s) -> status {
    TROPD_TRY(detail::row_pass1(student.row(r), teacher.row(r), V, its, itt, buf, r, s));
    const int32_t y = ids[r];
    const double sy = double(W(to_acc(student.row(r)[y])) * its) - s.lse_s;
    const double ty = double(W(to_acc(teacher.row(r)[y])) * itt) - s.lse_t;
    if (sy == -inf<double>()) return make_error(errc::infinite_divergence, "the student gives zero mass to the sampled token", r, y);
    if (ty == -inf<double>())
      return make_error(errc::infinite_divergence,
                        "the teacher gives zero mass to the sampled token (infinite log-ratio); use a trust region or a reward clip", r, y);
    const auto v = est(sy, s_old.size ? s_old[r] : sy, ty);
    if (!is_finite(v.loss) || !is_finite(v.dloss_ds))
      return make_error(errc::infinite_divergence, "the estimator overflows for this token", r, y);
    res[static_cast<size_t>(r)] = v;
    return {};
  };
  auto gradf = [&](index_t r, detail::chunk_buffers<W>& buf, const estimators::row_summary& s) {
    if (grad.rows == 0) return;
    const double scale = (grad_scale.size ? grad_scale[r] : 1.0) / opt.student_temperature;
    const double c = res[static_cast<size_t>(r)].dloss_ds;
    const int32_t y = ids[r];
    detail::row_pass2(detail::no_dense{}, student.row(r), static_cast<const TT*>(nullptr), V, its, itt, buf, s, 0.0,
                      detail::sparse_terms{&y, &c, 1}, scale, grad.row(r));
  };
  TROPD_TRY(detail::run_rows<W>(student.rows, opt, sums, stats, gradf));
  for (index_t r = 0; r < student.rows; ++r) loss[r] = res[static_cast<size_t>(r)].loss;
  return {};
}

/// Selects the k largest entries of x[0, V) (ties: lower id first), written in descending
/// order to ids/vals; if V < k the rest is padded with (id -1, -inf).
template <class W>
inline void select_topk(const W* x, index_t V, int k, int32_t* ids, W* vals) {
  // Min-heap of (val, id) on the first `filled` slots; the root is the weakest kept entry.
  auto weaker = [&](int i, int j) {  // is slot i weaker than slot j?
    return vals[i] < vals[j] || (vals[i] == vals[j] && ids[i] > ids[j]);
  };
  auto sift_down = [&](int i, int n) {
    for (;;) {
      int l = 2 * i + 1, m = i;
      if (l < n && weaker(l, m)) m = l;
      if (l + 1 < n && weaker(l + 1, m)) m = l + 1;
      if (m == i) return;
      std::swap(vals[i], vals[m]);
      std::swap(ids[i], ids[m]);
      i = m;
    }
  };
  const int kk = static_cast<int>(std::min<index_t>(k, V));
  for (int i = 0; i < kk; ++i) { vals[i] = x[i]; ids[i] = i; }
  for (int i = kk / 2 - 1; i >= 0; --i) sift_down(i, kk);
  for (index_t v = kk; v < V; ++v) {
    if (x[v] > vals[0]) {  // ids grow, so an equal value never beats the root
      vals[0] = x[v];
      ids[0] = static_cast<int32_t>(v);
      sift_down(0, kk);
    }
  }
  // Heap-sort into descending order (strongest first).
  for (int n = kk - 1; n > 0; --n) {
    std::swap(vals[0], vals[n]);
    std::swap(ids[0], ids[n]);
    sift_down(0, n);
  }
  for (int i = kk; i < k; ++i) { vals[i] = -inf<W>(); ids[i] = -1; }
}

/// Validates a teacher top-k list row: finite entries have ids in [0, V) and no duplicate;
/// log-probs are not NaN/+inf. Returns the first violation.
inline status check_topk_row(const int32_t* ids, const float* lp, int K, index_t V, index_t row) {
  for (int i = 0; i < K; ++i) {
    if (!(lp[i] < inf<float>())) return make_error(errc::non_finite_input, "teacher top-k log-prob is NaN or +inf", row, i);
    if (lp[i] == -inf<float>()) continue;
    if (ids[i] < 0 || ids[i] >= V) return make_error(errc::id_out_of_range, "teacher top-k id outside [0, V)", row, i);
    for (int j = 0; j < i; ++j)
      if (lp[j] != -inf<float>() && ids[j] == ids[i]) return make_error(errc::duplicate_topk_id, "teacher top-k list repeats an id", row, i);
  }
  return {};
}

/// Teacher top-k forward KL per row. Two teacher forms:
///  - full teacher logits [rows x V]: the top est.k ids are selected per row (ties: lower id);
///  - given lists (ids + log-probs [rows x K], K >= 1, -inf padding allowed; est.k is ignored).
/// loss[r] = FKL_k; grad[r] = grad_scale[r] * dFKL_k/dz / T_S. The student's log-sum-exp runs
/// over the whole row.
template <logit_element TS, logit_element TT, grad_element G = float>
status topk_forward_kl_rows(const estimators::topk_forward_kl& est, matrix_view<const TS> student,
                            matrix_view<const TT> teacher, vector_view<double> loss, matrix_view<G> grad = {},
                            const row_options& opt = {}, vector_view<const double> grad_scale = {}) {
  using W = detail::work_t<TS, TT>;
  TROPD_TRY(est.check());
  TROPD_TRY(detail::check_temperatures(opt));
  TROPD_TRY(detail::check_student_and_outputs(student, loss, grad, grad_scale));
  TROPD_TRY(detail::check_teacher_rows(teacher, student.rows, student.cols));
  const index_t V = student.cols, N = student.rows;
  const int K = est.k;
  const W its = W(1.0 / opt.student_temperature), itt = W(1.0 / opt.teacher_temperature);
  std::vector<int32_t> kid(static_cast<size_t>(N * K));
  std::vector<double> kg(static_cast<size_t>(N * K));
  std::vector<double> val(static_cast<size_t>(N));
  std::vector<estimators::row_summary> sums;
  auto stats = [&](index_t r, detail::chunk_buffers<W>& buf, estimators::row_summary& s) -> status {
    TROPD_TRY(detail::row_pass1(student.row(r), teacher.row(r), V, its, itt, buf, r, s));
    std::vector<W> tv(static_cast<size_t>(V)), vals(static_cast<size_t>(K));
    detail::load_scaled(teacher.row(r), V, itt, tv.data());
    int32_t* ids = kid.data() + r * K;
    select_topk(tv.data(), V, K, ids, vals.data());
    std::vector<double> lq(static_cast<size_t>(K)), ls(static_cast<size_t>(K));
    for (int i = 0; i < K; ++i) {
      lq[i] = ids[i] < 0 ? -inf<double>() : double(vals[i]) - s.lse_t;
      ls[i] = ids[i] < 0 ? 0.0 : double(W(to_acc(student.row(r)[ids[i]])) * its) - s.lse_s;
    }
    const auto res = est.eval(lq.data(), ls.data(), K, kg.data() + r * K);
    if (!res.st.ok()) return make_error(res.st.code, res.st.detail, r, res.st.col);
    val[static_cast<size_t>(r)] = res.value;
    for (int i = 0; i < K; ++i)
      if (ids[i] < 0) { ids[i] = 0; kg[static_cast<size_t>(r * K + i)] = 0; }
    return {};
  };
  auto gradf = [&](index_t r, detail::chunk_buffers<W>& buf, const estimators::row_summary& s) {
    if (grad.rows == 0) return;
    const double scale = (grad_scale.size ? grad_scale[r] : 1.0) / opt.student_temperature;
    detail::row_pass2(detail::no_dense{}, student.row(r), static_cast<const TT*>(nullptr), V, its, itt, buf, s, 0.0,
                      detail::sparse_terms{kid.data() + r * K, kg.data() + r * K, K}, scale, grad.row(r));
  };
  TROPD_TRY(detail::run_rows<W>(N, opt, sums, stats, gradf));
  for (index_t r = 0; r < N; ++r) loss[r] = val[static_cast<size_t>(r)];
  return {};
}

/// Overload for given teacher top-k lists (see topk_lists).
template <logit_element TS, grad_element G = float>
status topk_forward_kl_rows(const estimators::topk_forward_kl& est, matrix_view<const TS> student,
                            const topk_lists& teacher, vector_view<double> loss, matrix_view<G> grad = {},
                            const row_options& opt = {}, vector_view<const double> grad_scale = {}) {
  using W = detail::work_t<TS, float>;
  TROPD_TRY(est.check());
  TROPD_TRY(detail::check_temperatures(opt));
  TROPD_TRY(detail::check_student_and_outputs(student, loss, grad, grad_scale));
  const index_t V = student.cols, N = student.rows;
  if (!teacher.ids.valid() || !teacher.logprobs.valid())
    return make_error(errc::shape_mismatch, "teacher top-k views are malformed");
  if (teacher.ids.rows != N || teacher.logprobs.rows != N)
    return make_error(errc::shape_mismatch, "teacher top-k lists need one row per student row");
  if (teacher.ids.cols != teacher.logprobs.cols || teacher.ids.cols < 1)
    return make_error(errc::shape_mismatch, "teacher top-k ids and log-probs must both be [rows x K] with K >= 1");
  const int K = static_cast<int>(teacher.ids.cols);
  for (index_t r = 0; r < N; ++r) TROPD_TRY(check_topk_row(teacher.ids.row(r), teacher.logprobs.row(r), K, V, r));
  const W its = W(1.0 / opt.student_temperature);
  std::vector<int32_t> kid(static_cast<size_t>(N * K));
  std::vector<double> kg(static_cast<size_t>(N * K));
  std::vector<double> val(static_cast<size_t>(N));
  std::vector<estimators::row_summary> sums;
  auto stats = [&](index_t r, detail::chunk_buffers<W>& buf, estimators::row_summary& s) -> status {
    TROPD_TRY(detail::row_pass1(student.row(r), static_cast<const float*>(nullptr), V, its, W(1), buf, r, s));
    const int32_t* tid = teacher.ids.row(r);
    const float* tlp = teacher.logprobs.row(r);
    std::vector<double> ls(static_cast<size_t>(K));
    int32_t* ids = kid.data() + r * K;
    for (int i = 0; i < K; ++i) {
      const bool pad = tlp[i] == -inf<float>();
      ids[i] = pad ? 0 : tid[i];
      ls[i] = pad ? 0.0 : double(W(to_acc(student.row(r)[tid[i]])) * its) - s.lse_s;
    }
    const auto res = est.eval(tlp, ls.data(), K, kg.data() + r * K);
    if (!res.st.ok()) return make_error(res.st.code, res.st.detail, r, res.st.col);
    val[static_cast<size_t>(r)] = res.value;
    return {};
  };
  auto gradf = [&](index_t r, detail::chunk_buffers<W>& buf, const estimators::row_summary& s) {
    if (grad.rows == 0) return;
    const double scale = (grad_scale.size ? grad_scale[r] : 1.0) / opt.student_temperature;
    detail::row_pass2(detail::no_dense{}, student.row(r), static_cast<const float*>(nullptr), V, its, W(1), buf, s, 0.0,
                      detail::sparse_terms{kid.data() + r * K, kg.data() + r * K, K}, scale, grad.row(r));
  };
  TROPD_TRY(detail::run_rows<W>(N, opt, sums, stats, gradf));
  for (index_t r = 0; r < N; ++r) loss[r] = val[static_cast<size_t>(r)];
  return {};
}

}  // namespace tropd::host
