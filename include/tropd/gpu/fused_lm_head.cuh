// tropd/gpu/fused_lm_head.cuh: the fused LM head on the GPU (core/fused_lm_head.hpp: what it
// computes; host/fused_lm_head.hpp: the CPU backend, which this mirrors chunk for chunk).
//
//   cublaslt_gemm        the device GEMM (gemm_for): cuBLASLt, row-major, bf16 / fp16 / fp32
//                        operands, fp32 accumulation, fp32 (or operand-type) results,
//                        stream-ordered, its workspace in the caller's scratch
//   fused_scratch_bytes, fused_choose_chunk
//                        the scratch of a call and the chunk that fits a byte budget
//   fused_lm_head        per chunk of c rows: x = h_c W^T (GEMM, fp32 out), z = transform(x + b)
//                        (kernel), the row-level evaluator's statistics / token stages /
//                        dL/dz on the chunk's fp32 logits, dL/dx = dL/dz transform'(z) in the
//                        operand type (kernel), dL/db (kernel), dL/dh_c = dL/dx W and
//                        dL/dW += dL/dx^T h_c (GEMMs); one sweep or two (fused_sweeps)
//
// The row level on the device. The row passes and the token stages are NOT written again
// here: the call takes a `chunk_row_evaluator`, the CUDA backend's row-level objective driven
// chunk by chunk (its row statistics, per-token decisions and gradient rows over [c x V] fp32
// logits in device memory, exactly the phases host/objective.hpp runs on the CPU). The CUDA
// backend's row-level objective (evaluate_rows on the device) is being rewritten on branch
// `gpu` and does not exist on this branch yet; docs/fused_lm_head.md lists what its evaluator
// must provide. Until then this file is compiled (sm_80, sm_90) against a test evaluator only.
//
// Everything is stream-ordered on the context's stream: no allocation (scratch is the
// caller's, sized by fused_scratch_bytes), no synchronisation. Argument errors come back as a
// status before anything is launched; a cuBLASLt or launch error as backend_error; data errors
// (NaN logits, infinite divergences) are the evaluator's (the CUDA backend's status word).
//
// Device code: include only from .cu files compiled by nvcc with -std=c++20; link cublasLt.
#pragma once

#if !defined(__CUDACC__)
#error "tropd/gpu/fused_lm_head.cuh is CUDA code: compile this translation unit with nvcc (host code includes <tropd/host/fused_lm_head.hpp>)"
#endif

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <concepts>
#include <type_traits>

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <tropd/config.hpp>
#include <tropd/core/fused_lm_head.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/types.hpp>
#include <tropd/core/views.hpp>

namespace tropd::gpu {

// ===========================================================================
// The GEMM
// ===========================================================================

namespace detail {

template <class T>
constexpr cudaDataType_t cuda_type() noexcept {
  if constexpr (std::is_same_v<T, bf16>) return CUDA_R_16BF;
  else if constexpr (std::is_same_v<T, fp16>) return CUDA_R_16F;
  else return CUDA_R_32F;
}

inline status lt_error(cublasStatus_t s) noexcept {
  return s == CUBLAS_STATUS_SUCCESS ? status{} : make_error(errc::backend_error, "cuBLASLt call failed (cublasLtMatmul or its descriptors)");
}

/// The descriptors of one cublasLtMatmul, destroyed with the object (host-side objects only).
struct lt_call {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  lt_call() = default;
  lt_call(const lt_call&) = delete;
  lt_call& operator=(const lt_call&) = delete;
  ~lt_call() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

}  // namespace detail

/// The device GEMM of the fused LM head (core/fused_lm_head.hpp: gemm_for): cuBLASLt on
/// row-major operands of type TA (bf16, fp16 or float; both operands the same type), fp32
/// accumulation (CUBLAS_COMPUTE_32F), results TC = float or TA, alpha / beta float.
/// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the operands are passed to
/// cuBLASLt swapped, nothing is copied. Stream-ordered on `stream`; the workspace is the
/// caller's (workspace_bytes may be 0). Heuristics are queried per call (host-side).
struct cublaslt_gemm {
  cublasLtHandle_t handle = nullptr;
  cudaStream_t stream = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;

