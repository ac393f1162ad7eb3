// tropd-bench-gpu: times the CUDA backend's fused row kernels with cudaEvents and references
// each one to a device-to-device cudaMemcpy measured in the same run (docs/gpu.md).
//
// For V in {32000, 128256, 151936, 262144}, fp32 and bf16 logits, N = 2^28 / V rows (so every
// shape streams ~2^28 elements per tensor), it times
//   rkl        divergence_rows(reverse_kl): loss + dL/dz (fp32 gradient)
//   rkl-loss   divergence_rows(reverse_kl): loss only (pass 1 alone)
//   jsd        divergence_rows(jsd{0.5}): loss + dL/dz (passes 1, 1b and 2)
//   topk       topk_forward_kl_rows, given teacher lists K = 64: loss + dL/dz (student rows only)
// and a cudaMemcpyAsync (device to device) of F / 2 bytes, where F is the kernel's byte FLOOR:
// every input byte read once plus every output byte written once. The copy moves F bytes
// (F/2 read + F/2 written), so
//   GB/s      = F / kernel time
//   copy GB/s = F / copy time
//   fraction  = copy time / kernel time = GB/s / copy GB/s.
// Each time is the median of --reps timed runs after one warm-up run.
//
// Output: a human-readable table, and one machine-readable line per kernel:
//   RESULT <kernel> <dtype> <N> <V> <ms> <GB/s> <copy GB/s> <fraction>
// Options: --reps R (default 5), --quick (V = 32000 and 128256 only), --rows-elems E (default 2^28).
#include <tropd/gpu/rows.cuh>

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

/// Teacher top-k lists: K distinct ids per row (a stride walk) and decreasing log-probs
/// (unnormalised: the renormalised tail, the default, accepts any positive mass).
__global__ void fill_lists(int32_t* ids, float* lp, int rows, int K, int V) {
  const int r = blockIdx.x;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    ids[size_t(r) * K + k] = static_cast<int32_t>((size_t(r) * 7919u + size_t(k) * (V / K > 0 ? V / K : 1)) % size_t(V));
    lp[size_t(r) * K + k] = -2.3025851f - 0.05f * float(k);
  }
}

