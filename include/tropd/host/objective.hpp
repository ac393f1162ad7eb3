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

// evaluate_rows in phases, each a function of its own so that the fused LM head
// (host/fused_lm_head.hpp) runs the same code over chunks of rows whose logits it computes:
//   check_teacher, plan_rows   argument checks; what the call computes (row_plan)
//   init_row_arrays            the per-row arrays (row_token_arrays)
//   row_statistics             one row: pass 1 (and 1b), log-probs, top-k, tail
//   mark_masked_rows, row_batch, finish_stages
//                              the token batch of the rows; after the token stages: masked
//                              rows, the dense term's loss
//   row_gradient               one row: its sparse terms and pass 2
//   write_row_outputs          the per-token outputs, loss and diagnostics

/// What a row-level call computes for an objective, decided once per call. `Logits`: the
/// teacher is given as logits (else as log-probs of the rows' tokens).
template <class Obj, bool Logits>
struct row_plan {
  using region_type = typename Obj::region_type;
  static constexpr bool logits = Logits;
  static constexpr bool need_topk = Obj::outlier_type::needs_topk;
  // Row statistics: pass 1 computes both log-sum-exps always; the entropies and the reverse
  // KL where the region / trust estimator / dense term reads them, or for the diagnostics.
  static constexpr estimators::moments_needed dense_reads = [] {
    if constexpr (Obj::has_dense) return estimators::summary_reads_of<typename Obj::dense_type>();
    else return estimators::lse_only;
  }();
  static constexpr estimators::moments_needed need_min =
      estimators::moments_needed{region_type::needs_student_entropy, region_type::needs_teacher_entropy, Obj::trust_type::needs_rkl, false} |
      dense_reads;
  static constexpr estimators::moments_needed need_diag = need_min | estimators::moments_needed{true, logits, logits, false};
  static constexpr bool dense_second = [] {
    if constexpr (Obj::has_dense) return Obj::dense_type::second_pass;
    else return false;
  }();
  index_t n = 0, V = 0;
  index_t K = 0;           ///< top-k width (0: no top-k term)
  bool lists = false;      ///< the teacher's top-k lists are given (row_inputs::teacher_topk)
  bool want_diag = false;  ///< diagnostics asked for (pass 1 computes every moment)
  bool exact_tail = false; ///< the tail bucket: the student's exact tail per row
  bool mask_bad = false;   ///< input_policy::mask
  constexpr estimators::moments_needed need() const noexcept { return want_diag ? need_diag : need_min; }
};

/// The teacher's shape against n rows of V entries: logits [n x V], or log-probs [n] for an
/// objective that reads nothing else of the teacher's distribution.
template <class Obj, class Teacher>
status check_teacher(const Obj&, const Teacher& teacher, index_t n, index_t V) {
  using R = typename Obj::region_type;
  if constexpr (teacher_has_logits<Teacher>) {
    return checks::teacher_rows(teacher, n, V);
  } else {
    if (teacher.t.size != n) return make_error(errc::shape_mismatch, "teacher log-probs t must have one entry per row");
    if constexpr (Obj::has_dense || R::needs_teacher_entropy || Obj::trust_type::needs_rkl)
      return make_error(errc::unsupported, "this objective reads the teacher's full distribution (entropy, KL or a dense term): pass teacher logits");
    return {};
  }
}

/// Checks the per-row inputs of n rows of V entries and the per-token outputs, and fills the plan.
template <bool Logits, class Obj>
status plan_rows(const Obj& obj, index_t n, index_t V, const row_inputs& in, const token_outputs& tout,
                 matrix_view<int32_t> topk_ids_out, const eval_options& opt, row_plan<Obj, Logits>& p) {
  constexpr bool need_topk = Obj::outlier_type::needs_topk;
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
    } else if constexpr (Logits) {
      K = std::min<index_t>(obj.outlier.fkl.k, V);  // k > V: the whole vocabulary
    } else {
      return make_error(errc::unsupported, "this objective's outlier term needs teacher top-k lists (row_inputs::teacher_topk) or teacher logits");
    }
    if (in.topk_student_old.rows != 0 && (in.topk_student_old.rows != n || in.topk_student_old.cols != K || !in.topk_student_old.valid()))
      return make_error(errc::shape_mismatch, "topk_student_old must be empty or [n x K]");
  }
  if (topk_ids_out.rows != 0 && (topk_ids_out.rows != n || topk_ids_out.cols != K || !topk_ids_out.valid()))
    return make_error(errc::shape_mismatch, "topk_ids must be empty or [n x K] like the top-k lists");
  TROPD_TRY(check_token_outputs(tout, n, K));
  p.n = n;
  p.V = V;
  p.K = K;
  p.lists = lists;
  p.want_diag = tout.diag != nullptr;
  p.exact_tail = [&] {
    if constexpr (need_topk) return obj.outlier.fkl.tail == estimators::topk_tail::tail_bucket;
    else return false;
  }();
  p.mask_bad = opt.bad_input == input_policy::mask;
  return {};
}

