// tropd/dist/token_stages.hpp: the token stages (host/token_stages.hpp) over a batch split
// across data-parallel ranks, and the token-level entry point that runs them.
//
// Each rank of the data group holds some of the batch's sequences (or parts of sequences).
// What one process would compute from the whole batch and a rank cannot from its own tokens:
//
//   the normaliser of token_mean (N_tok), kept_token_mean (N_kept) and the sequence modes
//   (N_seq): a sum over ranks of the local counts. scope::global (default): one all-gather
//   of a count per rank; scope::per_rank: each rank's own count (no exchange; the losses are
//   then per-rank means). An external normaliser (aggregation::normaliser > 0) and
//   sum_over_constant need no exchange.
//
//   the batch decisions of regions with a `prepare` step: the entropy quantile of
//   entropy_top_fraction (REOPOLD phase II, entropy OPD) and the sequence masks of
//   sequence_ratio_bound, whose sequences may be split across ranks. scope::global (default):
//   two all-gathers (each rank's student-token count, then every student token's
//   (R, H_S, H_T, sequence key), padded to the largest count), after which every rank runs the
//   region's prepare on the whole batch, exactly as one process would; scope::per_rank: each
//   rank decides from its own tokens (no exchange).
//
// Sequences split across ranks are matched by their global ids (token_batch::seq_ids): pass
// them whenever a sequence can be split, and to reproduce a single-process run's random
// draws pass the ids that run would use (by default a sequence's id is its index in the
// rank's batch). The stochastic trust region's draw is keyed by (seed, step, seq_id,
// position in the rank's part of the sequence): a sequence split across ranks must be given
// to each rank with the same seq_id, and its parts are then drawn as if they started at
// position 0 (documented limitation; no trainer we know splits sequences across
// data-parallel ranks). The sequence modes assume whole sequences per rank (a sequence split
// across ranks is counted once per rank).
//
// Collectives per call, data group (size > 1), in this order:
//   regions with prepare, decisions scope::global   2 (counts fused with the normaliser's
//                                                   count for token_mean and the sequence modes)
//   normaliser scope::global, not fused above       1 (after the decisions: kept_token_mean
//                                                   needs them)
// The loss each rank returns is its share: the sum over the data group is the whole batch's
// loss. Gradients and per-token outputs are those of the rank's tokens in the whole batch.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include <tropd/core/status.hpp>
#include <tropd/core/token_batch.hpp>
#include <tropd/core/token_rules.hpp>
#include <tropd/dist/communicator.hpp>
#include <tropd/dist/records.hpp>
#include <tropd/host/objective.hpp>
#include <tropd/host/token_stages.hpp>

namespace tropd::dist {

/// What a distributed call computes over the data-parallel group (see the header comment).
struct data_options {
  scope decisions = scope::global;   ///< batch decisions (entropy quantiles, sequence masks)
  scope normaliser = scope::global;  ///< the aggregation normaliser
};

namespace detail {

template <class Obj>
inline constexpr bool region_prepares =
    requires(const typename Obj::region_type& r, const regions::batch_tokens& b, regions::batch_context& c, regions::batch_storage& s) {
      r.prepare(b, c, s);
    };

/// evaluate_token's flags::counted, known before the decisions (token_mean and the sequence
/// modes can therefore share the decisions' exchange).
template <class Obj>
inline bool counted_by_rule(const Obj& obj, origin o) noexcept {
  return o == origin::student || (o == origin::teacher && (obj.guidance_beta > 0 || Obj::has_dense));
}

/// The local count behind an aggregation mode's normaliser (token_mean: counted tokens;
/// kept_token_mean: kept tokens; sequence modes: sequences with a counted token).
inline double local_count(aggregation::mode how, const token_batch& b, const std::vector<uint8_t>& flag_bits, uint8_t bit) {
  using aggregation::mode;
  const index_t n = b.s.size;
  double c = 0;
  if (how == mode::token_mean || how == mode::kept_token_mean) {
    for (index_t i = 0; i < n; ++i) c += (flag_bits[static_cast<size_t>(i)] & bit) ? 1 : 0;
    return c;
  }
  for (index_t j = 0; j + 1 < b.seq_offsets.size; ++j) {
    bool any = false;
    for (index_t i = b.seq_offsets[j]; i < b.seq_offsets[j + 1]; ++i) any = any || (flag_bits[static_cast<size_t>(i)] & bit);
    c += any ? 1 : 0;
  }
  return c;
}

/// The token stages of one rank of a data group, as a split call: start(), then next() until
/// it returns false (each true return is an all-gather among the data group the caller runs),
/// then result() and stages(). With a data group of one, next() runs everything at once.
template <class Obj>
class stages_call {
 public:
  /// `prior`: a failure of the caller's earlier steps (the batch is then not read): this
  /// rank still takes part in every exchange the others make, carrying the error.
  void start(const Obj& obj, const token_batch& b, const host::eval_options& opt, group_layout dp, data_options dop,
             index_t topk_width = -1, const token_outputs* out = nullptr, uint32_t stage_base = 16, status prior = {}) {
    obj_ = &obj;
    opt_ = opt;
    dp_ = dp;
    stage_ = stage_base;
    st_ = host::token_stages{};
    st_.batch = b;
    phase_ = 0;
    result_ = {};
    local_ = prior.ok() ? validate(b, topk_width, out) : prior;
    using aggregation::mode;
    const auto how = obj.agg.how;
    need_decisions_ = region_prepares<Obj> && dp.size > 1 && dop.decisions == scope::global;
    need_count_ = dp.size > 1 && dop.normaliser == scope::global && obj.agg.normaliser == 0 && how != mode::sum_over_constant;
    fused_ = need_decisions_ && need_count_ && how != mode::kept_token_mean;
  }

