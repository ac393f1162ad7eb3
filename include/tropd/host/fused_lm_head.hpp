// tropd/host/fused_lm_head.hpp: the distillation objective from hidden states and the output
// weight on the CPU, never holding [n x V] logits (core/fused_lm_head.hpp: what it computes).
//
//   fused_lm_head(obj, student_head, teacher, inputs, outputs, options[, gemm])
//
//   student_head  linear_head<T>: hidden [n x H], weight [V x H], optional bias [V], logit
//                 scale and soft-cap (T = float or double)
//   teacher       linear_head<TT> (its own hidden states [n x H_T] and weight [V x H_T]), or
//                 full logits matrix_view<const TT> [n x V], or teacher_logprobs (log p_T of
//                 the rows' tokens; top-k lists in row_inputs::teacher_topk): the three teacher
//                 forms of evaluate_rows, plus the head
//   inputs        row_inputs, the metadata of evaluate_rows (ids, origins, sequences, s_old,
//                 temperatures, ...)
//   outputs       fused_outputs<T>: dL/dh [n x H] (written), dL/dW [V x H] and dL/db [V]
//                 (ADDED to the caller's buffers; empty = frozen, skipped), and every output of
//                 evaluate_rows but the logits gradient (loss, diagnostics, per-token values)
//
// Per chunk of c rows: x = h_c W^T (GEMM), z = transform(x + b), the row statistics of z (the
// row passes of evaluate_rows: host/objective.hpp's row_statistics), the token stages, dL/dz
// (row_gradient, into a per-thread row, then dL/dx = dL/dz transform'(z) over z's own storage),
// dL/dh_c = dL/dx W and dL/dW += dL/dx^T h_c (GEMMs). One sweep or two: core/fused_lm_head.hpp.
//
// Memory. The call asks its allocator (fused_options::allocator) for exactly
// fused_scratch_bytes(shape, chunk) = c V sizeof(T) [the chunk's logits, then its dL/dx]
// + c V sizeof(TT) [a teacher head's logits] + min(threads, c) V sizeof(T) [one gradient row per
// thread], each rounded up to 64 bytes; chunk = 0 picks the largest c (a multiple of 8 when
// c >= 8) whose scratch fits fused_options::scratch_budget. Besides, like evaluate_rows it keeps
// O(n) per-token state (a few hundred bytes plus 28 K bytes per row, K the top-k width), each
// thread's row-pass scratch (host/row_scratch.hpp: ~100 KB, plus 2 V floats for JSD / TV) and
// the GEMM's own buffers (eigen_gemm: a few MB, bounded by its column blocks); never O(n V).
//
// Errors: those of evaluate_rows, plus shape_mismatch between hidden, weight, bias, the teacher
// head, the metadata and the outputs, invalid_parameter (transform, chunk), unsupported
// (sweep_policy::one for an objective that needs batch decisions) and insufficient_scratch
// (the allocator returned nullptr). Under two sweeps nothing is written on failure (except a
// gradient value that does not fit T, found while it is written, as at row level). Under one
// sweep a failure in chunk j leaves dL/dh of the rows before it written and their part added
// to dL/dW and dL/db: call again with sweep_policy::two to get validate-first semantics.
// An ok status means the loss, the per-token outputs, dL/dz and dL/dh are finite.
//
// Results equal evaluate_rows on the materialised logits z = transform(h W^T + b) followed by
// the two GEMMs, up to the GEMM's rounding (Eigen's blocking depends on the chunk's size).
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include <tropd/config.hpp>
#include <tropd/core/fused_lm_head.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/views.hpp>
#include <tropd/host/objective.hpp>
#include <tropd/host/options.hpp>
#include <tropd/host/parallel.hpp>
#include <tropd/host/simd.hpp>
#include <tropd/host/token_stages.hpp>

