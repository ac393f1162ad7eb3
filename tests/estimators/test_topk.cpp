// Teacher top-k forward KL (method.md 2.3) through tropd::host::topk_forward_kl_rows, with
// full teacher logits (selection inside the library) and with given lists, against the naive
// long-double reference, the closed-form gradients and finite differences.
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
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
using tropd::estimators::topk_tail;

namespace {

constexpr float finf = std::numeric_limits<float>::infinity();

naive::tail to_naive(topk_tail t) {
  return t == topk_tail::raw ? naive::tail::raw : (t == topk_tail::renormalised ? naive::tail::renormalised : naive::tail::tail_bucket);
}

const topk_tail all_tails[] = {topk_tail::raw, topk_tail::renormalised, topk_tail::tail_bucket};

template <class G>
struct outputs {
  tropd::status st;
  std::vector<double> loss;
  std::vector<G> grad;
};

/// Full-teacher-logits form.
template <class G, class TS, class TT>
outputs<G> run_full(int k, topk_tail tail, const std::vector<TS>& zs, const std::vector<TT>& zt, int64_t rows, int64_t V,
                    const tropd::host::row_options& opt = {}) {
  outputs<G> o;
  o.loss.assign(static_cast<size_t>(rows), 12345.0);
  o.grad.assign(static_cast<size_t>(rows * V), G(12345));
  o.st = tropd::host::topk_forward_kl_rows(tropd::estimators::topk_forward_kl{k, tail}, tropd::make_matrix(zs.data(), rows, V),
                                           tropd::make_matrix(zt.data(), rows, V), tropd::view_of(o.loss),
                                           tropd::make_matrix(o.grad.data(), rows, V), opt);
  return o;
}

/// A teacher list per row: ids and float log-probs, [rows x K].
struct lists {
  int64_t K = 0;
  std::vector<int32_t> ids;
  std::vector<float> lp;
};

/// Given-lists form.
template <class G, class TS>
outputs<G> run_lists(topk_tail tail, const std::vector<TS>& zs, const lists& L, int64_t rows, int64_t V,
                     const tropd::host::row_options& opt = {}) {
  outputs<G> o;
  o.loss.assign(static_cast<size_t>(rows), 12345.0);
  o.grad.assign(static_cast<size_t>(rows * V), G(12345));
  tropd::host::topk_lists tl{tropd::make_matrix(L.ids.data(), rows, L.K), tropd::make_matrix(L.lp.data(), rows, L.K)};
  o.st = tropd::host::topk_forward_kl_rows(tropd::estimators::topk_forward_kl{static_cast<int>(L.K), tail}, tropd::make_matrix(zs.data(), rows, V), tl,
                                           tropd::view_of(o.loss), tropd::make_matrix(o.grad.data(), rows, V), opt);
  return o;
}

/// Scale of the gradient's terms, max_j (p_j + qk_j)(1 + |ls_j| + |lq_j|) / T_S, for fp32 work
/// (see test_estimators_full.cpp).
ld term_scale(const vec& z, const std::vector<int>& ids, const vec& lq, ld ts) {
  const vec ls = naive::log_softmax(z, ts), p = naive::probs(ls);
  ld s = 0;
  for (size_t j = 0; j < z.size(); ++j) s = std::max(s, p[j] * (1 + std::fabs(ls[j])));
  for (size_t i = 0; i < ids.size(); ++i)
    if (lq[i] != -naive::inf) s = std::max(s, (1 + std::exp(lq[i])) * (1 + std::fabs(lq[i]) + std::fabs(ls[static_cast<size_t>(ids[i])])));
  return s / ts;
}

/// Checks one row's value and gradient against the naive reference for the list (ids, lq).
template <class G>
void check_row(const outputs<G>& o, int64_t r, int64_t V, const vec& z, const std::vector<int>& ids, const vec& lq,
               topk_tail tail, ld ts, bool fp64) {
  CAPTURE(r);
  const auto want = naive::topk_forward_kl(z, ids, lq, to_naive(tail), ts);
  REQUIRE(std::isfinite(want.value));
  const ld tol = fp64 ? 1e-12L : 1e-5L;
  CHECK(tropd_test::close_value(o.loss[static_cast<size_t>(r)], want.value, tol));
  ld norm = tropd_test::max_abs(want.grad);
  if (!fp64) norm = std::max(norm, term_scale(z, ids, lq, ts));
  ld err = 0;
  for (int64_t j = 0; j < V; ++j)
    err = std::max(err, std::fabs(static_cast<ld>(o.grad[static_cast<size_t>(r * V + j)]) - want.grad[static_cast<size_t>(j)]));
  CHECK(err <= tol * norm);
}

/// Checks a full-teacher-logits call against the naive reference (selection by sorting).
template <class G, class TS, class TT>
void check_full(const outputs<G>& o, int k, topk_tail tail, const std::vector<TS>& zs, const std::vector<TT>& zt, int64_t rows,
                int64_t V, ld ts, ld tt) {
  REQUIRE_MESSAGE(o.st.ok(), o.st.message());
  const bool fp64 = std::is_same_v<TS, double> || std::is_same_v<TT, double>;
  for (int64_t r = 0; r < rows; ++r) {
    const vec z = tropd_test::row_ld(zs, r, V), u = tropd_test::row_ld(zt, r, V);
    const vec lt = naive::log_softmax(u, tt);
    const std::vector<int> ids = naive::topk_ids(lt, k);
    vec lq;
    for (int id : ids) lq.push_back(lt[static_cast<size_t>(id)]);
    check_row(o, r, V, z, ids, lq, tail, ts, fp64);
  }
}

/// Random lists: each row draws K distinct ids, their teacher log-probs from a full random
/// teacher distribution (mass < 1), shuffled, with `pad` (id -1, -inf) slots. With
/// `log_mass` set, every row's log-probs are shifted so that the listed mass is e^log_mass.
lists make_lists(std::mt19937_64& rng, int64_t rows, int64_t V, int K, int pad, const ld* log_mass = nullptr) {
  lists L;
  L.K = K + pad;
  std::normal_distribution<double> nd(0, 2);
  for (int64_t r = 0; r < rows; ++r) {
    vec u(static_cast<size_t>(V));
    for (auto& x : u) x = nd(rng);
    const vec lt = naive::log_softmax(u);
    std::vector<int> perm(static_cast<size_t>(V));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    vec chosen;
    for (int i = 0; i < K; ++i) chosen.push_back(lt[static_cast<size_t>(perm[static_cast<size_t>(i)])]);
    const ld shift = log_mass ? *log_mass - naive::logsumexp(chosen) : 0;
    std::vector<std::pair<int32_t, float>> row;
    for (int i = 0; i < K; ++i) row.push_back({perm[static_cast<size_t>(i)], static_cast<float>(chosen[static_cast<size_t>(i)] + shift)});
    for (int i = 0; i < pad; ++i) row.push_back({-1, -finf});
    std::shuffle(row.begin(), row.end(), rng);
    for (const auto& [id, lp] : row) {
      L.ids.push_back(id);
      L.lp.push_back(lp);
    }
  }
  return L;
}

/// Row r of a list as (ids, lq) for the naive reference (padding kept: the reference skips -inf).
void list_row(const lists& L, int64_t r, std::vector<int>& ids, vec& lq) {
  ids.clear();
  lq.clear();
  for (int64_t i = 0; i < L.K; ++i) {
    ids.push_back(L.ids[static_cast<size_t>(r * L.K + i)]);
    lq.push_back(L.lp[static_cast<size_t>(r * L.K + i)]);
  }
}

}  // namespace

