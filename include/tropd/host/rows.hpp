// tropd/host/rows.hpp: the CPU backend's row passes.
//
// For each row pair (student logits z, teacher logits u, or a teacher top-k list):
//   pass 1  one read of both rows: mergeable moments (both log-sum-exps, entropies,
//           the centred sums behind both KLs), NaN/+inf detection with the position, and
//           (where asked) the teacher's top-k entries, selected in the same read;
//   pass 1b (only JSD / TV) the estimator's second-pass sums;
//   pass 2  one write of dL/dz:
//           dL/dz_j = scale / T_S * ( w * grad_est_j + g_j - p_j * sum_v g_v )
//           where grad_est is a full-vocabulary estimator's dL/da and g a sparse list of
//           dL/d log p_S(v) (the sampled token, top-k ids). It reads the student row, and
//           the teacher row only for a dense estimator.
// Rows are processed in chunks of `chunk` elements: each chunk is read in place (fp32 at
// temperature 1) or widened (bf16 / fp16 -> fp32 in registers, temperature applied) into
// an L1 buffer, and handled by single loops over Eigen packets (vectorised exp); the next
// chunks are prefetched during the exp loop. Sums are centred at the row's running maxima;
// no [rows x vocab] probability array is ever built. Costs per element and what bounds
// them: docs/performance.md.
//
// exp per element: pass 1 takes one per row read (student, teacher); pass 2 one per
// probability it needs (p; q for estimators that read it). Probabilities are formed as
// p_j = e^{a_j - M_c} e^{M_c - lse} (M_c: the row's running maximum at j's chunk) in both
// orders, so the fused order, which keeps pass 1's e^{a_j - M_c}, gives bit-identical
// results without any exp in pass 2. Large gradients are written with non-temporal stores.
//
// Order of work (row_options::fused):
//   false (default) every row's statistics are computed and validated before anything is
//         written: a failed call leaves every output untouched. Reads each row twice
//         (the gradient pass walks rows backwards so the last rows come from cache).
//   true  statistics and gradient per row while it is in cache (each row read once from
//         memory; pass 2 reuses pass 1's exponentials); on failure any gradient row may
//         already be written (with threads > 1 the other blocks run on: rows after the
//         failing one too), the losses are untouched.
// One error is found only while writing, in either order: a gradient value that does not
// fit the output type (errc::infinite_divergence, row and column of the first such value;
// gradient rows may be partly written, the losses are untouched). In the default order it
// is reported only when every row passed its statistics (any statistics error comes first,
// whatever its row); among such rows the first in row order. Losses are checked finite
// before any is written.
//
// Extra memory: O(chunk) per thread (fused: plus O(V) per thread for the kept
// exponentials) plus one row_summary per row; never O(rows x vocab).
#pragma once

#include <stdint.h>

#include <algorithm>
#include <concepts>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include <Eigen/Core>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <tropd/config.hpp>
#include <tropd/core/checks.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/types.hpp>
#include <tropd/core/views.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/sampled.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/host/parallel.hpp>

// The per-chunk helpers below are small loops over packets called once per chunk; they must
// be inlined into the row passes (measured: ~1.5x slower row passes when GCC keeps them
// out of line in a large translation unit).
#if defined(__GNUC__) || defined(__clang__)
#define TROPD_HOST_INLINE inline __attribute__((always_inline))
#else
#define TROPD_HOST_INLINE inline
#endif

namespace tropd::host {

/// Options shared by the row-level entry points.
struct row_options {
  double student_temperature = 1.0;  ///< T_S: student logits are divided by it (> 0)
  double teacher_temperature = 1.0;  ///< T_T: teacher logits are divided by it (> 0); not applied to given top-k lists
  bool fused = false;                ///< see the header comment
  int threads = 1;                   ///< rows are split statically over this many threads
};

/// A teacher top-k list per row: ids [rows x K] and log-probabilities [rows x K].
/// -inf log-probs are padding (their ids are ignored).
struct topk_lists {
  matrix_view<const int32_t> ids;
  matrix_view<const float> logprobs;
};

namespace detail {

inline constexpr index_t chunk = 1024;

template <class TS, class TT>
using work_t = std::conditional_t<std::is_same_v<TS, double> || std::is_same_v<TT, double>, double, float>;

// Eigen's packet layer (SSE / AVX / AVX-512 / NEON / scalar, whatever the integrator's
// flags enable): the row kernels below are written against it directly so that each pass
// is one loop over a chunk, with the exponentials vectorised (Eigen's pexp).
namespace pk = Eigen::internal;
template <class W>
using packet_t = typename pk::packet_traits<W>::type;
template <class W>
inline constexpr index_t lanes = pk::unpacket_traits<packet_t<W>>::size;
static_assert(chunk % 16 == 0, "chunk must hold whole packets");

/// n rounded up to whole packets.
template <class W>
constexpr index_t padded(index_t n) noexcept {
  return (n + lanes<W> - 1) / lanes<W> * lanes<W>;
}

/// Whether the fused order keeps pass 1's exponentials for the gradient pass (fp32 work;
/// fp64 work forms each probability with its own exp, see chunk_probs).
template <class W>
inline constexpr bool reuse_exps = std::is_same_v<W, float>;

/// Maximum and minimum of a chunk, whether it holds -inf (legal: zero mass) and whether it
/// holds a NaN or +inf (an error).
template <class W>
struct range_info {
  W max;
  bool has_ninf;
  bool bad;
  W min = -inf<W>();
};

/// e^x for x <= 0 (the row passes only exponentiate x - max <= 0; inputs below exp_floor are
/// masked by the callers). With AVX-512 an fp32 version that needs no overflow handling and
/// scales with vscalefps (12 instead of 17 vector operations, about 1.2x Eigen's pexp,
/// max error ~2 ulp like it); elsewhere Eigen's pexp.
/// `clamp = false`: the caller guarantees x >= exp_floor (an unmasked chunk), so the AVX-512
/// version skips its clamp to -87.34 (one vector operation; the same bits for such x).
template <bool clamp = true, class P>
TROPD_HOST_INLINE P exp_nonpos(const P& x) noexcept {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<typename pk::unpacket_traits<P>::type, float> && pk::unpacket_traits<P>::size == 16) {
    const P lo = pk::pset1<P>(-87.33654f), log2e = pk::pset1<P>(1.44269504088896341f);
    const P c1 = pk::pset1<P>(-0.693359375f), c2 = pk::pset1<P>(2.12194440e-4f);
    P v = x;
    if constexpr (clamp) v = pk::pmax(x, lo);
    else (void)lo;
    const P n = _mm512_roundscale_ps(pk::pmul(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    P r = pk::pmadd(n, c1, v);
    r = pk::pmadd(n, c2, r);
    P y = pk::pset1<P>(1.9875691500E-4f);
    y = pk::pmadd(y, r, pk::pset1<P>(1.3981999507E-3f));
    y = pk::pmadd(y, r, pk::pset1<P>(8.3334519073E-3f));
    y = pk::pmadd(y, r, pk::pset1<P>(4.1665795894E-2f));
    y = pk::pmadd(y, r, pk::pset1<P>(1.6666665459E-1f));
    y = pk::pmadd(y, r, pk::pset1<P>(5.0000001201E-1f));
    y = pk::pmadd(y, pk::pmul(r, r), pk::padd(r, pk::pset1<P>(1.f)));
    return _mm512_scalef_ps(y, n);
  }
#endif
  return pk::pexp(x);
}

/// Below this, e^x is taken as exactly 0: Eigen's vectorised exp clamps its argument and
/// returns ~e^-88 (fp32) / ~e^-709 (fp64) for anything smaller, which times a huge negative
/// log-ratio (a logit masked with finfo.min instead of -inf) would give an O(1) error.
template <class W>
inline constexpr W exp_floor = std::is_same_v<W, float> ? W(-87) : W(-708);

/// One packet of src widened to W (bf16 / fp16 / fp32 -> fp32 in registers).
template <class W, class T>
TROPD_HOST_INLINE packet_t<W> load_widened(const T* src) noexcept {
  using P = packet_t<W>;
  if constexpr (std::is_same_v<T, W>) {
    return pk::ploadu<P>(src);
  } else {
    alignas(64) W tmp[lanes<W>];
    for (index_t k = 0; k < lanes<W>; ++k) tmp[k] = static_cast<W>(to_acc(src[k]));
    return pk::pload<P>(tmp);
  }
}

/// dst[0, n) = W(src[i]) * inv_t (bf16 / fp16 widen in registers, chunk by chunk);
/// dst[n, padded(n)) = -inf, so every packet loop runs over whole packets.
template <class W, class T>
TROPD_HOST_INLINE void load_scaled(const T* src, index_t n, W inv_t, W* dst) noexcept {
  using P = packet_t<W>;
  constexpr index_t L = lanes<W>;
  const P pinv = pk::pset1<P>(inv_t);
  const index_t nf = n / L * L;
  for (index_t i = 0; i < nf; i += L) pk::pstore(dst + i, pk::pmul(load_widened<W>(src + i), pinv));
  for (index_t j = nf; j < n; ++j) dst[j] = static_cast<W>(to_acc(src[j])) * inv_t;
  for (index_t j = n; j < padded<W>(n); ++j) dst[j] = -inf<W>();
}

/// load_scaled and a scan in one loop: dst = widened src * inv_t (padded with -inf) and its
/// range. Without `store` (a full chunk read in place, see direct()) only the scan runs.
/// Finiteness costs one fma per packet (x * 0 summed: NaN iff a value is not finite); only a
/// chunk with a non-finite value is scanned again to tell -inf from NaN / +inf.
template <class W, class T, bool store = true>
TROPD_HOST_INLINE range_info<W> load_scan(const T* src, index_t n, W inv_t, W* dst) noexcept {
  using P = packet_t<W>;
  constexpr index_t L = lanes<W>;
  const P pinv = pk::pset1<P>(inv_t), zero = pk::pset1<P>(W(0));
  P mx0 = pk::pset1<P>(-inf<W>()), mx1 = mx0, mn0 = pk::pset1<P>(inf<W>()), mn1 = mn0, nz0 = zero, nz1 = zero;
  auto step = [&](const P x, index_t j, P& mx, P& mn, P& nz) {
    if constexpr (store) pk::pstore(dst + j, x);
    mx = pk::pmax(mx, x);
    mn = pk::pmin(mn, x);
    nz = pk::pmadd(x, zero, nz);
  };
  const index_t nf = n / L * L;
  index_t i = 0;
  if (inv_t == W(1)) {  // x * 1 == x: skip the multiply
    for (; i + 2 * L <= nf; i += 2 * L) {
      step(load_widened<W>(src + i), i, mx0, mn0, nz0);
      step(load_widened<W>(src + i + L), i + L, mx1, mn1, nz1);
    }
    for (; i < nf; i += L) step(load_widened<W>(src + i), i, mx0, mn0, nz0);
  } else {
    for (; i + 2 * L <= nf; i += 2 * L) {
      step(pk::pmul(load_widened<W>(src + i), pinv), i, mx0, mn0, nz0);
      step(pk::pmul(load_widened<W>(src + i + L), pinv), i + L, mx1, mn1, nz1);
    }
    for (; i < nf; i += L) step(pk::pmul(load_widened<W>(src + i), pinv), i, mx0, mn0, nz0);
  }
  range_info<W> r{W(0), false, false, inf<W>()};
  if (i < n) {  // the last, partial packet (store only): widen one by one, pad with -inf
    for (index_t j = i; j < n; ++j) {
      dst[j] = static_cast<W>(to_acc(src[j])) * inv_t;
      r.bad = r.bad || !(dst[j] < inf<W>());
      r.min = min_(r.min, dst[j]);
    }
    for (index_t j = n; j < i + L; ++j) dst[j] = -inf<W>();
    mx0 = pk::pmax(mx0, pk::pload<P>(dst + i));
    r.has_ninf = true;  // the padding
  }
  r.max = pk::predux_max(pk::pmax(mx0, mx1));
  r.min = min_(r.min, pk::predux_min(pk::pmin(mn0, mn1)));  // (the real elements; +inf if none)
  if (!(pk::predux(pk::padd(nz0, nz1)) == W(0))) {  // a non-finite value among the full packets
    const W* x = dst;
    if constexpr (!store && std::is_same_v<T, W>) x = src;
    for (index_t j = 0; j < nf; ++j) {
      r.bad = r.bad || !(x[j] < inf<W>());
      r.has_ninf = r.has_ninf || x[j] == -inf<W>();
    }
  }
  return r;
}

/// Whether a chunk can be read in place instead of through an L1 buffer: a full chunk of
/// rows already in the working type, with temperature 1 (the common fp32 case).
template <class W, class T>
inline bool direct(index_t n, W inv_t) noexcept {
  return std::is_same_v<T, W> && n == chunk && inv_t == W(1);
}
/// The chunk's values: the row itself (direct) or the L1 buffer it was widened into.
template <class W, class T>
inline const W* chunk_ptr(const T* src, bool in_place, const W* buf) noexcept {
  if constexpr (std::is_same_v<T, W>)
    return in_place ? src : buf;
  else
    return buf;
}
/// Widens/scans a chunk (in place when direct()): returns its range; `ptr` its values.
template <class W, class T>
TROPD_HOST_INLINE range_info<W> stage_chunk(const T* src, index_t n, W inv_t, W* buf, const W*& ptr) noexcept {
  const bool in_place = direct<W, T>(n, inv_t);
  ptr = chunk_ptr<W>(src, in_place, buf);
  return in_place ? load_scan<W, T, false>(src, n, inv_t, nullptr) : load_scan<W, T, true>(src, n, inv_t, buf);
}

/// Widens a chunk (in place when direct(), without a scan); returns its values.
template <class W, class T>
TROPD_HOST_INLINE const W* stage_values(const T* src, index_t n, W inv_t, W* buf) noexcept {
  const bool in_place = direct<W, T>(n, inv_t);
  if (!in_place) load_scaled(src, n, inv_t, buf);
  return chunk_ptr<W>(src, in_place, buf);
}

/// Software prefetch of the next chunk of up to four streams (rows, kept exponentials),
/// spread over the packet iterations of the current chunk's exp loop, one cache line per
/// stream per iteration: the hardware prefetchers alone leave memory idle while a chunk's
/// exps run and the core idle while the next chunk arrives.
struct prefetch_plan {
  const char* p[4] = {nullptr, nullptr, nullptr, nullptr};
  index_t lines[4] = {0, 0, 0, 0};
  int n = 0;
  void add(const void* ptr, index_t bytes) noexcept {
    if (ptr == nullptr || bytes <= 0 || n == 4) return;
    p[n] = static_cast<const char*>(ptr);
    lines[n] = (bytes + 63) / 64;
    ++n;
  }
  /// Adds the chunk `distance` chunks after the one at c0 (nothing past the end of the row).
  template <class T>
  void ahead(const T* row, index_t c0, index_t V, index_t distance = 1) noexcept;
  /// Issues the lines of iteration k (call for k = 0, 1, ... of a loop over packets).
  TROPD_HOST_INLINE void at(index_t k) const noexcept {
#if defined(__GNUC__) || defined(__clang__)
    for (int j = 0; j < n; ++j)
      if (k < lines[j]) __builtin_prefetch(p[j] + 64 * k);
#else
    (void)k;
#endif
  }
};

/// Prefetch distance in chunks: 2 for the statistics pass, which streams both rows from
/// memory; 1 for the other passes (measured on the reference machine, docs/performance.md).
inline constexpr index_t prefetch_ahead_stats = 2;

template <class T>
void prefetch_plan::ahead(const T* row, index_t c0, index_t V, index_t distance) noexcept {
  const index_t start = c0 + distance * chunk;
  if (start < V) add(row + start, std::min(chunk, V - start) * static_cast<index_t>(sizeof(T)));  // no pointer past the row
}

/// Index of the lowest set bit of a non-zero word.
inline index_t lowest_bit(uint64_t x) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_ctzll(x);
#else
  index_t i = 0;
  while (!(x & 1u)) { x >>= 1; ++i; }
  return i;
#endif
}

/// A 64-byte aligned array of W that keeps its storage between rows.
template <class W>
struct aligned_array {
  std::vector<W> storage;
  W* p = nullptr;
  void resize(index_t n) {
    const index_t pad = 64 / static_cast<index_t>(sizeof(W));
    if (static_cast<index_t>(storage.size()) < n + pad) storage.assign(static_cast<size_t>(n + pad), W(0));
    const auto addr = reinterpret_cast<uintptr_t>(storage.data());
    p = storage.data() + ((64 - addr % 64) % 64) / sizeof(W);
  }
};

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

/// Per-thread scratch of the row passes: chunk buffers (L1), and for row_options::fused the
/// pass-1 exponentials of the current row (O(V) per thread), so the gradient pass needs no
/// exp; plus the top-k heap and the sorted sparse terms of a row.
template <class W>
struct alignas(64) row_scratch {
  alignas(64) W a[chunk];
  alignas(64) W b[chunk];
  alignas(64) W wa[chunk];
  alignas(64) W wb[chunk];
  alignas(64) W lm[chunk];  // log m of mixture divergences (JSD)
  alignas(64) W t0[chunk];  // second-pass terms (JSD, TV)
  alignas(64) W t1[chunk];
  alignas(64) unsigned char g[chunk * sizeof(double)];  // one chunk of the gradient, as G

