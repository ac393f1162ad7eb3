// Device side of the sampled-token and teacher top-k row tests (test_rows.cpp): runs
// tropd::gpu::sampled_rows and tropd::gpu::topk_forward_kl_rows on copies of host inputs,
// with poisoned outputs.
#include <tropd/gpu/rows.cuh>

#include <string>

#include "gpu/harness.cuh"

namespace tropd_gpu_test {

template <class E, class U, class T>
run_status gpu_sampled(const tropd::estimators::sampled<E, U>& est, const row_case& c, const std::vector<T>& student,
                       const std::vector<T>& teacher, const std::vector<int32_t>& ids, const std::vector<double>& s_old,
                       std::vector<double>& loss, std::vector<float>& grad) {
  namespace tg = tropd::gpu;
  run_status rs;
  device_buffer<T> d_s, d_t;
  device_buffer<int32_t> d_ids;
  device_buffer<double> d_sold, d_loss, d_scale;
  device_buffer<float> d_grad;
  device_buffer<unsigned char> d_scratch;
  scoped_stream stream;
  TROPD_TEST_CUDA(rs, cudaStreamCreate(&stream.s));
  TROPD_TEST_CUDA(rs, d_s.upload(student));
  TROPD_TEST_CUDA(rs, d_t.upload(teacher));
  TROPD_TEST_CUDA(rs, d_ids.upload(ids));
  TROPD_TEST_CUDA(rs, d_sold.upload(s_old));
  TROPD_TEST_CUDA(rs, d_scale.upload(c.grad_scale));
  TROPD_TEST_CUDA(rs, d_loss.alloc(static_cast<size_t>(c.rows)));
  TROPD_TEST_CUDA(rs, d_loss.poison());
  TROPD_TEST_CUDA(rs, d_grad.alloc(c.with_grad ? static_cast<size_t>(c.rows * c.gs()) : 0));
  TROPD_TEST_CUDA(rs, d_grad.poison());

  tg::row_options opt;
  opt.student_temperature = c.ts;
  opt.teacher_temperature = c.tt;
  opt.launch.blocks_per_row = c.blocks_per_row;
  const auto sv = tropd::make_matrix<const T>(d_s.get(), c.rows, c.V, c.ss());
  const auto tv = tropd::make_matrix<const T>(d_t.get(), c.rows, c.V, c.st());
  const tropd::vector_view<const int32_t> idv{d_ids.get(), static_cast<tropd::index_t>(ids.size())};
  const tropd::vector_view<const double> so{d_sold.get(), static_cast<tropd::index_t>(s_old.size())};
  const tropd::vector_view<double> lv{d_loss.get(), c.rows};
  const tropd::matrix_view<float> gv =
      c.with_grad ? tropd::make_matrix<float>(d_grad.get(), c.rows, c.V, c.gs()) : tropd::matrix_view<float>{};
  const tropd::vector_view<const double> scale{d_scale.get(), static_cast<tropd::index_t>(c.grad_scale.size())};
  size_t need = tg::sampled_rows_scratch_bytes(est, sv, tv, idv, so, lv, gv, opt, scale);
  if (c.small_scratch) need -= 1;
  TROPD_TEST_CUDA(rs, d_scratch.alloc(need));
  TROPD_TEST_CUDA(rs, d_scratch.poison());
  const tg::device_context ctx{d_scratch.ptr, need, stream.s};
  rs.call = tg::sampled_rows(ctx, est, sv, tv, idv, so, lv, gv, opt, scale);
  if (!rs.call.ok()) return rs;
  rs.device = tg::read_status(d_scratch.ptr, stream.s);
  if (rs.device.code == tropd::errc::backend_error) {
    rs.cuda_error = -1;
    rs.where = rs.device.detail;
    return rs;
  }
  TROPD_TEST_CUDA(rs, d_loss.download(loss));
  TROPD_TEST_CUDA(rs, d_grad.download(grad));
  return rs;
}

template <class T>
run_status gpu_topk(const tropd::estimators::topk_forward_kl& est, const row_case& c, const std::vector<T>& student,
                    const std::vector<int32_t>& ids, const std::vector<float>& logprobs, tropd::index_t K,
                    std::vector<double>& loss, std::vector<float>& grad) {
  namespace tg = tropd::gpu;
  run_status rs;
  device_buffer<T> d_s;
  device_buffer<int32_t> d_ids;
  device_buffer<float> d_lp, d_grad;
  device_buffer<double> d_loss, d_scale;
  device_buffer<unsigned char> d_scratch;
  scoped_stream stream;
  TROPD_TEST_CUDA(rs, cudaStreamCreate(&stream.s));
  TROPD_TEST_CUDA(rs, d_s.upload(student));
  TROPD_TEST_CUDA(rs, d_ids.upload(ids));
  TROPD_TEST_CUDA(rs, d_lp.upload(logprobs));
  TROPD_TEST_CUDA(rs, d_scale.upload(c.grad_scale));
  TROPD_TEST_CUDA(rs, d_loss.alloc(static_cast<size_t>(c.rows)));
  TROPD_TEST_CUDA(rs, d_loss.poison());
  TROPD_TEST_CUDA(rs, d_grad.alloc(c.with_grad ? static_cast<size_t>(c.rows * c.gs()) : 0));
  TROPD_TEST_CUDA(rs, d_grad.poison());

  tg::row_options opt;
  opt.student_temperature = c.ts;
  opt.launch.blocks_per_row = c.blocks_per_row;
  const auto sv = tropd::make_matrix<const T>(d_s.get(), c.rows, c.V, c.ss());
  const tg::topk_lists lists{tropd::make_matrix<const int32_t>(d_ids.get(), c.rows, K),
                             tropd::values_matrix(tropd::make_matrix<const float>(d_lp.get(), c.rows, K))};
  const tropd::vector_view<double> lv{d_loss.get(), c.rows};
  const tropd::matrix_view<float> gv =
      c.with_grad ? tropd::make_matrix<float>(d_grad.get(), c.rows, c.V, c.gs()) : tropd::matrix_view<float>{};
  const tropd::vector_view<const double> scale{d_scale.get(), static_cast<tropd::index_t>(c.grad_scale.size())};
  size_t need = tg::topk_forward_kl_rows_scratch_bytes(est, sv, lists, lv, gv, opt, scale);
  if (c.small_scratch) need -= 1;
  TROPD_TEST_CUDA(rs, d_scratch.alloc(need));
  TROPD_TEST_CUDA(rs, d_scratch.poison());
  const tg::device_context ctx{d_scratch.ptr, need, stream.s};
  rs.call = tg::topk_forward_kl_rows(ctx, est, sv, lists, lv, gv, opt, scale);
  if (!rs.call.ok()) return rs;
  rs.device = tg::read_status(d_scratch.ptr, stream.s);
  if (rs.device.code == tropd::errc::backend_error) {
    rs.cuda_error = -1;
    rs.where = rs.device.detail;
    return rs;
  }
  TROPD_TEST_CUDA(rs, d_loss.download(loss));
  TROPD_TEST_CUDA(rs, d_grad.download(grad));
  return rs;
}

template <class T>
run_status gpu_topk_selected(const tropd::estimators::topk_forward_kl& est, const row_case& c, const std::vector<T>& student,
                             const std::vector<T>& teacher, std::vector<double>& loss, std::vector<float>& grad) {
  namespace tg = tropd::gpu;
  run_status rs;
  device_buffer<T> d_s, d_t;
  device_buffer<float> d_grad;
  device_buffer<double> d_loss, d_scale;
  device_buffer<unsigned char> d_scratch;
  scoped_stream stream;
  TROPD_TEST_CUDA(rs, cudaStreamCreate(&stream.s));
  TROPD_TEST_CUDA(rs, d_s.upload(student));
  TROPD_TEST_CUDA(rs, d_t.upload(teacher));
  TROPD_TEST_CUDA(rs, d_scale.upload(c.grad_scale));
  TROPD_TEST_CUDA(rs, d_loss.alloc(static_cast<size_t>(c.rows)));
  TROPD_TEST_CUDA(rs, d_loss.poison());
  TROPD_TEST_CUDA(rs, d_grad.alloc(c.with_grad ? static_cast<size_t>(c.rows * c.gs()) : 0));
  TROPD_TEST_CUDA(rs, d_grad.poison());
  tg::row_options opt;
  opt.student_temperature = c.ts;
  opt.teacher_temperature = c.tt;
  opt.launch.blocks_per_row = c.blocks_per_row;
  opt.synchronize = true;  // (the entry point's own read of the status word)
  const auto sv = tropd::make_matrix<const T>(d_s.get(), c.rows, c.V, c.ss());
  const auto tv = tropd::make_matrix<const T>(d_t.get(), c.rows, c.V, c.st());
  const tropd::vector_view<double> lv{d_loss.get(), c.rows};
  const tropd::matrix_view<float> gv =
      c.with_grad ? tropd::make_matrix<float>(d_grad.get(), c.rows, c.V, c.gs()) : tropd::matrix_view<float>{};
  const tropd::vector_view<const double> scale{d_scale.get(), static_cast<tropd::index_t>(c.grad_scale.size())};
  size_t need = tg::topk_forward_kl_rows_scratch_bytes(est, sv, tv, lv, gv, opt, scale);
  if (c.small_scratch) need -= 1;
  TROPD_TEST_CUDA(rs, d_scratch.alloc(need));
  TROPD_TEST_CUDA(rs, d_scratch.poison());
  const tg::device_context ctx{d_scratch.ptr, need, stream.s};
  const tropd::status st = tg::topk_forward_kl_rows(ctx, est, sv, tv, lv, gv, opt, scale);
  // With synchronize, a data error comes back as the call's status; split it as the others do.
  const bool arg_error = !st.ok() && std::string(st.detail).find("(device check)") == std::string::npos;
  if (arg_error) {
    rs.call = st;
    return rs;
  }
  rs.device = st;
  if (rs.device.code == tropd::errc::backend_error) {
    rs.cuda_error = -1;
    rs.where = rs.device.detail;
    return rs;
  }
  TROPD_TEST_CUDA(rs, d_loss.download(loss));
  TROPD_TEST_CUDA(rs, d_grad.download(grad));
  return rs;
}

namespace te = tropd::estimators;

#define TROPD_INSTANTIATE_SAMPLED(E, U, T)                                                                                   \
  template run_status gpu_sampled<te::E, te::U, T>(const te::sampled<te::E, te::U>&, const row_case&, const std::vector<T>&, \
                                                   const std::vector<T>&, const std::vector<int32_t>&,                      \
                                                   const std::vector<double>&, std::vector<double>&, std::vector<float>&);

TROPD_INSTANTIATE_SAMPLED(k1, as_pg_reward, float)
TROPD_INSTANTIATE_SAMPLED(k1, as_pg_reward, tropd::bf16)
TROPD_INSTANTIATE_SAMPLED(k2, as_loss, float)
TROPD_INSTANTIATE_SAMPLED(k3, as_loss, float)
TROPD_INSTANTIATE_SAMPLED(k3, as_pg_reward, float)
TROPD_INSTANTIATE_SAMPLED(k2, as_pg_reward, float)

template run_status gpu_topk<float>(const te::topk_forward_kl&, const row_case&, const std::vector<float>&,
                                    const std::vector<int32_t>&, const std::vector<float>&, tropd::index_t,
                                    std::vector<double>&, std::vector<float>&);
template run_status gpu_topk<tropd::bf16>(const te::topk_forward_kl&, const row_case&, const std::vector<tropd::bf16>&,
                                          const std::vector<int32_t>&, const std::vector<float>&, tropd::index_t,
                                          std::vector<double>&, std::vector<float>&);
template run_status gpu_topk_selected<float>(const te::topk_forward_kl&, const row_case&, const std::vector<float>&,
                                             const std::vector<float>&, std::vector<double>&, std::vector<float>&);
template run_status gpu_topk_selected<tropd::bf16>(const te::topk_forward_kl&, const row_case&, const std::vector<tropd::bf16>&,
                                                   const std::vector<tropd::bf16>&, std::vector<double>&, std::vector<float>&);
template run_status gpu_topk_selected<double>(const te::topk_forward_kl&, const row_case&, const std::vector<double>&,
                                              const std::vector<double>&, std::vector<double>&, std::vector<float>&);

}  // namespace tropd_gpu_test
