// tropd/dist/rows.hpp: the row-level objective (host::evaluate_rows) over vocabulary-sharded
// rows, with one collective per call, and over data-parallel batches.
//
//   tropd::dist::evaluate_rows(obj, student_shard, teacher_shard, inputs, outputs, options,
//                              {.shard = {v0, v1, V}}, tensor_comm [, data_comm, data_options])
//
// Layout (docs/distributed.md). Every rank of the tensor group holds the same n rows (the same
// row_inputs: ids, origins, offsets, optional arrays and given top-k lists) and the columns
// [v0, v1) of the student's and the teacher's logits ([n x (v1 - v0)], any row stride); the
// shards partition [0, V). It writes dL/dz of its own columns ([n x (v1 - v0)]); loss,
// diagnostics, per-token outputs and trust-region decisions are those of the single-process
// call on the concatenated rows, on every rank (decisions bit for bit given the same merged
// values, values within fp32 rounding: the shards' sums are merged in another order).
//
// The call, on each rank:
//   1. pass 1 over the shard (one read of both shards of each row): the shard's row_moments,
//      its local teacher top-k candidates (ids, teacher logits, student logits at those ids:
//      the global top-k is a subset of the union of the local ones), the sampled token's
//      logits where the shard owns y, and for the tail bucket the student's mass in the shard
//      outside its candidates. One fixed-size record per row (dist/records.hpp).
//   2. ONE all-gather of the records among the tensor group.
//   3. every rank merges the records in the same order (by v0): log-sum-exps, entropies, KLs,
//      the global top-k (by teacher value, ties to the lower id, as the single-process
//      selection), t and s, the exact student tail; the same token batch on every rank.
//   4. the token stages (dist/token_stages.hpp: data-parallel normaliser and batch decisions
//      when a data group is given; no exchange otherwise).
//   5. pass 2 over the shard: dL/dz of its columns with the global log-sum-exp, and the sparse
//      terms whose ids fall in the shard.
// Objectives with a second-pass dense estimator (GKD's JSD) need one more all-gather of two
// sums per row after step 3 (they read the global log-sum-exps): two collectives.
//
// The split call (rows_call) runs the same steps and hands each collective to its caller:
// the MPI / NCCL drivers below and the Python package (torch.distributed) drive it alike.
//
// Errors: a rank that fails locally still takes part in every exchange; its error travels in
// the record header, and every rank returns the same status, named after the failing rank
// ("tensor-parallel rank r: ..."). The exceptions are a gradient that does not fit its type
// in this rank's columns (found while they are written: this rank only) and transport errors.
// The number of rows, the objective and the options must be the same on every rank (the
// record size follows from them); the ranks check that the shards partition [0, V) and that
// their ids, origins and sequence offsets agree.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include <tropd/config.hpp>
#include <tropd/core/checks.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/sparse_terms.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token_rules.hpp>
#include <tropd/dist/communicator.hpp>
#include <tropd/dist/records.hpp>
#include <tropd/dist/token_stages.hpp>
#include <tropd/estimators/row_moments.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/host/objective.hpp>
#include <tropd/host/parallel.hpp>
#include <tropd/host/row_passes.hpp>

namespace tropd::dist {

/// How a call is distributed: this rank's vocabulary shard, and what the data group shares.
struct shard_options {
  vocab_shard shard{};
  data_options data{};
};

/// The vocabulary-sharded evaluate_rows as a split call (see the header comment):
///
///   dist::rows_call call(obj, student, teacher, in, out, opt, so, tensor_layout, data_layout);
///   dist::exchange ex;
///   while (call.next(ex)) { all-gather ex.bytes from ex.send into ex.recv among ex.among }
///   status st = call.result();
///
/// The object owns the exchange buffers; it refers to the caller's objective, views and
/// inputs, which must outlive it. A group of size 1 is never asked for an exchange.
template <class Obj, class TS, class Teacher, class G>
class rows_call {
  static constexpr bool logits = host::detail::teacher_has_logits<Teacher>;
  using TT = typename host::detail::teacher_element<Teacher>::type;
  using W = work_type_t<TS, TT>;
  using R = typename Obj::region_type;
  static constexpr bool need_topk = Obj::outlier_type::needs_topk;
  static constexpr bool dense_second = [] {
    if constexpr (Obj::has_dense) return Obj::dense_type::second_pass;
    else return false;
  }();
  static constexpr estimators::moments_needed dense_reads = [] {
    if constexpr (Obj::has_dense) return estimators::summary_reads_of<typename Obj::dense_type>();
    else return estimators::lse_only;
  }();
  static constexpr estimators::moments_needed need_min =
      estimators::moments_needed{R::needs_student_entropy, R::needs_teacher_entropy, Obj::trust_type::needs_rkl, false} | dense_reads;
  static constexpr estimators::moments_needed need_diag = need_min | estimators::moments_needed{true, logits, logits, false};