TEST_CASE("top-k: full teacher logits, every tail, against the naive reference") {
  std::mt19937_64 rng(31);
  const int64_t rows = 3;
  for (int64_t V : {1, 8, 50, 1100}) {
    const auto zf = tropd_test::random_rows<float>(rng, rows, V, 2.0), uf = tropd_test::random_rows<float>(rng, rows, V, 2.0);
    const auto zd = tropd_test::random_rows<double>(rng, rows, V, 2.0), ud = tropd_test::random_rows<double>(rng, rows, V, 2.0);
    const auto zb = tropd_test::random_rows<tropd::bf16>(rng, rows, V, 2.0), ub = tropd_test::random_rows<tropd::bf16>(rng, rows, V, 2.0);
    for (int k : {1, 5, 64}) {
      if (k >= V) continue;  // k >= V: see the dedicated test below
      for (topk_tail tail : all_tails)
        for (const auto& temps : {std::pair{1.0, 1.0}, std::pair{0.5, 2.0}, std::pair{2.0, 0.5}}) {
          const auto ts = temps.first, tt = temps.second;
          CAPTURE(V);
          CAPTURE(k);
          const std::string tail_name = tropd::estimators::to_string(tail);
          CAPTURE(tail_name);
          CAPTURE(ts);
          CAPTURE(tt);
          tropd::host::row_options opt;
          opt.student_temperature = ts;
          opt.teacher_temperature = tt;
          check_full(run_full<float>(k, tail, zf, uf, rows, V, opt), k, tail, zf, uf, rows, V, ts, tt);
          check_full(run_full<double>(k, tail, zd, ud, rows, V, opt), k, tail, zd, ud, rows, V, ts, tt);
          check_full(run_full<float>(k, tail, zb, ub, rows, V, opt), k, tail, zb, ub, rows, V, ts, tt);
        }
    }
  }
}

