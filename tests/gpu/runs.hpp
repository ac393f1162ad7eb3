// Host entry points of the CUDA test harness (tests/gpu/*_device.cu): plain host functions on
// host vectors. Each copies its inputs to the device, fills every device output with NaN bytes
// (0xff) first (so an element the kernels never write fails the comparison), sizes the
// scratch with the entry point's *_scratch_bytes function (one byte less with small_scratch),
// runs the tropd::gpu entry point on a fresh stream, reads the status word, and copies the
// outputs back. The host doctest files (test_rows.cpp, test_objective.cpp) run the host twin
// (tropd::host) on the same inputs and compare.
#pragma once

#include <stdint.h>

#include <string>
#include <vector>

#include <tropd/core/status.hpp>
#include <tropd/core/token.hpp>
#include <tropd/core/token_batch.hpp>
#include <tropd/core/types.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/sampled.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/host/row_io.hpp>
#include <tropd/objective.hpp>
#include <tropd/regions/regions.hpp>

namespace tropd_gpu_test {

/// Outcome of one device run.
struct run_status {
  tropd::status call{};    ///< what the tropd::gpu entry point returned
  tropd::status device{};  ///< the decoded status word (device-side data checks)
  int cuda_error = 0;      ///< a CUDA failure of the harness itself (allocation, copy, sync); 0 = none
  std::string where;       ///< which harness step failed
  bool harness_ok() const { return cuda_error == 0; }
};

// -------------------------------------------------------------------------------------------------
// Row functions (gpu/rows.cuh)
// -------------------------------------------------------------------------------------------------

/// Shape and options of a row-level case. Strides are in elements (0: = V).
struct row_case {
  tropd::index_t rows = 1, V = 1;
  tropd::index_t student_stride = 0, teacher_stride = 0, grad_stride = 0;
  double ts = 1, tt = 1;
  int blocks_per_row = 0;          ///< 0: the library's plan (the device's occupancy)
  bool with_grad = true;
  std::vector<double> grad_scale;  ///< empty: none
  bool small_scratch = false;      ///< allocate one byte less than *_scratch_bytes asks for
  tropd::index_t ss() const { return student_stride ? student_stride : V; }
  tropd::index_t st() const { return teacher_stride ? teacher_stride : V; }
  tropd::index_t gs() const { return grad_stride ? grad_stride : V; }
};

/// tropd::gpu::divergence_rows. student [rows x ss], teacher [rows x st]; grad is returned
/// [rows x gs] (padding columns are left as the poison). Instantiated in rows_device.cu.
template <class Est, class T, class G>
run_status gpu_divergence(const Est& est, const row_case& c, const std::vector<T>& student, const std::vector<T>& teacher,
                          std::vector<double>& loss, std::vector<G>& grad, std::vector<tropd::estimators::row_summary>& sums);

/// tropd::gpu::sampled_rows (s_old empty: s_old = s). Instantiated in sampled_device.cu.
template <class E, class U, class T>
run_status gpu_sampled(const tropd::estimators::sampled<E, U>& est, const row_case& c, const std::vector<T>& student,
                       const std::vector<T>& teacher, const std::vector<int32_t>& ids, const std::vector<double>& s_old,
                       std::vector<double>& loss, std::vector<float>& grad);

/// tropd::gpu::topk_forward_kl_rows with given lists [rows x K] (contiguous, fp32 log-probs).
template <class T>
run_status gpu_topk(const tropd::estimators::topk_forward_kl& est, const row_case& c, const std::vector<T>& student,
                    const std::vector<int32_t>& ids, const std::vector<float>& logprobs, tropd::index_t K,
                    std::vector<double>& loss, std::vector<float>& grad);

/// tropd::gpu::topk_forward_kl_rows with the top-k selected from teacher logits.
template <class T>
run_status gpu_topk_selected(const tropd::estimators::topk_forward_kl& est, const row_case& c, const std::vector<T>& student,
                             const std::vector<T>& teacher, std::vector<double>& loss, std::vector<float>& grad);

// -------------------------------------------------------------------------------------------------
// The objective (gpu/objective.cuh)
// -------------------------------------------------------------------------------------------------

/// A token batch in host memory (value arrays in double, uploaded as fp32 with f32; empty
/// optional arrays are "not supplied").
struct token_data {
  std::vector<double> s, s_old, t, ent_s, ent_t, rkl, ref;
  std::vector<tropd::origin> from;
  std::vector<tropd::index_t> seq_offsets;
  std::vector<uint64_t> seq_ids;
  tropd::index_t K = 0;
  std::vector<int32_t> topk_ids;
  std::vector<double> topk_teacher, topk_student, topk_student_old;  ///< [n x K]
  bool f32 = false;
  tropd::index_t n() const { return static_cast<tropd::index_t>(s.size()); }
  /// Views of the host arrays (the host twin's input); the fp32 copies when f32 (make_f32 first).
  tropd::token_batch view() const {
    tropd::token_batch b;
    const tropd::index_t N = n();
    auto vv = [&](const std::vector<double>& d, const std::vector<float>& f) {
      if (d.empty()) return tropd::values_view{};
      return f32 ? tropd::values_view(f.data(), tropd::index_t(f.size())) : tropd::values_view(d.data(), tropd::index_t(d.size()));
    };
    auto vm = [&](const std::vector<double>& d, const std::vector<float>& f) {
      if (d.empty() || K == 0) return tropd::values_matrix{};
      return f32 ? tropd::values_matrix(f.data(), N, K, K) : tropd::values_matrix(d.data(), N, K, K);
    };
    b.s = vv(s, s32);
    b.s_old = vv(s_old, s_old32);
    b.t = vv(t, t32);
    b.from = {from.data(), N};
    b.seq_offsets = {seq_offsets.data(), tropd::index_t(seq_offsets.size())};
    b.seq_ids = {seq_ids.data(), tropd::index_t(seq_ids.size())};
    b.student_entropy = vv(ent_s, ent_s32);
    b.teacher_entropy = vv(ent_t, ent_t32);
    b.rkl = vv(rkl, rkl32);
    b.ref = vv(ref, ref32);
    if (K > 0) b.topk_ids = tropd::make_matrix<const int32_t>(topk_ids.data(), N, K);
    b.topk_teacher = vm(topk_teacher, tq32);
    b.topk_student = vm(topk_student, ts32);
    b.topk_student_old = vm(topk_student_old, tso32);
    return b;
  }
  std::vector<float> s32, s_old32, t32, ent_s32, ent_t32, rkl32, ref32, tq32, ts32, tso32;
  /// Rounds every value array to fp32 (both backends then read the same values) and sets f32.
  void make_f32() {
    auto r = [](std::vector<double>& d, std::vector<float>& f) {
      f.assign(d.begin(), d.end());
      for (size_t i = 0; i < d.size(); ++i) d[i] = double(f[i]);
    };
    r(s, s32); r(s_old, s_old32); r(t, t32); r(ent_s, ent_s32); r(ent_t, ent_t32); r(rkl, rkl32); r(ref, ref32);
    r(topk_teacher, tq32); r(topk_student, ts32); r(topk_student_old, tso32);
    f32 = true;
  }
};

/// Rows for evaluate_rows in host memory.
template <class T>
struct rows_data {
  tropd::index_t n = 0, V = 0;
  std::vector<T> student, teacher;  ///< [n x V]; teacher empty: a served teacher (t)
  std::vector<double> t;            ///< served teacher log-probs [n]
  std::vector<int32_t> ids;
  std::vector<tropd::origin> from;
  std::vector<tropd::index_t> seq_offsets;
  std::vector<uint64_t> seq_ids;
  std::vector<double> s_old, ref;  ///< optional [n]
  tropd::index_t K = 0;            ///< given lists' width (0: none)
  std::vector<int32_t> list_ids;   ///< [n x K]
  std::vector<float> list_lp;      ///< [n x K]
  tropd::index_t Kold = 0;         ///< topk_student_old's width (0: none)
  std::vector<double> topk_student_old;
  double ts = 1, tt = 1;
  /// The host twin's inputs (views of the host arrays).
  tropd::host::row_inputs inputs() const {
    tropd::host::row_inputs in;
    in.ids = {ids.data(), n};
    in.from = {from.data(), n};
    in.seq_offsets = {seq_offsets.data(), tropd::index_t(seq_offsets.size())};
    in.seq_ids = {seq_ids.data(), tropd::index_t(seq_ids.size())};
    if (!s_old.empty()) in.s_old = tropd::values_view(s_old.data(), n);
    if (!ref.empty()) in.ref = tropd::values_view(ref.data(), n);
    if (Kold) in.topk_student_old = tropd::values_matrix(topk_student_old.data(), n, Kold, Kold);
    if (K) in.teacher_topk = {tropd::make_matrix<const int32_t>(list_ids.data(), n, K), tropd::values_matrix(list_lp.data(), n, K, K)};
    in.student_temperature = ts;
    in.teacher_temperature = tt;
    return in;
  }
};

/// What an objective call returns (host copies).
template <class G = float>
struct objective_result {
  double loss = 0;
  tropd::diagnostics diag{};
  std::vector<double> dloss_ds, advantage, dloss_dtopk;  ///< [n], [n], [n x K]
  std::vector<uint8_t> flags;
  std::vector<G> grad;            ///< [n x V] (rows)
  std::vector<int32_t> topk_ids;  ///< [n x K] (rows)
};

struct objective_case {
  uint64_t seed = 0, step = 0;
  bool mask = false;         ///< input_policy::mask
  int blocks_per_row = 0;    ///< rows: 0 the plan, 1 one block per row, > 1 split
  bool diag = true;          ///< ask for the diagnostics
  bool token_outputs = true; ///< ask for dloss_ds, advantage, flags, dloss_dtopk (and topk_ids at row level)
  bool grad = true;          ///< rows: ask for the gradient
  bool small_scratch = false;
};

/// tropd::gpu::evaluate_tokens. Instantiated in objective_tokens_device.cu.
template <class Obj>
run_status gpu_evaluate_tokens(const Obj& obj, const token_data& d, const objective_case& c, objective_result<>& out);

/// tropd::gpu::evaluate_rows (teacher logits, or a served teacher when d.teacher is empty).
/// Instantiated in objective_rows_device.cu and objective_rows2_device.cu.
template <class Obj, class T, class G>
run_status gpu_evaluate_rows(const Obj& obj, const rows_data<T>& d, const objective_case& c, objective_result<G>& out);

/// Custom objectives beyond the presets.
using trm_objective = tropd::objective<tropd::regions::sequence_ratio_bound, tropd::estimators::k1_reward, tropd::outliers::drop,
                                       tropd::clippers::pg_clip>;
using k3_loss_objective = tropd::objective<tropd::regions::all_trusted,
                                           tropd::estimators::sampled_term<tropd::estimators::k3, tropd::estimators::as_loss>,
                                           tropd::outliers::drop, tropd::clippers::no_clip>;
using proximal_objective = tropd::objective<tropd::regions::stochastic_acceptance, tropd::estimators::proximal_reward,
                                            tropd::outliers::clip_reward, tropd::clippers::pg_clip>;
/// Every student token an outlier with the form-P top-k term (the tail bucket's gradient test).
using all_outliers_objective = tropd::objective<tropd::regions::log_ratio_threshold, tropd::estimators::k1_reward,
                                                tropd::outliers::topk_fkl, tropd::clippers::pg_clip>;
/// A PG trust term with a dense term (has_dense with guidance).
using k1_jsd_objective = tropd::objective<tropd::regions::all_trusted, tropd::estimators::k1_reward, tropd::outliers::drop,
                                          tropd::clippers::pg_clip, tropd::estimators::jsd>;

}  // namespace tropd_gpu_test