  // Kept by pass 1 when `keep` is set: w = e^{a - Ms_c}, v = e^{b - Mt_c} and the running
  // maxima Ms_c, Mt_c of each chunk.
  bool keep = false, keep_teacher = false, kept = false;
  aligned_array<W> keep_w, keep_v;
  std::vector<W> keep_ms, keep_mt;

  // Top-k of the teacher row (when a pass asks for it).
  topk_stream<W> topk;
  std::vector<int32_t> topk_ids;
  std::vector<W> topk_vals;
  std::vector<double> lq, ls;

  // Sorted ids of a top-k list (student_tail_log).
  std::vector<int32_t> tail_ids;

  // Sparse gradient terms of a row, sorted by id (stable).
  std::vector<int32_t> sp_ids;
  std::vector<double> sp_coef;

  void prepare_keep(index_t V, bool teacher) {
    if (!reuse_exps<W>) return;  // fp64 work recomputes its probabilities (chunk_probs)
    keep = true;
    keep_teacher = teacher;
    const index_t nc = (V + chunk - 1) / chunk;
    keep_w.resize(nc * chunk);
    keep_ms.resize(static_cast<size_t>(nc));
    if (teacher) {
      keep_v.resize(nc * chunk);
      keep_mt.resize(static_cast<size_t>(nc));
    }
  }
  void prepare_topk(int k) {
    topk_ids.resize(static_cast<size_t>(k));
    topk_vals.resize(static_cast<size_t>(k));
    lq.resize(static_cast<size_t>(k));
    ls.resize(static_cast<size_t>(k));
  }
};

/// Chunk sums of pass 1 (relative to the running maxima Ms, Mt of the row):
///   w = e^{a - Ms}: ss = sum w, es = sum w (a - Ms), xs = sum w ((a - Ms) - (b - Mt));
///   v = e^{b - Mt}: st, et, xt likewise. Terms with zero weight are exact zeros, except
///   that xs (xt) is +inf where a > -inf = b (b > -inf = a): supports, not underflow.
/// `fast`: no -inf in the chunk (and both maxima finite), so no masking is needed.
/// `sel`: also marks, per packet, whether a teacher value exceeds `thr` (the top-k heap's
/// root at the start of the chunk) in the bit mask `hits` (bit j: packet j), so the top-k
/// selection only visits those packets afterwards (no separate pass, no branches here).
/// `M`: the sums the caller reads (ss and st always). The fast path skips the others, whose
/// out[] entries are then meaningless (row_pass1 turns the fields they feed into NaN); the
/// masked path always computes all six. A kept sum is bit-identical whatever M is.
template <class W, bool teacher, bool fast, bool keep, bool sel = false,
          estimators::moments_needed M = estimators::all_moments>
TROPD_HOST_INLINE void chunk_sums(const W* A, const W* B, index_t np, W Ms, W Mt, W* keep_w, W* keep_v, const prefetch_plan& pf,
                       double* out, W thr = W(0), uint64_t* hits = nullptr) noexcept {
  using P = packet_t<W>;
  constexpr index_t L = lanes<W>;
  const P ms = pk::pset1<P>(Ms), mt = pk::pset1<P>(Mt), zero = pk::pzero(ms), lo = pk::pset1<P>(exp_floor<W>);
  [[maybe_unused]] const P ninf = pk::pset1<P>(-inf<W>()), pinf = pk::pset1<P>(inf<W>());
  P ss = zero, es = zero, xs = zero, st = zero, et = zero, xt = zero;
  const bool s_ok = Ms > -inf<W>(), t_ok = Mt > -inf<W>();
  for (index_t i = 0; i < np; i += L) {
    pf.at(i / L);
    const P a = pk::ploadu<P>(A + i);
    const P da = pk::psub(a, ms);
    P w = zero;
    if (fast || s_ok) {
      w = exp_nonpos<!fast>(da);  // fast: da >= exp_floor
      if constexpr (!fast) w = pk::pselect(pk::pcmp_lt(da, lo), zero, w);  // -inf and underflow: exactly 0
    }
    ss = pk::padd(ss, w);
    if constexpr (keep) pk::pstoreu(keep_w + i, w);
    if constexpr (fast) {
      if constexpr (M.ent_s) es = pk::pmadd(w, da, es);
    } else if (s_ok) {
      const P pos = pk::pcmp_lt(zero, w);
      es = pk::padd(es, pk::pselect(pos, pk::pmul(w, da), zero));
    }
    if constexpr (teacher) {
      const P b = pk::ploadu<P>(B + i);
      if constexpr (sel) {
        const index_t j = i / L;
        hits[j >> 6] |= uint64_t(pk::predux_any(pk::pcmp_lt(pk::pset1<P>(thr), b))) << (j & 63);
      }
      const P db = pk::psub(b, mt);
      P v = zero;
      if (fast || t_ok) {
        v = exp_nonpos<!fast>(db);
        if constexpr (!fast) v = pk::pselect(pk::pcmp_lt(db, lo), zero, v);
      }
      st = pk::padd(st, v);
      if constexpr (keep) pk::pstoreu(keep_v + i, v);
      const P dd = pk::psub(da, db);
      if constexpr (fast) {
        if constexpr (M.ent_t) et = pk::pmadd(v, db, et);
        if constexpr (M.rkl) xs = pk::pmadd(w, dd, xs);
        if constexpr (M.fkl) xt = pk::pmadd(v, dd, xt);  // -xt: negated once at the end (exact)
      } else {
        const P nd = pk::psub(db, da);
        const P pos_w = pk::pcmp_lt(zero, w), pos_v = pk::pcmp_lt(zero, v);
        if (t_ok) et = pk::padd(et, pk::pselect(pos_v, pk::pmul(v, db), zero));
        // The cross sums follow the supports (a > -inf, b > -inf), not exp underflow: an
        // entry the student supports and the teacher does not makes xs +inf whatever its
        // weight (and likewise xt), so the infinite-divergence rule is the same in fp32 and
        // fp64 (method.md: KL(p || q) = +inf iff p_v > 0 = q_v somewhere).
        const P sa = pk::pcmp_lt(ninf, a), sb = pk::pcmp_lt(ninf, b);
        xs = pk::padd(xs, pk::pselect(sa, pk::pselect(sb, pk::pselect(pos_w, pk::pmul(w, dd), zero), pinf), zero));
        xt = pk::padd(xt, pk::pselect(sb, pk::pselect(sa, pk::pselect(pos_v, pk::pmul(v, nd), zero), pinf), zero));
      }
    }
  }
  out[0] = double(pk::predux(ss));
  out[1] = double(pk::predux(es));
  out[2] = double(pk::predux(xs));
  out[3] = double(pk::predux(st));
  out[4] = double(pk::predux(et));
  out[5] = double(pk::predux(xt));
  if constexpr (fast) out[5] = -out[5];
}

/// The first error of a chunk after scaling by 1/T in the work type, or ok: non_finite_input
/// at a NaN / +inf input; unsupported at a finite logit whose scaled value left the work
/// type's range (+inf, or -inf, which would otherwise read as "zero mass"), e.g. 3e38 at
/// T = 0.05 in fp32. Called only for chunks whose scan saw a NaN / +inf, or a -inf with
/// 1/T > 1 (the only case where a finite value can scale to -inf).
template <class W, class T>
inline status scaled_error(const T* raw, const W* scaled, index_t n, index_t c0, index_t row, bool student) noexcept {
  for (index_t j = 0; j < n; ++j) {
    const W x = scaled[j];
    if (x < inf<W>() && x != -inf<W>()) continue;
    const bool finite_in = is_finite(to_acc(raw[j]));
    if (x == -inf<W>() && !finite_in) continue;  // a -inf input: zero mass, legal
    if (finite_in)
      return make_error(errc::unsupported,
                        student ? "a finite student logit divided by the temperature leaves the work type's range (pass fp64 logits or use a larger temperature)"
                                : "a finite teacher logit divided by the temperature leaves the work type's range (pass fp64 logits or use a larger temperature)",
                        row, c0 + j);
    return make_error(errc::non_finite_input, student ? "student logits contain NaN or +inf" : "teacher logits contain NaN or +inf", row,
                      c0 + j);
  }
  return {};
}

/// Pass 1 over one row pair; teacher may be nullptr (student-only statistics).
/// Reads each row once: per chunk, widen/scale into L1, one scan (maxima, NaN/+inf), one
/// exp pass (both rows' sums). Sums are kept relative to the running maxima of the row and
/// re-centred only when a maximum grows. With buf.keep the exponentials are kept for pass 2;
/// with `topk` (> 0) the teacher's top-k entries are selected in the same pass.
/// `M`: the summary fields the caller reads (lse_s, lse_t always); the others are NaN in
/// `out`. The default computes everything.
template <estimators::moments_needed M = estimators::all_moments, class W, class TS, class TT>
inline status row_pass1(const TS* zs, const TT* zt, index_t V, W inv_ts, W inv_tt, row_scratch<W>& buf, index_t row,
                        estimators::row_summary& out, int topk = 0) noexcept {
  estimators::row_moments<double> mom;
  const bool has_t = zt != nullptr;
  W Ms = -inf<W>(), Mt = -inf<W>();
  buf.kept = false;
  if (topk > 0) buf.topk.reset(topk, buf.topk_ids.data(), buf.topk_vals.data());
  for (index_t c0 = 0, c = 0; c0 < V; c0 += chunk, ++c) {
    const index_t n = std::min(chunk, V - c0), np = padded<W>(n);
    const W *A = buf.a, *B = buf.b;
    const range_info<W> ra = stage_chunk<W, TS>(zs + c0, n, inv_ts, buf.a, A);
    if (ra.bad || (ra.has_ninf && inv_ts > W(1))) TROPD_TRY(scaled_error(zs + c0, A, n, c0, row, true));
    range_info<W> rb{-inf<W>(), false, false};
    if (has_t) {
      rb = stage_chunk<W, TT>(zt + c0, n, inv_tt, buf.b, B);
      if (rb.bad || (rb.has_ninf && inv_tt > W(1))) TROPD_TRY(scaled_error(zt + c0, B, n, c0, row, false));
    }
    // Re-centre the row's sums when a running maximum grows.
    const W Ms2 = max_(Ms, ra.max), Mt2 = max_(Mt, rb.max);
    if (Ms2 != Ms || Mt2 != Mt) {
      mom.rebase(double(Ms2), has_t ? double(Mt2) : -inf<double>());
      Ms = Ms2;
      Mt = Mt2;
    }
    // The exponentials go to the kept arrays (fused order) or, unused, to the chunk buffers.
    W* kw = buf.keep ? buf.keep_w.p + c0 : buf.wa;
    W* kv = buf.keep && buf.keep_teacher && has_t ? buf.keep_v.p + c0 : buf.wb;
    if (buf.keep) {  // (only for fp32 work: see chunk_probs)
      buf.keep_ms[static_cast<size_t>(c)] = Ms;
      if (buf.keep_teacher && has_t) buf.keep_mt[static_cast<size_t>(c)] = Mt;
    }
    double s[6];
    // Fast path: no -inf and no e^{x - M} below exp_floor in the chunk (no masking needed).
    const bool fast = !ra.has_ninf && !rb.has_ninf && ra.min - Ms >= exp_floor<W> && (!has_t || rb.min - Mt >= exp_floor<W>);
    prefetch_plan pf;
    pf.ahead(zs, c0, V, prefetch_ahead_stats);
    if (has_t) pf.ahead(zt, c0, V, prefetch_ahead_stats);
    // The top-k selection runs inside the exp loop: packets holding a value above the heap's
    // root are marked there and pushed (in id order) below.
    // (Until the heap is full, the chunk goes through push_range, which fills it in id order.)
    const bool filling = topk > 0 && has_t && buf.topk.filled < buf.topk.k;
    if (filling) buf.topk.push_range(B, c0, n, rb.max);
    const bool sel = topk > 0 && has_t && !filling && rb.max > buf.topk.root_value();
    uint64_t hits[(chunk / lanes<W> + 63) / 64] = {};
    const W thr = sel ? buf.topk.root_value() : W(0);
    if (has_t) {
      if (sel) {
        if (fast) {
          if (buf.keep) chunk_sums<W, true, true, true, true, M>(A, B, np, Ms, Mt, kw, kv, pf, s, thr, hits);
          else chunk_sums<W, true, true, false, true, M>(A, B, np, Ms, Mt, kw, kv, pf, s, thr, hits);
        } else {
          if (buf.keep) chunk_sums<W, true, false, true, true>(A, B, np, Ms, Mt, kw, kv, pf, s, thr, hits);
          else chunk_sums<W, true, false, false, true>(A, B, np, Ms, Mt, kw, kv, pf, s, thr, hits);
        }
      } else if (fast) {
        if (buf.keep) chunk_sums<W, true, true, true, false, M>(A, B, np, Ms, Mt, kw, kv, pf, s);
        else chunk_sums<W, true, true, false, false, M>(A, B, np, Ms, Mt, kw, kv, pf, s);
      } else {
        if (buf.keep) chunk_sums<W, true, false, true>(A, B, np, Ms, Mt, kw, kv, pf, s);
        else chunk_sums<W, true, false, false>(A, B, np, Ms, Mt, kw, kv, pf, s);
      }
    } else {
      if (fast) {
        if (buf.keep) chunk_sums<W, false, true, true, false, M>(A, B, np, Ms, Mt, kw, kv, pf, s);
        else chunk_sums<W, false, true, false, false, M>(A, B, np, Ms, Mt, kw, kv, pf, s);
      } else {
        if (buf.keep) chunk_sums<W, false, false, true>(A, B, np, Ms, Mt, kw, kv, pf, s);
        else chunk_sums<W, false, false, false>(A, B, np, Ms, Mt, kw, kv, pf, s);
      }
    }
    if (sel) {  // packets in increasing order, lanes in increasing order: ids grow
      constexpr index_t L = lanes<W>;
      for (index_t w = 0; w < (np / L + 63) / 64; ++w)
        for (uint64_t bits = hits[w]; bits != 0; bits &= bits - 1) {
          const index_t j0 = (w * 64 + lowest_bit(bits)) * L;
          for (index_t j = j0; j < std::min(j0 + L, n); ++j) buf.topk.push(B[j], c0 + j);
        }
    }
    mom.ss += s[0];
    mom.es += s[1];
    mom.xs += s[2];
    mom.st += s[3];
    mom.et += s[4];
    mom.xt += s[5];
  }
  if (topk > 0 && has_t) buf.topk.finish();
  if (!(mom.ss > 0)) return make_error(errc::no_finite_entry, "student logits row is -inf everywhere", row);
  if (has_t && !(mom.st > 0)) return make_error(errc::no_finite_entry, "teacher logits row is -inf everywhere", row);
  if (!has_t) { mom.mt = 0; mom.st = 1; mom.xs = 0; mom.xt = 0; mom.et = 0; }
  out = estimators::summarize(mom);
  if (!has_t) { out.lse_t = 0; out.rkl = out.fkl = out.ent_t = 0; }
  // Sums the fast path skipped (M): their fields are NaN, never a plausible wrong value.
  if constexpr (!M.ent_s) out.ent_s = quiet_nan<double>();
  if constexpr (!M.ent_t) out.ent_t = quiet_nan<double>();
  if constexpr (!M.rkl) out.rkl = quiet_nan<double>();
  if constexpr (!M.fkl) out.fkl = quiet_nan<double>();
  buf.kept = buf.keep;
  return {};
}

/// log(1 - P_K) of a student row, for the tail-bucket policy: the log-mass of the entries
/// outside the list ids[0, n) (entries with pad(i) true are not in the list). Without
/// cancellation: when the tail estimated from the listed log-probs is above 1e-3 and the
/// logits are of a sane scale, that estimate is used (relative error below ~2e-7);
/// otherwise the entries outside the list are summed directly in one more read of the
/// student row (log-sum-exp over the row minus the listed ids). -inf exactly when the
/// student has no finite logit outside the list, in every work type.
template <class W, class TS, class Pad>
inline double student_tail_log(const TS* zs, index_t V, W its, double lse_s, const int32_t* ids, int n, Pad&& pad,
                               row_scratch<W>& buf) {
  double lse_k = -inf<double>();
  buf.tail_ids.clear();
  for (int i = 0; i < n; ++i) {
    if (pad(i)) continue;
    buf.tail_ids.push_back(ids[i]);
    lse_k = logaddexp(lse_k, double(W(to_acc(zs[ids[i]])) * its) - lse_s);
  }
  // The estimate is used only where it is accurate: each listed log-prob carries an absolute
  // rounding error of ~eps |lse_s| (the logits' scale), so with n |lse_s| < 1e6 the listed
  // mass is known to ~2e-10, i.e. a tail above 1e-3 to a relative 2e-7 (and then surely > 0).
  const double est = log1mexp(min_(lse_k, 0.0));
  if (est > -6.907755278982137 && double(buf.tail_ids.size()) * abs_(lse_s) < 1e6) return est;  // log(1e-3)
  std::sort(buf.tail_ids.begin(), buf.tail_ids.end());
  using P = packet_t<W>;
  constexpr index_t L = lanes<W>;
  const P lo = pk::pset1<P>(exp_floor<W>), zero = pk::pset1<P>(W(0));
  double M = -inf<double>(), S = 0;
  size_t j = 0;
  for (index_t c0 = 0; c0 < V; c0 += chunk) {
    const index_t n_c = std::min(chunk, V - c0), np = padded<W>(n_c);
    load_scaled(zs + c0, n_c, its, buf.a);  // a copy (padded with -inf): the listed ids are removed in it
    for (; j < buf.tail_ids.size() && buf.tail_ids[j] < c0 + n_c; ++j) buf.a[buf.tail_ids[j] - c0] = -inf<W>();
    P mx = pk::pset1<P>(-inf<W>());
    for (index_t i = 0; i < np; i += L) mx = pk::pmax(mx, pk::pload<P>(buf.a + i));
    const W m = pk::predux_max(mx);
    if (!(m > -inf<W>())) continue;
    const P pm = pk::pset1<P>(m);
    P acc = zero;
    for (index_t i = 0; i < np; i += L) {
      const P d = pk::psub(pk::pload<P>(buf.a + i), pm);
      acc = pk::padd(acc, pk::pselect(pk::pcmp_lt(d, lo), zero, exp_nonpos(d)));
    }
    const double mc = double(m), sc = double(pk::predux(acc));
    if (mc > M) {
      S = S * exp_(M - mc) + sc;
      M = mc;
    } else {
      S += sc * exp_(mc - M);
    }
  }
  return M == -inf<double>() ? -inf<double>() : M + log_(S) - lse_s;
}

/// Estimator placeholder for rows with only sparse gradient terms.
struct no_dense {
  static constexpr bool second_pass = false;
  template <class F>
  TROPD_HD constexpr void accumulate(F, F, F, F, double*) const noexcept {}
  template <class F>
  TROPD_HD constexpr F grad(F, F, F, F, const estimators::row_summary&) const noexcept { return F(0); }
};

/// Whether an estimator's per-element rules read the teacher probability q (reverse KL
/// reads only p and the log-ratio); unknown estimators are assumed to.
template <class Est>
inline constexpr bool reads_q = !std::is_same_v<Est, estimators::reverse_kl> && !std::is_same_v<Est, no_dense>;

/// A row's log-sum-exp as seen by the element loops: log p_j = (a_j - C) - delta with
/// C = W(lse) and delta = W(lse - C). a_j - C is exact when a_j and C are within a factor of
/// two (Sterbenz), so log-probabilities keep full precision however large a common offset of
/// the logits is (a single subtraction of W(lse) would carry lse's rounding, ~1e-4 at 3000).
template <class W>
struct lse_split {
  W C = 0, delta = 0;
  lse_split() = default;
  explicit lse_split(double lse) noexcept : C(static_cast<W>(lse)), delta(static_cast<W>(lse - double(static_cast<W>(lse)))) {}
  W log_prob(W a) const noexcept { return (a - C) - delta; }
};

/// Probabilities of one chunk of a row (into dst[0, np)).
///   fp32 work: p_j = e^{a_j - M_c} * e^{M_c - lse}, M_c the row's running maximum at this
///     chunk, so p is bit-identical whether pass 1 kept e^{a_j - M_c} (`kept`, with its M_c)
///     or it is recomputed here (one exp);
///   fp64 work: p_j = e^{log p_j} directly (one exp, the most accurate form; fp64 rows are
///     never the fast path, and pass 1 keeps nothing for them).
template <class W>
struct prob_state {
  W M = -inf<W>();
  W f = W(0);  // e^{M - lse} for the current M
  double lse = 0;
  lse_split<W> split;
  explicit prob_state(double lse_) noexcept : lse(lse_), split(lse_) {}
};
template <class W>
TROPD_HOST_INLINE void chunk_probs(const W* x, const W* kept, W kept_M, const range_info<W>& r, index_t np, prob_state<W>& st,
                        W* dst, const prefetch_plan& pf = {}) noexcept {
  using P = packet_t<W>;
  constexpr index_t L = lanes<W>;
  const P zero = pk::pset1<P>(W(0)), lo = pk::pset1<P>(exp_floor<W>);
  if constexpr (!reuse_exps<W>) {
    const P C = pk::pset1<P>(st.split.C), d = pk::pset1<P>(st.split.delta);
    for (index_t i = 0; i < np; i += L) {
      pf.at(i / L);
      const P lp = pk::psub(pk::psub(pk::ploadu<P>(x + i), C), d);
      pk::pstore(dst + i, pk::pselect(pk::pcmp_lt(lp, lo), zero, exp_nonpos(lp)));  // -inf, underflow: 0
    }
    return;
  }
  bool masked = true;  // some e^{x - M} may be -inf or below exp_floor: mask those to 0
  W M2;
  if (kept) {
    M2 = kept_M;
  } else {
    M2 = max_(st.M, r.max);
    masked = r.has_ninf || !(r.min - M2 >= exp_floor<W>);
  }
  if (M2 != st.M || st.f == W(0)) {
    st.M = M2;
    st.f = M2 > -inf<W>() ? static_cast<W>(exp_(double(M2) - st.lse)) : W(0);
  }
  const P f = pk::pset1<P>(st.f);
  if (st.M == -inf<W>()) {
    for (index_t i = 0; i < np; i += L) {
      pf.at(i / L);
      pk::pstore(dst + i, zero);
    }
    return;
  }
  if (kept) {
    for (index_t i = 0; i < np; i += L) {
      pf.at(i / L);
      pk::pstore(dst + i, pk::pmul(pk::ploadu<P>(kept + i), f));
    }
    return;
  }
  const P m = pk::pset1<P>(st.M);
  if (masked) {
    for (index_t i = 0; i < np; i += L) {
      pf.at(i / L);
      const P da = pk::psub(pk::ploadu<P>(x + i), m);
      const P w = pk::pselect(pk::pcmp_lt(da, lo), zero, exp_nonpos(da));
      pk::pstore(dst + i, pk::pmul(w, f));
    }
  } else {
    for (index_t i = 0; i < np; i += L) {
      pf.at(i / L);
      pk::pstore(dst + i, pk::pmul(exp_nonpos<false>(pk::psub(pk::ploadu<P>(x + i), m)), f));  // >= exp_floor
    }
  }
}

/// Divergences whose per-element rules read log m = logaddexp(lt + wt, ls + ws) (JSD): the
/// backend computes log m for a whole chunk with packets (Eigen's exp and log1p) and calls
/// the policy's accumulate_lm / grad_lm with it, instead of a scalar logaddexp per element.
template <class Est>
concept mixture_divergence = requires(const Est& e, float x, double* acc, const estimators::row_summary& r, double& d) {
  e.log_m_weights(d, d);
  e.accumulate_lm(x, x, x, x, x, acc);
  { e.grad_lm(x, x, x, x, x, r) } -> std::convertible_to<float>;
};

/// dst = logaddexp(lt + wt, ls + ws) over a chunk (ls, lt from the rows' lse splits);
/// the same formula as tropd::logaddexp (max + log1p(e^{min - max}), -inf when both are -inf).
template <class W>
TROPD_HOST_INLINE void chunk_log_m(const W* A, const W* B, lse_split<W> ss, lse_split<W> st, W wt, W ws, index_t np,
                        W* dst) noexcept {
  using P = packet_t<W>;
  constexpr index_t L = lanes<W>;
  if constexpr (pk::packet_traits<W>::HasLog1p && pk::packet_traits<W>::HasExp && L > 1) {
    const P Cs = pk::pset1<P>(ss.C), ds = pk::pset1<P>(ss.delta), Ct = pk::pset1<P>(st.C), dt = pk::pset1<P>(st.delta);
    const P pwt = pk::pset1<P>(wt), pws = pk::pset1<P>(ws), ninf = pk::pset1<P>(-inf<W>());
    for (index_t i = 0; i < np; i += L) {
      const P ls = pk::psub(pk::psub(pk::ploadu<P>(A + i), Cs), ds);
      const P lt = pk::psub(pk::psub(pk::ploadu<P>(B + i), Ct), dt);
      const P x = pk::padd(lt, pwt), y = pk::padd(ls, pws);
      const P m = pk::pmax(x, y);
      const P r = pk::padd(m, pk::plog1p(pk::pexp(pk::psub(pk::pmin(x, y), m))));
      pk::pstore(dst + i, pk::pselect(pk::pcmp_eq(m, ninf), ninf, r));
    }
  } else {
    for (index_t i = 0; i < np; ++i) dst[i] = logaddexp(st.log_prob(B[i]) + wt, ss.log_prob(A[i]) + ws);
  }
}

/// The element loop of pass 2: g[i] = G(wd * est.grad(log p_i, log q_i, p_i, q_i, s) - wg * p_i),
/// or G(-wg * p_i) without a dense term (mixture divergences: grad_lm with the chunk's log m).
/// Everything the loop reads is a by-value parameter or a restrict pointer, so the compiler can
/// vectorise it (a full chunk also has a constant trip count, which GCC's -O2 cost model needs).
template <bool dense, index_t Fixed, class W, class G, class Est>
TROPD_HOST_INLINE void grad_elements(const Est est, const W* __restrict a, const W* __restrict b, const W* __restrict p,
                          const W* __restrict q, const W* __restrict lm, G* __restrict g, index_t n, const W wd,
                          const W wg, const lse_split<W> ls, const lse_split<W> lt,
                          const estimators::row_summary s) noexcept {
  const index_t m = Fixed > 0 ? Fixed : n;
  for (index_t i = 0; i < m; ++i) {
    if constexpr (!dense) {
      g[i] = static_cast<G>(-wg * p[i]);
    } else if constexpr (mixture_divergence<Est>) {
      g[i] = static_cast<G>(wd * est.grad_lm(ls.log_prob(a[i]), lt.log_prob(b[i]), lm[i], p[i], q[i], s) - wg * p[i]);
    } else {
      g[i] = static_cast<G>(wd * est.grad(ls.log_prob(a[i]), lt.log_prob(b[i]), p[i], q[i], s) - wg * p[i]);
    }
  }
}

/// Estimators that expose their second-pass terms per element (terms / terms_lm), so the
/// backend can sum them vectorised; others are summed through accumulate().
template <class Est>
concept has_terms = requires(const Est& e, float x, float& t) { e.terms(x, x, x, x, t, t); } ||
                    requires(const Est& e, float x, float& t) { e.terms_lm(x, x, x, x, x, t, t); };

template <index_t Fixed, class W, class Est>
TROPD_HOST_INLINE void second_terms(const Est est, const W* __restrict a, const W* __restrict b, const W* __restrict p,
                         const W* __restrict q, const W* __restrict lm, W* __restrict t0, W* __restrict t1, index_t n,
                         const lse_split<W> ls, const lse_split<W> lt) noexcept {
  const index_t m = Fixed > 0 ? Fixed : n;
  for (index_t i = 0; i < m; ++i) {
    if constexpr (mixture_divergence<Est>)
      est.terms_lm(ls.log_prob(a[i]), lt.log_prob(b[i]), lm[i], p[i], q[i], t0[i], t1[i]);
    else
      est.terms(ls.log_prob(a[i]), lt.log_prob(b[i]), p[i], q[i], t0[i], t1[i]);
  }
}

/// Sum of x[0, n) in packets (a fixed association order).
template <class W>
TROPD_HOST_INLINE W packet_sum(const W* x, index_t n) noexcept {
  using P = packet_t<W>;
  constexpr index_t L = lanes<W>;
  P s0 = pk::pset1<P>(W(0)), s1 = s0;
  index_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    s0 = pk::padd(s0, pk::ploadu<P>(x + i));
    s1 = pk::padd(s1, pk::ploadu<P>(x + i + L));
  }
  for (; i + L <= n; i += L) s0 = pk::padd(s0, pk::ploadu<P>(x + i));
  W r = pk::predux(pk::padd(s0, s1));
  for (; i < n; ++i) r += x[i];
  return r;
}

/// Second-pass sums of an estimator (JSD, TV).
template <class W, class TS, class TT, class Est>
inline void row_pass1b(const Est& est, const TS* zs, const TT* zt, index_t V, W inv_ts, W inv_tt, row_scratch<W>& buf,
                       estimators::row_summary& s) noexcept {
  double acc[2] = {0, 0};
  prob_state<W> ps(s.lse_s), qs(s.lse_t);
  const bool kept = buf.kept && buf.keep_teacher;
  for (index_t c0 = 0, c = 0; c0 < V; c0 += chunk, ++c) {
    const index_t n = std::min(chunk, V - c0), np = padded<W>(n);
    const W *A = buf.a, *B = buf.b;
    const range_info<W> ra = stage_chunk<W, TS>(zs + c0, n, inv_ts, buf.a, A);
    const range_info<W> rb = stage_chunk<W, TT>(zt + c0, n, inv_tt, buf.b, B);
    prefetch_plan pf;
    pf.ahead(zs, c0, V);
    pf.ahead(zt, c0, V);
    if (kept) {
      pf.ahead(buf.keep_w.p, c0, V);
      pf.ahead(buf.keep_v.p, c0, V);
    }
    chunk_probs(A, kept ? buf.keep_w.p + c0 : nullptr, kept ? buf.keep_ms[static_cast<size_t>(c)] : W(0), ra, np, ps, buf.wa, pf);
    chunk_probs(B, kept ? buf.keep_v.p + c0 : nullptr, kept ? buf.keep_mt[static_cast<size_t>(c)] : W(0), rb, np, qs, buf.wb);
    if constexpr (mixture_divergence<Est>) {
      double wt, ws;
      est.log_m_weights(wt, ws);
      chunk_log_m(A, B, ps.split, qs.split, W(wt), W(ws), np, buf.lm);
    }
    if constexpr (has_terms<Est>) {
      // Per-element terms into two buffers (a vectorised loop over the policy's rule), then
      // packet sums: per chunk in W, across chunks in double.
      if (n == chunk) second_terms<chunk>(est, A, B, buf.wa, buf.wb, buf.lm, buf.t0, buf.t1, n, ps.split, qs.split);
      else second_terms<0>(est, A, B, buf.wa, buf.wb, buf.lm, buf.t0, buf.t1, n, ps.split, qs.split);
      acc[0] += double(packet_sum(buf.t0, n));
      acc[1] += double(packet_sum(buf.t1, n));
    } else {
      // Four interleaved partial sums (independent dependency chains, kept in registers); a
      // fixed order, so the result does not depend on the order of work or the thread count.
      double p0[2] = {0, 0}, p1[2] = {0, 0}, p2[2] = {0, 0}, p3[2] = {0, 0};
      const lse_split<W> ss = ps.split, st = qs.split;
      auto one = [&](index_t i, double* part) {
        if constexpr (mixture_divergence<Est>)
          est.accumulate_lm(ss.log_prob(A[i]), st.log_prob(B[i]), buf.lm[i], buf.wa[i], buf.wb[i], part);
        else
          est.accumulate(ss.log_prob(A[i]), st.log_prob(B[i]), buf.wa[i], buf.wb[i], part);
      };
      index_t i = 0;
      for (; i + 4 <= n; i += 4) {
        one(i, p0);
        one(i + 1, p1);
        one(i + 2, p2);
        one(i + 3, p3);
      }
      double* tail[3] = {p0, p1, p2};
      for (index_t j = 0; i < n; ++i, ++j) one(i, tail[j]);
      acc[0] += (p0[0] + p1[0]) + (p2[0] + p3[0]);
      acc[1] += (p0[1] + p1[1]) + (p2[1] + p3[1]);
    }
  }
  s.sum0 = acc[0];
  s.sum1 = acc[1];
}

/// Sparse part of a row gradient: g[i] = dL/d log p_S(ids[i]).
struct sparse_terms {
  const int32_t* ids = nullptr;
  const double* coef = nullptr;
  int n = 0;
  /// split: out_j = g_j - p_j * sum_on on the listed ids and -p_j * sum_off elsewhere,
  /// instead of g_j - p_j * sum g everywhere. The tail bucket needs it: with its raw terms
  /// g_v = -q_v, sum_on = sum g - (1 - S_K) and sum_off = sum_on + c, c = (1 - S_K) / (1 - P_K)
  /// (which can be ~1e15): folding c p_v into g_v would cancel it on the list in fp32.
  /// Listed entries are then set (not added to). Only without a dense estimator term.
  bool split = false;
  double sum_on = 0, sum_off = 0;
};

/// Writes src[0, n) to dst; `stream` uses non-temporal stores where the target has them
/// (a gradient much larger than the caches is not read again soon, and streaming it saves
/// the read-for-ownership of every line).
template <class G>
inline void store_chunk(G* dst, const G* src, index_t n, bool stream) noexcept {
#if defined(__AVX512F__) || defined(__AVX__) || defined(__SSE2__)
  if (stream) {
#if defined(__AVX512F__)
    constexpr index_t bytes = 64;
#elif defined(__AVX__)
    constexpr index_t bytes = 32;
#else
    constexpr index_t bytes = 16;
#endif
    constexpr index_t per = bytes / static_cast<index_t>(sizeof(G));
    index_t i = 0;
    while (i < n && (reinterpret_cast<uintptr_t>(dst + i) % bytes) != 0) { dst[i] = src[i]; ++i; }
    for (; i + per <= n; i += per) {
      if constexpr (std::is_same_v<G, float>) {
#if defined(__AVX512F__)
        _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#elif defined(__AVX__)
        _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#else
        _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
#endif
      } else {
#if defined(__AVX512F__)
        _mm512_stream_pd(dst + i, _mm512_loadu_pd(src + i));
#elif defined(__AVX__)
        _mm256_stream_pd(dst + i, _mm256_loadu_pd(src + i));
#else
        _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
#endif
      }
    }
    for (; i < n; ++i) dst[i] = src[i];
    return;
  }
#else
  (void)stream;
#endif
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(G));
}

