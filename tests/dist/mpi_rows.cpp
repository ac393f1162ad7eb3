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

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <tropd/dist/mpi.hpp>

#include "dist/cases.hpp"
#include "dist/problem.hpp"

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

/// dist::evaluate_tokens over the world as a data group (sequences split by rank) against
/// host::evaluate_tokens on the whole batch: the normaliser and the batch decisions.
template <class Obj>
int token_level(const char* name, const Obj& obj, uint64_t step, bool cut_sequences, const world& w, std::string& log) {
  namespace host = tropd::host;
  const problem p = make_problem(1003, 11);
  const index_t n = p.n;
  std::vector<double> s(static_cast<size_t>(n)), t(p.t), hs(static_cast<size_t>(n));
  for (index_t r = 0; r < n; ++r) {
    const float* z = p.z.data() + r * p.V;
    const double ls = lse_row(z, p.V);
    s[size_t(r)] = double(z[p.ids[size_t(r)]]) - ls;
    double h = 0;
    for (index_t j = 0; j < p.V; ++j) {
      const double lp = double(z[j]) - ls;
      h -= std::exp(lp) * lp;
    }
    hs[size_t(r)] = h;
  }
  auto batch = [&](index_t r0, index_t r1, const std::vector<index_t>& off, const std::vector<uint64_t>& ids) {
    tropd::token_batch b;
    b.s = tropd::values_view(s.data() + r0, r1 - r0);
    b.s_old = tropd::values_view(p.s_old.data() + r0, r1 - r0);
    b.t = tropd::values_view(t.data() + r0, r1 - r0);
    b.from = {p.from.data() + r0, r1 - r0};
    b.seq_offsets = {off.data(), index_t(off.size())};
    b.seq_ids = {ids.data(), index_t(ids.size())};
    b.student_entropy = tropd::values_view(hs.data() + r0, r1 - r0);
    return b;
  };
  const host::eval_options opt{.seed = 5, .step = step};
  std::vector<double> dref(static_cast<size_t>(n));
  std::vector<uint8_t> fref(static_cast<size_t>(n));
  double lref = 0;
  tropd::diagnostics dgref;
  const tropd::status st0 =
      host::evaluate_tokens(obj, batch(0, n, p.off, p.seq_ids), tropd::token_outputs{&lref, &dgref, dref, {}, {}, tropd::view_of(fref)}, opt);
  const index_t S = p.n_seq();
  const row_slice sl = cut_sequences ? slice_rows(p, n * w.rank / w.size, n * (w.rank + 1) / w.size)
                                     : slice_sequences(p, S * w.rank / w.size, S * (w.rank + 1) / w.size);
  std::vector<double> d(size_t(sl.n()));
  std::vector<uint8_t> f(size_t(sl.n()));
  double l = 0;
  tropd::diagnostics dg;
  tropd::dist::mpi_communicator dc{MPI_COMM_WORLD};
  const tropd::status st = tropd::dist::evaluate_tokens(obj, batch(sl.r0, sl.r1, sl.off, sl.seq_ids),
                                                        tropd::token_outputs{&l, &dg, d, {}, {}, tropd::view_of(f)}, opt, dc);
  int bad = 0;
  std::string msg;
  if (!st0.ok() || !st.ok()) {
    ++bad;
    msg += "  status " + st.message() + " / single process " + st0.message() + "\n";
  } else {
    double sum = 0;
    MPI_Allreduce(&l, &sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    if (std::fabs(sum - lref) > 1e-12 * std::fabs(lref) + 1e-15) ++bad, msg += "  loss differs\n";
    if (dg.normaliser != dgref.normaliser) ++bad, msg += "  normaliser differs\n";
    for (index_t i = 0; i < sl.n(); ++i) {
      if (f[size_t(i)] != fref[size_t(sl.r0 + i)]) ++bad, msg += "  flags of token " + std::to_string(sl.r0 + i) + "\n";
      if (std::fabs(d[size_t(i)] - dref[size_t(sl.r0 + i)]) > 1e-15) ++bad, msg += "  dL/ds of token " + std::to_string(sl.r0 + i) + "\n";
    }
  }
  if (bad) log += "rank " + std::to_string(w.rank) + " FAIL token level " + name + (cut_sequences ? " (split sequences)" : "") + ":\n" + msg;
  return bad ? 1 : 0;
}

/// Misuse that every rank must report alike: shards that do not partition [0, V), and one
/// rank's bad output shape (every rank names it).
int consistency(const world& w, std::string& log) {
  namespace host = tropd::host;
  const index_t n = 4, V = 10 * w.size;
  std::vector<float> z(size_t(n * V), 0.5f), u(size_t(n * V), 0.25f);
  const std::vector<int32_t> ids = {1, 2, 3, int32_t(V - 1)};
  const std::vector<tropd::origin> from(4, tropd::origin::student);
  const std::vector<index_t> off = {0, 4};
  const host::row_inputs in{.ids = tropd::view_of(ids), .from = tropd::view_of(from), .seq_offsets = tropd::view_of(off)};
  tropd::dist::mpi_communicator tc{MPI_COMM_WORLD};
  int bad = 0;
  // 1. Overlapping shards (each rank claims [0, 10)).
  {
    std::vector<float> g(size_t(n * 10));
    double loss = 0;
    const tropd::status st = tropd::dist::evaluate_rows(
        tropd::presets::opd(), tropd::make_matrix<const float>(z.data(), n, 10, V), tropd::make_matrix<const float>(u.data(), n, 10, V), in,
        host::row_outputs<float>{.grad = tropd::make_matrix(g.data(), n, 10), .loss = &loss}, {}, {.shard = {0, 10, V}}, tc);
    const bool expect_error = w.size > 1;
    if (expect_error != (st.code == tropd::errc::shape_mismatch)) ++bad, log += "  overlapping shards: " + st.message() + "\n";
  }
  // 2. Rank 0's gradient has the wrong shape: every rank fails, naming rank 0.
  {
    const tropd::dist::vocab_shard sh{10 * w.rank, 10 * (w.rank + 1), V};
    std::vector<float> g(size_t(n * 10));
    double loss = 0;
    const index_t gcols = w.rank == 0 ? 9 : 10;
    const tropd::status st = tropd::dist::evaluate_rows(
        tropd::presets::tropd({.k = 4}), tropd::make_matrix<const float>(z.data() + sh.v0, n, 10, V),
        tropd::make_matrix<const float>(u.data() + sh.v0, n, 10, V), in,
        host::row_outputs<float>{.grad = tropd::make_matrix(g.data(), n, gcols), .loss = &loss}, {}, {.shard = sh}, tc);
    const std::string m = st.message();
    if (st.code != tropd::errc::shape_mismatch || (w.size > 1 && m.find("tensor-parallel rank 0") == std::string::npos))
      ++bad, log += "  one rank's bad gradient shape: " + m + "\n";
  }
  if (bad) log = "rank " + std::to_string(w.rank) + " FAIL consistency:\n" + log;
  return bad ? 1 : 0;
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

  // The token level over the world as one data group, and misuse every rank reports alike.
  {
    const char* only = std::getenv("TROPD_DIST_ONLY");
    if (!only || !*only) {
      for (bool cut : {false, true}) {
        failures += token_level("entropy_opd", tropd::presets::entropy_opd(), 3, cut, w, log);
        failures += token_level("reopold phase II", tropd::presets::reopold(), 150, cut, w, log);
        failures += token_level("mask_outlier", tropd::presets::mask_outlier({.tau = -3, .guidance_beta = 1e-3}), 3, cut, w, log);
        cases += 3;
      }
      failures += token_level("opd", tropd::presets::opd(), 3, false, w, log);
      std::string c;
      failures += consistency(w, c);
      log += c;
      cases += 2;
    }
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
