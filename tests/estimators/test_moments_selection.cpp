// Pass 1 computes only the moments its caller reads (estimators::moments_needed, host
// row_pass1<M>). These tests check that every selection gives the same bits as the
// compute-everything path for the fields it keeps, NaN for the fields it skips, and that
// every caller that selects (divergence_rows, sampled_rows, topk_forward_kl_rows,
// evaluate_rows) returns what the compute-everything path gives. The rows mix -inf entries,
// exp underflow (masked chunks), plain chunks (the fast path) and V not a multiple of 16.
#include <stdint.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

#include "reference/helpers.hpp"
#include "reference/naive.hpp"

namespace est = tropd::estimators;
namespace host = tropd::host;
namespace naive = tropd_test::naive;
using tropd::index_t;
using tropd_test::ld;

namespace {

constexpr float finf = std::numeric_limits<float>::infinity();

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

/// Rows with every kind of chunk: plain (fast path), some -inf entries (student only, teacher
/// only, both: masked path, infinite KLs), entries far below the maximum (exp underflow).
/// Row r: V = 2 chunks + a ragged tail (not a multiple of 16).
struct rows_case {
  index_t N = 6, V = 2 * 1024 + 37;
  std::vector<float> zs, zt;
  explicit rows_case(uint64_t seed, bool finite_kls = false) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> g(0.f, 2.f);
    zs.resize(static_cast<size_t>(N * V));
    zt.resize(static_cast<size_t>(N * V));
    for (index_t i = 0; i < N * V; ++i) {
      zs[static_cast<size_t>(i)] = g(rng);
      zt[static_cast<size_t>(i)] = zs[static_cast<size_t>(i)] + 0.6f * g(rng);
    }
    auto at = [&](std::vector<float>& m, index_t r, index_t j) -> float& { return m[static_cast<size_t>(r * V + j)]; };
    // Row 0: plain (every chunk on the fast path).
    // Row 1: a shared -inf (both rows) in the second chunk and the tail.
    at(zs, 1, 1500) = at(zt, 1, 1500) = -finf;
    at(zs, 1, V - 3) = at(zt, 1, V - 3) = -finf;
    // Row 2: underflow in the first chunk (finite, far below the maximum).
    at(zs, 2, 10) = -300.f;
    at(zt, 2, 700) = -250.f;
    // Row 3: a large maximum late in the row (re-centring) and underflow before it.
    at(zs, 3, 2000) = 120.f;
    at(zt, 3, 2050) = 140.f;
    if (!finite_kls) {
      // Row 4: the teacher gives zero mass where the student does not (rkl = +inf) and the
      // student where the teacher does not (fkl = +inf).
      at(zt, 4, 5) = -finf;
      at(zs, 4, 1030) = -finf;
      // Row 5: only the student has a -inf (fkl = +inf, rkl finite).
      at(zs, 5, V - 1) = -finf;
    } else {
      at(zs, 4, 5) = at(zt, 4, 5) = -finf;
      at(zs, 5, 1030) = -200.f;
    }
  }
};

/// One row through row_pass1<M> (fp32 work), with or without the kept exponentials and the
/// top-k selection.
template <est::moments_needed M>
est::row_summary pass1(const rows_case& c, index_t r, bool keep, int topk) {
  auto buf = std::make_unique<host::detail::row_scratch<float>>();
  if (keep) buf->prepare_keep(c.V, true);
  if (topk) buf->prepare_topk(topk);
  est::row_summary s;
  const tropd::status st = host::detail::row_pass1<M>(c.zs.data() + r * c.V, c.zt.data() + r * c.V, c.V, 1.f, 1.f,
                                                     *buf, r, s, topk);
  REQUIRE(st.ok());
  return s;
}

