// tropd/dist/records.hpp: the fixed-size records the distributed entry points exchange, the
// layouts they share, and the split-call interface (`exchange`) a caller drives.
//
// Every exchange is one all-gather among one group (dist::group): each rank contributes
// the same number of bytes, a rank_header followed by a payload, and receives every rank's
// contribution in rank order. A rank whose local work failed still contributes (its header
// carries the error), so no rank ever waits on a collective another rank skipped, and after
// the exchange every rank knows every failure and returns the same status.
//
// The row record of a vocabulary shard (dist/rows.hpp; sizes in docs/distributed.md):
//
//   offset  field                                      bytes
//   0       row_moments<double> of the shard            64   max_s, mass_s, moment_s, cross_s,
//                                                            max_t, mass_t, moment_t, cross_t
//                                                            (max_s NaN: NaN / +inf logits in the
//                                                            shard under input_policy::mask)
//   64      a_y, b_y: the sampled token's scaled         16   read only from the shard that owns y
//           student and teacher logits
//   80      [tail] log of the student's mass in the      8    tail-bucket objectives only
//           shard outside its listed candidates
//   ..      [ids] K candidate ids (global; -1: none)     4K   selected top-k only (rounded up to 8)
//   ..      [teacher] K candidates' scaled teacher       K w  selected top-k only (w = 4 for fp32 /
//           logits                                           bf16 / fp16 logits, 8 for fp64)
//   ..      [student] K scaled student logits at the     K w  every top-k objective (given lists:
//           candidates / at the given list's ids             at the ids this shard owns)
//
// Values are stored in the row passes' work type (float or double), so every rank merges
// exactly the numbers a single-process pass would have read.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include <tropd/config.hpp>
#include <tropd/core/status.hpp>

namespace tropd::dist {

/// The two groups a distributed call talks to.
enum class group : uint8_t {
  tensor = 0,  ///< the ranks holding the other vocabulary shards of the same rows
  data = 1,    ///< the ranks holding the other rows of the batch (same vocabulary shard)
};

/// This rank's place in one group.
struct group_layout {
  int rank = 0;
  int size = 1;
};

/// One collective a split call asks its caller to run: an all-gather among `among` of
/// `bytes` bytes from `send` into `recv` (group size x bytes, rank order). Both buffers
/// belong to the call object and stay valid until its next next().
struct exchange {
  group among = group::tensor;
  const void* send = nullptr;
  size_t bytes = 0;
  void* recv = nullptr;
};

/// This rank's columns [v0, v1) of a vocabulary of `vocab` entries (Megatron's vocab-parallel
/// layout: rank r of P usually holds [r V / P, (r + 1) V / P), but any partition works).
struct vocab_shard {
  index_t v0 = 0, v1 = 0, vocab = 0;
  constexpr index_t width() const noexcept { return v1 - v0; }
  constexpr bool owns(index_t id) const noexcept { return id >= v0 && id < v1; }
};

/// Whether a batch-level quantity is computed over the whole data-parallel group or per rank.
enum class scope : uint8_t {
  global = 0,    ///< as one process would on the concatenated batch (an exchange among `data`)
  per_rank = 1,  ///< from this rank's tokens only (no exchange)
};

namespace detail {

inline constexpr uint32_t header_magic = 0x64706f72u;  // "ropd"

/// The first bytes of every rank's contribution to every exchange.
struct rank_header {
  uint32_t magic = header_magic;
  uint32_t stage = 0;    ///< which exchange of the call (all ranks must be at the same one)
  int32_t code = 0;      ///< this rank's errc (0: ok)
  int32_t when = 0;      ///< 0: before any row was read (validation); 1: while reading rows
  int64_t row = -1, col = -1;
  int64_t v0 = 0, v1 = 0, vocab = 0, rows = 0, width = 0;
  uint64_t inputs_hash = 0;
  double values[4] = {0, 0, 0, 0};  ///< small per-rank numbers (counts)
  char detail[112] = {};
};
static_assert(sizeof(rank_header) == 224);

inline constexpr size_t round8(size_t x) noexcept { return (x + 7) & ~size_t(7); }

template <class T>
inline void put(void* base, size_t off, const T& v) noexcept {
  std::memcpy(static_cast<char*>(base) + off, &v, sizeof(T));
}
template <class T>
inline T get(const void* base, size_t off) noexcept {
  T v;
  std::memcpy(&v, static_cast<const char*>(base) + off, sizeof(T));
  return v;
}

/// A static string with this text (status::detail must outlive the call; error texts of
/// other ranks arrive as bytes). The set of texts is the library's finite set of messages.
inline const char* intern(const std::string& s) {
  static std::mutex m;
  static std::set<std::string> pool;
  const std::lock_guard<std::mutex> g(m);
  return pool.insert(s).first->c_str();
}

inline void set_error(rank_header& h, const status& s, int when) noexcept {
  h.code = static_cast<int32_t>(s.code);
  h.when = when;
  h.row = s.row;
  h.col = s.col;
  const char* d = s.detail ? s.detail : "";
  const size_t n = std::min(std::strlen(d), sizeof(h.detail) - 1);
  std::memcpy(h.detail, d, n);
  h.detail[n] = 0;
}

/// A rank's error as every rank reports it: "<group> rank r: <detail>" (group size > 1).
inline status remote_error(const rank_header& h, group g, int rank) {
  std::string d = (g == group::tensor ? "tensor-parallel rank " : "data-parallel rank ") + std::to_string(rank) + ": ";
  size_t n = 0;
  while (n < sizeof(h.detail) && h.detail[n]) ++n;
  d.append(h.detail, n);
  return make_error(static_cast<errc>(h.code), intern(d), h.row, h.col);
}

/// FNV-1a over a byte range (a cheap check that the ranks of a group were given the same rows).
inline uint64_t fnv1a(const void* p, size_t n, uint64_t h = 1469598103934665603ull) noexcept {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ c[i]) * 1099511628211ull;
  return h;
}

/// Byte offsets of a shard's row record (see the header comment).
struct record_layout {
  index_t K = 0;            ///< top-k width (0: no top-k term)
  bool select = false;      ///< candidates carry ids and teacher values (selected from logits)
  bool tail = false;        ///< the tail-bucket slot
  size_t value_bytes = 4;   ///< the work type's size
  size_t off_y = 0, off_tail = 0, off_ids = 0, off_teacher = 0, off_student = 0, bytes = 0;

  void init() noexcept {
    size_t o = 8 * sizeof(double);
    off_y = o;
    o += 2 * sizeof(double);
    off_tail = o;
    if (tail) o += sizeof(double);
    off_ids = o;
    if (select) o += round8(size_t(K) * 4);
    off_teacher = o;
    if (select) o += round8(size_t(K) * value_bytes);
    off_student = o;
    if (K > 0) o += round8(size_t(K) * value_bytes);
    bytes = o;
  }
};

}  // namespace detail

}  // namespace tropd::dist
