// Device side of the objective tests (test_objective.cpp), shared by the objective_*_device.cu
// translation units: copies a token batch or rows to the device, poisons every output, runs
// tropd::gpu::evaluate_tokens / evaluate_rows, reads the status word, copies the outputs back.
#pragma once

#include <tropd/gpu/objective.cuh>

#include <type_traits>

#include "gpu/harness.cuh"

namespace tropd_gpu_test {

/// The device copies of a token batch (and the views of them).
struct device_batch {
  device_buffer<double> s, s_old, t, ent_s, ent_t, rkl, ref, tq, ts, tso;
  device_buffer<float> s32, s_old32, t32, ent_s32, ent_t32, rkl32, ref32, tq32, ts32, tso32;
  device_buffer<tropd::origin> from;
  device_buffer<tropd::index_t> off;
  device_buffer<uint64_t> seq_ids;
  device_buffer<int32_t> ids;

  run_status upload(const token_data& d, tropd::token_batch& b) {
    run_status rs;
    const tropd::index_t n = d.n(), K = d.K;
    auto vv = [&](device_buffer<double>& x, device_buffer<float>& x32, const std::vector<double>& v, const std::vector<float>& v32,
                  tropd::values_view& out) -> cudaError_t {
      if (v.empty()) return cudaSuccess;
      cudaError_t e = d.f32 ? x32.upload(v32) : x.upload(v);
      if (e == cudaSuccess) out = d.f32 ? tropd::values_view(x32.get(), n) : tropd::values_view(x.get(), n);
      return e;
    };
    auto vm = [&](device_buffer<double>& x, device_buffer<float>& x32, const std::vector<double>& v, const std::vector<float>& v32,
                  tropd::values_matrix& out) -> cudaError_t {
      if (v.empty() || K == 0) return cudaSuccess;
      cudaError_t e = d.f32 ? x32.upload(v32) : x.upload(v);
      if (e == cudaSuccess)
        out = d.f32 ? tropd::values_matrix(static_cast<const float*>(x32.get()), n, K, K) : tropd::values_matrix(static_cast<const double*>(x.get()), n, K, K);
      return e;
    };
    TROPD_TEST_CUDA(rs, vv(s, s32, d.s, d.s32, b.s));
    TROPD_TEST_CUDA(rs, vv(s_old, s_old32, d.s_old, d.s_old32, b.s_old));
    TROPD_TEST_CUDA(rs, vv(t, t32, d.t, d.t32, b.t));
    TROPD_TEST_CUDA(rs, vv(ent_s, ent_s32, d.ent_s, d.ent_s32, b.student_entropy));
    TROPD_TEST_CUDA(rs, vv(ent_t, ent_t32, d.ent_t, d.ent_t32, b.teacher_entropy));
    TROPD_TEST_CUDA(rs, vv(rkl, rkl32, d.rkl, d.rkl32, b.rkl));
    TROPD_TEST_CUDA(rs, vv(ref, ref32, d.ref, d.ref32, b.ref));
    TROPD_TEST_CUDA(rs, vm(tq, tq32, d.topk_teacher, d.tq32, b.topk_teacher));
    TROPD_TEST_CUDA(rs, vm(ts, ts32, d.topk_student, d.ts32, b.topk_student));
    TROPD_TEST_CUDA(rs, vm(tso, tso32, d.topk_student_old, d.tso32, b.topk_student_old));
    TROPD_TEST_CUDA(rs, from.upload(d.from));
    b.from = {from.get(), n};
    TROPD_TEST_CUDA(rs, off.upload(d.seq_offsets));
    b.seq_offsets = {off.get(), tropd::index_t(d.seq_offsets.size())};
    TROPD_TEST_CUDA(rs, seq_ids.upload(d.seq_ids));
    b.seq_ids = {seq_ids.get(), tropd::index_t(d.seq_ids.size())};
    if (K > 0) {
      TROPD_TEST_CUDA(rs, ids.upload(d.topk_ids));
      b.topk_ids = tropd::make_matrix<const int32_t>(ids.get(), n, K);
    }
    return rs;
  }
};

/// Poisoned device outputs of an objective call and their download.
template <class G>
struct device_outputs {
  device_buffer<double> loss, dloss_ds, advantage, dloss_dtopk;
  device_buffer<tropd::diagnostics> diag;
  device_buffer<uint8_t> flags;
  device_buffer<G> grad;
  device_buffer<int32_t> topk_ids;

