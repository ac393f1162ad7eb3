// tests/dist/problem.hpp: the batch the distributed tests shard (MPI ranks, torch.distributed
// processes) and compare with one process, and the helpers that cut a rank's part of it.
// Test-only; generated from a seed with the same result in every process.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <tropd/dist/rows.hpp>
#include <tropd/tropd.hpp>

namespace tropd_dist_test {

using tropd::index_t;
using tropd::origin;

/// A batch of rows with the features the sharded path must get right: uneven shards (V not
/// divisible by the rank count), rows whose teacher top-k lies in the first shard only, sampled
/// ids on the last shard, peaked students (tiny top-k tails), outliers (teacher gives y little
/// mass), prompt / teacher-prefix / student rows in several sequences.
struct problem {
  index_t n = 0, V = 0;
  std::vector<float> z, u;          // [n x V]
  std::vector<int32_t> ids;         // [n]
  std::vector<origin> from;         // [n]
  std::vector<index_t> off;         // [n_seq + 1]
  std::vector<uint64_t> seq_ids;    // [n_seq] global ids (0..n_seq-1: a single process's default)
  std::vector<double> s_old, ref;   // [n] rollout-time log-probs (rho != 1) and reference log-probs
  std::vector<double> t;            // [n] the teacher's log p_T(y) (a served teacher)
  index_t K_lists = 0;              // width of the given lists below
  std::vector<int32_t> list_ids;    // [n x K_lists] the teacher's top-K_lists ids (descending)
  std::vector<double> list_lp;      // [n x K_lists] their teacher log-probs

  index_t n_seq() const { return static_cast<index_t>(off.size()) - 1; }
};

inline double lse_row(const float* x, index_t V) {
  double m = -INFINITY;
  for (index_t j = 0; j < V; ++j) m = std::max(m, double(x[j]));
  double s = 0;
  for (index_t j = 0; j < V; ++j) s += std::exp(double(x[j]) - m);
  return m + std::log(s);
}

/// The batch. `seq_len`: lengths of the sequences (each: 1 prompt token, 1-2 teacher-prefix
/// tokens where long enough, the rest student samples).
inline problem make_problem(index_t V, uint64_t seed, std::vector<index_t> seq_len = {5, 3, 6, 4, 2, 4}, index_t K_lists = 8) {
  problem p;
  p.V = V;
  std::mt19937_64 g(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_int_distribution<int32_t> uid(0, int32_t(V - 1));
  p.off.push_back(0);
  for (index_t L : seq_len) {
    for (index_t i = 0; i < L; ++i) p.from.push_back(i == 0 ? origin::prompt : (i <= (L >= 5 ? 2 : 1) && L >= 4 ? origin::teacher : origin::student));
    p.off.push_back(p.off.back() + L);
  }
  p.n = p.off.back();
  for (index_t j = 0; j < p.n_seq(); ++j) p.seq_ids.push_back(uint64_t(j));
  const index_t n = p.n;
  p.z.resize(size_t(n * V));
  p.u.resize(size_t(n * V));
  p.ids.resize(size_t(n));
  for (index_t r = 0; r < n; ++r) {
    float* z = p.z.data() + r * V;
    float* u = p.u.data() + r * V;
    for (index_t j = 0; j < V; ++j) {
      z[j] = float(2.0 * nd(g));
      u[j] = float(z[j] + 1.5 * nd(g));
    }
    int32_t y = uid(g);
    switch (r % 7) {
      case 0: y = int32_t(V - 1 - (r % 3)); break;  // the last shard owns y
      case 1:                                       // the teacher's top-k lies in [0, 40)
        for (index_t j = 0; j < std::min<index_t>(40, V); ++j) u[j] += 14.0f;
        break;
      case 2: z[y] += 25.0f; break;                 // a peaked student: a tiny top-k tail
      case 3: u[y] -= 12.0f; break;                 // an outlier: R << 0
      case 4: u[y] += 6.0f; break;                  // R > 0
      default: break;
    }
    p.ids[size_t(r)] = y;
  }
  // Sampled-token values of a reference run (double, naive): rollout-time log-probs (rho != 1,
  // some PPO clips) and reference-model log-probs, and the served teacher's t and lists.
  p.K_lists = K_lists;
  p.list_ids.assign(size_t(n * K_lists), -1);
  p.list_lp.assign(size_t(n * K_lists), -INFINITY);
  for (index_t r = 0; r < n; ++r) {
    const float* z = p.z.data() + r * V;
    const float* u = p.u.data() + r * V;
    const double ls = lse_row(z, V), lt = lse_row(u, V);
    const int32_t y = p.ids[size_t(r)];
    const double s = double(z[y]) - ls;
    p.s_old.push_back(s + 0.3 * nd(g));
    p.ref.push_back(double(u[y]) - lt + 0.5 * nd(g));
    p.t.push_back(double(u[y]) - lt);
    std::vector<int32_t> order(static_cast<size_t>(V));
    for (index_t j = 0; j < V; ++j) order[size_t(j)] = int32_t(j);
    std::partial_sort(order.begin(), order.begin() + K_lists, order.end(),
                      [&](int32_t a, int32_t b) { return u[a] > u[b] || (u[a] == u[b] && a < b); });
    for (index_t k = 0; k < K_lists; ++k) {
      p.list_ids[size_t(r * K_lists + k)] = order[size_t(k)];
      p.list_lp[size_t(r * K_lists + k)] = double(u[order[size_t(k)]]) - lt;
    }
  }
  return p;
}

/// Shard boundaries: Megatron's even split (rank r: [r V / P, (r + 1) V / P)).
inline tropd::dist::vocab_shard even_shard(index_t V, int rank, int size) {
  return {V * rank / size, V * (rank + 1) / size, V};
}

/// A rank's part of the batch along the data dimension: rows [r0, r1) with their sequences
/// (offsets re-based, global sequence ids kept).
struct row_slice {
  index_t r0 = 0, r1 = 0;
  std::vector<index_t> off;
  std::vector<uint64_t> seq_ids;
  index_t n() const { return r1 - r0; }
};

/// Rows [r0, r1) of p; sequences cut at r0 / r1 keep their global id.
inline row_slice slice_rows(const problem& p, index_t r0, index_t r1) {
  row_slice s;
  s.r0 = r0;
  s.r1 = r1;
  s.off.push_back(0);
  for (index_t j = 0; j < p.n_seq(); ++j) {
    const index_t a = std::max(p.off[size_t(j)], r0), b = std::min(p.off[size_t(j + 1)], r1);
    if (a >= b) continue;
    s.off.push_back(b - r0);
    s.seq_ids.push_back(p.seq_ids[size_t(j)]);
  }
  return s;
}

/// Whole sequences [j0, j1) of p.
inline row_slice slice_sequences(const problem& p, index_t j0, index_t j1) {
  return slice_rows(p, p.off[size_t(j0)], p.off[size_t(j1)]);
}

}  // namespace tropd_dist_test
