// Sampled-token estimators (method.md 2.1): the per-token rule estimators::sampled<E, U>, the
// row entry point host::sampled_rows, and Monte Carlo checks of every row of the usage table.
//
// k1 used as a differentiated loss (sampled<k1, as_loss>) must not compile; that is checked by
// a compile-fail test (tests/compile_fail/), not here. Its exact expectation (zero) is checked
// below from the naive reference alone.
#include <stdint.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

#include "reference/helpers.hpp"
#include "reference/naive.hpp"

namespace naive = tropd_test::naive;
using tropd_test::ld;
using tropd_test::vec;
namespace est = tropd::estimators;

namespace {

template <class E>
constexpr naive::est naive_est() {
  if constexpr (std::is_same_v<E, est::k1>) return naive::est::k1;
  else if constexpr (std::is_same_v<E, est::k2>) return naive::est::k2;
  else return naive::est::k3;
}
template <class U>
constexpr naive::usage naive_usage() {
  return std::is_same_v<U, est::as_pg_reward> ? naive::usage::pg_reward : naive::usage::loss;
}

/// Calls f(sampled<E, U>{}) for every pair that compiles (all but k1 as a loss).
template <class F>
void for_each_pair(F&& f) {
  f(est::sampled<est::k1, est::as_pg_reward>{});
  f(est::sampled<est::k2, est::as_pg_reward>{});
  f(est::sampled<est::k3, est::as_pg_reward>{});
  f(est::sampled<est::k2, est::as_loss>{});
  f(est::sampled<est::k3, est::as_loss>{});
}

template <class P>
std::string pair_name() {
  return std::string(P::estimator::name) + "/" + P::usage::name;
}

}  // namespace

TEST_CASE("sampled: per-token values, dL/ds, advantages and estimates against the naive reference") {
  const double ss[] = {-0.1, -2.0, -7.5};
  for_each_pair([&](auto e) {
    using P = decltype(e);
    const std::string name = pair_name<P>();
    CAPTURE(name);
    for (double s : ss)
      for (double s_old : {s, s + 0.3, s - 1.0})
        for (double t : {-0.5, -3.0, -12.0, s + 1e-9, s - 1e-7}) {
          CAPTURE(s);
          CAPTURE(s_old);
          CAPTURE(t);
          const auto got = e(s, s_old, t);
          const auto want = naive::sampled(naive_est<typename P::estimator>(), naive_usage<typename P::usage>(), s, s_old, t);
          // Near s = t the k-values are tiny (k3 ~ (t - s)^2 / 2) and computed as differences of
          // O(|t - s|) terms, so their error is measured against that scale.
          const ld scale = std::max<ld>(std::fabs(t - s), std::fabs(t - s_old));
          auto close = [&](ld got_v, ld want_v) { return std::fabs(got_v - want_v) <= 1e-14L * std::max<ld>(std::fabs(want_v), 3 * scale); };
          CHECK(close(got.loss, want.loss));
          CHECK(close(got.dloss_ds, want.dloss_ds));
          CHECK(close(got.advantage, want.advantage));
          CHECK(close(got.estimate, want.estimate));
          CHECK(got.estimate >= (std::is_same_v<typename P::estimator, est::k1> ? -1e300 : 0.0));
        }
  });
  // Documented signs: k2, k3 >= 0; k1 can be negative.
  CHECK(est::k1::value(-3.0, -1.0) < 0);
  CHECK(est::k2::value(-3.0, -1.0) > 0);
  CHECK(est::k3::value(-3.0, -1.0) > 0);
  CHECK(est::k3::value(-1.0, -3.0) > 0);
}

