// The fused LM head (host/fused_lm_head.hpp): the objective from hidden states and the output
// weight, chunk by chunk, against the unfused path (the logits materialised, then
// host::evaluate_rows, then dL/dh = G W and dL/dW = G^T h), for every preset, several chunk
// sizes (one that does not divide n), both sweep policies and the three teacher forms; the
// gradients by finite differences (logit scale, soft-cap, bias, temperatures); the scratch the
// call asks for, counted through its allocator; the GEMM hook; bad input.
#include <stdint.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/host/fused_lm_head.hpp>
#include <tropd/tropd.hpp>

namespace {

using tropd::index_t;
using tropd::origin;
namespace host = tropd::host;
namespace presets = tropd::presets;

enum class teacher_form { head, logits, logprobs };
const char* name_of(teacher_form f) { return f == teacher_form::head ? "head" : f == teacher_form::logits ? "logits" : "logprobs"; }

/// A batch: student and teacher heads, metadata, and the teacher in its other two forms.
template <class T>
struct problem {
  index_t n = 0, H = 0, HT = 0, V = 0, K = 0;  // K: top-k width of the given lists (logprobs form)
  std::vector<T> h, w, b, ht, wt, bt;
  tropd::logit_transform tf{}, tft{};
  std::vector<int32_t> ids;
  std::vector<origin> from;
  std::vector<index_t> off;
  std::vector<double> s_old, ref;
  double Ts = 1, Tt = 1;
  // The teacher as logits [n x V] (materialised by the reference) and as log-probs + lists.
  std::vector<T> U;
  std::vector<double> t;
  std::vector<int32_t> list_ids;
  std::vector<double> list_lp;

