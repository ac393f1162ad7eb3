// The input policy (host::eval_options::bad_input, docs/robustness.md):
//   * reject (default): the first bad value fails the call with its position (token, or
//     row and column; top-k entries by token and entry) and nothing is written;
//   * mask (opt-in): exactly the bad tokens (token level) or rows (row level: NaN / +inf
//     logits, a row without a finite entry, a bad per-token value) become prompt tokens:
//     zero gradient rows, every other output equal to a run in which those tokens are
//     origin::prompt, and diagnostics::n_masked_input counts them;
//   * whatever the policy: ids out of range, malformed / mismatched top-k lists and
//     parameters outside their domain (k < 1, beta outside [0, 1], T <= 0, NaN) are errors.
#include <stdint.h>

#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

#include "reference/helpers.hpp"

namespace host = tropd::host;
namespace est = tropd::estimators;
using tropd::errc;
using tropd::index_t;
using tropd::origin;

namespace {

constexpr float finf = std::numeric_limits<float>::infinity();
constexpr float fnan = std::numeric_limits<float>::quiet_NaN();

/// A token batch with every per-token input (n tokens, K top-k entries, two sequences).
struct tbatch {
  index_t n = 0, K = 3;
  std::vector<float> s, s_old, t, hs, ht, rkl, ref, lq, ls, ls_old;
  std::vector<origin> from;
  std::vector<index_t> off;
  std::vector<int32_t> ids;

  static tbatch make(uint64_t seed, index_t n) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> U(0, 1);
    tbatch b;
    b.n = n;
    for (index_t i = 0; i < n; ++i) {
      const float s = -0.05f - 4 * U(rng);
      b.s.push_back(s);
      b.s_old.push_back(s + 0.2f * (U(rng) - 0.5f));
      b.t.push_back(-0.05f - 5 * U(rng));
      b.hs.push_back(3 * U(rng));
      b.ht.push_back(2 * U(rng));
      b.rkl.push_back(U(rng));
      b.ref.push_back(-0.1f - 4 * U(rng));
      b.from.push_back(i % 5 == 0 ? origin::prompt : (i % 5 == 1 ? origin::teacher : origin::student));
      float lse = -finf;
      std::vector<float> raw;
      for (index_t k = 0; k < b.K; ++k) raw.push_back(3 * U(rng) - 2);
      for (float x : raw) lse = std::max(lse, x);
      float sum = 0;
      for (float x : raw) sum += std::exp(x - lse);
      for (index_t k = 0; k < b.K; ++k) {
        b.lq.push_back(raw[size_t(k)] - lse - std::log(sum + 0.3f));
        b.ls.push_back(-0.2f - 3 * U(rng));
        b.ls_old.push_back(b.ls.back() + 0.1f);
        b.ids.push_back(int32_t(10 * k + (i % 7)));
      }
    }
    b.off = {0, n / 2, n};
    return b;
  }
  tropd::token_batch view() const {
    tropd::token_batch v;
    v.s = {s.data(), n};
    v.s_old = {s_old.data(), n};
    v.t = {t.data(), n};
    v.from = {from.data(), n};
    v.seq_offsets = {off.data(), index_t(off.size())};
    v.student_entropy = {hs.data(), n};
    v.teacher_entropy = {ht.data(), n};
    v.rkl = {rkl.data(), n};
    v.ref = {ref.data(), n};
    v.topk_ids = tropd::make_matrix<const int32_t>(ids.data(), n, K);
    v.topk_teacher = tropd::make_matrix<const float>(lq.data(), n, K);
    v.topk_student = tropd::make_matrix<const float>(ls.data(), n, K);
    v.topk_student_old = tropd::make_matrix<const float>(ls_old.data(), n, K);
    return v;
  }
};

struct tout {
  tropd::status st;
  double loss = -777;
  tropd::diagnostics d;
  std::vector<float> dlds, adv, dtopk;
  std::vector<uint8_t> flags;
};