/// Orders the stores of store_chunk(..., stream = true) before the caller's later stores.
inline void stream_fence() noexcept {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

/// Gradients at least this large (bytes) are written with non-temporal stores.
inline constexpr double stream_bytes = 8.0 * 1024 * 1024;

/// Whether x[0, n) holds only finite values (one fma per packet: x * 0 summed is NaN iff
/// some x is NaN or infinite).
template <class G>
TROPD_HOST_INLINE bool all_finite(const G* x, index_t n) noexcept {
  using P = packet_t<G>;
  constexpr index_t L = lanes<G>;
  const P zero = pk::pset1<P>(G(0));
  P acc = zero;
  index_t i = 0;
  for (; i + L <= n; i += L) acc = pk::pmadd(pk::ploadu<P>(x + i), zero, acc);
  G t = pk::predux(acc);
  for (; i < n; ++i) t += x[i] * G(0);
  return t == t;
}

/// Pass 2: writes out[j] = scale * (w * est.grad_j + g_j - p_j * sum g).
/// Returns -1, or the first column whose value is not finite in G (the row is then written
/// up to and including that column's chunk; the caller reports errc::infinite_divergence).
/// Uses the exponentials pass 1 kept (buf.kept) or recomputes them (one exp per element
/// and per probability the estimator reads); reads the teacher row only for a dense term.
template <class W, class TS, class TT, class Est, class G>
inline index_t row_pass2(const Est& est, const TS* zs, const TT* zt, index_t V, W inv_ts, W inv_tt, row_scratch<W>& buf,
                      const estimators::row_summary& s_in, double w, sparse_terms sp, double scale, G* out,
                      bool stream = false) noexcept {
  G* g = reinterpret_cast<G*>(buf.g);
  if (scale == 0.0) {  // prompt rows and rows without a term: an exact zero gradient
    for (index_t i = 0; i < chunk; ++i) g[i] = G(0);
    for (index_t c0 = 0; c0 < V; c0 += chunk) store_chunk(out + c0, g, std::min(chunk, V - c0), stream);
    if (stream) stream_fence();
    return -1;
  }
  const estimators::row_summary s = s_in;  // a local copy: provably not aliased by the stores
  double gsum = 0;
  for (int i = 0; i < sp.n; ++i) gsum += sp.coef[i];
  const W wd = W(w * scale), wg = W((sp.split ? sp.sum_off : gsum) * scale);
  const double on_list = sp.sum_on * scale;  // p_j's coefficient on the list when sp.split
  // Sparse terms sorted by id (stable: equal ids keep their order, so the sums are unchanged).
  buf.sp_ids.assign(sp.ids, sp.ids + sp.n);
  buf.sp_coef.resize(static_cast<size_t>(sp.n));
  for (int i = 0; i < sp.n; ++i) buf.sp_coef[static_cast<size_t>(i)] = sp.coef[i] * scale;
  for (int i = 1; i < sp.n; ++i) {
    const int32_t id = buf.sp_ids[static_cast<size_t>(i)];
    const double cf = buf.sp_coef[static_cast<size_t>(i)];
    int j = i - 1;
    for (; j >= 0 && buf.sp_ids[static_cast<size_t>(j)] > id; --j) {
      buf.sp_ids[static_cast<size_t>(j + 1)] = buf.sp_ids[static_cast<size_t>(j)];
      buf.sp_coef[static_cast<size_t>(j + 1)] = buf.sp_coef[static_cast<size_t>(j)];
    }
    buf.sp_ids[static_cast<size_t>(j + 1)] = id;
    buf.sp_coef[static_cast<size_t>(j + 1)] = cf;
  }
  constexpr bool dense = !std::is_same_v<Est, no_dense>;
  constexpr bool need_q = reads_q<Est>;
  const bool kept = buf.kept;
  prob_state<W> ps(s.lse_s), qs(s.lse_t);
  const lse_split<W> ss = ps.split, st = qs.split;
  if constexpr (dense && !need_q) std::memset(buf.wb, 0, sizeof buf.wb);  // q is not read; keep it defined
  int next = 0;
  for (index_t c0 = 0, c = 0; c0 < V; c0 += chunk, ++c) {
    const index_t n = std::min(chunk, V - c0), np = padded<W>(n);
    const size_t cs = static_cast<size_t>(c);
    range_info<W> ra{0, true, false}, rb{0, true, false};
    const W *A = buf.a, *B = buf.b;
    if (!kept) ra = stage_chunk<W, TS>(zs + c0, n, inv_ts, buf.a, A);
    else if (dense) A = stage_values(zs + c0, n, inv_ts, buf.a);
    prefetch_plan pf;
    if (dense || !kept) pf.ahead(zs, c0, V);
    if (dense) pf.ahead(zt, c0, V);
    if (kept) pf.ahead(buf.keep_w.p, c0, V);
    if (kept && need_q && buf.keep_teacher) pf.ahead(buf.keep_v.p, c0, V);
    chunk_probs(A, kept ? buf.keep_w.p + c0 : nullptr, kept ? buf.keep_ms[cs] : W(0), ra, np, ps, buf.wa, pf);
    // Without streaming the chunk is computed straight into the output row.
    G* dst = stream ? g : out + c0;
    if constexpr (dense) {
      const bool kq = kept && buf.keep_teacher;
      if (need_q && !kq) rb = stage_chunk<W, TT>(zt + c0, n, inv_tt, buf.b, B);
      else B = stage_values(zt + c0, n, inv_tt, buf.b);
      if constexpr (need_q) chunk_probs(B, kq ? buf.keep_v.p + c0 : nullptr, kq ? buf.keep_mt[cs] : W(0), rb, np, qs, buf.wb);
      if constexpr (mixture_divergence<Est>) {
        double wt, ws;
        est.log_m_weights(wt, ws);
        chunk_log_m(A, B, ss, st, W(wt), W(ws), np, buf.lm);
      }
      if (n == chunk) grad_elements<true, chunk>(est, A, B, buf.wa, buf.wb, buf.lm, dst, n, wd, wg, ss, st, s);
      else grad_elements<true, 0>(est, A, B, buf.wa, buf.wb, buf.lm, dst, n, wd, wg, ss, st, s);
    } else {
      if (n == chunk) grad_elements<false, chunk>(est, A, B, buf.wa, buf.wb, buf.lm, dst, n, wd, wg, ss, st, s);
      else grad_elements<false, 0>(est, A, B, buf.wa, buf.wb, buf.lm, dst, n, wd, wg, ss, st, s);
    }
    for (; next < sp.n && buf.sp_ids[static_cast<size_t>(next)] < c0 + n; ++next) {
      const index_t j = buf.sp_ids[static_cast<size_t>(next)] - c0;
      if (sp.split && (next == 0 || buf.sp_ids[static_cast<size_t>(next - 1)] != buf.sp_ids[static_cast<size_t>(next)]))
        dst[j] = static_cast<G>(-double(buf.wa[j]) * on_list);  // the listed entry's own value (no dense term)
      dst[j] += static_cast<G>(buf.sp_coef[static_cast<size_t>(next)]);
    }
    // Every written value must fit G (an overflowing grad_scale / T_S, or a coefficient at
    // the edge of the work type's range, must not be written as inf / NaN with an ok status).
    if (!all_finite(dst, n)) {
      index_t j = 0;
      while (is_finite(dst[j])) ++j;
      if (stream) {
        store_chunk(out + c0, g, n, true);
        stream_fence();
      }
      return c0 + j;
    }
    if (stream) store_chunk(out + c0, g, n, true);
  }
  if (stream) stream_fence();
  return -1;
}

inline status check_temperatures(const row_options& o) noexcept {
  return checks::temperatures(o.student_temperature, o.teacher_temperature);
}

/// Shapes (core/checks.hpp, shared with the GPU backend), then grad_scale values (host memory).
template <class TS, class G>
inline status check_student_and_outputs(matrix_view<const TS> student, vector_view<double> loss,
                                        matrix_view<G> grad, vector_view<const double> grad_scale) noexcept {
  TROPD_TRY(checks::student_rows(student, loss, grad, grad_scale));
  for (index_t r = 0; r < grad_scale.size; ++r)
    if (!is_finite(grad_scale[r])) return make_error(errc::non_finite_input, "grad_scale is not finite", r);
  return {};
}

template <class TT>
inline status check_teacher_rows(matrix_view<const TT> teacher, index_t rows, index_t cols) noexcept {
  return checks::teacher_rows(teacher, rows, cols);
}

/// Whether a gradient of this size is written with non-temporal stores.
template <class G>
inline bool stream_gradient(matrix_view<G> grad) noexcept {
  return double(grad.rows) * double(grad.cols) * double(sizeof(G)) >= stream_bytes;
}

/// The status of a gradient row written by row_pass2 (bad: its return value).
inline status gradient_status(index_t row, index_t bad) noexcept {
  if (bad < 0) return {};
  return make_error(errc::infinite_divergence,
                    "the gradient does not fit the output type (grad_scale / temperature too large, or logits at the edge "
                    "of the range); gradient rows may be partly written",
                    row, bad);
}

/// Checks that every value[r] is finite, then writes loss[r] = value[r] (all or nothing).
inline status write_losses(vector_view<double> loss, const std::vector<double>& value) noexcept {
  for (index_t r = 0; r < loss.size; ++r)
    if (!is_finite(value[static_cast<size_t>(r)]))
      return make_error(errc::infinite_divergence, "the loss is not finite in double (logits at the edge of the range)", r);
  for (index_t r = 0; r < loss.size; ++r) loss[r] = value[static_cast<size_t>(r)];
  return {};
}

/// Runs `stats(r, buf, summary&) -> status` then `grad(r, buf, summary) -> status` over rows,
/// in the order row_options::fused asks for. `keep`: in the fused order, pass 1 keeps the
/// student's (and with `keep_teacher` the teacher's) exponentials for the gradient pass.
/// `setup(buf)` prepares each thread's scratch.
template <class W, class Stats, class Grad, class Setup>
inline status run_rows(index_t rows, index_t V, const row_options& opt, std::vector<estimators::row_summary>& sums,
                       bool keep, bool keep_teacher, Setup&& setup, Stats&& stats, Grad&& grad) {
  sums.resize(static_cast<size_t>(rows));
  if (opt.fused) {
    return parallel_rows(rows, opt.threads, [&](index_t b, index_t e) -> status {
      auto buf = std::make_unique<row_scratch<W>>();
      setup(*buf);
      if (keep) buf->prepare_keep(V, keep_teacher);
      for (index_t r = b; r < e; ++r) {
        TROPD_TRY(stats(r, *buf, sums[static_cast<size_t>(r)]));
        TROPD_TRY(grad(r, *buf, sums[static_cast<size_t>(r)]));
      }
      return {};
    });
  }
  TROPD_TRY(parallel_rows(rows, opt.threads, [&](index_t b, index_t e) -> status {
    auto buf = std::make_unique<row_scratch<W>>();
    setup(*buf);
    for (index_t r = b; r < e; ++r) TROPD_TRY(stats(r, *buf, sums[static_cast<size_t>(r)]));
    return {};
  }));
  // The gradient pass walks each block backwards: its last rows were read last by pass 1
  // and may still be in the last-level cache.
  return parallel_rows(rows, opt.threads, [&](index_t b, index_t e) -> status {
    auto buf = std::make_unique<row_scratch<W>>();
    setup(*buf);
    // On a failure the walk goes on, so the lowest failing row of the block is reported.
    status first{};
    for (index_t r = e; r-- > b;)
      if (status st = grad(r, *buf, sums[static_cast<size_t>(r)]); !st.ok()) first = st;
    return first;
  });
}

}  // namespace detail

