// Host side of the objective tests on the device: gpu::evaluate_tokens and gpu::evaluate_rows
// against their host twins (tropd::host::evaluate_tokens / evaluate_rows) on the same inputs,
// every device output NaN-poisoned before each call (tests/gpu/objective_harness.cuh).
//
// Tolerances: token level, 1e-12 relative (double arithmetic on both sides; the sums differ in
// order). Row level, 1e-5 relative for fp32 logits (1e-2 for 16-bit) on the loss, diagnostics
// and per-token values; the gradient per row against max(max_j |g_host|, |w_r / T_S| max_j p_j)
// (tests/gpu/test_rows.cpp). Flags, counts and selected ids exactly. (A trust decision log U <=
// R, or the entropy quantile, could differ between the backends where two values agree to the
// fp32 rounding of the row statistics; the inputs here keep away from that by construction,
// which a failure message would say otherwise.)
#include <doctest/doctest.h>

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <tropd/tropd.hpp>

#include "gpu/runs.hpp"

namespace {

using tropd::index_t;
namespace tg = tropd_gpu_test;
namespace tp = tropd::presets;
namespace te = tropd::estimators;
constexpr double dinf = std::numeric_limits<double>::infinity();

#define REQUIRE_HARNESS(rs) REQUIRE_MESSAGE((rs).harness_ok(), "CUDA harness failure: ", (rs).where)

bool close(double got, double ref, double tol) {
  if (std::isnan(ref)) return std::isnan(got);
  if (std::isinf(ref)) return got == ref;
  if (std::isnan(got)) return false;
  return std::fabs(got - ref) <= tol * std::max(std::fabs(ref), 1e-3);
}

template <class T>
T make(double x) {
  if constexpr (std::is_same_v<T, tropd::bf16>) return tropd::bf16::from_float(float(x));
  else if constexpr (std::is_same_v<T, tropd::fp16>) return tropd::fp16::from_float(float(x));
  else return static_cast<T>(x);
}
template <class T>
constexpr double tol_of() {
  return (std::is_same_v<T, float> || std::is_same_v<T, double>) ? 1e-5 : 1e-2;
}

void check_diag(const tropd::diagnostics& a, const tropd::diagnostics& b, double tol) {
  CHECK(a.n_tokens == b.n_tokens);
  CHECK(a.n_student == b.n_student);
  CHECK(a.n_teacher == b.n_teacher);
  CHECK(a.n_counted == b.n_counted);
  CHECK(a.n_kept == b.n_kept);
  CHECK(a.n_trusted == b.n_trusted);
  CHECK(a.n_outlier == b.n_outlier);
  CHECK(a.n_zero_teacher_mass == b.n_zero_teacher_mass);
  CHECK(a.n_masked_input == b.n_masked_input);
  const std::pair<double, double> v[] = {
      {a.loss, b.loss}, {a.loss_trust, b.loss_trust}, {a.loss_outlier, b.loss_outlier}, {a.loss_guidance, b.loss_guidance},
      {a.loss_dense, b.loss_dense}, {a.normaliser, b.normaliser}, {a.trust_fraction, b.trust_fraction},
      {a.outlier_fraction, b.outlier_fraction}, {a.adv_clip_fraction, b.adv_clip_fraction}, {a.ratio_clip_fraction, b.ratio_clip_fraction},
      {a.mean_R_trusted, b.mean_R_trusted}, {a.mean_R_outlier, b.mean_R_outlier}, {a.tv_estimate, b.tv_estimate},
      {a.mean_student_entropy, b.mean_student_entropy}, {a.mean_teacher_entropy, b.mean_teacher_entropy},
      {a.mean_topk_teacher_mass, b.mean_topk_teacher_mass}, {a.mean_topk_student_mass, b.mean_topk_student_mass},
      {a.mean_rkl, b.mean_rkl}};
  int k = 0;
  for (auto [x, y] : v) {
    CHECK_MESSAGE(close(x, y, tol), "diagnostics field ", k, ": device ", x, " host ", y);
    ++k;
  }
}

/// Every device output NaN / 0 / -1 (a failed call) or still the poison.
template <class G>
void check_poisoned(const tg::objective_result<G>& d) {
  CHECK(std::isnan(d.loss));
  for (double x : d.dloss_ds) CHECK(std::isnan(x));
  for (double x : d.advantage) CHECK(std::isnan(x));
  for (double x : d.dloss_dtopk) CHECK(std::isnan(x));
  for (uint8_t f : d.flags) CHECK((f == 0 || f == 0xff));
  for (G g : d.grad) CHECK(std::isnan(double(g)));
}

// -------------------------------------------------------------------------------------------------
// Token level
// -------------------------------------------------------------------------------------------------

/// 10 sequences of prompt, teacher-prefix and student tokens; every optional array; top-k lists
/// of width K (some -inf padding, a tail the teacher leaves); bad values where asked.
tg::token_data make_tokens(std::mt19937_64& rng, index_t K, bool bad = false) {
  tg::token_data d;
  d.K = K;
  std::uniform_int_distribution<int> len(1, 25), tag(0, 9);
  std::normal_distribution<double> nd(0, 1);
  d.seq_offsets.push_back(0);
  for (int j = 0; j < 10; ++j) {
    d.seq_offsets.push_back(d.seq_offsets.back() + len(rng));
    d.seq_ids.push_back((uint64_t(1) << 33) + 1000003u * uint64_t(j));  // above 2^32: folded into the stream word
  }
  const index_t n = d.seq_offsets.back();
  for (index_t i = 0; i < n; ++i) {
    const int tg_ = tag(rng);
    d.from.push_back(tg_ == 0 ? tropd::origin::prompt : (tg_ <= 2 ? tropd::origin::teacher : tropd::origin::student));
    const double s = -std::fabs(nd(rng)) - 0.05;
    d.s.push_back(s);
    d.s_old.push_back(s + 0.1 * nd(rng));
    d.t.push_back(tg_ == 9 ? -dinf : -std::fabs(nd(rng)) * 3 - 0.01);
    d.ent_s.push_back(std::fabs(nd(rng)) + 0.1);
    d.ent_t.push_back(std::fabs(nd(rng)) + 0.1);
    d.rkl.push_back(std::fabs(nd(rng)));
    d.ref.push_back(-std::fabs(nd(rng)) - 0.2);
    std::vector<double> q(static_cast<size_t>(K));
    double m = 0;
    for (index_t k = 0; k < K; ++k) m += (q[size_t(k)] = std::exp(nd(rng)));
    for (index_t k = 0; k < K; ++k) {
      d.topk_ids.push_back(int32_t(k * 7 + (i % 5)));
      d.topk_teacher.push_back(k == K - 1 && i % 4 == 0 && K > 1 ? -dinf : std::log(0.9 * q[size_t(k)] / m));
      d.topk_student.push_back(std::log(0.8 * q[size_t(k)] / m) + 0.1 * nd(rng));
      d.topk_student_old.push_back(d.topk_student.back() + 0.05 * nd(rng));
    }
  }
  if (bad) {
    d.s[3] = std::numeric_limits<double>::quiet_NaN();
    d.from[3] = tropd::origin::student;
    d.t[7] = 0.5;  // a logit passed as a log-prob
    d.from[7] = tropd::origin::teacher;
  }
  return d;
}

template <class Obj>
void tokens_case(const Obj& obj, const std::string& name, tg::token_data d, const tg::objective_case& c) {
  CAPTURE(name);
  CAPTURE(c.mask);
  CAPTURE(c.step);
  CAPTURE(d.f32);
  const index_t n = d.n(), K = d.K;
  const tropd::token_batch b = d.view();
  std::vector<double> dl(static_cast<size_t>(n)), adv(static_cast<size_t>(n)), dtk(static_cast<size_t>(n * K));
  std::vector<uint8_t> fl(static_cast<size_t>(n));
  double loss = 0;
  tropd::diagnostics diag;
  const tropd::token_outputs out{&loss, &diag, tropd::values_out(dl), tropd::values_out(adv),
                                 K ? tropd::values_matrix_out(dtk.data(), n, K, K) : tropd::values_matrix_out{}, tropd::view_of(fl)};
  tropd::host::eval_options eo;
  eo.seed = c.seed;
  eo.step = c.step;
  eo.bad_input = c.mask ? tropd::host::input_policy::mask : tropd::host::input_policy::reject;
  const tropd::status hs = tropd::host::evaluate_tokens(obj, b, out, eo);
  tg::objective_result<> r;
  const tg::run_status rs = tg::gpu_evaluate_tokens(obj, d, c, r);
  REQUIRE_HARNESS(rs);
  if (!rs.call.ok()) {  // argument errors: the host's, before anything ran
    CHECK(rs.call.code == hs.code);
    return;
  }
  if (!hs.ok()) {
    CHECK(rs.device.code == hs.code);
    CHECK(rs.device.row == hs.row);
    CHECK(rs.device.col == hs.col);
    check_poisoned(r);
    return;
  }
  REQUIRE_MESSAGE(rs.device.ok(), rs.device.message());
  const double tol = 1e-12;
  CHECK(close(r.loss, loss, tol));
  check_diag(r.diag, diag, tol);
  for (index_t i = 0; i < n; ++i) {
    CHECK_MESSAGE(close(r.dloss_ds[size_t(i)], dl[size_t(i)], tol), "token ", i);
    CHECK_MESSAGE(close(r.advantage[size_t(i)], adv[size_t(i)], tol), "token ", i);
    CHECK_MESSAGE(r.flags[size_t(i)] == fl[size_t(i)], "token ", i);
  }
  for (size_t k = 0; k < dtk.size(); ++k) CHECK(close(r.dloss_dtopk[k], dtk[k], tol));
}

template <class Obj>
void tokens_all_aggregations(Obj obj, const std::string& name, std::mt19937_64& rng, index_t K) {
  using tropd::aggregation::mode;
  for (mode m : {mode::token_mean, mode::kept_token_mean, mode::seq_mean_token_mean, mode::seq_mean_token_sum, mode::sum_over_constant})
    for (double ext : {0.0, 1234.5}) {
      obj.agg.how = m;
      obj.agg.constant = 3.25;
      obj.agg.normaliser = ext;
      tokens_case(obj, name + " " + tropd::aggregation::to_string(m) + (ext > 0 ? " external" : ""), make_tokens(rng, K), {.seed = 5});
    }
}

}  // namespace

