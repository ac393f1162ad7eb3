// Numerics at the edges (docs/robustness.md): temperatures 0.05 and 20, logits spanning
// 1e4, rows that are -inf but for one entry, bf16 / fp16 inputs at their largest finite
// values, a teacher with zero mass at the sampled token (OPD: error; TrOPD: an outlier with
// finite gradients), a student that gives the teacher's top-k almost no mass (form C's large
// but finite advantage, and its clamp), vocabulary sizes 1, 2, 31 and 262144. Loss and
// gradients are compared with the naive long-double reference where the maths is finite;
// documented errors where it is not.
//
// The test cases named "edges: fixed issue <ID>" are regression tests of issues listed in
// docs/robustness.md (all of them are fixed; a new open issue would be reproduced by a case
// compiled only with -DTROPD_KNOWN_ISSUES until it is fixed).
#include <stdint.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define TROPD_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define TROPD_TEST_SANITIZED 1
#endif
#endif

#if defined(__unix__)
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

#include "reference/helpers.hpp"
#include "reference/naive.hpp"
#include "reference/naive_objective.hpp"

namespace naive = tropd_test::naive;
namespace no = tropd_test::naive_obj;
namespace est = tropd::estimators;
namespace host = tropd::host;
using tropd::errc;
using tropd::index_t;
using tropd_test::ld;
using tropd_test::vec;

namespace {

constexpr float finf = std::numeric_limits<float>::infinity();
constexpr double dinf = std::numeric_limits<double>::infinity();
constexpr ld ldinf = std::numeric_limits<ld>::infinity();

/// Result of one row-level call.
struct rows_out {
  tropd::status st;
  std::vector<double> loss;
  std::vector<float> grad;
};

template <class Est, class TS, class TT>
rows_out div_rows(const Est& e, const std::vector<TS>& z, const std::vector<TT>& u, index_t N, index_t V, double Ts = 1, double Tt = 1,
                  int threads = 1) {
  rows_out o;
  o.loss.assign(static_cast<size_t>(N), 12345.0);
  o.grad.assign(static_cast<size_t>(N * V), 12345.f);
  host::row_options opt;
  opt.student_temperature = Ts;
  opt.teacher_temperature = Tt;
  opt.threads = threads;
  o.st = host::divergence_rows(e, tropd::make_matrix<const TS>(z.data(), N, V), tropd::make_matrix<const TT>(u.data(), N, V),
                               tropd::view_of(o.loss), tropd::make_matrix(o.grad.data(), N, V), opt);
  return o;
}

/// Naive value and gradient of a full-vocabulary estimator by index (0 rkl, 1 fkl, 2 jsd 0.5, 3 tv).
naive::value_grad naive_div(int which, const vec& z, const vec& u, ld Ts, ld Tt) {
  switch (which) {
    case 0: return naive::reverse_kl(z, u, Ts, Tt);
    case 1: return naive::forward_kl(z, u, Ts, Tt);
    case 2: return naive::jsd(z, u, 0.5L, Ts, Tt);
    default: return naive::total_variation(z, u, Ts, Tt);
  }
}

/// Runs the four full-vocabulary estimators on [N x V] rows and compares every row with the
/// naive reference. Tolerances come from the work type (fp32 for 32/16-bit inputs, fp64 if
/// either side is fp64): a log-probability carries an absolute error of a few eps * M, with
/// M the largest |logit / T| of the row, so
///   |value - ref| <= 16 eps ((1 + M)(1 + |ref|) + min(V, 1024))       (chunk sums add ~eps per term)
///   |grad_j - ref_j| <= 16 eps (1 + M) max_v(p_v + q_v) / T_S + 1e-6 max|ref|
/// (`slack` scales both). Rows where the reference is infinite must give infinite_divergence.
template <class TS, class TT>
void check_all_divergences(const std::vector<TS>& z, const std::vector<TT>& u, index_t N, index_t V, double Ts, double Tt, ld slack = 1) {
  constexpr bool dbl = std::is_same_v<TS, double> || std::is_same_v<TT, double>;
  const ld eps = dbl ? ld(std::numeric_limits<double>::epsilon()) : ld(std::numeric_limits<float>::epsilon());
  for (int which = 0; which < 4; ++which) {
    CAPTURE(which);
    rows_out o;
    switch (which) {
      case 0: o = div_rows(est::reverse_kl{}, z, u, N, V, Ts, Tt); break;
      case 1: o = div_rows(est::forward_kl{}, z, u, N, V, Ts, Tt); break;
      case 2: o = div_rows(est::jsd{0.5}, z, u, N, V, Ts, Tt); break;
      default: o = div_rows(est::total_variation{}, z, u, N, V, Ts, Tt); break;
    }
    bool any_inf = false;
    for (index_t r = 0; r < N; ++r)
      any_inf |= !std::isfinite(naive_div(which, tropd_test::row_ld(z, r, V), tropd_test::row_ld(u, r, V), Ts, Tt).value);
    if (any_inf) {
      CHECK(o.st.code == errc::infinite_divergence);
      continue;
    }
    REQUIRE_MESSAGE(o.st.ok(), o.st.message());
    for (index_t r = 0; r < N; ++r) {
      CAPTURE(r);
      const vec zr = tropd_test::row_ld(z, r, V), ur = tropd_test::row_ld(u, r, V);
      const auto ref = naive_div(which, zr, ur, Ts, Tt);
      const vec p = naive::probs(naive::log_softmax(zr, Ts)), q = naive::probs(naive::log_softmax(ur, Tt));
      ld M = 0, pq = 0;
      for (index_t v = 0; v < V; ++v) {
        if (std::isfinite(zr[size_t(v)])) M = std::max(M, std::fabs(zr[size_t(v)] / Ts));
        if (std::isfinite(ur[size_t(v)])) M = std::max(M, std::fabs(ur[size_t(v)] / Tt));
        pq = std::max(pq, p[size_t(v)] + q[size_t(v)]);
      }
      const ld val_tol = slack * 16 * eps * ((1 + M) * (1 + std::fabs(ref.value)) + ld(std::min<index_t>(V, 1024)));
      CHECK(std::isfinite(o.loss[static_cast<size_t>(r)]));
      CHECK_MESSAGE(std::fabs(o.loss[static_cast<size_t>(r)] - ref.value) <= val_tol, o.loss[static_cast<size_t>(r)], " vs ",
                    double(ref.value), " (tolerance ", double(val_tol), ")");
      const float* g = o.grad.data() + r * V;
      for (index_t v = 0; v < V; ++v) REQUIRE(std::isfinite(g[v]));
      if (which == 3) continue;  // TV: sgn(p - q) is discontinuous at ties; its value is checked
      const ld scale = tropd_test::max_abs(ref.grad);
      const ld grad_tol = slack * 16 * eps * (1 + M) * pq / Ts + 1e-6L * scale + 1e-30L;
      ld err = 0;
      for (index_t v = 0; v < V; ++v) err = std::max(err, std::fabs(ld(g[v]) - ref.grad[static_cast<size_t>(v)]));
      CHECK_MESSAGE(err <= grad_tol, "gradient error ", double(err), " (tolerance ", double(grad_tol), ", largest entry ", double(scale), ")");
    }
  }
}

template <class T>
std::vector<T> stored(const std::vector<double>& x) {
  std::vector<T> out;
  for (double v : x) out.push_back(tropd_test::make<T>(v));
  return out;
}

/// Token batch for evaluate_tokens built from plain arrays.
struct tokens {
  std::vector<float> s, s_old, t;
  std::vector<tropd::origin> from;
  std::vector<index_t> off;
  index_t K = 0;
  std::vector<int32_t> ids;
  std::vector<float> lq, ls, ls_old;

  tropd::token_batch view() const {
    tropd::token_batch b;
    const index_t n = static_cast<index_t>(s.size());
    b.s = {s.data(), n};
    if (!s_old.empty()) b.s_old = {s_old.data(), n};
    b.t = {t.data(), n};
    b.from = {from.data(), n};
    b.seq_offsets = {off.data(), static_cast<index_t>(off.size())};
    if (K > 0) {
      b.topk_ids = tropd::make_matrix<const int32_t>(ids.data(), n, K);
      b.topk_teacher = tropd::make_matrix<const float>(lq.data(), n, K);
      b.topk_student = tropd::make_matrix<const float>(ls.data(), n, K);
      if (!ls_old.empty()) b.topk_student_old = tropd::make_matrix<const float>(ls_old.data(), n, K);
    }
    return b;
  }
};

struct tok_out {
  tropd::status st;
  double loss = 0;
  std::vector<float> dlds, adv;
  std::vector<uint8_t> flags;
  tropd::diagnostics d;
};

template <class Obj>
tok_out run_tokens(const Obj& o, const tokens& tk, host::input_policy pol = host::input_policy::reject) {
  tok_out r;
  const size_t n = tk.s.size();
  r.dlds.assign(n, 777.f);
  r.adv.assign(n, 777.f);
  r.flags.assign(n, 0xee);
  tropd::token_outputs out;
  out.dloss_ds = tropd::view_of(r.dlds);
  out.advantage = tropd::view_of(r.adv);
  out.flags = tropd::view_of(r.flags);
  host::eval_options eo;
  eo.bad_input = pol;
  out.loss = &r.loss;
  out.diag = &r.d;
  r.st = host::evaluate_tokens(o, tk.view(), out, eo);
  return r;
}

}  // namespace

