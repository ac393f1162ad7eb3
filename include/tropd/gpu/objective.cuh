// tropd/gpu/objective.cuh: evaluates a tropd::objective on the device, at token level and at
// row level: the device twins of host/objective.hpp, with the same input and output structs
// (core/token_batch.hpp, host/row_io.hpp) holding device pointers.
//
//   evaluate_tokens(ctx, obj, batch, outputs, options)
//     Per-token log-probs (and what the policies read: entropies, the per-position KL,
//     reference log-probs, top-k lists with the student's log-probs at the teacher's ids) in,
//     the aggregated loss, dL/ds, the sparse dL/d log p_S at the top-k ids, flags and
//     diagnostics out.
//
//   evaluate_rows(ctx, obj, student_logits, teacher, inputs, outputs, options)
//     Student logits [n x V] and the teacher as logits [n x V] or as sampled-token log-probs
//     (teacher_logprobs), optionally with top-k lists, in; the dense dL/dz [n x V] out. Data
//     flow (docs/gpu.md): row statistics (pass 1, one read of both rows) -> per-token arrays in
//     double in the scratch (with the teacher's top-k selected from its logits, the student's
//     log-probs at the ids, the tail bucket's exact student tail) -> the token stages (checks,
//     the region's batch values and rule, the per-token rule, aggregation weights,
//     diagnostics, output bounds) -> gradient rows (a second read of the student row, and of
//     the teacher row only for a dense term).
//
// Both are stream-ordered: the batch decisions (entropy quantile, sequence masks), the
// normaliser and the diagnostics are computed on the device; nothing is copied to the host,
// nothing is allocated, nothing synchronises unless eval_options::synchronize is set. The
// loss and the diagnostics are written to device memory (token_outputs::loss / diag).
//
// Errors: argument errors (shapes, parameters, scratch) are returned before anything is
// launched; data errors land in the status word (gpu/status_word.cuh) in the host backend's
// order, and then every output is poisoned (NaN values and diagnostics, 0 flags, -1 ids, NaN
// gradient rows), except that a gradient value found not to fit its type while it is written
// leaves the gradient rows partly written, as on the host. An ok status means every output is
// finite.
#pragma once

#if !defined(__CUDACC__)
#error "tropd/gpu is CUDA code: compile this translation unit with nvcc (host-only code includes <tropd/tropd.hpp>)"
#endif

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <type_traits>

#include <tropd/core/checks.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token_batch.hpp>
#include <tropd/core/types.hpp>
#include <tropd/core/values.hpp>
#include <tropd/core/views.hpp>
#include <tropd/gpu/config.cuh>
#include <tropd/gpu/detail/dispatch_objective.cuh>
#include <tropd/gpu/status_word.cuh>
#include <tropd/host/token_stages.hpp>
#include <tropd/objective.hpp>