TEST_CASE("gpu evaluate_tokens matches host::evaluate_tokens: every preset, every aggregation mode, the external normaliser") {
  std::mt19937_64 rng(1);
  tokens_all_aggregations(tp::opd(), "opd", rng, 0);
  tokens_all_aggregations(tp::tropd({.k = 8}), "tropd", rng, 8);
  tokens_all_aggregations(tp::reopold({.switch_step = 0}), "reopold phase II", rng, 0);
  const tg::objective_case c{.seed = 99};
  tokens_case(tp::eopd({.k = 6}), "eopd", make_tokens(rng, 6), c);
  tokens_case(tp::reopold({.switch_step = 10}), "reopold phase I", make_tokens(rng, 0), {.seed = 1, .step = 9});
  tokens_case(tp::reopold({.switch_step = 10}), "reopold phase II", make_tokens(rng, 0), {.seed = 1, .step = 10});
  tokens_case(tp::entropy_opd({.fraction = 0.35}), "entropy_opd", make_tokens(rng, 0), c);
  tokens_case(tp::entropy_opd({.fraction = 1.0}), "entropy_opd (all)", make_tokens(rng, 0), c);
  tokens_case(tp::clip_outlier({.tau = -2.0, .guidance_beta = 1e-3}), "clip_outlier", make_tokens(rng, 0), c);
  tokens_case(tp::mask_outlier({.tau = -2.0}), "mask_outlier", make_tokens(rng, 0), c);
  tokens_case(tp::fkl_outlier({.k = 8, .form = tropd::outliers::fkl_form::p, .tail = tp::topk_tail::tail_bucket}), "fkl_outlier P tail",
              make_tokens(rng, 8), c);
  tokens_case(tp::fkl_outlier({.k = 8, .clamp = 0.5, .tail = tp::topk_tail::raw}), "fkl_outlier C raw clamp", make_tokens(rng, 8), c);
  tokens_case(tp::vopd(), "vopd", make_tokens(rng, 0), c);
  tokens_case(tp::gopd(), "gopd", make_tokens(rng, 0), c);
  tg::trm_objective trm;
  trm.region.bound = 2.0;
  tokens_case(trm, "sequence_ratio_bound", make_tokens(rng, 0), c);
  trm.region.two_sided = true;
  tokens_case(trm, "sequence_ratio_bound two-sided", make_tokens(rng, 0), c);
  tokens_case(tg::k3_loss_objective{}, "k3 as loss", make_tokens(rng, 0), c);
  tokens_case(tg::proximal_objective{}, "proximal reward", make_tokens(rng, 0), c);
  // fp32 per-token arrays (the tagged views) and a long list.
  tg::token_data d = make_tokens(rng, 64);
  d.make_f32();
  tokens_case(tp::tropd({.k = 64, .form = tropd::outliers::fkl_form::p}), "tropd P, fp32 arrays", d, c);
  tokens_case(tp::tropd({.k = 1024}), "tropd, K = 1024", make_tokens(rng, 1024), c);
}