namespace tropd::host {

/// The host GEMM (core/fused_lm_head.hpp: gemm_for): Eigen's GEMM on row-major maps. C's rows
/// are split statically over `threads` threads and its columns into blocks of `col_block`, each
/// block one Eigen product, so the result depends only on the shapes and these two numbers.
/// The column blocks bound Eigen's own packing buffers: for a row-major C, Eigen 3.4 packs a
/// whole kc x (columns of C) panel once k is blocked, i.e. 512 x V floats (311 MB at
/// V = 151,936) for the logits GEMM; with blocks it packs at most kc x col_block.
struct eigen_gemm {
  int threads = 0;          ///< threads splitting C's rows; 0: the fused call's eval_options::threads
  index_t col_block = 2048; ///< columns of C per Eigen product (<= 0: all)

  template <class T>
  status operator()(gemm_op ta, gemm_op tb, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda, const T* b,
                    index_t ldb, T beta, T* c, index_t ldc) const {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "eigen_gemm: float or double operands");
    using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using CMap = Eigen::Map<const Mat, Eigen::Unaligned, Eigen::OuterStride<>>;
    using MMap = Eigen::Map<Mat, Eigen::Unaligned, Eigen::OuterStride<>>;
    if (m <= 0 || n <= 0) return {};
    const index_t nb = col_block > 0 ? col_block : n;
    return parallel_rows(m, threads < 1 ? 1 : threads, [&](index_t i0, index_t i1) -> status {
      for (index_t j0 = 0; j0 < n; j0 += nb) {
        const index_t w = std::min(nb, n - j0);
        MMap C(c + i0 * ldc + j0, i1 - i0, w, Eigen::OuterStride<>(ldc));
        if (k <= 0) {
          if (beta == T(0)) C.setZero();
          else C *= beta;
          continue;
        }
        auto product = [&](const auto& A, const auto& Bop) {
          if (beta == T(0)) {
            if (alpha == T(1)) C.noalias() = A * Bop;
            else C.noalias() = (alpha * A) * Bop;
          } else {
            if (beta != T(1)) C *= beta;
            if (alpha == T(1)) C.noalias() += A * Bop;
            else C.noalias() += (alpha * A) * Bop;
          }
        };
        // Columns [j0, j0 + w) of op(B): of B [k x n] (tb = n), or rows of B [n x k] (tb = t).
        auto with_a = [&](const auto& A) {
          if (tb == gemm_op::n) product(A, CMap(b + j0, k, w, Eigen::OuterStride<>(ldb)));
          else product(A, CMap(b + j0 * ldb, w, k, Eigen::OuterStride<>(ldb)).transpose());
        };
        if (ta == gemm_op::n) with_a(CMap(a + i0 * lda, i1 - i0, k, Eigen::OuterStride<>(lda)));
        else with_a(CMap(a + i0, k, i1 - i0, Eigen::OuterStride<>(lda)).transpose());
      }
      return {};
    });
  }
};
static_assert(gemm_for<eigen_gemm, float, float, float, float> && gemm_for<eigen_gemm, double, double, double, double>);

/// Where the fused call's chunk buffers come from: allocate(ctx, bytes) returns 64-byte aligned
/// memory or nullptr; deallocate(ctx, p, bytes) gives it back. Both null: aligned operator new.
/// A caller counts or bounds what the call asks for here (tests/test_fused_lm_head.cpp).
struct scratch_allocator {
  void* (*allocate)(void* ctx, size_t bytes) = nullptr;
  void (*deallocate)(void* ctx, void* p, size_t bytes) = nullptr;
  void* ctx = nullptr;
};

/// What a fused call did (optional output).
struct fused_info {
  index_t chunk = 0;         ///< rows per chunk
  int sweeps = 0;            ///< 1 or 2
  size_t scratch_bytes = 0;  ///< asked of the allocator (= fused_scratch_bytes)
  int gemm_calls = 0;        ///< GEMMs run (student and teacher)
};

