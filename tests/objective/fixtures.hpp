// tests/objective/fixtures.hpp: what the objective tests share (tests/objective/test_presets.cpp,
// tests/aggregation/test_objective_aggregation.cpp, tests/host/test_objective_rows.cpp and the
// REOPOLD / temperature tests): random token and row batches, the library's view of a
// reference batch, the token-level and row-level calls, and the comparisons with the naive
// long-double reference (tests/reference/naive_objective.hpp). Test-only.
#pragma once

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

namespace tropd_test::objective_fx {

namespace naive = tropd_test::naive;
namespace no = tropd_test::naive_obj;
using tropd_test::naive::ld;
using tropd_test::naive::vec;
using tropd::index_t;
namespace presets = tropd::presets;
namespace fl = tropd::flags;


inline constexpr float finf = std::numeric_limits<float>::infinity();
inline constexpr ld ldinf = std::numeric_limits<ld>::infinity();

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

inline float fl_of(double x) { return static_cast<float>(x); }

/// A log-probability vector of `m` outcomes from normal logits (sd), as floats.
inline std::vector<float> random_logprobs(std::mt19937_64& rng, int m, double sd) {
  std::normal_distribution<double> nd(0, sd);
  vec z(static_cast<size_t>(m));
  for (auto& x : z) x = nd(rng);
  const vec l = naive::log_softmax(z);
  std::vector<float> out(static_cast<size_t>(m));
  for (int i = 0; i < m; ++i) out[static_cast<size_t>(i)] = std::min(0.0f, fl_of(double(l[static_cast<size_t>(i)])));
  return out;
}

inline no::batch random_batch(std::mt19937_64& rng, const gen_options& g) {
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

inline tropd::origin origin_of(no::who w) {
  return w == no::who::prompt ? tropd::origin::prompt : (w == no::who::teacher ? tropd::origin::teacher : tropd::origin::student);
}

inline lib_batch to_lib(const no::batch& b, std::vector<uint64_t> seq_ids = {}) {
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

inline bool close_rel(ld got, ld want, ld rel, ld abs_floor) {
  if (std::isnan(want)) return std::isnan(got);
  return std::fabs(got - want) <= rel * std::fabs(want) + abs_floor;
}

/// Mean and NaN-where-empty, as the diagnostics define them.
inline ld mean_or_nan(ld sum, ld count) { return count > 0 ? sum / count : std::numeric_limits<ld>::quiet_NaN(); }

/// Compares everything the token-level call returns with the reference.
inline void compare(const lib_out& got, const no::result& want, const no::batch& b) {
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

inline std::vector<agg_case> every_aggregation() {
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


// ---------------------------------------------------------------------------
// Row level.
// ---------------------------------------------------------------------------


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
inline row_batch random_rows(std::mt19937_64& rng, index_t V, int n_seq, double zero_mass, bool teacher_rows = true) {
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
inline std::vector<vec> rows_of(const row_batch& rb, bool student) {
  std::vector<vec> out;
  for (index_t r = 0; r < rb.n; ++r) out.push_back(student ? rb.zrow(r) : rb.urow(r));
  return out;
}

inline ld max_abs(const std::vector<vec>& g) {
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


}  // namespace tropd_test::objective_fx
