// Monte Carlo checks of TrOPD's adaptive trust region (method.md 4.2-4.3) through the
// library's own stochastic region (regions::stochastic_acceptance, via host::decide and
// host::evaluate_tokens), and the reproducibility of its decisions.
//
// Setting: one position with a fixed small-vocabulary student p and teacher q (q has a zero
// entry, so R = -inf happens). The test draws y ~ p itself (std::mt19937_64); the library
// draws M from Philox keyed by (seed, step, sequence, position). Every sample is one
// student token with s = s_old = log p_y (rho = 1) and t = log q_y. Per-sample logit
// gradients are formed from the library's dL/ds and dL/d log p_S(top-k) by the chain rule
// dL/dz = g_y (e_y - p) + sum_k g_k (e_k - p), with aggregation weight 1 (sum_over_constant,
// C = 1), and averaged. Tolerance: 5 standard errors of the mean, from the sample variance.
//
// Signs. The library minimises the loss L. For a trusted token L = -rho R with R = t - s_old
// (detached), so dL/dz = -M R (e_y - p). Over y ~ p and M ~ Bernoulli(min(1, q_y / p_y)):
//   E[dL/dz] = sum_y min(p_y, q_y) (log p_y - log q_y) (e_y - p) = w - p sum_v w_v,
//   w_v = min(p_v, q_v) log(p_v / q_v)   (0 where q_v = 0),
// i.e. method.md 4.2's "expected trust-part gradient" is the gradient of the loss (the
// maximised J's gradient is its negative). Likewise for the outlier parts (loss gradients):
//   form P (loss FKL_k on outliers):   E = E[1 - M] dFKL_k/dz = TV (S_K p - qk)   (raw tail)
//   form C (A = -FKL_k, L = -rho A):   E = FKL_k sum_y max(p_y - q_y, 0) (e_y - p) = FKL_k (u - p TV)
// with u_v = max(p_v - q_v, 0), sum_v u_v = TV. Both hold for any teacher support K (the
// whole vocabulary or a top-k subset): FKL_k and dFKL_k/dz do not depend on y, and
// E[1 - M] = sum_y p_y (1 - min(1, q_y / p_y)) = sum_y max(p_y - q_y, 0) = TV.
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

#include "reference/helpers.hpp"
#include "reference/naive.hpp"
#include "reference/naive_objective.hpp"

namespace naive = tropd_test::naive;
namespace no = tropd_test::naive_obj;
using tropd_test::naive::ld;
using tropd_test::naive::vec;
using tropd::index_t;

