// benchmarks/bench_cpu.cpp: tropd's CPU backend against its two floors and a naive baseline.
//
// At startup the binary measures, in this process,
//   - the streaming read bandwidth (sum of a 1 GiB float buffer, best of 3) with 1 and 2 threads,
//   - Eigen's vectorised exp throughput (ArrayXf::exp over an L1/L2-resident buffer, best of 5),
// then times every estimator and objective (tropd, and for row kernels also tropd with
// row_order::single_read and a naive multi-pass implementation, naive_rows.hpp) and reports
//   bytes/s     bytes counted as: both input rows read once + the fp32 gradient written once
//               (top-k lists: the student row + the lists + the gradient; token level: the
//               token arrays read + the outputs written)
//   bw_frac     achieved bytes/s / measured read bandwidth (same thread count)
//   exps        exp/log evaluations per vocabulary element in tropd's implementation
//   floor_frac  max(bytes / bandwidth, exps / exp rate) / measured time: how close to the
//               binding floor the kernel runs; exp_bound = 1 when the exp floor binds
// and prints a summary table (kernel, shape, tropd ms, naive ms, speedup, bw_frac, floor).
//
// Benchmark names: <kernel>/<impl>/<dtype>/V:<V>/N:<N>/t:<threads>, impl in {tropd, single_read,
// naive}. The full grid (V in {32000, 128256, 151936, 262144}, N in {256, 2048, 8192}, fp32
// and bf16, 1 and 2 threads) is registered; without --benchmark_filter a representative
// subset runs (a few minutes). Any cell is reachable with a filter, e.g.
//   tropd-bench-cpu --benchmark_filter='^rkl/.*/fp32/V:262144/N:2048/t:1$'
//   tropd-bench-cpu --benchmark_filter=.          (everything that fits in memory)
// Cells whose buffers would not fit in memory are skipped with a message. Every cell makes
// one untimed call first; the summary keeps each cell's fastest per-call average (add
// --benchmark_repetitions=3 on a noisy machine).
#include <benchmark/benchmark.h>

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <tropd/tropd.hpp>

#include "bench_support.hpp"
#include "naive_rows.hpp"

