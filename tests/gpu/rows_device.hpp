// Host entry points of the CUDA test harness for tropd/gpu/rows.cuh (tests/gpu/rows_device.cu,
// tests/gpu/sampled_device.cu, tests/gpu/tokens_device.cu). Plain host functions on host
// vectors: each copies its inputs to the device, fills every device output with NaN bytes
// (0xff) first (so an element the kernels never write fails the comparison), runs the
// tropd::gpu entry point on a fresh stream, reads the status word, and copies the outputs back.
// The host doctest files (test_rows.cpp) compare the results with the tropd::host backend.
#pragma once

#include <stdint.h>

#include <string>
#include <vector>

#include <tropd/core/status.hpp>
#include <tropd/core/tokens.hpp>
#include <tropd/core/types.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/sampled.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/objective.hpp>
#include <tropd/regions/regions.hpp>

namespace tropd_gpu_test {

/// Outcome of one device run.
struct run_status {
  tropd::status call{};    ///< what the tropd::gpu entry point returned
  tropd::status device{};  ///< the decoded status word (device-side input checks)
  int cuda_error = 0;      ///< a CUDA failure of the harness itself (allocation, copy, sync); 0 = none
  std::string where;       ///< which harness step failed
  bool harness_ok() const { return cuda_error == 0; }
};

/// Shape and options of a row-level case. Strides are in elements (0: = V).
struct row_case {
  tropd::index_t rows = 1, V = 1;
  tropd::index_t student_stride = 0, teacher_stride = 0, grad_stride = 0;
  double ts = 1, tt = 1;
  int blocks_per_row = 0;          ///< 0: the library's heuristic (on the device's SM count)
  bool with_grad = true;
  std::vector<double> grad_scale;  ///< empty: none
  bool small_scratch = false;      ///< allocate one byte less than *_scratch_bytes asks for
  tropd::index_t ss() const { return student_stride ? student_stride : V; }
  tropd::index_t st() const { return teacher_stride ? teacher_stride : V; }
  tropd::index_t gs() const { return grad_stride ? grad_stride : V; }
};

/// tropd::gpu::divergence_rows. student [rows x ss], teacher [rows x st]; grad is returned
/// [rows x gs] (padding columns are left as the poison). Instantiated in rows_device.cu for
/// reverse_kl (float, bf16, fp16 -> float; float -> double), forward_kl, jsd, total_variation
/// (float, bf16 -> float).
template <class Est, class T, class G>
run_status gpu_divergence(const Est& est, const row_case& c, const std::vector<T>& student, const std::vector<T>& teacher,
                          std::vector<double>& loss, std::vector<G>& grad, std::vector<tropd::estimators::row_summary>& sums);

/// tropd::gpu::sampled_rows (s_old empty: s_old = s). Instantiated in sampled_device.cu for
/// k1/pg (float, bf16), k2/loss, k3/loss, k3/pg, k2/pg (float); G = float.
template <class E, class U, class T>
run_status gpu_sampled(const tropd::estimators::sampled<E, U>& est, const row_case& c, const std::vector<T>& student,
                       const std::vector<T>& teacher, const std::vector<int32_t>& ids, const std::vector<double>& s_old,
                       std::vector<double>& loss, std::vector<float>& grad);

/// tropd::gpu::topk_forward_kl_rows with given lists [rows x K] (contiguous). Instantiated in
/// sampled_device.cu for float and bf16 students; G = float.
template <class T>
run_status gpu_topk(const tropd::estimators::topk_forward_kl& est, const row_case& c, const std::vector<T>& student,
                    const std::vector<int32_t>& ids, const std::vector<float>& logprobs, tropd::index_t K,
                    std::vector<double>& loss, std::vector<float>& grad);

/// Per-token data of a batch (host memory). [n] arrays; empty optional arrays are "not supplied".
struct token_data {
  std::vector<float> s, s_old, t;
  std::vector<tropd::origin> from;
  std::vector<tropd::index_t> seq_offsets;
  std::vector<uint64_t> seq_ids;
  std::vector<float> ent_s, ent_t, rkl, ref;
  tropd::index_t K = 0;  ///< top-k width (0: no top-k arrays)
  std::vector<int32_t> topk_ids;
  std::vector<float> topk_teacher, topk_student, topk_student_old;  ///< [n x K]; student_old optional
  tropd::index_t n() const { return static_cast<tropd::index_t>(s.size()); }
};

/// Per-token results of gpu_tokens (the fields of tropd::token_result).
struct token_outputs {
  std::vector<double> loss, dloss_ds, advantage, loss_trust, loss_outlier, loss_guidance, teacher_mass, student_mass;
  std::vector<uint8_t> flags;
  std::vector<double> g_topk;  ///< [n x K]
};

/// Objectives beyond the presets: a direct (non-PG) trust loss, a proximal reward, and a PG
/// trust term with a dense term.
using k3_loss_objective = tropd::objective<tropd::regions::all_trusted,
                                           tropd::estimators::sampled_term<tropd::estimators::k3, tropd::estimators::as_loss>,
                                           tropd::outliers::drop, tropd::clippers::no_clip>;
using proximal_objective = tropd::objective<tropd::regions::stochastic_acceptance, tropd::estimators::proximal_reward,
                                            tropd::outliers::clip_reward, tropd::clippers::pg_clip>;
/// A PG trust term with a dense full-vocabulary term (exercises has_dense with guidance).
using k1_jsd_objective = tropd::objective<tropd::regions::all_trusted, tropd::estimators::k1_reward, tropd::outliers::drop,
                                          tropd::clippers::pg_clip, tropd::estimators::jsd>;

/// tropd::gpu::evaluate_tokens with the given trust decisions. Instantiated in
/// tokens_device.cu for every objective type of tropd::presets (objective.hpp) and the three above.
template <class Obj>
run_status gpu_tokens(const Obj& obj, const token_data& b, const std::vector<uint8_t>& trusted, token_outputs& out);

/// tropd::gpu::decide with `region` and `ctx` (host-side values; `seq_masked` is copied to
/// the device and replaces ctx.seq_masked when not empty). Instantiated in tokens_device.cu
/// for all_trusted, stochastic_acceptance, log_ratio_threshold, teacher_entropy_gate,
/// entropy_top_fraction, sequence_ratio_bound and phase_switch<log_ratio_threshold,
/// entropy_top_fraction>.
template <class Region>
run_status gpu_decide(const Region& region, const token_data& b, tropd::regions::batch_context ctx,
                      const std::vector<uint8_t>& seq_masked, std::vector<uint8_t>& trusted);

/// tropd::gpu::decide_stochastic (the named entry point).
run_status gpu_decide_stochastic(const token_data& b, uint64_t seed, uint64_t step, std::vector<uint8_t>& trusted);

}  // namespace tropd_gpu_test
