// User-defined policies plugged into tropd::objective without touching the library: a
// region (entropy_and_ratio_gate), a region with a batch-level `prepare` step
// (ratio_above_batch_median), an outlier handler (scaled_reward) and a clipper
// (tanh_advantage, the soft clip A' = c tanh(A / c)); plus the library's direct-loss trust
// estimators (k2 / k3 as losses) and the proximal reward. Every expected value is computed
// here from the policy's definition.
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

#include "reference/naive.hpp"

namespace naive = tropd_test::naive;
using tropd_test::naive::ld;
using tropd_test::naive::vec;
using tropd::index_t;

namespace {

constexpr float finf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------
// The custom policies (what a user would write in their own code).
// ---------------------------------------------------------------------------

/// Trusted iff the student is confident (H_S <= max_entropy) and the teacher agrees well
/// enough (R > tau). Needs student entropies.
struct entropy_and_ratio_gate {
  static constexpr bool needs_student_entropy = true, needs_teacher_entropy = false;
  double max_entropy = 2.0;
  double tau = -2.0;
  tropd::status check() const noexcept {
    if (!(max_entropy >= 0)) return tropd::make_error(tropd::errc::invalid_parameter, "entropy_and_ratio_gate: max_entropy must be >= 0");
    return {};
  }
  bool trusted(const tropd::token& tv, const tropd::regions::batch_context&) const noexcept {
    return tv.ent_s <= max_entropy && tv.R > tau;
  }
};
static_assert(tropd::regions::trust_region<entropy_and_ratio_gate>);

/// Trusted iff R >= the median of R over the batch's student tokens (a batch decision made
/// once in `prepare`, read per token from ctx.threshold).
struct ratio_above_batch_median {
  static constexpr bool needs_student_entropy = false, needs_teacher_entropy = false;
  tropd::status check() const noexcept { return {}; }
  tropd::status prepare(const tropd::regions::batch_tokens& b, tropd::regions::batch_context& ctx,
                        tropd::regions::batch_storage&) const {
    std::vector<double> r(b.R, b.R + b.n);
    std::sort(r.begin(), r.end());
    ctx.threshold = r.empty() ? 0.0 : r[r.size() / 2];  // the upper median
    return {};
  }
  bool trusted(const tropd::token& tv, const tropd::regions::batch_context& ctx) const noexcept {
    return tv.R >= ctx.threshold;
  }
};
static_assert(tropd::regions::trust_region<ratio_above_batch_median>);

/// Outliers keep a damped reward A = alpha R; zero teacher mass (R = -inf) drops the token.
struct scaled_reward {
  static constexpr bool needs_topk = false;
  double alpha = 0.25;
  tropd::status check() const noexcept { return {}; }
  tropd::outliers::outlier_value operator()(const tropd::token& tk, const tropd::topk_row&, double*) const noexcept {
    tropd::outliers::outlier_value v;
    if (!(tk.R > -std::numeric_limits<double>::infinity())) {
      v.kept = false;
      return v;
    }
    v.advantage = alpha * tk.R;
    return v;
  }
};
static_assert(tropd::outliers::outlier_handler<scaled_reward>);

/// Soft advantage clip A' = c tanh(A / c); L = -rho A', dL/ds = -rho A' (rho = e^{s - s_old}).
/// Flags the advantage as clipped where |A| > c.
struct tanh_advantage {
  double c = 1.0;
  tropd::status check() const noexcept {
    if (!(c > 0) || !std::isfinite(c)) return tropd::make_error(tropd::errc::invalid_parameter, "tanh_advantage: c must be finite and > 0");
    return {};
  }
  tropd::clippers::clipped_term operator()(double a, double s, double s_old) const noexcept {
    const double A = c * std::tanh(a / c);
    const double rho = std::exp(s - s_old);
    return tropd::clippers::clipped_term{A, -rho * A, -rho * A, std::fabs(a) > c, false};
  }
};
static_assert(tropd::clippers::clipper<tanh_advantage>);

using gated = tropd::objective<entropy_and_ratio_gate, tropd::estimators::k1_reward, tropd::outliers::drop, tanh_advantage>;
using median_scaled = tropd::objective<ratio_above_batch_median, tropd::estimators::k1_reward, scaled_reward, tanh_advantage>;

// ---------------------------------------------------------------------------
// A small token batch.
// ---------------------------------------------------------------------------

struct batch {
  std::vector<float> s, s_old, t, hs;
  std::vector<tropd::origin> from;
  std::vector<index_t> off;
  bool with_entropy = true;
  index_t n() const { return static_cast<index_t>(s.size()); }
  tropd::token_batch view() const {
    tropd::token_batch b;
    b.s = tropd::view_of(s);
    b.s_old = tropd::view_of(s_old);
    b.t = tropd::view_of(t);
    b.from = tropd::view_of(from);
    b.seq_offsets = tropd::view_of(off);
    if (with_entropy) b.student_entropy = tropd::view_of(hs);
    return b;
  }
};

batch random_batch(std::mt19937_64& rng, int n_seq, double p_neg_inf) {
  std::uniform_real_distribution<double> U(0, 1);
  std::normal_distribution<double> N(0, 1);
  batch b;
  for (int j = 0; j < n_seq; ++j) {
    b.off.push_back(b.n());
    const int len = 3 + static_cast<int>(U(rng) * 6);
    for (int i = 0; i < len; ++i) {
      const tropd::origin o = i == 0 ? tropd::origin::prompt : (i == 1 ? tropd::origin::teacher : tropd::origin::student);
      const float so = static_cast<float>(-0.05 - 4 * U(rng));
      b.s_old.push_back(so);
      b.s.push_back(std::min(-1e-3f, static_cast<float>(so + 0.2 * N(rng))));
      b.t.push_back(o == tropd::origin::student && U(rng) < p_neg_inf ? -finf : std::min(0.0f, static_cast<float>(so - 0.5 + 1.5 * N(rng))));
      b.hs.push_back(static_cast<float>(4 * U(rng)));
      b.from.push_back(o);
    }
  }
  b.off.push_back(b.n());
  return b;
}

struct outputs {
  tropd::status st;
  double loss = 0;
  tropd::diagnostics d;
  std::vector<float> dlds, adv;
  std::vector<uint8_t> flags;
};

template <class Obj>
outputs run(const Obj& o, const batch& b, const tropd::host::eval_options& opt = {}) {
  outputs r;
  r.dlds.assign(static_cast<size_t>(b.n()), 777.f);
  r.adv.assign(static_cast<size_t>(b.n()), 777.f);
  r.flags.assign(static_cast<size_t>(b.n()), 0xff);
  tropd::token_outputs out;
  out.dloss_ds = tropd::view_of(r.dlds);
  out.advantage = tropd::view_of(r.adv);
  out.flags = tropd::view_of(r.flags);
  out.loss = &r.loss;
  out.diag = &r.d;
  r.st = tropd::host::evaluate_tokens(o, b.view(), out, opt);
  return r;
}

/// Expected per-token values of a PG objective with a tanh clip, computed from definitions.
struct expected_token {
  bool counted = false, kept = false, trusted = false, adv_clipped = false;
  ld loss = 0, dlds = 0, adv = 0;
};

expected_token tanh_pg(ld A, ld s, ld s_old, ld c) {
  expected_token e;
  e.adv = c * std::tanh(A / c);
  e.loss = -std::exp(s - s_old) * e.adv;
  e.dlds = e.loss;
  e.adv_clipped = std::fabs(A) > c;
  e.counted = e.kept = true;
  return e;
}

void compare(const outputs& got, const std::vector<expected_token>& want) {
  REQUIRE_MESSAGE(got.st.ok(), got.st.message());
  ld n_counted = 0, sum = 0;
  for (const auto& e : want) {
    n_counted += e.counted;
    sum += e.loss;
  }
  const ld w = 1 / n_counted;  // token_mean
  CHECK(std::fabs(got.loss - w * sum) <= 1e-12L * std::max<ld>(1, std::fabs(w * sum)));
  for (size_t i = 0; i < want.size(); ++i) {
    CAPTURE(i);
    const expected_token& e = want[i];
    CHECK(std::fabs(got.dlds[i] - (e.counted ? w : 0) * e.dlds) <= 1e-6L * std::fabs(w * e.dlds) + 1e-12L);
    CHECK(std::fabs(got.adv[i] - e.adv) <= 1e-6L * std::fabs(e.adv) + 1e-12L);
    CHECK(((got.flags[i] & tropd::flags::counted) != 0) == e.counted);
    CHECK(((got.flags[i] & tropd::flags::kept) != 0) == e.kept);
    CHECK(((got.flags[i] & tropd::flags::adv_clipped) != 0) == e.adv_clipped);
  }
}

}  // namespace

