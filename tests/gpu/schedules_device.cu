// Device instantiation of every prefix schedule (tropd/schedules/prefix.hpp): proves that each
// schedule's fraction(), check(), the phase switch and prefix_length() (both cap modes) compile
// as device code, and, when run, that the device computes what the host computes for a sweep of
// (step, total steps, teacher length, sample id, seed) points.
//
// Host entry point (plain function, no doctest under nvcc):
//   int tropd_gpu_schedules_check();
// returns 0 on success, a cudaError_t value (> 0) if a CUDA call failed, or -(1 + number of
// mismatching values) if the kernel ran but disagreed with the host.
#include <tropd/schedules/prefix.hpp>

#include <cuda_runtime.h>

#include <vector>

namespace {

namespace ts = tropd::schedules;

constexpr int num_schedules = 8;
constexpr int num_points = 4096;
constexpr long long global_max = 1500;

// The schedules under test, one set shared by the host and the device pass.
struct schedule_set {
  ts::cosine cos{};
  ts::linear lin{};
  ts::exponential exp_plain{3.0, false};
  ts::exponential exp_zero{5.0, true};
  ts::step stp{0.4, 0.9, 0.1};
  ts::constant cst{0.37};
  ts::random_fraction<> rnd{0.2, 0.8, {}};
  ts::random_fraction<ts::linear> rnd_lin{0.0, 1.0, {}};
};

struct evaluation {
  double fraction[num_schedules];
  long long prefix[num_schedules][2];  // [per_sample_fraction, global_cap]
  int checks_ok;                       // every schedule's check() passed
  int phase;                           // phase_switch{reopold_default_switch(N)}.phase(step)
};

template <class S>
TROPD_HD void evaluate_one(const S& s, const ts::schedule_point& p, int k, evaluation& e) {
  e.fraction[k] = s.fraction(p);
  e.prefix[k][0] = ts::prefix_length(s, p, ts::prefix_cap::per_sample_fraction, global_max);
  e.prefix[k][1] = ts::prefix_length(s, p, ts::prefix_cap::global_cap, global_max);
  if (!s.check().ok()) e.checks_ok = 0;
}

TROPD_HD evaluation evaluate(const schedule_set& set, const ts::schedule_point& p) {
  evaluation e{};
  e.checks_ok = 1;
  evaluate_one(set.cos, p, 0, e);
  evaluate_one(set.lin, p, 1, e);
  evaluate_one(set.exp_plain, p, 2, e);
  evaluate_one(set.exp_zero, p, 3, e);
  evaluate_one(set.stp, p, 4, e);
  evaluate_one(set.cst, p, 5, e);
  evaluate_one(set.rnd, p, 6, e);
  evaluate_one(set.rnd_lin, p, 7, e);
  const ts::phase_switch ps{ts::reopold_default_switch(p.total_steps)};
  e.phase = ps.phase(p.step) + (ps.check().ok() ? 0 : 10);
  return e;
}

__global__ void schedules_kernel(schedule_set set, const ts::schedule_point* points, int n, evaluation* out) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) out[i] = evaluate(set, points[i]);
}

// A deterministic sweep of points (no host RNG: a simple LCG keeps the TU dependency-free).
std::vector<ts::schedule_point> make_points() {
  std::vector<ts::schedule_point> pts(num_points);
  unsigned long long x = 0x9E3779B97F4A7C15ull;
  auto next = [&x]() {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    return x >> 33;
  };
  for (int i = 0; i < num_points; ++i) {
    ts::schedule_point& p = pts[static_cast<size_t>(i)];
    p.total_steps = 1 + static_cast<long long>(next() % 400);
    p.step = static_cast<long long>(next() % static_cast<unsigned long long>(p.total_steps + 20)) - 5;
    p.teacher_length = static_cast<long long>(next() % 4000) - 2;
    p.sample_id = static_cast<long long>(next());
    p.seed = next() ^ (next() << 31);
  }
  return pts;
}

double abs_diff(double a, double b) { return a < b ? b - a : a - b; }

}  // namespace

int tropd_gpu_schedules_check() {
  const schedule_set set{};
  const std::vector<ts::schedule_point> pts = make_points();
  std::vector<evaluation> got(pts.size());

  ts::schedule_point* d_points = nullptr;
  evaluation* d_out = nullptr;
  cudaError_t st = cudaMalloc(&d_points, pts.size() * sizeof(ts::schedule_point));
  if (st == cudaSuccess) st = cudaMalloc(&d_out, got.size() * sizeof(evaluation));
  if (st == cudaSuccess)
    st = cudaMemcpy(d_points, pts.data(), pts.size() * sizeof(ts::schedule_point), cudaMemcpyHostToDevice);
  if (st == cudaSuccess) {
    constexpr int threads = 128;
    schedules_kernel<<<(num_points + threads - 1) / threads, threads>>>(set, d_points, num_points, d_out);
    st = cudaGetLastError();
  }
  if (st == cudaSuccess)
    st = cudaMemcpy(got.data(), d_out, got.size() * sizeof(evaluation), cudaMemcpyDeviceToHost);
  cudaFree(d_points);
  cudaFree(d_out);
  if (st != cudaSuccess) return static_cast<int>(st);

  // Host reference: the same functions compiled for the host. Device cos/exp may differ from
  // glibc's by an ulp or two, so fractions are compared to 1e-12; prefix lengths, the phase
  // and the checks must agree exactly (the 1e-9 floor guard absorbs ulp differences).
  int mismatches = 0;
  for (size_t i = 0; i < pts.size(); ++i) {
    const evaluation want = evaluate(set, pts[i]);
    const evaluation& g = got[i];
    for (int k = 0; k < num_schedules; ++k) {
      if (!(abs_diff(g.fraction[k], want.fraction[k]) <= 1e-12)) ++mismatches;
      if (g.prefix[k][0] != want.prefix[k][0] || g.prefix[k][1] != want.prefix[k][1]) ++mismatches;
      const long long L = pts[i].teacher_length < 0 ? 0 : pts[i].teacher_length;
      if (g.prefix[k][0] < 0 || g.prefix[k][0] > L || g.prefix[k][1] < 0 || g.prefix[k][1] > L) ++mismatches;
    }
    if (g.checks_ok != 1 || want.checks_ok != 1) ++mismatches;
    if (g.phase != want.phase) ++mismatches;
  }
  return mismatches == 0 ? 0 : -(1 + mismatches);
}