/// Full-vocabulary divergence per row: loss[r] = D(p_r, q_r), grad[r] = grad_scale[r] * dD/dz_r.
///
/// student [rows x V], teacher [rows x V] (any logit_element types), loss [rows],
/// grad [rows x V] or empty (value only), grad_scale [rows] or empty (1).
/// Errors: empty_batch, shape_mismatch, non_finite_input (NaN/+inf, with position),
/// no_finite_entry, infinite_divergence, invalid_parameter.
template <estimators::full_vocab_divergence Est, logit_element TS, logit_element TT, grad_element G = float>
status divergence_rows(const Est& est, matrix_view<const TS> student, matrix_view<const TT> teacher,
                       vector_view<double> loss, matrix_view<G> grad = {}, const row_options& opt = {},
                       vector_view<const double> grad_scale = {},
                       vector_view<estimators::row_summary> summaries = {}) {
  using W = detail::work_t<TS, TT>;
  TROPD_TRY(est.check());
  TROPD_TRY(detail::check_temperatures(opt));
  TROPD_TRY(detail::check_student_and_outputs(student, loss, grad, grad_scale));
  TROPD_TRY(detail::check_teacher_rows(teacher, student.rows, student.cols));
  if (summaries.size != 0 && summaries.size != student.rows)
    return make_error(errc::shape_mismatch, "summaries must be empty or have one entry per row");
  const index_t V = student.cols;
  const W its = W(1.0 / opt.student_temperature), itt = W(1.0 / opt.teacher_temperature);
  const bool stream = detail::stream_gradient(grad);
  std::vector<estimators::row_summary> sums;
  // Pass 1 computes only the moments the estimator reads, unless the caller asked for the
  // summaries (then every field).
  constexpr estimators::moments_needed need = estimators::summary_reads_of<Est>();
  auto stats = [&](index_t r, detail::row_scratch<W>& buf, estimators::row_summary& s) -> status {
    if (summaries.size)
      TROPD_TRY(detail::row_pass1<estimators::all_moments>(student.row(r), teacher.row(r), V, its, itt, buf, r, s));
    else
      TROPD_TRY(detail::row_pass1<need>(student.row(r), teacher.row(r), V, its, itt, buf, r, s));
    if (!est.finite(s))
      return make_error(errc::infinite_divergence,
                        "the divergence is infinite: one distribution gives zero mass where the other has mass", r);
    if constexpr (Est::second_pass) detail::row_pass1b(est, student.row(r), teacher.row(r), V, its, itt, buf, s);
    return {};
  };
  auto gradf = [&](index_t r, detail::row_scratch<W>& buf, const estimators::row_summary& s) -> status {
    if (grad.rows == 0) return {};
    const double scale = (grad_scale.size ? grad_scale[r] : 1.0) / opt.student_temperature;
    return detail::gradient_status(
        r, detail::row_pass2(est, student.row(r), teacher.row(r), V, its, itt, buf, s, 1.0, {}, scale, grad.row(r), stream));
  };
  const bool keep = grad.rows != 0 || Est::second_pass;
  const bool keep_teacher = detail::reads_q<Est> || Est::second_pass;
  TROPD_TRY(detail::run_rows<W>(student.rows, V, opt, sums, keep, keep_teacher, [](detail::row_scratch<W>&) {}, stats, gradf));
  std::vector<double> val(static_cast<size_t>(student.rows));
  for (index_t r = 0; r < student.rows; ++r) val[static_cast<size_t>(r)] = est.value(sums[static_cast<size_t>(r)]);
  TROPD_TRY(detail::write_losses(loss, val));
  for (index_t r = 0; r < summaries.size; ++r) summaries[r] = sums[static_cast<size_t>(r)];
  return {};
}

