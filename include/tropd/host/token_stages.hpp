// tropd/host/token_stages.hpp: the stages an objective runs over a batch of tokens on the
// CPU. evaluate_tokens runs them on the caller's arrays; evaluate_rows on the arrays it
// computes from the logits (host/objective.hpp). Each stage is callable alone:
//
//   1. validate   validate_tokens: structure (shapes, offsets, origin tags, the arrays the
//                 objective needs, top-k ids), then every token's values (core/token_rules.hpp);
//                 input_policy::mask turns tokens with bad values into prompt tokens instead
//   2. decide     batch decisions (the region's prepare: quantiles, sequence masks), then the
//                 region's rule per student token -> trusted / outlier
//   3. apply      the per-token rule (objective/evaluate_token.hpp) -> L_i, dL_i/ds, the raw
//                 sparse dL_i/d log p_S at the teacher's top-k ids
//   4. aggregate  weights w_i from the aggregation mode; loss = sum w_i L_i; diagnostics
//
// What each stage does per token or per sequence (aggregation weights, diagnostics sums,
// output bounds, the folded top-k gradient) is one TROPD_HD definition in
// objective/stage_rules.hpp that the GPU's token kernels run too; these are the loops.
//
// decide / apply / aggregate_weights expect a batch that passed validate_tokens.
// run_token_stages runs 1-4 and is what both entry points call.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <vector>

#include <tropd/config.hpp>
#include <tropd/core/checks.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/sparse_terms.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token.hpp>
#include <tropd/core/token_batch.hpp>
#include <tropd/core/token_rules.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/host/options.hpp>
#include <tropd/objective.hpp>
#include <tropd/objective/stage_rules.hpp>

