// The CUDA backend's per-thread and per-item rules, run on the CPU (no GPU needed) and held to
// the host backend: the device code that is TROPD_HD (include/tropd/gpu/plan.hpp and
// gpu/detail/*.hpp) compiled by the host compiler, driven thread by thread and block by block
// in the order the kernels use, against host/row_passes.hpp, host/topk_select.hpp,
// core/token_rules.hpp and host::evaluate_tokens. What this cannot check: the CUDA mechanics
// around these rules (indexing of the real kernels, CUB reductions, barriers, atomics, the
// hardware's ex2.approx / lg2.approx): tests/gpu/ does, on a GPU.
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

#include <tropd/gpu/detail/row_rules.hpp>
#include <tropd/gpu/detail/sort_rules.hpp>
#include <tropd/objective/stage_rules.hpp>
#include <tropd/gpu/plan.hpp>
#include <tropd/host/topk_select.hpp>
#include <tropd/tropd.hpp>

namespace {

using tropd::index_t;
namespace gd = tropd::gpu::detail;
namespace sr = tropd::stage_rules;
namespace gp = tropd::gpu;
namespace te = tropd::estimators;
namespace hd = tropd::host::detail;
constexpr int T = gp::block_threads;
constexpr double dinf = std::numeric_limits<double>::infinity();
constexpr float finf = std::numeric_limits<float>::infinity();

template <class A, class B>
constexpr int vec_width = 16 / int(sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));

template <class T_>
T_ make(double x) {
  if constexpr (std::is_same_v<T_, tropd::bf16>) return tropd::bf16::from_float(float(x));
  else if constexpr (std::is_same_v<T_, tropd::fp16>) return tropd::fp16::from_float(float(x));
  else return static_cast<T_>(x);
}

bool near(double got, double ref, double rel, double abs_tol = 1e-9) {
  if (std::isnan(got) || std::isnan(ref)) return std::isnan(got) && std::isnan(ref);
  if (std::isinf(got) || std::isinf(ref)) return got == ref;
  return std::fabs(got - ref) <= rel * std::fabs(ref) + abs_tol;
}

}  // namespace

// -------------------------------------------------------------------------------------------------
// plan.hpp
// -------------------------------------------------------------------------------------------------

TEST_CASE("gpu plan: the status word keeps the host's first error (stage, then row, then column)") {
  using gp::check_site;
  using gp::check_stage;
  const uint64_t w = gp::encode_status(check_stage::rows, tropd::errc::non_finite_input, check_site::teacher_logits, 12345, 678);
  const tropd::status s = gp::decode_status(w);
  CHECK(s.code == tropd::errc::non_finite_input);
  CHECK(s.row == 12345);
  CHECK(s.col == 678);
  CHECK(std::string(s.detail).find("teacher") != std::string::npos);
  CHECK(gp::stage_of(w) == check_stage::rows);
  CHECK(gp::site_of(w) == check_site::teacher_logits);
  CHECK(gp::decode_status(gd::status_clear).ok());
  const auto e = [](check_stage st, index_t r, index_t c) {
    return gp::encode_status(st, tropd::errc::shape_mismatch, check_site::none, r, c);
  };
  CHECK(e(check_stage::token_ids, 900, 5) < e(check_stage::rows, 0, 0));  // stage first
  CHECK(e(check_stage::rows, 3, 900) < e(check_stage::rows, 4, 0));       // then row
  CHECK(e(check_stage::rows, 3, 2) < e(check_stage::rows, 3, 7));         // then column
  CHECK(e(check_stage::rows, -1, -1) < e(check_stage::rows, 0, 0));       // "no row" first
  CHECK(gp::decode_status(e(check_stage::gradient, gp::max_rows, gp::max_cols)).row == gp::max_rows);
  CHECK(gp::decode_status(e(check_stage::gradient, gp::max_rows, gp::max_cols)).col == gp::max_cols);
  for (int st = 0; st <= int(check_stage::row_loss); ++st)
    for (int code = 0; code <= int(tropd::errc::backend_error); ++code) {
      const uint64_t x = gp::encode_status(check_stage(st), tropd::errc(code), check_site::gradient, 7, 9);
      CHECK(int(gp::stage_of(x)) == st);
      if (code) CHECK(int(gp::decode_status(x).code) == code);
    }
}

TEST_CASE("gpu plan: the pass-1 error order is the host's chunk order (student before teacher within a chunk)") {
  static_assert(gp::host_chunk == hd::chunk, "gpu/plan.hpp host_chunk must equal host/simd.hpp chunk");
  CHECK(gp::pass1_error_key(900, 0) < gp::pass1_error_key(700, 1));   // same chunk: the student first
  CHECK(gp::pass1_error_key(1030, 0) > gp::pass1_error_key(700, 1));  // an earlier chunk first
  CHECK(gp::pass1_error_key(5, 1) < gp::pass1_error_key(6, 1));
  for (index_t c : {index_t(0), index_t(1), index_t(1023), index_t(1024), index_t(151935), gp::max_cols})
    for (int t : {0, 1}) {
      CHECK(gp::pass1_error_col(gp::pass1_error_key(c, t)) == c);
      CHECK(gp::pass1_error_teacher(gp::pass1_error_key(c, t)) == t);
    }
}

TEST_CASE("gpu plan: blocks per row from the resident capacity") {
  // Enough rows for every resident block: one block per row.
  CHECK(gp::choose_blocks_per_row(132 * 3 * 4, 151936, 132, 3) == 1);
  CHECK(gp::choose_blocks_per_row(100000, 151936, 132, 3) == 1);
  // Few rows: split, at least 4096 columns per block.
  const int s8 = gp::choose_blocks_per_row(8, 128256, 132, 3);
  CHECK(s8 > 1);
  CHECK(128256 / s8 >= 4096);
  CHECK(gp::choose_blocks_per_row(1, 262144, 132, 3) == 64);
  // Short rows are never split.
  CHECK(gp::choose_blocks_per_row(2, 5000, 132, 3) == 1);
  // The wave tail: 1.2 waves of whole rows become fewer, fuller waves of half rows.
  CHECK(gp::choose_blocks_per_row(475, 151936, 132, 3) > 1);
  for (index_t rows : {index_t(1), index_t(7), index_t(100), index_t(396), index_t(1000), index_t(16384)}) {
    const int s = gp::choose_blocks_per_row(rows, 151936, 132, 3);
    CHECK(s >= 1);
    CHECK(s <= 37);
  }
}

TEST_CASE("gpu plan: block columns partition a row, vectors and scalars") {
  for (index_t V : {index_t(1), index_t(5), index_t(31), index_t(1000), index_t(5003)})
    for (index_t head : {index_t(0), index_t(1), index_t(3)})
      for (int vw : {1, 2, 4, 8})
        for (int S : {1, 2, 3, 7, 64}) {
          if (head > V) continue;
          const index_t nvec = (V - head) / vw;
          index_t next = 0, vnext = 0;
          for (int b = 0; b < S; ++b) {
            const gp::col_range r = gp::block_columns(V, head, nvec, vw, b, S);
            CHECK(r.c0 == next);
            CHECK(r.v0 == vnext);
            CHECK(r.c1 >= r.c0);
            next = r.c1;
            vnext = r.v1;
          }
          CHECK(next == V);
          CHECK(vnext == nvec);
        }
}