  bool next(exchange& ex) {
    switch (phase_) {
      case 0: {
        if (need_decisions_) {
          // Exchange 1: each rank's student-token count (and, fused, its normaliser count).
          collect_student_values();
          rank_header h = header();
          h.values[0] = double(n_student_);
          if (fused_ && local_.ok()) h.values[1] = pre_count();
          send_.assign(sizeof h, 0);
          std::memcpy(send_.data(), &h, sizeof h);
          return ask(ex, 1);
        }
        [[fallthrough]];
      }
      case 1: {
        if (phase_ == 1) {
          if (!read_headers()) return false;
          max_student_ = 0;
          global_count_ = 0;
          for (int r = 0; r < dp_.size; ++r) {
            const rank_header h = get<rank_header>(recv_.data(), size_t(r) * slot_);
            max_student_ = std::max(max_student_, index_t(h.values[0]));
            global_count_ += h.values[1];
          }
          // Exchange 2: every student token's (R, H_S, H_T, sequence key), padded.
          rank_header h = header();
          h.values[0] = double(n_student_);
          send_.assign(sizeof h + size_t(max_student_) * 4 * sizeof(double), 0);
          std::memcpy(send_.data(), &h, sizeof h);
          std::memcpy(send_.data() + sizeof h, values_.data(), values_.size() * sizeof(double));
          return ask(ex, 2);
        }
        [[fallthrough]];
      }
      case 2: {
        if (phase_ == 2 && !read_headers()) return false;
        if (local_.ok()) local_ = decide_apply();
        if (need_count_ && !fused_) {
          // Exchange 3: the normaliser's count (after the decisions: kept_token_mean).
          rank_header h = header();
          if (local_.ok()) h.values[0] = post_count();
          send_.assign(sizeof h, 0);
          std::memcpy(send_.data(), &h, sizeof h);
          return ask(ex, 3);
        }
        [[fallthrough]];
      }
      case 3: {
        if (phase_ == 3) {
          if (!read_headers()) return false;
          global_count_ = 0;
          for (int r = 0; r < dp_.size; ++r) global_count_ += get<rank_header>(recv_.data(), size_t(r) * slot_).values[0];
        }
        finish();
        return false;
      }
      default:
        return false;
    }
  }

  status result() const { return result_; }
  host::token_stages& stages() { return st_; }
  /// Normalisers were exchanged (and the weights are those of the whole batch).
  bool global_normaliser() const { return need_count_; }

 private:
  const Obj* obj_ = nullptr;
  host::eval_options opt_{};
  group_layout dp_{};
  uint32_t stage_ = 0;
  host::token_stages st_{};
  index_t n_masked_ = 0;
  int phase_ = 0;
  status local_{}, result_{};
  bool need_decisions_ = false, need_count_ = false, fused_ = false;
  std::vector<unsigned char> send_, recv_;
  size_t slot_ = 0;
  std::vector<double> values_;  // [n_student x 4] R, H_S, H_T, key bits
  std::vector<index_t> student_at_;
  index_t n_student_ = 0, max_student_ = 0;
  double global_count_ = 0;