template <class Obj>
tout run(const Obj& o, const tbatch& b, host::input_policy pol) {
  tout r;
  r.dlds.assign(size_t(b.n), 777.f);
  r.adv.assign(size_t(b.n), 777.f);
  r.dtopk.assign(size_t(b.n * b.K), 777.f);
  r.flags.assign(size_t(b.n), 0xee);
  r.d.n_masked_input = -1;
  tropd::token_outputs out;
  out.dloss_ds = tropd::view_of(r.dlds);
  out.advantage = tropd::view_of(r.adv);
  out.dloss_dtopk = tropd::make_matrix(r.dtopk.data(), b.n, b.K);
  out.flags = tropd::view_of(r.flags);
  host::eval_options eo;
  eo.seed = 7;
  eo.step = 3;
  eo.bad_input = pol;
  out.loss = &r.loss;
  out.diag = &r.d;
  r.st = host::evaluate_tokens(tropd_test::with_k(o, b.K), b.view(), out, eo);
  return r;
}

bool untouched(const tout& r) {
  for (float x : r.dlds)
    if (x != 777.f) return false;
  for (float x : r.adv)
    if (x != 777.f) return false;
  for (float x : r.dtopk)
    if (x != 777.f) return false;
  for (uint8_t f : r.flags)
    if (f != 0xee) return false;
  return r.loss == -777 && r.d.n_masked_input == -1;
}

/// One kind of bad per-token value: how to plant it, and the error reject must give.
struct planted {
  const char* what;
  void (*plant)(tbatch&, index_t i);
  errc code;
  index_t col;  ///< -1 or the top-k entry
};

const planted kinds[] = {
    {"s = NaN", [](tbatch& b, index_t i) { b.s[size_t(i)] = fnan; }, errc::non_finite_input, -1},
    {"s = -inf", [](tbatch& b, index_t i) { b.s[size_t(i)] = -finf; }, errc::non_finite_input, -1},
    {"s > 0", [](tbatch& b, index_t i) { b.s[size_t(i)] = 0.5f; }, errc::invalid_parameter, -1},
    {"t = NaN", [](tbatch& b, index_t i) { b.t[size_t(i)] = fnan; }, errc::non_finite_input, -1},
    {"t = +inf", [](tbatch& b, index_t i) { b.t[size_t(i)] = finf; }, errc::non_finite_input, -1},
    {"t > 0", [](tbatch& b, index_t i) { b.t[size_t(i)] = 2.0f; }, errc::invalid_parameter, -1},
    {"s_old = +inf", [](tbatch& b, index_t i) { b.s_old[size_t(i)] = finf; }, errc::non_finite_input, -1},
    {"student entropy NaN", [](tbatch& b, index_t i) { b.hs[size_t(i)] = fnan; }, errc::non_finite_input, -1},
    {"teacher entropy -inf", [](tbatch& b, index_t i) { b.ht[size_t(i)] = -finf; }, errc::non_finite_input, -1},
    {"rkl -inf", [](tbatch& b, index_t i) { b.rkl[size_t(i)] = -finf; }, errc::non_finite_input, -1},
    {"ref NaN", [](tbatch& b, index_t i) { b.ref[size_t(i)] = fnan; }, errc::non_finite_input, -1},
    {"top-k teacher NaN (entry 1)", [](tbatch& b, index_t i) { b.lq[size_t(i * b.K + 1)] = fnan; }, errc::non_finite_input, 1},
    {"top-k student +inf (entry 2)", [](tbatch& b, index_t i) { b.ls[size_t(i * b.K + 2)] = finf; }, errc::non_finite_input, 2},
    {"top-k student_old NaN (entry 0)", [](tbatch& b, index_t i) { b.ls_old[size_t(i * b.K)] = fnan; }, errc::non_finite_input, 0},
};

/// The same batch with tokens `bad` marked origin::prompt.
tbatch as_prompt(tbatch b, const std::vector<index_t>& bad) {
  for (index_t i : bad) b.from[size_t(i)] = origin::prompt;
  return b;
}