// ===========================================================================
// Temperatures, logit spans, one-hot rows, 16-bit extremes, vocabulary sizes.
// ===========================================================================

TEST_CASE("edges: temperatures 0.05 and 20 (every full-vocabulary estimator, fp32 and fp64)") {
  std::mt19937_64 rng(11);
  const index_t N = 3, V = 37;
  const auto zf = tropd_test::random_rows<float>(rng, N, V, 2.0), uf = tropd_test::random_rows<float>(rng, N, V, 2.0);
  const auto zd = tropd_test::random_rows<double>(rng, N, V, 2.0), ud = tropd_test::random_rows<double>(rng, N, V, 2.0);
  for (double T : {0.05, 20.0}) {
    CAPTURE(T);
    // fp32 work: log-probs carry ~eps * |z / T| absolute error (|z/T| ~ 100 at T = 0.05).
    check_all_divergences(zf, uf, N, V, T, T);
    check_all_divergences(zd, ud, N, V, T, T);
    check_all_divergences(zf, uf, N, V, T, 1.0);  // different temperatures per side
  }
}

TEST_CASE("edges: temperatures 0.05 and 20 in sampled_rows and topk_forward_kl_rows") {
  std::mt19937_64 rng(12);
  const index_t N = 4, V = 50;
  const auto z = tropd_test::random_rows<float>(rng, N, V, 2.0), u = tropd_test::random_rows<float>(rng, N, V, 2.0);
  const std::vector<int32_t> ids = {3, 17, 0, 49};
  for (double T : {0.05, 20.0}) {
    CAPTURE(T);
    host::row_options opt;
    opt.student_temperature = opt.teacher_temperature = T;
    std::vector<double> loss(N);
    std::vector<float> grad(static_cast<size_t>(N * V));
    const auto st = host::sampled_rows(est::sampled<est::k2, est::as_loss>{}, tropd::make_matrix<const float>(z.data(), N, V),
                                       tropd::make_matrix<const float>(u.data(), N, V), tropd::view_of(ids), {}, tropd::view_of(loss),
                                       tropd::make_matrix(grad.data(), N, V), opt);
    REQUIRE_MESSAGE(st.ok(), st.message());
    for (index_t r = 0; r < N; ++r) {
      const vec zr = tropd_test::row_ld(z, r, V), ur = tropd_test::row_ld(u, r, V);
      const vec ls = naive::log_softmax(zr, T), lt = naive::log_softmax(ur, T);
      const auto sv = naive::sampled(naive::est::k2, naive::usage::loss, ls[size_t(ids[size_t(r)])], ls[size_t(ids[size_t(r)])],
                                     lt[size_t(ids[size_t(r)])]);
      CHECK(tropd_test::close_value(loss[size_t(r)], sv.loss, 1e-3L));
      const vec g = naive::sampled_logit_grad(sv.dloss_ds, ids[size_t(r)], zr, T);
      CHECK(tropd_test::grad_rel_err(grad.data() + r * V, g) < 1e-3L);
    }
    for (auto tail : {est::topk_tail::raw, est::topk_tail::renormalised, est::topk_tail::tail_bucket}) {
      CAPTURE(int(tail));
      const est::topk_forward_kl e{8, tail};
      const auto st2 = host::topk_forward_kl_rows(e, tropd::make_matrix<const float>(z.data(), N, V),
                                                  tropd::make_matrix<const float>(u.data(), N, V), tropd::view_of(loss),
                                                  tropd::make_matrix(grad.data(), N, V), opt);
      REQUIRE_MESSAGE(st2.ok(), st2.message());
      for (index_t r = 0; r < N; ++r) {
        const vec zr = tropd_test::row_ld(z, r, V), ur = tropd_test::row_ld(u, r, V);
        const vec lt = naive::log_softmax(ur, T);
        const auto ids8 = naive::topk_ids(lt, 8);
        vec lq;
        for (int id : ids8) lq.push_back(lt[size_t(id)]);
        const auto ref = naive::topk_forward_kl(zr, ids8, lq,
                                                tail == est::topk_tail::raw ? naive::tail::raw
                                                : tail == est::topk_tail::renormalised ? naive::tail::renormalised
                                                                                        : naive::tail::tail_bucket,
                                                T);
        CHECK(tropd_test::close_value(loss[size_t(r)], ref.value, 1e-3L));
        CHECK(tropd_test::grad_rel_err(grad.data() + r * V, ref.grad) < 2e-3L);
      }
    }
  }
}

TEST_CASE("edges: logits spanning 1e4 (fp32 and fp64 rows, offsets up to 1e4)") {
  std::mt19937_64 rng(13);
  const index_t N = 3, V = 40;
  std::uniform_real_distribution<double> U(-5e3, 5e3);
  for (double offset : {0.0, 1e4, -1e4}) {
    CAPTURE(offset);
    std::vector<double> z(static_cast<size_t>(N * V)), u(z.size());
    for (auto& x : z) x = offset + U(rng);
    for (size_t i = 0; i < u.size(); ++i) u[i] = 0.5 * z[i] + offset / 2 + 50 * std::sin(double(i));  // overlapping supports
    // fp64: exact inputs; absolute error ~ eps64 * 1e4 per log-prob.
    check_all_divergences(z, u, N, V, 1, 1);
    // fp32 inputs (rounded to fp32, reference reads the same fp32 values): error ~ eps32 * 1.5e4.
    check_all_divergences(stored<float>(z), stored<float>(u), N, V, 1, 1);
  }
}

TEST_CASE("edges: rows that are -inf everywhere but one entry (student, teacher, both)") {
  const index_t V = 6;
  auto onehot = [&](int at, double other) {
    std::vector<double> r(static_cast<size_t>(V), -dinf);
    r[size_t(at)] = 2.5;
    if (other != -dinf)
      for (index_t v = 0; v < V; ++v)
        if (v != at) r[size_t(v)] = other + 0.3 * double(v);
    return r;
  };
  const auto full = [&](double base) {
    std::vector<double> r;
    for (index_t v = 0; v < V; ++v) r.push_back(base + 0.4 * double(v));
    return r;
  };
  SUBCASE("same single entry in both: every divergence is 0 with zero gradient") {
    const auto z = stored<float>(onehot(2, -dinf)), u = stored<float>(onehot(2, -dinf));
    for (int which = 0; which < 4; ++which) {
      rows_out o = which == 0 ? div_rows(est::reverse_kl{}, z, u, 1, V)
                   : which == 1 ? div_rows(est::forward_kl{}, z, u, 1, V)
                   : which == 2 ? div_rows(est::jsd{0.5}, z, u, 1, V)
                                : div_rows(est::total_variation{}, z, u, 1, V);
      REQUIRE_MESSAGE(o.st.ok(), o.st.message());
      CHECK(std::fabs(o.loss[0]) <= 1e-12);
      for (float g : o.grad) CHECK(g == 0.f);
    }
  }
  SUBCASE("different single entries: KL infinite (errors), JSD = log 2, TV = 1") {
    const auto z = stored<float>(onehot(1, -dinf)), u = stored<float>(onehot(4, -dinf));
    CHECK(div_rows(est::reverse_kl{}, z, u, 1, V).st.code == errc::infinite_divergence);
    CHECK(div_rows(est::forward_kl{}, z, u, 1, V).st.code == errc::infinite_divergence);
    const auto j = div_rows(est::jsd{0.5}, z, u, 1, V);
    REQUIRE(j.st.ok());
    CHECK(j.loss[0] == doctest::Approx(std::log(2.0)).epsilon(1e-6));
    const auto t = div_rows(est::total_variation{}, z, u, 1, V);
    REQUIRE(t.st.ok());
    CHECK(t.loss[0] == doctest::Approx(1.0).epsilon(1e-6));
  }
  SUBCASE("one-entry student against a full teacher, and the other way round") {
    check_all_divergences(stored<float>(onehot(3, -dinf)), stored<float>(full(0.1)), 1, V, 1, 1);
    check_all_divergences(stored<float>(full(-0.7)), stored<float>(onehot(0, -dinf)), 1, V, 1, 1);
    check_all_divergences(onehot(5, -dinf), full(3.0), 1, V, 1, 1);
  }
  SUBCASE("sampled estimators on one-entry rows: the token at the entry is finite, elsewhere an error") {
    const auto z = stored<float>(onehot(2, -dinf));
    const auto u = stored<float>(full(0.0));
    std::vector<double> loss(1);
    std::vector<float> grad(static_cast<size_t>(V));
    std::vector<int32_t> id = {2};
    auto st = host::sampled_rows(est::sampled<est::k1, est::as_pg_reward>{}, tropd::make_matrix<const float>(z.data(), 1, V),
                                 tropd::make_matrix<const float>(u.data(), 1, V), tropd::view_of(id), {}, tropd::view_of(loss),
                                 tropd::make_matrix(grad.data(), 1, V));
    REQUIRE(st.ok());
    for (float g : grad) CHECK(g == doctest::Approx(0).scale(1e-6));  // p = e_y: e_y - p = 0
    id = {3};
    st = host::sampled_rows(est::sampled<est::k1, est::as_pg_reward>{}, tropd::make_matrix<const float>(z.data(), 1, V),
                            tropd::make_matrix<const float>(u.data(), 1, V), tropd::view_of(id), {}, tropd::view_of(loss),
                            tropd::make_matrix(grad.data(), 1, V));
    CHECK(st.code == errc::infinite_divergence);
    CHECK(st.row == 0);
    CHECK(st.col == 3);
  }
}