/// Outputs of fused_lm_head (each optional).
template <class T>
struct fused_outputs {
  matrix_view<T> grad_hidden{};  ///< [n x H] dL/dh, written (empty: not computed)
  matrix_view<T> grad_weight{};  ///< [V x H] dL/dW, ADDED to the buffer (empty: frozen weight, its GEMM skipped)
  vector_view<T> grad_bias{};    ///< [V] dL/db, ADDED to the buffer (empty: not computed)
  double* loss = nullptr;        ///< the aggregated loss
  diagnostics* diag = nullptr;   ///< the diagnostics of evaluate_rows
  values_out dloss_ds{};         ///< [n] dL/ds_i
  values_out advantage{};        ///< [n] the advantage after clipping
  values_matrix_out dloss_dtopk{};  ///< [n x K] dL/d log p_S at the top-k ids
  vector_view<uint8_t> flags{};     ///< [n] tropd::flags bits
  matrix_view<int32_t> topk_ids{};  ///< [n x K] the teacher top-k ids used (row_outputs::topk_ids)
  fused_info* info = nullptr;       ///< chunk, sweeps, scratch, GEMM count
};

/// Options of fused_lm_head.
struct fused_options {
  eval_options eval{};                          ///< seed, step, input policy, threads (row passes and eigen_gemm)
  index_t chunk = 0;                            ///< rows per chunk; 0: the largest that fits scratch_budget
  size_t scratch_budget = size_t(256) << 20;    ///< bytes of chunk buffers the chooser may use (chunk = 0)
  sweep_policy sweeps = sweep_policy::automatic;
  scratch_allocator allocator{};
};

/// The sizes the scratch of a fused call depends on.
struct fused_shape {
  index_t n = 0, V = 0;
  size_t logit_bytes = sizeof(float);  ///< sizeof(T) of the student head
  size_t teacher_logit_bytes = 0;      ///< sizeof(TT) when the teacher is a head, else 0
  int threads = 1;
};

namespace detail {
inline size_t round64(size_t b) noexcept { return (b + 63) / 64 * 64; }
inline index_t fused_threads(const fused_shape& s, index_t chunk) noexcept {
  return std::max<index_t>(1, std::min<index_t>(s.threads < 1 ? 1 : s.threads, chunk));
}
}  // namespace detail

/// The bytes a fused call with `chunk` rows per chunk asks its allocator for (exactly; its peak).
inline size_t fused_scratch_bytes(const fused_shape& s, index_t chunk) noexcept {
  const size_t c = size_t(std::max<index_t>(1, std::min(chunk, s.n))), V = size_t(s.V);
  size_t b = detail::round64(c * V * s.logit_bytes) + size_t(detail::fused_threads(s, index_t(c))) * detail::round64(V * s.logit_bytes);
  if (s.teacher_logit_bytes) b += detail::round64(c * V * s.teacher_logit_bytes);
  return b;
}

/// The largest chunk (<= n; a multiple of 8 when >= 8) whose scratch fits `budget` bytes; 1
/// when even one row does not fit (the call then asks for fused_scratch_bytes(s, 1)).
inline index_t fused_choose_chunk(const fused_shape& s, size_t budget) noexcept {
  if (s.n <= 0) return 1;
  if (fused_scratch_bytes(s, s.n) <= budget) return s.n;
  index_t lo = 1, hi = s.n;  // fits(lo) or lo = 1; !fits(hi)
  while (hi - lo > 1) {
    const index_t mid = lo + (hi - lo) / 2;
    (fused_scratch_bytes(s, mid) <= budget ? lo : hi) = mid;
  }
  return lo >= 8 ? lo / 8 * 8 : lo;
}