  status validate(const token_batch& b, index_t topk_width, const token_outputs* out) {
    const Obj& obj = *obj_;
    TROPD_TRY(host::detail::validate_structure(obj, b));
    if constexpr (Obj::outlier_type::needs_topk)
      if (topk_width >= 0) TROPD_TRY(host::detail::check_topk_width(obj, topk_width));
    if (out) TROPD_TRY(host::detail::check_token_outputs(*out, b.s.size, b.topk_ids.cols));
    if (opt_.bad_input == host::input_policy::mask) {
      TROPD_TRY(host::mask_bad_tokens(obj, b, st_.from, n_masked_, false));
      st_.batch.from = {st_.from.data(), b.s.size};
    } else {
      for (index_t i = 0; i < b.s.size; ++i) TROPD_TRY(rules::check_token_values(b, i, Obj::outlier_type::needs_topk));
    }
    return {};
  }

  rank_header header() const {
    rank_header h;
    h.stage = stage_;
    if (!local_.ok()) set_error(h, local_, 1);
    return h;
  }

  bool ask(exchange& ex, int phase) {
    phase_ = phase;
    ++stage_;
    slot_ = send_.size();
    recv_.assign(slot_ * size_t(dp_.size), 0);
    ex = exchange{group::data, send_.data(), send_.size(), recv_.data()};
    return true;
  }

  /// After an exchange: every rank's status; false (result_ set) when some rank failed.
  bool read_headers() {
    for (int r = 0; r < dp_.size; ++r) {
      const rank_header h = get<rank_header>(recv_.data(), size_t(r) * slot_);
      if (h.magic != header_magic || h.stage != stage_ - 1) {
        result_ = make_error(errc::backend_error, "data-parallel exchange: the ranks are not at the same step of the same call");
        return false;
      }
      if (h.code != 0) {
        result_ = remote_error(h, group::data, r);
        return false;
      }
    }
    return true;
  }

  uint64_t seq_key(index_t j) const {
    const token_batch& b = st_.batch;
    if (b.seq_ids.size) return b.seq_ids[j];
    return (uint64_t(1) << 63) | (uint64_t(uint32_t(dp_.rank)) << 32) | uint64_t(j);
  }

  void collect_student_values() {
    values_.clear();
    student_at_.clear();
    n_student_ = 0;
    if (!local_.ok()) return;
    const token_batch& b = st_.batch;
    const std::vector<index_t> seq = host::detail::token_sequences(b.seq_offsets, b.s.size);
    for (index_t i = 0; i < b.s.size; ++i) {
      if (b.from[i] != origin::student) continue;
      const index_t j = seq[static_cast<size_t>(i)];
      const token tk = rules::make_token(b, i, j);
      const uint64_t key = seq_key(j);
      double kd;
      std::memcpy(&kd, &key, sizeof kd);
      values_.insert(values_.end(), {tk.R, tk.ent_s, tk.ent_t, kd});
      student_at_.push_back(i);
    }
    n_student_ = static_cast<index_t>(student_at_.size());
  }

  double pre_count() const {
    const token_batch& b = st_.batch;
    std::vector<uint8_t> c(static_cast<size_t>(b.s.size));
    for (index_t i = 0; i < b.s.size; ++i) c[static_cast<size_t>(i)] = counted_by_rule(*obj_, b.from[i]) ? 1 : 0;
    return local_count(obj_->agg.how, b, c, 1);
  }

  double post_count() const {
    const token_batch& b = st_.batch;
    std::vector<uint8_t> f(static_cast<size_t>(b.s.size));
    for (index_t i = 0; i < b.s.size; ++i) f[static_cast<size_t>(i)] = st_.a.tok[static_cast<size_t>(i)].flags;
    const uint8_t bit = obj_->agg.how == aggregation::mode::kept_token_mean ? flags::kept : flags::counted;
    return local_count(obj_->agg.how, b, f, bit);
  }

