// Counter-based random numbers (core/random.hpp): Philox4x32-10 against Random123's
// published known answers and its implementation, and the packing of a draw_key (seed, step,
// sequence, position, stream) into Philox's key and counter against an independent packing
// on top of Random123 (tests/reference/philox_key.hpp).
#include <stdint.h>

#include <Random123/philox.h>

#include <cmath>
#include <random>

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

#include "reference/philox_key.hpp"

// ---------------------------------------------------------------------------
// Philox4x32-10
// ---------------------------------------------------------------------------

namespace {
void check_philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  r123::Philox4x32 ref;
  r123::Philox4x32::ctr_type rc = {{c0, c1, c2, c3}};
  r123::Philox4x32::key_type rk = {{k0, k1}};
  const auto want = ref(rc, rk);
  const auto got = tropd::philox4x32_10::apply({{c0, c1, c2, c3}}, {{k0, k1}});
  for (int i = 0; i < 4; ++i) CHECK(got.v[i] == want.v[i]);
}
}  // namespace

TEST_CASE("random: philox4x32_10 matches Random123's Philox4x32") {
  // Random123's known-answer vectors (kat_vectors: philox4x32 10 rounds).
  {
    const auto r = tropd::philox4x32_10::apply({{0, 0, 0, 0}}, {{0, 0}});
    CHECK(r.v[0] == 0x6627e8d5u);
    CHECK(r.v[1] == 0xe169c58du);
    CHECK(r.v[2] == 0xbc57ac4cu);
    CHECK(r.v[3] == 0x9b00dbd8u);
  }
  {
    const auto r = tropd::philox4x32_10::apply({{~0u, ~0u, ~0u, ~0u}}, {{~0u, ~0u}});
    CHECK(r.v[0] == 0x408f276du);
    CHECK(r.v[1] == 0x41c83b0eu);
    CHECK(r.v[2] == 0xa20bc7c6u);
    CHECK(r.v[3] == 0x6d5451fdu);
  }
  {
    const auto r = tropd::philox4x32_10::apply({{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
                                               {{0xa4093822u, 0x299f31d0u}});
    CHECK(r.v[0] == 0xd16cfe09u);
    CHECK(r.v[1] == 0x94fdccebu);
    CHECK(r.v[2] == 0x5001e420u);
    CHECK(r.v[3] == 0x24126ea1u);
  }
  check_philox(0, 0, 0, 0, 0, 0);
  check_philox(1, 0, 0, 0, 0, 0);
  check_philox(0, 0, 0, 1, 0, 0);
  check_philox(0, 0, 0, 0, 0, 1);
  check_philox(~0u, ~0u, ~0u, ~0u, ~0u, ~0u);
  std::mt19937_64 rng(2024);
  std::uniform_int_distribution<uint32_t> u32;
  for (int i = 0; i < 64; ++i) check_philox(u32(rng), u32(rng), u32(rng), u32(rng), u32(rng), u32(rng));
}

TEST_CASE("random: uniform_open0_closed1 lies in (0, 1], is deterministic and roughly uniform") {
  const int n = 200000;
  double sum = 0, sum_sq = 0;
  int below_quarter = 0, out_of_range = 0;
  tropd::draw_key k;
  k.seed = 0x123456789abcdefull;
  k.step = 3;
  k.stream = tropd::streams::trust_region;
  for (int i = 0; i < n; ++i) {
    k.sequence = static_cast<uint64_t>(i / 1000);
    k.position = static_cast<uint64_t>(i % 1000);
    const double u = tropd::uniform_open0_closed1(k);
    if (!(u > 0.0 && u <= 1.0)) ++out_of_range;
    sum += u;
    sum_sq += u * u;
    below_quarter += u < 0.25;
  }
  CHECK(out_of_range == 0);
  const double mean = sum / n;
  const double sigma = std::sqrt(1.0 / 12.0 / n);
  CHECK(std::fabs(mean - 0.5) < 5 * sigma);
  // E[u^2] = 1/3, Var[u^2] = 1/5 - 1/9.
  CHECK(std::fabs(sum_sq / n - 1.0 / 3.0) < 5 * std::sqrt((0.2 - 1.0 / 9.0) / n));
  CHECK(std::fabs(below_quarter / double(n) - 0.25) < 5 * std::sqrt(0.25 * 0.75 / n));

  tropd::draw_key a{42, 7, 8, 9, tropd::streams::trust_region};
  const double ua = tropd::uniform_open0_closed1(a);
  CHECK(tropd::uniform_open0_closed1(a) == ua);  // same key, same number
  tropd::draw_key b = a;
  b.stream = tropd::streams::prefix_fraction;
  CHECK(tropd::uniform_open0_closed1(b) != ua);
  tropd::draw_key c = a;
  c.step += 1ull << 32;  // high bits of the step are folded in, not dropped
  CHECK(tropd::uniform_open0_closed1(c) != ua);
  tropd::draw_key d = a;
  d.seed += 1ull << 32;  // both halves of the seed key the generator
  CHECK(tropd::uniform_open0_closed1(d) != ua);
  CHECK(tropd::log_uniform(a) <= 0.0);
  CHECK(std::fabs(tropd::log_uniform(a) - std::log(ua)) <= 1e-15);
}

// ---------------------------------------------------------------------------
// draw_key: how (seed, step, sequence, position, stream) key and counter Philox
// ---------------------------------------------------------------------------

TEST_CASE("random: draw_key's packing into Philox's key and counter against Random123 (known answers)") {
  namespace pk = tropd_test::philox_key;
  CHECK(tropd::streams::trust_region == 0x7472u);
  CHECK(tropd::streams::prefix_fraction == 0x7066u);
  // Stored answers (Random123 alone): pairs of rows differ only by a swap of sequence and
  // position, or of seed and step, so a packing that mixes them up fails a row directly.
  for (const pk::known_answer& k : pk::trust_region_answers) {
    CAPTURE(k.seed);
    CAPTURE(k.step);
    CAPTURE(k.sequence);
    CAPTURE(k.position);
    const tropd::draw_key key{k.seed, k.step, k.sequence, k.position, tropd::streams::trust_region};
    CHECK(tropd::random_bits64(key) == k.bits);
    CHECK(static_cast<long double>(tropd::uniform_open0_closed1(key)) == pk::uniform(k.bits));
    CHECK(std::fabs(static_cast<long double>(tropd::log_uniform(key)) - std::log(pk::uniform(k.bits))) <= 1e-15L);
  }
  // Random keys, both streams and an arbitrary one, high words in every field.
  std::mt19937_64 rng(4711);
  for (int i = 0; i < 2000; ++i) {
    const uint64_t seed = rng(), step = i % 3 ? rng() : rng() & 0xffff, sequence = i % 5 ? rng() : rng() & 0xff,
                   position = i % 2 ? rng() : rng() & 0xfff;
    for (uint32_t stream : {tropd::streams::trust_region, tropd::streams::prefix_fraction, static_cast<uint32_t>(rng())}) {
      const tropd::draw_key key{seed, step, sequence, position, stream};
      const uint64_t want = pk::bits(seed, step, sequence, position, stream);
      if (tropd::random_bits64(key) != want) {
        CAPTURE(seed);
        CAPTURE(step);
        CAPTURE(sequence);
        CAPTURE(position);
        CAPTURE(stream);
        CHECK(tropd::random_bits64(key) == want);
      }
      CHECK(static_cast<long double>(tropd::uniform_open0_closed1(key)) == pk::uniform(want));
    }
  }
  // Swapping two fields of a key changes the draw (here, for every pair of distinct values).
  const tropd::draw_key a{11, 22, 33, 44, tropd::streams::trust_region};
  CHECK(tropd::random_bits64(a) != tropd::random_bits64({11, 22, 44, 33, tropd::streams::trust_region}));
  CHECK(tropd::random_bits64(a) != tropd::random_bits64({22, 11, 33, 44, tropd::streams::trust_region}));
  CHECK(tropd::random_bits64(a) != tropd::random_bits64({11, 33, 22, 44, tropd::streams::trust_region}));
}