  tropd::linear_head<T> student() const {
    return {tropd::make_matrix<const T>(h.data(), n, H), tropd::make_matrix<const T>(w.data(), V, H),
            b.empty() ? tropd::vector_view<const T>{} : tropd::vector_view<const T>{b.data(), V}, tf};
  }
  tropd::linear_head<T> teacher() const {
    return {tropd::make_matrix<const T>(ht.data(), n, HT), tropd::make_matrix<const T>(wt.data(), V, HT),
            bt.empty() ? tropd::vector_view<const T>{} : tropd::vector_view<const T>{bt.data(), V}, tft};
  }
  host::row_inputs inputs(teacher_form f) const {
    host::row_inputs in{.ids = tropd::view_of(ids), .from = tropd::view_of(from), .seq_offsets = tropd::view_of(off)};
    if (!s_old.empty()) in.s_old = s_old;
    if (!ref.empty()) in.ref = ref;
    in.student_temperature = Ts;
    in.teacher_temperature = Tt;
    if (f == teacher_form::logprobs)
      in.teacher_topk = {tropd::make_matrix<const int32_t>(list_ids.data(), n, K), tropd::make_matrix<const double>(list_lp.data(), n, K)};
    return in;
  }
};

/// x = h W^T + b in long double, then the transform (long double tanh), rounded to T: the
/// materialised logits of a head, computed independently of the library.
template <class T>
std::vector<T> logits_of(const std::vector<T>& h, const std::vector<T>& w, const std::vector<T>& b, const tropd::logit_transform& tf,
                         index_t n, index_t H, index_t V) {
  std::vector<T> z(size_t(n * V));
  for (index_t r = 0; r < n; ++r)
    for (index_t j = 0; j < V; ++j) {
      long double x = 0;
      for (index_t k = 0; k < H; ++k) x += (long double)h[size_t(r * H + k)] * (long double)w[size_t(j * H + k)];
      if (!b.empty()) x += b[size_t(j)];
      long double y = (long double)tf.scale * x;
      if (tf.softcap > 0) y = (long double)tf.softcap * std::tanh(y / (long double)tf.softcap);
      z[size_t(r * V + j)] = T(y);
    }
  return z;
}

/// n rows in sequences of at most 5 tokens; every third sequence starts with a prompt token,
/// then one teacher-prefix token, then student tokens.
template <class T>
problem<T> make_problem(index_t n, index_t H, index_t HT, index_t V, index_t K, uint64_t seed, bool transforms) {
  problem<T> P;
  P.n = n, P.H = H, P.HT = HT, P.V = V, P.K = K;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  auto fill = [&](std::vector<T>& v, size_t count, double sd) {
    v.resize(count);
    for (auto& x : v) x = T(sd * nd(rng));
  };
  fill(P.h, size_t(n * H), 1.0);
  for (index_t r = 0; r < n; ++r)  // rows of different scales: entropies from peaked to flat
    for (index_t k = 0; k < H; ++k) P.h[size_t(r * H + k)] *= T(0.4 + 0.25 * double(r % 7));
  fill(P.w, size_t(V * H), 1.0);
  fill(P.ht, size_t(n * HT), 1.0);
  fill(P.wt, size_t(V * HT), 1.0);
  if (transforms) {
    fill(P.b, size_t(V), 0.5);
    fill(P.bt, size_t(V), 0.5);
    P.tf = {0.8, 3.0};
    P.tft = {1.2, 5.0};
    P.Ts = 0.9;
    P.Tt = 1.1;
  }
  for (index_t r0 = 0, j = 0; r0 < n; ++j) {
    P.off.push_back(r0);
    const index_t len = std::min<index_t>(5, n - r0);
    for (index_t i = 0; i < len; ++i) P.from.push_back(i == 0 && j % 3 == 0 ? origin::prompt : i <= (j % 3 == 0 ? 1 : 0) ? origin::teacher : origin::student);
    r0 += len;
  }
  P.off.push_back(n);
  std::uniform_int_distribution<int32_t> uid(0, int32_t(V - 1));
  for (index_t r = 0; r < n; ++r) P.ids.push_back(uid(rng));
  P.ref.resize(size_t(n));
  for (auto& x : P.ref) x = -1.5 + 0.3 * nd(rng);
  // The teacher as logits and as log-probs of the tokens + top-K lists (at the teacher's temperature).
  P.U = logits_of(P.ht, P.wt, P.bt, P.tft, n, HT, V);
  P.t.resize(size_t(n));
  P.list_ids.assign(size_t(n * K), -1);
  P.list_lp.assign(size_t(n * K), -std::numeric_limits<double>::infinity());
  for (index_t r = 0; r < n; ++r) {
    std::vector<long double> a(static_cast<size_t>(V));
    long double m = -1e300L, s = 0;
    for (index_t j = 0; j < V; ++j) m = std::max(m, a[size_t(j)] = (long double)P.U[size_t(r * V + j)] / (long double)P.Tt);
    for (index_t j = 0; j < V; ++j) s += std::exp(a[size_t(j)] - m);
    const long double lse = m + std::log(s);
    P.t[size_t(r)] = double(a[size_t(P.ids[size_t(r)])] - lse);
    std::vector<int32_t> order(static_cast<size_t>(V));
    for (index_t j = 0; j < V; ++j) order[size_t(j)] = int32_t(j);
    std::stable_sort(order.begin(), order.end(), [&](int32_t x, int32_t y) { return a[size_t(x)] > a[size_t(y)]; });
    for (index_t k = 0; k < std::min(K, V); ++k) {
      P.list_ids[size_t(r * K + k)] = order[size_t(k)];
      P.list_lp[size_t(r * K + k)] = double(a[size_t(order[size_t(k)])] - lse);
    }
  }
  return P;
}

/// What a call returns (gradients in double).
struct result {
  tropd::status st{};
  double loss = 0;
  tropd::diagnostics diag{};
  std::vector<double> dh, dw, db, dloss_ds, adv, dtopk;
  std::vector<uint8_t> flags;
  std::vector<int32_t> topk_ids;
  host::fused_info info{};
};

/// The top-k width an objective's outputs have (0: no top-k term).
template <class Obj, class T>
index_t topk_width(const Obj& obj, const problem<T>& P, teacher_form f) {
  if constexpr (Obj::outlier_type::needs_topk) return f == teacher_form::logprobs ? P.K : std::min<index_t>(obj.outlier.fkl.k, P.V);
  else return 0;
}

/// The unfused path: z = transform(h W^T + b) materialised, evaluate_rows, then dL/dx = G
/// transform'(z), dL/dh = dL/dx W, dL/dW = dL/dx^T h, dL/db = column sums (long double).
template <class Obj, class T>
result unfused(const Obj& obj, const problem<T>& P, teacher_form f, const host::eval_options& eo) {
  const index_t n = P.n, V = P.V, H = P.H, K = topk_width(obj, P, f);
  const std::vector<T> Z = logits_of(P.h, P.w, P.b, P.tf, n, H, V);
  std::vector<double> G(size_t(n * V));
  result R;
  R.dloss_ds.resize(size_t(n));
  R.adv.resize(size_t(n));
  R.flags.resize(size_t(n));
  R.dtopk.resize(size_t(n * K));
  R.topk_ids.resize(size_t(n * K));
  const host::row_outputs<double> out{.grad = tropd::make_matrix(G.data(), n, V), .loss = &R.loss, .diag = &R.diag,
                                      .dloss_ds = R.dloss_ds, .advantage = R.adv,
                                      .dloss_dtopk = K ? tropd::values_matrix_out(R.dtopk.data(), n, K, K) : tropd::values_matrix_out{},
                                      .flags = tropd::view_of(R.flags),
                                      .topk_ids = K ? tropd::make_matrix(R.topk_ids.data(), n, K) : tropd::matrix_view<int32_t>{}};
  const auto zs = tropd::make_matrix<const T>(Z.data(), n, V);
  if (f == teacher_form::logprobs)
    R.st = host::evaluate_rows(obj, zs, host::teacher_logprobs{P.t}, P.inputs(f), out, eo);
  else
    R.st = host::evaluate_rows(obj, zs, tropd::make_matrix<const T>(P.U.data(), n, V), P.inputs(f), out, eo);
  if (!R.st.ok()) return R;
  std::vector<long double> gx(size_t(n * V));
  for (index_t i = 0; i < n * V; ++i) {
    long double d = (long double)P.tf.scale;
    if (P.tf.softcap > 0) {
      const long double t = (long double)Z[size_t(i)] / (long double)P.tf.softcap;
      d *= 1 - t * t;
    }
    gx[size_t(i)] = (long double)G[size_t(i)] * d;
  }
  R.dh.assign(size_t(n * H), 0);
  R.dw.assign(size_t(V * H), 0);
  R.db.assign(size_t(V), 0);
  for (index_t r = 0; r < n; ++r)
    for (index_t k = 0; k < H; ++k) {
      long double s = 0;
      for (index_t j = 0; j < V; ++j) s += gx[size_t(r * V + j)] * (long double)P.w[size_t(j * H + k)];
      R.dh[size_t(r * H + k)] = double(s);
    }
  for (index_t j = 0; j < V; ++j) {
    long double sb = 0;
    for (index_t r = 0; r < n; ++r) sb += gx[size_t(r * V + j)];
    R.db[size_t(j)] = double(sb);
    for (index_t k = 0; k < H; ++k) {
      long double s = 0;
      for (index_t r = 0; r < n; ++r) s += gx[size_t(r * V + j)] * (long double)P.h[size_t(r * H + k)];
      R.dw[size_t(j * H + k)] = double(s);
    }
  }
  return R;
}

/// The fused call. dL/dW and dL/db start at `prefill` (they are added to) and are returned
/// minus it.
template <class Obj, class T, class Gemm = host::eigen_gemm>
result fused(const Obj& obj, const problem<T>& P, teacher_form f, host::fused_options fo, Gemm gemm = {}, T prefill = T(0.25),
             bool frozen = false) {
  const index_t n = P.n, V = P.V, H = P.H, K = topk_width(obj, P, f);
  result R;
  std::vector<T> dh(size_t(n * H), T(777)), dw(size_t(V * H), prefill), db(size_t(V), prefill);
  R.dloss_ds.resize(size_t(n));
  R.adv.resize(size_t(n));
  R.flags.resize(size_t(n));
  R.dtopk.resize(size_t(n * K));
  R.topk_ids.resize(size_t(n * K));
  const host::fused_outputs<T> out{
      .grad_hidden = tropd::make_matrix(dh.data(), n, H),
      .grad_weight = frozen ? tropd::matrix_view<T>{} : tropd::make_matrix(dw.data(), V, H),
      .grad_bias = frozen ? tropd::vector_view<T>{} : tropd::vector_view<T>{db.data(), V},
      .loss = &R.loss, .diag = &R.diag, .dloss_ds = R.dloss_ds, .advantage = R.adv,
      .dloss_dtopk = K ? tropd::values_matrix_out(R.dtopk.data(), n, K, K) : tropd::values_matrix_out{},
      .flags = tropd::view_of(R.flags),
      .topk_ids = K ? tropd::make_matrix(R.topk_ids.data(), n, K) : tropd::matrix_view<int32_t>{},
      .info = &R.info};
  switch (f) {
    case teacher_form::head: R.st = host::fused_lm_head(obj, P.student(), P.teacher(), P.inputs(f), out, fo, gemm); break;
    case teacher_form::logits:
      R.st = host::fused_lm_head(obj, P.student(), tropd::make_matrix<const T>(P.U.data(), n, V), P.inputs(f), out, fo, gemm);
      break;
    case teacher_form::logprobs: R.st = host::fused_lm_head(obj, P.student(), host::teacher_logprobs{P.t}, P.inputs(f), out, fo, gemm); break;
  }
  R.dh.assign(dh.begin(), dh.end());
  for (size_t i = 0; i < dw.size(); ++i) R.dw.push_back(double(dw[i]) - double(prefill));
  for (size_t i = 0; i < db.size(); ++i) R.db.push_back(double(db[i]) - double(prefill));
  return R;
}

double rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double scale = 1e-300, d = 0;
  for (size_t i = 0; i < b.size(); ++i) scale = std::max(scale, std::fabs(b[i]));
  for (size_t i = 0; i < b.size(); ++i) d = std::max(d, std::fabs(a[i] - b[i]));
  return a.size() == b.size() ? d / scale : 1e300;
}
bool close(double a, double b, double tol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= tol * std::max(1.0, std::fabs(b));
}

