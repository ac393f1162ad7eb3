// Tests of tropd/runtime/driver.hpp (distill_step) and tropd/runtime/concepts.hpp
// (method.md 4.4 and 7), driven through the closed-form mock models of tests/mock_runtime.hpp.
//
// Expected values are independent computations: the batch layout is rebuilt from the
// documented plan rules (schedules/plan.hpp) and the cosine closed form; both models'
// logits are recomputed from their closed forms and the batch alone; the objective (OPD,
// mask outlier + guidance, TrOPD form C / form P, GKD) is evaluated here in long double with
// tests/reference/naive.hpp. The stochastic trust region's decisions are recomputed from
// their documented key (seed, step, seq id, position, streams::trust_region) and method.md
// 4.2's rule (accept iff log U <= R).
#include <doctest/doctest.h>

#include <tropd/host/objective.hpp>
#include <tropd/objective.hpp>
#include <tropd/runtime/concepts.hpp>
#include <tropd/runtime/driver.hpp>
#include <tropd/schedules/plan.hpp>
#include <tropd/schedules/prefix.hpp>

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "mock_runtime.hpp"
#include "reference/naive.hpp"

namespace {

namespace tr = tropd::runtime;
namespace ts = tropd::schedules;
namespace nv = tropd_test::naive;
namespace mk = tropd_test::mock;
using nv::ld;
using nv::vec;
using tropd::errc;
using tropd::index_t;
using tropd::origin;

constexpr int V = 7;
constexpr int END = 6;
constexpr uint64_t kStride = 1'000'003;  // plan_options' documented default seq_id_stride
constexpr ld pi_l = 3.141592653589793238462643383279502884L;

mk::closed_form student_cf() { return mk::closed_form::make(V, 11, 1.0f); }
// A sharper teacher with different preferences: many student tokens have R < 0, some R << 0.
mk::closed_form teacher_cf(int vocab = V) { return mk::closed_form::make(vocab, 23, 2.5f, 0.8f); }

std::vector<ts::prompt_example> main_prompts() {
  return {
      {{1, 2}, {3, 4, 5, 0, 2, END}, -1},           // L_T = 5 (end token stripped)
      {{4}, {2, 2, 1, 3, 5, 0, 1, 2, 4, END}, -1},  // L_T = 9
      {{0, 5, 3}, {}, -1},                           // empty teacher response
  };
}

tr::step_config base_config() {
  tr::step_config c;
  c.step = 1;
  c.total_steps = 4;  // cosine alpha = (1 + cos(pi / 4)) / 2 ~ 0.854
  c.n = 3;
  c.max_new_tokens = 6;
  c.seed = 7;
  c.end_token = END;
  return c;
}

// ---------------------------------------------------------------------------------------
// Independent expectations
// ---------------------------------------------------------------------------------------

/// Cosine alpha in long double (method.md 4.4), 1 for i <= 0 and 0 for i >= N.
ld cosine_alpha(long long i, long long N) {
  if (i >= N) return 0;
  if (i <= 0) return 1;
  return (1 + std::cos(pi_l * ld(i) / ld(N))) / 2;
}

/// floor(alpha * base) clamped to [0, L]; `ambiguous` when within 1e-8 of the next integer.
long long closed_prefix(ld alpha, long long L, long long base, bool& ambiguous) {
  ambiguous = false;
  if (L <= 0 || base <= 0 || alpha <= 0) return 0;
  const ld x = alpha * ld(base);
  const ld f = std::floor(x);
  ambiguous = (f + 1 - x) < 1e-8L;
  return std::min<long long>(L, static_cast<long long>(f));
}

/// L_T: the response length without one trailing end token.
long long teacher_len(const ts::prompt_example& ex, long long end) {
  long long L = static_cast<long long>(ex.teacher_response.size());
  if (end >= 0 && L > 0 && ex.teacher_response.back() == end) --L;
  return L;
}

struct layout {
  std::vector<int32_t> tokens;
  std::vector<origin> from;
  std::vector<index_t> offsets{0};
  std::vector<ts::sample_kind> kinds;
  std::vector<index_t> sample_prompt;
  std::vector<std::vector<int32_t>> contexts;  // on-policy sampling contexts, plan order
};

/// The batch the plan rules of schedules/plan.hpp describe, from the prompts, the prefix
/// lengths, n and the continuations (one per on-policy context, plan order).
layout expected_layout(const std::vector<ts::prompt_example>& prompts, const std::vector<long long>& l, long long n,
                       const std::vector<std::vector<int32_t>>& cont) {
  layout e;
  size_t c = 0;
  for (size_t p = 0; p < prompts.size(); ++p) {
    std::vector<int32_t> ctx = prompts[p].prompt;
    ctx.insert(ctx.end(), prompts[p].teacher_response.begin(), prompts[p].teacher_response.begin() + l[p]);
    const size_t np = prompts[p].prompt.size();
    if (l[p] > 0) {
      e.tokens.insert(e.tokens.end(), ctx.begin(), ctx.end());
      for (size_t k = 0; k < ctx.size(); ++k) e.from.push_back(k < np ? origin::prompt : origin::teacher);
      e.offsets.push_back(static_cast<index_t>(e.tokens.size()));
      e.kinds.push_back(ts::sample_kind::off_policy);
      e.sample_prompt.push_back(static_cast<index_t>(p));
    }
    for (long long r = 0; r < n; ++r) {
      e.contexts.push_back(ctx);
      e.tokens.insert(e.tokens.end(), ctx.begin(), ctx.end());
      e.from.insert(e.from.end(), ctx.size(), origin::prompt);
      if (c < cont.size()) {
        e.tokens.insert(e.tokens.end(), cont[c].begin(), cont[c].end());
        e.from.insert(e.from.end(), cont[c].size(), origin::student);
      }
      ++c;
      e.offsets.push_back(static_cast<index_t>(e.tokens.size()));
      e.kinds.push_back(ts::sample_kind::on_policy);
      e.sample_prompt.push_back(static_cast<index_t>(p));
    }
  }
  return e;
}

/// Checks a report's plan and batch against the documented layout (cosine schedule,
/// per-sample fraction unless `global_max` > 0).
template <class Student>
void check_layout(const tr::step_report& rep, const Student& st, const std::vector<ts::prompt_example>& prompts,
                  const tr::step_config& cfg, long long global_max = 0) {
  std::vector<long long> l(prompts.size());
  ld frac_sum = 0, frac_n = 0;
  for (size_t p = 0; p < prompts.size(); ++p) {
    const long long L = teacher_len(prompts[p], cfg.end_token);
    bool amb = false;
    l[p] = closed_prefix(cosine_alpha(cfg.step, cfg.total_steps), L, global_max > 0 ? global_max : L, amb);
    REQUIRE_FALSE(amb);
    CHECK(rep.plan.teacher_length[p] == L);
    CHECK(rep.plan.prefix_length[p] == l[p]);
    if (L > 0) { frac_sum += ld(l[p]) / ld(L); frac_n += 1; }
  }
  CHECK(std::fabs(ld(rep.mean_prefix_fraction) - (frac_n > 0 ? frac_sum / frac_n : 0)) < 1e-12L);
  REQUIRE(st.outputs.size() == static_cast<size_t>(cfg.n) * prompts.size());
  const layout e = expected_layout(prompts, l, cfg.n, st.outputs);
  CHECK(st.contexts == e.contexts);
  CHECK(rep.batch.tokens == e.tokens);
  CHECK(rep.batch.origin == e.from);
  CHECK(rep.batch.seq_offsets == e.offsets);
  CHECK(rep.batch.seq_kind == e.kinds);
  CHECK(rep.batch.sample_prompt == e.sample_prompt);
  REQUIRE(rep.batch.seq_ids.size() == e.kinds.size());
  for (size_t j = 0; j < e.kinds.size(); ++j) CHECK(rep.batch.seq_ids[j] == static_cast<uint64_t>(cfg.step) * kStride + j);
}

enum class rk { opd, mask, tropd_c, tropd_p, gkd };

struct ref_spec {
  rk kind = rk::opd;
  ld beta = 0;      // guidance (SFT form)
  ld tau = 0;       // mask outlier threshold
  int k = 64;       // teacher top-k
  ld jsd_beta = 0.5;
  uint64_t seed = 0;
  long long step = 0;
};

struct ref_out {
  std::vector<vec> grad;  // dL/dz per row
  vec dlds;               // w_i dL_i/ds_i per row (sampled-token part)
  ld loss = 0, loss_trust = 0, loss_outlier = 0, loss_guidance = 0, loss_dense = 0;
  long long n_student = 0, n_teacher = 0, n_trusted = 0, n_outlier = 0, n_counted = 0;
  ld min_gap = nv::inf;  // stochastic region: min |log U - R| over R < 0 (rounding margin)
};

/// The objective of `sp` on a flat batch, from both closed forms, in long double.
ref_out reference(const ts::assembled_batch& B, const mk::closed_form& cs, const mk::closed_form& ct, const ref_spec& sp) {
  const size_t n = B.tokens.size();
  ref_out r;
  r.grad.assign(n, vec(V, 0));
  r.dlds.assign(n, 0);
  vec Lt(n, 0), Lo(n, 0), Lg(n, 0), Ld(n, 0), ds(n, 0);
  std::vector<vec> extra(n, vec(V, 0)), P(n);
  std::vector<char> counted(n, 0);
  for (size_t j = 0; j + 1 < B.seq_offsets.size(); ++j) {
    for (index_t i = B.seq_offsets[j]; i < B.seq_offsets[j + 1]; ++i) {
      const size_t ii = static_cast<size_t>(i);
      const int prev = i == B.seq_offsets[j] ? V : B.tokens[ii - 1];
      const index_t pos = i - B.seq_offsets[j];
      vec z(V), u(V);
      for (int v = 0; v < V; ++v) {
        z[static_cast<size_t>(v)] = cs.logit(prev, pos, v);
        u[static_cast<size_t>(v)] = ct.logit(prev, pos, v);
      }
      const vec ls = nv::log_softmax(z), lt = nv::log_softmax(u);
      P[ii] = nv::probs(ls);
      const size_t y = static_cast<size_t>(B.tokens[ii]);
      const origin o = B.origin[ii];
      if (o == origin::prompt) continue;
      if (sp.kind == rk::gkd) {  // dense JSD on every non-prompt token, no sampled term
        const nv::value_grad g = nv::jsd(z, u, sp.jsd_beta);
        counted[ii] = 1;
        Ld[ii] = g.value;
        extra[ii] = g.grad;
        if (o == origin::teacher) ++r.n_teacher;
        else { ++r.n_student; ++r.n_trusted; }
        continue;
      }
      if (o == origin::teacher) {
        ++r.n_teacher;
        if (sp.beta > 0) {
          counted[ii] = 1;
          Lg[ii] = -sp.beta * ls[y];
          ds[ii] = -sp.beta;
        }
        continue;
      }
      ++r.n_student;
      counted[ii] = 1;
      const ld R = lt[y] - ls[y];
      bool trusted = true;
      if (sp.kind == rk::mask) trusted = R > sp.tau;
      if (sp.kind == rk::tropd_c || sp.kind == rk::tropd_p) {
        if (R < 0) {
          const uint64_t seq_id = static_cast<uint64_t>(sp.step) * kStride + j;
          const ld logU = std::log(ld(tropd::uniform_open0_closed1(
              tropd::draw_key{sp.seed, static_cast<uint64_t>(sp.step), seq_id, static_cast<uint64_t>(pos), tropd::streams::trust_region})));
          trusted = logU <= R;
          r.min_gap = std::min(r.min_gap, std::fabs(logU - R));
        }
      }
      if (trusted) {
        ++r.n_trusted;
        Lt[ii] = -R;  // PG with A = R, rho = 1
        ds[ii] = -R;
        continue;
      }
      ++r.n_outlier;
      if (sp.kind == rk::tropd_c || sp.kind == rk::tropd_p) {
        const std::vector<int> ids = nv::topk_ids(u, sp.k);
        vec lq;
        for (int id : ids) lq.push_back(lt[static_cast<size_t>(id)]);
        const nv::value_grad f = nv::topk_forward_kl(z, ids, lq, nv::tail::renormalised);
        Lo[ii] = f.value;
        if (sp.kind == rk::tropd_c) ds[ii] = f.value;  // A = -FKL_k, L = -A, dL/ds = -A
        else extra[ii] = f.grad;                       // form P: the differentiable FKL_k
      }
    }
  }
  for (char c : counted) r.n_counted += c;
  const ld w = r.n_counted > 0 ? ld(1) / ld(r.n_counted) : 0;
  for (size_t i = 0; i < n; ++i) {
    if (B.origin[i] == origin::prompt) continue;
    const size_t y = static_cast<size_t>(B.tokens[i]);
    for (size_t v = 0; v < V; ++v) r.grad[i][v] = w * (ds[i] * ((v == y ? 1 : 0) - P[i][v]) + extra[i][v]);
    r.dlds[i] = w * ds[i];
    r.loss_trust += w * Lt[i];
    r.loss_outlier += w * Lo[i];
    r.loss_guidance += w * Lg[i];
    r.loss_dense += w * Ld[i];
  }
  r.loss = r.loss_trust + r.loss_outlier + r.loss_guidance + r.loss_dense;
  return r;
}

/// max |got - ref| over a [n x V] gradient, relative to max |ref| (absolute when ref is 0).
ld grad_err(const std::vector<float>& got, const std::vector<vec>& ref) {
  ld err = 0, scale = 0;
  for (size_t i = 0; i < ref.size(); ++i)
    for (size_t v = 0; v < V; ++v) {
      err = std::max(err, std::fabs(ld(got[i * V + v]) - ref[i][v]));
      scale = std::max(scale, std::fabs(ref[i][v]));
    }
  return scale > 0 ? err / scale : err;
}

/// dL/dtheta accumulated from reference rows: theta[prev][v] += dL/dz_i[v].
std::vector<ld> theta_grad(const ts::assembled_batch& B, const std::vector<vec>& g) {
  std::vector<ld> out(static_cast<size_t>((V + 1) * V), 0);
  for (size_t j = 0; j + 1 < B.seq_offsets.size(); ++j)
    for (index_t i = B.seq_offsets[j]; i < B.seq_offsets[j + 1]; ++i) {
      const int prev = i == B.seq_offsets[j] ? V : B.tokens[static_cast<size_t>(i - 1)];
      for (size_t v = 0; v < V; ++v) out[static_cast<size_t>(prev) * V + v] += g[static_cast<size_t>(i)][v];
    }
  return out;
}

ld theta_err(const std::vector<double>& got, const std::vector<ld>& ref) {
  ld err = 0, scale = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    err = std::max(err, std::fabs(ld(got[i]) - ref[i]));
    scale = std::max(scale, std::fabs(ref[i]));
  }
  return scale > 0 ? err / scale : err;
}