  template <class TA, class TC>
  status operator()(gemm_op ta, gemm_op tb, index_t m, index_t n, index_t k, float alpha, const TA* a, index_t lda, const TA* b,
                    index_t ldb, float beta, TC* c, index_t ldc) const {
    static_assert(std::is_same_v<TA, bf16> || std::is_same_v<TA, fp16> || std::is_same_v<TA, float>, "cublaslt_gemm: bf16, fp16 or float operands");
    static_assert(std::is_same_v<TC, float> || std::is_same_v<TC, TA>, "cublaslt_gemm: float results, or the operands' type");
    if (m <= 0 || n <= 0) return {};
    if (handle == nullptr) return make_error(errc::invalid_parameter, "cublaslt_gemm: no cuBLASLt handle");
    detail::lt_call call;
    const cublasOperation_t opa = tb == gemm_op::n ? CUBLAS_OP_N : CUBLAS_OP_T;  // cuBLASLt's A is our B
    const cublasOperation_t opb = ta == gemm_op::n ? CUBLAS_OP_N : CUBLAS_OP_T;
    TROPD_TRY(detail::lt_error(cublasLtMatmulDescCreate(&call.op, CUBLAS_COMPUTE_32F, CUDA_R_32F)));
    TROPD_TRY(detail::lt_error(cublasLtMatmulDescSetAttribute(call.op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa)));
    TROPD_TRY(detail::lt_error(cublasLtMatmulDescSetAttribute(call.op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb)));
    const cudaDataType_t t_in = detail::cuda_type<TA>(), t_out = detail::cuda_type<TC>();
    // Column-major views: our B buffer is [n x k] (tb = n) or [k x n]; our A buffer [k x m] or [m x k].
    TROPD_TRY(detail::lt_error(cublasLtMatrixLayoutCreate(&call.la, t_in, uint64_t(tb == gemm_op::n ? n : k), uint64_t(tb == gemm_op::n ? k : n), int64_t(ldb))));
    TROPD_TRY(detail::lt_error(cublasLtMatrixLayoutCreate(&call.lb, t_in, uint64_t(ta == gemm_op::n ? k : m), uint64_t(ta == gemm_op::n ? m : k), int64_t(lda))));
    TROPD_TRY(detail::lt_error(cublasLtMatrixLayoutCreate(&call.lc, t_out, uint64_t(n), uint64_t(m), int64_t(ldc))));
    TROPD_TRY(detail::lt_error(cublasLtMatmulPreferenceCreate(&call.pref)));
    TROPD_TRY(detail::lt_error(cublasLtMatmulPreferenceSetAttribute(call.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes,
                                                                    sizeof workspace_bytes)));
    cublasLtMatmulHeuristicResult_t heur{};
    int found = 0;
    TROPD_TRY(detail::lt_error(cublasLtMatmulAlgoGetHeuristic(handle, call.op, call.la, call.lb, call.lc, call.lc, call.pref, 1, &heur, &found)));
    if (found < 1) return make_error(errc::backend_error, "cuBLASLt found no algorithm for this GEMM (types, shapes or workspace)");
    return detail::lt_error(cublasLtMatmul(handle, call.op, &alpha, b, call.la, a, call.lb, &beta, c, call.lc, c, call.lc, &heur.algo,
                                           workspace, workspace_bytes, stream));
  }
};

// ===========================================================================
// The device row level, driven chunk by chunk
// ===========================================================================

/// What the CUDA backend's row-level objective must offer the fused LM head: the phases of
/// host::evaluate_rows (host/objective.hpp) on chunks of rows whose fp32 logits are in device
/// memory (z [c x V], row stride ldz; u: the teacher's chunk, row stride ldu, or nullptr for a
/// teacher given as log-probs / top-k lists, which the evaluator holds), stream-ordered, with its O(n)
/// per-token state and its status word in its own scratch:
///
///   begin(sweeps, s)            start a call; sweeps = 1: the aggregation weights from the
///                               origin tags now (counted_by, aggregate_weights)
///   statistics(r0, c, z, ldz, u, ldu, s)
///                               row_statistics of rows [r0, r0 + c)
///   chunk_stages(r0, c, s)      (one sweep) values check, decide_range, apply_range of the rows
///   batch_stages(s)             (two sweeps) run_token_stages over the batch
///   gradient(r0, c, z, ldz, u, ldu, g, ldg, s)
///                               row_gradient of the rows: dL/dz into g [c x V] (fp32)
///   finish(s)                   loss, diagnostics and per-token outputs (write_row_outputs)
template <class E>
concept chunk_row_evaluator = requires(E& e, int sweeps, index_t i, const float* z, float* g, cudaStream_t s) {
  { e.begin(sweeps, s) } -> std::convertible_to<status>;
  { e.statistics(i, i, z, i, z, i, s) } -> std::convertible_to<status>;
  { e.chunk_stages(i, i, s) } -> std::convertible_to<status>;
  { e.batch_stages(s) } -> std::convertible_to<status>;
  { e.gradient(i, i, z, i, z, i, g, i, s) } -> std::convertible_to<status>;
  { e.finish(s) } -> std::convertible_to<status>;
};

/// The teacher of a device fused call: a head (hidden [n x H_T] and weight [V x H_T] of type T),
/// full fp32 logits [n x V] (device memory), or neither (the evaluator holds log-probs / lists).
template <class T>
struct device_teacher {
  linear_head<T> head{};             ///< used when head.weight.rows != 0
  matrix_view<const float> logits{};  ///< used when logits.rows != 0
};

/// Outputs of the device fused call, in device memory: O = float (fp32 master gradients) or T.
template <class O>
struct device_fused_outputs {
  matrix_view<O> grad_hidden{};  ///< [n x H] dL/dh, written (empty: not computed)
  matrix_view<O> grad_weight{};  ///< [V x H] dL/dW, ADDED to (empty: frozen, skipped)
  vector_view<O> grad_bias{};    ///< [V] dL/db, ADDED to (empty: not computed)
};

/// Where a device call works: caller scratch (16-byte aligned; cudaMalloc gives 256), the
/// stream, the cuBLASLt handle.
struct fused_device_context {
  void* scratch = nullptr;
  size_t scratch_bytes = 0;
  cudaStream_t stream = nullptr;
  cublasLtHandle_t lt = nullptr;
  size_t gemm_workspace_bytes = size_t(32) << 20;  ///< carved from the scratch for cuBLASLt
};

/// The sizes the device scratch depends on.
struct device_fused_shape {
  index_t n = 0, V = 0;
  size_t operand_bytes = 2;     ///< sizeof(T): bf16 / fp16 2, float 4
  bool teacher_head = false;    ///< the teacher is a head (its fp32 chunk logits)
  size_t gemm_workspace_bytes = size_t(32) << 20;
};

namespace detail {
inline size_t align256(size_t b) noexcept { return (b + 255) / 256 * 256; }
}  // namespace detail

/// Bytes of device scratch a call with `chunk` rows per chunk needs: the chunk's fp32 logits
/// z and dL/dz, dL/dx in the operand type, a teacher head's fp32 logits, the GEMM workspace;
/// each 256-byte aligned.
inline size_t fused_scratch_bytes(const device_fused_shape& s, index_t chunk) noexcept {
  const size_t cv = size_t(std::max<index_t>(1, std::min(chunk, s.n))) * size_t(s.V);
  size_t b = 2 * detail::align256(cv * 4) + detail::align256(cv * s.operand_bytes) + detail::align256(s.gemm_workspace_bytes);
  if (s.teacher_head) b += detail::align256(cv * 4);
  return b;
}

/// The largest chunk (<= n; a multiple of 16 when >= 16, for tensor-core tiles) that fits `budget`.
inline index_t fused_choose_chunk(const device_fused_shape& s, size_t budget) noexcept {
  if (s.n <= 0) return 1;
  if (fused_scratch_bytes(s, s.n) <= budget) return s.n;
  index_t lo = 1, hi = s.n;
  while (hi - lo > 1) {
    const index_t mid = lo + (hi - lo) / 2;
    (fused_scratch_bytes(s, mid) <= budget ? lo : hi) = mid;
  }
  return lo >= 16 ? lo / 16 * 16 : lo;
}

namespace detail {

template <class T>
TROPD_HD inline T from_f32(float x) noexcept {
  if constexpr (std::is_same_v<T, bf16>) return bf16::from_float(x);
  else if constexpr (std::is_same_v<T, fp16>) return fp16::from_float(x);
  else return x;
}

/// z = transform(z + b) over [c x V] (row stride ld).
template <class T>
__global__ void transform_kernel(float* z, index_t c, index_t V, index_t ld, const T* bias, logit_transform tf) {
  const index_t total = c * V;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += index_t(gridDim.x) * blockDim.x) {
    const index_t r = i / V, j = i - r * V;
    float x = z[r * ld + j];
    if (bias) x += to_acc(bias[j]);
    z[r * ld + j] = tf.forward(x);
  }
}

/// gx = T(g * transform'(z)) over [c x V] (gx contiguous).
template <class T>
__global__ void backward_kernel(const float* g, const float* z, index_t c, index_t V, index_t ld, T* gx, logit_transform tf) {
  const index_t total = c * V;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += index_t(gridDim.x) * blockDim.x) {
    const index_t r = i / V, j = i - r * V;
    gx[i] = from_f32<T>(g[r * ld + j] * tf.derivative(z[r * ld + j]));
  }
}

/// db_j += sum_r g_rj transform'(z_rj) (fp32, one thread per column, rows in order).
template <class O>
__global__ void bias_grad_kernel(const float* g, const float* z, index_t c, index_t V, index_t ld, O* db, logit_transform tf) {
  for (index_t j = index_t(blockIdx.x) * blockDim.x + threadIdx.x; j < V; j += index_t(gridDim.x) * blockDim.x) {
    float s = 0;
    for (index_t r = 0; r < c; ++r) s += g[r * ld + j] * tf.derivative(z[r * ld + j]);
    db[j] = from_f32<O>(to_acc(db[j]) + s);
  }
}

inline unsigned grid_for(index_t elems) noexcept { return unsigned(std::min<index_t>((elems + 255) / 256, 65535)); }

inline status launch_status() noexcept {
  return cudaGetLastError() == cudaSuccess ? status{} : make_error(errc::backend_error, "a fused LM head kernel failed to launch");
}

}  // namespace detail

