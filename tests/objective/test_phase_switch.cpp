// REOPOLD's phase switch (method.md 5; regions::phase_switch in presets::reopold) at its
// boundary: steps switch - 1, switch and switch + 1, and switch_step = 0, at token level
// (evaluate_tokens) and at row level (evaluate_rows), against the naive long-double
// reference (phase I: keep R >= floor; phase II from the switch step on: keep the top
// fraction by student entropy). Batches are chosen so that the two phases keep different
// tokens (checked), so a decision taken by the wrong phase at any of these steps fails.
// The region alone: tests/regions/test_regions.cpp.
#include <stdint.h>

#include <cmath>
#include <random>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

#include "objective/fixtures.hpp"

using namespace tropd_test::objective_fx;

namespace {

/// Which tokens the reference keeps at a step.
std::vector<char> kept_at(const no::batch& b, double floor, long long sw, long long step, ld fraction) {
  const no::result r = no::evaluate(no::reopold(floor, sw, step, fraction), b);
  std::vector<char> k;
  for (const auto& t : r.tok) k.push_back(t.kept);
  return k;
}

/// A batch whose phase-I and phase-II selections differ: R and the student entropy are
/// anti-correlated (high-entropy tokens have R below the floor), plus random tokens.
no::batch phase_batch(std::mt19937_64& rng) {
  gen_options g;
  g.n_seq = 6;
  no::batch b = random_batch(rng, g);
  std::uniform_real_distribution<double> U(0, 1);
  for (auto& x : b.tok) {
    if (x.from != no::who::student) continue;
    const double R = -3 * U(rng);
    x.t = fl_of(double(x.s_old) + R);
    x.ent_s = fl_of(3 - R + 0.1 * U(rng));  // low R, high entropy
  }
  return b;
}

}  // namespace

TEST_CASE("objective presets: reopold's phase switch at steps switch - 1, switch, switch + 1 and switch 0 (token level)") {
  std::mt19937_64 rng(3101);
  const double floor = -1.5;
  for (int rep = 0; rep < 3; ++rep) {
    const no::batch b = phase_batch(rng);
    for (long long sw : {1ll, 10ll, 200ll}) {
      CAPTURE(sw);
      // The two phases keep different tokens on this batch.
      REQUIRE(kept_at(b, floor, sw, sw - 1, 0.3L) != kept_at(b, floor, sw, sw, 0.3L));
      for (long long step : {sw - 1, sw, sw + 1}) {
        CAPTURE(step);
        tropd::host::eval_options opt;
        opt.step = static_cast<uint64_t>(step);
        check_preset(presets::reopold({.floor = floor, .switch_step = sw, .entropy_fraction = 0.3}), no::reopold(floor, sw, step, 0.3L), b, opt);
        // The library's kept flags are the phase's selection.
        const lib_out got = run_tokens(presets::reopold({.floor = floor, .switch_step = sw, .entropy_fraction = 0.3}), to_lib(b), opt);
        REQUIRE(got.st.ok());
        const std::vector<char> want = kept_at(b, floor, sw, step, 0.3L);
        for (size_t i = 0; i < b.tok.size(); ++i) CHECK(((got.flags[i] & fl::kept) != 0) == (want[i] != 0));
      }
    }
    // switch_step 0: phase II from step 0 on.
    for (long long step : {0ll, 1ll}) {
      CAPTURE(step);
      tropd::host::eval_options opt;
      opt.step = static_cast<uint64_t>(step);
      check_preset(presets::reopold({.floor = floor, .switch_step = 0, .entropy_fraction = 0.3}), no::reopold(floor, 0, step, 0.3L), b, opt);
      const lib_out got = run_tokens(presets::reopold({.floor = floor, .switch_step = 0, .entropy_fraction = 0.3}), to_lib(b), opt);
      REQUIRE(got.st.ok());
      const std::vector<char> phase2 = kept_at(b, floor, 0, 0, 0.3L);
      for (size_t i = 0; i < b.tok.size(); ++i) CHECK(((got.flags[i] & fl::kept) != 0) == (phase2[i] != 0));
    }
  }
}

TEST_CASE("objective rows: reopold's phase switch at steps switch - 1, switch, switch + 1 and switch 0 (row level)") {
  std::mt19937_64 rng(3102);
  const index_t V = 24;
  const double floor = -1.0;
  for (int rep = 0; rep < 2; ++rep) {
    const row_batch rb = random_rows(rng, V, 5, 0.0);
    for (long long sw : {1ll, 7ll}) {
      CAPTURE(sw);
      const auto o = presets::reopold({.floor = floor, .switch_step = sw, .entropy_fraction = 0.25});
      tropd::host::eval_options before, at;
      before.step = static_cast<uint64_t>(sw - 1);
      at.step = static_cast<uint64_t>(sw);
      // The phases keep different rows of this batch.
      REQUIRE(run_rows(o, rb, 0, before).flags != run_rows(o, rb, 0, at).flags);
      for (long long step : {sw - 1, sw, sw + 1}) {
        CAPTURE(step);
        tropd::host::eval_options opt;
        opt.step = static_cast<uint64_t>(step);
        check_rows_vs_reference(o, no::reopold(floor, sw, step, 0.25L), rb, 0, opt);
      }
    }
    const auto o0 = presets::reopold({.floor = floor, .switch_step = 0, .entropy_fraction = 0.25});
    for (long long step : {0ll, 1ll}) {
      CAPTURE(step);
      tropd::host::eval_options opt;
      opt.step = static_cast<uint64_t>(step);
      check_rows_vs_reference(o0, no::reopold(floor, 0, step, 0.25L), rb, 0, opt);
    }
  }
}
