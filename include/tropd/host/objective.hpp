// tropd/host/objective.hpp: evaluates a tropd::objective on the CPU, at token level and at
// row level. Both run the same stages (host/token_stages.hpp: validate, decide, apply,
// aggregate); they differ only in where the per-token values come from and where the
// gradient goes.
//
//   evaluate_tokens(obj, batch, outputs, options)
//     The caller supplies per-token log-probs (and, where the policies read them, entropies,
//     the per-position reverse KL, reference log-probs, top-k lists with the student's
//     log-probs at the teacher's ids; core/token_batch.hpp) and receives dL/ds and the sparse
//     dL/d log p_S at the top-k ids, to push through its own log_softmax.
//
//   evaluate_rows(obj, student_logits, teacher, inputs, outputs, options)
//     The caller supplies student logits [n x V] and the teacher as logits [n x V] or as
//     sampled-token log-probs (teacher_logprobs), optionally with top-k lists, and receives the
//     dense dL/dz [n x V]. Data flow: row statistics (one read of both rows: log-sum-exps,
//     entropies, reverse KL, the sampled token's log-probs, the teacher's top-k selected in
//     the same read, the student's log-probs at those ids and its exact tail; all in double)
//     -> a token batch -> the stages above -> gradient rows (a second read of the student
//     row, and of the teacher row only for a dense term). The gradient needs the batch's
//     decisions (quantiles, normalisers), so it cannot be written during the first read.
//
// Errors: every call returns a tropd::status (first failing token / row and column) and
// writes nothing on failure, except that gradient rows may be partly written when a gradient
// value does not fit its type (found while it is written). An ok status means every output
// is finite.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <memory>
#include <vector>

#include <tropd/config.hpp>
#include <tropd/core/checks.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/sparse_terms.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token.hpp>
#include <tropd/core/token_batch.hpp>
#include <tropd/core/token_rules.hpp>
#include <tropd/core/types.hpp>
#include <tropd/core/values.hpp>
#include <tropd/core/views.hpp>
#include <tropd/host/options.hpp>
#include <tropd/host/parallel.hpp>
#include <tropd/host/row_io.hpp>
#include <tropd/host/row_passes.hpp>
#include <tropd/host/token_stages.hpp>
#include <tropd/objective.hpp>

