// The wrong results the duplicated host glue let through (issue "one evaluation core"), each
// reproduced as a new user would meet it and checked against an independent long-double
// reference (tests/reference/naive.hpp), plus the new row-level API's own promises: the
// selected top-k ids are returned, a served teacher (log-probs and lists) equals the
// teacher's logits, and a top-k objective's k is never silently ignored.
#include <stdint.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

#include "reference/helpers.hpp"
#include "reference/naive.hpp"

namespace naive = tropd_test::naive;
using naive::ld;
using naive::vec;
using tropd::errc;
using tropd::index_t;
namespace host = tropd::host;

namespace {

constexpr double dinf = std::numeric_limits<double>::infinity();

/// An objective whose every student token is an outlier (R > 1e9 never holds) and whose
/// outlier term is the form-P top-k forward KL with the tail bucket.
using all_outliers = tropd::objective<tropd::regions::log_ratio_threshold, tropd::estimators::k1_reward,
                                      tropd::outliers::topk_fkl, tropd::clippers::pg_clip>;
all_outliers tail_bucket_objective(int k) {
  all_outliers o;
  o.region.tau = 1e9;
  o.outlier.fkl = tropd::estimators::topk_forward_kl{k, tropd::estimators::topk_tail::tail_bucket};
  o.outlier.form = tropd::outliers::fkl_form::p;
  return o;
}

/// The tail-bucket forward KL of method.md 2.3 from whole rows, in long double:
/// sum_{K} q log(q / p) + (1 - S_K) log((1 - S_K) / (1 - P_K)).
ld tail_bucket_loss(const vec& z, const vec& u, const std::vector<int>& ids) {
  const vec ls = naive::log_softmax(z), lt = naive::log_softmax(u);
  ld S = 0, P = 0, v = 0;
  for (int i : ids) {
    const ld q = std::exp(lt[size_t(i)]);
    S += q;
    P += std::exp(ls[size_t(i)]);
    v += q * (lt[size_t(i)] - ls[size_t(i)]);
  }
  // 1 - P from the entries outside the list (no cancellation).
  ld tail_p = 0;
  for (size_t j = 0; j < z.size(); ++j) {
    bool listed = false;
    for (int i : ids) listed |= int(j) == i;
    if (!listed) tail_p += std::exp(ls[j]);
  }
  (void)P;
  return v + (1 - S) * std::log((1 - S) / tail_p);
}

}  // namespace

TEST_CASE("core fixes: the tail bucket through evaluate_rows keeps the gradient on the listed ids") {
  // The reproduction: V = 8, K = 2, every token an outlier, student (0, 0, -36 x 6), teacher
  // (log .25, log .25, log(.5/6) x 6). dL/dz = p - q on the list (0.25, 0.25) and
  // p_j (S_K - P_K) / (1 - P_K) = -1/12 off it; evaluate_rows used to give 0 on the list.
  const index_t V = 8;
  std::vector<double> z(V, -36.0), u(V, std::log(0.5 / 6));
  z[0] = z[1] = 0;
  u[0] = u[1] = std::log(0.25);
  const vec zl(z.begin(), z.end()), ul(u.begin(), u.end());
  // Expected gradient: finite differences of the long-double loss (ids {0, 1}: the top-2).
  const std::vector<int> ids = {0, 1};
  const vec fd = naive::fd_grad([&](const vec& zz) { return tail_bucket_loss(zz, ul, ids); }, zl, 1e-6L);
  const vec ls = naive::log_softmax(zl), lt = naive::log_softmax(ul);
  for (int j = 0; j < 2; ++j) CHECK(std::fabs(double(fd[size_t(j)]) - double(std::exp(ls[size_t(j)]) - std::exp(lt[size_t(j)]))) < 1e-6);
  for (index_t j = 2; j < V; ++j) CHECK(std::fabs(double(fd[size_t(j)]) + 1.0 / 12) < 1e-6);

  const std::vector<int32_t> y = {3};
  const std::vector<tropd::origin> from = {tropd::origin::student};
  const std::vector<index_t> off = {0, 1};
  const host::row_inputs in{.ids = tropd::view_of(y), .from = tropd::view_of(from), .seq_offsets = tropd::view_of(off)};
  auto check = [&](const auto& zs, const auto& us, double tol) {
    std::vector<double> g(V, 777.0);
    double loss = 777;
    std::vector<int32_t> sel(2, 777);
    const tropd::status st = host::evaluate_rows(
        tail_bucket_objective(2), tropd::make_matrix(zs.data(), 1, V), tropd::make_matrix(us.data(), 1, V), in,
        host::row_outputs<double>{.grad = tropd::make_matrix(g.data(), 1, V), .loss = &loss, .topk_ids = tropd::make_matrix(sel.data(), 1, 2)});
    REQUIRE_MESSAGE(st.ok(), st.message());
    CHECK(sel == std::vector<int32_t>{0, 1});
    CHECK(std::fabs(loss - double(tail_bucket_loss(zl, ul, ids))) < tol);
    for (index_t j = 0; j < V; ++j) {
      CAPTURE(j);
      CHECK(std::fabs(g[size_t(j)] - double(fd[size_t(j)])) < tol);
    }
    // The row function of the same estimator agrees.
    std::vector<double> l2(1), g2(V);
    REQUIRE(host::topk_forward_kl_rows(tropd::estimators::topk_forward_kl{2, tropd::estimators::topk_tail::tail_bucket},
                                       tropd::make_matrix(zs.data(), 1, V), tropd::make_matrix(us.data(), 1, V), tropd::view_of(l2),
                                       tropd::make_matrix(g2.data(), 1, V))
                .ok());
    for (index_t j = 0; j < V; ++j) CHECK(std::fabs(g2[size_t(j)] - g[size_t(j)]) < tol);
  };
  SUBCASE("fp64 logits") {
    const std::vector<double> zc(z.begin(), z.end()), uc(u.begin(), u.end());
    check(zc, uc, 1e-9);
  }
  SUBCASE("fp32 logits") {
    const std::vector<float> zf(z.begin(), z.end()), uf(u.begin(), u.end());
    check(zf, uf, 2e-6);
  }
}