TEST_CASE("top-k: k >= V covers the whole teacher distribution: every tail equals the full forward KL") {
  std::mt19937_64 rng(32);
  const int64_t rows = 8, V = 6;
  const auto zd = tropd_test::random_rows<double>(rng, rows, V, 1.0), ud = tropd_test::random_rows<double>(rng, rows, V, 1.0);
  for (int k : {6, 9, 64}) {
    for (topk_tail tail : all_tails) {
      CAPTURE(k);
      const std::string tail_name = tropd::estimators::to_string(tail);
      CAPTURE(tail_name);
      const auto o = run_full<double>(k, tail, zd, ud, rows, V);
      REQUIRE_MESSAGE(o.st.ok(), o.st.message());
      for (int64_t r = 0; r < rows; ++r) {
        const vec z = tropd_test::row_ld(zd, r, V), u = tropd_test::row_ld(ud, r, V);
        const auto fkl = naive::forward_kl(z, u);
        CHECK(tropd_test::close_value(o.loss[static_cast<size_t>(r)], fkl.value, 1e-12L));
        CHECK(tropd_test::grad_rel_err(o.grad.data() + r * V, fkl.grad) <= 1e-12L);
      }
    }
  }
}

TEST_CASE("top-k: the closed-form gradients of the three tails") {
  std::mt19937_64 rng(33);
  const int64_t rows = 4, V = 40;
  const int k = 7;
  const auto zd = tropd_test::random_rows<double>(rng, rows, V, 2.0), ud = tropd_test::random_rows<double>(rng, rows, V, 2.0);
  const double ts = 2.0;
  tropd::host::row_options opt;
  opt.student_temperature = ts;
  for (topk_tail tail : all_tails) {
    const std::string tail_name = tropd::estimators::to_string(tail);
    CAPTURE(tail_name);
    const auto o = run_full<double>(k, tail, zd, ud, rows, V, opt);
    REQUIRE(o.st.ok());
    for (int64_t r = 0; r < rows; ++r) {
      const vec z = tropd_test::row_ld(zd, r, V), u = tropd_test::row_ld(ud, r, V);
      const vec p = naive::probs(naive::log_softmax(z, ts)), q = naive::probs(naive::log_softmax(u));
      const std::vector<int> ids = naive::topk_ids(q, k);
      std::vector<char> inK(static_cast<size_t>(V), 0);
      ld SK = 0, PK = 0;
      for (int id : ids) {
        inK[static_cast<size_t>(id)] = 1;
        SK += q[static_cast<size_t>(id)];
        PK += p[static_cast<size_t>(id)];
      }
      vec g(static_cast<size_t>(V));
      for (int64_t j = 0; j < V; ++j) {
        const size_t J = static_cast<size_t>(j);
        const ld qk = inK[J] ? q[J] : 0;
        if (tail == topk_tail::raw) g[J] = SK * p[J] - qk;                                  // S_K p - q (zero-extended)
        if (tail == topk_tail::renormalised) g[J] = p[J] - qk / SK;                         // p - q / S_K
        if (tail == topk_tail::tail_bucket) g[J] = inK[J] ? p[J] - q[J] : p[J] * (SK - PK) / (1 - PK);  // chain rule
        g[J] /= ts;
      }
      CHECK(tropd_test::grad_rel_err(o.grad.data() + r * V, g) <= 1e-12L);
      // The naive reference's chain-rule gradient agrees with the closed form and with finite differences.
      vec lq;
      for (int id : ids) lq.push_back(std::log(q[static_cast<size_t>(id)]));
      const auto want = naive::topk_forward_kl(z, ids, lq, to_naive(tail), ts);
      CHECK(tropd_test::grad_rel_err(want.grad, g) <= 1e-15L);
      const vec fd = naive::fd_grad([&](const vec& x) { return naive::topk_forward_kl(x, ids, lq, to_naive(tail), ts).value; }, z);
      CHECK(tropd_test::grad_rel_err(o.grad.data() + r * V, fd) <= 1e-7L);
      if (tail != topk_tail::raw) CHECK(o.loss[static_cast<size_t>(r)] >= 0.0);
    }
  }
}

