// tropd/gpu/rows.cuh: the CUDA backend's row passes and token-level kernels (docs/gpu.md).
//
// The kernels call the SAME TROPD_HD policy code as the CPU backend (host/rows.hpp,
// host/objective.hpp); they differ only in how row statistics are gathered:
//
//   pass 1   per thread: mergeable row_moments over 16-byte vectorised, coalesced loads
//            (float4 for fp32, 8 x 16-bit for bf16/fp16, 2 x fp64), fp32 accumulation in
//            the thread (fp64 for fp64 inputs) over at most 16 vectors at a time, each such
//            partial merged into the thread's fp64 row_moments; threads (and, on the split
//            path, blocks) are merged with row_moments::merge in DOUBLE (CUB BlockReduce),
//            then estimators::summarize, as the host does (fp32 chunks, fp64 merges);
//   pass 1b  (JSD, TV) the estimator's accumulate() sums, double per thread, merged in double;
//   pass 2   dL/dz_j = scale * (w * est.grad_j + g_j - p_j * sum_v g_v), scale = grad_scale / T_S,
//            the host's row_pass2 formula, evaluated in the same precision (fp32 for 16/32-bit
//            inputs), then sparse terms g (sampled token, teacher top-k ids) added in list order.
//
// Entry points (all stream-ordered, none allocates, none synchronises):
//   divergence_rows      reverse_kl / forward_kl / jsd / total_variation, loss + dL/dz
//   sampled_rows         sampled<k1|k2|k3, as_pg_reward|as_loss> with full teacher logits
//   topk_forward_kl_rows teacher top-k FKL with given lists (ids + log-probs)
//   evaluate_tokens      tropd::evaluate_token per token, given trust decisions
//   decide, decide_stochastic
//                        a region's trusted() per token (stochastic_acceptance: the same
//                        Philox key (seed, step, seq_id, position) as the host)
// Each takes a device_context {scratch, scratch_bytes, stream}; scratch is sized by the
// matching *_scratch_bytes() function and must be 16-byte aligned (cudaMalloc gives 256).
//
// Errors. Argument errors the host can see (shapes, parameters, scratch size, temperatures)
// are returned as tropd::status before anything is launched. Data errors need a device-side
// check (NaN / +inf logits, rows without a finite entry, ids out of range, bad top-k lists,
// infinite divergences, non-finite grad_scale): the kernels do NOT stop on them. They record
// the first one, i.e. the smallest (row, column) pair, in a 64-bit STATUS WORD at the start of
// the scratch (cleared by each call) and write NaN into every bad row's loss and gradient. After the
// stream has reached the end of the call, read it with read_status() (which synchronises the
// stream, and says so) or copy status_word(scratch) yourself and decode_status() it.
// Outputs of a call whose status word reports an error are unspecified beyond that.
//
// Inputs must not alias outputs (the kernels read inputs through the read-only data path).
//
// Device code: include this header only from .cu files compiled by nvcc with -std=c++20.
#pragma once

#if !defined(__CUDACC__)
#error "tropd/gpu/rows.cuh is CUDA code: compile this translation unit with nvcc (host-only code includes <tropd/tropd.hpp>)"
#endif
#if __cplusplus < 202002L
#error "tropd/gpu needs C++20: compile with nvcc -std=c++20 (CMake 3.25 with nvcc 13: add -std=c++20 yourself)"
#endif

#include <stddef.h>
#include <stdint.h>

#include <type_traits>

#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include <tropd/config.hpp>
#include <tropd/core/checks.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/tokens.hpp>
#include <tropd/core/types.hpp>
#include <tropd/core/views.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/sampled.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/objective.hpp>
#include <tropd/regions/regions.hpp>