/// mask on `dirty` must equal reject on `clean` (the bad tokens as prompt tokens), except
/// for n_masked_input; the bad tokens' outputs are zero.
void expect_masked_equal(const tout& m, const tout& c, const std::vector<index_t>& bad, index_t K) {
  REQUIRE_MESSAGE(m.st.ok(), m.st.message());
  REQUIRE_MESSAGE(c.st.ok(), c.st.message());
  CHECK(m.d.n_masked_input == index_t(bad.size()));
  CHECK(c.d.n_masked_input == 0);
  CHECK(m.loss == c.loss);
  CHECK(tropd_test::bit_equal(m.dlds, c.dlds));
  CHECK(tropd_test::bit_equal(m.adv, c.adv));
  CHECK(tropd_test::bit_equal(m.dtopk, c.dtopk));
  CHECK(m.flags == c.flags);
  CHECK(m.d.n_student == c.d.n_student);
  CHECK(m.d.n_counted == c.d.n_counted);
  CHECK(m.d.normaliser == c.d.normaliser);
  for (index_t i : bad) {
    CHECK(m.dlds[size_t(i)] == 0.f);
    for (index_t k = 0; k < K; ++k) CHECK(m.dtopk[size_t(i * K + k)] == 0.f);
  }
}

template <class Obj>
void token_policy_suite(const Obj& o, const char* name) {
  CAPTURE(name);
  for (const planted& p : kinds) {
    CAPTURE(p.what);
    tbatch b = tbatch::make(42, 12);
    // Plant at two student tokens (3 and 8) and one teacher token (6; top-k kinds: student only).
    const bool topk_kind = p.col >= 0;
    const std::vector<index_t> at = topk_kind ? std::vector<index_t>{3, 8} : std::vector<index_t>{3, 6, 8};
    for (index_t i : at) p.plant(b, i);
    // Top-k values matter only where the objective reads them.
    const bool seen = !topk_kind || Obj::outlier_type::needs_topk;
    // reject: the first bad token (and entry), nothing written.
    const tout r = run(o, b, host::input_policy::reject);
    if (seen) {
      CHECK(r.st.code == p.code);
      CHECK(r.st.row == at[0]);
      CHECK(r.st.col == p.col);
      CHECK(untouched(r));
    } else {
      CHECK(r.st.ok());
    }
    // mask: exactly those tokens dropped.
    const tout m = run(o, b, host::input_policy::mask);
    const tout c = run(o, as_prompt(tbatch::make(42, 12), seen ? at : std::vector<index_t>{}), host::input_policy::reject);
    expect_masked_equal(m, c, seen ? at : std::vector<index_t>{}, b.K);
  }
}

}  // namespace

TEST_CASE("input policy: token level, reject names the first bad token; mask drops exactly the bad tokens") {
  token_policy_suite(tropd::presets::opd(), "opd");
  token_policy_suite(tropd::presets::tropd({.beta = 1e-3, .k = 3}), "tropd form C");
  token_policy_suite(tropd::presets::tropd({.beta = 1e-3, .k = 3, .form = tropd::outliers::fkl_form::p}), "tropd form P");
  token_policy_suite(tropd::presets::eopd({.tau = 0.8, .k = 3}), "eopd");
  token_policy_suite(tropd::presets::vopd(), "vopd");
  token_policy_suite(tropd::presets::gopd(), "gopd");
  token_policy_suite(tropd::presets::mask_outlier({.tau = -2.0, .guidance_beta = 1e-3}), "mask_outlier");
}

TEST_CASE("input policy: mask keeps structural errors and infinite terms as errors") {
  tbatch b = tbatch::make(5, 10);
  // An origin tag that is none of prompt / teacher / student.
  b.from[4] = static_cast<origin>(7);
  for (auto pol : {host::input_policy::reject, host::input_policy::mask}) {
    const tout r = run(tropd::presets::opd(), b, pol);
    CHECK(r.st.code == errc::invalid_parameter);
    CHECK(r.st.row == 4);
    CHECK(untouched(r));
  }
  // seq_offsets that do not end at n.
  tbatch b2 = tbatch::make(5, 10);
  b2.off = {0, 4, 9};
  for (auto pol : {host::input_policy::reject, host::input_policy::mask})
    CHECK(run(tropd::presets::opd(), b2, pol).st.code == errc::shape_mismatch);
  // A valid token whose term is infinite (OPD, trusted, t = -inf) is not "bad input".
  tbatch b3 = tbatch::make(5, 10);
  b3.t[3] = -finf;
  for (auto pol : {host::input_policy::reject, host::input_policy::mask}) {
    const tout r = run(tropd::presets::opd(), b3, pol);
    CHECK(r.st.code == errc::infinite_divergence);
    CHECK(r.st.row == 3);
    CHECK(untouched(r));
  }
}