/// Everything a fused call returns equals the unfused path's (tol: relative, fp32 or fp64).
void check_equal(const result& got, const result& want, double tol, bool gradients = true) {
  REQUIRE_MESSAGE(want.st.ok(), want.st.message());
  REQUIRE_MESSAGE(got.st.ok(), got.st.message());
  CHECK(close(got.loss, want.loss, tol));
  const auto& a = got.diag;
  const auto& b = want.diag;
  CHECK(close(a.loss_trust, b.loss_trust, tol));
  CHECK(close(a.loss_outlier, b.loss_outlier, tol));
  CHECK(close(a.loss_guidance, b.loss_guidance, tol));
  CHECK(close(a.loss_dense, b.loss_dense, tol));
  CHECK(a.normaliser == b.normaliser);
  CHECK(a.n_tokens == b.n_tokens);
  CHECK(a.n_student == b.n_student);
  CHECK(a.n_teacher == b.n_teacher);
  CHECK(a.n_counted == b.n_counted);
  CHECK(a.n_kept == b.n_kept);
  CHECK(a.n_trusted == b.n_trusted);
  CHECK(a.n_outlier == b.n_outlier);
  CHECK(a.n_masked_input == b.n_masked_input);
  CHECK(close(a.tv_estimate, b.tv_estimate, tol));
  CHECK(close(a.mean_student_entropy, b.mean_student_entropy, tol));
  CHECK(close(a.mean_teacher_entropy, b.mean_teacher_entropy, tol));
  CHECK(close(a.mean_rkl, b.mean_rkl, tol));
  CHECK(close(a.mean_topk_teacher_mass, b.mean_topk_teacher_mass, tol));
  CHECK(close(a.mean_topk_student_mass, b.mean_topk_student_mass, tol));
  CHECK(got.flags == want.flags);
  CHECK(got.topk_ids == want.topk_ids);
  CHECK(rel_diff(got.dloss_ds, want.dloss_ds) <= tol);
  CHECK(rel_diff(got.adv, want.adv) <= tol);
  CHECK(rel_diff(got.dtopk, want.dtopk) <= tol);
  if (!gradients) return;
  CHECK(rel_diff(got.dh, want.dh) <= tol);
  CHECK(rel_diff(got.dw, want.dw) <= tol);
  CHECK(rel_diff(got.db, want.db) <= tol);
}