namespace tropd::gpu {

// ===========================================================================
// Configuration, options, the device status word
// ===========================================================================

/// Threads per block of every row kernel.
inline constexpr int block_threads = 256;
/// Largest top-k list length the row path accepts (the list lives in shared memory).
inline constexpr int max_topk = 1024;
/// Largest row count and vocabulary (the status word packs row + 1 and column + 1 in 28 bits each).
inline constexpr index_t max_extent = (index_t(1) << 28) - 2;
/// Required alignment of the scratch pointer.
inline constexpr size_t scratch_alignment = 16;

/// Where a call runs: caller-owned device scratch and the stream everything is ordered on.
struct device_context {
  void* scratch = nullptr;   ///< device memory of at least the entry point's *_scratch_bytes()
  size_t scratch_bytes = 0;  ///< its size
  cudaStream_t stream = 0;   ///< every copy, memset and launch of the call goes here
};

/// Options of the row-level entry points.
struct row_options {
  double student_temperature = 1.0;  ///< T_S (> 0): student logits are divided by it
  double teacher_temperature = 1.0;  ///< T_T (> 0): teacher logits are divided by it (not applied to given top-k lists)
  /// 0: heuristic (see choose_blocks_per_row); 1: the fused kernel, one block per row;
  /// > 1: the split-row path with this many blocks per row.
  int blocks_per_row = 0;
  /// Multiprocessor count the heuristic plans for; 0: ask the current device
  /// (cudaDeviceGetAttribute, no synchronisation). Give the same options to *_scratch_bytes.
  int sm_count = 0;
};

/// Which check found a bad input (the low 4 bits of the status word).
enum class check_site : uint8_t {
  none = 0,
  student_logits = 1,     ///< NaN / +inf in a student logits row (column: first bad entry)
  teacher_logits = 2,     ///< NaN / +inf in a teacher logits row
  student_row_empty = 3,  ///< a student row is -inf everywhere
  teacher_row_empty = 4,  ///< a teacher row is -inf everywhere
  divergence = 5,         ///< the full-vocabulary divergence is infinite
  sampled_token = 6,      ///< sampled id out of range (column: the id, -1 if negative) or zero mass
  s_old = 7,              ///< s_old not finite
  estimator = 8,          ///< the sampled estimator overflows
  topk_list = 9,          ///< a teacher top-k entry is NaN/+inf, out of range or repeated (column: entry)
  topk_eval = 10,         ///< topk_forward_kl::eval rejected the row (column: entry, if any)
  grad_scale = 11,        ///< grad_scale is not finite
  token_input = 12,       ///< token-level input: bad origin tag, non-finite s / s_old, NaN/+inf t
  token_rule = 13,        ///< evaluate_token returned an error for this token
  seq_offsets = 14,       ///< seq_offsets do not start at 0, end at n, or decrease
  gradient = 15,          ///< a gradient value does not fit the output type (column: first such entry)
};

namespace detail {

inline constexpr unsigned long long status_clear = ~0ull;
inline constexpr long long no_bad = 0x7fffffffffffffffll;
inline constexpr unsigned long long field_max = (1ull << 28) - 1;

TROPD_HD constexpr unsigned long long encode_status(errc code, check_site where, index_t row, index_t col) noexcept {
  const unsigned long long r = row < 0 ? 0ull : (static_cast<unsigned long long>(row) + 1 > field_max ? field_max : static_cast<unsigned long long>(row) + 1);
  const unsigned long long c = col < 0 ? 0ull : (static_cast<unsigned long long>(col) + 1 > field_max ? field_max : static_cast<unsigned long long>(col) + 1);
  return (r << 36) | (c << 8) | ((static_cast<unsigned long long>(code) & 15ull) << 4) |
         (static_cast<unsigned long long>(where) & 15ull);
}

/// Records a device-side error; the smallest (row, column, code, site) wins, so the word
/// holds the first bad row, and in it the first bad column, whatever the thread order.
__device__ inline void report(unsigned long long* word, errc code, check_site where, index_t row, index_t col) {
  atomicMin(word, encode_status(code, where, row, col));
}

inline const char* site_detail(check_site s) noexcept {
  switch (s) {
    case check_site::none: return "";
    case check_site::student_logits: return "student logits contain NaN or +inf (device check)";
    case check_site::teacher_logits: return "teacher logits contain NaN or +inf (device check)";
    case check_site::student_row_empty: return "student logits row is -inf everywhere (device check)";
    case check_site::teacher_row_empty: return "teacher logits row is -inf everywhere (device check)";
    case check_site::divergence:
      return "the divergence is infinite: one distribution gives zero mass where the other has mass (device check)";
    case check_site::sampled_token:
      return "sampled token: id outside [0, V) (column = the id, -1 if negative), or zero student / teacher mass "
             "(infinite_divergence; use a trust region or a reward clip) (device check)";
    case check_site::s_old: return "s_old is not finite (device check)";
    case check_site::estimator: return "the estimator overflows for this token (device check)";
    case check_site::topk_list:
      return "teacher top-k list entry: NaN/+inf log-prob, id outside [0, V) or a repeated id (see the code; column = entry) (device check)";
    case check_site::topk_eval:
      return "topk_forward_kl rejected the row: zero student mass at a teacher id, no finite entry, or mass > 1 (see the code) (device check)";
    case check_site::grad_scale: return "grad_scale is not finite (device check)";
    case check_site::gradient:
      return "the gradient does not fit the output type (grad_scale / temperature too large, or logits at the edge of the range); "
             "gradient rows may be partly written (device check)";
    case check_site::token_input:
      return "token input: origin tag not prompt/teacher/student, s or s_old not finite, t NaN/+inf, or s / t > 0 "
             "(log-probabilities expected) (see the code) (device check)";
    case check_site::token_rule: return "the per-token rule (evaluate_token) failed for this token (see the code) (device check)";
    case check_site::seq_offsets: return "seq_offsets must start at 0, end at n and never decrease (device check)";
  }
  return "device check";
}

}  // namespace detail

/// Decodes a status word: ok for a clear word, else the code, a detail naming the check, the
/// row (token) and the column (vocabulary id or list entry; -1 where not applicable).
inline status decode_status(unsigned long long word) noexcept {
  if (word == detail::status_clear) return {};
  const index_t row = static_cast<index_t>(word >> 36) - 1;
  const index_t col = static_cast<index_t>((word >> 8) & detail::field_max) - 1;
  const auto code = static_cast<errc>((word >> 4) & 15u);
  const auto site = static_cast<check_site>(word & 15u);
  return make_error(code, detail::site_detail(site), row, col);
}

/// Device address of the status word inside a call's scratch.
inline const unsigned long long* status_word(const void* scratch) noexcept {
  return static_cast<const unsigned long long*>(scratch);
}

/// Copies the status word back and decodes it. SYNCHRONISES `stream` (the only function
/// here that does): call it once the call's results are needed anyway.
inline status read_status(const void* scratch, cudaStream_t stream) {
  unsigned long long word = detail::status_clear;
  cudaError_t e = cudaMemcpyAsync(&word, scratch, sizeof word, cudaMemcpyDeviceToHost, stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) return make_error(errc::backend_error, cudaGetErrorString(e));
  return decode_status(word);
}

/// The split-row heuristic (docs/gpu.md): one block per row (the fused kernel) when there
/// are at least 4 rows per multiprocessor; otherwise enough blocks per row to give every
/// multiprocessor ~4 blocks, but never fewer than 4096 columns per block.
constexpr int choose_blocks_per_row(index_t rows, index_t V, int sm_count) noexcept {
  const index_t target = 4 * index_t(sm_count > 0 ? sm_count : 1);
  if (rows <= 0 || rows >= target) return 1;
  index_t s = (target + rows - 1) / rows;
  const index_t by_width = V / 4096;
  if (s > by_width) s = by_width;
  if (s > 1024) s = 1024;
  return s < 2 ? 1 : static_cast<int>(s);
}

namespace detail {

inline status cuda_status(cudaError_t e) noexcept {
  return e == cudaSuccess ? status{} : make_error(errc::backend_error, cudaGetErrorString(e));
}
#define TROPD_GPU_TRY_CUDA(expr)                                           \
  do {                                                                     \
    const cudaError_t tropd_gpu_e_ = (expr);                               \
    if (tropd_gpu_e_ != cudaSuccess) return ::tropd::gpu::detail::cuda_status(tropd_gpu_e_); \
  } while (0)

/// Blocks per row for a call (options or heuristic). Never synchronises.
inline int resolve_blocks_per_row(index_t rows, index_t V, const row_options& opt) noexcept {
  if (opt.blocks_per_row > 0) return opt.blocks_per_row > 1024 ? 1024 : opt.blocks_per_row;
  int sm = opt.sm_count;
  if (sm <= 0) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      sm = 132;  // no device to ask: plan for an H100 (the launch itself will report the error)
  }
  return choose_blocks_per_row(rows, V, sm);
}

constexpr size_t align_up(size_t x, size_t a = 256) noexcept { return (x + a - 1) / a * a; }

/// Per-row state shared by the stages of a row (shared memory on the fused path, scratch on
/// the split path).
struct row_state {
  estimators::row_summary s{};
  double value = 0;  ///< the row's loss
  double gsum = 0;   ///< sum of the sparse coefficients
  double scale = 0;  ///< grad_scale / T_S
  int ok = 0;        ///< 1 when the statistics are valid
  int n_sparse = 0;  ///< entries in the sparse list
};

/// Mergeable pass-1 partial of a thread / block: moments in double and the first bad entry
/// (2 * column + 1 for the teacher, so the student wins a tie).
struct partial {
  estimators::row_moments<double> m{};
  long long bad = no_bad;
};
struct merge_partial {
  __device__ partial operator()(partial a, const partial& b) const {
    a.m.merge(b.m);
    if (b.bad < a.bad) a.bad = b.bad;
    return a;
  }
};
struct acc2 {
  double v0 = 0, v1 = 0;
};
struct sum_acc2 {
  __device__ acc2 operator()(acc2 a, const acc2& b) const { return acc2{a.v0 + b.v0, a.v1 + b.v1}; }
};

/// Scratch layout of a row call.
struct row_layout {
  int S = 1;              ///< blocks per row
  size_t states = 0;      ///< row_state[rows]            (split only)
  size_t partials = 0;    ///< partial[rows * S]          (split only)
  size_t accs = 0;        ///< acc2[rows * S]             (split, second-pass estimators)
  size_t sparse_ids = 0;  ///< int32[rows * M]            (split, M sparse entries per row)
  size_t sparse_coef = 0; ///< double[rows * M]
  size_t total = 0;
};
inline row_layout make_layout(index_t rows, int S, bool second_pass, index_t M) noexcept {
  row_layout L;
  L.S = S;
  size_t off = 256;  // the status word
  if (S > 1) {
    const size_t R = static_cast<size_t>(rows);
    L.states = off;
    off = align_up(off + R * sizeof(row_state));
    L.partials = off;
    off = align_up(off + R * size_t(S) * sizeof(partial));
    if (second_pass) {
      L.accs = off;
      off = align_up(off + R * size_t(S) * sizeof(acc2));
    }
    if (M > 0) {
      L.sparse_ids = off;
      off = align_up(off + R * size_t(M) * sizeof(int32_t));
      L.sparse_coef = off;
      off = align_up(off + R * size_t(M) * sizeof(double));
    }
  }
  L.total = off;
  return L;
}

// ---------------------------------------------------------------------------
// Vectorised loads and stores
// ---------------------------------------------------------------------------

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

/// Stands in for the teacher registers of student-only passes.
struct no_raw {};

/// Elements per 16-byte vector: 4 x fp32, 8 x bf16/fp16, 2 x fp64 (the wider type decides).
template <class TS, class TT>
inline constexpr int vec_width = 16 / int(sizeof(TS) > sizeof(TT) ? sizeof(TS) : sizeof(TT));

template <int N, bool Stream, class T>
__device__ __forceinline__ raw<T, N> load_raw(const T* p) {
  using word = typename word_of<N * int(sizeof(T))>::type;
  const word* q = reinterpret_cast<const word*>(p);
  if constexpr (Stream)
    return raw<T, N>{__ldcs(q)};  // last use: evict first
  else
    return raw<T, N>{__ldg(q)};
}

/// out[i] = W(to_acc(x_i)) * scale: the host's load_scaled, element by element.
template <class W, class T, int N>
__device__ __forceinline__ void decode(const raw<T, N>& r, W (&out)[N], W scale) {
  T tmp[N];
  __builtin_memcpy(tmp, &r.w, sizeof tmp);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<W>(to_acc(tmp[i])) * scale;
}

template <class G, int N>
inline constexpr int store_align = (N * int(sizeof(G))) >= 16 ? 16 : N * int(sizeof(G));

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

// ---------------------------------------------------------------------------
// Row geometry: a scalar head up to the first 16-byte boundary of the student row, VW-wide
// vectors, a scalar tail. When the teacher row or the output row is not aligned like the
// student row (different strides or types), the whole row takes the scalar (still coalesced) path.
// ---------------------------------------------------------------------------

struct geom {
  int head = 0;  ///< scalar elements before the first vector
  int nvec = 0;  ///< vectors of VW elements
  int V = 0;
};

template <int VW, class TS, class TT, class G>
__device__ __forceinline__ geom make_geom(const TS* ps, const TT* pt, const G* po, int V) {
  const uintptr_t as = reinterpret_cast<uintptr_t>(ps);
  const int mis = static_cast<int>((as / sizeof(TS)) % VW);
  int head = mis ? VW - mis : 0;
  if (head > V) head = V;
  bool ok = (as % sizeof(TS)) == 0;
  if (pt) ok = ok && (reinterpret_cast<uintptr_t>(pt + head) % (uintptr_t(VW) * sizeof(TT))) == 0;
  if (po) ok = ok && (reinterpret_cast<uintptr_t>(po + head) % uintptr_t(store_align<G, VW>)) == 0;
  if (!ok) head = V;
  return geom{head, (V - head) / VW, V};
}

/// Columns [c0, c1) that block b of S covers (vector ranges split evenly; block 0 also
/// takes the head, block S - 1 the tail).
template <int VW>
__device__ __forceinline__ void col_range(const geom& g, int b, int S, int& c0, int& c1) {
  const int v0 = static_cast<int>(static_cast<long long>(g.nvec) * b / S);
  const int v1 = static_cast<int>(static_cast<long long>(g.nvec) * (b + 1) / S);
  c0 = b == 0 ? 0 : g.head + v0 * VW;
  c1 = b == S - 1 ? g.V : g.head + v1 * VW;
}

/// Visits block b's share of a row: f.load<N>(j, regs) then f.compute<N>(j, regs) for
/// N = VW (vectors, two in flight per thread) or N = 1 (head and tail).
template <int VW, class F>
__device__ __forceinline__ void sweep(const geom& g, int b, int S, F& f) {
  const int t = static_cast<int>(threadIdx.x);
  const int v0 = static_cast<int>(static_cast<long long>(g.nvec) * b / S);
  const int v1 = static_cast<int>(static_cast<long long>(g.nvec) * (b + 1) / S);
  if (b == 0) {
    for (int j = t; j < g.head; j += block_threads) {
      typename F::template regs<1> x;
      f.template load<1>(j, x);
      f.template compute<1>(j, x);
    }
  }
  for (int v = v0 + t; v < v1; v += 2 * block_threads) {
    const int j0 = g.head + v * VW;
    const int j1 = j0 + block_threads * VW;
    const bool two = v + block_threads < v1;
    typename F::template regs<VW> x0, x1;
    f.template load<VW>(j0, x0);
    if (two) f.template load<VW>(j1, x1);
    f.template compute<VW>(j0, x0);
    if (two) f.template compute<VW>(j1, x1);
  }
  if (b == S - 1) {
    for (int j = g.head + g.nvec * VW + t; j < g.V; j += block_threads) {
      typename F::template regs<1> x;
      f.template load<1>(j, x);
      f.template compute<1>(j, x);
    }
  }
}

// ---------------------------------------------------------------------------
// The three per-element passes
// ---------------------------------------------------------------------------

/// Vectors a thread sums in its fp32 row_moments before merging them into its fp64 one.
inline constexpr int flush_vectors = 16;

/// Pass 1: per-thread row_moments<W> (the definition in estimators/full_vocab.hpp, built one
/// vector at a time: rebase to the vector's maxima with row_moments::rebase, then add each
/// element's weighted terms; zero-weight terms contribute exactly 0) and the first bad entry.
/// Every flush_vectors vectors the W (fp32) partial sums are merged into a row_moments<double>
/// (row_moments::merge) and restarted, so no fp32 sum runs over more than 16 vectors
/// (64 fp32 / 128 bf16 elements) whatever V: the host's fp32-chunk / fp64-merge split.
template <class W, bool HasT, class TS, class TT>
struct moments_pass {
  const TS* zs;
  const TT* zt;
  W its, itt;
  estimators::row_moments<W> m{};
  long long bad = no_bad;
  estimators::row_moments<double> acc{};
  int pending = 0;

