// tropd/gpu/detail/dispatch_objective.cuh: the host side of the objective entry points
// (gpu/objective.cuh): the shape checks a call can make before launching (the host backend's
// rules, in its order, less the ones that read data), the scratch layouts, and the launch
// sequences of the token stages and of the row-level objective.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <type_traits>

#include <cub/device/device_radix_sort.cuh>

#include <tropd/core/checks.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token_batch.hpp>
#include <tropd/core/values.hpp>
#include <tropd/gpu/config.cuh>
#include <tropd/gpu/detail/dispatch_rows.cuh>
#include <tropd/gpu/detail/objective_kernels.cuh>
#include <tropd/gpu/detail/token_kernels.cuh>
#include <tropd/gpu/plan.hpp>
#include <tropd/gpu/status_word.cuh>
#include <tropd/host/token_stages.hpp>
#include <tropd/objective.hpp>

namespace tropd::gpu::detail {

/// host::detail::validate_structure's checks that read only sizes, in its order (the ones that
/// read data run on the device: tokens_structure_kernel, tokens_topk_ids_kernel).
template <class Obj>
status check_token_shapes(const Obj& obj, const token_batch& b) {
  TROPD_TRY(checks::token_batch_shapes(obj, b));
  const index_t n = b.s.size, n_seq = b.seq_offsets.size - 1;
  if (n > max_rows || n_seq > max_rows) return make_error(errc::unsupported, "tropd::gpu: at most 2^28 - 2 tokens and sequences per call");
  if (b.topk_ids.cols > max_topk) return make_error(errc::unsupported, "tropd::gpu: top-k lists longer than max_topk (1024)");
  return {};
}

/// The token stages' part of a call's scratch.
struct token_layout {
  size_t from = 0, seq = 0, rec = 0, g_topk = 0, w = 0, per_seq = 0, count_parts = 0, diag_parts = 0;
  size_t normaliser = 0, threshold = 0, counters = 0, diag = 0, seq_masked = 0, sort_in = 0, sort_out = 0, sort_temp = 0;
  size_t sort_temp_bytes = 0;
  int reduce_blocks = 1;
  bool sort = false, masks = false;