namespace detail {

/// The teacher forms of fused_lm_head.
template <class Teacher>
struct fused_teacher;
template <class TT>
struct fused_teacher<linear_head<TT>> {
  static constexpr bool head = true, logits = true;
  using element = TT;
};
template <class TT>
struct fused_teacher<matrix_view<const TT>> {
  static constexpr bool head = false, logits = true;
  using element = TT;
};
template <>
struct fused_teacher<teacher_logprobs> {
  static constexpr bool head = false, logits = false;
  using element = float;  // stands in (never read)
};
template <class Teacher>
concept fused_teacher_form = requires { fused_teacher<Teacher>::head; };

/// Arithmetic of logit_transform on Eigen packets of fp32 (vectorised tanh).
struct transform_packet_ops {
  using P = packet_t<float>;
  static P set1(float x) noexcept { return pk::pset1<P>(x); }
  static P add(const P& x, const P& y) noexcept { return pk::padd(x, y); }
  static P sub(const P& x, const P& y) noexcept { return pk::psub(x, y); }
  static P mul(const P& x, const P& y) noexcept { return pk::pmul(x, y); }
  static P tanh(const P& x) noexcept { return pk::ptanh(x); }
};

/// z_j = transform(z_j + b_j) over one row (fp32: packets, the tail through a padded packet, so
/// every element takes the same arithmetic; fp64: scalars).
template <class T>
inline void transform_row(const logit_transform& tf, const T* bias, T* z, index_t V) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    using P = packet_t<float>;
    constexpr index_t L = lanes<float>;
    index_t j = 0;
    for (; j + L <= V; j += L) {
      P x = pk::ploadu<P>(z + j);
      if (bias) x = pk::padd(x, pk::ploadu<P>(bias + j));
      pk::pstoreu(z + j, tf.forward_with<transform_packet_ops, P, float>(x));
    }
    if (j < V) {
      alignas(64) float t[L] = {};
      for (index_t i = 0; i < V - j; ++i) t[i] = z[j + i] + (bias ? bias[j + i] : 0.f);
      pk::pstore(t, tf.forward_with<transform_packet_ops, P, float>(pk::pload<P>(t)));
      for (index_t i = 0; i < V - j; ++i) z[j + i] = t[i];
    }
  } else {
    for (index_t j = 0; j < V; ++j) z[j] = tf.forward(bias ? z[j] + bias[j] : z[j]);
  }
}

/// x_j = g_j * transform'(z_j): z's row becomes dL/dx (g: dL/dz of the row).
template <class T>
inline void transform_backward_row(const logit_transform& tf, const T* g, T* z, index_t V) noexcept {
  if (tf.identity()) {
    std::memcpy(z, g, size_t(V) * sizeof(T));
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    using P = packet_t<float>;
    constexpr index_t L = lanes<float>;
    index_t j = 0;
    for (; j + L <= V; j += L)
      pk::pstoreu(z + j, pk::pmul(pk::ploadu<P>(g + j), tf.derivative_with<transform_packet_ops, P, float>(pk::ploadu<P>(z + j))));
    for (; j < V; ++j) z[j] = g[j] * tf.derivative(z[j]);
  } else {
    for (index_t j = 0; j < V; ++j) z[j] = g[j] * tf.derivative(z[j]);
  }
}

/// One block of memory from a scratch_allocator, given back on destruction.
struct scratch_block {
  scratch_allocator alloc{};
  void* p = nullptr;
  size_t bytes = 0;
  scratch_block() = default;
  scratch_block(const scratch_block&) = delete;
  scratch_block& operator=(const scratch_block&) = delete;
  status get(const scratch_allocator& a, size_t n) {
    alloc = a;
    bytes = round64(n);
    if (bytes == 0) return {};
    p = alloc.allocate ? alloc.allocate(alloc.ctx, bytes) : ::operator new(bytes, std::align_val_t{64}, std::nothrow);
    if (!p) return make_error(errc::insufficient_scratch, "the fused LM head's scratch allocator returned nullptr");
    return {};
  }
  ~scratch_block() {
    if (!p) return;
    if (alloc.deallocate) alloc.deallocate(alloc.ctx, p, bytes);
    else ::operator delete(p, std::align_val_t{64});
  }
  template <class T>
  T* as() const noexcept { return static_cast<T*>(p); }
};

