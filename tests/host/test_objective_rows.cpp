// The named objectives at row level (tropd::host::evaluate_rows): against the naive
// row-level reference (tests/reference/naive_objective.hpp), against token level chained
// through log_softmax, against finite differences of the row-level loss; temperatures, given
// teacher top-k lists, diagnostics, top-k selection edge cases. Shared helpers:
// tests/objective/fixtures.hpp.
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

#include "objective/fixtures.hpp"

using namespace tropd_test::objective_fx;

TEST_CASE("objective rows: token level chained through log_softmax equals row level, every preset") {
  std::mt19937_64 rng(201);
  using tropd::outliers::fkl_form;
  const index_t V = 40, K = 8;
  tropd::host::eval_options opt;
  opt.seed = 31;
  opt.step = 2;
  for (int rep = 0; rep < 2; ++rep) {
    const row_batch finite = random_rows(rng, V, 5, 0.0);
    const row_batch zeros = random_rows(rng, V, 5, 0.25);
    tropd::clippers::pg_clip c;
    c.eps_low = 0.2;
    c.eps_high = 0.28;
    c.dual_c = 3;
    check_token_vs_row(presets::opd({.clip = c}), finite, 0, opt);
    check_token_vs_row(presets::eopd({.tau = 0.8, .k = static_cast<int>(K)}), finite, K, opt);
    check_token_vs_row(presets::reopold({.floor = -1.0, .switch_step = 5}), finite, 0, opt);
    check_token_vs_row(presets::entropy_opd(), finite, 0, opt);
    check_token_vs_row(presets::vopd(), finite, 0, opt);
    check_token_vs_row(presets::gopd(), finite, 0, opt);
    check_token_vs_row(presets::clip_outlier({.tau = -1.0, .guidance_beta = 0.01}), zeros, 0, opt);
    check_token_vs_row(presets::mask_outlier({.tau = -1.0, .guidance_beta = 0.01}), zeros, 0, opt);
    check_token_vs_row(presets::fkl_outlier({.k = static_cast<int>(K), .form = fkl_form::c}), zeros, K, opt);
    check_token_vs_row(presets::fkl_outlier({.k = static_cast<int>(K), .form = fkl_form::p}), zeros, K, opt);
    check_token_vs_row(presets::tropd({.beta = 0.01, .k = static_cast<int>(K)}), zeros, K, opt);
    check_token_vs_row(presets::tropd({.beta = 0.01, .k = static_cast<int>(K), .form = fkl_form::p}), zeros, K, opt);
  }
}

TEST_CASE("objective rows: row level against the naive row-level reference, every preset") {
  std::mt19937_64 rng(202);
  using tropd::outliers::fkl_form;
  const index_t V = 40, K = 8;
  tropd::host::eval_options opt;
  opt.seed = 32;
  for (int rep = 0; rep < 2; ++rep) {
    row_batch finite = random_rows(rng, V, 5, 0.0);
    row_batch zeros = random_rows(rng, V, 5, 0.25);
    check_rows_vs_reference(presets::opd(), no::opd(), finite, 0, opt);
    tropd::clippers::pg_clip c;
    c.eps_low = 0.2;
    c.eps_high = 0.28;
    c.dual_c = 3;
    no::pg_clip rc;
    rc.eps_low = 0.2L;
    rc.eps_high = 0.28L;
    rc.dual_c = 3;
    // s_old away from s, so that the PPO clip acts.
    std::normal_distribution<double> N(0, 0.3);
    finite.s_old.clear();
    for (index_t r = 0; r < finite.n; ++r) {
      const vec ls = naive::log_softmax(finite.zrow(r));
      finite.s_old.push_back(std::min(-1e-4f, fl_of(double(ls[static_cast<size_t>(finite.y[static_cast<size_t>(r)])]) + N(rng))));
    }
    check_rows_vs_reference(presets::opd({.clip = c}), no::opd(rc), finite, 0, opt);
    check_rows_vs_reference(presets::eopd({.tau = 0.8, .k = static_cast<int>(K)}), no::eopd(), finite, K, opt);
    check_rows_vs_reference(presets::reopold({.floor = -1.0, .switch_step = 5}), no::reopold(-1.0L, 5, 0), finite, 0, opt);
    tropd::host::eval_options late = opt;
    late.step = 7;
    check_rows_vs_reference(presets::reopold({.floor = -1.0, .switch_step = 5}), no::reopold(-1.0L, 5, 7), finite, 0, late);
    check_rows_vs_reference(presets::entropy_opd(), no::entropy_opd(), finite, 0, opt);
    check_rows_vs_reference(presets::vopd(), no::vopd(), finite, 0, opt);
    check_rows_vs_reference(presets::gopd(), no::gopd(), finite, 0, opt);
    check_rows_vs_reference(presets::clip_outlier({.tau = -1.0, .guidance_beta = 0.01}), no::clip_outlier(-1.0L, 0.01L), zeros, 0, opt);
    check_rows_vs_reference(presets::mask_outlier({.tau = -1.0, .guidance_beta = 0.01}), no::mask_outlier(-1.0L, 0.01L), zeros, 0, opt);
    check_rows_vs_reference(presets::fkl_outlier({.k = static_cast<int>(K), .form = fkl_form::c}), no::fkl_outlier(true), zeros, K, opt);
    check_rows_vs_reference(presets::fkl_outlier({.k = static_cast<int>(K), .form = fkl_form::p}), no::fkl_outlier(false), zeros, K, opt);
    check_rows_vs_reference(presets::tropd({.beta = 0.01, .k = static_cast<int>(K)}), no::tropd(0.01L), zeros, K, opt);
    check_rows_vs_reference(presets::tropd({.beta = 0.01, .k = static_cast<int>(K), .form = fkl_form::p}), no::tropd(0.01L, false), zeros, K, opt);
  }
}

