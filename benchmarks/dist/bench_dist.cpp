// benchmarks/dist/bench_dist.cpp: cost of the vocabulary-sharded row level per call, with MPI.
//
//   cmake -S . -B build/dist -DTROPD_BUILD_DIST_TESTS=ON && cmake --build build/dist --target tropd-bench-dist
//   mpirun -np P build/dist/bin/tropd-bench-dist [N] [V] [reps]     (defaults 256 151936 5)
//
// Every rank holds the columns [r V / P, (r + 1) V / P) of N rows of fp32 student and teacher
// logits (a tensor group of P ranks, no data group). Per preset it reports, over `reps` calls
// (median): the bytes each rank sends per call (record exchange + second-pass exchange) and
// receives, the number of collectives, the time per call and the part spent inside the
// collectives, and, measured on rank 0 in the same run (the other ranks wait at a barrier),
// the single-process host::evaluate_rows on the whole [N x V] rows as the baseline. Ranks
// that wait sleep (quiet_barrier) so that they do not take an oversubscribed core. A last
// line gives the latency of one small all-gather here (what each extra sequential collective
// of a multi-collective design costs).
#include <mpi.h>

#include <stdint.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <tropd/dist/mpi.hpp>
#include <tropd/dist/rows.hpp>
#include <tropd/tropd.hpp>

namespace dist = tropd::dist;
namespace host = tropd::host;
using tropd::index_t;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