TEST_CASE("gpu plan: scratch layout regions are 256-byte aligned and disjoint, the status word first") {
  gp::scratch_layout L;
  CHECK(L.bytes == 256);
  const size_t a = L.take<double>(3), b = L.take<int32_t>(0), c = L.take<gd::pass1_partial>(1000), d = L.take_bytes(17);
  for (size_t x : {a, b, c, d}) CHECK(x % 256 == 0);
  CHECK(a >= 256);
  CHECK(b >= a + 24);
  CHECK(c >= b);
  CHECK(d >= c + 1000 * sizeof(gd::pass1_partial));
  CHECK(L.bytes >= d + 17);
}

// -------------------------------------------------------------------------------------------------
// Row passes: the kernels' per-thread work, driven in their order, against host/row_passes.hpp
// -------------------------------------------------------------------------------------------------

namespace {

/// Calls f(j, n) for each piece of block b of S's share of a row that thread t visits, in the
/// order vector_io.cuh's sweep visits them: (column, elements) = the head's scalars (block 0),
/// the vectors, the tail's scalars (block S - 1).
template <int VW, class F>
void emu_sweep(const gd::row_geometry& g, int b, int S, int t, F&& f) {
  if (!g.vector) {
    const gp::col_range r = gp::block_columns(g.V, 0, g.V, 1, b, S);
    for (index_t v = r.v0 + t; v < r.v1; v += T) f(v, 1);
    return;
  }
  const gp::col_range r = gp::block_columns(g.V, g.head, g.nvec, VW, b, S);
  if (b == 0)
    for (index_t j = t; j < g.head; j += T) f(j, 1);
  for (index_t v = r.v0 + t; v < r.v1; v += T) f(g.head + v * VW, VW);
  if (b == S - 1)
    for (index_t j = g.head + g.nvec * VW + t; j < g.V; j += T) f(j, 1);
}

template <class W, class T_>
W widen(T_ x) {
  return static_cast<W>(tropd::to_acc(x));
}

/// block_pass1 of row (zs, zt) for block b of S, threads merged in order, then the rescan.
template <class W, bool HasT, te::moments_needed M, class TS, class TT>
gd::pass1_partial emu_block_pass1(const TS* zs, const TT* zt, index_t V, double its, double itt, int b, int S) {
  constexpr int VW = HasT ? vec_width<TS, TT> : vec_width<TS, TS>;
  const gd::row_geometry g = gd::make_geometry<VW>(zs, HasT ? zt : static_cast<const TT*>(nullptr), static_cast<const float*>(nullptr), V);
  gd::pass1_partial p;
  for (int t = 0; t < T; ++t) {
    te::row_moments<double> acc;
    gd::thread_moments<W, HasT, M> tm(its, itt, &acc);
    emu_sweep<VW>(g, b, S, t, [&](index_t j, int n) {
      if (n == 1) {
        W z[1] = {widen<W>(zs[j])}, u[1] = {HasT ? widen<W>(zt[j]) : W(0)};
        tm.template add<1>(z, u);
      } else {
        W z[VW], u[VW];
        for (int i = 0; i < VW; ++i) {
          z[i] = widen<W>(zs[j + i]);
          u[i] = HasT ? widen<W>(zt[j + i]) : W(0);
        }
        tm.template add<VW>(z, u);
      }
    });
    p.merge(tm.finish());
  }
  if (p.needs_rescan(HasT)) {
    const gp::col_range r = gd::columns_of<VW>(g, b, S);
    for (index_t j = r.c0; j < r.c1; ++j) {
      const tropd::errc es = gd::scaled_error<W>(zs[j], W(its));
      if (es != tropd::errc::ok) p.bad = std::min<int64_t>(p.bad, gp::pass1_error_key(j, 0) * 16 + int64_t(es));
      if constexpr (HasT) {
        const tropd::errc et = gd::scaled_error<W>(zt[j], W(itt));
        if (et != tropd::errc::ok) p.bad = std::min<int64_t>(p.bad, gp::pass1_error_key(j, 1) * 16 + int64_t(et));
      }
    }
  }
  return p;
}

/// A row's pass 1 over S blocks: the verdict and the summary.
template <class W, bool HasT, te::moments_needed M, class TS, class TT>
gd::pass1_verdict emu_row_pass1(const TS* zs, const TT* zt, index_t V, double its, double itt, int S, te::row_summary& s) {
  gd::pass1_partial p;
  for (int b = 0; b < S; ++b) p.merge(emu_block_pass1<W, HasT, M>(zs, zt, V, its, itt, b, S));
  return gd::row_pass1_status<M>(p, HasT, s);
}

/// Random logits [V] with ~3% -inf holes (never column 0), sd 2, a common offset.
template <class T_>
std::vector<T_> row_of(std::mt19937_64& rng, index_t V, double offset, bool holes, index_t pad = 0) {
  std::normal_distribution<double> nd(offset, 2.0);
  std::bernoulli_distribution hole(0.03);
  std::vector<T_> x(static_cast<size_t>(V + pad));
  for (index_t j = 0; j < V + pad; ++j) x[size_t(j)] = make<T_>(holes && j > pad && hole(rng) ? -dinf : nd(rng));
  return x;
}

void check_summary(const te::row_summary& d, const te::row_summary& h, te::moments_needed M, bool has_t, double tol) {
  CHECK(near(d.lse_s, h.lse_s, tol, tol));
  if (has_t) CHECK(near(d.lse_t, h.lse_t, tol, tol));
  if (M.ent_s) CHECK(near(d.ent_s, h.ent_s, tol, 10 * tol));
  else CHECK(std::isnan(d.ent_s));
  if (has_t) {
    if (M.ent_t) CHECK(near(d.ent_t, h.ent_t, tol, 10 * tol));
    if (M.rkl) CHECK(near(d.rkl, h.rkl, 10 * tol, 10 * tol));
    if (M.fkl) CHECK(near(d.fkl, h.fkl, 10 * tol, 10 * tol));
  }
}

template <class TS, class TT, te::moments_needed M = te::all_moments>
void pass1_case(std::mt19937_64& rng, index_t V, double its, double itt, int S, index_t shift, bool holes, double offset = 0) {
  using W = tropd::work_type_t<TS, TT>;
  CAPTURE(V);
  CAPTURE(its);
  CAPTURE(S);
  CAPTURE(shift);
  CAPTURE(holes);
  auto zs_all = row_of<TS>(rng, V, offset, holes, shift);
  auto zt_all = row_of<TT>(rng, V, -offset, holes, shift);
  // Shared holes so every divergence stays finite.
  for (index_t j = 0; j < V; ++j)
    if (double(tropd::to_acc(zs_all[size_t(j + shift)])) == -dinf) zt_all[size_t(j + shift)] = make<TT>(-dinf);
  for (index_t j = 0; j < V; ++j)
    if (double(tropd::to_acc(zt_all[size_t(j + shift)])) == -dinf) zs_all[size_t(j + shift)] = make<TS>(-dinf);
  const TS* zs = zs_all.data() + shift;
  const TT* zt = zt_all.data() + shift;
  hd::row_scratch<W> buf;
  te::row_summary h{}, d{};
  const tropd::status hs = hd::row_pass1<M>(zs, zt, V, W(its), W(itt), buf, 0, h);
  REQUIRE(hs.ok());
  const gd::pass1_verdict v = emu_row_pass1<W, true, M>(zs, zt, V, its, itt, S, d);
  REQUIRE(v.code == tropd::errc::ok);
  check_summary(d, h, M, true, std::is_same_v<W, double> ? 1e-12 : 2e-6);
  // Student only.
  te::row_summary h1{}, d1{};
  REQUIRE(hd::row_pass1<te::lse_only>(zs, static_cast<const TT*>(nullptr), V, W(its), W(itt), buf, 0, h1).ok());
  REQUIRE(emu_row_pass1<W, false, te::lse_only>(zs, static_cast<const TT*>(nullptr), V, its, itt, S, d1).code == tropd::errc::ok);
  CHECK(near(d1.lse_s, h1.lse_s, 2e-6, 2e-6));
  CHECK(std::isnan(d1.lse_t));
}

}  // namespace