namespace {

constexpr float finf = std::numeric_limits<float>::infinity();

/// A trust estimator with no term (so only the outlier part of an objective remains).
struct no_trust_term {
  static constexpr bool needs_rkl = false, needs_ref = false;
  tropd::status check() const noexcept { return {}; }
  tropd::estimators::trust_value operator()(const tropd::token&) const noexcept {
    return tropd::estimators::trust_value{false, 0, 0, 0};
  }
};
static_assert(tropd::estimators::trust_estimator<no_trust_term>);

using region = tropd::regions::stochastic_acceptance;
using trust_only_t = tropd::objective<region, tropd::estimators::k1_reward, tropd::outliers::drop, tropd::clippers::no_clip>;

/// The trust part alone, every token with weight 1.
trust_only_t trust_only() {
  trust_only_t o;
  o.agg.how = tropd::aggregation::mode::sum_over_constant;
  o.agg.constant = 1;
  return o;
}
using fkl_only = tropd::objective<region, no_trust_term, tropd::outliers::topk_fkl, tropd::clippers::no_clip>;

// The fixed pair (V = 6). q_3 = 0: R = -inf whenever y = 3.
const vec P = {0.35L, 0.25L, 0.15L, 0.12L, 0.08L, 0.05L};
const vec Q = {0.10L, 0.30L, 0.25L, 0.00L, 0.05L, 0.30L};

ld tv(const vec& p, const vec& q) {
  ld s = 0;
  for (size_t v = 0; v < p.size(); ++v) s += std::fabs(p[v] - q[v]);
  return s / 2;
}

/// FKL_k of a teacher support `ids` (raw q or renormalised), student p.
ld fkl_k(const vec& p, const vec& q, const std::vector<int>& ids, bool renorm) {
  ld sk = 0, f = 0;
  for (int i : ids) sk += q[static_cast<size_t>(i)];
  for (int i : ids) {
    const ld qi = q[static_cast<size_t>(i)];
    if (qi == 0) continue;
    const ld qk = renorm ? qi / sk : qi;
    f += qk * (std::log(qk) - std::log(p[static_cast<size_t>(i)]));
  }
  return f;
}

/// The samples of one Monte Carlo run.
struct mc_result {
  vec mean, se;           ///< per-component mean and standard error of the per-sample dL/dz
  ld miss = 0, miss_se = 0;  ///< mean and s.e. of 1 - M
  ld tv_est = 0;          ///< mean of the library's tv_estimate over the chunks (equal sizes)
  long long n = 0;
};

/// Runs `o` on `chunks` batches of `per_chunk` tokens each, chunk c keyed by
/// (seed0 + c, step 3 c + 1); sequences of 64 tokens with seq ids c * 1e6 + j. The teacher
/// top-k list of every token is `ids` (log q, -inf where q = 0), the student's log p there.
template <class Obj>
mc_result run_mc(const Obj& o, const std::vector<int>& ids, int chunks, int per_chunk, uint64_t seed0, uint64_t y_seed) {
  const size_t V = P.size();
  const index_t K = static_cast<index_t>(ids.size());
  std::mt19937_64 rng(y_seed);
  std::discrete_distribution<int> draw(P.begin(), P.end());
  std::vector<float> lp(V), lq(V);
  for (size_t v = 0; v < V; ++v) {
    lp[v] = static_cast<float>(std::log(P[v]));
    lq[v] = Q[v] == 0 ? -finf : static_cast<float>(std::log(Q[v]));
  }
  vec sum(V, 0), sum2(V, 0);
  ld miss = 0, miss2 = 0, tv_sum = 0;
  const index_t n = per_chunk;
  for (int c = 0; c < chunks; ++c) {
    std::vector<float> s(static_cast<size_t>(n)), t(static_cast<size_t>(n));
    std::vector<int> y(static_cast<size_t>(n));
    std::vector<tropd::origin> from(static_cast<size_t>(n), tropd::origin::student);
    std::vector<index_t> off;
    std::vector<uint64_t> seq_ids;
    for (index_t i = 0; i < n; i += 64) {
      off.push_back(i);
      seq_ids.push_back(static_cast<uint64_t>(c) * 1000000u + static_cast<uint64_t>(i / 64));
    }
    off.push_back(n);
    std::vector<int32_t> kid(static_cast<size_t>(n * K));
    std::vector<float> kq(static_cast<size_t>(n * K)), ks(static_cast<size_t>(n * K));
    for (index_t i = 0; i < n; ++i) {
      const int yi = draw(rng);
      y[static_cast<size_t>(i)] = yi;
      s[static_cast<size_t>(i)] = lp[static_cast<size_t>(yi)];
      t[static_cast<size_t>(i)] = lq[static_cast<size_t>(yi)];
      for (index_t k = 0; k < K; ++k) {
        const size_t id = static_cast<size_t>(ids[static_cast<size_t>(k)]);
        kid[static_cast<size_t>(i * K + k)] = static_cast<int32_t>(id);
        kq[static_cast<size_t>(i * K + k)] = lq[id];
        ks[static_cast<size_t>(i * K + k)] = lp[id];
      }
    }
    tropd::token_batch b;
    b.s = tropd::view_of(s);
    b.t = tropd::view_of(t);
    b.from = tropd::view_of(from);
    b.seq_offsets = tropd::view_of(off);
    b.seq_ids = tropd::view_of(seq_ids);
    if (K > 0) {
      b.topk_ids = tropd::make_matrix<const int32_t>(kid.data(), n, K);
      b.topk_teacher = tropd::make_matrix<const float>(kq.data(), n, K);
      b.topk_student = tropd::make_matrix<const float>(ks.data(), n, K);
    }
    std::vector<float> dlds(static_cast<size_t>(n)), dtopk(static_cast<size_t>(n * std::max<index_t>(K, 1)));
    std::vector<uint8_t> flags(static_cast<size_t>(n));
    tropd::token_outputs out;
    out.dloss_ds = tropd::view_of(dlds);
    if (K > 0) out.dloss_dtopk = tropd::make_matrix(dtopk.data(), n, K);
    out.flags = tropd::view_of(flags);
    tropd::host::eval_options opt;
    opt.seed = seed0 + static_cast<uint64_t>(c);
    opt.step = 3 * static_cast<uint64_t>(c) + 1;
    double loss = 0;
    tropd::diagnostics d;
    out.loss = &loss;
    out.diag = &d;
    const tropd::status st = tropd::host::evaluate_tokens(tropd_test::with_k(o, K), b, out, opt);
    REQUIRE_MESSAGE(st.ok(), st.message());
    tv_sum += d.tv_estimate;
    vec g(V);
    for (index_t i = 0; i < n; ++i) {
      const bool outlier = (flags[static_cast<size_t>(i)] & tropd::flags::outlier) != 0;
      miss += outlier;
      miss2 += outlier;
      ld total = dlds[static_cast<size_t>(i)];
      for (index_t k = 0; k < K; ++k) total += dtopk[static_cast<size_t>(i * K + k)];
      for (size_t v = 0; v < V; ++v) g[v] = -total * P[v];
      g[static_cast<size_t>(y[static_cast<size_t>(i)])] += dlds[static_cast<size_t>(i)];
      for (index_t k = 0; k < K; ++k) g[static_cast<size_t>(ids[static_cast<size_t>(k)])] += dtopk[static_cast<size_t>(i * K + k)];
      for (size_t v = 0; v < V; ++v) {
        sum[v] += g[v];
        sum2[v] += g[v] * g[v];
      }
    }
  }
  mc_result r;
  r.n = static_cast<long long>(chunks) * per_chunk;
  const ld N = static_cast<ld>(r.n);
  r.mean.resize(V);
  r.se.resize(V);
  for (size_t v = 0; v < V; ++v) {
    r.mean[v] = sum[v] / N;
    const ld var = std::max<ld>(0, (sum2[v] / N - r.mean[v] * r.mean[v]) * N / (N - 1));
    r.se[v] = std::sqrt(var / N);
  }
  r.miss = miss / N;
  r.miss_se = std::sqrt(std::max<ld>(0, (miss2 / N - r.miss * r.miss)) / (N - 1));
  r.tv_est = tv_sum / chunks;
  return r;
}

/// |mean - expected| <= 5 s.e. per component (plus a rounding floor), and the test has
/// power: the s.e. is small against the scale of the expected vector.
void check_expectation(const mc_result& r, const vec& expected) {
  ld scale = 0;
  for (ld e : expected) scale = std::max(scale, std::fabs(e));
  for (size_t v = 0; v < expected.size(); ++v) {
    CAPTURE(v);
    CAPTURE(r.mean[v]);
    CAPTURE(expected[v]);
    CAPTURE(r.se[v]);
    CHECK(std::fabs(r.mean[v] - expected[v]) <= 5 * r.se[v] + 1e-6L * scale);
    CHECK(r.se[v] <= 0.05L * scale);
  }
}

constexpr int chunks = 8, per_chunk = 20000;

}  // namespace