bool close(ld got, ld ref, ld tol) { return std::fabs(got - ref) <= tol * std::max<ld>(1e-3L, std::fabs(ref)); }

constexpr ld kGradTol = 2e-5L;  // float logits and float gradient rows vs long double
constexpr ld kLossTol = 1e-5L;

/// Runs a row-path step and compares everything the driver produced with `reference`.
template <class Obj, class Sched = ts::cosine>
ref_out run_and_compare(const Obj& obj, const ref_spec& spec, const tr::step_config& cfg,
                        const std::vector<ts::prompt_example>& prompts, bool check_plan = true) {
  mk::logits_student st(student_cf(), END);
  mk::full_teacher te(teacher_cf());
  tr::step_report rep;
  const tropd::status s = tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), obj, Sched{}, cfg, rep);
  INFO(s.message());
  REQUIRE(s.ok());
  CHECK(rep.row_path);
  if (check_plan) check_layout(rep, st, prompts, cfg);
  // The driver handed the batch it reports, once, to each model.
  CHECK(st.logits_calls == 1);
  CHECK(te.logits_calls == 1);
  CHECK(te.logprobs_calls == 0);
  REQUIRE(st.backward_calls == 1);
  CHECK(st.last_tokens == rep.batch.tokens);
  CHECK(st.last_offsets == rep.batch.seq_offsets);

  const ref_out ref = reference(rep.batch, st.cf, te.cf, spec);
  REQUIRE(st.last_grad.size() == rep.batch.tokens.size() * V);
  const ld ge = grad_err(st.last_grad, ref.grad);
  INFO("gradient error " << double(ge));
  CHECK(ge < kGradTol);
  CHECK(theta_err(st.grad_theta, theta_grad(rep.batch, ref.grad)) < kGradTol);
  CHECK(close(rep.loss, ref.loss, kLossTol));
  CHECK(close(rep.diag.loss, ref.loss, kLossTol));
  CHECK(close(rep.diag.loss_trust, ref.loss_trust, kLossTol));
  CHECK(close(rep.diag.loss_outlier, ref.loss_outlier, kLossTol));
  CHECK(close(rep.diag.loss_guidance, ref.loss_guidance, kLossTol));
  CHECK(close(rep.diag.loss_dense, ref.loss_dense, kLossTol));
  CHECK(rep.diag.n_tokens == static_cast<index_t>(rep.batch.tokens.size()));
  CHECK(rep.diag.n_student == ref.n_student);
  CHECK(rep.diag.n_teacher == ref.n_teacher);
  CHECK(rep.diag.n_trusted == ref.n_trusted);
  CHECK(rep.diag.n_outlier == ref.n_outlier);
  CHECK(rep.diag.n_counted == ref.n_counted);
  CHECK(rep.diag.normaliser == doctest::Approx(double(ref.n_counted)));
  return ref;
}