  template <int N>
  struct regs {
    raw<TS, N> a;
    std::conditional_t<HasT, raw<TT, N>, no_raw> b;
  };
  template <int N>
  __device__ __forceinline__ void load(int j, regs<N>& x) const {
    x.a = load_raw<N, false>(zs + j);
    if constexpr (HasT) x.b = load_raw<N, false>(zt + j);
  }
  template <int N>
  __device__ __forceinline__ void compute(int j, const regs<N>& x) {
    W a[N];
    [[maybe_unused]] W b[N];
    decode(x.a, a, its);
    if constexpr (HasT) decode(x.b, b, itt);
    W vs = -inf<W>(), vt = -inf<W>();
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (!(a[i] < inf<W>())) bad = min_(bad, 2ll * (j + i));
      vs = max_(vs, a[i]);
      if constexpr (HasT) {
        if (!(b[i] < inf<W>())) bad = min_(bad, 2ll * (j + i) + 1);
        vt = max_(vt, b[i]);
      }
    }
    if (vs > m.ms || (HasT && vt > m.mt)) m.rebase(max_(m.ms, vs), HasT ? max_(m.mt, vt) : m.mt);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const W da = a[i] - m.ms;
      const W ws = exp_(da);
      if constexpr (HasT) {
        const W db = b[i] - m.mt;
        // Cross sums follow the supports, not exp underflow (as the host's chunk_sums):
        // a > -inf = b makes xs +inf whatever e^{a - ms} rounds to.
        const bool sa = a[i] != -inf<W>(), sb = b[i] != -inf<W>();
        if (ws > W(0)) {
          m.ss += ws;
          m.es += ws * da;
          if (sb) m.xs += ws * (da - db);
        }
        if (sa && !sb) m.xs = inf<W>();
        const W wt = exp_(db);
        if (wt > W(0)) {
          m.st += wt;
          m.et += wt * db;
          if (sa) m.xt += wt * (db - da);
        }
        if (sb && !sa) m.xt = inf<W>();
      } else {
        if (ws > W(0)) {
          m.ss += ws;
          m.es += ws * da;
        }
      }
    }
    if (++pending == flush_vectors) flush();
  }
  /// acc += m (in double); m keeps its maxima and restarts its sums.
  __device__ __forceinline__ void flush() {
    acc.merge(wide());
    m.ss = m.es = m.xs = W(0);
    m.st = m.et = m.xt = W(0);
    pending = 0;
  }
  __device__ __forceinline__ estimators::row_moments<double> wide() const {
    estimators::row_moments<double> d;
    d.ms = m.ms; d.ss = m.ss; d.es = m.es; d.xs = m.xs;
    d.mt = m.mt; d.st = m.st; d.et = m.et; d.xt = m.xt;
    return d;
  }
  __device__ partial widened() const {
    partial p;
    p.m = acc;
    p.m.merge(wide());
    p.bad = bad;
    return p;
  }
};

/// Pass 1b: est.accumulate(ls, lt, p, q, acc) per element, as host row_pass1b.
template <class W, class Est, class TS, class TT>
struct second_pass {
  const TS* zs;
  const TT* zt;
  W its, itt, lse_s, lse_t;
  Est est;
  double acc[2] = {0, 0};

  template <int N>
  struct regs {
    raw<TS, N> a;
    raw<TT, N> b;
  };
  template <int N>
  __device__ __forceinline__ void load(int j, regs<N>& x) const {
    x.a = load_raw<N, false>(zs + j);
    x.b = load_raw<N, false>(zt + j);
  }
  template <int N>
  __device__ __forceinline__ void compute(int, const regs<N>& x) {
    W a[N], b[N];
    decode(x.a, a, its);
    decode(x.b, b, itt);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const W ls = a[i] - lse_s, lt = b[i] - lse_t;
      est.accumulate(ls, lt, exp_(ls), exp_(lt), acc);
    }
  }
};

/// Pass 2: out_j = G(wd * est.grad(ls, lt, p, q, s) - wg * p) (Dense) or G(-wg * p),
/// exactly host row_pass2's expression.
template <class W, bool Dense, class Est, class TS, class TT, class G>
struct grad_pass {
  const TS* zs;
  const TT* zt;
  G* out;
  W its, itt, lse_s, lse_t, wd, wg;
  Est est;
  estimators::row_summary s;
  unsigned long long* status;
  index_t row;

  template <int N>
  struct regs {
    raw<TS, N> a;
    std::conditional_t<Dense, raw<TT, N>, no_raw> b;
  };
  template <int N>
  __device__ __forceinline__ void load(int j, regs<N>& x) const {
    x.a = load_raw<N, true>(zs + j);
    if constexpr (Dense) x.b = load_raw<N, true>(zt + j);
  }
  template <int N>
  __device__ __forceinline__ void compute(int j, const regs<N>& x) const {
    W a[N];
    decode(x.a, a, its);
    G o[N];
    if constexpr (Dense) {
      W b[N];
      decode(x.b, b, itt);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const W ls = a[i] - lse_s, lt = b[i] - lse_t;
        const W p = exp_(ls), q = exp_(lt);
        o[i] = static_cast<G>(wd * est.template grad<W>(ls, lt, p, q, s) - wg * p);
      }
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) o[i] = static_cast<G>(-wg * exp_(a[i] - lse_s));
    }
    // As the host's row_pass2: a value that does not fit G is an error, not an ok inf / NaN.
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (!is_finite(o[i])) report(status, errc::infinite_divergence, check_site::gradient, row, j + i);
    store_vec<N>(out + j, o);
  }
};

/// Estimator placeholder of rows with only sparse gradient terms (as host detail::no_dense).
struct no_dense {
  static constexpr bool second_pass = false;
  template <class F>
  TROPD_HD constexpr void accumulate(F, F, F, F, double*) const noexcept {}
  template <class F>
  TROPD_HD constexpr F grad(F, F, F, F, const estimators::row_summary&) const noexcept { return F(0); }
};

// ---------------------------------------------------------------------------
// Row arguments and tasks
// ---------------------------------------------------------------------------

template <class TS, class TT, class G>
struct rows_args {
  const TS* zs = nullptr;
  index_t zs_stride = 0;
  const TT* zt = nullptr;  ///< nullptr for student-only tasks
  index_t zt_stride = 0;
  int rows = 0, V = 0;
  double its = 1, itt = 1;  ///< 1 / T_S, 1 / T_T (converted to the work type like the host)
  double ts = 1;            ///< T_S
  G* grad = nullptr;        ///< nullptr: value only
  index_t grad_stride = 0;
  const double* grad_scale = nullptr;
  double* loss = nullptr;
  estimators::row_summary* summaries = nullptr;
  unsigned long long* status = nullptr;
};

/// Full-vocabulary divergence rows (divergence_rows).
template <class Est>
struct dense_task {
  using est_type = Est;
  static constexpr bool has_teacher = true, dense = true, second = Est::second_pass;
  static constexpr int smem_per_entry = 0;
  Est est{};
  TROPD_HD int max_sparse() const { return 0; }
};

/// Sampled-token rows (sampled_rows).
template <class E, class U>
struct sampled_task {
  using est_type = no_dense;
  static constexpr bool has_teacher = true, dense = false, second = false;
  static constexpr int smem_per_entry = 24;
  estimators::sampled<E, U> est{};
  const int32_t* ids = nullptr;
  const double* s_old = nullptr;
  TROPD_HD int max_sparse() const { return 1; }
};

