// tropd/aggregation/aggregation.hpp on its own (method.md 8): check() on parameters outside
// the domain, and the weights w_i and the normaliser of every mode (host::aggregate_weights,
// the stage that applies the policy) against the definitions evaluated here, on random
// counted / kept patterns with empty sequences, sequences without a counted token, an
// external normaliser, and batches where a denominator is 0.
#include <stdint.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

namespace ag = tropd::aggregation;
using ag::mode;
using tropd::index_t;

namespace {

constexpr double dinf = std::numeric_limits<double>::infinity();
constexpr double dnan = std::numeric_limits<double>::quiet_NaN();

const mode every_mode[] = {mode::token_mean, mode::kept_token_mean, mode::seq_mean_token_mean, mode::seq_mean_token_sum,
                           mode::sum_over_constant};

/// A batch's counted / kept pattern (kept implies counted) and its sequence offsets.
struct pattern {
  std::vector<index_t> off;
  std::vector<char> counted, kept;
  index_t n() const { return off.back(); }
};

/// The definitions of aggregation.hpp / method.md 8: counted tokens get the weight, N_tok /
/// N_kept / N_seq (sequences with a counted token) / C is the denominator unless an external
/// normaliser > 0 replaces it; a denominator of 0 gives weights 0.
std::vector<double> reference_weights(const ag::aggregation& a, const pattern& p, double& normaliser) {
  const size_t n = static_cast<size_t>(p.n());
  std::vector<double> w(n, 0.0);
  std::vector<double> per(n, 1.0);  // 1 / n_j for seq_mean_token_mean
  double denom = 0;
  switch (a.how) {
    case mode::token_mean:
      for (char c : p.counted) denom += c;
      break;
    case mode::kept_token_mean:
      for (char k : p.kept) denom += k;
      break;
    case mode::sum_over_constant: denom = a.constant; break;
    case mode::seq_mean_token_mean:
    case mode::seq_mean_token_sum:
      for (size_t j = 0; j + 1 < p.off.size(); ++j) {
        double c = 0;
        for (index_t i = p.off[j]; i < p.off[j + 1]; ++i) c += p.counted[static_cast<size_t>(i)];
        if (c > 0) denom += 1;
        for (index_t i = p.off[j]; i < p.off[j + 1]; ++i) per[static_cast<size_t>(i)] = a.how == mode::seq_mean_token_mean ? 1 / c : 1.0;
      }
      break;
  }
  if (a.normaliser > 0) denom = a.normaliser;
  normaliser = denom;
  for (size_t i = 0; i < n; ++i)
    if (p.counted[i] && denom > 0) w[i] = per[i] / denom;
  return w;
}

/// The library's weights for a pattern (an objective carrying the aggregation `a`).
std::vector<double> library_weights(const ag::aggregation& a, const pattern& p, double& normaliser) {
  auto o = tropd::presets::opd();
  o.agg = a;
  REQUIRE(o.check().ok());
  const index_t n = p.n();
  std::vector<double> s(static_cast<size_t>(n), -1.0);
  tropd::token_batch b;
  b.s = {s.data(), n};
  b.t = {s.data(), n};
  b.seq_offsets = {p.off.data(), static_cast<index_t>(p.off.size())};
  tropd::host::applied ap;
  ap.tok.assign(static_cast<size_t>(n), tropd::token_result{});
  for (size_t i = 0; i < static_cast<size_t>(n); ++i)
    ap.tok[i].flags = static_cast<uint8_t>((p.counted[i] ? tropd::flags::counted : 0) | (p.kept[i] ? tropd::flags::kept : 0));
  std::vector<double> w;
  REQUIRE(tropd::host::aggregate_weights(o, b, ap, w, normaliser).ok());
  return w;
}

pattern random_pattern(std::mt19937_64& rng, int n_seq) {
  std::uniform_int_distribution<int> len(0, 5), coin(0, 3);
  pattern p;
  p.off.push_back(0);
  for (int j = 0; j < n_seq; ++j) {
    const int m = len(rng);
    const bool silent = coin(rng) == 0;  // a sequence without a counted token
    for (int i = 0; i < m; ++i) {
      const bool c = !silent && coin(rng) != 0;
      p.counted.push_back(c);
      p.kept.push_back(c && coin(rng) >= 2);
    }
    p.off.push_back(p.off.back() + m);
  }
  return p;
}

void check_weights(const ag::aggregation& a, const pattern& p) {
  double nl = -1, nr = -1;
  const std::vector<double> got = library_weights(a, p, nl), want = reference_weights(a, p, nr);
  CHECK(nl == nr);
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    CHECK(std::fabs(got[i] - want[i]) <= 1e-15 * std::fabs(want[i]));
  }
}

}  // namespace

