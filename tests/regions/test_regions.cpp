// tropd/regions/regions.hpp, each trust-region rule on its own (method.md 4.2, 4.3, 5, 6):
// check() on parameters outside the domain, prepare() and trusted() against values computed
// here from the definitions, ties at thresholds and quantiles, -inf rewards, empty batches,
// sequence masks, the phase switch's boundary. The stochastic region's random key gets a
// known-answer test against an independent Philox (Random123), directly and through
// host::decide (tests/reference/philox_key.hpp), so that a mix-up of the key's fields
// (sequence / position, step / seed) fails here and not only, indirectly, in the driver tests.
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/host/token_stages.hpp>
#include <tropd/objective/presets.hpp>
#include <tropd/regions/regions.hpp>

#include "reference/philox_key.hpp"

namespace rg = tropd::regions;
namespace pk = tropd_test::philox_key;
using tropd::index_t;

namespace {

constexpr double dinf = std::numeric_limits<double>::infinity();
constexpr double dnan = std::numeric_limits<double>::quiet_NaN();

tropd::token student(double R, double ent_s = 0, double ent_t = 0, uint64_t seq_id = 0, uint64_t position = 0, index_t seq_index = 0) {
  tropd::token tk;
  tk.from = tropd::origin::student;
  tk.s = tk.s_old = -1;
  tk.t = -1 + R;
  tk.R = R;
  tk.ent_s = ent_s;
  tk.ent_t = ent_t;
  tk.seq_id = seq_id;
  tk.position = position;
  tk.seq_index = seq_index;
  return tk;
}

bool invalid(const tropd::status& st) { return st.code == tropd::errc::invalid_parameter; }

}  // namespace

// ---------------------------------------------------------------------------
// all_trusted, log_ratio_threshold, teacher_entropy_gate: per-token rules.
// ---------------------------------------------------------------------------

TEST_CASE("regions: all_trusted trusts every token, -inf reward included") {
  const rg::all_trusted r;
  CHECK(r.check().ok());
  for (double R : {0.0, -1.0, 3.0, -dinf, -1e300}) CHECK(r.trusted(student(R), {}));
  CHECK_FALSE(rg::all_trusted::needs_student_entropy);
  CHECK_FALSE(rg::all_trusted::needs_teacher_entropy);
}

TEST_CASE("regions: log_ratio_threshold is R > tau (a tie is an outlier, -inf always one)") {
  for (double tau : {-5.0, -1.0, 0.0, 2.0}) {
    CAPTURE(tau);
    const rg::log_ratio_threshold r{tau};
    CHECK(r.check().ok());
    for (double R : {tau - 1, std::nextafter(tau, -dinf), tau, std::nextafter(tau, dinf), tau + 1, -dinf, 0.0}) {
      CAPTURE(R);
      CHECK(r.trusted(student(R), {}) == (R > tau));
    }
    CHECK_FALSE(r.trusted(student(-dinf), {}));
  }
  // tau = -inf trusts every finite reward and still not R = -inf (-inf > -inf is false).
  const rg::log_ratio_threshold all{-dinf};
  CHECK(all.check().ok());
  CHECK(all.trusted(student(-1e300), {}));
  CHECK_FALSE(all.trusted(student(-dinf), {}));
  CHECK(invalid(rg::log_ratio_threshold{dnan}.check()));
}

TEST_CASE("regions: teacher_entropy_gate is H_T <= tau (EOPD), ties trusted") {
  for (double tau : {0.0, 0.8, 2.5}) {
    CAPTURE(tau);
    const rg::teacher_entropy_gate r{tau};
    CHECK(r.check().ok());
    for (double ht : {0.0, tau / 2, tau, std::nextafter(tau, dinf), tau + 1, 50.0}) {
      CAPTURE(ht);
      CHECK(r.trusted(student(-1, 0, ht), {}) == (ht <= tau));
    }
    // The gate reads only H_T: R = -inf under a low teacher entropy is trusted.
    CHECK(r.trusted(student(-dinf, 0, 0), {}));
  }
  CHECK(rg::teacher_entropy_gate::needs_teacher_entropy);
  CHECK_FALSE(rg::teacher_entropy_gate::needs_student_entropy);
  CHECK(invalid(rg::teacher_entropy_gate{-0.1}.check()));
  CHECK(invalid(rg::teacher_entropy_gate{dnan}.check()));
  CHECK(rg::teacher_entropy_gate{dinf}.check().ok());
}

