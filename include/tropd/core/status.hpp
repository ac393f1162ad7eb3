// tropd/core/status.hpp: the error model.
//
// Every entry point returns a `tropd::status` (CUB-style status return, no exceptions
// on the hot path). A failed call writes no partial output unless its documentation
// says otherwise. `status::message()` renders a sentence that names the failing
// argument and position; `throw_if_error` turns a status into a `tropd::error`.
#pragma once

#include <stdexcept>
#include <string>

#include <tropd/config.hpp>

namespace tropd {

/// Error codes. Each one is documented in docs/robustness.md with the rule that raises it.
enum class errc : int {
  ok = 0,
  empty_batch,          ///< zero rows / tokens where at least one is required
  shape_mismatch,       ///< extents of two arguments disagree (or a stride is smaller than a row)
  id_out_of_range,      ///< a token id outside [0, V)
  non_finite_input,     ///< NaN or +inf in logits / log-probs, or NaN in -inf-permitting inputs
  no_finite_entry,      ///< a logits row in which every entry is -inf (no distribution)
  infinite_divergence,  ///< the requested quantity is infinite (e.g. reverse KL where the teacher has zero mass)
  duplicate_topk_id,    ///< a top-k list names the same id twice
  invalid_topk_list,    ///< a top-k list is malformed (mass > 1, -inf before a finite entry, bad k)
  invalid_parameter,    ///< a policy parameter outside its domain (beta outside [0,1], T <= 0, k < 1, ...)
  insufficient_scratch, ///< caller-provided scratch space smaller than the size function asked for
  unsupported,          ///< the combination of inputs and policies is not supported by this entry point
  backend_error,        ///< an error reported by the CUDA runtime
};

/// Human-readable name of an error code.
constexpr const char* to_string(errc e) noexcept {
  switch (e) {
    case errc::ok: return "ok";
    case errc::empty_batch: return "empty batch";
    case errc::shape_mismatch: return "shape mismatch";
    case errc::id_out_of_range: return "id out of range";
    case errc::non_finite_input: return "non-finite input";
    case errc::no_finite_entry: return "row without a finite entry";
    case errc::infinite_divergence: return "infinite divergence";
    case errc::duplicate_topk_id: return "duplicate top-k id";
    case errc::invalid_topk_list: return "invalid top-k list";
    case errc::invalid_parameter: return "invalid parameter";
    case errc::insufficient_scratch: return "insufficient scratch space";
    case errc::unsupported: return "unsupported";
    case errc::backend_error: return "backend error";
  }
  return "unknown error";
}

/// Result of a tropd call: a code, the first failing position (row/token and column/entry,
/// -1 where not applicable) and a static string naming the argument and rule.
struct [[nodiscard]] status {
  errc code = errc::ok;
  index_t row = -1;
  index_t col = -1;
  const char* detail = "";

  TROPD_HD constexpr bool ok() const noexcept { return code == errc::ok; }

  /// "tropd: <code>: <detail> (row R, column C)".
  std::string message() const {
    std::string m = "tropd: ";
    m += to_string(code);
    if (detail && *detail) { m += ": "; m += detail; }
    if (row >= 0 || col >= 0) {
      m += " (";
      if (row >= 0) m += "row " + std::to_string(row);
      if (row >= 0 && col >= 0) m += ", ";
      if (col >= 0) m += "column " + std::to_string(col);
      m += ")";
    }
    return m;
  }
};

TROPD_HD constexpr status ok_status() noexcept { return {}; }
TROPD_HD constexpr status make_error(errc c, const char* detail, index_t row = -1, index_t col = -1) noexcept {
  return status{c, row, col, detail};
}

/// Exception carrying a failed status, for callers who prefer exceptions.
class error : public std::runtime_error {
 public:
  explicit error(const status& s) : std::runtime_error(s.message()), status_(s) {}
  const tropd::status& get_status() const noexcept { return status_; }
 private:
  tropd::status status_;
};

/// Throws tropd::error if `s` is not ok.
inline void throw_if_error(const status& s) {
  if (!s.ok()) throw error(s);
}

}  // namespace tropd

/// Returns early from the enclosing function if the expression yields a failed status.
#define TROPD_TRY(expr)                          \
  do {                                           \
    const ::tropd::status tropd_try_s_ = (expr); \
    if (!tropd_try_s_.ok()) return tropd_try_s_; \
  } while (0)
