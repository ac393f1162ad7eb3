// tropd/gpu/detail/dispatch_rows.cuh: chooses the path of a row function's call (one block
// per row or S blocks per row, from the row kernel's measured occupancy), lays out its
// scratch, and launches its kernels on the call's stream.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <tropd/core/checks.hpp>
#include <tropd/gpu/config.cuh>
#include <tropd/gpu/detail/row_kernels.cuh>
#include <tropd/gpu/plan.hpp>
#include <tropd/gpu/status_word.cuh>

namespace tropd::gpu::detail {

/// The multiprocessor count the plan uses (the option, else the current device's).
inline int sm_count_of(const launch_options& lo) noexcept {
  if (lo.sm_count > 0) return lo.sm_count;
  int dev = 0, sm = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sm < 1) {
    cudaGetLastError();  // no device to ask: plan for an H100 (the launch itself reports the error)
    return 132;
  }
  return sm;
}

/// Lets `kernel` use `smem` bytes of dynamic shared memory (above the default 48 KB), then
/// returns how many of its blocks fit on one multiprocessor (at least 1).
template <class Kernel>
inline int resident_blocks(Kernel kernel, size_t smem) noexcept {
  if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, block_threads, smem) != cudaSuccess || n < 1) {
    cudaGetLastError();
    n = 1;
  }
  return n;
}

/// Blocks per row for a call: the option, else choose_blocks_per_row from the resident
/// capacity of the one-block-per-row kernel.
template <class Kernel>
inline int blocks_per_row_of(const launch_options& lo, index_t rows, index_t V, Kernel kernel, size_t smem) noexcept {
  if (lo.blocks_per_row > 0) return lo.blocks_per_row > 1024 ? 1024 : lo.blocks_per_row;
  return choose_blocks_per_row(rows, V, sm_count_of(lo), resident_blocks(kernel, smem));
}

/// A row function's launch plan and scratch layout.
struct rows_plan {
  int S = 1;
  size_t smem = 0;         ///< dynamic shared memory of the one-block-per-row kernel
  size_t finish_smem = 0;  ///< ... of the split path's finish kernel
  size_t parts = 0, states = 0, sums = 0, sp_ids = 0, sp_coef = 0;
  size_t bytes = 0;
};

template <class Task, class TS, class TT, class G>
inline rows_plan plan_rows(const Task& t, index_t rows, index_t V, const launch_options& lo) {
  rows_plan p;
  const index_t M = t.max_sparse();
  p.finish_smem = t.work_bytes();
  p.smem = (size_t(M) * 12 + 15) / 16 * 16 + p.finish_smem;
  p.S = blocks_per_row_of(lo, rows, V, rows_row_per_block_kernel<Task, TS, TT, G>, p.smem);
  scratch_layout L;
  if (p.S > 1) {
    p.parts = L.take<pass1_partial>(rows * p.S);
    p.states = L.take<row_state>(rows);
    if (Task::second) p.sums = L.take<sum2>(rows * p.S);
    p.sp_ids = L.take<int32_t>(rows * M);
    p.sp_coef = L.take<double>(rows * M);
  }
  p.bytes = L.bytes;
  return p;
}

