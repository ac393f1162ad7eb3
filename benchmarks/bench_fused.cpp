// benchmarks/bench_fused.cpp: time and peak memory of the fused LM head (host::fused_lm_head)
// against the unfused path (the [N x V] student and teacher logits materialised with the same
// GEMM, host::evaluate_rows, then the two backward GEMMs), for the TrOPD preset with the
// teacher as its own head, fp32.
//
//   tropd-bench-fused [--N 1024] [--H 1024] [--V 32000,151936] [--threads 1] [--reps 2]
//                     [--budget-mib 256,32] [--cases fused,fused2,unfused]
//       Each case runs in a child process (fork) on inputs the parent made, so that its peak
//       resident memory is its own (VmHWM, reset when the child starts); "extra" = that peak
//       minus the resident size when the child started (the inputs and their gradient buffers).
//       Prints one table row per (V, case, budget): best time of --reps calls, extra peak, the
//       scratch the fused call asked its allocator for, and the ratios to the unfused case.
//
//   tropd-bench-fused --harness IN OUT
//       The tropd side of benchmarks/compare_fused_torch.py: reads the inputs it wrote, runs
//       the fused call (one sweep) --reps times, writes the loss, the flags, dL/dh, dL/dW, the
//       times and the extra peak memory.
//
// Own main (no Google Benchmark): the quantity of interest is a whole call of seconds, and
// memory needs a process per case.
#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <tropd/host/fused_lm_head.hpp>
#include <tropd/tropd.hpp>

#include "bench_support.hpp"