template <est::moments_needed M>
void check_selection(const rows_case& c) {
  for (index_t r = 0; r < c.N; ++r)
    for (bool keep : {false, true})
      for (int topk : {0, 8}) {
        CAPTURE(r);
        CAPTURE(keep);
        CAPTURE(topk);
        const est::row_summary all = pass1<est::all_moments>(c, r, keep, topk);
        const est::row_summary got = pass1<M>(c, r, keep, topk);
        CHECK(same_bits(got.lse_s, all.lse_s));
        CHECK(same_bits(got.lse_t, all.lse_t));
        if (M.ent_s) CHECK(same_bits(got.ent_s, all.ent_s)); else CHECK(std::isnan(got.ent_s));
        if (M.ent_t) CHECK(same_bits(got.ent_t, all.ent_t)); else CHECK(std::isnan(got.ent_t));
        if (M.rkl) CHECK(same_bits(got.rkl, all.rkl)); else CHECK(std::isnan(got.rkl));
        if (M.fkl) CHECK(same_bits(got.fkl, all.fkl)); else CHECK(std::isnan(got.fkl));
      }
}

template <class T>
bool bit_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

}  // namespace

TEST_CASE("moments selection: row_pass1 keeps the selected fields bit for bit and NaNs the others") {
  const rows_case c(11);
  check_selection<est::lse_only>(c);
  check_selection<est::moments_needed{true, false, false, false}>(c);
  check_selection<est::moments_needed{false, true, false, false}>(c);
  check_selection<est::moments_needed{false, false, true, false}>(c);
  check_selection<est::moments_needed{false, false, false, true}>(c);
  check_selection<est::moments_needed{true, true, true, false}>(c);
  check_selection<est::moments_needed{false, false, true, true}>(c);
  check_selection<est::all_moments>(c);
}

TEST_CASE("moments selection: estimators declare what they read") {
  static_assert(est::summary_reads_of<est::reverse_kl>() == est::moments_needed{false, false, true, false});
  static_assert(est::summary_reads_of<est::forward_kl>() == est::moments_needed{false, false, false, true});
  static_assert(est::summary_reads_of<est::jsd>() == est::moments_needed{false, false, true, true});
  static_assert(est::summary_reads_of<est::total_variation>() == est::lse_only);
  struct custom {};  // an estimator without a declaration: everything
  static_assert(est::summary_reads_of<custom>() == est::all_moments);
  CHECK(true);
}

TEST_CASE("moments selection: divergence_rows equals the compute-everything path; summaries are complete") {
  for (const bool finite_kls : {true, false}) {
    const rows_case c(23, finite_kls);
    const auto S = tropd::make_matrix<const float>(c.zs.data(), c.N, c.V);
    const auto T = tropd::make_matrix<const float>(c.zt.data(), c.N, c.V);
    auto run = [&](const auto& e, bool fused, bool with_summaries, std::vector<double>& loss, std::vector<float>& grad,
                   std::vector<est::row_summary>& sums) {
      loss.assign(static_cast<size_t>(c.N), 0.0);
      grad.assign(static_cast<size_t>(c.N * c.V), 0.f);
      sums.assign(with_summaries ? static_cast<size_t>(c.N) : 0, est::row_summary{});
      host::row_options o;
      o.order = fused ? tropd::host::row_order::single_read : tropd::host::row_order::validate_first;
      return host::divergence_rows(e, S, T, tropd::view_of(loss), tropd::make_matrix(grad.data(), c.N, c.V), o, {},
                                   tropd::vector_view<est::row_summary>{sums.data(), static_cast<index_t>(sums.size())});
    };
    auto compare = [&](const auto& e) {
      for (const bool fused : {false, true}) {
        CAPTURE(fused);
        std::vector<double> l0, l1;
        std::vector<float> g0, g1;
        std::vector<est::row_summary> s0, s1;
        const tropd::status a = run(e, fused, true, l0, g0, s0);   // every moment (summaries asked)
        const tropd::status b = run(e, fused, false, l1, g1, s1);  // only what the estimator reads
        CHECK(a.code == b.code);
        if (!a.ok()) continue;
        CHECK(bit_equal(l0, l1));
        CHECK(bit_equal(g0, g1));
        // Complete summaries: every first-pass field against the long-double reference.
        for (index_t r = 0; r < c.N; ++r) {
          CAPTURE(r);
          const auto zr = tropd_test::row_ld(c.zs, r, c.V), ur = tropd_test::row_ld(c.zt, r, c.V);
          const auto ls = naive::log_softmax(zr), lt = naive::log_softmax(ur);
          const est::row_summary& s = s0[static_cast<size_t>(r)];
          CHECK(tropd_test::close_value(s.lse_s, naive::logsumexp(zr), 1e-6));
          CHECK(tropd_test::close_value(s.lse_t, naive::logsumexp(ur), 1e-6));
          CHECK(tropd_test::close_value(s.ent_s, naive::entropy(ls), 1e-5));
          CHECK(tropd_test::close_value(s.ent_t, naive::entropy(lt), 1e-5));
          const ld rkl = naive::reverse_kl(zr, ur).value, fkl = naive::forward_kl(zr, ur).value;
          if (std::isinf(rkl)) CHECK(std::isinf(s.rkl)); else CHECK(tropd_test::close_value(s.rkl, rkl, 1e-5));
          if (std::isinf(fkl)) CHECK(std::isinf(s.fkl)); else CHECK(tropd_test::close_value(s.fkl, fkl, 1e-5));
        }
      }
    };
    CAPTURE(finite_kls);
    compare(est::reverse_kl{});
    compare(est::forward_kl{});
    compare(est::jsd{0.5});
    compare(est::jsd{0.0});
    compare(est::jsd{1.0});
    compare(est::total_variation{});
  }
}

