// tropd/gpu/detail/token_kernels.cuh: the kernels of the token stages on the device, the
// host's stages (host/token_stages.hpp) one kernel each, on a token batch in device memory
// (the caller's, or the one evaluate_rows builds in its scratch):
//
//   1. validate   tokens_structure_kernel (offsets, origin tags), tokens_topk_ids_kernel (a
//                 block per student token: the list's ids), tokens_values_kernel (sequence of
//                 each token; rules::check_token_values: reject reports, mask re-tags)
//   2. decide     device_prepare (the region's batch values: entropy quantile by a radix
//                 sort, sequence masks) then the region's rule, in tokens_apply_kernel
//   3. apply      tokens_apply_kernel: tropd::evaluate_token per token -> token_record
//   4. aggregate  tokens_count_kernel, tokens_normaliser_kernel, tokens_weight_kernel
//   5. diagnostics tokens_diag_kernel (per-block partials), tokens_diag_finish_kernel
//   6. outputs    tokens_range_kernel (the host's output bound), tokens_write_kernel
// Every kernel after the first reads the status word and stops (writes poison, for the
// outputs) where an earlier stage failed: as on the host, a failed stage ends the call.
// Reductions are two-level with a fixed block count for a given n (deterministic).
#pragma once

#include <stdint.h>

#include <type_traits>

#include <cub/device/device_radix_sort.cuh>

#include <tropd/core/numerics.hpp>
#include <tropd/core/token.hpp>
#include <tropd/core/token_batch.hpp>
#include <tropd/core/token_rules.hpp>
#include <tropd/core/values.hpp>
#include <tropd/gpu/config.cuh>
#include <tropd/gpu/detail/block_ops.cuh>
#include <tropd/gpu/detail/topk_block.cuh>
#include <tropd/gpu/status_word.cuh>
#include <tropd/objective.hpp>
#include <tropd/objective/stage_rules.hpp>
#include <tropd/regions/regions.hpp>