// ---------------------------------------------------------------------------
// entropy_top_fraction: a batch-level quantile.
// ---------------------------------------------------------------------------

namespace {

/// The reference threshold of method.md 5 ("keep the top f of the batch's student tokens by
/// student entropy"): the ceil(f n)-th largest H_S, ceil taken with a 1e-9 tolerance so that
/// f n = 2.0000000000000004 keeps 2, at least one token; +inf for an empty batch.
double reference_threshold(std::vector<double> h, double f) {
  if (h.empty()) return dinf;
  std::sort(h.begin(), h.end(), [](double a, double b) { return a > b; });
  size_t keep = static_cast<size_t>(std::ceil(f * static_cast<double>(h.size()) - 1e-9));
  keep = std::clamp<size_t>(keep, 1, h.size());
  return h[keep - 1];
}

/// prepare + trusted over a list of student entropies.
std::vector<bool> top_fraction(double f, const std::vector<double>& h, double* threshold = nullptr) {
  const rg::entropy_top_fraction r{f};
  REQUIRE(r.check().ok());
  std::vector<double> R(h.size(), -1.0);
  std::vector<index_t> seq(h.size(), 0);
  rg::batch_tokens bt{R.data(), h.data(), nullptr, seq.data(), static_cast<index_t>(h.size()), 1};
  rg::batch_context ctx;
  rg::batch_storage storage;
  REQUIRE(r.prepare(bt, ctx, storage).ok());
  if (threshold) *threshold = ctx.threshold;
  std::vector<bool> out;
  for (double x : h) out.push_back(r.trusted(student(-1, x), ctx));
  return out;
}

}  // namespace

TEST_CASE("regions: entropy_top_fraction keeps H_S >= the ceil(f n)-th largest entropy") {
  const std::vector<double> h = {0.3, 2.5, 1.1, 0.0, 3.9, 0.7, 2.2, 1.8, 0.9, 3.1};
  for (double f : {0.01, 0.1, 0.2, 0.25, 0.35, 0.5, 0.99, 1.0}) {
    CAPTURE(f);
    double thr = 0;
    const auto m = top_fraction(f, h, &thr);
    const double want = reference_threshold(h, f);
    CHECK(thr == want);
    size_t kept = 0;
    for (size_t i = 0; i < h.size(); ++i) {
      CHECK(m[i] == (h[i] >= want));
      kept += m[i];
    }
    // Distinct entropies: exactly max(1, ceil(f n)) tokens.
    CHECK(kept == std::clamp<size_t>(static_cast<size_t>(std::ceil(f * 10 - 1e-9)), 1, 10));
  }
  // f n exact in real arithmetic but not in floating point: 0.2 * 10 keeps 2, 0.3 * 10 keeps 3.
  const std::vector<double> ten = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  for (const auto& fk : {std::pair{0.2, 2}, std::pair{0.3, 3}, std::pair{0.7, 7}, std::pair{0.6, 6}}) {
    const double f = fk.first;  // not a structured binding: CAPTURE's lambda cannot capture one in clang < 16
    const int keep = fk.second;
    CAPTURE(f);
    const auto m = top_fraction(f, ten);
    CHECK(std::count(m.begin(), m.end(), true) == keep);
  }
}

TEST_CASE("regions: entropy_top_fraction keeps every token tied at the quantile") {
  // Top 40% of 5 = 2 tokens; the 2nd largest entropy (2) is shared by three tokens: all kept.
  const std::vector<double> h = {2.0, 3.0, 1.0, 2.0, 2.0};
  double thr = 0;
  const auto m = top_fraction(0.4, h, &thr);
  CHECK(thr == 2.0);
  CHECK(m == std::vector<bool>{true, true, false, true, true});
  // All tied: every token is kept, whatever the fraction.
  CHECK(top_fraction(0.01, std::vector<double>(7, 1.5)) == std::vector<bool>(7, true));
  // One token: it is kept for any fraction.
  CHECK(top_fraction(0.01, {4.0}) == std::vector<bool>{true});
}