 public:
  rows_call(const Obj& obj, matrix_view<const TS> student, const Teacher& teacher, const host::row_inputs& in,
            const host::row_outputs<G>& out, const host::eval_options& opt, const shard_options& so, group_layout tensor,
            group_layout data = {})
      : obj_(obj), student_(student), teacher_(teacher), in_(in), out_(out), opt_(opt), so_(so), tp_(tensor), dp_(data) {}

  /// Runs the call up to its next collective (true: run `ex`, then call next() again) or to
  /// its end (false: read result()).
  bool next(exchange& ex) {
    for (;;) {
      switch (phase_) {
        case 0:
          local_records();
          phase_ = 1;
          if (tp_.size > 1) return ask(ex);
          recv_ = send_;
          break;
        case 1:
          if (!merge_records()) {
            phase_ = 4;  // the data group's exchanges still need this rank
            break;
          }
          phase_ = 2;
          if (need_second()) {
            local_second();
            if (tp_.size > 1) return ask(ex);
            recv_ = send_;
            phase_ = 3;
            break;
          }
          phase_ = 4;
          break;
        case 2:
          phase_ = 3;
          break;
        case 3:
          merge_second();
          phase_ = 4;
          break;
        case 4:
          start_stages();
          phase_ = 5;
          break;
        case 5:
          if (stages_.next(ex)) return true;
          finish();
          return done();
        default:
          return false;
      }
    }
  }

  /// The call's status once next() has returned false.
  status result() const { return result_; }

  /// Bytes this rank contributes to each tensor-group exchange of the call so far (the
  /// records, then a second-pass estimator's sums): header + rows x record. Also counted for a
  /// tensor group of one, where nothing is sent. For cost reports.
  const std::vector<size_t>& tensor_exchange_bytes() const { return sent_; }

 private:
  const Obj& obj_;
  matrix_view<const TS> student_;
  Teacher teacher_;
  host::row_inputs in_;
  host::row_outputs<G> out_;
  host::eval_options opt_;
  shard_options so_;
  group_layout tp_, dp_;

  int phase_ = 0;
  uint32_t stage_ = 0;
  status result_{};
  status local_{};
  int local_when_ = 0;
  std::vector<unsigned char> send_, recv_;
  size_t slot_ = 0;
  std::vector<size_t> sent_;
  detail::record_layout lay_{};
  index_t n_ = 0, K_ = 0, V_ = 0, Vl_ = 0;
  bool lists_ = false, exact_tail_ = false, want_diag_ = false;
  std::vector<int> order_;       // ranks by v0 (the merge order)
  std::vector<index_t> starts_;  // their v0, ascending

  host::detail::row_token_arrays a_;
  token_outputs tout_{};
  detail::stages_call<Obj> stages_;

  bool done() {
    phase_ = 99;
    return false;
  }

  bool ask(exchange& ex) {
    ++stage_;
    slot_ = send_.size();
    recv_.assign(slot_ * size_t(tp_.size), 0);
    ex = exchange{group::tensor, send_.data(), send_.size(), recv_.data()};
    return true;
  }

  detail::rank_header header() const {
    detail::rank_header h;
    h.stage = stage_;
    h.v0 = so_.shard.v0;
    h.v1 = so_.shard.v1;
    h.vocab = so_.shard.vocab;
    h.rows = n_;
    h.width = K_;
    h.inputs_hash = inputs_hash();
    if (!local_.ok()) detail::set_error(h, local_, local_when_);
    return h;
  }

  uint64_t inputs_hash() const {
    uint64_t h = detail::fnv1a(nullptr, 0);
    if (in_.ids.size == n_ && in_.ids.data) h = detail::fnv1a(in_.ids.data, size_t(n_) * sizeof(int32_t), h);
    if (in_.from.size == n_ && in_.from.data) h = detail::fnv1a(in_.from.data, size_t(n_) * sizeof(origin), h);
    if (in_.seq_offsets.data) h = detail::fnv1a(in_.seq_offsets.data, size_t(in_.seq_offsets.size) * sizeof(index_t), h);
    return h;
  }