TEST_CASE("edges: bf16 and fp16 inputs at their largest finite values") {
  const double bf_max = 3.3895313892515355e38, h_max = 65504.0;
  const tropd::bf16 bmax{0x7f7f}, bmin{0xff7f};
  REQUIRE(double(bmax.to_float()) == bf_max);
  REQUIRE(double(tropd::fp16{0x7bff}.to_float()) == h_max);
  SUBCASE("fp16: +-65504 next to ordinary logits (fp32 work, no overflow)") {
    const index_t V = 5;
    std::vector<tropd::fp16> z = {tropd::fp16{0x7bff}, tropd::fp16::from_float(1), tropd::fp16{0xfbff}, tropd::fp16::from_float(-3),
                                  tropd::fp16::from_float(65000)};
    std::vector<tropd::fp16> u = {tropd::fp16::from_float(65000), tropd::fp16{0x7bff}, tropd::fp16::from_float(0),
                                  tropd::fp16{0xfbff}, tropd::fp16{0x7bff}};
    // fp32 work: log-probs carry ~ eps32 * 65504 = 0.008 absolute error (0.16 at T = 0.05).
    check_all_divergences(z, u, 1, V, 1, 1);
    check_all_divergences(z, z, 1, V, 1, 1);
    check_all_divergences(z, u, 1, V, 20, 0.05);
  }
  SUBCASE("bf16: the largest finite value next to ordinary logits (one-hot at the max)") {
    const index_t V = 4;
    std::vector<tropd::bf16> z = {bmax, tropd::bf16::from_float(1), tropd::bf16::from_float(-2), tropd::bf16::from_float(3)};
    std::vector<tropd::bf16> u = {bmax, tropd::bf16::from_float(0.5), tropd::bf16::from_float(2), tropd::bf16::from_float(-1)};
    // p = q = e_0 exactly in any precision: every divergence is 0, gradients 0.
    check_all_divergences(z, u, 1, V, 1, 1);
    std::vector<double> loss(1);
    std::vector<float> grad(static_cast<size_t>(V));
    std::vector<int32_t> id = {0};
    const auto st = host::sampled_rows(est::sampled<est::k3, est::as_loss>{}, tropd::make_matrix<const tropd::bf16>(z.data(), 1, V),
                                       tropd::make_matrix<const tropd::bf16>(u.data(), 1, V), tropd::view_of(id), {},
                                       tropd::view_of(loss), tropd::make_matrix(grad.data(), 1, V));
    REQUIRE_MESSAGE(st.ok(), st.message());
    CHECK(loss[0] == doctest::Approx(0).scale(1e-6));
    for (float g : grad) CHECK(std::isfinite(g));
  }
  SUBCASE("bf16: +max and -max in the same row: a result (finite) or a documented error, never NaN") {
    const index_t V = 3;
    std::vector<tropd::bf16> z = {bmax, bmin, tropd::bf16::from_float(0)};
    std::vector<tropd::bf16> u = {bmax, tropd::bf16::from_float(1), bmin};
    for (int which = 0; which < 4; ++which) {
      CAPTURE(which);
      rows_out o = which == 0 ? div_rows(est::reverse_kl{}, z, u, 1, V)
                   : which == 1 ? div_rows(est::forward_kl{}, z, u, 1, V)
                   : which == 2 ? div_rows(est::jsd{0.5}, z, u, 1, V)
                                : div_rows(est::total_variation{}, z, u, 1, V);
      // p = q = e_0 (the other entries' mass is e^-3.4e38 = 0): every divergence is 0.
      if (o.st.ok()) {
        CHECK(o.loss[0] == doctest::Approx(0).scale(1e-6));
        for (float g : o.grad) CHECK(std::isfinite(g));
      } else {
        CHECK_MESSAGE(o.st.code != errc::non_finite_input, "finite bf16 input reported as NaN/+inf: ", o.st.message());
      }
    }
  }
}

TEST_CASE("edges: vocabulary sizes 1, 2, 31 and 262144 (divergences, sampled, top-k)") {
  std::mt19937_64 rng(14);
  for (index_t V : {index_t(1), index_t(2), index_t(31), index_t(262144)}) {
    CAPTURE(V);
    const index_t N = 2;
    const auto z = tropd_test::random_rows<float>(rng, N, V, 2.0), u = tropd_test::random_rows<float>(rng, N, V, 2.0);
    // fp32 work; the large vocabulary sums 2.6e5 terms (chunked, merged in double).
    check_all_divergences(z, u, N, V, 1, 1);
    std::vector<double> loss(N);
    std::vector<float> grad(static_cast<size_t>(N * V));
    const std::vector<int32_t> ids = {0, int32_t(V - 1)};
    const auto st = host::sampled_rows(est::sampled<est::k1, est::as_pg_reward>{}, tropd::make_matrix<const float>(z.data(), N, V),
                                       tropd::make_matrix<const float>(u.data(), N, V), tropd::view_of(ids), {}, tropd::view_of(loss),
                                       tropd::make_matrix(grad.data(), N, V));
    REQUIRE_MESSAGE(st.ok(), st.message());
    for (index_t r = 0; r < N; ++r) {
      const vec zr = tropd_test::row_ld(z, r, V), ur = tropd_test::row_ld(u, r, V);
      const vec ls = naive::log_softmax(zr), lt = naive::log_softmax(ur);
      const auto sv = naive::sampled(naive::est::k1, naive::usage::pg_reward, ls[size_t(ids[size_t(r)])], ls[size_t(ids[size_t(r)])],
                                     lt[size_t(ids[size_t(r)])]);
      CHECK(tropd_test::close_value(loss[size_t(r)], sv.loss, 1e-4L));
      CHECK(tropd_test::grad_rel_err(grad.data() + r * V, naive::sampled_logit_grad(sv.dloss_ds, ids[size_t(r)], zr)) < 1e-4L);
    }
    // Top-64 (k > V for the small vocabularies: the list is the whole vocabulary).
    const auto st2 = host::topk_forward_kl_rows(est::topk_forward_kl{64, est::topk_tail::renormalised},
                                                tropd::make_matrix<const float>(z.data(), N, V),
                                                tropd::make_matrix<const float>(u.data(), N, V), tropd::view_of(loss),
                                                tropd::make_matrix(grad.data(), N, V));
    REQUIRE_MESSAGE(st2.ok(), st2.message());
    for (index_t r = 0; r < N; ++r) {
      const vec zr = tropd_test::row_ld(z, r, V), lt = naive::log_softmax(tropd_test::row_ld(u, r, V));
      const auto ids64 = naive::topk_ids(lt, 64);
      vec lq;
      for (int id : ids64) lq.push_back(lt[size_t(id)]);
      const auto ref = naive::topk_forward_kl(zr, ids64, lq, naive::tail::renormalised);
      CHECK(tropd_test::close_value(loss[size_t(r)], ref.value, 1e-4L));
      CHECK(tropd_test::grad_rel_err(grad.data() + r * V, ref.grad) < 1e-3L);
    }
  }
}

// ===========================================================================
// Zero teacher mass at the sampled token; a student without mass on the teacher's top-k.
// ===========================================================================

