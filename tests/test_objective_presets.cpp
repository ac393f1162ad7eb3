// The named objectives of tropd/objective.hpp (presets), evaluated by tropd::host at token
// level (evaluate_tokens) and at row level (evaluate_rows), against the naive long-double
// reference of tests/reference/naive_objective.hpp (written from docs/method.md), against
// each other (token level chained through log_softmax = row level), and against finite
// differences of the row-level loss. Also: every aggregation mode, the external normaliser
// (two micro-batches = one batch), and the diagnostics.
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>
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
namespace presets = tropd::presets;
namespace fl = tropd::flags;

namespace {

constexpr float finf = std::numeric_limits<float>::infinity();
constexpr ld ldinf = std::numeric_limits<ld>::infinity();

// ---------------------------------------------------------------------------
// Random token batches (values are floats, so the library and the reference read the
// same numbers exactly).
// ---------------------------------------------------------------------------

struct gen_options {
  double p_neg_inf = 0;     ///< probability that a student token has t = -inf
  int K = 6;                ///< top-k list length
  int n_seq = 7;
  bool teacher_prefix = true;
  double wide_ratio = 0.25;  ///< fraction of tokens with a large |s - s_old| (dual clip)
};

float fl_of(double x) { return static_cast<float>(x); }

/// A log-probability vector of `m` outcomes from normal logits (sd), as floats.
std::vector<float> random_logprobs(std::mt19937_64& rng, int m, double sd) {
  std::normal_distribution<double> nd(0, sd);
  vec z(static_cast<size_t>(m));
  for (auto& x : z) x = nd(rng);
  const vec l = naive::log_softmax(z);
  std::vector<float> out(static_cast<size_t>(m));
  for (int i = 0; i < m; ++i) out[static_cast<size_t>(i)] = std::min(0.0f, fl_of(double(l[static_cast<size_t>(i)])));
  return out;
}

no::batch random_batch(std::mt19937_64& rng, const gen_options& g) {
  std::uniform_real_distribution<double> U(0, 1);
  std::normal_distribution<double> N(0, 1);
  std::uniform_int_distribution<int> n_prompt(0, 3), n_teacher(0, 3), n_student(1, 8);
  no::batch b;
  b.offsets.push_back(0);
  for (int j = 0; j < g.n_seq; ++j) {
    const bool only_prompt = (j == 2);  // a sequence without any counted token
    const int np = only_prompt ? 3 : n_prompt(rng);
    const int nt = (only_prompt || !g.teacher_prefix) ? 0 : n_teacher(rng);
    const int ns = only_prompt ? 0 : n_student(rng);
    for (int i = 0; i < np + nt + ns; ++i) {
      no::token x;
      x.from = i < np ? no::who::prompt : (i < np + nt ? no::who::teacher : no::who::student);
      const float s_old = fl_of(-0.05 - 4.95 * U(rng));
      const double sd = U(rng) < g.wide_ratio ? 1.2 : 0.15;
      const float s = std::min(-1e-3f, fl_of(s_old + sd * N(rng)));
      float t = std::min(0.0f, fl_of(s_old - 0.3 + 1.5 * N(rng)));
      if (x.from == no::who::student && U(rng) < g.p_neg_inf) t = -finf;
      x.s = s;
      x.s_old = s_old;
      x.t = t;
      x.ent_s = fl_of(4 * U(rng));
      x.ent_t = fl_of(2 * U(rng));
      x.rkl = fl_of(2 * U(rng));
      x.ref = fl_of(-0.1 - 5 * U(rng));
      // Teacher top-k: the first K of K + 3 outcomes (S_K < 1); sometimes one padding entry.
      const auto lq = random_logprobs(rng, g.K + 3, 1.5);
      const auto ls = random_logprobs(rng, g.K + 5, 1.0);
      std::vector<int> pool(50);
      for (int v = 0; v < 50; ++v) pool[static_cast<size_t>(v)] = v;
      std::shuffle(pool.begin(), pool.end(), rng);
      const int pad = U(rng) < 0.25 ? static_cast<int>(U(rng) * g.K) : -1;
      for (int k = 0; k < g.K; ++k) {
        x.ids.push_back(pool[static_cast<size_t>(k)]);
        x.lq.push_back(k == pad ? -ldinf : ld(lq[static_cast<size_t>(k)]));
        x.ls.push_back(ls[static_cast<size_t>(k)]);
        x.ls_old.push_back(std::min(0.0f, fl_of(ls[static_cast<size_t>(k)] + 0.2 * N(rng))));
      }
      b.tok.push_back(x);
    }
    b.offsets.push_back(b.tok.size());
  }
  return b;
}

// ---------------------------------------------------------------------------
// The library's view of a reference batch.
// ---------------------------------------------------------------------------

struct lib_batch {
  index_t n = 0, K = 0;
  std::vector<float> s, s_old, t, hs, ht, rkl, ref, lq, ls, ls_old;
  std::vector<tropd::origin> from;
  std::vector<index_t> off;
  std::vector<uint64_t> seq_ids;
  std::vector<int32_t> ids;
  bool with_s_old = true, with_ls_old = true;

