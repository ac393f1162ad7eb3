// tropd/outliers/outliers.hpp, each outlier handler on its own (method.md 2.3, 4.3, 5):
// drop, clip_reward and topk_fkl (form P and form C, every tail policy, the clamp and the
// weight), against values computed here in long double from the definitions; check() on
// parameters outside the domain; -inf rewards, ties at tau, padding entries, lists without
// a finite entry, a student with zero mass on a listed id.
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/outliers/outliers.hpp>

namespace ol = tropd::outliers;
using tropd::estimators::topk_tail;
using ld = long double;

namespace {

constexpr double dinf = std::numeric_limits<double>::infinity();
constexpr double dnan = std::numeric_limits<double>::quiet_NaN();

tropd::token student(double R) {
  tropd::token tk;
  tk.from = tropd::origin::student;
  tk.s = tk.s_old = -1;
  tk.t = -1 + R;
  tk.R = R;
  return tk;
}

bool invalid(const tropd::status& st) { return st.code == tropd::errc::invalid_parameter; }

bool close(ld got, ld want, ld rel = 1e-13L) { return std::fabs(got - want) <= rel * std::max<ld>(1, std::fabs(want)); }

/// A top-k list (teacher log-probs lq, current student ls, optional rollout-time student).
struct list {
  std::vector<double> lq, ls, ls_old;
  tropd::topk_row row(double tail_log = std::numeric_limits<double>::quiet_NaN()) const {
    tropd::topk_row r;
    r.k = static_cast<int>(lq.size());
    r.teacher = {lq.data(), tropd::scalar_type::f64};
    r.student = {ls.data(), tropd::scalar_type::f64};
    r.student_old = ls_old.empty() ? r.student : tropd::values_row{ls_old.data(), tropd::scalar_type::f64};
    r.student_tail_log = tail_log;
    return r;
  }
};

/// FKL_k of method.md 2.3 on the finite entries: sum qk (log qk - ls), qk = q (raw) or q / S_K
/// (renormalised); the tail bucket adds (1 - S_K) log((1 - S_K) / (1 - P_K)). g: dFKL/dls at
/// each entry (0 at padding): -qk, plus (1 - S_K) p / (1 - P_K) for the tail bucket (folded).
struct fkl_ref {
  ld value = 0, SK = 0, PK = 0;
  std::vector<ld> g;
};
fkl_ref reference_fkl(const std::vector<double>& lq, const std::vector<double>& ls, topk_tail tail) {
  fkl_ref r;
  r.g.assign(lq.size(), 0);
  for (size_t i = 0; i < lq.size(); ++i)
    if (lq[i] != -dinf) {
      r.SK += std::exp(ld(lq[i]));
      r.PK += std::exp(ld(ls[i]));
    }
  for (size_t i = 0; i < lq.size(); ++i) {
    if (lq[i] == -dinf) continue;
    const ld qk = tail == topk_tail::renormalised ? std::exp(ld(lq[i])) / r.SK : std::exp(ld(lq[i]));
    r.value += qk * (std::log(qk) - ld(ls[i]));
    r.g[i] = -qk;
  }
  if (tail == topk_tail::tail_bucket && 1 - r.SK > 1e-6L) {
    r.value += (1 - r.SK) * std::log((1 - r.SK) / (1 - r.PK));
    for (size_t i = 0; i < lq.size(); ++i)
      if (lq[i] != -dinf) r.g[i] += (1 - r.SK) * std::exp(ld(ls[i])) / (1 - r.PK);
  }
  return r;
}

/// Teacher list with S_K = 0.8 (one padding entry) and a student with P_K ~ 0.45.
list sample_list() {
  list l;
  l.lq = {std::log(0.4), std::log(0.25), -dinf, std::log(0.1), std::log(0.05)};
  l.ls = {std::log(0.2), std::log(0.1), 0.0, std::log(0.12), std::log(0.03)};
  l.ls_old = {std::log(0.15), std::log(0.2), 0.0, std::log(0.05), std::log(0.04)};
  return l;
}

}  // namespace

TEST_CASE("outliers: drop keeps nothing (not kept, A = 0, no loss)") {
  const ol::drop d;
  CHECK(d.check().ok());
  CHECK_FALSE(ol::drop::needs_topk);
  for (double R : {-0.5, -dinf, 3.0}) {
    const ol::outlier_value v = d(student(R), {}, nullptr);
    CHECK_FALSE(v.kept);
    CHECK(v.advantage == 0);
    CHECK(v.loss == 0);
    CHECK(v.st.ok());
  }
}