namespace tropd::host {

/// Token-level evaluation: loss, dL/ds, the sparse top-k gradient, flags and diagnostics.
/// Objectives with a dense full-vocabulary term (GKD) need logits: errc::unsupported here.
/// An objective with a top-k term needs lists of width K = its k (outlier.fkl.k).
template <class Obj>
status evaluate_tokens(const Obj& obj, const token_batch& b, const token_outputs& out, const eval_options& opt = {}) {
  if constexpr (Obj::has_dense) {
    return make_error(errc::unsupported, "objective has a full-vocabulary term: it needs logits (use evaluate_rows)");
  } else {
    token_stages st;
    TROPD_TRY(run_token_stages(obj, b, opt, st, b.topk_ids.cols, &out));
    TROPD_TRY(detail::check_output_range(st.batch, st.a, st.w, detail::output_limit(out)));
    detail::write_token_outputs(st.batch, st.a, st.w, out);
    if (out.loss) *out.loss = st.diag.loss;
    if (out.diag) *out.diag = st.diag;
    return {};
  }
}

namespace detail {

/// The per-row arrays evaluate_rows builds from the rows (double: never narrowed on the way
/// to the per-token rule).
struct row_token_arrays {
  std::vector<double> s, t, ent_s, ent_t, rkl;
  std::vector<int32_t> topk_ids;                  // [n x K], -1: padding
  std::vector<double> topk_teacher, topk_student;  // [n x K]
  std::vector<double> tail;                       // [n] exact log(1 - P_K) (tail bucket), NaN: unknown
  std::vector<origin> from;                       // origin tags after input_policy::mask for rows
  std::vector<estimators::row_summary> sums;
  index_t n_masked_rows = 0;
};

template <class Teacher>
inline constexpr bool teacher_has_logits = !std::is_same_v<Teacher, teacher_logprobs>;
/// The teacher logits' element type (float stands in for a teacher given as log-probs).
template <class Teacher>
struct teacher_element { using type = float; };
template <class T>
struct teacher_element<matrix_view<const T>> { using type = T; };

/// evaluate_rows for either teacher form.
template <class Obj, class TS, class Teacher, class G>
status evaluate_rows(const Obj& obj, matrix_view<const TS> student, const Teacher& teacher, const row_inputs& in,
                     const row_outputs<G>& out, const eval_options& opt) {
  constexpr bool logits = teacher_has_logits<Teacher>;
  using TT = typename teacher_element<Teacher>::type;
  using W = work_type_t<TS, TT>;
  using R = typename Obj::region_type;
  constexpr bool need_topk = Obj::outlier_type::needs_topk;
  TROPD_TRY(obj.check());
  TROPD_TRY(checks::temperatures(in.student_temperature, in.teacher_temperature));
  const index_t n = student.rows, V = student.cols;
  if (!student.valid()) return make_error(errc::shape_mismatch, "student view is malformed (stride < cols or null data)");
  if (n == 0) return make_error(errc::empty_batch, "no rows");
  if (V < 1) return make_error(errc::shape_mismatch, "vocabulary size must be >= 1");
  if (!out.grad.valid() || (out.grad.rows != 0 && (out.grad.rows != n || out.grad.cols != V)))
    return make_error(errc::shape_mismatch, "gradient must be [rows x vocab] like the student logits, or empty");
  if constexpr (logits) {
    TROPD_TRY(checks::teacher_rows(teacher, n, V));
  } else {
    if (teacher.t.size != n) return make_error(errc::shape_mismatch, "teacher log-probs t must have one entry per row");
    if constexpr (Obj::has_dense || R::needs_teacher_entropy || Obj::trust_type::needs_rkl)
      return make_error(errc::unsupported, "this objective reads the teacher's full distribution (entropy, KL or a dense term): pass teacher logits");
  }
  TROPD_TRY(checks::token_ids(in.ids, n, V));
  if (in.from.size != n) return make_error(errc::shape_mismatch, "origin must have one entry per row");
  const bool lists = in.teacher_topk.ids.rows != 0;
  index_t K = 0;
  if constexpr (need_topk) {
    if (lists) {
      TROPD_TRY(checks::topk_lists_shape(in.teacher_topk.ids, in.teacher_topk.logprobs, n));
      TROPD_TRY(check_topk_width(obj, in.teacher_topk.ids.cols));
      K = in.teacher_topk.ids.cols;
      for (index_t r = 0; r < n; ++r)
        if (in.from[r] == origin::student)
          TROPD_TRY(rules::check_topk_list(in.teacher_topk.ids.row(r), in.teacher_topk.logprobs.row(r), K, V, r));
    } else if constexpr (logits) {
      K = std::min<index_t>(obj.outlier.fkl.k, V);  // k > V: the whole vocabulary
    } else {
      return make_error(errc::unsupported, "this objective's outlier term needs teacher top-k lists (row_inputs::teacher_topk) or teacher logits");
    }
    if (in.topk_student_old.rows != 0 && (in.topk_student_old.rows != n || in.topk_student_old.cols != K || !in.topk_student_old.valid()))
      return make_error(errc::shape_mismatch, "topk_student_old must be empty or [n x K]");
  }
  if (out.topk_ids.rows != 0 && (out.topk_ids.rows != n || out.topk_ids.cols != K || !out.topk_ids.valid()))
    return make_error(errc::shape_mismatch, "topk_ids must be empty or [n x K] like the top-k lists");
  const token_outputs tout{out.loss, out.diag, out.dloss_ds, out.advantage, out.dloss_dtopk, out.flags};
  TROPD_TRY(check_token_outputs(tout, n, K));
  const W its = W(1.0 / in.student_temperature), itt = W(1.0 / in.teacher_temperature);

  // Row statistics: pass 1 computes both log-sum-exps always; the entropies and the reverse
  // KL where the region / trust estimator / dense term reads them, or for the diagnostics.
  constexpr estimators::moments_needed dense_reads = [] {
    if constexpr (Obj::has_dense) return estimators::summary_reads_of<typename Obj::dense_type>();
    else return estimators::lse_only;
  }();
  constexpr estimators::moments_needed need_min =
      estimators::moments_needed{R::needs_student_entropy, R::needs_teacher_entropy, Obj::trust_type::needs_rkl, false} | dense_reads;
  constexpr estimators::moments_needed need_diag = need_min | estimators::moments_needed{true, logits, logits, false};
  const bool want_diag = out.diag != nullptr;
  const estimators::moments_needed need = want_diag ? need_diag : need_min;
  const bool exact_tail = [&] {
    if constexpr (need_topk) return obj.outlier.fkl.tail == estimators::topk_tail::tail_bucket;
    else return false;
  }();
  row_token_arrays a;
  a.s.assign(static_cast<size_t>(n), 0.0);
  a.t.assign(static_cast<size_t>(n), 0.0);
  a.ent_s.assign(static_cast<size_t>(n), quiet_nan<double>());
  a.ent_t.assign(static_cast<size_t>(n), quiet_nan<double>());
  a.rkl.assign(static_cast<size_t>(n), quiet_nan<double>());
  a.topk_ids.assign(static_cast<size_t>(n * K), -1);
  a.topk_teacher.assign(static_cast<size_t>(n * K), -inf<double>());
  a.topk_student.assign(static_cast<size_t>(n * K), 0.0);
  if (exact_tail) a.tail.assign(static_cast<size_t>(n), quiet_nan<double>());
  a.from.assign(in.from.begin(), in.from.end());
  a.sums.assign(static_cast<size_t>(n), estimators::row_summary{});
  std::vector<uint8_t> row_masked(static_cast<size_t>(n), 0);
  const bool mask_bad = opt.bad_input == input_policy::mask;
  constexpr bool dense_second = [] {
    if constexpr (Obj::has_dense) return Obj::dense_type::second_pass;
    else return false;
  }();
  TROPD_TRY(parallel_rows(n, opt.threads, [&](index_t b0, index_t e0) -> status {
    auto buf = std::make_unique<row_scratch<W>>();
    if (need_topk && !lists) buf->prepare_topk(int(K));
    if (dense_second) buf->prepare_keep(V, true);  // pass 1b reads pass 1's exponentials
    for (index_t r = b0; r < e0; ++r) {
      const size_t rr = static_cast<size_t>(r);
      auto& sm = a.sums[rr];
      const TS* zs = student.row(r);
      const TT* zt = nullptr;
      if constexpr (logits) zt = teacher.row(r);
      const int select = need_topk && !lists && logits && in.from[r] == origin::student ? int(K) : 0;
      const status st1 = want_diag ? row_pass1<need_diag>(zs, zt, V, its, itt, *buf, r, sm, select)
                                   : row_pass1<need_min>(zs, zt, V, its, itt, *buf, r, sm, select);
      if (!st1.ok()) {
        if (mask_bad && (st1.code == errc::non_finite_input || st1.code == errc::no_finite_entry)) {
          row_masked[rr] = 1;  // the row becomes a prompt row below
          continue;
        }
        return st1;
      }
      if constexpr (Obj::has_dense && logits) {
        if (in.from[r] != origin::prompt) {
          if (!obj.dense.finite(sm)) return make_error(errc::infinite_divergence, "the dense divergence is infinite for this row", r);
          if constexpr (Obj::dense_type::second_pass) row_pass1b(obj.dense, zs, zt, V, its, itt, *buf, sm);
        }
      }
      const int32_t y = in.ids[r];
      a.s[rr] = rules::log_prob_at(zs, y, its, sm.lse_s);
      if constexpr (logits) {
        a.t[rr] = rules::log_prob_at(zt, y, itt, sm.lse_t);
        a.ent_t[rr] = sm.ent_t;
        a.rkl[rr] = sm.rkl;  // may be +inf: the rule that reads it decides (never a stand-in)
      } else {
        a.t[rr] = teacher.t[r];
      }
      a.ent_s[rr] = sm.ent_s;
      if (in.from[r] != origin::prompt && a.s[rr] == -inf<double>())
        return make_error(errc::infinite_divergence, "the student gives zero mass to the token at this row", r, y);
      if (!need_topk || in.from[r] != origin::student) continue;
      // The top-k list of this row and the student's log-probs at its ids.
      int32_t* ids = a.topk_ids.data() + r * K;
      double* lq = a.topk_teacher.data() + r * K;
      double* ls = a.topk_student.data() + r * K;
      if (lists) {
        const values_row lp = in.teacher_topk.logprobs.row(r);
        for (index_t k = 0; k < K; ++k) {
          lq[k] = lp[k];
          ids[k] = lq[k] == -inf<double>() ? -1 : in.teacher_topk.ids(r, k);
        }
      } else {
        for (index_t k = 0; k < K; ++k) {
          ids[k] = buf->topk_ids[static_cast<size_t>(k)];
          lq[k] = ids[k] < 0 ? -inf<double>() : double(buf->topk_vals[static_cast<size_t>(k)]) - sm.lse_t;
        }
      }
      for (index_t k = 0; k < K; ++k) ls[k] = lq[k] == -inf<double>() ? 0.0 : rules::log_prob_at(zs, ids[k], its, sm.lse_s);
      if (exact_tail) a.tail[rr] = student_tail_log(zs, V, its, sm.lse_s, ids, lq, int(K), *buf);
    }
    return {};
  }));
  for (index_t r = 0; r < n; ++r)
    if (row_masked[static_cast<size_t>(r)] && a.from[static_cast<size_t>(r)] != origin::prompt) {
      a.from[static_cast<size_t>(r)] = origin::prompt;
      ++a.n_masked_rows;
    }

  // The token batch of the rows, then the same stages as evaluate_tokens.
  token_batch b;
  b.s = values_view(view_of(a.s));
  b.s_old = in.s_old;
  b.t = values_view(view_of(a.t));
  b.from = {a.from.data(), n};
  b.seq_offsets = in.seq_offsets;
  b.seq_ids = in.seq_ids;
  if (need.ent_s) b.student_entropy = values_view(view_of(a.ent_s));
  if (logits && need.ent_t) b.teacher_entropy = values_view(view_of(a.ent_t));
  if (logits && need.rkl) b.rkl = values_view(view_of(a.rkl));
  b.ref = in.ref;
  if constexpr (need_topk) {
    b.topk_ids = make_matrix<const int32_t>(a.topk_ids.data(), n, K);
    b.topk_teacher = make_matrix<const double>(a.topk_teacher.data(), n, K);
    b.topk_student = make_matrix<const double>(a.topk_student.data(), n, K);
    b.topk_student_old = in.topk_student_old;
    if (exact_tail) b.topk_student_tail_log = values_view(view_of(a.tail));
  }
  token_stages st;
  TROPD_TRY(run_token_stages(obj, b, opt, st));
  st.diag.n_masked_input += a.n_masked_rows;
  if constexpr (Obj::has_dense) {
    for (index_t r = 0; r < n; ++r) {
      const double wr = st.w[static_cast<size_t>(r)];
      if (wr != 0) st.diag.loss_dense += wr * obj.dense_weight * obj.dense.value(a.sums[static_cast<size_t>(r)]);
    }
    st.diag.loss += st.diag.loss_dense;
    if (!is_finite(st.diag.loss)) return make_error(errc::infinite_divergence, "the loss is not finite in double");
  }
  const double limit = out.grad.rows ? min_(output_limit(tout), double(max_finite(scalar_type_of<G>()))) : output_limit(tout);
  TROPD_TRY(check_output_range(st.batch, st.a, st.w, limit));

  // Gradient rows: dL/dz_r = w_r / T_S (dense_weight dense_r + the row's sparse terms).
  if (out.grad.rows) {
    const bool stream = stream_gradient(out.grad);
    TROPD_TRY(parallel_rows(n, opt.threads, [&](index_t b0, index_t e0) -> status {
      auto buf = std::make_unique<row_scratch<W>>();
      buf->row_ids.resize(static_cast<size_t>(K + 1));
      buf->row_coef.resize(static_cast<size_t>(K + 1));
      status first{};  // the lowest failing row of the block (the walk goes on after a failure)
      for (index_t r = e0; r-- > b0;) {  // backwards: the last rows read may still be cached
        const size_t rr = static_cast<size_t>(r);
        const token_result& tr = st.a.tok[rr];
        const double scale = st.w[rr] / in.student_temperature;
        const sparse_terms sp = build_sparse_terms(a.topk_ids.data() + r * K, values_row{a.topk_teacher.data() + r * K, scalar_type::f64},
                                                   tr.topk_grad ? st.a.g_topk.data() + r * K : nullptr, int(K), tr.topk_tail_coef,
                                                   tr.topk_tail_teacher, in.ids[r], tr.dloss_ds, buf->row_ids.data(), buf->row_coef.data());
        const auto& sm = a.sums[rr];
        index_t bad = -1;
        if constexpr (Obj::has_dense && logits) {
          if (st.batch.from[r] != origin::prompt)
            bad = row_pass2(obj.dense, student.row(r), teacher.row(r), V, its, itt, *buf, sm, obj.dense_weight, sp, scale, out.grad.row(r), stream);
          else
            bad = row_pass2(no_dense{}, student.row(r), static_cast<const TT*>(nullptr), V, its, itt, *buf, sm, 0.0, sp, 0.0, out.grad.row(r), stream);
        } else {
          bad = row_pass2(no_dense{}, student.row(r), static_cast<const TT*>(nullptr), V, its, itt, *buf, sm, 0.0, sp, scale, out.grad.row(r), stream);
        }
        if (const status s = gradient_status(r, bad); !s.ok()) first = s;
      }
      return first;
    }));
  }
  write_token_outputs(st.batch, st.a, st.w, tout);
  if (out.topk_ids.rows)
    for (index_t r = 0; r < n; ++r)
      for (index_t k = 0; k < K; ++k) out.topk_ids(r, k) = a.topk_ids[static_cast<size_t>(r * K + k)];
  if (out.loss) *out.loss = st.diag.loss;
  if (out.diag) *out.diag = st.diag;
  return {};
}

}  // namespace detail

/// Row-level evaluation with teacher logits [n x V] (any logit_element type). The teacher's
/// top-k ids are selected from its rows where the outlier handler needs them (K = min(k, V)),
/// unless row_inputs::teacher_topk gives them (then the logits still give t, H_T and the KL).
template <class Obj, logit_element TS, logit_element TT, grad_element G = float>
status evaluate_rows(const Obj& obj, matrix_view<const TS> student, matrix_view<const TT> teacher, const row_inputs& in,
                     const row_outputs<G>& out, const eval_options& opt = {}) {
  return detail::evaluate_rows(obj, student, teacher, in, out, opt);
}

/// Row-level evaluation with the teacher given as log-probs of the rows' tokens (and, for a
/// top-k outlier term, its top-k lists in row_inputs::teacher_topk): a served teacher.
template <class Obj, logit_element TS, grad_element G = float>
status evaluate_rows(const Obj& obj, matrix_view<const TS> student, const teacher_logprobs& teacher, const row_inputs& in,
                     const row_outputs<G>& out, const eval_options& opt = {}) {
  return detail::evaluate_rows(obj, student, teacher, in, out, opt);
}

}  // namespace tropd::host