/// p at row i of a batch from the student's closed form.
vec student_probs(const ts::assembled_batch& B, const mk::closed_form& cs, size_t i) {
  size_t j = 0;
  while (!(static_cast<size_t>(B.seq_offsets[j + 1]) > i)) ++j;
  const index_t start = B.seq_offsets[j];
  const int prev = static_cast<index_t>(i) == start ? V : B.tokens[i - 1];
  vec z(V);
  for (int v = 0; v < V; ++v) z[static_cast<size_t>(v)] = cs.logit(prev, static_cast<index_t>(i) - start, v);
  return nv::probs(nv::log_softmax(z));
}

// ---------------------------------------------------------------------------------------
// (c) Concepts
// ---------------------------------------------------------------------------------------

struct sample_only {
  std::vector<int32_t> sample(std::span<const int32_t>, int, double, uint64_t) { return {}; }
};
struct logits_without_vocab {  // logits + backward but no vocab_size(): not a logits_source
  std::vector<int32_t> sample(std::span<const int32_t>, int, double, uint64_t) { return {}; }
  tropd::status logits(const tr::sequence_batch&, tropd::matrix_view<float>) { return {}; }
  tropd::status backward_logits(const tr::sequence_batch&, tropd::matrix_view<const float>) { return {}; }
};
struct logits_wrong_return {  // logits returning bool instead of tropd::status
  index_t vocab_size() const { return V; }
  bool logits(const tr::sequence_batch&, tropd::matrix_view<float>) { return true; }
};
struct logprobs_without_backward {
  std::vector<int32_t> sample(std::span<const int32_t>, int, double, uint64_t) { return {}; }
  tropd::status logprobs(const tr::sequence_batch&, tropd::vector_view<float>) { return {}; }
};

static_assert(tr::student_model<mk::logits_student>);
static_assert(tr::student_model<mk::logprob_student>);
static_assert(tr::student_model<mk::full_student>);
static_assert(tr::sampler<mk::logits_student> && tr::has_vocab<mk::logits_student>);
static_assert(tr::student_with_logits<mk::logits_student> && !tr::student_with_logprobs<mk::logits_student>);
static_assert(!tr::student_with_logits<mk::logprob_student> && tr::student_with_logprobs<mk::logprob_student>);
static_assert(tr::student_with_logits<mk::full_student> && tr::student_with_logprobs<mk::full_student>);
static_assert(!tr::student_model<int>);
static_assert(!tr::student_model<mk::full_teacher>);  // no sample, no backward
static_assert(tr::sampler<sample_only> && !tr::student_model<sample_only>);
static_assert(!tr::student_with_logits<logits_without_vocab> && !tr::student_model<logits_without_vocab>);
static_assert(!tr::logits_source<logits_wrong_return> && !tr::teacher_model<logits_wrong_return>);
static_assert(tr::logprob_source<logprobs_without_backward> && !tr::student_model<logprobs_without_backward>);