namespace {

using namespace tropd_bench;
using tropd::bf16;
using tropd::index_t;
namespace est = tropd::estimators;
namespace host = tropd::host;

// ---------------------------------------------------------------------------
// Floors measured at startup.
// ---------------------------------------------------------------------------
struct machine_floors {
  double read_bw[3] = {0, 0, 0};  // bytes/s with 1 and 2 threads (index = threads)
  double exp_rate = 0;            // exp/s, one thread
} g_floor;

// ---------------------------------------------------------------------------
// Kernels.
// ---------------------------------------------------------------------------
enum class kernel { rkl, fkl, jsd, tv, topk_logits, topk_lists, k1, k2, k3, rows_opd, rows_tropd, rows_gkd, tok_opd, tok_tropd };

struct kernel_info {
  kernel k;
  const char* name;
  bool rows;          // row level ([N x V] logits) or token level
  bool has_single_read;  // accepts row_options::order = single_read
  bool has_naive;
  double exps;        // exp/log per vocabulary element, default order
  double exps_single_read;  // ... with row_order::single_read
  bool two_rows;      // reads teacher logits rows
};

// exp/log counts: pass 1 takes one exp per element of each row (both log-sum-exps); JSD and
// TV's second pass reuses pass 1's exponentials (kept for the row) and JSD takes one log for
// log m there; the gradient pass takes one exp per row whose probabilities it needs (p, and q
// for forward KL / JSD / TV) and JSD one more log, unless row_order::single_read kept the
// pass-1 exponentials (and JSD's log m).
const kernel_info g_kernels[] = {
    {kernel::rkl, "rkl", true, true, true, 3, 2, true},
    {kernel::fkl, "fkl", true, true, true, 4, 2, true},
    {kernel::jsd, "jsd", true, true, true, 6, 3, true},
    {kernel::tv, "tv", true, true, true, 4, 2, true},
    {kernel::topk_logits, "topk_fkl_logits", true, true, true, 3, 2, true},
    {kernel::topk_lists, "topk_fkl_lists", true, true, true, 2, 1, false},
    {kernel::k1, "k1", true, true, true, 3, 2, true},
    {kernel::k2, "k2", true, true, true, 3, 2, true},
    {kernel::k3, "k3", true, true, true, 3, 2, true},
    {kernel::rows_opd, "rows_opd", true, false, true, 3, 3, true},
    {kernel::rows_tropd, "rows_tropd", true, false, true, 3, 3, true},
    {kernel::rows_gkd, "rows_gkd", true, false, true, 6, 6, true},
    {kernel::tok_opd, "tokens_opd", false, false, false, 0, 0, false},
    {kernel::tok_tropd, "tokens_tropd", false, false, false, 0, 0, false},
};

enum class impl { tropd, single_read, naive };
const char* impl_name(impl i) { return i == impl::tropd ? "tropd" : i == impl::single_read ? "single_read" : "naive"; }

constexpr int K_TOPK = 64;  // TrOPD's k; also the list length of topk_fkl_lists
constexpr index_t SEQ_LEN = 256;

// ---------------------------------------------------------------------------
// Inputs: one cached dataset (the most recent shape), generated on first use.
// ---------------------------------------------------------------------------
struct dataset {
  index_t N = 0, V = 0;
  bool bf = false;
  buffer<float> zs, zt;    // fp32 logits
  buffer<bf16> hs, ht;     // bf16 logits (bf16 cells)
  buffer<float> grad;      // [N x V] output
  std::vector<double> loss;
  std::vector<int32_t> ids;
  std::vector<tropd::origin> from;
  std::vector<index_t> offsets;
  std::vector<int32_t> list_ids;
  std::vector<float> list_lp;
};

std::unique_ptr<dataset> g_data;
std::unique_ptr<naive::workspace> g_ws;

void fill_tokens(dataset& d) {
  const index_t N = d.N;
  d.ids.resize(size_t(N));
  d.from.assign(size_t(N), tropd::origin::student);
  for (index_t r = 0; r < N; ++r) d.ids[size_t(r)] = int32_t((r * 7919 + 13) % std::max<index_t>(d.V, 1));
  d.offsets.clear();
  for (index_t o = 0; o < N; o += SEQ_LEN) d.offsets.push_back(o);
  d.offsets.push_back(N);
  d.loss.assign(size_t(N), 0.0);
}

dataset& get_rows(index_t N, index_t V, bool bf) {
  if (g_data && g_data->N == N && g_data->V == V && g_data->bf == bf && g_data->zs.size()) return *g_data;
  g_data.reset();
  g_ws.reset();
  auto d = std::make_unique<dataset>();
  d->N = N;
  d->V = V;
  d->bf = bf;
  const size_t nv = size_t(N * V);
  d->zs = buffer<float>(nv);
  d->zt = buffer<float>(nv);
  fill_logits(d->zs.data(), d->zt.data(), N, V, 42, 2);
  if (bf) {
    d->hs = buffer<bf16>(nv);
    d->ht = buffer<bf16>(nv);
    par_rows(N, 2, [&](index_t b, index_t e) {
      for (size_t i = size_t(b * V); i < size_t(e * V); ++i) {
        d->hs[i] = bf16::from_float(d->zs[i]);
        d->ht[i] = bf16::from_float(d->zt[i]);
      }
    });
    // Keep the fp32 copies equal to the bf16 values (naive upcasts them itself anyway).
    par_rows(N, 2, [&](index_t b, index_t e) {
      for (size_t i = size_t(b * V); i < size_t(e * V); ++i) {
        d->zs[i] = d->hs[i].to_float();
        d->zt[i] = d->ht[i].to_float();
      }
    });
  }
  d->grad = buffer<float>(nv);
  par_rows(N, 2, [&](index_t b, index_t e) { std::memset(d->grad.data() + b * V, 0, size_t((e - b) * V) * 4); });
  fill_tokens(*d);
  // Teacher top-k lists: K distinct ids per row with decreasing log-probs.
  d->list_ids.resize(size_t(N * K_TOPK));
  d->list_lp.resize(size_t(N * K_TOPK));
  for (index_t r = 0; r < N; ++r)
    for (int k = 0; k < K_TOPK; ++k) {
      d->list_ids[size_t(r * K_TOPK + k)] = int32_t((r * 131 + k * (V / K_TOPK)) % V);
      d->list_lp[size_t(r * K_TOPK + k)] = -1.5f - 0.08f * float(k);
    }
  g_data = std::move(d);
  return *g_data;
}

// Token-level inputs: s, t, origin, CSR offsets and (TrOPD) top-k lists with the student's
// log-probs at the teacher's ids.
struct token_data {
  index_t N = 0;
  std::vector<float> s, t, tq, ts, dds, dtopk;
  std::vector<int32_t> tid;
  std::vector<tropd::origin> from;
  std::vector<index_t> offsets;
};
std::map<index_t, token_data> g_tokens;

token_data& get_tokens(index_t N) {
  auto& d = g_tokens[N];
  if (d.N == N) return d;
  d.N = N;
  fast_normal g(7);
  d.s.resize(size_t(N));
  d.t.resize(size_t(N));
  for (index_t i = 0; i < N; ++i) {
    d.s[size_t(i)] = -std::fabs(1.5f * g());
    d.t[size_t(i)] = std::min(0.f, d.s[size_t(i)] + 1.0f * g());
  }
  d.from.assign(size_t(N), tropd::origin::student);
  for (index_t i = 0; i < N; i += SEQ_LEN) d.offsets.push_back(i);
  d.offsets.push_back(N);
  d.tid.resize(size_t(N * K_TOPK));
  d.tq.resize(size_t(N * K_TOPK));
  d.ts.resize(size_t(N * K_TOPK));
  for (index_t i = 0; i < N * K_TOPK; ++i) {
    d.tid[size_t(i)] = int32_t(i % K_TOPK) * 1000 + int32_t(i / K_TOPK) % 7;
    d.tq[size_t(i)] = -1.0f - 0.1f * float(i % K_TOPK);
    d.ts[size_t(i)] = d.tq[size_t(i)] + 0.5f * g();
  }
  d.dds.resize(size_t(N));
  d.dtopk.resize(size_t(N * K_TOPK));
  return d;
}

// ---------------------------------------------------------------------------
// One call of a kernel.
// ---------------------------------------------------------------------------
template <class TS>
tropd::status run_tropd_rows(kernel k, dataset& d, const TS* zs, const TS* zt, int threads, bool fused) {
  const index_t N = d.N, V = d.V;
  const auto S = tropd::make_matrix<const TS>(zs, N, V);
  const auto T = tropd::make_matrix<const TS>(zt, N, V);
  const auto G = tropd::make_matrix<float>(d.grad.data(), N, V);
  const auto L = tropd::view_of(d.loss);
  host::row_options o;
  o.threads = threads;
  o.order = fused ? host::row_order::single_read : host::row_order::validate_first;
  const tropd::vector_view<const int32_t> Y{d.ids.data(), N};
  host::row_inputs tok;
  tok.ids = Y;
  tok.from = {d.from.data(), N};
  tok.seq_offsets = {d.offsets.data(), index_t(d.offsets.size())};
  const host::eval_options eo{.seed = 1, .threads = threads};
  double loss = 0;
  const host::row_outputs<> out{.grad = G, .loss = &loss};
  switch (k) {
    case kernel::rkl: return host::divergence_rows(est::reverse_kl{}, S, T, L, G, o);
    case kernel::fkl: return host::divergence_rows(est::forward_kl{}, S, T, L, G, o);
    case kernel::jsd: return host::divergence_rows(est::jsd{0.5}, S, T, L, G, o);
    case kernel::tv: return host::divergence_rows(est::total_variation{}, S, T, L, G, o);
    case kernel::topk_logits: return host::topk_forward_kl_rows(est::topk_forward_kl{K_TOPK}, S, T, L, G, o);
    case kernel::topk_lists: {
      host::topk_lists lists{tropd::make_matrix<const int32_t>(d.list_ids.data(), N, K_TOPK),
                             tropd::make_matrix<const float>(d.list_lp.data(), N, K_TOPK)};
      return host::topk_forward_kl_rows(est::topk_forward_kl{K_TOPK}, S, lists, L, G, o);
    }
    case kernel::k1: return host::sampled_rows(est::sampled<est::k1, est::as_pg_reward>{}, S, T, Y, {}, L, G, o);
    case kernel::k2: return host::sampled_rows(est::sampled<est::k2, est::as_loss>{}, S, T, Y, {}, L, G, o);
    case kernel::k3: return host::sampled_rows(est::sampled<est::k3, est::as_loss>{}, S, T, Y, {}, L, G, o);
    case kernel::rows_opd: return host::evaluate_rows(tropd::presets::opd(), S, T, tok, out, eo);
    case kernel::rows_tropd: return host::evaluate_rows(tropd::presets::tropd(), S, T, tok, out, eo);
    case kernel::rows_gkd: return host::evaluate_rows(tropd::presets::gkd({.beta = 0.5}), S, T, tok, out, eo);
    default: return tropd::make_error(tropd::errc::unsupported, "not a row kernel");
  }
}

void run_naive_rows(kernel k, dataset& d, int threads) {
  const index_t N = d.N, V = d.V;
  if (!g_ws) g_ws = std::make_unique<naive::workspace>();
  naive::ctx c{N, V, threads, *g_ws};
  const float* S = d.zs.data();
  const float* T = d.zt.data();
  if (d.bf) {  // a framework upcasts bf16 logits to fp32 first
    float* s32 = g_ws->arr(10, size_t(N * V));
    float* t32 = g_ws->arr(11, size_t(N * V));
    naive::upcast(c, d.hs.data(), s32);
    naive::upcast(c, d.ht.data(), t32);
    S = s32;
    T = t32;
  }
  float* G = d.grad.data();
  double* L = d.loss.data();
  host::row_inputs tok;
  tok.ids = {d.ids.data(), N};
  tok.from = {d.from.data(), N};
  tok.seq_offsets = {d.offsets.data(), index_t(d.offsets.size())};
  host::eval_options eo;
  eo.seed = 1;
  switch (k) {
    case kernel::rkl: naive::divergence(c, naive::div_kind::rkl, 0, S, T, L, G); break;
    case kernel::fkl: naive::divergence(c, naive::div_kind::fkl, 0, S, T, L, G); break;
    case kernel::jsd: naive::divergence(c, naive::div_kind::jsd, 0.5, S, T, L, G); break;
    case kernel::tv: naive::divergence(c, naive::div_kind::tv, 0, S, T, L, G); break;
    case kernel::topk_logits: naive::topk_fkl_logits(c, est::topk_forward_kl{K_TOPK}, S, T, L, G); break;
    case kernel::topk_lists:
      naive::topk_fkl_lists(c, est::topk_forward_kl{K_TOPK}, S, d.list_ids.data(), d.list_lp.data(), K_TOPK, L, G);
      break;
    case kernel::k1: naive::sampled(c, est::sampled<est::k1, est::as_pg_reward>{}, S, T, d.ids.data(), L, G); break;
    case kernel::k2: naive::sampled(c, est::sampled<est::k2, est::as_loss>{}, S, T, d.ids.data(), L, G); break;
    case kernel::k3: naive::sampled(c, est::sampled<est::k3, est::as_loss>{}, S, T, d.ids.data(), L, G); break;
    case kernel::rows_opd: L[0] = naive::objective_rows(c, tropd::presets::opd(), S, T, tok, eo, G); break;
    case kernel::rows_tropd: L[0] = naive::objective_rows(c, tropd::presets::tropd(), S, T, tok, eo, G); break;
    case kernel::rows_gkd: L[0] = naive::objective_rows(c, tropd::presets::gkd({.beta = 0.5}), S, T, tok, eo, G); break;
    default: break;
  }
}

tropd::status run_tokens(kernel k, token_data& d) {
  const index_t N = d.N;
  tropd::token_batch b;
  b.s = {d.s.data(), N};
  b.t = {d.t.data(), N};
  b.from = {d.from.data(), N};
  b.seq_offsets = {d.offsets.data(), index_t(d.offsets.size())};
  tropd::token_outputs out;
  out.dloss_ds = {d.dds.data(), N};
  host::eval_options eo;
  eo.seed = 1;
  double loss = 0;
  out.loss = &loss;
  if (k == kernel::tok_opd) return host::evaluate_tokens(tropd::presets::opd(), b, out, eo);
  b.topk_ids = tropd::make_matrix<const int32_t>(d.tid.data(), N, K_TOPK);
  b.topk_teacher = tropd::make_matrix<const float>(d.tq.data(), N, K_TOPK);
  b.topk_student = tropd::make_matrix<const float>(d.ts.data(), N, K_TOPK);
  out.dloss_dtopk = tropd::make_matrix<float>(d.dtopk.data(), N, K_TOPK);
  out.loss = &loss;
  return host::evaluate_tokens(tropd::presets::tropd(), b, out, eo);
}

// ---------------------------------------------------------------------------
// Results for the summary table.
// ---------------------------------------------------------------------------
struct cell {
  kernel_info ki;
  impl im;
  bool bf;
  index_t V, N;
  int threads;
  std::string name;
};
struct result {
  double ms = 0, bw_frac = 0, floor_frac = 0;
  bool exp_bound = false;
  std::string skipped;
};
std::map<std::string, result> g_results;

double counted_bytes(const cell& c) {
  const double nv = double(c.N) * double(c.V);
  const double in = c.bf ? 2.0 : 4.0;
  if (!c.ki.rows) {
    const double n = double(c.N);
    return c.ki.k == kernel::tok_opd ? n * (4 + 4 + 1) + n * 4 : n * (4 + 4 + 1) + n * K_TOPK * 12.0 + n * 4 + n * K_TOPK * 4.0;
  }
  if (c.ki.k == kernel::topk_lists) return nv * (in + 4) + double(c.N) * K_TOPK * 8;
  return nv * (2 * in + 4);
}

double footprint_bytes(const cell& c) {
  if (!c.ki.rows) return 0;
  const double nv = double(c.N) * double(c.V);
  double b = nv * (4 + 4 + 4);          // fp32 logits (also the naive inputs) + gradient
  if (c.bf) b += nv * 4;                // bf16 copies
  if (c.im == impl::naive) b += nv * 4 * (5 + (c.bf ? 2 : 0));  // materialised intermediates
  return b;
}

void bench_cell(benchmark::State& state, const cell& c) {
  const int th = c.threads;
  if (footprint_bytes(c) > 0.6 * physical_memory_bytes()) {
    state.SkipWithError("skipped: buffers would not fit in this machine's memory");
    g_results[c.name].skipped = "memory";
    for (auto _ : state) {
    }
    return;
  }
  tropd::status st;
  double t_total = 0;
  if (c.ki.rows) {
    dataset& d = get_rows(c.N, c.V, c.bf);
    // One untimed call first: page-faults the naive workspace (a framework's caching
    // allocator) and warms the caches the same way for every implementation.
    if (c.im == impl::naive)
      run_naive_rows(c.ki.k, d, th);
    else
      st = c.bf ? run_tropd_rows(c.ki.k, d, d.hs.data(), d.ht.data(), th, c.im == impl::single_read)
                : run_tropd_rows(c.ki.k, d, d.zs.data(), d.zt.data(), th, c.im == impl::single_read);
    for (auto _ : state) {
      const double t0 = now_s();
      if (c.im == impl::naive)
        run_naive_rows(c.ki.k, d, th);
      else if (c.bf)
        st = run_tropd_rows(c.ki.k, d, d.hs.data(), d.ht.data(), th, c.im == impl::single_read);
      else
        st = run_tropd_rows(c.ki.k, d, d.zs.data(), d.zt.data(), th, c.im == impl::single_read);
      t_total += now_s() - t0;
      benchmark::ClobberMemory();
    }
  } else {
    token_data& d = get_tokens(c.N);
    for (auto _ : state) {
      const double t0 = now_s();
      st = run_tokens(c.ki.k, d);
      t_total += now_s() - t0;
      benchmark::ClobberMemory();
    }
  }
  if (!st.ok()) {
    state.SkipWithError(st.message().c_str());
    return;
  }
  const double bytes = counted_bytes(c);
  const double bw = g_floor.read_bw[std::min(th, 2)];
  const double exps = (c.im == impl::single_read ? c.ki.exps_single_read : c.ki.exps) * double(c.N) * double(c.V);
  const double t_bw = bytes / bw, t_exp = exps / (g_floor.exp_rate * th);
  state.SetBytesProcessed(int64_t(bytes * double(state.iterations())));
  using C = benchmark::Counter;
  state.counters["bw_frac"] = C(bytes / bw, C::kIsIterationInvariantRate);
  state.counters["floor_frac"] = C(std::max(t_bw, t_exp), C::kIsIterationInvariantRate);
  state.counters["exps"] = c.im == impl::naive ? 0 : (c.im == impl::single_read ? c.ki.exps_single_read : c.ki.exps);
  state.counters["exp_bound"] = t_exp > t_bw ? 1 : 0;
  // Google Benchmark calls this function more than once (growing iteration counts, and
  // --benchmark_repetitions): the summary keeps the fastest per-call average.
  result& r = g_results[c.name];
  const double ms = 1e3 * t_total / double(state.iterations());
  if (r.ms > 0 && r.ms <= ms) return;
  r.ms = ms;
  r.bw_frac = t_bw * 1e3 / r.ms;
  r.floor_frac = std::max(t_bw, t_exp) * 1e3 / r.ms;
  r.exp_bound = t_exp > t_bw;
}

std::string cell_name(const kernel_info& ki, impl im, bool bf, index_t V, index_t N, int th) {
  char buf[200];
  if (ki.rows)
    std::snprintf(buf, sizeof buf, "%s/%s/%s/V:%lld/N:%lld/t:%d", ki.name, impl_name(im), bf ? "bf16" : "fp32",
                  (long long)V, (long long)N, th);
  else
    std::snprintf(buf, sizeof buf, "%s/%s/fp32/N:%lld/t:1", ki.name, impl_name(im), (long long)N);
  return buf;
}

std::vector<cell> g_cells;

/// The default run: every kernel at Qwen's vocabulary (V = 151936, N = 256, fp32, one
/// thread) against naive; the objectives and reverse KL also in bf16, on two threads, and at
/// V = 32000 / 262144; token level at N = 2048 and 8192.
bool is_default(const cell& c) {
  const kernel k = c.ki.k;
  if (!c.ki.rows) return c.N >= 2048;
  const bool headline = k == kernel::rkl || k == kernel::rows_tropd;
  if (c.V == 151936 && c.N == 256) {
    if (!c.bf && c.threads == 1) return true;
    if (headline || k == kernel::rows_opd) return c.im != impl::naive || c.threads == 1;
    return false;
  }
  if (headline && !c.bf && c.threads == 1 && c.N == 256 && (c.V == 32000 || c.V == 262144)) return true;
  return false;
}

void register_all() {
  const index_t Vs[] = {32000, 128256, 151936, 262144};
  const index_t Ns[] = {256, 2048, 8192};
  for (const auto& ki : g_kernels) {
    if (!ki.rows) {
      for (index_t N : Ns) g_cells.push_back({ki, impl::tropd, false, 0, N, 1, cell_name(ki, impl::tropd, false, 0, N, 1)});
      continue;
    }
    for (index_t V : Vs)
      for (index_t N : Ns)
        for (bool bf : {false, true})
          for (int th : {1, 2})
            for (impl im : {impl::tropd, impl::single_read, impl::naive}) {
              if (im == impl::single_read && !ki.has_single_read) continue;
              if (im == impl::naive && !ki.has_naive) continue;
              g_cells.push_back({ki, im, bf, V, N, th, cell_name(ki, im, bf, V, N, th)});
            }
  }
  // Group by shape so the cached inputs are reused.
  std::stable_sort(g_cells.begin(), g_cells.end(), [](const cell& a, const cell& b) {
    if (a.ki.rows != b.ki.rows) return a.ki.rows > b.ki.rows;
    if (a.V != b.V) return a.V < b.V;
    if (a.N != b.N) return a.N < b.N;
    return a.bf < b.bf;
  });
  for (const cell& c : g_cells) {
    auto* b = benchmark::RegisterBenchmark(c.name.c_str(), [c](benchmark::State& s) { bench_cell(s, c); });
    b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(c.ki.rows ? 0.4 : 0.2);
  }
}

std::string default_filter() {
  std::string f = "^(";
  bool first = true;
  for (const cell& c : g_cells) {
    if (!is_default(c)) continue;
    if (!first) f += "|";
    f += c.name;
    first = false;
  }
  return f + ")(/|$)";  // Google Benchmark appends /min_time:.../real_time
}

/// A small consistency check of tropd against the naive implementation (same inputs).
void self_check() {
  const index_t N = 8, V = 3000;
  double worst_loss = 0, worst_grad = 0;
  const char* worst = "";
  for (const auto& ki : g_kernels) {
    if (!ki.rows) continue;
    dataset& d = get_rows(N, V, false);
    throw_if_error(run_tropd_rows(ki.k, d, d.zs.data(), d.zt.data(), 1, false));
    const bool objective = ki.k == kernel::rows_opd || ki.k == kernel::rows_tropd || ki.k == kernel::rows_gkd;
    double tl = 0;
    if (objective) {  // evaluate_rows returns one loss: recompute it for the comparison
      host::row_inputs tok;
      tok.ids = {d.ids.data(), N};
      tok.from = {d.from.data(), N};
      tok.seq_offsets = {d.offsets.data(), index_t(d.offsets.size())};
      host::eval_options eo;
      eo.seed = 1;
      const auto S = tropd::make_matrix<const float>(d.zs.data(), N, V), T = tropd::make_matrix<const float>(d.zt.data(), N, V);
      const auto G = tropd::make_matrix<float>(d.grad.data(), N, V);
      if (ki.k == kernel::rows_opd) tropd::throw_if_error(host::evaluate_rows(tropd::presets::opd(), S, T, tok, host::row_outputs<>{.grad = G, .loss = &tl}, eo));
      if (ki.k == kernel::rows_tropd) tropd::throw_if_error(host::evaluate_rows(tropd::presets::tropd(), S, T, tok, host::row_outputs<>{.grad = G, .loss = &tl}, eo));
      if (ki.k == kernel::rows_gkd) tropd::throw_if_error(host::evaluate_rows(tropd::presets::gkd({.beta = 0.5}), S, T, tok, host::row_outputs<>{.grad = G, .loss = &tl}, eo));
    }
    std::vector<double> l1 = d.loss;
    std::vector<float> g1(d.grad.data(), d.grad.data() + N * V);
    run_naive_rows(ki.k, d, 1);
    double el = 0, eg = 0, gmax = 0;
    if (objective)
      el = std::fabs(tl - d.loss[0]) / std::max(1.0, std::fabs(tl));
    else
      for (index_t r = 0; r < N; ++r) el = std::max(el, std::fabs(l1[size_t(r)] - d.loss[size_t(r)]) / std::max(1.0, std::fabs(l1[size_t(r)])));
    for (index_t i = 0; i < N * V; ++i) {
      eg = std::max(eg, double(std::fabs(g1[size_t(i)] - d.grad[size_t(i)])));
      gmax = std::max(gmax, double(std::fabs(g1[size_t(i)])));
    }
    eg /= std::max(gmax, 1e-30);
    if (el + eg > worst_loss + worst_grad) {
      worst_loss = el;
      worst_grad = eg;
      worst = ki.name;
    }
    if (el > 1e-4 || eg > 1e-4)
      std::printf("self-check: %s differs from the naive implementation: loss %.3g, gradient %.3g (relative)\n", ki.name, el, eg);
  }
  std::printf("self-check (N=8, V=3000, fp32): tropd vs naive, worst relative difference: loss %.2g, gradient %.2g (%s)\n",
              worst_loss, worst_grad, worst);
  g_data.reset();
  g_ws.reset();
}

void print_summary() {
  std::printf("\nSummary (ms per call; speedup = naive / tropd; bw_frac and floor of the tropd run)\n");
  std::printf("%-16s %-5s %7s %5s %2s | %9s %9s %9s | %7s %7s | %7s %7s | %s\n", "kernel", "dtype", "V", "N", "t", "tropd",
              "single_read", "naive", "speedup", "single_read", "bw_frac", "single_read", "binding floor (tropd)");
  for (const cell& c : g_cells) {
    if (c.im != impl::tropd) continue;
    auto it = g_results.find(c.name);
    if (it == g_results.end()) continue;
    const result& r = it->second;
    if (!r.skipped.empty()) continue;
    auto other = [&](impl im) -> const result* {
      auto j = g_results.find(cell_name(c.ki, im, c.bf, c.V, c.N, c.threads));
      return j == g_results.end() || !j->second.skipped.empty() || j->second.ms <= 0 ? nullptr : &j->second;
    };
    const result* f = other(impl::single_read);
    const result* n = other(impl::naive);
    char fb[32] = "-", nb[32] = "-", sb[32] = "-", sfb[32] = "-", bfb[32] = "-";
    if (f) std::snprintf(fb, sizeof fb, "%.3f", f->ms);
    if (n) std::snprintf(nb, sizeof nb, "%.3f", n->ms);
    if (n) std::snprintf(sb, sizeof sb, "%.1fx", n->ms / r.ms);
    if (n && f) std::snprintf(sfb, sizeof sfb, "%.1fx", n->ms / f->ms);
    if (f) std::snprintf(bfb, sizeof bfb, "%.2f", f->bw_frac);
    std::printf("%-16s %-5s %7lld %5lld %2d | %9.3f %9s %9s | %7s %7s | %7.2f %7s | %s (%.0f%% of it)\n", c.ki.name,
                c.bf ? "bf16" : "fp32", (long long)c.V, (long long)c.N, c.threads, r.ms, fb, nb, sb, sfb, r.bw_frac, bfb,
                c.ki.rows ? (r.exp_bound ? "exp" : "bandwidth") : "overhead", 100 * r.floor_frac);
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool has_filter = false, list_only = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--benchmark_filter", 18) == 0) has_filter = true;
    if (std::strncmp(argv[i], "--benchmark_list_tests", 22) == 0) list_only = true;
  }
  register_all();
  std::vector<char*> args(argv, argv + argc);
  std::string filter_arg = "--benchmark_filter=" + default_filter();
  if (!has_filter) args.push_back(filter_arg.data());
  int n = int(args.size());
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  if (!list_only) {
    g_floor.read_bw[1] = measure_read_bandwidth(1);
    g_floor.read_bw[2] = measure_read_bandwidth(2);
    g_floor.exp_rate = measure_exp_rate();
    std::printf("floors measured in this process: read bandwidth %.1f GB/s (1 thread), %.1f GB/s (2 threads); "
                "Eigen exp %.2f G elem/s (1 thread)\n",
                g_floor.read_bw[1] / 1e9, g_floor.read_bw[2] / 1e9, g_floor.exp_rate / 1e9);
    self_check();
    if (!has_filter) std::printf("default subset (pass --benchmark_filter=. for the whole grid)\n");
    std::fflush(stdout);
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (!list_only) print_summary();
  return 0;
}