TEST_CASE("gpu evaluate_tokens: data errors are the host's (reject), masked tokens the host's (mask); failed calls poison every output") {
  std::mt19937_64 rng(2);
  tokens_case(tp::tropd({.k = 8}), "reject", make_tokens(rng, 8, true), {.seed = 3});
  tokens_case(tp::tropd({.k = 8}), "mask", make_tokens(rng, 8, true), {.seed = 3, .mask = true});
  tokens_case(tp::opd(), "mask", make_tokens(rng, 0, true), {.seed = 3, .mask = true});
  // Structure: decreasing offsets, a bad origin tag, a repeated top-k id, the per-token rule.
  tg::token_data d = make_tokens(rng, 8);
  std::swap(d.seq_offsets[3], d.seq_offsets[4]);
  tokens_case(tp::tropd({.k = 8}), "decreasing offsets", d, {});
  d = make_tokens(rng, 8);
  d.from[5] = static_cast<tropd::origin>(7);
  tokens_case(tp::tropd({.k = 8}), "origin tag", d, {});
  d = make_tokens(rng, 8);
  for (index_t i = 0; i < d.n(); ++i)
    if (d.from[size_t(i)] == tropd::origin::student) {
      d.topk_ids[size_t(i * 8 + 6)] = d.topk_ids[size_t(i * 8 + 2)];
      d.topk_teacher[size_t(i * 8 + 6)] = -1.0;
      break;
    }
  tokens_case(tp::tropd({.k = 8}), "repeated top-k id", d, {});
  d = make_tokens(rng, 0);
  for (index_t i = 0; i < d.n(); ++i)
    if (d.from[size_t(i)] == tropd::origin::student) d.t[size_t(i)] = -dinf;  // OPD: a trusted token with zero teacher mass
  tokens_case(tp::opd(), "per-token rule (infinite reward)", d, {});
  // Argument errors (returned before any launch): width, shapes, a dense objective.
  tokens_case(tp::tropd({.k = 16}), "k differs from the lists' width", make_tokens(rng, 8), {});
  d = make_tokens(rng, 0);
  d.ent_s.clear();
  tokens_case(tp::entropy_opd(), "missing entropies", d, {});
  tg::objective_result<> r;
  tg::run_status rs = tg::gpu_evaluate_tokens(tp::gkd(), make_tokens(rng, 0), {}, r);
  REQUIRE_HARNESS(rs);
  CHECK(rs.call.code == tropd::errc::unsupported);
  rs = tg::gpu_evaluate_tokens(tp::opd(), make_tokens(rng, 0), {.small_scratch = true}, r);
  REQUIRE_HARNESS(rs);
  CHECK(rs.call.code == tropd::errc::insufficient_scratch);
}