/// Runs f(block, begin, end) over a static partition of [0, c) into t = min(threads, c) blocks,
/// block i on its own thread (so a block index names the thread's buffers).
template <class F>
status for_blocks(index_t c, index_t t, F&& f) {
  return parallel_rows(t, int(t), [&](index_t i0, index_t i1) -> status {
    for (index_t i = i0; i < i1; ++i) TROPD_TRY(f(i, c * i / t, c * (i + 1) / t));
    return {};
  });
}

template <class T, class G>
inline status check_fused_outputs(const fused_outputs<G>& out, index_t n, index_t V, index_t H) {
  if (!out.grad_hidden.valid() || (out.grad_hidden.rows != 0 && (out.grad_hidden.rows != n || out.grad_hidden.cols != H)))
    return make_error(errc::shape_mismatch, "grad_hidden must be empty or [n x H] like the hidden states");
  if (!out.grad_weight.valid() || (out.grad_weight.rows != 0 && (out.grad_weight.rows != V || out.grad_weight.cols != H)))
    return make_error(errc::shape_mismatch, "grad_weight must be empty (frozen weight) or [V x H] like the weight");
  if (out.grad_bias.size != 0 && (out.grad_bias.size != V || out.grad_bias.data == nullptr))
    return make_error(errc::shape_mismatch, "grad_bias must be empty or have one entry per vocabulary row [V]");
  return {};
}

}  // namespace detail

/// The scratch shape of a fused call.
template <class T, class Teacher>
fused_shape fused_shape_of(const linear_head<T>& student, const Teacher&, int threads) noexcept {
  fused_shape s;
  s.n = student.hidden.rows;
  s.V = student.weight.rows;
  s.logit_bytes = sizeof(T);
  if constexpr (detail::fused_teacher<Teacher>::head) s.teacher_logit_bytes = sizeof(typename detail::fused_teacher<Teacher>::element);
  s.threads = threads;
  return s;
}

/// The objective from the student's hidden states and output weight (see the header comment).
/// Teacher: linear_head<TT>, matrix_view<const TT> logits [n x V], or teacher_logprobs.
/// Gemm: any gemm_for<T> (and gemm_for<TT> with a teacher head); default eigen_gemm.
template <class Obj, class T, class Teacher, class Gemm = eigen_gemm>
  requires detail::fused_teacher_form<Teacher>
