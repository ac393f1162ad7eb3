// Concurrency (docs/robustness.md): tropd's host entry points keep no shared mutable state,
// so the same objective evaluated from several std::threads at once (each with its own
// outputs, sharing const inputs and the const objective) gives bit-identical results to
// sequential runs, also when evaluate_rows itself runs with row_options::threads = 2; and
// the row functions give bit-identical results for threads = 1, 2 and 3 (static row
// partition, per-row arithmetic independent of the thread count).
//
// scripts/test.sh's tsan stage runs exactly these cases (-tc='*concurrency*') in a small
// executable built with -fsanitize=thread (tropd-concurrency-tests).
#include <stdint.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

namespace host = tropd::host;
namespace est = tropd::estimators;
using tropd::index_t;
using tropd::origin;

namespace {

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}
bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

/// Shared, read-only inputs of a row-level batch (small: the TSan build is slow).
struct shared_batch {
  index_t n = 0, V = 0;
  std::vector<float> z, u, s_old;
  std::vector<int32_t> y;
  std::vector<origin> from;
  std::vector<index_t> off;
  std::vector<uint64_t> seq_ids;

  shared_batch(uint64_t seed, index_t n_, index_t V_) : n(n_), V(V_) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> N(0, 2);
    for (index_t i = 0; i < n * V; ++i) {
      z.push_back(N(rng));
      u.push_back(0.5f * z.back() + N(rng));
    }
    for (index_t i = 0; i < n; ++i) {
      y.push_back(int32_t((i * 13 + 5) % V));
      from.push_back(i % 6 == 0 ? origin::prompt : (i % 6 == 1 ? origin::teacher : origin::student));
      s_old.push_back(-2.0f - 0.05f * float(i % 9));
    }
    off = {0, n / 4, n / 2, n};
    seq_ids = {11, 12, 13};
  }
};

/// Everything one evaluation writes.
struct result_set {
  tropd::status st;
  double loss = 0;
  std::vector<float> grad, dlds, adv;
  std::vector<uint8_t> flags;
  tropd::diagnostics d;
};

template <class Obj>
result_set eval_rows(const Obj& o, const shared_batch& b, int inner_threads) {
  result_set r;
  r.grad.assign(size_t(b.n * b.V), 0.f);
  r.dlds.assign(size_t(b.n), 0.f);
  r.adv.assign(size_t(b.n), 0.f);
  r.flags.assign(size_t(b.n), 0);
  host::row_inputs rt;
  rt.ids = tropd::view_of(b.y);
  rt.from = tropd::view_of(b.from);
  rt.seq_offsets = tropd::view_of(b.off);
  rt.seq_ids = tropd::view_of(b.seq_ids);
  rt.s_old = tropd::view_of(b.s_old);
  host::eval_options eo;
  eo.seed = 99;
  eo.step = 4;
  tropd::token_outputs tout;
  tout.dloss_ds = tropd::view_of(r.dlds);
  tout.advantage = tropd::view_of(r.adv);
  tout.flags = tropd::view_of(r.flags);
  eo.threads = inner_threads;
  r.st = host::evaluate_rows(o, tropd::make_matrix<const float>(b.z.data(), b.n, b.V), tropd::make_matrix<const float>(b.u.data(), b.n, b.V),
                             rt,
                             host::row_outputs<>{.grad = tropd::make_matrix(r.grad.data(), b.n, b.V), .loss = &r.loss, .diag = &r.d,
                                                 .dloss_ds = tout.dloss_ds, .advantage = tout.advantage, .flags = tout.flags},
                             eo);
  return r;
}

void require_identical(const result_set& a, const result_set& b) {
  REQUIRE(a.st.ok());
  REQUIRE(b.st.ok());
  CHECK(same_bits(a.loss, b.loss));
  CHECK(same_bits(a.grad, b.grad));
  CHECK(same_bits(a.dlds, b.dlds));
  CHECK(same_bits(a.adv, b.adv));
  CHECK(a.flags == b.flags);
  CHECK(a.d.n_trusted == b.d.n_trusted);
  CHECK(a.d.n_outlier == b.d.n_outlier);
  CHECK(same_bits(a.d.normaliser, b.d.normaliser));
}

