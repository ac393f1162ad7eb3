// tropd/host/row_scratch.hpp: the per-thread scratch of the CPU row passes (O(chunk) in L1,
// plus O(V) when a row's exponentials are kept between its passes). Never O(rows x vocab).
#pragma once

#include <stdint.h>

#include <type_traits>
#include <vector>

#include <tropd/config.hpp>
#include <tropd/host/simd.hpp>
#include <tropd/host/topk_select.hpp>

namespace tropd::host::detail {

/// Whether pass 1's exponentials are kept for the later passes of a row (fp32 work; fp64 work
/// forms each probability with its own exp, see chunk_probs).
template <class W>
inline constexpr bool reuse_exps = std::is_same_v<W, float>;
/// Per-thread scratch of the row passes: chunk buffers (L1); when `keep` is set, the pass-1
/// exponentials of the current row (O(V) per thread) for its later passes (row_order::
/// single_read: the gradient pass needs no exp; second-pass estimators: pass 1b needs none),
/// and a mixture divergence's log m from pass 1b; plus the top-k heap and a row's sorted
/// sparse terms.
template <class W>
struct alignas(64) row_scratch {
  alignas(64) W a[chunk];
  alignas(64) W b[chunk];
  alignas(64) W wa[chunk];
  alignas(64) W wb[chunk];
  alignas(64) W lm[chunk];  // log m of mixture divergences (JSD)
  alignas(64) W t0[chunk];  // second-pass terms (JSD, TV)
  alignas(64) W t1[chunk];
  alignas(64) unsigned char g[chunk * sizeof(double)];  // one chunk of the gradient, as G

  // Kept by pass 1 when `keep` is set: w = e^{a - Ms_c}, v = e^{b - Mt_c} and the running
  // maxima Ms_c, Mt_c of each chunk.
  bool keep = false, keep_teacher = false, kept = false;
  aligned_array<W> keep_w, keep_v;
  std::vector<W> keep_ms, keep_mt;
  // Kept by pass 1b of a mixture divergence when `keep` is set: log m of the current row.
  bool lm_kept = false;
  aligned_array<W> keep_lm;

  // Top-k of the teacher row (when a pass asks for it).
  topk_stream<W> topk;
  std::vector<int32_t> topk_ids;
  std::vector<W> topk_vals;
  std::vector<double> lq, ls;

  // Sorted ids of a top-k list (student_tail_log).
  std::vector<int32_t> tail_ids;

  // Sparse gradient terms of a row, sorted by id (stable).
  std::vector<int32_t> sp_ids;
  std::vector<double> sp_coef;
  std::vector<uint8_t> sp_listed;
  std::vector<int> sp_order;
  // The entries of one row's sparse terms (core/sparse_terms.hpp builds into them).
  std::vector<int32_t> row_ids;
  std::vector<double> row_coef;

  void prepare_keep(index_t V, bool teacher, bool mixture = false) {
    if (!reuse_exps<W>) return;  // fp64 work recomputes its probabilities (chunk_probs)
    keep = true;
    keep_teacher = teacher;
    const index_t nc = (V + chunk - 1) / chunk;
    keep_w.resize(nc * chunk);
    keep_ms.resize(static_cast<size_t>(nc));
    if (teacher) {
      keep_v.resize(nc * chunk);
      keep_mt.resize(static_cast<size_t>(nc));
    }
    if (mixture) keep_lm.resize(nc * chunk);
  }
  void prepare_topk(int k) {
    topk_ids.resize(static_cast<size_t>(k));
    topk_vals.resize(static_cast<size_t>(k));
    lq.resize(static_cast<size_t>(k));
    ls.resize(static_cast<size_t>(k));
  }
};

}  // namespace tropd::host::detail