TEST_CASE("outliers: clip_reward is A = max(R, tau), clipped iff R <= tau") {
  for (double tau : {-5.0, -1.0, 0.0}) {
    const ol::clip_reward c{tau};
    CHECK(c.check().ok());
    for (double R : {tau - 2, tau, std::nextafter(tau, dinf), tau + 0.5, -dinf}) {
      CAPTURE(tau);
      CAPTURE(R);
      const ol::outlier_value v = c(student(R), {}, nullptr);
      CHECK(v.kept);
      CHECK(v.pg);
      CHECK(v.advantage == std::max(R, tau));
      CHECK(v.clipped == !(R > tau));
      CHECK(v.st.ok());
    }
  }
  // A zero-teacher-mass token (R = -inf) gets the finite floor.
  CHECK(ol::clip_reward{-3.0}(student(-dinf), {}, nullptr).advantage == -3.0);
  CHECK_FALSE(ol::clip_reward::needs_topk);
  for (double tau : {dnan, dinf, -dinf}) CHECK(invalid(ol::clip_reward{tau}.check()));
}

TEST_CASE("outliers: topk_fkl form P is the differentiable FKL_k with dL/dls = -qk (every tail, weight)") {
  const list l = sample_list();
  for (topk_tail tail : {topk_tail::raw, topk_tail::renormalised, topk_tail::tail_bucket}) {
    for (double weight : {1.0, 0.3, 0.0}) {
      CAPTURE(tropd::estimators::to_string(tail));
      CAPTURE(weight);
      ol::topk_fkl h;
      h.fkl = {5, tail};
      h.form = ol::fkl_form::p;
      h.weight = weight;
      h.clamp = 0.01;  // form C only: no effect here
      REQUIRE(h.check().ok());
      std::vector<double> g(5, 777.0);
      const ol::outlier_value v = h(student(-2.0), l.row(), g.data());
      REQUIRE(v.st.ok());
      const fkl_ref want = reference_fkl(l.lq, l.ls, tail);
      CHECK(v.kept);
      CHECK_FALSE(v.pg);
      CHECK_FALSE(v.clipped);
      CHECK(close(v.loss, weight * want.value));
      CHECK(close(v.teacher_mass, want.SK));
      CHECK(close(v.student_mass, want.PK));
      // g holds the raw coefficients; the tail bucket's c p_v is apart (tail_coef).
      for (size_t i = 0; i < 5; ++i) {
        CAPTURE(i);
        const ld folded = ld(g[i]) + (l.lq[i] == -dinf ? 0 : ld(v.tail_coef) * std::exp(ld(l.ls[i])));
        CHECK(close(folded, weight * want.g[i]));
      }
      CHECK(g[2] == 0);  // padding
      if (tail == topk_tail::tail_bucket) {
        CHECK(close(v.tail_coef, weight * (1 - want.SK) / (1 - want.PK)));
        CHECK(close(v.tail_teacher, weight * (1 - want.SK)));
      } else {
        CHECK(v.tail_coef == 0);
        CHECK(v.tail_teacher == 0);
      }
    }
  }
}

TEST_CASE("outliers: topk_fkl form C is the PG advantage A = -FKL_k(rollout-time student), clamped, weighted") {
  const list l = sample_list();
  for (topk_tail tail : {topk_tail::raw, topk_tail::renormalised, topk_tail::tail_bucket}) {
    const fkl_ref old = reference_fkl(l.lq, l.ls_old, tail);
    for (double clamp : {dinf, 0.5, static_cast<double>(old.value * 2)})
      for (double weight : {1.0, 0.25}) {
        CAPTURE(tropd::estimators::to_string(tail));
        CAPTURE(clamp);
        CAPTURE(weight);
        ol::topk_fkl h;
        h.fkl = {5, tail};
        h.form = ol::fkl_form::c;
        h.clamp = clamp;
        h.weight = weight;
        REQUIRE(h.check().ok());
        std::vector<double> g(5, 777.0);
        const ol::outlier_value v = h(student(-2.0), l.row(), g.data());
        REQUIRE(v.st.ok());
        CHECK(v.kept);
        CHECK(v.pg);
        const bool clipped = -old.value < -ld(clamp);
        CHECK(v.clipped == clipped);
        CHECK(close(v.advantage, weight * (clipped ? -ld(clamp) : -old.value)));
        CHECK(close(v.student_mass, old.PK));
        CHECK(close(v.teacher_mass, old.SK));
        CHECK(v.tail_coef == 0);
        for (double x : g) CHECK(x == 777.0);  // form C writes no sparse gradient
      }
  }
  // Without a rollout-time list form C reads the current one.
  list cur = sample_list();
  cur.ls_old.clear();
  ol::topk_fkl h;
  h.fkl = {5, topk_tail::renormalised};
  const ol::outlier_value v = h(student(-1.0), cur.row(), nullptr);
  REQUIRE(v.st.ok());
  CHECK(close(v.advantage, -reference_fkl(cur.lq, cur.ls, topk_tail::renormalised).value));
}

