// tests/dist/mpi_rows.cpp: the MPI test of the distributed row level (ctest label mpi, run
// with mpirun -np 1, 2, 3 and 4 by scripts/test.sh's `dist` stage).
//
// For every way to factor the world into tensor x data groups (4 = 4 x 1, 2 x 2, 1 x 4;
// 3 = 3 x 1, 1 x 3; ...), every preset runs on its rank's vocabulary shard and rows through
// dist::evaluate_rows' split call with MPI communicators, and is compared with the
// single-process host::evaluate_rows on the whole batch: loss (summed over the data group),
// dL/dz of the rank's columns, per-token outputs, diagnostics, and the decisions (flags) bit
// for bit. Covered besides: uneven shards (V = 1003; shards of width 1), a shard holding none
// of the teacher's top-k, sampled ids on the last shard, a served teacher (log-probs and
// lists), fp64 logits, NaN logits under both input policies, data splits that cut sequences
// (deterministic regions), per-rank data options, threads.
// Exit status: 0 when every rank saw every case match.
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <tropd/dist/mpi.hpp>

#include "dist/cases.hpp"

using namespace tropd_dist_test;

namespace {

struct world {
  int rank = 0, size = 1;
};

/// Runs one case on this rank with MPI groups; returns its mismatches (0 on every rank, or
/// the rank's own count).
int run_case(const case_spec& spec, MPI_Comm tensor, MPI_Comm data, std::string& log) {
  auto c = make_case(spec);
  if (!c) {
    log += "  unknown preset " + spec.preset + "\n";
    return 1;
  }
  tropd::dist::mpi_communicator tc{tensor}, dc{data};
  tropd::dist::exchange ex;
  while (c->next(ex)) {
    const tropd::status s = ex.among == tropd::dist::group::tensor ? tc.all_gather(ex.send, ex.recv, ex.bytes)
                                                                   : dc.all_gather(ex.send, ex.recv, ex.bytes);
    if (!s.ok()) {
      log += "  " + s.message() + "\n";
      return 1;
    }
  }
  double loss = c->status_code() == 0 ? c->loss() : 0.0, sum = 0;
  MPI_Allreduce(&loss, &sum, 1, MPI_DOUBLE, MPI_SUM, data);
  return c->compare(sum, log);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  world w;
  MPI_Comm_rank(MPI_COMM_WORLD, &w.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &w.size);
  int failures = 0, cases = 0;
  std::string log;

  struct layout {
    int tp, dp;
  };
  std::vector<layout> layouts;
  for (int tp = w.size; tp >= 1; --tp)
    if (w.size % tp == 0) layouts.push_back({tp, w.size / tp});

  for (const layout& L : layouts) {
    const int t = w.rank % L.tp, d = w.rank / L.tp;
    MPI_Comm tensor, data;
    MPI_Comm_split(MPI_COMM_WORLD, d, t, &tensor);  // same rows, other columns
    MPI_Comm_split(MPI_COMM_WORLD, t, d, &data);    // same columns, other rows
    std::vector<case_spec> specs;
    auto base = [&](const std::string& preset) {
      case_spec s;
      s.preset = preset;
      s.tp_rank = t;
      s.tp_size = L.tp;
      s.dp_rank = d;
      s.dp_size = L.dp;
      return s;
    };
    for (const std::string& p : preset_names()) {
      specs.push_back(base(p));
      case_spec odd = base(p);  // shards of width 1 and 40 first
      odd.odd_shards = true;
      odd.with_s_old = true;
      specs.push_back(odd);
      if (L.dp > 1 && preset_deterministic(p)) {
        case_spec cut = base(p);  // sequences split across data ranks
        cut.split = data_split::rows;
        specs.push_back(cut);
      }
    }
    for (const char* p : {"opd", "tropd", "tropd_p_tail", "fkl_outlier", "mask_outlier", "reopold_2"}) {
      case_spec s = base(p);  // a served teacher: log-probs and top-8 lists
      s.served = true;
      specs.push_back(s);
    }
    for (const char* p : {"tropd", "gkd", "eopd", "tropd_p_tail"}) {
      case_spec s = base(p);
      s.fp64 = true;
      specs.push_back(s);
    }
    for (const char* p : {"tropd", "gkd"}) {
      case_spec s = base(p);
      s.mask_nan = true;
      specs.push_back(s);
      s.mask_nan = false;
      s.reject_nan = true;
      specs.push_back(s);
    }
    {
      case_spec s = base("entropy_opd");
      s.per_rank = true;
      specs.push_back(s);
      s = base("tropd");
      s.threads = 2;
      specs.push_back(s);
    }
    const char* only = std::getenv("TROPD_DIST_ONLY");  // a preset name: run only its cases
    for (const case_spec& s : specs) {
      if (only && *only && s.preset != only) continue;
      std::string one;
      const int bad = run_case(s, tensor, data, one);
      ++cases;
      if (bad) {
        ++failures;
        char head[256];
        std::snprintf(head, sizeof head, "rank %d FAIL %s (tp %d/%d, dp %d/%d%s%s%s%s%s%s%s):\n", w.rank, s.preset.c_str(), t, L.tp, d, L.dp,
                      s.odd_shards ? ", odd shards" : "", s.split == data_split::rows ? ", split sequences" : "", s.served ? ", served" : "",
                      s.fp64 ? ", fp64" : "", s.mask_nan ? ", mask NaN" : "", s.reject_nan ? ", reject NaN" : "", s.per_rank ? ", per rank" : "");
        log += head + one;
      }
    }
    MPI_Comm_free(&tensor);
    MPI_Comm_free(&data);
  }

  int total = 0;
  MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  // Every rank's log, in rank order.
  for (int r = 0; r < w.size; ++r) {
    if (r == w.rank && !log.empty()) std::fputs(log.c_str(), stdout);
    std::fflush(stdout);
    MPI_Barrier(MPI_COMM_WORLD);
  }
  if (w.rank == 0)
    std::printf("tropd-mpi-tests: %d rank(s), %d case(s) per rank, %d failed case run(s) over all ranks\n", w.size, cases, total);
  MPI_Finalize();
  return total == 0 ? 0 : 1;
}