TEST_CASE("objective rows: gkd (full-vocabulary JSD) against naive::jsd, every beta and aggregation") {
  std::mt19937_64 rng(203);
  const row_batch rb = random_rows(rng, 33, 4, 0.0);
  for (double beta : {0.0, 0.1, 0.5, 0.9, 1.0}) {
    CAPTURE(beta);
    for (mode how : {mode::token_mean, mode::seq_mean_token_mean, mode::sum_over_constant}) {
      auto o = presets::gkd({.beta = beta});
      o.agg.how = how;
      o.agg.constant = 7.5;
      o.dense_weight = 0.7;
      no::objective ro = no::gkd(beta);
      ro.how = how == mode::token_mean ? no::agg::token_mean
                                       : (how == mode::seq_mean_token_mean ? no::agg::seq_mean_token_mean : no::agg::sum_over_constant);
      ro.constant = 7.5;
      ro.dense_weight = 0.7L;
      check_rows_vs_reference(o, ro, rb, 0);
      const row_out got = run_rows(o, rb, 0);
      REQUIRE(got.st.ok());
      CHECK(got.loss == doctest::Approx(got.d.loss_dense).epsilon(1e-14));
    }
  }
  // With guidance on top: the SFT term on teacher-prefix rows adds to the dense term.
  auto o = presets::gkd({.beta = 0.5});
  o.guidance_beta = 0.1;
  no::objective ro = no::gkd(0.5L);
  ro.guidance_beta = 0.1L;
  check_rows_vs_reference(o, ro, rb, 0);
}

namespace {

/// Central finite differences of evaluate_rows' loss with respect to the student logits.
template <class Obj>
void check_rows_fd(const Obj& o, row_batch rb, index_t K, const tropd::host::eval_options& opt,
                   const std::vector<float>& topk_old = {}) {
  const row_out base = run_rows(o, rb, K, opt, topk_old);
  REQUIRE_MESSAGE(base.st.ok(), base.st.message());
  const double h = 2e-3;
  ld gs = 0, err = 0;
  for (double g : base.grad) gs = std::max<ld>(gs, std::fabs(g));
  for (index_t i = 0; i < rb.n * rb.V; ++i) {
    const double z0 = rb.z[static_cast<size_t>(i)];
    rb.z[static_cast<size_t>(i)] = z0 + h;
    const row_out up = run_rows(o, rb, K, opt, topk_old);
    rb.z[static_cast<size_t>(i)] = z0 - h;
    const row_out dn = run_rows(o, rb, K, opt, topk_old);
    rb.z[static_cast<size_t>(i)] = z0;
    REQUIRE(up.st.ok());
    REQUIRE(dn.st.ok());
    // The decisions must not move under the perturbation (s_old is fixed).
    REQUIRE(up.flags == base.flags);
    REQUIRE(dn.flags == base.flags);
    const ld fd = (ld(up.loss) - ld(dn.loss)) / (2 * h);
    err = std::max(err, std::fabs(fd - base.grad[static_cast<size_t>(i)]));
  }
  CAPTURE(gs);
  CAPTURE(err);
  CHECK(gs > 1e-4L);
  CHECK(err <= 5e-3L * gs);
}

/// s_old fixed at the current student log-prob of each row's token (rounded to fp32).
void freeze_s_old(row_batch& rb) {
  rb.s_old.clear();
  for (index_t r = 0; r < rb.n; ++r) {
    const vec ls = naive::log_softmax(rb.zrow(r));
    rb.s_old.push_back(fl_of(double(ls[static_cast<size_t>(rb.y[static_cast<size_t>(r)])])));
  }
}

/// Rollout-time student log-probs at the teacher's top-K ids, in the row path's order
/// (descending teacher logit, ties by lower id).
std::vector<float> freeze_topk_old(const row_batch& rb, index_t K) {
  std::vector<float> out;
  for (index_t r = 0; r < rb.n; ++r) {
    const no::token x = no::token_from_row(rb.zrow(r), rb.urow(r), 0, no::who::student, static_cast<int>(K));
    for (index_t k = 0; k < K; ++k) out.push_back(x.lq[static_cast<size_t>(k)] == -ldinf ? 0.f : fl_of(double(x.ls[static_cast<size_t>(k)])));
  }
  return out;
}

}  // namespace