namespace {

template <class G>
struct outputs {
  tropd::status st;
  std::vector<double> loss;
  std::vector<G> grad;
};

template <class G, class P, class TS, class TT>
outputs<G> run_sampled(const P& e, const std::vector<TS>& zs, const std::vector<TT>& zt, const std::vector<int32_t>& ids,
                       const std::vector<double>& s_old, int64_t rows, int64_t V, const tropd::host::row_options& opt = {},
                       const std::vector<double>& scale = {}) {
  outputs<G> o;
  o.loss.assign(static_cast<size_t>(rows), 12345.0);
  o.grad.assign(static_cast<size_t>(rows * V), G(12345));
  o.st = tropd::host::sampled_rows(e, tropd::make_matrix(zs.data(), rows, V), tropd::make_matrix(zt.data(), rows, V),
                                   tropd::view_of(ids), tropd::make_vector(s_old.data(), static_cast<int64_t>(s_old.size())),
                                   tropd::view_of(o.loss), tropd::make_matrix(o.grad.data(), rows, V), opt,
                                   tropd::make_vector(scale.data(), static_cast<int64_t>(scale.size())));
  return o;
}

/// Compares sampled_rows output with the naive reference. In fp32 work s and t carry an absolute
/// rounding error of a few ulps of the logits' magnitude; the tolerance adds the change of the
/// reference's loss and dL/ds under that perturbation of s and t.
template <class G, class P, class TS, class TT>
void compare_sampled(const outputs<G>& o, const P&, const std::vector<TS>& zs, const std::vector<TT>& zt,
                     const std::vector<int32_t>& ids, const std::vector<double>& s_old, int64_t rows, int64_t V, ld ts, ld tt,
                     const std::vector<double>& scale = {}) {
  REQUIRE_MESSAGE(o.st.ok(), o.st.message());
  const bool fp64 = std::is_same_v<TS, double> || std::is_same_v<TT, double>;
  const ld tol = fp64 ? 1e-12L : 1e-5L;
  const auto E = naive_est<typename P::estimator>();
  const auto U = naive_usage<typename P::usage>();
  for (int64_t r = 0; r < rows; ++r) {
    CAPTURE(r);
    const vec z = tropd_test::row_ld(zs, r, V), u = tropd_test::row_ld(zt, r, V);
    const size_t y = static_cast<size_t>(ids[static_cast<size_t>(r)]);
    const ld s = naive::log_softmax(z, ts)[y], t = naive::log_softmax(u, tt)[y];
    const ld so = s_old.empty() ? s : s_old[static_cast<size_t>(r)];
    const auto want = naive::sampled(E, U, s, so, t);
    ld dl = 0, dd = 0;  // the reference's sensitivity to a rounding of s and t
    if (!fp64) {
      ld mag = 1;
      for (ld x : z) mag = std::max(mag, std::fabs(x / ts));
      for (ld x : u) mag = std::max(mag, std::fabs(x / tt));
      const ld delta = 16 * std::numeric_limits<float>::epsilon() * mag;
      for (ld ds : {-delta, delta})
        for (ld dt : {-delta, delta}) {
          const auto pert = naive::sampled(E, U, s + ds, s_old.empty() ? s + ds : so, t + dt);
          dl = std::max(dl, std::fabs(pert.loss - want.loss));
          dd = std::max(dd, std::fabs(pert.dloss_ds - want.dloss_ds));
        }
    }
    CHECK(std::fabs(o.loss[static_cast<size_t>(r)] - want.loss) <= tol * std::max<ld>(1, std::fabs(want.loss)) + dl);
    const ld sc = scale.empty() ? 1 : scale[static_cast<size_t>(r)];
    vec g = naive::sampled_logit_grad(want.dloss_ds, static_cast<int>(y), z, ts);
    for (ld& x : g) x *= sc;
    ld err = 0;
    for (int64_t j = 0; j < V; ++j)
      err = std::max(err, std::fabs(static_cast<ld>(o.grad[static_cast<size_t>(r * V + j)]) - g[static_cast<size_t>(j)]));
    // Normalised by the gradient's natural scale |dL/ds| / T_S (>= max |g|; the gradient is 0 at V = 1).
    CHECK(err <= tol * std::fabs(sc * want.dloss_ds) / ts + 2 * std::fabs(sc) * dd / ts + 1e-300L);
  }
}

}  // namespace