TEST_CASE("objective custom: a user region and a user clipper, composed without library changes") {
  std::mt19937_64 rng(301);
  for (double c : {0.5, 1.0, 3.0}) {
    CAPTURE(c);
    gated o;
    o.region.max_entropy = 2.0;
    o.region.tau = -1.5;
    o.clip.c = c;
    o.guidance_beta = 0.1;
    const batch b = random_batch(rng, 6, 0.1);
    const outputs got = run(o, b);
    std::vector<expected_token> want(static_cast<size_t>(b.n()));
    int n_student = 0, n_trusted = 0;
    for (index_t i = 0; i < b.n(); ++i) {
      expected_token& e = want[static_cast<size_t>(i)];
      if (b.from[static_cast<size_t>(i)] == tropd::origin::prompt) continue;
      const ld s = b.s[static_cast<size_t>(i)], so = b.s_old[static_cast<size_t>(i)], t = b.t[static_cast<size_t>(i)];
      if (b.from[static_cast<size_t>(i)] == tropd::origin::teacher) {  // guidance: -beta s (SFT form)
        e.counted = e.kept = true;
        e.loss = -0.1L * s;
        e.dlds = -0.1L;
        continue;
      }
      ++n_student;
      const ld R = t - so;
      const bool in = b.hs[static_cast<size_t>(i)] <= 2.0f && R > -1.5L;
      n_trusted += in;
      if (in) {
        e = tanh_pg(R, s, so, c);
        e.trusted = true;
      } else {
        e.counted = true;  // dropped: counted by token_mean, no term
      }
      CHECK(((got.flags[static_cast<size_t>(i)] & tropd::flags::trusted) != 0) == in);
    }
    compare(got, want);
    CHECK(got.d.n_trusted == n_trusted);
    CHECK(got.d.trust_fraction == doctest::Approx(double(n_trusted) / n_student));
    CHECK(n_trusted > 0);
    CHECK(n_trusted < n_student);
  }
}

