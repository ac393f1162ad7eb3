// Device side of the full-vocabulary row tests (test_rows.cpp): runs
// tropd::gpu::divergence_rows on copies of host inputs, with poisoned outputs.
#include <tropd/gpu/rows.cuh>

#include "gpu/harness.cuh"

namespace tropd_gpu_test {

template <class Est, class T, class G>
run_status gpu_divergence(const Est& est, const row_case& c, const std::vector<T>& student, const std::vector<T>& teacher,
                          std::vector<double>& loss, std::vector<G>& grad, std::vector<tropd::estimators::row_summary>& sums) {
  namespace tg = tropd::gpu;
  run_status rs;
  device_buffer<T> d_s, d_t;
  device_buffer<double> d_loss, d_scale;
  device_buffer<G> d_grad;
  device_buffer<tropd::estimators::row_summary> d_sums;
  device_buffer<unsigned char> d_scratch;
  scoped_stream stream;
  TROPD_TEST_CUDA(rs, cudaStreamCreate(&stream.s));
  TROPD_TEST_CUDA(rs, d_s.upload(student));
  TROPD_TEST_CUDA(rs, d_t.upload(teacher));
  TROPD_TEST_CUDA(rs, d_scale.upload(c.grad_scale));
  TROPD_TEST_CUDA(rs, d_loss.alloc(static_cast<size_t>(c.rows)));
  TROPD_TEST_CUDA(rs, d_loss.poison());
  TROPD_TEST_CUDA(rs, d_sums.alloc(static_cast<size_t>(c.rows)));
  TROPD_TEST_CUDA(rs, d_sums.poison());
  TROPD_TEST_CUDA(rs, d_grad.alloc(c.with_grad ? static_cast<size_t>(c.rows * c.gs()) : 0));
  TROPD_TEST_CUDA(rs, d_grad.poison());

  tg::row_options opt;
  opt.student_temperature = c.ts;
  opt.teacher_temperature = c.tt;
  opt.launch.blocks_per_row = c.blocks_per_row;
  const auto sv = tropd::make_matrix<const T>(d_s.get(), c.rows, c.V, c.ss());
  const auto tv = tropd::make_matrix<const T>(d_t.get(), c.rows, c.V, c.st());
  const tropd::vector_view<double> lv{d_loss.get(), c.rows};
  const tropd::matrix_view<G> gv = c.with_grad ? tropd::make_matrix<G>(d_grad.get(), c.rows, c.V, c.gs()) : tropd::matrix_view<G>{};
  const tropd::vector_view<const double> scale{d_scale.get(), static_cast<tropd::index_t>(c.grad_scale.size())};
  const tropd::vector_view<tropd::estimators::row_summary> sv_out{d_sums.get(), c.rows};
  size_t need = tg::divergence_rows_scratch_bytes(est, sv, tv, lv, gv, opt, scale, sv_out);
  if (c.small_scratch) need -= 1;
  TROPD_TEST_CUDA(rs, d_scratch.alloc(need));
  TROPD_TEST_CUDA(rs, d_scratch.poison());
  const tg::device_context ctx{d_scratch.ptr, need, stream.s};
  rs.call = tg::divergence_rows(ctx, est, sv, tv, lv, gv, opt, scale, sv_out);
  if (!rs.call.ok()) return rs;
  rs.device = tg::read_status(d_scratch.ptr, stream.s);  // synchronises the stream
  if (rs.device.code == tropd::errc::backend_error) {
    rs.cuda_error = -1;
    rs.where = rs.device.detail;
    return rs;
  }
  TROPD_TEST_CUDA(rs, d_loss.download(loss));
  TROPD_TEST_CUDA(rs, d_grad.download(grad));
  TROPD_TEST_CUDA(rs, d_sums.download(sums));
  return rs;
}

#define TROPD_INSTANTIATE_DIVERGENCE(EST, T, G)                                                                         \
  template run_status gpu_divergence<EST, T, G>(const EST&, const row_case&, const std::vector<T>&, const std::vector<T>&, \
                                                std::vector<double>&, std::vector<G>&,                                 \
                                                std::vector<tropd::estimators::row_summary>&);

TROPD_INSTANTIATE_DIVERGENCE(tropd::estimators::reverse_kl, float, float)
TROPD_INSTANTIATE_DIVERGENCE(tropd::estimators::reverse_kl, tropd::bf16, float)
TROPD_INSTANTIATE_DIVERGENCE(tropd::estimators::reverse_kl, tropd::fp16, float)
TROPD_INSTANTIATE_DIVERGENCE(tropd::estimators::reverse_kl, float, double)
TROPD_INSTANTIATE_DIVERGENCE(tropd::estimators::reverse_kl, double, double)
TROPD_INSTANTIATE_DIVERGENCE(tropd::estimators::forward_kl, float, float)
TROPD_INSTANTIATE_DIVERGENCE(tropd::estimators::forward_kl, tropd::bf16, float)
TROPD_INSTANTIATE_DIVERGENCE(tropd::estimators::jsd, float, float)
TROPD_INSTANTIATE_DIVERGENCE(tropd::estimators::jsd, tropd::bf16, float)
TROPD_INSTANTIATE_DIVERGENCE(tropd::estimators::total_variation, float, float)
TROPD_INSTANTIATE_DIVERGENCE(tropd::estimators::total_variation, tropd::bf16, float)

}  // namespace tropd_gpu_test