TEST_CASE("sampled: sampled_rows against the naive reference (values and dL/ds (e_y - p) / T_S)") {
  std::mt19937_64 rng(41);
  const int64_t rows = 6;
  for (int64_t V : {1, 17, 1100}) {
    std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(V - 1));
    std::vector<int32_t> ids(rows);
    for (auto& y : ids) y = pick(rng);
    const auto zf = tropd_test::random_rows<float>(rng, rows, V, 2.0), uf = tropd_test::random_rows<float>(rng, rows, V, 2.0);
    const auto zd = tropd_test::random_rows<double>(rng, rows, V, 2.0), ud = tropd_test::random_rows<double>(rng, rows, V, 2.0);
    const auto zb = tropd_test::random_rows<tropd::bf16>(rng, rows, V, 2.0);
    const auto uh = tropd_test::random_rows<tropd::fp16>(rng, rows, V, 2.0);
    std::normal_distribution<double> nd(-2.0, 0.5);
    std::vector<double> s_old(rows);
    for (auto& x : s_old) x = nd(rng);
    const std::vector<double> scale = {1.0, -1.5, 0.0, 2.0, 0.5, 1.0};
    for (const auto& temps : {std::pair{1.0, 1.0}, std::pair{0.5, 2.0}, std::pair{2.0, 0.5}}) {
      const auto ts = temps.first, tt = temps.second;
      tropd::host::row_options opt;
      opt.student_temperature = ts;
      opt.teacher_temperature = tt;
      for_each_pair([&](auto e) {
        const std::string name = pair_name<decltype(e)>();
        CAPTURE(name);
        CAPTURE(V);
        CAPTURE(ts);
        CAPTURE(tt);
        const std::vector<double> none;
        compare_sampled(run_sampled<float>(e, zf, uf, ids, none, rows, V, opt), e, zf, uf, ids, none, rows, V, ts, tt);
        compare_sampled(run_sampled<double>(e, zd, ud, ids, none, rows, V, opt), e, zd, ud, ids, none, rows, V, ts, tt);
        compare_sampled(run_sampled<double>(e, zd, ud, ids, s_old, rows, V, opt, scale), e, zd, ud, ids, s_old, rows, V, ts, tt,
                        scale);
        compare_sampled(run_sampled<float>(e, zf, uf, ids, s_old, rows, V, opt, scale), e, zf, uf, ids, s_old, rows, V, ts, tt, scale);
        compare_sampled(run_sampled<float>(e, zb, uh, ids, none, rows, V, opt), e, zb, uh, ids, none, rows, V, ts, tt);
      });
    }
  }
}

TEST_CASE("sampled: the logit gradient is the finite-difference gradient of L(s(z)) (loss usage)") {
  std::mt19937_64 rng(42);
  const int64_t rows = 3, V = 11;
  const auto zd = tropd_test::random_rows<double>(rng, rows, V, 1.5), ud = tropd_test::random_rows<double>(rng, rows, V, 1.5);
  const std::vector<int32_t> ids = {0, 5, 10};
  tropd::host::row_options opt;
  opt.student_temperature = 2.0;
  auto check = [&](auto e) {
    using P = decltype(e);
    const auto o = run_sampled<double>(e, zd, ud, ids, {}, rows, V, opt);
    REQUIRE(o.st.ok());
    for (int64_t r = 0; r < rows; ++r) {
      const vec u = tropd_test::row_ld(ud, r, V);
      const size_t y = static_cast<size_t>(ids[static_cast<size_t>(r)]);
      const ld t = naive::log_softmax(u)[y];
      const vec fd = naive::fd_grad(
          [&](const vec& x) { return naive::k_value(naive_est<typename P::estimator>(), naive::log_softmax(x, 2.0L)[y], t); },
          tropd_test::row_ld(zd, r, V));
      CHECK(tropd_test::grad_rel_err(o.grad.data() + r * V, fd) <= 1e-7L);
    }
  };
  check(est::sampled<est::k2, est::as_loss>{});
  check(est::sampled<est::k3, est::as_loss>{});
}

// ---------------------------------------------------------------------------
// The usage table of method.md 2.1: exact expectations over y ~ p, then Monte Carlo.
// ---------------------------------------------------------------------------

