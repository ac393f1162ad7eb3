// tropd-bench-gpu: times the CUDA backend's row functions and row-level objectives with
// cudaEvents and references each one to a device-to-device cudaMemcpy measured in the same
// run (docs/gpu.md). It has its own main (no Google Benchmark).
//
// Shapes: V = 151936 (Qwen), N in {256, 1024, 4096, 16384} rows (--rows, --vocab to change),
// fp32 and bf16 logits, an fp32 gradient. Kernels:
//   rkl        divergence_rows(reverse_kl): loss + dL/dz
//   rkl-loss   divergence_rows(reverse_kl): loss only (pass 1 alone)
//   jsd        divergence_rows(jsd{0.5}): loss + dL/dz (passes 1, 1b and 2)
//   topk       topk_forward_kl_rows, given teacher lists K = 64: loss + dL/dz (student rows only)
//   topk-sel   topk_forward_kl_rows, the top-64 selected from the teacher logits
//   opd        evaluate_rows(presets::opd()): the row-level objective, loss + dL/dz
//   tropd      evaluate_rows(presets::tropd()): stochastic trust region, form-C top-64 selected
//              from the teacher logits on outliers, guidance, token-mean
// Each next to a cudaMemcpyAsync (device to device) of min(F / 2, 4 GiB) bytes, where F is the
// kernel's byte FLOOR: every input byte read once plus every output byte written once. The copy
// moves 2 x its bytes, so
//   GB/s      = F / kernel time
//   copy GB/s = 2 x copied bytes / copy time
//   fraction  = GB/s / copy GB/s
// Each time is the median of --reps timed runs after one warm-up run; the path (one block per
// row or S blocks per row) is the library's plan unless --blocks-per-row is given.
//
// Output: a human-readable table, and one machine-readable line per kernel:
//   RESULT <kernel> <dtype> <N> <V> <ms> <GB/s> <copy GB/s> <fraction>
// Options: --reps R (default 5), --quick (N = 256 and 1024), --rows N1,N2,..., --vocab V,
// --blocks-per-row S.
#include <tropd/gpu/gpu.cuh>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <string>
#include <vector>

namespace {

#define BENCH_CHECK(expr)                                                                        \
  do {                                                                                           \
    const cudaError_t bench_e_ = (expr);                                                         \
    if (bench_e_ != cudaSuccess) {                                                               \
      fprintf(stderr, "tropd-bench-gpu: %s failed: %s\n", #expr, cudaGetErrorString(bench_e_)); \
      exit(1);                                                                                   \
    }                                                                                            \
  } while (0)

#define BENCH_TRY(expr)                                                                     \
  do {                                                                                      \
    const tropd::status bench_s_ = (expr);                                                  \
    if (!bench_s_.ok()) {                                                                   \
      fprintf(stderr, "tropd-bench-gpu: %s failed: %s\n", #expr, bench_s_.message().c_str()); \
      exit(1);                                                                              \
    }                                                                                       \
  } while (0)

__device__ __forceinline__ uint32_t mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

/// Logit-like values: a sum of two uniforms on [-4, 4] (triangular), reproducible by index.
template <class T>
__global__ void fill_logits(T* x, size_t n, uint64_t seed) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const uint32_t a = mix(seed * 0x9e3779b97f4a7c15ull + 2 * i), b = mix(seed * 0x9e3779b97f4a7c15ull + 2 * i + 1);
    const float v = 4.0f * (float(a) * 2.3283064e-10f + float(b) * 2.3283064e-10f - 1.0f);
    if constexpr (sizeof(T) == 4)
      x[i] = v;
    else
      x[i] = T::from_float(v);
  }
}

/// Teacher top-k lists (K distinct ids per row, decreasing unnormalised log-probs), the rows'
/// token ids, origin tags (student) and sequences of 16 rows.
__global__ void fill_rows(int32_t* ids, float* lp, int32_t* tok, tropd::origin* from, tropd::index_t* off, int rows, int K, int V) {
  const int r = blockIdx.x;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    ids[size_t(r) * K + k] = static_cast<int32_t>((size_t(r) * 7919u + size_t(k) * (V / K > 0 ? V / K : 1)) % size_t(V));
    lp[size_t(r) * K + k] = -2.3025851f - 0.05f * float(k);
  }
  if (threadIdx.x == 0) {
    tok[r] = static_cast<int32_t>((size_t(r) * 104729u) % size_t(V));
    from[r] = tropd::origin::student;
    if (r % 16 == 0) off[r / 16] = r;
    if (r == rows - 1) off[(rows + 15) / 16] = rows;
  }
}