/// The per-row arrays of a call, before any row is read.
template <class Plan>
void init_row_arrays(const Plan& p, const row_inputs& in, row_token_arrays& a) {
  const size_t n = static_cast<size_t>(p.n), nk = static_cast<size_t>(p.n * p.K);
  a.s.assign(n, 0.0);
  a.t.assign(n, 0.0);
  a.ent_s.assign(n, quiet_nan<double>());
  a.ent_t.assign(n, quiet_nan<double>());
  a.rkl.assign(n, quiet_nan<double>());
  a.topk_ids.assign(nk, -1);
  a.topk_teacher.assign(nk, -inf<double>());
  a.topk_student.assign(nk, 0.0);
  if (p.exact_tail) a.tail.assign(n, quiet_nan<double>());
  a.from.assign(in.from.begin(), in.from.end());
  a.sums.assign(n, estimators::row_summary{});
  a.n_masked_rows = 0;
}

/// A thread's row scratch for row_statistics.
template <class Plan, class W>
void prepare_stats_scratch(const Plan& p, row_scratch<W>& buf) {
  if (Plan::need_topk && !p.lists) buf.prepare_topk(int(p.K));
  if (Plan::dense_second) buf.prepare_keep(p.V, true);  // pass 1b reads pass 1's exponentials
}

/// The statistics of row r: zs is its student logits row; zt its teacher logits row (Logits),
/// else nullptr and t_given the teacher's log-prob of the row's token. Fills a's row r; under
/// input_policy::mask a row with NaN / +inf logits sets row_masked[r] instead (then it
/// becomes a prompt row: mark_masked_rows).
template <class Plan, class Obj, class W, class TS, class TT>
status row_statistics(const Obj& obj, const Plan& p, const TS* zs, const TT* zt, double t_given, const row_inputs& in, index_t r,
                      W its, W itt, row_scratch<W>& buf, row_token_arrays& a, uint8_t* row_masked) {
  constexpr bool need_topk = Plan::need_topk;
  const index_t V = p.V, K = p.K;
  const size_t rr = static_cast<size_t>(r);
  auto& sm = a.sums[rr];
  const int select = need_topk && !p.lists && Plan::logits && in.from[r] == origin::student ? int(K) : 0;
  const status st1 = p.want_diag ? row_pass1<Plan::need_diag>(zs, zt, V, its, itt, buf, r, sm, select)
                                 : row_pass1<Plan::need_min>(zs, zt, V, its, itt, buf, r, sm, select);
  if (!st1.ok()) {
    if (p.mask_bad && (st1.code == errc::non_finite_input || st1.code == errc::no_finite_entry)) {
      row_masked[rr] = 1;  // the row becomes a prompt row (mark_masked_rows)
      return {};
    }
    return st1;
  }
  if constexpr (Obj::has_dense && Plan::logits) {
    if (in.from[r] != origin::prompt) {
      if (!obj.dense.finite(sm)) return make_error(errc::infinite_divergence, "the dense divergence is infinite for this row", r);
      if constexpr (Obj::dense_type::second_pass) row_pass1b(obj.dense, zs, zt, V, its, itt, buf, sm);
    }
  }
  const int32_t y = in.ids[r];
  a.s[rr] = rules::log_prob_at(zs, y, its, sm.lse_s);
  if constexpr (Plan::logits) {
    a.t[rr] = rules::log_prob_at(zt, y, itt, sm.lse_t);
    a.ent_t[rr] = sm.ent_t;
    a.rkl[rr] = sm.rkl;  // may be +inf: the rule that reads it decides (never a stand-in)
  } else {
    a.t[rr] = t_given;
  }
  a.ent_s[rr] = sm.ent_s;
  if (in.from[r] != origin::prompt && a.s[rr] == -inf<double>())
    return make_error(errc::infinite_divergence, "the student gives zero mass to the token at this row", r, y);
  if (!need_topk || in.from[r] != origin::student) return {};
  // The top-k list of this row and the student's log-probs at its ids.
  int32_t* ids = a.topk_ids.data() + r * K;
  double* lq = a.topk_teacher.data() + r * K;
  double* ls = a.topk_student.data() + r * K;
  if (p.lists) {
    const values_row lp = in.teacher_topk.logprobs.row(r);
    for (index_t k = 0; k < K; ++k) {
      lq[k] = lp[k];
      ids[k] = lq[k] == -inf<double>() ? -1 : in.teacher_topk.ids(r, k);
    }
  } else {
    for (index_t k = 0; k < K; ++k) {
      ids[k] = buf.topk_ids[static_cast<size_t>(k)];
      lq[k] = ids[k] < 0 ? -inf<double>() : double(buf.topk_vals[static_cast<size_t>(k)]) - sm.lse_t;
    }
  }
  for (index_t k = 0; k < K; ++k) ls[k] = lq[k] == -inf<double>() ? 0.0 : rules::log_prob_at(zs, ids[k], its, sm.lse_s);
  if (p.exact_tail) a.tail[rr] = student_tail_log(zs, V, its, sm.lse_s, ids, lq, int(K), buf);
  return {};
}

