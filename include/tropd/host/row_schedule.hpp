// tropd/host/row_schedule.hpp: the order of work over rows and threads, written once for
// every row entry point (host/rows.hpp, host/objective.hpp).
//
// An entry point supplies, per row, `stats(r, buf, summary&) -> status` (pass 1 and what it
// derives) and `grad(r, buf, summary) -> status` (pass 2); run_rows calls them in the order
// row_options::order asks for (host/options.hpp), each thread with its own row_scratch.
#pragma once

#include <memory>
#include <vector>

#include <tropd/config.hpp>
#include <tropd/core/status.hpp>
#include <tropd/estimators/row_moments.hpp>
#include <tropd/host/options.hpp>
#include <tropd/host/parallel.hpp>
#include <tropd/host/row_scratch.hpp>

namespace tropd::host::detail {

/// What a row's passes keep between them (O(V) per thread; fp32 work only, see reuse_exps).
struct keep_plan {
  bool for_grad = false;      ///< single_read: pass 1's exponentials serve the gradient pass
  bool teacher = false;       ///< ... the teacher's too (estimators that read q)
  bool for_second = false;    ///< pass 1b reads pass 1's exponentials (second-pass estimators, either order)
  bool mixture = false;       ///< pass 1b keeps log m for the gradient pass (single_read)
};

/// Runs stats then grad over rows [0, rows) in `order`, on opt.threads threads (a static
/// partition, so every row's arithmetic is the same for any thread count). `setup(buf)`
/// prepares each thread's scratch. validate_first: every stats before any grad, and the
/// gradient walk of each block goes backwards (its last rows were read last and may still
/// be in the last-level cache) and on past a failure, so the lowest failing row is reported.
template <class W, class Stats, class Grad, class Setup>
inline status run_rows(index_t rows, index_t V, row_order order, int threads, std::vector<estimators::row_summary>& sums,
                       keep_plan keep, Setup&& setup, Stats&& stats, Grad&& grad) {
  sums.resize(static_cast<size_t>(rows));
  if (order == row_order::single_read) {
    return parallel_rows(rows, threads, [&](index_t b, index_t e) -> status {
      auto buf = std::make_unique<row_scratch<W>>();
      setup(*buf);
      if (keep.for_grad || keep.for_second) buf->prepare_keep(V, keep.teacher || keep.for_second, keep.mixture);
      for (index_t r = b; r < e; ++r) {
        TROPD_TRY(stats(r, *buf, sums[static_cast<size_t>(r)]));
        TROPD_TRY(grad(r, *buf, sums[static_cast<size_t>(r)]));
      }
      return {};
    });
  }
  TROPD_TRY(parallel_rows(rows, threads, [&](index_t b, index_t e) -> status {
    auto buf = std::make_unique<row_scratch<W>>();
    setup(*buf);
    if (keep.for_second) buf->prepare_keep(V, true);
    for (index_t r = b; r < e; ++r) TROPD_TRY(stats(r, *buf, sums[static_cast<size_t>(r)]));
    return {};
  }));
  return parallel_rows(rows, threads, [&](index_t b, index_t e) -> status {
    auto buf = std::make_unique<row_scratch<W>>();
    setup(*buf);
    status first{};
    for (index_t r = e; r-- > b;)
      if (status st = grad(r, *buf, sums[static_cast<size_t>(r)]); !st.ok()) first = st;
    return first;
  });
}

}  // namespace tropd::host::detail