/// Given teacher top-k lists (topk_forward_kl_rows).
struct topk_task {
  using est_type = no_dense;
  static constexpr bool has_teacher = false, dense = false, second = false;
  static constexpr int smem_per_entry = 24;  // coef, ls (double), id (int32), lq (float)
  estimators::topk_forward_kl est{};
  const int32_t* ids = nullptr;
  index_t ids_stride = 0;
  const float* lp = nullptr;
  index_t lp_stride = 0;
  int K = 0;
  TROPD_HD int max_sparse() const { return K; }
};

/// The estimator pass 1b / pass 2 evaluate: the divergence for dense tasks, no_dense otherwise.
template <class Task>
__device__ __forceinline__ typename Task::est_type dense_estimator(const Task& t) {
  if constexpr (Task::dense)
    return t.est;
  else
    return typename Task::est_type{};
}

/// Sparse list storage: coef[M] (double), ls[M] (double), id[M] (int32), lq[M] (float).
struct sparse_smem {
  double* coef;
  double* ls;
  int32_t* id;
  float* lq;
};
__device__ __forceinline__ sparse_smem carve(unsigned char* base, int M) {
  sparse_smem s;
  s.coef = reinterpret_cast<double*>(base);
  s.ls = s.coef + M;
  s.id = reinterpret_cast<int32_t*>(s.ls + M);
  s.lq = reinterpret_cast<float*>(s.id + M);
  return s;
}

template <class W, bool HasT>
__device__ void finish_moments(const partial& p, index_t r, unsigned long long* st, row_state& rs) {
  rs.ok = 0;  // (shared memory is not initialised by row_state's member initialisers)
  rs.s = estimators::row_summary{};
  rs.value = 0;
  if (p.bad != no_bad) {
    report(st, errc::non_finite_input, (p.bad & 1) ? check_site::teacher_logits : check_site::student_logits, r, p.bad >> 1);
    return;
  }
  if (!(p.m.ss > 0)) {
    report(st, errc::no_finite_entry, check_site::student_row_empty, r, -1);
    return;
  }
  if (HasT && !(p.m.st > 0)) {
    report(st, errc::no_finite_entry, check_site::teacher_row_empty, r, -1);
    return;
  }
  estimators::row_moments<double> mom = p.m;
  if (!HasT) { mom.mt = 0; mom.st = 1; mom.xs = 0; mom.xt = 0; mom.et = 0; }
  rs.s = estimators::summarize(mom);
  if (!HasT) { rs.s.lse_t = 0; rs.s.rkl = rs.s.fkl = rs.s.ent_t = 0; }
  rs.ok = 1;
}

/// Row finalisation after pass 1 (block-cooperative: every thread calls it; it ends with a
/// barrier). Sets value, the sparse list (sp) and gsum; clears rs.ok on a bad row.
template <class Est, class TS, class TT, class G>
__device__ void finalize_row(const dense_task<Est>& t, const rows_args<TS, TT, G>& a, index_t r, row_state& rs, sparse_smem) {
  if (threadIdx.x == 0) {
    rs.n_sparse = 0;
    rs.gsum = 0;
    if (rs.ok) {
      if (!t.est.finite(rs.s)) {
        report(a.status, errc::infinite_divergence, check_site::divergence, r, -1);
        rs.ok = 0;
      } else if constexpr (!Est::second_pass) {
        rs.value = t.est.value(rs.s);
      }
    }
  }
  __syncthreads();
}

template <class E, class U, class TS, class TT, class G>
__device__ void finalize_row(const sampled_task<E, U>& t, const rows_args<TS, TT, G>& a, index_t r, row_state& rs, sparse_smem sp) {
  using W = std::conditional_t<std::is_same_v<TS, double> || std::is_same_v<TT, double>, double, float>;
  if (threadIdx.x == 0) {
    rs.n_sparse = 0;
    rs.gsum = 0;
    const int32_t y = t.ids[r];
    if (y < 0 || y >= a.V) {
      report(a.status, errc::id_out_of_range, check_site::sampled_token, r, y < 0 ? -1 : y);
      rs.ok = 0;
    } else if (t.s_old && !is_finite(t.s_old[r])) {
      report(a.status, errc::non_finite_input, check_site::s_old, r, -1);
      rs.ok = 0;
    } else if (rs.ok) {
      const double sy = double(W(to_acc(a.zs[r * a.zs_stride + y])) * W(a.its)) - rs.s.lse_s;
      const double ty = double(W(to_acc(a.zt[r * a.zt_stride + y])) * W(a.itt)) - rs.s.lse_t;
      if (sy == -inf<double>() || ty == -inf<double>()) {
        report(a.status, errc::infinite_divergence, check_site::sampled_token, r, y);
        rs.ok = 0;
      } else {
        const estimators::sampled_result v = t.est(sy, t.s_old ? t.s_old[r] : sy, ty);
        if (!is_finite(v.loss) || !is_finite(v.dloss_ds)) {
          report(a.status, errc::infinite_divergence, check_site::estimator, r, y);
          rs.ok = 0;
        } else {
          rs.value = v.loss;
          sp.id[0] = y;
          sp.coef[0] = v.dloss_ds;
          rs.n_sparse = 1;
          rs.gsum = v.dloss_ds;
        }
      }
    }
  }
  __syncthreads();
}

template <class TS, class TT, class G>
__device__ void finalize_row(const topk_task& t, const rows_args<TS, TT, G>& a, index_t r, row_state& rs, sparse_smem sp) {
  using W = std::conditional_t<std::is_same_v<TS, double>, double, float>;
  __shared__ int first_bad;
  if (threadIdx.x == 0) first_bad = 0x7fffffff;
  __syncthreads();
  const int32_t* tid = t.ids + r * t.ids_stride;
  const float* tlp = t.lp + r * t.lp_stride;
  // host check_topk_row, one entry per thread: key = 4 * entry + kind.
  for (int i = static_cast<int>(threadIdx.x); i < t.K; i += block_threads) {
    const float lp = tlp[i];
    const int32_t id = tid[i];
    int key = 0x7fffffff;
    if (!(lp < inf<float>())) {
      key = 4 * i + 0;
    } else if (lp != -inf<float>()) {
      if (id < 0 || id >= a.V) {
        key = 4 * i + 1;
      } else {
        for (int j = 0; j < i; ++j)
          if (tlp[j] != -inf<float>() && tid[j] == id) { key = 4 * i + 2; break; }
      }
    }
    if (key != 0x7fffffff) atomicMin(&first_bad, key);
    const bool pad = lp == -inf<float>();
    const bool usable = key == 0x7fffffff && rs.ok;
    sp.lq[i] = lp;
    sp.id[i] = pad || !usable ? 0 : id;
    sp.ls[i] = pad || !usable ? 0.0 : double(W(to_acc(a.zs[r * a.zs_stride + id])) * W(a.its)) - rs.s.lse_s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    rs.n_sparse = 0;
    rs.gsum = 0;
    if (first_bad != 0x7fffffff) {
      const int kind = first_bad & 3;
      const errc code = kind == 0 ? errc::non_finite_input : (kind == 1 ? errc::id_out_of_range : errc::duplicate_topk_id);
      report(a.status, code, check_site::topk_list, r, first_bad >> 2);
      rs.ok = 0;
    } else if (rs.ok) {
      const estimators::topk_result res = t.est.eval(sp.lq, sp.ls, t.K, sp.coef);
      if (!res.st.ok()) {
        report(a.status, res.st.code, check_site::topk_eval, r, res.st.col);
        rs.ok = 0;
      } else {
        rs.value = res.value;
        rs.n_sparse = t.K;
        double g = 0;
        for (int i = 0; i < t.K; ++i) g += sp.coef[i];
        rs.gsum = g;
      }
    }
  }
  __syncthreads();
}

/// Loss, user summary, gradient scale (thread 0).
template <class Task, class TS, class TT, class G>
__device__ void publish_row(const Task& t, const rows_args<TS, TT, G>& a, index_t r, row_state& rs) {
  if constexpr (Task::dense && Task::second) {
    if (rs.ok) rs.value = t.est.value(rs.s);
  }
  rs.scale = (a.grad_scale ? a.grad_scale[r] : 1.0) / a.ts;
  if (a.grad && !is_finite(rs.scale)) {
    report(a.status, errc::non_finite_input, check_site::grad_scale, r, -1);
    rs.ok = 0;
  }
  a.loss[r] = rs.ok ? rs.value : quiet_nan<double>();
  if (a.summaries) {
    estimators::row_summary s = rs.s;
    if (!rs.ok) s.lse_s = s.lse_t = quiet_nan<double>();
    a.summaries[r] = s;
  }
}

template <class Task, class TS, class TT>
using work_of = std::conditional_t<std::is_same_v<TS, double> || (Task::has_teacher && std::is_same_v<TT, double>), double, float>;

/// Block b of S: pass-1 moments of row r's share (reduced in thread 0).
template <class Task, class TS, class TT, class G, class Storage>
__device__ partial block_moments(const rows_args<TS, TT, G>& a, index_t r, int b, int S, Storage& storage) {
  using W = work_of<Task, TS, TT>;
  constexpr bool HasT = Task::has_teacher;
  constexpr int VW = HasT ? vec_width<TS, TT> : vec_width<TS, TS>;
  const TS* zs = a.zs + r * a.zs_stride;
  const TT* zt = HasT ? a.zt + r * a.zt_stride : nullptr;
  moments_pass<W, HasT, TS, TT> f{zs, zt, W(a.its), W(a.itt)};
  if constexpr (!HasT) f.m.mt = W(0);  // student only: keep the unused teacher side finite
  const geom g = make_geom<VW>(zs, zt, static_cast<const float*>(nullptr), a.V);
  sweep<VW>(g, b, S, f);
  return cub::BlockReduce<partial, block_threads>(storage.moments).Reduce(f.widened(), merge_partial{});
}