TEST_CASE("regions: entropy_top_fraction on an empty batch and outside its domain") {
  double thr = 0;
  CHECK(top_fraction(0.2, {}, &thr).empty());
  CHECK(thr == dinf);  // nothing can be trusted
  for (double f : {0.0, -0.1, 1.0000001, 2.0, dnan, dinf}) {
    CAPTURE(f);
    CHECK(invalid(rg::entropy_top_fraction{f}.check()));
  }
  CHECK(rg::entropy_top_fraction{1.0}.check().ok());
  CHECK(rg::entropy_top_fraction::needs_student_entropy);
  CHECK_FALSE(rg::entropy_top_fraction::needs_teacher_entropy);
}

// ---------------------------------------------------------------------------
// sequence_ratio_bound: a per-sequence mask.
// ---------------------------------------------------------------------------

namespace {

std::vector<uint8_t> seq_mask(const rg::sequence_ratio_bound& r, const std::vector<double>& R, const std::vector<index_t>& seq, index_t n_seq) {
  REQUIRE(r.check().ok());
  rg::batch_tokens bt{R.data(), nullptr, nullptr, seq.data(), static_cast<index_t>(R.size()), n_seq};
  rg::batch_context ctx;
  rg::batch_storage storage;
  REQUIRE(r.prepare(bt, ctx, storage).ok());
  REQUIRE(ctx.seq_masked != nullptr);
  std::vector<uint8_t> per_seq(ctx.seq_masked, ctx.seq_masked + n_seq);
  // trusted() agrees with the mask for every token of every sequence.
  for (size_t i = 0; i < R.size(); ++i) CHECK(r.trusted(student(R[i], 0, 0, 0, 0, seq[i]), ctx) == (per_seq[static_cast<size_t>(seq[i])] == 0));
  return per_seq;
}

}  // namespace

TEST_CASE("regions: sequence_ratio_bound masks a sequence when max_t (-R_t) (or |R_t|) exceeds the bound") {
  // Sequences: 0 {-1, -2.5}, 1 {-3 (= -bound: a tie, kept), 0.5}, 2 {4.0}, 3 {-inf}, 4 {} (empty), 5 {-0.1, -3.0001}.
  const std::vector<double> R = {-1, -2.5, -3, 0.5, 4.0, -dinf, -0.1, -3.0001};
  const std::vector<index_t> seq = {0, 0, 1, 1, 2, 3, 5, 5};
  const index_t n_seq = 6;
  auto reference = [&](double bound, bool two_sided) {
    std::vector<uint8_t> m(static_cast<size_t>(n_seq), 0);
    for (size_t i = 0; i < R.size(); ++i) {
      const double v = two_sided ? std::fabs(R[i]) : -R[i];
      if (v > bound) m[static_cast<size_t>(seq[i])] = 1;
    }
    return m;
  };
  for (double bound : {3.0, 0.0, 10.0}) {
    for (bool two_sided : {false, true}) {
      CAPTURE(bound);
      CAPTURE(two_sided);
      CHECK(seq_mask({bound, two_sided}, R, seq, n_seq) == reference(bound, two_sided));
    }
  }
  // Spelled out for bound 3: one-sided masks 3 (-inf) and 5 (-3.0001), not the tie in 1 nor 2's +4.
  CHECK(seq_mask({3.0, false}, R, seq, n_seq) == std::vector<uint8_t>{0, 0, 0, 1, 0, 1});
  // Two-sided also masks 2 (|4| > 3).
  CHECK(seq_mask({3.0, true}, R, seq, n_seq) == std::vector<uint8_t>{0, 0, 1, 1, 0, 1});
  // Without a prepared mask every token is trusted.
  CHECK(rg::sequence_ratio_bound{}.trusted(student(-dinf), {}));
  CHECK(invalid(rg::sequence_ratio_bound{-1.0}.check()));
  CHECK(invalid(rg::sequence_ratio_bound{dnan}.check()));
  CHECK(rg::sequence_ratio_bound{dinf}.check().ok());
}