template <class T>
void fill(T* x, size_t n, uint64_t seed) {
  fill_logits<T><<<1024, 256>>>(x, n, seed);
  BENCH_CHECK(cudaGetLastError());
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
  double* loss = nullptr;
  int32_t* ids = nullptr;
  float* lp = nullptr;
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

template <class T>
void run_shape(long long V, long long elems, int reps, buffers& B, timer& tm, std::vector<result>& out, const char* dtype) {
  using tropd::index_t;
  namespace tg = tropd::gpu;
  const long long N = std::max(1ll, elems / V);
  const size_t nv = size_t(N) * size_t(V);
  const int K = 64;
  T* zs = reinterpret_cast<T*>(B.student);
  T* zt = reinterpret_cast<T*>(B.teacher);
  fill(zs, nv, 1);
  fill(zt, nv, 2);
  fill_lists<<<static_cast<unsigned>(N), 64>>>(B.ids, B.lp, static_cast<int>(N), K, static_cast<int>(V));
  BENCH_CHECK(cudaGetLastError());
  BENCH_CHECK(cudaDeviceSynchronize());

  const auto sv = tropd::make_matrix<const T>(zs, N, V);
  const auto tv = tropd::make_matrix<const T>(zt, N, V);
  const tropd::vector_view<double> loss{B.loss, N};
  const auto grad = tropd::make_matrix<float>(B.grad, N, V);
  const tg::topk_lists lists{tropd::make_matrix<const int32_t>(B.ids, N, K), tropd::make_matrix<const float>(B.lp, N, K)};
  const tg::row_options opt;
  const size_t need = std::max({tg::divergence_rows_scratch_bytes<tropd::estimators::jsd>(N, V, opt),
                                tg::divergence_rows_scratch_bytes<tropd::estimators::reverse_kl>(N, V, opt),
                                tg::topk_rows_scratch_bytes(N, V, K, opt)});
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
  };
  for (const kernel_case& kc : cases) {
    auto launch = [&] {
      switch (kc.which) {
        case 0: BENCH_TRY(tg::divergence_rows(ctx, tropd::estimators::reverse_kl{}, sv, tv, loss, grad, opt)); break;
        case 1: BENCH_TRY(tg::divergence_rows(ctx, tropd::estimators::reverse_kl{}, sv, tv, loss, tropd::matrix_view<float>{}, opt)); break;
        case 2: BENCH_TRY(tg::divergence_rows(ctx, tropd::estimators::jsd{0.5}, sv, tv, loss, grad, opt)); break;
        default: BENCH_TRY(tg::topk_forward_kl_rows(ctx, tropd::estimators::topk_forward_kl{K}, sv, lists, loss, grad, opt)); break;
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
    printf("%-9s %-5s N=%-6lld V=%-7lld %8.3f ms  %7.1f GB/s  copy %7.1f GB/s  %5.1f%% of copy\n", r.kernel.c_str(), dtype, N, V, ms,
           r.gbs, r.copy_gbs, 100 * r.fraction);
    fflush(stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 5;
  bool quick = false;
  long long elems = 1ll << 28;
  for (int i = 1; i < argc; ++i) {
    if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = std::max(1, atoi(argv[++i]));
    else if (!strcmp(argv[i], "--quick")) quick = true;
    else if (!strcmp(argv[i], "--rows-elems") && i + 1 < argc) elems = std::max(1ll, atoll(argv[++i]));
    else {
      fprintf(stderr, "usage: %s [--reps R] [--quick] [--rows-elems E]\n", argv[0]);
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
  printf("tropd-bench-gpu on %s (%d SMs, %.0f MiB L2), %lld elements per tensor, median of %d\n", prop.name,
         prop.multiProcessorCount, prop.l2CacheSize / 1048576.0, elems, reps);

  const std::vector<long long> vocabs = quick ? std::vector<long long>{32000, 128256}
                                              : std::vector<long long>{32000, 128256, 151936, 262144};
  const long long max_rows = std::max(1ll, elems / 32000);
  buffers B;
  const size_t nv_max = size_t(elems) + 262144;  // N * V <= elems, or V when N = 1
  BENCH_CHECK(cudaMalloc(&B.student, nv_max * sizeof(float)));
  BENCH_CHECK(cudaMalloc(&B.teacher, nv_max * sizeof(float)));
  BENCH_CHECK(cudaMalloc(&B.grad, nv_max * sizeof(float)));
  BENCH_CHECK(cudaMalloc(&B.loss, size_t(max_rows) * sizeof(double)));
  BENCH_CHECK(cudaMalloc(&B.ids, size_t(max_rows) * 64 * sizeof(int32_t)));
  BENCH_CHECK(cudaMalloc(&B.lp, size_t(max_rows) * 64 * sizeof(float)));
  B.copy_bytes = nv_max * 6 + size_t(max_rows) * 64 * 4;  // >= half the largest floor (fp32 rkl: 12 bytes per element)
  BENCH_CHECK(cudaMalloc(&B.copy_src, B.copy_bytes));
  BENCH_CHECK(cudaMalloc(&B.copy_dst, B.copy_bytes));
  BENCH_CHECK(cudaMemset(B.copy_src, 0, B.copy_bytes));
  B.scratch_bytes = size_t(64) << 20;
  BENCH_CHECK(cudaMalloc(&B.scratch, B.scratch_bytes));

  timer tm;
  std::vector<result> results;
  for (long long V : vocabs) {
    run_shape<float>(V, elems, reps, B, tm, results, "fp32");
    run_shape<tropd::bf16>(V, elems, reps, B, tm, results, "bf16");
  }
  printf("\n");
  for (const result& r : results)
    printf("RESULT %s %s %lld %lld %.4f %.1f %.1f %.3f\n", r.kernel.c_str(), r.dtype.c_str(), r.N, r.V, r.ms, r.gbs, r.copy_gbs,
           r.fraction);
  cudaFree(B.student);
  cudaFree(B.teacher);
  cudaFree(B.grad);
  cudaFree(B.loss);
  cudaFree(B.ids);
  cudaFree(B.lp);
  cudaFree(B.copy_src);
  cudaFree(B.copy_dst);
  cudaFree(B.scratch);
  return 0;
}