TEST_CASE("objective stochastic: E[1 - M] = TV(p, q), and the tv_estimate diagnostic is unbiased") {
  const mc_result r = run_mc(trust_only(), {}, chunks, per_chunk, 1000, 1);
  const ld want = tv(P, Q);  // 0.4
  CAPTURE(r.miss);
  CAPTURE(r.miss_se);
  CHECK(std::fabs(r.miss - want) <= 5 * r.miss_se);
  CHECK(r.miss_se < 0.01L);
  // tv_estimate = mean of 1 - min(1, e^R): per token sum_y p_y (1 - min(1, q_y/p_y)) = TV in
  // expectation; its s.e. is at most that of 1 - M (values in [0, 1] with a smaller variance).
  CHECK(std::fabs(r.tv_est - want) <= 5 * r.miss_se);
}

TEST_CASE("objective stochastic: expected trust-part gradient is w - p sum(w), w = min(p, q) log(p / q)") {
  const mc_result r = run_mc(trust_only(), {}, chunks, per_chunk, 2000, 2);
  const size_t V = P.size();
  vec w(V, 0);
  ld sw = 0;
  for (size_t v = 0; v < V; ++v) {
    w[v] = Q[v] == 0 ? 0 : std::min(P[v], Q[v]) * std::log(P[v] / Q[v]);
    sw += w[v];
  }
  vec expected(V);
  for (size_t v = 0; v < V; ++v) expected[v] = w[v] - P[v] * sw;
  check_expectation(r, expected);
  // method.md 4.2: each entry is bounded by max(p_v, q_v) / e; OPD's p_v log(p_v / q_v) is not.
  for (size_t v = 0; v < V; ++v)
    if (Q[v] > 0) CHECK(std::fabs(w[v]) <= std::max(P[v], Q[v]) / std::exp(ld(1)));
}

