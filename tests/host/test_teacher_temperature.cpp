// The teacher temperature T_T of evaluate_rows (row_inputs::teacher_temperature; method.md
// 2.2): the teacher's logits are divided by T_T before everything read from them (the
// sampled token's t, H_T, the per-position KL, the selected top-k lists), while given
// teacher top-k lists are used as given, never re-tempered. Several T_T, with the student at
// T_S = 1 so that only the teacher moves, with and without given lists, every kind of preset
// that reads the teacher, against the naive long-double reference fed with u / T_T.
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

#include "objective/fixtures.hpp"

using namespace tropd_test::objective_fx;

namespace {

const double teacher_temperatures[] = {0.5, 1.0, 1.7, 3.0};

/// Given lists for every row: the teacher's top 5 at temperature 1 (a server's list scored
/// at T = 1), shuffled, then one padding entry (id -1, log-prob -inf). K = 6.
struct given_lists {
  index_t K = 6;
  std::vector<int32_t> ids;
  std::vector<float> lp;
  tropd::host::topk_lists view() const {
    const index_t n = static_cast<index_t>(ids.size()) / K;
    return {tropd::make_matrix<const int32_t>(ids.data(), n, K), tropd::make_matrix<const float>(lp.data(), n, K)};
  }
};

given_lists make_lists(const row_batch& rb, std::mt19937_64& rng) {
  given_lists g;
  for (index_t r = 0; r < rb.n; ++r) {
    const vec lt = naive::log_softmax(rb.urow(r));
    std::vector<int> top = naive::topk_ids(lt, 5);
    std::shuffle(top.begin(), top.end(), rng);
    for (int id : top) {
      g.ids.push_back(id);
      g.lp.push_back(fl_of(double(lt[static_cast<size_t>(id)])));
    }
    g.ids.push_back(-1);
    g.lp.push_back(-finf);
  }
  return g;
}

/// Row level with given lists at teacher temperature tt vs the reference: tokens from the
/// student rows and the teacher rows divided by tt, with the given lists (as given) as the
/// teacher's top-k; decisions of region::given are the library's.
template <class Obj>
void check_given_lists(const Obj& o, const no::objective& ro, const row_batch& rb, const given_lists& g, double tt,
                       const tropd::host::eval_options& opt) {
  const tropd::host::topk_lists lists = g.view();
  const row_out got = run_rows(o, rb, g.K, opt, {}, 1, 1.0, tt, &lists);
  REQUIRE_MESSAGE(got.st.ok(), got.st.message());
  no::batch b;
  b.offsets = rb.offsets;
  std::vector<char> given(static_cast<size_t>(rb.n));
  for (index_t r = 0; r < rb.n; ++r) {
    vec u = rb.urow(r);
    for (ld& x : u) x /= tt;
    no::token x = no::token_from_row(rb.zrow(r), u, rb.y[static_cast<size_t>(r)], rb.who[static_cast<size_t>(r)], 0);
    x.ref = rb.ref[static_cast<size_t>(r)];
    const vec ls = naive::log_softmax(rb.zrow(r));
    for (index_t k = 0; k < g.K; ++k) {
      const size_t e = static_cast<size_t>(r * g.K + k);
      const bool pad = g.lp[e] == -finf;
      x.ids.push_back(pad ? 0 : g.ids[e]);  // (a padding entry's gradient is 0: any id)
      x.lq.push_back(pad ? -ldinf : ld(g.lp[e]));
      x.ls.push_back(pad ? 0 : ls[static_cast<size_t>(g.ids[e])]);
    }
    b.tok.push_back(x);
    given[static_cast<size_t>(r)] = (got.flags[static_cast<size_t>(r)] & fl::trusted) != 0;
  }
  const no::result want = no::evaluate(ro, b, given);
  REQUIRE_FALSE(want.error);
  CHECK(std::fabs(got.loss - want.loss) <= 2e-6L * std::max<ld>(1, std::fabs(want.loss)));
  std::vector<vec> grad;
  for (index_t r = 0; r < rb.n; ++r) {
    const size_t u = static_cast<size_t>(r);
    vec gz = no::chain_to_logits(rb.zrow(r), rb.y[u], want.tok[u].dlds, b.tok[u].ids, want.tok[u].g);
    for (ld& v : gz) v *= want.w[u];
    grad.push_back(gz);
  }
  const ld gs = std::max<ld>(max_abs(grad), 1e-12L);
  ld err = 0;
  for (index_t r = 0; r < rb.n; ++r)
    for (index_t v = 0; v < rb.V; ++v)
      err = std::max(err, std::fabs(got.grad[static_cast<size_t>(r * rb.V + v)] - grad[static_cast<size_t>(r)][static_cast<size_t>(v)]));
  CAPTURE(gs);
  CHECK(err <= 2e-6L * gs);
  for (index_t r = 0; r < rb.n; ++r) {
    CAPTURE(r);
    const auto& t = want.tok[static_cast<size_t>(r)];
    const uint8_t f = got.flags[static_cast<size_t>(r)];
    CHECK(((f & fl::kept) != 0) == t.kept);
    CHECK(((f & fl::outlier) != 0) == t.outlier);
    for (index_t k = 0; k < g.K; ++k) {
      const ld gk = want.w[static_cast<size_t>(r)] * t.g[static_cast<size_t>(k)];
      CHECK(std::fabs(got.dtopk[static_cast<size_t>(r * g.K + k)] - gk) <= 2e-6L * std::max<ld>(gs, std::fabs(gk)));
    }
  }
}

}  // namespace

