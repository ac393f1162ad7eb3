// tropd/regions/regions.hpp: trust-region rules (who is trusted), method.md 4.2-4.3, 5, 6.
//
// A region looks at one on-policy (student-sampled) token (core/token.hpp) and says whether it is inside
// the trust region (M = 1: the trust estimator applies) or an outlier (M = 0: the outlier
// handler applies). Rules that need batch-level quantities (a quantile over the batch, a
// per-sequence maximum) compute them in a host-side `prepare` step into a
// `batch_context` before the per-token rule runs.
//
//   all_trusted                 M = 1                                          (OPD)
//   stochastic_acceptance       M = [log U <= R], U ~ Philox(seed, step, seq, pos) in (0, 1]
//                               i.e. M ~ Bernoulli(min(1, p_T(y) / p_S_old(y)))  (TrOPD)
//   log_ratio_threshold{tau}    M = [R > tau]                                  (mask / clip outlier)
//   teacher_entropy_gate{tau}   M = [H_T <= tau]   (EOPD: high-entropy tokens get the additive FKL)
//   entropy_top_fraction{f}     M = [H_S >= the (1 - f) quantile of H_S over the batch's student tokens]
//                               (REOPOLD phase II, Entropy OPD)
//   sequence_ratio_bound{b}     M = 0 for every token of a sequence whose max_t (-R_t) (or |R_t|) > b  (TRM-style)
//   phase_switch<A, B>{s}       A before step s, B from step s on  (REOPOLD)
//
// with R = t - s_old the detached log-ratio reward.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <concepts>
#include <vector>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/random.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token.hpp>
#include <tropd/schedules/phase.hpp>

