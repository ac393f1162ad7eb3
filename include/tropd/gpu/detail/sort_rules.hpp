// tropd/gpu/detail/sort_rules.hpp: the sorting and selection rules of the top-k kernels, as
// TROPD_HD code that also compiles with a plain C++20 compiler (tests/test_gpu_emulation.cpp
// runs the block algorithms on the CPU): the bitonic network's compare-exchange, the keys of
// the teacher top-k selection (the host's order: larger value first, ties to the lower id),
// the candidate buffer's sizes, and the keys of the list checks.
#pragma once

#include <stdint.h>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>

namespace tropd::gpu::detail {

/// The smallest power of two >= n (n >= 1).
TROPD_HD constexpr int next_pow2(int n) noexcept {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

/// One compare-exchange of the bitonic network at stage (k, j) for element i: after every
/// stage of every k (k = 2, 4, .., n2; j = k/2, .., 1), a[0, n2) is ascending in `less`.
template <class Key, class Less>
TROPD_HD inline void bitonic_step(Key* a, int k, int j, int i, Less less) noexcept {
  const int ixj = i ^ j;
  if (ixj <= i) return;
  const bool up = (i & k) == 0;
  const Key x = a[i], y = a[ixj];
  if (up ? less(y, x) : less(x, y)) {
    a[i] = y;
    a[ixj] = x;
  }
}

/// Order-preserving unsigned images of floating values (-0 taken as +0, so equal values tie
/// on the id, as float compares do; NaN never reaches a selection: its row has failed).
TROPD_HD inline uint32_t ordered_bits(float v) noexcept {
  uint32_t u;
  const float c = v + 0.0f;
  __builtin_memcpy(&u, &c, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
TROPD_HD inline uint64_t ordered_bits(double v) noexcept {
  uint64_t u;
  const double c = v + 0.0;
  __builtin_memcpy(&u, &c, sizeof u);
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}
TROPD_HD inline float from_ordered(uint32_t u) noexcept {
  u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
  float v;
  __builtin_memcpy(&v, &u, sizeof v);
  return v;
}
TROPD_HD inline double from_ordered(uint64_t u) noexcept {
  u = (u & 0x8000000000000000ull) ? (u & 0x7fffffffffffffffull) : ~u;
  double v;
  __builtin_memcpy(&v, &u, sizeof v);
  return v;
}

/// The key of a teacher entry (value in the work type W, id) in the selection: a larger key is
/// a stronger entry (larger value; equal values: the lower id). fp32: one 64-bit word (the
/// host's topk_stream<float> key); fp64: the value's 64 bits and the complemented id.
template <class W>
struct select_key;
template <>
struct select_key<float> {
  uint64_t k = 0;  // 0: below every real key (padding of the sort)
  TROPD_HD static select_key make(float v, int32_t id) noexcept {
    return {(uint64_t(ordered_bits(v)) << 32) | uint64_t(0xffffffffu - static_cast<uint32_t>(id))};
  }
  TROPD_HD float value() const noexcept { return from_ordered(static_cast<uint32_t>(k >> 32)); }
  TROPD_HD int32_t id() const noexcept { return static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(k)); }
  TROPD_HD friend bool operator<(const select_key& a, const select_key& b) noexcept { return a.k < b.k; }
};
template <>
struct select_key<double> {
  uint64_t v = 0;
  uint32_t nid = 0;
  TROPD_HD static select_key make(double x, int32_t id) noexcept { return {ordered_bits(x), 0xffffffffu - static_cast<uint32_t>(id)}; }
  TROPD_HD double value() const noexcept { return from_ordered(v); }
  TROPD_HD int32_t id() const noexcept { return static_cast<int32_t>(0xffffffffu - nid); }
  TROPD_HD friend bool operator<(const select_key& a, const select_key& b) noexcept {
    return a.v < b.v || (a.v == b.v && a.nid < b.nid);
  }
};
/// "Stronger first" as an ascending order for the sort.
struct stronger_first {
  template <class Key>
  TROPD_HD bool operator()(const Key& a, const Key& b) const noexcept { return b < a; }
};

/// The streaming selection (gpu/detail/topk_block.cuh): each block reads the teacher row in
/// tiles of select_tile columns; an entry stronger than the current threshold goes into a
/// candidate buffer of select_capacity(K) keys; when the buffer holds more than capacity -
/// select_tile keys, they are sorted and cut to the K strongest, whose weakest becomes the
/// threshold. The sizes keep every tile's entries in the buffer and K <= capacity - tile.
inline constexpr int select_tile = 4 * 256;
TROPD_HD constexpr int select_capacity(int K) noexcept { return next_pow2(K + 2 * select_tile); }

/// The key of entry e of a top-k list in the duplicate check: sorted ascending, entries with
/// the same id are adjacent, earliest entry first ((id, e) pairs).
TROPD_HD constexpr uint64_t list_key(int32_t id, int e) noexcept {
  return (uint64_t(static_cast<uint32_t>(id) ^ 0x80000000u) << 32) | uint64_t(static_cast<uint32_t>(e));
}
TROPD_HD constexpr int32_t list_key_id(uint64_t k) noexcept { return static_cast<int32_t>(static_cast<uint32_t>(k >> 32) ^ 0x80000000u); }
TROPD_HD constexpr int list_key_entry(uint64_t k) noexcept { return static_cast<int>(static_cast<uint32_t>(k)); }
inline constexpr uint64_t list_key_none = ~uint64_t(0);

/// The first error of a top-k list as one number: 4 * entry + kind, kind 0 a NaN / +inf
/// teacher log-prob, 1 an id out of range, 2 a repeated id (the host's check_topk_list order
/// within an entry). none: no error.
inline constexpr int list_error_none = 0x7fffffff;
TROPD_HD constexpr int list_error(int e, int kind) noexcept { return 4 * e + kind; }

}  // namespace tropd::gpu::detail