  /// Stage 2 over the whole data group's student tokens (exchange 2's values).
  status decide_global() {
    const Obj& obj = *obj_;
    const token_batch& b = st_.batch;
    std::vector<double> R, hs, ht;
    std::vector<uint64_t> keys;
    for (int r = 0; r < dp_.size; ++r) {
      const unsigned char* base = recv_.data() + size_t(r) * slot_;
      const rank_header h = get<rank_header>(base, 0);
      const index_t m = index_t(h.values[0]);
      for (index_t k = 0; k < m; ++k) {
        const size_t off = sizeof(rank_header) + size_t(k) * 4 * sizeof(double);
        R.push_back(get<double>(base, off));
        hs.push_back(get<double>(base, off + 8));
        ht.push_back(get<double>(base, off + 16));
        keys.push_back(get<uint64_t>(base, off + 24));
      }
    }
    std::vector<uint64_t> uniq = keys;
    std::sort(uniq.begin(), uniq.end());
    uniq.erase(std::unique(uniq.begin(), uniq.end()), uniq.end());
    auto index_of = [&](uint64_t k) { return static_cast<index_t>(std::lower_bound(uniq.begin(), uniq.end(), k) - uniq.begin()); };
    std::vector<index_t> sidx(keys.size());
    for (size_t k = 0; k < keys.size(); ++k) sidx[k] = index_of(keys[k]);
    regions::batch_context ctx{opt_.seed, opt_.step, 0, nullptr};
    regions::batch_storage storage;
    regions::batch_tokens bt{R.data(), hs.data(), ht.data(), sidx.data(), static_cast<index_t>(R.size()), static_cast<index_t>(uniq.size())};
    if constexpr (region_prepares<Obj>) TROPD_TRY(obj.region.prepare(bt, ctx, storage));
    st_.trusted.assign(static_cast<size_t>(b.s.size), 0);
    const std::vector<index_t> seq = host::detail::token_sequences(b.seq_offsets, b.s.size);
    for (index_t i : student_at_) {
      const index_t j = seq[static_cast<size_t>(i)];
      token tk = rules::make_token(b, i, j);
      tk.seq_index = index_of(seq_key(j));
      st_.trusted[static_cast<size_t>(i)] = obj.region.trusted(tk, ctx) ? 1 : 0;
    }
    return {};
  }

  status decide_apply() {
    const Obj& obj = *obj_;
    if (need_decisions_) TROPD_TRY(decide_global());
    else TROPD_TRY(host::decide(obj, st_.batch, opt_, st_.trusted));
    TROPD_TRY(host::apply(obj, st_.batch, st_.trusted, st_.a));
    return host::aggregate_weights(obj, st_.batch, st_.a, st_.w, st_.normaliser);
  }

  void finish() {
    if (!local_.ok()) {
      result_ = local_;
      return;
    }
    if (need_count_) {
      // The weights of the whole batch: the same rule with the group's count as normaliser.
      Obj o = *obj_;
      o.agg.normaliser = global_count_;
      const status s = host::aggregate_weights(o, st_.batch, st_.a, st_.w, st_.normaliser);
      if (!s.ok()) {
        result_ = s;
        return;
      }
    }
    host::summarise(st_.batch, st_.trusted, st_.a, st_.w, st_.normaliser, st_.diag);
    st_.diag.n_masked_input = n_masked_;
    result_ = {};
  }
};

}  // namespace detail

/// Token-level evaluation of a batch split across a data group (each rank calls it with its
/// own tokens): evaluate_tokens with the whole batch's normaliser and batch decisions (see
/// the header comment). The loss is this rank's share; dL/ds and the top-k gradients are
/// those of its tokens. Every rank of the group must call it with the same objective and
/// options (seed, step, data_options).
template <class Obj, host_communicator DC>
status evaluate_tokens(const Obj& obj, const token_batch& b, const token_outputs& out, const host::eval_options& opt, DC& data,
                       const data_options& dop = {}) {
  if constexpr (Obj::has_dense) {
    return make_error(errc::unsupported, "objective has a full-vocabulary term: it needs logits (use dist::evaluate_rows)");
  } else {
    detail::stages_call<Obj> call;
    call.start(obj, b, opt, group_layout{data.rank(), data.size()}, dop, b.topk_ids.cols, &out);
    exchange ex;
    while (call.next(ex)) TROPD_TRY(data.all_gather(ex.send, ex.recv, ex.bytes));
    TROPD_TRY(call.result());
    host::token_stages& st = call.stages();
    TROPD_TRY(host::detail::check_output_range(st.batch, st.a, st.w, host::detail::output_limit(out)));
    host::detail::write_token_outputs(st.batch, st.a, st.w, out);
    if (out.loss) *out.loss = st.diag.loss;
    if (out.diag) *out.diag = st.diag;
    return {};
  }
}

}  // namespace tropd::dist
