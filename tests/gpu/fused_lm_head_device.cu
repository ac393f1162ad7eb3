// Device side of the fused LM head tests (include/tropd/gpu/fused_lm_head.cuh): the cuBLASLt
// GEMM's row-major mapping, the transform kernels and the chunk loop, driven by a test
// evaluator (dL/dz = z), against a host computation. The CUDA backend's row-level objective
// (the real evaluator) is not on this branch: docs/fused_lm_head.md.
#include "gpu/fused_lm_head_device.hpp"

#include <cmath>
#include <random>
#include <vector>

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <tropd/gpu/fused_lm_head.cuh>
#include <tropd/objective.hpp>

namespace {

using tropd::index_t;

/// A chunk_row_evaluator that counts its calls and computes nothing (instantiation checks).
struct echo_evaluator {
  int begins = 0, stats = 0, n_chunk_stages = 0, n_batch_stages = 0, grads = 0, finishes = 0;
  tropd::status begin(int, cudaStream_t) { ++begins; return {}; }
  tropd::status statistics(index_t, index_t, const float*, index_t, const float*, index_t, cudaStream_t) { ++stats; return {}; }
  tropd::status chunk_stages(index_t, index_t, cudaStream_t) { ++n_chunk_stages; return {}; }
  tropd::status batch_stages(cudaStream_t) { ++n_batch_stages; return {}; }
  tropd::status gradient(index_t, index_t, const float*, index_t, const float*, index_t, float*, index_t, cudaStream_t) { ++grads; return {}; }
  tropd::status finish(cudaStream_t) { ++finishes; return {}; }
};
static_assert(tropd::gpu::chunk_row_evaluator<echo_evaluator>);

/// dL/dz = z: the gradient rows are the chunk's logits.
struct copy_evaluator : echo_evaluator {
  index_t V = 0;
  tropd::status gradient(index_t, index_t c, const float* z, index_t ldz, const float*, index_t, float* g, index_t ldg, cudaStream_t s) {
    ++grads;
    const cudaError_t e = cudaMemcpy2DAsync(g, size_t(ldg) * 4, z, size_t(ldz) * 4, size_t(V) * 4, size_t(c), cudaMemcpyDeviceToDevice, s);
    return e == cudaSuccess ? tropd::status{} : tropd::make_error(tropd::errc::backend_error, "copy");
  }
};
static_assert(tropd::gpu::chunk_row_evaluator<copy_evaluator>);

template <class Obj, class T, class O>
bool empty_call(const Obj& obj) {
  echo_evaluator ev;
  tropd::linear_head<T> h;
  tropd::gpu::device_teacher<T> t;
  const tropd::gpu::device_fused_outputs<O> out;
  const tropd::status st = tropd::gpu::fused_lm_head(obj, h, t, ev, out, 0, tropd::sweep_policy::automatic, false, {});
  return st.code == tropd::errc::empty_batch;
}

}  // namespace

int tropd_gpu_fused_compile_check() {
  namespace p = tropd::presets;
  bool ok = true;
  ok &= empty_call<p::fkl_outlier_objective, tropd::bf16, float>(p::tropd());
  ok &= empty_call<p::fkl_outlier_objective, tropd::bf16, tropd::bf16>(p::tropd());
  ok &= empty_call<p::reopold_objective, tropd::fp16, float>(p::reopold());
  ok &= empty_call<p::gkd_objective, float, float>(p::gkd());
  return ok ? 0 : -1;
}