// -------------------------------------------------------------------------------------------------
// Row level
// -------------------------------------------------------------------------------------------------

namespace {

/// Rows of 10 sequences: student logits N(0, 2), teacher logits the student's plus N(0, 1) (a
/// mix of trusted tokens and outliers), ids sampled from the student row; with `served`, the
/// teacher as log-probs of the ids and top-K lists (from its logits in double).
template <class T>
tg::rows_data<T> make_rows(std::mt19937_64& rng, index_t V, bool served = false, index_t K = 0, double sd = 2.0) {
  tg::rows_data<T> d;
  d.V = V;
  std::uniform_int_distribution<int> len(1, 9), tag(0, 9);
  std::normal_distribution<double> nd(0, 1);
  d.seq_offsets.push_back(0);
  for (int j = 0; j < 10; ++j) {
    d.seq_offsets.push_back(d.seq_offsets.back() + len(rng));
    d.seq_ids.push_back(77 + 13 * uint64_t(j));
  }
  d.n = d.seq_offsets.back();
  std::vector<double> u(static_cast<size_t>(V));
  for (index_t r = 0; r < d.n; ++r) {
    const int tg_ = tag(rng);
    d.from.push_back(tg_ == 0 ? tropd::origin::prompt : (tg_ <= 2 ? tropd::origin::teacher : tropd::origin::student));
    std::vector<double> z(static_cast<size_t>(V));
    for (index_t j = 0; j < V; ++j) {
      z[size_t(j)] = tropd::to_acc(make<T>(sd * nd(rng)));
      u[size_t(j)] = tropd::to_acc(make<T>(z[size_t(j)] + nd(rng)));
      d.student.push_back(make<T>(z[size_t(j)]));
      if (!served) d.teacher.push_back(make<T>(u[size_t(j)]));
    }
    // The token: sampled from the student's softmax (double).
    const double m = *std::max_element(z.begin(), z.end());
    double sum = 0;
    for (double x : z) sum += std::exp(x - m);
    std::uniform_real_distribution<double> uni(0, sum);
    double c = uni(rng), acc = 0;
    int32_t y = int32_t(V - 1);
    for (index_t j = 0; j < V; ++j) {
      acc += std::exp(z[size_t(j)] - m);
      if (acc >= c) {
        y = int32_t(j);
        break;
      }
    }
    d.ids.push_back(y);
    if (served) {
      const double mu = *std::max_element(u.begin(), u.end());
      double su = 0;
      for (double x : u) su += std::exp(x - mu);
      const double lse = mu + std::log(su);
      d.t.push_back(u[size_t(y)] - lse);
      std::vector<int32_t> order(static_cast<size_t>(V));
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int32_t a, int32_t b) { return u[size_t(a)] > u[size_t(b)]; });
      for (index_t k = 0; k < K; ++k) {
        d.list_ids.push_back(order[size_t(k)]);
        d.list_lp.push_back(float(u[size_t(order[size_t(k)])] - lse));
      }
    }
  }
  if (served) d.K = K;
  return d;
}