TEST_CASE("gpu emulation: pass 1 (thread_moments over the kernel's thread order, blocks merged) matches host row_pass1") {
  std::mt19937_64 rng(42);
  for (index_t V : {index_t(1), index_t(7), index_t(33), index_t(1000), index_t(5003)})
    for (int S : {1, 3})
      for (index_t shift : {index_t(0), index_t(1)})
        for (bool holes : {false, true}) {
          pass1_case<float, float>(rng, V, 1.0, 1.0, S, shift, holes);
          pass1_case<tropd::bf16, tropd::bf16>(rng, V, 1.0 / 0.7, 1.0 / 1.6, S, shift, holes);
          pass1_case<tropd::fp16, tropd::fp16>(rng, V, 1.0, 1.0, S, shift, holes);
          pass1_case<double, double>(rng, V, 1.0 / 1.3, 1.0, S, shift, holes);
          pass1_case<float, tropd::bf16>(rng, V, 1.0, 1.0, S, shift, holes);
          pass1_case<float, float, te::moments_needed{false, false, true, false}>(rng, V, 1.0, 1.0, S, shift, holes);
          pass1_case<tropd::bf16, tropd::bf16, te::moments_needed{false, false, true, true}>(rng, V, 1.0, 1.0, S, shift, holes);
        }
  // A large common offset (log-sum-exps near 3000).
  pass1_case<float, float>(rng, 5003, 1.0, 1.0, 1, 0, false, 3000.0);
}