namespace {

struct mc_case {
  vec z, u, p, q, ls, lt;
  ld kl = 0;         ///< KL(p || q)
  vec rkl_grad;      ///< p * (d - KL)
  vec fkl_grad;      ///< p - q
};

mc_case make_case(const std::vector<double>& z, const std::vector<double>& u) {
  mc_case c;
  c.z.assign(z.begin(), z.end());
  c.u.assign(u.begin(), u.end());
  c.ls = naive::log_softmax(c.z);
  c.lt = naive::log_softmax(c.u);
  c.p = naive::probs(c.ls);
  c.q = naive::probs(c.lt);
  const size_t V = z.size();
  for (size_t v = 0; v < V; ++v) c.kl += c.p[v] * (c.ls[v] - c.lt[v]);
  c.rkl_grad.resize(V);
  c.fkl_grad.resize(V);
  for (size_t v = 0; v < V; ++v) {
    c.rkl_grad[v] = c.p[v] * ((c.ls[v] - c.lt[v]) - c.kl);
    c.fkl_grad[v] = c.p[v] - c.q[v];
  }
  return c;
}

/// Exact E_y~p[dL/ds(y) (e_y - p)] with rho = 1 (s_old = s), from the naive reference.
vec exact_expected_grad(const mc_case& c, naive::est e, naive::usage u) {
  const size_t V = c.p.size();
  vec g(V, 0);
  for (size_t y = 0; y < V; ++y) {
    const ld d = naive::sampled(e, u, c.ls[y], c.ls[y], c.lt[y]).dloss_ds;
    for (size_t j = 0; j < V; ++j) g[j] += c.p[y] * d * ((j == y ? 1 : 0) - c.p[j]);
  }
  return g;
}

/// Monte Carlo over y ~ p (inverse CDF of a fixed-seed mt19937_64) through host::sampled_rows:
/// per-coordinate means and standard errors of the gradient rows, and of the loss.
struct mc_result {
  vec mean, se;
  ld loss_mean = 0, loss_se = 0;
};

template <class P>
mc_result monte_carlo(const P& e, const mc_case& c, int64_t n, uint64_t seed) {
  const int64_t V = static_cast<int64_t>(c.p.size());
  const int64_t block = 25000;
  std::vector<double> zs(static_cast<size_t>(block * V)), zt(zs.size());
  for (int64_t r = 0; r < block; ++r)
    for (int64_t j = 0; j < V; ++j) {
      zs[static_cast<size_t>(r * V + j)] = static_cast<double>(c.z[static_cast<size_t>(j)]);
      zt[static_cast<size_t>(r * V + j)] = static_cast<double>(c.u[static_cast<size_t>(j)]);
    }
  std::vector<double> cdf(static_cast<size_t>(V));
  ld acc = 0;
  for (int64_t j = 0; j < V; ++j) cdf[static_cast<size_t>(j)] = static_cast<double>(acc += c.p[static_cast<size_t>(j)]);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  vec sum(static_cast<size_t>(V), 0), sum_sq(static_cast<size_t>(V), 0);
  ld lsum = 0, lsum_sq = 0;
  std::vector<int32_t> ids(static_cast<size_t>(block));
  std::vector<double> loss(static_cast<size_t>(block)), grad(zs.size());
  for (int64_t done = 0; done < n; done += block) {
    for (auto& y : ids) {
      const double x = unif(rng) * cdf.back();
      int32_t k = 0;
      while (k + 1 < V && x >= cdf[static_cast<size_t>(k)]) ++k;
      y = k;
    }
    const auto st = tropd::host::sampled_rows(e, tropd::make_matrix(static_cast<const double*>(zs.data()), block, V),
                                              tropd::make_matrix(static_cast<const double*>(zt.data()), block, V),
                                              tropd::view_of(static_cast<const std::vector<int32_t>&>(ids)), {}, tropd::view_of(loss),
                                              tropd::make_matrix(grad.data(), block, V));
    REQUIRE(st.ok());
    for (int64_t r = 0; r < block; ++r) {
      for (int64_t j = 0; j < V; ++j) {
        const ld g = grad[static_cast<size_t>(r * V + j)];
        sum[static_cast<size_t>(j)] += g;
        sum_sq[static_cast<size_t>(j)] += g * g;
      }
      lsum += loss[static_cast<size_t>(r)];
      lsum_sq += static_cast<ld>(loss[static_cast<size_t>(r)]) * loss[static_cast<size_t>(r)];
    }
  }
  const int64_t total = (n + block - 1) / block * block;
  mc_result m;
  m.mean.resize(static_cast<size_t>(V));
  m.se.resize(static_cast<size_t>(V));
  for (int64_t j = 0; j < V; ++j) {
    const ld mu = sum[static_cast<size_t>(j)] / total;
    const ld var = (sum_sq[static_cast<size_t>(j)] / total - mu * mu) * total / (total - 1);
    m.mean[static_cast<size_t>(j)] = mu;
    m.se[static_cast<size_t>(j)] = std::sqrt(std::max<ld>(var, 0) / total);
  }
  m.loss_mean = lsum / total;
  m.loss_se = std::sqrt(std::max<ld>((lsum_sq / total - m.loss_mean * m.loss_mean) * total / (total - 1), 0) / total);
  return m;
}

/// max_j |mean_j - target_j| / se_j (coordinates with se = 0 must match exactly).
ld max_z_score(const mc_result& m, const vec& target) {
  ld z = 0;
  for (size_t j = 0; j < target.size(); ++j) {
    const ld d = std::fabs(m.mean[j] - target[j]);
    z = std::max(z, m.se[j] > 0 ? d / m.se[j] : (d > 1e-15L ? naive::inf : 0));
  }
  return z;
}

// V = 8, moderate logits; the teacher is far enough from the student for k3's PG bias to show.
const std::vector<double> mc_z = {0.5, -0.3, 1.2, 0.0, -1.0, 0.8, 0.3, -0.6};
const std::vector<double> mc_u = {-0.4, 0.9, 0.2, 1.5, -0.8, -1.2, 0.6, 0.1};

}  // namespace