TEST_CASE("objective stochastic: form P expected gradient TV (S_K p - qk), whole vocabulary and a top-3 subset") {
  const size_t V = P.size();
  const std::vector<int> all = {0, 1, 2, 3, 4, 5}, top3 = {1, 5, 2};  // q's three largest
  for (const auto* ids : {&all, &top3}) {
    for (bool renorm : {false, true}) {
      CAPTURE(ids->size());
      CAPTURE(renorm);
      fkl_only o;
      o.outlier.fkl = tropd::estimators::topk_forward_kl{64, renorm ? tropd::estimators::topk_tail::renormalised
                                                                    : tropd::estimators::topk_tail::raw};
      o.outlier.form = tropd::outliers::fkl_form::p;
      o.agg.how = tropd::aggregation::mode::sum_over_constant;
      o.agg.constant = 1;
      const mc_result r = run_mc(o, *ids, chunks, per_chunk, 3000, 3);
      ld sk = 0;
      vec qk(V, 0);
      for (int i : *ids) sk += Q[static_cast<size_t>(i)];
      for (int i : *ids) qk[static_cast<size_t>(i)] = renorm ? Q[static_cast<size_t>(i)] / sk : Q[static_cast<size_t>(i)];
      const ld mass = renorm ? 1 : sk;  // the renormalised list has S_K = 1
      vec expected(V);
      for (size_t v = 0; v < V; ++v) expected[v] = tv(P, Q) * (mass * P[v] - qk[v]);
      check_expectation(r, expected);
    }
  }
}

TEST_CASE("objective stochastic: form C expected gradient FKL_k (u - p TV), whole vocabulary and a top-3 subset") {
  const size_t V = P.size();
  const std::vector<int> all = {0, 1, 2, 3, 4, 5}, top3 = {1, 5, 2};
  for (const auto* ids : {&all, &top3}) {
    for (bool renorm : {false, true}) {
      CAPTURE(ids->size());
      CAPTURE(renorm);
      fkl_only o;
      o.outlier.fkl = tropd::estimators::topk_forward_kl{64, renorm ? tropd::estimators::topk_tail::renormalised
                                                                    : tropd::estimators::topk_tail::raw};
      o.outlier.form = tropd::outliers::fkl_form::c;
      o.agg.how = tropd::aggregation::mode::sum_over_constant;
      o.agg.constant = 1;
      const mc_result r = run_mc(o, *ids, chunks, per_chunk, 4000, 4);
      const ld F = fkl_k(P, Q, *ids, renorm), T = tv(P, Q);
      vec expected(V);
      for (size_t v = 0; v < V; ++v) expected[v] = F * (std::max<ld>(P[v] - Q[v], 0) - P[v] * T);
      check_expectation(r, expected);
    }
  }
}