/// Launches a row function: clears the status word, runs the path the plan chose.
template <class Task, class TS, class TT, class G>
inline status launch_rows(const device_context& ctx, const Task& t, row_args<TS, TT, G> a, const launch_options& lo, bool sync) {
  const rows_plan p = plan_rows<Task, TS, TT, G>(t, a.rows, a.V, lo);
  TROPD_TRY(check_context(ctx, p.bytes));
  if (a.rows * index_t(p.S) > 0x7fffffffll) return make_error(errc::unsupported, "tropd::gpu: rows * blocks_per_row exceeds the grid limit");
  unsigned char* base = static_cast<unsigned char*>(ctx.scratch);
  a.status = reinterpret_cast<uint64_t*>(base);
  TROPD_TRY(clear_status(ctx.scratch, ctx.stream));
  const unsigned rows = static_cast<unsigned>(a.rows);
  if (p.S == 1) {
    auto k = rows_row_per_block_kernel<Task, TS, TT, G>;
    if (p.smem > 48 * 1024) TROPD_GPU_TRY_CUDA(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(p.smem)));
    k<<<rows, block_threads, p.smem, ctx.stream>>>(t, a);
    return finish_call(ctx.scratch, ctx.stream, sync);
  }
  const int S = p.S;
  auto* parts = reinterpret_cast<pass1_partial*>(base + p.parts);
  auto* states = reinterpret_cast<row_state*>(base + p.states);
  auto* sums = reinterpret_cast<sum2*>(base + p.sums);
  auto* sp_ids = reinterpret_cast<int32_t*>(base + p.sp_ids);
  auto* sp_coef = reinterpret_cast<double*>(base + p.sp_coef);
  const unsigned blocks = static_cast<unsigned>(a.rows * S);
  rows_pass1_kernel<Task, TS, TT, G><<<blocks, block_threads, 0, ctx.stream>>>(t, a, S, parts);
  TROPD_GPU_TRY_CUDA(cudaGetLastError());
  auto fk = rows_finish_kernel<Task, TS, TT, G>;
  if (p.finish_smem > 48 * 1024) TROPD_GPU_TRY_CUDA(cudaFuncSetAttribute(fk, cudaFuncAttributeMaxDynamicSharedMemorySize, int(p.finish_smem)));
  fk<<<rows, block_threads, p.finish_smem, ctx.stream>>>(t, a, S, parts, states, sp_ids, sp_coef);
  TROPD_GPU_TRY_CUDA(cudaGetLastError());
  if constexpr (Task::second) {
    rows_second_kernel<Task, TS, TT, G><<<blocks, block_threads, 0, ctx.stream>>>(t, a, S, states, sums);
    TROPD_GPU_TRY_CUDA(cudaGetLastError());
    rows_second_finish_kernel<Task, TS, TT, G><<<(rows + block_threads - 1) / block_threads, block_threads, 0, ctx.stream>>>(
        t, a, S, states, sums, sp_ids, sp_coef);
    TROPD_GPU_TRY_CUDA(cudaGetLastError());
  }
  if (a.grad) {
    rows_grad_kernel<Task, TS, TT, G><<<blocks, block_threads, 0, ctx.stream>>>(t, a, S, states, sp_ids, sp_coef);
    TROPD_GPU_TRY_CUDA(cudaGetLastError());
  }
  return finish_call(ctx.scratch, ctx.stream, sync);
}

/// The arguments of a row function's kernels from its views and options.
template <class TS, class TT, class G>
inline row_args<TS, TT, G> make_row_args(matrix_view<const TS> student, const TT* zt, index_t zt_stride, vector_view<double> loss,
                                         matrix_view<G> grad, const row_options& opt, vector_view<const double> grad_scale,
                                         estimators::row_summary* summaries) noexcept {
  row_args<TS, TT, G> a;
  a.zs = student.data;
  a.zs_stride = student.stride;
  a.zt = zt;
  a.zt_stride = zt_stride;
  a.rows = student.rows;
  a.V = student.cols;
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

/// The host's shape rules (core/checks.hpp), then this backend's limits.
template <class TS, class G>
inline status check_row_shapes(const row_options& opt, matrix_view<const TS> student, vector_view<double> loss, matrix_view<G> grad,
                               vector_view<const double> grad_scale) noexcept {
  TROPD_TRY(checks::temperatures(opt.student_temperature, opt.teacher_temperature));
  TROPD_TRY(checks::student_rows(student, loss, grad, grad_scale));
  if (student.rows > max_rows || student.cols > max_cols)
    return make_error(errc::unsupported, "tropd::gpu: at most 2^28 - 2 rows and a vocabulary below 2^21 - 1 per call");
  return {};
}

}  // namespace tropd::gpu::detail