TEST_CASE("objective rows: teacher temperature T_T without given lists (t, H_T, KL and the selected top-k from u / T_T)") {
  std::mt19937_64 rng(3201);
  using tropd::outliers::fkl_form;
  const index_t V = 28, K = 6;
  tropd::host::eval_options opt;
  opt.seed = 19;
  const row_batch finite = random_rows(rng, V, 4, 0.0), zeros = random_rows(rng, V, 4, 0.25);
  for (double tt : teacher_temperatures) {
    CAPTURE(tt);
    check_rows_vs_reference(presets::opd(), no::opd(), finite, 0, opt, {}, 1.0, tt);
    check_rows_vs_reference(presets::mask_outlier({.tau = -1.0, .guidance_beta = 0.02}), no::mask_outlier(-1.0L, 0.02L), zeros, 0, opt, {}, 1.0, tt);
    check_rows_vs_reference(presets::eopd({.tau = 1.2, .k = static_cast<int>(K)}), no::eopd(1.2L), finite, K, opt, {}, 1.0, tt);
    check_rows_vs_reference(presets::vopd(), no::vopd(), finite, 0, opt, {}, 1.0, tt);
    check_rows_vs_reference(presets::tropd({.beta = 0.02, .k = static_cast<int>(K)}), no::tropd(0.02L), zeros, K, opt, {}, 1.0, tt);
    check_rows_vs_reference(presets::tropd({.beta = 0.02, .k = static_cast<int>(K), .form = fkl_form::p}), no::tropd(0.02L, false), zeros, K, opt, {}, 1.0, tt);
    check_rows_vs_reference(presets::gkd({.beta = 0.3}), no::gkd(0.3L), finite, 0, opt, {}, 1.0, tt);
  }
}

TEST_CASE("objective rows: teacher temperature T_T with given lists (the lists are used as given, never re-tempered)") {
  std::mt19937_64 rng(3202);
  using tropd::outliers::fkl_form;
  const index_t V = 28;
  tropd::host::eval_options opt;
  opt.seed = 23;
  const row_batch finite = random_rows(rng, V, 4, 0.0), zeros = random_rows(rng, V, 4, 0.25);
  const given_lists gf = make_lists(finite, rng), gz = make_lists(zeros, rng);
  for (double tt : teacher_temperatures) {
    CAPTURE(tt);
    check_given_lists(presets::tropd({.beta = 0.02, .k = 6}), no::tropd(0.02L), zeros, gz, tt, opt);
    check_given_lists(presets::tropd({.beta = 0.02, .k = 6, .form = fkl_form::p}), no::tropd(0.02L, false), zeros, gz, tt, opt);
    check_given_lists(presets::fkl_outlier({.k = 6, .form = fkl_form::p}), no::fkl_outlier(false), zeros, gz, tt, opt);
    check_given_lists(presets::eopd({.tau = 1.2, .k = 6}), no::eopd(1.2L), finite, gf, tt, opt);
  }
  // Vacuity guard: at T_T != 1 the tempered teacher's own top-k differs from the given lists
  // on some row, so a library that re-selected or re-tempered them would be caught above.
  int differ = 0;
  for (index_t r = 0; r < finite.n; ++r) {
    vec u = finite.urow(r);
    for (ld& x : u) x /= 3.0L;
    const vec lt = naive::log_softmax(u);
    for (int k = 0; k < 5; ++k) {
      const size_t e = static_cast<size_t>(r * gf.K + k);
      differ += std::fabs(lt[static_cast<size_t>(gf.ids[e])] - ld(gf.lp[e])) > 1e-3L;
    }
  }
  CHECK(differ > 10);
}