template <class Task, class TS, class TT, class G, class Storage>
__device__ acc2 block_second_pass(const Task& t, const rows_args<TS, TT, G>& a, index_t r, int b, int S,
                                  const estimators::row_summary& s, Storage& storage) {
  using W = work_of<Task, TS, TT>;
  constexpr int VW = vec_width<TS, TT>;
  const TS* zs = a.zs + r * a.zs_stride;
  const TT* zt = a.zt + r * a.zt_stride;
  second_pass<W, typename Task::est_type, TS, TT> f{zs, zt, W(a.its), W(a.itt), W(s.lse_s), W(s.lse_t), t.est};
  const geom g = make_geom<VW>(zs, zt, static_cast<const float*>(nullptr), a.V);
  sweep<VW>(g, b, S, f);
  return cub::BlockReduce<acc2, block_threads>(storage.accs).Reduce(acc2{f.acc[0], f.acc[1]}, sum_acc2{});
}

/// Block b of S: pass 2 over its columns, then the sparse terms whose id falls in them
/// (added in list order, like the host: out[id] += G(coef * scale)).
template <class Task, class TS, class TT, class G>
__device__ void block_grad(const Task& t, const rows_args<TS, TT, G>& a, index_t r, int b, int S, const row_state& rs,
                           const int32_t* sp_id, const double* sp_coef) {
  using W = work_of<Task, TS, TT>;
  constexpr bool Dense = Task::dense;
  constexpr int VW = Dense ? vec_width<TS, TT> : vec_width<TS, TS>;
  const TS* zs = a.zs + r * a.zs_stride;
  const TT* zt = Dense ? a.zt + r * a.zt_stride : nullptr;
  G* out = a.grad + r * a.grad_stride;
  const geom g = make_geom<VW>(zs, zt, out, a.V);
  int c0, c1;
  col_range<VW>(g, b, S, c0, c1);
  if (!rs.ok || rs.scale == 0.0) {  // bad row: NaN; scale 0 (prompt rows ...): exact zeros, as the host
    const G fill = rs.ok ? G(0) : quiet_nan<G>();
    for (int j = c0 + static_cast<int>(threadIdx.x); j < c1; j += block_threads) out[j] = fill;
    return;
  }
  const W wd = W(1.0 * rs.scale), wg = W(rs.gsum * rs.scale);
  grad_pass<W, Dense, typename Task::est_type, TS, TT, G> f{zs, zt, out, W(a.its), W(a.itt), W(rs.s.lse_s), W(rs.s.lse_t),
                                                            wd, wg, dense_estimator(t), rs.s, a.status, r};
  sweep<VW>(g, b, S, f);
  if (rs.n_sparse > 0) {
    __syncthreads();  // this block's dense writes are visible to its threads
    for (int i = static_cast<int>(threadIdx.x); i < rs.n_sparse; i += block_threads) {
      const int32_t id = sp_id[i];
      if (id < c0 || id >= c1) continue;
      bool first = true;
      for (int j = 0; j < i; ++j)
        if (sp_id[j] == id) { first = false; break; }
      if (!first) continue;
      G v = out[id];
      for (int j = i; j < rs.n_sparse; ++j)
        if (sp_id[j] == id) v += static_cast<G>(sp_coef[j] * rs.scale);
      if (!is_finite(v)) report(a.status, errc::infinite_divergence, check_site::gradient, r, id);
      out[id] = v;
    }
  }
}

union fused_storage {
  typename cub::BlockReduce<partial, block_threads>::TempStorage moments;
  typename cub::BlockReduce<acc2, block_threads>::TempStorage accs;
};

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

/// The fused row kernel: one block per row, pass 1 -> finalise -> (pass 1b) -> pass 2.
/// Grid: rows blocks of block_threads; dynamic shared memory: Task::smem_per_entry * max_sparse.
template <class Task, class TS, class TT, class G>
__global__ void __launch_bounds__(block_threads) fused_rows_kernel(Task t, rows_args<TS, TT, G> a) {
  __shared__ fused_storage storage;
  __shared__ row_state rs;
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  const index_t r = blockIdx.x;
  const sparse_smem sp = carve(dyn_smem, t.max_sparse());

  const partial p = block_moments<Task>(a, r, 0, 1, storage);
  if (threadIdx.x == 0) finish_moments<work_of<Task, TS, TT>, Task::has_teacher>(p, r, a.status, rs);
  __syncthreads();
  finalize_row(t, a, r, rs, sp);
  if constexpr (Task::second) {
    if (rs.ok) {  // uniform across the block
      const acc2 acc = block_second_pass(t, a, r, 0, 1, rs.s, storage);
      if (threadIdx.x == 0) {
        rs.s.sum0 = acc.v0;
        rs.s.sum1 = acc.v1;
      }
    }
  }
  if (threadIdx.x == 0) publish_row(t, a, r, rs);
  __syncthreads();
  if (a.grad) block_grad(t, a, r, 0, 1, rs, sp.id, sp.coef);
}

/// Split path, stage 1: grid rows * S blocks; block (r, b) writes partial[r * S + b].
template <class Task, class TS, class TT, class G>
__global__ void __launch_bounds__(block_threads) split_moments_kernel(Task, rows_args<TS, TT, G> a, int S, partial* parts) {
  __shared__ fused_storage storage;
  const index_t r = blockIdx.x / S;
  const int b = static_cast<int>(blockIdx.x % S);
  const partial p = block_moments<Task>(a, r, b, S, storage);
  if (threadIdx.x == 0) parts[r * S + b] = p;
}

/// Split path, stage 2: one block per row merges the S partials, finalises the row and
/// stores its state and sparse list in the scratch.
template <class Task, class TS, class TT, class G>
__global__ void __launch_bounds__(block_threads) split_finalize_kernel(Task t, rows_args<TS, TT, G> a, int S,
                                                                        const partial* parts, row_state* states,
                                                                        int32_t* sp_ids, double* sp_coef) {
  __shared__ fused_storage storage;
  __shared__ row_state rs;
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  const index_t r = blockIdx.x;
  const int M = t.max_sparse();
  const sparse_smem sp = carve(dyn_smem, M);
  partial mine;
  for (int b = static_cast<int>(threadIdx.x); b < S; b += block_threads) mine = merge_partial{}(mine, parts[r * S + b]);
  const partial p = cub::BlockReduce<partial, block_threads>(storage.moments).Reduce(mine, merge_partial{});
  if (threadIdx.x == 0) finish_moments<work_of<Task, TS, TT>, Task::has_teacher>(p, r, a.status, rs);
  __syncthreads();
  finalize_row(t, a, r, rs, sp);
  if constexpr (!Task::second) {
    if (threadIdx.x == 0) publish_row(t, a, r, rs);
  }
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < rs.n_sparse; i += block_threads) {
    sp_ids[r * M + i] = sp.id[i];
    sp_coef[r * M + i] = sp.coef[i];
  }
  if (threadIdx.x == 0) states[r] = rs;
}

/// Split path, stage 2b (second-pass estimators): block (r, b) writes its accumulate() sums.
template <class Task, class TS, class TT, class G>
__global__ void __launch_bounds__(block_threads) split_second_kernel(Task t, rows_args<TS, TT, G> a, int S,
                                                                      const row_state* states, acc2* accs) {
  __shared__ fused_storage storage;
  const index_t r = blockIdx.x / S;
  const int b = static_cast<int>(blockIdx.x % S);
  if (!states[r].ok) return;  // uniform across the block
  const acc2 acc = block_second_pass(t, a, r, b, S, states[r].s, storage);
  if (threadIdx.x == 0) accs[r * S + b] = acc;
}

/// Split path, stage 2c (second-pass estimators): one thread per row adds the S sums and
/// publishes the loss.
template <class Task, class TS, class TT, class G>
__global__ void __launch_bounds__(block_threads) split_publish_kernel(Task t, rows_args<TS, TT, G> a, int S,
                                                                       row_state* states, const acc2* accs) {
  const index_t r = index_t(blockIdx.x) * block_threads + threadIdx.x;
  if (r >= a.rows) return;
  row_state rs = states[r];
  if (rs.ok) {
    double s0 = 0, s1 = 0;
    for (int b = 0; b < S; ++b) {
      s0 += accs[r * S + b].v0;
      s1 += accs[r * S + b].v1;
    }
    rs.s.sum0 = s0;
    rs.s.sum1 = s1;
  }
  publish_row(t, a, r, rs);
  states[r] = rs;
}

/// Split path, stage 3: block (r, b) writes the gradient of its columns.
template <class Task, class TS, class TT, class G>
__global__ void __launch_bounds__(block_threads) split_grad_kernel(Task t, rows_args<TS, TT, G> a, int S,
                                                                    const row_state* states, const int32_t* sp_ids,
                                                                    const double* sp_coef) {
  __shared__ row_state rs;
  const index_t r = blockIdx.x / S;
  const int b = static_cast<int>(blockIdx.x % S);
  if (threadIdx.x == 0) rs = states[r];
  __syncthreads();
  const int M = t.max_sparse();
  block_grad(t, a, r, b, S, rs, sp_ids + r * M, sp_coef + r * M);
}