TEST_CASE("sampled: exact expectations over y ~ p reproduce the usage table") {
  const mc_case c = make_case(mc_z, mc_u);
  // k1 as a loss: E[e_y - p] = 0 (useless; rejected at compile time).
  CHECK(tropd_test::max_abs(exact_expected_grad(c, naive::est::k1, naive::usage::loss)) <= 1e-17L);
  // k2 as a loss: p * (d - KL).
  CHECK(tropd_test::grad_rel_err(exact_expected_grad(c, naive::est::k2, naive::usage::loss), c.rkl_grad) <= 1e-15L);
  // k3 as a loss: p - q (the forward-KL gradient).
  CHECK(tropd_test::grad_rel_err(exact_expected_grad(c, naive::est::k3, naive::usage::loss), c.fkl_grad) <= 1e-15L);
  // k1 as a PG reward, A = t - s_old: p * (d - KL) (OPD).
  CHECK(tropd_test::grad_rel_err(exact_expected_grad(c, naive::est::k1, naive::usage::pg_reward), c.rkl_grad) <= 1e-15L);
  // k3 (and k2) as a PG reward: biased.
  CHECK(tropd_test::grad_rel_err(exact_expected_grad(c, naive::est::k3, naive::usage::pg_reward), c.rkl_grad) > 0.05L);
  CHECK(tropd_test::grad_rel_err(exact_expected_grad(c, naive::est::k2, naive::usage::pg_reward), c.rkl_grad) > 0.05L);
  // E[k1] = E[k3] = KL; E[k2] != KL in general.
  ld e1 = 0, e2 = 0, e3 = 0;
  for (size_t y = 0; y < c.p.size(); ++y) {
    e1 += c.p[y] * naive::k_value(naive::est::k1, c.ls[y], c.lt[y]);
    e2 += c.p[y] * naive::k_value(naive::est::k2, c.ls[y], c.lt[y]);
    e3 += c.p[y] * naive::k_value(naive::est::k3, c.ls[y], c.lt[y]);
  }
  CHECK(std::fabs(e1 - c.kl) <= 1e-17L);
  CHECK(std::fabs(e3 - c.kl) <= 1e-17L);
  CHECK(std::fabs(e2 - c.kl) > 1e-3L);
  // The same expectations with the library's per-token rule in place of the naive one.
  auto lib_expected = [&](auto e) {
    vec g(c.p.size(), 0);
    for (size_t y = 0; y < c.p.size(); ++y) {
      const double s = static_cast<double>(c.ls[y]), t = static_cast<double>(c.lt[y]);
      const double d = e(s, s, t).dloss_ds;
      for (size_t j = 0; j < c.p.size(); ++j) g[j] += c.p[y] * d * ((j == y ? 1 : 0) - c.p[j]);
    }
    return g;
  };
  CHECK(tropd_test::grad_rel_err(lib_expected(est::sampled<est::k2, est::as_loss>{}), c.rkl_grad) <= 1e-13L);
  CHECK(tropd_test::grad_rel_err(lib_expected(est::sampled<est::k3, est::as_loss>{}), c.fkl_grad) <= 1e-13L);
  CHECK(tropd_test::grad_rel_err(lib_expected(est::sampled<est::k1, est::as_pg_reward>{}), c.rkl_grad) <= 1e-13L);
}