TEST_CASE("objective custom: a region's needs_student_entropy is enforced, and a policy's check() is called") {
  std::mt19937_64 rng(302);
  batch b = random_batch(rng, 3, 0.0);
  b.with_entropy = false;
  const outputs missing = run(gated{}, b);
  CHECK(missing.st.code == tropd::errc::unsupported);
  CHECK(missing.dlds[0] == 777.f);
  b.with_entropy = true;
  gated bad;
  bad.clip.c = -1;
  CHECK(run(bad, b).st.code == tropd::errc::invalid_parameter);
  gated bad_region;
  bad_region.region.max_entropy = -1;
  CHECK(run(bad_region, b).st.code == tropd::errc::invalid_parameter);
  CHECK(run(gated{}, b).st.ok());
}

TEST_CASE("objective custom: a region with a batch-level prepare step and a user outlier handler") {
  std::mt19937_64 rng(303);
  for (int rep = 0; rep < 4; ++rep) {
    median_scaled o;
    o.outlier.alpha = 0.25;
    o.clip.c = 2.0;
    const batch b = random_batch(rng, 5, 0.15);
    const outputs got = run(o, b);
    // The upper median of R over student tokens (-inf included, it sorts first).
    std::vector<ld> Rs;
    for (index_t i = 0; i < b.n(); ++i)
      if (b.from[static_cast<size_t>(i)] == tropd::origin::student)
        Rs.push_back(ld(b.t[static_cast<size_t>(i)]) - ld(b.s_old[static_cast<size_t>(i)]));
    std::vector<ld> sorted = Rs;
    std::sort(sorted.begin(), sorted.end());
    const ld med = sorted[sorted.size() / 2];
    std::vector<expected_token> want(static_cast<size_t>(b.n()));
    int k = 0;
    for (index_t i = 0; i < b.n(); ++i) {
      if (b.from[static_cast<size_t>(i)] != tropd::origin::student) continue;  // no guidance: nothing
      const ld R = Rs[static_cast<size_t>(k++)];
      const ld s = b.s[static_cast<size_t>(i)], so = b.s_old[static_cast<size_t>(i)];
      expected_token& e = want[static_cast<size_t>(i)];
      if (R >= med) {
        e = tanh_pg(R, s, so, 2.0L);
      } else if (R == -std::numeric_limits<ld>::infinity()) {
        e.counted = true;  // dropped by the handler
      } else {
        e = tanh_pg(0.25L * R, s, so, 2.0L);
      }
      CHECK(((got.flags[static_cast<size_t>(i)] & tropd::flags::trusted) != 0) == (R >= med));
    }
    compare(got, want);
  }
}