/// Checks one token id against [0, V).
inline status check_ids(vector_view<const int32_t> ids, index_t rows, index_t V) noexcept {
  if (ids.size != rows) return make_error(errc::shape_mismatch, "ids must have one entry per row");
  for (index_t r = 0; r < rows; ++r)
    if (ids[r] < 0 || ids[r] >= V) return make_error(errc::id_out_of_range, "sampled token id outside [0, V)", r, ids[r]);
  return {};
}

/// Sampled-token estimator per row with full teacher logits:
/// s = log p_S(y_r), t = log p_T(y_r) from the rows, s_old[r] (empty: s_old = s, so rho = 1).
/// loss[r] = the estimator's loss; grad[r] = grad_scale[r] * dL/ds * (e_y - p) / T_S.
template <class E, class U, logit_element TS, logit_element TT, grad_element G = float>
status sampled_rows(const estimators::sampled<E, U>& est, matrix_view<const TS> student, matrix_view<const TT> teacher,
                    vector_view<const int32_t> ids, vector_view<const double> s_old, vector_view<double> loss,
                    matrix_view<G> grad = {}, const row_options& opt = {}, vector_view<const double> grad_scale = {}) {
  using W = detail::work_t<TS, TT>;
  TROPD_TRY(detail::check_temperatures(opt));
  TROPD_TRY(detail::check_student_and_outputs(student, loss, grad, grad_scale));
  TROPD_TRY(detail::check_teacher_rows(teacher, student.rows, student.cols));
  TROPD_TRY(check_ids(ids, student.rows, student.cols));
  if (s_old.size != 0 && s_old.size != student.rows) return make_error(errc::shape_mismatch, "s_old must be empty or one per row");
  for (index_t r = 0; r < s_old.size; ++r)
    if (!is_finite(s_old[r])) return make_error(errc::non_finite_input, "s_old is not finite", r);
  const index_t V = student.cols;
  const W its = W(1.0 / opt.student_temperature), itt = W(1.0 / opt.teacher_temperature);
  const bool stream = detail::stream_gradient(grad);
  std::vector<estimators::sampled_result> res(static_cast<size_t>(student.rows));
  std::vector<estimators::row_summary> sums;
  auto stats = [&](index_t r, detail::row_scratch<W>& buf, estimators::row_summary& s) -> status {
    // Reads lse_s and lse_t only (here and in the gradient pass).
    TROPD_TRY(detail::row_pass1<estimators::lse_only>(student.row(r), teacher.row(r), V, its, itt, buf, r, s));
    const int32_t y = ids[r];
    const double sy = double(W(to_acc(student.row(r)[y])) * its) - s.lse_s;
    const double ty = double(W(to_acc(teacher.row(r)[y])) * itt) - s.lse_t;
    if (sy == -inf<double>()) return make_error(errc::infinite_divergence, "the student gives zero mass to the sampled token", r, y);
    if (ty == -inf<double>())
      return make_error(errc::infinite_divergence,
                        "the teacher gives zero mass to the sampled token (infinite log-ratio); use a trust region or a reward clip", r, y);
    const auto v = est(sy, s_old.size ? s_old[r] : sy, ty);
    if (!is_finite(v.loss) || !is_finite(v.dloss_ds))
      return make_error(errc::infinite_divergence, "the estimator overflows for this token", r, y);
    res[static_cast<size_t>(r)] = v;
    return {};
  };
  auto gradf = [&](index_t r, detail::row_scratch<W>& buf, const estimators::row_summary& s) -> status {
    if (grad.rows == 0) return {};
    const double scale = (grad_scale.size ? grad_scale[r] : 1.0) / opt.student_temperature;
    const double c = res[static_cast<size_t>(r)].dloss_ds;
    const int32_t y = ids[r];
    return detail::gradient_status(r, detail::row_pass2(detail::no_dense{}, student.row(r), static_cast<const TT*>(nullptr), V, its,
                                                        itt, buf, s, 0.0, detail::sparse_terms{&y, &c, 1}, scale, grad.row(r), stream));
  };
  TROPD_TRY(detail::run_rows<W>(student.rows, V, opt, sums, grad.rows != 0, false, [](detail::row_scratch<W>&) {}, stats, gradf));
  std::vector<double> val(static_cast<size_t>(student.rows));
  for (index_t r = 0; r < student.rows; ++r) val[static_cast<size_t>(r)] = res[static_cast<size_t>(r)].loss;
  return detail::write_losses(loss, val);
}

