// tropd/host/topk_select.hpp: streaming top-k selection of the CPU backend.
//
// topk_stream<W> keeps the k largest entries of a row fed chunk by chunk in increasing id
// order (ties: the lower id first), so the teacher's top-k is selected in the same read as
// the row statistics (host/row_passes.hpp). select_topk runs it over a whole array.
#pragma once

#include <stdint.h>

#include <cstring>
#include <utility>
#include <vector>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/host/simd.hpp>

namespace tropd::host {
namespace detail {

/// Streaming top-k selection over x, fed chunk by chunk in increasing id order: keeps the k
/// largest entries (ties: lower id first) in a min-heap whose root is the weakest kept entry.
/// A packet compare against the root skips almost every element once the heap is full.
template <class W>
struct topk_stream {
  int k = 0, filled = 0;
  int32_t* ids = nullptr;
  W* vals = nullptr;

  void reset(int k_, int32_t* ids_, W* vals_) noexcept {
    k = k_;
    filled = 0;
    ids = ids_;
    vals = vals_;
  }
  /// The weakest kept value (valid once the heap is full).
  W root_value() const noexcept { return vals[0]; }
  bool weaker(int i, int j) const noexcept {  // is slot i weaker than slot j?
    return vals[i] < vals[j] || (vals[i] == vals[j] && ids[i] > ids[j]);
  }
  void sift_down(int i, int n) noexcept {
    for (;;) {
      int l = 2 * i + 1, m = i;
      if (l < n && weaker(l, m)) m = l;
      if (l + 1 < n && weaker(l + 1, m)) m = l + 1;
      if (m == i) return;
      std::swap(vals[i], vals[m]);
      std::swap(ids[i], ids[m]);
      i = m;
    }
  }
  void heapify(int n) noexcept {
    for (int i = n / 2 - 1; i >= 0; --i) sift_down(i, n);
  }
  void push(W x, index_t id) noexcept {
    if (filled < k) {
      vals[filled] = x;
      ids[filled] = static_cast<int32_t>(id);
      if (++filled == k) heapify(k);
    } else if (x > vals[0]) {  // ids grow, so an equal value never beats the root
      vals[0] = x;
      ids[0] = static_cast<int32_t>(id);
      sift_down(0, k);
    }
  }
  /// Feeds x[0, n) with ids base + i. `xmax` (if known, else +inf) is the maximum of x: a
  /// chunk whose maximum does not beat the root is skipped whole; otherwise groups of four
  /// packets are tested against the root with one compare.
  void push_range(const W* x, index_t base, index_t n, W xmax = inf<W>()) noexcept {
    using P = packet_t<W>;
    constexpr index_t L = lanes<W>;
    index_t i = 0;
    for (; i < n && filled < k; ++i) push(x[i], base + i);
    if (i < n && !(xmax > vals[0])) return;  // nothing here enters the heap
    auto packet = [&](index_t j0) {
      if (!pk::predux_any(pk::pcmp_lt(pk::pset1<P>(vals[0]), pk::ploadu<P>(x + j0)))) return;
      for (index_t j = j0; j < j0 + L; ++j) push(x[j], base + j);
    };
    for (; i + 4 * L <= n; i += 4 * L) {
      const P m = pk::pmax(pk::pmax(pk::ploadu<P>(x + i), pk::ploadu<P>(x + i + L)),
                           pk::pmax(pk::ploadu<P>(x + i + 2 * L), pk::ploadu<P>(x + i + 3 * L)));
      if (!pk::predux_any(pk::pcmp_lt(pk::pset1<P>(vals[0]), m))) continue;
      for (index_t j0 = i; j0 < i + 4 * L; j0 += L) packet(j0);
    }
    for (; i + L <= n; i += L) packet(i);
    for (; i < n; ++i) push(x[i], base + i);
  }
  /// Sorts the kept entries into descending order; pads up to k with (id -1, -inf).
  void finish() noexcept {
    if (filled < k) heapify(filled);
    for (int n = filled - 1; n > 0; --n) {
      std::swap(vals[0], vals[n]);
      std::swap(ids[0], ids[n]);
      sift_down(0, n);
    }
    for (int i = filled; i < k; ++i) {
      vals[i] = -inf<W>();
      ids[i] = -1;
    }
  }
};

/// fp32 specialisation: (value, id) packed into one 64-bit key (order-preserving value bits
/// above, the complemented id below: a larger key is a stronger entry, ties going to the
/// lower id), so the heap's sift-down compares integers without data-dependent branches;
/// the same entries and order as the generic version.
template <>
struct topk_stream<float> {
  int k = 0, filled = 0;
  int32_t* ids = nullptr;
  float* vals = nullptr;
  std::vector<uint64_t> heap;  // min-heap of keys; heap[0] is the weakest kept entry
  float root = -inf<float>();  // the value of heap[0] once full