  tropd::token_batch view() const {
    tropd::token_batch b;
    b.s = {s.data(), n};
    if (with_s_old) b.s_old = {s_old.data(), n};
    b.t = {t.data(), n};
    b.from = {from.data(), n};
    b.seq_offsets = {off.data(), static_cast<index_t>(off.size())};
    if (!seq_ids.empty()) b.seq_ids = {seq_ids.data(), static_cast<index_t>(seq_ids.size())};
    b.student_entropy = {hs.data(), n};
    b.teacher_entropy = {ht.data(), n};
    b.rkl = {rkl.data(), n};
    b.ref = {ref.data(), n};
    if (K > 0) {
      b.topk_ids = tropd::make_matrix<const int32_t>(ids.data(), n, K);
      b.topk_teacher = tropd::make_matrix<const float>(lq.data(), n, K);
      b.topk_student = tropd::make_matrix<const float>(ls.data(), n, K);
      if (with_ls_old) b.topk_student_old = tropd::make_matrix<const float>(ls_old.data(), n, K);
    }
    return b;
  }
};

tropd::origin origin_of(no::who w) {
  return w == no::who::prompt ? tropd::origin::prompt : (w == no::who::teacher ? tropd::origin::teacher : tropd::origin::student);
}

lib_batch to_lib(const no::batch& b, std::vector<uint64_t> seq_ids = {}) {
  lib_batch l;
  l.n = static_cast<index_t>(b.tok.size());
  l.K = b.tok.empty() ? 0 : static_cast<index_t>(b.tok[0].lq.size());
  for (const auto& x : b.tok) {
    l.s.push_back(fl_of(double(x.s)));
    l.s_old.push_back(fl_of(double(x.s_old)));
    l.t.push_back(fl_of(double(x.t)));
    l.hs.push_back(fl_of(double(x.ent_s)));
    l.ht.push_back(fl_of(double(x.ent_t)));
    l.rkl.push_back(fl_of(double(x.rkl)));
    l.ref.push_back(fl_of(double(x.ref)));
    l.from.push_back(origin_of(x.from));
    for (index_t k = 0; k < l.K; ++k) {
      l.ids.push_back(x.ids[static_cast<size_t>(k)]);
      l.lq.push_back(fl_of(double(x.lq[static_cast<size_t>(k)])));
      l.ls.push_back(fl_of(double(x.ls[static_cast<size_t>(k)])));
      l.ls_old.push_back(x.ls_old.empty() ? l.ls.back() : fl_of(double(x.ls_old[static_cast<size_t>(k)])));
    }
  }
  for (size_t o : b.offsets) l.off.push_back(static_cast<index_t>(o));
  l.seq_ids = std::move(seq_ids);
  return l;
}

struct lib_out {
  tropd::status st;
  double loss = 0;
  tropd::diagnostics d;
  std::vector<float> dlds, adv, dtopk;
  std::vector<uint8_t> flags;
};

template <class Obj>
lib_out run_tokens(const Obj& o, const lib_batch& lb, const tropd::host::eval_options& opt = {}) {
  lib_out r;
  r.dlds.assign(static_cast<size_t>(lb.n), 777.f);
  r.adv.assign(static_cast<size_t>(lb.n), 777.f);
  r.dtopk.assign(static_cast<size_t>(lb.n * lb.K), 777.f);
  r.flags.assign(static_cast<size_t>(lb.n), 0xff);
  tropd::token_outputs to;
  to.dloss_ds = tropd::view_of(r.dlds);
  to.advantage = tropd::view_of(r.adv);
  if (lb.K > 0) to.dloss_dtopk = tropd::make_matrix(r.dtopk.data(), lb.n, lb.K);
  to.flags = tropd::view_of(r.flags);
  to.loss = &r.loss;
  to.diag = &r.d;
  r.st = tropd::host::evaluate_tokens(tropd_test::with_k(o, lb.K), lb.view(), to, opt);
  return r;
}

/// The library's trust decisions (phase 2 alone), one per token.
template <class Obj>
std::vector<char> lib_decisions(const Obj& o, const lib_batch& lb, const tropd::host::eval_options& opt) {
  std::vector<uint8_t> m;
  const tropd::status st = tropd::host::decide(o, lb.view(), opt, m);
  REQUIRE_MESSAGE(st.ok(), st.message());
  return std::vector<char>(m.begin(), m.end());
}

bool close_rel(ld got, ld want, ld rel, ld abs_floor) {
  if (std::isnan(want)) return std::isnan(got);
  return std::fabs(got - want) <= rel * std::fabs(want) + abs_floor;
}

/// Mean and NaN-where-empty, as the diagnostics define them.
ld mean_or_nan(ld sum, ld count) { return count > 0 ? sum / count : std::numeric_limits<ld>::quiet_NaN(); }

/// Compares everything the token-level call returns with the reference.
void compare(const lib_out& got, const no::result& want, const no::batch& b) {
  REQUIRE_MESSAGE(got.st.ok(), got.st.message());
  REQUIRE_FALSE(want.error);
  const size_t n = b.tok.size();
  ld scale = 0;
  for (size_t i = 0; i < n; ++i) scale += std::fabs(want.w[i] * want.tok[i].loss);
  const ld vtol = 1e-10L * std::max<ld>(scale, 1e-3L);
  CHECK(std::fabs(got.loss - want.loss) <= vtol);
  CHECK(std::fabs(got.d.loss - want.loss) <= vtol);
  CHECK(std::fabs(got.d.loss_trust - want.loss_trust) <= vtol);
  CHECK(std::fabs(got.d.loss_outlier - want.loss_outlier) <= vtol);
  CHECK(std::fabs(got.d.loss_guidance - want.loss_guidance) <= vtol);
  CHECK(close_rel(got.d.normaliser, want.normaliser, 1e-15L, 0));
  for (size_t i = 0; i < n; ++i) {
    CAPTURE(i);
    const no::token_result& r = want.tok[i];
    const ld w = want.w[i];
    CHECK(close_rel(got.dlds[i], w * r.dlds, 1e-6L, 1e-12L));
    CHECK(close_rel(got.adv[i], r.adv, 1e-6L, 1e-12L));
    const size_t K = r.g.size();
    for (size_t k = 0; k < K; ++k) CHECK(close_rel(got.dtopk[i * K + k], w * r.g[k], 1e-6L, 1e-12L));
    const uint8_t f = got.flags[i];
    CHECK(((f & fl::trusted) != 0) == r.trusted);
    CHECK(((f & fl::outlier) != 0) == r.outlier);
    CHECK(((f & fl::kept) != 0) == r.kept);
    CHECK(((f & fl::counted) != 0) == r.counted);
    CHECK(((f & fl::guidance) != 0) == r.guidance);
    CHECK(((f & fl::adv_clipped) != 0) == r.adv_clipped);
    CHECK(((f & fl::ratio_clipped) != 0) == r.ratio_clipped);
  }
  // Diagnostics, recomputed here from the inputs and the reference's classification.
  ld ns = 0, nt = 0, ncount = 0, nkept = 0, ntr = 0, nout = 0, nzero = 0, sr_t = 0, nr_t = 0, sr_o = 0, nr_o = 0, tv = 0;
  ld adv_c = 0, ratio_c = 0, hs = 0, ht = 0, rk = 0, sk = 0, pk = 0, ntk = 0;
  for (size_t i = 0; i < n; ++i) {
    const no::token& x = b.tok[i];
    const no::token_result& r = want.tok[i];
    ncount += r.counted;
    nkept += r.kept;
    if (x.from == no::who::teacher) nt += 1;
    if (x.from != no::who::student) continue;
    ns += 1;
    const ld R = x.t - x.s_old;
    (r.trusted ? ntr : nout) += 1;
    if (R == -ldinf) nzero += 1;
    else if (r.trusted) { sr_t += R; nr_t += 1; }
    else { sr_o += R; nr_o += 1; }
    tv += 1 - std::min<ld>(1, std::exp(R));
    adv_c += r.adv_clipped;
    ratio_c += r.ratio_clipped;
    hs += x.ent_s;
    ht += x.ent_t;
    rk += x.rkl;
    if (r.SK > 0) { sk += r.SK; pk += r.PK; ntk += 1; }
  }
  CHECK(got.d.n_tokens == static_cast<index_t>(n));
  CHECK(got.d.n_student == static_cast<index_t>(ns));
  CHECK(got.d.n_teacher == static_cast<index_t>(nt));
  CHECK(got.d.n_counted == static_cast<index_t>(ncount));
  CHECK(got.d.n_kept == static_cast<index_t>(nkept));
  CHECK(got.d.n_trusted == static_cast<index_t>(ntr));
  CHECK(got.d.n_outlier == static_cast<index_t>(nout));
  CHECK(got.d.n_zero_teacher_mass == static_cast<index_t>(nzero));
  CHECK(close_rel(got.d.trust_fraction, mean_or_nan(ntr, ns), 1e-12L, 0));
  CHECK(close_rel(got.d.outlier_fraction, mean_or_nan(nout, ns), 1e-12L, 0));
  CHECK(close_rel(got.d.adv_clip_fraction, mean_or_nan(adv_c, ns), 1e-12L, 0));
  CHECK(close_rel(got.d.ratio_clip_fraction, mean_or_nan(ratio_c, ns), 1e-12L, 0));
  CHECK(close_rel(got.d.mean_R_trusted, mean_or_nan(sr_t, nr_t), 1e-12L, 1e-12L));
  CHECK(close_rel(got.d.mean_R_outlier, mean_or_nan(sr_o, nr_o), 1e-12L, 1e-12L));
  CHECK(close_rel(got.d.tv_estimate, mean_or_nan(tv, ns), 1e-12L, 1e-14L));
  CHECK(close_rel(got.d.mean_student_entropy, mean_or_nan(hs, ns), 1e-12L, 0));
  CHECK(close_rel(got.d.mean_teacher_entropy, mean_or_nan(ht, ns), 1e-12L, 0));
  CHECK(close_rel(got.d.mean_rkl, mean_or_nan(rk, ns), 1e-12L, 0));
  CHECK(close_rel(got.d.mean_topk_teacher_mass, mean_or_nan(sk, ntk), 1e-12L, 0));
  CHECK(close_rel(got.d.mean_topk_student_mass, mean_or_nan(pk, ntk), 1e-12L, 0));
}

using tropd::aggregation::mode;

struct agg_case {
  mode lib;
  no::agg ref;
  double normaliser;
};

std::vector<agg_case> every_aggregation() {
  std::vector<agg_case> out;
  const std::pair<mode, no::agg> modes[] = {
      {mode::token_mean, no::agg::token_mean},
      {mode::kept_token_mean, no::agg::kept_token_mean},
      {mode::seq_mean_token_mean, no::agg::seq_mean_token_mean},
      {mode::seq_mean_token_sum, no::agg::seq_mean_token_sum},
      {mode::sum_over_constant, no::agg::sum_over_constant},
  };
  for (const auto& [l, r] : modes)
    for (double nm : {0.0, 37.0}) out.push_back({l, r, nm});
  return out;
}

/// Runs the library objective `o` and the reference objective `ro` on batch `b` under
/// every aggregation mode (with and without an external normaliser) and compares.
template <class Obj>
void check_preset(Obj o, no::objective ro, const no::batch& b, const tropd::host::eval_options& opt = {},
                  bool stochastic = false, std::vector<uint64_t> seq_ids = {}) {
  const lib_batch lb = to_lib(b, seq_ids);
  std::vector<char> given;
  if (stochastic) given = lib_decisions(o, lb, opt);
  for (const agg_case& a : every_aggregation()) {
    CAPTURE(tropd::aggregation::to_string(a.lib));
    CAPTURE(a.normaliser);
    o.agg.how = a.lib;
    o.agg.normaliser = a.normaliser;
    o.agg.constant = 7.5;
    ro.how = a.ref;
    ro.normaliser = a.normaliser;
    ro.constant = 7.5;
    const lib_out got = run_tokens(o, lb, opt);
    const no::result want = no::evaluate(ro, b, given);
    compare(got, want, b);
  }
}

}  // namespace

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