TEST_CASE("objective rows: rollout-time top-k log-probs (form C) are read in the row path's top-k order") {
  std::mt19937_64 rng(209);
  std::normal_distribution<double> N(0, 0.5);
  const index_t V = 25, K = 6;
  tropd::host::eval_options opt;
  opt.seed = 14;
  row_batch rb = random_rows(rng, V, 4, 0.3);
  freeze_s_old(rb);
  // Rollout-time student: the same teacher (so the same top-k ids), other student logits.
  row_batch old = rb;
  for (double& z : old.z) z += N(rng);
  const std::vector<float> topk_old = freeze_topk_old(old, K);
  check_rows_vs_reference(presets::tropd({.beta = 0.05, .k = static_cast<int>(K)}), no::tropd(0.05L), rb, K, opt, topk_old);
  check_rows_vs_reference(presets::fkl_outlier({.k = static_cast<int>(K), .form = tropd::outliers::fkl_form::c, .clamp = 0.3}),
                          no::fkl_outlier(true, 0.3L), rb, K, opt, topk_old);
}

TEST_CASE("objective rows: gradients match finite differences of the row-level loss") {
  std::mt19937_64 rng(204);
  using tropd::outliers::fkl_form;
  const index_t V = 12, K = 5;
  tropd::host::eval_options opt;
  opt.seed = 8;
  row_batch finite = random_rows(rng, V, 2, 0.0);
  row_batch zeros = random_rows(rng, V, 2, 0.3);
  freeze_s_old(finite);
  freeze_s_old(zeros);
  SUBCASE("opd") { check_rows_fd(presets::opd(), finite, 0, opt); }
  SUBCASE("mask_outlier with guidance") { check_rows_fd(presets::mask_outlier({.tau = -1.0, .guidance_beta = 0.05}), zeros, 0, opt); }
  SUBCASE("clip_outlier") { check_rows_fd(presets::clip_outlier({.tau = -1.0}), zeros, 0, opt); }
  SUBCASE("fkl form P (stochastic region, fixed by s_old)") {
    check_rows_fd(presets::fkl_outlier({.k = static_cast<int>(K), .form = fkl_form::p}), zeros, K, opt);
  }
  SUBCASE("tropd form C with rollout-time top-k log-probs") {
    check_rows_fd(presets::tropd({.beta = 0.05, .k = static_cast<int>(K)}), zeros, K, opt, freeze_topk_old(zeros, K));
  }
  SUBCASE("eopd") { check_rows_fd(presets::eopd({.tau = 0.8, .k = static_cast<int>(K)}), finite, K, opt); }
  SUBCASE("gkd") { check_rows_fd(presets::gkd({.beta = 0.3}), finite, 0, opt); }
}

