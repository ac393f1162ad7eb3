// tropd/host/parallel.hpp: a deterministic parallel loop over rows for the CPU backend.
//
// Rows [0, n) are split into `threads` contiguous blocks (static partition, so each row's
// arithmetic is identical for any thread count). threads <= 1 runs inline on the caller.
#pragma once

#include <algorithm>
#include <thread>
#include <vector>

#include <tropd/config.hpp>
#include <tropd/core/status.hpp>

namespace tropd::host {

/// Runs f(begin, end) -> status over a static partition of [0, n) into at most `threads`
/// blocks and returns the failed status with the smallest row, or ok.
template <class F>
status parallel_rows(index_t n, int threads, F&& f) {
  const index_t t = std::max<index_t>(1, std::min<index_t>(threads < 1 ? 1 : threads, n));
  if (t == 1) return f(index_t(0), n);
  std::vector<status> res(static_cast<size_t>(t));
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(t - 1));
  auto block = [&](index_t i) {
    const index_t b = n * i / t, e = n * (i + 1) / t;
    res[static_cast<size_t>(i)] = f(b, e);
  };
  for (index_t i = 1; i < t; ++i) pool.emplace_back(block, i);
  block(0);
  for (auto& th : pool) th.join();
  for (const auto& s : res)
    if (!s.ok()) return s;  // blocks are in row order, so this is the smallest failing row
  return {};
}

}  // namespace tropd::host