TEST_CASE("edges: a teacher with zero mass at the sampled token (OPD errors, TrOPD: finite outlier term)") {
  // Token level: three student tokens, the middle one with t = -inf.
  tokens tk;
  tk.s = {-1.2f, -0.7f, -2.0f};
  tk.t = {-1.0f, -finf, -2.5f};
  tk.from = {tropd::origin::student, tropd::origin::student, tropd::origin::student};
  tk.off = {0, 3};
  tk.K = 3;
  tk.ids = {4, 7, 1, 2, 9, 3, 0, 5, 8};
  tk.lq = {-0.4f, -1.6f, -2.2f, -0.3f, -1.9f, -2.9f, -1.1f, -1.2f, -1.3f};
  tk.ls = {-1.5f, -2.5f, -0.9f, -3.0f, -0.8f, -1.7f, -2.0f, -2.1f, -0.6f};
  const auto opd = run_tokens(tropd::presets::opd(), tk);
  CHECK(opd.st.code == errc::infinite_divergence);
  CHECK(opd.st.row == 1);
  CHECK(opd.dlds[0] == 777.f);  // nothing written
  for (auto form : {tropd::outliers::fkl_form::c, tropd::outliers::fkl_form::p}) {
    CAPTURE(int(form));
    const auto o = tropd::presets::tropd({.beta = 1e-3, .k = 3, .form = form});
    const auto r = run_tokens(o, tk);
    REQUIRE_MESSAGE(r.st.ok(), r.st.message());
    CHECK((r.flags[1] & tropd::flags::outlier) != 0);  // R = -inf is always an outlier
    CHECK(r.d.n_zero_teacher_mass == 1);
    CHECK(std::isfinite(r.loss));
    for (float g : r.dlds) CHECK(std::isfinite(g));
    // Against the naive objective with the library's decisions.
    no::batch nb;
    nb.offsets = {0, 3};
    for (int i = 0; i < 3; ++i) {
      no::token x;
      x.from = no::who::student;
      x.s = x.s_old = tk.s[size_t(i)];
      x.t = tk.t[size_t(i)];
      for (int k = 0; k < 3; ++k) {
        x.ids.push_back(tk.ids[size_t(i * 3 + k)]);
        x.lq.push_back(tk.lq[size_t(i * 3 + k)]);
        x.ls.push_back(tk.ls[size_t(i * 3 + k)]);
      }
      nb.tok.push_back(x);
    }
    std::vector<char> given;
    for (uint8_t f : r.flags) given.push_back((f & tropd::flags::trusted) ? 1 : 0);
    const auto ref = no::evaluate(no::tropd(1e-3L, form == tropd::outliers::fkl_form::c), nb, given);
    CHECK(r.loss == doctest::Approx(double(ref.loss)).epsilon(1e-6));
    for (int i = 0; i < 3; ++i) CHECK(r.dlds[size_t(i)] == doctest::Approx(double(ref.w[size_t(i)] * ref.tok[size_t(i)].dlds)).epsilon(1e-5));
  }
  // Row level: the sampled token's teacher logit is -inf.
  const index_t n = 2, V = 8;
  std::vector<double> z = {0.1, 1.2, -0.3, 0.8, 2.0, -1.0, 0.4, 0.0, 1.0, 0.2, 0.3, -0.5, 0.9, 1.5, -2.0, 0.7};
  std::vector<double> u = {0.5, -dinf, 0.1, 1.8, 1.0, -0.2, 0.0, 0.6, 0.2, 0.9, -1.0, 0.4, 1.1, 0.3, 0.8, -0.4};
  const std::vector<int32_t> y = {1, 5};
  const std::vector<tropd::origin> from = {tropd::origin::student, tropd::origin::student};
  const std::vector<index_t> off = {0, 2};
  host::row_inputs rt;
  rt.ids = tropd::view_of(y);
  rt.from = tropd::view_of(from);
  rt.seq_offsets = tropd::view_of(off);
  std::vector<float> grad(static_cast<size_t>(n * V), 777.f), dlds(n);
  std::vector<uint8_t> flags(n);
  tropd::token_outputs tout;
  tout.dloss_ds = tropd::view_of(dlds);
  tout.flags = tropd::view_of(flags);
  double loss = 0;
  auto st = host::evaluate_rows(tropd::presets::opd(), tropd::make_matrix<const double>(z.data(), n, V),
                                tropd::make_matrix<const double>(u.data(), n, V), rt,
                                host::row_outputs<>{.grad = tropd::make_matrix(grad.data(), n, V), .loss = &loss});
  CHECK(st.code == errc::infinite_divergence);
  CHECK(st.row == 0);
  CHECK(grad[0] == 777.f);
  const auto trop = tropd::presets::tropd({.beta = 1e-3, .k = 4});
  st = host::evaluate_rows(trop, tropd::make_matrix<const double>(z.data(), n, V), tropd::make_matrix<const double>(u.data(), n, V), rt,
                           host::row_outputs<>{.grad = tropd::make_matrix(grad.data(), n, V), .loss = &loss, .dloss_ds = tout.dloss_ds,
                                               .flags = tout.flags});
  REQUIRE_MESSAGE(st.ok(), st.message());
  CHECK((flags[0] & tropd::flags::outlier) != 0);
  std::vector<vec> zr, ur;
  for (index_t r = 0; r < n; ++r) {
    zr.push_back(vec(z.begin() + r * V, z.begin() + (r + 1) * V));
    ur.push_back(vec(u.begin() + r * V, u.begin() + (r + 1) * V));
  }
  std::vector<char> given;
  for (uint8_t f : flags) given.push_back((f & tropd::flags::trusted) ? 1 : 0);
  const auto ref = no::evaluate_rows(no::tropd(1e-3L), zr, ur, {1, 5}, {no::who::student, no::who::student}, {0, 2}, 4, {}, given);
  CHECK(loss == doctest::Approx(double(ref.tokens.loss)).epsilon(1e-6));
  for (index_t r = 0; r < n; ++r) {
    for (index_t v = 0; v < V; ++v) REQUIRE(std::isfinite(grad[size_t(r * V + v)]));
    CHECK(tropd_test::grad_rel_err(grad.data() + r * V, ref.grad[size_t(r)]) < 1e-5L);
  }
}

TEST_CASE("edges: B6 in the row-level objective: evaluate_rows passes the exact student tail to the tail bucket") {
  // Every token an outlier (log_ratio_threshold with tau = 1e30), the outlier term a
  // tail-bucket top-4 FKL in form P. Teacher top-4 = ids {0, 3, 4, 7} (S_K ~ 0.8, so the
  // teacher tail is not empty); the sampled token is id 0 (in the list).
  //  (a) the student's other entries are -inf: no mass outside the list: infinite_divergence;
  //  (b) they are -40: a student tail ~1e-18, far below what the listed fp32 log-probs
  //      resolve: the loss equals the token-level evaluation given the same token data and
  //      the tail computed here in long double (token_batch::topk_student_tail_log).
  tropd::objective<tropd::regions::log_ratio_threshold, est::k1_reward, tropd::outliers::topk_fkl, tropd::clippers::pg_clip> obj;
  obj.region.tau = 1e30;
  obj.outlier.fkl = est::topk_forward_kl{4, est::topk_tail::tail_bucket};
  obj.outlier.form = tropd::outliers::fkl_form::p;
  const index_t V = 8;
  const std::vector<int32_t> top = {0, 3, 4, 7};
  const std::vector<double> u = {2.0, -1.0, -0.5, 1.5, 1.2, 0.4, 0.0, 1.0};
  const std::vector<int32_t> y = {0};
  const std::vector<tropd::origin> from = {tropd::origin::student};
  const std::vector<index_t> off = {0, 1};
  host::row_inputs rt;
  rt.ids = tropd::view_of(y);
  rt.from = tropd::view_of(from);
  rt.seq_offsets = tropd::view_of(off);
  for (const double other : {-dinf, -40.0}) {
    CAPTURE(other);
    std::vector<double> z(V, other);
    const std::vector<double> zk = {0.3, -0.2, 0.5, 0.1};
    for (size_t i = 0; i < 4; ++i) z[size_t(top[i])] = zk[i];
    std::vector<float> grad(size_t(V), 777.f);
    double loss = 12345.0;
    const auto st = host::evaluate_rows(obj, tropd::make_matrix<const double>(z.data(), 1, V), tropd::make_matrix<const double>(u.data(), 1, V),
                                        rt, host::row_outputs<>{.grad = tropd::make_matrix(grad.data(), 1, V), .loss = &loss});
    if (other == -dinf) {
      CHECK_MESSAGE(st.code == errc::infinite_divergence, (st.ok() ? std::string("ok") : st.message()));
      CHECK(st.row == 0);
      CHECK(loss == 12345.0);
      continue;
    }
    REQUIRE_MESSAGE(st.ok(), st.message());
    ld lse_s = 0, lse_t = 0;
    for (index_t v = 0; v < V; ++v) {
      lse_s += std::exp(ld(z[size_t(v)]));
      lse_t += std::exp(ld(u[size_t(v)]));
    }
    lse_s = std::log(lse_s);
    lse_t = std::log(lse_t);
    ld tail = 0;
    for (index_t v : {1, 2, 5, 6}) tail += std::exp(ld(z[size_t(v)]) - lse_s);
    tokens tk;
    tk.s = {float(ld(z[0]) - lse_s)};
    tk.t = {float(ld(u[0]) - lse_t)};
    tk.from = {tropd::origin::student};
    tk.off = {0, 1};
    tk.K = 4;
    tk.ids = top;
    for (int32_t id : top) {
      tk.lq.push_back(float(ld(u[size_t(id)]) - lse_t));
      tk.ls.push_back(float(ld(z[size_t(id)]) - lse_s));
    }
    const std::vector<double> tail_log = {double(std::log(tail))};
    tropd::token_batch b = tk.view();
    b.topk_student_tail_log = tropd::view_of(tail_log);
    std::vector<float> dlds(1);
    tropd::token_outputs out;
    out.dloss_ds = tropd::view_of(dlds);
    double want = 0;
    out.loss = &want;
    const auto st_tok = host::evaluate_tokens(obj, b, out);
    REQUIRE_MESSAGE(st_tok.ok(), st_tok.message());
    CHECK(std::isfinite(loss));
    CHECK(loss == doctest::Approx(want).epsilon(1e-6));
    CHECK(loss > 0.1 * 30);  // (1 - S_K) log((1 - S_K) / tail) with a tail ~1e-18: tens of nats
  }
}