TEST_CASE("regions: sequence_ratio_bound through host::decide masks whole sequences of a batch") {
  // Two sequences with prompt and teacher tokens in between: only student tokens are read
  // (a teacher token with a huge |R| does not mask its sequence).
  using tropd::origin;
  const std::vector<origin> from = {origin::prompt,  origin::student, origin::student, origin::teacher,
                                    origin::student, origin::teacher, origin::student, origin::student};
  const std::vector<double> s = {-1, -1, -1, -1, -1, -1, -1, -1};
  const std::vector<double> t = {-1, -1.5, -9, -30, -1.2, -40, -1.1, -1.0};
  const std::vector<index_t> off = {0, 4, 8};
  tropd::token_batch b;
  b.s = {s.data(), 8};
  b.t = {t.data(), 8};
  b.from = {from.data(), 8};
  b.seq_offsets = {off.data(), 3};
  tropd::objective<rg::sequence_ratio_bound, tropd::estimators::k1_reward, tropd::outliers::drop, tropd::clippers::no_clip> o;
  o.region.bound = 5;
  std::vector<uint8_t> m;
  REQUIRE(tropd::host::decide(o, b, {}, m).ok());
  // Sequence 0 has R = -8 < -5 on a student token: its student tokens are outliers.
  CHECK(m[1] == 0);
  CHECK(m[2] == 0);
  // Sequence 1's student tokens have R in [-0.2, 0]: trusted (its teacher token's R = -39 is not read).
  CHECK(m[4] == 1);
  CHECK(m[6] == 1);
  CHECK(m[7] == 1);
}

// ---------------------------------------------------------------------------
// phase_switch: first before switch_step, second from it on.
// ---------------------------------------------------------------------------

namespace {

using reopold_region = rg::phase_switch<rg::log_ratio_threshold, rg::entropy_top_fraction>;

/// The region's decisions for (R, H_S) tokens at a step: prepare, then trusted.
std::vector<bool> phase_decisions(const reopold_region& r, uint64_t step, const std::vector<double>& R, const std::vector<double>& h) {
  REQUIRE(r.check().ok());
  std::vector<index_t> seq(R.size(), 0);
  rg::batch_tokens bt{R.data(), h.data(), nullptr, seq.data(), static_cast<index_t>(R.size()), 1};
  rg::batch_context ctx;
  ctx.step = step;
  rg::batch_storage storage;
  REQUIRE(r.prepare(bt, ctx, storage).ok());
  std::vector<bool> out;
  for (size_t i = 0; i < R.size(); ++i) out.push_back(r.trusted(student(R[i], h[i]), ctx));
  return out;
}

}  // namespace

TEST_CASE("regions: phase_switch uses the first rule before switch_step and the second from it on") {
  // Phase I keeps R > -1 (tokens 0, 2, 4); phase II the top 40% by entropy (tokens 1, 3):
  // disjoint sets, so a decision taken by the wrong phase is visible at every step.
  const std::vector<double> R = {-0.5, -2.0, -0.1, -3.0, -0.9};
  const std::vector<double> h = {0.1, 3.0, 0.2, 2.0, 0.3};
  const std::vector<bool> phase1 = {true, false, true, false, true}, phase2 = {false, true, false, true, false};
  for (long long sw : {1ll, 5ll, 100ll}) {
    CAPTURE(sw);
    reopold_region r;
    r.first.tau = -1.0;
    r.second.fraction = 0.4;
    r.switch_step = sw;
    const uint64_t s = static_cast<uint64_t>(sw);
    CHECK(phase_decisions(r, 0, R, h) == phase1);
    CHECK(phase_decisions(r, s - 1, R, h) == phase1);
    CHECK(phase_decisions(r, s, R, h) == phase2);
    CHECK(phase_decisions(r, s + 1, R, h) == phase2);
    CHECK(phase_decisions(r, s + 1000, R, h) == phase2);
  }
  // switch_step 0: phase II from the first step on.
  reopold_region r0;
  r0.first.tau = -1.0;
  r0.second.fraction = 0.4;
  r0.switch_step = 0;
  CHECK(phase_decisions(r0, 0, R, h) == phase2);
  CHECK(phase_decisions(r0, 1, R, h) == phase2);
}