/// Every preset with its expected sweeps (sweep_policy::automatic, bad input rejected) and the
/// eval step it runs at (REOPOLD's two phases).
template <class F>
void for_each_preset(F&& f) {
  f("opd", presets::opd(), 1, 0);
  f("eopd", presets::eopd({.tau = 2.0, .k = 5}), 1, 0);
  f("reopold phase I", presets::reopold(), 2, 0);
  f("reopold phase II", presets::reopold(), 2, 150);
  f("entropy_opd", presets::entropy_opd(), 2, 0);
  f("clip_outlier", presets::clip_outlier({.tau = -2.0, .guidance_beta = 1e-3}), 1, 0);
  f("mask_outlier", presets::mask_outlier({.tau = -2.0, .guidance_beta = 0.1}), 1, 0);
  f("fkl_outlier", presets::fkl_outlier({.k = 5}), 1, 0);
  f("fkl_outlier P tail", presets::fkl_outlier({.k = 5, .form = tropd::outliers::fkl_form::p, .tail = tropd::estimators::topk_tail::tail_bucket}), 1, 0);
  f("tropd", presets::tropd({.k = 5}), 1, 0);
  f("tropd P raw", presets::tropd({.beta = 0.05, .k = 5, .form = tropd::outliers::fkl_form::p, .tail = tropd::estimators::topk_tail::raw}), 1, 0);
  f("gkd", presets::gkd(), 1, 0);
  f("vopd", presets::vopd(), 1, 0);
  f("gopd", presets::gopd(), 1, 0);
}

}  // namespace

TEST_CASE("fused LM head: the sweeps each preset takes") {
  for_each_preset([](const char* name, auto obj, int sweeps, int) {
    CAPTURE(name);
    CHECK(tropd::fused_sweeps(obj, false) == sweeps);
    CHECK(tropd::fused_sweeps(obj, true) == 2);  // input_policy::mask: always two
  });
  static_assert(tropd::fused_one_sweep_capable<presets::fkl_outlier_objective>);
  static_assert(!tropd::fused_one_sweep_capable<presets::reopold_objective>);
  static_assert(!tropd::fused_one_sweep_capable<presets::entropy_opd_objective>);
  // A mean over kept tokens takes one sweep with an external normaliser.
  auto o = presets::mask_outlier();
  o.agg.how = tropd::aggregation::mode::kept_token_mean;
  CHECK(tropd::fused_sweeps(o, false) == 2);
  o.agg.normaliser = 12;
  CHECK(tropd::fused_sweeps(o, false) == 1);
  // Sequence modes weigh tokens from the origin tags: one sweep.
  auto q = presets::tropd();
  q.agg.how = tropd::aggregation::mode::seq_mean_token_mean;
  CHECK(tropd::fused_sweeps(q, false) == 1);
}

TEST_CASE("fused LM head: every preset equals the unfused path (fp64; chunks 1, 3, 4, n, > n; both sweeps; three teacher forms)") {
  const index_t n = 11, H = 6, HT = 5, V = 37;
  for (bool transforms : {false, true}) {
    const problem<double> P = make_problem<double>(n, H, HT, V, 5, 7 + transforms, transforms);
    for_each_preset([&](const char* name, auto obj, int sweeps, int step) {
      for (teacher_form f : {teacher_form::head, teacher_form::logits, teacher_form::logprobs}) {
        CAPTURE(name);
        CAPTURE(name_of(f));
        CAPTURE(transforms);
        const host::eval_options eo{.seed = 11, .step = uint64_t(step)};
        const result want = unfused(obj, P, f, eo);
        if (!want.st.ok()) {
          // The row level refuses this teacher form for the objective: so does the fused call.
          const result got = fused(obj, P, f, {.eval = eo, .chunk = 3});
          CHECK(f == teacher_form::logprobs);
          CHECK(got.st.code == want.st.code);
          continue;
        }
        for (index_t chunk : {index_t(1), index_t(3), index_t(4), n, index_t(64)})
          for (tropd::sweep_policy sp : {tropd::sweep_policy::automatic, tropd::sweep_policy::two}) {
            CAPTURE(chunk);
            CAPTURE(int(sp));
            const result got = fused(obj, P, f, {.eval = eo, .chunk = chunk, .sweeps = sp});
            check_equal(got, want, 1e-11);
            CHECK(got.info.chunk == std::min(chunk, n));
            CHECK(got.info.sweeps == (sp == tropd::sweep_policy::two ? 2 : sweeps));
          }
        // Two threads (row passes and GEMM), chunk 4.
        const result got2 = fused(obj, P, f, {.eval = {.seed = 11, .step = uint64_t(step), .threads = 2}, .chunk = 4});
        check_equal(got2, want, 1e-11);
      }
    });
  }
}