struct timer {
  cudaEvent_t a{}, b{};
  timer() {
    BENCH_CHECK(cudaEventCreate(&a));
    BENCH_CHECK(cudaEventCreate(&b));
  }
  ~timer() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  /// Median milliseconds of `reps` runs of f() after one warm-up run.
  template <class F>
  double median_ms(int reps, F&& f) {
    f();
    BENCH_CHECK(cudaDeviceSynchronize());
    std::vector<float> t;
    for (int i = 0; i < reps; ++i) {
      BENCH_CHECK(cudaEventRecord(a));
      f();
      BENCH_CHECK(cudaEventRecord(b));
      BENCH_CHECK(cudaEventSynchronize(b));
      float ms = 0;
      BENCH_CHECK(cudaEventElapsedTime(&ms, a, b));
      t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }
};

struct buffers {
  unsigned char* student = nullptr;  // fp32-sized
  unsigned char* teacher = nullptr;
  float* grad = nullptr;
  double* loss = nullptr;  // [rows] (row functions) and the objective's loss
  int32_t* ids = nullptr;
  float* lp = nullptr;
  int32_t* tok = nullptr;
  tropd::origin* from = nullptr;
  tropd::index_t* off = nullptr;
  unsigned char* copy_src = nullptr;
  unsigned char* copy_dst = nullptr;
  size_t copy_bytes = 0;
  void* scratch = nullptr;
  size_t scratch_bytes = 0;
};

struct result {
  std::string kernel, dtype;
  long long N, V;
  double ms, gbs, copy_gbs, fraction;
};

constexpr int K = 64;

template <class T>
void run_shape(long long N, long long V, int reps, int bpr, buffers& B, timer& tm, std::vector<result>& out, const char* dtype) {
  namespace tg = tropd::gpu;
  namespace te = tropd::estimators;
  const size_t nv = size_t(N) * size_t(V);
  T* zs = reinterpret_cast<T*>(B.student);
  T* zt = reinterpret_cast<T*>(B.teacher);
  fill_logits<T><<<2048, 256>>>(zs, nv, 1);
  fill_logits<T><<<2048, 256>>>(zt, nv, 2);
  fill_rows<<<static_cast<unsigned>(N), 64>>>(B.ids, B.lp, B.tok, B.from, B.off, static_cast<int>(N), K, static_cast<int>(V));
  BENCH_CHECK(cudaGetLastError());
  BENCH_CHECK(cudaDeviceSynchronize());

  const auto sv = tropd::make_matrix<const T>(zs, N, V);
  const auto tv = tropd::make_matrix<const T>(zt, N, V);
  const tropd::vector_view<double> loss{B.loss, N};
  const auto grad = tropd::make_matrix<float>(B.grad, N, V);
  const tg::topk_lists lists{tropd::make_matrix<const int32_t>(B.ids, N, K), tropd::values_matrix(tropd::make_matrix<const float>(B.lp, N, K))};
  tg::row_options opt;
  opt.launch.blocks_per_row = bpr;
  tg::eval_options eo;
  eo.seed = 7;
  eo.launch.blocks_per_row = bpr;
  tg::row_inputs in;
  in.ids = {B.tok, N};
  in.from = {B.from, N};
  in.seq_offsets = {B.off, (N + 15) / 16 + 1};
  tg::row_outputs<float> ro;
  ro.grad = grad;
  ro.loss = B.loss;
  const auto opd = tropd::presets::opd();
  const auto trp = tropd::presets::tropd();
  const size_t need = std::max({tg::divergence_rows_scratch_bytes(te::reverse_kl{}, sv, tv, loss, grad, opt),
                                tg::divergence_rows_scratch_bytes(te::reverse_kl{}, sv, tv, loss, tropd::matrix_view<float>{}, opt),
                                tg::divergence_rows_scratch_bytes(te::jsd{0.5}, sv, tv, loss, grad, opt),
                                tg::topk_forward_kl_rows_scratch_bytes(te::topk_forward_kl{K}, sv, lists, loss, grad, opt),
                                tg::topk_forward_kl_rows_scratch_bytes(te::topk_forward_kl{K}, sv, tv, loss, grad, opt),
                                tg::evaluate_rows_scratch_bytes(opd, sv, tv, in, ro, eo), tg::evaluate_rows_scratch_bytes(trp, sv, tv, in, ro, eo)});
  if (need > B.scratch_bytes) {
    fprintf(stderr, "tropd-bench-gpu: scratch too small (%zu > %zu)\n", need, B.scratch_bytes);
    exit(1);
  }
  const tg::device_context ctx{B.scratch, B.scratch_bytes, 0};
  const double in1 = double(nv) * sizeof(T), g = double(nv) * sizeof(float);

  struct kernel_case {
    const char* name;
    double floor_bytes;
    int which;
  };
  const kernel_case cases[] = {
      {"rkl", 2 * in1 + g, 0},
      {"rkl-loss", 2 * in1, 1},
      {"jsd", 2 * in1 + g, 2},
      {"topk", in1 + g + double(N) * K * 8, 3},
      {"topk-sel", 2 * in1 + g, 4},
      {"opd", 2 * in1 + g, 5},
      {"tropd", 2 * in1 + g, 6},
  };
  for (const kernel_case& kc : cases) {
    auto launch = [&] {
      switch (kc.which) {
        case 0: BENCH_TRY(tg::divergence_rows(ctx, te::reverse_kl{}, sv, tv, loss, grad, opt)); break;
        case 1: BENCH_TRY(tg::divergence_rows(ctx, te::reverse_kl{}, sv, tv, loss, tropd::matrix_view<float>{}, opt)); break;
        case 2: BENCH_TRY(tg::divergence_rows(ctx, te::jsd{0.5}, sv, tv, loss, grad, opt)); break;
        case 3: BENCH_TRY(tg::topk_forward_kl_rows(ctx, te::topk_forward_kl{K}, sv, lists, loss, grad, opt)); break;
        case 4: BENCH_TRY(tg::topk_forward_kl_rows(ctx, te::topk_forward_kl{K}, sv, tv, loss, grad, opt)); break;
        case 5: BENCH_TRY(tg::evaluate_rows(ctx, opd, sv, tv, in, ro, eo)); break;
        default: BENCH_TRY(tg::evaluate_rows(ctx, trp, sv, tv, in, ro, eo)); break;
      }
    };
    const double ms = tm.median_ms(reps, launch);
    const tropd::status st = tg::read_status(B.scratch, 0);
    if (!st.ok()) {
      fprintf(stderr, "tropd-bench-gpu: %s reported %s\n", kc.name, st.message().c_str());
      exit(1);
    }
    const size_t cb = std::min(B.copy_bytes, static_cast<size_t>(kc.floor_bytes / 2));
    const double copy_ms = tm.median_ms(reps, [&] { BENCH_CHECK(cudaMemcpyAsync(B.copy_dst, B.copy_src, cb, cudaMemcpyDeviceToDevice, 0)); });
    result r;
    r.kernel = kc.name;
    r.dtype = dtype;
    r.N = N;
    r.V = V;
    r.ms = ms;
    r.gbs = kc.floor_bytes / (ms * 1e6);
    r.copy_gbs = 2.0 * double(cb) / (copy_ms * 1e6);
    r.fraction = r.gbs / r.copy_gbs;
    out.push_back(r);
    printf("%-9s %-5s N=%-6lld V=%-7lld %9.3f ms  %7.1f GB/s  copy %7.1f GB/s  %5.1f%% of copy\n", r.kernel.c_str(), dtype, N, V, ms, r.gbs,
           r.copy_gbs, 100 * r.fraction);
    fflush(stdout);
  }
}

std::vector<long long> parse_list(const char* s) {
  std::vector<long long> v;
  while (*s) {
    v.push_back(atoll(s));
    const char* c = strchr(s, ',');
    if (!c) break;
    s = c + 1;
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 5, bpr = 0;
  long long V = 151936;
  std::vector<long long> rows = {256, 1024, 4096, 16384};
  for (int i = 1; i < argc; ++i) {
    if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = std::max(1, atoi(argv[++i]));
    else if (!strcmp(argv[i], "--quick")) rows = {256, 1024};
    else if (!strcmp(argv[i], "--rows") && i + 1 < argc) rows = parse_list(argv[++i]);
    else if (!strcmp(argv[i], "--vocab") && i + 1 < argc) V = std::max(1ll, atoll(argv[++i]));
    else if (!strcmp(argv[i], "--blocks-per-row") && i + 1 < argc) bpr = std::max(0, atoi(argv[++i]));
    else {
      fprintf(stderr, "usage: %s [--reps R] [--quick] [--rows N1,N2,...] [--vocab V] [--blocks-per-row S]\n", argv[0]);
      return 2;
    }
  }
  int dev = 0, count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    printf("tropd-bench-gpu: no CUDA device; nothing measured\n");
    return 77;
  }
  BENCH_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  BENCH_CHECK(cudaGetDeviceProperties(&prop, dev));
  printf("tropd-bench-gpu on %s (%d SMs, %.0f MiB L2, %.0f GiB), V = %lld, median of %d\n", prop.name, prop.multiProcessorCount,
         prop.l2CacheSize / 1048576.0, prop.totalGlobalMem / 1073741824.0, V, reps);

  const long long max_rows = *std::max_element(rows.begin(), rows.end());
  buffers B;
  const size_t nv_max = size_t(max_rows) * size_t(V);
  BENCH_CHECK(cudaMalloc(&B.student, nv_max * sizeof(float)));
  BENCH_CHECK(cudaMalloc(&B.teacher, nv_max * sizeof(float)));
  BENCH_CHECK(cudaMalloc(&B.grad, nv_max * sizeof(float)));
  BENCH_CHECK(cudaMalloc(&B.loss, size_t(max_rows) * sizeof(double)));
  BENCH_CHECK(cudaMalloc(&B.ids, size_t(max_rows) * K * sizeof(int32_t)));
  BENCH_CHECK(cudaMalloc(&B.lp, size_t(max_rows) * K * sizeof(float)));
  BENCH_CHECK(cudaMalloc(&B.tok, size_t(max_rows) * sizeof(int32_t)));
  BENCH_CHECK(cudaMalloc(&B.from, size_t(max_rows) * sizeof(tropd::origin)));
  BENCH_CHECK(cudaMalloc(&B.off, size_t(max_rows / 16 + 2) * sizeof(tropd::index_t)));
  B.copy_bytes = std::min<size_t>(nv_max * 6, size_t(4) << 30);
  BENCH_CHECK(cudaMalloc(&B.copy_src, B.copy_bytes));
  BENCH_CHECK(cudaMalloc(&B.copy_dst, B.copy_bytes));
  BENCH_CHECK(cudaMemset(B.copy_src, 0, B.copy_bytes));
  B.scratch_bytes = size_t(256) << 20;
  BENCH_CHECK(cudaMalloc(&B.scratch, B.scratch_bytes));

  timer tm;
  std::vector<result> results;
  for (long long N : rows) {
    run_shape<float>(N, V, reps, bpr, B, tm, results, "fp32");
    run_shape<tropd::bf16>(N, V, reps, bpr, B, tm, results, "bf16");
  }
  printf("\n");
  for (const result& r : results)
    printf("RESULT %s %s %lld %lld %.4f %.1f %.1f %.3f\n", r.kernel.c_str(), r.dtype.c_str(), r.N, r.V, r.ms, r.gbs, r.copy_gbs, r.fraction);
  for (void* p : {static_cast<void*>(B.student), static_cast<void*>(B.teacher), static_cast<void*>(B.grad), static_cast<void*>(B.loss),
                  static_cast<void*>(B.ids), static_cast<void*>(B.lp), static_cast<void*>(B.tok), static_cast<void*>(B.from),
                  static_cast<void*>(B.off), static_cast<void*>(B.copy_src), static_cast<void*>(B.copy_dst), B.scratch})
    cudaFree(p);
  return 0;
}