namespace tropd::gpu {

/// Scratch bytes of evaluate_tokens (the same arguments as the call).
template <class Obj>
size_t evaluate_tokens_scratch_bytes(const Obj&, const token_batch& b, const token_outputs& = {}, const eval_options& = {}) {
  scratch_layout L;
  detail::layout_tokens<Obj>(L, b.size(), b.seq_offsets.size > 0 ? b.seq_offsets.size - 1 : 0, detail::applied_width(b));
  return L.bytes;
}

/// Token-level evaluation on the device (host::evaluate_tokens): loss, dL/ds, the sparse top-k
/// gradient, flags and diagnostics. Objectives with a dense full-vocabulary term (GKD) need
/// logits: errc::unsupported here. An objective with a top-k term needs lists of width K = its
/// k (outlier.fkl.k), K <= 1024.
template <class Obj>
status evaluate_tokens(const device_context& ctx, const Obj& obj, const token_batch& b, const token_outputs& out,
                       const eval_options& opt = {}) {
  if constexpr (Obj::has_dense) {
    return make_error(errc::unsupported, "objective has a full-vocabulary term: it needs logits (use evaluate_rows)");
  } else {
    TROPD_TRY(detail::check_token_shapes(obj, b));
    if constexpr (Obj::outlier_type::needs_topk) TROPD_TRY(host::detail::check_topk_width(obj, b.topk_ids.cols));
    TROPD_TRY(host::detail::check_token_outputs(out, b.size(), b.topk_ids.cols));
    const index_t n = b.size(), n_seq = b.num_sequences(), Ka = detail::applied_width(b);
    scratch_layout L;
    const detail::token_layout tl = detail::layout_tokens<Obj>(L, n, n_seq, Ka);
    TROPD_TRY(detail::check_context(ctx, L.bytes));
    unsigned char* base = static_cast<unsigned char*>(ctx.scratch);
    const detail::token_scratch sc = tl.at(base, reinterpret_cast<uint64_t*>(base));
    TROPD_TRY(detail::clear_status(ctx.scratch, ctx.stream));
    TROPD_GPU_TRY_CUDA(cudaMemsetAsync(sc.counters, 0, 3 * sizeof(unsigned long long), ctx.stream));
    detail::stage_inputs in;
    in.seed = opt.seed;
    in.step = opt.step;
    in.mask = opt.bad_input == input_policy::mask;
    in.limit = host::detail::output_limit(out);
    token_batch b_eff;
    TROPD_TRY(detail::launch_token_stages(obj, b, sc, in, ctx.stream, b_eff));
    detail::tokens_write_kernel<><<<static_cast<unsigned>(sc.reduce_blocks), block_threads, 0, ctx.stream>>>(b_eff, Ka, out, {}, nullptr, sc);
    return detail::finish_call(ctx.scratch, ctx.stream, opt.synchronize);
  }
}

namespace detail {

template <class Teacher>
inline constexpr bool teacher_has_logits = !std::is_same_v<Teacher, teacher_logprobs>;
template <class Teacher>
struct teacher_element {
  using type = float;
};
template <class T>
struct teacher_element<matrix_view<const T>> {
  using type = T;
};

/// The moments pass 1 computes for an objective (host evaluate_rows' need_min / need_diag).
template <class Obj, bool Logits, bool Diag>
constexpr estimators::moments_needed objective_moments() {
  using R = typename Obj::region_type;
  constexpr estimators::moments_needed dense_reads = [] {
    if constexpr (Obj::has_dense) return estimators::summary_reads_of<typename Obj::dense_type>();
    else return estimators::lse_only;
  }();
  constexpr estimators::moments_needed need_min =
      estimators::moments_needed{R::needs_student_entropy, R::needs_teacher_entropy, Obj::trust_type::needs_rkl, false} | dense_reads;
  if constexpr (Diag)
    return need_min | estimators::moments_needed{true, Logits, Logits, false};
  else
    return need_min;
}

/// The row level's plan: blocks per row and the scratch layout (row arrays, then the token
/// stages'). Shared by evaluate_rows_scratch_bytes and evaluate_rows.
struct objective_layout {
  int S = 1;
  index_t K = 0;
  bool exact_tail = false, selected = false;
  size_t s = 0, t = 0, ent_s = 0, ent_t = 0, rkl = 0, dense_value = 0, sums = 0, from = 0, ok = 0;
  size_t topk_ids = 0, topk_teacher = 0, topk_student = 0, tail = 0, parts = 0, sums2 = 0;
  token_layout tokens;
  size_t bytes = 0;