TEST_CASE("gpu emulation: pass 1 reports the host's first bad logit, in the host's order") {
  using W = float;
  const index_t V = 3000;
  struct fault {
    const char* what;
    index_t col_s, col_t;  // -1: none
    float val_s, val_t;
    double its;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const fault faults[] = {
      {"student NaN", 17, -1, nan, 0, 1.0},
      {"teacher +inf", -1, 2500, 0, finf, 1.0},
      {"student NaN after a teacher NaN in the same chunk (student first)", 900, 700, nan, nan, 1.0},
      {"teacher NaN in an earlier chunk", 1500, 700, nan, nan, 1.0},
      {"finite logit overflowing once divided by T (R1)", 2999, -1, 3.0e38f, 0, 4.0},
      {"finite negative logit overflowing to -inf (R1)", 5, -1, -3.0e38f, 0, 2.0},
      {"student +inf", 0, -1, finf, 0, 1.0},
      {"-inf student at T < 1 (legal)", 10, -1, -finf, 0, 3.0},
  };
  std::mt19937_64 rng(7);
  for (const fault& f : faults) {
    CAPTURE(f.what);
    for (int S : {1, 4})
      for (index_t shift : {index_t(0), index_t(1)}) {
        auto zs_all = row_of<float>(rng, V, 0, false, shift);
        auto zt_all = row_of<float>(rng, V, 0, false, shift);
        float* zs = zs_all.data() + shift;
        float* zt = zt_all.data() + shift;
        if (f.col_s >= 0) zs[f.col_s] = f.val_s;
        if (f.col_t >= 0) zt[f.col_t] = f.val_t;
        hd::row_scratch<W> buf;
        te::row_summary h{}, d{};
        const tropd::status hs = hd::row_pass1<te::all_moments>(zs, zt, V, W(f.its), W(1.0), buf, 0, h);
        const gd::pass1_verdict v = emu_row_pass1<W, true, te::all_moments>(zs, zt, V, f.its, 1.0, S, d);
        CHECK(v.code == hs.code);
        if (!hs.ok()) CHECK(v.col == hs.col);
      }
  }
  // Rows without a finite entry.
  std::vector<float> empty(100, -finf), fine(100, 0.5f);
  te::row_summary d{};
  CHECK(emu_row_pass1<W, true, te::all_moments>(empty.data(), fine.data(), 100, 1.0, 1.0, 1, d).site == gp::check_site::student_row_empty);
  CHECK(emu_row_pass1<W, true, te::all_moments>(fine.data(), empty.data(), 100, 1.0, 1.0, 2, d).site == gp::check_site::teacher_row_empty);
  // Support-based infinite reverse KL: a finite student entry where the teacher is -inf.
  std::vector<float> zs(4000, 0.0f), zt(4000, 0.0f);
  zt[3999] = -finf;
  zs[3999] = -500.0f;  // its weight underflows; the KL is still infinite (K1)
  REQUIRE(emu_row_pass1<W, true, te::all_moments>(zs.data(), zt.data(), 4000, 1.0, 1.0, 3, d).code == tropd::errc::ok);
  CHECK(d.rkl == dinf);
  CHECK(std::isfinite(d.fkl));
}

namespace {

/// block_second over every block of a row: the second-pass sums.
template <class W, class Est, class TS, class TT>
void emu_second(const Est& est, const TS* zs, const TT* zt, index_t V, double its, double itt, int S, te::row_summary& s) {
  constexpr int VW = vec_width<TS, TT>;
  const gd::row_geometry g = gd::make_geometry<VW>(zs, zt, static_cast<const float*>(nullptr), V);
  const gd::prob_split<W> ps(s.lse_s, gd::pass_units<W>::scale(its)), pt(s.lse_t, gd::pass_units<W>::scale(itt));
  double a0 = 0, a1 = 0;
  for (int b = 0; b < S; ++b)
    for (int t = 0; t < T; ++t) {
      W w0 = 0, w1 = 0;
      double acc[2] = {0, 0};
      int pending = 0;
      emu_sweep<VW>(g, b, S, t, [&](index_t j, int n) {
        for (int i = 0; i < n; ++i) {
          const W xs = ps.exponent(widen<W>(zs[j + i])), xt = pt.exponent(widen<W>(zt[j + i]));
          W t0, t1;
          gd::second_terms<W>(est, ps.log_prob(xs), pt.log_prob(xt), ps.prob(xs), pt.prob(xt), t0, t1);
          w0 += t0;
          w1 += t1;
        }
        if (++pending == gd::flush_vectors) {
          acc[0] += double(w0);
          acc[1] += double(w1);
          w0 = w1 = 0;
          pending = 0;
        }
      });
      a0 += acc[0] + double(w0);
      a1 += acc[1] + double(w1);
    }
  s.second[0] = a0;
  s.second[1] = a1;
}

/// block_grad over every block of a row: the dense sweep, then the sparse entries.
template <class W, class Est, class G, class TS, class TT>
void emu_grad(const Est& est, const TS* zs, const TT* zt, G* out, index_t V, double its, double itt, const te::row_summary& s,
              const tropd::sparse_terms& sp, const gd::grad_coefs& c, int S) {
  const TT* ztr = gd::reads_teacher<Est> ? zt : nullptr;
  const gd::prob_split<W> ps(s.lse_s, gd::pass_units<W>::scale(its));
  const gd::prob_split<W> pt = gd::reads_teacher<Est> ? gd::prob_split<W>(s.lse_t, gd::pass_units<W>::scale(itt)) : gd::prob_split<W>();
  if (c.scale == 0.0) {
    for (index_t j = 0; j < V; ++j) out[j] = G(0);
    return;
  }
  const W wd = W(c.wd), wg = W(c.wg);
  for (index_t j = 0; j < V; ++j)
    out[j] = gd::grad_value<W, Est, G>(est, ps, pt, widen<W>(zs[j]), ztr ? widen<W>(ztr[j]) : W(0), wd, wg, s);
  for (int e = 0; e < sp.n; ++e) {
    G v;
    if (gd::sparse_entry_value<W, Est, G>(est, ps, pt, zs, ztr, out, sp, c, e, wd, s, v)) out[sp.ids[e]] = v;
  }
  (void)S;
}

template <class Est, class TS, class TT, class G>
void grad_case(const Est& est, std::mt19937_64& rng, index_t V, double its, double itt, double scale, int sparse_kind, const char* name) {
  using W = tropd::work_type_t<TS, TT>;
  CAPTURE(std::string(name));
  CAPTURE(V);
  CAPTURE(sparse_kind);
  auto zs = row_of<TS>(rng, V, 0, false);
  auto zt = row_of<TT>(rng, V, 0, false);
  hd::row_scratch<W> buf;
  te::row_summary h{}, d{};
  REQUIRE(hd::row_pass1<te::all_moments>(zs.data(), zt.data(), V, W(its), W(itt), buf, 0, h).ok());
  REQUIRE(emu_row_pass1<W, true, te::all_moments>(zs.data(), zt.data(), V, its, itt, 3, d).code == tropd::errc::ok);
  if constexpr (Est::second_pass) {
    hd::row_pass1b(est, zs.data(), zt.data(), V, W(its), W(itt), buf, h);
    emu_second<W>(est, zs.data(), zt.data(), V, its, itt, 3, d);
    CHECK(near(d.second[0], h.second[0], 1e-5, 1e-6));
    CHECK(near(d.second[1], h.second[1], 1e-5, 1e-6));
  }
  // Sparse terms: 0 none; 1 a sampled token; 2 a top-k list (raw coefficients) and the token at a
  // listed id; 3 the same with the tail bucket (split P_j).
  std::vector<int32_t> lid;
  std::vector<double> lq, g;
  const int K = int(std::min<index_t>(8, V));
  for (int k = 0; k < K; ++k) {
    lid.push_back(int32_t((k * 37 + 3) % V));
    lq.push_back(k == 2 ? -dinf : std::log(0.05 + 0.01 * k));
    g.push_back(-std::exp(lq.back()));
  }
  std::sort(lid.begin(), lid.end());
  lid.erase(std::unique(lid.begin(), lid.end()), lid.end());
  const int Ku = int(lid.size());
  std::vector<int32_t> ids_out(size_t(Ku + 1));
  std::vector<double> coef_out(size_t(Ku + 1));
  tropd::sparse_terms sp;
  if (sparse_kind == 1) {
    sp = tropd::build_sparse_terms(nullptr, {}, nullptr, 0, 0, 0, int32_t(V / 2), 0.37, ids_out.data(), coef_out.data());
  } else if (sparse_kind >= 2) {
    const double tc = sparse_kind == 3 ? 1.7 : 0.0, tt = sparse_kind == 3 ? 0.3 : 0.0;
    sp = tropd::build_sparse_terms(lid.data(), tropd::values_row{lq.data(), tropd::scalar_type::f64}, g.data(), Ku, tc, tt, lid[0], -0.25,
                                   ids_out.data(), coef_out.data());
  }
  const gd::grad_coefs c = gd::make_grad_coefs(sp, scale, std::is_same_v<Est, gd::no_dense> ? 0.0 : 1.0);
  std::vector<G> gh(static_cast<size_t>(V)), gdv(static_cast<size_t>(V));
  // The host's pass 2 with the same summary (so only pass 2 differs).
  if constexpr (std::is_same_v<Est, gd::no_dense>)
    REQUIRE(hd::row_pass2(hd::no_dense{}, zs.data(), static_cast<const TT*>(nullptr), V, W(its), W(itt), buf, d, 0.0, sp, scale, gh.data()) < 0);
  else
    REQUIRE(hd::row_pass2(est, zs.data(), zt.data(), V, W(its), W(itt), buf, d, 1.0, sp, scale, gh.data()) < 0);
  emu_grad<W, Est, G>(est, zs.data(), zt.data(), gdv.data(), V, its, itt, d, sp, c, 3);
  // Relative to the row's gradient, or to |scale| max_j p_j where the gradient is much smaller
  // than the probabilities it is formed from (fp32 roundings of p, tests/gpu/test_rows.cpp).
  double pmax = 0;
  for (index_t j = 0; j < V; ++j) pmax = std::max(pmax, std::exp(double(widen<W>(zs[size_t(j)])) * its - d.lse_s));
  double err = 0, ref = std::fabs(scale) * pmax;
  for (index_t j = 0; j < V; ++j) {
    err = std::max(err, std::fabs(double(gdv[size_t(j)]) - double(gh[size_t(j)])));
    ref = std::max(ref, std::fabs(double(gh[size_t(j)])));
  }
  CHECK_MESSAGE(err <= 2e-5 * ref, "gradient error ", err, " of ", ref);
}

}  // namespace

TEST_CASE("gpu emulation: pass 1b and pass 2 (dense rules, sparse entries, the tail bucket's split P_j) match the host's") {
  std::mt19937_64 rng(9);
  for (index_t V : {index_t(1), index_t(31), index_t(1000), index_t(4099)}) {
    for (int kind = 0; kind <= 3; ++kind) {
      grad_case<gd::no_dense, float, float, float>(gd::no_dense{}, rng, V, 1.0, 1.0, 0.8, kind, "no dense");
      grad_case<te::reverse_kl, float, float, float>(te::reverse_kl{}, rng, V, 1.0 / 0.7, 1.0, 1.3, kind, "reverse_kl");
      grad_case<te::forward_kl, tropd::bf16, tropd::bf16, float>(te::forward_kl{}, rng, V, 1.0, 1.0, -0.5, kind, "forward_kl bf16");
      grad_case<te::jsd, float, float, float>(te::jsd{0.3}, rng, V, 1.0, 1.0 / 1.2, 1.0, kind, "jsd(0.3)");
      // (V = 1: p = q = 1 and sgn(p - q) is a rounding tie on both backends.)
      if (V > 1) grad_case<te::total_variation, float, float, double>(te::total_variation{}, rng, V, 1.0, 1.0, 2.0, kind, "total_variation");
      grad_case<te::reverse_kl, double, double, double>(te::reverse_kl{}, rng, V, 1.0, 1.0, 1.0, kind, "reverse_kl fp64");
    }
    grad_case<te::jsd, float, float, float>(te::jsd{0.0}, rng, V, 1.0, 1.0, 1.0, 2, "jsd(0)");
    grad_case<te::jsd, float, float, float>(te::jsd{1.0}, rng, V, 1.0, 1.0, 1.0, 2, "jsd(1)");
    grad_case<te::reverse_kl, float, float, float>(te::reverse_kl{}, rng, V, 1.0, 1.0, 0.0, 2, "zero scale");
  }
}

// -------------------------------------------------------------------------------------------------
// Top-k: the selection's candidate buffer and the list checks, against host/topk_select.hpp and
// core/token_rules.hpp
// -------------------------------------------------------------------------------------------------

namespace {

template <class Key, class Less>
void emu_bitonic(Key* a, int n2, Less less) {
  for (int k = 2; k <= n2; k <<= 1)
    for (int j = k >> 1; j > 0; j >>= 1)
      for (int i = 0; i < n2; ++i) gd::bitonic_step(a, k, j, i, less);
}

/// block_select_topk: tiles of select_tile columns (thread t takes t, t + T, ...), the candidate
/// buffer, the compactions, the final sort.
template <class W>
void emu_select(const W* x, index_t V, int K, std::vector<int32_t>& ids, std::vector<W>& vals, int& compactions) {
  const int cap = gd::select_capacity(K);
  std::vector<gd::select_key<W>> buf(static_cast<size_t>(cap));
  int count = 0;
  bool have = false;
  gd::select_key<W> thr{};
  compactions = 0;
  for (index_t t0 = 0; t0 < V; t0 += gd::select_tile) {
    for (int t = 0; t < T; ++t)
      for (int e = 0; e < gd::select_tile / T; ++e) {
        const index_t j = t0 + t + index_t(e) * T;
        if (j >= V) break;
        const auto key = gd::select_key<W>::make(x[j], int32_t(j));
        if (!have || thr < key) {
          REQUIRE(count < cap);
          buf[size_t(count++)] = key;
        }
      }
    if (count > cap - gd::select_tile) {
      const int n2 = gd::next_pow2(count);
      for (int i = count; i < n2; ++i) buf[size_t(i)] = gd::select_key<W>{};
      emu_bitonic(buf.data(), n2, gd::stronger_first{});
      thr = buf[size_t(K - 1)];
      have = true;
      count = K;
      ++compactions;
    }
  }
  const int n2 = gd::next_pow2(std::max(count, 1));
  for (int i = count; i < n2; ++i) buf[size_t(i)] = gd::select_key<W>{};
  emu_bitonic(buf.data(), n2, gd::stronger_first{});
  ids.assign(size_t(K), -1);
  vals.assign(size_t(K), -std::numeric_limits<W>::infinity());
  for (int i = 0; i < std::min(K, count); ++i) {
    ids[size_t(i)] = buf[size_t(i)].id();
    vals[size_t(i)] = buf[size_t(i)].value();
  }
}

template <class W>
void select_case(const std::vector<W>& x, int K, const char* what) {
  CAPTURE(std::string(what));
  CAPTURE(K);
  CAPTURE(x.size());
  std::vector<int32_t> hid(static_cast<size_t>(K)), did;
  std::vector<W> hv(static_cast<size_t>(K)), dv;
  tropd::host::select_topk(x.data(), index_t(x.size()), K, hid.data(), hv.data());
  int compactions = 0;
  emu_select(x.data(), index_t(x.size()), K, did, dv, compactions);
  CHECK(did == hid);
  bool same = true;
  for (int i = 0; i < K; ++i) same = same && (dv[size_t(i)] == hv[size_t(i)] || (std::isnan(double(dv[size_t(i)])) && std::isnan(double(hv[size_t(i)]))));
  CHECK(same);
}

}  // namespace

TEST_CASE("gpu emulation: the one-read top-k selection selects what host::select_topk selects (ties to the lower id, V < K)") {
  std::mt19937_64 rng(3);
  std::normal_distribution<double> nd(0, 3);
  for (index_t V : {index_t(1), index_t(5), index_t(64), index_t(1000), index_t(4096), index_t(30011)})
    for (int K : {1, 3, 64, 1024}) {
      std::vector<float> x(static_cast<size_t>(V));
      for (auto& v : x) v = float(nd(rng));
      select_case(x, K, "fp32 random");
      // bf16-like values: many ties.
      for (auto& v : x) v = tropd::bf16::from_float(v).to_float();
      select_case(x, K, "bf16 values (ties)");
      // Increasing values: every tile brings new candidates (the most compactions).
      for (index_t j = 0; j < V; ++j) x[size_t(j)] = float(j) * 1e-3f;
      select_case(x, K, "increasing");
      // All equal, -0 and +0, -inf entries.
      std::fill(x.begin(), x.end(), 0.0f);
      for (index_t j = 0; j < V; j += 3) x[size_t(j)] = -0.0f;
      for (index_t j = 1; j < V; j += 5) x[size_t(j)] = -finf;
      select_case(x, K, "ties at zero, -inf entries");
      std::vector<double> xd(static_cast<size_t>(V));
      for (auto& v : xd) v = nd(rng);
      select_case(xd, K, "fp64");
    }
}

namespace {

/// block_check_list: the per-entry errors, then the duplicates from the sorted (id, entry) keys.
template <class Q>
int emu_check_list(const int32_t* ids, const Q& teacher, int K, index_t V, bool check_values) {
  const int n2 = gd::next_pow2(K);
  std::vector<uint64_t> keys(size_t(n2), gd::list_key_none);
  int best = gd::list_error_none;
  for (int e = 0; e < K; ++e) {
    const double q = double(teacher[e]);
    if (check_values && tropd::rules::bad_value(q, true)) best = std::min(best, gd::list_error(e, 0));
    if (q != -dinf) {
      if (ids[e] < 0 || (V >= 0 && ids[e] >= V)) best = std::min(best, gd::list_error(e, 1));
      keys[size_t(e)] = gd::list_key(ids[e], e);
    }
  }
  emu_bitonic(keys.data(), n2, [](uint64_t a, uint64_t b) { return a < b; });
  for (int k = 1; k < n2; ++k)
    if (keys[size_t(k)] != gd::list_key_none && gd::list_key_id(keys[size_t(k)]) == gd::list_key_id(keys[size_t(k - 1)]))
      best = std::min(best, gd::list_error(gd::list_key_entry(keys[size_t(k)]), 2));
  return best;
}

}  // namespace

TEST_CASE("gpu emulation: the sort-based list checks find rules::check_topk_list's first error") {
  std::mt19937_64 rng(11);
  const index_t V = 50;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int K : {1, 2, 7, 64, 300})
    for (int trial = 0; trial < 200; ++trial) {
      std::vector<int32_t> ids(static_cast<size_t>(K));
      std::vector<double> lq(static_cast<size_t>(K));
      std::uniform_int_distribution<int> id(-2, int(V) + 1), pick(0, K - 1), kind(0, 6);
      for (int e = 0; e < K; ++e) {
        ids[size_t(e)] = int32_t(id(rng) % int(V));
        if (ids[size_t(e)] < 0) ids[size_t(e)] = -ids[size_t(e)];
        lq[size_t(e)] = -1.0 - 0.1 * e;
      }
      for (int f = 0; f < 3; ++f) {  // up to three faults
        const int e = pick(rng);
        switch (kind(rng)) {
          case 0: lq[size_t(e)] = nan; break;
          case 1: lq[size_t(e)] = dinf; break;
          case 2: lq[size_t(e)] = -dinf; break;  // padding: its id is not checked
          case 3: ids[size_t(e)] = -3; break;
          case 4: ids[size_t(e)] = int32_t(V + 2); break;
          default: ids[size_t(e)] = ids[size_t(pick(rng))]; break;  // a repeat (maybe of itself: no fault)
        }
      }
      for (bool values : {true, false}) {
        const index_t vv = values ? V : -1;
        tropd::status h{};
        if (values) {
          h = tropd::rules::check_topk_list(ids.data(), lq.data(), K, vv, 0);
        } else {
          for (int e = 0; e < K && h.ok(); ++e) h = tropd::rules::check_topk_id(ids.data(), lq.data(), e, vv, 0);
        }
        const int d = emu_check_list(ids.data(), lq.data(), K, vv, values);
        CAPTURE(K);
        CAPTURE(trial);
        CAPTURE(values);
        if (h.ok()) {
          CHECK(d == gd::list_error_none);
        } else {
          REQUIRE(d != gd::list_error_none);
          CHECK(d / 4 == h.col);
          const tropd::errc code = d % 4 == 0 ? tropd::errc::non_finite_input : (d % 4 == 1 ? tropd::errc::id_out_of_range : tropd::errc::duplicate_topk_id);
          CHECK(code == h.code);
        }
      }
    }
}