TEST_CASE("objective rows: diagnostics at row level (entropies, reverse KL, top-k masses)") {
  std::mt19937_64 rng(205);
  const index_t V = 30, K = 6;
  const row_batch rb = random_rows(rng, V, 4, 0.25);
  tropd::host::eval_options opt;
  opt.seed = 3;
  const row_out got = run_rows(presets::tropd({.beta = 0.01, .k = static_cast<int>(K)}), rb, K, opt);
  REQUIRE(got.st.ok());
  ld ns = 0, hs = 0, ht = 0, tv = 0, nzero = 0, sk = 0, pk = 0, ntk = 0;
  for (index_t r = 0; r < rb.n; ++r) {
    if (rb.who[static_cast<size_t>(r)] != no::who::student) continue;
    const no::token x = no::token_from_row(rb.zrow(r), rb.urow(r), rb.y[static_cast<size_t>(r)], no::who::student, static_cast<int>(K));
    ns += 1;
    hs += x.ent_s;
    ht += x.ent_t;
    const ld R = x.t - x.s;
    tv += 1 - std::min<ld>(1, std::exp(R));
    nzero += R == -ldinf;
    if (!(got.flags[static_cast<size_t>(r)] & fl::trusted)) {
      const no::fkl_value f = no::topk_fkl(x.lq, x.ls, no::tail::renormalised);
      sk += f.SK;
      pk += f.PK;
      ntk += 1;
    }
  }
  REQUIRE(ntk > 0);
  CHECK(got.d.n_student == static_cast<index_t>(ns));
  CHECK(got.d.n_zero_teacher_mass == static_cast<index_t>(nzero));
  CHECK(std::fabs(got.d.mean_student_entropy - hs / ns) < 1e-6L);
  CHECK(std::fabs(got.d.mean_teacher_entropy - ht / ns) < 1e-6L);
  CHECK(std::fabs(got.d.tv_estimate - tv / ns) < 1e-6L);
  CHECK(std::fabs(got.d.mean_topk_teacher_mass - sk / ntk) < 1e-6L);
  CHECK(std::fabs(got.d.mean_topk_student_mass - pk / ntk) < 1e-6L);
}

TEST_CASE("objective rows: student and teacher temperatures") {
  std::mt19937_64 rng(206);
  using tropd::outliers::fkl_form;
  const index_t V = 30, K = 6;
  tropd::host::eval_options opt;
  opt.seed = 12;
  const row_batch finite = random_rows(rng, V, 4, 0.0), zeros = random_rows(rng, V, 4, 0.25);
  for (const auto& temps : {std::pair{2.0, 0.5}, std::pair{0.7, 1.0}, std::pair{1.0, 1.5}}) {
    const double ts = temps.first, tt = temps.second;
    CAPTURE(ts);
    CAPTURE(tt);
    check_rows_vs_reference(presets::opd(), no::opd(), finite, 0, opt, {}, ts, tt);
    check_rows_vs_reference(presets::entropy_opd({.fraction = 0.4}), no::entropy_opd(0.4L), finite, 0, opt, {}, ts, tt);
    check_rows_vs_reference(presets::tropd({.beta = 0.02, .k = static_cast<int>(K)}), no::tropd(0.02L), zeros, K, opt, {}, ts, tt);
    check_rows_vs_reference(presets::tropd({.beta = 0.02, .k = static_cast<int>(K), .form = fkl_form::p}), no::tropd(0.02L, false), zeros, K, opt, {}, ts, tt);
    check_rows_vs_reference(presets::gkd({.beta = 0.5}), no::gkd(0.5L), finite, 0, opt, {}, ts, tt);
  }
}