TEST_CASE("edges: a student with almost no mass on the teacher's top-k (form C: large but finite advantage; the clamp bounds it)") {
  // One outlier token (t = -inf) whose student log-probs at the teacher's top-3 are ~ -1e4.
  tokens tk;
  tk.s = {-0.01f};
  tk.t = {-finf};
  tk.from = {tropd::origin::student};
  tk.off = {0, 1};
  tk.K = 3;
  tk.ids = {10, 11, 12};
  tk.lq = {-0.5f, -1.2f, -2.0f};
  tk.ls = {-1e4f, -1.2e4f, -9e3f};
  const auto r = run_tokens(tropd::presets::tropd({.beta = 0, .k = 3}), tk);
  REQUIRE_MESSAGE(r.st.ok(), r.st.message());
  // A = -FKL_k ~ -1.05e4 (renormalised qk . (log qk - ls)); L = -rho A = -A; dL/ds = -A.
  const ld SK = std::exp(-0.5L) + std::exp(-1.2L) + std::exp(-2.0L);
  ld fkl = 0;
  for (int k = 0; k < 3; ++k) {
    const ld lqk = ld(tk.lq[size_t(k)]) - std::log(SK);
    fkl += std::exp(lqk) * (lqk - ld(tk.ls[size_t(k)]));
  }
  CHECK(r.adv[0] == doctest::Approx(double(-fkl)).epsilon(1e-6));
  CHECK(r.loss == doctest::Approx(double(fkl)).epsilon(1e-6));
  CHECK(r.dlds[0] == doctest::Approx(double(fkl)).epsilon(1e-6));
  CHECK(std::isfinite(r.dlds[0]));
  // With the clamp c_max = 5: A = -5, flagged as clipped.
  const auto rc = run_tokens(tropd::presets::tropd({.beta = 0, .k = 3, .form = tropd::outliers::fkl_form::c, .clamp = 5.0}), tk);
  REQUIRE(rc.st.ok());
  CHECK(rc.adv[0] == doctest::Approx(-5.0));
  CHECK(rc.loss == doctest::Approx(5.0));
  CHECK((rc.flags[0] & tropd::flags::adv_clipped) != 0);
  // Even more extreme (log-probs ~ -3e38): the advantage is ~3e38, still finite in the
  // library's double arithmetic and in the fp32 outputs, or reported as an error.
  tk.ls = {-3e38f, -3e38f, -3e38f};
  const auto rx = run_tokens(tropd::presets::tropd({.beta = 0, .k = 3}), tk);
  if (rx.st.ok()) {
    CHECK(std::isfinite(rx.loss));
    CHECK(std::isfinite(rx.adv[0]));
    CHECK(std::isfinite(rx.dlds[0]));
  } else {
    CHECK(rx.st.code == errc::infinite_divergence);
  }
}

// ===========================================================================
// Known issues (docs/robustness.md, "Known issues"): each fails until fixed.
// ===========================================================================

TEST_CASE("edges: fixed issue B2: renormalised top-k lists with log-probs above 709 give NaN with an ok status") {
  // "For renormalised the list need not be normalised": a list of raw logits (> 709) is a
  // legal renormalised list; its renormalised distribution is softmax([800, 0]).
  const index_t V = 3;
  std::vector<float> z = {0.f, 1.f, 2.f};
  std::vector<int32_t> ids = {0, 1};
  std::vector<float> lq = {800.f, 0.f};
  std::vector<double> loss(1, 12345.0);
  std::vector<float> grad(V);
  const host::topk_lists tl{tropd::make_matrix<const int32_t>(ids.data(), 1, 2), tropd::make_matrix<const float>(lq.data(), 1, 2)};
  const auto st = host::topk_forward_kl_rows(est::topk_forward_kl{2, est::topk_tail::renormalised}, tropd::make_matrix<const float>(z.data(), 1, V),
                                             tl, tropd::view_of(loss), tropd::make_matrix(grad.data(), 1, V));
  // Reference: qk = softmax([800, 0]) = (1, e^-800); FKL = sum qk (log qk - ls).
  const auto ref = naive::topk_forward_kl(vec{0, 1, 2}, {0, 1}, vec{0, -800}, naive::tail::renormalised);
  REQUIRE_MESSAGE(st.ok(), st.message());
  CHECK_MESSAGE(std::isfinite(loss[0]), "B2: loss ", loss[0]);
  CHECK(loss[0] == doctest::Approx(double(ref.value)).epsilon(1e-6));
  for (index_t v = 0; v < V; ++v) CHECK(grad[size_t(v)] == doctest::Approx(double(ref.grad[size_t(v)])).epsilon(1e-5));
}

TEST_CASE("edges: fixed issue B3: top-k lists whose log-probs are all below -745 are rejected as 'no finite entry'") {
  const index_t V = 3;
  std::vector<float> z = {0.f, 1.f, 2.f};
  std::vector<int32_t> ids = {0, 2};
  std::vector<float> lq = {-800.f, -801.f};  // finite: renormalised = softmax([-800, -801])
  std::vector<double> loss(1);
  const host::topk_lists tl{tropd::make_matrix<const int32_t>(ids.data(), 1, 2), tropd::make_matrix<const float>(lq.data(), 1, 2)};
  const auto st = host::topk_forward_kl_rows(est::topk_forward_kl{2, est::topk_tail::renormalised}, tropd::make_matrix<const float>(z.data(), 1, V),
                                             tl, tropd::view_of(loss));
  const auto ref = naive::topk_forward_kl(vec{0, 1, 2}, {0, 2}, vec{0, -1}, naive::tail::renormalised);
  REQUIRE_MESSAGE(st.ok(), "B3: ", st.message());
  CHECK(loss[0] == doctest::Approx(double(ref.value)).epsilon(1e-6));
}

TEST_CASE("edges: fp32 token outputs never overflow silently (B4, fixed)") {
  // s - s_old = 100: rho = e^100 = 2.7e43; L = -rho A is finite in double, but dL/ds does
  // not fit the fp32 output: the call must report it rather than write -inf.
  tokens tk;
  tk.s = {-0.01f};
  tk.s_old = {-100.01f};
  tk.t = {-1.0f};
  tk.from = {tropd::origin::student};
  tk.off = {0, 1};
  const auto r = run_tokens(tropd::presets::opd(), tk);
  if (r.st.ok()) {
    CHECK_MESSAGE(std::isfinite(r.dlds[0]), "B4: dL/ds written as ", r.dlds[0], " with an ok status");
  } else {
    CHECK(r.st.code == errc::infinite_divergence);
    CHECK(r.st.row == 0);
    CHECK(r.dlds[0] == 777.f);
  }
}

