// tropd/core/random.hpp: counter-based random numbers (Philox4x32-10).
//
// Stochastic rules (the trust-region acceptance test, random prefix fractions) draw
// from Philox4x32-10 (Salmon et al., SC'11) keyed by the user's seed and countered by
// (step, sequence, position, stream). The same key and counter give the same number on
// the CPU and the GPU, in any thread order and on any rerun. Tests check this
// implementation against Random123's published known-answer vectors.
#pragma once

#include <stdint.h>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>

namespace tropd {

struct philox4x32_10 {
  struct ctr_type { uint32_t v[4]; };
  struct key_type { uint32_t v[2]; };

  /// One Philox4x32 bijection with 10 rounds.
  TROPD_HD static constexpr ctr_type apply(ctr_type c, key_type k) noexcept {
    constexpr uint32_t m0 = 0xD2511F53u, m1 = 0xCD9E8D57u;
    constexpr uint32_t w0 = 0x9E3779B9u, w1 = 0xBB67AE85u;
    for (int r = 0; r < 10; ++r) {
      if (r > 0) {
        k.v[0] += w0;
        k.v[1] += w1;
      }
      const uint64_t p0 = static_cast<uint64_t>(m0) * c.v[0];
      const uint64_t p1 = static_cast<uint64_t>(m1) * c.v[2];
      const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
      const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
      c = ctr_type{{hi1 ^ c.v[1] ^ k.v[0], lo1, hi0 ^ c.v[3] ^ k.v[1], lo0}};
    }
    return c;
  }
};

/// Identifies one random draw: a user seed plus a 4-part counter.
struct draw_key {
  uint64_t seed = 0;
  uint64_t step = 0;      ///< optimiser step (or any user-chosen epoch counter)
  uint64_t sequence = 0;  ///< global sequence id (not the position inside a micro-batch)
  uint64_t position = 0;  ///< token position inside the sequence
  uint32_t stream = 0;    ///< which rule draws (so two rules never share numbers)
};

/// Stream ids used by tropd's own rules.
namespace streams {
inline constexpr uint32_t trust_region = 0x7472u;   // "tr"
inline constexpr uint32_t prefix_fraction = 0x7066u; // "pf"
}  // namespace streams

/// 64 random bits from Philox keyed by `k` (words 0 and 1 of the output block).
/// The counter packs step, sequence and position (32 bits each) and the stream word, into
/// which the high halves of step, sequence and position are folded; the key is the seed.
TROPD_HD inline uint64_t random_bits64(const draw_key& k) noexcept {
  philox4x32_10::ctr_type c{{static_cast<uint32_t>(k.step), static_cast<uint32_t>(k.sequence),
                             static_cast<uint32_t>(k.position),
                             k.stream ^ static_cast<uint32_t>(k.step >> 32) ^
                                 static_cast<uint32_t>(k.sequence >> 32) * 0x9E3779B9u ^
                                 static_cast<uint32_t>(k.position >> 32) * 0x85EBCA6Bu}};
  philox4x32_10::key_type key{{static_cast<uint32_t>(k.seed), static_cast<uint32_t>(k.seed >> 32)}};
  const auto r = philox4x32_10::apply(c, key);
  return (static_cast<uint64_t>(r.v[0]) << 32) | r.v[1];
}

/// A uniform double in (0, 1]: the top 53 bits of random_bits64, plus one, times 2^-53.
TROPD_HD inline double uniform_open0_closed1(const draw_key& k) noexcept {
  const uint64_t bits = random_bits64(k) >> 11;
  return (static_cast<double>(bits) + 1.0) * 0x1.0p-53;
}

/// log of uniform_open0_closed1 (in [-36.8, 0]).
TROPD_HD inline double log_uniform(const draw_key& k) noexcept { return log_(uniform_open0_closed1(k)); }

}  // namespace tropd