TEST_CASE("sampled: Monte Carlo over y ~ p through sampled_rows matches every row of the usage table") {
  const mc_case c = make_case(mc_z, mc_u);
  const int64_t n = 200000;
  const ld zmax = 5;  // 5 standard errors per coordinate, from the sample variance

  SUBCASE("k2 as a loss: unbiased reverse-KL gradient p * (d - KL)") {
    const auto m = monte_carlo(est::sampled<est::k2, est::as_loss>{}, c, n, 101);
    CHECK(max_z_score(m, c.rkl_grad) <= zmax);
  }
  SUBCASE("k3 as a loss: the forward-KL gradient p - q; E[k3] = KL") {
    const auto m = monte_carlo(est::sampled<est::k3, est::as_loss>{}, c, n, 102);
    CHECK(max_z_score(m, c.fkl_grad) <= zmax);
    CHECK(std::fabs(m.loss_mean - c.kl) <= zmax * m.loss_se);
  }
  SUBCASE("k1 as a PG reward (rho = 1): unbiased reverse-KL gradient (OPD); E[k1] = KL") {
    const auto m = monte_carlo(est::sampled<est::k1, est::as_pg_reward>{}, c, n, 103);
    CHECK(max_z_score(m, c.rkl_grad) <= zmax);
    CHECK(std::fabs(m.loss_mean - c.kl) <= zmax * m.loss_se);  // with rho = 1 the loss -rho A is k1
  }
  SUBCASE("k3 as a PG reward: measurably biased") {
    const auto m = monte_carlo(est::sampled<est::k3, est::as_pg_reward>{}, c, n, 104);
    const vec biased = exact_expected_grad(c, naive::est::k3, naive::usage::pg_reward);
    CHECK(max_z_score(m, biased) <= zmax);       // it estimates its own (biased) expectation...
    CHECK(max_z_score(m, c.rkl_grad) > 4 * zmax);  // ...which is far from the reverse-KL gradient
    CHECK(max_z_score(m, c.fkl_grad) > 4 * zmax);  // ...and from the forward-KL gradient
  }
  SUBCASE("k2 as a PG reward: biased (documented)") {
    const auto m = monte_carlo(est::sampled<est::k2, est::as_pg_reward>{}, c, n, 105);
    CHECK(max_z_score(m, exact_expected_grad(c, naive::est::k2, naive::usage::pg_reward)) <= zmax);
    CHECK(max_z_score(m, c.rkl_grad) > 4 * zmax);
  }
}

TEST_CASE("sampled: fused / threads give bit-identical results") {
  std::mt19937_64 rng(43);
  const int64_t rows = 9, V = 1300;
  const auto zf = tropd_test::random_rows<float>(rng, rows, V, 2.0), uf = tropd_test::random_rows<float>(rng, rows, V, 2.0);
  std::vector<int32_t> ids(rows);
  std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(V - 1));
  for (auto& y : ids) y = pick(rng);
  for_each_pair([&](auto e) {
    const auto base = run_sampled<float>(e, zf, uf, ids, {}, rows, V);
    REQUIRE(base.st.ok());
    for (bool fused : {false, true})
      for (int threads : {1, 2}) {
        tropd::host::row_options opt;
        opt.order = fused ? tropd::host::row_order::single_read : tropd::host::row_order::validate_first;
        opt.threads = threads;
        const auto o = run_sampled<float>(e, zf, uf, ids, {}, rows, V, opt);
        CHECK(tropd_test::bit_equal(o.loss, base.loss));
        CHECK(tropd_test::bit_equal(o.grad, base.grad));
      }
  });
}