// -------------------------------------------------------------------------------------------------
// The token stages: the kernels' per-token bodies, run in their order, against host::evaluate_tokens
// -------------------------------------------------------------------------------------------------

namespace {

struct emu_out {
  tropd::status st;
  double loss = 0;
  tropd::diagnostics diag;
  std::vector<double> dloss_ds, advantage, dloss_dtopk;
  std::vector<uint8_t> flags;
};

/// The device's token stages (gpu/detail/token_kernels.cuh), item by item.
template <class Obj>
emu_out emu_tokens(const Obj& obj, const tropd::token_batch& b, uint64_t seed, uint64_t step, bool mask) {
  emu_out o;
  const index_t n = b.size(), n_seq = b.num_sequences();
  const index_t Ka = b.topk_teacher.rows == n ? b.topk_teacher.cols : 0;
  constexpr bool topk = Obj::outlier_type::needs_topk;
  // 1. validate
  std::vector<tropd::origin> from(static_cast<size_t>(n));
  std::vector<int32_t> seq(static_cast<size_t>(n));
  index_t masked = 0;
  for (index_t i = 0; i < n; ++i) {
    seq[size_t(i)] = int32_t(tropd::rules::sequence_of(b.seq_offsets.data, n_seq, i));
    tropd::origin f = b.from[i];
    if (f != tropd::origin::prompt) {
      const tropd::status st = tropd::rules::check_token_values(b, i, topk);
      if (!st.ok()) {
        if (mask) {
          f = tropd::origin::prompt;
          ++masked;
        } else if (o.st.ok()) {
          o.st = st;
        }
      }
    }
    from[size_t(i)] = f;
  }
  if (!o.st.ok()) return o;
  tropd::token_batch be = b;
  be.from = {from.data(), n};
  // 2. decide: the region's batch values as device_prepare computes them.
  using R = typename Obj::region_type;
  tropd::regions::batch_context ctx{seed, step, 0, nullptr};
  std::vector<uint8_t> seq_masked(size_t(n_seq), 0);
  auto prepare = [&](const auto& region, auto& self) -> void {
    using RR = std::decay_t<decltype(region)>;
    if constexpr (std::is_same_v<RR, tropd::regions::entropy_top_fraction>) {
      std::vector<double> keys;
      for (index_t i = 0; i < n; ++i) keys.push_back(from[size_t(i)] == tropd::origin::student ? be.student_entropy[i] : -dinf);
      const index_t ns = index_t(std::count(from.begin(), from.end(), tropd::origin::student));
      std::sort(keys.begin(), keys.end(), std::greater<double>());
      const index_t k = tropd::regions::entropy_top_fraction::threshold_rank(region.fraction, ns);
      ctx.threshold = k < 0 ? dinf : keys[size_t(k)];
    } else if constexpr (std::is_same_v<RR, tropd::regions::sequence_ratio_bound>) {
      for (index_t i = 0; i < n; ++i) {
        if (from[size_t(i)] != tropd::origin::student) continue;
        const tropd::token tk = tropd::rules::make_token(be, i, seq[size_t(i)]);
        if ((region.two_sided ? std::fabs(tk.R) : -tk.R) > region.bound) seq_masked[size_t(tk.seq_index)] = 1;
      }
      ctx.seq_masked = seq_masked.data();
    } else if constexpr (requires { region.first; }) {
      if (region.in_first(step)) self(region.first, self);
      else self(region.second, self);
    }
  };
  prepare(obj.region, prepare);
  (void)sizeof(R);
  // 3. apply
  std::vector<sr::token_record> rec(static_cast<size_t>(n));
  std::vector<double> g(size_t(n * Ka), 0.0);
  for (index_t i = 0; i < n; ++i) {
    const tropd::token tk = tropd::rules::make_token(be, i, seq[size_t(i)]);
    const bool trusted = tk.from == tropd::origin::student && obj.region.trusted(tk, ctx);
    double* gi = Ka > 0 ? g.data() + i * Ka : nullptr;
    const tropd::token_result r = tropd::evaluate_token(obj, tk, tropd::rules::make_topk_row(be, i), trusted, gi);
    if (!r.st.ok() && o.st.ok()) o.st = tropd::make_error(r.st.code, r.st.detail, i, r.st.col);
    if (gi && !r.topk_grad)
      for (index_t k = 0; k < Ka; ++k) gi[k] = 0;
    rec[size_t(i)] = sr::make_record(r, trusted);
  }
  if (!o.st.ok()) return o;
  // 4. aggregate
  const auto& agg = obj.agg;
  double count = 0;
  std::vector<double> per(size_t(n_seq), 0.0);
  if (sr::sequence_mode(agg.how)) {
    for (index_t j = 0; j < n_seq; ++j) {
      double c = 0;
      for (index_t i = b.seq_offsets[j]; i < b.seq_offsets[j + 1]; ++i) c += sr::is_counted(rec[size_t(i)].flags) ? 1.0 : 0.0;
      per[size_t(j)] = sr::sequence_factor(agg, c);
      count += c > 0 ? 1.0 : 0.0;
    }
  } else {
    for (index_t i = 0; i < n; ++i) count += sr::token_count(agg, rec[size_t(i)].flags);
  }
  const double norm = sr::normaliser_of(agg, count);
  std::vector<double> w(static_cast<size_t>(n));
  for (index_t i = 0; i < n; ++i)
    w[size_t(i)] = sr::token_weight(rec[size_t(i)].flags, sr::sequence_mode(agg.how) ? per[size_t(seq[size_t(i)])] : 1.0, norm);
  // 5. diagnostics (blocks of 256 tokens, merged in block order)
  sr::diag_partial total;
  for (index_t b0 = 0; b0 < n; b0 += T) {
    sr::diag_partial p;
    for (index_t i = b0; i < std::min(n, b0 + T); ++i) p.add(be, i, rec[size_t(i)], w[size_t(i)], 0.0, 0.0);
    total.merge(p);
  }
  o.diag = total.finish(n, norm, be.student_entropy.size != 0, be.teacher_entropy.size != 0, be.rkl.size != 0, masked, false);
  o.loss = o.diag.loss;
  // 6. outputs
  for (index_t i = 0; i < n; ++i) {
    const double* gi = Ka > 0 ? g.data() + i * Ka : nullptr;
    const tropd::values_row lq = Ka > 0 ? be.topk_teacher.row(i) : tropd::values_row{};
    const tropd::values_row ls = Ka > 0 ? be.topk_student.row(i) : tropd::values_row{};
    if (!sr::output_fits(rec[size_t(i)], gi, lq, ls, Ka, w[size_t(i)], tropd::max_finite(tropd::scalar_type::f64)) && o.st.ok())
      o.st = tropd::make_error(tropd::errc::infinite_divergence, "output range", i);
  }
  if (!o.st.ok()) return o;
  for (index_t i = 0; i < n; ++i) {
    const sr::token_record& r = rec[size_t(i)];
    o.dloss_ds.push_back(w[size_t(i)] * r.dloss_ds);
    o.advantage.push_back(r.advantage);
    o.flags.push_back(r.flags);
    for (index_t k = 0; k < Ka; ++k)
      o.dloss_dtopk.push_back(w[size_t(i)] * sr::folded_topk(r, g.data() + i * Ka, be.topk_teacher.row(i), be.topk_student.row(i), k));
  }
  return o;
}

/// A random token batch: 12 sequences of 1-30 tokens, prompt / teacher / student tags, every
/// optional array, top-k lists of width K (some -inf padding) and, with `bad`, a few bad values.
struct batch_data {
  std::vector<double> s, s_old, t, ent_s, ent_t, rkl, ref, tq, ts, tso;
  std::vector<tropd::origin> from;
  std::vector<index_t> off;
  std::vector<uint64_t> seq_ids;
  std::vector<int32_t> ids;
  index_t n = 0, K = 0;

