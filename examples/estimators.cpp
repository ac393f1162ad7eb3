// examples/estimators.cpp: evaluates every divergence estimator on one small random batch
// and prints a table (value of the batch mean, and the gradient's max-abs entry).
//
//   build/release/examples/tropd-example-estimators [rows] [vocab] [seed]
#include <tropd/tropd.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace {

struct row_result {
  std::string name;
  double mean_value = 0;
  double max_abs_grad = 0;
  tropd::status st;
};

template <class F>
row_result run(const char* name, tropd::index_t N, tropd::index_t V, F&& f) {
  std::vector<double> loss(static_cast<size_t>(N));
  std::vector<float> grad(static_cast<size_t>(N * V));
  row_result r;
  r.name = name;
  r.st = f(tropd::view_of(loss), tropd::make_matrix(grad.data(), N, V));
  for (double x : loss) r.mean_value += x / double(N);
  for (float g : grad) r.max_abs_grad = std::max(r.max_abs_grad, double(std::fabs(g)));
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace tropd;
  const index_t N = argc > 1 ? std::atoll(argv[1]) : 8;
  const index_t V = argc > 2 ? std::atoll(argv[2]) : 32000;
  const unsigned seed = argc > 3 ? static_cast<unsigned>(std::atoi(argv[3])) : 1u;

  // Student and teacher logits that differ: the teacher is the student plus noise.
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 2.f);
  std::vector<float> zs(static_cast<size_t>(N * V)), zt(static_cast<size_t>(N * V));
  for (size_t i = 0; i < zs.size(); ++i) {
    zs[i] = nd(rng);
    zt[i] = zs[i] + 0.7f * nd(rng);
  }
  std::vector<int32_t> ids(static_cast<size_t>(N));
  std::uniform_int_distribution<int32_t> ud(0, static_cast<int32_t>(V - 1));
  for (auto& y : ids) y = ud(rng);

  const auto S = make_matrix<const float>(zs.data(), N, V);
  const auto T = make_matrix<const float>(zt.data(), N, V);
  const vector_view<const int32_t> Y{ids.data(), N};
  using namespace tropd::estimators;

  std::vector<row_result> rows;
  rows.push_back(run("reverse_kl", N, V, [&](auto l, auto g) { return host::divergence_rows(reverse_kl{}, S, T, l, g); }));
  rows.push_back(run("forward_kl", N, V, [&](auto l, auto g) { return host::divergence_rows(forward_kl{}, S, T, l, g); }));
  rows.push_back(run("jsd(0.5)", N, V, [&](auto l, auto g) { return host::divergence_rows(jsd{0.5}, S, T, l, g); }));
  rows.push_back(run("jsd(0.1)", N, V, [&](auto l, auto g) { return host::divergence_rows(jsd{0.1}, S, T, l, g); }));
  rows.push_back(run("total_variation", N, V, [&](auto l, auto g) { return host::divergence_rows(total_variation{}, S, T, l, g); }));
  rows.push_back(run("top64_fkl(raw)", N, V, [&](auto l, auto g) {
    return host::topk_forward_kl_rows(topk_forward_kl{64, topk_tail::raw}, S, T, l, g);
  }));
  rows.push_back(run("top64_fkl(renorm)", N, V, [&](auto l, auto g) {
    return host::topk_forward_kl_rows(topk_forward_kl{64, topk_tail::renormalised}, S, T, l, g);
  }));
  rows.push_back(run("top64_fkl(tail)", N, V, [&](auto l, auto g) {
    return host::topk_forward_kl_rows(topk_forward_kl{64, topk_tail::tail_bucket}, S, T, l, g);
  }));
  rows.push_back(run("k1 as PG reward", N, V, [&](auto l, auto g) {
    return host::sampled_rows(sampled<k1, as_pg_reward>{}, S, T, Y, {}, l, g);
  }));
  rows.push_back(run("k2 as loss", N, V, [&](auto l, auto g) { return host::sampled_rows(sampled<k2, as_loss>{}, S, T, Y, {}, l, g); }));
  rows.push_back(run("k3 as loss", N, V, [&](auto l, auto g) { return host::sampled_rows(sampled<k3, as_loss>{}, S, T, Y, {}, l, g); }));

  std::printf("tropd %s: %lld rows x %lld vocabulary, seed %u\n\n", TROPD_VERSION_STRING, static_cast<long long>(N),
              static_cast<long long>(V), seed);
  std::printf("%-20s %14s %14s  %s\n", "estimator", "mean value", "max |dL/dz|", "status");
  for (const auto& r : rows)
    std::printf("%-20s %14.6g %14.6g  %s\n", r.name.c_str(), r.mean_value, r.max_abs_grad, r.st.ok() ? "ok" : r.st.message().c_str());
  std::printf("\n(k1 as a PG reward reports the surrogate -rho*A at rho = 1, i.e. -(t - s) per token.)\n");
  for (const auto& r : rows)
    if (!r.st.ok()) return 1;
  return 0;
}