TEST_CASE("edges: fixed issue K4: row gradients that overflow fp32 were written as inf / NaN with an ok status") {
  // A sampled estimator whose dL/ds * grad_scale / T_S exceeds fp32 in the gradient rows.
  const index_t V = 4;
  std::vector<float> z = {0.f, 1.f, 2.f, 3.f}, u = {3.f, 2.f, 1.f, 0.f};
  std::vector<int32_t> id = {0};
  std::vector<double> s_old = {-200.0}, loss(1), gs = {1e20};
  std::vector<float> grad(V, 777.f);
  host::row_options opt;
  opt.student_temperature = 0.05;
  const auto st = host::sampled_rows(est::sampled<est::k2, est::as_loss>{}, tropd::make_matrix<const float>(z.data(), 1, V),
                                     tropd::make_matrix<const float>(u.data(), 1, V), tropd::view_of(id), tropd::view_of(s_old),
                                     tropd::view_of(loss), tropd::make_matrix(grad.data(), 1, V), opt, tropd::view_of(gs));
  // dL/ds = s - t ~ -59 (s at temperature 0.05, t at 1), scale 1e20 / 0.05 = 2e21: |grad| ~ 1e23 fits fp32.
  REQUIRE_MESSAGE(st.ok(), st.message());
  for (float g : grad) CHECK(std::isfinite(g));
  // Now |grad| ~ 1e39 > FLT_MAX in row 2 of 4: the documented rule (docs/robustness.md) is
  // infinite_divergence naming the row and the first column that does not fit, the losses
  // untouched; gradient rows may be partly written (the overflow is found while writing).
  const index_t N = 4;
  std::vector<float> z4, u4;
  for (index_t r = 0; r < N; ++r) {
    z4.insert(z4.end(), z.begin(), z.end());
    u4.insert(u4.end(), u.begin(), u.end());
  }
  std::vector<int32_t> id4(N, 0);
  std::vector<double> s_old4(N, -200.0), loss4(N, 12345.0), gs4 = {1.0, 1e20, 1e37, 1.0};
  std::vector<float> grad4(size_t(N * V), 777.f);
  for (const bool fused : {false, true}) {
    opt.order = fused ? tropd::host::row_order::single_read : tropd::host::row_order::validate_first;
    const auto st2 = host::sampled_rows(est::sampled<est::k2, est::as_loss>{}, tropd::make_matrix<const float>(z4.data(), N, V),
                                        tropd::make_matrix<const float>(u4.data(), N, V), tropd::view_of(id4), tropd::view_of(s_old4),
                                        tropd::view_of(loss4), tropd::make_matrix(grad4.data(), N, V), opt, tropd::view_of(gs4));
    CHECK_MESSAGE(st2.code == errc::infinite_divergence, "K4: ", st2.ok() ? "ok status" : st2.message());
    CHECK(st2.row == 2);
    CHECK(st2.col == 0);
    CHECK(std::string(st2.message()).find("output type") != std::string::npos);
    for (double l : loss4) CHECK(l == 12345.0);
  }
  // fp64 gradients of fp64 rows hold it: |grad| ~ 1e39 is finite in double.
  std::vector<double> zd(z4.begin(), z4.end()), ud(u4.begin(), u4.end()), gd(size_t(N * V));
  opt.order = tropd::host::row_order::validate_first;
  const auto st3 = host::sampled_rows(est::sampled<est::k2, est::as_loss>{}, tropd::make_matrix<const double>(zd.data(), N, V),
                                      tropd::make_matrix<const double>(ud.data(), N, V), tropd::view_of(id4), tropd::view_of(s_old4),
                                      tropd::view_of(loss4), tropd::make_matrix(gd.data(), N, V), opt, tropd::view_of(gs4));
  REQUIRE_MESSAGE(st3.ok(), st3.message());
  for (double g : gd) CHECK(std::isfinite(g));
  CHECK(std::fabs(gd[size_t(2 * V)]) > 1e38);
}

TEST_CASE("edges: fixed issue D2: which row a gradient overflow reports, in both orders") {
  // Rows 1 and 3 overflow fp32 in the gradient (grad_scale 1e37 at T_S = 0.05). Both orders
  // and both thread counts report row 1, the first in row order. With a statistics error in
  // row 3 instead (NaN), the default order reports row 3 (statistics errors come first, as
  // documented; nothing is written) and the fused order row 1 (it reaches row 1 first).
  const index_t N = 4, V = 4;
  std::vector<float> z, u;
  for (index_t r = 0; r < N; ++r)
    for (index_t v = 0; v < V; ++v) {
      z.push_back(float(v));
      u.push_back(float(V - 1 - v));
    }
  std::vector<int32_t> id(N, 0);
  std::vector<double> s_old(N, -200.0), gs = {1.0, 1e37, 1.0, 1e37};
  auto run = [&](bool fused, int threads, std::vector<float>& g, std::vector<double>& loss) {
    host::row_options opt;
    opt.student_temperature = 0.05;
    opt.order = fused ? tropd::host::row_order::single_read : tropd::host::row_order::validate_first;
    opt.threads = threads;
    return host::sampled_rows(est::sampled<est::k2, est::as_loss>{}, tropd::make_matrix<const float>(z.data(), N, V),
                              tropd::make_matrix<const float>(u.data(), N, V), tropd::view_of(id), tropd::view_of(s_old),
                              tropd::view_of(loss), tropd::make_matrix(g.data(), N, V), opt, tropd::view_of(gs));
  };
  for (const bool fused : {false, true})
    for (const int threads : {1, 2}) {
      CAPTURE(fused);
      CAPTURE(threads);
      std::vector<float> g(size_t(N * V), 777.f);
      std::vector<double> loss(N, 12345.0);
      const auto st = run(fused, threads, g, loss);
      CHECK(st.code == errc::infinite_divergence);
      CHECK(st.row == 1);
      for (double l : loss) CHECK(l == 12345.0);
    }
  gs[3] = 1.0;
  z[size_t(3 * V + 2)] = std::numeric_limits<float>::quiet_NaN();
  for (const bool fused : {false, true}) {
    CAPTURE(fused);
    std::vector<float> g(size_t(N * V), 777.f);
    std::vector<double> loss(N, 12345.0);
    const auto st = run(fused, 1, g, loss);
    if (fused) {
      CHECK(st.code == errc::infinite_divergence);
      CHECK(st.row == 1);
    } else {
      CHECK(st.code == errc::non_finite_input);
      CHECK(st.row == 3);
      CHECK(st.col == 2);
      for (float x : g) CHECK(x == 777.f);
    }
  }
}

TEST_CASE("edges: fixed issue B5: k far above V is not clamped (buffers of rows x k entries)") {
#if defined(__unix__) && !defined(TROPD_TEST_SANITIZED)
  // In a child process with a 1 GiB address-space limit: k = INT_MAX must behave like k = V
  // (the list is the whole vocabulary), not allocate 2^31 entries per row.
  const index_t V = 5;
  std::vector<float> z = {0.f, 1.f, -1.f, 0.5f, 2.f}, u = {1.f, 0.f, 2.f, -1.f, 0.3f};
  std::vector<double> want(1), got(1);
  REQUIRE(host::topk_forward_kl_rows(est::topk_forward_kl{int(V)}, tropd::make_matrix<const float>(z.data(), 1, V),
                                     tropd::make_matrix<const float>(u.data(), 1, V), tropd::view_of(want))
              .ok());
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    rlimit lim{};
    getrlimit(RLIMIT_AS, &lim);
    lim.rlim_cur = rlim_t(1) << 30;
    setrlimit(RLIMIT_AS, &lim);
    int code = 3;
    try {
      const auto st = host::topk_forward_kl_rows(est::topk_forward_kl{INT_MAX}, tropd::make_matrix<const float>(z.data(), 1, V),
                                                 tropd::make_matrix<const float>(u.data(), 1, V), tropd::view_of(got));
      code = st.ok() ? (std::fabs(got[0] - want[0]) <= 1e-9 * (1 + std::fabs(want[0])) ? 0 : 1) : 2;
    } catch (...) {
      code = 4;  // std::bad_alloc
    }
    _exit(code);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 100 + WTERMSIG(status);
  const std::string what = code == 4 ? "std::bad_alloc (buffers sized by k)"
                           : code == 1 ? "a result different from k = V"
                           : code == 2 ? "an error status"
                                       : "a crash";
  CHECK_MESSAGE(code == 0, "B5: k = INT_MAX gives ", what, " (child exit ", code, ")");
#else
  MESSAGE("B5 check skipped under sanitizers (it limits the address space)");
#endif
}