TEST_CASE("regions: phase_switch runs the prepare step of the active phase only") {
  // The second phase's quantile is computed at the switch step itself: an unprepared
  // entropy_top_fraction (threshold 0) would trust every token.
  reopold_region r;
  r.first.tau = -1.0;
  r.second.fraction = 0.2;
  r.switch_step = 3;
  const std::vector<double> R = {-0.5, -0.5, -0.5, -0.5, -0.5};
  const std::vector<double> h = {1, 2, 3, 4, 5};
  CHECK(phase_decisions(r, 3, R, h) == std::vector<bool>{false, false, false, false, true});
  CHECK(phase_decisions(r, 2, R, h) == std::vector<bool>(5, true));
  // A sequence mask as the second phase: prepared from the switch step on.
  rg::phase_switch<rg::all_trusted, rg::sequence_ratio_bound> m;
  m.second.bound = 1.0;
  m.switch_step = 2;
  const std::vector<double> R2 = {-0.5, -4.0};
  std::vector<index_t> seq = {0, 1};
  for (uint64_t step : {1ull, 2ull}) {
    CAPTURE(step);
    rg::batch_tokens bt{R2.data(), nullptr, nullptr, seq.data(), 2, 2};
    rg::batch_context ctx;
    ctx.step = step;
    rg::batch_storage storage;
    REQUIRE(m.prepare(bt, ctx, storage).ok());
    CHECK(m.trusted(student(-0.5, 0, 0, 0, 0, 0), ctx));
    CHECK(m.trusted(student(-4.0, 0, 0, 1, 0, 1), ctx) == (step < 2));
  }
}

TEST_CASE("regions: phase_switch check() and needs_* combine both phases") {
  reopold_region r;
  CHECK(r.check().ok());
  r.switch_step = -1;
  CHECK(invalid(r.check()));
  r.switch_step = 0;
  r.first.tau = dnan;
  CHECK(invalid(r.check()));
  r.first.tau = -1;
  r.second.fraction = dnan;
  CHECK(invalid(r.check()));
  r.second.fraction = 0.5;
  CHECK(r.check().ok());
  CHECK(reopold_region::needs_student_entropy);
  CHECK_FALSE(reopold_region::needs_teacher_entropy);
  CHECK(rg::phase_switch<rg::teacher_entropy_gate, rg::all_trusted>::needs_teacher_entropy);
  CHECK_FALSE(rg::phase_switch<rg::all_trusted, rg::log_ratio_threshold>::needs_student_entropy);
}

// ---------------------------------------------------------------------------
// stochastic_acceptance: M = [R >= 0 or log U <= R], U from Philox keyed by
// (seed, step, sequence id, position, stream).
// ---------------------------------------------------------------------------

TEST_CASE("regions: stochastic_acceptance's decisions for fixed keys (known answers from Random123)") {
  // The answers are Random123's (tests/reference/philox_key.hpp); core/test_random.cpp checks
  // the bits themselves. Here: the region's decision at R = -0.5, i.e. U <= e^-0.5.
  const rg::stochastic_acceptance r;
  for (const pk::known_answer& k : pk::trust_region_answers) {
    CAPTURE(k.seed);
    CAPTURE(k.step);
    CAPTURE(k.sequence);
    CAPTURE(k.position);
    CHECK(pk::bits(k.seed, k.step, k.sequence, k.position, tropd::streams::trust_region) == k.bits);
    rg::batch_context ctx;
    ctx.seed = k.seed;
    ctx.step = k.step;
    CHECK(r.trusted(student(-0.5, 0, 0, k.sequence, k.position), ctx) == k.trusted_at_minus_half);
    // Just above and just below this key's log U the decision flips.
    const long double lu = pk::trust_log_u(k.seed, k.step, k.sequence, k.position);
    CHECK(r.trusted(student(static_cast<double>(lu + 1e-9L), 0, 0, k.sequence, k.position), ctx));
    CHECK_FALSE(r.trusted(student(static_cast<double>(lu - 1e-9L), 0, 0, k.sequence, k.position), ctx));
  }
}