  static batch_data make(std::mt19937_64& rng, index_t K, bool bad) {
    batch_data d;
    d.K = K;
    std::uniform_int_distribution<int> len(1, 30), tag(0, 9);
    std::normal_distribution<double> nd(0, 1);
    d.off.push_back(0);
    for (int j = 0; j < 12; ++j) {
      d.off.push_back(d.off.back() + len(rng));
      d.seq_ids.push_back(1000 + 7 * uint64_t(j));
    }
    d.n = d.off.back();
    for (index_t i = 0; i < d.n; ++i) {
      const int tg = tag(rng);
      d.from.push_back(tg == 0 ? tropd::origin::prompt : (tg <= 2 ? tropd::origin::teacher : tropd::origin::student));
      const double s = -std::fabs(nd(rng)) - 0.05;
      d.s.push_back(s);
      d.s_old.push_back(s + 0.1 * nd(rng));
      d.t.push_back(tg == 9 ? -dinf : -std::fabs(nd(rng)) * 3 - 0.01);
      d.ent_s.push_back(std::fabs(nd(rng)) + 0.1);
      d.ent_t.push_back(std::fabs(nd(rng)) + 0.1);
      d.rkl.push_back(std::fabs(nd(rng)));
      d.ref.push_back(-std::fabs(nd(rng)) - 0.2);
      std::vector<double> q(static_cast<size_t>(K));
      double m = 0;
      for (index_t k = 0; k < K; ++k) m += (q[size_t(k)] = std::exp(nd(rng)));
      for (index_t k = 0; k < K; ++k) {
        d.ids.push_back(int32_t(k * 3 + (i % 3)));
        d.tq.push_back(k == K - 1 && i % 4 == 0 && K > 1 ? -dinf : std::log(0.9 * q[size_t(k)] / m));
        d.ts.push_back(std::log(0.8 * q[size_t(k)] / m) + 0.1 * nd(rng));
        d.tso.push_back(d.ts.back() + 0.05 * nd(rng));
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
  tropd::token_batch batch(bool topk) const {
    tropd::token_batch b;
    b.s = tropd::values_view(s.data(), n);
    b.s_old = tropd::values_view(s_old.data(), n);
    b.t = tropd::values_view(t.data(), n);
    b.from = {from.data(), n};
    b.seq_offsets = {off.data(), index_t(off.size())};
    b.seq_ids = {seq_ids.data(), index_t(seq_ids.size())};
    b.student_entropy = tropd::values_view(ent_s.data(), n);
    b.teacher_entropy = tropd::values_view(ent_t.data(), n);
    b.rkl = tropd::values_view(rkl.data(), n);
    b.ref = tropd::values_view(ref.data(), n);
    if (topk) {
      b.topk_ids = tropd::make_matrix<const int32_t>(ids.data(), n, K);
      b.topk_teacher = tropd::values_matrix(tq.data(), n, K, K);
      b.topk_student = tropd::values_matrix(ts.data(), n, K, K);
      b.topk_student_old = tropd::values_matrix(tso.data(), n, K, K);
    }
    return b;
  }
};

template <class Obj>
void tokens_case(const Obj& obj, const char* name, std::mt19937_64& rng, bool bad = false, bool mask = false, uint64_t step = 0) {
  CAPTURE(std::string(name));
  CAPTURE(bad);
  CAPTURE(mask);
  CAPTURE(step);
  constexpr bool topk = Obj::outlier_type::needs_topk;
  index_t K = 0;
  if constexpr (topk) K = obj.outlier.fkl.k;
  const batch_data d = batch_data::make(rng, K, bad);
  const tropd::token_batch b = d.batch(topk);
  std::vector<double> dl(size_t(d.n)), adv(size_t(d.n)), dtk(size_t(d.n * K));
  std::vector<uint8_t> fl(size_t(d.n));
  double loss = 0;
  tropd::diagnostics diag;
  tropd::token_outputs out{&loss, &diag, tropd::values_out(dl), tropd::values_out(adv),
                           K ? tropd::values_matrix_out(dtk.data(), d.n, K, K) : tropd::values_matrix_out{}, tropd::view_of(fl)};
  tropd::host::eval_options eo;
  eo.seed = 17;
  eo.step = step;
  eo.bad_input = mask ? tropd::host::input_policy::mask : tropd::host::input_policy::reject;
  const tropd::status hs = tropd::host::evaluate_tokens(obj, b, out, eo);
  const emu_out e = emu_tokens(obj, b, 17, step, mask);
  REQUIRE(e.st.code == hs.code);
  if (!hs.ok()) {
    CHECK(e.st.row == hs.row);
    return;
  }
  CHECK(near(e.loss, loss, 1e-12, 1e-15));
  for (index_t i = 0; i < d.n; ++i) {
    CHECK(near(e.dloss_ds[size_t(i)], dl[size_t(i)], 1e-12, 1e-15));
    CHECK(near(e.advantage[size_t(i)], adv[size_t(i)], 1e-12, 1e-15));
    CHECK(e.flags[size_t(i)] == fl[size_t(i)]);
  }
  for (size_t k = 0; k < e.dloss_dtopk.size(); ++k) CHECK(near(e.dloss_dtopk[k], dtk[k], 1e-12, 1e-15));
  const tropd::diagnostics& a = e.diag;
  CHECK(a.n_tokens == diag.n_tokens);
  CHECK(a.n_student == diag.n_student);
  CHECK(a.n_teacher == diag.n_teacher);
  CHECK(a.n_counted == diag.n_counted);
  CHECK(a.n_kept == diag.n_kept);
  CHECK(a.n_trusted == diag.n_trusted);
  CHECK(a.n_outlier == diag.n_outlier);
  CHECK(a.n_zero_teacher_mass == diag.n_zero_teacher_mass);
  CHECK(a.n_masked_input == diag.n_masked_input);
  for (auto [x, y] : {std::pair{a.normaliser, diag.normaliser}, {a.loss_trust, diag.loss_trust}, {a.loss_outlier, diag.loss_outlier},
                      {a.loss_guidance, diag.loss_guidance}, {a.trust_fraction, diag.trust_fraction}, {a.tv_estimate, diag.tv_estimate},
                      {a.mean_R_trusted, diag.mean_R_trusted}, {a.mean_R_outlier, diag.mean_R_outlier},
                      {a.adv_clip_fraction, diag.adv_clip_fraction}, {a.ratio_clip_fraction, diag.ratio_clip_fraction},
                      {a.mean_student_entropy, diag.mean_student_entropy}, {a.mean_teacher_entropy, diag.mean_teacher_entropy},
                      {a.mean_rkl, diag.mean_rkl}, {a.mean_topk_teacher_mass, diag.mean_topk_teacher_mass},
                      {a.mean_topk_student_mass, diag.mean_topk_student_mass}})
    CHECK(near(x, y, 1e-12, 1e-15));
}

template <class Obj>
void every_aggregation(Obj obj, const char* name, std::mt19937_64& rng) {
  using tropd::aggregation::mode;
  for (mode m : {mode::token_mean, mode::kept_token_mean, mode::seq_mean_token_mean, mode::seq_mean_token_sum, mode::sum_over_constant})
    for (double ext : {0.0, 37.0}) {
      obj.agg.how = m;
      obj.agg.constant = 5.5;
      obj.agg.normaliser = ext;
      CAPTURE(tropd::aggregation::to_string(m));
      CAPTURE(ext);
      tokens_case(obj, name, rng);
    }
}

}  // namespace

TEST_CASE("gpu emulation: the device's token stages give host::evaluate_tokens' outputs for every preset and aggregation") {
  namespace tp = tropd::presets;
  std::mt19937_64 rng(2026);
  every_aggregation(tp::opd(), "opd", rng);
  every_aggregation(tp::eopd(), "eopd", rng);
  every_aggregation(tp::reopold(), "reopold", rng);
  every_aggregation(tp::entropy_opd(), "entropy_opd", rng);
  every_aggregation(tp::clip_outlier({.guidance_beta = 1e-3}), "clip_outlier", rng);
  every_aggregation(tp::mask_outlier(), "mask_outlier", rng);
  every_aggregation(tp::fkl_outlier({.k = 8}), "fkl_outlier", rng);
  every_aggregation(tp::tropd({.k = 8, .form = tropd::outliers::fkl_form::p, .tail = tp::topk_tail::tail_bucket}), "tropd P tail", rng);
  every_aggregation(tp::tropd({.k = 5, .tail = tp::topk_tail::raw}), "tropd C raw", rng);
  every_aggregation(tp::vopd(), "vopd", rng);
  every_aggregation(tp::gopd(), "gopd", rng);
  // The phase switch on both sides of its step; the sequence mask.
  tokens_case(tp::reopold({.switch_step = 5}), "reopold phase I", rng, false, false, 4);
  tokens_case(tp::reopold({.switch_step = 5}), "reopold phase II", rng, false, false, 5);
  tropd::objective<tropd::regions::sequence_ratio_bound, te::k1_reward, tropd::outliers::drop, tropd::clippers::pg_clip> trm;
  trm.region.bound = 2.0;
  tokens_case(trm, "sequence_ratio_bound", rng);
  trm.region.two_sided = true;
  tokens_case(trm, "sequence_ratio_bound two-sided", rng);
  // Bad values: reject (the first bad token) and mask.
  tokens_case(tp::tropd({.k = 8}), "tropd, bad values, reject", rng, true, false);
  tokens_case(tp::tropd({.k = 8}), "tropd, bad values, mask", rng, true, true);
  tokens_case(tp::opd(), "opd, bad values, mask", rng, true, true);
}
