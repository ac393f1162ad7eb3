// Aggregation of the composed objective (method.md 8) through evaluate_tokens: two
// micro-batches with the global normaliser equal one batch, and each mode's weights on a
// hand-made batch. (The policy alone: tests/aggregation/test_aggregation.cpp.)
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
// External normaliser: two micro-batches with the global count = one batch.
// ---------------------------------------------------------------------------

namespace {

/// Splits a batch at sequence `cut` into two micro-batches.
std::pair<no::batch, no::batch> split(const no::batch& b, size_t cut) {
  no::batch a, c;
  a.offsets = {0};
  c.offsets = {0};
  for (size_t j = 0; j + 1 < b.offsets.size(); ++j) {
    no::batch& dst = j < cut ? a : c;
    for (size_t i = b.offsets[j]; i < b.offsets[j + 1]; ++i) dst.tok.push_back(b.tok[i]);
    dst.offsets.push_back(dst.tok.size());
  }
  return {a, c};
}

template <class Obj>
void check_split(Obj o, const no::objective& ro, const no::batch& b, mode how, const tropd::host::eval_options& opt) {
  CAPTURE(tropd::aggregation::to_string(how));
  const size_t n_seq = b.offsets.size() - 1, cut = n_seq / 2;
  std::vector<uint64_t> all_ids, ids_a, ids_c;
  for (size_t j = 0; j < n_seq; ++j) {
    all_ids.push_back(1000 + j);
    (j < cut ? ids_a : ids_c).push_back(1000 + j);
  }
  // The global normaliser, counted by the reference's classification of the whole batch.
  no::objective r = ro;
  r.how = how == mode::token_mean            ? no::agg::token_mean
          : how == mode::kept_token_mean     ? no::agg::kept_token_mean
          : how == mode::seq_mean_token_mean ? no::agg::seq_mean_token_mean
          : how == mode::seq_mean_token_sum  ? no::agg::seq_mean_token_sum
                                             : no::agg::sum_over_constant;
  r.constant = 7.5L;
  std::vector<char> given;
  const lib_batch lb = to_lib(b, all_ids);
  if (ro.reg == no::region::given) given = lib_decisions(o, lb, opt);
  const no::result whole_ref = no::evaluate(r, b, given);
  ld global = 0;
  if (how == mode::token_mean)
    for (const auto& t : whole_ref.tok) global += t.counted;
  else if (how == mode::kept_token_mean)
    for (const auto& t : whole_ref.tok) global += t.kept;
  else if (how == mode::sum_over_constant)
    global = 7.5;
  else
    for (size_t j = 0; j < n_seq; ++j) {
      bool any = false;
      for (size_t i = b.offsets[j]; i < b.offsets[j + 1]; ++i) any |= whole_ref.tok[i].counted;
      global += any;
    }
  REQUIRE(global > 0);
  o.agg.how = how;
  o.agg.constant = 7.5;
  const lib_out whole = run_tokens(o, lb, opt);
  REQUIRE_MESSAGE(whole.st.ok(), whole.st.message());
  o.agg.normaliser = static_cast<double>(global);
  const auto [a, c] = split(b, cut);
  const lib_out pa = run_tokens(o, to_lib(a, ids_a), opt), pc = run_tokens(o, to_lib(c, ids_c), opt);
  REQUIRE(pa.st.ok());
  REQUIRE(pc.st.ok());
  CHECK(std::fabs((pa.loss + pc.loss) - whole.loss) <= 1e-12 * std::max(1.0, std::fabs(whole.loss)));
  CHECK(std::fabs((pa.loss + pc.loss) - double(whole_ref.loss)) <= 1e-10 * std::max(1.0, std::fabs(whole.loss)));
  std::vector<float> dl(pa.dlds), dt(pa.dtopk);
  std::vector<uint8_t> f(pa.flags);
  dl.insert(dl.end(), pc.dlds.begin(), pc.dlds.end());
  dt.insert(dt.end(), pc.dtopk.begin(), pc.dtopk.end());
  f.insert(f.end(), pc.flags.begin(), pc.flags.end());
  CHECK(dl == whole.dlds);
  CHECK(dt == whole.dtopk);
  CHECK(f == whole.flags);
}

}  // namespace