  run_status alloc(const objective_case& c, tropd::index_t n, tropd::index_t K, tropd::index_t V) {
    run_status rs;
    TROPD_TEST_CUDA(rs, loss.alloc(1));
    TROPD_TEST_CUDA(rs, loss.poison());
    TROPD_TEST_CUDA(rs, diag.alloc(c.diag ? 1 : 0));
    TROPD_TEST_CUDA(rs, diag.poison());
    const size_t nn = c.token_outputs ? static_cast<size_t>(n) : 0;
    for (device_buffer<double>* b : {&dloss_ds, &advantage}) {
      TROPD_TEST_CUDA(rs, b->alloc(nn));
      TROPD_TEST_CUDA(rs, b->poison());
    }
    TROPD_TEST_CUDA(rs, dloss_dtopk.alloc(nn * static_cast<size_t>(K)));
    TROPD_TEST_CUDA(rs, dloss_dtopk.poison());
    TROPD_TEST_CUDA(rs, flags.alloc(nn));
    TROPD_TEST_CUDA(rs, flags.poison());
    TROPD_TEST_CUDA(rs, topk_ids.alloc(V > 0 ? nn * static_cast<size_t>(K) : 0));
    TROPD_TEST_CUDA(rs, cudaMemset(topk_ids.ptr, 0x7f, (topk_ids.n ? topk_ids.n : 1) * sizeof(int32_t)));
    TROPD_TEST_CUDA(rs, grad.alloc(c.grad && V > 0 ? static_cast<size_t>(n * V) : 0));
    TROPD_TEST_CUDA(rs, grad.poison());
    return rs;
  }
  tropd::token_outputs token_view(tropd::index_t n, tropd::index_t K) const {
    tropd::token_outputs o;
    o.loss = loss.ptr;
    o.diag = diag.get();
    if (dloss_ds.n) o.dloss_ds = tropd::values_out(dloss_ds.get(), n);
    if (advantage.n) o.advantage = tropd::values_out(advantage.get(), n);
    if (dloss_dtopk.n) o.dloss_dtopk = tropd::values_matrix_out(dloss_dtopk.get(), n, K, K);
    if (flags.n) o.flags = {flags.get(), n};
    return o;
  }
  run_status download(objective_result<G>& out) const {
    run_status rs;
    std::vector<double> l;
    TROPD_TEST_CUDA(rs, loss.download(l));
    out.loss = l[0];
    if (diag.n) {
      std::vector<tropd::diagnostics> d;
      TROPD_TEST_CUDA(rs, diag.download(d));
      out.diag = d[0];
    }
    TROPD_TEST_CUDA(rs, dloss_ds.download(out.dloss_ds));
    TROPD_TEST_CUDA(rs, advantage.download(out.advantage));
    TROPD_TEST_CUDA(rs, dloss_dtopk.download(out.dloss_dtopk));
    TROPD_TEST_CUDA(rs, flags.download(out.flags));
    TROPD_TEST_CUDA(rs, grad.download(out.grad));
    TROPD_TEST_CUDA(rs, topk_ids.download(out.topk_ids));
    return rs;
  }
};

/// The status word after a call (synchronises the stream); backend errors become harness errors.
inline run_status finish_run(run_status rs, const void* scratch, cudaStream_t stream) {
  rs.device = tropd::gpu::read_status(scratch, stream);
  if (rs.device.code == tropd::errc::backend_error) {
    rs.cuda_error = -1;
    rs.where = rs.device.detail;
  }
  return rs;
}

template <class Obj>
run_status gpu_evaluate_tokens(const Obj& obj, const token_data& d, const objective_case& c, objective_result<>& out) {
  namespace tg = tropd::gpu;
  run_status rs;
  scoped_stream stream;
  TROPD_TEST_CUDA(rs, cudaStreamCreate(&stream.s));
  device_batch db;
  tropd::token_batch b;
  rs = db.upload(d, b);
  if (!rs.harness_ok()) return rs;
  device_outputs<float> o;
  rs = o.alloc(c, d.n(), d.K, 0);
  if (!rs.harness_ok()) return rs;
  const tropd::token_outputs tout = o.token_view(d.n(), d.K);
  tg::eval_options eo;
  eo.seed = c.seed;
  eo.step = c.step;
  eo.bad_input = c.mask ? tg::input_policy::mask : tg::input_policy::reject;
  size_t need = tg::evaluate_tokens_scratch_bytes(obj, b, tout, eo);
  if (c.small_scratch) need -= 1;
  device_buffer<unsigned char> scratch;
  TROPD_TEST_CUDA(rs, scratch.alloc(need));
  TROPD_TEST_CUDA(rs, scratch.poison());
  rs.call = tg::evaluate_tokens(tg::device_context{scratch.ptr, need, stream.s}, obj, b, tout, eo);
  if (!rs.call.ok()) return rs;
  rs = finish_run(rs, scratch.ptr, stream.s);
  if (!rs.harness_ok()) return rs;
  const run_status dl = o.download(out);
  return dl.harness_ok() ? rs : dl;
}

template <class Obj, class T, class G>
run_status gpu_evaluate_rows(const Obj& obj, const rows_data<T>& d, const objective_case& c, objective_result<G>& out) {
  namespace tg = tropd::gpu;
  run_status rs;
  scoped_stream stream;
  TROPD_TEST_CUDA(rs, cudaStreamCreate(&stream.s));
  device_buffer<T> zs, zt;
  device_buffer<double> t, s_old, ref, tso;
  device_buffer<int32_t> ids, list_ids;
  device_buffer<float> list_lp;
  device_buffer<tropd::origin> from;
  device_buffer<tropd::index_t> off;
  device_buffer<uint64_t> seq_ids;
  TROPD_TEST_CUDA(rs, zs.upload(d.student));
  TROPD_TEST_CUDA(rs, zt.upload(d.teacher));
  TROPD_TEST_CUDA(rs, t.upload(d.t));
  TROPD_TEST_CUDA(rs, s_old.upload(d.s_old));
  TROPD_TEST_CUDA(rs, ref.upload(d.ref));
  TROPD_TEST_CUDA(rs, tso.upload(d.topk_student_old));
  TROPD_TEST_CUDA(rs, ids.upload(d.ids));
  TROPD_TEST_CUDA(rs, list_ids.upload(d.list_ids));
  TROPD_TEST_CUDA(rs, list_lp.upload(d.list_lp));
  TROPD_TEST_CUDA(rs, from.upload(d.from));
  TROPD_TEST_CUDA(rs, off.upload(d.seq_offsets));
  TROPD_TEST_CUDA(rs, seq_ids.upload(d.seq_ids));
  const tropd::index_t n = d.n;
  tg::row_inputs in;
  in.ids = {ids.get(), n};
  in.from = {from.get(), n};
  in.seq_offsets = {off.get(), tropd::index_t(d.seq_offsets.size())};
  in.seq_ids = {seq_ids.get(), tropd::index_t(d.seq_ids.size())};
  if (!d.s_old.empty()) in.s_old = tropd::values_view(static_cast<const double*>(s_old.get()), n);
  if (!d.ref.empty()) in.ref = tropd::values_view(static_cast<const double*>(ref.get()), n);
  if (d.Kold) in.topk_student_old = tropd::values_matrix(static_cast<const double*>(tso.get()), n, d.Kold, d.Kold);
  if (d.K) in.teacher_topk = {tropd::make_matrix<const int32_t>(list_ids.get(), n, d.K), tropd::values_matrix(static_cast<const float*>(list_lp.get()), n, d.K, d.K)};
  in.student_temperature = d.ts;
  in.teacher_temperature = d.tt;
  // K: the lists' width the call uses (given, or min(k, V) selected).
  tropd::index_t K = d.K;
  if constexpr (Obj::outlier_type::needs_topk)
    if (!K) K = std::min<tropd::index_t>(obj.outlier.fkl.k, d.V);
  device_outputs<G> o;
  rs = o.alloc(c, n, Obj::outlier_type::needs_topk ? K : 0, d.V);
  if (!rs.harness_ok()) return rs;
  const tropd::token_outputs tv = o.token_view(n, Obj::outlier_type::needs_topk ? K : 0);
  tg::row_outputs<G> ro;
  if (o.grad.n) ro.grad = tropd::make_matrix<G>(o.grad.get(), n, d.V);
  ro.loss = tv.loss;
  ro.diag = tv.diag;
  ro.dloss_ds = tv.dloss_ds;
  ro.advantage = tv.advantage;
  ro.dloss_dtopk = tv.dloss_dtopk;
  ro.flags = tv.flags;
  if (o.topk_ids.n) ro.topk_ids = tropd::make_matrix<int32_t>(o.topk_ids.get(), n, K);
  tg::eval_options eo;
  eo.seed = c.seed;
  eo.step = c.step;
  eo.bad_input = c.mask ? tg::input_policy::mask : tg::input_policy::reject;
  eo.launch.blocks_per_row = c.blocks_per_row;
  const auto sv = tropd::make_matrix<const T>(zs.get(), n, d.V);
  size_t need = 0;
  if (d.teacher.empty())
    need = tg::evaluate_rows_scratch_bytes(obj, sv, tg::teacher_logprobs{tropd::values_view(static_cast<const double*>(t.get()), n)}, in, ro, eo);
  else
    need = tg::evaluate_rows_scratch_bytes(obj, sv, tropd::make_matrix<const T>(zt.get(), n, d.V), in, ro, eo);
  if (c.small_scratch) need -= 1;
  device_buffer<unsigned char> scratch;
  TROPD_TEST_CUDA(rs, scratch.alloc(need ? need : 256));
  TROPD_TEST_CUDA(rs, scratch.poison());
  const tg::device_context ctx{scratch.ptr, need, stream.s};
  if (d.teacher.empty())
    rs.call = tg::evaluate_rows(ctx, obj, sv, tg::teacher_logprobs{tropd::values_view(static_cast<const double*>(t.get()), n)}, in, ro, eo);
  else
    rs.call = tg::evaluate_rows(ctx, obj, sv, tropd::make_matrix<const T>(zt.get(), n, d.V), in, ro, eo);
  if (!rs.call.ok()) return rs;
  rs = finish_run(rs, scratch.ptr, stream.s);
  if (!rs.harness_ok()) return rs;
  const run_status dl = o.download(out);
  return dl.harness_ok() ? rs : dl;
}

}  // namespace tropd_gpu_test

#define TROPD_INSTANTIATE_TOKENS(OBJ) \
  template run_status gpu_evaluate_tokens<OBJ>(const OBJ&, const token_data&, const objective_case&, objective_result<>&);
#define TROPD_INSTANTIATE_ROWS(OBJ, T, G) \
  template run_status gpu_evaluate_rows<OBJ, T, G>(const OBJ&, const rows_data<T>&, const objective_case&, objective_result<G>&);