/// Rows that row_statistics masked become prompt rows (counted in n_masked_rows).
inline void mark_masked_rows(row_token_arrays& a, const uint8_t* row_masked) {
  const index_t n = static_cast<index_t>(a.from.size());
  for (index_t r = 0; r < n; ++r)
    if (row_masked[r] && a.from[static_cast<size_t>(r)] != origin::prompt) {
      a.from[static_cast<size_t>(r)] = origin::prompt;
      ++a.n_masked_rows;
    }
}

/// The token batch of the rows (views of a's arrays and the caller's per-token inputs): the
/// arrays the objective reads (`need`; teacher entropies and the KL only with teacher logits),
/// the top-k arrays with a top-k term, the exact tail with the tail bucket.
inline token_batch row_token_batch(const row_token_arrays& a, const row_inputs& in, index_t K, estimators::moments_needed need,
                                   bool logits, bool need_topk, bool exact_tail) {
  const index_t n = static_cast<index_t>(a.s.size());
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
  if (need_topk) {
    b.topk_ids = make_matrix<const int32_t>(a.topk_ids.data(), n, K);
    b.topk_teacher = make_matrix<const double>(a.topk_teacher.data(), n, K);
    b.topk_student = make_matrix<const double>(a.topk_student.data(), n, K);
    b.topk_student_old = in.topk_student_old;
    if (exact_tail) b.topk_student_tail_log = values_view(view_of(a.tail));
  }
  return b;
}

/// row_token_batch with a call's plan.
template <class Plan>
token_batch row_batch(const Plan& p, const row_token_arrays& a, const row_inputs& in) {
  return row_token_batch(a, in, p.K, p.need(), Plan::logits, Plan::need_topk, p.exact_tail);
}

/// After the token stages: the masked rows' count and the dense term's loss.
template <class Obj>
status finish_stages(const Obj& obj, const row_token_arrays& a, token_stages& st) {
  st.diag.n_masked_input += a.n_masked_rows;
  if constexpr (Obj::has_dense) {
    const index_t n = static_cast<index_t>(a.sums.size());
    for (index_t r = 0; r < n; ++r) {
      const double wr = st.w[static_cast<size_t>(r)];
      if (wr != 0) st.diag.loss_dense += wr * obj.dense_weight * obj.dense.value(a.sums[static_cast<size_t>(r)]);
    }
    st.diag.loss += st.diag.loss_dense;
    if (!is_finite(st.diag.loss)) return make_error(errc::infinite_divergence, "the loss is not finite in double");
  }
  return {};
}

/// The largest value an output of the call may take (the per-token outputs' and, where a
/// gradient of type G is written, G's largest finite value).
template <class G>
double row_output_limit(const token_outputs& tout, bool gradient) {
  return gradient ? min_(output_limit(tout), double(max_finite(scalar_type_of<G>()))) : output_limit(tout);
}

/// A thread's row scratch for row_gradient.
template <class Plan, class W>
void prepare_grad_scratch(const Plan& p, row_scratch<W>& buf) {
  buf.row_ids.resize(static_cast<size_t>(p.K + 1));
  buf.row_coef.resize(static_cast<size_t>(p.K + 1));
}

/// Row r's gradient dL/dz_r = w_r / T_S (dense_weight dense_r + the row's sparse terms) into
/// out [V], from its logits rows (zt: nullptr for a teacher given as log-probs; read only for
/// a dense term). Returns -1 or the first column whose value does not fit G (gradient_status).
template <class Plan, class Obj, class W, class TS, class TT, class G>
index_t row_gradient(const Obj& obj, const Plan& p, const TS* zs, const TT* zt, const row_inputs& in, index_t r,
                     const row_token_arrays& a, const token_stages& st, W its, W itt, row_scratch<W>& buf, G* out, bool stream) {
  const index_t V = p.V, K = p.K;
  const size_t rr = static_cast<size_t>(r);
  const token_result& tr = st.a.tok[rr];
  const double scale = st.w[rr] / in.student_temperature;
  const sparse_terms sp = build_sparse_terms(a.topk_ids.data() + r * K, values_row{a.topk_teacher.data() + r * K, scalar_type::f64},
                                             tr.topk_grad ? st.a.g_topk.data() + r * K : nullptr, int(K), tr.topk_tail_coef,
                                             tr.topk_tail_teacher, in.ids[r], tr.dloss_ds, buf.row_ids.data(), buf.row_coef.data());
  const auto& sm = a.sums[rr];
  if constexpr (Obj::has_dense && Plan::logits) {
    if (st.batch.from[r] != origin::prompt)
      return row_pass2(obj.dense, zs, zt, V, its, itt, buf, sm, obj.dense_weight, sp, scale, out, stream);
    return row_pass2(no_dense{}, zs, static_cast<const TT*>(nullptr), V, its, itt, buf, sm, 0.0, sp, 0.0, out, stream);
  } else {
    (void)zt;
    return row_pass2(no_dense{}, zs, static_cast<const TT*>(nullptr), V, its, itt, buf, sm, 0.0, sp, scale, out, stream);
  }
}