// ---------------------------------------------------------------------------
// Host-side launch of a row task
// ---------------------------------------------------------------------------

inline status check_context(const device_context& ctx, size_t need) {
  if (ctx.scratch == nullptr || ctx.scratch_bytes < need)
    return make_error(errc::insufficient_scratch, "device_context: scratch is null or smaller than *_scratch_bytes() asks for");
  if (reinterpret_cast<uintptr_t>(ctx.scratch) % scratch_alignment != 0)
    return make_error(errc::invalid_parameter, "device_context: scratch must be 16-byte aligned");
  return {};
}

inline status check_temperatures(const row_options& o) noexcept {
  return checks::temperatures(o.student_temperature, o.teacher_temperature);
}

/// The host's shape rules (core/checks.hpp), then this backend's extent limit.
template <class TS, class G>
inline status check_rows(matrix_view<const TS> student, vector_view<double> loss, matrix_view<G> grad,
                         vector_view<const double> grad_scale) noexcept {
  TROPD_TRY(checks::student_rows(student, loss, grad, grad_scale));
  if (student.rows > max_extent || student.cols > max_extent)
    return make_error(errc::unsupported, "tropd::gpu: rows and vocabulary size must be below 2^28 - 1");
  return {};
}

template <class TT>
inline status check_teacher(matrix_view<const TT> teacher, index_t rows, index_t cols) noexcept {
  return checks::teacher_rows(teacher, rows, cols);
}

/// Launches a row task: the fused kernel (S = 1) or the split-row kernels (S > 1).
template <class Task, class TS, class TT, class G>
inline status launch_rows(const device_context& ctx, const Task& t, const rows_args<TS, TT, G>& a0, int S) {
  const row_layout L = make_layout(a0.rows, S, Task::second, t.max_sparse());
  TROPD_TRY(check_context(ctx, L.total));
  unsigned char* base = static_cast<unsigned char*>(ctx.scratch);
  rows_args<TS, TT, G> a = a0;
  a.status = reinterpret_cast<unsigned long long*>(base);
  TROPD_GPU_TRY_CUDA(cudaMemsetAsync(base, 0xff, sizeof(unsigned long long), ctx.stream));
  const size_t smem = size_t(Task::smem_per_entry) * size_t(t.max_sparse());
  const unsigned rows = static_cast<unsigned>(a.rows);
  if (S <= 1) {
    fused_rows_kernel<Task, TS, TT, G><<<rows, block_threads, smem, ctx.stream>>>(t, a);
    return cuda_status(cudaGetLastError());
  }
  auto* states = reinterpret_cast<row_state*>(base + L.states);
  auto* parts = reinterpret_cast<partial*>(base + L.partials);
  auto* accs = reinterpret_cast<acc2*>(base + L.accs);
  auto* sp_ids = reinterpret_cast<int32_t*>(base + L.sparse_ids);
  auto* sp_coef = reinterpret_cast<double*>(base + L.sparse_coef);
  const unsigned blocks = static_cast<unsigned>(index_t(a.rows) * S);
  if (index_t(a.rows) * S > 0x7fffffffll) return make_error(errc::unsupported, "tropd::gpu: rows * blocks_per_row exceeds the grid limit");
  split_moments_kernel<Task, TS, TT, G><<<blocks, block_threads, 0, ctx.stream>>>(t, a, S, parts);
  TROPD_GPU_TRY_CUDA(cudaGetLastError());
  split_finalize_kernel<Task, TS, TT, G><<<rows, block_threads, smem, ctx.stream>>>(t, a, S, parts, states, sp_ids, sp_coef);
  TROPD_GPU_TRY_CUDA(cudaGetLastError());
  if constexpr (Task::second) {
    split_second_kernel<Task, TS, TT, G><<<blocks, block_threads, 0, ctx.stream>>>(t, a, S, states, accs);
    TROPD_GPU_TRY_CUDA(cudaGetLastError());
    split_publish_kernel<Task, TS, TT, G><<<(rows + block_threads - 1) / block_threads, block_threads, 0, ctx.stream>>>(t, a, S, states, accs);
    TROPD_GPU_TRY_CUDA(cudaGetLastError());
  }
  if (a.grad) {
    split_grad_kernel<Task, TS, TT, G><<<blocks, block_threads, 0, ctx.stream>>>(t, a, S, states, sp_ids, sp_coef);
    TROPD_GPU_TRY_CUDA(cudaGetLastError());
  }
  return {};
}

template <class TS, class TT, class G>
inline rows_args<TS, TT, G> make_args(matrix_view<const TS> student, const TT* zt, index_t zt_stride, vector_view<double> loss,
                                      matrix_view<G> grad, const row_options& opt, vector_view<const double> grad_scale,
                                      estimators::row_summary* summaries) {
  rows_args<TS, TT, G> a;
  a.zs = student.data;
  a.zs_stride = student.stride;
  a.zt = zt;
  a.zt_stride = zt_stride;
  a.rows = static_cast<int>(student.rows);
  a.V = static_cast<int>(student.cols);
  a.its = 1.0 / opt.student_temperature;
  a.itt = 1.0 / opt.teacher_temperature;
  a.ts = opt.student_temperature;
  a.grad = grad.rows ? grad.data : nullptr;
  a.grad_stride = grad.stride;
  a.grad_scale = grad_scale.size ? grad_scale.data : nullptr;
  a.loss = loss.data;
  a.summaries = summaries;
  return a;
}

}  // namespace detail

// ===========================================================================
// Row-level entry points
// ===========================================================================

/// Scratch bytes of divergence_rows for [rows x V] (give the options of the call).
template <estimators::full_vocab_divergence Est>
inline size_t divergence_rows_scratch_bytes(index_t rows, index_t V, const row_options& opt = {}) {
  return detail::make_layout(rows, detail::resolve_blocks_per_row(rows, V, opt), Est::second_pass, 0).total;
}

/// Full-vocabulary divergence per row on the device: loss[r] = D(p_r, q_r),
/// grad[r] = grad_scale[r] * dD/dz_r (the host's divergence_rows, same arguments, device memory).
///
/// student, teacher [rows x V] (fp32 / bf16 / fp16 / fp64), loss [rows] (double), grad
/// [rows x V] (fp32 or fp64) or empty (value only), grad_scale [rows] or empty (1),
/// summaries [rows] or empty. All pointers are device pointers.
/// Returned errors (nothing launched): invalid_parameter, empty_batch, shape_mismatch,
/// unsupported, insufficient_scratch, backend_error. Device-checked (status word):
/// non_finite_input, no_finite_entry, infinite_divergence.
template <estimators::full_vocab_divergence Est, logit_element TS, logit_element TT, grad_element G = float>
status divergence_rows(const device_context& ctx, const Est& est, matrix_view<const TS> student, matrix_view<const TT> teacher,
                       vector_view<double> loss, matrix_view<G> grad = {}, const row_options& opt = {},
                       vector_view<const double> grad_scale = {}, vector_view<estimators::row_summary> summaries = {}) {
  TROPD_TRY(est.check());
  TROPD_TRY(detail::check_temperatures(opt));
  TROPD_TRY(detail::check_rows(student, loss, grad, grad_scale));
  TROPD_TRY(detail::check_teacher(teacher, student.rows, student.cols));
  if (summaries.size != 0 && summaries.size != student.rows)
    return make_error(errc::shape_mismatch, "summaries must be empty or have one entry per row");
  const int S = detail::resolve_blocks_per_row(student.rows, student.cols, opt);
  const auto a = detail::make_args(student, teacher.data, teacher.stride, loss, grad, opt, grad_scale,
                                   summaries.size ? summaries.data : nullptr);
  return detail::launch_rows(ctx, detail::dense_task<Est>{est}, a, S);
}

/// Scratch bytes of sampled_rows.
inline size_t sampled_rows_scratch_bytes(index_t rows, index_t V, const row_options& opt = {}) {
  return detail::make_layout(rows, detail::resolve_blocks_per_row(rows, V, opt), false, 1).total;
}

/// Sampled-token estimator per row with full teacher logits (the host's sampled_rows):
/// s = log p_S(y_r), t = log p_T(y_r) from the rows; s_old [rows] or empty (s_old = s);
/// loss[r] = the estimator's loss; grad[r] = grad_scale[r] * dL/ds * (e_y - p) / T_S.
/// Device-checked: id_out_of_range (column = the id), non_finite_input, no_finite_entry,
/// infinite_divergence (zero mass at y, estimator overflow).
template <class E, class U, logit_element TS, logit_element TT, grad_element G = float>
status sampled_rows(const device_context& ctx, const estimators::sampled<E, U>& est, matrix_view<const TS> student,
                    matrix_view<const TT> teacher, vector_view<const int32_t> ids, vector_view<const double> s_old,
                    vector_view<double> loss, matrix_view<G> grad = {}, const row_options& opt = {},
                    vector_view<const double> grad_scale = {}) {
  TROPD_TRY(detail::check_temperatures(opt));
  TROPD_TRY(detail::check_rows(student, loss, grad, grad_scale));
  TROPD_TRY(detail::check_teacher(teacher, student.rows, student.cols));
  if (ids.size != student.rows || ids.data == nullptr) return make_error(errc::shape_mismatch, "ids must have one entry per row");
  if (s_old.size != 0 && (s_old.size != student.rows || s_old.data == nullptr))
    return make_error(errc::shape_mismatch, "s_old must be empty or one per row");
  const int S = detail::resolve_blocks_per_row(student.rows, student.cols, opt);
  const auto a = detail::make_args(student, teacher.data, teacher.stride, loss, grad, opt, grad_scale, nullptr);
  detail::sampled_task<E, U> t;
  t.est = est;
  t.ids = ids.data;
  t.s_old = s_old.size ? s_old.data : nullptr;
  return detail::launch_rows(ctx, t, a, S);
}

