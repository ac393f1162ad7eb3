// tropd/gpu/plan.hpp: the host-side planning of the CUDA backend, in plain C++ (no CUDA
// header, so the CPU test suite checks it): the limits, the device status word's encoding,
// the choice of blocks per row from the measured occupancy, the column ranges of a row's
// blocks, and the scratch layout builder every *_scratch_bytes function and its call share.
//
// Everything here is arithmetic on sizes; nothing reads device memory.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <tropd/config.hpp>
#include <tropd/core/status.hpp>

namespace tropd::gpu {

/// Threads per block of every kernel of the backend.
inline constexpr int block_threads = 256;
/// Largest top-k list length (lists live in shared memory).
inline constexpr int max_topk = 1024;
/// Largest number of rows / tokens of a call (the status word holds row + 1 in 28 bits).
inline constexpr index_t max_rows = (index_t(1) << 28) - 2;
/// Largest vocabulary (and list width) of a call (the status word holds column + 1 in 21 bits).
inline constexpr index_t max_cols = (index_t(1) << 21) - 2;
/// Required alignment of the scratch pointer (cudaMalloc gives 256).
inline constexpr size_t scratch_alignment = 256;

// ---------------------------------------------------------------------------------------------
// The device status word
// ---------------------------------------------------------------------------------------------

/// The stage of a call that found a data error. Stages are ordered as the host backend runs
/// its checks, so the error the status word keeps is the one the host reports: the smallest
/// stage, then the smallest row, then the smallest column.
enum class check_stage : uint8_t {
  grad_scale = 0,   ///< grad_scale values (row functions)
  token_ids = 1,    ///< the rows' token ids in [0, V)
  arguments = 2,    ///< s_old (sampled_rows), given top-k lists (every rule of a list)
  rows = 3,         ///< pass 1 and what each row derives from it
  offsets_ends = 4, ///< seq_offsets[0] = 0 and seq_offsets[n_seq] = n
  offsets_order = 5,///< seq_offsets never decrease
  origin = 6,       ///< origin tags
  topk_ids = 7,     ///< top-k ids of a token batch (>= 0, no repeats)
  token_values = 8, ///< every token's values (core/token_rules.hpp check_token_values)
  token_rule = 9,   ///< the per-token rule (evaluate_token)
  loss = 10,        ///< the aggregated loss (dense objectives)
  outputs = 11,     ///< the per-token outputs and gradient bounds fit their types
  gradient = 12,    ///< a gradient value written does not fit its type
  row_loss = 13,    ///< a row function's loss is not finite in double (the host checks it last)
};

/// Which check found a data error (names the rule in the decoded status's detail).
enum class check_site : uint8_t {
  none = 0,
  student_logits,     ///< NaN / +inf in a student logits row
  teacher_logits,     ///< NaN / +inf in a teacher logits row
  student_scaled,     ///< a finite student logit leaves the work type's range once divided by T_S
  teacher_scaled,     ///< the same for the teacher
  base2_range,        ///< |z / T| * log2(e) overflows fp32 (device only: |z / T| > 2.3e38)
  student_row_empty,  ///< a student row is -inf everywhere
  teacher_row_empty,  ///< a teacher row is -inf everywhere
  divergence,         ///< the full-vocabulary divergence is infinite
  token_id,           ///< a row's token id outside [0, V) (column: the id)
  s_old,              ///< s_old not finite (sampled_rows)
  student_zero_mass,  ///< the student gives zero mass to the row's token (column: the id)
  teacher_zero_mass,  ///< the teacher gives zero mass to the sampled token (sampled_rows)
  estimator,          ///< a sampled estimator overflows
  topk_value,         ///< a teacher top-k log-prob is NaN or +inf (column: entry)
  topk_id_range,      ///< a top-k id outside [0, V) (column: entry)
  topk_duplicate,     ///< a top-k list repeats an id (column: entry)
  topk_eval,          ///< topk_forward_kl::eval rejected the row (column: entry, if any)
  grad_scale,         ///< grad_scale not finite
  offsets_ends,       ///< seq_offsets do not start at 0 / end at n
  offsets_order,      ///< seq_offsets decrease (row: the index)
  origin_tag,         ///< an origin tag that is not prompt, teacher or student
  token_values,       ///< rules::check_token_values failed (the code says which rule)
  token_rule,         ///< evaluate_token failed (the code says which term)
  dense_loss,         ///< the aggregated loss is not finite in double
  output_range,       ///< a per-token output or gradient bound overflows its type
  gradient,           ///< a gradient value written does not fit its type (column: first such entry)
  count_
};

namespace detail {
inline constexpr uint64_t status_clear = ~uint64_t(0);
inline constexpr uint64_t row_field = (uint64_t(1) << 28) - 1;
inline constexpr uint64_t col_field = (uint64_t(1) << 21) - 1;
}  // namespace detail

/// The 64-bit status word: [63:60] stage, [59:32] row + 1, [31:11] column + 1, [10:7] errc,
/// [6:0] site (row, column 0: not applicable). A clear word is all ones; the kernels keep the
/// smallest word (atomicMin), i.e. the first error in the host's order.
TROPD_HD constexpr uint64_t encode_status(check_stage stage, errc code, check_site site, index_t row, index_t col) noexcept {
  const uint64_t r = row < 0 ? 0 : (uint64_t(row) + 1 > detail::row_field ? detail::row_field : uint64_t(row) + 1);
  const uint64_t c = col < 0 ? 0 : (uint64_t(col) + 1 > detail::col_field ? detail::col_field : uint64_t(col) + 1);
  return (uint64_t(stage) << 60) | (r << 32) | (c << 11) | ((uint64_t(code) & 15u) << 7) | (uint64_t(site) & 127u);
}

/// A sentence naming the rule behind a site (the decoded status's detail).
inline const char* site_detail(check_site s) noexcept {
  switch (s) {
    case check_site::none: return "device check";
    case check_site::student_logits: return "student logits contain NaN or +inf (device check)";
    case check_site::teacher_logits: return "teacher logits contain NaN or +inf (device check)";
    case check_site::student_scaled:
      return "a finite student logit divided by the temperature leaves the work type's range (pass fp64 logits or use a larger temperature) (device check)";
    case check_site::teacher_scaled:
      return "a finite teacher logit divided by the temperature leaves the work type's range (pass fp64 logits or use a larger temperature) (device check)";
    case check_site::base2_range:
      return "a logit divided by the temperature exceeds 2.3e38 in magnitude: too large for the device's base-2 exponentials (pass fp64 logits) (device check)";
    case check_site::student_row_empty: return "student logits row is -inf everywhere (device check)";
    case check_site::teacher_row_empty: return "teacher logits row is -inf everywhere (device check)";
    case check_site::divergence:
      return "the divergence is infinite: one distribution gives zero mass where the other has mass (device check)";
    case check_site::token_id: return "token id outside [0, V) (column: the id) (device check)";
    case check_site::s_old: return "s_old is not finite (device check)";
    case check_site::student_zero_mass: return "the student gives zero mass to the token at this row (column: the id) (device check)";
    case check_site::teacher_zero_mass:
      return "the teacher gives zero mass to the sampled token (infinite log-ratio); use a trust region or a reward clip (device check)";
    case check_site::estimator: return "the estimator overflows for this token (device check)";
    case check_site::topk_value: return "teacher top-k log-prob is NaN or +inf (column: entry) (device check)";
    case check_site::topk_id_range: return "top-k id outside [0, V) (column: entry) (device check)";
    case check_site::topk_duplicate: return "top-k list repeats an id (column: entry) (device check)";
    case check_site::topk_eval:
      return "topk_forward_kl rejected the row: zero student mass at a teacher id, no finite entry, or mass > 1 (see the code) (device check)";
    case check_site::grad_scale: return "grad_scale is not finite (device check)";
    case check_site::offsets_ends: return "seq_offsets must start at 0 and end at n (device check)";
    case check_site::offsets_order: return "seq_offsets must be non-decreasing (device check)";
    case check_site::origin_tag: return "origin tag must be prompt, teacher or student (device check)";
    case check_site::token_values:
      return "a token's values fail rules::check_token_values: s / s_old not finite, t NaN or +inf, a log-prob > 0, a bad "
             "entropy, KL, reference or top-k entry (see the code) (device check)";
    case check_site::token_rule: return "the per-token rule (evaluate_token) failed for this token (see the code) (device check)";
    case check_site::dense_loss: return "the loss is not finite in double (device check)";
    case check_site::output_range:
      return "a per-token loss, advantage or gradient overflows its output type (e.g. rho = exp(s - s_old) too large) (device check)";
    case check_site::gradient:
      return "the gradient does not fit the output type (grad_scale / temperature too large, or logits at the edge of the range); "
             "gradient rows may be partly written (device check)";
    case check_site::count_: break;
  }
  return "device check";
}

/// Decodes a status word: ok for a clear word, else the code, a detail naming the check, the
/// row (row / token / sequence index) and the column (vocabulary id or list entry), -1 where
/// not applicable.
inline status decode_status(uint64_t word) noexcept {
  if (word == detail::status_clear) return {};
  const index_t row = index_t((word >> 32) & detail::row_field) - 1;
  const index_t col = index_t((word >> 11) & detail::col_field) - 1;
  const auto code = static_cast<errc>((word >> 7) & 15u);
  const auto site = static_cast<check_site>(word & 127u);
  return make_error(code, site_detail(site), row, col);
}

/// The stage of an encoded word (for tests).
constexpr check_stage stage_of(uint64_t word) noexcept { return static_cast<check_stage>(word >> 60); }
/// The site of an encoded word (for tests).
constexpr check_site site_of(uint64_t word) noexcept { return static_cast<check_site>(word & 127u); }

// ---------------------------------------------------------------------------------------------
// Pass-1 error order
// ---------------------------------------------------------------------------------------------

/// The host's pass 1 reads rows in chunks of 1024 columns, the student's chunk before the
/// teacher's, and reports the first bad entry it meets: within a row, an error at column c of
/// row kind k (0 student, 1 teacher) comes before one at (c', k') iff its key is smaller.
/// (host/simd.hpp's `chunk`; tests/test_gpu_plan.cpp checks they agree.)
inline constexpr index_t host_chunk = 1024;
TROPD_HD constexpr int64_t pass1_error_key(index_t col, int teacher) noexcept {
  return ((col / host_chunk) * 2 + teacher) * host_chunk + (col % host_chunk);
}
TROPD_HD constexpr index_t pass1_error_col(int64_t key) noexcept {
  return (key / (2 * host_chunk)) * host_chunk + key % host_chunk;
}
TROPD_HD constexpr int pass1_error_teacher(int64_t key) noexcept { return int((key / host_chunk) % 2); }

// ---------------------------------------------------------------------------------------------
// Launch planning
// ---------------------------------------------------------------------------------------------

/// Blocks per row from the resident capacity: `blocks_per_sm` resident blocks of the row
/// kernel (cudaOccupancyMaxActiveBlocksPerMultiprocessor) on `sm_count` multiprocessors. Among
/// S = 1 .. min(1024, V / 4096) blocks per row (at least 4096 columns per block), the S whose
/// waves ceil(rows S / capacity) / S of 1/S-row work are fewest, the split path (S > 1)
/// counted 25% dearer (its extra kernels, the partials' round trip, and no L2 reuse between a
/// row's passes, which run in different kernels); ties: the smaller S. So a batch splits only
/// when it leaves much of the GPU idle (fewer rows than resident blocks), not to trim a tail.
constexpr int choose_blocks_per_row(index_t rows, index_t V, int sm_count, int blocks_per_sm) noexcept {
  const index_t cap = index_t(sm_count > 0 ? sm_count : 1) * index_t(blocks_per_sm > 0 ? blocks_per_sm : 1);
  if (rows <= 0) return 1;
  index_t s_max = V / 4096;
  if (s_max > 1024) s_max = 1024;
  if (s_max < 1) s_max = 1;
  int best = 1;
  double best_cost = double((rows + cap - 1) / cap);
  for (index_t s = 2; s <= s_max; ++s) {
    const double waves = double((rows * s + cap - 1) / cap) / double(s);
    const double cost = waves * 1.25;
    if (cost < best_cost * 0.999) {
      best_cost = cost;
      best = int(s);
    }
  }
  return best;
}

/// Columns [c0, c1) block b of S covers in a row of `nvec` vectors of `vw` columns after a
/// scalar head of `head` columns (block 0 also takes the head, block S - 1 the tail).
struct col_range {
  index_t c0 = 0, c1 = 0;  ///< columns
  index_t v0 = 0, v1 = 0;  ///< vectors (indices into the vector part)
};
TROPD_HD constexpr col_range block_columns(index_t V, index_t head, index_t nvec, int vw, int b, int S) noexcept {
  col_range r;
  r.v0 = nvec * b / S;
  r.v1 = nvec * (b + 1) / S;
  r.c0 = b == 0 ? 0 : head + r.v0 * vw;
  r.c1 = b == S - 1 ? V : head + r.v1 * vw;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Scratch layout
// ---------------------------------------------------------------------------------------------

/// Lays out regions of the caller's scratch, each 256-byte aligned; the status word is always
/// first (offset 0). take<T>(n) returns the region's offset; `bytes` is the total so far. A
/// layout function run with the same arguments gives the same offsets in the size function
/// and in the call.
struct scratch_layout {
  size_t bytes = 256;  // [0, 8): the status word
  template <class T>
  constexpr size_t take(index_t count) noexcept {
    const size_t at = bytes;
    const size_t n = count > 0 ? size_t(count) * sizeof(T) : 0;
    bytes = (at + n + 255) / 256 * 256;
    return at;
  }
  constexpr size_t take_bytes(size_t n) noexcept {
    const size_t at = bytes;
    bytes = (at + n + 255) / 256 * 256;
    return at;
  }
};

}  // namespace tropd::gpu