/// Selects the k largest entries of x[0, V) (ties: lower id first), written in descending
/// order to ids/vals; if V < k the rest is padded with (id -1, -inf).
template <class W>
inline void select_topk(const W* x, index_t V, int k, int32_t* ids, W* vals) {
  detail::topk_stream<W> s;
  s.reset(k, ids, vals);
  s.push_range(x, 0, V);
  s.finish();
}

/// Validates a teacher top-k list row: finite entries have ids in [0, V) and no duplicate;
/// log-probs are not NaN/+inf. Returns the first violation.
inline status check_topk_row(const int32_t* ids, const float* lp, int K, index_t V, index_t row) {
  for (int i = 0; i < K; ++i) {
    if (!(lp[i] < inf<float>())) return make_error(errc::non_finite_input, "teacher top-k log-prob is NaN or +inf", row, i);
    if (lp[i] == -inf<float>()) continue;
    if (ids[i] < 0 || ids[i] >= V) return make_error(errc::id_out_of_range, "teacher top-k id outside [0, V)", row, i);
    for (int j = 0; j < i; ++j)
      if (lp[j] != -inf<float>() && ids[j] == ids[i]) return make_error(errc::duplicate_topk_id, "teacher top-k list repeats an id", row, i);
  }
  return {};
}

/// Teacher top-k forward KL per row. Two teacher forms:
///  - full teacher logits [rows x V]: the top min(est.k, V) ids are selected per row (ties: lower id),
///    in the same read as the row statistics;
///  - given lists (ids + log-probs [rows x K], K >= 1, -inf padding allowed; est.k is ignored).
/// loss[r] = FKL_k; grad[r] = grad_scale[r] * dFKL_k/dz / T_S. The student's log-sum-exp runs
/// over the whole row.
template <logit_element TS, logit_element TT, grad_element G = float>
status topk_forward_kl_rows(const estimators::topk_forward_kl& est, matrix_view<const TS> student,
                            matrix_view<const TT> teacher, vector_view<double> loss, matrix_view<G> grad = {},
                            const row_options& opt = {}, vector_view<const double> grad_scale = {}) {
  using W = detail::work_t<TS, TT>;
  TROPD_TRY(est.check());
  TROPD_TRY(detail::check_temperatures(opt));
  TROPD_TRY(detail::check_student_and_outputs(student, loss, grad, grad_scale));
  TROPD_TRY(detail::check_teacher_rows(teacher, student.rows, student.cols));
  const index_t V = student.cols, N = student.rows;
  const int K = static_cast<int>(std::min<index_t>(est.k, V));  // k > V selects the whole row
  const W its = W(1.0 / opt.student_temperature), itt = W(1.0 / opt.teacher_temperature);
  const bool stream = detail::stream_gradient(grad);
  std::vector<int32_t> kid(static_cast<size_t>(N * K));
  std::vector<double> kg(static_cast<size_t>(N * K));
  std::vector<double> val(static_cast<size_t>(N)), kon(static_cast<size_t>(N), 0.0), koff(static_cast<size_t>(N), 0.0);
  std::vector<int> kn(static_cast<size_t>(N), K);
  std::vector<estimators::row_summary> sums;
  auto setup = [&](detail::row_scratch<W>& buf) { buf.prepare_topk(K); };
  auto stats = [&](index_t r, detail::row_scratch<W>& buf, estimators::row_summary& s) -> status {
    // Reads lse_s and lse_t only (here and in the gradient pass).
    TROPD_TRY(detail::row_pass1<estimators::lse_only>(student.row(r), teacher.row(r), V, its, itt, buf, r, s, K));
    int32_t* ids = kid.data() + r * K;
    for (int i = 0; i < K; ++i) {
      ids[i] = buf.topk_ids[static_cast<size_t>(i)];
      buf.lq[static_cast<size_t>(i)] = ids[i] < 0 ? -inf<double>() : double(buf.topk_vals[static_cast<size_t>(i)]) - s.lse_t;
      buf.ls[static_cast<size_t>(i)] = ids[i] < 0 ? 0.0 : double(W(to_acc(student.row(r)[ids[i]])) * its) - s.lse_s;
    }
    double tail = quiet_nan<double>();
    if (est.tail == estimators::topk_tail::tail_bucket)
      tail = detail::student_tail_log(student.row(r), V, its, s.lse_s, ids, K, [&](int i) { return ids[i] < 0; }, buf);
    const auto res = est.eval(buf.lq.data(), buf.ls.data(), K, kg.data() + r * K, tail);
    if (!res.st.ok()) return make_error(res.st.code, res.st.detail, r, res.st.col);
    val[static_cast<size_t>(r)] = res.value;
    if (res.tail_coef != 0) {  // the tail's c p_v goes to pass 2 as sparse_terms::off (see there)
      // (padding is dropped from the list: pass 2 sets every listed entry)
      int m = 0;
      double gs = 0;
      for (int i = 0; i < K; ++i)
        if (ids[i] >= 0) {
          gs += kg[static_cast<size_t>(r * K + m)] = -exp_(buf.lq[static_cast<size_t>(i)]);
          ids[m++] = ids[i];
        }
      kn[static_cast<size_t>(r)] = m;
      kon[static_cast<size_t>(r)] = gs - (1.0 - res.teacher_mass);
      koff[static_cast<size_t>(r)] = kon[static_cast<size_t>(r)] + res.tail_coef;
    }
    for (int i = 0; i < K; ++i)
      if (ids[i] < 0) { ids[i] = 0; kg[static_cast<size_t>(r * K + i)] = 0; }
    return {};
  };
  auto gradf = [&](index_t r, detail::row_scratch<W>& buf, const estimators::row_summary& s) -> status {
    if (grad.rows == 0) return {};
    const double scale = (grad_scale.size ? grad_scale[r] : 1.0) / opt.student_temperature;
    const size_t rr = static_cast<size_t>(r);
    const detail::sparse_terms sp{kid.data() + r * K, kg.data() + r * K, kn[rr], koff[rr] != kon[rr], kon[rr], koff[rr]};
    return detail::gradient_status(r, detail::row_pass2(detail::no_dense{}, student.row(r), static_cast<const TT*>(nullptr), V, its,
                                                        itt, buf, s, 0.0, sp, scale, grad.row(r), stream));
  };
  TROPD_TRY(detail::run_rows<W>(N, V, opt, sums, grad.rows != 0, false, setup, stats, gradf));
  return detail::write_losses(loss, val);
}