  // ----------------------------------------------------------------------------------------
  // Step 1: validation and pass 1 over the shard, into this rank's records.
  // ----------------------------------------------------------------------------------------
  status validate() {
    TROPD_TRY(obj_.check());
    TROPD_TRY(checks::temperatures(in_.student_temperature, in_.teacher_temperature));
    const vocab_shard& sh = so_.shard;
    if (!(sh.v0 >= 0 && sh.v1 > sh.v0 && sh.v1 <= sh.vocab))
      return make_error(errc::shape_mismatch, "vocabulary shard must satisfy 0 <= v0 < v1 <= V");
    if (!student_.valid()) return make_error(errc::shape_mismatch, "student view is malformed (stride < cols or null data)");
    if (n_ == 0) return make_error(errc::empty_batch, "no rows");
    if (student_.cols != Vl_) return make_error(errc::shape_mismatch, "student shard must have v1 - v0 columns");
    if (!out_.grad.valid() || (out_.grad.rows != 0 && (out_.grad.rows != n_ || out_.grad.cols != Vl_)))
      return make_error(errc::shape_mismatch, "gradient must be [rows x (v1 - v0)] like the student shard, or empty");
    if constexpr (logits) {
      TROPD_TRY(checks::teacher_rows(teacher_, n_, Vl_));
    } else {
      if (teacher_.t.size != n_) return make_error(errc::shape_mismatch, "teacher log-probs t must have one entry per row");
      if constexpr (Obj::has_dense || R::needs_teacher_entropy || Obj::trust_type::needs_rkl)
        return make_error(errc::unsupported, "this objective reads the teacher's full distribution (entropy, KL or a dense term): pass teacher logits");
    }
    TROPD_TRY(checks::token_ids(in_.ids, n_, V_));
    if (in_.from.size != n_) return make_error(errc::shape_mismatch, "origin must have one entry per row");
    if constexpr (need_topk) {
      if (lists_) {
        TROPD_TRY(checks::topk_lists_shape(in_.teacher_topk.ids, in_.teacher_topk.logprobs, n_));
        TROPD_TRY(host::detail::check_topk_width(obj_, in_.teacher_topk.ids.cols));
        for (index_t r = 0; r < n_; ++r)
          if (in_.from[r] == origin::student)
            TROPD_TRY(rules::check_topk_list(in_.teacher_topk.ids.row(r), in_.teacher_topk.logprobs.row(r), K_, V_, r));
      } else if constexpr (!logits) {
        return make_error(errc::unsupported, "this objective's outlier term needs teacher top-k lists (row_inputs::teacher_topk) or teacher logits");
      }
      if (in_.topk_student_old.rows != 0 && (in_.topk_student_old.rows != n_ || in_.topk_student_old.cols != K_ || !in_.topk_student_old.valid()))
        return make_error(errc::shape_mismatch, "topk_student_old must be empty or [n x K]");
    }
    if (out_.topk_ids.rows != 0 && (out_.topk_ids.rows != n_ || out_.topk_ids.cols != K_ || !out_.topk_ids.valid()))
      return make_error(errc::shape_mismatch, "topk_ids must be empty or [n x K] like the top-k lists");
    tout_ = token_outputs{out_.loss, out_.diag, out_.dloss_ds, out_.advantage, out_.dloss_dtopk, out_.flags};
    TROPD_TRY(host::detail::check_token_outputs(tout_, n_, K_));
    return {};
  }

  void local_records() {
    n_ = student_.rows;
    V_ = so_.shard.vocab;
    Vl_ = so_.shard.width();
    lists_ = in_.teacher_topk.ids.rows != 0;
    want_diag_ = out_.diag != nullptr;
    if constexpr (need_topk) {
      K_ = lists_ ? in_.teacher_topk.ids.cols : std::min<index_t>(obj_.outlier.fkl.k, std::max<index_t>(V_, 1));
      exact_tail_ = obj_.outlier.fkl.tail == estimators::topk_tail::tail_bucket;
    }
    lay_.K = K_;
    lay_.select = need_topk && !lists_;
    lay_.tail = exact_tail_;
    lay_.value_bytes = sizeof(W);
    lay_.init();
    const size_t nb = sizeof(detail::rank_header) + (n_ > 0 ? size_t(n_) : 0) * lay_.bytes;
    send_.assign(nb, 0);
    local_ = validate();
    local_when_ = 0;
    if (local_.ok()) {
      local_ = pass1();
      local_when_ = 1;
    }
    const detail::rank_header h = header();
    std::memcpy(send_.data(), &h, sizeof h);
    sent_.push_back(send_.size());
  }

  unsigned char* record(index_t r) { return send_.data() + sizeof(detail::rank_header) + size_t(r) * lay_.bytes; }

