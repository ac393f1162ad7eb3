// tests/dist/cases.hpp: one distributed test case = one rank's part of a sharded call of one
// preset, driven through the split call (dist::rows_call), and its comparison with the
// single-process host::evaluate_rows on the whole batch. Shared by the MPI test executable
// and the torch.distributed test's C shim (both drive the same exchanges, through MPI and
// through torch.distributed respectively). Test-only.
#pragma once

#include <stdint.h>

#include <memory>
#include <string>
#include <vector>

#include <tropd/dist/records.hpp>

namespace tropd_dist_test {

/// How the rows are split along the data dimension.
enum class data_split : int {
  sequences = 0,  ///< whole sequences per rank
  rows = 1,       ///< contiguous rows: sequences may be split across ranks
};

/// One case on one rank.
struct case_spec {
  std::string preset = "tropd";  ///< see preset_names()
  int64_t V = 1003;              ///< vocabulary size (not divisible by 2, 3, 4)
  uint64_t seed = 7;             ///< the batch's seed
  int tp_rank = 0, tp_size = 1;  ///< this rank in the tensor group (vocabulary shards)
  int dp_rank = 0, dp_size = 1;  ///< this rank in the data group (rows)
  bool odd_shards = false;       ///< shards of width 1 and 40 first (else Megatron's even split)
  data_split split = data_split::sequences;
  bool served = false;           ///< the teacher as log-probs and top-k lists (not logits)
  bool with_s_old = false;       ///< rollout-time log-probs (rho != 1)
  bool mask_nan = false;         ///< a NaN logit on the last shard, input_policy::mask
  bool reject_nan = false;       ///< the same NaN, input_policy::reject: every rank must report it
  bool fp64 = false;             ///< fp64 logits (else fp32)
  bool per_rank = false;         ///< data_options: per-rank decisions and normaliser
  int threads = 1;
};

/// A running case: drive next() until false, then compare().
class case_run {
 public:
  virtual ~case_run() = default;
  /// The split call's next exchange (false: done).
  virtual bool next(tropd::dist::exchange& ex) = 0;
  /// The call's status code (0: ok), row and column.
  virtual int status_code() const = 0;
  virtual std::string status_message() const = 0;
  /// This rank's loss (its share of the batch's loss when the rows are split).
  virtual double loss() const = 0;
  /// Compares this rank's outputs with the single-process run; `loss_sum` is the sum of
  /// loss() over the data group. Returns the number of mismatches (details in `log`).
  virtual int compare(double loss_sum, std::string& log) const = 0;
  /// Bytes this rank contributed to each tensor-group exchange.
  virtual std::vector<size_t> tensor_bytes() const = 0;
};

/// The presets the tests cover (every named preset, plus variants of their switches).
std::vector<std::string> preset_names();
/// Whether a preset's decisions are deterministic (no random draw), so a data split that
/// cuts sequences (positions restart on each rank) still matches one process.
bool preset_deterministic(const std::string& name);

std::unique_ptr<case_run> make_case(const case_spec& spec);

}  // namespace tropd_dist_test