int tropd_gpu_fused_echo_check(double* max_rel_err) {
  const index_t n = 10, H = 32, V = 70, chunk = 3;
  const tropd::logit_transform tf{0.7, 4.0};
  std::mt19937_64 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<tropd::bf16> h(static_cast<size_t>(n * H)), w(static_cast<size_t>(V * H)), b(static_cast<size_t>(V));
  for (auto& x : h) x = tropd::bf16::from_float(nd(rng));
  for (auto& x : w) x = tropd::bf16::from_float(0.5f * nd(rng));
  for (auto& x : b) x = tropd::bf16::from_float(nd(rng));
  const float prefill = 0.25f;
  std::vector<float> dw(static_cast<size_t>(V * H), prefill), db(static_cast<size_t>(V), prefill), dh(static_cast<size_t>(n * H), 777.f);

  tropd::bf16 *dh_ = nullptr, *dw_ = nullptr, *db_ = nullptr;
  float *gh = nullptr, *gw = nullptr, *gb = nullptr;
  void* scratch = nullptr;
  cublasLtHandle_t lt = nullptr;
  const tropd::gpu::device_fused_shape shape{n, V, 2, false, size_t(4) << 20};
  const size_t scratch_bytes = tropd::gpu::fused_scratch_bytes(shape, chunk);
  int rc = 0;
  auto cu = [&](cudaError_t e) {
    if (e != cudaSuccess && rc == 0) rc = int(e);
  };
  cu(cudaMalloc(&dh_, h.size() * 2));
  cu(cudaMalloc(&dw_, w.size() * 2));
  cu(cudaMalloc(&db_, b.size() * 2));
  cu(cudaMalloc(&gh, dh.size() * 4));
  cu(cudaMalloc(&gw, dw.size() * 4));
  cu(cudaMalloc(&gb, db.size() * 4));
  cu(cudaMalloc(&scratch, scratch_bytes));
  if (rc == 0 && cublasLtCreate(&lt) != CUBLAS_STATUS_SUCCESS) rc = 1;
  if (rc == 0) {
    cu(cudaMemcpy(dh_, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
    cu(cudaMemcpy(dw_, w.data(), w.size() * 2, cudaMemcpyHostToDevice));
    cu(cudaMemcpy(db_, b.data(), b.size() * 2, cudaMemcpyHostToDevice));
    cu(cudaMemcpy(gw, dw.data(), dw.size() * 4, cudaMemcpyHostToDevice));
    cu(cudaMemcpy(gb, db.data(), db.size() * 4, cudaMemcpyHostToDevice));
  }
  if (rc == 0) {
    copy_evaluator ev;
    ev.V = V;
    const tropd::linear_head<tropd::bf16> head{tropd::make_matrix<const tropd::bf16>(dh_, n, H), tropd::make_matrix<const tropd::bf16>(dw_, V, H),
                                              {db_, V}, tf};
    const tropd::gpu::device_fused_outputs<float> out{tropd::make_matrix(gh, n, H), tropd::make_matrix(gw, V, H), {gb, V}};
    const tropd::gpu::fused_device_context ctx{scratch, scratch_bytes, nullptr, lt, size_t(4) << 20};
    const tropd::status st = tropd::gpu::fused_lm_head(tropd::presets::tropd(), head, tropd::gpu::device_teacher<tropd::bf16>{}, ev, out, chunk,
                                                       tropd::sweep_policy::automatic, false, ctx);
    if (!st.ok() || ev.grads != 4 || ev.n_chunk_stages != 4 || ev.finishes != 1) rc = -1;
    cu(cudaDeviceSynchronize());
    cu(cudaMemcpy(dh.data(), gh, dh.size() * 4, cudaMemcpyDeviceToHost));
    cu(cudaMemcpy(dw.data(), gw, dw.size() * 4, cudaMemcpyDeviceToHost));
    cu(cudaMemcpy(db.data(), gb, db.size() * 4, cudaMemcpyDeviceToHost));
  }
  if (rc == 0) {
    // Host: z = tf(h w^T + b), gx = z tf'(z) (dL/dz = z), rounded to bf16 for the GEMMs as the device does.
    std::vector<double> gx(static_cast<size_t>(n * V)), gx_f(static_cast<size_t>(n * V));
    for (index_t r = 0; r < n; ++r)
      for (index_t j = 0; j < V; ++j) {
        double x = b[size_t(j)].to_float();
        for (index_t k = 0; k < H; ++k) x += double(h[size_t(r * H + k)].to_float()) * double(w[size_t(j * H + k)].to_float());
        const double z = tf.forward(x);
        gx_f[size_t(r * V + j)] = z * tf.derivative(z);
        gx[size_t(r * V + j)] = tropd::bf16::from_float(float(gx_f[size_t(r * V + j)])).to_float();
      }
    double err = 0;
    auto rel = [&](const std::vector<double>& want, const std::vector<float>& got, double offset) {
      double scale = 1e-30, d = 0;
      for (size_t i = 0; i < want.size(); ++i) scale = std::max(scale, std::fabs(want[i]));
      for (size_t i = 0; i < want.size(); ++i) d = std::max(d, std::fabs(double(got[i]) - offset - want[i]));
      err = std::max(err, d / scale);
    };
    std::vector<double> wh(static_cast<size_t>(n * H)), ww(static_cast<size_t>(V * H)), wb(static_cast<size_t>(V));
    for (index_t r = 0; r < n; ++r)
      for (index_t k = 0; k < H; ++k)
        for (index_t j = 0; j < V; ++j) wh[size_t(r * H + k)] += gx[size_t(r * V + j)] * w[size_t(j * H + k)].to_float();
    for (index_t j = 0; j < V; ++j)
      for (index_t r = 0; r < n; ++r) {
        wb[size_t(j)] += gx_f[size_t(r * V + j)];
        for (index_t k = 0; k < H; ++k) ww[size_t(j * H + k)] += gx[size_t(r * V + j)] * h[size_t(r * H + k)].to_float();
      }
    rel(wh, dh, 0);
    rel(ww, dw, prefill);
    rel(wb, db, prefill);
    if (max_rel_err) *max_rel_err = err;
    if (!(err < 2e-2)) rc = -1;  // fp32 logits vs double, bf16 dL/dx
  }
  if (lt) cublasLtDestroy(lt);
  cudaFree(dh_);
  cudaFree(dw_);
  cudaFree(db_);
  cudaFree(gh);
  cudaFree(gw);
  cudaFree(gb);
  cudaFree(scratch);
  return rc;
}