TEST_CASE("top-k: given lists (shuffled, -inf padding with id -1) against the naive reference") {
  std::mt19937_64 rng(34);
  const int64_t rows = 5;
  for (int64_t V : {12, 300}) {
    const auto zf = tropd_test::random_rows<float>(rng, rows, V, 2.0);
    const auto zd = tropd_test::random_rows<double>(rng, rows, V, 2.0);
    for (int pad : {0, 3}) {
      const lists L = make_lists(rng, rows, V, 6, pad);
      for (topk_tail tail : all_tails)
        for (double ts : {1.0, 0.5}) {
          CAPTURE(V);
          CAPTURE(pad);
          const std::string tail_name = tropd::estimators::to_string(tail);
          CAPTURE(tail_name);
          CAPTURE(ts);
          tropd::host::row_options opt;
          opt.student_temperature = ts;
          opt.teacher_temperature = 3.0;  // never applied to given lists
          const auto of = run_lists<float>(tail, zf, L, rows, V, opt);
          const auto od = run_lists<double>(tail, zd, L, rows, V, opt);
          REQUIRE_MESSAGE(of.st.ok(), of.st.message());
          REQUIRE_MESSAGE(od.st.ok(), od.st.message());
          std::vector<int> ids;
          vec lq;
          for (int64_t r = 0; r < rows; ++r) {
            list_row(L, r, ids, lq);
            check_row(of, r, V, tropd_test::row_ld(zf, r, V), ids, lq, tail, ts, false);
            check_row(od, r, V, tropd_test::row_ld(zd, r, V), ids, lq, tail, ts, true);
          }
        }
    }
  }
}

