// benchmarks/torch_harness.cpp: the tropd side of benchmarks/compare_torch.py.
//
//   tropd-torch-harness <input.bin> <output.bin>
//
// Reads the inputs the script wrote, runs the same loss + gradient through tropd `reps`
// times on `threads` threads, and writes the losses, the gradient, the trust-region
// decisions and every run's wall time back. Formats (little endian, packed):
//   input   char[4] "TRPD", int32 kind (0 reverse KL rows, 1 TrOPD rows), int32 threads,
//           int32 reps, int32 k, int64 N, int64 V, float32 student[N x V],
//           float32 teacher[N x V], int32 ids[N]
//   output  char[4] "TRPO", int64 N, int64 V, int32 reps, float64 loss[N] (kind 0: per-row
//           reverse KL; kind 1: loss[0] = the aggregated objective, the rest 0),
//           uint8 trusted[N] (kind 1: the stochastic trust region's decisions), float32 grad[N x V],
//           float64 seconds[reps]
// kind 1 evaluates tropd::presets::tropd() (stochastic trust region, k1 reward on trusted
// tokens, form-C top-k forward KL advantage on outliers, token mean) with every row a
// student token, one sequence per 256 rows, seed 1, step 0.
#include <stdint.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include <tropd/tropd.hpp>

namespace {

template <class T>
bool read_into(std::FILE* f, T* p, size_t n) {
  return std::fread(p, sizeof(T), n, f) == n;
}
template <class T>
void write_from(std::FILE* f, const T* p, size_t n) {
  if (std::fwrite(p, sizeof(T), n, f) != n) {
    std::fprintf(stderr, "tropd-torch-harness: write failed\n");
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  using namespace tropd;
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <input.bin> <output.bin>\n", argv[0]);
    return 2;
  }
  std::FILE* in = std::fopen(argv[1], "rb");
  if (!in) {
    std::perror(argv[1]);
    return 1;
  }
  char magic[4];
  int32_t kind = 0, threads = 1, reps = 1, k = 64;
  int64_t N = 0, V = 0;
  if (!read_into(in, magic, 4) || std::memcmp(magic, "TRPD", 4) != 0 || !read_into(in, &kind, 1) || !read_into(in, &threads, 1) ||
      !read_into(in, &reps, 1) || !read_into(in, &k, 1) || !read_into(in, &N, 1) || !read_into(in, &V, 1) || N < 1 || V < 1 ||
      reps < 1) {
    std::fprintf(stderr, "tropd-torch-harness: malformed header in %s\n", argv[1]);
    return 1;
  }
  const size_t nv = static_cast<size_t>(N * V);
  std::vector<float> zs(nv), zt(nv), grad(nv);
  std::vector<int32_t> ids(static_cast<size_t>(N));
  if (!read_into(in, zs.data(), nv) || !read_into(in, zt.data(), nv) || !read_into(in, ids.data(), ids.size())) {
    std::fprintf(stderr, "tropd-torch-harness: %s is truncated\n", argv[1]);
    return 1;
  }
  std::fclose(in);

  const auto S = make_matrix<const float>(zs.data(), N, V);
  const auto T = make_matrix<const float>(zt.data(), N, V);
  const auto G = make_matrix<float>(grad.data(), N, V);
  std::vector<double> loss(static_cast<size_t>(N), 0.0);
  std::vector<uint8_t> tok_flags(static_cast<size_t>(N), 0), trusted(static_cast<size_t>(N), 0);
  std::vector<origin> from(static_cast<size_t>(N), origin::student);
  std::vector<index_t> offsets;
  for (index_t o = 0; o < N; o += 256) offsets.push_back(o);
  offsets.push_back(N);

  host::row_options ro;
  ro.threads = threads;
  const host::eval_options eo{.seed = 1, .threads = threads};
  host::row_inputs tok;
  tok.ids = {ids.data(), N};
  tok.from = {from.data(), N};
  tok.seq_offsets = {offsets.data(), static_cast<index_t>(offsets.size())};
  tropd::token_outputs tout;
  tout.flags = {tok_flags.data(), N};
  const auto obj = presets::tropd({.beta = 1e-3, .k = k});

  std::vector<double> seconds(static_cast<size_t>(reps));
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    status st;
    if (kind == 0) {
      st = host::divergence_rows(estimators::reverse_kl{}, S, T, view_of(loss), G, ro);
    } else {
      double L = 0;
      st = host::evaluate_rows(obj, S, T, tok, host::row_outputs<>{.grad = G, .loss = &L, .flags = tout.flags}, eo);
      loss[0] = L;
    }
    seconds[static_cast<size_t>(i)] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!st.ok()) {
      std::fprintf(stderr, "tropd-torch-harness: %s\n", st.message().c_str());
      return 1;
    }
  }
  for (index_t r = 0; r < N; ++r) trusted[static_cast<size_t>(r)] = (tok_flags[static_cast<size_t>(r)] & tropd::flags::trusted) ? 1 : 0;

  std::FILE* out = std::fopen(argv[2], "wb");
  if (!out) {
    std::perror(argv[2]);
    return 1;
  }
  write_from(out, "TRPO", 4);
  write_from(out, &N, 1);
  write_from(out, &V, 1);
  write_from(out, &reps, 1);
  write_from(out, loss.data(), loss.size());
  write_from(out, trusted.data(), trusted.size());
  write_from(out, grad.data(), grad.size());
  write_from(out, seconds.data(), seconds.size());
  std::fclose(out);
  return 0;
}