  token_scratch at(unsigned char* base, uint64_t* status) const {
    token_scratch sc;
    sc.status = status;
    sc.from = reinterpret_cast<origin*>(base + from);
    sc.seq = reinterpret_cast<int32_t*>(base + seq);
    sc.rec = reinterpret_cast<token_record*>(base + rec);
    sc.g_topk = reinterpret_cast<double*>(base + g_topk);
    sc.w = reinterpret_cast<double*>(base + w);
    sc.per_seq = reinterpret_cast<double*>(base + per_seq);
    sc.count_parts = reinterpret_cast<double*>(base + count_parts);
    sc.diag_parts = reinterpret_cast<diag_partial*>(base + diag_parts);
    sc.normaliser = reinterpret_cast<double*>(base + normaliser);
    sc.threshold = reinterpret_cast<double*>(base + threshold);
    sc.counters = reinterpret_cast<unsigned long long*>(base + counters);
    sc.diag = reinterpret_cast<diagnostics*>(base + diag);
    sc.seq_masked = masks ? reinterpret_cast<uint8_t*>(base + seq_masked) : nullptr;
    sc.sort_in = sort ? reinterpret_cast<double*>(base + sort_in) : nullptr;
    sc.sort_out = sort ? reinterpret_cast<double*>(base + sort_out) : nullptr;
    sc.sort_temp = sort ? base + sort_temp : nullptr;
    sc.sort_temp_bytes = sort_temp_bytes;
    sc.reduce_blocks = reduce_blocks;
    return sc;
  }
};

template <class Obj>
inline token_layout layout_tokens(scratch_layout& L, index_t n, index_t n_seq, index_t K) {
  using R = typename Obj::region_type;
  token_layout o;
  o.from = L.take<origin>(n);
  o.seq = L.take<int32_t>(n);
  o.rec = L.take<token_record>(n);
  o.g_topk = L.take<double>(n * K);
  o.w = L.take<double>(n);
  o.per_seq = L.take<double>(n_seq);
  o.reduce_blocks = reduce_blocks_of(n > n_seq ? n : n_seq);
  o.count_parts = L.take<double>(o.reduce_blocks);
  o.diag_parts = L.take<diag_partial>(o.reduce_blocks);
  o.normaliser = L.take<double>(1);
  o.threshold = L.take<double>(1);
  o.counters = L.take<unsigned long long>(3);
  o.diag = L.take<diagnostics>(1);
  o.masks = prepare_needs<R>::masks;
  o.sort = prepare_needs<R>::sort;
  if (o.masks) o.seq_masked = L.take<uint8_t>(n_seq);
  if (o.sort) {
    o.sort_in = L.take<double>(n);
    o.sort_out = L.take<double>(n);
    size_t bytes = 0;
    if (cub::DeviceRadixSort::SortKeysDescending(nullptr, bytes, static_cast<const double*>(nullptr), static_cast<double*>(nullptr),
                                                 static_cast<int>(n)) != cudaSuccess) {
      cudaGetLastError();
      bytes = size_t(n) * 16 + (1 << 20);  // never reached in practice; generous
    }
    o.sort_temp_bytes = bytes;
    o.sort_temp = L.take_bytes(bytes);
  }
  return o;
}

/// What the token stages need besides the batch.
struct stage_inputs {
  uint64_t seed = 0, step = 0;
  bool mask = false;
  bool check_topk_ids = true;  ///< validate the lists' ids (token level; rows build valid lists)
  double dense_weight = 0;
  bool has_dense = false;
  double limit = 0;            ///< the output bound (host detail::output_limit, and G's range)
};

/// The width of the lists the per-token rule sees (host apply's K: the batch's lists whenever
/// they are given, whatever the objective).
inline index_t applied_width(const token_batch& b) noexcept { return b.topk_teacher.rows == b.size() ? b.topk_teacher.cols : 0; }

/// Launches stages 1-5 of the token stages on batch b (device views) with the token scratch
/// sc; b_eff (returned) is b with the tags after masking.
template <class Obj>
inline status launch_token_stages(const Obj& obj, const token_batch& b, const token_scratch& sc, const stage_inputs& in,
                                  cudaStream_t stream, token_batch& b_eff) {
  const index_t n = b.size(), K = b.topk_ids.cols;
  const index_t Ka = b.topk_teacher.rows == n ? b.topk_teacher.cols : 0;  // the lists the per-token rule sees (host apply's K)
  const unsigned grid = static_cast<unsigned>(sc.reduce_blocks);
  const index_t work = n > b.num_sequences() + 1 ? n : b.num_sequences() + 1;
  tokens_structure_kernel<><<<static_cast<unsigned>(reduce_blocks_of(work)), block_threads, 0, stream>>>(b, sc.status);
  TROPD_GPU_TRY_CUDA(cudaGetLastError());
  constexpr bool topk = Obj::outlier_type::needs_topk;
  if (topk && in.check_topk_ids && K > 0) {
    tokens_topk_ids_kernel<><<<static_cast<unsigned>(n), block_threads, check_list_smem(int(K)), stream>>>(b, sc.status);
    TROPD_GPU_TRY_CUDA(cudaGetLastError());
  }
  tokens_values_kernel<><<<grid, block_threads, 0, stream>>>(b, topk, in.mask, sc);
  TROPD_GPU_TRY_CUDA(cudaGetLastError());
  b_eff = b;
  b_eff.from = {sc.from, n};
  TROPD_TRY(device_prepare(obj.region, b_eff, sc, in.step, n, stream));
  TROPD_GPU_TRY_CUDA(cudaGetLastError());
  tokens_apply_kernel<Obj><<<grid, block_threads, 0, stream>>>(obj, b_eff, Ka, in.seed, in.step, sc);
  TROPD_GPU_TRY_CUDA(cudaGetLastError());
  tokens_count_kernel<><<<grid, block_threads, 0, stream>>>(obj.agg, b_eff, sc);
  tokens_normaliser_kernel<><<<1, 32, 0, stream>>>(obj.agg, sc);
  tokens_weight_kernel<><<<grid, block_threads, 0, stream>>>(obj.agg, b_eff, sc);
  tokens_diag_kernel<><<<grid, block_threads, 0, stream>>>(b_eff, in.has_dense ? in.dense_weight : 0.0, sc);
  tokens_diag_finish_kernel<><<<1, 32, 0, stream>>>(n, b_eff.student_entropy.size != 0, b_eff.teacher_entropy.size != 0, b_eff.rkl.size != 0,
                                                 in.has_dense, sc);
  tokens_range_kernel<><<<grid, block_threads, 0, stream>>>(b_eff, Ka, in.limit, sc);
  TROPD_GPU_TRY_CUDA(cudaGetLastError());
  return {};
}

}  // namespace tropd::gpu::detail
