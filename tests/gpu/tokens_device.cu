// Device side of the token-level tests (test_rows.cpp): runs tropd::gpu::evaluate_tokens
// (the per-token rule, given trust decisions) and tropd::gpu::decide / decide_stochastic (a
// region's decisions) on copies of host inputs, with poisoned outputs.
#include <tropd/gpu/rows.cuh>

#include "gpu/harness.cuh"

namespace tropd_gpu_test {

namespace {

template <class T>
tropd::vector_view<const T> cview(const device_buffer<T>& b) {
  return {b.get(), static_cast<tropd::index_t>(b.n)};
}
template <class T>
tropd::matrix_view<const T> cmatrix(const device_buffer<T>& b, tropd::index_t rows, tropd::index_t K) {
  return b.n ? tropd::make_matrix<const T>(b.get(), rows, K) : tropd::matrix_view<const T>{};
}

}  // namespace

template <class Obj>
run_status gpu_tokens(const Obj& obj, const token_data& b, const std::vector<uint8_t>& trusted, token_outputs& out) {
  namespace tg = tropd::gpu;
  run_status rs;
  const tropd::index_t n = b.n();
  const size_t nn = static_cast<size_t>(n);
  device_buffer<float> s, s_old, t, rkl, ref, tk_t, tk_s, tk_so;
  device_buffer<tropd::origin> from;
  device_buffer<uint8_t> d_trusted, flags;
  device_buffer<double> loss, dloss, adv, l_tr, l_out, l_g, t_mass, s_mass, g_topk;
  device_buffer<unsigned char> scratch;
  scoped_stream stream;
  TROPD_TEST_CUDA(rs, cudaStreamCreate(&stream.s));
  TROPD_TEST_CUDA(rs, s.upload(b.s));
  TROPD_TEST_CUDA(rs, s_old.upload(b.s_old));
  TROPD_TEST_CUDA(rs, t.upload(b.t));
  TROPD_TEST_CUDA(rs, from.upload(b.from));
  TROPD_TEST_CUDA(rs, rkl.upload(b.rkl));
  TROPD_TEST_CUDA(rs, ref.upload(b.ref));
  TROPD_TEST_CUDA(rs, tk_t.upload(b.topk_teacher));
  TROPD_TEST_CUDA(rs, tk_s.upload(b.topk_student));
  TROPD_TEST_CUDA(rs, tk_so.upload(b.topk_student_old));
  TROPD_TEST_CUDA(rs, d_trusted.upload(trusted));
  for (device_buffer<double>* d : {&loss, &dloss, &adv, &l_tr, &l_out, &l_g, &t_mass, &s_mass}) {
    TROPD_TEST_CUDA(rs, d->alloc(nn));
    TROPD_TEST_CUDA(rs, d->poison());
  }
  TROPD_TEST_CUDA(rs, flags.alloc(nn));
  TROPD_TEST_CUDA(rs, flags.poison());
  TROPD_TEST_CUDA(rs, g_topk.alloc(nn * static_cast<size_t>(b.K)));
  TROPD_TEST_CUDA(rs, g_topk.poison());
  TROPD_TEST_CUDA(rs, scratch.alloc(tg::tokens_scratch_bytes()));

  tg::token_arrays in;
  in.s = cview(s);
  in.s_old = cview(s_old);
  in.t = cview(t);
  in.from = cview(from);
  in.rkl = cview(rkl);
  in.ref = cview(ref);
  in.topk_teacher = cmatrix(tk_t, n, b.K);
  in.topk_student = cmatrix(tk_s, n, b.K);
  in.topk_student_old = cmatrix(tk_so, n, b.K);
  tg::token_results res;
  res.loss = {loss.get(), n};
  res.dloss_ds = {dloss.get(), n};
  res.advantage = {adv.get(), n};
  res.loss_trust = {l_tr.get(), n};
  res.loss_outlier = {l_out.get(), n};
  res.loss_guidance = {l_g.get(), n};
  res.teacher_mass = {t_mass.get(), n};
  res.student_mass = {s_mass.get(), n};
  res.flags = {flags.get(), n};
  if (b.K > 0) res.g_topk = tropd::make_matrix<double>(g_topk.get(), n, b.K);
  const tg::device_context ctx{scratch.ptr, tg::tokens_scratch_bytes(), stream.s};
  rs.call = tg::evaluate_tokens(ctx, obj, in, cview(d_trusted), res);
  if (!rs.call.ok()) return rs;
  rs.device = tg::read_status(scratch.ptr, stream.s);
  if (rs.device.code == tropd::errc::backend_error) {
    rs.cuda_error = -1;
    rs.where = rs.device.detail;
    return rs;
  }
  TROPD_TEST_CUDA(rs, loss.download(out.loss));
  TROPD_TEST_CUDA(rs, dloss.download(out.dloss_ds));
  TROPD_TEST_CUDA(rs, adv.download(out.advantage));
  TROPD_TEST_CUDA(rs, l_tr.download(out.loss_trust));
  TROPD_TEST_CUDA(rs, l_out.download(out.loss_outlier));
  TROPD_TEST_CUDA(rs, l_g.download(out.loss_guidance));
  TROPD_TEST_CUDA(rs, t_mass.download(out.teacher_mass));
  TROPD_TEST_CUDA(rs, s_mass.download(out.student_mass));
  TROPD_TEST_CUDA(rs, flags.download(out.flags));
  TROPD_TEST_CUDA(rs, g_topk.download(out.g_topk));
  return rs;
}

namespace {

struct decision_buffers {
  device_buffer<float> s, s_old, t, ent_s, ent_t;
  device_buffer<tropd::origin> from;
  device_buffer<tropd::index_t> offsets;
  device_buffer<uint64_t> seq_ids;
  device_buffer<uint8_t> trusted;
  device_buffer<unsigned char> scratch;
  scoped_stream stream;