namespace tropd::host {

namespace detail {

/// The values of a batch's structure the host reads (checks::token_batch_shapes calls these in
/// its order): the offsets (from 0 to n, non-decreasing) and the origin tags.
struct batch_reads {
  status offsets(const token_batch& b) const {
    if (b.seq_offsets[0] != 0 || b.seq_offsets[b.seq_offsets.size - 1] != b.s.size)
      return make_error(errc::shape_mismatch, "seq_offsets must start at 0 and end at n");
    for (index_t j = 1; j < b.seq_offsets.size; ++j)
      if (b.seq_offsets[j] < b.seq_offsets[j - 1]) return make_error(errc::shape_mismatch, "seq_offsets must be non-decreasing", j);
    return {};
  }
  status origins(const token_batch& b) const {
    for (index_t i = 0; i < b.s.size; ++i)
      if (static_cast<uint8_t>(b.from[i]) > 2) return make_error(errc::invalid_parameter, "origin tag must be prompt, teacher or student", i);
    return {};
  }
};

/// Structural validation of a token batch for an objective: the shapes (core/checks.hpp,
/// shared with the device), with the offsets and origin tags read in its order, then the top-k ids. Always an error when
/// it fails (whatever the input policy).
template <class Obj>
status validate_structure(const Obj& obj, const token_batch& b) {
  TROPD_TRY(checks::token_batch_shapes(obj, b, batch_reads{}));
  const index_t n = b.s.size;
  if constexpr (Obj::outlier_type::needs_topk) {
    // Ids are structure: a bad id is an error under either input policy, as at row level.
    // (The vocabulary size is unknown here: only negative ids are out of range.)
    for (index_t i = 0; i < n; ++i) {
      if (b.from[i] != origin::student) continue;
      for (index_t k = 0; k < b.topk_ids.cols; ++k) TROPD_TRY(rules::check_topk_id(b.topk_ids.row(i), b.topk_teacher.row(i), k, -1, i));
    }
  }
  return {};
}

/// A top-k objective's k must be the width of the lists it is given (never silently ignored).
template <class Obj>
status check_topk_width(const Obj& obj, index_t K) {
  if constexpr (requires { obj.outlier.fkl.k; }) {
    if (K != obj.outlier.fkl.k)
      return make_error(errc::invalid_parameter,
                        "the top-k lists' width K differs from the objective's k (outlier.fkl.k): set the preset's k to the lists' width");
  }
  return {};
}

/// The per-token outputs' shapes.
inline status check_token_outputs(const token_outputs& o, index_t n, index_t K) {
  if (o.dloss_ds.size != 0 && o.dloss_ds.size != n) return make_error(errc::shape_mismatch, "dloss_ds must be empty or have n entries");
  if (o.advantage.size != 0 && o.advantage.size != n) return make_error(errc::shape_mismatch, "advantage must be empty or have n entries");
  if (o.flags.size != 0 && o.flags.size != n) return make_error(errc::shape_mismatch, "flags must be empty or have n entries");
  if (o.dloss_dtopk.rows != 0 && (o.dloss_dtopk.rows != n || o.dloss_dtopk.cols != K || !o.dloss_dtopk.valid()))
    return make_error(errc::shape_mismatch, "dloss_dtopk must be empty or [n x K] like the top-k lists");
  return {};
}

/// Sequence index of every token (from CSR offsets).
inline std::vector<index_t> token_sequences(vector_view<const index_t> off, index_t n) {
  std::vector<index_t> seq(static_cast<size_t>(n));
  for (index_t j = 0; j + 1 < off.size; ++j)
    for (index_t i = off[j]; i < off[j + 1]; ++i) seq[static_cast<size_t>(i)] = j;
  return seq;
}

}  // namespace detail

/// Stage 1 (reject policy): structure, then every token's values; the first violation.
template <class Obj>
status validate_tokens(const Obj& obj, const token_batch& b) {
  TROPD_TRY(detail::validate_structure(obj, b));
  for (index_t i = 0; i < b.s.size; ++i) TROPD_TRY(rules::check_token_values(b, i, Obj::outlier_type::needs_topk));
  return {};
}

/// Stage 1 (mask policy): the origin tags with every token whose values fail the checks made
/// a prompt token (no loss, zero gradient); returns how many. Structure is validated first
/// (structure errors stay errors) unless the caller has just done it.
template <class Obj>
status mask_bad_tokens(const Obj& obj, const token_batch& b, std::vector<origin>& from_out, index_t& n_masked,
                       bool validate = true) {
  if (validate) TROPD_TRY(detail::validate_structure(obj, b));
  from_out.assign(b.from.begin(), b.from.end());
  n_masked = 0;
  for (index_t i = 0; i < b.s.size; ++i)
    if (b.from[i] != origin::prompt && !rules::check_token_values(b, i, Obj::outlier_type::needs_topk).ok()) {
      from_out[static_cast<size_t>(i)] = origin::prompt;
      ++n_masked;
    }
  return {};
}

/// Stage 2: region decisions for every token (1 = trusted; meaningful for student tokens).
template <class Obj>
status decide(const Obj& obj, const token_batch& b, const eval_options& opt, std::vector<uint8_t>& trusted) {
  const index_t n = b.s.size;
  const std::vector<index_t> seq = detail::token_sequences(b.seq_offsets, n);
  std::vector<token> tk;
  std::vector<index_t> at;
  for (index_t i = 0; i < n; ++i) {
    if (b.from[i] != origin::student) continue;
    tk.push_back(rules::make_token(b, i, seq[static_cast<size_t>(i)]));
    at.push_back(i);
  }
  // The batch values the region's prepare may read (student tokens only).
  std::vector<double> R(tk.size()), hs(tk.size()), ht(tk.size());
  std::vector<index_t> sidx(tk.size());
  for (size_t k = 0; k < tk.size(); ++k) {
    R[k] = tk[k].R;
    hs[k] = tk[k].ent_s;
    ht[k] = tk[k].ent_t;
    sidx[k] = tk[k].seq_index;
  }
  regions::batch_context ctx{opt.seed, opt.step, 0, nullptr};
  regions::batch_storage storage;
  regions::batch_tokens bt{R.data(), hs.data(), ht.data(), sidx.data(), static_cast<index_t>(R.size()), b.num_sequences()};
  if constexpr (requires { obj.region.prepare(bt, ctx, storage); }) TROPD_TRY(obj.region.prepare(bt, ctx, storage));
  trusted.assign(static_cast<size_t>(n), 0);
  for (size_t k = 0; k < tk.size(); ++k) trusted[static_cast<size_t>(at[k])] = obj.region.trusted(tk[k], ctx) ? 1 : 0;
  return {};
}

/// Stage 2 for the tokens [i0, i1) of a batch, for a region without batch decisions
/// (regions::decides_per_token): the decisions decide() makes for them. `seq`: every token's
/// sequence (detail::token_sequences). trusted must have the batch's size.
template <class Obj>
  requires regions::decides_per_token<typename Obj::region_type>
void decide_range(const Obj& obj, const token_batch& b, const eval_options& opt, const index_t* seq, index_t i0, index_t i1,
                  std::vector<uint8_t>& trusted) {
  const regions::batch_context ctx{opt.seed, opt.step, 0, nullptr};
  for (index_t i = i0; i < i1; ++i)
    trusted[static_cast<size_t>(i)] =
        b.from[i] == origin::student && obj.region.trusted(rules::make_token(b, i, seq[static_cast<size_t>(i)]), ctx) ? 1 : 0;
}

/// Result of stage 3 for a batch (unweighted per-token values).
struct applied {
  std::vector<token_result> tok;
  std::vector<double> g_topk;  ///< [n x K] raw sparse gradients (form P; tail bucket apart)
  index_t K = 0;
};

/// Sizes stage 3's results for a batch (every token's result empty).
inline void prepare_applied(const token_batch& b, applied& out) {
  const index_t n = b.s.size;
  out.K = b.topk_teacher.rows == n ? b.topk_teacher.cols : 0;
  out.tok.assign(static_cast<size_t>(n), token_result{});
  out.g_topk.assign(static_cast<size_t>(n * out.K), 0.0);
}

/// Stage 3 for the tokens [i0, i1) of a batch into `out` (sized by prepare_applied).
/// `seq`: every token's sequence (detail::token_sequences).
template <class Obj>
status apply_range(const Obj& obj, const token_batch& b, const std::vector<uint8_t>& trusted, const index_t* seq, index_t i0,
                   index_t i1, applied& out) {
  for (index_t i = i0; i < i1; ++i) {
    const token tk = rules::make_token(b, i, seq[static_cast<size_t>(i)]);
    const topk_row list = rules::make_topk_row(b, i);
    double* g = out.K > 0 ? out.g_topk.data() + i * out.K : nullptr;
    token_result r = evaluate_token(obj, tk, list, trusted[static_cast<size_t>(i)] != 0, g);
    if (!r.st.ok()) return make_error(r.st.code, r.st.detail, i, r.st.col);
    if (!r.topk_grad && g)
      for (index_t k = 0; k < out.K; ++k) g[k] = 0;
    out.tok[static_cast<size_t>(i)] = r;
  }
  return {};
}

/// Stage 3: the per-token rule over the batch.
template <class Obj>
status apply(const Obj& obj, const token_batch& b, const std::vector<uint8_t>& trusted, applied& out) {
  const index_t n = b.s.size;
  const std::vector<index_t> seq = detail::token_sequences(b.seq_offsets, n);
  prepare_applied(b, out);
  return apply_range(obj, b, trusted, seq.data(), 0, n, out);
}

/// Stage 4: aggregation weights w_i and the normaliser (aggregation/aggregation.hpp; the rules
/// in objective/stage_rules.hpp).
template <class Obj>
status aggregate_weights(const Obj& obj, const token_batch& b, const applied& a, std::vector<double>& w, double& normaliser) {
  namespace sr = stage_rules;
  const index_t n = b.s.size;
  w.assign(static_cast<size_t>(n), 0.0);
  const auto& agg = obj.agg;
  auto flags_of = [&](index_t i) { return a.tok[static_cast<size_t>(i)].flags; };
  if (!sr::sequence_mode(agg.how)) {
    double count = 0;
    for (index_t i = 0; i < n; ++i) count += sr::token_count(agg, flags_of(i));
    normaliser = sr::normaliser_of(agg, count);
    for (index_t i = 0; i < n; ++i) w[static_cast<size_t>(i)] = sr::token_weight(flags_of(i), 1.0, normaliser);
    return {};
  }
  const index_t n_seq = b.num_sequences();
  double seqs = 0;
  std::vector<double> per(static_cast<size_t>(n_seq), 0.0);
  for (index_t j = 0; j < n_seq; ++j) {
    double c = 0;
    for (index_t i = b.seq_offsets[j]; i < b.seq_offsets[j + 1]; ++i) c += sr::is_counted(flags_of(i)) ? 1 : 0;
    per[static_cast<size_t>(j)] = sr::sequence_factor(agg, c);
    seqs += c > 0 ? 1 : 0;
  }
  normaliser = sr::normaliser_of(agg, seqs);
  for (index_t j = 0; j < n_seq; ++j)
    for (index_t i = b.seq_offsets[j]; i < b.seq_offsets[j + 1]; ++i)
      w[static_cast<size_t>(i)] = sr::token_weight(flags_of(i), per[static_cast<size_t>(j)], normaliser);
  return {};
}

/// Diagnostics and the aggregated loss from stages 2-4 (objective/diagnostics.hpp; the sums
/// are stage_rules::diag_partial's).
inline void summarise(const token_batch& b, const std::vector<uint8_t>& trusted, const applied& a, const std::vector<double>& w,
                      double normaliser, diagnostics& d) {
  stage_rules::diag_partial p;
  for (index_t i = 0; i < b.s.size; ++i)
    p.add(b, i, stage_rules::make_record(a.tok[static_cast<size_t>(i)], trusted[static_cast<size_t>(i)] != 0),
          w[static_cast<size_t>(i)], 0.0, 0.0);
  d = p.finish(b.s.size, normaliser, b.student_entropy.size != 0, b.teacher_entropy.size != 0, b.rkl.size != 0, 0, false);
}

/// Everything stages 1-4 produce for a batch.
struct token_stages {
  std::vector<origin> from;       ///< the origin tags after input_policy::mask
  token_batch batch;              ///< the caller's batch with `from` pointing at the tags above
  std::vector<uint8_t> trusted;   ///< stage 2
  applied a;                      ///< stage 3
  std::vector<double> w;          ///< stage 4: aggregation weights
  double normaliser = 0;
  diagnostics diag;               ///< loss and diagnostics (without a dense term's part)
};

/// Stages 1-4 over a batch (the core of evaluate_tokens and evaluate_rows). Nothing of the
/// caller's is written. After the structure checks (whatever the input policy), two checks of
/// the entry point: `topk_width` >= 0 is the top-k width the objective's k must equal
/// (token level), and `out` (if given) the per-token outputs' shapes.
template <class Obj>
status run_token_stages(const Obj& obj, const token_batch& b, const eval_options& opt, token_stages& st, index_t topk_width = -1,
                        const token_outputs* out = nullptr) {
  st.batch = b;
  index_t n_masked = 0;
  TROPD_TRY(detail::validate_structure(obj, b));
  if constexpr (Obj::outlier_type::needs_topk)
    if (topk_width >= 0) TROPD_TRY(detail::check_topk_width(obj, topk_width));
  if (out) TROPD_TRY(detail::check_token_outputs(*out, b.s.size, b.topk_ids.cols));
  if (opt.bad_input == input_policy::mask) {
    TROPD_TRY(mask_bad_tokens(obj, b, st.from, n_masked, false));
    st.batch.from = {st.from.data(), b.s.size};
  } else {
    for (index_t i = 0; i < b.s.size; ++i) TROPD_TRY(rules::check_token_values(b, i, Obj::outlier_type::needs_topk));
  }
  TROPD_TRY(decide(obj, st.batch, opt, st.trusted));
  TROPD_TRY(apply(obj, st.batch, st.trusted, st.a));
  TROPD_TRY(aggregate_weights(obj, st.batch, st.a, st.w, st.normaliser));
  summarise(st.batch, st.trusted, st.a, st.w, st.normaliser, st.diag);
  st.diag.n_masked_input = n_masked;
  return {};
}

namespace detail {

/// Token i's top-k lists as value rows (empty rows when the batch has none).
inline values_row teacher_list(const token_batch& b, const applied& a, index_t i) { return a.K ? b.topk_teacher.row(i) : values_row{}; }
inline values_row student_list(const token_batch& b, const applied& a, index_t i) { return a.K ? b.topk_student.row(i) : values_row{}; }

/// Token i's dL_i/d log p_S at list entry k, tail bucket folded in (stage_rules::folded_topk).
inline double folded_topk(const token_batch& b, const applied& a, index_t i, index_t k) {
  return stage_rules::folded_topk(stage_rules::make_record(a.tok[static_cast<size_t>(i)], false), a.g_topk.data() + i * a.K,
                                  teacher_list(b, a, i), student_list(b, a, i), k);
}

/// Checks, before anything is written, that every weighted per-token output and every
/// gradient entry it induces fits `limit` (the largest finite value of the narrowest output
/// written; stage_rules::output_fits): a finite double that overflows is an error, never a
/// silent inf. Tokens [i0, i1) (i1 < 0: to the end of the batch).
inline status check_output_range(const token_batch& b, const applied& a, const std::vector<double>& w, double limit, index_t i0 = 0,
                                 index_t i1 = -1) {
  for (index_t i = i0; i < (i1 < 0 ? b.s.size : i1); ++i)
    if (!stage_rules::output_fits(stage_rules::make_record(a.tok[static_cast<size_t>(i)], false), a.g_topk.data() + i * a.K,
                                  teacher_list(b, a, i), student_list(b, a, i), a.K, w[static_cast<size_t>(i)], limit))
      return make_error(errc::infinite_divergence,
                        "a per-token loss, advantage or gradient overflows its output type (e.g. rho = exp(s - s_old) too large)", i);
  return {};
}

/// The largest finite value of the narrowest per-token output that will be written.
inline double output_limit(const token_outputs& o, double limit = max_finite(scalar_type::f64)) {
  if (o.dloss_ds.size) limit = min_(limit, max_finite(o.dloss_ds.type));
  if (o.advantage.size) limit = min_(limit, max_finite(o.advantage.type));
  if (o.dloss_dtopk.rows) limit = min_(limit, max_finite(o.dloss_dtopk.type));
  return limit;
}

inline void write_token_outputs(const token_batch& b, const applied& a, const std::vector<double>& w, const token_outputs& o) {
  for (index_t i = 0; i < b.s.size; ++i) {
    const token_result& r = a.tok[static_cast<size_t>(i)];
    const double wi = w[static_cast<size_t>(i)];
    if (o.dloss_ds.size) o.dloss_ds.set(i, wi * r.dloss_ds);
    if (o.advantage.size) o.advantage.set(i, r.advantage);
    if (o.flags.size) o.flags[i] = r.flags;
    if (o.dloss_dtopk.rows)
      for (index_t k = 0; k < o.dloss_dtopk.cols; ++k) o.dloss_dtopk.set(i, k, k < a.K ? wi * folded_topk(b, a, i, k) : 0.0);
  }
}

}  // namespace detail

}  // namespace tropd::host