/// Given teacher top-k lists per row: ids and log-probs, both [rows x K] (device memory).
struct topk_lists {
  matrix_view<const int32_t> ids;
  matrix_view<const float> logprobs;
};

/// Scratch bytes of topk_forward_kl_rows with lists of K entries.
inline size_t topk_rows_scratch_bytes(index_t rows, index_t V, index_t K, const row_options& opt = {}) {
  return detail::make_layout(rows, detail::resolve_blocks_per_row(rows, V, opt), false, K).total;
}

/// Teacher top-k forward KL per row with given lists (the host's topk_forward_kl_rows
/// overload for topk_lists): -inf log-probs are padding; est.k is ignored (K = the lists'
/// width, 1 <= K <= max_topk). loss[r] = FKL_k, grad[r] = grad_scale[r] * dFKL/dz / T_S,
/// written as g_j - p_j * sum_v g_v with the sparse g from topk_forward_kl::eval.
/// Device-checked: non_finite_input, id_out_of_range, duplicate_topk_id (column = list
/// entry), no_finite_entry, and eval's infinite_divergence / invalid_topk_list.
template <logit_element TS, grad_element G = float>
status topk_forward_kl_rows(const device_context& ctx, const estimators::topk_forward_kl& est, matrix_view<const TS> student,
                            const topk_lists& teacher, vector_view<double> loss, matrix_view<G> grad = {},
                            const row_options& opt = {}, vector_view<const double> grad_scale = {}) {
  TROPD_TRY(est.check());
  TROPD_TRY(detail::check_temperatures(opt));
  TROPD_TRY(detail::check_rows(student, loss, grad, grad_scale));
  const index_t N = student.rows;
  if (!teacher.ids.valid() || !teacher.logprobs.valid()) return make_error(errc::shape_mismatch, "teacher top-k views are malformed");
  if (teacher.ids.rows != N || teacher.logprobs.rows != N)
    return make_error(errc::shape_mismatch, "teacher top-k lists need one row per student row");
  if (teacher.ids.cols != teacher.logprobs.cols || teacher.ids.cols < 1)
    return make_error(errc::shape_mismatch, "teacher top-k ids and log-probs must both be [rows x K] with K >= 1");
  if (teacher.ids.cols > max_topk) return make_error(errc::unsupported, "tropd::gpu: top-k lists longer than max_topk (1024)");
  const int S = detail::resolve_blocks_per_row(N, student.cols, opt);
  const auto a = detail::make_args(student, static_cast<const float*>(nullptr), 0, loss, grad, opt, grad_scale, nullptr);
  detail::topk_task t;
  t.est = est;
  t.ids = teacher.ids.data;
  t.ids_stride = teacher.ids.stride;
  t.lp = teacher.logprobs.data;
  t.lp_stride = teacher.logprobs.stride;
  t.K = static_cast<int>(teacher.ids.cols);
  return detail::launch_rows(ctx, t, a, S);
}

// ===========================================================================
// Token-level kernels
// ===========================================================================

/// Per-token inputs of evaluate_tokens (device memory; [n] unless noted; empty = not supplied).
struct token_arrays {
  vector_view<const float> s;                 ///< current student log-prob (required)
  vector_view<const float> s_old;             ///< rollout-time student log-prob (optional: = s)
  vector_view<const float> t;                 ///< teacher log-prob (required; -inf allowed)
  vector_view<const origin> from;             ///< origin tags (required)
  vector_view<const float> rkl;               ///< per-position reverse KL (trust estimators with needs_rkl)
  vector_view<const float> ref;               ///< reference log-prob (trust estimators with needs_ref)
  matrix_view<const float> topk_teacher;      ///< [n x K] teacher log-probs at the top-k ids (-inf: padding)
  matrix_view<const float> topk_student;      ///< [n x K] current student log-probs at those ids
  matrix_view<const float> topk_student_old;  ///< [n x K] rollout-time ones (optional)
};

/// Per-token outputs of evaluate_tokens (device memory; each optional): the fields of
/// tropd::token_result, unweighted (aggregation weights are applied later).
struct token_results {
  vector_view<double> loss, dloss_ds, advantage, loss_trust, loss_outlier, loss_guidance;
  vector_view<double> teacher_mass, student_mass;
  vector_view<uint8_t> flags;
  matrix_view<double> g_topk;  ///< [n x K] dL_i/d log p_S at the top-k ids (zeros without a form-P term)
};

/// Inputs of the region decision kernel (device memory).
struct decision_inputs {
  vector_view<const float> s, s_old, t;       ///< s_old optional (= s)
  vector_view<const origin> from;
  vector_view<const index_t> seq_offsets;     ///< [n_seq + 1] CSR offsets
  vector_view<const uint64_t> seq_ids;        ///< [n_seq] optional (default: index in the batch)
  vector_view<const float> student_entropy;   ///< optional (NaN when absent)
  vector_view<const float> teacher_entropy;   ///< optional
};

namespace detail {

template <class Obj>
__global__ void __launch_bounds__(block_threads) tokens_kernel(Obj obj, token_arrays in, const uint8_t* trusted, token_results out,
                                                               unsigned long long* st) {
  const index_t i = index_t(blockIdx.x) * block_threads + threadIdx.x;
  if (i >= in.s.size) return;
  const index_t K = in.topk_teacher.cols;
  double* g = nullptr;
  token_input ti;
  ti.s = in.s[i];
  ti.s_old = in.s_old.size ? double(in.s_old[i]) : double(in.s[i]);
  ti.t = in.t[i];
  ti.from = in.from[i];
  ti.rkl = in.rkl.size ? double(in.rkl[i]) : quiet_nan<double>();
  ti.ref = in.ref.size ? double(in.ref[i]) : quiet_nan<double>();
  if (K > 0 && in.topk_teacher.rows == in.s.size) {
    ti.topk.teacher = in.topk_teacher.row(i);
    ti.topk.student = in.topk_student.rows ? in.topk_student.row(i) : nullptr;
    ti.topk.student_old = in.topk_student_old.rows ? in.topk_student_old.row(i) : nullptr;
    ti.topk.k = static_cast<int>(K);
    if (out.g_topk.rows) g = out.g_topk.row(i);
  }
  // The host's validate_tokens rules that concern one token.
  const auto tag = static_cast<uint8_t>(ti.from);
  bool bad = false;
  if (tag > 2) {
    report(st, errc::invalid_parameter, check_site::token_input, i, -1);
    bad = true;
  } else if (ti.from != origin::prompt) {
    if (!is_finite(in.s[i]) || (in.s_old.size && !is_finite(in.s_old[i])) || is_nan(in.t[i]) || in.t[i] == inf<float>()) {
      report(st, errc::non_finite_input, check_site::token_input, i, -1);
      bad = true;
    } else if (in.s[i] > 1e-4f || in.t[i] > 1e-4f) {  // logits passed as log-probabilities
      report(st, errc::invalid_parameter, check_site::token_input, i, -1);
      bad = true;
    }
  }
  token_result r;
  if (!bad) {
    r = evaluate_token(obj, ti, trusted[i] != 0, g);
    if (!r.st.ok()) {
      report(st, r.st.code, check_site::token_rule, i, r.st.col);
      bad = true;
    }
  }
  if (bad) {
    const double nan = quiet_nan<double>();
    r = token_result{};
    r.loss = r.dloss_ds = r.advantage = r.loss_trust = r.loss_outlier = r.loss_guidance = nan;
  }
  if (g && (bad || !r.topk_grad))
    for (index_t k = 0; k < K; ++k) g[k] = bad ? quiet_nan<double>() : 0.0;
  if (out.loss.size) out.loss[i] = r.loss;
  if (out.dloss_ds.size) out.dloss_ds[i] = r.dloss_ds;
  if (out.advantage.size) out.advantage[i] = r.advantage;
  if (out.loss_trust.size) out.loss_trust[i] = r.loss_trust;
  if (out.loss_outlier.size) out.loss_outlier[i] = r.loss_outlier;
  if (out.loss_guidance.size) out.loss_guidance[i] = r.loss_guidance;
  if (out.teacher_mass.size) out.teacher_mass[i] = r.teacher_mass;
  if (out.student_mass.size) out.student_mass[i] = r.student_mass;
  if (out.flags.size) out.flags[i] = r.flags;
}

template <class Region>
__global__ void __launch_bounds__(block_threads) decide_kernel(Region region, decision_inputs in, regions::batch_context ctx,
                                                               uint8_t* trusted, unsigned long long* st) {
  const index_t i = index_t(blockIdx.x) * block_threads + threadIdx.x;
  const index_t n = in.s.size;
  const index_t n_seq = in.seq_offsets.size - 1;
  const index_t* off = in.seq_offsets.data;
  if (i == 0 && (off[0] != 0 || off[n_seq] != n)) report(st, errc::shape_mismatch, check_site::seq_offsets, -1, -1);
  if (i < n_seq && off[i + 1] < off[i]) report(st, errc::shape_mismatch, check_site::seq_offsets, -1, i + 1);
  if (i >= n) return;
  if (in.from[i] != origin::student) {
    trusted[i] = 0;
    return;
  }
  // Sequence of token i: the last j with off[j] <= i (binary search over the offsets).
  index_t lo = 0, hi = n_seq;  // invariant: off[lo] <= i < off[hi] (for well-formed offsets)
  while (hi - lo > 1) {
    const index_t mid = lo + (hi - lo) / 2;
    if (off[mid] <= i) lo = mid; else hi = mid;
  }
  const index_t j = lo;
  regions::token_view tv;
  tv.s = in.s[i];
  tv.s_old = in.s_old.size ? double(in.s_old[i]) : double(in.s[i]);
  tv.t = in.t[i];
  tv.R = double(in.t[i]) - tv.s_old;
  tv.ent_s = in.student_entropy.size ? double(in.student_entropy[i]) : quiet_nan<double>();
  tv.ent_t = in.teacher_entropy.size ? double(in.teacher_entropy[i]) : quiet_nan<double>();
  tv.seq_id = in.seq_ids.size ? in.seq_ids[j] : static_cast<uint64_t>(j);
  tv.position = static_cast<uint64_t>(i - off[j]);
  tv.seq_index = j;
  trusted[i] = region.trusted(tv, ctx) ? 1 : 0;
}

}  // namespace detail

