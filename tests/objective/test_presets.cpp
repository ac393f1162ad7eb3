// The named objectives of tropd/objective.hpp (presets) at token level, evaluated by
// tropd::host::evaluate_tokens against the naive long-double reference of
// tests/reference/naive_objective.hpp (written from docs/method.md), under every aggregation
// mode and an external normaliser, with the diagnostics. Shared helpers:
// tests/objective/fixtures.hpp. Aggregation across micro-batches:
// tests/aggregation/test_objective_aggregation.cpp; row level: tests/host/test_objective_rows.cpp.
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

// ---------------------------------------------------------------------------
// Token level: each preset against the reference.
// ---------------------------------------------------------------------------

TEST_CASE("objective presets: opd, with and without PPO / dual clipping") {
  std::mt19937_64 rng(101);
  gen_options g;
  g.n_seq = 14;
  for (int rep = 0; rep < 3; ++rep) {
    const no::batch b = random_batch(rng, g);
    check_preset(presets::opd(), no::opd(), b);
    // PPO 0.2 / 0.28 with dual clip 3, and PPO 0.2 / 0.2.
    tropd::clippers::pg_clip c;
    c.eps_low = 0.2;
    c.eps_high = 0.28;
    c.dual_c = 3;
    no::pg_clip rc;
    rc.eps_low = 0.2L;
    rc.eps_high = 0.28L;
    rc.dual_c = 3;
    check_preset(presets::opd({.clip = c}), no::opd(rc), b);
    c.eps_high = 0.2;
    c.dual_c = 0;
    rc.eps_high = 0.2L;
    rc.dual_c = 0;
    check_preset(presets::opd({.clip = c}), no::opd(rc), b);
  }
}

TEST_CASE("objective presets: the PPO / dual clip flags are exercised by the random batches") {
  // Guards the test above against vacuity: the batches must contain ratio-clipped tokens of
  // both kinds (PPO and dual), as classified by the reference.
  std::mt19937_64 rng(101);
  gen_options g;
  g.n_seq = 14;
  int ppo = 0, dual = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const no::batch b = random_batch(rng, g);
    for (const auto& x : b.tok) {
      if (x.from != no::who::student) continue;
      const ld A = x.t - x.s_old, rho = std::exp(x.s - x.s_old);
      if ((A > 0 && rho > 1.28L) || (A < 0 && rho < 0.8L)) ++ppo;
      if (A < 0 && rho > 3) ++dual;
    }
  }
  CHECK(ppo > 3);
  CHECK(dual > 0);
}

TEST_CASE("objective presets: opd refuses a trusted token with zero teacher mass") {
  std::mt19937_64 rng(102);
  gen_options g;
  g.p_neg_inf = 0.3;
  const no::batch b = random_batch(rng, g);
  const lib_out got = run_tokens(presets::opd(), to_lib(b));
  CHECK(got.st.code == tropd::errc::infinite_divergence);
  CHECK(got.dlds[0] == 777.f);  // nothing written on failure
  CHECK(no::evaluate(no::opd(), b).error);
}

TEST_CASE("objective presets: opd with a reward clip (adv_lo) gives a zero-teacher-mass token A = adv_lo") {
  // The error evaluate_token returns for a trusted token with R = -inf says "use a trust
  // region, an outlier handler or a reward clip"; with the reward clip A = max(R, adv_lo)
  // (method.md 3, 5) the advantage is finite and the token must be evaluated.
  no::batch b;
  b.offsets = {0, 2};
  for (float t : {-0.5f, -finf}) {
    no::token x;
    x.s = x.s_old = -1;
    x.t = t;
    x.ent_s = x.ent_t = x.rkl = x.ref = 0;
    b.tok.push_back(x);
  }
  tropd::clippers::pg_clip c;
  c.adv_lo = -5;
  no::pg_clip rc;
  rc.adv_lo = -5;
  const no::result want = no::evaluate(no::opd(rc), b);
  REQUIRE_FALSE(want.error);
  CHECK(want.tok[1].adv == -5);
  const lib_out got = run_tokens(presets::opd({.clip = c}), to_lib(b));
  // Regression: evaluate_token once tested is_finite(advantage) before obj.clip and
  // returned errc::infinite_divergence here.
  CHECK_MESSAGE(got.st.ok(), got.st.message());
  if (got.st.ok()) compare(got, want, b);
}