  status pass1() {
    const W its = W(1.0 / in_.student_temperature), itt = W(1.0 / in_.teacher_temperature);
    const bool mask_bad = opt_.bad_input == host::input_policy::mask;
    const vocab_shard sh = so_.shard;
    return host::parallel_rows(n_, opt_.threads, [&](index_t b0, index_t e0) -> status {
      auto buf = std::make_unique<host::detail::row_scratch<W>>();
      if (need_topk && !lists_) buf->prepare_topk(int(K_));
      std::vector<int32_t> lids;
      std::vector<double> llq;
      for (index_t r = b0; r < e0; ++r) {
        unsigned char* rec = record(r);
        const TS* zs = student_.row(r);
        const TT* zt = nullptr;
        if constexpr (logits) zt = teacher_.row(r);
        const int select = need_topk && !lists_ && logits && in_.from[r] == origin::student ? int(K_) : 0;
        estimators::row_moments<double> mom;
        const status st1 = want_diag_ ? host::detail::row_pass1_moments<need_diag>(zs, zt, Vl_, its, itt, *buf, r, mom, select)
                                      : host::detail::row_pass1_moments<need_min>(zs, zt, Vl_, its, itt, *buf, r, mom, select);
        if (!st1.ok()) {
          if (mask_bad && st1.code == errc::non_finite_input) {
            mom = {};
            mom.max_s = quiet_nan<double>();  // this row becomes a prompt row on every rank
            detail::put(rec, 0, mom);
            continue;
          }
          return make_error(st1.code, st1.detail, st1.row, st1.col >= 0 ? st1.col + sh.v0 : st1.col);
        }
        detail::put(rec, 0, mom);
        const int32_t y = in_.ids[r];
        if (sh.owns(y)) {
          detail::put(rec, lay_.off_y, rules::log_prob_at(zs, int32_t(y - sh.v0), its, 0.0));
          double by = 0;
          if constexpr (logits) by = rules::log_prob_at(zt, int32_t(y - sh.v0), itt, 0.0);
          detail::put(rec, lay_.off_y + 8, by);
        }
        if (!need_topk || in_.from[r] != origin::student) continue;
        // The shard's candidates: selected (ids, teacher and student values) or the given
        // list's ids this shard owns (student values).
        const index_t K = K_;
        if (!lists_) {
          for (index_t k = 0; k < K; ++k) {
            const int32_t lid = buf->topk_ids[size_t(k)];
            const int32_t gid = lid < 0 ? -1 : int32_t(lid + sh.v0);
            detail::put(rec, lay_.off_ids + size_t(k) * 4, gid);
            detail::put(rec, lay_.off_teacher + size_t(k) * sizeof(W), buf->topk_vals[size_t(k)]);
            const W sv = lid < 0 ? W(0) : W(rules::log_prob_at(zs, lid, its, 0.0));
            detail::put(rec, lay_.off_student + size_t(k) * sizeof(W), sv);
          }
        } else {
          const values_row lp = in_.teacher_topk.logprobs.row(r);
          for (index_t k = 0; k < K; ++k) {
            const int32_t id = in_.teacher_topk.ids(r, k);
            W sv = W(0);
            if (lp[k] != -inf<double>() && sh.owns(id)) sv = W(rules::log_prob_at(zs, int32_t(id - sh.v0), its, 0.0));
            detail::put(rec, lay_.off_student + size_t(k) * sizeof(W), sv);
          }
        }
        if (exact_tail_) {
          // log of the student's mass in this shard outside its listed candidates (exact:
          // estimated where the local estimate is accurate, else summed directly).
          double out_log = -inf<double>();
          if (mom.mass_s > 0) {
            const double lse_loc = mom.max_s + log_(mom.mass_s);
            lids.clear();
            llq.clear();
            if (!lists_) {
              for (index_t k = 0; k < K; ++k) {
                lids.push_back(buf->topk_ids[size_t(k)]);
                llq.push_back(buf->topk_ids[size_t(k)] < 0 ? -inf<double>() : double(buf->topk_vals[size_t(k)]));
              }
            } else {
              const values_row lp = in_.teacher_topk.logprobs.row(r);
              for (index_t k = 0; k < K; ++k) {
                const int32_t id = in_.teacher_topk.ids(r, k);
                if (lp[k] == -inf<double>() || !sh.owns(id)) continue;
                lids.push_back(int32_t(id - sh.v0));
                llq.push_back(lp[k]);
              }
            }
            const double t = host::detail::student_tail_log(zs, Vl_, its, lse_loc, lids.data(), llq.data(), int(lids.size()), *buf);
            out_log = t == -inf<double>() ? -inf<double>() : lse_loc + t;
          }
          detail::put(rec, lay_.off_tail, out_log);
        }
      }
      return {};
    });
  }

  // ----------------------------------------------------------------------------------------
  // Step 3: every rank merges every rank's records.
  // ----------------------------------------------------------------------------------------
  const unsigned char* remote(int rank) const { return recv_.data() + size_t(rank) * slot_; }
  const unsigned char* remote_record(int rank, index_t r) const {
    return remote(rank) + sizeof(detail::rank_header) + size_t(r) * lay_.bytes;
  }