TEST_CASE("core fixes: fp64 logits get fp64 answers at row level (no fp32 token view)") {
  // Student (0, -20), teacher (0, -20 + 1e-6), y = 1, OPD: L = s - t = -1.0000000020612e-6;
  // the row level used to store s and t as float and return -1.907e-6.
  const std::vector<double> z = {0.0, -20.0}, u = {0.0, -20.0 + 1e-6};
  const vec zl = {0.0L, -20.0L}, ul = {0.0L, -20.0L + 1e-6L};
  const vec ls = naive::log_softmax(zl), lt = naive::log_softmax(ul);
  const ld want = ls[1] - lt[1];
  const std::vector<int32_t> y = {1};
  const std::vector<tropd::origin> from = {tropd::origin::student};
  const std::vector<index_t> off = {0, 1};
  std::vector<double> g(2), dlds(1);
  double loss = 0;
  const tropd::status st =
      host::evaluate_rows(tropd::presets::opd(), tropd::make_matrix(z.data(), 1, 2), tropd::make_matrix(u.data(), 1, 2),
                          {.ids = tropd::view_of(y), .from = tropd::view_of(from), .seq_offsets = tropd::view_of(off)},
                          host::row_outputs<double>{.grad = tropd::make_matrix(g.data(), 1, 2), .loss = &loss, .dloss_ds = dlds});
  REQUIRE_MESSAGE(st.ok(), st.message());
  CHECK(std::fabs(loss - double(want)) <= 1e-9 * std::fabs(double(want)));
  CHECK(std::fabs(dlds[0] - double(want)) <= 1e-9 * std::fabs(double(want)));
  // dL/dz = dL/ds (e_y - p) with dL/ds = -rho A = s - t.
  const vec p = naive::probs(ls);
  CHECK(std::fabs(g[0] - double(want * (0 - p[0]))) <= 1e-9 * std::fabs(double(want * p[0])));
  CHECK(std::fabs(g[1] - double(want * (1 - p[1]))) <= 1e-9 * std::fabs(double(want)));
}

