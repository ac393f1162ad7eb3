// fuzz/judge.hpp: the oracle's judging, written once for every fuzz target (rows, topk,
// objective; fuzz/targets.hpp). A target decodes a case, computes what it accepts from the
// naive long-double references (tests/reference/) and the documented rules
// (docs/robustness.md), calls the library, and hands the answer to these judges:
//
//   error_outcome / matches      one acceptable error: a code and a position
//   judge_error                  a call that must fail with one error and write nothing
//   row_expect                   what a row accepts (rows and topk targets): first-pass errors,
//                                output-check errors, a value with its reference and tolerance
//   expect_gradient_overflow     K4 / R2: a gradient beyond its type is an output-check error
//   tolerate_flushed_grad_scale  a grad_scale / T_S below the work type's normal range
//   accept_values_in_range_zone  near the work type's range a close result stays acceptable
//   judge_failure                a failed row call: the error, its row, the untouched outputs
//   judge_rows                   a row call's whole answer (error, failure or values)
//   judge_value                  one output of an ok call: finite, and close to its reference
//
// A failure throws (common.hpp's `fail`) with a message and, where the mismatch is an open
// library issue, its `known` tag. An outcome may carry such a tag (docs/robustness.md, "Known
// issues"): matching it fails the check with that tag, and the libFuzzer wrappers skip such
// inputs when TROPD_FUZZ_IGNORE_KNOWN=1 (the test.sh stage), so fuzzing keeps looking for new
// problems while the corpus replay keeps failing until the issue is fixed.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common.hpp"

namespace tropd_fuzz {

// ---------------------------------------------------------------------------
// Outcomes.
// ---------------------------------------------------------------------------

inline constexpr index_t any_pos = -2;

/// One acceptable error: a code and a position (any_pos: not checked).
struct error_outcome {
  errc code = errc::ok;
  index_t row = -1, col = -1;
  std::string known;  ///< non-empty: accepted only as a known open issue
};

inline bool matches(const tropd::status& st, const error_outcome& e) {
  return st.code == e.code && (e.row == any_pos || st.row == e.row) && (e.col == any_pos || st.col == e.col);
}

inline std::string status_str(const tropd::status& st) {
  return cat(code_name(st.code), " (row ", st.row, ", col ", st.col, ") \"", st.detail ? st.detail : "", "\"");
}
inline std::string outcome_str(const error_outcome& e) {
  return cat(code_name(e.code), " (row ", e.row == any_pos ? std::string("*") : std::to_string(e.row), ", col ",
             e.col == any_pos ? std::string("*") : std::to_string(e.col), ")", e.known.empty() ? "" : " [known " + e.known + "]");
}

/// |got - ref| <= tol, with NaN/inf in `got` always failing.
inline bool close(ld got, ld ref, ld tol) { return std::isfinite(got) && std::fabs(got - ref) <= tol; }

/// What the oracle accepts for one row (rows and topk targets).
struct row_expect {
  std::vector<error_outcome> errors;  ///< acceptable errors found by the first pass (outputs untouched)
  /// acceptable errors of the output checks (a loss or gradient that does not fit its type):
  /// losses untouched, gradient rows may be partly written (docs/robustness.md, section 1)
  std::vector<error_outcome> late;
  bool value_ok = true;               ///< a successful result is acceptable
  bool strict = false;                ///< the expected error follows from the input alone (not from the range zone)
  std::string tag;                    ///< a mismatch at this row is this known issue (none open)
  bool grad_beyond = false;           ///< no value only because the gradient is clearly beyond its type (D2)
  bool has_ref = false;               ///< loss / grad hold a reference (else only finiteness is checked)
  bool check_loss = true;             ///< the loss is compared with the reference
  bool check_grad = true;             ///< the gradient is compared with the reference
  bool range = false;                 ///< finite scaled logits (or their spread) near the work type's limit
  bool huge = false;                  ///< a finite logit of magnitude near the work type's limit (B8)
  ld loss = 0, loss_tol = 0;
  std::vector<ld> grad, grad_tol;     ///< [V] reference gradient (scaled) and its tolerance