/// Scratch bytes of evaluate_tokens and decide (the status word only).
inline size_t tokens_scratch_bytes() { return 256; }

/// The per-token rule of an objective on the device: for every token i,
/// tropd::evaluate_token(obj, input_i, trusted[i] != 0, g_topk row i), i.e. the host's
/// phase 3 (host::apply) given the same trust decisions. `trusted` [n] (device, 1 = trusted;
/// read for student tokens). Outputs are unweighted per-token values.
/// Returned errors: invalid_parameter (obj.check()), empty_batch, shape_mismatch, unsupported
/// (a policy needs an array that is empty), insufficient_scratch, backend_error. Device-checked:
/// token_input (origin tag, s/s_old/t), token_rule (whatever evaluate_token reports, e.g.
/// infinite_divergence); such tokens get NaN outputs.
template <class Obj>
status evaluate_tokens(const device_context& ctx, const Obj& obj, const token_arrays& in, vector_view<const uint8_t> trusted,
                       const token_results& out) {
  TROPD_TRY(obj.check());
  TROPD_TRY(detail::check_context(ctx, tokens_scratch_bytes()));
  const index_t n = in.s.size;
  if (n == 0) return make_error(errc::empty_batch, "no tokens");
  if (n > max_extent) return make_error(errc::unsupported, "tropd::gpu: at most 2^28 - 2 tokens per call");
  if (in.t.size != n || in.from.size != n || trusted.size != n)
    return make_error(errc::shape_mismatch, "s, t, origin and trusted must all have n entries");
  if (in.s_old.size != 0 && in.s_old.size != n) return make_error(errc::shape_mismatch, "s_old must be empty or have n entries");
  if (in.rkl.size != 0 && in.rkl.size != n) return make_error(errc::shape_mismatch, "rkl must be empty or have n entries");
  if (in.ref.size != 0 && in.ref.size != n) return make_error(errc::shape_mismatch, "ref must be empty or have n entries");
  if constexpr (Obj::trust_type::needs_rkl)
    if (in.rkl.size == 0) return make_error(errc::unsupported, "this trust estimator needs the per-position reverse KL (token_arrays::rkl)");
  if constexpr (Obj::trust_type::needs_ref)
    if (in.ref.size == 0) return make_error(errc::unsupported, "this trust estimator needs reference log-probs (token_arrays::ref)");
  const index_t K = in.topk_teacher.cols;
  if (in.topk_teacher.rows != 0) {
    if (in.topk_teacher.rows != n || K < 1 || !in.topk_teacher.valid())
      return make_error(errc::shape_mismatch, "topk_teacher must be empty or [n x K], K >= 1");
    if (in.topk_student.rows != n || in.topk_student.cols != K || !in.topk_student.valid())
      return make_error(errc::shape_mismatch, "topk_student must be [n x K] like topk_teacher");
    if (in.topk_student_old.rows != 0 && (in.topk_student_old.rows != n || in.topk_student_old.cols != K || !in.topk_student_old.valid()))
      return make_error(errc::shape_mismatch, "topk_student_old must be empty or [n x K]");
  }
  if constexpr (Obj::outlier_type::needs_topk)
    if (in.topk_teacher.rows == 0) return make_error(errc::unsupported, "this outlier handler needs [n x K] topk_teacher and topk_student");
  auto sized = [n](index_t sz) { return sz == 0 || sz == n; };
  if (!sized(out.loss.size) || !sized(out.dloss_ds.size) || !sized(out.advantage.size) || !sized(out.loss_trust.size) ||
      !sized(out.loss_outlier.size) || !sized(out.loss_guidance.size) || !sized(out.teacher_mass.size) ||
      !sized(out.student_mass.size) || !sized(out.flags.size))
    return make_error(errc::shape_mismatch, "token outputs must be empty or have n entries");
  if (out.g_topk.rows != 0 && (out.g_topk.rows != n || out.g_topk.cols != K || !out.g_topk.valid()))
    return make_error(errc::shape_mismatch, "g_topk must be empty or [n x K] like topk_teacher");
  auto* st = static_cast<unsigned long long*>(ctx.scratch);
  TROPD_GPU_TRY_CUDA(cudaMemsetAsync(st, 0xff, sizeof *st, ctx.stream));
  const unsigned blocks = static_cast<unsigned>((n + block_threads - 1) / block_threads);
  detail::tokens_kernel<Obj><<<blocks, block_threads, 0, ctx.stream>>>(obj, in, trusted.data, out, st);
  return detail::cuda_status(cudaGetLastError());
}

/// A region's decision per token on the device: trusted[i] = region.trusted(token_view_i, ctx)
/// for student tokens, 0 for the others, with the token view built exactly as host::decide
/// builds it (R = double(t) - double(s_old), seq_id = seq_ids[j] or j, position = i - offsets[j]).
/// Regions whose host `prepare` computes batch values (entropy_top_fraction's threshold,
/// sequence_ratio_bound's mask) need them in `ctx` already: run prepare on the host and pass
/// ctx.seq_masked as a DEVICE pointer. stochastic_acceptance needs only ctx.seed and ctx.step,
/// and draws U from Philox keyed by (seed, step, seq_id, position, streams::trust_region): the
/// CPU and the GPU decide identically (the comparison log U <= R uses each side's
/// double-precision log; they could differ only for |log U - R| within an ulp or two).
/// Device-checked: seq_offsets (shape_mismatch).
template <regions::trust_region Region>
status decide(const device_context& ctx, const Region& region, const decision_inputs& in, const regions::batch_context& bctx,
              vector_view<uint8_t> trusted) {
  TROPD_TRY(region.check());
  TROPD_TRY(detail::check_context(ctx, tokens_scratch_bytes()));
  const index_t n = in.s.size;
  if (n == 0) return make_error(errc::empty_batch, "no tokens");
  if (n > max_extent) return make_error(errc::unsupported, "tropd::gpu: at most 2^28 - 2 tokens per call");
  if (in.t.size != n || in.from.size != n || trusted.size != n)
    return make_error(errc::shape_mismatch, "s, t, origin and trusted must all have n entries");
  if (in.s_old.size != 0 && in.s_old.size != n) return make_error(errc::shape_mismatch, "s_old must be empty or have n entries");
  if (in.seq_offsets.size < 2 || in.seq_offsets.data == nullptr)
    return make_error(errc::shape_mismatch, "seq_offsets needs n_seq + 1 >= 2 entries");
  if (in.seq_ids.size != 0 && in.seq_ids.size != in.seq_offsets.size - 1)
    return make_error(errc::shape_mismatch, "seq_ids must have n_seq entries");
  if (in.student_entropy.size != 0 && in.student_entropy.size != n)
    return make_error(errc::shape_mismatch, "student_entropy must be empty or have n entries");
  if (in.teacher_entropy.size != 0 && in.teacher_entropy.size != n)
    return make_error(errc::shape_mismatch, "teacher_entropy must be empty or have n entries");
  if constexpr (Region::needs_student_entropy)
    if (in.student_entropy.size == 0) return make_error(errc::unsupported, "this region needs student entropies");
  if constexpr (Region::needs_teacher_entropy)
    if (in.teacher_entropy.size == 0) return make_error(errc::unsupported, "this region needs teacher entropies");
  auto* st = static_cast<unsigned long long*>(ctx.scratch);
  TROPD_GPU_TRY_CUDA(cudaMemsetAsync(st, 0xff, sizeof *st, ctx.stream));
  const index_t work = n > in.seq_offsets.size ? n : in.seq_offsets.size;
  const unsigned blocks = static_cast<unsigned>((work + block_threads - 1) / block_threads);
  detail::decide_kernel<Region><<<blocks, block_threads, 0, ctx.stream>>>(region, in, bctx, trusted.data, st);
  return detail::cuda_status(cudaGetLastError());
}

/// TrOPD's stochastic trust region on the device (decide with stochastic_acceptance).
inline status decide_stochastic(const device_context& ctx, const decision_inputs& in, uint64_t seed, uint64_t step,
                                vector_view<uint8_t> trusted) {
  return decide(ctx, regions::stochastic_acceptance{}, in, regions::batch_context{seed, step, 0, nullptr}, trusted);
}

}  // namespace tropd::gpu

#undef TROPD_GPU_TRY_CUDA