/// Overload for given teacher top-k lists (see topk_lists).
template <logit_element TS, grad_element G = float>
status topk_forward_kl_rows(const estimators::topk_forward_kl& est, matrix_view<const TS> student,
                            const topk_lists& teacher, vector_view<double> loss, matrix_view<G> grad = {},
                            const row_options& opt = {}, vector_view<const double> grad_scale = {}) {
  using W = detail::work_t<TS, float>;
  TROPD_TRY(est.check());
  TROPD_TRY(detail::check_temperatures(opt));
  TROPD_TRY(detail::check_student_and_outputs(student, loss, grad, grad_scale));
  const index_t V = student.cols, N = student.rows;
  if (!teacher.ids.valid() || !teacher.logprobs.valid())
    return make_error(errc::shape_mismatch, "teacher top-k views are malformed");
  if (teacher.ids.rows != N || teacher.logprobs.rows != N)
    return make_error(errc::shape_mismatch, "teacher top-k lists need one row per student row");
  if (teacher.ids.cols != teacher.logprobs.cols || teacher.ids.cols < 1)
    return make_error(errc::shape_mismatch, "teacher top-k ids and log-probs must both be [rows x K] with K >= 1");
  const int K = static_cast<int>(teacher.ids.cols);
  for (index_t r = 0; r < N; ++r) TROPD_TRY(check_topk_row(teacher.ids.row(r), teacher.logprobs.row(r), K, V, r));
  const W its = W(1.0 / opt.student_temperature);
  const bool stream = detail::stream_gradient(grad);
  std::vector<int32_t> kid(static_cast<size_t>(N * K));
  std::vector<double> kg(static_cast<size_t>(N * K));
  std::vector<double> val(static_cast<size_t>(N)), kon(static_cast<size_t>(N), 0.0), koff(static_cast<size_t>(N), 0.0);
  std::vector<int> kn(static_cast<size_t>(N), K);
  std::vector<estimators::row_summary> sums;
  auto setup = [&](detail::row_scratch<W>& buf) { buf.prepare_topk(K); };
  auto stats = [&](index_t r, detail::row_scratch<W>& buf, estimators::row_summary& s) -> status {
    // Reads lse_s only (here and in the gradient pass).
    TROPD_TRY(detail::row_pass1<estimators::lse_only>(student.row(r), static_cast<const float*>(nullptr), V, its, W(1), buf, r, s));
    const int32_t* tid = teacher.ids.row(r);
    const float* tlp = teacher.logprobs.row(r);
    int32_t* ids = kid.data() + r * K;
    for (int i = 0; i < K; ++i) {
      const bool pad = tlp[i] == -inf<float>();
      ids[i] = pad ? 0 : tid[i];
      buf.ls[static_cast<size_t>(i)] = pad ? 0.0 : double(W(to_acc(student.row(r)[tid[i]])) * its) - s.lse_s;
    }
    double tail = quiet_nan<double>();
    if (est.tail == estimators::topk_tail::tail_bucket)
      tail = detail::student_tail_log(student.row(r), V, its, s.lse_s, tid, K, [&](int i) { return tlp[i] == -inf<float>(); }, buf);
    const auto res = est.eval(tlp, buf.ls.data(), K, kg.data() + r * K, tail);
    if (!res.st.ok()) return make_error(res.st.code, res.st.detail, r, res.st.col);
    val[static_cast<size_t>(r)] = res.value;
    if (res.tail_coef != 0) {  // the tail's c p_v goes to pass 2 as sparse_terms::off (see there)
      // (padding is dropped from the list: pass 2 sets every listed entry)
      int m = 0;
      double gs = 0;
      for (int i = 0; i < K; ++i)
        if (tlp[i] != -inf<float>()) {
          gs += kg[static_cast<size_t>(r * K + m)] = -exp_(double(tlp[i]));
          ids[m++] = tid[i];
        }
      kn[static_cast<size_t>(r)] = m;
      kon[static_cast<size_t>(r)] = gs - (1.0 - res.teacher_mass);
      koff[static_cast<size_t>(r)] = kon[static_cast<size_t>(r)] + res.tail_coef;
    }
    return {};
  };
  auto gradf = [&](index_t r, detail::row_scratch<W>& buf, const estimators::row_summary& s) -> status {
    if (grad.rows == 0) return {};
    const double scale = (grad_scale.size ? grad_scale[r] : 1.0) / opt.student_temperature;
    const size_t rr = static_cast<size_t>(r);
    const detail::sparse_terms sp{kid.data() + r * K, kg.data() + r * K, kn[rr], koff[rr] != kon[rr], kon[rr], koff[rr]};
    return detail::gradient_status(r, detail::row_pass2(detail::no_dense{}, student.row(r), static_cast<const float*>(nullptr), V, its,
                                                        W(1), buf, s, 0.0, sp, scale, grad.row(r), stream));
  };
  TROPD_TRY(detail::run_rows<W>(N, V, opt, sums, grad.rows != 0, false, setup, stats, gradf));
  return detail::write_losses(loss, val);
}

}  // namespace tropd::host