TEST_CASE("input policy: ids out of range and malformed top-k lists are errors under either policy (token level)") {
  // docs/robustness.md: ids out of range and malformed lists are always errors. The top-k
  // lists of a token are per-token values at this level, but an id outside [0, V) is not a
  // numerical accident a trainer can drop: it is a bug upstream.
  const auto o = tropd::presets::tropd({.beta = 1e-3, .k = 3});
  for (int which = 0; which < 2; ++which) {
    CAPTURE(which);
    tbatch b = tbatch::make(9, 10);
    if (which == 0) b.ids[size_t(3 * b.K + 1)] = -4;  // negative id, entry 1 of student token 3
    else b.ids[size_t(3 * b.K + 2)] = b.ids[size_t(3 * b.K)];  // repeated id
    const errc want = which == 0 ? errc::id_out_of_range : errc::duplicate_topk_id;
    const tout r = run(o, b, host::input_policy::reject);
    CHECK(r.st.code == want);
    CHECK(r.st.row == 3);
    const tout m = run(o, b, host::input_policy::mask);
    CHECK_MESSAGE(m.st.code == want, "known issue P1: input_policy::mask drops a token whose top-k list has ",
                  which == 0 ? "a negative id" : "a repeated id", " instead of failing (row level rejects it: check_topk_row)");
  }
  // Shape mismatches of the lists are structural: errors under either policy.
  tbatch b = tbatch::make(9, 10);
  for (auto pol : {host::input_policy::reject, host::input_policy::mask}) {
    tropd::token_batch v = b.view();
    v.topk_teacher.cols = b.K - 1;
    std::vector<float> dl(size_t(b.n));
    tropd::token_outputs out;
    out.dloss_ds = tropd::view_of(dl);
    host::eval_options eo;
    eo.bad_input = pol;
    double loss = 0;
    out.loss = &loss;
    CHECK(host::evaluate_tokens(o, v, out, eo).code == errc::shape_mismatch);
  }
}

