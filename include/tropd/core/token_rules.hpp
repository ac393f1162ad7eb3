// tropd/core/token_rules.hpp: what every backend does per token, defined once (host and
// device): the token and top-k views of a batch entry, the value checks, the top-k list
// rules, the log-probability at an id, a scaled logit's verdict, and the sequence of a token.
//
// The host's token stages (host/token_stages.hpp), the host row functions (host/rows.hpp,
// host/objective.hpp) and the CUDA kernels (gpu/) call these functions; none of them builds a
// token, checks a value or reads "log p at id" any other way.
#pragma once

#include <stdint.h>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token.hpp>
#include <tropd/core/token_batch.hpp>
#include <tropd/core/types.hpp>

namespace tropd::rules {

/// log p(id) of a logits row read in the work type W at inverse temperature inv_t:
/// (W(z_id) * inv_t) - lse, the product rounded in W as in the row passes, the difference in double.
template <class W, class T>
TROPD_HD inline double log_prob_at(const T* row, int32_t id, W inv_t, double lse) noexcept {
  return double(static_cast<W>(to_acc(row[id])) * inv_t) - lse;
}

/// A logit's verdict once scaled by the inverse temperature in the work type, x = W(raw) / T
/// (the row passes compute x): ok when x is finite or raw is -inf (zero mass, legal);
/// non_finite_input for a NaN / +inf input; unsupported for a finite input that left W's range
/// (+inf, or -inf, which would otherwise read as "zero mass"), e.g. 3e38 at T = 0.05 in fp32.
template <class T, class W>
TROPD_HD inline errc scaled_logit_error(T raw, W x) noexcept {
  if (x < inf<W>() && x != -inf<W>()) return errc::ok;
  const bool finite_in = is_finite(to_acc(raw));
  if (x == -inf<W>() && !finite_in) return errc::ok;
  return finite_in ? errc::unsupported : errc::non_finite_input;
}

/// The sequence of token i: the last j with off[j] <= i (binary search; offsets validated).
TROPD_HD inline index_t sequence_of(const index_t* off, index_t n_seq, index_t i) noexcept {
  index_t lo = 0, hi = n_seq;  // off[lo] <= i < off[hi]
  while (hi - lo > 1) {
    const index_t mid = lo + (hi - lo) / 2;
    if (off[mid] <= i) lo = mid;
    else hi = mid;
  }
  return lo;
}

/// The token view of batch entry i, whose sequence is j (= sequence_of(...)).
TROPD_HD inline token make_token(const token_batch& b, index_t i, index_t j) noexcept {
  token tk;
  tk.from = b.from[i];
  tk.s = b.s[i];
  tk.s_old = b.s_old.size ? b.s_old[i] : tk.s;
  tk.t = b.t[i];
  tk.R = tk.t - tk.s_old;
  if (b.student_entropy.size) tk.ent_s = b.student_entropy[i];
  if (b.teacher_entropy.size) tk.ent_t = b.teacher_entropy[i];
  if (b.rkl.size) tk.rkl = b.rkl[i];
  if (b.ref.size) tk.ref = b.ref[i];
  tk.seq_id = b.seq_ids.size ? b.seq_ids[j] : static_cast<uint64_t>(j);
  tk.position = static_cast<uint64_t>(i - b.seq_offsets[j]);
  tk.seq_index = j;
  return tk;
}

/// The top-k view of batch entry i (k = 0 when the batch has no lists).
TROPD_HD inline topk_row make_topk_row(const token_batch& b, index_t i) noexcept {
  topk_row r;
  if (b.topk_teacher.rows == 0) return r;
  r.k = static_cast<int>(b.topk_teacher.cols);
  r.teacher = b.topk_teacher.row(i);
  if (b.topk_student.rows) r.student = b.topk_student.row(i);
  r.student_old = b.topk_student_old.rows ? b.topk_student_old.row(i) : r.student;
  if (b.topk_student_tail_log.size) r.student_tail_log = b.topk_student_tail_log[i];
  return r;
}

/// NaN or +inf (and -inf unless allowed).
TROPD_HD inline bool bad_value(double x, bool allow_neg_inf) noexcept {
  return is_nan(x) || x == inf<double>() || (!allow_neg_inf && x == -inf<double>());
}

/// Log-probabilities above this are taken for logits passed by mistake.
inline constexpr double logprob_slack = 1e-4;

/// The value checks of batch entry i (prompt tokens are never read): finiteness and ranges of
/// its log-probs, entropies, extras and (with `topk`, student tokens only) its top-k entries.
/// Returns the first violation, with the token as row and the list entry as column.
TROPD_HD inline status check_token_values(const token_batch& b, index_t i, bool topk) noexcept {
  if (b.from[i] == origin::prompt) return {};
  const double s = b.s[i], t = b.t[i];
  if (!is_finite(s)) return make_error(errc::non_finite_input, "student log-prob s is not finite", i);
  if (s > logprob_slack) return make_error(errc::invalid_parameter, "student log-prob s is > 0 (pass log-probabilities, not logits)", i);
  if (bad_value(t, true)) return make_error(errc::non_finite_input, "teacher log-prob t is NaN or +inf", i);
  if (t > logprob_slack) return make_error(errc::invalid_parameter, "teacher log-prob t is > 0 (pass log-probabilities, not logits)", i);
  if (b.s_old.size && !is_finite(b.s_old[i])) return make_error(errc::non_finite_input, "s_old is not finite", i);
  if (b.student_entropy.size && bad_value(b.student_entropy[i], false)) return make_error(errc::non_finite_input, "student_entropy is not finite", i);
  if (b.teacher_entropy.size && bad_value(b.teacher_entropy[i], false)) return make_error(errc::non_finite_input, "teacher_entropy is not finite", i);
  // A per-position KL may be +inf (a support mismatch); the rule that reads it decides.
  if (b.rkl.size && (is_nan(b.rkl[i]) || b.rkl[i] == -inf<double>())) return make_error(errc::non_finite_input, "rkl is NaN or -inf", i);
  if (b.ref.size && bad_value(b.ref[i], true)) return make_error(errc::non_finite_input, "ref is NaN or +inf", i);
  if (!topk || b.from[i] != origin::student) return {};
  const index_t K = b.topk_ids.cols;
  const values_row lq = b.topk_teacher.row(i);
  for (index_t k = 0; k < K; ++k) {
    const double q = lq[k];
    if (bad_value(q, true)) return make_error(errc::non_finite_input, "topk_teacher is NaN or +inf", i, k);
    if (q == -inf<double>()) continue;
    if (bad_value(b.topk_student(i, k), true)) return make_error(errc::non_finite_input, "topk_student is NaN or +inf", i, k);
    if (b.topk_student_old.rows && bad_value(b.topk_student_old(i, k), true))
      return make_error(errc::non_finite_input, "topk_student_old is NaN or +inf", i, k);
  }
  if (b.topk_student_tail_log.size && b.topk_student_tail_log[i] > 1e-9)
    return make_error(errc::invalid_parameter, "topk_student_tail_log is > 0 (a log-mass)", i);
  return {};
}

/// The id rules of entry e of a top-k list (ids, teacher log-probs; K entries): a padding
/// entry (teacher -inf) is never checked; otherwise the id lies in [0, V) (V < 0: unknown,
/// only id >= 0) and no earlier non-padding entry has the same id. `row` names the token.
template <class Q>
TROPD_HD inline status check_topk_id(const int32_t* ids, const Q& teacher, index_t e, index_t V, index_t row) noexcept {
  if (double(teacher[e]) == -inf<double>()) return {};
  const int32_t id = ids[e];
  if (id < 0 || (V >= 0 && id >= V)) return make_error(errc::id_out_of_range, "top-k id outside [0, V)", row, e);
  for (index_t j = 0; j < e; ++j)
    if (double(teacher[j]) != -inf<double>() && ids[j] == id) return make_error(errc::duplicate_topk_id, "top-k list repeats an id", row, e);
  return {};
}

/// Every rule of a given teacher list (row level, or a server's list): per entry in order,
/// the teacher log-prob is not NaN / +inf, then check_topk_id.
template <class Q>
TROPD_HD inline status check_topk_list(const int32_t* ids, const Q& teacher, index_t K, index_t V, index_t row) noexcept {
  for (index_t e = 0; e < K; ++e) {
    if (bad_value(double(teacher[e]), true)) return make_error(errc::non_finite_input, "teacher top-k log-prob is NaN or +inf", row, e);
    const status st = check_topk_id(ids, teacher, e, V, row);
    if (!st.ok()) return st;
  }
  return {};
}

}  // namespace tropd::rules