namespace {

using tropd::index_t;
using tropd_bench::buffer;
using tropd_bench::now_s;
namespace host = tropd::host;

/// Resident set size now (bytes), from /proc/self/statm.
double rss_now() {
  FILE* f = std::fopen("/proc/self/statm", "r");
  long pages = 0, res = 0;
  if (f) {
    if (std::fscanf(f, "%ld %ld", &pages, &res) != 2) res = 0;
    std::fclose(f);
  }
  return double(res) * double(sysconf(_SC_PAGE_SIZE));
}
/// Peak resident set size of this address space (bytes): VmHWM from /proc/self/status. (Not
/// getrusage's ru_maxrss, which after fork / exec also remembers the parent's or the
/// pre-exec image's peak.)
double rss_peak() {
  FILE* f = std::fopen("/proc/self/status", "r");
  double kb = 0;
  if (f) {
    char line[256];
    while (std::fgets(line, sizeof line, f))
      if (std::strncmp(line, "VmHWM:", 6) == 0) kb = std::atof(line + 6);
    std::fclose(f);
  }
  return kb * 1024.0;
}
/// Resets the peak resident set size to the current one (Linux >= 4.0: clear_refs "5").
void reset_peak() {
  FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (f) {
    std::fputs("5", f);
    std::fclose(f);
  }
}

/// One batch: student and teacher heads (H_T = H), ids, origins (all student tokens, one
/// sequence per 256 rows).
struct inputs {
  index_t N = 0, H = 0, V = 0;
  buffer<float> h, w, ht, wt;
  std::vector<int32_t> ids;
  std::vector<tropd::origin> from;
  std::vector<index_t> off;
  tropd::linear_head<float> student() const {
    return {tropd::make_matrix<const float>(h.data(), N, H), tropd::make_matrix<const float>(w.data(), V, H)};
  }
  tropd::linear_head<float> teacher() const {
    return {tropd::make_matrix<const float>(ht.data(), N, H), tropd::make_matrix<const float>(wt.data(), V, H)};
  }
  host::row_inputs row_in() const {
    return {.ids = tropd::view_of(ids), .from = tropd::view_of(from), .seq_offsets = tropd::view_of(off)};
  }
};

/// h ~ N(0, 1), W ~ N(0, 2/sqrt(H)) (logits of standard deviation ~2), the teacher's head a
/// perturbed copy; tokens sampled from the student (Gumbel-max over its logits, chunk by chunk).
void make_inputs(inputs& in, index_t N, index_t H, index_t V, int threads) {
  in.N = N, in.H = H, in.V = V;
  in.h = buffer<float>(size_t(N * H));
  in.ht = buffer<float>(size_t(N * H));
  in.w = buffer<float>(size_t(V * H));
  in.wt = buffer<float>(size_t(V * H));
  const float sw = 2.0f / std::sqrt(float(H));
  tropd_bench::par_rows(N, threads, [&](index_t b, index_t e) {
    for (index_t r = b; r < e; ++r) {
      tropd_bench::fast_normal g(1000 + uint64_t(r));
      for (index_t k = 0; k < H; ++k) {
        in.h[size_t(r * H + k)] = g();
        in.ht[size_t(r * H + k)] = in.h[size_t(r * H + k)] + 0.3f * g();
      }
    }
  });
  tropd_bench::par_rows(V, threads, [&](index_t b, index_t e) {
    for (index_t j = b; j < e; ++j) {
      tropd_bench::fast_normal g(7000000 + uint64_t(j));
      for (index_t k = 0; k < H; ++k) {
        in.w[size_t(j * H + k)] = sw * g();
        in.wt[size_t(j * H + k)] = in.w[size_t(j * H + k)] + 0.5f * sw * g();
      }
    }
  });
  in.ids.assign(size_t(N), 0);
  const index_t c = 64;
  std::vector<float> z(size_t(c * V));
  host::eigen_gemm gemm{threads};
  for (index_t r0 = 0; r0 < N; r0 += c) {
    const index_t n = std::min(c, N - r0);
    (void)gemm(tropd::gemm_op::n, tropd::gemm_op::t, n, V, H, 1.0f, in.h.data() + r0 * H, H, in.w.data(), H, 0.0f, z.data(), V);
    for (index_t l = 0; l < n; ++l) {
      tropd_bench::fast_normal g(99 + uint64_t(r0 + l));
      float best = -1e30f;
      for (index_t j = 0; j < V; ++j) {
        const float gum = -std::log(-std::log(g.uniform() + 1e-20f) + 1e-20f);
        if (z[size_t(l * V + j)] + gum > best) best = z[size_t(l * V + j)] + gum, in.ids[size_t(r0 + l)] = int32_t(j);
      }
    }
  }
  in.from.assign(size_t(N), tropd::origin::student);
  in.off.clear();
  for (index_t r = 0; r < N; r += 256) in.off.push_back(r);
  in.off.push_back(N);
}

/// What one case returns.
struct outcome {
  double best_s = 0, extra_bytes = 0, scratch_bytes = 0, loss = 0;
  int sweeps = 0, chunk = 0, ok = 0;
};

/// The fused call.
outcome run_fused(const inputs& in, int threads, int reps, size_t budget, tropd::sweep_policy sp, std::vector<float>& dh,
                  std::vector<float>& dw, std::vector<uint8_t>* flags = nullptr, std::vector<double>* times = nullptr) {
  outcome o;
  o.best_s = 1e300;
  for (int rep = 0; rep < reps; ++rep) {
    std::fill(dw.begin(), dw.end(), 0.0f);
    host::fused_info info;
    double loss = 0;
    host::fused_outputs<float> out{.grad_hidden = tropd::make_matrix(dh.data(), in.N, in.H), .grad_weight = tropd::make_matrix(dw.data(), in.V, in.H),
                                   .loss = &loss, .info = &info};
    if (flags) out.flags = tropd::view_of(*flags);
    const double t0 = now_s();
    const tropd::status st = host::fused_lm_head(tropd::presets::tropd(), in.student(), in.teacher(), in.row_in(), out,
                                                 {.eval = {.seed = 1, .threads = threads}, .scratch_budget = budget, .sweeps = sp});
    const double t = now_s() - t0;
    if (!st.ok()) {
      std::fprintf(stderr, "fused_lm_head: %s\n", st.message().c_str());
      return o;
    }
    if (times) times->push_back(t);
    o.best_s = std::min(o.best_s, t);
    o.scratch_bytes = double(info.scratch_bytes);
    o.sweeps = info.sweeps;
    o.chunk = int(info.chunk);
    o.loss = loss;
  }
  o.ok = 1;
  return o;
}

/// The unfused path: logits [N x V] of both heads (the same GEMM), evaluate_rows (dL/dz
/// [N x V]), then dL/dh and dL/dW by GEMMs.
outcome run_unfused(const inputs& in, int threads, int reps, std::vector<float>& dh, std::vector<float>& dw) {
  outcome o;
  o.best_s = 1e300;
  const index_t N = in.N, V = in.V, H = in.H;
  host::eigen_gemm gemm{threads};
  for (int rep = 0; rep < reps; ++rep) {
    std::fill(dw.begin(), dw.end(), 0.0f);
    const double t0 = now_s();
    buffer<float> z(size_t(N * V)), u(size_t(N * V)), g(size_t(N * V));
    (void)gemm(tropd::gemm_op::n, tropd::gemm_op::t, N, V, H, 1.0f, in.h.data(), H, in.w.data(), H, 0.0f, z.data(), V);
    (void)gemm(tropd::gemm_op::n, tropd::gemm_op::t, N, V, H, 1.0f, in.ht.data(), H, in.wt.data(), H, 0.0f, u.data(), V);
    double loss = 0;
    const tropd::status st = host::evaluate_rows(tropd::presets::tropd(), tropd::make_matrix<const float>(z.data(), N, V),
                                                 tropd::make_matrix<const float>(u.data(), N, V), in.row_in(),
                                                 host::row_outputs<float>{.grad = tropd::make_matrix(g.data(), N, V), .loss = &loss},
                                                 {.seed = 1, .threads = threads});
    if (!st.ok()) {
      std::fprintf(stderr, "evaluate_rows: %s\n", st.message().c_str());
      return o;
    }
    (void)gemm(tropd::gemm_op::n, tropd::gemm_op::n, N, H, V, 1.0f, g.data(), V, in.w.data(), H, 0.0f, dh.data(), H);
    (void)gemm(tropd::gemm_op::t, tropd::gemm_op::n, V, H, N, 1.0f, g.data(), V, in.h.data(), H, 1.0f, dw.data(), H);
    o.best_s = std::min(o.best_s, now_s() - t0);
    o.loss = loss;
  }
  o.ok = 1;
  return o;
}

/// Runs f() in a child process; returns its outcome with extra_bytes = its peak RSS minus its
/// RSS at the start.
template <class F>
outcome in_child(F&& f) {
  int fd[2];
  if (pipe(fd) != 0) std::abort();
  const pid_t pid = fork();
  if (pid == 0) {
    close(fd[0]);
    reset_peak();
    const double base = rss_now();
    outcome o = f();
    o.extra_bytes = rss_peak() - base;
    if (write(fd[1], &o, sizeof o) != ssize_t(sizeof o)) _exit(2);
    _exit(0);
  }
  close(fd[1]);
  outcome o;
  if (read(fd[0], &o, sizeof o) != ssize_t(sizeof o)) o.ok = 0;
  close(fd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return o;
}

std::vector<index_t> parse_list(const char* s) {
  std::vector<index_t> v;
  for (const char* p = s; *p;) {
    v.push_back(std::strtoll(p, const_cast<char**>(&p), 10));
    if (*p == ',') ++p;
  }
  return v;
}

int harness(const char* in_path, const char* out_path) {
  FILE* f = std::fopen(in_path, "rb");
  if (!f) return 1;
  char magic[4];
  int32_t hdr[4];
  int64_t dims[3];
  if (std::fread(magic, 1, 4, f) != 4 || std::memcmp(magic, "TRFH", 4) != 0 || std::fread(hdr, 4, 4, f) != 4 || std::fread(dims, 8, 3, f) != 3) return 1;
  const int threads = hdr[0], reps = hdr[1], two = hdr[2];
  const size_t budget = size_t(hdr[3]) << 20;
  inputs in;
  in.N = dims[0], in.H = dims[1], in.V = dims[2];
  const size_t nh = size_t(in.N * in.H), vh = size_t(in.V * in.H);
  in.h = buffer<float>(nh);
  in.w = buffer<float>(vh);
  in.ht = buffer<float>(nh);
  in.wt = buffer<float>(vh);
  in.ids.resize(size_t(in.N));
  bool ok = std::fread(in.h.data(), 4, nh, f) == nh && std::fread(in.w.data(), 4, vh, f) == vh && std::fread(in.ht.data(), 4, nh, f) == nh &&
            std::fread(in.wt.data(), 4, vh, f) == vh && std::fread(in.ids.data(), 4, size_t(in.N), f) == size_t(in.N);
  std::fclose(f);
  if (!ok) return 1;
  in.from.assign(size_t(in.N), tropd::origin::student);
  for (index_t r = 0; r < in.N; r += 256) in.off.push_back(r);
  in.off.push_back(in.N);
  std::vector<float> dh(nh), dw(vh);
  std::vector<uint8_t> flags(size_t(in.N));
  std::vector<double> times;
  reset_peak();
  const double base = rss_now();
  const outcome o = run_fused(in, threads, reps, budget, two ? tropd::sweep_policy::two : tropd::sweep_policy::automatic, dh, dw, &flags, &times);
  const double extra = rss_peak() - base;
  if (!o.ok) return 1;
  FILE* g = std::fopen(out_path, "wb");
  if (!g) return 1;
  const int64_t meta[4] = {int64_t(extra), int64_t(o.scratch_bytes), int64_t(o.chunk), int64_t(times.size())};
  std::fwrite("TRFO", 1, 4, g);
  std::fwrite(meta, 8, 4, g);
  std::fwrite(&o.loss, 8, 1, g);
  std::fwrite(times.data(), 8, times.size(), g);
  std::fwrite(flags.data(), 1, flags.size(), g);
  std::fwrite(dh.data(), 4, nh, g);
  std::fwrite(dw.data(), 4, vh, g);
  std::fclose(g);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "--harness") == 0) return harness(argv[2], argv[3]);
  index_t N = 1024, H = 1024;
  std::vector<index_t> Vs = {32000, 151936};
  int threads = 1, reps = 2;
  std::vector<index_t> budgets = {256, 32};
  std::string cases = "fused,fused2,unfused";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--N") N = std::atoll(argv[i + 1]);
    else if (a == "--H") H = std::atoll(argv[i + 1]);
    else if (a == "--V") Vs = parse_list(argv[i + 1]);
    else if (a == "--threads") threads = std::atoi(argv[i + 1]);
    else if (a == "--reps") reps = std::atoi(argv[i + 1]);
    else if (a == "--budget-mib") budgets = parse_list(argv[i + 1]);
    else if (a == "--cases") cases = argv[i + 1];
    else {
      std::fprintf(stderr, "usage: tropd-bench-fused [--N n] [--H h] [--V v1,v2] [--threads t] [--reps r] [--budget-mib m1,m2] [--cases fused,fused2,unfused]\n"
                           "       tropd-bench-fused --harness IN OUT\n");
      return 2;
    }
  }
  std::printf("tropd fused LM head vs unfused (TrOPD preset, teacher head H_T = H, fp32, threads %d, best of %d calls; "
              "extra = peak RSS above the inputs; one call = forward + backward)\n",
              threads, reps);
  std::printf("%7s %6s %6s  %-12s %6s %6s %10s %12s %12s %10s %10s\n", "V", "N", "H", "case@budget", "sweeps", "chunk", "time ms", "extra MiB",
              "scratch MiB", "time/unf", "mem/unf");
  for (index_t V : Vs) {
    inputs in;
    make_inputs(in, N, H, V, threads);
    std::vector<float> dh(size_t(N * H)), dw(size_t(V * H));
    struct row {
      std::string name;
      outcome o;
    };
    std::vector<row> rows;
    auto has = [&](const char* c) { return ("," + cases + ",").find(std::string(",") + c + ",") != std::string::npos; };
    if (has("unfused")) rows.push_back({"unfused", in_child([&] { return run_unfused(in, threads, reps, dh, dw); })});
    for (index_t mib : budgets) {
      const size_t budget = size_t(mib) << 20;
      const std::string at = "@" + std::to_string(mib);
      if (has("fused"))
        rows.push_back({"fused" + at, in_child([&] { return run_fused(in, threads, reps, budget, tropd::sweep_policy::automatic, dh, dw); })});
      if (has("fused2"))
        rows.push_back({"fused2" + at, in_child([&] { return run_fused(in, threads, reps, budget, tropd::sweep_policy::two, dh, dw); })});
    }
    const outcome* unf = nullptr;
    for (const auto& r : rows)
      if (r.name == "unfused" && r.o.ok) unf = &r.o;
    for (const auto& r : rows) {
      if (!r.o.ok) {
        std::printf("%7lld %6lld %6lld  %-12s failed\n", (long long)V, (long long)N, (long long)H, r.name.c_str());
        continue;
      }
      const double mib = 1.0 / (1 << 20);
      std::printf("%7lld %6lld %6lld  %-12s %6d %6d %10.1f %12.1f %12.1f", (long long)V, (long long)N, (long long)H, r.name.c_str(), r.o.sweeps,
                  r.o.chunk, 1e3 * r.o.best_s, r.o.extra_bytes * mib, r.o.scratch_bytes * mib);
      if (unf) std::printf(" %10.2f %10.3f", r.o.best_s / unf->best_s, r.o.extra_bytes / unf->extra_bytes);
      std::printf("   loss %.6f\n", r.o.loss);
      std::fflush(stdout);
    }
  }
  return 0;
}