  /// Headers of the first exchange: validation errors, then consistency, then the first
  /// pass-1 error (its row: rows before it are still merged, so an earlier error wins).
  bool check_headers(index_t& fail_row, status& fail) {
    const int P = tp_.size;
    std::vector<detail::rank_header> h(static_cast<size_t>(P));
    for (int p = 0; p < P; ++p) {
      h[size_t(p)] = detail::get<detail::rank_header>(remote(p), 0);
      if (h[size_t(p)].magic != detail::header_magic || h[size_t(p)].stage != stage_ - (P > 1 ? 1 : 0)) {
        result_ = make_error(errc::backend_error, "tensor-parallel exchange: the ranks are not at the same step of the same call");
        return false;
      }
    }
    auto err = [&](int p) { return P > 1 ? detail::remote_error(h[size_t(p)], group::tensor, p) : local_; };
    for (int p = 0; p < P; ++p)
      if (h[size_t(p)].code != 0 && h[size_t(p)].when == 0) {
        result_ = err(p);
        return false;
      }
    // The ranks agree on the rows and the shards partition [0, V).
    order_.resize(size_t(P));
    for (int p = 0; p < P; ++p) order_[size_t(p)] = p;
    std::sort(order_.begin(), order_.end(), [&](int x, int y) { return h[size_t(x)].v0 < h[size_t(y)].v0; });
    int64_t next_v = 0;
    for (int p : order_) {
      const auto& hp = h[size_t(p)];
      if (hp.rows != n_ || hp.width != K_ || hp.vocab != V_ || hp.inputs_hash != h[0].inputs_hash) {
        result_ = make_error(errc::shape_mismatch,
                             "tensor-parallel ranks disagree on the rows (count, ids, origins, offsets), the vocabulary size or the top-k width");
        return false;
      }
      if (hp.v0 != next_v) {
        result_ = make_error(errc::shape_mismatch, "the tensor-parallel ranks' vocabulary shards do not partition [0, V)");
        return false;
      }
      next_v = hp.v1;
    }
    if (next_v != V_) {
      result_ = make_error(errc::shape_mismatch, "the tensor-parallel ranks' vocabulary shards do not partition [0, V)");
      return false;
    }
    starts_.clear();
    for (int p : order_) starts_.push_back(h[size_t(p)].v0);
    fail_row = n_;
    for (int p = 0; p < P; ++p) {
      const auto& hp = h[size_t(p)];
      if (hp.code == 0) continue;
      if (hp.row < fail_row || (hp.row == fail_row && !fail.ok() && hp.col < fail.col)) {
        fail_row = hp.row < 0 ? 0 : hp.row;
        fail = err(p);
      }
    }
    return true;
  }

  /// Which rank's shard owns id (binary search over the shards in v0 order).
  int owner(int32_t id) const {
    const auto it = std::upper_bound(starts_.begin(), starts_.end(), index_t(id));
    return order_[size_t(it - starts_.begin()) - 1];
  }

  struct candidate {
    W teacher;
    int32_t id;
    W student;
  };