TEST_CASE("edges: fixed issue B6: tail bucket with a student that has no mass outside the list") {
  // The student's entries outside the teacher's top-3 are -inf: 1 - P_K = 0 while the
  // teacher's tail is ~0.3: the tail bucket term is infinite (documented: infinite_divergence).
  // The library computes 1 - P_K from rounded log-probs and returns ~4.26.
  const index_t V = 5;
  std::vector<float> z = {0.f, 0.f, -finf, -finf, 0.7f};
  std::vector<float> u = {0.5f, 0.4f, 0.1f, -0.2f, 0.45f};  // top-3: ids 0, 4, 1, where the student has all its mass
  std::vector<double> loss(1, 12345.0);
  const auto st = host::topk_forward_kl_rows(est::topk_forward_kl{3, est::topk_tail::tail_bucket}, tropd::make_matrix<const float>(z.data(), 1, V),
                                             tropd::make_matrix<const float>(u.data(), 1, V), tropd::view_of(loss));
  CHECK_MESSAGE(st.code == errc::infinite_divergence, "B6: got ", st.ok() ? "ok, loss " + std::to_string(loss[0]) : st.message());
}

TEST_CASE("edges: fixed issue B8: a finite logit near -DBL_MAX (finfo.min masking) shifts KL by O(1)") {
  // Student entry 1 masked with -DBL_MAX instead of -inf; the teacher gives it ~e^-800.
  // Mathematically its contribution is ~e^-800 * 1.8e308 ~ 1e-40: both KLs equal those of
  // the rows without that entry.
  const index_t V = 3;
  std::vector<double> z = {0.0, -std::numeric_limits<double>::max(), 0.2};
  std::vector<double> u = {0.0, -800.0, 0.4};
  const auto f = div_rows(est::forward_kl{}, z, u, 1, V);
  const auto r = div_rows(est::reverse_kl{}, z, u, 1, V);
  const auto fref = naive::forward_kl(vec{0, -ldinf, 0.2L}, vec{0, -ldinf, 0.4L});
  const auto rref = naive::reverse_kl(vec{0, -ldinf, 0.2L}, vec{0, -ldinf, 0.4L});
  REQUIRE(f.st.ok());
  REQUIRE(r.st.ok());
  CHECK_MESSAGE(f.loss[0] == doctest::Approx(double(fref.value)).epsilon(1e-9), "B8: forward KL ", f.loss[0], " vs ", double(fref.value));
  CHECK_MESSAGE(r.loss[0] == doctest::Approx(double(rref.value)).epsilon(1e-9), "B8: reverse KL ", r.loss[0], " vs ", double(rref.value));
}

TEST_CASE("edges: fixed issue K1: the infinite-divergence rule follows supports, not exp underflow (fp32 vs fp64)") {
  // Student [0, -200], teacher [0, -inf]: p_1 = e^-200 > 0 = q_1, so KL(p || q) = +inf
  // (docs/estimators.md: "reverse KL with q_v = 0 < p_v reports infinite_divergence").
  // The same logits stored as fp64 and as fp32 must give the same answer.
  const std::vector<double> zd = {0.0, -200.0}, ud = {0.0, -dinf};
  const auto d = div_rows(est::reverse_kl{}, zd, ud, 1, 2);
  const auto f = div_rows(est::reverse_kl{}, stored<float>(zd), stored<float>(ud), 1, 2);
  CHECK(d.st.code == errc::infinite_divergence);
  CHECK_MESSAGE(f.st.code == errc::infinite_divergence, "K1: fp32 rows give ", f.st.ok() ? "ok, loss " + std::to_string(f.loss[0]) : f.st.message());
}

TEST_CASE("edges: K1 across chunks and types: a support mismatch stays infinite through re-centring") {
  // V = 3000 (three chunks). Entry 5: student -200 (fp32: e^-200 underflows), teacher -inf.
  // Entry 2900: student +800, so the first chunks' sums are re-centred by e^-800 (0 in fp64).
  // KL(p || q) = +inf for every storage type; KL(q || p) is finite (the teacher has no mass
  // where the student has none) and must match the long-double reference.
  const index_t V = 3000;
  std::vector<double> zd(V), ud(V);
  for (index_t j = 0; j < V; ++j) {
    zd[size_t(j)] = 0.01 * double(j % 17);
    ud[size_t(j)] = -0.02 * double(j % 13);
  }
  zd[5] = -200.0;
  ud[5] = -dinf;
  zd[2900] = 800.0;
  ud[2900] = 3.0;
  CHECK(div_rows(est::reverse_kl{}, zd, ud, 1, V).st.code == errc::infinite_divergence);
  CHECK(div_rows(est::reverse_kl{}, stored<float>(zd), stored<float>(ud), 1, V).st.code == errc::infinite_divergence);
  CHECK(div_rows(est::reverse_kl{}, stored<tropd::bf16>(zd), stored<tropd::bf16>(ud), 1, V).st.code == errc::infinite_divergence);
  // The other direction: the teacher -inf where the student is finite is harmless for KL(q || p).
  vec zl(zd.begin(), zd.end()), ul(ud.begin(), ud.end());
  const auto fref = naive::forward_kl(zl, ul);
  for (const auto& o : {div_rows(est::forward_kl{}, zd, ud, 1, V), div_rows(est::forward_kl{}, stored<float>(zd), stored<float>(ud), 1, V)}) {
    REQUIRE_MESSAGE(o.st.ok(), o.st.message());
    CHECK(o.loss[0] == doctest::Approx(double(fref.value)).epsilon(1e-5).scale(1e-6));
  }
  // Swapped roles: the student -inf where the teacher has mass makes KL(q || p) infinite.
  CHECK(div_rows(est::forward_kl{}, stored<float>(ud), stored<float>(zd), 1, V).st.code == errc::infinite_divergence);
}

TEST_CASE("edges: fixed issue R1: finite logits whose scaled value overflows were reported as NaN/+inf") {
  // 3e38 / 0.05 overflows fp32: the input is finite, the maths too (p = q = e_0).
  std::vector<float> z = {3e38f, 0.f}, u = {3e38f, 0.f};
  const auto o = div_rows(est::reverse_kl{}, z, u, 1, 2, 0.05, 0.05);
  CHECK_MESSAGE(o.st.code != errc::non_finite_input, "R1: ", o.st.message());
  if (o.st.ok()) CHECK(o.loss[0] == doctest::Approx(0).scale(1e-6));
  // The rule: a finite input that overflows only once scaled is `unsupported`, naming the
  // position and the remedy; a NaN / +inf input stays non_finite_input, at its position.
  CHECK(o.st.code == errc::unsupported);
  CHECK(o.st.row == 0);
  CHECK(o.st.col == 0);
  CHECK(std::string(o.st.message()).find("temperature") != std::string::npos);
  std::vector<float> u2 = {0.f, 3e38f}, z2 = {0.f, 1.f};
  const auto o2 = div_rows(est::reverse_kl{}, z2, u2, 1, 2, 1.0, 0.05);
  CHECK(o2.st.code == errc::unsupported);
  CHECK(o2.st.col == 1);
  CHECK(std::string(o2.st.message()).find("teacher") != std::string::npos);
  std::vector<float> z3 = {0.f, std::numeric_limits<float>::quiet_NaN()};
  const auto o3 = div_rows(est::reverse_kl{}, z3, z2, 1, 2, 0.05, 0.05);
  CHECK(o3.st.code == errc::non_finite_input);
  CHECK(o3.st.col == 1);
  // R3: a finite logit that scales to -inf is not "zero mass" either: student [0, -3.3e38]
  // against teacher [0, -inf] at T = 0.05 is unsupported at column 1 (at T = 1 the same rows
  // are an infinite reverse KL), and a row of two such logits is not "-inf everywhere".
  std::vector<float> z4 = {0.f, -3.3e38f}, u4 = {0.f, -finf};
  const auto o4 = div_rows(est::reverse_kl{}, z4, u4, 1, 2, 0.05, 0.05);
  CHECK(o4.st.code == errc::unsupported);
  CHECK(o4.st.col == 1);
  CHECK(div_rows(est::reverse_kl{}, z4, u4, 1, 2).st.code == errc::infinite_divergence);
  std::vector<float> z5 = {-3.3e38f, -3.3e38f};
  const auto o5 = div_rows(est::reverse_kl{}, z5, z2, 1, 2, 0.05, 1.0);
  CHECK(o5.st.code == errc::unsupported);
  CHECK(o5.st.col == 0);
  // A -inf input at T = 0.05 stays zero mass: KL([0, -inf] || [0, -inf]) = 0.
  std::vector<float> z6 = {0.f, -finf};
  const auto o6 = div_rows(est::reverse_kl{}, z6, z6, 1, 2, 0.05, 0.05);
  REQUIRE_MESSAGE(o6.st.ok(), o6.st.message());
  CHECK(o6.loss[0] == doctest::Approx(0).scale(1e-12));
  // In fp64 the same logits are fine: p = q = e_0 at T = 0.05.
  std::vector<double> zd = {3e38, 0.0};
  const auto od = div_rows(est::reverse_kl{}, zd, zd, 1, 2, 0.05, 0.05);
  REQUIRE_MESSAGE(od.st.ok(), od.st.message());
  CHECK(od.loss[0] == doctest::Approx(0).scale(1e-12));
}