TEST_CASE("objective presets: eopd (teacher-entropy gate, additive top-k FKL form P, PPO 0.2)") {
  std::mt19937_64 rng(103);
  for (int rep = 0; rep < 3; ++rep) {
    const no::batch b = random_batch(rng, {});
    check_preset(presets::eopd(), no::eopd(), b);
    check_preset(presets::eopd({.tau = 0.5, .k = 16, .eps_low = 0.1, .eps_high = 0.3}), no::eopd(0.5L, 0.1L, 0.3L), b);
  }
}

TEST_CASE("objective presets: reopold, both phases, and the floor conversions") {
  std::mt19937_64 rng(104);
  const double floor = -1.0;
  for (int rep = 0; rep < 3; ++rep) {
    const no::batch b = random_batch(rng, {});
    for (uint64_t step : {0ull, 9ull, 10ull, 50ull}) {
      CAPTURE(step);
      tropd::host::eval_options opt;
      opt.step = step;
      check_preset(presets::reopold({.floor = floor, .switch_step = 10}), no::reopold(floor, 10, static_cast<long long>(step)), b, opt);
      check_preset(presets::reopold({.floor = floor, .switch_step = 10, .entropy_fraction = 0.35}), no::reopold(floor, 10, static_cast<long long>(step), 0.35L), b, opt);
    }
  }
  // With zero-teacher-mass tokens: dropped in phase I, A = floor when kept in phase II.
  gen_options g;
  g.p_neg_inf = 0.2;
  int kept_zero_mass = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const no::batch b = random_batch(rng, g);
    for (uint64_t step : {3ull, 30ull}) {
      CAPTURE(step);
      tropd::host::eval_options opt;
      opt.step = step;
      check_preset(presets::reopold({.floor = floor, .switch_step = 10, .entropy_fraction = 0.5}), no::reopold(floor, 10, static_cast<long long>(step), 0.5L), b, opt);
    }
    const no::result r = no::evaluate(no::reopold(floor, 10, 30, 0.5L), b);
    for (size_t i = 0; i < b.tok.size(); ++i) kept_zero_mass += r.tok[i].kept && b.tok[i].t == -ldinf;
  }
  CHECK(kept_zero_mass > 0);  // the case above is exercised
  // method.md 5: floor(lambda) = log(lambda) / (1 - lambda) or log(lambda / (1 - lambda)).
  for (ld lambda : {0.1L, 0.3L, 0.5L, 0.8L}) {
    CHECK(std::fabs(presets::reopold_floor_ratio(double(lambda)) - std::log(lambda) / (1 - lambda)) < 1e-14L);
    CHECK(std::fabs(presets::reopold_floor_logit(double(lambda)) - std::log(lambda / (1 - lambda))) < 1e-14L);
  }
}

TEST_CASE("objective presets: reopold phase II gives a kept zero-teacher-mass token A = max(-inf, floor) = floor") {
  // method.md 5: REOPOLD's advantage is A = max(R, floor) on the kept tokens; in phase II the
  // kept tokens are chosen by student entropy alone, so a token the teacher gives zero mass
  // (R = -inf) can be kept, and its advantage is the floor, a finite number.
  no::batch b;
  b.offsets = {0, 4};
  const float ts[] = {-0.5f, -finf, -2.5f, -1.2f};
  const float hs[] = {0.5f, 3.0f, 1.0f, 0.1f};  // the -inf token has the largest entropy
  for (int i = 0; i < 4; ++i) {
    no::token x;
    x.s = x.s_old = -1;
    x.t = ts[i];
    x.ent_s = hs[i];
    x.ent_t = x.rkl = x.ref = 0;
    b.tok.push_back(x);
  }
  const double floor = -1.0;
  tropd::host::eval_options opt;
  opt.step = 20;  // phase II
  const no::result want = no::evaluate(no::reopold(floor, 10, 20, 0.5L), b);
  REQUIRE_FALSE(want.error);
  CHECK(want.tok[1].trusted);
  CHECK(want.tok[1].adv == floor);
  const lib_out got = run_tokens(presets::reopold({.floor = floor, .switch_step = 10, .entropy_fraction = 0.5}), to_lib(b), opt);
  // Regression: evaluate_token once rejected the non-finite trust advantage
  // (errc::infinite_divergence) before the pg_clip's adv_lo = floor was applied.
  CHECK_MESSAGE(got.st.ok(), got.st.message());
  if (got.st.ok()) compare(got, want, b);
}