  run_status upload(const token_data& b, tropd::gpu::decision_inputs& in) {
    run_status rs;
    TROPD_TEST_CUDA(rs, cudaStreamCreate(&stream.s));
    TROPD_TEST_CUDA(rs, s.upload(b.s));
    TROPD_TEST_CUDA(rs, s_old.upload(b.s_old));
    TROPD_TEST_CUDA(rs, t.upload(b.t));
    TROPD_TEST_CUDA(rs, ent_s.upload(b.ent_s));
    TROPD_TEST_CUDA(rs, ent_t.upload(b.ent_t));
    TROPD_TEST_CUDA(rs, from.upload(b.from));
    TROPD_TEST_CUDA(rs, offsets.upload(b.seq_offsets));
    TROPD_TEST_CUDA(rs, seq_ids.upload(b.seq_ids));
    TROPD_TEST_CUDA(rs, trusted.alloc(b.s.size()));
    TROPD_TEST_CUDA(rs, trusted.poison());  // 0xff: neither 0 nor 1
    TROPD_TEST_CUDA(rs, scratch.alloc(tropd::gpu::tokens_scratch_bytes()));
    in.s = cview(s);
    in.s_old = cview(s_old);
    in.t = cview(t);
    in.from = cview(from);
    in.seq_offsets = cview(offsets);
    in.seq_ids = cview(seq_ids);
    in.student_entropy = cview(ent_s);
    in.teacher_entropy = cview(ent_t);
    return rs;
  }
  tropd::gpu::device_context context() const { return {scratch.ptr, tropd::gpu::tokens_scratch_bytes(), stream.s}; }
  run_status finish(run_status rs, std::vector<uint8_t>& out) {
    if (!rs.call.ok()) return rs;
    rs.device = tropd::gpu::read_status(scratch.ptr, stream.s);
    if (rs.device.code == tropd::errc::backend_error) {
      rs.cuda_error = -1;
      rs.where = rs.device.detail;
      return rs;
    }
    TROPD_TEST_CUDA(rs, trusted.download(out));
    return rs;
  }
};

}  // namespace

template <class Region>
run_status gpu_decide(const Region& region, const token_data& b, tropd::regions::batch_context ctx,
                      const std::vector<uint8_t>& seq_masked, std::vector<uint8_t>& trusted) {
  decision_buffers d;
  tropd::gpu::decision_inputs in;
  run_status rs = d.upload(b, in);
  if (!rs.harness_ok()) return rs;
  device_buffer<uint8_t> mask;
  TROPD_TEST_CUDA(rs, mask.upload(seq_masked));
  if (!seq_masked.empty()) ctx.seq_masked = mask.get();
  rs.call = tropd::gpu::decide(d.context(), region, in, ctx, {d.trusted.get(), b.n()});
  return d.finish(rs, trusted);
}

run_status gpu_decide_stochastic(const token_data& b, uint64_t seed, uint64_t step, std::vector<uint8_t>& trusted) {
  decision_buffers d;
  tropd::gpu::decision_inputs in;
  run_status rs = d.upload(b, in);
  if (!rs.harness_ok()) return rs;
  rs.call = tropd::gpu::decide_stochastic(d.context(), in, seed, step, {d.trusted.get(), b.n()});
  return d.finish(rs, trusted);
}

namespace tp = tropd::presets;
namespace tr = tropd::regions;

#define TROPD_INSTANTIATE_TOKENS(OBJ) \
  template run_status gpu_tokens<OBJ>(const OBJ&, const token_data&, const std::vector<uint8_t>&, token_outputs&);

TROPD_INSTANTIATE_TOKENS(tp::opd_objective)
TROPD_INSTANTIATE_TOKENS(tp::eopd_objective)
TROPD_INSTANTIATE_TOKENS(tp::reopold_objective)
TROPD_INSTANTIATE_TOKENS(tp::entropy_opd_objective)
TROPD_INSTANTIATE_TOKENS(tp::clip_outlier_objective)
TROPD_INSTANTIATE_TOKENS(tp::mask_outlier_objective)
TROPD_INSTANTIATE_TOKENS(tp::fkl_outlier_objective)
TROPD_INSTANTIATE_TOKENS(tp::gkd_objective)
TROPD_INSTANTIATE_TOKENS(k1_jsd_objective)
TROPD_INSTANTIATE_TOKENS(tp::vopd_objective)
TROPD_INSTANTIATE_TOKENS(tp::gopd_objective)
TROPD_INSTANTIATE_TOKENS(k3_loss_objective)
TROPD_INSTANTIATE_TOKENS(proximal_objective)

#define TROPD_INSTANTIATE_DECIDE(REGION)                                                                    \
  template run_status gpu_decide<REGION>(const REGION&, const token_data&, tropd::regions::batch_context, \
                                         const std::vector<uint8_t>&, std::vector<uint8_t>&);

TROPD_INSTANTIATE_DECIDE(tr::all_trusted)
TROPD_INSTANTIATE_DECIDE(tr::stochastic_acceptance)
TROPD_INSTANTIATE_DECIDE(tr::log_ratio_threshold)
TROPD_INSTANTIATE_DECIDE(tr::teacher_entropy_gate)
TROPD_INSTANTIATE_DECIDE(tr::entropy_top_fraction)
TROPD_INSTANTIATE_DECIDE(tr::sequence_ratio_bound)
using reopold_region = tr::phase_switch<tr::log_ratio_threshold, tr::entropy_top_fraction>;
TROPD_INSTANTIATE_DECIDE(reopold_region)

}  // namespace tropd_gpu_test