TEST_CASE("input policy: parameters outside their domain are errors under either policy") {
  const tbatch b = tbatch::make(3, 8);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (auto pol : {host::input_policy::reject, host::input_policy::mask}) {
    CAPTURE(int(pol));
    CHECK(run(tropd::presets::tropd({.beta = 1e-3, .k = -1}), b, pol).st.code == errc::invalid_parameter);   // k < 1
    CHECK(run(tropd::presets::tropd({.beta = 1e-3, .k = 0}), b, pol).st.code == errc::invalid_parameter);    // k = 0
    CHECK(run(tropd::presets::tropd({.beta = -1e-3, .k = 3}), b, pol).st.code == errc::invalid_parameter);   // beta < 0
    CHECK(run(tropd::presets::tropd({.beta = nan, .k = 3}), b, pol).st.code == errc::invalid_parameter);     // beta NaN
    CHECK(run(tropd::presets::tropd({.beta = 1e-3, .k = 3, .form = tropd::outliers::fkl_form::c, .clamp = 0.0}), b, pol).st.code == errc::invalid_parameter);  // clamp 0
    CHECK(run(tropd::presets::tropd({.beta = 1e-3, .k = 3, .form = tropd::outliers::fkl_form::c, .clamp = nan}), b, pol).st.code == errc::invalid_parameter);
    CHECK(run(tropd::presets::entropy_opd({.fraction = 1.5}), b, pol).st.code == errc::invalid_parameter);  // fraction > 1
    CHECK(run(tropd::presets::entropy_opd({.fraction = nan}), b, pol).st.code == errc::invalid_parameter);
    CHECK(run(tropd::presets::gopd({.lambda = nan}), b, pol).st.code == errc::invalid_parameter);
    CHECK(run(tropd::presets::clip_outlier({.tau = nan}), b, pol).st.code == errc::invalid_parameter);
    CHECK(run(tropd::presets::reopold({.floor = -3, .switch_step = -1}), b, pol).st.code == errc::invalid_parameter);   // switch step < 0
    auto agg = tropd::presets::opd();
    agg.agg.normaliser = nan;
    CHECK(run(agg, b, pol).st.code == errc::invalid_parameter);
    CHECK(untouched(run(agg, b, pol)));
  }
  // Row functions: beta outside [0, 1], T <= 0 / NaN / inf, k < 1 (no policy there: always errors).
  const index_t V = 4;
  std::vector<float> z = {0, 1, 2, 3}, u = {1, 0, 2, 1};
  std::vector<double> loss(1, 12345.0);
  auto zv = tropd::make_matrix<const float>(z.data(), 1, V), uv = tropd::make_matrix<const float>(u.data(), 1, V);
  for (double beta : {-0.1, 1.1, nan})
    CHECK(host::divergence_rows(est::jsd{beta}, zv, uv, tropd::view_of(loss)).code == errc::invalid_parameter);
  for (double T : {0.0, -1.0, nan, std::numeric_limits<double>::infinity()}) {
    host::row_options opt;
    opt.student_temperature = T;
    CHECK(host::divergence_rows(est::reverse_kl{}, zv, uv, tropd::view_of(loss), tropd::matrix_view<float>{}, opt).code == errc::invalid_parameter);
    opt.student_temperature = 1;
    opt.teacher_temperature = T;
    CHECK(host::divergence_rows(est::reverse_kl{}, zv, uv, tropd::view_of(loss), tropd::matrix_view<float>{}, opt).code == errc::invalid_parameter);
  }
  for (int k : {0, -1, INT_MIN})
    CHECK(host::topk_forward_kl_rows(est::topk_forward_kl{k}, zv, uv, tropd::view_of(loss)).code == errc::invalid_parameter);
  CHECK(loss[0] == 12345.0);
}

// ---------------------------------------------------------------------------
// Row level.
// ---------------------------------------------------------------------------

namespace {

struct rbatch {
  index_t n = 0, V = 0;
  std::vector<float> z, u, s_old;
  std::vector<int32_t> y;
  std::vector<origin> from;
  std::vector<index_t> off;

  static rbatch make(uint64_t seed, index_t n, index_t V) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> N(0, 1.5f);
    rbatch b;
    b.n = n;
    b.V = V;
    for (index_t i = 0; i < n * V; ++i) {
      b.z.push_back(N(rng));
      b.u.push_back(0.7f * b.z.back() + N(rng));
    }
    for (index_t i = 0; i < n; ++i) {
      b.y.push_back(int32_t((i * 7 + 3) % V));
      b.from.push_back(i % 4 == 0 ? origin::prompt : (i % 4 == 1 ? origin::teacher : origin::student));
      b.s_old.push_back(-1.0f - 0.1f * float(i));
    }
    b.off = {0, n / 3, n};
    return b;
  }
};

struct rout {
  tropd::status st;
  double loss = -777;
  tropd::diagnostics d;
  std::vector<float> grad, dlds;
};

template <class Obj>
rout run_rows(const Obj& o, const rbatch& b, host::input_policy pol, int threads = 1) {
  rout r;
  r.grad.assign(size_t(b.n * b.V), 777.f);
  r.dlds.assign(size_t(b.n), 777.f);
  r.d.n_masked_input = -1;
  host::row_inputs rt;
  rt.ids = tropd::view_of(b.y);
  rt.from = tropd::view_of(b.from);
  rt.seq_offsets = tropd::view_of(b.off);
  rt.s_old = tropd::view_of(b.s_old);
  host::eval_options eo;
  eo.seed = 3;
  eo.bad_input = pol;
  tropd::token_outputs tout;
  tout.dloss_ds = tropd::view_of(r.dlds);
  eo.threads = threads;
  r.st = host::evaluate_rows(o, tropd::make_matrix<const float>(b.z.data(), b.n, b.V), tropd::make_matrix<const float>(b.u.data(), b.n, b.V),
                             rt,
                             host::row_outputs<>{.grad = tropd::make_matrix(r.grad.data(), b.n, b.V), .loss = &r.loss, .diag = &r.d,
                                                 .dloss_ds = tout.dloss_ds},
                             eo);
  return r;
}

}  // namespace