TEST_CASE("objective custom: direct-loss trust estimators (k2 / k3 as losses) and the proximal reward") {
  std::mt19937_64 rng(304);
  const batch b = random_batch(rng, 5, 0.0);
  using k2_loss = tropd::estimators::sampled_term<tropd::estimators::k2, tropd::estimators::as_loss>;
  using k3_loss = tropd::estimators::sampled_term<tropd::estimators::k3, tropd::estimators::as_loss>;
  tropd::objective<tropd::regions::all_trusted, k2_loss, tropd::outliers::drop, tropd::clippers::no_clip> o2;
  tropd::objective<tropd::regions::all_trusted, k3_loss, tropd::outliers::drop, tropd::clippers::no_clip> o3;
  tropd::objective<tropd::regions::all_trusted, tropd::estimators::proximal_reward, tropd::outliers::drop, tropd::clippers::no_clip> op;
  op.trust.alpha = 0.5;
  op.trust.scale = 0.5;  // the JSD arm's sampled term (method.md 5): (1 - beta) log(beta e^R + 1 - beta)
  const outputs g2 = run(o2, b), g3 = run(o3, b), gp = run(op, b);
  std::vector<expected_token> w2(static_cast<size_t>(b.n())), w3 = w2, wp = w2;
  for (index_t i = 0; i < b.n(); ++i) {
    if (b.from[static_cast<size_t>(i)] != tropd::origin::student) continue;
    const ld s = b.s[static_cast<size_t>(i)], so = b.s_old[static_cast<size_t>(i)], t = b.t[static_cast<size_t>(i)];
    auto& e2 = w2[static_cast<size_t>(i)];
    auto& e3 = w3[static_cast<size_t>(i)];
    e2.counted = e2.kept = e3.counted = e3.kept = true;
    // k2 = 0.5 (s - t)^2, dk2/ds = s - t; k3 = e^{t-s} - 1 - (t - s), dk3/ds = 1 - e^{t-s}.
    e2.loss = 0.5L * (s - t) * (s - t);
    e2.dlds = s - t;
    e2.adv = -e2.loss;
    e3.loss = std::expm1(t - s) - (t - s);
    e3.dlds = -std::expm1(t - s);
    e3.adv = -e3.loss;
    // Proximal reward: A = 0.5 log(0.5 e^R + 0.5) >= 0.5 log 0.5, L = -rho A.
    const ld A = 0.5L * std::log(0.5L * std::exp(t - so) + 0.5L);
    CHECK(A >= 0.5L * std::log(0.5L) - 1e-15L);
    wp[static_cast<size_t>(i)] = tanh_pg(0, s, so, 1);  // counted and kept
    wp[static_cast<size_t>(i)].adv = A;
    wp[static_cast<size_t>(i)].loss = -std::exp(s - so) * A;
    wp[static_cast<size_t>(i)].dlds = -std::exp(s - so) * A;
  }
  compare(g2, w2);
  compare(g3, w3);
  compare(gp, wp);
}