TEST_CASE("core fixes: an infinite per-position KL is infinite, never a 1e30 stand-in") {
  // V = 3, student uniform, teacher (0, 0, -inf): KL(p_S || p_T) = +inf.
  const std::vector<double> z = {0.0, 0.0, 0.0}, u = {0.0, 0.0, -dinf};
  const std::vector<int32_t> y = {0};
  const std::vector<tropd::origin> from = {tropd::origin::student};
  const std::vector<index_t> off = {0, 1};
  const host::row_inputs in{.ids = tropd::view_of(y), .from = tropd::view_of(from), .seq_offsets = tropd::view_of(off)};
  SUBCASE("vOPD: A = R + KL_t = +inf is an error, nothing written") {
    std::vector<float> g(3, 777.f);
    double loss = 777;
    const tropd::status st = host::evaluate_rows(tropd::presets::vopd(), tropd::make_matrix(z.data(), 1, 3), tropd::make_matrix(u.data(), 1, 3),
                                                 in, host::row_outputs<>{.grad = tropd::make_matrix(g.data(), 1, 3), .loss = &loss});
    CHECK(st.code == errc::infinite_divergence);
    CHECK(st.row == 0);
    CHECK(loss == 777);
    CHECK(g == std::vector<float>(3, 777.f));
  }
  SUBCASE("OPD's diagnostics report the true mean KL: +inf") {
    tropd::diagnostics d;
    double loss = 0;
    std::vector<float> g(3);
    const tropd::status st =
        host::evaluate_rows(tropd::presets::opd(), tropd::make_matrix(z.data(), 1, 3), tropd::make_matrix(u.data(), 1, 3), in,
                            host::row_outputs<>{.grad = tropd::make_matrix(g.data(), 1, 3), .loss = &loss, .diag = &d});
    REQUIRE_MESSAGE(st.ok(), st.message());
    CHECK(d.mean_rkl == dinf);
    // The finite part of the answer is unaffected: L = s - t = log(1/3) - log(1/2).
    CHECK(std::fabs(loss - (std::log(1.0 / 3) - std::log(0.5))) < 1e-12);
  }
  SUBCASE("token level: a +inf rkl is a value the rule reads, -inf or NaN are bad input") {
    const std::vector<double> s = {std::log(1.0 / 3)}, t = {std::log(0.5)};
    std::vector<double> rkl = {dinf};
    double loss = 777;
    tropd::token_batch b{.s = s, .t = t, .from = tropd::view_of(from), .seq_offsets = tropd::view_of(off), .rkl = rkl};
    CHECK(host::evaluate_tokens(tropd::presets::vopd(), b, {.loss = &loss}).code == errc::infinite_divergence);
    CHECK(loss == 777);
    CHECK(host::evaluate_tokens(tropd::presets::opd(), b, {.loss = &loss}).ok());
    rkl[0] = -dinf;
    CHECK(host::evaluate_tokens(tropd::presets::opd(), b, {.loss = &loss}).code == errc::non_finite_input);
  }
}