  bool merge_records() {
    index_t fail_row = 0;
    status fail{};
    if (!check_headers(fail_row, fail)) return false;
    const index_t n = n_, K = K_;
    const bool mask_bad = opt_.bad_input == host::input_policy::mask;
    auto& a = a_;
    a.s.assign(size_t(n), 0.0);
    a.t.assign(size_t(n), 0.0);
    a.ent_s.assign(size_t(n), quiet_nan<double>());
    a.ent_t.assign(size_t(n), quiet_nan<double>());
    a.rkl.assign(size_t(n), quiet_nan<double>());
    a.topk_ids.assign(size_t(n * K), -1);
    a.topk_teacher.assign(size_t(n * K), -inf<double>());
    a.topk_student.assign(size_t(n * K), 0.0);
    if (exact_tail_) a.tail.assign(size_t(n), quiet_nan<double>());
    a.from.assign(in_.from.begin(), in_.from.end());
    a.sums.assign(size_t(n), estimators::row_summary{});
    a.n_masked_rows = 0;
    std::vector<uint8_t> row_masked(size_t(n), 0);
    std::vector<candidate> cand;
    auto fail_at = [&](const status& s) {
      result_ = s;
      return false;
    };
    for (index_t r = 0; r < fail_row; ++r) {
      const size_t rr = size_t(r);
      // Merged moments (in v0 order); a shard's NaN max_s marks NaN / +inf logits (mask).
      estimators::row_moments<double> m;
      bool bad = false;
      for (int p : order_) {
        const auto mp = detail::get<estimators::row_moments<double>>(remote_record(p, r), 0);
        if (is_nan(mp.max_s)) bad = true;
        else m.merge(mp);
      }
      if (bad) {
        row_masked[rr] = 1;
        continue;
      }
      if (!(m.mass_s > 0) || (logits && !(m.mass_t > 0))) {
        if (mask_bad) {
          row_masked[rr] = 1;
          continue;
        }
        return fail_at(make_error(errc::no_finite_entry,
                                  !(m.mass_s > 0) ? "student logits row is -inf everywhere" : "teacher logits row is -inf everywhere", r));
      }
      if (!logits) {
        m.max_t = 0;
        m.mass_t = 1;
      }
      estimators::row_summary sm = estimators::summarize(m);
      if (!logits) sm.lse_t = sm.rkl = sm.fkl = sm.ent_t = quiet_nan<double>();
      const estimators::moments_needed need = want_diag_ ? need_diag : need_min;
      if (!need.ent_s) sm.ent_s = quiet_nan<double>();
      if (!need.ent_t) sm.ent_t = quiet_nan<double>();
      if (!need.rkl) sm.rkl = quiet_nan<double>();
      if (!need.fkl) sm.fkl = quiet_nan<double>();
      a.sums[rr] = sm;
      if constexpr (Obj::has_dense && logits) {
        if (in_.from[r] != origin::prompt && !obj_.dense.finite(sm))
          return fail_at(make_error(errc::infinite_divergence, "the dense divergence is infinite for this row", r));
      }
      const int32_t y = in_.ids[r];
      const unsigned char* yrec = remote_record(owner(y), r);
      a.s[rr] = detail::get<double>(yrec, lay_.off_y) - sm.lse_s;
      if constexpr (logits) {
        a.t[rr] = detail::get<double>(yrec, lay_.off_y + 8) - sm.lse_t;
        a.ent_t[rr] = sm.ent_t;
        a.rkl[rr] = sm.rkl;
      } else {
        a.t[rr] = teacher_.t[r];
      }
      a.ent_s[rr] = sm.ent_s;
      if (in_.from[r] != origin::prompt && a.s[rr] == -inf<double>())
        return fail_at(make_error(errc::infinite_divergence, "the student gives zero mass to the token at this row", r, y));
      if (!need_topk || in_.from[r] != origin::student) continue;
      int32_t* ids = a.topk_ids.data() + r * K;
      double* lq = a.topk_teacher.data() + r * K;
      double* ls = a.topk_student.data() + r * K;
      if (lists_) {
        const values_row lp = in_.teacher_topk.logprobs.row(r);
        for (index_t k = 0; k < K; ++k) {
          lq[k] = lp[k];
          ids[k] = lq[k] == -inf<double>() ? -1 : in_.teacher_topk.ids(r, k);
          ls[k] = lq[k] == -inf<double>()
                      ? 0.0
                      : double(detail::get<W>(remote_record(owner(ids[k]), r), lay_.off_student + size_t(k) * sizeof(W))) - sm.lse_s;
        }
      } else {
        // The global top-k: the K strongest of all shards' candidates (teacher value
        // descending, ties to the lower id), exactly the single-process selection.
        cand.clear();
        for (int p : order_) {
          const unsigned char* rec = remote_record(p, r);
          for (index_t k = 0; k < K; ++k) {
            const int32_t id = detail::get<int32_t>(rec, lay_.off_ids + size_t(k) * 4);
            if (id < 0) continue;
            cand.push_back({detail::get<W>(rec, lay_.off_teacher + size_t(k) * sizeof(W)), id,
                            detail::get<W>(rec, lay_.off_student + size_t(k) * sizeof(W))});
          }
        }
        auto stronger = [](const candidate& x, const candidate& y) { return x.teacher > y.teacher || (x.teacher == y.teacher && x.id < y.id); };
        const size_t take = std::min(cand.size(), size_t(K));
        std::partial_sort(cand.begin(), cand.begin() + std::ptrdiff_t(take), cand.end(), stronger);
        for (index_t k = 0; k < K; ++k) {
          if (size_t(k) < take) {
            ids[k] = cand[size_t(k)].id;
            lq[k] = double(cand[size_t(k)].teacher) - sm.lse_t;
          }
          ls[k] = lq[k] == -inf<double>() ? 0.0 : double(cand[size_t(k)].student) - sm.lse_s;
        }
      }
      if (exact_tail_) a.tail[rr] = merged_tail(r, sm.lse_s, ids, lq, ls, cand);
    }
    if (fail_row < n) return fail_at(fail);
    for (index_t r = 0; r < n; ++r)
      if (row_masked[size_t(r)] && a.from[size_t(r)] != origin::prompt) {
        a.from[size_t(r)] = origin::prompt;
        ++a.n_masked_rows;
      }
    return true;
  }

  /// log(1 - P_K) of row r from the merged list: host::detail::student_tail_log's rule (the
  /// estimate from the listed log-probs where estimators::tail_estimate_usable says it is
  /// accurate), else the exact sum of every shard's mass outside its own candidates plus the
  /// candidates that did not make the merged list (all positive terms: no cancellation).
  double merged_tail(index_t r, double lse_s, const int32_t* ids, const double* lq, const double* ls,
                     const std::vector<candidate>& cand) const {
    const index_t K = K_;
    double lse_k = -inf<double>();
    int listed = 0;
    for (index_t k = 0; k < K; ++k) {
      if (lq[k] == -inf<double>()) continue;
      ++listed;
      lse_k = logaddexp(lse_k, ls[k]);
    }
    const double est = log1mexp(min_(lse_k, 0.0));
    if (estimators::tail_estimate_usable(est, listed, lse_s)) return est;
    double out = -inf<double>();
    for (int p : order_) out = logaddexp(out, detail::get<double>(remote_record(p, r), lay_.off_tail));
    if (!lists_) {
      // Candidates with a finite teacher value that are not in the merged list: the shards
      // left them out of their outside sums. (The list is the first `listed` ... entries
      // of the sorted candidates with finite teacher values.)
      for (size_t c = size_t(K); c < cand.size(); ++c)
        if (double(cand[c].teacher) != -inf<double>()) out = logaddexp(out, double(cand[c].student));
    }
    (void)ids;
    return out == -inf<double>() ? -inf<double>() : out - lse_s;
  }