namespace tropd::gpu::detail {

using namespace ::tropd::stage_rules;  // the per-token rules the host stages share

/// The token stages' arrays in the call's scratch (device pointers).
struct token_scratch {
  uint64_t* status = nullptr;
  origin* from = nullptr;          ///< [n] origin tags after input_policy::mask
  int32_t* seq = nullptr;          ///< [n] sequence index of each token
  token_record* rec = nullptr;     ///< [n] stage 3
  double* g_topk = nullptr;        ///< [n x K] raw sparse top-k gradients (zeros where none)
  double* w = nullptr;             ///< [n] aggregation weights
  double* per_seq = nullptr;       ///< [n_seq] sequence factors (sequence modes)
  double* count_parts = nullptr;   ///< [reduce_blocks] counts
  diag_partial* diag_parts = nullptr;  ///< [reduce_blocks]
  double* normaliser = nullptr;    ///< [1]
  double* threshold = nullptr;     ///< [1] entropy_top_fraction's threshold
  uint8_t* seq_masked = nullptr;   ///< [n_seq] sequence_ratio_bound's masks (nullptr: none)
  /// [3] tokens masked by input_policy::mask, rows masked (row level), student tokens (the
  /// entropy quantile); zeroed by each call.
  unsigned long long* counters = nullptr;
  diagnostics* diag = nullptr;     ///< [1] the call's diagnostics and loss
  double* sort_in = nullptr;       ///< [n] entropies of student tokens (-inf elsewhere)
  double* sort_out = nullptr;      ///< [n] sorted descending
  unsigned char* sort_temp = nullptr;
  size_t sort_temp_bytes = 0;
  const double* dense_value = nullptr;  ///< [n] the rows' dense divergence (row level; nullptr: none)
  int reduce_blocks = 1;
};

/// Blocks of the two-level reductions over n items (fixed for a given n).
constexpr int reduce_blocks_of(index_t n) noexcept {
  const index_t b = (n + block_threads - 1) / block_threads;
  return b < 1 ? 1 : (b > 1024 ? 1024 : int(b));
}

__device__ __forceinline__ index_t thread_index() { return index_t(blockIdx.x) * block_threads + threadIdx.x; }
__device__ __forceinline__ index_t grid_stride() { return index_t(gridDim.x) * block_threads; }

// ---------------------------------------------------------------------------------------------
// 1. validate
// ---------------------------------------------------------------------------------------------

/// Offsets start at 0 and end at n, never decrease; origin tags are 0, 1 or 2
/// (validate_structure's data checks; its shape checks run on the host before the launch).
template <class = void>  // a template: a kernel defined in a header, one definition per program
__global__ void __launch_bounds__(block_threads) tokens_structure_kernel(token_batch b, uint64_t* status) {
  const index_t n = b.size(), n_seq = b.num_sequences();
  const index_t* off = b.seq_offsets.data;
  for (index_t i = thread_index(); i <= (n > n_seq ? n : n_seq); i += grid_stride()) {
    if (i == 0 && (off[0] != 0 || off[n_seq] != n))
      report(status, check_stage::offsets_ends, errc::shape_mismatch, check_site::offsets_ends, -1, -1);
    if (i >= 1 && i <= n_seq && off[i] < off[i - 1])
      report(status, check_stage::offsets_order, errc::shape_mismatch, check_site::offsets_order, i, -1);
    if (i < n && static_cast<uint8_t>(b.from[i]) > 2)
      report(status, check_stage::origin, errc::invalid_parameter, check_site::origin_tag, i, -1);
  }
}

/// A block per token: the top-k ids of a student token (rules::check_topk_id with an unknown
/// vocabulary: ids >= 0, no repeats). Dynamic shared memory: check_list_smem(K).
template <class = void>  // a template: a kernel defined in a header, one definition per program
__global__ void __launch_bounds__(block_threads) tokens_topk_ids_kernel(token_batch b, uint64_t* status) {
  extern __shared__ __align__(16) unsigned char dyn[];
  const index_t i = blockIdx.x;
  if (b.from[i] != origin::student) return;  // uniform
  const int K = static_cast<int>(b.topk_ids.cols);
  const int err = block_check_list(b.topk_ids.row(i), b.topk_teacher.row(i), K, -1, false, reinterpret_cast<uint64_t*>(dyn));
  if (err != list_error_none && threadIdx.x == 0) {
    errc code;
    check_site site;
    int entry;
    list_error_code(err, code, site, entry);
    report(status, check_stage::topk_ids, code, site, i, entry);
  }
}

/// Each token's sequence, its values' checks (reject: report; mask: re-tag as a prompt token
/// and count), the origin tags the later stages read.
template <class = void>  // a template: a kernel defined in a header, one definition per program
__global__ void __launch_bounds__(block_threads) tokens_values_kernel(token_batch b, bool topk, bool mask, token_scratch sc) {
  if (failed(sc.status)) return;
  const index_t n = b.size(), n_seq = b.num_sequences();
  int masked = 0;
  for (index_t i = thread_index(); i < n; i += grid_stride()) {
    sc.seq[i] = static_cast<int32_t>(rules::sequence_of(b.seq_offsets.data, n_seq, i));
    origin from = b.from[i];
    if (from != origin::prompt) {
      const status st = rules::check_token_values(b, i, topk);
      if (!st.ok()) {
        if (mask) {
          from = origin::prompt;
          ++masked;
        } else {
          report(sc.status, check_stage::token_values, st.code, check_site::token_values, i, st.col);
        }
      }
    }
    sc.from[i] = from;
  }
  if (mask) {
    masked = block_all_reduce(masked, sum_op{});
    if (threadIdx.x == 0 && masked) atomicAdd(&sc.counters[0], static_cast<unsigned long long>(masked));
  }
}

// ---------------------------------------------------------------------------------------------
// 2. decide: the regions' batch values
// ---------------------------------------------------------------------------------------------

/// entropy_top_fraction: the keys of the quantile (student entropies, -inf elsewhere) and the
/// count of student tokens.
template <class = void>  // a template: a kernel defined in a header, one definition per program
__global__ void __launch_bounds__(block_threads) entropy_keys_kernel(token_batch b, token_scratch sc) {
  if (failed(sc.status)) return;
  int students = 0;
  for (index_t i = thread_index(); i < b.size(); i += grid_stride()) {
    const bool s = b.from[i] == origin::student;
    sc.sort_in[i] = s ? b.student_entropy[i] : -inf<double>();
    students += s ? 1 : 0;
  }
  students = block_all_reduce(students, sum_op{});
  if (threadIdx.x == 0 && students) atomicAdd(&sc.counters[2], static_cast<unsigned long long>(students));
}

/// The threshold: the region's threshold_rank(fraction, students) of the sorted entropies.
template <class = void>  // a template: a kernel defined in a header, one definition per program
__global__ void entropy_threshold_kernel(double fraction, token_scratch sc) {
  if (threadIdx.x != 0 || failed(sc.status)) return;
  const index_t n_s = static_cast<index_t>(sc.counters[2]);
  const index_t k = regions::entropy_top_fraction::threshold_rank(fraction, n_s);
  *sc.threshold = k < 0 ? inf<double>() : sc.sort_out[k];
}

/// sequence_ratio_bound: seq_masked[j] = 1 where a student token's -R (|R|) exceeds the bound.
template <class = void>  // a template: a kernel defined in a header, one definition per program
__global__ void __launch_bounds__(block_threads) sequence_mask_kernel(regions::sequence_ratio_bound region, token_batch b,
                                                                      token_scratch sc) {
  if (failed(sc.status)) return;
  for (index_t i = thread_index(); i < b.size(); i += grid_stride()) {
    if (b.from[i] != origin::student) continue;
    const token tk = rules::make_token(b, i, sc.seq[i]);
    const double v = region.two_sided ? abs_(tk.R) : -tk.R;
    if (v > region.bound) sc.seq_masked[tk.seq_index] = 1;
  }
}

template <class R>
inline constexpr bool has_host_prepare = requires(const R& r, const regions::batch_tokens& bt, regions::batch_context& c,
                                                  regions::batch_storage& s) { r.prepare(bt, c, s); };

/// Scratch a region's device prepare needs: the sort for entropy_top_fraction, the masks for
/// sequence_ratio_bound (phase_switch: both of its regions').
template <class R>
struct prepare_needs {
  static constexpr bool sort = false, masks = false;
};
template <>
struct prepare_needs<regions::entropy_top_fraction> {
  static constexpr bool sort = true, masks = false;
};
template <>
struct prepare_needs<regions::sequence_ratio_bound> {
  static constexpr bool sort = false, masks = true;
};
template <class A, class B>
struct prepare_needs<regions::phase_switch<A, B>> {
  static constexpr bool sort = prepare_needs<A>::sort || prepare_needs<B>::sort;
  static constexpr bool masks = prepare_needs<A>::masks || prepare_needs<B>::masks;
};

/// The device twin of a region's host prepare: enqueues what computes its batch values on the
/// stream (no copy to the host). Regions without a prepare need nothing; a region with a host
/// prepare and no overload here does not compile for the device.
template <class R>
inline status device_prepare(const R&, const token_batch&, const token_scratch&, uint64_t, index_t, cudaStream_t) {
  static_assert(!has_host_prepare<R>,
                "tropd::gpu: this region computes batch values in a host prepare(); add a gpu::detail::device_prepare overload "
                "for it (tropd/gpu/detail/token_kernels.cuh) or evaluate it with tropd::host");
  return {};
}
inline status device_prepare(const regions::entropy_top_fraction& r, const token_batch& b, const token_scratch& sc, uint64_t,
                             index_t n, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(reduce_blocks_of(n));
  entropy_keys_kernel<><<<grid, block_threads, 0, stream>>>(b, sc);
  size_t bytes = sc.sort_temp_bytes;
  TROPD_GPU_TRY_CUDA(cub::DeviceRadixSort::SortKeysDescending(sc.sort_temp, bytes, sc.sort_in, sc.sort_out, static_cast<int>(n), 0,
                                                              int(sizeof(double) * 8), stream));
  entropy_threshold_kernel<><<<1, 32, 0, stream>>>(r.fraction, sc);
  return {};
}
inline status device_prepare(const regions::sequence_ratio_bound& r, const token_batch& b, const token_scratch& sc, uint64_t,
                             index_t n, cudaStream_t stream) {
  TROPD_GPU_TRY_CUDA(cudaMemsetAsync(sc.seq_masked, 0, size_t(b.num_sequences()), stream));
  sequence_mask_kernel<><<<static_cast<unsigned>(reduce_blocks_of(n)), block_threads, 0, stream>>>(r, b, sc);
  return {};
}
template <class A, class B>
inline status device_prepare(const regions::phase_switch<A, B>& r, const token_batch& b, const token_scratch& sc, uint64_t step,
                             index_t n, cudaStream_t stream) {
  if (r.in_first(step)) return device_prepare(r.first, b, sc, step, n, stream);
  return device_prepare(r.second, b, sc, step, n, stream);
}

/// The batch context the region's rule reads on the device (batch values from the scratch).
template <class R>
__device__ __forceinline__ regions::batch_context device_context_of(const token_scratch& sc, uint64_t seed, uint64_t step) {
  regions::batch_context ctx{seed, step, 0, nullptr};
  if constexpr (prepare_needs<R>::sort) ctx.threshold = *sc.threshold;
  if constexpr (prepare_needs<R>::masks) ctx.seq_masked = sc.seq_masked;
  return ctx;
}

// ---------------------------------------------------------------------------------------------
// 3. apply
// ---------------------------------------------------------------------------------------------

/// Decide and apply per token: trusted = the region's rule (student tokens), then
/// tropd::evaluate_token; the raw top-k gradient row is zero where no top-k term ran.
template <class Obj>
__global__ void __launch_bounds__(block_threads) tokens_apply_kernel(Obj obj, token_batch b, index_t K, uint64_t seed, uint64_t step,
                                                                     token_scratch sc) {
  if (failed(sc.status)) return;
  using R = typename Obj::region_type;
  const regions::batch_context ctx = device_context_of<R>(sc, seed, step);
  for (index_t i = thread_index(); i < b.size(); i += grid_stride()) {
    const token tk = rules::make_token(b, i, sc.seq[i]);
    const bool trusted = tk.from == origin::student && obj.region.trusted(tk, ctx);
    double* g = K > 0 ? sc.g_topk + i * K : nullptr;
    const token_result r = evaluate_token(obj, tk, rules::make_topk_row(b, i), trusted, g);
    if (!r.st.ok()) report(sc.status, check_stage::token_rule, r.st.code, check_site::token_rule, i, r.st.col);
    if (g && !r.topk_grad)
      for (index_t k = 0; k < K; ++k) g[k] = 0;
    sc.rec[i] = make_record(r, trusted);
  }
}

// ---------------------------------------------------------------------------------------------
// 4. aggregate
// ---------------------------------------------------------------------------------------------

/// Per block: the count the mode normalises by (token modes: tokens; sequence modes: counted
/// sequences, with each sequence's factor into per_seq).
template <class = void>  // a template: a kernel defined in a header, one definition per program
__global__ void __launch_bounds__(block_threads) tokens_count_kernel(aggregation::aggregation agg, token_batch b, token_scratch sc) {
  if (failed(sc.status)) return;
  double c = 0;
  if (sequence_mode(agg.how)) {
    const index_t n_seq = b.num_sequences();
    for (index_t j = thread_index(); j < n_seq; j += grid_stride()) {
      double cj = 0;
      for (index_t i = b.seq_offsets[j]; i < b.seq_offsets[j + 1]; ++i) cj += is_counted(sc.rec[i].flags) ? 1.0 : 0.0;
      sc.per_seq[j] = sequence_factor(agg, cj);
      c += cj > 0 ? 1.0 : 0.0;
    }
  } else {
    for (index_t i = thread_index(); i < b.size(); i += grid_stride()) c += token_count(agg, sc.rec[i].flags);
  }
  c = block_all_reduce(c, sum_op{});
  if (threadIdx.x == 0) sc.count_parts[blockIdx.x] = c;
}

/// The normaliser from the block counts (one thread, block order).
template <class = void>  // a template: a kernel defined in a header, one definition per program
__global__ void tokens_normaliser_kernel(aggregation::aggregation agg, token_scratch sc) {
  if (threadIdx.x != 0 || failed(sc.status)) return;
  double c = 0;
  for (int k = 0; k < sc.reduce_blocks; ++k) c += sc.count_parts[k];
  *sc.normaliser = normaliser_of(agg, c);
}

template <class = void>  // a template: a kernel defined in a header, one definition per program
__global__ void __launch_bounds__(block_threads) tokens_weight_kernel(aggregation::aggregation agg, token_batch b, token_scratch sc) {
  if (failed(sc.status)) return;
  const double norm = *sc.normaliser;
  const bool seq = sequence_mode(agg.how);
  for (index_t i = thread_index(); i < b.size(); i += grid_stride())
    sc.w[i] = token_weight(sc.rec[i].flags, seq ? sc.per_seq[sc.seq[i]] : 1.0, norm);
}

// ---------------------------------------------------------------------------------------------
// 5. diagnostics
// ---------------------------------------------------------------------------------------------

struct diag_merge {
  __device__ __forceinline__ diag_partial operator()(diag_partial a, const diag_partial& b) const {
    a.merge(b);
    return a;
  }
};

template <class = void>  // a template: a kernel defined in a header, one definition per program
__global__ void __launch_bounds__(block_threads) tokens_diag_kernel(token_batch b, double dense_weight, token_scratch sc) {
  if (failed(sc.status)) return;
  diag_partial p;
  for (index_t i = thread_index(); i < b.size(); i += grid_stride())
    p.add(b, i, sc.rec[i], sc.w[i], dense_weight, sc.dense_value ? sc.dense_value[i] : 0.0);
  p = block_all_reduce(p, diag_merge{});
  if (threadIdx.x == 0) sc.diag_parts[blockIdx.x] = p;
}

/// The diagnostics from the block partials (one thread, block order); dense objectives: the
/// loss must be finite in double.
template <class = void>  // a template: a kernel defined in a header, one definition per program
__global__ void tokens_diag_finish_kernel(index_t n, bool has_ent_s, bool has_ent_t, bool has_rkl, bool has_dense, token_scratch sc) {
  if (threadIdx.x != 0 || failed(sc.status)) return;
  diag_partial p;
  for (int k = 0; k < sc.reduce_blocks; ++k) p.merge(sc.diag_parts[k]);
  const index_t masked = static_cast<index_t>(sc.counters[0] + sc.counters[1]);
  *sc.diag = p.finish(n, *sc.normaliser, has_ent_s, has_ent_t, has_rkl, masked, has_dense);
  if (has_dense && !is_finite(sc.diag->loss)) report(sc.status, check_stage::loss, errc::infinite_divergence, check_site::dense_loss, -1, -1);
}

// ---------------------------------------------------------------------------------------------
// 6. outputs
// ---------------------------------------------------------------------------------------------

/// The host's output bound per token (before anything is written).
template <class = void>  // a template: a kernel defined in a header, one definition per program
__global__ void __launch_bounds__(block_threads) tokens_range_kernel(token_batch b, index_t K, double limit, token_scratch sc) {
  if (failed(sc.status)) return;
  for (index_t i = thread_index(); i < b.size(); i += grid_stride()) {
    const double* g = K > 0 ? sc.g_topk + i * K : nullptr;
    const values_row lq = K > 0 ? b.topk_teacher.row(i) : values_row{};
    const values_row ls = K > 0 ? b.topk_student.row(i) : values_row{};
    if (!output_fits(sc.rec[i], g, lq, ls, K, sc.w[i], limit))
      report(sc.status, check_stage::outputs, errc::infinite_divergence, check_site::output_range, i, -1);
  }
}

/// Writes the per-token outputs, the loss and the diagnostics (host write_token_outputs), or
/// poison where the call failed: NaN values, 0 flags, -1 ids.
template <class = void>  // a template: a kernel defined in a header, one definition per program
__global__ void __launch_bounds__(block_threads) tokens_write_kernel(token_batch b, index_t K, token_outputs out, matrix_view<int32_t> ids_out,
                                                                     const int32_t* ids_in, token_scratch sc) {
  const bool bad = failed(sc.status);
  const double nan = quiet_nan<double>();
  if (thread_index() == 0) {
    if (out.loss) *out.loss = bad ? nan : sc.diag->loss;
    if (out.diag) *out.diag = bad ? poisoned_diagnostics() : *sc.diag;
  }
  for (index_t i = thread_index(); i < b.size(); i += grid_stride()) {
    const token_record r = bad ? token_record{} : sc.rec[i];
    const double wi = bad ? nan : sc.w[i];
    if (out.dloss_ds.size) out.dloss_ds.set(i, wi * r.dloss_ds);
    if (out.advantage.size) out.advantage.set(i, bad ? nan : r.advantage);
    if (out.flags.size) out.flags[i] = bad ? uint8_t(0) : r.flags;
    if (out.dloss_dtopk.rows) {
      const double* g = sc.g_topk + i * K;
      for (index_t k = 0; k < K; ++k)
        out.dloss_dtopk.set(i, k, bad ? nan : wi * folded_topk(r, g, b.topk_teacher.row(i), b.topk_student.row(i), k));
    }
    if (ids_out.rows)
      for (index_t k = 0; k < K; ++k) ids_out(i, k) = bad ? -1 : ids_in[i * K + k];
  }
}

}  // namespace tropd::gpu::detail
