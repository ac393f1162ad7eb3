// tests/reference/philox_key.hpp: the random draws of tropd's stochastic rules written
// independently of include/tropd/core/random.hpp, from its documentation only, on top of
// Random123's Philox4x32-10 (r123::Philox4x32, Debian's librandom123-dev): the key is the
// seed's low and high words; the counter is the low words of step, sequence and position
// and a fourth word holding the stream id with the high words of step, sequence and
// position folded in (step's as is, sequence's times 0x9E3779B9, position's times
// 0x85EBCA6B); the 64 bits are output words 0 (high half) and 1; U = ((bits >> 11) + 1) 2^-53
// lies in (0, 1]. Test-only; not part of the library.
#pragma once

#include <stdint.h>

#include <Random123/philox.h>

#include <cmath>

namespace tropd_test::philox_key {

inline uint32_t lo32(uint64_t x) { return static_cast<uint32_t>(x); }
inline uint32_t hi32(uint64_t x) { return static_cast<uint32_t>(x >> 32); }

/// 64 random bits for (seed, step, sequence, position, stream).
inline uint64_t bits(uint64_t seed, uint64_t step, uint64_t sequence, uint64_t position, uint32_t stream) {
  r123::Philox4x32 philox;
  const r123::Philox4x32::ctr_type c = {
      {lo32(step), lo32(sequence), lo32(position),
       stream ^ hi32(step) ^ hi32(sequence) * 0x9E3779B9u ^ hi32(position) * 0x85EBCA6Bu}};
  const r123::Philox4x32::key_type k = {{lo32(seed), hi32(seed)}};
  const r123::Philox4x32::ctr_type r = philox(c, k);
  return (static_cast<uint64_t>(r.v[0]) << 32) | r.v[1];
}

/// U in (0, 1] from 64 bits, exactly (long double holds 53-bit integers times 2^-53).
inline long double uniform(uint64_t b) { return (static_cast<long double>(b >> 11) + 1) * std::ldexp(1.0L, -53); }

/// log U of the trust-region stream (stream id 0x7472, "tr").
inline long double trust_log_u(uint64_t seed, uint64_t step, uint64_t sequence, uint64_t position) {
  return std::log(uniform(bits(seed, step, sequence, position, 0x7472u)));
}

/// Known answers of the trust-region stream, computed once with Random123 alone: the 64 bits
/// for (seed, step, sequence, position), and whether U <= e^-0.5 (the stochastic region's
/// decision at R = -0.5). Rows come in pairs that differ only by a swap of two key fields
/// (sequence / position, seed / step), and some have high words in every field.
struct known_answer {
  uint64_t seed, step, sequence, position, bits;
  bool trusted_at_minus_half;
};
inline constexpr known_answer trust_region_answers[] = {
    {0x0000000000000000ull, 0x0ull, 0x0ull, 0x0ull, 0xd5fe76c1305b6f6cull, false},
    {0x0000000000000001ull, 0x2ull, 0x3ull, 0x4ull, 0x576c5ac7246134a8ull, true},
    {0x000000000000002aull, 0x7ull, 0x8ull, 0x9ull, 0xc09b6dfcf38adf25ull, false},
    {0x0123456789abcdefull, 0x64ull, 0x5ull, 0x11ull, 0x3093b1b6e464ad55ull, true},   // sequence 5, position 17
    {0x0123456789abcdefull, 0x64ull, 0x11ull, 0x5ull, 0xb069d849f8a5b1bcull, false},  // sequence 17, position 5
    {0x0000000000000064ull, 0x123456789abcdefull, 0x5ull, 0x11ull, 0x076b7d47af13793bull, true},  // seed and step swapped
    {0xdeadbeefcafef00dull, 0x100000002ull, 0x300000004ull, 0x500000006ull, 0x7bd75c3fee8790a3ull, true},
    {0xdeadbeefcafef00dull, 0x100000002ull, 0x500000006ull, 0x300000004ull, 0x9261fb6d5ee19f13ull, true},
    {0x0000000000000005ull, 0x5ull, 0xf4240ull, 0x0ull, 0xa99a53f1359ee463ull, false},
    {0x0000000000000009ull, 0x1ull, 0x0ull, 0x1ull, 0x027a90f7c4176302ull, true},
    {0x0000000000000009ull, 0x1ull, 0x1ull, 0x0ull, 0x7a5fbc08c780c32dull, true},
};

}  // namespace tropd_test::philox_key
