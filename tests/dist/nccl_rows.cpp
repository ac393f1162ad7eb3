// tests/dist/nccl_rows.cpp: the host half of tests/dist/nccl_check.cu (host code, compiled by
// the host compiler): nccl_host_staging's collectives and a dist::evaluate_rows call with it.
#include <cuda_runtime.h>
#include <nccl.h>

#include <cmath>
#include <vector>

#include <tropd/dist/nccl.cuh>
#include <tropd/dist/rows.hpp>
#include <tropd/tropd.hpp>

namespace dist = tropd::dist;

int nccl_rows_check(ncclComm_t comm, cudaStream_t stream) {
  int bad = 0;
  dist::nccl_host_staging hs{dist::nccl_communicator{comm, stream}};
  static_assert(dist::host_communicator<dist::nccl_host_staging>);
  const double in3[3] = {1.5, -2.0, 4.0};
  double out3[3] = {0, 0, 0}, red[3] = {0, 0, 0};
  bad += !dist::all_gather(hs, in3, out3, 3).ok();
  bad += !dist::all_reduce(hs, in3, red, 3, dist::reduce_op::max).ok();
  for (int i = 0; i < 3; ++i) bad += out3[i] != in3[i] || red[i] != in3[i];

  const tropd::index_t n = 3, V = 50;
  std::vector<float> z(size_t(n * V)), u(size_t(n * V));
  for (size_t i = 0; i < z.size(); ++i) {
    z[i] = float(std::sin(0.37 * double(i)));
    u[i] = float(std::cos(0.11 * double(i)));
  }
  const std::vector<int32_t> ids = {3, 17, 49};
  const std::vector<tropd::origin> from = {tropd::origin::student, tropd::origin::student, tropd::origin::teacher};
  const std::vector<tropd::index_t> off = {0, 3};
  const tropd::host::row_inputs in{.ids = tropd::view_of(ids), .from = tropd::view_of(from), .seq_offsets = tropd::view_of(off)};
  std::vector<float> g1(size_t(n * V)), g2(size_t(n * V));
  double l1 = 0, l2 = 0;
  const auto obj = tropd::presets::tropd({.k = 8});
  const auto zs = tropd::make_matrix<const float>(z.data(), n, V), us = tropd::make_matrix<const float>(u.data(), n, V);
  bad += !tropd::host::evaluate_rows(obj, zs, us, in, tropd::host::row_outputs<float>{.grad = tropd::make_matrix(g1.data(), n, V), .loss = &l1},
                                     {.seed = 1})
              .ok();
  bad += !dist::evaluate_rows(obj, zs, us, in, tropd::host::row_outputs<float>{.grad = tropd::make_matrix(g2.data(), n, V), .loss = &l2},
                              {.seed = 1}, dist::shard_options{.shard = {0, V, V}}, hs)
              .ok();
  bad += std::fabs(l1 - l2) > 1e-6 * std::fabs(l1) + 1e-9;
  for (size_t i = 0; i < g1.size(); ++i) bad += std::fabs(g1[i] - g2[i]) > 1e-6f;
  return bad;
}