TEST_CASE("fused LM head: every preset equals the unfused path in fp32 (chunk 3 of n = 10, teacher head, transforms)") {
  const index_t n = 10, H = 16, HT = 12, V = 50;
  const problem<float> P = make_problem<float>(n, H, HT, V, 5, 3, true);
  for_each_preset([&](const char* name, auto obj, int, int step) {
    CAPTURE(name);
    const host::eval_options eo{.seed = 5, .step = uint64_t(step)};
    const result want = unfused(obj, P, teacher_form::head, eo);
    for (tropd::sweep_policy sp : {tropd::sweep_policy::automatic, tropd::sweep_policy::two}) {
      const result got = fused(obj, P, teacher_form::head, {.eval = eo, .chunk = 3, .sweeps = sp});
      check_equal(got, want, 2e-4);
    }
  });
}

TEST_CASE("fused LM head: gradients by central finite differences (scale, soft-cap, bias, temperatures)") {
  const index_t n = 5, H = 3, HT = 4, V = 9;
  problem<double> P = make_problem<double>(n, H, HT, V, 3, 21, true);
  // Rollout-time log-probs fixed near the current ones (so the trust decisions and the
  // advantages are constants of the loss, as the method detaches them).
  const std::vector<double> Z = logits_of(P.h, P.w, P.b, P.tf, n, H, V);
  P.s_old.resize(size_t(n));
  for (index_t r = 0; r < n; ++r) {
    long double m = -1e300L, s = 0;
    for (index_t j = 0; j < V; ++j) m = std::max(m, (long double)Z[size_t(r * V + j)] / P.Ts);
    for (index_t j = 0; j < V; ++j) s += std::exp((long double)Z[size_t(r * V + j)] / P.Ts - m);
    P.s_old[size_t(r)] = double((long double)Z[size_t(r * V + P.ids[size_t(r)])] / P.Ts - m - std::log(s)) + 0.05 * double(r % 3);
  }
  auto check_fd = [&](const char* name, auto obj) {
    CAPTURE(name);
    const result g = fused(obj, P, teacher_form::head, {.chunk = 2}, host::eigen_gemm{}, 0.0);
    REQUIRE_MESSAGE(g.st.ok(), g.st.message());
    auto loss_at = [&](problem<double>& Q) {
      double loss = 0;
      const host::fused_outputs<double> out{.loss = &loss};
      REQUIRE(host::fused_lm_head(obj, Q.student(), Q.teacher(), Q.inputs(teacher_form::head), out, {.chunk = 2}).ok());
      return loss;
    };
    auto fd = [&](std::vector<double>& x, const std::vector<double>& analytic) {
      double worst = 0, scale = 1e-12;
      for (double a : analytic) scale = std::max(scale, std::fabs(a));
      for (size_t i = 0; i < x.size(); ++i) {
        const double x0 = x[i], e = 1e-6 * std::max(1.0, std::fabs(x0));
        x[i] = x0 + e;
        const double lp = loss_at(P);
        x[i] = x0 - e;
        const double lm = loss_at(P);
        x[i] = x0;
        worst = std::max(worst, std::fabs((lp - lm) / (2 * e) - analytic[i]));
      }
      return worst / scale;
    };
    CHECK(fd(P.h, g.dh) < 1e-6);
    CHECK(fd(P.w, g.dw) < 1e-6);
    CHECK(fd(P.b, g.db) < 1e-6);
  };
  check_fd("tropd form P, tail bucket", presets::tropd({.beta = 0.3, .k = 3, .form = tropd::outliers::fkl_form::p,
                                                        .tail = tropd::estimators::topk_tail::tail_bucket}));
  check_fd("opd + guidance (clip outlier, all trusted)", presets::clip_outlier({.tau = -1e9, .guidance_beta = 0.2}));
  check_fd("gkd", presets::gkd({.beta = 0.3}));
  auto seq = presets::mask_outlier({.tau = -1.0, .guidance_beta = 0.1});
  seq.agg.how = tropd::aggregation::mode::seq_mean_token_mean;
  check_fd("mask outlier, sequence mean of token means", seq);
}

namespace {

/// Counts what the fused call asks its allocator for.
struct counting_allocator {
  size_t current = 0, peak = 0, calls = 0;
  static void* allocate(void* ctx, size_t bytes) {
    auto* c = static_cast<counting_allocator*>(ctx);
    c->current += bytes;
    c->peak = std::max(c->peak, c->current);
    ++c->calls;
    return ::operator new(bytes, std::align_val_t{64});
  }
  static void deallocate(void* ctx, void* p, size_t bytes) {
    static_cast<counting_allocator*>(ctx)->current -= bytes;
    ::operator delete(p, std::align_val_t{64});
  }
  host::scratch_allocator hook() { return {&allocate, &deallocate, this}; }
};

/// A GEMM of plain loops that counts its calls (the integrator's hook).
struct loop_gemm {
  int* calls = nullptr;
  template <class T>
  tropd::status operator()(tropd::gemm_op ta, tropd::gemm_op tb, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda,
                           const T* b, index_t ldb, T beta, T* c, index_t ldc) const {
    ++*calls;
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < n; ++j) {
        long double s = 0;
        for (index_t q = 0; q < k; ++q)
          s += (long double)(ta == tropd::gemm_op::n ? a[i * lda + q] : a[q * lda + i]) *
               (long double)(tb == tropd::gemm_op::n ? b[q * ldb + j] : b[j * ldb + q]);
        c[i * ldc + j] = T(alpha * T(s) + (beta == T(0) ? T(0) : beta * c[i * ldc + j]));
      }
    return {};
  }
};

}  // namespace