  row_arrays at(unsigned char* base) const {
    row_arrays ra;
    ra.s = reinterpret_cast<double*>(base + s);
    ra.t = reinterpret_cast<double*>(base + t);
    ra.ent_s = reinterpret_cast<double*>(base + ent_s);
    ra.ent_t = reinterpret_cast<double*>(base + ent_t);
    ra.rkl = reinterpret_cast<double*>(base + rkl);
    ra.dense_value = reinterpret_cast<double*>(base + dense_value);
    ra.sums = reinterpret_cast<estimators::row_summary*>(base + sums);
    ra.from = reinterpret_cast<origin*>(base + from);
    ra.ok = reinterpret_cast<uint8_t*>(base + ok);
    ra.topk_ids = reinterpret_cast<int32_t*>(base + topk_ids);
    ra.topk_teacher = reinterpret_cast<double*>(base + topk_teacher);
    ra.topk_student = reinterpret_cast<double*>(base + topk_student);
    ra.tail = exact_tail ? reinterpret_cast<double*>(base + tail) : nullptr;
    ra.parts = reinterpret_cast<pass1_partial*>(base + parts);
    ra.sums2 = reinterpret_cast<sum2*>(base + sums2);
    return ra;
  }
};

/// The row-level checks the host makes before any work, in its order (less what reads data:
/// token ids and the given lists' values, checked on the device); sets K.
template <class Obj, class TS, class Teacher, class G>
status check_rows_objective(const Obj& obj, matrix_view<const TS> student, const Teacher& teacher, const row_inputs& in,
                            const row_outputs<G>& out, index_t& K) {
  constexpr bool logits = teacher_has_logits<Teacher>;
  using R = typename Obj::region_type;
  TROPD_TRY(obj.check());
  TROPD_TRY(checks::objective_rows(student, out.grad, in.student_temperature, in.teacher_temperature));
  const index_t n = student.rows, V = student.cols;
  if constexpr (logits) {
    TROPD_TRY(checks::teacher_rows(teacher, n, V));
  } else {
    if (teacher.t.size != n) return make_error(errc::shape_mismatch, "teacher log-probs t must have one entry per row");
    if constexpr (Obj::has_dense || R::needs_teacher_entropy || Obj::trust_type::needs_rkl)
      return make_error(errc::unsupported, "this objective reads the teacher's full distribution (entropy, KL or a dense term): pass teacher logits");
  }
  if (in.ids.size != n || in.ids.data == nullptr) return make_error(errc::shape_mismatch, "ids must have one entry per row");
  if (in.from.size != n) return make_error(errc::shape_mismatch, "origin must have one entry per row");
  const bool lists = in.teacher_topk.ids.rows != 0;
  K = 0;
  if constexpr (Obj::outlier_type::needs_topk) {
    if (lists) {
      TROPD_TRY(checks::topk_lists_shape(in.teacher_topk.ids, in.teacher_topk.logprobs, n));
      TROPD_TRY(host::detail::check_topk_width(obj, in.teacher_topk.ids.cols));
      K = in.teacher_topk.ids.cols;
    } else if constexpr (logits) {
      K = std::min<index_t>(obj.outlier.fkl.k, V);  // k > V: the whole vocabulary
    } else {
      return make_error(errc::unsupported, "this objective's outlier term needs teacher top-k lists (row_inputs::teacher_topk) or teacher logits");
    }
    if (in.topk_student_old.rows != 0 && (in.topk_student_old.rows != n || in.topk_student_old.cols != K || !in.topk_student_old.valid()))
      return make_error(errc::shape_mismatch, "topk_student_old must be empty or [n x K]");
  }
  if (out.topk_ids.rows != 0 && (out.topk_ids.rows != n || out.topk_ids.cols != K || !out.topk_ids.valid()))
    return make_error(errc::shape_mismatch, "topk_ids must be empty or [n x K] like the top-k lists");
  const token_outputs tout{out.loss, out.diag, out.dloss_ds, out.advantage, out.dloss_dtopk, out.flags};
  TROPD_TRY(host::detail::check_token_outputs(tout, n, K));
  if (n > max_rows || V > max_cols) return make_error(errc::unsupported, "tropd::gpu: at most 2^28 - 2 rows and a vocabulary below 2^21 - 1 per call");
  if (K > max_topk) return make_error(errc::unsupported, "tropd::gpu: top-k lists longer than max_topk (1024)");
  if (in.seq_offsets.size < 2 || in.seq_offsets.data == nullptr) return make_error(errc::shape_mismatch, "seq_offsets needs n_seq + 1 >= 2 entries");
  return {};
}

template <class Obj, bool Logits, class TS, class TT>
inline objective_layout plan_objective(const Obj& obj, index_t n, index_t V, index_t n_seq, index_t K, bool lists, bool diag,
                                       const launch_options& lo) {
  constexpr bool need_topk = Obj::outlier_type::needs_topk;
  constexpr bool second = [] {
    if constexpr (Obj::has_dense) return Obj::dense_type::second_pass && Logits;
    else return false;
  }();
  objective_layout p;
  p.K = K;
  if constexpr (need_topk) {
    p.exact_tail = obj.outlier.fkl.tail == estimators::topk_tail::tail_bucket;
    p.selected = !lists;
  }
  if (diag)
    p.S = blocks_per_row_of(lo, n, V, objective_rows_kernel<Obj, moments_tag<objective_moments<Obj, Logits, true>()>, Logits, TS, TT>, 0);
  else
    p.S = blocks_per_row_of(lo, n, V, objective_rows_kernel<Obj, moments_tag<objective_moments<Obj, Logits, false>()>, Logits, TS, TT>, 0);
  scratch_layout L;
  p.s = L.take<double>(n);
  p.t = L.take<double>(n);
  p.ent_s = L.take<double>(n);
  p.ent_t = L.take<double>(n);
  p.rkl = L.take<double>(n);
  p.dense_value = L.take<double>(Obj::has_dense ? n : 0);
  p.sums = L.take<estimators::row_summary>(n);
  p.from = L.take<origin>(n);
  p.ok = L.take<uint8_t>(n);
  p.topk_ids = L.take<int32_t>(n * K);
  p.topk_teacher = L.take<double>(n * K);
  p.topk_student = L.take<double>(n * K);
  p.tail = L.take<double>(p.exact_tail ? n : 0);
  if (p.S > 1) {
    p.parts = L.take<pass1_partial>(n * p.S);
    if (second) p.sums2 = L.take<sum2>(n * p.S);
  }
  p.tokens = layout_tokens<Obj>(L, n, n_seq, need_topk ? K : 0);
  p.bytes = L.bytes;
  return p;
}

template <class Obj, class TS, class Teacher, class G>
status evaluate_rows_impl(const device_context& ctx, const Obj& obj, matrix_view<const TS> student, const Teacher& teacher,
                          const row_inputs& in, const row_outputs<G>& out, const eval_options& opt, size_t* bytes_only) {
  constexpr bool logits = teacher_has_logits<Teacher>;
  using TT = typename teacher_element<Teacher>::type;
  constexpr bool need_topk = Obj::outlier_type::needs_topk;
  index_t K = 0;
  TROPD_TRY(check_rows_objective(obj, student, teacher, in, out, K));
  const index_t n = student.rows, V = student.cols, n_seq = in.seq_offsets.size - 1;
  const bool lists = in.teacher_topk.ids.rows != 0;
  const bool want_diag = out.diag != nullptr;
  const objective_layout p = plan_objective<Obj, logits, TS, TT>(obj, n, V, n_seq, K, lists, want_diag, opt.launch);
  if (bytes_only) {
    *bytes_only = p.bytes;
    return {};
  }
  TROPD_TRY(check_context(ctx, p.bytes));
  if (n * index_t(p.S) > 0x7fffffffll) return make_error(errc::unsupported, "tropd::gpu: rows * blocks_per_row exceeds the grid limit");
  unsigned char* base = static_cast<unsigned char*>(ctx.scratch);
  uint64_t* status_ptr = reinterpret_cast<uint64_t*>(base);
  const row_arrays ra = p.at(base);
  token_scratch sc = p.tokens.at(base, status_ptr);
  sc.dense_value = Obj::has_dense ? ra.dense_value : nullptr;
  TROPD_TRY(clear_status(ctx.scratch, ctx.stream));
  TROPD_GPU_TRY_CUDA(cudaMemsetAsync(sc.counters, 0, 3 * sizeof(unsigned long long), ctx.stream));

  objective_args<TS, TT> a;
  a.zs = student.data;
  a.zs_stride = student.stride;
  if constexpr (logits) {
    a.zt = teacher.data;
    a.zt_stride = teacher.stride;
  } else {
    a.t_given = teacher.t;
  }
  a.n = n;
  a.V = V;
  a.K = K;
  a.its = 1.0 / in.student_temperature;
  a.itt = 1.0 / in.teacher_temperature;
  a.ts = in.student_temperature;
  a.ids = in.ids.data;
  a.from = in.from.data;
  a.mask = opt.bad_input == input_policy::mask;
  a.status = status_ptr;
  a.counters = sc.counters;
  const unsigned rows = static_cast<unsigned>(n), blocks = static_cast<unsigned>(n * p.S);

  // Row statistics.
  auto rows_stage = [&](auto diag_tag) -> status {
    constexpr estimators::moments_needed M = objective_moments<Obj, logits, decltype(diag_tag)::value>();
    if (p.S > 1) objective_pass1_kernel<moments_tag<M>, logits, TS, TT><<<blocks, block_threads, 0, ctx.stream>>>(a, ra, p.S);
    objective_rows_kernel<Obj, moments_tag<M>, logits, TS, TT><<<rows, block_threads, 0, ctx.stream>>>(obj, a, ra, p.S);
    TROPD_GPU_TRY_CUDA(cudaGetLastError());
    return {};
  };
  if (want_diag) TROPD_TRY(rows_stage(std::true_type{}));
  else TROPD_TRY(rows_stage(std::false_type{}));
  if constexpr (Obj::has_dense && logits) {
    if constexpr (Obj::dense_type::second_pass) {
      if (p.S > 1) {
        objective_second_kernel<Obj, TS, TT><<<blocks, block_threads, 0, ctx.stream>>>(obj, a, ra, p.S);
        objective_second_finish_kernel<Obj, TS, TT><<<(rows + block_threads - 1) / block_threads, block_threads, 0, ctx.stream>>>(obj, a, ra, p.S);
        TROPD_GPU_TRY_CUDA(cudaGetLastError());
      }
    }
  }
  // The top-k lists of the student rows.
  if constexpr (need_topk) {
    using W = work_type_t<TS, TT>;
    const size_t smem = objective_topk_smem<W>(int(K), p.selected, p.exact_tail);
    auto launch_topk = [&](auto kernel) -> status {
      if (smem > 48 * 1024) TROPD_GPU_TRY_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kernel<<<rows, block_threads, smem, ctx.stream>>>(obj, a, ra, in.teacher_topk);
      TROPD_GPU_TRY_CUDA(cudaGetLastError());
      return {};
    };
    if constexpr (logits) {
      if (p.selected) TROPD_TRY(launch_topk(objective_topk_kernel<Obj, logits, true, TS, TT>));
      else TROPD_TRY(launch_topk(objective_topk_kernel<Obj, logits, false, TS, TT>));
    } else {
      TROPD_TRY(launch_topk(objective_topk_kernel<Obj, logits, false, TS, TT>));
    }
  }
  // The token batch of the rows, then the token stages.
  constexpr estimators::moments_needed need_min = objective_moments<Obj, logits, false>();
  constexpr estimators::moments_needed need_diag = objective_moments<Obj, logits, true>();
  const estimators::moments_needed need = want_diag ? need_diag : need_min;
  token_batch b;
  b.s = values_view(ra.s, n);
  b.s_old = in.s_old;
  b.t = values_view(ra.t, n);
  b.from = {ra.from, n};
  b.seq_offsets = in.seq_offsets;
  b.seq_ids = in.seq_ids;
  if (need.ent_s) b.student_entropy = values_view(ra.ent_s, n);
  if (logits && need.ent_t) b.teacher_entropy = values_view(ra.ent_t, n);
  if (logits && need.rkl) b.rkl = values_view(ra.rkl, n);
  b.ref = in.ref;
  if constexpr (need_topk) {
    b.topk_ids = make_matrix<const int32_t>(ra.topk_ids, n, K);
    b.topk_teacher = values_matrix(static_cast<const double*>(ra.topk_teacher), n, K, K);
    b.topk_student = values_matrix(static_cast<const double*>(ra.topk_student), n, K, K);
    b.topk_student_old = in.topk_student_old;
    if (p.exact_tail) b.topk_student_tail_log = values_view(static_cast<const double*>(ra.tail), n);
  }
  const token_outputs tout{out.loss, out.diag, out.dloss_ds, out.advantage, out.dloss_dtopk, out.flags};
  stage_inputs si;
  si.seed = opt.seed;
  si.step = opt.step;
  si.mask = opt.bad_input == input_policy::mask;
  si.check_topk_ids = false;  // the row level's lists are valid by construction (checked, or selected)
  if constexpr (Obj::has_dense) {
    si.has_dense = true;
    si.dense_weight = obj.dense_weight;
  }
  si.limit = out.grad.rows ? std::min(host::detail::output_limit(tout), double(max_finite(scalar_type_of<G>()))) : host::detail::output_limit(tout);
  token_batch b_eff;
  TROPD_TRY(launch_token_stages(obj, b, sc, si, ctx.stream, b_eff));
  // Gradient rows, then the per-token outputs (or poison).
  if (out.grad.rows) {
    const size_t smem = size_t(K + 1) * 12 + 16;
    double dw = 0;
    if constexpr (Obj::has_dense) dw = obj.dense_weight;
    objective_grad_kernel<Obj, logits, TS, TT, G><<<blocks, block_threads, smem, ctx.stream>>>(obj, a, ra, sc, dw, out.grad, p.S);
    TROPD_GPU_TRY_CUDA(cudaGetLastError());
  }
  tokens_write_kernel<><<<static_cast<unsigned>(sc.reduce_blocks), block_threads, 0, ctx.stream>>>(b_eff, need_topk ? K : 0, tout, out.topk_ids,
                                                                                                  ra.topk_ids, sc);
  return finish_call(ctx.scratch, ctx.stream, opt.synchronize);
}

}  // namespace detail

/// Scratch bytes of evaluate_rows with teacher logits (the same arguments as the call; 0 when
/// the arguments are rejected).
template <class Obj, logit_element TS, logit_element TT, grad_element G = float>
size_t evaluate_rows_scratch_bytes(const Obj& obj, matrix_view<const TS> student, matrix_view<const TT> teacher, const row_inputs& in,
                                   const row_outputs<G>& out, const eval_options& opt = {}) {
  size_t bytes = 0;
  (void)detail::evaluate_rows_impl(device_context{}, obj, student, teacher, in, out, opt, &bytes);
  return bytes;
}

/// Row-level evaluation on the device with teacher logits [n x V] (host::evaluate_rows): the
/// teacher's top-k ids are selected from its rows where the outlier handler needs them
/// (K = min(k, V) <= 1024), unless row_inputs::teacher_topk gives them (then the logits still
/// give t, H_T and the KL).
template <class Obj, logit_element TS, logit_element TT, grad_element G = float>
status evaluate_rows(const device_context& ctx, const Obj& obj, matrix_view<const TS> student, matrix_view<const TT> teacher,
                     const row_inputs& in, const row_outputs<G>& out, const eval_options& opt = {}) {
  return detail::evaluate_rows_impl(ctx, obj, student, teacher, in, out, opt, nullptr);
}

/// Scratch bytes of evaluate_rows with a served teacher.
template <class Obj, logit_element TS, grad_element G = float>
size_t evaluate_rows_scratch_bytes(const Obj& obj, matrix_view<const TS> student, const teacher_logprobs& teacher, const row_inputs& in,
                                   const row_outputs<G>& out, const eval_options& opt = {}) {
  size_t bytes = 0;
  (void)detail::evaluate_rows_impl(device_context{}, obj, student, teacher, in, out, opt, &bytes);
  return bytes;
}

/// Row-level evaluation on the device with the teacher given as log-probs of the rows' tokens
/// (and, for a top-k outlier term, its top-k lists in row_inputs::teacher_topk): a served teacher.
template <class Obj, logit_element TS, grad_element G = float>
status evaluate_rows(const device_context& ctx, const Obj& obj, matrix_view<const TS> student, const teacher_logprobs& teacher,
                     const row_inputs& in, const row_outputs<G>& out, const eval_options& opt = {}) {
  return detail::evaluate_rows_impl(ctx, obj, student, teacher, in, out, opt, nullptr);
}

}  // namespace tropd::gpu