  /// Neither the loss nor the gradient is compared (only finiteness).
  void skip_values() { check_loss = check_grad = false; }
};

/// The errors a row accepts (first-pass and output-check errors), for messages.
inline std::string accepted_str(const row_expect& e) {
  std::string acc;
  for (const auto& eo : e.errors) acc += outcome_str(eo) + "; ";
  for (const auto& eo : e.late) acc += outcome_str(eo) + " [output check]; ";
  if (e.value_ok) acc += "a value";
  return acc.empty() ? std::string("nothing") : acc;
}

/// K4 / R2 (fixed): a gradient that does not fit the output type, or whose intermediates do
/// not fit the work type, is infinite_divergence at row r (first non-finite column), never an
/// ok status with a non-finite entry. The caller decides that the row is at or beyond that
/// edge; `lim` is the smaller of the two types' largest values. Near the edge either outcome
/// is accepted (a finite result is still compared with the reference); clearly beyond it
/// (an entry above 2 lim even after its tolerance) only the error.
inline void expect_gradient_overflow(row_expect& e, int r, ld lim) {
  bool beyond = false;
  for (size_t i = 0; i < e.grad.size(); ++i)
    if (std::fabs(e.grad[i]) - e.grad_tol[i] > 2 * lim) beyond = true;
  e.late.push_back({errc::infinite_divergence, r, any_pos, ""});
  if (beyond && e.check_grad && e.value_ok) {
    e.value_ok = false;
    e.grad_beyond = true;
  }
}

/// grad_scale / T_S below the work type's normal range (min_normal) is flushed by the library
/// (the gradient is formed as (grad_scale / T_S) * dL/da in the work type): gradients may be 0.
inline void tolerate_flushed_grad_scale(std::vector<row_expect>& rx, const std::vector<double>& gscale, double Ts, ld min_normal) {
  for (size_t r = 0; r < rx.size(); ++r) {
    const ld gs = gscale.empty() ? 1 : gscale[r];
    row_expect& e = rx[r];
    if (gs != 0 && std::fabs(gs / Ts) < 64 * min_normal)
      for (size_t i = 0; i < e.grad_tol.size(); ++i) e.grad_tol[i] += std::fabs(e.grad[i]);
  }
}

/// In the range zone a result (compared with a tolerance as wide as the input's precision)
/// stays acceptable whatever the reference says, unless the input alone decides the error.
inline void accept_values_in_range_zone(std::vector<row_expect>& rx) {
  for (row_expect& e : rx)
    if (e.range && !e.strict) e.value_ok = true;
}

/// Judges a failed row call (rows and topk targets) against the per-row expectations `rx`
/// (fields errors, late, value_ok, tag, grad_beyond): the error must be acceptable at its row, every
/// earlier row must accept a value, losses stay untouched. Gradients: after a first-pass
/// error untouched (fused order: the rows before the failing one are written; D1: with
/// threads > 1 also rows after it); after an output-check error (`late`: a loss or gradient
/// that does not fit its type) gradient rows may be partly written, and a written failing
/// row is finite before the reported column and not finite at it.
template <class G>
void judge_failure(const tropd::status& st, const std::vector<row_expect>& rx, const std::vector<double>& loss, const std::vector<G>& grad,
                   int g_cols, bool want_grad, bool fused, int threads) {
  const int N = static_cast<int>(rx.size());
  const int fr = static_cast<int>(st.row);
  if (fr < 0 || fr >= N) fail(cat("error without a valid row: ", status_str(st)));
  const row_expect& e = rx[static_cast<size_t>(fr)];
  const error_outcome *early = nullptr, *late = nullptr;
  for (const auto& eo : e.errors)
    if (matches(st, eo) && (!early || eo.known.empty())) early = &eo;
  for (const auto& eo : e.late)
    if (matches(st, eo) && (!late || eo.known.empty())) late = &eo;
  if (!early && !late) fail(cat("row ", fr, ": got ", status_str(st), ", accepted: ", accepted_str(e)), e.tag);
  const std::string msg = st.message();
  const bool output_check = msg.find("does not fit the output type") != std::string::npos || msg.find("loss is not finite") != std::string::npos;
  for (int r = 0; r < fr; ++r) {
    const row_expect& er = rx[static_cast<size_t>(r)];
    if (er.value_ok) continue;
    // Documented (D2): in the non-fused order the output checks run after the first pass of
    // every row, so a first-pass error of any row comes before an earlier row's gradient that
    // does not fit; among output-check errors the first row in row order is reported.
    // (The library's output-check errors say so in their sentence: a gradient value that
    // "does not fit the output type", or a "loss is not finite"; anything else came from
    // the statistics pass.)
    if (!fused && er.grad_beyond && !output_check) continue;
    fail(cat("error reported at row ", fr, " (", status_str(st), ") but row ", r, " expects ", accepted_str(er)), er.tag);
  }
  if (!all_poison(loss)) fail("loss written by a failed call");
  const auto at = [&](int r, int v) { return grad[static_cast<size_t>(r * g_cols + v)]; };
  if (late) {
    if (want_grad && st.col >= 0 && st.col < g_cols) {
      bool written = false;
      for (int v = 0; v < g_cols; ++v) written = written || !is_poison(at(fr, v));
      if (written) {
        for (int v = 0; v < st.col; ++v)
          if (!std::isfinite(static_cast<double>(at(fr, v))))
            fail(cat("output-check error ", status_str(st), " but column ", v, " of the row holds ", static_cast<double>(at(fr, v))));
        if (std::isfinite(static_cast<double>(at(fr, static_cast<int>(st.col)))))
          fail(cat("output-check error ", status_str(st), " but the reported column holds the finite ",
                   static_cast<double>(at(fr, static_cast<int>(st.col)))));
      }
    }
  } else if (!fused) {
    if (!all_poison(grad)) fail("gradient written by a failed call (non-fused order)");
  } else {
    for (int r = fr; r < N && want_grad; ++r) {
      if (threads > 1 && r > fr) continue;
      for (int v = 0; v < g_cols; ++v)
        if (!is_poison(at(r, v))) fail(cat("fused order: gradient row ", r, " written although row ", fr, " failed"));
    }
  }
  const std::string& known = late ? late->known : early->known;
  if (!known.empty()) fail(cat("row ", fr, ": ", status_str(st), " accepted only as known issue ", known), known);
}

/// A call that must fail with `e` (a validation error, or a token's error) and leave every
/// output untouched (`untouched`: the caller's poison check).
inline void judge_error(const tropd::status& st, const error_outcome& e, bool untouched) {
  if (st.ok() || !matches(st, e)) fail(cat("expected ", outcome_str(e), ", got ", st.ok() ? std::string("ok") : status_str(st)), e.known);
  if (!untouched) fail("outputs written by a failed call");
  if (!e.known.empty()) fail(cat("error ", status_str(st), " accepted only as known issue ", e.known), e.known);
}

/// One output value of an ok call (`what` names it): always finite (R2, fixed: an ok status
/// with a non-finite output is a failure wherever the inputs are; `known_if_not_finite` tags
/// an open issue), and within `tol` of `ref` where `compare`.
inline void judge_value(const std::string& what, ld got, ld ref, ld tol, bool compare, const std::string& known_if_not_finite = "") {
  if (!std::isfinite(got))
    fail(cat(what, ": non-finite ", static_cast<double>(got), " with an ok status (reference ", static_cast<double>(ref), ")"), known_if_not_finite);
  if (compare && !close(got, ref, tol))
    fail(cat(what, ": ", static_cast<double>(got), " vs reference ", static_cast<double>(ref), " (tolerance ", static_cast<double>(tol), ")"));
}

/// A row call's whole answer (rows and topk targets): with a validation error expected
/// (`global`), that error and untouched outputs; otherwise a failure judged by judge_failure,
/// or a success where every row accepts a value and every loss and gradient entry is finite
/// and close to its reference. Losses [N], gradient [N x g_cols] (the first V columns read).
template <class G>
void judge_rows(const tropd::status& st, const std::vector<error_outcome>& global, const std::vector<row_expect>& rx,
                const std::vector<double>& loss, const std::vector<G>& grad, int V, int g_cols, bool want_grad, bool fused,
                int threads) {
  if (!global.empty()) return judge_error(st, global[0], all_poison(loss) && all_poison(grad));
  if (!st.ok()) return judge_failure(st, rx, loss, grad, g_cols, want_grad, fused, threads);
  const int N = static_cast<int>(rx.size());
  for (int r = 0; r < N; ++r) {
    const row_expect& e = rx[static_cast<size_t>(r)];
    if (!e.value_ok) fail(cat("row ", r, " expects ", accepted_str(e), ", got ok (loss ", loss[static_cast<size_t>(r)], ")"), e.tag);
  }
  for (int r = 0; r < N; ++r) {
    const row_expect& e = rx[static_cast<size_t>(r)];
    judge_value(cat("row ", r, ": loss"), loss[static_cast<size_t>(r)], e.loss, e.loss_tol, e.has_ref && e.check_loss);
    if (!want_grad) continue;
    for (int v = 0; v < V; ++v)
      judge_value(cat("row ", r, " col ", v, ": gradient"), static_cast<ld>(grad[static_cast<size_t>(r * g_cols + v)]),
                  e.grad.empty() ? 0 : e.grad[static_cast<size_t>(v)], e.grad_tol.empty() ? 0 : e.grad_tol[static_cast<size_t>(v)],
                  e.has_ref && e.check_grad);
  }
}

}  // namespace tropd_fuzz