TEST_CASE("fused LM head: the scratch asked for is fused_scratch_bytes, set by the chunk, independent of n") {
  const index_t H = 8, HT = 6, V = 300;
  for (int threads : {1, 2})
    for (teacher_form f : {teacher_form::head, teacher_form::logits}) {
      CAPTURE(threads);
      CAPTURE(name_of(f));
      size_t peak_at_n[2] = {0, 0};
      int which = 0;
      for (index_t n : {index_t(40), index_t(160)}) {
        const problem<float> P = make_problem<float>(n, H, HT, V, 4, 9, false);
        counting_allocator counter;
        const result R = fused(presets::tropd({.k = 4}), P, f, {.eval = {.threads = threads}, .chunk = 8, .allocator = counter.hook()});
        REQUIRE_MESSAGE(R.st.ok(), R.st.message());
        host::fused_shape s{n, V, sizeof(float), f == teacher_form::head ? sizeof(float) : 0, threads};
        CHECK(counter.current == 0);
        CHECK(counter.peak == host::fused_scratch_bytes(s, 8));
        CHECK(counter.peak == R.info.scratch_bytes);
        // Chunk logits (+ teacher) + one gradient row per thread: never n x V.
        CHECK(counter.peak == 8 * V * 4 * (f == teacher_form::head ? 2 : 1) + size_t(threads) * ((V * 4 + 63) / 64 * 64));
        CHECK(counter.peak < size_t(n * V * sizeof(float)));
        peak_at_n[which++] = counter.peak;
      }
      CHECK(peak_at_n[0] == peak_at_n[1]);
    }
  // The chunk chosen from a budget: the largest whose scratch fits, a multiple of 8; the call
  // then asks for no more than the budget.
  const index_t n = 100;
  const problem<float> P = make_problem<float>(n, H, HT, V, 4, 9, false);
  const host::fused_shape s{n, V, sizeof(float), sizeof(float), 1};
  for (size_t budget : {size_t(30000), size_t(100000), size_t(250000), size_t(1) << 30}) {
    CAPTURE(budget);
    const index_t c = host::fused_choose_chunk(s, budget);
    CHECK(c >= 1);
    CHECK(c <= n);
    if (c < n) {
      CHECK(host::fused_scratch_bytes(s, c) <= budget);
      CHECK(host::fused_scratch_bytes(s, (c / 8 + 1) * 8) > budget);
      if (c >= 8) CHECK(c % 8 == 0);
    }
    counting_allocator counter;
    const result R = fused(presets::tropd({.k = 4}), P, teacher_form::head, {.scratch_budget = budget, .allocator = counter.hook()});
    REQUIRE_MESSAGE(R.st.ok(), R.st.message());
    CHECK(R.info.chunk == c);
    CHECK(counter.peak == host::fused_scratch_bytes(s, c));
    if (host::fused_scratch_bytes(s, 1) <= budget) CHECK(counter.peak <= budget);
  }
  // A budget below one row: chunk 1.
  CHECK(host::fused_choose_chunk(s, 10) == 1);
  // An allocator that fails: insufficient_scratch, nothing written.
  host::scratch_allocator none{[](void*, size_t) -> void* { return nullptr; }, [](void*, void*, size_t) {}, nullptr};
  const result R = fused(presets::tropd({.k = 4}), P, teacher_form::head, {.chunk = 8, .allocator = none});
  CHECK(R.st.code == tropd::errc::insufficient_scratch);
  CHECK(R.dh[0] == 777);
}

TEST_CASE("fused LM head: an integrator's GEMM; 3 student GEMMs per chunk in one sweep, 4 in two; a frozen weight skips dL/dW") {
  const index_t n = 10, H = 5, HT = 4, V = 23;
  const problem<double> P = make_problem<double>(n, H, HT, V, 4, 17, true);
  const auto obj = presets::tropd({.k = 4});
  const result want = unfused(obj, P, teacher_form::logits, {});
  for (tropd::sweep_policy sp : {tropd::sweep_policy::automatic, tropd::sweep_policy::two}) {
    int calls = 0;
    const result got = fused(obj, P, teacher_form::logits, {.chunk = 4, .sweeps = sp}, loop_gemm{&calls});
    check_equal(got, want, 1e-11);
    const int chunks = 3;
    CHECK(calls == got.info.gemm_calls);
    CHECK(calls == chunks * (sp == tropd::sweep_policy::two ? 4 : 3));
    // A teacher head adds one GEMM per chunk (one sweep; the second sweep only for a dense term).
    calls = 0;
    const result got_head = fused(obj, P, teacher_form::head, {.chunk = 4, .sweeps = sp}, loop_gemm{&calls});
    check_equal(got_head, unfused(obj, P, teacher_form::head, {}), 1e-11);
    CHECK(calls == chunks * (sp == tropd::sweep_policy::two ? 5 : 4));
  }
  // Eigen's GEMM with column blocks narrower than V (eigen_gemm::col_block) and two threads.
  check_equal(fused(obj, P, teacher_form::head, {.chunk = 4}, host::eigen_gemm{2, 5}), unfused(obj, P, teacher_form::head, {}), 1e-11);
  // Frozen weight: dL/dW and dL/db untouched, dL/dh and the loss the same, one GEMM fewer per chunk.
  int calls = 0;
  const result frozen = fused(obj, P, teacher_form::logits, {.chunk = 4}, loop_gemm{&calls}, 0.25, true);
  REQUIRE(frozen.st.ok());
  CHECK(calls == 3 * 2);
  CHECK(rel_diff(frozen.dh, want.dh) <= 1e-11);
  CHECK(close(frozen.loss, want.loss, 1e-12));
  for (double x : frozen.dw) CHECK(x == 0.0);  // still the prefill
  for (double x : frozen.db) CHECK(x == 0.0);
  // GKD (a dense term) re-reads the teacher head in the second sweep.
  calls = 0;
  const result gkd = fused(presets::gkd(), P, teacher_form::head, {.chunk = 4, .sweeps = tropd::sweep_policy::two}, loop_gemm{&calls});
  check_equal(gkd, unfused(presets::gkd(), P, teacher_form::head, {}), 1e-11);
  CHECK(calls == 3 * 6);
}