/// The host twin of a rows case and the comparison.
template <class Obj, class T, class G = float>
void rows_case(const Obj& obj, const std::string& name, const tg::rows_data<T>& d, const tg::objective_case& c) {
  CAPTURE(name);
  CAPTURE(c.blocks_per_row);
  CAPTURE(c.mask);
  CAPTURE(d.V);
  const index_t n = d.n, V = d.V;
  index_t K = 0;
  if constexpr (Obj::outlier_type::needs_topk) K = d.K ? d.K : std::min<index_t>(obj.outlier.fkl.k, V);
  std::vector<double> dl(static_cast<size_t>(n)), adv(static_cast<size_t>(n)), dtk(static_cast<size_t>(n * K));
  std::vector<uint8_t> fl(static_cast<size_t>(n));
  std::vector<G> grad(c.grad ? size_t(n * V) : 0);
  std::vector<int32_t> ids_out(static_cast<size_t>(n * K));
  double loss = 0;
  tropd::diagnostics diag;
  tropd::host::row_outputs<G> out;
  if (c.grad) out.grad = tropd::make_matrix(grad.data(), n, V);
  out.loss = &loss;
  if (c.diag) out.diag = &diag;
  if (c.token_outputs) {
    out.dloss_ds = tropd::values_out(dl);
    out.advantage = tropd::values_out(adv);
    if (K) out.dloss_dtopk = tropd::values_matrix_out(dtk.data(), n, K, K);
    out.flags = tropd::view_of(fl);
    if (K) out.topk_ids = tropd::make_matrix(ids_out.data(), n, K);
  }
  tropd::host::eval_options eo;
  eo.seed = c.seed;
  eo.step = c.step;
  eo.bad_input = c.mask ? tropd::host::input_policy::mask : tropd::host::input_policy::reject;
  const auto sv = tropd::make_matrix<const T>(d.student.data(), n, V);
  tropd::status hs;
  if (d.teacher.empty())
    hs = tropd::host::evaluate_rows(obj, sv, tropd::host::teacher_logprobs{tropd::values_view(d.t.data(), n)}, d.inputs(), out, eo);
  else
    hs = tropd::host::evaluate_rows(obj, sv, tropd::make_matrix<const T>(d.teacher.data(), n, V), d.inputs(), out, eo);
  tg::objective_result<G> r;
  const tg::run_status rs = tg::gpu_evaluate_rows(obj, d, c, r);
  REQUIRE_HARNESS(rs);
  if (c.small_scratch) {
    CHECK(rs.call.code == tropd::errc::insufficient_scratch);
    return;
  }
  if (!rs.call.ok()) {
    CHECK(rs.call.code == hs.code);
    return;
  }
  if (!hs.ok()) {
    CHECK_MESSAGE(rs.device.code == hs.code, rs.device.message(), " vs host ", hs.message());
    CHECK(rs.device.row == hs.row);
    CHECK(rs.device.col == hs.col);
    if (hs.code != tropd::errc::infinite_divergence || std::string(hs.detail).find("gradient") == std::string::npos) check_poisoned(r);
    return;
  }
  REQUIRE_MESSAGE(rs.device.ok(), rs.device.message());
  const double tol = tol_of<T>();
  CHECK_MESSAGE(close(r.loss, loss, tol), "loss ", r.loss, " vs host ", loss);
  if (c.diag) check_diag(r.diag, diag, tol);
  if (c.token_outputs) {
    for (index_t i = 0; i < n; ++i) {
      CHECK_MESSAGE(r.flags[size_t(i)] == fl[size_t(i)], "row ", i);
      CHECK_MESSAGE(close(r.dloss_ds[size_t(i)], dl[size_t(i)], tol), "row ", i, ": ", r.dloss_ds[size_t(i)], " vs ", dl[size_t(i)]);
      CHECK_MESSAGE(close(r.advantage[size_t(i)], adv[size_t(i)], tol), "row ", i);
    }
    for (size_t k = 0; k < dtk.size(); ++k) CHECK_MESSAGE(close(r.dloss_dtopk[k], dtk[k], tol), "entry ", k);
    CHECK(r.topk_ids == ids_out);
  }
  if (c.grad) {
    double worst = 0;
    index_t worst_row = -1;
    for (index_t i = 0; i < n; ++i) {
      // Floor: |dL/ds_i| / T_S max_j p_j (the scale of the fp32 probabilities).
      double m = -dinf, sum = 0;
      for (index_t j = 0; j < V; ++j) m = std::max(m, double(tropd::to_acc(d.student[size_t(i * V + j)])) / d.ts);
      for (index_t j = 0; j < V; ++j) sum += std::exp(double(tropd::to_acc(d.student[size_t(i * V + j)])) / d.ts - m);
      double scale = std::fabs(dl.empty() ? 0.0 : dl[size_t(i)]) / d.ts / sum, err = 0;
      for (index_t j = 0; j < V; ++j) {
        const double g = double(r.grad[size_t(i * V + j)]), h = double(grad[size_t(i * V + j)]);
        if (!std::isfinite(g)) {
          err = dinf;
          break;
        }
        err = std::max(err, std::fabs(g - h));
        scale = std::max(scale, std::fabs(h));
      }
      const double e = scale > 0 ? err / scale : err;
      if (e > worst) {
        worst = e;
        worst_row = i;
      }
    }
    CHECK_MESSAGE(worst < tol, "gradient error ", worst, " in row ", worst_row);
  }
}

}  // namespace