TEST_CASE("top-k: unnormalised lists: renormalised accepts them, raw and tail_bucket reject mass > 1") {
  std::mt19937_64 rng(35);
  const int64_t rows = 4, V = 20;
  const auto zd = tropd_test::random_rows<double>(rng, rows, V, 2.0);
  // Six teacher ids per row whose listed mass is e^0.5 (about 1.65).
  const ld log_mass = 0.5L;
  const lists L = make_lists(rng, rows, V, 6, 2, &log_mass);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<int> ids;
    vec lq;
    list_row(L, r, ids, lq);
    ld mass = 0;
    for (ld x : lq) mass += std::exp(x);
    REQUIRE(mass > 1.5L);  // the construction really gives an over-full list
  }
  const auto o = run_lists<double>(topk_tail::renormalised, zd, L, rows, V);
  REQUIRE_MESSAGE(o.st.ok(), o.st.message());
  std::vector<int> ids;
  vec lq;
  for (int64_t r = 0; r < rows; ++r) {
    list_row(L, r, ids, lq);
    check_row(o, r, V, tropd_test::row_ld(zd, r, V), ids, lq, topk_tail::renormalised, 1, true);
    // Renormalising makes the list's scale irrelevant: the same as the normalised list under raw.
    vec lq0 = lq;
    const ld lse = naive::logsumexp(lq);
    for (ld& x : lq0) x -= lse;
    const auto want0 = naive::topk_forward_kl(tropd_test::row_ld(zd, r, V), ids, lq0, naive::tail::raw);
    CHECK(std::fabs(o.loss[static_cast<size_t>(r)] - want0.value) <= 1e-12L);
  }
  for (topk_tail tail : {topk_tail::raw, topk_tail::tail_bucket}) {
    const auto bad = run_lists<double>(tail, zd, L, rows, V);
    CHECK(bad.st.code == tropd::errc::invalid_topk_list);
    CHECK(bad.st.row == 0);
    for (double l : bad.loss) CHECK(l == 12345.0);
    for (double g : bad.grad) CHECK(g == 12345.0);
  }
}

TEST_CASE("top-k: gradients match finite differences of the naive value (given lists, fp64 student)") {
  std::mt19937_64 rng(36);
  const int64_t rows = 3, V = 15;
  const auto zd = tropd_test::random_rows<double>(rng, rows, V, 1.5);
  const lists L = make_lists(rng, rows, V, 5, 2);
  tropd::host::row_options opt;
  opt.student_temperature = 0.5;
  for (topk_tail tail : all_tails) {
    const std::string tail_name = tropd::estimators::to_string(tail);
    CAPTURE(tail_name);
    const auto o = run_lists<double>(tail, zd, L, rows, V, opt);
    REQUIRE(o.st.ok());
    std::vector<int> ids;
    vec lq;
    for (int64_t r = 0; r < rows; ++r) {
      list_row(L, r, ids, lq);
      const vec z = tropd_test::row_ld(zd, r, V);
      const vec fd = naive::fd_grad([&](const vec& x) { return naive::topk_forward_kl(x, ids, lq, to_naive(tail), 0.5L).value; }, z);
      CHECK(tropd_test::grad_rel_err(o.grad.data() + r * V, fd) <= 1e-7L);
    }
  }
}

TEST_CASE("top-k: selection ties go to the lower id; select_topk against sorting") {
  SUBCASE("through topk_forward_kl_rows") {
    // q ties at ids 1, 2, 3, 5; k = 2 must pick ids 1 and 2. The student differs at 1, 2, 3, 5,
    // so another choice would give another value and gradient.
    const std::vector<double> u = {1, 3, 3, 3, 0, 3};
    const std::vector<double> z = {0.1, -0.5, 0.7, 1.9, -1.0, 0.3};
    const int64_t V = 6;
    for (topk_tail tail : all_tails) {
      const auto o = run_full<double>(2, tail, z, u, 1, V);
      REQUIRE(o.st.ok());
      const vec lt = naive::log_softmax(tropd_test::row_ld(u, 0, V));
      const std::vector<int> ids = {1, 2};
      CHECK(naive::topk_ids(lt, 2) == ids);
      check_row(o, 0, V, tropd_test::row_ld(z, 0, V), ids, {lt[1], lt[2]}, tail, 1, true);
      const auto other = naive::topk_forward_kl(tropd_test::row_ld(z, 0, V), {3, 5}, {lt[3], lt[5]}, to_naive(tail));
      CHECK(std::fabs(o.loss[0] - other.value) > 1e-3L);  // the test can tell the choices apart
    }
  }
  SUBCASE("select_topk directly") {
    std::mt19937_64 rng(37);
    std::uniform_int_distribution<int> level(0, 5);
    for (int trial = 0; trial < 50; ++trial) {
      const int64_t V = 1 + trial * 7 % 90;
      const int k = 1 + trial % 13;
      std::vector<float> x(static_cast<size_t>(V));
      for (auto& v : x) v = static_cast<float>(level(rng)) * 0.5f;
      if (trial % 5 == 0) x[0] = -finf;
      std::vector<int32_t> ids(static_cast<size_t>(k));
      std::vector<float> vals(static_cast<size_t>(k));
      tropd::host::select_topk(x.data(), V, k, ids.data(), vals.data());
      // Sorting reference over all entries (-inf included: the library keeps it if k exceeds the finite count).
      std::vector<int> order(static_cast<size_t>(V));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return x[static_cast<size_t>(a)] > x[static_cast<size_t>(b)]; });
      CAPTURE(V);
      CAPTURE(k);
      for (int i = 0; i < k; ++i) {
        if (i < V) {
          CHECK(ids[static_cast<size_t>(i)] == order[static_cast<size_t>(i)]);
          CHECK(vals[static_cast<size_t>(i)] == x[static_cast<size_t>(order[static_cast<size_t>(i)])]);
        } else {
          CHECK(ids[static_cast<size_t>(i)] == -1);
          CHECK(vals[static_cast<size_t>(i)] == -finf);
        }
      }
    }
  }
}