TEST_CASE("fused LM head: input_policy::mask (two sweeps) masks a row whose hidden states are NaN, as the unfused path does") {
  const index_t n = 9, H = 4, HT = 4, V = 19;
  problem<double> P = make_problem<double>(n, H, HT, V, 3, 23, false);
  P.h[size_t(7 * H + 2)] = std::numeric_limits<double>::quiet_NaN();  // row 7: a student token
  REQUIRE(P.from[7] == origin::student);
  const auto obj = presets::tropd({.k = 3});
  const host::eval_options mask{.bad_input = host::input_policy::mask};
  const result want = unfused(obj, P, teacher_form::logits, mask);
  REQUIRE_MESSAGE(want.st.ok(), want.st.message());
  CHECK(want.diag.n_masked_input == 1);
  // The unfused dL/dW has 0 * NaN from the masked row; the fused call leaves that row out:
  // its dL/dW is that of the batch with row 7 a prompt row (what masking makes it).
  std::vector<double> want_dw;
  {
    problem<double> Q = P;
    Q.h[size_t(7 * H + 2)] = 0;
    Q.from[7] = origin::prompt;
    const result q = unfused(obj, Q, teacher_form::logits, {});
    REQUIRE(q.st.ok());
    CHECK(close(q.loss, want.loss, 1e-12));
    want_dw = q.dw;
  }
  for (tropd::sweep_policy sp : {tropd::sweep_policy::automatic, tropd::sweep_policy::two}) {
    const result got = fused(obj, P, teacher_form::logits, {.eval = mask, .chunk = 4, .sweeps = sp});
    REQUIRE_MESSAGE(got.st.ok(), got.st.message());
    CHECK(got.info.sweeps == 2);
    check_equal(got, want, 1e-11, false);
    CHECK(rel_diff(got.dh, want.dh) <= 1e-11);
    CHECK(rel_diff(got.dw, want_dw) <= 1e-11);
  }
  CHECK(fused(obj, P, teacher_form::logits, {.eval = mask, .chunk = 4, .sweeps = tropd::sweep_policy::one}).st.code == tropd::errc::unsupported);
  // Rejected by default: the same error as the row level.
  const result rej = fused(obj, P, teacher_form::logits, {.chunk = 4});
  CHECK(rej.st.code == unfused(obj, P, teacher_form::logits, {}).st.code);
  CHECK(rej.st.code == tropd::errc::non_finite_input);
  CHECK(rej.st.row == 7);
}

