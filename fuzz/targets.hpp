// fuzz/targets.hpp: tropd's fuzz targets as plain check functions.
//
//   tropd_fuzz::rows::check(data, size)       host::divergence_rows / host::sampled_rows
//   tropd_fuzz::topk::check(data, size)       host::topk_forward_kl_rows (teacher logits and lists)
//   tropd_fuzz::objective::check(data, size)  host::evaluate_tokens / host::evaluate_rows with presets
//
// Each returns a tropd_fuzz::result (ok, or a message naming the mismatch and the decoded
// case; `known` names an open library issue of docs/robustness.md). The libFuzzer entry
// points (fuzz/fuzz_*.cpp) abort on a failed result; tests/fuzz/test_fuzz_corpus.cpp replays
// fuzz/corpus/<target>/* through the same functions as ordinary doctest cases.
//
// Needs tests/ on the include path (the naive references under tests/reference/).
#pragma once

#include "common.hpp"
#include "target_rows.hpp"
#include "target_topk.hpp"
#include "target_objective.hpp"

namespace tropd_fuzz {

/// A named target: its check function.
struct target {
  const char* name;
  result (*check)(const uint8_t*, size_t);
};

inline const target targets[] = {
    {"rows", &rows::check},
    {"topk", &topk::check},
    {"objective", &objective::check},
};

}  // namespace tropd_fuzz