namespace tropd::regions {

/// Batch-level values computed by `prepare` (host) and read by the per-token rule.
struct batch_context {
  uint64_t seed = 0;
  uint64_t step = 0;
  double threshold = 0;               ///< a quantile, for entropy_top_fraction
  const uint8_t* seq_masked = nullptr;  ///< per sequence in the batch: 1 = masked
};

/// What `prepare` may read: per-token arrays of the student tokens of the batch.
struct batch_tokens {
  const double* R = nullptr;
  const double* ent_s = nullptr;      ///< nullptr when not supplied
  const double* ent_t = nullptr;
  const index_t* seq_index = nullptr;
  index_t n = 0;                      ///< number of student tokens
  index_t n_seq = 0;                  ///< number of sequences in the batch
};

/// Host-side storage that outlives a `batch_context` (sequence masks).
struct batch_storage {
  std::vector<uint8_t> seq_masked;
};

/// A region rule: `trusted(token, ctx)` on host and device, plus an optional
/// `prepare(tokens, ctx, storage) -> status` on the host and a `check() -> status`.
template <class R>
concept trust_region = requires(const R& r, const token& tv, const batch_context& ctx) {
  { r.trusted(tv, ctx) } -> std::convertible_to<bool>;
  { r.check() } -> std::same_as<status>;
  { R::needs_student_entropy } -> std::convertible_to<bool>;
  { R::needs_teacher_entropy } -> std::convertible_to<bool>;
};

/// Whether a region decides every token from the token alone: it has no batch decision
/// (`prepare`), so its decisions can be made on any part of a batch, e.g. chunk by chunk in
/// the fused LM head (core/fused_lm_head.hpp: one sweep instead of two).
template <class R>
inline constexpr bool decides_per_token = !requires(const R& r, const batch_tokens& bt, batch_context& ctx, batch_storage& st) {
  r.prepare(bt, ctx, st);
};

/// Every token is trusted (OPD).
struct all_trusted {
  static constexpr const char* name = "all_trusted";
  static constexpr bool needs_student_entropy = false, needs_teacher_entropy = false;
  TROPD_HD constexpr status check() const noexcept { return {}; }
  TROPD_HD constexpr bool trusted(const token&, const batch_context&) const noexcept { return true; }
};
static_assert(trust_region<all_trusted>);

/// TrOPD's adaptive trust region: accept iff log U <= R with U in (0, 1] drawn from
/// Philox keyed by (seed, step, seq_id, position, streams::trust_region). P(M = 1) =
/// min(1, exp(R)); R = -inf (zero teacher mass) is always an outlier; R >= 0 always trusted.
struct stochastic_acceptance {
  static constexpr const char* name = "stochastic_acceptance";
  static constexpr bool needs_student_entropy = false, needs_teacher_entropy = false;
  TROPD_HD constexpr status check() const noexcept { return {}; }
  TROPD_HD bool trusted(const token& tv, const batch_context& ctx) const noexcept {
    if (tv.R >= 0) return true;
    const draw_key k{ctx.seed, ctx.step, tv.seq_id, tv.position, streams::trust_region};
    return log_uniform(k) <= tv.R;
  }
};
static_assert(trust_region<stochastic_acceptance>);

/// Static log-ratio threshold: trusted iff R > tau (tau < 0; the paper does not publish it).
struct log_ratio_threshold {
  static constexpr const char* name = "log_ratio_threshold";
  static constexpr bool needs_student_entropy = false, needs_teacher_entropy = false;
  double tau = -5.0;
  TROPD_HD constexpr status check() const noexcept {
    if (is_nan(tau)) return make_error(errc::invalid_parameter, "log_ratio_threshold: tau is NaN");
    return {};
  }
  TROPD_HD constexpr bool trusted(const token& tv, const batch_context&) const noexcept { return tv.R > tau; }
};
static_assert(trust_region<log_ratio_threshold>);

/// EOPD's gate: trusted iff the teacher's full-vocabulary entropy H_T <= tau (0.8 nats);
/// tokens above it receive the outlier term (EOPD adds it: objective::outlier_mode::add).
struct teacher_entropy_gate {
  static constexpr const char* name = "teacher_entropy_gate";
  static constexpr bool needs_student_entropy = false, needs_teacher_entropy = true;
  double tau = 0.8;
  TROPD_HD constexpr status check() const noexcept {
    if (!(tau >= 0)) return make_error(errc::invalid_parameter, "teacher_entropy_gate: tau must be >= 0");
    return {};
  }
  TROPD_HD constexpr bool trusted(const token& tv, const batch_context&) const noexcept { return !(tv.ent_t > tau); }
};
static_assert(trust_region<teacher_entropy_gate>);

/// Keeps the top `fraction` of the batch's student tokens by student entropy:
/// threshold = the ceil(fraction * n)-th largest H_S; trusted iff H_S >= threshold
/// (ties at the threshold are all kept). REOPOLD phase II (20%), Entropy OPD.
struct entropy_top_fraction {
  static constexpr const char* name = "entropy_top_fraction";
  static constexpr bool needs_student_entropy = true, needs_teacher_entropy = false;
  double fraction = 0.2;
  TROPD_HD constexpr status check() const noexcept {
    if (!(fraction > 0 && fraction <= 1)) return make_error(errc::invalid_parameter, "entropy_top_fraction: fraction must lie in (0, 1]");
    return {};
  }
  /// The threshold's rank (0-based, descending) among n student tokens:
  /// keep = max(1, floor(fraction n + 1 - 1e-9)), rank min(keep, n) - 1; -1 when n = 0 (the
  /// threshold is then +inf). The device's prepare sorts and reads the same rank.
  TROPD_HD static constexpr index_t threshold_rank(double fraction, index_t n) noexcept {
    if (n <= 0) return -1;
    index_t keep = static_cast<index_t>(fraction * double(n) + 1.0 - 1e-9);
    if (keep < 1) keep = 1;
    return (keep < n ? keep : n) - 1;
  }
  status prepare(const batch_tokens& b, batch_context& ctx, batch_storage&) const {
    if (b.n == 0) { ctx.threshold = inf<double>(); return {}; }
    std::vector<double> h(b.ent_s, b.ent_s + b.n);
    const index_t kth = threshold_rank(fraction, b.n);
    std::nth_element(h.begin(), h.begin() + kth, h.end(), [](double x, double y) { return x > y; });
    ctx.threshold = h[static_cast<size_t>(kth)];
    return {};
  }
  TROPD_HD constexpr bool trusted(const token& tv, const batch_context& ctx) const noexcept { return tv.ent_s >= ctx.threshold; }
};
static_assert(trust_region<entropy_top_fraction>);

/// TRM-style sequence mask applied to the log-ratio: every token of a sequence is an
/// outlier when max over its student tokens of -R (or |R| if two_sided) exceeds `bound`.
struct sequence_ratio_bound {
  static constexpr const char* name = "sequence_ratio_bound";
  static constexpr bool needs_student_entropy = false, needs_teacher_entropy = false;
  double bound = 10.0;
  bool two_sided = false;
  TROPD_HD constexpr status check() const noexcept {
    if (!(bound >= 0)) return make_error(errc::invalid_parameter, "sequence_ratio_bound: bound must be >= 0");
    return {};
  }
  status prepare(const batch_tokens& b, batch_context& ctx, batch_storage& st) const {
    st.seq_masked.assign(static_cast<size_t>(b.n_seq), 0);
    for (index_t i = 0; i < b.n; ++i) {
      const double v = two_sided ? abs_(b.R[i]) : -b.R[i];
      if (v > bound) st.seq_masked[static_cast<size_t>(b.seq_index[i])] = 1;
    }
    ctx.seq_masked = st.seq_masked.data();
    return {};
  }
  TROPD_HD constexpr bool trusted(const token& tv, const batch_context& ctx) const noexcept {
    return !(ctx.seq_masked && ctx.seq_masked[tv.seq_index]);
  }
};
static_assert(trust_region<sequence_ratio_bound>);

/// Uses `first` before `switch_step` and `second` from it on (REOPOLD's phase switch).
template <trust_region A, trust_region B>
struct phase_switch {
  static constexpr const char* name = "phase_switch";
  static constexpr bool needs_student_entropy = A::needs_student_entropy || B::needs_student_entropy;
  static constexpr bool needs_teacher_entropy = A::needs_teacher_entropy || B::needs_teacher_entropy;
  A first{};
  B second{};
  long long switch_step = 0;
  /// The phase rule (schedules/phase.hpp): `first` in phase 0, `second` in phase 1.
  TROPD_HD constexpr bool in_first(uint64_t step) const noexcept {
    return schedules::phase_switch{switch_step}.phase(static_cast<long long>(step)) == 0;
  }
  TROPD_HD constexpr status check() const noexcept {
    const status p = schedules::phase_switch{switch_step}.check();
    if (!p.ok()) return p;
    const status a = first.check();
    return a.ok() ? second.check() : a;
  }
  status prepare(const batch_tokens& b, batch_context& ctx, batch_storage& st) const {
    if (in_first(ctx.step)) {
      if constexpr (requires { first.prepare(b, ctx, st); }) return first.prepare(b, ctx, st);
    } else {
      if constexpr (requires { second.prepare(b, ctx, st); }) return second.prepare(b, ctx, st);
    }
    return {};
  }
  TROPD_HD constexpr bool trusted(const token& tv, const batch_context& ctx) const noexcept {
    return in_first(ctx.step) ? first.trusted(tv, ctx) : second.trusted(tv, ctx);
  }
};
static_assert(trust_region<phase_switch<log_ratio_threshold, entropy_top_fraction>>);

}  // namespace tropd::regions