TEST_CASE("fused LM head: bad input gives clear errors and writes nothing") {
  const index_t n = 6, H = 4, HT = 3, V = 11;
  const problem<float> P = make_problem<float>(n, H, HT, V, 3, 31, false);
  const auto obj = presets::tropd({.k = 3});
  std::vector<float> dh(size_t(n * H), 777.f), dw(size_t(V * H), 777.f);
  double loss = 777;
  const host::fused_outputs<float> out{.grad_hidden = tropd::make_matrix(dh.data(), n, H), .grad_weight = tropd::make_matrix(dw.data(), V, H), .loss = &loss};
  const host::row_inputs in = P.inputs(teacher_form::head);
  auto expect = [&](tropd::status st, tropd::errc code, const char* words) {
    CAPTURE(st.message());
    CHECK(st.code == code);
    CHECK(st.message().find(words) != std::string::npos);
    CHECK(loss == 777);
    CHECK(dh[0] == 777.f);
    CHECK(dw[0] == 777.f);
  };
  auto s = P.student();
  SUBCASE("hidden and weight disagree on H") {
    s.weight = tropd::make_matrix<const float>(P.w.data(), V - 1, H - 1);
    expect(host::fused_lm_head(obj, s, P.teacher(), in, out), tropd::errc::shape_mismatch, "different H");
  }
  SUBCASE("bias of the wrong size") {
    s.bias = {P.w.data(), V - 1};
    expect(host::fused_lm_head(obj, s, P.teacher(), in, out), tropd::errc::shape_mismatch, "bias");
  }
  SUBCASE("metadata for another number of rows") {
    host::row_inputs bad = in;
    bad.from.size = n - 1;
    expect(host::fused_lm_head(obj, s, P.teacher(), bad, out), tropd::errc::shape_mismatch, "origin");
    bad = in;
    bad.ids.size = n + 1;
    expect(host::fused_lm_head(obj, s, P.teacher(), bad, out), tropd::errc::shape_mismatch, "ids");
  }
  SUBCASE("a token id outside the weight's vocabulary") {
    s.weight = tropd::make_matrix<const float>(P.w.data(), 3, H);  // V = 3 < some ids
    auto t = P.teacher();
    t.weight = tropd::make_matrix<const float>(P.wt.data(), 3, HT);
    expect(host::fused_lm_head(obj, s, t, in, host::fused_outputs<float>{.grad_hidden = out.grad_hidden, .loss = &loss}), tropd::errc::id_out_of_range, "[0, V)");
  }
  SUBCASE("teacher head: other vocabulary, other rows, inconsistent H_T") {
    auto t = P.teacher();
    t.weight = tropd::make_matrix<const float>(P.wt.data(), V - 1, HT);
    expect(host::fused_lm_head(obj, s, t, in, out), tropd::errc::shape_mismatch, "vocabulary sizes differ");
    t = P.teacher();
    t.hidden = tropd::make_matrix<const float>(P.ht.data(), n - 1, HT);
    expect(host::fused_lm_head(obj, s, t, in, out), tropd::errc::shape_mismatch, "number of rows");
    t = P.teacher();
    t.hidden = tropd::make_matrix<const float>(P.ht.data(), n, HT - 1);
    expect(host::fused_lm_head(obj, s, t, in, out), tropd::errc::shape_mismatch, "teacher head");
  }
  SUBCASE("teacher logits of another vocabulary") {
    expect(host::fused_lm_head(obj, s, tropd::make_matrix<const float>(P.U.data(), n, V - 1), in, out), tropd::errc::shape_mismatch,
           "vocabulary sizes differ");
  }
  SUBCASE("outputs of the wrong shapes") {
    expect(host::fused_lm_head(obj, s, P.teacher(), in, host::fused_outputs<float>{.grad_hidden = tropd::make_matrix(dh.data(), n, H - 1), .loss = &loss}),
           tropd::errc::shape_mismatch, "grad_hidden");
    expect(host::fused_lm_head(obj, s, P.teacher(), in, host::fused_outputs<float>{.grad_weight = tropd::make_matrix(dw.data(), V - 1, H), .loss = &loss}),
           tropd::errc::shape_mismatch, "grad_weight");
    expect(host::fused_lm_head(obj, s, P.teacher(), in, host::fused_outputs<float>{.grad_bias = {dw.data(), V + 1}, .loss = &loss}),
           tropd::errc::shape_mismatch, "grad_bias");
  }
  SUBCASE("transform and options") {
    s.transform.softcap = -1;
    expect(host::fused_lm_head(obj, s, P.teacher(), in, out), tropd::errc::invalid_parameter, "softcap");
    s.transform = {0.0, 0.0};
    expect(host::fused_lm_head(obj, s, P.teacher(), in, out), tropd::errc::invalid_parameter, "scale");
    s = P.student();
    expect(host::fused_lm_head(obj, s, P.teacher(), in, out, {.chunk = -1}), tropd::errc::invalid_parameter, "chunk");
    expect(host::fused_lm_head(presets::entropy_opd(), s, P.teacher(), in, out, {.sweeps = tropd::sweep_policy::one}), tropd::errc::unsupported,
           "two sweeps");
  }
  SUBCASE("no rows") {
    s.hidden.rows = 0;
    expect(host::fused_lm_head(obj, s, P.teacher(), in, out), tropd::errc::empty_batch, "no rows");
  }
  SUBCASE("a teacher given as log-probs for an objective that reads its distribution") {
    expect(host::fused_lm_head(presets::vopd(), s, host::teacher_logprobs{P.t}, in, out), tropd::errc::unsupported, "teacher logits");
  }
}

TEST_CASE("fused LM head: two sweeps write nothing when a later chunk fails; one sweep reports the first failing row") {
  const index_t n = 12, H = 4, HT = 3, V = 13;
  problem<double> P = make_problem<double>(n, H, HT, V, 3, 41, false);
  // Row 11 (a student token): the teacher gives its token zero mass and the trusted OPD term is infinite.
  REQUIRE(P.from[11] == origin::student);
  std::vector<double> U = P.U;
  U[size_t(11 * V + P.ids[11])] = -std::numeric_limits<double>::infinity();
  const auto obj = presets::opd();
  std::vector<double> dh(size_t(n * H), 777), dw(size_t(V * H), 777);
  const host::fused_outputs<double> out{.grad_hidden = tropd::make_matrix(dh.data(), n, H), .grad_weight = tropd::make_matrix(dw.data(), V, H)};
  const tropd::status two = host::fused_lm_head(obj, P.student(), tropd::make_matrix<const double>(U.data(), n, V), P.inputs(teacher_form::logits), out,
                                                {.chunk = 4, .sweeps = tropd::sweep_policy::two});
  CHECK(two.code == tropd::errc::infinite_divergence);
  CHECK(two.row == 11);
  for (double x : dh) CHECK(x == 777);
  for (double x : dw) CHECK(x == 777);
  const tropd::status one = host::fused_lm_head(obj, P.student(), tropd::make_matrix<const double>(U.data(), n, V), P.inputs(teacher_form::logits), out,
                                                {.chunk = 4});
  CHECK(one.code == tropd::errc::infinite_divergence);
  CHECK(one.row == 11);
  CHECK(dh[0] != 777);  // chunks before the failing one were written (documented)
}