TEST_CASE("objective stochastic: the tropd preset's expected gradient is the sum of both parts") {
  // tropd(): stochastic region, A = R inside, form C renormalised top-k outside (no guidance
  // tokens here). Teacher list: q's top 3.
  const size_t V = P.size();
  const std::vector<int> top3 = {1, 5, 2};
  auto o = tropd::presets::tropd();
  o.agg.how = tropd::aggregation::mode::sum_over_constant;
  o.agg.constant = 1;
  const mc_result r = run_mc(o, top3, chunks, per_chunk, 5000, 5);
  const ld F = fkl_k(P, Q, top3, true), T = tv(P, Q);
  vec w(V, 0);
  ld sw = 0;
  for (size_t v = 0; v < V; ++v) {
    w[v] = Q[v] == 0 ? 0 : std::min(P[v], Q[v]) * std::log(P[v] / Q[v]);
    sw += w[v];
  }
  vec expected(V);
  for (size_t v = 0; v < V; ++v) expected[v] = (w[v] - P[v] * sw) + F * (std::max<ld>(P[v] - Q[v], 0) - P[v] * T);
  check_expectation(r, expected);
}

// ---------------------------------------------------------------------------
// The decisions themselves.
// ---------------------------------------------------------------------------

namespace {

/// n student tokens in sequences of `per_seq`, all with log-ratio R (s_old = -1, t = -1 + R).
struct flat_batch {
  std::vector<float> s, t;
  std::vector<tropd::origin> from;
  std::vector<index_t> off;
  std::vector<uint64_t> seq_ids;
  tropd::token_batch view() const {
    tropd::token_batch b;
    b.s = tropd::view_of(s);
    b.t = tropd::view_of(t);
    b.from = tropd::view_of(from);
    b.seq_offsets = tropd::view_of(off);
    if (!seq_ids.empty()) b.seq_ids = tropd::view_of(seq_ids);
    return b;
  }
};

flat_batch make_flat(const std::vector<float>& R, index_t per_seq, uint64_t first_id = 0) {
  flat_batch f;
  const index_t n = static_cast<index_t>(R.size());
  for (index_t i = 0; i < n; ++i) {
    f.s.push_back(-1.0f);
    f.t.push_back(R[static_cast<size_t>(i)] == -finf ? -finf : -1.0f + R[static_cast<size_t>(i)]);
    f.from.push_back(tropd::origin::student);
    if (i % per_seq == 0) {
      f.off.push_back(i);
      f.seq_ids.push_back(first_id + static_cast<uint64_t>(i / per_seq));
    }
  }
  f.off.push_back(n);
  return f;
}

std::vector<uint8_t> decisions(const flat_batch& f, uint64_t seed, uint64_t step) {
  std::vector<uint8_t> m;
  tropd::host::eval_options opt;
  opt.seed = seed;
  opt.step = step;
  const tropd::status st = tropd::host::decide(tropd::presets::tropd(), f.view(), opt, m);
  REQUIRE_MESSAGE(st.ok(), st.message());
  return m;
}

}  // namespace

TEST_CASE("objective stochastic: acceptance probability is min(1, e^R) for fixed R") {
  const int n = 40000;
  for (double ratio : {0.9, 0.5, 0.3, 0.05, 0.001}) {
    CAPTURE(ratio);
    const float R = static_cast<float>(std::log(ratio));
    const flat_batch f = make_flat(std::vector<float>(n, R), 100);
    const auto m = decisions(f, 42, 7);
    ld acc = 0;
    for (uint8_t x : m) acc += x;
    const ld rate = acc / n, pr = std::exp(ld(-1.0f + R) - ld(-1.0f));
    const ld se = std::sqrt(pr * (1 - pr) / n);
    CAPTURE(rate);
    CHECK(std::fabs(rate - pr) <= 5 * se + 1e-12L);
  }
}