TEST_CASE("objective custom: the custom gate at row level, gradient = w dL/ds (e_y - p)") {
  std::mt19937_64 rng(305);
  std::normal_distribution<double> N(0, 1);
  const index_t n = 10, V = 24;
  std::vector<double> z(static_cast<size_t>(n * V)), u(static_cast<size_t>(n * V));
  for (auto& x : z) x = 1.5 * N(rng);
  for (size_t i = 0; i < u.size(); ++i) u[i] = 0.5 * z[i] + N(rng);
  std::vector<int32_t> y(static_cast<size_t>(n));
  for (auto& x : y) x = static_cast<int32_t>(rng() % V);
  std::vector<tropd::origin> from(static_cast<size_t>(n), tropd::origin::student);
  from[0] = tropd::origin::prompt;
  from[5] = tropd::origin::prompt;
  std::vector<index_t> off = {0, 5, 10};
  tropd::host::row_inputs tok;
  tok.ids = tropd::view_of(y);
  tok.from = tropd::view_of(from);
  tok.seq_offsets = tropd::view_of(off);
  gated o;
  o.region.max_entropy = 2.6;
  o.region.tau = -1.0;
  o.clip.c = 0.7;
  std::vector<double> grad(static_cast<size_t>(n * V));
  std::vector<uint8_t> fl(static_cast<size_t>(n));
  tropd::token_outputs tout;
  tout.flags = tropd::view_of(fl);
  double loss = 0;
  const tropd::status st = tropd::host::evaluate_rows(
      o, tropd::make_matrix<const double>(z.data(), n, V), tropd::make_matrix<const double>(u.data(), n, V), tok,
      tropd::host::row_outputs<double>{.grad = tropd::make_matrix(grad.data(), n, V), .loss = &loss, .flags = tout.flags});
  REQUIRE_MESSAGE(st.ok(), st.message());
  ld want_loss = 0;
  const ld w = 1.0L / 8;  // 8 student rows, token_mean
  int trusted = 0;
  for (index_t r = 0; r < n; ++r) {
    CAPTURE(r);
    const vec zr(z.begin() + r * V, z.begin() + (r + 1) * V), ur(u.begin() + r * V, u.begin() + (r + 1) * V);
    const vec ls = naive::log_softmax(zr), lt = naive::log_softmax(ur), p = naive::probs(ls);
    ld dlds = 0;
    if (from[static_cast<size_t>(r)] == tropd::origin::student) {
      const ld R = lt[static_cast<size_t>(y[static_cast<size_t>(r)])] - ls[static_cast<size_t>(y[static_cast<size_t>(r)])];
      const bool in = naive::entropy(ls) <= 2.6L && R > -1.0L;
      CHECK(((fl[static_cast<size_t>(r)] & tropd::flags::trusted) != 0) == in);
      if (in) {
        ++trusted;
        const expected_token e = tanh_pg(R, 0, 0, 0.7L);  // rho = 1 (s_old = s)
        want_loss += w * e.loss;
        dlds = e.dlds;
      }
    }
    ld err = 0, scale = 1e-12L;
    for (index_t v = 0; v < V; ++v) {
      const ld g = w * dlds * ((v == y[static_cast<size_t>(r)] ? 1 : 0) - p[static_cast<size_t>(v)]);
      err = std::max(err, std::fabs(grad[static_cast<size_t>(r * V + v)] - g));
      scale = std::max(scale, std::fabs(g));
    }
    CHECK(err <= 1e-5L * scale);
  }
  CHECK(std::fabs(loss - want_loss) <= 1e-6L);
  CHECK(trusted > 0);
  CHECK(trusted < 8);
}