TEST_CASE("moments selection: sampled_rows and topk_forward_kl_rows use the complete log-sum-exps") {
  const rows_case c(37);
  const auto S = tropd::make_matrix<const float>(c.zs.data(), c.N, c.V);
  const auto T = tropd::make_matrix<const float>(c.zt.data(), c.N, c.V);
  // Complete summaries (every moment) from divergence_rows with a finite estimator.
  std::vector<double> dl(static_cast<size_t>(c.N));
  std::vector<est::row_summary> sums(static_cast<size_t>(c.N));
  REQUIRE(host::divergence_rows(est::total_variation{}, S, T, tropd::view_of(dl), tropd::matrix_view<float>{}, {}, {},
                                tropd::view_of(sums))
              .ok());
  std::vector<int32_t> ids(static_cast<size_t>(c.N));
  for (index_t r = 0; r < c.N; ++r) ids[static_cast<size_t>(r)] = int32_t((r * 397 + 11) % c.V);
  for (const bool fused : {false, true}) {
    host::row_options o;
    o.order = fused ? tropd::host::row_order::single_read : tropd::host::row_order::validate_first;
    std::vector<double> loss(static_cast<size_t>(c.N));
    std::vector<float> grad(static_cast<size_t>(c.N * c.V));
    const est::sampled<est::k3, est::as_loss> k3{};
    REQUIRE(host::sampled_rows(k3, S, T, tropd::vector_view<const int32_t>{ids.data(), c.N}, {}, tropd::view_of(loss),
                               tropd::make_matrix(grad.data(), c.N, c.V), o)
                .ok());
    for (index_t r = 0; r < c.N; ++r) {
      const int32_t y = ids[static_cast<size_t>(r)];
      const double sy = double(c.zs[static_cast<size_t>(r * c.V + y)]) - sums[static_cast<size_t>(r)].lse_s;
      const double ty = double(c.zt[static_cast<size_t>(r * c.V + y)]) - sums[static_cast<size_t>(r)].lse_t;
      CHECK(same_bits(loss[static_cast<size_t>(r)], k3(sy, sy, ty).loss));
    }
    // Top-k FKL from logits: the reference evaluates the same estimator on the complete lses.
    const est::topk_forward_kl fk{8};
    REQUIRE(host::topk_forward_kl_rows(fk, S, T, tropd::view_of(loss), tropd::make_matrix(grad.data(), c.N, c.V), o).ok());
    for (index_t r = 0; r < c.N; ++r) {
      std::vector<int32_t> kid(8);
      std::vector<float> kv(8);
      host::select_topk(c.zt.data() + r * c.V, c.V, 8, kid.data(), kv.data());
      std::vector<double> lq(8), ls(8), kg(8);
      for (int i = 0; i < 8; ++i) {
        lq[static_cast<size_t>(i)] = double(kv[static_cast<size_t>(i)]) - sums[static_cast<size_t>(r)].lse_t;
        ls[static_cast<size_t>(i)] = double(c.zs[static_cast<size_t>(r * c.V + kid[static_cast<size_t>(i)])]) -
                                     sums[static_cast<size_t>(r)].lse_s;
      }
      const auto res = fk.eval(lq.data(), ls.data(), 8, kg.data());
      REQUIRE(res.st.ok());
      CHECK(same_bits(loss[static_cast<size_t>(r)], res.value));
    }
  }
}