/// The objective from hidden states and the output weight on the GPU (see the header
/// comment). T: bf16, fp16 or float (hidden states, weights); O: the gradients' type (float or
/// T). `eval` is the CUDA backend's row-level objective for `obj`, set up with the call's
/// per-row inputs and outputs. chunk = 0: fused_choose_chunk(budget = ctx.scratch_bytes).
/// `gemm`: any gemm_for (T operands; float and O results; float scalars) running on
/// ctx.stream; the default cublaslt_gemm gets ctx's handle, stream and workspace.
template <class Obj, class T, class O, chunk_row_evaluator E, class Gemm = cublaslt_gemm>
status fused_lm_head(const Obj& obj, const linear_head<T>& student, const device_teacher<T>& teacher, E& eval,
                     const device_fused_outputs<O>& out, index_t chunk, sweep_policy policy, bool mask_bad_input,
                     const fused_device_context& ctx, Gemm gemm = {}) {
  static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, fp16> || std::is_same_v<T, float>, "gpu::fused_lm_head: bf16, fp16 or float operands");
  static_assert(std::is_same_v<O, float> || std::is_same_v<O, T>, "gpu::fused_lm_head: float gradients, or the operands' type");
  static_assert(gemm_for<Gemm, T, T, float, float> && gemm_for<Gemm, T, T, O, float>,
                "gpu::fused_lm_head: the GEMM must be callable as gemm(op_a, op_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc) -> status "
                "with T operands, float and O results, float alpha / beta");
  TROPD_TRY(obj.check());
  TROPD_TRY(check_head(student, false));
  const index_t n = student.hidden.rows, V = student.weight.rows, H = student.hidden.cols;
  if (n == 0) return make_error(errc::empty_batch, "no rows (the hidden states have none)");
  if (V < 1) return make_error(errc::shape_mismatch, "vocabulary size (weight rows) must be >= 1");
  const bool head = teacher.head.weight.rows != 0;
  if (head) {
    TROPD_TRY(check_head(teacher.head, true));
    if (teacher.head.hidden.rows != n) return make_error(errc::shape_mismatch, "teacher head: its hidden states have a different number of rows than the student's");
    if (teacher.head.weight.rows != V)
      return make_error(errc::shape_mismatch, "teacher and student vocabulary sizes differ (pad or truncate the teacher vocabulary first)");
  } else if (teacher.logits.rows != 0) {
    if (!teacher.logits.valid() || teacher.logits.rows != n || teacher.logits.cols != V)
      return make_error(errc::shape_mismatch, "teacher logits must be [n x V] like the student's");
  }
  if (!out.grad_hidden.valid() || (out.grad_hidden.rows != 0 && (out.grad_hidden.rows != n || out.grad_hidden.cols != H)))
    return make_error(errc::shape_mismatch, "grad_hidden must be empty or [n x H] like the hidden states");
  if (!out.grad_weight.valid() || (out.grad_weight.rows != 0 && (out.grad_weight.rows != V || out.grad_weight.cols != H)))
    return make_error(errc::shape_mismatch, "grad_weight must be empty (frozen weight) or [V x H] like the weight");
  if (out.grad_bias.size != 0 && out.grad_bias.size != V) return make_error(errc::shape_mismatch, "grad_bias must be empty or have V entries");
  if (chunk < 0) return make_error(errc::invalid_parameter, "chunk must be >= 0 (0: chosen from the scratch size)");
  const device_fused_shape shape{n, V, sizeof(T), head, ctx.gemm_workspace_bytes};
  if (chunk == 0) chunk = fused_choose_chunk(shape, ctx.scratch_bytes);
  chunk = std::min(chunk, n);
  if (ctx.scratch == nullptr || ctx.scratch_bytes < fused_scratch_bytes(shape, chunk))
    return make_error(errc::insufficient_scratch, "the scratch is smaller than gpu::fused_scratch_bytes asks for");
  int sweeps = fused_sweeps(obj, mask_bad_input);
  if (policy == sweep_policy::one && sweeps == 2)
    return make_error(errc::unsupported, "sweep_policy::one: this objective needs batch decisions before any gradient: it takes two sweeps");
  if (policy == sweep_policy::two) sweeps = 2;

  // Scratch: z, dL/dz (fp32), dL/dx (T), the teacher head's logits (fp32), the GEMM workspace.
  const size_t cv = size_t(chunk) * size_t(V);
  char* p = static_cast<char*>(ctx.scratch);
  auto carve = [&](size_t bytes) {
    char* q = p;
    p += detail::align256(bytes);
    return q;
  };
  float* z = reinterpret_cast<float*>(carve(cv * 4));
  float* g = reinterpret_cast<float*>(carve(cv * 4));
  T* gx = reinterpret_cast<T*>(carve(cv * sizeof(T)));
  float* u = head ? reinterpret_cast<float*>(carve(cv * 4)) : nullptr;
  void* ws = carve(ctx.gemm_workspace_bytes);
  if constexpr (std::is_same_v<Gemm, cublaslt_gemm>) {
    if (gemm.handle == nullptr) gemm = cublaslt_gemm{ctx.lt, ctx.stream, ws, ctx.gemm_workspace_bytes};
  }
  const cudaStream_t s = ctx.stream;

  auto chunk_logits = [&](index_t r0, index_t c, bool with_teacher) -> status {
    TROPD_TRY(gemm(gemm_op::n, gemm_op::t, c, V, H, 1.0f, student.hidden.row(r0), student.hidden.stride, student.weight.data,
                   student.weight.stride, 0.0f, z, V));
    if (!student.transform.identity() || student.bias.size) {
      detail::transform_kernel<<<detail::grid_for(c * V), 256, 0, s>>>(z, c, V, V, student.bias.size ? student.bias.data : nullptr, student.transform);
      TROPD_TRY(detail::launch_status());
    }
    if (head && with_teacher) {
      const auto& th = teacher.head;
      TROPD_TRY(gemm(gemm_op::n, gemm_op::t, c, V, th.hidden.cols, 1.0f, th.hidden.row(r0), th.hidden.stride, th.weight.data, th.weight.stride,
                     0.0f, u, V));
      if (!th.transform.identity() || th.bias.size) {
        detail::transform_kernel<<<detail::grid_for(c * V), 256, 0, s>>>(u, c, V, V, th.bias.size ? th.bias.data : nullptr, th.transform);
        TROPD_TRY(detail::launch_status());
      }
    }
    return {};
  };
  auto teacher_chunk = [&](index_t r0) -> const float* {
    if (head) return u;
    if (teacher.logits.rows) return teacher.logits.row(r0);
    return nullptr;
  };
  const index_t ldu = head ? V : teacher.logits.stride;
  auto chunk_backward = [&](index_t r0, index_t c) -> status {
    TROPD_TRY(eval.gradient(r0, c, z, V, teacher_chunk(r0), ldu, g, V, s));
    detail::backward_kernel<<<detail::grid_for(c * V), 256, 0, s>>>(g, z, c, V, V, gx, student.transform);
    TROPD_TRY(detail::launch_status());
    if (out.grad_bias.size) {
      detail::bias_grad_kernel<<<detail::grid_for(V), 256, 0, s>>>(g, z, c, V, V, out.grad_bias.data, student.transform);
      TROPD_TRY(detail::launch_status());
    }
    if (out.grad_hidden.rows)
      TROPD_TRY(gemm(gemm_op::n, gemm_op::n, c, H, V, 1.0f, static_cast<const T*>(gx), V, student.weight.data, student.weight.stride, 0.0f,
                     out.grad_hidden.row(r0), out.grad_hidden.stride));
    if (out.grad_weight.rows)
      TROPD_TRY(gemm(gemm_op::t, gemm_op::n, V, H, c, 1.0f, static_cast<const T*>(gx), V, student.hidden.row(r0), student.hidden.stride, 1.0f,
                     out.grad_weight.data, out.grad_weight.stride));
    return {};
  };

  TROPD_TRY(eval.begin(sweeps, s));
  if (sweeps == 1) {
    for (index_t r0 = 0; r0 < n; r0 += chunk) {
      const index_t c = std::min(chunk, n - r0);
      TROPD_TRY(chunk_logits(r0, c, true));
      TROPD_TRY(eval.statistics(r0, c, z, V, teacher_chunk(r0), ldu, s));
      TROPD_TRY(eval.chunk_stages(r0, c, s));
      TROPD_TRY(chunk_backward(r0, c));
    }
  } else {
    for (index_t r0 = 0; r0 < n; r0 += chunk) {
      const index_t c = std::min(chunk, n - r0);
      TROPD_TRY(chunk_logits(r0, c, true));
      TROPD_TRY(eval.statistics(r0, c, z, V, teacher_chunk(r0), ldu, s));
    }
    TROPD_TRY(eval.batch_stages(s));
    for (index_t r0 = 0; r0 < n; r0 += chunk) {
      const index_t c = std::min(chunk, n - r0);
      TROPD_TRY(chunk_logits(r0, c, Obj::has_dense));
      TROPD_TRY(chunk_backward(r0, c));
    }
  }
  return eval.finish(s);
}

}  // namespace tropd::gpu