/// A barrier whose waiting ranks sleep instead of polling (on an oversubscribed machine a
/// polling rank takes the core of the rank it waits for).
void quiet_barrier(MPI_Comm comm) {
  MPI_Request req;
  MPI_Ibarrier(comm, &req);
  for (int done = 0;;) {
    MPI_Test(&req, &done, MPI_STATUS_IGNORE);
    if (done) return;
    struct timespec ts{0, 200000};
    nanosleep(&ts, nullptr);
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

/// A cheap deterministic generator (xorshift64*), uniform in [-1, 1).
struct rng {
  uint64_t s;
  double next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return double((s * 2685821657736338717ull) >> 11) * 0x1.0p-52 - 1.0;
  }
};

/// Columns [v0, v1) of N rows of student and teacher logits (seeded by the column, so any
/// sharding sees the same numbers).
void fill(std::vector<float>& z, std::vector<float>& u, index_t N, index_t v0, index_t v1) {
  const index_t W = v1 - v0;
  z.resize(size_t(N * W));
  u.resize(size_t(N * W));
  for (index_t r = 0; r < N; ++r) {
    rng g{0x9e3779b97f4a7c15ull ^ uint64_t(r * 1000003 + v0)};
    for (index_t j = 0; j < W; ++j) {
      const double a = 3.0 * g.next();
      z[size_t(r * W + j)] = float(a);
      u[size_t(r * W + j)] = float(a + 1.5 * g.next());
    }
  }
}

struct batch {
  std::vector<int32_t> ids;
  std::vector<tropd::origin> from;
  std::vector<index_t> off;
};

batch make_batch(index_t N, index_t V) {
  batch b;
  rng g{12345};
  for (index_t r = 0; r < N; ++r) {
    b.ids.push_back(int32_t(std::min<double>(double(V - 1), (g.next() + 1.0) * 0.5 * double(V))));
    b.from.push_back(r % 32 == 0 ? tropd::origin::prompt : (r % 32 < 4 ? tropd::origin::teacher : tropd::origin::student));
  }
  for (index_t r = 0; r <= N; r += 32) b.off.push_back(r);
  if (b.off.back() != N) b.off.push_back(N);
  return b;
}

template <class Obj>
void bench(const char* name, const Obj& obj, index_t N, index_t V, int reps, int rank, int P, MPI_Comm comm) {
  const dist::vocab_shard sh{V * rank / P, V * (rank + 1) / P, V};
  std::vector<float> z, u, g(size_t(N * sh.width()));
  fill(z, u, N, sh.v0, sh.v1);
  const batch b = make_batch(N, V);
  const host::row_inputs in{.ids = tropd::view_of(b.ids), .from = tropd::view_of(b.from), .seq_offsets = tropd::view_of(b.off)};
  double loss = 0;
  const host::row_outputs<float> out{.grad = tropd::make_matrix(g.data(), N, sh.width()), .loss = &loss};
  const host::eval_options opt{.seed = 1, .step = 1};
  dist::mpi_communicator tc{comm};
  std::vector<double> t_call, t_comm;
  size_t sent = 0;
  int collectives = 0;
  for (int it = 0; it < reps + 1; ++it) {  // the first call warms up (page faults, scratch)
    quiet_barrier(comm);
    const double t0 = now();
    double tc_sum = 0;
    dist::rows_call<Obj, float, tropd::matrix_view<const float>, float> call(
        obj, tropd::make_matrix<const float>(z.data(), N, sh.width()), tropd::make_matrix<const float>(u.data(), N, sh.width()), in, out, opt,
        dist::shard_options{.shard = sh}, dist::group_layout{rank, P});
    dist::exchange ex;
    size_t s = 0;
    int c = 0;
    while (call.next(ex)) {
      const double a = now();
      if (!tc.all_gather(ex.send, ex.recv, ex.bytes).ok()) MPI_Abort(comm, 2);
      tc_sum += now() - a;
      ++c;
    }
    for (size_t x : call.tensor_exchange_bytes()) s += x;  // also for P = 1 (nothing sent)
    if (P == 1) c = int(call.tensor_exchange_bytes().size());
    if (!call.result().ok()) {
      std::fprintf(stderr, "rank %d: %s\n", rank, call.result().message().c_str());
      MPI_Abort(comm, 1);
    }
    const double t1 = now();
    if (it > 0) {
      t_call.push_back(t1 - t0);
      t_comm.push_back(tc_sum);
    }
    sent = s;
    collectives = c;
  }
  // The record exchange alone (same bytes, after a barrier: transfer without the wait for
  // a slower rank's pass 1).
  double alone = 0;
  if (P > 1) {
    std::vector<unsigned char> sb(sent), rb(sent * size_t(P));
    std::vector<double> ta;
    for (int it = 0; it < 20; ++it) {
      quiet_barrier(comm);
      const double a = now();
      if (!tc.all_gather(sb.data(), rb.data(), sb.size()).ok()) MPI_Abort(comm, 2);
      ta.push_back(now() - a);
    }
    const double m = median(ta);
    MPI_Reduce(&m, &alone, 1, MPI_DOUBLE, MPI_MAX, 0, comm);
  }
  // The slowest rank decides the call's time.
  double mc = median(t_call), mm = median(t_comm), call_max = 0, comm_max = 0;
  MPI_Reduce(&mc, &call_max, 1, MPI_DOUBLE, MPI_MAX, 0, comm);
  MPI_Reduce(&mm, &comm_max, 1, MPI_DOUBLE, MPI_MAX, 0, comm);
  z.clear();
  u.clear();
  z.shrink_to_fit();
  u.shrink_to_fit();
  g.clear();
  g.shrink_to_fit();
  // The single-process baseline on rank 0 (the whole rows), the others waiting.
  double base = 0;
  if (rank == 0) {
    std::vector<float> zf, uf, gf(size_t(N * V));
    fill(zf, uf, N, 0, V);
    double l = 0;
    std::vector<double> tb;
    for (int it = 0; it < reps + 1; ++it) {
      const double t0 = now();
      const tropd::status st = host::evaluate_rows(obj, tropd::make_matrix<const float>(zf.data(), N, V),
                                                   tropd::make_matrix<const float>(uf.data(), N, V), in,
                                                   host::row_outputs<float>{.grad = tropd::make_matrix(gf.data(), N, V), .loss = &l}, opt);
      if (!st.ok()) std::fprintf(stderr, "baseline: %s\n", st.message().c_str());
      if (it > 0) tb.push_back(now() - t0);
    }
    base = median(tb);
  }
  quiet_barrier(comm);
  if (rank == 0)
    std::printf("%-12s P=%d  collectives %d%s  sent/rank %7.1f KiB (%4.0f B/row)  received/rank %7.1f KiB  call %7.2f ms  "
                "in collectives %6.2f ms  exchange alone %6.2f ms  single-process %7.2f ms\n",
                name, P, collectives, P == 1 ? " (none run)" : "", double(sent) / 1024, double(sent) / double(N), double(sent) * P / 1024,
                call_max * 1e3, comm_max * 1e3, alone * 1e3, base * 1e3);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  const index_t N = argc > 1 ? std::atoll(argv[1]) : 256;
  const index_t V = argc > 2 ? std::atoll(argv[2]) : 151936;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 5;
  if (rank == 0) std::printf("tropd-bench-dist: N = %lld rows, V = %lld, fp32 logits, %d rank(s), median of %d calls\n", N, V, P, reps);
  bench("tropd k=64", tropd::presets::tropd(), N, V, reps, rank, P, MPI_COMM_WORLD);
  bench("opd", tropd::presets::opd(), N, V, reps, rank, P, MPI_COMM_WORLD);
  bench("gkd (jsd)", tropd::presets::gkd(), N, V, reps, rank, P, MPI_COMM_WORLD);
  // Latency of one small all-gather (8 bytes per rank).
  {
    double x = rank, y[64];
    std::vector<double> t;
    for (int i = 0; i < 200; ++i) {
      MPI_Barrier(MPI_COMM_WORLD);
      const double t0 = now();
      MPI_Allgather(&x, 1, MPI_DOUBLE, y, 1, MPI_DOUBLE, MPI_COMM_WORLD);
      t.push_back(now() - t0);
    }
    double m = median(t), mx = 0;
    MPI_Reduce(&m, &mx, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    if (rank == 0) std::printf("one 8-byte all-gather: %.1f us (median of 200)\n", mx * 1e6);
  }
  MPI_Finalize();
  return 0;
}