TEST_CASE("edges: B6: tail bucket with a student tail of ~1e-15 (value and gradient without cancellation)") {
  // V = 3000; the teacher's top-10 ids carry student logit 40, every other entry 0 (and a
  // few -inf). Student tail T = n_out e^-40 / (10 + n_out e^-40) ~ 1.3e-15: far below what
  // 1 - P_K resolves in double. Teacher list: 0.09 per id (S_K = 0.9, tail 0.1).
  // Reference, computed here in long double without 1 - P_K:
  //   value = sum_K q (log q - ls) + (1 - S_K) (log(1 - S_K) - log T)
  //   dL/dz_j = p_j - q_j on K;  p_j (S_K - P_K) / T = p_j (1 - (1 - S_K) / T) off K.
  const index_t V = 3000;
  const int K = 10;
  std::vector<double> z(V, 0.0), u(V, -5.0);
  std::vector<int32_t> ids;
  for (int i = 0; i < K; ++i) ids.push_back(int32_t(7 + 300 * i));
  for (int32_t id : ids) {
    z[size_t(id)] = 40.0;
    u[size_t(id)] = 10.0;
  }
  index_t n_out = 0;
  for (index_t j = 0; j < V; ++j) {
    if (z[size_t(j)] == 40.0) continue;
    if (j % 97 == 3) z[size_t(j)] = -dinf;
    else ++n_out;
  }
  const ld e40 = std::exp(-40.0L), lse = 40.0L + std::log(ld(K) + ld(n_out) * e40);
  const ld T = ld(n_out) * e40 / (ld(K) + ld(n_out) * e40), SK = 0.9L, q = SK / K;
  ld want = 0;
  for (int i = 0; i < K; ++i) want += q * (std::log(q) - (40.0L - lse));
  want += (1 - SK) * (std::log(1 - SK) - std::log(T));
  std::vector<ld> gref(V);
  for (index_t j = 0; j < V; ++j) {
    const ld p = z[size_t(j)] == -dinf ? 0.0L : std::exp(ld(z[size_t(j)]) - lse);
    gref[size_t(j)] = z[size_t(j)] == 40.0 ? p - q : p * (1 - (1 - SK) / T);
  }
  std::vector<float> lq(K, float(std::log(0.09)));
  auto check = [&](const char* what, tropd::status st, double loss, const std::vector<float>& g) {
    INFO(what);
    REQUIRE_MESSAGE(st.ok(), st.message());
    CHECK(loss == doctest::Approx(double(want)).epsilon(1e-6));
    ld err = 0, norm = 0;
    for (index_t j = 0; j < V; ++j) {
      err = std::max(err, std::fabs(ld(g[size_t(j)]) - gref[size_t(j)]));
      norm = std::max(norm, std::fabs(gref[size_t(j)]));
    }
    CHECK_MESSAGE(err <= 1e-5L * norm, what, ": gradient error ", double(err), " of ", double(norm));
  };
  const est::topk_forward_kl tb{K, est::topk_tail::tail_bucket};
  const host::topk_lists tl{tropd::make_matrix<const int32_t>(ids.data(), 1, K), tropd::make_matrix<const float>(lq.data(), 1, K)};
  for (int dt = 0; dt < 2; ++dt) {
    std::vector<double> loss(1);
    std::vector<float> g(V);
    tropd::status st;
    if (dt == 0) {
      st = host::topk_forward_kl_rows(tb, tropd::make_matrix<const double>(z.data(), 1, V), tl, tropd::view_of(loss),
                                      tropd::make_matrix(g.data(), 1, V));
    } else {
      const auto zf = stored<float>(z);
      st = host::topk_forward_kl_rows(tb, tropd::make_matrix<const float>(zf.data(), 1, V), tl, tropd::view_of(loss),
                                      tropd::make_matrix(g.data(), 1, V));
    }
    check(dt == 0 ? "lists, fp64" : "lists, fp32", st, loss[0], g);
  }
  // From teacher logits (the teacher's top-10 are the same ids, teacher logit 0 there and
  // -5 elsewhere: S_K ~ 0.33, a tail that fp32 statistics resolve): the result must match
  // the lists path given the teacher's own log-probs.
  {
    for (int32_t id : ids) u[size_t(id)] = 0.0;
    const auto zf = stored<float>(z), uf = stored<float>(u);
    std::vector<double> loss(1), loss2(1);
    std::vector<float> g(V), g2(V);
    const auto st = host::topk_forward_kl_rows(tb, tropd::make_matrix<const float>(zf.data(), 1, V), tropd::make_matrix<const float>(uf.data(), 1, V),
                                               tropd::view_of(loss), tropd::make_matrix(g.data(), 1, V));
    REQUIRE_MESSAGE(st.ok(), st.message());
    ld lse_t = 0;
    for (index_t j = 0; j < V; ++j) lse_t += std::exp(ld(u[size_t(j)]));
    lse_t = std::log(lse_t);
    std::vector<float> lq2(K, float(-lse_t));
    const host::topk_lists tl2{tropd::make_matrix<const int32_t>(ids.data(), 1, K), tropd::make_matrix<const float>(lq2.data(), 1, K)};
    REQUIRE(host::topk_forward_kl_rows(tb, tropd::make_matrix<const float>(zf.data(), 1, V), tl2, tropd::view_of(loss2),
                                       tropd::make_matrix(g2.data(), 1, V))
                .ok());
    CHECK(loss[0] == doctest::Approx(loss2[0]).epsilon(1e-6));
    for (index_t j = 0; j < V; ++j) CHECK(g[size_t(j)] == doctest::Approx(g2[size_t(j)]).epsilon(1e-5).scale(1e-9));
  }
}

TEST_CASE("edges: fixed issue R2: an ok status with a non-finite gradient (logit spread beyond the work type's range)") {
  // fp64 student logits 1.5e308 and -1.1e308 (spread beyond DBL_MAX), fp16 teacher.
  // p = e_0; q = softmax([6008, 7172]); KL(p || q) = 1164; gradient p (d - KL) = 0.
  std::vector<double> z = {1.5441666666666665e308, -1.0625e308};
  std::vector<tropd::fp16> u = {tropd::fp16::from_float(6008), tropd::fp16::from_float(7172)};
  const auto o = div_rows(est::reverse_kl{}, z, u, 1, 2);
  if (o.st.ok()) {
    CHECK(std::isfinite(o.loss[0]));
    for (float g : o.grad) CHECK_MESSAGE(std::isfinite(g), "R2: gradient ", g, " with an ok status");
  } else {
    CHECK(o.st.code != errc::non_finite_input);
  }
}

TEST_CASE("edges: fixed issue R2: top-k forward KL of a row with a logit at DBL_MAX returned +inf with an ok status") {
  // fp64 student [DBL_MAX, 1.3, 1.3, 1.3]; renormalised teacher list {1, 2, 3}, 1/3 each.
  // ls = 1.3 - DBL_MAX at the listed ids, so FKL_k = -(1.3 - DBL_MAX) - log 3 + log 3 ~ DBL_MAX:
  // finite but at the edge of double. The call must not return +inf with an ok status
  // (a finite value or infinite_divergence are both acceptable).
  std::vector<double> z = {std::numeric_limits<double>::max(), 1.3, 1.3, 1.3};
  std::vector<int32_t> ids = {1, 2, 3};
  std::vector<float> lq = {-1.0986123f, -1.0986123f, -1.0986123f};
  std::vector<double> loss(1, 12345.0);
  std::vector<float> grad(4, 777.f);
  const host::topk_lists tl{tropd::make_matrix<const int32_t>(ids.data(), 1, 3), tropd::make_matrix<const float>(lq.data(), 1, 3)};
  const auto st = host::topk_forward_kl_rows(est::topk_forward_kl{3}, tropd::make_matrix<const double>(z.data(), 1, 4), tl,
                                             tropd::view_of(loss), tropd::make_matrix(grad.data(), 1, 4));
  if (st.ok()) {
    CHECK_MESSAGE(std::isfinite(loss[0]), "R2: loss ", loss[0], " with an ok status");
    for (float g : grad) CHECK(std::isfinite(g));
  } else {
    CHECK(st.code == errc::infinite_divergence);
    CHECK(loss[0] == 12345.0);
  }
}