TEST_CASE("objective rows: given teacher top-k lists (shuffled, padded) equal token level with the same lists") {
  std::mt19937_64 rng(207);
  using tropd::outliers::fkl_form;
  const index_t V = 30, K = 7;
  const row_batch rb = random_rows(rng, V, 4, 0.25);
  tropd::host::eval_options opt;
  opt.seed = 21;
  // Lists: the teacher's top 6 in shuffled order, one padding entry (id -1, -inf).
  std::vector<int32_t> ids(static_cast<size_t>(rb.n * K));
  std::vector<float> lp(static_cast<size_t>(rb.n * K));
  no::batch b;
  b.offsets = rb.offsets;
  for (index_t r = 0; r < rb.n; ++r) {
    no::token x = no::token_from_row(rb.zrow(r), rb.urow(r), rb.y[static_cast<size_t>(r)], rb.who[static_cast<size_t>(r)], 6);
    x.ref = rb.ref[static_cast<size_t>(r)];
    x.ids.push_back(-1);
    x.lq.push_back(-ldinf);
    x.ls.push_back(0);
    std::vector<size_t> perm(static_cast<size_t>(K));
    for (size_t k = 0; k < perm.size(); ++k) perm[k] = k;
    std::shuffle(perm.begin(), perm.end(), rng);
    no::token y = x;
    for (index_t k = 0; k < K; ++k) {
      const size_t from = perm[static_cast<size_t>(k)];
      y.ids[static_cast<size_t>(k)] = x.ids[from];
      y.lq[static_cast<size_t>(k)] = x.lq[from];
      y.ls[static_cast<size_t>(k)] = x.ls[from];
      ids[static_cast<size_t>(r * K + k)] = x.ids[from];
      lp[static_cast<size_t>(r * K + k)] = fl_of(double(x.lq[from]));
    }
    b.tok.push_back(y);
  }
  tropd::host::topk_lists lists;
  lists.ids = tropd::make_matrix<const int32_t>(ids.data(), rb.n, K);
  lists.logprobs = tropd::make_matrix<const float>(lp.data(), rb.n, K);
  for (bool form_c : {true, false}) {
    CAPTURE(form_c);
    // The preset's k must be the lists' width (a mismatch is an error, tested in test_bad_input).
    const auto o = presets::tropd({.beta = 0.01, .k = static_cast<int>(K), .form = form_c ? fkl_form::c : fkl_form::p});
    const row_out rows = run_rows(o, rb, K, opt, {}, 1, 1, 1, &lists);
    REQUIRE_MESSAGE(rows.st.ok(), rows.st.message());
    lib_batch lb = to_lib(b, rb.seq_ids);
    for (auto& id : lb.ids) id = std::max(id, 0);  // padding ids are ignored either way
    lb.with_ls_old = false;
    const lib_out toks = run_tokens(o, lb, opt);
    REQUIRE_MESSAGE(toks.st.ok(), toks.st.message());
    CHECK(std::fabs(toks.loss - rows.loss) <= 2e-6 * std::max(1.0, std::fabs(rows.loss)));
    CHECK(toks.flags == rows.flags);
    ld err = 0, gs = 1e-12L;
    for (index_t r = 0; r < rb.n; ++r) {
      vec g(static_cast<size_t>(K));
      std::vector<int> cid(static_cast<size_t>(K));
      for (index_t k = 0; k < K; ++k) {
        g[static_cast<size_t>(k)] = toks.dtopk[static_cast<size_t>(r * K + k)];
        cid[static_cast<size_t>(k)] = std::max(0, b.tok[static_cast<size_t>(r)].ids[static_cast<size_t>(k)]);
        // The row path reports the same per-entry gradient in list order.
        CHECK(std::fabs(rows.dtopk[static_cast<size_t>(r * K + k)] - toks.dtopk[static_cast<size_t>(r * K + k)]) <=
              2e-6 * std::fabs(toks.dtopk[static_cast<size_t>(r * K + k)]) + 1e-9);
      }
      const vec chained = no::chain_to_logits(rb.zrow(r), rb.y[static_cast<size_t>(r)], toks.dlds[static_cast<size_t>(r)], cid, g);
      for (index_t v = 0; v < V; ++v) {
        gs = std::max(gs, std::fabs(chained[static_cast<size_t>(v)]));
        err = std::max(err, std::fabs(rows.grad[static_cast<size_t>(r * V + v)] - chained[static_cast<size_t>(v)]));
      }
    }
    CHECK(err <= 2e-6L * gs);
  }
}

TEST_CASE("objective rows: top-k selection edge cases (ties at the k-th place, few finite teacher entries, k > V)") {
  std::mt19937_64 rng(208);
  std::normal_distribution<double> N(0, 1);
  using tropd::outliers::fkl_form;
  tropd::host::eval_options opt;
  opt.seed = 5;
  for (index_t V : {6, 20}) {
    CAPTURE(V);
    row_batch rb = random_rows(rng, V, 4, 0.2);
    for (index_t r = 0; r < rb.n; ++r) {
      for (index_t v = 0; v < V; ++v) {
        double& u = rb.u[static_cast<size_t>(r * V + v)];
        if (std::isinf(u)) continue;
        if (r % 3 == 0) u = std::round(1.5 * N(rng));            // integer logits: ties everywhere
        if (r % 3 == 1 && v % 4 != 0 && v != rb.y[static_cast<size_t>(r)]) u = -ldinf;  // few finite entries
      }
    }
    for (index_t K : {index_t(3), index_t(8)}) {
      CAPTURE(K);
      // Row level uses min(k, V) top-k columns (k > V: the whole vocabulary, no padding).
      const index_t Kw = std::min(K, V);
      check_token_vs_row(presets::tropd({.beta = 0.01, .k = static_cast<int>(K)}), rb, Kw, opt);
      check_token_vs_row(presets::tropd({.beta = 0.01, .k = static_cast<int>(K), .form = fkl_form::p}), rb, Kw, opt);
      check_rows_vs_reference(presets::tropd({.beta = 0.01, .k = static_cast<int>(K), .form = fkl_form::p}), no::tropd(0.01L, false), rb, Kw, opt);
      check_rows_vs_reference(presets::tropd({.beta = 0.01, .k = static_cast<int>(K)}), no::tropd(0.01L), rb, Kw, opt);
    }
  }
}