TEST_CASE("input policy: row level, reject names the row and column; mask drops exactly the bad rows") {
  const index_t n = 11, V = 9;
  struct row_kind {
    const char* what;
    void (*plant)(rbatch&, index_t r);
    errc code;
    index_t col;
  };
  const row_kind row_kinds[] = {
      {"student NaN at column 4", [](rbatch& b, index_t r) { b.z[size_t(r * b.V + 4)] = fnan; }, errc::non_finite_input, 4},
      {"teacher +inf at column 2", [](rbatch& b, index_t r) { b.u[size_t(r * b.V + 2)] = finf; }, errc::non_finite_input, 2},
      {"student row of -inf", [](rbatch& b, index_t r) { for (index_t v = 0; v < b.V; ++v) b.z[size_t(r * b.V + v)] = -finf; },
       errc::no_finite_entry, -1},
      {"s_old NaN", [](rbatch& b, index_t r) { b.s_old[size_t(r)] = fnan; }, errc::non_finite_input, -1},
  };
  auto check_obj = [&](const auto& o, const char* name) {
    CAPTURE(name);
    for (const auto& k : row_kinds) {
      CAPTURE(k.what);
      for (int threads : {1, 2}) {
        CAPTURE(threads);
        rbatch b = rbatch::make(17, n, V);
        const std::vector<index_t> at = {2, 7};  // student rows
        for (index_t r : at) k.plant(b, r);
        const rout r = run_rows(o, b, host::input_policy::reject, threads);
        CHECK(r.st.code == k.code);
        CHECK(r.st.row == at[0]);
        CHECK(r.st.col == k.col);
        CHECK(r.grad[0] == 777.f);
        CHECK(r.loss == -777);
        // mask vs the clean batch with those rows as prompt rows (their logits made finite,
        // since reject would still read them).
        const rout m = run_rows(o, b, host::input_policy::mask, threads);
        rbatch c = rbatch::make(17, n, V);
        for (index_t i : at) c.from[size_t(i)] = origin::prompt;
        const rout cr = run_rows(o, c, host::input_policy::reject, threads);
        REQUIRE_MESSAGE(m.st.ok(), m.st.message());
        REQUIRE_MESSAGE(cr.st.ok(), cr.st.message());
        CHECK(m.d.n_masked_input == 2);
        CHECK(m.loss == cr.loss);
        CHECK(m.d.n_counted == cr.d.n_counted);
        for (index_t i = 0; i < n; ++i) {
          CAPTURE(i);
          const bool bad = i == at[0] || i == at[1];
          for (index_t v = 0; v < V; ++v) {
            const float g = m.grad[size_t(i * V + v)];
            if (bad) CHECK(g == 0.f);
            else CHECK(g == cr.grad[size_t(i * V + v)]);
          }
          CHECK(m.dlds[size_t(i)] == cr.dlds[size_t(i)]);
        }
      }
    }
  };
  check_obj(tropd::presets::opd(), "opd");
  check_obj(tropd::presets::tropd({.beta = 1e-3, .k = 4}), "tropd");
  check_obj(tropd::presets::gkd({.beta = 0.5}), "gkd");
}