  static uint64_t key(float v, index_t id) noexcept {
    uint32_t u;
    const float c = v + 0.0f;  // -0 -> +0: equal values tie on the id, as float compares do
    std::memcpy(&u, &c, sizeof u);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return (uint64_t(u) << 32) | uint64_t(0xffffffffu - static_cast<uint32_t>(id));
  }
  static float value(uint64_t key) noexcept {
    uint32_t u = static_cast<uint32_t>(key >> 32);
    u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
    float v;
    std::memcpy(&v, &u, sizeof v);
    return v;
  }
  float root_value() const noexcept { return root; }
  static int32_t id_of(uint64_t key) noexcept { return static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(key)); }

  void reset(int k_, int32_t* ids_, float* vals_) {
    k = k_;
    filled = 0;
    ids = ids_;
    vals = vals_;
    heap.resize(static_cast<size_t>(k));
    root = -inf<float>();
  }
  void sift_down(int i, int n) noexcept {
    uint64_t* h = heap.data();
    const uint64_t x = h[i];
    for (;;) {
      int c = 2 * i + 1;
      if (c >= n) break;
      c += (c + 1 < n && h[c + 1] < h[c]) ? 1 : 0;  // the weaker child (a select)
      if (!(h[c] < x)) break;
      h[i] = h[c];
      i = c;
    }
    h[i] = x;
  }
  void heapify(int n) noexcept {
    for (int i = n / 2 - 1; i >= 0; --i) sift_down(i, n);
  }
  void push(float x, index_t id) noexcept {
    if (filled < k) {
      heap[static_cast<size_t>(filled)] = key(x, id);
      if (++filled == k) {
        heapify(k);
        root = value(heap[0]);
      }
    } else if (x > root) {  // ids grow, so an equal value never beats the root
      heap[0] = key(x, id);
      sift_down(0, k);
      root = value(heap[0]);
    }
  }
  void push_range(const float* x, index_t base, index_t n, float xmax = inf<float>()) noexcept {
    using P = packet_t<float>;
    constexpr index_t L = lanes<float>;
    index_t i = 0;
    for (; i < n && filled < k; ++i) push(x[i], base + i);
    if (i < n && !(xmax > root)) return;  // nothing here enters the heap
    auto packet = [&](index_t j0) {
      if (!pk::predux_any(pk::pcmp_lt(pk::pset1<P>(root), pk::ploadu<P>(x + j0)))) return;
      for (index_t j = j0; j < j0 + L; ++j) push(x[j], base + j);
    };
    for (; i + 4 * L <= n; i += 4 * L) {
      const P m = pk::pmax(pk::pmax(pk::ploadu<P>(x + i), pk::ploadu<P>(x + i + L)),
                           pk::pmax(pk::ploadu<P>(x + i + 2 * L), pk::ploadu<P>(x + i + 3 * L)));
      if (!pk::predux_any(pk::pcmp_lt(pk::pset1<P>(root), m))) continue;
      for (index_t j0 = i; j0 < i + 4 * L; j0 += L) packet(j0);
    }
    for (; i + L <= n; i += L) packet(i);
    for (; i < n; ++i) push(x[i], base + i);
  }
  void finish() noexcept {
    if (filled < k) heapify(filled);
    for (int n = filled - 1; n > 0; --n) {  // heap-sort: strongest first
      std::swap(heap[0], heap[static_cast<size_t>(n)]);
      sift_down(0, n);
    }
    for (int i = 0; i < filled; ++i) {
      vals[i] = value(heap[static_cast<size_t>(i)]);
      ids[i] = id_of(heap[static_cast<size_t>(i)]);
    }
    for (int i = filled; i < k; ++i) {
      vals[i] = -inf<float>();
      ids[i] = -1;
    }
  }
};

}  // namespace detail

/// Selects the k largest entries of x[0, V) (ties: lower id first), written in descending
/// order to ids/vals; if V < k the rest is padded with (id -1, -inf).
template <class W>
inline void select_topk(const W* x, index_t V, int k, int32_t* ids, W* vals) {
  detail::topk_stream<W> s;
  s.reset(k, ids, vals);
  s.push_range(x, 0, V);
  s.finish();
}

}  // namespace tropd::host