status fused_lm_head(const Obj& obj, const linear_head<T>& student, const Teacher& teacher, const row_inputs& in,
                     const fused_outputs<T>& out, const fused_options& opt = {}, Gemm gemm = {}) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "fused_lm_head (host): hidden states and weight are float or double");
  using TI = detail::fused_teacher<Teacher>;
  using TT = typename TI::element;
  constexpr bool head = TI::head, logits = TI::logits;
  using W = work_type_t<T, TT>;
  static_assert(gemm_for<Gemm, T, T, T, T>, "fused_lm_head: the GEMM must be callable as gemm(op_a, op_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc) -> status on T");
  if constexpr (head) static_assert(gemm_for<Gemm, TT, TT, TT, TT>, "fused_lm_head: the GEMM must also take the teacher head's element type");
  if constexpr (std::is_same_v<Gemm, eigen_gemm>)
    if (gemm.threads < 1) gemm.threads = opt.eval.threads;

  // Arguments.
  TROPD_TRY(obj.check());
  TROPD_TRY(checks::temperatures(in.student_temperature, in.teacher_temperature));
  TROPD_TRY(check_head(student, false));
  const index_t n = student.hidden.rows, V = student.weight.rows, H = student.hidden.cols;
  if (n == 0) return make_error(errc::empty_batch, "no rows (the hidden states have none)");
  if (V < 1) return make_error(errc::shape_mismatch, "vocabulary size (weight rows) must be >= 1");
  if constexpr (head) {
    TROPD_TRY(check_head(teacher, true));
    if (teacher.hidden.rows != n) return make_error(errc::shape_mismatch, "teacher head: its hidden states have a different number of rows than the student's");
    if (teacher.weight.rows != V)
      return make_error(errc::shape_mismatch, "teacher and student vocabulary sizes differ (teacher weight rows != student weight rows: pad or truncate the teacher vocabulary first)");
  } else {
    TROPD_TRY(detail::check_teacher(obj, teacher, n, V));
  }
  TROPD_TRY(detail::check_fused_outputs<T>(out, n, V, H));
  const token_outputs tout{out.loss, out.diag, out.dloss_ds, out.advantage, out.dloss_dtopk, out.flags};
  detail::row_plan<Obj, logits> p;
  TROPD_TRY(detail::plan_rows(obj, n, V, in, tout, out.topk_ids, opt.eval, p));
  if (opt.chunk < 0) return make_error(errc::invalid_parameter, "fused_options::chunk must be >= 0 (0: chosen from scratch_budget)");
  const fused_shape shape = fused_shape_of(student, teacher, opt.eval.threads);
  const index_t chunk = opt.chunk > 0 ? std::min(opt.chunk, n) : fused_choose_chunk(shape, opt.scratch_budget);
  int sweeps = fused_sweeps(obj, p.mask_bad);
  if (opt.sweeps == sweep_policy::one && sweeps == 2)
    return make_error(errc::unsupported,
                      "sweep_policy::one: this objective needs batch decisions before any gradient (a batch quantile, a sequence mask, a mean over "
                      "kept tokens without an external normaliser, or input_policy::mask): it takes two sweeps");
  if (opt.sweeps == sweep_policy::two) sweeps = 2;

  // Scratch: the chunk's logits (then its dL/dx), a teacher head's logits, one gradient row per thread.
  const index_t nt = detail::fused_threads(shape, chunk);
  const size_t row_bytes = detail::round64(size_t(V) * sizeof(T));
  detail::scratch_block zmem, umem, gmem;
  TROPD_TRY(zmem.get(opt.allocator, size_t(chunk) * size_t(V) * sizeof(T)));
  if constexpr (head) TROPD_TRY(umem.get(opt.allocator, size_t(chunk) * size_t(V) * sizeof(TT)));
  TROPD_TRY(gmem.get(opt.allocator, size_t(nt) * row_bytes));
  T* const z = zmem.as<T>();
  TT* const u = umem.as<TT>();
  fused_info info{chunk, sweeps, zmem.bytes + umem.bytes + gmem.bytes, 0};

  const W its = W(1.0 / in.student_temperature), itt = W(1.0 / in.teacher_temperature);
  const int threads = opt.eval.threads;
  detail::row_token_arrays a;
  detail::init_row_arrays(p, in, a);
  std::vector<uint8_t> row_masked(static_cast<size_t>(n), 0);
  token_stages st;

  // The teacher's logits row of global row r (local row l of the chunk).
  auto teacher_row = [&](index_t r, index_t l) -> const TT* {
    if constexpr (head) return u + l * V;
    else if constexpr (logits) return teacher.row(r);
    else return (void)r, (void)l, nullptr;
  };
  // x = h_c W^T, z = transform(x + b) for rows [r0, r0 + c); the teacher head's likewise.
  auto chunk_logits = [&](index_t r0, index_t c, bool with_teacher) -> status {
    TROPD_TRY(gemm(gemm_op::n, gemm_op::t, c, V, H, T(1), student.hidden.row(r0), student.hidden.stride, student.weight.data,
                   student.weight.stride, T(0), z, V));
    ++info.gemm_calls;
    if (!student.transform.identity() || student.bias.size)
      TROPD_TRY(parallel_rows(c, threads, [&](index_t b0, index_t e0) -> status {
        for (index_t l = b0; l < e0; ++l) detail::transform_row(student.transform, student.bias.size ? student.bias.data : nullptr, z + l * V, V);
        return {};
      }));
    if constexpr (head) {
      if (!with_teacher) return {};
      const index_t HT = teacher.hidden.cols;
      TROPD_TRY(gemm(gemm_op::n, gemm_op::t, c, V, HT, TT(1), teacher.hidden.row(r0), teacher.hidden.stride, teacher.weight.data,
                     teacher.weight.stride, TT(0), u, V));
      ++info.gemm_calls;
      if (!teacher.transform.identity() || teacher.bias.size)
        TROPD_TRY(parallel_rows(c, threads, [&](index_t b0, index_t e0) -> status {
          for (index_t l = b0; l < e0; ++l) detail::transform_row(teacher.transform, teacher.bias.size ? teacher.bias.data : nullptr, u + l * V, V);
          return {};
        }));
    } else {
      (void)with_teacher;
    }
    return {};
  };
  // Row statistics of the chunk (host/objective.hpp: the same per-row function as evaluate_rows).
  auto chunk_stats = [&](index_t r0, index_t c) -> status {
    return parallel_rows(c, threads, [&](index_t b0, index_t e0) -> status {
      auto buf = std::make_unique<detail::row_scratch<W>>();
      detail::prepare_stats_scratch(p, *buf);
      for (index_t l = b0; l < e0; ++l) {
        const index_t r = r0 + l;
        double t = 0;
        if constexpr (!logits) t = teacher.t[r];
        TROPD_TRY(detail::row_statistics(obj, p, static_cast<const T*>(z + l * V), teacher_row(r, l), t, in, r, its, itt, *buf, a,
                                         row_masked.data()));
      }
      return {};
    });
  };
  // dL/dz of the chunk's rows (row_gradient, into the thread's row), then dL/dx over z; then
  // dL/db, dL/dh_c and dL/dW.
  auto chunk_backward = [&](index_t r0, index_t c) -> status {
    TROPD_TRY(detail::for_blocks(c, std::max<index_t>(1, std::min<index_t>(threads < 1 ? 1 : threads, c)),
                                 [&](index_t i, index_t b0, index_t e0) -> status {
      auto buf = std::make_unique<detail::row_scratch<W>>();
      detail::prepare_grad_scratch(p, *buf);
      T* g = reinterpret_cast<T*>(gmem.as<unsigned char>() + size_t(i) * row_bytes);
      for (index_t l = b0; l < e0; ++l) {
        const index_t r = r0 + l;
        const index_t bad = detail::row_gradient(obj, p, static_cast<const T*>(z + l * V), teacher_row(r, l), in, r, a, st, its, itt, *buf, g, false);
        TROPD_TRY(detail::gradient_status(r, bad));
        detail::transform_backward_row(student.transform, g, z + l * V, V);
      }
      return {};
    }));
    if (out.grad_bias.size) {
      Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>> db(out.grad_bias.data, V);
      for (index_t l = 0; l < c; ++l) db += Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(z + l * V, V);
    }
    if (out.grad_hidden.rows) {
      TROPD_TRY(gemm(gemm_op::n, gemm_op::n, c, H, V, T(1), static_cast<const T*>(z), V, student.weight.data, student.weight.stride, T(0),
                     out.grad_hidden.row(r0), out.grad_hidden.stride));
      ++info.gemm_calls;
      for (index_t l = 0; l < c; ++l)
        if (!detail::all_finite(out.grad_hidden.row(r0 + l), H))
          return make_error(errc::infinite_divergence, "dL/dh does not fit its type (hidden states or weight at the edge of the range)", r0 + l);
    }
    if (out.grad_weight.rows) {
      // Over runs of rows that were not masked (input_policy::mask): a masked row's dL/dx is 0,
      // but its hidden states may be NaN, and 0 * NaN would reach dL/dW.
      for (index_t l0 = 0; l0 < c;) {
        if (row_masked[static_cast<size_t>(r0 + l0)]) {
          ++l0;
          continue;
        }
        index_t l1 = l0 + 1;
        while (l1 < c && !row_masked[static_cast<size_t>(r0 + l1)]) ++l1;
        TROPD_TRY(gemm(gemm_op::t, gemm_op::n, V, H, l1 - l0, T(1), static_cast<const T*>(z + l0 * V), V, student.hidden.row(r0 + l0),
                       student.hidden.stride, T(1), out.grad_weight.data, out.grad_weight.stride));
        ++info.gemm_calls;
        l0 = l1;
      }
    }
    return {};
  };

  if (sweeps == 1) {
    if constexpr (fused_one_sweep_capable<Obj>) {
      // One sweep: the aggregation weights from the origin tags (counted_by), then per chunk the
      // row statistics, the token stages of its tokens, its gradient.
      const token_batch b = detail::row_batch(p, a, in);
      st.batch = b;
      TROPD_TRY(detail::validate_structure(obj, b));
      const std::vector<index_t> seq = detail::token_sequences(b.seq_offsets, n);
      {
        applied counted;
        counted.tok.assign(static_cast<size_t>(n), token_result{});
        for (index_t i = 0; i < n; ++i)
          if (counted_by(obj, b.from[i])) counted.tok[static_cast<size_t>(i)].flags = flags::counted;
        TROPD_TRY(aggregate_weights(obj, b, counted, st.w, st.normaliser));
      }
      prepare_applied(b, st.a);
      st.trusted.assign(static_cast<size_t>(n), 0);
      const double limit = detail::row_output_limit<T>(tout, true);
      for (index_t r0 = 0; r0 < n; r0 += chunk) {
        const index_t c = std::min(chunk, n - r0), r1 = r0 + c;
        TROPD_TRY(chunk_logits(r0, c, true));
        TROPD_TRY(chunk_stats(r0, c));
        for (index_t i = r0; i < r1; ++i) TROPD_TRY(rules::check_token_values(b, i, Obj::outlier_type::needs_topk));
        decide_range(obj, b, opt.eval, seq.data(), r0, r1, st.trusted);
        TROPD_TRY(apply_range(obj, b, st.trusted, seq.data(), r0, r1, st.a));
        for (index_t i = r0; i < r1; ++i)
          if (((st.a.tok[static_cast<size_t>(i)].flags & flags::counted) != 0) != counted_by(obj, b.from[i]))
            return make_error(errc::unsupported, "fused LM head: a token's counted flag differs from counted_by (one-sweep weights would be wrong)", i);
        TROPD_TRY(detail::check_output_range(b, st.a, st.w, limit, r0, r1));
        TROPD_TRY(chunk_backward(r0, c));
      }
      summarise(b, st.trusted, st.a, st.w, st.normaliser, st.diag);
      TROPD_TRY(detail::finish_stages(obj, a, st));
    }
  } else {
    // Two sweeps: every row's statistics, the token stages of the batch, then the gradients
    // (each chunk's logits computed again; the teacher's only for a dense term).
    for (index_t r0 = 0; r0 < n; r0 += chunk) {
      const index_t c = std::min(chunk, n - r0);
      TROPD_TRY(chunk_logits(r0, c, true));
      TROPD_TRY(chunk_stats(r0, c));
    }
    detail::mark_masked_rows(a, row_masked.data());
    const token_batch b = detail::row_batch(p, a, in);
    TROPD_TRY(run_token_stages(obj, b, opt.eval, st));
    TROPD_TRY(detail::finish_stages(obj, a, st));
    TROPD_TRY(detail::check_output_range(st.batch, st.a, st.w, detail::row_output_limit<T>(tout, true)));
    for (index_t r0 = 0; r0 < n; r0 += chunk) {
      const index_t c = std::min(chunk, n - r0);
      TROPD_TRY(chunk_logits(r0, c, Obj::has_dense));
      TROPD_TRY(chunk_backward(r0, c));
    }
  }
  detail::write_row_outputs(p, a, st, tout, out.topk_ids);
  if (out.info) *out.info = info;
  return {};
}

}  // namespace tropd::host