TEST_CASE("gpu evaluate_rows matches host::evaluate_rows: every preset, one block per row and split") {
  std::mt19937_64 rng(3);
  for (index_t V : {index_t(1000), index_t(5003)})
    for (int bpr : {1, 3, 0}) {
      const tg::objective_case c{.seed = 11, .blocks_per_row = bpr};
      rows_case(tp::opd(), "opd", make_rows<float>(rng, V), c);
      rows_case(tp::eopd({.k = 16}), "eopd", make_rows<float>(rng, V), c);
      rows_case(tp::reopold({.switch_step = 0}), "reopold phase II", make_rows<float>(rng, V), c);
      rows_case(tp::entropy_opd(), "entropy_opd", make_rows<float>(rng, V), c);
      rows_case(tp::clip_outlier({.tau = -2.0, .guidance_beta = 1e-3}), "clip_outlier", make_rows<float>(rng, V), c);
      rows_case(tp::mask_outlier({.tau = -2.0, .guidance_beta = 1e-3}), "mask_outlier", make_rows<float>(rng, V), c);
      rows_case(tp::tropd(), "tropd (form C, top-64 selected)", make_rows<float>(rng, V), c);
      rows_case(tp::tropd({.k = 64, .form = tropd::outliers::fkl_form::p, .tail = tp::topk_tail::tail_bucket}), "tropd P tail bucket",
                make_rows<float>(rng, V), c);
      rows_case(tp::vopd(), "vopd", make_rows<float>(rng, V), c);
      auto rd = make_rows<float>(rng, V);
      for (index_t i = 0; i < rd.n; ++i) rd.ref.push_back(-3.0 - 0.01 * double(i));
      rows_case(tp::gopd(), "gopd", rd, c);
      rows_case(tp::gkd({.beta = 0.4}), "gkd", make_rows<float>(rng, V), c);
      rows_case(tp::gkd({.beta = 0.0}), "gkd beta 0", make_rows<float>(rng, V), c);
      rows_case(tp::gkd({.beta = 1.0}), "gkd beta 1", make_rows<float>(rng, V), c);
      tg::trm_objective trm;
      trm.region.bound = 3.0;
      rows_case(trm, "sequence_ratio_bound", make_rows<float>(rng, V), c);
    }
}