// ---------------------------------------------------------------------------
// Row level.
// ---------------------------------------------------------------------------

namespace {

/// A row-level batch: student and teacher logits (double), tokens, origins, offsets.
struct row_batch {
  index_t n = 0, V = 0;
  std::vector<double> z, u;
  std::vector<int32_t> y;
  std::vector<tropd::origin> from;
  std::vector<no::who> who;
  std::vector<index_t> off;
  std::vector<size_t> offsets;
  std::vector<uint64_t> seq_ids;
  std::vector<float> s_old, ref;  ///< optional

  vec zrow(index_t r) const { return vec(z.begin() + r * V, z.begin() + (r + 1) * V); }
  vec urow(index_t r) const { return vec(u.begin() + r * V, u.begin() + (r + 1) * V); }
};

/// n_seq sequences of [prompt(1-2), teacher(0-2), student(2-5)] rows; y ~ p_S on student rows.
/// With zero_mass, some student rows get a teacher logit of -inf at their token.
row_batch random_rows(std::mt19937_64& rng, index_t V, int n_seq, double zero_mass, bool teacher_rows = true) {
  std::normal_distribution<double> N(0, 1);
  std::uniform_real_distribution<double> U(0, 1);
  row_batch rb;
  rb.V = V;
  rb.off.push_back(0);
  rb.offsets.push_back(0);
  for (int j = 0; j < n_seq; ++j) {
    const int np = 1 + int(U(rng) * 2), nt = teacher_rows ? int(U(rng) * 3) : 0, ns = 2 + int(U(rng) * 4);
    for (int i = 0; i < np + nt + ns; ++i) {
      const no::who w = i < np ? no::who::prompt : (i < np + nt ? no::who::teacher : no::who::student);
      vec zr(static_cast<size_t>(V)), ur(static_cast<size_t>(V));
      for (index_t v = 0; v < V; ++v) {
        zr[static_cast<size_t>(v)] = 2.0 * N(rng);
        ur[static_cast<size_t>(v)] = 0.6 * zr[static_cast<size_t>(v)] + 1.5 * N(rng);  // correlated teacher
      }
      const vec p = naive::probs(naive::log_softmax(zr));
      double c = U(rng), acc = 0;
      int y = static_cast<int>(V) - 1;
      for (index_t v = 0; v < V; ++v) {
        acc += double(p[static_cast<size_t>(v)]);
        if (c < acc) { y = static_cast<int>(v); break; }
      }
      if (w == no::who::student && U(rng) < zero_mass) ur[static_cast<size_t>(y)] = -ldinf;
      for (index_t v = 0; v < V; ++v) {
        rb.z.push_back(double(zr[static_cast<size_t>(v)]));
        rb.u.push_back(double(ur[static_cast<size_t>(v)]));
      }
      rb.y.push_back(y);
      rb.who.push_back(w);
      rb.from.push_back(origin_of(w));
      rb.ref.push_back(fl_of(-0.2 - 4 * U(rng)));
      ++rb.n;
    }
    rb.off.push_back(rb.n);
    rb.offsets.push_back(static_cast<size_t>(rb.n));
    rb.seq_ids.push_back(500 + static_cast<uint64_t>(j) * 3);
  }
  return rb;
}

struct row_out {
  tropd::status st;
  double loss = 0;
  tropd::diagnostics d;
  std::vector<double> grad;
  std::vector<float> dlds, dtopk;
  std::vector<uint8_t> flags;
};

template <class Obj>
row_out run_rows(const Obj& o, const row_batch& rb, index_t K, const tropd::host::eval_options& opt = {},
                 const std::vector<float>& topk_old = {}, int threads = 1, double ts = 1, double tt = 1,
                 const tropd::host::topk_lists* lists = nullptr) {
  row_out r;
  r.grad.assign(static_cast<size_t>(rb.n * rb.V), 777.0);
  r.dlds.assign(static_cast<size_t>(rb.n), 777.f);
  r.dtopk.assign(static_cast<size_t>(rb.n * K), 777.f);
  r.flags.assign(static_cast<size_t>(rb.n), 0xff);
  tropd::host::row_inputs tok;
  tok.ids = {rb.y.data(), rb.n};
  tok.from = {rb.from.data(), rb.n};
  tok.seq_offsets = {rb.off.data(), static_cast<index_t>(rb.off.size())};
  tok.seq_ids = {rb.seq_ids.data(), static_cast<index_t>(rb.seq_ids.size())};
  if (!rb.s_old.empty()) tok.s_old = {rb.s_old.data(), rb.n};
  tok.ref = {rb.ref.data(), rb.n};
  if (!topk_old.empty()) tok.topk_student_old = tropd::make_matrix<const float>(topk_old.data(), rb.n, K);
  tropd::token_outputs tout;
  tout.dloss_ds = tropd::view_of(r.dlds);
  if (K > 0) tout.dloss_dtopk = tropd::make_matrix(r.dtopk.data(), rb.n, K);
  tout.flags = tropd::view_of(r.flags);
  tok.student_temperature = ts;
  tok.teacher_temperature = tt;
  if (lists) tok.teacher_topk = *lists;
  tropd::host::eval_options eo = opt;
  eo.threads = threads;
  r.st = tropd::host::evaluate_rows(o, tropd::make_matrix<const double>(rb.z.data(), rb.n, rb.V),
                                    tropd::make_matrix<const double>(rb.u.data(), rb.n, rb.V), tok,
                                    tropd::host::row_outputs<double>{.grad = tropd::make_matrix(r.grad.data(), rb.n, rb.V), .loss = &r.loss,
                                                                     .diag = &r.d, .dloss_ds = tout.dloss_ds,
                                                                     .dloss_dtopk = tout.dloss_dtopk, .flags = tout.flags},
                                    eo);
  return r;
}

/// The reference's rows.
std::vector<vec> rows_of(const row_batch& rb, bool student) {
  std::vector<vec> out;
  for (index_t r = 0; r < rb.n; ++r) out.push_back(student ? rb.zrow(r) : rb.urow(r));
  return out;
}

ld max_abs(const std::vector<vec>& g) {
  ld m = 0;
  for (const auto& r : g)
    for (ld x : r) m = std::max(m, std::fabs(x));
  return m;
}

/// Row-level library output vs the naive row-level reference (decisions: the library's
/// trusted flags, for a region whose decisions are an input of the reference).
template <class Obj>
void check_rows_vs_reference(const Obj& o, const no::objective& ro, const row_batch& rb, index_t K,
                             const tropd::host::eval_options& opt = {}, const std::vector<float>& topk_old = {},
                             double ts = 1, double tt = 1) {
  const row_out got = run_rows(o, rb, K, opt, topk_old, 1, ts, tt);
  REQUIRE_MESSAGE(got.st.ok(), got.st.message());
  std::vector<char> given(static_cast<size_t>(rb.n));
  for (index_t r = 0; r < rb.n; ++r) given[static_cast<size_t>(r)] = (got.flags[static_cast<size_t>(r)] & fl::trusted) != 0;
  vec s_old;
  for (float x : rb.s_old) s_old.push_back(x);
  std::vector<vec> ls_old;
  for (index_t r = 0; r < rb.n && !topk_old.empty(); ++r)
    ls_old.push_back(vec(topk_old.begin() + r * K, topk_old.begin() + (r + 1) * K));
  const vec ref(rb.ref.begin(), rb.ref.end());
  // Temperatures: the reference sees the logits divided by T; dL/dz = dL/d(z / T_S) / T_S.
  std::vector<vec> zs = rows_of(rb, true), us = rows_of(rb, false);
  for (auto& r : zs)
    for (ld& x : r) x /= ts;
  for (auto& r : us)
    for (ld& x : r) x /= tt;
  no::row_result want = no::evaluate_rows(ro, zs, us, std::vector<int>(rb.y.begin(), rb.y.end()), rb.who, rb.offsets,
                                          static_cast<int>(K), s_old, given, ls_old, ref);
  for (auto& r : want.grad)
    for (ld& x : r) x /= ts;
  for (index_t r = 0; r < rb.n; ++r) {
    CAPTURE(r);
    REQUIRE_FALSE(want.tokens.tok[static_cast<size_t>(r)].error);
  }
  // Values and gradients are computed from fp64 logits but pass through fp32 log-probs.
  CHECK(std::fabs(got.loss - want.tokens.loss) <= 2e-6L * std::max<ld>(1, std::fabs(want.tokens.loss)));
  CHECK(std::fabs(got.d.loss_dense - want.tokens.loss_dense) <= 1e-9L * std::max<ld>(1, std::fabs(want.tokens.loss_dense)));
  const ld gs = std::max<ld>(max_abs(want.grad), 1e-12L);
  ld err = 0;
  for (index_t r = 0; r < rb.n; ++r)
    for (index_t v = 0; v < rb.V; ++v)
      err = std::max(err, std::fabs(got.grad[static_cast<size_t>(r * rb.V + v)] - want.grad[static_cast<size_t>(r)][static_cast<size_t>(v)]));
  CAPTURE(gs);
  CHECK(err <= 2e-6L * gs);
  for (index_t r = 0; r < rb.n; ++r) {
    CAPTURE(r);
    const auto& t = want.tokens.tok[static_cast<size_t>(r)];
    const uint8_t f = got.flags[static_cast<size_t>(r)];
    CHECK(((f & fl::kept) != 0) == t.kept);
    CHECK(((f & fl::counted) != 0) == t.counted);
    CHECK(((f & fl::outlier) != 0) == t.outlier);
  }
}

/// Token level fed from the same logits (naive log_softmax, top-k, entropies, reverse KL),
/// its dL/ds and dL/dtopk chained through log_softmax, vs row level's dense dL/dz.
template <class Obj>
void check_token_vs_row(const Obj& o, const row_batch& rb, index_t K, const tropd::host::eval_options& opt = {}) {
  const row_out rows = run_rows(o, rb, K, opt);
  REQUIRE_MESSAGE(rows.st.ok(), rows.st.message());
  no::batch b;
  b.offsets = rb.offsets;
  for (index_t r = 0; r < rb.n; ++r) {
    no::token x = no::token_from_row(rb.zrow(r), rb.urow(r), rb.y[static_cast<size_t>(r)], rb.who[static_cast<size_t>(r)],
                                     static_cast<int>(K), rb.s_old.empty() ? no::nan_ld : ld(rb.s_old[static_cast<size_t>(r)]));
    x.ref = rb.ref[static_cast<size_t>(r)];
    b.tok.push_back(x);
  }
  lib_batch lb = to_lib(b, rb.seq_ids);
  lb.with_ls_old = false;
  const lib_out toks = run_tokens(o, lb, opt);
  REQUIRE_MESSAGE(toks.st.ok(), toks.st.message());
  CHECK(std::fabs(toks.loss - rows.loss) <= 2e-6 * std::max(1.0, std::fabs(rows.loss)));
  CHECK(toks.flags == rows.flags);
  std::vector<vec> chained;
  for (index_t r = 0; r < rb.n; ++r) {
    vec g(static_cast<size_t>(K));
    for (index_t k = 0; k < K; ++k) g[static_cast<size_t>(k)] = toks.dtopk[static_cast<size_t>(r * K + k)];
    chained.push_back(no::chain_to_logits(rb.zrow(r), rb.y[static_cast<size_t>(r)], toks.dlds[static_cast<size_t>(r)],
                                          b.tok[static_cast<size_t>(r)].ids, g));
  }
  const ld gs = std::max<ld>(max_abs(chained), 1e-12L);
  ld err = 0;
  for (index_t r = 0; r < rb.n; ++r)
    for (index_t v = 0; v < rb.V; ++v)
      err = std::max(err, std::fabs(rows.grad[static_cast<size_t>(r * rb.V + v)] - chained[static_cast<size_t>(r)][static_cast<size_t>(v)]));
  CAPTURE(gs);
  CHECK(err <= 2e-6L * gs);
}

}  // namespace

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