TEST_CASE("core API: evaluate_rows returns the teacher top-k ids it selected, in descending order, ties to the lower id") {
  const index_t V = 6, K = 3;
  const std::vector<float> z = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  const std::vector<float> u = {1.0f, 3.0f, 2.0f, 3.0f, -1.0f, 0.5f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  const std::vector<int32_t> y = {2, 0};
  const std::vector<tropd::origin> from = {tropd::origin::student, tropd::origin::teacher};
  const std::vector<index_t> off = {0, 2};
  std::vector<int32_t> sel(size_t(2 * K), 777);
  double loss = 0;
  const tropd::status st = host::evaluate_rows(
      tropd::presets::tropd({.k = int(K)}), tropd::make_matrix(z.data(), 2, V), tropd::make_matrix(u.data(), 2, V),
      {.ids = tropd::view_of(y), .from = tropd::view_of(from), .seq_offsets = tropd::view_of(off)},
      host::row_outputs<>{.loss = &loss, .topk_ids = tropd::make_matrix(sel.data(), 2, K)});
  REQUIRE_MESSAGE(st.ok(), st.message());
  CHECK(sel == std::vector<int32_t>{1, 3, 2, -1, -1, -1});  // the teacher-prefix row selects nothing
}

TEST_CASE("core API: a top-k objective's k must be the width of the lists it is given") {
  const std::vector<double> s = {-1.0}, t = {-1.5};
  const std::vector<tropd::origin> from = {tropd::origin::student};
  const std::vector<index_t> off = {0, 1};
  const std::vector<int32_t> ids = {0, 1, 2};
  const std::vector<double> lq = {-1.0, -1.5, -2.0}, ls = {-1.2, -1.0, -3.0};
  const tropd::token_batch b{.s = s, .t = t, .from = tropd::view_of(from), .seq_offsets = tropd::view_of(off),
                             .topk_ids = tropd::make_matrix(ids.data(), 1, 3), .topk_teacher = tropd::make_matrix(lq.data(), 1, 3),
                             .topk_student = tropd::make_matrix(ls.data(), 1, 3)};
  double loss = 777;
  const tropd::status bad = host::evaluate_tokens(tropd::presets::tropd(), b, {.loss = &loss});  // k = 64, lists of 3
  CHECK(bad.code == errc::invalid_parameter);
  CHECK(std::string(bad.detail).find("width") != std::string::npos);
  CHECK(loss == 777);
  CHECK(host::evaluate_tokens(tropd::presets::tropd({.k = 3}), b, {.loss = &loss}).ok());
  // The estimator row function with given lists: the same rule.
  const std::vector<float> zr = {0.0f, 0.1f, 0.2f, 0.3f};
  const std::vector<float> lp = {-1.0f, -1.5f, -2.0f};
  std::vector<double> l(1, 777);
  const host::topk_lists lists{tropd::make_matrix(ids.data(), 1, 3), tropd::make_matrix(lp.data(), 1, 3)};
  CHECK(host::topk_forward_kl_rows(tropd::estimators::topk_forward_kl{64}, tropd::make_matrix(zr.data(), 1, 4), lists, tropd::view_of(l)).code ==
        errc::invalid_parameter);
  CHECK(l[0] == 777);
  CHECK(host::topk_forward_kl_rows(tropd::estimators::topk_forward_kl{3}, tropd::make_matrix(zr.data(), 1, 4), lists, tropd::view_of(l)).ok());
}

TEST_CASE("core API: a served teacher (log-probs of the tokens + top-k lists) equals the teacher's logits") {
  // The same batch twice: teacher logits; then the teacher's log-probs at the rows' tokens and
  // the top-k lists the first call selected (returned in topk_ids). TrOPD forms C and P and OPD.
  std::mt19937_64 rng(91);
  const index_t n = 12, V = 50, K = 6;
  const auto z = tropd_test::random_rows<double>(rng, n, V, 2.0), u = tropd_test::random_rows<double>(rng, n, V, 2.0);
  std::vector<int32_t> y(static_cast<size_t>(n));
  std::vector<tropd::origin> from(size_t(n), tropd::origin::student);
  for (index_t r = 0; r < n; ++r) y[size_t(r)] = int32_t(rng() % V);
  from[0] = tropd::origin::prompt;
  from[1] = tropd::origin::teacher;
  const std::vector<index_t> off = {0, 6, n};
  const host::row_inputs in{.ids = tropd::view_of(y), .from = tropd::view_of(from), .seq_offsets = tropd::view_of(off)};
  auto both = [&](const auto& obj) {
    constexpr bool topk = std::decay_t<decltype(obj)>::outlier_type::needs_topk;
    const index_t Kq = topk ? K : 0;  // the lists' width (none without a top-k term)
    std::vector<double> g1(size_t(n * V)), g2(size_t(n * V));
    std::vector<int32_t> sel(size_t(n * K));
    double l1 = 0, l2 = 0;
    const tropd::status a = host::evaluate_rows(obj, tropd::make_matrix(z.data(), n, V), tropd::make_matrix(u.data(), n, V), in,
                                                host::row_outputs<double>{.grad = tropd::make_matrix(g1.data(), n, V), .loss = &l1,
                                                                          .topk_ids = tropd::make_matrix(sel.data(), n, Kq)},
                                                {.seed = 5, .step = 2});
    REQUIRE_MESSAGE(a.ok(), a.message());
    // The served form: t and the lists computed here in long double from the teacher rows.
    std::vector<double> t(static_cast<size_t>(n));
    std::vector<float> lp(size_t(n * K), -std::numeric_limits<float>::infinity());
    for (index_t r = 0; r < n; ++r) {
      const vec lt = naive::log_softmax(tropd_test::row_ld(u, r, V));
      t[size_t(r)] = double(lt[size_t(y[size_t(r)])]);
      for (index_t k = 0; k < Kq; ++k) {
        const int32_t id = sel[size_t(r * K + k)];
        if (id >= 0) lp[size_t(r * K + k)] = float(lt[size_t(id)]);
      }
    }
    host::row_inputs in2 = in;
    if (topk) in2.teacher_topk = {tropd::make_matrix<const int32_t>(sel.data(), n, K), tropd::make_matrix<const float>(lp.data(), n, K)};
    const tropd::status b = host::evaluate_rows(obj, tropd::make_matrix(z.data(), n, V), host::teacher_logprobs{t}, in2,
                                                host::row_outputs<double>{.grad = tropd::make_matrix(g2.data(), n, V), .loss = &l2},
                                                {.seed = 5, .step = 2});
    REQUIRE_MESSAGE(b.ok(), b.message());
    // fp32 lists: the teacher's top-k log-probs carry ~1e-7 relative rounding.
    CHECK(std::fabs(l1 - l2) <= 1e-6 * std::max(1.0, std::fabs(l1)));
    double worst = 0;
    for (size_t i = 0; i < g1.size(); ++i) worst = std::max(worst, std::fabs(g1[i] - g2[i]));
    CHECK(worst < 1e-6);
  };
  both(tropd::presets::opd());
  both(tropd::presets::tropd({.k = int(K)}));
  both(tropd::presets::tropd({.k = int(K), .form = tropd::outliers::fkl_form::p}));
  // Objectives that read the teacher's full distribution need its logits.
  std::vector<double> t(static_cast<size_t>(n), -1.0);
  double loss = 0;
  CHECK(host::evaluate_rows(tropd::presets::vopd(), tropd::make_matrix(z.data(), n, V), host::teacher_logprobs{t}, in,
                            host::row_outputs<>{.loss = &loss})
            .code == errc::unsupported);
  CHECK(host::evaluate_rows(tropd::presets::tropd(), tropd::make_matrix(z.data(), n, V), host::teacher_logprobs{t}, in,
                            host::row_outputs<>{.loss = &loss})
            .code == errc::unsupported);  // a top-k term without lists
}