TEST_CASE("gpu evaluate_rows: every aggregation mode and the external normaliser, diagnostics off, outputs off") {
  std::mt19937_64 rng(4);
  using tropd::aggregation::mode;
  auto obj = tp::tropd({.k = 16});
  for (mode m : {mode::token_mean, mode::kept_token_mean, mode::seq_mean_token_mean, mode::seq_mean_token_sum, mode::sum_over_constant})
    for (double ext : {0.0, 77.0}) {
      obj.agg.how = m;
      obj.agg.constant = 2.5;
      obj.agg.normaliser = ext;
      rows_case(obj, std::string("tropd ") + tropd::aggregation::to_string(m), make_rows<float>(rng, 2000), {.seed = 21});
    }
  rows_case(tp::tropd(), "no diagnostics", make_rows<float>(rng, 2000), {.seed = 1, .diag = false});
  rows_case(tp::tropd(), "loss only", make_rows<float>(rng, 2000), {.seed = 1, .token_outputs = false, .grad = false});
}

TEST_CASE("gpu evaluate_rows: bf16 / fp16 / fp64 logits, fp64 gradients, GKD in bf16, a PG term with a dense term") {
  std::mt19937_64 rng(5);
  for (int bpr : {1, 4}) {
    const tg::objective_case c{.seed = 8, .blocks_per_row = bpr};
    rows_case(tp::tropd(), "tropd bf16", make_rows<tropd::bf16>(rng, 3001), c);
    rows_case(tp::tropd(), "tropd fp16", make_rows<tropd::fp16>(rng, 3001, false, 0, 1.0), c);
    rows_case<tp::fkl_outlier_objective, double, double>(tp::tropd({.k = 32}), "tropd fp64", make_rows<double>(rng, 3001), c);
    rows_case(tp::opd(), "opd bf16", make_rows<tropd::bf16>(rng, 3001), c);
    rows_case(tp::gkd({.beta = 0.6}), "gkd bf16", make_rows<tropd::bf16>(rng, 3001), c);
    tg::k1_jsd_objective kj;
    kj.guidance_beta = 0.01;
    kj.dense_weight = 0.5;
    rows_case<tg::k1_jsd_objective, float, double>(kj, "k1 + jsd, fp64 gradient", make_rows<float>(rng, 3001), c);
  }
}

TEST_CASE("gpu evaluate_rows: the teacher's top-k selected on the device (ties, V < k, K up to 1024), served teachers") {
  std::mt19937_64 rng(6);
  // bf16 teachers: many ties at the k-th value (the lower id wins).
  rows_case(tp::tropd({.k = 64, .form = tropd::outliers::fkl_form::p}), "bf16 ties", make_rows<tropd::bf16>(rng, 4000, false, 0, 0.3), {.seed = 2});
  // V < k: the whole row, padded with (-1, -inf).
  rows_case(tp::tropd({.k = 64}), "V = 31 < k", make_rows<float>(rng, 31), {.seed = 2});
  rows_case(tp::tropd({.k = 64, .form = tropd::outliers::fkl_form::p}), "V = 31 < k, form P", make_rows<float>(rng, 31), {.seed = 2});
  rows_case(tp::tropd({.k = 1024, .form = tropd::outliers::fkl_form::p}), "K = 1024", make_rows<float>(rng, 5000), {.seed = 2});
  // Served teachers: log-probs and lists (reopold's region needs no teacher logits).
  rows_case(tp::tropd({.k = 32}), "served teacher, lists", make_rows<float>(rng, 2000, true, 32), {.seed = 2});
  rows_case(tp::reopold({.switch_step = 0}), "served teacher", make_rows<float>(rng, 2000, true, 8), {.seed = 2});
  // Given lists with teacher logits (the logits still give t, H_T and the KL): the lists are
  // the caller's, here the teacher's top-16 shifted by one rank (so they differ from a selection).
  auto d = make_rows<float>(rng, 2000);
  d.K = 16;
  for (index_t r = 0; r < d.n; ++r) {
    std::vector<int32_t> order(2000);
    std::iota(order.begin(), order.end(), 0);
    const float* u = d.teacher.data() + r * 2000;
    std::partial_sort(order.begin(), order.begin() + 17, order.end(), [&](int32_t a, int32_t b) { return u[a] > u[b]; });
    for (index_t k = 0; k < 16; ++k) {
      d.list_ids.push_back(order[size_t(k + 1)]);
      d.list_lp.push_back(-2.0f - 0.1f * float(k));
    }
  }
  rows_case(tp::eopd({.k = 16}), "given lists with teacher logits", d, {.seed = 2});
}

