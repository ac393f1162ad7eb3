// tropd/gpu/detail/vector_io.cuh: how the row kernels move data: 16-byte vector loads of one
// or two rows (read-only path, or evict-first for a row's last read), the conversion of the
// logit types to the work type (fp16 in hardware), streaming vector stores, the geometry of a
// row (scalar head up to 16-byte alignment, vectors, scalar tail), and the sweep that walks a
// block's share of a row with the next vectors' loads in flight before the current ones are
// used.
#pragma once

#include <stdint.h>

#include <type_traits>

#include <cuda_fp16.h>

#include <tropd/core/types.hpp>
#include <tropd/gpu/config.cuh>
#include <tropd/gpu/detail/row_rules.hpp>

namespace tropd::gpu::detail {

template <int Bytes> struct word_of;
template <> struct word_of<2> { using type = unsigned short; };
template <> struct word_of<4> { using type = unsigned int; };
template <> struct word_of<8> { using type = uint2; };
template <> struct word_of<16> { using type = uint4; };

/// N elements of T loaded as one aligned word (N * sizeof(T) in {2, 4, 8, 16}).
template <class T, int N>
struct raw {
  typename word_of<N * int(sizeof(T))>::type w;
};
/// Stands in for the registers of a row a pass does not read.
struct no_raw {};

/// Elements per 16-byte vector of a pass that reads rows of types A and B (the wider decides).
template <class A, class B>
inline constexpr int vec_width = 16 / int(sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));

enum class load_kind { keep, last };  ///< read-only path (ld.global.nc) / evict-first (a row's last read)

template <int N, load_kind K, class T>
__device__ __forceinline__ raw<T, N> load_raw(const T* p) {
  using word = typename word_of<N * int(sizeof(T))>::type;
  const word* q = reinterpret_cast<const word*>(p);
  if constexpr (K == load_kind::last)
    return raw<T, N>{__ldcs(q)};
  else
    return raw<T, N>{__ldg(q)};
}

/// One element in the work type W, unscaled: to_acc's value (fp16 converted by the hardware
/// instruction, which is exact, instead of core/types.hpp's bit arithmetic).
template <class W, class T>
__device__ __forceinline__ W widen(T x) {
  if constexpr (std::is_same_v<T, fp16>)
    return static_cast<W>(__half2float(__ushort_as_half(x.bits)));
  else
    return static_cast<W>(to_acc(x));
}

template <class W, class T, int N>
__device__ __forceinline__ void decode(const raw<T, N>& r, W (&out)[N]) {
  T tmp[N];
  __builtin_memcpy(tmp, &r.w, sizeof tmp);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = widen<W>(tmp[i]);
}

/// Streaming (evict-first) store of N values.
template <int N, class G>
__device__ __forceinline__ void store_vec(G* p, const G (&v)[N]) {
  constexpr int bytes = N * int(sizeof(G));
  if constexpr (bytes >= 16) {
#pragma unroll
    for (int k = 0; k < bytes / 16; ++k) {
      uint4 u;
      __builtin_memcpy(&u, reinterpret_cast<const char*>(v) + 16 * k, 16);
      __stcs(reinterpret_cast<uint4*>(p) + k, u);
    }
  } else {
    using word = typename word_of<bytes>::type;
    word u;
    __builtin_memcpy(&u, v, bytes);
    __stcs(reinterpret_cast<word*>(p), u);
  }
}

/// Visits block b of S's share of a row: f.load<N>(j, regs) and f.compute<N>(j, regs) for the
/// vectors (N = VW, or 1 on the scalar geometry) and N = 1 for the head (block 0) and tail
/// (block S - 1). Each thread takes every block_threads-th vector and issues the load of its
/// next vector before computing the current one, so two vector loads per row are in flight
/// per thread while it computes (about 48 KB per multiprocessor at three resident blocks).
template <int VW, bool Reverse = false, class F>
__device__ __forceinline__ void sweep_vectors(index_t base, index_t v0, index_t v1, F& f) {
  constexpr index_t T = block_threads;
  const index_t first = v0 + threadIdx.x;
  if (first >= v1) return;
  // Reverse: the thread's vectors from its last one down, so that a pass right after another
  // over the same row starts with what the earlier pass read last (still in L2).
  index_t v = Reverse ? first + (v1 - 1 - first) / T * T : first;
  typename F::template regs<VW> cur, next;
  f.template load<VW>(base + v * VW, cur);
  for (;;) {
    const index_t vn = Reverse ? v - T : v + T;
    const bool more = Reverse ? vn >= v0 : vn < v1;
    if (more) f.template load<VW>(base + vn * VW, next);
    f.template compute<VW>(base + v * VW, cur);
    if (!more) break;
    cur = next;
    v = vn;
  }
}

template <int VW, bool Reverse = false, class F>
__device__ __forceinline__ void sweep(const row_geometry& g, int b, int S, F& f) {
  const int t = static_cast<int>(threadIdx.x);
  if (!g.vector) {
    const col_range r = block_columns(g.V, 0, g.V, 1, b, S);
    sweep_vectors<1, Reverse>(0, r.v0, r.v1, f);
    return;
  }
  const col_range r = block_columns(g.V, g.head, g.nvec, VW, b, S);
  if (b == 0)
    for (index_t j = t; j < g.head; j += block_threads) {
      typename F::template regs<1> x;
      f.template load<1>(j, x);
      f.template compute<1>(j, x);
    }
  sweep_vectors<VW, Reverse>(g.head, r.v0, r.v1, f);
  if (b == S - 1)
    for (index_t j = g.head + g.nvec * VW + t; j < g.V; j += block_threads) {
      typename F::template regs<1> x;
      f.template load<1>(j, x);
      f.template compute<1>(j, x);
    }
}

}  // namespace tropd::gpu::detail
