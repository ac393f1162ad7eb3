// Tests of tropd/schedules/prefix.hpp and tropd/schedules/plan.hpp (method.md 4.4, 10.5).
// Expected values come from closed forms evaluated here in long double, never from the code.
#include <doctest/doctest.h>

#include <tropd/schedules/plan.hpp>
#include <tropd/schedules/prefix.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace ts = tropd::schedules;
using tropd::errc;
using tropd::origin;

namespace {

constexpr long double pi_l = 3.141592653589793238462643383279502884L;

long double cosine_closed(long double t) { return (1.0L + std::cos(pi_l * t)) / 2.0L; }

ts::schedule_point point(long long i, long long n, long long len = 0, long long id = 0, uint64_t seed = 0) {
  ts::schedule_point p;
  p.step = i;
  p.total_steps = n;
  p.teacher_length = len;
  p.sample_id = id;
  p.seed = seed;
  return p;
}

// floor(x) for a long-double closed form x; `ambiguous` is set when x is within 1e-8 of the
// next integer (where the documented +1e-9 guard may legitimately round up).
long long floor_closed(long double x, bool& ambiguous) {
  const long double f = std::floor(x);
  ambiguous = (f + 1.0L - x) < 1e-8L;
  return static_cast<long long>(f);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Concepts
// ---------------------------------------------------------------------------------------

static_assert(ts::prefix_schedule<ts::cosine>);
static_assert(ts::prefix_schedule<ts::linear>);
static_assert(ts::prefix_schedule<ts::exponential>);
static_assert(ts::prefix_schedule<ts::step>);
static_assert(ts::prefix_schedule<ts::constant>);
static_assert(ts::prefix_schedule<ts::random_fraction<>>);
static_assert(ts::prefix_schedule<ts::random_fraction<ts::exponential>>);
static_assert(ts::alpha_schedule<ts::cosine> && !ts::alpha_schedule<ts::random_fraction<>>);
static_assert(!ts::prefix_schedule<ts::phase_switch>);
static_assert(!ts::prefix_schedule<int>);
static_assert(std::is_trivially_copyable_v<ts::random_fraction<>> && std::is_aggregate_v<ts::random_fraction<>>);

// ---------------------------------------------------------------------------------------
// Schedule values
// ---------------------------------------------------------------------------------------

TEST_CASE("schedules: cosine matches (1 + cos(pi i/N))/2 at i/N = 0, 1/4, 1/2, 3/4, 1") {
  const ts::cosine c;
  const double doc_rounded[5] = {1.00, 0.85, 0.50, 0.15, 0.00};  // method.md 4.4 (two decimals)
  const double four_decimals[5] = {1.0, 0.85355, 0.5, 0.14645, 0.0};
  for (long long N : {4LL, 8LL, 200LL, 1000LL, 4000000LL}) {
    for (int k = 0; k <= 4; ++k) {
      const long long i = k * N / 4;
      const long double expected = cosine_closed(static_cast<long double>(k) / 4.0L);
      const double a = c.alpha(i, N);
      CHECK(std::fabs(static_cast<long double>(a) - expected) <= 1e-12L);
      CHECK(std::fabs(a - four_decimals[k]) <= 5e-6);
      CHECK(std::fabs(a - doc_rounded[k]) <= 0.005);
      CHECK(c.fraction(point(i, N, 17, 3, 9)) == a);
    }
  }
  CHECK(c.alpha(0, 200) == 1.0);
  CHECK(c.alpha(200, 200) == 0.0);
  CHECK(c.alpha(250, 200) == 0.0);   // i >= N gives 0
  CHECK(c.alpha(-3, 200) == 1.0);    // before the run: t clamps to 0
  // A non-aligned point.
  CHECK(std::fabs(static_cast<long double>(c.alpha(37, 200)) - cosine_closed(37.0L / 200.0L)) <= 1e-12L);
}

TEST_CASE("schedules: linear, exponential, step, constant closed forms") {
  const long long N = 200;
  for (long long i : {0LL, 1LL, 37LL, 50LL, 100LL, 199LL, 200LL, 300LL}) {
    const long double t = i >= N ? 1.0L : static_cast<long double>(i) / N;
    CHECK(std::fabs(static_cast<long double>(ts::linear{}.alpha(i, N)) - (1.0L - t)) <= 1e-15L);
    for (double rate : {0.5, 3.0, 5.0}) {
      const ts::exponential plain{rate, false}, zeroed{rate, true};
      CHECK(std::fabs(static_cast<long double>(plain.alpha(i, N)) - std::exp(-static_cast<long double>(rate) * t)) <= 1e-14L);
      if (i >= N) {
        CHECK(zeroed.alpha(i, N) == 0.0);
      } else {
        CHECK(zeroed.alpha(i, N) == plain.alpha(i, N));
      }
    }
  }
  CHECK(ts::linear{}.alpha(-1, N) == 1.0);
  CHECK(ts::exponential{}.rate == 5.0);
  CHECK(std::fabs(ts::exponential{}.alpha(N, N) - std::exp(-5.0)) <= 1e-15);

  // step: high for i < f N, low from f N on.
  const ts::step s{0.3, 0.9, 0.2};
  CHECK(s.alpha(0, 10) == 0.9);
  CHECK(s.alpha(2, 10) == 0.9);
  CHECK(s.alpha(3, 10) == 0.2);  // 0.3 * 10 = 3 in exact arithmetic
  CHECK(s.alpha(10, 10) == 0.2);
  CHECK(s.alpha(11, 10) == 0.2);
  const ts::step half{};  // defaults 0.5, 1, 0
  CHECK(half.alpha(99, 200) == 1.0);
  CHECK(half.alpha(100, 200) == 0.0);
  CHECK(half.alpha(100, 201) == 1.0);  // 100 < 100.5
  CHECK(half.alpha(101, 201) == 0.0);
  CHECK(ts::step{0.0, 1.0, 0.0}.alpha(0, 10) == 0.0);
  CHECK(ts::step{1.0, 1.0, 0.0}.alpha(9, 10) == 1.0);
  CHECK(ts::step{1.0, 1.0, 0.0}.alpha(10, 10) == 0.0);

  CHECK(ts::constant{0.37}.alpha(5, 10) == 0.37);
  CHECK(ts::constant{0.37}.fraction(point(500, 10, 3, 4, 5)) == 0.37);
}

TEST_CASE("schedules: cosine, linear, exponential and step are non-increasing over a step sweep") {
  const ts::cosine c;
  const ts::linear l;
  const ts::exponential e1{2.0, false}, e2{7.5, true};
  const ts::step s1{}, s2{0.73, 0.8, 0.1};
  for (long long N : {1LL, 3LL, 10LL, 200LL, 997LL}) {
    double prev[6] = {2, 2, 2, 2, 2, 2};
    for (long long i = -2; i <= N + 3; ++i) {
      const double a[6] = {c.alpha(i, N), l.alpha(i, N), e1.alpha(i, N), e2.alpha(i, N), s1.alpha(i, N), s2.alpha(i, N)};
      for (int k = 0; k < 6; ++k) {
        CHECK(a[k] <= prev[k]);
        CHECK(a[k] >= 0.0);
        CHECK(a[k] <= 1.0);
        prev[k] = a[k];
      }
    }
    // Endpoints: everything starts at its top value and cosine/linear/zero_at_end reach 0.
    CHECK(c.alpha(0, N) == 1.0);
    CHECK(l.alpha(0, N) == 1.0);
    CHECK(e1.alpha(0, N) == 1.0);
    CHECK(c.alpha(N, N) == 0.0);
    CHECK(l.alpha(N, N) == 0.0);
    CHECK(e2.alpha(N, N) == 0.0);
  }
}

// ---------------------------------------------------------------------------------------
// Prefix length
// ---------------------------------------------------------------------------------------

TEST_CASE("schedules: prefix_length endpoints and rounding guard") {
  const auto per = ts::prefix_cap::per_sample_fraction;
  const auto glob = ts::prefix_cap::global_cap;
  for (long long L : {1LL, 2LL, 7LL, 20LL, 1000LL, 32768LL, 1000003LL}) {
    // alpha = 1 gives the full length, alpha = 0 gives 0, in both cap modes.
    CHECK(ts::prefix_length(ts::constant{1.0}, point(0, 10, L), per, 0) == L);
    CHECK(ts::prefix_length(ts::cosine{}, point(0, 10, L), per, 0) == L);
    CHECK(ts::prefix_length(ts::constant{0.0}, point(0, 10, L), per, 0) == 0);
    CHECK(ts::prefix_length(ts::cosine{}, point(10, 10, L), per, 0) == 0);
    CHECK(ts::prefix_length(ts::constant{1.0}, point(0, 10, L), glob, L + 5) == L);
    CHECK(ts::prefix_length(ts::constant{1.0}, point(0, 10, L), glob, L) == L);
    CHECK(ts::prefix_length(ts::constant{0.0}, point(0, 10, L), glob, L) == 0);
  }
  // Products that are integers in exact arithmetic floor to that integer.
  CHECK(ts::prefix_length(ts::constant{0.85}, point(0, 1, 20), per, 0) == 17);
  CHECK(ts::prefix_length(ts::constant{0.29}, point(0, 1, 100), per, 0) == 29);  // 0.29*100 = 28.999... in double
  CHECK(ts::prefix_length(ts::constant{0.57}, point(0, 1, 100), per, 0) == 57);
  CHECK(ts::prefix_length(ts::constant{0.15}, point(0, 1, 20), per, 0) == 3);
  CHECK(ts::prefix_length(ts::constant{0.29}, point(0, 1, 5000), glob, 100) == 29);
  // Cosine at i/N = 1/4 on L = 20: floor(20 * 0.853553...) = 17; at 3/4: floor(2.929) = 2.
  CHECK(ts::prefix_length(ts::cosine{}, point(50, 200, 20), per, 0) == 17);
  CHECK(ts::prefix_length(ts::cosine{}, point(100, 200, 20), per, 0) == 10);
  CHECK(ts::prefix_length(ts::cosine{}, point(150, 200, 20), per, 0) == 2);
  // Non-positive teacher lengths give 0.
  CHECK(ts::prefix_length(ts::constant{1.0}, point(0, 1, 0), per, 0) == 0);
  CHECK(ts::prefix_length(ts::constant{1.0}, point(0, 1, -4), per, 0) == 0);
  // Global cap: min(L, floor(alpha G)); G <= 0 gives 0.
  CHECK(ts::prefix_length(ts::constant{0.5}, point(0, 1, 100), glob, 40) == 20);
  CHECK(ts::prefix_length(ts::constant{0.5}, point(0, 1, 15), glob, 40) == 15);
  CHECK(ts::prefix_length(ts::constant{0.5}, point(0, 1, 15), glob, 0) == 0);
  CHECK(ts::prefix_length(ts::constant{0.5}, point(0, 1, 15), glob, -3) == 0);
  CHECK(ts::prefix_length(ts::constant{1.0}, point(0, 1, 15), glob, 1LL << 62) == 15);
  // Out-of-range fractions (a schedule that failed check()) are clamped; NaN counts as 0.
  CHECK(ts::prefix_length(ts::constant{1.5}, point(0, 1, 15), per, 0) == 15);
  CHECK(ts::prefix_length(ts::constant{-0.5}, point(0, 1, 15), per, 0) == 0);
  CHECK(ts::prefix_length(ts::constant{std::nan("")}, point(0, 1, 15), per, 0) == 0);
}

TEST_CASE("schedules: prefix_length is floor(alpha L) (or the global cap) and never exceeds L") {
  std::mt19937_64 rng(20261127);
  std::uniform_int_distribution<long long> len_d(0, 40000), n_d(1, 1000), id_d(0, 1 << 30);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  const ts::random_fraction<> rf{0.25, 0.75, {}};
  long long checked = 0;
  for (int trial = 0; trial < 4000; ++trial) {
    const long long N = n_d(rng);
    const long long i = static_cast<long long>(u01(rng) * 1.2 * static_cast<double>(N));
    const long long L = len_d(rng);
    const long long G = len_d(rng);
    const ts::schedule_point p = point(i, N, L, id_d(rng), rng());
    const long double t = i >= N ? 1.0L : static_cast<long double>(i) / N;
    const double cval = u01(rng);
    const ts::step st{u01(rng), 1.0, 0.25};
    const ts::exponential ex{0.1 + 9.0 * u01(rng), (trial & 1) != 0};
    const long double alpha[6] = {
        cosine_closed(t),
        1.0L - t,
        (ex.zero_at_end && i >= N) ? 0.0L : std::exp(-static_cast<long double>(ex.rate) * t),
        (static_cast<long double>(i) >= static_cast<long double>(st.switch_fraction) * N) ? 0.25L : 1.0L,
        static_cast<long double>(cval),
        0.0L,  // random_fraction: filled below from the documented closed form
    };
    long long got[6][2];
    for (int m = 0; m < 2; ++m) {
      const auto mode = m == 0 ? ts::prefix_cap::per_sample_fraction : ts::prefix_cap::global_cap;
      got[0][m] = ts::prefix_length(ts::cosine{}, p, mode, G);
      got[1][m] = ts::prefix_length(ts::linear{}, p, mode, G);
      got[2][m] = ts::prefix_length(ex, p, mode, G);
      got[3][m] = ts::prefix_length(st, p, mode, G);
      got[4][m] = ts::prefix_length(ts::constant{cval}, p, mode, G);
      got[5][m] = ts::prefix_length(rf, p, mode, G);
    }
    for (int k = 0; k < 6; ++k) {
      for (int m = 0; m < 2; ++m) {
        CHECK(got[k][m] >= 0);
        CHECK(got[k][m] <= L);
      }
    }
    // Exact comparison against the closed form where the step schedule's switch is not on a
    // rounding boundary and the product is not within 1e-8 of an integer.
    const long double sw = static_cast<long double>(st.switch_fraction) * N - static_cast<long double>(i);
    for (int k = 0; k < 5; ++k) {
      if (k == 3 && std::fabs(sw) < 1e-6L) continue;
      bool amb1 = false, amb2 = false;
      const long long e1 = floor_closed(alpha[k] * L, amb1);
      const long long e2 = std::min(L, floor_closed(alpha[k] * G, amb2));
      if (!amb1) { CHECK(got[k][0] == e1); ++checked; }
      if (!amb2) { CHECK(got[k][1] == e2); ++checked; }
    }
  }
  CHECK(checked > 35000);
}

// ---------------------------------------------------------------------------------------
// random_fraction
// ---------------------------------------------------------------------------------------

TEST_CASE("schedules: random_fraction is base alpha times U(lo, hi] keyed by (seed, step, sample id)") {
  const ts::random_fraction<> rf{0.2, 0.6, {}};
  const long long N = 200;
  // The documented key: (seed, step, sequence = sample_id, position = 0, stream = prefix_fraction).
  for (long long id : {0LL, 1LL, 12345LL}) {
    const ts::schedule_point p = point(50, N, 100, id, 0xC0FFEEULL);
    const long double u = tropd::uniform_open0_closed1(tropd::draw_key{0xC0FFEEULL, 50, static_cast<uint64_t>(id), 0,
                                                                       tropd::streams::prefix_fraction});
    const long double expected = cosine_closed(0.25L) * (0.2L + 0.4L * u);
    CHECK(std::fabs(static_cast<long double>(rf.fraction(p)) - expected) <= 1e-12L);
  }
  // Reproducible, and different for another seed / sample id / step.
  const ts::schedule_point p = point(50, N, 100, 7, 42);
  CHECK(rf.fraction(p) == rf.fraction(p));
  CHECK(rf.fraction(p) == ts::random_fraction<>{0.2, 0.6, {}}.fraction(point(50, N, 999, 7, 42)));  // L does not matter
  CHECK(rf.fraction(p) != rf.fraction(point(50, N, 100, 7, 43)));
  CHECK(rf.fraction(p) != rf.fraction(point(50, N, 100, 8, 42)));
  CHECK(rf.fraction(p) != rf.fraction(point(51, N, 100, 7, 42)));
  // Always 0 once the cosine base reaches 0; within (lo, hi] * base otherwise.
  CHECK(rf.fraction(point(N, N, 100, 7, 42)) == 0.0);
  for (long long id = 0; id < 2000; ++id) {
    const double f = rf.fraction(point(0, N, 100, id, 42));  // base alpha = 1
    CHECK(f > 0.2);
    CHECK(f <= 0.6);
  }
  // lo == hi is deterministic.
  CHECK(ts::random_fraction<>{0.4, 0.4, {}}.fraction(point(0, N, 1, 99, 1)) == 0.4);
  // Another base.
  const ts::random_fraction<ts::linear> rl{0.0, 1.0, {}};
  const long double u = tropd::uniform_open0_closed1(tropd::draw_key{5, 30, 2, 0, tropd::streams::prefix_fraction});
  CHECK(std::fabs(static_cast<long double>(rl.fraction(point(30, 120, 0, 2, 5))) - 0.75L * u) <= 1e-15L);
}

TEST_CASE("schedules: random_fraction Monte Carlo mean matches base alpha * (lo + hi) / 2") {
  struct cfg { double lo, hi; long long i, N; uint64_t seed; };
  for (const cfg c : {cfg{0.0, 1.0, 0, 200, 1}, cfg{0.2, 0.6, 50, 200, 2}, cfg{0.5, 0.9, 137, 200, 3}, cfg{0.1, 0.3, 3, 4, 4}}) {
    const ts::random_fraction<> rf{c.lo, c.hi, {}};
    const long long M = 200000;
    long double sum = 0;
    for (long long id = 0; id < M; ++id) sum += rf.fraction(point(c.i, c.N, 0, id, c.seed));
    const long double mean = sum / M;
    const long double base = cosine_closed(static_cast<long double>(c.i) / c.N);
    const long double expected = base * (c.lo + c.hi) / 2.0L;
    const long double se = base * (c.hi - c.lo) / std::sqrt(12.0L) / std::sqrt(static_cast<long double>(M));
    CHECK(std::fabs(mean - expected) <= 5.0L * se);
    CHECK(std::fabs(static_cast<long double>(rf.mean_alpha(c.i, c.N)) - expected) <= 1e-12L);
  }
}

// ---------------------------------------------------------------------------------------
// Parameter checks, phase switch
// ---------------------------------------------------------------------------------------

TEST_CASE("schedules: check() accepts valid and rejects invalid parameters") {
  const double nan = std::nan("");
  const double inf = HUGE_VAL;
  CHECK(ts::cosine{}.check().ok());
  CHECK(ts::linear{}.check().ok());
  CHECK(ts::exponential{}.check().ok());
  CHECK(ts::step{}.check().ok());
  CHECK(ts::constant{}.check().ok());
  CHECK(ts::random_fraction<>{}.check().ok());
  CHECK(ts::constant{0.0}.check().ok());
  CHECK(ts::constant{1.0}.check().ok());
  CHECK(ts::random_fraction<>{0.3, 0.3, {}}.check().ok());

  for (double r : {0.0, -1.0, nan, inf}) CHECK(ts::exponential{r, false}.check().code == errc::invalid_parameter);
  for (double v : {-0.01, 1.01, nan}) {
    CHECK(ts::constant{v}.check().code == errc::invalid_parameter);
    CHECK(ts::step{v, 1.0, 0.0}.check().code == errc::invalid_parameter);
    CHECK(ts::step{0.5, v, 0.0}.check().code == errc::invalid_parameter);
    CHECK(ts::step{0.5, 1.0, v}.check().code == errc::invalid_parameter);
    CHECK(ts::random_fraction<>{v, 1.0, {}}.check().code == errc::invalid_parameter);
    CHECK(ts::random_fraction<>{0.0, v, {}}.check().code == errc::invalid_parameter);
  }
  CHECK(ts::random_fraction<>{0.7, 0.3, {}}.check().code == errc::invalid_parameter);  // lo > hi
  CHECK(ts::random_fraction<ts::exponential>{0.1, 0.3, {-2.0, false}}.check().code == errc::invalid_parameter);  // bad base
  const auto msg = ts::random_fraction<>{0.7, 0.3, {}}.check().message();
  CHECK(msg.find("lo must be <= hi") != std::string::npos);
  CHECK(ts::phase_switch{-1}.check().code == errc::invalid_parameter);
  CHECK(ts::phase_switch{0}.check().ok());
}

TEST_CASE("schedules: phase_switch and REOPOLD's default switch step") {
  const ts::phase_switch ps{ts::reopold_default_switch(200)};
  CHECK(ps.switch_step == 100);
  CHECK(ps.phase(0) == 0);
  CHECK(ps.phase(99) == 0);
  CHECK(ps.phase(100) == 1);
  CHECK(ps.phase(500) == 1);
  CHECK(ts::reopold_default_switch(201) == 100);
  CHECK(ts::reopold_default_switch(1) == 0);
  CHECK(ts::phase_switch{0}.phase(0) == 1);
  static_assert(ts::phase_switch{10}.phase(9) == 0 && ts::phase_switch{10}.phase(10) == 1);
}

// ---------------------------------------------------------------------------------------
// Batch plan
// ---------------------------------------------------------------------------------------

namespace {

constexpr int32_t eos = 2;

ts::plan_options options(long long step, long long total, long long n) {
  ts::plan_options o;
  o.step = step;
  o.total_steps = total;
  o.n = n;
  o.end_token = eos;
  o.seed = 7;
  return o;
}

std::vector<origin> repeat(std::initializer_list<std::pair<origin, int>> runs) {
  std::vector<origin> v;
  for (const auto& [o, k] : runs) v.insert(v.end(), static_cast<size_t>(k), o);
  return v;
}

}  // namespace

TEST_CASE("plan: two prompts, n = 2, constant 0.5: samples, origins, offsets, seq ids") {
  // prompt A = [10, 11], response A = [20, 21, 22, 23, eos] -> L_T = 4, l = floor(0.5 * 4) = 2
  // prompt B = [12],     response B = [30, 31, 32]        -> L_T = 3, l = floor(1.5) = 1
  const std::vector<ts::prompt_example> prompts = {
      {{10, 11}, {20, 21, 22, 23, eos}, -1},
      {{12}, {30, 31, 32}, -1},
  };
  ts::batch_plan plan;
  REQUIRE(ts::make_plan(ts::constant{0.5}, prompts, options(3, 10, 2), plan).ok());
  CHECK(plan.teacher_length == std::vector<tropd::index_t>{4, 3});
  CHECK(plan.prefix_length == std::vector<tropd::index_t>{2, 1});
  CHECK(plan.fraction == std::vector<double>{0.5, 0.5});
  CHECK(plan.sample_id == std::vector<long long>{0, 1});
  REQUIRE(plan.num_sequences() == 6);
  CHECK(plan.num_off_policy() == 2);
  CHECK(plan.num_on_policy() == 4);
  CHECK(plan.on_policy == std::vector<tropd::index_t>{1, 2, 4, 5});
  const ts::sample_kind OFF = ts::sample_kind::off_policy, ON = ts::sample_kind::on_policy;
  const ts::sample_kind kinds[6] = {OFF, ON, ON, OFF, ON, ON};
  const tropd::index_t prompt_of[6] = {0, 0, 0, 1, 1, 1};
  const tropd::index_t rollout[6] = {-1, 0, 1, -1, 0, 1};
  for (int j = 0; j < 6; ++j) {
    CHECK(plan.samples[j].kind == kinds[j]);
    CHECK(plan.samples[j].prompt == prompt_of[j]);
    CHECK(plan.samples[j].rollout == rollout[j]);
  }
  CHECK(plan.samples[0].tokens == std::vector<int32_t>{10, 11, 20, 21});
  CHECK(plan.samples[0].prompt_length == 2);
  CHECK(plan.samples[0].prefix_length == 2);
  CHECK(plan.context(0) == std::vector<int32_t>{10, 11, 20, 21});
  CHECK(plan.context(1) == std::vector<int32_t>{10, 11, 20, 21});
  CHECK(plan.context(2) == std::vector<int32_t>{12, 30});
  CHECK(plan.context(3) == std::vector<int32_t>{12, 30});

  const std::vector<std::vector<int32_t>> cont = {{40, eos}, {41, 42, eos}, {43}, {}};
  ts::assembled_batch b;
  REQUIRE(ts::assemble_batch(plan, cont, b).ok());
  const std::vector<int32_t> tokens = {
      10, 11, 20, 21,            // off-policy A
      10, 11, 20, 21, 40, eos,   // on-policy A0
      10, 11, 20, 21, 41, 42, eos,  // on-policy A1
      12, 30,                    // off-policy B
      12, 30, 43,                // on-policy B0
      12, 30,                    // on-policy B1 (empty continuation)
  };
  CHECK(b.tokens == tokens);
  const origin P = origin::prompt, T = origin::teacher, S = origin::student;
  CHECK(b.origin == repeat({{P, 2}, {T, 2},            // off A
                            {P, 4}, {S, 2},            // A0: prompt + shared prefix are context
                            {P, 4}, {S, 3},            // A1
                            {P, 1}, {T, 1},            // off B
                            {P, 2}, {S, 1},            // B0
                            {P, 2}}));                 // B1
  CHECK(b.seq_offsets == std::vector<tropd::index_t>{0, 4, 10, 17, 19, 22, 24});
  CHECK(b.sample_prompt == std::vector<tropd::index_t>{0, 0, 0, 1, 1, 1});
  CHECK(b.seq_kind == std::vector<ts::sample_kind>{OFF, ON, ON, OFF, ON, ON});
  std::vector<uint64_t> ids;
  for (uint64_t j = 0; j < 6; ++j) ids.push_back(3ULL * 1'000'003ULL + j);
  CHECK(b.seq_ids == ids);
}

TEST_CASE("plan: empty teacher response and an end-token-only response give no off-policy sample") {
  const std::vector<ts::prompt_example> prompts = {
      {{10}, {}, -1},
      {{11, 12}, {eos}, -1},
      {{13}, {50, 51}, -1},
  };
  ts::batch_plan plan;
  REQUIRE(ts::make_plan(ts::cosine{}, prompts, options(0, 100, 1), plan).ok());  // alpha = 1
  CHECK(plan.teacher_length == std::vector<tropd::index_t>{0, 0, 2});
  CHECK(plan.prefix_length == std::vector<tropd::index_t>{0, 0, 2});
  REQUIRE(plan.num_sequences() == 4);  // on0, on1, off2, on2
  CHECK(plan.num_off_policy() == 1);
  CHECK(plan.samples[0].kind == ts::sample_kind::on_policy);
  CHECK(plan.samples[1].kind == ts::sample_kind::on_policy);
  CHECK(plan.samples[2].kind == ts::sample_kind::off_policy);
  CHECK(plan.context(0) == std::vector<int32_t>{10});
  CHECK(plan.context(1) == std::vector<int32_t>{11, 12});  // the end token is not a prefix token
  CHECK(plan.context(2) == std::vector<int32_t>{13, 50, 51});

  ts::assembled_batch b;
  REQUIRE(ts::assemble_batch(plan, {{{60}, {61, 62}, {63}}}, b).ok());
  CHECK(b.tokens == std::vector<int32_t>{10, 60, 11, 12, 61, 62, 13, 50, 51, 13, 50, 51, 63});
  const origin P = origin::prompt, T = origin::teacher, S = origin::student;
  CHECK(b.origin == repeat({{P, 1}, {S, 1}, {P, 2}, {S, 2}, {P, 1}, {T, 2}, {P, 3}, {S, 1}}));
  CHECK(b.seq_offsets == std::vector<tropd::index_t>{0, 2, 6, 9, 13});
  CHECK(b.sample_prompt == std::vector<tropd::index_t>{0, 1, 2, 2});
}

TEST_CASE("plan: the end token is stripped once, only when trailing") {
  const std::vector<ts::prompt_example> prompts = {
      {{1}, {5, 6, 7, eos}, -1},      // L_T = 3
      {{1}, {5, eos, 7}, -1},         // eos inside: content, L_T = 3
      {{1}, {5, 6, eos, eos}, -1},    // only one trailing eos stripped: L_T = 3
  };
  ts::batch_plan plan;
  REQUIRE(ts::make_plan(ts::constant{1.0}, prompts, options(0, 10, 0), plan).ok());
  CHECK(plan.teacher_length == std::vector<tropd::index_t>{3, 3, 3});
  CHECK(plan.prefix_length == std::vector<tropd::index_t>{3, 3, 3});
  CHECK(plan.samples[0].tokens == std::vector<int32_t>{1, 5, 6, 7});
  CHECK(plan.samples[1].tokens == std::vector<int32_t>{1, 5, eos, 7});
  CHECK(plan.samples[2].tokens == std::vector<int32_t>{1, 5, 6, eos});
  // Without an end token, nothing is stripped.
  ts::plan_options o = options(0, 10, 0);
  o.end_token = ts::no_end_token;
  REQUIRE(ts::make_plan(ts::constant{1.0}, prompts, o, plan).ok());
  CHECK(plan.teacher_length == std::vector<tropd::index_t>{4, 3, 4});
}

TEST_CASE("plan: a prefix covering the whole response; continuation starts right after it") {
  const std::vector<ts::prompt_example> prompts = {{{9, 8}, {70, 71, 72, eos}, -1}};
  ts::batch_plan plan;
  REQUIRE(ts::make_plan(ts::cosine{}, prompts, options(0, 50, 1), plan).ok());
  CHECK(plan.prefix_length[0] == 3);
  ts::assembled_batch b;
  REQUIRE(ts::assemble_batch(plan, {{{80, 81, eos}}}, b).ok());
  CHECK(b.tokens == std::vector<int32_t>{9, 8, 70, 71, 72, /**/ 9, 8, 70, 71, 72, 80, 81, eos});
  const origin P = origin::prompt, T = origin::teacher, S = origin::student;
  CHECK(b.origin == repeat({{P, 2}, {T, 3}, {P, 5}, {S, 3}}));
  CHECK(b.seq_offsets == std::vector<tropd::index_t>{0, 5, 13});
}

TEST_CASE("plan: n = 0 gives only off-policy samples") {
  const std::vector<ts::prompt_example> prompts = {{{1}, {3, 4, 5, 6}, -1}, {{2}, {}, -1}};
  ts::batch_plan plan;
  REQUIRE(ts::make_plan(ts::linear{}, prompts, options(1, 4, 0), plan).ok());  // alpha = 3/4: l = 3
  CHECK(plan.prefix_length == std::vector<tropd::index_t>{3, 0});
  CHECK(plan.num_sequences() == 1);
  CHECK(plan.num_on_policy() == 0);
  ts::assembled_batch b;
  REQUIRE(ts::assemble_batch(plan, {}, b).ok());
  CHECK(b.tokens == std::vector<int32_t>{1, 3, 4, 5});
  CHECK(b.origin == repeat({{origin::prompt, 1}, {origin::teacher, 3}}));
  CHECK(b.seq_offsets == std::vector<tropd::index_t>{0, 4});
  CHECK(b.sample_prompt == std::vector<tropd::index_t>{0});
  CHECK(b.seq_ids == std::vector<uint64_t>{1'000'003ULL});
  // A continuation for a plan without on-policy contexts is a mismatch.
  CHECK(ts::assemble_batch(plan, {{{7}}}, b).code == errc::shape_mismatch);
  // And an all-empty-response batch with n = 0 is a plan with no sequences.
  const std::vector<ts::prompt_example> empty_resp = {{{1}, {}, -1}};
  REQUIRE(ts::make_plan(ts::cosine{}, empty_resp, options(0, 4, 0), plan).ok());
  CHECK(plan.num_sequences() == 0);
  REQUIRE(ts::assemble_batch(plan, {}, b).ok());
  CHECK(b.tokens.empty());
  CHECK(b.seq_offsets == std::vector<tropd::index_t>{0});
}

TEST_CASE("plan: global cap, seq id offset and stride") {
  const std::vector<ts::prompt_example> prompts = {{{1}, std::vector<int32_t>(100, 5), -1},
                                                   {{1}, std::vector<int32_t>(10, 6), -1}};
  ts::plan_options o = options(2, 4, 1);  // cosine alpha(1/2) = 0.5
  o.cap = ts::prefix_cap::global_cap;
  o.global_max = 30;  // min(L, floor(0.5 * 30)) = 15 and 10
  o.seq_id_stride = 1000;
  o.seq_id_offset = 500;
  ts::batch_plan plan;
  REQUIRE(ts::make_plan(ts::cosine{}, prompts, o, plan).ok());
  CHECK(plan.prefix_length == std::vector<tropd::index_t>{15, 10});
  ts::assembled_batch b;
  REQUIRE(ts::assemble_batch(plan, {{{9}, {9}}}, b).ok());
  CHECK(b.seq_ids == std::vector<uint64_t>{2500, 2501, 2502, 2503});
  // Per-sample fraction on the same inputs: floor(0.5 L) = 50 and 5.
  o.cap = ts::prefix_cap::per_sample_fraction;
  REQUIRE(ts::make_plan(ts::cosine{}, prompts, o, plan).ok());
  CHECK(plan.prefix_length == std::vector<tropd::index_t>{50, 5});
  // Too many sequences for the stride: 4 sequences from offset 997 do not fit in 1000.
  o.seq_id_offset = 997;
  CHECK(ts::make_plan(ts::cosine{}, prompts, o, plan).code == errc::invalid_parameter);
  o.seq_id_offset = 996;
  CHECK(ts::make_plan(ts::cosine{}, prompts, o, plan).ok());
}

TEST_CASE("plan: the same seed gives an identical plan; sample ids key the random fraction") {
  std::vector<ts::prompt_example> prompts;
  for (int i = 0; i < 64; ++i) prompts.push_back({{1, 2}, std::vector<int32_t>(200 + i, 3), -1});
  const ts::random_fraction<> rf{0.0, 1.0, {}};
  ts::batch_plan a, b, c;
  ts::plan_options o = options(10, 200, 2);
  REQUIRE(ts::make_plan(rf, prompts, o, a).ok());
  REQUIRE(ts::make_plan(rf, prompts, o, b).ok());
  CHECK(a.prefix_length == b.prefix_length);
  CHECK(a.fraction == b.fraction);
  REQUIRE(a.samples.size() == b.samples.size());
  for (size_t j = 0; j < a.samples.size(); ++j) {
    CHECK(a.samples[j].tokens == b.samples[j].tokens);
    CHECK(a.samples[j].kind == b.samples[j].kind);
  }
  o.seed = 8;
  REQUIRE(ts::make_plan(rf, prompts, o, c).ok());
  CHECK(a.prefix_length != c.prefix_length);
  // The prefix follows the documented closed form for each prompt's sample id.
  for (int i = 0; i < 64; ++i) {
    const long double u = tropd::uniform_open0_closed1(tropd::draw_key{7, 10, static_cast<uint64_t>(i), 0,
                                                                       tropd::streams::prefix_fraction});
    bool amb = false;
    const long long e = floor_closed(cosine_closed(10.0L / 200.0L) * u * (200 + i), amb);
    if (!amb) CHECK(a.prefix_length[static_cast<size_t>(i)] == e);
  }
  // An explicit sample id replaces the batch index: prompt 5 moved to index 0 keeps its prefix.
  std::vector<ts::prompt_example> moved = {prompts[5]};
  moved[0].sample_id = 5;
  REQUIRE(ts::make_plan(rf, moved, options(10, 200, 2), c).ok());
  CHECK(c.prefix_length[0] == a.prefix_length[5]);
  CHECK(c.sample_id[0] == 5);
}

TEST_CASE("plan: malformed input is rejected and leaves the output untouched") {
  const std::vector<ts::prompt_example> good = {{{1, 2}, {3, 4, eos}, -1}};
  ts::batch_plan plan;
  REQUIRE(ts::make_plan(ts::constant{1.0}, good, options(0, 10, 2), plan).ok());
  const auto before = plan.prefix_length;

  auto code = [&](auto sched, const std::vector<ts::prompt_example>& ps, ts::plan_options o) {
    return ts::make_plan(sched, ps, o, plan).code;
  };
  ts::plan_options o = options(0, 10, 2);
  o.total_steps = 0;
  CHECK(code(ts::cosine{}, good, o) == errc::invalid_parameter);
  o = options(-1, 10, 2);
  CHECK(code(ts::cosine{}, good, o) == errc::invalid_parameter);
  o = options(0, 10, -1);
  CHECK(code(ts::cosine{}, good, o) == errc::invalid_parameter);
  o = options(0, 10, 2);
  o.cap = ts::prefix_cap::global_cap;
  o.global_max = -1;
  CHECK(code(ts::cosine{}, good, o) == errc::invalid_parameter);
  o = options(0, 10, 2);
  o.seq_id_stride = 0;
  CHECK(code(ts::cosine{}, good, o) == errc::invalid_parameter);
  CHECK(code(ts::constant{2.0}, good, options(0, 10, 2)) == errc::invalid_parameter);
  CHECK(code(ts::exponential{0.0, false}, good, options(0, 10, 2)) == errc::invalid_parameter);
  CHECK(code(ts::random_fraction<>{0.9, 0.1, {}}, good, options(0, 10, 2)) == errc::invalid_parameter);
  CHECK(code(ts::cosine{}, {}, options(0, 10, 2)) == errc::empty_batch);
  const auto empty_prompt = ts::make_plan(ts::cosine{}, std::vector<ts::prompt_example>{{{1}, {3}, -1}, {{}, {3}, -1}},
                                          options(0, 10, 2), plan);
  CHECK(empty_prompt.code == errc::empty_batch);
  CHECK(empty_prompt.row == 1);
  const auto neg = ts::make_plan(ts::cosine{}, std::vector<ts::prompt_example>{{{1}, {3, -4}, -1}}, options(0, 10, 2), plan);
  CHECK(neg.code == errc::id_out_of_range);
  CHECK(neg.row == 0);
  CHECK(neg.col == 1);
  o = options(0, 10, 2);
  o.vocab_size = 4;  // the response holds id 4
  CHECK(code(ts::cosine{}, good, o) == errc::id_out_of_range);
  // Nothing above touched the plan.
  CHECK(plan.prefix_length == before);
  CHECK(plan.num_sequences() == 3);
  o.vocab_size = 5;
  REQUIRE(code(ts::cosine{}, good, o) == errc::ok);

  // assemble_batch: count mismatch and bad ids; the output stays untouched.
  ts::assembled_batch b;
  REQUIRE(ts::assemble_batch(plan, {{{1}, {2}}}, b).ok());
  const auto tokens_before = b.tokens;
  CHECK(ts::assemble_batch(plan, {{{1}}}, b).code == errc::shape_mismatch);
  CHECK(ts::assemble_batch(plan, {{{1}, {2}, {3}}}, b).code == errc::shape_mismatch);
  const auto bad = ts::assemble_batch(plan, {{{1}, {2, 5}}}, b);  // 5 >= vocab_size
  CHECK(bad.code == errc::id_out_of_range);
  CHECK(bad.row == 1);
  CHECK(bad.col == 1);
  CHECK(ts::assemble_batch(plan, {{{-1}, {2}}}, b).code == errc::id_out_of_range);
  CHECK(b.tokens == tokens_before);
}