static_assert(tr::teacher_model<mk::full_teacher>);
static_assert(tr::teacher_with_logits<mk::full_teacher> && tr::logprob_source<mk::full_teacher>);
static_assert(tr::teacher_with_topk<mk::full_teacher>);
static_assert(tr::teacher_model<mk::logprob_teacher> && !tr::teacher_with_logits<mk::logprob_teacher>);
static_assert(tr::teacher_model<mk::mock_teacher<true, false>> && !tr::logprob_source<mk::mock_teacher<true, false>>);
static_assert(!tr::teacher_model<int>);
static_assert(!tr::teacher_with_topk<mk::logits_student> && !tr::teacher_with_topk<int>);
static_assert(std::is_same_v<decltype(tr::distill_step(std::declval<mk::logits_student&>(), std::declval<mk::full_teacher&>(),
                                                       std::declval<std::span<const ts::prompt_example>>(),
                                                       tropd::presets::opd(), ts::cosine{}, tr::step_config{},
                                                       std::declval<tr::step_report&>())),
                             tropd::status>);

}  // namespace

// ---------------------------------------------------------------------------------------
// (a) Row path: the gradient handed to backward_logits is the objective's dL/dz
// ---------------------------------------------------------------------------------------

TEST_CASE("driver: row path OPD gradient and loss equal the hand-computed objective") {
  const auto prompts = main_prompts();
  const tr::step_config cfg = base_config();
  ref_spec sp;
  sp.kind = rk::opd;
  const ref_out ref = run_and_compare(tropd::presets::opd(), sp, cfg, prompts);
  CHECK(ref.n_student > 0);
  CHECK(ref.n_teacher > 0);            // off-policy samples exist ...
  CHECK(ref.n_counted == ref.n_student);  // ... but OPD gives them no term and does not count them
}

TEST_CASE("driver: row path mask_outlier with guidance equals the hand-computed objective") {
  const auto prompts = main_prompts();
  const tr::step_config cfg = base_config();
  ref_spec sp;
  sp.kind = rk::mask;
  sp.tau = -1.0L;
  sp.beta = 0.05L;
  const ref_out ref = run_and_compare(tropd::presets::mask_outlier({.tau = -1.0, .guidance_beta = 0.05}), sp, cfg, prompts);
  CHECK(ref.n_trusted > 0);
  CHECK(ref.n_outlier > 0);  // dropped, still counted by the token mean
  CHECK(ref.n_teacher > 0);
  CHECK(ref.n_counted == ref.n_student + ref.n_teacher);
}

TEST_CASE("driver: row path TrOPD (stochastic trust region, form C, guidance) equals the hand-computed objective") {
  const auto prompts = main_prompts();
  tr::step_config cfg = base_config();
  for (int k : {3, 64}) {
    for (uint64_t seed : {7u, 8u}) {
      CAPTURE(k);
      CAPTURE(seed);
      cfg.seed = seed;
      ref_spec sp;
      sp.kind = rk::tropd_c;
      sp.beta = 1e-3L;
      sp.k = k;
      sp.seed = seed;
      sp.step = cfg.step;
      const ref_out ref = run_and_compare(tropd::presets::tropd({.beta = 1e-3, .k = k}), sp, cfg, prompts);
      CHECK(ref.min_gap > 1e-4L);  // no decision sits within rounding of log U = R
      CHECK(ref.n_trusted > 0);
      CHECK(ref.n_outlier > 0);
      CHECK(ref.n_teacher > 0);
    }
  }
}

TEST_CASE("driver: row path TrOPD form P equals the hand-computed objective") {
  const auto prompts = main_prompts();
  const tr::step_config cfg = base_config();
  ref_spec sp;
  sp.kind = rk::tropd_p;
  sp.beta = 1e-3L;
  sp.k = 4;
  sp.seed = cfg.seed;
  sp.step = cfg.step;
  const ref_out ref = run_and_compare(tropd::presets::tropd({.beta = 1e-3, .k = 4, .form = tropd::outliers::fkl_form::p}), sp, cfg, prompts);
  CHECK(ref.min_gap > 1e-4L);
  CHECK(ref.n_outlier > 0);
}

TEST_CASE("driver: row path runs GKD (dense JSD) and matches the naive JSD gradient") {
  const auto prompts = main_prompts();
  const tr::step_config cfg = base_config();
  ref_spec sp;
  sp.kind = rk::gkd;
  sp.jsd_beta = 0.5L;
  const ref_out ref = run_and_compare(tropd::presets::gkd({.beta = 0.5}), sp, cfg, prompts);
  CHECK(ref.n_counted == ref.n_student + ref.n_teacher);
}

// ---------------------------------------------------------------------------------------
// (b) Token path: dL/ds chained through log_softmax equals the row path's dL/dz
// ---------------------------------------------------------------------------------------

template <class Obj>
void check_token_path_matches_rows(const Obj& obj, const ref_spec& sp) {
  const auto prompts = main_prompts();
  tr::step_config cfg = base_config();

  mk::full_student rows_st(student_cf(), END);
  mk::full_teacher rows_te(teacher_cf());
  tr::step_report rows;
  REQUIRE(tr::distill_step(rows_st, rows_te, std::span<const ts::prompt_example>(prompts), obj, ts::cosine{}, cfg, rows).ok());
  REQUIRE(rows.row_path);
  CHECK(rows_st.logprobs_calls == 0);

  // The same student forced onto the token path, and a student without logits.
  mk::full_student forced_st(student_cf(), END);
  mk::full_teacher forced_te(teacher_cf());
  tr::step_config forced_cfg = cfg;
  forced_cfg.force_token_path = true;
  tr::step_report forced;
  REQUIRE(tr::distill_step(forced_st, forced_te, std::span<const ts::prompt_example>(prompts), obj, ts::cosine{}, forced_cfg, forced).ok());
  CHECK_FALSE(forced.row_path);
  CHECK(forced_st.logits_calls == 0);
  CHECK(forced_te.logits_calls == 0);
  CHECK(forced_st.logprobs_calls == 1);
  CHECK(forced_te.logprobs_calls == 1);

  mk::logprob_student lp_st(student_cf(), END);
  mk::logprob_teacher lp_te(teacher_cf());
  tr::step_report lp;
  REQUIRE(tr::distill_step(lp_st, lp_te, std::span<const ts::prompt_example>(prompts), obj, ts::cosine{}, cfg, lp).ok());
  CHECK_FALSE(lp.row_path);

  const ref_out ref = reference(rows.batch, rows_st.cf, rows_te.cf, sp);
  for (const tr::step_report* tok : {&forced, &lp}) {
    // Same seed, same student distribution: the same plan and samples on both paths.
    REQUIRE(tok->batch.tokens == rows.batch.tokens);
    CHECK(tok->batch.origin == rows.batch.origin);
    CHECK(tok->batch.seq_offsets == rows.batch.seq_offsets);
    CHECK(close(tok->loss, ref.loss, kLossTol));
    CHECK(close(tok->loss, rows.loss, kLossTol));
    CHECK(tok->diag.n_counted == rows.diag.n_counted);
  }
  REQUIRE(forced_st.last_dlds.size() == rows.batch.tokens.size());
  REQUIRE(lp_st.last_dlds.size() == rows.batch.tokens.size());
  CHECK(forced_st.last_tokens == rows.batch.tokens);
  CHECK(lp_st.last_offsets == rows.batch.seq_offsets);

  // dL/dz_i = dL/ds_i (e_y - p_i), with p_i from the closed form.
  ld err_chain = 0, err_dlds = 0, scale = 0, scale_ds = 0;
  for (size_t i = 0; i < rows.batch.tokens.size(); ++i) {
    const vec p = student_probs(rows.batch, rows_st.cf, i);
    const size_t y = static_cast<size_t>(rows.batch.tokens[i]);
    for (const auto* ds : {&forced_st.last_dlds, &lp_st.last_dlds}) {
      for (size_t v = 0; v < V; ++v) {
        const ld chained = ld((*ds)[i]) * ((v == y ? 1 : 0) - p[v]);
        err_chain = std::max(err_chain, std::fabs(chained - ld(rows_st.last_grad[i * V + v])));
        scale = std::max(scale, std::fabs(ld(rows_st.last_grad[i * V + v])));
      }
      err_dlds = std::max(err_dlds, std::fabs(ld((*ds)[i]) - ref.dlds[i]));
      scale_ds = std::max(scale_ds, std::fabs(ref.dlds[i]));
    }
  }
  REQUIRE(scale > 0);
  CHECK(err_chain / scale < kGradTol);
  CHECK(err_dlds / scale_ds < kGradTol);
  // The models' accumulated parameter gradients agree as well.
  CHECK(theta_err(forced_st.grad_theta, theta_grad(rows.batch, ref.grad)) < kGradTol);
  CHECK(theta_err(lp_st.grad_theta, theta_grad(rows.batch, ref.grad)) < kGradTol);
  CHECK(theta_err(rows_st.grad_theta, theta_grad(rows.batch, ref.grad)) < kGradTol);
}

