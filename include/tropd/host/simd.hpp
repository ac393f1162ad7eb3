// tropd/host/simd.hpp: the CPU backend's vector primitives over Eigen packets (SSE / AVX /
// AVX-512 / NEON / scalar, whatever the integrator's flags enable).
//
//   chunk, packet_t<W>, lanes<W>, padded(n)     rows are processed in chunks of whole packets
//   exp_nonpos(x)                               e^x for x <= 0 (AVX-512: a faster fp32 version)
//   load_widened, load_scaled, load_scan        bf16 / fp16 / fp32 -> W in registers, times 1/T,
//   stage_chunk, stage_values                   with the chunk's range and finiteness
//   prefetch_plan                               software prefetch of the next chunk
//   packet_sum, all_finite                      reductions
//   store_chunk, stream_fence                   (non-temporal) stores of a gradient chunk
//   packet_ops<W>                               the arithmetic the TROPD_HD rules are written
//                                               against (estimators::moment_element, jsd::log_m)
//
// Host only; nothing here knows about estimators or rows.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include <Eigen/Core>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/types.hpp>
#include <tropd/estimators/row_moments.hpp>

// The per-chunk helpers are small loops over packets called once per chunk; they must be
// inlined into the row passes (measured: ~1.5x slower row passes when GCC keeps them out of
// line in a large translation unit).
#if defined(__GNUC__) || defined(__clang__)
#define TROPD_HOST_INLINE inline __attribute__((always_inline))
#else
#define TROPD_HOST_INLINE inline
#endif

namespace tropd::host::detail {

using estimators::exp_floor;

/// Elements per chunk of a row (a multiple of every packet width).
inline constexpr index_t chunk = 1024;

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


/// Calls f(std::bool_constant<a>{}, ...) for four run-time flags: one instantiation of a
/// chunk loop per combination, chosen once per chunk.
template <class F>
TROPD_HOST_INLINE void with_flags(bool a, bool b, bool c, bool d, F&& f) {
  auto d4 = [&](auto A, auto B, auto C) { d ? f(A, B, C, std::true_type{}) : f(A, B, C, std::false_type{}); };
  auto d3 = [&](auto A, auto B) { c ? d4(A, B, std::true_type{}) : d4(A, B, std::false_type{}); };
  auto d2 = [&](auto A) { b ? d3(A, std::true_type{}) : d3(A, std::false_type{}); };
  a ? d2(std::true_type{}) : d2(std::false_type{});
}

/// The arithmetic of the TROPD_HD element rules (estimators::scalar_ops' members) on
/// packets of W, so the CPU evaluates exactly the rule the GPU evaluates per element.
template <class W>
struct packet_ops {
  using scalar = W;
  using P = packet_t<W>;
  static P set1(W x) noexcept { return pk::pset1<P>(x); }
  static P add(const P& x, const P& y) noexcept { return pk::padd(x, y); }
  static P sub(const P& x, const P& y) noexcept { return pk::psub(x, y); }
  static P mul(const P& x, const P& y) noexcept { return pk::pmul(x, y); }
  static P lt(const P& x, const P& y) noexcept { return pk::pcmp_lt(x, y); }
  static P select(const P& m, const P& x, const P& y) noexcept { return pk::pselect(m, x, y); }
  static P exp_nonpos(const P& x) noexcept { return detail::exp_nonpos(x); }
  static P log(const P& x) noexcept { return pk::plog(x); }
};

}  // namespace tropd::host::detail