TEST_CASE("objective presets: entropy_opd keeps the top fraction of student tokens by entropy") {
  std::mt19937_64 rng(105);
  for (int rep = 0; rep < 3; ++rep) {
    const no::batch b = random_batch(rng, {});
    for (double f : {0.2, 0.5, 1.0, 0.01}) {
      CAPTURE(f);
      check_preset(presets::entropy_opd({.fraction = f}), no::entropy_opd(f), b);
    }
  }
  // f n an exact integer in real arithmetic but not in floating point: 0.2 * 10 keeps 2.
  no::batch b;
  b.offsets = {0, 10};
  for (int i = 0; i < 10; ++i) {
    no::token x;
    x.s = x.s_old = -1;
    x.t = -1.5f;
    x.ent_s = static_cast<float>(i);
    x.ent_t = 0;
    x.rkl = 0;
    x.ref = 0;
    b.tok.push_back(x);
  }
  const lib_out got = run_tokens(presets::entropy_opd({.fraction = 0.2}), to_lib(b));
  REQUIRE(got.st.ok());
  CHECK(got.d.n_trusted == 2);
  check_preset(presets::entropy_opd({.fraction = 0.2}), no::entropy_opd(0.2L), b);
}

TEST_CASE("objective presets: clip_outlier and mask_outlier, with -inf teacher log-probs and guidance") {
  std::mt19937_64 rng(106);
  gen_options g;
  g.p_neg_inf = 0.15;
  for (int rep = 0; rep < 3; ++rep) {
    const no::batch b = random_batch(rng, g);
    for (double tau : {-1.5, -0.3}) {
      CAPTURE(tau);
      check_preset(presets::clip_outlier({.tau = tau}), no::clip_outlier(tau), b);
      check_preset(presets::mask_outlier({.tau = tau}), no::mask_outlier(tau), b);
      check_preset(presets::clip_outlier({.tau = tau, .guidance_beta = 0.01}), no::clip_outlier(tau, 0.01L), b);
      check_preset(presets::mask_outlier({.tau = tau, .guidance_beta = 0.01}), no::mask_outlier(tau, 0.01L), b);
    }
  }
}

TEST_CASE("objective presets: fkl_outlier, form C and form P, with and without the clamp") {
  std::mt19937_64 rng(107);
  gen_options g;
  g.p_neg_inf = 0.15;
  for (int rep = 0; rep < 3; ++rep) {
    const no::batch b = random_batch(rng, g);
    tropd::host::eval_options opt;
    opt.seed = 1234 + static_cast<uint64_t>(rep);
    opt.step = 3;
    const std::vector<uint64_t> ids = {11, 12, 13, 14, 15, 16, 17};
    using tropd::outliers::fkl_form;
    check_preset(presets::fkl_outlier({.k = 64, .form = fkl_form::c}), no::fkl_outlier(true), b, opt, true, ids);
    check_preset(presets::fkl_outlier({.k = 64, .form = fkl_form::p}), no::fkl_outlier(false), b, opt, true, ids);
    check_preset(presets::fkl_outlier({.k = 64, .form = fkl_form::c, .clamp = 0.4}), no::fkl_outlier(true, 0.4L), b, opt, true, ids);
    check_preset(presets::fkl_outlier({.k = 64, .form = fkl_form::p, .clamp = 0.4}), no::fkl_outlier(false, 0.4L), b, opt, true);
    // The outlier term's weight (form C: scales the clamped advantage; form P: the loss).
    for (bool form_c : {true, false}) {
      auto wo = presets::fkl_outlier({.k = 64, .form = form_c ? fkl_form::c : fkl_form::p, .clamp = 0.4});
      wo.outlier.weight = 0.3;
      no::objective rw = no::fkl_outlier(form_c, 0.4L);
      rw.fkl_weight = 0.3L;
      check_preset(wo, rw, b, opt, true, ids);
    }
    // Raw teacher top-k (S_K < 1 here) instead of the renormalised default.
    auto raw_c = presets::fkl_outlier({.k = 64, .form = fkl_form::c});
    raw_c.outlier.fkl.tail = tropd::estimators::topk_tail::raw;
    check_preset(raw_c, no::fkl_outlier(true, ldinf, no::tail::raw), b, opt, true);
    auto raw_p = presets::fkl_outlier({.k = 64, .form = fkl_form::p});
    raw_p.outlier.fkl.tail = tropd::estimators::topk_tail::raw;
    check_preset(raw_p, no::fkl_outlier(false, ldinf, no::tail::raw), b, opt, true);
    // Without rollout-time top-k log-probs form C uses the current ones.
    no::batch b2 = b;
    for (auto& x : b2.tok) x.ls_old.clear();
    lib_batch lb2 = to_lib(b2, ids);
    lb2.with_ls_old = false;
    const auto given = lib_decisions(presets::fkl_outlier(), lb2, opt);
    compare(run_tokens(presets::fkl_outlier(), lb2, opt), no::evaluate(no::fkl_outlier(true), b2, given), b2);
  }
}