TEST_CASE("objective stochastic: R >= 0 is always trusted, R = -inf never, for any key") {
  const int n = 20000;
  std::vector<float> R(n);
  for (int i = 0; i < n; ++i) R[static_cast<size_t>(i)] = (i % 3 == 0) ? 0.0f : (i % 3 == 1 ? 0.7f : -finf);
  const flat_batch f = make_flat(R, 50);
  for (uint64_t seed : {0ull, 1ull, 0xffffffffffffffffull}) {
    for (uint64_t step : {0ull, 5ull, (1ull << 40) + 3}) {
      const auto m = decisions(f, seed, step);
      int bad = 0;
      for (int i = 0; i < n; ++i) bad += (i % 3 == 2) ? (m[static_cast<size_t>(i)] != 0) : (m[static_cast<size_t>(i)] != 1);
      CHECK(bad == 0);
    }
  }
  // R = -inf goes to the outlier handler, never to the trust term (tropd: form C, no error).
  flat_batch g = make_flat({-finf, -finf}, 2);
  std::vector<int32_t> ids = {0, 1, 0, 1};
  std::vector<float> lq = {-0.5f, -1.0f, -0.5f, -1.0f}, ls = {-1.0f, -2.0f, -1.0f, -2.0f};
  tropd::token_batch b = g.view();
  b.topk_ids = tropd::make_matrix<const int32_t>(ids.data(), 2, 2);
  b.topk_teacher = tropd::make_matrix<const float>(lq.data(), 2, 2);
  b.topk_student = tropd::make_matrix<const float>(ls.data(), 2, 2);
  std::vector<uint8_t> fl(2);
  tropd::token_outputs out;
  out.flags = tropd::view_of(fl);
  double loss = 0;
  out.loss = &loss;
  REQUIRE(tropd::host::evaluate_tokens(tropd::presets::tropd({.k = 2}), b, out).ok());
  CHECK((fl[0] & tropd::flags::outlier) != 0);
  CHECK((fl[1] & tropd::flags::outlier) != 0);
  CHECK(std::isfinite(loss));
}

TEST_CASE("objective stochastic: decisions are reproducible and keyed by (seed, step, sequence id, position)") {
  const int n = 4000;
  std::vector<float> R(n);
  for (int i = 0; i < n; ++i) R[static_cast<size_t>(i)] = static_cast<float>(std::log(0.5));
  const flat_batch f = make_flat(R, 40, 10);
  const auto a = decisions(f, 9, 3), b = decisions(f, 9, 3);
  CHECK(a == b);
  auto count_diff = [](const std::vector<uint8_t>& x, const std::vector<uint8_t>& y) {
    int d = 0;
    for (size_t i = 0; i < x.size(); ++i) d += x[i] != y[i];
    return d;
  };
  // With acceptance probability 1/2, two independent decision vectors differ on about half
  // of the tokens (binomial: n/2 +- sqrt(n)/2 = 2000 +- 32).
  CHECK(std::abs(count_diff(a, decisions(f, 10, 3)) - n / 2) < 5 * 32);
  CHECK(std::abs(count_diff(a, decisions(f, 9, 4)) - n / 2) < 5 * 32);
  CHECK(std::abs(count_diff(a, decisions(f, 9, 3 + (1ull << 33))) - n / 2) < 5 * 32);
  // Another sequence id numbering changes the decisions ...
  const flat_batch g = make_flat(R, 40, 11);
  CHECK(count_diff(a, decisions(g, 9, 3)) > n / 4);
  // ... while reordering the sequences inside the batch (same ids) only permutes them.
  flat_batch h = f;
  const size_t n_seq = f.seq_ids.size();
  std::reverse(h.seq_ids.begin(), h.seq_ids.end());
  const auto c = decisions(h, 9, 3);
  for (size_t j = 0; j < n_seq; ++j)
    for (index_t p = 0; p < 40; ++p)
      CHECK(c[static_cast<size_t>(static_cast<index_t>(j) * 40 + p)] ==
            a[static_cast<size_t>(static_cast<index_t>(n_seq - 1 - j) * 40 + p)]);
  // Without seq_ids the index in the batch is the sequence id.
  flat_batch k = make_flat(R, 40, 0);
  const auto with_ids = decisions(k, 9, 3);
  k.seq_ids.clear();
  CHECK(decisions(k, 9, 3) == with_ids);
}