/// Runs `f(i)` on `k` threads at once (a simple start barrier so they overlap).
template <class F>
void on_threads(int k, F&& f) {
  std::vector<std::thread> pool;
  std::atomic<int> ready{0};
  for (int i = 0; i < k; ++i)
    pool.emplace_back([&, i] {
      ready.fetch_add(1);
      while (ready.load() < k) std::this_thread::yield();
      f(i);
    });
  for (auto& t : pool) t.join();
}

}  // namespace

TEST_CASE("concurrency: one objective evaluated from several threads at once equals sequential runs (evaluate_rows)") {
  const shared_batch b(1, 24, 150);
  const auto tro = tropd::presets::tropd({.beta = 1e-3, .k = 8});
  const auto gkd = tropd::presets::gkd({.beta = 0.5});
  const auto opd = tropd::presets::opd();
  for (int inner : {1, 2}) {
    CAPTURE(inner);
    const result_set want_t = eval_rows(tro, b, 1), want_g = eval_rows(gkd, b, 1), want_o = eval_rows(opd, b, 1);
    constexpr int k = 4;
    std::vector<result_set> got(k);
    on_threads(k, [&](int i) {
      if (i % 3 == 0) got[size_t(i)] = eval_rows(tro, b, inner);
      else if (i % 3 == 1) got[size_t(i)] = eval_rows(gkd, b, inner);
      else got[size_t(i)] = eval_rows(opd, b, inner);
    });
    for (int i = 0; i < k; ++i) {
      CAPTURE(i);
      require_identical(got[size_t(i)], i % 3 == 0 ? want_t : (i % 3 == 1 ? want_g : want_o));
    }
  }
}

TEST_CASE("concurrency: evaluate_tokens from several threads at once equals sequential runs") {
  // The token view of the shared batch (log-probs from the rows of a sequential run).
  const shared_batch b(2, 30, 40);
  const result_set rows = eval_rows(tropd::presets::opd(), b, 1);
  REQUIRE(rows.st.ok());
  std::vector<float> s(size_t(b.n)), t(size_t(b.n));
  for (index_t i = 0; i < b.n; ++i) {
    s[size_t(i)] = -0.1f - 0.13f * float(i % 17);
    t[size_t(i)] = -0.2f - 0.11f * float(i % 13);
  }
  const index_t K = 3;
  std::vector<int32_t> ids;
  std::vector<float> lq, ls;
  for (index_t i = 0; i < b.n; ++i)
    for (index_t k = 0; k < K; ++k) {
      ids.push_back(int32_t(k * 7 + i % 5));
      lq.push_back(-0.5f - 0.7f * float(k));
      ls.push_back(-1.0f - 0.3f * float((i + k) % 4));
    }
  tropd::token_batch tb;
  tb.s = tropd::view_of(s);
  tb.s_old = tropd::view_of(b.s_old);
  tb.t = tropd::view_of(t);
  tb.from = tropd::view_of(b.from);
  tb.seq_offsets = tropd::view_of(b.off);
  tb.seq_ids = tropd::view_of(b.seq_ids);
  tb.topk_ids = tropd::make_matrix<const int32_t>(ids.data(), b.n, K);
  tb.topk_teacher = tropd::make_matrix<const float>(lq.data(), b.n, K);
  tb.topk_student = tropd::make_matrix<const float>(ls.data(), b.n, K);
  const auto obj = tropd::presets::tropd({.beta = 1e-3, .k = 3, .form = tropd::outliers::fkl_form::p});
  auto eval = [&] {
    result_set r;
    r.dlds.assign(size_t(b.n), 0.f);
    r.adv.assign(size_t(b.n), 0.f);
    r.flags.assign(size_t(b.n), 0);
    r.grad.assign(size_t(b.n * K), 0.f);  // dL/dlog p at the top-k
    tropd::token_outputs out;
    out.dloss_ds = tropd::view_of(r.dlds);
    out.advantage = tropd::view_of(r.adv);
    out.flags = tropd::view_of(r.flags);
    out.dloss_dtopk = tropd::make_matrix(r.grad.data(), b.n, K);
    host::eval_options eo;
    eo.seed = 5;
    out.loss = &r.loss;
    out.diag = &r.d;
    r.st = host::evaluate_tokens(obj, tb, out, eo);
    return r;
  };
  const result_set want = eval();
  constexpr int k = 4;
  std::vector<result_set> got(k);
  on_threads(k, [&](int i) { got[size_t(i)] = eval(); });
  for (const auto& g : got) require_identical(g, want);
}