TEST_CASE("input policy: row level, ids out of range and mismatched top-k lists are errors under either policy") {
  const index_t n = 6, V = 5;
  for (auto pol : {host::input_policy::reject, host::input_policy::mask}) {
    CAPTURE(int(pol));
    rbatch b = rbatch::make(3, n, V);
    b.y[3] = int32_t(V);  // out of range
    rout r = run_rows(tropd::presets::opd(), b, pol);
    CHECK(r.st.code == errc::id_out_of_range);
    CHECK(r.st.row == 3);
    b.y[3] = -1;
    r = run_rows(tropd::presets::opd(), b, pol);
    CHECK(r.st.code == errc::id_out_of_range);
    CHECK(r.grad[0] == 777.f);
    // Given top-k lists: [n x 2] ids against [n x 3] log-probs, an id outside [0, V), a repeated id.
    rbatch c = rbatch::make(3, n, V);
    std::vector<int32_t> ids(size_t(n * 3));
    std::vector<float> lp(size_t(n * 3), -1.5f);
    for (index_t i = 0; i < n; ++i)
      for (index_t k = 0; k < 3; ++k) ids[size_t(i * 3 + k)] = int32_t(k);
    host::row_inputs rt;
    rt.ids = tropd::view_of(c.y);
    rt.from = tropd::view_of(c.from);
    rt.seq_offsets = tropd::view_of(c.off);
    host::eval_options eo;
    eo.bad_input = pol;
    std::vector<float> grad(size_t(n * V), 777.f);
    double loss = -777;
    auto call = [&](const host::topk_lists& tl) {
      host::row_inputs in = rt;
      in.teacher_topk = tl;
      return host::evaluate_rows(tropd::presets::tropd({.beta = 1e-3, .k = 3}), tropd::make_matrix<const float>(c.z.data(), n, V),
                                 tropd::make_matrix<const float>(c.u.data(), n, V), in,
                                 host::row_outputs<>{.grad = tropd::make_matrix(grad.data(), n, V), .loss = &loss}, eo);
    };
    host::topk_lists bad_shape{tropd::make_matrix<const int32_t>(ids.data(), n, 2, 3), tropd::make_matrix<const float>(lp.data(), n, 3)};
    CHECK(call(bad_shape).code == errc::shape_mismatch);
    ids[size_t(2 * 3 + 1)] = int32_t(V + 2);  // row 2 is a student row
    host::topk_lists tl{tropd::make_matrix<const int32_t>(ids.data(), n, 3), tropd::make_matrix<const float>(lp.data(), n, 3)};
    auto st = call(tl);
    CHECK(st.code == errc::id_out_of_range);
    CHECK(st.row == 2);
    CHECK(st.col == 1);
    ids[size_t(2 * 3 + 1)] = 0;  // repeats entry 0
    st = call(tl);
    CHECK(st.code == errc::duplicate_topk_id);
    CHECK(st.row == 2);
    CHECK(grad[0] == 777.f);
    CHECK(loss == -777);
  }
}

TEST_CASE("input policy: D1 (documented): fused order on failure, any thread count") {
  // row_options::fused documents: on failure the losses are untouched and any gradient row
  // may already be written (with threads > 1 the other blocks run on, so rows after the
  // failing one too). The default order writes nothing. Row 1 fails (NaN).
  const index_t N = 4, V = 3;
  std::vector<float> z(size_t(N * V)), u(size_t(N * V), 0.f);
  for (index_t i = 0; i < N * V; ++i) z[size_t(i)] = 0.1f * float(i);
  z[size_t(1 * V + 1)] = fnan;
  for (const bool fused : {false, true})
    for (const int threads : {1, 2}) {
      CAPTURE(fused);
      CAPTURE(threads);
      std::vector<double> loss(size_t(N), 777.0);
      std::vector<float> grad(size_t(N * V), 777.f);
      host::row_options opt;
      opt.order = fused ? tropd::host::row_order::single_read : tropd::host::row_order::validate_first;
      opt.threads = threads;
      const auto st = host::divergence_rows(est::forward_kl{}, tropd::make_matrix<const float>(z.data(), N, V),
                                            tropd::make_matrix<const float>(u.data(), N, V), tropd::view_of(loss),
                                            tropd::make_matrix(grad.data(), N, V), opt);
      REQUIRE(st.code == errc::non_finite_input);
      CHECK(st.row == 1);
      CHECK(st.col == 1);
      for (double l : loss) CHECK(l == 777.0);
      // The failing row itself is never written; without fusion no row is.
      for (index_t v = 0; v < V; ++v) CHECK(grad[size_t(1 * V + v)] == 777.f);
      if (!fused)
        for (float g : grad) CHECK(g == 777.f);
      if (fused && threads == 1)  // one block: rows after the failing one are not reached
        for (index_t r = 2; r < N; ++r)
          for (index_t v = 0; v < V; ++v) CHECK(grad[size_t(r * V + v)] == 777.f);
    }
}
