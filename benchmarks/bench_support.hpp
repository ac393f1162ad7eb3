// benchmarks/bench_support.hpp: machine floors (read bandwidth, exp throughput), random
// inputs and a row-parallel loop, shared by bench_cpu.cpp and torch_harness.cpp.
// Benchmark-only; not part of the library.
#pragma once

#include <stdint.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include <Eigen/Core>
#include <tropd/tropd.hpp>

namespace tropd_bench {

using tropd::index_t;

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// Runs f(begin, end) over a static partition of [0, n) into `threads` blocks.
template <class F>
void par_rows(index_t n, int threads, F&& f) {
  const index_t t = std::max<index_t>(1, std::min<index_t>(threads, n));
  if (t == 1) {
    f(index_t(0), n);
    return;
  }
  std::vector<std::thread> pool;
  for (index_t i = 1; i < t; ++i) pool.emplace_back([&, i] { f(n * i / t, n * (i + 1) / t); });
  f(index_t(0), n / t);
  for (auto& th : pool) th.join();
}

/// 64-byte aligned, uninitialised float/int storage (std::vector would zero-fill, and
/// page-faulting 1 GiB twice is slow).
template <class T>
struct buffer {
  struct free_deleter {
    void operator()(T* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<T, free_deleter> p;
  size_t n = 0;
  buffer() = default;
  explicit buffer(size_t count) : n(count) {
    const size_t bytes = std::max<size_t>(64, (count * sizeof(T) + 63) / 64 * 64);
    p.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    if (!p) {
      std::fprintf(stderr, "tropd-bench: out of memory allocating %zu bytes\n", bytes);
      std::abort();
    }
  }
  T* data() const noexcept { return p.get(); }
  size_t size() const noexcept { return n; }
  T& operator[](size_t i) const noexcept { return p.get()[i]; }
};

/// Physical memory in bytes (sysconf), for skipping shapes that do not fit.
inline double physical_memory_bytes() {
  return double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGE_SIZE));
}

/// Streaming read bandwidth (bytes/s) over a 1 GiB float buffer with `threads` threads,
/// each summing its share with Eigen's vectorised sum; best of `reps`.
inline double measure_read_bandwidth(int threads, int reps = 3, size_t bytes = size_t(1) << 30) {
  const size_t n = bytes / sizeof(float);
  buffer<float> buf(n);
  par_rows(static_cast<index_t>(n), threads, [&](index_t b, index_t e) {
    for (index_t i = b; i < e; ++i) buf[size_t(i)] = float(i & 1023) * 1e-3f;
  });
  double best = 1e300;
  std::vector<double> partial(size_t(std::max(threads, 1)), 0.0);
  for (int r = 0; r < reps; ++r) {
    const double t0 = now_s();
    const index_t T = std::max(threads, 1);
    par_rows(T, threads, [&](index_t b, index_t e) {
      for (index_t k = b; k < e; ++k) {
        const size_t lo = n * size_t(k) / size_t(T), hi = n * size_t(k + 1) / size_t(T);
        partial[size_t(k)] = Eigen::Map<const Eigen::ArrayXf>(buf.data() + lo, Eigen::Index(hi - lo)).sum();
      }
    });
    best = std::min(best, now_s() - t0);
  }
  volatile double sink = 0;
  for (double x : partial) sink = sink + x;
  (void)sink;
  return double(n * sizeof(float)) / best;
}

/// Vectorised exp throughput (elements/s, one thread): Eigen ArrayXf::exp over an
/// L1/L2-resident buffer of 8192 floats; best of `reps`.
inline double measure_exp_rate(int reps = 5) {
  const Eigen::Index n = 8192;
  Eigen::ArrayXf x = Eigen::ArrayXf::LinSpaced(n, -20.f, 0.f), y(n);
  const int inner = 2000;
  double best = 1e300;
  float sink = 0;
  for (int r = 0; r < reps; ++r) {
    const double t0 = now_s();
    for (int k = 0; k < inner; ++k) {
      y = x.exp();
      sink += y[k % n];
    }
    best = std::min(best, now_s() - t0);
  }
  volatile float v = sink;
  (void)v;
  return double(n) * inner / best;
}

/// Fast deterministic pseudo-random normals (xorshift64*, sum of four uniforms, scaled
/// to unit variance): good enough for benchmark logits.
struct fast_normal {
  uint64_t s;
  explicit fast_normal(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
  float uniform() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return float((s * 0x2545F4914F6CDD1Dull) >> 40) * (1.0f / 16777216.0f);
  }
  float operator()() {
    const float u = uniform() + uniform() + uniform() + uniform() - 2.0f;
    return u * 1.7320508f;  // var(sum of 4 U(0,1)) = 1/3
  }
};

/// Student logits z ~ 2 N(0,1) and teacher logits u = z + 1.2 N(0,1), [N x V] row-major,
/// filled by `threads` threads (deterministic per row).
inline void fill_logits(float* zs, float* zt, index_t N, index_t V, uint64_t seed, int threads) {
  par_rows(N, threads, [&](index_t b, index_t e) {
    for (index_t r = b; r < e; ++r) {
      fast_normal g(seed * 1000003ull + uint64_t(r));
      float* a = zs + r * V;
      float* c = zt + r * V;
      for (index_t j = 0; j < V; ++j) {
        a[j] = 2.0f * g();
        c[j] = a[j] + 1.2f * g();
      }
    }
  });
}

}  // namespace tropd_bench