TEST_CASE("concurrency: row functions give identical results for threads = 1, 2, 3 (and when called concurrently)") {
  const index_t N = 7, V = 1500;  // V > one 1024-element chunk
  std::mt19937_64 rng(3);
  std::normal_distribution<float> nd(0, 2);
  std::vector<float> z(size_t(N * V)), u(z.size());
  for (auto& x : z) x = nd(rng);
  for (auto& x : u) x = nd(rng);
  u[5] = -std::numeric_limits<float>::infinity();
  const std::vector<int32_t> ids = {0, 10, 200, 1499, 3, 700, 1024};
  const auto zv = tropd::make_matrix<const float>(z.data(), N, V), uv = tropd::make_matrix<const float>(u.data(), N, V);
  struct out {
    tropd::status st;
    std::vector<double> loss;
    std::vector<float> grad;
  };
  auto call = [&](int which, int threads, bool fused) {
    out o;
    o.loss.assign(size_t(N), 0);
    o.grad.assign(size_t(N * V), 0);
    host::row_options opt;
    opt.threads = threads;
    opt.order = fused ? tropd::host::row_order::single_read : tropd::host::row_order::validate_first;
    opt.student_temperature = 0.9;
    const auto lv = tropd::view_of(o.loss);
    const auto gv = tropd::make_matrix(o.grad.data(), N, V);
    switch (which) {
      case 0: o.st = host::divergence_rows(est::forward_kl{}, zv, uv, lv, gv, opt); break;
      case 1: o.st = host::divergence_rows(est::jsd{0.3}, zv, uv, lv, gv, opt); break;
      case 2: o.st = host::divergence_rows(est::total_variation{}, zv, uv, lv, gv, opt); break;
      case 3: o.st = host::sampled_rows(est::sampled<est::k3, est::as_loss>{}, zv, uv, tropd::view_of(ids), {}, lv, gv, opt); break;
      default: o.st = host::topk_forward_kl_rows(est::topk_forward_kl{16, est::topk_tail::tail_bucket}, zv, uv, lv, gv, opt); break;
    }
    return o;
  };
  for (int which = 0; which < 5; ++which) {
    CAPTURE(which);
    for (bool fused : {false, true}) {
      CAPTURE(fused);
      const out ref = call(which, 1, fused);
      REQUIRE_MESSAGE(ref.st.ok(), ref.st.message());
      for (int threads : {2, 3}) {
        CAPTURE(threads);
        const out o = call(which, threads, fused);
        REQUIRE(o.st.ok());
        CHECK(same_bits(o.loss, ref.loss));
        CHECK(same_bits(o.grad, ref.grad));
      }
      // Two callers at once, each with threads = 2.
      std::vector<out> got(2);
      on_threads(2, [&](int i) { got[size_t(i)] = call(which, 2, fused); });
      for (const auto& o : got) {
        CHECK(same_bits(o.loss, ref.loss));
        CHECK(same_bits(o.grad, ref.grad));
      }
    }
  }
}