TEST_CASE("objective presets: the stochastic region's decisions obey its definition on the test batches") {
  std::mt19937_64 rng(108);
  gen_options g;
  g.p_neg_inf = 0.2;
  g.n_seq = 16;
  const no::batch b = random_batch(rng, g);
  const lib_batch lb = to_lib(b);
  tropd::host::eval_options opt;
  opt.seed = 5;
  const auto m = lib_decisions(presets::tropd(), lb, opt);
  int outliers = 0, trusted_neg = 0;
  for (size_t i = 0; i < b.tok.size(); ++i) {
    if (b.tok[i].from != no::who::student) continue;
    const ld R = b.tok[i].t - b.tok[i].s_old;
    if (R >= 0) CHECK(m[i] == 1);
    if (R == -ldinf) CHECK(m[i] == 0);
    outliers += m[i] == 0;
    trusted_neg += (m[i] == 1 && R < 0);
  }
  // Both kinds of decisions occur (otherwise the preset tests above test less than they claim).
  CHECK(outliers > 3);
  CHECK(trusted_neg > 3);
  // The trusted bit of evaluate_tokens' flags is decide()'s decision.
  const lib_out got = run_tokens(presets::tropd(), lb, opt);
  REQUIRE(got.st.ok());
  for (size_t i = 0; i < b.tok.size(); ++i)
    if (b.tok[i].from == no::who::student) CHECK(((got.flags[i] & fl::trusted) != 0) == (m[i] != 0));
}

TEST_CASE("objective presets: tropd (guidance beta, SFT and PG forms; form C and P)") {
  std::mt19937_64 rng(109);
  gen_options g;
  g.p_neg_inf = 0.15;
  for (int rep = 0; rep < 3; ++rep) {
    const no::batch b = random_batch(rng, g);
    tropd::host::eval_options opt;
    opt.seed = 99;
    opt.step = static_cast<uint64_t>(rep);
    using tropd::outliers::fkl_form;
    check_preset(presets::tropd(), no::tropd(), b, opt, true);
    check_preset(presets::tropd({.beta = 0.05, .k = 64, .form = fkl_form::p}), no::tropd(0.05L, false), b, opt, true);
    check_preset(presets::tropd({.beta = 0.05, .k = 64, .form = fkl_form::c, .clamp = 1.0}), no::tropd(0.05L, true, 1.0L), b, opt, true);
    auto pg = presets::tropd({.beta = 0.05});
    pg.guidance = tropd::guidance_form::pg;
    no::objective rpg = no::tropd(0.05L);
    rpg.guidance_pg = true;
    check_preset(pg, rpg, b, opt, true);
  }
}

TEST_CASE("objective presets: vopd and gopd") {
  std::mt19937_64 rng(110);
  for (int rep = 0; rep < 3; ++rep) {
    const no::batch b = random_batch(rng, {});
    check_preset(presets::vopd(), no::vopd(), b);
    check_preset(presets::gopd(), no::gopd(), b);
    check_preset(presets::gopd({.lambda = 2.0}), no::gopd(2.0L), b);
    check_preset(presets::gopd({.lambda = 1.0}), no::opd(), b);  // lambda = 1 is OPD
  }
}

TEST_CASE("objective presets: gkd needs logits at token level") {
  std::mt19937_64 rng(111);
  const no::batch b = random_batch(rng, {});
  const lib_out got = run_tokens(presets::gkd(), to_lib(b));
  CHECK(got.st.code == tropd::errc::unsupported);
}