TEST_CASE("driver: token path OPD dL/ds chained through log_softmax equals the row path dL/dz") {
  ref_spec sp;
  sp.kind = rk::opd;
  check_token_path_matches_rows(tropd::presets::opd(), sp);
}

TEST_CASE("driver: token path mask_outlier with guidance matches the row path") {
  ref_spec sp;
  sp.kind = rk::mask;
  sp.tau = -1.0L;
  sp.beta = 0.05L;
  check_token_path_matches_rows(tropd::presets::mask_outlier({.tau = -1.0, .guidance_beta = 0.05}), sp);
}

// ---------------------------------------------------------------------------------------
// (d) Edge cases of the plan (schedules/plan.hpp) through the driver
// ---------------------------------------------------------------------------------------

TEST_CASE("driver: an empty teacher response gives no off-policy sample (plain OPD for that prompt)") {
  const std::vector<ts::prompt_example> prompts = {
      {{1, 2}, {}, -1},     // empty response
      {{3}, {END}, -1},     // only the end token: L_T = 0 as well
  };
  tr::step_config cfg = base_config();
  cfg.step = 0;  // alpha = 1: any prefix would be the whole response
  ref_spec sp;
  sp.kind = rk::tropd_c;
  sp.beta = 1e-3L;
  sp.seed = cfg.seed;
  sp.step = cfg.step;
  mk::logits_student st(student_cf(), END);
  mk::full_teacher te(teacher_cf());
  tr::step_report rep;
  REQUIRE(tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), tropd::presets::tropd(), ts::cosine{}, cfg, rep).ok());
  check_layout(rep, st, prompts, cfg);
  CHECK(rep.plan.teacher_length == std::vector<index_t>{0, 0});
  CHECK(rep.plan.prefix_length == std::vector<index_t>{0, 0});
  CHECK(rep.plan.num_off_policy() == 0);
  CHECK(rep.batch.seq_kind.size() == 2 * static_cast<size_t>(cfg.n));
  for (auto k : rep.batch.seq_kind) CHECK(k == ts::sample_kind::on_policy);
  for (auto o : rep.batch.origin) CHECK(o != origin::teacher);
  // Sampling contexts are the bare prompts.
  for (size_t c = 0; c < st.contexts.size(); ++c) CHECK(st.contexts[c] == prompts[c / static_cast<size_t>(cfg.n)].prompt);
  CHECK(rep.mean_prefix_fraction == 0.0);
  CHECK(rep.diag.n_teacher == 0);
  CHECK(rep.diag.loss_guidance == 0.0);
  const ref_out ref = reference(rep.batch, st.cf, te.cf, sp);
  CHECK(grad_err(st.last_grad, ref.grad) < kGradTol);
  CHECK(close(rep.loss, ref.loss, kLossTol));
}

TEST_CASE("driver: at step 0 with cosine the prefix is the whole response without its end token") {
  const std::vector<ts::prompt_example> prompts = {
      {{1, 2}, {3, 4, 5, END}, -1},  // L_T = 3 after stripping the end token
      {{4}, {2, 2, 1}, -1},          // no end token: L_T = 3
      {{5}, {END, 1, END}, -1},      // an end token inside is content: L_T = 2
  };
  tr::step_config cfg = base_config();
  cfg.step = 0;
  cfg.total_steps = 10;
  mk::logits_student st(student_cf(), END);
  mk::full_teacher te(teacher_cf());
  tr::step_report rep;
  REQUIRE(tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), tropd::presets::tropd(), ts::cosine{}, cfg, rep).ok());
  check_layout(rep, st, prompts, cfg);
  CHECK(rep.plan.prefix_length == std::vector<index_t>{3, 3, 2});
  CHECK(rep.plan.prefix_length == rep.plan.teacher_length);
  CHECK(rep.mean_prefix_fraction == 1.0);
  // The off-policy sample of prompt 0 is prompt ++ {3, 4, 5}: the final end token is never a
  // teacher-prefix token; each continuation starts right after the full response.
  const std::vector<int32_t> off0(rep.batch.tokens.begin() + rep.batch.seq_offsets[0], rep.batch.tokens.begin() + rep.batch.seq_offsets[1]);
  CHECK(off0 == std::vector<int32_t>{1, 2, 3, 4, 5});
  CHECK(st.contexts[0] == std::vector<int32_t>{1, 2, 3, 4, 5});
  CHECK(st.contexts[static_cast<size_t>(2 * cfg.n)] == std::vector<int32_t>{5, END, 1});
  index_t teacher_tokens = 0;
  for (auto o : rep.batch.origin) teacher_tokens += o == origin::teacher;
  CHECK(teacher_tokens == 3 + 3 + 2);
  ref_spec sp;
  sp.kind = rk::tropd_c;
  sp.beta = 1e-3L;
  sp.seed = cfg.seed;
  sp.step = cfg.step;
  const ref_out ref = reference(rep.batch, st.cf, te.cf, sp);
  CHECK(grad_err(st.last_grad, ref.grad) < kGradTol);
  CHECK(close(rep.loss, ref.loss, kLossTol));

  // The paper's global cap: l = min(L_T, floor(alpha * global_max)).
  cfg.cap = ts::prefix_cap::global_cap;
  cfg.global_max = 2;
  mk::logits_student st2(student_cf(), END);
  mk::full_teacher te2(teacher_cf());
  tr::step_report rep2;
  REQUIRE(tr::distill_step(st2, te2, std::span<const ts::prompt_example>(prompts), tropd::presets::tropd(), ts::cosine{}, cfg, rep2).ok());
  check_layout(rep2, st2, prompts, cfg, cfg.global_max);
  CHECK(rep2.plan.prefix_length == std::vector<index_t>{2, 2, 2});
}