  // ----------------------------------------------------------------------------------------
  // Dense estimators with a second pass (JSD): their sums read the global log-sum-exps.
  // ----------------------------------------------------------------------------------------
  bool need_second() const { return dense_second && logits; }

  void local_second() {
    const W its = W(1.0 / in_.student_temperature), itt = W(1.0 / in_.teacher_temperature);
    send_.assign(sizeof(detail::rank_header) + size_t(n_) * 2 * sizeof(double), 0);
    local_ = {};
    if constexpr (dense_second && logits) {
      local_ = host::parallel_rows(n_, opt_.threads, [&](index_t b0, index_t e0) -> status {
        auto buf = std::make_unique<host::detail::row_scratch<W>>();
        for (index_t r = b0; r < e0; ++r) {
          if (a_.from[size_t(r)] == origin::prompt) continue;
          estimators::row_summary s = a_.sums[size_t(r)];
          host::detail::row_pass1b(obj_.dense, student_.row(r), teacher_.row(r), Vl_, its, itt, *buf, s);
          unsigned char* rec = send_.data() + sizeof(detail::rank_header) + size_t(r) * 2 * sizeof(double);
          detail::put(rec, 0, s.second[0]);
          detail::put(rec, 8, s.second[1]);
        }
        return {};
      });
    }
    const detail::rank_header h = header();
    std::memcpy(send_.data(), &h, sizeof h);
    sent_.push_back(send_.size());
  }

  bool merge_second() {
    const int P = tp_.size;
    for (int p = 0; p < P; ++p) {
      const auto h = detail::get<detail::rank_header>(remote(p), 0);
      if (h.magic != detail::header_magic || h.stage != stage_ - (P > 1 ? 1 : 0)) {
        result_ = make_error(errc::backend_error, "tensor-parallel exchange: the ranks are not at the same step of the same call");
        return false;
      }
      if (h.code != 0) {
        result_ = P > 1 ? detail::remote_error(h, group::tensor, p) : local_;
        return false;
      }
    }
    for (index_t r = 0; r < n_; ++r) {
      if (a_.from[size_t(r)] == origin::prompt) continue;
      double s0 = 0, s1 = 0;
      for (int p : order_) {
        const unsigned char* rec = remote(p) + sizeof(detail::rank_header) + size_t(r) * 2 * sizeof(double);
        s0 += detail::get<double>(rec, 0);
        s1 += detail::get<double>(rec, 8);
      }
      a_.sums[size_t(r)].second[0] = s0;
      a_.sums[size_t(r)].second[1] = s1;
    }
    return true;
  }

  // ----------------------------------------------------------------------------------------
  // Steps 4-5: the token stages, then this shard's gradient columns and the outputs.
  // ----------------------------------------------------------------------------------------
  void start_stages() {
    // After a failure (result_ set, identical on every rank of the tensor group) the stages
    // only carry it through the data group's exchanges.
    token_batch b;
    if (result_.ok()) {
      const estimators::moments_needed need = want_diag_ ? need_diag : need_min;
      b = host::detail::row_token_batch(a_, in_, K_, need, logits, need_topk, exact_tail_);
    }
    stages_.start(obj_, b, opt_, dp_, so_.data, -1, nullptr, 1000, result_);
  }

  void finish() {
    // The data group's verdict first (every rank of it reports the same failure), then this
    // tensor group's own failure, then the outputs.
    if (!stages_.result().ok()) result_ = stages_.result();
    else if (result_.ok()) result_ = finish_outputs();
  }

  status finish_outputs() {
    TROPD_TRY(stages_.result());
    host::token_stages& st = stages_.stages();
    TROPD_TRY(host::detail::finish_stages(obj_, a_, st));
    const double limit = host::detail::row_output_limit<G>(tout_, out_.grad.rows != 0);
    TROPD_TRY(host::detail::check_output_range(st.batch, st.a, st.w, limit));
    if (out_.grad.rows) TROPD_TRY(gradient(st));
    host::detail::write_token_outputs(st.batch, st.a, st.w, tout_);
    if (out_.topk_ids.rows)
      for (index_t r = 0; r < n_; ++r)
        for (index_t k = 0; k < K_; ++k) out_.topk_ids(r, k) = a_.topk_ids[size_t(r * K_ + k)];
    if (out_.loss) *out_.loss = st.diag.loss;
    if (out_.diag) *out_.diag = st.diag;
    return {};
  }