TEST_CASE("objective stochastic: row level, 1 vs 2 threads give identical decisions and bit-identical gradients") {
  std::mt19937_64 rng(77);
  std::normal_distribution<double> N(0, 1);
  const index_t n = 48, V = 64, K = 8;
  std::vector<float> z(static_cast<size_t>(n * V)), u(static_cast<size_t>(n * V));
  for (auto& x : z) x = static_cast<float>(2 * N(rng));
  for (size_t i = 0; i < u.size(); ++i) u[i] = static_cast<float>(0.5 * z[i] + 1.5 * N(rng));
  std::vector<int32_t> y(static_cast<size_t>(n));
  std::vector<tropd::origin> from(static_cast<size_t>(n));
  std::vector<index_t> off;
  std::vector<uint64_t> seq_ids;
  for (index_t r = 0; r < n; ++r) {
    y[static_cast<size_t>(r)] = static_cast<int32_t>(rng() % V);
    from[static_cast<size_t>(r)] = r % 12 < 2 ? tropd::origin::prompt : (r % 12 < 4 ? tropd::origin::teacher : tropd::origin::student);
    if (r % 12 == 0) {
      off.push_back(r);
      seq_ids.push_back(static_cast<uint64_t>(r) * 13 + 1);
    }
  }
  off.push_back(n);
  tropd::host::row_inputs tok;
  tok.ids = tropd::view_of(y);
  tok.from = tropd::view_of(from);
  tok.seq_offsets = tropd::view_of(off);
  tok.seq_ids = tropd::view_of(seq_ids);
  struct res {
    std::vector<float> grad;
    std::vector<uint8_t> flags;
    double loss = 0;
  };
  auto run = [&](int threads, uint64_t seed) {
    res r;
    r.grad.assign(static_cast<size_t>(n * V), 0.f);
    r.flags.assign(static_cast<size_t>(n), 0);
    tropd::token_outputs tout;
    tout.flags = tropd::view_of(r.flags);
    const tropd::status st = tropd::host::evaluate_rows(
        tropd::presets::tropd({.beta = 0.01, .k = static_cast<int>(K)}), tropd::make_matrix<const float>(z.data(), n, V),
        tropd::make_matrix<const float>(u.data(), n, V), tok,
        tropd::host::row_outputs<>{.grad = tropd::make_matrix(r.grad.data(), n, V), .loss = &r.loss, .flags = tout.flags},
        {.seed = seed, .step = 11, .threads = threads});
    REQUIRE_MESSAGE(st.ok(), st.message());
    return r;
  };
  const res one = run(1, 5), two = run(2, 5), again = run(2, 5), other = run(1, 6);
  CHECK(one.flags == two.flags);
  CHECK(two.flags == again.flags);
  CHECK(std::memcmp(one.grad.data(), two.grad.data(), one.grad.size() * sizeof(float)) == 0);
  CHECK(one.loss == two.loss);
  CHECK(one.flags != other.flags);
  int trusted = 0, outl = 0;
  for (uint8_t f : one.flags) {
    trusted += (f & tropd::flags::trusted) != 0;
    outl += (f & tropd::flags::outlier) != 0;
  }
  CHECK(trusted > 0);
  CHECK(outl > 0);
}