TEST_CASE("driver: n = 0 gives only off-policy samples and the loss is the guidance term alone") {
  const auto prompts = main_prompts();
  tr::step_config cfg = base_config();
  cfg.n = 0;
  const double beta = 0.01;
  mk::logits_student st(student_cf(), END);
  mk::full_teacher te(teacher_cf());
  tr::step_report rep;
  REQUIRE(tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), tropd::presets::tropd({.beta = beta}), ts::cosine{}, cfg, rep).ok());
  CHECK(st.sample_calls == 0);
  check_layout(rep, st, prompts, cfg);
  CHECK(rep.plan.num_on_policy() == 0);
  CHECK(rep.plan.num_off_policy() == 2);  // the third prompt has an empty response
  CHECK(rep.diag.n_student == 0);
  // loss = -beta * mean over teacher-prefix tokens of log p_S(x), by hand.
  ld sum_ls = 0;
  long long n_teacher = 0;
  std::vector<vec> g(rep.batch.tokens.size(), vec(V, 0));
  const auto& B = rep.batch;
  for (size_t j = 0; j + 1 < B.seq_offsets.size(); ++j)
    for (index_t i = B.seq_offsets[j]; i < B.seq_offsets[j + 1]; ++i) {
      if (B.origin[static_cast<size_t>(i)] != origin::teacher) continue;
      const int prev = i == B.seq_offsets[j] ? V : B.tokens[static_cast<size_t>(i - 1)];
      vec z(V);
      for (int v = 0; v < V; ++v) z[static_cast<size_t>(v)] = st.cf.logit(prev, i - B.seq_offsets[j], v);
      const vec ls = nv::log_softmax(z);
      const size_t y = static_cast<size_t>(B.tokens[static_cast<size_t>(i)]);
      sum_ls += ls[y];
      ++n_teacher;
      const vec p = nv::probs(ls);
      for (size_t v = 0; v < V; ++v) g[static_cast<size_t>(i)][v] = -ld(beta) * ((v == y ? 1 : 0) - p[v]);
    }
  REQUIRE(n_teacher == 4 + 7);  // floor(0.854 * 5) + floor(0.854 * 9)
  for (auto& row : g)
    for (auto& x : row) x /= ld(n_teacher);
  const ld expected = -ld(beta) * sum_ls / ld(n_teacher);
  CHECK(close(rep.loss, expected, kLossTol));
  CHECK(close(rep.diag.loss_guidance, expected, kLossTol));
  CHECK(rep.diag.loss_trust == 0.0);
  CHECK(rep.diag.loss_outlier == 0.0);
  CHECK(grad_err(st.last_grad, g) < kGradTol);

  // Without guidance (OPD) nothing is counted: the loss and the gradient are zero.
  mk::logits_student st2(student_cf(), END);
  mk::full_teacher te2(teacher_cf());
  tr::step_report rep2;
  REQUIRE(tr::distill_step(st2, te2, std::span<const ts::prompt_example>(prompts), tropd::presets::opd(), ts::cosine{}, cfg, rep2).ok());
  CHECK(rep2.loss == 0.0);
  CHECK(std::all_of(st2.last_grad.begin(), st2.last_grad.end(), [](float x) { return x == 0.0f; }));
}

TEST_CASE("driver: empty continuations are allowed (their sequences hold no student token)") {
  const auto prompts = main_prompts();
  tr::step_config cfg = base_config();
  cfg.max_new_tokens = 0;
  mk::logits_student st(student_cf(), END);
  mk::full_teacher te(teacher_cf());
  tr::step_report rep;
  REQUIRE(tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), tropd::presets::tropd({.beta = 0.02}), ts::cosine{}, cfg, rep).ok());
  check_layout(rep, st, prompts, cfg);
  CHECK(st.sample_calls == 3 * cfg.n);
  CHECK(rep.diag.n_student == 0);
  ref_spec sp;
  sp.kind = rk::tropd_c;
  sp.beta = 0.02L;
  sp.seed = cfg.seed;
  sp.step = cfg.step;
  const ref_out ref = reference(rep.batch, st.cf, te.cf, sp);
  CHECK(close(rep.loss, ref.loss_guidance, kLossTol));
  CHECK(grad_err(st.last_grad, ref.grad) < kGradTol);
}

TEST_CASE("driver: a step with no sample at all reports empty_batch and leaves the report alone") {
  const auto prompts = main_prompts();
  tr::step_config cfg = base_config();
  cfg.n = 0;
  cfg.step = cfg.total_steps;  // alpha = 0: no prefix, so no off-policy sample either
  mk::logits_student st(student_cf(), END);
  mk::full_teacher te(teacher_cf());
  tr::step_report rep;
  rep.loss = 123.0;
  const tropd::status s = tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), tropd::presets::tropd(), ts::cosine{}, cfg, rep);
  CHECK(s.code == errc::empty_batch);
  CHECK(rep.loss == 123.0);
  CHECK(st.backward_calls == 0);
}

TEST_CASE("driver: invalid plan settings are reported before any model is called") {
  const auto prompts = main_prompts();
  mk::logits_student st(student_cf(), END);
  mk::full_teacher te(teacher_cf());
  tr::step_report rep;
  tr::step_config cfg = base_config();
  cfg.total_steps = 0;
  CHECK(tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), tropd::presets::opd(), ts::cosine{}, cfg, rep).code ==
        errc::invalid_parameter);
  cfg = base_config();
  cfg.n = -1;
  CHECK(tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), tropd::presets::opd(), ts::cosine{}, cfg, rep).code ==
        errc::invalid_parameter);
  cfg = base_config();
  auto bad = prompts;
  bad[1].teacher_response[2] = V;  // outside the student's vocabulary
  CHECK(tr::distill_step(st, te, std::span<const ts::prompt_example>(bad), tropd::presets::opd(), ts::cosine{}, cfg, rep).code ==
        errc::id_out_of_range);
  CHECK(st.sample_calls == 0);
  CHECK(st.logits_calls == 0);
  CHECK(te.logits_calls == 0);
}

// ---------------------------------------------------------------------------------------
// (e) Determinism
// ---------------------------------------------------------------------------------------