TEST_CASE("top-k: fused / threads give bit-identical results; grad_scale") {
  std::mt19937_64 rng(38);
  const int64_t rows = 6, V = 700;
  const auto zf = tropd_test::random_rows<float>(rng, rows, V, 2.0), uf = tropd_test::random_rows<float>(rng, rows, V, 2.0);
  const lists L = make_lists(rng, rows, V, 8, 2);
  const std::vector<double> scale = {1.0, -2.0, 0.0, 0.5, 3.0, 1.0};
  for (topk_tail tail : all_tails) {
    const auto base_full = run_full<float>(16, tail, zf, uf, rows, V);
    const auto base_list = run_lists<float>(tail, zf, L, rows, V);
    REQUIRE(base_full.st.ok());
    REQUIRE(base_list.st.ok());
    for (bool fused : {false, true})
      for (int threads : {1, 2}) {
        tropd::host::row_options opt;
        opt.order = fused ? tropd::host::row_order::single_read : tropd::host::row_order::validate_first;
        opt.threads = threads;
        const auto a = run_full<float>(16, tail, zf, uf, rows, V, opt);
        const auto b = run_lists<float>(tail, zf, L, rows, V, opt);
        CHECK(tropd_test::bit_equal(a.loss, base_full.loss));
        CHECK(tropd_test::bit_equal(a.grad, base_full.grad));
        CHECK(tropd_test::bit_equal(b.loss, base_list.loss));
        CHECK(tropd_test::bit_equal(b.grad, base_list.grad));
      }
    // grad_scale: row r's gradient times scale[r], values unchanged.
    std::vector<double> loss(rows);
    std::vector<double> grad(static_cast<size_t>(rows * V));
    const std::vector<double> zd(zf.begin(), zf.end());
    const auto plain = run_full<double>(16, tail, zd, uf, rows, V);
    REQUIRE(plain.st.ok());
    const auto st = tropd::host::topk_forward_kl_rows(tropd::estimators::topk_forward_kl{16, tail}, tropd::make_matrix(zd.data(), rows, V),
                                                      tropd::make_matrix(uf.data(), rows, V), tropd::view_of(loss),
                                                      tropd::make_matrix(grad.data(), rows, V), {}, tropd::view_of(scale));
    REQUIRE(st.ok());
    for (int64_t r = 0; r < rows; ++r) {
      CHECK(loss[static_cast<size_t>(r)] == plain.loss[static_cast<size_t>(r)]);
      vec want = tropd_test::row_ld(plain.grad, r, V);
      for (ld& x : want) x *= scale[static_cast<size_t>(r)];
      CHECK(tropd_test::grad_rel_err(grad.data() + r * V, want) <= 1e-15L);
    }
  }
}