TEST_CASE("outliers: topk_fkl with the exact student tail (tail bucket) and its infinite cases") {
  list l = sample_list();
  l.ls_old.clear();
  // The caller's exact log(1 - P_K) replaces the estimate from the listed log-probs.
  const double tail_log = std::log(0.3);
  ol::topk_fkl p;
  p.fkl = {5, topk_tail::tail_bucket};
  p.form = ol::fkl_form::p;
  std::vector<double> g(5);
  const ol::outlier_value v = p(student(-1.0), l.row(tail_log), g.data());
  REQUIRE(v.st.ok());
  const fkl_ref raw = reference_fkl(l.lq, l.ls, topk_tail::raw);
  CHECK(close(v.loss, raw.value + (1 - raw.SK) * std::log((1 - raw.SK) / 0.3L), 1e-12L));
  CHECK(close(v.tail_coef, (1 - raw.SK) / 0.3L, 1e-12L));
  // Form C with no rollout-time list uses the same exact tail.
  ol::topk_fkl c = p;
  c.form = ol::fkl_form::c;
  CHECK(close(c(student(-1.0), l.row(tail_log), nullptr).advantage, -v.loss, 1e-12L));
  // A student without mass outside the list while the teacher has some: infinite.
  CHECK(p(student(-1.0), l.row(-dinf), g.data()).st.code == tropd::errc::infinite_divergence);
  // The student at -inf on a listed (non-padding) id: infinite for every tail; at a padding id: fine.
  for (topk_tail tail : {topk_tail::raw, topk_tail::renormalised, topk_tail::tail_bucket}) {
    list z = sample_list();
    z.ls[3] = -dinf;
    z.ls_old[3] = -dinf;
    for (ol::fkl_form form : {ol::fkl_form::p, ol::fkl_form::c}) {
      ol::topk_fkl h;
      h.fkl = {5, tail};
      h.form = form;
      const ol::outlier_value w = h(student(-1.0), z.row(), g.data());
      CHECK(w.st.code == tropd::errc::infinite_divergence);
      CHECK(w.st.col == 3);
    }
    list pad = sample_list();
    pad.ls[2] = -dinf;
    ol::topk_fkl h;
    h.fkl = {5, tail};
    h.form = ol::fkl_form::p;
    CHECK(h(student(-1.0), pad.row(), g.data()).st.ok());
  }
}

TEST_CASE("outliers: topk_fkl lists without a finite entry, raw mass above 1, and check()") {
  list none;
  none.lq = {-dinf, -dinf};
  none.ls = {-1.0, -2.0};
  ol::topk_fkl h;
  h.fkl = {2, topk_tail::renormalised};
  h.form = ol::fkl_form::p;
  std::vector<double> g(2);
  CHECK(h(student(-1.0), none.row(), g.data()).st.code == tropd::errc::invalid_topk_list);
  h.form = ol::fkl_form::c;
  CHECK(h(student(-1.0), none.row(), g.data()).st.code == tropd::errc::invalid_topk_list);
  // Raw and tail_bucket lists must have S_K <= 1 (+1e-4); renormalised lists need not be normalised.
  list big;
  big.lq = {std::log(0.7), std::log(0.6)};
  big.ls = {std::log(0.5), std::log(0.3)};
  for (topk_tail tail : {topk_tail::raw, topk_tail::tail_bucket}) {
    h.fkl = {2, tail};
    CHECK(h(student(-1.0), big.row(), g.data()).st.code == tropd::errc::invalid_topk_list);
  }
  h.fkl = {2, topk_tail::renormalised};
  const ol::outlier_value v = h(student(-1.0), big.row(), g.data());
  REQUIRE(v.st.ok());
  CHECK(close(v.advantage, -reference_fkl(big.lq, big.ls, topk_tail::renormalised).value));

  CHECK(ol::topk_fkl::needs_topk);
  CHECK(ol::topk_fkl{}.check().ok());
  auto with = [](auto f) {
    ol::topk_fkl x;
    f(x);
    return x.check();
  };
  CHECK(invalid(with([](ol::topk_fkl& x) { x.clamp = 0; })));
  CHECK(invalid(with([](ol::topk_fkl& x) { x.clamp = -1; })));
  CHECK(invalid(with([](ol::topk_fkl& x) { x.clamp = dnan; })));
  CHECK(invalid(with([](ol::topk_fkl& x) { x.weight = -0.1; })));
  CHECK(invalid(with([](ol::topk_fkl& x) { x.weight = dnan; })));
  CHECK(invalid(with([](ol::topk_fkl& x) { x.weight = dinf; })));
  CHECK(invalid(with([](ol::topk_fkl& x) { x.fkl.k = 0; })));
  CHECK(invalid(with([](ol::topk_fkl& x) { x.fkl.tail = static_cast<topk_tail>(7); })));
  CHECK(with([](ol::topk_fkl& x) { x.weight = 0; }).ok());
}