TEST_CASE("driver: the same seed gives the same plan, samples, loss and gradient; another seed other samples") {
  const auto prompts = main_prompts();
  tr::step_config cfg = base_config();
  using sched = ts::random_fraction<>;  // per-sample randomness in the plan as well
  auto run = [&](const tr::step_config& c, mk::logits_student& st, tr::step_report& rep) {
    mk::full_teacher te(teacher_cf());
    REQUIRE(tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), tropd::presets::tropd(), sched{}, c, rep).ok());
  };
  mk::logits_student a(student_cf(), END), b(student_cf(), END), c(student_cf(), END);
  tr::step_report ra, rb, rc;
  run(cfg, a, ra);
  run(cfg, b, rb);
  CHECK(ra.plan.prefix_length == rb.plan.prefix_length);
  CHECK(ra.plan.fraction == rb.plan.fraction);
  CHECK(a.seeds == b.seeds);
  CHECK(a.outputs == b.outputs);
  CHECK(ra.batch.tokens == rb.batch.tokens);
  CHECK(ra.batch.origin == rb.batch.origin);
  CHECK(ra.loss == rb.loss);  // bitwise: same inputs, same decisions
  CHECK(ra.diag.n_trusted == rb.diag.n_trusted);
  CHECK(a.last_grad == b.last_grad);

  // Each continuation gets its own seed, and the seeds are those the driver documents.
  CHECK(std::set<uint64_t>(a.seeds.begin(), a.seeds.end()).size() == a.seeds.size());
  // Continuation k belongs to plan sample on_policy[k], whose global sequence id is
  // step * stride + offset + on_policy[k] (plan.hpp); the seed is keyed by that id.
  REQUIRE(ra.plan.on_policy.size() == a.seeds.size());
  for (size_t k = 0; k < a.seeds.size(); ++k) {
    const uint64_t sid = static_cast<uint64_t>(cfg.step) * cfg.seq_id_stride + cfg.seq_id_offset +
                         static_cast<uint64_t>(ra.plan.on_policy[k]);
    CHECK(a.seeds[k] == tr::sample_seed(cfg.seed, cfg.step, sid));
    CHECK(sid == ra.batch.seq_ids[static_cast<size_t>(ra.plan.on_policy[k])]);
  }
  // Low bits vary too (a sampler that keeps only 16 bits of the seed still sees distinct seeds).
  uint64_t low_or = 0;
  for (uint64_t sd : a.seeds) low_or |= sd & 0x7ffu;
  CHECK(low_or != 0);
  // Two data-parallel ranks with disjoint seq_id_offset draw different seeds.
  tr::step_config rank1 = cfg;
  rank1.seq_id_offset = 500;
  mk::logits_student e(student_cf(), END);
  tr::step_report re;
  run(rank1, e, re);
  for (uint64_t sd : e.seeds) CHECK(std::find(a.seeds.begin(), a.seeds.end(), sd) == a.seeds.end());

  tr::step_config other = cfg;
  other.seed = cfg.seed + 1;
  run(other, c, rc);
  CHECK(c.outputs != a.outputs);
  for (uint64_t s : c.seeds) CHECK(std::find(a.seeds.begin(), a.seeds.end(), s) == a.seeds.end());

  // The row passes' thread count changes nothing (deterministic row-parallel loop).
  tr::step_config threaded = cfg;
  threaded.threads = 2;
  mk::logits_student d(student_cf(), END);
  tr::step_report rd;
  run(threaded, d, rd);
  CHECK(rd.batch.tokens == ra.batch.tokens);
  CHECK(rd.loss == ra.loss);
  CHECK(d.last_grad == a.last_grad);

  // Seeds do not repeat across steps either.
  std::set<uint64_t> all;
  size_t count = 0;
  for (long long step = 0; step < 4; ++step)
    for (uint64_t k = 0; k < 12; ++k, ++count) all.insert(tr::sample_seed(cfg.seed, step, k));
  CHECK(all.size() == count);
}

// ---------------------------------------------------------------------------------------
// (f) Prefix lengths through the driver for a sweep of steps
// ---------------------------------------------------------------------------------------

TEST_CASE("driver: prefix lengths never exceed the teacher lengths over a sweep of steps") {
  std::vector<ts::prompt_example> prompts;
  const int lengths[] = {0, 1, 2, 5, 13, 40};
  for (int i = 0; i < 6; ++i) {
    ts::prompt_example ex;
    ex.prompt = {static_cast<int32_t>(i % 5)};
    for (int k = 0; k < lengths[i]; ++k) ex.teacher_response.push_back(static_cast<int32_t>((k * 3 + i) % 5));
    if (i % 2 == 0) ex.teacher_response.push_back(END);
    prompts.push_back(ex);
  }
  const long long N = 12;
  auto check_step = [&](const tr::step_report& rep, const mk::logits_student& st) {
    REQUIRE(rep.plan.num_prompts() == 6);
    const auto& B = rep.batch;
    for (size_t p = 0; p < 6; ++p) {
      const index_t L = rep.plan.teacher_length[p], l = rep.plan.prefix_length[p];
      CHECK(L == lengths[p]);
      CHECK(l >= 0);
      CHECK(l <= L);
    }
    // Every off-policy sequence carries exactly its prompt's l teacher tokens, none an end token.
    for (size_t j = 0; j + 1 < B.seq_offsets.size(); ++j) {
      index_t nt = 0;
      for (index_t i = B.seq_offsets[j]; i < B.seq_offsets[j + 1]; ++i)
        if (B.origin[static_cast<size_t>(i)] == origin::teacher) {
          ++nt;
          CHECK(B.tokens[static_cast<size_t>(i)] != END);
        }
      const size_t p = static_cast<size_t>(B.sample_prompt[j]);
      if (B.seq_kind[j] == ts::sample_kind::off_policy) CHECK(nt == rep.plan.prefix_length[p]);
      else CHECK(nt == 0);
    }
    for (size_t c = 0; c < st.contexts.size(); ++c) {
      const size_t p = c;  // n = 1: one context per prompt, in prompt order
      CHECK(st.contexts[c].size() == prompts[p].prompt.size() + static_cast<size_t>(rep.plan.prefix_length[p]));
    }
  };
  for (long long step = 0; step <= N + 2; ++step) {
    CAPTURE(step);
    tr::step_config cfg;
    cfg.step = step;
    cfg.total_steps = N;
    cfg.n = 1;
    cfg.max_new_tokens = 2;
    cfg.seed = 3;
    cfg.end_token = END;
    {  // cosine, per-sample fraction: l = floor(alpha * L_T)
      mk::logits_student st(student_cf(), END);
      mk::full_teacher te(teacher_cf());
      tr::step_report rep;
      REQUIRE(tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), tropd::presets::opd(), ts::cosine{}, cfg, rep).ok());
      check_step(rep, st);
      for (size_t p = 0; p < 6; ++p) {
        bool amb = false;
        const long long l = closed_prefix(cosine_alpha(step, N), lengths[p], lengths[p], amb);
        if (!amb) CHECK(rep.plan.prefix_length[p] == l);
      }
    }
    {  // cosine, global cap 20
      tr::step_config g = cfg;
      g.cap = ts::prefix_cap::global_cap;
      g.global_max = 20;
      mk::logits_student st(student_cf(), END);
      mk::full_teacher te(teacher_cf());
      tr::step_report rep;
      REQUIRE(tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), tropd::presets::opd(), ts::cosine{}, g, rep).ok());
      check_step(rep, st);
      for (size_t p = 0; p < 6; ++p) {
        bool amb = false;
        const long long l = closed_prefix(cosine_alpha(step, N), lengths[p], 20, amb);
        if (!amb) CHECK(rep.plan.prefix_length[p] == l);
      }
    }
    {  // per-sample random fraction
      mk::logits_student st(student_cf(), END);
      mk::full_teacher te(teacher_cf());
      tr::step_report rep;
      REQUIRE(tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), tropd::presets::opd(), ts::random_fraction<>{}, cfg, rep).ok());
      check_step(rep, st);
    }
  }
}