  /// dL/dz of this shard's columns: row_pass2 with the global summaries and the row's sparse
  /// entries whose ids fall in [v0, v1) (the others' coefficients in sum_elsewhere).
  status gradient(host::token_stages& st) {
    const W its = W(1.0 / in_.student_temperature), itt = W(1.0 / in_.teacher_temperature);
    const bool stream = host::detail::stream_gradient(out_.grad);
    const vocab_shard sh = so_.shard;
    const index_t K = K_;
    return host::parallel_rows(n_, opt_.threads, [&](index_t b0, index_t e0) -> status {
      auto buf = std::make_unique<host::detail::row_scratch<W>>();
      buf->row_ids.resize(size_t(K + 1));
      buf->row_coef.resize(size_t(K + 1));
      std::vector<int32_t> lid(size_t(K + 1));
      std::vector<double> lcoef(size_t(K + 1));
      status first{};
      for (index_t r = e0; r-- > b0;) {
        const size_t rr = size_t(r);
        const token_result& tr = st.a.tok[rr];
        const double scale = st.w[rr] / in_.student_temperature;
        const sparse_terms sp = build_sparse_terms(a_.topk_ids.data() + r * K, values_row{a_.topk_teacher.data() + r * K, scalar_type::f64},
                                                   tr.topk_grad ? st.a.g_topk.data() + r * K : nullptr, int(K), tr.topk_tail_coef,
                                                   tr.topk_tail_teacher, in_.ids[r], tr.dloss_ds, buf->row_ids.data(), buf->row_coef.data());
        sparse_terms loc = sp;
        loc.ids = lid.data();
        loc.coef = lcoef.data();
        int m = 0, listed = 0;
        double elsewhere = 0;
        for (int e = 0; e < sp.n; ++e) {
          if (sh.owns(sp.ids[e])) {
            lid[size_t(m)] = int32_t(sp.ids[e] - sh.v0);
            lcoef[size_t(m)] = sp.coef[e];
            ++m;
            if (e < sp.n_listed) ++listed;
          } else {
            elsewhere += sp.coef[e];
          }
        }
        loc.n = m;
        loc.n_listed = listed;
        loc.sum_elsewhere = elsewhere;
        const auto& sm = a_.sums[rr];
        index_t bad = -1;
        if constexpr (Obj::has_dense && logits) {
          if (st.batch.from[r] != origin::prompt)
            bad = host::detail::row_pass2(obj_.dense, student_.row(r), teacher_.row(r), Vl_, its, itt, *buf, sm, obj_.dense_weight, loc,
                                          scale, out_.grad.row(r), stream);
          else
            bad = host::detail::row_pass2(host::detail::no_dense{}, student_.row(r), static_cast<const TT*>(nullptr), Vl_, its, itt, *buf, sm,
                                          0.0, loc, 0.0, out_.grad.row(r), stream);
        } else {
          bad = host::detail::row_pass2(host::detail::no_dense{}, student_.row(r), static_cast<const TT*>(nullptr), Vl_, its, itt, *buf, sm,
                                        0.0, loc, scale, out_.grad.row(r), stream);
        }
        if (const status s = host::detail::gradient_status(r, bad < 0 ? bad : bad + sh.v0); !s.ok()) first = s;
      }
      return first;
    });
  }
};

/// Runs a split call with host communicators for its tensor and data groups.
template <class Call, host_communicator TC, host_communicator DC>
status drive(Call& call, TC& tensor, DC& data) {
  exchange ex;
  while (call.next(ex)) {
    const status s = ex.among == group::tensor ? tensor.all_gather(ex.send, ex.recv, ex.bytes) : data.all_gather(ex.send, ex.recv, ex.bytes);
    if (!s.ok()) return s;
  }
  return call.result();
}

template <class Teacher>
concept row_teacher = requires { typename host::detail::teacher_element<Teacher>::type; };

/// host::evaluate_rows over this rank's vocabulary shard [v0, v1) of the rows (tensor
/// group) and, optionally, a data group holding the batch's other rows. `student` and
/// `teacher` are [n x (v1 - v0)] (teacher: logits, or host::teacher_logprobs as in
/// host::evaluate_rows), `out.grad` [n x (v1 - v0)]; see the header comment.
template <class Obj, logit_element TS, class Teacher, grad_element G, host_communicator TC, host_communicator DC>
status evaluate_rows(const Obj& obj, matrix_view<const TS> student, const Teacher& teacher, const host::row_inputs& in,
                     const host::row_outputs<G>& out, const host::eval_options& opt, const shard_options& so, TC& tensor, DC& data) {
  rows_call<Obj, TS, Teacher, G> call(obj, student, teacher, in, out, opt, so, group_layout{tensor.rank(), tensor.size()},
                                      group_layout{data.rank(), data.size()});
  return drive(call, tensor, data);
}

/// The same with no data group (every rank of `tensor` holds the whole batch's rows).
template <class Obj, logit_element TS, class Teacher, grad_element G, host_communicator TC>
status evaluate_rows(const Obj& obj, matrix_view<const TS> student, const Teacher& teacher, const host::row_inputs& in,
                     const host::row_outputs<G>& out, const host::eval_options& opt, const shard_options& so, TC& tensor) {
  single_process none;
  return evaluate_rows(obj, student, teacher, in, out, opt, so, tensor, none);
}

}  // namespace tropd::dist