/// The per-token outputs, the selected top-k ids, the loss and the diagnostics.
template <class Plan>
void write_row_outputs(const Plan& p, const row_token_arrays& a, const token_stages& st, const token_outputs& tout,
                       matrix_view<int32_t> topk_ids_out) {
  write_token_outputs(st.batch, st.a, st.w, tout);
  if (topk_ids_out.rows)
    for (index_t r = 0; r < p.n; ++r)
      for (index_t k = 0; k < p.K; ++k) topk_ids_out(r, k) = a.topk_ids[static_cast<size_t>(r * p.K + k)];
  if (tout.loss) *tout.loss = st.diag.loss;
  if (tout.diag) *tout.diag = st.diag;
}

/// evaluate_rows for either teacher form.
template <class Obj, class TS, class Teacher, class G>
status evaluate_rows(const Obj& obj, matrix_view<const TS> student, const Teacher& teacher, const row_inputs& in,
                     const row_outputs<G>& out, const eval_options& opt) {
  constexpr bool logits = teacher_has_logits<Teacher>;
  using TT = typename teacher_element<Teacher>::type;
  using W = work_type_t<TS, TT>;
  TROPD_TRY(obj.check());
  TROPD_TRY(checks::objective_rows(student, out.grad, in.student_temperature, in.teacher_temperature));
  const index_t n = student.rows, V = student.cols;
  TROPD_TRY(check_teacher(obj, teacher, n, V));
  const token_outputs tout{out.loss, out.diag, out.dloss_ds, out.advantage, out.dloss_dtopk, out.flags};
  row_plan<Obj, logits> p;
  TROPD_TRY(plan_rows(obj, n, V, in, tout, out.topk_ids, opt, p));
  const W its = W(1.0 / in.student_temperature), itt = W(1.0 / in.teacher_temperature);

  // Row statistics (one read of both rows).
  row_token_arrays a;
  init_row_arrays(p, in, a);
  std::vector<uint8_t> row_masked(static_cast<size_t>(n), 0);
  TROPD_TRY(parallel_rows(n, opt.threads, [&](index_t b0, index_t e0) -> status {
    auto buf = std::make_unique<row_scratch<W>>();
    prepare_stats_scratch(p, *buf);
    for (index_t r = b0; r < e0; ++r) {
      const TT* zt = nullptr;
      double t = 0;
      if constexpr (logits) zt = teacher.row(r);
      else t = teacher.t[r];
      TROPD_TRY(row_statistics(obj, p, student.row(r), zt, t, in, r, its, itt, *buf, a, row_masked.data()));
    }
    return {};
  }));
  mark_masked_rows(a, row_masked.data());

  // The token batch of the rows, then the same stages as evaluate_tokens.
  const token_batch b = row_batch(p, a, in);
  token_stages st;
  TROPD_TRY(run_token_stages(obj, b, opt, st));
  TROPD_TRY(finish_stages(obj, a, st));
  TROPD_TRY(check_output_range(st.batch, st.a, st.w, row_output_limit<G>(tout, out.grad.rows != 0)));

  // Gradient rows: dL/dz_r = w_r / T_S (dense_weight dense_r + the row's sparse terms).
  if (out.grad.rows) {
    const bool stream = stream_gradient(out.grad);
    TROPD_TRY(parallel_rows(n, opt.threads, [&](index_t b0, index_t e0) -> status {
      auto buf = std::make_unique<row_scratch<W>>();
      prepare_grad_scratch(p, *buf);
      status first{};  // the lowest failing row of the block (the walk goes on after a failure)
      for (index_t r = e0; r-- > b0;) {  // backwards: the last rows read may still be cached
        const TT* zt = nullptr;
        if constexpr (logits) zt = teacher.row(r);
        const index_t bad = row_gradient(obj, p, student.row(r), zt, in, r, a, st, its, itt, *buf, out.grad.row(r), stream);
        if (const status s = gradient_status(r, bad); !s.ok()) first = s;
      }
      return first;
    }));
  }
  write_row_outputs(p, a, st, tout, out.topk_ids);
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