// ---------------------------------------------------------------------------------------
// (g) Vocabulary mismatch, (h) objectives that need the row path
// ---------------------------------------------------------------------------------------

TEST_CASE("driver: student and teacher vocabulary sizes that differ give shape_mismatch") {
  const auto prompts = main_prompts();
  const tr::step_config cfg = base_config();
  mk::logits_student st(student_cf(), END);
  mk::full_teacher te(teacher_cf(V + 1));
  tr::step_report rep;
  rep.loss = -7.0;
  const tropd::status s = tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), tropd::presets::opd(), ts::cosine{}, cfg, rep);
  CHECK(s.code == errc::shape_mismatch);
  CHECK(rep.loss == -7.0);
  CHECK(rep.batch.tokens.empty());
  CHECK(st.backward_calls == 0);
  CHECK_THROWS_AS(tropd::throw_if_error(s), tropd::error);
}

namespace {

template <class Student, class Teacher, class Obj>
void expect_unsupported(const Obj& obj, bool force) {
  const auto prompts = main_prompts();
  tr::step_config cfg = base_config();
  cfg.force_token_path = force;
  Student st(student_cf(), END);
  Teacher te(teacher_cf());
  tr::step_report rep;
  rep.loss = 42.0;
  const tropd::status s = tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), obj, ts::cosine{}, cfg, rep);
  INFO(s.message());
  CHECK(s.code == errc::unsupported);
  CHECK(rep.loss == 42.0);
  CHECK(st.backward_calls == 0);
}

template <class Obj>
void expect_unsupported_on_token_path(const Obj& obj) {
  expect_unsupported<mk::full_student, mk::full_teacher>(obj, true);     // forced
  expect_unsupported<mk::logprob_student, mk::full_teacher>(obj, false);  // student without logits
  expect_unsupported<mk::logprob_student, mk::logprob_teacher>(obj, false);
}

}  // namespace

TEST_CASE("driver: objectives that need logits, top-k lists or entropies report unsupported on the token path") {
  namespace pr = tropd::presets;
  SUBCASE("TrOPD (top-k lists)") { expect_unsupported_on_token_path(pr::tropd()); }
  SUBCASE("FKL outlier (top-k lists)") { expect_unsupported_on_token_path(pr::fkl_outlier()); }
  SUBCASE("EOPD (teacher entropy, top-k lists)") { expect_unsupported_on_token_path(pr::eopd()); }
  SUBCASE("GKD (dense term)") { expect_unsupported_on_token_path(pr::gkd()); }
  SUBCASE("Entropy OPD (student entropy)") { expect_unsupported_on_token_path(pr::entropy_opd()); }
  SUBCASE("REOPOLD (student entropy in phase II)") { expect_unsupported_on_token_path(pr::reopold({.floor = -2.0, .switch_step = 100})); }
  SUBCASE("vOPD (per-position reverse KL)") { expect_unsupported_on_token_path(pr::vopd()); }
  SUBCASE("G-OPD (reference log-probs)") { expect_unsupported_on_token_path(pr::gopd()); }
  SUBCASE("the same objectives run on the row path") {
    const auto prompts = main_prompts();
    const tr::step_config cfg = base_config();
    mk::full_student st(student_cf(), END);
    mk::full_teacher te(teacher_cf());
    tr::step_report rep;
    CHECK(tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), pr::eopd(), ts::cosine{}, cfg, rep).ok());
    CHECK(tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), pr::entropy_opd(), ts::cosine{}, cfg, rep).ok());
    CHECK(tr::distill_step(st, te, std::span<const ts::prompt_example>(prompts), pr::vopd(), ts::cosine{}, cfg, rep).ok());
    CHECK(rep.row_path);
  }
}

TEST_CASE("driver: a served teacher (log-probs and top-k lists) runs the row path and equals the teacher's logits") {
  // The served teacher is the same closed-form model without logits: its log-probs and its
  // top-k lists (mock_teacher::topk, strongest first) carry everything OPD and TrOPD read.
  const auto prompts = main_prompts();
  const tr::step_config cfg = base_config();
  auto compare = [&](const auto& obj) {
    mk::logits_student s1(student_cf(), END), s2(student_cf(), END);
    mk::full_teacher full(teacher_cf());
    mk::logprob_teacher served(teacher_cf());
    tr::step_report r1, r2;
    REQUIRE(tr::distill_step(s1, full, std::span<const ts::prompt_example>(prompts), obj, ts::cosine{}, cfg, r1).ok());
    const tropd::status st = tr::distill_step(s2, served, std::span<const ts::prompt_example>(prompts), obj, ts::cosine{}, cfg, r2);
    REQUIRE_MESSAGE(st.ok(), st.message());
    CHECK(r2.row_path);
    CHECK(served.logprobs_calls == 1);
    // fp32 lists and log-probs: the same loss and gradient to fp32 rounding.
    CHECK(std::fabs(r1.loss - r2.loss) <= 1e-6 * std::max(1.0, std::fabs(r1.loss)));
    CHECK(r1.diag.n_trusted == r2.diag.n_trusted);
    REQUIRE(s1.grad_theta.size() == s2.grad_theta.size());
    double worst = 0, scale = 0;
    for (size_t i = 0; i < s1.grad_theta.size(); ++i) {
      worst = std::max(worst, std::fabs(s1.grad_theta[i] - s2.grad_theta[i]));
      scale = std::max(scale, std::fabs(s1.grad_theta[i]));
    }
    CHECK(worst <= 1e-5 * std::max(1.0, scale));
  };
  compare(tropd::presets::opd());
  compare(tropd::presets::tropd({.k = 4}));
  compare(tropd::presets::tropd({.k = 4, .form = tropd::outliers::fkl_form::p}));
  // Objectives that read the teacher's full distribution still need its logits.
  expect_unsupported<mk::logits_student, mk::logprob_teacher>(tropd::presets::vopd(), false);
  expect_unsupported<mk::logits_student, mk::logprob_teacher>(tropd::presets::eopd(), false);
  expect_unsupported<mk::logits_student, mk::logprob_teacher>(tropd::presets::gkd(), false);
}

TEST_CASE("driver: no usable path is unsupported") {
  // Forcing the token path with a student that has no log-probs.
  expect_unsupported<mk::logits_student, mk::full_teacher>(tropd::presets::opd(), true);
  // A teacher with logits only cannot serve the token path.
  expect_unsupported<mk::logprob_student, mk::mock_teacher<true, false>>(tropd::presets::opd(), false);
}