TEST_CASE("gpu evaluate_rows: the tail bucket with a tiny student tail uses the exact tail (the gradient stays on the list)") {
  // Every student row puts all but ~1e-12 of its mass on the teacher's top-2 (core fixes, B6).
  tg::rows_data<float> d;
  d.V = 8;
  d.seq_offsets = {0, 6};
  d.seq_ids = {3};
  d.n = 6;
  for (index_t r = 0; r < d.n; ++r) {
    for (index_t j = 0; j < d.V; ++j) {
      d.student.push_back(j < 2 ? 0.0f : (r % 2 ? -28.0f : -36.0f));
      d.teacher.push_back(j < 2 ? float(std::log(0.25)) : float(std::log(0.5 / 6)));
    }
    d.ids.push_back(int32_t(r % 2));
    d.from.push_back(r == 0 ? tropd::origin::prompt : tropd::origin::student);
  }
  tg::all_outliers_objective o;
  o.region.tau = 1e9;
  o.outlier.fkl = te::topk_forward_kl{2, te::topk_tail::tail_bucket};
  o.outlier.form = tropd::outliers::fkl_form::p;
  for (int bpr : {1, 2}) rows_case(o, "tail bucket, tiny tail", d, {.blocks_per_row = bpr});
}

TEST_CASE("gpu evaluate_rows: the host's errors (ids, NaN / overflowing logits R1, zero mass), masked rows, poisoned outputs") {
  std::mt19937_64 rng(7);
  auto d = make_rows<float>(rng, 1000);
  d.ids[4] = 1000;  // out of range
  rows_case(tp::opd(), "id out of range", d, {});
  d = make_rows<float>(rng, 1000);
  d.student[size_t(5 * 1000 + 900)] = std::numeric_limits<float>::quiet_NaN();
  d.teacher[size_t(5 * 1000 + 700)] = std::numeric_limits<float>::infinity();  // same chunk: the student's error first
  d.teacher[size_t(9 * 1000 + 3)] = std::numeric_limits<float>::quiet_NaN();
  for (int bpr : {1, 3}) {
    rows_case(tp::opd(), "NaN logits, reject", d, {.blocks_per_row = bpr});
    rows_case(tp::opd(), "NaN logits, mask", d, {.mask = true, .blocks_per_row = bpr});
  }
  // R1: a finite logit that overflows once divided by T.
  d = make_rows<float>(rng, 1000);
  d.student[size_t(2 * 1000 + 17)] = 3.0e38f;
  d.ts = 0.5;
  rows_case(tp::opd(), "R1: finite logit overflowing after 1/T", d, {});
  // A student row of -inf (no_finite_entry), reject and mask.
  d = make_rows<float>(rng, 1000);
  for (index_t j = 0; j < 1000; ++j) d.student[size_t(3 * 1000 + j)] = -std::numeric_limits<float>::infinity();
  rows_case(tp::tropd(), "a row without a finite entry", d, {});
  rows_case(tp::tropd(), "a row without a finite entry, mask", d, {.mask = true});
  // Zero student mass at the token.
  d = make_rows<float>(rng, 1000);
  for (index_t r = 0; r < d.n; ++r)
    if (d.from[size_t(r)] != tropd::origin::prompt) {
      d.student[size_t(r * 1000 + d.ids[size_t(r)])] = -std::numeric_limits<float>::infinity();
      break;
    }
  rows_case(tp::opd(), "zero student mass at the token", d, {});
  // GKD: an infinite reverse KL (beta = 1) on a non-prompt row.
  d = make_rows<float>(rng, 1000);
  for (index_t r = 0; r < d.n; ++r)
    if (d.from[size_t(r)] != tropd::origin::prompt) {
      d.teacher[size_t(r * 1000 + 11)] = -std::numeric_limits<float>::infinity();
      break;
    }
  rows_case(tp::gkd({.beta = 1.0}), "gkd beta 1, infinite divergence", d, {});
  // Given lists with a repeated id; a top-k objective without lists or logits (unsupported).
  auto g = make_rows<float>(rng, 2000, true, 16);
  for (index_t r = 0; r < g.n; ++r)
    if (g.from[size_t(r)] == tropd::origin::student) {
      g.list_ids[size_t(r * 16 + 9)] = g.list_ids[size_t(r * 16 + 4)];
      break;
    }
  rows_case(tp::tropd({.k = 16}), "repeated list id", g, {});
  rows_case(tp::tropd({.k = 16}), "small scratch", make_rows<float>(rng, 1000), {.small_scratch = true});
}