TEST_CASE("aggregation: check() accepts the defaults and rejects a bad normaliser or constant") {
  for (mode m : every_mode) {
    CAPTURE(ag::to_string(m));
    ag::aggregation a{m};
    CHECK(a.check().ok());
    for (double bad : {-1.0, dnan, dinf}) {
      a.normaliser = bad;
      CHECK(a.check().code == tropd::errc::invalid_parameter);
    }
    a.normaliser = 12.0;
    CHECK(a.check().ok());
    // The constant is read only by sum_over_constant.
    for (double bad : {0.0, -2.0, dnan, dinf}) {
      a.constant = bad;
      CHECK(a.check().ok() == (m != mode::sum_over_constant));
    }
  }
  CHECK(std::string(ag::to_string(mode::token_mean)) == "token_mean");
  CHECK(std::string(ag::to_string(mode::kept_token_mean)) == "kept_token_mean");
  CHECK(std::string(ag::to_string(mode::seq_mean_token_mean)) == "seq_mean_token_mean");
  CHECK(std::string(ag::to_string(mode::seq_mean_token_sum)) == "seq_mean_token_sum");
  CHECK(std::string(ag::to_string(mode::sum_over_constant)) == "sum_over_constant");
  // An objective reports its aggregation's error.
  auto o = tropd::presets::opd();
  o.agg.normaliser = dnan;
  CHECK(o.check().code == tropd::errc::invalid_parameter);
}

TEST_CASE("aggregation: every mode's weights and normaliser against the definitions (random patterns)") {
  std::mt19937_64 rng(812);
  for (int rep = 0; rep < 40; ++rep) {
    const pattern p = random_pattern(rng, 1 + rep % 7);
    if (p.n() == 0) continue;
    for (mode m : every_mode)
      for (double normaliser : {0.0, 3.0, 0.25})
        for (double constant : {1.0, 7.5}) {
          CAPTURE(rep);
          CAPTURE(ag::to_string(m));
          CAPTURE(normaliser);
          CAPTURE(constant);
          check_weights(ag::aggregation{m, constant, normaliser}, p);
        }
  }
}

TEST_CASE("aggregation: empty sequences and sequences without a counted token are not counted in N_seq") {
  // Sequences: [] [c c k] [] [- -] [k]: N_seq = 2 (the second and the last).
  pattern p;
  p.off = {0, 0, 3, 3, 5, 6};
  p.counted = {1, 1, 1, 0, 0, 1};
  p.kept = {0, 0, 1, 0, 0, 1};
  double nl = 0;
  const auto w = library_weights({mode::seq_mean_token_mean}, p, nl);
  CHECK(nl == 2.0);
  CHECK(w == std::vector<double>{1.0 / 6, 1.0 / 6, 1.0 / 6, 0, 0, 0.5});
  const auto u = library_weights({mode::seq_mean_token_sum}, p, nl);
  CHECK(nl == 2.0);
  CHECK(u == std::vector<double>{0.5, 0.5, 0.5, 0, 0, 0.5});
  const auto k = library_weights({mode::kept_token_mean}, p, nl);
  CHECK(nl == 2.0);  // N_kept
  CHECK(k[2] == 0.5);
  CHECK(k[5] == 0.5);
  CHECK(k[3] == 0);
  const auto t = library_weights({mode::token_mean}, p, nl);
  CHECK(nl == 4.0);  // N_tok
  CHECK(t[0] == 0.25);
  check_weights({mode::seq_mean_token_mean}, p);
  check_weights({mode::seq_mean_token_sum, 1.0, 10.0}, p);
}

TEST_CASE("aggregation: a zero denominator gives zero weights (never NaN); an empty batch is an error upstream") {
  pattern none;
  none.off = {0, 2, 3};
  none.counted = {0, 0, 0};
  none.kept = {0, 0, 0};
  for (mode m : {mode::token_mean, mode::kept_token_mean, mode::seq_mean_token_mean, mode::seq_mean_token_sum}) {
    CAPTURE(ag::to_string(m));
    double nl = -1;
    const auto w = library_weights({m}, none, nl);
    CHECK(nl == 0.0);
    CHECK(w == std::vector<double>(3, 0.0));
  }
  // Counted tokens that are all dropped: kept_token_mean has N_kept = 0 and weights 0.
  pattern dropped;
  dropped.off = {0, 3};
  dropped.counted = {1, 1, 1};
  dropped.kept = {0, 0, 0};
  double nl = -1;
  CHECK(library_weights({mode::kept_token_mean}, dropped, nl) == std::vector<double>(3, 0.0));
  CHECK(nl == 0.0);
  // ... unless an external normaliser is given (the global count of other micro-batches).
  CHECK(library_weights({mode::kept_token_mean, 1.0, 8.0}, dropped, nl) == std::vector<double>(3, 0.125));
  CHECK(nl == 8.0);
  // evaluate_tokens refuses an empty batch before any aggregation.
  const std::vector<index_t> off = {0};
  tropd::token_batch b;
  b.seq_offsets = {off.data(), 1};
  double loss = 0;
  tropd::token_outputs out;
  out.loss = &loss;
  CHECK(tropd::host::evaluate_tokens(tropd::presets::opd(), b, out).code == tropd::errc::empty_batch);
}