TEST_CASE("objective aggregation: two micro-batches with the global normaliser equal one batch") {
  std::mt19937_64 rng(112);
  gen_options g;
  g.p_neg_inf = 0.15;
  g.n_seq = 8;
  const no::batch b = random_batch(rng, g);
  tropd::host::eval_options opt;
  opt.seed = 77;
  opt.step = 4;
  for (mode how : {mode::token_mean, mode::kept_token_mean, mode::seq_mean_token_mean, mode::seq_mean_token_sum,
                   mode::sum_over_constant}) {
    check_split(presets::tropd({.beta = 0.01}), no::tropd(0.01L), b, how, opt);
    check_split(presets::tropd({.beta = 0.01, .k = 64, .form = tropd::outliers::fkl_form::p}), no::tropd(0.01L, false), b, how, opt);
    check_split(presets::mask_outlier({.tau = -1.0, .guidance_beta = 0.02}), no::mask_outlier(-1.0L, 0.02L), b, how, opt);
    check_split(presets::clip_outlier({.tau = -1.0}), no::clip_outlier(-1.0L), b, how, opt);
  }
}

TEST_CASE("objective aggregation: each mode's weights on a hand-made batch") {
  // Two sequences: [prompt, student, student, teacher(no guidance)] and [student x3, one
  // dropped]. mask_outlier(tau = -1): R = -0.5 kept, R = -2 dropped.
  no::batch b;
  b.offsets = {0, 4, 7};
  auto tok = [](no::who w, ld R) {
    no::token x;
    x.from = w;
    x.s = x.s_old = -1;
    x.t = -1 + R;
    x.ent_s = x.ent_t = x.rkl = x.ref = 0;
    return x;
  };
  b.tok = {tok(no::who::prompt, 0), tok(no::who::student, -0.5L), tok(no::who::student, -2), tok(no::who::teacher, 0),
           tok(no::who::student, -0.5L), tok(no::who::student, -0.25L), tok(no::who::student, -3)};
  const lib_batch lb = to_lib(b);
  auto o = presets::mask_outlier({.tau = -1.0});
  // Closed forms: loss_i = -R_i for kept tokens (rho = 1), 0 otherwise.
  //   counted = {1, 2, 4, 5, 6} (5), kept = {1, 4, 5} (3), sequences 2.
  const ld sum = 0.5L + 0.5L + 0.25L;
  struct expect { mode m; ld loss; ld w1; ld w4; };
  const expect cases[] = {
      {mode::token_mean, sum / 5, 1.0L / 5, 1.0L / 5},
      {mode::kept_token_mean, sum / 3, 1.0L / 3, 1.0L / 3},
      {mode::seq_mean_token_mean, (0.5L / 2 + 0.75L / 3) / 2, 1.0L / 4, 1.0L / 6},
      {mode::seq_mean_token_sum, (0.5L + 0.75L) / 2, 0.5L, 0.5L},
      {mode::sum_over_constant, sum / 7.5L, 1 / 7.5L, 1 / 7.5L},
  };
  for (const expect& e : cases) {
    CAPTURE(tropd::aggregation::to_string(e.m));
    o.agg.how = e.m;
    o.agg.constant = 7.5;
    const lib_out got = run_tokens(o, lb);
    REQUIRE(got.st.ok());
    CHECK(std::fabs(got.loss - e.loss) < 1e-15L);
    // dL/ds = -rho A = -R for a kept token.
    CHECK(std::fabs(got.dlds[1] - e.w1 * 0.5L) < 1e-7L);
    CHECK(std::fabs(got.dlds[4] - e.w4 * 0.5L) < 1e-7L);
    CHECK(got.dlds[2] == 0.f);
    CHECK(got.dlds[0] == 0.f);
    CHECK(got.dlds[3] == 0.f);
  }
  // An empty denominator: nothing kept gives loss 0, not NaN.
  auto none = presets::mask_outlier({.tau = 10.0});
  none.agg.how = mode::kept_token_mean;
  const lib_out got = run_tokens(none, lb);
  REQUIRE(got.st.ok());
  CHECK(got.loss == 0.0);
  CHECK(got.d.n_kept == 0);
}