TEST_CASE("moments selection: evaluate_rows gives the same loss and gradient with and without diagnostics") {
  const rows_case c(41, true);
  const auto S = tropd::make_matrix<const float>(c.zs.data(), c.N, c.V);
  const auto T = tropd::make_matrix<const float>(c.zt.data(), c.N, c.V);
  std::vector<int32_t> ids(static_cast<size_t>(c.N));
  for (index_t r = 0; r < c.N; ++r) ids[static_cast<size_t>(r)] = int32_t((r * 131 + 7) % c.V);
  std::vector<tropd::origin> from(static_cast<size_t>(c.N), tropd::origin::student);
  from[1] = tropd::origin::teacher;
  std::vector<index_t> off{0, 3, c.N};
  host::row_inputs tok;
  tok.ids = {ids.data(), c.N};
  tok.from = {from.data(), c.N};
  tok.seq_offsets = {off.data(), 3};
  host::eval_options eo;
  eo.seed = 5;
  // With diagnostics every moment the diagnostics report is computed; without, only what the
  // objective reads. Loss and gradient must not differ.
  auto compare = [&](const auto& obj) {
    for (const int threads : {1, 2}) {
      eo.threads = threads;
      std::vector<float> g0(static_cast<size_t>(c.N * c.V)), g1(g0.size());
      double l0 = 0, l1 = 0;
      tropd::diagnostics d;
      const tropd::status a =
          host::evaluate_rows(obj, S, T, tok, host::row_outputs<>{.grad = tropd::make_matrix(g0.data(), c.N, c.V), .loss = &l0, .diag = &d}, eo);
      const tropd::status b =
          host::evaluate_rows(obj, S, T, tok, host::row_outputs<>{.grad = tropd::make_matrix(g1.data(), c.N, c.V), .loss = &l1}, eo);
      REQUIRE(a.ok());
      REQUIRE(b.ok());
      CHECK(same_bits(l0, l1));
      CHECK(bit_equal(g0, g1));
      // The diagnostics still report the entropies and the reverse KL (means over student rows).
      CHECK(std::isfinite(d.mean_student_entropy));
      CHECK(std::isfinite(d.mean_teacher_entropy));
      CHECK(std::isfinite(d.mean_rkl));
      ld hs = 0;
      int ns = 0;
      for (index_t r = 0; r < c.N; ++r) {
        if (from[static_cast<size_t>(r)] != tropd::origin::student) continue;
        hs += naive::entropy(naive::log_softmax(tropd_test::row_ld(c.zs, r, c.V)));
        ++ns;
      }
      CHECK(tropd_test::close_value(d.mean_student_entropy, hs / ns, 1e-5));
    }
  };
  compare(tropd::presets::opd());
  compare(tropd::presets::tropd());
  compare(tropd::presets::eopd());
  compare(tropd::presets::reopold({.floor = -2.0, .switch_step = 0, .entropy_fraction = 0.5}));
  compare(tropd::presets::entropy_opd({.fraction = 0.5}));
  compare(tropd::presets::vopd());
  compare(tropd::presets::gkd({.beta = 0.5}));
  compare(tropd::presets::gkd({.beta = 1.0}));
}