TEST_CASE("regions: stochastic_acceptance decides log U <= R for fixed (seed, step, sequence, position)") {
  // Just above and just below each draw's log U the decision flips: a key built from other
  // fields (sequence and position swapped, step and seed swapped, high words dropped) gives
  // another U and fails one of the two.
  const rg::stochastic_acceptance r;
  CHECK(r.check().ok());
  const uint64_t fields[] = {0, 1, 2, 7, 1000003, 0xffffffffull, 0x100000000ull, 0x123456789abcdefull};
  int flips = 0;
  for (uint64_t seed : fields)
    for (uint64_t step : {fields[1], fields[3], fields[6]})
      for (uint64_t seq : {fields[2], fields[4], fields[7]})
        for (uint64_t pos : {fields[0], fields[3], fields[5]}) {
          CAPTURE(seed);
          CAPTURE(step);
          CAPTURE(seq);
          CAPTURE(pos);
          const long double lu = pk::trust_log_u(seed, step, seq, pos);
          rg::batch_context ctx;
          ctx.seed = seed;
          ctx.step = step;
          const double above = static_cast<double>(lu + 1e-9L), below = static_cast<double>(lu - 1e-9L);
          if (above < 0) {
            CHECK(r.trusted(student(above, 0, 0, seq, pos), ctx));
            ++flips;
          }
          CHECK_FALSE(r.trusted(student(below, 0, 0, seq, pos), ctx));
        }
  CHECK(flips > 100);
  // R >= 0 is always trusted and R = -inf never, whatever the key.
  for (uint64_t seed : fields) {
    rg::batch_context ctx;
    ctx.seed = seed;
    ctx.step = seed ^ 5;
    CHECK(r.trusted(student(0.0, 0, 0, seed, 3), ctx));
    CHECK(r.trusted(student(2.0, 0, 0, seed, 3), ctx));
    CHECK_FALSE(r.trusted(student(-dinf, 0, 0, seed, 3), ctx));
  }
}

TEST_CASE("regions: host::decide keys the stochastic region by (seed, step, sequence id, position in the sequence)") {
  // Three sequences with global ids 11, 0x500000001 and 29; positions count from each
  // sequence's first token, prompt and teacher tokens included. Each student token's R is
  // set just above or just below log U of its own key, so any other key flips decisions.
  using tropd::origin;
  const std::vector<uint64_t> seq_ids = {11, 0x500000001ull, 29};
  const std::vector<index_t> off = {0, 5, 9, 14};
  std::vector<origin> from;
  for (index_t i = 0; i < 14; ++i) from.push_back(i == 0 || i == 5 ? origin::prompt : (i == 6 ? origin::teacher : origin::student));
  for (uint64_t seed : {3ull, 0xabcdef0123ull}) {
    for (uint64_t step : {0ull, 4ull, 0x200000000ull}) {
      CAPTURE(seed);
      CAPTURE(step);
      std::vector<double> s(14, -1.0), t(14, -1.0);
      std::vector<uint8_t> want(14, 0);
      for (size_t j = 0; j < 3; ++j)
        for (index_t i = off[j]; i < off[j + 1]; ++i) {
          if (from[static_cast<size_t>(i)] != origin::student) continue;
          const long double lu = pk::trust_log_u(seed, step, seq_ids[j], static_cast<uint64_t>(i - off[j]));
          const bool up = (i % 2) == 0 && lu + 1e-7L < 0;
          t[static_cast<size_t>(i)] = static_cast<double>(-1.0L + lu + (up ? 1e-7L : -1e-7L));
          want[static_cast<size_t>(i)] = up;
        }
      tropd::token_batch b;
      b.s = {s.data(), 14};
      b.t = {t.data(), 14};
      b.from = {from.data(), 14};
      b.seq_offsets = {off.data(), 4};
      b.seq_ids = {seq_ids.data(), 3};
      tropd::host::eval_options opt;
      opt.seed = seed;
      opt.step = step;
      std::vector<uint8_t> m;
      REQUIRE(tropd::host::decide(tropd::presets::tropd(), b, opt, m).ok());
      for (size_t i = 0; i < 14; ++i) {
        CAPTURE(i);
        if (from[i] == origin::student) CHECK(m[i] == want[i]);
      }
    }
  }
}
